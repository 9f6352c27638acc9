//! exchange.declare and exchange.delete with lapin, and the errors RabbitMQ gives for them.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

async fn declare(ch: &Channel, name: &str, kind: ExchangeKind) -> lapin::Result<()> {
    within(ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
}

async fn passive(ch: &Channel, name: &str) -> lapin::Result<()> {
    within(ch.exchange_declare(
        name.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

async fn delete(ch: &Channel, name: &str, if_unused: bool) -> lapin::Result<()> {
    within(ch.exchange_delete(
        name.into(),
        ExchangeDeleteOptions {
            if_unused,
            ..Default::default()
        },
    ))
    .await
}

#[tokio::test]
async fn declare_every_kind_and_find_it_passively() {
    let (server, _conn, ch) = setup().await;
    for (name, kind) in [
        ("x-direct", ExchangeKind::Direct),
        ("x-fanout", ExchangeKind::Fanout),
        ("x-topic", ExchangeKind::Topic),
        ("x-headers", ExchangeKind::Headers),
    ] {
        declare(&ch, name, kind.clone()).await.expect("declare");
        // Redeclaring with the same settings is fine.
        declare(&ch, name, kind).await.expect("redeclare");
        passive(&ch, name)
            .await
            .expect("passive declare of an existing exchange");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn builtin_exchanges_exist() {
    let (server, _conn, ch) = setup().await;
    for name in [
        "amq.direct",
        "amq.fanout",
        "amq.topic",
        "amq.headers",
        "amq.match",
    ] {
        passive(&ch, name)
            .await
            .unwrap_or_else(|e| panic!("{name} should exist: {e}"));
    }
    // Redeclaring a built-in exchange with its own settings (durable) is allowed.
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        ("amq.topic", ExchangeKind::Topic),
        ("amq.match", ExchangeKind::Headers),
        ("amq.fanout", ExchangeKind::Fanout),
    ] {
        within(ch.exchange_declare(name.into(), kind, durable, FieldTable::default()))
            .await
            .unwrap_or_else(|e| panic!("redeclare {name}: {e}"));
    }
    // With other settings it is inequivalent, as for any existing exchange.
    let result = within(ch.exchange_declare(
        "amq.topic".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'amq.topic' in vhost '/': received 'false' but current is 'true'"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn passive_declare_of_a_missing_exchange_is_404() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(passive(&ch, "no-such-exchange").await, 404);
    assert_eq!(
        text,
        "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'"
    );
    assert!(!ch.status().connected());
    assert!(conn.status().connected(), "404 is a channel error");
    server.shutdown().await;
}

#[tokio::test]
async fn redeclare_with_another_type_is_406() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "typed", ExchangeKind::Direct)
        .await
        .expect("declare");
    let text = expect_code(declare(&ch, "typed", ExchangeKind::Fanout).await, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'typed' in vhost '/': received 'fanout' but current is 'direct'"
    );
    assert!(conn.status().connected(), "406 is a channel error");
    // The exchange is unchanged.
    let ch2 = channel(&conn).await;
    declare(&ch2, "typed", ExchangeKind::Direct)
        .await
        .expect("same type still fine");
    server.shutdown().await;
}

#[tokio::test]
async fn redeclare_with_other_durability_is_406() {
    let (server, _conn, ch) = setup().await;
    declare(&ch, "durable-x", ExchangeKind::Topic)
        .await
        .expect("declare");
    let result = within(ch.exchange_declare(
        "durable-x".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 406);
    assert!(text.contains("inequivalent arg 'durable'"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn amq_prefix_is_reserved() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(declare(&ch, "amq.foo", ExchangeKind::Direct).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - exchange name 'amq.foo' contains reserved prefix 'amq.*'"
    );
    assert!(conn.status().connected(), "403 is a channel error");
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_exchange_type_is_a_503_connection_error() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(
        declare(&ch, "weird", ExchangeKind::Custom("x-nonsense".into())).await,
        503,
    );
    assert_eq!(text, "COMMAND_INVALID - unknown exchange type 'x-nonsense'");
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn delete_if_unused_refuses_while_bound_then_deletes() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "del-x", ExchangeKind::Direct)
        .await
        .expect("declare");
    declare_queue(&ch, "del-q").await;
    bind(&ch, "del-q", "del-x", "k").await;

    let text = expect_code(delete(&ch, "del-x", true).await, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - exchange 'del-x' in vhost '/' in use"
    );

    let ch = channel(&conn).await;
    within(ch.queue_unbind(
        "del-q".into(),
        "del-x".into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind");
    delete(&ch, "del-x", true)
        .await
        .expect("delete unused exchange");
    let text = expect_code(passive(&ch, "del-x").await, 404);
    assert!(text.contains("no exchange 'del-x'"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn delete_without_if_unused_drops_bindings() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "del2-x", ExchangeKind::Fanout)
        .await
        .expect("declare");
    declare_queue(&ch, "del2-q").await;
    bind(&ch, "del2-q", "del2-x", "").await;
    delete(&ch, "del2-x", false).await.expect("delete");
    expect_code(passive(&ch, "del2-x").await, 404);
    // Recreated, it has no bindings left: nothing reaches the queue.
    let ch = channel(&conn).await;
    declare(&ch, "del2-x", ExchangeKind::Fanout)
        .await
        .expect("redeclare");
    publish(&ch, "del2-x", "", b"lost").await;
    assert_eq!(message_count(&ch, "del2-q").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn deleting_a_missing_exchange_succeeds() {
    // RabbitMQ 3.x answers exchange.delete-ok for an exchange that does not exist.
    let (server, _conn, ch) = setup().await;
    delete(&ch, "never-declared", false)
        .await
        .expect("delete of a missing exchange is not an error");
    assert!(ch.status().connected());
    server.shutdown().await;
}

#[tokio::test]
async fn builtin_exchanges_cannot_be_deleted_or_declared_over() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(delete(&ch, "amq.direct", false).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"
    );
    let ch = channel(&conn).await;
    let text = expect_code(delete(&ch, "", false).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    // Redeclaring a built-in exchange with another type is a 406 like for any exchange.
    let ch = channel(&conn).await;
    let result = within(ch.exchange_declare(
        "amq.direct".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 406);
    assert!(text.contains("inequivalent arg 'type'"), "{text}");
    // The default exchange cannot be declared at all.
    let ch = channel(&conn).await;
    let text = expect_code(declare(&ch, "", ExchangeKind::Direct).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    // amq.direct survived.
    let ch = channel(&conn).await;
    passive(&ch, "amq.direct")
        .await
        .expect("amq.direct still there");
    server.shutdown().await;
}

#[tokio::test]
async fn default_exchange_cannot_be_declared_even_passively() {
    let (server, _conn, ch) = setup().await;
    let text = expect_code(passive(&ch, "").await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn auto_delete_exchange_goes_with_its_last_binding() {
    let (server, conn, ch) = setup().await;
    let auto = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    within(ch.exchange_declare(
        "auto-x".into(),
        ExchangeKind::Direct,
        auto,
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    // Never bound: it stays.
    passive(&ch, "auto-x").await.expect("still there");
    declare_queue(&ch, "auto-x-q").await;
    bind(&ch, "auto-x-q", "auto-x", "a").await;
    bind(&ch, "auto-x-q", "auto-x", "b").await;
    let unbind = |key: &'static str| {
        ch.queue_unbind(
            "auto-x-q".into(),
            "auto-x".into(),
            key.into(),
            FieldTable::default(),
        )
    };
    within(unbind("a")).await.expect("unbind a");
    passive(&ch, "auto-x").await.expect("one binding left");
    within(unbind("b")).await.expect("unbind b");
    let ch = channel(&conn).await;
    let text = expect_code(passive(&ch, "auto-x").await, 404);
    assert!(text.contains("no exchange 'auto-x'"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn publishing_to_an_internal_exchange_is_403() {
    let (server, conn, ch) = setup().await;
    let internal = ExchangeDeclareOptions {
        internal: true,
        ..Default::default()
    };
    within(ch.exchange_declare(
        "internal-x".into(),
        ExchangeKind::Fanout,
        internal,
        FieldTable::default(),
    ))
    .await
    .expect("declare internal");
    let mut errors = ErrorWatch::new(&conn);
    within(ch.basic_publish(
        "internal-x".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"nope",
        lapin::BasicProperties::default(),
    ))
    .await
    .expect("publish sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - cannot publish to internal exchange 'internal-x' in vhost '/'"
    );
    server.shutdown().await;
}
