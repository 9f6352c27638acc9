//! Typed settings for Warren. Plain data: built once at start-up, read by everything, changed by nothing.
//!
//! [`file`](mod@file) is the YAML configuration file's typed form (backends, routes, queue mappings);
//! [`load`](mod@load) reads, substitutes and validates it, and turns it into [`Settings`].

pub mod file;
pub mod load;
pub mod servicebus;

pub use file::{
    BackendConfig, ConfigFile, QueueMappingConfig, RabbitmqBackend, RetryConfig, RouteConfig,
    RouteMatch, RouteMode, Unmatched,
};
pub use load::{
    load, load_with_env, parse, parse_with_env, routing_table, validate, ConfigError, Position,
    DEFAULT_DATA_DIR,
};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the gateway needs to know before it accepts its first connection.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Addresses to listen on for AMQP 0.9.1. Empty means RabbitMQ's default: port 5672 on every
    /// IPv4 and IPv6 address.
    pub listen: Vec<SocketAddr>,
    /// Where durable exchanges, queues, bindings and persistent messages are kept. `None`
    /// keeps everything in memory (tests); the binary always sets one.
    pub data_dir: Option<PathBuf>,
    pub storage: Storage,
    pub default_user: DefaultUser,
    pub limits: Limits,
    pub product: ProductInfo,
}

/// How the message store uses the disk and memory.
#[derive(Clone, Debug)]
pub struct Storage {
    /// Segment files roll over past this size.
    pub segment_bytes: u64,
    /// Ready messages a durable queue keeps in memory; further ones page out to its log.
    pub queue_memory_messages: usize,
    /// Body bytes a durable queue keeps in memory before paging.
    pub queue_memory_bytes: usize,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            segment_bytes: 64 * 1024 * 1024,
            queue_memory_messages: 100_000,
            queue_memory_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The user created on first start, as RabbitMQ's guest/guest.
#[derive(Clone, Debug)]
pub struct DefaultUser {
    pub username: String,
    pub password: String,
    /// RabbitMQ's `loopback_users`: the default user may log in only from 127.0.0.1/::1.
    pub loopback_only: bool,
}

impl Default for DefaultUser {
    fn default() -> Self {
        DefaultUser {
            username: "guest".into(),
            password: "guest".into(),
            loopback_only: true,
        }
    }
}

/// Protocol and resource limits offered in connection.tune and enforced by the gateway.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest channel number a client may open (connection.tune channel-max).
    pub channel_max: u16,
    /// Largest frame the server accepts and sends, header and end octet included.
    pub frame_max: u32,
    /// Heartbeat interval the server proposes; 0 disables heartbeats unless the client asks.
    pub heartbeat: Duration,
    /// Largest message body a publisher may send (RabbitMQ's max_message_size, 128 MiB).
    pub max_message_size: u64,
    /// Bytes queued for one connection's socket before deliveries to it pause and its own
    /// reads stop: the bound that keeps a client that does not read from growing our memory.
    pub outbound_high_watermark: usize,
    /// How long a new connection may take to finish the handshake.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: Duration::from_secs(60),
            max_message_size: 128 * 1024 * 1024,
            outbound_high_watermark: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What the server tells clients about itself in connection.start.
#[derive(Clone, Debug)]
pub struct ProductInfo {
    pub product: String,
    pub version: String,
    pub cluster_name: String,
}

impl Default for ProductInfo {
    fn default() -> Self {
        ProductInfo {
            product: "Warren".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            cluster_name: "warren".into(),
        }
    }
}
