//! The embedded engine seen through the `Backend` trait, and the pump that feeds a queue
//! mapping (a Warren queue whose messages come from a bridged target).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError, Health, Incoming, Settle, Settlement, Subscription};
use crate::engine::{Consumer, Offer, PublishOutcome, Queue, QueuedMessage, VHost};
use crate::store::Guard;
use crate::Message;

/// The embedded broker as a backend: destinations are exchanges (publish) and queues
/// (subscribe, declare, depth).
pub struct EmbeddedBackend {
    name: String,
    vhost: Arc<VHost>,
}

impl EmbeddedBackend {
    pub fn new(name: impl Into<String>, vhost: Arc<VHost>) -> Arc<EmbeddedBackend> {
        Arc::new(EmbeddedBackend {
            name: name.into(),
            vhost,
        })
    }
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        let exchange = match self.vhost.exchange(destination) {
            Ok(ex) => ex,
            Err(e) => {
                guard.failed(&e.to_string());
                return;
            }
        };
        let mut targets = Vec::new();
        self.vhost.route(
            &exchange,
            message.routing_key(),
            message.headers().as_ref(),
            &mut targets,
        );
        for queue in targets {
            if queue.publish_with(Message::clone(&message), Some(&guard))
                == PublishOutcome::Rejected
            {
                guard.failed("a queue refused the message (x-overflow)");
            }
        }
    }

    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError> {
        let queue = self
            .vhost
            .queue_by_name(source)
            .ok_or_else(|| BackendError::NotFound {
                backend: self.name.clone(),
                destination: source.to_string(),
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let consumer = Arc::new(ChannelConsumer {
            tag: format!("warren-{}", self.name),
            credit: Arc::new(AtomicU32::new(0)),
            prefetch: prefetch as u32,
            tx,
        });
        let as_dyn: Arc<dyn Consumer> = consumer.clone();
        queue
            .add_consumer(as_dyn.clone())
            .map_err(|e| BackendError::Rejected {
                backend: self.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(Box::new(EngineSubscription {
            queue,
            consumer: as_dyn,
            credit: consumer.credit.clone(),
            rx,
        }))
    }

    async fn declare(&self, destination: &str) -> Result<(), BackendError> {
        match self.vhost.queue_by_name(destination) {
            Some(_) => Ok(()),
            None => {
                self.vhost
                    .exchange(destination)
                    .map(|_| ())
                    .map_err(|_| BackendError::NotFound {
                        backend: self.name.clone(),
                        destination: destination.to_string(),
                    })
            }
        }
    }

    async fn depth(&self, destination: &str) -> Result<Option<u64>, BackendError> {
        Ok(self
            .vhost
            .queue_by_name(destination)
            .map(|q| q.message_count() as u64))
    }

    fn health(&self) -> Health {
        Health::Ready
    }

    async fn close(&self) {}
}

/// An engine consumer that forwards into a subscription, within its credit.
struct ChannelConsumer {
    tag: String,
    /// Messages handed out and not yet settled.
    credit: Arc<AtomicU32>,
    prefetch: u32,
    tx: mpsc::UnboundedSender<QueuedMessage>,
}

impl Consumer for ChannelConsumer {
    fn tag(&self) -> &str {
        &self.tag
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn offer(&self, _queue: &Arc<Queue>, message: QueuedMessage) -> Offer {
        if self.prefetch > 0 && self.credit.load(Ordering::Acquire) >= self.prefetch {
            return Offer::Refused(message);
        }
        self.credit.fetch_add(1, Ordering::AcqRel);
        match self.tx.send(message) {
            Ok(()) => Offer::Taken,
            Err(back) => {
                self.credit.fetch_sub(1, Ordering::AcqRel);
                Offer::Refused(back.0)
            }
        }
    }

    fn queue_deleted(&self, _queue: &Arc<Queue>) {}
}

struct EngineSubscription {
    queue: Arc<Queue>,
    consumer: Arc<dyn Consumer>,
    credit: Arc<AtomicU32>,
    rx: mpsc::UnboundedReceiver<QueuedMessage>,
}

#[async_trait]
impl Subscription for EngineSubscription {
    async fn next(&mut self) -> Option<Incoming> {
        let queued = self.rx.recv().await?;
        Some(Incoming {
            message: queued.message.clone(),
            redelivered: queued.redelivered,
            settle: Box::new(EngineSettle {
                queue: self.queue.clone(),
                credit: self.credit.clone(),
                message: parking_lot::Mutex::new(Some(queued)),
            }),
        })
    }
}

impl Drop for EngineSubscription {
    fn drop(&mut self) {
        self.queue.remove_consumer(&self.consumer);
        // Whatever was handed over but not yet read goes back.
        self.rx.close();
        let mut back = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            back.push(m);
        }
        if !back.is_empty() {
            self.queue.requeue(back);
        }
    }
}

struct EngineSettle {
    queue: Arc<Queue>,
    credit: Arc<AtomicU32>,
    message: parking_lot::Mutex<Option<QueuedMessage>>,
}

impl Settle for EngineSettle {
    fn settle(&self, outcome: Settlement) {
        let Some(msg) = self.message.lock().take() else {
            return;
        };
        self.credit.fetch_sub(1, Ordering::AcqRel);
        match outcome {
            Settlement::Ack => self.queue.ack([msg]),
            Settlement::Requeue => self.queue.requeue([msg]),
            Settlement::Reject => self.queue.reject([msg]),
        }
        self.queue.dispatch();
    }
}

/// Feeds a Warren queue from a backend's source: every message received is put in `queue`
/// with its settle handle, and settled at the target when the AMQP client is done with it.
/// Credit (the subscription's prefetch) bounds how many are held here at once.
pub fn spawn_queue_mapping(
    queue: Arc<Queue>,
    backend: Arc<dyn Backend>,
    source: String,
    prefetch: u16,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            if queue.is_deleted() {
                return;
            }
            let mut sub = match backend.subscribe(&source, prefetch).await {
                Ok(sub) => sub,
                Err(err) => {
                    tracing::warn!(backend = backend.name(), %source, %err, "cannot subscribe; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                    continue;
                }
            };
            backoff = std::time::Duration::from_millis(100);
            while let Some(incoming) = sub.next().await {
                let settle: Arc<dyn Settle> = Arc::new(SettleOnce {
                    inner: incoming.settle,
                    done: AtomicBool::new(false),
                });
                queue.publish_remote(incoming.message, incoming.redelivered, settle);
                if queue.is_deleted() {
                    return;
                }
            }
            tracing::warn!(backend = backend.name(), %source, "subscription ended; resubscribing");
            tokio::time::sleep(backoff).await;
        }
    })
}

/// Guarantees a settle handle is used once, whichever path reaches it first.
struct SettleOnce {
    inner: Box<dyn Settle>,
    done: AtomicBool,
}

impl Settle for SettleOnce {
    fn settle(&self, outcome: Settlement) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.inner.settle(outcome);
        }
    }
}

impl Drop for SettleOnce {
    /// A message dropped without a decision goes back to its target.
    fn drop(&mut self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.inner.settle(Settlement::Requeue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::QueueOptions;
    use bytes::Bytes;

    fn msg(body: &'static [u8]) -> Message {
        Message::new(
            "".into(),
            "q".into(),
            Default::default(),
            Bytes::from_static(body),
        )
    }

    #[tokio::test]
    async fn embedded_backend_publishes_and_subscribes_with_credit() {
        let vhost = VHost::new("/");
        vhost
            .declare_queue("q", false, QueueOptions::default(), 1)
            .unwrap();
        let backend = EmbeddedBackend::new("local", vhost.clone());
        for body in [&b"a"[..], b"b", b"c"] {
            backend.publish("", msg(body), crate::backend::no_wait());
        }
        assert_eq!(backend.depth("q").await.unwrap(), Some(3));
        let mut sub = backend.subscribe("q", 2).await.unwrap();
        let first = sub.next().await.unwrap();
        let second = sub.next().await.unwrap();
        assert_eq!(&first.message.body(), b"a");
        assert_eq!(&second.message.body(), b"b");
        // Credit 2 is used up: the third waits until one is settled.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), sub.next())
                .await
                .is_err()
        );
        first.settle.settle(Settlement::Ack);
        let third = sub.next().await.unwrap();
        assert_eq!(&third.message.body(), b"c");
        second.settle.settle(Settlement::Requeue);
        let again = sub.next().await.unwrap();
        assert_eq!(&again.message.body(), b"b");
        assert!(again.redelivered);
        assert!(backend.declare("q").await.is_ok());
        assert!(backend.declare("nope").await.is_err());
    }
}
