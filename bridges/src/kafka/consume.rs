//! Subscriptions: one consumer, in the consumer group `<group_prefix><topic>`, per queue
//! mapping.
//!
//! - Offsets are never committed automatically (`enable.auto.commit=false`,
//!   `enable.auto.offset.store=false`). Each partition tracks the offsets received and not yet
//!   settled; the offset committed is the lowest of those (everything below it is settled), or
//!   the one after the last received when none is open. So a message that was never
//!   acknowledged is read again by whichever consumer owns its partition next (a restarted
//!   Warren, another instance), together with the settled messages after it (at least once).
//!   Commits go out every 200 ms while positions move, synchronously on a revocation and when
//!   the subscription ends.
//! - At most `prefetch` messages are handed out and unsettled. Records the client has no credit
//!   for wait in a buffer; once `prefetch` of them wait, the assigned partitions are paused
//!   (the consumer keeps polling, so its group membership and rebalances go on) and resumed
//!   when the buffer drains.
//! - Rebalances: on a revocation the settled prefix of each revoked partition is committed and
//!   the partition's tracking is dropped; its messages still in flight (held by AMQP clients,
//!   buffered or requeued) are tied to the old assignment's generation, so settling them later
//!   commits nothing and a requeued one is not delivered again here: the partition's new owner
//!   reads them from the committed offset.
//!
//! | `Settlement` | Kafka                                                                 |
//! |--------------|-----------------------------------------------------------------------|
//! | `Ack`        | the offset is settled; committed once every lower one is              |
//! | `Requeue`    | delivered again by the subscription (`redelivered` set), still holding back the commit |
//! | `Reject`     | settled like `Ack` (Kafka has no per-record negative acknowledgement; the record is skipped, with a log line) |

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use warren_backends::{BackendError, Incoming, Message, Settle, Settlement, Subscription};

use super::{log_line, mapping, Shared};
use crate::retry::backoff_delay;

/// How often moved positions are committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// One assigned partition's open offsets.
#[derive(Debug)]
struct Track {
    /// The assignment this tracking belongs to; settles of older generations are ignored.
    generation: u64,
    /// Offsets received (buffered, handed out or requeued) and not settled.
    open: BTreeSet<i64>,
    /// One past the highest offset received; `None` before the first record.
    next: Option<i64>,
    /// The last position committed (or sent to be).
    committed: Option<i64>,
}

impl Track {
    fn new(generation: u64) -> Track {
        Track {
            generation,
            open: BTreeSet::new(),
            next: None,
            committed: None,
        }
    }

    /// The position to commit: the lowest open offset, or one past the last received.
    fn position(&self) -> Option<i64> {
        self.open.first().copied().or(self.next)
    }

    /// The position, when it moved past the last commit.
    fn to_commit(&self) -> Option<i64> {
        let pos = self.position()?;
        match self.committed {
            Some(c) if c >= pos => None,
            _ => Some(pos),
        }
    }
}

/// Offsets state shared by the subscription, its settle handles, the committer and the
/// rebalance callback.
struct Tracking {
    topic: String,
    partitions: Mutex<HashMap<i32, Track>>,
    generation: AtomicU64,
}

impl Tracking {
    /// The partitions whose position moved, as a commit list (and marked committed).
    fn take_commits(&self, only: Option<&[i32]>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let mut parts = self.partitions.lock();
        for (p, t) in parts.iter_mut() {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            if let Some(pos) = t.to_commit() {
                t.committed = Some(pos);
                // A position just added cannot be refused: the partition is valid.
                let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(pos));
            }
        }
        tpl
    }
}

/// The consumer's callbacks: rebalances, commit results, logs.
struct ConsumerCtx {
    shared: Arc<Shared>,
    tracking: Arc<Tracking>,
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(&self.shared.name, level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(backend = %self.shared.name, topic = %self.tracking.topic, %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let commits = self.tracking.take_commits(Some(&revoked));
                let mut in_flight = 0;
                {
                    let mut parts = self.tracking.partitions.lock();
                    for p in &revoked {
                        if let Some(t) = parts.remove(p) {
                            in_flight += t.open.len();
                        }
                    }
                }
                if commits.count() > 0 {
                    if let Err(e) = base.commit(&commits, CommitMode::Sync) {
                        tracing::warn!(backend = %self.shared.name, topic = %self.tracking.topic, %e, "kafka: commit on revocation failed (the new owner reads those records again)");
                    } else {
                        self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tracing::info!(backend = %self.shared.name, topic = %self.tracking.topic, partitions = ?revoked, in_flight, "kafka: partitions revoked; their unsettled messages are left to the next owner");
            }
            Rebalance::Assign(tpl) => {
                let generation = self.tracking.generation.fetch_add(1, Ordering::AcqRel) + 1;
                let mut parts = self.tracking.partitions.lock();
                let assigned: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for p in &assigned {
                    parts.insert(*p, Track::new(generation));
                }
                tracing::info!(backend = %self.shared.name, topic = %self.tracking.topic, partitions = ?assigned, "kafka: partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(backend = %self.shared.name, topic = %self.tracking.topic, error = %e, "kafka: rebalance error");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(backend = %self.shared.name, topic = %self.tracking.topic, %e, "kafka: offset commit failed; retried");
            // Forget the position so the committer sends it again.
            let mut parts = self.tracking.partitions.lock();
            for elem in offsets.elements() {
                if let (Some(t), Offset::Offset(o)) =
                    (parts.get_mut(&elem.partition()), elem.offset())
                {
                    if t.committed == Some(o) {
                        t.committed = None;
                    }
                }
            }
        }
    }
}

type KafkaConsumer = StreamConsumer<ConsumerCtx>;

/// A record received and not settled yet.
struct Held {
    partition: i32,
    offset: i64,
    generation: u64,
    message: Message,
}

pub(super) struct KafkaSubscription {
    shared: Arc<Shared>,
    consumer: Arc<KafkaConsumer>,
    tracking: Arc<Tracking>,
    credit: Arc<Semaphore>,
    /// A permit taken while no message was ready.
    held_permit: Option<OwnedSemaphorePermit>,
    /// Received, not handed out yet.
    buffer: VecDeque<Held>,
    /// Requeued by the client, to be handed out again first.
    requeued: VecDeque<Held>,
    requeue_tx: mpsc::UnboundedSender<Held>,
    requeue_rx: mpsc::UnboundedReceiver<Held>,
    limit: usize,
    paused: bool,
    failures: u32,
    closed: watch::Receiver<bool>,
    committer: JoinHandle<()>,
}

impl KafkaSubscription {
    pub(super) fn start(
        shared: Arc<Shared>,
        topic: &str,
        prefetch: u16,
    ) -> Result<KafkaSubscription, BackendError> {
        let tracking = Arc::new(Tracking {
            topic: topic.to_string(),
            partitions: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        });
        let cfg = &shared.config;
        let mut c = shared.base_config();
        c.set("group.id", format!("{}{topic}", cfg.group_prefix))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &cfg.auto_offset_reset)
            .set("enable.partition.eof", "false");
        shared.apply_options(&mut c);
        let ctx = ConsumerCtx {
            shared: shared.clone(),
            tracking: tracking.clone(),
        };
        let consumer: KafkaConsumer = c
            .create_with_context(ctx)
            .map_err(|e| shared.connect_error(format!("librdkafka consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| shared.connect_error(format!("subscribe to {topic}: {e}")))?;
        let consumer = Arc::new(consumer);
        let committer = shared.runtime.spawn(commit_loop(
            shared.clone(),
            consumer.clone(),
            tracking.clone(),
        ));
        let (requeue_tx, requeue_rx) = mpsc::unbounded_channel();
        let prefetch = usize::from(prefetch.max(1));
        tracing::info!(backend = %shared.name, topic, group = %format!("{}{topic}", cfg.group_prefix), prefetch, "kafka: subscribed");
        Ok(KafkaSubscription {
            closed: shared.closed.subscribe(),
            shared,
            consumer,
            tracking,
            credit: Arc::new(Semaphore::new(prefetch)),
            held_permit: None,
            buffer: VecDeque::new(),
            requeued: VecDeque::new(),
            requeue_tx,
            requeue_rx,
            limit: prefetch,
            paused: false,
            failures: 0,
            committer,
        })
    }

    fn current(&self, h: &Held) -> bool {
        self.tracking
            .partitions
            .lock()
            .get(&h.partition)
            .is_some_and(|t| t.generation == h.generation)
    }

    /// The next message ready to hand out: requeued first, then buffered; ones of revoked
    /// partitions are dropped.
    fn pop_ready(&mut self) -> Option<(Held, bool)> {
        while let Some(h) = self.requeued.pop_front() {
            if self.current(&h) {
                return Some((h, true));
            }
        }
        while let Some(h) = self.buffer.pop_front() {
            if self.current(&h) {
                return Some((h, false));
            }
        }
        None
    }

    /// Registers a received record as open on its partition and buffers it.
    fn receive(&mut self, record: &BorrowedMessage<'_>) {
        let partition = record.partition();
        let offset = record.offset();
        let generation = {
            let mut parts = self.tracking.partitions.lock();
            let generation = self.tracking.generation.load(Ordering::Acquire);
            let t = parts
                .entry(partition)
                .or_insert_with(|| Track::new(generation));
            t.open.insert(offset);
            t.next = Some(t.next.map_or(offset + 1, |n| n.max(offset + 1)));
            t.generation
        };
        self.buffer.push_back(Held {
            partition,
            offset,
            generation,
            message: mapping::from_record(record),
        });
        if self.buffer.len() >= self.limit && !self.paused {
            self.set_paused(true);
        }
    }

    fn set_paused(&mut self, pause: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(backend = %self.shared.name, %e, "kafka: no assignment to pause/resume");
                return;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => self.paused = pause,
            Err(e) => {
                tracing::warn!(backend = %self.shared.name, %e, pause, "kafka: pause/resume failed")
            }
        }
    }

    fn incoming(
        &mut self,
        held: Held,
        redelivered: bool,
        permit: OwnedSemaphorePermit,
    ) -> Incoming {
        if self.paused && self.buffer.len() <= self.limit / 2 {
            self.set_paused(false);
        }
        let message = held.message.clone();
        Incoming {
            message,
            redelivered,
            settle: Box::new(KafkaSettle {
                tracking: self.tracking.clone(),
                requeue: self.requeue_tx.clone(),
                held: Mutex::new(Some((held, permit))),
                backend: self.shared.name.clone(),
            }),
        }
    }
}

enum Event<'a> {
    Closed,
    Requeued(Held),
    Permit(OwnedSemaphorePermit),
    Record(BorrowedMessage<'a>),
    Error(rdkafka::error::KafkaError),
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            if *self.closed.borrow() {
                return None;
            }
            // Requeued messages go first: take the ones settled since the last call.
            while let Ok(h) = self.requeue_rx.try_recv() {
                self.requeued.push_back(h);
            }
            if self.held_permit.is_none() {
                self.held_permit = self.credit.clone().try_acquire_owned().ok();
            }
            if let Some(permit) = self.held_permit.take() {
                if let Some((held, redelivered)) = self.pop_ready() {
                    return Some(self.incoming(held, redelivered, permit));
                }
                self.held_permit = Some(permit);
            }
            let want_permit = self.held_permit.is_none();
            let consumer = self.consumer.clone();
            let credit = self.credit.clone();
            let event = tokio::select! {
                biased;
                _ = self.closed.changed() => Event::Closed,
                Some(h) = self.requeue_rx.recv() => Event::Requeued(h),
                p = credit.acquire_owned(), if want_permit => match p {
                    Ok(p) => Event::Permit(p),
                    Err(_) => Event::Closed,
                },
                r = consumer.recv() => match r {
                    Ok(m) => Event::Record(m),
                    Err(e) => Event::Error(e),
                },
            };
            match event {
                Event::Closed => {}
                Event::Requeued(h) => self.requeued.push_back(h),
                Event::Permit(p) => self.held_permit = Some(p),
                Event::Record(m) => {
                    self.failures = 0;
                    self.receive(&m);
                }
                Event::Error(e) => {
                    self.failures += 1;
                    let delay = backoff_delay(&self.shared.config.retry, self.failures);
                    tracing::warn!(backend = %self.shared.name, topic = %self.tracking.topic, error = %e, retry_in_ms = delay.as_millis() as u64, "kafka: consume error");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl Drop for KafkaSubscription {
    /// Commits the settled prefix and closes the consumer (leaving the group) off the runtime's
    /// threads: both wait for the broker.
    fn drop(&mut self) {
        self.committer.abort();
        let consumer = self.consumer.clone();
        let tracking = self.tracking.clone();
        let shared = self.shared.clone();
        self.shared.runtime.spawn_blocking(move || {
            let commits = tracking.take_commits(None);
            if commits.count() > 0 {
                match consumer.commit(&commits, CommitMode::Sync) {
                    Ok(()) => {
                        shared.stats.commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(backend = %shared.name, topic = %tracking.topic, %e, "kafka: final commit failed")
                    }
                }
            }
            consumer.unsubscribe();
            drop(consumer);
        });
    }
}

/// Commits moved positions every [`COMMIT_INTERVAL`].
async fn commit_loop(shared: Arc<Shared>, consumer: Arc<KafkaConsumer>, tracking: Arc<Tracking>) {
    let mut tick = tokio::time::interval(COMMIT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.is_closed() {
            return;
        }
        let commits = tracking.take_commits(None);
        if commits.count() == 0 {
            continue;
        }
        match consumer.commit(&commits, CommitMode::Async) {
            Ok(()) => {
                shared.stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(backend = %shared.name, topic = %tracking.topic, %e, "kafka: commit failed; retried");
                let mut parts = tracking.partitions.lock();
                for elem in commits.elements() {
                    if let Some(t) = parts.get_mut(&elem.partition()) {
                        t.committed = None;
                    }
                }
            }
        }
    }
}

/// Settles one received record.
struct KafkaSettle {
    tracking: Arc<Tracking>,
    requeue: mpsc::UnboundedSender<Held>,
    held: Mutex<Option<(Held, OwnedSemaphorePermit)>>,
    backend: String,
}

impl Settle for KafkaSettle {
    fn settle(&self, outcome: Settlement) {
        let Some((held, permit)) = self.held.lock().take() else {
            return;
        };
        // The credit comes back whatever the outcome: a requeued message is handed out again
        // under a new permit.
        drop(permit);
        let mut parts = self.tracking.partitions.lock();
        let Some(track) = parts
            .get_mut(&held.partition)
            .filter(|t| t.generation == held.generation)
        else {
            // The partition was revoked since: its new owner reads the record again.
            return;
        };
        match outcome {
            Settlement::Ack => {
                track.open.remove(&held.offset);
            }
            Settlement::Reject => {
                tracing::info!(backend = %self.backend, topic = %self.tracking.topic, partition = held.partition, offset = held.offset, "kafka: record rejected by the client; skipped");
                track.open.remove(&held.offset);
            }
            Settlement::Requeue => {
                drop(parts);
                // The subscription is gone when this fails: the record stays open (never
                // committed) and comes back to the next consumer of its partition.
                let _ = self.requeue.send(held);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_is_the_lowest_open_offset() {
        let mut t = Track::new(1);
        assert_eq!(t.to_commit(), None);
        for o in 10..15 {
            t.open.insert(o);
        }
        t.next = Some(15);
        assert_eq!(t.to_commit(), Some(10));
        t.committed = Some(10);
        // 11 and 13 settled: 10 still holds the position back.
        t.open.remove(&11);
        t.open.remove(&13);
        assert_eq!(t.to_commit(), None);
        t.open.remove(&10);
        assert_eq!(t.to_commit(), Some(12));
        t.committed = Some(12);
        t.open.remove(&12);
        t.open.remove(&14);
        assert_eq!(t.to_commit(), Some(15));
    }
}
