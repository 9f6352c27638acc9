//! One durable queue's log: append-only segment files of records, group-committed by the
//! `Syncer`, read back for paging and recovery, deleted from the front once fully acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;

use super::rangeset::RangeSet;
use super::record::{self, Record, StoredMessage};
use super::syncer::Syncer;
use super::Guard;

/// Where a record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Sequence number of the first message record (u64::MAX while it has none).
    first_seq: u64,
    /// Message records not yet removed.
    live: u64,
    /// Of those, the ones paged out (not in memory).
    paged: u64,
}

struct LogInner {
    segments: Vec<Segment>,
    writer: Option<BufWriter<File>>,
    /// Length of the active segment including what is still buffered.
    active_len: u64,
    /// Completions waiting for the next fsync.
    pending: Vec<Guard>,
    dirty: bool,
    scratch: BytesMut,
    /// Segments rotated out since the last fsync: synced with the next group commit.
    retired: Vec<File>,
    destroyed: bool,
    /// Set by recovery: records to skip when paging in (acknowledged before the restart).
    skip: RangeSet,
    /// Transient records below this sequence number predate the restart: their messages died
    /// with it.
    recovered_below: u64,
}

pub struct QueueLog {
    dir: PathBuf,
    segment_bytes: u64,
    syncer: Arc<Syncer>,
    inner: Mutex<LogInner>,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.seg"))
}

impl std::fmt::Debug for QueueLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueLog").field("dir", &self.dir).finish()
    }
}

/// What recovery found in a queue's log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Unacknowledged persistent messages, in order, up to the in-memory limit.
    pub messages: Vec<StoredMessage>,
    /// Further unacknowledged messages left on disk, to page in later.
    pub paged: u64,
    pub paged_bytes: u64,
    /// Where the first of those starts.
    pub cursor: Option<Position>,
    pub next_seq: u64,
    /// Records that failed their checks, as "file at offset: reason".
    pub damage: Vec<String>,
}

impl QueueLog {
    /// Opens (creating if needed) the log in `dir` and recovers what it holds. At most
    /// `memory_limit` messages come back into memory; the rest stay paged on disk.
    pub fn open(
        dir: PathBuf,
        segment_bytes: u64,
        syncer: Arc<Syncer>,
        memory_limit: usize,
    ) -> io::Result<(Arc<QueueLog>, Recovered)> {
        fs::create_dir_all(&dir)?;
        let mut ids: Vec<u64> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        ids.sort_unstable();

        // Pass 1: what was acknowledged, and the valid length of each segment. One segment is
        // in memory at a time, in both passes: a log of ten million messages recovers in the
        // memory of one segment plus what the queue keeps in memory.
        let mut acked = RangeSet::default();
        let mut out = Recovered::default();
        for (i, id) in ids.iter().enumerate() {
            let path = segment_path(&dir, *id);
            let mut buf = Vec::new();
            File::open(&path)?.read_to_end(&mut buf)?;
            let mut next_seq = out.next_seq;
            let (damage, valid_end) = record::scan_each(&buf, |_, rec| match rec {
                Record::Ack(seq) => acked.insert(seq),
                Record::Purge(from, to) => acked.insert_range(from, to),
                Record::Message(m) => next_seq = next_seq.max(m.seq + 1),
            });
            out.next_seq = next_seq;
            for d in damage {
                out.damage.push(format!(
                    "{} at offset {}: {}",
                    path.display(),
                    d.offset,
                    d.reason
                ));
            }
            if valid_end < buf.len() {
                if i + 1 == ids.len() {
                    // A torn write at the tail: cut it so appends continue from a clean end.
                    tracing::warn!(file = %path.display(), offset = valid_end, lost = buf.len() - valid_end, "cutting a torn record at the end of the log");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(valid_end as u64)?;
                } else {
                    out.damage.push(format!(
                        "{} at offset {}: unreadable tail of {} bytes",
                        path.display(),
                        valid_end,
                        buf.len() - valid_end
                    ));
                }
            }
        }

        // Pass 2: the live messages, in order; the first `memory_limit` come into memory.
        let mut segments = Vec::with_capacity(ids.len());
        for id in ids.iter().copied() {
            let mut buf = Vec::new();
            File::open(segment_path(&dir, id))?.read_to_end(&mut buf)?;
            let mut seg = Segment {
                id,
                first_seq: u64::MAX,
                live: 0,
                paged: 0,
            };
            record::scan_each(&buf, |offset, rec| {
                let Record::Message(m) = rec else { return };
                seg.first_seq = seg.first_seq.min(m.seq);
                if !m.persistent || acked.contains(m.seq) {
                    return;
                }
                seg.live += 1;
                if out.messages.len() < memory_limit && out.cursor.is_none() {
                    out.messages.push(m);
                } else {
                    if out.cursor.is_none() {
                        out.cursor = Some(Position {
                            segment: id,
                            offset,
                        });
                    }
                    seg.paged += 1;
                    out.paged += 1;
                    out.paged_bytes += m.body.len() as u64;
                }
            });
            drop(buf);
            segments.push(seg);
        }

        let next_id = segments.last().map_or(0, |s| s.id + 1);
        let log = Arc::new(QueueLog {
            dir,
            segment_bytes,
            syncer,
            inner: Mutex::new(LogInner {
                segments,
                writer: None,
                active_len: 0,
                pending: Vec::new(),
                dirty: false,
                scratch: BytesMut::with_capacity(4096),
                retired: Vec::new(),
                destroyed: false,
                skip: acked,
                recovered_below: out.next_seq,
            }),
        });
        // Always append to a fresh segment: the recovered ones stay as they were.
        {
            let mut inner = log.inner.lock();
            log.open_segment(&mut inner, next_id)?;
            log.drop_dead_segments(&mut inner);
        }
        Ok((log, out))
    }

    fn open_segment(&self, inner: &mut LogInner, id: u64) -> io::Result<()> {
        if let Some(w) = inner.writer.take() {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            inner.retired.push(file);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, id))?;
        super::sync_dir(&self.dir);
        inner.writer = Some(BufWriter::with_capacity(64 * 1024, file));
        inner.active_len = 0;
        inner.segments.push(Segment {
            id,
            first_seq: u64::MAX,
            live: 0,
            paged: 0,
        });
        Ok(())
    }

    fn write_record(&self, inner: &mut LogInner, rec: &Record) -> io::Result<Position> {
        if inner.destroyed {
            return Err(io::Error::other("queue log deleted"));
        }
        if inner.active_len >= self.segment_bytes {
            let next = inner.segments.last().map_or(0, |s| s.id + 1);
            self.open_segment(inner, next)?;
        }
        let mut scratch = std::mem::take(&mut inner.scratch);
        scratch.clear();
        record::encode(rec, &mut scratch);
        let result = match inner.writer.as_mut() {
            Some(w) => w.write_all(&scratch),
            None => Err(io::Error::other("queue log has no open segment")),
        };
        let len = scratch.len() as u64;
        inner.scratch = scratch;
        result?;
        let segment = inner.segments.last().map_or(0, |s| s.id);
        let pos = Position {
            segment,
            offset: inner.active_len,
        };
        inner.active_len += len;
        Ok(pos)
    }

    /// Appends a message. `sync`: the message must be on disk before `guard` is released
    /// (persistent); otherwise it is logged only to be paged out. `paged`: it leaves memory.
    pub fn append_message(
        self: &Arc<Self>,
        msg: &StoredMessage,
        paged: bool,
        guard: Option<Guard>,
    ) -> io::Result<Position> {
        let mut inner = self.inner.lock();
        let pos = self.write_record(&mut inner, &Record::Message(msg.clone()))?;
        if let Some(seg) = inner.segments.last_mut() {
            seg.first_seq = seg.first_seq.min(msg.seq);
            seg.live += 1;
            if paged {
                seg.paged += 1;
            }
        }
        if msg.persistent {
            if let Some(g) = guard {
                inner.pending.push(g);
            }
            if !inner.dirty {
                inner.dirty = true;
                drop(inner);
                self.syncer.schedule(self.clone());
            }
        }
        Ok(pos)
    }

    fn segment_of(inner: &mut LogInner, seq: u64) -> Option<&mut Segment> {
        let idx = inner
            .segments
            .partition_point(|s| s.first_seq != u64::MAX && s.first_seq <= seq);
        let idx = idx.checked_sub(1)?;
        inner.segments.get_mut(idx)
    }

    /// A logged message left the queue for good. Persistent ones get an ack record (not
    /// fsync'd: losing it in a crash means a redelivery, never a loss).
    pub fn remove(&self, seq: u64, persistent: bool) {
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return;
        }
        if persistent {
            if let Err(err) = self.write_record(&mut inner, &Record::Ack(seq)) {
                tracing::error!(dir = %self.dir.display(), %err, "cannot write ack record");
            }
        }
        if let Some(seg) = Self::segment_of(&mut inner, seq) {
            seg.live = seg.live.saturating_sub(1);
        }
        self.drop_dead_segments(&mut inner);
    }

    /// Every paged message (sequence numbers `from..=to`) is gone (queue.purge).
    pub fn purge_paged(&self, from: u64, to: u64) {
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return;
        }
        if let Err(err) = self.write_record(&mut inner, &Record::Purge(from, to)) {
            tracing::error!(dir = %self.dir.display(), %err, "cannot write purge record");
        }
        for seg in inner.segments.iter_mut() {
            seg.live -= seg.paged.min(seg.live);
            seg.paged = 0;
        }
        self.drop_dead_segments(&mut inner);
    }

    /// Segments go only from the front, so an ack record is never deleted before the message
    /// record it acknowledges.
    fn drop_dead_segments(&self, inner: &mut LogInner) {
        while inner.segments.len() > 1 && inner.segments[0].live == 0 {
            let seg = inner.segments.remove(0);
            let path = segment_path(&self.dir, seg.id);
            if let Err(err) = fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), %err, "cannot delete a fully acknowledged segment");
            }
        }
    }

    /// Reads paged messages from `cursor` on: at most `max` messages or about `max_bytes` of
    /// bodies. Returns them and where to continue.
    pub fn read_paged(
        &self,
        mut cursor: Position,
        max: usize,
        max_bytes: usize,
    ) -> io::Result<(Vec<StoredMessage>, Position)> {
        let mut inner = self.inner.lock();
        if let Some(w) = inner.writer.as_mut() {
            w.flush()?;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max && bytes < max_bytes {
            let Some(seg_idx) = inner.segments.iter().position(|s| s.id == cursor.segment) else {
                break;
            };
            let mut file = File::open(segment_path(&self.dir, cursor.segment))?;
            let len = file.metadata()?.len();
            if cursor.offset >= len {
                match inner.segments.get(seg_idx + 1) {
                    Some(next) => {
                        cursor = Position {
                            segment: next.id,
                            offset: 0,
                        };
                        continue;
                    }
                    None => break,
                }
            }
            file.seek(SeekFrom::Start(cursor.offset))?;
            let want = (max_bytes.saturating_sub(bytes)).clamp(64 * 1024, 8 * 1024 * 1024) as u64;
            let mut buf = Vec::new();
            file.take(want.min(len - cursor.offset))
                .read_to_end(&mut buf)?;
            let mut pos = 0usize;
            let mut progressed = false;
            while out.len() < max && bytes < max_bytes {
                match record::decode(&buf[pos..]) {
                    record::Next::Record(rec, n) => {
                        pos += n;
                        progressed = true;
                        if let Record::Message(m) = rec {
                            let stale = inner.skip.contains(m.seq)
                                || (!m.persistent && m.seq < inner.recovered_below);
                            if stale {
                                continue;
                            }
                            if let Some(seg) = inner.segments.get_mut(seg_idx) {
                                seg.paged = seg.paged.saturating_sub(1);
                            }
                            bytes += m.body.len();
                            out.push(m);
                        }
                    }
                    record::Next::Incomplete => {
                        if !progressed {
                            // A record larger than what we read: read it whole next time.
                            let mut header = [0u8; record::HEADER_LEN];
                            if buf.len() >= record::HEADER_LEN {
                                header.copy_from_slice(&buf[..record::HEADER_LEN]);
                                let need = u32::from_be_bytes([
                                    header[0], header[1], header[2], header[3],
                                ]) as u64
                                    + record::HEADER_LEN as u64;
                                if need <= len - cursor.offset && need > buf.len() as u64 {
                                    let mut file =
                                        File::open(segment_path(&self.dir, cursor.segment))?;
                                    file.seek(SeekFrom::Start(cursor.offset))?;
                                    buf.clear();
                                    file.take(need).read_to_end(&mut buf)?;
                                    continue;
                                }
                            }
                        }
                        break;
                    }
                    record::Next::Corrupt(reason) => {
                        return Err(io::Error::other(format!(
                            "corrupt record in {} at offset {}: {reason}",
                            segment_path(&self.dir, cursor.segment).display(),
                            cursor.offset + pos as u64
                        )));
                    }
                }
            }
            cursor.offset += pos as u64;
            if !progressed && cursor.offset < len {
                break;
            }
        }
        Ok((out, cursor))
    }

    /// The position the next appended record will have.
    pub fn end_position(&self) -> Position {
        let inner = self.inner.lock();
        Position {
            segment: inner.segments.last().map_or(0, |s| s.id),
            offset: inner.active_len,
        }
    }

    /// Deletes the log with its queue. Pending completions are released: the queue is gone.
    pub fn destroy(&self) {
        let mut inner = self.inner.lock();
        inner.destroyed = true;
        inner.writer = None;
        inner.pending.clear();
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %err, "cannot delete queue log");
        }
    }

    /// Called by the syncer: flush, fsync, then release the completions that were waiting.
    pub(super) fn sync(&self) {
        let (file, guards, retired) = {
            let mut inner = self.inner.lock();
            inner.dirty = false;
            let guards = std::mem::take(&mut inner.pending);
            let retired = std::mem::take(&mut inner.retired);
            let file = match inner.writer.as_mut() {
                Some(w) => match w.flush().and_then(|_| w.get_ref().try_clone()) {
                    Ok(f) => Some(f),
                    Err(err) => {
                        tracing::error!(dir = %self.dir.display(), %err, "cannot flush queue log");
                        for g in &guards {
                            g.failed(&err.to_string());
                        }
                        None
                    }
                },
                None => None,
            };
            (file, guards, retired)
        };
        for old in retired {
            if let Err(err) = old.sync_data() {
                tracing::error!(dir = %self.dir.display(), %err, "fsync of a rotated segment failed");
                for g in &guards {
                    g.failed(&err.to_string());
                }
            }
        }
        if let Some(file) = file {
            if let Err(err) = file.sync_data() {
                tracing::error!(dir = %self.dir.display(), %err, "fsync failed");
                for g in &guards {
                    g.failed(&err.to_string());
                }
            }
        }
        drop(guards);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn stored(seq: u64, persistent: bool) -> StoredMessage {
        StoredMessage {
            seq,
            persistent,
            expires_at_ms: 0,
            exchange: String::new(),
            routing_key: "q".into(),
            raw_properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from(seq.to_be_bytes().to_vec()),
        }
    }

    fn seqs(r: &Recovered) -> Vec<u64> {
        r.messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn acks_purges_transients_and_segment_deletion_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let path = dir.path().join("q");
        let (log, rec) = QueueLog::open(path.clone(), 256, syncer.clone(), 1000).unwrap();
        assert!(rec.messages.is_empty());
        for seq in 0..40 {
            log.append_message(&stored(seq, seq % 5 != 0), false, None)
                .unwrap();
        }
        for seq in 0..10 {
            log.remove(seq, seq % 5 != 0);
        }
        log.sync();
        let segments_before = fs::read_dir(&path).unwrap().count();
        drop(log);
        let (_log, rec) = QueueLog::open(path.clone(), 256, syncer.clone(), 1000).unwrap();
        let expected: Vec<u64> = (10..40).filter(|s| s % 5 != 0).collect();
        assert_eq!(
            seqs(&rec),
            expected,
            "acked and transient records do not come back"
        );
        assert_eq!(rec.next_seq, 40);
        assert!(rec.damage.is_empty());
        assert!(
            fs::read_dir(&path).unwrap().count() <= segments_before + 1,
            "fully acknowledged leading segments are deleted"
        );
        syncer.stop();
    }

    #[test]
    fn a_corrupt_record_in_an_older_segment_is_reported_and_the_rest_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let path = dir.path().join("q");
        let (log, _) = QueueLog::open(path.clone(), 300, syncer.clone(), 1000).unwrap();
        for seq in 0..30 {
            log.append_message(&stored(seq, true), false, None).unwrap();
        }
        log.sync();
        drop(log);
        let mut files: Vec<PathBuf> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let victim = files
            .iter()
            .find(|p| fs::metadata(p).unwrap().len() > 0)
            .unwrap()
            .clone();
        let mut bytes = fs::read(&victim).unwrap();
        let (records, _, _) = record::scan(&bytes);
        assert!(records.len() >= 3, "the segment holds several records");
        let (offset, Record::Message(hit)) = records[1].clone() else {
            panic!("message expected")
        };
        bytes[offset as usize + 20] ^= 0x5A;
        fs::write(&victim, &bytes).unwrap();

        let (_log, rec) = QueueLog::open(path.clone(), 300, syncer.clone(), 1000).unwrap();
        let expected: Vec<u64> = (0..30).filter(|s| *s != hit.seq).collect();
        assert_eq!(seqs(&rec), expected, "every good record is recovered");
        assert_eq!(rec.damage.len(), 1, "{:?}", rec.damage);
        let report = &rec.damage[0];
        assert!(report.contains(&victim.display().to_string()), "{report}");
        assert!(report.contains(&format!("offset {offset}")), "{report}");
        syncer.stop();
    }

    #[test]
    fn paged_messages_read_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let (log, _) = QueueLog::open(dir.path().join("q"), 200, syncer.clone(), 1000).unwrap();
        let first = log.append_message(&stored(0, false), true, None).unwrap();
        for seq in 1..50 {
            log.append_message(&stored(seq, seq % 2 == 0), true, None)
                .unwrap();
        }
        let mut cursor = first;
        let mut got = Vec::new();
        loop {
            let (batch, next) = log.read_paged(cursor, 7, 1 << 20).unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(batch.iter().map(|m| m.seq));
            cursor = next;
        }
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        syncer.stop();
    }
}
