//! The YAML configuration file's typed form: backends, routes, queue mappings.
//!
//! Plain data. Loading, `${VAR}` substitution and validation live in `load.rs`.

use std::collections::BTreeMap;

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// AMQP listen addresses; default: port 5672 on every IPv4 and IPv6 address.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Data directory for durable state; default `warren-data`.
    #[serde(default)]
    pub data_dir: Option<String>,
    /// Named targets.
    #[serde(default, deserialize_with = "unique_map")]
    pub backends: BTreeMap<String, BackendConfig>,
    /// Evaluated in order; the first matching route decides.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Warren queues whose messages come from a backend's source.
    #[serde(default)]
    pub queues: Vec<QueueMappingConfig>,
    /// What happens to a message no route matches.
    #[serde(default)]
    pub unmatched: Unmatched,
}

/// One target. `type` selects the bridge; the other keys are that bridge's settings.
///
/// Serialized with serde's internal tagging; deserialized by hand (below) so that an unknown key
/// inside a backend is reported at that key's line and column.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BackendConfig {
    /// An upstream AMQP 0-9-1 broker (RabbitMQ).
    Rabbitmq(RabbitmqBackend),
    /// An AMQP 1.0 peer (Azure Service Bus, RabbitMQ's AMQP 1.0 plugin, Artemis).
    Amqp10(Amqp10Backend),
    /// Redis Streams.
    Redis(RedisBackend),
    /// An MQTT broker (3.1.1 or 5).
    Mqtt(MqttBackend),
    /// A Kafka cluster (or a Kafka-protocol service: Azure Event Hubs, Redpanda, tansu).
    Kafka(KafkaBackend),
    /// Amazon SQS (or an SQS-compatible endpoint such as moto or LocalStack).
    Sqs(SqsBackend),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Rabbitmq(_) => "rabbitmq",
            BackendConfig::Amqp10(_) => "amqp10",
            BackendConfig::Redis(_) => "redis",
            BackendConfig::Mqtt(_) => "mqtt",
            BackendConfig::Kafka(_) => "kafka",
            BackendConfig::Sqs(_) => "sqs",
        }
    }

    pub fn retry(&self) -> &RetryConfig {
        match self {
            BackendConfig::Rabbitmq(b) => &b.retry,
            BackendConfig::Amqp10(b) => &b.retry,
            BackendConfig::Redis(b) => &b.retry,
            BackendConfig::Mqtt(b) => &b.retry,
            BackendConfig::Kafka(b) => &b.retry,
            BackendConfig::Sqs(b) => &b.retry,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqBackend {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// Publishes not yet confirmed by the upstream, at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_in_flight() -> usize {
    1000
}

/// An AMQP 1.0 peer. Exactly one of `url` and `connection_string` is set.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Amqp10Backend {
    /// `amqp://[user:pass@]host[:port]` or `amqps://`: user and password → SASL PLAIN, none →
    /// SASL ANONYMOUS.
    #[serde(default)]
    pub url: Option<String>,
    /// An Azure Service Bus connection string (`Endpoint=sb://...;SharedAccessKeyName=...;
    /// SharedAccessKey=...`), authenticated with CBS and SAS tokens.
    #[serde(default)]
    pub connection_string: Option<String>,
    /// Which peer this is, deciding the requeue/reject outcomes. Default: `servicebus` with a
    /// connection string, `generic` with a URL.
    #[serde(default)]
    pub target: Option<Amqp10Target>,
    /// Largest encoded message sent; a larger one fails at once. Default: 262144 (Service Bus
    /// Standard) for `servicebus`, else only the peer's link limit.
    #[serde(default)]
    pub max_message_size: Option<u64>,
    /// Transfers not yet settled by the peer, at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Service Bus: how long each SAS token put on `$cbs` is valid, in seconds; a token is
    /// renewed once three quarters of it have passed.
    #[serde(default = "default_token_lifetime")]
    pub token_lifetime_secs: u64,
    /// `amqps://`: a PEM file of the CA certificate(s) the peer's certificate must chain to.
    /// Default: the Mozilla root set (webpki-roots).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// `amqps://`: a PEM client certificate chain presented in the TLS handshake; with it the
    /// bridge logs in with SASL EXTERNAL (needs `client_key_file`, no user in the URL).
    #[serde(default)]
    pub client_cert_file: Option<String>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<String>,
    /// Sending to session-enabled entities: the AMQP header whose value becomes
    /// `properties.group-id` (the Service Bus SessionId).
    #[serde(default)]
    pub session_id_header: Option<String>,
    /// Receiving from session-enabled entities: the session id every receiver link asks for
    /// with the `com.microsoft:session-filter`, or `*` for the next available session.
    #[serde(default)]
    pub receive_session: Option<String>,
    /// With `receive_session: "*"`: how long the current session may go without a message (and
    /// with nothing unsettled) before the receiver lets it go and asks for the next available
    /// one. Default: 5000 (see [`DEFAULT_SESSION_IDLE_TIMEOUT_MS`]).
    #[serde(default)]
    pub session_idle_timeout_ms: Option<u64>,
    /// How long the peer may stay silent before the connection is declared dead, in
    /// milliseconds; the Open frame asks the peer for traffic (heartbeats) at half of it, as the
    /// AMQP 1.0 spec (2.4.5) recommends. 0: no idle timeout. Default: 60000, as Azure's clients.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// AMQP 1.0 address → the terminus capability its links carry (`queue` or `topic`): a
    /// sender's target or a receiver's source. ActiveMQ Artemis reads them as the routing type
    /// (anycast / multicast) of an auto-created address and of the queue a receiver consumes
    /// from; an address not listed carries none, leaving it to the broker's defaults.
    #[serde(default, deserialize_with = "unique_map")]
    pub address_capabilities: BTreeMap<String, AddressCapability>,
    #[serde(default)]
    pub retry: RetryConfig,
}

/// The terminus capability an amqp10 address's links carry (ActiveMQ Artemis and Qpid JMS
/// spell them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressCapability {
    /// Point-to-point: Artemis routes it ANYCAST.
    Queue,
    /// Publish-subscribe: Artemis routes it MULTICAST.
    Topic,
}

impl AddressCapability {
    /// The capability symbol as it goes on the wire.
    pub fn symbol(self) -> &'static str {
        match self {
            AddressCapability::Queue => "queue",
            AddressCapability::Topic => "topic",
        }
    }
}

/// What a backend written as an empty map gets (before validation, which then asks for a
/// `url` or a `connection_string`): lets code and tests name only the fields they set.
impl Default for Amqp10Backend {
    fn default() -> Self {
        Amqp10Backend {
            url: None,
            connection_string: None,
            target: None,
            max_message_size: None,
            max_in_flight: default_in_flight(),
            token_lifetime_secs: default_token_lifetime(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            session_id_header: None,
            receive_session: None,
            session_idle_timeout_ms: None,
            idle_timeout_ms: default_idle_timeout_ms(),
            address_capabilities: BTreeMap::new(),
            retry: RetryConfig::default(),
        }
    }
}

fn default_token_lifetime() -> u64 {
    3600
}

/// The connection idle timeout of an amqp10 backend: Azure's Service Bus and Event Hubs
/// clients default to 60 s (`ConnectionIdleTimeout`), which Service Bus is known to accept.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;

/// The session idle timeout of an amqp10 backend with `receive_session: "*"`. Microsoft's
/// session processors wait their operation timeout (60 s) by default; a bridge draining many
/// sessions would sit a minute on each finished one, so it waits 5 s: long enough to ride out
/// a producer's pause inside a session, short enough to move on promptly.
pub const DEFAULT_SESSION_IDLE_TIMEOUT_MS: u64 = 5_000;

fn default_idle_timeout_ms() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}

impl Amqp10Backend {
    pub fn effective_target(&self) -> Amqp10Target {
        self.target.unwrap_or(if self.connection_string.is_some() {
            Amqp10Target::Servicebus
        } else {
            Amqp10Target::Generic
        })
    }

    /// The session idle timeout in effect: only with `receive_session: "*"` (a named session
    /// is kept for good).
    pub fn effective_session_idle_timeout_ms(&self) -> Option<u64> {
        (self.receive_session.as_deref() == Some("*")).then(|| {
            self.session_idle_timeout_ms
                .unwrap_or(DEFAULT_SESSION_IDLE_TIMEOUT_MS)
        })
    }

    pub fn effective_max_message_size(&self) -> Option<u64> {
        self.max_message_size.or(match self.effective_target() {
            Amqp10Target::Servicebus => Some(256 * 1024),
            _ => None,
        })
    }
}

/// The AMQP 1.0 peer's flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Amqp10Target {
    /// Requeue → `released`, reject → `rejected`.
    Generic,
    /// RabbitMQ's AMQP 1.0 plugin (refuses `modified`): as `generic`.
    Rabbitmq,
    /// Azure Service Bus: requeue → `modified(delivery-failed)` (counts towards
    /// MaxDeliveryCount), reject → `rejected` with `com.microsoft:dead-letter` (dead-letter queue).
    Servicebus,
}

/// A Redis server whose streams are the destinations and sources.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBackend {
    /// `redis://[user:pass@]host:port[/db]` (or `rediss://`).
    pub url: String,
    /// Approximate stream length cap: every XADD carries `MAXLEN ~ maxlen`. Default: no cap.
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// The consumer group queue mappings read through (created at the stream's start if missing).
    #[serde(default = "default_redis_group")]
    pub group: String,
    /// This instance's consumer name inside the group; keep it fixed across restarts.
    #[serde(default = "default_redis_consumer")]
    pub consumer: String,
    /// How long one XREADGROUP blocks waiting for entries.
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// Where entries go (XADD, then XACK) once rejected or delivered `max_deliveries` times.
    /// Default: no dead-letter stream, a rejected entry is acknowledged and dropped.
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
    /// Deliveries after which an entry is dead-lettered instead of delivered again.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Pending entries idle this long (their consumer died, or they were requeued) are
    /// reclaimed with XAUTOCLAIM and delivered again.
    #[serde(default = "default_claim_idle_ms")]
    pub claim_idle_ms: u64,
    /// `rediss://` only: a PEM file of the CA certificate(s) the server's certificate must chain
    /// to. Default: the system's trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub retry: RetryConfig,
}

/// An MQTT broker: destinations and sources are topic roots.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttBackend {
    /// `mqtt://host:port` (or `mqtts://`).
    pub url: String,
    /// `"5"` (default) or `"3.1.1"`.
    #[serde(default = "default_mqtt_protocol")]
    pub protocol: String,
    /// The fixed client id of the bridge's persistent session.
    pub client_id: String,
    /// Prepended to every topic (e.g. `site-1/`). Default: none.
    #[serde(default)]
    pub topic_prefix: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// `mqtts://` only: a PEM file of the CA certificate(s) the broker's certificate must chain
    /// to. Default: the system's trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// MQTT 3.1.1 only (it has no properties): wrap every payload in Warren's envelope, which
    /// carries the AMQP properties and headers, and unwrap it on receipt. For Warren-to-Warren
    /// links over 3.1.1; other MQTT clients see the envelope. Default: off, properties dropped.
    #[serde(default)]
    pub envelope: bool,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_mqtt_protocol() -> String {
    "5".into()
}
fn default_keep_alive() -> u64 {
    30
}

/// Amazon SQS: destinations and sources are queue names (resolved with GetQueueUrl) or queue
/// URLs. Region and credentials come from the standard AWS chain unless given here.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqsBackend {
    /// `http(s)://host[:port]` of an SQS-compatible server (moto, LocalStack, ElasticMQ).
    /// Default: AWS's own endpoint for the region.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The AWS region (e.g. `eu-west-1`). Default: the standard chain (`AWS_REGION`,
    /// `AWS_DEFAULT_REGION`, the profile, instance metadata).
    #[serde(default)]
    pub region: Option<String>,
    /// Static credentials, both or neither. Default: the standard chain (environment, profile,
    /// web identity, ECS/EC2 roles).
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// With static credentials only: a session token (temporary credentials).
    #[serde(default)]
    pub session_token: Option<String>,
    /// The largest message sent (body, as sent, plus attributes), and the most one
    /// SendMessageBatch carries. A larger message fails at once. Default 262144 (256 KiB); SQS
    /// allows up to 1048576 on queues configured for it.
    #[serde(default = "default_sqs_max_message_size")]
    pub max_message_size: u64,
    /// SendMessageBatch calls in flight at once per standard queue (a FIFO queue always has one,
    /// to keep its order).
    #[serde(default = "default_sqs_batches_in_flight")]
    pub max_batches_in_flight: usize,
    /// How long one ReceiveMessage waits for messages (long polling), 0–20 seconds.
    #[serde(default = "default_sqs_wait_time")]
    pub wait_time_secs: u32,
    /// The visibility timeout received messages get. Warren extends it while the AMQP client
    /// holds the message, so it only matters when Warren dies holding messages: they come back
    /// after this long.
    #[serde(default = "default_sqs_visibility_timeout")]
    pub visibility_timeout_secs: u32,
    /// FIFO queues: the header whose value is the MessageGroupId.
    #[serde(default = "default_sqs_group_id_header")]
    pub group_id_header: String,
    /// FIFO queues: the MessageGroupId of messages without that header. Default: the routing key
    /// (`default` when it is empty).
    #[serde(default)]
    pub default_group_id: Option<String>,
    /// FIFO queues: the header whose value is the MessageDeduplicationId. Without it, the
    /// message-id property; without that, an id Warren makes once per message (kept across
    /// resends, so SQS drops a resent copy within its 5-minute deduplication window).
    #[serde(default = "default_sqs_dedup_header")]
    pub deduplication_id_header: String,
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_sqs_max_message_size() -> u64 {
    256 * 1024
}
fn default_sqs_batches_in_flight() -> usize {
    10
}
fn default_sqs_wait_time() -> u32 {
    20
}
fn default_sqs_visibility_timeout() -> u32 {
    30
}
fn default_sqs_group_id_header() -> String {
    "x-message-group-id".into()
}
fn default_sqs_dedup_header() -> String {
    "x-deduplication-id".into()
}

/// A Kafka cluster: destinations and sources are topics.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaBackend {
    /// `host:port[,host:port...]`: librdkafka's `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// librdkafka's `client.id`.
    #[serde(default = "default_kafka_client_id")]
    pub client_id: String,
    /// Queue mappings consume in the consumer group `<group_prefix><source topic>`: one group
    /// per mapping.
    #[serde(default = "default_kafka_group_prefix")]
    pub group_prefix: String,
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with the `sasl_*` protocols.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// A PEM file of CA certificates to verify the brokers with (`ssl.ca.location`). Default:
    /// the system's trust store.
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
    /// `none` (default), `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default = "default_kafka_compression")]
    pub compression: String,
    /// How long the producer waits to fill a batch (`linger.ms`).
    #[serde(default = "default_kafka_linger_ms")]
    pub linger_ms: u64,
    /// The idempotent producer (`enable.idempotence`): no duplicates or reordering from the
    /// client's own retries. Turn it off for services that refuse it.
    #[serde(default = "default_kafka_idempotence")]
    pub idempotence: bool,
    /// How long librdkafka keeps retrying one send (`message.timeout.ms`) before it counts as
    /// one failed attempt of `retry.max_attempts`.
    #[serde(default = "default_kafka_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// The AMQP header whose value becomes the Kafka message key. Without it (or when a message
    /// lacks the header) the routing key is the key.
    #[serde(default)]
    pub key_header: Option<String>,
    /// Where a new consumer group starts reading: `earliest` (default) or `latest`.
    #[serde(default = "default_kafka_offset_reset")]
    pub auto_offset_reset: String,
    /// Any other librdkafka property, applied last (so it overrides the keys above), e.g.
    /// `session.timeout.ms: "6000"`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub retry: RetryConfig,
}

/// How the Kafka client reaches the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaSecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaSecurityProtocol {
    /// The value librdkafka expects.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
        )
    }
}

fn default_kafka_client_id() -> String {
    "warren".into()
}
fn default_kafka_group_prefix() -> String {
    "warren.".into()
}
fn default_kafka_compression() -> String {
    "none".into()
}
fn default_kafka_linger_ms() -> u64 {
    5
}
fn default_kafka_idempotence() -> bool {
    true
}
fn default_kafka_delivery_timeout_ms() -> u64 {
    30_000
}
fn default_kafka_offset_reset() -> String {
    "earliest".into()
}

fn default_redis_group() -> String {
    "warren".into()
}
fn default_redis_consumer() -> String {
    "warren".into()
}
fn default_block_ms() -> u64 {
    1000
}
fn default_max_deliveries() -> u32 {
    10
}
fn default_claim_idle_ms() -> u64 {
    30_000
}

/// How long a bridge keeps trying before it gives up on a message (basic.nack to the publisher).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per message before it is nacked; 0: retry forever.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
}

fn default_attempts() -> u32 {
    10
}
fn default_initial_backoff() -> u64 {
    100
}
fn default_max_backoff() -> u64 {
    10_000
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_attempts(),
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub backend: String,
    /// The target's destination (exchange, queue, topic, stream...). The message keeps its
    /// routing key.
    pub destination: String,
    #[serde(default)]
    pub mode: RouteMode,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The exchange the client published to ("" is the default exchange).
    pub exchange: String,
    /// A topic pattern over the routing key (`*` one word, `#` any); default `#`.
    #[serde(default = "any_key")]
    pub routing_key: String,
    /// Header values that must all be present and equal.
    #[serde(default, deserialize_with = "unique_map")]
    pub headers: BTreeMap<String, String>,
}

fn any_key() -> String {
    "#".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    /// The target only.
    #[default]
    Forward,
    /// The embedded engine and the target; confirmed once both have it.
    Mirror,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueMappingConfig {
    /// The queue name AMQP 0-9-1 clients consume from.
    pub name: String,
    pub backend: String,
    /// The target's queue, subscription, topic or stream.
    pub source: String,
    /// Messages held from the target at once (its credit / prefetch).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
}

fn default_prefetch() -> u16 {
    100
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Routed by the embedded engine's exchanges and bindings, as with no configuration.
    #[default]
    Embedded,
    /// Refused: returned to a mandatory publisher, nacked under confirms.
    Reject,
}

// ---------------------------------------------------------------------------------------------
// Deserialization helpers.
//
// serde_yaml attaches a line and column to an error raised while a node is being deserialized,
// and the node is the innermost one whose deserialization raised it. The helpers below raise
// their errors inside the key's own deserialization, so the location is the offending key's.

/// The values `type` may take, one per `BackendConfig` variant.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendKind {
    Rabbitmq,
    Amqp10,
    Redis,
    Mqtt,
    Kafka,
    Sqs,
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(BackendVisitor)
    }
}

struct BackendVisitor;

impl<'de> Visitor<'de> for BackendVisitor {
    type Value = BackendConfig;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a backend: a map with a `type` key")
    }

    /// Reads keys up to `type`, keeping any before it, then hands the kept entries followed by
    /// the rest of the map (streamed, so locations survive) to the variant's own struct.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BackendConfig, A::Error> {
        let mut before_type: Vec<(String, serde_yaml::Value)> = Vec::new();
        let kind = loop {
            match map.next_key::<String>()? {
                None => return Err(de::Error::missing_field("type")),
                Some(key) if key == "type" => break map.next_value::<BackendKind>()?,
                Some(key) => {
                    let value = map.next_value::<serde_yaml::Value>()?;
                    before_type.push((key, value));
                }
            }
        };
        let rest = RestOfBackend {
            kept: before_type.into_iter(),
            kept_value: None,
            map,
        };
        let rest = de::value::MapAccessDeserializer::new(rest);
        match kind {
            BackendKind::Rabbitmq => {
                RabbitmqBackend::deserialize(rest).map(BackendConfig::Rabbitmq)
            }
            BackendKind::Amqp10 => Amqp10Backend::deserialize(rest).map(BackendConfig::Amqp10),
            BackendKind::Redis => RedisBackend::deserialize(rest).map(BackendConfig::Redis),
            BackendKind::Mqtt => MqttBackend::deserialize(rest).map(BackendConfig::Mqtt),
            BackendKind::Kafka => KafkaBackend::deserialize(rest).map(BackendConfig::Kafka),
            BackendKind::Sqs => SqsBackend::deserialize(rest).map(BackendConfig::Sqs),
        }
    }
}

/// A backend's map minus its `type` entry.
struct RestOfBackend<A> {
    kept: std::vec::IntoIter<(String, serde_yaml::Value)>,
    kept_value: Option<serde_yaml::Value>,
    map: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for RestOfBackend<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        if let Some((key, value)) = self.kept.next() {
            self.kept_value = Some(value);
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
        self.map.next_key_seed(CheckedKey {
            seed,
            check: |key: &str| {
                if key == "type" {
                    Err("duplicate field `type`".to_string())
                } else {
                    Ok(())
                }
            },
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        match self.kept_value.take() {
            Some(value) => seed.deserialize(value).map_err(de::Error::custom),
            None => self.map.next_value_seed(seed),
        }
    }
}

/// A map key read as a string, checked, then handed to `seed`. Both the check and `seed` run
/// inside the key's own deserialization, so their errors carry the key's location.
struct CheckedKey<K, C> {
    seed: K,
    check: C,
}

impl<'de, K, C> DeserializeSeed<'de> for CheckedKey<K, C>
where
    K: DeserializeSeed<'de>,
    C: FnOnce(&str) -> Result<(), String>,
{
    type Value = K::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<K::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, K, C> Visitor<'de> for CheckedKey<K, C>
where
    K: DeserializeSeed<'de>,
    C: FnOnce(&str) -> Result<(), String>,
{
    type Value = K::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<K::Value, E> {
        (self.check)(key).map_err(E::custom)?;
        self.seed.deserialize(key.into_deserializer())
    }
}

/// A string-keyed map that rejects a key given twice (serde's own maps keep the last silently).
fn unique_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueMap<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueMap<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            loop {
                let seen = &out;
                let key = map.next_key_seed(CheckedKey {
                    seed: std::marker::PhantomData::<String>,
                    check: |key: &str| {
                        if seen.contains_key(key) {
                            Err(format!("duplicate key `{key}`"))
                        } else {
                            Ok(())
                        }
                    },
                })?;
                let Some(key) = key else { break };
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_map(UniqueMap(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amqp10_backend_by_default_is_what_an_empty_map_gives() {
        let parsed: Amqp10Backend = serde_yaml::from_str("{}").unwrap();
        assert_eq!(parsed, Amqp10Backend::default());
    }
}
