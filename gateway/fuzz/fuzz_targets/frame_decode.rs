//! Feeds arbitrary bytes to `decode_frame` the way a connection's reader does: in chunks, calling
//! it in a loop until it wants more bytes or fails. Checks that it never panics, that "need more
//! bytes" leaves the buffer untouched, that a frame never exceeds frame_max, that chunked and
//! whole-buffer decoding agree, and that every decoded method and property list re-encodes to
//! bytes that decode and re-encode identically.
//!
//! Input layout: two bytes of frame_max (plus 8), one byte of chunk size (plus 1), then the stream.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_gateway::codec::protocol::basic::{gen_properties, parse_properties};
use warren_gateway::codec::{decode_frame, encode_method, DecodeError, Frame};
use warren_gateway::error::Exception;

/// What one decode pass produced, comparable across passes.
#[derive(Debug, PartialEq)]
enum Event {
    Frame { kind: u8, channel: u16, len: usize },
    Error(DecodeError),
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let frame_max = 8 + u16::from_be_bytes([data[0], data[1]]) as usize;
    let chunk = 1 + data[2] as usize;
    let stream = &data[3..];

    let whole = run(stream, frame_max, stream.len().max(1));
    let chunked = run(stream, frame_max, chunk);
    assert_eq!(
        whole, chunked,
        "chunked decoding disagrees with whole-buffer decoding"
    );
});

fn run(stream: &[u8], frame_max: usize, chunk: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    for part in stream.chunks(chunk) {
        buf.extend_from_slice(part);
        loop {
            let before = buf.clone();
            match decode_frame(&mut buf, frame_max) {
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) must not consume bytes");
                    break;
                }
                Ok(Some(frame)) => {
                    let len = before.len() - buf.len();
                    assert!(len >= 8, "a frame is at least 8 bytes, consumed {len}");
                    assert!(
                        len <= frame_max,
                        "frame of {len} bytes over frame_max {frame_max}"
                    );
                    assert_eq!(
                        &before[len..],
                        &buf[..],
                        "decode must only consume its frame"
                    );
                    assert_eq!(before[len - 1], 0xCE, "a frame ends with 0xCE");
                    events.push(Event::Frame {
                        kind: before[0],
                        channel: frame.channel(),
                        len,
                    });
                    check_frame(frame);
                }
                Err(err) => {
                    // Every error must turn into a close frame without panicking.
                    let exception = Exception::from(err.clone());
                    assert!((500..600).contains(&exception.code));
                    let _ = exception.reply_text();
                    events.push(Event::Error(err));
                    return events;
                }
            }
        }
    }
    events
}

fn check_frame(frame: Frame) {
    match frame {
        Frame::Method(channel, method) => {
            // Re-encoding is lossy only where the wire allows aliases (e.g. 'L' and 'l', duplicate
            // table keys); after one pass the bytes must be a fixed point.
            let first = encode_method(channel, &method);
            let mut buf = first.clone();
            let again = match decode_frame(&mut buf, usize::MAX) {
                Ok(Some(Frame::Method(c, m))) => {
                    assert_eq!(c, channel);
                    encode_method(c, &m)
                }
                other => panic!("re-encoded {method:?} decodes as {other:?}"),
            };
            assert!(buf.is_empty());
            assert_eq!(first, again, "re-encoding {method:?} is not a fixed point");
        }
        Frame::Header(_, header) => {
            let first = gen(&header.properties);
            let (rest, parsed) = parse_properties(&first[..]).expect("re-encoded properties");
            assert!(rest.is_empty());
            assert_eq!(
                first,
                gen(&parsed),
                "re-encoding properties is not a fixed point"
            );
        }
        Frame::Body(_, _) | Frame::Heartbeat(_) => {}
    }
}

fn gen(props: &warren_gateway::codec::protocol::basic::AMQPProperties) -> Vec<u8> {
    cookie_factory::gen(gen_properties(props), Vec::new())
        .expect("properties serialize")
        .0
}
