//! Shared by the bridge tests: guards that record what became of each publish.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren_backends::store::Completion;

#[derive(Default)]
pub struct Outcomes {
    pub confirmed: Mutex<Vec<usize>>,
    pub failed: Mutex<Vec<(usize, String)>>,
    pub done: AtomicUsize,
}

pub struct TestGuard {
    id: usize,
    failed: AtomicBool,
    outcomes: Arc<Outcomes>,
}

impl Completion for TestGuard {
    fn failed(&self, reason: &str) {
        self.failed.store(true, Ordering::SeqCst);
        self.outcomes
            .failed
            .lock()
            .unwrap()
            .push((self.id, reason.to_string()));
    }
}

impl Drop for TestGuard {
    fn drop(&mut self) {
        if !self.failed.load(Ordering::SeqCst) {
            self.outcomes.confirmed.lock().unwrap().push(self.id);
        }
        self.outcomes.done.fetch_add(1, Ordering::SeqCst);
    }
}

impl Outcomes {
    pub fn guard(self: &Arc<Self>, id: usize) -> Arc<TestGuard> {
        Arc::new(TestGuard {
            id,
            failed: AtomicBool::new(false),
            outcomes: self.clone(),
        })
    }

    pub async fn wait_done(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} publishes completed within {within:?} ({} failed)",
                self.done.load(Ordering::SeqCst),
                self.failed.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
