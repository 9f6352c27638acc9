//! Direct reply-to: RPC replies through the `amq.rabbitmq.reply-to` pseudo-queue.

mod ext_common;

use ext_common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn no_ack() -> BasicConsumeOptions {
    BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn rpc_round_trip_over_direct_reply_to() {
    let server = warren_tests::start_server();
    let client_conn = connect(&server).await;
    let server_conn = connect(&server).await;

    // The RPC server: consumes requests on its own connection.
    let srv = channel(&server_conn).await;
    declare(&srv, "rpc.requests", FieldTable::default()).await;
    let mut requests = consume(&srv, "rpc.requests", "rpc-server").await;

    // The RPC client: consumes replies from the pseudo-queue first, with no_ack.
    let cli = channel(&client_conn).await;
    let ok = passive(&cli, REPLY_TO)
        .await
        .expect("the pseudo-queue can be declared passively");
    assert_eq!(ok.name().as_str(), REPLY_TO);
    let mut replies =
        consume_args(&cli, REPLY_TO, "replies", no_ack(), FieldTable::default()).await;

    let mut reply_names = Vec::new();
    for i in 0..2 {
        let props = BasicProperties::default()
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(format!("corr-{i}").into());
        publish_props(
            &cli,
            "",
            "rpc.requests",
            format!("ping {i}").as_bytes(),
            props,
        )
        .await;

        let req = next(&mut requests).await;
        assert_eq!(body(&req), format!("ping {i}"));
        let reply_to = req
            .properties
            .reply_to()
            .as_ref()
            .expect("the request carries a reply-to")
            .to_string();
        assert!(
            reply_to.starts_with("amq.rabbitmq.reply-to.") && reply_to.len() > REPLY_TO.len() + 1,
            "the server sees a per-client reply address, got {reply_to:?}"
        );
        reply_names.push(reply_to.clone());
        let corr = req
            .properties
            .correlation_id()
            .clone()
            .expect("correlation id");
        publish_props(
            &srv,
            "",
            &reply_to,
            format!("pong {i}").as_bytes(),
            BasicProperties::default().with_correlation_id(corr),
        )
        .await;
        ack(&req).await;

        let reply = next(&mut replies).await;
        assert_eq!(body(&reply), format!("pong {i}"));
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
            Some(format!("corr-{i}"))
        );
        assert_eq!(reply.exchange.as_str(), "");
        assert_eq!(reply.routing_key.as_str(), reply_to);
    }
    assert_eq!(
        reply_names[0], reply_names[1],
        "one reply address per channel"
    );

    // The reply address is not a queue clients can see or declare.
    let probe = channel(&server_conn).await;
    let text = expect_code(
        within(probe.queue_declare(
            "amq.rabbitmq.reply-to.custom".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ))
        .await,
        403,
    );
    assert!(text.contains("amq."), "{text}");

    within(server_conn.close(200, "bye".into())).await.ok();
    finish(server, client_conn).await;
}

#[tokio::test]
async fn reply_to_without_a_reply_consumer_is_406() {
    let (server, conn, ch) = setup().await;
    declare(&ch, "rpc.q", FieldTable::default()).await;
    let (code, text) = publish_refused(
        &ch,
        "",
        "rpc.q",
        BasicProperties::default().with_reply_to(REPLY_TO.into()),
    )
    .await;
    assert_eq!(code, 406, "{text}");
    assert!(
        text.contains("fast reply consumer does not exist"),
        "{text}"
    );

    // A consumer on another channel does not count: the reply consumer is per channel.
    let consumer_ch = channel(&conn).await;
    let _replies = consume_args(
        &consumer_ch,
        REPLY_TO,
        "replies",
        no_ack(),
        FieldTable::default(),
    )
    .await;
    let other = channel(&conn).await;
    let (code, _) = publish_refused(
        &other,
        "",
        "rpc.q",
        BasicProperties::default().with_reply_to(REPLY_TO.into()),
    )
    .await;
    assert_eq!(code, 406);

    let probe = channel(&conn).await;
    assert_eq!(
        message_count(&probe, "rpc.q").await,
        0,
        "refused requests are not enqueued"
    );
    finish(server, conn).await;
}

#[tokio::test]
async fn reply_consumer_must_be_no_ack() {
    let (server, conn, ch) = setup().await;
    let text = expect_code(
        within(ch.basic_consume(
            REPLY_TO.into(),
            "acking".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await,
        406,
    );
    assert!(text.contains("reply consumer cannot acknowledge"), "{text}");

    // One reply consumer per channel.
    let ch = channel(&conn).await;
    let _first = consume_args(&ch, REPLY_TO, "r1", no_ack(), FieldTable::default()).await;
    let text = expect_code(
        within(ch.basic_consume(
            REPLY_TO.into(),
            "r2".into(),
            no_ack(),
            FieldTable::default(),
        ))
        .await,
        406,
    );
    assert!(text.contains("reply consumer already set"), "{text}");

    // Cancelled, it is gone: publishing with reply-to is refused again.
    let ch = channel(&conn).await;
    let replies = consume_args(&ch, REPLY_TO, "r", no_ack(), FieldTable::default()).await;
    within(ch.basic_cancel(replies.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    declare(&ch, "rpc.after-cancel", FieldTable::default()).await;
    let (code, _) = publish_refused(
        &ch,
        "",
        "rpc.after-cancel",
        BasicProperties::default().with_reply_to(REPLY_TO.into()),
    )
    .await;
    assert_eq!(code, 406);
    finish(server, conn).await;
}

#[tokio::test]
async fn replies_after_the_client_left_are_dropped() {
    let server = warren_tests::start_server();
    let client_conn = connect(&server).await;
    let server_conn = connect(&server).await;
    let srv = channel(&server_conn).await;
    declare(&srv, "rpc.late", FieldTable::default()).await;
    let cli = channel(&client_conn).await;
    let _replies = consume_args(&cli, REPLY_TO, "r", no_ack(), FieldTable::default()).await;
    publish_props(
        &cli,
        "",
        "rpc.late",
        b"req",
        BasicProperties::default().with_reply_to(REPLY_TO.into()),
    )
    .await;
    let req = get(&srv, "rpc.late").await.expect("request");
    let reply_to = req
        .delivery
        .properties
        .reply_to()
        .clone()
        .expect("reply-to");
    within(client_conn.close(200, "bye".into())).await.ok();

    // The reply goes nowhere; the server's channel is not harmed.
    within(srv.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    assert!(publish(&srv, "", reply_to.as_str(), "too late")
        .await
        .is_ack());
    assert!(srv.status().connected());
    finish(server, server_conn).await;
}
