//! The retry decision: whether a failed try is tried again, and after how long.
//!
//! The policy only looks at the outcome of a try; the retry loop in `crate::http::tries` does
//! the I/O, and [`super::budget`] decides whether the cluster can afford another try.
//!
//! A request is retried only when its body can be replayed: it was small enough
//! (`max_body`) to be buffered whole before the first try. A larger body is streamed once
//! and never retried.
//!
//! A reset or a timeout can come after the server acted on the request: an order placed,
//! then the connection dropped. So `reset` and `timeout` retry only idempotent methods
//! (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, PUT, DELETE, TRACE) unless the route says
//! `retry_non_idempotent: true`. A connect failure, or a connection that failed before any
//! byte of the request was written (`reset-before-request`), never reached the server, so
//! those retry every method. A failure of the client's own body is never retried.

use crate::grpc::Codes;
use crate::reason::Reason;
use spur_config::{GrpcCode, Retry, RetryCondition};
use std::time::Duration;

/// What one try came to, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint could not be connected to: the request never left.
    ConnectFailure,
    /// A connection was made, but it failed before any byte of the request was written.
    ResetBeforeRequest,
    /// The connection broke after the request was (partly) written, before a response head.
    Reset,
    /// The per-try timeout fired before a response head arrived.
    Timeout,
    /// A response head arrived with this status.
    Status(u16),
    /// A gRPC call's status, from a trailers-only response head (decided before anything
    /// reached the client) or from the trailers at the end of its stream.
    Grpc(u8),
    /// The client's own request body broke off (or the client left): not the endpoint's
    /// doing, so it is never charged to it nor retried.
    ClientAbort,
}

impl Outcome {
    /// The `reason` label of `spur_retries_total` for a retry caused by this outcome: the
    /// same words as `x-spur-error` for the failures Spur names, the status for the others.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Status(s) => status_label(*s),
            Outcome::Grpc(c) => GrpcCode::from_number(*c).map_or("grpc", GrpcCode::name),
            other => other.failure_reason().map_or("-", Reason::as_str),
        }
    }

    /// What Spur answers when this is the last try's outcome and no response came.
    pub fn failure_reason(&self) -> Option<Reason> {
        match self {
            Outcome::ConnectFailure => Some(Reason::UpstreamUnreachable),
            Outcome::ResetBeforeRequest | Outcome::Reset => Some(Reason::UpstreamReset),
            Outcome::Timeout => Some(Reason::Timeout),
            Outcome::ClientAbort => Some(Reason::BadRequest),
            Outcome::Status(_) | Outcome::Grpc(_) => None,
        }
    }

    /// Whether this outcome counts against an endpoint (breaker, EWMA): connect failures,
    /// resets, timeouts, 5xx, and the cluster's `grpc_failures`. Never what the client did.
    pub fn is_failure(&self, grpc_failures: Codes) -> bool {
        match self {
            Outcome::Status(s) => *s >= 500,
            Outcome::Grpc(c) => grpc_failures.contains(*c),
            Outcome::ClientAbort => false,
            _ => true,
        }
    }
}

/// Methods that may be sent twice with the effect of once (RFC 9110 §9.2.2).
pub fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

fn status_label(s: u16) -> &'static str {
    match s {
        409 => "409",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s >= 500 => "5xx",
        _ => "4xx",
    }
}

/// A compiled `retry` block.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub max_body: u64,
    backoff_base: Duration,
    backoff_max: Duration,
    connect_failure: bool,
    reset_before_request: bool,
    reset: bool,
    timeout: bool,
    non_idempotent: bool,
    any_5xx: bool,
    retriable_4xx: bool,
    codes: Vec<u16>,
    grpc: Codes,
}

impl RetryPolicy {
    pub fn new(r: &Retry) -> RetryPolicy {
        let mut p = RetryPolicy {
            attempts: r.attempts.max(1),
            per_try_timeout: r.per_try_timeout.map(|d| d.get()),
            max_body: r.max_body.get(),
            backoff_base: r.backoff.base.get(),
            backoff_max: r.backoff.max.get(),
            connect_failure: false,
            reset_before_request: false,
            reset: false,
            timeout: false,
            non_idempotent: r.retry_non_idempotent,
            any_5xx: false,
            retriable_4xx: false,
            codes: Vec::new(),
            grpc: Codes::default(),
        };
        for cond in r.retry_on.conditions() {
            match cond {
                RetryCondition::ConnectFailure => p.connect_failure = true,
                RetryCondition::Reset => p.reset = true,
                RetryCondition::ResetBeforeRequest => p.reset_before_request = true,
                RetryCondition::Timeout => p.timeout = true,
                RetryCondition::Any5xx => p.any_5xx = true,
                RetryCondition::Retriable4xx => p.retriable_4xx = true,
                RetryCondition::Status(c) => p.codes.push(*c),
                RetryCondition::Grpc(c) => p.grpc.add(*c),
            }
        }
        p
    }

    /// Whether `outcome` of try number `attempt` (1-based) of a request with an
    /// `idempotent` method may be retried by the policy. The budget and the body's
    /// replayability are checked by the caller.
    pub fn retryable(&self, outcome: Outcome, attempt: u32, idempotent: bool) -> bool {
        if attempt >= self.attempts {
            return false;
        }
        let may_repeat = idempotent || self.non_idempotent;
        match outcome {
            Outcome::ConnectFailure => self.connect_failure,
            Outcome::ResetBeforeRequest => self.reset_before_request || (self.reset && may_repeat),
            Outcome::Reset => self.reset && may_repeat,
            Outcome::Timeout => self.timeout && may_repeat,
            Outcome::ClientAbort => false,
            Outcome::Grpc(c) => self.grpc.contains(c),
            Outcome::Status(s) => {
                self.codes.contains(&s)
                    || (self.any_5xx && s >= 500)
                    || (self.retriable_4xx && s == 409)
            }
        }
    }

    /// The pause before retry number `retry` (1 = the first retry): "full jitter", a
    /// uniform draw in `[0, min(max, base × 2^(retry-1))]`, so that clients that failed
    /// together do not come back together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(
                1u32.checked_shl(retry.saturating_sub(1).min(20))
                    .unwrap_or(u32::MAX),
            )
            .min(self.backoff_max);
        let nanos = cap.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> RetryPolicy {
        let r: Retry = serde_json::from_str(yaml).unwrap();
        RetryPolicy::new(&r)
    }

    #[test]
    fn retry_reasons_name_the_status_or_its_class() {
        let label = |s: u16| Outcome::Status(s).reason();
        assert_eq!(
            [409, 500, 502, 503, 504, 501, 599, 429, 404].map(label),
            ["409", "500", "502", "503", "504", "5xx", "5xx", "4xx", "4xx"]
        );
        assert_eq!(Outcome::Grpc(14).reason(), "unavailable");
        assert_eq!(Outcome::Timeout.reason(), "timeout");
    }

    #[test]
    fn conditions_and_attempts() {
        let p =
            policy(r#"{"attempts": 3, "retry_on": ["connect-failure", "503", "retriable-4xx"]}"#);
        assert!(p.retryable(Outcome::ConnectFailure, 1, true));
        assert!(p.retryable(Outcome::Status(503), 2, true));
        assert!(
            !p.retryable(Outcome::Status(503), 3, true),
            "3 attempts in all"
        );
        assert!(!p.retryable(Outcome::Status(502), 1, true));
        assert!(p.retryable(Outcome::Status(409), 1, true));
        assert!(!p.retryable(Outcome::Reset, 1, true));
        assert!(!p.retryable(Outcome::Timeout, 1, true));
        let all = policy(r#"{"attempts": 2, "on": ["5xx", "reset", "timeout"]}"#);
        assert!(all.retryable(Outcome::Status(599), 1, true));
        assert!(all.retryable(Outcome::Reset, 1, true));
        assert!(all.retryable(Outcome::Timeout, 1, true));
        assert!(!all.retryable(Outcome::Status(404), 1, true));
        assert!(!all.retryable(Outcome::ClientAbort, 1, true));
    }

    #[test]
    fn grpc_conditions_retry_only_their_codes() {
        let p = policy(r#"{"attempts": 3, "retry_on": ["unavailable", "resource-exhausted"]}"#);
        assert!(p.retryable(Outcome::Grpc(14), 1, false), "for every method");
        assert!(p.retryable(Outcome::Grpc(8), 2, false));
        assert!(
            !p.retryable(Outcome::Grpc(14), 3, false),
            "3 attempts in all"
        );
        assert!(!p.retryable(Outcome::Grpc(13), 1, false));
        assert!(!p.retryable(Outcome::Grpc(0), 1, false));
        assert!(!p.retryable(Outcome::Status(503), 1, false));
    }

    #[test]
    fn resets_and_timeouts_repeat_only_idempotent_methods() {
        let p = policy(
            r#"{"attempts": 3, "retry_on": ["reset", "timeout", "connect-failure", "503"]}"#,
        );
        // A POST: the server may have acted on it.
        assert!(!p.retryable(Outcome::Reset, 1, false));
        assert!(!p.retryable(Outcome::Timeout, 1, false));
        // Never reached the server: safe for every method.
        assert!(p.retryable(Outcome::ConnectFailure, 1, false));
        // `reset` covers a reset before the request for idempotent methods only...
        assert!(p.retryable(Outcome::ResetBeforeRequest, 1, true));
        assert!(!p.retryable(Outcome::ResetBeforeRequest, 1, false));
        // ...`reset-before-request` for every method.
        let before = policy(r#"{"attempts": 3, "retry_on": ["reset-before-request"]}"#);
        assert!(before.retryable(Outcome::ResetBeforeRequest, 1, false));
        assert!(!before.retryable(Outcome::Reset, 1, true));
        // A status answer is an answer: statuses retry for every method, as before.
        assert!(p.retryable(Outcome::Status(503), 1, false));
        let opt_in = policy(
            r#"{"attempts": 3, "retry_on": ["reset", "timeout"], "retry_non_idempotent": true}"#,
        );
        assert!(opt_in.retryable(Outcome::Reset, 1, false));
        assert!(opt_in.retryable(Outcome::Timeout, 1, false));
        for (m, want) in [
            ("GET", true),
            ("HEAD", true),
            ("OPTIONS", true),
            ("PUT", true),
            ("DELETE", true),
            ("TRACE", true),
            ("POST", false),
            ("PATCH", false),
            ("CONNECT", false),
        ] {
            assert_eq!(idempotent(&m.parse().unwrap()), want, "{m}");
        }
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = policy(r#"{"attempts": 5, "backoff": {"base": "10ms", "max": "40ms"}}"#);
        for retry in 1..=8 {
            let cap = Duration::from_millis((10u64 << (retry - 1)).min(40));
            for _ in 0..50 {
                assert!(p.backoff(retry) <= cap);
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(3)).collect();
        assert!(spread.len() > 10, "jitter expected");
        assert_eq!(
            policy(r#"{"backoff": {"base": "0ms", "max": "0ms"}}"#).backoff(1),
            Duration::ZERO
        );
    }

    #[test]
    fn failures_are_what_counts_against_an_endpoint() {
        let grpc = Codes::of(&GrpcCode::default_failures());
        assert!(Outcome::ConnectFailure.is_failure(grpc));
        assert!(Outcome::Status(503).is_failure(grpc));
        assert!(!Outcome::Status(404).is_failure(grpc));
        assert!(!Outcome::ClientAbort.is_failure(grpc));
        // gRPC: the cluster's failure codes, whatever the HTTP status said.
        assert!(Outcome::Grpc(14).is_failure(grpc));
        assert!(
            !Outcome::Grpc(5).is_failure(grpc),
            "NOT_FOUND is the caller's"
        );
        assert!(!Outcome::Grpc(0).is_failure(grpc));
        assert!(!Outcome::Grpc(14).is_failure(Codes::default()));
        assert_eq!(Outcome::Grpc(14).reason(), "unavailable");
        assert_eq!(Outcome::Status(503).reason(), "503");
        assert_eq!(Outcome::Status(507).reason(), "5xx");
        // One vocabulary: the retry metric says what x-spur-error says.
        assert_eq!(Outcome::ConnectFailure.reason(), "upstream_unreachable");
        assert_eq!(Outcome::Reset.reason(), "upstream_reset");
        assert_eq!(Outcome::Timeout.reason(), "timeout");
    }
}
