//! Edge policy: what a route or listener does at the edge of a service besides forwarding.
//! Rate limits, header rules, rewrites, redirects, CORS and trusted forwarding headers.
//!
//! Like the rest of the schema, every value is parsed here once: a header value template is
//! split into its text and variables, an origin pattern into scheme, host and port, a rate
//! limit key into what it reads. The proxy compiles these without a check left to fail.

use crate::defaults;
use crate::units::Duration;
use crate::values::{text_serde, ConfigValue, Parsed};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// `rate_limit` on a route or a listener: GCRA with `requests` per `per`, bursts of `burst`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    #[serde(default = "defaults::rate_per")]
    pub per: Duration,
    /// Requests that may come at once; default `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default = "defaults::limit_key")]
    pub key: LimitKey,
    #[serde(default)]
    pub mode: LimitMode,
    #[serde(default)]
    pub scope: LimitScope,
    /// The most keys remembered at once (least recently used go first).
    #[serde(default = "defaults::max_keys")]
    pub max_keys: u32,
}

impl RateLimit {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests)
    }
}

/// What a rate limit counts by: `client_id` (the verified mTLS identity), `client_ip` (the
/// client's address), `header:NAME`, or `route` (one bucket for the route or listener).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitKey {
    ClientId,
    ClientIp,
    Header(http::HeaderName),
    Route,
}

const LIMIT_KEY: &str = "client_id, client_ip, header:NAME or route";

impl ConfigValue for LimitKey {
    const EXPECTED: &'static str = LIMIT_KEY;

    fn parse_value(text: &str) -> Result<LimitKey, String> {
        match text {
            "client_id" => Ok(LimitKey::ClientId),
            "client_ip" => Ok(LimitKey::ClientIp),
            "route" => Ok(LimitKey::Route),
            _ => match text.split_once(':') {
                Some(("header", name)) => http::HeaderName::parse_value(name)
                    .map(LimitKey::Header)
                    .map_err(|e| format!("{e} (in `{text}`)")),
                _ => Err(format!("`{text}` is not a rate limit key ({LIMIT_KEY})")),
            },
        }
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKey::ClientId => f.write_str("client_id"),
            LimitKey::ClientIp => f.write_str("client_ip"),
            LimitKey::Header(h) => write!(f, "header:{h}"),
            LimitKey::Route => f.write_str("route"),
        }
    }
}

text_serde!(LimitKey);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Over the limit: 429 `rate_limited`.
    #[default]
    Enforce,
    /// Over the limit: counted, and let through.
    Shadow,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// Each proxy enforces the whole rate on its own traffic.
    #[default]
    Proxy,
    /// The rate holds for all proxies of the control-plane group together.
    Group,
}

/// `request_headers` / `response_headers`: `remove`, then `set` (replace), then `add`
/// (append).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    #[serde(default, skip_serializing_if = "HeaderValues::is_empty")]
    pub set: HeaderValues,
    #[serde(default, skip_serializing_if = "HeaderValues::is_empty")]
    pub add: HeaderValues,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Parsed<http::HeaderName>>,
}

/// Header names and value templates, in the order written (a YAML map).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderValues(pub Vec<(Parsed<http::HeaderName>, Parsed<HeaderTemplate>)>);

impl HeaderValues {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for HeaderValues {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for HeaderValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = HeaderValues;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of header names to values (`x-env: prod`)")
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderValues, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Parsed<http::HeaderName>>()? {
                    let v = map.next_value::<Parsed<HeaderTemplate>>()?;
                    out.push((k, v));
                }
                Ok(HeaderValues(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A header value with variables: `%REQUEST_ID%`, `%PEER_IDENTITY%`, `%FLAGS%`; `%%` is a
/// percent sign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderTemplate(pub Vec<Piece>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Var(Var),
}

/// What a header value template can read from the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Var {
    /// The request ID (`correlation.request_id_header`).
    RequestId,
    /// The verified mTLS peer's SPIFFE ID.
    PeerIdentity,
    /// The flags that are on for the request (as `x-spur-flags`).
    Flags,
}

const VARS: &str = "%REQUEST_ID%, %PEER_IDENTITY%, %FLAGS%";

impl ConfigValue for HeaderTemplate {
    const EXPECTED: &'static str =
        "a header value (text; variables %REQUEST_ID%, %PEER_IDENTITY%, %FLAGS%)";

    fn parse_value(text: &str) -> Result<HeaderTemplate, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(after) = rest.strip_prefix('%') {
                lit.push('%');
                rest = after;
                continue;
            }
            let Some(end) = rest.find('%') else {
                return Err(format!(
                    "`{text}`: a `%` starts a variable ({VARS}); write `%%` for a percent sign"
                ));
            };
            let var = match &rest[..end] {
                "REQUEST_ID" => Var::RequestId,
                "PEER_IDENTITY" => Var::PeerIdentity,
                "FLAGS" => Var::Flags,
                other => {
                    return Err(format!(
                        "`{text}`: unknown variable `%{other}%` (known: {VARS}; `%%` is a percent sign)"
                    ))
                }
            };
            if !lit.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut lit)));
            }
            pieces.push(Piece::Var(var));
            rest = &rest[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if http::HeaderValue::from_str(t).is_err() {
                    return Err(format!(
                        "`{text}` is not a header value (visible ASCII, spaces and tabs)"
                    ));
                }
            }
        }
        Ok(HeaderTemplate(pieces))
    }
}

/// `rewrite`: what the upstream receives instead of the request's path prefix and host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the part of the path the route's `match.path_prefix` (or `match.path`)
    /// matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The Host (`:authority`) sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Parsed<HostName>>,
}

/// A host, with an optional port: `api.internal`, `api.internal:8080`, `10.0.0.1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostName(pub http::uri::Authority);

impl ConfigValue for HostName {
    const EXPECTED: &'static str = "a host name such as api.internal";

    fn parse_value(text: &str) -> Result<HostName, String> {
        let bad =
            || format!("`{text}` is not a host name (with an optional port) such as api.internal");
        if text.is_empty() || text.contains(['@', '/', '?', '#']) {
            return Err(bad());
        }
        let a: http::uri::Authority = text.parse().map_err(|_| bad())?;
        if a.host().is_empty() {
            return Err(bad());
        }
        Ok(HostName(a))
    }
}

/// `redirect`: Spur answers the route's requests with a redirect, built from the request's
/// URL with these parts replaced (the query is kept).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    #[serde(default = "defaults::redirect_status")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<RedirectScheme>,
    /// A host name without a port (use `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Parsed<HostName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replaces the part of the path the route matched (as `rewrite.path_prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectScheme {
    Http,
    Https,
}

impl RedirectScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectScheme::Http => "http",
            RedirectScheme::Https => "https",
        }
    }
}

/// `cors`: which browser origins may call the route, and the preflight answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    pub allow_origins: Vec<Parsed<OriginPattern>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<Parsed<http::Method>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<Parsed<http::HeaderName>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<Parsed<http::HeaderName>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_credentials: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
}

/// An allowed origin: `*` (any), `https://app.example.com[:port]`, or
/// `https://*.example.com[:port]` (any subdomain, not `example.com` itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginPattern {
    Any,
    Exact(String),
    /// Scheme (with `://`), the domain suffix with its dot (`.example.com`), and the port
    /// part (`:8443` or empty).
    Subdomains {
        scheme: String,
        suffix: String,
        port: String,
    },
}

impl OriginPattern {
    /// Whether the request's `Origin` (as sent) is allowed. Scheme and host compare without
    /// case.
    pub fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(o) => origin.eq_ignore_ascii_case(o),
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                let lower = origin.to_ascii_lowercase();
                let Some(rest) = lower.strip_prefix(scheme.as_str()) else {
                    return false;
                };
                let Some(host) = rest.strip_suffix(port.as_str()) else {
                    return false;
                };
                if host.contains(':') {
                    return false;
                }
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host[..host.len() - suffix.len()].is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }
        }
    }
}

const ORIGIN: &str = "`*`, an origin such as https://app.example.com, or https://*.example.com";

impl ConfigValue for OriginPattern {
    const EXPECTED: &'static str = ORIGIN;

    fn parse_value(text: &str) -> Result<OriginPattern, String> {
        if text == "*" {
            return Ok(OriginPattern::Any);
        }
        let bad = |why: &str| format!("`{text}` is not {ORIGIN}: {why}");
        let lower = text.to_ascii_lowercase();
        let (scheme, rest) = match lower.split_once("://") {
            Some((s @ ("http" | "https"), rest)) => (format!("{s}://"), rest),
            _ => return Err(bad("it starts with http:// or https://")),
        };
        if rest.contains(['/', '?', '#', '@']) || rest.is_empty() {
            return Err(bad("an origin has no path (`https://app.example.com`)"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if crate::values::parse_port(p).is_some_and(|p| p > 0) => {
                (h, format!(":{p}"))
            }
            Some(_) => return Err(bad("the port is not a number from 1 to 65535")),
            None => (rest, String::new()),
        };
        let label_chars = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        };
        if let Some(suffix) = host.strip_prefix("*.") {
            if !label_chars(suffix) || !suffix.contains('.') {
                return Err(bad("`*.` is followed by a domain of two labels or more"));
            }
            return Ok(OriginPattern::Subdomains {
                scheme,
                suffix: format!(".{suffix}"),
                port,
            });
        }
        if host.contains('*') {
            return Err(bad("`*` stands only at the start, as `*.example.com`"));
        }
        let ip6 = host.starts_with('[') && host.ends_with(']');
        if !ip6 && !label_chars(host) {
            return Err(bad("the host is not a host name"));
        }
        Ok(OriginPattern::Exact(format!("{scheme}{host}{port}")))
    }
}

/// `x_forwarded` on a listener: how far `x-forwarded-for` and `x-forwarded-proto` from the
/// client are believed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XForwarded {
    /// Proxies in front of this listener whose forwarding headers are kept (their last
    /// `trusted_hops` entries of `x-forwarded-for`); 0: the client's are replaced.
    #[serde(default)]
    pub trusted_hops: u32,
}

/// `slow_start` on a cluster: a new or recovered endpoint's share ramps up over `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowStart {
    pub window: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_text_and_variables() {
        let t = HeaderTemplate::parse_value("id=%REQUEST_ID%; 100%% by %PEER_IDENTITY%").unwrap();
        assert_eq!(
            t.0,
            [
                Piece::Text("id=".into()),
                Piece::Var(Var::RequestId),
                Piece::Text("; 100% by ".into()),
                Piece::Var(Var::PeerIdentity),
            ]
        );
        assert!(HeaderTemplate::parse_value("%FLAGS%").is_ok());
        let e = HeaderTemplate::parse_value("%HOST%").unwrap_err();
        assert!(e.contains("unknown variable `%HOST%`"), "{e}");
        let e = HeaderTemplate::parse_value("50% off").unwrap_err();
        assert!(e.contains("write `%%`"), "{e}");
        assert!(HeaderTemplate::parse_value("a\u{1}b").is_err());
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let p = |t: &str| OriginPattern::parse_value(t).unwrap();
        assert!(p("https://app.example.com").matches("https://App.Example.com"));
        assert!(!p("https://app.example.com").matches("http://app.example.com"));
        assert!(!p("https://app.example.com").matches("https://app.example.com:8443"));
        let sub = p("https://*.example.com");
        assert!(sub.matches("https://a.example.com"));
        assert!(sub.matches("https://a.b.example.com"));
        assert!(!sub.matches("https://example.com"));
        assert!(!sub.matches("https://evilexample.com"));
        assert!(!sub.matches("https://a.example.com.evil.net"));
        assert!(!sub.matches("https://a.example.com:444"));
        assert!(p("https://*.example.com:8443").matches("https://a.example.com:8443"));
        assert!(p("*").matches("https://anything"));
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://*.com",
            "https://a*.example.com",
            "ftp://x.example",
            "https://x.example:0",
        ] {
            assert!(OriginPattern::parse_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limit_keys() {
        assert_eq!(LimitKey::parse_value("client_ip"), Ok(LimitKey::ClientIp));
        assert_eq!(
            LimitKey::parse_value("header:X-Api-Key"),
            Ok(LimitKey::Header(http::HeaderName::from_static("x-api-key")))
        );
        assert!(LimitKey::parse_value("ip").is_err());
        assert!(LimitKey::parse_value("header:bad name").is_err());
    }
}
