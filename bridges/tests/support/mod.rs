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

/// The workspace root, for the broker scripts and their directories.
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The test broker's URL from `var`; without it the tests fail loudly, they never skip.
pub fn env_url(var: &str, script: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "\n\n{var} is not set: these tests need a real {what}.\n\
             Start the private test broker and point the tests at it:\n\n    \
             scripts/{script}.sh start\n    \
             export {var}=$(scripts/{script}.sh url)\n\n\
             (scripts/test.sh does both.)\n"
        ),
    }
}

/// Tests share a broker; one that restarts it must have it alone. Shared lock for the former,
/// exclusive for the latter: a file lock under target/<dir>/, so it holds across nextest's
/// processes too.
pub fn broker_lock(dir: &str, exclusive: bool) -> std::fs::File {
    let dir = repo_root().join("target").join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("tests.lock"))
        .unwrap();
    if exclusive {
        file.lock().unwrap();
    } else {
        file.lock_shared().unwrap();
    }
    file
}

/// The test broker's TLS URL and CA file from `url_var` and `ca_var` (scripts/test.sh sets
/// both from `scripts/<script>.sh tls-url` and `ca-file`); the tests fail loudly without them.
pub fn tls_env(url_var: &str, ca_var: &str, script: &str) -> (String, String) {
    match (std::env::var(url_var), std::env::var(ca_var)) {
        (Ok(url), Ok(ca)) if !url.is_empty() && !ca.is_empty() => (url, ca),
        _ => panic!(
            "\n\n{url_var} and {ca_var} must be set: these tests need the test broker's TLS \
             listener.\n\n    scripts/{script}.sh start\n    \
             export {url_var}=$(scripts/{script}.sh tls-url) {ca_var}=$(scripts/{script}.sh ca-file)\n\n\
             (scripts/test.sh does both.)\n"
        ),
    }
}
