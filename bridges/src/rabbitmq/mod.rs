//! The upstream AMQP 0-9-1 bridge: a `Backend` whose target is a RabbitMQ (or any AMQP 0-9-1)
//! broker.
//!
//! # Client library
//!
//! Built on [lapin] rather than amqprs: lapin is actively maintained, lets many
//! `basic.publish` be in flight on one confirm-mode channel with each `PublisherConfirm`
//! awaited on its own (so confirms pipeline instead of costing a round trip per message), and
//! is the most widely used AMQP 0-9-1 client in the Rust ecosystem (Warren's own interop tests
//! already use it).
//!
//! # Task layout
//!
//! - One **engine task** per bridge (`engine.rs`) owns the lapin `Connection` and a
//!   confirm-mode channel, and runs the connection state machine
//!   `Connecting → Ready → Degraded → Connecting` (`Degraded` backs off, exponential with
//!   jitter between `retry.initial_backoff_ms` and `retry.max_backoff_ms`). Every state change is logged.
//! - [`Backend::publish`] never blocks: it maps the properties and hands the message to the
//!   engine through a bounded queue of `max_in_flight` entries (`publish.rs`). When that queue
//!   is full the message goes to an overflow `VecDeque` behind a mutex instead (it is the
//!   gateway's own flow control, not this queue, that bounds memory); the engine drains the
//!   queue first and the overflow after it, which keeps publish order.
//! - In `Ready`, the engine keeps up to `max_in_flight` publishes unconfirmed: it writes them in
//!   batches (all frames of a batch are queued before any is awaited) and awaits their
//!   `PublisherConfirm`s concurrently in a `FuturesUnordered`. A message's guard is released
//!   when RabbitMQ acks it; a nack puts it back for a later resend (after a backoff), a
//!   connection or channel failure puts every unconfirmed message back, to be resent first
//!   once reconnected.
//! - Subscriptions (`consume.rs`) open their own channel on the engine's current connection
//!   (`basic.qos(prefetch)`, `basic.consume` with manual acks) and, when it dies, wait for the
//!   engine's next connection and resume, backing off between failures.
//! - `declare`, `depth`: passive declares on a short-lived channel of the current connection.
//!
//! # Delivery guarantees
//!
//! At least once. A message whose guard is released has been confirmed by RabbitMQ. A message
//! published but unconfirmed when the connection fails is resent: **RabbitMQ does not
//! deduplicate, so it may arrive twice**. Every message goes up with a `message-id` (the
//! publisher's, or `warren-<instance>-<n>` set once and kept across resends) so consumers or a
//! deduplicating target can drop the copy. A message published to an exchange with no matching
//! binding is acked and dropped by RabbitMQ, as for any publisher (give the upstream exchange
//! an alternate exchange to keep those).
//!
//! Each message has a budget of `retry.max_attempts` failed attempts (0: unlimited). A failed
//! attempt is: a nack, a connection or channel failure while it was unconfirmed, its exchange
//! found missing upstream, or a failed connection attempt while it waited. Once the budget is
//! spent the bridge calls `guard.failed(..)` with the last cause and drops it: the publisher
//! gets basic.nack.
//!
//! # Property mapping
//!
//! See [`mapping`] for the table (also in `bridges/README.md`).

mod consume;
mod engine;
pub mod mapping;
mod publish;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Connection, ExchangeKind};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_backends::store::Guard;
use warren_backends::{Backend, BackendError, Health, Message, Subscription};
use warren_config::file::{RabbitmqBackend, RetryConfig};

use crate::retry::backoff_delay;
use crate::status::LinkStatus;
pub(crate) use crate::status::State;
use crate::BridgeError;
use mapping::MessageIds;
use publish::{Pending, PublishQueue};

/// How long `declare`, `depth` and `subscribe` wait for the engine to be connected.
const CONNECTION_WAIT: Duration = Duration::from_secs(10);

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Messages handed to `publish`.
    pub published: AtomicU64,
    /// Messages confirmed (acked) by RabbitMQ; their guards were released.
    pub confirmed: AtomicU64,
    /// basic.publish frames written again after a nack or a connection failure.
    pub resent: AtomicU64,
    /// Messages given up on: `guard.failed(..)` was called.
    pub failed: AtomicU64,
    /// The most publishes awaiting their confirm at once.
    pub peak_in_flight: AtomicU64,
    /// Connections established (1 + reconnections).
    pub connections: AtomicU64,
}

/// What the engine, the subscriptions and the `Backend` methods share.
pub(crate) struct Shared {
    pub(crate) name: String,
    /// The URL without its password, for errors and logs.
    pub(crate) target: String,
    pub(crate) uri: AMQPUri,
    /// The user the bridge connects as: the only `user-id` RabbitMQ accepts from it.
    pub(crate) user: String,
    pub(crate) retry: RetryConfig,
    pub(crate) max_in_flight: usize,
    pub(crate) ids: MessageIds,
    pub(crate) stats: BridgeStats,
    status: LinkStatus,
    /// The engine's connection while it is `Ready`, `None` otherwise.
    pub(crate) connection: watch::Sender<Option<Arc<Connection>>>,
    /// Set once by `close()`.
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Moves the state machine, logging the change.
    pub(crate) fn set_state(&self, state: State, error: Option<String>) {
        self.status.set(&self.name, &self.target, state, error);
    }

    /// RabbitMQ blocked the connection (a resource alarm: publishes stall until unblocked), or
    /// unblocked it.
    pub(crate) fn set_blocked(&self, reason: Option<String>) {
        match &reason {
            Some(r) => {
                tracing::warn!(backend = %self.name, reason = %r, "RabbitMQ blocked the connection")
            }
            None => tracing::info!(backend = %self.name, "RabbitMQ unblocked the connection"),
        }
        self.status
            .set_blocked(reason.map(|r| format!("blocked by RabbitMQ: {r}")));
    }

    /// The delay before retry number `failures` (1-based).
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        backoff_delay(&self.retry, failures)
    }

    /// The engine's connection, waiting (up to `wait`) while a connection attempt is under
    /// way. Fails at once while the engine backs off after a failure: the target is down.
    pub(crate) async fn wait_connection(
        &self,
        wait: Duration,
    ) -> Result<Arc<Connection>, BackendError> {
        let mut conn = self.connection.subscribe();
        let mut closed = self.closed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *closed.borrow() {
                return Err(self.closed_error());
            }
            let current = conn.borrow_and_update().clone();
            if let Some(c) = current {
                return Ok(c);
            }
            let backing_off = self.status.state() == State::Degraded;
            if backing_off || tokio::time::Instant::now() >= deadline {
                return Err(self.connect_error(
                    self.status
                        .last_error()
                        .unwrap_or_else(|| "not connected".to_string()),
                ));
            }
            // Woken by a new connection or close; the state is polled meanwhile.
            tokio::select! {
                _ = conn.changed() => {}
                _ = closed.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    pub(crate) fn connect_error(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Connect {
            backend: self.name.clone(),
            target: self.target.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) fn closed_error(&self) -> BackendError {
        BackendError::Closed {
            backend: self.name.clone(),
        }
    }

    fn not_found(&self, destination: &str) -> BackendError {
        BackendError::NotFound {
            backend: self.name.clone(),
            destination: destination.to_string(),
        }
    }
}

/// A lapin error that is RabbitMQ saying "404 NOT_FOUND".
pub(crate) fn is_not_found(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
    )
}

/// The URL as it may be shown: without the password.
fn redact(uri: &AMQPUri) -> String {
    let auth = &uri.authority;
    let vhost = if uri.vhost == "/" {
        "%2f".to_string()
    } else {
        uri.vhost.clone()
    };
    format!(
        "{}://{}@{}:{}/{}",
        match uri.scheme {
            lapin::uri::AMQPScheme::AMQP => "amqp",
            lapin::uri::AMQPScheme::AMQPS => "amqps",
        },
        auth.userinfo.username,
        auth.host,
        auth.port,
        vhost
    )
}

/// The upstream AMQP 0-9-1 bridge. Build one with [`RabbitmqBridge::start`] (or
/// [`crate::build`]).
pub struct RabbitmqBridge {
    shared: Arc<Shared>,
    queue: PublishQueue,
    engine: Mutex<Option<JoinHandle<()>>>,
}

impl RabbitmqBridge {
    /// Validates `config` and spawns the engine task, which connects in the background: a
    /// target that is down now is not an error. Must be called inside a Tokio runtime.
    pub fn start(name: &str, config: &RabbitmqBackend) -> Result<Arc<RabbitmqBridge>, BridgeError> {
        let invalid = |reason: String| BridgeError::Config {
            backend: name.to_string(),
            reason,
        };
        let uri: AMQPUri = config
            .url
            .parse()
            .map_err(|e| invalid(format!("url: {e}")))?;
        if config.max_in_flight == 0 {
            return Err(invalid("max_in_flight must be at least 1".into()));
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime {
                backend: name.to_string(),
            })?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            target: redact(&uri),
            user: uri.authority.userinfo.username.clone(),
            uri,
            retry: config.retry.clone(),
            max_in_flight: config.max_in_flight,
            ids: MessageIds::new(),
            stats: BridgeStats::default(),
            status: LinkStatus::new("rabbitmq"),
            connection: watch::Sender::new(None),
            closed: watch::Sender::new(false),
            runtime: runtime.clone(),
        });
        let (queue, intake) = publish::queue(config.max_in_flight);
        tracing::info!(
            backend = %shared.name, target = %shared.target,
            max_in_flight = config.max_in_flight, max_attempts = config.retry.max_attempts,
            "starting rabbitmq bridge"
        );
        let engine = runtime.spawn(engine::run(shared.clone(), intake));
        Ok(Arc::new(RabbitmqBridge {
            shared,
            queue,
            engine: Mutex::new(Some(engine)),
        }))
    }

    /// The bridge's counters.
    pub fn stats(&self) -> &BridgeStats {
        &self.shared.stats
    }

    /// A short-lived channel on the current connection.
    async fn channel(&self) -> Result<(Arc<Connection>, lapin::Channel), BackendError> {
        let conn = self.shared.wait_connection(CONNECTION_WAIT).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| self.shared.connect_error(e.to_string()))?;
        Ok((conn, channel))
    }

    /// `Some(message count)` if `queue` exists, `None` if RabbitMQ says it does not.
    async fn passive_queue(&self, queue: &str) -> Result<Option<u32>, BackendError> {
        let (_conn, channel) = self.channel().await?;
        let result = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match result {
            Ok(q) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(Some(q.message_count()))
            }
            // The server closed the channel: nothing to clean up.
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.shared.connect_error(e.to_string())),
        }
    }

    async fn passive_exchange(&self, exchange: &str) -> Result<bool, BackendError> {
        let (_conn, channel) = self.channel().await?;
        let result = channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match result {
            Ok(()) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.shared.connect_error(e.to_string())),
        }
    }
}

#[async_trait]
impl Backend for RabbitmqBridge {
    fn name(&self) -> &str {
        &self.shared.name
    }

    /// Publishes to the upstream exchange `destination` with the message's own routing key.
    /// Never blocks; see the module documentation for what happens to `guard`.
    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        let shared = &self.shared;
        shared.stats.published.fetch_add(1, Ordering::Relaxed);
        if shared.is_closed() {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            guard.failed(&format!("{}: the bridge is closed", shared.name));
            return;
        }
        let properties = match mapping::to_upstream(&message, &shared.user, &shared.ids) {
            Ok(p) => p,
            Err(mapping::Unpublishable(reason)) => {
                shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                guard.failed(&format!("{}: {reason}", shared.name));
                return;
            }
        };
        let pending = Pending::new(destination.into(), message, properties, guard);
        if let Err(pending) = self.queue.push(pending) {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            pending.fail(&format!("{}: the bridge is closed", shared.name));
        }
    }

    /// A consumer on the upstream queue `source`. Fails only if the bridge is closed or
    /// RabbitMQ says the queue does not exist; if the target cannot be reached within a few
    /// seconds the subscription is returned anyway and connects inside
    /// [`Subscription::next`].
    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        let mut sub = consume::RabbitSubscription::new(self.shared.clone(), source, prefetch);
        // Right after start the first connection may still be on its way.
        match self.shared.wait_connection(CONNECTION_WAIT).await {
            Err(e @ BackendError::Closed { .. }) => return Err(e),
            Err(_) => {}
            Ok(conn) => match sub.open_on(&conn).await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => return Err(self.shared.not_found(source)),
                // Anything else is transient: `next()` retries.
                Err(e) => tracing::warn!(
                    backend = %self.shared.name, source, error = %e,
                    "cannot subscribe yet; will retry"
                ),
            },
        }
        Ok(Box::new(sub))
    }

    /// Checks that `destination` exists upstream as an exchange or a queue (passive declares:
    /// the bridge never creates anything upstream).
    async fn declare(&self, destination: &str) -> Result<(), BackendError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        // The default exchange always exists, and RabbitMQ refuses to declare it.
        if destination.is_empty() || self.passive_exchange(destination).await? {
            return Ok(());
        }
        match self.passive_queue(destination).await? {
            Some(_) => Ok(()),
            None => Err(self.shared.not_found(destination)),
        }
    }

    /// The upstream queue's ready message count (passive queue declare).
    async fn depth(&self, destination: &str) -> Result<Option<u64>, BackendError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        match self.passive_queue(destination).await? {
            Some(count) => Ok(Some(u64::from(count))),
            None => Err(self.shared.not_found(destination)),
        }
    }

    fn health(&self) -> Health {
        self.shared.status.health()
    }

    /// Stops accepting publishes, gives unconfirmed ones a few seconds to be confirmed, fails
    /// the rest, closes the connection and ends the subscriptions.
    async fn close(&self) {
        self.shared.closed.send_replace(true);
        let engine = self.engine.lock().take();
        if let Some(engine) = engine {
            let _ = engine.await;
        }
        self.shared.set_state(State::Closed, None);
    }
}

impl Drop for RabbitmqBridge {
    fn drop(&mut self) {
        // Dropping the publish queue's sender ends the engine too; this makes it immediate.
        self.shared.closed.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_shown_without_its_password() {
        let uri: AMQPUri = "amqp://bridge:s3cret@rabbit.example:5673/prod"
            .parse()
            .unwrap();
        assert_eq!(redact(&uri), "amqp://bridge@rabbit.example:5673/prod");
        let uri: AMQPUri = "amqp://guest:guest@127.0.0.1:5699/%2f".parse().unwrap();
        assert_eq!(redact(&uri), "amqp://guest@127.0.0.1:5699/%2f");
    }
}
