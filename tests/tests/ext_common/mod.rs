//! Helpers shared by the `ext_*` tests of RabbitMQ's protocol extensions (lapin 4): bounded
//! waits, declaring with arguments, publishing, reading AMQP errors and `x-death` headers.
#![allow(dead_code)]

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};
use warren_gateway::ServerHandle;

/// The basics (bounded waits, connecting, reading AMQP errors) are the lapin suite's.
#[path = "../common/mod.rs"]
mod base;
#[allow(unused_imports)]
pub use base::{amqp_error, channel, connect, expect_code, setup, within, STEP};

/// How long we watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// A field table from `(key, value)` pairs.
pub fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// An AMQP long string value, the type RabbitMQ uses for text in headers and arguments.
pub fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Declares a transient, non-exclusive queue with `args`.
pub async fn declare(ch: &Channel, name: &str, args: FieldTable) -> lapin::Queue {
    within(ch.queue_declare(name.into(), QueueDeclareOptions::default(), args))
        .await
        .unwrap_or_else(|e| panic!("declare queue {name}: {e}"))
}

pub async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: lapin::ExchangeKind,
    args: FieldTable,
) {
    within(ch.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), args))
        .await
        .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"))
}

pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    within(ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key}: {e}"))
}

/// Publishes and waits for the confirm (`NotRequested` on a channel without confirms).
pub async fn publish_props(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Confirmation {
    within(async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("publisher confirm")
    })
    .await
}

pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) -> Confirmation {
    publish_props(
        ch,
        exchange,
        key,
        body.as_bytes(),
        BasicProperties::default(),
    )
    .await
}

/// basic.get with auto-ack.
pub async fn get(ch: &Channel, queue: &str) -> Option<BasicGetMessage> {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap_or_else(|e| panic!("basic.get from {queue}: {e}"))
}

pub async fn get_body(ch: &Channel, queue: &str) -> Option<String> {
    get(ch, queue).await.map(|m| body(&m.delivery))
}

/// Drains `queue` with basic.get (auto-ack) and returns the bodies in order.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(b) = get_body(ch, queue).await {
        out.push(b);
    }
    out
}

pub fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

/// The ready-message count of `queue`, by passive declare.
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    passive(ch, queue)
        .await
        .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
        .message_count()
}

pub async fn passive(ch: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

pub async fn consume_args(
    ch: &Channel,
    queue: &str,
    tag: &str,
    options: BasicConsumeOptions,
    args: FieldTable,
) -> Consumer {
    within(ch.basic_consume(queue.into(), tag.into(), options, args))
        .await
        .unwrap_or_else(|e| panic!("consume from {queue}: {e}"))
}

pub async fn consume(ch: &Channel, queue: &str, tag: &str) -> Consumer {
    consume_args(
        ch,
        queue,
        tag,
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// The next delivery of `consumer`, failing the test if none comes within [`STEP`].
pub async fn next(consumer: &mut Consumer) -> Delivery {
    within(consumer.next())
        .await
        .expect("consumer stream ended")
        .expect("delivery")
}

/// Asserts that `consumer` gets nothing for [`QUIET`].
pub async fn assert_no_delivery(consumer: &mut Consumer) {
    if let Ok(Some(d)) = tokio::time::timeout(QUIET, consumer.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            d.map(|d| String::from_utf8_lossy(&d.data).into_owned())
        );
    }
}

pub async fn ack(d: &Delivery) {
    let sent = within(d.ack(BasicAckOptions::default()))
        .await
        .expect("basic.ack");
    assert!(
        sent,
        "the delivery was already acknowledged or its channel is gone"
    );
}

/// After a method the server answers only by closing the channel (a publish), sends a
/// synchronous method: the server handles frames in order, so lapin fails it with the channel's
/// error. Returns that error's code and text.
pub async fn channel_error_after(ch: &Channel) -> (u16, String) {
    let result = within(ch.exchange_declare(
        "amq.direct".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let err = result.expect_err("the channel should have been closed by the server");
    amqp_error(&err).unwrap_or_else(|| panic!("expected an AMQP channel error, got {err:?}"))
}

/// Publishes on `ch`, switched to confirm mode first, a message the server must refuse by
/// closing the channel; returns the channel error's code and text. (The pending confirm fails
/// with the channel's error, with no race against the close arriving.)
pub async fn publish_refused(
    ch: &Channel,
    exchange: &str,
    key: &str,
    props: BasicProperties,
) -> (u16, String) {
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let result = within(async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"refused",
            props,
        )
        .await?
        .await
    })
    .await;
    let err = result.expect_err("the server should have closed the channel");
    amqp_error(&err).unwrap_or_else(|| panic!("expected an AMQP channel error, got {err:?}"))
}

/// A header value of `props`.
pub fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(key)
}

/// The text of a string-typed field value.
pub fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => panic!("expected a string value, got {other:?}"),
    }
}

/// The `x-death` header: an array of tables, most recent death first. Panics if it is missing or
/// not of that shape.
pub fn x_death(props: &BasicProperties) -> Vec<FieldTable> {
    match header(props, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .map(|v| match v {
                AMQPValue::FieldTable(t) => t.clone(),
                other => panic!("x-death entry is not a table: {other:?}"),
            })
            .collect(),
        other => panic!("x-death should be an array of tables, got {other:?}"),
    }
}

/// One expected `x-death` entry.
pub struct Death<'a> {
    pub count: i64,
    pub reason: &'a str,
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_keys: &'a [&'a str],
}

/// Checks an `x-death` entry field by field with RabbitMQ's types: `count` a signed 64-bit
/// integer, `time` a timestamp close to now, text as long strings, `routing-keys` an array.
#[track_caller]
pub fn assert_death(entry: &FieldTable, want: &Death<'_>) {
    let e = entry.inner();
    let field = |k: &str| {
        e.get(k)
            .unwrap_or_else(|| panic!("x-death entry lacks '{k}': {entry:?}"))
    };
    assert_eq!(
        field("count"),
        &AMQPValue::LongLongInt(want.count),
        "x-death count"
    );
    assert_eq!(field("reason"), &ls(want.reason), "x-death reason");
    assert_eq!(field("queue"), &ls(want.queue), "x-death queue");
    assert_eq!(field("exchange"), &ls(want.exchange), "x-death exchange");
    let keys: Vec<AMQPValue> = want.routing_keys.iter().map(|k| ls(k)).collect();
    assert_eq!(
        field("routing-keys"),
        &AMQPValue::FieldArray(keys.into()),
        "x-death routing-keys"
    );
    match field("time") {
        AMQPValue::Timestamp(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_secs();
            assert!(
                t.abs_diff(now) <= 60,
                "x-death time {t} should be seconds since the epoch, now is {now}"
            );
        }
        other => panic!("x-death time should be a timestamp, got {other:?}"),
    }
}

/// Asserts a header is the long string `value`.
#[track_caller]
pub fn assert_header(props: &BasicProperties, key: &str, value: &str) {
    assert_eq!(header(props, key), Some(&ls(value)), "header {key}");
}

pub fn short(s: &str) -> ShortString {
    s.into()
}

/// Closes the connection and stops the server, each step bounded.
pub async fn finish(server: ServerHandle, conn: Connection) {
    within(conn.close(200, "bye".into())).await.ok();
    within(server.shutdown()).await;
}
