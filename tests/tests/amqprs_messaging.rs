//! amqprs end-to-end: publisher confirms, mandatory returns, consumers, acknowledgements, qos,
//! cancel, basic.get, consumer cancel notification, properties and a 10,000-message burst.

mod amqprs_common;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicNackArguments, BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel,
    QueueBindArguments, QueueDeleteArguments,
};
use amqprs::{BasicProperties, DecimalValue, FieldArray, FieldTable, FieldValue};
use amqprs_common::*;
use tokio::sync::mpsc::UnboundedReceiver;

async fn consume(ch: &Channel, queue: &str, tag: &str) -> (String, UnboundedReceiver<Delivery>) {
    let (consumer, rx) = RecordingConsumer::new();
    let tag = within(
        "basic.consume-ok",
        ch.basic_consume(consumer, BasicConsumeArguments::new(queue, tag)),
    )
    .await
    .expect("basic.consume");
    (tag, rx)
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) {
    within(
        "basic.ack",
        ch.basic_ack(BasicAckArguments::new(tag, multiple)),
    )
    .await
    .expect("basic.ack");
}

async fn take(rx: &mut UnboundedReceiver<Delivery>, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(next(rx, &format!("delivery {} of {n}", i + 1)).await);
    }
    out
}

fn bodies(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(Delivery::text).collect()
}

#[tokio::test]
async fn confirms_ack_every_publish() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, mut ev) = confirm_channel(&conn).await;
    declare_queue(&ch, "cq").await;

    for i in 0..50 {
        publish(&ch, "", "cq", format!("c{i}")).await;
    }
    let others = await_confirms(&mut ev, 50).await;
    assert!(others.is_empty(), "unexpected events: {others:?}");
    // No confirm beyond the 50 publishes.
    assert_quiet(&mut ev, "after all confirms").await;
    assert_eq!(queue_counts(&ch, "cq").await, (50, 0));

    // A publish that routes nowhere is confirmed too (sequence 51), and to a fanout with two
    // queues once (52).
    publish(&ch, "amq.direct", "unbound-key", "lost").await;
    declare_queue(&ch, "cq2").await;
    for q in ["cq", "cq2"] {
        within(
            "queue.bind-ok",
            ch.queue_bind(QueueBindArguments::new(q, "amq.fanout", "")),
        )
        .await
        .unwrap();
    }
    publish(&ch, "amq.fanout", "", "both").await;
    let mut confirmed_upto = 50;
    while confirmed_upto < 52 {
        match next(&mut ev, "confirms 51 and 52").await {
            ChanEvent::Ack { tag, multiple } => {
                assert!(
                    tag > confirmed_upto && tag <= 52,
                    "ack {tag} (multiple={multiple})"
                );
                assert!(
                    multiple || tag == confirmed_upto + 1,
                    "ack {tag} skipped one"
                );
                confirmed_upto = tag;
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    assert_eq!(queue_counts(&ch, "cq").await, (51, 0));
    assert_eq!(queue_counts(&ch, "cq2").await, (1, 0));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn mandatory_unroutable_publish_is_returned_with_312() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, mut ev) = confirm_channel(&conn).await;
    declare_queue(&ch, "routable").await;

    let props = BasicProperties::default()
        .with_content_type("text/plain")
        .with_message_id("m-1")
        .finish();
    within(
        "basic.publish (mandatory)",
        ch.basic_publish(
            props,
            b"nobody home".to_vec(),
            BasicPublishArguments::new("amq.direct", "no-such-key")
                .mandatory(true)
                .finish(),
        ),
    )
    .await
    .unwrap();

    // basic.return comes before the confirm of the same publish.
    match next(&mut ev, "basic.return").await {
        ChanEvent::Return {
            code,
            text,
            exchange,
            routing_key,
            props,
            body,
        } => {
            assert_eq!(code, 312);
            assert_eq!(text, "NO_ROUTE");
            assert_eq!(exchange, "amq.direct");
            assert_eq!(routing_key, "no-such-key");
            assert_eq!(body, b"nobody home");
            assert_eq!(props.content_type().map(String::as_str), Some("text/plain"));
            assert_eq!(props.message_id().map(String::as_str), Some("m-1"));
        }
        other => panic!("expected basic.return, got {other:?}"),
    }
    let others = await_confirms(&mut ev, 1).await;
    assert!(others.is_empty(), "{others:?}");

    // Mandatory to the default exchange with no such queue: returned as well.
    within(
        "basic.publish (mandatory, default exchange)",
        ch.basic_publish(
            BasicProperties::default(),
            b"nowhere".to_vec(),
            BasicPublishArguments::new("", "no-such-queue")
                .mandatory(true)
                .finish(),
        ),
    )
    .await
    .unwrap();
    // Mandatory and routable: delivered, not returned.
    within(
        "basic.publish (mandatory, routable)",
        ch.basic_publish(
            BasicProperties::default(),
            b"arrives".to_vec(),
            BasicPublishArguments::new("", "routable")
                .mandatory(true)
                .finish(),
        ),
    )
    .await
    .unwrap();
    // Not mandatory and unroutable: silently dropped, no return.
    publish(&ch, "amq.direct", "no-such-key", "dropped").await;

    let others = await_confirms(&mut ev, 4).await;
    assert_eq!(others.len(), 1, "exactly one more return: {others:?}");
    match &others[0] {
        ChanEvent::Return {
            code,
            exchange,
            routing_key,
            body,
            ..
        } => {
            assert_eq!(*code, 312);
            assert_eq!(exchange, "");
            assert_eq!(routing_key, "no-such-queue");
            assert_eq!(body, b"nowhere");
        }
        other => panic!("expected basic.return, got {other:?}"),
    }
    assert_quiet(
        &mut ev,
        "no return for the routable or non-mandatory publishes",
    )
    .await;
    assert_eq!(queue_counts(&ch, "routable").await, (1, 0));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn consumer_receives_in_order_and_ack_removes() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "oq").await;
    for i in 0..10 {
        publish(&ch, "", "oq", format!("m{i}")).await;
    }

    let (tag, mut rx) = consume(&ch, "oq", "my-consumer").await;
    assert_eq!(tag, "my-consumer");
    let got = take(&mut rx, 10).await;
    assert_eq!(
        bodies(&got),
        (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.delivery_tag, i as u64 + 1, "delivery tags count from 1");
        assert_eq!(d.consumer_tag, "my-consumer");
        assert!(!d.redelivered);
        assert_eq!(d.exchange, "");
        assert_eq!(d.routing_key, "oq");
    }
    // Delivered but unacked: not ready, and the consumer is counted.
    assert_eq!(queue_counts(&ch, "oq").await, (0, 1));

    // Messages published while consuming go straight to the consumer.
    publish(&ch, "", "oq", "live").await;
    let live = next(&mut rx, "live delivery").await;
    assert_eq!(live.text(), "live");
    assert_eq!(live.delivery_tag, 11);

    // Ack the first five one by one, then the rest with multiple.
    for d in &got[..5] {
        ack(&ch, d.delivery_tag, false).await;
    }
    ack(&ch, 11, true).await;
    assert_quiet(&mut rx, "nothing redelivered after acks").await;

    // Acked messages are gone for good: closing the channel requeues nothing.
    within("channel.close-ok", ch.close()).await.unwrap();
    let (ch2, _ev2) = channel(&conn).await;
    assert_eq!(queue_counts(&ch2, "oq").await, (0, 0));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn unacked_messages_return_to_the_queue_when_the_channel_closes() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "uq").await;
    for i in 0..3 {
        publish(&ch, "", "uq", format!("u{i}")).await;
    }
    let (_tag, mut rx) = consume(&ch, "uq", "").await;
    let got = take(&mut rx, 3).await;
    assert!(
        got[0].consumer_tag.starts_with("amq.ctag-"),
        "{}",
        got[0].consumer_tag
    );
    ack(&ch, got[1].delivery_tag, false).await;
    within("channel.close-ok", ch.close()).await.unwrap();

    let (ch2, _ev2) = channel(&conn).await;
    assert_eq!(queue_counts(&ch2, "uq").await, (2, 0));
    let (_tag, mut rx2) = consume(&ch2, "uq", "again").await;
    let again = take(&mut rx2, 2).await;
    assert_eq!(bodies(&again), ["u0", "u2"]);
    assert!(
        again.iter().all(|d| d.redelivered),
        "requeued messages are redelivered"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn nack_with_requeue_redelivers_in_original_order() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "nq").await;
    for i in 0..4 {
        publish(&ch, "", "nq", format!("n{i}")).await;
    }
    let (_tag, mut rx) = consume(&ch, "nq", "nacker").await;
    let first = take(&mut rx, 4).await;
    assert_eq!(bodies(&first), ["n0", "n1", "n2", "n3"]);
    assert!(first.iter().all(|d| !d.redelivered));

    // Nack n1..n3 (multiple up to the last tag would include n0, so ack n0 first).
    ack(&ch, first[0].delivery_tag, false).await;
    within(
        "basic.nack",
        ch.basic_nack(BasicNackArguments::new(first[3].delivery_tag, true, true)),
    )
    .await
    .unwrap();
    let again = take(&mut rx, 3).await;
    assert_eq!(bodies(&again), ["n1", "n2", "n3"], "original order kept");
    assert!(again.iter().all(|d| d.redelivered), "redelivered flag set");
    assert!(
        again.iter().all(|d| d.delivery_tag > first[3].delivery_tag),
        "redeliveries get new delivery tags"
    );

    // A single nack with requeue puts one back, still in front of later messages.
    publish(&ch, "", "nq", "n4").await;
    let n4 = next(&mut rx, "n4").await;
    assert_eq!(n4.text(), "n4");
    within(
        "basic.nack",
        ch.basic_nack(BasicNackArguments::new(again[1].delivery_tag, false, true)),
    )
    .await
    .unwrap();
    let n2 = next(&mut rx, "n2 again").await;
    assert_eq!(n2.text(), "n2");
    assert!(n2.redelivered);

    // Nack without requeue drops: ack nothing else, nack everything outstanding.
    within(
        "basic.nack",
        ch.basic_nack(BasicNackArguments::new(0, true, false)),
    )
    .await
    .unwrap();
    assert_quiet(&mut rx, "nothing after nack(requeue=false)").await;
    assert_eq!(queue_counts(&ch, "nq").await, (0, 1));
    within("channel.close-ok", ch.close()).await.unwrap();
    let (ch2, _ev2) = channel(&conn).await;
    assert_eq!(
        queue_counts(&ch2, "nq").await,
        (0, 0),
        "dropped, not requeued"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn reject_requeues_or_drops() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "rq").await;
    publish(&ch, "", "rq", "r0").await;
    publish(&ch, "", "rq", "r1").await;
    let (_tag, mut rx) = consume(&ch, "rq", "rejecter").await;
    let got = take(&mut rx, 2).await;
    assert_eq!(bodies(&got), ["r0", "r1"]);

    within(
        "basic.reject",
        ch.basic_reject(BasicRejectArguments::new(got[0].delivery_tag, true)),
    )
    .await
    .unwrap();
    let back = next(&mut rx, "rejected r0 redelivered").await;
    assert_eq!(back.text(), "r0");
    assert!(back.redelivered);

    within(
        "basic.reject",
        ch.basic_reject(BasicRejectArguments::new(back.delivery_tag, false)),
    )
    .await
    .unwrap();
    within(
        "basic.reject",
        ch.basic_reject(BasicRejectArguments::new(got[1].delivery_tag, false)),
    )
    .await
    .unwrap();
    assert_quiet(&mut rx, "nothing after reject(requeue=false)").await;
    within("channel.close-ok", ch.close()).await.unwrap();
    let (ch2, _ev2) = channel(&conn).await;
    assert_eq!(queue_counts(&ch2, "rq").await, (0, 0));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn basic_get_reports_remaining_and_honours_ack_mode() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "gq").await;

    let empty = within(
        "basic.get-empty",
        ch.basic_get(BasicGetArguments::new("gq")),
    )
    .await
    .unwrap();
    assert!(empty.is_none(), "get on an empty queue is get-empty");

    for i in 0..3 {
        publish(&ch, "", "gq", format!("g{i}")).await;
    }
    publish(&ch, "", "gq", Vec::new()).await; // empty body

    let (ok, _props, body) = within("basic.get-ok", ch.basic_get(BasicGetArguments::new("gq")))
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(body, b"g0");
    assert_eq!(ok.message_count(), 3, "messages left after this one");
    assert!(!ok.redelivered());
    assert_eq!(ok.exchange(), "");
    assert_eq!(ok.routing_key(), "gq");
    let g0_tag = ok.delivery_tag();
    assert_eq!(g0_tag, 1);

    let (ok, _, body) = within(
        "basic.get-ok",
        ch.basic_get(BasicGetArguments::new("gq").no_ack(true).finish()),
    )
    .await
    .unwrap()
    .expect("a message");
    assert_eq!(body, b"g1");
    assert_eq!(ok.message_count(), 2);
    assert_eq!(ok.delivery_tag(), 2);

    // Unacked g0 goes back when the channel closes; auto-acked g1 does not.
    within("channel.close-ok", ch.close()).await.unwrap();
    let (ch, _ev) = channel(&conn).await;
    assert_eq!(queue_counts(&ch, "gq").await, (3, 0));
    let (ok, _, body) = within("basic.get-ok", ch.basic_get(BasicGetArguments::new("gq")))
        .await
        .unwrap()
        .expect("g0 again");
    assert_eq!(body, b"g0");
    assert!(ok.redelivered(), "g0 was delivered before");
    ack(&ch, ok.delivery_tag(), false).await;

    let (_, _, body) = within("basic.get-ok", ch.basic_get(BasicGetArguments::new("gq")))
        .await
        .unwrap()
        .expect("g2");
    assert_eq!(body, b"g2");
    let (ok, _, body) = within("basic.get-ok", ch.basic_get(BasicGetArguments::new("gq")))
        .await
        .unwrap()
        .expect("the empty message");
    assert!(body.is_empty());
    assert_eq!(ok.message_count(), 0);
    ack(&ch, ok.delivery_tag(), true).await;
    assert!(within(
        "basic.get-empty",
        ch.basic_get(BasicGetArguments::new("gq"))
    )
    .await
    .unwrap()
    .is_none());

    within("channel.close-ok", ch.close()).await.unwrap();
    let (ch, _ev) = channel(&conn).await;
    assert_eq!(
        queue_counts(&ch, "gq").await,
        (0, 0),
        "everything was acked"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn qos_prefetch_limits_unacked_deliveries() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "fq").await;
    for i in 0..6 {
        publish(&ch, "", "fq", format!("f{i}")).await;
    }
    within(
        "basic.qos-ok",
        ch.basic_qos(BasicQosArguments::new(0, 2, false)),
    )
    .await
    .expect("basic.qos");
    let (_tag, mut rx) = consume(&ch, "fq", "limited").await;

    let first = take(&mut rx, 2).await;
    assert_eq!(bodies(&first), ["f0", "f1"]);
    assert_quiet(&mut rx, "prefetch 2 holds back the third message").await;
    assert_eq!(queue_counts(&ch, "fq").await, (4, 1));

    ack(&ch, first[0].delivery_tag, false).await;
    let third = next(&mut rx, "f2 after one ack").await;
    assert_eq!(third.text(), "f2");
    assert_quiet(&mut rx, "one ack frees exactly one slot").await;

    // Ack both outstanding with multiple: two more arrive.
    ack(&ch, third.delivery_tag, true).await;
    let more = take(&mut rx, 2).await;
    assert_eq!(bodies(&more), ["f3", "f4"]);
    assert_quiet(&mut rx, "still limited to 2").await;

    // A nack with requeue also frees credit; the requeued one comes back first.
    within(
        "basic.nack",
        ch.basic_nack(BasicNackArguments::new(more[0].delivery_tag, false, true)),
    )
    .await
    .unwrap();
    let back = next(&mut rx, "f3 redelivered").await;
    assert_eq!(back.text(), "f3");
    assert!(back.redelivered);
    assert_quiet(&mut rx, "f5 waits for credit").await;
    ack(&ch, 0, true).await;
    let last = next(&mut rx, "f5").await;
    assert_eq!(last.text(), "f5");
    ack(&ch, last.delivery_tag, false).await;
    assert_eq!(queue_counts(&ch, "fq").await, (0, 1));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_deliveries() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, mut ev) = channel(&conn).await;
    declare_queue(&ch, "xq").await;
    let (tag, mut rx) = consume(&ch, "xq", "to-cancel").await;
    publish(&ch, "", "xq", "before").await;
    let d = next(&mut rx, "delivery before cancel").await;
    assert_eq!(d.text(), "before");
    ack(&ch, d.delivery_tag, false).await;
    assert_eq!(queue_counts(&ch, "xq").await, (0, 1));

    let cancelled = within(
        "basic.cancel-ok",
        ch.basic_cancel(BasicCancelArguments::new(&tag)),
    )
    .await
    .expect("basic.cancel");
    assert_eq!(cancelled, "to-cancel");
    assert_eq!(
        queue_counts(&ch, "xq").await,
        (0, 0),
        "no consumer after cancel"
    );

    publish(&ch, "", "xq", "after").await;
    assert_quiet(&mut rx, "no delivery after cancel").await;
    assert_eq!(
        queue_counts(&ch, "xq").await,
        (1, 0),
        "message waits in the queue"
    );
    // A client-initiated cancel is not echoed back as a server cancel.
    assert_quiet(&mut ev, "no channel events").await;

    // The same tag can be reused once cancelled.
    let (_tag, mut rx2) = consume(&ch, "xq", "to-cancel").await;
    assert_eq!(
        next(&mut rx2, "delivery to the new consumer").await.text(),
        "after"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_consumed_queue_sends_basic_cancel() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let other = connect(&server).await;
    let (ch, mut ev) = channel(&conn).await;
    declare_queue(&ch, "doomed").await;
    let (tag, mut rx) = consume(&ch, "doomed", "watcher").await;
    publish(&ch, "", "doomed", "hello").await;
    assert_eq!(next(&mut rx, "delivery").await.text(), "hello");

    // Deleted from another channel of the same connection.
    let (del, _dev) = channel(&conn).await;
    let count = within(
        "queue.delete-ok",
        del.queue_delete(QueueDeleteArguments::new("doomed")),
    )
    .await
    .unwrap();
    assert_eq!(count, Some(0), "the delivered message is not ready");
    match next(&mut ev, "basic.cancel from the server").await {
        ChanEvent::Cancel { consumer_tag } => assert_eq!(consumer_tag, tag),
        other => panic!("expected basic.cancel, got {other:?}"),
    }
    // The channel stays open and usable.
    assert!(ch.is_open());
    declare_queue(&ch, "survivor").await;

    // Deleted from another connection.
    let (_tag2, _rx2) = consume(&ch, "survivor", "watcher-2").await;
    let (och, _oev) = channel(&other).await;
    within(
        "queue.delete-ok",
        och.queue_delete(QueueDeleteArguments::new("survivor")),
    )
    .await
    .unwrap();
    match next(&mut ev, "basic.cancel from the server").await {
        ChanEvent::Cancel { consumer_tag } => assert_eq!(consumer_tag, "watcher-2"),
        other => panic!("expected basic.cancel, got {other:?}"),
    }
    assert_quiet(&mut ev, "one cancel per consumer").await;
    assert!(ch.is_open());
    // The cancelled tag may be reused.
    declare_queue(&ch, "third").await;
    let (_t, mut rx3) = consume(&ch, "third", "watcher").await;
    publish(&ch, "", "third", "still works").await;
    assert_eq!(next(&mut rx3, "delivery").await.text(), "still works");

    within("connection.close-ok", conn.close()).await.unwrap();
    within("connection.close-ok", other.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn properties_and_headers_round_trip() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "props").await;

    let mut nested = FieldTable::new();
    nested.insert("inner".try_into().unwrap(), FieldValue::from("value"));
    let array = FieldArray::try_from(vec![
        FieldValue::I(1),
        FieldValue::S("two".try_into().unwrap()),
    ])
    .unwrap();
    let mut headers = FieldTable::new();
    let mut h = |k: &str, v: FieldValue| {
        headers.insert(k.try_into().unwrap(), v);
    };
    h("string", FieldValue::from("hello"));
    h("bool", FieldValue::t(true));
    h("i8", FieldValue::b(-8));
    h("u8", FieldValue::B(200));
    h("i16", FieldValue::s(-1600));
    h("u16", FieldValue::u(60000));
    h("i32", FieldValue::I(-320_000));
    h("u32", FieldValue::i(4_000_000_000));
    h("i64", FieldValue::l(-6_400_000_000));
    h("f32", FieldValue::f(1.5));
    h("f64", FieldValue::d(2.25));
    h("decimal", FieldValue::D(DecimalValue::new(2, 12345)));
    h("timestamp", FieldValue::T(1_700_000_000));
    h("table", FieldValue::F(nested));
    h("array", FieldValue::A(array));
    h("void", FieldValue::V);
    h(
        "bytes",
        FieldValue::x(vec![0u8, 1, 2, 255].try_into().unwrap()),
    );

    let props = BasicProperties::default()
        .with_content_type("application/json")
        .with_content_encoding("gzip")
        .with_headers(headers.clone())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-42")
        .with_reply_to("reply-queue")
        .with_expiration("600000")
        .with_message_id("msg-7")
        .with_timestamp(1_600_000_000)
        .with_message_type("order.created")
        .with_user_id("guest")
        .with_app_id("amqprs-tests")
        .with_cluster_id("cluster-x")
        .finish();
    publish_with(&ch, "", "props", props.clone(), "with props").await;
    publish_with(&ch, "", "props", props, "with props via get").await;
    publish(&ch, "", "props", "no props").await;

    let check = |p: &BasicProperties| {
        assert_eq!(
            p.content_type().map(String::as_str),
            Some("application/json")
        );
        assert_eq!(p.content_encoding().map(String::as_str), Some("gzip"));
        assert_eq!(p.headers(), Some(&headers));
        assert_eq!(p.delivery_mode(), Some(2));
        assert_eq!(p.priority(), Some(7));
        assert_eq!(p.correlation_id().map(String::as_str), Some("corr-42"));
        assert_eq!(p.reply_to().map(String::as_str), Some("reply-queue"));
        assert_eq!(p.expiration().map(String::as_str), Some("600000"));
        assert_eq!(p.message_id().map(String::as_str), Some("msg-7"));
        assert_eq!(p.timestamp(), Some(1_600_000_000));
        assert_eq!(p.message_type().map(String::as_str), Some("order.created"));
        assert_eq!(p.user_id().map(String::as_str), Some("guest"));
        assert_eq!(p.app_id().map(String::as_str), Some("amqprs-tests"));
        assert_eq!(p.cluster_id().map(String::as_str), Some("cluster-x"));
    };

    // Prefetch 1 so that only the first message goes to the consumer; the rest stay for get.
    within(
        "basic.qos-ok",
        ch.basic_qos(BasicQosArguments::new(0, 1, false)),
    )
    .await
    .unwrap();
    let (_tag, mut rx) = consume(&ch, "props", "props-consumer").await;
    let d = next(&mut rx, "delivery with properties").await;
    assert_eq!(d.text(), "with props");
    check(&d.props);
    within(
        "basic.cancel-ok",
        ch.basic_cancel(BasicCancelArguments::new("props-consumer")),
    )
    .await
    .unwrap();

    let (_ok, got_props, body) = within(
        "basic.get-ok",
        ch.basic_get(BasicGetArguments::new("props").no_ack(true).finish()),
    )
    .await
    .unwrap()
    .expect("second message");
    assert_eq!(body, b"with props via get");
    check(&got_props);

    let (_ok, bare, body) = within(
        "basic.get-ok",
        ch.basic_get(BasicGetArguments::new("props").no_ack(true).finish()),
    )
    .await
    .unwrap()
    .expect("third message");
    assert_eq!(body, b"no props");
    assert!(bare.content_type().is_none());
    assert!(bare.headers().is_none());
    assert!(bare.delivery_mode().is_none());
    assert!(bare.message_id().is_none());

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn burst_of_ten_thousand_confirmed_then_consumed_in_order() {
    const N: u64 = 10_000;
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (pch, mut pev) = confirm_channel(&conn).await;
    declare_queue(&pch, "burst").await;

    for i in 0..N {
        pch.basic_publish(
            BasicProperties::default(),
            format!("b{i}").into_bytes(),
            BasicPublishArguments::new("", "burst"),
        )
        .await
        .expect("basic.publish");
    }
    let others = within("10,000 confirms", await_confirms(&mut pev, N)).await;
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(queue_counts(&pch, "burst").await, (N as u32, 0));

    let (cch, _cev) = channel(&conn).await;
    within(
        "basic.qos-ok",
        cch.basic_qos(BasicQosArguments::new(0, 500, false)),
    )
    .await
    .unwrap();
    let (_tag, mut rx) = consume(&cch, "burst", "burst-consumer").await;
    for i in 0..N {
        let d = next(&mut rx, &format!("burst delivery {i}")).await;
        assert_eq!(
            d.body,
            format!("b{i}").into_bytes(),
            "delivery {i} out of order"
        );
        assert_eq!(d.delivery_tag, i + 1);
        assert!(!d.redelivered);
        if d.delivery_tag % 100 == 0 {
            ack(&cch, d.delivery_tag, true).await;
        }
    }
    assert_quiet(&mut rx, "exactly N deliveries").await;
    assert_eq!(queue_counts(&cch, "burst").await, (0, 1));
    within("channel.close-ok", cch.close()).await.unwrap();
    assert_eq!(queue_counts(&pch, "burst").await, (0, 0), "all acked");

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}
