//! spur-control: the control plane. It holds each group's configuration as numbered
//! versions, validates every write with spur-config before storing it, persists versions
//! atomically, and streams each new version to the proxies watching the group.
//!
//! - [`api`]: the HTTP handlers of SPEC's control API.
//! - [`store`]: versions and history, persisted under the data directory.
//! - [`watch`]: fan-out of new versions to watching proxies.

pub mod api;
pub mod ca;
pub mod cli;
pub mod store;
pub mod watch;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use spur_config::Config;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use store::{Store, Stored};
use tokio::sync::watch as tokio_watch;

pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// With a token, every `/v1/` call needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// With a CA, `POST /v1/identity/certify` signs workload certificates.
    pub ca: Option<CaOptions>,
}

pub struct CaOptions {
    pub dir: PathBuf,
    pub join_token: String,
    pub trust_domain: String,
    pub ttl: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the control plane knows of one proxy.
#[derive(Clone, Debug, Default)]
struct ProxyStatus {
    applied_version: Option<u64>,
    last_error: Option<String>,
    last_seen: u64,
}

pub struct Metrics {
    registry: Registry,
    pub writes: Counter,
    pub writes_rejected: Counter,
    pub unauthorized: Counter,
    pub watchers: Gauge,
    pub certificates_issued: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let writes = Counter::default();
        registry.register(
            "spur_control_config_writes",
            "Config versions stored",
            writes.clone(),
        );
        let writes_rejected = Counter::default();
        registry.register(
            "spur_control_config_rejected",
            "Writes refused by validation",
            writes_rejected.clone(),
        );
        let unauthorized = Counter::default();
        registry.register(
            "spur_control_unauthorized",
            "Calls refused for a missing or wrong token",
            unauthorized.clone(),
        );
        let watchers = Gauge::default();
        registry.register(
            "spur_control_watchers",
            "Open watch streams",
            watchers.clone(),
        );
        let certificates_issued = Counter::default();
        registry.register(
            "spur_control_certificates_issued",
            "Workload certificates signed by the mesh CA",
            certificates_issued.clone(),
        );
        Metrics {
            registry,
            writes,
            writes_rejected,
            unauthorized,
            watchers,
            certificates_issued,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

pub struct Control {
    pub store: Store,
    pub token: Option<String>,
    /// The mesh CA and the join token that proxies present to it.
    pub ca: Option<(ca::MeshCa, String)>,
    pub metrics: Metrics,
    /// Serializes writes, so version numbers and read-modify-writes never interleave.
    pub write_lock: tokio::sync::Mutex<()>,
    channels: Mutex<HashMap<String, tokio_watch::Sender<Option<Arc<Stored>>>>>,
    proxies: Mutex<BTreeMap<(String, String), ProxyStatus>>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Control {
    pub fn new(store: Store, token: Option<String>) -> Control {
        Control {
            store,
            token,
            ca: None,
            metrics: Metrics::new(),
            write_lock: tokio::sync::Mutex::new(()),
            channels: Mutex::new(HashMap::new()),
            proxies: Mutex::new(BTreeMap::new()),
        }
    }

    /// A receiver of the group's newest version (created on first use).
    pub fn subscribe(&self, group: &str) -> tokio_watch::Receiver<Option<Arc<Stored>>> {
        let mut channels = self.channels.lock().unwrap();
        channels
            .entry(group.to_string())
            .or_insert_with(|| tokio_watch::channel(self.store.current(group)).0)
            .subscribe()
    }

    /// Stores a validated config as the next version and announces it.
    pub async fn commit(
        &self,
        group: &str,
        action: String,
        cfg: Config,
    ) -> http::Response<api::Body> {
        let _write = self.write_lock.lock().await;
        self.commit_locked(group, action, cfg)
    }

    /// [`Control::commit`] for a caller that already holds the write lock.
    pub fn commit_locked(
        &self,
        group: &str,
        action: String,
        cfg: Config,
    ) -> http::Response<api::Body> {
        match self.store.append(group, action, cfg) {
            Ok(stored) => {
                self.metrics.writes.inc();
                let version = stored.version;
                let mut channels = self.channels.lock().unwrap();
                let tx = channels
                    .entry(group.to_string())
                    .or_insert_with(|| tokio_watch::channel(None).0);
                tx.send_replace(Some(stored));
                tracing::info!(group, version, "config stored");
                api::error_free(json!({ "version": version }))
            }
            Err(e) => {
                tracing::error!(group, error = %e, "cannot store config");
                api::error(http::StatusCode::INTERNAL_SERVER_ERROR, "", e.to_string())
            }
        }
    }

    pub fn record_seen(&self, group: &str, node: &str) {
        let mut p = self.proxies.lock().unwrap();
        let e = p.entry((group.to_string(), node.to_string())).or_default();
        e.last_seen = now_secs();
    }

    pub fn record_status(
        &self,
        group: &str,
        node: &str,
        applied: Option<u64>,
        error: Option<String>,
    ) {
        let mut p = self.proxies.lock().unwrap();
        let e = p.entry((group.to_string(), node.to_string())).or_default();
        if applied.is_some() {
            e.applied_version = applied;
        }
        e.last_error = error;
        e.last_seen = now_secs();
    }

    pub fn proxies_doc(&self) -> Value {
        let p = self.proxies.lock().unwrap();
        Value::Array(
            p.iter()
                .map(|((group, node), s)| {
                    json!({
                        "node": node,
                        "group": group,
                        "applied_version": s.applied_version,
                        "last_error": s.last_error,
                        "last_seen": s.last_seen,
                    })
                })
                .collect(),
        )
    }
}

/// A running control plane.
pub struct ControlHandle {
    pub addr: SocketAddr,
    pub control: Arc<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlHandle {
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens the store, binds the API and serves it in the background.
pub async fn start(opts: Options) -> Result<ControlHandle, StartError> {
    let store = Store::open(&opts.data_dir)?;
    let mut control = Control::new(store, opts.token);
    if let Some(c) = opts.ca {
        control.ca = Some((
            ca::MeshCa::open(&c.dir, &c.trust_domain, c.ttl)?,
            c.join_token,
        ));
    }
    let control = Arc::new(control);
    let tcp = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: opts.listen,
            source,
        })?;
    let addr = tcp.local_addr().map_err(|source| StartError::Bind {
        addr: opts.listen,
        source,
    })?;
    let c = control.clone();
    // Connections live in a JoinSet owned by the accept loop: stopping the control plane
    // (aborting that task) closes every open connection and watch stream with it.
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let stream = tokio::select! {
                accepted = tcp.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let c = c.clone();
            conns.spawn(async move {
                let svc = service_fn(move |req| {
                    let c = c.clone();
                    async move { Ok::<_, std::convert::Infallible>(api::route(c, req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(ControlHandle {
        addr,
        control,
        task,
    })
}
