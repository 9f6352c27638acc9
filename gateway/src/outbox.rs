//! The bytes waiting to go out on one connection's socket.
//!
//! Anything that answers or delivers to a client (its own reader task, a queue dispatching on
//! some other task) encodes straight into this buffer; the connection's writer task swaps it out
//! and writes everything that piled up with one call. The byte count is the back-pressure signal:
//! above the high watermark deliveries are refused (consumers keep their messages in the queue)
//! and the connection stops reading from its own socket, so a client that does not read cannot
//! make the server buffer without limit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::sync::Notify;
use warren_backends::engine::Queue;

use crate::codec::Encoder;

pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the writer when bytes were added.
    pub(crate) ready: Notify,
    /// Wakes whoever waits for the buffer to drain below the watermark.
    pub(crate) drained: Notify,
    /// Encoded bytes not yet written to the socket (buffered plus being written).
    pending: AtomicUsize,
    high_watermark: usize,
    frame_max: AtomicUsize,
    closed: AtomicBool,
}

struct OutboxState {
    encoder: Encoder,
    /// Queues that had a delivery refused because this buffer was full.
    blocked_queues: Vec<Arc<Queue>>,
}

impl Outbox {
    pub fn new(high_watermark: usize, frame_max: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState {
                encoder: Encoder::with_capacity(16 * 1024),
                blocked_queues: Vec::new(),
            }),
            ready: Notify::new(),
            drained: Notify::new(),
            pending: AtomicUsize::new(0),
            high_watermark,
            frame_max: AtomicUsize::new(frame_max),
            closed: AtomicBool::new(false),
        })
    }

    pub fn frame_max(&self) -> usize {
        self.frame_max.load(Ordering::Relaxed)
    }

    pub fn set_frame_max(&self, frame_max: usize) {
        self.frame_max.store(frame_max, Ordering::Relaxed);
    }

    pub fn is_full(&self) -> bool {
        self.pending.load(Ordering::Acquire) >= self.high_watermark
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops accepting bytes: a closed connection's deliveries are refused and go back to their
    /// queues.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    /// Encodes frames with `write` and wakes the writer.
    pub fn push(&self, write: impl FnOnce(&mut Encoder, usize)) {
        let frame_max = self.frame_max();
        let added = {
            let mut st = self.state.lock();
            let before = st.encoder.len();
            write(&mut st.encoder, frame_max);
            st.encoder.len() - before
        };
        self.pending.fetch_add(added, Ordering::AcqRel);
        self.ready.notify_one();
    }

    /// Remembers a queue to dispatch again once this outbox drains.
    pub fn block_queue(&self, queue: &Arc<Queue>) {
        let mut st = self.state.lock();
        if !st.blocked_queues.iter().any(|q| Arc::ptr_eq(q, queue)) {
            st.blocked_queues.push(queue.clone());
        }
    }

    /// Everything encoded so far, for the writer.
    pub(crate) fn take(&self) -> BytesMut {
        self.state.lock().encoder.take()
    }

    /// The writer wrote `n` bytes: below the watermark again, queues held back resume.
    pub(crate) fn written(&self, n: usize) {
        let before = self.pending.fetch_sub(n, Ordering::AcqRel);
        let now = before.saturating_sub(n);
        if now < self.high_watermark / 2 || now == 0 {
            self.drained.notify_waiters();
            let blocked = std::mem::take(&mut self.state.lock().blocked_queues);
            for queue in blocked {
                queue.dispatch();
            }
        }
    }

    /// Waits until the buffer is below the watermark (or the connection closed).
    pub async fn wait_for_room(&self) {
        loop {
            let drained = self.drained.notified();
            if !self.is_full() || self.is_closed() {
                return;
            }
            drained.await;
        }
    }
}
