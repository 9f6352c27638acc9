//! One client connection: the handshake, then a loop that reads frames, hands them to their
//! channels, and lets the writer task flush what they produced.
//!
//! The reader task owns the channels; the writer task owns the socket's write half and the
//! heartbeat timer; both share the `Outbox`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{channel as chan, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};
use warren_backends::engine::{ConnectionId, VHost};
use warren_config::Settings;

use crate::auth::{authenticate, credentials};
use crate::channel::{method_ids, Channel, ConnContext, Next};
use crate::codec::{decode_frame, Frame, FRAME_MIN_SIZE, PROTOCOL_HEADER};
use crate::error::{code, Exception};
use crate::outbox::Outbox;
use crate::routes::RoutingPlan;

/// How long we wait for connection.close-ok after sending connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
const READ_CHUNK: usize = 64 * 1024;
/// Longest pause of a publisher whose queue's consumers are behind.
const FLOW_PAUSE: Duration = Duration::from_millis(5);
/// Publishes on one connection waiting for their sinks before we stop reading from it.
const MAX_UNCONFIRMED: u64 = 20_000;

/// What every connection shares.
pub struct Shared {
    pub settings: Settings,
    pub vhost: Arc<VHost>,
    pub plan: Arc<RoutingPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitStartOk,
    AwaitSecureOk,
    AwaitTuneOk,
    AwaitOpen,
    Open,
    /// We sent connection.close; only close-ok (or close) matters now.
    Closing,
    Done,
}

struct Connection {
    id: ConnectionId,
    peer: SocketAddr,
    shared: Arc<Shared>,
    phase: Phase,
    mechanism: String,
    cancel_notify: bool,
    channel_max: u16,
    /// Largest inbound frame accepted: the configured maximum until tune-ok, then negotiated.
    frame_max: usize,
    heartbeat: Arc<AtomicU16>,
    outbox: Arc<Outbox>,
    channels: HashMap<u16, Channel>,
    ctx: Option<ConnContext>,
    /// Signalled when a publish settled outside frame handling (an fsync completed).
    confirm_wake: Arc<Notify>,
    close_deadline: Option<Instant>,
}

pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    id: ConnectionId,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, %err, "cannot set TCP_NODELAY");
    }
    let (mut rd, mut wr) = stream.into_split();
    let limits = &shared.settings.limits;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);

    // Protocol header: anything else gets ours back and the socket closed, as the spec says.
    let header_ok = timeout(limits.handshake_timeout, async {
        while buf.len() < PROTOCOL_HEADER.len() {
            if rd.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
        Some(&buf[..PROTOCOL_HEADER.len()] == PROTOCOL_HEADER)
    })
    .await;
    match header_ok {
        Ok(Some(true)) => {}
        Ok(Some(false)) => {
            debug!(%peer, "bad protocol header");
            let _ = wr.write_all(PROTOCOL_HEADER).await;
            let _ = wr.shutdown().await;
            return;
        }
        _ => return,
    }
    let _ = buf.split_to(PROTOCOL_HEADER.len());

    let outbox = Outbox::new(limits.outbound_high_watermark, limits.frame_max as usize);
    let heartbeat = Arc::new(AtomicU16::new(0));
    let writer = tokio::spawn(write_loop(wr, outbox.clone(), heartbeat.clone()));

    let mut conn = Connection {
        id,
        peer,
        shared: shared.clone(),
        phase: Phase::AwaitStartOk,
        mechanism: String::new(),
        cancel_notify: false,
        channel_max: limits.channel_max,
        frame_max: limits.frame_max as usize,
        heartbeat,
        outbox: outbox.clone(),
        channels: HashMap::new(),
        ctx: None,
        confirm_wake: Arc::new(Notify::new()),
        close_deadline: None,
    };
    conn.send_start();
    let handshake_deadline = Instant::now() + limits.handshake_timeout;

    loop {
        if let Err(e) = conn.process(&mut buf) {
            conn.fail(e);
        }
        conn.flush_confirms();
        if conn.phase == Phase::Done {
            break;
        }
        outbox.wait_for_room().await;
        if outbox.is_closed() {
            break;
        }
        if let Some(queue) = conn
            .channels
            .values_mut()
            .find_map(|c| c.flow_blocked.take())
        {
            // Flow control: a queue we publish to has consumers that fall behind. Give them
            // the CPU until it drains, but never stall a publisher for long (a consumer that
            // stopped acking must not stop publishing altogether).
            let _ = tokio::time::timeout(FLOW_PAUSE, queue.backlog_drained()).await;
            for c in conn.channels.values_mut() {
                c.flow_blocked = None;
            }
        }
        if conn.unconfirmed() > MAX_UNCONFIRMED {
            // Sinks are slower than this publisher: stop reading until confirms catch up, so
            // TCP pushes back instead of our memory growing.
            let wake = conn.confirm_wake.clone();
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let deadline = conn.read_deadline(handshake_deadline);
        buf.reserve(READ_CHUNK);
        let confirm_wake = conn.confirm_wake.clone();
        tokio::select! {
            // An fsync settled publishes: the loop's top flushes their confirms.
            _ = confirm_wake.notified() => {}
            read = tokio::time::timeout_at(deadline, rd.read_buf(&mut buf)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    debug!(%peer, "client closed the socket");
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => {
                    conn.on_timeout();
                }
            },
            changed = shutdown.changed(), if conn.phase != Phase::Closing => {
                let _ = changed;
                if conn.phase == Phase::Open {
                    conn.start_close(Exception::connection(
                        code::CONNECTION_FORCED,
                        "broker forced connection closure with reason 'shutdown'",
                    ));
                } else {
                    break;
                }
            }
        }
    }
    conn.release();
    outbox.close();
    let _ = writer.await;
    debug!(%peer, id, "connection ended");
}

impl Connection {
    fn read_deadline(&self, handshake_deadline: Instant) -> Instant {
        match self.phase {
            Phase::Open => {
                let hb = self.heartbeat.load(Ordering::Relaxed);
                if hb == 0 {
                    // No heartbeats: a silent peer is only noticed by TCP itself.
                    Instant::now() + Duration::from_secs(86_400 * 365)
                } else {
                    Instant::now() + Duration::from_secs(2 * hb as u64)
                }
            }
            Phase::Closing => self.close_deadline.unwrap_or_else(Instant::now),
            _ => handshake_deadline,
        }
    }

    fn on_timeout(&mut self) {
        match self.phase {
            Phase::Open => {
                let hb = self.heartbeat.load(Ordering::Relaxed);
                warn!(peer = %self.peer, "missed heartbeats from client, timeout: {}s", hb as u64 * 2);
            }
            Phase::Closing => debug!(peer = %self.peer, "no connection.close-ok in time"),
            _ => warn!(peer = %self.peer, "handshake timed out"),
        }
        self.phase = Phase::Done;
    }

    /// Decodes and handles every whole frame in `buf`.
    fn process(&mut self, buf: &mut BytesMut) -> Result<(), Exception> {
        while self.phase != Phase::Done {
            let frame = match decode_frame(buf, self.frame_max) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // The stream has lost sync: what is buffered cannot be read as frames. Drop
                    // it, so that the client's connection.close-ok, which comes after, is seen.
                    buf.clear();
                    return Err(e.into());
                }
            };
            self.handle_frame(frame)?;
        }
        Ok(())
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), Exception> {
        match self.phase {
            Phase::Closing => {
                // After connection.close only close / close-ok mean anything.
                if let Frame::Method(0, m) = frame {
                    match *m {
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                            self.phase = Phase::Done
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                            self.send0(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )));
                            self.phase = Phase::Done;
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            Phase::Open => self.handle_open_frame(frame),
            Phase::Done => Ok(()),
            _ => self.handle_handshake_frame(frame),
        }
    }

    fn handle_handshake_frame(&mut self, frame: Frame) -> Result<(), Exception> {
        let method = match frame {
            Frame::Heartbeat(_) => return Ok(()),
            Frame::Method(0, m) => *m,
            _ => {
                return Err(Exception::connection(
                    code::COMMAND_INVALID,
                    format!(
                        "unexpected frame during the handshake in state {:?}",
                        self.phase
                    ),
                ))
            }
        };
        let (class_id, method_id) = method_ids(&method);
        let fail = |text: String| {
            Exception::connection(code::COMMAND_INVALID, text).on(class_id, method_id)
        };
        match (self.phase, method) {
            (Phase::AwaitStartOk, AMQPClass::Connection(connection::AMQPMethod::StartOk(ok))) => {
                self.cancel_notify =
                    client_capability(&ok.client_properties, "consumer_cancel_notify");
                self.mechanism = ok.mechanism.to_string();
                if self.mechanism == "PLAIN" && ok.response.as_bytes().is_empty() {
                    // The client wants a challenge first.
                    self.send0(AMQPClass::Connection(connection::AMQPMethod::Secure(
                        connection::Secure {
                            challenge: LongString::from(""),
                        },
                    )));
                    self.phase = Phase::AwaitSecureOk;
                    return Ok(());
                }
                self.login(ok.response.as_bytes())
            }
            (Phase::AwaitSecureOk, AMQPClass::Connection(connection::AMQPMethod::SecureOk(ok))) => {
                self.login(ok.response.as_bytes())
            }
            (Phase::AwaitTuneOk, AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => {
                self.tune(t).map_err(|e| e.on(class_id, method_id))
            }
            (Phase::AwaitOpen, AMQPClass::Connection(connection::AMQPMethod::Open(open))) => {
                let vhost = self.shared.vhost.clone();
                if open.virtual_host.as_str() != vhost.name() {
                    return Err(Exception::connection(
                        code::NOT_ALLOWED,
                        format!("vhost {} not found", open.virtual_host),
                    )
                    .on(class_id, method_id));
                }
                self.ctx = Some(ConnContext {
                    id: self.id,
                    vhost,
                    outbox: self.outbox.clone(),
                    max_message_size: self.shared.settings.limits.max_message_size,
                    cancel_notify: self.cancel_notify,
                    // Only the default user can log in (see `login`).
                    user: self.shared.settings.default_user.username.clone(),
                    confirm_wake: self.confirm_wake.clone(),
                    plan: self.shared.plan.clone(),
                });
                self.send0(AMQPClass::Connection(connection::AMQPMethod::OpenOk(
                    connection::OpenOk {},
                )));
                self.phase = Phase::Open;
                info!(peer = %self.peer, id = self.id, "connection opened");
                Ok(())
            }
            (_, AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                self.send0(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                    connection::CloseOk {},
                )));
                self.phase = Phase::Done;
                Ok(())
            }
            (phase, _) => Err(fail(format!(
                "unexpected method in handshake state {phase:?}"
            ))),
        }
    }

    fn login(&mut self, response: &[u8]) -> Result<(), Exception> {
        let user = &self.shared.settings.default_user;
        let result = credentials(&self.mechanism, response).and_then(|(login, password)| {
            authenticate(user, &self.mechanism, &login, &password, self.peer.ip())
        });
        if let Err(err) = result {
            warn!(peer = %self.peer, mechanism = %self.mechanism, "login refused: {}", err.reply_text());
            return Err(Exception::connection(code::ACCESS_REFUSED, err.reply_text()).on(10, 11));
        }
        let limits = &self.shared.settings.limits;
        self.send0(AMQPClass::Connection(connection::AMQPMethod::Tune(
            connection::Tune {
                channel_max: limits.channel_max,
                frame_max: limits.frame_max,
                heartbeat: limits.heartbeat.as_secs().min(u16::MAX as u64) as u16,
            },
        )));
        self.phase = Phase::AwaitTuneOk;
        Ok(())
    }

    fn tune(&mut self, t: connection::TuneOk) -> Result<(), Exception> {
        let limits = &self.shared.settings.limits;
        let frame_max = if t.frame_max == 0 {
            limits.frame_max
        } else {
            t.frame_max
        };
        if frame_max > limits.frame_max {
            return Err(Exception::connection(
                code::NOT_ALLOWED,
                format!("frame_max={frame_max} > {} max size", limits.frame_max),
            ));
        }
        if frame_max < FRAME_MIN_SIZE {
            return Err(Exception::connection(
                code::NOT_ALLOWED,
                format!("frame_max={frame_max} < {FRAME_MIN_SIZE} min size"),
            ));
        }
        let channel_max = if t.channel_max == 0 {
            limits.channel_max
        } else {
            t.channel_max
        };
        if channel_max > limits.channel_max {
            return Err(Exception::connection(
                code::NOT_ALLOWED,
                format!("channel_max={channel_max} > {} max", limits.channel_max),
            ));
        }
        self.channel_max = channel_max;
        self.frame_max = frame_max as usize;
        self.outbox.set_frame_max(frame_max as usize);
        self.heartbeat.store(t.heartbeat, Ordering::Relaxed);
        self.phase = Phase::AwaitOpen;
        Ok(())
    }

    fn handle_open_frame(&mut self, frame: Frame) -> Result<(), Exception> {
        let channel_id = frame.channel();
        if channel_id == 0 {
            return self.handle_channel_zero(frame);
        }
        if !self.channels.contains_key(&channel_id) {
            return self.open_channel(frame);
        }
        let Some(ctx) = self.ctx.as_ref() else {
            return Ok(());
        };
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return Ok(());
        };
        if channel.closing {
            // Waiting for channel.close-ok: drop everything else, as the spec asks.
            if let Frame::Method(_, m) = frame {
                if let AMQPClass::Channel(
                    chan::AMQPMethod::CloseOk(_) | chan::AMQPMethod::Close(_),
                ) = *m
                {
                    if matches!(*m, AMQPClass::Channel(chan::AMQPMethod::Close(_))) {
                        reply_close_ok(&self.outbox, channel_id);
                    }
                    self.channels.remove(&channel_id);
                }
            }
            return Ok(());
        }
        let result = match frame {
            Frame::Method(_, m) => {
                if let AMQPClass::Connection(_) = *m {
                    let (c, mid) = method_ids(&m);
                    return Err(Exception::connection(
                        code::COMMAND_INVALID,
                        "connection methods are only valid on channel 0",
                    )
                    .on(c, mid));
                }
                match channel.handle_method(ctx, *m) {
                    Ok(Next::Closed) => {
                        self.channels.remove(&channel_id);
                        return Ok(());
                    }
                    Ok(Next::Continue) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Frame::Header(_, h) => channel.handle_header(ctx, h),
            Frame::Body(_, b) => channel.handle_body(ctx, b),
            Frame::Heartbeat(_) => Ok(()),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.hard => Err(e),
            Err(e) => {
                self.close_channel(channel_id, e);
                Ok(())
            }
        }
    }

    fn open_channel(&mut self, frame: Frame) -> Result<(), Exception> {
        let channel_id = frame.channel();
        let Frame::Method(_, m) = frame else {
            // Content before any method, as RabbitMQ's command assembler sees it.
            return Err(Exception::connection(
                code::UNEXPECTED_FRAME,
                format!(
                    "expected method frame on channel {channel_id}, got non method frame instead"
                ),
            ));
        };
        let (class_id, method_id) = method_ids(&m);
        if !matches!(*m, AMQPClass::Channel(chan::AMQPMethod::Open(_))) {
            return Err(
                Exception::connection(code::CHANNEL_ERROR, "expected 'channel.open'")
                    .on(class_id, method_id),
            );
        }
        if channel_id > self.channel_max {
            return Err(Exception::connection(
                code::NOT_ALLOWED,
                format!(
                    "channel number {channel_id} is above the negotiated channel_max {}",
                    self.channel_max
                ),
            )
            .on(class_id, method_id));
        }
        let Some(ctx) = self.ctx.as_ref() else {
            return Ok(());
        };
        self.channels
            .insert(channel_id, Channel::new(channel_id, ctx));
        self.outbox.push(|enc, _| {
            enc.method(
                channel_id,
                &AMQPClass::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})),
            )
        });
        Ok(())
    }

    fn handle_channel_zero(&mut self, frame: Frame) -> Result<(), Exception> {
        let m = match frame {
            Frame::Heartbeat(_) => return Ok(()),
            Frame::Method(_, m) => *m,
            _ => {
                return Err(Exception::connection(
                    code::UNEXPECTED_FRAME,
                    "content frames are not valid on channel 0",
                ))
            }
        };
        let (class_id, method_id) = method_ids(&m);
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                debug!(peer = %self.peer, code = close.reply_code, text = %close.reply_text, "client closed the connection");
                self.release();
                self.send0(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                    connection::CloseOk {},
                )));
                self.phase = Phase::Done;
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                self.send0(AMQPClass::Connection(
                    connection::AMQPMethod::UpdateSecretOk(connection::UpdateSecretOk {}),
                ));
                Ok(())
            }
            AMQPClass::Connection(
                connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_),
            ) => Ok(()),
            _ => Err(Exception::connection(
                code::COMMAND_INVALID,
                "this method is not valid on channel 0 of an open connection",
            )
            .on(class_id, method_id)),
        }
    }

    fn close_channel(&mut self, channel_id: u16, e: Exception) {
        debug!(peer = %self.peer, channel = channel_id, code = e.code, text = %e.text, "channel error");
        let Some(ctx) = self.ctx.as_ref() else { return };
        if let Some(channel) = self.channels.get_mut(&channel_id) {
            channel.release(ctx);
            channel.closing = true;
        }
        let close = AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
            reply_code: e.code,
            reply_text: e.reply_text().into(),
            class_id: e.class_id,
            method_id: e.method_id,
        }));
        self.outbox.push(|enc, _| enc.method(channel_id, &close));
    }

    /// A connection exception: tell the client, release everything, wait briefly for close-ok.
    fn fail(&mut self, e: Exception) {
        match self.phase {
            Phase::Closing | Phase::Done => {}
            _ => {
                warn!(peer = %self.peer, code = e.code, text = %e.text, "closing connection");
                self.start_close(e);
            }
        }
    }

    fn start_close(&mut self, e: Exception) {
        self.release();
        self.send0(AMQPClass::Connection(connection::AMQPMethod::Close(
            connection::Close {
                reply_code: e.code,
                reply_text: e.reply_text().into(),
                class_id: e.class_id,
                method_id: e.method_id,
            },
        )));
        self.phase = Phase::Closing;
        self.close_deadline = Some(Instant::now() + CLOSE_OK_TIMEOUT);
    }

    fn send0(&self, method: AMQPClass) {
        self.outbox.push(|enc, _| enc.method(0, &method));
    }

    fn send_start(&self) {
        let product = &self.shared.settings.product;
        let mut caps = FieldTable::default();
        for (name, on) in CAPABILITIES {
            caps.insert((*name).into(), AMQPValue::Boolean(*on));
        }
        let mut props = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        props.insert("product".into(), text(&product.product));
        props.insert("version".into(), text(&product.version));
        props.insert(
            "platform".into(),
            text(&format!("Rust / {}", std::env::consts::OS)),
        );
        props.insert("cluster_name".into(), text(&product.cluster_name));
        props.insert("copyright".into(), text("Warren contributors"));
        props.insert(
            "information".into(),
            text("Warren: an AMQP 0-9-1 broker and messaging gateway"),
        );
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        self.send0(AMQPClass::Connection(connection::AMQPMethod::Start(
            connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: "PLAIN AMQPLAIN".into(),
                locales: "en_US".into(),
            },
        )));
    }

    fn unconfirmed(&self) -> u64 {
        self.channels.values().map(|c| c.unconfirmed()).sum()
    }

    fn flush_confirms(&mut self) {
        for channel in self.channels.values() {
            channel.flush_confirms(&self.outbox);
        }
    }

    /// Gives back everything the connection holds in the engine.
    fn release(&mut self) {
        let Some(ctx) = self.ctx.as_ref() else { return };
        for (_, mut channel) in self.channels.drain() {
            channel.release(ctx);
        }
        ctx.vhost.remove_exclusive_queues(self.id);
    }
}

/// What connection.start advertises; each is true only because it works.
const CAPABILITIES: &[(&str, bool)] = &[
    ("publisher_confirms", true),
    ("exchange_exchange_bindings", true),
    ("basic.nack", true),
    ("consumer_cancel_notify", true),
    ("connection.blocked", false),
    ("consumer_priorities", true),
    ("authentication_failure_close", true),
    ("per_consumer_qos", true),
    ("direct_reply_to", true),
];

fn client_capability(props: &FieldTable, name: &str) -> bool {
    match props.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => {
            matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

fn reply_close_ok(outbox: &Outbox, channel_id: u16) {
    outbox.push(|enc, _| {
        enc.method(
            channel_id,
            &AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
        )
    });
}

/// Writes whatever the outbox collected, one socket write per batch, and heartbeats when idle.
async fn write_loop(mut wr: OwnedWriteHalf, outbox: Arc<Outbox>, heartbeat: Arc<AtomicU16>) {
    loop {
        let notified = outbox.ready.notified();
        let chunk = outbox.take();
        if !chunk.is_empty() {
            let n = chunk.len();
            if let Err(err) = wr.write_all(&chunk).await {
                debug!(%err, "write failed");
                outbox.close();
                break;
            }
            outbox.written(n);
            continue;
        }
        if outbox.is_closed() {
            let rest = outbox.take();
            let _ = wr.write_all(&rest).await;
            break;
        }
        let hb = heartbeat.load(Ordering::Relaxed);
        if hb == 0 {
            notified.await;
        } else {
            let idle = Duration::from_millis(hb as u64 * 500);
            if timeout(idle, notified).await.is_err() {
                outbox.push(|enc, _| enc.heartbeat());
            }
        }
    }
    let _ = wr.shutdown().await;
}
