//! Warren in front of a real RabbitMQ, configured by `deploy/examples/rabbitmq-upstream.yaml`:
//! a client publishing to Warren's exchange `demo` lands in RabbitMQ's topic exchange `demo`;
//! a client consuming Warren's queue `demo-in` gets what arrives in RabbitMQ's queue `demo-in`,
//! settled there on ack. And the upstream restarted mid-stream loses no confirmed message.
//!
//! Needs `WARREN_TEST_RABBITMQ_URL` (scripts/test.sh starts a private node and sets it).

use std::collections::HashSet;
use std::fs::File;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use warren_gateway::plan::build_plan;
use warren_gateway::ServerHandle;

const STEP: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn rabbit_url() -> String {
    warren_tests::broker_url("WARREN_TEST_RABBITMQ_URL", "rabbitmq", "RabbitMQ")
}

/// Shared with the bridge tests: a restart of the broker needs it alone.
fn broker_lock(exclusive: bool) -> File {
    warren_tests::broker_lock("rabbitmq", exclusive)
}

async fn open(url: &str) -> (Connection, Channel) {
    let conn = within(Connection::connect(url, ConnectionProperties::default()))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let ch = within(conn.create_channel()).await.expect("channel");
    (conn, ch)
}

fn start_warren(yaml: &str, origin: &str) -> ServerHandle {
    let url = rabbit_url();
    let cfg = warren_config::parse_with_env(yaml, origin, |name| {
        (name == "WARREN_TARGET_URL").then(|| url.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    warren_tests::start_server_with_plan(plan)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_carries_messages_both_ways_with_confirms() {
    let _lock = broker_lock(false);
    let (_rconn, rch) = open(&rabbit_url()).await;
    // RabbitMQ's side of the example: topic exchange `demo`, queue `demo-in`; and a queue of
    // ours bound to `demo` to see what arrives.
    rch.exchange_declare(
        "demo".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("demo exchange");
    rch.queue_declare(
        "demo-seen".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("demo-seen");
    rch.queue_purge("demo-seen".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    rch.queue_bind(
        "demo-seen".into(),
        "demo".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    rch.queue_declare(
        "demo-in".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("demo-in");
    rch.queue_purge("demo-in".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");

    let example = std::fs::read_to_string(
        warren_tests::workspace_root().join("deploy/examples/rabbitmq-upstream.yaml"),
    )
    .expect("the example file");
    let warren = start_warren(&example, "rabbitmq-upstream.yaml");
    let (_wconn, wch) = open(&warren_tests::amqp_url(&warren)).await;

    // Client → Warren exchange `demo` (any routing key) → RabbitMQ exchange `demo`.
    wch.exchange_declare(
        "demo".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("clients keep declaring their exchange");
    wch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        lapin::types::AMQPValue::LongString("acme".into()),
    );
    for i in 0..20 {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_correlation_id(format!("c{i}").into())
            .with_headers(headers.clone())
            .with_delivery_mode(2);
        let confirm = within(
            wch.basic_publish(
                "demo".into(),
                format!("orders.{i}").into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        )
        .await
        .expect("confirm");
        assert!(confirm.is_ack(), "confirmed after RabbitMQ confirmed");
    }
    let mut got = Vec::new();
    for _ in 0..20 {
        let m = within(rch.basic_get("demo-seen".into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("get")
            .expect("a confirmed message is at RabbitMQ");
        assert_eq!(
            m.delivery
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(
            m.delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("tenant"))
                .cloned(),
            Some(lapin::types::AMQPValue::LongString("acme".into()))
        );
        got.push((
            m.delivery.routing_key.to_string(),
            String::from_utf8(m.delivery.data).expect("utf8"),
        ));
    }
    assert_eq!(got[0], ("orders.0".to_string(), "m0".to_string()));
    assert_eq!(got[19], ("orders.19".to_string(), "m19".to_string()));

    // RabbitMQ queue `demo-in` → Warren queue `demo-in` → client; settled at RabbitMQ on ack.
    for i in 0..5 {
        rch.basic_publish(
            "".into(),
            "demo-in".into(),
            BasicPublishOptions::default(),
            format!("in{i}").as_bytes(),
            BasicProperties::default().with_message_id(format!("id{i}").into()),
        )
        .await
        .expect("publish to RabbitMQ");
    }
    wch.queue_declare(
        "demo-in".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("clients keep declaring their queue");
    let mut consumer = wch
        .basic_consume(
            "demo-in".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        bodies.push(String::from_utf8(d.data.clone()).expect("utf8"));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_eq!(bodies, vec!["in0", "in1", "in2", "in3", "in4"]);
    within(async {
        loop {
            let q = rch
                .queue_declare(
                    "demo-in".into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("depth");
            // Acked at RabbitMQ: nothing ready and nothing unacked left there.
            if q.message_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    warren.shutdown().await;
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("warren.e2e.{prefix}.{nanos}")
}

/// A publisher with confirms streams through Warren while RabbitMQ restarts: every message
/// Warren confirmed is in RabbitMQ afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_mid_stream_loses_no_confirmed_message() {
    let _lock = broker_lock(true);
    let exchange = unique("x");
    let queue = unique("q");
    let (rconn, rch) = open(&rabbit_url()).await;
    rch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    rch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue");
    rch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    drop(rch);
    let _ = rconn.close(200, "bye".into()).await;

    let yaml = format!(
        "backends:\n  up:\n    type: rabbitmq\n    url: ${{WARREN_TARGET_URL}}\n    retry: {{ max_attempts: 0, initial_backoff_ms: 100, max_backoff_ms: 1000 }}\nroutes:\n  - match: {{ exchange: events }}\n    backend: up\n    destination: {exchange}\n"
    );
    let warren = start_warren(&yaml, "restart.yaml");
    let (_wconn, wch) = open(&warren_tests::amqp_url(&warren)).await;
    wch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    let total = 3_000u32;
    let mut pending = Vec::new();
    let mut restarter = None;
    for i in 0..total {
        let props = BasicProperties::default().with_delivery_mode(2);
        let confirm = wch
            .basic_publish(
                "events".into(),
                "k".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                props,
            )
            .await
            .expect("publish to Warren");
        pending.push((i, confirm));
        if i == total / 3 {
            let script = warren_tests::workspace_root().join("scripts/rabbitmq.sh");
            restarter = Some(tokio::task::spawn_blocking(move || {
                std::process::Command::new(script)
                    .arg("restart")
                    .status()
                    .expect("run scripts/rabbitmq.sh restart")
            }));
        }
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let status = restarter.expect("restarted").await.expect("join");
    assert!(status.success(), "scripts/rabbitmq.sh restart failed");
    let mut confirmed = HashSet::new();
    let mut nacked = 0;
    for (i, confirm) in pending {
        match tokio::time::timeout(Duration::from_secs(120), confirm).await {
            Ok(Ok(c)) if c.is_ack() => {
                confirmed.insert(i);
            }
            _ => nacked += 1,
        }
    }
    let (rconn, rch) = open(&rabbit_url()).await;
    let mut found = HashSet::new();
    let mut duplicates = 0;
    while let Some(m) = rch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        let mut b = [0u8; 4];
        b.copy_from_slice(&m.delivery.data);
        if !found.insert(u32::from_be_bytes(b)) {
            duplicates += 1;
        }
    }
    let lost: Vec<u32> = confirmed
        .iter()
        .filter(|i| !found.contains(i))
        .copied()
        .collect();
    println!(
        "sent {total}, confirmed {}, nacked/unanswered {nacked}, found {}, duplicates {duplicates}",
        confirmed.len(),
        found.len()
    );
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        confirmed.len() as u32,
        total,
        "with unlimited retries every publish is eventually confirmed"
    );
    let _ = rch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = rch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = rconn.close(200, "bye".into()).await;
    warren.shutdown().await;
}

/// Mirror mode: the embedded engine and RabbitMQ both get the message; the confirm waits for
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_route_keeps_a_local_copy_and_forwards_upstream() {
    let _lock = broker_lock(false);
    let exchange = unique("mx");
    let queue = unique("mq");
    let (_rconn, rch) = open(&rabbit_url()).await;
    rch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    rch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    rch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let yaml = format!(
        "backends:\n  up: {{ type: rabbitmq, url: \"${{WARREN_TARGET_URL}}\" }}\nroutes:\n  - match: {{ exchange: audit, routing_key: \"#\" }}\n    backend: up\n    destination: {exchange}\n    mode: mirror\n"
    );
    let warren = start_warren(&yaml, "mirror.yaml");
    let (_wconn, wch) = open(&warren_tests::amqp_url(&warren)).await;
    wch.exchange_declare(
        "audit".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("local exchange");
    wch.queue_declare(
        "audit-local".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("local queue");
    wch.queue_bind(
        "audit-local".into(),
        "audit".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    wch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..10 {
        let confirm = within(
            wch.basic_publish(
                "audit".into(),
                "login".into(),
                BasicPublishOptions::default(),
                format!("a{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        )
        .await
        .expect("confirm");
        assert!(confirm.is_ack());
    }
    for i in 0..10 {
        let local = wch
            .basic_get("audit-local".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("local copy");
        assert_eq!(local.delivery.data, format!("a{i}").as_bytes());
        let upstream = rch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("upstream copy, already there when the confirm came");
        assert_eq!(upstream.delivery.data, format!("a{i}").as_bytes());
    }
    let _ = rch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = rch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    warren.shutdown().await;
}
