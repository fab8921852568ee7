//! gRPC on the request path: what makes a request gRPC, where its status is, its deadline,
//! and how Spur answers a gRPC client itself.
//!
//! Why Spur must know: gRPC reports failure in `grpc-status`, not in the HTTP status. A
//! server that answers `UNAVAILABLE` sends HTTP 200; a proxy that reads only the HTTP
//! status sees a success, so the breaker never trips, retries never fire, and the latency
//! estimate prefers the endpoint that fails fastest. So:
//!
//! - a request is gRPC when its content-type is `application/grpc` or `application/grpc+…`
//!   (one header look-up per request; nothing else is done for other requests);
//! - its status is in the response head when the server answered **trailers-only** (an
//!   error before any message: decided at once, so it can be retried), else in the
//!   trailers at the end of the stream (the messages already went to the client: counted,
//!   and charged to the endpoint, but never retried);
//! - `grpc-timeout` is the client's deadline: it bounds the request with the route's
//!   `timeout` (the shorter wins) and is forwarded reduced by the time already spent;
//! - Spur's own answers to a gRPC client are trailers-only responses (HTTP 200, the status
//!   in `grpc-status`, the reason in `grpc-message`) that a gRPC library reports as a gRPC
//!   error instead of a protocol error; see [`crate::reason::Reason::grpc_status`].

use http::header::{HeaderName, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use spur_config::GrpcCode;
use std::time::Duration;

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `UNKNOWN`: a stream that ended without a status, or whose status is not a number.
pub const UNKNOWN: u8 = 2;
/// `CANCELLED`: the client went away before the status came.
pub const CANCELLED: u8 = 1;

/// Whether a request (by its headers) is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// The `grpc-status` in these headers (a response head or its trailers): its number, or
/// `UNKNOWN` for a value that is not one; `None` when there is none.
pub fn status_in(headers: &HeaderMap) -> Option<u8> {
    let v = headers.get(&GRPC_STATUS)?.as_bytes();
    let n = match v {
        [d] if d.is_ascii_digit() => d - b'0',
        [a, b] if a.is_ascii_digit() && b.is_ascii_digit() => (a - b'0') * 10 + (b - b'0'),
        _ => UNKNOWN,
    };
    Some(n)
}

/// The status a gRPC client infers from an HTTP status without `grpc-status` (gRPC's
/// `http-grpc-status-mapping.md`).
pub fn from_http(status: u16) -> u8 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => UNKNOWN,
    }
}

/// A set of gRPC codes (0-16) as bits: a cluster's failure codes, a policy's retry codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Codes(u32);

impl Codes {
    pub fn of(codes: &[GrpcCode]) -> Codes {
        Codes(codes.iter().fold(0, |m, c| m | 1 << c.number()))
    }

    pub fn add(&mut self, c: GrpcCode) {
        self.0 |= 1 << c.number();
    }

    pub fn contains(self, code: u8) -> bool {
        code < 32 && self.0 & (1 << code) != 0
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H M S m u n`).
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let v = v.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value: the finest unit whose count fits in 8 digits, rounded up
/// (a deadline forwarded is never shorter than what is left, nor 0 unless nothing is).
pub fn timeout_value(d: Duration) -> HeaderValue {
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = d.as_nanos();
    for (per, unit) in UNITS {
        let n = nanos.div_ceil(per);
        if n < 100_000_000 {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The head of a trailers-only gRPC answer: HTTP 200, `content-type: application/grpc`,
/// `grpc-status`, and `grpc-message` (the reason, which is a token and needs no escaping).
pub fn trailers_only(headers: &mut HeaderMap, code: u8, message: &'static str) {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS.clone(), HeaderValue::from(u16::from(code)));
    headers.insert(GRPC_MESSAGE.clone(), HeaderValue::from_static(message));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn grpc_requests_by_content_type() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(&headers(&[("content-type", yes)])), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/json",
            "text/plain",
            "application/grp",
        ] {
            assert!(!is_grpc(&headers(&[("content-type", no)])), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn statuses() {
        assert_eq!(status_in(&headers(&[("grpc-status", "14")])), Some(14));
        assert_eq!(status_in(&headers(&[("grpc-status", "0")])), Some(0));
        assert_eq!(status_in(&headers(&[("grpc-status", "x")])), Some(UNKNOWN));
        assert_eq!(
            status_in(&headers(&[("grpc-status", "123")])),
            Some(UNKNOWN)
        );
        assert_eq!(status_in(&HeaderMap::new()), None);
        assert_eq!(from_http(503), 14);
        assert_eq!(from_http(404), 12);
        assert_eq!(from_http(500), UNKNOWN);
        let set = Codes::of(&GrpcCode::default_failures());
        assert!(set.contains(14) && set.contains(2) && !set.contains(0) && !set.contains(5));
        assert!(!set.contains(200));
    }

    #[test]
    fn timeouts_parse_and_print_back_rounded_up() {
        let v = |s: &'static str| parse_timeout(&HeaderValue::from_static(s));
        assert_eq!(v("100m"), Some(Duration::from_millis(100)));
        assert_eq!(v("2S"), Some(Duration::from_secs(2)));
        assert_eq!(v("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(v("5u"), Some(Duration::from_micros(5)));
        assert_eq!(v("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "100x", "123456789m", "-1m", "1.5S"] {
            assert_eq!(v(bad), None, "{bad}");
        }
        assert_eq!(timeout_value(Duration::from_millis(87)), "87000000n");
        assert_eq!(timeout_value(Duration::from_millis(870)), "870000u");
        assert_eq!(
            timeout_value(Duration::from_nanos(1_000_000_001)),
            "1000001u"
        );
        assert_eq!(timeout_value(Duration::from_secs(3 * 86400)), "259200S");
        assert_eq!(timeout_value(Duration::ZERO), "0n");
        for d in [1u64, 999, 123_456_789, 10_000_000_000_000] {
            let d = Duration::from_nanos(d);
            let back = parse_timeout(&timeout_value(d)).unwrap();
            assert!(
                back >= d && back - d < d / 1000 + Duration::from_nanos(1),
                "{d:?}"
            );
        }
    }
}
