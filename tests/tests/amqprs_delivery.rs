//! amqprs end-to-end: delivery details beyond the basics — several consumers, auto-ack,
//! channel-wide qos, channel.flow, basic.recover, multi-frame bodies, and requeueing when a
//! connection goes away.

mod amqprs_common;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments,
    BasicQosArguments, Channel,
};
use amqprs::BasicProperties;
use amqprs_common::*;
use tokio::sync::mpsc::UnboundedReceiver;

async fn consume_with(
    ch: &Channel,
    args: BasicConsumeArguments,
) -> (String, UnboundedReceiver<Delivery>) {
    let (consumer, rx) = RecordingConsumer::new();
    let tag = within("basic.consume-ok", ch.basic_consume(consumer, args))
        .await
        .expect("basic.consume");
    (tag, rx)
}

async fn consume(ch: &Channel, queue: &str, tag: &str) -> (String, UnboundedReceiver<Delivery>) {
    consume_with(ch, BasicConsumeArguments::new(queue, tag)).await
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) {
    within(
        "basic.ack",
        ch.basic_ack(BasicAckArguments::new(tag, multiple)),
    )
    .await
    .expect("basic.ack");
}

#[tokio::test]
async fn consumers_on_one_queue_share_it_round_robin() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "rr").await;
    let (_a, mut rx_a) = consume(&ch, "rr", "a").await;
    let (_b, mut rx_b) = consume(&ch, "rr", "b").await;
    assert_eq!(queue_counts(&ch, "rr").await, (0, 2));

    for i in 0..6 {
        publish(&ch, "", "rr", format!("r{i}")).await;
    }
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        a.push(next(&mut rx_a, "delivery to a").await);
        b.push(next(&mut rx_b, "delivery to b").await);
    }
    assert_quiet(&mut rx_a, "a got its share").await;
    assert_quiet(&mut rx_b, "b got its share").await;
    let mut all: Vec<String> = a.iter().chain(b.iter()).map(Delivery::text).collect();
    all.sort();
    assert_eq!(all, ["r0", "r1", "r2", "r3", "r4", "r5"]);
    assert!(a.iter().all(|d| d.consumer_tag == "a"));
    assert!(b.iter().all(|d| d.consumer_tag == "b"));
    // Each consumer sees its messages in queue order.
    for side in [&a, &b] {
        let texts: Vec<String> = side.iter().map(Delivery::text).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
    }
    // Delivery tags are per channel: 1..=6 across both consumers.
    let mut tags: Vec<u64> = a.iter().chain(b.iter()).map(|d| d.delivery_tag).collect();
    tags.sort();
    assert_eq!(tags, [1, 2, 3, 4, 5, 6]);

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn auto_ack_consumer_messages_are_not_requeued() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "aa").await;
    for i in 0..3 {
        publish(&ch, "", "aa", format!("a{i}")).await;
    }
    let (_tag, mut rx) = consume_with(
        &ch,
        BasicConsumeArguments::new("aa", "auto")
            .auto_ack(true)
            .finish(),
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            next(&mut rx, "auto-ack delivery").await.text(),
            format!("a{i}")
        );
    }
    within("channel.close-ok", ch.close()).await.unwrap();
    let (ch2, _ev2) = channel(&conn).await;
    assert_eq!(
        queue_counts(&ch2, "aa").await,
        (0, 0),
        "auto-acked messages are gone"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn global_qos_limits_the_whole_channel() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "g1").await;
    declare_queue(&ch, "g2").await;
    for i in 0..3 {
        publish(&ch, "", "g1", format!("one-{i}")).await;
        publish(&ch, "", "g2", format!("two-{i}")).await;
    }
    within(
        "basic.qos-ok",
        ch.basic_qos(BasicQosArguments::new(0, 3, true)),
    )
    .await
    .expect("basic.qos global");
    let (_t1, mut rx1) = consume(&ch, "g1", "c1").await;
    let (_t2, mut rx2) = consume(&ch, "g2", "c2").await;

    // Three unacked across both consumers, no more.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 3 {
        tokio::select! {
            Some(d) = rx1.recv() => got.push(d),
            Some(d) = rx2.recv() => got.push(d),
            _ = tokio::time::sleep_until(deadline) => panic!("only {} deliveries", got.len()),
        }
    }
    assert_quiet(&mut rx1, "channel limit reached (c1)").await;
    assert_quiet(&mut rx2, "channel limit reached (c2)").await;
    let (r1, _) = queue_counts(&ch, "g1").await;
    let (r2, _) = queue_counts(&ch, "g2").await;
    assert_eq!(r1 + r2, 3, "three still ready");

    // Acking everything lets the other three through.
    ack(&ch, 0, true).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 6 {
        tokio::select! {
            Some(d) = rx1.recv() => got.push(d),
            Some(d) = rx2.recv() => got.push(d),
            _ = tokio::time::sleep_until(deadline) => panic!("only {} deliveries", got.len()),
        }
    }
    let mut texts: Vec<String> = got.iter().map(Delivery::text).collect();
    texts.sort();
    assert_eq!(
        texts,
        ["one-0", "one-1", "one-2", "two-0", "two-1", "two-2"]
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn channel_flow_pauses_and_resumes_deliveries() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "flow").await;
    let (_tag, mut rx) = consume(&ch, "flow", "flowing").await;

    let active = within("channel.flow-ok", ch.flow(false))
        .await
        .expect("flow");
    assert!(!active, "flow-ok echoes active=false");
    publish(&ch, "", "flow", "held").await;
    assert_quiet(&mut rx, "no deliveries while flow is off").await;
    assert_eq!(queue_counts(&ch, "flow").await, (1, 1));

    let active = within("channel.flow-ok", ch.flow(true))
        .await
        .expect("flow");
    assert!(active);
    let d = next(&mut rx, "delivery after flow resumes").await;
    assert_eq!(d.text(), "held");
    ack(&ch, d.delivery_tag, false).await;

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn basic_recover_redelivers_unacked() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "rec").await;
    for i in 0..3 {
        publish(&ch, "", "rec", format!("v{i}")).await;
    }
    let (_tag, mut rx) = consume(&ch, "rec", "recovering").await;
    let first: Vec<Delivery> = vec![
        next(&mut rx, "v0").await,
        next(&mut rx, "v1").await,
        next(&mut rx, "v2").await,
    ];
    ack(&ch, first[1].delivery_tag, false).await;

    within("basic.recover-ok", ch.basic_recover(true))
        .await
        .expect("basic.recover");
    let again = [
        next(&mut rx, "v0 again").await,
        next(&mut rx, "v2 again").await,
    ];
    assert_eq!(again[0].text(), "v0");
    assert_eq!(again[1].text(), "v2");
    assert!(again.iter().all(|d| d.redelivered));
    assert_quiet(&mut rx, "the acked one is not recovered").await;
    ack(&ch, 0, true).await;
    assert_eq!(queue_counts(&ch, "rec").await, (0, 1));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn bodies_larger_than_a_frame_round_trip() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let frame_max = conn.frame_max() as usize;
    let (ch, mut ev) = confirm_channel(&conn).await;
    declare_queue(&ch, "big").await;

    let sizes = [frame_max - 8, frame_max, 3 * frame_max + 17, 1024 * 1024];
    let payload = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 31 % 251) as u8).collect() };
    for &n in &sizes {
        let props = BasicProperties::default()
            .with_message_id(&n.to_string())
            .finish();
        within(
            "basic.publish (large)",
            ch.basic_publish(props, payload(n), BasicPublishArguments::new("", "big")),
        )
        .await
        .unwrap();
    }
    let others = await_confirms(&mut ev, sizes.len() as u64).await;
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(queue_counts(&ch, "big").await, (sizes.len() as u32, 0));

    // The first two through basic.get, the rest through a consumer.
    for &n in &sizes[..2] {
        let (_ok, props, body) = within(
            "basic.get-ok (large)",
            ch.basic_get(BasicGetArguments::new("big").no_ack(true).finish()),
        )
        .await
        .unwrap()
        .expect("large message");
        assert_eq!(
            props.message_id().map(String::as_str),
            Some(n.to_string().as_str())
        );
        assert_eq!(body.len(), n);
        assert!(body == payload(n), "body of {n} bytes corrupted");
    }
    let (_tag, mut rx) = consume_with(
        &ch,
        BasicConsumeArguments::new("big", "big-consumer")
            .auto_ack(true)
            .finish(),
    )
    .await;
    for &n in &sizes[2..] {
        let d = next(&mut rx, "large delivery").await;
        assert_eq!(d.body.len(), n);
        assert!(d.body == payload(n), "body of {n} bytes corrupted");
    }

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn closing_a_connection_requeues_its_unacked_messages_for_others() {
    let server = warren_tests::start_server();
    let first = connect(&server).await;
    let second = connect(&server).await;
    let (ch1, _ev1) = channel(&first).await;
    declare_queue(&ch1, "handover").await;
    for i in 0..4 {
        publish(&ch1, "", "handover", format!("h{i}")).await;
    }
    within(
        "basic.qos-ok",
        ch1.basic_qos(BasicQosArguments::new(0, 2, false)),
    )
    .await
    .unwrap();
    let (_t1, mut rx1) = consume(&ch1, "handover", "first").await;
    let d0 = next(&mut rx1, "h0").await;
    let d1 = next(&mut rx1, "h1").await;
    assert_eq!((d0.text().as_str(), d1.text().as_str()), ("h0", "h1"));
    ack(&ch1, d0.delivery_tag, false).await;
    let d2 = next(&mut rx1, "h2").await;
    assert_eq!(d2.text(), "h2");

    let (ch2, _ev2) = channel(&second).await;
    let (_t2, mut rx2) = consume(&ch2, "handover", "second").await;
    // h3 is ready and goes to the second consumer straight away.
    let h3 = next(&mut rx2, "h3 to the second consumer").await;
    assert_eq!(h3.text(), "h3");
    assert!(!h3.redelivered);

    within("connection.close-ok", first.close()).await.unwrap();
    let h1 = next(&mut rx2, "h1 requeued").await;
    let h2 = next(&mut rx2, "h2 requeued").await;
    assert_eq!((h1.text().as_str(), h2.text().as_str()), ("h1", "h2"));
    assert!(h1.redelivered && h2.redelivered);
    assert_quiet(&mut rx2, "h0 was acked and stays gone").await;
    assert_eq!(queue_counts(&ch2, "handover").await, (0, 1));

    within("connection.close-ok", second.close()).await.unwrap();
    server.shutdown().await;
}
