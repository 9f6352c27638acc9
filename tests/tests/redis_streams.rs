//! Warren in front of a real Redis, configured by `deploy/examples/redis-streams.yaml`: a
//! client publishing to Warren's exchange `demo` (with confirms) lands in the stream `demo`;
//! a client consuming Warren's queue `demo-in` gets the entries of the stream `demo-in` (read
//! through group `warren`), acknowledged there (XACK) on ack.
//!
//! Needs `WARREN_TEST_REDIS_URL` (scripts/test.sh starts a private server and sets it).

use std::fs::File;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use redis::streams::{StreamPendingReply, StreamRangeReply};
use warren_gateway::plan::build_plan;

const STEP: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn redis_url() -> String {
    warren_tests::broker_url("WARREN_TEST_REDIS_URL", "redis", "Redis")
}

/// Shared with the bridge tests: a restart of the server needs it alone.
fn server_lock() -> File {
    warren_tests::broker_lock("redis", false)
}

fn field(map: &std::collections::HashMap<String, redis::Value>, name: &str) -> String {
    match map.get(name) {
        Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).expect("utf8"),
        other => panic!("field {name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_carries_messages_both_ways_with_confirms() {
    let _lock = server_lock();
    let url = redis_url();
    let mut r = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} is unreachable: {e}"));
    let _: () = redis::cmd("DEL")
        .arg("demo")
        .arg("demo-in")
        .query_async(&mut r)
        .await
        .expect("clean");

    let example = std::fs::read_to_string(
        warren_tests::workspace_root().join("deploy/examples/redis-streams.yaml"),
    )
    .expect("the example file");
    let cfg = warren_config::parse_with_env(&example, "redis-streams.yaml", |name| {
        (name == "WARREN_TARGET_URL").then(|| url.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let plan = build_plan(&cfg, warren_bridges::build).expect("backends");
    let warren = warren_tests::start_server_with_plan(plan);
    let conn = within(Connection::connect(
        &warren_tests::amqp_url(&warren),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect to Warren");
    let ch = within(conn.create_channel()).await.expect("channel");

    // Client → Warren exchange `demo` → stream `demo`, confirmed after XADD.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    for i in 0..20 {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_correlation_id(format!("c{i}").into())
            .with_headers(headers.clone());
        let confirm = within(
            ch.basic_publish(
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
        assert!(confirm.is_ack(), "confirmed after XADD");
    }
    let entries: StreamRangeReply = redis::cmd("XRANGE")
        .arg("demo")
        .arg("-")
        .arg("+")
        .query_async(&mut r)
        .await
        .expect("xrange");
    assert_eq!(
        entries.ids.len(),
        20,
        "every confirmed message is in the stream"
    );
    let first = &entries.ids[0].map;
    assert_eq!(field(first, "body"), "m0");
    assert_eq!(field(first, "routing_key"), "orders.0");
    assert_eq!(field(first, "content_type"), "text/plain");
    assert_eq!(field(first, "correlation_id"), "c0");
    assert_eq!(field(first, "h.tenant"), "acme");
    assert_eq!(field(&entries.ids[19].map, "body"), "m19");

    // Stream `demo-in` → Warren queue `demo-in` → client; XACKed on ack.
    for i in 0..5 {
        let _: String = redis::cmd("XADD")
            .arg("demo-in")
            .arg("*")
            .arg("body")
            .arg(format!("in{i}"))
            .arg("message_id")
            .arg(format!("id{i}"))
            .query_async(&mut r)
            .await
            .expect("xadd");
    }
    let mut consumer = ch
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
        assert!(d.properties.message_id().is_some());
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_eq!(bodies, vec!["in0", "in1", "in2", "in3", "in4"]);
    within(async {
        loop {
            let p: StreamPendingReply = redis::cmd("XPENDING")
                .arg("demo-in")
                .arg("warren")
                .query_async(&mut r)
                .await
                .expect("xpending");
            if p.count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    warren.shutdown().await;
}
