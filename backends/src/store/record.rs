//! The on-disk record format of a queue log.
//!
//! `[len: u32][crc32(payload): u32][payload: len bytes]`, big-endian, where the payload starts
//! with a kind octet. A torn tail (short header, short payload, bad CRC at the end) is where the
//! log ends; a bad record in the middle is reported and skipped by resynchronising on the next
//! record whose length and CRC check out.
//!
//! Records borrow: a message is encoded straight from the `Message` that is queued, and decoded
//! as slices of the segment buffer, from which `StoredMessage::to_message` builds the `Message`
//! in its one allocation.

use std::borrow::Cow;

use bytes::{Buf, BufMut};

use crate::Message;

/// A message record whose routing key has a one-octet length (written before keys longer than
/// an AMQP short string were kept); still read, no longer written.
const KIND_MESSAGE_SHORT_KEY: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_GONE: u8 = 3;
/// A message record: the routing key has a two-octet length, as a `Message` allows.
const KIND_MESSAGE: u8 = 4;

pub const HEADER_LEN: usize = 8;
/// Larger than any record we write (max message size plus metadata); a length above it is
/// corruption, not a record.
pub const MAX_RECORD: usize = 512 * 1024 * 1024;

/// A message as stored, borrowing its parts: from the queued `Message` when encoding, from the
/// segment buffer when decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage<'a> {
    pub seq: u64,
    /// Written to be fsync'd (a persistent message in a durable queue). Paged-out transient
    /// messages are logged too, but ignored by recovery.
    pub persistent: bool,
    /// Absolute expiry, Unix milliseconds; 0 when the message does not expire.
    pub expires_at_ms: u64,
    /// Raw bytes: records written before names were cut on character boundaries may hold a
    /// name cut inside a character.
    pub exchange: &'a [u8],
    pub routing_key: &'a [u8],
    pub raw_properties: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> StoredMessage<'a> {
    /// The record of `message` as queued with sequence number `seq`.
    pub fn of(
        seq: u64,
        expires_at_ms: u64,
        message: &'a Message,
        persistent: bool,
    ) -> StoredMessage<'a> {
        StoredMessage {
            seq,
            persistent,
            expires_at_ms,
            exchange: message.exchange().as_bytes(),
            routing_key: message.routing_key().as_bytes(),
            raw_properties: message.raw_properties(),
            body: message.body(),
        }
    }

    /// The message this record holds, in one allocation (names that are not UTF-8 are mended,
    /// which copies them first).
    pub fn to_message(&self) -> Message {
        let exchange: Cow<'_, str> = String::from_utf8_lossy(self.exchange);
        let routing_key: Cow<'_, str> = String::from_utf8_lossy(self.routing_key);
        Message::from_raw(&exchange, &routing_key, self.raw_properties, self.body)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record<'a> {
    Message(StoredMessage<'a>),
    /// The message with this sequence number left the queue for good.
    Ack(u64),
    /// Every message with a sequence number in this inclusive range left the queue for good:
    /// a run of consecutive acknowledgements, or queue.purge of paged-out messages.
    Gone(u64, u64),
}

/// Appends the encoded record (header included) to `out`.
pub fn encode(record: &Record<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.put_u32(0);
    out.put_u32(0);
    match record {
        Record::Message(m) => {
            // A `Message` keeps at most 255 and 65535 bytes of these: the cuts never apply to
            // a record made from one.
            let exchange = &m.exchange[..m.exchange.len().min(u8::MAX as usize)];
            let routing_key = &m.routing_key[..m.routing_key.len().min(u16::MAX as usize)];
            out.reserve(
                1 + 8
                    + 1
                    + 8
                    + 1
                    + exchange.len()
                    + 2
                    + routing_key.len()
                    + 4
                    + m.raw_properties.len()
                    + 4
                    + m.body.len(),
            );
            out.put_u8(KIND_MESSAGE);
            out.put_u64(m.seq);
            out.put_u8(m.persistent as u8);
            out.put_u64(m.expires_at_ms);
            out.put_u8(exchange.len() as u8);
            out.extend_from_slice(exchange);
            out.put_u16(routing_key.len() as u16);
            out.extend_from_slice(routing_key);
            out.put_u32(m.raw_properties.len() as u32);
            out.extend_from_slice(m.raw_properties);
            out.put_u32(m.body.len() as u32);
            out.extend_from_slice(m.body);
        }
        Record::Ack(seq) => {
            out.put_u8(KIND_ACK);
            out.put_u64(*seq);
        }
        Record::Gone(from, to) => {
            out.put_u8(KIND_GONE);
            out.put_u64(*from);
            out.put_u64(*to);
        }
    }
    let payload_len = out.len() - start - HEADER_LEN;
    let crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// What the next bytes of a segment hold.
#[derive(Debug, PartialEq)]
pub enum Next<'a> {
    /// A whole, valid record and its total encoded length.
    Record(Record<'a>, usize),
    /// Not enough bytes for a whole record: the end of the log, or a torn write.
    Incomplete,
    /// The bytes here are not a valid record.
    Corrupt(&'static str),
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Next<'_> {
    if buf.len() < HEADER_LEN {
        return Next::Incomplete;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 || len > MAX_RECORD {
        return Next::Corrupt("implausible record length");
    }
    if buf.len() < HEADER_LEN + len {
        return Next::Incomplete;
    }
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        return Next::Corrupt("checksum mismatch");
    }
    match parse_payload(payload) {
        Some(record) => Next::Record(record, HEADER_LEN + len),
        None => Next::Corrupt("malformed record payload"),
    }
}

fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let bytes = p.get(..n)?;
    *p = &p[n..];
    Some(bytes)
}

fn parse_payload(mut p: &[u8]) -> Option<Record<'_>> {
    if p.is_empty() {
        return None;
    }
    match p.get_u8() {
        kind @ (KIND_MESSAGE | KIND_MESSAGE_SHORT_KEY) => {
            if p.len() < 8 + 1 + 8 + 1 {
                return None;
            }
            let seq = p.get_u64();
            let persistent = p.get_u8() != 0;
            let expires_at_ms = p.get_u64();
            let exchange_len = p.get_u8() as usize;
            let exchange = take(&mut p, exchange_len)?;
            let routing_key_len = if kind == KIND_MESSAGE {
                u16::from_be_bytes(take(&mut p, 2)?.try_into().ok()?) as usize
            } else {
                *take(&mut p, 1)?.first()? as usize
            };
            let routing_key = take(&mut p, routing_key_len)?;
            let properties_len = u32::from_be_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
            let raw_properties = take(&mut p, properties_len)?;
            let body_len = u32::from_be_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
            let body = take(&mut p, body_len)?;
            Some(Record::Message(StoredMessage {
                seq,
                persistent,
                expires_at_ms,
                exchange,
                routing_key,
                raw_properties,
                body,
            }))
        }
        KIND_ACK if p.len() >= 8 => Some(Record::Ack(p.get_u64())),
        KIND_GONE if p.len() >= 16 => Some(Record::Gone(p.get_u64(), p.get_u64())),
        _ => None,
    }
}

/// A problem found while scanning a segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub offset: u64,
    pub reason: &'static str,
}

/// Scans a whole segment: every valid record with its offset, the damage skipped on the way,
/// and the length of the valid prefix after which only a torn tail (if anything) remains.
#[cfg(test)]
pub fn scan(buf: &[u8]) -> (Vec<(u64, Record<'_>)>, Vec<Damage>, usize) {
    let mut records = Vec::new();
    let (damage, valid_end) = scan_each(buf, |offset, rec| records.push((offset, rec)));
    (records, damage, valid_end)
}

/// Like `scan`, handing each record to `visit` as it is decoded instead of collecting them,
/// so recovery holds one record at a time, not a segment's worth.
pub fn scan_each<'a>(
    buf: &'a [u8],
    mut visit: impl FnMut(u64, Record<'a>),
) -> (Vec<Damage>, usize) {
    let mut damage = Vec::new();
    let mut pos = 0usize;
    let mut valid_end = 0usize;
    while pos < buf.len() {
        match decode(&buf[pos..]) {
            Next::Record(rec, n) => {
                visit(pos as u64, rec);
                pos += n;
                valid_end = pos;
            }
            Next::Incomplete => break,
            Next::Corrupt(reason) => {
                // Find the next offset where a whole valid record starts; if none, what is
                // left is a torn tail.
                let resync =
                    (pos + 1..buf.len()).find(|&p| matches!(decode(&buf[p..]), Next::Record(..)));
                match resync {
                    Some(p) => {
                        damage.push(Damage {
                            offset: pos as u64,
                            reason,
                        });
                        pos = p;
                    }
                    None => break,
                }
            }
        }
    }
    (damage, valid_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;
    use amq_protocol::types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString,
    };

    const BODIES: [[u8; 20]; 8] = {
        let mut bodies = [[0u8; 20]; 8];
        let mut i = 0;
        while i < 8 {
            bodies[i] = [i as u8; 20];
            i += 1;
        }
        bodies
    };

    fn msg(seq: u64) -> Record<'static> {
        Record::Message(StoredMessage {
            seq,
            persistent: true,
            expires_at_ms: 0,
            exchange: b"ex",
            routing_key: b"rk",
            raw_properties: &[0x10, 0x00, 2],
            body: &BODIES[seq as usize % 8],
        })
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut buf = Vec::new();
        encode(&msg(1), &mut buf);
        encode(&Record::Ack(1), &mut buf);
        encode(&Record::Gone(3, 7), &mut buf);
        encode(&msg(2), &mut buf);
        let full = buf.len();
        let (recs, damage, end) = scan(&buf);
        assert_eq!(recs.len(), 4);
        assert!(damage.is_empty());
        assert_eq!(end, full);
        assert_eq!(recs[0].1, msg(1));
        assert_eq!(recs[1].1, Record::Ack(1));
        assert_eq!(recs[2].1, Record::Gone(3, 7));
        assert_eq!(recs[3].1, msg(2));
        // Every cut inside the last record leaves the first three intact.
        let last_start = recs[3].0 as usize;
        for cut in last_start..full {
            let (recs, damage, end) = scan(&buf[..cut]);
            assert_eq!(recs.len(), 3, "cut at {cut}");
            assert!(damage.is_empty());
            assert_eq!(end, last_start);
        }
    }

    #[test]
    fn corruption_in_the_middle_is_reported_and_skipped() {
        let mut buf = Vec::new();
        for seq in 0..5 {
            encode(&msg(seq), &mut buf);
        }
        let (recs, _, _) = scan(&buf);
        let second = recs[1].0 as usize;
        buf[second + 12] ^= 0xFF; // flip a payload byte of record 1
        let (recs, damage, end) = scan(&buf);
        let seqs: Vec<u64> = recs
            .iter()
            .filter_map(|(_, r)| match r {
                Record::Message(m) => Some(m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![0, 2, 3, 4]);
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].offset, second as u64);
        assert_eq!(end, buf.len());
    }

    /// Encodes `message` as a log record, decodes it and rebuilds the message.
    fn through_the_log(message: &Message, expires_at_ms: u64) -> Message {
        let mut buf = Vec::new();
        encode(
            &Record::Message(StoredMessage::of(41, expires_at_ms, message, true)),
            &mut buf,
        );
        let Next::Record(Record::Message(stored), len) = decode(&buf) else {
            panic!("not a message record");
        };
        assert_eq!(len, buf.len());
        assert_eq!((stored.seq, stored.expires_at_ms), (41, expires_at_ms));
        stored.to_message()
    }

    #[test]
    fn every_header_type_and_property_survives_the_log() {
        let mut nested = FieldTable::default();
        nested.insert("n".into(), AMQPValue::LongLongInt(-7));
        let mut headers = FieldTable::default();
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(200),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(60_000),
            AMQPValue::LongInt(-70_000),
            AMQPValue::LongUInt(4_000_000_000),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::Float(1.5),
            AMQPValue::Double(-2.25),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
            AMQPValue::LongString(LongString::from("text")),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString(LongString::from("two")),
            ])),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(nested),
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])),
            AMQPValue::Void,
        ];
        for (i, v) in values.into_iter().enumerate() {
            headers.insert(format!("h{i}").into(), v);
        }
        let props = AMQPProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(9)
            .with_correlation_id("corr".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("id-1".into())
            .with_timestamp(1_700_000_001)
            .with_type("type".into())
            .with_user_id("guest".into())
            .with_app_id("app".into())
            .with_cluster_id("cluster".into());
        let message = Message::new(
            "amq.topic".into(),
            "a.b.c".into(),
            props.clone(),
            bytes::Bytes::from_static(b"payload"),
        );
        let back = through_the_log(&message, 1_700_000_060_000);
        assert_eq!(back, message, "byte for byte, summary included");
        assert_eq!(back.properties(), message.properties());
        assert_eq!(back.properties().headers(), message.properties().headers());
        assert_eq!(back.priority(), 9);
        assert!(back.is_persistent());
        assert_eq!(back.expiration_ms(), Ok(Some(60_000)));
        assert!(back.headers().is_some());
    }

    #[test]
    fn empty_body_and_properties_survive_the_log() {
        let message = Message::new(
            "".into(),
            "".into(),
            AMQPProperties::default(),
            bytes::Bytes::new(),
        );
        let back = through_the_log(&message, 0);
        assert_eq!(back, message);
        assert_eq!(back.body_len(), 0);
        assert!(!back.is_persistent());
        assert_eq!(back.expiration_ms(), Ok(None));
    }

    #[test]
    fn longest_names_survive_the_log() {
        let exchange = "e".repeat(255);
        let routing_key = "é".repeat(u16::MAX as usize / 2); // 65534 bytes
        let message = Message::from_parts(
            &exchange,
            &routing_key,
            &AMQPProperties::default().with_expiration("soon".into()),
            &[0x01, 0x00, 4, b's', b'o', b'o', b'n'],
            &[7; 3],
        );
        assert_eq!(message.routing_key(), routing_key);
        let back = through_the_log(&message, 0);
        assert_eq!(back, message);
        assert_eq!(back.exchange(), exchange);
        assert_eq!(back.routing_key(), routing_key);
        assert_eq!(back.expiration_ms(), Err("soon".to_string()));
    }

    #[test]
    fn records_of_the_one_octet_key_format_still_decode() {
        // Kind 1, as written before routing keys got two octets of length; its name was cut at
        // 255 bytes even inside a character.
        let mut payload = vec![KIND_MESSAGE_SHORT_KEY];
        payload.extend_from_slice(&5u64.to_be_bytes());
        payload.push(1);
        payload.extend_from_slice(&0u64.to_be_bytes());
        payload.extend_from_slice(&[2, b'e', b'x']);
        payload.extend_from_slice(&[3, b'k', 0xC3, 0xA9]);
        payload.extend_from_slice(&3u32.to_be_bytes());
        payload.extend_from_slice(&[0x10, 0x00, 2]);
        payload.extend_from_slice(&2u32.to_be_bytes());
        payload.extend_from_slice(b"hi");
        let mut buf = Vec::new();
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        buf.extend_from_slice(&payload);
        let Next::Record(Record::Message(stored), _) = decode(&buf) else {
            panic!("not a message record");
        };
        let message = stored.to_message();
        assert_eq!(message.exchange(), "ex");
        assert_eq!(message.routing_key(), "ké");
        assert!(message.is_persistent());
        assert_eq!(message.body(), b"hi");
        // The same record cut inside the last character: the name is mended, not refused.
        let mut cut = payload.clone();
        cut[21] = 2;
        cut.remove(24);
        let mut buf = Vec::new();
        buf.extend_from_slice(&(cut.len() as u32).to_be_bytes());
        buf.extend_from_slice(&crc32fast::hash(&cut).to_be_bytes());
        buf.extend_from_slice(&cut);
        let Next::Record(Record::Message(stored), _) = decode(&buf) else {
            panic!("not a message record");
        };
        assert_eq!(stored.to_message().routing_key(), "k\u{FFFD}");
    }
}
