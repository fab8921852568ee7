//! Where state lives between snapshots: endpoint state (with its connections and metric
//! series), each cluster's connector, concurrency limits and retry budgets.
//!
//! Compiling a snapshot asks the registry for each of these and gets the existing one when
//! its settings are unchanged, so a config push keeps pools, load figures and breakers.
//! Nothing is removed while compiling: a config that is then rejected (a port taken, say)
//! leaves everything as it was. Once a snapshot is serving, [`Registry::prune`] keeps only
//! what it uses; endpoint state goes when the last request holding it ends, and its metric
//! series with it (see [`Registry::sweep`]).

use crate::endpoint::{ClusterLimits, EndpointMetrics, EndpointState};
use crate::metrics::Metrics;
use crate::policy::budget::Budget;
use crate::snapshot::Snapshot;
use crate::tls::ClientTlsRt;
use crate::upstream::{HttpConnector, Upstream};
use spur_config::UpstreamProtocol;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The settings that shape a cluster's connections; a change of any makes a new connector
/// (and connections made with the old settings are not reused).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ClientKey {
    pub cluster: String,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub tls: Option<spur_config::ClientTls>,
    pub fallback: Option<UpstreamProtocol>,
    pub fallback_period: Duration,
}

/// A cluster's upstream and the TLS it originates with (`None`: plain).
pub type Client = (Upstream, Option<Arc<ClientTlsRt>>);

struct EndpointEntry {
    state: Weak<EndpointState>,
    metrics: Arc<EndpointMetrics>,
}

#[derive(Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<(Arc<str>, SocketAddr), EndpointEntry>>,
    clients: Mutex<HashMap<ClientKey, Client>>,
    generations: std::sync::atomic::AtomicU64,
    limits: Mutex<HashMap<String, Arc<ClusterLimits>>>,
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
    /// Rate limits' buckets, kept while their settings stay (see [`crate::ratelimit`]).
    pub rate_limits: crate::ratelimit::LimitRegistry,
    /// The tracer of the serving snapshots: kept while one holds it, reused when the next
    /// config has the same `tracing` block (its exporter and queue go on).
    tracer: Mutex<Option<std::sync::Weak<crate::trace::Tracer>>>,
    /// The traffic counters of each route's clusters, for the status reports.
    pub traffic: crate::report::Targets,
    /// The request path's own tests: every cluster compiled from now on sends here.
    #[cfg(test)]
    pub fake: Mutex<Option<Arc<dyn crate::upstream::fake::Fake>>>,
}

impl Registry {
    /// The tracer for this `tracing` block and service name: the current one when they are
    /// unchanged, else a new one (with a new exporter).
    pub fn tracer(
        &self,
        cfg: &spur_config::Tracing,
        service: String,
        metrics: &Metrics,
    ) -> Arc<crate::trace::Tracer> {
        let mut slot = self.tracer.lock().unwrap();
        if let Some(t) = slot.as_ref().and_then(|w| w.upgrade()) {
            if t.settings.0 == *cfg && t.settings.1 == service {
                return t;
            }
        }
        let t = Arc::new(crate::trace::Tracer::new(cfg, service, metrics));
        *slot = Some(Arc::downgrade(&t));
        t
    }

    /// The state of endpoint `addr` of `cluster`: the existing one if a snapshot or a request
    /// still holds it, else a new one.
    pub fn endpoint(
        &self,
        cluster: &str,
        addr: SocketAddr,
        metrics: &Metrics,
    ) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap();
        let key: (Arc<str>, SocketAddr) = (cluster.into(), addr);
        if let Some(entry) = map.get(&key) {
            match entry.state.upgrade() {
                Some(existing) => return existing,
                // Gone but not yet swept: its series go before the new state makes its own.
                None => entry.metrics.remove(metrics),
            }
        }
        let state = Arc::new(EndpointState::new(cluster, addr, metrics));
        map.insert(
            key,
            EndpointEntry {
                state: Arc::downgrade(&state),
                metrics: state.metrics.clone(),
            },
        );
        state
    }

    /// The upstream for a cluster's settings, and the TLS it originates with. `tls` (freshly
    /// loaded from the files) is used only when none exists yet for these settings; an
    /// existing one keeps its own, which its watcher keeps current.
    pub fn client(
        &self,
        key: ClientKey,
        tls: Option<Arc<ClientTlsRt>>,
        metrics: &Metrics,
    ) -> Client {
        #[cfg(test)]
        if let Some(f) = self.fake.lock().unwrap().clone() {
            return (Upstream::Fake(f), tls);
        }
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client = (new_upstream(&key, tls.clone(), generation, metrics), tls);
        clients.insert(key, client.clone());
        client
    }

    /// The concurrency limits of `cluster`; kept across snapshots while the numbers stay.
    pub fn limits(&self, cluster: &str, max_requests: u32, max_pending: u32) -> Arc<ClusterLimits> {
        let mut map = self.limits.lock().unwrap();
        if let Some(l) = map.get(cluster) {
            if l.max_requests == max_requests && l.max_pending == max_pending {
                return l.clone();
            }
        }
        let l = Arc::new(ClusterLimits {
            max_requests,
            max_pending,
            slots: Arc::new(tokio::sync::Semaphore::new(max_requests as usize)),
            waiting: AtomicU32::new(0),
        });
        map.insert(cluster.to_string(), l.clone());
        l
    }

    /// The retry budget of a route (keyed `listener/route`); kept across snapshots while
    /// its settings stay.
    pub fn budget(&self, key: &str, ratio: f64, min_per_sec: u32) -> Arc<Budget> {
        let mut map = self.budgets.lock().unwrap();
        if let Some(b) = map.get(key) {
            if b.same_settings(ratio, min_per_sec) {
                return b.clone();
            }
        }
        let b = Arc::new(Budget::starting_at(ratio, min_per_sec, crate::clock::now()));
        map.insert(key.to_string(), b.clone());
        b
    }

    /// Keeps only what `snap` (the snapshot now serving) uses: connectors (their idle
    /// connections close), limits, budgets, and the per-address state of its clusters'
    /// upstreams. Called after a swap, never before: a rejected config changes nothing.
    pub fn prune(&self, snap: &Snapshot, metrics: &Metrics) {
        let keys: HashSet<&ClientKey> = snap.clusters.values().map(|c| &c.client_key).collect();
        self.clients.lock().unwrap().retain(|k, _| keys.contains(k));
        self.limits
            .lock()
            .unwrap()
            .retain(|name, _| snap.clusters.get(name).is_some_and(|c| c.limits.is_some()));
        let routes = snap.budget_keys();
        self.budgets
            .lock()
            .unwrap()
            .retain(|k, _| routes.contains(k.as_str()));
        self.rate_limits
            .retain(&crate::http::edge::limit_names(snap));
        for c in snap.clusters.values() {
            let members = c.members.load();
            let live: HashSet<SocketAddr> = members.endpoints.iter().map(|e| e.addr).collect();
            c.client.retain(&|a| live.contains(&a));
        }
        self.sweep(metrics);
    }

    /// Removes the metric series of endpoints whose state is gone (no snapshot and no
    /// request holds them any more). Run after each swap and periodically.
    pub fn sweep(&self, metrics: &Metrics) {
        self.endpoints.lock().unwrap().retain(|_, e| {
            let alive = e.state.strong_count() > 0;
            if !alive {
                e.metrics.remove(metrics);
            }
            alive
        });
    }

    /// Endpoint states alive now (held by a snapshot or a request).
    pub fn endpoint_count(&self) -> usize {
        self.endpoints
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.state.strong_count() > 0)
            .count()
    }
}

/// The upstream for a cluster's settings: HTTP/3 over QUIC for `http3` clusters (with a TCP
/// connector for `fallback`), else the TCP connector for the endpoints' pools.
fn new_upstream(
    key: &ClientKey,
    tls: Option<Arc<ClientTlsRt>>,
    generation: u64,
    metrics: &Metrics,
) -> Upstream {
    let tcp = |protocol| {
        Arc::new(HttpConnector {
            protocol,
            tls: tls.clone(),
            connect_timeout: key.connect_timeout,
            generation,
        })
    };
    match (key.protocol, &tls) {
        (UpstreamProtocol::Http3, Some(quic_tls)) => {
            Upstream::H3(Arc::new(crate::quic::client::H3Client::new(
                &key.cluster,
                quic_tls.clone(),
                key.connect_timeout,
                key.fallback.map(|p| (tcp(p), key.fallback_period)),
                metrics,
            )))
        }
        (protocol, _) => Upstream::Http(tcp(protocol)),
    }
}
