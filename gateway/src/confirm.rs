//! Publisher confirms across asynchronous sinks.
//!
//! Each publish on a channel in confirm mode gets a `PendingConfirm`. Every sink that must make
//! the message safe first (a durable queue's fsync; later, a bridge's acknowledgement) holds a
//! clone; the channel drops its own right after routing. When the last holder lets go, the
//! sequence number is settled in the channel's `ConfirmTracker`, and the connection's reader
//! task turns settled numbers into frames: one `basic.ack(multiple)` for the longest settled
//! prefix, a `basic.nack` for a failed one. Completions arrive out of order (a transient message
//! settles at once, a persistent one after the next fsync); a later number waits for the earlier
//! ones, which the group commit bounds to one fsync's time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;
use warren_backends::store::Completion;

use crate::outbox::Outbox;

pub struct ConfirmTracker {
    channel: u16,
    state: Mutex<ConfirmState>,
    /// The connection's reader waits on this to flush confirms.
    wake: Arc<Notify>,
}

#[derive(Default)]
struct ConfirmState {
    /// Every sequence number up to here has been answered.
    answered: u64,
    /// Every sequence number up to here (and at least `answered`) has been settled with an
    /// ack: the common in-order case costs no map entry.
    acked_up_to: u64,
    /// Settled numbers above `acked_up_to + 1` or nacked: true for ack, false for nack.
    settled: BTreeMap<u64, bool>,
}

impl ConfirmTracker {
    pub fn new(channel: u16, wake: Arc<Notify>) -> Arc<ConfirmTracker> {
        Arc::new(ConfirmTracker {
            channel,
            state: Mutex::new(ConfirmState::default()),
            wake,
        })
    }

    /// A new publish; the returned handle settles it when its last clone drops.
    pub fn pending(self: &Arc<Self>, seq: u64) -> Arc<PendingConfirm> {
        Arc::new(PendingConfirm {
            seq,
            tracker: self.clone(),
            failed: AtomicBool::new(false),
        })
    }

    fn settle(&self, seq: u64, ok: bool) {
        let next = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            if ok && seq == st.acked_up_to + 1 {
                st.acked_up_to = seq;
                // Acks that arrived ahead of this one now extend the run.
                while let Some(entry) = st.settled.first_entry() {
                    if *entry.key() != st.acked_up_to + 1 || !*entry.get() {
                        break;
                    }
                    st.acked_up_to = entry.remove_entry().0;
                }
            } else {
                st.settled.insert(seq, ok);
            }
            st.answered + 1 == seq
        };
        if next {
            self.wake.notify_one();
        }
    }

    /// Every sequence number up to this one has been confirmed (or nacked) to the client.
    pub fn answered(&self) -> u64 {
        self.state.lock().answered
    }

    /// Writes the confirms that can go out now; returns whether any did.
    pub fn flush(&self, outbox: &Outbox) -> bool {
        let mut frames: Vec<(u64, bool, bool)> = Vec::new();
        {
            let mut st = self.state.lock();
            let start = st.answered;
            let mut run_end: Option<u64> = None;
            if st.acked_up_to > st.answered {
                st.answered = st.acked_up_to;
                run_end = Some(st.acked_up_to);
            }
            while let Some((&seq, &ok)) = st.settled.first_key_value() {
                if seq != st.answered + 1 {
                    break;
                }
                st.settled.pop_first();
                st.answered = seq;
                if ok {
                    run_end = Some(seq);
                } else {
                    if let Some(end) = run_end.take() {
                        let multiple = frames.last().map_or(start, |f| f.0) + 1 < end;
                        frames.push((end, multiple, true));
                    }
                    frames.push((seq, false, false));
                }
            }
            if let Some(end) = run_end {
                let multiple = frames.last().map_or(start, |f| f.0) + 1 < end;
                frames.push((end, multiple, true));
            }
            st.acked_up_to = st.answered;
        }
        if frames.is_empty() {
            return false;
        }
        let id = self.channel;
        outbox.push(|enc, _| {
            for (seq, multiple, ok) in &frames {
                if *ok {
                    enc.ack(id, *seq, *multiple);
                } else {
                    enc.nack(id, *seq, *multiple);
                }
            }
        });
        true
    }
}

/// One publish waiting for its sinks.
pub struct PendingConfirm {
    seq: u64,
    tracker: Arc<ConfirmTracker>,
    failed: AtomicBool,
}

impl PendingConfirm {
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

impl Completion for PendingConfirm {
    fn failed(&self, reason: &str) {
        tracing::warn!(
            seq = self.seq,
            reason,
            "publish could not be made safe; nacking"
        );
        self.fail();
    }
}

impl Drop for PendingConfirm {
    fn drop(&mut self) {
        self.tracker
            .settle(self.seq, !self.failed.load(Ordering::Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_frame, Frame};
    use amq_protocol::protocol::{basic, AMQPClass};

    fn frames(outbox: &Outbox) -> Vec<(bool, u64, bool)> {
        let mut buf = outbox.take();
        let mut out = Vec::new();
        while let Ok(Some(Frame::Method(_, m))) = decode_frame(&mut buf, 1 << 20) {
            match *m {
                AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                    out.push((true, a.delivery_tag, a.multiple))
                }
                AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                    out.push((false, n.delivery_tag, n.multiple))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[test]
    fn out_of_order_completions_ack_the_settled_prefix() {
        let tracker = ConfirmTracker::new(1, Arc::new(Notify::new()));
        let outbox = Outbox::new(1 << 20, 4096);
        let p1 = tracker.pending(1);
        let p2 = tracker.pending(2);
        let p3 = tracker.pending(3);
        drop(p2);
        drop(p3);
        assert!(!tracker.flush(&outbox), "2 and 3 wait for 1");
        drop(p1);
        assert!(tracker.flush(&outbox));
        assert_eq!(frames(&outbox), vec![(true, 3, true)]);
    }

    #[test]
    fn a_failure_is_nacked_between_acks() {
        let tracker = ConfirmTracker::new(1, Arc::new(Notify::new()));
        let outbox = Outbox::new(1 << 20, 4096);
        let ps: Vec<_> = (1..=5).map(|s| tracker.pending(s)).collect();
        ps[2].fail();
        drop(ps);
        tracker.flush(&outbox);
        assert_eq!(
            frames(&outbox),
            vec![(true, 2, true), (false, 3, false), (true, 5, true)]
        );
        let single = tracker.pending(6);
        drop(single);
        tracker.flush(&outbox);
        assert_eq!(frames(&outbox), vec![(true, 6, false)]);
    }
}
