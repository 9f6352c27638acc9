//! The RabbitMQ bridge against a real RabbitMQ.
//!
//! Needs `WARREN_TEST_RABBITMQ_URL`: `scripts/test.sh` starts a private node with
//! `scripts/rabbitmq.sh start` and exports it. Run by hand:
//!
//! ```sh
//! scripts/rabbitmq.sh start
//! WARREN_TEST_RABBITMQ_URL=$(scripts/rabbitmq.sh url) cargo test -p warren-bridges
//! scripts/rabbitmq.sh stop
//! ```
//!
//! Every test fails (never skips) when the variable is unset or the broker unreachable. The
//! restart test restarts that node with `scripts/rabbitmq.sh restart`; a file lock keeps the
//! other tests (in this process or, under nextest, in others) off the broker meanwhile.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use warren_backends::{Backend, BackendError, Health, Message, Settlement};
use warren_bridges::rabbitmq::RabbitmqBridge;
use warren_config::file::{BackendConfig, RabbitmqBackend, RetryConfig};

// --- the broker ------------------------------------------------------------------------------

fn url() -> String {
    support::env_url("WARREN_TEST_RABBITMQ_URL", "rabbitmq", "RabbitMQ")
}

fn broker_lock(exclusive: bool) -> File {
    support::broker_lock("rabbitmq", exclusive)
}

async fn connect() -> Connection {
    support::init_logs();
    let url = url();
    match tokio::time::timeout(
        Duration::from_secs(20),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "RabbitMQ at {url} is unreachable: {e} (is `scripts/rabbitmq.sh start` running?)"
        ),
        Err(_) => panic!("RabbitMQ at {url} did not answer within 20s"),
    }
}

fn config(max_in_flight: usize, retry: RetryConfig) -> RabbitmqBackend {
    RabbitmqBackend {
        url: url(),
        max_in_flight,
        retry,
    }
}

fn retry(max_attempts: u32, initial_backoff_ms: u64, max_backoff_ms: u64) -> RetryConfig {
    RetryConfig {
        max_attempts,
        initial_backoff_ms,
        max_backoff_ms,
    }
}

/// A direct exchange bound to a queue with routing key `key`.
async fn exchange_and_queue(
    ch: &lapin::Channel,
    exchange: &str,
    queue: &str,
    key: &str,
    durable: bool,
) {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Deletes what a test declared and closes its connection (a connection left to the runtime's
/// shutdown makes lapin's I/O thread complain).
async fn cleanup(conn: &Connection, ch: &lapin::Channel, exchanges: &[&str], queues: &[&str]) {
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let _ = ch
            .exchange_delete((*e).into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Every message in `queue`, taken with basic.get until it is empty.
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut all = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        all.push(m);
    }
    all
}

// --- guards that record what happened ---------------------------------------------------------

use support::{broker_script, next, unique, wait_health, Outcomes};

fn message(routing_key: &str, properties: BasicProperties, body: impl Into<Bytes>) -> Message {
    Message::new(
        "warren-in".into(),
        routing_key.into(),
        properties,
        body.into(),
    )
}

fn full_properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    headers.insert("x-count".into(), AMQPValue::LongInt(42));
    headers.insert("x-flag".into(), AMQPValue::Boolean(true));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(3)
        .with_correlation_id("corr-7".into())
        .with_reply_to("replies".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
}

// --- tests ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_arrive_upstream_with_every_property() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (exchange, queue) = (unique("props.ex"), unique("props.q"));
    exchange_and_queue(&ch, &exchange, &queue, "orders.eu", false).await;

    let backend = warren_bridges::build(
        "upstream",
        &BackendConfig::Rabbitmq(config(100, RetryConfig::default())),
    )
    .expect("build");
    let outcomes = Arc::new(Outcomes::default());
    backend.publish(
        &exchange,
        message("orders.eu", full_properties(), &b"{\"id\":1}"[..]),
        outcomes.guard(0),
    );
    // A user-id that is not the connection's user is dropped (RabbitMQ would refuse it), and a
    // message without a message-id gets one.
    backend.publish(
        &exchange,
        message(
            "orders.eu",
            BasicProperties::default().with_user_id("mallory".into()),
            &b"second"[..],
        ),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(30)).await;
    assert!(
        outcomes.failed.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.failed.lock().unwrap()
    );
    assert_eq!(backend.health(), Health::Ready);
    assert_eq!(backend.depth(&queue).await.unwrap(), Some(2));

    let got = drain(&ch, &queue).await;
    assert_eq!(got.len(), 2);
    let first = &got[0].delivery;
    assert_eq!(first.exchange.as_str(), exchange);
    assert_eq!(first.routing_key.as_str(), "orders.eu");
    assert_eq!(first.data, b"{\"id\":1}");
    assert_eq!(
        first.properties,
        full_properties(),
        "every property arrives as published"
    );
    let second = &got[1].delivery;
    assert_eq!(second.data, b"second");
    assert_eq!(second.properties.user_id(), &None);
    let id = second
        .properties
        .message_id()
        .clone()
        .expect("a message-id was set");
    assert!(id.as_str().starts_with("warren-"), "{id}");

    // declare: passive checks of exchanges and queues; nothing is created.
    backend.declare(&exchange).await.unwrap();
    backend.declare(&queue).await.unwrap();
    backend.declare("").await.unwrap();
    let missing = unique("missing");
    let declared = backend.declare(&missing).await;
    assert!(
        matches!(declared, Err(BackendError::NotFound { .. })),
        "{declared:?}"
    );
    let depth = backend.depth(&missing).await;
    assert!(
        matches!(depth, Err(BackendError::NotFound { .. })),
        "{depth:?}"
    );
    assert_eq!(backend.depth(&queue).await.unwrap(), Some(0));

    backend.close().await;
    assert_eq!(backend.health(), Health::Closed);
    let after = Arc::new(Outcomes::default());
    backend.publish(
        &exchange,
        message("orders.eu", Default::default(), &b"late"[..]),
        after.guard(9),
    );
    after.wait_done(1, Duration::from_secs(1)).await;
    assert_eq!(
        after.failed.lock().unwrap().len(),
        1,
        "a publish after close fails"
    );
    cleanup(&conn, &ch, &[&exchange], &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_settle_with_ack_requeue_and_reject() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (dlx, dead, source) = (unique("sub.dlx"), unique("sub.dead"), unique("sub.src"));
    exchange_and_queue(&ch, &dlx, &dead, "", false).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dlx.as_str())),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    ch.queue_declare(source.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    for body in ["ack-me", "requeue-me", "reject-me"] {
        ch.basic_publish(
            "".into(),
            source.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default()
                .with_message_id(body.into())
                .with_content_type("text/plain".into())
                .with_headers({
                    let mut h = FieldTable::default();
                    h.insert(
                        "x-body".into(),
                        AMQPValue::LongString(LongString::from(body)),
                    );
                    h
                }),
        )
        .await
        .unwrap();
    }

    let bridge = RabbitmqBridge::start("upstream", &config(100, RetryConfig::default())).unwrap();
    let refused = bridge.subscribe(&unique("no-such-queue"), 10).await.err();
    assert!(
        matches!(refused, Some(BackendError::NotFound { .. })),
        "{refused:?}"
    );
    let mut sub = bridge.subscribe(&source, 10).await.unwrap();
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    let c = next(&mut sub).await;
    assert_eq!(&a.message.body(), b"ack-me");
    assert_eq!(a.message.routing_key(), source);
    assert_eq!(a.message.exchange(), "");
    assert_eq!(
        a.message
            .properties()
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("ack-me")
    );
    assert_eq!(
        a.message
            .properties()
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("text/plain")
    );
    assert!(a.message.headers().unwrap().inner().contains_key("x-body"));
    assert!(!a.redelivered);
    assert_eq!(&b.message.body(), b"requeue-me");
    assert_eq!(&c.message.body(), b"reject-me");

    a.settle.settle(Settlement::Ack);
    b.settle.settle(Settlement::Requeue);
    c.settle.settle(Settlement::Reject);

    let again = next(&mut sub).await;
    assert_eq!(&again.message.body(), b"requeue-me", "requeue redelivers");
    assert!(again.redelivered);
    again.settle.settle(Settlement::Ack);

    // Reject dead-lettered the third one; the source is empty once the acks landed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = ch
            .queue_declare(
                dead.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if q.message_count() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rejected message was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead_letters = drain(&ch, &dead).await;
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(dead_letters[0].delivery.data, b"reject-me");
    // Nothing else is waiting or unacked: once the subscription's channel closes, an unacked
    // message would come back as ready.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "no further delivery"
    );

    bridge.close().await;
    let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("next() ends after close");
    assert!(end.is_none(), "next() returns None after close()");
    drop(sub);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        bridge.depth(&source).await.err(),
        Some(BackendError::Closed {
            backend: "upstream".into()
        })
    );
    let q = ch
        .queue_declare(
            source.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0, "acked and rejected messages are gone");
    cleanup(&conn, &ch, &[&dlx], &[&source, &dead]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_publishes_are_pipelined_and_all_confirmed() {
    let _lock = broker_lock(false);
    const N: usize = 5_000;
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (exchange, queue) = (unique("many.ex"), unique("many.q"));
    exchange_and_queue(&ch, &exchange, &queue, "k", false).await;

    let bridge = RabbitmqBridge::start("upstream", &config(1_000, RetryConfig::default())).unwrap();
    wait_health(&*bridge, Health::Ready, Duration::from_secs(20)).await;
    let outcomes = Arc::new(Outcomes::default());
    let started = Instant::now();
    for i in 0..N {
        bridge.publish(
            &exchange,
            message("k", BasicProperties::default(), i.to_string()),
            outcomes.guard(i),
        );
    }
    let queued = started.elapsed();
    outcomes.wait_done(N, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert_eq!(outcomes.confirmed.lock().unwrap().len(), N);
    let stats = bridge.stats();
    let peak = stats.peak_in_flight.load(Ordering::Relaxed);
    eprintln!(
        "pipelined {N} publishes: publish() calls took {queued:?}, all confirmed after {elapsed:?} \
         ({:.0} msg/s), peak in flight {peak}",
        N as f64 / elapsed.as_secs_f64()
    );
    assert!(
        queued < Duration::from_secs(2),
        "publish() must not wait for RabbitMQ ({queued:?} for {N})"
    );
    assert!(
        peak > 100,
        "publishes are pipelined, not one round trip each (peak {peak})"
    );
    assert_eq!(stats.confirmed.load(Ordering::Relaxed), N as u64);
    assert_eq!(bridge.depth(&queue).await.unwrap(), Some(N as u32 as u64));

    // In publish order.
    let got = drain(&ch, &queue).await;
    let bodies: Vec<usize> = got
        .iter()
        .map(|m| {
            std::str::from_utf8(&m.delivery.data)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let first_out_of_order = bodies.iter().enumerate().find(|(i, b)| *i != **b);
    assert!(
        first_out_of_order.is_none(),
        "not in publish order: position {first_out_of_order:?}, around {:?}",
        &bodies[first_out_of_order
            .map(|(i, _)| i.saturating_sub(2))
            .unwrap_or(0)..][..5.min(bodies.len())]
    );
    bridge.close().await;
    cleanup(&conn, &ch, &[&exchange], &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_missing_exchange_fails_after_its_attempts_and_poisons_nothing() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (exchange, queue) = (unique("bad.ex"), unique("bad.q"));
    exchange_and_queue(&ch, &exchange, &queue, "k", false).await;

    let bridge = RabbitmqBridge::start("upstream", &config(100, retry(2, 50, 200))).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let missing = unique("no-such-exchange");
    bridge.publish(
        &missing,
        message("k", Default::default(), &b"lost"[..]),
        outcomes.guard(0),
    );
    for i in 1..=20 {
        bridge.publish(
            &exchange,
            message("k", Default::default(), i.to_string()),
            outcomes.guard(i),
        );
    }
    // RabbitMQ refuses this expiration by closing the channel: failed at once, never sent.
    bridge.publish(
        &exchange,
        message(
            "k",
            BasicProperties::default().with_expiration("soon".into()),
            &b"x"[..],
        ),
        outcomes.guard(99),
    );
    outcomes.wait_done(22, Duration::from_secs(30)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    let ids: HashSet<usize> = failed.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, HashSet::from([0, 99]), "{failed:?}");
    let (_, reason) = failed.iter().find(|(id, _)| *id == 0).unwrap();
    assert!(reason.contains("gave up after 2 attempts"), "{reason}");
    assert!(reason.contains("does not exist"), "{reason}");
    assert_eq!(outcomes.confirmed.lock().unwrap().len(), 20);
    assert_eq!(bridge.depth(&queue).await.unwrap(), Some(20));
    assert_eq!(bridge.health(), Health::Ready);
    assert_eq!(
        bridge.stats().connections.load(Ordering::Relaxed),
        1,
        "a missing exchange never cost the connection"
    );
    bridge.close().await;
    cleanup(&conn, &ch, &[&exchange], &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_fails_publishes_after_their_attempts() {
    // Needs no broker, but checks the variable like every test here.
    let _ = url();
    let cfg = RabbitmqBackend {
        // Nothing listens on port 1.
        url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        max_in_flight: 10,
        retry: retry(3, 20, 50),
    };
    let bridge = RabbitmqBridge::start("down", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..5 {
        bridge.publish(
            "ex",
            message("k", Default::default(), &b"x"[..]),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(5, Duration::from_secs(20)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert_eq!(failed.len(), 5);
    assert!(failed[0].1.contains("cannot connect"), "{}", failed[0].1);
    assert!(
        matches!(bridge.health(), Health::Degraded(_)),
        "{:?}",
        bridge.health()
    );
    assert!(matches!(
        bridge.declare("ex").await,
        Err(BackendError::Connect { .. })
    ));
    bridge.close().await;
    assert_eq!(bridge.health(), Health::Closed);
}

/// Restarts the upstream while publishing: every message whose guard was released without a
/// failure must be in RabbitMQ afterwards (duplicates allowed and reported), and a
/// subscription resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restart_loses_no_confirmed_message() {
    let _lock = broker_lock(true);
    let (exchange, queue, resume) = (
        unique("restart.ex"),
        unique("restart.q"),
        unique("restart.sub"),
    );
    {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        exchange_and_queue(&ch, &exchange, &queue, "k", true).await;
        ch.queue_declare(
            resume.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let _ = conn.close(200, "OK".into()).await;
    }

    let bridge = RabbitmqBridge::start("upstream", &config(500, retry(0, 100, 1_000))).unwrap();
    wait_health(&*bridge, Health::Ready, Duration::from_secs(20)).await;

    // A subscription that must survive the restart.
    let mut sub = bridge.subscribe(&resume, 10).await.unwrap();
    bridge.publish(
        "",
        message(&resume, persistent(), &b"before"[..]),
        warren_backends::backend::no_wait(),
    );
    let before = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&before.message.body(), b"before");
    before.settle.settle(Settlement::Ack);

    let outcomes = Arc::new(Outcomes::default());
    let sent = std::cell::Cell::new(0usize);
    let burst = |n: usize| {
        for _ in 0..n {
            let i = sent.get();
            bridge.publish(
                &exchange,
                message("k", persistent(), i.to_string()),
                outcomes.guard(i),
            );
            sent.set(i + 1);
        }
    };
    // 1. A steady stream while all is well.
    for _ in 0..10 {
        burst(100);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 2. Restart the node and keep publishing hard until the bridge sees it go: publishes are
    //    in flight, unconfirmed, when the connection drops.
    let restart = tokio::task::spawn_blocking(|| broker_script("rabbitmq", &["restart"]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while bridge.health() == Health::Ready {
        assert!(
            Instant::now() < deadline,
            "the bridge never saw the node stop"
        );
        burst(100);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_stop = sent.get();
    // 3. Keep publishing, slowly, while the node is down and starting again.
    while !restart.is_finished() || bridge.health() != Health::Ready {
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "no reconnection"
        );
        burst(10);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_ready = sent.get();
    // 4. And a steady stream again.
    for _ in 0..10 {
        burst(100);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let n = sent.get();
    eprintln!("upstream restart: {at_stop} published before the bridge saw the node stop, {} while it was down, {n} in all", at_ready - at_stop);
    restart.await.unwrap();
    outcomes.wait_done(n, Duration::from_secs(120)).await;
    wait_health(&*bridge, Health::Ready, Duration::from_secs(30)).await;

    // The subscription resumed on its own.
    bridge.publish(
        "",
        message(&resume, persistent(), &b"after"[..]),
        warren_backends::backend::no_wait(),
    );
    let after = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("the subscription resumed after the restart")
        .unwrap();
    assert_eq!(&after.message.body(), b"after");
    after.settle.settle(Settlement::Ack);

    let confirmed: Vec<usize> = outcomes.confirmed.lock().unwrap().clone();
    let failed = outcomes.failed.lock().unwrap().clone();
    let stats = bridge.stats();

    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let got = consume_everything(&ch, &queue).await;
    let mut copies: BTreeMap<usize, usize> = BTreeMap::new();
    for m in &got {
        let i: usize = std::str::from_utf8(&m.data).unwrap().parse().unwrap();
        assert!(m.properties.message_id().is_some());
        *copies.entry(i).or_default() += 1;
    }
    let duplicates: usize = copies.values().map(|c| c - 1).sum();
    let lost: Vec<usize> = confirmed
        .iter()
        .copied()
        .filter(|i| !copies.contains_key(i))
        .collect();
    eprintln!(
        "upstream restart: sent {n}, confirmed {}, failed {}, found {} distinct ({} in the queue), \
         duplicates {duplicates}, resent {}, lost {}, connections {}",
        confirmed.len(),
        failed.len(),
        copies.len(),
        got.len(),
        stats.resent.load(Ordering::Relaxed),
        lost.len(),
        stats.connections.load(Ordering::Relaxed)
    );
    assert!(lost.is_empty(), "confirmed but not in RabbitMQ: {lost:?}");
    assert!(
        failed.is_empty(),
        "max_attempts 0 retries forever: {failed:?}"
    );
    assert_eq!(confirmed.len(), n);
    assert!(
        stats.connections.load(Ordering::Relaxed) >= 2,
        "the bridge reconnected"
    );

    bridge.close().await;
    drop(sub);
    cleanup(&conn, &ch, &[&exchange], &[&queue, &resume]).await;
}

/// Everything in `queue`, with a no-ack consumer (much faster than basic.get for thousands).
async fn consume_everything(ch: &lapin::Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    use futures_lite::StreamExt;
    let count = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count() as usize;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut all = Vec::with_capacity(count);
    while all.len() < count {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} messages consumed", all.len()))
            .expect("consumer open")
            .expect("delivery");
        all.push(delivery);
    }
    all
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}
