//! The `tracing` block: where spans go (OTLP over HTTP/protobuf), which new traces are
//! sampled, and which trace-context formats are read and written.
//!
//! Without the block, Spur makes no spans: a caller's `traceparent` passes unchanged and
//! a request without one gets a new, unsampled trace (see `correlation.trace_context`),
//! so Spur never forces the services behind it to record.

use crate::values::{text_serde, ConfigValue, Parsed};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP traces URL (`http://otel-collector:4318/v1/traces`).
    pub otlp_endpoint: Parsed<OtlpEndpoint>,
    /// The share of new traces (requests that came without a sampling decision) that are
    /// sampled, 0 to 1. A caller's decision is kept.
    #[serde(default = "one")]
    pub sampling: f64,
    /// `service.name` of the spans; default the node name, else `spur`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The formats read from requests and written upstream.
    #[serde(default = "both")]
    pub propagation: Vec<Propagation>,
}

fn one() -> f64 {
    1.0
}

fn both() -> Vec<Propagation> {
    vec![Propagation::W3c, Propagation::B3]
}

/// A trace-context format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Propagation {
    /// W3C Trace Context: `traceparent` and `tracestate`.
    W3c,
    /// Zipkin's B3: the single `b3` header or the `x-b3-*` headers.
    B3,
}

/// An OTLP/HTTP endpoint: `http://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpEndpoint {
    pub uri: http::Uri,
}

impl OtlpEndpoint {
    /// `host:port` (port 80 when none is written).
    pub fn authority(&self) -> String {
        let host = self.uri.host().unwrap_or_default();
        format!("{host}:{}", self.uri.port_u16().unwrap_or(80))
    }
}

const OTLP: &str = "an OTLP/HTTP URL such as http://otel-collector:4318/v1/traces";

impl ConfigValue for OtlpEndpoint {
    const EXPECTED: &'static str = OTLP;

    fn parse_value(text: &str) -> Result<OtlpEndpoint, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|_| format!("`{text}` is not {OTLP}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s @ ("https" | "grpc" | "grpcs")) => {
                return Err(format!(
                    "`{s}://` is not supported yet: OTLP over plain HTTP/protobuf (`http://`) is"
                ))
            }
            _ => return Err(format!("`{text}` is not {OTLP}")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("`{text}` has no host: expected {OTLP}"));
        }
        Ok(OtlpEndpoint { uri })
    }
}

impl fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.uri)
    }
}

text_serde!(OtlpEndpoint);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = OtlpEndpoint::parse_value("http://otel:4318/v1/traces").unwrap();
        assert_eq!(e.authority(), "otel:4318");
        assert_eq!(e.uri.path(), "/v1/traces");
        assert_eq!(
            OtlpEndpoint::parse_value("http://otel/v1/traces")
                .unwrap()
                .authority(),
            "otel:80"
        );
        let grpc = OtlpEndpoint::parse_value("grpc://otel:4317").unwrap_err();
        assert!(grpc.contains("not supported yet"), "{grpc}");
        for bad in ["otel:4318", "", "ftp://x/y", "http://"] {
            assert!(OtlpEndpoint::parse_value(bad).is_err(), "{bad} accepted");
        }
    }
}
