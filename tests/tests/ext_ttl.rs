//! RabbitMQ's message TTL (`x-message-ttl`, the `expiration` property) and queue TTL
//! (`x-expires`), end to end with lapin.

mod ext_common;

use std::time::Duration;

use ext_common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

fn expiring(ms: &str) -> BasicProperties {
    BasicProperties::default().with_expiration(ms.into())
}

#[tokio::test]
async fn queue_ttl_expires_ready_messages() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "ttl.q",
        table(&[("x-message-ttl", AMQPValue::LongInt(150))]),
    )
    .await;
    for b in ["a", "b", "c"] {
        publish(&ch, "", "ttl.q", b).await;
    }
    assert_eq!(message_count(&ch, "ttl.q").await, 3);
    // Taken before its TTL: delivered normally.
    assert_eq!(get_body(&ch, "ttl.q").await.as_deref(), Some("a"));

    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        message_count(&ch, "ttl.q").await,
        0,
        "expired messages leave the queue"
    );
    assert!(
        get(&ch, "ttl.q").await.is_none(),
        "expired messages are not delivered"
    );
    let mut c = consume(&ch, "ttl.q", "late").await;
    assert_no_delivery(&mut c).await;

    // A fresh message is still delivered: the TTL counts from enqueue.
    publish(&ch, "", "ttl.q", "fresh").await;
    assert_eq!(body(&next(&mut c).await), "fresh");
    finish(server, conn).await;
}

#[tokio::test]
async fn per_message_expiration_behind_a_longer_lived_head() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "exp.q", FieldTable::default()).await;
    publish_props(&ch, "", "exp.q", b"head", expiring("60000")).await;
    publish_props(&ch, "", "exp.q", b"short", expiring("100")).await;
    publish_props(&ch, "", "exp.q", b"forever", BasicProperties::default()).await;
    assert_eq!(message_count(&ch, "exp.q").await, 3);

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        message_count(&ch, "exp.q").await,
        2,
        "the short-lived message is gone even though a longer-lived one is ahead of it"
    );
    assert_eq!(drain(&ch, "exp.q").await, vec!["head", "forever"]);
    finish(server, conn).await;
}

#[tokio::test]
async fn the_smaller_of_queue_and_message_ttl_applies() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "min.q",
        table(&[("x-message-ttl", AMQPValue::LongInt(150))]),
    )
    .await;
    // The message asks for longer than the queue allows: the queue's TTL wins.
    publish_props(&ch, "", "min.q", b"long", expiring("60000")).await;
    // The queue allows longer than the message asks: the message's TTL wins.
    declare(
        &ch,
        "min.q2",
        table(&[("x-message-ttl", AMQPValue::LongInt(60_000))]),
    )
    .await;
    publish_props(&ch, "", "min.q2", b"short", expiring("100")).await;
    publish_props(&ch, "", "min.q2", b"kept", BasicProperties::default()).await;

    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(message_count(&ch, "min.q").await, 0);
    assert_eq!(drain(&ch, "min.q2").await, vec!["kept"]);
    finish(server, conn).await;
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_with_reason_expired() {
    let (server, conn, ch) = setup().await;
    declare_exchange(&ch, "ttl.dlx", ExchangeKind::Fanout, FieldTable::default()).await;
    declare(&ch, "ttl.dead", FieldTable::default()).await;
    bind(&ch, "ttl.dead", "ttl.dlx", "").await;
    declare(
        &ch,
        "ttl.work",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-dead-letter-exchange", ls("ttl.dlx")),
        ]),
    )
    .await;
    let mut dead = consume(&ch, "ttl.dead", "dead").await;

    let props = BasicProperties::default()
        .with_message_id("id-1".into())
        .with_content_type("text/plain".into());
    publish_props(&ch, "", "ttl.work", b"queue-ttl", props).await;
    let d = next(&mut dead).await;
    assert_eq!(body(&d), "queue-ttl");
    assert_eq!(
        d.exchange.as_str(),
        "ttl.dlx",
        "dead letters come through the DLX"
    );
    assert_eq!(
        d.routing_key.as_str(),
        "ttl.work",
        "the original routing key is kept"
    );
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("id-1")
    );
    assert_eq!(
        d.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    let deaths = x_death(&d.properties);
    assert_eq!(deaths.len(), 1);
    assert_death(
        &deaths[0],
        &Death {
            count: 1,
            reason: "expired",
            queue: "ttl.work",
            exchange: "",
            routing_keys: &["ttl.work"],
        },
    );
    assert_eq!(deaths[0].inner().get("original-expiration"), None);
    assert_header(&d.properties, "x-first-death-reason", "expired");
    assert_header(&d.properties, "x-first-death-queue", "ttl.work");
    assert_header(&d.properties, "x-first-death-exchange", "");
    ack(&d).await;

    // A per-message TTL is recorded as original-expiration and removed from the copy, so the
    // dead letter does not expire again.
    publish_props(&ch, "", "ttl.work", b"message-ttl", expiring("50")).await;
    let d = next(&mut dead).await;
    assert_eq!(body(&d), "message-ttl");
    assert_eq!(
        d.properties.expiration(),
        &None,
        "the expiration property is removed"
    );
    let deaths = x_death(&d.properties);
    assert_eq!(deaths.len(), 1);
    assert_eq!(deaths[0].inner().get("reason"), Some(&ls("expired")));
    assert_eq!(
        deaths[0].inner().get("original-expiration"),
        Some(&ls("50"))
    );
    ack(&d).await;
    assert_eq!(message_count(&ch, "ttl.work").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn invalid_expiration_closes_the_channel_with_406() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "bad-exp", FieldTable::default()).await;
    for bad in ["abc", "-1"] {
        let ch = channel(&conn).await;
        let (code, text) = publish_refused(&ch, "", "bad-exp", expiring(bad)).await;
        assert_eq!(code, 406, "expiration {bad:?}: {text}");
        assert!(
            text.contains("PRECONDITION_FAILED") && text.contains("expiration"),
            "expiration {bad:?}: {text}"
        );
    }
    assert!(conn.status().connected(), "406 closes the channel only");
    assert_eq!(
        message_count(&ch, "bad-exp").await,
        0,
        "the message was not enqueued"
    );
    finish(server, conn).await;
}

#[tokio::test]
async fn unused_queue_expires_with_x_expires() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "gone-soon",
        table(&[("x-expires", AMQPValue::LongInt(200))]),
    )
    .await;
    publish(&ch, "", "gone-soon", "in it").await;
    assert_eq!(
        message_count(&ch, "gone-soon").await,
        1,
        "the queue exists at first"
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    let ch2 = channel(&conn).await;
    let text = expect_code(passive(&ch2, "gone-soon").await, 404);
    assert!(text.contains("gone-soon"), "{text}");
    finish(server, conn).await;
}

#[tokio::test]
async fn a_consumed_queue_does_not_expire_until_its_consumer_leaves() {
    let (server, conn, ch) = setup().await;
    declare(
        &ch,
        "kept",
        table(&[("x-expires", AMQPValue::LongInt(200))]),
    )
    .await;
    let c = consume(&ch, "kept", "holder").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = channel(&conn).await;
    let q = passive(&probe, "kept")
        .await
        .expect("a queue with a consumer is in use");
    assert_eq!(q.consumer_count(), 1);

    within(ch.basic_cancel(c.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    tokio::time::sleep(Duration::from_millis(600)).await;
    expect_code(passive(&probe, "kept").await, 404);
    finish(server, conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_ttl_delivers_only_to_a_waiting_consumer() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "ttl0.dead", FieldTable::default()).await;
    declare(
        &ch,
        "ttl0",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls("ttl0.dead")),
        ]),
    )
    .await;
    // No consumer: each message expires on arrival, as RabbitMQ drops it at publish; it is
    // never counted, and it is dead-lettered at once.
    for i in 0..50 {
        publish(&ch, "", "ttl0", &format!("gone {i}")).await;
        assert_eq!(message_count(&ch, "ttl0").await, 0, "publish {i}");
        assert_eq!(message_count(&ch, "ttl0.dead").await, i + 1, "publish {i}");
    }
    let dead = get(&ch, "ttl0.dead").await.expect("dead letter");
    assert_eq!(body(&dead.delivery), "gone 0");
    assert_eq!(
        x_death(&dead.delivery.properties)[0].inner().get("reason"),
        Some(&ls("expired"))
    );
    // Per-message expiration "0" behaves the same.
    declare(&ch, "exp0", FieldTable::default()).await;
    publish_props(&ch, "", "exp0", b"gone", expiring("0")).await;
    assert_eq!(message_count(&ch, "exp0").await, 0);
    assert!(get(&ch, "exp0").await.is_none());

    // A consumer ready to take it gets it.
    let mut c = consume(&ch, "ttl0", "ready").await;
    publish(&ch, "", "ttl0", "taken").await;
    assert_eq!(body(&next(&mut c).await), "taken");
    finish(server, conn).await;
}

#[tokio::test]
async fn a_message_requeued_after_its_ttl_is_dead_lettered_not_redelivered() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "rq.dead", FieldTable::default()).await;
    declare(
        &ch,
        "rq.ttl",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(150)),
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls("rq.dead")),
        ]),
    )
    .await;
    publish(&ch, "", "rq.ttl", "slow").await;
    let m = within(ch.basic_get("rq.ttl".into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .expect("a message");
    tokio::time::sleep(Duration::from_millis(350)).await;
    within(m.delivery.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    }))
    .await
    .expect("nack");
    assert!(
        get(&ch, "rq.ttl").await.is_none(),
        "expired while unacked: not redelivered"
    );
    let dead = get(&ch, "rq.dead").await.expect("dead-lettered instead");
    assert_eq!(body(&dead.delivery), "slow");
    assert_eq!(
        x_death(&dead.delivery.properties)[0].inner().get("reason"),
        Some(&ls("expired"))
    );
    finish(server, conn).await;
}
