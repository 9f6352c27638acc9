//! Codec tests: every method of every class round-trips through `Encoder::method` and
//! `decode_frame` with arbitrary arguments (field tables holding every value type); content
//! frames, the hand-written fast encoders and basic properties round-trip too; and each of
//! `decode_frame`'s error paths is pinned down. The last section is the stable-toolchain
//! stand-in for the cargo-fuzz target in `gateway/fuzz`: random and mutated bytes must never
//! make the decoder panic.

use std::collections::BTreeSet;

use amq_protocol::protocol::basic::{gen_properties, AMQPProperties};
use amq_protocol::protocol::{
    access, basic, channel, confirm, connection, exchange, parse_class, queue, tx,
};
use amq_protocol::types::{ByteArray, DecimalValue};
use bytes::{BufMut, BytesMut};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;
use crate::error::{code, Exception};

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Any valid short string: arbitrary Unicode up to 252 bytes, or exactly 255 bytes.
fn short_string() -> BoxedStrategy<ShortString> {
    prop_oneof![
        8 => vec(any::<char>(), 0..64).prop_map(|c| c.into_iter().collect::<String>()),
        1 => "[a-zA-Z0-9._:-]{255}",
        1 => Just("€".repeat(85)),
    ]
    .prop_map(ShortString::from)
    .boxed()
}

/// Any long string: arbitrary bytes, not necessarily UTF-8.
fn long_string() -> BoxedStrategy<LongString> {
    vec(any::<u8>(), 0..300).prop_map(LongString::from).boxed()
}

/// Finite floats only: NaN is not equal to itself, so it cannot round-trip by `==`.
fn finite_f32() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("finite", |f| f.is_finite())
}

fn finite_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

/// A field value of any type a peer can send, nested arrays and tables included.
///
/// `AMQPValue::ShortString` is left out on purpose: it has no field type octet on the wire
/// (amq-protocol writes '_', which no parser accepts; RabbitMQ reads 's' as a short int), see
/// `short_string_field_values_cannot_be_sent`.
fn field_value() -> BoxedStrategy<AMQPValue> {
    let leaf = Union::new(vec![
        any::<bool>().prop_map(AMQPValue::Boolean).boxed(),
        any::<i8>().prop_map(AMQPValue::ShortShortInt).boxed(),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt).boxed(),
        any::<i16>().prop_map(AMQPValue::ShortInt).boxed(),
        any::<u16>().prop_map(AMQPValue::ShortUInt).boxed(),
        any::<i32>().prop_map(AMQPValue::LongInt).boxed(),
        any::<u32>().prop_map(AMQPValue::LongUInt).boxed(),
        any::<i64>().prop_map(AMQPValue::LongLongInt).boxed(),
        finite_f32().prop_map(AMQPValue::Float).boxed(),
        finite_f64().prop_map(AMQPValue::Double).boxed(),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value }))
            .boxed(),
        long_string().prop_map(AMQPValue::LongString).boxed(),
        any::<u64>().prop_map(AMQPValue::Timestamp).boxed(),
        vec(any::<u8>(), 0..64)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b)))
            .boxed(),
        Just(AMQPValue::Void).boxed(),
    ]);
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            btree_map(short_string(), inner, 0..6)
                .prop_map(|m| AMQPValue::FieldTable(FieldTable::from(m))),
        ]
    })
    .boxed()
}

fn field_table() -> BoxedStrategy<FieldTable> {
    btree_map(short_string(), field_value(), 0..8)
        .prop_map(FieldTable::from)
        .boxed()
}

/// Basic properties with each field independently present or absent.
fn properties() -> BoxedStrategy<AMQPProperties> {
    properties_where(false)
}

/// Basic properties with every one of the fourteen fields set.
fn full_properties() -> BoxedStrategy<AMQPProperties> {
    properties_where(true)
}

fn properties_where(all_set: bool) -> BoxedStrategy<AMQPProperties> {
    fn opt<T: std::fmt::Debug + 'static>(
        s: impl Strategy<Value = T> + 'static,
        all_set: bool,
    ) -> BoxedStrategy<Option<T>> {
        if all_set {
            s.prop_map(Some).boxed()
        } else {
            option::of(s).boxed()
        }
    }
    let first = (
        opt(short_string(), all_set),
        opt(short_string(), all_set),
        opt(field_table(), all_set),
        opt(any::<u8>(), all_set),
        opt(any::<u8>(), all_set),
        opt(short_string(), all_set),
        opt(short_string(), all_set),
    );
    let second = (
        opt(short_string(), all_set),
        opt(short_string(), all_set),
        opt(any::<u64>(), all_set),
        opt(short_string(), all_set),
        opt(short_string(), all_set),
        opt(short_string(), all_set),
        opt(short_string(), all_set),
    );
    (first, second)
        .prop_map(
            |(
                (
                    content_type,
                    content_encoding,
                    headers,
                    delivery_mode,
                    priority,
                    correlation_id,
                    reply_to,
                ),
                (expiration, message_id, timestamp, kind, user_id, app_id, cluster_id),
            )| {
                let mut p = AMQPProperties::default();
                if let Some(v) = content_type {
                    p = p.with_content_type(v);
                }
                if let Some(v) = content_encoding {
                    p = p.with_content_encoding(v);
                }
                if let Some(v) = headers {
                    p = p.with_headers(v);
                }
                if let Some(v) = delivery_mode {
                    p = p.with_delivery_mode(v);
                }
                if let Some(v) = priority {
                    p = p.with_priority(v);
                }
                if let Some(v) = correlation_id {
                    p = p.with_correlation_id(v);
                }
                if let Some(v) = reply_to {
                    p = p.with_reply_to(v);
                }
                if let Some(v) = expiration {
                    p = p.with_expiration(v);
                }
                if let Some(v) = message_id {
                    p = p.with_message_id(v);
                }
                if let Some(v) = timestamp {
                    p = p.with_timestamp(v);
                }
                if let Some(v) = kind {
                    p = p.with_type(v);
                }
                if let Some(v) = user_id {
                    p = p.with_user_id(v);
                }
                if let Some(v) = app_id {
                    p = p.with_app_id(v);
                }
                if let Some(v) = cluster_id {
                    p = p.with_cluster_id(v);
                }
                p
            },
        )
        .boxed()
}

/// One entry per method: `class.Method` and a strategy producing it with arbitrary arguments.
macro_rules! method {
    ($class:ident, $module:ident :: $variant:ident {}) => {
        (
            concat!(stringify!($module), ".", stringify!($variant)),
            Just(AMQPClass::$class($module::AMQPMethod::$variant($module::$variant {}))).boxed(),
        )
    };
    ($class:ident, $module:ident :: $variant:ident { $($field:ident : $strategy:expr),+ $(,)? }) => {
        (
            concat!(stringify!($module), ".", stringify!($variant)),
            ($($strategy,)+)
                .prop_map(|($($field,)+)| {
                    AMQPClass::$class($module::AMQPMethod::$variant($module::$variant {
                        $($field),+
                    }))
                })
                .boxed(),
        )
    };
}

fn all_methods() -> Vec<(&'static str, BoxedStrategy<AMQPClass>)> {
    let ss = short_string;
    let b = any::<bool>;
    vec![
        // connection (10)
        method!(
            Connection,
            connection::Start {
                version_major: any::<u8>(),
                version_minor: any::<u8>(),
                server_properties: field_table(),
                mechanisms: long_string(),
                locales: long_string(),
            }
        ),
        method!(
            Connection,
            connection::StartOk {
                client_properties: field_table(),
                mechanism: ss(),
                response: long_string(),
                locale: ss(),
            }
        ),
        method!(
            Connection,
            connection::Secure {
                challenge: long_string()
            }
        ),
        method!(
            Connection,
            connection::SecureOk {
                response: long_string()
            }
        ),
        method!(
            Connection,
            connection::Tune {
                channel_max: any::<u16>(),
                frame_max: any::<u32>(),
                heartbeat: any::<u16>(),
            }
        ),
        method!(
            Connection,
            connection::TuneOk {
                channel_max: any::<u16>(),
                frame_max: any::<u32>(),
                heartbeat: any::<u16>(),
            }
        ),
        method!(Connection, connection::Open { virtual_host: ss() }),
        method!(Connection, connection::OpenOk {}),
        method!(
            Connection,
            connection::Close {
                reply_code: any::<u16>(),
                reply_text: ss(),
                class_id: any::<u16>(),
                method_id: any::<u16>(),
            }
        ),
        method!(Connection, connection::CloseOk {}),
        method!(Connection, connection::Blocked { reason: ss() }),
        method!(Connection, connection::Unblocked {}),
        method!(
            Connection,
            connection::UpdateSecret {
                new_secret: long_string(),
                reason: ss(),
            }
        ),
        method!(Connection, connection::UpdateSecretOk {}),
        // channel (20)
        method!(Channel, channel::Open {}),
        method!(Channel, channel::OpenOk {}),
        method!(Channel, channel::Flow { active: b() }),
        method!(Channel, channel::FlowOk { active: b() }),
        method!(
            Channel,
            channel::Close {
                reply_code: any::<u16>(),
                reply_text: ss(),
                class_id: any::<u16>(),
                method_id: any::<u16>(),
            }
        ),
        method!(Channel, channel::CloseOk {}),
        // access (30)
        method!(
            Access,
            access::Request {
                realm: ss(),
                exclusive: b(),
                passive: b(),
                active: b(),
                write: b(),
                read: b(),
            }
        ),
        method!(Access, access::RequestOk {}),
        // exchange (40)
        method!(
            Exchange,
            exchange::Declare {
                exchange: ss(),
                kind: ss(),
                passive: b(),
                durable: b(),
                auto_delete: b(),
                internal: b(),
                nowait: b(),
                arguments: field_table(),
            }
        ),
        method!(Exchange, exchange::DeclareOk {}),
        method!(
            Exchange,
            exchange::Delete {
                exchange: ss(),
                if_unused: b(),
                nowait: b(),
            }
        ),
        method!(Exchange, exchange::DeleteOk {}),
        method!(
            Exchange,
            exchange::Bind {
                destination: ss(),
                source: ss(),
                routing_key: ss(),
                nowait: b(),
                arguments: field_table(),
            }
        ),
        method!(Exchange, exchange::BindOk {}),
        method!(
            Exchange,
            exchange::Unbind {
                destination: ss(),
                source: ss(),
                routing_key: ss(),
                nowait: b(),
                arguments: field_table(),
            }
        ),
        method!(Exchange, exchange::UnbindOk {}),
        // queue (50)
        method!(
            Queue,
            queue::Declare {
                queue: ss(),
                passive: b(),
                durable: b(),
                exclusive: b(),
                auto_delete: b(),
                nowait: b(),
                arguments: field_table(),
            }
        ),
        method!(
            Queue,
            queue::DeclareOk {
                queue: ss(),
                message_count: any::<u32>(),
                consumer_count: any::<u32>(),
            }
        ),
        method!(
            Queue,
            queue::Bind {
                queue: ss(),
                exchange: ss(),
                routing_key: ss(),
                nowait: b(),
                arguments: field_table(),
            }
        ),
        method!(Queue, queue::BindOk {}),
        method!(
            Queue,
            queue::Purge {
                queue: ss(),
                nowait: b()
            }
        ),
        method!(
            Queue,
            queue::PurgeOk {
                message_count: any::<u32>()
            }
        ),
        method!(
            Queue,
            queue::Delete {
                queue: ss(),
                if_unused: b(),
                if_empty: b(),
                nowait: b(),
            }
        ),
        method!(
            Queue,
            queue::DeleteOk {
                message_count: any::<u32>()
            }
        ),
        method!(
            Queue,
            queue::Unbind {
                queue: ss(),
                exchange: ss(),
                routing_key: ss(),
                arguments: field_table(),
            }
        ),
        method!(Queue, queue::UnbindOk {}),
        // basic (60)
        method!(
            Basic,
            basic::Qos {
                prefetch_count: any::<u16>(),
                global: b(),
            }
        ),
        method!(Basic, basic::QosOk {}),
        method!(
            Basic,
            basic::Consume {
                queue: ss(),
                consumer_tag: ss(),
                no_local: b(),
                no_ack: b(),
                exclusive: b(),
                nowait: b(),
                arguments: field_table(),
            }
        ),
        method!(Basic, basic::ConsumeOk { consumer_tag: ss() }),
        method!(
            Basic,
            basic::Cancel {
                consumer_tag: ss(),
                nowait: b()
            }
        ),
        method!(Basic, basic::CancelOk { consumer_tag: ss() }),
        method!(
            Basic,
            basic::Publish {
                exchange: ss(),
                routing_key: ss(),
                mandatory: b(),
                immediate: b(),
            }
        ),
        method!(
            Basic,
            basic::Return {
                reply_code: any::<u16>(),
                reply_text: ss(),
                exchange: ss(),
                routing_key: ss(),
            }
        ),
        method!(
            Basic,
            basic::Deliver {
                consumer_tag: ss(),
                delivery_tag: any::<u64>(),
                redelivered: b(),
                exchange: ss(),
                routing_key: ss(),
            }
        ),
        method!(
            Basic,
            basic::Get {
                queue: ss(),
                no_ack: b()
            }
        ),
        method!(
            Basic,
            basic::GetOk {
                delivery_tag: any::<u64>(),
                redelivered: b(),
                exchange: ss(),
                routing_key: ss(),
                message_count: any::<u32>(),
            }
        ),
        method!(Basic, basic::GetEmpty {}),
        method!(
            Basic,
            basic::Ack {
                delivery_tag: any::<u64>(),
                multiple: b(),
            }
        ),
        method!(
            Basic,
            basic::Reject {
                delivery_tag: any::<u64>(),
                requeue: b(),
            }
        ),
        method!(Basic, basic::RecoverAsync { requeue: b() }),
        method!(Basic, basic::Recover { requeue: b() }),
        method!(Basic, basic::RecoverOk {}),
        method!(
            Basic,
            basic::Nack {
                delivery_tag: any::<u64>(),
                multiple: b(),
                requeue: b(),
            }
        ),
        // tx (90)
        method!(Tx, tx::Select {}),
        method!(Tx, tx::SelectOk {}),
        method!(Tx, tx::Commit {}),
        method!(Tx, tx::CommitOk {}),
        method!(Tx, tx::Rollback {}),
        method!(Tx, tx::RollbackOk {}),
        // confirm (85)
        method!(Confirm, confirm::Select { nowait: b() }),
        method!(Confirm, confirm::SelectOk {}),
    ]
}

/// Any method of any class.
fn any_method() -> BoxedStrategy<AMQPClass> {
    Union::new(all_methods().into_iter().map(|(_, s)| s)).boxed()
}

/// AMQP 0-9-1 as RabbitMQ extends it: every (class id, method ids) pair.
const SPEC_METHODS: &[(u16, &[u16])] = &[
    (
        10,
        &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
    ),
    (20, &[10, 11, 20, 21, 40, 41]),
    (30, &[10, 11]),
    (40, &[10, 11, 20, 21, 30, 31, 40, 51]),
    (50, &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51]),
    (
        60,
        &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
    ),
    (85, &[10, 11]),
    (90, &[10, 11, 20, 21, 30, 31]),
];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const NO_LIMIT: usize = usize::MAX;

/// `n` proptest cases, unless `PROPTEST_CASES` asks for another number.
fn cases(n: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    Config {
        cases,
        ..Config::default()
    }
}

fn gen_props(props: &AMQPProperties) -> Vec<u8> {
    cookie_factory::gen(gen_properties(props), Vec::new())
        .expect("properties serialize")
        .0
}

fn fail(what: impl std::fmt::Debug) -> TestCaseError {
    TestCaseError::fail(format!("{what:?}"))
}

/// Encodes `method`, checks the frame layout, and decodes it back with frame_max set exactly to
/// the frame's size (and refused one byte below it).
fn method_round_trip(channel: u16, method: &AMQPClass) -> Result<(), TestCaseError> {
    let encoded = encode_method(channel, method);
    let len = encoded.len();
    // Header, class and method ids, end octet.
    prop_assert!(len >= FRAME_HEADER_LEN + 5, "frame of {} bytes", len);
    prop_assert_eq!(encoded[0], FRAME_METHOD);
    prop_assert_eq!(u16::from_be_bytes([encoded[1], encoded[2]]), channel);
    let size = u32::from_be_bytes([encoded[3], encoded[4], encoded[5], encoded[6]]) as usize;
    prop_assert_eq!(size, len - FRAME_HEADER_LEN - 1);
    prop_assert_eq!(encoded[len - 1], FRAME_END);
    prop_assert_eq!(
        u16::from_be_bytes([encoded[7], encoded[8]]),
        method.get_amqp_class_id()
    );
    prop_assert_eq!(
        u16::from_be_bytes([encoded[9], encoded[10]]),
        method.get_amqp_method_id()
    );

    let mut buf = encoded.clone();
    match decode_frame(&mut buf, len) {
        Ok(Some(Frame::Method(c, m))) => {
            prop_assert_eq!(c, channel);
            prop_assert_eq!(&*m, method);
        }
        other => return Err(fail(other)),
    }
    prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());

    let mut buf = encoded;
    prop_assert_eq!(
        decode_frame(&mut buf, len - 1).err(),
        Some(DecodeError::TooLarge {
            size: len,
            max: len - 1
        })
    );
    Ok(())
}

fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, DecodeError> {
    decode_frame(&mut BytesMut::from(bytes), NO_LIMIT)
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
    out.put_u8(FRAME_END);
    out
}

/// A table holding one value of every type a peer can send, nested ones included.
fn table_of_every_type() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("deep".into()));
    nested.insert("void".into(), AMQPValue::Void);
    let array = FieldArray::from(vec![
        AMQPValue::Boolean(false),
        AMQPValue::LongInt(-7),
        AMQPValue::LongString(vec![0, 255, 1].into()),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
        AMQPValue::FieldTable(nested.clone()),
    ]);
    let mut t = FieldTable::default();
    for (k, v) in [
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-128)),
        ("u8", AMQPValue::ShortShortUInt(255)),
        ("i16", AMQPValue::ShortInt(-32768)),
        ("u16", AMQPValue::ShortUInt(65535)),
        ("i32", AMQPValue::LongInt(i32::MIN)),
        ("u32", AMQPValue::LongUInt(u32::MAX)),
        ("i64", AMQPValue::LongLongInt(i64::MIN)),
        ("f32", AMQPValue::Float(-1.5e-38)),
        ("f64", AMQPValue::Double(f64::MAX)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 31415,
            }),
        ),
        ("longstr", AMQPValue::LongString("x-💡-\u{0}".into())),
        ("array", AMQPValue::FieldArray(array)),
        ("timestamp", AMQPValue::Timestamp(u64::MAX)),
        ("table", AMQPValue::FieldTable(nested)),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 0xCE])),
        ),
        ("void", AMQPValue::Void),
    ] {
        t.insert(k.into(), v);
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Method round trips
// ---------------------------------------------------------------------------------------------

/// The strategy list, the spec and amq-protocol's own parser agree on the set of methods, so a
/// method cannot be missed by the round-trip test below.
#[test]
fn every_method_amq_protocol_knows_has_a_strategy() {
    let spec: BTreeSet<(u16, u16)> = SPEC_METHODS
        .iter()
        .flat_map(|(c, ms)| ms.iter().map(move |m| (*c, *m)))
        .collect();

    // Arguments of all zero bytes parse as empty strings, empty tables, zeros and false, so a
    // method id is known to amq-protocol exactly when this parses.
    let mut known = BTreeSet::new();
    for class in 0..=255u16 {
        for method in 0..=255u16 {
            let mut payload = Vec::new();
            payload.extend_from_slice(&class.to_be_bytes());
            payload.extend_from_slice(&method.to_be_bytes());
            payload.extend_from_slice(&[0; 64]);
            if parse_class(&payload[..]).is_ok() {
                known.insert((class, method));
            }
        }
    }
    assert_eq!(
        known, spec,
        "amq-protocol's methods differ from the spec list"
    );

    let mut runner = TestRunner::deterministic();
    let mut covered = BTreeSet::new();
    for (name, strategy) in all_methods() {
        let value = strategy.new_tree(&mut runner).expect("a value").current();
        let id = (value.get_amqp_class_id(), value.get_amqp_method_id());
        assert!(covered.insert(id), "{name} duplicates {id:?}");
    }
    assert_eq!(covered, spec, "the strategies do not cover every method");
}

/// Every method of every class, each with its own run of arbitrary arguments.
#[test]
fn every_method_round_trips() {
    for (name, strategy) in all_methods() {
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&(any::<u16>(), strategy), |(channel, method)| {
            method_round_trip(channel, &method)
        });
        if let Err(err) = result {
            panic!("{name}: {err}");
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Several frames back to back in one buffer decode one at a time, in order.
    #[test]
    fn method_streams_decode_in_order(methods in vec((any::<u16>(), any_method()), 1..8)) {
        let mut encoder = Encoder::default();
        for (channel, method) in &methods {
            encoder.method(*channel, method);
        }
        let mut buf = encoder.take();
        for (channel, method) in &methods {
            match decode_frame(&mut buf, NO_LIMIT) {
                Ok(Some(Frame::Method(c, m))) => {
                    prop_assert_eq!(c, *channel);
                    prop_assert_eq!(&*m, method);
                }
                other => return Err(fail(other)),
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert!(matches!(decode_frame(&mut buf, NO_LIMIT), Ok(None)));
    }

    /// Arbitrary field tables survive a method's arguments unchanged.
    #[test]
    fn field_tables_round_trip(arguments in field_table(), channel in any::<u16>()) {
        let method = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: true,
            nowait: false,
            arguments,
        }));
        method_round_trip(channel, &method)?;
    }
}

#[test]
fn a_table_of_every_value_type_round_trips() {
    let table = table_of_every_type();
    let method = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: "x".into(),
        kind: "headers".into(),
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        nowait: false,
        arguments: table.clone(),
    }));
    method_round_trip(3, &method).unwrap();
    let start = AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
        client_properties: table,
        mechanism: "PLAIN".into(),
        response: "\0guest\0guest".into(),
        locale: "en_US".into(),
    }));
    method_round_trip(0, &start).unwrap();
}

#[test]
fn large_arguments_round_trip() {
    // A long string and a table far beyond 64 KiB: lengths are 32-bit on the wire.
    let mut table = FieldTable::default();
    table.insert(
        "blob".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0xAB; 200_000])),
    );
    let method = AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
        client_properties: table,
        mechanism: "PLAIN".into(),
        response: LongString::from(vec![7u8; 100_000]),
        locale: "en_US".into(),
    }));
    method_round_trip(0, &method).unwrap();
}

/// `AMQPValue::ShortString` has no field type octet (amq-protocol writes '_'), so a table holding
/// one encodes to a frame no peer can decode. Whatever the server sends must never contain one;
/// this pins the hazard down (and shows decoding it is an error, not a panic).
#[test]
fn short_string_field_values_cannot_be_sent() {
    let mut table = FieldTable::default();
    table.insert("s".into(), AMQPValue::ShortString("short".into()));
    let method = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: "q".into(),
        consumer_tag: "c".into(),
        no_local: false,
        no_ack: false,
        exclusive: false,
        nowait: false,
        arguments: table,
    }));
    let mut buf = encode_method(1, &method);
    assert!(matches!(
        decode_frame(&mut buf, NO_LIMIT),
        Err(DecodeError::BadMethod { channel: 1, .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Content frames and basic properties
// ---------------------------------------------------------------------------------------------

fn frame_max_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        9usize..64,
        Just(FRAME_MIN_SIZE as usize),
        4096usize..140_000,
    ]
}

fn content_round_trip(
    channel: u16,
    props: &AMQPProperties,
    body: &[u8],
    frame_max: usize,
) -> Result<(), TestCaseError> {
    let raw = gen_props(props);
    let mut encoder = Encoder::default();
    encoder.content(channel, &raw, body, frame_max);
    let mut buf = encoder.take();

    match decode_frame(&mut buf, NO_LIMIT) {
        Ok(Some(Frame::Header(c, header))) => {
            prop_assert_eq!(c, channel);
            prop_assert_eq!(header.class_id, CLASS_BASIC);
            prop_assert_eq!(header.body_size, body.len() as u64);
            prop_assert_eq!(&header.properties, props);
            prop_assert_eq!(&header.raw_properties[..], &raw[..]);
        }
        other => return Err(fail(other)),
    }

    let mut got = Vec::with_capacity(body.len());
    let mut frames = 0;
    while !buf.is_empty() {
        let before = buf.len();
        match decode_frame(&mut buf, frame_max) {
            Ok(Some(Frame::Body(c, part))) => {
                prop_assert_eq!(c, channel);
                prop_assert!(!part.is_empty(), "empty body frame");
                prop_assert!(before - buf.len() <= frame_max);
                got.extend_from_slice(&part);
            }
            other => return Err(fail(other)),
        }
        frames += 1;
    }
    prop_assert_eq!(&got[..], body);
    prop_assert_eq!(frames, body.len().div_ceil(frame_max - 8));
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    /// A content header and its body, cut by frame_max, decode to the same raw properties, the
    /// same parsed properties and the same body.
    #[test]
    fn content_round_trips(
        channel in any::<u16>(),
        props in properties(),
        body in prop_oneof![
            4 => vec(any::<u8>(), 0..2_000),
            1 => vec(any::<u8>(), 100_000..300_000),
        ],
        frame_max in frame_max_strategy(),
    ) {
        // Keep the frame count sane for tiny frame_max values.
        let frame_max = if body.len() > 10_000 { frame_max.max(4096) } else { frame_max };
        content_round_trip(channel, &props, &body, frame_max)?;
    }

    /// Basic properties with all fourteen fields set survive gen_properties and the decoder.
    #[test]
    fn full_properties_round_trip(props in full_properties(), channel in any::<u16>()) {
        prop_assert_eq!(props.bitmask(), 0xFFFC);
        content_round_trip(channel, &props, b"body", FRAME_MIN_SIZE as usize)?;
    }
}

#[test]
fn properties_with_every_field_set_round_trip() {
    let props = AMQPProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(table_of_every_type())
        .with_delivery_mode(2)
        .with_priority(9)
        .with_correlation_id("corr-1".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_expiration("60000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
        .with_cluster_id("c1".into());
    assert_eq!(props.bitmask(), 0xFFFC);
    content_round_trip(9, &props, b"", 4096).unwrap();
    content_round_trip(9, &props, &[1; 10_000], 4096).unwrap();
}

#[test]
fn empty_body_has_no_body_frames() {
    let raw = gen_props(&AMQPProperties::default());
    assert_eq!(raw, vec![0, 0]);
    let mut encoder = Encoder::default();
    encoder.content(1, &raw, b"", 4096);
    let buf = encoder.take();
    assert_eq!(buf.len(), FRAME_HEADER_LEN + 14 + 1);
    content_round_trip(1, &AMQPProperties::default(), b"", 4096).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The hand-written encoders
// ---------------------------------------------------------------------------------------------

/// A fast-path frame must decode as `expected` and be byte-identical to amq-protocol's encoding.
fn fast_path(
    encoder: &mut Encoder,
    channel: u16,
    expected: AMQPClass,
) -> Result<(), TestCaseError> {
    let mut buf = encoder.take();
    let generated = encode_method(channel, &expected);
    prop_assert_eq!(
        &buf[..],
        &generated[..],
        "differs from amq-protocol's encoding"
    );
    match decode_frame(&mut buf, NO_LIMIT) {
        Ok(Some(Frame::Method(c, m))) => {
            prop_assert_eq!(c, channel);
            prop_assert_eq!(*m, expected);
        }
        other => return Err(fail(other)),
    }
    prop_assert!(buf.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn deliver_is_basic_deliver(
        channel in any::<u16>(),
        consumer_tag in short_string(),
        delivery_tag in any::<u64>(),
        redelivered in any::<bool>(),
        exchange in short_string(),
        routing_key in short_string(),
    ) {
        let mut encoder = Encoder::default();
        encoder.deliver(
            channel,
            consumer_tag.as_str(),
            delivery_tag,
            redelivered,
            exchange.as_str(),
            routing_key.as_str(),
        );
        let expected = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
        }));
        fast_path(&mut encoder, channel, expected)?;
    }

    #[test]
    fn get_ok_is_basic_get_ok(
        channel in any::<u16>(),
        delivery_tag in any::<u64>(),
        redelivered in any::<bool>(),
        exchange in short_string(),
        routing_key in short_string(),
        message_count in any::<u32>(),
    ) {
        let mut encoder = Encoder::default();
        encoder.get_ok(
            channel,
            delivery_tag,
            redelivered,
            exchange.as_str(),
            routing_key.as_str(),
            message_count,
        );
        let expected = AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            message_count,
        }));
        fast_path(&mut encoder, channel, expected)?;
    }

    #[test]
    fn ack_is_basic_ack(channel in any::<u16>(), delivery_tag in any::<u64>(), multiple in any::<bool>()) {
        let mut encoder = Encoder::default();
        encoder.ack(channel, delivery_tag, multiple);
        let expected = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag, multiple }));
        fast_path(&mut encoder, channel, expected)?;
    }

    #[test]
    fn nack_is_basic_nack(channel in any::<u16>(), delivery_tag in any::<u64>(), multiple in any::<bool>()) {
        let mut encoder = Encoder::default();
        encoder.nack(channel, delivery_tag, multiple);
        // The server never asks for requeue: the flag is only meaningful from a client.
        let expected = AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag,
            multiple,
            requeue: false,
        }));
        fast_path(&mut encoder, channel, expected)?;
    }
}

#[test]
fn heartbeat_is_a_heartbeat_on_channel_zero() {
    let mut encoder = Encoder::default();
    encoder.heartbeat();
    let mut buf = encoder.take();
    assert_eq!(&buf[..], &[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
    assert!(matches!(
        decode_frame(&mut buf, 8),
        Ok(Some(Frame::Heartbeat(0)))
    ));
    assert!(buf.is_empty());
}

#[test]
fn fast_path_short_strings_are_cut_to_255_bytes_on_a_char_boundary() {
    // Names never exceed 255 bytes (they arrive as short strings), but the encoders must not
    // write an invalid frame if one ever did.
    for long in [
        "a".repeat(300),
        "€".repeat(100),
        format!("{}€", "a".repeat(254)),
    ] {
        let mut encoder = Encoder::default();
        encoder.deliver(1, &long, 1, false, &long, &long);
        encoder.get_ok(1, 1, false, &long, &long, 0);
        let mut buf = encoder.take();
        for _ in 0..2 {
            match decode_frame(&mut buf, NO_LIMIT) {
                Ok(Some(Frame::Method(_, m))) => {
                    let name = match *m {
                        AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => d.exchange,
                        AMQPClass::Basic(basic::AMQPMethod::GetOk(g)) => g.exchange,
                        other => panic!("unexpected {other:?}"),
                    };
                    assert!(name.as_str().len() <= 255);
                    assert!(long.starts_with(name.as_str()));
                    assert!(name.as_str().len() > 252);
                }
                other => panic!("{long:?}: {other:?}"),
            }
        }
        assert!(buf.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// decode_frame's error paths
// ---------------------------------------------------------------------------------------------

fn sample_frames() -> Vec<BytesMut> {
    let declare = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: "x".into(),
        kind: "topic".into(),
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        nowait: false,
        arguments: table_of_every_type(),
    }));
    let mut encoder = Encoder::default();
    encoder.method(5, &declare);
    let method = encoder.take();
    let props = AMQPProperties::default()
        .with_content_type("text/plain".into())
        .with_headers(table_of_every_type());
    encoder.content(5, &gen_props(&props), b"hello", 4096);
    let mut content = encoder.take();
    let header_len = content.len() - (FRAME_HEADER_LEN + 5 + 1);
    let header = content.split_to(header_len);
    encoder.heartbeat();
    let heartbeat = encoder.take();
    vec![method, header, content, heartbeat]
}

#[test]
fn need_more_bytes_at_every_truncation_point() {
    for whole in sample_frames() {
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let result = decode_frame(&mut buf, NO_LIMIT);
            assert!(
                matches!(result, Ok(None)),
                "cut at {cut} of {}: {result:?}",
                whole.len()
            );
            assert_eq!(
                &buf[..],
                &whole[..cut],
                "Ok(None) must leave the bytes alone"
            );
        }
        let mut buf = whole.clone();
        assert!(matches!(decode_frame(&mut buf, NO_LIMIT), Ok(Some(_))));
        assert!(buf.is_empty());
    }
}

#[test]
fn a_partial_second_frame_waits_after_the_first_decodes() {
    let frames = sample_frames();
    let mut stream = BytesMut::new();
    for f in &frames {
        stream.extend_from_slice(f);
    }
    // Feed the stream one byte at a time, as the slowest possible socket would.
    let mut buf = BytesMut::new();
    let mut decoded = 0;
    for byte in stream.iter() {
        buf.put_u8(*byte);
        while let Some(frame) = decode_frame(&mut buf, NO_LIMIT).expect("valid stream") {
            let kind = frames[decoded][0];
            let matches_kind = matches!(
                (kind, &frame),
                (FRAME_METHOD, Frame::Method(..))
                    | (FRAME_HEADER, Frame::Header(..))
                    | (FRAME_BODY, Frame::Body(..))
                    | (FRAME_HEARTBEAT, Frame::Heartbeat(..))
            );
            assert!(matches_kind, "frame {decoded} decoded as {frame:?}");
            decoded += 1;
        }
    }
    assert_eq!(decoded, frames.len());
    assert!(buf.is_empty());
}

proptest! {
    #![proptest_config(cases(256))]

    /// The same holds for arbitrary methods at an arbitrary cut.
    #[test]
    fn truncated_methods_wait_for_more(channel in any::<u16>(), method in any_method(), cut in any::<prop::sample::Index>()) {
        let whole = encode_method(channel, &method);
        let cut = cut.index(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        prop_assert!(matches!(decode_frame(&mut buf, NO_LIMIT), Ok(None)));
        prop_assert_eq!(&buf[..], &whole[..cut]);
    }
}

#[test]
fn oversize_is_refused_from_the_header_alone() {
    let frame_max = 4096;
    for kind in [FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT, 42] {
        // Exactly frame_max in all: accepted, and waits for its payload.
        let mut buf = BytesMut::new();
        buf.put_u8(kind);
        buf.put_u16(1);
        buf.put_u32((frame_max - FRAME_HEADER_LEN - 1) as u32);
        let fits = decode_frame(&mut buf, frame_max);
        if kind == 42 {
            assert_eq!(fits.err(), Some(DecodeError::UnknownFrameType(42)));
        } else {
            assert!(matches!(fits, Ok(None)), "{fits:?}");
        }
        assert_eq!(buf.len(), FRAME_HEADER_LEN);

        // One byte more: refused with only the seven header bytes in hand.
        for size in [frame_max - FRAME_HEADER_LEN, frame_max, u32::MAX as usize] {
            let mut buf = BytesMut::new();
            buf.put_u8(kind);
            buf.put_u16(1);
            buf.put_u32(size as u32);
            assert_eq!(
                decode_frame(&mut buf, frame_max).err(),
                Some(DecodeError::TooLarge {
                    size: FRAME_HEADER_LEN + size + 1,
                    max: frame_max
                }),
                "kind {kind} size {size}"
            );
        }
    }
}

#[test]
fn bad_frame_end_is_refused() {
    for whole in sample_frames() {
        for end in [0x00, 0xCD, 0xCF, 0xFF] {
            let mut bad = whole.clone();
            let last = bad.len() - 1;
            bad[last] = end;
            assert_eq!(
                decode_frame(&mut bad, NO_LIMIT).err(),
                Some(DecodeError::BadFrameEnd(end))
            );
        }
    }
}

#[test]
fn unknown_frame_types_are_refused_from_the_header_alone() {
    for kind in 0..=255u8 {
        if matches!(
            kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            continue;
        }
        let mut header_only = BytesMut::from(&frame(kind, 0, b"abc")[..FRAME_HEADER_LEN]);
        assert_eq!(
            decode_frame(&mut header_only, NO_LIMIT).err(),
            Some(DecodeError::UnknownFrameType(kind))
        );
        assert_eq!(
            decode_one(&frame(kind, 7, b"")).err(),
            Some(DecodeError::UnknownFrameType(kind))
        );
    }
}

#[test]
fn heartbeats_must_be_empty_and_on_channel_zero() {
    for channel in [1, 2, 0x7FFF, u16::MAX] {
        assert_eq!(
            decode_one(&frame(FRAME_HEARTBEAT, channel, b"")).err(),
            Some(DecodeError::HeartbeatOnChannel(channel))
        );
    }
    assert_eq!(
        decode_one(&frame(FRAME_HEARTBEAT, 0, b"x")).err(),
        Some(DecodeError::BadHeartbeat(1))
    );
    assert_eq!(
        decode_one(&frame(FRAME_HEARTBEAT, 3, b"xy")).err(),
        Some(DecodeError::BadHeartbeat(2))
    );
}

#[test]
fn undecodable_methods_are_refused() {
    // Shorter than class and method ids.
    for payload in [&b""[..], b"\x00", b"\x00\x0a", b"\x00\x0a\x00"] {
        assert!(
            matches!(
                decode_one(&frame(FRAME_METHOD, 4, payload)),
                Err(DecodeError::BadMethod { channel: 4, .. })
            ),
            "{payload:?}"
        );
    }
    // Unknown class, unknown method of a known class.
    for payload in [
        &b"\x00\x0b\x00\x0a"[..],
        b"\x00\x3c\x00\x0c",
        b"\xff\xff\xff\xff",
    ] {
        assert!(matches!(
            decode_one(&frame(FRAME_METHOD, 1, payload)),
            Err(DecodeError::BadMethod { channel: 1, .. })
        ));
    }
    // Every strict prefix of a valid method's arguments.
    let declare = encode_method(
        2,
        &AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "orders".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: table_of_every_type(),
        })),
    );
    let payload = &declare[FRAME_HEADER_LEN..declare.len() - 1];
    for cut in 0..payload.len() {
        let result = decode_one(&frame(FRAME_METHOD, 2, &payload[..cut]));
        assert!(
            matches!(result, Err(DecodeError::BadMethod { channel: 2, .. })),
            "cut at {cut}: {result:?}"
        );
    }
    // A short string that is not UTF-8.
    let mut bad_utf8 = Vec::new();
    bad_utf8.extend_from_slice(&[0, 50, 0, 10, 0, 0, 2, 0xC3, 0x28, 0, 0, 0, 0, 0]);
    assert!(matches!(
        decode_one(&frame(FRAME_METHOD, 1, &bad_utf8)),
        Err(DecodeError::BadMethod { .. })
    ));
    // A field table whose length runs past the method.
    let mut table_overrun = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    table_overrun.extend_from_slice(&1000u32.to_be_bytes());
    assert!(matches!(
        decode_one(&frame(FRAME_METHOD, 1, &table_overrun)),
        Err(DecodeError::BadMethod { .. })
    ));
    // An unknown field value type inside a table.
    let mut bad_type = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    bad_type.extend_from_slice(&4u32.to_be_bytes());
    bad_type.extend_from_slice(&[1, b'k', b'?', 0]);
    assert!(matches!(
        decode_one(&frame(FRAME_METHOD, 1, &bad_type)),
        Err(DecodeError::BadMethod { .. })
    ));
}

#[test]
fn undecodable_content_headers_are_refused() {
    let bad = |payload: &[u8]| {
        let result = decode_one(&frame(FRAME_HEADER, 6, payload));
        assert!(
            matches!(result, Err(DecodeError::BadHeader { channel: 6, .. })),
            "{payload:?}: {result:?}"
        );
    };
    // Too short for class, weight, body size and property flags.
    for len in 0..14 {
        bad(&vec![0; len]);
    }
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&5u64.to_be_bytes());
    // Trailing bytes after an empty property list.
    let mut trailing = header.clone();
    trailing.extend_from_slice(&[0, 0, 1]);
    bad(&trailing);
    // The content-type flag with no content-type after it.
    let mut missing = header.clone();
    missing.extend_from_slice(&[0x80, 0]);
    bad(&missing);
    // Headers whose table length runs past the frame.
    let mut overrun = header.clone();
    overrun.extend_from_slice(&[0x20, 0, 0, 0, 1, 0]);
    bad(&overrun);
    // And the good one decodes.
    let mut good = header;
    good.extend_from_slice(&[0, 0]);
    assert!(matches!(
        decode_one(&frame(FRAME_HEADER, 6, &good)),
        Ok(Some(Frame::Header(6, ContentHeader { body_size: 5, .. })))
    ));
}

/// Each decode error closes the connection with the code RabbitMQ uses for it.
#[test]
fn decode_errors_map_to_rabbitmq_reply_codes() {
    let cases = [
        (DecodeError::TooLarge { size: 9, max: 8 }, code::FRAME_ERROR),
        (DecodeError::BadFrameEnd(0), code::FRAME_ERROR),
        (DecodeError::UnknownFrameType(9), code::FRAME_ERROR),
        (DecodeError::BadHeartbeat(1), code::FRAME_ERROR),
        (
            DecodeError::BadMethod {
                channel: 1,
                reason: "x".into(),
            },
            code::FRAME_ERROR,
        ),
        (
            DecodeError::BadHeader {
                channel: 1,
                reason: "x".into(),
            },
            code::FRAME_ERROR,
        ),
        (DecodeError::HeartbeatOnChannel(1), code::UNEXPECTED_FRAME),
    ];
    for (err, expected) in cases {
        let e = Exception::from(err.clone());
        assert!(e.hard, "{err:?} must close the connection");
        assert_eq!(e.code, expected, "{err:?}");
        assert!(e.reply_text().starts_with(code::name(expected)));
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzzing on the stable toolchain
// ---------------------------------------------------------------------------------------------

/// Decodes `stream` fed in `chunk`-sized pieces, as a socket would deliver it, checking the
/// decoder's contract at each step. Returns the frames' sizes and the error it stopped on.
fn decode_stream(
    stream: &[u8],
    frame_max: usize,
    chunk: usize,
) -> (Vec<usize>, Option<DecodeError>) {
    let mut sizes = Vec::new();
    let mut buf = BytesMut::new();
    for part in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(part);
        loop {
            let before = buf.clone();
            match decode_frame(&mut buf, frame_max) {
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) consumed bytes");
                    break;
                }
                Ok(Some(frame)) => {
                    let used = before.len() - buf.len();
                    assert!((8..=frame_max).contains(&used), "frame of {used} bytes");
                    assert_eq!(before[used - 1], FRAME_END);
                    assert_eq!(&before[used..], &buf[..]);
                    if let Frame::Method(c, m) = &frame {
                        // Whatever decodes must re-encode to something that decodes the same way.
                        let again = encode_method(*c, m);
                        let mut again_buf = again.clone();
                        match decode_frame(&mut again_buf, NO_LIMIT) {
                            Ok(Some(Frame::Method(c2, m2))) => {
                                assert_eq!(c2, *c);
                                assert_eq!(encode_method(c2, &m2), again);
                            }
                            other => panic!("{m:?} re-encodes to {other:?}"),
                        }
                    }
                    sizes.push(used);
                }
                Err(err) => {
                    let e = Exception::from(err.clone());
                    assert!(e.hard && (500..600).contains(&e.code));
                    return (sizes, Some(err));
                }
            }
        }
    }
    (sizes, None)
}

/// A random mutation of a byte stream.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => (any::<prop::sample::Index>(), vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>()).prop_map(|(i, j)| Mutation::Remove(i, j)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Insert(i, b) => {
            let i = i.index(bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Remove(i, j) => {
            let (a, b) = (i.index(bytes.len()), j.index(bytes.len()));
            bytes.drain(a.min(b)..a.max(b));
        }
    }
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Random bytes: never a panic, and chunked decoding agrees with whole-buffer decoding.
    #[test]
    fn random_bytes_never_panic(
        stream in vec(any::<u8>(), 0..512),
        frame_max in 8usize..2048,
        chunk in 1usize..64,
    ) {
        let whole = decode_stream(&stream, frame_max, stream.len());
        let chunked = decode_stream(&stream, frame_max, chunk);
        prop_assert_eq!(whole, chunked);
    }

    /// Mostly-valid streams (a few methods and content frames, then mutated) reach deep into the
    /// method and property parsers.
    #[test]
    fn mutated_frames_never_panic(
        methods in vec((0u16..4, any_method()), 1..4),
        props in properties(),
        body in vec(any::<u8>(), 0..64),
        mutations in vec(mutation(), 1..4),
        chunk in 1usize..64,
    ) {
        let mut encoder = Encoder::default();
        for (channel, method) in &methods {
            encoder.method(*channel, method);
        }
        encoder.content(1, &gen_props(&props), &body, 4096);
        let mut stream = encoder.take().to_vec();
        for m in &mutations {
            apply(&mut stream, m);
        }
        let frame_max = 1 << 20;
        let whole = decode_stream(&stream, frame_max, stream.len());
        let chunked = decode_stream(&stream, frame_max, chunk);
        prop_assert_eq!(whole, chunked);
    }
}
