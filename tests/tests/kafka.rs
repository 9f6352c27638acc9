//! Warren in front of a real Kafka-protocol broker (tansu), configured by
//! `deploy/examples/kafka.yaml`: a client publishing to Warren's exchange `demo` (with
//! confirms) lands in the topic `demo`; a client consuming Warren's queue `demo-in` gets the
//! records of the topic `demo-in` (consumer group `warren.demo-in`), with requeue and the
//! offsets committed on ack. Then pika through the same bridge across a kill -9 and restart of
//! the broker (`tests/interop/pika_bridges.py`).
//!
//! Needs `WARREN_TEST_KAFKA_URL` (scripts/test.sh starts a private broker with
//! `scripts/tansu.sh start` and sets it); fails loudly without it.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;
use warren_config::file::BackendConfig;
use warren_gateway::plan::build_plan;

const STEP: Duration = Duration::from_secs(30);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn kafka_url() -> String {
    warren_tests::broker_url("WARREN_TEST_KAFKA_URL", "tansu", "Kafka-protocol broker")
}

/// Shared with the bridge tests: a restart of the broker needs it alone.
fn broker_lock(exclusive: bool) -> File {
    warren_tests::broker_lock("tansu", exclusive)
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Creates `topic` (harmless when it exists); fails loudly when the broker is down.
fn create_topic(topic: &str, partitions: u32) {
    let out = std::process::Command::new(warren_tests::workspace_root().join("scripts/tansu.sh"))
        .args(["create-topic", topic, &partitions.to_string()])
        .output()
        .expect("run scripts/tansu.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || stderr.contains("already exists"),
        "creating topic {topic} failed (is `scripts/tansu.sh start` running?): {stderr}"
    );
}

/// Group timings short enough for tests (the defaults make a first join take seconds).
const TEST_OPTIONS: [(&str, &str); 2] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_carries_messages_both_ways_with_confirms_headers_and_requeue() {
    let _lock = broker_lock(false);
    let url = kafka_url();
    create_topic("demo", 3);
    create_topic("demo-in", 1);
    let run = unique("run");

    let example =
        std::fs::read_to_string(warren_tests::workspace_root().join("deploy/examples/kafka.yaml"))
            .expect("the example file");
    let mut cfg = warren_config::parse_with_env(&example, "kafka.yaml", |name| {
        (name == "WARREN_TARGET_URL").then(|| url.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    match cfg.backends.get_mut("kafka") {
        Some(BackendConfig::Kafka(k)) => {
            for (name, value) in TEST_OPTIONS {
                k.options.insert(name.into(), value.into());
            }
        }
        other => panic!("the example's backend `kafka`: {other:?}"),
    }
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    let conn = within(Connection::connect(
        &warren_tests::amqp_url(&warren),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect to Warren");
    let ch = within(conn.create_channel()).await.expect("channel");

    // Client → Warren exchange `demo` → topic `demo`, confirmed on the delivery report.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    headers.insert("run".into(), AMQPValue::LongString(run.as_str().into()));
    headers.insert("attempt".into(), AMQPValue::LongInt(2));
    for i in 0..20 {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_correlation_id(format!("c{i}").into())
            .with_headers(headers.clone());
        let confirm = within(
            ch.basic_publish(
                "demo".into(),
                format!("orders.{}", i % 4).into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        )
        .await
        .expect("confirm");
        assert!(
            confirm.is_ack(),
            "confirmed after the broker's acknowledgement"
        );
    }
    // Read `demo` with a plain Kafka client: every record of this run, key = routing key,
    // headers as Kafka headers, order kept per key.
    let raw: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &url)
        .set("group.id", unique("raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .expect("consumer");
    raw.subscribe(&["demo"]).expect("subscribe");
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    let mut found = 0;
    while found < 20 {
        let r = within(raw.recv()).await.expect("record");
        let hs: HashMap<String, Vec<u8>> = r
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        if hs.get("run").map(Vec::as_slice) != Some(run.as_bytes()) {
            continue; // an earlier run's record
        }
        found += 1;
        assert_eq!(hs["tenant"], b"acme");
        assert_eq!(hs["attempt"], b"2");
        assert_eq!(hs["x-amqp-content-type"], b"text/plain");
        let key = String::from_utf8(r.key().expect("key").to_vec()).expect("utf8");
        assert_eq!(hs["x-amqp-routing-key"], key.as_bytes());
        let body = std::str::from_utf8(r.payload().expect("value")).expect("utf8");
        let i: usize = body.trim_start_matches('m').parse().expect("number");
        assert_eq!(key, format!("orders.{}", i % 4));
        per_key.entry(key).or_default().push(i);
    }
    for (key, seqs) in &per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "key {key} out of order");
    }
    drop(raw);

    // Topic `demo-in` → Warren queue `demo-in` → client, with a requeue.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &url)
        .create()
        .expect("producer");
    for i in 0..5 {
        producer
            .send(
                FutureRecord::to("demo-in")
                    .key(&format!("in.{i}"))
                    .payload(&format!("in{i}"))
                    .headers(
                        OwnedHeaders::new()
                            .insert(Header {
                                key: "run",
                                value: Some(run.as_str()),
                            })
                            .insert(Header {
                                key: "x-amqp-message-id",
                                value: Some(&format!("id{i}")),
                            }),
                    ),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
    let rx = within(conn.create_channel()).await.expect("channel");
    rx.basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = rx
        .basic_consume(
            "demo-in".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut bodies = Vec::new();
    let mut requeued = false;
    let mut redelivered = BTreeSet::new();
    while bodies.len() < 5 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        let h = d.properties.headers().clone().unwrap_or_default();
        let mine = matches!(h.inner().get("run"), Some(AMQPValue::LongString(r)) if r.as_bytes() == run.as_bytes());
        if !mine {
            // An earlier run's record left unacknowledged: settle it for good.
            d.ack(BasicAckOptions::default()).await.expect("ack");
            continue;
        }
        let body = String::from_utf8(d.data.clone()).expect("utf8");
        if body == "in2" && !requeued {
            requeued = true;
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
            continue;
        }
        if d.redelivered {
            redelivered.insert(body.clone());
        }
        let i = body.trim_start_matches("in");
        assert_eq!(
            d.properties.message_id().as_ref().map(|s| s.as_str()),
            Some(format!("id{i}").as_str())
        );
        assert_eq!(d.routing_key.as_str(), format!("in.{i}"));
        assert!(h.inner().contains_key("x-kafka-offset"));
        bodies.push(body);
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    bodies.sort();
    assert_eq!(bodies, vec!["in0", "in1", "in2", "in3", "in4"]);
    assert_eq!(
        redelivered,
        BTreeSet::from(["in2".to_string()]),
        "the requeued record comes back redelivered"
    );
    // Let the bridge commit before Warren stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    warren.shutdown().await;
}

/// pika publishing with confirms and consuming through Warren → Kafka → Warren while the broker
/// is killed (-9) and restarted; every confirmed message must come back with its properties and
/// typed headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_through_kafka_survives_a_broker_kill_and_restart() {
    let _lock = broker_lock(true);
    let url = kafka_url();
    let topic = unique("pika-e2e");
    create_topic(&topic, 1);
    // Idempotence off: tansu 0.6 loses the idempotent producer's state when it restarts (see
    // bridges/README.md); acks=all and the bridge's resends still lose nothing confirmed.
    let yaml = format!(
        "backends:\n  target:\n    type: kafka\n    bootstrap_servers: \"{url}\"\n    \
         group_prefix: \"{prefix}.\"\n    idempotence: false\n    delivery_timeout_ms: 5000\n    \
         options: {{session.timeout.ms: \"6000\", heartbeat.interval.ms: \"1000\"}}\n    \
         retry: {{max_attempts: 0, initial_backoff_ms: 50, max_backoff_ms: 500}}\n\
         routes:\n  - match: {{exchange: pika-e2e, routing_key: \"#\"}}\n    backend: target\n    \
         destination: {topic}\n    mode: forward\n\
         queues:\n  - name: pika-e2e-in\n    backend: target\n    source: {topic}\n    \
         prefetch: 100\n",
        prefix = unique("pika")
    );
    let cfg = warren_config::parse_with_env(&yaml, "pika-kafka.yaml", |_| None)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    // Let the queue mapping join its group before anything is published.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart = format!(
        "{} kill-restart",
        warren_tests::workspace_root()
            .join("scripts/tansu.sh")
            .display()
    );
    let args = [
        "--exchange",
        "pika-e2e",
        "--queue",
        "pika-e2e-in",
        "--count",
        "600",
        "--restart-cmd",
        restart.as_str(),
        "--typed-headers",
    ];
    let stdout = warren_tests::run_interop_script_with_args(
        "tests/interop/pika_bridges.py",
        &warren,
        &args,
        Duration::from_secs(240),
    )
    .await;
    warren.shutdown().await;
    print!("{stdout}");
    assert!(
        stdout.contains("OK: every confirmed message received"),
        "{stdout}"
    );
}
