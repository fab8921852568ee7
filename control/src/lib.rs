//! spur-control: the control plane. It holds each group's configuration as numbered
//! versions, validates every write with spur-config before storing it, persists versions
//! atomically, and streams each new version to the proxies watching the group.
//!
//! - [`api`]: the HTTP handlers of SPEC's control API.
//! - [`store`]: versions and history, in the data directory or in Kubernetes
//!   (`--store kubernetes`, several replicas); [`leader`]: which replica does the work that
//!   must happen once, and [`lead`] that work.
//! - [`watch`]: fan-out of new versions to watching proxies.
//! - [`group_limits`]: shares of group-wide rate limits, from the proxies' demand.
//! - [`k8s`]: Kubernetes discovery (`--kubernetes`): `k8s:` clusters filled from
//!   EndpointSlices, each change a new version.
//! - [`mesh`]: the mesh without YAML (`--kubernetes --mesh`): every group's config
//!   rendered from Services, EndpointSlices, Pods and Gateway API routes.
//! - [`traffic`]: the proxies' traffic reports as time series, and tap (sampled requests);
//!   [`console`]: the web console at `/ui`.
//! - [`rollout`]: canary rollouts driven through their steps, judged on that traffic.

pub mod api;
pub mod ca;
pub mod ca_secret;
pub mod certify;
pub mod cli;
mod commit;
pub mod console;
pub mod group_limits;
pub mod join;
pub mod k8s;
pub mod lead;
pub mod leader;
pub mod mesh;
pub mod proxies;
pub mod rollout;
// The process metrics of the data plane's collector (one source file, no dependency on
// spur-proxy for it).
#[path = "../../proxy/src/process_metrics.rs"]
mod process_metrics;
pub mod serve;
pub mod shared_proxies;
pub mod store;
pub mod tls;
pub mod token_review;
pub mod traffic;
pub mod watch;

use k8s_openapi::api::coordination::v1::Lease;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, Stored};
use tokio::sync::watch as tokio_watch;

/// Where the control plane keeps its state (`--store`).
#[derive(Clone, Debug, Default)]
pub enum StoreOptions {
    /// `--store dir` (the default): files under [`Options::data_dir`]; one process.
    #[default]
    Dir,
    /// `--store kubernetes`: objects in the cluster; several replicas may run at once.
    Kubernetes(KubeStoreOptions),
}

/// `--store kubernetes [--namespace NS] [--kubeconfig PATH] [--lease-duration D]`.
#[derive(Clone, Debug)]
pub struct KubeStoreOptions {
    /// Without it: the kubeconfig's namespace, or the pod's own.
    pub namespace: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// The leader Lease's duration: how long a dead leader's work waits for another.
    pub lease_duration: Duration,
}

impl Default for KubeStoreOptions {
    fn default() -> KubeStoreOptions {
        KubeStoreOptions {
            namespace: None,
            kubeconfig: None,
            lease_duration: leader::DEFAULT_LEASE,
        }
    }
}

/// How the control plane runs. `Options { listen, data_dir, ..Default::default() }` takes
/// the defaults of `spur control` for the rest.
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `--store`: the data directory (default) or Kubernetes.
    pub store: StoreOptions,
    /// With a token, every `/v1/` call needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// With a CA, `POST /v1/identity/certify` signs workload certificates.
    pub ca: Option<CaOptions>,
    /// With it, `k8s:` clusters are accepted and filled from the Kubernetes API.
    pub kubernetes: Option<k8s::KubernetesOptions>,
    /// With it (and `kubernetes`), every group's config is rendered from the cluster.
    pub mesh: Option<mesh::MeshOptions>,
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
            store: StoreOptions::Dir,
            token: None,
            ca: None,
            kubernetes: None,
            mesh: None,
            forget_proxies_after: proxies::DEFAULT_FORGET_AFTER,
            limits: serve::Limits::default(),
        }
    }
}

/// The mesh CA (`--ca-dir`; with `--store kubernetes`, the Secret `spur-mesh-ca`). What proves an identity to it: join tokens, and with
/// [`Options::kubernetes`] also service-account tokens (TokenReview).
/// `CaOptions { dir, join_token, trust_domain, ttl, ..Default::default() }` is the old
/// `--join-token-file` form.
pub struct CaOptions {
    /// Where the CA's key is with `--store dir` (unused with `--store kubernetes`).
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
    /// The mesh (`--mesh`): groups rendered from the cluster.
    pub mesh: Option<Arc<mesh::Mesh>>,
    pub metrics: Metrics,
    /// Serializes this replica's writes; other replicas' writes are told apart by the
    /// store ([`StoreError::Conflict`]).
    pub write_lock: tokio::sync::Mutex<()>,
    /// Whether this replica is the leader ([`leader`]); always with `--store dir`.
    pub leader: Arc<leader::Leadership>,
    /// What each proxy reported, for `GET /v1/proxies`.
    pub proxies: Arc<proxies::Proxies>,
    /// What the other replicas' proxies reported (`--store kubernetes`).
    pub shared_proxies: shared_proxies::Shared,
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
        let rollouts = rollout::Rollouts::default();
        Control {
            rollouts,
            store,
            token,
            ca: None,
            discovery: None,
            mesh: None,
            metrics: Metrics::new(&proxies),
            write_lock: tokio::sync::Mutex::new(()),
            leader: leader::Leadership::always(),
            shared_proxies: shared_proxies::Shared::default(),
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

    /// A receiver of the group's newest version, whichever replica wrote it.
    pub fn subscribe(&self, group: &str) -> tokio_watch::Receiver<Option<Arc<Stored>>> {
        self.store.subscribe(group)
    }
}

impl Control {
    /// The group's rendered mesh as it is now, for checking a write in mesh mode: its
    /// current version's, else what a group without pods gets.
    pub fn mesh_for(&self, group: &str) -> Option<Arc<spur_config::Config>> {
        let mesh = self.mesh.as_ref()?;
        self.store
            .current(group)
            .and_then(|c| c.mesh.clone())
            .or_else(|| mesh.last_outbound())
    }

    /// Checks a config a user writes to `group`: under [`Control::rules`]; in mesh mode,
    /// merged over the group's rendered mesh, as its proxies will receive it (the user's
    /// listeners and clusters come first, so their field paths are the user's).
    pub fn check(
        &self,
        group: &str,
        cfg: &spur_config::Config,
    ) -> Result<(), Vec<spur_config::FieldError>> {
        let Some(mesh) = self.mesh_for(group) else {
            return spur_config::validate_with(cfg, self.rules()).map_err(|e| e.errors);
        };
        let merged = mesh::merge::merge(&mesh, cfg);
        let rules = spur_config::Rules {
            rendered: true,
            ..self.rules()
        };
        spur_config::validate_with(&merged, rules).map_err(|e| e.errors)
    }
}

/// A running control plane.
pub struct ControlHandle {
    pub addr: SocketAddr,
    pub control: Arc<Control>,
    task: tokio::task::JoinHandle<()>,
    discovery: Option<tokio::task::JoinHandle<()>>,
    mesh: Option<tokio::task::JoinHandle<()>>,
    /// Computes group rate-limit shares every second.
    shares: tokio::task::JoinHandle<()>,
    /// Starts and stops the leader's work as leadership comes and goes.
    lead: tokio::task::JoinHandle<()>,
    /// Leader election (`--store kubernetes`), and what [`ControlHandle::shutdown`] gives up.
    election: Option<(tokio::task::JoinHandle<()>, kube::Api<Lease>, String)>,
    /// Publishes this replica's proxies to the others (`--store kubernetes`).
    publish: Option<tokio::task::JoinHandle<()>>,
}

impl ControlHandle {
    pub fn stop(&self) {
        self.task.abort();
        self.shares.abort();
        self.lead.abort();
        if let Some(d) = &self.discovery {
            d.abort();
        }
        if let Some((e, _, _)) = &self.election {
            e.abort();
        }
        if let Some(p) = &self.publish {
            p.abort();
        }
    }

    /// A clean stop: [`ControlHandle::stop`], then the leader gives up its Lease so another
    /// replica takes over at once instead of after the lease duration.
    pub async fn shutdown(&self) {
        self.stop();
        if let Some((_, api, identity)) = &self.election {
            leader::release(api, identity).await;
        }
        if let Some(m) = &self.mesh {
            m.abort();
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

/// A client for the Kubernetes API when the store or discovery needs one.
async fn kube_client(opts: &Options) -> Result<Option<kube::Client>, StartError> {
    let kubeconfig = match (&opts.store, &opts.kubernetes) {
        (StoreOptions::Kubernetes(k), _) if k.kubeconfig.is_some() => k.kubeconfig.clone(),
        (_, Some(k)) => k.kubeconfig.clone(),
        (StoreOptions::Kubernetes(_), None) => None,
        (StoreOptions::Dir, None) => return Ok(None),
    };
    let k = k8s::KubernetesOptions { kubeconfig };
    Ok(Some(k8s::client(&k).await.map_err(StartError::Kubernetes)?))
}

/// The Lease API and the namespace of the Kubernetes store.
type LeaseIn = (kube::Api<Lease>, String);

/// The store and (with Kubernetes) the Lease API and namespace.
fn open_store(
    opts: &Options,
    client: Option<&kube::Client>,
) -> Result<(Store, Option<LeaseIn>), StartError> {
    match (&opts.store, client) {
        (StoreOptions::Kubernetes(k), Some(client)) => {
            let ns = k
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            let store = store::kube::open(client.clone(), &ns);
            tracing::info!(namespace = ns.as_str(), "store: Kubernetes");
            Ok((
                store,
                Some((kube::Api::namespaced(client.clone(), &ns), ns)),
            ))
        }
        _ => Ok((Store::open(&opts.data_dir)?, None)),
    }
}

/// [`start`]; with `tls`, the API is served over HTTPS only.
pub async fn start_with_tls(
    opts: Options,
    tls: Option<Arc<tls::ApiTls>>,
) -> Result<ControlHandle, StartError> {
    let client = kube_client(&opts).await?;
    let (store, lease) = open_store(&opts, client.as_ref())?;
    let mut control = Control::with_proxies(
        store,
        opts.token,
        proxies::Proxies::new(opts.forget_proxies_after),
    );
    if lease.is_some() {
        control.leader = leader::Leadership::elected();
    }
    let discovery_client = client.clone().filter(|_| opts.kubernetes.is_some());
    if let Some(c) = opts.ca {
        let ca = match (&lease, &client) {
            (Some((_, ns)), Some(client)) => {
                ca_secret::open(client.clone(), ns, &c.trust_domain, c.ttl).await?
            }
            _ => ca::MeshCa::open(&c.dir, &c.trust_domain, c.ttl)?,
        };
        control.ca = Some(authority(c, ca, discovery_client.clone()));
    }

    let mut mesh_writers = None;
    if let (Some(m), Some(_)) = (&opts.mesh, &discovery_client) {
        let (mesh, writers) = mesh::Mesh::new(m);
        control.mesh = Some(Arc::new(mesh));
        mesh_writers = Some(writers);
    }
    let kubernetes = match discovery_client {
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
    let election = lease.map(|(api, _)| {
        let identity = leader::identity();
        let duration = match &opts.store {
            StoreOptions::Kubernetes(k) => k.lease_duration,
            StoreOptions::Dir => leader::DEFAULT_LEASE,
        };
        let run = leader::run(
            api.clone(),
            identity.clone(),
            duration,
            control.leader.clone(),
        );
        (tokio::spawn(run), api, identity)
    });
    let mesh = match (&kubernetes, mesh_writers) {
        (Some((client, _)), Some(w)) => {
            Some(tokio::spawn(mesh::run(control.clone(), client.clone(), w)))
        }
        _ => None,
    };
    let discovery =
        kubernetes.map(|(client, writer)| tokio::spawn(k8s::run(control.clone(), client, writer)));
    let task = tokio::spawn(serve::accept_loop(tcp, control.clone(), tls, opts.limits));
    let shares = group_limits::spawn(control.group_limits.clone());
    let lead = tokio::spawn(lead::run(control.clone()));
    let publish = election.as_ref().map(|(_, _, identity)| {
        tokio::spawn(shared_proxies::run(control.clone(), identity.clone()))
    });
    Ok(ControlHandle {
        publish,
        shares,
        addr,
        control,
        task,
        discovery,
        lead,
        election,
        mesh,
    })
}

/// The mesh CA with its credentials: join tokens, and service-account tokens when the
/// control plane talks to Kubernetes.
fn authority(c: CaOptions, ca: ca::MeshCa, kube: Option<kube::Client>) -> certify::Authority {
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
    certify::Authority {
        ca,
        join_tokens,
        reviewer,
    }
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
