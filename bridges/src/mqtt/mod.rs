//! The MQTT bridge: a `Backend` whose destinations and sources are topic roots on an MQTT
//! broker, built on [rumqttc] (MQTT 5; `protocol: "3.1.1"` is refused for now).
//!
//! # Task layout
//!
//! One **event-loop task** per bridge owns rumqttc's `EventLoop` (one connection, the fixed
//! `client_id`, clean start off and a session expiry of one week, so the broker keeps the
//! session, its subscriptions and the QoS 1 messages queued for it while Warren is away).
//! The task polls the event loop; on a connection error it backs off (exponential with jitter)
//! and polls again, which reconnects. rumqttc resends unacknowledged QoS 1 publishes itself
//! when the session resumes.
//!
//! - **Publish**: QoS 1. `publish` hands the message to the task, which issues the PUBLISH
//!   request. rumqttc reports each PUBLISH it writes (`Outgoing::Publish(pkid)`) in request
//!   order, which is how the task pairs a packet id with its guard; the guard is released
//!   when the PUBACK for that packet id arrives. Every connection failure costs each
//!   unacknowledged message one of `retry.max_attempts` (0: unlimited); past it the guard is
//!   failed (the publisher gets basic.nack) — rumqttc may still deliver it later, so a nacked
//!   message can arrive (at least once, never "at most once").
//! - **Consume**: each queue mapping subscribes (QoS 1) to `<prefix><source>/#`. Manual acks
//!   (`set_manual_acks(true)`): a received PUBLISH is acknowledged (PUBACK) only when the AMQP
//!   client acked the message, so a message Warren held unacknowledged when it or the
//!   connection died is sent again by the broker when the session resumes (MQTT redelivers
//!   unacknowledged QoS 1 messages on reconnect, DUP set). Requeue keeps it unacknowledged at
//!   the broker and delivers it again locally, `redelivered` set. Reject acknowledges it
//!   (MQTT has no negative acknowledgement or dead-lettering): it is dropped.
//!   Messages the resumed session brings before their queue mapping subscribed are held
//!   unacknowledged and handed over when it does (first 60 s after start).
//!
//! At-least-once therefore holds while the broker keeps the session: as long as the session
//! has not expired, the client id is not used by another client, and the broker persists
//! sessions across its own restarts (Mosquitto: `persistence true`). MQTT 5 brokers also
//! limit the messages in flight to the bridge to its receive maximum (set to 65535).

pub mod mapping;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use warren_backends::store::Guard;
use warren_backends::{
    Backend, BackendError, Health, Incoming, Message, Settle, Settlement, Subscription,
};
use warren_config::file::MqttBackend;

use crate::BridgeError;

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub published: AtomicU64,
    /// PUBACKs received: guards released.
    pub confirmed: AtomicU64,
    pub failed: AtomicU64,
    /// Connections established (1 + reconnections).
    pub connections: AtomicU64,
}

struct Pending {
    topic: String,
    payload: Bytes,
    props: mapping::Props,
    attempts: u32,
    guard: Option<Guard>,
}

impl Pending {
    fn fail(mut self, reason: &str) {
        if let Some(g) = self.guard.take() {
            g.failed(reason);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            g.failed("mqtt bridge dropped the message");
        }
    }
}

enum Cmd {
    Publish(Pending),
    Subscribe {
        source: String,
        tx: mpsc::UnboundedSender<Publish>,
    },
}

struct Shared {
    name: String,
    config: MqttBackend,
    stats: MqttStats,
    health: Mutex<Health>,
    closed: watch::Sender<bool>,
    client: AsyncClient,
}

impl Shared {
    fn set_health(&self, health: Health) {
        let mut h = self.health.lock();
        if *h == Health::Closed {
            return;
        }
        if *h != health {
            tracing::info!(backend = %self.name, from = ?*h, to = ?health, "mqtt bridge state change");
        }
        *h = health;
    }
}

pub struct MqttBridge {
    shared: Arc<Shared>,
    intake: mpsc::UnboundedSender<Cmd>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// `(host, port, tls)` of an `mqtt://` / `mqtts://` URL.
fn parse_url(url: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let default_port = match scheme {
        "mqtt" => 1883,
        "mqtts" => return Err("mqtts:// is not supported by this build (no TLS)".into()),
        other => return Err(format!("scheme `{other}`; expected mqtt://")),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Ok((
            h.trim_matches(|c| c == '[' || c == ']').to_string(),
            p.parse().map_err(|_| format!("bad port `{p}`"))?,
        )),
        _ if !hostport.is_empty() => Ok((hostport.to_string(), default_port)),
        _ => Err("no host".into()),
    }
}

impl MqttBridge {
    pub fn start(name: &str, config: &MqttBackend) -> Result<Arc<MqttBridge>, BridgeError> {
        let invalid = |reason: String| BridgeError::Config {
            backend: name.to_string(),
            reason,
        };
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| BridgeError::NoRuntime {
                backend: name.to_string(),
            })?;
        if config.protocol != "5" {
            return Err(invalid(format!(
                "protocol `{}`: only MQTT 5 is implemented so far",
                config.protocol
            )));
        }
        let (host, port) = parse_url(&config.url).map_err(|e| invalid(format!("url: {e}")))?;
        let mut options = MqttOptions::new(config.client_id.clone(), host, port);
        options
            .set_keep_alive(Duration::from_secs(config.keep_alive_secs.max(5)))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(7 * 24 * 3600))
            .set_receive_maximum(Some(u16::MAX))
            .set_manual_acks(true);
        if let Some(user) = &config.username {
            options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
        }
        let (client, eventloop) = AsyncClient::new(options, 10_000);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            config: config.clone(),
            stats: MqttStats::default(),
            health: Mutex::new(Health::Degraded("connecting".into())),
            closed: watch::channel(false).0,
            client,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let task = runtime.spawn(run(shared.clone(), eventloop, rx));
        Ok(Arc::new(MqttBridge {
            shared,
            intake: tx,
            task: Mutex::new(Some(task)),
        }))
    }

    pub fn stats(&self) -> &MqttStats {
        &self.shared.stats
    }
}

struct Loop {
    shared: Arc<Shared>,
    /// Requested, waiting for rumqttc to write them (FIFO: it writes in request order).
    requested: VecDeque<Pending>,
    /// Not requested yet (the request channel was full).
    waiting: VecDeque<Pending>,
    inflight: HashMap<u16, Pending>,
    subs: Vec<(String, mpsc::UnboundedSender<Publish>)>,
    /// Messages the broker sent (from the persistent session) before their queue mapping
    /// subscribed: held unacknowledged for the first [`ORPHAN_GRACE`] after start.
    orphans: Vec<Publish>,
    started: std::time::Instant,
}

/// How long after start a message for no subscription is kept for one that may still come.
const ORPHAN_GRACE: Duration = Duration::from_secs(60);

impl Loop {
    fn request(&mut self) {
        while let Some(p) = self.waiting.pop_front() {
            let props = PublishProperties {
                content_type: p.props.content_type.clone(),
                correlation_data: p.props.correlation_data.clone(),
                response_topic: p.props.response_topic.clone(),
                message_expiry_interval: p.props.message_expiry_interval,
                user_properties: p.props.user_properties.clone(),
                ..PublishProperties::default()
            };
            match self.shared.client.try_publish_with_properties(
                p.topic.clone(),
                QoS::AtLeastOnce,
                p.props.retain,
                p.payload.clone(),
                props,
            ) {
                Ok(()) => self.requested.push_back(p),
                Err(_) => {
                    self.waiting.push_front(p);
                    return;
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            // A first write (a resend after a reconnect reuses an id already in flight).
            Event::Outgoing(Outgoing::Publish(pkid))
                if pkid != 0 && !self.inflight.contains_key(&pkid) =>
            {
                if let Some(p) = self.requested.pop_front() {
                    self.inflight.insert(pkid, p);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(mut p) = self.inflight.remove(&ack.pkid) {
                    if (ack.reason as u8) < 0x80 {
                        self.shared.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                        p.guard.take();
                    } else {
                        self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                        p.fail(&format!(
                            "mqtt broker refused the message: {:?}",
                            ack.reason
                        ));
                    }
                }
            }
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.shared
                    .stats
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.set_health(Health::Ready);
                if !ack.session_present {
                    for (source, _) in &self.subs {
                        let filter =
                            mapping::source_filter(&self.shared.config.topic_prefix, source);
                        let _ = self.shared.client.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let prefix = &self.shared.config.topic_prefix;
                let target = self
                    .subs
                    .iter()
                    .find(|(source, _)| mapping::routing_key(prefix, source, &topic).is_some());
                match target {
                    Some((_, tx)) => {
                        if let Err(mpsc::error::SendError(p)) = tx.send(publish) {
                            // The subscription is gone: kept, unacknowledged, for the next
                            // subscription to the source (the gateway resubscribes).
                            self.orphans.push(p);
                        }
                    }
                    None if self.started.elapsed() < ORPHAN_GRACE => self.orphans.push(publish),
                    None => {
                        tracing::warn!(backend = %self.shared.name, %topic, "mqtt bridge: message for no subscription; acknowledged and dropped");
                        let _ = self.shared.client.try_ack(&publish);
                    }
                }
            }
            _ => {}
        }
    }

    /// A connection failure: every unacknowledged publish spends an attempt.
    fn failed(&mut self, reason: &str) {
        let max = self.shared.config.retry.max_attempts;
        let shared = self.shared.clone();
        let spend = |p: &mut Pending| {
            p.attempts += 1;
            max != 0 && p.attempts >= max
        };
        let fail = |p: Pending| {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            let attempts = p.attempts;
            p.fail(&format!(
                "mqtt bridge '{}': not acknowledged after {attempts} attempts: {reason}",
                shared.name
            ));
        };
        let ids: Vec<u16> = self.inflight.keys().copied().collect();
        for id in ids {
            let give_up = spend(self.inflight.get_mut(&id).expect("key"));
            if give_up {
                fail(self.inflight.remove(&id).expect("key"));
            }
        }
        for queue in [&mut self.requested, &mut self.waiting] {
            let mut kept = VecDeque::new();
            for mut p in queue.drain(..) {
                if spend(&mut p) {
                    fail(p);
                } else {
                    kept.push_back(p);
                }
            }
            *queue = kept;
        }
    }
}

async fn run(shared: Arc<Shared>, mut eventloop: EventLoop, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut state = Loop {
        shared: shared.clone(),
        requested: VecDeque::new(),
        waiting: VecDeque::new(),
        inflight: HashMap::new(),
        subs: Vec::new(),
        orphans: Vec::new(),
        started: std::time::Instant::now(),
    };
    let mut closed = shared.closed.subscribe();
    let mut failures = 0u32;
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Publish(p)) => {
                    state.waiting.push_back(p);
                    state.request();
                }
                Some(Cmd::Subscribe { source, tx }) => {
                    let filter = mapping::source_filter(&shared.config.topic_prefix, &source);
                    state.subs.retain(|(s, tx)| *s != source && !tx.is_closed());
                    let prefix = &shared.config.topic_prefix;
                    for p in std::mem::take(&mut state.orphans) {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        if mapping::routing_key(prefix, &source, &topic).is_some() {
                            let _ = tx.send(p);
                        } else {
                            state.orphans.push(p);
                        }
                    }
                    state.subs.push((source, tx));
                    let _ = shared.client.try_subscribe(filter, QoS::AtLeastOnce);
                }
                None => break,
            },
            event = eventloop.poll() => match event {
                Ok(event) => {
                    failures = 0;
                    state.handle(event);
                    state.request();
                }
                Err(e) => {
                    failures += 1;
                    let reason = e.to_string();
                    shared.set_health(Health::Degraded(reason.clone()));
                    tracing::warn!(backend = %shared.name, error = %reason, "mqtt bridge connection failed");
                    state.failed(&reason);
                    let delay = backoff_delay(&shared.config.retry, failures);
                    let is_closed = *shared.closed.borrow();
                    if is_closed {
                        break;
                    }
                    let mut closing = shared.closed.subscribe();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = until_closed(&mut closing) => break,
                    }
                }
            },
            _ = until_closed(&mut closed) => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), shared.client.disconnect()).await;
    let reason = format!("mqtt bridge '{}' closed", shared.name);
    let pending: Vec<Pending> = state
        .inflight
        .drain()
        .map(|(_, p)| p)
        .chain(state.requested.drain(..))
        .chain(state.waiting.drain(..))
        .collect();
    for p in pending {
        p.fail(&reason);
    }
}

#[async_trait]
impl Backend for MqttBridge {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn publish(&self, destination: &str, message: Arc<Message>, guard: Guard) {
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            topic: mapping::topic(
                &self.shared.config.topic_prefix,
                destination,
                message.routing_key.as_str(),
            ),
            payload: message.body.clone(),
            props: mapping::to_mqtt(&message),
            attempts: 0,
            guard: Some(guard),
        };
        if let Err(mpsc::error::SendError(Cmd::Publish(p))) =
            self.intake.send(Cmd::Publish(pending))
        {
            p.fail(&format!("mqtt bridge '{}' is closed", self.shared.name));
        }
    }

    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.intake
            .send(Cmd::Subscribe {
                source: source.to_string(),
                tx,
            })
            .map_err(|_| BackendError::Closed {
                backend: self.shared.name.clone(),
            })?;
        let (requeue_tx, requeue_rx) = mpsc::unbounded_channel();
        Ok(Box::new(MqttSubscription {
            shared: self.shared.clone(),
            source: source.to_string(),
            rx,
            requeue_tx,
            requeue_rx,
            credit: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        }))
    }

    /// Topics need no declaring.
    async fn declare(&self, _destination: &str) -> Result<(), BackendError> {
        Ok(())
    }

    async fn depth(&self, _destination: &str) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }

    fn health(&self) -> Health {
        self.shared.health.lock().clone()
    }

    async fn close(&self) {
        self.shared.closed.send_replace(true);
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        *self.shared.health.lock() = Health::Closed;
    }
}

struct MqttSubscription {
    shared: Arc<Shared>,
    source: String,
    rx: mpsc::UnboundedReceiver<Publish>,
    requeue_tx: mpsc::UnboundedSender<Publish>,
    requeue_rx: mpsc::UnboundedReceiver<Publish>,
    credit: Arc<Semaphore>,
}

#[async_trait]
impl Subscription for MqttSubscription {
    async fn next(&mut self) -> Option<Incoming> {
        let mut closed = self.shared.closed.subscribe();
        let permit = tokio::select! {
            p = self.credit.clone().acquire_owned() => p.ok()?,
            _ = until_closed(&mut closed) => return None,
        };
        let (publish, redelivered) = tokio::select! {
            biased;
            _ = until_closed(&mut closed) => return None,
            p = self.requeue_rx.recv() => (p?, true),
            p = self.rx.recv() => { let p = p?; let dup = p.dup; (p, dup) }
        };
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let routing_key =
            mapping::routing_key(&self.shared.config.topic_prefix, &self.source, &topic)
                .unwrap_or_default();
        let props = publish
            .properties
            .as_ref()
            .map(|p| mapping::Props {
                retain: publish.retain,
                content_type: p.content_type.clone(),
                correlation_data: p.correlation_data.clone(),
                response_topic: p.response_topic.clone(),
                message_expiry_interval: p.message_expiry_interval,
                user_properties: p.user_properties.clone(),
            })
            .unwrap_or(mapping::Props {
                retain: publish.retain,
                ..mapping::Props::default()
            });
        let message = mapping::from_mqtt(&routing_key, publish.payload.clone(), &props);
        Some(Incoming {
            message,
            redelivered,
            settle: Box::new(MqttSettle {
                client: self.shared.client.clone(),
                publish: Mutex::new(Some(publish)),
                requeue: self.requeue_tx.clone(),
                permit: Mutex::new(Some(permit)),
                settled: AtomicBool::new(false),
            }),
        })
    }
}

struct MqttSettle {
    client: AsyncClient,
    publish: Mutex<Option<Publish>>,
    requeue: mpsc::UnboundedSender<Publish>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    settled: AtomicBool,
}

impl MqttSettle {
    fn finish(&self, outcome: Settlement) {
        let Some(publish) = self.publish.lock().take() else {
            return;
        };
        let permit = self.permit.lock().take();
        match outcome {
            Settlement::Ack | Settlement::Reject => {
                if self.client.try_ack(&publish).is_err() {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let _ = client.ack(&publish).await;
                    });
                }
            }
            Settlement::Requeue => {
                // Unacknowledged at the broker; delivered again here. If the subscription is
                // gone, the broker sends it again when the session resumes.
                let _ = self.requeue.send(publish);
            }
        }
        drop(permit);
    }
}

impl Settle for MqttSettle {
    fn settle(&self, outcome: Settlement) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.finish(outcome);
        }
    }
}

impl Drop for MqttSettle {
    fn drop(&mut self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.finish(Settlement::Requeue);
        }
    }
}

/// Resolves once the bridge is closed.
async fn until_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await;
}

/// Exponential backoff with jitter, as the other bridges do it.
fn backoff_delay(retry: &warren_config::file::RetryConfig, failures: u32) -> Duration {
    let initial = retry.initial_backoff_ms.max(1);
    let max = retry.max_backoff_ms.max(initial);
    let ceiling = initial
        .saturating_mul(1u64 << failures.saturating_sub(1).min(40))
        .min(max);
    let floor = (ceiling / 2).max(initial).min(ceiling);
    let ms = if floor == ceiling {
        ceiling
    } else {
        rand::Rng::gen_range(&mut rand::thread_rng(), floor..=ceiling)
    };
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("mqtt://h:1889").unwrap(), ("h".to_string(), 1889));
        assert_eq!(parse_url("mqtt://u:p@h").unwrap(), ("h".to_string(), 1883));
        assert!(parse_url("mqtts://h").is_err());
        assert!(parse_url("http://h").is_err());
    }
}
