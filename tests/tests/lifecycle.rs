//! Connection lifecycle over raw TCP: heartbeats both ways, a silent peer closed after two
//! missed intervals, and clean shutdown with 320 CONNECTION_FORCED.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_gateway::codec::protocol::{connection, AMQPClass};
use warren_gateway::codec::{decode_frame, encode_method, Frame, PROTOCOL_HEADER};

async fn read_frame(sock: &mut TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Ok(Some(frame)) = decode_frame(buf, 1 << 20) {
            return Some(frame);
        }
        match tokio::time::timeout(Duration::from_secs(10), sock.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

async fn expect_method(sock: &mut TcpStream, buf: &mut BytesMut) -> AMQPClass {
    loop {
        match read_frame(sock, buf).await.expect("a frame") {
            Frame::Method(_, m) => return *m,
            Frame::Heartbeat(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Opens a connection by hand, negotiating `heartbeat` seconds.
async fn handshake(addr: std::net::SocketAddr, heartbeat: u16) -> (TcpStream, BytesMut) {
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    let mut buf = BytesMut::new();
    sock.write_all(PROTOCOL_HEADER).await.expect("header");
    assert!(matches!(
        expect_method(&mut sock, &mut buf).await,
        AMQPClass::Connection(connection::AMQPMethod::Start(_))
    ));
    let start_ok = AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
        client_properties: Default::default(),
        mechanism: "PLAIN".into(),
        response: "\0guest\0guest".into(),
        locale: "en_US".into(),
    }));
    sock.write_all(&encode_method(0, &start_ok))
        .await
        .expect("start-ok");
    let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) =
        expect_method(&mut sock, &mut buf).await
    else {
        panic!("expected tune");
    };
    assert_eq!(tune.heartbeat, 60, "Warren proposes RabbitMQ's 60 s");
    let tune_ok = AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
        channel_max: tune.channel_max,
        frame_max: tune.frame_max,
        heartbeat,
    }));
    sock.write_all(&encode_method(0, &tune_ok))
        .await
        .expect("tune-ok");
    let open = AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
        virtual_host: "/".into(),
    }));
    sock.write_all(&encode_method(0, &open))
        .await
        .expect("open");
    assert!(matches!(
        expect_method(&mut sock, &mut buf).await,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
    ));
    (sock, buf)
}

#[tokio::test]
async fn server_sends_heartbeats_and_closes_a_silent_peer_after_two_intervals() {
    let server = warren_tests::start_server();
    let (mut sock, mut buf) = handshake(server.local_addr(), 1).await;
    let started = Instant::now();
    let mut heartbeats = 0;
    // Stay silent: the server heartbeats us meanwhile, then gives up on us.
    loop {
        match read_frame(&mut sock, &mut buf).await {
            Some(Frame::Heartbeat(0)) => heartbeats += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
    }
    let elapsed = started.elapsed();
    assert!(
        heartbeats >= 2,
        "server heartbeats while idle: got {heartbeats}"
    );
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(5),
        "closed after about two missed intervals, took {elapsed:?}"
    );
    // A peer that does heartbeat stays connected.
    let (mut sock, mut buf) = handshake(server.local_addr(), 1).await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        sock.write_all(&[8, 0, 0, 0, 0, 0, 0, 0xCE])
            .await
            .expect("still open");
        tokio::time::sleep(Duration::from_millis(400)).await;
        while let Ok(Some(_)) = decode_frame(&mut buf, 1 << 20) {}
        let _ = tokio::time::timeout(Duration::from_millis(10), sock.read_buf(&mut buf)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_connection_forced() {
    let server = warren_tests::start_server();
    let (mut sock, mut buf) = handshake(server.local_addr(), 0).await;
    let stopping = tokio::spawn(server.shutdown());
    let AMQPClass::Connection(connection::AMQPMethod::Close(close)) =
        expect_method(&mut sock, &mut buf).await
    else {
        panic!("expected connection.close");
    };
    assert_eq!(close.reply_code, 320);
    assert!(
        close.reply_text.as_str().starts_with("CONNECTION_FORCED"),
        "{}",
        close.reply_text
    );
    let close_ok = AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}));
    sock.write_all(&encode_method(0, &close_ok))
        .await
        .expect("close-ok");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("server stops")
        .expect("join");
}
