//! Compiling a validated config into a [`Snapshot`]: every name resolved to an `Arc`
//! (routes point at their clusters, flags by index), matchers, balancers and retry policies
//! built, endpoint state, limits, budgets and metric series fetched from the registry (so
//! what a previous snapshot learned survives a push).
//!
//! Kept apart from `snapshot.rs`, which holds what a request reads: this runs once per
//! config, off the request path, and is the only place a config's names are looked up.

use crate::authorize::AuthzRt;
use crate::metrics::{Metrics, TargetMetrics};
use crate::policy::breaker;
use crate::policy::flags::CompiledFlag;
use crate::policy::retry::RetryPolicy;
use crate::policy::route::Matcher;
use crate::policy::split::HashOn;
use crate::registry::{ClientKey, Registry};
use crate::snapshot::{
    budget_key, canonical, BreakerRt, ClusterRt, CompileError, CorrelationRt, FlagRt, ListenerRt,
    Members, MirrorRt, RetryRt, RouteRt, Snapshot, Target,
};
use crate::tls::{ClientTlsRt, ServerTls, TlsError, WorkloadIdentity};
use crate::upstream::HttpConnector;
use arc_swap::ArcSwap;
use spur_config::{Config, UpstreamProtocol};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

impl Snapshot {
    pub fn compile(
        cfg: Arc<Config>,
        version: u64,
        registry: &Registry,
        metrics: &Metrics,
        identity: Option<&Arc<WorkloadIdentity>>,
    ) -> Result<Snapshot, CompileError> {
        // Flags first: routes refer to them by index. BTreeMap order: sorted by name.
        let flags: Vec<FlagRt> = cfg
            .flags
            .iter()
            .map(|(name, f)| compile_flag(name, f, metrics))
            .collect();
        let mut clusters = HashMap::new();
        let mut by_addr = HashMap::new();
        let mut dns_clusters = Vec::new();
        for (i, c) in cfg.clusters.iter().enumerate() {
            let cluster = Arc::new(compile_cluster(i, c, registry, metrics, identity)?);
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
        let ctx = Ctx {
            registry,
            metrics,
            identity,
            clusters: &clusters,
            flags: &flags,
        };
        let mut listeners = HashMap::default();
        for (i, l) in cfg.listeners.iter().enumerate() {
            listeners.insert(l.name.clone(), Arc::new(ctx.listener(i, l)?));
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

fn compile_flag(name: &str, f: &spur_config::Flag, metrics: &Metrics) -> FlagRt {
    let label = |result| crate::metrics::FlagLabels {
        flag: name.into(),
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
        name: name.into(),
        flag: CompiledFlag::compile(name, f),
        on,
        off,
    }
}

/// What compiling a listener and its routes refers to: the clusters and flags compiled
/// before them, and where shared run-time state lives.
struct Ctx<'a> {
    registry: &'a Registry,
    metrics: &'a Metrics,
    identity: Option<&'a Arc<WorkloadIdentity>>,
    clusters: &'a HashMap<String, Arc<ClusterRt>>,
    flags: &'a [FlagRt],
}

impl Ctx<'_> {
    fn cluster(&self, path: String, name: &str) -> Result<Arc<ClusterRt>, CompileError> {
        self.clusters
            .get(name)
            .cloned()
            .ok_or_else(|| CompileError {
                path,
                message: format!("unknown cluster `{name}`"),
            })
    }

    fn listener(&self, i: usize, l: &spur_config::Listener) -> Result<ListenerRt, CompileError> {
        let listen: SocketAddr = *l.listen.get();
        let default_cluster = match &l.cluster {
            Some(c) => Some(self.cluster(format!("listeners[{i}].cluster"), c)?),
            None => None,
        };
        let lname: Arc<str> = l.name.as_str().into();
        let mut routes = Vec::with_capacity(l.routes.len());
        for (j, r) in l.routes.iter().enumerate() {
            routes.push(self.route(&lname, &format!("listeners[{i}].routes[{j}]"), j, r)?);
        }
        let default_route_name: Arc<str> = "default".into();
        let default_metrics = default_cluster.as_ref().map(|c: &Arc<ClusterRt>| {
            Arc::new(TargetMetrics::new(
                self.metrics,
                &lname,
                &default_route_name,
                &c.name,
            ))
        });
        let default_live = default_cluster.as_ref().map(|c| {
            self.registry
                .traffic
                .get(&lname, &default_route_name, &c.name, None)
        });
        let tls = match &l.tls {
            Some(t) => Some(Arc::new(
                ServerTls::load_with(&l.name, t, l.protocol, self.identity)
                    .map_err(tls_error(format!("listeners[{i}]")))?,
            )),
            None => None,
        };
        let authz =
            spur_config::listener_policy(l).map(|a| AuthzRt::compile(&lname, &a, self.metrics));
        let edge = crate::http::edge::ListenerEdge::compile(
            &lname,
            l,
            &self.registry.rate_limits,
            self.metrics,
        );
        Ok(ListenerRt {
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
        })
    }

    /// Route `j` of listener `lname`, at config path `path`.
    fn route(
        &self,
        lname: &Arc<str>,
        path: &str,
        j: usize,
        r: &spur_config::Route,
    ) -> Result<RouteRt, CompileError> {
        let target = self.target(path, r)?;
        let name: Arc<str> = r
            .name
            .clone()
            .unwrap_or_else(|| format!("{lname}#{j}"))
            .into();
        let edge = crate::http::edge::RouteEdge::compile(
            lname,
            &name,
            r,
            &self.registry.rate_limits,
            self.metrics,
        );
        let metrics = target
            .clusters()
            .iter()
            .map(|c| Arc::new(TargetMetrics::new(self.metrics, lname, &name, &c.name)))
            .collect();
        let split = matches!(target, Target::Split { .. });
        let live = target
            .clusters()
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let side = split.then_some(k as u32);
                self.registry.traffic.get(lname, &name, &c.name, side)
            })
            .collect();
        let retry = r.retry.as_ref().map(|rc| RetryRt {
            policy: RetryPolicy::new(rc),
            budget: self.registry.budget(
                &budget_key(lname, &name),
                rc.budget.ratio,
                rc.budget.min_per_sec,
            ),
        });
        let flag =
            match &r.matches.flag {
                Some(f) => Some(self.flags.iter().position(|x| &*x.name == f).ok_or_else(
                    || CompileError {
                        path: format!("{path}.match.flag"),
                        message: format!("unknown flag `{f}`"),
                    },
                )?),
                None => None,
            };
        let mirror = match &r.mirror {
            Some(m) => Some(MirrorRt {
                cluster: self.cluster(format!("{path}.mirror.cluster"), &m.cluster)?,
                percent: m.percent,
            }),
            None => None,
        };
        Ok(RouteRt {
            edge,
            name,
            matcher: Matcher::compile(&r.matches),
            target,
            hash_on: r.hash_on.as_deref().map(HashOn::from),
            timeout: r.timeout.map(|t| t.get()),
            retry,
            fault: r.fault.clone(),
            flag,
            mirror,
            metrics,
            live,
            upgrades: match &r.upgrades {
                Some(list) => list.iter().map(|u| u.get().as_str().into()).collect(),
                None => vec![spur_config::UpgradeProtocol::websocket().as_str().into()],
            },
        })
    }

    fn target(&self, path: &str, r: &spur_config::Route) -> Result<Target, CompileError> {
        if let Some(c) = &r.cluster {
            return Ok(Target::Cluster(self.cluster(format!("{path}.cluster"), c)?));
        }
        let mut clusters = Vec::new();
        for (k, s) in r.split.iter().enumerate() {
            clusters.push(self.cluster(format!("{path}.split[{k}].cluster"), &s.cluster)?);
        }
        let weights: Vec<u32> = r.split.iter().map(|s| s.weight).collect();
        Ok(Target::Split {
            total: weights.iter().map(|w| u64::from(*w)).sum::<u64>().max(1),
            weights,
            clusters,
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
    metrics: &Metrics,
    identity: Option<&Arc<WorkloadIdentity>>,
) -> Result<ClusterRt, CompileError> {
    let endpoints = c
        .endpoints
        .iter()
        .map(|ep| registry.endpoint(&c.name, ep.addr(), metrics))
        .collect();
    // What TCP connections speak: the cluster's protocol, or an http3 cluster's fallback.
    let tcp_protocol = match c.protocol {
        UpstreamProtocol::Http3 => c.fallback.unwrap_or(UpstreamProtocol::Http2),
        p => p,
    };
    // Read on every compile, so that a missing or broken file rejects the config; the pooled
    // client keeps the TLS it was built with when the settings are the same (its own watcher
    // keeps that one current).
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
    Ok(ClusterRt {
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
    })
}
