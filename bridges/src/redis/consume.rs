//! Subscriptions: a consumer (`consumer`, fixed by configuration) in a consumer group
//! (`group`) of the source stream.
//!
//! - The group is created at the stream's start (`XGROUP CREATE key group 0 MKSTREAM`) when
//!   missing, so entries added before Warren first subscribed are delivered too.
//! - New entries: `XREADGROUP GROUP g c COUNT <free credit> BLOCK block_ms STREAMS key >` on the
//!   subscription's own connection. At most `prefetch` entries are unsettled at once.
//! - At start, this consumer's own pending entries (read by a previous run and never
//!   acknowledged) are claimed again and delivered first, with `redelivered` set.
//! - Every `claim_idle_ms`, `XAUTOCLAIM` takes over entries pending for that long at any
//!   consumer of the group (a dead Warren with another consumer name), except those this
//!   subscription is still holding.
//!
//! Settling:
//!
//! | `Settlement` | Redis                                                                   |
//! |--------------|-------------------------------------------------------------------------|
//! | `Ack`        | `XACK`                                                                  |
//! | `Requeue`    | stays pending; claimed again at once (`XCLAIM`, which counts a delivery) and delivered again with `redelivered` |
//! | `Reject`     | `MULTI; XADD dead_letter_stream * <fields> h.x-dead-letter-*; XACK; EXEC`, or `XACK` alone without a dead-letter stream |
//!
//! An entry whose delivery count (XPENDING's `times_delivered`) exceeds `max_deliveries` when
//! it is about to be delivered again is dead-lettered as a rejected one is, with
//! `h.x-dead-letter-reason = max_deliveries`. An XACK lost with a connection leaves the entry
//! pending: it is reclaimed after `claim_idle_ms` and delivered again (at least once).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimReply, StreamClaimReply, StreamId, StreamPendingCountReply, StreamReadReply,
};
use redis::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use warren_backends::{Incoming, Settle, Settlement, Subscription};

use super::{backoff_delay, engine, mapping, Shared, CONNECTION_WAIT};

/// Entries taken per XAUTOCLAIM / history pass at most.
const CLAIM_COUNT: usize = 100;

pub(super) struct RedisSubscription {
    shared: Arc<Shared>,
    stream: String,
    /// The blocking-read connection and whether the group exists.
    conn: Option<MultiplexedConnection>,
    /// Entries read but not handed out yet (they are pending at this consumer; if the
    /// subscription is dropped they come back through the history pass or XAUTOCLAIM).
    buffer: VecDeque<(StreamId, bool)>,
    credit: Arc<Semaphore>,
    /// Entry IDs handed out and not settled yet.
    outstanding: Arc<Mutex<HashSet<String>>>,
    requeue_tx: mpsc::UnboundedSender<String>,
    requeue_rx: mpsc::UnboundedReceiver<String>,
    history_done: bool,
    last_claim: Instant,
    failures: u32,
}

impl RedisSubscription {
    pub(super) fn new(shared: Arc<Shared>, source: &str, prefetch: u16) -> RedisSubscription {
        let (requeue_tx, requeue_rx) = mpsc::unbounded_channel();
        let prefetch = prefetch.max(1);
        RedisSubscription {
            shared,
            stream: source.to_string(),
            conn: None,
            buffer: VecDeque::new(),
            credit: Arc::new(Semaphore::new(usize::from(prefetch))),
            outstanding: Arc::new(Mutex::new(HashSet::new())),
            requeue_tx,
            requeue_rx,
            history_done: false,
            last_claim: Instant::now(),
            failures: 0,
        }
    }

    fn cfg(&self) -> &warren_config::file::RedisBackend {
        &self.shared.config
    }

    async fn setup(&mut self) -> Result<MultiplexedConnection, redis::RedisError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let timeout = Duration::from_millis(self.cfg().block_ms) + Duration::from_secs(5);
        let mut conn = engine::connect(&self.shared, timeout).await?;
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.cfg().group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Fills `buffer`: requeued entries, then (once) this consumer's old pending entries, then
    /// idle entries of any consumer, then new entries.
    async fn fill(&mut self) -> Result<(), redis::RedisError> {
        let mut conn = self.setup().await?;
        let mut requeued = Vec::new();
        while let Ok(id) = self.requeue_rx.try_recv() {
            requeued.push(id);
        }
        if !requeued.is_empty() {
            self.claim(&mut conn, requeued).await?;
        }
        if !self.history_done {
            let reply: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.cfg().group)
                .arg("-")
                .arg("+")
                .arg(10_000)
                .arg(&self.cfg().consumer)
                .query_async(&mut conn)
                .await?;
            let ids: Vec<String> = reply.ids.into_iter().map(|p| p.id).collect();
            if !ids.is_empty() {
                tracing::info!(backend = %self.shared.name, stream = %self.stream, entries = ids.len(), "redis bridge: delivering this consumer's pending entries again");
            }
            for chunk in ids.chunks(CLAIM_COUNT) {
                self.claim(&mut conn, chunk.to_vec()).await?;
            }
            self.history_done = true;
        }
        if self.last_claim.elapsed() >= Duration::from_millis(self.cfg().claim_idle_ms) {
            self.last_claim = Instant::now();
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.cfg().group)
                .arg(&self.cfg().consumer)
                .arg(self.cfg().claim_idle_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(CLAIM_COUNT)
                .query_async(&mut conn)
                .await?;
            let held = self.held();
            let claimed: Vec<StreamId> = reply
                .claimed
                .into_iter()
                .filter(|e| !held.contains(&e.id))
                .collect();
            if !claimed.is_empty() {
                tracing::info!(backend = %self.shared.name, stream = %self.stream, entries = claimed.len(), "redis bridge: reclaimed idle pending entries");
                self.deliver_claimed(&mut conn, claimed).await?;
            }
        }
        if !self.buffer.is_empty() {
            return Ok(());
        }
        let count = self.credit.available_permits().max(1);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.cfg().group)
            .arg(&self.cfg().consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(self.cfg().block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        if let Some(reply) = reply {
            for key in reply.keys {
                for entry in key.ids {
                    self.buffer.push_back((entry, false));
                }
            }
        }
        Ok(())
    }

    /// IDs outstanding or buffered here.
    fn held(&self) -> HashSet<String> {
        let mut held = self.outstanding.lock().clone();
        held.extend(self.buffer.iter().map(|(e, _)| e.id.clone()));
        held
    }

    /// XCLAIMs `ids` to this consumer (counting a delivery) and buffers them, or dead-letters
    /// those delivered too often.
    async fn claim(
        &mut self,
        conn: &mut MultiplexedConnection,
        ids: Vec<String>,
    ) -> Result<(), redis::RedisError> {
        let held = self.held();
        let ids: Vec<String> = ids.into_iter().filter(|id| !held.contains(id)).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let reply: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(&self.cfg().group)
            .arg(&self.cfg().consumer)
            .arg(0)
            .arg(&ids)
            .query_async(conn)
            .await?;
        self.deliver_claimed(conn, reply.ids).await
    }

    async fn deliver_claimed(
        &mut self,
        conn: &mut MultiplexedConnection,
        entries: Vec<StreamId>,
    ) -> Result<(), redis::RedisError> {
        if entries.is_empty() {
            return Ok(());
        }
        let counts = self.delivery_counts(conn, &entries).await?;
        for entry in entries {
            let times = counts.get(&entry.id).copied().unwrap_or(1);
            if times > self.cfg().max_deliveries as usize {
                tracing::warn!(backend = %self.shared.name, stream = %self.stream, id = %entry.id, times, "redis bridge: entry delivered too often, dead-lettering it");
                let fields = entry_fields(&entry);
                dead_letter(
                    &self.shared,
                    conn,
                    &self.stream,
                    &entry.id,
                    &fields,
                    "max_deliveries",
                )
                .await?;
            } else {
                self.buffer.push_back((entry, true));
            }
        }
        Ok(())
    }

    /// `times_delivered` of each of `entries` (this consumer's pending range).
    async fn delivery_counts(
        &self,
        conn: &mut MultiplexedConnection,
        entries: &[StreamId],
    ) -> Result<HashMap<String, usize>, redis::RedisError> {
        let mut out = HashMap::new();
        for entry in entries {
            let reply: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.cfg().group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .query_async(conn)
                .await?;
            for p in reply.ids {
                out.insert(p.id, p.times_delivered);
            }
        }
        Ok(out)
    }
}

/// An entry's fields as `(name, bytes)`, non-byte values (never written by Redis) skipped.
fn entry_fields(entry: &StreamId) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = entry
        .map
        .iter()
        .filter_map(|(k, v)| match v {
            Value::BulkString(b) => Some((k.clone(), b.clone())),
            Value::SimpleString(s) => Some((k.clone(), s.clone().into_bytes())),
            _ => None,
        })
        .collect();
    // The map has no order; `body` first keeps dead-letter entries readable.
    fields.sort_by(|a, b| (a.0 != "body", &a.0).cmp(&(b.0 != "body", &b.0)));
    fields
}

/// Moves an entry to the dead-letter stream (or only acknowledges it when there is none),
/// atomically.
async fn dead_letter(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    stream: &str,
    id: &str,
    fields: &[(String, Vec<u8>)],
    reason: &str,
) -> Result<(), redis::RedisError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    if let Some(dlq) = &shared.config.dead_letter_stream {
        let cmd = pipe.cmd("XADD").arg(dlq);
        if let Some(maxlen) = shared.config.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        cmd.arg("*");
        for (k, v) in fields {
            if k.starts_with("h.x-dead-letter-") {
                continue;
            }
            cmd.arg(k).arg(v.as_slice());
        }
        cmd.arg("h.x-dead-letter-stream")
            .arg(stream)
            .arg("h.x-dead-letter-id")
            .arg(id)
            .arg("h.x-dead-letter-reason")
            .arg(reason)
            .ignore();
    }
    pipe.cmd("XACK")
        .arg(stream)
        .arg(&shared.config.group)
        .arg(id)
        .ignore();
    pipe.query_async::<()>(conn).await?;
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Option<Incoming> {
        let mut closed = self.shared.closed.subscribe();
        // One credit per message handed out, returned when it is settled.
        let permit: OwnedSemaphorePermit = tokio::select! {
            p = self.credit.clone().acquire_owned() => p.ok()?,
            _ = closed.wait_for(|c| *c) => return None,
        };
        loop {
            if self.shared.is_closed() {
                return None;
            }
            if let Some((entry, redelivered)) = self.buffer.pop_front() {
                let fields = entry_fields(&entry);
                let message = mapping::from_fields(
                    &self.stream,
                    fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                );
                self.outstanding.lock().insert(entry.id.clone());
                let settle = RedisSettle {
                    shared: self.shared.clone(),
                    stream: self.stream.clone(),
                    id: entry.id,
                    fields,
                    outstanding: self.outstanding.clone(),
                    requeue: self.requeue_tx.clone(),
                    permit: Mutex::new(Some(permit)),
                    settled: AtomicBool::new(false),
                };
                return Some(Incoming {
                    message,
                    redelivered,
                    settle: Box::new(settle),
                });
            }
            let result = tokio::select! {
                r = self.fill() => r,
                _ = closed.wait_for(|c| *c) => return None,
            };
            match result {
                Ok(()) => self.failures = 0,
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(backend = %self.shared.name, stream = %self.stream, error = %e, "redis bridge subscription failed; retrying");
                    self.conn = None;
                    let delay = backoff_delay(self.shared.retry(), self.failures);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closed.wait_for(|c| *c) => return None,
                    }
                }
            }
        }
    }
}

struct RedisSettle {
    shared: Arc<Shared>,
    stream: String,
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    outstanding: Arc<Mutex<HashSet<String>>>,
    requeue: mpsc::UnboundedSender<String>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    settled: AtomicBool,
}

impl RedisSettle {
    fn finish(&self, outcome: Settlement) {
        let permit = self.permit.lock().take();
        let shared = self.shared.clone();
        let stream = self.stream.clone();
        let id = self.id.clone();
        let outstanding = self.outstanding.clone();
        match outcome {
            Settlement::Requeue => {
                outstanding.lock().remove(&id);
                // The subscription claims it again on its next read; if the subscription is
                // gone, it stays pending and is reclaimed later.
                let _ = self.requeue.send(id);
                drop(permit);
            }
            Settlement::Ack | Settlement::Reject => {
                let fields = if outcome == Settlement::Reject {
                    Some(self.fields.clone())
                } else {
                    None
                };
                self.shared.runtime.spawn(async move {
                    let result = async {
                        let mut conn = shared
                            .wait_connection(CONNECTION_WAIT)
                            .await
                            .map_err(|e| e.to_string())?;
                        let r = match &fields {
                            None => redis::cmd("XACK")
                                .arg(&stream)
                                .arg(&shared.config.group)
                                .arg(&id)
                                .query_async::<()>(&mut conn)
                                .await,
                            Some(fields) => {
                                dead_letter(&shared, &mut conn, &stream, &id, fields, "rejected")
                                    .await
                            }
                        };
                        r.map_err(|e| {
                            shared.connection_failed(&e);
                            e.to_string()
                        })
                    }
                    .await;
                    if let Err(e) = result {
                        tracing::warn!(backend = %shared.name, %stream, %id, error = %e, "redis bridge: settling failed; the entry stays pending and will be delivered again");
                    }
                    outstanding.lock().remove(&id);
                    drop(permit);
                });
            }
        }
    }
}

impl Settle for RedisSettle {
    fn settle(&self, outcome: Settlement) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.finish(outcome);
        }
    }
}

impl Drop for RedisSettle {
    fn drop(&mut self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.finish(Settlement::Requeue);
        }
    }
}
