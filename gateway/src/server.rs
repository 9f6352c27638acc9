//! Accepting connections and shutting down cleanly.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use warren_backends::engine::VHost;
use warren_backends::store::{Store, StoreOptions};
use warren_config::Settings;

use crate::connection::{self, Shared};
use crate::routes::RoutingPlan;
use warren_backends::embedded::spawn_queue_mapping;

/// RabbitMQ's port.
pub const DEFAULT_PORT: u16 = 5672;

/// A bound server, ready to run.
pub struct Server {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    store: Option<Arc<Store>>,
}

/// A server running on its own task (tests, embedding).
pub struct ServerHandle {
    addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Closes every connection with 320 CONNECTION_FORCED and waits for the server to stop.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Separate IPv4 and IPv6 listeners, as RabbitMQ's default listeners are.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl Server {
    /// Binds the configured addresses, or port 5672 on every IPv4 and IPv6 address.
    pub fn bind(settings: Settings) -> std::io::Result<Server> {
        Self::bind_with_plan(settings, RoutingPlan::default())
    }

    /// Like `bind`, with configured routes to bridged backends and queue mappings.
    pub fn bind_with_plan(settings: Settings, plan: RoutingPlan) -> std::io::Result<Server> {
        let mut listeners = Vec::new();
        if settings.listen.is_empty() {
            listeners.push(listener(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                DEFAULT_PORT,
            )))?);
            match listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT))) {
                Ok(l) => listeners.push(l),
                Err(err) => warn!(%err, "no IPv6 listener; serving IPv4 only"),
            }
        } else {
            for addr in &settings.listen {
                listeners.push(listener(*addr)?);
            }
        }
        let (vhost, store) = match &settings.data_dir {
            Some(dir) => {
                let options = StoreOptions {
                    segment_bytes: settings.storage.segment_bytes,
                    queue_memory_messages: settings.storage.queue_memory_messages,
                    queue_memory_bytes: settings.storage.queue_memory_bytes,
                };
                let store = Store::open(dir, options)?;
                info!(data_dir = %dir.display(), "opening the message store");
                (VHost::with_store("/", store.clone())?, Some(store))
            }
            None => (VHost::new("/"), None),
        };
        for mapping in &plan.mappings {
            vhost.declare_mapped_queue(&mapping.name);
        }
        let shared = Arc::new(Shared {
            settings,
            vhost,
            plan: Arc::new(plan),
        });
        Ok(Server {
            listeners,
            shared,
            store,
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` turns true, then closes every connection and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        for addr in self.local_addrs() {
            info!(%addr, "listening for AMQP 0-9-1");
        }
        let mut pumps = Vec::new();
        for mapping in &self.shared.plan.mappings {
            if let Some(queue) = self.shared.vhost.queue_by_name(&mapping.name) {
                info!(queue = %mapping.name, backend = mapping.backend.name(), source = %mapping.source, "queue mapping");
                pumps.push(spawn_queue_mapping(
                    queue,
                    mapping.backend.clone(),
                    mapping.source.clone(),
                    mapping.prefetch,
                ));
            }
        }
        let next_id = Arc::new(AtomicU64::new(1));
        let mut connections = JoinSet::new();
        let mut acceptors = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel(1024);
        for l in self.listeners {
            let tx = conn_tx.clone();
            acceptors.spawn(async move {
                loop {
                    match l.accept().await {
                        Ok(pair) => {
                            if tx.send(pair).await.is_err() {
                                return;
                            }
                        }
                        Err(err) => {
                            // EMFILE and friends: back off instead of spinning.
                            error!(%err, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        drop(conn_tx);
        loop {
            tokio::select! {
                accepted = conn_rx.recv() => {
                    let Some((stream, peer)) = accepted else { break };
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(connection::serve(stream, peer, id, self.shared.clone(), shutdown.clone()));
                }
                _ = shutdown.changed() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        acceptors.abort_all();
        info!(connections = connections.len(), "shutting down");
        while connections.join_next().await.is_some() {}
        for pump in pumps {
            pump.abort();
        }
        for backend in &self.shared.plan.backends {
            backend.close().await;
        }
        if let Some(store) = &self.store {
            store.close();
        }
    }

    /// Runs on a task of its own; for tests and embedding.
    pub fn spawn(self) -> ServerHandle {
        let addrs = self.local_addrs();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(self.run(rx));
        ServerHandle {
            addrs,
            shutdown: tx,
            task,
        }
    }
}
