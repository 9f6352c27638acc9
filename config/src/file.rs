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
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Rabbitmq(_) => "rabbitmq",
        }
    }

    pub fn retry(&self) -> &RetryConfig {
        match self {
            BackendConfig::Rabbitmq(b) => &b.retry,
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
