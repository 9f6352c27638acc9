//! Priority queues (`x-max-priority`) and consumer priorities (`x-priority` on basic.consume).

mod ext_common;

use ext_common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

async fn publish_prio(ch: &lapin::Channel, queue: &str, body: &str, priority: Option<u8>) {
    let mut props = BasicProperties::default();
    if let Some(p) = priority {
        props = props.with_priority(p);
    }
    publish_props(ch, "", queue, body.as_bytes(), props).await;
}

const MIXED: &[(&str, Option<u8>)] = &[
    ("none", None),
    ("p5-a", Some(5)),
    ("p1", Some(1)),
    ("p9", Some(9)),
    ("p5-b", Some(5)),
    ("p0", Some(0)),
    ("p10", Some(10)),
    ("p1-b", Some(1)),
];
/// By priority, highest first, then in publish order; no priority counts as 0.
const BY_PRIORITY: &[&str] = &["p10", "p9", "p5-a", "p5-b", "p1", "p1-b", "none", "p0"];

#[tokio::test]
async fn priority_queue_delivers_by_priority_then_fifo() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "prio",
        table(&[("x-max-priority", AMQPValue::LongInt(10))]),
    )
    .await;
    for (body, p) in MIXED {
        publish_prio(&ch, "prio", body, *p).await;
    }
    assert_eq!(message_count(&ch, "prio").await, MIXED.len() as u32);
    assert_eq!(drain(&ch, "prio").await, BY_PRIORITY, "basic.get order");

    // The same order to a consumer that subscribes after the messages arrived.
    for (body, p) in MIXED {
        publish_prio(&ch, "prio", body, *p).await;
    }
    let mut c = consume(&ch, "prio", "reader").await;
    let mut got = Vec::new();
    for _ in 0..MIXED.len() {
        let d = next(&mut c).await;
        got.push(body(&d));
        ack(&d).await;
    }
    assert_eq!(got, BY_PRIORITY, "consumer order");
    finish(server, conn).await;
}

#[tokio::test]
async fn priorities_above_the_maximum_count_as_the_maximum() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "prio3",
        table(&[("x-max-priority", AMQPValue::ShortShortUInt(3))]),
    )
    .await;
    publish_prio(&ch, "prio3", "two", Some(2)).await;
    publish_prio(&ch, "prio3", "p200", Some(200)).await;
    publish_prio(&ch, "prio3", "three", Some(3)).await;
    publish_prio(&ch, "prio3", "p7", Some(7)).await;
    assert_eq!(
        drain(&ch, "prio3").await,
        vec!["p200", "three", "p7", "two"]
    );
    finish(server, conn).await;
}

#[tokio::test]
async fn a_plain_queue_ignores_message_priority() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "fifo", FieldTable::default()).await;
    for (body, p) in MIXED {
        publish_prio(&ch, "fifo", body, *p).await;
    }
    let fifo: Vec<&str> = MIXED.iter().map(|(b, _)| *b).collect();
    assert_eq!(drain(&ch, "fifo").await, fifo);
    finish(server, conn).await;
}

#[tokio::test]
async fn requeued_messages_keep_their_priority_place() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "prio-rq",
        table(&[("x-max-priority", AMQPValue::LongInt(5))]),
    )
    .await;
    publish_prio(&ch, "prio-rq", "low", Some(1)).await;
    publish_prio(&ch, "prio-rq", "high", Some(5)).await;
    let taken = within(ch.basic_get("prio-rq".into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .expect("a message");
    assert_eq!(body(&taken.delivery), "high");
    publish_prio(&ch, "prio-rq", "mid", Some(3)).await;
    within(taken.delivery.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    }))
    .await
    .expect("nack");
    assert_eq!(drain(&ch, "prio-rq").await, vec!["high", "mid", "low"]);
    finish(server, conn).await;
}

fn priority(p: i32) -> FieldTable {
    table(&[("x-priority", AMQPValue::LongInt(p))])
}

#[tokio::test]
async fn high_priority_consumer_with_capacity_goes_first() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let other = connect(&server).await;
    let setup_ch = channel(&conn).await;
    declare(&setup_ch, "cp", FieldTable::default()).await;

    // The low-priority consumer registers first and has no prefetch limit.
    let low_ch = channel(&other).await;
    let mut low = consume_args(
        &low_ch,
        "cp",
        "low",
        BasicConsumeOptions::default(),
        priority(0),
    )
    .await;
    // The high-priority one may hold 3 unacknowledged messages.
    let high_ch = channel(&conn).await;
    within(high_ch.basic_qos(3, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut high = consume_args(
        &high_ch,
        "cp",
        "high",
        BasicConsumeOptions::default(),
        priority(10),
    )
    .await;

    // Published on the high consumer's connection, so its acks are handled before them.
    let publisher = channel(&conn).await;
    for i in 0..3 {
        publish(&publisher, "", "cp", &format!("m{i}")).await;
    }
    let mut held = Vec::new();
    for i in 0..3 {
        let d = next(&mut high).await;
        assert_eq!(body(&d), format!("m{i}"));
        held.push(d);
    }
    assert_no_delivery(&mut low).await;

    // The high-priority consumer is full: the low one gets what follows.
    publish(&publisher, "", "cp", "m3").await;
    publish(&publisher, "", "cp", "m4").await;
    assert_eq!(body(&next(&mut low).await), "m3");
    assert_eq!(body(&next(&mut low).await), "m4");
    assert_no_delivery(&mut high).await;

    // Capacity again: back to the high-priority consumer.
    ack(&held.remove(0)).await;
    publish(&publisher, "", "cp", "m5").await;
    assert_eq!(body(&next(&mut high).await), "m5");
    assert_no_delivery(&mut low).await;

    // Once it is gone, the low-priority consumer gets everything.
    within(high_ch.close(200, "done".into()))
        .await
        .expect("close");
    let mut redelivered = Vec::new();
    for _ in 0..3 {
        let d = next(&mut low).await;
        assert!(d.redelivered, "{} should be a redelivery", body(&d));
        redelivered.push(body(&d));
    }
    assert_eq!(redelivered, vec!["m1", "m2", "m5"]);
    within(other.close(200, "bye".into())).await.ok();
    finish(server, conn).await;
}

#[tokio::test]
async fn invalid_consumer_priority_is_406() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "cp-bad", FieldTable::default()).await;
    let text = expect_code(
        within(ch.basic_consume(
            "cp-bad".into(),
            "bad".into(),
            BasicConsumeOptions::default(),
            table(&[("x-priority", ls("high"))]),
        ))
        .await,
        406,
    );
    assert!(text.contains("x-priority"), "{text}");
    finish(server, conn).await;
}
