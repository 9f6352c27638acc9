//! Connection and channel lifecycle with lapin: login, vhosts, server properties, channel
//! open/close/flow, and channel errors that must not spread to the rest of the connection.

mod common;

use common::*;
use lapin::options::*;
use lapin::protocol::{connection, AMQPClass};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn url_with(server: &warren_gateway::ServerHandle, user: &str, pass: &str, vhost: &str) -> String {
    format!("amqp://{user}:{pass}@{}/{vhost}", server.local_addr())
}

#[tokio::test]
async fn guest_can_connect_and_use_a_channel() {
    let (server, conn, ch) = setup().await;
    assert!(conn.status().connected());
    assert_eq!(conn.status().username(), "guest");
    assert_eq!(conn.status().vhost().as_str(), "/");
    // The tune the server offered: frame_max 128 KiB, channel_max 2047, as RabbitMQ's defaults.
    assert_eq!(conn.configuration().frame_max(), 131_072);
    assert_eq!(conn.configuration().channel_max(), 2047);
    assert!(ch.status().connected());
    let q = declare_queue(&ch, "conn-q").await;
    assert_eq!(q.name().as_str(), "conn-q");
    within(conn.close(200, "bye".into())).await.expect("close");
    assert!(!conn.status().connected());
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_password_is_refused_with_403() {
    let server = warren_tests::start_server();
    let result = within(Connection::connect(
        &url_with(&server, "guest", "wrong", "%2f"),
        ConnectionProperties::default(),
    ))
    .await;
    let text = expect_code(result, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_user_is_refused_with_403() {
    let server = warren_tests::start_server();
    let result = within(Connection::connect(
        &url_with(&server, "nobody", "guest", "%2f"),
        ConnectionProperties::default(),
    ))
    .await;
    let text = expect_code(result, 403);
    assert!(text.starts_with("ACCESS_REFUSED - "), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_vhost_is_refused_with_530() {
    let server = warren_tests::start_server();
    let result = within(Connection::connect(
        &url_with(&server, "guest", "guest", "other"),
        ConnectionProperties::default(),
    ))
    .await;
    let text = expect_code(result, 530);
    assert_eq!(text, "NOT_ALLOWED - vhost other not found");
    // The server is still fine for everyone else.
    let conn = connect(&server).await;
    assert!(conn.status().connected());
    server.shutdown().await;
}

/// lapin does not expose the server properties, so read connection.start off a raw socket.
async fn read_connection_start(server: &warren_gateway::ServerHandle) -> connection::Start {
    let mut sock = within(tokio::net::TcpStream::connect(server.local_addr()))
        .await
        .expect("tcp connect");
    sock.write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .expect("send header");
    let mut header = [0u8; 7];
    within(sock.read_exact(&mut header))
        .await
        .expect("frame header");
    assert_eq!(header[0], 1, "the first frame must be a method frame");
    assert_eq!(
        u16::from_be_bytes([header[1], header[2]]),
        0,
        "on channel 0"
    );
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    within(sock.read_exact(&mut payload))
        .await
        .expect("frame payload");
    assert_eq!(payload[size], 0xCE, "frame end octet");
    let (_, class) =
        lapin::protocol::parse_class(&payload[..size]).expect("parse connection.start");
    match class {
        AMQPClass::Connection(connection::AMQPMethod::Start(start)) => start,
        other => panic!("expected connection.start, got {other:?}"),
    }
}

#[tokio::test]
async fn server_properties_advertise_product_and_capabilities() {
    let server = warren_tests::start_server();
    let start = read_connection_start(&server).await;
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = start.mechanisms.to_string();
    assert!(mechanisms.split(' ').any(|m| m == "PLAIN"), "{mechanisms}");
    assert!(
        mechanisms.split(' ').any(|m| m == "AMQPLAIN"),
        "{mechanisms}"
    );
    assert_eq!(start.locales.to_string(), "en_US");

    let props = start.server_properties.inner();
    match props.get("product") {
        Some(AMQPValue::LongString(s)) => assert_eq!(s.to_string(), "Warren"),
        other => panic!("product: {other:?}"),
    }
    for key in [
        "version",
        "platform",
        "copyright",
        "information",
        "cluster_name",
    ] {
        assert!(
            matches!(props.get(key), Some(AMQPValue::LongString(_))),
            "server property {key} missing: {props:?}"
        );
    }
    let Some(AMQPValue::FieldTable(caps)) = props.get("capabilities") else {
        panic!("no capabilities table: {props:?}");
    };
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "per_consumer_qos",
        "authentication_failure_close",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn channels_open_and_close_independently() {
    let (server, conn, ch1) = setup().await;
    let ch2 = channel(&conn).await;
    let ch3 = channel(&conn).await;
    assert_ne!(ch1.id(), ch2.id());
    assert_ne!(ch2.id(), ch3.id());
    declare_queue(&ch1, "chan-q").await;

    within(ch2.close(200, "done".into()))
        .await
        .expect("close ch2");
    assert!(!ch2.status().connected());
    // A closed channel refuses work on the client side, and the others are unaffected.
    assert!(within(ch2.basic_qos(1, BasicQosOptions::default()))
        .await
        .is_err());
    publish(&ch3, "", "chan-q", b"via ch3").await;
    assert_eq!(get_body(&ch1, "chan-q").await.as_deref(), Some("via ch3"));

    // Many channels at once, each usable.
    let mut many = Vec::new();
    for _ in 0..20 {
        many.push(channel(&conn).await);
    }
    for (i, ch) in many.iter().enumerate() {
        publish(ch, "", "chan-q", format!("m{i}").as_bytes()).await;
    }
    assert_eq!(message_count(&ch1, "chan-q").await, 20);
    for ch in &many {
        within(ch.close(200, "done".into())).await.expect("close");
    }
    assert!(conn.status().connected());
    server.shutdown().await;
}

#[tokio::test]
async fn channel_flow_active_is_acknowledged() {
    let (server, _conn, ch) = setup().await;
    let active = within(ch.channel_flow(ChannelFlowOptions { active: true }))
        .await
        .expect("channel.flow");
    assert!(active, "flow-ok must echo active=true");
    // The channel still works after it.
    declare_queue(&ch, "flow-q").await;
    publish(&ch, "", "flow-q", b"x").await;
    assert_eq!(get_body(&ch, "flow-q").await.as_deref(), Some("x"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_channel_error_closes_only_that_channel() {
    let (server, conn, ch1) = setup().await;
    let ch2 = channel(&conn).await;
    declare_queue(&ch2, "iso-q").await;
    let mut consumer = consume_with(
        &ch2,
        "iso-q",
        "iso-c",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;

    let result = within(ch1.queue_declare(
        "does-not-exist".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'does-not-exist' in vhost '/'");
    assert!(!ch1.status().connected(), "the failed channel is closed");

    // The connection and its other channel carry on: declare, publish, consume.
    assert!(conn.status().connected());
    assert!(ch2.status().connected());
    publish(&ch2, "", "iso-q", b"still alive").await;
    assert_eq!(next(&mut consumer).await.data, b"still alive");
    // And a new channel can be opened on the same connection.
    let ch3 = channel(&conn).await;
    assert_eq!(message_count(&ch3, "iso-q").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_error_closes_every_channel() {
    let (server, conn, ch1) = setup().await;
    let ch2 = channel(&conn).await;
    // An unknown exchange type is a connection error (503 COMMAND_INVALID) in RabbitMQ.
    let result = within(ch1.exchange_declare(
        "bad-type".into(),
        lapin::ExchangeKind::Custom("no-such-type".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_code(result, 503);
    assert_eq!(
        text,
        "COMMAND_INVALID - unknown exchange type 'no-such-type'"
    );
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(!ch2.status().connected());
    server.shutdown().await;
}
