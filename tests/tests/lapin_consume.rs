//! basic.consume, basic.cancel and basic.qos with lapin: prefetch, exclusivity, consumer tags
//! and round-robin delivery.

mod common;

use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

#[tokio::test]
async fn consume_receives_in_order_with_tags_and_metadata() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "c-order").await;
    fill(&ch, "c-order", &["m0", "m1", "m2"]).await;
    let mut consumer = consume(&ch, "c-order", "my-tag").await;
    assert_eq!(consumer.tag().as_str(), "my-tag");
    for i in 0..3u64 {
        let d = next(&mut consumer).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert_eq!(
            d.delivery_tag,
            i + 1,
            "delivery tags count from 1 per channel"
        );
        assert!(!d.redelivered);
        assert_eq!(d.exchange.as_str(), "");
        assert_eq!(d.routing_key.as_str(), "c-order");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // Messages published after the consumer started arrive too.
    publish(&ch, "", "c-order", b"late").await;
    assert_eq!(body(&next(&mut consumer).await), "late");
    server.shutdown().await;
}

#[tokio::test]
async fn server_generates_consumer_tags() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "c-gen").await;
    let a = consume(&ch, "c-gen", "").await;
    let b = consume(&ch, "c-gen", "").await;
    let (a, b) = (a.tag().to_string(), b.tag().to_string());
    assert!(a.starts_with("amq.ctag-"), "{a}");
    assert!(b.starts_with("amq.ctag-"), "{b}");
    assert!(a.len() > "amq.ctag-".len());
    assert_ne!(a, b);
    server.shutdown().await;
}

#[tokio::test]
async fn no_ack_consumer_takes_messages_for_good() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-noack").await;
    fill(&ch, "c-noack", &["a", "b", "c"]).await;
    let consumer_ch = channel(&conn).await;
    // Even a prefetch limit does not hold back a no-ack consumer.
    within(consumer_ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume_with(
        &consumer_ch,
        "c-noack",
        "na",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let got: Vec<String> = vec![
        body(&next(&mut consumer).await),
        body(&next(&mut consumer).await),
        body(&next(&mut consumer).await),
    ];
    assert_eq!(got, vec!["a", "b", "c"]);
    // Closing the channel requeues nothing: there was nothing to acknowledge.
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    assert_eq!(message_count(&ch, "c-noack").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries_per_consumer() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-prefetch").await;
    fill(&ch, "c-prefetch", &["1", "2", "3", "4", "5"]).await;
    let consumer_ch = channel(&conn).await;
    within(consumer_ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&consumer_ch, "c-prefetch", "pf").await;
    let d1 = next(&mut consumer).await;
    let d2 = next(&mut consumer).await;
    assert_eq!((body(&d1).as_str(), body(&d2).as_str()), ("1", "2"));
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&ch, "c-prefetch").await, 3);

    // Each ack frees exactly one slot.
    d1.ack(BasicAckOptions::default()).await.expect("ack");
    let d3 = next(&mut consumer).await;
    assert_eq!(body(&d3), "3");
    assert_no_delivery(&mut consumer).await;

    // An ack with multiple frees both remaining slots.
    within(consumer_ch.basic_ack(d3.delivery_tag, BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    let d4 = next(&mut consumer).await;
    let d5 = next(&mut consumer).await;
    assert_eq!((body(&d4).as_str(), body(&d5).as_str()), ("4", "5"));
    server.shutdown().await;
}

#[tokio::test]
async fn per_consumer_prefetch_applies_to_consumers_created_after_it() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-pf1").await;
    declare_queue(&ch, "c-pf2").await;
    fill(&ch, "c-pf1", &["a", "b", "c"]).await;
    fill(&ch, "c-pf2", &["x", "y", "z"]).await;
    let consumer_ch = channel(&conn).await;
    within(consumer_ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos 1");
    let mut c1 = consume(&consumer_ch, "c-pf1", "one").await;
    within(consumer_ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("qos 2");
    let mut c2 = consume(&consumer_ch, "c-pf2", "two").await;
    assert_eq!(body(&next(&mut c1).await), "a");
    assert_eq!(body(&next(&mut c2).await), "x");
    assert_eq!(body(&next(&mut c2).await), "y");
    // Each consumer's own limit: one for c1, two for c2.
    assert_no_delivery(&mut c1).await;
    assert_no_delivery(&mut c2).await;
    server.shutdown().await;
}

#[tokio::test]
async fn global_prefetch_is_shared_by_the_channel_consumers() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-g1").await;
    declare_queue(&ch, "c-g2").await;
    fill(&ch, "c-g1", &["a1", "a2", "a3", "a4"]).await;
    fill(&ch, "c-g2", &["b1", "b2", "b3", "b4"]).await;
    let consumer_ch = channel(&conn).await;
    within(consumer_ch.basic_qos(3, BasicQosOptions { global: true }))
        .await
        .expect("global qos");
    let mut c1 = consume(&consumer_ch, "c-g1", "g1").await;
    let mut c2 = consume(&consumer_ch, "c-g2", "g2").await;

    // Collect whatever arrives until nothing more comes: at most 3 in total.
    let mut got = Vec::new();
    loop {
        tokio::select! {
            Some(d) = c1.next() => got.push(d.expect("delivery")),
            Some(d) = c2.next() => got.push(d.expect("delivery")),
            _ = tokio::time::sleep(QUIET) => break,
        }
    }
    assert_eq!(got.len(), 3, "three unacked across the channel");
    // Acking one lets exactly one more through.
    got[0].ack(BasicAckOptions::default()).await.expect("ack");
    let mut more = 0;
    loop {
        tokio::select! {
            Some(d) = c1.next() => { d.expect("delivery"); more += 1 }
            Some(d) = c2.next() => { d.expect("delivery"); more += 1 }
            _ = tokio::time::sleep(QUIET) => break,
        }
    }
    assert_eq!(more, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn round_robin_between_consumers() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-rr").await;
    let consumer_ch = channel(&conn).await;
    let mut c1 = consume_with(
        &consumer_ch,
        "c-rr",
        "rr1",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let mut c2 = consume_with(
        &consumer_ch,
        "c-rr",
        "rr2",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    for i in 0..6 {
        publish(&ch, "", "c-rr", format!("m{i}").as_bytes()).await;
    }
    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    for _ in 0..3 {
        got1.push(body(&next(&mut c1).await));
        got2.push(body(&next(&mut c2).await));
    }
    assert_eq!(got1, vec!["m0", "m2", "m4"]);
    assert_eq!(got2, vec!["m1", "m3", "m5"]);
    server.shutdown().await;
}

#[tokio::test]
async fn round_robin_skips_a_consumer_at_its_prefetch_limit() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-rr2").await;
    let busy_ch = channel(&conn).await;
    within(busy_ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut busy = consume(&busy_ch, "c-rr2", "busy").await;
    let free_ch = channel(&conn).await;
    let mut free = consume_with(
        &free_ch,
        "c-rr2",
        "free",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    for i in 0..5 {
        publish(&ch, "", "c-rr2", format!("m{i}").as_bytes()).await;
    }
    assert_eq!(body(&next(&mut busy).await), "m0");
    let rest: Vec<String> = vec![
        body(&next(&mut free).await),
        body(&next(&mut free).await),
        body(&next(&mut free).await),
        body(&next(&mut free).await),
    ];
    assert_eq!(rest, vec!["m1", "m2", "m3", "m4"]);
    assert_no_delivery(&mut busy).await;
    server.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_deliveries() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-cancel").await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume_with(
        &consumer_ch,
        "c-cancel",
        "to-cancel",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    publish(&ch, "", "c-cancel", b"before").await;
    assert_eq!(body(&next(&mut consumer).await), "before");
    within(consumer_ch.basic_cancel("to-cancel".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    let end = within(consumer.next()).await;
    assert!(
        end.is_none(),
        "the stream ends after cancel-ok, got {end:?}"
    );
    publish(&ch, "", "c-cancel", b"after").await;
    assert_eq!(message_count(&ch, "c-cancel").await, 1, "nobody took it");
    let q = declare_queue(&ch, "c-cancel").await;
    assert_eq!(q.consumer_count(), 0);
    // Cancelling an unknown tag is not an error (the spec says to ignore it).
    within(consumer_ch.basic_cancel("never-existed".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel of an unknown tag");
    assert!(consumer_ch.status().connected());
    server.shutdown().await;
}

#[tokio::test]
async fn cancel_leaves_unacked_messages_with_the_channel() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-cancel-unacked").await;
    fill(&ch, "c-cancel-unacked", &["held"]).await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "c-cancel-unacked", "held-tag").await;
    let d = next(&mut consumer).await;
    within(consumer_ch.basic_cancel("held-tag".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    // Still unacked, not ready...
    assert_eq!(message_count(&ch, "c-cancel-unacked").await, 0);
    // ...and still ackable after the cancel.
    within(consumer_ch.basic_ack(d.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack");
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    assert_eq!(message_count(&ch, "c-cancel-unacked").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_consumer_locks_out_others() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-excl").await;
    let _owner = consume_with(
        &ch,
        "c-excl",
        "owner",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let ch2 = channel(&conn).await;
    let result = within(ch2.basic_consume(
        "c-excl".into(),
        "second".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - queue 'c-excl' in vhost '/' in exclusive use"
    );
    assert!(conn.status().connected(), "403 is a channel error");
    // The exclusive consumer is unaffected.
    let q = declare_queue(&ch, "c-excl").await;
    assert_eq!(q.consumer_count(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_consume_on_a_queue_with_consumers_is_refused() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-excl2").await;
    let _plain = consume(&ch, "c-excl2", "plain").await;
    let ch2 = channel(&conn).await;
    let result = within(ch2.basic_consume(
        "c-excl2".into(),
        "wants-all".into(),
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - queue 'c-excl2' in vhost '/' in exclusive use"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn consume_from_a_missing_queue_is_404() {
    let (server, _conn, ch) = setup().await;
    let result = within(ch.basic_consume(
        "c-missing".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'c-missing' in vhost '/'");
    server.shutdown().await;
}

#[tokio::test]
async fn reusing_a_consumer_tag_on_a_channel_is_a_530_connection_error() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-dup").await;
    let _first = consume(&ch, "c-dup", "dup").await;
    let result = within(ch.basic_consume(
        "c-dup".into(),
        "dup".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 530);
    assert_eq!(text, "NOT_ALLOWED - attempt to reuse consumer tag 'dup'");
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn consumers_on_separate_channels_of_one_connection() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "c-sep1").await;
    declare_queue(&ch, "c-sep2").await;
    let ch1 = channel(&conn).await;
    let ch2 = channel(&conn).await;
    let mut c1 = consume(&ch1, "c-sep1", "same-tag").await;
    // Tags are per channel: the same tag on another channel is fine.
    let mut c2 = consume(&ch2, "c-sep2", "same-tag").await;
    publish(&ch, "", "c-sep1", b"one").await;
    publish(&ch, "", "c-sep2", b"two").await;
    let d1 = next(&mut c1).await;
    let d2 = next(&mut c2).await;
    assert_eq!((body(&d1).as_str(), body(&d2).as_str()), ("one", "two"));
    // Each channel numbers its own deliveries.
    assert_eq!((d1.delivery_tag, d2.delivery_tag), (1, 1));
    server.shutdown().await;
}
