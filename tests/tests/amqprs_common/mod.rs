//! Shared helpers for the amqprs end-to-end tests: connecting, a recording channel callback, a
//! recording consumer, and timeouts so that a missing server reply fails a test instead of
//! hanging it.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::consumer::AsyncConsumer;
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Deliver, Nack, Return};
use async_trait::async_trait;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use warren_gateway::ServerHandle;

/// How long any single server interaction may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long we watch for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

pub fn args(server: &ServerHandle, user: &str, password: &str) -> OpenConnectionArguments {
    let addr = server.local_addr();
    OpenConnectionArguments::new("127.0.0.1", addr.port(), user, password)
}

/// Opens a guest/guest connection to `server`.
pub async fn connect(server: &ServerHandle) -> Connection {
    within(
        "connection.open",
        Connection::open(&args(server, "guest", "guest")),
    )
    .await
    .expect("connect as guest/guest")
}

/// Opens a guest/guest connection with a recording connection callback.
pub async fn connect_recording(
    server: &ServerHandle,
) -> (Connection, UnboundedReceiver<ConnEvent>) {
    let conn = connect(server).await;
    let (tx, rx) = unbounded_channel();
    conn.register_callback(ConnRecorder(tx))
        .await
        .expect("register connection callback");
    (conn, rx)
}

/// Opens a channel and registers a [`Recorder`] callback on it.
pub async fn channel(conn: &Connection) -> (Channel, UnboundedReceiver<ChanEvent>) {
    let ch = within("channel.open", conn.open_channel(None))
        .await
        .expect("open channel");
    let (tx, rx) = unbounded_channel();
    ch.register_callback(Recorder(tx))
        .await
        .expect("register channel callback");
    (ch, rx)
}

/// A channel in confirm mode, with its recorder.
pub async fn confirm_channel(conn: &Connection) -> (Channel, UnboundedReceiver<ChanEvent>) {
    let (ch, rx) = channel(conn).await;
    within(
        "confirm.select-ok",
        ch.confirm_select(ConfirmSelectArguments::default()),
    )
    .await
    .expect("confirm.select");
    (ch, rx)
}

/// Declares a plain (non-durable, non-exclusive, non-auto-delete) queue.
pub async fn declare_queue(ch: &Channel, name: &str) -> String {
    let (q, messages, consumers) = within(
        "queue.declare-ok",
        ch.queue_declare(QueueDeclareArguments::new(name)),
    )
    .await
    .expect("queue.declare")
    .expect("declare-ok (not no-wait)");
    assert_eq!(q, name);
    assert_eq!((messages, consumers), (0, 0), "fresh queue '{name}'");
    q
}

/// (message_count, consumer_count) of a queue, through a passive declare.
pub async fn queue_counts(ch: &Channel, name: &str) -> (u32, u32) {
    let (q, messages, consumers) = within(
        "passive queue.declare-ok",
        ch.queue_declare(QueueDeclareArguments::new(name).passive(true).finish()),
    )
    .await
    .expect("passive queue.declare")
    .expect("declare-ok");
    assert_eq!(q, name);
    (messages, consumers)
}

pub async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: impl Into<Vec<u8>>) {
    publish_with(ch, exchange, routing_key, BasicProperties::default(), body).await
}

pub async fn publish_with(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    props: BasicProperties,
    body: impl Into<Vec<u8>>,
) {
    within(
        "basic.publish",
        ch.basic_publish(
            props,
            body.into(),
            BasicPublishArguments::new(exchange, routing_key),
        ),
    )
    .await
    .expect("basic.publish");
}

/// Receives the next item or fails after [`WAIT`].
pub async fn next<T>(rx: &mut UnboundedReceiver<T>, what: &str) -> T {
    within(what, rx.recv())
        .await
        .unwrap_or_else(|| panic!("{what}: sender dropped"))
}

/// Asserts nothing arrives within [`QUIET`].
pub async fn assert_quiet<T: std::fmt::Debug>(rx: &mut UnboundedReceiver<T>, what: &str) {
    if let Ok(Some(item)) = tokio::time::timeout(QUIET, rx.recv()).await {
        panic!("{what}: unexpected {item:?}");
    }
}

/// What the server told a channel through its callback.
#[derive(Debug)]
pub enum ChanEvent {
    Close {
        code: u16,
        text: String,
        class_id: u16,
        method_id: u16,
    },
    Cancel {
        consumer_tag: String,
    },
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
    },
    Return {
        code: u16,
        text: String,
        exchange: String,
        routing_key: String,
        props: Box<BasicProperties>,
        body: Vec<u8>,
    },
}

/// A channel callback that forwards everything to a test.
pub struct Recorder(pub UnboundedSender<ChanEvent>);

#[async_trait]
impl ChannelCallback for Recorder {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(ChanEvent::Close {
            code: close.reply_code(),
            text: close.reply_text().clone(),
            class_id: close.class_id(),
            method_id: close.method_id(),
        });
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(ChanEvent::Cancel {
            consumer_tag: cancel.consumer_tag().clone(),
        });
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        let _ = self.0.send(ChanEvent::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        let _ = self.0.send(ChanEvent::Nack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        props: BasicProperties,
        body: Vec<u8>,
    ) {
        let _ = self.0.send(ChanEvent::Return {
            code: ret.reply_code(),
            text: ret.reply_text().clone(),
            exchange: ret.exchange().clone(),
            routing_key: ret.routing_key().clone(),
            props: Box::new(props),
            body,
        });
    }
}

/// What the server told the connection.
#[derive(Debug)]
pub enum ConnEvent {
    Close { code: u16, text: String },
}

pub struct ConnRecorder(pub UnboundedSender<ConnEvent>);

#[async_trait]
impl ConnectionCallback for ConnRecorder {
    async fn close(
        &mut self,
        _connection: &Connection,
        close: Close,
    ) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(ConnEvent::Close {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Ok(())
    }

    async fn blocked(&mut self, _connection: &Connection, _reason: String) {}

    async fn unblocked(&mut self, _connection: &Connection) {}

    async fn secret_updated(&mut self, _connection: &Connection) {}
}

/// Waits until every publish sequence number 1..=n is confirmed, failing on a nack, a channel
/// close or a timeout. Returns the events that were not acks (e.g. returns), in arrival order.
pub async fn await_confirms(rx: &mut UnboundedReceiver<ChanEvent>, n: u64) -> Vec<ChanEvent> {
    await_confirms_after(rx, 0, n).await
}

/// Like [`await_confirms`] when sequence numbers up to `already` were confirmed before.
pub async fn await_confirms_after(
    rx: &mut UnboundedReceiver<ChanEvent>,
    already: u64,
    n: u64,
) -> Vec<ChanEvent> {
    let mut confirmed = vec![false; n as usize + 1];
    for c in confirmed.iter_mut().take(already as usize + 1) {
        *c = true;
    }
    let mut floor = already; // every tag <= floor is confirmed
    let mut others = Vec::new();
    while floor < n {
        match next(
            rx,
            &format!("publisher confirms (all up to {floor} of {n} so far)"),
        )
        .await
        {
            ChanEvent::Ack { tag, multiple } => {
                assert!(
                    tag > already && tag <= n,
                    "ack for unexpected publish sequence {tag}"
                );
                if multiple {
                    for c in confirmed.iter_mut().take(tag as usize + 1) {
                        *c = true;
                    }
                } else {
                    assert!(!confirmed[tag as usize], "publish {tag} acked twice");
                    confirmed[tag as usize] = true;
                }
                while floor < n && confirmed[floor as usize + 1] {
                    floor += 1;
                }
            }
            ChanEvent::Nack { tag, .. } => panic!("publish {tag} was nacked"),
            ev @ ChanEvent::Close { .. } => {
                panic!("channel closed while awaiting confirms: {ev:?}")
            }
            other => others.push(other),
        }
    }
    others
}

/// One message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub consumer_tag: String,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: String,
    pub routing_key: String,
    pub props: BasicProperties,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An `AsyncConsumer` that forwards each delivery to the test and never acks by itself.
pub struct RecordingConsumer(pub UnboundedSender<Delivery>);

impl RecordingConsumer {
    pub fn new() -> (RecordingConsumer, UnboundedReceiver<Delivery>) {
        let (tx, rx) = unbounded_channel();
        (RecordingConsumer(tx), rx)
    }
}

#[async_trait]
impl AsyncConsumer for RecordingConsumer {
    async fn consume(
        &mut self,
        _channel: &Channel,
        deliver: Deliver,
        props: BasicProperties,
        body: Vec<u8>,
    ) {
        let _ = self.0.send(Delivery {
            consumer_tag: deliver.consumer_tag().clone(),
            delivery_tag: deliver.delivery_tag(),
            redelivered: deliver.redelivered(),
            exchange: deliver.exchange().clone(),
            routing_key: deliver.routing_key().clone(),
            props,
            body,
        });
    }
}

/// A unique-enough name for test entities (each test has its own server anyway).
pub fn name(prefix: &str) -> String {
    format!("amqprs-{prefix}")
}
