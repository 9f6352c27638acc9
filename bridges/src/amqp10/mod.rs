//! The AMQP 1.0 bridge: a `Backend` whose target is an AMQP 1.0 peer — Azure Service Bus,
//! RabbitMQ with its `rabbitmq_amqp1_0` plugin, ActiveMQ Artemis, Qpid.
//!
//! # Client library
//!
//! Built on [fe2o3-amqp] (the maintained pure-Rust AMQP 1.0 client, with rustls), and
//! `fe2o3-amqp-cbs` for Service Bus's claims-based security.
//!
//! # Task layout
//!
//! - One **engine task** per bridge (`engine.rs`) owns the connection and its one session, and
//!   runs the state machine `Connecting → Ready → Backoff → Connecting` (exponential backoff
//!   with jitter between `retry.initial_backoff_ms` and `retry.max_backoff_ms`).
//! - [`Backend::publish`] never blocks: it maps the message (`mapping.rs`), checks its encoded
//!   size against `max_message_size` (a larger one fails at once with a log line) and hands it
//!   to the engine through an unbounded queue (the gateway's own flow control bounds it).
//! - In `Ready` the engine keeps one sender link per destination address and up to
//!   `max_in_flight` unsettled transfers outstanding over all of them (`send_batchable`: the
//!   transfer is written and its disposition awaited concurrently, never one at a time). The
//!   guard is released on `accepted`; `rejected`, `released` and `modified` cost one attempt and
//!   are retried after a backoff; once `retry.max_attempts` attempts are spent the guard is
//!   failed with the peer's reason.
//! - A link or connection failure moves every unsettled message back to the front of the
//!   queue, in order; they are resent (with the same `message-id`) once reconnected.
//! - Subscriptions (queue mappings) get a receiver link attached by the engine on its session,
//!   owned by a task of their own with manual credit: at most `prefetch` unsettled deliveries.
//!   When the link fails the task asks the engine for a new one, backing off between failures.
//!
//! # Outcomes
//!
//! | client does | `generic` / `rabbitmq`  | `servicebus`                                   |
//! |-------------|-------------------------|------------------------------------------------|
//! | ack         | `accepted`              | `accepted` (completes the message)             |
//! | requeue     | `released`              | `modified(delivery-failed)` (counts towards MaxDeliveryCount) |
//! | reject      | `rejected`              | `rejected` with `com.microsoft:dead-letter` (to the dead-letter queue) |
//!
//! RabbitMQ 3.10's plugin refuses `modified`, hence `released` there.
//!
//! `target: rabbitmq` also adapts the receiving side to that plugin: a delivery whose
//! `first-acquirer` is false is `redelivered` (the plugin never counts deliveries), and a
//! subscription's credit is topped up only once the last grant is used up (the plugin can
//! overshoot credit granted while transfers are on their way; see [`credit_to_grant`]).
//!
//! # Service Bus
//!
//! With a `connection_string` the bridge connects with TLS to `NAMESPACE:5671` (or plain AMQP
//! to the emulator host when `UseDevelopmentEmulator=true`), SASL ANONYMOUS, and puts a SAS
//! token (`sas.rs`) for `sb://NAMESPACE/ENTITY` on `$cbs` before attaching each entity's
//! links; tokens last one hour and are renewed every 45 minutes.
//!
//! # Delivery guarantees
//!
//! At least once. Every message carries a `message-id` (the publisher's or one set once by the
//! bridge and kept across resends), so a target with duplicate detection (Service Bus
//! `RequiresDuplicateDetection`) absorbs resends.

mod engine;
mod management;
pub mod mapping;
pub mod sas;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use fe2o3_amqp_types::messaging::{Data, Message as AmqpMessage};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use warren_backends::store::Guard;
use warren_backends::{Backend, BackendError, Health, Message, Subscription};
use warren_config::file::{Amqp10Backend, Amqp10Target};
use warren_config::servicebus::ConnectionString;

use crate::BridgeError;

pub use engine::Endpoint;

/// One message on its way to the peer.
pub(crate) struct Pending {
    pub destination: String,
    pub message: Box<AmqpMessage<Data>>,
    pub guard: Guard,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Order of arrival, to resend in order.
    pub seq: u64,
}

pub(crate) enum Command {
    Publish(Pending),
    Subscribe {
        source: String,
        prefetch: u16,
        reply: oneshot::Sender<Result<engine::Link, engine::AttachFailure>>,
    },
    Close(oneshot::Sender<()>),
}

/// An AMQP 1.0 bridge. Built with [`Amqp10Bridge::start`].
pub struct Amqp10Bridge {
    name: String,
    target: Amqp10Target,
    max_message_size: Option<u64>,
    session_id_header: Option<String>,
    commands: mpsc::UnboundedSender<Command>,
    health: Arc<Mutex<Health>>,
    ids_prefix: String,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

impl Amqp10Bridge {
    /// Validates `config` and spawns the engine task on the current Tokio runtime.
    pub fn start(name: &str, config: &Amqp10Backend) -> Result<Arc<Amqp10Bridge>, BridgeError> {
        let bad = |reason: String| BridgeError::Config {
            backend: name.to_string(),
            reason,
        };
        let endpoint = match (&config.url, &config.connection_string) {
            (Some(url), None) => Endpoint::from_url(url).map_err(bad)?,
            (None, Some(cs)) => {
                Endpoint::from_connection_string(&ConnectionString::parse(cs).map_err(bad)?)
            }
            _ => {
                return Err(bad(
                    "give exactly one of `url` and `connection_string`".into()
                ))
            }
        };
        let options = engine::Options::from_config(config).map_err(bad)?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime {
                backend: name.to_string(),
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let health = Arc::new(Mutex::new(Health::Degraded("connecting".into())));
        let closed = Arc::new(AtomicBool::new(false));
        let bridge = Arc::new(Amqp10Bridge {
            name: name.to_string(),
            target: config.effective_target(),
            max_message_size: config.effective_max_message_size(),
            session_id_header: config.session_id_header.clone(),
            commands: tx,
            health: health.clone(),
            ids_prefix: format!("{:016x}", rand::random::<u64>()),
            next_id: AtomicU64::new(1),
            closed: closed.clone(),
        });
        let engine = engine::Engine::new(
            name.to_string(),
            endpoint,
            options,
            config.max_in_flight.max(1),
            config.retry.clone(),
            health,
            closed,
        );
        runtime.spawn(engine.run(rx));
        Ok(bridge)
    }

    fn message_id(&self, message: &Message) -> String {
        match message.properties().message_id() {
            Some(id) => id.to_string(),
            None => format!(
                "warren-{}-{}",
                self.ids_prefix,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }
}

#[async_trait]
impl Backend for Amqp10Bridge {
    fn name(&self) -> &str {
        &self.name
    }

    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        let id = self.message_id(&message);
        let mut amqp = mapping::to_amqp10(&message, &id);
        if let Some(header) = &self.session_id_header {
            if let Some(session) = message.headers().and_then(|h| {
                h.inner()
                    .get(header.as_str())
                    .and_then(mapping::header_text)
            }) {
                if let Some(p) = amqp.properties.as_mut() {
                    p.group_id = Some(session);
                }
            }
        }
        if let Some(max) = self.max_message_size {
            let size = encoded_size(&amqp);
            if size as u64 > max {
                tracing::error!(
                    backend = %self.name,
                    destination,
                    message_id = %id,
                    size,
                    max_message_size = max,
                    "message larger than max_message_size: not sent, publisher nacked"
                );
                guard.failed(&format!(
                    "{}: message of {size} bytes is larger than max_message_size ({max})",
                    self.name
                ));
                return;
            }
        }
        if self.closed.load(Ordering::Acquire) {
            guard.failed(&format!("{} is closed", self.name));
            return;
        }
        let pending = Pending {
            destination: destination.to_string(),
            message: Box::new(amqp),
            guard,
            attempts: 0,
            seq: 0,
        };
        if let Err(mpsc::error::SendError(Command::Publish(p))) =
            self.commands.send(Command::Publish(pending))
        {
            p.guard.failed(&format!("{} is closed", self.name));
        }
    }

    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError> {
        let sub = engine::Subscriber::start(
            self.name.clone(),
            source.to_string(),
            prefetch.max(1),
            self.target,
            self.commands.clone(),
        );
        Ok(Box::new(sub))
    }

    async fn declare(&self, _destination: &str) -> Result<(), BackendError> {
        // AMQP 1.0 has no declare: a missing address shows when its link attaches.
        Ok(())
    }

    async fn depth(&self, _destination: &str) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }

    fn health(&self) -> Health {
        self.health.lock().clone()
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        self.closed.store(true, Ordering::Release);
        *self.health.lock() = Health::Closed;
    }
}

/// The credit to grant a subscription's receiver link once deliveries were settled: enough for
/// `prefetch` unsettled deliveries, or `None` to leave the credit as it is.
///
/// RabbitMQ 3.x's plugin turns a flow into credit for the 0-9-1 queue without counting the
/// deliveries the queue already handed to the session but the session has not sent yet: credit
/// granted while transfers are on their way lets it send more than the link allows (fe2o3 then
/// fails the receive with "more message transfers than currently allowed" and the extra
/// deliveries stay unsettled). So towards RabbitMQ, credit is only topped up once the last
/// grant is used up (`credit_left` 0): nothing is on its way then. A delivery still unsettled
/// when the credit ran out always brings a settlement later, so the top-up never goes missing.
pub(crate) fn credit_to_grant(
    target: Amqp10Target,
    prefetch: u16,
    unsettled: u32,
    credit_left: u32,
) -> Option<u32> {
    let wanted = (prefetch as u32).saturating_sub(unsettled);
    match target {
        Amqp10Target::Rabbitmq => (credit_left == 0 && wanted > 0).then_some(wanted),
        Amqp10Target::Generic | Amqp10Target::Servicebus => Some(wanted),
    }
}

/// The message's size on the wire (its sections encoded).
pub(crate) fn encoded_size(message: &AmqpMessage<Data>) -> usize {
    use fe2o3_amqp_types::messaging::message::__private::Serializable;
    serde_amqp::to_vec(&Serializable(message))
        .map(|v| v.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_tops_up_to_prefetch_and_towards_rabbitmq_only_once_used_up() {
        // Generic peers and Service Bus count in-flight transfers: always top up.
        assert_eq!(
            credit_to_grant(Amqp10Target::Generic, 100, 30, 40),
            Some(70)
        );
        assert_eq!(
            credit_to_grant(Amqp10Target::Servicebus, 100, 100, 0),
            Some(0)
        );
        // RabbitMQ: not while granted credit is left (transfers may be on their way)...
        assert_eq!(credit_to_grant(Amqp10Target::Rabbitmq, 100, 30, 40), None);
        // ...nor when prefetch deliveries are unsettled...
        assert_eq!(credit_to_grant(Amqp10Target::Rabbitmq, 100, 100, 0), None);
        // ...but once the credit is used up, back to prefetch.
        assert_eq!(
            credit_to_grant(Amqp10Target::Rabbitmq, 100, 30, 0),
            Some(70)
        );
    }
}
