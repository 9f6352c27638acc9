//! The way publishes reach the engine: a message with its guard (`Pending`), and the queue
//! between `Backend::publish` (any thread, never blocks) and the engine task.
//!
//! Backpressure: the queue is a bounded channel of `max_in_flight` entries. `publish` must not
//! block, so when the channel is full the message goes to an overflow `VecDeque` behind a mutex
//! instead; once the overflow holds anything every later message goes there too, and the
//! engine takes from the channel first and from the overflow only when the channel is empty,
//! so messages leave in the order they were published. The engine takes a message only when
//! it has room in its in-flight window, so a slow or absent upstream shows as confirms that
//! come late: the gateway's per-channel confirm and flow-control limits are what stop
//! publishers, and the overflow is what lets this bridge never block the gateway meanwhile.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lapin::types::ShortString;
use lapin::BasicProperties;
use parking_lot::Mutex;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Notify;
use warren_backends::store::Guard;
use warren_backends::Message;

use crate::retry::Owed;

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A message the bridge owes a completion for.
pub(crate) struct Pending {
    /// Publish order: resends after a failure go out oldest first.
    pub(crate) seq: u64,
    pub(crate) exchange: ShortString,
    pub(crate) message: Message,
    /// Mapped once (message-id included), the same for every attempt. Boxed: it is most of
    /// the entry's size, and entries sit in the queue by the thousand.
    pub(crate) properties: Box<BasicProperties>,
    /// Written to a channel at least once (so a further write is a resend).
    pub(crate) sent: bool,
    pub(crate) owed: Owed,
}

impl Pending {
    pub(crate) fn new(
        exchange: ShortString,
        message: Message,
        properties: BasicProperties,
        guard: Guard,
    ) -> Pending {
        Pending {
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            exchange,
            message,
            properties: Box::new(properties),
            sent: false,
            owed: Owed::new(guard),
        }
    }

    /// RabbitMQ confirmed it: releasing the guard is the success signal.
    pub(crate) fn confirmed(self) {
        self.owed.confirmed();
    }

    /// Given up on: the publisher gets basic.nack.
    pub(crate) fn fail(self, reason: &str) {
        self.owed.fail(reason);
    }
}

struct Overflow {
    queue: VecDeque<Pending>,
    /// The engine stopped: nothing is accepted any more.
    closed: bool,
}

/// The publishing side, held by the bridge.
pub(crate) struct PublishQueue {
    tx: mpsc::Sender<Pending>,
    overflow: Arc<Mutex<Overflow>>,
    wake: Arc<Notify>,
}

/// The engine's side.
pub(crate) struct Intake {
    rx: mpsc::Receiver<Pending>,
    overflow: Arc<Mutex<Overflow>>,
    wake: Arc<Notify>,
}

pub(crate) fn queue(capacity: usize) -> (PublishQueue, Intake) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let overflow = Arc::new(Mutex::new(Overflow {
        queue: VecDeque::new(),
        closed: false,
    }));
    let wake = Arc::new(Notify::new());
    (
        PublishQueue {
            tx,
            overflow: overflow.clone(),
            wake: wake.clone(),
        },
        Intake { rx, overflow, wake },
    )
}

impl PublishQueue {
    /// Hands `pending` to the engine without blocking; gives it back if the engine stopped.
    pub(crate) fn push(&self, pending: Pending) -> Result<(), Pending> {
        let mut overflow = self.overflow.lock();
        if overflow.closed {
            return Err(pending);
        }
        if overflow.queue.is_empty() {
            match self.tx.try_send(pending) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(p)) => return Err(p),
                Err(TrySendError::Full(p)) => overflow.queue.push_back(p),
            }
        } else {
            overflow.queue.push_back(pending);
        }
        if overflow.queue.len() == 1 {
            tracing::debug!(
                overflow = overflow.queue.len(),
                "rabbitmq bridge publish queue full; holding messages in its overflow"
            );
        }
        drop(overflow);
        self.wake.notify_one();
        Ok(())
    }
}

impl Intake {
    /// The next message if one is waiting.
    pub(crate) fn try_next(&mut self) -> Option<Pending> {
        if let Ok(p) = self.rx.try_recv() {
            return Some(p);
        }
        // Publishers push under this lock: with it held, "the channel is empty, take from the
        // overflow" cannot be overtaken by a burst that refills the channel and spills into the
        // overflow in between (which would put a later message first).
        let mut overflow = self.overflow.lock();
        match self.rx.try_recv() {
            Ok(p) => Some(p),
            Err(_) => overflow.queue.pop_front(),
        }
    }

    /// The next message; `None` once every publisher is gone and nothing is left.
    pub(crate) async fn next(&mut self) -> Option<Pending> {
        loop {
            if let Some(p) = self.try_next() {
                return Some(p);
            }
            tokio::select! {
                p = self.rx.recv() => match p {
                    Some(p) => return Some(p),
                    None => return self.overflow.lock().queue.pop_front(),
                },
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Stops accepting messages and returns every one still waiting, in order.
    pub(crate) fn close(&mut self) -> Vec<Pending> {
        let mut overflow = self.overflow.lock();
        overflow.closed = true;
        self.rx.close();
        let mut left = Vec::new();
        while let Ok(p) = self.rx.try_recv() {
            left.push(p);
        }
        left.extend(overflow.queue.drain(..));
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Probe {
        failed: AtomicUsize,
    }

    impl warren_backends::store::Completion for Probe {
        fn failed(&self, _reason: &str) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pending(body: &'static [u8], guard: &Arc<Probe>) -> Pending {
        let message = Message::new(
            "".into(),
            "k".into(),
            Default::default(),
            Bytes::from_static(body),
        );
        Pending::new("ex".into(), message, Default::default(), guard.clone())
    }

    fn body(p: &Pending) -> &[u8] {
        p.message.body()
    }

    #[tokio::test]
    async fn a_full_queue_overflows_without_blocking_and_keeps_order() {
        let probe = Arc::new(Probe::default());
        let (queue, mut intake) = queue(2);
        let bodies: [&'static [u8]; 5] = [b"1", b"2", b"3", b"4", b"5"];
        for b in bodies {
            assert!(queue.push(pending(b, &probe)).is_ok());
        }
        assert_eq!(queue.overflow.lock().queue.len(), 3);
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = intake.next().await.unwrap();
            got.push(body(&p).to_vec());
            p.confirmed();
        }
        // Room again in the channel, but the overflow is not empty: order is kept.
        assert!(queue.push(pending(b"6", &probe)).is_ok());
        while let Some(p) = intake.try_next() {
            got.push(body(&p).to_vec());
            p.confirmed();
        }
        let expected: Vec<Vec<u8>> = [b"1", b"2", b"3", b"4", b"5", b"6"]
            .iter()
            .map(|b| b.to_vec())
            .collect();
        assert_eq!(got, expected);
        assert_eq!(probe.failed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn after_close_nothing_is_accepted_and_what_waited_is_returned() {
        let probe = Arc::new(Probe::default());
        let (queue, mut intake) = queue(1);
        assert!(queue.push(pending(b"a", &probe)).is_ok());
        assert!(queue.push(pending(b"b", &probe)).is_ok());
        let left = intake.close();
        assert_eq!(left.len(), 2);
        let refused = queue.push(pending(b"c", &probe)).unwrap_err();
        refused.fail("closed");
        for p in left {
            p.fail("closed");
        }
        assert_eq!(probe.failed.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_pending_dropped_without_a_decision_is_failed() {
        let probe = Arc::new(Probe::default());
        drop(pending(b"x", &probe));
        assert_eq!(probe.failed.load(Ordering::SeqCst), 1);
        pending(b"y", &probe).confirmed();
        assert_eq!(probe.failed.load(Ordering::SeqCst), 1);
    }
}
