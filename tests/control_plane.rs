//! End-to-end: the control plane's API, persistence and auth, and proxies that follow it
//! live (no restart, no failed request).

mod common;

use common::*;
use spur_proxy::reload::{spawn_control, ControlSource};
use spur_proxy::Proxy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn two_backend_config(
    listen: &str,
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    weight_a: u32,
    weight_b: u32,
) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: "{listen}"
    routes:
      - name: split
        match: {{ path_prefix: / }}
        split: [{{ cluster: a, weight: {weight_a} }}, {{ cluster: b, weight: {weight_b} }}]
clusters:
  - {{ name: a, endpoints: ["{a}"] }}
  - {{ name: b, endpoints: ["{b}"] }}
"#
    )
}

async fn watching_proxy(
    control: std::net::SocketAddr,
    node: &str,
    group: &str,
    token: Option<&str>,
) -> Arc<Proxy> {
    let proxy = Arc::new(Proxy::idle().unwrap());
    spawn_control(
        proxy.clone(),
        ControlSource {
            client: spur_proxy::control_client::client(None).expect("a control client"),
            url: format!("http://{control}"),
            node: node.into(),
            group: group.into(),
            token: token.map(str::to_string),
        },
    );
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_validates_stores_versions_and_rolls_back() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    let a = named_backend("a").await;
    let b = named_backend("b").await;

    let (s, v) = call(c, "GET", "/v1/groups/shop/config", None, None).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 1, 0)),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(1)), "{v}");

    // Invalid: 400 with every error and its path; nothing stored.
    let bad = r#"{"listeners":[{"name":"web","listen":"nope","routes":[{"cluster":"missing"}]}]}"#;
    let (s, v) = call(c, "PUT", "/v1/groups/shop/config", Some(bad), None).await;
    assert_eq!(s, 400);
    let errs = v["errors"].as_array().unwrap();
    let paths: Vec<&str> = errs.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(
        paths.contains(&"listeners[0].listen") && paths.contains(&"listeners[0].routes[0].cluster"),
        "{v}"
    );
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some("listeners: [ {name: x"),
        None,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (_, v) = call(c, "GET", "/v1/groups/shop/config", None, None).await;
    assert_eq!(v["version"], 1);

    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 0, 1)),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)));
    let (_, h) = call(c, "GET", "/v1/groups/shop/history", None, None).await;
    let versions: Vec<u64> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![2, 1]);

    let (s, v) = call(
        c,
        "POST",
        "/v1/groups/shop/rollback",
        Some(r#"{"version": 1}"#),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(3)));
    let (_, v3) = call(c, "GET", "/v1/groups/shop/config", None, None).await;
    let (_, h) = call(c, "GET", "/v1/groups/shop/history", None, None).await;
    assert_eq!(
        v3["config"], h["versions"][2]["config"],
        "version 3 is version 1's config"
    );
    assert_eq!(h["versions"][0]["action"], "rollback to 1");
    let (s, _) = call(
        c,
        "POST",
        "/v1/groups/shop/rollback",
        Some(r#"{"version": 99}"#),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = call(c, "GET", "/v1/groups/..%2Fetc/config", None, None).await;
    assert_eq!(s, 400);
    let (s, _) = call(c, "DELETE", "/v1/groups/shop/config", None, None).await;
    assert_eq!(s, 404);
    let (s, _) = call(c, "GET", "/healthz", None, None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_changes_nothing() {
    let (cp, _dir) = start_control(Some("s3cret")).await;
    let c = cp.addr;
    let a = named_backend("a").await;
    let cfg = two_backend_config("127.0.0.1:0", a.addr, a.addr, 1, 1);
    let (s, v) = call(c, "PUT", "/v1/groups/g/config", Some(&cfg), Some("s3cret")).await;
    assert_eq!(s, 200, "{v}");
    let writes: [(&str, &str, Option<&str>); 5] = [
        ("PUT", "/v1/groups/g/config", Some(cfg.as_str())),
        ("POST", "/v1/groups/g/rollback", Some(r#"{"version": 1}"#)),
        (
            "PATCH",
            "/v1/groups/g/flags/f",
            Some(r#"{"enabled": true}"#),
        ),
        (
            "POST",
            "/v1/groups/g/proxies/n1/status",
            Some(r#"{"applied_version": 1}"#),
        ),
        ("GET", "/v1/groups/g/watch?after=0", None),
    ];
    for (method, path, body) in writes {
        for token in [None, Some("wrong"), Some("s3cret-but-longer")] {
            let (s, v) = call(c, method, path, body, token).await;
            assert_eq!(s, 401, "{method} {path} with {token:?}: {v}");
        }
    }
    let (s, v) = call(c, "GET", "/v1/groups/g/history", None, Some("s3cret")).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["versions"].as_array().unwrap().len(),
        1,
        "nothing was written"
    );
    let (_, v) = call(c, "GET", "/v1/proxies", None, Some("s3cret")).await;
    assert_eq!(v, serde_json::json!([]));
    assert_eq!(call(c, "GET", "/healthz", None, None).await.0, 200);
    assert_eq!(call(c, "GET", "/metrics", None, None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_pushes_without_failing_a_request() {
    let (cp, _dir) = start_control(Some("tok")).await;
    let c = cp.addr;
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    // A port for the listener so every version can name it (held: it must not be taken
    // before the proxy binds it).
    let held = reserved_port();
    let listen = held.addr.to_string();
    let (s, _) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&two_backend_config(&listen, a.addr, b.addr, 1, 0)),
        Some("tok"),
    )
    .await;
    assert_eq!(s, 200);
    let proxy = watching_proxy(c, "p1", "shop", Some("tok")).await;
    let web = applied(&proxy, 1, "web").await;

    // Steady load while 100 pushes alternate the split between a and b.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let client = h1_client();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let req = http::Request::get(format!("http://{web}/"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let started = Instant::now();
    let mut apply_ms = Vec::new();
    // Pushes during which no request of the load completed.
    let mut unloaded = Vec::new();
    for i in 0..100u64 {
        let (wa, wb) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
        let ok_before = ok.load(Ordering::Relaxed);
        let t = Instant::now();
        let (s, v) = call(
            c,
            "PUT",
            "/v1/groups/shop/config",
            Some(&two_backend_config(&listen, a.addr, b.addr, wa, wb)),
            Some("tok"),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let version = v["version"].as_u64().unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                proxy.version() == version
            })
            .await
        );
        apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // The traffic share follows the push.
        let want = if wa == 1 { "a" } else { "b" };
        assert_eq!(get(web, "/", &[]).await.text(), want, "after push {i}");
        // Spread the pushes over at least 10 s of load.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if ok.load(Ordering::Relaxed) == ok_before {
            unloaded.push(i);
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let rate = ok as f64 / elapsed.as_secs_f64();
    apply_ms.sort_by(|x, y| x.partial_cmp(y).unwrap());
    eprintln!(
        "100 pushes under load: {ok} ok, {failed} failed, {rate:.0} req/s over {elapsed:?}; PUT->applied p50 {:.1} ms p99 {:.1} ms",
        apply_ms[50], apply_ms[98]
    );
    assert_eq!(failed, 0);
    assert!(
        unloaded.is_empty(),
        "pushes with no request completing around them: {unloaded:?}"
    );
    assert!(rate >= 500.0, "load was only {rate:.0} req/s");

    // The proxy reported what it applied.
    let (_, proxies) = call(c, "GET", "/v1/proxies", None, Some("tok")).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            call(c, "GET", "/v1/proxies", None, Some("tok")).await.1[0]["applied_version"] == 101
        })
        .await,
        "{proxies}"
    );
    proxy.shutdown().await;
}

/// Whoever sees a version finds its listeners' addresses: [`Proxy::listener_addr`] is
/// updated before [`Proxy::version`]. An observer thread reads both as fast as it can
/// while 300 configs are applied, each adding a listener named after its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_is_published_with_its_listener_addresses() {
    let app = named_backend("app").await;
    let yaml = |v: u64| {
        // This version's listener, and the previous version's (kept one version longer, so
        // that an observer a version behind still finds it).
        let mut listeners =
            format!("  - {{ name: l{v}, listen: \"127.0.0.1:0\", cluster: app }}\n");
        if v > 0 {
            listeners.push_str(&format!(
                "  - {{ name: l{}, listen: \"127.0.0.1:0\", cluster: app }}\n",
                v - 1
            ));
        }
        format!(
            "listeners:\n{listeners}clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
            app.addr
        )
    };
    let proxy = Arc::new(
        Proxy::start(spur_config::load(&yaml(0), None).unwrap())
            .await
            .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut missing = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let v = proxy.version();
                let addr = proxy.listener_addr(&format!("l{v}"));
                // Only a read within one version counts (a descheduled observer may
                // wake up two versions later, when l{v} is gone).
                if addr.is_none() && proxy.version() == v && missing.last() != Some(&v) {
                    missing.push(v);
                }
            }
            missing
        })
    };
    for v in 1..=300 {
        proxy
            .apply(spur_config::load(&yaml(v), None).unwrap(), v)
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let missing = observer.join().unwrap();
    assert!(
        missing.is_empty(),
        "versions seen before their listener's address: {missing:?}"
    );
    proxy.shutdown().await;
}

/// A replaced config is freed: no compiled snapshot outlives its version (with no
/// request holding it), whatever kept per-endpoint state carries over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_configs_are_freed() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let proxy = Proxy::start(
        spur_config::load(
            &two_backend_config("127.0.0.1:0", a.addr, b.addr, 1, 0),
            None,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let web = proxy.listener_addr("web").unwrap();
    let mut old = Vec::new();
    for v in 1..=100u64 {
        old.push(Arc::downgrade(&proxy.shared.snapshot.load_full()));
        let (wa, wb) = if v % 2 == 0 { (1, 0) } else { (0, 1) };
        let cfg = two_backend_config("127.0.0.1:0", a.addr, b.addr, wa, wb);
        proxy
            .apply(spur_config::load(&cfg, None).unwrap(), v)
            .await
            .unwrap();
        assert_eq!(get(web, "/", &[]).await.status, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            old.iter().all(|w| w.upgrade().is_none())
        })
        .await,
        "{} of 100 replaced snapshots still alive",
        old.iter().filter(|w| w.upgrade().is_some()).count()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_proxy_cannot_apply_is_reported_and_the_old_one_stays() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    call(
        c,
        "PUT",
        "/v1/groups/g/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 1, 0)),
        None,
    )
    .await;
    let proxy = watching_proxy(c, "edge-1", "g", None).await;
    let web = applied(&proxy, 1, "web").await;

    // Valid on the control plane, but the port is taken on the proxy's machine.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/g/config",
        Some(&two_backend_config(&taken_addr, a.addr, b.addr, 0, 1)),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)));
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, v) = call(c, "GET", "/v1/proxies", None, None).await;
            v[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("version 2 rejected") && e.contains(&taken_addr))
        })
        .await,
        "{}",
        call(c, "GET", "/v1/proxies", None, None).await.1
    );
    let (_, v) = call(c, "GET", "/v1/proxies", None, None).await;
    assert_eq!(v[0]["node"], "edge-1");
    assert_eq!(v[0]["group"], "g");
    assert_eq!(v[0]["applied_version"], 1);
    assert_eq!(proxy.version(), 1);
    assert_eq!(
        get(web, "/", &[]).await.text(),
        "a",
        "still serving version 1"
    );
    let admin = proxy.admin_addr().unwrap();
    assert_eq!(
        metric(
            admin,
            "spur_config_updates_total",
            &[("result", "rejected")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(metric(admin, "spur_config_version", &[]).await, Some(1.0));

    // A later good version applies and clears the error.
    drop(taken);
    let (_, v) = call(
        c,
        "PUT",
        "/v1/groups/g/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 0, 1)),
        None,
    )
    .await;
    let v3 = v["version"].as_u64().unwrap();
    assert!(eventually(Duration::from_secs(5), || async { proxy.version() == v3 }).await);
    assert!(
        eventually(Duration::from_secs(3), || async {
            call(c, "GET", "/v1/proxies", None, None).await.1[0]["last_error"].is_null()
        })
        .await
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_changes_apply_live_and_open_streams_survive() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    // A WebSocket echo backend.
    let ws_backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = ws_backend.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = ws_backend.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let app = named_backend("app").await;
    let config = |extra_port: Option<u16>, n: u32| {
        let extra = extra_port
            .map(|p| format!("  - {{ name: extra, listen: \"127.0.0.1:{p}\", cluster: app }}\n"))
            .unwrap_or_default();
        format!(
            "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: ws }}\n{extra}clusters:\n  - {{ name: ws, endpoints: [\"{ws_addr}\"] }}\n  - {{ name: app, endpoints: [\"{}\"], connect_timeout: {}ms }}\n",
            app.addr,
            1000 + n
        )
    };
    call(
        c,
        "PUT",
        "/v1/groups/g/config",
        Some(&config(None, 0)),
        None,
    )
    .await;
    let proxy = watching_proxy(c, "n", "g", None).await;
    let web = applied(&proxy, 1, "web").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{web}/chat"))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    // Held for the test: free every other push, when it would be anyone's to take.
    let extra_held = reserved_port();
    let extra_port = extra_held.port();
    for n in 1..=20u32 {
        // Every other push adds or removes a listener on another port.
        let extra = (n % 2 == 1).then_some(extra_port);
        let (s, v) = call(
            c,
            "PUT",
            "/v1/groups/g/config",
            Some(&config(extra, n)),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let version = v["version"].as_u64().unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                proxy.version() == version
            })
            .await
        );
        let extra_addr: std::net::SocketAddr = format!("127.0.0.1:{extra_port}").parse().unwrap();
        if extra.is_some() {
            assert_eq!(
                get(extra_addr, "/", &[]).await.text(),
                "app",
                "new listener serves at once"
            );
        } else {
            assert!(
                eventually(Duration::from_secs(3), || async {
                    tokio::net::TcpStream::connect(extra_addr).await.is_err()
                })
                .await,
                "removed listener stops accepting"
            );
        }
        let msg = format!("during push {n}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(msg));
    }
    ws.close(None).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reconnects_after_the_control_plane_restarts() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let dir = temp_dir("restart");
    // A restart on the same address: the stopped control plane's tasks are aborted, and its
    // listener closes once the runtime drops them, which may be a moment after `stop`
    // returns (another worker thread), so the bind is tried again until then.
    let start = |listen: std::net::SocketAddr| {
        let dir = dir.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let opts = spur_control::Options {
                    listen,
                    data_dir: dir.clone(),
                    token: None,
                    ca: None,
                    kubernetes: None,
                    ..Default::default()
                };
                match spur_control::start(opts).await {
                    Ok(cp) => break cp,
                    Err(spur_control::StartError::Bind { source, .. })
                        if source.kind() == std::io::ErrorKind::AddrInUse
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("control plane on {listen}: {e}"),
                }
            }
        }
    };
    let cp = start("127.0.0.1:0".parse().unwrap()).await;
    let addr = cp.addr;
    call(
        addr,
        "PUT",
        "/v1/groups/g/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 1, 0)),
        None,
    )
    .await;
    let proxy = watching_proxy(addr, "n", "g", None).await;
    let web = applied(&proxy, 1, "web").await;
    cp.stop();
    drop(cp);
    // The proxy keeps serving while the control plane is away.
    for _ in 0..5 {
        assert_eq!(get(web, "/", &[]).await.text(), "a");
    }
    let cp = start(addr).await;
    let (_, v) = call(
        addr,
        "PUT",
        "/v1/groups/g/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 0, 1)),
        None,
    )
    .await;
    assert_eq!(v["version"], 2, "versions continue from the stored ones");
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || async { proxy.version() == 2 }).await,
        "converged within 5 s"
    );
    eprintln!("reconnected and converged in {:?}", t.elapsed());
    drop(cp);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_proxies_apply_each_push_quickly() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    call(
        c,
        "PUT",
        "/v1/groups/fleet/config",
        Some(&two_backend_config("127.0.0.1:0", a.addr, b.addr, 1, 0)),
        None,
    )
    .await;
    let mut proxies = Vec::new();
    for i in 0..10 {
        proxies.push(watching_proxy(c, &format!("p{i}"), "fleet", None).await);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxies.iter().all(|p| p.version() == 1)
        })
        .await
    );
    let mut lat = Vec::new();
    for i in 0..30u32 {
        let cfg = two_backend_config("127.0.0.1:0", a.addr, b.addr, 1 + i % 2, 1);
        let t = Instant::now();
        let (_, v) = call(c, "PUT", "/v1/groups/fleet/config", Some(&cfg), None).await;
        let version = v["version"].as_u64().unwrap();
        // Each proxy's time from PUT accepted to applied.
        let mut pending: Vec<usize> = (0..10).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&k| {
                if proxies[k].version() >= version {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    false
                } else {
                    true
                }
            });
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            pending.is_empty(),
            "proxies {pending:?} did not apply version {version}"
        );
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let p99 = lat[lat.len() * 99 / 100];
    eprintln!(
        "PUT accepted -> applied on 10 proxies: p50 {:.1} ms, p99 {:.1} ms ({} samples)",
        lat[lat.len() / 2],
        p99,
        lat.len()
    );
    assert!(p99 < 1000.0);
    for p in proxies {
        p.shutdown().await;
    }
}
