//! One durable queue's log: append-only segment files of records, group-committed by the
//! `Syncer`, read back for paging and recovery, deleted from the front once fully acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::rangeset::RangeSet;
use super::record::{self, Record, StoredMessage};
use super::syncer::Syncer;
use super::Guard;
use crate::Message;

/// Records are encoded straight into the write buffer, which goes to the segment file once it
/// holds this much (and on every group commit).
const WRITE_BUFFER: usize = 64 * 1024;

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
    /// The active segment. Shared so the syncer can fsync it without holding the lock.
    file: Option<Arc<File>>,
    /// Encoded records not yet written to `file`.
    buffer: Vec<u8>,
    /// Length of the active segment including what is still buffered.
    active_len: u64,
    /// Completions waiting for the next fsync.
    pending: Vec<Guard>,
    dirty: bool,
    /// Segments rotated out since the last fsync: synced with the next group commit.
    retired: Vec<Arc<File>>,
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

/// A message read back from the log.
#[derive(Debug)]
pub struct LoggedMessage {
    pub seq: u64,
    /// Absolute expiry, Unix milliseconds; 0 when the message does not expire.
    pub expires_at_ms: u64,
    pub message: Message,
}

impl LoggedMessage {
    fn from_record(stored: &StoredMessage<'_>) -> LoggedMessage {
        LoggedMessage {
            seq: stored.seq,
            expires_at_ms: stored.expires_at_ms,
            message: stored.to_message(),
        }
    }
}

/// What recovery found in a queue's log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Unacknowledged persistent messages, in order, up to the in-memory limit.
    pub messages: Vec<LoggedMessage>,
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
                Record::Gone(from, to) => acked.insert_range(from, to),
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
                    out.messages.push(LoggedMessage::from_record(&m));
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
                file: None,
                buffer: Vec::with_capacity(WRITE_BUFFER),
                active_len: 0,
                pending: Vec::new(),
                dirty: false,
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
        if inner.file.is_some() {
            Self::write_buffer(inner)?;
        }
        if let Some(file) = inner.file.take() {
            inner.retired.push(file);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, id))?;
        super::sync_dir(&self.dir);
        inner.file = Some(Arc::new(file));
        inner.active_len = 0;
        inner.segments.push(Segment {
            id,
            first_seq: u64::MAX,
            live: 0,
            paged: 0,
        });
        Ok(())
    }

    /// Writes the buffered records to the active segment. What a failed write did not take
    /// stays buffered, so the next group commit retries it (and fails its completions if the
    /// disk still refuses).
    fn write_buffer(inner: &mut LogInner) -> io::Result<()> {
        let LogInner { file, buffer, .. } = inner;
        let Some(file) = file.as_deref() else {
            return Err(io::Error::other("queue log has no open segment"));
        };
        let mut written = 0;
        let result = loop {
            if written == buffer.len() {
                break Ok(());
            }
            match (&*file).write(&buffer[written..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => break Err(err),
            }
        };
        buffer.drain(..written);
        result
    }

    fn write_record(&self, inner: &mut LogInner, rec: &Record<'_>) -> io::Result<Position> {
        if inner.destroyed {
            return Err(io::Error::other("queue log deleted"));
        }
        if inner.active_len >= self.segment_bytes {
            let next = inner.segments.last().map_or(0, |s| s.id + 1);
            self.open_segment(inner, next)?;
        }
        // Like a buffered writer: a record is refused, not buffered without bound, while the
        // buffer cannot be written.
        if inner.buffer.len() >= WRITE_BUFFER {
            Self::write_buffer(inner)?;
        }
        let start = inner.buffer.len();
        record::encode(rec, &mut inner.buffer);
        let len = (inner.buffer.len() - start) as u64;
        let segment = inner.segments.last().map_or(0, |s| s.id);
        let pos = Position {
            segment,
            offset: inner.active_len,
        };
        inner.active_len += len;
        Ok(pos)
    }

    /// Appends `message`, queued with sequence number `seq`, encoding it straight from its
    /// buffer. A persistent message must be on disk before `guard` is released; a transient one
    /// is logged only to be paged out. `paged`: it leaves memory.
    pub fn append_message(
        self: &Arc<Self>,
        seq: u64,
        expires_at_ms: u64,
        message: &Message,
        paged: bool,
        guard: Option<Guard>,
    ) -> io::Result<Position> {
        let persistent = message.is_persistent();
        let stored = StoredMessage::of(seq, expires_at_ms, message, persistent);
        let mut inner = self.inner.lock();
        let pos = self.write_record(&mut inner, &Record::Message(stored))?;
        if let Some(seg) = inner.segments.last_mut() {
            seg.first_seq = seg.first_seq.min(seq);
            seg.live += 1;
            if paged {
                seg.paged += 1;
            }
        }
        if persistent {
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
        self.remove_all(&mut [(seq, persistent)]);
    }

    /// Logged messages left the queue for good: `(seq, persistent)` each, in any order. Runs
    /// of consecutive persistent ones (a multiple ack) take one record, not one each.
    pub fn remove_all(&self, removed: &mut [(u64, bool)]) {
        removed.sort_unstable_by_key(|(seq, _)| *seq);
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return;
        }
        let mut persistent = removed.iter().filter(|(_, p)| *p).map(|(seq, _)| *seq);
        let mut next_run = persistent.next();
        while let Some(from) = next_run {
            next_run = None;
            let mut end = from;
            for seq in persistent.by_ref() {
                if seq == end.wrapping_add(1) {
                    end = seq;
                } else {
                    next_run = Some(seq);
                    break;
                }
            }
            let record = if from == end {
                Record::Ack(from)
            } else {
                Record::Gone(from, end)
            };
            if let Err(err) = self.write_record(&mut inner, &record) {
                tracing::error!(dir = %self.dir.display(), %err, "cannot write ack record");
            }
        }
        for (seq, _) in removed.iter() {
            if let Some(seg) = Self::segment_of(&mut inner, *seq) {
                seg.live = seg.live.saturating_sub(1);
            }
        }
        self.drop_dead_segments(&mut inner);
    }

    /// Every paged message (sequence numbers `from..=to`) is gone (queue.purge).
    pub fn purge_paged(&self, from: u64, to: u64) {
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return;
        }
        if let Err(err) = self.write_record(&mut inner, &Record::Gone(from, to)) {
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
    ) -> io::Result<(Vec<LoggedMessage>, Position)> {
        let mut inner = self.inner.lock();
        if inner.file.is_some() {
            Self::write_buffer(&mut inner)?;
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
                            out.push(LoggedMessage::from_record(&m));
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
        inner.file = None;
        inner.buffer = Vec::new();
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
            let written = match inner.file {
                Some(_) => Self::write_buffer(&mut inner),
                None => Ok(()),
            };
            let file = match written {
                Ok(()) => inner.file.clone(),
                Err(err) => {
                    tracing::error!(dir = %self.dir.display(), %err, "cannot write queue log");
                    for g in &guards {
                        g.failed(&err.to_string());
                    }
                    None
                }
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

impl Drop for QueueLog {
    /// Buffered records (ack records, which no fsync waits for) reach the file on shutdown.
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        if inner.file.is_some() && !inner.buffer.is_empty() {
            if let Err(err) = Self::write_buffer(inner) {
                tracing::error!(dir = %self.dir.display(), %err, "cannot write queue log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;

    fn append(log: &Arc<QueueLog>, seq: u64, persistent: bool, paged: bool) -> Position {
        let properties =
            AMQPProperties::default().with_delivery_mode(if persistent { 2 } else { 1 });
        let message = Message::new(
            "".into(),
            "q".into(),
            properties,
            bytes::Bytes::from(seq.to_be_bytes().to_vec()),
        );
        log.append_message(seq, 0, &message, paged, None).unwrap()
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
            append(&log, seq, seq % 5 != 0, false);
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
    fn a_batch_of_acks_takes_one_record_per_run_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let path = dir.path().join("q");
        let (log, _) = QueueLog::open(path.clone(), 1 << 20, syncer.clone(), 1000).unwrap();
        for seq in 0..20 {
            append(&log, seq, seq != 7, false);
        }
        log.sync();
        // Out of order, with a transient (7) in the middle of a run and a gap at 12.
        let mut batch: Vec<(u64, bool)> = [5, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 1]
            .iter()
            .map(|&seq| (seq, seq != 7))
            .collect();
        log.remove_all(&mut batch);
        // Not fsync'd: dropping the log writes what it buffered. The fsync thread may still hold
        // the log from the appends' group commit; stopping it (it drains its batch first) makes
        // this drop the last reference, so the test does not race it.
        syncer.stop();
        drop(log);
        let mut acks = Vec::new();
        for entry in fs::read_dir(&path).unwrap() {
            let bytes = fs::read(entry.unwrap().path()).unwrap();
            let (records, _, _) = record::scan(&bytes);
            acks.extend(records.into_iter().filter_map(|(_, r)| match r {
                Record::Message(_) => None,
                Record::Ack(seq) => Some(Record::Ack(seq)),
                Record::Gone(from, to) => Some(Record::Gone(from, to)),
            }));
        }
        assert_eq!(
            acks,
            vec![
                Record::Ack(1),
                Record::Gone(3, 6),
                Record::Gone(8, 11),
                Record::Gone(13, 14),
            ]
        );
        let syncer = Syncer::start();
        let (_log, rec) = QueueLog::open(path, 1 << 20, syncer.clone(), 1000).unwrap();
        assert_eq!(seqs(&rec), vec![0, 2, 12, 15, 16, 17, 18, 19]);
        syncer.stop();
    }

    #[test]
    fn recovered_messages_are_the_ones_written() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let path = dir.path().join("q");
        let (log, _) = QueueLog::open(path.clone(), 1 << 20, syncer.clone(), 1000).unwrap();
        let properties = AMQPProperties::default()
            .with_delivery_mode(2)
            .with_priority(3)
            .with_expiration("9000".into());
        let message = Message::new(
            "ex".into(),
            "a.b".into(),
            properties,
            bytes::Bytes::from_static(b"kept"),
        );
        log.append_message(0, 1_234, &message, false, None).unwrap();
        log.sync();
        drop(log);
        let (_log, rec) = QueueLog::open(path, 1 << 20, syncer.clone(), 1000).unwrap();
        assert_eq!(rec.messages.len(), 1);
        assert_eq!(rec.messages[0].expires_at_ms, 1_234);
        assert_eq!(rec.messages[0].message, message);
        syncer.stop();
    }

    #[test]
    fn a_corrupt_record_in_an_older_segment_is_reported_and_the_rest_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let path = dir.path().join("q");
        let (log, _) = QueueLog::open(path.clone(), 300, syncer.clone(), 1000).unwrap();
        for seq in 0..30 {
            append(&log, seq, true, false);
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
        let (offset, hit_seq) = (offset, hit.seq);
        bytes[offset as usize + 20] ^= 0x5A;
        fs::write(&victim, &bytes).unwrap();

        let (_log, rec) = QueueLog::open(path.clone(), 300, syncer.clone(), 1000).unwrap();
        let expected: Vec<u64> = (0..30).filter(|s| *s != hit_seq).collect();
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
        let first = append(&log, 0, false, true);
        for seq in 1..50 {
            append(&log, seq, seq % 2 == 0, true);
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
