//! Acknowledgements with lapin: ack, ack multiple, nack and reject with and without requeue,
//! basic.recover, bad delivery tags, and unacked messages going back when a channel or
//! connection ends.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

/// basic.get with manual ack: the body, its delivery tag and its redelivered flag.
async fn get_unacked(ch: &Channel, queue: &str) -> (String, u64, bool) {
    let m = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .expect("a message");
    (
        String::from_utf8_lossy(&m.delivery.data).into_owned(),
        m.delivery.delivery_tag,
        m.delivery.redelivered,
    )
}

/// Drains `queue` with basic.get and returns (body, redelivered) pairs.
async fn drain_flags(ch: &Channel, queue: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(m) = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
    {
        out.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    out
}

fn owned(v: &[(&str, bool)]) -> Vec<(String, bool)> {
    v.iter().map(|(s, b)| (s.to_string(), *b)).collect()
}

#[tokio::test]
async fn ack_removes_the_message_for_good() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-ack").await;
    fill(&ch, "a-ack", &["a", "b"]).await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "a-ack", "acker").await;
    let d = next(&mut consumer).await;
    assert_eq!(body(&d), "a");
    assert!(d.ack(BasicAckOptions::default()).await.expect("ack"));
    let _b = next(&mut consumer).await; // left unacked
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    // Only the unacked one came back.
    assert_eq!(drain_flags(&ch, "a-ack").await, owned(&[("b", true)]));
    server.shutdown().await;
}

#[tokio::test]
async fn ack_multiple_acknowledges_everything_up_to_the_tag() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-multi").await;
    fill(&ch, "a-multi", &["1", "2", "3", "4", "5"]).await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "a-multi", "m").await;
    let mut tags = Vec::new();
    for _ in 0..5 {
        tags.push(next(&mut consumer).await.delivery_tag);
    }
    assert_eq!(tags, vec![1, 2, 3, 4, 5]);
    within(consumer_ch.basic_ack(3, BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    assert_eq!(
        drain_flags(&ch, "a-multi").await,
        owned(&[("4", true), ("5", true)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn ack_multiple_with_tag_zero_acknowledges_all() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-zero").await;
    fill(&ch, "a-zero", &["1", "2", "3"]).await;
    let ch2 = channel(&conn).await;
    for _ in 0..3 {
        get_unacked(&ch2, "a-zero").await;
    }
    within(ch2.basic_ack(0, BasicAckOptions { multiple: true }))
        .await
        .expect("ack all");
    within(ch2.close(200, "bye".into())).await.expect("close");
    assert_eq!(message_count(&ch, "a-zero").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn nack_with_requeue_puts_the_message_back_at_its_position() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "a-nack").await;
    fill(&ch, "a-nack", &["m1", "m2", "m3", "m4"]).await;
    let (b1, t1, r1) = get_unacked(&ch, "a-nack").await;
    let (b2, t2, _) = get_unacked(&ch, "a-nack").await;
    assert_eq!((b1.as_str(), b2.as_str(), r1), ("m1", "m2", false));
    // Requeue the later one first: the queue still puts each back where it was.
    within(ch.basic_nack(
        t2,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    ))
    .await
    .expect("nack m2");
    within(ch.basic_nack(
        t1,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    ))
    .await
    .expect("nack m1");
    assert_eq!(
        drain_flags(&ch, "a-nack").await,
        owned(&[("m1", true), ("m2", true), ("m3", false), ("m4", false)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn nacked_message_is_redelivered_to_the_consumer_before_later_ones() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-nack-consumer").await;
    fill(&ch, "a-nack-consumer", &["first", "second", "third"]).await;
    let consumer_ch = channel(&conn).await;
    within(consumer_ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&consumer_ch, "a-nack-consumer", "n").await;
    let d = next(&mut consumer).await;
    assert_eq!((body(&d).as_str(), d.redelivered), ("first", false));
    d.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    })
    .await
    .expect("nack");
    let d = next(&mut consumer).await;
    assert_eq!((body(&d).as_str(), d.redelivered), ("first", true));
    assert!(d.delivery_tag > 1, "a redelivery gets a new delivery tag");
    d.ack(BasicAckOptions::default()).await.expect("ack");
    let d = next(&mut consumer).await;
    assert_eq!((body(&d).as_str(), d.redelivered), ("second", false));
    server.shutdown().await;
}

#[tokio::test]
async fn nack_without_requeue_drops_the_message() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-drop").await;
    fill(&ch, "a-drop", &["drop-me", "keep"]).await;
    let ch2 = channel(&conn).await;
    let (b, tag, _) = get_unacked(&ch2, "a-drop").await;
    assert_eq!(b, "drop-me");
    within(ch2.basic_nack(
        tag,
        BasicNackOptions {
            multiple: false,
            requeue: false,
        },
    ))
    .await
    .expect("nack");
    // Gone even after the channel closes.
    within(ch2.close(200, "bye".into())).await.expect("close");
    assert_eq!(drain_flags(&ch, "a-drop").await, owned(&[("keep", false)]));
    server.shutdown().await;
}

#[tokio::test]
async fn nack_multiple_requeues_everything_up_to_the_tag() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-nack-multi").await;
    fill(&ch, "a-nack-multi", &["1", "2", "3", "4"]).await;
    let ch2 = channel(&conn).await;
    let mut tags = Vec::new();
    for _ in 0..3 {
        tags.push(get_unacked(&ch2, "a-nack-multi").await.1);
    }
    within(ch2.basic_nack(
        tags[1],
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    ))
    .await
    .expect("nack multiple");
    // 1 and 2 are back, 3 is still unacked on ch2, 4 was never delivered.
    assert_eq!(
        drain_flags(&ch, "a-nack-multi").await,
        owned(&[("1", true), ("2", true), ("4", false)])
    );
    within(ch2.close(200, "bye".into())).await.expect("close");
    assert_eq!(
        drain_flags(&ch, "a-nack-multi").await,
        owned(&[("3", true)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn reject_with_and_without_requeue() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-reject").await;
    fill(&ch, "a-reject", &["back", "gone", "after"]).await;
    let ch2 = channel(&conn).await;
    let (b1, t1, _) = get_unacked(&ch2, "a-reject").await;
    let (b2, t2, _) = get_unacked(&ch2, "a-reject").await;
    assert_eq!((b1.as_str(), b2.as_str()), ("back", "gone"));
    within(ch2.basic_reject(t1, BasicRejectOptions { requeue: true }))
        .await
        .expect("reject requeue");
    within(ch2.basic_reject(t2, BasicRejectOptions { requeue: false }))
        .await
        .expect("reject drop");
    within(ch2.close(200, "bye".into())).await.expect("close");
    assert_eq!(
        drain_flags(&ch, "a-reject").await,
        owned(&[("back", true), ("after", false)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn double_ack_is_a_406_channel_error() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-double").await;
    fill(&ch, "a-double", &["once"]).await;
    let ch2 = channel(&conn).await;
    let (_, tag, _) = get_unacked(&ch2, "a-double").await;
    assert_eq!(tag, 1);
    let mut errors = ErrorWatch::new(&conn);
    within(ch2.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("first ack");
    within(ch2.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("second ack is sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(code, 406);
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 1");
    assert!(conn.status().connected(), "only the channel closes");
    // The first ack counted: the message is not requeued by the channel's close.
    assert_eq!(message_count(&ch, "a-double").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn ack_of_an_unknown_tag_is_a_406_and_requeues_the_unacked() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-unknown").await;
    fill(&ch, "a-unknown", &["held"]).await;
    let ch2 = channel(&conn).await;
    get_unacked(&ch2, "a-unknown").await;
    let mut errors = ErrorWatch::new(&conn);
    within(ch2.basic_ack(99, BasicAckOptions::default()))
        .await
        .expect("ack sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(code, 406);
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 99");
    // The channel's unacked message went back to its queue when the error closed it.
    assert_eq!(
        drain_flags(&ch, "a-unknown").await,
        owned(&[("held", true)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn nack_and_reject_of_unknown_tags_are_406() {
    let (server, conn, _ch) = setup().await;
    let mut errors = ErrorWatch::new(&conn);
    let ch = channel(&conn).await;
    within(ch.basic_nack(7, BasicNackOptions::default()))
        .await
        .expect("nack sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(
        (code, text.as_str()),
        (406, "PRECONDITION_FAILED - unknown delivery tag 7")
    );
    let ch = channel(&conn).await;
    within(ch.basic_reject(8, BasicRejectOptions::default()))
        .await
        .expect("reject sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(
        (code, text.as_str()),
        (406, "PRECONDITION_FAILED - unknown delivery tag 8")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn acking_a_no_ack_delivery_is_406() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-noack").await;
    fill(&ch, "a-noack", &["auto"]).await;
    let ch2 = channel(&conn).await;
    let m = within(ch2.basic_get("a-noack".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    let mut errors = ErrorWatch::new(&conn);
    within(ch2.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack sent");
    let (code, _) = errors.next_error().await;
    assert_eq!(code, 406);
    server.shutdown().await;
}

#[tokio::test]
async fn recover_redelivers_unacked_messages() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-recover").await;
    fill(&ch, "a-recover", &["r1", "r2"]).await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "a-recover", "rec").await;
    let d1 = next(&mut consumer).await;
    let d2 = next(&mut consumer).await;
    assert!(!d1.redelivered && !d2.redelivered);
    within(consumer_ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .expect("recover");
    let r1 = next(&mut consumer).await;
    let r2 = next(&mut consumer).await;
    assert_eq!((body(&r1).as_str(), r1.redelivered), ("r1", true));
    assert_eq!((body(&r2).as_str(), r2.redelivered), ("r2", true));
    assert!(
        r1.delivery_tag > d2.delivery_tag,
        "redeliveries get new tags"
    );
    r1.ack(BasicAckOptions::default()).await.expect("ack r1");
    r2.ack(BasicAckOptions::default()).await.expect("ack r2");
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    assert_eq!(message_count(&ch, "a-recover").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn recover_requeues_basic_get_messages() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-recover-get").await;
    fill(&ch, "a-recover-get", &["g1", "g2", "g3"]).await;
    let ch2 = channel(&conn).await;
    get_unacked(&ch2, "a-recover-get").await;
    get_unacked(&ch2, "a-recover-get").await;
    within(ch2.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .expect("recover");
    assert_eq!(
        drain_flags(&ch, "a-recover-get").await,
        owned(&[("g1", true), ("g2", true), ("g3", false)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn recover_without_requeue_is_not_implemented() {
    // RabbitMQ: basic.recover requeue=false is a 540 NOT_IMPLEMENTED connection error.
    let (server, conn, ch) = setup().await;
    let result = within(ch.basic_recover(BasicRecoverOptions { requeue: false })).await;
    let text = expect_code(result, 540);
    assert_eq!(text, "NOT_IMPLEMENTED - requeue=false");
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn unacked_messages_are_requeued_when_the_channel_closes() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-close-ch").await;
    fill(&ch, "a-close-ch", &["u1", "u2", "u3"]).await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "a-close-ch", "closer").await;
    let d1 = next(&mut consumer).await;
    let _d2 = next(&mut consumer).await;
    let _d3 = next(&mut consumer).await;
    d1.ack(BasicAckOptions::default()).await.expect("ack u1");
    assert_eq!(message_count(&ch, "a-close-ch").await, 0);
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    assert_eq!(
        drain_flags(&ch, "a-close-ch").await,
        owned(&[("u2", true), ("u3", true)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unacked_messages_are_requeued_when_the_connection_closes() {
    let server = warren_tests::start_server();
    let observer = connect(&server).await;
    let ch = channel(&observer).await;
    declare_queue(&ch, "a-close-conn").await;
    fill(&ch, "a-close-conn", &["c1", "c2", "c3"]).await;

    let consumer_conn = connect(&server).await;
    let consumer_ch = channel(&consumer_conn).await;
    // Two for the consumer, the third for basic.get.
    within(consumer_ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&consumer_ch, "a-close-conn", "gone").await;
    let _ = next(&mut consumer).await;
    let _ = next(&mut consumer).await;
    let got_ch = channel(&consumer_conn).await;
    get_unacked(&got_ch, "a-close-conn").await;
    within(consumer_conn.close(200, "bye".into()))
        .await
        .expect("close connection");
    // Wait for the server to finish with the closed connection.
    within(async {
        while message_count(&ch, "a-close-conn").await < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        drain_flags(&ch, "a-close-conn").await,
        owned(&[("c1", true), ("c2", true), ("c3", true)])
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unacked_messages_are_requeued_when_a_channel_error_closes_the_channel() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-err").await;
    fill(&ch, "a-err", &["e1"]).await;
    let ch2 = channel(&conn).await;
    let mut consumer = consume(&ch2, "a-err", "err").await;
    let d = next(&mut consumer).await;
    assert_eq!(body(&d), "e1");
    // A channel error on ch2.
    let result = within(ch2.queue_declare(
        "a-err-missing".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    expect_code(result, 404);
    assert_eq!(drain_flags(&ch, "a-err").await, owned(&[("e1", true)]));
    server.shutdown().await;
}

#[tokio::test]
async fn redelivered_flag_survives_until_ack() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "a-redeliver").await;
    publish_with(
        &ch,
        "",
        "a-redeliver",
        b"again",
        BasicProperties::default().with_message_id("id-1".into()),
    )
    .await;
    // Delivered, requeued by a channel close twice over: still the same message, flagged.
    for _ in 0..2 {
        let ch2 = channel(&conn).await;
        get_unacked(&ch2, "a-redeliver").await;
        within(ch2.close(200, "bye".into())).await.expect("close");
    }
    let m = within(ch.basic_get("a-redeliver".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    assert!(m.delivery.redelivered);
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("id-1")
    );
    assert_eq!(m.delivery.data, b"again");
    server.shutdown().await;
}
