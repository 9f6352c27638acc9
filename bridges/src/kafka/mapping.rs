//! How a Warren [`Message`] becomes a Kafka record and back.
//!
//! | AMQP 0-9-1 | Kafka record (produce) | back to AMQP (consume) |
//! |---|---|---|
//! | route destination | topic | — (the mapping's source topic) |
//! | body | value | body (a null value: empty body) |
//! | header `key_header` (configured), else the routing key | key (an empty routing key: null key) | — |
//! | routing key | header `x-amqp-routing-key` | routing key (absent: the key as UTF-8 when ≤ 255 bytes, else the topic) |
//! | exchange | header `x-amqp-exchange` | — (the message arrives from `""`, like every bridged message) |
//! | `timestamp` (s) | record timestamp (ms; absent: the send time) and header `x-amqp-timestamp` | `timestamp` from the header, else record timestamp ÷ 1000 |
//! | `content-type`, `content-encoding`, `delivery-mode`, `priority`, `correlation-id`, `reply-to`, `expiration`, `message-id`, `type`, `user-id`, `app-id`, `cluster-id` | header `x-amqp-<name>` (numbers in decimal) | the property |
//! | other headers | header of the same name, value encoded as below | header of the same name |
//! | — | partition, offset | headers `x-kafka-partition` (long), `x-kafka-offset` (long long) |
//!
//! Header values are bytes in Kafka. Strings (long and short) are their UTF-8 bytes, byte
//! arrays their bytes, integers, floats, decimals and timestamps decimal text, booleans
//! `true`/`false`, void a null header value. **Nested tables and arrays are dropped** (logged
//! at debug). So that a message that goes Warren → Kafka → Warren keeps its header types, the
//! names and types of the non-string headers travel in one more header,
//! `x-amqp-header-types` (`name=type;...`, types `bool i8 u8 i16 u16 i32 u32 i64 f32 f64
//! timestamp bytes void`); a Kafka-native producer that does not send it gets every header as
//! a long string (a null value as void).

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use warren_backends::Message;

pub const ROUTING_KEY_HEADER: &str = "x-amqp-routing-key";
pub const EXCHANGE_HEADER: &str = "x-amqp-exchange";
pub const TYPES_HEADER: &str = "x-amqp-header-types";
pub const PARTITION_HEADER: &str = "x-kafka-partition";
pub const OFFSET_HEADER: &str = "x-kafka-offset";
const PROPERTY_PREFIX: &str = "x-amqp-";

/// A message's key, headers and timestamp as the producer sends them (the value is the
/// message's body), owned so that a resend rebuilds the record.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    /// Header name and value (`None`: a null header value).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Milliseconds since the epoch; `None`: librdkafka stamps the send time.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn owned_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            h = h.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        h
    }
}

/// The record `message` is produced as. `key_header` names the header whose value is the key.
pub fn to_record(message: &Message, key_header: Option<&str>) -> Record {
    let p = message.properties();
    let mut headers: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(8);
    let mut types: Vec<String> = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    if let Some(table) = p.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            let Some((bytes, kind)) = header_value(value) else {
                tracing::debug!(
                    header = name,
                    "kafka bridge: nested header value dropped (tables and arrays are not mapped)"
                );
                continue;
            };
            if key_header == Some(name) {
                key = bytes.clone();
            }
            if let Some(kind) = kind {
                // A name with the list's separators cannot be listed: it comes back a string.
                if !name.contains(['=', ';']) {
                    types.push(format!("{name}={kind}"));
                }
            }
            headers.push((name.to_string(), bytes));
        }
    }
    let key = key.or_else(|| {
        let rk = message.routing_key();
        (!rk.is_empty()).then(|| rk.as_bytes().to_vec())
    });
    let mut text = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            headers.push((format!("{PROPERTY_PREFIX}{name}"), Some(v.into_bytes())));
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|v| v.as_str().to_string());
    text("routing-key", Some(message.routing_key().to_string()));
    text("exchange", Some(message.exchange().to_string()));
    text("content-type", s(p.content_type()));
    text("content-encoding", s(p.content_encoding()));
    text("delivery-mode", p.delivery_mode().map(|v| v.to_string()));
    text("priority", p.priority().map(|v| v.to_string()));
    text("correlation-id", s(p.correlation_id()));
    text("reply-to", s(p.reply_to()));
    text("expiration", s(p.expiration()));
    text("message-id", s(p.message_id()));
    text("timestamp", p.timestamp().map(|v| v.to_string()));
    text("type", s(p.kind()));
    text("user-id", s(p.user_id()));
    text("app-id", s(p.app_id()));
    text("cluster-id", s(p.cluster_id()));
    if !types.is_empty() {
        headers.push((TYPES_HEADER.to_string(), Some(types.join(";").into_bytes())));
    }
    let timestamp_ms = p
        .timestamp()
        .and_then(|s| i64::try_from(s).ok())
        .and_then(|s| s.checked_mul(1000));
    Record {
        key,
        headers,
        timestamp_ms,
    }
}

/// A header value's bytes (`None`: null) and its type name when it is not a string; `None`
/// for tables and arrays.
#[allow(clippy::type_complexity)]
fn header_value(value: &AMQPValue) -> Option<(Option<Vec<u8>>, Option<&'static str>)> {
    let text = |v: String, kind: &'static str| Some((Some(v.into_bytes()), Some(kind)));
    match value {
        AMQPValue::Boolean(v) => text(v.to_string(), "bool"),
        AMQPValue::ShortShortInt(v) => text(v.to_string(), "i8"),
        AMQPValue::ShortShortUInt(v) => text(v.to_string(), "u8"),
        AMQPValue::ShortInt(v) => text(v.to_string(), "i16"),
        AMQPValue::ShortUInt(v) => text(v.to_string(), "u16"),
        AMQPValue::LongInt(v) => text(v.to_string(), "i32"),
        AMQPValue::LongUInt(v) => text(v.to_string(), "u32"),
        AMQPValue::LongLongInt(v) => text(v.to_string(), "i64"),
        AMQPValue::Float(v) => text(v.to_string(), "f32"),
        AMQPValue::Double(v) => text(v.to_string(), "f64"),
        // A decimal comes back as its text: the scale is not kept.
        AMQPValue::DecimalValue(d) => {
            let scaled = d.value as f64 / 10f64.powi(i32::from(d.scale));
            Some((Some(scaled.to_string().into_bytes()), None))
        }
        AMQPValue::ShortString(v) => Some((Some(v.as_str().as_bytes().to_vec()), None)),
        AMQPValue::LongString(v) => Some((Some(v.as_bytes().to_vec()), None)),
        AMQPValue::Timestamp(v) => text(v.to_string(), "timestamp"),
        AMQPValue::ByteArray(v) => Some((Some(v.as_slice().to_vec()), Some("bytes"))),
        AMQPValue::Void => Some((None, Some("void"))),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => None,
    }
}

/// The header value of `bytes` typed as `kind` (from `x-amqp-header-types`); a long string
/// when there is no type or the text does not parse as one.
fn typed_value(bytes: Option<&[u8]>, kind: Option<&str>) -> AMQPValue {
    let Some(bytes) = bytes else {
        return AMQPValue::Void;
    };
    let text = std::str::from_utf8(bytes).ok();
    let parsed = match (kind, text) {
        (Some("bool"), Some(t)) => t.parse().ok().map(AMQPValue::Boolean),
        (Some("i8"), Some(t)) => t.parse().ok().map(AMQPValue::ShortShortInt),
        (Some("u8"), Some(t)) => t.parse().ok().map(AMQPValue::ShortShortUInt),
        (Some("i16"), Some(t)) => t.parse().ok().map(AMQPValue::ShortInt),
        (Some("u16"), Some(t)) => t.parse().ok().map(AMQPValue::ShortUInt),
        (Some("i32"), Some(t)) => t.parse().ok().map(AMQPValue::LongInt),
        (Some("u32"), Some(t)) => t.parse().ok().map(AMQPValue::LongUInt),
        (Some("i64"), Some(t)) => t.parse().ok().map(AMQPValue::LongLongInt),
        (Some("f32"), Some(t)) => t.parse().ok().map(AMQPValue::Float),
        (Some("f64"), Some(t)) => t.parse().ok().map(AMQPValue::Double),
        (Some("timestamp"), Some(t)) => t.parse().ok().map(AMQPValue::Timestamp),
        (Some("bytes"), _) => Some(AMQPValue::ByteArray(ByteArray::from(bytes))),
        _ => None,
    };
    parsed.unwrap_or_else(|| AMQPValue::LongString(LongString::from(bytes.to_vec())))
}

/// The message a consumed record of `topic` stands for, as the table above reads it.
pub fn from_record(record: &BorrowedMessage<'_>) -> Message {
    let headers: Vec<(&str, Option<&[u8]>)> = match record.headers() {
        Some(h) => h.iter().map(|h| (h.key, h.value)).collect(),
        None => Vec::new(),
    };
    from_parts(
        record.topic(),
        record.partition(),
        record.offset(),
        record.key(),
        record.payload(),
        record.timestamp().to_millis(),
        &headers,
    )
}

/// [`from_record`] on the record's parts (unit-testable without a broker).
pub fn from_parts(
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    headers: &[(&str, Option<&[u8]>)],
) -> Message {
    let mut p = AMQPProperties::default();
    let mut table = FieldTable::default();
    let mut routing_key: Option<ShortString> = None;
    let types: Vec<(&str, &str)> = headers
        .iter()
        .find(|(k, _)| *k == TYPES_HEADER)
        .and_then(|(_, v)| *v)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|list| list.split(';').filter_map(|e| e.split_once('=')).collect())
        .unwrap_or_default();
    for &(name, value) in headers {
        let short = || {
            value
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|t| ShortString::try_new(t.to_string()).ok())
        };
        let number = || {
            value
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::trim)
        };
        let Some(property) = name.strip_prefix(PROPERTY_PREFIX) else {
            let kind = types.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
            if let Ok(key) = ShortString::try_new(name.to_string()) {
                table.insert(key, typed_value(value, kind));
            }
            continue;
        };
        match property {
            "routing-key" => routing_key = short(),
            "exchange" | "header-types" => {}
            "content-type" => p = with(p, short(), AMQPProperties::with_content_type),
            "content-encoding" => p = with(p, short(), AMQPProperties::with_content_encoding),
            "delivery-mode" => {
                let v = number().and_then(|n| n.parse::<u8>().ok());
                p = with(p, v, AMQPProperties::with_delivery_mode)
            }
            "priority" => {
                let v = number().and_then(|n| n.parse::<u8>().ok());
                p = with(p, v, AMQPProperties::with_priority)
            }
            "correlation-id" => p = with(p, short(), AMQPProperties::with_correlation_id),
            "reply-to" => p = with(p, short(), AMQPProperties::with_reply_to),
            "expiration" => p = with(p, short(), AMQPProperties::with_expiration),
            "message-id" => p = with(p, short(), AMQPProperties::with_message_id),
            "timestamp" => {
                let v = number().and_then(|n| n.parse::<u64>().ok());
                p = with(p, v, AMQPProperties::with_timestamp)
            }
            "type" => p = with(p, short(), AMQPProperties::with_type),
            "user-id" => p = with(p, short(), AMQPProperties::with_user_id),
            "app-id" => p = with(p, short(), AMQPProperties::with_app_id),
            "cluster-id" => p = with(p, short(), AMQPProperties::with_cluster_id),
            // Another producer's `x-amqp-*` header: kept as a header.
            _ => {
                if let Ok(key) = ShortString::try_new(name.to_string()) {
                    let kind = types.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
                    table.insert(key, typed_value(value, kind));
                }
            }
        }
    }
    if p.timestamp().is_none() {
        if let Some(ms) = timestamp_ms.filter(|ms| *ms >= 0) {
            p = p.with_timestamp(ms as u64 / 1000);
        }
    }
    table.insert(PARTITION_HEADER.into(), AMQPValue::LongInt(partition));
    table.insert(OFFSET_HEADER.into(), AMQPValue::LongLongInt(offset));
    p = p.with_headers(table);
    let routing_key = routing_key
        .or_else(|| {
            key.and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| ShortString::try_new(k.to_string()).ok())
        })
        .unwrap_or_else(|| ShortString::from(topic));
    let body = value.map(Bytes::copy_from_slice).unwrap_or_default();
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

    fn round_trip(message: &Message, key_header: Option<&str>) -> (Record, Message) {
        let record = to_record(message, key_header);
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let back = from_parts(
            "t",
            2,
            41,
            record.key.as_deref(),
            Some(message.body()),
            Some(5_000),
            &headers,
        );
        (record, back)
    }

    #[test]
    fn every_property_and_header_type_round_trips() {
        let mut headers = FieldTable::default();
        headers.insert("s".into(), AMQPValue::LongString("text".into()));
        headers.insert("n".into(), AMQPValue::LongLongInt(-42));
        headers.insert("i".into(), AMQPValue::LongInt(7));
        headers.insert("b".into(), AMQPValue::Boolean(true));
        headers.insert("f".into(), AMQPValue::Double(1.5));
        headers.insert("x".into(), AMQPValue::ByteArray(vec![0u8, 255].into()));
        headers.insert("v".into(), AMQPValue::Void);
        headers.insert("ts".into(), AMQPValue::Timestamp(1_700_000_001));
        let p = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers.clone())
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
        let (record, back) = round_trip(&m, None);
        assert_eq!(record.key.as_deref(), Some(&b"a.b"[..]));
        assert_eq!(record.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(back.body(), m.body());
        assert_eq!(back.routing_key(), "a.b");
        let mut expected = headers;
        expected.insert(PARTITION_HEADER.into(), AMQPValue::LongInt(2));
        expected.insert(OFFSET_HEADER.into(), AMQPValue::LongLongInt(41));
        assert_eq!(back.properties(), p.with_headers(expected));
    }

    #[test]
    fn key_from_the_configured_header_else_the_routing_key() {
        let mut headers = FieldTable::default();
        headers.insert("customer".into(), AMQPValue::LongString("c-9".into()));
        let with_header = Message::new(
            "".into(),
            "rk".into(),
            AMQPProperties::default().with_headers(headers),
            Bytes::new(),
        );
        let without = Message::new(
            "".into(),
            "rk".into(),
            AMQPProperties::default(),
            Bytes::new(),
        );
        let empty_rk = Message::new(
            "".into(),
            "".into(),
            AMQPProperties::default(),
            Bytes::new(),
        );
        assert_eq!(
            to_record(&with_header, Some("customer")).key.as_deref(),
            Some(&b"c-9"[..])
        );
        assert_eq!(
            to_record(&without, Some("customer")).key.as_deref(),
            Some(&b"rk"[..])
        );
        assert_eq!(
            to_record(&with_header, None).key.as_deref(),
            Some(&b"rk"[..])
        );
        assert_eq!(to_record(&empty_rk, None).key, None);
    }

    #[test]
    fn a_foreign_record_and_nested_headers() {
        let m = from_parts(
            "orders",
            0,
            3,
            Some(b"customer-1"),
            Some(b"hello"),
            Some(1_700_000_000_123),
            &[("user", Some(b"42")), ("nothing", None)],
        );
        assert_eq!(m.body(), b"hello");
        assert_eq!(m.routing_key(), "customer-1");
        let p = m.properties();
        assert_eq!(p.timestamp(), &Some(1_700_000_000));
        let headers = m.headers().unwrap();
        let h = headers.inner();
        assert_eq!(h.get("user"), Some(&AMQPValue::LongString("42".into())));
        assert_eq!(h.get("nothing"), Some(&AMQPValue::Void));

        let no_key = from_parts("orders", 0, 3, None, None, None, &[]);
        assert_eq!(no_key.routing_key(), "orders");
        assert!(no_key.body().is_empty());

        let mut headers = FieldTable::default();
        headers.insert("t".into(), AMQPValue::FieldTable(FieldTable::default()));
        let nested = Message::new(
            "".into(),
            "k".into(),
            AMQPProperties::default().with_headers(headers),
            Bytes::new(),
        );
        assert!(!to_record(&nested, None)
            .headers
            .iter()
            .any(|(k, _)| k == "t"));
    }
}
