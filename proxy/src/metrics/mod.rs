//! The proxy's Prometheus metrics, with SPEC's names.
//!
//! Label sets hold `Arc<str>` names made when a config is compiled, so recording a request
//! clones a few pointers and never formats a string. The hottest series (requests and
//! upstream tries by status code) are resolved once per owner, see [`codes`].

pub mod codes;
pub use codes::{CodeCounters, WithCode};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
    pub code: u16,
}

impl WithCode for RequestLabels {
    fn with_code(&self, code: u16) -> Self {
        RequestLabels {
            code,
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub cluster: Arc<str>,
    pub endpoint: Arc<str>,
    pub code: u16,
}

impl WithCode for UpstreamLabels {
    fn with_code(&self, code: u16) -> Self {
        UpstreamLabels {
            code,
            ..self.clone()
        }
    }
}

/// `spur_tcp_connections_total`: one per connection of a `tcp` listener, by how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub listener: Arc<str>,
    pub cluster: Arc<str>,
    pub endpoint: Arc<str>,
    pub result: &'static str,
}

/// `spur_tcp_bytes_total`: bytes relayed by `tcp` listeners, by direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub listener: Arc<str>,
    pub cluster: Arc<str>,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterReasonLabels {
    pub cluster: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub cluster: Arc<str>,
    pub endpoint: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub cluster: Arc<str>,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    pub flag: Arc<str>,
    pub result: &'static str,
}

/// `spur_authz_decisions_total`: one per request (or tcp connection) a policy decided, by
/// the deciding rule (`default` when none); and one per audit rule that would deny it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub listener: Arc<str>,
    pub rule: Arc<str>,
    /// `allow`, `deny` or `audit_would_deny`.
    pub decision: &'static str,
}

/// `spur_rate_limited_total`: requests over a rate limit (route empty: the listener's own).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    /// `enforce` (answered 429) or `shadow` (let through).
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitShareLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerReasonLabels {
    pub listener: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Which side a QUIC figure belongs to: `listener="…"` (downstream) or `cluster="…"`
/// (upstream), so one metric family covers both as SPEC names it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    Listener(Arc<str>),
    Cluster(Arc<str>),
}

impl EncodeLabelSet for Side {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self {
            Side::Listener(n) => [("listener", n.clone())].encode(encoder),
            Side::Cluster(n) => [("cluster", n.clone())].encode(encoder),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub type SideReasonLabels = (Side, ReasonLabel);

/// The request series of one (listener, route, cluster), resolved when a snapshot is
/// compiled: `spur_requests_total` by code and `spur_request_duration_seconds`.
pub struct TargetMetrics {
    pub requests: CodeCounters<RequestLabels>,
    pub duration: Histogram,
}

impl TargetMetrics {
    pub fn new(
        m: &Metrics,
        listener: &Arc<str>,
        route: &Arc<str>,
        cluster: &Arc<str>,
    ) -> TargetMetrics {
        let labels = RouteLabels {
            listener: listener.clone(),
            route: route.clone(),
            cluster: cluster.clone(),
        };
        let duration = m.request_duration.get_or_create(&labels).clone();
        TargetMetrics {
            requests: CodeCounters::new(
                &m.requests,
                RequestLabels {
                    listener: labels.listener,
                    route: labels.route,
                    cluster: labels.cluster,
                    code: 0,
                },
            ),
            duration,
        }
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Declares [`Metrics`]: each field, its type and initial value, its Prometheus name
/// (prometheus-client adds `_total` to counters) and its help text, registered in order.
macro_rules! define_metrics {
    ($( $(#[$doc:meta])* $field:ident: $ty:ty = $init:expr, $name:literal, $help:literal; )*) => {
        pub struct Metrics {
            pub registry: Registry,
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Metrics {
            pub fn new() -> Metrics {
                let mut registry = Registry::default();
                crate::process_metrics::register(&mut registry);
                $(
                    let $field: $ty = $init;
                    registry.register($name, $help, $field.clone());
                )*
                Metrics { registry, $($field,)* }
            }
        }
    };
}

define_metrics! {
    requests: Family<RequestLabels, Counter> = Family::default(),
        "spur_requests", "Requests answered, by route, cluster and status code";
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(duration_histogram),
        "spur_request_duration_seconds", "Time from request received to the end of the response body";
    upstream_requests: Family<UpstreamLabels, Counter> = Family::default(),
        "spur_upstream_requests", "Tries sent upstream (retries included), by endpoint and status code (0: no response)";
    tcp_connections: Family<TcpLabels, Counter> = Family::default(),
        "spur_tcp_connections", "Connections of tcp listeners, by endpoint and result (connected, refused, overloaded, no_healthy_endpoint)";
    tcp_bytes: Family<TcpBytesLabels, Counter> = Family::default(),
        "spur_tcp_bytes", "Bytes relayed by tcp listeners: upstream (client to endpoint) and downstream";
    connections_active: Family<ListenerLabels, Gauge> = Family::default(),
        "spur_connections_active", "Open downstream connections";
    /// Connections and requests refused before routing: over max_connections, malformed,
    /// headers too large, slow headers.
    rejected: Family<ListenerReasonLabels, Counter> = Family::default(),
        "spur_downstream_rejected", "Connections or requests refused before routing, by reason";
    config_version: Gauge = Gauge::default(),
        "spur_config_version", "Version of the applied config";
    config_updates: Family<ResultLabels, Counter> = Family::default(),
        "spur_config_updates", "Config updates, applied or rejected";
    retries: Family<ClusterReasonLabels, Counter> = Family::default(),
        "spur_retries", "Retries sent, by the reason of the failed try";
    retry_budget_exhausted: Family<ClusterLabels, Counter> = Family::default(),
        "spur_retry_budget_exhausted", "Retries refused because the route's retry budget was spent";
    /// Retries the policy wanted but could not make: the body was too large to replay.
    retry_skipped: Family<ClusterReasonLabels, Counter> = Family::default(),
        "spur_retry_skipped", "Retries not made for another reason than the budget (body_too_large)";
    endpoint_ejected: Family<EndpointLabels, Gauge> = Family::default(),
        "spur_endpoint_ejected", "1 while the endpoint is ejected by outlier detection";
    endpoint_healthy: Family<EndpointLabels, Gauge> = Family::default(),
        "spur_endpoint_healthy", "1 while active health checks pass (or none are configured)";
    circuit_open: Family<ClusterReasonLabels, Counter> = Family::default(),
        "spur_circuit_open", "Times a breaker refused or removed capacity: ejection, max_requests, max_pending";
    /// Downstream TLS handshakes that failed, by reason (`no_client_cert`, `unknown_ca`,
    /// `expired`, `identity_not_allowed`, `timeout`...).
    tls_handshake_errors: Family<ListenerReasonLabels, Counter> = Family::default(),
        "spur_tls_handshake_errors", "Downstream TLS handshakes that failed, by reason";
    /// TLS handshakes to upstream endpoints that failed, by reason
    /// (`identity_not_expected`, `unknown_ca`, `name_mismatch`, `peer_alert`...).
    upstream_tls_errors: Family<ClusterReasonLabels, Counter> = Family::default(),
        "spur_upstream_tls_handshake_errors", "TLS handshakes to upstream endpoints that failed, by reason";
    authz_decisions: Family<AuthzLabels, Counter> = Family::default(),
        "spur_authz_decisions", "Authorization decisions, by listener, deciding rule (default: none matched) and decision (allow, deny, audit_would_deny)";
    flag_evaluations: Family<FlagLabels, Counter> = Family::default(),
        "spur_flag_evaluations", "Flag decisions, by flag and result (on, off); decisions kept from a trusted peer count too";
    mirror_requests: Family<MirrorLabels, Counter> = Family::default(),
        "spur_mirror_requests", "Mirrored copies by outcome: same, differ (status or body hash), error, dropped";
    quic_connections_active: Family<Side, Gauge> = Family::default(),
        "spur_quic_connections_active", "Open QUIC connections, on a listener or to a cluster";
    /// QUIC handshakes that failed, by side and reason (`no_client_cert`, `unknown_ca`,
    /// `identity_not_expected`, `peer_alert`, `timeout`...).
    quic_handshake_errors: Family<SideReasonLabels, Counter> = Family::default(),
        "spur_quic_handshake_errors", "QUIC handshakes that failed, on a listener or to a cluster, by reason";
    /// HTTP/3 request streams, by side.
    quic_streams: Family<Side, Counter> = Family::default(),
        "spur_quic_streams", "HTTP/3 request streams, on a listener or to a cluster";
    /// Times an http3 cluster turned to its TCP fallback for an endpoint.
    quic_fallback: Family<ClusterLabels, Counter> = Family::default(),
        "spur_quic_fallback", "Times an http3 cluster fell back to TCP for an endpoint after QUIC failed";
    rate_limited: Family<LimitLabels, Counter> = Family::default(),
        "spur_rate_limited", "Requests over a rate limit, by listener, route (empty: the listener's limit) and mode (enforce: answered 429; shadow: let through)";
    rate_limit_share: Family<LimitShareLabels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default(),
        "spur_rate_limit_share", "This proxy's share of a scope: group rate limit, as assigned by the control plane (1 until the first assignment)";
    lb_panic: Family<ClusterLabels, Counter> = Family::default(),
        "spur_lb_panic", "Endpoint choices made in panic mode: fewer than panic_threshold percent of the cluster's endpoints were available, so all were candidates";
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Counts a failed TLS handshake to an endpoint of `cluster`.
    pub fn upstream_tls_error(&self, cluster: &Arc<str>, reason: &'static str) {
        self.upstream_tls_errors
            .get_or_create(&ClusterReasonLabels {
                cluster: cluster.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a config update: `applied` or `rejected`.
    pub fn count_update(&self, result: &'static str) {
        self.config_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn reject(&self, listener: &Arc<str>, reason: &'static str) {
        self.rejected
            .get_or_create(&ListenerReasonLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
