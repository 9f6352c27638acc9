//! Configured routes and queue mappings, with the embedded engine of a second vhost standing in
//! for the bridged target: forward, mirror (confirm after both), unmatched policies, and
//! consume-through with settlement at the target.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use warren_backends::embedded::EmbeddedBackend;
use warren_backends::engine::{ExchangeOptions, QueueOptions, VHost};
use warren_backends::Backend;
use warren_gateway::routes::{QueueMapping, Route, RouteMode, RoutingPlan};
use warren_gateway::ServerHandle;

const STEP: Duration = Duration::from_secs(5);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// The stand-in target: topic exchange `demo` bound (`#`) to queue `demo-q`, and a queue
/// `demo-in` to consume through.
fn target() -> (Arc<VHost>, Arc<dyn Backend>) {
    let vhost = VHost::new("/");
    vhost
        .declare_exchange(
            "demo",
            ExchangeOptions {
                kind: "topic".into(),
                ..Default::default()
            },
        )
        .expect("exchange");
    for q in ["demo-q", "demo-in"] {
        vhost
            .declare_queue(q, false, QueueOptions::default(), 0)
            .expect("queue");
    }
    vhost
        .bind_queue("demo-q", "demo", "#", FieldTable::default(), 0)
        .expect("bind");
    let backend: Arc<dyn Backend> = EmbeddedBackend::new("target", vhost.clone());
    (vhost, backend)
}

async fn open(server: &ServerHandle) -> (Connection, Channel) {
    let conn = within(Connection::connect(
        &warren_tests::amqp_url(server),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect");
    let ch = within(conn.create_channel()).await.expect("channel");
    (conn, ch)
}

fn depth(vhost: &VHost, queue: &str) -> u32 {
    vhost.queue_by_name(queue).expect("queue").message_count()
}

async fn eventually(mut check: impl FnMut() -> bool) {
    within(async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test]
async fn forward_route_sends_to_the_target_only_and_confirms() {
    let (target_vhost, backend) = target();
    let plan = RoutingPlan {
        routes: vec![Route::new(
            "demo",
            "orders.#",
            vec![],
            backend.clone(),
            "demo",
            RouteMode::Forward,
        )],
        backends: vec![backend],
        ..Default::default()
    };
    let server = warren_tests::start_server_with_plan(plan);
    let (_conn, ch) = open(&server).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // The exchange `demo` does not exist in Warren: the route alone accepts the publish.
    for i in 0..5 {
        let confirm = within(
            ch.basic_publish(
                "demo".into(),
                "orders.eu.new".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_message_id("id".into()),
            )
            .await
            .expect("publish"),
        )
        .await
        .expect("confirm");
        assert!(confirm.is_ack());
    }
    assert_eq!(depth(&target_vhost, "demo-q"), 5);
    let got = target_vhost
        .queue_by_name("demo-q")
        .expect("q")
        .get()
        .expect("message")
        .0;
    assert_eq!(got.message.body(), b"m0");
    assert_eq!(got.message.routing_key(), "orders.eu.new");
    assert_eq!(
        got.message
            .properties()
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("id")
    );
    // A key the route does not match, to an exchange Warren lacks: 404 as usual.
    let err = ch
        .basic_publish(
            "demo".into(),
            "other".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("sent")
        .await;
    assert!(
        err.is_err() || !err.expect("confirm").is_ack(),
        "unmatched publish to a missing exchange is refused"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn mirror_route_delivers_to_both_and_unmatched_reject_nacks() {
    let (target_vhost, backend) = target();
    let plan = RoutingPlan {
        routes: vec![Route::new(
            "events",
            "#",
            vec![("region".into(), "eu".into())],
            backend.clone(),
            "demo",
            RouteMode::Mirror,
        )],
        reject_unmatched: true,
        backends: vec![backend],
        ..Default::default()
    };
    let server = warren_tests::start_server_with_plan(plan);
    let (_conn, ch) = open(&server).await;
    ch.exchange_declare(
        "events".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    ch.queue_declare(
        "local".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.queue_bind(
        "local".into(),
        "events".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut eu = FieldTable::default();
    eu.insert(
        "region".into(),
        lapin::types::AMQPValue::LongString("eu".into()),
    );
    let confirm = within(
        ch.basic_publish(
            "events".into(),
            "e1".into(),
            BasicPublishOptions::default(),
            b"both",
            BasicProperties::default().with_headers(eu),
        )
        .await
        .expect("publish"),
    )
    .await
    .expect("confirm");
    assert!(confirm.is_ack());
    assert_eq!(depth(&target_vhost, "demo-q"), 1, "the target has it");
    let local = ch
        .basic_get("local".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("local copy");
    assert_eq!(local.delivery.data, b"both");
    // No route matches (header missing) and unmatched messages are refused: a nack.
    let confirm = within(
        ch.basic_publish(
            "events".into(),
            "e2".into(),
            BasicPublishOptions::default(),
            b"refused",
            BasicProperties::default(),
        )
        .await
        .expect("publish"),
    )
    .await
    .expect("confirm");
    assert!(confirm.is_nack(), "unmatched: reject nacks under confirms");
    assert!(ch
        .basic_get("local".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn queue_mapping_consumes_through_and_settles_at_the_target() {
    let (target_vhost, backend) = target();
    let source = target_vhost.queue_by_name("demo-in").expect("source");
    for i in 0..3 {
        source.publish(warren_backends::Message::new(
            "".into(),
            "demo-in".into(),
            Default::default(),
            bytes::Bytes::from(format!("in{i}")),
        ));
    }
    let plan = RoutingPlan {
        mappings: vec![QueueMapping {
            name: "demo-in".into(),
            backend: backend.clone(),
            source: "demo-in".into(),
            prefetch: 10,
        }],
        backends: vec![backend],
        ..Default::default()
    };
    let server = warren_tests::start_server_with_plan(plan);
    let (conn, ch) = open(&server).await;
    // Clients may declare the mapped queue however their code always did.
    ch.queue_declare(
        "demo-in".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declaring a mapped queue is accepted");
    let mut consumer = ch
        .basic_consume(
            "demo-in".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let first = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(first.data, b"in0");
    first.ack(BasicAckOptions::default()).await.expect("ack");
    let second = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(second.data, b"in1");
    second
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .expect("nack");
    // in1 comes back (redelivered), then in2.
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        seen.push((
            String::from_utf8(d.data.clone()).expect("utf8"),
            d.redelivered,
        ));
        if d.data == b"in2" {
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
    }
    assert!(seen.contains(&("in1".to_string(), true)), "{seen:?}");
    assert!(seen.iter().any(|(b, _)| b == "in2"), "{seen:?}");
    // Acked ones are gone at the target; the unacked one returns there when the client leaves.
    eventually(|| source.message_count() == 0).await;
    drop(consumer);
    conn.close(200, "bye".into()).await.expect("close");
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await;
    eventually(|| source.message_count() == 1).await;
    let back = source.get().expect("in1 is back at the target").0;
    assert_eq!(back.message.body(), b"in1");
}
