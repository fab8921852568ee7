//! The retry decision: whether a failed try is tried again, and after how long.
//!
//! The policy only looks at the outcome of a try; the retry loop in `crate::forward` does
//! the I/O, and [`super::budget`] decides whether the cluster can afford another try.
//!
//! A request is retried only when its body can be replayed: it was small enough
//! (`max_body`) to be buffered whole before the first try. A larger body is streamed once
//! and never retried.

use spur_config::{Retry, RetryCondition};
use std::time::Duration;

/// What one try came to, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint could not be connected to: the request never left.
    ConnectFailure,
    /// The connection broke before a response head arrived.
    Reset,
    /// The per-try timeout fired before a response head arrived.
    Timeout,
    /// A response head arrived with this status.
    Status(u16),
}

impl Outcome {
    /// The `reason` label of `spur_retries_total` for a retry caused by this outcome.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::ConnectFailure => "connect-failure",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::Status(s) => status_label(*s),
        }
    }

    /// Whether this outcome counts against an endpoint (breaker, EWMA): connect failures,
    /// resets, timeouts and 5xx.
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::Status(s) => *s >= 500,
            _ => true,
        }
    }
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
    reset: bool,
    timeout: bool,
    any_5xx: bool,
    retriable_4xx: bool,
    codes: Vec<u16>,
    /// `retry_on: [reset-before-request]`: a reset before any byte of the request was
    /// written may be retried, whatever the method.
    pub reset_before_request: bool,
    /// `retry_non_idempotent`: `reset` and `timeout` retry every method, not only the
    /// idempotent ones.
    pub retry_non_idempotent: bool,
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
            reset: false,
            timeout: false,
            any_5xx: false,
            retriable_4xx: false,
            codes: Vec::new(),
            reset_before_request: false,
            retry_non_idempotent: r.retry_non_idempotent,
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
            }
        }
        p
    }

    /// Whether `outcome` of try number `attempt` (1-based) may be retried by the policy.
    /// The budget and the body's replayability are checked by the caller.
    pub fn retryable(&self, outcome: Outcome, attempt: u32) -> bool {
        if attempt >= self.attempts {
            return false;
        }
        match outcome {
            Outcome::ConnectFailure => self.connect_failure,
            Outcome::Reset => self.reset,
            Outcome::Timeout => self.timeout,
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
    fn conditions_and_attempts() {
        let p =
            policy(r#"{"attempts": 3, "retry_on": ["connect-failure", "503", "retriable-4xx"]}"#);
        assert!(p.retryable(Outcome::ConnectFailure, 1));
        assert!(p.retryable(Outcome::Status(503), 2));
        assert!(!p.retryable(Outcome::Status(503), 3), "3 attempts in all");
        assert!(!p.retryable(Outcome::Status(502), 1));
        assert!(p.retryable(Outcome::Status(409), 1));
        assert!(!p.retryable(Outcome::Reset, 1));
        assert!(!p.retryable(Outcome::Timeout, 1));
        let all = policy(r#"{"attempts": 2, "on": ["5xx", "reset", "timeout"]}"#);
        assert!(all.retryable(Outcome::Status(599), 1));
        assert!(all.retryable(Outcome::Reset, 1));
        assert!(all.retryable(Outcome::Timeout, 1));
        assert!(!all.retryable(Outcome::Status(404), 1));
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
        assert!(Outcome::ConnectFailure.is_failure());
        assert!(Outcome::Status(503).is_failure());
        assert!(!Outcome::Status(404).is_failure());
        assert_eq!(Outcome::Status(503).reason(), "503");
        assert_eq!(Outcome::Status(507).reason(), "5xx");
    }
}
