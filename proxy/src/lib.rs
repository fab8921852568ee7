//! spur-proxy: the data plane.
//!
//! - [`policy`]: pure decisions (routing, splits, load balancing, correlation IDs).
//! - [`snapshot`]: a config compiled for the request path, swapped atomically.
//! - [`endpoint`]: per-endpoint state that outlives snapshots.
//! - [`forward`]: the HTTP request path, phase by phase; [`exchange`]: its log and metrics.
//! - [`adapters`]: listeners (http, tcp), the admin server.
//! - [`Proxy`]: starts and stops all of it.

pub mod access;
pub mod adapters;
pub mod cli;
pub mod echo;
pub mod endpoint;
pub mod exchange;
pub mod forward;
pub mod headers;
pub mod log;
pub mod metrics;
pub mod policy;
pub mod snapshot;
pub mod upstream;

use arc_swap::ArcSwap;
use endpoint::Registry;
use metrics::Metrics;
use snapshot::Snapshot;
use spur_config::Config;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// State shared by every listener and request of one proxy.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    pub metrics: Metrics,
    /// True once a config is applied and its listeners are bound.
    pub ready: AtomicBool,
    /// The `-` label, shared so that an unrouted request allocates nothing.
    pub dash: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config:\n{0}")]
    Invalid(#[from] spur_config::ConfigError),
    #[error("cannot apply config: {0}")]
    Compile(#[from] snapshot::CompileError),
    #[error("listener `{name}` cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
}

/// Starts what a snapshot needs besides requests: the first DNS answers (awaited, so
/// traffic does not start against empty clusters), DNS refreshes and health checks.
async fn start_background(shared: &Arc<Shared>, snap: &Snapshot) {
    for cluster in snap.clusters.values() {
        if cluster.dns.is_some() {
            adapters::dns::refresh(shared, cluster).await;
            adapters::dns::spawn(shared.clone(), cluster);
        }
        adapters::health::spawn(shared.clone(), cluster);
    }
}

/// A running proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    addrs: HashMap<String, SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl Proxy {
    /// Validates and applies `cfg`, binds every listener and the admin server, and starts
    /// serving. Listening on port 0 picks a free port: see [`Proxy::listener_addr`].
    pub async fn start(cfg: Config) -> Result<Proxy, StartError> {
        spur_config::validate(&cfg)?;
        let registry = Registry::default();
        let snapshot = Snapshot::compile(Arc::new(cfg), 0, &registry)?;
        let metrics = Metrics::new();
        metrics.config_version.set(0);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            metrics,
            ready: AtomicBool::new(false),
            dash: "-".into(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let snap = shared.snapshot.load_full();
        start_background(&shared, &snap).await;

        let admin = match &snap.config.admin {
            Some(a) => {
                let tcp = tokio::net::TcpListener::bind(&a.listen)
                    .await
                    .map_err(|source| StartError::Bind {
                        name: "admin".into(),
                        addr: a.listen.clone(),
                        source,
                    })?;
                Some(tcp)
            }
            None => None,
        };
        let mut names: Vec<&String> = snap.listeners.keys().collect();
        names.sort();
        let mut bound = Vec::new();
        for name in names {
            let lst = &snap.listeners[name];
            let b = adapters::listener::bind(lst)
                .await
                .map_err(|source| StartError::Bind {
                    name: name.clone(),
                    addr: lst.listen.to_string(),
                    source,
                })?;
            bound.push(b);
        }

        let mut tasks = Vec::new();
        let mut addrs = HashMap::new();
        for b in bound {
            tracing::info!(listener = &*b.name, addr = %b.addr, "listening");
            addrs.insert(b.name.to_string(), b.addr);
            tasks.push(tokio::spawn(adapters::listener::serve(
                shared.clone(),
                b,
                shutdown_rx.clone(),
            )));
        }
        let admin_addr = match admin {
            Some(tcp) => {
                let addr = tcp.local_addr().ok();
                if let Some(a) = addr {
                    tracing::info!(addr = %a, "admin listening");
                }
                tasks.push(tokio::spawn(adapters::admin::serve(
                    shared.clone(),
                    tcp,
                    shutdown_rx.clone(),
                )));
                addr
            }
            None => None,
        };
        shared
            .metrics
            .config_updates
            .get_or_create(&metrics::ResultLabels { result: "applied" })
            .inc();
        shared.ready.store(true, Ordering::Release);
        Ok(Proxy {
            shared,
            shutdown,
            tasks,
            addrs,
            admin_addr,
        })
    }

    /// The bound address of a listener (useful when the config asked for port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.get(name).copied()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish for at most the
    /// config's `drain_timeout`, then return.
    pub async fn shutdown(self) {
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
