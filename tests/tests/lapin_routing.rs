//! Routing through direct, fanout, topic and headers exchanges, the default exchange and the
//! built-in amq.* exchanges, observed with lapin.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

async fn publish_headers(ch: &Channel, exchange: &str, body: &str, headers: FieldTable) {
    publish_with(
        ch,
        exchange,
        "ignored",
        body.as_bytes(),
        BasicProperties::default().with_headers(headers),
    )
    .await
}

#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "dq1").await;
    declare_queue(&ch, "dq2").await;
    publish(&ch, "", "dq1", b"one").await;
    publish(&ch, "", "dq2", b"two").await;
    publish(&ch, "", "no-such-queue", b"dropped").await;
    assert_eq!(drain(&ch, "dq1").await, vec!["one"]);
    assert_eq!(drain(&ch, "dq2").await, vec!["two"]);
    // The delivery names the exchange it came through: "" for the default one.
    publish(&ch, "", "dq1", b"again").await;
    let m = within(ch.basic_get("dq1".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    assert_eq!(m.delivery.exchange.as_str(), "");
    assert_eq!(m.delivery.routing_key.as_str(), "dq1");
    server.shutdown().await;
}

#[tokio::test]
async fn direct_exchange_routes_by_exact_key() {
    let (server, _conn, ch) = setup().await;
    exchange(&ch, "rt-direct", ExchangeKind::Direct).await;
    for q in ["d-a", "d-b", "d-ab"] {
        declare_queue(&ch, q).await;
    }
    bind(&ch, "d-a", "rt-direct", "a").await;
    bind(&ch, "d-b", "rt-direct", "b").await;
    bind(&ch, "d-ab", "rt-direct", "a").await;
    bind(&ch, "d-ab", "rt-direct", "b").await;

    publish(&ch, "rt-direct", "a", b"A").await;
    publish(&ch, "rt-direct", "b", b"B").await;
    publish(&ch, "rt-direct", "c", b"C").await;
    publish(&ch, "rt-direct", "a.b", b"AB").await;

    assert_eq!(drain(&ch, "d-a").await, vec!["A"]);
    assert_eq!(drain(&ch, "d-b").await, vec!["B"]);
    assert_eq!(drain(&ch, "d-ab").await, vec!["A", "B"]);
    let m = {
        publish(&ch, "rt-direct", "a", b"again").await;
        within(ch.basic_get("d-a".into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("get")
            .expect("message")
    };
    assert_eq!(m.delivery.exchange.as_str(), "rt-direct");
    assert_eq!(m.delivery.routing_key.as_str(), "a");
    server.shutdown().await;
}

#[tokio::test]
async fn fanout_exchange_copies_to_every_bound_queue() {
    let (server, _conn, ch) = setup().await;
    exchange(&ch, "rt-fanout", ExchangeKind::Fanout).await;
    for q in ["f1", "f2", "f3"] {
        declare_queue(&ch, q).await;
        bind(&ch, q, "rt-fanout", "whatever").await;
    }
    declare_queue(&ch, "f-unbound").await;
    publish(&ch, "rt-fanout", "any.key", b"m1").await;
    publish(&ch, "rt-fanout", "", b"m2").await;
    for q in ["f1", "f2", "f3"] {
        assert_eq!(drain(&ch, q).await, vec!["m1", "m2"], "queue {q}");
    }
    assert_eq!(message_count(&ch, "f-unbound").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn topic_exchange_wildcards() {
    let (server, _conn, ch) = setup().await;
    exchange(&ch, "rt-topic", ExchangeKind::Topic).await;
    let patterns = [
        ("t-exact", "a.b.c"),
        ("t-star-mid", "a.*.c"),
        ("t-star-end", "a.*"),
        ("t-hash-end", "a.#"),
        ("t-hash-mid", "a.#.c"),
        ("t-hash-only", "#"),
        ("t-star-star", "*.*"),
        ("t-hash-start", "#.c"),
        ("t-star-hash", "*.b.#"),
    ];
    for (q, pattern) in patterns {
        declare_queue(&ch, q).await;
        bind(&ch, q, "rt-topic", pattern).await;
    }
    let keys = [
        "a.b.c", "a.x.c", "a", "a.b", "a.c", "a.b.b.c", "x.b", "c", "",
    ];
    for key in keys {
        publish(&ch, "rt-topic", key, key.as_bytes()).await;
    }
    let expect: &[(&str, &[&str])] = &[
        ("t-exact", &["a.b.c"]),
        ("t-star-mid", &["a.b.c", "a.x.c"]),
        ("t-star-end", &["a.b", "a.c"]),
        (
            "t-hash-end",
            &["a.b.c", "a.x.c", "a", "a.b", "a.c", "a.b.b.c"],
        ),
        ("t-hash-mid", &["a.b.c", "a.x.c", "a.c", "a.b.b.c"]),
        ("t-hash-only", &keys),
        ("t-star-star", &["a.b", "a.c", "x.b"]),
        ("t-hash-start", &["a.b.c", "a.x.c", "a.c", "a.b.b.c", "c"]),
        ("t-star-hash", &["a.b.c", "a.b", "a.b.b.c", "x.b"]),
    ];
    for (q, want) in expect {
        assert_eq!(drain(&ch, q).await, want.to_vec(), "queue {q}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn topic_message_matching_several_bindings_of_one_queue_arrives_once() {
    let (server, _conn, ch) = setup().await;
    exchange(&ch, "rt-topic2", ExchangeKind::Topic).await;
    declare_queue(&ch, "t-multi").await;
    bind(&ch, "t-multi", "rt-topic2", "a.*").await;
    bind(&ch, "t-multi", "rt-topic2", "#").await;
    bind(&ch, "t-multi", "rt-topic2", "a.b").await;
    publish(&ch, "rt-topic2", "a.b", b"once").await;
    assert_eq!(drain(&ch, "t-multi").await, vec!["once"]);
    server.shutdown().await;
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let (server, _conn, ch) = setup().await;
    exchange(&ch, "rt-headers", ExchangeKind::Headers).await;
    declare_queue(&ch, "h-all").await;
    declare_queue(&ch, "h-any").await;
    declare_queue(&ch, "h-default").await;
    bind_with(
        &ch,
        "h-all",
        "rt-headers",
        "",
        table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    bind_with(
        &ch,
        "h-any",
        "rt-headers",
        "",
        table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    // Without x-match, RabbitMQ matches all.
    bind_with(
        &ch,
        "h-default",
        "rt-headers",
        "",
        table(&[("format", s("pdf")), ("type", s("report"))]),
    )
    .await;

    publish_headers(
        &ch,
        "rt-headers",
        "both",
        table(&[("format", s("pdf")), ("type", s("report"))]),
    )
    .await;
    publish_headers(
        &ch,
        "rt-headers",
        "format-only",
        table(&[("format", s("pdf"))]),
    )
    .await;
    publish_headers(
        &ch,
        "rt-headers",
        "wrong-value",
        table(&[("format", s("zip")), ("type", s("log"))]),
    )
    .await;
    publish_headers(
        &ch,
        "rt-headers",
        "extra",
        table(&[
            ("format", s("pdf")),
            ("type", s("report")),
            ("size", AMQPValue::LongInt(10)),
        ]),
    )
    .await;
    publish(&ch, "rt-headers", "", b"no-headers").await;

    assert_eq!(drain(&ch, "h-all").await, vec!["both", "extra"]);
    assert_eq!(drain(&ch, "h-default").await, vec!["both", "extra"]);
    assert_eq!(
        drain(&ch, "h-any").await,
        vec!["both", "format-only", "extra"]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn headers_exchange_ignores_the_routing_key_and_compares_typed_values() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "h-num").await;
    bind_with(
        &ch,
        "h-num",
        "amq.headers",
        "some-key",
        table(&[
            ("n", AMQPValue::LongInt(42)),
            ("flag", AMQPValue::Boolean(true)),
        ]),
    )
    .await;
    publish_headers(
        &ch,
        "amq.headers",
        "match",
        table(&[
            ("n", AMQPValue::LongInt(42)),
            ("flag", AMQPValue::Boolean(true)),
        ]),
    )
    .await;
    publish_headers(
        &ch,
        "amq.headers",
        "wrong-number",
        table(&[
            ("n", AMQPValue::LongInt(43)),
            ("flag", AMQPValue::Boolean(true)),
        ]),
    )
    .await;
    publish_headers(
        &ch,
        "amq.headers",
        "wrong-flag",
        table(&[
            ("n", AMQPValue::LongInt(42)),
            ("flag", AMQPValue::Boolean(false)),
        ]),
    )
    .await;
    assert_eq!(drain(&ch, "h-num").await, vec!["match"]);
    server.shutdown().await;
}

#[tokio::test]
async fn builtin_exchanges_route() {
    let (server, _conn, ch) = setup().await;
    for q in ["b-direct", "b-fanout", "b-topic", "b-headers", "b-match"] {
        declare_queue(&ch, q).await;
    }
    bind(&ch, "b-direct", "amq.direct", "k").await;
    bind(&ch, "b-fanout", "amq.fanout", "").await;
    bind(&ch, "b-topic", "amq.topic", "k.#").await;
    bind_with(&ch, "b-headers", "amq.headers", "", table(&[("h", s("1"))])).await;
    bind_with(
        &ch,
        "b-match",
        "amq.match",
        "",
        table(&[("x-match", s("any")), ("h", s("1"))]),
    )
    .await;

    publish(&ch, "amq.direct", "k", b"direct").await;
    publish(&ch, "amq.fanout", "x", b"fanout").await;
    publish(&ch, "amq.topic", "k.sub.deep", b"topic").await;
    publish_headers(&ch, "amq.headers", "headers", table(&[("h", s("1"))])).await;
    publish_headers(&ch, "amq.match", "match", table(&[("h", s("1"))])).await;

    assert_eq!(drain(&ch, "b-direct").await, vec!["direct"]);
    assert_eq!(drain(&ch, "b-fanout").await, vec!["fanout"]);
    assert_eq!(drain(&ch, "b-topic").await, vec!["topic"]);
    assert_eq!(drain(&ch, "b-headers").await, vec!["headers"]);
    assert_eq!(drain(&ch, "b-match").await, vec!["match"]);
    server.shutdown().await;
}

#[tokio::test]
async fn one_message_to_many_queues_is_consumed_independently() {
    let (server, conn, ch) = setup().await;
    exchange(&ch, "rt-fan2", ExchangeKind::Fanout).await;
    declare_queue(&ch, "fc1").await;
    declare_queue(&ch, "fc2").await;
    bind(&ch, "fc1", "rt-fan2", "").await;
    bind(&ch, "fc2", "rt-fan2", "").await;
    let ch2 = channel(&conn).await;
    let mut c1 = consume(&ch2, "fc1", "c1").await;
    let mut c2 = consume(&ch2, "fc2", "c2").await;
    publish(&ch, "rt-fan2", "", b"shared").await;
    let d1 = next(&mut c1).await;
    let d2 = next(&mut c2).await;
    assert_eq!(d1.data, b"shared");
    assert_eq!(d2.data, b"shared");
    // Acking one copy leaves the other queue's copy alone.
    d1.ack(BasicAckOptions::default()).await.expect("ack");
    within(ch2.close(200, "bye".into())).await.expect("close");
    assert_eq!(message_count(&ch, "fc1").await, 0);
    assert_eq!(message_count(&ch, "fc2").await, 1);
    server.shutdown().await;
}
