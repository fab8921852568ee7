//! A compiled config: what a request reads, built once per config and swapped atomically.
//!
//! Compiling resolves every name to an `Arc` (routes point at their clusters directly),
//! builds matchers, balancers and retry policies, and fetches endpoint state, limits and
//! budgets from the registry. A request loads the current snapshot once and keeps it for
//! its whole life, so a swap never changes a request half-way.

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
use crate::registry::{ClientKey, Registry};
use crate::tls::{ClientTlsRt, ServerTls, TlsError, WorkloadIdentity};
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
    pub listeners: HashMap<String, Arc<ListenerRt>>,
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

/// A TLS file or field error, at its config path (never with file content).
fn tls_error(prefix: String) -> impl FnOnce(TlsError) -> CompileError {
    move |e| CompileError {
        path: format!("{prefix}.tls.{}", e.field),
        message: e.error.to_string(),
    }
}

fn compile_cluster(
    i: usize,
    c: &spur_config::Cluster,
    registry: &Registry,
    metrics: &crate::metrics::Metrics,
    identity: Option<&Arc<WorkloadIdentity>>,
) -> Result<ClusterRt, CompileError> {
    let endpoints = c
        .endpoints
        .iter()
        .map(|ep| registry.endpoint(&c.name, ep.addr(), metrics))
        .collect();
    // Read on every compile, so that a missing or broken file rejects the config; the pooled
    // client keeps the TLS it was built with when the settings are the same (its own watcher
    // keeps that one current).
    // What TCP connections speak: the cluster's protocol, or an http3 cluster's fallback.
    let tcp_protocol = match c.protocol {
        UpstreamProtocol::Http3 => c.fallback.unwrap_or(UpstreamProtocol::Http2),
        p => p,
    };
    let tls = match &c.tls {
        Some(t) => Some(Arc::new(
            ClientTlsRt::load_with(&c.name, t, tcp_protocol, identity)
                .map_err(tls_error(format!("clusters[{i}]")))?,
        )),
        None => None,
    };
    let key = ClientKey {
        cluster: c.name.clone(),
        protocol: c.protocol,
        connect_timeout: c.connect_timeout.get(),
        tls: c.tls.clone(),
        fallback: c.fallback,
        fallback_period: c.fallback_period().get(),
    };
    let (client, tls) = registry.client(key.clone(), tls, metrics);
    let opaque = HttpConnector {
        protocol: tcp_protocol,
        tls: tls.clone(),
        connect_timeout: c.connect_timeout.get(),
        generation: 0,
    };
    let cluster = ClusterRt {
        skip_detection: c.opaque,
        name: c.name.as_str().into(),
        protocol: c.protocol,
        lb: c.lb,
        members: ArcSwap::from_pointee(Members::build(
            c.lb,
            endpoints,
            c.endpoints.iter().map(|e| e.weight()).collect(),
        )),
        client,
        client_key: key,
        opaque,
        connect_timeout: c.connect_timeout.get(),
        breaker: c.circuit_breaker.map(|cb| BreakerRt {
            settings: breaker::Settings {
                consecutive_failures: cb.consecutive_failures,
                ejection_time: cb.ejection_time.get(),
            },
            max_ejection_percent: cb.max_ejection_percent,
        }),
        limits: c
            .circuit_breaker
            .map(|cb| registry.limits(&c.name, cb.max_requests, cb.max_pending)),
        health_check: c.health_check.clone(),
        dns: c.dns.as_ref().map(|d| d.text().to_string()),
        tls,
        tuning: crate::policy::balance::Tuning {
            panic_threshold: c.panic_threshold(),
            slow_start: c.slow_start.map(|s| s.window.get()),
        },
        lb_panic: metrics
            .lb_panic
            .get_or_create(&crate::metrics::ClusterLabels {
                cluster: c.name.as_str().into(),
            })
            .clone(),
        grpc_failures: crate::grpc::Codes::of(&c.grpc_failure_codes()),
    };
    Ok(cluster)
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

    pub fn compile(
        cfg: Arc<Config>,
        version: u64,
        registry: &Registry,
        metrics: &crate::metrics::Metrics,
        identity: Option<&Arc<WorkloadIdentity>>,
    ) -> Result<Snapshot, CompileError> {
        // Flags first: routes refer to them by index. BTreeMap order: sorted by name.
        let flags: Vec<FlagRt> = cfg
            .flags
            .iter()
            .map(|(name, f)| {
                let label = |result| crate::metrics::FlagLabels {
                    flag: name.as_str().into(),
                    result,
                };
                // One statement each: a family's read guard must be gone before the next
                // get_or_create, which may need the write lock.
                let on = metrics.flag_evaluations.get_or_create(&label("on")).clone();
                let off = metrics
                    .flag_evaluations
                    .get_or_create(&label("off"))
                    .clone();
                FlagRt {
                    name: name.as_str().into(),
                    flag: CompiledFlag::compile(name, f),
                    on,
                    off,
                }
            })
            .collect();
        let flag_index = |name: &str| flags.iter().position(|f| &*f.name == name);
        let mut clusters = HashMap::new();
        let mut by_addr = HashMap::new();
        let mut dns_clusters = Vec::new();
        for (i, c) in cfg.clusters.iter().enumerate() {
            let cluster = compile_cluster(i, c, registry, metrics, identity)?;
            let cluster = Arc::new(cluster);
            if cluster.dns.is_some() {
                dns_clusters.push(cluster.clone());
            }
            for e in &cluster.members.load().endpoints {
                by_addr
                    .entry(canonical(e.addr))
                    .or_insert_with(|| cluster.clone());
            }
            clusters.insert(c.name.clone(), cluster);
        }
        // Service addresses (a Service's ClusterIP) win over endpoint addresses; among
        // them, the first cluster in config order.
        let mut services = HashMap::new();
        for c in &cfg.clusters {
            for a in &c.service_addresses {
                if let Some(rt) = clusters.get(&c.name) {
                    services.entry(canonical(**a)).or_insert_with(|| rt.clone());
                }
            }
        }
        by_addr.extend(services);
        let cluster = |path: String, name: &str| {
            clusters.get(name).cloned().ok_or_else(|| CompileError {
                path,
                message: format!("unknown cluster `{name}`"),
            })
        };

        let mut listeners = HashMap::new();
        for (i, l) in cfg.listeners.iter().enumerate() {
            let listen: SocketAddr = *l.listen.get();
            let default_cluster = match &l.cluster {
                Some(c) => Some(cluster(format!("listeners[{i}].cluster"), c)?),
                None => None,
            };
            let mut routes = Vec::with_capacity(l.routes.len());
            for (j, r) in l.routes.iter().enumerate() {
                let path = format!("listeners[{i}].routes[{j}]");
                let matcher = Matcher::compile(&r.matches);
                let target = if let Some(c) = &r.cluster {
                    Target::Cluster(cluster(format!("{path}.cluster"), c)?)
                } else {
                    let mut cs = Vec::new();
                    for (k, s) in r.split.iter().enumerate() {
                        cs.push(cluster(format!("{path}.split[{k}].cluster"), &s.cluster)?);
                    }
                    let weights: Vec<u32> = r.split.iter().map(|s| s.weight).collect();
                    Target::Split {
                        total: weights.iter().map(|w| u64::from(*w)).sum::<u64>().max(1),
                        weights,
                        clusters: cs,
                    }
                };
                let name: Arc<str> = r
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}#{j}", l.name))
                    .into();
                let lname: Arc<str> = l.name.as_str().into();
                let edge = crate::http::edge::RouteEdge::compile(
                    &lname,
                    &name,
                    r,
                    &registry.rate_limits,
                    metrics,
                );
                let metrics = target
                    .clusters()
                    .iter()
                    .map(|c| Arc::new(TargetMetrics::new(metrics, &lname, &name, &c.name)))
                    .collect();
                let split = matches!(target, Target::Split { .. });
                let live = target
                    .clusters()
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        let side = split.then_some(k as u32);
                        registry.traffic.get(&lname, &name, &c.name, side)
                    })
                    .collect();
                let retry = r.retry.as_ref().map(|rc| RetryRt {
                    policy: RetryPolicy::new(rc),
                    budget: registry.budget(
                        &budget_key(&l.name, &name),
                        rc.budget.ratio,
                        rc.budget.min_per_sec,
                    ),
                });
                routes.push(RouteRt {
                    edge,
                    name,
                    matcher,
                    target,
                    hash_on: r.hash_on.as_deref().map(HashOn::from),
                    timeout: r.timeout.map(|t| t.get()),
                    retry,
                    fault: r.fault.clone(),
                    flag: match &r.matches.flag {
                        Some(f) => Some(flag_index(f).ok_or_else(|| CompileError {
                            path: format!("{path}.match.flag"),
                            message: format!("unknown flag `{f}`"),
                        })?),
                        None => None,
                    },
                    mirror: match &r.mirror {
                        Some(m) => Some(MirrorRt {
                            cluster: cluster(format!("{path}.mirror.cluster"), &m.cluster)?,
                            percent: m.percent,
                        }),
                        None => None,
                    },
                    metrics,
                    live,
                    upgrades: match &r.upgrades {
                        Some(list) => list.iter().map(|u| u.get().as_str().into()).collect(),
                        None => vec![spur_config::UpgradeProtocol::websocket().as_str().into()],
                    },
                });
            }
            let lname: Arc<str> = l.name.as_str().into();
            let default_route_name: Arc<str> = "default".into();
            let default_metrics = default_cluster.as_ref().map(|c: &Arc<ClusterRt>| {
                Arc::new(TargetMetrics::new(
                    metrics,
                    &lname,
                    &default_route_name,
                    &c.name,
                ))
            });
            let default_live = default_cluster.as_ref().map(|c| {
                registry
                    .traffic
                    .get(&lname, &default_route_name, &c.name, None)
            });
            let tls = match &l.tls {
                Some(t) => Some(Arc::new(
                    ServerTls::load_with(&l.name, t, l.protocol, identity)
                        .map_err(tls_error(format!("listeners[{i}]")))?,
                )),
                None => None,
            };
            let authz =
                spur_config::listener_policy(l).map(|a| AuthzRt::compile(&lname, &a, metrics));
            let edge =
                crate::http::edge::ListenerEdge::compile(&lname, l, &registry.rate_limits, metrics);
            listeners.insert(
                l.name.clone(),
                Arc::new(ListenerRt {
                    name: lname,
                    listen,
                    protocol: l.protocol,
                    limits: l.limits,
                    default_cluster,
                    routes,
                    default_route_name,
                    default_metrics,
                    default_live,
                    tls,
                    trust_incoming_flags: l.trust_incoming_flags,
                    original_dst: l.original_dst,
                    allow_encoded_slashes: l.allow_encoded_slashes,
                    alt_svc: l.alt_svc_h3.map(|port| {
                        http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
                            .expect("a port makes a valid header value")
                    }),
                    authz,
                    edge,
                }),
            );
        }
        let correlation = CorrelationRt {
            header: cfg.correlation.request_id_header.get().clone(),
            generate: cfg.correlation.generate,
            trace_context: cfg.correlation.trace_context,
        };
        let tracer = cfg.tracing.as_ref().map(|t| {
            let service = t
                .service_name
                .clone()
                .or_else(|| cfg.node.clone())
                .unwrap_or_else(|| "spur".into());
            registry.tracer(t, service, metrics)
        });
        Ok(Snapshot {
            tracer,
            version,
            log_query: cfg.access_log.query,
            drain_timeout: cfg.drain_timeout.get(),
            config: cfg,
            listeners,
            clusters,
            correlation,
            flags,
            by_addr,
            dns_clusters,
        })
    }
}

/// The registry key of a route's retry budget.
fn budget_key(listener: &str, route: &str) -> String {
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
