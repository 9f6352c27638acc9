//! Malformed input over raw TCP, table-driven. Each case starts a server, opens a well-behaved
//! connection, then a raw socket that does as much of the handshake as the case needs by hand and
//! sends one bad thing. The reply must be exactly what RabbitMQ answers (its protocol header, or
//! connection.close with RabbitMQ's reply code and method ids), the server must close the socket
//! after close-ok, and the well-behaved connection must still do a declare/publish/get round trip.
//! A panic anywhere in the server fails the case.

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_gateway::codec::protocol::{basic, channel, connection, queue};
use warren_gateway::codec::{
    decode_frame, encode_method, AMQPClass, Encoder, FieldTable, Frame, FRAME_BODY, FRAME_END,
    FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, PROTOCOL_HEADER,
};
use warren_gateway::ServerHandle;

/// How long any single step may take before the case fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);
/// The frame_max the raw client asks for in tune-ok.
const FRAME_MAX: u32 = 4096;
/// The channel the raw client opens when a case asks for one.
const CH: u16 = 1;

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A raw AMQP peer
// ---------------------------------------------------------------------------------------------

struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    async fn connect(server: &ServerHandle) -> Peer {
        let stream = within("connect", TcpStream::connect(server.local_addr()))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Peer {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes))
            .await
            .expect("write to the server");
    }

    async fn send(&mut self, channel: u16, method: AMQPClass) {
        self.write(&encode_method(channel, &method)).await;
    }

    /// The next frame from the server, or `None` when it closed the socket.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) =
                decode_frame(&mut self.buf, usize::MAX).expect("the server sends valid frames")
            {
                return Some(frame);
            }
            match within("read a frame", self.stream.read_buf(&mut self.buf)).await {
                Ok(0) | Err(_) => {
                    assert!(
                        self.buf.is_empty(),
                        "socket closed mid-frame: {:?}",
                        self.buf
                    );
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// The next method from the server, skipping heartbeats.
    async fn method(&mut self) -> (u16, AMQPClass) {
        loop {
            match self.next_frame().await {
                Some(Frame::Method(channel, m)) => return (channel, *m),
                Some(Frame::Heartbeat(_)) => continue,
                other => panic!("expected a method from the server, got {other:?}"),
            }
        }
    }

    async fn expect_eof(&mut self) {
        let started = Instant::now();
        loop {
            match within(
                "the server to close the socket",
                self.stream.read_buf(&mut self.buf),
            )
            .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // connection.close-ok is honoured at once, not after the server's close-ok timeout.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the server took {:?} to close the socket",
            started.elapsed()
        );
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before EOF: {:?}",
            self.buf
        );
    }

    /// Protocol header, start/start-ok (PLAIN guest), tune/tune-ok, open/open-ok.
    async fn handshake(server: &ServerHandle) -> Peer {
        let mut peer = Peer::connect(server).await;
        peer.write(PROTOCOL_HEADER).await;
        match peer.method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) => {
                assert_eq!((start.version_major, start.version_minor), (0, 9));
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        peer.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        let tune = match peer.method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => tune,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        assert!(tune.frame_max >= FRAME_MAX);
        peer.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: FRAME_MAX,
                heartbeat: 0,
            })),
        )
        .await;
        peer.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match peer.method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        peer
    }

    async fn open_channel(&mut self, ch: u16) {
        self.send(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.method().await {
            (c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) if c == ch => {}
            other => panic!("expected channel.open-ok on {ch}, got {other:?}"),
        }
    }

    /// Waits for connection.close, answers close-ok, and waits for the socket to close.
    async fn expect_close(&mut self) -> connection::Close {
        let close = match self.method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => close,
            other => panic!("expected connection.close, got {other:?}"),
        };
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        self.expect_eof().await;
        close
    }

    /// A clean client-side close: connection.close, close-ok, end of stream.
    async fn close(&mut self) {
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
        match self.method().await {
            (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {}
            other => panic!("expected connection.close-ok, got {other:?}"),
        }
        self.expect_eof().await;
    }

    /// queue.declare, basic.publish, basic.get: the connection still works end to end.
    async fn round_trip(&mut self, ch: u16, queue_name: &str) {
        self.send(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: queue_name.into(),
                passive: false,
                durable: false,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
        match self.method().await {
            (c, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) if c == ch => {
                assert_eq!(ok.queue.as_str(), queue_name);
            }
            other => panic!("expected queue.declare-ok, got {other:?}"),
        }
        let body = format!("still alive: {queue_name}");
        self.write(&publish_frames(ch, queue_name, body.as_bytes()))
            .await;
        self.send(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: queue_name.into(),
                no_ack: true,
            })),
        )
        .await;
        match self.method().await {
            (c, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))) if c == ch => {
                assert_eq!(ok.routing_key.as_str(), queue_name);
            }
            other => panic!("expected basic.get-ok, got {other:?}"),
        }
        match self.next_frame().await {
            Some(Frame::Header(c, h)) if c == ch => assert_eq!(h.body_size, body.len() as u64),
            other => panic!("expected a content header, got {other:?}"),
        }
        match self.next_frame().await {
            Some(Frame::Body(c, b)) if c == ch => assert_eq!(&b[..], body.as_bytes()),
            other => panic!("expected a content body, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame builders
// ---------------------------------------------------------------------------------------------

fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
    out.put_u8(FRAME_END);
    out.to_vec()
}

fn method_frame(channel: u16, method: AMQPClass) -> Vec<u8> {
    encode_method(channel, &method).to_vec()
}

/// The payload of a method frame: class id, method id and arguments.
fn method_payload(method: AMQPClass) -> Vec<u8> {
    let frame = method_frame(0, method);
    frame[7..frame.len() - 1].to_vec()
}

fn publish(channel: u16, routing_key: &str) -> Vec<u8> {
    method_frame(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        })),
    )
}

/// A content header frame announcing `body_size` bytes, with no properties.
fn content_header(channel: u16, class_id: u16, body_size: u64) -> Vec<u8> {
    let mut payload = BytesMut::new();
    payload.put_u16(class_id);
    payload.put_u16(0);
    payload.put_u64(body_size);
    payload.put_u16(0);
    raw_frame(FRAME_HEADER, channel, &payload)
}

/// basic.publish, its header and its body, built with the server's own encoder.
fn publish_frames(channel: u16, routing_key: &str, body: &[u8]) -> Vec<u8> {
    let mut encoder = Encoder::default();
    encoder
        .buffer()
        .extend_from_slice(&publish(channel, routing_key));
    encoder.content(channel, &[0, 0], body, FRAME_MAX as usize);
    encoder.take().to_vec()
}

fn queue_declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Setup {
    /// A bare socket: nothing sent yet, not even the protocol header.
    Socket,
    /// The handshake is done.
    Open,
    /// The handshake is done and channel `CH` is open.
    Channel,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The server writes its protocol header and closes the socket.
    ProtocolHeader,
    /// connection.close with this reply code, naming this class and method.
    Close {
        code: u16,
        class_id: u16,
        method_id: u16,
    },
}

const FRAME_ERROR: u16 = 501;
const CHANNEL_ERROR: u16 = 504;
const UNEXPECTED_FRAME: u16 = 505;

const fn close(code: u16) -> Expect {
    Expect::Close {
        code,
        class_id: 0,
        method_id: 0,
    }
}

const fn close_on(code: u16, class_id: u16, method_id: u16) -> Expect {
    Expect::Close {
        code,
        class_id,
        method_id,
    }
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    setup: Setup,
    input: fn() -> Vec<u8>,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    vec![
        // ---- protocol header: answered with ours, then the socket is closed
        Case {
            name: "AMQP 0-8 protocol header",
            setup: Setup::Socket,
            input: || b"AMQP\x00\x00\x08\x00".to_vec(),
            expect: Expect::ProtocolHeader,
        },
        Case {
            name: "AMQP 0-10 protocol header",
            setup: Setup::Socket,
            input: || b"AMQP\x01\x01\x00\x0a".to_vec(),
            expect: Expect::ProtocolHeader,
        },
        Case {
            name: "HTTP instead of AMQP",
            setup: Setup::Socket,
            input: || b"HTTP/1.1".to_vec(),
            expect: Expect::ProtocolHeader,
        },
        // ---- framing errors: 501 FRAME_ERROR
        Case {
            name: "bad frame end octet on a method frame",
            setup: Setup::Open,
            input: || {
                let mut f = method_frame(
                    CH,
                    AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
                );
                *f.last_mut().unwrap() = 0x00;
                f
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "bad frame end octet on a body frame",
            setup: Setup::Channel,
            input: || {
                let mut f = publish_frames(CH, "q", b"hello");
                *f.last_mut().unwrap() = 0xCF;
                f
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "frame size over frame_max (header only, payload never sent)",
            setup: Setup::Open,
            input: || {
                let mut f = BytesMut::new();
                f.put_u8(FRAME_METHOD);
                f.put_u16(CH);
                f.put_u32(FRAME_MAX + 1);
                f.to_vec()
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "body frame over frame_max",
            setup: Setup::Channel,
            input: || {
                concat(&[
                    publish(CH, "q"),
                    content_header(CH, 60, 10_000),
                    raw_frame(FRAME_BODY, CH, &[7; 5_000]),
                ])
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "unknown frame type",
            setup: Setup::Open,
            input: || raw_frame(9, CH, b"what"),
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "unknown frame type on channel 0",
            setup: Setup::Open,
            input: || raw_frame(4, 0, b""),
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "heartbeat with a payload",
            setup: Setup::Open,
            input: || raw_frame(FRAME_HEARTBEAT, 0, b"x"),
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "body longer than its header announced",
            setup: Setup::Channel,
            input: || {
                concat(&[
                    publish(CH, "q"),
                    content_header(CH, 60, 3),
                    raw_frame(FRAME_BODY, CH, b"hello"),
                ])
            },
            expect: close_on(FRAME_ERROR, 60, 40),
        },
        // ---- undecodable methods: RabbitMQ answers "cannot decode" with 501 FRAME_ERROR
        Case {
            name: "method payload shorter than its class and method ids",
            setup: Setup::Channel,
            input: || raw_frame(FRAME_METHOD, CH, &[0, 50]),
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "garbage method payload",
            setup: Setup::Channel,
            input: || raw_frame(FRAME_METHOD, CH, &[0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3]),
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "truncated method arguments",
            setup: Setup::Channel,
            input: || {
                let payload = method_payload(queue_declare("truncated"));
                raw_frame(FRAME_METHOD, CH, &payload[..payload.len() - 3])
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "truncated connection method on channel 0",
            setup: Setup::Open,
            input: || {
                let payload = method_payload(AMQPClass::Connection(connection::AMQPMethod::Close(
                    connection::Close {
                        reply_code: 200,
                        reply_text: "bye".into(),
                        class_id: 0,
                        method_id: 0,
                    },
                )));
                raw_frame(FRAME_METHOD, 0, &payload[..payload.len() - 1])
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "short string that is not UTF-8",
            setup: Setup::Channel,
            input: || {
                let mut payload = vec![0, 50, 0, 10, 0, 0, 2, 0xC3, 0x28, 0];
                payload.extend_from_slice(&0u32.to_be_bytes());
                raw_frame(FRAME_METHOD, CH, &payload)
            },
            expect: close(FRAME_ERROR),
        },
        Case {
            name: "content header too short",
            setup: Setup::Channel,
            input: || concat(&[publish(CH, "q"), raw_frame(FRAME_HEADER, CH, &[0, 60, 0])]),
            expect: close(FRAME_ERROR),
        },
        // ---- channel errors: 504 CHANNEL_ERROR
        Case {
            name: "method on a channel that was never opened",
            setup: Setup::Open,
            input: || method_frame(5, queue_declare("never-opened")),
            expect: close_on(CHANNEL_ERROR, 50, 10),
        },
        Case {
            name: "second channel.open on an open channel",
            setup: Setup::Channel,
            input: || {
                method_frame(
                    CH,
                    AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
                )
            },
            expect: close_on(CHANNEL_ERROR, 20, 10),
        },
        // ---- frames out of order: 505 UNEXPECTED_FRAME
        Case {
            name: "content header without basic.publish",
            setup: Setup::Channel,
            input: || content_header(CH, 60, 5),
            expect: close(UNEXPECTED_FRAME),
        },
        Case {
            name: "content body without basic.publish",
            setup: Setup::Channel,
            input: || raw_frame(FRAME_BODY, CH, b"hello"),
            expect: close(UNEXPECTED_FRAME),
        },
        Case {
            name: "content body before its header",
            setup: Setup::Channel,
            input: || concat(&[publish(CH, "q"), raw_frame(FRAME_BODY, CH, b"hello")]),
            expect: close_on(UNEXPECTED_FRAME, 60, 40),
        },
        Case {
            name: "method between basic.publish and its header",
            setup: Setup::Channel,
            input: || concat(&[publish(CH, "q"), method_frame(CH, queue_declare("mid"))]),
            expect: close_on(UNEXPECTED_FRAME, 60, 40),
        },
        Case {
            name: "method between a content header and its body",
            setup: Setup::Channel,
            input: || {
                concat(&[
                    publish(CH, "q"),
                    content_header(CH, 60, 5),
                    method_frame(CH, queue_declare("mid")),
                ])
            },
            expect: close_on(UNEXPECTED_FRAME, 60, 40),
        },
        Case {
            name: "content header for a class other than basic",
            setup: Setup::Channel,
            input: || concat(&[publish(CH, "q"), content_header(CH, 50, 5)]),
            expect: close_on(UNEXPECTED_FRAME, 60, 40),
        },
        Case {
            name: "heartbeat on a non-zero channel",
            setup: Setup::Open,
            input: || raw_frame(FRAME_HEARTBEAT, CH, b""),
            expect: close(UNEXPECTED_FRAME),
        },
        Case {
            name: "content header on channel 0",
            setup: Setup::Open,
            input: || content_header(0, 60, 5),
            expect: close(UNEXPECTED_FRAME),
        },
        Case {
            name: "content header on a channel that was never opened",
            setup: Setup::Open,
            input: || content_header(7, 60, 5),
            expect: close(UNEXPECTED_FRAME),
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Running them
// ---------------------------------------------------------------------------------------------

/// Where the server panicked, if it ever did (the test's own assertions are not counted).
static SERVER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_for_server_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let place = info.location().map(|l| l.to_string()).unwrap_or_default();
            if !place.contains("malformed_frames.rs") {
                SERVER_PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{place}: {info}"));
            }
            default(info);
        }));
    });
}

async fn run_case(index: usize, case: Case) {
    let server = warren_tests::start_server();
    // The bystander: connected and working before the bad peer shows up.
    let mut good = Peer::handshake(&server).await;
    good.open_channel(1).await;
    good.round_trip(1, &format!("before-{index}")).await;

    let mut bad = match case.setup {
        Setup::Socket => Peer::connect(&server).await,
        Setup::Open => Peer::handshake(&server).await,
        Setup::Channel => {
            let mut peer = Peer::handshake(&server).await;
            peer.open_channel(CH).await;
            peer
        }
    };
    bad.write(&(case.input)()).await;

    match case.expect {
        Expect::ProtocolHeader => {
            let mut header = [0u8; 8];
            within("the protocol header", bad.stream.read_exact(&mut header))
                .await
                .expect("the server's protocol header");
            assert_eq!(&header, PROTOCOL_HEADER);
            bad.expect_eof().await;
        }
        Expect::Close {
            code,
            class_id,
            method_id,
        } => {
            let close = bad.expect_close().await;
            assert_eq!(
                close.reply_code, code,
                "reply code (text: {:?})",
                close.reply_text
            );
            let name = match code {
                FRAME_ERROR => "FRAME_ERROR - ",
                CHANNEL_ERROR => "CHANNEL_ERROR - ",
                UNEXPECTED_FRAME => "UNEXPECTED_FRAME - ",
                _ => "",
            };
            assert!(
                close.reply_text.as_str().starts_with(name),
                "reply text {:?}",
                close.reply_text
            );
            assert_eq!(
                (close.class_id, close.method_id),
                (class_id, method_id),
                "class and method ids (text: {:?})",
                close.reply_text
            );
        }
    }

    // The bystander never noticed.
    good.round_trip(1, &format!("after-{index}")).await;
    good.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_rabbitmq_replies() {
    watch_for_server_panics();
    let cases = cases();
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let outcome = tokio::spawn(run_case(index, *case)).await;
        let panics = std::mem::take(&mut *SERVER_PANICS.lock().unwrap_or_else(|e| e.into_inner()));
        if let Err(err) = outcome {
            let message = err
                .try_into_panic()
                .ok()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "cancelled".into());
            failures.push(format!("{} ({:?}): {message}", case.name, case.setup));
        }
        if !panics.is_empty() {
            failures.push(format!("{}: the server panicked: {panics:?}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}
