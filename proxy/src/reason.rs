//! Every answer Spur makes itself, and every way a try can fail, named once.
//!
//! A [`Reason`] owns its status code, its `x-spur-error` value and its label in the access
//! log and in metrics (`spur_retries_total{reason}`, `spur_tcp_connections_total{result}`),
//! so the same failure cannot be called `upstream_unreachable` in one place and
//! `connect-failure` in another.

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No route matched and the listener has no default cluster (404).
    NoRoute,
    /// The listener was removed by a config push while the connection was open (503).
    ListenerRemoved,
    /// The route's timeout (whole request, retries included) or the per-try timeout (504).
    Timeout,
    /// Over the cluster's `max_requests` (and `max_pending`) (503).
    Overloaded,
    /// Every endpoint of the cluster is ejected, failing health checks, or none exist (503).
    NoHealthyEndpoint,
    /// No connection could be made to the endpoint (refused, unreachable, TLS failed) (502).
    UpstreamUnreachable,
    /// The connection to the endpoint broke before a whole response head arrived (502).
    UpstreamReset,
    /// The route's fault injection aborted the request (the configured status).
    Fault,
    /// The peer is not allowed on this listener (403).
    Forbidden,
    /// The request is malformed, or the client's own body broke off (400).
    BadRequest,
    /// The request head is over the listener's `max_header_bytes` (431).
    HeadersTooLarge,
    /// HTTP/1.1 without `Host` or with two; a `Host` that is not a host; an HTTP/2 or
    /// HTTP/3 `host` header that disagrees with `:authority` (400).
    InvalidHost,
    /// CONNECT: Spur is a reverse proxy, not a forward one, and tunnels nothing but the
    /// upgrades a route allows (405).
    MethodNotAllowed,
    /// The request has crossed more Spur proxies (`x-spur-hops`) than a request can without
    /// a routing loop (508).
    LoopDetected,
    /// The client sent nothing of its request body for the listener's `body_timeout` (408).
    BodyTimeout,
    /// A path that is not one (a bad percent-escape), or an encoded slash or backslash on a
    /// listener that does not allow them (400).
    InvalidPath,
    /// Over the route's or listener's `rate_limit` (429).
    RateLimited,
    /// A browser request from an origin the route's `cors` does not allow (403).
    CorsForbidden,
}

impl Reason {
    /// The status of a response Spur makes for this reason.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::ListenerRemoved
            | Reason::Overloaded
            | Reason::NoHealthyEndpoint
            | Reason::Fault => StatusCode::SERVICE_UNAVAILABLE,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::UpstreamUnreachable | Reason::UpstreamReset => StatusCode::BAD_GATEWAY,
            Reason::Forbidden => StatusCode::FORBIDDEN,
            Reason::BadRequest | Reason::InvalidHost | Reason::InvalidPath => {
                StatusCode::BAD_REQUEST
            }
            Reason::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::LoopDetected => StatusCode::LOOP_DETECTED,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::CorsForbidden => StatusCode::FORBIDDEN,
        }
    }

    /// The `grpc-status` of this answer to a gRPC client (sent with HTTP status `status`):
    /// `UNAVAILABLE` (14) when no endpoint could answer, `DEADLINE_EXCEEDED` (4),
    /// `PERMISSION_DENIED` (7), `UNIMPLEMENTED` (12) for no route, `RESOURCE_EXHAUSTED` (8)
    /// for a head too large or a rate limit; the rest as gRPC maps their HTTP status.
    pub fn grpc_status(self, status: StatusCode) -> u8 {
        match self {
            Reason::UpstreamUnreachable
            | Reason::UpstreamReset
            | Reason::NoHealthyEndpoint
            | Reason::Overloaded
            | Reason::ListenerRemoved => 14,
            Reason::Timeout => 4,
            Reason::Forbidden | Reason::CorsForbidden => 7,
            Reason::NoRoute => 12,
            Reason::HeadersTooLarge | Reason::RateLimited => 8,
            Reason::BadRequest
            | Reason::InvalidHost
            | Reason::InvalidPath
            | Reason::BodyTimeout
            | Reason::MethodNotAllowed
            | Reason::LoopDetected
            | Reason::Fault => crate::grpc::from_http(status.as_u16()),
        }
    }

    /// Whether this answer refuses what the client sent before anything went upstream, and
    /// is counted in `spur_downstream_rejected_total{reason}` (by [`Reason::as_str`]).
    pub fn rejects_client(self) -> bool {
        matches!(
            self,
            Reason::Forbidden
                | Reason::HeadersTooLarge
                | Reason::InvalidHost
                | Reason::InvalidPath
                | Reason::LoopDetected
                | Reason::MethodNotAllowed
                | Reason::RateLimited
                | Reason::CorsForbidden
        )
    }

    /// `x-spur-error`, the access log's `error` and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no_route",
            Reason::ListenerRemoved => "listener_removed",
            Reason::Timeout => "timeout",
            Reason::Overloaded => "overloaded",
            Reason::NoHealthyEndpoint => "no_healthy_endpoint",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::UpstreamReset => "upstream_reset",
            Reason::Fault => "fault",
            Reason::Forbidden => "forbidden",
            Reason::BadRequest => "bad_request",
            Reason::HeadersTooLarge => "headers_too_large",
            Reason::InvalidHost => "invalid_host",
            Reason::BodyTimeout => "body_timeout",
            Reason::LoopDetected => "loop_detected",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::InvalidPath => "invalid_path",
            Reason::RateLimited => "rate_limited",
            Reason::CorsForbidden => "cors_forbidden",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_statuses_are_errors() {
        let all = [
            Reason::NoRoute,
            Reason::ListenerRemoved,
            Reason::Timeout,
            Reason::Overloaded,
            Reason::NoHealthyEndpoint,
            Reason::UpstreamUnreachable,
            Reason::UpstreamReset,
            Reason::Fault,
            Reason::Forbidden,
            Reason::BadRequest,
            Reason::HeadersTooLarge,
            Reason::InvalidHost,
            Reason::InvalidPath,
            Reason::BodyTimeout,
            Reason::LoopDetected,
            Reason::MethodNotAllowed,
            Reason::RateLimited,
            Reason::CorsForbidden,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), all.len());
        for r in all {
            assert!(r.status().as_u16() >= 400, "{r}");
        }
        assert_eq!(
            Reason::UpstreamUnreachable.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(Reason::Overloaded.status(), StatusCode::SERVICE_UNAVAILABLE);
        // SPEC: the gRPC statuses of Spur's own answers.
        for (r, code) in [
            (Reason::UpstreamUnreachable, 14),
            (Reason::UpstreamReset, 14),
            (Reason::NoHealthyEndpoint, 14),
            (Reason::Overloaded, 14),
            (Reason::Timeout, 4),
            (Reason::Forbidden, 7),
            (Reason::NoRoute, 12),
        ] {
            assert_eq!(r.grpc_status(r.status()), code, "{r}");
        }
        assert_eq!(
            Reason::Fault.grpc_status(StatusCode::SERVICE_UNAVAILABLE),
            14
        );
    }
}
