//! Message and property mapping between Warren's [`Message`] and lapin's `BasicProperties`.
//!
//! Both sides speak AMQP 0-9-1, so the mapping is 1:1 except where RabbitMQ would refuse a
//! value or where a resend needs an identity:
//!
//! | property           | Warren → RabbitMQ (publish)                          | RabbitMQ → Warren (subscribe) |
//! |--------------------|------------------------------------------------------|-------------------------------|
//! | `content-type`     | copied                                               | copied                        |
//! | `content-encoding` | copied                                               | copied                        |
//! | `headers`          | copied (the field table as is)                       | copied                        |
//! | `delivery-mode`    | copied (2 = persistent)                              | copied                        |
//! | `priority`         | copied                                               | copied                        |
//! | `correlation-id`   | copied                                               | copied                        |
//! | `reply-to`         | copied (names a queue at the upstream)               | copied                        |
//! | `expiration`       | copied; a value that is not a non-negative integer, which RabbitMQ refuses by closing the channel, fails the message at once (never retried) | copied |
//! | `message-id`       | copied; **set to `warren-<instance>-<n>` if absent**, stable across resends | copied |
//! | `timestamp`        | copied                                               | copied                        |
//! | `type`             | copied                                               | copied                        |
//! | `user-id`          | copied **only if it equals the upstream connection's user**, dropped otherwise (RabbitMQ refuses a publish whose user-id is not the connection's user with PRECONDITION_FAILED, closing the channel) | copied (RabbitMQ validated it) |
//! | `app-id`           | copied                                               | copied                        |
//! | `cluster-id`       | dropped (reserved in 0-9-1)                          | copied                        |
//!
//! The exchange is the route's destination and the routing key is the message's own. On the
//! way in, the message keeps the exchange and routing key RabbitMQ delivered it with.
//!
//! RabbitMQ does not deduplicate: a message resent after a connection loss may arrive twice.
//! The stable `message-id` lets consumers (or a deduplicating plugin) recognise the copy.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lapin::types::ShortString;
use lapin::BasicProperties;
use warren_backends::Message;

/// Hands out the `message-id`s the bridge sets on messages that have none: one random prefix
/// per bridge instance, then a counter.
#[derive(Debug)]
pub(crate) struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl MessageIds {
    pub(crate) fn new() -> MessageIds {
        MessageIds {
            prefix: format!("{:016x}", rand::random::<u64>()),
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn next(&self) -> ShortString {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("warren-{}-{n}", self.prefix).into()
    }
}

/// A property value RabbitMQ would refuse, which no resend can fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unpublishable(pub String);

/// The properties to publish `message` upstream with, as the table above says. `upstream_user`
/// is the user the bridge connects as; `ids` supplies a message-id when the message has none.
pub(crate) fn to_upstream(
    message: &Message,
    upstream_user: &str,
    ids: &MessageIds,
) -> Result<BasicProperties, Unpublishable> {
    let p = &message.properties();
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.expiration() {
        if v.as_str().parse::<u64>().is_err() {
            return Err(Unpublishable(format!(
                "expiration '{v}' is not a non-negative integer; RabbitMQ refuses it"
            )));
        }
        out = out.with_expiration(v.clone());
    }
    out = out.with_message_id(match p.message_id() {
        Some(v) => v.clone(),
        None => ids.next(),
    });
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        if v.as_str() == upstream_user {
            out = out.with_user_id(v.clone());
        } else {
            tracing::trace!(user_id = %v, upstream_user, "dropping a user-id RabbitMQ would refuse");
        }
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    Ok(out)
}

/// Warren's properties for a message RabbitMQ delivered: every property as it came (both
/// sides speak AMQP 0-9-1, so there is nothing to translate).
pub(crate) fn from_upstream(p: &BasicProperties) -> BasicProperties {
    p.clone()
}

/// A Warren message from what RabbitMQ delivered (its raw property block is re-encoded).
pub(crate) fn message_from_upstream(
    exchange: ShortString,
    routing_key: ShortString,
    properties: &BasicProperties,
    body: Vec<u8>,
) -> Message {
    Message::new(
        exchange,
        routing_key,
        from_upstream(properties),
        Bytes::from(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    fn without_user() -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-tenant".into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        headers.insert("x-count".into(), AMQPValue::LongInt(7));
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id("corr-1".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("order.created".into())
            .with_app_id("shop".into())
    }

    fn full_properties(user: &str) -> BasicProperties {
        without_user().with_user_id(user.into())
    }

    fn message(properties: BasicProperties) -> Message {
        Message::new(
            "in".into(),
            "orders.eu".into(),
            properties,
            Bytes::from_static(b"{}"),
        )
    }

    #[test]
    fn every_property_maps_one_to_one_both_ways() {
        let ids = MessageIds::new();
        let original = full_properties("guest");
        let upstream = to_upstream(&message(original.clone()), "guest", &ids).unwrap();
        assert_eq!(upstream, original);
        let back =
            message_from_upstream("ex".into(), "orders.eu".into(), &upstream, b"{}".to_vec());
        assert_eq!(back.properties(), original);
        assert_eq!(back.routing_key(), "orders.eu");
        assert_eq!(back.exchange(), "ex");
        assert_eq!(back.body(), b"{}");
        // The raw block is re-encoded so the gateway re-sends what the properties say.
        let parsed = amq_protocol_parse(back.raw_properties());
        assert_eq!(parsed, original);
    }

    fn amq_protocol_parse(raw: &[u8]) -> BasicProperties {
        lapin::protocol::basic::parse_properties(raw).unwrap().1
    }

    #[test]
    fn a_foreign_user_id_is_dropped_and_the_users_own_kept() {
        let ids = MessageIds::new();
        let upstream = to_upstream(&message(full_properties("mallory")), "guest", &ids).unwrap();
        assert_eq!(upstream, without_user());
        let kept = to_upstream(&message(full_properties("bridge")), "bridge", &ids).unwrap();
        assert_eq!(kept.user_id().as_ref().map(|u| u.as_str()), Some("bridge"));
    }

    #[test]
    fn a_missing_message_id_gets_a_unique_one() {
        let ids = MessageIds::new();
        let empty = message(BasicProperties::default());
        let a = to_upstream(&empty, "guest", &ids).unwrap();
        let b = to_upstream(&empty, "guest", &ids).unwrap();
        let (a, b) = (
            a.message_id().clone().unwrap(),
            b.message_id().clone().unwrap(),
        );
        assert!(a.as_str().starts_with("warren-"), "{a}");
        assert_ne!(a, b);
        // Nothing else is invented.
        let only_id = to_upstream(&empty, "guest", &ids).unwrap();
        let id = only_id.message_id().clone().unwrap();
        assert_eq!(only_id, BasicProperties::default().with_message_id(id));
    }

    #[test]
    fn an_expiration_rabbitmq_refuses_is_unpublishable() {
        let ids = MessageIds::new();
        for bad in ["-1", "soon", "1.5", ""] {
            let m = message(BasicProperties::default().with_expiration(bad.into()));
            assert!(to_upstream(&m, "guest", &ids).is_err(), "{bad}");
        }
        let ok = message(BasicProperties::default().with_expiration("0".into()));
        assert!(to_upstream(&ok, "guest", &ids).is_ok());
    }

    #[test]
    fn cluster_id_is_not_sent_upstream_but_kept_on_the_way_in() {
        let ids = MessageIds::new();
        let with = BasicProperties::default()
            .with_cluster_id("c".into())
            .with_message_id("x".into());
        assert_eq!(
            to_upstream(&message(with.clone()), "guest", &ids).unwrap(),
            BasicProperties::default().with_message_id("x".into())
        );
        assert_eq!(from_upstream(&with), with);
    }
}
