//! amqprs end-to-end: channel and connection exceptions. A channel error closes only its channel
//! (observed through `ChannelCallback::close` and the failed call) and the connection stays
//! usable; a connection error closes the connection.

mod amqprs_common;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, Channel,
    ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::Connection;
use amqprs::BasicProperties;
use amqprs_common::*;
use tokio::sync::mpsc::UnboundedReceiver;

/// What the server put in its channel.close.
#[derive(Debug)]
struct Closed {
    code: u16,
    text: String,
    class_id: u16,
    method_id: u16,
}

async fn closed(rx: &mut UnboundedReceiver<ChanEvent>) -> Closed {
    loop {
        match next(rx, "channel.close from the server").await {
            ChanEvent::Close {
                code,
                text,
                class_id,
                method_id,
            } => {
                return Closed {
                    code,
                    text,
                    class_id,
                    method_id,
                }
            }
            ChanEvent::Ack { .. } => continue,
            other => panic!("expected channel.close, got {other:?}"),
        }
    }
}

/// Runs a failing synchronous request on a fresh channel and returns the close it caused, after
/// checking the call itself failed and the channel is closed.
async fn fails_with<F, Fut, T>(conn: &Connection, what: &str, call: F) -> Closed
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, amqprs::error::Error>>,
    T: std::fmt::Debug,
{
    let (ch, mut ev) = channel(conn).await;
    let probe = ch.clone();
    let res = within(what, call(ch)).await;
    assert!(res.is_err(), "{what}: expected an error, got {res:?}");
    let c = closed(&mut ev).await;
    assert!(!probe.is_open(), "{what}: channel still open");
    assert!(
        conn.is_open(),
        "{what}: a channel error closed the connection"
    );
    c
}

/// Proves the connection still works: a new channel, a declare, a publish and a get.
async fn still_usable(conn: &Connection, queue: &str) {
    let (ch, _ev) = channel(conn).await;
    within(
        "queue.declare-ok",
        ch.queue_declare(QueueDeclareArguments::new(queue)),
    )
    .await
    .expect("declare on a new channel")
    .expect("declare-ok");
    publish(&ch, "", queue, "alive").await;
    let got = within(
        "basic.get-ok",
        ch.basic_get(
            amqprs::channel::BasicGetArguments::new(queue)
                .no_ack(true)
                .finish(),
        ),
    )
    .await
    .expect("basic.get")
    .expect("the message just published");
    assert_eq!(got.2, b"alive");
    within("channel.close-ok", ch.close())
        .await
        .expect("channel.close");
}

#[tokio::test]
async fn passive_declare_of_missing_queue_closes_only_the_channel() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;

    // A consumer on another channel of the same connection must be unaffected.
    let (cch, _cev) = channel(&conn).await;
    declare_queue(&cch, "bystander").await;
    let (consumer, mut deliveries) = RecordingConsumer::new();
    within(
        "basic.consume-ok",
        cch.basic_consume(consumer, BasicConsumeArguments::new("bystander", "b")),
    )
    .await
    .unwrap();

    let c = fails_with(
        &conn,
        "passive declare of a missing queue",
        |ch| async move {
            ch.queue_declare(QueueDeclareArguments::new("missing").passive(true).finish())
                .await
        },
    )
    .await;
    assert_eq!(c.code, 404);
    assert_eq!(c.text, "NOT_FOUND - no queue 'missing' in vhost '/'");
    assert_eq!((c.class_id, c.method_id), (50, 10), "queue.declare");

    assert!(cch.is_open());
    publish(&cch, "", "bystander", "still delivered").await;
    let d = next(&mut deliveries, "delivery on the unaffected channel").await;
    assert_eq!(d.text(), "still delivered");
    cch.basic_ack(BasicAckArguments::new(d.delivery_tag, false))
        .await
        .unwrap();
    still_usable(&conn, "after-404").await;

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn missing_exchange_errors() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;

    let c = fails_with(
        &conn,
        "passive declare of a missing exchange",
        |ch| async move {
            ch.exchange_declare(
                ExchangeDeclareArguments::new("no-such-x", "direct")
                    .passive(true)
                    .finish(),
            )
            .await
        },
    )
    .await;
    assert_eq!(c.code, 404);
    assert_eq!(c.text, "NOT_FOUND - no exchange 'no-such-x' in vhost '/'");
    assert_eq!((c.class_id, c.method_id), (40, 10), "exchange.declare");

    let c = fails_with(&conn, "bind to a missing exchange", |ch| async move {
        ch.queue_declare(QueueDeclareArguments::new("bindme"))
            .await
            .expect("declare before bind");
        ch.queue_bind(QueueBindArguments::new("bindme", "no-such-x", "k"))
            .await
    })
    .await;
    assert_eq!(c.code, 404);
    assert!(c.text.contains("no exchange 'no-such-x'"), "{}", c.text);
    assert_eq!((c.class_id, c.method_id), (50, 20), "queue.bind");

    let c = fails_with(&conn, "bind of a missing queue", |ch| async move {
        ch.queue_bind(QueueBindArguments::new("no-such-q", "amq.direct", "k"))
            .await
    })
    .await;
    assert_eq!(c.code, 404);
    assert!(c.text.contains("no queue 'no-such-q'"), "{}", c.text);

    // Deleting what does not exist is not an error in RabbitMQ: delete-ok, channel stays open.
    let (ch, mut ev) = channel(&conn).await;
    within(
        "exchange.delete-ok for a missing exchange",
        ch.exchange_delete(ExchangeDeleteArguments::new("no-such-x")),
    )
    .await
    .expect("exchange.delete of a missing exchange");
    let count = within(
        "queue.delete-ok for a missing queue",
        ch.queue_delete(QueueDeleteArguments::new("no-such-q")),
    )
    .await
    .expect("queue.delete of a missing queue");
    assert_eq!(count, Some(0));
    assert!(ch.is_open());
    assert_quiet(&mut ev, "no channel.close for idempotent deletes").await;
    within("channel.close-ok", ch.close()).await.unwrap();

    // basic.publish is asynchronous: the error arrives only as a channel.close.
    let (ch, mut ev) = channel(&conn).await;
    ch.basic_publish(
        BasicProperties::default(),
        b"into the void".to_vec(),
        BasicPublishArguments::new("no-such-x", "k"),
    )
    .await
    .expect("publish is sent");
    let c = closed(&mut ev).await;
    assert_eq!(c.code, 404);
    assert_eq!(c.text, "NOT_FOUND - no exchange 'no-such-x' in vhost '/'");
    assert_eq!((c.class_id, c.method_id), (60, 40), "basic.publish");
    assert!(conn.is_open());

    still_usable(&conn, "after-missing-exchange").await;
    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn inequivalent_redeclare_is_406() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "plain").await;
    within(
        "exchange.declare-ok",
        ch.exchange_declare(ExchangeDeclareArguments::new("typed", "topic")),
    )
    .await
    .unwrap();

    let c = fails_with(&conn, "redeclare as durable", |ch| async move {
        ch.queue_declare(QueueDeclareArguments::durable_client_named("plain"))
            .await
    })
    .await;
    assert_eq!(c.code, 406);
    assert_eq!(
        c.text,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'plain' in vhost '/': received 'true' but current is 'false'"
    );

    let c = fails_with(
        &conn,
        "redeclare exchange with another type",
        |ch| async move {
            ch.exchange_declare(ExchangeDeclareArguments::new("typed", "fanout"))
                .await
        },
    )
    .await;
    assert_eq!(c.code, 406);
    assert!(c.text.contains("inequivalent arg 'type'"), "{}", c.text);

    // The originals are untouched.
    assert_eq!(queue_counts(&ch, "plain").await, (0, 0));
    within(
        "exchange.declare-ok",
        ch.exchange_declare(ExchangeDeclareArguments::new("typed", "topic")),
    )
    .await
    .expect("original exchange still declared as topic");

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn reserved_names_and_default_exchange_are_refused_with_403() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;

    let c = fails_with(&conn, "declare queue amq.*", |ch| async move {
        ch.queue_declare(QueueDeclareArguments::new("amq.mine"))
            .await
    })
    .await;
    assert_eq!(c.code, 403);
    assert!(c.text.starts_with("ACCESS_REFUSED"), "{}", c.text);

    let c = fails_with(&conn, "declare exchange amq.*", |ch| async move {
        ch.exchange_declare(ExchangeDeclareArguments::new("amq.mine", "direct"))
            .await
    })
    .await;
    assert_eq!(c.code, 403);

    let c = fails_with(&conn, "bind to the default exchange", |ch| async move {
        ch.queue_declare(QueueDeclareArguments::new("q-default"))
            .await
            .expect("declare");
        ch.queue_bind(QueueBindArguments::new("q-default", "", "k"))
            .await
    })
    .await;
    assert_eq!(c.code, 403);

    let c = fails_with(&conn, "delete the default exchange", |ch| async move {
        ch.exchange_delete(ExchangeDeleteArguments::new("amq.direct"))
            .await
    })
    .await;
    assert_eq!(c.code, 403);

    // Publishing to an internal exchange.
    let (ch, mut ev) = channel(&conn).await;
    within(
        "exchange.declare-ok (internal)",
        ch.exchange_declare(
            ExchangeDeclareArguments::new("inside", "fanout")
                .internal(true)
                .finish(),
        ),
    )
    .await
    .unwrap();
    publish(&ch, "inside", "", "not allowed").await;
    let c = closed(&mut ev).await;
    assert_eq!(c.code, 403);
    assert!(c.text.contains("internal exchange 'inside'"), "{}", c.text);

    still_usable(&conn, "after-403").await;
    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn conditional_deletes_are_406_and_keep_the_entity() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "full").await;
    publish(&ch, "", "full", "x").await;
    declare_queue(&ch, "used").await;
    let (consumer, _rx) = RecordingConsumer::new();
    within(
        "basic.consume-ok",
        ch.basic_consume(consumer, BasicConsumeArguments::new("used", "user")),
    )
    .await
    .unwrap();
    within(
        "exchange.declare-ok",
        ch.exchange_declare(ExchangeDeclareArguments::new("bound-x", "direct")),
    )
    .await
    .unwrap();
    within(
        "queue.bind-ok",
        ch.queue_bind(QueueBindArguments::new("full", "bound-x", "k")),
    )
    .await
    .unwrap();

    let c = fails_with(
        &conn,
        "delete if-empty of a non-empty queue",
        |ch| async move {
            ch.queue_delete(QueueDeleteArguments::new("full").if_empty(true).finish())
                .await
        },
    )
    .await;
    assert_eq!(c.code, 406);
    assert!(c.text.contains("not empty"), "{}", c.text);

    let c = fails_with(
        &conn,
        "delete if-unused of a consumed queue",
        |ch| async move {
            ch.queue_delete(QueueDeleteArguments::new("used").if_unused(true).finish())
                .await
        },
    )
    .await;
    assert_eq!(c.code, 406);
    assert!(c.text.contains("in use"), "{}", c.text);

    let c = fails_with(
        &conn,
        "delete if-unused of a bound exchange",
        |ch| async move {
            ch.exchange_delete(
                ExchangeDeleteArguments::new("bound-x")
                    .if_unused(true)
                    .finish(),
            )
            .await
        },
    )
    .await;
    assert_eq!(c.code, 406);

    assert_eq!(queue_counts(&ch, "full").await, (1, 0));
    assert_eq!(queue_counts(&ch, "used").await, (0, 1));
    publish(&ch, "bound-x", "k", "y").await;
    assert_eq!(
        queue_counts(&ch, "full").await,
        (2, 0),
        "exchange and binding survive"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_delivery_tag_is_406() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, mut ev) = channel(&conn).await;
    declare_queue(&ch, "acks").await;
    ch.basic_ack(BasicAckArguments::new(99, false))
        .await
        .expect("ack is sent");
    let c = closed(&mut ev).await;
    assert_eq!(c.code, 406);
    assert_eq!(c.text, "PRECONDITION_FAILED - unknown delivery tag 99");
    assert_eq!((c.class_id, c.method_id), (60, 80), "basic.ack");
    assert!(!ch.is_open());

    // Unacked deliveries of the failed channel went back to their queue.
    let (ch2, mut ev2) = channel(&conn).await;
    publish(&ch2, "", "acks", "held").await;
    let got = within(
        "basic.get-ok",
        ch2.basic_get(amqprs::channel::BasicGetArguments::new("acks")),
    )
    .await
    .unwrap()
    .expect("message");
    assert_eq!(got.2, b"held");
    // Acking the same tag twice is an error too.
    ch2.basic_ack(BasicAckArguments::new(got.0.delivery_tag(), false))
        .await
        .unwrap();
    ch2.basic_ack(BasicAckArguments::new(got.0.delivery_tag(), false))
        .await
        .unwrap();
    let c = closed(&mut ev2).await;
    assert_eq!(c.code, 406);
    let (ch3, _ev3) = channel(&conn).await;
    assert_eq!(
        queue_counts(&ch3, "acks").await,
        (0, 0),
        "the first ack counted"
    );

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_consumer_locks_the_queue() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "solo").await;
    let (consumer, mut rx) = RecordingConsumer::new();
    within(
        "basic.consume-ok (exclusive)",
        ch.basic_consume(
            consumer,
            BasicConsumeArguments::new("solo", "only-me")
                .exclusive(true)
                .finish(),
        ),
    )
    .await
    .unwrap();

    let c = fails_with(
        &conn,
        "second consumer on an exclusively consumed queue",
        |ch| async move {
            let (consumer, _rx) = RecordingConsumer::new();
            ch.basic_consume(consumer, BasicConsumeArguments::new("solo", "me-too"))
                .await
        },
    )
    .await;
    assert_eq!(c.code, 403);
    assert!(c.text.contains("in exclusive use"), "{}", c.text);

    publish(&ch, "", "solo", "for the exclusive consumer").await;
    assert_eq!(
        next(&mut rx, "delivery").await.text(),
        "for the exclusive consumer"
    );
    assert_eq!(queue_counts(&ch, "solo").await, (0, 1));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn many_channel_errors_leave_the_connection_usable() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    for i in 0..20 {
        let c = fails_with(&conn, "passive declare", |ch| async move {
            ch.queue_declare(
                QueueDeclareArguments::new(&format!("ghost-{i}"))
                    .passive(true)
                    .finish(),
            )
            .await
        })
        .await;
        assert_eq!(c.code, 404);
        assert!(c.text.contains(&format!("ghost-{i}")));
    }
    still_usable(&conn, "after-many-errors").await;
    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_exchange_type_is_a_connection_error() {
    let server = warren_tests::start_server();
    let (conn, mut cev) = connect_recording(&server).await;
    let (ch, _ev) = channel(&conn).await;
    let res = within(
        "exchange.declare with an unknown type",
        ch.exchange_declare(ExchangeDeclareArguments::new("weird", "x-no-such-type")),
    )
    .await;
    assert!(res.is_err());
    match next(&mut cev, "connection.close from the server").await {
        ConnEvent::Close { code, text } => {
            assert_eq!(code, 503);
            assert!(text.starts_with("COMMAND_INVALID"), "{text}");
            assert!(text.contains("x-no-such-type"), "{text}");
        }
    }
    within("connection marked closed", async {
        while conn.is_open() {
            tokio::task::yield_now().await;
        }
    })
    .await;

    // The server is fine: a new connection works, and nothing of the failed one remains.
    let conn2 = connect(&server).await;
    let (probe, mut pev) = channel(&conn2).await;
    let res = within(
        "passive declare of the never-created exchange",
        probe.exchange_declare(
            ExchangeDeclareArguments::new("weird", "direct")
                .passive(true)
                .finish(),
        ),
    )
    .await;
    assert!(res.is_err());
    assert_eq!(closed(&mut pev).await.code, 404);
    still_usable(&conn2, "after-connection-error").await;
    within("connection.close-ok", conn2.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn reusing_a_consumer_tag_is_a_connection_error() {
    let server = warren_tests::start_server();
    let (conn, mut cev) = connect_recording(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "tagged").await;
    let (c1, _rx1) = RecordingConsumer::new();
    within(
        "basic.consume-ok",
        ch.basic_consume(c1, BasicConsumeArguments::new("tagged", "dup")),
    )
    .await
    .unwrap();
    let (c2, _rx2) = RecordingConsumer::new();
    let res = within(
        "basic.consume with a tag in use",
        ch.basic_consume(c2, BasicConsumeArguments::new("tagged", "dup")),
    )
    .await;
    assert!(res.is_err());
    match next(&mut cev, "connection.close from the server").await {
        ConnEvent::Close { code, text } => {
            assert_eq!(code, 530);
            assert!(text.contains("reuse consumer tag 'dup'"), "{text}");
        }
    }
    // The connection's consumer is gone with it.
    let conn2 = connect(&server).await;
    let (ch2, _ev2) = channel(&conn2).await;
    assert_eq!(queue_counts(&ch2, "tagged").await, (0, 0));
    within("connection.close-ok", conn2.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn user_id_must_match_the_authenticated_user() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, mut ev) = channel(&conn).await;
    declare_queue(&ch, "uid").await;
    // The right user id is accepted.
    publish_with(
        &ch,
        "",
        "uid",
        BasicProperties::default().with_user_id("guest").finish(),
        "honest",
    )
    .await;
    assert_eq!(queue_counts(&ch, "uid").await, (1, 0));
    // Another user's id is refused with 406 and the message is not enqueued.
    publish_with(
        &ch,
        "",
        "uid",
        BasicProperties::default().with_user_id("mallory").finish(),
        "impostor",
    )
    .await;
    let c = closed(&mut ev).await;
    assert_eq!(c.code, 406);
    assert_eq!(
        c.text,
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'"
    );
    assert_eq!((c.class_id, c.method_id), (60, 40));
    let (ch2, _ev2) = channel(&conn).await;
    assert_eq!(queue_counts(&ch2, "uid").await, (1, 0));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn missing_queue_for_consume_get_and_purge_is_404() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;

    let c = fails_with(&conn, "consume from a missing queue", |ch| async move {
        let (consumer, _rx) = RecordingConsumer::new();
        ch.basic_consume(consumer, BasicConsumeArguments::new("nope", "c"))
            .await
    })
    .await;
    assert_eq!(c.code, 404);
    assert_eq!((c.class_id, c.method_id), (60, 20), "basic.consume");

    let c = fails_with(&conn, "purge of a missing queue", |ch| async move {
        ch.queue_purge(amqprs::channel::QueuePurgeArguments::new("nope"))
            .await
    })
    .await;
    assert_eq!(c.code, 404);
    assert_eq!((c.class_id, c.method_id), (50, 30), "queue.purge");

    let (ch, mut ev) = channel(&conn).await;
    let res = within(
        "basic.get from a missing queue",
        ch.basic_get(amqprs::channel::BasicGetArguments::new("nope")),
    )
    .await;
    assert!(res.is_err() || res.as_ref().is_ok_and(|r| r.is_none()));
    let c = closed(&mut ev).await;
    assert_eq!(c.code, 404);
    assert_eq!((c.class_id, c.method_id), (60, 70), "basic.get");

    still_usable(&conn, "after-missing-queue").await;
    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_queue_cannot_be_redeclared_by_another_connection() {
    let server = warren_tests::start_server();
    let owner = connect(&server).await;
    let other = connect(&server).await;
    let (och, _oev) = channel(&owner).await;
    within(
        "queue.declare-ok (exclusive)",
        och.queue_declare(QueueDeclareArguments::new("owned").exclusive(true).finish()),
    )
    .await
    .unwrap();

    // Another channel of the owning connection may use it.
    let (och2, _oev2) = channel(&owner).await;
    publish(&och2, "", "owned", "same connection").await;
    assert_eq!(queue_counts(&och2, "owned").await, (1, 0));

    let c = fails_with(
        &other,
        "redeclare another connection's exclusive queue",
        |ch| async move {
            ch.queue_declare(QueueDeclareArguments::new("owned").exclusive(true).finish())
                .await
        },
    )
    .await;
    assert_eq!(c.code, 405);
    let c = fails_with(
        &other,
        "purge another connection's exclusive queue",
        |ch| async move {
            ch.queue_purge(amqprs::channel::QueuePurgeArguments::new("owned"))
                .await
        },
    )
    .await;
    assert_eq!(c.code, 405);
    let c = fails_with(
        &other,
        "delete another connection's exclusive queue",
        |ch| async move { ch.queue_delete(QueueDeleteArguments::new("owned")).await },
    )
    .await;
    assert_eq!(c.code, 405);
    assert_eq!(queue_counts(&och, "owned").await, (1, 0), "untouched");

    within("connection.close-ok", owner.close()).await.unwrap();
    within("connection.close-ok", other.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn publishing_after_a_delete_sees_the_current_topology() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (pub_ch, mut pev) = confirm_channel(&conn).await;
    let (admin, _aev) = channel(&conn).await;

    // Default exchange: publish to "q" (so the publishing channel has looked it up), delete
    // and redeclare it elsewhere, publish again: the message goes to the new queue.
    declare_queue(&admin, "q").await;
    publish(&pub_ch, "", "q", "to-old").await;
    await_confirms(&mut pev, 1).await;
    within(
        "queue.delete-ok",
        admin.queue_delete(QueueDeleteArguments::new("q")),
    )
    .await
    .unwrap();
    declare_queue(&admin, "q").await;
    publish(&pub_ch, "", "q", "to-new").await;
    await_confirms_after(&mut pev, 1, 2).await;
    let got = within(
        "basic.get-ok",
        admin.basic_get(
            amqprs::channel::BasicGetArguments::new("q")
                .no_ack(true)
                .finish(),
        ),
    )
    .await
    .unwrap()
    .expect("the second message is in the new queue");
    assert_eq!(got.2, b"to-new");

    // A named exchange deleted after use: the next publish to it is a 404.
    within(
        "exchange.declare-ok",
        admin.exchange_declare(ExchangeDeclareArguments::new("short-lived", "fanout")),
    )
    .await
    .unwrap();
    within(
        "queue.bind-ok",
        admin.queue_bind(QueueBindArguments::new("q", "short-lived", "")),
    )
    .await
    .unwrap();
    publish(&pub_ch, "short-lived", "", "via-exchange").await;
    await_confirms_after(&mut pev, 2, 3).await;
    assert_eq!(queue_counts(&admin, "q").await, (1, 0));
    within(
        "exchange.delete-ok",
        admin.exchange_delete(ExchangeDeleteArguments::new("short-lived")),
    )
    .await
    .unwrap();
    publish(&pub_ch, "short-lived", "", "too-late").await;
    let c = closed(&mut pev).await;
    assert_eq!(c.code, 404);
    assert!(c.text.contains("short-lived"), "{}", c.text);
    assert_eq!(queue_counts(&admin, "q").await, (1, 0));

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}
