//! End-to-end: HTTP/3 over QUIC through real UDP sockets on 127.0.0.1 — an h3 client
//! (quinn + h3) to an `http3` listener, proxy → HTTP/3 + mTLS → proxy, the TCP fallback
//! when UDP is closed, Alt-Svc, certificate rotation and live listener changes.

mod common;
#[path = "common/h3.rs"]
mod h3c;

use bytes::Bytes;
use common::pki::*;
use common::*;
use h3c::{client_tls, header, H3Conn};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn id(sa: &str) -> String {
    format!("spiffe://test.local/ns/shop/sa/{sa}")
}

/// An app that reports what it saw: body length, the correlation headers and the peer
/// identity Spur forwarded.
async fn reporting_app() -> Backend {
    backend(|req: Request<Incoming>| async move {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let (rid, tp, peer, host) = (
            h("x-request-id"),
            h("traceparent"),
            h("x-spur-peer-identity"),
            h("host"),
        );
        let method = req.method().to_string();
        let len = req.into_body().collect().await.unwrap().to_bytes().len();
        Response::builder()
            .header("x-seen-request-id", rid)
            .header("x-seen-traceparent", tp)
            .header("x-seen-peer", peer)
            .header("x-seen-host", host)
            .body(Full::new(Bytes::from(format!("{method} {len}"))))
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h3_client_reaches_an_http1_app_through_an_http3_listener() {
    let pki = Pki::new("h3-edge");
    let server = pki.issue("edge", None, 1);
    let app = reporting_app().await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - name: edge
    listen: 127.0.0.1:0
    protocol: http3
    tls: {{ cert: {cert}, key: {key} }}
    cluster: app
clusters:
  - name: app
    endpoints: ["{app}"]
"#,
        cert = server.cert,
        key = server.key,
        app = app.addr,
    ))
    .await;
    let addr = proxy.listener_addr("edge").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let conn = H3Conn::open(addr, client_tls(&pki.ca_path, None))
        .await
        .unwrap();

    // GET: correlation headers reach the app and come back.
    let (resp, body) = conn.get("/hello").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body, "GET 0");
    let rid = header(&resp, "x-request-id");
    assert_eq!(rid.len(), 36, "a generated request ID comes back: {rid:?}");
    assert_eq!(header(&resp, "x-seen-request-id"), rid);
    assert_eq!(header(&resp, "x-seen-traceparent").len(), 55);
    assert_eq!(header(&resp, "x-seen-host"), "localhost");

    // POST, 10 MiB streamed in 64 KiB chunks.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = vec![chunk; 160];
    let req = Request::post("https://localhost/upload")
        .header("content-length", (160 * 64 * 1024).to_string())
        .body(())
        .unwrap();
    let (resp, body) = conn.request(req, chunks).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body, format!("POST {}", 10 * 1024 * 1024));

    // 100 concurrent requests on the one connection.
    let conn = Arc::new(conn);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let (resp, body) = conn.get(&format!("/c/{i}")).await?;
            Ok::<_, String>((resp.status().as_u16(), body))
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap().unwrap();
        assert_eq!((status, &body[..]), (200, &b"GET 0"[..]));
        ok += 1;
    }
    assert_eq!(ok, 100);

    let text = get(admin, "/metrics", &[]).await.text();
    let streams = metric_in(&text, "spur_quic_streams_total", &[("listener", "edge")]);
    assert_eq!(streams, Some(102.0), "{text}");
    assert_eq!(
        metric_in(
            &text,
            "spur_requests_total",
            &[
                ("listener", "edge"),
                ("route", "default"),
                ("cluster", "app"),
                ("code", "200")
            ]
        ),
        Some(102.0)
    );
    assert_eq!(
        metric_in(
            &text,
            "spur_quic_connections_active",
            &[("listener", "edge")]
        ),
        Some(1.0)
    );
}

/// Proxy B: an http3 listener with mutual TLS that allows only A's identity, in front of
/// the app.
async fn proxy_b(pki: &Pki, app: SocketAddr) -> spur_proxy::Proxy {
    start_proxy(&proxy_b_yaml(pki, app, "127.0.0.1:0", 20)).await
}

/// Proxy B's config, listening on `listen`, with a fresh certificate numbered `serial`.
fn proxy_b_yaml(pki: &Pki, app: SocketAddr, listen: &str, serial: u64) -> String {
    let b = pki.issue(&format!("b{serial}"), Some(&id("b")), serial);
    format!(
        r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - name: inbound
    listen: {listen}
    protocol: http3
    tls:
      cert: {cert}
      key: {key}
      client_ca: {ca}
      allow_identities: ["{a}"]
    cluster: app
clusters:
  - name: app
    endpoints: ["{app}"]
"#,
        cert = b.cert,
        key = b.key,
        ca = pki.ca_path,
        a = id("a"),
    )
}

/// Proxy A: plain HTTP in, HTTP/3 with mTLS to `b`, presenting `who`'s certificate and
/// expecting the server to be `expect`.
async fn proxy_a(
    pki: &Pki,
    who: &str,
    serial: u64,
    b: SocketAddr,
    expect: &str,
) -> spur_proxy::Proxy {
    let a = pki.issue(who, Some(&id(who)), serial);
    start_proxy(&format!(
        r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - name: outbound
    listen: 127.0.0.1:0
    cluster: b
clusters:
  - name: b
    endpoints: ["{b}"]
    protocol: http3
    connect_timeout: 1s
    tls:
      ca: {ca}
      cert: {cert}
      key: {key}
      expect_identities: ["{expect}"]
"#,
        ca = pki.ca_path,
        cert = a.cert,
        key = a.key,
    ))
    .await
}

/// App ← B (http3 listener, mTLS) ← A (http3 cluster), with A's certificate numbered
/// `serial`.
struct Hop {
    pki: Pki,
    app: Backend,
    b: spur_proxy::Proxy,
    b_addr: SocketAddr,
    a: spur_proxy::Proxy,
    a_addr: SocketAddr,
}

async fn hop(tag: &str, serial: u64) -> Hop {
    let pki = Pki::new(tag);
    let app = reporting_app().await;
    let b = proxy_b(&pki, app.addr).await;
    let b_addr = b.listener_addr("inbound").unwrap();
    let a = proxy_a(&pki, "a", serial, b_addr, &id("b")).await;
    let a_addr = a.listener_addr("outbound").unwrap();
    Hop {
        pki,
        app,
        b,
        b_addr,
        a,
        a_addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_to_proxy_over_http3_with_mutual_tls() {
    let Hop {
        pki,
        app: _app,
        b,
        b_addr,
        a,
        a_addr,
    } = hop("h3-hop", 10).await;

    // 50 requests, one QUIC connection; B sees and forwards A's verified identity.
    for i in 0..50 {
        let r = get(a_addr, &format!("/x/{i}"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "GET 0");
        assert_eq!(r.header("x-seen-peer"), Some(id("a").as_str()));
        let host = a_addr.to_string();
        assert_eq!(
            r.header("x-seen-host"),
            Some(host.as_str()),
            "the Host crosses the hop"
        );
    }
    let client = h1_client();
    let req = Request::post(format!("http://{a_addr}/upload"))
        .body(Full::new(Bytes::from(vec![7u8; 300_000])))
        .unwrap();
    let r = send(&client, req).await;
    assert_eq!(r.text(), "POST 300000");
    let a_admin = a.admin_addr().unwrap();
    assert_eq!(
        metric(a_admin, "spur_quic_connections_active", &[("cluster", "b")]).await,
        Some(1.0),
        "the requests share one QUIC connection"
    );
    assert_eq!(
        metric(a_admin, "spur_quic_streams_total", &[("cluster", "b")]).await,
        Some(51.0)
    );
    let b_admin = b.admin_addr().unwrap();
    let client_id = id("a");
    assert_eq!(
        metric(
            b_admin,
            "spur_requests_total",
            &[
                ("listener", "inbound"),
                ("route", "default"),
                ("cluster", "app"),
                ("code", "200"),
                ("client_id", client_id.as_str()),
            ]
        )
        .await,
        Some(51.0),
        "counted with A's verified identity as client_id"
    );

    // A proxy that expects another server identity refuses B: a connect failure, counted.
    let wary = proxy_a(&pki, "a", 11, b_addr, &id("somebody-else")).await;
    let r = get(wary.listener_addr("outbound").unwrap(), "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-spur-error"), Some("upstream_unreachable"));
    assert_eq!(
        metric(
            wary.admin_addr().unwrap(),
            "spur_quic_handshake_errors_total",
            &[("cluster", "b"), ("reason", "identity_not_expected")]
        )
        .await,
        Some(1.0)
    );

    // A peer whose identity B does not allow: its requests are refused with 403.
    let intruder = proxy_a(&pki, "intruder", 12, b_addr, &id("b")).await;
    let r = get(intruder.listener_addr("outbound").unwrap(), "/", &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-spur-error"), Some("forbidden"));

    // A client without a certificate does not get through B's handshake.
    let bare = H3Conn::open(b_addr, client_tls(&pki.ca_path, None)).await;
    let refused = match bare {
        Err(_) => true,
        Ok(c) => c.get("/").await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    assert!(
        eventually(Duration::from_secs(2), || async {
            metric(
                b_admin,
                "spur_quic_handshake_errors_total",
                &[("listener", "inbound"), ("reason", "no_client_cert")],
            )
            .await
                == Some(1.0)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_closed_fallback_http2_keeps_requests_succeeding() {
    let pki = Pki::new("h3-fallback");
    let app = reporting_app().await;
    // B listens on TCP only (HTTP/2 and HTTP/1.1 over mTLS); nothing answers on its UDP port.
    let b_leaf = pki.issue("b", Some(&id("b")), 30);
    let b = start_proxy(&format!(
        r#"
listeners:
  - name: inbound
    listen: 127.0.0.1:0
    tls: {{ cert: {cert}, key: {key}, client_ca: {ca} }}
    cluster: app
clusters:
  - name: app
    endpoints: ["{app}"]
"#,
        cert = b_leaf.cert,
        key = b_leaf.key,
        ca = pki.ca_path,
        app = app.addr,
    ))
    .await;
    let b_addr = b.listener_addr("inbound").unwrap();
    let a_leaf = pki.issue("a", Some(&id("a")), 31);
    let a = start_proxy(&format!(
        r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - name: outbound
    listen: 127.0.0.1:0
    cluster: b
clusters:
  - name: b
    endpoints: ["{b_addr}"]
    protocol: http3
    fallback: http2
    connect_timeout: 300ms
    tls: {{ ca: {ca}, cert: {cert}, key: {key}, expect_identities: ["{b_id}"] }}
"#,
        ca = pki.ca_path,
        cert = a_leaf.cert,
        key = a_leaf.key,
        b_id = id("b"),
    ))
    .await;
    let a_addr = a.listener_addr("outbound").unwrap();

    // A bounded load: 8 workers for 2 s.
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(2);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (ok, failed) = (ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client = h1_client();
            while Instant::now() < until {
                let req = Request::get(format!("http://{a_addr}/")).body(Full::default());
                match client.request(req.unwrap()).await {
                    Ok(r) if r.status() == 200 => {
                        let peer = r.headers().get("x-seen-peer").cloned();
                        let _ = r.into_body().collect().await;
                        assert_eq!(peer.unwrap(), id("a").as_str(), "mTLS on the TCP hop");
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{ok} succeeded");
    assert!(ok > 50, "only {ok} requests in 2 s");
    let admin = a.admin_addr().unwrap();
    assert_eq!(
        metric(admin, "spur_quic_fallback_total", &[("cluster", "b")]).await,
        Some(1.0),
        "one turn to TCP for the one endpoint, kept for the fallback period"
    );
    assert_eq!(
        metric(
            admin,
            "spur_quic_handshake_errors_total",
            &[("cluster", "b"), ("reason", "timeout")]
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_rotation_and_live_http3_listeners() {
    let pki = Pki::new("h3-live");
    let leaf = pki.issue("edge", None, 40);
    let app = named_backend("app").await;
    let yaml = |with_h3: bool| {
        let y = format!(
            r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    alt_svc_h3: 8443
clusters:
  - name: app
    endpoints: ["{app}"]
"#,
            app = app.addr
        );
        let y = if with_h3 {
            y.replace(
                "clusters:",
                &format!(
                    "  - name: h3\n    listen: 127.0.0.1:0\n    protocol: http3\n    tls: {{ cert: {}, key: {} }}\n    cluster: app\nclusters:",
                    leaf.cert, leaf.key
                ),
            )
        } else {
            y
        };
        spur_config::load(&y, Some("t.yaml")).unwrap()
    };
    let proxy = spur_proxy::Proxy::start(yaml(false)).await.unwrap();
    let web = proxy.listener_addr("web").unwrap();
    let r = get(web, "/", &[]).await;
    assert_eq!(r.header("alt-svc"), Some("h3=\":8443\"; ma=86400"));

    // Added live.
    proxy.apply(yaml(true), 2).await.unwrap();
    let h3_addr = proxy.listener_addr("h3").unwrap();
    let conn = H3Conn::open(h3_addr, client_tls(&pki.ca_path, None))
        .await
        .unwrap();
    assert_eq!(conn.server_serial(), vec![40]);
    let (resp, body) = conn.get("/").await.unwrap();
    assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"app"[..]));

    // Rotation: new connections get the new certificate; the open one keeps working.
    let rotated = pki.issue("edge", None, 41);
    assert_eq!(rotated.cert, leaf.cert);
    let fresh = Arc::new(tokio::sync::Mutex::new(None));
    assert!(
        eventually(Duration::from_secs(5), || {
            let tls = client_tls(&pki.ca_path, None);
            let fresh = fresh.clone();
            async move {
                let c = H3Conn::open(h3_addr, tls).await.unwrap();
                let rotated = c.server_serial() == vec![41];
                *fresh.lock().await = Some(c);
                rotated
            }
        })
        .await,
        "new QUIC connections present the rotated certificate"
    );
    let fresh = fresh.lock().await.take().unwrap();
    let (resp, _) = fresh.get("/").await.unwrap();
    assert_eq!(resp.status(), 200);
    let (resp, _) = conn.get("/").await.unwrap();
    assert_eq!(resp.status(), 200, "the established connection carries on");
    drop(conn);

    // Removed live: no handshake any more.
    proxy.apply(yaml(false), 3).await.unwrap();
    assert!(proxy.listener_addr("h3").is_none());
    assert!(
        eventually(Duration::from_secs(5), || async {
            H3Conn::open(h3_addr, client_tls(&pki.ca_path, None))
                .await
                .is_err()
        })
        .await,
        "the removed http3 listener no longer accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_http3_requests_in_flight_finish() {
    let pki = Pki::new("h3-drain");
    let leaf = pki.issue("edge", None, 50);
    let arrived = Arc::new(tokio::sync::Notify::new());
    let seen = arrived.clone();
    let slow = backend(move |_req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            seen.notify_one();
            tokio::time::sleep(Duration::from_millis(400)).await;
            Response::new(Full::new(Bytes::from_static(b"slow")))
        }
    })
    .await;
    let proxy = Arc::new(
        start_proxy(&format!(
            r#"
drain_timeout: 5s
listeners:
  - name: h3
    listen: 127.0.0.1:0
    protocol: http3
    tls: {{ cert: {cert}, key: {key} }}
    cluster: slow
clusters:
  - name: slow
    endpoints: ["{slow}"]
"#,
            cert = leaf.cert,
            key = leaf.key,
            slow = slow.addr,
        ))
        .await,
    );
    let addr = proxy.listener_addr("h3").unwrap();
    let conn = Arc::new(
        H3Conn::open(addr, client_tls(&pki.ca_path, None))
            .await
            .unwrap(),
    );
    let in_flight = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.get("/slow").await })
    };
    // Shut down while the request is at the app.
    tokio::time::timeout(Duration::from_secs(5), arrived.notified())
        .await
        .expect("the request reaches the app");
    let started = Instant::now();
    proxy.shutdown().await;
    let (resp, body) = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"slow"[..]));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited for the request, not for the drain timeout: {:?}",
        started.elapsed()
    );
    assert!(
        H3Conn::open(addr, client_tls(&pki.ca_path, None))
            .await
            .is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_http3_peer_is_reconnected_without_a_failed_request() {
    let Hop {
        pki,
        app,
        b,
        b_addr,
        a,
        a_addr,
    } = hop("h3-restart", 60).await;
    for _ in 0..5 {
        assert_eq!(get(a_addr, "/", &[]).await.status, 200);
    }
    // B goes away (GOAWAY, then its connections close) and comes back on the same port.
    b.shutdown().await;
    drop(b);
    let b2_yaml = proxy_b_yaml(&pki, app.addr, &b_addr.to_string(), 61);
    // The old socket is released when quinn's endpoint driver notices it is gone.
    let mut b2 = None;
    for _ in 0..50 {
        let cfg = spur_config::load(&b2_yaml, Some("b2.yaml")).unwrap();
        match spur_proxy::Proxy::start(cfg).await {
            Ok(p) => {
                b2 = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let _b2 = b2.expect("B comes back on its port");
    // 20 requests at once: they share one new connection.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(async move { get(a_addr, "/", &[]).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "request {i} after the restart: {}", r.text());
    }
    let admin = a.admin_addr().unwrap();
    assert_eq!(
        metric(admin, "spur_quic_connections_active", &[("cluster", "b")]).await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_ends_when_quic_works_again() {
    let pki = Pki::new("h3-recover");
    let app = reporting_app().await;
    let b_leaf = pki.issue("b", Some(&id("b")), 70);
    let b_yaml = |port: u16, with_h3: bool| {
        let tls = format!(
            "{{ cert: {}, key: {}, client_ca: {} }}",
            b_leaf.cert, b_leaf.key, pki.ca_path
        );
        let mut y = format!(
            r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - name: inbound-tcp
    listen: 127.0.0.1:{port}
    tls: {tls}
    cluster: app
"#
        );
        if with_h3 {
            y.push_str(&format!(
                "  - name: inbound-h3\n    listen: 127.0.0.1:{port}\n    protocol: http3\n    tls: {tls}\n    cluster: app\n"
            ));
        }
        y.push_str(&format!(
            "clusters:\n  - name: app\n    endpoints: [\"{}\"]\n",
            app.addr
        ));
        spur_config::load(&y, Some("b.yaml")).unwrap()
    };
    // B starts with TCP only: A's QUIC handshakes time out and it falls back.
    // Both held until B binds them: UDP for seconds, while B has no http3 listener yet.
    let (held, udp) = h3c::tcp_and_udp_port();
    let port = held.port();
    let b = spur_proxy::Proxy::start(b_yaml(port, false)).await.unwrap();
    let a_leaf = pki.issue("a", Some(&id("a")), 71);
    let a = spawn_spur_env(
        &format!(
            r#"
admin: {{ listen: 127.0.0.1:0 }}
listeners:
  - name: outbound
    listen: 127.0.0.1:0
    cluster: b
clusters:
  - name: b
    endpoints: ["127.0.0.1:{port}"]
    protocol: http3
    fallback: http2
    connect_timeout: 300ms
    tls: {{ ca: {ca}, cert: {cert}, key: {key}, expect_identities: ["{b_id}"] }}
"#,
            ca = pki.ca_path,
            cert = a_leaf.cert,
            key = a_leaf.key,
            b_id = id("b"),
        ),
        &[("SPUR_QUIC_FALLBACK_PERIOD", "1s")],
        1,
    );
    let a_addr = a.listeners["outbound"];
    let a_admin = a.admin.unwrap();

    // Steady traffic through A for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let client = h1_client();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let req = Request::get(format!("http://{a_addr}/")).body(Full::default());
                match client.request(req.unwrap()).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(a_admin, "spur_quic_fallback_total", &[("cluster", "b")]).await == Some(1.0)
        })
        .await,
        "A falls back to TCP"
    );
    // A fallback period passes with QUIC still failing: the background probe's handshake
    // times out too (a second timeout after the first), and requests stay on TCP. Then
    // B's UDP port opens.
    let timeouts = || async {
        metric(
            a_admin,
            "spur_quic_handshake_errors_total",
            &[("cluster", "b"), ("reason", "timeout")],
        )
        .await
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            timeouts().await >= Some(2.0)
        })
        .await,
        "no probe was made after the fallback period: {:?} handshake timeouts",
        timeouts().await
    );
    drop(udp);
    b.apply(b_yaml(port, true), 2).await.unwrap();
    let b_admin = b.admin_addr().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                b_admin,
                "spur_quic_streams_total",
                &[("listener", "inbound-h3")],
            )
            .await
                > Some(10.0)
        })
        .await,
        "after a period, a background handshake succeeds and requests take QUIC again"
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{ok} succeeded");
    assert_eq!(
        metric(a_admin, "spur_quic_fallback_total", &[("cluster", "b")]).await,
        Some(1.0),
        "failed probes keep the endpoint on TCP without counting a new fallback"
    );
    assert_eq!(
        metric(a_admin, "spur_quic_connections_active", &[("cluster", "b")]).await,
        Some(1.0)
    );
}
