//! Clusters: where requests go (static endpoints, a DNS name, or a Kubernetes Service), how
//! they are spoken to, and what protects them (circuit breaker, health checks).

use crate::defaults;
use crate::grpc::GrpcCode;
use crate::units::Duration;
use crate::values::{parse_port, ConfigValue, HostPort, Parsed, SOCKET_ADDR};
use crate::SpiffeId;
use serde::{de, Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::SocketAddr;

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
    pub dns: Option<Parsed<HostPort>>,
    /// `service.namespace:port`, from the Kubernetes API through the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<Parsed<K8sTarget>>,
    /// Addresses the cluster answers for on `original_dst` listeners besides its endpoints:
    /// a Kubernetes Service's ClusterIP and port (rendered by `spur control --mesh`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_addresses: Vec<Parsed<SocketAddr>>,
    /// Connections to this cluster on a transparent listener skip protocol detection and
    /// go as opaque TCP (`spur.dev/opaque-ports`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque: bool,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<UpstreamProtocol>,
    /// `http3` clusters: how long an endpoint stays on the fallback before QUIC is tried
    /// again (default [`defaults::fallback_period`]; see [`Cluster::fallback_period`]).
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
    /// Percent of endpoints that must be available; below it (and above none) requests
    /// go to all of them. Default [`defaults::PANIC_THRESHOLD`]; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<crate::edge::SlowStart>,
    /// The gRPC statuses that count as an endpoint's failure (breaker, latency estimate);
    /// default [`GrpcCode::default_failures`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_failure_codes: Option<Vec<GrpcCode>>,
}

impl Cluster {
    /// `grpc_failure_codes`, or the default.
    pub fn grpc_failure_codes(&self) -> Vec<GrpcCode> {
        self.grpc_failure_codes
            .clone()
            .unwrap_or_else(GrpcCode::default_failures)
    }

    /// `fallback_period`, or its default.
    pub fn panic_threshold(&self) -> u32 {
        self.panic_threshold.unwrap_or(defaults::PANIC_THRESHOLD)
    }

    pub fn fallback_period(&self) -> Duration {
        self.fallback_period
            .unwrap_or_else(defaults::fallback_period)
    }
}

/// An endpoint: `"10.0.0.11:8080"` or `{ address: "10.0.0.12:8080", weight: 2 }`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EndpointSpec {
    Address(Parsed<SocketAddr>),
    Weighted(WeightedEndpoint),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    pub address: Parsed<SocketAddr>,
    #[serde(default = "defaults::one")]
    pub weight: u32,
}

impl EndpointSpec {
    pub fn address(&self) -> &Parsed<SocketAddr> {
        match self {
            EndpointSpec::Address(a) => a,
            EndpointSpec::Weighted(w) => &w.address,
        }
    }
    pub fn addr(&self) -> SocketAddr {
        *self.address().get()
    }
    pub fn weight(&self) -> u32 {
        match self {
            EndpointSpec::Address(_) => 1,
            EndpointSpec::Weighted(w) => w.weight,
        }
    }
}

/// By hand rather than `untagged`: a bad address then says what is wrong with it, at its
/// own path, instead of "did not match any variant".
impl<'de> Deserialize<'de> for EndpointSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = EndpointSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{SOCKET_ADDR}, or {{ address, weight }}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointSpec, E> {
                Parsed::parse(v).map(EndpointSpec::Address).map_err(|m| {
                    // A host name where an address belongs: say where host names go.
                    if v.contains(':') && !v.contains(char::is_whitespace) {
                        E::custom(format!(
                            "{m} (for a host name, use `dns:` instead of `endpoints`)"
                        ))
                    } else {
                        E::custom(m)
                    }
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<EndpointSpec, A::Error> {
                WeightedEndpoint::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(EndpointSpec::Weighted)
            }
        }
        d.deserialize_any(V)
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
    /// The name to verify in the server's certificate (and send as SNI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<Parsed<ServerName>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_identities: Vec<SpiffeId>,
}

/// A TLS server name: a DNS name or an IP address, by rustls's rules (the ones the
/// proxy's TLS client applies).
pub type ServerName = rustls_pki_types::ServerName<'static>;

impl ConfigValue for ServerName {
    const EXPECTED: &'static str = "a DNS name or IP address such as checkout.shop.svc";

    fn parse_value(text: &str) -> Result<ServerName, String> {
        ServerName::try_from(text.to_string()).map_err(|_| {
            format!("`{text}` is not a DNS name or IP address such as checkout.shop.svc")
        })
    }
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
        let port = parse_port(port).ok_or_else(bad)?;
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

impl ConfigValue for K8sTarget {
    const EXPECTED: &'static str = "name.namespace:port (a Kubernetes Service)";

    fn parse_value(text: &str) -> Result<K8sTarget, String> {
        text.parse()
    }
}

impl fmt::Display for K8sTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{}", self.name, self.namespace, self.port)
    }
}
