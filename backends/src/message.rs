//! The one message type every part of Warren passes around.
//!
//! A queued message is mostly overhead: a 16-byte body with a parsed `AMQPProperties` (296
//! bytes), two `String`s and a slice pinning the connection's read buffer cost over 600 bytes.
//! So a message is one reference-counted allocation holding a small fixed summary (what routing
//! and queues ask for on every message: TTL, priority, persistence), then the exchange name,
//! routing key, property block exactly as published and the body. Everything else is decoded
//! from the property block on demand, on the rarer paths that need it (dead-lettering, headers
//! exchanges, bridges).

use std::sync::Arc;

use amq_protocol::protocol::basic::{gen_properties, parse_properties, AMQPProperties};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;

/// Summary layout at the start of the packed buffer.
const EXPIRATION: usize = 0; // u64 LE milliseconds, NO_EXPIRATION when absent
const PRIORITY: usize = 8;
const FLAGS: usize = 9;
const EXCHANGE_LEN: usize = 10; // u8
const ROUTING_KEY_LEN: usize = 11; // u16 LE
const PROPERTIES_LEN: usize = 13; // u32 LE
const HEADER: usize = 17;

const NO_EXPIRATION: u64 = u64::MAX;
const PERSISTENT: u8 = 1;
const HAS_HEADERS: u8 = 2;
/// The `expiration` property is present but not a number; kept so `expiration_ms` can say so.
const BAD_EXPIRATION: u8 = 4;

/// What the packed header keeps from the properties.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    expiration: u64,
    priority: u8,
    flags: u8,
}

impl Summary {
    fn new(expiration: Option<&str>, persistent: bool, priority: u8, has_headers: bool) -> Summary {
        let (expiration, bad_expiration) = match expiration {
            None => (NO_EXPIRATION, false),
            Some(text) => match text.parse::<u64>() {
                Ok(ms) if ms != NO_EXPIRATION => (ms, false),
                _ => (NO_EXPIRATION, true),
            },
        };
        let mut flags = 0;
        if persistent {
            flags |= PERSISTENT;
        }
        if has_headers {
            flags |= HAS_HEADERS;
        }
        if bad_expiration {
            flags |= BAD_EXPIRATION;
        }
        Summary {
            expiration,
            priority,
            flags,
        }
    }

    fn of(properties: &AMQPProperties) -> Summary {
        Summary::new(
            properties.expiration().as_ref().map(|t| t.as_str()),
            properties.delivery_mode() == &Some(2),
            properties.priority().unwrap_or(0),
            properties.headers().is_some(),
        )
    }

    /// Reads the summary from an encoded basic property block without decoding it: the
    /// property flags, then the fields up to `expiration` in their fixed order (content-type,
    /// content-encoding, headers, delivery-mode, priority, correlation-id, reply-to,
    /// expiration). `None` when the block is not plainly well-formed up to there; the caller
    /// then decodes it fully.
    fn scan(raw: &[u8]) -> Option<Summary> {
        fn short_str<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
            let len = *p.first()? as usize;
            let text = p.get(1..1 + len)?;
            *p = &p[1 + len..];
            Some(text)
        }
        fn octet(p: &mut &[u8]) -> Option<u8> {
            let b = *p.first()?;
            *p = &p[1..];
            Some(b)
        }
        let flags = u16::from_be_bytes([*raw.first()?, *raw.get(1)?]);
        if flags & 1 != 0 {
            // A continuation of the flags: basic has no properties that need one.
            return None;
        }
        let has = |bit: u16| flags & (1 << bit) != 0;
        let mut p = &raw[2..];
        if has(15) {
            short_str(&mut p)?; // content-type
        }
        if has(14) {
            short_str(&mut p)?; // content-encoding
        }
        if has(13) {
            let len = u32::from_be_bytes(p.get(..4)?.try_into().ok()?) as usize;
            p = p.get(4 + len..)?; // headers
        }
        let delivery_mode = if has(12) { Some(octet(&mut p)?) } else { None };
        let priority = if has(11) { octet(&mut p)? } else { 0 };
        if has(10) {
            short_str(&mut p)?; // correlation-id
        }
        if has(9) {
            short_str(&mut p)?; // reply-to
        }
        let expiration = if has(8) {
            Some(std::str::from_utf8(short_str(&mut p)?).ok()?)
        } else {
            None
        };
        Some(Summary::new(
            expiration,
            delivery_mode == Some(2),
            priority,
            has(13),
        ))
    }
}

/// A published message. Cloning is a reference-count increment: a fanout to ten queues holds
/// one copy of the body.
#[derive(Clone)]
pub struct Message {
    packed: Arc<[u8]>,
}

impl Message {
    /// A message made inside Warren (dead-lettering, bridges): its property block is encoded here.
    pub fn new(
        exchange: ShortString,
        routing_key: ShortString,
        properties: AMQPProperties,
        body: Bytes,
    ) -> Message {
        let properties = without_short_strings(properties);
        let raw_properties = encode_properties(&properties);
        Message::from_parts(
            exchange.as_str(),
            routing_key.as_str(),
            &properties,
            &raw_properties,
            &body,
        )
    }

    /// A message from its parts: `raw_properties` must be the encoding of `properties` (the
    /// codec hands over both, so publishing never re-parses or re-encodes).
    pub fn from_parts(
        exchange: &str,
        routing_key: &str,
        properties: &AMQPProperties,
        raw_properties: &[u8],
        body: &[u8],
    ) -> Message {
        Message::pack(
            exchange,
            routing_key,
            Summary::of(properties),
            raw_properties,
            body,
        )
    }

    /// A message from an encoded property block alone (a log record): the summary is read
    /// straight from the block, so nothing but the message itself is allocated. A block that
    /// does not decode (a bug, never seen) gives an empty summary rather than losing the body.
    pub fn from_raw(
        exchange: &str,
        routing_key: &str,
        raw_properties: &[u8],
        body: &[u8],
    ) -> Message {
        let summary = Summary::scan(raw_properties).unwrap_or_else(|| {
            let properties = parse_properties(raw_properties)
                .map(|(_, p)| p)
                .unwrap_or_default();
            Summary::of(&properties)
        });
        Message::pack(exchange, routing_key, summary, raw_properties, body)
    }

    fn pack(
        exchange: &str,
        routing_key: &str,
        summary: Summary,
        raw_properties: &[u8],
        body: &[u8],
    ) -> Message {
        let exchange = truncated(exchange, u8::MAX as usize);
        let routing_key = truncated(routing_key, u16::MAX as usize);
        let len = HEADER + exchange.len() + routing_key.len() + raw_properties.len() + body.len();
        // One allocation, filled in place: collecting a sized iterator allocates exactly once.
        let mut packed: Arc<[u8]> = std::iter::repeat_n(0u8, len).collect();
        if let Some(buf) = Arc::get_mut(&mut packed) {
            buf[EXPIRATION..EXPIRATION + 8].copy_from_slice(&summary.expiration.to_le_bytes());
            buf[PRIORITY] = summary.priority;
            buf[FLAGS] = summary.flags;
            buf[EXCHANGE_LEN] = exchange.len() as u8;
            buf[ROUTING_KEY_LEN..ROUTING_KEY_LEN + 2]
                .copy_from_slice(&(routing_key.len() as u16).to_le_bytes());
            buf[PROPERTIES_LEN..PROPERTIES_LEN + 4]
                .copy_from_slice(&(raw_properties.len() as u32).to_le_bytes());
            let mut at = HEADER;
            for part in [
                exchange.as_bytes(),
                routing_key.as_bytes(),
                raw_properties,
                body,
            ] {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
        Message { packed }
    }

    fn u16_at(&self, at: usize) -> usize {
        u16::from_le_bytes([self.packed[at], self.packed[at + 1]]) as usize
    }

    fn u32_at(&self, at: usize) -> usize {
        let b = &self.packed[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    fn exchange_range(&self) -> std::ops::Range<usize> {
        HEADER..HEADER + self.packed[EXCHANGE_LEN] as usize
    }

    fn routing_key_range(&self) -> std::ops::Range<usize> {
        let start = self.exchange_range().end;
        start..start + self.u16_at(ROUTING_KEY_LEN)
    }

    fn properties_range(&self) -> std::ops::Range<usize> {
        let start = self.routing_key_range().end;
        start..start + self.u32_at(PROPERTIES_LEN)
    }

    fn body_start(&self) -> usize {
        self.properties_range().end
    }

    pub fn exchange(&self) -> &str {
        std::str::from_utf8(&self.packed[self.exchange_range()]).unwrap_or_default()
    }

    pub fn routing_key(&self) -> &str {
        std::str::from_utf8(&self.packed[self.routing_key_range()]).unwrap_or_default()
    }

    pub fn body(&self) -> &[u8] {
        &self.packed[self.body_start()..]
    }

    /// The body as a `Bytes` sharing this message's memory (for clients that take `Bytes`).
    pub fn body_bytes(&self) -> Bytes {
        let start = self.body_start();
        Bytes::from_owner(Tail {
            packed: self.packed.clone(),
            start,
        })
    }

    pub fn body_len(&self) -> usize {
        self.packed.len() - self.body_start()
    }

    /// The content-header property block as the publisher encoded it, re-sent verbatim.
    pub fn raw_properties(&self) -> &[u8] {
        &self.packed[self.properties_range()]
    }

    /// The basic properties, decoded from the property block.
    pub fn properties(&self) -> AMQPProperties {
        parse_properties(self.raw_properties())
            .map(|(_, p)| p)
            .unwrap_or_default()
    }

    pub fn headers(&self) -> Option<FieldTable> {
        if self.packed[FLAGS] & HAS_HEADERS == 0 {
            return None;
        }
        self.properties().headers().clone()
    }

    pub fn priority(&self) -> u8 {
        self.packed[PRIORITY]
    }

    /// The per-message TTL in milliseconds from the `expiration` property. `Err` carries the
    /// text when it is not a non-negative integer, which RabbitMQ refuses at publish.
    pub fn expiration_ms(&self) -> Result<Option<u64>, String> {
        if self.packed[FLAGS] & BAD_EXPIRATION != 0 {
            let text = self
                .properties()
                .expiration()
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_default();
            return Err(text);
        }
        let b = &self.packed[EXPIRATION..EXPIRATION + 8];
        let ms = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        Ok((ms != NO_EXPIRATION).then_some(ms))
    }

    /// Whether the publisher asked for the message to survive a restart (delivery-mode 2).
    pub fn is_persistent(&self) -> bool {
        self.packed[FLAGS] & PERSISTENT != 0
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("exchange", &self.exchange())
            .field("routing_key", &self.routing_key())
            .field("properties", &self.properties())
            .field("body_len", &self.body_len())
            .finish()
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.packed == other.packed
    }
}

/// Keeps a message alive for a `Bytes` view of its body.
struct Tail {
    packed: Arc<[u8]>,
    start: usize,
}

impl AsRef<[u8]> for Tail {
    fn as_ref(&self) -> &[u8] {
        &self.packed[self.start..]
    }
}

/// `s` cut to `max` bytes on a character boundary; AMQP short strings hold 255 bytes, so only
/// names from other protocols can be longer.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `properties` with every short-string header value (nested too) as a long string.
/// amq-protocol encodes a short-string field value with a type tag it cannot decode (RabbitMQ's
/// field types have no short string), so a message carrying one would lose all its properties
/// when they are next decoded. Long strings are what AMQP 0-9-1 clients send for text anyway.
fn without_short_strings(properties: AMQPProperties) -> AMQPProperties {
    fn has_short(v: &AMQPValue) -> bool {
        match v {
            AMQPValue::ShortString(_) => true,
            AMQPValue::FieldTable(t) => t.inner().values().any(has_short),
            AMQPValue::FieldArray(a) => a.as_slice().iter().any(has_short),
            _ => false,
        }
    }
    fn fix(v: AMQPValue) -> AMQPValue {
        match v {
            AMQPValue::ShortString(s) => AMQPValue::LongString(s.as_str().into()),
            AMQPValue::FieldTable(t) => AMQPValue::FieldTable(fix_table(t)),
            AMQPValue::FieldArray(a) => AMQPValue::FieldArray(
                a.as_slice()
                    .iter()
                    .cloned()
                    .map(fix)
                    .collect::<Vec<_>>()
                    .into(),
            ),
            other => other,
        }
    }
    fn fix_table(t: FieldTable) -> FieldTable {
        let mut out = FieldTable::default();
        for (k, v) in t.inner() {
            out.insert(k.clone(), fix(v.clone()));
        }
        out
    }
    match properties.headers() {
        Some(h) if h.inner().values().any(has_short) => {
            let fixed = fix_table(h.clone());
            properties.with_headers(fixed)
        }
        _ => properties,
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

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{FieldArray, LongString};

    #[test]
    fn parts_come_back_as_given() {
        let mut headers = FieldTable::default();
        headers.insert("h".into(), AMQPValue::LongString(LongString::from("v")));
        let props = AMQPProperties::default()
            .with_priority(7)
            .with_delivery_mode(2)
            .with_expiration("1500".into())
            .with_headers(headers.clone());
        let m = Message::new(
            "ex".into(),
            "a.b".into(),
            props.clone(),
            Bytes::from_static(b"hello"),
        );
        assert_eq!(m.exchange(), "ex");
        assert_eq!(m.routing_key(), "a.b");
        assert_eq!(m.properties(), props);
        assert_eq!(m.raw_properties(), &encode_properties(&props)[..]);
        assert_eq!(m.body(), b"hello");
        assert_eq!(&m.body_bytes()[..], b"hello");
        assert_eq!(m.body_len(), 5);
        assert_eq!(m.priority(), 7);
        assert!(m.is_persistent());
        assert_eq!(m.expiration_ms(), Ok(Some(1500)));
        assert_eq!(m.headers(), Some(headers));
    }

    #[test]
    fn empty_properties_and_body() {
        let m = Message::new(
            "".into(),
            "".into(),
            AMQPProperties::default(),
            Bytes::new(),
        );
        assert_eq!(m.exchange(), "");
        assert_eq!(m.routing_key(), "");
        assert_eq!(m.body_len(), 0);
        assert_eq!(m.priority(), 0);
        assert!(!m.is_persistent());
        assert_eq!(m.expiration_ms(), Ok(None));
        assert_eq!(m.headers(), None);
    }

    #[test]
    fn short_string_header_values_survive_as_long_strings() {
        let mut inner = FieldTable::default();
        inner.insert("s".into(), AMQPValue::ShortString("deep".into()));
        let mut headers = FieldTable::default();
        headers.insert("s".into(), AMQPValue::ShortString("top".into()));
        headers.insert("t".into(), AMQPValue::FieldTable(inner));
        let array: FieldArray = vec![AMQPValue::ShortString("item".into())].into();
        headers.insert("a".into(), AMQPValue::FieldArray(array));
        let props = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers);
        let m = Message::new("".into(), "q".into(), props, Bytes::new());
        let back = m.properties();
        assert_eq!(
            back.content_type().as_ref().map(|c| c.as_str()),
            Some("text/plain")
        );
        let h = back.headers().clone().unwrap();
        assert_eq!(
            h.inner().get("s"),
            Some(&AMQPValue::LongString("top".into()))
        );
        let Some(AMQPValue::FieldTable(t)) = h.inner().get("t") else {
            panic!("nested table lost: {h:?}");
        };
        assert_eq!(
            t.inner().get("s"),
            Some(&AMQPValue::LongString("deep".into()))
        );
        let Some(AMQPValue::FieldArray(a)) = h.inner().get("a") else {
            panic!("array lost: {h:?}");
        };
        assert_eq!(a.as_slice(), &[AMQPValue::LongString("item".into())]);
    }

    #[test]
    fn a_bad_expiration_is_reported_with_its_text() {
        let props = AMQPProperties::default().with_expiration("soon".into());
        let m = Message::new("".into(), "q".into(), props, Bytes::new());
        assert_eq!(m.expiration_ms(), Err("soon".to_string()));
    }

    #[test]
    fn long_routing_keys_from_other_protocols_are_kept_up_to_64k() {
        let key = "k".repeat(300);
        let m = Message::from_parts("", &key, &AMQPProperties::default(), &[0, 0], b"");
        assert_eq!(m.routing_key(), key);
    }

    #[test]
    fn the_summary_read_from_a_property_block_matches_the_decoded_one() {
        let mut headers = FieldTable::default();
        headers.insert("k".into(), AMQPValue::LongString(LongString::from("v")));
        let full = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_content_encoding("utf-8".into())
            .with_headers(headers.clone())
            .with_delivery_mode(2)
            .with_priority(4)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("250".into())
            .with_message_id("m".into());
        let cases = [
            AMQPProperties::default(),
            AMQPProperties::default().with_delivery_mode(2),
            AMQPProperties::default().with_delivery_mode(1),
            AMQPProperties::default().with_priority(255),
            AMQPProperties::default().with_headers(FieldTable::default()),
            AMQPProperties::default().with_headers(headers),
            AMQPProperties::default().with_expiration("0".into()),
            AMQPProperties::default().with_expiration("later".into()),
            AMQPProperties::default().with_expiration(u64::MAX.to_string().into()),
            AMQPProperties::default()
                .with_reply_to("r".into())
                .with_timestamp(5),
            full,
        ];
        for properties in cases {
            let raw = encode_properties(&properties);
            assert_eq!(
                Summary::scan(&raw),
                Some(Summary::of(&properties)),
                "{properties:?}"
            );
            let message = Message::from_raw("x", "k", &raw, b"body");
            assert_eq!(
                message,
                Message::from_parts("x", "k", &properties, &raw, b"body")
            );
        }
    }

    #[test]
    fn a_property_block_that_does_not_scan_falls_back_to_decoding() {
        // Cut inside the content type: neither reading gets anywhere; the body is kept.
        assert_eq!(Summary::scan(&[0x80, 0x00, 9, b'a']), None);
        let message = Message::from_raw("", "q", &[0x80, 0x00, 9, b'a'], b"body");
        assert_eq!(message.body(), b"body");
        assert!(!message.is_persistent());
        // A flags continuation bit: left to the full decoder.
        assert_eq!(Summary::scan(&[0x10, 0x01, 0x00, 0x00, 2]), None);
        assert_eq!(Summary::scan(&[]), None);
    }

    #[test]
    fn a_small_message_is_one_small_allocation() {
        assert_eq!(std::mem::size_of::<Message>(), 16);
    }
}
