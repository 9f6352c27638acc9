//! queue.declare, bind, unbind, purge and delete with lapin, exclusive and auto-delete queues.

mod common;

use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

async fn passive(ch: &Channel, name: &str) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

async fn declare_opts(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(name.into(), options, FieldTable::default())).await
}

async fn delete(ch: &Channel, name: &str, if_unused: bool, if_empty: bool) -> lapin::Result<u32> {
    within(ch.queue_delete(
        name.into(),
        QueueDeleteOptions {
            if_unused,
            if_empty,
            ..Default::default()
        },
    ))
    .await
}

/// Waits until a passive declare of `name` fails with 404, on fresh channels of `conn`.
async fn wait_until_gone(conn: &lapin::Connection, name: &str) {
    within(async {
        loop {
            let ch = channel(conn).await;
            match passive(&ch, name).await.map_err(|e| amqp_error(&e)) {
                Err(Some((404, _))) => return,
                // Still there (405: someone else's exclusive queue).
                Ok(_) | Err(Some((405, _))) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn server_named_queue() {
    let (server, _conn, ch) = setup().await;
    let a = declare_anon_queue(&ch).await;
    let b = declare_anon_queue(&ch).await;
    assert!(a.starts_with("amq.gen-"), "{a}");
    assert_eq!(a.len(), "amq.gen-".len() + 22, "{a}");
    assert_ne!(a, b, "each server-named queue is new");
    // It is a real queue: publish to it by name through the default exchange.
    publish(&ch, "", &a, b"to anon").await;
    assert_eq!(get_body(&ch, &a).await.as_deref(), Some("to anon"));
    server.shutdown().await;
}

#[tokio::test]
async fn passive_declare_of_a_missing_queue_is_404() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(passive(&ch, "nope").await, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'nope' in vhost '/'");
    assert!(conn.status().connected());
    server.shutdown().await;
}

#[tokio::test]
async fn amq_prefix_is_reserved_for_queues() {
    let (server, _conn, ch) = setup().await;
    let text = expect_code(
        declare_opts(&ch, "amq.mine", QueueDeclareOptions::default()).await,
        403,
    );
    assert_eq!(
        text,
        "ACCESS_REFUSED - queue name 'amq.mine' contains reserved prefix 'amq.*'"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn redeclare_with_other_durability_is_406() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "dur-q").await;
    let text = expect_code(
        declare_opts(
            &ch,
            "dur-q",
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
        .await,
        406,
    );
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'dur-q' in vhost '/': received 'true' but current is 'false'"
    );
    let ch = channel(&conn).await;
    let text = expect_code(
        declare_opts(
            &ch,
            "dur-q",
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
        )
        .await,
        406,
    );
    assert!(text.contains("inequivalent arg 'auto_delete'"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn declare_ok_counts_messages_and_consumers() {
    let (server, conn, ch) = setup().await;
    let q = declare_queue(&ch, "count-q").await;
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    fill(&ch, "count-q", &["a", "b", "c"]).await;
    let q = declare_queue(&ch, "count-q").await;
    assert_eq!((q.message_count(), q.consumer_count()), (3, 0));

    // Consumers count; messages delivered to them (even unacked) no longer count as ready.
    let ch2 = channel(&conn).await;
    within(ch2.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut c1 = consume(&ch2, "count-q", "c1").await;
    let _c2 = consume(&ch2, "count-q", "c2").await;
    let d = next(&mut c1).await;
    assert_eq!(d.data, b"a");
    let q = passive(&ch, "count-q").await.expect("passive");
    assert_eq!(q.consumer_count(), 2);
    assert_eq!(
        q.message_count(),
        1,
        "two delivered (prefetch 1 each), one ready"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_queue_is_locked_to_its_connection() {
    let (server, owner, ch) = setup().await;
    declare_opts(
        &ch,
        "excl-q",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare exclusive");
    // Its own connection uses it freely, on any channel.
    let ch_b = channel(&owner).await;
    publish(&ch_b, "", "excl-q", b"mine").await;
    assert_eq!(message_count(&ch_b, "excl-q").await, 1);

    let other = connect(&server).await;
    let locked = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'excl-q' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.";

    let ch2 = channel(&other).await;
    let text = expect_code(passive(&ch2, "excl-q").await, 405);
    assert_eq!(text, locked);
    assert!(other.status().connected(), "405 is a channel error");

    let ch2 = channel(&other).await;
    let text = expect_code(
        declare_opts(
            &ch2,
            "excl-q",
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .await,
        405,
    );
    assert_eq!(text, locked);

    let ch2 = channel(&other).await;
    let result = within(ch2.basic_consume(
        "excl-q".into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    expect_code(result, 405);

    let ch2 = channel(&other).await;
    let result = within(ch2.basic_get("excl-q".into(), BasicGetOptions::default())).await;
    expect_code(result, 405);

    let ch2 = channel(&other).await;
    let result = within(ch2.queue_purge("excl-q".into(), QueuePurgeOptions::default())).await;
    expect_code(result, 405);

    let ch2 = channel(&other).await;
    expect_code(delete(&ch2, "excl-q", false, false).await, 405);

    let ch2 = channel(&other).await;
    let result = within(ch2.queue_bind(
        "excl-q".into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    expect_code(result, 405);

    // None of that touched the queue.
    assert_eq!(message_count(&ch_b, "excl-q").await, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_queue_is_deleted_with_its_connection() {
    let server = warren_tests::start_server();
    let owner = connect(&server).await;
    let ch = channel(&owner).await;
    declare_opts(
        &ch,
        "gone-with-conn",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare exclusive");
    let anon = declare_anon_queue(&ch).await;

    let observer = connect(&server).await;
    expect_code(
        passive(&channel(&observer).await, "gone-with-conn").await,
        405,
    );

    within(owner.close(200, "bye".into())).await.expect("close");
    wait_until_gone(&observer, "gone-with-conn").await;
    wait_until_gone(&observer, &anon).await;
    // The name is free again, for anyone.
    let ch = channel(&observer).await;
    declare_opts(
        &ch,
        "gone-with-conn",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await
    .expect("redeclare on another connection");
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_queue_is_deleted_when_its_connection_drops() {
    let server = warren_tests::start_server();
    let observer = connect(&server).await;
    {
        let owner = connect(&server).await;
        let ch = channel(&owner).await;
        declare_opts(
            &ch,
            "gone-with-drop",
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .await
        .expect("declare exclusive");
        // Dropping the only handle makes lapin tear the socket down without connection.close.
        drop(ch);
        drop(owner);
    }
    wait_until_gone(&observer, "gone-with-drop").await;
    server.shutdown().await;
}

#[tokio::test]
async fn auto_delete_queue_goes_when_its_last_consumer_cancels() {
    let (server, conn, ch) = setup().await;
    declare_opts(
        &ch,
        "auto-q",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare auto-delete");
    // Never consumed: it stays.
    publish(&ch, "", "auto-q", b"x").await;
    assert_eq!(message_count(&ch, "auto-q").await, 1);

    // Dropping a lapin Consumer cancels it: keep both alive.
    let _a1 = consume(&ch, "auto-q", "a1").await;
    let _a2 = consume(&ch, "auto-q", "a2").await;
    within(ch.basic_cancel("a1".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel a1");
    let q = passive(&ch, "auto-q")
        .await
        .expect("still there with one consumer");
    assert_eq!(q.consumer_count(), 1);
    within(ch.basic_cancel("a2".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel a2");
    wait_until_gone(&conn, "auto-q").await;
    server.shutdown().await;
}

#[tokio::test]
async fn auto_delete_queue_goes_when_its_consumer_channel_closes() {
    let (server, conn, ch) = setup().await;
    declare_opts(
        &ch,
        "auto-q2",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare auto-delete");
    let consumer_ch = channel(&conn).await;
    let _c = consume(&consumer_ch, "auto-q2", "c").await;
    assert_eq!(
        passive(&ch, "auto-q2")
            .await
            .expect("passive")
            .consumer_count(),
        1
    );
    within(consumer_ch.close(200, "bye".into()))
        .await
        .expect("close");
    wait_until_gone(&conn, "auto-q2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn bind_and_unbind_change_routing() {
    let (server, _conn, ch) = setup().await;
    within(ch.exchange_declare(
        "bind-x".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare exchange");
    declare_queue(&ch, "bind-q").await;

    publish(&ch, "bind-x", "k1", b"before bind").await;
    assert_eq!(message_count(&ch, "bind-q").await, 0);

    bind(&ch, "bind-q", "bind-x", "k1").await;
    // Binding twice is harmless: still one copy per message.
    bind(&ch, "bind-q", "bind-x", "k1").await;
    publish(&ch, "bind-x", "k1", b"bound").await;
    publish(&ch, "bind-x", "k2", b"other key").await;
    assert_eq!(drain(&ch, "bind-q").await, vec!["bound"]);

    within(ch.queue_unbind(
        "bind-q".into(),
        "bind-x".into(),
        "k1".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind");
    publish(&ch, "bind-x", "k1", b"after unbind").await;
    assert_eq!(message_count(&ch, "bind-q").await, 0);

    // Unbinding what is not bound is fine in RabbitMQ.
    within(ch.queue_unbind(
        "bind-q".into(),
        "bind-x".into(),
        "never".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind of a missing binding");
    server.shutdown().await;
}

#[tokio::test]
async fn bind_errors() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "be-q").await;
    let result = within(ch.queue_bind(
        "be-q".into(),
        "no-such-x".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 404);
    assert_eq!(text, "NOT_FOUND - no exchange 'no-such-x' in vhost '/'");

    let ch = channel(&conn).await;
    let result = within(ch.queue_bind(
        "no-such-q".into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'no-such-q' in vhost '/'");

    let ch = channel(&conn).await;
    let result = within(ch.queue_bind(
        "be-q".into(),
        "".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn purge_returns_the_count_and_empties_the_queue() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "purge-q").await;
    fill(&ch, "purge-q", &["1", "2", "3", "4", "5"]).await;
    let purged = within(ch.queue_purge("purge-q".into(), QueuePurgeOptions::default()))
        .await
        .expect("purge");
    assert_eq!(purged, 5);
    assert_eq!(message_count(&ch, "purge-q").await, 0);
    assert_eq!(get_body(&ch, "purge-q").await, None);
    let purged = within(ch.queue_purge("purge-q".into(), QueuePurgeOptions::default()))
        .await
        .expect("purge again");
    assert_eq!(purged, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn purge_keeps_unacked_messages() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "purge-unacked").await;
    fill(&ch, "purge-unacked", &["held", "ready"]).await;
    let holder = channel(&conn).await;
    let got = within(holder.basic_get("purge-unacked".into(), BasicGetOptions::default()))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"held");
    let purged = within(ch.queue_purge("purge-unacked".into(), QueuePurgeOptions::default()))
        .await
        .expect("purge");
    assert_eq!(purged, 1, "only the ready message is purged");
    // The unacked one comes back when its channel closes.
    within(holder.close(200, "bye".into()))
        .await
        .expect("close");
    assert_eq!(drain(&ch, "purge-unacked").await, vec!["held"]);
    server.shutdown().await;
}

#[tokio::test]
async fn delete_returns_the_message_count() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "del-q").await;
    fill(&ch, "del-q", &["a", "b", "c"]).await;
    assert_eq!(delete(&ch, "del-q", false, false).await.expect("delete"), 3);
    expect_code(passive(&ch, "del-q").await, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn delete_if_unused_and_if_empty() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "cond-q").await;
    let consumer_ch = channel(&conn).await;
    let _holder = consume(&consumer_ch, "cond-q", "holder").await;

    let text = expect_code(delete(&ch, "cond-q", true, false).await, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - queue 'cond-q' in vhost '/' in use"
    );

    within(consumer_ch.basic_cancel("holder".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    let ch = channel(&conn).await;
    publish(&ch, "", "cond-q", b"still here").await;
    let text = expect_code(delete(&ch, "cond-q", false, true).await, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - queue 'cond-q' in vhost '/' not empty"
    );

    let ch = channel(&conn).await;
    assert_eq!(get_body(&ch, "cond-q").await.as_deref(), Some("still here"));
    assert_eq!(
        delete(&ch, "cond-q", true, true)
            .await
            .expect("unused and empty now"),
        0
    );
    expect_code(passive(&ch, "cond-q").await, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_missing_queue_succeeds_with_zero() {
    // RabbitMQ 3.x answers queue.delete-ok (message_count 0) for a queue that does not exist.
    let (server, _conn, ch) = setup().await;
    assert_eq!(
        delete(&ch, "never-declared", false, false)
            .await
            .expect("delete of a missing queue is not an error"),
        0
    );
    assert!(ch.status().connected());
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "cancel-q").await;
    let consumer_ch = channel(&conn).await;
    let mut consumer = consume(&consumer_ch, "cancel-q", "watcher").await;
    delete(&ch, "cancel-q", false, false).await.expect("delete");
    // lapin announces consumer_cancel_notify: the server's basic.cancel ends the stream.
    let end = within(consumer.next()).await;
    assert!(
        end.is_none(),
        "expected the consumer to be cancelled, got {end:?}"
    );
    // The consumer's channel is still open and usable.
    assert!(consumer_ch.status().connected());
    declare_queue(&consumer_ch, "cancel-q2").await;
    server.shutdown().await;
}

#[tokio::test]
async fn unbind_from_missing_things_succeeds() {
    // RabbitMQ answers unbind-ok when the exchange or the queue does not exist.
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "unbind-q").await;
    within(ch.queue_unbind(
        "unbind-q".into(),
        "no-such-exchange".into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind from a missing exchange");
    within(ch.queue_unbind(
        "no-such-queue".into(),
        "amq.direct".into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind of a missing queue");
    assert!(ch.status().connected());
    server.shutdown().await;
}
