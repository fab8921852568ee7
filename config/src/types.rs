//! The configuration file as types: every field of SPEC's schema, with its default. Routes
//! are in [`crate::route`], clusters in [`crate::cluster`].
//!
//! Values are parsed here, once (addresses, header names, identities: see
//! [`crate::values`]); a wrong shape or an unparsable value is a parse error at its path.
//! Everything that relates one field to another (a route naming a cluster that exists, two
//! listeners on one port) is checked afterwards by [`crate::validate`], so that a user sees
//! every mistake at once, each with its field path.

use crate::authz::Authz;
use crate::cluster::Cluster;
use crate::conditions::{CookieName, HashOn};
use crate::defaults;
use crate::edge::{RateLimit, XForwarded};
use crate::rollout::Rollout;
use crate::route::Route;
use crate::tracing::Tracing;
use crate::units::{ByteSize, Duration};
use crate::values::Parsed;
use crate::SpiffeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

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
    /// Worker threads (each its own runtime and listening sockets); default one per core.
    /// Read when the proxy starts (`TOKIO_WORKER_THREADS` overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub correlation: Correlation,
    /// What the access log writes beyond its fixed fields.
    #[serde(default, skip_serializing_if = "AccessLog::is_default")]
    pub access_log: AccessLog,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flags: BTreeMap<String, Flag>,
    /// Spans exported over OTLP; absent: no spans, `traceparent` passes unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// Transparent (`original_dst`) listeners: what happens to a connection whose original
    /// destination no cluster owns. Absent: [`Egress::Allow`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// Canary rollouts the control plane runs on this config's splits (idle until
    /// started; see [`crate::rollout`]). A proxy reads nothing here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, Rollout>,
}

/// `egress`: connections to addresses outside the mesh (no cluster owns them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Passed through as opaque bytes to the original destination.
    #[default]
    Allow,
    /// Refused: closed (opaque), or 404 `no_route` (HTTP).
    Deny,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin server (`/metrics /ready /live /config /clusters`).
    #[serde(default = "defaults::admin_listen")]
    pub listen: Parsed<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correlation {
    #[serde(default = "defaults::request_id_header")]
    pub request_id_header: Parsed<http::HeaderName>,
    /// Add a UUIDv7 request ID where the request has none.
    #[serde(default = "defaults::yes")]
    pub generate: bool,
    /// W3C `traceparent` on every upstream request: a request without one gets a new
    /// trace (unsampled unless `tracing` samples it). With `tracing`, each hop is a span
    /// of its own; without, a caller's `traceparent` passes unchanged.
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
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// Write the query string in `path` (default off: queries carry tokens and personal
    /// data more often than paths do).
    #[serde(default)]
    pub query: bool,
}

impl AccessLog {
    fn is_default(&self) -> bool {
        *self == AccessLog::default()
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
    pub listen: Parsed<SocketAddr>,
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
    /// Keep paths with an encoded slash (`%2F`, `%5C`) or a backslash, as sent, instead of
    /// refusing them (400 `invalid_path`): for applications that give them a meaning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_encoded_slashes: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Who may send what: see [`crate::authz`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// A rate limit on every request of the listener (before routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// How far forwarding headers from the client are believed (default: not at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_forwarded: Option<XForwarded>,
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
    pub allow_identities: Vec<SpiffeId>,
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
    /// The longest wait between two reads of a request body (408 `body_timeout` after).
    #[serde(default = "defaults::body_timeout")]
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: defaults::max_connections(),
            max_header_bytes: defaults::max_header_bytes(),
            header_timeout: defaults::header_timeout(),
            idle_timeout: defaults::idle_timeout(),
            body_timeout: defaults::body_timeout(),
        }
    }
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
    pub header: Option<Parsed<http::HeaderName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieName>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<Parsed<HashOn>>,
}
