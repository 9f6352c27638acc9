//! The Redis Streams bridge: a `Backend` whose destinations and sources are stream keys.
//!
//! # Client library
//!
//! The [redis] crate (async, Tokio), with a `MultiplexedConnection`: one connection that
//! pipelines every publish (XADD), acknowledgement (XACK), claim and dead-letter command of the
//! bridge. Each subscription adds one connection of its own for its blocking `XREADGROUP`
//! (a `BLOCK` read holds its connection until it returns, so sharing it would stall publishes
//! for up to `block_ms`).
//!
//! # Task layout
//!
//! - One **engine task** (`engine.rs`) owns the shared connection and runs the state machine
//!   `Connecting → Ready → Degraded → Connecting` (`Degraded` backs off, exponential with
//!   jitter between `retry.initial_backoff_ms` and `retry.max_backoff_ms`), logging each change.
//! - [`Backend::publish`] never blocks: it maps the message to its fields once and hands it to
//!   the engine over an unbounded channel (the gateway's confirm window bounds it). The engine
//!   sends up to 256 waiting messages as one pipeline of `XADD key [MAXLEN ~ n] * field value
//!   ...` and releases their guards when the replies are in. On an error every message of the
//!   batch counts one failed attempt and goes back to the front, to be resent (in order) once
//!   reconnected; a message past `retry.max_attempts` failed attempts (0: unlimited) gets
//!   `guard.failed(..)`. A failed connection attempt counts one attempt for every waiting
//!   message.
//! - Subscriptions (`consume.rs`): consumer group reads, see there.
//!
//! # Delivery guarantees
//!
//! At least once. A guard is released when Redis replied to the XADD: the entry is in the
//! server's memory, and on disk as far as the server's persistence settings say (with
//! `appendonly yes` + `appendfsync always`, the reply comes after the fsync; with the default
//! `appendfsync everysec` up to a second of confirmed entries can be lost if the Redis host
//! crashes). An XADD whose reply was lost with the connection is resent, so **an entry can be
//! appended twice**; the Redis entry ID differs, the `message_id` field (when the publisher
//! set one) does not.

mod consume;
mod engine;
pub mod mapping;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, watch};
use warren_backends::store::Guard;
use warren_backends::{Backend, BackendError, Health, Message, Subscription};
use warren_config::file::{RedisBackend, RetryConfig};

use crate::engine::EngineTask;
pub(crate) use crate::retry::backoff_delay;
use crate::retry::Owed;
use crate::status::LinkStatus;
pub(crate) use crate::status::State;
use crate::BridgeError;

/// How long `declare`, `depth` and settlements wait for the shared connection.
const CONNECTION_WAIT: Duration = Duration::from_secs(10);

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Messages handed to `publish`.
    pub published: AtomicU64,
    /// Messages Redis replied to an XADD for; their guards were released.
    pub confirmed: AtomicU64,
    /// XADDs sent again after a failure.
    pub resent: AtomicU64,
    /// Messages given up on: `guard.failed(..)` was called.
    pub failed: AtomicU64,
    /// Connections established by the engine (1 + reconnections).
    pub connections: AtomicU64,
    /// Entries moved to the dead-letter stream (or dropped when there is none).
    pub dead_lettered: AtomicU64,
}

/// A message the bridge owes a completion for.
pub(crate) struct Pending {
    pub(crate) stream: String,
    pub(crate) fields: Vec<(String, Vec<u8>)>,
    /// Sent at least once (so a further XADD is a resend).
    pub(crate) sent: bool,
    pub(crate) owed: Owed,
}

impl Pending {
    /// Redis has it: releasing the guard confirms it.
    pub(crate) fn confirmed(self) {
        self.owed.confirmed();
    }

    pub(crate) fn fail(self, reason: &str) {
        self.owed.fail(reason);
    }
}

impl AsMut<Owed> for Pending {
    fn as_mut(&mut self) -> &mut Owed {
        &mut self.owed
    }
}

pub(crate) struct Shared {
    pub(crate) name: String,
    /// The URL without its password.
    pub(crate) target: String,
    pub(crate) client: redis::Client,
    pub(crate) config: RedisBackend,
    pub(crate) stats: RedisStats,
    status: LinkStatus,
    /// The engine's connection while `Ready`.
    pub(crate) connection: watch::Sender<Option<MultiplexedConnection>>,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(crate) fn retry(&self) -> &RetryConfig {
        &self.config.retry
    }

    pub(crate) fn set_state(&self, state: State, error: Option<String>) {
        self.status.set(&self.name, &self.target, state, error);
    }

    fn health(&self) -> Health {
        self.status.health()
    }

    /// The shared connection, waiting up to `wait` for the engine to (re)connect.
    pub(crate) async fn wait_connection(
        &self,
        wait: Duration,
    ) -> Result<MultiplexedConnection, BackendError> {
        let mut conn = self.connection.subscribe();
        let mut closed = self.closed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *closed.borrow() {
                return Err(self.closed_error());
            }
            if let Some(c) = conn.borrow_and_update().clone() {
                return Ok(c);
            }
            tokio::select! {
                _ = conn.changed() => {}
                _ = closed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let reason = self.status.last_error();
                    return Err(self.connect_error(reason.unwrap_or_else(|| "not connected".into())));
                }
            }
        }
    }

    /// Drops the shared connection after a failure on it, so the engine reconnects.
    pub(crate) fn connection_failed(&self, err: &redis::RedisError) {
        if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() {
            self.connection.send_replace(None);
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

    fn rejected(&self, reason: impl Into<String>) -> BackendError {
        BackendError::Rejected {
            backend: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// The URL as it may be shown: without the password.
fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The redis crate's client for `config.url`: `rediss://` is TLS (rustls), the server's
/// certificate checked against the certificates of `ca_file` or, without one, the system's
/// trust store.
fn client(config: &RedisBackend) -> Result<redis::Client, String> {
    let tls = config.url.starts_with("rediss://");
    if tls {
        crate::tls::install_default_provider();
    }
    match (&config.ca_file, tls) {
        (None, _) => redis::Client::open(config.url.as_str()).map_err(|e| format!("url: {e}")),
        (Some(_), false) => Err("ca_file: only with a rediss:// URL".into()),
        (Some(path), true) => {
            let root_cert = crate::tls::read_ca_file(path)?;
            redis::Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(|e| format!("url: {e}"))
        }
    }
}

/// The Redis Streams bridge. Build one with [`RedisBridge::start`] (or [`crate::build`]).
pub struct RedisBridge {
    shared: Arc<Shared>,
    engine: EngineTask<Pending>,
}

impl RedisBridge {
    /// Validates `config` and spawns the engine task, which connects in the background: a
    /// Redis that is down now is not an error. Must be called inside a Tokio runtime.
    pub fn start(name: &str, config: &RedisBackend) -> Result<Arc<RedisBridge>, BridgeError> {
        let invalid = |reason: String| BridgeError::Config {
            backend: name.to_string(),
            reason,
        };
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime {
                backend: name.to_string(),
            })?;
        let client = client(config).map_err(invalid)?;
        if config.max_deliveries == 0 {
            return Err(invalid("max_deliveries must be at least 1".into()));
        }
        let shared = Arc::new(Shared {
            name: name.to_string(),
            target: redact(&config.url),
            client,
            config: config.clone(),
            stats: RedisStats::default(),
            status: LinkStatus::new("redis"),
            connection: watch::channel(None).0,
            closed: watch::channel(false).0,
            runtime: runtime.clone(),
        });
        let engine = EngineTask::spawn(&runtime, |rx| engine::run(shared.clone(), rx));
        Ok(Arc::new(RedisBridge { shared, engine }))
    }

    pub fn stats(&self) -> &RedisStats {
        &self.shared.stats
    }
}

#[async_trait]
impl Backend for RedisBridge {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            stream: destination.to_string(),
            fields: mapping::to_fields(&message),
            sent: false,
            owed: Owed::new(guard),
        };
        let refused = if self.shared.is_closed() {
            Some(pending)
        } else {
            self.engine.send(pending).err()
        };
        if let Some(p) = refused {
            p.fail(&format!("redis bridge '{}' is closed", self.shared.name));
        }
    }

    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError> {
        if self.shared.is_closed() {
            return Err(self.shared.closed_error());
        }
        Ok(Box::new(consume::RedisSubscription::new(
            self.shared.clone(),
            source,
            prefetch,
        )))
    }

    /// A stream needs no declaring (XADD creates it); this checks that the key is a stream or
    /// absent.
    async fn declare(&self, destination: &str) -> Result<(), BackendError> {
        let mut conn = self.shared.wait_connection(CONNECTION_WAIT).await?;
        let kind: String = redis::cmd("TYPE")
            .arg(destination)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.shared.connect_error(e.to_string()))?;
        match kind.as_str() {
            "stream" | "none" => Ok(()),
            other => Err(self
                .shared
                .rejected(format!("key '{destination}' is a {other}, not a stream"))),
        }
    }

    async fn depth(&self, destination: &str) -> Result<Option<u64>, BackendError> {
        let mut conn = self.shared.wait_connection(CONNECTION_WAIT).await?;
        let len: u64 = redis::cmd("XLEN")
            .arg(destination)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.shared.connect_error(e.to_string()))?;
        Ok(Some(len))
    }

    fn health(&self) -> Health {
        self.shared.health()
    }

    async fn close(&self) {
        self.shared.closed.send_replace(true);
        self.engine.join().await;
        self.shared.set_state(State::Closed, None);
        self.shared.connection.send_replace(None);
    }
}

/// Takes every message waiting in `rx` into `buffer`, without waiting.
pub(crate) fn drain(rx: &mut mpsc::UnboundedReceiver<Pending>, buffer: &mut VecDeque<Pending>) {
    while let Ok(p) = rx.try_recv() {
        buffer.push_back(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_the_password() {
        assert_eq!(redact("redis://u:secret@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
