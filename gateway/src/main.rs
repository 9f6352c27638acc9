//! The `warren` binary.
//!
//! `warren` runs the embedded broker; `warren --config FILE` adds the routes, bridged backends
//! and queue mappings of a YAML file; `warren check --config FILE` validates a file and prints
//! its effective routing table.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use warren_config::Settings;
use warren_gateway::plan::build_plan;
use warren_gateway::routes::RoutingPlan;
use warren_gateway::Server;

#[derive(Parser, Debug)]
#[command(
    name = "warren",
    version,
    about = "Warren: an AMQP 0-9-1 broker and messaging gateway"
)]
struct Cli {
    /// Address to listen on (repeatable, or comma-separated in WARREN_LISTEN). Default: port 5672
    /// on every IPv4 and IPv6 address.
    #[arg(long, env = "WARREN_LISTEN", value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    /// Directory for durable definitions and persistent messages.
    #[arg(long, env = "WARREN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The user clients log in as (default guest). As in RabbitMQ, only `guest` is limited to
    /// loopback connections.
    #[arg(long, env = "WARREN_DEFAULT_USER", default_value = "guest")]
    default_user: String,
    /// That user's password (default guest).
    #[arg(
        long,
        env = "WARREN_DEFAULT_PASS",
        default_value = "guest",
        hide_env_values = true
    )]
    default_pass: String,
    /// YAML configuration: backends, routes, queue mappings.
    #[arg(long, env = "WARREN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file and print its effective routing table.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

/// mimalloc instead of glibc's malloc: glibc gives threads arenas of their own and keeps what a
/// thread freed in the arena it came from, so a queue filled on one worker thread and refilled
/// from another grew the process by a queue's size each time (measured: 1M queued 16 B messages
/// took 140 MB, then 223 MB on the next fill after deleting the queue; with a single arena,
/// 154 then 185 MB). mimalloc reuses freed memory across threads and packs small objects in
/// tighter size classes: 130 MB, fill after fill.
///
/// libmimalloc-sys's `override` feature also makes C `malloc`/`free` mimalloc's, so librdkafka,
/// which allocates each message on the producing thread and frees it on the delivery-report
/// thread, no longer goes through glibc's per-thread caches (about 30% less CPU per forwarded
/// Kafka message, README B1).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in the bundled mimalloc v3's `mi_option_e`.
const MI_OPTION_ARENA_EAGER_COMMIT: std::os::raw::c_int = 4;

/// mimalloc commits arena memory eagerly on Linux by default, which made every byte of a
/// connection's 64 KiB read and 16 KiB write buffers resident from the start: 87 KiB of RSS per
/// idle connection instead of 14. The default must change before mimalloc's first allocation,
/// which happens before `main`, so this runs from `.preinit_array`, ahead of every constructor.
/// With C `malloc` overridden, the loader and libc could allocate before that too; they do not
/// (under gdb the first call into mimalloc is its own constructor, and `MIMALLOC_VERBOSE=1`
/// prints `arena_eager_commit: 0`), and M1 (memory per idle connection) checks it.
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still overrides it.
extern "C" fn tune_allocator() {
    // SAFETY: mi_option_set_default only stores a value in mimalloc's static option table.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".preinit_array"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Check { config }) = &cli.command {
        return match warren_config::load(config) {
            Ok(cfg) => {
                print!("{}", warren_config::routing_table(&cfg));
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("warren: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let (mut settings, plan) = match &cli.config {
        Some(path) => {
            let cfg = warren_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let settings = cfg.settings().map_err(|e| anyhow::anyhow!("{e}"))?;
            let plan = build_plan(&cfg, warren_bridges::build).map_err(anyhow::Error::msg)?;
            (settings, plan)
        }
        None => (Settings::default(), RoutingPlan::default()),
    };
    // Command-line and environment settings win over the file.
    settings.default_user = warren_config::DefaultUser {
        loopback_only: cli.default_user == "guest",
        username: cli.default_user,
        password: cli.default_pass,
    };
    if !cli.listen.is_empty() {
        settings.listen = cli.listen;
    }
    settings.data_dir = Some(
        cli.data_dir
            .or(settings.data_dir)
            .unwrap_or_else(|| PathBuf::from(warren_config::DEFAULT_DATA_DIR)),
    );
    let server = Server::bind_with_plan(settings, plan).context("cannot start Warren")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, closing connections");
        let _ = tx.send(true);
    });
    server.run(rx).await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
