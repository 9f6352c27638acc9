//! Splitting a byte stream into frames. "Not enough bytes yet" is `Ok(None)`, never an error.

use amq_protocol::protocol::basic::{self, AMQPProperties};
use amq_protocol::protocol::{parse_class, AMQPClass};
use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

use super::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD};

/// Type octet, channel and payload size.
pub const FRAME_HEADER_LEN: usize = 7;

/// A decoded frame. Bodies and raw properties borrow the read buffer's allocation.
// A frame is handled as soon as it is decoded and never stored in bulk, so the large header
// variant costs nothing, where boxing it would cost an allocation per published message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Frame {
    Method(u16, Box<AMQPClass>),
    Header(u16, ContentHeader),
    Body(u16, Bytes),
    Heartbeat(u16),
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method(c, _) | Frame::Header(c, _) | Frame::Body(c, _) | Frame::Heartbeat(c) => {
                *c
            }
        }
    }
}

/// A content header frame's payload.
#[derive(Debug, Clone)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: AMQPProperties,
    /// The property flags and list exactly as the publisher encoded them: re-sent verbatim on
    /// delivery so that a message's properties are parsed once and never re-encoded.
    pub raw_properties: Bytes,
}

/// Why a frame could not be decoded. Each maps to a connection exception.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame size {size} exceeds the negotiated frame_max {max}")]
    TooLarge { size: usize, max: usize },
    #[error("bad frame end marker 0x{0:02x}")]
    BadFrameEnd(u8),
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    #[error("method frame on channel {channel}: {reason}")]
    BadMethod { channel: u16, reason: String },
    #[error("content header on channel {channel}: {reason}")]
    BadHeader { channel: u16, reason: String },
    #[error("heartbeat frame on channel {0}")]
    HeartbeatOnChannel(u16),
    #[error("heartbeat frame with a {0}-byte payload")]
    BadHeartbeat(usize),
}

/// Takes one frame off the front of `buf`, or returns `Ok(None)` if `buf` does not hold a whole
/// frame yet. `frame_max` bounds the whole frame (header and end octet included), so an
/// oversized frame is refused from its header alone, before its payload is buffered.
pub fn decode_frame(buf: &mut BytesMut, frame_max: usize) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    let total = FRAME_HEADER_LEN + size + 1;
    if total > frame_max {
        return Err(DecodeError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(DecodeError::UnknownFrameType(kind));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(DecodeError::BadFrameEnd(end));
    }
    let mut frame = buf.split_to(total);
    frame.advance(FRAME_HEADER_LEN);
    frame.truncate(size);
    let payload = frame.freeze();
    let frame = match kind {
        FRAME_METHOD => Frame::Method(channel, Box::new(decode_method(channel, &payload)?)),
        FRAME_HEADER => Frame::Header(channel, decode_header(channel, payload)?),
        FRAME_BODY => Frame::Body(channel, payload),
        _ => {
            if size != 0 {
                return Err(DecodeError::BadHeartbeat(size));
            }
            if channel != 0 {
                return Err(DecodeError::HeartbeatOnChannel(channel));
            }
            Frame::Heartbeat(channel)
        }
    };
    Ok(Some(frame))
}

fn decode_method(channel: u16, payload: &[u8]) -> Result<AMQPClass, DecodeError> {
    if let Some(publish) = decode_publish(payload) {
        return Ok(AMQPClass::Basic(basic::AMQPMethod::Publish(publish)));
    }
    match parse_class(payload) {
        Ok((_rest, class)) => Ok(class),
        Err(err) => Err(DecodeError::BadMethod {
            channel,
            reason: describe_method_error(payload, &err.to_string()),
        }),
    }
}

/// basic.publish, the method of every published message, decoded by hand: the generic parser
/// builds a list of named flags (a `String` per flag name) for its two bits. `None` when the
/// payload is not a well-formed basic.publish: the generic parser then decodes it, or reports
/// why it cannot. Like that parser, bytes after the flags are ignored.
fn decode_publish(payload: &[u8]) -> Option<basic::Publish> {
    const CLASS_AND_METHOD: [u8; 4] = [0, 60, 0, 40];
    let rest = payload.strip_prefix(&CLASS_AND_METHOD[..])?;
    // reserved-1 (the ticket), then exchange, routing key and the flag bits.
    let rest = rest.get(2..)?;
    let (exchange, rest) = short_str(rest)?;
    let (routing_key, rest) = short_str(rest)?;
    let bits = *rest.first()?;
    Some(basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    })
}

/// A short string (length octet, UTF-8 bytes) off the front of `input`.
fn short_str(input: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = input.split_first()?;
    let len = usize::from(len);
    let text = std::str::from_utf8(rest.get(..len)?).ok()?;
    Some((text, &rest[len..]))
}

fn describe_method_error(payload: &[u8], parser: &str) -> String {
    if payload.len() < 4 {
        return format!("{} bytes is too short for a method", payload.len());
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    format!("cannot decode method {class}.{method}: {parser}")
}

fn decode_header(channel: u16, payload: Bytes) -> Result<ContentHeader, DecodeError> {
    let bad = |reason: String| DecodeError::BadHeader { channel, reason };
    if payload.len() < 14 {
        return Err(bad(format!(
            "{} bytes is too short for a content header",
            payload.len()
        )));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let body_size = u64::from_be_bytes([
        payload[4],
        payload[5],
        payload[6],
        payload[7],
        payload[8],
        payload[9],
        payload[10],
        payload[11],
    ]);
    let raw_properties = payload.slice(12..);
    let properties = match amq_protocol::protocol::basic::parse_properties(&raw_properties[..]) {
        Ok(([], props)) => props,
        Ok((rest, _)) => {
            return Err(bad(format!(
                "{} trailing bytes after properties",
                rest.len()
            )))
        }
        Err(err) => return Err(bad(format!("cannot decode properties: {err}"))),
    };
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
        raw_properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_payload(exchange: &[u8], routing_key: &[u8], bits: u8) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 40, 0, 0];
        p.push(exchange.len() as u8);
        p.extend_from_slice(exchange);
        p.push(routing_key.len() as u8);
        p.extend_from_slice(routing_key);
        p.push(bits);
        p
    }

    #[test]
    fn the_publish_fast_path_agrees_with_the_generic_parser() {
        let mut cases = vec![
            publish_payload(b"", b"bench-b1-0", 0),
            publish_payload(b"amq.topic", b"a.b.c", 1),
            publish_payload(b"x", b"", 2),
            publish_payload(b"x", b"k", 3),
            publish_payload("ünï".as_bytes(), "kéy".as_bytes(), 0),
            // Not UTF-8: both refuse it.
            publish_payload(b"\xff", b"k", 0),
            publish_payload(b"x", b"\xc3", 0),
        ];
        let mut trailing = publish_payload(b"x", b"k", 1);
        trailing.extend_from_slice(b"more");
        cases.push(trailing);
        // Every truncation of a publish.
        let whole = publish_payload(b"ex", b"key", 1);
        cases.extend((0..whole.len()).map(|n| whole[..n].to_vec()));
        for payload in cases {
            let generic = parse_class(&payload[..]).map(|(_, class)| class).ok();
            let fast =
                decode_publish(&payload).map(|p| AMQPClass::Basic(basic::AMQPMethod::Publish(p)));
            assert_eq!(fast, generic, "payload {payload:?}");
            assert_eq!(
                decode_method(1, &payload).ok(),
                generic,
                "payload {payload:?}"
            );
        }
    }
}
