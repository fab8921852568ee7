//! End-to-end: what bounds an `http3` listener and its streams — `header_timeout` for
//! connections that never send a request, `max_connections`, `max_header_bytes`, the drain
//! (GOAWAY, then `H3_REQUEST_REJECTED`), requests answered before their end (stopped with
//! `H3_NO_ERROR`), and on the client side: a timed-out request resets its stream, and a
//! certificate refusal does not fall back to TCP.

mod common;
#[path = "common/h3.rs"]
mod h3c;

use bytes::Bytes;
use common::pki::*;
use common::*;
use h3::error::{Code, StreamError};
use h3c::{client_tls, quic_connect, H3Conn};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How late a timeout may fire on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(800);

fn id(sa: &str) -> String {
    format!("spiffe://test.local/ns/shop/sa/{sa}")
}

/// An `http3` listener `edge` in front of `app`, with `limits`.
fn edge_yaml(leaf: &Leaf, app: SocketAddr, limits: &str) -> String {
    format!(
        r#"
admin: {{ listen: 127.0.0.1:0 }}
drain_timeout: 10s
listeners:
  - name: edge
    listen: 127.0.0.1:0
    protocol: http3
    tls: {{ cert: {cert}, key: {key} }}
    limits: {limits}
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
        cert = leaf.cert,
        key = leaf.key,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_without_a_request_are_closed_at_header_timeout() {
    let pki = Pki::new("h3-silent");
    let leaf = pki.issue("edge", None, 1);
    let app = named_backend("app").await;
    let limits =
        "{ max_connections: 20, header_timeout: 1s, idle_timeout: 60s, max_header_bytes: 2KiB }";
    let proxy = start_proxy(&edge_yaml(&leaf, app.addr, limits)).await;
    let addr = proxy.listener_addr("edge").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let header_timeout = Duration::from_secs(1);

    // 20 connections that complete the QUIC handshake and send nothing more, and one that
    // also sets up HTTP/3 (control streams) but sends no request. The server's timer starts
    // at the handshake's first packet, so each connection is timed on its own (on a busy
    // machine the last of 20 debug-build handshakes comes late): the lower bound from the
    // start of its handshake (no later than that first packet), the upper bound from the
    // handshake's end (no earlier than it).
    let mut timed = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..19 {
        let starting = Instant::now();
        let (endpoint, conn) = quic_connect(addr, client_tls(&pki.ca_path, None))
            .await
            .unwrap();
        timed.push((conn.clone(), starting, Instant::now()));
        silent.push(endpoint);
    }
    let starting = Instant::now();
    let h3_only = H3Conn::open(addr, client_tls(&pki.ca_path, None))
        .await
        .unwrap();
    timed.push((h3_only.quic.clone(), starting, Instant::now()));
    // Over max_connections: refused.
    let over = quic_connect(addr, client_tls(&pki.ca_path, None)).await;
    assert!(over.is_err(), "a 21st connection was accepted");

    // Each close is awaited on its own, so that one late close does not delay the timing
    // of the others.
    let waits: Vec<_> = timed
        .into_iter()
        .map(|(c, starting, connected)| {
            tokio::spawn(async move {
                let why = tokio::time::timeout(Duration::from_secs(10), c.closed())
                    .await
                    .expect("a silent QUIC connection is still open after 10 s");
                (why, starting.elapsed(), connected.elapsed())
            })
        })
        .collect();
    let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
    for w in waits {
        let (why, from_start, from_connected) = w.await.unwrap();
        first = first.min(from_start);
        last = last.max(from_connected);
        match why {
            quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
                u64::from(close.error_code),
                Code::H3_NO_ERROR.value(),
                "{close:?}"
            ),
            other => panic!("closed by {other:?}, not by the server's H3_NO_ERROR"),
        }
    }
    assert!(
        first >= header_timeout && last < header_timeout + SLACK,
        "closed between {first:?} (from a handshake's start) and {last:?} (from a handshake's end)"
    );
    assert_eq!(
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "edge"), ("reason", "header_timeout")]
        )
        .await,
        Some(20.0)
    );
    assert_eq!(
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "edge"), ("reason", "max_connections")]
        )
        .await,
        Some(1.0)
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            metric(
                admin,
                "spur_quic_connections_active",
                &[("listener", "edge")],
            )
            .await
                == Some(0.0)
        })
        .await
    );

    // The listener serves again; a connection that sends a request in time is served, and
    // a head over max_header_bytes gets 431.
    let conn = H3Conn::open(addr, client_tls(&pki.ca_path, None))
        .await
        .unwrap();
    let (resp, body) = conn.get("/").await.unwrap();
    assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"app"[..]));
    let big = Request::get("https://localhost/")
        .header("x-big", "x".repeat(3000))
        .body(())
        .unwrap();
    let (resp, _) = conn.request(big, Vec::new()).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), h3c::header(&resp, "x-spur-error")),
        (431, "headers_too_large")
    );
    // Requests on it keep it open past header_timeout (only the first request is due).
    tokio::time::sleep(header_timeout + Duration::from_millis(200)).await;
    let (resp, _) = conn.get("/again").await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// A backend that answers at once without reading the request body.
async fn hasty_app() -> Backend {
    backend(|_req: Request<Incoming>| async {
        Response::new(Full::new(Bytes::from_static(b"early")))
    })
    .await
}

/// A request answered before its end: the server reads the rest out. One that ends soon
/// (a GET whose FIN follows its head, as h3 clients send it on a connection's first
/// request: head, grease frame, FIN) ends cleanly; one that goes on is stopped with
/// `H3_NO_ERROR` (RFC 9114 §4.1), and the client keeps the complete answer. Spur used to
/// drop such streams, which made quinn stop them with code 0: the `Remote reset: 0x0`
/// flake of tests/http3.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_before_its_end_is_read_out_or_stopped_with_h3_no_error() {
    use bytes::Buf;
    let pki = Pki::new("h3-early");
    let leaf = pki.issue("edge", None, 2);
    let app = hasty_app().await;
    let proxy = start_proxy(&edge_yaml(&leaf, app.addr, "{}")).await;
    let addr = proxy.listener_addr("edge").unwrap();

    // A GET answered before its FIN, on a fresh connection: the FIN (with the grease
    // frame before it) is sent after the answer is complete, and nothing is stopped.
    for _ in 0..5 {
        let conn = H3Conn::open(addr, client_tls(&pki.ca_path, None))
            .await
            .unwrap();
        let mut send = conn.send.clone();
        let req = Request::get("https://localhost/").body(()).unwrap();
        let mut stream = send.send_request(req).await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        assert_eq!(resp.status(), 200);
        while stream.recv_data().await.unwrap().is_some() {}
        // Nothing to poll for: what is checked is that no STOP_SENDING arrives meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream
            .finish()
            .await
            .expect("the server stopped a request it had answered");
    }

    // A POST whose upload goes on after the answer: stopped with H3_NO_ERROR.
    let conn = H3Conn::open(addr, client_tls(&pki.ca_path, None))
        .await
        .unwrap();
    let mut send = conn.send.clone();
    let req = Request::post("https://localhost/upload").body(()).unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    let chunk = Bytes::from(vec![b'u'; 16 * 1024]);
    stream.send_data(chunk.clone()).await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while let Some(c) = stream.recv_data().await.unwrap() {
        body.extend_from_slice(c.chunk());
    }
    assert_eq!(body, b"early", "the complete answer");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = chunk.len();
    let stopped = loop {
        match stream.send_data(chunk.clone()).await {
            Err(e) => break e,
            Ok(()) => sent += chunk.len(),
        }
        assert!(
            Instant::now() < deadline,
            "the server never stopped the upload ({sent} bytes sent)"
        );
    };
    assert!(
        matches!(&stopped, StreamError::RemoteTerminate { code, .. } if *code == Code::H3_NO_ERROR),
        "stopped with {stopped} after {sent} bytes"
    );
    assert!(sent >= 64 * 1024, "stopped after only {sent} bytes");
}

/// A backend that holds each request until `release` is set, counting arrivals.
struct HeldApp {
    backend: Backend,
    arrived: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
}

async fn held_app() -> HeldApp {
    let arrived = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let n = arrived.clone();
    let backend = backend(move |_req: Request<Incoming>| {
        n.fetch_add(1, Ordering::SeqCst);
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            Response::new(Full::new(Bytes::from_static(b"held")))
        }
    })
    .await;
    HeldApp {
        backend,
        arrived,
        release,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_requests_in_flight_and_rejects_later_streams() {
    let pki = Pki::new("h3-drain-reject");
    let leaf = pki.issue("edge", None, 3);
    let app = held_app().await;
    let yaml = edge_yaml(&leaf, app.backend.addr, "{}");
    let proxy = start_proxy(&yaml).await;
    let addr = proxy.listener_addr("edge").unwrap();

    // An h3 client whose connection driver is never polled: it does not learn of the
    // server's GOAWAY, so it still opens streams after it, as a client whose GOAWAY is in
    // flight would.
    let (_endpoint, quic) = quic_connect(addr, client_tls(&pki.ca_path, None))
        .await
        .unwrap();
    let (_driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
        .await
        .unwrap();
    let get = |mut send: h3c::H3Send| async move {
        let req = Request::get("https://localhost/").body(()).unwrap();
        let mut s = send.send_request(req).await?;
        s.finish().await?;
        let resp = s.recv_response().await?;
        let mut body = Vec::new();
        while let Some(chunk) = s.recv_data().await? {
            use bytes::Buf;
            body.extend_from_slice(chunk.chunk());
        }
        Ok::<_, StreamError>((resp.status().as_u16(), body))
    };
    let first = tokio::spawn(get(send.clone()));
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.arrived.load(Ordering::SeqCst) == 1
        })
        .await
    );

    // The proxy shuts down: the listener drains, and its GOAWAY is the only stream data
    // the client receives while the first request is held.
    let frames = quic.stats().frame_rx.stream;
    let proxy = Arc::new(proxy);
    let stopping = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.shutdown().await })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            quic.stats().frame_rx.stream > frames
        })
        .await,
        "no GOAWAY arrived"
    );

    // Streams opened after the GOAWAY are refused unprocessed with H3_REQUEST_REJECTED and
    // never reach the app. (h3 lets one through: the stream the GOAWAY names, which RFC
    // 9114 §5.2 says is not processed; it is held at the app with the first.)
    let later: Vec<_> = (0..4).map(|_| tokio::spawn(get(send.clone()))).collect();
    let mut rejected = 0;
    let mut served = Vec::new();
    for (i, t) in later.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_millis(500), t).await {
            Ok(Ok(Err(StreamError::RemoteTerminate { code, .. })))
                if code == Code::H3_REQUEST_REJECTED =>
            {
                rejected += 1
            }
            Ok(other) => panic!("stream {i} after the GOAWAY: {other:?}"),
            // Still waiting: it was let through and is held at the app.
            Err(_) => served.push(i),
        }
    }
    assert!(rejected >= 3, "{rejected} of 4 later streams refused");
    assert!(
        served.len() <= 1,
        "let through after the GOAWAY: {served:?}"
    );
    assert!(app.arrived.load(Ordering::SeqCst) <= 2);

    // The request in flight is answered.
    app.release.send(true).unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("answered in time")
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!((status, &body[..]), (200, &b"held"[..]));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the drain ends once the requests are answered")
        .unwrap();
}

/// App ← B (`http3` listener, mTLS) ← A (`http3` cluster with `fallback: http2`); B's TCP
/// listener on the same port would be accepted, its QUIC one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_refusal_does_not_fall_back_to_tcp() {
    let pki = Pki::new("h3-nofallback");
    let app = named_backend("app").await;
    let good = pki.issue("b", Some(&id("b")), 10);
    let wrong = pki.issue("c", Some(&id("c")), 11);
    let (held, udp) = h3c::tcp_and_udp_port();
    let port = held.port();
    drop(udp);
    let b = start_proxy(&format!(
        r#"
listeners:
  - name: tcp
    listen: 127.0.0.1:{port}
    tls: {{ cert: {gc}, key: {gk}, client_ca: {ca} }}
    cluster: app
  - name: quic
    listen: 127.0.0.1:{port}
    protocol: http3
    tls: {{ cert: {wc}, key: {wk}, client_ca: {ca} }}
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
        gc = good.cert,
        gk = good.key,
        wc = wrong.cert,
        wk = wrong.key,
        ca = pki.ca_path,
        app = app.addr,
    ))
    .await;
    let a_leaf = pki.issue("a", Some(&id("a")), 12);
    let a_yaml = |expect: &str| {
        format!(
            r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - {{ name: out, listen: 127.0.0.1:0, cluster: b }}
clusters:
  - name: b
    endpoints: ["127.0.0.1:{port}"]
    protocol: http3
    fallback: http2
    connect_timeout: 1s
    tls: {{ ca: {ca}, cert: {cert}, key: {key}, expect_identities: ["{expect}"] }}
"#,
            ca = pki.ca_path,
            cert = a_leaf.cert,
            key = a_leaf.key,
        )
    };
    let a = start_proxy(&a_yaml(&id("b"))).await;
    let out = a.listener_addr("out").unwrap();
    let admin = a.admin_addr().unwrap();
    for _ in 0..3 {
        let r = get(out, "/", &[]).await;
        assert_eq!(
            (r.status, r.header("x-spur-error")),
            (502, Some("upstream_unreachable")),
            "{}",
            r.text()
        );
    }
    assert_eq!(
        metric(
            admin,
            "spur_quic_handshake_errors_total",
            &[("cluster", "b"), ("reason", "identity_not_expected")]
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        metric(admin, "spur_quic_fallback_total", &[("cluster", "b")]).await,
        Some(0.0),
        "a certificate refusal is not a reason to fall back"
    );
    // The TCP path itself works (so a fallback would have succeeded): the same cluster
    // as http2 only.
    let direct = start_proxy(&a_yaml(&id("b")).replace(
        "    protocol: http3\n    fallback: http2\n",
        "    protocol: http2\n",
    ))
    .await;
    let r = get(direct.listener_addr("out").unwrap(), "/", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "app"));
    drop(b);
}

/// What the app saw of one upload: each chunk, and how the body ended.
#[derive(Debug, Clone, PartialEq)]
enum BodyEnd {
    Open,
    Complete,
    Broken,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_by_its_timeout_resets_its_http3_stream() {
    let pki = Pki::new("h3-timeout");
    // The app reads the upload to its end, and says how it ended.
    let ended = Arc::new(Mutex::new(BodyEnd::Open));
    let seen = ended.clone();
    let app = backend(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let mut body = req.into_body();
            let end = loop {
                match body.frame().await {
                    Some(Ok(_)) => continue,
                    Some(Err(_)) => break BodyEnd::Broken,
                    None => break BodyEnd::Complete,
                }
            };
            *seen.lock().unwrap() = end;
            Response::new(Full::new(Bytes::from_static(b"read")))
        }
    })
    .await;
    let b_leaf = pki.issue("b", Some(&id("b")), 20);
    let b = start_proxy(&format!(
        r#"
listeners:
  - name: inbound
    listen: 127.0.0.1:0
    protocol: http3
    tls: {{ cert: {cert}, key: {key}, client_ca: {ca} }}
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
        cert = b_leaf.cert,
        key = b_leaf.key,
        ca = pki.ca_path,
        app = app.addr,
    ))
    .await;
    let a_leaf = pki.issue("a", Some(&id("a")), 21);
    let a = start_proxy(&format!(
        r#"
listeners:
  - name: out
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: / }}, cluster: b, timeout: 500ms }}
clusters:
  - name: b
    endpoints: ["{b}"]
    protocol: http3
    tls: {{ ca: {ca}, cert: {cert}, key: {key}, expect_identities: ["{b_id}"] }}
"#,
        b = b.listener_addr("inbound").unwrap(),
        ca = pki.ca_path,
        cert = a_leaf.cert,
        key = a_leaf.key,
        b_id = id("b"),
    ))
    .await;
    let out = a.listener_addr("out").unwrap();

    // An upload that sends one chunk and then stalls (its sender stays open).
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(4);
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(
        b"part one",
    ))))
    .await
    .unwrap();
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let tcp = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{out}/upload"))
        .header("host", "a")
        .body(body)
        .unwrap();
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("answered within 5 s")
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(t.elapsed() < Duration::from_millis(500) + SLACK);

    // A reset its stream to B, so B's upload to the app breaks: the app never sees the
    // short upload as a complete one.
    assert!(
        eventually(Duration::from_secs(5), || async {
            *ended.lock().unwrap() != BodyEnd::Open
        })
        .await,
        "the app is still reading an upload the client abandoned"
    );
    assert_eq!(*ended.lock().unwrap(), BodyEnd::Broken);
    drop(tx);
}

/// RFC 9000 §8.1, the anti-amplification limit: to a client whose address is not yet
/// validated, the listener sends at most three times what it received. A relay forwards
/// the client's first flight only (what it sends before any answer, as if the spoofed
/// victim never answered) and counts what comes back for 1.5 s, retransmissions included. (Without a Retry, quinn's first flight
/// to one 1,200-byte Initial was 3.19 times that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unvalidated_client_gets_at_most_three_times_its_bytes() {
    let pki = Pki::new("h3-amplification");
    let leaf = pki.issue("edge", None, 1);
    let app = named_backend("app").await;
    let limits = "{ header_timeout: 5s }";
    let proxy = start_proxy(&edge_yaml(&leaf, app.addr, limits)).await;
    let server = proxy.listener_addr("edge").unwrap();
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay = front.local_addr().unwrap();
    let tls = client_tls(&pki.ca_path, None);
    let client = tokio::spawn(async move { quic_connect(relay, tls).await.is_ok() });
    let (mut sent, mut received) = (0usize, 0usize);
    let mut client_addr = None;
    let mut first_at = None;
    let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    let end = Instant::now() + Duration::from_millis(2500);
    loop {
        let window_over =
            first_at.is_some_and(|t: Instant| t.elapsed() > Duration::from_millis(1500));
        if window_over || Instant::now() > end {
            break;
        }
        tokio::select! {
            r = front.recv_from(&mut up) => {
                let (n, from) = r.unwrap();
                client_addr = Some(from);
                // The first flight: what the client sends before any answer.
                first_at.get_or_insert_with(Instant::now);
                if received == 0 {
                    sent += n;
                    back.send_to(&up[..n], server).await.unwrap();
                }
            }
            r = back.recv_from(&mut down) => {
                let (n, _) = r.unwrap();
                received += n;
                if let Some(c) = client_addr {
                    front.send_to(&down[..n], c).await.unwrap();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    client.abort();
    assert!(sent >= 1200, "the client's first flight: {sent} bytes");
    assert!(
        received <= 3 * sent,
        "the listener sent {received} bytes to an unvalidated address that sent {sent} ({:.2}x)",
        received as f64 / sent as f64
    );
}
