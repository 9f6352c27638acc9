//! A queue: ready messages in order, and the consumers they are offered to in turn.

use std::collections::VecDeque;
use std::sync::Arc;

use amq_protocol::types::{FieldTable, ShortString};
use parking_lot::Mutex;

use super::{ConnectionId, EngineError};
use crate::Message;

/// A message as a queue holds it: the shared message plus its place in this queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Position in this queue; a requeued message goes back to its position by this number.
    pub seq: u64,
    pub message: Arc<Message>,
    pub redelivered: bool,
}

/// A consumer's answer to a message offered to it.
pub enum Offer {
    Taken,
    /// No credit (prefetch) or no room on its connection right now; the consumer will ask the
    /// queue to dispatch again when that changes.
    Refused(QueuedMessage),
}

/// Whatever receives a queue's messages: the gateway's AMQP consumers, later bridges.
pub trait Consumer: Send + Sync {
    fn tag(&self) -> &str;
    fn exclusive(&self) -> bool;
    /// Offers one message. Called with the queue's lock held: must not call back into the queue.
    fn offer(&self, queue: &Arc<Queue>, message: QueuedMessage) -> Offer;
    /// The queue was deleted while this consumer was attached.
    fn queue_deleted(&self, queue: &Arc<Queue>);
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
    vhost: ShortString,
    options: QueueOptions,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<QueuedMessage>,
    next_seq: u64,
    consumers: Vec<Arc<dyn Consumer>>,
    /// Round-robin position among consumers.
    cursor: usize,
    had_consumer: bool,
    deleted: bool,
}

/// What removing a consumer left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerRemoved {
    pub removed: bool,
    /// An auto-delete queue lost its last consumer and must now be deleted.
    pub auto_delete_now: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

fn same_consumer(a: &Arc<dyn Consumer>, b: &Arc<dyn Consumer>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Queue {
    pub fn new(name: ShortString, vhost: ShortString, options: QueueOptions) -> Arc<Queue> {
        Arc::new(Queue {
            name,
            vhost,
            options,
            state: Mutex::new(QueueState::default()),
        })
    }

    pub fn name(&self) -> &ShortString {
        &self.name
    }

    pub fn options(&self) -> &QueueOptions {
        &self.options
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Ready messages (not the ones delivered and awaiting an ack), as queue.declare-ok counts.
    pub fn message_count(&self) -> u32 {
        self.state.lock().ready.len() as u32
    }

    pub fn consumer_count(&self) -> u32 {
        self.state.lock().consumers.len() as u32
    }

    pub fn counts(&self) -> (u32, u32) {
        let st = self.state.lock();
        (st.ready.len() as u32, st.consumers.len() as u32)
    }

    /// Enqueues a message and hands it to a consumer if one can take it.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>) {
        let mut st = self.state.lock();
        if st.deleted {
            return;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let queued = QueuedMessage {
            seq,
            message,
            redelivered: false,
        };
        if st.ready.is_empty() && !st.consumers.is_empty() {
            if let Some(back) = self.offer_round_robin(&mut st, queued) {
                st.ready.push_back(back);
            }
            return;
        }
        st.ready.push_back(queued);
        self.dispatch_locked(&mut st);
    }

    /// Offers ready messages to consumers until none is left or no consumer can take more.
    /// Called when credit frees up or a consumer's connection drains.
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.state.lock();
        self.dispatch_locked(&mut st);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState) {
        if st.consumers.is_empty() {
            return;
        }
        while let Some(next) = st.ready.pop_front() {
            if let Some(back) = self.offer_round_robin(st, next) {
                st.ready.push_front(back);
                return;
            }
        }
    }

    /// Offers `msg` to each consumer in turn from the cursor; returns it if none took it.
    fn offer_round_robin(
        self: &Arc<Self>,
        st: &mut QueueState,
        mut msg: QueuedMessage,
    ) -> Option<QueuedMessage> {
        let n = st.consumers.len();
        for i in 0..n {
            let idx = (st.cursor + i) % n;
            match st.consumers[idx].offer(self, msg) {
                Offer::Taken => {
                    st.cursor = (idx + 1) % n;
                    return None;
                }
                Offer::Refused(back) => msg = back,
            }
        }
        Some(msg)
    }

    /// basic.get: the head message and how many remain.
    pub fn get(&self) -> Option<(QueuedMessage, u32)> {
        let mut st = self.state.lock();
        let msg = st.ready.pop_front()?;
        Some((msg, st.ready.len() as u32))
    }

    /// Puts delivered-but-unacknowledged messages back at their positions, marked redelivered.
    pub fn requeue(self: &Arc<Self>, messages: impl IntoIterator<Item = QueuedMessage>) {
        let mut st = self.state.lock();
        if st.deleted {
            return;
        }
        for mut msg in messages {
            msg.redelivered = true;
            let at = st.ready.partition_point(|m| m.seq < msg.seq);
            st.ready.insert(at, msg);
        }
        self.dispatch_locked(&mut st);
    }

    /// Drops all ready messages; returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let n = st.ready.len() as u32;
        st.ready.clear();
        n
    }

    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<dyn Consumer>) -> Result<(), EngineError> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(EngineError::not_found("queue", self.name.as_str(), self.vhost.as_str()));
        }
        let locked = st.consumers.iter().any(|c| c.exclusive());
        if locked || (consumer.exclusive() && !st.consumers.is_empty()) {
            return Err(EngineError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, self.vhost
            )));
        }
        st.consumers.push(consumer);
        st.had_consumer = true;
        self.dispatch_locked(&mut st);
        Ok(())
    }

    pub fn remove_consumer(&self, consumer: &Arc<dyn Consumer>) -> ConsumerRemoved {
        let mut st = self.state.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| !same_consumer(c, consumer));
        let removed = st.consumers.len() != before;
        if st.cursor >= st.consumers.len() {
            st.cursor = 0;
        }
        ConsumerRemoved {
            removed,
            auto_delete_now: removed
                && self.options.auto_delete
                && st.had_consumer
                && st.consumers.is_empty()
                && !st.deleted,
        }
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
            let count = st.ready.len() as u32;
            st.ready.clear();
            (count, std::mem::take(&mut st.consumers))
        };
        for consumer in consumers {
            consumer.queue_deleted(self);
        }
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        credit: AtomicUsize,
        got: Mutex<Vec<(u64, bool)>>,
    }

    impl Consumer for Counting {
        fn tag(&self) -> &str {
            "t"
        }
        fn exclusive(&self) -> bool {
            false
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

    fn msg() -> Arc<Message> {
        Arc::new(Message {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: Default::default(),
            raw_properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn credit_limits_delivery_and_requeue_restores_order() {
        let q = Queue::new("q".into(), "/".into(), QueueOptions::default());
        for _ in 0..5 {
            q.publish(msg());
        }
        let c = Arc::new(Counting {
            credit: AtomicUsize::new(2),
            got: Mutex::new(Vec::new()),
        });
        q.add_consumer(c.clone()).unwrap();
        assert_eq!(*c.got.lock(), vec![(0, false), (1, false)]);
        assert_eq!(q.message_count(), 3);
        // The consumer hands message 0 back: it goes ahead of 2, 3, 4.
        q.requeue([QueuedMessage {
            seq: 0,
            message: msg(),
            redelivered: false,
        }]);
        c.credit.store(10, Ordering::SeqCst);
        q.dispatch();
        let got: Vec<_> = c.got.lock()[2..].to_vec();
        assert_eq!(got, vec![(0, true), (2, false), (3, false), (4, false)]);
    }
}
