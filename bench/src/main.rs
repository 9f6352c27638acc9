//! `warren-bench`: an AMQP 0-9-1 load generator that is never the bottleneck.
//!
//! It speaks the protocol over raw tokio sockets: publishes are pre-built frames written in big
//! batches, server frames are split without allocating, and only setup goes through the full
//! codec. `--sink` runs it against an in-process null server to show what it can push.
//!
//! ```text
//! warren-bench --uri amqp://guest:guest@127.0.0.1:5672 --size 16 --duration 10
//! warren-bench --mode publish-only --persistent --confirm 1000 --count 1000000
//! warren-bench --mode consume-only --drain --ack-every 100 --prefetch 1000
//! warren-bench --rate 10000 --duration 10          # latency p50/p99/p99.9
//! warren-bench --sink --size 16 --duration 5       # the tool's own ceiling
//! warren-bench report results.jsonl                # medians per scenario and broker
//! # a bridge's target, with the bridge's client library (compare with a run through Warren):
//! warren-bench --mode amqp10-direct --amqp10-url amqp://guest:guest@127.0.0.1:5672 \
//!     --address /amq/queue/q --confirm 1000
//! warren-bench --mode kafka-direct --kafka-bootstrap 127.0.0.1:9092 --topic t --confirm 1000
//! ```

mod amqp;
mod direct;
mod report;
mod run;
mod sink;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use crate::amqp::Target;

#[derive(Parser, Debug)]
#[command(
    name = "warren-bench",
    version,
    about = "AMQP 0-9-1 load generator for Warren and RabbitMQ",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Medians per scenario and broker from `--json` runs, as a Markdown table.
    Report(report::ReportArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Publishers and consumers at once.
    #[value(alias = "e2e")]
    EndToEnd,
    /// Publishers only (the queue fills).
    #[value(alias = "publish")]
    PublishOnly,
    /// Consumers only (e.g. `--drain` a queue filled before).
    #[value(alias = "consume")]
    ConsumeOnly,
    /// Open `--connections` connections and hold them idle for `--duration`.
    Idle,
    /// Purge the run's queues.
    Purge,
    /// Delete the run's queues.
    Delete,
    /// Publish straight to an AMQP 1.0 peer with fe2o3-amqp, as the amqp10 bridge does
    /// (`--amqp10-url`, `--address`, `--confirm WINDOW` unsettled transfers at most).
    Amqp10Direct,
    /// Produce straight to Kafka with rdkafka and the kafka bridge's producer settings
    /// (`--kafka-bootstrap`, `--topic`, `--confirm WINDOW` records awaiting their report).
    KafkaDirect,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::EndToEnd => "end-to-end",
            Mode::PublishOnly => "publish-only",
            Mode::ConsumeOnly => "consume-only",
            Mode::Idle => "idle",
            Mode::Purge => "purge",
            Mode::Delete => "delete",
            Mode::Amqp10Direct => "amqp10-direct",
            Mode::KafkaDirect => "kafka-direct",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Broker URI: amqp://user:pass@host:port/vhost (vhost `/` is %2F or empty).
    #[arg(
        long,
        env = "WARREN_BENCH_URI",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2F"
    )]
    pub uri: String,
    /// host:port, overriding the URI's.
    #[arg(long)]
    pub addr: Option<String>,
    #[arg(long, value_enum, default_value = "end-to-end")]
    pub mode: Mode,
    /// Publish to an in-process null server instead of a broker: the tool's own ceiling.
    #[arg(long)]
    pub sink: bool,
    /// Message body size in bytes (the first 8 carry the send time when it is at least 8).
    #[arg(long, default_value_t = 16)]
    pub size: usize,
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Number of queues; publisher i and consumer i use queue i mod N.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Queues are named PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "warren-bench")]
    pub queue_prefix: String,
    /// Persistent messages (delivery-mode 2) to durable queues.
    #[arg(long)]
    pub persistent: bool,
    /// Publisher confirms with at most WINDOW unconfirmed messages per publisher (0: off).
    #[arg(long, value_name = "WINDOW", default_value_t = 0)]
    pub confirm: u64,
    /// Consumers ack (multiple) every N messages; 0 consumes with no-ack.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub ack_every: u64,
    /// basic.qos prefetch count per consumer (0: no basic.qos).
    #[arg(long, default_value_t = 0)]
    pub prefetch: u16,
    /// Total publish rate in msg/s, spread over the publishers (0: as fast as possible).
    /// With consumers, latency percentiles are reported.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Measured seconds (after --warmup). Default 10, or unlimited with --count or --drain.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds run before measuring starts.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Messages to publish in all (end-to-end: to consume); the run ends there.
    #[arg(long)]
    pub count: Option<u64>,
    /// consume-only: end once the messages the queues held at the start are consumed.
    #[arg(long)]
    pub drain: bool,
    /// Do not purge the queues before publishing.
    #[arg(long)]
    pub no_purge: bool,
    /// Delete the queues at the end.
    #[arg(long)]
    pub delete_after: bool,
    /// Bytes of pre-built publishes written per socket write.
    #[arg(long, default_value_t = 256 * 1024)]
    pub batch_bytes: usize,
    /// idle mode: connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// idle mode: file written once every connection is open.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// KEY=VALUE added to the JSON output (repeatable), e.g. scenario=S1 broker=warren.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// amqp10-direct: the peer, amqp://user:pass@host:port (PLAIN with a user, else ANONYMOUS).
    #[arg(long, value_name = "URL")]
    pub amqp10_url: Option<String>,
    /// amqp10-direct: the target address (default `/amq/queue/PREFIX-0`, RabbitMQ's plugin).
    #[arg(long)]
    pub address: Option<String>,
    /// kafka-direct: bootstrap servers, host:port[,host:port...].
    #[arg(long, value_name = "HOST:PORT")]
    pub kafka_bootstrap: Option<String>,
    /// kafka-direct: the topic (default PREFIX-0); the record key is PREFIX-0.
    #[arg(long)]
    pub topic: Option<String>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Report(args)) = &cli.command {
        return report::report(args);
    }
    let args = cli.run;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut target = Target::from_uri(&args.uri)?;
        if let Some(addr) = &args.addr {
            target.addr = addr.clone();
        }
        match args.mode {
            Mode::Idle => run::idle(&args, target).await,
            Mode::Purge | Mode::Delete => run::admin(&args, target).await,
            Mode::Amqp10Direct | Mode::KafkaDirect => direct::run(&args).await,
            _ => run::throughput(&args, target).await,
        }
    });
    // Tasks blocked on sockets must not keep the process alive.
    runtime.shutdown_background();
    let result = result?;
    let mut out = Map::new();
    for tag in &args.tags {
        let Some((k, v)) = tag.split_once('=') else {
            bail!("--tag wants KEY=VALUE, got {tag:?}");
        };
        out.insert(k.to_string(), json!(v));
    }
    out.extend(result);
    if args.json {
        println!("{}", Value::Object(out));
    } else {
        print_summary(&out);
    }
    Ok(())
}

fn print_summary(out: &Map<String, Value>) {
    for (k, v) in out {
        let shown = match v.as_f64() {
            Some(x) if k.ends_with("_rate") => format!("{} msg/s", run::thousands(x)),
            Some(x) if k.ends_with("_us") => format!("{} µs", run::thousands(x)),
            _ => match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        };
        println!("{k:>16}: {shown}");
    }
}
