//! The small languages inside config values: where a sticky key comes from (`hash_on:
//! header:x-user-id`), what a cookie may be called, and the retry conditions (`retry_on`).
//!
//! Each has one parser here (see [`crate::values`] for why); the proxy matches on the
//! parsed enums and cannot meet a spelling it does not know.

use crate::grpc::GrpcCode;
use crate::values::{text_serde, ConfigValue, Parsed};
use std::fmt;

/// A cookie name, by RFC 6265: an HTTP token (letters, digits and ``!#$%&'*+-.^_`|~``).
/// The one rule for every cookie name in a config: `hash_on: cookie:NAME` and a flag rule's
/// `cookie`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CookieName(String);

impl CookieName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ConfigValue for CookieName {
    const EXPECTED: &'static str = "a cookie name (letters, digits and !#$%&'*+-.^_`|~)";

    fn parse_value(text: &str) -> Result<CookieName, String> {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if text.is_empty() || !text.bytes().all(token) {
            return Err(format!(
                "`{text}` is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
            ));
        }
        Ok(CookieName(text.to_string()))
    }
}

impl fmt::Display for CookieName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

text_serde!(CookieName);

/// Where a sticky key comes from: `header:NAME` or `cookie:NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(CookieName),
}

const HASH_ON: &str = "`header:NAME` or `cookie:NAME`";

impl ConfigValue for HashOn {
    const EXPECTED: &'static str = HASH_ON;

    fn parse_value(text: &str) -> Result<HashOn, String> {
        match text.split_once(':') {
            Some(("header", name)) => http::HeaderName::parse_value(name)
                .map(HashOn::Header)
                .map_err(|e| format!("{e} (in `{text}`)")),
            Some(("cookie", name)) => CookieName::parse_value(name)
                .map(HashOn::Cookie)
                .map_err(|e| format!("{e} (in `{text}`)")),
            _ => Err(format!("`{text}` must be {HASH_ON}")),
        }
    }
}

/// One `retry_on` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryCondition {
    /// The endpoint could not be connected to.
    ConnectFailure,
    /// The connection broke before a response head arrived.
    Reset,
    /// The connection broke before any byte of the request was written: safe for every
    /// method.
    ResetBeforeRequest,
    /// The per-try timeout fired before a response head arrived.
    Timeout,
    /// Any 5xx status.
    Any5xx,
    /// 409 Conflict.
    Retriable4xx,
    /// This status (400-599).
    Status(u16),
    /// A trailers-only gRPC response with this status: one of [`GRPC_RETRY_CODES`].
    Grpc(GrpcCode),
}

/// The gRPC codes `retry_on` accepts (as Envoy's `retry_on` does): the ones that say the
/// call may succeed elsewhere or later.
pub const GRPC_RETRY_CODES: [GrpcCode; 5] = [
    GrpcCode::CANCELLED,
    GrpcCode::DEADLINE_EXCEEDED,
    GrpcCode::INTERNAL,
    GrpcCode::RESOURCE_EXHAUSTED,
    GrpcCode::UNAVAILABLE,
];

const RETRY_CONDITION: &str = "a retry condition (connect-failure, reset, \
     reset-before-request, timeout, 5xx, retriable-4xx, a status code 400-599, or a gRPC \
     status: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)";

impl ConfigValue for RetryCondition {
    const EXPECTED: &'static str = RETRY_CONDITION;

    fn parse_value(text: &str) -> Result<RetryCondition, String> {
        Ok(match text {
            "connect-failure" => RetryCondition::ConnectFailure,
            "reset" => RetryCondition::Reset,
            "reset-before-request" => RetryCondition::ResetBeforeRequest,
            "timeout" => RetryCondition::Timeout,
            "5xx" => RetryCondition::Any5xx,
            "retriable-4xx" => RetryCondition::Retriable4xx,
            name if name.starts_with(|c: char| c.is_ascii_lowercase()) => {
                match GrpcCode::parse_value(name) {
                    Ok(c) if GRPC_RETRY_CODES.contains(&c) => RetryCondition::Grpc(c),
                    Ok(c) => {
                        return Err(format!(
                            "`{c}` is a gRPC status that is not retried (the gRPC conditions are \
                             cancelled, deadline-exceeded, internal, resource-exhausted, \
                             unavailable)"
                        ))
                    }
                    Err(_) => return Err(format!("`{text}` is not {RETRY_CONDITION}")),
                }
            }
            code => {
                // Three digits exactly, so that the condition prints back as written.
                let status = (code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| code.parse::<u16>().ok())
                    .flatten()
                    .filter(|c| (400..=599).contains(c));
                match status {
                    Some(c) => RetryCondition::Status(c),
                    None => return Err(format!("`{text}` is not {RETRY_CONDITION}")),
                }
            }
        })
    }
}

impl fmt::Display for RetryCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryCondition::ConnectFailure => f.write_str("connect-failure"),
            RetryCondition::Reset => f.write_str("reset"),
            RetryCondition::ResetBeforeRequest => f.write_str("reset-before-request"),
            RetryCondition::Timeout => f.write_str("timeout"),
            RetryCondition::Any5xx => f.write_str("5xx"),
            RetryCondition::Retriable4xx => f.write_str("retriable-4xx"),
            RetryCondition::Status(c) => write!(f, "{c}"),
            RetryCondition::Grpc(c) => write!(f, "{c}"),
        }
    }
}

text_serde!(RetryCondition);

/// A `retry_on` list: the conditions in the order written (so it prints back as written),
/// asked as a set.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RetryOn(Vec<RetryCondition>);

impl RetryOn {
    pub fn new(conditions: Vec<RetryCondition>) -> RetryOn {
        RetryOn(conditions)
    }

    pub fn conditions(&self) -> &[RetryCondition] {
        &self.0
    }

    pub fn contains(&self, c: RetryCondition) -> bool {
        self.0.contains(&c)
    }

    /// Whether a response with this status is retried: listed, or covered by `5xx` or
    /// `retriable-4xx` (409).
    pub fn retries_status(&self, status: u16) -> bool {
        self.0.iter().any(|c| match c {
            RetryCondition::Status(s) => *s == status,
            RetryCondition::Any5xx => (500..=599).contains(&status),
            RetryCondition::Retriable4xx => status == 409,
            _ => false,
        })
    }
}

impl Default for RetryOn {
    /// `[connect-failure, reset]`.
    fn default() -> Self {
        RetryOn(vec![RetryCondition::ConnectFailure, RetryCondition::Reset])
    }
}

/// `Parsed<HashOn>` is how routes and flag rules hold it (a header name is lower-cased when
/// parsed, so the text is kept).
pub type HashOnSpec = Parsed<HashOn>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_on_and_cookie_names() {
        let h = HashOnSpec::parse("header:X-User").unwrap();
        assert_eq!(*h, HashOn::Header(http::HeaderName::from_static("x-user")));
        assert_eq!(h.text(), "header:X-User");
        let c = HashOnSpec::parse("cookie:beta").unwrap();
        assert!(matches!(&*c, HashOn::Cookie(n) if n.as_str() == "beta"));
        for bad in [
            "ip:x",
            "header:",
            "header:a b",
            "cookie:",
            "cookie:a=b",
            "cookie:a;b",
            "cookie:a b",
            "x",
        ] {
            assert!(HashOnSpec::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(CookieName::parse_value("__Host-sid").is_ok());
    }

    #[test]
    fn retry_conditions_print_back_as_written() {
        for text in [
            "connect-failure",
            "reset",
            "reset-before-request",
            "timeout",
            "5xx",
            "retriable-4xx",
            "503",
            "409",
            "unavailable",
            "deadline-exceeded",
            "resource-exhausted",
            "cancelled",
            "internal",
        ] {
            let c = RetryCondition::parse_value(text).unwrap();
            assert_eq!(c.to_string(), text);
        }
        for bad in [
            "200",
            "600",
            "+503",
            "0503",
            "50",
            "teapot",
            "",
            "not-found",
            "Unavailable",
        ] {
            assert!(RetryCondition::parse_value(bad).is_err(), "{bad} accepted");
        }
        assert!(RetryCondition::parse_value("not-found")
            .unwrap_err()
            .contains("not retried"));
        let on: RetryOn = serde_json::from_str(r#"["5xx", "409", "reset"]"#).unwrap();
        assert!(on.retries_status(599) && on.retries_status(409) && !on.retries_status(404));
        assert!(on.contains(RetryCondition::Reset) && !on.contains(RetryCondition::Timeout));
        assert_eq!(
            serde_json::to_string(&on).unwrap(),
            r#"["5xx","409","reset"]"#
        );
        let numbers: RetryOn = serde_json::from_str("[502, 503]").unwrap();
        assert!(numbers.retries_status(502));
    }

    #[test]
    fn each_condition_covers_its_statuses_only() {
        let on = |json: &str| serde_json::from_str::<RetryOn>(json).unwrap();
        let five = on(r#"["5xx"]"#);
        assert!(five.retries_status(500) && five.retries_status(599));
        assert!(
            !five.retries_status(499) && !five.retries_status(600) && !five.retries_status(409)
        );
        let four = on(r#"["retriable-4xx"]"#);
        assert!(four.retries_status(409));
        assert!(!four.retries_status(408) && !four.retries_status(503));
        let listed = on(r#"["reset", 503]"#);
        assert!(listed.retries_status(503) && !listed.retries_status(502));
        assert_eq!(
            listed.conditions(),
            [RetryCondition::Reset, RetryCondition::Status(503)]
        );
    }

    #[test]
    fn names_print_back_and_protocols_in_lower_case() {
        let c = CookieName::parse_value("__Host-sid").unwrap();
        assert_eq!(c.to_string(), "__Host-sid");
        assert_eq!(serde_json::to_string(&c).unwrap(), r#""__Host-sid""#);
        let p = UpgradeProtocol::parse_value("WebSocket").unwrap();
        assert_eq!(
            (p.as_str(), p.to_string()),
            ("websocket", "websocket".into())
        );
        assert_eq!(UpgradeProtocol::websocket(), p);
        assert!(UpgradeProtocol::parse_value("H2C").is_err());
    }
}

/// A protocol a route lets clients switch to with HTTP/1.1 `Upgrade` (a route's
/// `upgrades`): a token, compared without case (`websocket`). `h2c` is never one: requests
/// inside an h2c tunnel would skip routing, header hygiene and the access log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpgradeProtocol(String);

impl UpgradeProtocol {
    /// WebSocket, the upgrade every route allows unless it lists its own.
    pub fn websocket() -> UpgradeProtocol {
        UpgradeProtocol("websocket".into())
    }

    /// The protocol name, in lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ConfigValue for UpgradeProtocol {
    const EXPECTED: &'static str = "a protocol name such as websocket";

    fn parse_value(text: &str) -> Result<UpgradeProtocol, String> {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if text.is_empty() || !text.bytes().all(token) {
            return Err(format!(
                "`{text}` is not a protocol name (letters, digits and !#$%&'*+-.^_`|~)"
            ));
        }
        if text.eq_ignore_ascii_case("h2c") {
            return Err(
                "h2c is never tunnelled: requests inside it would skip routing, \
                 header hygiene, the access log and metrics (Spur strips h2c upgrades; clients \
                 can speak HTTP/2 to Spur directly)"
                    .into(),
            );
        }
        Ok(UpgradeProtocol(text.to_ascii_lowercase()))
    }
}

impl fmt::Display for UpgradeProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

text_serde!(UpgradeProtocol);
