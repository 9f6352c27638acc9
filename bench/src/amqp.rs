//! The client side of AMQP 0-9-1, as little of it as a load tool needs.
//!
//! Setup (handshake, declares, qos, consume, confirm.select) goes through the project's codec:
//! amq-protocol's generated serializers and `decode_frame`. The hot paths never do: publishes are
//! pre-built byte templates (see [`PublishTemplate`]) and server frames during a run are split by
//! [`scan_frames`], which reads only the few fields a counter needs.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use warren_gateway::codec::protocol::{basic, channel, confirm, connection, queue};
use warren_gateway::codec::{
    decode_frame, AMQPClass, AMQPValue, Encoder, FieldTable, Frame, FRAME_BODY, FRAME_END,
    FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, PROTOCOL_HEADER,
};

/// The only channel the tool uses on a connection.
pub const CH: u16 = 1;
/// Setup steps that take longer than this are reported as failures instead of hanging.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Property flag for delivery-mode in a basic content header.
const FLAG_DELIVERY_MODE: u16 = 0x1000;

/// Where to connect and as whom.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: String,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl Target {
    /// `amqp://[user:pass@]host[:port][/vhost]`; `%2F` (or an empty path) is the vhost `/`.
    pub fn from_uri(uri: &str) -> Result<Target> {
        let rest = uri
            .strip_prefix("amqp://")
            .ok_or_else(|| anyhow!("only amqp:// URIs are supported: {uri}"))?;
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (percent_decode(user)?, percent_decode(pass)?),
                None => (percent_decode(u)?, String::new()),
            },
            None => ("guest".to_string(), "guest".to_string()),
        };
        let addr = if hostport.is_empty() {
            "127.0.0.1:5672".to_string()
        } else if hostport.ends_with(']') || !hostport.contains(':') {
            format!("{hostport}:5672")
        } else {
            hostport.to_string()
        };
        let vhost = if path.is_empty() {
            "/".to_string()
        } else {
            percent_decode(path)?
        };
        Ok(Target {
            addr,
            user,
            password,
            vhost,
        })
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| anyhow!("bad percent escape in {s}"))?;
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad escape in {s}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("URI part is not UTF-8")
}

/// Nanoseconds since the first call in this process: the clock embedded in message bodies.
/// Publishers and consumers live in the same process, so a monotonic clock is enough.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// An open connection with channel [`CH`] open on it.
pub struct Conn {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    /// Bytes read and not yet decoded.
    pub buf: BytesMut,
    /// The negotiated frame_max (whole frame, header and end octet included).
    pub frame_max: usize,
    enc: Encoder,
}

impl Conn {
    /// Connects, does the handshake (PLAIN, heartbeats off) and opens channel 1.
    pub async fn open(target: &Target) -> Result<Conn> {
        tokio::time::timeout(SETUP_TIMEOUT, Self::open_inner(target))
            .await
            .map_err(|_| anyhow!("timed out connecting to {}", target.addr))?
    }

    async fn open_inner(target: &Target) -> Result<Conn> {
        let stream = TcpStream::connect(&target.addr)
            .await
            .with_context(|| format!("cannot connect to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Conn {
            rd,
            wr,
            buf: BytesMut::with_capacity(64 * 1024),
            frame_max: 131_072,
            enc: Encoder::with_capacity(4096),
        };
        conn.wr.write_all(PROTOCOL_HEADER).await?;
        match conn.recv_method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {}
            other => bail!("expected connection.start, got {other:?}"),
        }
        let mut capabilities = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
        ] {
            capabilities.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        props.insert(
            "product".into(),
            AMQPValue::LongString("warren-bench".into()),
        );
        props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        let response = format!("\0{}\0{}", target.user, target.password);
        conn.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: response.as_str().into(),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = match conn.recv_method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => tune,
            other => bail!("expected connection.tune, got {other:?}"),
        };
        let frame_max = if tune.frame_max == 0 {
            131_072
        } else {
            tune.frame_max
        };
        conn.frame_max = frame_max as usize;
        conn.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        conn.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: target.vhost.as_str().into(),
            })),
        )
        .await?;
        match conn.recv_method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => bail!("expected connection.open-ok, got {other:?}"),
        }
        conn.rpc(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {},
        )))
        .await?;
        Ok(conn)
    }

    /// A connection whose halves were taken apart for a run, put back together to close it.
    pub fn from_halves(rd: OwnedReadHalf, wr: OwnedWriteHalf) -> Conn {
        Conn {
            rd,
            wr,
            buf: BytesMut::new(),
            frame_max: 4096,
            enc: Encoder::default(),
        }
    }

    pub async fn send(&mut self, channel: u16, method: AMQPClass) -> Result<()> {
        self.enc.method(channel, &method);
        let bytes = self.enc.take();
        self.wr.write_all(&bytes).await?;
        Ok(())
    }

    /// The next method from the server, skipping heartbeats; a close from the server is an error.
    pub async fn recv_method(&mut self) -> Result<(u16, AMQPClass)> {
        loop {
            match decode_frame(&mut self.buf, usize::MAX).context("bad frame from the server")? {
                Some(Frame::Method(ch, method)) => {
                    check_close(&method)?;
                    return Ok((ch, *method));
                }
                Some(Frame::Heartbeat(_)) => continue,
                Some(other) => bail!("unexpected frame during setup: {other:?}"),
                None => {}
            }
            self.buf.reserve(64 * 1024);
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// Sends a synchronous method on [`CH`] and returns the server's reply.
    pub async fn rpc(&mut self, method: AMQPClass) -> Result<AMQPClass> {
        self.send(CH, method).await?;
        tokio::time::timeout(SETUP_TIMEOUT, async {
            loop {
                let (ch, reply) = self.recv_method().await?;
                if ch == CH {
                    return Ok(reply);
                }
            }
        })
        .await
        .map_err(|_| anyhow!("timed out waiting for a reply"))?
    }

    /// queue.declare; returns the queue's message count.
    pub async fn declare_queue(&mut self, name: &str, durable: bool) -> Result<u32> {
        let reply = self
            .rpc(AMQPClass::Queue(queue::AMQPMethod::Declare(
                queue::Declare {
                    queue: name.into(),
                    passive: false,
                    durable,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                },
            )))
            .await?;
        match reply {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok.message_count),
            other => bail!("expected queue.declare-ok, got {other:?}"),
        }
    }

    pub async fn purge_queue(&mut self, name: &str) -> Result<u32> {
        match self
            .rpc(AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: name.into(),
                nowait: false,
            })))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)) => Ok(ok.message_count),
            other => bail!("expected queue.purge-ok, got {other:?}"),
        }
    }

    pub async fn delete_queue(&mut self, name: &str) -> Result<u32> {
        match self
            .rpc(AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: name.into(),
                if_unused: false,
                if_empty: false,
                nowait: false,
            })))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => Ok(ok.message_count),
            other => bail!("expected queue.delete-ok, got {other:?}"),
        }
    }

    pub async fn qos(&mut self, prefetch: u16) -> Result<()> {
        match self
            .rpc(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global: false,
            })))
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => Ok(()),
            other => bail!("expected basic.qos-ok, got {other:?}"),
        }
    }

    pub async fn consume(&mut self, queue: &str, tag: &str, no_ack: bool) -> Result<()> {
        match self
            .rpc(AMQPClass::Basic(basic::AMQPMethod::Consume(
                basic::Consume {
                    queue: queue.into(),
                    consumer_tag: tag.into(),
                    no_local: false,
                    no_ack,
                    exclusive: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                },
            )))
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)) => Ok(()),
            other => bail!("expected basic.consume-ok, got {other:?}"),
        }
    }

    pub async fn confirm_select(&mut self) -> Result<()> {
        match self
            .rpc(AMQPClass::Confirm(confirm::AMQPMethod::Select(
                confirm::Select { nowait: false },
            )))
            .await?
        {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => Ok(()),
            other => bail!("expected confirm.select-ok, got {other:?}"),
        }
    }

    /// connection.close and wait (briefly) for close-ok, so the broker logs a clean close.
    pub async fn close(mut self) {
        let _ = self
            .send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match self.recv_method().await {
                    Ok((0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))) | Err(_) => {
                        break
                    }
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// A connection.close or channel.close from the server, as an error.
fn check_close(method: &AMQPClass) -> Result<()> {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => bail!(
            "server closed the connection: {} {}",
            c.reply_code,
            c.reply_text.as_str()
        ),
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => bail!(
            "server closed the channel: {} {}",
            c.reply_code,
            c.reply_text.as_str()
        ),
        _ => Ok(()),
    }
}

/// One frame as [`scan_frames`] hands it over: no allocation, no parsing past the header.
pub struct RawFrame<'a> {
    pub kind: u8,
    pub channel: u16,
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// (class, method) of a method frame.
    pub fn method_id(&self) -> (u16, u16) {
        if self.payload.len() < 4 {
            return (0, 0);
        }
        (
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            u16::from_be_bytes([self.payload[2], self.payload[3]]),
        )
    }

    /// The whole frame decoded by the codec: for the rare frames the hot loops do not know.
    pub fn decode(&self) -> Result<Frame> {
        let mut buf = BytesMut::with_capacity(self.payload.len() + 8);
        buf.put_u8(self.kind);
        buf.put_u16(self.channel);
        buf.put_u32(self.payload.len() as u32);
        buf.extend_from_slice(self.payload);
        buf.put_u8(FRAME_END);
        decode_frame(&mut buf, usize::MAX)?.ok_or_else(|| anyhow!("incomplete frame"))
    }

    /// An error if this is connection.close or channel.close.
    pub fn check_close(&self) -> Result<()> {
        if self.kind == FRAME_METHOD && matches!(self.method_id(), (10, 50) | (20, 40)) {
            if let Frame::Method(_, method) = self.decode()? {
                check_close(&method)?;
            }
        }
        Ok(())
    }
}

/// Hands every whole frame in `buf` to `each`, then drops them from `buf`.
pub fn scan_frames(
    buf: &mut BytesMut,
    mut each: impl FnMut(RawFrame<'_>) -> Result<()>,
) -> Result<()> {
    let mut pos = 0;
    let data = &buf[..];
    while data.len() - pos >= 7 {
        let kind = data[pos];
        let channel = u16::from_be_bytes([data[pos + 1], data[pos + 2]]);
        let size = u32::from_be_bytes([data[pos + 3], data[pos + 4], data[pos + 5], data[pos + 6]])
            as usize;
        let total = 8 + size;
        if data.len() - pos < total {
            break;
        }
        if data[pos + total - 1] != FRAME_END {
            bail!("bad frame end from the server");
        }
        if !matches!(
            kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            bail!("unknown frame type {kind} from the server");
        }
        each(RawFrame {
            kind,
            channel,
            payload: &data[pos + 7..pos + 7 + size],
        })?;
        pos += total;
    }
    buf.advance(pos);
    Ok(())
}

/// basic.ack from the client.
pub fn put_ack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool) {
    out.push(FRAME_METHOD);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&60u16.to_be_bytes());
    out.extend_from_slice(&80u16.to_be_bytes());
    out.extend_from_slice(&delivery_tag.to_be_bytes());
    out.push(multiple as u8);
    out.push(FRAME_END);
}

/// One message as the bytes of its publish, header and body frames, built once; a batch is the
/// template repeated, with only the send timestamps patched in before each write.
#[derive(Clone)]
pub struct PublishTemplate {
    pub bytes: Vec<u8>,
    /// Offset of the body's first byte in `bytes`, where the 8-byte send timestamp goes, if the
    /// body has room for one.
    pub stamp_at: Option<usize>,
}

impl PublishTemplate {
    pub fn new(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        size: usize,
        persistent: bool,
        frame_max: usize,
    ) -> PublishTemplate {
        let mut b = Vec::with_capacity(64 + routing_key.len() + size + size / 4096 * 8);
        let frame = |b: &mut Vec<u8>, kind: u8, payload: &[u8]| {
            b.push(kind);
            b.extend_from_slice(&channel.to_be_bytes());
            b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            b.extend_from_slice(payload);
            b.push(FRAME_END);
        };
        let mut method = Vec::with_capacity(16 + routing_key.len());
        method.extend_from_slice(&60u16.to_be_bytes());
        method.extend_from_slice(&40u16.to_be_bytes());
        method.extend_from_slice(&0u16.to_be_bytes()); // reserved-1 (ticket)
        method.push(exchange.len() as u8);
        method.extend_from_slice(exchange.as_bytes());
        method.push(routing_key.len() as u8);
        method.extend_from_slice(routing_key.as_bytes());
        method.push(0); // mandatory, immediate
        frame(&mut b, FRAME_METHOD, &method);
        let mut header = Vec::with_capacity(15);
        header.extend_from_slice(&60u16.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes()); // weight
        header.extend_from_slice(&(size as u64).to_be_bytes());
        if persistent {
            header.extend_from_slice(&FLAG_DELIVERY_MODE.to_be_bytes());
            header.push(2);
        } else {
            header.extend_from_slice(&0u16.to_be_bytes());
        }
        frame(&mut b, FRAME_HEADER, &header);
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let stamp_at = (size >= 8).then_some(b.len() + 7);
        for chunk in body.chunks(frame_max.saturating_sub(8).max(1)) {
            frame(&mut b, FRAME_BODY, chunk);
        }
        PublishTemplate { bytes: b, stamp_at }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// `count` copies of `template` back to back, and where each one's timestamp goes.
pub struct PublishBatch {
    pub bytes: Vec<u8>,
    pub msg_len: usize,
    pub stamp_at: Option<usize>,
    pub count: usize,
}

impl PublishBatch {
    pub fn new(template: &PublishTemplate, count: usize) -> PublishBatch {
        let mut bytes = Vec::with_capacity(template.len() * count);
        for _ in 0..count {
            bytes.extend_from_slice(&template.bytes);
        }
        PublishBatch {
            bytes,
            msg_len: template.len(),
            stamp_at: template.stamp_at,
            count,
        }
    }

    /// The first `n` messages, stamped with `now`.
    pub fn stamped(&mut self, n: usize, now: u64) -> &[u8] {
        if let Some(at) = self.stamp_at {
            let stamp = now.to_le_bytes();
            for i in 0..n {
                let o = i * self.msg_len + at;
                self.bytes[o..o + 8].copy_from_slice(&stamp);
            }
        }
        &self.bytes[..n * self.msg_len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        let t = Target::from_uri("amqp://a:b%40c@127.0.0.1:5699/%2F").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.user.as_str(), t.password.as_str()),
            ("127.0.0.1:5699", "a", "b@c")
        );
        assert_eq!(t.vhost, "/");
        let t = Target::from_uri("amqp://localhost").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.user.as_str()),
            ("localhost:5672", "guest")
        );
        let t = Target::from_uri("amqp://[::1]:5673/v").unwrap();
        assert_eq!((t.addr.as_str(), t.vhost.as_str()), ("[::1]:5673", "v"));
    }

    #[test]
    fn template_decodes_with_the_codec() {
        let t = PublishTemplate::new(CH, "", "q", 300, true, 128);
        let mut buf = BytesMut::from(&t.bytes[..]);
        let mut frames = Vec::new();
        while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
            frames.push(f);
        }
        assert!(buf.is_empty());
        match &frames[0] {
            Frame::Method(1, m) => match m.as_ref() {
                AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                    assert_eq!(p.routing_key.as_str(), "q")
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        match &frames[1] {
            Frame::Header(1, h) => {
                assert_eq!(h.body_size, 300);
                assert_eq!(h.properties.delivery_mode(), &Some(2));
            }
            other => panic!("{other:?}"),
        }
        let body: usize = frames[2..]
            .iter()
            .map(|f| match f {
                Frame::Body(_, b) => {
                    assert!(b.len() <= 120);
                    b.len()
                }
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(body, 300);
        let at = t.stamp_at.unwrap();
        assert_eq!(&t.bytes[at - 7..at - 4], &[FRAME_BODY, 0, 1]);
    }

    #[test]
    fn scan_splits_frames_and_keeps_partial_ones() {
        let t = PublishTemplate::new(CH, "", "q", 16, false, 4096);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&t.bytes);
        buf.extend_from_slice(&t.bytes[..5]);
        let mut kinds = Vec::new();
        scan_frames(&mut buf, |f| {
            kinds.push(f.kind);
            Ok(())
        })
        .unwrap();
        assert_eq!(kinds, vec![FRAME_METHOD, FRAME_HEADER, FRAME_BODY]);
        assert_eq!(buf.len(), 5);
        let mut ack = Vec::new();
        put_ack(&mut ack, 1, 42, true);
        let mut buf = BytesMut::from(&ack[..]);
        match decode_frame(&mut buf, 4096).unwrap() {
            Some(Frame::Method(1, m)) => match *m {
                AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                    assert_eq!((a.delivery_tag, a.multiple), (42, true))
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}
