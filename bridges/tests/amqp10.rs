//! The AMQP 1.0 bridge against a real AMQP 1.0 peer: RabbitMQ with its `rabbitmq_amqp1_0`
//! plugin (enabled on the private test node by `scripts/rabbitmq.sh`).
//!
//! Needs `WARREN_TEST_RABBITMQ_URL` (`scripts/test.sh` exports it):
//!
//! ```sh
//! scripts/rabbitmq.sh start
//! WARREN_TEST_RABBITMQ_URL=$(scripts/rabbitmq.sh url) cargo test -p warren-bridges --test amqp10
//! ```
//!
//! Every test fails (never skips) without it. Queues are declared with lapin (AMQP 1.0 has no
//! declare); messages go out and come back through the bridge on both ends, since RabbitMQ's
//! own 0-9-1 ↔ 1.0 conversion drops headers. The shared file lock of `tests/rabbitmq.rs` keeps
//! these tests off the node while its restart test runs; the restart test here takes it
//! exclusively.

mod support;

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::*;
use lapin::types::{AMQPValue, DecimalValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_backends::{Backend, Health, Incoming, Message, Settlement, Subscription};
use warren_bridges::amqp10::Amqp10Bridge;
use warren_config::file::{Amqp10Backend, Amqp10Target, RetryConfig};

fn url() -> String {
    support::env_url(
        "WARREN_TEST_RABBITMQ_URL",
        "rabbitmq",
        "RabbitMQ with the AMQP 1.0 plugin",
    )
}

/// The AMQP 1.0 URL of the same listener: the 0-9-1 URL without its vhost.
fn amqp10_url() -> String {
    let u = url();
    let rest = u.split_once("://").map(|(_, r)| r).unwrap_or(&u);
    let authority = rest.split('/').next().unwrap();
    format!("amqp://{authority}")
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
        Ok(Err(e)) => panic!("RabbitMQ at {url} is unreachable: {e}"),
        Err(_) => panic!("RabbitMQ at {url} did not answer within 20s"),
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("warren.amqp10.{prefix}.{}.{nanos}", std::process::id())
}

fn config(max_in_flight: usize, retry: RetryConfig) -> Amqp10Backend {
    Amqp10Backend {
        url: Some(amqp10_url()),
        target: Some(Amqp10Target::Rabbitmq),
        max_in_flight,
        retry,
        ..Default::default()
    }
}

fn retry(max_attempts: u32, initial_backoff_ms: u64, max_backoff_ms: u64) -> RetryConfig {
    RetryConfig {
        max_attempts,
        initial_backoff_ms,
        max_backoff_ms,
    }
}

async fn declare(ch: &lapin::Channel, queue: &str, args: FieldTable) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

async fn depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

use support::{repo_root, Outcomes};

async fn wait_ready(bridge: &Amqp10Bridge) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while bridge.health() != Health::Ready {
        assert!(Instant::now() < deadline, "health: {:?}", bridge.health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next(sub: &mut Box<dyn Subscription>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("no message within 20s")
        .expect("subscription ended")
}

fn message(routing_key: &str, properties: BasicProperties, body: impl Into<Bytes>) -> Message {
    Message::new(
        "warren-in".into(),
        routing_key.into(),
        properties,
        body.into(),
    )
}

fn every_header() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongInt(-7));
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
    h.insert(
        "long".into(),
        AMQPValue::LongString(LongString::from("long ✓")),
    );
    h.insert(
        "array".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), AMQPValue::Boolean(false)].into()),
    );
    h.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("table".into(), AMQPValue::FieldTable(nested));
    h.insert(
        "bytes".into(),
        AMQPValue::ByteArray(vec![0u8, 255, 7].into()),
    );
    h.insert("void".into(), AMQPValue::Void);
    h
}

fn full_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(every_header())
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
        .with_cluster_id("c1".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_the_bridge_keeps_every_property() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("props");
    declare(&ch, &queue, FieldTable::default()).await;
    let address = format!("/amq/queue/{queue}");

    let bridge = Amqp10Bridge::start("amqp10-test", &config(100, retry(5, 50, 500))).unwrap();
    wait_ready(&bridge).await;
    let outcomes = Arc::new(Outcomes::default());
    let sent = message("orders.eu", full_properties(), &b"{\"id\":1}"[..]);
    bridge.publish(&address, sent.clone(), outcomes.guard(0));
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(
        outcomes.failed.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.failed
    );

    let mut sub = bridge.subscribe(&address, 10).await.unwrap();
    let got = next(&mut sub).await;
    assert!(!got.redelivered);
    assert_eq!(got.message.body(), sent.body());
    assert_eq!(got.message.routing_key(), "orders.eu");
    let (a, b) = (&sent.properties(), &got.message.properties());
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
    got.settle.settle(Settlement::Ack);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(depth(&ch, &queue).await, 0);
    drop(sub);
    bridge.close().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_ack_requeue_and_reject() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (queue, dlq) = (unique("settle"), unique("settle.dlq"));
    declare(&ch, &dlq, FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dlq.as_str())),
    );
    declare(&ch, &queue, args).await;
    let address = format!("/amq/queue/{queue}");

    let bridge = Amqp10Bridge::start("amqp10-settle", &config(100, retry(5, 50, 500))).unwrap();
    wait_ready(&bridge).await;
    let outcomes = Arc::new(Outcomes::default());
    for (i, body) in ["ack", "requeue", "reject"].iter().enumerate() {
        bridge.publish(
            &address,
            message("k", BasicProperties::default(), body.as_bytes().to_vec()),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(3, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());

    let mut sub = bridge.subscribe(&address, 10).await.unwrap();
    let mut requeued_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let got = next(&mut sub).await;
        match got.message.body() {
            b"ack" => got.settle.settle(Settlement::Ack),
            b"reject" => got.settle.settle(Settlement::Reject),
            b"requeue" => {
                requeued_seen += 1;
                if requeued_seen == 1 {
                    got.settle.settle(Settlement::Requeue);
                } else {
                    got.settle.settle(Settlement::Ack);
                    break;
                }
            }
            other => panic!("unexpected body {other:?}"),
        }
    }
    assert_eq!(requeued_seen, 2, "the requeued message came back once");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        depth(&ch, &queue).await,
        0,
        "acked and rejected messages are gone"
    );
    let dead = ch
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the rejected message is dead-lettered");
    assert_eq!(&dead.delivery.data[..], b"reject");
    drop(sub);
    bridge.close().await;
    for q in [&queue, &dlq] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pipelined_publishes_are_all_confirmed() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("many");
    declare(&ch, &queue, FieldTable::default()).await;
    let address = format!("/amq/queue/{queue}");
    let bridge = Amqp10Bridge::start("amqp10-many", &config(1000, retry(5, 50, 500))).unwrap();
    wait_ready(&bridge).await;
    const N: usize = 5000;
    let outcomes = Arc::new(Outcomes::default());
    let started = Instant::now();
    for i in 0..N {
        bridge.publish(
            &address,
            message(
                "k",
                BasicProperties::default(),
                format!("m{i}").into_bytes(),
            ),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(N, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert_eq!(outcomes.confirmed.lock().unwrap().len(), N);
    assert_eq!(depth(&ch, &queue).await as usize, N);
    // One at a time would cost a round trip each; pipelined it is far below N round trips.
    eprintln!("{N} publishes confirmed in {elapsed:?}");
    bridge.close().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_fails_after_its_attempts_and_too_large_fails_at_once() {
    let _lock = broker_lock(false);
    let _conn = connect().await;
    let mut cfg = config(100, retry(2, 20, 50));
    cfg.max_message_size = Some(1000);
    let bridge = Amqp10Bridge::start("amqp10-missing", &cfg).unwrap();
    wait_ready(&bridge).await;
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        &format!("/exchange/{}/k", unique("nope")),
        message("k", BasicProperties::default(), &b"x"[..]),
        outcomes.guard(0),
    );
    bridge.publish(
        "/amq/queue/whatever",
        message("k", BasicProperties::default(), vec![0u8; 2000]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(20)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed
            .iter()
            .any(|(id, r)| *id == 1 && r.contains("max_message_size")),
        "{failed:?}"
    );
    assert!(
        failed
            .iter()
            .any(|(id, r)| *id == 0 && r.contains("after 2 attempts")),
        "{failed:?}"
    );
    // The bridge still works afterwards.
    assert_eq!(bridge.health(), Health::Ready);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_accepted_message() {
    let _lock = broker_lock(true);
    let queue = unique("restart");
    {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        declare(&ch, &queue, FieldTable::default()).await;
        conn.close(0, "done".into()).await.unwrap();
    }
    let address = format!("/amq/queue/{queue}");
    let bridge = Amqp10Bridge::start("amqp10-restart", &config(500, retry(0, 50, 1000))).unwrap();
    wait_ready(&bridge).await;
    const N: usize = 4000;
    let outcomes = Arc::new(Outcomes::default());
    let persistent = BasicProperties::default().with_delivery_mode(2);
    for i in 0..N / 2 {
        bridge.publish(
            &address,
            message("k", persistent.clone(), format!("m{i}").into_bytes()),
            outcomes.guard(i),
        );
    }
    // Restart while the first half is in flight, publish the second half meanwhile.
    let script = repo_root().join("scripts/rabbitmq.sh");
    let restart = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg(script)
            .arg("restart")
            .status()
            .unwrap()
    });
    for i in N / 2..N {
        bridge.publish(
            &address,
            message("k", persistent.clone(), format!("m{i}").into_bytes()),
            outcomes.guard(i),
        );
        if i % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        restart.await.unwrap().success(),
        "scripts/rabbitmq.sh restart failed"
    );
    outcomes.wait_done(N, Duration::from_secs(120)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    wait_ready(&bridge).await;

    // Every confirmed message is in the queue (resends may have added duplicates).
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut seen = std::collections::HashSet::new();
    while let Some(m) = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        seen.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    let missing: Vec<usize> = (0..N)
        .filter(|i| !seen.contains(&format!("m{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    bridge.close().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// RabbitMQ's plugin ends the session of a refused attach (a queue that does not exist): the
/// subscription that asked for it retries alone, while the senders and the other subscriptions
/// keep their links and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_a_missing_queue_leaves_the_other_links_alone() {
    let _lock = broker_lock(false);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let queue = unique("neighbour");
    declare(&ch, &queue, FieldTable::default()).await;
    let address = format!("/amq/queue/{queue}");

    let bridge = Amqp10Bridge::start("amqp10-missing", &config(100, retry(5, 50, 500))).unwrap();
    wait_ready(&bridge).await;
    let mut sub = bridge.subscribe(&address, 10).await.unwrap();
    let _missing = bridge
        .subscribe(&format!("/amq/queue/{}", unique("missing")), 10)
        .await
        .unwrap();

    // Long enough for the missing queue's subscription to be refused several times (its
    // backoff starts at 100 ms).
    let outcomes = Arc::new(Outcomes::default());
    let count = 30;
    let mut health_seen = Vec::new();
    for i in 0..count {
        bridge.publish(
            &address,
            message("k", BasicProperties::default(), format!("m{i}")),
            outcomes.guard(i),
        );
        for _ in 0..10 {
            let health = bridge.health();
            if health != Health::Ready && !health_seen.contains(&health) {
                health_seen.push(health);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    outcomes.wait_done(count, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert!(
        health_seen.is_empty(),
        "the connection was disturbed by the refused attach: {health_seen:?}"
    );
    let mut received = Vec::new();
    while received.len() < count {
        let got = next(&mut sub).await;
        received.push(String::from_utf8_lossy(got.message.body()).into_owned());
        got.settle.settle(Settlement::Ack);
    }
    received.sort();
    received.dedup();
    assert_eq!(received.len(), count, "every message arrived once");
    drop(sub);
    bridge.close().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
