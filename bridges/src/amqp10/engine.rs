//! The engine task (connection, session, sender links, CBS) and the subscription tasks.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::{DeliveryFut, DeliveryInfo};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp_types::messaging::{Body, Modified, Outcome};
use fe2o3_amqp_types::primitives::{Symbol, Timestamp};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_amqp::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use warren_backends::{Health, Incoming, Settle, Settlement, Subscription};
use warren_config::file::{Amqp10Target, RetryConfig};
use warren_config::servicebus::ConnectionString;

use super::{mapping, sas, Command, Pending};

/// How long connecting, attaching a link or putting a token may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// SAS tokens are made for this long and renewed well before they expire.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
const TOKEN_RENEWAL: Duration = Duration::from_secs(45 * 60);

/// Where and how to connect.
#[derive(Clone)]
pub struct Endpoint {
    /// `amqp://host:port` or `amqps://host:port`, without credentials.
    url: String,
    /// For logs and errors (never holds a password or key).
    display: String,
    hostname: String,
    plain: Option<(String, String)>,
    sas: Option<SasKey>,
}

#[derive(Clone)]
struct SasKey {
    namespace: String,
    key_name: String,
    key: String,
}

impl Endpoint {
    pub fn from_url(text: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(text).map_err(|e| format!("url: not a valid URL: {e}"))?;
        let scheme = url.scheme();
        let default_port = match scheme {
            "amqp" => 5672,
            "amqps" => 5671,
            other => {
                return Err(format!(
                    "url: scheme `{other}`, expected amqp:// or amqps://"
                ))
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("url: no host")?;
        let port = url.port().unwrap_or(default_port);
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let plain = (!url.username().is_empty())
            .then(|| (decode(url.username()), decode(url.password().unwrap_or(""))));
        let base = format!("{scheme}://{host}:{port}");
        Ok(Endpoint {
            url: base.clone(),
            display: base,
            hostname: host.trim_matches(|c| c == '[' || c == ']').to_string(),
            plain,
            sas: None,
        })
    }

    pub fn from_connection_string(cs: &ConnectionString) -> Endpoint {
        let (scheme, port) = if cs.emulator {
            ("amqp", cs.port.unwrap_or(5672))
        } else {
            ("amqps", cs.port.unwrap_or(5671))
        };
        let base = format!("{scheme}://{}:{port}", cs.host);
        Endpoint {
            url: base.clone(),
            display: base,
            hostname: cs.host.clone(),
            plain: None,
            sas: Some(SasKey {
                namespace: cs.host.clone(),
                key_name: cs.key_name.clone(),
                key: cs.key.clone(),
            }),
        }
    }
}

/// Where the engine answers a subscription's request for a receiver link.
type LinkReply = oneshot::Sender<Result<Link, String>>;

/// A receiver link the engine attached for a subscription.
pub(crate) struct Link {
    receiver: Receiver,
}

struct Conn {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: Option<CbsClient>,
    /// Entities a token was put for on this connection.
    authorized: HashSet<String>,
}

type Fut =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Result<Outcome, SendError>)> + Send>>;

enum SendFail {
    /// The link could not be attached or was refused: costs an attempt, retried later.
    Link(Pending, String),
    /// The connection or session is gone: reconnect.
    Connection(Pending, String),
    /// No resend can fix it.
    Permanent(Pending, String),
}

enum Exit {
    Closed,
    /// The connection failed; `healthy` when it had worked for a while (resets the backoff).
    Broken {
        reason: String,
        healthy: bool,
    },
}

pub(crate) struct Engine {
    name: String,
    endpoint: Endpoint,
    max_in_flight: usize,
    retry: RetryConfig,
    health: Arc<Mutex<Health>>,
    closed: Arc<AtomicBool>,
    waiting: VecDeque<Pending>,
    next_seq: u64,
    subscribe_waiting: Vec<(String, u16, LinkReply)>,
    retry_tx: mpsc::UnboundedSender<Pending>,
    retry_rx: mpsc::UnboundedReceiver<Pending>,
}

impl Engine {
    pub(crate) fn new(
        name: String,
        endpoint: Endpoint,
        max_in_flight: usize,
        retry: RetryConfig,
        health: Arc<Mutex<Health>>,
        closed: Arc<AtomicBool>,
    ) -> Engine {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Engine {
            name,
            endpoint,
            max_in_flight,
            retry,
            health,
            closed,
            waiting: VecDeque::new(),
            next_seq: 1,
            subscribe_waiting: Vec::new(),
            retry_tx,
            retry_rx,
        }
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut failures = 0u32;
        loop {
            tracing::info!(backend = %self.name, target = %self.endpoint.display, "amqp10: connecting");
            match self.connect().await {
                Ok(conn) => {
                    *self.health.lock() = Health::Ready;
                    tracing::info!(backend = %self.name, target = %self.endpoint.display, "amqp10: ready");
                    match self.ready(conn, &mut commands).await {
                        Exit::Closed => return,
                        Exit::Broken { reason, healthy } => {
                            failures = if healthy {
                                0
                            } else {
                                failures.saturating_add(1)
                            };
                            tracing::warn!(backend = %self.name, %reason, "amqp10: connection lost; reconnecting");
                            *self.health.lock() = Health::Degraded(reason);
                        }
                    }
                }
                Err(reason) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(backend = %self.name, target = %self.endpoint.display, %reason, "amqp10: cannot connect");
                    *self.health.lock() = Health::Degraded(reason.clone());
                    // A failed connection attempt costs every waiting message one attempt.
                    let waiting: Vec<Pending> = self.waiting.drain(..).collect();
                    for p in waiting {
                        if let Some(p) = self.charge(p, &reason) {
                            self.waiting.push_back(p);
                        }
                    }
                }
            }
            let deadline = Instant::now() + backoff(&self.retry, failures.max(1));
            if failures == 0 {
                // Healthy until now: reconnect at once.
                continue;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    Some(p) = self.retry_rx.recv() => self.insert_ordered(p),
                    cmd = commands.recv() => match cmd {
                        None => { self.fail_all("bridge dropped"); return; }
                        Some(Command::Close(done)) => {
                            self.fail_all("bridge closed");
                            let _ = done.send(());
                            return;
                        }
                        Some(Command::Publish(p)) => self.enqueue(p),
                        Some(Command::Subscribe { source, prefetch, reply }) => {
                            self.subscribe_waiting.push((source, prefetch, reply))
                        }
                    },
                }
            }
        }
    }

    fn enqueue(&mut self, mut p: Pending) {
        p.seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(p);
    }

    /// Puts a message back in arrival order (retries and resends go before newer messages).
    fn insert_ordered(&mut self, p: Pending) {
        let at = self.waiting.partition_point(|w| w.seq < p.seq);
        self.waiting.insert(at, p);
    }

    fn fail_all(&mut self, reason: &str) {
        for p in self.waiting.drain(..) {
            p.guard.failed(&format!("{}: {reason}", self.name));
        }
        while let Ok(p) = self.retry_rx.try_recv() {
            p.guard.failed(&format!("{}: {reason}", self.name));
        }
    }

    /// Counts a failed attempt: the message back if it may be tried again, else failed.
    fn charge(&self, mut p: Pending, reason: &str) -> Option<Pending> {
        p.attempts += 1;
        if self.retry.max_attempts != 0 && p.attempts >= self.retry.max_attempts {
            tracing::warn!(backend = %self.name, destination = %p.destination, attempts = p.attempts, reason, "amqp10: giving up on a message");
            p.guard.failed(&format!(
                "{}: not delivered to '{}' after {} attempts: {reason}",
                self.name, p.destination, p.attempts
            ));
            None
        } else {
            Some(p)
        }
    }

    /// Charges an attempt and schedules the retry after a backoff.
    fn retry_later(&self, p: Pending, reason: &str) {
        if let Some(p) = self.charge(p, reason) {
            let delay = backoff(&self.retry, p.attempts);
            let tx = self.retry_tx.clone();
            tokio::spawn(async move {
                sleep(delay).await;
                if let Err(mpsc::error::SendError(p)) = tx.send(p) {
                    p.guard.failed("bridge closed");
                }
            });
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let profile = match &self.endpoint.plain {
            Some((username, password)) => SaslProfile::Plain {
                username: username.clone(),
                password: password.clone(),
            },
            None => SaslProfile::Anonymous,
        };
        let container = format!("warren-{}-{:08x}", self.name, rand::random::<u32>());
        let open = Connection::builder()
            .container_id(container)
            .hostname(self.endpoint.hostname.as_str())
            .sasl_profile(profile)
            .open(self.endpoint.url.as_str());
        let mut connection = match timeout(STEP_TIMEOUT, open).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", self.endpoint.display)),
            Err(_) => return Err(format!("connecting to {} timed out", self.endpoint.display)),
        };
        let session = match timeout(STEP_TIMEOUT, Session::begin(&mut connection)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("cannot begin a session: {e}")),
            Err(_) => return Err("beginning a session timed out".into()),
        };
        let mut conn = Conn {
            connection,
            session,
            cbs: None,
            authorized: HashSet::new(),
        };
        if self.endpoint.sas.is_some() {
            match timeout(STEP_TIMEOUT, CbsClient::attach(&mut conn.session)).await {
                Ok(Ok(c)) => conn.cbs = Some(c),
                Ok(Err(e)) => return Err(format!("cannot attach to $cbs: {e}")),
                Err(_) => return Err("attaching to $cbs timed out".into()),
            }
        }
        Ok(conn)
    }

    /// Puts a SAS token for `address`'s entity on `$cbs` (Service Bus only).
    async fn authorize(&self, conn: &mut Conn, address: &str, renew: bool) -> Result<(), String> {
        let (Some(key), Some(cbs)) = (&self.endpoint.sas, conn.cbs.as_mut()) else {
            return Ok(());
        };
        let entity = address.trim_start_matches('/').to_string();
        if !renew && conn.authorized.contains(&entity) {
            return Ok(());
        }
        let audience = format!("sb://{}/{entity}", key.namespace);
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + TOKEN_LIFETIME.as_secs();
        let token = sas::sas_token(&audience, &key.key_name, &key.key, expiry);
        let cbs_token = CbsToken::new(
            token,
            "servicebus.windows.net:sastoken",
            Timestamp::from_milliseconds(expiry as i64 * 1000),
        );
        match timeout(STEP_TIMEOUT, cbs.put_token(audience.clone(), cbs_token)).await {
            Ok(Ok(())) => {
                conn.authorized.insert(entity);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("CBS put-token for {audience} refused: {e}")),
            Err(_) => Err(format!("CBS put-token for {audience} timed out")),
        }
    }

    async fn attach_receiver(&self, conn: &mut Conn, source: &str) -> Result<Link, String> {
        self.authorize(conn, source, false).await?;
        let name = format!(
            "warren-{}-in-{source}-{:08x}",
            self.name,
            rand::random::<u32>()
        );
        let attach = Receiver::builder()
            .name(name)
            .source(source.to_string())
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut conn.session);
        match timeout(STEP_TIMEOUT, attach).await {
            Ok(Ok(receiver)) => Ok(Link { receiver }),
            Ok(Err(e)) => Err(format!("cannot attach a receiver to '{source}': {e}")),
            Err(_) => Err(format!("attaching a receiver to '{source}' timed out")),
        }
    }

    async fn send(
        &self,
        conn: &mut Conn,
        senders: &mut HashMap<String, Sender>,
        p: Pending,
    ) -> Result<(DeliveryFut<Result<Outcome, SendError>>, Pending), SendFail> {
        if !senders.contains_key(&p.destination) {
            if let Err(e) = self.authorize(conn, &p.destination, false).await {
                return Err(SendFail::Link(p, e));
            }
            let name = format!(
                "warren-{}-out-{}-{:08x}",
                self.name,
                p.destination,
                rand::random::<u32>()
            );
            let attach = Sender::attach(&mut conn.session, name, p.destination.clone());
            match timeout(STEP_TIMEOUT, attach).await {
                Ok(Ok(s)) => {
                    senders.insert(p.destination.clone(), s);
                }
                Ok(Err(e)) => {
                    let reason = format!("cannot attach a sender to '{}': {e}", p.destination);
                    if conn.session.is_ended() || conn.connection.is_closed() {
                        return Err(SendFail::Connection(p, reason));
                    }
                    return Err(SendFail::Link(p, reason));
                }
                Err(_) => {
                    let reason = format!("attaching a sender to '{}' timed out", p.destination);
                    return Err(SendFail::Connection(p, reason));
                }
            }
        }
        let Some(sender) = senders.get_mut(&p.destination) else {
            return Err(SendFail::Link(p, "no sender".into()));
        };
        match sender.send_batchable((*p.message).clone()).await {
            Ok(fut) => Ok((fut, p)),
            Err(SendError::MessageSizeExceeded(_)) => {
                let reason = format!(
                    "message larger than the max-message-size of the link to '{}'",
                    p.destination
                );
                Err(SendFail::Permanent(p, reason))
            }
            Err(e) => {
                senders.remove(&p.destination);
                let reason = format!("sending to '{}' failed: {e}", p.destination);
                if conn.session.is_ended() || conn.connection.is_closed() {
                    Err(SendFail::Connection(p, reason))
                } else {
                    Err(SendFail::Link(p, reason))
                }
            }
        }
    }

    async fn ready(
        &mut self,
        mut conn: Conn,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Exit {
        let mut senders: HashMap<String, Sender> = HashMap::new();
        let mut inflight: BTreeMap<u64, Pending> = BTreeMap::new();
        let mut futs: FuturesUnordered<Fut> = FuturesUnordered::new();
        let started = Instant::now();
        let mut accepted_any = false;
        let mut renew = tokio::time::interval_at(Instant::now() + TOKEN_RENEWAL, TOKEN_RENEWAL);

        let subs: Vec<_> = self.subscribe_waiting.drain(..).collect();
        for (source, _prefetch, reply) in subs {
            let link = self.attach_receiver(&mut conn, &source).await;
            let _ = reply.send(link);
        }

        let broken = loop {
            // Write what the window allows, without waiting for any disposition.
            let mut lost = None;
            while futs.len() < self.max_in_flight {
                let Some(p) = self.waiting.pop_front() else {
                    break;
                };
                let seq = p.seq;
                match self.send(&mut conn, &mut senders, p).await {
                    Ok((fut, p)) => {
                        // The engine keeps the message (and its guard) until it is settled.
                        inflight.insert(seq, p);
                        futs.push(Box::pin(async move { (seq, fut.await) }));
                    }
                    Err(SendFail::Link(p, reason)) => {
                        tracing::warn!(backend = %self.name, %reason, "amqp10: link failure");
                        self.retry_later(p, &reason);
                        continue;
                    }
                    Err(SendFail::Permanent(p, reason)) => {
                        tracing::error!(backend = %self.name, %reason, "amqp10: message refused for good");
                        p.guard.failed(&format!("{}: {reason}", self.name));
                        continue;
                    }
                    Err(SendFail::Connection(p, reason)) => {
                        // Counts as an attempt: a destination whose attach ends the session
                        // (RabbitMQ does so for a missing exchange) must not loop forever.
                        if let Some(p) = self.charge(p, &reason) {
                            self.waiting.push_front(p);
                        }
                        lost = Some(reason);
                        break;
                    }
                }
            }
            if let Some(reason) = lost {
                break reason;
            }
            if conn.connection.is_closed() || conn.session.is_ended() {
                break "the connection or session ended".to_string();
            }
            tokio::select! {
                Some((seq, result)) = futs.next(), if !futs.is_empty() => {
                    let Some(p) = inflight.remove(&seq) else { continue };
                    match result {
                        Ok(Outcome::Accepted(_)) => {
                            accepted_any = true;
                            drop(p);
                        }
                        Ok(other) => {
                            let reason = describe(&other);
                            tracing::debug!(backend = %self.name, destination = %p.destination, %reason, "amqp10: transfer not accepted");
                            self.retry_later(p, &reason);
                        }
                        Err(e) => {
                            let reason = format!("transfer to '{}' failed: {e}", p.destination);
                            senders.remove(&p.destination);
                            if conn.session.is_ended() || conn.connection.is_closed() {
                                inflight.insert(seq, p);
                                break reason;
                            }
                            self.retry_later(p, &reason);
                        }
                    }
                }
                Some(p) = self.retry_rx.recv() => self.insert_ordered(p),
                cmd = commands.recv() => match cmd {
                    None => { break "bridge dropped".into(); }
                    Some(Command::Close(done)) => {
                        self.shutdown(conn, senders, futs, inflight).await;
                        let _ = done.send(());
                        return Exit::Closed;
                    }
                    Some(Command::Publish(p)) => self.enqueue(p),
                    Some(Command::Subscribe { source, prefetch: _, reply }) => {
                        let link = self.attach_receiver(&mut conn, &source).await;
                        let _ = reply.send(link);
                    }
                },
                _ = renew.tick(), if self.endpoint.sas.is_some() => {
                    let entities: Vec<String> = conn.authorized.iter().cloned().collect();
                    let mut failed = None;
                    for entity in entities {
                        if let Err(e) = self.authorize(&mut conn, &entity, true).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed { break e; }
                }
                r = conn.connection.on_close() => {
                    break match r {
                        Ok(()) => "the peer closed the connection".to_string(),
                        Err(e) => format!("connection closed: {e}"),
                    };
                }
            }
        };
        // Unsettled messages go back, in order, to be resent on the next connection.
        drop(futs);
        drop(senders);
        for (_, p) in std::mem::take(&mut inflight) {
            if let Some(p) = self.charge(p, &broken) {
                self.insert_ordered(p);
            }
        }
        if !conn.connection.is_closed() {
            let _ = timeout(Duration::from_secs(2), conn.connection.close()).await;
        }
        Exit::Broken {
            reason: broken,
            healthy: accepted_any || started.elapsed() > Duration::from_secs(10),
        }
    }

    async fn shutdown(
        &mut self,
        mut conn: Conn,
        senders: HashMap<String, Sender>,
        mut futs: FuturesUnordered<Fut>,
        mut inflight: BTreeMap<u64, Pending>,
    ) {
        // Give in-flight transfers a moment to be settled, then fail what is left.
        let _ = timeout(Duration::from_secs(5), async {
            while let Some((seq, result)) = futs.next().await {
                if let Some(p) = inflight.remove(&seq) {
                    match result {
                        Ok(Outcome::Accepted(_)) => drop(p),
                        Ok(other) => p.guard.failed(&describe(&other)),
                        Err(e) => p.guard.failed(&e.to_string()),
                    }
                }
            }
        })
        .await;
        for (_, p) in inflight {
            p.guard.failed(&format!("{} closed", self.name));
        }
        self.fail_all("bridge closed");
        for (_, s) in senders {
            let _ = timeout(Duration::from_secs(1), s.close()).await;
        }
        let _ = timeout(Duration::from_secs(2), conn.session.end()).await;
        let _ = timeout(Duration::from_secs(2), conn.connection.close()).await;
        self.closed.store(true, Ordering::Release);
        *self.health.lock() = Health::Closed;
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Accepted(_) => "accepted".into(),
        Outcome::Rejected(r) => match &r.error {
            Some(e) => format!(
                "rejected by the peer: {:?}{}",
                e.condition,
                e.description
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
            None => "rejected by the peer".into(),
        },
        Outcome::Released(_) => "released by the peer".into(),
        Outcome::Modified(_) => "modified by the peer".into(),
        #[allow(unreachable_patterns)]
        _ => "not accepted by the peer".into(),
    }
}

/// Exponential backoff with jitter: `initial * 2^(n-1)`, capped at `max`, then a random point
/// in its upper half.
pub(crate) fn backoff(retry: &RetryConfig, n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(20);
    let base = retry
        .initial_backoff_ms
        .saturating_mul(1u64 << exp)
        .min(retry.max_backoff_ms)
        .max(1);
    let jittered = base / 2 + rand::random::<u64>() % (base / 2 + 1);
    Duration::from_millis(jittered)
}

// ---------------------------------------------------------------------------------------------
// Subscriptions.

struct SettleHandle {
    generation: u64,
    info: DeliveryInfo,
    tx: mpsc::UnboundedSender<(u64, DeliveryInfo, Settlement)>,
}

impl Settle for SettleHandle {
    fn settle(&self, outcome: Settlement) {
        let _ = self.tx.send((self.generation, self.info.clone(), outcome));
    }
}

pub(crate) struct Subscriber {
    incoming: mpsc::UnboundedReceiver<Incoming>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl Subscription for Subscriber {
    async fn next(&mut self) -> Option<Incoming> {
        self.incoming.recv().await
    }
}

impl Subscriber {
    pub(crate) fn start(
        name: String,
        source: String,
        prefetch: u16,
        target: Amqp10Target,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Subscriber {
        let (out, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(subscription_task(
            name, source, prefetch, target, commands, out,
        ));
        Subscriber { incoming, task }
    }
}

async fn subscription_task(
    name: String,
    source: String,
    prefetch: u16,
    target: Amqp10Target,
    commands: mpsc::UnboundedSender<Command>,
    out: mpsc::UnboundedSender<Incoming>,
) {
    let retry = RetryConfig::default();
    let (settle_tx, mut settle_rx) = mpsc::unbounded_channel::<(u64, DeliveryInfo, Settlement)>();
    let mut generation = 0u64;
    let mut failures = 0u32;
    loop {
        let (reply, answer) = oneshot::channel();
        if commands
            .send(Command::Subscribe {
                source: source.clone(),
                prefetch,
                reply,
            })
            .is_err()
        {
            return;
        }
        let mut link = match answer.await {
            Err(_) => return,
            Ok(Err(reason)) => {
                failures += 1;
                tracing::warn!(backend = %name, %source, %reason, "amqp10: subscription cannot attach; retrying");
                sleep(backoff(&retry, failures)).await;
                continue;
            }
            Ok(Ok(link)) => link,
        };
        generation += 1;
        tracing::info!(backend = %name, %source, prefetch, "amqp10: subscribed");
        let mut unsettled: u32 = 0;
        if let Err(e) = link.receiver.set_credit(prefetch as u32).await {
            tracing::warn!(backend = %name, %source, error = %e, "amqp10: cannot grant credit");
            continue;
        }
        failures = 0;
        let reason = loop {
            tokio::select! {
                delivery = link.receiver.recv::<Body<Value>>() => match delivery {
                    Ok(delivery) => {
                        unsettled += 1;
                        let message = mapping::from_amqp10(delivery.message(), &source);
                        let redelivered = delivery
                            .message()
                            .header
                            .as_ref()
                            .is_some_and(|h| h.delivery_count > 0);
                        let settle = Box::new(SettleHandle {
                            generation,
                            info: DeliveryInfo::from(&delivery),
                            tx: settle_tx.clone(),
                        });
                        if out.send(Incoming { message, redelivered, settle }).is_err() {
                            let _ = link.receiver.close().await;
                            return;
                        }
                    }
                    Err(e) => break format!("{e}"),
                },
                Some(first) = settle_rx.recv() => {
                    let mut batch = vec![first];
                    while let Ok(more) = settle_rx.try_recv() {
                        batch.push(more);
                    }
                    let mut failed = None;
                    for (gen, info, outcome) in batch {
                        if gen != generation {
                            continue; // the old link's deliveries come back from the peer
                        }
                        unsettled = unsettled.saturating_sub(1);
                        if let Err(e) = dispose(&link.receiver, info, outcome, target).await {
                            failed = Some(format!("settling failed: {e}"));
                            break;
                        }
                    }
                    if let Some(e) = failed { break e; }
                    let credit = (prefetch as u32).saturating_sub(unsettled);
                    if let Err(e) = link.receiver.set_credit(credit).await {
                        break format!("cannot grant credit: {e}");
                    }
                }
                _ = out.closed() => {
                    let _ = link.receiver.close().await;
                    return;
                }
            }
        };
        tracing::warn!(backend = %name, %source, %reason, "amqp10: subscription link lost; re-attaching");
        failures += 1;
        sleep(backoff(&retry, failures)).await;
    }
}

async fn dispose(
    receiver: &Receiver,
    info: DeliveryInfo,
    outcome: Settlement,
    target: Amqp10Target,
) -> Result<(), String> {
    let servicebus = target == Amqp10Target::Servicebus;
    let r = match (outcome, servicebus) {
        (Settlement::Ack, _) => receiver.accept(info).await,
        (Settlement::Requeue, false) => receiver.release(info).await,
        (Settlement::Requeue, true) => {
            receiver
                .modify(
                    info,
                    Modified {
                        delivery_failed: Some(true),
                        undeliverable_here: None,
                        message_annotations: None,
                    },
                )
                .await
        }
        (Settlement::Reject, false) => receiver.reject(info, None).await,
        (Settlement::Reject, true) => {
            let error = AmqpError {
                condition: ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
                description: Some("rejected by the Warren client".into()),
                info: None,
            };
            receiver.reject(info, Some(error)).await
        }
    };
    r.map_err(|e| e.to_string())
}
