//! The proxy's Prometheus metrics, with SPEC's names.
//!
//! Label sets hold `Arc<str>` names made when a config is compiled, so recording a request
//! clones a few pointers and never formats a string.

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

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    /// Connections and requests refused before routing: over max_connections, malformed,
    /// headers too large, slow headers.
    pub rejected: Family<ListenerReasonLabels, Counter>,
    pub config_version: Gauge,
    pub config_updates: Family<ResultLabels, Counter>,
    pub retries: Family<ClusterReasonLabels, Counter>,
    pub retry_budget_exhausted: Family<ClusterLabels, Counter>,
    /// Retries the policy wanted but could not make: the body was too large to replay.
    pub retry_skipped: Family<ClusterReasonLabels, Counter>,
    pub endpoint_ejected: Family<EndpointLabels, Gauge>,
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    pub circuit_open: Family<ClusterReasonLabels, Counter>,
    /// Downstream TLS handshakes that failed, by reason (`no_client_cert`, `unknown_ca`,
    /// `expired`, `identity_not_allowed`, `timeout`...).
    pub tls_handshake_errors: Family<ListenerReasonLabels, Counter>,
    /// TLS handshakes to upstream endpoints that failed, by reason
    /// (`identity_not_expected`, `unknown_ca`, `name_mismatch`, `peer_alert`...).
    pub upstream_tls_errors: Family<ClusterReasonLabels, Counter>,
    pub flag_evaluations: Family<FlagLabels, Counter>,
    pub mirror_requests: Family<MirrorLabels, Counter>,
    pub quic_connections_active: Family<Side, Gauge>,
    /// QUIC handshakes that failed, by side and reason (`no_client_cert`, `unknown_ca`,
    /// `identity_not_expected`, `peer_alert`, `timeout`...).
    pub quic_handshake_errors: Family<SideReasonLabels, Counter>,
    /// HTTP/3 request streams, by side.
    pub quic_streams: Family<Side, Counter>,
    /// Times an http3 cluster turned to its TCP fallback for an endpoint.
    pub quic_fallback: Family<ClusterLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        crate::process_metrics::register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "spur_requests",
            "Requests answered, by route, cluster and status code",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register(
            "spur_request_duration_seconds",
            "Time from request received to the end of the response body",
            request_duration.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "spur_upstream_requests",
            "Tries sent upstream (retries included), by endpoint and status code (0: no response)",
            upstream_requests.clone(),
        );
        let connections_active = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "spur_connections_active",
            "Open downstream connections",
            connections_active.clone(),
        );
        let rejected = Family::<ListenerReasonLabels, Counter>::default();
        registry.register(
            "spur_downstream_rejected",
            "Connections or requests refused before routing, by reason",
            rejected.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "spur_config_version",
            "Version of the applied config",
            config_version.clone(),
        );
        let config_updates = Family::<ResultLabels, Counter>::default();
        registry.register(
            "spur_config_updates",
            "Config updates, applied or rejected",
            config_updates.clone(),
        );
        let retries = Family::<ClusterReasonLabels, Counter>::default();
        registry.register(
            "spur_retries",
            "Retries sent, by the reason of the failed try",
            retries.clone(),
        );
        let retry_budget_exhausted = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "spur_retry_budget_exhausted",
            "Retries refused because the route's retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let retry_skipped = Family::<ClusterReasonLabels, Counter>::default();
        registry.register(
            "spur_retry_skipped",
            "Retries not made for another reason than the budget (body_too_large)",
            retry_skipped.clone(),
        );
        let endpoint_ejected = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "spur_endpoint_ejected",
            "1 while the endpoint is ejected by outlier detection",
            endpoint_ejected.clone(),
        );
        let endpoint_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "spur_endpoint_healthy",
            "1 while active health checks pass (or none are configured)",
            endpoint_healthy.clone(),
        );
        let circuit_open = Family::<ClusterReasonLabels, Counter>::default();
        registry.register(
            "spur_circuit_open",
            "Times a breaker refused or removed capacity: ejection, max_requests, max_pending",
            circuit_open.clone(),
        );
        let tls_handshake_errors = Family::<ListenerReasonLabels, Counter>::default();
        registry.register(
            "spur_tls_handshake_errors",
            "Downstream TLS handshakes that failed, by reason",
            tls_handshake_errors.clone(),
        );
        let upstream_tls_errors = Family::<ClusterReasonLabels, Counter>::default();
        registry.register(
            "spur_upstream_tls_handshake_errors",
            "TLS handshakes to upstream endpoints that failed, by reason",
            upstream_tls_errors.clone(),
        );
        let flag_evaluations = Family::<FlagLabels, Counter>::default();
        registry.register(
            "spur_flag_evaluations",
            "Flag decisions, by flag and result (on, off); decisions kept from a trusted peer count too",
            flag_evaluations.clone(),
        );
        let mirror_requests = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "spur_mirror_requests",
            "Mirrored copies by outcome: same, differ (status or body hash), error, dropped",
            mirror_requests.clone(),
        );
        let quic_connections_active = Family::<Side, Gauge>::default();
        registry.register(
            "spur_quic_connections_active",
            "Open QUIC connections, on a listener or to a cluster",
            quic_connections_active.clone(),
        );
        let quic_handshake_errors = Family::<SideReasonLabels, Counter>::default();
        registry.register(
            "spur_quic_handshake_errors",
            "QUIC handshakes that failed, on a listener or to a cluster, by reason",
            quic_handshake_errors.clone(),
        );
        let quic_streams = Family::<Side, Counter>::default();
        registry.register(
            "spur_quic_streams",
            "HTTP/3 request streams, on a listener or to a cluster",
            quic_streams.clone(),
        );
        let quic_fallback = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "spur_quic_fallback",
            "Times an http3 cluster fell back to TCP for an endpoint after QUIC failed",
            quic_fallback.clone(),
        );
        Metrics {
            registry,
            quic_connections_active,
            quic_handshake_errors,
            quic_streams,
            quic_fallback,
            flag_evaluations,
            mirror_requests,
            tls_handshake_errors,
            upstream_tls_errors,
            retries,
            retry_budget_exhausted,
            retry_skipped,
            endpoint_ejected,
            endpoint_healthy,
            circuit_open,
            requests,
            request_duration,
            upstream_requests,
            connections_active,
            rejected,
            config_version,
            config_updates,
        }
    }

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
