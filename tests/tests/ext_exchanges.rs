//! Exchange extensions: exchange-to-exchange bindings (exchange.bind/unbind), alternate
//! exchanges and internal exchanges.

mod ext_common;

use ext_common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

async fn exchange_bind(ch: &lapin::Channel, destination: &str, source: &str, key: &str) {
    within(ch.exchange_bind(
        destination.into(),
        source.into(),
        key.into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("bind exchange {destination} to {source}: {e}"))
}

async fn exchange_unbind(ch: &lapin::Channel, destination: &str, source: &str, key: &str) {
    within(ch.exchange_unbind(
        destination.into(),
        source.into(),
        key.into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("unbind exchange {destination} from {source}: {e}"))
}

#[tokio::test]
async fn exchange_to_exchange_routing_and_unbind() {
    let (server, conn, ch) = setup().await;
    declare_exchange(&ch, "e2e.src", ExchangeKind::Topic, FieldTable::default()).await;
    declare_exchange(&ch, "e2e.dst", ExchangeKind::Fanout, FieldTable::default()).await;
    declare(&ch, "e2e.q", FieldTable::default()).await;
    bind(&ch, "e2e.q", "e2e.dst", "").await;
    exchange_bind(&ch, "e2e.dst", "e2e.src", "orders.*").await;

    publish(&ch, "e2e.src", "orders.new", "matches").await;
    publish(&ch, "e2e.src", "invoices.new", "does not match").await;
    let got = get(&ch, "e2e.q")
        .await
        .expect("routed through the bound exchange");
    assert_eq!(body(&got.delivery), "matches");
    assert_eq!(
        got.delivery.exchange.as_str(),
        "e2e.src",
        "the exchange published to"
    );
    assert_eq!(got.delivery.routing_key.as_str(), "orders.new");
    assert!(get(&ch, "e2e.q").await.is_none());

    // A queue reachable both directly and through the bound exchange gets one copy.
    bind(&ch, "e2e.q", "e2e.src", "#").await;
    publish(&ch, "e2e.src", "orders.dup", "once").await;
    assert_eq!(drain(&ch, "e2e.q").await, vec!["once"]);

    within(ch.queue_unbind(
        "e2e.q".into(),
        "e2e.src".into(),
        "#".into(),
        FieldTable::default(),
    ))
    .await
    .expect("queue.unbind");
    exchange_unbind(&ch, "e2e.dst", "e2e.src", "orders.*").await;
    publish(&ch, "e2e.src", "orders.new", "after unbind").await;
    assert_eq!(
        message_count(&ch, "e2e.q").await,
        0,
        "unbound: nothing routed"
    );

    // Binding to an exchange that does not exist is a 404.
    let text = expect_code(
        within(ch.exchange_bind(
            "no-such-x".into(),
            "e2e.src".into(),
            "k".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ))
        .await,
        404,
    );
    assert!(text.contains("no-such-x"), "{text}");
    finish(server, conn).await;
}

#[tokio::test]
async fn exchange_binding_loops_do_not_hang_or_duplicate() {
    let (server, conn, ch) = setup().await;
    for x in ["loop.a", "loop.b", "loop.c"] {
        declare_exchange(&ch, x, ExchangeKind::Fanout, FieldTable::default()).await;
    }
    // a -> b -> c -> a, and a queue on each.
    exchange_bind(&ch, "loop.b", "loop.a", "").await;
    exchange_bind(&ch, "loop.c", "loop.b", "").await;
    exchange_bind(&ch, "loop.a", "loop.c", "").await;
    for q in ["loop.qa", "loop.qb", "loop.qc"] {
        declare(&ch, q, FieldTable::default()).await;
    }
    bind(&ch, "loop.qa", "loop.a", "").await;
    bind(&ch, "loop.qb", "loop.b", "").await;
    bind(&ch, "loop.qc", "loop.c", "").await;

    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    for (x, body) in [("loop.a", "via-a"), ("loop.c", "via-c")] {
        assert!(publish(&ch, x, "k", body).await.is_ack());
    }
    for q in ["loop.qa", "loop.qb", "loop.qc"] {
        assert_eq!(
            drain(&ch, q).await,
            vec!["via-a", "via-c"],
            "{q}: one copy of each"
        );
    }
    // Binding an exchange to itself is allowed and harmless too.
    exchange_bind(&ch, "loop.a", "loop.a", "").await;
    assert!(publish(&ch, "loop.a", "k", "self").await.is_ack());
    assert_eq!(drain(&ch, "loop.qa").await, vec!["self"]);
    finish(server, conn).await;
}

#[tokio::test]
async fn alternate_exchange_receives_unroutable_messages() {
    let (server, conn, ch) = setup().await;
    declare_exchange(&ch, "ae.alt", ExchangeKind::Fanout, FieldTable::default()).await;
    declare(&ch, "ae.unrouted", FieldTable::default()).await;
    bind(&ch, "ae.unrouted", "ae.alt", "").await;
    declare_exchange(
        &ch,
        "ae.main",
        ExchangeKind::Direct,
        table(&[("alternate-exchange", ls("ae.alt"))]),
    )
    .await;
    declare(&ch, "ae.routed", FieldTable::default()).await;
    bind(&ch, "ae.routed", "ae.main", "known").await;

    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    publish(&ch, "ae.main", "known", "routed").await;
    publish(&ch, "ae.main", "unknown", "unroutable").await;
    assert_eq!(drain(&ch, "ae.routed").await, vec!["routed"]);
    let got = get(&ch, "ae.unrouted")
        .await
        .expect("the alternate exchange took it");
    assert_eq!(body(&got.delivery), "unroutable");
    assert_eq!(
        got.delivery.exchange.as_str(),
        "ae.main",
        "the original exchange is kept"
    );
    assert_eq!(got.delivery.routing_key.as_str(), "unknown");

    // Routed by the alternate exchange, a mandatory message is not returned.
    let confirm = within(async {
        ch.basic_publish(
            "ae.main".into(),
            "other".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"mandatory",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
    })
    .await;
    assert!(confirm.is_ack());
    assert!(confirm.take_message().is_none(), "no basic.return");
    assert_eq!(drain(&ch, "ae.unrouted").await, vec!["mandatory"]);

    // An alternate exchange that cannot route it either: the message is returned.
    within(ch.queue_unbind(
        "ae.unrouted".into(),
        "ae.alt".into(),
        "".into(),
        FieldTable::default(),
    ))
    .await
    .expect("queue.unbind");
    let confirm = within(async {
        ch.basic_publish(
            "ae.main".into(),
            "other".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"nowhere",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
    })
    .await;
    let returned = confirm
        .take_message()
        .expect("basic.return for an unroutable message");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.data, b"nowhere");
    finish(server, conn).await;
}

#[tokio::test]
async fn internal_exchange_refuses_publishes_but_routes_bound_traffic() {
    let (server, conn, ch) = setup().await;
    within(ch.exchange_declare(
        "int.x".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare internal exchange");
    declare(&ch, "int.q", FieldTable::default()).await;
    bind(&ch, "int.q", "int.x", "").await;
    declare_exchange(
        &ch,
        "int.front",
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    exchange_bind(&ch, "int.x", "int.front", "").await;

    // Reachable through an exchange-to-exchange binding.
    publish(&ch, "int.front", "k", "through").await;
    assert_eq!(drain(&ch, "int.q").await, vec!["through"]);

    // Publishing to it directly is refused with 403 and closes the channel.
    let direct = channel(&conn).await;
    let (code, text) = publish_refused(&direct, "int.x", "k", BasicProperties::default()).await;
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("ACCESS_REFUSED") && text.contains("internal exchange 'int.x'"),
        "{text}"
    );
    assert!(conn.status().connected(), "403 closes the channel only");
    assert_eq!(message_count(&ch, "int.q").await, 0);
    finish(server, conn).await;
}

#[tokio::test]
async fn alternate_exchange_is_used_only_when_the_exchange_itself_matches_nothing() {
    let (server, conn, ch) = setup().await;
    declare_exchange(&ch, "ae2.alt", ExchangeKind::Fanout, FieldTable::default()).await;
    declare(&ch, "ae2.alt-q", FieldTable::default()).await;
    bind(&ch, "ae2.alt-q", "ae2.alt", "").await;
    declare_exchange(
        &ch,
        "ae2.main",
        ExchangeKind::Direct,
        table(&[("alternate-exchange", ls("ae2.alt"))]),
    )
    .await;
    // main routes "k" to another exchange, which has no queue: main matched a binding, so in
    // RabbitMQ its alternate exchange is not consulted and the message is simply unroutable.
    declare_exchange(
        &ch,
        "ae2.empty",
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await;
    exchange_bind(&ch, "ae2.empty", "ae2.main", "k").await;
    publish(&ch, "ae2.main", "k", "matched a binding").await;
    publish(&ch, "ae2.main", "other", "matched nothing").await;
    assert_eq!(drain(&ch, "ae2.alt-q").await, vec!["matched nothing"]);

    // An exchange reached through an exchange-to-exchange binding uses its own alternate
    // exchange when it matches nothing.
    declare_exchange(
        &ch,
        "ae2.inner",
        ExchangeKind::Direct,
        table(&[("alternate-exchange", ls("ae2.alt"))]),
    )
    .await;
    exchange_bind(&ch, "ae2.inner", "ae2.main", "inner").await;
    publish(&ch, "ae2.main", "inner", "via inner").await;
    assert_eq!(drain(&ch, "ae2.alt-q").await, vec!["via inner"]);
    finish(server, conn).await;
}
