//! Header hygiene between hops: hop-by-hop removal, size accounting (forwarding headers:
//! [`crate::http::forwarded`]); and the appends the HTTP/1.1 server and client write heads
//! with ([`put`], [`put_field`]).

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1); also
/// `HTTP2-Settings`, which belongs to an h2c upgrade (RFC 7540 §3.2.1), even when a client
/// forgets to name it in `Connection`.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION, // CONNECTION_BIT
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE, // TE_BIT
    HeaderName::from_static("http2-settings"),
];
/// Bits of [`HOP_BY_HOP`] entries in [`strip_hop_by_hop`]'s mask of names present.
const CONNECTION_BIT: u8 = 1 << 0;
const TE_BIT: u8 = 1 << 5;

/// Headers a map made by Spur's HTTP/1.1 server (a request's) or client (a response's) gets
/// room for beyond those that arrived: the request path adds its own to the same map
/// (request ID, forwarding, tracing, hops; an edge's response headers), and a map without
/// the room grows on the way, reallocating and rehashing what it holds.
pub const SPARE_HEADERS: usize = 8;

/// Appends `src` to a head being written: `BytesMut::put_slice` is a call per piece (34
/// instructions and a `memcpy` call for two bytes, in a callgrind profile); inlined here,
/// a constant piece such as `": "` is a store and the capacity check is two compares.
#[inline(always)]
pub fn put(out: &mut BytesMut, src: &[u8]) {
    out.reserve(src.len());
    // SAFETY: `reserve` left at least `src.len()` bytes of spare capacity after `len()`;
    // they are written before `set_len` counts them, and `src` is not in `out`'s buffer
    // (`&mut out` and `&src` cannot alias).
    unsafe {
        let dst = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        out.set_len(out.len() + src.len());
    }
}

/// Room made in an HTTP/1.1 read buffer (the server's, an upstream connection's) before
/// each read.
const READ_CHUNK: usize = 8 * 1024;

/// Makes room in an HTTP/1.1 read buffer for the next read: an emptied buffer goes back to
/// its front ([`rewind_empty`]), and one with less than a quarter of [`READ_CHUNK`] free
/// gets a chunk more.
#[inline]
pub fn make_room_to_read(buf: &mut BytesMut) {
    rewind_empty(buf);
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// An emptied read buffer starts again at the front of its allocation, when nothing else
/// holds a part of it (else it stays as it is; nothing is allocated). A connection's reads
/// then land on the same few cache lines exchange after exchange, as HAProxy's recycled
/// buffers do, rather than walking through kilobytes of it first: with a hundred upstream
/// connections that walk was most of a megabyte of memory, cold by the time it came round.
#[inline]
pub(crate) fn rewind_empty(buf: &mut BytesMut) {
    if buf.is_empty() {
        // One more byte than the room left behind the (empty) data: met only by moving to
        // the front, which `try_reclaim` does when the allocation is this handle's alone.
        let _ = buf.try_reclaim(buf.capacity() + 1);
    }
}

/// Appends a field line, `name: value\r\n`.
#[inline(always)]
pub fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    put(out, name);
    put(out, b": ");
    put(out, value);
    put(out, b"\r\n");
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static X_SPUR_ERROR: HeaderName = HeaderName::from_static("x-spur-error");
pub static X_SPUR_PEER_IDENTITY: HeaderName = HeaderName::from_static("x-spur-peer-identity");
pub static X_SPUR_HOPS: HeaderName = HeaderName::from_static("x-spur-hops");

thread_local! {
    /// The `date` value of the current second, per worker thread: formatted once a second.
    static DATE: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

/// `f` of the current time as an HTTP date (IMF-fixdate), for a response that has no
/// `date`: formatted once a second per thread (Spur's HTTP/1.1 server writes its bytes).
pub fn with_http_date<R>(f: impl FnOnce(&HeaderValue) -> R) -> R {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            let text = httpdate::fmt_http_date(now);
            *value = HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static(""));
            *at = secs;
        }
        f(value)
    })
}

/// The current time as an HTTP date, a value sharing the second's bytes (Spur's HTTP/2
/// server inserts it).
pub fn http_date() -> HeaderValue {
    with_http_date(HeaderValue::clone)
}

/// Removes hop-by-hop headers, and any header the `Connection` header names. `TE: trailers`
/// survives (gRPC needs it end to end).
///
/// Most heads carry none of them, or only `Connection: keep-alive` (every response of an
/// HTTP/1.1 origin such as nginx): one pass over the names, which compares well-known names
/// as integers, notes which are present, and only those are removed; a `Connection` token
/// costs a lookup (no allocation) and an allocation only when it names a header that is
/// there and not hop-by-hop already.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    strip_present(headers, present);
}

/// What a response head for the client has, noted while its hop-by-hop headers go.
pub struct ResponseHead {
    pub date: bool,
    pub content_length: bool,
}

/// [`strip_hop_by_hop`] for a response to the client, noting in the same pass over the
/// names whether it has a `date` and a `content-length` (HTTP/2's server adds them when
/// not).
pub fn strip_response(headers: &mut HeaderMap) -> ResponseHead {
    let mut present = 0u8;
    let mut head = ResponseHead {
        date: false,
        content_length: false,
    };
    for name in headers.keys() {
        if name == header::DATE {
            head.date = true;
        } else if name == header::CONTENT_LENGTH {
            head.content_length = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    strip_present(headers, present);
    if present & CONNECTION_BIT != 0 {
        // `Connection` may have named them.
        head.date = headers.contains_key(header::DATE);
        head.content_length = headers.contains_key(header::CONTENT_LENGTH);
    }
    head
}

/// Removes the hop-by-hop headers whose bits are in `present` (see [`strip_hop_by_hop`]).
fn strip_present(headers: &mut HeaderMap, present: u8) {
    if present == 0 {
        return;
    }
    if present & CONNECTION_BIT != 0 {
        for name in named_by_connection(headers) {
            headers.remove(&name);
        }
    }
    let te_trailers = present & TE_BIT != 0
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The headers present that a `Connection` header names, other than the hop-by-hop ones
/// (removed anyway; `TE` is kept for its `trailers`). Empty (no allocation) for the usual
/// `keep-alive`, `close` or `upgrade`.
fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        let Ok(v) = v.to_str() else { continue };
        for t in v.split(',').map(str::trim) {
            // A hop-by-hop name goes anyway; a token that names no header here costs a
            // lookup and nothing else.
            if t.is_empty()
                || HOP_BY_HOP
                    .iter()
                    .any(|h| t.eq_ignore_ascii_case(h.as_str()))
                || !headers.contains_key(t)
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
                named.push(name);
            }
        }
    }
    named
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

/// Which of the request headers the request path looks for a request arrived with, noted in
/// one pass over its names ([`scan`]): a phase looks a header up only when it is there, and
/// a request that carries none of them (most do) costs no lookup at all. A bit set is "may
/// be there": [`Seen::ALL`] is always correct, only slower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen(u32);

impl Seen {
    /// Each of [`HOP_BY_HOP`], by its index.
    pub const HOP_BY_HOP: Seen = Seen((1 << 7) - 1);
    pub const UPGRADE: Seen = Seen(1 << 4);
    /// Any `x-spur-…` header.
    pub const SPUR: Seen = Seen(1 << 7);
    pub const HOPS: Seen = Seen(1 << 8);
    pub const FLAGS: Seen = Seen(1 << 9);
    /// `traceparent`, `b3` or any `x-b3-…` header.
    pub const TRACE: Seen = Seen(1 << 10);
    pub const CONTENT_TYPE: Seen = Seen(1 << 11);
    pub const HOST: Seen = Seen(1 << 12);
    pub const USER_AGENT: Seen = Seen(1 << 13);
    /// The request ID header (`correlation.request_id_header`).
    pub const REQUEST_ID: Seen = Seen(1 << 14);
    pub const ALL: Seen = Seen(u32::MAX);

    /// Whether any of `bits` may be present.
    pub fn has(self, bits: Seen) -> bool {
        self.0 & bits.0 != 0
    }

    /// These headers and the bits of `name` (a header about to be added).
    pub fn with(self, name: &HeaderName, request_id: &HeaderName) -> Seen {
        Seen(self.0 | bits_of(name, request_id))
    }
}

/// An empty header map, for a phase to read in place of a request's when [`Seen`] says the
/// request has none of the headers it reads.
pub fn none() -> &'static HeaderMap {
    static NONE: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
    &NONE
}

/// One pass over a request head: its size as it would be written in HTTP/1.1 (for the
/// header limit) and the headers it has that the request path looks for.
pub fn scan(head: &http::request::Parts, request_id: &HeaderName) -> (usize, Seen) {
    let mut size =
        head.method.as_str().len() + head.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    let mut seen = 0;
    for (k, v) in &head.headers {
        size += k.as_str().len() + v.len() + 4;
        seen |= bits_of(k, request_id);
    }
    (size, Seen(seen))
}

/// The [`Seen`] bits of a header name.
fn bits_of(name: &HeaderName, request_id: &HeaderName) -> u32 {
    let s = name.as_str();
    let bits = match s {
        "connection" => 1 << 0,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "transfer-encoding" => 1 << 3,
        "upgrade" => Seen::UPGRADE.0,
        "te" => 1 << 5,
        "http2-settings" => 1 << 6,
        "host" => Seen::HOST.0,
        "user-agent" => Seen::USER_AGENT.0,
        "content-type" => Seen::CONTENT_TYPE.0,
        "traceparent" | "b3" => Seen::TRACE.0,
        _ if s.starts_with("x-b3-") => Seen::TRACE.0,
        "x-spur-hops" => Seen::SPUR.0 | Seen::HOPS.0,
        "x-spur-flags" => Seen::SPUR.0 | Seen::FLAGS.0,
        _ if s.starts_with("x-spur-") => Seen::SPUR.0,
        _ => 0,
    };
    if name == request_id {
        bits | Seen::REQUEST_ID.0
    } else {
        bits
    }
}

/// The request's host, without port: the URI authority (HTTP/2) or the Host header.
pub fn host_of<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(a) = uri.authority() {
        return Some(authority_host(a.as_str()));
    }
    let raw = headers.get(header::HOST)?.to_str().ok()?;
    Some(strip_port(raw))
}

/// The host of a URI authority (`[user@]host[:port]`), as `Authority::host` gives it (an
/// IPv6 literal keeps its brackets), in one forward pass over the bytes: `Authority::host`
/// searches with `rsplit` and `split`, several hundred instructions an HTTP/2 request.
pub fn authority_host(authority: &str) -> &str {
    let b = authority.as_bytes();
    let start = b.iter().rposition(|&c| c == b'@').map_or(0, |i| i + 1);
    let host_port = &authority[start..];
    let end = if host_port.starts_with('[') {
        host_port.bytes().position(|c| c == b']').map(|i| i + 1)
    } else {
        host_port.bytes().position(|c| c == b':')
    };
    &host_port[..end.unwrap_or(host_port.len())]
}

/// A `Host` value without its port (byte loops: `rsplit_once` costs a few hundred
/// instructions a request).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.bytes().rposition(|b| b == b':') {
        Some(i) if host.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An emptied buffer's next read lands where its first did, once the parts taken out
    /// are gone; while one is held, the buffer is left as it was and nothing is allocated.
    #[test]
    fn an_emptied_buffer_goes_back_to_its_front() {
        let mut buf = BytesMut::with_capacity(8192);
        let front = buf.as_ptr();
        for _ in 0..3 {
            buf.extend_from_slice(&[b'x'; 300]);
            let taken = buf.split_to(300).freeze();
            let (at, room) = (buf.as_ptr(), buf.capacity());
            rewind_empty(&mut buf);
            assert_eq!((buf.as_ptr(), buf.capacity()), (at, room), "a part is held");
            drop(taken);
            rewind_empty(&mut buf);
            assert_eq!(buf.as_ptr(), front);
            assert_eq!(buf.capacity(), 8192);
        }
        buf.extend_from_slice(b"left");
        let at = buf.as_ptr();
        rewind_empty(&mut buf);
        assert_eq!(buf.as_ptr(), at, "a buffer with bytes in it stays");
        let mut none = BytesMut::new();
        rewind_empty(&mut none);
        assert_eq!(none.capacity(), 0);
    }

    /// A read gets a chunk of room when a quarter of one is not left, and no more.
    #[test]
    fn room_is_made_for_a_read_only_when_it_is_short() {
        let mut buf = BytesMut::new();
        make_room_to_read(&mut buf);
        assert!(buf.capacity() >= READ_CHUNK);
        buf.extend_from_slice(&vec![b'x'; buf.capacity() - READ_CHUNK / 4]);
        let (at, room) = (buf.as_ptr(), buf.capacity());
        make_room_to_read(&mut buf);
        assert_eq!(
            (buf.as_ptr(), buf.capacity()),
            (at, room),
            "a quarter is enough"
        );
        buf.extend_from_slice(b"x");
        make_room_to_read(&mut buf);
        assert!(buf.capacity() - buf.len() >= READ_CHUNK);
    }

    #[test]
    fn fields_are_appended_whole_past_the_capacity_there_was() {
        let mut out = BytesMut::with_capacity(4);
        put(&mut out, b"GET / HTTP/1.1\r\n");
        for i in 0..40 {
            put_field(&mut out, b"x-n", i.to_string().as_bytes());
        }
        put_field(&mut out, b"empty", b"");
        put(&mut out, b"");
        let mut want = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            want.extend_from_slice(format!("x-n: {i}\r\n").as_bytes());
        }
        want.extend_from_slice(b"empty: \r\n");
        assert_eq!(&out[..], &want[..]);
    }

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
    fn authority_host_is_what_the_http_crate_gives() {
        for a in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "user@example.com:1",
            "a@b@example.com",
            "example.com:",
            ":80",
        ] {
            let parsed: http::uri::Authority = a.parse().unwrap();
            assert_eq!(authority_host(a), parsed.host(), "{a}");
        }
        assert_eq!(authority_host(""), "");
    }

    #[test]
    fn a_response_strip_notes_date_and_length() {
        let mut h = HeaderMap::new();
        h.insert("x-keep", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        let has = strip_response(&mut h);
        assert!(!has.date && !has.content_length);
        assert_eq!(h.len(), 1, "{h:?}");
        h.insert("date", "Thu, 03 Dec 2026 19:00:00 GMT".parse().unwrap());
        let has = strip_response(&mut h);
        assert!(has.date && !has.content_length);
        h.insert("content-length", "3".parse().unwrap());
        let has = strip_response(&mut h);
        assert!(has.date && has.content_length);
        assert_eq!(h.len(), 3);
        // What `Connection` names goes, and is not counted.
        h.insert("connection", "date".parse().unwrap());
        let has = strip_response(&mut h);
        assert!(!has.date && has.content_length);
        assert_eq!(h.len(), 2, "{h:?}");
    }

    #[test]
    fn every_connection_header_value_names_headers_to_drop() {
        let mut h = HeaderMap::new();
        h.append("connection", "close".parse().unwrap());
        h.append("connection", " X-One , ,x-two".parse().unwrap());
        h.insert("x-one", "1".parse().unwrap());
        h.insert("x-two", "2".parse().unwrap());
        h.insert("close", "named by the `close` token".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAAQAAP__".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"], "{h:?}");
        // Nothing hop-by-hop: untouched.
        let mut h = HeaderMap::new();
        h.insert("x-keep", "1".parse().unwrap());
        h.insert("content-length", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        // The mask's named bits point at their names.
        assert_eq!(
            HOP_BY_HOP[CONNECTION_BIT.trailing_zeros() as usize],
            header::CONNECTION
        );
        assert_eq!(HOP_BY_HOP[TE_BIT.trailing_zeros() as usize], header::TE);
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
    fn a_scan_notes_the_headers_the_request_path_looks_for() {
        let id = HeaderName::from_static("x-correlation");
        let head = |names: &[&str]| {
            let mut r = http::Request::get("/a").body(()).unwrap();
            for n in names {
                r.headers_mut().append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    "v".parse().unwrap(),
                );
            }
            r.into_parts().0
        };
        let (size, seen) = scan(&head(&[]), &id);
        assert_eq!(seen, Seen(0));
        assert_eq!(size, "GET".len() + "/a".len() + 12);
        let (size, _) = scan(&head(&["x-one", "x-two"]), &id);
        assert_eq!(size, 3 + 2 + 12 + 2 * ("x-one".len() + 1 + 4));
        // Each hop-by-hop name has the bit of its place in HOP_BY_HOP (strip's mask).
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let (_, seen) = scan(&head(&[name.as_str()]), &id);
            assert_eq!(seen, Seen(1 << i), "{name}");
            assert!(seen.has(Seen::HOP_BY_HOP));
        }
        assert!(scan(&head(&["upgrade"]), &id).1.has(Seen::UPGRADE));
        let cases: [(&str, Seen); 12] = [
            ("host", Seen::HOST),
            ("user-agent", Seen::USER_AGENT),
            ("content-type", Seen::CONTENT_TYPE),
            ("traceparent", Seen::TRACE),
            ("b3", Seen::TRACE),
            ("x-b3-traceid", Seen::TRACE),
            ("x-b3-sampled", Seen::TRACE),
            ("x-spur-hops", Seen(Seen::SPUR.0 | Seen::HOPS.0)),
            ("x-spur-flags", Seen(Seen::SPUR.0 | Seen::FLAGS.0)),
            ("x-spur-attempt", Seen::SPUR),
            ("x-correlation", Seen::REQUEST_ID),
            ("accept", Seen(0)),
        ];
        for (name, bits) in cases {
            assert_eq!(scan(&head(&[name]), &id).1, bits, "{name}");
        }
        // Several: the union; `with` adds a name about to be set.
        let (_, seen) = scan(&head(&["host", "te", "x-spur-peer-identity"]), &id);
        assert_eq!(seen, Seen(Seen::HOST.0 | 1 << 5 | Seen::SPUR.0));
        assert!(!seen.has(Seen::REQUEST_ID));
        assert!(seen.with(&id, &id).has(Seen::REQUEST_ID));
        assert!(Seen(0).with(&header::CONNECTION, &id).has(Seen::HOP_BY_HOP));
        assert!(Seen::ALL.has(Seen::TRACE));
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
