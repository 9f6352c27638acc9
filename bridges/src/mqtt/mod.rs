//! The MQTT bridge: a `Backend` whose destinations and sources are topic roots on an MQTT
//! broker, built on [rumqttc]: MQTT 5 (default) or 3.1.1 (`protocol: "3.1.1"`; no properties,
//! see [`mapping`] for what travels), over TCP (`mqtt://`) or TLS (`mqtts://`, rustls; the
//! broker's certificate checked against `ca_file` or the system's trust store).
//!
//! # Task layout
//!
//! One **event-loop task** per bridge owns rumqttc's `EventLoop` (one connection, the fixed
//! `client_id`, clean start off and a session expiry of one week — MQTT 3.1.1: clean session
//! off, kept as long as the broker keeps sessions — so the broker keeps the session, its
//! subscriptions and the QoS 1 messages queued for it while Warren is away).
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
//! sessions across its own restarts (Mosquitto: `persistence true`, which writes its state at
//! shutdown and every `autosave_interval`: a broker crash loses what was PUBACKed since the
//! last save). MQTT 5 brokers also limit the messages in flight to the bridge to its receive
//! maximum (set to 65535); the 3.1.1 client keeps at most 1000 publishes in flight.

pub mod client;
pub mod mapping;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use client::{Client, Event, EventLoop, Protocol, Received};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use warren_backends::store::Guard;
use warren_backends::{
    Backend, BackendError, Health, Incoming, Message, Settle, Settlement, Subscription,
};
use warren_config::file::MqttBackend;

use crate::engine::EngineTask;
use crate::retry::{backoff_delay, Owed};
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
    owed: Owed,
}

impl Pending {
    fn fail(self, reason: &str) {
        self.owed.fail(reason);
    }
}

enum Cmd {
    Publish(Pending),
    Subscribe {
        source: String,
        tx: mpsc::UnboundedSender<Received>,
    },
}

struct Shared {
    name: String,
    config: MqttBackend,
    stats: MqttStats,
    health: Mutex<Health>,
    closed: watch::Sender<bool>,
    client: Client,
    protocol: Protocol,
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
    event_loop: EngineTask<Cmd>,
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
        let protocol = Protocol::parse(&config.protocol).map_err(invalid)?;
        if config.envelope && protocol != Protocol::V311 {
            return Err(invalid("envelope: only with protocol \"3.1.1\"".into()));
        }
        let address = client::parse_url(&config.url).map_err(|e| invalid(format!("url: {e}")))?;
        let tls = match (address.tls, &config.ca_file) {
            (false, None) => None,
            (false, Some(_)) => return Err(invalid("ca_file: only with an mqtts:// URL".into())),
            (true, ca_file) => {
                let pem = match ca_file {
                    Some(path) => Some(crate::tls::read_ca_file(path).map_err(invalid)?),
                    None => None,
                };
                Some(Arc::new(
                    crate::tls::client_config(pem.as_deref()).map_err(invalid)?,
                ))
            }
        };
        if protocol == Protocol::V311 && !config.envelope {
            tracing::info!(
                backend = %name,
                "mqtt bridge speaks MQTT 3.1.1 without envelope: only topic, payload and RETAIN \
                 travel; AMQP properties and headers are dropped"
            );
        }
        let (client, eventloop) = client::connect(config, protocol, &address, tls);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            config: config.clone(),
            stats: MqttStats::default(),
            health: Mutex::new(Health::Degraded("connecting".into())),
            closed: watch::channel(false).0,
            client,
            protocol,
        });
        let event_loop = EngineTask::spawn(&runtime, |rx| run(shared.clone(), eventloop, rx));
        Ok(Arc::new(MqttBridge { shared, event_loop }))
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
    subs: Vec<(String, mpsc::UnboundedSender<Received>)>,
    /// Messages the broker sent (from the persistent session) before their queue mapping
    /// subscribed: held unacknowledged for the first [`ORPHAN_GRACE`] after start.
    orphans: Vec<Received>,
    started: std::time::Instant,
}

/// How long after start a message for no subscription is kept for one that may still come.
const ORPHAN_GRACE: Duration = Duration::from_secs(60);

impl Loop {
    fn request(&mut self) {
        while let Some(p) = self.waiting.pop_front() {
            match self
                .shared
                .client
                .try_publish(&p.topic, &p.payload, &p.props)
            {
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
            Event::OutgoingPublish(pkid) if pkid != 0 && !self.inflight.contains_key(&pkid) => {
                if let Some(p) = self.requested.pop_front() {
                    self.inflight.insert(pkid, p);
                }
            }
            Event::PubAck { pkid, failure } => {
                if let Some(p) = self.inflight.remove(&pkid) {
                    match failure {
                        None => {
                            self.shared.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                            p.owed.confirmed();
                        }
                        Some(reason) => {
                            self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                            p.fail(&format!("mqtt broker refused the message: {reason}"));
                        }
                    }
                }
            }
            Event::ConnAck { session_present } => {
                self.shared
                    .stats
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.set_health(Health::Ready);
                if !session_present {
                    for (source, _) in &self.subs {
                        let filter =
                            mapping::source_filter(&self.shared.config.topic_prefix, source);
                        let _ = self.shared.client.try_subscribe(filter);
                    }
                }
            }
            Event::Publish(publish) => {
                let topic = publish.topic();
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
                        self.shared.client.ack(publish);
                    }
                }
            }
            Event::OutgoingPublish(_) | Event::Other => {}
        }
    }

    /// A connection failure: every unacknowledged publish spends an attempt.
    fn failed(&mut self, reason: &str) {
        let shared = self.shared.clone();
        let spend = |p: &mut Pending| p.owed.spend_attempt(&shared.config.retry);
        let fail = |p: Pending| {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            let attempts = p.owed.attempts;
            p.fail(&format!(
                "mqtt bridge '{}': not acknowledged after {attempts} attempts: {reason}",
                shared.name
            ));
        };
        let ids: Vec<u16> = self.inflight.keys().copied().collect();
        for id in ids {
            let give_up = self.inflight.get_mut(&id).is_some_and(&spend);
            if give_up {
                if let Some(p) = self.inflight.remove(&id) {
                    fail(p);
                }
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
                        if mapping::routing_key(prefix, &source, &p.topic()).is_some() {
                            let _ = tx.send(p);
                        } else {
                            state.orphans.push(p);
                        }
                    }
                    state.subs.push((source, tx));
                    let _ = shared.client.try_subscribe(filter);
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

    fn publish(&self, destination: &str, message: Message, guard: Guard) {
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        let (payload, props) = match self.shared.protocol {
            Protocol::V5 => (message.body_bytes(), mapping::to_mqtt(&message)),
            Protocol::V311 => {
                let retain = mapping::Props {
                    retain: mapping::retain(&message),
                    ..mapping::Props::default()
                };
                if self.shared.config.envelope {
                    (mapping::wrap(&message), retain)
                } else {
                    (message.body_bytes(), retain)
                }
            }
        };
        let pending = Pending {
            topic: mapping::topic(
                &self.shared.config.topic_prefix,
                destination,
                message.routing_key(),
            ),
            payload,
            props,
            owed: Owed::new(guard),
        };
        if let Err(Cmd::Publish(p)) = self.event_loop.send(Cmd::Publish(pending)) {
            p.fail(&format!("mqtt bridge '{}' is closed", self.shared.name));
        }
    }

    async fn subscribe(
        &self,
        source: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Subscription>, BackendError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.event_loop
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
        self.event_loop.join().await;
        *self.shared.health.lock() = Health::Closed;
    }
}

struct MqttSubscription {
    shared: Arc<Shared>,
    source: String,
    rx: mpsc::UnboundedReceiver<Received>,
    requeue_tx: mpsc::UnboundedSender<Received>,
    requeue_rx: mpsc::UnboundedReceiver<Received>,
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
            p = self.rx.recv() => { let p = p?; let dup = p.dup(); (p, dup) }
        };
        let routing_key = mapping::routing_key(
            &self.shared.config.topic_prefix,
            &self.source,
            &publish.topic(),
        )
        .unwrap_or_default();
        let props = publish.props();
        let message = match self.shared.protocol {
            Protocol::V5 => mapping::from_mqtt(&routing_key, publish.payload(), &props),
            Protocol::V311 => mapping::from_mqtt311(
                &routing_key,
                publish.payload(),
                props.retain,
                self.shared.config.envelope,
            ),
        };
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
    client: Client,
    publish: Mutex<Option<Received>>,
    requeue: mpsc::UnboundedSender<Received>,
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
            Settlement::Ack | Settlement::Reject => self.client.ack(publish),
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
