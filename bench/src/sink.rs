//! A null AMQP server: it answers the handshake and the setup methods a publisher sends, then
//! swallows every frame, counting publishes. It measures the tool itself: what the publishers
//! push when the broker costs nothing.
//!
//! It runs on a thread and runtime of its own, so it never queues behind the publishers' tasks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren_gateway::codec::protocol::{basic, channel, confirm, connection, queue};
use warren_gateway::codec::{AMQPClass, Encoder, FieldTable, Frame, FRAME_METHOD};

use crate::amqp::scan_frames;

pub struct Sink {
    pub addr: SocketAddr,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl Sink {
    /// Listens on an ephemeral loopback port.
    pub fn start() -> Result<Sink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("sink: bind")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("sink listener");
                    while let Ok((stream, _)) = listener.accept().await {
                        let c = c.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve(stream, &c).await {
                                eprintln!("sink: {e:#}");
                            }
                        });
                    }
                })
            })?;
        Ok(Sink { addr, counters })
    }

    pub fn messages(&self) -> u64 {
        self.counters.messages.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }
}

async fn serve(mut stream: TcpStream, counters: &Counters) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await?;
    let mut enc = Encoder::with_capacity(1024);
    let mut props = FieldTable::default();
    props.insert(
        "product".into(),
        warren_gateway::codec::AMQPValue::LongString("warren-bench sink".into()),
    );
    enc.method(
        0,
        &AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: props,
            mechanisms: "PLAIN".into(),
            locales: "en_US".into(),
        })),
    );
    stream.write_all(&enc.take()).await?;
    let mut buf = BytesMut::with_capacity(1 << 20);
    loop {
        let mut publishes = 0u64;
        let mut close = false;
        scan_frames(&mut buf, |f| {
            if f.kind != FRAME_METHOD {
                return Ok(());
            }
            let id = f.method_id();
            if id == (60, 40) {
                publishes += 1;
                return Ok(());
            }
            let Frame::Method(ch, method) = f.decode()? else {
                return Ok(());
            };
            let reply = match *method {
                AMQPClass::Connection(connection::AMQPMethod::StartOk(_)) => {
                    AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                        channel_max: 2047,
                        frame_max: 131_072,
                        heartbeat: 0,
                    }))
                }
                AMQPClass::Connection(connection::AMQPMethod::Open(_)) => {
                    AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {}))
                }
                AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                    close = true;
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))
                }
                AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {}))
                }
                AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: d.queue,
                        message_count: 0,
                        consumer_count: 0,
                    }))
                }
                AMQPClass::Queue(queue::AMQPMethod::Purge(_)) => {
                    AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                        message_count: 0,
                    }))
                }
                AMQPClass::Queue(queue::AMQPMethod::Delete(_)) => {
                    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count: 0,
                    }))
                }
                AMQPClass::Basic(basic::AMQPMethod::Qos(_)) => {
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {}))
                }
                AMQPClass::Confirm(confirm::AMQPMethod::Select(_)) => {
                    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {}))
                }
                _ => return Ok(()),
            };
            enc.method(ch, &reply);
            Ok(())
        })?;
        if publishes > 0 {
            counters.messages.fetch_add(publishes, Ordering::Relaxed);
        }
        if !enc.is_empty() {
            stream.write_all(&enc.take()).await?;
        }
        if close {
            return Ok(());
        }
        buf.reserve(1 << 20);
        let n = stream.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}
