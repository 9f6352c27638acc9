//! Topics and properties between Warren [`Message`]s and MQTT 5 PUBLISH packets.
//!
//! Topics: `<topic_prefix><destination>/<routing key with '.' as '/'>` (an empty routing key:
//! `<topic_prefix><destination>`). A queue mapping with source `s` subscribes to
//! `<topic_prefix>s/#`, and a message's routing key is its topic below `<topic_prefix>s/`
//! with `/` as `.`. Patterns convert `*` ↔ `+` and `#` ↔ `#` ([`pattern_to_filter`]).
//!
//! | AMQP 0-9-1                  | MQTT 5 (publish)                      | back to AMQP (subscribe)          |
//! |-----------------------------|---------------------------------------|-----------------------------------|
//! | body                        | payload                               | body                              |
//! | `content-type`              | content type                          | `content-type`                    |
//! | `correlation-id`            | correlation data (its bytes)          | `correlation-id` (UTF-8, ≤ 255 bytes; else dropped) |
//! | `reply-to`                  | response topic (as is)                | `reply-to`                        |
//! | `expiration` (ms)           | message expiry interval (s, rounded up) | `expiration` = interval × 1000  |
//! | headers                     | user properties (`name`, value as text; nested tables/arrays dropped); header `x-mqtt-retain` (true/1/"true") sets the RETAIN flag instead | user properties → long-string headers |
//! | `message-id`, `type`, `app-id`, `user-id`, `content-encoding`, `timestamp`, `priority`, `delivery-mode` | user property `x-amqp-<name>` | the property |
//! | —                           | RETAIN flag                           | header `x-mqtt-retain = "true"` when set |
//!
//! MQTT 3.1.1 has no properties: only the topic, the payload and RETAIN travel (RETAIN still
//! from header `x-mqtt-retain`, and back as that header). Every other property and header is
//! dropped, unless the backend's `envelope` is on: then the payload is Warren's envelope
//! ([`wrap`], [`unwrap`]), which carries the AMQP property block (headers included, with their
//! types) in front of the body.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;
use warren_backends::Message;

pub const RETAIN_HEADER: &str = "x-mqtt-retain";

/// The topic a message to `destination` with `routing_key` is published on.
pub fn topic(prefix: &str, destination: &str, routing_key: &str) -> String {
    let mut t = format!("{prefix}{destination}");
    if !routing_key.is_empty() {
        t.push('/');
        t.push_str(&routing_key.replace('.', "/"));
    }
    t
}

/// An AMQP topic pattern as an MQTT topic filter (`.`→`/`, `*`→`+`, `#`→`#`).
pub fn pattern_to_filter(pattern: &str) -> String {
    pattern
        .split('.')
        .map(|w| if w == "*" { "+" } else { w })
        .collect::<Vec<_>>()
        .join("/")
}

/// The filter a queue mapping with `source` subscribes to.
pub fn source_filter(prefix: &str, source: &str) -> String {
    format!("{prefix}{source}/#")
}

/// The routing key of a message received on `topic` for `source`; `None` when the topic is
/// not under the source.
pub fn routing_key(prefix: &str, source: &str, topic: &str) -> Option<String> {
    let root = format!("{prefix}{source}");
    let rest = topic.strip_prefix(&root)?;
    if rest.is_empty() {
        return Some(String::new());
    }
    Some(rest.strip_prefix('/')?.replace('/', "."))
}

/// What an MQTT 5 publish carries besides topic and payload.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Props {
    pub retain: bool,
    pub content_type: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub response_topic: Option<String>,
    pub message_expiry_interval: Option<u32>,
    pub user_properties: Vec<(String, String)>,
}

fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::DecimalValue(d) => (d.value as f64 / 10f64.powi(i32::from(d.scale))).to_string(),
        AMQPValue::ShortString(v) => v.as_str().to_string(),
        AMQPValue::LongString(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::ByteArray(v) => String::from_utf8_lossy(v.as_slice()).into_owned(),
        AMQPValue::Void => String::new(),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => return None,
    })
}

/// Whether a message asks for the RETAIN flag: header `x-mqtt-retain` `true`/`1`.
pub fn retain(message: &Message) -> bool {
    message.headers().is_some_and(|h| {
        h.inner()
            .get(RETAIN_HEADER)
            .is_some_and(|v| matches!(header_text(v).as_deref(), Some("true" | "1")))
    })
}

/// The first bytes of an enveloped payload: a marker no text payload starts with, and the
/// envelope's version.
pub const ENVELOPE_MAGIC: &[u8; 8] = b"\0WARREN\x01";

/// Warren's MQTT 3.1.1 envelope around `message`: [`ENVELOPE_MAGIC`], the length of the
/// property block as a 4-byte big-endian integer, the AMQP 0-9-1 basic property block as in a
/// content header (flags, then values; headers keep their types), then the body.
pub fn wrap(message: &Message) -> Bytes {
    let block = message.raw_properties();
    let body = message.body();
    let mut out = Vec::with_capacity(ENVELOPE_MAGIC.len() + 4 + block.len() + body.len());
    out.extend_from_slice(ENVELOPE_MAGIC);
    out.extend_from_slice(&(block.len() as u32).to_be_bytes());
    out.extend_from_slice(block);
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The properties and body of an enveloped payload; `None` when `payload` is not one (another
/// producer's message: its payload is the body as it is).
pub fn unwrap(payload: &Bytes) -> Option<(AMQPProperties, Bytes)> {
    let rest = payload.strip_prefix(&ENVELOPE_MAGIC[..])?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let block = rest.get(4..4usize.checked_add(len)?)?;
    let (left, properties) = amq_protocol::protocol::basic::parse_properties(block).ok()?;
    if !left.is_empty() {
        return None;
    }
    let start = ENVELOPE_MAGIC.len() + 4 + len;
    Some((properties, payload.slice(start..)))
}

/// The message an MQTT 3.1.1 PUBLISH stands for: with `envelope`, an enveloped payload gives
/// back every property; otherwise (or for a payload that is no envelope) the payload is the
/// body and there are no properties. RETAIN sets header `x-mqtt-retain = "true"` either way.
pub fn from_mqtt311(routing_key: &str, payload: Bytes, retain: bool, envelope: bool) -> Message {
    let plain = Props {
        retain,
        ..Props::default()
    };
    if !envelope {
        return from_mqtt(routing_key, payload, &plain);
    }
    match unwrap(&payload) {
        Some((mut p, body)) => {
            if retain {
                let mut headers = p.headers().clone().unwrap_or_default();
                headers.insert(
                    RETAIN_HEADER.into(),
                    AMQPValue::LongString(LongString::from("true")),
                );
                p = p.with_headers(headers);
            }
            Message::new("".into(), routing_key.into(), p, body)
        }
        None => {
            tracing::debug!(
                routing_key,
                "mqtt bridge: payload is no Warren envelope; taken as the body, no properties"
            );
            from_mqtt(routing_key, payload, &plain)
        }
    }
}

pub fn to_mqtt(message: &Message) -> Props {
    let p = message.properties();
    let mut out = Props {
        content_type: p.content_type().as_ref().map(|v| v.as_str().to_string()),
        correlation_data: p
            .correlation_id()
            .as_ref()
            .map(|v| Bytes::copy_from_slice(v.as_str().as_bytes())),
        response_topic: p.reply_to().as_ref().map(|v| v.as_str().to_string()),
        message_expiry_interval: message
            .expiration_ms()
            .ok()
            .flatten()
            .map(|ms| ms.div_ceil(1000).min(u64::from(u32::MAX)) as u32),
        ..Props::default()
    };
    if let Some(h) = p.headers() {
        for (name, value) in h.inner() {
            if name.as_str() == RETAIN_HEADER {
                out.retain = matches!(header_text(value).as_deref(), Some("true" | "1"));
                continue;
            }
            if let Some(text) = header_text(value) {
                out.user_properties.push((name.as_str().to_string(), text));
            }
        }
    }
    let mut amqp = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            out.user_properties.push((format!("x-amqp-{name}"), v));
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|v| v.as_str().to_string());
    amqp("message-id", s(p.message_id()));
    amqp("type", s(p.kind()));
    amqp("app-id", s(p.app_id()));
    amqp("user-id", s(p.user_id()));
    amqp("content-encoding", s(p.content_encoding()));
    amqp("timestamp", p.timestamp().map(|v| v.to_string()));
    amqp("priority", p.priority().map(|v| v.to_string()));
    amqp("delivery-mode", p.delivery_mode().map(|v| v.to_string()));
    out
}

pub fn from_mqtt(routing_key: &str, payload: Bytes, props: &Props) -> Message {
    let short = |v: &str| ShortString::try_new(v.to_string()).ok();
    let mut p = AMQPProperties::default();
    if let Some(v) = props.content_type.as_deref().and_then(short) {
        p = p.with_content_type(v);
    }
    if let Some(v) = props
        .correlation_data
        .as_ref()
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(short)
    {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = props.response_topic.as_deref().and_then(short) {
        p = p.with_reply_to(v);
    }
    if let Some(secs) = props.message_expiry_interval {
        p = p.with_expiration(ShortString::from((u64::from(secs) * 1000).to_string()));
    }
    let mut headers = FieldTable::default();
    for (name, value) in &props.user_properties {
        let Some(prop) = name.strip_prefix("x-amqp-") else {
            if let Some(k) = short(name) {
                headers.insert(k, AMQPValue::LongString(LongString::from(value.clone())));
            }
            continue;
        };
        match prop {
            "message-id" => p = p.clone().with_message_id_opt(short(value)),
            "type" => p = p.clone().with_type_opt(short(value)),
            "app-id" => p = p.clone().with_app_id_opt(short(value)),
            "user-id" => p = p.clone().with_user_id_opt(short(value)),
            "content-encoding" => p = p.clone().with_content_encoding_opt(short(value)),
            "timestamp" => {
                if let Ok(v) = value.parse() {
                    p = p.with_timestamp(v);
                }
            }
            "priority" => {
                if let Ok(v) = value.parse() {
                    p = p.with_priority(v);
                }
            }
            "delivery-mode" => {
                if let Ok(v) = value.parse() {
                    p = p.with_delivery_mode(v);
                }
            }
            _ => {
                if let Some(k) = short(name) {
                    headers.insert(k, AMQPValue::LongString(LongString::from(value.clone())));
                }
            }
        }
    }
    if props.retain {
        headers.insert(
            RETAIN_HEADER.into(),
            AMQPValue::LongString(LongString::from("true")),
        );
    }
    if !headers.inner().is_empty() {
        p = p.with_headers(headers);
    }
    Message::new("".into(), routing_key.into(), p, payload)
}

/// `with_x` for an optional value.
trait OptSet: Sized {
    fn with_message_id_opt(self, v: Option<ShortString>) -> Self;
    fn with_type_opt(self, v: Option<ShortString>) -> Self;
    fn with_app_id_opt(self, v: Option<ShortString>) -> Self;
    fn with_user_id_opt(self, v: Option<ShortString>) -> Self;
    fn with_content_encoding_opt(self, v: Option<ShortString>) -> Self;
}

impl OptSet for AMQPProperties {
    fn with_message_id_opt(self, v: Option<ShortString>) -> Self {
        match v {
            Some(v) => self.with_message_id(v),
            None => self,
        }
    }
    fn with_type_opt(self, v: Option<ShortString>) -> Self {
        match v {
            Some(v) => self.with_type(v),
            None => self,
        }
    }
    fn with_app_id_opt(self, v: Option<ShortString>) -> Self {
        match v {
            Some(v) => self.with_app_id(v),
            None => self,
        }
    }
    fn with_user_id_opt(self, v: Option<ShortString>) -> Self {
        match v {
            Some(v) => self.with_user_id(v),
            None => self,
        }
    }
    fn with_content_encoding_opt(self, v: Option<ShortString>) -> Self {
        match v {
            Some(v) => self.with_content_encoding(v),
            None => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_routing_keys() {
        assert_eq!(topic("", "demo", "a.b"), "demo/a/b");
        assert_eq!(topic("site/", "demo", ""), "site/demo");
        assert_eq!(source_filter("", "demo-in"), "demo-in/#");
        assert_eq!(
            routing_key("", "demo-in", "demo-in/x/y").as_deref(),
            Some("x.y")
        );
        assert_eq!(routing_key("", "demo-in", "demo-in").as_deref(), Some(""));
        assert_eq!(routing_key("", "demo-in", "demo-inx/y"), None);
        assert_eq!(pattern_to_filter("a.*.#"), "a/+/#");
    }

    #[test]
    fn properties_round_trip() {
        let mut h = FieldTable::default();
        h.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        h.insert(RETAIN_HEADER.into(), AMQPValue::Boolean(true));
        let p = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_correlation_id("c1".into())
            .with_reply_to("replies/x".into())
            .with_expiration("1500".into())
            .with_message_id("m1".into())
            .with_timestamp(7)
            .with_priority(3)
            .with_delivery_mode(2)
            .with_headers(h);
        let m = Message::new("x".into(), "a.b".into(), p, Bytes::from_static(b"hi"));
        let props = to_mqtt(&m);
        assert!(props.retain);
        assert_eq!(props.message_expiry_interval, Some(2));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c1"[..]));
        let back = from_mqtt("a.b", m.body_bytes(), &props);
        let bp = back.properties();
        assert_eq!(bp.content_type().as_ref().unwrap().as_str(), "text/plain");
        assert_eq!(bp.correlation_id().as_ref().unwrap().as_str(), "c1");
        assert_eq!(bp.reply_to().as_ref().unwrap().as_str(), "replies/x");
        assert_eq!(bp.expiration().as_ref().unwrap().as_str(), "2000");
        assert_eq!(bp.message_id().as_ref().unwrap().as_str(), "m1");
        assert_eq!(bp.timestamp(), &Some(7));
        assert_eq!(bp.priority(), &Some(3));
        assert_eq!(bp.delivery_mode(), &Some(2));
        let h = bp.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("tenant"), Some(&AMQPValue::LongString("acme".into())));
        assert_eq!(
            h.get(RETAIN_HEADER),
            Some(&AMQPValue::LongString("true".into()))
        );
    }

    #[test]
    fn envelope_round_trip() {
        let mut h = FieldTable::default();
        h.insert("n".into(), AMQPValue::LongLongInt(-7));
        h.insert("tenant".into(), AMQPValue::LongString("acme".into()));
        let p = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to("replies".into())
            .with_delivery_mode(2)
            .with_headers(h);
        let m = Message::new(
            "x".into(),
            "a.b".into(),
            p.clone(),
            Bytes::from_static(b"{}"),
        );
        let payload = wrap(&m);
        assert!(payload.starts_with(ENVELOPE_MAGIC));
        let back = from_mqtt311("a.b", payload.clone(), false, true);
        assert_eq!(back.properties(), p, "headers keep their types");
        assert_eq!(back.body(), b"{}");
        assert_eq!(back.routing_key(), "a.b");
        // Retained: the header is added.
        let back = from_mqtt311("a.b", payload.clone(), true, true);
        let headers = back.headers().unwrap();
        let headers = headers.inner();
        assert_eq!(headers.get("n"), Some(&AMQPValue::LongLongInt(-7)));
        assert_eq!(
            headers.get(RETAIN_HEADER),
            Some(&AMQPValue::LongString("true".into()))
        );
        // Without the envelope option the envelope is just bytes.
        let raw = from_mqtt311("a.b", payload.clone(), false, false);
        assert_eq!(raw.body(), &payload[..]);
        assert_eq!(raw.properties(), AMQPProperties::default());
        // Foreign and damaged payloads are bodies.
        for foreign in [
            &b"plain text"[..],
            &b"\0WARREN\x01"[..],
            &b"\0WARREN\x01\0\0\0\xff\0\0"[..],
            &payload[..ENVELOPE_MAGIC.len() + 6],
        ] {
            let payload = Bytes::copy_from_slice(foreign);
            let m = from_mqtt311("k", payload.clone(), false, true);
            assert_eq!(m.body(), &payload[..]);
            assert_eq!(m.properties(), AMQPProperties::default());
        }
        assert!(!retain(&m));
    }
}
