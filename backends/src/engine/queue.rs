//! A queue: ready messages in order (per priority), the consumers they are offered to in turn,
//! and the timers that expire messages and the queue itself.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amq_protocol::types::{FieldTable, ShortString};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::args::{Overflow, QueueArgs};
use super::dead_letter::{dead_letter, is_cycle, DeathReason};
use super::deadline::Deadline;
use super::ready::ReadyList;
use super::{ConnectionId, EngineError, VHost};
use crate::backend::{Settle, Settlement};
use crate::store::{Guard, LoggedMessage, Position, QueueLog, Recovered};
use crate::Message;

/// A message as a queue holds it: the shared message plus its place in this queue.
#[derive(Clone)]
pub struct QueuedMessage {
    /// Position in this queue; a requeued message goes back to its position by this number.
    pub seq: u64,
    pub message: Message,
    pub redelivered: bool,
    /// The message has a record in the queue's log that must be acknowledged when it goes.
    pub logged: bool,
    /// When the message expires while ready (the smaller of x-message-ttl and `expiration`).
    deadline: Option<Deadline>,
    /// A message received from a bridged target (a queue mapping): settled there when it
    /// leaves this queue. Boxed: a thin pointer, since most queues never hold one.
    pub remote: Option<Box<Arc<dyn Settle>>>,
}

impl QueuedMessage {
    pub fn new(seq: u64, message: Message, expires_at: Option<Instant>) -> QueuedMessage {
        QueuedMessage {
            seq,
            message,
            redelivered: false,
            logged: false,
            deadline: expires_at.map(Deadline::at),
            remote: None,
        }
    }

    pub fn expires_at(&self) -> Option<Instant> {
        self.deadline.map(Deadline::instant)
    }
}

impl std::fmt::Debug for QueuedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedMessage")
            .field("seq", &self.seq)
            .field("redelivered", &self.redelivered)
            .field("logged", &self.logged)
            .field("remote", &self.remote.is_some())
            .finish()
    }
}

/// A consumer's answer to a message offered to it.
pub enum Offer {
    /// The consumer will acknowledge (or requeue, or reject) the message later.
    Taken,
    /// The consumer took the message and will never acknowledge it (no-ack): it is gone.
    Settled(QueuedMessage),
    /// No credit (prefetch) or no room on its connection right now; the consumer will ask the
    /// queue to dispatch again when that changes.
    Refused(QueuedMessage),
}

/// Whatever receives a queue's messages: the gateway's AMQP consumers, later bridges.
pub trait Consumer: Send + Sync {
    fn tag(&self) -> &str;
    fn exclusive(&self) -> bool;
    /// `x-priority` of basic.consume: higher-priority consumers are offered messages first.
    fn priority(&self) -> i32 {
        0
    }
    /// Offers one message. Called with the queue's lock held: must not call back into the queue.
    fn offer(&self, queue: &Arc<Queue>, message: QueuedMessage) -> Offer;
    /// The queue was deleted while this consumer was attached.
    fn queue_deleted(&self, queue: &Arc<Queue>);
}

/// Whether a queue took a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    Accepted,
    /// Refused by `x-overflow: reject-publish(-dlx)`: the publisher gets basic.nack.
    Rejected,
}

#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    pub durable: bool,
    /// The connection that owns an exclusive queue.
    pub exclusive: Option<ConnectionId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

pub struct Queue {
    name: ShortString,
    vhost_name: ShortString,
    vhost: Weak<VHost>,
    options: QueueOptions,
    args: QueueArgs,
    state: Mutex<QueueState>,
    /// Wakes the timer task when an earlier deadline appears.
    timer: Arc<Notify>,
    /// Fed from a bridged backend by a queue mapping.
    mapped: std::sync::atomic::AtomicBool,
    /// The durable queue's directory number and log; `None` for transient queues.
    store_id: Option<u64>,
    log: Option<Arc<QueueLog>>,
    /// Ready messages kept in memory before further ones page out to the log.
    memory_messages: usize,
    memory_bytes: usize,
    /// Flow control: set while consumers are attached but the ready backlog keeps growing, so
    /// publishers pause (as RabbitMQ's credit flow does) instead of starving the consumers.
    backlog: std::sync::atomic::AtomicBool,
    flow: Notify,
}

/// Ready messages above which a queue with consumers asks its publishers to slow down, and
/// below which it lets them go again.
const FLOW_HIGH: usize = 20_000;
const FLOW_LOW: usize = 10_000;

/// Messages of a durable queue that live only in its log until the in-memory part drains.
#[derive(Debug, Default)]
struct Paged {
    count: u64,
    bytes: u64,
    /// Where the first paged message's record starts.
    cursor: Option<Position>,
    /// Sequence numbers of the paged messages run from here up to `next_seq - 1`.
    first_seq: u64,
    /// Messages recovered at start-up are redelivered ones.
    redelivered_below: u64,
}

struct QueueState {
    ready: ReadyList,
    next_seq: u64,
    /// In offer order: by consumer priority, then registration (single active consumer: in
    /// registration order only).
    consumers: Vec<Arc<dyn Consumer>>,
    /// Round-robin position among consumers of equal priority.
    cursor: usize,
    had_consumer: bool,
    deleted: bool,
    /// Deadlines of ready messages that expire, earliest first. Entries of messages delivered in
    /// the meantime are skipped when they come up.
    expiries: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_running: bool,
    /// Last time the queue was used, for x-expires.
    last_used: Instant,
    paged: Paged,
}

/// What removing a consumer left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerRemoved {
    pub removed: bool,
    /// An auto-delete queue lost its last consumer and must now be deleted.
    pub auto_delete_now: bool,
}

type DeadLetters = Vec<(QueuedMessage, DeathReason)>;

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

fn same_consumer(a: &Arc<dyn Consumer>, b: &Arc<dyn Consumer>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// A durable queue's log and what recovery found in it.
pub struct DurableLog {
    /// The queue's directory number in the store.
    pub id: u64,
    pub log: Arc<QueueLog>,
    pub recovered: Recovered,
    pub memory_messages: usize,
    pub memory_bytes: usize,
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A monotonic deadline as wall-clock milliseconds, for the log.
fn to_unix_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = unix_ms_now();
    if at >= now {
        wall + (at - now).as_millis() as u64
    } else {
        wall.saturating_sub((now - at).as_millis() as u64)
    }
}

fn from_unix_ms(ms: u64) -> Instant {
    let wall = unix_ms_now();
    let now = Instant::now();
    if ms >= wall {
        now + Duration::from_millis(ms - wall)
    } else {
        now.checked_sub(Duration::from_millis(wall - ms))
            .unwrap_or(now)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Queue {
    /// A queue outside any vhost (tests); it cannot dead-letter or expire itself.
    pub fn new(name: ShortString, vhost: ShortString, options: QueueOptions) -> Arc<Queue> {
        let args =
            QueueArgs::parse(&options.arguments, name.as_str(), vhost.as_str()).unwrap_or_default();
        Self::with_args(name, vhost, Weak::new(), options, args)
    }

    pub(crate) fn with_args(
        name: ShortString,
        vhost_name: ShortString,
        vhost: Weak<VHost>,
        options: QueueOptions,
        args: QueueArgs,
    ) -> Arc<Queue> {
        Self::build(name, vhost_name, vhost, options, args, None)
    }

    /// A durable queue over its log, with the messages recovery found in it.
    pub(crate) fn with_log(
        name: ShortString,
        vhost_name: ShortString,
        vhost: Weak<VHost>,
        options: QueueOptions,
        args: QueueArgs,
        durable: DurableLog,
    ) -> Arc<Queue> {
        Self::build(name, vhost_name, vhost, options, args, Some(durable))
    }

    fn build(
        name: ShortString,
        vhost_name: ShortString,
        vhost: Weak<VHost>,
        options: QueueOptions,
        args: QueueArgs,
        durable: Option<DurableLog>,
    ) -> Arc<Queue> {
        let (store_id, log, recovered, memory_messages, memory_bytes) = match durable {
            Some(d) => (
                Some(d.id),
                Some(d.log),
                d.recovered,
                d.memory_messages,
                d.memory_bytes,
            ),
            None => (None, None, Recovered::default(), usize::MAX, usize::MAX),
        };
        let queue = Arc::new(Queue {
            name,
            vhost_name,
            vhost,
            state: Mutex::new(QueueState {
                ready: ReadyList::new(args.max_priority),
                next_seq: 0,
                consumers: Vec::new(),
                cursor: 0,
                had_consumer: false,
                deleted: false,
                expiries: BinaryHeap::new(),
                timer_running: false,
                last_used: Instant::now(),
                paged: Paged::default(),
            }),
            options,
            args,
            timer: Arc::new(Notify::new()),
            mapped: std::sync::atomic::AtomicBool::new(false),
            store_id,
            log,
            memory_messages,
            memory_bytes,
            backlog: std::sync::atomic::AtomicBool::new(false),
            flow: Notify::new(),
        });
        {
            let mut st = queue.state.lock();
            queue.restore(&mut st, recovered);
            if queue.args.expires.is_some() {
                queue.ensure_timer(&mut st);
            }
        }
        queue
    }

    /// Puts recovered messages back, in order and marked redelivered.
    fn restore(self: &Arc<Self>, st: &mut QueueState, recovered: Recovered) {
        st.next_seq = recovered.next_seq;
        let restored = recovered.messages.len();
        for stored in recovered.messages {
            let msg = self.restore_stored(stored, true);
            self.enqueue(st, msg);
        }
        st.paged = Paged {
            count: recovered.paged,
            bytes: recovered.paged_bytes,
            cursor: recovered.cursor,
            first_seq: 0,
            redelivered_below: recovered.next_seq,
        };
        if restored > 0 || recovered.paged > 0 {
            tracing::info!(queue = %self.name, in_memory = restored, paged = recovered.paged, "recovered messages");
        }
    }

    fn restore_stored(&self, stored: LoggedMessage, redelivered: bool) -> QueuedMessage {
        let expires_at = (stored.expires_at_ms != 0).then(|| from_unix_ms(stored.expires_at_ms));
        QueuedMessage {
            seq: stored.seq,
            message: stored.message,
            redelivered,
            deadline: expires_at.map(Deadline::at),
            logged: true,
            remote: None,
        }
    }

    pub fn name(&self) -> &ShortString {
        &self.name
    }

    pub fn options(&self) -> &QueueOptions {
        &self.options
    }

    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Ready messages (not the ones delivered and awaiting an ack), as queue.declare-ok counts.
    pub fn message_count(&self) -> u32 {
        Self::totals(&self.state.lock()).0.min(u32::MAX as u64) as u32
    }

    pub fn consumer_count(&self) -> u32 {
        self.state.lock().consumers.len() as u32
    }

    pub fn counts(&self) -> (u32, u32) {
        let st = self.state.lock();
        let ready = Self::totals(&st).0.min(u32::MAX as u64) as u32;
        (ready, st.consumers.len() as u32)
    }

    pub(crate) fn set_mapped(&self) {
        self.mapped
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_durable(&self) -> bool {
        self.log.is_some()
    }

    pub fn store_id(&self) -> Option<u64> {
        self.store_id
    }

    /// Marks the queue used now (redeclare), for x-expires.
    pub fn touch(&self) {
        self.state.lock().last_used = Instant::now();
    }

    fn expiry_for(&self, message: &Message, now: Instant) -> Option<Instant> {
        let per_message = message.expiration_ms().ok().flatten();
        let ttl = match (self.args.message_ttl, per_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(now + Duration::from_millis(ttl))
    }

    fn is_full(&self, st: &QueueState, incoming: usize) -> bool {
        let (len, bytes) = Self::totals(st);
        self.args.max_length.is_some_and(|max| len >= max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| bytes + incoming as u64 > max)
    }

    /// Enqueues a message and hands it to a consumer if one can take it.
    pub fn publish(self: &Arc<Self>, message: Message) -> PublishOutcome {
        self.publish_with(message, None)
    }

    /// Enqueues a message. A persistent message in a durable queue is logged, and `guard` is
    /// held until its record is fsync'd: the publisher's confirm waits for that.
    pub fn publish_with(
        self: &Arc<Self>,
        message: Message,
        guard: Option<&Guard>,
    ) -> PublishOutcome {
        let now = Instant::now();
        let expires_at = self.expiry_for(&message, now);
        let mut dead = DeadLetters::new();
        let outcome = {
            let mut st = self.state.lock();
            if st.deleted {
                return PublishOutcome::Accepted;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let mut queued = QueuedMessage {
                seq,
                message,
                redelivered: false,
                deadline: expires_at.map(Deadline::at),
                logged: false,
                remote: None,
            };
            let rejecting = matches!(
                self.args.overflow,
                Overflow::RejectPublish | Overflow::RejectPublishDlx
            );
            if rejecting && self.is_full(&st, queued.message.body_len()) {
                if self.args.overflow == Overflow::RejectPublishDlx {
                    dead.push((queued, DeathReason::Maxlen));
                }
                PublishOutcome::Rejected
            } else if expires_at.is_some_and(|t| t <= now)
                && !(st.ready.is_empty() && st.paged.count == 0 && !st.consumers.is_empty())
            {
                // TTL 0 and no consumer waiting for it: expired on arrival. RabbitMQ drops it
                // at publish, so it is never counted (nor logged).
                dead.push((queued, DeathReason::Expired));
                PublishOutcome::Accepted
            } else {
                let page_out = self.should_page(&st);
                let persistent = self.log.is_some() && queued.message.is_persistent();
                let mut paged = false;
                if persistent || page_out {
                    match self.append(&queued, page_out, guard) {
                        Ok(pos) => {
                            queued.logged = true;
                            if page_out {
                                if st.paged.count == 0 {
                                    st.paged.cursor = Some(pos);
                                    st.paged.first_seq = seq;
                                }
                                st.paged.count += 1;
                                st.paged.bytes += queued.message.body_len() as u64;
                                paged = true;
                            }
                        }
                        Err(err) => {
                            tracing::error!(queue = %self.name, %err, "cannot write to the queue log");
                            if let Some(g) = guard.filter(|_| persistent) {
                                g.failed(&err.to_string());
                            }
                        }
                    }
                }
                if paged {
                    self.dispatch_locked(&mut st, &mut dead, now);
                } else if st.ready.is_empty() && st.paged.count == 0 && !st.consumers.is_empty() {
                    if let Some(back) = self.offer_to_consumers(&mut st, queued) {
                        if back.expires_at().is_some_and(|t| t <= now) {
                            // TTL 0 and no consumer could take it now.
                            dead.push((back, DeathReason::Expired));
                        } else {
                            self.enqueue(&mut st, back);
                        }
                    }
                } else {
                    self.enqueue(&mut st, queued);
                    self.dispatch_locked(&mut st, &mut dead, now);
                }
                if self.args.overflow == Overflow::DropHead {
                    while self.over_limit(&st) {
                        if st.ready.is_empty() {
                            self.page_in(&mut st);
                        }
                        match st.ready.pop_front() {
                            Some(m) => dead.push((m, DeathReason::Maxlen)),
                            None => break,
                        }
                    }
                }
                PublishOutcome::Accepted
            }
        };
        self.discard(dead);
        outcome
    }

    /// Whether a new message goes to the log only: the queue is durable, not a priority queue,
    /// and its in-memory part is full (or older messages are paged already, so order holds).
    fn should_page(&self, st: &QueueState) -> bool {
        self.log.is_some()
            && self.args.max_priority == 0
            && (st.paged.count > 0
                || st.ready.len() >= self.memory_messages
                || st.ready.bytes() >= self.memory_bytes)
    }

    fn append(
        &self,
        queued: &QueuedMessage,
        paged: bool,
        guard: Option<&Guard>,
    ) -> std::io::Result<Position> {
        let Some(log) = self.log.as_ref() else {
            return Err(std::io::Error::other("queue has no log"));
        };
        let expires_at_ms = queued.expires_at().map_or(0, to_unix_ms);
        log.append_message(
            queued.seq,
            expires_at_ms,
            &queued.message,
            paged,
            guard.cloned(),
        )
    }

    /// Brings paged messages back into memory once the in-memory part has drained to half.
    fn page_in(self: &Arc<Self>, st: &mut QueueState) {
        if st.paged.count == 0 {
            return;
        }
        let (Some(log), Some(cursor)) = (self.log.as_ref(), st.paged.cursor) else {
            st.paged = Paged::default();
            return;
        };
        let want = (self.memory_messages / 2)
            .max(1)
            .min(st.paged.count as usize);
        match log.read_paged(cursor, want, (self.memory_bytes / 2).max(1)) {
            Ok((messages, next)) if !messages.is_empty() => {
                st.paged.cursor = Some(next);
                for stored in messages {
                    let redelivered = stored.seq < st.paged.redelivered_below;
                    st.paged.count = st.paged.count.saturating_sub(1);
                    st.paged.bytes = st
                        .paged
                        .bytes
                        .saturating_sub(stored.message.body_len() as u64);
                    let msg = self.restore_stored(stored, redelivered);
                    self.enqueue(st, msg);
                }
                if st.paged.count == 0 {
                    st.paged.cursor = None;
                }
            }
            Ok(_) => {
                tracing::error!(queue = %self.name, missing = st.paged.count, "paged messages not found in the log; they stay on disk for the next recovery");
                st.paged = Paged::default();
            }
            Err(err) => {
                tracing::error!(queue = %self.name, %err, "cannot page messages in; they stay on disk for the next recovery");
                st.paged = Paged::default();
            }
        }
    }

    /// The messages left the queue for good: acknowledged in the log.
    fn forget(&self, msg: &QueuedMessage) {
        self.settle_remote(msg, Settlement::Ack);
        if msg.logged {
            if let Some(log) = &self.log {
                log.remove(msg.seq, msg.message.is_persistent());
            }
        }
    }

    fn settle_remote(&self, msg: &QueuedMessage, outcome: Settlement) {
        if let Some(remote) = &msg.remote {
            remote.settle(outcome);
        }
    }

    /// A message received from a bridged target through a queue mapping.
    pub fn publish_remote(
        self: &Arc<Self>,
        message: Message,
        redelivered: bool,
        remote: Arc<dyn Settle>,
    ) {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            if st.deleted {
                drop(st);
                remote.settle(Settlement::Requeue);
                return;
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let queued = QueuedMessage {
                seq,
                message,
                redelivered,
                deadline: None,
                logged: false,
                remote: Some(Box::new(remote)),
            };
            if st.ready.is_empty() && !st.consumers.is_empty() {
                if let Some(back) = self.offer_to_consumers(&mut st, queued) {
                    self.enqueue(&mut st, back);
                }
            } else {
                self.enqueue(&mut st, queued);
                self.dispatch_locked(&mut st, &mut dead, Instant::now());
            }
        }
        self.discard(dead);
    }

    /// Acknowledged (or delivered with no-ack): gone for good. The log learns of a batch (a
    /// multiple ack) at once, in as few records as the sequence numbers allow.
    pub fn ack(&self, messages: impl IntoIterator<Item = QueuedMessage>) {
        let Some(log) = &self.log else {
            for m in messages {
                self.settle_remote(&m, Settlement::Ack);
            }
            return;
        };
        let mut logged = Vec::new();
        for m in messages {
            self.settle_remote(&m, Settlement::Ack);
            if m.logged {
                logged.push((m.seq, m.message.is_persistent()));
            }
        }
        if !logged.is_empty() {
            log.remove_all(&mut logged);
        }
    }

    fn over_limit(&self, st: &QueueState) -> bool {
        let (len, bytes) = Self::totals(st);
        self.args.max_length.is_some_and(|max| len > max)
            || self.args.max_length_bytes.is_some_and(|max| bytes > max)
    }

    /// Ready messages and their body bytes, in memory and paged.
    fn totals(st: &QueueState) -> (u64, u64) {
        (
            st.ready.len() as u64 + st.paged.count,
            st.ready.bytes() as u64 + st.paged.bytes,
        )
    }

    fn enqueue(self: &Arc<Self>, st: &mut QueueState, msg: QueuedMessage) {
        if let Some(at) = msg.expires_at() {
            self.track_expiry(st, at, msg.seq);
        }
        st.ready.push_back(msg);
    }

    fn track_expiry(self: &Arc<Self>, st: &mut QueueState, at: Instant, seq: u64) {
        let earlier = st.expiries.peek().is_none_or(|Reverse((t, _))| at < *t);
        st.expiries.push(Reverse((at, seq)));
        // Deadlines of messages consumed long ago pile up when consumers keep up; rebuild from
        // what is really ready once they dominate.
        if st.expiries.len() > 2 * st.ready.len() + 1024 {
            st.expiries = st
                .ready
                .iter()
                .filter_map(|m| m.expires_at().map(|t| Reverse((t, m.seq))))
                .collect();
            st.expiries.push(Reverse((at, seq)));
        }
        if earlier || !st.timer_running {
            self.ensure_timer(st);
        }
    }

    /// Offers ready messages to consumers until none is left or no consumer can take more.
    /// Called when credit frees up or a consumer's connection drains.
    pub fn dispatch(self: &Arc<Self>) {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            self.dispatch_locked(&mut st, &mut dead, Instant::now());
        }
        self.discard(dead);
    }

    /// Whether publishers to this queue should pause: consumers are attached and behind.
    pub fn is_backlogged(&self) -> bool {
        self.backlog.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves when the backlog has drained (or the queue lost its consumers).
    pub async fn backlog_drained(&self) {
        let notified = self.flow.notified();
        if !self.is_backlogged() {
            return;
        }
        notified.await;
    }

    fn update_backlog(&self, st: &QueueState) {
        use std::sync::atomic::Ordering;
        let len = st.ready.len();
        if self.backlog.load(Ordering::Relaxed) {
            if len < FLOW_LOW || st.consumers.is_empty() || st.deleted {
                self.backlog.store(false, Ordering::Relaxed);
                self.flow.notify_waiters();
            }
        } else if len > FLOW_HIGH && !st.consumers.is_empty() {
            self.backlog.store(true, Ordering::Relaxed);
        }
    }

    fn dispatch_locked(
        self: &Arc<Self>,
        st: &mut QueueState,
        dead: &mut DeadLetters,
        now: Instant,
    ) {
        self.dispatch_ready(st, dead, now);
        self.update_backlog(st);
    }

    fn dispatch_ready(self: &Arc<Self>, st: &mut QueueState, dead: &mut DeadLetters, now: Instant) {
        if st.consumers.is_empty() {
            return;
        }
        loop {
            if st.paged.count > 0 && st.ready.len() <= self.memory_messages / 2 {
                self.page_in(st);
            }
            let Some(next) = st.ready.pop_front() else {
                return;
            };
            if next.expires_at().is_some_and(|t| t <= now) {
                dead.push((next, DeathReason::Expired));
                continue;
            }
            if let Some(back) = self.offer_to_consumers(st, next) {
                st.ready.push_front(back);
                return;
            }
        }
    }

    /// Offers `msg` to the consumers in order: the highest priority group first, round-robin
    /// within a group. Returns it if none took it.
    fn offer_to_consumers(
        self: &Arc<Self>,
        st: &mut QueueState,
        mut msg: QueuedMessage,
    ) -> Option<QueuedMessage> {
        if self.args.single_active_consumer {
            return match st.consumers.first()?.offer(self, msg) {
                Offer::Taken => None,
                Offer::Settled(gone) => {
                    self.forget(&gone);
                    None
                }
                Offer::Refused(back) => Some(back),
            };
        }
        let n = st.consumers.len();
        let mut start = 0;
        while start < n {
            let priority = st.consumers[start].priority();
            let end = st.consumers[start..]
                .iter()
                .position(|c| c.priority() != priority)
                .map_or(n, |p| start + p);
            let size = end - start;
            for i in 0..size {
                let idx = start + (st.cursor + i) % size;
                match st.consumers[idx].offer(self, msg) {
                    Offer::Taken => {
                        st.cursor = st.cursor.wrapping_add(i + 1);
                        return None;
                    }
                    Offer::Settled(gone) => {
                        self.forget(&gone);
                        st.cursor = st.cursor.wrapping_add(i + 1);
                        return None;
                    }
                    Offer::Refused(back) => msg = back,
                }
            }
            start = end;
        }
        Some(msg)
    }

    /// basic.get: the head message and how many remain.
    pub fn get(self: &Arc<Self>) -> Option<(QueuedMessage, u32)> {
        let now = Instant::now();
        let mut dead = DeadLetters::new();
        let got = {
            let mut st = self.state.lock();
            st.last_used = now;
            loop {
                if st.ready.is_empty() {
                    self.page_in(&mut st);
                }
                let Some(msg) = st.ready.pop_front() else {
                    break None;
                };
                if msg.expires_at().is_some_and(|t| t <= now) {
                    dead.push((msg, DeathReason::Expired));
                    continue;
                }
                let remaining = Self::totals(&st).0.min(u32::MAX as u64) as u32;
                break Some((msg, remaining));
            }
        };
        self.discard(dead);
        got
    }

    /// Puts delivered-but-unacknowledged messages back at their positions, marked redelivered.
    /// Those whose TTL ran out meanwhile are dead-lettered instead, as RabbitMQ does.
    pub fn requeue(self: &Arc<Self>, messages: impl IntoIterator<Item = QueuedMessage>) {
        let now = Instant::now();
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            if st.deleted {
                return;
            }
            for mut msg in messages {
                msg.redelivered = true;
                if let Some(at) = msg.expires_at() {
                    if at <= now {
                        dead.push((msg, DeathReason::Expired));
                        continue;
                    }
                    self.track_expiry(&mut st, at, msg.seq);
                }
                st.ready.insert_by_seq(msg);
            }
            self.dispatch_locked(&mut st, &mut dead, now);
        }
        self.discard(dead);
    }

    /// Messages rejected or nacked without requeue: to the dead-letter exchange, if any.
    pub fn reject(self: &Arc<Self>, messages: impl IntoIterator<Item = QueuedMessage>) {
        let dead: DeadLetters = messages
            .into_iter()
            .map(|m| (m, DeathReason::Rejected))
            .collect();
        self.discard(dead);
    }

    /// Drops all ready messages; returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let n = Self::totals(&st).0.min(u32::MAX as u64) as u32;
        for m in st.ready.drain_all() {
            self.forget(&m);
        }

        st.expiries.clear();
        if st.paged.count > 0 {
            if let Some(log) = &self.log {
                log.purge_paged(st.paged.first_seq, st.next_seq.saturating_sub(1));
            }
            st.paged = Paged::default();
        }
        n
    }

    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<dyn Consumer>) -> Result<(), EngineError> {
        self.add_consumer_then(consumer, || {})
    }

    /// Adds a consumer and calls `accepted` once it is in, before the queue offers it anything
    /// (with the queue's lock held): where the gateway sends basic.consume-ok, so the reply
    /// neither precedes a refusal nor follows the first delivery.
    pub fn add_consumer_then(
        self: &Arc<Self>,
        consumer: Arc<dyn Consumer>,
        accepted: impl FnOnce(),
    ) -> Result<(), EngineError> {
        let mut dead = DeadLetters::new();
        {
            let mut st = self.state.lock();
            if st.deleted {
                return Err(EngineError::not_found(
                    "queue",
                    self.name.as_str(),
                    self.vhost_name.as_str(),
                ));
            }
            let locked = st.consumers.iter().any(|c| c.exclusive());
            if locked || (consumer.exclusive() && !st.consumers.is_empty()) {
                return Err(EngineError::access_refused(format!(
                    "queue '{}' in vhost '{}' in exclusive use",
                    self.name, self.vhost_name
                )));
            }
            let at = if self.args.single_active_consumer {
                st.consumers.len()
            } else {
                let p = consumer.priority();
                st.consumers
                    .iter()
                    .position(|c| c.priority() < p)
                    .unwrap_or(st.consumers.len())
            };
            st.consumers.insert(at, consumer);
            st.had_consumer = true;
            st.last_used = Instant::now();
            accepted();
            self.dispatch_locked(&mut st, &mut dead, Instant::now());
        }
        self.discard(dead);
        Ok(())
    }

    pub fn remove_consumer(self: &Arc<Self>, consumer: &Arc<dyn Consumer>) -> ConsumerRemoved {
        let mut dead = DeadLetters::new();
        let result = {
            let mut st = self.state.lock();
            let before = st.consumers.len();
            let was_active = st
                .consumers
                .first()
                .is_some_and(|c| same_consumer(c, consumer));
            st.consumers.retain(|c| !same_consumer(c, consumer));
            let removed = st.consumers.len() != before;
            if st.consumers.is_empty() {
                st.cursor = 0;
                st.last_used = Instant::now();
                if self.args.expires.is_some() {
                    self.ensure_timer(&mut st);
                }
            }
            if removed && was_active && self.args.single_active_consumer {
                // The next consumer in registration order takes over.
                self.dispatch_locked(&mut st, &mut dead, Instant::now());
            }
            self.update_backlog(&st);
            ConsumerRemoved {
                removed,
                auto_delete_now: removed
                    && self.options.auto_delete
                    && st.had_consumer
                    && st.consumers.is_empty()
                    && !st.deleted,
            }
        };
        self.discard(dead);
        result
    }

    /// Marks the queue deleted, drops its messages and tells its consumers. Returns the number of
    /// ready messages dropped, or `None` if it was already deleted.
    pub(crate) fn mark_deleted(self: &Arc<Self>) -> Option<u32> {
        let (count, consumers) = {
            let mut st = self.state.lock();
            if st.deleted {
                return None;
            }
            st.deleted = true;
            let count = Self::totals(&st).0.min(u32::MAX as u64) as u32;
            for m in st.ready.drain_all() {
                self.settle_remote(&m, Settlement::Requeue);
            }
            st.expiries.clear();
            st.paged = Paged::default();
            (count, std::mem::take(&mut st.consumers))
        };
        if let Some(log) = &self.log {
            log.destroy();
        }
        self.backlog
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.flow.notify_waiters();
        self.timer.notify_one();
        for consumer in consumers {
            consumer.queue_deleted(self);
        }
        Some(count)
    }

    /// Messages that left the queue for good (expired, dropped, rejected): republished through
    /// the dead-letter exchange if there is one, then acknowledged in the log. Runs without the
    /// queue's lock, so a dead-letter route back into this queue cannot deadlock.
    fn discard(self: &Arc<Self>, dead: DeadLetters) {
        if dead.is_empty() {
            return;
        }
        let (remote, local): (DeadLetters, DeadLetters) =
            dead.into_iter().partition(|(m, _)| m.remote.is_some());
        // A bridged message is refused at its target, which applies its own dead-lettering.
        for (msg, _) in &remote {
            self.settle_remote(msg, Settlement::Reject);
        }
        self.dead_letter(&local);
        for (msg, _) in &local {
            self.forget(msg);
        }
    }

    fn dead_letter(self: &Arc<Self>, dead: &DeadLetters) {
        let Some(dlx) = &self.args.dead_letter_exchange else {
            return;
        };
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        let exchange = match vhost.exchange(dlx.as_str()) {
            Ok(ex) => ex,
            Err(_) => {
                tracing::debug!(queue = %self.name, dlx = %dlx, "dead-letter exchange does not exist; dropping");
                return;
            }
        };
        let now = unix_now();
        let mut targets = Vec::new();
        for (msg, reason) in dead {
            let copy = dead_letter(
                &msg.message,
                self.name.as_str(),
                *reason,
                dlx,
                self.args.dead_letter_routing_key.as_ref(),
                now,
            );
            vhost.route(
                &exchange,
                copy.routing_key(),
                copy.headers().as_ref(),
                &mut targets,
            );
            for queue in targets.drain(..) {
                if is_cycle(&copy, queue.name().as_str()) {
                    tracing::debug!(queue = %queue.name(), "dead-letter cycle; dropping");
                    continue;
                }
                queue.publish(copy.clone());
            }
        }
    }

    fn ensure_timer(self: &Arc<Self>, st: &mut QueueState) {
        if st.timer_running {
            self.timer.notify_one();
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        st.timer_running = true;
        let weak = Arc::downgrade(self);
        let timer = self.timer.clone();
        runtime.spawn(async move {
            loop {
                let notified = timer.notified();
                let next = match weak.upgrade() {
                    Some(queue) => queue.run_timers(Instant::now()),
                    None => return,
                };
                let Some(next) = next else { return };
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = notified => {}
                }
            }
        });
    }

    /// Expires due messages and, with x-expires, the queue itself. Returns the next deadline, or
    /// `None` when the timer task may stop.
    fn run_timers(self: &Arc<Self>, now: Instant) -> Option<Instant> {
        let mut dead = DeadLetters::new();
        let mut expire_queue = false;
        let next = {
            let mut st = self.state.lock();
            if st.deleted {
                st.timer_running = false;
                return None;
            }
            while let Some(Reverse((at, seq))) = st.expiries.peek().copied() {
                if at > now {
                    break;
                }
                st.expiries.pop();
                if let Some(m) = st.ready.remove_seq(seq) {
                    dead.push((m, DeathReason::Expired));
                }
            }
            let mut next = st.expiries.peek().map(|Reverse((at, _))| *at);
            if let Some(ms) = self.args.expires {
                if st.consumers.is_empty() {
                    let at = st.last_used + Duration::from_millis(ms);
                    if at <= now {
                        expire_queue = true;
                    }
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
            if next.is_none() || expire_queue {
                st.timer_running = false;
            }
            next
        };
        self.discard(dead);
        if expire_queue {
            if let Some(vhost) = self.vhost.upgrade() {
                tracing::debug!(queue = %self.name, "queue expired (x-expires)");
                vhost.remove_queue(self);
            }
            return None;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        credit: AtomicUsize,
        priority: i32,
        got: Mutex<Vec<(u64, bool)>>,
    }

    impl Counting {
        fn new(credit: usize, priority: i32) -> Arc<Counting> {
            Arc::new(Counting {
                credit: AtomicUsize::new(credit),
                priority,
                got: Mutex::new(Vec::new()),
            })
        }
    }

    impl Consumer for Counting {
        fn tag(&self) -> &str {
            "t"
        }
        fn exclusive(&self) -> bool {
            false
        }
        fn priority(&self) -> i32 {
            self.priority
        }
        fn offer(&self, _: &Arc<Queue>, m: QueuedMessage) -> Offer {
            if self.credit.load(Ordering::SeqCst) == 0 {
                return Offer::Refused(m);
            }
            self.credit.fetch_sub(1, Ordering::SeqCst);
            self.got.lock().push((m.seq, m.redelivered));
            Offer::Taken
        }
        fn queue_deleted(&self, _: &Arc<Queue>) {}
    }

    fn msg() -> Message {
        Message::new(
            "".into(),
            "q".into(),
            Default::default(),
            Bytes::from_static(b"x"),
        )
    }

    fn queue_with(args: &[(&str, amq_protocol::types::AMQPValue)]) -> Arc<Queue> {
        let mut arguments = FieldTable::default();
        for (k, v) in args {
            arguments.insert((*k).into(), v.clone());
        }
        Queue::new(
            "q".into(),
            "/".into(),
            QueueOptions {
                arguments,
                ..Default::default()
            },
        )
    }

    #[test]
    fn credit_limits_delivery_and_requeue_restores_order() {
        let q = queue_with(&[]);
        for _ in 0..5 {
            q.publish(msg());
        }
        let c = Counting::new(2, 0);
        q.add_consumer(c.clone()).unwrap();
        assert_eq!(*c.got.lock(), vec![(0, false), (1, false)]);
        assert_eq!(q.message_count(), 3);
        // The consumer hands message 0 back: it goes ahead of 2, 3, 4.
        q.requeue([QueuedMessage::new(0, msg(), None)]);
        c.credit.store(10, Ordering::SeqCst);
        q.dispatch();
        let got: Vec<_> = c.got.lock()[2..].to_vec();
        assert_eq!(got, vec![(0, true), (2, false), (3, false), (4, false)]);
    }

    #[tokio::test]
    async fn flow_control_flags_a_backlog_behind_consumers_and_clears_it_when_drained() {
        let q = queue_with(&[]);
        for _ in 0..FLOW_HIGH + 10 {
            q.publish(msg());
        }
        assert!(
            !q.is_backlogged(),
            "no consumers: publishers are never paused"
        );
        let c = Counting::new(0, 0);
        q.add_consumer(c.clone()).unwrap();
        q.publish(msg());
        assert!(q.is_backlogged(), "consumers attached and far behind");
        let drained = {
            let q = q.clone();
            tokio::spawn(async move { q.backlog_drained().await })
        };
        c.credit.store(FLOW_HIGH, Ordering::SeqCst);
        q.dispatch();
        assert!(!q.is_backlogged());
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .expect("waiting publishers are released")
            .unwrap();
    }

    #[test]
    fn higher_priority_consumers_first_then_round_robin() {
        let q = queue_with(&[]);
        let low = Counting::new(100, 0);
        let high_a = Counting::new(1, 5);
        let high_b = Counting::new(1, 5);
        q.add_consumer(low.clone()).unwrap();
        q.add_consumer(high_a.clone()).unwrap();
        q.add_consumer(high_b.clone()).unwrap();
        for _ in 0..4 {
            q.publish(msg());
        }
        assert_eq!(high_a.got.lock().len(), 1);
        assert_eq!(high_b.got.lock().len(), 1);
        assert_eq!(low.got.lock().len(), 2);
    }

    #[test]
    fn single_active_consumer_hands_over_in_registration_order() {
        use amq_protocol::types::AMQPValue;
        let q = queue_with(&[("x-single-active-consumer", AMQPValue::Boolean(true))]);
        let first = Counting::new(100, 0);
        let second = Counting::new(100, 10);
        q.add_consumer(first.clone()).unwrap();
        q.add_consumer(second.clone()).unwrap();
        q.publish(msg());
        q.publish(msg());
        assert_eq!(first.got.lock().len(), 2);
        assert!(second.got.lock().is_empty());
        let as_dyn: Arc<dyn Consumer> = first.clone();
        q.remove_consumer(&as_dyn);
        q.publish(msg());
        assert_eq!(second.got.lock().len(), 1);
    }

    #[test]
    fn max_length_drop_head_and_reject_publish() {
        use amq_protocol::types::AMQPValue;
        let q = queue_with(&[("x-max-length", AMQPValue::LongInt(2))]);
        for _ in 0..5 {
            assert_eq!(q.publish(msg()), PublishOutcome::Accepted);
        }
        assert_eq!(q.message_count(), 2);
        let (head, _) = q.get().unwrap();
        assert_eq!(head.seq, 3, "drop-head keeps the newest");

        let r = queue_with(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]);
        assert_eq!(r.publish(msg()), PublishOutcome::Accepted);
        assert_eq!(r.publish(msg()), PublishOutcome::Accepted);
        assert_eq!(r.publish(msg()), PublishOutcome::Rejected);
        assert_eq!(r.message_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_expires_ready_messages_promptly_not_only_at_the_head() {
        use amq_protocol::protocol::basic::AMQPProperties;
        use amq_protocol::types::AMQPValue;
        let q = queue_with(&[("x-message-ttl", AMQPValue::LongInt(1000))]);
        // A long-lived head and a short-lived message behind it.
        q.publish(msg());
        q.publish(Message::new(
            "".into(),
            "q".into(),
            AMQPProperties::default().with_expiration("100".into()),
            Bytes::from_static(b"short"),
        ));
        assert_eq!(q.message_count(), 2);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            q.message_count(),
            1,
            "the per-message TTL expired behind the head"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(q.message_count(), 0, "the queue TTL expired the head");
    }
}
