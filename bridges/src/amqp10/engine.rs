//! The engine task (connection, session, sender links, CBS) and the subscription tasks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::{DeliveryFut, DeliveryInfo};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_types::definitions::{Error as AmqpError, ErrorCondition, Fields};
use fe2o3_amqp_types::messaging::{Body, Modified, Outcome, Source, Target};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Timestamp};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_amqp::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};
use warren_backends::{Health, Incoming, Settle, Settlement, Subscription};
use warren_config::file::{AddressCapability, Amqp10Backend, Amqp10Target, RetryConfig};
use warren_config::servicebus::ConnectionString;

use super::management::{lock_token, MgmtError, MgmtLink};
use super::{credit_to_grant, mapping, sas, Command, Pending};

/// How long connecting, attaching a link or putting a token may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The source filter that asks Service Bus for a session of a session-enabled entity.
pub(crate) const SESSION_FILTER: &str = "com.microsoft:session-filter";
/// Service Bus's attach property: how long (ms) the service may hold the attach.
const SERVICEBUS_TIMEOUT: &str = "com.microsoft:timeout";

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
    tls: bool,
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
            tls: scheme == "amqps",
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
            tls: !cs.emulator,
        }
    }
}

/// The engine's settings beyond the endpoint, from the backend's configuration.
#[derive(Clone)]
pub(crate) struct Options {
    pub target: Amqp10Target,
    pub token_lifetime: Duration,
    pub receive_session: Option<String>,
    /// `receive_session: "*"`: how long a session may go without a message (nothing unsettled)
    /// before the receiver moves to the next available one. `None`: the session is kept.
    pub session_idle_timeout: Option<Duration>,
    /// How long the peer may stay silent before the connection is declared dead (the Open asks
    /// for traffic at half of it). `None`: no idle timeout.
    pub idle_timeout: Option<Duration>,
    /// `amqps://` with a CA file or a client certificate; `None`: webpki roots, no client auth.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// A client certificate is configured: log in with SASL EXTERNAL.
    pub external: bool,
    /// The terminus capability (`queue` / `topic`) the links to an address carry: ActiveMQ
    /// Artemis picks the routing type from it.
    pub address_capabilities: BTreeMap<String, AddressCapability>,
}

impl Options {
    pub(crate) fn from_config(config: &Amqp10Backend) -> Result<Options, String> {
        let tls = if config.ca_file.is_some() || config.client_cert_file.is_some() {
            Some(tls_connector(config)?)
        } else {
            None
        };
        Ok(Options {
            target: config.effective_target(),
            token_lifetime: Duration::from_secs(config.token_lifetime_secs.max(1)),
            receive_session: config.receive_session.clone(),
            session_idle_timeout: config
                .effective_session_idle_timeout_ms()
                .map(|ms| Duration::from_millis(ms.max(1))),
            idle_timeout: (config.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(config.idle_timeout_ms)),
            tls,
            external: config.client_cert_file.is_some(),
            address_capabilities: config.address_capabilities.clone(),
        })
    }

    /// The capabilities a sender's target or a receiver's source for `address` carries, if
    /// the address is configured with one.
    fn capabilities_for(&self, address: &str) -> Option<Vec<Symbol>> {
        self.address_capabilities
            .get(address)
            .map(|capability| vec![Symbol::from(capability.symbol())])
    }
}

/// A rustls connector trusting `ca_file` (else the webpki roots) and presenting the client
/// certificate when one is configured.
fn tls_connector(config: &Amqp10Backend) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| format!("{key}: cannot read {path}: {e}"))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = read("ca_file", path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("ca_file: {path}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file: {path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("ca_file: {path} holds no PEM certificate"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    let client = match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let pem = read("client_cert_file", cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client_cert_file: {cert_path}: {e}"))?;
            if chain.is_empty() {
                return Err(format!(
                    "client_cert_file: {cert_path} holds no PEM certificate"
                ));
            }
            let key_pem = read("client_key_file", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("client_key_file: {key_path}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client_cert_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
}

/// Where the engine answers a subscription's request for a receiver link.
type LinkReply = oneshot::Sender<Result<Link, AttachFailure>>;

/// Why a receiver link could not be attached.
#[derive(Debug)]
pub(crate) enum AttachFailure {
    /// `receive_session: "*"` and no session has messages: the normal state of an idle
    /// session-enabled entity, not an error. The peer already held the attach for
    /// `NEXT_SESSION_WAIT`, so the subscription simply asks again.
    NoSessionAvailable(String),
    Failed(String),
}

impl From<String> for AttachFailure {
    fn from(reason: String) -> Self {
        AttachFailure::Failed(reason)
    }
}

/// How long Service Bus may hold an attach for the next available session
/// (`com.microsoft:timeout`) before answering that none is: below `STEP_TIMEOUT`, so the
/// peer's answer, not our timer, ends the wait.
const NEXT_SESSION_WAIT: Duration = Duration::from_secs(20);

/// A receiver link the engine attached for a subscription.
pub(crate) struct Link {
    receiver: Receiver,
    /// The entity's `$management` node (Service Bus: lock renewal).
    management: Option<MgmtLink>,
    /// `receive_session: "*"`: let the session go after this long without a message.
    session_idle_timeout: Option<Duration>,
    /// The session the peer granted (the attach's session filter), when it named one.
    session: Option<String>,
    /// The AMQP session the link lives on, its own: a refused attach ends its session at some
    /// peers (RabbitMQ's plugin, for a queue that does not exist), and that must not take the
    /// senders' session and the other subscriptions down with it. Declared last so the links
    /// above are dropped (detached) before the session ends.
    _amqp_session: SessionHandle<()>,
}

struct Conn {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: Option<MgmtLink>,
    /// Entities a token was put for on this connection, and when to renew it.
    authorized: HashMap<String, Instant>,
}

/// An in-flight transfer: its message's sequence number, the id of the link it went out on,
/// and the peer's outcome.
type Fut = std::pin::Pin<
    Box<dyn std::future::Future<Output = (u64, u64, Result<Outcome, SendError>)> + Send>,
>;

/// Sender links by destination address, each with an id unique on the engine (so a late
/// failure of an old link never drops its replacement).
type Senders = HashMap<String, (u64, Sender)>;

/// Returns when the peer detaches one of `senders` (e.g. `amqp:link:detach-forced`): its
/// address, id and the error. Never returns without senders.
async fn any_detached(senders: &mut Senders) -> (String, u64, String) {
    if senders.is_empty() {
        return std::future::pending().await;
    }
    let waits = senders.iter_mut().map(|(address, (id, sender))| {
        let (address, id) = (address.clone(), *id);
        Box::pin(async move { (address, id, sender.on_detach().await.to_string()) })
    });
    futures_util::future::select_all(waits).await.0
}

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
    options: Options,
    max_in_flight: usize,
    retry: RetryConfig,
    health: Arc<Mutex<Health>>,
    closed: Arc<AtomicBool>,
    waiting: VecDeque<Pending>,
    next_seq: u64,
    subscribe_waiting: Vec<(String, u16, LinkReply)>,
    retry_tx: mpsc::UnboundedSender<Pending>,
    retry_rx: mpsc::UnboundedReceiver<Pending>,
    next_link_id: std::sync::atomic::AtomicU64,
}

impl Engine {
    pub(crate) fn new(
        name: String,
        endpoint: Endpoint,
        options: Options,
        max_in_flight: usize,
        retry: RetryConfig,
        health: Arc<Mutex<Health>>,
        closed: Arc<AtomicBool>,
    ) -> Engine {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Engine {
            name,
            endpoint,
            options,
            max_in_flight,
            retry,
            health,
            closed,
            waiting: VecDeque::new(),
            next_seq: 1,
            subscribe_waiting: Vec::new(),
            retry_tx,
            retry_rx,
            next_link_id: std::sync::atomic::AtomicU64::new(1),
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
        let profile = match (&self.endpoint.plain, self.options.external) {
            (Some((username, password)), _) => SaslProfile::Plain {
                username: username.clone(),
                password: password.clone(),
            },
            (None, true) => SaslProfile::External,
            (None, false) => SaslProfile::Anonymous,
        };
        let container = format!("warren-{}-{:08x}", self.name, rand::random::<u32>());
        // amqps:// is TLS from the first byte on the port (the "alternative establishment" of
        // the spec's 5.2.1), as Service Bus, RabbitMQ and Artemis listen on 5671.
        let mut builder = Connection::builder()
            .container_id(container)
            .hostname(self.endpoint.hostname.as_str())
            .alt_tls_establishment(true)
            .sasl_profile(profile);
        if let Some(idle) = self.options.idle_timeout {
            // fe2o3 declares the connection dead after this long without a frame from the peer
            // and sends half of it as the Open's idle-time-out (spec 2.4.5), so the peer's
            // heartbeats come twice as often as needed; it answers the peer's own idle-time-out
            // with empty frames.
            builder = builder.idle_time_out(u32::try_from(idle.as_millis()).unwrap_or(u32::MAX));
        }
        let open = async {
            match (&self.options.tls, self.endpoint.tls) {
                (Some(connector), true) => {
                    builder
                        .tls_connector(connector.clone())
                        .open(self.endpoint.url.as_str())
                        .await
                }
                _ => builder.open(self.endpoint.url.as_str()).await,
            }
        };
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
            authorized: HashMap::new(),
        };
        if self.endpoint.sas.is_some() {
            let prefix = format!("warren-{}-cbs", self.name);
            match timeout(
                STEP_TIMEOUT,
                MgmtLink::attach(&mut conn.session, "$cbs", &prefix),
            )
            .await
            {
                Ok(Ok(c)) => conn.cbs = Some(c),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("attaching to $cbs timed out".into()),
            }
        }
        Ok(conn)
    }

    /// The entity an address names, for CBS: `topic/Subscriptions/sub/$management` →
    /// `topic/Subscriptions/sub`.
    fn entity(address: &str) -> String {
        let entity = address.trim_start_matches('/');
        entity
            .strip_suffix("/$management")
            .unwrap_or(entity)
            .to_string()
    }

    /// Puts a SAS token for `address`'s entity on `$cbs` (Service Bus only), unless this
    /// connection already holds one (or `renew`).
    async fn authorize(&self, conn: &mut Conn, address: &str, renew: bool) -> Result<(), String> {
        let (Some(key), Some(cbs)) = (&self.endpoint.sas, conn.cbs.as_mut()) else {
            return Ok(());
        };
        let entity = Self::entity(address);
        if !renew && conn.authorized.contains_key(&entity) {
            return Ok(());
        }
        let audience = format!("sb://{}/{entity}", key.namespace);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let lifetime = self.options.token_lifetime;
        let expiry = now.as_secs() + lifetime.as_secs();
        let token = sas::sas_token(&audience, &key.key_name, &key.key, expiry);
        let result = cbs
            .call(
                "put-token",
                vec![
                    ("type", SimpleValue::from("servicebus.windows.net:sastoken")),
                    ("name", SimpleValue::from(audience.as_str())),
                    (
                        "expiration",
                        SimpleValue::Timestamp(Timestamp::from_milliseconds(
                            (expiry as i64).saturating_mul(1000),
                        )),
                    ),
                ],
                Value::String(token),
                STEP_TIMEOUT,
            )
            .await;
        match result {
            Ok(response) => {
                // Renew once three quarters of the token's actual validity have passed (the
                // expiry is in whole seconds, so it is up to a second shorter than `lifetime`).
                let valid = Duration::from_secs(expiry).saturating_sub(now);
                let renew_at = Instant::now() + valid.mul_f64(0.75);
                tracing::debug!(backend = %self.name, %audience, status = response.status, expiry, "amqp10: SAS token put on $cbs");
                conn.authorized.insert(entity, renew_at);
                Ok(())
            }
            Err(MgmtError::Status {
                code, description, ..
            }) => {
                let hint = match code {
                    401 => ": unauthorized (check SharedAccessKeyName/SharedAccessKey and that the key has the Send/Listen claim for this entity)",
                    404 => ": no such entity in the namespace (create the queue/topic/subscription, or fix the route's address)",
                    _ => "",
                };
                Err(format!(
                    "Service Bus refused the token for entity '{entity}' ({audience}): status {code}{}{hint}",
                    description.map(|d| format!(" {d}")).unwrap_or_default()
                ))
            }
            Err(e) => Err(format!("CBS put-token for entity '{entity}' failed: {e}")),
        }
    }

    async fn attach_receiver(&self, conn: &mut Conn, source: &str) -> Result<Link, AttachFailure> {
        self.authorize(conn, source, false).await?;
        let name = format!(
            "warren-{}-in-{source}-{:08x}",
            self.name,
            rand::random::<u32>()
        );
        let mut terminus = Source::builder().address(source.to_string());
        if let Some(capabilities) = self.options.capabilities_for(source) {
            terminus = terminus.capabilities(capabilities);
        }
        if let Some(session) = &self.options.receive_session {
            // Service Bus: a session id, or null for the next available session.
            let value = match session.as_str() {
                "*" => Value::Null,
                id => Value::String(id.to_string()),
            };
            terminus =
                terminus.add_to_filter_using_legacy_format(Symbol::from(SESSION_FILTER), value);
        }
        let next_available = self.options.receive_session.as_deref() == Some("*");
        let mut amqp_session =
            match timeout(STEP_TIMEOUT, Session::begin(&mut conn.connection)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(format!("cannot begin a session for '{source}': {e}").into());
                }
                Err(_) => {
                    return Err(format!("beginning a session for '{source}' timed out").into());
                }
            };
        let mut builder = Receiver::builder()
            .name(name)
            .source(terminus.build())
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            // fe2o3 refuses an answer whose filter value is null, which is what a peer echoing
            // the next-available-session request sends; the filter is checked below instead.
            .verify_incoming_source(!next_available);
        if next_available {
            let mut properties = Fields::new();
            properties.insert(
                Symbol::from(SERVICEBUS_TIMEOUT),
                Value::Uint(NEXT_SESSION_WAIT.as_millis() as u32),
            );
            builder = builder.properties(properties);
        }
        let attach = builder.attach(&mut amqp_session);
        let receiver = match timeout(STEP_TIMEOUT, attach).await {
            Ok(Ok(receiver)) => receiver,
            Ok(Err(e)) => {
                return Err(format!("cannot attach a receiver to '{source}': {e}").into());
            }
            Err(_) if next_available => {
                return Err(AttachFailure::NoSessionAvailable(format!(
                    "no session available on '{source}' within {} s",
                    STEP_TIMEOUT.as_secs()
                )));
            }
            Err(_) => return Err(format!("attaching a receiver to '{source}' timed out").into()),
        };
        if next_available {
            if receiver.source().is_none() {
                // Service Bus answers so when no session had messages within the wait.
                let _ = timeout(Duration::from_secs(2), receiver.close()).await;
                return Err(AttachFailure::NoSessionAvailable(format!(
                    "no session available on '{source}'"
                )));
            }
            let refusal = match receiver.source() {
                None => None,
                Some(s)
                    if !s
                        .filter
                        .as_ref()
                        .is_some_and(|f| f.contains_key(&Symbol::from(SESSION_FILTER))) =>
                {
                    Some(format!(
                        "'{source}': the peer ignored the session filter ({SESSION_FILTER}); is \
                         the entity session-enabled?"
                    ))
                }
                Some(_) => None,
            };
            if let Some(reason) = refusal {
                let _ = timeout(Duration::from_secs(2), receiver.close()).await;
                return Err(reason.into());
            }
        }
        let mut session = None;
        if self.options.receive_session.is_some() {
            // Service Bus answers with the granted session id in the source's filter.
            session = receiver
                .source()
                .as_ref()
                .and_then(|s| s.filter.as_ref())
                .and_then(|f| f.get(&Symbol::from(SESSION_FILTER)))
                .and_then(|v| match v {
                    Value::String(id) => Some(id.clone()),
                    Value::Described(d) => match &d.value {
                        Value::String(id) => Some(id.clone()),
                        _ => None,
                    },
                    _ => None,
                });
            tracing::info!(backend = %self.name, %source, session = ?session, "amqp10: session receiver attached");
        }
        let management = if self.options.target == Amqp10Target::Servicebus {
            let node = format!("{}/$management", source.trim_end_matches('/'));
            let prefix = format!("warren-{}-mgmt", self.name);
            match timeout(
                STEP_TIMEOUT,
                MgmtLink::attach(&mut amqp_session, &node, &prefix),
            )
            .await
            {
                Ok(Ok(m)) => Some(m),
                Ok(Err(e)) => {
                    tracing::warn!(backend = %self.name, %source, error = %e, "amqp10: no $management link: locks held long will not be renewed");
                    None
                }
                Err(_) => {
                    tracing::warn!(backend = %self.name, %source, "amqp10: attaching to $management timed out: locks held long will not be renewed");
                    None
                }
            }
        } else {
            None
        };
        Ok(Link {
            receiver,
            management,
            session_idle_timeout: self.options.session_idle_timeout,
            session,
            _amqp_session: amqp_session,
        })
    }

    async fn send(
        &self,
        conn: &mut Conn,
        senders: &mut Senders,
        p: Pending,
    ) -> Result<(DeliveryFut<Result<Outcome, SendError>>, Pending, u64), SendFail> {
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
            let mut target = Target::builder().address(p.destination.clone());
            if let Some(capabilities) = self.options.capabilities_for(&p.destination) {
                target = target.capabilities(capabilities);
            }
            let attach = Sender::builder()
                .name(name)
                .target(target.build())
                .attach(&mut conn.session);
            match timeout(STEP_TIMEOUT, attach).await {
                Ok(Ok(s)) => {
                    let id = self.next_link_id.fetch_add(1, Ordering::Relaxed);
                    senders.insert(p.destination.clone(), (id, s));
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
        let Some((id, sender)) = senders.get_mut(&p.destination) else {
            return Err(SendFail::Link(p, "no sender".into()));
        };
        let id = *id;
        match sender.send_batchable((*p.message).clone()).await {
            Ok(fut) => Ok((fut, p, id)),
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
        let mut senders: Senders = HashMap::new();
        let mut inflight: BTreeMap<u64, Pending> = BTreeMap::new();
        let mut futs: FuturesUnordered<Fut> = FuturesUnordered::new();
        let started = Instant::now();
        let mut accepted_any = false;

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
                    Ok((fut, p, link)) => {
                        // The engine keeps the message (and its guard) until it is settled.
                        inflight.insert(seq, p);
                        futs.push(Box::pin(async move { (seq, link, fut.await) }));
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
                Some((seq, link, result)) = futs.next(), if !futs.is_empty() => {
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
                            if senders.get(&p.destination).is_some_and(|(id, _)| *id == link) {
                                senders.remove(&p.destination);
                            }
                            if conn.session.is_ended() || conn.connection.is_closed() {
                                inflight.insert(seq, p);
                                break reason;
                            }
                            self.retry_later(p, &reason);
                        }
                    }
                }
                (address, link, error) = any_detached(&mut senders) => {
                    // Dropping the link fails its unsettled transfers, which are then retried
                    // (after a backoff) on a new link.
                    tracing::warn!(backend = %self.name, %address, %error, "amqp10: the peer detached the sender link; re-attaching and resending its unsettled messages");
                    if senders.get(&address).is_some_and(|(id, _)| *id == link) {
                        senders.remove(&address);
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
                _ = sleep_until_renewal(&conn.authorized) => {
                    let now = Instant::now();
                    let due: Vec<String> = conn
                        .authorized
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(e, _)| e.clone())
                        .collect();
                    let mut failed = None;
                    for entity in due {
                        tracing::debug!(backend = %self.name, %entity, "amqp10: renewing the SAS token");
                        if let Err(e) = self.authorize(&mut conn, &entity, true).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed { break e; }
                }
                r = conn.connection.on_close() => {
                    break self.describe_close(r);
                }
            }
        };
        // A dead connection often shows first as failed transfers or links; its own end says
        // best why (an idle timeout above all), so it is given a moment to tell.
        // Asked even when `is_closed()` already says so: that only means the connection's event
        // loop stopped, and its outcome (the reason) is still waiting to be read. Asking twice
        // (after the `on_close` branch above) just answers `IllegalState`.
        let mut broken = broken;
        if let Ok(Err(e)) = timeout(Duration::from_millis(200), conn.connection.on_close()).await {
            if is_idle_timeout(&e) {
                broken = self.describe_close(Err(e));
            }
        }
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

    /// Why the connection ended, for logs and health.
    fn describe_close(&self, result: Result<(), fe2o3_amqp::connection::Error>) -> String {
        match result {
            Ok(()) => "the peer closed the connection".to_string(),
            Err(e) if is_idle_timeout(&e) => {
                format!(
                    "the peer was silent for longer than idle_timeout_ms ({} ms): connection \
                     declared dead",
                    self.options.idle_timeout.unwrap_or_default().as_millis()
                )
            }
            Err(e) => format!("connection closed: {e}"),
        }
    }

    async fn shutdown(
        &mut self,
        mut conn: Conn,
        senders: Senders,
        mut futs: FuturesUnordered<Fut>,
        mut inflight: BTreeMap<u64, Pending>,
    ) {
        // Give in-flight transfers a moment to be settled, then fail what is left.
        let _ = timeout(Duration::from_secs(5), async {
            while let Some((seq, _, result)) = futs.next().await {
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
        for (_, (_, s)) in senders {
            let _ = timeout(Duration::from_secs(1), s.close()).await;
        }
        let _ = timeout(Duration::from_secs(2), conn.session.end()).await;
        let _ = timeout(Duration::from_secs(2), conn.connection.close()).await;
        self.closed.store(true, Ordering::Release);
        *self.health.lock() = Health::Closed;
    }
}

/// The connection ended because the peer was silent past our idle timeout.
fn is_idle_timeout(error: &fe2o3_amqp::connection::Error) -> bool {
    matches!(
        error,
        fe2o3_amqp::connection::Error::TransportError(
            fe2o3_amqp::transport::Error::IdleTimeoutElapsed
        )
    )
}

/// Waits until the first token is due for renewal (forever without tokens).
async fn sleep_until_renewal(authorized: &HashMap<String, Instant>) {
    match authorized.values().min() {
        Some(at) => tokio::time::sleep_until(*at).await,
        None => std::future::pending().await,
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

/// A delivery whose Service Bus lock the subscription keeps renewing until it is settled.
struct Held {
    token: [u8; 16],
    locked_until: SystemTime,
    renew_at: Instant,
}

/// When to renew a lock that lasts until `locked_until`: halfway there.
fn renew_point(locked_until: SystemTime) -> Instant {
    let left = locked_until
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now() + (left / 2).max(Duration::from_millis(50))
}

/// The lock of a Service Bus peek-lock delivery, if it carries one.
fn held_lock(delivery: &fe2o3_amqp::link::delivery::Delivery<Body<Value>>) -> Option<Held> {
    use fe2o3_amqp_types::messaging::annotations::OwnedKey;
    let annotations = delivery.message().message_annotations.as_ref();
    let get = |name: &str| annotations.and_then(|a| a.0.get(&OwnedKey::Symbol(Symbol::from(name))));
    let locked_until = match get("x-opt-locked-until") {
        Some(Value::Timestamp(t)) => {
            UNIX_EPOCH + Duration::from_millis(u64::try_from(t.milliseconds()).ok()?)
        }
        _ => return None,
    };
    let token = lock_token(get("x-opt-lock-token"), &delivery.delivery_tag()[..])?;
    Some(Held {
        token,
        locked_until,
        renew_at: renew_point(locked_until),
    })
}

async fn sleep_until_lock_renewal(held: &HashMap<u32, Held>) {
    match held.values().map(|h| h.renew_at).min() {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Renews the due locks through `$management` (`com.microsoft:renew-lock`): one request for
/// all of them. When Service Bus refuses the request (4xx: a lock already lost or the message
/// gone), each token is tried alone, and a token refused alone is dropped with a warning: the
/// message comes back from Service Bus and the client's settlement of it will fail. Other
/// failures (timeouts, a lost link) are retried a second later.
async fn renew_locks(
    name: &str,
    source: &str,
    link_name: &str,
    management: &mut MgmtLink,
    held: &mut HashMap<u32, Held>,
) {
    let now = Instant::now();
    let due: Vec<u32> = held
        .iter()
        .filter(|(_, h)| h.renew_at <= now)
        .map(|(id, _)| *id)
        .collect();
    if due.is_empty() {
        return;
    }
    let mut batches = vec![due];
    while let Some(batch) = batches.pop() {
        match renew_lock_batch(link_name, management, held, &batch).await {
            Ok(expirations) => {
                for (i, id) in batch.iter().enumerate() {
                    let Some(h) = held.get_mut(id) else { continue };
                    match expirations.get(i) {
                        Some(Value::Timestamp(t)) => {
                            h.locked_until = UNIX_EPOCH
                                + Duration::from_millis(
                                    u64::try_from(t.milliseconds()).unwrap_or(0),
                                );
                            h.renew_at = renew_point(h.locked_until);
                        }
                        _ => {
                            tracing::warn!(backend = %name, %source, "amqp10: renew-lock answered without an expiration; retrying in a second");
                            h.renew_at = Instant::now() + Duration::from_secs(1);
                        }
                    }
                }
                tracing::debug!(backend = %name, %source, locks = batch.len(), "amqp10: message locks renewed");
            }
            Err(MgmtError::Status { code, .. })
                if (400..500).contains(&code) && batch.len() > 1 =>
            {
                batches.extend(batch.iter().map(|id| vec![*id]));
            }
            Err(e @ MgmtError::Status { code, .. }) if (400..500).contains(&code) => {
                tracing::warn!(backend = %name, %source, error = %e, "amqp10: a message lock cannot be renewed (lost or expired): Service Bus will deliver the message again");
                for id in &batch {
                    held.remove(id);
                }
            }
            Err(e) => {
                tracing::warn!(backend = %name, %source, locks = batch.len(), error = %e, "amqp10: renewing message locks failed; retrying in a second");
                for id in &batch {
                    if let Some(h) = held.get_mut(id) {
                        h.renew_at = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
        }
    }
}

/// One renew-lock request for the locks of `batch`: the answer's `expirations`, in order.
async fn renew_lock_batch(
    link_name: &str,
    management: &mut MgmtLink,
    held: &HashMap<u32, Held>,
    batch: &[u32],
) -> Result<Vec<Value>, MgmtError> {
    let tokens: Vec<Value> = batch
        .iter()
        .filter_map(|id| held.get(id))
        .map(|h| Value::Uuid(h.token.into()))
        .collect();
    let mut body = serde_amqp::primitives::OrderedMap::new();
    body.insert(
        Value::String("lock-tokens".into()),
        Value::Array(tokens.into()),
    );
    let response = management
        .call(
            "com.microsoft:renew-lock",
            vec![("associated-link-name", SimpleValue::from(link_name))],
            Value::Map(body),
            STEP_TIMEOUT,
        )
        .await?;
    Ok(match response.body {
        Value::Map(m) => match m.get(&Value::String("expirations".into())) {
            Some(Value::Array(a)) => a.0.clone(),
            Some(Value::List(l)) => l.clone(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    })
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
            Ok(Err(AttachFailure::NoSessionAvailable(reason))) => {
                // The peer held the attach while it waited; ask again after a short pause.
                tracing::debug!(backend = %name, %source, %reason, "amqp10: no session available yet; asking again");
                sleep(backoff(&retry, 1)).await;
                continue;
            }
            Ok(Err(AttachFailure::Failed(reason))) => {
                failures += 1;
                tracing::warn!(backend = %name, %source, %reason, "amqp10: subscription cannot attach; retrying");
                sleep(backoff(&retry, failures)).await;
                continue;
            }
            Ok(Ok(link)) => link,
        };
        generation += 1;
        tracing::info!(backend = %name, %source, prefetch, session = ?link.session, "amqp10: subscribed");
        // `receive_session: "*"`: the session is let go once it has been idle this long.
        let session_idle = link.session_idle_timeout;
        let mut session = link.session.clone();
        let mut last_activity = Instant::now();
        let mut unsettled: u32 = 0;
        // Locks of unsettled deliveries (Service Bus peek-lock), by delivery id.
        let mut held: HashMap<u32, Held> = HashMap::new();
        let link_name = link.receiver.name().to_string();
        if let Err(e) = link.receiver.set_credit(prefetch as u32).await {
            tracing::warn!(backend = %name, %source, error = %e, "amqp10: cannot grant credit");
            failures += 1;
            sleep(backoff(&retry, failures)).await;
            continue;
        }
        failures = 0;
        // Credit granted and not yet used by a delivery (see `credit_to_grant`).
        let mut credit_left = prefetch as u32;
        // `Some(reason)`: the link failed; `None`: the session went idle and is let go.
        let lost: Option<String> = loop {
            tokio::select! {
                delivery = link.receiver.recv::<Body<Value>>() => match delivery {
                    Ok(delivery) => {
                        unsettled += 1;
                        credit_left = credit_left.saturating_sub(1);
                        last_activity = Instant::now();
                        if session.is_none() && session_idle.is_some() {
                            // The peer named no session in the attach: Service Bus stamps
                            // each session message's group-id with it.
                            session = delivery
                                .message()
                                .properties
                                .as_ref()
                                .and_then(|p| p.group_id.clone());
                        }
                        let message = mapping::from_amqp10(delivery.message(), &source);
                        let redelivered =
                            mapping::redelivered(delivery.message().header.as_ref(), target);
                        let info = DeliveryInfo::from(&delivery);
                        if link.management.is_some() {
                            if let Some(lock) = held_lock(&delivery) {
                                held.insert(info.delivery_id(), lock);
                            }
                        }
                        let settle = Box::new(SettleHandle {
                            generation,
                            info,
                            tx: settle_tx.clone(),
                        });
                        if out.send(Incoming { message, redelivered, settle }).is_err() {
                            let _ = link.receiver.close().await;
                            return;
                        }
                    }
                    Err(e) => break Some(format!("{e}")),
                },
                Some(first) = settle_rx.recv() => {
                    last_activity = Instant::now();
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
                        held.remove(&info.delivery_id());
                        if let Err(e) = dispose(&link.receiver, info, outcome, target).await {
                            failed = Some(format!("settling failed: {e}"));
                            break;
                        }
                    }
                    if let Some(e) = failed { break Some(e); }
                    if let Some(credit) = credit_to_grant(target, prefetch, unsettled, credit_left) {
                        if let Err(e) = link.receiver.set_credit(credit).await {
                            break Some(format!("cannot grant credit: {e}"));
                        }
                        credit_left = credit;
                    }
                }
                // Only with nothing unsettled: a session's messages are settled on the link
                // (and under the session lock) they came on, so the link stays until then.
                _ = sleep_until_idle(session_idle, last_activity), if unsettled == 0 => break None,
                _ = sleep_until_lock_renewal(&held) => {
                    if let Some(management) = link.management.as_mut() {
                        renew_locks(&name, &source, &link_name, management, &mut held).await;
                    } else {
                        held.clear();
                    }
                }
                _ = out.closed() => {
                    let _ = link.receiver.close().await;
                    if let Some(m) = link.management.take() { m.close().await; }
                    return;
                }
            }
        };
        if let Some(m) = link.management.take() {
            m.close().await;
        }
        let Some(reason) = lost else {
            tracing::info!(
                backend = %name,
                %source,
                session = ?session,
                idle_ms = session_idle.unwrap_or_default().as_millis() as u64,
                "amqp10: session idle: letting it go and asking for the next available session"
            );
            // Detaching releases the session lock, so another receiver (or this one) can take
            // the session when new messages arrive in it.
            match timeout(STEP_TIMEOUT, link.receiver.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(backend = %name, %source, error = %e, "amqp10: closing the idle session's link failed");
                }
                Err(_) => {
                    tracing::debug!(backend = %name, %source, "amqp10: closing the idle session's link timed out");
                }
            }
            continue;
        };
        tracing::warn!(backend = %name, %source, %reason, "amqp10: subscription link lost; re-attaching");
        // Detach it if the session still stands: the peer then returns the link's unsettled
        // deliveries to the queue instead of holding them for a link nobody reads.
        let _ = timeout(Duration::from_secs(5), link.receiver.close()).await;
        failures += 1;
        sleep(backoff(&retry, failures)).await;
    }
}

/// Waits until a session idle since `last_activity` has been so for `idle` (forever without).
async fn sleep_until_idle(idle: Option<Duration>, last_activity: Instant) {
    match idle {
        Some(idle) => tokio::time::sleep_until(last_activity + idle).await,
        None => std::future::pending().await,
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
