//! Warren's AMQP 0.9.1 front end: the codec, connection and channel state machines, and the
//! server that accepts clients.

pub mod auth;
mod channel;
pub mod codec;
mod confirm;
mod connection;
mod consumer;
pub mod error;
mod outbox;
pub mod plan;
pub mod routes;
pub mod server;

pub use server::{Server, ServerHandle};
