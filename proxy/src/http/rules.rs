//! A route's header rules, rewrites and redirects, compiled from spur-config's parsed
//! values.
//!
//! - **Header rules** (`request_headers`, `response_headers`): `remove`, then `set`, then
//!   `add`. A value without variables is a ready `HeaderValue` (cloning it is a reference
//!   count); one that is a single variable is the request's own value (no copy); only a
//!   value mixing text and variables is formatted per request. A value that comes out empty
//!   (`%PEER_IDENTITY%` without mTLS) is not written.
//! - **Rewrite**: the path prefix the route matched is replaced (one slash where the two
//!   meet), the query kept; the Host is replaced.
//! - **Redirect**: the request's URL with the configured parts replaced, as `Location`.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use spur_config::edge::{Piece, Var};
use spur_config::{HeaderRules, HeaderTemplate, Redirect, Rewrite, RouteMatch};

/// What a template can read, for one request.
#[derive(Clone, Copy, Default)]
pub struct Vars<'a> {
    pub request_id: Option<&'a HeaderValue>,
    pub peer_identity: Option<&'a HeaderValue>,
    pub flags: Option<&'a HeaderValue>,
}

impl<'a> Vars<'a> {
    fn get(&self, v: Var) -> Option<&'a HeaderValue> {
        match v {
            Var::RequestId => self.request_id,
            Var::PeerIdentity => self.peer_identity,
            Var::Flags => self.flags,
        }
    }
}

enum Value {
    Static(HeaderValue),
    Var(Var),
    Mixed(Vec<Piece>),
}

impl Value {
    fn compile(t: &HeaderTemplate) -> Value {
        match t.0.as_slice() {
            [] => Value::Static(HeaderValue::from_static("")),
            [Piece::Text(s)] => {
                Value::Static(HeaderValue::from_str(s).expect("checked by spur-config"))
            }
            [Piece::Var(v)] => Value::Var(*v),
            pieces => Value::Mixed(pieces.to_vec()),
        }
    }

    fn render(&self, vars: &Vars<'_>) -> Option<HeaderValue> {
        let v = match self {
            Value::Static(v) => v.clone(),
            Value::Var(var) => vars.get(*var)?.clone(),
            Value::Mixed(pieces) => {
                let mut out = BytesMut::with_capacity(64);
                for p in pieces {
                    match p {
                        Piece::Text(t) => out.extend_from_slice(t.as_bytes()),
                        Piece::Var(var) => {
                            if let Some(v) = vars.get(*var) {
                                out.extend_from_slice(v.as_bytes());
                            }
                        }
                    }
                }
                HeaderValue::from_maybe_shared(out.freeze()).ok()?
            }
        };
        (!v.is_empty()).then_some(v)
    }
}

/// Compiled `request_headers` or `response_headers`.
pub struct HeaderRulesRt {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, Value)>,
    add: Vec<(HeaderName, Value)>,
}

impl HeaderRulesRt {
    pub fn compile(r: &HeaderRules) -> HeaderRulesRt {
        let pairs = |v: &spur_config::HeaderValues| {
            v.0.iter()
                .map(|(k, t)| (k.get().clone(), Value::compile(t.get())))
                .collect()
        };
        HeaderRulesRt {
            remove: r.remove.iter().map(|h| h.get().clone()).collect(),
            set: pairs(&r.set),
            add: pairs(&r.add),
        }
    }

    pub fn apply(&self, h: &mut HeaderMap, vars: &Vars<'_>) {
        for name in &self.remove {
            h.remove(name);
        }
        for (name, value) in &self.set {
            match value.render(vars) {
                Some(v) => h.insert(name.clone(), v),
                None => h.remove(name),
            };
        }
        for (name, value) in &self.add {
            if let Some(v) = value.render(vars) {
                h.append(name.clone(), v);
            }
        }
    }
}

/// The part of a path a route matched: its `path_prefix`, its exact `path`, or nothing.
fn matched_prefix(m: &RouteMatch) -> &str {
    match (&m.path, &m.path_prefix) {
        (Some(p), _) => p,
        (None, Some(p)) if p != "/" => p,
        _ => "",
    }
}

/// `path` with its `matched` prefix replaced by `new`: one slash where the two meet.
pub fn replace_prefix(path: &str, matched: &str, new: &str) -> String {
    let rest = path.strip_prefix(matched).unwrap_or(path);
    let mut out = String::with_capacity(new.len() + rest.len());
    out.push_str(new);
    match (new.ends_with('/'), rest.starts_with('/')) {
        (true, true) => out.push_str(&rest[1..]),
        (false, false) if !rest.is_empty() && !new.is_empty() => {
            out.push('/');
            out.push_str(rest);
        }
        _ => out.push_str(rest),
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Compiled `rewrite`.
pub struct RewriteRt {
    /// (what the route matched, what replaces it).
    prefix: Option<(String, String)>,
    host: Option<HeaderValue>,
}

impl RewriteRt {
    pub fn compile(r: &Rewrite, m: &RouteMatch) -> RewriteRt {
        RewriteRt {
            prefix: r
                .path_prefix
                .as_ref()
                .map(|p| (matched_prefix(m).to_string(), p.clone())),
            host: r.host.as_ref().map(|h| {
                HeaderValue::from_str(h.get().0.as_str()).expect("an authority is a value")
            }),
        }
    }

    /// Rewrites the head the upstream will receive.
    pub fn apply(&self, head: &mut Parts) {
        if let Some((matched, new)) = &self.prefix {
            let path = replace_prefix(head.uri.path(), matched, new);
            let pq = match head.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            if let Ok(pq) = PathAndQuery::try_from(pq) {
                let mut parts = std::mem::take(&mut head.uri).into_parts();
                parts.path_and_query = Some(pq);
                head.uri = http::Uri::from_parts(parts).unwrap_or_default();
            }
        }
        if let Some(host) = &self.host {
            head.headers.insert(header::HOST, host.clone());
            if head.uri.authority().is_some() {
                let mut parts = std::mem::take(&mut head.uri).into_parts();
                parts.authority = host.to_str().ok().and_then(|h| h.parse().ok());
                head.uri = http::Uri::from_parts(parts).unwrap_or_default();
            }
        }
    }
}

/// Compiled `redirect`.
pub struct RedirectRt {
    pub status: http::StatusCode,
    scheme: Option<&'static str>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    prefix: Option<(String, String)>,
}

impl RedirectRt {
    pub fn compile(r: &Redirect, m: &RouteMatch) -> RedirectRt {
        RedirectRt {
            status: http::StatusCode::from_u16(r.status).expect("checked by spur-config"),
            scheme: r.scheme.map(|s| s.as_str()),
            host: r.host.as_ref().map(|h| h.get().0.host().to_string()),
            port: r.port,
            path: r.path.clone(),
            prefix: r
                .path_prefix
                .as_ref()
                .map(|p| (matched_prefix(m).to_string(), p.clone())),
        }
    }

    /// The `Location` for this request. `tls`: whether it came over TLS (its scheme). The
    /// port stays when neither scheme nor host changes; a port that is the scheme's default
    /// is left out.
    pub fn location(&self, head: &Parts, tls: bool) -> Option<HeaderValue> {
        let scheme = self.scheme.unwrap_or(if tls { "https" } else { "http" });
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| head.headers.get(header::HOST)?.to_str().ok())?;
        let (req_host, req_port) = split_port(authority);
        let host = self.host.as_deref().unwrap_or(req_host);
        let port = match self.port {
            Some(p) => Some(p),
            None if self.scheme.is_none() && self.host.is_none() => req_port,
            None => None,
        };
        let path = match (&self.path, &self.prefix) {
            (Some(p), _) => p.clone(),
            (None, Some((matched, new))) => replace_prefix(head.uri.path(), matched, new),
            (None, None) => head.uri.path().to_string(),
        };
        let mut loc = format!("{scheme}://{host}");
        let default = if scheme == "https" { 443 } else { 80 };
        if let Some(p) = port.filter(|p| *p != default) {
            loc.push_str(&format!(":{p}"));
        }
        loc.push_str(&path);
        if let Some(q) = head.uri.query() {
            loc.push('?');
            loc.push_str(q);
        }
        HeaderValue::from_str(&loc).ok()
    }
}

/// `host:port` into the host and the port (a bracketed IPv6 address keeps its brackets).
fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
            (h, p.parse().ok())
        }
        _ => (authority, None),
    }
}

/// The variables of a request, from what the plan decided and the connection knows.
pub fn vars<'a>(plan: &'a super::plan::Plan<'_>, ctx: &'a super::ConnCtx) -> Vars<'a> {
    Vars {
        request_id: plan.request_id.as_ref(),
        peer_identity: ctx.tls.as_ref().and_then(|t| t.identity_header.as_ref()),
        flags: plan.flags_header.as_ref().filter(|v| !v.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_meet_with_one_slash() {
        for (path, matched, new, want) in [
            ("/api/x", "/api", "/v2/", "/v2/x"),
            ("/api/x", "/api", "/v2", "/v2/x"),
            ("/api", "/api", "/v2/", "/v2/"),
            ("/api/", "/api/", "/v2/", "/v2/"),
            ("/api/x/y", "/api/", "/", "/x/y"),
            ("/x", "", "/v2/", "/v2/x"),
            ("/old", "/old", "/new", "/new"),
            ("/api", "/api", "/", "/"),
        ] {
            assert_eq!(
                replace_prefix(path, matched, new),
                want,
                "{path} {matched} {new}"
            );
        }
    }

    fn head(uri: &str, host: &str) -> Parts {
        http::Request::get(uri)
            .header("host", host)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn redirects_keep_what_they_do_not_replace() {
        let m: RouteMatch = serde_json::from_str(r#"{"path_prefix": "/old"}"#).unwrap();
        let r = |json: &str| RedirectRt::compile(&serde_json::from_str(json).unwrap(), &m);
        let h = head("/old/a?q=1", "shop.example:8080");
        let loc = |r: &RedirectRt, tls| r.location(&h, tls).unwrap().to_str().unwrap().to_string();
        assert_eq!(
            loc(&r(r#"{"path_prefix": "/new/"}"#), false),
            "http://shop.example:8080/new/a?q=1"
        );
        assert_eq!(
            loc(&r(r#"{"scheme": "https"}"#), false),
            "https://shop.example/old/a?q=1",
            "a new scheme drops the old port"
        );
        assert_eq!(
            loc(
                &r(
                    r#"{"status": 308, "scheme": "https", "host": "example.com", "port": 443, "path": "/x"}"#
                ),
                false
            ),
            "https://example.com/x?q=1"
        );
        assert_eq!(
            loc(&r(r#"{"port": 8443}"#), true),
            "https://shop.example:8443/old/a?q=1"
        );
    }

    #[test]
    fn templates_render_variables_and_skip_empty_values() {
        let t = |s: &str| {
            Value::compile(&<HeaderTemplate as spur_config::ConfigValue>::parse_value(s).unwrap())
        };
        let id = HeaderValue::from_static("abc");
        let vars = Vars {
            request_id: Some(&id),
            ..Default::default()
        };
        assert_eq!(t("%REQUEST_ID%").render(&vars).unwrap(), "abc");
        assert_eq!(
            t("id=%REQUEST_ID%;p=%PEER_IDENTITY%")
                .render(&vars)
                .unwrap(),
            "id=abc;p="
        );
        assert_eq!(t("%PEER_IDENTITY%").render(&vars), None);
        assert_eq!(t("plain").render(&vars).unwrap(), "plain");
    }
}
