//! Property mapping between Warren's AMQP 0-9-1 [`Message`] and an AMQP 1.0 message.
//!
//! | AMQP 0-9-1                  | AMQP 1.0                                                    |
//! |-----------------------------|-------------------------------------------------------------|
//! | body                        | one `data` section (received: data sections concatenated; an `amqp-value` binary/string as its bytes, other values and `amqp-sequence` as their AMQP encoding) |
//! | routing key                 | `properties.subject`                                        |
//! | `delivery-mode` 2           | `header.durable = true` (1 / absent: `false`)               |
//! | `priority`                  | `header.priority` (absent: 4, the AMQP 1.0 default)         |
//! | `expiration` (ms)           | `header.ttl` (ms)                                           |
//! | `message-id`                | `properties.message-id` (string; **set once if absent**)   |
//! | `user-id`                   | `properties.user-id` (binary)                               |
//! | `reply-to`                  | `properties.reply-to`                                       |
//! | `correlation-id`            | `properties.correlation-id` (string)                        |
//! | `content-type`              | `properties.content-type`                                   |
//! | `content-encoding`          | `properties.content-encoding`                               |
//! | `timestamp` (s)             | `properties.creation-time` (ms; back: ms / 1000)            |
//! | `type`                      | application-property `x-amqp091-type`                       |
//! | `app-id`                    | application-property `x-amqp091-app-id`                     |
//! | `cluster-id`                | application-property `x-amqp091-cluster-id`                 |
//! | header `x-opt-*`            | message-annotation of the same name (Service Bus: `x-opt-scheduled-enqueue-time`, `x-opt-partition-key`...) |
//! | header, simple value        | application-property of the same name, typed as below       |
//! | header, table/array/decimal | message-annotation `x-amqp091-header:<name>` (AMQP 1.0 allows only simple values in application-properties) |
//! | `redelivered` (received)    | `header.delivery-count` > 0; target `rabbitmq`: or `header.first-acquirer` false |
//!
//! Header value types: bool → boolean, i8 → byte, u8 → ubyte, i16 → short, u16 → ushort,
//! i32 → int, u32 → uint, i64 → long, f32 → float, f64 → double, timestamp (s) → timestamp (ms),
//! long string → string, short string → symbol, byte array → binary, void → null, field array →
//! list, field table → map (string keys), decimal → map `{symbol warren:decimal: [scale, value]}` (not a described type: RabbitMQ 3.10 closes the session on unknown descriptors).
//! Each comes back as the type it left with, except symbols, which come back as long strings:
//! a 0-9-1 field table has no tag for a short string (`s` is a short int), so no client ever
//! sends one. Received values Warren never sends map to the nearest 0-9-1 type (ulong → i64,
//! char/uuid/decimal32.. → their text).

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use bytes::Bytes;
use fe2o3_amqp_types::messaging::{
    annotations::OwnedKey, ApplicationProperties, Body, Data, Header, Message as AmqpMessage,
    MessageAnnotations, MessageId, Priority, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp};
use serde_amqp::Value;
use warren_backends::Message;
use warren_config::file::Amqp10Target;

pub(crate) const TYPE: &str = "x-amqp091-type";
pub(crate) const APP_ID: &str = "x-amqp091-app-id";
pub(crate) const CLUSTER_ID: &str = "x-amqp091-cluster-id";
pub(crate) const COMPLEX_HEADER: &str = "x-amqp091-header:";
const DECIMAL: &str = "warren:decimal";

/// Builds the AMQP 1.0 message for `message`, with `message_id` as its id.
pub fn to_amqp10(message: &Message, message_id: &str) -> AmqpMessage<Data> {
    let p = message.properties();
    let header = Header {
        durable: p.delivery_mode() == &Some(2),
        priority: Priority(p.priority().unwrap_or(4)),
        ttl: message
            .expiration_ms()
            .ok()
            .flatten()
            .map(|ms| ms.min(u32::MAX as u64) as u32),
        first_acquirer: false,
        delivery_count: 0,
    };
    let properties = Properties {
        message_id: Some(MessageId::String(message_id.to_string())),
        user_id: p
            .user_id()
            .as_ref()
            .map(|u| Binary::from(u.as_str().as_bytes().to_vec())),
        to: None,
        subject: (!message.routing_key().is_empty()).then(|| message.routing_key().to_string()),
        reply_to: p.reply_to().as_ref().map(|s| s.to_string()),
        correlation_id: p
            .correlation_id()
            .as_ref()
            .map(|s| MessageId::String(s.to_string())),
        content_type: p.content_type().as_ref().map(|s| Symbol::from(s.as_str())),
        content_encoding: p
            .content_encoding()
            .as_ref()
            .map(|s| Symbol::from(s.as_str())),
        absolute_expiry_time: None,
        creation_time: p
            .timestamp()
            .map(|s| Timestamp::from_milliseconds((s as i64).saturating_mul(1000))),
        group_id: None,
        group_sequence: None,
        reply_to_group_id: None,
    };
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    let mut annotations: OrderedMap<OwnedKey, Value> = OrderedMap::new();
    if let Some(t) = p.kind() {
        app.insert(TYPE.into(), SimpleValue::String(t.to_string()));
    }
    if let Some(a) = p.app_id() {
        app.insert(APP_ID.into(), SimpleValue::String(a.to_string()));
    }
    if let Some(c) = p.cluster_id() {
        app.insert(CLUSTER_ID.into(), SimpleValue::String(c.to_string()));
    }
    if let Some(headers) = p.headers() {
        for (name, value) in headers.inner() {
            let name = name.as_str();
            if name.starts_with("x-opt-") {
                annotations.insert(OwnedKey::Symbol(Symbol::from(name)), to_value(value));
            } else if let Some(simple) = to_simple(value) {
                app.insert(name.to_string(), simple);
            } else {
                annotations.insert(
                    OwnedKey::Symbol(Symbol::from(format!("{COMPLEX_HEADER}{name}"))),
                    to_value(value),
                );
            }
        }
    }
    AmqpMessage {
        header: Some(header),
        delivery_annotations: None,
        message_annotations: (!annotations.is_empty()).then_some(MessageAnnotations(annotations)),
        properties: Some(properties),
        application_properties: (!app.is_empty()).then_some(ApplicationProperties(app)),
        body: Data(Binary::from(message.body().to_vec())),
        footer: None,
    }
}

/// The body's bytes: the data sections concatenated; an amqp-value that is binary or a string
/// as its bytes; anything else as its AMQP 1.0 encoding.
pub fn body_bytes(body: &Body<Value>) -> Bytes {
    match body {
        Body::Data(batch) => {
            let mut out = Vec::new();
            for d in batch.iter() {
                out.extend_from_slice(&d.0);
            }
            Bytes::from(out)
        }
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => Bytes::from(b.to_vec()),
            Value::String(s) => Bytes::from(s.clone().into_bytes()),
            other => Bytes::from(serde_amqp::to_vec(other).unwrap_or_default()),
        },
        Body::Sequence(seq) => {
            let items: Vec<Value> = seq.iter().flat_map(|s| s.0.clone()).collect();
            Bytes::from(serde_amqp::to_vec(&Value::List(items)).unwrap_or_default())
        }
        Body::Empty => Bytes::new(),
    }
}

/// Builds Warren's message from a received AMQP 1.0 message. `exchange` is empty; the routing
/// key is the subject (or `fallback_key`, the source address, when there is none).
pub fn from_amqp10(m: &AmqpMessage<Body<Value>>, fallback_key: &str) -> Message {
    let mut props = AMQPProperties::default();
    let mut routing_key = fallback_key.to_string();
    if let Some(h) = &m.header {
        props = props.with_delivery_mode(if h.durable { 2 } else { 1 });
        props = props.with_priority(h.priority.0);
        if let Some(ttl) = h.ttl {
            props = props.with_expiration(ttl.to_string().into());
        }
    }
    let mut headers = FieldTable::default();
    if let Some(p) = &m.properties {
        if let Some(id) = &p.message_id {
            props = props.with_message_id(id_text(id).into());
        }
        if let Some(u) = &p.user_id {
            props = props.with_user_id(String::from_utf8_lossy(u).into_owned().into());
        }
        if let Some(s) = &p.subject {
            routing_key = s.clone();
        }
        if let Some(r) = &p.reply_to {
            props = props.with_reply_to(r.as_str().into());
        }
        if let Some(c) = &p.correlation_id {
            props = props.with_correlation_id(id_text(c).into());
        }
        if let Some(c) = &p.content_type {
            props = props.with_content_type(c.0.as_str().into());
        }
        if let Some(c) = &p.content_encoding {
            props = props.with_content_encoding(c.0.as_str().into());
        }
        if let Some(t) = &p.creation_time {
            props = props.with_timestamp((t.milliseconds().max(0) / 1000) as u64);
        }
    }
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            match (k.as_str(), v) {
                (TYPE, SimpleValue::String(s)) => props = props.with_type(s.as_str().into()),
                (APP_ID, SimpleValue::String(s)) => props = props.with_app_id(s.as_str().into()),
                (CLUSTER_ID, SimpleValue::String(s)) => {
                    props = props.with_cluster_id(s.as_str().into())
                }
                _ => {
                    headers.insert(k.as_str().into(), from_simple(v));
                }
            }
        }
    }
    if let Some(ann) = &m.message_annotations {
        for (k, v) in ann.0.iter() {
            let key = match k {
                OwnedKey::Symbol(s) => s.0.clone(),
                OwnedKey::Ulong(n) => n.to_string(),
            };
            if let Some(name) = key.strip_prefix(COMPLEX_HEADER) {
                headers.insert(name.into(), from_value(v));
            } else if key.starts_with("x-opt-") {
                headers.insert(key.as_str().into(), from_value(v));
            }
        }
    }
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    Message::new(
        ShortString::from(""),
        routing_key.into(),
        props,
        body_bytes(&m.body),
    )
}

/// Whether the peer says it delivered this message before (0-9-1's `redelivered`):
/// `header.delivery-count` above zero, or, from RabbitMQ, `header.first-acquirer` false.
/// RabbitMQ 3.x's plugin never counts deliveries but sets `first-acquirer` on every one (true
/// unless the 0-9-1 queue redelivers it); other peers may leave `first-acquirer` at its default,
/// false, on a first delivery, so only RabbitMQ's is believed.
pub fn redelivered(header: Option<&Header>, target: Amqp10Target) -> bool {
    header.is_some_and(|h| {
        h.delivery_count > 0 || (target == Amqp10Target::Rabbitmq && !h.first_acquirer)
    })
}

/// A header value as text, for fields that take a string (the session id → `group-id`):
/// strings as they are, integers and booleans in decimal; `None` for other types.
pub fn header_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        _ => return None,
    })
}

fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => format!("{u:?}"),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

fn to_simple(v: &AMQPValue) -> Option<SimpleValue> {
    Some(match v {
        AMQPValue::Boolean(b) => SimpleValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => SimpleValue::Byte(*n),
        AMQPValue::ShortShortUInt(n) => SimpleValue::Ubyte(*n),
        AMQPValue::ShortInt(n) => SimpleValue::Short(*n),
        AMQPValue::ShortUInt(n) => SimpleValue::Ushort(*n),
        AMQPValue::LongInt(n) => SimpleValue::Int(*n),
        AMQPValue::LongUInt(n) => SimpleValue::Uint(*n),
        AMQPValue::LongLongInt(n) => SimpleValue::Long(*n),
        AMQPValue::Float(f) => SimpleValue::Float((*f).into()),
        AMQPValue::Double(f) => SimpleValue::Double((*f).into()),
        AMQPValue::ShortString(s) => SimpleValue::Symbol(Symbol::from(s.as_str())),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => SimpleValue::String(text.to_string()),
            Err(_) => SimpleValue::Binary(Binary::from(s.as_bytes().to_vec())),
        },
        AMQPValue::Timestamp(t) => SimpleValue::Timestamp(Timestamp::from_milliseconds(
            (*t as i64).saturating_mul(1000),
        )),
        AMQPValue::ByteArray(b) => SimpleValue::Binary(Binary::from(b.as_slice().to_vec())),
        AMQPValue::Void => SimpleValue::Null,
        AMQPValue::DecimalValue(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
            return None
        }
    })
}

fn to_value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::FieldArray(a) => Value::List(a.as_slice().iter().map(to_value).collect()),
        AMQPValue::FieldTable(t) => Value::Map(
            t.inner()
                .iter()
                .map(|(k, v)| (Value::String(k.to_string()), to_value(v)))
                .collect(),
        ),
        // Not a described type: RabbitMQ 3.10 closes the session on descriptors it does not
        // know. A map with one symbol key cannot be a field table (their keys are strings).
        AMQPValue::DecimalValue(d) => Value::Map(
            [(
                Value::Symbol(Symbol::from(DECIMAL)),
                Value::List(vec![Value::Ubyte(d.scale), Value::Uint(d.value)]),
            )]
            .into_iter()
            .collect(),
        ),
        simple => Value::from(to_simple(simple).unwrap_or(SimpleValue::Null)),
    }
}

fn from_simple(v: &SimpleValue) -> AMQPValue {
    from_value(&Value::from(v.clone()))
}

fn from_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Ubyte(n) => AMQPValue::ShortShortUInt(*n),
        Value::Ushort(n) => AMQPValue::ShortUInt(*n),
        Value::Uint(n) => AMQPValue::LongUInt(*n),
        Value::Ulong(n) => AMQPValue::LongLongInt(*n as i64),
        Value::Byte(n) => AMQPValue::ShortShortInt(*n),
        Value::Short(n) => AMQPValue::ShortInt(*n),
        Value::Int(n) => AMQPValue::LongInt(*n),
        Value::Long(n) => AMQPValue::LongLongInt(*n),
        Value::Float(f) => AMQPValue::Float(f.into_inner()),
        Value::Double(f) => AMQPValue::Double(f.into_inner()),
        Value::Timestamp(t) => AMQPValue::Timestamp((t.milliseconds().max(0) / 1000) as u64),
        Value::Binary(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        // Not a short string: that type has no tag in a 0-9-1 field table (amq-protocol's 's'
        // is a short int), so a property block holding one cannot be decoded again.
        Value::Symbol(s) => AMQPValue::LongString(LongString::from(s.0.as_str())),
        Value::List(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(from_value).collect::<Vec<_>>(),
        )),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.0.iter().map(from_value).collect::<Vec<_>>(),
        )),
        Value::Map(map) if map.len() == 1 => match map.iter().next() {
            Some((Value::Symbol(k), Value::List(items))) if k.0 == DECIMAL => {
                match items.as_slice() {
                    [Value::Ubyte(scale), Value::Uint(value)] => {
                        AMQPValue::DecimalValue(DecimalValue {
                            scale: *scale,
                            value: *value,
                        })
                    }
                    _ => table(map),
                }
            }
            _ => table(map),
        },
        Value::Map(map) => table(map),
        other => AMQPValue::LongString(format!("{other:?}").into()),
    }
}

fn table(map: &OrderedMap<Value, Value>) -> AMQPValue {
    let mut t = FieldTable::default();
    for (k, v) in map.iter() {
        let key = match k {
            Value::String(s) => s.clone(),
            Value::Symbol(s) => s.0.clone(),
            other => format!("{other:?}"),
        };
        t.insert(key.into(), from_value(v));
    }
    AMQPValue::FieldTable(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_header() -> FieldTable {
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::LongInt(-7));
        nested.insert(
            "deep".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Boolean(false)].into()),
        );
        let mut h = FieldTable::default();
        h.insert("bool".into(), AMQPValue::Boolean(true));
        h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
        h.insert("u8".into(), AMQPValue::ShortShortUInt(8));
        h.insert("i16".into(), AMQPValue::ShortInt(-16));
        h.insert("u16".into(), AMQPValue::ShortUInt(16));
        h.insert("i32".into(), AMQPValue::LongInt(-32));
        h.insert("u32".into(), AMQPValue::LongUInt(32));
        h.insert("i64".into(), AMQPValue::LongLongInt(-64));
        h.insert("f32".into(), AMQPValue::Float(1.5));
        h.insert("f64".into(), AMQPValue::Double(-2.25));
        h.insert(
            "decimal".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        );
        h.insert("long".into(), AMQPValue::LongString("long ✓".into()));
        h.insert(
            "array".into(),
            AMQPValue::FieldArray(
                vec![AMQPValue::LongInt(1), AMQPValue::LongString("two".into())].into(),
            ),
        );
        h.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        h.insert("table".into(), AMQPValue::FieldTable(nested));
        h.insert(
            "bytes".into(),
            AMQPValue::ByteArray(vec![0u8, 255, 7].into()),
        );
        h.insert("void".into(), AMQPValue::Void);
        h.insert(
            "x-opt-partition-key".into(),
            AMQPValue::LongString("p1".into()),
        );
        h
    }

    pub(crate) fn full_properties() -> AMQPProperties {
        AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(every_header())
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("corr-1".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("id-1".into())
            .with_timestamp(1_700_000_123)
            .with_type("order.created".into())
            .with_user_id("guest".into())
            .with_app_id("shop".into())
            .with_cluster_id("c1".into())
    }

    fn round_trip(message: &Message, id: &str) -> Message {
        let out = to_amqp10(message, id);
        // Through the wire encoding, as a peer would see it.
        let bytes =
            serde_amqp::to_vec(&fe2o3_amqp_types::messaging::message::__private::Serializable(out))
                .unwrap();
        let back: fe2o3_amqp_types::messaging::message::__private::Deserializable<
            AmqpMessage<Body<Value>>,
        > = serde_amqp::from_slice(&bytes).unwrap();
        from_amqp10(&back.0, "fallback")
    }

    #[test]
    fn every_property_and_header_type_round_trips() {
        let m = Message::new(
            "ex".into(),
            "orders.eu".into(),
            full_properties(),
            Bytes::from_static(b"{\"a\":1}"),
        );
        let back = round_trip(&m, "id-1");
        assert_eq!(back.routing_key(), "orders.eu");
        assert_eq!(back.body(), m.body());
        let (a, b) = (&m.properties(), &back.properties());
        assert_eq!(a.content_type(), b.content_type());
        assert_eq!(a.content_encoding(), b.content_encoding());
        assert_eq!(a.delivery_mode(), b.delivery_mode());
        assert_eq!(a.priority(), b.priority());
        assert_eq!(a.correlation_id(), b.correlation_id());
        assert_eq!(a.reply_to(), b.reply_to());
        assert_eq!(a.expiration(), b.expiration());
        assert_eq!(a.message_id(), b.message_id());
        assert_eq!(a.timestamp(), b.timestamp());
        assert_eq!(a.kind(), b.kind());
        assert_eq!(a.user_id(), b.user_id());
        assert_eq!(a.app_id(), b.app_id());
        assert_eq!(a.cluster_id(), b.cluster_id());
        let (ha, hb) = (a.headers().as_ref().unwrap(), b.headers().as_ref().unwrap());
        for (k, v) in ha.inner() {
            assert_eq!(hb.inner().get(k), Some(v), "header {k}");
        }
        assert_eq!(ha.inner().len(), hb.inner().len());
    }

    #[test]
    fn symbols_arrive_as_long_strings_and_keep_the_properties_readable() {
        let mut app = OrderedMap::new();
        app.insert(
            "kind".to_string(),
            SimpleValue::Symbol(Symbol::from("com.example:order")),
        );
        let m = AmqpMessage::builder()
            .header(Header {
                durable: true,
                ..Default::default()
            })
            .application_properties(ApplicationProperties(app))
            .value(Value::Null)
            .build();
        let back = from_amqp10(&m.map_body(Body::Value), "q");
        assert_eq!(back.properties().delivery_mode(), &Some(2));
        assert_eq!(
            back.headers().unwrap().inner().get("kind"),
            Some(&AMQPValue::LongString("com.example:order".into()))
        );
    }

    #[test]
    fn sections_hold_what_the_table_says() {
        let m = Message::new("ex".into(), "k".into(), full_properties(), Bytes::new());
        let out = to_amqp10(&m, "id-1");
        let h = out.header.unwrap();
        assert!(h.durable);
        assert_eq!(h.priority.0, 7);
        assert_eq!(h.ttl, Some(60_000));
        let p = out.properties.unwrap();
        assert_eq!(p.subject.as_deref(), Some("k"));
        assert_eq!(p.creation_time.unwrap().milliseconds(), 1_700_000_123_000);
        let app = out.application_properties.unwrap().0;
        assert_eq!(app.get("i8"), Some(&SimpleValue::Byte(-8)));
        assert_eq!(
            app.get(TYPE),
            Some(&SimpleValue::String("order.created".into()))
        );
        let ann = out.message_annotations.unwrap().0;
        assert!(ann.contains_key(&OwnedKey::Symbol(Symbol::from("x-opt-partition-key"))));
        assert!(ann.contains_key(&OwnedKey::Symbol(Symbol::from("x-amqp091-header:table"))));
    }

    #[test]
    fn redelivered_from_the_delivery_count_and_from_rabbitmqs_first_acquirer() {
        let first = Header {
            first_acquirer: true,
            ..Default::default()
        };
        let counted = Header {
            delivery_count: 2,
            ..Default::default()
        };
        // RabbitMQ 3.x on a requeued message: first-acquirer false, delivery-count left at 0.
        let defaulted = Header::default();
        for target in [
            Amqp10Target::Generic,
            Amqp10Target::Rabbitmq,
            Amqp10Target::Servicebus,
        ] {
            assert!(!redelivered(None, target));
            assert!(!redelivered(Some(&first), target));
            assert!(redelivered(Some(&counted), target));
        }
        assert!(redelivered(Some(&defaulted), Amqp10Target::Rabbitmq));
        assert!(!redelivered(Some(&defaulted), Amqp10Target::Generic));
        assert!(!redelivered(Some(&defaulted), Amqp10Target::Servicebus));
    }

    #[test]
    fn bare_message_round_trips_and_keeps_the_given_id() {
        let m = Message::new(
            "".into(),
            "".into(),
            AMQPProperties::default(),
            Bytes::from_static(b"x"),
        );
        let back = round_trip(&m, "warren-1");
        assert_eq!(
            back.properties().message_id().as_ref().unwrap().as_str(),
            "warren-1"
        );
        assert_eq!(back.routing_key(), "fallback");
        assert_eq!(back.properties().delivery_mode(), &Some(1));
        assert!(back.properties().headers().is_none());
    }
}
