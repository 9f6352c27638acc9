//! The one interface every target implements: the embedded engine and each bridge.
//!
//! Publishing never blocks the caller: `publish` hands the message over with a completion
//! `Guard` that the backend holds until the target has durably accepted the message (then drops
//! it) or, once its retry budget is spent, marks failed. The gateway's publisher confirms are
//! built on those guards, so a confirm means "the target has it", whatever the target is.
//!
//! Consuming is a `Subscription` with credit: at most `prefetch` messages are outstanding, each
//! with a `Settle` handle the gateway calls once the AMQP client acked, requeued or rejected it.

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;

use crate::store::Guard;
use crate::Message;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    #[error("{backend}: cannot connect to {target}: {reason}")]
    Connect {
        backend: String,
        target: String,
        reason: String,
    },
    #[error("{backend}: destination '{destination}' does not exist")]
    NotFound {
        backend: String,
        destination: String,
    },
    #[error("{backend}: {reason}")]
    Rejected { backend: String, reason: String },
    #[error("{backend} is closed")]
    Closed { backend: String },
}

/// What the client did with a message it got from a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove it from the target.
    Ack,
    /// Give it back to the target for redelivery (nack/reject with requeue, client gone).
    Requeue,
    /// Refuse it for good: the target's dead-letter path (reject/nack without requeue).
    Reject,
}

/// Settles one received message at its target. Called exactly once.
pub trait Settle: Send + Sync {
    fn settle(&self, outcome: Settlement);
}

/// A message from a target, with the handle that settles it there.
pub struct Incoming {
    pub message: Message,
    /// The target says it delivered this message before.
    pub redelivered: bool,
    pub settle: Box<dyn Settle>,
}

#[async_trait]
pub trait Subscription: Send {
    /// The next message; `None` when the subscription ended for good (backend closed).
    /// Transient target failures are retried inside, not surfaced here.
    async fn next(&mut self) -> Option<Incoming>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Reconnecting or otherwise not delivering right now, with the last error.
    Degraded(String),
    Closed,
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// The configured name of this backend.
    fn name(&self) -> &str;

    /// Hands `message` to the target's `destination`. The backend holds `guard` until the
    /// target durably accepted the message, and calls `guard.failed(..)` before dropping it if
    /// it could not deliver it within its retry budget. Never blocks.
    fn publish(&self, destination: &str, message: Message, guard: Guard);

    /// Subscribes to `source` with at most `prefetch` unsettled messages outstanding.
    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError>;

    /// Checks that `destination` exists (declaring it where the target allows and the
    /// configuration asks for it).
    async fn declare(&self, destination: &str) -> Result<(), BackendError>;

    /// Messages waiting at `destination`, where the target can tell.
    async fn depth(&self, destination: &str) -> Result<Option<u64>, BackendError>;

    fn health(&self) -> Health;

    /// Stops: outstanding publishes are failed or finished, subscriptions end.
    async fn close(&self);
}

/// A guard that does nothing: for publishes nobody waits on.
pub struct NoWait;

impl crate::store::Completion for NoWait {
    fn failed(&self, reason: &str) {
        tracing::warn!(reason, "a message nobody waited on could not be delivered");
    }
}

/// A guard for callers that do not track completion themselves.
pub fn no_wait() -> Guard {
    Arc::new(NoWait)
}
