//! The Kafka bridge: a `Backend` whose destinations and sources are Kafka topics.
//!
//! # Client library
//!
//! [rdkafka] 0.39 over librdkafka 2.12 (compiled from source by `rdkafka-sys`, with OpenSSL
//! for TLS and SASL/SCRAM, zlib and zstd). librdkafka is the client most Kafka-protocol
//! services test against (Azure Event Hubs, Confluent Cloud, Redpanda, MSK).
//!
//! # Publishing
//!
//! One `ThreadedProducer` per bridge (`acks=all`, `enable.idempotence`, `compression.type`,
//! `linger.ms`, `message.timeout.ms` from the configuration). [`Backend::publish`] never
//! blocks: it hands the message to the **engine task** over an unbounded channel (the gateway's
//! confirm window bounds it). The engine maps it to a record (`mapping.rs`) and produces it;
//! librdkafka batches, compresses, retries and keeps order per partition by itself. The
//! publisher's guard travels with the record as its delivery opaque and is released in the
//! delivery report callback when the broker acknowledged the record (with `acks=all`: every
//! in-sync replica has it). A failed delivery report (librdkafka gave up after
//! `delivery_timeout_ms`, or a permanent error such as a record too large) counts one of
//! `retry.max_attempts`; the record is produced again after a backoff, and past the budget the
//! guard is failed (basic.nack). Permanent errors fail at once.
//!
//! A fatal error of the idempotent producer (the broker lost the producer's state, e.g. a
//! restarted broker without persistent storage) makes librdkafka refuse every further send:
//! the engine then builds a new producer, and the old one's records come back through their
//! (purged) delivery reports and are produced again, each charged one attempt.
//!
//! # Consuming
//!
//! See `consume.rs`: a consumer group per queue mapping, manual offset commits up to the
//! lowest unacknowledged offset of each partition.
//!
//! # Delivery guarantees
//!
//! At least once both ways. A record produced again after a failed delivery report may be in
//! the topic twice (the idempotent producer only removes duplicates of its own internal
//! retries); its `x-amqp-message-id` header (when the publisher set one) identifies it.

mod consume;
pub mod mapping;

use crate::retry::backoff_delay;
use crate::status::LinkStatus;
pub(crate) use crate::status::State;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use warren_backends::store::Guard;
use warren_backends::{Backend, BackendError, Health, Message, Subscription};
use warren_config::file::{KafkaBackend, RetryConfig};

use crate::BridgeError;

/// How long `declare` waits for the cluster's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// Messages handed to `publish`.
    pub published: AtomicU64,
    /// Records the broker acknowledged; their guards were released.
    pub confirmed: AtomicU64,
    /// Records produced again after a failed delivery report.
    pub resent: AtomicU64,
    /// Messages given up on: `guard.failed(..)` was called.
    pub failed: AtomicU64,
    /// Producers built (1 + those rebuilt after a fatal error).
    pub producers: AtomicU64,
    /// Offset commits sent by subscriptions.
    pub commits: AtomicU64,
}

/// A message the bridge owes a completion for; it rides through librdkafka as the record's
/// delivery opaque.
pub(crate) struct Pending {
    topic: Arc<str>,
    /// The record is mapped from the message each time it is produced (see the engine).
    message: Message,
    attempts: u32,
    guard: Option<Guard>,
}

impl Pending {
    fn confirmed(mut self) {
        self.guard.take();
    }

    fn fail(mut self, reason: &str) {
        if let Some(g) = self.guard.take() {
            g.failed(reason);
        }
    }
}

impl Drop for Pending {
    /// A pending message is only ever dropped through `confirmed` or `fail`; anything else
    /// (a panic, a producer torn down without its reports) must not look like a confirm.
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            g.failed("kafka bridge dropped the message");
        }
    }
}

pub(crate) struct Shared {
    pub(crate) name: String,
    /// The bootstrap servers (no credentials in them).
    pub(crate) target: String,
    pub(crate) config: KafkaBackend,
    pub(crate) stats: KafkaStats,
    status: LinkStatus,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) runtime: tokio::runtime::Handle,
    /// Set by the producer's error callback on a fatal error: the engine rebuilds it.
    producer_fatal: AtomicBool,
    /// The topic last published to, shared by the pending messages for it: a bridge mostly
    /// publishes to few topics, so this spares an allocation per message.
    last_topic: Mutex<Arc<str>>,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn retry(&self) -> &RetryConfig {
        &self.config.retry
    }

    pub(crate) fn set_state(&self, state: State, error: Option<String>) {
        self.status.set(&self.name, &self.target, state, error);
    }

    fn health(&self) -> Health {
        self.status.health()
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

    /// The librdkafka settings every client of this bridge shares: servers, identity,
    /// security. The producer and consumers add their own, then `options` go on top.
    pub(crate) fn base_config(&self) -> ClientConfig {
        let cfg = &self.config;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.bootstrap_servers)
            .set("client.id", &cfg.client_id)
            .set("security.protocol", cfg.security_protocol.as_librdkafka());
        if let Some(m) = &cfg.sasl_mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(u) = &cfg.sasl_username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &cfg.sasl_password {
            c.set("sasl.password", p);
        }
        if let Some(ca) = &cfg.ssl_ca_location {
            c.set("ssl.ca.location", ca);
        }
        // librdkafka's own log lines go to `tracing` (below) instead of stderr.
        c.set_log_level(RDKafkaLogLevel::Info);
        c
    }

    pub(crate) fn apply_options(&self, c: &mut ClientConfig) {
        for (k, v) in &self.config.options {
            c.set(k, v);
        }
    }

    fn producer_config(&self) -> ClientConfig {
        let cfg = &self.config;
        let mut c = self.base_config();
        c.set("acks", "all")
            .set(
                "enable.idempotence",
                if cfg.idempotence { "true" } else { "false" },
            )
            .set("compression.type", &cfg.compression)
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("message.timeout.ms", cfg.delivery_timeout_ms.to_string());
        self.apply_options(&mut c);
        c
    }

    /// Counts a failed attempt of `pending` and produces it again after a backoff, or fails it
    /// once its budget is spent (or the error is permanent, or the bridge closed).
    fn retry_later(
        self: &Arc<Self>,
        mut pending: Box<Pending>,
        error: &KafkaError,
        intake: &mpsc::UnboundedSender<Box<Pending>>,
    ) {
        pending.attempts += 1;
        let max = self.retry().max_attempts;
        let permanent = is_permanent(error);
        if self.is_closed() || permanent || (max != 0 && pending.attempts >= max) {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let why = if self.is_closed() {
                format!(
                    "kafka bridge '{}' closed before the broker acknowledged: {error}",
                    self.name
                )
            } else if permanent {
                format!(
                    "kafka refused the record for topic '{}': {error}",
                    pending.topic
                )
            } else {
                format!(
                    "kafka: no acknowledgement for topic '{}' after {} attempts: {error}",
                    pending.topic, pending.attempts
                )
            };
            tracing::warn!(backend = %self.name, topic = %pending.topic, attempts = pending.attempts, %error, "kafka bridge: giving up on a message (publisher gets basic.nack)");
            pending.fail(&why);
            return;
        }
        self.stats.resent.fetch_add(1, Ordering::Relaxed);
        let delay = backoff_delay(self.retry(), pending.attempts);
        let intake = intake.clone();
        let me = self.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(mpsc::error::SendError(p)) = intake.send(pending) {
                me.stats.failed.fetch_add(1, Ordering::Relaxed);
                p.fail(&format!("kafka bridge '{}' is closed", me.name));
            }
        });
    }
}

/// Errors no retry fixes: the record itself or the topic is refused.
fn is_permanent(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidRecord
    )
}

/// Forwards librdkafka's log lines to `tracing`.
pub(crate) fn log_line(backend: &str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(backend, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(backend, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(backend, fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(backend, fac, "librdkafka: {message}"),
    }
}

/// The producer's callbacks: delivery reports settle guards, errors drive health.
pub(crate) struct ProducerCtx {
    shared: Arc<Shared>,
    intake: mpsc::UnboundedSender<Box<Pending>>,
}

impl ClientContext for ProducerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(&self.shared.name, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(&error, KafkaError::Global(RDKafkaErrorCode::Fatal))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal);
        if fatal {
            tracing::error!(backend = %self.shared.name, %error, reason, "kafka producer: fatal error; rebuilding the producer");
            self.shared.producer_fatal.store(true, Ordering::Release);
        } else {
            tracing::warn!(backend = %self.shared.name, %error, reason, "kafka producer error");
        }
        // "All brokers down" follows the cause (refused login, TLS failure, connection refused)
        // that health should keep showing.
        let consequence = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
            && self.shared.status.last_error().is_some();
        let text = (!consequence).then(|| format!("{error}: {reason}"));
        self.shared.set_state(State::Degraded, text);
    }
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        match result {
            Ok(_) => {
                self.shared.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                self.shared.set_state(State::Ready, None);
                pending.confirmed();
            }
            Err((error, _)) => {
                tracing::debug!(backend = %self.shared.name, topic = %pending.topic, %error, "kafka delivery failed");
                self.shared.retry_later(pending, error, &self.intake);
            }
        }
    }
}

type KafkaProducer = ThreadedProducer<ProducerCtx>;

fn build_producer(
    shared: &Arc<Shared>,
    intake: &mpsc::UnboundedSender<Box<Pending>>,
) -> Result<KafkaProducer, KafkaError> {
    let ctx = ProducerCtx {
        shared: shared.clone(),
        intake: intake.clone(),
    };
    let producer = shared.producer_config().create_with_context(ctx)?;
    shared.stats.producers.fetch_add(1, Ordering::Relaxed);
    Ok(producer)
}

/// Produces what `publish` and the retries hand over, in order; rebuilds the producer after a
/// fatal error; flushes on close.
async fn engine(
    shared: Arc<Shared>,
    mut producer: KafkaProducer,
    mut rx: mpsc::UnboundedReceiver<Box<Pending>>,
    intake: mpsc::UnboundedSender<Box<Pending>>,
) {
    let mut closed = shared.closed.subscribe();
    let mut waiting: VecDeque<Box<Pending>> = VecDeque::new();
    // What a record borrows while `send` copies it, kept across records so that producing one
    // allocates nothing here (the pending message moves into the record as its opaque). The
    // key and headers are mapped from the message here rather than in `publish`: nothing of
    // them has to be kept until the delivery report (librdkafka copies them).
    let mut topic = String::new();
    let mut record = mapping::Record::default();
    let key_header = shared.config.key_header.clone();
    loop {
        if shared.producer_fatal.swap(false, Ordering::AcqRel) {
            match build_producer(&shared, &intake) {
                Ok(fresh) => {
                    let old = std::mem::replace(&mut producer, fresh);
                    // Dropping purges the old producer's queue: each record comes back through
                    // its delivery report (an error), which schedules it on the new one.
                    let _ = tokio::task::spawn_blocking(move || drop(old)).await;
                }
                Err(e) => {
                    tracing::error!(backend = %shared.name, %e, "kafka bridge: cannot rebuild the producer; retrying");
                    shared.producer_fatal.store(true, Ordering::Release);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if waiting.is_empty() {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => waiting.push_back(p),
                    None => break,
                },
                _ = closed.changed() => {}
                // Wakes up to notice a fatal error even when nothing is published.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        if shared.is_closed() {
            break;
        }
        while let Ok(p) = rx.try_recv() {
            waiting.push_back(p);
        }
        let mut full = false;
        while let Some(p) = waiting.pop_front() {
            if shared.producer_fatal.load(Ordering::Acquire) {
                waiting.push_front(p);
                break;
            }
            record.fill(&p.message, key_header.as_deref());
            let headers = record.owned_headers();
            if *topic != *p.topic {
                topic.clear();
                topic.push_str(&p.topic);
            }
            // librdkafka copies the value (RD_KAFKA_MSG_F_COPY): the borrow ends with `send`.
            let message = p.message.clone();
            let mut base = BaseRecord::with_opaque_to(&topic, p)
                .payload(message.body())
                .headers(headers);
            if let Some(key) = record.key() {
                base = base.key(key);
            }
            if let Some(ts) = record.timestamp_ms {
                base = base.timestamp(ts);
            }
            match producer.send(base) {
                Ok(()) => {}
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    waiting.push_front(back.delivery_opaque);
                    full = true;
                    break;
                }
                Err((error, back)) => {
                    shared.retry_later(back.delivery_opaque, &error, &intake);
                }
            }
        }
        if full {
            // librdkafka's queue is full: its polling thread drains it as the broker acks.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Closing: give what is queued a last chance, then fail the rest (purged reports see the
    // bridge closed and fail their guards).
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = producer.flush(Timeout::After(Duration::from_secs(5))) {
            tracing::warn!(%e, "kafka bridge: flush on close did not finish");
        }
        drop(producer);
    })
    .await;
    for p in waiting.drain(..) {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        p.fail(&format!("kafka bridge '{}' is closed", shared.name));
    }
    rx.close();
    while let Ok(p) = rx.try_recv() {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        p.fail(&format!("kafka bridge '{}' is closed", shared.name));
    }
}

/// The Kafka bridge. Build one with [`KafkaBridge::start`] (or [`crate::build`]).
pub struct KafkaBridge {
    shared: Arc<Shared>,
    intake: mpsc::UnboundedSender<Box<Pending>>,
    engine: Mutex<Option<JoinHandle<()>>>,
}

impl KafkaBridge {
    /// Validates `config`, creates the producer (which connects in the background: a cluster
    /// that is down now is not an error) and spawns the engine task. Must be called inside a
    /// Tokio runtime.
    pub fn start(name: &str, config: &KafkaBackend) -> Result<Arc<KafkaBridge>, BridgeError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime {
                backend: name.to_string(),
            })?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            target: config.bootstrap_servers.clone(),
            config: config.clone(),
            stats: KafkaStats::default(),
            status: LinkStatus::new("kafka"),
            closed: watch::channel(false).0,
            runtime: runtime.clone(),
            producer_fatal: AtomicBool::new(false),
            last_topic: Mutex::new(Arc::from("")),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        // librdkafka checks every property here: a misspelt option is a configuration error.
        let producer = build_producer(&shared, &tx).map_err(|e| BridgeError::Config {
            backend: name.to_string(),
            reason: format!("librdkafka producer: {e}"),
        })?;
        let engine = runtime.spawn(engine(shared.clone(), producer, rx, tx.clone()));
        Ok(Arc::new(KafkaBridge {
            shared,
            intake: tx,
            engine: Mutex::new(Some(engine)),
        }))
    }

    pub fn stats(&self) -> &KafkaStats {
        &self.shared.stats
    }
}

#[async_trait]
impl Backend for KafkaBridge {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        let topic = {
            let mut last = self.shared.last_topic.lock();
            if **last != *destination {
                *last = Arc::from(destination);
            }
            last.clone()
        };
        let pending = Box::new(Pending {
            topic,
            message,
            attempts: 0,
            guard: Some(guard),
        });
        if self.shared.is_closed() {
            pending.fail(&format!("kafka bridge '{}' is closed", self.shared.name));
            return;
        }
        if let Err(mpsc::error::SendError(p)) = self.intake.send(pending) {
            p.fail(&format!("kafka bridge '{}' is closed", self.shared.name));
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
        let sub = consume::KafkaSubscription::start(self.shared.clone(), source, prefetch)?;
        Ok(Box::new(sub))
    }

    /// Checks that the topic exists (or that the cluster creates it on first use): a metadata
    /// request for it.
    async fn declare(&self, destination: &str) -> Result<(), BackendError> {
        let shared = self.shared.clone();
        let topic = destination.to_string();
        let result = tokio::task::spawn_blocking(move || -> Result<(), BackendError> {
            let mut c = shared.base_config();
            shared.apply_options(&mut c);
            let client: rdkafka::producer::BaseProducer = c
                .create()
                .map_err(|e| shared.connect_error(e.to_string()))?;
            let md = client
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map_err(|e| shared.connect_error(e.to_string()))?;
            match md.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() => Ok(()),
                _ => Err(BackendError::NotFound {
                    backend: shared.name.clone(),
                    destination: topic.clone(),
                }),
            }
        })
        .await;
        match result {
            Ok(r) => r,
            Err(e) => Err(self.shared.connect_error(e.to_string())),
        }
    }

    /// Kafka keeps records after they are consumed; there is no queue depth to report.
    async fn depth(&self, _destination: &str) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }

    fn health(&self) -> Health {
        self.shared.health()
    }

    async fn close(&self) {
        self.shared.closed.send_replace(true);
        let engine = self.engine.lock().take();
        if let Some(engine) = engine {
            let _ = engine.await;
        }
        self.shared.set_state(State::Closed, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors() {
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
        )));
    }
}
