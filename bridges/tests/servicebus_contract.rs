//! The Service Bus contract of the AMQP 1.0 bridge, against an in-process AMQP 1.0 acceptor
//! (fe2o3-amqp's) that plays a Service Bus namespace as Microsoft documents it ("AMQP 1.0 in
//! Azure Service Bus: request-response-based operations", "Claims-based authorization"):
//!
//! - `$cbs` answers `put-token` requests: the application properties must be
//!   `operation=put-token`, `type=servicebus.windows.net:sastoken`, `name=<audience>`, the body
//!   an amqp-value string `SharedAccessSignature sr=…&sig=…&se=…&skn=…` whose HMAC-SHA256
//!   signature is checked with the namespace's key; answers 202, 401 (bad signature, unknown
//!   key, expired) or 404 (no such entity);
//! - a link to an entity without a valid token is refused (closed with
//!   `amqp:unauthorized-access`), and a transfer after the token expired is rejected;
//! - tokens expire at their `se`, so renewal before expiry is checked with a short lifetime;
//! - received messages carry `x-opt-lock-token` and `x-opt-locked-until`, and
//!   `ENTITY/$management` answers `com.microsoft:renew-lock`;
//! - outcomes are recorded as the bridge settles (accepted, modified, rejected with its
//!   condition); links can be detached with `amqp:link:detach-forced`;
//! - the session filter of a receiver's source is recorded.
//!
//! A TLS test runs the same acceptor behind a tokio-rustls listener with throwaway rcgen
//! certificates, and logs in with SASL EXTERNAL with a client certificate.
//!
//! No broker is needed: everything runs in the test process.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslAcceptor, SaslAnonymousMechanism,
    SessionAcceptor,
};
use fe2o3_amqp_types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp_types::messaging::{
    annotations::OwnedKey, AmqpValue, ApplicationProperties, Body, Header, Message as AmqpMessage,
    MessageAnnotations, MessageId, Outcome, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp};
use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_amqp::Value;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use warren_backends::{Backend, Health, Incoming, Message, Settlement, Subscription};
use warren_bridges::amqp10::Amqp10Bridge;
use warren_config::file::{Amqp10Backend, Amqp10Target, RetryConfig};

use support::Outcomes;

const KEY_NAME: &str = "warren-sender";
const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";

/// What the fake namespace saw, in order. (Some fields are only read through `Debug`, in the
/// failure messages that print the whole log.)
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Seen {
    /// A put-token request and the status it was answered with.
    Token {
        name: String,
        kind: String,
        token: String,
        expiration: Option<i64>,
        status: i32,
        description: String,
    },
    /// A link to an entity attached (`incoming`: the bridge sends on it).
    Attach {
        address: String,
        incoming: bool,
        session_filter: Option<Value>,
    },
    /// A link refused for want of a valid token.
    Refused { address: String },
    Message {
        address: String,
        body: Vec<u8>,
        message_id: Option<String>,
        group_id: Option<String>,
    },
    /// A transfer arrived after the entity's token had expired.
    ExpiredUse { address: String },
    /// A token of an entity expired (with no renewal in time).
    TokenExpired { entity: String },
    /// How the bridge settled a delivery; `lock_held`: before its lock ran out.
    Outcome {
        address: String,
        body: Vec<u8>,
        outcome: String,
        lock_held: bool,
    },
    RenewLock {
        entity: String,
        tokens: Vec<[u8; 16]>,
        link_name: Option<String>,
        status: i32,
    },
    /// The namespace detached a link with `amqp:link:detach-forced`.
    Detached { address: String },
    /// SASL mechanism and client certificate subject of a connection.
    Login {
        mechanism: String,
        client_cert: bool,
    },
    /// A session receiver was given a session (`None`: none was left to give).
    SessionGranted {
        address: String,
        session: Option<String>,
    },
    /// The bridge detached a session receiver's link, releasing its session.
    SessionReleased {
        address: String,
        session: Option<String>,
    },
}

/// How the fake namespace behaves.
#[derive(Clone)]
struct Script {
    /// Entities that exist.
    entities: HashSet<String>,
    /// Messages the namespace delivers to receivers of an address.
    outgoing: HashMap<String, Vec<&'static str>>,
    lock_duration: Duration,
    /// Incoming addresses whose first link is detached (detach-forced) after this many
    /// messages, the next one left unsettled.
    detach_incoming_after: HashMap<String, usize>,
    /// Outgoing addresses whose first link is detached (detach-forced) once the first message
    /// is out, before the bridge settles it.
    detach_outgoing_first: HashSet<String>,
    /// Links need no token (a plain AMQP 1.0 peer, for the TLS test).
    open: bool,
    /// Bodies whose lock is lost at once: renew-lock requests naming it are answered 410.
    lose_lock_of: HashSet<&'static str>,
    /// Session-enabled addresses: their sessions and each one's messages. A receiver asking
    /// for a session by id gets it; one asking for the next available session (a null filter)
    /// gets the next not yet given out. Messages carry the session id as their group-id.
    sessions: HashMap<String, Vec<(&'static str, Vec<&'static str>)>>,
}

impl Script {
    fn new(entities: &[&str]) -> Script {
        Script {
            entities: entities.iter().map(|e| e.to_string()).collect(),
            outgoing: HashMap::new(),
            lock_duration: Duration::from_secs(30),
            detach_incoming_after: HashMap::new(),
            detach_outgoing_first: HashSet::new(),
            open: false,
            lose_lock_of: HashSet::new(),
            sessions: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct State {
    /// Entity → token expiry (seconds since the epoch).
    tokens: HashMap<String, u64>,
    expired_reported: HashSet<(String, u64)>,
    /// Lock token → locked until.
    locks: HashMap<[u8; 16], SystemTime>,
    /// Lock tokens that were lost.
    lost: HashSet<[u8; 16]>,
    /// Links attached so far per address (to detach only the first).
    attaches: HashMap<String, usize>,
    /// Sessions given out to next-available-session receivers so far, per address.
    sessions_given: HashMap<String, usize>,
}

struct Namespace {
    host: String,
    script: Script,
    state: Mutex<State>,
    seen: mpsc::UnboundedSender<Seen>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn url_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn url_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

impl Namespace {
    fn entity_of(address: &str) -> String {
        address
            .trim_start_matches('/')
            .trim_end_matches("/$management")
            .to_string()
    }

    fn authorized(&self, entity: &str) -> bool {
        if self.script.open {
            return true;
        }
        let state = self.state.lock().unwrap();
        state.tokens.get(entity).is_some_and(|se| *se > now_secs())
    }

    /// Checks a put-token request as Service Bus does: `(status, description)`.
    fn put_token(&self, name: &str, kind: &str, token: &str) -> (i32, String) {
        if kind != "servicebus.windows.net:sastoken" {
            return (400, format!("unsupported token type {kind}"));
        }
        let Some(fields) = token.strip_prefix("SharedAccessSignature ") else {
            return (401, "not a SharedAccessSignature".into());
        };
        let mut parts = HashMap::new();
        for pair in fields.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                return (401, format!("malformed token field {pair}"));
            };
            parts.insert(k.to_string(), v.to_string());
        }
        let (Some(sr), Some(sig), Some(se), Some(skn)) = (
            parts.get("sr"),
            parts.get("sig"),
            parts.get("se"),
            parts.get("skn"),
        ) else {
            return (401, format!("token lacks sr, sig, se or skn: {fields}"));
        };
        if url_decode(sr) != name {
            return (401, format!("token audience {sr} is not {name}"));
        }
        // sr must be the URL-encoded resource URI, exactly as it was signed.
        if *sr != url_encode(name) {
            return (401, format!("sr={sr} is not the URL-encoded audience"));
        }
        if url_decode(skn) != KEY_NAME {
            return (401, format!("unknown key name {skn}"));
        }
        let Ok(expiry) = se.parse::<u64>() else {
            return (401, format!("se={se} is not a number"));
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
        mac.update(format!("{sr}\n{se}").as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        if url_decode(sig) != expected {
            return (401, "signature does not match the key".into());
        }
        if expiry <= now_secs() {
            return (401, "token expired".into());
        }
        let prefix = format!("sb://{}/", self.host);
        let Some(entity) = name.strip_prefix(&prefix) else {
            return (
                401,
                format!("audience {name} is not in namespace {}", self.host),
            );
        };
        if !self.script.entities.contains(entity) {
            return (404, format!("entity '{entity}' not found"));
        }
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(entity.to_string(), expiry);
        (202, "Accepted".into())
    }

    /// Answers one request on `$cbs` or `ENTITY/$management`.
    fn answer(
        &self,
        node: &str,
        request: &AmqpMessage<Body<Value>>,
    ) -> AmqpMessage<AmqpValue<Value>> {
        let app = request.application_properties.as_ref();
        let text = |k: &str| match app.and_then(|a| a.get(k)) {
            Some(SimpleValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        let (status, description, body) = match text("operation").as_deref() {
            Some("put-token") if node == "$cbs" => {
                let token = match &request.body {
                    Body::Value(v) => match &v.0 {
                        Value::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    },
                    other => format!("{other:?}"),
                };
                let name = text("name").unwrap_or_default();
                let kind = text("type").unwrap_or_default();
                let expiration = match app.and_then(|a| a.get("expiration")) {
                    Some(SimpleValue::Timestamp(t)) => Some(t.milliseconds()),
                    _ => None,
                };
                let (status, description) = self.put_token(&name, &kind, &token);
                let _ = self.seen.send(Seen::Token {
                    name,
                    kind,
                    token,
                    expiration,
                    status,
                    description: description.clone(),
                });
                (status, description, Value::Null)
            }
            Some("com.microsoft:renew-lock") if node.ends_with("/$management") => {
                let entity = Self::entity_of(node);
                if !self.authorized(&entity) {
                    (401, "no valid token".to_string(), Value::Null)
                } else {
                    let mut tokens = Vec::new();
                    if let Body::Value(v) = &request.body {
                        if let Value::Map(m) = &v.0 {
                            if let Some(Value::Array(a)) =
                                m.get(&Value::String("lock-tokens".into()))
                            {
                                for t in &a.0 {
                                    if let Value::Uuid(u) = t {
                                        tokens.push(*u.as_inner());
                                    }
                                }
                            }
                        }
                    }
                    let until = SystemTime::now() + self.script.lock_duration;
                    let mut expirations = Vec::new();
                    let lost = {
                        let mut state = self.state.lock().unwrap();
                        let lost = tokens.iter().any(|t| state.lost.contains(t));
                        if !lost {
                            for t in &tokens {
                                state.locks.insert(*t, until);
                                expirations.push(Value::Timestamp(timestamp(until)));
                            }
                        }
                        lost
                    };
                    let status = if lost { 410 } else { 200 };
                    let _ = self.seen.send(Seen::RenewLock {
                        entity,
                        tokens,
                        link_name: text("associated-link-name"),
                        status,
                    });
                    if lost {
                        (410, "MessageLockLost".to_string(), Value::Null)
                    } else {
                        let mut map = OrderedMap::new();
                        map.insert(
                            Value::String("expirations".into()),
                            Value::Array(expirations.into()),
                        );
                        (200, "OK".to_string(), Value::Map(map))
                    }
                }
            }
            other => (
                501,
                format!("operation {other:?} not implemented"),
                Value::Null,
            ),
        };
        let correlation: Option<MessageId> = request
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        AmqpMessage::builder()
            .properties(Properties {
                correlation_id: correlation,
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("status-code", SimpleValue::Int(status))
                    .insert("status-description", SimpleValue::String(description))
                    .build(),
            )
            .value(body)
            .build()
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::from_milliseconds(t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64)
}

fn unauthorized(what: &str) -> AmqpError {
    AmqpError {
        condition: ErrorCondition::AmqpError(
            fe2o3_amqp_types::definitions::AmqpError::UnauthorizedAccess,
        ),
        description: Some(what.to_string()),
        info: None,
    }
}

fn detach_forced() -> AmqpError {
    AmqpError {
        condition: ErrorCondition::LinkError(
            fe2o3_amqp_types::definitions::LinkError::DetachForced,
        ),
        description: Some("the namespace moved the entity".into()),
        info: None,
    }
}

/// A SASL EXTERNAL acceptor: the identity is the TLS client certificate (checked by rustls).
#[derive(Clone)]
struct External;

impl SaslAcceptor for External {
    fn mechanisms(&self) -> fe2o3_amqp_types::primitives::Array<Symbol> {
        vec![Symbol::from("EXTERNAL")].into()
    }

    fn on_init(
        &mut self,
        init: fe2o3_amqp_types::sasl::SaslInit,
    ) -> fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame {
        let code = if init.mechanism.as_str() == "EXTERNAL" {
            fe2o3_amqp_types::sasl::SaslCode::Ok
        } else {
            fe2o3_amqp_types::sasl::SaslCode::Auth
        };
        fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame::Outcome(
            fe2o3_amqp_types::sasl::SaslOutcome {
                code,
                additional_data: None,
            },
        )
    }

    fn on_response(
        &mut self,
        _response: fe2o3_amqp_types::sasl::SaslResponse,
    ) -> fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame {
        fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame::Outcome(
            fe2o3_amqp_types::sasl::SaslOutcome {
                code: fe2o3_amqp_types::sasl::SaslCode::Auth,
                additional_data: None,
            },
        )
    }
}

/// Serves every connection `listener` accepts (plain TCP, SASL ANONYMOUS).
async fn serve(listener: tokio::net::TcpListener, ns: Arc<Namespace>) {
    spawn_token_watch(ns.clone());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let ns = ns.clone();
        tokio::spawn(async move {
            let acceptor = ConnectionAcceptor::builder()
                .container_id("fake-servicebus")
                .max_frame_size(65536)
                .sasl_acceptor(SaslAnonymousMechanism::new())
                .build();
            let _ = ns.seen.send(Seen::Login {
                mechanism: "ANONYMOUS".into(),
                client_cert: false,
            });
            if let Ok(conn) = acceptor.accept(stream).await {
                serve_connection(conn, ns).await;
            }
        });
    }
}

/// Reports tokens that run out (the bridge must renew before that).
fn spawn_token_watch(ns: Arc<Namespace>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = now_secs();
            let mut state = ns.state.lock().unwrap();
            let expired: Vec<(String, u64)> = state
                .tokens
                .iter()
                .filter(|(_, se)| **se <= now)
                .map(|(e, se)| (e.clone(), *se))
                .collect();
            for (entity, se) in expired {
                if state.expired_reported.insert((entity.clone(), se)) {
                    let _ = ns.seen.send(Seen::TokenExpired { entity });
                }
            }
        }
    });
}

async fn serve_connection(
    mut conn: fe2o3_amqp::acceptor::ListenerConnectionHandle,
    ns: Arc<Namespace>,
) {
    while let Some(incoming) = conn.next_incoming_session().await {
        let Ok(mut session) = SessionAcceptor::new()
            .accept_incoming_session(incoming, &mut conn)
            .await
        else {
            return;
        };
        let ns = ns.clone();
        tokio::spawn(async move {
            let links = LinkAcceptor::builder().max_message_size(262_144u64).build();
            // Reply address → the link the responses of a request/response node go out on.
            let replies: Replies = Arc::default();
            loop {
                let link = match links.accept(&mut session).await {
                    Ok(link) => link,
                    Err(_) => return,
                };
                match link {
                    LinkEndpoint::Receiver(r) => {
                        let address = r
                            .target()
                            .as_ref()
                            .and_then(|t| t.address.clone())
                            .unwrap_or_default();
                        if address == "$cbs" || address.ends_with("/$management") {
                            tokio::spawn(request_node(r, address, ns.clone(), replies.clone()));
                        } else {
                            tokio::spawn(entity_inbox(r, address, ns.clone()));
                        }
                    }
                    LinkEndpoint::Sender(s) => {
                        let source = s.source().clone();
                        let address = source
                            .as_ref()
                            .and_then(|t| t.address.clone())
                            .unwrap_or_default();
                        if address == "$cbs" || address.ends_with("/$management") {
                            let reply_to = s
                                .target()
                                .as_ref()
                                .and_then(|t| t.address.clone())
                                .unwrap_or_default();
                            let (tx, mut rx) =
                                mpsc::unbounded_channel::<AmqpMessage<AmqpValue<Value>>>();
                            replies.lock().unwrap().insert(reply_to, tx);
                            let mut s = s;
                            tokio::spawn(async move {
                                while let Some(m) = rx.recv().await {
                                    if s.send(m).await.is_err() {
                                        return;
                                    }
                                }
                            });
                        } else {
                            let filter = source
                                .as_ref()
                                .and_then(|s| s.filter.as_ref())
                                .and_then(|f| f.get(&Symbol::from("com.microsoft:session-filter")))
                                .cloned();
                            tokio::spawn(entity_outbox(s, address, filter, ns.clone()));
                        }
                    }
                }
            }
        });
    }
}

/// `$cbs` or `ENTITY/$management`: answers each request on the link its reply-to names.
async fn request_node(
    mut r: fe2o3_amqp::Receiver,
    node: String,
    ns: Arc<Namespace>,
    replies: Replies,
) {
    while let Ok(d) = r.recv::<Body<Value>>().await {
        let _ = r.accept(&d).await;
        let response = ns.answer(&node, d.message());
        let reply_to = d
            .message()
            .properties
            .as_ref()
            .and_then(|p| p.reply_to.clone())
            .unwrap_or_default();
        let tx = replies.lock().unwrap().get(&reply_to).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send(response);
            }
            None => panic!("request on {node} with reply-to {reply_to:?}: no such reply link"),
        }
    }
}

/// An entity the bridge sends to.
async fn entity_inbox(mut r: fe2o3_amqp::Receiver, address: String, ns: Arc<Namespace>) {
    let entity = Namespace::entity_of(&address);
    if !ns.authorized(&entity) {
        let _ = ns.seen.send(Seen::Refused {
            address: address.clone(),
        });
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            r.close_with_error(unauthorized(&format!(
                "no valid token for sb://{}/{entity}",
                ns.host
            ))),
        )
        .await;
        return;
    }
    let nth = {
        let mut state = ns.state.lock().unwrap();
        let n = state.attaches.entry(address.clone()).or_default();
        *n += 1;
        *n
    };
    let _ = ns.seen.send(Seen::Attach {
        address: address.clone(),
        incoming: true,
        session_filter: None,
    });
    let detach_after = (nth == 1)
        .then(|| ns.script.detach_incoming_after.get(&address).copied())
        .flatten();
    let mut received = 0usize;
    while let Ok(d) = r.recv::<Body<Value>>().await {
        if !ns.authorized(&entity) {
            let _ = ns.seen.send(Seen::ExpiredUse {
                address: address.clone(),
            });
            let _ = r.reject(&d, unauthorized("token expired")).await;
            continue;
        }
        if detach_after == Some(received) {
            // Leave this one unsettled and force the link off.
            let _ = ns.seen.send(Seen::Detached {
                address: address.clone(),
            });
            let _ =
                tokio::time::timeout(Duration::from_secs(2), r.detach_with_error(detach_forced()))
                    .await;
            return;
        }
        received += 1;
        let m = d.message();
        let body = match &m.body {
            Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
            _ => Vec::new(),
        };
        let props = m.properties.as_ref();
        let message_id = props
            .and_then(|p| p.message_id.as_ref())
            .map(|id| match id {
                MessageId::String(s) => s.clone(),
                other => format!("{other:?}"),
            });
        let group_id = props.and_then(|p| p.group_id.clone());
        r.accept(&d).await.unwrap();
        let _ = ns.seen.send(Seen::Message {
            address: address.clone(),
            body,
            message_id,
            group_id,
        });
    }
}

/// An entity the bridge receives from: delivers the script's messages in peek-lock mode.
async fn entity_outbox(
    mut s: fe2o3_amqp::Sender,
    address: String,
    session_filter: Option<Value>,
    ns: Arc<Namespace>,
) {
    let entity = Namespace::entity_of(&address);
    if !ns.authorized(&entity) {
        let _ = ns.seen.send(Seen::Refused {
            address: address.clone(),
        });
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            s.close_with_error(unauthorized("no valid token")),
        )
        .await;
        return;
    }
    let nth = {
        let mut state = ns.state.lock().unwrap();
        let n = state.attaches.entry(address.clone()).or_default();
        *n += 1;
        *n
    };
    let _ = ns.seen.send(Seen::Attach {
        address: address.clone(),
        incoming: false,
        session_filter: session_filter.clone(),
    });
    if let Some(sessions) = ns.script.sessions.get(&address) {
        let session = match &session_filter {
            Some(Value::String(id)) => sessions.iter().find(|(s, _)| s == id).cloned(),
            _ => {
                let mut state = ns.state.lock().unwrap();
                let given = state.sessions_given.entry(address.clone()).or_default();
                *given += 1;
                sessions.get(*given - 1).cloned()
            }
        };
        serve_session(s, address, session, ns).await;
        return;
    }
    let bodies = ns
        .script
        .outgoing
        .get(&address)
        .cloned()
        .unwrap_or_default();
    let detach_first = nth == 1 && ns.script.detach_outgoing_first.contains(&address);
    for body in bodies {
        let token: [u8; 16] = rand::random();
        let until = SystemTime::now() + ns.script.lock_duration;
        {
            let mut state = ns.state.lock().unwrap();
            state.locks.insert(token, until);
            if ns.script.lose_lock_of.contains(body) {
                state.lost.insert(token);
            }
        }
        let mut annotations = OrderedMap::new();
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-lock-token")),
            Value::Uuid(token.into()),
        );
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-locked-until")),
            Value::Timestamp(timestamp(until)),
        );
        annotations.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-enqueued-time")),
            Value::Timestamp(timestamp(SystemTime::now())),
        );
        let m = AmqpMessage::builder()
            .header(Header {
                delivery_count: (nth - 1) as u32,
                ..Default::default()
            })
            .message_annotations(MessageAnnotations(annotations))
            .data(Binary::from(body.as_bytes().to_vec()))
            .build();
        let fut = match s.send_batchable(m).await {
            Ok(fut) => fut,
            Err(_) => return,
        };
        if detach_first {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = ns.seen.send(Seen::Detached {
                address: address.clone(),
            });
            let _ =
                tokio::time::timeout(Duration::from_secs(2), s.detach_with_error(detach_forced()))
                    .await;
            return;
        }
        // Every message goes out at once (as far as the bridge's credit allows); outcomes are
        // recorded as they come.
        let (ns, address) = (ns.clone(), address.clone());
        tokio::spawn(async move {
            let Ok(outcome) = fut.await else { return };
            let lock_held = ns
                .state
                .lock()
                .unwrap()
                .locks
                .get(&token)
                .is_some_and(|t| SystemTime::now() <= *t);
            let _ = ns.seen.send(Seen::Outcome {
                address,
                body: body.as_bytes().to_vec(),
                outcome: describe(&outcome),
                lock_held,
            });
        });
    }
    // Keep the link open until the bridge goes.
    std::future::pending::<()>().await;
}

/// A session receiver's link: the session's messages (group-id = the session id), each
/// outcome recorded in order, then the bridge's detach (which releases the session).
async fn serve_session(
    mut s: fe2o3_amqp::Sender,
    address: String,
    session: Option<(&'static str, Vec<&'static str>)>,
    ns: Arc<Namespace>,
) {
    let id = session.as_ref().map(|(id, _)| id.to_string());
    let _ = ns.seen.send(Seen::SessionGranted {
        address: address.clone(),
        session: id.clone(),
    });
    let mut outcomes = Vec::new();
    for body in session.map(|(_, bodies)| bodies).unwrap_or_default() {
        let m = AmqpMessage::builder()
            .properties(Properties {
                group_id: id.clone(),
                ..Default::default()
            })
            .data(Binary::from(body.as_bytes().to_vec()))
            .build();
        match s.send_batchable(m).await {
            Ok(fut) => outcomes.push((body, fut)),
            Err(_) => return,
        }
    }
    // Awaited here, in order, so that every outcome is logged before the detach: a detach
    // with messages unsettled leaves their outcomes missing from the log.
    for (body, fut) in outcomes {
        let Ok(outcome) = fut.await else { return };
        let _ = ns.seen.send(Seen::Outcome {
            address: address.clone(),
            body: body.as_bytes().to_vec(),
            outcome: describe(&outcome),
            lock_held: true,
        });
    }
    let _ = s.on_detach().await;
    let _ = ns.seen.send(Seen::SessionReleased {
        address,
        session: id,
    });
}

fn describe(outcome: &Outcome) -> String {
    format!("{outcome:?}")
}

/// Reply address → the link the responses of a request/response node go out on.
type Replies = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<AmqpMessage<AmqpValue<Value>>>>>>;

struct Fake {
    port: u16,
    seen: mpsc::UnboundedReceiver<Seen>,
    log: Vec<Seen>,
    server: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start(script: Script) -> Fake {
        init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, seen) = mpsc::unbounded_channel();
        let ns = Arc::new(Namespace {
            host: "127.0.0.1".into(),
            script,
            state: Mutex::default(),
            seen: tx,
        });
        let server = tokio::spawn(serve(listener, ns));
        Fake {
            port,
            seen,
            log: Vec::new(),
            server,
        }
    }

    fn config(&self, key: &str) -> Amqp10Backend {
        self.config_at(self.port, key)
    }

    /// The bridge's configuration with the namespace reached at `port` (e.g. through a proxy).
    fn config_at(&self, port: u16, key: &str) -> Amqp10Backend {
        Amqp10Backend {
            connection_string: Some(connection_string_at(port, key)),
            max_in_flight: 100,
            retry: retry(3, 20, 100),
            ..Default::default()
        }
    }

    /// Waits until an event matching `pred` was seen; returns it.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        if let Some(e) = self.log.iter().find(|e| pred(e)) {
            return e.clone();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(e)) => {
                    self.log.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                _ => panic!(
                    "the fake namespace never saw {what}; it saw {:#?}",
                    self.log
                ),
            }
        }
    }

    /// Everything seen so far (after waiting `settle` for stragglers).
    async fn drain(&mut self, settle: Duration) -> &[Seen] {
        tokio::time::sleep(settle).await;
        while let Ok(e) = self.seen.try_recv() {
            self.log.push(e);
        }
        &self.log
    }
}

fn connection_string_at(port: u16, key: &str) -> String {
    format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={key};\
         UseDevelopmentEmulator=true"
    )
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn init_tracing() {
    support::init_logs();
}

fn retry(max_attempts: u32, initial_backoff_ms: u64, max_backoff_ms: u64) -> RetryConfig {
    RetryConfig {
        max_attempts,
        initial_backoff_ms,
        max_backoff_ms,
    }
}

fn message(properties: BasicProperties, body: impl Into<Bytes>) -> Message {
    Message::new("warren-in".into(), "k".into(), properties, body.into())
}

async fn next(sub: &mut Box<dyn Subscription>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("no message within 20s")
        .expect("subscription ended")
}

/// Verifies a token the way the test reads the contract, independently of the namespace.
fn check_token_shape(token: &str, audience: &str, expiration: Option<i64>) {
    let fields = token
        .strip_prefix("SharedAccessSignature ")
        .unwrap_or_else(|| panic!("{token}"));
    let keys: Vec<&str> = fields
        .split('&')
        .map(|p| p.split_once('=').unwrap().0)
        .collect();
    assert_eq!(keys, ["sr", "sig", "se", "skn"], "{token}");
    let get = |k: &str| {
        fields
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
            .unwrap()
    };
    assert_eq!(get("sr"), url_encode(audience));
    assert_eq!(get("skn"), KEY_NAME);
    let se: i64 = get("se").parse().unwrap();
    assert_eq!(expiration, Some(se * 1000), "expiration property = se");
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(format!("{}\n{se}", url_encode(audience)).as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(url_decode(get("sig")), sig, "HMAC-SHA256 of sr + \\n + se");
}

// ---------------------------------------------------------------------------------------------
// 1. CBS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_token_is_the_documented_request_and_precedes_every_attach() {
    let mut fake = Fake::start(Script::new(&["demo", "demo-in"])).await;
    let bridge = Amqp10Bridge::start("sb-cbs", &fake.config(KEY)).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "demo",
        message(BasicProperties::default(), &b"hello"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(
        outcomes.failed.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.failed
    );
    let sub = bridge.subscribe("demo-in", 5).await.unwrap();
    fake.wait_for(
        "the receiver attach",
        |e| matches!(e, Seen::Attach { address, incoming: false, .. } if address == "demo-in"),
    )
    .await;

    let log = fake.drain(Duration::from_millis(100)).await.to_vec();
    let position = |pred: &dyn Fn(&Seen) -> bool| log.iter().position(pred);
    for entity in ["demo", "demo-in"] {
        let audience = format!("sb://127.0.0.1/{entity}");
        let token_at =
            position(&|e| matches!(e, Seen::Token { name, status: 202, .. } if *name == audience))
                .unwrap_or_else(|| panic!("no accepted token for {audience}: {log:#?}"));
        let attach_at =
            position(&|e| matches!(e, Seen::Attach { address, .. } if address == entity))
                .unwrap_or_else(|| panic!("no attach to {entity}: {log:#?}"));
        assert!(token_at < attach_at, "token after attach: {log:#?}");
        let Seen::Token {
            kind,
            token,
            expiration,
            ..
        } = &log[token_at]
        else {
            unreachable!()
        };
        assert_eq!(kind, "servicebus.windows.net:sastoken");
        check_token_shape(token, &audience, *expiration);
    }
    assert!(
        !log.iter().any(|e| matches!(e, Seen::Refused { .. })),
        "{log:#?}"
    );
    assert!(log.iter().any(
        |e| matches!(e, Seen::Message { address, body, .. } if address == "demo" && body == b"hello")
    ));
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_without_a_token_are_refused() {
    // A client that skips CBS (here fe2o3 itself) is refused: the bridge's links succeed only
    // because it puts its token first.
    let mut fake = Fake::start(Script::new(&["demo"])).await;
    let mut connection = fe2o3_amqp::Connection::builder()
        .container_id("no-cbs")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
        .open(format!("amqp://127.0.0.1:{}", fake.port).as_str())
        .await
        .unwrap();
    let mut session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
    let sent = async {
        let mut sender = fe2o3_amqp::Sender::attach(&mut session, "no-cbs-sender", "demo")
            .await
            .map_err(|e| e.to_string())?;
        sender.send("sneaky").await.map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("the refused link must not hang");
    let error = result.expect_err("an unauthorized link must not deliver");
    assert!(
        error.to_lowercase().contains("unauthorized"),
        "the refusal names the condition: {error}"
    );
    fake.wait_for(
        "the refusal",
        |e| matches!(e, Seen::Refused { address } if address == "demo"),
    )
    .await;
    let log = fake.drain(Duration::from_millis(100)).await;
    assert!(
        !log.iter().any(|e| matches!(e, Seen::Message { .. })),
        "{log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_fails_with_the_entity_named_401_and_404() {
    let mut fake = Fake::start(Script::new(&["demo"])).await;
    // Wrong key: 401.
    let mut cfg = fake.config("d3Jvbmcta2V5");
    cfg.retry = retry(2, 20, 50);
    let bridge = Amqp10Bridge::start("sb-401", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "demo",
        message(BasicProperties::default(), &b"x"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let reason = &failed[0].1;
    assert!(
        reason.contains("'demo'") && reason.contains("401") && reason.contains("unauthorized"),
        "{reason}"
    );
    fake.wait_for("the 401", |e| matches!(e, Seen::Token { status: 401, .. }))
        .await;
    bridge.close().await;

    // Right key, missing entity: 404.
    let mut cfg = fake.config(KEY);
    cfg.retry = retry(2, 20, 50);
    let bridge = Amqp10Bridge::start("sb-404", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "no-such-queue",
        message(BasicProperties::default(), &b"x"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let reason = &failed[0].1;
    assert!(
        reason.contains("'no-such-queue'") && reason.contains("404"),
        "{reason}"
    );
    // The bridge itself stays up: other entities still work.
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "demo",
        message(BasicProperties::default(), &b"y"[..]),
        outcomes.guard(1),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert_eq!(bridge.health(), Health::Ready);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_before_they_expire() {
    let mut fake = Fake::start(Script::new(&["demo"])).await;
    let mut cfg = fake.config(KEY);
    // `se` is whole seconds, so a 3 s token is valid for 2 to 3 s and renewed after 1.5 to
    // 2.25 s: at least half a second of margin even on a loaded machine.
    cfg.token_lifetime_secs = 3;
    let bridge = Amqp10Bridge::start("sb-renew", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    // Publish for 8 s: almost three token lifetimes. Every transfer must find a valid token.
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        bridge.publish(
            "demo",
            message(BasicProperties::default(), format!("m{n}").into_bytes()),
            outcomes.guard(n),
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outcomes.wait_done(n, Duration::from_secs(20)).await;
    assert!(
        outcomes.failed.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.failed
    );
    let log = fake.drain(Duration::from_millis(200)).await.to_vec();
    bridge.close().await;
    let tokens: Vec<_> = log
        .iter()
        .filter(|e| matches!(e, Seen::Token { status: 202, .. }))
        .collect();
    assert!(
        tokens.len() >= 4,
        "a 3 s token over 8 s needs at least 3 renewals: {tokens:#?}"
    );
    assert!(
        !log.iter().any(|e| matches!(
            e,
            Seen::TokenExpired { .. } | Seen::ExpiredUse { .. } | Seen::Refused { .. }
        )),
        "a token ran out before its renewal: {log:#?}"
    );
    let delivered = log
        .iter()
        .filter(|e| matches!(e, Seen::Message { .. }))
        .count();
    assert!(delivered >= n, "{delivered} of {n} delivered");
}

// ---------------------------------------------------------------------------------------------
// 2. Settlement, size limit, lock renewal, detach-forced

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_requeue_and_reject_are_complete_abandon_and_dead_letter() {
    let mut script = Script::new(&["demo-in"]);
    script
        .outgoing
        .insert("demo-in".into(), vec!["ack", "requeue", "nack", "reject"]);
    let mut fake = Fake::start(script).await;
    let bridge = Amqp10Bridge::start("sb-settle", &fake.config(KEY)).unwrap();
    let mut sub = bridge.subscribe("demo-in", 10).await.unwrap();
    for expected in ["ack", "requeue", "nack", "reject"] {
        let got = next(&mut sub).await;
        assert_eq!(got.message.body(), expected.as_bytes());
        // x-opt-* annotations arrive as headers.
        assert!(got
            .message
            .headers()
            .is_some_and(|h| h.inner().contains_key("x-opt-enqueued-time")));
        got.settle.settle(match expected {
            "ack" => Settlement::Ack,
            "requeue" | "nack" => Settlement::Requeue,
            _ => Settlement::Reject,
        });
    }
    let mut outcomes = HashMap::new();
    for _ in 0..4 {
        let Seen::Outcome { body, outcome, .. } = fake
            .wait_for(
                "an outcome",
                |e| matches!(e, Seen::Outcome { body, .. } if !outcomes.contains_key(body)),
            )
            .await
        else {
            unreachable!()
        };
        outcomes.insert(body, outcome);
    }
    let get = |b: &str| outcomes[b.as_bytes()].clone();
    assert!(get("ack").starts_with("Accepted"), "{}", get("ack"));
    for requeued in ["requeue", "nack"] {
        let o = get(requeued);
        assert!(
            o.starts_with("Modified") && o.contains("delivery_failed: Some(true)"),
            "{o}"
        );
    }
    let o = get("reject");
    assert!(
        o.starts_with("Rejected") && o.contains("com.microsoft:dead-letter"),
        "{o}"
    );
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_256_kb_is_nacked_at_once_and_never_sent() {
    let mut fake = Fake::start(Script::new(&["demo"])).await;
    let bridge = Amqp10Bridge::start("sb-size", &fake.config(KEY)).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let started = Instant::now();
    bridge.publish(
        "demo",
        message(BasicProperties::default(), vec![7u8; 300 * 1024]),
        outcomes.guard(0),
    );
    bridge.publish(
        "demo",
        message(BasicProperties::default(), vec![8u8; 200 * 1024]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(20)).await;
    let failed = outcomes.failed.lock().unwrap().clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 0);
    assert!(
        failed[0].1.contains("max_message_size") && failed[0].1.contains("262144"),
        "{}",
        failed[0].1
    );
    let log = fake.drain(Duration::from_millis(200)).await;
    let sizes: Vec<usize> = log
        .iter()
        .filter_map(|e| match e {
            Seen::Message { body, .. } => Some(body.len()),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, [200 * 1024], "only the one under the limit went out");
    assert!(started.elapsed() < Duration::from_secs(10));
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_of_messages_held_long_are_renewed_through_management() {
    let mut script = Script::new(&["held"]);
    script.outgoing.insert("held".into(), vec!["slow"]);
    script.lock_duration = Duration::from_millis(1500);
    let mut fake = Fake::start(script).await;
    let bridge = Amqp10Bridge::start("sb-lock", &fake.config(KEY)).unwrap();
    let mut sub = bridge.subscribe("held", 1).await.unwrap();
    let got = next(&mut sub).await;
    // Hold it for almost three lock durations, then complete it.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    got.settle.settle(Settlement::Ack);
    let outcome = fake
        .wait_for("the outcome", |e| matches!(e, Seen::Outcome { .. }))
        .await;
    let Seen::Outcome {
        outcome, lock_held, ..
    } = outcome
    else {
        unreachable!()
    };
    assert!(outcome.starts_with("Accepted"), "{outcome}");
    assert!(lock_held, "the lock ran out before the ack");
    let log = fake.drain(Duration::from_millis(100)).await.to_vec();
    let renewals: Vec<_> = log
        .iter()
        .filter_map(|e| match e {
            Seen::RenewLock {
                entity,
                tokens,
                link_name,
                status: 200,
            } => Some((entity.clone(), tokens.clone(), link_name.clone())),
            _ => None,
        })
        .collect();
    assert!(renewals.len() >= 2, "{log:#?}");
    // Every renewal names the one delivery's lock token, on the entity's $management node,
    // associated with the receiving link.
    let first = renewals[0].1.clone();
    assert_eq!(first.len(), 1);
    for (entity, tokens, link_name) in &renewals {
        assert_eq!(entity, "held");
        assert_eq!(tokens, &first);
        assert!(
            link_name.as_deref().is_some_and(|n| n.contains("held")),
            "{link_name:?}"
        );
    }
    // Settled: no more renewals.
    let count = renewals.len();
    let later = fake.drain(Duration::from_millis(2000)).await;
    assert_eq!(
        later
            .iter()
            .filter(|e| matches!(e, Seen::RenewLock { .. }))
            .count(),
        count,
        "renewals after the ack"
    );
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_is_dropped_and_the_others_keep_being_renewed() {
    let mut script = Script::new(&["held"]);
    script.outgoing.insert("held".into(), vec!["keep", "lose"]);
    script.lose_lock_of.insert("lose");
    script.lock_duration = Duration::from_millis(1500);
    let mut fake = Fake::start(script).await;
    let bridge = Amqp10Bridge::start("sb-lock-lost", &fake.config(KEY)).unwrap();
    let mut sub = bridge.subscribe("held", 2).await.unwrap();
    let first = next(&mut sub).await;
    let second = next(&mut sub).await;
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let (keep, lose) = if first.message.body() == b"keep" {
        (first, second)
    } else {
        (second, first)
    };
    keep.settle.settle(Settlement::Ack);
    let Seen::Outcome { lock_held, .. } = fake
        .wait_for(
            "the outcome of keep",
            |e| matches!(e, Seen::Outcome { body, .. } if body == b"keep"),
        )
        .await
    else {
        unreachable!()
    };
    assert!(lock_held, "the good lock ran out");
    let log = fake.drain(Duration::from_millis(100)).await.to_vec();
    let renewals: Vec<(Vec<[u8; 16]>, i32)> = log
        .iter()
        .filter_map(|e| match e {
            Seen::RenewLock { tokens, status, .. } => Some((tokens.clone(), *status)),
            _ => None,
        })
        .collect();
    // The lost lock is refused alone once (after at most one refused batch with the other)
    // and never asked for again; the good one goes on being renewed.
    let refused = renewals.iter().filter(|(_, s)| *s == 410).count();
    assert!((1..=2).contains(&refused), "{renewals:?}");
    let dropped_at = renewals
        .iter()
        .position(|(t, s)| *s == 410 && t.len() == 1)
        .unwrap_or_else(|| panic!("the lost lock was never tried alone: {renewals:?}"));
    let lost = renewals[dropped_at].0[0];
    assert!(
        renewals[dropped_at + 1..]
            .iter()
            .all(|(t, _)| !t.contains(&lost)),
        "the lost lock was asked for again: {renewals:?}"
    );
    let good = renewals
        .iter()
        .filter(|(t, s)| *s == 200 && !t.contains(&lost))
        .count();
    assert!(good >= 2, "{renewals:?}");
    drop(lose);
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_forced_on_a_sending_link_reattaches_and_resends_the_unsettled() {
    let mut script = Script::new(&["flaky"]);
    script.detach_incoming_after.insert("flaky".into(), 3);
    let mut fake = Fake::start(script).await;
    let mut cfg = fake.config(KEY);
    cfg.retry = retry(0, 50, 400);
    let bridge = Amqp10Bridge::start("sb-detach", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    const N: usize = 10;
    for i in 0..N {
        bridge.publish(
            "flaky",
            message(BasicProperties::default(), format!("m{i}").into_bytes()),
            outcomes.guard(i),
        );
    }
    outcomes.wait_done(N, Duration::from_secs(30)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    let log = fake.drain(Duration::from_millis(200)).await.to_vec();
    assert!(log.iter().any(|e| matches!(e, Seen::Detached { .. })));
    let attaches = log
        .iter()
        .filter(|e| matches!(e, Seen::Attach { address, .. } if address == "flaky"))
        .count();
    assert!(attaches >= 2, "re-attached: {log:#?}");
    let mut ids = HashSet::new();
    for e in &log {
        if let Seen::Message {
            body, message_id, ..
        } = e
        {
            ids.insert((body.clone(), message_id.clone()));
        }
    }
    for i in 0..N {
        let body = format!("m{i}").into_bytes();
        assert!(
            ids.iter().any(|(b, _)| *b == body),
            "m{i} was never accepted: {log:#?}"
        );
    }
    // A resend keeps its message-id (Service Bus duplicate detection absorbs it).
    let distinct_ids: HashSet<_> = ids.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(distinct_ids.len(), N, "{ids:?}");
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_forced_on_a_receiving_link_reattaches_and_gets_the_message_again() {
    let mut script = Script::new(&["flaky-in"]);
    script.outgoing.insert("flaky-in".into(), vec!["again"]);
    script.detach_outgoing_first.insert("flaky-in".into());
    let mut fake = Fake::start(script).await;
    let bridge = Amqp10Bridge::start("sb-detach-in", &fake.config(KEY)).unwrap();
    let mut sub = bridge.subscribe("flaky-in", 5).await.unwrap();
    let first = next(&mut sub).await;
    assert_eq!(first.message.body(), b"again");
    assert!(!first.redelivered);
    fake.wait_for("the detach", |e| matches!(e, Seen::Detached { .. }))
        .await;
    let second = next(&mut sub).await;
    assert_eq!(second.message.body(), b"again");
    assert!(second.redelivered, "delivery-count 1 → redelivered");
    // Settling the delivery of the dead link does nothing; the new one is completed.
    first.settle.settle(Settlement::Ack);
    second.settle.settle(Settlement::Ack);
    let Seen::Outcome { outcome, .. } = fake
        .wait_for("the outcome", |e| matches!(e, Seen::Outcome { .. }))
        .await
    else {
        unreachable!()
    };
    assert!(outcome.starts_with("Accepted"), "{outcome}");
    drop(sub);
    bridge.close().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_id_header_becomes_group_id_and_receivers_ask_for_their_session() {
    let mut script = Script::new(&["orders", "orders-in"]);
    script.outgoing.insert("orders-in".into(), vec!["s"]);
    let mut fake = Fake::start(script).await;
    let mut cfg = fake.config(KEY);
    cfg.session_id_header = Some("x-session-id".into());
    cfg.receive_session = Some("customer-7".into());
    let bridge = Amqp10Bridge::start("sb-sessions", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    let mut headers = FieldTable::default();
    headers.insert(
        "x-session-id".into(),
        AMQPValue::LongString(LongString::from("customer-7")),
    );
    bridge.publish(
        "orders",
        message(
            BasicProperties::default().with_headers(headers),
            &b"with-session"[..],
        ),
        outcomes.guard(0),
    );
    bridge.publish(
        "orders",
        message(BasicProperties::default(), &b"without"[..]),
        outcomes.guard(1),
    );
    outcomes.wait_done(2, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    let Seen::Message { group_id, .. } = fake
        .wait_for(
            "the session message",
            |e| matches!(e, Seen::Message { body, .. } if body == b"with-session"),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(group_id.as_deref(), Some("customer-7"));
    let Seen::Message { group_id, .. } = fake
        .wait_for(
            "the other message",
            |e| matches!(e, Seen::Message { body, .. } if body == b"without"),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(group_id, None);

    let mut sub = bridge.subscribe("orders-in", 5).await.unwrap();
    let Seen::Attach { session_filter, .. } = fake
        .wait_for("the session receiver", |e| {
            matches!(e, Seen::Attach { address, incoming: false, .. } if address == "orders-in")
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(session_filter, Some(Value::String("customer-7".into())));
    let got = next(&mut sub).await;
    got.settle.settle(Settlement::Ack);
    drop(sub);
    bridge.close().await;

    // `*`: the next available session (a null filter value).
    let mut cfg = fake.config(KEY);
    cfg.receive_session = Some("*".into());
    let bridge = Amqp10Bridge::start("sb-any-session", &cfg).unwrap();
    let sub = bridge.subscribe("orders-in", 5).await.unwrap();
    let Seen::Attach { session_filter, .. } = fake
        .wait_for("the second session receiver", |e| {
            matches!(e, Seen::Attach { address, incoming: false, session_filter: Some(Value::Null) } if address == "orders-in")
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(session_filter, Some(Value::Null));
    drop(sub);
    bridge.close().await;
}

/// The session receiver events of `address`, in order, as `(event, session or body)`.
fn session_trail(log: &[Seen], address: &str) -> Vec<(&'static str, String)> {
    log.iter()
        .filter_map(|e| match e {
            Seen::SessionGranted {
                address: a,
                session,
            } if a == address => {
                Some(("granted", session.clone().unwrap_or_else(|| "none".into())))
            }
            Seen::SessionReleased {
                address: a,
                session,
            } if a == address => {
                Some(("released", session.clone().unwrap_or_else(|| "none".into())))
            }
            Seen::Outcome {
                address: a,
                body,
                outcome,
                ..
            } if a == address => {
                assert!(outcome.starts_with("Accepted"), "{outcome}");
                Some(("accepted", String::from_utf8_lossy(body).into_owned()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_available_session_moves_on_once_the_session_is_idle_and_settled() {
    let mut script = Script::new(&["orders-in"]);
    script.sessions.insert(
        "orders-in".into(),
        vec![
            ("A", vec!["a1", "a2", "a3"]),
            ("B", vec!["b1", "b2"]),
            ("C", vec!["c1"]),
        ],
    );
    let mut fake = Fake::start(script).await;
    let mut cfg = fake.config(KEY);
    cfg.receive_session = Some("*".into());
    cfg.session_idle_timeout_ms = Some(300);
    let bridge = Amqp10Bridge::start("sb-next-session", &cfg).unwrap();
    let mut sub = bridge.subscribe("orders-in", 10).await.unwrap();

    // Session A's messages, held unsettled for several idle periods: the link (and with it
    // the session lock the settlements need) must stay.
    let mut held = Vec::new();
    for body in ["a1", "a2", "a3"] {
        let got = next(&mut sub).await;
        assert_eq!(got.message.body(), body.as_bytes());
        held.push(got);
    }
    let log = fake.drain(Duration::from_millis(1200)).await;
    assert!(
        !log.iter()
            .any(|e| matches!(e, Seen::SessionReleased { .. })),
        "the session was let go with messages unsettled: {log:#?}"
    );
    for got in held {
        got.settle.settle(Settlement::Ack);
    }
    // Then B and C, each in order, each settled at once.
    for body in ["b1", "b2", "c1"] {
        let got = next(&mut sub).await;
        assert_eq!(got.message.body(), body.as_bytes(), "in session order");
        got.settle.settle(Settlement::Ack);
    }
    fake.wait_for(
        "session C released",
        |e| matches!(e, Seen::SessionReleased { session: Some(s), .. } if s == "C"),
    )
    .await;
    // With every session given out, the receiver keeps asking (and gets none, here).
    fake.wait_for("a fourth attach", |e| {
        matches!(e, Seen::SessionGranted { session: None, .. })
    })
    .await;
    let log = fake.drain(Duration::ZERO).await.to_vec();
    let trail = session_trail(&log, "orders-in");
    let expected: Vec<(&str, String)> = [
        ("granted", "A"),
        ("accepted", "a1"),
        ("accepted", "a2"),
        ("accepted", "a3"),
        ("released", "A"),
        ("granted", "B"),
        ("accepted", "b1"),
        ("accepted", "b2"),
        ("released", "B"),
        ("granted", "C"),
        ("accepted", "c1"),
        ("released", "C"),
        ("granted", "none"),
    ]
    .into_iter()
    .map(|(e, v)| (e, v.to_string()))
    .collect();
    assert_eq!(trail[..expected.len()], expected[..], "{log:#?}");
    // Every attach asked for the next available session (a null filter).
    let filters: Vec<_> = log
        .iter()
        .filter_map(|e| match e {
            Seen::Attach {
                address,
                incoming: false,
                session_filter,
            } if address == "orders-in" => Some(session_filter.clone()),
            _ => None,
        })
        .collect();
    assert!(filters.len() >= 4, "{log:#?}");
    assert!(
        filters.iter().all(|f| *f == Some(Value::Null)),
        "{filters:?}"
    );
    drop(sub);
    bridge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_session_is_kept_however_long_it_is_idle() {
    let mut script = Script::new(&["orders-in"]);
    script.sessions.insert(
        "orders-in".into(),
        vec![("A", vec!["a1"]), ("B", vec!["b1"])],
    );
    let mut fake = Fake::start(script).await;
    let mut cfg = fake.config(KEY);
    cfg.receive_session = Some("B".into());
    // Not accepted by the config's validation with a named session; set anyway, to show the
    // engine ignores it there.
    cfg.session_idle_timeout_ms = Some(100);
    let bridge = Amqp10Bridge::start("sb-named-session", &cfg).unwrap();
    let mut sub = bridge.subscribe("orders-in", 10).await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.message.body(), b"b1");
    got.settle.settle(Settlement::Ack);
    let log = fake.drain(Duration::from_millis(1500)).await.to_vec();
    let trail = session_trail(&log, "orders-in");
    assert_eq!(
        trail,
        [("granted", "B".to_string()), ("accepted", "b1".to_string())],
        "{log:#?}"
    );
    drop(sub);
    bridge.close().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Idle timeout: heartbeats, and a peer that goes silent

/// A TCP proxy in front of the fake namespace that can be frozen: while frozen it neither
/// reads nor writes on any connection (new ones included), like a peer that hangs with its
/// sockets open. It keeps what each connection's client sent (its first 64 KB).
struct Proxy {
    port: u16,
    frozen: tokio::sync::watch::Sender<bool>,
    sent: Arc<Mutex<Vec<ClientBytes>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one proxied connection's client sent.
type ClientBytes = Arc<Mutex<Vec<u8>>>;

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, frozen_rx) = tokio::sync::watch::channel(false);
        let sent: Arc<Mutex<Vec<ClientBytes>>> = Arc::default();
        let connections = sent.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let record = Arc::new(Mutex::new(Vec::new()));
                connections.lock().unwrap().push(record.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    frozen_rx.clone(),
                    Some(record),
                ));
                tokio::spawn(pump(server_read, client_write, frozen_rx.clone(), None));
            }
        });
        Proxy {
            port,
            frozen,
            sent,
            task,
        }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    fn connections(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// The Open frame the client sent on connection `n` (0-based).
    fn client_open(&self, n: usize) -> Option<fe2o3_amqp_types::performatives::Open> {
        let bytes = self.sent.lock().unwrap().get(n)?.lock().unwrap().clone();
        first_open(&bytes)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while not frozen; `record` keeps the bytes read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
    record: Option<ClientBytes>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if let Some(record) = &record {
            let mut record = record.lock().unwrap();
            if record.len() < 64 * 1024 {
                record.extend_from_slice(&buf[..n]);
            }
        }
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The first Open performative in a client's byte stream: protocol headers (`AMQP` + 4 bytes)
/// are skipped, frames are `size(4) doff(1) type(1) channel(2)` + body, and the Open is the
/// first non-empty AMQP (type 0) frame body.
fn first_open(bytes: &[u8]) -> Option<fe2o3_amqp_types::performatives::Open> {
    let mut at = 0;
    while at + 8 <= bytes.len() {
        if &bytes[at..at + 4] == b"AMQP" {
            at += 8;
            continue;
        }
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().ok()?) as usize;
        let doff = bytes[at + 4] as usize;
        let frame_type = bytes[at + 5];
        let body = bytes.get(at + 4 * doff..at + size)?;
        if frame_type == 0 && !body.is_empty() {
            return serde_amqp::from_slice(body).ok();
        }
        at += size;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_asks_for_traffic_at_half_the_configured_idle_timeout() {
    let fake = Fake::start(Script::new(&["demo"])).await;
    let proxy = Proxy::start(fake.port).await;
    // (idle_timeout_ms, the Open's idle-time-out)
    let cases = [
        (4_000u64, Some(2_000u32)),
        (60_000, Some(30_000)),
        (0, None),
    ];
    for (n, (configured, advertised)) in cases.into_iter().enumerate() {
        let mut cfg = fake.config_at(proxy.port, KEY);
        cfg.idle_timeout_ms = configured;
        let bridge = Amqp10Bridge::start("sb-idle-open", &cfg).unwrap();
        let outcomes = Arc::new(Outcomes::default());
        bridge.publish(
            "demo",
            message(BasicProperties::default(), &b"x"[..]),
            outcomes.guard(0),
        );
        outcomes.wait_done(1, Duration::from_secs(20)).await;
        assert!(outcomes.failed.lock().unwrap().is_empty());
        let open = proxy
            .client_open(n)
            .unwrap_or_else(|| panic!("no Open on connection {n}"));
        assert_eq!(
            open.idle_time_out, advertised,
            "idle_timeout_ms: {configured}"
        );
        assert!(open.container_id.starts_with("warren-sb-idle-open-"));
        bridge.close().await;
    }
    assert_eq!(proxy.connections(), cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_declared_dead_after_the_idle_timeout_and_the_unsettled_are_resent() {
    let mut fake = Fake::start(Script::new(&["demo"])).await;
    let proxy = Proxy::start(fake.port).await;
    let mut cfg = fake.config_at(proxy.port, KEY);
    cfg.idle_timeout_ms = 1_000;
    cfg.retry = retry(0, 100, 400);
    let bridge = Amqp10Bridge::start("sb-idle", &cfg).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "demo",
        message(BasicProperties::default(), &b"m0"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;

    // Idle but alive: the peer's empty frames (every 500 ms, as the Open asked) keep the
    // connection up across three idle timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bridge.health(), Health::Ready);
    assert_eq!(
        proxy.connections(),
        1,
        "no reconnect while the peer heartbeats"
    );

    proxy.freeze(true);
    let frozen_at = Instant::now();
    for (i, body) in ["m1", "m2"].into_iter().enumerate() {
        bridge.publish(
            "demo",
            message(BasicProperties::default(), body.as_bytes().to_vec()),
            outcomes.guard(i + 1),
        );
    }
    let reason = loop {
        if let Health::Degraded(reason) = bridge.health() {
            if reason.contains("idle_timeout_ms") {
                break reason;
            }
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(5),
            "the silent peer was not detected: health {:?}",
            bridge.health()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let detected = frozen_at.elapsed();
    assert_eq!(
        reason,
        "the peer was silent for longer than idle_timeout_ms (1000 ms): connection declared dead"
    );
    // The last frame before the freeze came at most 500 ms earlier.
    assert!(
        detected >= Duration::from_millis(400) && detected <= Duration::from_millis(2_000),
        "detected after {detected:?}"
    );
    assert_eq!(outcomes.done.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The peer comes back: the bridge reconnects and resends m1 and m2 (same message ids).
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.freeze(false);
    outcomes.wait_done(3, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    assert!(proxy.connections() >= 2);
    let log = fake.drain(Duration::from_millis(200)).await.to_vec();
    for body in ["m0", "m1", "m2"] {
        let ids: HashSet<_> = log
            .iter()
            .filter_map(|e| match e {
                Seen::Message {
                    body: b,
                    message_id,
                    ..
                } if b == body.as_bytes() => Some(message_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "{body} accepted under one message id: {log:#?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while bridge.health() != Health::Ready {
        assert!(Instant::now() < deadline, "{:?}", bridge.health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bridge.close().await;
}

// ---------------------------------------------------------------------------------------------
// 3. amqps:// with a CA file, SASL EXTERNAL with a client certificate

struct Pki {
    dir: std::path::PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let dir = std::env::temp_dir().join(format!(
        "warren-amqp10-tls-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca_cert, ca_key) = ca("warren test CA");
    let (other_ca, _) = ca("some other CA");
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert, key)
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        leaf(vec![], "warren-bridge", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other_ca.pem()).unwrap();
    std::fs::write(dir.join("client.pem"), client_cert.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    Pki {
        dir,
        server: Arc::new(server),
    }
}

/// The namespace behind a TLS listener (TLS from the first byte, as on port 5671); SASL
/// EXTERNAL when the client presented a certificate, else ANONYMOUS.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    ns: Arc<Namespace>,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, ns) = (acceptor.clone(), ns.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return; // the client refused our certificate
            };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            if client_cert {
                let _ = ns.seen.send(Seen::Login {
                    mechanism: "EXTERNAL".into(),
                    client_cert,
                });
                accept_amqp(tls, External, ns).await;
            } else {
                let _ = ns.seen.send(Seen::Login {
                    mechanism: "ANONYMOUS".into(),
                    client_cert,
                });
                accept_amqp(tls, SaslAnonymousMechanism::new(), ns).await;
            }
        });
    }
}

async fn accept_amqp<Io, S>(io: Io, sasl: S, ns: Arc<Namespace>)
where
    Io: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    S: SaslAcceptor + Send + Sync + 'static,
{
    let acceptor = ConnectionAcceptor::builder()
        .container_id("fake-tls")
        .sasl_acceptor(sasl)
        .build();
    if let Ok(conn) = acceptor.accept(io).await {
        serve_connection(conn, ns).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_ca_file_and_sasl_external_with_a_client_certificate() {
    init_tracing();
    let pki = pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, seen) = mpsc::unbounded_channel();
    let ns = Arc::new(Namespace {
        host: "localhost".into(),
        script: Script {
            open: true,
            ..Script::new(&[])
        },
        state: Mutex::default(),
        seen: tx,
    });
    let server = tokio::spawn(serve_tls(listener, ns, pki.server.clone()));
    let mut fake = Fake {
        port,
        seen,
        log: Vec::new(),
        server,
    };
    let path = |f: &str| pki.dir.join(f).to_string_lossy().into_owned();
    let config = |ca: &str, client: bool| Amqp10Backend {
        url: Some(format!("amqps://localhost:{port}")),
        target: Some(Amqp10Target::Generic),
        max_in_flight: 10,
        ca_file: Some(path(ca)),
        client_cert_file: client.then(|| path("client.pem")),
        client_key_file: client.then(|| path("client.key")),
        retry: retry(0, 50, 200),
        ..Default::default()
    };

    // With a client certificate: TLS verified against the CA file, SASL EXTERNAL.
    let bridge = Amqp10Bridge::start("tls-external", &config("ca.pem", true)).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "secure",
        message(BasicProperties::default(), &b"over tls"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    fake.wait_for(
        "an EXTERNAL login",
        |e| matches!(e, Seen::Login { mechanism, client_cert: true } if mechanism == "EXTERNAL"),
    )
    .await;
    fake.wait_for(
        "the message",
        |e| matches!(e, Seen::Message { body, .. } if body == b"over tls"),
    )
    .await;
    bridge.close().await;

    // CA file only: TLS, SASL ANONYMOUS, no certificate.
    let bridge = Amqp10Bridge::start("tls-anonymous", &config("ca.pem", false)).unwrap();
    let outcomes = Arc::new(Outcomes::default());
    bridge.publish(
        "secure",
        message(BasicProperties::default(), &b"anonymous over tls"[..]),
        outcomes.guard(0),
    );
    outcomes.wait_done(1, Duration::from_secs(20)).await;
    assert!(outcomes.failed.lock().unwrap().is_empty());
    fake.wait_for(
        "an ANONYMOUS login over TLS",
        |e| matches!(e, Seen::Login { mechanism, client_cert: false } if mechanism == "ANONYMOUS"),
    )
    .await;
    bridge.close().await;

    // A CA that did not sign the server's certificate: never connects.
    let bridge = Amqp10Bridge::start("tls-wrong-ca", &config("other-ca.pem", true)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match bridge.health() {
            Health::Degraded(reason) if reason == "connecting" => {
                assert!(Instant::now() < deadline, "no connection attempt ended");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Health::Degraded(reason) => {
                assert!(
                    reason.to_lowercase().contains("certificate")
                        || reason.contains("invalid peer"),
                    "{reason}"
                );
                break;
            }
            other => panic!("connected with the wrong CA: {other:?}"),
        }
    }
    bridge.close().await;
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// `receive_session: "*"` asks Service Bus to hold the attach at most 20 s
/// (`com.microsoft:timeout`, a uint of milliseconds in the attach's properties), so the
/// service's "no session available" answer comes before the bridge's own 30 s step timeout;
/// a named session's attach does not carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_available_session_attach_names_the_service_bus_timeout() {
    // The symbol, then the uint 20,000 in its four-byte encoding.
    let mut wanted = vec![0xa3, 21];
    wanted.extend_from_slice(b"com.microsoft:timeout");
    wanted.extend_from_slice(&[0x70, 0x00, 0x00, 0x4e, 0x20]);
    let has_timeout = |bytes: &[u8]| bytes.windows(wanted.len()).any(|w| w == &wanted[..]);

    for (n, session) in ["*", "customer-7"].into_iter().enumerate() {
        let mut script = Script::new(&["orders-in"]);
        script
            .sessions
            .insert("orders-in".into(), vec![("customer-7", vec!["c1"])]);
        let mut fake = Fake::start(script).await;
        let proxy = Proxy::start(fake.port).await;
        let mut cfg = fake.config_at(proxy.port, KEY);
        cfg.receive_session = Some(session.into());
        let bridge = Amqp10Bridge::start("sb-session-timeout", &cfg).unwrap();
        let mut sub = bridge.subscribe("orders-in", 5).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("no message within 20s")
            .expect("subscription ended");
        assert_eq!(got.message.body(), b"c1");
        got.settle.settle(Settlement::Ack);
        let sent = proxy.sent.lock().unwrap()[0].lock().unwrap().clone();
        assert_eq!(
            has_timeout(&sent),
            n == 0,
            "receive_session {session:?}: com.microsoft:timeout in the attach"
        );
        let _ = fake.drain(Duration::from_millis(100)).await;
        drop(sub);
        bridge.close().await;
    }
}
