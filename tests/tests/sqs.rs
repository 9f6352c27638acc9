//! Warren in front of a real SQS-compatible server (moto), configured by
//! `deploy/examples/sqs.yaml`: a client publishing to Warren's exchange `demo` (with confirms)
//! lands in the SQS queue `demo`; a client consuming Warren's queue `demo-in` gets the messages
//! of the SQS queue `demo-in`, deleted there on ack and made visible again on requeue. A pika
//! script (`tests/interop/pika_sqs.py`) does the same from Python.
//!
//! Needs `WARREN_TEST_SQS_URL` (scripts/test.sh starts a private moto server and sets it). The
//! example takes its credentials from the standard AWS chain; the test gives moto's dummy ones
//! in the parsed configuration instead of the environment.

use std::fs::File;
use std::time::Duration;

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_config::file::BackendConfig;
use warren_gateway::plan::build_plan;

const STEP: Duration = Duration::from_secs(30);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn sqs_url() -> String {
    warren_tests::broker_url("WARREN_TEST_SQS_URL", "moto", "SQS-compatible server")
}

/// Shared with the bridge tests (whose restart test needs the server alone). Exclusive here:
/// the example's queue names `demo` and `demo-in` are shared by this file's tests.
fn server_lock() -> File {
    warren_tests::broker_lock("moto", true)
}

async fn sqs_client(url: &str) -> Client {
    let config = aws_sdk_sqs::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(url)
        .build();
    let client = Client::from_conf(config);
    if let Err(e) = client.list_queues().send().await {
        panic!(
            "the SQS server at {url} is unreachable: {}",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        );
    }
    client
}

/// Creates `name` empty: deletes what an earlier test left (moto, unlike SQS, lets a deleted
/// queue's name be used again at once; PurgeQueue is limited to once a minute).
async fn fresh_queue(c: &Client, name: &str) -> String {
    if let Ok(old) = c.get_queue_url().queue_name(name).send().await {
        if let Some(url) = old.queue_url() {
            c.delete_queue()
                .queue_url(url)
                .send()
                .await
                .expect("delete queue");
        }
    }
    c.create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("create queue")
        .queue_url()
        .expect("url")
        .to_string()
}

async fn counts(c: &Client, url: &str) -> (u64, u64) {
    let out = c
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("attributes");
    let a = out.attributes().expect("attributes");
    let n = |k: QueueAttributeName| a.get(&k).map(|v| v.parse().expect("n")).unwrap_or(0);
    (
        n(QueueAttributeName::ApproximateNumberOfMessages),
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

/// Every message of the queue, each received once.
async fn drain(c: &Client, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    loop {
        let got = c
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .wait_time_seconds(0)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive")
            .messages
            .unwrap_or_default();
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

/// The example, with moto's dummy credentials.
fn example_plan(url: &str) -> warren_gateway::routes::RoutingPlan {
    let example =
        std::fs::read_to_string(warren_tests::workspace_root().join("deploy/examples/sqs.yaml"))
            .expect("the example file");
    let mut cfg = warren_config::parse_with_env(&example, "sqs.yaml", |name| {
        (name == "WARREN_TARGET_URL").then(|| url.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    match cfg.backends.get_mut("queues") {
        Some(BackendConfig::Sqs(b)) => {
            assert_eq!(b.endpoint_url.as_deref(), Some(url));
            assert_eq!(b.wait_time_secs, 20, "the example long-polls");
            b.access_key_id = Some("test".into());
            b.secret_access_key = Some("test".into());
        }
        other => panic!("backend `queues` is not sqs: {other:?}"),
    }
    build_plan(&cfg, warren_bridges::build).expect("backends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_carries_messages_both_ways_with_confirms_headers_and_requeue() {
    let _lock = server_lock();
    let url = sqs_url();
    let c = sqs_client(&url).await;
    let demo = fresh_queue(&c, "demo").await;
    let demo_in = fresh_queue(&c, "demo-in").await;

    let warren = warren_tests::start_server_with_plan(example_plan(&url));
    let conn = within(Connection::connect(
        &warren_tests::amqp_url(&warren),
        ConnectionProperties::default(),
    ))
    .await
    .expect("connect to Warren");
    let ch = within(conn.create_channel()).await.expect("channel");

    // Client → Warren exchange `demo` → SQS queue `demo`, confirmed once SQS stored it.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    headers.insert("attempt".into(), AMQPValue::LongInt(1));
    let mut confirms = Vec::new();
    for i in 0..20 {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_correlation_id(format!("c{i}").into())
            .with_delivery_mode(2)
            .with_headers(headers.clone());
        confirms.push(
            ch.basic_publish(
                "demo".into(),
                format!("orders.{i}").into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                props,
            )
            .await
            .expect("publish"),
        );
    }
    for confirm in confirms {
        assert!(
            within(confirm).await.expect("confirm").is_ack(),
            "confirmed once SQS stored it"
        );
    }
    let stored = drain(&c, &demo).await;
    assert_eq!(stored.len(), 20, "every confirmed message is in SQS");
    let first = stored
        .iter()
        .find(|m| m.body() == Some("m0"))
        .expect("m0 in SQS");
    let attrs = first.message_attributes().expect("attributes");
    assert_eq!(attrs["tenant"].string_value(), Some("acme"));
    assert_eq!(attrs["attempt"].string_value(), Some("1"));
    assert!(attrs.contains_key("warren.amqp"));

    // Those same SQS messages (body and attributes as Warren wrote them) go into `demo-in`,
    // and back to an AMQP client through Warren's queue `demo-in`.
    for m in &stored {
        c.send_message()
            .queue_url(&demo_in)
            .message_body(m.body().expect("body"))
            .set_message_attributes(m.message_attributes().cloned())
            .send()
            .await
            .expect("send to demo-in");
    }
    ch.basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "demo-in".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // The first delivery is requeued: SQS makes it visible again and it comes back redelivered.
    let d = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert!(!d.redelivered);
    let requeued = String::from_utf8(d.data.clone()).expect("utf8");
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .expect("nack");
    let mut seen = std::collections::BTreeMap::new();
    let mut redelivered_seen = false;
    while seen.len() < 20 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        let body = String::from_utf8(d.data.clone()).expect("utf8");
        if body == requeued {
            assert!(d.redelivered, "a requeued message comes back redelivered");
            redelivered_seen = true;
        }
        let i: usize = body.trim_start_matches('m').parse().expect("index");
        assert_eq!(d.routing_key.as_str(), format!("orders.{i}"));
        assert_eq!(
            d.properties.correlation_id().as_ref().map(|s| s.as_str()),
            Some(format!("c{i}").as_str())
        );
        assert_eq!(d.properties.delivery_mode(), &Some(2));
        assert_eq!(
            d.properties.headers().as_ref(),
            Some(&headers),
            "headers intact"
        );
        seen.insert(i, ());
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert!(redelivered_seen);
    // Acks delete the messages from SQS.
    within(async {
        while counts(&c, &demo_in).await != (0, 0) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    drop(consumer);
    let _ = conn.close(200, "bye".into()).await;
    warren.shutdown().await;
}

/// tests/interop/pika_sqs.py: pika publishes with confirms and headers, consumes with a
/// requeue, and checks SQS itself with boto3 (installed with moto in the same virtualenv).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_through_warren_to_sqs_and_back() {
    let _lock = server_lock();
    let url = sqs_url();
    let c = sqs_client(&url).await;
    fresh_queue(&c, "demo").await;
    fresh_queue(&c, "demo-in").await;
    let warren = warren_tests::start_server_with_plan(example_plan(&url));
    let stdout = warren_tests::run_interop_script(
        "tests/interop/pika_sqs.py",
        &warren,
        Duration::from_secs(180),
    )
    .await;
    warren.shutdown().await;
    print!("{stdout}");
}
