//! Warren's backends. Today: the embedded queue engine (`engine`). The `Backend` trait that
//! bridges implement joins it later; the engine knows no sockets and no protocol framing.

pub mod backend;
pub mod embedded;
pub mod engine;
pub mod message;
pub mod store;

pub use backend::{Backend, BackendError, Health, Incoming, Settle, Settlement, Subscription};
pub use message::Message;
