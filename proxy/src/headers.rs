//! Header hygiene between hops: hop-by-hop removal, forwarding headers, size accounting.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1); also
/// `HTTP2-Settings`, which belongs to an h2c upgrade (RFC 7540 §3.2.1), even when a client
/// forgets to name it in `Connection`.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    HeaderName::from_static("http2-settings"),
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static X_SPUR_ERROR: HeaderName = HeaderName::from_static("x-spur-error");
pub static X_SPUR_PEER_IDENTITY: HeaderName = HeaderName::from_static("x-spur-peer-identity");
pub static X_SPUR_HOPS: HeaderName = HeaderName::from_static("x-spur-hops");

/// Removes hop-by-hop headers, and any header the `Connection` header names. `TE: trailers`
/// survives (gRPC needs it end to end).
///
/// Most heads carry none of them (or only `Connection`): one pass over the names, which
/// compares well-known names as integers, decides whether any lookup is needed at all,
/// rather than seven hashed removals on every request and every response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if name != header::TE {
                headers.remove(&name);
            }
        }
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|h| h == name)
}

/// Whether a header is one Spur sets itself (`x-spur-…`), which a client cannot send.
pub fn is_spur_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-spur-")
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
pub fn is_upgrade_parts(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The `Upgrade` value to send upstream for an HTTP/1.1 upgrade request: the protocols of
/// the client's list that `allowed` accepts (by name, without the `/version`), as the
/// client wrote them. `None` when the request asks for no upgrade or for none allowed: it
/// then goes on as a plain request, its upgrade stripped (`h2c` always is).
pub fn upgrade_to_send(
    version: Version,
    headers: &HeaderMap,
    allowed: impl Fn(&str) -> bool,
) -> Option<HeaderValue> {
    if !is_upgrade_parts(version, headers) {
        return None;
    }
    let mut kept = String::new();
    let offered = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for proto in offered {
        let name = proto.split('/').next().unwrap_or_default();
        if !name.eq_ignore_ascii_case("h2c") && allowed(&name.to_ascii_lowercase()) {
            if !kept.is_empty() {
                kept.push_str(", ");
            }
            kept.push_str(proto);
        }
    }
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept).ok()
}

/// Appends the client's address to `x-forwarded-for` (one header: several that came are
/// joined in order, none dropped) and sets `x-forwarded-proto`.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &HeaderValue, proto: &'static str) {
    let mut prev = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if prev.peek().is_none() {
        // The common case: the client's address alone, made once per connection.
        headers.insert(X_FORWARDED_FOR.clone(), peer.clone());
    } else {
        let mut value = Vec::with_capacity(48);
        for p in prev {
            value.extend_from_slice(p.as_bytes());
            value.extend_from_slice(b", ");
        }
        value.extend_from_slice(peer.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// A client address as an `x-forwarded-for` element.
pub fn forwarded_value(peer: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value")
}

/// The hop count a request arrived with (`x-spur-hops`, the largest if several; one that is
/// not a number counts as 0).
pub fn hops_of(headers: &HeaderMap) -> u32 {
    headers
        .get_all(&X_SPUR_HOPS)
        .iter()
        .filter_map(|v| v.to_str().ok()?.trim().parse::<u32>().ok())
        .max()
        .unwrap_or(0)
}

/// The most Spur proxies a request may cross; the next one answers 508 `loop_detected`.
/// A mesh hop is two proxies (client and server sidecars), so this allows call chains of
/// 16 services that pass on every header, while a cluster pointing back at its own
/// listener stops after 32 hops instead of going on until something breaks.
pub const MAX_HOPS: u32 = 32;

/// `x-spur-hops: n` for the upstream, without an allocation per request.
pub fn hops_header(n: u32) -> HeaderValue {
    const VALUES: [&str; MAX_HOPS as usize + 1] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31",
        "32",
    ];
    match VALUES.get(n as usize) {
        Some(v) => HeaderValue::from_static(v),
        None => HeaderValue::from(n),
    }
}

/// Whether an HTTP/1.1 response's framing is ambiguous: both `content-length` and
/// `transfer-encoding`. RFC 9112 §6.1 calls that a possible response-splitting attempt:
/// such a response is not passed on, and its connection is not used again.
pub fn ambiguous_framing(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_LENGTH)
}

/// The size of a request head as it would be written in HTTP/1.1, for the header limit.
pub fn head_size_of(head: &http::request::Parts) -> usize {
    let line =
        head.method.as_str().len() + head.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    head.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// The request's host, without port: the URI authority (HTTP/2) or the Host header.
pub fn host_of<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(h) = uri.host() {
        return Some(h);
    }
    let raw = headers.get(header::HOST)?.to_str().ok()?;
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("te", "trailers, deflate".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn only_allowed_upgrades_go_on() {
        let ws = |p: &str| p == "websocket";
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade, HTTP2-Settings".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAAQAAP__".parse().unwrap());
        assert_eq!(upgrade_to_send(Version::HTTP_11, &h, ws), None);
        assert_eq!(
            upgrade_to_send(Version::HTTP_11, &h, |_| true),
            None,
            "never h2c"
        );
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        h.insert("connection", "upgrade".parse().unwrap());
        h.insert("upgrade", "h2c, WebSocket, foo/2".parse().unwrap());
        assert_eq!(
            upgrade_to_send(Version::HTTP_11, &h, ws).unwrap(),
            "WebSocket"
        );
        let any = upgrade_to_send(Version::HTTP_11, &h, |p| p == "foo" || p == "websocket");
        assert_eq!(any.unwrap(), "WebSocket, foo/2");
        assert_eq!(upgrade_to_send(Version::HTTP_2, &h, ws), None);
        h.remove("connection");
        assert_eq!(
            upgrade_to_send(Version::HTTP_11, &h, ws),
            None,
            "not named in Connection"
        );
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            &forwarded_value("10.0.0.1".parse().unwrap()),
            "http",
        );
        set_forwarded(&mut h, &forwarded_value("::1".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        // Two that came are joined, not one dropped.
        h.append("x-forwarded-for", "192.0.2.9".parse().unwrap());
        set_forwarded(
            &mut h,
            &forwarded_value("10.0.0.2".parse().unwrap()),
            "https",
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1, 192.0.2.9, 10.0.0.2");
    }

    #[test]
    fn hop_counts() {
        let mut h = HeaderMap::new();
        assert_eq!(hops_of(&h), 0);
        h.append("x-spur-hops", "3".parse().unwrap());
        h.append("x-spur-hops", "7".parse().unwrap());
        assert_eq!(hops_of(&h), 7);
        h.insert("x-spur-hops", "many".parse().unwrap());
        assert_eq!(hops_of(&h), 0);
        for n in [0, 1, 9, 10, 31, 32, 33, 1000] {
            assert_eq!(hops_header(n), n.to_string().as_str());
        }
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
