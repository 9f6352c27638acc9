//! The SQS bridge against a real local SQS-compatible server (moto).
//!
//! Needs `WARREN_TEST_SQS_URL`: `scripts/test.sh` starts a private moto server with
//! `scripts/moto.sh start` (127.0.0.1:4576) and exports it. By hand:
//!
//! ```sh
//! scripts/moto.sh start
//! WARREN_TEST_SQS_URL=$(scripts/moto.sh url) cargo test -p warren-bridges --test sqs
//! scripts/moto.sh stop
//! ```
//!
//! Every test fails (never skips) when the variable is unset or the server unreachable. The
//! restart test kills the server (`scripts/moto.sh kill-restart`); a file lock keeps the other
//! tests off it meanwhile.
#![cfg(feature = "sqs")]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use aws_sdk_sqs::Client;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use warren_backends::{Backend, Health, Incoming, Settlement};
use warren_bridges::sqs::SqsBridge;
use warren_config::file::{RetryConfig, SqsBackend};

use support::{broker_script, message, missing_bodies, next, unique_dashed as unique, Outcomes};

fn url() -> String {
    support::env_url(
        "WARREN_TEST_SQS_URL",
        "moto",
        "SQS-compatible server (moto)",
    )
}

fn server_lock(exclusive: bool) -> File {
    support::broker_lock("moto", exclusive)
}

/// A plain SQS client for setting up queues and looking at what the bridge did.
async fn client() -> Client {
    support::init_logs();
    let url = url();
    let config = aws_sdk_sqs::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(&url)
        .build();
    let client = Client::from_conf(config);
    if let Err(e) = client.list_queues().send().await {
        panic!(
            "the SQS server at {url} is unreachable: {} (is `scripts/moto.sh start` running?)",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        );
    }
    client
}

fn config() -> SqsBackend {
    SqsBackend {
        endpoint_url: Some(url()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        session_token: None,
        max_message_size: 256 * 1024,
        max_batches_in_flight: 10,
        wait_time_secs: 1,
        visibility_timeout_secs: 30,
        group_id_header: "x-message-group-id".into(),
        default_group_id: None,
        deduplication_id_header: "x-deduplication-id".into(),
        retry: RetryConfig {
            max_attempts: 0,
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
        },
    }
}

async fn create_queue(c: &Client, name: &str, attributes: &[(QueueAttributeName, &str)]) -> String {
    let mut call = c.create_queue().queue_name(name);
    for (k, v) in attributes {
        call = call.attributes(k.clone(), *v);
    }
    call.send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create {name}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })
        .queue_url()
        .unwrap()
        .to_string()
}

async fn queue_arn(c: &Client, url: &str) -> String {
    c.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone()
}

/// (visible, in flight) as SQS counts them.
async fn counts(c: &Client, url: &str) -> (u64, u64) {
    let out = c
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let a = out.attributes().unwrap();
    let n = |k: QueueAttributeName| a.get(&k).map(|v| v.parse().unwrap()).unwrap_or(0);
    (
        n(QueueAttributeName::ApproximateNumberOfMessages),
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

async fn wait_counts(c: &Client, url: &str, want: (u64, u64), within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = counts(c, url).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue counts (visible, in flight) are {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message in the queue, received with a long visibility timeout (so each once).
async fn drain(c: &Client, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    let mut empty = 0;
    while empty < 2 {
        let out = c
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .wait_time_seconds(0)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        let got = out.messages.unwrap_or_default();
        if got.is_empty() {
            empty += 1;
        } else {
            empty = 0;
            all.extend(got);
        }
    }
    all
}

fn full_properties() -> BasicProperties {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongLongInt(-3));
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    headers.insert("attempt".into(), AMQPValue::LongInt(2));
    headers.insert("nested".into(), AMQPValue::FieldTable(nested));
    support::full_properties(headers)
}

fn body_text(m: &Incoming) -> String {
    String::from_utf8(m.message.body().to_vec()).unwrap()
}

#[tokio::test]
async fn publishes_become_sqs_messages_and_come_back_with_every_property() {
    let _lock = server_lock(false);
    let c = client().await;
    let queue = unique("roundtrip");
    let url = create_queue(&c, &queue, &[]).await;
    let bridge = SqsBridge::start("sqs", &config()).unwrap();
    bridge.declare(&queue).await.unwrap();
    assert!(bridge.declare(&unique("missing")).await.is_err());

    let outcomes = Arc::new(Outcomes::default());
    let props = full_properties();
    bridge.publish(
        &queue,
        message("a.b", props.clone(), &b"{\"n\":1}"[..]),
        outcomes.guard(0),
    );
    bridge.publish(
        &queue,
        message("a.c", BasicProperties::default(), &b"\x00\xffbinary"[..]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(30)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert_eq!(bridge.depth(&queue).await.unwrap(), Some(2));

    // As SQS holds them: native attributes for the headers that have one, warren.amqp for all.
    let raw = c
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .visibility_timeout(0)
        .message_attribute_names("All")
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    let json = raw
        .iter()
        .find(|m| m.body() == Some("{\"n\":1}"))
        .expect("the JSON message");
    let attrs = json.message_attributes().unwrap();
    assert_eq!(attrs["tenant"].string_value(), Some("acme"));
    assert_eq!(attrs["tenant"].data_type(), "String");
    assert_eq!(attrs["attempt"].string_value(), Some("2"));
    assert_eq!(attrs["attempt"].data_type(), "Number");
    assert!(!attrs.contains_key("nested"), "tables have no native type");
    assert_eq!(attrs["warren.amqp"].data_type(), "Binary");
    let binary = raw
        .iter()
        .find(|m| m.body() != Some("{\"n\":1}"))
        .expect("the binary message");
    assert_eq!(
        binary.body(),
        Some("AP9iaW5hcnk="),
        "binary bodies go base64"
    );

    // Another producer's message.
    c.send_message()
        .queue_url(&url)
        .message_body("foreign")
        .message_attributes(
            "source",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("lambda")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    // And back through a subscription (standard queues do not promise order).
    let mut sub = bridge.subscribe(&queue, 10).await.unwrap();
    let mut got: BTreeMap<String, Incoming> = BTreeMap::new();
    for _ in 0..3 {
        let m = next(&mut sub).await;
        got.insert(m.message.routing_key().to_string(), m);
    }
    let first = &got["a.b"];
    assert_eq!(first.message.body().to_vec(), b"{\"n\":1}".to_vec());
    assert_eq!(first.message.properties(), props);
    let second = &got["a.c"];
    assert_eq!(second.message.body().to_vec(), b"\x00\xffbinary".to_vec());
    assert_eq!(second.message.properties(), BasicProperties::default());
    let foreign = &got[queue.as_str()];
    assert_eq!(body_text(foreign), "foreign");
    let headers = foreign.message.headers().unwrap();
    let h = headers.inner();
    assert_eq!(
        h.get("source"),
        Some(&AMQPValue::LongString("lambda".into()))
    );
    assert!(foreign.message.properties().message_id().is_some());
    for m in got.values() {
        m.settle.settle(Settlement::Ack);
    }
    wait_counts(&c, &url, (0, 0), Duration::from_secs(30)).await;
    assert_eq!(bridge.stats().deleted.load(Ordering::Relaxed), 3);
    assert_eq!(bridge.health(), Health::Ready);
    bridge.close().await;
    assert_eq!(bridge.health(), Health::Closed);
    drop(sub);
    c.delete_queue().queue_url(&url).send().await.unwrap();
}

#[tokio::test]
async fn batches_many_headers_oversized_messages_and_missing_queues() {
    let _lock = server_lock(false);
    let c = client().await;
    let queue = unique("batch");
    let url = create_queue(&c, &queue, &[]).await;
    let mut cfg = config();
    cfg.retry.max_attempts = 3;
    let bridge = SqsBridge::start("sqs", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());

    // 200 messages at once: sent in batches of 10.
    for i in 0..200 {
        bridge.publish(
            &queue,
            message("k", BasicProperties::default(), format!("m{i}")),
            outcomes.guard(i),
        );
    }
    // 15 headers: 9 become attributes (with warren.amqp that is SQS's 10), all 15 come back.
    let mut headers = FieldTable::default();
    for i in 0..15 {
        headers.insert(format!("h{i:02}").into(), AMQPValue::LongInt(i));
    }
    let many = BasicProperties::default().with_headers(headers);
    bridge.publish(
        &queue,
        message("many", many.clone(), "many"),
        outcomes.guard(200),
    );
    // Over max_message_size: refused at once.
    bridge.publish(
        &queue,
        message("big", BasicProperties::default(), vec![b'x'; 300 * 1024]),
        outcomes.guard(201),
    );
    // A queue that does not exist: nacked after retry.max_attempts.
    bridge.publish(
        &unique("nowhere"),
        message("k", BasicProperties::default(), "lost"),
        outcomes.guard(202),
    );
    outcomes.wait_done(203, Duration::from_secs(60)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    let failed: HashMap<usize, String> = failed.into_iter().collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed[&201].contains("max_message_size"),
        "{}",
        failed[&201]
    );
    assert!(
        failed[&202].contains("after 3 attempts"),
        "{}",
        failed[&202]
    );
    let batches = bridge.stats().batches.load(Ordering::Relaxed);
    assert!(batches <= 40, "{batches} batches for 201 messages");

    let all = drain(&c, &url).await;
    assert_eq!(all.len(), 201);
    let bodies: HashSet<&str> = all.iter().filter_map(|m| m.body()).collect();
    assert_eq!(bodies.len(), 201);
    let raw_many = all.iter().find(|m| m.body() == Some("many")).unwrap();
    assert_eq!(raw_many.message_attributes().unwrap().len(), 10);
    // Make them visible again and read the 15-header one through the bridge.
    for m in &all {
        c.change_message_visibility()
            .queue_url(&url)
            .receipt_handle(m.receipt_handle().unwrap())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
    let mut sub = bridge.subscribe(&queue, 50).await.unwrap();
    // Distinct bodies: SQS promises at least once, a standard queue may deliver one twice.
    let mut seen = HashSet::new();
    let mut found = false;
    while seen.len() < 201 {
        let m = next(&mut sub).await;
        seen.insert(body_text(&m));
        if m.message.routing_key() == "many" {
            assert_eq!(m.message.properties(), many);
            assert_eq!(m.message.headers().unwrap().inner().len(), 15);
            found = true;
        }
        m.settle.settle(Settlement::Ack);
    }
    assert!(found);
    wait_counts(&c, &url, (0, 0), Duration::from_secs(60)).await;
    bridge.close().await;
    drop(sub);
    c.delete_queue().queue_url(&url).send().await.unwrap();
}

#[tokio::test]
async fn requeue_redelivers_and_reject_dead_letters_through_the_redrive_policy() {
    let _lock = server_lock(false);
    let c = client().await;
    let dlq = unique("dlq");
    let dlq_url = create_queue(&c, &dlq, &[]).await;
    let arn = queue_arn(&c, &dlq_url).await;
    let queue = unique("settle");
    let policy = format!("{{\"deadLetterTargetArn\":\"{arn}\",\"maxReceiveCount\":\"5\"}}");
    let url = create_queue(&c, &queue, &[(QueueAttributeName::RedrivePolicy, &policy)]).await;
    let plain = unique("noredrive");
    let plain_url = create_queue(&c, &plain, &[]).await;

    let bridge = SqsBridge::start("sqs", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let props = full_properties();
    bridge.publish(
        &queue,
        message("r", props.clone(), "requeued"),
        outcomes.guard(0),
    );
    bridge.publish(
        &queue,
        message("x", props.clone(), "rejected"),
        outcomes.guard(1),
    );
    bridge.publish(
        &plain,
        message("d", props.clone(), "dropped"),
        outcomes.guard(2),
    );
    outcomes.wait_done(3, Duration::from_secs(30)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());

    let mut sub = bridge.subscribe(&queue, 10).await.unwrap();
    let mut a = next(&mut sub).await;
    let mut b = next(&mut sub).await;
    if body_text(&a) != "requeued" {
        std::mem::swap(&mut a, &mut b);
    }
    assert!(!a.redelivered);
    assert_eq!(body_text(&b), "rejected");
    b.settle.settle(Settlement::Reject);
    a.settle.settle(Settlement::Requeue);
    let again = next(&mut sub).await;
    assert_eq!(body_text(&again), "requeued");
    assert!(again.redelivered, "ApproximateReceiveCount 2");
    again.settle.settle(Settlement::Ack);
    wait_counts(&c, &url, (0, 0), Duration::from_secs(30)).await;

    // The rejected one is on the dead-letter queue, as it was.
    wait_counts(&c, &dlq_url, (1, 0), Duration::from_secs(30)).await;
    let mut dead = bridge.subscribe(&dlq, 10).await.unwrap();
    let d = next(&mut dead).await;
    assert_eq!(body_text(&d), "rejected");
    assert_eq!(d.message.properties(), props);
    d.settle.settle(Settlement::Ack);
    assert_eq!(bridge.stats().dead_lettered.load(Ordering::Relaxed), 1);

    // Requeued past the redrive policy's maxReceiveCount: SQS itself moves it to the
    // dead-letter queue.
    let tired = unique("tired");
    let policy = format!("{{\"deadLetterTargetArn\":\"{arn}\",\"maxReceiveCount\":\"2\"}}");
    let tired_url = create_queue(&c, &tired, &[(QueueAttributeName::RedrivePolicy, &policy)]).await;
    bridge.publish(
        &tired,
        message("t", props.clone(), "tired"),
        outcomes.guard(3),
    );
    outcomes.wait_done(4, Duration::from_secs(30)).await;
    let mut tired_sub = bridge.subscribe(&tired, 10).await.unwrap();
    for _ in 0..2 {
        let t = next(&mut tired_sub).await;
        assert_eq!(body_text(&t), "tired");
        t.settle.settle(Settlement::Requeue);
    }
    let t = next(&mut dead).await;
    assert_eq!(body_text(&t), "tired");
    assert!(t.redelivered, "received twice before");
    t.settle.settle(Settlement::Ack);
    wait_counts(&c, &tired_url, (0, 0), Duration::from_secs(30)).await;

    // Without a redrive policy a rejected message is dropped.
    let mut plain_sub = bridge.subscribe(&plain, 10).await.unwrap();
    let p = next(&mut plain_sub).await;
    p.settle.settle(Settlement::Reject);
    wait_counts(&c, &plain_url, (0, 0), Duration::from_secs(30)).await;
    wait_counts(&c, &dlq_url, (0, 0), Duration::from_secs(30)).await;

    bridge.close().await;
    drop((sub, dead, plain_sub, tired_sub));
    for u in [url, dlq_url, plain_url, tired_url] {
        c.delete_queue().queue_url(u).send().await.unwrap();
    }
}

#[tokio::test]
async fn visibility_is_extended_while_a_client_holds_a_message() {
    let _lock = server_lock(false);
    let c = client().await;
    let queue = unique("extend");
    let url = create_queue(&c, &queue, &[]).await;
    let mut cfg = config();
    cfg.visibility_timeout_secs = 2;
    let bridge = SqsBridge::start("sqs", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        &queue,
        message("k", BasicProperties::default(), "held"),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(30)).await;
    let mut sub = bridge.subscribe(&queue, 1).await.unwrap();
    let m = next(&mut sub).await;
    // Held three visibility timeouts: nobody else may get it meanwhile.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let other = c
            .receive_message()
            .queue_url(&url)
            .wait_time_seconds(0)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default();
        assert!(other.is_empty(), "the held message became visible");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(bridge.stats().extended.load(Ordering::Relaxed) >= 2);
    m.settle.settle(Settlement::Ack);
    wait_counts(&c, &url, (0, 0), Duration::from_secs(30)).await;
    bridge.close().await;
    drop(sub);
    c.delete_queue().queue_url(&url).send().await.unwrap();
}

#[tokio::test]
async fn fifo_queues_keep_order_per_message_group_and_deduplicate() {
    let _lock = server_lock(false);
    let c = client().await;
    let queue = format!("{}.fifo", unique("fifo"));
    let url = create_queue(&c, &queue, &[(QueueAttributeName::FifoQueue, "true")]).await;
    let bridge = SqsBridge::start("sqs", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let groups = ["g0", "g1", "g2"];
    let per_group = 20;
    let mut n = 0;
    for i in 0..per_group {
        for g in groups {
            let mut headers = FieldTable::default();
            headers.insert("x-message-group-id".into(), AMQPValue::LongString(g.into()));
            let props = BasicProperties::default().with_headers(headers);
            bridge.publish(
                &queue,
                message(g, props, format!("{g}:{i}")),
                outcomes.guard(n),
            );
            n += 1;
        }
    }
    // The same message-id twice: SQS keeps one (deduplication id = message-id).
    for _ in 0..2 {
        let props = BasicProperties::default().with_message_id("dup-1".into());
        bridge.publish(&queue, message("dups", props, "dup"), outcomes.guard(n));
        n += 1;
    }
    // Without a group header the routing key is the group.
    bridge.publish(
        &queue,
        message("by-key", BasicProperties::default(), "keyed"),
        outcomes.guard(n),
    );
    n += 1;
    // A routing key SQS refuses as a group id fails at once.
    bridge.publish(
        &queue,
        message("has space", BasicProperties::default(), "bad"),
        outcomes.guard(n),
    );
    n += 1;
    outcomes.wait_done(n, Duration::from_secs(60)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].1.contains("MessageGroupId"), "{failed:?}");

    let mut sub = bridge.subscribe(&queue, 30).await.unwrap();
    let mut next_of: HashMap<String, usize> = HashMap::new();
    let mut others = Vec::new();
    for _ in 0..(groups.len() * per_group + 2) {
        let m = next(&mut sub).await;
        let body = body_text(&m);
        match body.split_once(':') {
            Some((g, i)) => {
                let i: usize = i.parse().unwrap();
                let expected = next_of.entry(g.to_string()).or_insert(0);
                assert_eq!(i, *expected, "group {g} out of order");
                *expected += 1;
            }
            None => others.push(body),
        }
        m.settle.settle(Settlement::Ack);
    }
    others.sort();
    assert_eq!(others, ["dup", "keyed"]);
    assert!(next_of.values().all(|&v| v == per_group), "{next_of:?}");
    wait_counts(&c, &url, (0, 0), Duration::from_secs(30)).await;
    bridge.close().await;
    drop(sub);
    c.delete_queue().queue_url(&url).send().await.unwrap();
}

#[tokio::test]
async fn unacknowledged_messages_come_back_after_a_consumer_restart() {
    let _lock = server_lock(false);
    let c = client().await;
    let queue = unique("restart-consumer");
    let url = create_queue(&c, &queue, &[]).await;
    let mut cfg = config();
    cfg.visibility_timeout_secs = 2;
    let first = SqsBridge::start("sqs", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    for i in 0..3 {
        first.publish(
            &queue,
            message("k", BasicProperties::default(), format!("m{i}")),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(3, Duration::from_secs(30)).await;
    let mut sub = first.subscribe(&queue, 10).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut sub).await);
    }
    // Warren dies holding them: nothing is settled.
    first.close().await;
    for m in held {
        std::mem::forget(m);
    }
    drop(sub);
    assert_eq!(counts(&c, &url).await, (0, 3));

    // A new Warren gets them again once their visibility timeout ran out.
    let second = SqsBridge::start("sqs", &cfg).unwrap();
    let mut sub = second.subscribe(&queue, 10).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let m = next(&mut sub).await;
        assert!(m.redelivered);
        bodies.push(body_text(&m));
        m.settle.settle(Settlement::Ack);
    }
    bodies.sort();
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    wait_counts(&c, &url, (0, 0), Duration::from_secs(30)).await;
    second.close().await;
    drop(sub);
    c.delete_queue().queue_url(&url).send().await.unwrap();
}

fn moto_script(arg: &str) {
    broker_script("moto", &[arg]);
}

/// moto keeps its state in memory; `scripts/moto.sh record` + `kill-restart` make it durable
/// through its request recorder (every request is logged before moto handles it and replayed
/// into the restarted process), which stands in for SQS's own durable storage. The server is
/// killed with SIGKILL mid-stream; every confirmed message must be there afterwards.
#[tokio::test]
async fn a_killed_and_restarted_server_loses_no_confirmed_message() {
    let _lock = server_lock(true);
    let c = client().await;
    moto_script("record");
    let queue = unique("kill");
    let url = create_queue(&c, &queue, &[]).await;
    let bridge = SqsBridge::start("sqs", &config()).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let mut sent = 0usize;
    let burst = |sent: &mut usize, n: usize| {
        for _ in 0..n {
            bridge.publish(
                &queue,
                message("k", BasicProperties::default(), format!("{sent}")),
                outcomes.guard(*sent),
            );
            *sent += 1;
        }
    };
    // moto's cost per stored message grows with the queue's depth (about 6 ms each on an
    // empty queue, 30 ms at 1,000): keep the stream bounded, a few hundred messages.
    for _ in 0..15 {
        burst(&mut sent, 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = sent;
    let restart = tokio::task::spawn_blocking(|| moto_script("kill-restart"));
    while !restart.is_finished() {
        if sent < before + 200 {
            burst(&mut sent, 10);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restart.await.unwrap();
    for _ in 0..15 {
        burst(&mut sent, 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let confirmed = outcomes.all_confirmed(sent, Duration::from_secs(120)).await;

    let c = client().await;
    let all = drain(&c, &url).await;
    let bodies: HashSet<String> = all
        .iter()
        .filter_map(|m| m.body().map(str::to_string))
        .collect();
    let missing = missing_bodies(&confirmed, &bodies);
    assert!(missing.is_empty(), "confirmed but missing: {missing:?}");
    let stats = bridge.stats();
    assert!(
        stats.call_failures.load(Ordering::Relaxed) >= 1,
        "the bridge never saw the server down"
    );
    println!(
        "kill -9 + restart: {sent} published and confirmed, {} stored ({} duplicates from resends), {} entries resent, {} failed calls",
        all.len(),
        all.len() - bodies.len(),
        stats.resent.load(Ordering::Relaxed),
        stats.call_failures.load(Ordering::Relaxed),
    );
    bridge.close().await;
    c.delete_queue().queue_url(&url).send().await.unwrap();
    moto_script("record-stop");
}
