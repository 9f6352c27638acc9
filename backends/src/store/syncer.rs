//! Group commit: one thread fsyncs every queue log with pending completions. Publishes that
//! arrive while an fsync runs are written meanwhile and covered by the next one, so one fsync
//! confirms a whole batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::log::QueueLog;

pub struct Syncer {
    dirty: Mutex<Vec<Arc<QueueLog>>>,
    wake: Condvar,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Syncer {
    pub fn start() -> Arc<Syncer> {
        let syncer = Arc::new(Syncer {
            dirty: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let worker = syncer.clone();
        let handle = std::thread::Builder::new()
            .name("warren-fsync".into())
            .spawn(move || worker.run());
        match handle {
            Ok(h) => *syncer.thread.lock() = Some(h),
            Err(err) => tracing::error!(%err, "cannot start the fsync thread"),
        }
        syncer
    }

    /// Queues a log for the next group commit.
    pub fn schedule(&self, log: Arc<QueueLog>) {
        self.dirty.lock().push(log);
        self.wake.notify_one();
    }

    fn run(&self) {
        loop {
            let batch = {
                let mut dirty = self.dirty.lock();
                while dirty.is_empty() {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    self.wake.wait(&mut dirty);
                }
                std::mem::take(&mut *dirty)
            };
            for log in batch {
                log.sync();
            }
        }
    }

    /// Finishes pending syncs and stops the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_all();
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }
}
