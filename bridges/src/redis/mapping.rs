//! How a Warren [`Message`] becomes a Redis stream entry and back.
//!
//! An entry is a flat list of field/value pairs (binary-safe strings). Warren writes:
//!
//! | field              | holds                                                        | back to Warren                     |
//! |--------------------|--------------------------------------------------------------|------------------------------------|
//! | `body`             | the body, bytes as they are                                  | the body (absent: empty body)      |
//! | `routing_key`      | the routing key the client published with                    | the routing key (absent: the stream key) |
//! | `content_type`     | property `content-type`                                      | `content-type`                     |
//! | `content_encoding` | property `content-encoding`                                  | `content-encoding`                 |
//! | `delivery_mode`    | property `delivery-mode`, decimal                            | `delivery-mode` (not a number: dropped) |
//! | `priority`         | property `priority`, decimal                                 | `priority` (not a number: dropped) |
//! | `correlation_id`   | property `correlation-id`                                    | `correlation-id`                   |
//! | `reply_to`         | property `reply-to`                                          | `reply-to`                         |
//! | `expiration`       | property `expiration`                                        | `expiration`                       |
//! | `message_id`       | property `message-id`                                        | `message-id`                       |
//! | `timestamp`        | property `timestamp`, decimal seconds                        | `timestamp` (not a number: dropped) |
//! | `type`             | property `type`                                              | `type`                             |
//! | `user_id`          | property `user-id`                                           | `user-id`                          |
//! | `app_id`           | property `app-id`                                            | `app-id`                           |
//! | `cluster_id`       | property `cluster-id`                                        | `cluster-id`                       |
//! | `h.<name>`         | header `<name>`: strings and byte arrays as they are; integers, floats, decimals and timestamps in decimal; booleans `true`/`false`; void empty. **Nested tables and arrays are dropped** (logged) | header `<name>`, a long string |
//! | any other field    | (Warren never writes one)                                    | header named after the field, a long string |
//!
//! So an entry a non-Warren producer added with only `body` is consumed as a message with that
//! body and no properties, and one with `body` and `user 42` has header `user = "42"`. Header
//! types other than strings do not survive a round trip: every header comes back a string.
//! Property strings longer than 255 bytes (an AMQP short string's limit) are dropped on the way
//! in.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;
use warren_backends::Message;

/// The header field prefix.
pub const HEADER_PREFIX: &str = "h.";

/// The fields of the entry `message` is written as, in this order.
pub fn to_fields(message: &Message) -> Vec<(String, Vec<u8>)> {
    let p = message.properties();
    let mut out: Vec<(String, Vec<u8>)> = Vec::with_capacity(8);
    out.push(("body".into(), message.body().to_vec()));
    out.push((
        "routing_key".into(),
        message.routing_key().as_bytes().to_vec(),
    ));
    let mut text = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            out.push((name.to_string(), v.into_bytes()));
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|v| v.as_str().to_string());
    text("content_type", s(p.content_type()));
    text("content_encoding", s(p.content_encoding()));
    text("delivery_mode", p.delivery_mode().map(|v| v.to_string()));
    text("priority", p.priority().map(|v| v.to_string()));
    text("correlation_id", s(p.correlation_id()));
    text("reply_to", s(p.reply_to()));
    text("expiration", s(p.expiration()));
    text("message_id", s(p.message_id()));
    text("timestamp", p.timestamp().map(|v| v.to_string()));
    text("type", s(p.kind()));
    text("user_id", s(p.user_id()));
    text("app_id", s(p.app_id()));
    text("cluster_id", s(p.cluster_id()));
    if let Some(headers) = p.headers() {
        for (name, value) in headers.inner() {
            match header_bytes(value) {
                Some(bytes) => out.push((format!("{HEADER_PREFIX}{}", name.as_str()), bytes)),
                None => tracing::debug!(
                    header = name.as_str(),
                    "redis bridge: nested header value dropped (tables and arrays are not mapped)"
                ),
            }
        }
    }
    out
}

/// A header value as the bytes of its field; `None` for tables and arrays.
fn header_bytes(value: &AMQPValue) -> Option<Vec<u8>> {
    let text = |v: String| Some(v.into_bytes());
    match value {
        AMQPValue::Boolean(v) => text(v.to_string()),
        AMQPValue::ShortShortInt(v) => text(v.to_string()),
        AMQPValue::ShortShortUInt(v) => text(v.to_string()),
        AMQPValue::ShortInt(v) => text(v.to_string()),
        AMQPValue::ShortUInt(v) => text(v.to_string()),
        AMQPValue::LongInt(v) => text(v.to_string()),
        AMQPValue::LongUInt(v) => text(v.to_string()),
        AMQPValue::LongLongInt(v) => text(v.to_string()),
        AMQPValue::Float(v) => text(v.to_string()),
        AMQPValue::Double(v) => text(v.to_string()),
        AMQPValue::DecimalValue(d) => {
            let scaled = d.value as f64 / 10f64.powi(i32::from(d.scale));
            text(scaled.to_string())
        }
        AMQPValue::ShortString(v) => Some(v.as_str().as_bytes().to_vec()),
        AMQPValue::LongString(v) => Some(v.as_bytes().to_vec()),
        AMQPValue::Timestamp(v) => text(v.to_string()),
        AMQPValue::ByteArray(v) => Some(v.as_slice().to_vec()),
        AMQPValue::Void => Some(Vec::new()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => None,
    }
}

/// The message an entry of `stream` stands for, fields as the table above reads them.
pub fn from_fields<'a>(
    stream: &str,
    fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Message {
    let mut body = Bytes::new();
    let mut routing_key: Option<ShortString> = None;
    let mut p = AMQPProperties::default();
    let mut headers = FieldTable::default();
    let mut has_headers = false;
    for (name, value) in fields {
        let short = || {
            let text = String::from_utf8_lossy(value).into_owned();
            ShortString::try_new(text).ok()
        };
        let number = || std::str::from_utf8(value).ok().map(str::trim);
        match name {
            "body" => body = Bytes::copy_from_slice(value),
            "routing_key" => routing_key = short(),
            "content_type" => p = with(p, short(), AMQPProperties::with_content_type),
            "content_encoding" => p = with(p, short(), AMQPProperties::with_content_encoding),
            "delivery_mode" => {
                let v = number().and_then(|n| n.parse::<u8>().ok());
                p = with(p, v, AMQPProperties::with_delivery_mode)
            }
            "priority" => {
                let v = number().and_then(|n| n.parse::<u8>().ok());
                p = with(p, v, AMQPProperties::with_priority)
            }
            "correlation_id" => p = with(p, short(), AMQPProperties::with_correlation_id),
            "reply_to" => p = with(p, short(), AMQPProperties::with_reply_to),
            "expiration" => p = with(p, short(), AMQPProperties::with_expiration),
            "message_id" => p = with(p, short(), AMQPProperties::with_message_id),
            "timestamp" => {
                let v = number().and_then(|n| n.parse::<u64>().ok());
                p = with(p, v, AMQPProperties::with_timestamp)
            }
            "type" => p = with(p, short(), AMQPProperties::with_type),
            "user_id" => p = with(p, short(), AMQPProperties::with_user_id),
            "app_id" => p = with(p, short(), AMQPProperties::with_app_id),
            "cluster_id" => p = with(p, short(), AMQPProperties::with_cluster_id),
            other => {
                let header = other.strip_prefix(HEADER_PREFIX).unwrap_or(other);
                if let Ok(key) = ShortString::try_new(header.to_string()) {
                    headers.insert(key, AMQPValue::LongString(LongString::from(value.to_vec())));
                    has_headers = true;
                }
            }
        }
    }
    if has_headers {
        p = p.with_headers(headers);
    }
    let routing_key = routing_key.unwrap_or_else(|| ShortString::from(stream));
    Message::new(ShortString::from(""), routing_key, p, body)
}

fn with<T>(
    p: AMQPProperties,
    value: Option<T>,
    set: fn(AMQPProperties, T) -> AMQPProperties,
) -> AMQPProperties {
    match value {
        Some(v) => set(p, v),
        None => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: &Message) -> Message {
        let fields = to_fields(message);
        from_fields("s", fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    #[test]
    fn every_property_round_trips() {
        let mut headers = FieldTable::default();
        headers.insert("s".into(), AMQPValue::LongString("text".into()));
        let p = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("corr".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("created".into())
            .with_user_id("guest".into())
            .with_app_id("app".into())
            .with_cluster_id("c".into());
        let m = Message::new(
            "x".into(),
            "a.b".into(),
            p.clone(),
            Bytes::from_static(b"\0hi"),
        );
        let back = round_trip(&m);
        assert_eq!(back.body(), m.body());
        assert_eq!(back.routing_key(), "a.b");
        assert_eq!(back.properties(), p);
    }

    #[test]
    fn typed_headers_come_back_as_strings_and_nested_ones_are_dropped() {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), AMQPValue::LongLongInt(-42));
        headers.insert("b".into(), AMQPValue::Boolean(true));
        headers.insert("t".into(), AMQPValue::FieldTable(FieldTable::default()));
        let m = Message::new(
            "".into(),
            "k".into(),
            AMQPProperties::default().with_headers(headers),
            Bytes::new(),
        );
        let fields = to_fields(&m);
        assert!(fields.iter().any(|(k, v)| k == "h.n" && v == b"-42"));
        assert!(!fields.iter().any(|(k, _)| k == "h.t"));
        let back = round_trip(&m);
        let h = back.headers().unwrap();
        let h = h.inner();
        assert_eq!(h.get("n"), Some(&AMQPValue::LongString("-42".into())));
        assert_eq!(h.get("b"), Some(&AMQPValue::LongString("true".into())));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn a_foreign_entry_with_only_a_body() {
        let m = from_fields("orders", [("body", &b"hello"[..])]);
        assert_eq!(m.body(), b"hello");
        assert_eq!(m.routing_key(), "orders");
        assert_eq!(m.properties(), AMQPProperties::default());

        let m = from_fields("orders", [("user", &b"42"[..]), ("priority", &b"x"[..])]);
        assert!(m.body().is_empty());
        let h = m.headers().unwrap();
        let h = h.inner();
        assert_eq!(h.get("user"), Some(&AMQPValue::LongString("42".into())));
        assert_eq!(m.properties().priority(), &None);
    }
}
