//! basic.publish, basic.get, publisher confirms, mandatory returns, message properties and
//! bodies of every size, with lapin.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};

async fn confirm_channel(conn: &lapin::Connection) -> Channel {
    let ch = channel(conn).await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    ch
}

async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    mandatory: bool,
    body: &[u8],
    props: BasicProperties,
) -> Confirmation {
    within(async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
    })
    .await
}

#[tokio::test]
async fn basic_get_reports_the_remaining_count() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "p-get").await;
    assert!(
        within(ch.basic_get("p-get".into(), BasicGetOptions::default()))
            .await
            .expect("get on empty")
            .is_none()
    );
    fill(&ch, "p-get", &["a", "b", "c"]).await;
    for (i, (want, remaining)) in [("a", 2), ("b", 1), ("c", 0)].into_iter().enumerate() {
        let m = within(ch.basic_get("p-get".into(), BasicGetOptions::default()))
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(m.delivery.data, want.as_bytes());
        assert_eq!(m.message_count, remaining);
        assert_eq!(m.delivery.delivery_tag, i as u64 + 1);
        assert!(!m.delivery.redelivered);
        assert_eq!(m.delivery.routing_key.as_str(), "p-get");
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    assert!(
        within(ch.basic_get("p-get".into(), BasicGetOptions::default()))
            .await
            .expect("get-empty")
            .is_none()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn basic_get_from_a_missing_queue_is_404() {
    let (server, _conn, ch) = setup().await;
    let result = within(ch.basic_get("p-missing".into(), BasicGetOptions::default())).await;
    let text = expect_code(result, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'p-missing' in vhost '/'");
    server.shutdown().await;
}

#[tokio::test]
async fn publisher_confirms_ack_every_publish() {
    let (server, conn, _ch) = setup().await;
    let ch = confirm_channel(&conn).await;
    declare_queue(&ch, "p-confirm").await;
    // One at a time.
    for i in 0..5 {
        let c = publish_confirmed(
            &ch,
            "",
            "p-confirm",
            false,
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
        assert_eq!(c, Confirmation::Ack(None));
    }
    // Many in flight at once.
    let mut pending = Vec::new();
    for i in 0..200 {
        pending.push(
            within(ch.basic_publish(
                "".into(),
                "p-confirm".into(),
                BasicPublishOptions::default(),
                format!("burst{i}").as_bytes(),
                BasicProperties::default(),
            ))
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(within(p).await.expect("confirm").is_ack());
    }
    // Unroutable, non-mandatory messages are confirmed too.
    let c = publish_confirmed(
        &ch,
        "amq.direct",
        "nobody-bound",
        false,
        b"dropped",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(c, Confirmation::Ack(None));
    within(ch.wait_for_confirms())
        .await
        .expect("wait_for_confirms");
    assert_eq!(message_count(&ch, "p-confirm").await, 205);
    server.shutdown().await;
}

#[tokio::test]
async fn mandatory_unroutable_message_is_returned_with_312() {
    let (server, conn, _ch) = setup().await;
    let ch = confirm_channel(&conn).await;
    let props = BasicProperties::default()
        .with_message_id("ret-1".into())
        .with_content_type("text/plain".into());
    let c = publish_confirmed(
        &ch,
        "amq.direct",
        "no-route",
        true,
        b"come back",
        props.clone(),
    )
    .await;
    // RabbitMQ sends basic.return before the basic.ack.
    assert!(c.is_ack(), "{c:?}");
    let returned = c.take_message().expect("the returned message");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(returned.delivery.routing_key.as_str(), "no-route");
    assert_eq!(returned.delivery.data, b"come back");
    assert_eq!(returned.delivery.properties, props);

    // Through the default exchange to a missing queue, too.
    let c = publish_confirmed(
        &ch,
        "",
        "no-such-queue",
        true,
        b"x",
        BasicProperties::default(),
    )
    .await;
    let returned = c.take_message().expect("returned");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.exchange.as_str(), "");

    // A routable mandatory message is simply delivered.
    declare_queue(&ch, "p-mandatory").await;
    let c = publish_confirmed(
        &ch,
        "",
        "p-mandatory",
        true,
        b"ok",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(c, Confirmation::Ack(None));
    assert_eq!(get_body(&ch, "p-mandatory").await.as_deref(), Some("ok"));
    server.shutdown().await;
}

#[tokio::test]
async fn publish_to_a_missing_exchange_closes_the_channel_with_404() {
    let (server, conn, ch) = setup().await;
    let mut errors = ErrorWatch::new(&conn);
    within(ch.basic_publish(
        "p-no-such-exchange".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"lost",
        BasicProperties::default(),
    ))
    .await
    .expect("the publish itself is sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(code, 404);
    assert_eq!(
        text,
        "NOT_FOUND - no exchange 'p-no-such-exchange' in vhost '/'"
    );
    assert!(conn.status().connected());
    // In confirm mode the pending confirm fails with the channel error.
    let ch = confirm_channel(&conn).await;
    let confirm = within(ch.basic_publish(
        "p-no-such-exchange".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"lost",
        BasicProperties::default(),
    ))
    .await
    .expect("publish sent");
    let err = within(confirm).await.expect_err("the confirm fails");
    assert_eq!(amqp_error(&err).map(|(c, _)| c), Some(404), "{err:?}");
    server.shutdown().await;
}

fn rich_headers() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner-string".into(), AMQPValue::LongString("deep".into()));
    nested.insert("inner-int".into(), AMQPValue::LongLongInt(-7));
    let mut deeper = FieldTable::default();
    deeper.insert("level".into(), AMQPValue::ShortShortUInt(3));
    nested.insert("deeper".into(), AMQPValue::FieldTable(deeper));

    let mut array = FieldArray::default();
    array.push(AMQPValue::LongString("one".into()));
    array.push(AMQPValue::LongInt(2));
    array.push(AMQPValue::Boolean(false));

    let mut h = FieldTable::default();
    h.insert(
        "string".into(),
        AMQPValue::LongString(LongString::from("hello")),
    );
    h.insert("bool".into(), AMQPValue::Boolean(true));
    h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    h.insert("u8".into(), AMQPValue::ShortShortUInt(8));
    h.insert("i16".into(), AMQPValue::ShortInt(-16));
    h.insert("u16".into(), AMQPValue::ShortUInt(16));
    h.insert("i32".into(), AMQPValue::LongInt(-32));
    h.insert("u32".into(), AMQPValue::LongUInt(32));
    h.insert("i64".into(), AMQPValue::LongLongInt(-64_000_000_000));
    h.insert("f32".into(), AMQPValue::Float(1.5));
    h.insert("f64".into(), AMQPValue::Double(-2.25));
    h.insert(
        "decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    h.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("void".into(), AMQPValue::Void);
    h.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 254, 255])),
    );
    h.insert("array".into(), AMQPValue::FieldArray(array));
    h.insert("table".into(), AMQPValue::FieldTable(nested));
    h
}

fn all_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(rich_headers())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-42".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("60000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
}

#[tokio::test]
async fn properties_and_headers_round_trip() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "p-props").await;
    let props = all_properties();
    publish_with(&ch, "", "p-props", b"{}", props.clone()).await;
    publish_with(&ch, "", "p-props", b"{}", props.clone()).await;

    // Through basic.get...
    let m = within(ch.basic_get("p-props".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    assert_eq!(m.delivery.properties, props);
    // ...and through a consumer.
    let mut consumer = consume(&ch, "p-props", "props").await;
    let d = next(&mut consumer).await;
    assert_eq!(d.properties, props);
    assert_eq!(
        d.properties.user_id().as_ref().map(|u| u.as_str()),
        Some("guest")
    );
    assert_eq!(d.properties.priority(), &Some(7));
    assert_eq!(d.properties.timestamp(), &Some(1_700_000_123));

    // No properties at all is a valid message too.
    publish(&ch, "", "p-props", b"bare").await;
    let d = next(&mut consumer).await;
    assert_eq!(d.properties, BasicProperties::default());
    server.shutdown().await;
}

#[tokio::test]
async fn user_id_must_match_the_authenticated_user() {
    // RabbitMQ validates user-id: publishing as someone else is a 406 channel error.
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "p-user").await;
    let mut errors = ErrorWatch::new(&conn);
    within(ch.basic_publish(
        "".into(),
        "p-user".into(),
        BasicPublishOptions::default(),
        b"forged",
        BasicProperties::default().with_user_id("mallory".into()),
    ))
    .await
    .expect("publish sent");
    let (code, text) = errors.next_error().await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'"
    );
    let ch = channel(&conn).await;
    assert_eq!(message_count(&ch, "p-user").await, 0);
    server.shutdown().await;
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn bodies_of_every_size_arrive_intact() {
    let (server, conn, ch) = setup().await;
    let frame_max = conn.configuration().frame_max() as usize;
    // A body frame carries frame_max - 8 bytes: test around that boundary and far beyond it.
    let chunk = frame_max - 8;
    let sizes = [
        0,
        1,
        chunk - 1,
        chunk,
        chunk + 1,
        3 * chunk,
        1024 * 1024,
        4 * 1024 * 1024 + 3,
    ];
    declare_queue(&ch, "p-sizes").await;
    for &n in &sizes {
        publish(&ch, "", "p-sizes", &pattern(n)).await;
    }
    let mut consumer = consume_with(
        &ch,
        "p-sizes",
        "sizes",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    for &n in &sizes {
        let d = next(&mut consumer).await;
        assert_eq!(d.data.len(), n, "body length");
        assert!(d.data == pattern(n), "body of {n} bytes corrupted");
    }
    // basic.get of a large body too.
    let ch2 = channel(&conn).await;
    declare_queue(&ch2, "p-big-get").await;
    publish(&ch2, "", "p-big-get", &pattern(1024 * 1024)).await;
    let m = within(ch2.basic_get("p-big-get".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    assert!(m.delivery.data == pattern(1024 * 1024));
    server.shutdown().await;
}

#[tokio::test]
async fn empty_body_with_properties() {
    let (server, _conn, ch) = setup().await;
    declare_queue(&ch, "p-empty").await;
    let props = BasicProperties::default().with_message_id("empty".into());
    publish_with(&ch, "", "p-empty", b"", props.clone()).await;
    let m = within(ch.basic_get("p-empty".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    assert!(m.delivery.data.is_empty());
    assert_eq!(m.delivery.properties, props);
    server.shutdown().await;
}

#[tokio::test]
async fn messages_from_several_publishers_keep_per_publisher_order() {
    let (server, conn, ch) = setup().await;
    declare_queue(&ch, "p-order").await;
    let a = confirm_channel(&conn).await;
    let b = confirm_channel(&conn).await;
    let mut pending = Vec::new();
    for i in 0..50 {
        for (name, ch) in [("a", &a), ("b", &b)] {
            pending.push(
                within(ch.basic_publish(
                    "".into(),
                    "p-order".into(),
                    BasicPublishOptions::default(),
                    format!("{name}{i}").as_bytes(),
                    BasicProperties::default(),
                ))
                .await
                .expect("publish"),
            );
        }
    }
    for p in pending {
        assert!(within(p).await.expect("confirm").is_ack());
    }
    let all = drain(&ch, "p-order").await;
    assert_eq!(all.len(), 100);
    for name in ["a", "b"] {
        let mine: Vec<&String> = all.iter().filter(|m| m.starts_with(name)).collect();
        let want: Vec<String> = (0..50).map(|i| format!("{name}{i}")).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>());
    }
    server.shutdown().await;
}
