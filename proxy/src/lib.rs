//! spur-proxy: the data plane.
//!
//! Deciding:
//! - [`policy`]: pure decisions, each a small module (routes, flags, splits, balancers,
//!   breaker, health, retries, budgets, correlation IDs).
//! - [`http::plan`]: what to do with one request, from the snapshot and its head; no I/O.
//! - [`reason`]: every answer Spur makes itself, with its status and label.
//! - [`grpc`]: gRPC statuses, deadlines and trailers-only answers.
//! - [`authorize`]: a listener's authorization policy ([`policy::authz`]) with its
//!   counters, enforced by the plan (requests) and the tcp relay (connections);
//!   [`ratelimit`]: rate limits ([`policy::ratelimit`]) with their counters and group
//!   shares ([`group_share`]: demand reports and shares over the control plane's stream).
//!
//! Doing:
//! - [`http`]: the HTTP request path: plan, then [`http::tries`], then [`http::respond`];
//!   [`exchange`]: its access log line and request metrics; [`mirror`]: copies of requests.
//! - [`attempt`]: one try at one endpoint, for HTTP and TCP alike (slot, pick, record).
//! - [`upstream`]: connections to endpoints (the per-endpoint pool, TLS origination, the
//!   request body sent upstream); [`quic`]: HTTP/3 listeners and upstreams.
//! - [`adapters`]: listeners (http, tcp, TLS), the TCP relay, DNS refresh, health checks,
//!   the admin server, idle timers.
//! - [`tls`]: TLS and mutual TLS: certificate files, SPIFFE identities, verifiers.
//! - [`trace`]: trace context in and out (W3C, B3), spans, and their OTLP export.
//!
//! State:
//! - [`snapshot`]: a config compiled for the request path (by `compile`), swapped atomically.
//! - [`endpoint`]: per-endpoint state that outlives snapshots; [`registry`]: where it and
//!   the other long-lived state (connectors, limits, budgets) are kept and pruned.
//! - [`metrics`]: Prometheus series; [`access`] and [`log`]: the access log and logging.
//! - [`Proxy`]: starts, reconfigures ([`Proxy::apply`]) and stops all of it.
//! - [`reload`]: where new configs come from: the control plane, or a watched file;
//!   [`control_client`]: the HTTP(S) client for the control plane; [`report`]: the status
//!   reports with traffic summaries; [`tap`]: sampled requests for the console.
//! - [`workers`]: the runtime, one current-thread worker per core with its own listening
//!   sockets; [`footprint`]: giving idle memory back; [`process_metrics`]: the process's
//!   CPU, memory and descriptors as metrics.
//! - [`upgrade`]: a new binary takes over the listening sockets, then this one drains.
//! - Also: [`body`] (bodies from any transport), [`headers`] (hop-by-hop hygiene),
//!   [`clock`] (the request path's clock), [`cli`], [`echo`] (the demo's backend).

pub mod access;
pub mod adapters;
pub mod alloc;
pub mod attempt;
pub mod authorize;
pub mod body;
pub mod cli;
pub mod clock;
mod compile;
pub mod control_client;
pub mod echo;
pub mod endpoint;
pub mod exchange;
pub mod footprint;
pub mod group_share;
pub mod grpc;
pub mod headers;
pub mod http;
pub mod log;
pub mod metrics;
pub mod mirror;
pub mod policy;
pub mod process_metrics;
pub mod quic;
pub mod ratelimit;
pub mod reason;
pub mod registry;
pub mod reload;
pub mod report;
pub mod snapshot;
pub mod tap;
pub mod tls;
pub mod trace;
pub mod upgrade;
pub mod upstream;
pub mod workers;

use arc_swap::ArcSwap;
use metrics::Metrics;
use registry::Registry;
use snapshot::Snapshot;
use spur_config::Config;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// Bounds mirrored copies in flight (see [`mirror`]).
    pub mirror_slots: Arc<tokio::sync::Semaphore>,
    /// The certificate from the mesh CA that `tls` blocks naming no files use; set once,
    /// before the first config ([`Proxy::set_identity`]).
    pub identity: OnceLock<Arc<tls::WorkloadIdentity>>,
    /// The runtimes listeners accept on (see [`workers`]).
    pub workers: workers::Workers,
    /// Requests sampled for the console while the control plane asks (see [`tap`]).
    pub tap: tap::Tap,
    /// Set once a new process has taken over the listening sockets ([`upgrade`]): clients
    /// keep coming to the same address, so a draining HTTP/1.1 connection is closed after
    /// its next response (`Connection: close`) rather than at once, when the client may
    /// already be sending on it.
    pub handed_over: AtomicBool,
}

/// Why a config was not applied. The proxy keeps serving its previous config.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid config:\n{0}")]
    Invalid(#[from] spur_config::ConfigError),
    #[error("cannot apply config: {0}")]
    Compile(#[from] snapshot::CompileError),
    #[error("{name} cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
}

/// The error of [`Proxy::start`]: the same reasons as a rejected config.
pub type StartError = ApplyError;

/// A listener's running accept loop.
struct ListenerTask {
    /// UDP (`http3`) or TCP: a listener that changes transport is bound anew.
    udp: bool,
    /// The configured address (port 0 stays 0).
    listen: SocketAddr,
    stop: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Its sockets, for an upgrade; emptied when it stops accepting, so that a retired
    /// listener's port is released.
    handover: Vec<OwnedFd>,
    /// An http3 listener's endpoint: an upgrade closes its connections at once.
    quic: Option<quinn::Endpoint>,
}

impl ListenerTask {
    /// Stops accepting; with `drain`, its connections are asked to finish. Its handles for
    /// an upgrade go, so that nothing here keeps its socket open.
    fn retire(&mut self, drain: bool) {
        let _ = self.stop.send(true);
        if drain {
            let _ = self.drain.send(true);
        }
        self.handover.clear();
        self.quic = None;
    }
}

struct AdminTask {
    listen: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Its socket, for an upgrade.
    handover: Option<OwnedFd>,
}

#[derive(Default)]
struct Running {
    listeners: HashMap<String, ListenerTask>,
    /// Tasks of removed or moved listeners, still finishing their connections.
    retired: Vec<ListenerTask>,
    admin: Option<AdminTask>,
    /// Set by [`Proxy::pin_admin`] (`--admin`): configs do not move the admin server.
    admin_pinned: bool,
    /// Sockets received from the process this one upgrades (see [`upgrade`]).
    inherited: upgrade::Inherited,
}

/// A running proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Serializes applies; holds the listener tasks.
    running: tokio::sync::Mutex<Running>,
    addrs: Mutex<HashMap<String, SocketAddr>>,
    admin_addr: Mutex<Option<SocketAddr>>,
}

impl Proxy {
    /// Validates and applies `cfg` as version 0, binds every listener and the admin server,
    /// and starts serving. Listening on port 0 picks a free port: see
    /// [`Proxy::listener_addr`].
    pub async fn start(cfg: Config) -> Result<Proxy, ApplyError> {
        let proxy = Proxy::idle()?;
        proxy.apply(cfg, 0).await?;
        Ok(proxy)
    }

    /// A proxy with no config yet: nothing listens and `/ready` would say no. Used when the
    /// first config comes from the control plane. Its listeners accept on the current
    /// runtime (see [`Proxy::idle_on`]).
    pub fn idle() -> Result<Proxy, ApplyError> {
        let workers = workers::Workers::current().expect("a proxy is made inside a tokio runtime");
        Proxy::idle_on(workers)
    }

    /// [`Proxy::idle`], accepting on these workers (`spur proxy`: one per core).
    pub fn idle_on(workers: workers::Workers) -> Result<Proxy, ApplyError> {
        let registry = Registry::default();
        let metrics = Metrics::new();
        let snapshot =
            Snapshot::compile(Arc::new(Config::default()), 0, &registry, &metrics, None)?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            metrics,
            ready: AtomicBool::new(false),
            dash: "-".into(),
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(mirror::MAX_IN_FLIGHT)),
            identity: OnceLock::new(),
            workers,
            tap: tap::Tap::default(),
            handed_over: AtomicBool::new(false),
        });
        spawn_sweeper(&shared);
        footprint::spawn_trimmer();
        Ok(Proxy {
            shared,
            running: tokio::sync::Mutex::new(Running::default()),
            addrs: Mutex::new(HashMap::new()),
            admin_addr: Mutex::new(None),
        })
    }

    /// Applies a new config without a restart: validate, compile, bind what is new, swap the
    /// snapshot, then start new listeners and retire removed or moved ones (they stop
    /// accepting; a removed listener's connections drain). On any error nothing changes.
    pub async fn apply(&self, cfg: Config, version: u64) -> Result<(), ApplyError> {
        self.apply_with(cfg, version, spur_config::Rules::default())
            .await
    }

    /// [`Proxy::apply`] for a config pushed by the control plane. It was validated there
    /// against what the user wrote and then rendered: `k8s:` clusters arrive as endpoint
    /// lists, an empty one for a service with no ready endpoint (see [`spur_config::Rules`]).
    pub async fn apply_pushed(&self, cfg: Config, version: u64) -> Result<(), ApplyError> {
        let rules = spur_config::Rules {
            rendered: true,
            ..Default::default()
        };
        self.apply_with(cfg, version, rules).await
    }

    async fn apply_with(
        &self,
        cfg: Config,
        version: u64,
        rules: spur_config::Rules,
    ) -> Result<(), ApplyError> {
        let result = self.try_apply(cfg, version, rules).await;
        let outcome = if result.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        self.shared.metrics.count_update(outcome);
        match &result {
            Ok(()) => tracing::info!(version, "config applied"),
            Err(e) => {
                tracing::warn!(version, error = %e, "config rejected; the previous one stays")
            }
        }
        result
    }

    async fn try_apply(
        &self,
        cfg: Config,
        version: u64,
        rules: spur_config::Rules,
    ) -> Result<(), ApplyError> {
        spur_config::validate_with(&cfg, rules)?;
        if let Some(n) = cfg
            .workers
            .filter(|n| *n as usize != self.shared.workers.len())
        {
            tracing::warn!(
                configured = n,
                running = self.shared.workers.len(),
                "workers changes at the next start (or spur proxy --upgrade)"
            );
        }
        let mut running = self.running.lock().await;
        let old = self.shared.snapshot.load_full();
        let snap = Snapshot::compile(
            Arc::new(cfg),
            version,
            &self.shared.registry,
            &self.shared.metrics,
            self.shared.identity.get(),
        )?;
        snap.carry_over_from(&old);
        // Bind everything new before touching anything, so a taken port rejects the whole
        // config and the old one keeps serving.
        let fresh = bind_listeners(&running, &snap, self.shared.workers.len()).await?;
        let admin = bind_admin(&running, &snap).await?;
        // First DNS answers for clusters that have none yet, before any request can see
        // them (one after another, each bounded by its own timeout).
        for c in snap.clusters.values() {
            if c.dns.is_some() && c.members.load().endpoints.is_empty() {
                adapters::dns::refresh(&self.shared, c).await;
            }
        }

        // The listeners' addresses change with the version: whoever sees the new version
        // ([`Proxy::version`]) finds its listeners in [`Proxy::listener_addr`].
        {
            let mut addrs = self.addrs.lock().unwrap();
            for bound in &fresh {
                addrs.insert(bound.name.to_string(), bound.addr);
            }
            addrs.retain(|name, _| snap.listeners.contains_key(name.as_str()));
        }

        // Swap: from here on, new requests see the new config; then what it no longer uses
        // goes.
        let snap = Arc::new(snap);
        self.shared.snapshot.store(snap.clone());
        snap.settle();
        self.shared.registry.prune(&snap, &self.shared.metrics);
        self.shared.metrics.config_version.set(version as i64);
        start_background(&self.shared, &snap).await;
        self.start_listeners(&mut running, &snap, fresh);
        self.retire_removed(&mut running, &snap);
        self.switch_admin(&mut running, admin)?;
        self.shared.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Starts the accept loops of newly bound listeners; a listener that moved to another
    /// address retires its old socket.
    fn start_listeners(
        &self,
        running: &mut Running,
        snap: &Snapshot,
        fresh: Vec<adapters::listener::Bound>,
    ) {
        for mut bound in fresh {
            let name = bound.name.to_string();
            let (stop, stop_rx) = watch::channel(false);
            let (drain, drain_rx) = watch::channel(false);
            let addr = bound.addr;
            tracing::info!(listener = name.as_str(), addr = %addr, "listening");
            let handover = std::mem::take(&mut bound.handover);
            let quic = match &bound.socket {
                adapters::listener::Socket::Quic(endpoint) => Some(endpoint.clone()),
                adapters::listener::Socket::Tcp(_) => None,
            };
            let task = tokio::spawn(adapters::listener::serve(
                self.shared.clone(),
                bound,
                stop_rx,
                drain_rx,
            ));
            let task = ListenerTask {
                udp: snap.listeners[&name].is_udp(),
                listen: snap.listeners[&name].listen,
                stop,
                drain,
                task,
                handover,
                quic,
            };
            if let Some(mut old) = running.listeners.insert(name.clone(), task) {
                // Moved: the old socket stops accepting; its connections carry on. A QUIC
                // socket also carries its connections, so an http3 listener's are drained
                // (GOAWAY): the old port is released once they are done.
                let udp = old.udp;
                old.retire(udp);
                running.retired.push(old);
            }
        }
    }

    /// Listeners the config no longer has stop accepting and drain their connections.
    fn retire_removed(&self, running: &mut Running, snap: &Snapshot) {
        let removed: Vec<String> = running
            .listeners
            .keys()
            .filter(|n| !snap.listeners.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(mut old) = running.listeners.remove(&name) {
                tracing::info!(listener = name.as_str(), "listener removed: draining");
                old.retire(true);
                running.retired.push(old);
            }
        }
        running.retired.retain(|t| !t.task.is_finished());
    }

    /// Moves the admin server to its newly bound socket, or stops it when the config has
    /// no `admin` (unless `--admin` pinned it).
    fn switch_admin(&self, running: &mut Running, admin: AdminChange) -> Result<(), ApplyError> {
        match admin {
            AdminChange::Keep => {}
            AdminChange::Stop => {
                if let Some(old) = running.admin.take() {
                    let _ = old.stop.send(true);
                    *self.admin_addr.lock().unwrap() = None;
                }
            }
            AdminChange::Move(listen, tcp) => {
                if let Some(old) = running.admin.take() {
                    let _ = old.stop.send(true);
                }
                let addr = tcp.local_addr().map_err(|source| ApplyError::Bind {
                    name: "admin".into(),
                    addr: listen.clone(),
                    source,
                })?;
                let (stop, stop_rx) = watch::channel(false);
                tracing::info!(addr = %addr, "admin listening");
                let handover = dup_fd(&tcp);
                let task = tokio::spawn(adapters::admin::serve(self.shared.clone(), tcp, stop_rx));
                running.admin = Some(AdminTask {
                    listen,
                    stop,
                    task,
                    handover,
                });
                *self.admin_addr.lock().unwrap() = Some(addr);
            }
        }
        Ok(())
    }

    /// Starts the admin server at `listen` now, before any config, and keeps it there
    /// (`spur proxy --admin`): probes can reach `/live` and `/ready` while the first config
    /// is still on its way from the control plane.
    pub async fn pin_admin(&self, listen: &str) -> Result<SocketAddr, ApplyError> {
        let mut running = self.running.lock().await;
        let bind_err = |source| ApplyError::Bind {
            name: "admin".into(),
            addr: listen.to_string(),
            source,
        };
        let tcp = admin_socket(&running.inherited, listen)
            .await
            .map_err(bind_err)?;
        let addr = tcp.local_addr().map_err(bind_err)?;
        if let Some(old) = running.admin.take() {
            let _ = old.stop.send(true);
        }
        let (stop, stop_rx) = watch::channel(false);
        tracing::info!(addr = %addr, "admin listening");
        let handover = dup_fd(&tcp);
        let task = tokio::spawn(adapters::admin::serve(self.shared.clone(), tcp, stop_rx));
        running.admin = Some(AdminTask {
            listen: listen.to_string(),
            stop,
            task,
            handover,
        });
        running.admin_pinned = true;
        *self.admin_addr.lock().unwrap() = Some(addr);
        Ok(addr)
    }

    /// Gives the proxy its workload identity (`--identity`): `tls` blocks that name no files
    /// present its certificate and trust the mesh CA. Set it before applying a config that
    /// needs it; it cannot be replaced afterwards (it renews itself), so a second call
    /// answers the identity back as an error.
    pub fn set_identity(
        &self,
        identity: Arc<tls::WorkloadIdentity>,
    ) -> Result<(), Arc<tls::WorkloadIdentity>> {
        self.shared.identity.set(identity)
    }

    /// The proxy's workload identity, when it has one.
    pub fn identity(&self) -> Option<&Arc<tls::WorkloadIdentity>> {
        self.shared.identity.get()
    }

    /// The version of the config being served.
    pub fn version(&self) -> u64 {
        self.shared.snapshot.load().version
    }

    /// The bound address of a listener (useful when the config asked for port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.lock().unwrap().get(name).copied()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *self.admin_addr.lock().unwrap()
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish for at most the
    /// config's `drain_timeout`, then return.
    pub async fn shutdown(&self) {
        self.shared.ready.store(false, Ordering::Release);
        let mut running = self.running.lock().await;
        let mut tasks = Vec::new();
        for (_, t) in running.listeners.drain() {
            tasks.push(t);
        }
        tasks.append(&mut running.retired);
        for t in &tasks {
            let _ = t.stop.send(true);
            let _ = t.drain.send(true);
        }
        for t in tasks {
            let _ = t.task.await;
        }
        if let Some(admin) = running.admin.take() {
            let _ = admin.stop.send(true);
            let _ = admin.task.await;
        }
    }
}

/// What a config does to the admin server.
enum AdminChange {
    Keep,
    Stop,
    /// To this address, already bound.
    Move(String, tokio::net::TcpListener),
}

/// Binds the listeners that are new or moved in `snap` (not yet serving), one TCP socket per
/// worker.
async fn bind_listeners(
    running: &Running,
    snap: &Snapshot,
    workers: usize,
) -> Result<Vec<adapters::listener::Bound>, ApplyError> {
    let mut names: Vec<&String> = snap.listeners.keys().collect();
    names.sort();
    let mut fresh = Vec::new();
    for name in names {
        let lst = &snap.listeners[name];
        let unchanged = running
            .listeners
            .get(name)
            .is_some_and(|t| t.listen == lst.listen && t.udp == lst.is_udp());
        if unchanged {
            continue;
        }
        let bound = adapters::listener::bind(lst, workers, &running.inherited)
            .await
            .map_err(|source| ApplyError::Bind {
                name: format!("listener `{name}`"),
                addr: lst.listen.to_string(),
                source,
            })?;
        fresh.push(bound);
    }
    Ok(fresh)
}

/// Binds the admin server's new address, if the config moves it.
async fn bind_admin(running: &Running, snap: &Snapshot) -> Result<AdminChange, ApplyError> {
    let listen = snap
        .config
        .admin
        .as_ref()
        .map(|a| a.listen.text().to_string());
    if running.admin_pinned {
        let pinned = running
            .admin
            .as_ref()
            .map(|a| a.listen.clone())
            .unwrap_or_default();
        if listen.as_ref().is_some_and(|l| *l != pinned) {
            return Err(ApplyError::Compile(snapshot::CompileError {
                path: "admin.listen".into(),
                message: format!("this proxy's admin server is fixed by --admin at {pinned}; leave admin out or use the same address"),
            }));
        }
        return Ok(AdminChange::Keep);
    }
    let Some(listen) = listen else {
        return Ok(AdminChange::Stop);
    };
    if running.admin.as_ref().map(|a| &a.listen) == Some(&listen) {
        return Ok(AdminChange::Keep);
    }
    let tcp = admin_socket(&running.inherited, &listen)
        .await
        .map_err(|source| ApplyError::Bind {
            name: "admin".into(),
            addr: listen.clone(),
            source,
        })?;
    Ok(AdminChange::Move(listen, tcp))
}

/// The admin server's socket at `listen`: the one inherited in an upgrade, else a new one.
async fn admin_socket(
    inherited: &upgrade::Inherited,
    listen: &str,
) -> std::io::Result<tokio::net::TcpListener> {
    let parsed = listen.parse::<SocketAddr>().ok();
    if let Some(socket) = parsed.map(|a| inherited.admin(a)).transpose()?.flatten() {
        socket.set_nonblocking(true)?;
        return tokio::net::TcpListener::from_std(socket);
    }
    tokio::net::TcpListener::bind(listen).await
}

/// A duplicate of a listening socket, kept for an upgrade (`None` if the process is out of
/// descriptors: that socket is then bound anew by the next process, or refused).
fn dup_fd(socket: &impl std::os::fd::AsFd) -> Option<OwnedFd> {
    socket.as_fd().try_clone_to_owned().ok()
}

/// Every few seconds, removes the metric series of endpoints that have left every cluster
/// and whose last request has ended. Holds the proxy's state weakly: it ends with it.
fn spawn_sweeper(shared: &Arc<Shared>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(shared);
    handle.spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let Some(shared) = weak.upgrade() else { return };
            shared.registry.sweep(&shared.metrics);
        }
    });
}

/// Starts what a snapshot needs besides requests: DNS refreshes and health checks.
async fn start_background(shared: &Arc<Shared>, snap: &Snapshot) {
    for cluster in snap.clusters.values() {
        if cluster.dns.is_some() {
            adapters::dns::spawn(shared.clone(), cluster);
        }
        adapters::health::spawn(shared.clone(), cluster);
    }
}
