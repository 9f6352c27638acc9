//! Writing frames into one outbound buffer, so a connection's writer flushes many frames with one
//! socket write. The hot methods (deliver, get-ok, ack, nack) are written by hand; the rest go
//! through amq-protocol's generated serializers.

use amq_protocol::protocol::{gen_class, AMQPClass};
use bytes::{BufMut, BytesMut};

use super::{CLASS_BASIC, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD};

/// Serializes one method into a standalone frame (tests, and the rare path before a connection
/// has an encoder of its own).
pub fn encode_method(channel: u16, method: &AMQPClass) -> BytesMut {
    let mut encoder = Encoder::default();
    encoder.method(channel, method);
    encoder.take()
}

/// An outbound frame buffer plus the scratch space amq-protocol's serializers need.
#[derive(Default)]
pub struct Encoder {
    out: BytesMut,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn with_capacity(capacity: usize) -> Self {
        Encoder {
            out: BytesMut::with_capacity(capacity),
            scratch: Vec::with_capacity(256),
        }
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// The encoded bytes, leaving the encoder empty (its allocation is kept when possible).
    pub fn take(&mut self) -> BytesMut {
        self.out.split()
    }

    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    pub fn method(&mut self, channel: u16, method: &AMQPClass) {
        let scratch = std::mem::take(&mut self.scratch);
        let scratch = match cookie_factory::gen(gen_class(method), scratch) {
            Ok((buf, _)) => buf,
            // Serializing a value we built ourselves cannot fail short of a bug in the
            // generated code; drop the frame rather than send half of it.
            Err(err) => {
                tracing::error!(?err, ?method, "cannot serialize method");
                Vec::new()
            }
        };
        if !scratch.is_empty() {
            self.frame_start(FRAME_METHOD, channel, scratch.len());
            self.out.extend_from_slice(&scratch);
            self.out.put_u8(FRAME_END);
        }
        self.scratch = scratch;
        self.scratch.clear();
    }

    pub fn heartbeat(&mut self) {
        self.frame_start(FRAME_HEARTBEAT, 0, 0);
        self.out.put_u8(FRAME_END);
    }

    /// basic.deliver.
    pub fn deliver(
        &mut self,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
    ) {
        let size = 4
            + short_str_len(consumer_tag)
            + 8
            + 1
            + short_str_len(exchange)
            + short_str_len(routing_key);
        self.frame_start(FRAME_METHOD, channel, size);
        self.out.put_u16(CLASS_BASIC);
        self.out.put_u16(60);
        self.short_str(consumer_tag);
        self.out.put_u64(delivery_tag);
        self.out.put_u8(redelivered as u8);
        self.short_str(exchange);
        self.short_str(routing_key);
        self.out.put_u8(FRAME_END);
    }

    /// basic.get-ok.
    pub fn get_ok(
        &mut self,
        channel: u16,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
        message_count: u32,
    ) {
        let size = 4 + 8 + 1 + short_str_len(exchange) + short_str_len(routing_key) + 4;
        self.frame_start(FRAME_METHOD, channel, size);
        self.out.put_u16(CLASS_BASIC);
        self.out.put_u16(71);
        self.out.put_u64(delivery_tag);
        self.out.put_u8(redelivered as u8);
        self.short_str(exchange);
        self.short_str(routing_key);
        self.out.put_u32(message_count);
        self.out.put_u8(FRAME_END);
    }

    /// basic.ack from the server: a publisher confirm.
    pub fn ack(&mut self, channel: u16, delivery_tag: u64, multiple: bool) {
        self.frame_start(FRAME_METHOD, channel, 4 + 8 + 1);
        self.out.put_u16(CLASS_BASIC);
        self.out.put_u16(80);
        self.out.put_u64(delivery_tag);
        self.out.put_u8(multiple as u8);
        self.out.put_u8(FRAME_END);
    }

    /// basic.nack from the server: a publisher confirm that the message was not taken.
    pub fn nack(&mut self, channel: u16, delivery_tag: u64, multiple: bool) {
        self.frame_start(FRAME_METHOD, channel, 4 + 8 + 1);
        self.out.put_u16(CLASS_BASIC);
        self.out.put_u16(120);
        self.out.put_u64(delivery_tag);
        self.out.put_u8(multiple as u8);
        self.out.put_u8(FRAME_END);
    }

    /// A content header followed by the body, cut into frames of at most `frame_max` bytes.
    pub fn content(&mut self, channel: u16, raw_properties: &[u8], body: &[u8], frame_max: usize) {
        self.frame_start(FRAME_HEADER, channel, 12 + raw_properties.len());
        self.out.put_u16(CLASS_BASIC);
        self.out.put_u16(0);
        self.out.put_u64(body.len() as u64);
        self.out.extend_from_slice(raw_properties);
        self.out.put_u8(FRAME_END);
        let chunk = frame_max.saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            self.frame_start(FRAME_BODY, channel, part.len());
            self.out.extend_from_slice(part);
            self.out.put_u8(FRAME_END);
        }
    }

    fn frame_start(&mut self, kind: u8, channel: u16, size: usize) {
        self.out.reserve(8 + size);
        self.out.put_u8(kind);
        self.out.put_u16(channel);
        self.out.put_u32(size as u32);
    }

    fn short_str(&mut self, s: &str) {
        let bytes = short_str_bytes(s);
        self.out.put_u8(bytes.len() as u8);
        self.out.extend_from_slice(bytes);
    }
}

/// `s` cut to the 255 bytes a short string holds, on a character boundary so the frame stays
/// valid UTF-8.
fn short_str_bytes(s: &str) -> &[u8] {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

fn short_str_len(s: &str) -> usize {
    1 + short_str_bytes(s).len()
}
