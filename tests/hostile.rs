//! Hostile input on the request path, end to end: each test attacks Spur the way the
//! hostile-input review did (raw sockets where a polite client could not send the bytes)
//! and asserts what a user of the proxy sees afterwards.

mod common;
#[path = "hostile/wire.rs"]
mod wire;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::*;

/// The value of a sample on the admin `/metrics` whose line starts with `series` (name and
/// labels as printed), if there is one.
async fn sample(admin: SocketAddr, series: &str) -> Option<f64> {
    let text = get(admin, "/metrics", &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Issue 20, item 1: five clients that each start a 100,000-byte upload, send 10 bytes and
/// leave must not eject the only endpoint of a cluster with the README's `circuit_breaker`
/// block; later clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_uploads_do_not_eject_a_healthy_endpoint() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let started = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = started.clone();
    let app = backend(move |req: http::Request<hyper::body::Incoming>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            // Reads the body as an application would; a broken one ends the exchange.
            match req.into_body().collect().await {
                Ok(_) => http::Response::new(http_body_util::Full::new("ok".into())),
                Err(_) => http::Response::builder()
                    .status(400)
                    .body(http_body_util::Full::new("broken".into()))
                    .unwrap(),
            }
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: "127.0.0.1:0", cluster: app }}
clusters:
  - name: app
    endpoints: ["{}"]
    circuit_breaker: {{ consecutive_failures: 5, ejection_time: 10s }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    for i in 1..=5 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(
            b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 100000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
        // Give the proxy the time to forward what came, then leave mid-upload.
        assert!(eventually(STEP, || async { started.load(Ordering::SeqCst) == i }).await);
        drop(s);
    }
    // Each cut upload is the client's failure: counted as such, charged to nobody.
    assert!(
        eventually(STEP, || async {
            sample(
                admin,
                r#"spur_downstream_rejected_total{listener="web",reason="client_abort"}"#,
            )
            .await
                == Some(5.0)
        })
        .await,
        "{}",
        get(admin, "/metrics", &[]).await.text()
    );
    for _ in 0..5 {
        let a = get(web, "/", &[]).await;
        assert_eq!((a.status, a.text()), (200, "ok".to_string()));
    }
    let clusters = get(admin, "/clusters", &[]).await.text();
    assert!(!clusters.contains("\"ejected\":true"), "{clusters}");
}

/// A backend that answers `NAME HOST PATH` (the Host header and the path it received).
async fn telling_backend(name: &'static str) -> Backend {
    backend(
        move |req: http::Request<hyper::body::Incoming>| async move {
            let host = req
                .headers()
                .get_all("host")
                .iter()
                .map(|v| v.to_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(",");
            let path = req.uri().path_and_query().map_or("", |p| p.as_str());
            http::Response::new(http_body_util::Full::new(
                format!("{name} {host} {path}").into(),
            ))
        },
    )
    .await
}

/// Issue 20, items 4 and 5: routes and the upstream see the same host and the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_forwarding_agree_on_host_and_path() {
    let public = telling_backend("public").await;
    let internal = telling_backend("internal").await;
    let admin = telling_backend("admin").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: public
    routes:
      - {{ match: {{ host: internal.example }}, cluster: internal }}
      - {{ match: {{ path_prefix: /admin }}, cluster: admin }}
  - name: raw-paths
    listen: 127.0.0.1:0
    cluster: public
    allow_encoded_slashes: true
clusters:
  - {{ name: public, endpoints: ["{}"] }}
  - {{ name: internal, endpoints: ["{}"] }}
  - {{ name: admin, endpoints: ["{}"] }}
"#,
        public.addr, internal.addr, admin.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let raw_paths = proxy.listener_addr("raw-paths").unwrap();
    let cases: &[(&str, u16, &str)] = &[
        // The absolute-form target's authority is the host, for the route and upstream.
        (
            "GET http://public.example/x HTTP/1.1\r\nhost: internal.example\r\n",
            200,
            "public public.example /x",
        ),
        (
            "GET http://internal.example/x HTTP/1.1\r\nhost: public.example\r\n",
            200,
            "internal internal.example /x",
        ),
        (
            "GET /x HTTP/1.1\r\nhost: Internal.Example.\r\n",
            200,
            "internal internal.example /x",
        ),
        (
            "GET /x HTTP/1.1\r\nhost: internal.example\r\nhost: public.example\r\n",
            400,
            "",
        ),
        ("GET /x HTTP/1.1\r\n", 400, ""),
        // Every spelling of /admin is /admin.
        ("GET /admin HTTP/1.1\r\nhost: a\r\n", 200, "admin a /admin"),
        (
            "GET /%61dmin HTTP/1.1\r\nhost: a\r\n",
            200,
            "admin a /admin",
        ),
        ("GET //admin HTTP/1.1\r\nhost: a\r\n", 200, "admin a /admin"),
        (
            "GET /./admin HTTP/1.1\r\nhost: a\r\n",
            200,
            "admin a /admin",
        ),
        (
            "GET /x/../admin?q=/../ HTTP/1.1\r\nhost: a\r\n",
            200,
            "admin a /admin?q=/../",
        ),
        (
            "GET /x/..;/admin HTTP/1.1\r\nhost: a\r\n",
            200,
            "admin a /admin",
        ),
        (
            "GET /admin;x HTTP/1.1\r\nhost: a\r\n",
            200,
            "admin a /admin;x",
        ),
        ("GET /a%2Fb HTTP/1.1\r\nhost: a\r\n", 400, ""),
        ("GET /a%5c..%5cadmin HTTP/1.1\r\nhost: a\r\n", 400, ""),
        ("GET /a\\..\\admin HTTP/1.1\r\nhost: a\r\n", 400, ""),
    ];
    for (head, status, body) in cases {
        let (s, b) = ask(web, head).await;
        assert_eq!(s, *status, "{head:?}: {b}");
        if *status == 200 {
            assert_eq!(b, *body, "{head:?}");
        } else {
            assert!(b.contains("invalid_"), "{head:?}: {b}");
        }
    }
    // A listener that opts in keeps encoded slashes as they were sent.
    let (s, b) = ask(raw_paths, "GET /a%2fb HTTP/1.1\r\nhost: a\r\n").await;
    assert_eq!((s, b.as_str()), (200, "public a /a%2Fb"));

    // HTTP/2: a `host` header must agree with `:authority`.
    let h2 = h2_client();
    let req = |authority: &str, host: Option<&str>| {
        let mut r = http::Request::get(format!("http://{authority}/x"));
        if let Some(h) = host {
            r = r.header("host", h);
        }
        r.body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let a = send(&h2, req(&web.to_string(), Some("internal.example"))).await;
    assert_eq!(
        (a.status, a.header("x-spur-error")),
        (400, Some("invalid_host"))
    );
    let a = send(&h2, req(&web.to_string(), None)).await;
    assert_eq!(a.text(), format!("public {web} /x"));
}

/// Switches to any protocol asked for (an h2c server would), or to none when asked
/// nothing unless the request says `x-force-101` (a backend that misbehaves).
fn switching_reply(head: &str) -> String {
    let asked = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("upgrade")
            .then(|| v.trim().to_string())
    });
    match asked {
        Some(p) => {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {p}\r\n\r\n"
            )
        }
        None if has_header(head, "x-force-101", "") => {
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n".into()
        }
        None => "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain".into(),
    }
}

/// Issue 20, item 3: `Upgrade: h2c` is stripped (a tunnel would skip routing, header
/// hygiene and the access log); WebSocket and the upgrades a route lists are tunnelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_upgrades_a_route_allows_become_tunnels() {
    let app = raw_backend(switching_reply).await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    routes:
      - {{ match: {{ path_prefix: /custom }}, cluster: app, upgrades: [websocket, my-proto] }}
      - {{ match: {{ path_prefix: /none }}, cluster: app, upgrades: [] }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let h2c = "connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n\
               http2-settings: AAMAAABkAAQAAP__\r\nx-spur-peer-identity: spiffe://forged\r\n";
    // h2c: the request goes on without its upgrade; the answer is the backend's plain one.
    let (s, b) = ask(web, &format!("GET / HTTP/1.1\r\nhost: a\r\n{h2c}")).await;
    assert_eq!((s, b.as_str()), (200, "plain"));
    let head = app.heads().pop().unwrap();
    for name in ["upgrade", "http2-settings", "x-spur-peer-identity"] {
        assert!(
            !has_header(&head, name, ""),
            "{name} reached the backend: {head}"
        );
    }
    assert!(!has_header(&head, "connection", "upgrade"), "{head}");
    // Even where the route lists every other protocol.
    let (s, _) = ask(web, &format!("GET /custom HTTP/1.1\r\nhost: a\r\n{h2c}")).await;
    assert_eq!(s, 200);
    // CONNECT would be a tunnel too: Spur is not a forward proxy. What follows a refused
    // CONNECT is HTTP again, routed like any request.
    let text = raw(
        web,
        b"CONNECT internal.example:443 HTTP/1.1\r\nhost: internal.example:443\r\n\r\n\
          GET /tunnelled HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&text), 405, "{text}");
    assert!(text.contains("x-spur-error: method_not_allowed"), "{text}");
    assert!(
        !app.heads().iter().any(|h| h.starts_with("CONNECT")),
        "{:?}",
        app.heads()
    );
    assert!(text.contains("\r\n\r\nplain"), "{text}");
    // A backend that switches anyway is refused: no tunnel the client did not get.
    let (s, b) = ask(
        web,
        &format!("GET / HTTP/1.1\r\nhost: a\r\nx-force-101: 1\r\n{h2c}"),
    )
    .await;
    assert_eq!(s, 502, "{b}");

    // Allowed upgrades are tunnels: bytes go through both ways.
    for (path, proto, tunnel) in [
        ("/", "websocket", true),
        ("/custom", "my-proto", true),
        ("/", "my-proto", false),
        ("/none", "websocket", false),
    ] {
        let mut s = TcpStream::connect(web).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: {proto}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        while find(&got, b"\r\n\r\n").is_none() {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(STEP, s.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed before a response head");
            got.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        if !tunnel {
            assert_eq!(status_of(&text), 200, "{path} {proto}: {text}");
            continue;
        }
        assert_eq!(status_of(&text), 101, "{path} {proto}: {text}");
        s.write_all(b"ping through the tunnel").await.unwrap();
        let mut echo = [0u8; 23];
        tokio::time::timeout(STEP, s.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echo, b"ping through the tunnel");
    }
}

/// Issue 20, item 7: a client that sends a body byte now and then is cut at `body_timeout`
/// (time between reads) with 408; the upstream connection and the cluster slot it held
/// are free at once. A slow but steady client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upload_is_cut_at_body_timeout() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let broken = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = broken.clone();
    let app = backend(move |req: http::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            match req.into_body().collect().await {
                Ok(b) => http::Response::new(http_body_util::Full::new(
                    format!("{} bytes", b.to_bytes().len()).into(),
                )),
                Err(_) => {
                    seen.fetch_add(1, Ordering::SeqCst);
                    http::Response::new(http_body_util::Full::new("broken".into()))
                }
            }
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - {{ name: web, listen: "127.0.0.1:0", cluster: app, limits: {{ body_timeout: 400ms }} }}
clusters:
  - name: app
    endpoints: ["{}"]
    circuit_breaker: {{ max_requests: 1 }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();

    // Ten bytes of a hundred, then silence.
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let text = read_all(&mut s).await;
    let took = start.elapsed();
    assert_eq!(status_of(&text), 408, "{text}");
    assert!(text.contains("x-spur-error: body_timeout"), "{text}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // read_all returned: the proxy closed the connection. The backend's exchange broke,
    // and the one slot of the cluster is free again.
    assert!(eventually(STEP, || async { broken.load(Ordering::SeqCst) == 1 }).await);
    assert_eq!(get(web, "/", &[]).await.text(), "0 bytes");

    // Five bytes 150 ms apart: slower in all than body_timeout, never silent that long.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for b in b"abcde" {
        // Pacing the client, not waiting for the proxy.
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let text = read_all(&mut s).await;
    assert_eq!(status_of(&text), 200, "{text}");
    assert_eq!(body_of(&text), "5 bytes");
}

/// Issue 20, item 6: no header Spur sets can be forged by a client; the backend sees
/// Spur's own values or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_what_spur_sets() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - {{ name: web, listen: "127.0.0.1:0", cluster: app }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
flags:
  beta: {{ enabled: true, rules: [{{ header: x-group, values: [beta] }}] }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let a = get(
        web,
        "/",
        &[
            ("x-spur-attempt", "3"),
            ("x-spur-mirror", "1"),
            (
                "x-spur-peer-identity",
                "spiffe://cluster.local/ns/shop/sa/admin",
            ),
            ("x-spur-flags", "beta"),
            ("x-spur-hops", "7"),
            ("x-forwarded-proto", "https"),
            ("traceparent", "not-a-trace"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    for gone in [
        "x-echo-x-spur-attempt",
        "x-echo-x-spur-mirror",
        "x-echo-x-spur-peer-identity",
    ] {
        assert_eq!(a.header(gone), None, "{gone}: {:?}", a.headers);
    }
    assert_eq!(
        a.header("x-echo-x-spur-flags"),
        Some(""),
        "the flag is off here"
    );
    assert_eq!(a.header("x-echo-x-forwarded-proto"), Some("http"));
    assert_eq!(a.header("x-echo-x-forwarded-for"), Some("127.0.0.1"));
    // A hop count that came is counted on (a client can only bring its own 508 closer).
    assert_eq!(a.header("x-echo-x-spur-hops"), Some("8"));
    let tp = a.header("x-echo-traceparent").unwrap();
    assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
}

/// Issue 20, item 13: two `x-forwarded-for` headers are joined, not one dropped (from
/// trusted hops: an untrusted client's are replaced, issue 17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_headers_are_joined() {
    let app = raw_backend(|_| "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into()).await;
    let proxy = start_proxy(&format!(
        "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app, x_forwarded: {{ trusted_hops: 3 }} }}\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let (s, _) = ask(
        web,
        "GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 192.0.2.1\r\n\
         x-forwarded-for: 198.51.100.2, 203.0.113.3\r\n",
    )
    .await;
    assert_eq!(s, 200);
    let head = app.heads().pop().unwrap();
    let xff: Vec<&str> = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"))
        .collect();
    assert_eq!(
        xff,
        ["x-forwarded-for: 192.0.2.1, 198.51.100.2, 203.0.113.3, 127.0.0.1"],
        "{head}"
    );
}

/// Issue 20, item 13: an upstream answering with both `content-length` and chunked
/// framing gets the client a 502 (not a truncated body), and its connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_response_is_502_and_its_connection_closed() {
    let app = raw_backend(|head| {
        if head.starts_with("GET /split") {
            "HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
                .into()
        } else if head.starts_with("GET /two-lengths") {
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 50\r\n\r\nhello".into()
        } else {
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".into()
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    // A pooled connection first, so that the bad answer comes on one Spur would reuse.
    assert_eq!(
        ask(web, "GET /ok HTTP/1.1\r\nhost: a\r\n").await,
        (200, "ok".into())
    );
    let text = raw(
        web,
        b"GET /split HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&text), 502, "{text}");
    assert!(text.contains("x-spur-error: upstream_reset"), "{text}");
    assert!(
        eventually(STEP, || async { app.closed() == 1 }).await,
        "the connection that carried it is closed"
    );
    assert_eq!(
        ask(web, "GET /ok HTTP/1.1\r\nhost: a\r\n").await,
        (200, "ok".into())
    );
    assert_eq!(app.accepted(), 2, "a new connection after the bad one");
    // A framing hyper itself rejects: the same.
    let (s, b) = ask(web, "GET /two-lengths HTTP/1.1\r\nhost: a\r\n").await;
    assert_eq!(s, 502, "{b}");
    assert!(eventually(STEP, || async { app.closed() == 2 }).await);
}

/// Issue 20, item 13: a cluster pointing at its own listener stops at `MAX_HOPS` (32)
/// with 508 `loop_detected`, and repeating it holds no more descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_pointing_at_its_own_listener_is_a_loop_not_a_leak() {
    let held = reserved_port();
    let port = held.port();
    let spur = spawn_spur(
        &format!(
            "listeners:\n  - {{ name: web, listen: \"127.0.0.1:{port}\", cluster: me }}\n\
             clusters:\n  - {{ name: me, endpoints: [\"127.0.0.1:{port}\"] }}\n"
        ),
        1,
    );
    let web = spur.listeners["web"];
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", spur.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let a = get(web, "/", &[]).await;
    assert_eq!(
        (a.status, a.header("x-spur-error")),
        (508, Some("loop_detected"))
    );
    let after_one = fds();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        let a = get(web, "/", &[]).await;
        assert_eq!(a.status, 508);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
    // The hops' connections are pooled and used again: six loops hold what one did, give or
    // take a few hops whose connection was not back in the pool when the next loop reached
    // them (seen: +5). A leak keeps both ends of every hop: about 20 more per loop.
    let now = fds();
    assert!(
        now <= after_one + 15,
        "{after_one} descriptors after one loop, {now} after six"
    );
    assert!(after_one < 200, "{after_one} descriptors");
}

/// The access line (JSON) of the request with this request ID, once it is written.
async fn access_line(spur: &SpurProcess, request_id: &str) -> serde_json::Value {
    let find = || {
        spur.stderr_lines.lock().unwrap().iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "access" && v["request_id"] == request_id).then_some(v)
        })
    };
    assert!(
        eventually(STEP, || async { find().is_some() }).await,
        "no access line for {request_id}: {:?}",
        spur.stderr_lines.lock().unwrap()
    );
    find().unwrap()
}

/// Issue 19, item 8: the access line has the client's address, Host, User-Agent and the
/// number of tries; the query string only with `access_log: { query: true }`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_client_and_keeps_queries_out() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let app = named_backend("app").await;
    // Every other answer is a 503: a retried request takes exactly two tries.
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let flaky = backend(move |_| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            http::Response::builder()
                .status(if n % 2 == 0 { 503 } else { 200 })
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let config = |extra: &str| {
        format!(
            r#"{extra}
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    routes:
      - match: {{ path_prefix: /retry }}
        cluster: flaky
        retry: {{ attempts: 2, retry_on: ["503"] }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
  - {{ name: flaky, endpoints: ["{}"] }}
"#,
            app.addr, flaky.addr
        )
    };
    let spur = spawn_spur(&config(""), 1);
    let web = spur.listeners["web"];
    let mut s = TcpStream::connect(web).await.unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(
        b"GET /checkout/?a=1&token=secret HTTP/1.1\r\nhost: Shop.Example\r\n\
          user-agent: hostile-test/1.0\r\nx-request-id: log-1\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status_of(&read_all(&mut s).await), 200);
    let v = access_line(&spur, "log-1").await;
    assert_eq!(v["path"], "/checkout/", "{v}");
    assert!(!v.to_string().contains("secret"), "{v}");
    assert_eq!(v["client"], local.to_string(), "{v}");
    assert_eq!(v["host"], "shop.example", "{v}");
    assert_eq!(v["user_agent"], "hostile-test/1.0", "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
    // Every try counts: a 503, then the retry's 200.
    let a = get(web, "/retry", &[("x-request-id", "log-2")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(access_line(&spur, "log-2").await["attempts"], 2);
    get(
        web,
        "/?token=secret",
        &[("x-request-id", "log-4"), ("host", "a")],
    )
    .await;
    let v = access_line(&spur, "log-4").await;
    assert_eq!(
        (v["path"].as_str(), v["user_agent"].as_str()),
        (Some("/"), Some("-"))
    );
    drop(spur);

    let spur = spawn_spur(&config("access_log: { query: true }"), 1);
    let web = spur.listeners["web"];
    get(
        web,
        "/checkout/?a=1&token=secret",
        &[("x-request-id", "log-5")],
    )
    .await;
    let v = access_line(&spur, "log-5").await;
    assert_eq!(v["path"], "/checkout/?a=1&token=secret", "{v}");
}
