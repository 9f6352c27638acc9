//! Consumer-side extensions: single active consumer (`x-single-active-consumer`) and
//! `consumer_cancel_notify` (basic.cancel from the server when a consumed queue goes away).

mod ext_common;

use ext_common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

#[tokio::test]
async fn single_active_consumer_hands_over_in_registration_order() {
    let server = warren_tests::start_server();
    let conns = [
        connect(&server).await,
        connect(&server).await,
        connect(&server).await,
    ];
    let admin = channel(&conns[0]).await;
    declare(
        &admin,
        "sac",
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let ch1 = channel(&conns[0]).await;
    let ch2 = channel(&conns[1]).await;
    let ch3 = channel(&conns[2]).await;
    let mut c1 = consume(&ch1, "sac", "first").await;
    let mut c2 = consume(&ch2, "sac", "second").await;
    let mut c3 = consume(&ch3, "sac", "third").await;
    assert_eq!(
        passive(&admin, "sac")
            .await
            .expect("declare")
            .consumer_count(),
        3
    );

    for i in 0..4 {
        publish(&admin, "", "sac", &format!("m{i}")).await;
    }
    for i in 0..4 {
        let d = next(&mut c1).await;
        assert_eq!(
            body(&d),
            format!("m{i}"),
            "the active consumer gets everything, in order"
        );
        ack(&d).await;
    }
    assert_no_delivery(&mut c2).await;
    assert_no_delivery(&mut c3).await;

    // Cancelling the active consumer hands the queue to the next one registered.
    within(ch1.basic_cancel("first".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    publish(&admin, "", "sac", "m4").await;
    publish(&admin, "", "sac", "m5").await;
    let m4 = next(&mut c2).await;
    assert_eq!(body(&m4), "m4");
    ack(&m4).await;
    let unacked = next(&mut c2).await;
    assert_eq!(body(&unacked), "m5");
    assert_no_delivery(&mut c3).await;

    // The second one's channel closes with m5 unacknowledged: the third takes over and gets it
    // back first.
    within(ch2.close(200, "bye".into())).await.expect("close");
    publish(&admin, "", "sac", "m6").await;
    let d = next(&mut c3).await;
    assert_eq!(body(&d), "m5");
    assert!(d.redelivered);
    assert_eq!(body(&next(&mut c3).await), "m6");
    assert_no_delivery(&mut c1).await;

    for conn in &conns[1..] {
        within(conn.close(200, "bye".into())).await.ok();
    }
    let [first, ..] = conns;
    finish(server, first).await;
}

#[tokio::test]
async fn without_single_active_consumer_messages_round_robin() {
    // Without the argument the queue shares messages round-robin: the contrast that shows the
    // argument above is what made one consumer take everything.
    let (server, conn, ch) = setup().await;
    declare(&ch, "shared", FieldTable::default()).await;
    let ch2 = channel(&conn).await;
    let mut a = consume(&ch, "shared", "a").await;
    let mut b = consume(&ch2, "shared", "b").await;
    for i in 0..4 {
        publish(&ch, "", "shared", &format!("m{i}")).await;
    }
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    for _ in 0..2 {
        to_a.push(body(&next(&mut a).await));
        to_b.push(body(&next(&mut b).await));
    }
    assert_eq!(to_a, vec!["m0", "m2"]);
    assert_eq!(to_b, vec!["m1", "m3"]);
    finish(server, conn).await;
}

#[tokio::test]
async fn deleting_a_consumed_queue_sends_basic_cancel() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let other = connect(&server).await;
    let ch = channel(&conn).await;
    declare(&ch, "doomed", FieldTable::default()).await;
    let mut consumer = consume(&ch, "doomed", "watcher").await;
    publish(&ch, "", "doomed", "last words").await;
    let unacked = next(&mut consumer).await;

    let admin = channel(&other).await;
    within(admin.queue_delete("doomed".into(), QueueDeleteOptions::default()))
        .await
        .expect("queue.delete");

    // basic.cancel from the server ends lapin's consumer stream.
    let end = within(consumer.next()).await;
    assert!(end.is_none(), "the consumer stream should end, got {end:?}");

    // Only the consumer was cancelled: the channel stays open and usable, and acknowledging
    // a delivery from the deleted queue is not an error.
    ack(&unacked).await;
    declare(&ch, "after", FieldTable::default()).await;
    publish(&ch, "", "after", "still here").await;
    assert_eq!(get_body(&ch, "after").await.as_deref(), Some("still here"));
    assert!(ch.status().connected());

    // A consumer tag freed by the server's cancel can be used again.
    declare(&ch, "doomed", FieldTable::default()).await;
    let mut again = consume(&ch, "doomed", "watcher").await;
    publish(&ch, "", "doomed", "again").await;
    assert_eq!(body(&next(&mut again).await), "again");
    within(other.close(200, "bye".into())).await.ok();
    finish(server, conn).await;
}
