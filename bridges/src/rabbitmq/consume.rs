//! Subscriptions: a consumer on an upstream queue, on its own channel of the engine's
//! connection, with `basic.qos(prefetch)` and manual acknowledgements.
//!
//! Settling maps to RabbitMQ as:
//!
//! | `Settlement` | RabbitMQ                                   |
//! |--------------|--------------------------------------------|
//! | `Ack`        | `basic.ack`                                |
//! | `Requeue`    | `basic.nack(requeue = true)`               |
//! | `Reject`     | `basic.reject(requeue = false)`: dropped, or dead-lettered if the queue has a dead-letter exchange |
//!
//! When the channel or the connection dies the subscription waits for the engine's next
//! connection (backing off between failed attempts) and consumes again. Settling a delivery of
//! the dead channel does nothing: RabbitMQ requeued it when the channel closed and delivers it
//! again (with `redelivered` set). A settle handle dropped without being used requeues.
//!
//! A channel stays open while the subscription or any unsettled delivery from it needs it; the
//! last one to let go closes it (RabbitMQ then requeues whatever was delivered and not settled,
//! such as prefetched messages the subscription never handed out).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, Channel, Connection};
use tokio::sync::watch;
use warren_backends::{Incoming, Settle, Settlement, Subscription};

use super::{mapping, Shared};

/// Keeps a channel, and the connection under it, open for as long as it is needed.
struct ChannelHold {
    channel: Channel,
    _connection: Arc<Connection>,
    runtime: tokio::runtime::Handle,
}

impl Drop for ChannelHold {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        self.runtime.spawn(async move {
            let _ = channel.close(200, "OK".into()).await;
        });
    }
}

struct Active {
    hold: Arc<ChannelHold>,
    consumer: lapin::Consumer,
}

pub(super) struct RabbitSubscription {
    shared: Arc<Shared>,
    source: ShortString,
    prefetch: u16,
    active: Option<Active>,
    /// Consecutive failures to consume, for the backoff.
    failures: u32,
    connection: watch::Receiver<Option<Arc<Connection>>>,
    closed: watch::Receiver<bool>,
}

enum Step {
    Delivery(Box<Option<lapin::Result<Delivery>>>),
    Closed,
}

impl RabbitSubscription {
    pub(super) fn new(shared: Arc<Shared>, source: &str, prefetch: u16) -> RabbitSubscription {
        RabbitSubscription {
            connection: shared.connection.subscribe(),
            closed: shared.closed.subscribe(),
            shared,
            source: source.into(),
            prefetch,
            active: None,
            failures: 0,
        }
    }

    /// Opens the channel and starts consuming on `conn`.
    pub(super) async fn open_on(&mut self, conn: &Arc<Connection>) -> lapin::Result<()> {
        let channel = conn.create_channel().await?;
        let hold = Arc::new(ChannelHold {
            channel: channel.clone(),
            _connection: conn.clone(),
            runtime: self.shared.runtime.clone(),
        });
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.source.clone(),
                // The server names it.
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(
            backend = %self.shared.name, source = %self.source, prefetch = self.prefetch,
            "consuming from the upstream queue"
        );
        self.active = Some(Active { hold, consumer });
        self.failures = 0;
        Ok(())
    }

    /// Sleeps the backoff for the current failure count; `false` if closed meanwhile.
    async fn pause(&mut self) -> bool {
        self.failures = self.failures.saturating_add(1);
        let delay: Duration = self.shared.backoff(self.failures);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.closed.wait_for(|c| *c) => false,
        }
    }

    fn incoming(&self, delivery: Delivery, hold: Arc<ChannelHold>) -> Incoming {
        let Delivery {
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = delivery;
        Incoming {
            message: mapping::message_from_upstream(exchange, routing_key, &properties, data),
            redelivered,
            settle: Box::new(RabbitSettle {
                acker,
                hold,
                done: AtomicBool::new(false),
            }),
        }
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Incoming> {
        loop {
            if *self.closed.borrow() {
                self.active = None;
                return None;
            }
            if self.active.is_none() {
                let conn = tokio::select! {
                    c = self.connection.wait_for(|c| c.is_some()) => c.ok().and_then(|c| c.clone()),
                    _ = self.closed.wait_for(|c| *c) => None,
                };
                let conn = conn?;
                if let Err(e) = self.open_on(&conn).await {
                    tracing::warn!(
                        backend = %self.shared.name, source = %self.source, error = %e,
                        "cannot consume from the upstream queue; retrying after a backoff"
                    );
                    if !self.pause().await {
                        return None;
                    }
                    continue;
                }
            }
            let active = self.active.as_mut().expect("opened above");
            let step = tokio::select! {
                d = active.consumer.next() => Step::Delivery(Box::new(d)),
                _ = self.closed.wait_for(|c| *c) => Step::Closed,
            };
            match step {
                Step::Closed => {
                    self.active = None;
                    return None;
                }
                Step::Delivery(delivery) => {
                    let reason = match *delivery {
                        Some(Ok(delivery)) => {
                            let hold = self.active.as_ref().expect("active").hold.clone();
                            return Some(self.incoming(delivery, hold));
                        }
                        Some(Err(e)) => e.to_string(),
                        None => "the consumer was cancelled (queue deleted?)".to_string(),
                    };
                    tracing::warn!(
                        backend = %self.shared.name, source = %self.source, error = %reason,
                        "lost the upstream consumer; resubscribing"
                    );
                    self.active = None;
                    if !self.pause().await {
                        return None;
                    }
                }
            }
        }
    }
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        // Stop deliveries now; the channel itself closes once every handed-out message is
        // settled (see `ChannelHold`).
        if let Some(active) = self.active.take() {
            let tag = active.consumer.tag();
            let hold = active.hold.clone();
            self.shared.runtime.spawn(async move {
                let _ = hold
                    .channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await;
                drop(hold);
            });
        }
    }
}

struct RabbitSettle {
    acker: Acker,
    hold: Arc<ChannelHold>,
    done: AtomicBool,
}

impl Settle for RabbitSettle {
    fn settle(&self, outcome: Settlement) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let acker = self.acker.clone();
        let hold = self.hold.clone();
        self.hold.runtime.spawn(async move {
            let result = match outcome {
                Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
                Settlement::Requeue => {
                    acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await
                }
                Settlement::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
            };
            match result {
                Ok(true) => {}
                // The channel is gone: RabbitMQ requeued the message and redelivers it.
                Ok(false) | Err(_) => tracing::debug!(
                    ?outcome,
                    "settle for a delivery of a closed channel ignored; RabbitMQ redelivers it"
                ),
            }
            drop(hold);
        });
    }
}

impl Drop for RabbitSettle {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) {
            self.settle(Settlement::Requeue);
        }
    }
}
