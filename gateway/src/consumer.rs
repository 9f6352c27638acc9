//! The per-channel delivery state a queue touches when it hands a message to a client, and the
//! consumer object the engine calls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use amq_protocol::protocol::{basic, AMQPClass};
use parking_lot::Mutex;
use warren_backends::engine::{Consumer, Offer, Queue, QueuedMessage};

use crate::outbox::Outbox;

/// What a channel shares with the queues that deliver to it.
pub struct ChannelShared {
    pub id: u16,
    pub outbox: Arc<Outbox>,
    pub state: Mutex<DeliveryState>,
    /// The client announced `consumer_cancel_notify`: tell it when a queue it consumes goes away.
    pub cancel_notify: bool,
}

pub struct DeliveryState {
    pub next_tag: u64,
    /// Delivered and not yet acknowledged, in delivery-tag order.
    pub unacked: VecDeque<Unacked>,
    /// basic.qos global=true: the most unacknowledged messages across the channel (0: no limit).
    pub global_prefetch: u32,
    pub flow_active: bool,
    pub closed: bool,
}

pub struct Unacked {
    pub tag: u64,
    pub queue: Arc<Queue>,
    pub message: QueuedMessage,
    /// The consuming consumer's unacked count; `None` for basic.get.
    pub credit: Option<Arc<AtomicU32>>,
}

impl Unacked {
    /// Releases the consumer credit this delivery held.
    pub fn release(&self) {
        if let Some(credit) = &self.credit {
            credit.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl ChannelShared {
    pub fn new(id: u16, outbox: Arc<Outbox>, cancel_notify: bool) -> Arc<ChannelShared> {
        Arc::new(ChannelShared {
            id,
            outbox,
            state: Mutex::new(DeliveryState {
                next_tag: 0,
                unacked: VecDeque::new(),
                global_prefetch: 0,
                flow_active: true,
                closed: false,
            }),
            cancel_notify,
        })
    }

    /// Removes the deliveries an ack, nack or reject names. `tag` 0 with `multiple` means all.
    /// `None` if a single tag is unknown (RabbitMQ's 406 "unknown delivery tag").
    pub fn take_unacked(&self, tag: u64, multiple: bool) -> Option<Vec<Unacked>> {
        let mut st = self.state.lock();
        if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            let n = st.unacked.partition_point(|u| u.tag <= upto);
            if n == 0 && tag != 0 {
                return None;
            }
            return Some(st.unacked.drain(..n).collect());
        }
        let pos = st.unacked.binary_search_by_key(&tag, |u| u.tag).ok()?;
        st.unacked.remove(pos).map(|u| vec![u])
    }

    /// Everything still unacknowledged, for recover and channel close.
    pub fn take_all_unacked(&self) -> Vec<Unacked> {
        self.state.lock().unacked.drain(..).collect()
    }
}

/// A basic.consume subscription.
pub struct AmqpConsumer {
    pub tag: Arc<str>,
    pub channel: Arc<ChannelShared>,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (basic.qos global=false before this consume); 0: no limit.
    pub prefetch: u32,
    /// `x-priority` from basic.consume's arguments.
    pub priority: i32,
    pub unacked: Arc<AtomicU32>,
    pub cancelled: AtomicBool,
}

impl Consumer for AmqpConsumer {
    fn tag(&self) -> &str {
        &self.tag
    }

    fn exclusive(&self) -> bool {
        self.exclusive
    }

    fn priority(&self) -> i32 {
        self.priority
    }

    fn offer(&self, queue: &Arc<Queue>, message: QueuedMessage) -> Offer {
        let ch = &self.channel;
        // The cheap refusals first, on atomics: a publisher flooding a queue whose consumers
        // are at their prefetch limit offers every message, and taking the channel's lock
        // for each would starve the consumer's own acks and deliveries of that lock.
        if self.cancelled.load(Ordering::Acquire) || ch.outbox.is_closed() {
            return Offer::Refused(message);
        }
        if !self.no_ack
            && self.prefetch > 0
            && self.unacked.load(Ordering::Acquire) >= self.prefetch
        {
            return Offer::Refused(message);
        }
        if ch.outbox.is_full() {
            ch.outbox.block_queue(queue);
            return Offer::Refused(message);
        }
        let mut st = ch.state.lock();
        if st.closed || !st.flow_active {
            return Offer::Refused(message);
        }
        if !self.no_ack && st.global_prefetch > 0 && st.unacked.len() as u32 >= st.global_prefetch {
            return Offer::Refused(message);
        }
        st.next_tag += 1;
        let tag = st.next_tag;
        let m = &message.message;
        ch.outbox.push(|enc, frame_max| {
            enc.deliver(
                ch.id,
                &self.tag,
                tag,
                message.redelivered,
                m.exchange(),
                m.routing_key(),
            );
            enc.content(ch.id, m.raw_properties(), m.body(), frame_max);
        });
        if self.no_ack {
            return Offer::Settled(message);
        }
        self.unacked.fetch_add(1, Ordering::AcqRel);
        st.unacked.push_back(Unacked {
            tag,
            queue: queue.clone(),
            message,
            credit: Some(self.unacked.clone()),
        });
        Offer::Taken
    }

    fn queue_deleted(&self, _queue: &Arc<Queue>) {
        if self.cancelled.swap(true, Ordering::AcqRel) {
            return;
        }
        let ch = &self.channel;
        if ch.cancel_notify && !ch.state.lock().closed {
            let cancel = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: self.tag.as_ref().into(),
                nowait: true,
            }));
            ch.outbox.push(|enc, _| enc.method(ch.id, &cancel));
        }
    }
}
