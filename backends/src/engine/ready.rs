//! A queue's ready messages: FIFO per priority level, highest level first.

use std::collections::VecDeque;

use super::QueuedMessage;

/// Messages waiting for a consumer. Without `x-max-priority` there is one level; with it, one
/// per priority 0..=max, and a message's level is its priority capped at the maximum.
#[derive(Debug)]
pub struct ReadyList {
    levels: Vec<VecDeque<QueuedMessage>>,
    len: usize,
    bytes: usize,
}

impl Default for ReadyList {
    fn default() -> Self {
        Self::new(0)
    }
}

impl ReadyList {
    pub fn new(max_priority: u8) -> Self {
        ReadyList {
            levels: (0..=max_priority as usize)
                .map(|_| VecDeque::new())
                .collect(),
            len: 0,
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Body bytes of all ready messages (x-max-length-bytes counts bodies, as RabbitMQ does).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn level(&self, msg: &QueuedMessage) -> usize {
        let max = self.levels.len() - 1;
        if max == 0 {
            return 0;
        }
        (msg.message.priority() as usize).min(max)
    }

    pub fn push_back(&mut self, msg: QueuedMessage) {
        let level = self.level(&msg);
        self.len += 1;
        self.bytes += msg.message.body_len();
        self.levels[level].push_back(msg);
    }

    /// Puts a message back at the front of its level (a refused offer).
    pub fn push_front(&mut self, msg: QueuedMessage) {
        let level = self.level(&msg);
        self.len += 1;
        self.bytes += msg.message.body_len();
        self.levels[level].push_front(msg);
    }

    /// Puts a message back at its original position in its level (requeue).
    pub fn insert_by_seq(&mut self, msg: QueuedMessage) {
        let level = self.level(&msg);
        let list = &mut self.levels[level];
        let at = list.partition_point(|m| m.seq < msg.seq);
        self.len += 1;
        self.bytes += msg.message.body_len();
        list.insert(at, msg);
    }

    /// The next message to deliver: the oldest of the highest non-empty level.
    pub fn pop_front(&mut self) -> Option<QueuedMessage> {
        let msg = self.levels.iter_mut().rev().find_map(|l| l.pop_front())?;
        self.len -= 1;
        self.bytes -= msg.message.body_len();
        Some(msg)
    }

    /// Removes the message with sequence number `seq` if it is ready (expiry).
    pub fn remove_seq(&mut self, seq: u64) -> Option<QueuedMessage> {
        for list in self.levels.iter_mut() {
            if let Ok(pos) = list.binary_search_by_key(&seq, |m| m.seq) {
                let msg = list.remove(pos)?;
                self.len -= 1;
                self.bytes -= msg.message.body_len();
                return Some(msg);
            }
        }
        None
    }

    /// Every ready message, highest level first.
    pub fn iter(&self) -> impl Iterator<Item = &QueuedMessage> {
        self.levels.iter().rev().flat_map(|l| l.iter())
    }

    /// Empties the list, highest priority first. The lists' memory goes with the iterator
    /// rather than being copied into a vector (a million queued messages are 48 MB of entries)
    /// or kept as spare capacity after a purge.
    pub fn drain_all(&mut self) -> impl Iterator<Item = QueuedMessage> {
        self.len = 0;
        self.bytes = 0;
        let levels: Vec<VecDeque<QueuedMessage>> =
            self.levels.iter_mut().map(std::mem::take).collect();
        levels.into_iter().rev().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;
    use amq_protocol::protocol::basic::AMQPProperties;
    use bytes::Bytes;

    fn msg(seq: u64, priority: Option<u8>) -> QueuedMessage {
        let mut props = AMQPProperties::default();
        if let Some(p) = priority {
            props = props.with_priority(p);
        }
        let message = Message::new("".into(), "k".into(), props, Bytes::from_static(b"body"));
        QueuedMessage::new(seq, message, None)
    }

    fn seqs(r: &mut ReadyList) -> Vec<u64> {
        std::iter::from_fn(|| r.pop_front())
            .map(|m| m.seq)
            .collect()
    }

    #[test]
    fn priority_then_fifo() {
        let mut r = ReadyList::new(5);
        r.push_back(msg(0, None));
        r.push_back(msg(1, Some(3)));
        r.push_back(msg(2, Some(9))); // capped at 5
        r.push_back(msg(3, Some(3)));
        r.push_back(msg(4, Some(5)));
        assert_eq!(r.len(), 5);
        assert_eq!(r.bytes(), 20);
        assert_eq!(seqs(&mut r), vec![2, 4, 1, 3, 0]);
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn without_priorities_priority_is_ignored() {
        let mut r = ReadyList::new(0);
        r.push_back(msg(0, Some(1)));
        r.push_back(msg(1, Some(9)));
        assert_eq!(seqs(&mut r), vec![0, 1]);
    }

    #[test]
    fn requeue_returns_to_position_within_level() {
        let mut r = ReadyList::new(2);
        for (seq, p) in [(0, 1), (1, 1), (2, 2), (3, 1)] {
            r.push_back(msg(seq, Some(p)));
        }
        let first = r.pop_front().unwrap(); // 2 (priority 2)
        let second = r.pop_front().unwrap(); // 0
        r.insert_by_seq(second);
        r.insert_by_seq(first);
        assert!(r.remove_seq(1).is_some());
        assert!(r.remove_seq(1).is_none());
        assert_eq!(seqs(&mut r), vec![2, 0, 3]);
    }
}
