//! CORS on a route: preflights answered by Spur, browser requests from other origins
//! checked, and the response headers that let the browser read the answer.
//!
//! - A **preflight** (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is routed
//!   as the request it announces (so a route matching `method: POST` answers the preflight
//!   of a POST), and answered here with `204`: `Access-Control-Allow-Origin` (the origin
//!   itself, never `*`, with `Vary: Origin`), `-Allow-Methods`, `-Allow-Headers`,
//!   `-Max-Age` and `-Allow-Credentials`. It never reaches the service.
//! - A request whose `Origin` the route does not allow is refused: 403 `cors_forbidden`
//!   (preflight or not). Same-origin requests (the browser sends `Origin` on a same-origin
//!   POST too) are not CORS requests and pass.
//! - An allowed request goes on; its response gets `Access-Control-Allow-Origin`,
//!   `-Expose-Headers` and `-Allow-Credentials`.

use super::answer::Answer;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use spur_config::{Cors, OriginPattern};

pub struct CorsRt {
    origins: Vec<OriginPattern>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> Option<HeaderValue> {
    let text = items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    (!text.is_empty()).then(|| HeaderValue::from_str(&text).expect("tokens"))
}

/// What CORS decided for a request.
pub enum Decision {
    /// Not a CORS request (no `Origin`, or the request's own origin).
    None,
    /// An allowed origin: the response gets the CORS headers for it.
    Allowed(HeaderValue),
    /// An origin the route does not allow.
    Forbidden,
}

impl CorsRt {
    pub fn compile(c: &Cors) -> CorsRt {
        CorsRt {
            origins: c.allow_origins.iter().map(|o| o.get().clone()).collect(),
            allow_methods: join(c.allow_methods.iter().map(|m| m.get().as_str())),
            allow_headers: join(c.allow_headers.iter().map(|h| h.get().as_str())),
            expose_headers: join(c.expose_headers.iter().map(|h| h.get().as_str())),
            credentials: c.allow_credentials,
            max_age: c.max_age.map(|d| HeaderValue::from(d.get().as_secs())),
        }
    }

    /// Decides for a request on a listener with or without TLS.
    pub fn decide(&self, headers: &HeaderMap, uri: &http::Uri, tls: bool) -> Decision {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Decision::None;
        };
        let Ok(text) = origin.to_str() else {
            return Decision::Forbidden;
        };
        if same_origin(text, headers, uri, tls) {
            return Decision::None;
        }
        if self.origins.iter().any(|o| o.matches(text)) {
            Decision::Allowed(origin.clone())
        } else {
            Decision::Forbidden
        }
    }

    /// The preflight answer for an allowed origin.
    pub fn preflight(&self, origin: HeaderValue) -> Box<Answer> {
        let mut h = HeaderMap::with_capacity(8);
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        let methods = self
            .allow_methods
            .clone()
            .unwrap_or(HeaderValue::from_static("GET, HEAD, POST"));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
        if let Some(v) = &self.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.insert(
            header::VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Answer::empty(StatusCode::NO_CONTENT, h)
    }

    /// The headers of a response to an allowed browser request.
    pub fn on_response(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if let Some(v) = &self.expose_headers {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// The method a CORS preflight announces (`None`: not a preflight).
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(header::ORIGIN) {
        return None;
    }
    let m = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(m.as_bytes()).ok()
}

/// Whether `origin` is the request's own: same scheme (the listener's), same host and port.
fn same_origin(origin: &str, headers: &HeaderMap, uri: &http::Uri, tls: bool) -> bool {
    let scheme = if tls { "https://" } else { "http://" };
    let Some(rest) = origin
        .get(..scheme.len())
        .filter(|s| s.eq_ignore_ascii_case(scheme))
        .map(|_| &origin[scheme.len()..])
    else {
        return false;
    };
    let host = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST)?.to_str().ok());
    host.is_some_and(|h| h.eq_ignore_ascii_case(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors() -> CorsRt {
        CorsRt::compile(
            &serde_json::from_str(
                r#"{"allow_origins": ["https://app.example.com", "https://*.example.com"],
                    "allow_methods": ["GET", "POST"], "allow_headers": ["content-type"],
                    "expose_headers": ["x-request-id"], "allow_credentials": true, "max_age": "10m"}"#,
            )
            .unwrap(),
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn origins_are_allowed_refused_or_not_cors_at_all() {
        let c = cors();
        let uri: http::Uri = "/api".parse().unwrap();
        let d = |h: &[(&str, &str)], tls| c.decide(&headers(h), &uri, tls);
        assert!(matches!(d(&[], false), Decision::None));
        assert!(matches!(
            d(&[("origin", "https://a.example.com")], false),
            Decision::Allowed(_)
        ));
        assert!(matches!(
            d(&[("origin", "https://evil.test")], false),
            Decision::Forbidden
        ));
        // The request's own origin: not a CORS request.
        assert!(matches!(
            d(
                &[
                    ("origin", "https://api.test:8443"),
                    ("host", "api.test:8443")
                ],
                true
            ),
            Decision::None
        ));
        assert!(matches!(
            d(
                &[
                    ("origin", "http://api.test:8443"),
                    ("host", "api.test:8443")
                ],
                true
            ),
            Decision::Forbidden
        ));
    }

    #[test]
    fn the_preflight_answer_says_what_is_allowed() {
        let a = cors().preflight(HeaderValue::from_static("https://app.example.com"));
        assert_eq!(a.status, 204);
        let h = &a.headers;
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET, POST");
        assert_eq!(h["access-control-allow-headers"], "content-type");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let m = preflight_method(
            &Method::OPTIONS,
            &headers(&[
                ("origin", "https://x"),
                ("access-control-request-method", "POST"),
            ]),
        );
        assert_eq!(m, Some(Method::POST));
        assert_eq!(preflight_method(&Method::OPTIONS, &headers(&[])), None);
    }
}
