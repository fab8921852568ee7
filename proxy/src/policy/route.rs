//! Route matching: which route of a listener answers a request. First match wins.
//!
//! Matchers are built once per config from values spur-config has already parsed (methods,
//! header names, anchored regexes), so building one cannot fail and matching a request
//! allocates nothing.

use http::{HeaderMap, HeaderName, Method};
use spur_config::{HeaderMatch, HeaderRegex, RouteMatch};

/// The request facts a route can match on.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    /// Host without port, from the URI authority (HTTP/2) or the Host header (HTTP/1.1).
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The request is a gRPC call (`content-type: application/grpc*`).
    pub grpc: bool,
    /// `original_dst` listeners: the name of the cluster that owns the connection's
    /// original destination, if one does.
    pub destination: Option<&'a str>,
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
}

/// One header condition (a route's `match.headers` entry, an authz rule's `to.headers`).
#[derive(Debug)]
pub(crate) enum HeaderCond {
    Exact(String),
    Present(bool),
    Regex(HeaderRegex),
}

/// A compiled `match` block.
#[derive(Debug)]
pub struct Matcher {
    path: PathMatch,
    host: Option<String>,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderCond)>,
    /// `match.grpc`: only gRPC calls (the path is the service and method).
    grpc_only: bool,
    /// `match.destination`: the cluster owning the original destination.
    destination: Option<String>,
}

impl Matcher {
    pub fn compile(m: &RouteMatch) -> Matcher {
        let path = match (&m.grpc, &m.path, &m.path_prefix) {
            (Some(g), _, _) => match &g.method {
                Some(method) => PathMatch::Exact(format!("/{}/{}", g.service, method)),
                None => PathMatch::Prefix(format!("/{}/", g.service)),
            },
            (None, Some(p), _) => PathMatch::Exact(p.clone()),
            (None, None, Some(p)) if p == "/" => PathMatch::Any,
            (None, None, Some(p)) => PathMatch::Prefix(p.clone()),
            (None, None, None) => PathMatch::Any,
        };
        Matcher {
            path,
            host: m.host.as_ref().map(|h| h.to_ascii_lowercase()),
            method: m.method.as_deref().cloned(),
            headers: m.headers.iter().map(compile_header).collect(),
            grpc_only: m.grpc.is_some(),
            destination: m.destination.clone(),
        }
    }

    /// Whether the route applies only to one destination (`match.destination`).
    pub fn names_destination(&self) -> bool {
        self.destination.is_some()
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if self.grpc_only && !req.grpc {
            return false;
        }
        if let Some(d) = &self.destination {
            if req.destination != Some(d.as_str()) {
                return false;
            }
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => req.path == p,
            PathMatch::Prefix(p) => prefix_matches(req.path, p),
        };
        if !path_ok {
            return false;
        }
        if let Some(m) = &self.method {
            if m != req.method {
                return false;
            }
        }
        if let Some(h) = &self.host {
            match req.host {
                Some(rh) if rh.eq_ignore_ascii_case(h) => {}
                _ => return false,
            }
        }
        self.headers
            .iter()
            .all(|(name, cond)| header_holds(req.headers, name, cond))
    }
}

/// Whether the header condition holds for these headers (the first value is tested).
pub(crate) fn header_holds(headers: &HeaderMap, name: &HeaderName, cond: &HeaderCond) -> bool {
    let value = headers.get(name).and_then(|v| v.to_str().ok());
    match cond {
        HeaderCond::Present(want) => headers.contains_key(name) == *want,
        HeaderCond::Exact(v) => value == Some(v.as_str()),
        HeaderCond::Regex(re) => value.is_some_and(|v| re.is_match(v)),
    }
}

/// `/api` matches `/api`, `/api/x` and `/api?q`, but not `/apis`; a prefix ending in `/`
/// matches anything below it.
pub(crate) fn prefix_matches(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub(crate) fn compile_header(h: &HeaderMatch) -> (HeaderName, HeaderCond) {
    let cond = if let Some(v) = &h.value {
        HeaderCond::Exact(v.clone())
    } else if let Some(re) = &h.regex {
        // Anchored by spur-config: the regex matches the whole value, as Envoy's safe_regex.
        HeaderCond::Regex(re.get().clone())
    } else {
        HeaderCond::Present(h.present.unwrap_or(true))
    };
    (h.name.get().clone(), cond)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(yaml: &str) -> Matcher {
        let rm: RouteMatch = serde_json::from_str(yaml).unwrap();
        Matcher::compile(&rm)
    }

    fn req<'a>(
        method: &'a Method,
        path: &'a str,
        host: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            host,
            headers,
            grpc: crate::grpc::is_grpc(headers),
            destination: None,
        }
    }

    #[test]
    fn path_rules() {
        let h = HeaderMap::new();
        let get = Method::GET;
        let prefix = m(r#"{"path_prefix": "/api"}"#);
        assert!(prefix.matches(&req(&get, "/api", None, &h)));
        assert!(prefix.matches(&req(&get, "/api/v1", None, &h)));
        assert!(!prefix.matches(&req(&get, "/apis", None, &h)));
        assert!(!prefix.matches(&req(&get, "/", None, &h)));
        let slash = m(r#"{"path_prefix": "/api/"}"#);
        assert!(slash.matches(&req(&get, "/api/x", None, &h)));
        assert!(!slash.matches(&req(&get, "/api", None, &h)));
        let exact = m(r#"{"path": "/exact"}"#);
        assert!(exact.matches(&req(&get, "/exact", None, &h)));
        assert!(!exact.matches(&req(&get, "/exact/", None, &h)));
        assert!(m("{}").matches(&req(&get, "/anything", None, &h)));
        // `/` is every request, even `OPTIONS *`.
        assert!(m(r#"{"path_prefix": "/"}"#).matches(&req(&Method::OPTIONS, "*", None, &h)));
    }

    #[test]
    fn grpc_matches_take_grpc_calls_to_the_service_or_method() {
        let mut grpc = HeaderMap::new();
        grpc.insert("content-type", "application/grpc".parse().unwrap());
        let plain = HeaderMap::new();
        let post = Method::POST;
        let method = m(r#"{"grpc": {"service": "shop.Cart", "method": "Get"}}"#);
        assert!(method.matches(&req(&post, "/shop.Cart/Get", None, &grpc)));
        assert!(!method.matches(&req(&post, "/shop.Cart/Put", None, &grpc)));
        assert!(
            !method.matches(&req(&post, "/shop.Cart/Get", None, &plain)),
            "not gRPC"
        );
        let service = m(r#"{"grpc": {"service": "shop.Cart"}}"#);
        assert!(service.matches(&req(&post, "/shop.Cart/Put", None, &grpc)));
        assert!(!service.matches(&req(&post, "/shop.CartX/Put", None, &grpc)));
        assert!(!service.matches(&req(&post, "/shop.Cart", None, &grpc)));
    }

    #[test]
    fn a_destination_match_takes_only_that_destinations_connections() {
        let h = HeaderMap::new();
        let get = Method::GET;
        let rule = m(r#"{"destination": "db"}"#);
        assert!(rule.names_destination());
        assert!(!m("{}").names_destination());
        let mut r = req(&get, "/", None, &h);
        assert!(!rule.matches(&r), "no destination");
        r.destination = Some("db");
        assert!(rule.matches(&r));
        r.destination = Some("cache");
        assert!(!rule.matches(&r));
    }

    #[test]
    fn a_header_named_alone_must_be_present() {
        let mut h = HeaderMap::new();
        let get = Method::GET;
        let rule = m(r#"{"headers": [{"name": "x-canary"}]}"#);
        assert!(!rule.matches(&req(&get, "/", None, &h)));
        h.insert("x-canary", "".parse().unwrap());
        assert!(rule.matches(&req(&get, "/", None, &h)));
    }

    #[test]
    fn method_host_and_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-version", "v12".parse().unwrap());
        h.insert("x-group", "beta".parse().unwrap());
        let get = Method::GET;
        let post = Method::POST;
        let rule = m(r#"{"method": "POST", "host": "Shop.Example",
            "headers": [{"name": "x-group", "value": "beta"}, {"name": "x-version", "regex": "v[0-9]+"},
                        {"name": "x-debug", "present": false}]}"#);
        assert!(rule.matches(&req(&post, "/", Some("shop.example"), &h)));
        assert!(!rule.matches(&req(&get, "/", Some("shop.example"), &h)));
        assert!(!rule.matches(&req(&post, "/", Some("other"), &h)));
        assert!(!rule.matches(&req(&post, "/", None, &h)));
        h.insert("x-debug", "1".parse().unwrap());
        assert!(!rule.matches(&req(&post, "/", Some("shop.example"), &h)));
        h.remove("x-debug");
        h.insert("x-version", "v12-beta".parse().unwrap());
        assert!(
            !rule.matches(&req(&post, "/", Some("shop.example"), &h)),
            "regex is anchored"
        );
    }
}
