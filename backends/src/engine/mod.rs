//! The embedded broker: virtual hosts with exchanges, queues, bindings and consumers.
//!
//! Locking: the vhost's maps are read on lookups only (a channel caches what it resolved); each
//! queue has its own short lock that is never held across an `.await`. Lock order is always
//! queue → consumer (channel) state, never the reverse, so delivery can run on whichever task
//! made a message or credit available.

mod args;
mod dead_letter;
mod deadline;
mod error;
mod exchange;
mod headers;
mod queue;
mod ready;
mod topic;
pub mod value;
mod vhost;

pub use args::{Overflow, QueueArgs};
pub use dead_letter::DeathReason;
pub use error::{EngineError, ErrorCode};
pub use exchange::{Exchange, ExchangeKind};
pub use queue::{
    Consumer, ConsumerRemoved, Offer, PublishOutcome, Queue, QueueOptions, QueuedMessage,
};
pub use topic::TopicTrie;
pub use vhost::{DeclaredQueue, ExchangeOptions, VHost, REPLY_TO};

/// The identity of a client connection, for exclusive queues.
pub type ConnectionId = u64;
