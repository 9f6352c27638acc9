//! Warren in front of an AMQP 1.0 peer — RabbitMQ with its `rabbitmq_amqp1_0` plugin, enabled
//! on the private test node by `scripts/rabbitmq.sh` — configured by
//! `deploy/examples/amqp10.yaml`, with both addresses pointing at one RabbitMQ queue: a client
//! publishing to Warren's exchange `demo` (with confirms) gets its message back from Warren's
//! queue `demo-in` with its properties and headers, having crossed AMQP 1.0 twice.
//!
//! Needs `WARREN_TEST_RABBITMQ_URL` (scripts/test.sh starts a private node and sets it).

use std::fs::File;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use warren_gateway::plan::build_plan;

const STEP: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn rabbit_url() -> String {
    warren_tests::broker_url(
        "WARREN_TEST_RABBITMQ_URL",
        "rabbitmq",
        "RabbitMQ with the rabbitmq_amqp1_0 plugin",
    )
}

/// Shared with the bridge tests: a restart of the broker needs it alone.
fn broker_lock() -> File {
    warren_tests::broker_lock("rabbitmq", false)
}

async fn open(url: &str) -> (Connection, Channel) {
    let conn = within(Connection::connect(url, ConnectionProperties::default()))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let ch = within(conn.create_channel()).await.expect("channel");
    (conn, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_round_trips_through_amqp10_with_headers() {
    let _lock = broker_lock();
    let rabbit = rabbit_url();
    let (_rconn, rch) = open(&rabbit).await;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let queue = format!("warren.e2e.amqp10.{}.{nanos}", std::process::id());
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

    // The AMQP 1.0 URL of the same listener: no vhost path.
    let authority = rabbit
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(&rabbit)
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let address = format!("/amq/queue/{queue}");
    let example =
        std::fs::read_to_string(warren_tests::workspace_root().join("deploy/examples/amqp10.yaml"))
            .expect("the example file");
    let cfg = warren_config::parse_with_env(&example, "amqp10.yaml", |name| match name {
        "WARREN_TARGET_URL" => Some(format!("amqp://{authority}")),
        "WARREN_TARGET_OUT" | "WARREN_TARGET_IN" => Some(address.clone()),
        "WARREN_TARGET_KIND" => Some("rabbitmq".into()),
        _ => None,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    let (_wconn, wch) = open(&warren_tests::amqp_url(&warren)).await;

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
    .expect("exchange");
    wch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    headers.insert("count".into(), AMQPValue::LongLongInt(-42));
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::Boolean(true));
    headers.insert("nested".into(), AMQPValue::FieldTable(nested));
    for i in 0..20 {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_correlation_id(format!("c{i}").into())
            .with_message_id(format!("id{i}").into())
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
        assert!(confirm.is_ack(), "confirmed once the peer accepted it");
    }

    let mut consumer = wch
        .basic_consume(
            "demo-in".into(),
            "e2e".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..20 {
        let d = within(consumer.next())
            .await
            .expect("a delivery")
            .expect("delivery ok");
        assert_eq!(String::from_utf8_lossy(&d.data), format!("m{i}"));
        assert_eq!(d.routing_key.as_str(), format!("orders.{i}"));
        let p = &d.properties;
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(
            p.correlation_id().as_ref().map(|s| s.to_string()),
            Some(format!("c{i}"))
        );
        assert_eq!(
            p.message_id().as_ref().map(|s| s.to_string()),
            Some(format!("id{i}"))
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        let h = p.headers().as_ref().expect("headers");
        for (k, v) in headers.inner() {
            assert_eq!(h.inner().get(k), Some(v), "header {k}");
        }
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // Acked through Warren → accepted at RabbitMQ: the queue drains.
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let q = rch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive");
        if q.message_count() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} left",
            q.message_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(consumer);
    warren.shutdown().await;
    rch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
}
