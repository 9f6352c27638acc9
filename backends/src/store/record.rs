//! The on-disk record format of a queue log.
//!
//! `[len: u32][crc32(payload): u32][payload: len bytes]`, big-endian, where the payload starts
//! with a kind octet. A torn tail (short header, short payload, bad CRC at the end) is where the
//! log ends; a bad record in the middle is reported and skipped by resynchronising on the next
//! record whose length and CRC check out.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const KIND_MESSAGE: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_PURGE: u8 = 3;

pub const HEADER_LEN: usize = 8;
/// Larger than any record we write (max message size plus metadata); a length above it is
/// corruption, not a record.
pub const MAX_RECORD: usize = 512 * 1024 * 1024;

/// A message as stored: enough to rebuild it exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub seq: u64,
    /// Written to be fsync'd (a persistent message in a durable queue). Paged-out transient
    /// messages are logged too, but ignored by recovery.
    pub persistent: bool,
    /// Absolute expiry, Unix milliseconds; 0 when the message does not expire.
    pub expires_at_ms: u64,
    pub exchange: String,
    pub routing_key: String,
    pub raw_properties: Bytes,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Message(StoredMessage),
    /// The message with this sequence number left the queue for good.
    Ack(u64),
    /// Every message with a sequence number in this inclusive range is gone (queue.purge of
    /// paged-out messages, which are never out for delivery).
    Purge(u64, u64),
}

fn put_short_str(out: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    out.put_u8(b.len() as u8);
    out.extend_from_slice(b);
}

/// Appends the encoded record (header included) to `out`.
pub fn encode(record: &Record, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    out.put_u32(0);
    match record {
        Record::Message(m) => {
            out.put_u8(KIND_MESSAGE);
            out.put_u64(m.seq);
            out.put_u8(m.persistent as u8);
            out.put_u64(m.expires_at_ms);
            put_short_str(out, &m.exchange);
            put_short_str(out, &m.routing_key);
            out.put_u32(m.raw_properties.len() as u32);
            out.extend_from_slice(&m.raw_properties);
            out.put_u32(m.body.len() as u32);
            out.extend_from_slice(&m.body);
        }
        Record::Ack(seq) => {
            out.put_u8(KIND_ACK);
            out.put_u64(*seq);
        }
        Record::Purge(from, to) => {
            out.put_u8(KIND_PURGE);
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
pub enum Next {
    /// A whole, valid record and its total encoded length.
    Record(Record, usize),
    /// Not enough bytes for a whole record: the end of the log, or a torn write.
    Incomplete,
    /// The bytes here are not a valid record.
    Corrupt(&'static str),
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Next {
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

fn get_short_str(p: &mut &[u8]) -> Option<String> {
    if p.is_empty() {
        return None;
    }
    let n = p.get_u8() as usize;
    if p.len() < n {
        return None;
    }
    let s = String::from_utf8_lossy(&p[..n]).into_owned();
    p.advance(n);
    Some(s)
}

fn get_blob(p: &mut &[u8]) -> Option<Bytes> {
    if p.len() < 4 {
        return None;
    }
    let n = p.get_u32() as usize;
    if p.len() < n {
        return None;
    }
    let b = Bytes::copy_from_slice(&p[..n]);
    p.advance(n);
    Some(b)
}

fn parse_payload(mut p: &[u8]) -> Option<Record> {
    if p.is_empty() {
        return None;
    }
    match p.get_u8() {
        KIND_MESSAGE => {
            if p.len() < 17 {
                return None;
            }
            let seq = p.get_u64();
            let persistent = p.get_u8() != 0;
            let expires_at_ms = p.get_u64();
            let exchange = get_short_str(&mut p)?;
            let routing_key = get_short_str(&mut p)?;
            let raw_properties = get_blob(&mut p)?;
            let body = get_blob(&mut p)?;
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
        KIND_PURGE if p.len() >= 16 => Some(Record::Purge(p.get_u64(), p.get_u64())),
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
pub fn scan(buf: &[u8]) -> (Vec<(u64, Record)>, Vec<Damage>, usize) {
    let mut records = Vec::new();
    let (damage, valid_end) = scan_each(buf, |offset, rec| records.push((offset, rec)));
    (records, damage, valid_end)
}

/// Like `scan`, handing each record to `visit` as it is decoded instead of collecting them,
/// so recovery holds one record at a time, not a segment's worth.
pub fn scan_each(buf: &[u8], mut visit: impl FnMut(u64, Record)) -> (Vec<Damage>, usize) {
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

    fn msg(seq: u64) -> Record {
        Record::Message(StoredMessage {
            seq,
            persistent: true,
            expires_at_ms: 0,
            exchange: "ex".into(),
            routing_key: "rk".into(),
            raw_properties: Bytes::from_static(&[0x10, 0x00, 2]),
            body: Bytes::from(vec![seq as u8; 20]),
        })
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut buf = BytesMut::new();
        encode(&msg(1), &mut buf);
        encode(&Record::Ack(1), &mut buf);
        encode(&Record::Purge(3, 7), &mut buf);
        encode(&msg(2), &mut buf);
        let full = buf.len();
        let (recs, damage, end) = scan(&buf);
        assert_eq!(recs.len(), 4);
        assert!(damage.is_empty());
        assert_eq!(end, full);
        assert_eq!(recs[1].1, Record::Ack(1));
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
        let mut buf = BytesMut::new();
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
}
