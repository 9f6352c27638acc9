//! The Kafka bridge against a real Kafka-protocol broker (tansu).
//!
//! Needs `WARREN_TEST_KAFKA_URL` (the bootstrap address, host:port): `scripts/test.sh` starts a
//! private broker with `scripts/tansu.sh start` (127.0.0.1:9192, storage in a private moto S3
//! endpoint so the broker can be restarted) and exports it. By hand:
//!
//! ```sh
//! scripts/tansu.sh start
//! WARREN_TEST_KAFKA_URL=$(scripts/tansu.sh url) cargo test -p warren-bridges --test kafka
//! scripts/tansu.sh stop
//! ```
//!
//! Every test fails (never skips) when the variable is unset or the broker unreachable. The
//! restart test kills and restarts the broker with `scripts/tansu.sh kill-restart`; a file lock
//! keeps the other tests off it meanwhile.
#![cfg(feature = "kafka")]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;
use warren_backends::{Backend, Health, Message, Settlement};
use warren_bridges::kafka::KafkaBridge;
use warren_config::file::{KafkaBackend, KafkaSecurityProtocol, RetryConfig};

use support::{broker_script, init_logs, message, next, unique, Outcomes};

fn url() -> String {
    support::env_url("WARREN_TEST_KAFKA_URL", "tansu", "Kafka-protocol broker")
}

fn server_lock(exclusive: bool) -> File {
    support::broker_lock("tansu", exclusive)
}

/// Group timings short enough for tests (the broker's defaults make a first join slow).
fn test_options() -> BTreeMap<String, String> {
    [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
        ("topic.metadata.refresh.interval.ms", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn config() -> KafkaBackend {
    KafkaBackend {
        bootstrap_servers: url(),
        client_id: "warren-test".into(),
        group_prefix: format!("warren.test.{}.", std::process::id()),
        security_protocol: KafkaSecurityProtocol::Plaintext,
        sasl_mechanism: None,
        sasl_username: None,
        sasl_password: None,
        ssl_ca_location: None,
        compression: "none".into(),
        linger_ms: 5,
        idempotence: true,
        delivery_timeout_ms: 30_000,
        key_header: None,
        auto_offset_reset: "earliest".into(),
        options: test_options(),
        retry: RetryConfig {
            max_attempts: 0,
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
        },
    }
}

/// Creates `topic` with `partitions` partitions, failing loudly when the broker is down.
fn create_topic(topic: &str, partitions: u32) {
    broker_script("tansu", &["create-topic", topic, &partitions.to_string()]);
}

fn full_properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    headers.insert("attempt".into(), AMQPValue::LongInt(3));
    headers.insert("urgent".into(), AMQPValue::Boolean(true));
    support::full_properties(headers)
}

fn raw_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", url())
        .set("acks", "all")
        .create()
        .expect("producer")
}

fn raw_consumer(topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", url())
        .set("group.id", unique("raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

fn header(m: &Message, name: &str) -> Option<AMQPValue> {
    m.headers()?.inner().get(name).cloned()
}

fn body_text(m: &Message) -> String {
    String::from_utf8_lossy(m.body()).into_owned()
}

#[tokio::test]
async fn publishes_become_records_and_records_come_back_as_messages() {
    init_logs();
    let _lock = server_lock(false);
    let topic = unique("roundtrip");
    create_topic(&topic, 1);
    let bridge = KafkaBridge::start("kafka", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let props = full_properties();
    bridge.publish(
        &topic,
        message("a.b", props.clone(), &b"{\"n\":1}"[..]),
        outcomes.guard(0),
    );
    bridge.publish(
        &topic,
        message("a.c", BasicProperties::default(), &b"plain"[..]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(30)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert_eq!(bridge.health(), Health::Ready);
    bridge.declare(&topic).await.unwrap();

    // The records as Kafka holds them, read by a plain client.
    let raw = raw_consumer(&topic);
    let r = tokio::time::timeout(Duration::from_secs(30), raw.recv())
        .await
        .expect("no record")
        .unwrap();
    assert_eq!(r.payload(), Some(&b"{\"n\":1}"[..]));
    assert_eq!(r.key(), Some(&b"a.b"[..]));
    assert_eq!(r.timestamp().to_millis(), Some(1_700_000_000_000));
    let headers: HashMap<String, Option<Vec<u8>>> = r
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(headers["tenant"].as_deref(), Some(&b"acme"[..]));
    assert_eq!(headers["attempt"].as_deref(), Some(&b"3"[..]));
    assert_eq!(
        headers["x-amqp-content-type"].as_deref(),
        Some(&b"application/json"[..])
    );
    assert_eq!(
        headers["x-amqp-correlation-id"].as_deref(),
        Some(&b"corr-1"[..])
    );
    assert_eq!(headers["x-amqp-routing-key"].as_deref(), Some(&b"a.b"[..]));
    drop(r);
    drop(raw);

    // A foreign record: key, one header, no Warren headers.
    raw_producer()
        .send(
            FutureRecord::to(&topic)
                .key("customer-7")
                .payload("foreign")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "source",
                    value: Some("billing"),
                })),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");

    // And back through a subscription.
    let mut sub = bridge.subscribe(&topic, 10).await.unwrap();
    let first = next(&mut sub).await;
    assert!(!first.redelivered);
    assert_eq!(first.message.body(), b"{\"n\":1}");
    assert_eq!(first.message.routing_key(), "a.b");
    let mut expected = props.headers().clone().unwrap();
    expected.insert("x-kafka-partition".into(), AMQPValue::LongInt(0));
    expected.insert("x-kafka-offset".into(), AMQPValue::LongLongInt(0));
    assert_eq!(
        first.message.properties(),
        props.clone().with_headers(expected)
    );
    let second = next(&mut sub).await;
    assert_eq!(second.message.body(), b"plain");
    assert_eq!(second.message.routing_key(), "a.c");
    let third = next(&mut sub).await;
    assert_eq!(body_text(&third.message), "foreign");
    assert_eq!(third.message.routing_key(), "customer-7");
    assert_eq!(
        header(&third.message, "source"),
        Some(AMQPValue::LongString("billing".into()))
    );
    assert!(third.message.properties().timestamp().is_some());
    for m in [first, second, third] {
        m.settle.settle(Settlement::Ack);
    }
    drop(sub);
    bridge.close().await;
    assert_eq!(bridge.health(), Health::Closed);
}

#[tokio::test]
async fn key_header_and_order_per_key_across_partitions() {
    init_logs();
    let _lock = server_lock(false);
    let topic = unique("order");
    create_topic(&topic, 3);
    let mut cfg = config();
    cfg.key_header = Some("customer".into());
    cfg.compression = "lz4".into();
    let bridge = KafkaBridge::start("kafka", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let customers = ["c-1", "c-2", "c-3", "c-4", "c-5"];
    let per_key = 200;
    let mut id = 0;
    for seq in 0..per_key {
        for c in customers {
            let mut h = FieldTable::default();
            h.insert("customer".into(), AMQPValue::LongString(c.into()));
            h.insert("seq".into(), AMQPValue::LongLongInt(seq));
            bridge.publish(
                &topic,
                message(
                    "orders.new",
                    BasicProperties::default().with_headers(h),
                    format!("{c}:{seq}"),
                ),
                outcomes.guard(id),
            );
            id += 1;
        }
    }
    let started = Instant::now();
    outcomes.wait_done(id, Duration::from_secs(60)).await;
    eprintln!("{id} publishes confirmed in {:?}", started.elapsed());
    assert!(outcomes.failed.lock().unwrap().is_empty());

    // Keys spread over partitions; each key's records are in order in its partition.
    let mut sub = bridge.subscribe(&topic, 100).await.unwrap();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut partitions_of: HashMap<String, BTreeSet<i32>> = HashMap::new();
    for _ in 0..id {
        let m = next(&mut sub).await;
        let Some(AMQPValue::LongString(c)) = header(&m.message, "customer") else {
            panic!("no customer header");
        };
        let c = String::from_utf8_lossy(c.as_bytes()).into_owned();
        let Some(AMQPValue::LongLongInt(seq)) = header(&m.message, "seq") else {
            panic!("seq lost its type");
        };
        let Some(AMQPValue::LongInt(p)) = header(&m.message, "x-kafka-partition") else {
            panic!("no partition header");
        };
        partitions_of.entry(c.clone()).or_default().insert(p);
        let prev = last.insert(c.clone(), seq);
        assert_eq!(prev.map_or(0, |p| p + 1), seq, "key {c} out of order");
        m.settle.settle(Settlement::Ack);
    }
    assert!(
        partitions_of.values().all(|p| p.len() == 1),
        "{partitions_of:?}"
    );
    let used: BTreeSet<i32> = partitions_of.values().flatten().copied().collect();
    assert!(used.len() > 1, "all keys in one partition: {used:?}");
    drop(sub);
    bridge.close().await;
}

#[tokio::test]
async fn prefetch_bounds_in_flight_and_requeue_redelivers() {
    init_logs();
    let _lock = server_lock(false);
    let topic = unique("prefetch");
    create_topic(&topic, 1);
    let bridge = KafkaBridge::start("kafka", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..20 {
        bridge.publish(
            &topic,
            message("k", BasicProperties::default(), format!("{i}")),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(20, Duration::from_secs(30)).await;
    let mut sub = bridge.subscribe(&topic, 5).await.unwrap();
    let mut held = Vec::new();
    for i in 0..5 {
        let m = next(&mut sub).await;
        assert_eq!(body_text(&m.message), i.to_string());
        held.push(m);
    }
    // A sixth needs credit.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), sub.next())
            .await
            .is_err(),
        "more than prefetch handed out"
    );
    // Requeue "2": it comes back first, marked redelivered.
    held.remove(2).settle.settle(Settlement::Requeue);
    let again = next(&mut sub).await;
    assert!(again.redelivered);
    assert_eq!(body_text(&again.message), "2");
    again.settle.settle(Settlement::Ack);
    let sixth = next(&mut sub).await;
    assert_eq!(body_text(&sixth.message), "5");
    assert!(!sixth.redelivered);
    sixth.settle.settle(Settlement::Reject);
    for m in held.drain(..) {
        m.settle.settle(Settlement::Ack);
    }
    for i in 6..20 {
        let m = next(&mut sub).await;
        assert_eq!(body_text(&m.message), i.to_string());
        m.settle.settle(Settlement::Ack);
    }
    drop(sub);
    bridge.close().await;
}

#[tokio::test]
async fn unacked_records_come_back_after_a_consumer_restart() {
    init_logs();
    let _lock = server_lock(false);
    let topic = unique("restart");
    create_topic(&topic, 1);
    let cfg = config();
    let bridge = KafkaBridge::start("kafka", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..20 {
        bridge.publish(
            &topic,
            message("k", BasicProperties::default(), format!("{i}")),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(20, Duration::from_secs(30)).await;

    // Take 12, ack all but 6, then go away.
    let mut sub = bridge.subscribe(&topic, 20).await.unwrap();
    let mut unacked = None;
    for i in 0..12 {
        let m = next(&mut sub).await;
        assert_eq!(body_text(&m.message), i.to_string());
        if i == 6 {
            unacked = Some(m);
        } else {
            m.settle.settle(Settlement::Ack);
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(unacked);
    drop(sub);
    bridge.close().await;

    // A new Warren (bridge) in the same group: 0..5 are done, 6 was never acked.
    let bridge = KafkaBridge::start("kafka", &cfg).unwrap();
    let mut sub = bridge.subscribe(&topic, 20).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..14 {
        let m = next(&mut sub).await;
        seen.push(body_text(&m.message).parse::<usize>().unwrap());
        m.settle.settle(Settlement::Ack);
    }
    assert_eq!(seen, (6..20).collect::<Vec<_>>());
    // Nothing else: 0..5 stay committed.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), sub.next())
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(sub);
    bridge.close().await;
}

#[tokio::test]
async fn a_second_consumer_takes_revoked_partitions_and_their_unacked_records() {
    init_logs();
    let _lock = server_lock(false);
    let topic = unique("rebalance");
    create_topic(&topic, 2);
    let cfg = config();
    let bridge = KafkaBridge::start("kafka", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let n = 40;
    for i in 0..n {
        bridge.publish(
            &topic,
            message(
                &format!("k{}", i % 8),
                BasicProperties::default(),
                format!("{i}"),
            ),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(n, Duration::from_secs(30)).await;

    // The first subscription holds everything unacked.
    let mut first = bridge.subscribe(&topic, 100).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(next(&mut first).await);
    }
    // A second member joins: one partition moves to it, and it must get that partition's
    // records although the first one still holds them (nothing was committed).
    let other = KafkaBridge::start("kafka-2", &cfg).unwrap();
    let mut second = other.subscribe(&topic, 100).await.unwrap();
    // Keep the first one polling so it takes part in the rebalance.
    let poll_first = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(8), first.next()).await {
            got.push(m);
        }
        (first, got)
    });
    let mut moved = BTreeSet::new();
    let m = next(&mut second).await;
    let Some(AMQPValue::LongInt(partition)) = header(&m.message, "x-kafka-partition") else {
        panic!("no partition header")
    };
    moved.insert(body_text(&m.message));
    m.settle.settle(Settlement::Ack);
    let expected: BTreeSet<String> = held
        .iter()
        .filter(|m| header(&m.message, "x-kafka-partition") == Some(AMQPValue::LongInt(partition)))
        .map(|m| body_text(&m.message))
        .collect();
    while moved.len() < expected.len() {
        let m = next(&mut second).await;
        moved.insert(body_text(&m.message));
        m.settle.settle(Settlement::Ack);
    }
    assert_eq!(moved, expected);
    // Acking the first one's copies of revoked records now commits nothing for them.
    for m in held {
        m.settle.settle(Settlement::Ack);
    }
    drop(second);
    let (first, _) = poll_first.await.unwrap();
    drop(first);
    other.close().await;
    bridge.close().await;
}

#[tokio::test]
async fn nothing_confirmed_is_lost_when_the_broker_is_killed_mid_stream() {
    init_logs();
    let _lock = server_lock(true);
    let topic = unique("kill");
    create_topic(&topic, 1);
    let mut cfg = config();
    cfg.delivery_timeout_ms = 5_000;
    // tansu 0.6 does not keep the idempotent producer's state across its own restart: with
    // idempotence on, runs here either passed, stalled (no delivery report for minutes) or
    // lost one confirmed batch, so this test runs the producer with acks=all and retries but
    // without idempotence (duplicates are counted, not refused). See bridges/README.md.
    cfg.idempotence = false;
    let bridge = KafkaBridge::start("kafka", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let total = 3000;
    let publisher = {
        let bridge = bridge.clone();
        let outcomes = outcomes.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for i in 0..total {
                bridge.publish(
                    &topic,
                    message("k", BasicProperties::default(), format!("{i}")),
                    outcomes.guard(i),
                );
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    // Kill -9 and restart the broker while publishes stream.
    while outcomes.done.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker_script("tansu", &["kill-restart"]);
    publisher.await.unwrap();
    outcomes.wait_done(total, Duration::from_secs(120)).await;
    let confirmed: BTreeSet<usize> = outcomes.confirmed.lock().unwrap().iter().copied().collect();
    let failed = outcomes.failed.lock().unwrap().len();
    let stats = bridge.stats();
    eprintln!(
        "sent {total}, confirmed {}, failed {failed}, resent {}, producers {}",
        confirmed.len(),
        stats.resent.load(Ordering::Relaxed),
        stats.producers.load(Ordering::Relaxed)
    );
    assert_eq!(failed, 0, "max_attempts 0: nothing may fail");
    bridge.close().await;

    // Every confirmed message is in the topic after the restart.
    let raw = raw_consumer(&topic);
    let mut found: BTreeMap<usize, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !confirmed.iter().all(|i| found.contains_key(i)) {
        assert!(
            Instant::now() < deadline,
            "{} confirmed messages missing after the restart, e.g. {:?}",
            confirmed.iter().filter(|i| !found.contains_key(i)).count(),
            confirmed.iter().find(|i| !found.contains_key(i))
        );
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), raw.recv()).await {
            let i: usize = std::str::from_utf8(r.payload().unwrap())
                .unwrap()
                .parse()
                .unwrap();
            *found.entry(i).or_default() += 1;
        }
    }
    let duplicates = found.values().filter(|c| **c > 1).count();
    eprintln!(
        "found {} distinct in the topic, {duplicates} duplicated, 0 confirmed lost",
        found.len()
    );
}

/// SASL/SCRAM against tansu's authenticating broker (`scripts/tansu.sh sasl-url`), which knows
/// no users (tansu 0.6 cannot keep one, see scripts/tansu.sh): for both SCRAM mechanisms the
/// exchange reaches the broker, which refuses the unknown user, and the publisher gets a nack,
/// not a confirm; health says why. A successful login is not tested here.
#[tokio::test]
async fn sasl_scram_is_spoken_and_a_refused_login_nacks() {
    init_logs();
    let _lock = server_lock(false);
    let sasl_url = support::env_url(
        "WARREN_TEST_KAFKA_SASL_URL",
        "tansu",
        "Kafka-protocol broker requiring SASL",
    );
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let mut cfg = config();
        cfg.bootstrap_servers = sasl_url.clone();
        cfg.security_protocol = KafkaSecurityProtocol::SaslPlaintext;
        cfg.sasl_mechanism = Some(mechanism.into());
        cfg.sasl_username = Some("warren".into());
        cfg.sasl_password = Some("warren-secret".into());
        cfg.delivery_timeout_ms = 2_000;
        cfg.retry.max_attempts = 1;
        let bridge = KafkaBridge::start("kafka-sasl", &cfg).unwrap();
        let outcomes = Arc::new(Outcomes::default());
        bridge.publish(
            &unique("sasl"),
            message("k", BasicProperties::default(), &b"x"[..]),
            outcomes.guard(0),
        );
        outcomes.wait_done(1, Duration::from_secs(30)).await;
        assert!(outcomes.confirmed.lock().unwrap().is_empty(), "{mechanism}");
        assert_eq!(outcomes.failed.lock().unwrap().len(), 1, "{mechanism}");
        match bridge.health() {
            Health::Degraded(why) => assert!(why.contains("Authentication"), "{mechanism}: {why}"),
            other => panic!("{mechanism}: {other:?}"),
        }
        bridge.close().await;
    }
}
