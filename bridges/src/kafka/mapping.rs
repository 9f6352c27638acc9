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
use std::ops::Range;
use warren_backends::Message;

pub const ROUTING_KEY_HEADER: &str = "x-amqp-routing-key";
pub const EXCHANGE_HEADER: &str = "x-amqp-exchange";
pub const TYPES_HEADER: &str = "x-amqp-header-types";
pub const PARTITION_HEADER: &str = "x-kafka-partition";
pub const OFFSET_HEADER: &str = "x-kafka-offset";
const PROPERTY_PREFIX: &str = "x-amqp-";

/// A message's key, headers and timestamp as the producer sends them (the value is the
/// message's body). The engine keeps one and refills it for every record it produces, so that
/// mapping a message allocates nothing once the buffers have grown; a resend maps the message
/// again.
#[derive(Debug, Default)]
pub struct Record {
    /// Header names, back to back.
    names: String,
    /// Header values (and the key, which is one of them), back to back.
    values: Vec<u8>,
    /// Each header's name in `names` and value in `values` (`None`: a null value).
    headers: Vec<(Range<usize>, Option<Range<usize>>)>,
    /// `x-amqp-header-types` being built.
    types: Vec<u8>,
    /// The key in `values`.
    key: Option<Range<usize>>,
    /// Milliseconds since the epoch; `None`: librdkafka stamps the send time.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// The record `message` is produced as. `key_header` names the header whose value is
    /// the key.
    pub fn of(message: &Message, key_header: Option<&str>) -> Record {
        let mut record = Record::default();
        record.fill(message, key_header);
        record
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key.clone().map(|r| &self.values[r])
    }

    /// Header names and values in the order they are produced.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> + '_ {
        self.headers.iter().map(|(name, value)| {
            (
                &self.names[name.clone()],
                value.clone().map(|v| &self.values[v]),
            )
        })
    }

    pub fn owned_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in self.headers() {
            h = h.insert(Header { key, value });
        }
        h
    }

    /// Maps `message` into this record, replacing what it held.
    pub fn fill(&mut self, message: &Message, key_header: Option<&str>) {
        self.names.clear();
        self.values.clear();
        self.headers.clear();
        self.types.clear();
        self.key = None;
        let p = message.properties();
        if let Some(table) = p.headers() {
            for (name, value) in table.inner() {
                let name = name.as_str();
                let at = self.values.len();
                let Some((present, kind)) = write_header_value(value, &mut self.values) else {
                    tracing::debug!(
                        header = name,
                        "kafka bridge: nested header value dropped (tables and arrays are not mapped)"
                    );
                    continue;
                };
                let value = present.then_some(at..self.values.len());
                if key_header == Some(name) {
                    self.key = value.clone();
                }
                if let Some(kind) = kind {
                    // A name with the list's separators cannot be listed: it comes back a string.
                    if !name.contains(['=', ';']) {
                        if !self.types.is_empty() {
                            self.types.push(b';');
                        }
                        self.types.extend_from_slice(name.as_bytes());
                        self.types.push(b'=');
                        self.types.extend_from_slice(kind.as_bytes());
                    }
                }
                self.push_name(name);
                self.headers
                    .push((self.names.len() - name.len()..self.names.len(), value));
            }
        }
        let routing_key = self.property("routing-key", message.routing_key().as_bytes());
        if self.key.is_none() && !message.routing_key().is_empty() {
            self.key = Some(routing_key);
        }
        self.property("exchange", message.exchange().as_bytes());
        self.text_property("content-type", s(p.content_type()));
        self.text_property("content-encoding", s(p.content_encoding()));
        self.number_property("delivery-mode", p.delivery_mode().map(u64::from));
        self.number_property("priority", p.priority().map(u64::from));
        self.text_property("correlation-id", s(p.correlation_id()));
        self.text_property("reply-to", s(p.reply_to()));
        self.text_property("expiration", s(p.expiration()));
        self.text_property("message-id", s(p.message_id()));
        self.number_property("timestamp", *p.timestamp());
        self.text_property("type", s(p.kind()));
        self.text_property("user-id", s(p.user_id()));
        self.text_property("app-id", s(p.app_id()));
        self.text_property("cluster-id", s(p.cluster_id()));
        if !self.types.is_empty() {
            let at = self.values.len();
            self.values.extend_from_slice(&self.types);
            self.push_name(TYPES_HEADER);
            let name = self.names.len() - TYPES_HEADER.len()..self.names.len();
            self.headers.push((name, Some(at..self.values.len())));
        }
        self.timestamp_ms = p
            .timestamp()
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| s.checked_mul(1000));
    }

    fn push_name(&mut self, name: &str) {
        self.names.push_str(name);
    }

    /// Adds the header `x-amqp-<property>` with `value`; returns where the value is.
    fn property(&mut self, property: &str, value: &[u8]) -> Range<usize> {
        let name_at = self.names.len();
        self.names.push_str(PROPERTY_PREFIX);
        self.names.push_str(property);
        let at = self.values.len();
        self.values.extend_from_slice(value);
        let value = at..self.values.len();
        self.headers
            .push((name_at..self.names.len(), Some(value.clone())));
        value
    }

    fn text_property(&mut self, property: &str, value: Option<&[u8]>) {
        if let Some(v) = value {
            self.property(property, v);
        }
    }

    fn number_property(&mut self, property: &str, value: Option<u64>) {
        if let Some(v) = value {
            let mut digits = [0u8; 20];
            self.property(property, decimal(v, &mut digits));
        }
    }
}

fn s(v: &Option<ShortString>) -> Option<&[u8]> {
    v.as_ref().map(|v| v.as_str().as_bytes())
}

/// `v` in decimal, written at the end of `buf`.
fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[at..];
        }
    }
}

/// The record `message` is produced as. `key_header` names the header whose value is the key.
pub fn to_record(message: &Message, key_header: Option<&str>) -> Record {
    Record::of(message, key_header)
}

/// Appends a header value's bytes to `out`. Returns whether the value is present (`false`: a
/// null value) and its type name when it is not a string; `None` for tables and arrays.
fn write_header_value(
    value: &AMQPValue,
    out: &mut Vec<u8>,
) -> Option<(bool, Option<&'static str>)> {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let mut text = |v: &dyn std::fmt::Display, kind: &'static str| {
        let _ = write!(out, "{v}");
        Some((true, Some(kind)))
    };
    match value {
        AMQPValue::Boolean(v) => text(v, "bool"),
        AMQPValue::ShortShortInt(v) => text(v, "i8"),
        AMQPValue::ShortShortUInt(v) => text(v, "u8"),
        AMQPValue::ShortInt(v) => text(v, "i16"),
        AMQPValue::ShortUInt(v) => text(v, "u16"),
        AMQPValue::LongInt(v) => text(v, "i32"),
        AMQPValue::LongUInt(v) => text(v, "u32"),
        AMQPValue::LongLongInt(v) => text(v, "i64"),
        AMQPValue::Float(v) => text(v, "f32"),
        AMQPValue::Double(v) => text(v, "f64"),
        AMQPValue::Timestamp(v) => text(v, "timestamp"),
        // A decimal comes back as its text: the scale is not kept.
        AMQPValue::DecimalValue(d) => {
            let scaled = d.value as f64 / 10f64.powi(i32::from(d.scale));
            let _ = write!(out, "{scaled}");
            Some((true, None))
        }
        AMQPValue::ShortString(v) => {
            out.extend_from_slice(v.as_str().as_bytes());
            Some((true, None))
        }
        AMQPValue::LongString(v) => {
            out.extend_from_slice(v.as_bytes());
            Some((true, None))
        }
        AMQPValue::ByteArray(v) => {
            out.extend_from_slice(v.as_slice());
            Some((true, Some("bytes")))
        }
        AMQPValue::Void => Some((false, Some("void"))),
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
        let headers: Vec<(&str, Option<&[u8]>)> = record.headers().collect();
        let back = from_parts(
            "t",
            2,
            41,
            record.key(),
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
        assert_eq!(record.key(), Some(&b"a.b"[..]));
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
            to_record(&with_header, Some("customer")).key(),
            Some(&b"c-9"[..])
        );
        assert_eq!(
            to_record(&without, Some("customer")).key(),
            Some(&b"rk"[..])
        );
        assert_eq!(to_record(&with_header, None).key(), Some(&b"rk"[..]));
        assert_eq!(to_record(&empty_rk, None).key(), None);
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
        assert!(!to_record(&nested, None).headers().any(|(k, _)| k == "t"));
    }
}
