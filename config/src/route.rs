//! A listener's routes: what a request must match, where it goes, and how it is retried,
//! mirrored and faulted.

use crate::authz::GrpcMatch;
use crate::conditions::{HashOn, RetryOn, UpgradeProtocol};
use crate::defaults;
use crate::edge::{Cors, HeaderRules, RateLimit, Redirect, Rewrite};
use crate::units::{ByteSize, Duration};
use crate::values::{HeaderRegex, Parsed};
use serde::{Deserialize, Serialize};

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
    pub hash_on: Option<Parsed<HashOn>>,
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// The protocols a client may switch to with HTTP/1.1 `Upgrade` on this route (the
    /// connection then becomes a byte tunnel); default `[websocket]`. Other upgrades are
    /// stripped and the request goes on as a plain one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<Vec<Parsed<UpgradeProtocol>>>,
    /// Requests over this rate get 429 `rate_limited` (see [`crate::edge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Headers set, added and removed on the request the upstream receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
    /// Headers set, added and removed on the response the client receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Spur answers with a redirect; the route has no cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
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
    pub method: Option<Parsed<http::Method>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// gRPC calls to this service (and method): the path `/service/method` (or every
    /// method under `/service/`) of a request whose content-type is `application/grpc*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatch>,
    /// `original_dst` listeners: only connections whose original destination this cluster
    /// owns (one of its `service_addresses` or endpoints). How a Gateway API route whose
    /// parent is a Service applies to the traffic for that Service alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

/// One header condition: exactly one of `value` (exact), `present`, `regex` (whole value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: Parsed<http::HeaderName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<Parsed<HeaderRegex>>,
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
    pub retry_on: RetryOn,
    /// `reset` and `timeout` retry only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE,
    /// TRACE) unless this is set: a reset can come after the server acted on a POST.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub budget: Budget,
    #[serde(default = "defaults::max_body")]
    pub max_body: ByteSize,
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
