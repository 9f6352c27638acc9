//! The `warren` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use warren_config::Settings;
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
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "warren-data")]
    data_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let settings = Settings {
        listen: cli.listen,
        data_dir: Some(cli.data_dir),
        ..Settings::default()
    };
    let server = Server::bind(settings).context("cannot start Warren")?;
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
