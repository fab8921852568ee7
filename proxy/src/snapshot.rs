//! A compiled config: what a request reads, built once per config and swapped atomically.
//!
//! Built by `compile.rs` (every name resolved to an `Arc`: routes point at their clusters
//! directly). A request loads the current snapshot once and keeps it for its whole life, so
//! a swap never changes a request half-way.

use crate::authorize::AuthzRt;
use crate::endpoint::{ClusterLimits, EndpointState};
use crate::metrics::TargetMetrics;
use crate::policy::balance::Balancer;
use crate::policy::breaker;
use crate::policy::budget::Budget;
use crate::policy::flags::CompiledFlag;
use crate::policy::retry::RetryPolicy;
use crate::policy::route::{Matcher, RequestView};
use crate::policy::split::HashOn;
use crate::registry::ClientKey;
use crate::tls::{ClientTlsRt, ServerTls};
use crate::upstream::{HttpConnector, Upstream};
use arc_swap::ArcSwap;
use http::HeaderName;
use spur_config::{
    Config, Fault, HealthCheck, LbPolicy, Limits, ListenerProtocol, UpstreamProtocol,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub struct Snapshot {
    pub version: u64,
    pub config: Arc<Config>,
    /// By name, looked up on every request: FxHash (the names come from the config).
    pub listeners: HashMap<String, Arc<ListenerRt>, rustc_hash::FxBuildHasher>,
    pub clusters: HashMap<String, Arc<ClusterRt>>,
    pub correlation: CorrelationRt,
    /// `access_log.query`: access lines write the query string.
    pub log_query: bool,
    pub drain_timeout: Duration,
    /// Every flag, sorted by name; routes and requests refer to them by index.
    pub flags: Vec<FlagRt>,
    /// `original_dst` routing: each static endpoint address (ip:port) to the cluster that
    /// lists it (the first in config order, when several do). `dns:` clusters are matched
    /// at request time against their current answers, see [`Snapshot::cluster_for_addr`].
    pub by_addr: HashMap<SocketAddr, Arc<ClusterRt>>,
    /// The `dns:` clusters, in config order, for that scan.
    pub dns_clusters: Vec<Arc<ClusterRt>>,
    /// The `tracing` block, with its exporter (`None`: no spans).
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

pub struct FlagRt {
    pub name: Arc<str>,
    pub flag: CompiledFlag,
    /// `spur_flag_evaluations_total{flag, result="on"|"off"}`, resolved once.
    pub on: prometheus_client::metrics::counter::Counter,
    pub off: prometheus_client::metrics::counter::Counter,
}

pub struct CorrelationRt {
    pub header: HeaderName,
    pub generate: bool,
    pub trace_context: bool,
}

pub struct ListenerRt {
    pub name: Arc<str>,
    pub listen: SocketAddr,
    pub protocol: ListenerProtocol,
    pub limits: Limits,
    pub default_cluster: Option<Arc<ClusterRt>>,
    pub routes: Vec<RouteRt>,
    /// Route label for requests answered by the default cluster.
    pub default_route_name: Arc<str>,
    /// The request series of the default cluster's requests.
    pub default_metrics: Option<Arc<TargetMetrics>>,
    /// The default cluster's traffic counters (status reports).
    pub default_live: Option<Arc<crate::report::Target>>,
    /// TLS termination (and mutual TLS), when the listener has `tls`.
    pub tls: Option<Arc<ServerTls>>,
    /// Keep `x-spur-flags` from any client (it is always kept from an mTLS peer).
    pub trust_incoming_flags: bool,
    /// Transparent mode: read each connection's original destination and route by it.
    pub original_dst: bool,
    /// Paths with encoded slashes or backslashes are kept (else refused).
    pub allow_encoded_slashes: bool,
    /// `Alt-Svc` advertising the HTTP/3 listener (`alt_svc_h3`), on every response.
    pub alt_svc: Option<http::HeaderValue>,
    /// The authorization policy (`authz`, or what `tls.allow_identities` stands for).
    pub authz: Option<AuthzRt>,
    /// Rate limit and forwarding-header trust (see [`crate::http::edge`]).
    pub edge: crate::http::edge::ListenerEdge,
}

pub struct RouteRt {
    pub name: Arc<str>,
    pub matcher: Matcher,
    pub target: Target,
    /// The sticky key for a split and for `ring_hash` clusters.
    pub hash_on: Option<HashOn>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryRt>,
    pub fault: Option<Fault>,
    /// `match.flag`: the index of the flag that must be on.
    pub flag: Option<usize>,
    pub mirror: Option<MirrorRt>,
    /// The request series of each cluster the route sends to (the split's sides in order).
    pub metrics: Vec<Arc<TargetMetrics>>,
    /// The traffic counters of each of those clusters (status reports), in the same order.
    pub live: Vec<Arc<crate::report::Target>>,
    /// The `Upgrade` protocols this route tunnels (lower case): its `upgrades`, or WebSocket.
    pub upgrades: Vec<Box<str>>,
    /// Rate limit, CORS, redirect, rewrite, header rules (see [`crate::http::edge`]).
    pub edge: crate::http::edge::RouteEdge,
}

pub struct MirrorRt {
    pub cluster: Arc<ClusterRt>,
    pub percent: f64,
}

pub struct RetryRt {
    pub policy: RetryPolicy,
    pub budget: Arc<Budget>,
}

pub enum Target {
    Cluster(Arc<ClusterRt>),
    Split {
        clusters: Vec<Arc<ClusterRt>>,
        weights: Vec<u32>,
        total: u64,
    },
}

impl Target {
    /// The clusters this target sends to (one, or the split's sides in order).
    pub fn clusters(&self) -> &[Arc<ClusterRt>] {
        match self {
            Target::Cluster(c) => std::slice::from_ref(c),
            Target::Split { clusters, .. } => clusters,
        }
    }
}

pub struct ClusterRt {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub lb: LbPolicy,
    /// The endpoints and their balancer; swapped on its own when DNS answers change.
    pub members: ArcSwap<Members>,
    pub client: Upstream,
    /// The settings `client` was made for (the registry's key).
    pub client_key: ClientKey,
    /// Opaque connections for `tcp` listeners: TCP, then the cluster's TLS without ALPN.
    pub opaque: HttpConnector,
    pub connect_timeout: Duration,
    pub breaker: Option<BreakerRt>,
    pub limits: Option<Arc<ClusterLimits>>,
    pub health_check: Option<HealthCheck>,
    /// `host:port` to resolve periodically, for `dns:` clusters.
    pub dns: Option<String>,
    /// TLS origination, when the cluster has `tls` (the same one its pooled client uses).
    pub tls: Option<Arc<ClientTlsRt>>,
    /// `panic_threshold` and `slow_start` (see [`crate::policy::balance`]).
    pub tuning: crate::policy::balance::Tuning,
    /// `spur_lb_panic_total{cluster}`.
    pub lb_panic: prometheus_client::metrics::counter::Counter,
    /// `grpc_failure_codes`: the gRPC statuses that count against an endpoint.
    pub grpc_failures: crate::grpc::Codes,
    /// `opaque: true`: transparent listeners skip protocol detection for it.
    pub skip_detection: bool,
}

pub struct BreakerRt {
    pub settings: breaker::Settings,
    pub max_ejection_percent: u32,
}

pub struct Members {
    pub endpoints: Vec<Arc<EndpointState>>,
    pub balancer: Balancer,
    /// The configured weight of each endpoint.
    pub weights: Vec<u32>,
}

impl Members {
    /// `weights` are the config's, one per endpoint (the endpoints' live weights change
    /// only when a snapshot is applied, see [`Snapshot::settle`]).
    pub fn build(lb: LbPolicy, endpoints: Vec<Arc<EndpointState>>, weights: Vec<u32>) -> Members {
        let balancer = match lb {
            LbPolicy::RoundRobin => Balancer::round_robin(&weights),
            LbPolicy::LeastRequest => Balancer::LeastRequest,
            LbPolicy::Ewma => Balancer::Ewma,
            LbPolicy::RingHash => {
                let ids: Vec<&str> = endpoints.iter().map(|e| &*e.label).collect();
                Balancer::ring_hash(&ids, &weights)
            }
        };
        Members {
            endpoints,
            balancer,
            weights,
        }
    }
}

impl ClusterRt {
    /// The URI scheme of requests to this cluster's endpoints.
    pub fn scheme(&self) -> http::uri::Scheme {
        if self.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    /// The HTTP version spoken to this cluster's endpoints.
    pub fn http_version(&self) -> http::Version {
        match self.protocol {
            UpstreamProtocol::Http2 => http::Version::HTTP_2,
            UpstreamProtocol::Http3 => http::Version::HTTP_3,
            UpstreamProtocol::Http1 => http::Version::HTTP_11,
        }
    }

    /// Whether any endpoint could take a request now (healthy, not ejected).
    pub fn has_available_endpoint(&self) -> bool {
        let now = std::time::Instant::now();
        self.members
            .load()
            .endpoints
            .iter()
            .any(|e| e.is_available(now))
    }

    /// Whether one more endpoint of this cluster may be ejected (`max_ejection_percent`).
    pub fn may_eject(&self, members: &Members) -> bool {
        let Some(b) = &self.breaker else { return false };
        let ejected = members.endpoints.iter().filter(|e| e.is_ejected()).count();
        ejected < breaker::max_ejected(members.endpoints.len(), b.max_ejection_percent)
    }
}

/// A config the proxy cannot apply even though it validated: a TLS file that cannot be read
/// or does not fit, or a TLS block without files on a proxy without a workload identity.
/// (Values were parsed by spur-config; nothing else here can fail.)
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CompileError {
    pub path: String,
    pub message: String,
}

impl ListenerRt {
    /// `http3` listeners listen on UDP.
    pub fn is_udp(&self) -> bool {
        self.protocol == ListenerProtocol::Http3
    }

    /// The first route that matches, or `None`.
    /// The first route that matches, given the flags that are on for the request.
    pub fn route(&self, req: &RequestView<'_>, flags_on: &[bool]) -> Option<&RouteRt> {
        self.routes.iter().find(|r| {
            r.flag
                .is_none_or(|i| flags_on.get(i).copied().unwrap_or(false))
                && r.matcher.matches(req)
        })
    }
}

impl Snapshot {
    /// The registry keys of the retry budgets this snapshot's routes use.
    pub fn budget_keys(&self) -> std::collections::HashSet<String> {
        self.listeners
            .values()
            .flat_map(|l| {
                l.routes
                    .iter()
                    .filter(|r| r.retry.is_some())
                    .map(move |r| budget_key(&l.name, &r.name))
            })
            .collect()
    }

    /// The cluster that owns `addr` (an original destination): a static endpoint with that
    /// exact ip:port, else a `dns:` cluster whose current answers include it. `None` for an
    /// address no cluster knows: such connections are never forwarded to it as is.
    pub fn cluster_for_addr(&self, addr: SocketAddr) -> Option<Arc<ClusterRt>> {
        let addr = canonical(addr);
        if let Some(c) = self.by_addr.get(&addr) {
            return Some(c.clone());
        }
        self.dns_clusters
            .iter()
            .find(|c| {
                c.members
                    .load()
                    .endpoints
                    .iter()
                    .any(|e| canonical(e.addr) == addr)
            })
            .cloned()
    }

    /// Once this snapshot is the one serving: endpoints take its weights, and endpoints of
    /// clusters without a circuit breaker lose any ejection left from an earlier config.
    /// (Done after the swap, so a rejected config changes nothing.)
    pub fn settle(&self) {
        for c in self.clusters.values() {
            let members = c.members.load();
            for (e, w) in members.endpoints.iter().zip(&members.weights) {
                e.set_weight(*w);
                if c.breaker.is_none() {
                    e.reset_breaker();
                }
            }
        }
    }

    /// Takes over what the previous snapshot learned at run time: the current DNS answers
    /// of `dns:` clusters that still resolve the same name (so a push never empties them).
    /// Endpoints new to a cluster that was already serving start as recovered ones do
    /// ([`EndpointState::restart_estimate`]: their peers' latency, and slow start).
    pub fn carry_over_from(&self, old: &Snapshot) {
        for (name, c) in &self.clusters {
            let Some(prev) = old.clusters.get(name) else {
                continue;
            };
            // Endpoints new to a cluster that was serving start at their peers' latency (not
            // the default guess, which would starve them) and slowly (with `slow_start`).
            let before = prev.members.load();
            let now = crate::clock::now();
            let members = c.members.load();
            for e in &members.endpoints {
                if !before.endpoints.iter().any(|b| Arc::ptr_eq(b, e)) {
                    e.restart_estimate(&members, now);
                }
            }
            if c.dns.is_some() && c.dns == prev.dns && c.lb == prev.lb {
                c.members.store(prev.members.load_full());
            }
        }
    }
}

/// The registry key of a route's retry budget.
pub(crate) fn budget_key(listener: &str, route: &str) -> String {
    format!("{listener}/{route}")
}

/// An IPv4-mapped IPv6 address as plain IPv4, and no flow info or scope: the form both
/// sides of an original-destination lookup are compared in.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddr::new((*v6.ip()).into(), v6.port()),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[tokio::test]
    async fn original_destinations_map_to_the_cluster_listing_them() {
        let cfg = spur_config::load(
            r#"
listeners:
  - name: out
    listen: 127.0.0.1:0
    original_dst: true
clusters:
  - name: a
    endpoints: ["10.0.0.1:8080", "10.0.0.2:8080"]
  - name: b
    endpoints: ["10.0.0.2:8080", "10.0.0.3:9090"]
"#,
            Some("c.yaml"),
        )
        .unwrap();
        let registry = Registry::default();
        let metrics = crate::metrics::Metrics::new();
        let snap = Snapshot::compile(Arc::new(cfg), 1, &registry, &metrics, None).unwrap();
        let owner = |a: &str| {
            snap.cluster_for_addr(a.parse().unwrap())
                .map(|c| c.name.to_string())
        };
        assert_eq!(owner("10.0.0.1:8080").as_deref(), Some("a"));
        // Listed twice: the first cluster in the file owns it.
        assert_eq!(owner("10.0.0.2:8080").as_deref(), Some("a"));
        assert_eq!(owner("10.0.0.3:9090").as_deref(), Some("b"));
        assert_eq!(owner("[::ffff:10.0.0.3]:9090").as_deref(), Some("b"));
        // Same IP, another port; unknown IP: nobody's (refused, not forwarded as is).
        assert_eq!(owner("10.0.0.3:8080"), None);
        assert_eq!(owner("10.9.9.9:8080"), None);
        assert!(snap.listeners["out"].original_dst);
    }
}
