//! The one message type every part of Warren passes around.

use amq_protocol::protocol::basic::{gen_properties, AMQPProperties};
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
    /// A message made inside Warren (dead-lettering, bridges): its property block is encoded here.
    pub fn new(
        exchange: ShortString,
        routing_key: ShortString,
        properties: AMQPProperties,
        body: Bytes,
    ) -> Message {
        let raw_properties = encode_properties(&properties);
        Message {
            exchange,
            routing_key,
            properties,
            raw_properties,
            body,
        }
    }

    /// Rebuilds a message from its log record. Properties that no longer parse (a bug, never
    /// seen) come back empty rather than losing the body.
    pub fn from_stored(stored: crate::store::StoredMessage) -> Message {
        let properties =
            amq_protocol::protocol::basic::parse_properties(&stored.raw_properties[..])
                .map(|(_, p)| p)
                .unwrap_or_default();
        Message {
            exchange: stored.exchange.into(),
            routing_key: stored.routing_key.into(),
            properties,
            raw_properties: stored.raw_properties,
            body: stored.body,
        }
    }

    pub fn exchange(&self) -> &str {
        self.exchange.as_str()
    }

    pub fn routing_key(&self) -> &str {
        self.routing_key.as_str()
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The content-header property block as the publisher encoded it.
    pub fn raw_properties(&self) -> &Bytes {
        &self.raw_properties
    }

    /// The basic properties, decoded from the property block.
    pub fn properties(&self) -> AMQPProperties {
        self.properties.clone()
    }

    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    pub fn priority(&self) -> u8 {
        self.properties.priority().unwrap_or(0)
    }

    /// The per-message TTL in milliseconds from the `expiration` property. `Err` carries the
    /// text when it is not a non-negative integer, which RabbitMQ refuses at publish.
    pub fn expiration_ms(&self) -> Result<Option<u64>, String> {
        match self.properties.expiration() {
            None => Ok(None),
            Some(text) => text
                .as_str()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| text.to_string()),
        }
    }

    /// Whether the publisher asked for the message to survive a restart (delivery-mode 2).
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }
}

/// Encodes a basic property block (flags and values) as it travels in a content header.
pub fn encode_properties(properties: &AMQPProperties) -> Bytes {
    match cookie_factory::gen(gen_properties(properties), Vec::with_capacity(64)) {
        Ok((buf, _)) => Bytes::from(buf),
        // Every AMQPProperties value is encodable; an empty block is the safe fallback.
        Err(_) => Bytes::from_static(&[0, 0]),
    }
}
