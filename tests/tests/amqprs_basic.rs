//! amqprs end-to-end: connections, channels and topology (exchanges, queues, bindings, purge,
//! delete) against an in-process Warren.

mod amqprs_common;

use amqprs::channel::Channel;
use amqprs::channel::{
    BasicCancelArguments, BasicConsumeArguments, BasicGetArguments, ExchangeDeclareArguments,
    ExchangeDeleteArguments, ExchangeType, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments, QueuePurgeArguments, QueueUnbindArguments,
};
use amqprs::connection::Connection;
use amqprs::{BasicProperties, FieldTable, FieldValue};
use amqprs_common::*;

/// Takes every ready message of `queue` with basic.get (auto-ack), returning the bodies.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let got = within(
            "basic.get-ok / get-empty",
            ch.basic_get(BasicGetArguments::new(queue).no_ack(true).finish()),
        )
        .await
        .expect("basic.get");
        match got {
            Some((_, _, body)) => out.push(String::from_utf8(body).expect("utf-8 body")),
            None => return out,
        }
        assert!(out.len() < 10_000, "queue '{queue}' never empties");
    }
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    within(
        "queue.bind-ok",
        ch.queue_bind(QueueBindArguments::new(queue, exchange, key)),
    )
    .await
    .expect("queue.bind");
}

/// Expects the server to close `rx`'s channel with `code`; returns the reply text.
async fn expect_channel_close(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<ChanEvent>,
    code: u16,
) -> String {
    match next(rx, "channel.close from the server").await {
        ChanEvent::Close {
            code: got, text, ..
        } => {
            assert_eq!(got, code, "reply code (text: {text})");
            text
        }
        other => panic!("expected channel.close {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_open_channel_and_close() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    assert!(conn.is_open());

    let props = conn.server_properties();
    let caps = props.capabilities();
    assert!(caps.publisher_confirms(), "publisher_confirms advertised");
    assert!(
        caps.consumer_cancel_notify(),
        "consumer_cancel_notify advertised"
    );
    assert!(caps.basic_nack(), "basic.nack advertised");
    assert!(caps.per_consumer_qos(), "per_consumer_qos advertised");
    assert!(caps.authentication_failure_close());
    assert_ne!(props.product(), "unknown", "server sends its product name");
    assert!(conn.channel_max() > 0);
    assert!(conn.frame_max() >= 4096);

    let (ch1, _ev1) = channel(&conn).await;
    let (ch2, _ev2) = channel(&conn).await;
    assert!(ch1.is_open() && ch2.is_open());
    assert_ne!(ch1.channel_id(), ch2.channel_id());

    // A round trip on each channel proves the server opened them.
    declare_queue(&ch1, "on-ch1").await;
    assert_eq!(queue_counts(&ch2, "on-ch1").await, (0, 0));

    within("channel.close-ok", ch1.close())
        .await
        .expect("close channel 1");
    // The other channel is unaffected.
    assert_eq!(queue_counts(&ch2, "on-ch1").await, (0, 0));
    within("channel.close-ok", ch2.close())
        .await
        .expect("close channel 2");

    let probe = conn.clone();
    within("connection.close-ok", conn.close())
        .await
        .expect("close connection");
    assert!(!probe.is_open());
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_credentials_and_vhost_are_refused() {
    let server = warren_tests::start_server();

    let err = within(
        "refusal of a wrong password",
        Connection::open(&args(&server, "guest", "not-the-password")),
    )
    .await
    .err()
    .expect("a wrong password must not open a connection");
    let text = err.to_string();
    assert!(text.contains("ACCESS_REFUSED"), "{text}");
    assert!(text.contains("403"), "{text}");

    let err = within(
        "refusal of an unknown user",
        Connection::open(&args(&server, "nobody", "guest")),
    )
    .await
    .err()
    .expect("an unknown user must not open a connection");
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");

    let err = within(
        "refusal of an unknown vhost",
        Connection::open(args(&server, "guest", "guest").virtual_host("no-such-vhost")),
    )
    .await
    .err()
    .expect("an unknown vhost must not open a connection");
    assert!(err.to_string().contains("530"), "{err}");

    // The server still accepts good logins afterwards.
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "after-refusals").await;
    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn exchanges_of_every_type_route_as_specified() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;

    for (name, kind) in [
        ("x-direct", ExchangeType::Direct),
        ("x-fanout", ExchangeType::Fanout),
        ("x-topic", ExchangeType::Topic),
        ("x-headers", ExchangeType::Headers),
    ] {
        within(
            "exchange.declare-ok",
            ch.exchange_declare(ExchangeDeclareArguments::of_type(name, kind)),
        )
        .await
        .unwrap_or_else(|e| panic!("declare {name}: {e}"));
        // Redeclaring with the same settings and passive declares both succeed.
        let kind_str = name.trim_start_matches("x-");
        within(
            "exchange.declare-ok (redeclare)",
            ch.exchange_declare(ExchangeDeclareArguments::new(name, kind_str)),
        )
        .await
        .unwrap_or_else(|e| panic!("redeclare {name}: {e}"));
        within(
            "exchange.declare-ok (passive)",
            ch.exchange_declare(
                ExchangeDeclareArguments::new(name, kind_str)
                    .passive(true)
                    .finish(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare {name}: {e}"));
    }
    for q in ["q1", "q2"] {
        declare_queue(&ch, q).await;
    }

    // direct: exact key match only.
    bind(&ch, "q1", "x-direct", "red").await;
    bind(&ch, "q2", "x-direct", "blue").await;
    publish(&ch, "x-direct", "red", "d-red").await;
    publish(&ch, "x-direct", "blue", "d-blue").await;
    publish(&ch, "x-direct", "green", "d-green").await;
    assert_eq!(drain(&ch, "q1").await, ["d-red"]);
    assert_eq!(drain(&ch, "q2").await, ["d-blue"]);

    // fanout: every bound queue, whatever the key.
    bind(&ch, "q1", "x-fanout", "").await;
    bind(&ch, "q2", "x-fanout", "ignored").await;
    publish(&ch, "x-fanout", "anything", "f1").await;
    assert_eq!(drain(&ch, "q1").await, ["f1"]);
    assert_eq!(drain(&ch, "q2").await, ["f1"]);

    // topic: * is one word, # is zero or more.
    bind(&ch, "q1", "x-topic", "stock.*.nyse").await;
    bind(&ch, "q2", "x-topic", "stock.#").await;
    publish(&ch, "x-topic", "stock.ibm.nyse", "t-ibm-nyse").await;
    publish(&ch, "x-topic", "stock.ibm.lse", "t-ibm-lse").await;
    publish(&ch, "x-topic", "stock", "t-stock").await;
    publish(&ch, "x-topic", "bond.ibm.nyse", "t-bond").await;
    assert_eq!(drain(&ch, "q1").await, ["t-ibm-nyse"]);
    assert_eq!(
        drain(&ch, "q2").await,
        ["t-ibm-nyse", "t-ibm-lse", "t-stock"]
    );

    // headers: x-match all / any over the message headers.
    let table = |pairs: &[(&str, &str)]| {
        let mut t = FieldTable::new();
        for (k, v) in pairs {
            t.insert((*k).try_into().unwrap(), FieldValue::from(*v));
        }
        t
    };
    within(
        "queue.bind-ok (headers all)",
        ch.queue_bind(
            QueueBindArguments::new("q1", "x-headers", "")
                .arguments(table(&[
                    ("x-match", "all"),
                    ("format", "pdf"),
                    ("type", "report"),
                ]))
                .finish(),
        ),
    )
    .await
    .unwrap();
    within(
        "queue.bind-ok (headers any)",
        ch.queue_bind(
            QueueBindArguments::new("q2", "x-headers", "")
                .arguments(table(&[
                    ("x-match", "any"),
                    ("format", "pdf"),
                    ("type", "log"),
                ]))
                .finish(),
        ),
    )
    .await
    .unwrap();
    for (headers, body) in [
        (
            table(&[("format", "pdf"), ("type", "report")]),
            "h-pdf-report",
        ),
        (table(&[("format", "zip"), ("type", "log")]), "h-zip-log"),
        (table(&[("format", "pdf")]), "h-pdf"),
        (table(&[("format", "zip")]), "h-zip"),
    ] {
        let props = BasicProperties::default().with_headers(headers).finish();
        publish_with(&ch, "x-headers", "", props, body).await;
    }
    assert_eq!(drain(&ch, "q1").await, ["h-pdf-report"]);
    assert_eq!(
        drain(&ch, "q2").await,
        ["h-pdf-report", "h-zip-log", "h-pdf"]
    );

    // The built-in exchanges exist.
    for (name, kind) in [
        ("amq.direct", "direct"),
        ("amq.fanout", "fanout"),
        ("amq.topic", "topic"),
        ("amq.headers", "headers"),
        ("amq.match", "headers"),
    ] {
        within(
            "exchange.declare-ok (passive built-in)",
            ch.exchange_declare(
                ExchangeDeclareArguments::new(name, kind)
                    .passive(true)
                    .finish(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("built-in {name}: {e}"));
    }

    // exchange.delete: gone afterwards (a passive declare now fails with 404).
    within(
        "exchange.delete-ok",
        ch.exchange_delete(ExchangeDeleteArguments::new("x-fanout")),
    )
    .await
    .expect("exchange.delete");
    let (probe, mut probe_ev) = channel(&conn).await;
    let res = within(
        "passive declare of a deleted exchange",
        probe.exchange_declare(
            ExchangeDeclareArguments::new("x-fanout", "fanout")
                .passive(true)
                .finish(),
        ),
    )
    .await;
    assert!(res.is_err(), "deleted exchange still declared passively");
    let text = expect_channel_close(&mut probe_ev, 404).await;
    assert!(text.contains("x-fanout"), "{text}");
    // Publishing to the deleted exchange's former queues still works via the others.
    publish(&ch, "x-direct", "red", "still-routed").await;
    assert_eq!(drain(&ch, "q1").await, ["still-routed"]);

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn named_and_server_named_queues() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;

    let q = declare_queue(&ch, "named").await;
    publish(&ch, "", &q, "one").await;
    publish(&ch, "", &q, "two").await;
    // Redeclaring reports the ready messages.
    let (name, messages, consumers) = within(
        "queue.declare-ok",
        ch.queue_declare(QueueDeclareArguments::new("named")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((name.as_str(), messages, consumers), ("named", 2, 0));

    let (gen1, m, c) = within(
        "queue.declare-ok (server-named)",
        ch.queue_declare(QueueDeclareArguments::default()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(gen1.starts_with("amq.gen-"), "server-named queue '{gen1}'");
    assert!(
        gen1.len() > "amq.gen-".len() + 8,
        "name has a random part: '{gen1}'"
    );
    assert_eq!((m, c), (0, 0));
    let (gen2, _, _) = within(
        "queue.declare-ok (server-named)",
        ch.queue_declare(QueueDeclareArguments::exclusive_server_named()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(gen2.starts_with("amq.gen-"));
    assert_ne!(gen1, gen2, "each server-named queue gets its own name");

    // The generated name is a real queue: the default exchange routes to it.
    publish(&ch, "", &gen1, "to-gen").await;
    assert_eq!(queue_counts(&ch, &gen1).await, (1, 0));
    assert_eq!(drain(&ch, &gen1).await, ["to-gen"]);

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn exclusive_queue_is_private_and_dies_with_its_connection() {
    let server = warren_tests::start_server();
    let owner = connect(&server).await;
    let other = connect(&server).await;
    let (och, _oev) = channel(&owner).await;

    let (q, _, _) = within(
        "queue.declare-ok (exclusive)",
        och.queue_declare(QueueDeclareArguments::new("mine").exclusive(true).finish()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(q, "mine");
    publish(&och, "", "mine", "private").await;
    assert_eq!(queue_counts(&och, "mine").await, (1, 0));

    // Another connection may not use it: 405 RESOURCE_LOCKED closes its channel.
    let (xch, mut xev) = channel(&other).await;
    let res = within(
        "passive declare of another connection's exclusive queue",
        xch.queue_declare(QueueDeclareArguments::new("mine").passive(true).finish()),
    )
    .await;
    assert!(res.is_err());
    let text = expect_channel_close(&mut xev, 405).await;
    assert!(text.starts_with("RESOURCE_LOCKED"), "{text}");
    assert!(!xch.is_open());

    let (xch2, mut xev2) = channel(&other).await;
    let res = within(
        "basic.get on another connection's exclusive queue",
        xch2.basic_get(BasicGetArguments::new("mine")),
    )
    .await;
    assert!(res.is_err() || res.as_ref().is_ok_and(|r| r.is_none()));
    expect_channel_close(&mut xev2, 405).await;

    // When the owner goes, the queue goes.
    within("connection.close-ok", owner.close()).await.unwrap();
    let (xch3, mut xev3) = channel(&other).await;
    let res = within(
        "passive declare after the owner closed",
        xch3.queue_declare(QueueDeclareArguments::new("mine").passive(true).finish()),
    )
    .await;
    assert!(res.is_err(), "exclusive queue outlived its connection");
    expect_channel_close(&mut xev3, 404).await;

    within("connection.close-ok", other.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn auto_delete_queue_goes_when_its_last_consumer_cancels() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;

    within(
        "queue.declare-ok (auto-delete)",
        ch.queue_declare(QueueDeclareArguments::transient_autodelete("ad")),
    )
    .await
    .unwrap()
    .unwrap();
    // No consumer yet: it stays.
    assert_eq!(queue_counts(&ch, "ad").await, (0, 0));

    let (c1, _rx1) = RecordingConsumer::new();
    let (c2, _rx2) = RecordingConsumer::new();
    let tag1 = within(
        "basic.consume-ok",
        ch.basic_consume(c1, BasicConsumeArguments::new("ad", "c1")),
    )
    .await
    .unwrap();
    let tag2 = within(
        "basic.consume-ok",
        ch.basic_consume(c2, BasicConsumeArguments::new("ad", "c2")),
    )
    .await
    .unwrap();
    assert_eq!(queue_counts(&ch, "ad").await, (0, 2));

    within(
        "basic.cancel-ok",
        ch.basic_cancel(BasicCancelArguments::new(&tag1)),
    )
    .await
    .unwrap();
    // One consumer left: the queue stays.
    assert_eq!(queue_counts(&ch, "ad").await, (0, 1));
    within(
        "basic.cancel-ok",
        ch.basic_cancel(BasicCancelArguments::new(&tag2)),
    )
    .await
    .unwrap();

    let (probe, mut pev) = channel(&conn).await;
    let res = within(
        "passive declare of an auto-deleted queue",
        probe.queue_declare(QueueDeclareArguments::new("ad").passive(true).finish()),
    )
    .await;
    assert!(res.is_err(), "auto-delete queue survived its last consumer");
    expect_channel_close(&mut pev, 404).await;

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn bind_and_unbind_change_routing() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "bq").await;

    // Unbound: nothing arrives.
    publish(&ch, "amq.direct", "k1", "before-bind").await;
    assert_eq!(queue_counts(&ch, "bq").await, (0, 0));

    bind(&ch, "bq", "amq.direct", "k1").await;
    bind(&ch, "bq", "amq.topic", "events.#").await;
    // Binding twice is harmless and does not duplicate deliveries.
    bind(&ch, "bq", "amq.direct", "k1").await;
    publish(&ch, "amq.direct", "k1", "via-direct").await;
    publish(&ch, "amq.topic", "events.a.b", "via-topic").await;
    publish(&ch, "amq.direct", "k2", "wrong-key").await;
    assert_eq!(queue_counts(&ch, "bq").await, (2, 0));
    assert_eq!(drain(&ch, "bq").await, ["via-direct", "via-topic"]);

    within(
        "queue.unbind-ok",
        ch.queue_unbind(QueueUnbindArguments::new("bq", "amq.direct", "k1")),
    )
    .await
    .expect("queue.unbind");
    publish(&ch, "amq.direct", "k1", "after-unbind").await;
    publish(&ch, "amq.topic", "events.c", "topic-still-bound").await;
    assert_eq!(drain(&ch, "bq").await, ["topic-still-bound"]);

    // Unbinding a binding that does not exist is fine (RabbitMQ answers unbind-ok).
    within(
        "queue.unbind-ok (absent binding)",
        ch.queue_unbind(QueueUnbindArguments::new("bq", "amq.direct", "never-bound")),
    )
    .await
    .expect("unbind of an absent binding");
    assert!(ch.is_open());

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn purge_and_delete_report_message_counts() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    declare_queue(&ch, "pq").await;
    declare_queue(&ch, "dq").await;

    for i in 0..5 {
        publish(&ch, "", "pq", format!("p{i}")).await;
    }
    for i in 0..3 {
        publish(&ch, "", "dq", format!("d{i}")).await;
    }
    assert_eq!(queue_counts(&ch, "pq").await, (5, 0));

    let purged = within(
        "queue.purge-ok",
        ch.queue_purge(QueuePurgeArguments::new("pq")),
    )
    .await
    .expect("queue.purge");
    assert_eq!(purged, Some(5));
    assert_eq!(queue_counts(&ch, "pq").await, (0, 0));
    let purged = within(
        "queue.purge-ok",
        ch.queue_purge(QueuePurgeArguments::new("pq")),
    )
    .await
    .unwrap();
    assert_eq!(purged, Some(0));
    // The queue still works after a purge.
    publish(&ch, "", "pq", "after-purge").await;
    assert_eq!(drain(&ch, "pq").await, ["after-purge"]);

    let deleted = within(
        "queue.delete-ok",
        ch.queue_delete(QueueDeleteArguments::new("dq")),
    )
    .await
    .expect("queue.delete");
    assert_eq!(deleted, Some(3));
    let deleted = within(
        "queue.delete-ok",
        ch.queue_delete(QueueDeleteArguments::new("pq")),
    )
    .await
    .unwrap();
    assert_eq!(deleted, Some(0));

    // Both are gone.
    for q in ["dq", "pq"] {
        let (probe, mut pev) = channel(&conn).await;
        let res = within(
            "passive declare of a deleted queue",
            probe.queue_declare(QueueDeclareArguments::new(q).passive(true).finish()),
        )
        .await;
        assert!(res.is_err(), "queue '{q}' still exists after delete");
        let text = expect_channel_close(&mut pev, 404).await;
        assert_eq!(text, format!("NOT_FOUND - no queue '{q}' in vhost '/'"));
    }

    // Redeclaring a deleted queue gives a fresh, empty one.
    declare_queue(&ch, "dq").await;

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn empty_queue_name_means_the_last_declared_queue() {
    let server = warren_tests::start_server();
    let conn = connect(&server).await;
    let (ch, _ev) = channel(&conn).await;
    let (generated, _, _) = within(
        "queue.declare-ok (server-named)",
        ch.queue_declare(QueueDeclareArguments::default()),
    )
    .await
    .unwrap()
    .unwrap();

    // queue.bind, basic.get, queue.purge and queue.delete with queue "" use that queue.
    bind(&ch, "", "amq.direct", "short").await;
    publish(&ch, "amq.direct", "short", "via-shortcut").await;
    publish(&ch, "amq.direct", "short", "second").await;
    assert_eq!(queue_counts(&ch, &generated).await, (2, 0));
    // With both queue and routing key empty, the routing key is the queue name too.
    bind(&ch, "", "amq.topic", "").await;
    publish(&ch, "amq.topic", &generated, "keyed-by-name").await;
    assert_eq!(queue_counts(&ch, &generated).await, (3, 0));
    within(
        "queue.unbind-ok (queue \"\")",
        ch.queue_unbind(QueueUnbindArguments::new("", "amq.topic", "")),
    )
    .await
    .unwrap();
    publish(&ch, "amq.topic", &generated, "unbound-now").await;
    assert_eq!(queue_counts(&ch, &generated).await, (3, 0));
    let (_, _, body) = within(
        "basic.get-ok (queue \"\")",
        ch.basic_get(BasicGetArguments::new("").no_ack(true).finish()),
    )
    .await
    .unwrap()
    .expect("message from the last declared queue");
    assert_eq!(body, b"via-shortcut");
    let purged = within(
        "queue.purge-ok",
        ch.queue_purge(QueuePurgeArguments::new("")),
    )
    .await
    .unwrap();
    assert_eq!(purged, Some(2));
    publish(&ch, "", &generated, "left").await;
    let deleted = within(
        "queue.delete-ok",
        ch.queue_delete(QueueDeleteArguments::new("")),
    )
    .await
    .unwrap();
    assert_eq!(deleted, Some(1));

    // A channel that declared nothing has no "last queue".
    let (fresh, mut fev) = channel(&conn).await;
    let res = within(
        "basic.get with queue \"\" on a fresh channel",
        fresh.basic_get(BasicGetArguments::new("")),
    )
    .await;
    assert!(res.is_err() || res.as_ref().is_ok_and(|r| r.is_none()));
    let text = expect_channel_close(&mut fev, 404).await;
    assert_eq!(text, "NOT_FOUND - no previously declared queue");

    within("connection.close-ok", conn.close()).await.unwrap();
    server.shutdown().await;
}
