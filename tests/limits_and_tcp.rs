//! End-to-end: protection against bad clients, TCP listeners, graceful drain.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use rustls_pki_types::pem::PemObject;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How late a timeout may fire on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(600);

async fn read_all(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

fn limits_config(app: std::net::SocketAddr) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    limits: {{ max_connections: 3, max_header_bytes: 2KiB, header_timeout: 300ms, idle_timeout: 700ms }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_clear_answers() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&limits_config(app.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    // Malformed request line: 400, and the proxy keeps serving.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
    let (text, closed) = read_all(&mut s, Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed);
    assert_eq!(get(web, "/", &[]).await.text(), "app");

    // Headers over the limit (but within the parser buffer): 431 from Spur.
    let big = "x".repeat(3000);
    let a = get(web, "/", &[("x-big", &big)]).await;
    assert_eq!(
        (a.status, a.header("x-spur-error")),
        (431, Some("headers_too_large"))
    );
    assert!(a.header("x-request-id").is_some());
    // Far over the limit: the parser refuses it, still 431.
    let mut s = TcpStream::connect(web).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-huge: {}\r\n\r\n",
        "y".repeat(200 * 1024)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let (text, _) = read_all(&mut s, Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // A slow client that never finishes its headers is cut off at header_timeout (300 ms):
    // no earlier than that from the start of its connect, no later than that (and some)
    // from the connect's return (the proxy's timer starts at the accept, in between).
    let connecting = Instant::now();
    let mut s = TcpStream::connect(web).await.unwrap();
    let connected = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let (_, closed) = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "slow client still connected");
    let (from_connect, from_connected) = (connecting.elapsed(), connected.elapsed());
    assert!(
        from_connect >= Duration::from_millis(300)
            && from_connected < Duration::from_millis(300) + SLACK,
        "cut off {from_connect:?} after the connect started, {from_connected:?} after it returned"
    );
    let header_timeouts = || async {
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "web"), ("reason", "header_timeout")],
        )
        .await
    };
    assert_eq!(header_timeouts().await, Some(1.0));

    // An idle keep-alive connection lives until idle_timeout (700 ms) after its answer, not
    // header_timeout, and its end is not counted as a header timeout.
    let mut s = TcpStream::connect(web).await.unwrap();
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let answered = Instant::now();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.ends_with("app"),
        "one read holds the whole answer: {head}"
    );
    let (_, closed) = read_all(&mut s, Duration::from_secs(3)).await;
    let (since_request, idle) = (t.elapsed(), answered.elapsed());
    assert!(closed, "idle keep-alive connection still open");
    assert!(
        since_request >= Duration::from_millis(700) && idle < Duration::from_millis(700) + SLACK,
        "idle keep-alive connection closed {idle:?} after its answer ({since_request:?} after the request)"
    );
    assert_eq!(
        header_timeouts().await,
        Some(1.0),
        "an idle connection's end is not a header timeout"
    );

    // max_connections: the 4th concurrent connection is refused at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        held.push(s);
    }
    let mut extra = TcpStream::connect(web).await.unwrap();
    let _ = extra.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (text, closed) = read_all(&mut extra, Duration::from_secs(2)).await;
    assert!(
        closed && text.is_empty(),
        "over-limit connection got: {text}"
    );
    drop(held);

    let text = get(admin, "/metrics", &[]).await.text();
    for reason in [
        "malformed",
        "headers_too_large",
        "header_timeout",
        "max_connections",
    ] {
        assert!(
            metric_in(
                &text,
                "spur_downstream_rejected_total",
                &[("listener", "web"), ("reason", reason)]
            ) >= Some(1.0),
            "no {reason} counted:\n{text}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_passes_bytes_and_half_close() {
    // Echo server that, after the client half-closes, sends a trailer and closes.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                        Err(_) => return,
                    }
                }
                s.write_all(b"|bye").await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - {{ name: raw, listen: 127.0.0.1:0, protocol: tcp, cluster: echo }}
clusters:
  - {{ name: echo, endpoints: ["{echo_addr}"] }}
admin: {{ listen: "127.0.0.1:0" }}
"#
    ))
    .await;
    let raw = proxy.listener_addr("raw").unwrap();
    let mut s = TcpStream::connect(raw).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap(); // half-close: we are done sending
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::join!(send, recv);
    assert_eq!(got.len(), payload.len() + 4);
    assert_eq!(&got[..payload.len()], &payload[..]);
    assert_eq!(&got[payload.len()..], b"|bye");
    // Every byte counted both ways, whether copied or spliced (between plain sockets a
    // stream's bytes are spliced), once the connection has ended: just after the client saw
    // its end, so polled.
    let admin = proxy.admin_addr().unwrap();
    for (direction, n) in [
        ("upstream", payload.len()),
        ("downstream", payload.len() + 4),
    ] {
        let labels = [
            ("listener", "raw"),
            ("cluster", "echo"),
            ("direction", direction),
        ];
        let counted = || async { metric(admin, "spur_tcp_bytes_total", &labels).await };
        let right = eventually(Duration::from_secs(3), || async {
            counted().await == Some(n as f64)
        });
        assert!(right.await, "{direction}: {:?}, not {n}", counted().await);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let seen = arrived.clone();
    let slow = backend(move |_req| {
        let seen = seen.clone();
        async move {
            seen.notify_one();
            tokio::time::sleep(Duration::from_millis(800)).await;
            http::Response::new(Full::new(Bytes::from("finished")))
        }
    })
    .await;
    let mut spur = spawn_spur(
        &format!(
            r#"
drain_timeout: 5s
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: slow }}
clusters:
  - {{ name: slow, endpoints: ["{}"] }}
"#,
            slow.addr
        ),
        1,
    );
    let web = spur.listeners["web"];
    let in_flight = tokio::spawn(async move { get(web, "/", &[]).await });
    // SIGTERM once the request is at the backend, i.e. in flight through the proxy.
    tokio::time::timeout(Duration::from_secs(5), arrived.notified())
        .await
        .expect("request reached the backend");
    spur.sigterm();
    let answer = in_flight.await.unwrap();
    assert_eq!((answer.status, answer.text().as_str()), (200, "finished"));
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = spur.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
    .expect("spur exits after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        TcpStream::connect(web).await.is_err(),
        "still accepting after shutdown"
    );
}

/// Reads until the peer closes (at most `limit`); how long after `since` that was, or
/// `None` if it stayed open.
async fn closed_after(mut s: TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    let (_, closed) = read_all(&mut s, limit).await;
    closed.then(|| since.elapsed())
}

/// When a silent connection was closed, timed two ways: from the start of its own
/// connect (no earlier than the proxy's timer starts, which is at its accept) and from
/// the moment the connect returned (no later than that accept, but for scheduling).
/// Timing each connection on its own keeps a slow run of a few hundred connects (a busy
/// machine) out of the figures.
#[derive(Debug, Clone, Copy)]
struct Closed {
    from_connect: Duration,
    from_connected: Duration,
}

/// Opens `n` connections to `addr` that never send a byte; when each was closed (the
/// test fails if one is still open after `limit`).
async fn silent_connections(addr: std::net::SocketAddr, n: usize, limit: Duration) -> Vec<Closed> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let connecting = Instant::now();
        let s = TcpStream::connect(addr).await.unwrap();
        conns.push((s, connecting, Instant::now()));
    }
    let waits: Vec<_> = conns
        .into_iter()
        .map(|(mut s, connecting, connected)| {
            tokio::spawn(async move {
                let (_, closed) = read_all(&mut s, limit).await;
                closed.then(|| Closed {
                    from_connect: connecting.elapsed(),
                    from_connected: connected.elapsed(),
                })
            })
        })
        .collect();
    let mut ends = Vec::new();
    for w in waits {
        let end = w.await.unwrap();
        ends.push(
            end.unwrap_or_else(|| panic!("a silent connection is still open after {limit:?}")),
        );
    }
    ends
}

/// How many of `ends` were closed at `timeout` (not before it), and the latest of them
/// from its connect's return.
fn closed_at_timeout(ends: &[Closed], timeout: Duration) -> (usize, Duration) {
    let at_timeout = ends.iter().filter(|c| c.from_connect >= timeout).count();
    let last = ends.iter().map(|c| c.from_connected).max().unwrap();
    (at_timeout, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_header_timeout_and_free_the_listener() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    limits: {{ max_connections: 200, header_timeout: 500ms, idle_timeout: 30s }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    // 260 connections that never send a byte: 200 fill max_connections, 60 are refused.
    let ends = silent_connections(web, 260, Duration::from_secs(10)).await;
    let header_timeout = Duration::from_millis(500);
    let (at_timeout, last) = closed_at_timeout(&ends, header_timeout);
    assert_eq!(at_timeout, 200, "closed at header_timeout: {ends:?}");
    assert!(
        last < header_timeout + SLACK,
        "the last one closed after {last:?}"
    );

    // The listener serves again at once.
    assert_eq!(get(web, "/", &[]).await.text(), "app");
    let rejected = |reason: &'static str| async move {
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "web"), ("reason", reason)],
        )
        .await
    };
    assert_eq!(rejected("header_timeout").await, Some(200.0));
    assert_eq!(rejected("max_connections").await, Some(60.0));
    proxy.shutdown().await;
}

/// The admin server's bounds (fixed: 10 s to the first head, 256 connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_closes_silent_connections_and_caps_them() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.addr
    ))
    .await;
    let admin = proxy.admin_addr().unwrap();
    // 300 connections that never send a byte: 256 fill the cap, 44 are closed at once.
    let ends = silent_connections(admin, 300, Duration::from_secs(20)).await;
    let head_timeout = Duration::from_secs(10);
    let (at_timeout, last) = closed_at_timeout(&ends, head_timeout);
    assert_eq!(at_timeout, 256, "closed at the head timeout: {ends:?}");
    assert!(
        last < head_timeout + SLACK,
        "the last one closed after {last:?}"
    );
    // Scrapes work again, and both refusals are counted.
    let rejected = |reason: &'static str| async move {
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "admin"), ("reason", reason)],
        )
        .await
    };
    assert_eq!(rejected("max_connections").await, Some(44.0));
    assert_eq!(rejected("header_timeout").await, Some(256.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_bounds_the_tls_handshake_and_the_first_head_together() {
    let pki = common::pki::Pki::new("head-tls");
    let leaf = pki.issue("web", None, 1);
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    tls: {{ cert: {cert}, key: {key} }}
    limits: {{ header_timeout: 1s, idle_timeout: 30s }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
        cert = leaf.cert,
        key = leaf.key,
        app = app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let header_timeout = Duration::from_secs(1);

    // No ClientHello at all: the handshake times out at header_timeout (timed as in
    // `silent_connections`).
    let ends = silent_connections(web, 1, Duration::from_secs(10)).await;
    let (at_timeout, last) = closed_at_timeout(&ends, header_timeout);
    assert!(
        at_timeout == 1 && last < header_timeout + SLACK,
        "closed after {ends:?}"
    );
    assert_eq!(
        metric(
            admin,
            "spur_tls_handshake_errors_total",
            &[("listener", "web"), ("reason", "timeout")]
        )
        .await,
        Some(1.0)
    );

    // A handshake that starts 600 ms late and completes, then no request: the head is
    // due header_timeout after accept (at 1 s), not after the handshake (at 1.6 s).
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&pki.ca_path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(spur_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connecting = Instant::now();
    let tcp = TcpStream::connect(web).await.unwrap();
    let connected = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("the handshake completes within header_timeout");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await;
    let (from_connect, from_connected) = (connecting.elapsed(), connected.elapsed());
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open 10 s later"
    );
    // A head due 1 s after the handshake would close at 1.6 s or later from the accept;
    // the upper bound stays clear of that, timed from the connect's return (no earlier
    // than the accept) so that a slow connect does not count.
    assert!(
        from_connect >= header_timeout
            && from_connected < header_timeout + Duration::from_millis(450),
        "closed {from_connect:?} after the connect started, {from_connected:?} after it returned"
    );
    assert_eq!(
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "web"), ("reason", "header_timeout")]
        )
        .await,
        Some(1.0)
    );
    proxy.shutdown().await;
}

/// A listener whose accept queue is full: the kernel drops further SYNs unanswered, as a
/// blackholed address would (no RST, so only a timeout ends a connect).
async fn unanswered_syn() -> (
    std::net::SocketAddr,
    tokio::net::TcpListener,
    Vec<TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the queue (never accepted) until a connect goes unanswered.
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("connect to the full listener failed: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    (addr, listener, fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_ends_a_connect_that_gets_no_answer() {
    let (blackhole, _listener, _fillers) = unanswered_syn().await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: hole }}
  - {{ name: raw, listen: 127.0.0.1:0, protocol: tcp, cluster: hole }}
clusters:
  - {{ name: hole, endpoints: ["{blackhole}"], connect_timeout: 300ms }}
"#
    ))
    .await;
    let connect_timeout = Duration::from_millis(300);

    // HTTP: 502 upstream_unreachable after connect_timeout.
    let t = Instant::now();
    let a = tokio::time::timeout(
        Duration::from_secs(10),
        get(proxy.listener_addr("web").unwrap(), "/", &[]),
    )
    .await
    .expect("answered within 10 s");
    let took = t.elapsed();
    assert_eq!(
        (a.status, a.header("x-spur-error")),
        (502, Some("upstream_unreachable"))
    );
    assert!(
        (connect_timeout..connect_timeout + SLACK).contains(&took),
        "answered after {took:?}"
    );

    // TCP: the client's connection is closed after connect_timeout, nothing sent (timed
    // as in `silent_connections`: the proxy's connect starts at the accept).
    let ends = silent_connections(
        proxy.listener_addr("raw").unwrap(),
        1,
        Duration::from_secs(10),
    )
    .await;
    let (at_timeout, last) = closed_at_timeout(&ends, connect_timeout);
    assert!(
        at_timeout == 1 && last < connect_timeout + SLACK,
        "closed after {ends:?}"
    );
    // Both counted against the endpoint as failed connects: the HTTP try with code 0, the
    // TCP connection as refused.
    let admin = proxy.admin_addr().unwrap();
    let text = get(admin, "/metrics", &[]).await.text();
    let endpoint = blackhole.to_string();
    let http = [
        ("cluster", "hole"),
        ("endpoint", endpoint.as_str()),
        ("code", "0"),
    ];
    assert_eq!(
        metric_in(&text, "spur_upstream_requests_total", &http),
        Some(1.0),
        "{text}"
    );
    let tcp = [
        ("listener", "raw"),
        ("cluster", "hole"),
        ("endpoint", endpoint.as_str()),
        ("result", "refused"),
    ];
    assert_eq!(
        metric_in(&text, "spur_tcp_connections_total", &tcp),
        Some(1.0),
        "{text}"
    );
    proxy.shutdown().await;
}

/// An HTTP/2 connection (which never parks) that goes silent after its request is closed
/// at idle_timeout, and that is not counted as a header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_connection_is_closed_at_idle_timeout() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&limits_config(app.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let tcp = TcpStream::connect(web).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let closed = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{web}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let answered = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .expect("the silent HTTP/2 connection is closed")
        .unwrap()
        .ok();
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(650) && idle < Duration::from_millis(700) + SLACK,
        "closed {idle:?} after its answer (idle_timeout 700 ms)"
    );
    let header_timeouts = metric(
        admin,
        "spur_downstream_rejected_total",
        &[("listener", "web"), ("reason", "header_timeout")],
    )
    .await;
    assert_eq!(header_timeouts, None, "not a header timeout");
    proxy.shutdown().await;
}

/// On HTTP/2, frames flow between requests (here the client's keep-alive pings): they
/// neither start a header timeout nor let the connection go idle, so a connection that
/// pings lives past both timeouts and serves its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_pings_outlives_header_and_idle_timeouts() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&limits_config(app.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let header_timeouts = || async {
        metric(
            admin,
            "spur_downstream_rejected_total",
            &[("listener", "web"), ("reason", "header_timeout")],
        )
        .await
    };
    // One real header timeout first, so that the series exists.
    let silent = TcpStream::connect(web).await.unwrap();
    closed_after(silent, Instant::now(), Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert_eq!(header_timeouts().await, Some(1.0));

    let tcp = TcpStream::connect(web).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let closed = tokio::spawn(conn);
    let req = || {
        http::Request::get(format!("http://{web}/"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(sender.send_request(req()).await.unwrap().status(), 200);
    // Past header_timeout (300 ms) and idle_timeout (700 ms), pinging.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!closed.is_finished(), "the pinging connection was closed");
    let r = sender
        .send_request(req())
        .await
        .expect("the connection serves its next request");
    assert_eq!(r.status(), 200);
    assert_eq!(
        header_timeouts().await,
        Some(1.0),
        "no header timeout counted for the HTTP/2 connection"
    );
    proxy.shutdown().await;
}
