//! Warren's bridges: `Backend`s that forward published messages to another broker and feed
//! Warren queues from it.
//!
//! [`build`] turns one configured backend (`backends:` in the configuration file) into a running
//! `Arc<dyn Backend>`. Today there is one kind:
//!
//! - `rabbitmq` (cargo feature `rabbitmq`, on by default): an upstream AMQP 0-9-1 broker, see
//!   [`rabbitmq`].
//! - `amqp10` (cargo feature `amqp10`, on by default): an AMQP 1.0 peer (Azure Service Bus,
//!   RabbitMQ's AMQP 1.0 plugin, Artemis), see [`amqp10`].
//! - `redis` (cargo feature `redis`, on by default): Redis Streams, see [`redis`].
//! - `mqtt` (cargo feature `mqtt`, on by default): an MQTT 5 or 3.1.1 broker, see [`mqtt`].
//! - `kafka` (cargo feature `kafka`, on by default): a Kafka cluster, see [`kafka`].
//! - `sqs` (cargo feature `sqs`, on by default): Amazon SQS (or a local SQS-compatible server),
//!   see [`sqs`].

use std::sync::Arc;

use thiserror::Error;
use warren_backends::Backend;
use warren_config::file::BackendConfig;

#[cfg(feature = "amqp10")]
pub mod amqp10;
#[cfg(any(feature = "redis", feature = "mqtt", feature = "sqs"))]
mod engine;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(
    feature = "rabbitmq",
    feature = "redis",
    feature = "mqtt",
    feature = "sqs"
))]
mod retry;
#[cfg(feature = "sqs")]
pub mod sqs;
#[cfg(any(
    feature = "kafka",
    feature = "rabbitmq",
    feature = "redis",
    feature = "sqs"
))]
mod status;
#[cfg(any(feature = "mqtt", feature = "redis"))]
mod tls;

/// Why a backend could not be built. Only configuration problems: a target that is down at
/// start is not an error, the bridge connects (and reconnects) on its own.
#[derive(Debug, Error)]
pub enum BridgeError {
    #[error("backend '{backend}': invalid configuration: {reason}")]
    Config { backend: String, reason: String },
    #[error("backend '{backend}': type '{kind}' is not compiled in (cargo feature '{kind}')")]
    Unsupported { backend: String, kind: &'static str },
    #[error("backend '{backend}': bridges must be built inside a Tokio runtime")]
    NoRuntime { backend: String },
}

/// Starts the bridge `config` describes, named `name` (for logs, health and errors). Must be
/// called inside a Tokio runtime: the bridge spawns its connection task on it.
pub fn build(name: &str, config: &BackendConfig) -> Result<Arc<dyn Backend>, BridgeError> {
    match config {
        #[cfg(feature = "amqp10")]
        BackendConfig::Amqp10(cfg) => {
            let bridge = amqp10::Amqp10Bridge::start(name, cfg)?;
            Ok(bridge)
        }
        #[cfg(feature = "rabbitmq")]
        BackendConfig::Rabbitmq(cfg) => {
            let bridge = rabbitmq::RabbitmqBridge::start(name, cfg)?;
            Ok(bridge)
        }
        #[cfg(feature = "mqtt")]
        BackendConfig::Mqtt(cfg) => {
            let bridge = mqtt::MqttBridge::start(name, cfg)?;
            Ok(bridge)
        }
        #[cfg(feature = "kafka")]
        BackendConfig::Kafka(cfg) => {
            let bridge = kafka::KafkaBridge::start(name, cfg)?;
            Ok(bridge)
        }
        #[cfg(feature = "redis")]
        BackendConfig::Redis(cfg) => {
            let bridge = redis::RedisBridge::start(name, cfg)?;
            Ok(bridge)
        }
        #[cfg(feature = "sqs")]
        BackendConfig::Sqs(cfg) => {
            let bridge = sqs::SqsBridge::start(name, cfg)?;
            Ok(bridge)
        }
        #[allow(unreachable_patterns)]
        other => Err(BridgeError::Unsupported {
            backend: name.to_string(),
            kind: other.kind(),
        }),
    }
}
