//! The configuration file as types: every field of SPEC's schema, with its default.
//!
//! Parsing only checks shape (unknown fields, wrong types); everything that relates one field
//! to another (a route naming a cluster that exists, weights that add up to something) is
//! checked afterwards by [`crate::validate`], so that a user sees every mistake at once, each
//! with its field path.

use crate::units::{ByteSize, Duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A whole proxy configuration: what one `spur proxy` runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Label in metrics and the name reported to the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// On SIGTERM: stop accepting, finish in-flight requests for at most this long.
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub correlation: Correlation,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, Flag>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin server (`/metrics /ready /live /config /clusters`).
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correlation {
    #[serde(default = "defaults::request_id_header")]
    pub request_id_header: String,
    /// Add a UUIDv7 request ID where the request has none.
    #[serde(default = "defaults::yes")]
    pub generate: bool,
    /// W3C `traceparent`: a child span per hop, a new trace where absent.
    #[serde(default = "defaults::yes")]
    pub trace_context: bool,
}

impl Default for Correlation {
    fn default() -> Self {
        Correlation {
            request_id_header: defaults::request_id_header(),
            generate: true,
            trace_context: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1, and HTTP/2 by ALPN or prior knowledge.
    #[default]
    Http,
    /// Opaque bytes, both ways.
    Tcp,
    /// HTTP/3 over QUIC.
    Http3,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub listen: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// tcp listeners: where bytes go; http listeners: the default when no route matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub trust_incoming_flags: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alt_svc_h3: Option<u16>,
    #[serde(default)]
    pub original_dst: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// Without `cert` and `key` the listener presents the proxy's workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_identities: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: ByteSize,
    #[serde(default = "defaults::header_timeout")]
    pub header_timeout: Duration,
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: defaults::max_connections(),
            max_header_bytes: defaults::max_header_bytes(),
            header_timeout: defaults::header_timeout(),
            idle_timeout: defaults::idle_timeout(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitTarget>,
    /// Stickiness for `split`: `header:NAME` or `cookie:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
}

/// One header condition: exactly one of `value` (exact), `present`, `regex` (whole value).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitTarget {
    pub cluster: String,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Total tries, the first included.
    #[serde(default = "defaults::attempts")]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default = "defaults::retry_on", alias = "on")]
    pub retry_on: Vec<String>,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub budget: Budget,
    #[serde(default = "defaults::max_body")]
    pub max_body: ByteSize,
    /// Let `reset` and `timeout` retry non-idempotent methods (POST, PATCH) too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry_non_idempotent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "defaults::backoff_base")]
    pub base: Duration,
    #[serde(default = "defaults::backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: defaults::backoff_base(),
            max: defaults::backoff_max(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default = "defaults::budget_ratio")]
    pub ratio: f64,
    #[serde(default = "defaults::budget_min_per_sec")]
    pub min_per_sec: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            ratio: defaults::budget_ratio(),
            min_per_sec: defaults::budget_min_per_sec(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub cluster: String,
    #[serde(default = "defaults::hundred")]
    pub percent: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: f64,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: f64,
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
    Http3,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Peak-EWMA latency with power-of-two-choices.
    #[default]
    Ewma,
    LeastRequest,
    RoundRobin,
    RingHash,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointSpec>,
    /// `host:port`, resolved periodically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// `service.namespace:port`, from the Kubernetes API through the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<String>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<UpstreamProtocol>,
    /// http3 clusters with `fallback`: how long an endpoint stays on TCP after QUIC failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_period: Option<Duration>,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// An endpoint: `"10.0.0.11:8080"` or `{ address: "10.0.0.12:8080", weight: 2 }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EndpointSpec {
    Address(String),
    Weighted(WeightedEndpoint),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    pub address: String,
    #[serde(default = "defaults::one")]
    pub weight: u32,
}

impl EndpointSpec {
    pub fn address(&self) -> &str {
        match self {
            EndpointSpec::Address(a) => a,
            EndpointSpec::Weighted(w) => &w.address,
        }
    }
    pub fn weight(&self) -> u32 {
        match self {
            EndpointSpec::Address(_) => 1,
            EndpointSpec::Weighted(w) => w.weight,
        }
    }
}

/// TLS origination to a cluster's endpoints. `Eq + Hash`: the proxy keys upstream
/// connection pools by it, so clusters with different TLS settings never share a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_identities: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "defaults::ejection_time")]
    pub ejection_time: Duration,
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
    #[serde(default = "defaults::max_requests")]
    pub max_requests: u32,
    #[serde(default = "defaults::max_pending")]
    pub max_pending: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: String,
    #[serde(default = "defaults::hc_interval")]
    pub interval: Duration,
    #[serde(default = "defaults::hc_timeout")]
    pub timeout: Duration,
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FlagRule>,
}

/// One rule of a flag: exactly one of `header` + `values`, `cookie` + `values`, or
/// `percent` (+ optional `hash_on`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
}

/// Default values, named so that the schema reads as documentation.
pub mod defaults {
    use super::*;
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9901".into()
    }
    pub fn request_id_header() -> String {
        "x-request-id".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn one() -> u32 {
        1
    }
    pub fn hundred() -> f64 {
        100.0
    }
    pub fn max_connections() -> u32 {
        10_000
    }
    pub fn max_header_bytes() -> ByteSize {
        ByteSize::kib(64)
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn attempts() -> u32 {
        2
    }
    pub fn retry_on() -> Vec<String> {
        vec!["connect-failure".into(), "reset".into()]
    }
    pub fn backoff_base() -> Duration {
        Duration::from_millis(25)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_millis(250)
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min_per_sec() -> u32 {
        10
    }
    pub fn max_body() -> ByteSize {
        ByteSize::kib(64)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn ejection_time() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
    pub fn max_requests() -> u32 {
        1024
    }
    pub fn max_pending() -> u32 {
        0
    }
    pub fn hc_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn hc_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
}

/// What a `k8s:` cluster names: `name.namespace:port`, a Kubernetes Service, its namespace
/// and the port of its endpoints (see [`K8sTarget::from_str`] for the rules).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct K8sTarget {
    pub name: String,
    pub namespace: String,
    pub port: u16,
}

/// The message for a `k8s:` value that is not `name.namespace:port`.
pub const K8S_TARGET_FORM: &str = "expected name.namespace:port (a Service, its namespace and \
     a port, e.g. checkout.shop:8080; names in lowercase letters, digits and `-`)";

impl std::str::FromStr for K8sTarget {
    type Err = String;

    /// `name.namespace:port`: the Service name a DNS-1035 label (a lowercase letter, then
    /// lowercase letters, digits and `-`, at most 63), the namespace a DNS-1123 label (the
    /// same, but it may start with a digit), the port 1-65535.
    fn from_str(s: &str) -> Result<K8sTarget, String> {
        fn label(l: &str) -> bool {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        }
        let bad = || format!("`{s}`: {K8S_TARGET_FORM}");
        let (svc, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let (name, namespace) = svc.split_once('.').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name_ok = label(name) && name.starts_with(|c: char| c.is_ascii_lowercase());
        if port == 0 || !name_ok || !label(namespace) {
            return Err(bad());
        }
        Ok(K8sTarget {
            name: name.into(),
            namespace: namespace.into(),
            port,
        })
    }
}

impl std::fmt::Display for K8sTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}:{}", self.name, self.namespace, self.port)
    }
}
