//! End-to-end: mutual TLS between two Spur proxies (A outbound → mTLS → B inbound → plain
//! app), with rcgen certificates written to a temp dir and real rustls clients.

mod common;

use bytes::Bytes;
use common::pki::*;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn id(sa: &str) -> String {
    format!("spiffe://test.local/ns/shop/sa/{sa}")
}

// ----------------------------------------------------------- TLS client --

fn client_config(ca: &str, auth: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match auth {
        Some(leaf) => {
            let chain = CertificateDer::pem_file_iter(&leaf.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One TLS connection to a Spur listener, speaking HTTP/2 or HTTP/1.1 as ALPN chose.
struct TlsConn {
    sender: Sender,
    /// The serial number of the certificate the server presented (DER INTEGER bytes).
    serial: Vec<u8>,
    alpn: Option<Vec<u8>>,
    kind: rustls::HandshakeKind,
}

impl TlsConn {
    async fn open(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<TlsConn, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = stream.get_ref().1;
        let serial = spur_proxy::tls::der::serial(&conn.peer_certificates().unwrap()[0])
            .unwrap()
            .to_vec();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let kind = conn.handshake_kind().unwrap();
        let io = TokioIo::new(stream);
        let sender = if alpn.as_deref() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(TlsConn {
            sender,
            serial,
            alpn,
            kind,
        })
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        let mut req = Request::get(format!("https://localhost{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                let req = req
                    .uri(path)
                    .header("host", "localhost")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                let req = req
                    .version(http::Version::HTTP_2)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
        }
        .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// One request on a new TLS connection.
async fn tls_get(addr: SocketAddr, cfg: Arc<ClientConfig>, path: &str) -> Result<Answer, String> {
    TlsConn::open(addr, cfg).await?.get(path, &[]).await
}

fn serial_u64(der_integer: &[u8]) -> u64 {
    der_integer
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

// ------------------------------------------------------- the two proxies --

/// A TCP server that echoes what it reads and closes its side when the client does.
async fn tcp_echo() -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Proxy B: the inbound side. An mTLS `http` listener and an mTLS `tcp` listener.
fn inbound_yaml(
    pki: &Pki,
    server: &Leaf,
    allow: &[String],
    app: SocketAddr,
    echo: SocketAddr,
) -> String {
    let allow = serde_json::to_string(allow).unwrap();
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: inbound
    listen: 127.0.0.1:0
    tls: {{ cert: "{cert}", key: "{key}", client_ca: "{ca}", allow_identities: {allow} }}
    cluster: app
  - name: inbound-tcp
    listen: 127.0.0.1:0
    protocol: tcp
    tls: {{ cert: "{cert}", key: "{key}", client_ca: "{ca}", allow_identities: {allow} }}
    cluster: echo
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: echo, endpoints: ["{echo}"] }}
"#,
        cert = server.cert,
        key = server.key,
        ca = pki.ca_path,
    )
}

/// Proxy A: the outbound side. Plain listeners for the local app; clusters that speak mTLS
/// to B, HTTP/1.1 by default and HTTP/2 under /h2.
fn outbound_yaml(
    pki: &Pki,
    client: &Leaf,
    expect: &[String],
    b_http: SocketAddr,
    b_tcp: SocketAddr,
) -> String {
    let tls = format!(
        r#"{{ ca: "{ca}", cert: "{cert}", key: "{key}", expect_identities: {expect} }}"#,
        ca = pki.ca_path,
        cert = client.cert,
        key = client.key,
        expect = serde_json::to_string(expect).unwrap(),
    );
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: outbound
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: /h2 }}, cluster: b-h2 }}
    cluster: b-h1
  - name: outbound-tcp
    listen: 127.0.0.1:0
    protocol: tcp
    cluster: b-tcp
clusters:
  - {{ name: b-h1, endpoints: ["{b_http}"], protocol: http1, tls: {tls} }}
  - {{ name: b-h2, endpoints: ["{b_http}"], protocol: http2, tls: {tls} }}
  - {{ name: b-tcp, endpoints: ["{b_tcp}"], tls: {tls} }}
"#
    )
}

fn empty_get(uri: String) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

// ---------------------------------------------------------------- tests --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_hop_carries_http1_http2_and_tcp_with_the_peer_identity() {
    let pki = Pki::new("hop");
    let web = pki.issue("web", Some(&id("web")), 11);
    let checkout = pki.issue("checkout", Some(&id("checkout")), 21);
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    // B runs as a child process so that its JSON access log can be read.
    let b = spawn_spur(
        &inbound_yaml(&pki, &checkout, &[id("web")], app.addr, echo),
        2,
    );
    let (b_http, b_tcp) = (b.listeners["inbound"], b.listeners["inbound-tcp"]);
    let a = start_proxy(&outbound_yaml(&pki, &web, &[id("checkout")], b_http, b_tcp)).await;
    let out = a.listener_addr("outbound").unwrap();

    // HTTP/1.1 on both hops; a forged identity header from the client is replaced.
    let r = get(
        out,
        "/h1",
        &[("x-spur-peer-identity", "spiffe://evil.example/ns/x/sa/y")],
    )
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "app"));
    assert_eq!(
        r.header("x-echo-x-spur-peer-identity"),
        Some(id("web").as_str())
    );
    // B's peer is a verified mesh identity: the scheme the client used at A is kept
    // (issue 17: a TLS edge's `https` survives the mesh; here the client spoke plain HTTP).
    assert_eq!(r.header("x-echo-x-forwarded-proto"), Some("http"));

    // HTTP/2: h2c into A, h2 chosen by ALPN between A and B.
    let r = send(&h2_client(), empty_get(format!("http://{out}/h2/x"))).await;
    assert_eq!((r.status, r.text().as_str()), (200, "app"));
    assert_eq!(
        r.header("x-echo-x-spur-peer-identity"),
        Some(id("web").as_str())
    );

    // TCP: bytes both ways through two TLS-terminating hops, and the half-close.
    let mut s = TcpStream::connect(a.listener_addr("outbound-tcp").unwrap())
        .await
        .unwrap();
    s.write_all(b"ping over mtls").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .expect("echo within 10s")
        .unwrap();
    assert_eq!(back, b"ping over mtls");

    // Real TLS clients straight to B: ALPN picks h2 or http/1.1, both served.
    // The second connection of each config resumes the session, and the identity survives.
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let cfg = client_config(&pki.ca_path, Some(&web), &[alpn]);
        for kind in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let mut c = TlsConn::open(b_http, cfg.clone()).await.unwrap();
            assert_eq!(c.alpn.as_deref(), Some(alpn));
            assert_eq!(c.kind, kind);
            assert_eq!(serial_u64(&c.serial), 21, "B presents its own certificate");
            let r = c.get("/direct", &[]).await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(
                r.header("x-echo-x-spur-peer-identity"),
                Some(id("web").as_str())
            );
        }
    }

    // B's access log names the peer for HTTP requests and for the TCP connection.
    let lines = b.stderr_lines.clone();
    let logged = |message: &'static str, path: Option<&'static str>| {
        let lines = lines.clone();
        move || {
            let lines = lines.clone();
            async move {
                lines.lock().unwrap().iter().any(|l| {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                        return false;
                    };
                    v["message"] == message
                        && v["peer_identity"] == id("web").as_str()
                        && path.is_none_or(|p| v["path"] == p)
                })
            }
        }
    };
    assert!(
        eventually(Duration::from_secs(5), logged("access", Some("/h1"))).await,
        "no access line with peer_identity: {:?}",
        b.stderr_lines.lock().unwrap()
    );
    assert!(
        eventually(Duration::from_secs(5), logged("tcp", None)).await,
        "no tcp line with peer_identity"
    );

    // /config shows the key's path, never its content; no log line has key material either.
    let key_pem = std::fs::read_to_string(&checkout.key).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    let config = get(b.admin.unwrap(), "/config", &[]).await.text();
    assert!(config.contains(&checkout.key), "{config}");
    assert!(!config.contains("PRIVATE KEY") && !config.contains(key_line));
    assert!(!b
        .stderr_lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("PRIVATE KEY") || l.contains(key_line)));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_are_refused_in_the_handshake() {
    let pki = Pki::new("refuse");
    let server = pki.issue("server", Some(&id("checkout")), 1);
    let web = pki.issue("web", Some(&id("web")), 2);
    let expired = pki.issue_with("expired", Some(&id("web")), 3, |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let early = pki.issue_with("early", Some(&id("web")), 4, |p| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    });
    let other_ca = Pki::new("other");
    let stranger = other_ca.issue("stranger", Some(&id("web")), 5);

    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let b = start_proxy(&inbound_yaml(&pki, &server, &[id("web")], app.addr, echo)).await;
    let inbound = b.listener_addr("inbound").unwrap();
    let admin = b.admin_addr().unwrap();
    let h1: &[&[u8]] = &[b"http/1.1"];

    // The valid client passes, so the refusals below are about the certificates.
    let ok = tls_get(inbound, client_config(&pki.ca_path, Some(&web), h1), "/").await;
    assert_eq!(ok.unwrap().status, 200);

    let cases: [(Option<&Leaf>, &str); 4] = [
        (None, "no_client_cert"),
        (Some(&stranger), "unknown_ca"),
        (Some(&expired), "expired"),
        (Some(&early), "not_yet_valid"),
    ];
    for (cert, reason) in cases {
        let answer = tls_get(inbound, client_config(&pki.ca_path, cert, h1), "/").await;
        assert!(answer.is_err(), "{reason}: got a response");
        let labels = [("listener", "inbound"), ("reason", reason)];
        assert!(
            eventually(Duration::from_secs(5), || async {
                metric(admin, "spur_tls_handshake_errors_total", &labels).await == Some(1.0)
            })
            .await,
            "{reason} not counted"
        );
    }
    // A plaintext request to a TLS port is a protocol error, counted, not a crash.
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                admin,
                "spur_tls_handshake_errors_total",
                &[("listener", "inbound"), ("reason", "protocol")],
            )
            .await
                == Some(1.0)
        })
        .await
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_outside_the_allow_list_get_403_on_http_and_an_alert_on_tcp() {
    let pki = Pki::new("authz");
    let server = pki.issue("server", Some(&id("checkout")), 1);
    let intruder = pki.issue("intruder", Some(&id("intruder")), 2);
    let anonymous = pki.issue("anonymous", None, 3);
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let b = start_proxy(&inbound_yaml(&pki, &server, &[id("web")], app.addr, echo)).await;
    let admin = b.admin_addr().unwrap();

    // http: the handshake completes, each request gets 403 forbidden with its request ID.
    for (leaf, alpn) in [(&intruder, &b"http/1.1"[..]), (&anonymous, &b"h2"[..])] {
        let cfg = client_config(&pki.ca_path, Some(leaf), &[alpn]);
        let mut c = TlsConn::open(b.listener_addr("inbound").unwrap(), cfg)
            .await
            .unwrap();
        let r = c.get("/", &[("x-request-id", "authz-1")]).await.unwrap();
        assert_eq!(r.status, 403);
        assert_eq!(r.header("x-spur-error"), Some("forbidden"));
        assert_eq!(r.header("x-request-id"), Some("authz-1"));
        assert_eq!(r.header("x-backend"), None, "never reached the app");
    }
    let labels = [("listener", "inbound"), ("reason", "forbidden")];
    assert_eq!(
        metric(admin, "spur_downstream_rejected_total", &labels).await,
        Some(2.0)
    );

    // tcp: refused in the handshake (no bytes reach the app).
    let cfg = client_config(&pki.ca_path, Some(&intruder), &[]);
    let tcp = TcpStream::connect(b.listener_addr("inbound-tcp").unwrap())
        .await
        .unwrap();
    let outcome = async {
        let mut s = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        s.write_all(b"let me in").await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcome)
        .await
        .unwrap();
    assert!(outcome.is_err(), "tcp listener let an intruder through");
    let labels = [
        ("listener", "inbound-tcp"),
        ("reason", "identity_not_allowed"),
    ];
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(admin, "spur_tls_handshake_errors_total", &labels).await == Some(1.0)
        })
        .await
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_unexpected_identity_or_name_is_refused_by_the_client() {
    let pki = Pki::new("expect");
    let web = pki.issue("web", Some(&id("web")), 1);
    let checkout = pki.issue("checkout", Some(&id("checkout")), 2);
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let b = start_proxy(&inbound_yaml(&pki, &checkout, &[id("web")], app.addr, echo)).await;
    let (b_http, b_tcp) = (
        b.listener_addr("inbound").unwrap(),
        b.listener_addr("inbound-tcp").unwrap(),
    );
    // A expects `payments` behind B; B is `checkout`.
    let a = start_proxy(&outbound_yaml(&pki, &web, &[id("payments")], b_http, b_tcp)).await;
    let a_admin = a.admin_addr().unwrap();
    let r = get(a.listener_addr("outbound").unwrap(), "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-spur-error"), Some("upstream_unreachable"));
    let labels = [("cluster", "b-h1"), ("reason", "identity_not_expected")];
    assert!(
        metric(a_admin, "spur_upstream_tls_handshake_errors_total", &labels).await >= Some(1.0)
    );
    // The TCP relay refuses the same way: the client's connection closes with no bytes.
    let mut s = TcpStream::connect(a.listener_addr("outbound-tcp").unwrap())
        .await
        .unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(buf.is_empty());
    let labels = [("cluster", "b-tcp"), ("reason", "identity_not_expected")];
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(a_admin, "spur_upstream_tls_handshake_errors_total", &labels).await >= Some(1.0)
        })
        .await
    );
    a.shutdown().await;

    // Without expect_identities the DNS name is checked: `localhost` passes, another fails.
    for (server_name, status) in [("localhost", 200), ("other.example", 502)] {
        let yaml = format!(
            r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: out, listen: "127.0.0.1:0", cluster: b }}
clusters:
  - name: b
    endpoints: ["{b_http}"]
    tls: {{ ca: "{ca}", cert: "{cert}", key: "{key}", server_name: {server_name} }}
"#,
            ca = pki.ca_path,
            cert = web.cert,
            key = web.key,
        );
        let a = start_proxy(&yaml).await;
        let r = get(a.listener_addr("out").unwrap(), "/", &[]).await;
        assert_eq!(r.status, status, "server_name {server_name}");
        if status == 502 {
            let labels = [("cluster", "b"), ("reason", "name_mismatch")];
            let n = metric(
                a.admin_addr().unwrap(),
                "spur_upstream_tls_handshake_errors_total",
                &labels,
            )
            .await;
            assert!(n >= Some(1.0), "{n:?}");
        }
        a.shutdown().await;
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_certificate_files_reject_the_config_by_field() {
    let yaml = r#"
listeners:
  - name: in
    listen: 127.0.0.1:0
    cluster: c
    tls: { cert: /nonexistent/spur/tls.crt, key: /nonexistent/spur/tls.key }
clusters:
  - { name: c, endpoints: ["127.0.0.1:9"] }
"#;
    let cfg = spur_config::load(yaml, Some("t.yaml")).unwrap();
    let err = spur_proxy::Proxy::start(cfg).await.err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("listeners[0].tls.cert: cannot read /nonexistent/spur/tls.crt: No such file"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let pki = Pki::new("rotate");
    let web = pki.issue("web", Some(&id("web")), 200);
    let checkout = pki.issue("checkout", Some(&id("checkout")), 100);
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let b = start_proxy(&inbound_yaml(&pki, &checkout, &[id("web")], app.addr, echo)).await;
    let b_http = b.listener_addr("inbound").unwrap();
    let a = start_proxy(&outbound_yaml(
        &pki,
        &web,
        &[id("checkout")],
        b_http,
        b.listener_addr("inbound-tcp").unwrap(),
    ))
    .await;
    let out = a.listener_addr("outbound").unwrap();
    let direct = client_config(&pki.ca_path, Some(&web), &[b"http/1.1"]);

    // A connection opened before the rotation, used again after it.
    let mut established = TlsConn::open(b_http, direct.clone()).await.unwrap();
    assert_eq!(serial_u64(&established.serial), 100);
    assert_eq!(established.get("/before", &[]).await.unwrap().status, 200);

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let serials = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let load_for = Duration::from_millis(2500);
    let start = Instant::now();
    let mut tasks = Vec::new();
    // Through A (pooled mTLS connections to B), 4 concurrent callers.
    for _ in 0..4 {
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            while start.elapsed() < load_for {
                let resp = client
                    .request(empty_get(format!("http://{out}/load")))
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    // Straight to B, a new TLS connection (a full handshake) for every request.
    for _ in 0..2 {
        let (ok, failed, serials, cfg) =
            (ok.clone(), failed.clone(), serials.clone(), direct.clone());
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < load_for {
                let outcome = async {
                    let mut c = TlsConn::open(b_http, cfg.clone()).await?;
                    let r = c.get("/fresh", &[]).await?;
                    Ok::<_, String>((serial_u64(&c.serial), r.status))
                }
                .await;
                match outcome {
                    Ok((serial, 200)) => {
                        serials.lock().unwrap().insert(serial);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((_, status)) => failed.lock().unwrap().push(format!("status {status}")),
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }

    // Mid-load, new pairs for both sides, each file replaced by rename: the certificate
    // first, then (after a pause, as a slow writer would) the key.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let staging = Pki {
        dir: pki.dir.join("staging"),
        params: pki.params.clone(),
        key: rcgen::KeyPair::from_pem(&pki.key.serialize_pem()).unwrap(),
        ca_path: pki.ca_path.clone(),
    };
    std::fs::create_dir_all(&staging.dir).unwrap();
    let checkout2 = staging.issue("checkout", Some(&id("checkout")), 101);
    let web2 = staging.issue("web", Some(&id("web")), 201);
    for (new, old) in [(&checkout2, &checkout), (&web2, &web)] {
        std::fs::rename(&new.cert, &old.cert).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (new, old) in [(&checkout2, &checkout), (&web2, &web)] {
        std::fs::rename(&new.key, &old.key).unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }

    let failed = failed.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 200, "only {ok} requests in {load_for:?}");

    // New connections present the new certificate (within the reload interval).
    assert!(
        eventually(Duration::from_secs(5), || {
            let cfg = direct.clone();
            async move {
                match TlsConn::open(b_http, cfg).await {
                    Ok(c) => serial_u64(&c.serial) == 101,
                    Err(_) => false,
                }
            }
        })
        .await,
        "B still presents the old certificate"
    );
    let seen = serials.lock().unwrap().clone();
    assert!(seen.contains(&100), "serials seen under load: {seen:?}");
    // The connection from before the rotation (serial 100, checked when it was opened)
    // still works: TlsConn never reconnects, so an answer means B kept it open.
    let r = established
        .get("/after", &[])
        .await
        .expect("the connection from before the rotation was closed");
    assert_eq!(r.status, 200);
    // And the mesh hop still works once both sides have rotated.
    let r = send(&h1_client(), empty_get(format!("http://{out}/after"))).await;
    assert_eq!(r.status, 200);
    a.shutdown().await;
    b.shutdown().await;
}

/// `x-spur-flags` from a verified mTLS peer is kept (the peer's proxy decided the flags)
/// even with `trust_incoming_flags: false`; from a TLS client without a certificate it is
/// dropped, as from any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_from_a_verified_mtls_peer_are_kept() {
    let pki = Pki::new("mtls-flags");
    let b = pki.issue("b", Some(&id("b")), 300);
    let a = pki.issue("a", Some(&id("a")), 301);
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let routes = "routes: [{ name: beta, match: { flag: new-checkout }, cluster: v2 }, { name: stable, match: { path_prefix: / }, cluster: v1 }]";
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: mesh
    listen: 127.0.0.1:0
    tls: {{ cert: {cert}, key: {key}, client_ca: {ca} }}
    trust_incoming_flags: false
    {routes}
  - name: edge
    listen: 127.0.0.1:0
    tls: {{ cert: {cert}, key: {key} }}
    trust_incoming_flags: false
    {routes}
clusters:
  - {{ name: v1, endpoints: ["{v1}"] }}
  - {{ name: v2, endpoints: ["{v2}"] }}
flags:
  new-checkout:
    enabled: true
    rules: [{{ percent: 0, hash_on: "header:x-user-id" }}]
"#,
        cert = b.cert,
        key = b.key,
        ca = pki.ca_path,
        v1 = v1.addr,
        v2 = v2.addr,
    ))
    .await;
    let flag = [("x-spur-flags", "new-checkout")];

    let mut peer = TlsConn::open(
        proxy.listener_addr("mesh").unwrap(),
        client_config(&pki.ca_path, Some(&a), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let r = peer.get("/", &flag).await.unwrap();
    assert_eq!(
        (r.header("x-backend"), r.header("x-echo-x-spur-flags")),
        (Some("v2"), Some("new-checkout")),
        "the peer's flag decides the route and goes upstream"
    );
    assert_eq!(
        r.header("x-echo-x-spur-peer-identity"),
        Some(id("a").as_str())
    );
    // Without the header, the flag is off for the peer too (0%).
    let r = peer.get("/", &[]).await.unwrap();
    assert_eq!(r.header("x-backend"), Some("v1"));

    let mut anonymous = TlsConn::open(
        proxy.listener_addr("edge").unwrap(),
        client_config(&pki.ca_path, None, &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let r = anonymous.get("/", &flag).await.unwrap();
    assert_eq!(
        (r.header("x-backend"), r.header("x-echo-x-spur-flags")),
        (Some("v1"), Some("")),
        "a client without a verified identity cannot turn a flag on"
    );
    proxy.shutdown().await;
}
