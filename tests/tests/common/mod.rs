//! Helpers shared by the lapin end-to-end tests: connecting, bounded waits, and reading the AMQP
//! error a failed operation carries.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use warren_gateway::ServerHandle;

/// How long any single step may take before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(5);
/// How long we watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(250);

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(STEP, fut)
        .await
        .expect("step timed out: the server did not answer")
}

pub async fn connect(server: &ServerHandle) -> Connection {
    within(Connection::connect(
        &warren_tests::amqp_url(server),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect as guest/guest")
}

pub async fn channel(conn: &Connection) -> Channel {
    within(conn.create_channel()).await.expect("open a channel")
}

/// A server, one connection to it and one channel on that connection.
pub async fn setup() -> (ServerHandle, Connection, Channel) {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let ch = channel(&conn).await;
    (server, conn, ch)
}

/// The reply code and text of an AMQP error (channel.close or connection.close from the server).
pub fn amqp_error(err: &lapin::Error) -> Option<(u16, String)> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some((e.get_id(), e.get_message().to_string())),
        _ => None,
    }
}

/// Asserts that `result` failed with AMQP reply `code` and returns the reply text.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(result: lapin::Result<T>, code: u16) -> String {
    match result {
        Ok(v) => panic!("expected AMQP error {code}, got success: {v:?}"),
        Err(e) => match amqp_error(&e) {
            Some((got, text)) => {
                assert_eq!(got, code, "wrong reply code; reply text: {text}");
                text
            }
            None => panic!("expected AMQP error {code}, got {e:?}"),
        },
    }
}

/// Declares a transient, non-exclusive queue named `name` and returns its declare-ok counts.
pub async fn declare_queue(ch: &Channel, name: &str) -> lapin::Queue {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("declare queue {name}: {e}"))
}

/// A server-named exclusive queue.
pub async fn declare_anon_queue(ch: &Channel) -> String {
    let q = within(ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare a server-named queue");
    q.name().to_string()
}

pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    bind_with(ch, queue, exchange, key, FieldTable::default()).await
}

pub async fn bind_with(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        args,
    ))
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key}: {e}"))
}

/// Publishes and, on a channel in confirm mode, waits for the confirm.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    publish_with(ch, exchange, key, body, BasicProperties::default()).await
}

pub async fn publish_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
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
    .await;
}

/// Publishes `bodies` to the default exchange with `queue` as routing key. The server handles
/// a connection's frames in order, so anything later on the same connection sees them enqueued.
pub async fn fill(ch: &Channel, queue: &str, bodies: &[&str]) {
    for b in bodies {
        publish(ch, "", queue, b.as_bytes()).await;
    }
}

pub async fn consume(ch: &Channel, queue: &str, tag: &str) -> Consumer {
    consume_with(ch, queue, tag, BasicConsumeOptions::default()).await
}

pub async fn consume_with(
    ch: &Channel,
    queue: &str,
    tag: &str,
    options: BasicConsumeOptions,
) -> Consumer {
    within(ch.basic_consume(queue.into(), tag.into(), options, FieldTable::default()))
        .await
        .unwrap_or_else(|e| panic!("consume from {queue}: {e}"))
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

/// basic.get with auto-ack; `None` on get-empty.
pub async fn get_body(ch: &Channel, queue: &str) -> Option<String> {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
}

/// Drains `queue` with basic.get (auto-ack) and returns the bodies in order.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(b) = get_body(ch, queue).await {
        out.push(b);
    }
    out
}

/// The ready-message count of `queue`, by passive declare.
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
    .message_count()
}

/// Watches a connection for the errors lapin reports on its own (a channel the server closed
/// after a method that has no reply, like a publish to a missing exchange or a bad ack). Create
/// it before the offending method: lapin only reports errors to listeners that already exist.
pub struct ErrorWatch(std::pin::Pin<Box<dyn futures_lite::Stream<Item = lapin::Event> + Send>>);

impl ErrorWatch {
    pub fn new(conn: &Connection) -> ErrorWatch {
        ErrorWatch(Box::pin(conn.events_listener()))
    }

    /// The code and text of the next AMQP error on the connection.
    pub async fn next_error(&mut self) -> (u16, String) {
        within(async {
            loop {
                match self.0.next().await {
                    Some(lapin::Event::Error(e)) => {
                        if let Some(found) = amqp_error(&e) {
                            return found;
                        }
                    }
                    Some(_) => {}
                    None => panic!("the connection's event stream ended without an error"),
                }
            }
        })
        .await
    }
}
