//! The AMQP 1.0 bridge against a second, independent AMQP 1.0 implementation: the qpid-proton
//! example broker (`broker.py`, proton-C underneath), for wire, link and credit behaviour. It
//! forgets a message once it is sent, so requeue and redelivery are not tested here (RabbitMQ
//! and the Service Bus contract tests cover those).
//!
//! Needs `WARREN_TEST_QPID_URL` (`scripts/test.sh` exports it):
//!
//! ```sh
//! scripts/qpid-broker.sh start
//! WARREN_TEST_QPID_URL=$(scripts/qpid-broker.sh url) cargo test -p warren-bridges --test amqp10_proton
//! ```
//!
//! Every test fails (never skips) without it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use warren_backends::{Backend, Health, Incoming, Message, Settlement, Subscription};
use warren_bridges::amqp10::Amqp10Bridge;
use warren_config::file::{Amqp10Backend, Amqp10Target, RetryConfig};

use support::Outcomes;

fn url() -> String {
    support::env_url(
        "WARREN_TEST_QPID_URL",
        "qpid-broker",
        "qpid-proton example broker",
    )
}

fn config(max_in_flight: usize) -> Amqp10Backend {
    Amqp10Backend {
        url: Some(url()),
        target: Some(Amqp10Target::Generic),
        max_in_flight,
        retry: RetryConfig {
            max_attempts: 5,
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
        },
        ..Default::default()
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("warren.proton.{prefix}.{}.{nanos}", std::process::id())
}

async fn start(name: &str, max_in_flight: usize) -> Arc<Amqp10Bridge> {
    support::init_logs();
    let bridge = Amqp10Bridge::start(name, &config(max_in_flight)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bridge.health() != Health::Ready {
        assert!(
            Instant::now() < deadline,
            "the qpid-proton broker at {} is unreachable: {:?}",
            url(),
            bridge.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bridge
}

fn message(properties: BasicProperties, body: impl Into<Bytes>) -> Message {
    Message::new(
        "warren-in".into(),
        "orders.eu".into(),
        properties,
        body.into(),
    )
}

async fn next(sub: &mut Box<dyn Subscription>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("no message within 20s")
        .expect("subscription ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_headers_cross_a_second_implementation() {
    let bridge = start("proton-props", 10).await;
    let address = unique("props");
    let mut headers = FieldTable::default();
    headers.insert("i32".into(), AMQPValue::LongInt(-32));
    headers.insert("flag".into(), AMQPValue::Boolean(true));
    headers.insert(
        "text".into(),
        AMQPValue::LongString(LongString::from("ünïcode")),
    );
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongLongInt(7));
    headers.insert("table".into(), AMQPValue::FieldTable(nested));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(6)
        .with_correlation_id("corr-9".into())
        .with_reply_to("replies".into())
        .with_message_id("proton-1".into())
        .with_timestamp(1_700_000_456)
        .with_type("order.created".into())
        .with_app_id("warren-tests".into())
        .with_headers(headers);
    let sent = message(properties, &b"{\"n\":1}"[..]);
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(&address, sent.clone(), outcomes.guard(0));
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(
        outcomes.failed.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.failed
    );

    let mut sub = bridge.subscribe(&address, 10).await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.message.body(), sent.body());
    assert_eq!(got.message.routing_key(), "orders.eu");
    let (a, b) = (sent.properties(), got.message.properties());
    assert_eq!(a.content_type(), b.content_type());
    assert_eq!(a.delivery_mode(), b.delivery_mode());
    assert_eq!(a.priority(), b.priority());
    assert_eq!(a.correlation_id(), b.correlation_id());
    assert_eq!(a.reply_to(), b.reply_to());
    assert_eq!(a.message_id(), b.message_id());
    assert_eq!(a.timestamp(), b.timestamp());
    assert_eq!(a.kind(), b.kind());
    assert_eq!(a.app_id(), b.app_id());
    assert_eq!(a.headers(), b.headers());
    got.settle.settle(Settlement::Ack);
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_credit_never_exceeds_the_prefetch() {
    let bridge = start("proton-credit", 100).await;
    let address = unique("credit");
    const N: usize = 40;
    const PREFETCH: u16 = 5;
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..N {
        bridge.publish(
            &address,
            message(BasicProperties::default(), format!("m{i}").into_bytes()),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(N, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());

    let mut sub = bridge.subscribe(&address, PREFETCH).await.unwrap();
    let mut received = Vec::new();
    while received.len() < N {
        // Take what the credit allows, then check that nothing more comes while they are held.
        let mut held = Vec::new();
        for _ in 0..PREFETCH {
            if received.len() + held.len() == N {
                break;
            }
            held.push(next(&mut sub).await);
        }
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(
            extra.is_err(),
            "a delivery beyond the prefetch of {PREFETCH} arrived"
        );
        for m in held {
            received.push(String::from_utf8_lossy(m.message.body()).into_owned());
            m.settle.settle(Settlement::Ack);
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(received, expected, "every message once, in order");
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_are_all_accepted() {
    let bridge = start("proton-many", 500).await;
    let address = unique("many");
    const N: usize = 2000;
    let outcomes = Arc::new(Outcomes::default());
    let started = Instant::now();
    for i in 0..N {
        bridge.publish(
            &address,
            message(BasicProperties::default(), format!("m{i}").into_bytes()),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(N, Duration::from_secs(60)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    eprintln!(
        "{N} publishes accepted by the proton broker in {:?}",
        started.elapsed()
    );
    let mut sub = bridge.subscribe(&address, 200).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        let m = next(&mut sub).await;
        seen.insert(String::from_utf8_lossy(m.message.body()).into_owned());
        m.settle.settle(Settlement::Ack);
    }
    assert_eq!(seen.len(), N);
    drop(sub);
    bridge.close().await;
}
