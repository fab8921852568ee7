//! The web console at `/ui`: a single page served from assets compiled into the binary
//! (nothing to install, no CDN, no fetch from anywhere but this control plane), and the
//! few API calls it needs beyond SPEC's first table (`GET /v1/groups`, the diff).
//!
//! Security, in the order an attacker would try:
//! - The page holds no data: every number and name comes from `/v1/...` calls that carry
//!   the API token (kept in `sessionStorage`, sent as a bearer header, never in a URL), so
//!   the page itself may be served to anyone, and a wrong token sees nothing.
//! - Every answer of the control plane carries [`CSP`]: scripts and styles only from this
//!   origin and no inline script, no other origin to connect to, no framing, so even an
//!   injected tag could not run or exfiltrate.
//! - The script never parses data as HTML: values from configs, proxies and requests (a
//!   route named `<img src=x onerror=alert(1)>`, a proxy's error text, a tapped path) are
//!   set as text nodes only (see `assets/app.js`, `el()`).

pub mod diff;

use crate::api::{error, error_free, Body};
use crate::Control;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::Arc;

/// The Content-Security-Policy of every answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Adds the security headers to an answer of the control plane.
pub fn secure(mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(
            Full::new(Bytes::from_static(text.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static parts are valid")
}

/// `GET /ui...`: the page and its assets; `None` for a path that is not one of them.
pub fn ui(path: &str) -> Option<Response<Body>> {
    Some(match path {
        "/ui" | "/ui/" | "/ui/index.html" => asset("text/html; charset=utf-8", INDEX),
        "/ui/app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "/ui/app.css" => asset("text/css; charset=utf-8", APP_CSS),
        "/ui/icon.svg" => asset("image/svg+xml", ICON),
        _ => return None,
    })
}

/// `GET /v1/groups`: every group with its current version, and the proxies reporting.
pub fn groups(control: &Control) -> Response<Body> {
    let proxies = crate::shared_proxies::merged(control);
    let proxies = proxies.as_array().cloned().unwrap_or_default();
    let groups: Vec<Value> = {
        let mut names = control.store.groups();
        names.sort();
        names
            .into_iter()
            .map(|g| {
                let current = control.store.current(&g);
                let count = proxies.iter().filter(|p| p["group"] == g.as_str()).count();
                json!({
                    "group": g,
                    "version": current.as_ref().map(|s| s.version),
                    "action": current.as_ref().map(|s| s.action.clone()),
                    "created_at": current.as_ref().map(|s| s.created_at),
                    "proxies": count,
                })
            })
            .collect()
    };
    error_free(json!({ "groups": groups }))
}

/// A stored config as YAML, the way a person edits it.
pub fn yaml(config: &spur_config::Config) -> String {
    serde_yaml_ng::to_string(config).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

/// `GET /v1/groups/{group}/diff?from=N&to=M`: `{"from", "to", "diff"}`, the diff a unified
/// diff of the two versions' configs as YAML (empty when they are the same).
pub fn diff(control: &Control, group: &str, query: Option<&str>) -> Response<Body> {
    let mut from = None;
    let mut to = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "from" => &mut from,
            "to" => &mut to,
            _ => continue,
        };
        match v.parse::<u64>() {
            Ok(n) => *slot = Some((k, n)),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    k,
                    format!("`{v}` is not a version number"),
                )
            }
        }
    }
    let mut configs = Vec::new();
    for (name, asked) in [("from", from), ("to", to)] {
        let Some((_, n)) = asked else {
            return error(
                StatusCode::BAD_REQUEST,
                name,
                "give ?from=N&to=M (version numbers)",
            );
        };
        match control.store.get(group, n) {
            Some(s) => configs.push((n, yaml(&s.config))),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    name,
                    format!("group `{group}` has no version {n}"),
                )
            }
        }
    }
    let (a, b) = (&configs[0], &configs[1]);
    let text = diff::unified(
        &a.1,
        &b.1,
        &format!("{group} version {}", a.0),
        &format!("{group} version {}", b.0),
    );
    error_free(json!({ "group": group, "from": a.0, "to": b.0, "diff": text }))
}

/// Whether a group call (`/v1/groups/{group}/REST`) is one of the console's and live
/// traffic's: answered by [`call`].
pub fn is_console_call(method: &Method, rest: &[&str]) -> bool {
    matches!(
        (method.as_str(), rest),
        ("GET", ["traffic" | "tap" | "diff"]) | ("POST", ["proxies", _, "tap"])
    )
}

/// `GET .../traffic`, `GET .../tap`, `GET .../diff` and the proxies' `POST
/// .../proxies/{node}/tap`, after the token check.
pub async fn call(
    control: &Arc<Control>,
    group: &str,
    method: &Method,
    rest: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    let query = req.uri().query();
    match (method.as_str(), rest) {
        ("GET", ["traffic"]) => match crate::traffic::window_and_step(query) {
            Ok((window, step)) => {
                let now = crate::traffic::now_secs();
                error_free(control.traffic.doc(group, window, step, now))
            }
            Err((path, message)) => error(StatusCode::BAD_REQUEST, &path, message),
        },
        ("GET", ["tap"]) => crate::traffic::tap::stream(control, group, query),
        ("GET", ["diff"]) => diff(control, group, query),
        ("POST", ["proxies", node, "tap"]) => {
            let node = node.to_string();
            let body = match crate::api::read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let now = std::time::Instant::now();
            let (taken, over) = control.traffic.taps.publish(group, &node, &body, now);
            control.metrics.tap_lines.inc_by(taken);
            control.metrics.tap_lines_over_rate.inc_by(over);
            error_free(json!({ "taken": taken, "over_rate": over }))
        }
        _ => error(StatusCode::NOT_FOUND, "", "no such endpoint"),
    }
}

/// `%XX` escapes and `+` of a query value, decoded (invalid escapes kept as they are).
pub fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%3Cimg%3E"), "<img>");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe-inline"));
        assert!(!INDEX.contains("<script>"), "no inline script");
        assert!(!INDEX.contains("style="), "no inline style");
        assert!(
            !APP_JS.contains("innerHTML"),
            "values are never parsed as HTML"
        );
        for text in [INDEX, APP_JS, APP_CSS] {
            // The SVG namespace is a name, not an address the page loads.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "no other origin"
            );
        }
        let size = INDEX.len() + APP_JS.len() + APP_CSS.len() + ICON.len();
        assert!(size < 300 * 1024, "the console is {size} bytes");
    }
}
