//! spur-control: the control plane. It holds each group's configuration as numbered
//! versions, validates every write with spur-config before storing it, persists versions
//! atomically, and streams each new version to the proxies watching the group.
//!
//! - [`api`]: the HTTP handlers of SPEC's control API.
//! - [`store`]: versions and history, persisted under the data directory.
//! - [`watch`]: fan-out of new versions to watching proxies.
//! - [`group_limits`]: shares of group-wide rate limits, from the proxies' demand.
//! - [`k8s`]: Kubernetes discovery (`--kubernetes`): `k8s:` clusters filled from
//!   EndpointSlices, each change a new version.
//! - [`traffic`]: the proxies' traffic reports as time series, and tap (sampled requests);
//!   [`console`]: the web console at `/ui`.
//! - [`rollout`]: canary rollouts driven through their steps, judged on that traffic.

pub mod api;
pub mod ca;
pub mod certify;
pub mod cli;
pub mod console;
pub mod group_limits;
pub mod join;
pub mod k8s;
pub mod proxies;
pub mod rollout;
// The process metrics of the data plane's collector (one source file, no dependency on
// spur-proxy for it).
#[path = "../../proxy/src/process_metrics.rs"]
mod process_metrics;
pub mod serve;
pub mod store;
pub mod tls;
pub mod token_review;
pub mod traffic;
pub mod watch;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use spur_config::Config;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Store, Stored};
use tokio::sync::watch as tokio_watch;

/// How the control plane runs. `Options { listen, data_dir, ..Default::default() }` takes
/// the defaults of `spur control` for the rest.
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// With a token, every `/v1/` call needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// With a CA, `POST /v1/identity/certify` signs workload certificates.
    pub ca: Option<CaOptions>,
    /// With it, `k8s:` clusters are accepted and filled from the Kubernetes API.
    pub kubernetes: Option<k8s::KubernetesOptions>,
    /// A proxy with no watch stream open is dropped from `GET /v1/proxies` after this long
    /// without a word (`--forget-proxies-after`).
    pub forget_proxies_after: Duration,
    /// Timeouts and the connection cap of the API (`--max-connections`).
    pub limits: serve::Limits,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("spur-data"),
            token: None,
            ca: None,
            kubernetes: None,
            forget_proxies_after: proxies::DEFAULT_FORGET_AFTER,
            limits: serve::Limits::default(),
        }
    }
}

/// The mesh CA (`--ca-dir`). What proves an identity to it: join tokens, and with
/// [`Options::kubernetes`] also service-account tokens (TokenReview).
/// `CaOptions { dir, join_token, trust_domain, ttl, ..Default::default() }` is the old
/// `--join-token-file` form.
pub struct CaOptions {
    pub dir: PathBuf,
    /// The `--join-token-file` token, which may obtain any identity of the trust domain
    /// (`spiffe://TD/*`; a warning at start says so). Empty: none.
    pub join_token: String,
    pub trust_domain: String,
    pub ttl: Duration,
    /// `--join-tokens FILE`: tokens bound to identity patterns.
    pub join_tokens: Vec<join::JoinToken>,
}

impl Default for CaOptions {
    fn default() -> CaOptions {
        CaOptions {
            dir: PathBuf::from("spur-data/ca"),
            join_token: String::new(),
            trust_domain: "cluster.local".into(),
            ttl: Duration::from_secs(24 * 3600),
            join_tokens: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("{0}")]
    Kubernetes(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Metrics {
    registry: Registry,
    pub writes: Counter,
    pub writes_rejected: Counter,
    pub unauthorized: Counter,
    pub watchers: Gauge,
    pub certificates_issued: Counter,
    pub certify_forbidden: Counter,
    pub k8s_watch_errors: Counter,
    pub k8s_versions: Counter,
    pub k8s_synced: Gauge,
    pub connections: Gauge,
    pub connections_rejected: Counter,
    pub tap_lines: Counter,
    pub tap_lines_over_rate: Counter,
    pub rollout_step: Family<rollout::RolloutLabels, Gauge>,
    pub rollout_verdicts: Family<rollout::VerdictLabels, Counter>,
}

impl Metrics {
    fn new(proxies: &Arc<proxies::Proxies>) -> Metrics {
        let mut registry = Registry::default();
        process_metrics::register(&mut registry);
        registry.register_collector(Box::new(proxies::CertificateExpiry(proxies.clone())));
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
        let certify_forbidden = Counter::default();
        registry.register(
            "spur_control_certify_forbidden",
            "Certificate requests refused: the credential does not cover the identity asked for",
            certify_forbidden.clone(),
        );
        let k8s_watch_errors = Counter::default();
        registry.register(
            "spur_control_k8s_watch_errors",
            "Failed lists and watches of EndpointSlices (each retried with backoff)",
            k8s_watch_errors.clone(),
        );
        let k8s_versions = Counter::default();
        registry.register(
            "spur_control_k8s_discovery_versions",
            "Versions made because discovered endpoints changed",
            k8s_versions.clone(),
        );
        let k8s_synced = Gauge::default();
        registry.register(
            "spur_control_k8s_synced",
            "1 once the EndpointSlices have been listed (Kubernetes discovery)",
            k8s_synced.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "spur_control_connections",
            "Open connections to the control API",
            connections.clone(),
        );
        let connections_rejected = Counter::default();
        registry.register(
            "spur_control_connections_rejected",
            "Connections closed at accept: --max-connections were open",
            connections_rejected.clone(),
        );
        let tap_lines = Counter::default();
        registry.register(
            "spur_control_tap_lines",
            "Tap lines taken from proxies and streamed to watchers",
            tap_lines.clone(),
        );
        let tap_lines_over_rate = Counter::default();
        registry.register(
            "spur_control_tap_lines_over_rate",
            "Tap lines dropped: their proxy sent more than 100 a second",
            tap_lines_over_rate.clone(),
        );
        let rollout_step = Family::default();
        registry.register(
            "spur_control_rollout_step",
            "The step a rollout is at (1-based; 0 before it starts)",
            rollout_step.clone(),
        );
        let rollout_verdicts = Family::default();
        registry.register(
            "spur_control_rollout_verdicts",
            "Verdicts on rollout steps, by result (pass, fail)",
            rollout_verdicts.clone(),
        );
        Metrics {
            rollout_step,
            rollout_verdicts,
            registry,
            writes,
            writes_rejected,
            unauthorized,
            watchers,
            certificates_issued,
            certify_forbidden,
            k8s_watch_errors,
            k8s_versions,
            k8s_synced,
            connections,
            connections_rejected,
            tap_lines,
            tap_lines_over_rate,
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
    /// The mesh CA and what proves an identity to it.
    pub ca: Option<certify::Authority>,
    /// Kubernetes discovery (`--kubernetes`): accepts `k8s:` clusters and fills them.
    pub discovery: Option<Arc<k8s::Discovery>>,
    pub metrics: Metrics,
    /// Serializes writes, so version numbers and read-modify-writes never interleave.
    pub write_lock: tokio::sync::Mutex<()>,
    channels: Mutex<HashMap<String, tokio_watch::Sender<Option<Arc<Stored>>>>>,
    /// What each proxy reported, for `GET /v1/proxies`.
    pub proxies: Arc<proxies::Proxies>,
    /// Request bodies parsed at once, off the request threads ([`api`]).
    pub parse_slots: tokio::sync::Semaphore,
    /// Demand and shares of `scope: group` rate limits ([`group_limits`]).
    pub group_limits: Arc<group_limits::GroupLimits>,
    /// The proxies' traffic reports, and tap.
    pub traffic: traffic::Traffic,
    /// Rollouts' states; [`rollout::driver::run`] drives the running ones.
    pub rollouts: rollout::Rollouts,
}

impl Control {
    pub fn new(store: Store, token: Option<String>) -> Control {
        Control::with_proxies(
            store,
            token,
            proxies::Proxies::new(proxies::DEFAULT_FORGET_AFTER),
        )
    }

    /// [`Control::new`] with this record of proxies (`--forget-proxies-after`).
    pub fn with_proxies(
        store: Store,
        token: Option<String>,
        proxies: Arc<proxies::Proxies>,
    ) -> Control {
        let rollouts = rollout::Rollouts::load(&store);
        let metrics = Metrics::new(&proxies);
        rollouts.publish(&metrics);
        Control {
            rollouts,
            store,
            token,
            ca: None,
            discovery: None,
            metrics,
            write_lock: tokio::sync::Mutex::new(()),
            channels: Mutex::new(HashMap::new()),
            proxies,
            parse_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
            group_limits: Arc::default(),
            traffic: traffic::Traffic::default(),
        }
    }

    /// The validation rules of configs written to this control plane.
    pub fn rules(&self) -> spur_config::Rules {
        spur_config::Rules {
            k8s_discovery: self.discovery.is_some(),
            rendered: false,
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
        let previous = self.store.current(group);
        let discovered = self.discovered_for(&cfg, previous.as_deref());
        match self.store_locked(group, action, cfg, discovered) {
            Ok(stored) => api::error_free(json!({ "version": stored.version })),
            Err(e) => api::error(http::StatusCode::INTERNAL_SERVER_ERROR, "", e.to_string()),
        }
    }

    /// Stores a version and announces it to the group's watchers (write lock held).
    fn store_locked(
        &self,
        group: &str,
        action: String,
        cfg: Config,
        discovered: k8s::Discovered,
    ) -> Result<Arc<Stored>, store::StoreError> {
        match self.store.append(group, action, cfg, discovered) {
            Ok(stored) => {
                self.metrics.writes.inc();
                let version = stored.version;
                let action = stored.action.clone();
                let mut channels = self.channels.lock().unwrap();
                let tx = channels
                    .entry(group.to_string())
                    .or_insert_with(|| tokio_watch::channel(None).0);
                tx.send_replace(Some(stored.clone()));
                tracing::info!(group, version, action, "config stored");
                Ok(stored)
            }
            Err(e) => {
                tracing::error!(group, error = %e, "cannot store config");
                Err(e)
            }
        }
    }

    /// The endpoints a new version of `cfg` is made with: what discovery knows now; before
    /// its first complete list (or without discovery), the previous version's endpoints of
    /// the targets it still has, so a restart or a broken API never empties a cluster.
    fn discovered_for(&self, cfg: &Config, previous: Option<&Stored>) -> k8s::Discovered {
        let targets = k8s::targets(cfg);
        if targets.is_empty() {
            return k8s::Discovered::new();
        }
        if let Some(found) = self.discovery.as_ref().and_then(|d| d.lookup(&targets)) {
            return found;
        }
        let Some(previous) = previous else {
            return k8s::Discovered::new();
        };
        targets
            .iter()
            .filter_map(|t| {
                let key = t.to_string();
                let eps = previous.discovered.get(&key)?.clone();
                Some((key, eps))
            })
            .collect()
    }

    /// Makes a new version of every group whose discovered endpoints differ from its current
    /// version's: the same user config, the new endpoints, a history note saying what
    /// changed. Nothing happens before discovery's first complete list.
    pub async fn refresh_discovery(&self) {
        let Some(discovery) = &self.discovery else {
            return;
        };
        let _write = self.write_lock.lock().await;
        let Some(slices) = discovery.snapshot() else {
            return;
        };
        for group in self.store.groups() {
            let Some(current) = self.store.current(&group) else {
                continue;
            };
            let targets = k8s::targets(&current.config);
            if targets.is_empty() && current.discovered.is_empty() {
                continue;
            }
            let found = slices.lookup(&targets);
            if found == current.discovered {
                continue;
            }
            let action = k8s::describe_change(&current.discovered, &found);
            // A failed write is logged by store_locked; the next change tries again.
            if self
                .store_locked(&group, action, current.config.clone(), found)
                .is_ok()
            {
                self.metrics.k8s_versions.inc();
            }
        }
    }
}

/// A running control plane.
pub struct ControlHandle {
    pub addr: SocketAddr,
    pub control: Arc<Control>,
    task: tokio::task::JoinHandle<()>,
    discovery: Option<tokio::task::JoinHandle<()>>,
    /// Computes group rate-limit shares every second.
    shares: tokio::task::JoinHandle<()>,
    /// Drives running rollouts.
    rollouts: tokio::task::JoinHandle<()>,
}

impl ControlHandle {
    pub fn stop(&self) {
        self.task.abort();
        self.shares.abort();
        self.rollouts.abort();
        if let Some(d) = &self.discovery {
            d.abort();
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens the store, binds the API and serves it (plain HTTP) in the background.
pub async fn start(opts: Options) -> Result<ControlHandle, StartError> {
    start_with_tls(opts, None).await
}

/// [`start`]; with `tls`, the API is served over HTTPS only.
pub async fn start_with_tls(
    opts: Options,
    tls: Option<Arc<tls::ApiTls>>,
) -> Result<ControlHandle, StartError> {
    let store = Store::open(&opts.data_dir)?;
    let mut control = Control::with_proxies(
        store,
        opts.token,
        proxies::Proxies::new(opts.forget_proxies_after),
    );
    let client = match &opts.kubernetes {
        Some(k) => Some(k8s::client(k).await.map_err(StartError::Kubernetes)?),
        None => None,
    };
    if let Some(c) = opts.ca {
        control.ca = Some(authority(c, client.clone())?);
    }
    let kubernetes = match client {
        Some(client) => {
            let (discovery, writer) = k8s::Discovery::new();
            control.discovery = Some(Arc::new(discovery));
            Some((client, writer))
        }
        None => {
            warn_of_k8s_clusters(&control.store);
            None
        }
    };
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
    let discovery =
        kubernetes.map(|(client, writer)| tokio::spawn(k8s::run(control.clone(), client, writer)));
    let task = tokio::spawn(serve::accept_loop(tcp, control.clone(), tls, opts.limits));
    let shares = group_limits::spawn(control.group_limits.clone());
    let rollouts = tokio::spawn(rollout::driver::run(control.clone()));
    Ok(ControlHandle {
        rollouts,
        shares,
        addr,
        control,
        task,
        discovery,
    })
}

/// The mesh CA with its credentials: join tokens, and service-account tokens when the
/// control plane talks to Kubernetes.
fn authority(c: CaOptions, kube: Option<kube::Client>) -> Result<certify::Authority, StartError> {
    let ca = ca::MeshCa::open(&c.dir, &c.trust_domain, c.ttl)?;
    let mut join_tokens = c.join_tokens;
    if !c.join_token.is_empty() {
        tracing::warn!(
            trust_domain = c.trust_domain.as_str(),
            "the --join-token-file token may obtain any identity of the trust domain (spiffe://{}/*): \
             whoever holds it can be every workload; bind tokens to identities with --join-tokens FILE",
            c.trust_domain
        );
        join_tokens.push(join::JoinToken::new(
            c.join_token,
            join::Pattern::any(&c.trust_domain),
        ));
    }
    let reviewer = kube.map(token_review::Reviewer::new);
    tracing::info!(
        trust_domain = c.trust_domain.as_str(),
        join_tokens = join_tokens.len(),
        service_accounts = reviewer.is_some(),
        "mesh CA ready"
    );
    Ok(certify::Authority {
        ca,
        join_tokens,
        reviewer,
    })
}

/// Without `--kubernetes`, groups whose config has `k8s:` clusters keep the endpoints they
/// were last stored with, and new writes with such clusters are refused: say so at start.
fn warn_of_k8s_clusters(store: &Store) {
    for group in store.groups() {
        if let Some(current) = store.current(&group) {
            if !k8s::targets(&current.config).is_empty() {
                tracing::warn!(
                    group,
                    "this group has k8s clusters but the control plane runs without --kubernetes: its endpoints stay as last discovered"
                );
            }
        }
    }
}
