//! How a Warren [`Message`] becomes an SQS message and back.
//!
//! An SQS message is a text body plus at most 10 message attributes (name, `String`/`Number`/
//! `Binary` data type, non-empty value). Warren writes:
//!
//! - **Body**: the AMQP body as it is when it is text SQS accepts (UTF-8 with only the XML
//!   characters SQS allows: tab, newline, carriage return, U+0020–U+D7FF, U+E000–U+FFFD,
//!   U+10000–U+10FFFF); otherwise its standard base64, flagged in `warren.amqp`.
//! - **`warren.amqp`** (`Binary`, always present, one attribute): version byte `1`, a flags byte
//!   (bit 0: the body is base64), the routing key (one length byte, then the key), then the
//!   message's AMQP 0-9-1 property block exactly as the publisher encoded it: every property
//!   and every header with its type, nested tables included. Warren reads the message back from
//!   this attribute, so a Warren → SQS → Warren trip keeps everything.
//! - **Headers as native attributes**, for consumers that are not Warren: up to 9 headers (the
//!   10th attribute is `warren.amqp`), in name order, each as the attribute of the same name:
//!   strings → `String`, integers, floats and decimals → `Number`, timestamps →
//!   `Number.timestamp`, booleans → `String.boolean` (`true`/`false`), byte arrays → `Binary`.
//!   A header is left out of the native attributes (it is still in `warren.amqp`) when its name
//!   is not a valid attribute name (letters, digits, `_`, `-`, `.`; no `AWS.`/`Amazon.` prefix;
//!   no leading, trailing or doubled `.`; at most 256 characters), when its value is empty, a
//!   table, an array, void, a non-finite float or text SQS does not accept, or when 9 headers
//!   are already native. **Nothing is dropped**: every header travels in `warren.amqp`.
//!
//! From SQS, a message with a valid `warren.amqp` is rebuilt from it (native attributes are
//! then ignored). Any other message (another producer's) becomes: body = the SQS body's UTF-8
//! bytes, routing key = the source queue's name, `message-id` = the SQS MessageId, and one header
//! per message attribute: `String*` → long string, `Number*` → long-long-int when the value is
//! an integer that fits, else double, else long string, `Binary*` → byte array.

use std::collections::HashMap;

use amq_protocol::protocol::basic::{parse_properties, AMQPProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use bytes::Bytes;
use warren_backends::Message;

/// The attribute that carries the routing key and the AMQP property block.
pub const WARREN_ATTRIBUTE: &str = "warren.amqp";
/// SQS's limit on message attributes.
pub const MAX_ATTRIBUTES: usize = 10;
const VERSION: u8 = 1;
const BODY_BASE64: u8 = 1;

/// A message ready for SendMessage(Batch).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub body: String,
    pub attributes: HashMap<String, MessageAttributeValue>,
    /// What SQS counts against the message size limit: body plus every attribute's name, data
    /// type and value.
    pub size: usize,
}

/// Whether SQS accepts `c` in a message body or string attribute.
fn sqs_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn sqs_text(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.chars().all(sqs_char).then_some(text)
}

/// A header name that SQS accepts as an attribute name (and that is not Warren's own).
pub fn valid_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && name != WARREN_ATTRIBUTE
}

fn attribute(data_type: &str, value: Native) -> Option<MessageAttributeValue> {
    let builder = MessageAttributeValue::builder().data_type(data_type);
    match value {
        Native::Text(text) => builder.string_value(text),
        Native::Binary(bytes) => builder.binary_value(Blob::new(bytes)),
    }
    .build()
    .ok()
}

enum Native {
    Text(String),
    Binary(Vec<u8>),
}

/// A header value as a native attribute `(data type, value)`, or `None` when it has none.
fn native(value: &AMQPValue) -> Option<(&'static str, Native)> {
    let number = |text: String| Some(("Number", Native::Text(text)));
    let text = |t: &str| {
        (!t.is_empty() && t.chars().all(sqs_char)).then(|| ("String", Native::Text(t.to_string())))
    };
    match value {
        AMQPValue::Boolean(v) => Some(("String.boolean", Native::Text(v.to_string()))),
        AMQPValue::ShortShortInt(v) => number(v.to_string()),
        AMQPValue::ShortShortUInt(v) => number(v.to_string()),
        AMQPValue::ShortInt(v) => number(v.to_string()),
        AMQPValue::ShortUInt(v) => number(v.to_string()),
        AMQPValue::LongInt(v) => number(v.to_string()),
        AMQPValue::LongUInt(v) => number(v.to_string()),
        AMQPValue::LongLongInt(v) => number(v.to_string()),
        AMQPValue::Float(v) if v.is_finite() => number(v.to_string()),
        AMQPValue::Double(v) if v.is_finite() => number(v.to_string()),
        AMQPValue::DecimalValue(d) => {
            let digits = d.value.to_string();
            let scale = usize::from(d.scale);
            let text = if scale == 0 {
                digits
            } else {
                let padded = format!("{digits:0>width$}", width = scale + 1);
                let (int, frac) = padded.split_at(padded.len() - scale);
                format!("{int}.{frac}")
            };
            number(text)
        }
        AMQPValue::Timestamp(v) => Some(("Number.timestamp", Native::Text(v.to_string()))),
        AMQPValue::ShortString(v) => text(v.as_str()),
        AMQPValue::LongString(v) => text(std::str::from_utf8(v.as_bytes()).ok()?),
        AMQPValue::ByteArray(v) if !v.as_slice().is_empty() => {
            Some(("Binary", Native::Binary(v.as_slice().to_vec())))
        }
        _ => None,
    }
}

/// The SQS message `message` is sent as (see the module docs). Whether it fits SQS's size
/// limit is the caller's check, on `size`.
pub fn to_sqs(message: &Message) -> Outgoing {
    let (body, flags) = match sqs_text(message.body()) {
        Some(text) => (text.to_string(), 0),
        None => (
            base64::engine::general_purpose::STANDARD.encode(message.body()),
            BODY_BASE64,
        ),
    };
    let key = message.routing_key().as_bytes();
    // AMQP routing keys are short strings (≤ 255 bytes); clamp in case.
    let key = &key[..key.len().min(255)];
    let raw = message.raw_properties();
    let mut blob = Vec::with_capacity(3 + key.len() + raw.len());
    blob.push(VERSION);
    blob.push(flags);
    blob.push(key.len() as u8);
    blob.extend_from_slice(key);
    blob.extend_from_slice(raw);

    let mut attributes = HashMap::new();
    let mut size = body.len();
    size += WARREN_ATTRIBUTE.len() + "Binary".len() + blob.len();
    if let Some(a) = attribute("Binary", Native::Binary(blob)) {
        attributes.insert(WARREN_ATTRIBUTE.to_string(), a);
    }
    if let Some(headers) = message.headers() {
        for (name, value) in headers.inner() {
            if attributes.len() >= MAX_ATTRIBUTES {
                break;
            }
            let name = name.as_str();
            if !valid_attribute_name(name) {
                continue;
            }
            let Some((data_type, value)) = native(value) else {
                continue;
            };
            let value_len = match &value {
                Native::Text(t) => t.len(),
                Native::Binary(b) => b.len(),
            };
            if let Some(a) = attribute(data_type, value) {
                size += name.len() + data_type.len() + value_len;
                attributes.insert(name.to_string(), a);
            }
        }
    }
    Outgoing {
        body,
        attributes,
        size,
    }
}

/// The message an SQS message of queue `queue` stands for (see the module docs).
pub fn from_sqs(
    queue: &str,
    message_id: Option<&str>,
    body: &str,
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
) -> Message {
    if let Some(m) = attributes
        .and_then(|a| a.get(WARREN_ATTRIBUTE))
        .and_then(|a| a.binary_value())
        .and_then(|blob| from_blob(blob.as_ref(), body))
    {
        return m;
    }
    let mut headers = FieldTable::default();
    if let Some(attributes) = attributes {
        for (name, value) in attributes {
            let Ok(key) = ShortString::try_new(name.clone()) else {
                continue;
            };
            if let Some(v) = foreign_value(value) {
                headers.insert(key, v);
            }
        }
    }
    let mut p = AMQPProperties::default();
    if let Some(id) = message_id.and_then(|id| ShortString::try_new(id.to_string()).ok()) {
        p = p.with_message_id(id);
    }
    if !headers.inner().is_empty() {
        p = p.with_headers(headers);
    }
    let routing_key = ShortString::try_new(queue.to_string()).unwrap_or_default();
    Message::new(
        ShortString::from(""),
        routing_key,
        p,
        Bytes::copy_from_slice(body.as_bytes()),
    )
}

/// A message from Warren's own attribute; `None` when it is not one Warren wrote.
fn from_blob(blob: &[u8], body: &str) -> Option<Message> {
    let (&version, rest) = blob.split_first()?;
    if version != VERSION {
        return None;
    }
    let (&flags, rest) = rest.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let (key, raw) = rest.split_at(len);
    let key = std::str::from_utf8(key).ok()?;
    let properties = if raw.is_empty() {
        AMQPProperties::default()
    } else {
        parse_properties(raw).ok()?.1
    };
    let body = if flags & BODY_BASE64 != 0 {
        match base64::engine::general_purpose::STANDARD.decode(body.trim()) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(error = %e, "sqs bridge: a body flagged base64 does not decode; delivered as it is");
                Bytes::copy_from_slice(body.as_bytes())
            }
        }
    } else {
        Bytes::copy_from_slice(body.as_bytes())
    };
    Some(Message::new(
        ShortString::from(""),
        ShortString::try_new(key.to_string()).ok()?,
        properties,
        body,
    ))
}

/// Another producer's attribute as a header value.
fn foreign_value(value: &MessageAttributeValue) -> Option<AMQPValue> {
    let kind = value.data_type();
    if kind.starts_with("Binary") {
        let b = value.binary_value()?;
        return Some(AMQPValue::ByteArray(b.as_ref().to_vec().into()));
    }
    let text = value.string_value()?;
    if kind.starts_with("Number") {
        if let Ok(n) = text.trim().parse::<i64>() {
            return Some(AMQPValue::LongLongInt(n));
        }
        if let Ok(f) = text.trim().parse::<f64>() {
            return Some(AMQPValue::Double(f));
        }
    }
    Some(AMQPValue::LongString(LongString::from(
        text.as_bytes().to_vec(),
    )))
}

/// Text SQS accepts as a MessageGroupId or MessageDeduplicationId: 1–128 characters, letters,
/// digits and punctuation.
pub fn valid_fifo_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

/// A header's value as text, for the FIFO group and deduplication ids.
pub fn header_text(message: &Message, name: &str) -> Option<String> {
    let headers = message.headers()?;
    let value = headers.inner().get(name)?;
    match value {
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortShortInt(v) => Some(v.to_string()),
        AMQPValue::ShortShortUInt(v) => Some(v.to_string()),
        AMQPValue::ShortInt(v) => Some(v.to_string()),
        AMQPValue::ShortUInt(v) => Some(v.to_string()),
        AMQPValue::LongInt(v) => Some(v.to_string()),
        AMQPValue::LongUInt(v) => Some(v.to_string()),
        AMQPValue::LongLongInt(v) => Some(v.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::DecimalValue;

    fn message(headers: Option<FieldTable>, body: &'static [u8]) -> Message {
        let mut p = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_delivery_mode(2)
            .with_timestamp(1_700_000_000);
        if let Some(h) = headers {
            p = p.with_headers(h);
        }
        Message::new("x".into(), "a.b".into(), p, Bytes::from_static(body))
    }

    fn back(out: &Outgoing) -> Message {
        from_sqs("q", Some("sqs-id"), &out.body, Some(&out.attributes))
    }

    #[test]
    fn everything_round_trips_through_the_warren_attribute() {
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::LongLongInt(1));
        let mut h = FieldTable::default();
        h.insert("s".into(), AMQPValue::LongString("text".into()));
        h.insert("n".into(), AMQPValue::ShortInt(-7));
        h.insert("t".into(), AMQPValue::FieldTable(nested));
        h.insert("empty".into(), AMQPValue::LongString("".into()));
        h.insert("bad name!".into(), AMQPValue::Boolean(true));
        let m = message(Some(h), b"{\"a\":1}");
        let out = to_sqs(&m);
        assert_eq!(out.body, "{\"a\":1}");
        // Native: warren.amqp, s, n (t is a table, empty is empty, `bad name!` is not a name).
        let mut names: Vec<&String> = out.attributes.keys().collect();
        names.sort();
        assert_eq!(names, ["n", "s", "warren.amqp"]);
        assert_eq!(out.attributes["n"].data_type(), "Number");
        assert_eq!(out.attributes["n"].string_value(), Some("-7"));
        let b = back(&out);
        assert_eq!(b.routing_key(), "a.b");
        assert_eq!(b.body(), m.body());
        assert_eq!(b.properties(), m.properties());
    }

    #[test]
    fn binary_bodies_travel_as_base64() {
        let m = message(None, b"\x00\xff\x01bin");
        let out = to_sqs(&m);
        assert_eq!(out.body, "AP8BYmlu");
        assert_eq!(back(&out).body(), m.body());
        // A control character is not allowed either.
        let m = message(None, b"a\x07b");
        assert_ne!(to_sqs(&m).body, "a\x07b");
        assert_eq!(back(&to_sqs(&m)).body(), m.body());
    }

    #[test]
    fn past_ten_attributes_headers_stay_in_the_warren_attribute() {
        let mut h = FieldTable::default();
        for i in 0..15 {
            h.insert(format!("h{i:02}").into(), AMQPValue::LongInt(i));
        }
        let m = message(Some(h), b"x");
        let out = to_sqs(&m);
        assert_eq!(out.attributes.len(), MAX_ATTRIBUTES);
        assert!(out.attributes.contains_key("h00"));
        assert!(out.attributes.contains_key("h08"));
        assert!(!out.attributes.contains_key("h09"));
        let b = back(&out);
        assert_eq!(b.headers().unwrap().inner().len(), 15);
        assert_eq!(b.properties(), m.properties());
    }

    #[test]
    fn native_types() {
        let mut h = FieldTable::default();
        h.insert("b".into(), AMQPValue::Boolean(false));
        h.insert(
            "d".into(),
            AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
        );
        h.insert("ts".into(), AMQPValue::Timestamp(42));
        h.insert("bytes".into(), AMQPValue::ByteArray(vec![0u8, 1].into()));
        h.insert("f".into(), AMQPValue::Double(f64::NAN));
        let out = to_sqs(&message(Some(h), b""));
        let a = &out.attributes;
        assert_eq!(a["b"].data_type(), "String.boolean");
        assert_eq!(a["d"].string_value(), Some("0.005"));
        assert_eq!(a["ts"].data_type(), "Number.timestamp");
        assert_eq!(a["bytes"].binary_value().unwrap().as_ref(), &[0u8, 1]);
        assert!(!a.contains_key("f"));
    }

    #[test]
    fn another_producers_message() {
        let mut attrs = HashMap::new();
        let a = |t: &str, v: &str| {
            MessageAttributeValue::builder()
                .data_type(t)
                .string_value(v)
                .build()
                .unwrap()
        };
        attrs.insert("tenant".to_string(), a("String", "acme"));
        attrs.insert("count".to_string(), a("Number", "12"));
        attrs.insert("ratio".to_string(), a("Number.float", "0.5"));
        let m = from_sqs("orders", Some("abc"), "hello", Some(&attrs));
        assert_eq!(m.routing_key(), "orders");
        assert_eq!(m.body().to_vec(), b"hello".to_vec());
        let p = m.properties();
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "abc");
        let headers = m.headers().unwrap();
        let h = headers.inner();
        assert_eq!(h.get("tenant"), Some(&AMQPValue::LongString("acme".into())));
        assert_eq!(h.get("count"), Some(&AMQPValue::LongLongInt(12)));
        assert_eq!(h.get("ratio"), Some(&AMQPValue::Double(0.5)));
    }

    #[test]
    fn attribute_names_and_fifo_ids() {
        assert!(valid_attribute_name("x-tenant.id_2"));
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "AWS.x",
            "amazon.y",
            "a b",
            "warren.amqp",
        ] {
            assert!(!valid_attribute_name(bad), "{bad}");
        }
        assert!(valid_fifo_id("order-1:2"));
        assert!(!valid_fifo_id("with space"));
        assert!(!valid_fifo_id(&"x".repeat(129)));
    }
}
