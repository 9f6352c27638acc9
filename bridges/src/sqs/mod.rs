//! The Amazon SQS bridge: a `Backend` whose destinations and sources are SQS queues.
//!
//! # Client library
//!
//! [aws-sdk-sqs](https://docs.rs/aws-sdk-sqs) with `aws-config` for the standard region and
//! credential chain (environment, profile, web identity, ECS/EC2 roles) unless the
//! configuration names them, an endpoint override for local SQS-compatible servers, and the
//! SDK's rustls HTTPS client. The SDK's own retries are off: the bridge counts attempts itself
//! (`retry.max_attempts`) so that every failure is visible and bounded.
//!
//! A destination or source is a queue name, resolved once with GetQueueUrl and cached (the
//! cache entry is dropped when SQS says the queue does not exist), or a full queue URL used as
//! it is. A name ending in `.fifo` is a FIFO queue.
//!
//! # Task layout
//!
//! - [`Backend::publish`] never blocks: it maps the message (`mapping.rs`) and hands it to the
//!   **engine task** (`engine.rs`) over an unbounded channel (the gateway's confirm window
//!   bounds it). The engine keeps one buffer per queue and sends SendMessageBatch calls of up to
//!   10 entries and `max_message_size` bytes, several in flight per standard queue
//!   (`max_batches_in_flight`), one at a time per FIFO queue (to keep its order).
//! - Subscriptions (`consume.rs`): long-polling receivers, a settling task (DeleteMessageBatch,
//!   ChangeMessageVisibilityBatch) and a visibility extender, see there.
//!
//! # Delivery guarantees
//!
//! At least once. A guard (the publisher's confirm) is released when SQS reported that entry of
//! the batch as successful: SQS has stored it. An entry SQS refused as the sender's fault
//! (`SenderFault`, e.g. an invalid attribute) fails at once (basic.nack); other failed entries,
//! and whole batches whose call failed, are sent again after a backoff, each failure costing the
//! message one of `retry.max_attempts` (0: unlimited). A batch whose reply was lost may have been
//! stored, so a resend **can store a message twice** on a standard queue; on a FIFO queue the
//! deduplication id (kept across resends) makes SQS drop the copy within its 5-minute window.

mod consume;
mod engine;
pub mod mapping;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell};
use warren_backends::store::Guard;
use warren_backends::{Backend, BackendError, Health, Message, Subscription};
use warren_config::file::{RetryConfig, SqsBackend};

use crate::engine::EngineTask;
pub(crate) use crate::retry::backoff_delay;
use crate::status::{LinkStatus, State};
use crate::BridgeError;

pub(crate) use engine::Pending;

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct SqsStats {
    /// Messages handed to `publish`.
    pub published: AtomicU64,
    /// Messages SQS reported stored; their guards were released.
    pub confirmed: AtomicU64,
    /// Entries sent again after a failure.
    pub resent: AtomicU64,
    /// Messages given up on: `guard.failed(..)` was called.
    pub failed: AtomicU64,
    /// SendMessageBatch calls made (successful or not).
    pub batches: AtomicU64,
    /// Calls of any kind that failed as a whole (connection refused, timeout, server error).
    pub call_failures: AtomicU64,
    /// Messages received by subscriptions.
    pub received: AtomicU64,
    /// Messages deleted after an ack (or a reject without a dead-letter queue).
    pub deleted: AtomicU64,
    /// Messages made visible again at once after a requeue.
    pub requeued: AtomicU64,
    /// Visibility extensions of held messages.
    pub extended: AtomicU64,
    /// Rejected messages moved to the queue's redrive dead-letter queue.
    pub dead_lettered: AtomicU64,
}

/// A failed SQS call, described.
#[derive(Debug, Clone)]
pub(crate) struct CallError {
    pub(crate) text: String,
    /// SQS said the queue does not exist (so its cached URL is stale).
    pub(crate) missing_queue: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

pub(crate) fn call_error<E, R>(e: SdkError<E, R>) -> CallError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().map(str::to_string);
    let missing_queue = matches!(
        code.as_deref(),
        Some("AWS.SimpleQueueService.NonExistentQueue") | Some("QueueDoesNotExist")
    );
    let text = match (code, e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => DisplayErrorContext(&e).to_string(),
    };
    CallError {
        text,
        missing_queue,
    }
}

pub(crate) struct Shared {
    pub(crate) name: String,
    /// The endpoint, for logs: the override or `aws`.
    pub(crate) target: String,
    pub(crate) config: SqsBackend,
    pub(crate) stats: SqsStats,
    /// `Degraded` with the last call's failure until a call succeeds again.
    status: LinkStatus,
    client: OnceCell<Client>,
    /// Queue name → URL.
    urls: Mutex<HashMap<String, String>>,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) runtime: tokio::runtime::Handle,
    /// Random, per bridge instance: generated FIFO deduplication ids are
    /// `warren-<instance>-<n>`.
    instance: String,
    next_id: AtomicU64,
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(crate) fn retry(&self) -> &RetryConfig {
        &self.config.retry
    }

    /// A call succeeded: healthy again.
    pub(crate) fn call_ok(&self) {
        if self.status.change(State::Ready, None) == Some(State::Degraded) {
            tracing::info!(backend = %self.name, target = %self.target, "sqs bridge: calls succeed again");
        }
    }

    /// A call failed as a whole (not one entry of a batch).
    pub(crate) fn call_failed(&self, what: &str, error: &CallError) {
        self.stats.call_failures.fetch_add(1, Ordering::Relaxed);
        let failure = format!("{what}: {error}");
        if self.status.change(State::Degraded, Some(failure)).is_some() {
            tracing::warn!(backend = %self.name, target = %self.target, call = what, error = %error, "sqs bridge: call failed; retrying with backoff");
        } else {
            tracing::debug!(backend = %self.name, call = what, error = %error, "sqs bridge: call failed");
        }
    }

    /// The SQS client, built on first use from the configuration and the standard AWS chain.
    pub(crate) async fn client(&self) -> &Client {
        self.client.get_or_init(|| build_client(&self.config)).await
    }

    /// The URL of `queue` (a name or a URL).
    pub(crate) async fn queue_url(&self, queue: &str) -> Result<String, CallError> {
        if queue.starts_with("https://") || queue.starts_with("http://") {
            return Ok(queue.to_string());
        }
        if let Some(url) = self.urls.lock().get(queue) {
            return Ok(url.clone());
        }
        let out = self
            .client()
            .await
            .get_queue_url()
            .queue_name(queue)
            .send()
            .await
            .map_err(call_error)?;
        let url = out.queue_url().unwrap_or_default().to_string();
        if url.is_empty() {
            return Err(CallError {
                text: format!("GetQueueUrl for '{queue}' returned no URL"),
                missing_queue: true,
            });
        }
        self.urls.lock().insert(queue.to_string(), url.clone());
        Ok(url)
    }

    /// Drops a cached URL that SQS no longer knows (the queue was deleted or recreated).
    pub(crate) fn forget_url(&self, queue: &str) {
        self.urls.lock().remove(queue);
    }

    pub(crate) fn closed_error(&self) -> BackendError {
        BackendError::Closed {
            backend: self.name.clone(),
        }
    }

    fn unreachable(&self, e: CallError) -> BackendError {
        if e.missing_queue {
            BackendError::Rejected {
                backend: self.name.clone(),
                reason: e.text,
            }
        } else {
            BackendError::Connect {
                backend: self.name.clone(),
                target: self.target.clone(),
                reason: e.text,
            }
        }
    }

    /// A FIFO deduplication id for a message that brings none: unique per bridge instance.
    fn generated_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("warren-{}-{n}", self.instance)
    }
}

/// Whether `queue` (name or URL) is a FIFO queue.
pub(crate) fn is_fifo(queue: &str) -> bool {
    queue.trim_end_matches('/').ends_with(".fifo")
}

/// The short name of `queue` (a name, or the last path segment of a URL).
pub(crate) fn queue_name(queue: &str) -> &str {
    queue
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(queue)
}

async fn build_client(config: &SqsBackend) -> Client {
    use aws_sdk_sqs::config::retry::RetryConfig as SdkRetry;
    use aws_sdk_sqs::config::timeout::TimeoutConfig;
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};

    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(
            id.clone(),
            secret.clone(),
            config.session_token.clone(),
            None,
            "warren-config",
        ));
    }
    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint.clone());
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        tracing::error!("sqs bridge: no AWS region: set `region` in the configuration or AWS_REGION; every call will fail");
    }
    // A long poll holds its call for wait_time_secs; every other call should be quick.
    let attempt = Duration::from_secs(u64::from(config.wait_time_secs) + 15);
    let sqs = aws_sdk_sqs::config::Builder::from(&sdk)
        .retry_config(SdkRetry::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(attempt)
                .operation_timeout(attempt)
                .build(),
        )
        .build();
    Client::from_conf(sqs)
}

/// The Amazon SQS bridge. Build one with [`SqsBridge::start`] (or [`crate::build`]).
pub struct SqsBridge {
    shared: Arc<Shared>,
    engine: EngineTask<Pending>,
}

impl SqsBridge {
    /// Validates `config` and spawns the engine task. The SQS client is built on first use
    /// (region and credentials from the configuration or the standard chain); an endpoint that
    /// is down now is not an error. Must be called inside a Tokio runtime.
    pub fn start(name: &str, config: &SqsBackend) -> Result<Arc<SqsBridge>, BridgeError> {
        let invalid = |reason: String| BridgeError::Config {
            backend: name.to_string(),
            reason,
        };
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime {
                backend: name.to_string(),
            })?;
        if config.wait_time_secs > 20 {
            return Err(invalid("wait_time_secs is at most 20".into()));
        }
        if config.visibility_timeout_secs == 0 {
            return Err(invalid("visibility_timeout_secs must be at least 1".into()));
        }
        if config.max_batches_in_flight == 0 {
            return Err(invalid("max_batches_in_flight must be at least 1".into()));
        }
        if let Some(endpoint) = &config.endpoint_url {
            url::Url::parse(endpoint).map_err(|e| invalid(format!("endpoint_url: {e}")))?;
        }
        let shared = Arc::new(Shared {
            name: name.to_string(),
            target: config
                .endpoint_url
                .clone()
                .unwrap_or_else(|| "aws".to_string()),
            config: config.clone(),
            stats: SqsStats::default(),
            status: LinkStatus::starting_ready("sqs"),
            client: OnceCell::new(),
            urls: Mutex::new(HashMap::new()),
            closed: watch::channel(false).0,
            runtime: runtime.clone(),
            instance: format!("{:016x}", rand::random::<u64>()),
            next_id: AtomicU64::new(0),
        });
        let engine = EngineTask::spawn(&runtime, |rx| engine::run(shared.clone(), rx));
        Ok(Arc::new(SqsBridge { shared, engine }))
    }

    pub fn stats(&self) -> &SqsStats {
        &self.shared.stats
    }
}

#[async_trait]
impl Backend for SqsBridge {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        let pending = match engine::prepare(&self.shared, destination, &message, guard) {
            Ok(p) => p,
            Err((guard, reason)) => {
                self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = %self.shared.name, queue = destination, reason = %reason, "sqs bridge refuses a message");
                guard.failed(&reason);
                return;
            }
        };
        let refused = if self.shared.is_closed() {
            Some(pending)
        } else {
            self.engine.send(pending).err()
        };
        if let Some(p) = refused {
            p.fail(&format!("sqs bridge '{}' is closed", self.shared.name));
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
        Ok(Box::new(consume::SqsSubscription::new(
            self.shared.clone(),
            source,
            prefetch,
        )))
    }

    /// Checks that the queue exists (the bridge never creates queues).
    async fn declare(&self, destination: &str) -> Result<(), BackendError> {
        let url = self
            .shared
            .queue_url(destination)
            .await
            .map_err(|e| self.shared.unreachable(e))?;
        self.shared
            .client()
            .await
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| {
                let e = call_error(e);
                if e.missing_queue {
                    self.shared.forget_url(destination);
                }
                self.shared.unreachable(e)
            })?;
        Ok(())
    }

    /// SQS's ApproximateNumberOfMessages (visible messages; an estimate).
    async fn depth(&self, destination: &str) -> Result<Option<u64>, BackendError> {
        let url = self
            .shared
            .queue_url(destination)
            .await
            .map_err(|e| self.shared.unreachable(e))?;
        let out = self
            .shared
            .client()
            .await
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| self.shared.unreachable(call_error(e)))?;
        Ok(out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|n| n.parse().ok()))
    }

    fn health(&self) -> Health {
        self.shared.status.health()
    }

    async fn close(&self) {
        self.shared.closed.send_replace(true);
        self.engine.join().await;
        if self.shared.status.change(State::Closed, None).is_some() {
            tracing::info!(backend = %self.shared.name, "sqs bridge closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_names() {
        assert!(is_fifo("orders.fifo"));
        assert!(is_fifo("http://h:4566/000000000000/orders.fifo"));
        assert!(!is_fifo("orders"));
        assert_eq!(queue_name("http://h:4566/000000000000/orders"), "orders");
        assert_eq!(queue_name("orders"), "orders");
    }
}
