//! Idle HTTP/1.1 connections are parked (hyper's buffers dropped, the socket kept) and come
//! back for the next request as if nothing happened: plain and TLS, a head split around the
//! park, bytes sent before the park is noticed, and the timeouts still apply. HTTP/2
//! connections do not park (they hold no buffer between turns): idle, they cost no CPU and
//! serve on.

mod common;

use common::pki::*;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than the proxy's park delay (250 ms) with room for a busy machine.
const IDLE: Duration = Duration::from_millis(700);

/// The tests of this file one at a time: they read process-wide figures (the count of
/// parked connections, the process's CPU time) that another test's proxy would move.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A raw HTTP/1.1 client: what it read past one response is kept for the next.
struct Raw<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    fn new(s: S) -> Raw<S> {
        Raw { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads one response with a content-length; answers (status, body).
    async fn response(&mut self) -> (u16, String) {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if self.buf.len() >= end + 4 + len {
                    let status = head[9..12].parse().unwrap();
                    let body =
                        String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                    self.buf.drain(..end + 4 + len);
                    return (status, body);
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut chunk))
                .await
                .expect("an answer within 5 s")
                .expect("read");
            assert!(
                n > 0,
                "closed before a complete answer: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn get(&mut self, path: &str) -> (u16, String) {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
            .await;
        self.response().await
    }
}

/// CPU time this process (test, proxy and backend alike) has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th, in clock ticks (100 a second on Linux).
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let ticks: u64 = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|t| t.parse::<u64>().unwrap())
        .sum();
    Duration::from_millis(ticks * 10)
}

async fn parks<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
    let mut c = Raw::new(s);
    let before = spur_proxy::footprint::parked_total();
    assert_eq!(c.get("/one").await, (200, "app".into()));
    let cpu = cpu_time();
    tokio::time::sleep(IDLE).await;
    assert!(
        spur_proxy::footprint::parked_total() > before,
        "the idle connection was parked"
    );
    // Parked, a connection waits for its next bytes: it costs no CPU meanwhile.
    let spent = cpu_time() - cpu;
    assert!(spent < IDLE / 4, "{spent:?} of CPU while idle for {IDLE:?}");
    // The same connection serves on, a request at a time...
    assert_eq!(c.get("/two").await, (200, "app".into()));
    tokio::time::sleep(IDLE).await;
    // ...and with a head that arrives in two parts, the second after a pause.
    c.send(b"GET /three HTTP/1.1\r\nHo").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(b"st: app\r\n\r\n").await;
    assert_eq!(c.response().await, (200, "app".into()));
    tokio::time::sleep(IDLE).await;
    // Two requests at once (pipelined) after a park: both answered, in order.
    c.send(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\nGET /b HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    assert_eq!(c.response().await.0, 200);
    assert_eq!(c.response().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connection_parks_and_serves_on() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (mut s, _proxy, _app) = plain_proxy().await;
    parks(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_parks_and_serves_on() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (s, _proxy, _app) = tls_proxy(b"http/1.1").await;
    parks(s).await;
}

/// A proxy with a plaintext listener in front of an `app` backend, and a connection to it
/// (keep the proxy and the backend for as long as the connection).
async fn plain_proxy() -> (TcpStream, spur_proxy::Proxy, Backend) {
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\nclusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        app.addr
    ))
    .await;
    let tcp = TcpStream::connect(proxy.listener_addr("web").unwrap())
        .await
        .unwrap();
    (tcp, proxy, app)
}

/// A proxy with a TLS listener in front of an `app` backend, and a TLS client connected to
/// it offering one ALPN protocol (keep the proxy and the backend for as long as the client).
async fn tls_proxy(
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    spur_proxy::Proxy,
    Backend,
) {
    let pki = Pki::new("parking");
    let leaf = pki.issue("localhost", None, 7);
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "listeners:\n  - name: web\n    listen: \"127.0.0.1:0\"\n    cluster: app\n    tls: {{ cert: \"{}\", key: \"{}\" }}\nclusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        leaf.cert, leaf.key, app.addr
    ))
    .await;
    let s = tls_client(&pki, alpn, proxy.listener_addr("web").unwrap()).await;
    (s, proxy, app)
}

/// A TLS client to `addr` trusting `pki`'s CA, offering one ALPN protocol.
async fn tls_client(
    pki: &Pki,
    alpn: &[u8],
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca_path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// One GET on an HTTP/2 connection: (status, body).
async fn h2_get(client: &mut h2::client::SendRequest<bytes::Bytes>, path: &str) -> (u16, String) {
    let req = http::Request::get(format!("http://app{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let status = resp.status().as_u16();
    let (got, _) = h2_read_body(resp.into_body()).await;
    (status, String::from_utf8_lossy(&got).into_owned())
}

/// An HTTP/2 connection over `s` idles twice and serves on, and costs no CPU while idle.
async fn h2_idles<S>(s: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut client, conn) = h2::client::handshake(s).await.unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(h2_get(&mut client, "/one").await, (200, "app".into()));
    for path in ["/two", "/three"] {
        let cpu = cpu_time();
        tokio::time::sleep(IDLE).await;
        let spent = cpu_time() - cpu;
        assert!(spent < IDLE / 4, "{spent:?} of CPU while idle for {IDLE:?}");
        assert_eq!(h2_get(&mut client, path).await, (200, "app".into()));
    }
    // Streams at once after idling.
    tokio::time::sleep(IDLE).await;
    let (mut a, mut b) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(h2_get(&mut a, "/a"), h2_get(&mut b, "/b"));
    assert_eq!((a.0, b.0), (200, 200));
    assert!(!conn.is_finished(), "the connection is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_idles_and_serves_on() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (tcp, _proxy, _app) = plain_proxy().await;
    h2_idles(tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_tls_connection_idles_and_serves_on() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (s, _proxy, _app) = tls_proxy(b"h2").await;
    h2_idles(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_keeps_its_timeouts() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  - name: web\n    listen: \"127.0.0.1:0\"\n    cluster: app\n    limits: {{ header_timeout: 400ms, idle_timeout: 1500ms }}\nclusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    // Parked, then half a head and silence: closed at header_timeout, counted as such.
    let mut c = Raw::new(TcpStream::connect(web).await.unwrap());
    assert_eq!(c.get("/").await.0, 200);
    tokio::time::sleep(IDLE).await;
    // Timed from before the send: the proxy's timer starts when the bytes arrive, which
    // may be before the client's send returns (and is noticed) on a busy machine.
    let sending = Instant::now();
    c.send(b"GET / HTTP/1.1\r\nHo").await;
    let mut s = c.s;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    let took = sending.elapsed();
    assert!(
        (Duration::from_millis(400)..Duration::from_millis(1200)).contains(&took),
        "{took:?}"
    );
    let timeouts = metric(
        admin,
        "spur_downstream_rejected_total",
        &[("listener", "web"), ("reason", "header_timeout")],
    )
    .await;
    assert_eq!(timeouts, Some(1.0));
    // Parked and silent: closed at idle_timeout. The proxy's idle timer starts once its
    // answer is out, between the request's send and the client reading the answer: the
    // lower bound is timed from the first, the upper bound from the second.
    let mut c = Raw::new(TcpStream::connect(web).await.unwrap());
    let requested = Instant::now();
    assert_eq!(c.get("/").await.0, 200);
    let answered = Instant::now();
    let mut s = c.s;
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    let (since_request, idle) = (requested.elapsed(), answered.elapsed());
    assert!(
        since_request >= Duration::from_millis(1500) && idle < Duration::from_millis(2500),
        "closed {idle:?} after the answer ({since_request:?} after the request)"
    );
}
