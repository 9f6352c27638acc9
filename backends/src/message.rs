//! The one message type every part of Warren passes around.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{FieldTable, ShortString};
use bytes::Bytes;

/// A published message. Shared as `Arc<Message>` by every queue it was routed to: a fanout to ten
/// queues holds one body.
#[derive(Debug, Clone)]
pub struct Message {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: AMQPProperties,
    /// The content-header property block as the publisher encoded it, re-sent verbatim.
    pub raw_properties: Bytes,
    pub body: Bytes,
}

impl Message {
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// Bytes this message holds in memory, for queue byte counts.
    pub fn size(&self) -> usize {
        self.body.len()
    }
}
