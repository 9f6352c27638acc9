//! The engine task of a bridge (it owns the connection to the target and sends what
//! `Backend::publish` hands it) as the bridge holds it: the way in, and the task to await on
//! close.

use std::future::Future;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub(crate) struct EngineTask<T> {
    intake: mpsc::UnboundedSender<T>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> EngineTask<T> {
    /// Spawns `run` on `runtime` with the receiving end of the intake.
    pub(crate) fn spawn<F>(
        runtime: &Handle,
        run: impl FnOnce(mpsc::UnboundedReceiver<T>) -> F,
    ) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (intake, rx) = mpsc::unbounded_channel();
        EngineTask {
            intake,
            task: Mutex::new(Some(runtime.spawn(run(rx)))),
        }
    }

    /// Hands `item` to the engine without blocking; gives it back once the engine is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        self.intake
            .send(item)
            .map_err(|mpsc::error::SendError(item)| item)
    }

    /// Waits for the engine task to end (the bridge told it to close); at once if it has.
    pub(crate) async fn join(&self) {
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
