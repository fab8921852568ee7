//! Protocol detection on transparent listeners (`http` listeners with `original_dst` and
//! no `tls`): the outbound listener of a meshed pod receives every connection the app
//! makes, HTTP or not, and must not break what it cannot parse.
//!
//! The first bytes decide, read with `peek` so that nothing is consumed:
//! - an HTTP/1.x request line (`GET `, `POST `...) or the HTTP/2 prior-knowledge preface:
//!   the HTTP path (routes, retries, mTLS origination to the owning cluster);
//! - a TLS ClientHello: the client speaks TLS end to end; its SNI is read (never
//!   terminated) and the bytes pass through as opaque TCP, to the cluster owning the
//!   original destination or else to the Service the SNI names;
//! - anything else, or nothing within [`DETECT_TIMEOUT`] (server-speaks-first protocols:
//!   MySQL, SMTP, SSH wait for the server's greeting): opaque TCP.
//!
//! A cluster marked `opaque` (`spur.dev/opaque-ports`) skips detection: its connections
//! go as opaque TCP at once, without the wait.
//!
//! A connection whose original destination no cluster owns is *egress*. `egress: allow`
//! (the default) passes it through as opaque bytes to that destination; `egress: deny`
//! refuses it (closed, or 404 `no_route` for HTTP). Either is counted in
//! `spur_egress_total{decision}`. An HTTP connection goes the HTTP path instead when
//! the listener could route it anyway (a default cluster, or a route that does not name a
//! destination). A connection that was not redirected (its original destination is the
//! listener itself) is never passed through: the listener is not an open proxy.
//!
//! Detection costs one `peek` per connection (and a few more for a head that arrives in
//! pieces); the request path after it is unchanged.

use crate::adapters::listener::ConnGuard;
use crate::metrics::{DetectedLabels, EgressLabels};
use crate::snapshot::{ClusterRt, ListenerRt};
use crate::tls::Stream;
use crate::Shared;
use spur_config::Egress;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// How long a client has to send its first bytes before the connection counts as
/// server-speaks-first (opaque).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// The most that is peeked: enough for a ClientHello with its SNI.
const PEEK_MAX: usize = 4096;

/// What the first bytes showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// A TLS ClientHello, with its server name when it has one.
    Tls(Option<String>),
    Opaque,
}

impl Detected {
    fn label(&self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "http2",
            Detected::Tls(_) => "tls",
            Detected::Opaque => "opaque",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Classifies the first bytes of a connection; `None` while they could still become more
/// than one thing (more bytes are needed).
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return match client_hello_sni(buf) {
            Hello::NeedMore => None,
            Hello::NotTls => Some(Detected::Opaque),
            Hello::Sni(sni) => Some(Detected::Tls(sni)),
        };
    }
    let mut partial = false;
    for m in METHODS.iter().copied().chain([H2_PREFACE]) {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if n == m.len() {
                return Some(if m == H2_PREFACE {
                    Detected::Http2
                } else {
                    Detected::Http1
                });
            }
            partial = true;
        }
    }
    (!partial).then_some(Detected::Opaque)
}

enum Hello {
    NeedMore,
    NotTls,
    Sni(Option<String>),
}

/// Reads the server name from a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), from the
/// first record only (a ClientHello split across records has no SNI for us: opaque TLS
/// all the same).
fn client_hello_sni(buf: &[u8]) -> Hello {
    let Some(&[_, major, _, hi, lo]) = buf.get(..5).map(|b| <&[u8; 5]>::try_from(b).unwrap())
    else {
        return if buf.len() >= 2 && buf[1] != 3 {
            Hello::NotTls
        } else {
            Hello::NeedMore
        };
    };
    if major != 3 {
        return Hello::NotTls;
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let end = 5 + len;
    if buf.len() < end {
        // A record larger than what is peeked: TLS without a readable SNI.
        return if end > PEEK_MAX {
            Hello::Sni(None)
        } else {
            Hello::NeedMore
        };
    }
    Hello::Sni(parse_hello(&buf[5..end]))
}

/// A cursor over a handshake message; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

fn parse_hello(msg: &[u8]) -> Option<String> {
    let mut c = Cursor(msg);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    c.take(3)?; // length
    c.take(2 + 32)?; // version, random
    let n = c.u8()?;
    c.take(n)?; // session id
    let n = c.u16()?;
    c.take(n)?; // cipher suites
    let n = c.u8()?;
    c.take(n)?; // compression methods
    let n = c.u16()?;
    let mut ext = Cursor(c.take(n)?);
    while let (Some(kind), Some(n)) = (ext.u16(), ext.u16()) {
        let body = ext.take(n)?;
        if kind != 0 {
            continue;
        }
        let mut names = Cursor(body);
        let n = names.u16()?;
        let mut list = Cursor(names.take(n)?);
        while let Some(name_type) = list.u8() {
            let n = list.u16()?;
            let name = list.take(n)?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
    }
    None
}

/// Peeks at the connection until [`classify`] decides, or [`DETECT_TIMEOUT`] passes
/// (then: opaque).
pub async fn detect(stream: &TcpStream) -> Detected {
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut buf = vec![0u8; PEEK_MAX];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Detected::Opaque,
        };
        if n == 0 {
            return Detected::Opaque; // the client closed without a word
        }
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if n == PEEK_MAX {
            return Detected::Opaque;
        }
        // A head that arrives in pieces: peek returns at once while bytes wait, so pause
        // before looking again, until the deadline.
        if tokio::time::Instant::now() >= deadline {
            return Detected::Opaque;
        }
        if n == seen {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = n;
    }
}

/// The cluster a TLS server name stands for: `NAME.NS[.svc[.DOMAIN]]` on port P is the
/// rendered cluster `NAME.NS.P` (see `spur control --mesh`).
fn cluster_for_sni(
    snap: &crate::snapshot::Snapshot,
    sni: &str,
    port: u16,
) -> Option<Arc<ClusterRt>> {
    let mut labels = sni.split('.');
    let (name, ns) = (labels.next()?, labels.next()?);
    match labels.next() {
        None | Some("svc") => {}
        Some(_) => return None,
    }
    snap.clusters.get(&format!("{name}.{ns}.{port}")).cloned()
}

/// A connection of a transparent `http` listener: detection, then the HTTP path, opaque
/// TCP to a cluster, or egress.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    stream: TcpStream,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
    guard: ConnGuard,
) {
    // Not redirected: the original destination is the listener itself.
    let redirected = original_dst.filter(|o| {
        stream
            .local_addr()
            .is_ok_and(|l| crate::snapshot::canonical(l) != crate::snapshot::canonical(*o))
    });
    let owner = redirected.and_then(|a| shared.snapshot.load().cluster_for_addr(a));
    let detected = match &owner {
        Some(c) if c.skip_detection => None,
        _ => Some(detect(&stream).await),
    };
    shared
        .metrics
        .protocol_detected
        .get_or_create(&DetectedLabels {
            listener: lst.name.clone(),
            protocol: detected.as_ref().map_or("skipped", Detected::label),
        })
        .inc();
    let snap = shared.snapshot.load();
    let next = decide(&snap, &lst, redirected, owner, detected.as_ref());
    drop(snap);
    match next {
        Next::Http => {
            crate::adapters::listener::serve_http_conn(
                shared,
                lst,
                stream,
                peer,
                original_dst,
                shutdown,
                guard,
            )
            .await
        }
        Next::Opaque(cluster) => {
            crate::adapters::tcp::serve_to(shared, lst, stream, peer, cluster, shutdown, guard)
                .await
        }
        Next::Close => {}
        Next::Egress(egress, dst) => {
            let decision = match egress {
                Egress::Allow => "allow",
                Egress::Deny => "deny",
            };
            shared
                .metrics
                .egress
                .get_or_create(&EgressLabels { decision })
                .inc();
            let http = matches!(detected, Some(Detected::Http1 | Detected::Http2));
            match egress {
                // The HTTP path answers 404 `no_route`: nothing routes it.
                Egress::Deny if http => {
                    crate::adapters::listener::serve_http_conn(
                        shared,
                        lst,
                        stream,
                        peer,
                        original_dst,
                        shutdown,
                        guard,
                    )
                    .await
                }
                Egress::Deny => {
                    tracing::debug!(listener = &*lst.name, %dst, "egress denied: connection closed");
                }
                Egress::Allow => passthrough(&shared, &lst, stream, dst, shutdown).await,
            }
        }
    }
}

/// What a transparent listener does with a connection, once detection has spoken.
#[derive(Clone)]
pub enum Next {
    /// The HTTP path (routes, or the cluster owning the destination).
    Http,
    /// Opaque bytes to this cluster.
    Opaque(Arc<ClusterRt>),
    /// No cluster owns the destination: `egress` decides.
    Egress(Egress, SocketAddr),
    /// Not redirected and nothing to send it to.
    Close,
}

/// The decision after detection (pure; `spur explain` asks it too). `redirected`: the
/// original destination when the connection was redirected; `owner`: the cluster owning
/// it; `detected`: `None` when the owner skips detection.
pub fn decide(
    snap: &crate::snapshot::Snapshot,
    lst: &ListenerRt,
    redirected: Option<SocketAddr>,
    owner: Option<Arc<ClusterRt>>,
    detected: Option<&Detected>,
) -> Next {
    let http = matches!(detected, Some(Detected::Http1 | Detected::Http2));
    let target = match (detected, owner) {
        (_, Some(c)) => Some(c),
        (Some(Detected::Tls(Some(sni))), None) => {
            redirected.and_then(|a| cluster_for_sni(snap, sni, a.port()))
        }
        _ => None,
    };
    let routable = target.is_some()
        || lst.default_cluster.is_some()
        || (http && lst.routes.iter().any(|r| !r.matcher.names_destination()));
    if http && (routable || redirected.is_none()) {
        return Next::Http;
    }
    if let Some(cluster) = target.or_else(|| lst.default_cluster.clone()) {
        return Next::Opaque(cluster);
    }
    match redirected {
        Some(dst) => Next::Egress(snap.config.egress.unwrap_or_default(), dst),
        None => Next::Close,
    }
}

/// `egress: allow`: the bytes go to the original destination as they are.
async fn passthrough(
    shared: &Shared,
    lst: &ListenerRt,
    client: TcpStream,
    dst: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let timeout = Duration::from_secs(10);
    let upstream = match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(listener = &*lst.name, %dst, error = %e, "egress connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = &*lst.name, %dst, "egress connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let idle = lst.limits.idle_timeout.get();
    let drained = crate::adapters::idle::drained(shutdown, shared.snapshot.load().drain_timeout);
    let (client, upstream) = (Stream::Plain(client), Stream::Plain(upstream));
    let _ = crate::adapters::relay::relay(client, upstream, idle, drained).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with `sni` (or none).
    fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
            let mut body = (list.len() as u16).to_be_bytes().to_vec();
            body.extend(list);
            ext.extend(0u16.to_be_bytes());
            ext.extend((body.len() as u16).to_be_bytes());
            ext.extend(body);
        }
        // An unrelated extension after it (supported_versions).
        ext.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut msg = vec![0x03, 0x03];
        msg.extend([7u8; 32]);
        msg.push(0); // session id
        msg.extend([0x00, 0x02, 0x13, 0x01]); // one cipher suite
        msg.extend([0x01, 0x00]); // null compression
        msg.extend((ext.len() as u16).to_be_bytes());
        msg.extend(ext);
        let mut hs = vec![0x01];
        hs.extend(&(msg.len() as u32).to_be_bytes()[1..]);
        hs.extend(msg);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn http_heads_and_the_h2_preface() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        // Pieces that could still be a method or the preface: wait.
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        // Lowercase, or a method name without its space: not HTTP.
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Opaque));
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
        // A Redis inline command, a MySQL client packet, SSH.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Opaque));
    }

    #[test]
    fn tls_client_hello_with_and_without_sni() {
        let h = hello(Some("Web.Shop.svc.cluster.local"));
        assert_eq!(
            classify(&h),
            Some(Detected::Tls(Some("web.shop.svc.cluster.local".into())))
        );
        assert_eq!(classify(&hello(None)), Some(Detected::Tls(None)));
        // Cut anywhere: more bytes needed, never a wrong answer.
        for cut in 1..h.len() {
            assert_eq!(classify(&h[..cut]), None, "cut at {cut}");
        }
        // 0x16 not followed by a TLS version: opaque.
        assert_eq!(classify(&[0x16, 0x09, 0x00]), Some(Detected::Opaque));
        // A garbled handshake inside a well-formed record: TLS, no name.
        let mut bad = h.clone();
        bad[5] = 0x02;
        assert_eq!(classify(&bad), Some(Detected::Tls(None)));
    }
}
