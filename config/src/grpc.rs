//! gRPC status codes as the config writes them (`unavailable`, `deadline-exceeded`): in a
//! cluster's `grpc_failure_codes` and in a route's `retry_on`.
//!
//! One spelling, the lower-case, dash-separated form of the names in gRPC's
//! `statuscodes.md` (`DEADLINE_EXCEEDED` is `deadline-exceeded`), the same form the other
//! retry conditions use. The proxy works with the number (`grpc-status: 14`).

use crate::values::{text_serde, ConfigValue};
use std::fmt;

/// A gRPC status code (0-16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrpcCode(u8);

/// The names of codes 0-16, in order.
const NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

impl GrpcCode {
    pub const OK: GrpcCode = GrpcCode(0);
    pub const CANCELLED: GrpcCode = GrpcCode(1);
    pub const UNKNOWN: GrpcCode = GrpcCode(2);
    pub const DEADLINE_EXCEEDED: GrpcCode = GrpcCode(4);
    pub const RESOURCE_EXHAUSTED: GrpcCode = GrpcCode(8);
    pub const INTERNAL: GrpcCode = GrpcCode(13);
    pub const UNAVAILABLE: GrpcCode = GrpcCode(14);
    pub const DATA_LOSS: GrpcCode = GrpcCode(15);

    /// The code with this number, if it is one (0-16).
    pub fn from_number(n: u8) -> Option<GrpcCode> {
        (usize::from(n) < NAMES.len()).then_some(GrpcCode(n))
    }

    pub fn number(self) -> u8 {
        self.0
    }

    pub fn name(self) -> &'static str {
        NAMES[usize::from(self.0)]
    }

    /// The codes a gRPC response fails with as far as the breaker and latency estimates
    /// are concerned, unless a cluster sets `grpc_failure_codes`: the ones that say the
    /// server (not the request) is in trouble.
    pub fn default_failures() -> Vec<GrpcCode> {
        vec![
            GrpcCode::UNAVAILABLE,
            GrpcCode::INTERNAL,
            GrpcCode::UNKNOWN,
            GrpcCode::DEADLINE_EXCEEDED,
            GrpcCode::DATA_LOSS,
        ]
    }
}

const EXPECTED: &str = "a gRPC status code name such as unavailable or deadline-exceeded";

impl ConfigValue for GrpcCode {
    const EXPECTED: &'static str = EXPECTED;

    fn parse_value(text: &str) -> Result<GrpcCode, String> {
        match NAMES.iter().position(|n| *n == text) {
            Some(i) => Ok(GrpcCode(i as u8)),
            None => Err(format!(
                "`{text}` is not {EXPECTED} (one of: {})",
                NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

text_serde!(GrpcCode);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_numbers_match_the_grpc_table() {
        for (i, n) in NAMES.iter().enumerate() {
            let c = GrpcCode::parse_value(n).unwrap();
            assert_eq!(usize::from(c.number()), i);
            assert_eq!(c.to_string(), *n);
        }
        assert_eq!(GrpcCode::parse_value("unavailable").unwrap().number(), 14);
        assert_eq!(
            GrpcCode::parse_value("deadline-exceeded").unwrap().number(),
            4
        );
        for bad in ["UNAVAILABLE", "deadline_exceeded", "14", "", "teapot"] {
            let err = GrpcCode::parse_value(bad).unwrap_err();
            assert!(err.contains("unavailable, data-loss"), "{err}");
        }
        assert_eq!(
            GrpcCode::from_number(16).map(|c| c.name()),
            Some("unauthenticated")
        );
        assert_eq!(GrpcCode::from_number(17), None);
    }
}
