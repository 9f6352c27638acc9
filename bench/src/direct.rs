//! Publishing straight to a bridge's target with the client library the bridge uses, so a run
//! through Warren can be compared with the same library publishing directly:
//!
//! - `--mode amqp10-direct`: fe2o3-amqp 0.18, one connection, session and sender link,
//!   unsettled transfers pipelined (`send_batchable`) with at most `--confirm` outcomes
//!   outstanding, as the AMQP 1.0 bridge sends (`bridges/src/amqp10/engine.rs`). Each message
//!   is what the bridge makes of a bare AMQP 0-9-1 publish: a header (durable with
//!   `--persistent`), properties with a string message-id and the queue name as subject, and one
//!   `data` section of `--size` bytes.
//! - `--mode kafka-direct`: rdkafka 0.39 (librdkafka 2.12) with the Kafka bridge's producer
//!   settings (`acks=all`, `enable.idempotence=true`, `compression.type=none`, `linger.ms=5`,
//!   `message.timeout.ms=30000`), a `FutureProducer` with at most `--confirm` records awaiting
//!   their delivery report. Each record has the queue name as key and `--size` bytes of value.
//!
//! A confirmed message is one the peer accepted (AMQP 1.0 `accepted`; Kafka: a successful
//! delivery report). `publish_rate` counts messages handed to the library, `confirm_rate` the
//! confirmed ones: the figure to compare with `--confirm` runs through Warren, whose confirms
//! come only after the target accepted each message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::{Connection, Sender, Session};
use fe2o3_amqp_types::messaging::{
    Data, Header, Message as AmqpMessage, MessageId, Outcome, Priority, Properties,
};
use fe2o3_amqp_types::primitives::Binary;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Map, Value};

use crate::run::{round, thousands};
use crate::{Mode, RunArgs};

/// Counters the publisher adds to and the monitor reads.
#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    done: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Counters {
    fn fail(&self, err: anyhow::Error) {
        let mut slot = self.error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(format!("{err:#}"));
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One direct run: publishes for `--duration` (or `--count`), returns the JSON result.
pub async fn run(args: &RunArgs) -> Result<Map<String, Value>> {
    if args.confirm == 0 {
        bail!(
            "--mode {} needs --confirm WINDOW (outcomes awaited at once, at most)",
            args.mode.name()
        );
    }
    if args.publishers != 1 || args.queues > 1 {
        bail!("--mode {} runs one publisher", args.mode.name());
    }
    let key = format!("{}-0", args.queue_prefix);
    let counters = Arc::new(Counters::default());
    let publisher = match args.mode {
        Mode::Amqp10Direct => {
            let url = args
                .amqp10_url
                .clone()
                .ok_or_else(|| anyhow!("--mode amqp10-direct needs --amqp10-url"))?;
            let address = args
                .address
                .clone()
                .unwrap_or_else(|| format!("/amq/queue/{key}"));
            let sender = Amqp10::open(&url, &address).await?;
            let (c, a) = (counters.clone(), args.clone());
            tokio::spawn(async move {
                if let Err(e) = sender.publish(&a, &key, &c).await {
                    c.fail(e);
                }
            })
        }
        Mode::KafkaDirect => {
            let bootstrap = args
                .kafka_bootstrap
                .clone()
                .ok_or_else(|| anyhow!("--mode kafka-direct needs --kafka-bootstrap"))?;
            let topic = args.topic.clone().unwrap_or_else(|| key.clone());
            let producer = kafka_producer(&bootstrap)?;
            // Connect and learn the topic's partitions before the clock starts.
            let metadata_producer = producer.clone();
            let t = topic.clone();
            tokio::task::spawn_blocking(move || {
                metadata_producer
                    .client()
                    .fetch_metadata(Some(&t), Duration::from_secs(30))
            })
            .await?
            .with_context(|| format!("cannot reach Kafka at {bootstrap}"))?;
            let (c, a) = (counters.clone(), args.clone());
            tokio::spawn(async move {
                if let Err(e) = kafka_publish(&producer, &topic, &a, &key, &c).await {
                    c.fail(e);
                }
            })
        }
        _ => unreachable!("not a direct mode"),
    };

    let started = Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let duration = match args.duration {
        Some(d) => Some(Duration::from_secs_f64(d)),
        None if args.count.is_none() => Some(Duration::from_secs(10)),
        None => None,
    };
    let snapshot = |c: &Counters| {
        [
            c.published.load(Ordering::Relaxed),
            c.confirmed.load(Ordering::Relaxed),
        ]
    };
    let mut warm: Option<(Instant, [u64; 2])> = warmup.is_zero().then_some((started, [0; 2]));
    let mut last_print = (started, [0u64; 2]);
    let end = loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        let snap = snapshot(&counters);
        if let Some(err) = counters.error.lock().unwrap().clone() {
            bail!("{err}");
        }
        if warm.is_none() && now >= started + warmup {
            warm = Some((now, snap));
        }
        if !args.quiet && now - last_print.0 >= Duration::from_secs(1) {
            let secs = (now - last_print.0).as_secs_f64();
            let rate = |k: usize| (snap[k] - last_print.1[k]) as f64 / secs;
            eprintln!(
                "[{:6.1}s] published {:>12}/s confirmed {:>12}/s",
                (now - started).as_secs_f64(),
                thousands(rate(0)),
                thousands(rate(1))
            );
            last_print = (now, snap);
        }
        let Some((warm_at, _)) = warm else { continue };
        if duration.is_some_and(|d| now >= warm_at + d) || counters.done.load(Ordering::Acquire) {
            break (now, snapshot(&counters));
        }
    };
    counters.stop.store(true, Ordering::Relaxed);
    if tokio::time::timeout(Duration::from_secs(10), publisher)
        .await
        .is_err()
    {
        eprintln!("the publisher did not stop within 10 s");
    }
    let (warm_at, warm_snap) = warm.expect("measuring has started");
    let elapsed = (end.0 - warm_at).as_secs_f64();
    let delta = |k: usize| end.1[k] - warm_snap[k];
    let mut out = Map::new();
    out.insert("mode".into(), json!(args.mode.name()));
    out.insert("size".into(), json!(args.size));
    out.insert("publishers".into(), json!(1));
    out.insert("consumers".into(), json!(0));
    out.insert("persistent".into(), json!(args.persistent));
    out.insert("confirm".into(), json!(args.confirm));
    out.insert("elapsed_s".into(), json!(round(elapsed, 3)));
    out.insert("published".into(), json!(delta(0)));
    out.insert(
        "publish_rate".into(),
        json!(round(delta(0) as f64 / elapsed, 0)),
    );
    out.insert("confirmed".into(), json!(delta(1)));
    out.insert(
        "confirm_rate".into(),
        json!(round(delta(1) as f64 / elapsed, 0)),
    );
    out.insert(
        "nacked".into(),
        json!(counters.nacked.load(Ordering::Relaxed)),
    );
    Ok(out)
}

/// The body every message carries: `size` bytes, the first 8 the send time as in the AMQP runs.
fn body(size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    if size >= 8 {
        b[..8].copy_from_slice(&crate::amqp::now_ns().to_le_bytes());
    }
    b
}

struct Amqp10 {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    sender: Sender,
}

impl Amqp10 {
    async fn open(url: &str, address: &str) -> Result<Amqp10> {
        let profile_url =
            url::Url::parse(url).with_context(|| format!("bad --amqp10-url {url}"))?;
        let mut builder = Connection::builder()
            .container_id(format!("warren-bench-{:08x}", std::process::id()))
            .alt_tls_establishment(true);
        if let Some(host) = profile_url.host_str() {
            builder = builder.hostname(host);
        }
        if !profile_url.username().is_empty() {
            // Only PLAIN: RabbitMQ takes ANONYMOUS as guest.
            builder = builder.sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
                username: profile_url.username().to_string(),
                password: profile_url.password().unwrap_or("").to_string(),
            });
        }
        let mut connection = builder
            .open(profile_url.clone())
            .await
            .with_context(|| format!("cannot open an AMQP 1.0 connection to {url}"))?;
        let mut session = Session::begin(&mut connection)
            .await
            .context("cannot begin an AMQP 1.0 session")?;
        let sender = tokio::time::timeout(
            Duration::from_secs(30),
            Sender::attach(&mut session, "warren-bench-sender", address),
        )
        .await
        .map_err(|_| anyhow!("attaching a sender to {address:?} timed out (does it exist?)"))?
        .with_context(|| format!("cannot attach a sender to {address:?}"))?;
        Ok(Amqp10 {
            connection,
            session,
            sender,
        })
    }

    async fn publish(mut self, args: &RunArgs, key: &str, c: &Counters) -> Result<()> {
        let window = args.confirm as usize;
        let mut outcomes = FuturesUnordered::new();
        let mut sent = 0u64;
        let settle = |r: Result<Outcome, SendError>| -> Result<()> {
            match r {
                Ok(Outcome::Accepted(_)) => {
                    c.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(other) => {
                    c.nacked.fetch_add(1, Ordering::Relaxed);
                    c.confirmed.fetch_add(1, Ordering::Relaxed);
                    if c.nacked.load(Ordering::Relaxed) == 1 {
                        eprintln!("amqp10-direct: a transfer was not accepted: {other:?}");
                    }
                }
                Err(e) => bail!("transfer failed: {e}"),
            }
            Ok(())
        };
        while !c.stop.load(Ordering::Relaxed) {
            // Take the outcomes that are in, then send while the window allows.
            while let Some(Some(r)) = outcomes.next().now_or_never() {
                settle(r)?;
            }
            if args.count.is_some_and(|n| sent >= n) {
                if outcomes.is_empty() {
                    c.done.store(true, Ordering::Release);
                    break;
                }
            } else if outcomes.len() < window {
                let message = AmqpMessage {
                    header: Some(Header {
                        durable: args.persistent,
                        priority: Priority(4),
                        ttl: None,
                        first_acquirer: false,
                        delivery_count: 0,
                    }),
                    delivery_annotations: None,
                    message_annotations: None,
                    properties: Some(Properties {
                        message_id: Some(MessageId::String(format!("bench-{sent}"))),
                        subject: Some(key.to_string()),
                        ..Default::default()
                    }),
                    application_properties: None,
                    body: Data(Binary::from(body(args.size))),
                    footer: None,
                };
                outcomes.push(self.sender.send_batchable(message).await?);
                sent += 1;
                c.published.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The window is full (or everything is sent): wait for an outcome.
            tokio::select! {
                Some(r) = outcomes.next() => settle(r)?,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.sender.close()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.session.end()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connection.close()).await;
        Ok(())
    }
}

/// A producer with the Kafka bridge's settings (see `bridges/src/kafka/mod.rs`).
fn kafka_producer(bootstrap: &str) -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", "warren-bench")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "none")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .context("cannot create the Kafka producer")
}

async fn kafka_publish(
    producer: &FutureProducer,
    topic: &str,
    args: &RunArgs,
    key: &str,
    c: &Counters,
) -> Result<()> {
    let window = args.confirm as usize;
    let mut reports = FuturesUnordered::new();
    let mut sent = 0u64;
    let settle = |r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, _>| match r {
        Ok(Ok(_)) => {
            c.confirmed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Ok(Err((e, _))) => Err(anyhow!("delivery failed: {e}")),
        Err(futures_channel_canceled) => {
            Err(anyhow!("delivery report lost: {futures_channel_canceled}"))
        }
    };
    while !c.stop.load(Ordering::Relaxed) {
        while let Some(Some(r)) = reports.next().now_or_never() {
            settle(r)?;
        }
        if args.count.is_some_and(|n| sent >= n) {
            if reports.is_empty() {
                c.done.store(true, Ordering::Release);
                break;
            }
        } else if reports.len() < window {
            let value = body(args.size);
            match producer.send_result(FutureRecord::to(topic).key(key).payload(&value)) {
                Ok(report) => {
                    reports.push(report);
                    sent += 1;
                    c.published.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {}
                Err((e, _)) => bail!("produce failed: {e}"),
            }
        }
        tokio::select! {
            Some(r) = reports.next() => settle(r)?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let p = producer.clone();
    let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
    Ok(())
}
