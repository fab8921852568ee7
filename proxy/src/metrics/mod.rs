//! The proxy's Prometheus metrics, with SPEC's names.
//!
//! Label sets hold `Arc<str>` names made when a config is compiled, so recording a request
//! clones a few pointers and never formats a string. The hottest series (requests and
//! upstream tries by status code) are resolved once per owner, see [`codes`].

pub mod codes;
pub mod target;
pub use codes::{CodeCounters, WithCode};
pub use target::{Finished, TargetMetrics};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// `spur_requests_total`: by status code, gRPC status (empty: not gRPC) and the verified
/// client identity (empty: none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
    pub code: u16,
    pub grpc_status: Option<u8>,
    pub client_id: Arc<str>,
}

impl WithCode for RequestLabels {
    fn with_code(&self, code: u16, grpc_status: Option<u8>) -> Self {
        RequestLabels {
            code,
            grpc_status,
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

/// `spur_request_duration_seconds`: by route target and verified client identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientRouteLabels {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
    pub client_id: Arc<str>,
}

/// An exemplar's labels: the trace of a sampled request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: TraceIdLabel,
}

/// A trace ID (32 lower-case hex digits) as a label value, without a `String`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct TraceIdLabel(pub [u8; 32]);

impl prometheus_client::encoding::EncodeLabelValue for TraceIdLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(std::str::from_utf8(&self.0).map_err(|_| std::fmt::Error)?)
    }
}

/// The request-duration histogram: with an exemplar (the trace ID) on sampled requests.
pub type DurationHistogram = HistogramWithExemplars<TraceLabel>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub cluster: Arc<str>,
    pub endpoint: Arc<str>,
    pub code: u16,
    pub grpc_status: Option<u8>,
}

impl WithCode for UpstreamLabels {
    fn with_code(&self, code: u16, grpc_status: Option<u8>) -> Self {
        UpstreamLabels {
            code,
            grpc_status,
            ..self.clone()
        }
    }
}

/// `spur_egress_total{decision}`: connections to addresses no cluster owns.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    pub decision: &'static str,
}

/// `spur_protocol_detected_total{listener,protocol}`: what detection decided.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectedLabels {
    pub listener: Arc<str>,
    pub protocol: &'static str,
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

/// Bucket bounds of the latency histograms, from 0.5 ms to 60 s (streams and slow
/// uploads are part of what a mesh carries).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub fn duration_histogram() -> DurationHistogram {
    HistogramWithExemplars::new(LATENCY_BUCKETS.into_iter())
}

pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
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
    request_duration: Family<ClientRouteLabels, DurationHistogram, fn() -> DurationHistogram> = Family::new_with_constructor(duration_histogram),
        "spur_request_duration_seconds", "Time from request received to the end of the response body, by client identity (exemplars: trace IDs of sampled requests)";
    response_first_byte: Family<RouteLabels, Histogram, fn() -> Histogram> = Family::new_with_constructor(latency_histogram),
        "spur_response_first_byte_seconds", "Time from request received to the response head";
    request_bytes: Family<RouteLabels, Counter> = Family::default(),
        "spur_request_bytes", "Request body bytes read from clients";
    response_bytes: Family<RouteLabels, Counter> = Family::default(),
        "spur_response_bytes", "Response body bytes sent to clients";
    upstream_requests: Family<UpstreamLabels, Counter> = Family::default(),
        "spur_upstream_requests", "Tries sent upstream (retries included), by endpoint and status code (0: no response)";
    tcp_connections: Family<TcpLabels, Counter> = Family::default(),
        "spur_tcp_connections", "Connections of tcp listeners, by endpoint and result (connected, refused, overloaded, no_healthy_endpoint)";
    tcp_bytes: Family<TcpBytesLabels, Counter> = Family::default(),
        "spur_tcp_bytes", "Bytes relayed by tcp listeners: upstream (client to endpoint) and downstream";
    egress: Family<EgressLabels, Counter> = Family::default(),
        "spur_egress", "Connections on transparent listeners to addresses no cluster owns, by decision (allow: passed through, deny: refused)";
    protocol_detected: Family<DetectedLabels, Counter> = Family::default(),
        "spur_protocol_detected", "Connections of transparent listeners by the protocol their first bytes showed (http1, http2, tls, opaque, skipped)";
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
    /// Spans not exported: the export queue was full, or the collector failed or was slow.
    trace_spans_dropped: Counter = Counter::default(),
        "spur_trace_spans_dropped", "Spans dropped: export queue full or the collector unreachable";
}

impl Metrics {
    /// The OpenMetrics text, exemplars included (for a scraper that asks for
    /// `application/openmetrics-text`).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// The same text without exemplars, which the Prometheus text format has no place for.
    pub fn encode(&self) -> String {
        let mut text = self.encode_openmetrics();
        if text.contains(" # {") {
            text = text
                .lines()
                .map(|l| l.split_once(" # {").map_or(l, |(sample, _)| sample))
                .fold(String::with_capacity(text.len()), |mut out, l| {
                    out.push_str(l);
                    out.push('\n');
                    out
                });
        }
        text
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
