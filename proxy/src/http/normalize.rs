//! **Normalise**: one host and one path per request, the same for routing as for the
//! upstream.
//!
//! A proxy that routes on one reading of a request and forwards another can be walked
//! around: a `path_prefix: /admin` rule does not see `/%61dmin`, `//admin` or `/x/../admin`,
//! which a backend serves as `/admin`; a `host:` rule sees the absolute-form target
//! `http://public.example/x` while the backend reads `Host: internal.example`. So before a
//! request is routed its head is rewritten, in place, into the one form both sides use
//! (Envoy's `normalize_path` and `merge_slashes`, RFC 3986 §6.2.2):
//!
//! - **Host.** HTTP/1.1 needs exactly one `Host` (RFC 9112 §3.2: 400 without one, or with
//!   two); an absolute-form target's authority replaces it. HTTP/2 and HTTP/3 carry
//!   `:authority`, and a `host` header beside it must agree (RFC 9113 §8.3.1). Afterwards
//!   the request has one host, lower case and without a trailing dot: the URI's authority
//!   (HTTP/2, HTTP/3) or `Host` (HTTP/1.x, whose URI is then origin-form), which is where
//!   routes ([`crate::headers::host_of`]) and the upstream read it.
//! - **Path.** Percent-escapes of unreserved characters are decoded (`%61` is `a`), other
//!   escapes get upper-case digits, repeated slashes are merged and dot segments removed.
//!   An encoded slash (`%2F`, `%5C`) or a backslash means different paths to different
//!   servers, so it is refused unless the listener opts in (`allow_encoded_slashes`), and
//!   then it is kept exactly as sent. The query is never touched.
//!
//! CONNECT is refused (405): its target is a host to open a tunnel to, and Spur tunnels
//! nothing but the upgrades a route allows.
//!
//! A path that needs none of this (the common case) is checked in one pass over its bytes
//! and not copied.

use crate::headers::Seen;
use crate::reason::Reason;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{Uri, Version};
use std::borrow::Cow;

/// Rewrites `head` into its normal form (see the module doc), or the reason to refuse it.
/// `seen`: the headers it has (a `host` is looked for only when it may be there).
pub fn head(head: &mut Parts, seen: Seen, allow_encoded_slashes: bool) -> Result<(), Reason> {
    if head.method == http::Method::CONNECT {
        // Its target is a host to tunnel to, not a resource: nothing to route on.
        return Err(Reason::MethodNotAllowed);
    }
    host(head, seen)?;
    let Some(pq) = head.uri.path_and_query() else {
        // No path: an HTTP/2 request without `:path`, which hyper refuses before this.
        return Ok(());
    };
    if let Some(normal) = path(pq, allow_encoded_slashes)? {
        head.uri = Uri::from(normal);
    }
    Ok(())
}

/// One host per request, in canonical form. An HTTP/1.x absolute-form target's authority
/// becomes `Host` (and the URI origin-form); otherwise the host stays where it came (`Host`,
/// or the HTTP/2 and HTTP/3 `:authority` in the URI), rewritten only when it is not
/// canonical, so the common request costs a scan and no copy.
fn host(head: &mut Parts, seen: Seen) -> Result<(), Reason> {
    let mut sent = None;
    if seen.has(Seen::HOST) {
        let mut hosts = head.headers.get_all(header::HOST).iter();
        sent = hosts.next().cloned();
        if hosts.next().is_some() {
            return Err(Reason::InvalidHost);
        }
    }
    if let Some(h) = &sent {
        if !valid_authority(h.as_bytes()) {
            return Err(Reason::InvalidHost);
        }
    }
    let http1 = matches!(
        head.version,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    );
    match head.uri.authority().cloned() {
        // HTTP/1.x absolute form: the target's authority wins over Host (RFC 9112 §3.2.2).
        Some(a) if http1 => {
            checked(&a)?;
            let value = HeaderValue::try_from(canonical(a.as_str()).into_owned())
                .map_err(|_| Reason::InvalidHost)?;
            head.headers.insert(header::HOST, value);
            head.uri = match head.uri.path_and_query() {
                Some(pq) => Uri::from(pq.clone()),
                None => Uri::from_static("/"),
            };
        }
        // HTTP/2 and HTTP/3: a `host` beside `:authority` must agree with it.
        Some(a) => {
            checked(&a)?;
            if sent
                .as_ref()
                .is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()))
            {
                return Err(Reason::InvalidHost);
            }
            if let Cow::Owned(c) = canonical(a.as_str()) {
                let mut parts = head.uri.clone().into_parts();
                parts.authority =
                    Some(Authority::try_from(c.as_str()).map_err(|_| Reason::InvalidHost)?);
                head.uri = Uri::from_parts(parts).map_err(|_| Reason::InvalidHost)?;
                if sent.is_some() {
                    let value = HeaderValue::try_from(c).map_err(|_| Reason::InvalidHost)?;
                    head.headers.insert(header::HOST, value);
                }
            }
        }
        None => match sent {
            // RFC 9112 §3.2: HTTP/1.1 needs one; HTTP/1.0 may go without.
            None if head.version == Version::HTTP_11 => return Err(Reason::InvalidHost),
            None => {}
            Some(h) => {
                let text = h.to_str().map_err(|_| Reason::InvalidHost)?;
                if let Cow::Owned(c) = canonical(text) {
                    let value = HeaderValue::try_from(c).map_err(|_| Reason::InvalidHost)?;
                    head.headers.insert(header::HOST, value);
                }
            }
        },
    }
    Ok(())
}

/// A URI authority that names a host: no user info (`user@host`), a host that is not empty.
fn checked(a: &Authority) -> Result<(), Reason> {
    if a.as_str().contains('@') || crate::headers::authority_host(a.as_str()).is_empty() {
        return Err(Reason::InvalidHost);
    }
    Ok(())
}

/// Whether a `Host` value is `host[:port]` (RFC 9110 §7.2, RFC 3986 §3.2): a registered
/// name or IPv4 address of unreserved characters, sub-delims and escapes, or an IPv6
/// literal in brackets; a port of at most five digits. Checked without a copy.
fn valid_authority(b: &[u8]) -> bool {
    let (host, port) = match b.first() {
        Some(b'[') => match b.iter().position(|c| *c == b']') {
            Some(end) => {
                let inner = &b[1..end];
                let ok = !inner.is_empty()
                    && inner
                        .iter()
                        .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'));
                if !ok {
                    return false;
                }
                match &b[end + 1..] {
                    [] => (&b[..=end], None),
                    [b':', port @ ..] => (&b[..=end], Some(port)),
                    _ => return false,
                }
            }
            None => return false,
        },
        _ => match b.iter().rposition(|c| *c == b':') {
            Some(i) => (&b[..i], Some(&b[i + 1..])),
            None => (b, None),
        },
    };
    let name = |c: &u8| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(c);
    !host.is_empty()
        && (host[0] == b'[' || host.iter().all(name))
        && port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
}

/// The authority in lower case, its host without a trailing dot (`Shop.Example.:80` is
/// `shop.example:80`); borrowed when it is so already.
fn canonical(s: &str) -> Cow<'_, str> {
    let (host, port) = match s.strip_prefix('[') {
        Some(_) => match s.find(']') {
            Some(end) => (&s[..=end], &s[end + 1..]),
            None => (s, ""),
        },
        None => match s.rfind(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        },
    };
    let dot = host.len() > 1 && host.ends_with('.');
    if !dot && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(s);
    }
    let mut out = host.trim_end_matches('.').to_ascii_lowercase();
    out.push_str(port);
    Cow::Owned(out)
}

/// The normal form of `pq` (`None`: it is normal already), or [`Reason::InvalidPath`].
pub fn path(
    pq: &PathAndQuery,
    allow_encoded_slashes: bool,
) -> Result<Option<PathAndQuery>, Reason> {
    let p = pq.path();
    if p == "*" {
        return Ok(None);
    }
    if !p.starts_with('/') {
        return Err(Reason::InvalidPath);
    }
    if !needs_work(p.as_bytes(), allow_encoded_slashes)? {
        return Ok(None);
    }
    let decoded = decode_unreserved(p, allow_encoded_slashes)?;
    let mut out = remove_dot_segments(&decoded);
    if let Some(q) = pq.query() {
        out.push('?');
        out.push_str(q);
    }
    PathAndQuery::try_from(out)
        .map(Some)
        .map_err(|_| Reason::InvalidPath)
}

/// Whether the path has anything to rewrite: a `%`, a `//`, or a `.` or `..` segment (also
/// one with parameters, `..;x`). A backslash is refused here unless allowed.
fn needs_work(p: &[u8], allow_encoded_slashes: bool) -> Result<bool, Reason> {
    for (i, &b) in p.iter().enumerate() {
        match b {
            b'%' => return Ok(true),
            b'\\' if !allow_encoded_slashes => return Err(Reason::InvalidPath),
            b'/' => match p.get(i + 1) {
                Some(b'/') => return Ok(true),
                Some(b'.') => {
                    let rest = &p[i + 1..];
                    let seg = rest.split(|c| *c == b'/').next().unwrap_or_default();
                    let name = seg.split(|c| *c == b';').next().unwrap_or_default();
                    if name == b"." || name == b".." {
                        return Ok(true);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
    Ok(false)
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes escapes of unreserved characters and upper-cases the digits of the others; an
/// escape that is not `%` and two hex digits is refused, and so is an encoded `/` or `\`
/// unless allowed (then it stays encoded: the path keeps its segments as sent).
fn decode_unreserved(p: &str, allow_encoded_slashes: bool) -> Result<Cow<'_, str>, Reason> {
    if !p.contains('%') {
        return Ok(Cow::Borrowed(p));
    }
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Reason::InvalidPath);
        };
        let v = hi * 16 + lo;
        if unreserved(v) {
            out.push(v);
        } else {
            if matches!(v, b'/' | b'\\') && !allow_encoded_slashes {
                return Err(Reason::InvalidPath);
            }
            out.push(b'%');
            out.extend_from_slice(format!("{v:02X}").as_bytes());
        }
        i += 3;
    }
    // Only ASCII was added, in place of ASCII: the bytes are still UTF-8.
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| Reason::InvalidPath)
}

/// RFC 3986 §5.2.4 on a path whose repeated slashes are merged: `.` segments go, `..`
/// removes the segment before it (never above the root). A dot segment with parameters
/// (`..;x`) is a dot segment too, as servlet containers read it. A path that ended on a
/// slash or a dot segment ends on a slash.
fn remove_dot_segments(p: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in p.split('/').skip(1) {
        let name = seg.split(';').next().unwrap_or_default();
        trailing = seg.is_empty() || name == "." || name == "..";
        match name {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(seg),
        }
    }
    let mut out = String::with_capacity(p.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

/// The path as routes match it: each segment without its parameters (`/admin;x/a` is
/// `/admin/a`), so a `path_prefix: /admin` rule sees what a servlet container serves.
/// Borrowed when the path has no `;`.
pub fn match_path(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.split(';').next().unwrap_or_default());
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Reason> {
        norm_with(p, false)
    }

    fn norm_with(p: &str, allow: bool) -> Result<String, Reason> {
        let pq = PathAndQuery::try_from(p).unwrap();
        Ok(path(&pq, allow)?.map_or(p.to_string(), |n| n.as_str().to_string()))
    }

    #[test]
    fn paths_that_reach_admin_are_admin() {
        for p in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6e",
            "//admin",
            "///admin",
            "/./admin",
            "/x/../admin",
            "/x/y/../../admin",
            "/../admin",
            "/%2e%2e/admin",
            "/x/%2E%2E/admin",
            "/x/..;/admin",
            "/.;x/admin",
        ] {
            assert_eq!(norm(p).as_deref(), Ok("/admin"), "{p}");
        }
    }

    #[test]
    fn slashes_dots_queries_and_escapes() {
        let cases = [
            ("/", "/"),
            ("/a/b/", "/a/b/"),
            ("/a//b//", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/a/.b/..c", "/a/.b/..c"),
            ("/a?x=/../y&z=%2F", "/a?x=/../y&z=%2F"),
            ("//a?q=1", "/a?q=1"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/%7euser", "/~user"),
            ("/a%25%32%66", "/a%252f"),
            ("/a;x/b", "/a;x/b"),
            ("*", "*"),
        ];
        for (p, want) in cases {
            assert_eq!(norm(p).as_deref(), Ok(want), "{p}");
        }
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_refused_unless_allowed() {
        for p in [
            "/a%2Fb",
            "/a%2fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
            "/a\\..\\admin",
        ] {
            assert_eq!(norm(p), Err(Reason::InvalidPath), "{p}");
        }
        assert_eq!(norm_with("/a%2fb", true).as_deref(), Ok("/a%2Fb"));
        assert_eq!(norm_with("/a%5C..%5Cb", true).as_deref(), Ok("/a%5C..%5Cb"));
        assert_eq!(norm_with("/a\\b", true).as_deref(), Ok("/a\\b"));
        for p in ["/a%", "/a%2", "/a%zz", "/a%%41"] {
            assert_eq!(norm(p), Err(Reason::InvalidPath), "{p}");
        }
    }

    #[test]
    fn a_normal_path_is_not_copied() {
        let pq = PathAndQuery::from_static("/shop/cart/item-1.json?x=1");
        assert!(path(&pq, false).unwrap().is_none());
    }

    #[test]
    fn parameters_do_not_hide_a_segment_from_routes() {
        assert_eq!(match_path("/admin;x"), "/admin");
        assert_eq!(match_path("/admin;jsessionid=1/users;v=2"), "/admin/users");
        assert!(matches!(match_path("/plain"), Cow::Borrowed("/plain")));
    }

    fn parts(version: Version, uri: &str, hosts: &[&str]) -> Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn host_of(p: &Parts) -> Option<&str> {
        p.headers.get("host").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn one_host_per_request() {
        let h1 = Version::HTTP_11;
        let mut p = parts(h1, "/x", &["Shop.Example.:8080"]);
        head(&mut p, Seen::ALL, false).unwrap();
        assert_eq!(host_of(&p), Some("shop.example:8080"));
        // Absolute form: the target's authority replaces Host; the URI is origin-form.
        let mut p = parts(h1, "http://public.example/x?q", &["internal.example"]);
        head(&mut p, Seen::ALL, false).unwrap();
        assert_eq!(host_of(&p), Some("public.example"));
        assert_eq!(p.uri, "/x?q");
        assert!(p.uri.authority().is_none());
        for (v, uri, hosts) in [
            (h1, "/x", &[][..]),
            (h1, "/x", &["a.example", "b.example"][..]),
            (h1, "/x", &["a.example", "a.example"][..]),
            (h1, "/x", &["a b"][..]),
            (h1, "/x", &[""][..]),
            (h1, "http://u@a.example/x", &[][..]),
            (
                Version::HTTP_2,
                "https://public.example/x",
                &["internal.example"][..],
            ),
            (
                Version::HTTP_3,
                "https://a.example/x",
                &["a.example", "a.example"][..],
            ),
        ] {
            let mut p = parts(v, uri, hosts);
            assert_eq!(
                head(&mut p, Seen::ALL, false),
                Err(Reason::InvalidHost),
                "{v:?} {uri} {hosts:?}"
            );
        }
        // HTTP/1.0 may go without; HTTP/2 may send a host that agrees, or only a host.
        let mut p = parts(Version::HTTP_10, "/x", &[]);
        assert_eq!(head(&mut p, Seen::ALL, false), Ok(()));
        assert_eq!(host_of(&p), None);
        let mut p = parts(Version::HTTP_2, "https://A.example./x", &["a.EXAMPLE."]);
        head(&mut p, Seen::ALL, false).unwrap();
        assert_eq!(host_of(&p), Some("a.example"));
        assert_eq!(p.uri, "https://a.example/x");
        let mut p = parts(Version::HTTP_2, "https://a.example:8443/x", &[]);
        head(&mut p, Seen::ALL, false).unwrap();
        assert_eq!(
            (host_of(&p), p.uri.authority().unwrap().as_str()),
            (None, "a.example:8443")
        );
        let mut p = parts(Version::HTTP_2, "/x", &["b.example"]);
        head(&mut p, Seen::ALL, false).unwrap();
        assert_eq!(host_of(&p), Some("b.example"));
    }

    #[test]
    fn connect_is_refused() {
        let mut p = http::Request::connect("internal.example:443")
            .header("host", "internal.example:443")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            head(&mut p, Seen::ALL, false),
            Err(Reason::MethodNotAllowed)
        );
    }

    #[test]
    fn host_values() {
        for ok in [
            "a",
            "a.example",
            "a.example:80",
            "a.example:",
            "10.0.0.1:8080",
            "[::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
            "a_b.example",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "", ":80", "a b", "u@a", "a/b", "a?b", "a#b", "[::1", "[zz]", "[::1]x", "a:123456",
            "a:8o", "a\"b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
        assert_eq!(canonical("Shop.Example.:80"), "shop.example:80");
        assert_eq!(canonical("[::1]:80"), "[::1]:80");
        assert!(matches!(canonical("a.example:80"), Cow::Borrowed(_)));
    }

    #[test]
    fn host_and_path_together() {
        let mut p = parts(
            Version::HTTP_11,
            "http://a.example//x/../%61dmin?q=%2F",
            &[],
        );
        head(&mut p, Seen::ALL, false).unwrap();
        assert_eq!(p.uri, "/admin?q=%2F");
        assert_eq!(host_of(&p), Some("a.example"));
    }
}
