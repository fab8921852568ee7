//! End-to-end: live traffic and tap (issue 16). Two proxies of a group report their
//! traffic to a control plane; `GET .../traffic` shows the group's numbers merged, `GET
//! .../tap` streams sampled requests (filtered, rate-limited, without header values), the
//! proxies sample only while someone taps, and `spur top` / `spur tap` show the same.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use spur_proxy::reload::{spawn_control, ControlSource};
use spur_proxy::Proxy;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "console-secret";

fn group_config(ok: SocketAddr, bad: SocketAddr, weight_bad: u32) -> String {
    format!(
        r#"
listeners:
  - name: web
    listen: "127.0.0.1:0"
    routes:
      - name: checkout
        match: {{ path_prefix: /checkout }}
        split: [{{ cluster: v1, weight: 50 }}, {{ cluster: v2, weight: {weight_bad} }}]
      - name: api
        match: {{ path_prefix: /api }}
        cluster: v1
clusters:
  - {{ name: v1, endpoints: ["{ok}"] }}
  - {{ name: v2, endpoints: ["{bad}"] }}
"#
    )
}

fn watching(control: SocketAddr, node: &str) -> Arc<Proxy> {
    let proxy = Arc::new(Proxy::idle().unwrap());
    spawn_control(
        proxy.clone(),
        ControlSource {
            client: spur_proxy::control_client::client(None).expect("a control client"),
            url: format!("http://{control}"),
            node: node.into(),
            group: "shop".into(),
            token: Some(TOKEN.into()),
        },
    );
    proxy
}

/// A backend answering 200, and one answering 500 (`v2`, the broken canary).
async fn backends() -> (Backend, Backend) {
    let ok = backend(|_req: Request<Incoming>| async {
        Response::new(Full::new(Bytes::from_static(b"ok")))
    })
    .await;
    let bad = backend(|_req: Request<Incoming>| async {
        Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"broken")))
            .unwrap()
    })
    .await;
    (ok, bad)
}

/// The group's routes in `GET .../traffic`, by (route, cluster): total requests and the
/// live success rate.
async fn totals(c: SocketAddr) -> Vec<(String, String, u64, serde_json::Value)> {
    let (s, v) = call(
        c,
        "GET",
        "/v1/groups/shop/traffic?window=5m",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["route"].as_str().unwrap().to_string(),
                r["cluster"].as_str().unwrap().to_string(),
                r["total"]["requests"].as_u64().unwrap(),
                r.clone(),
            )
        })
        .collect()
}

/// Reads NDJSON lines from a streaming body until `enough` says so or `within` passes.
async fn read_lines(
    body: &mut Incoming,
    within: Duration,
    mut enough: impl FnMut(&[serde_json::Value]) -> bool,
) -> (Vec<serde_json::Value>, String) {
    let deadline = Instant::now() + within;
    let mut raw = String::new();
    let mut lines = Vec::new();
    while !enough(&lines) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(Ok(frame))) = tokio::time::timeout(left, body.frame()).await else {
            break;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        raw.push_str(&String::from_utf8_lossy(&data));
        let complete = &raw[..raw.rfind('\n').map_or(0, |i| i + 1)];
        lines = complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("each tap line is JSON"))
            .collect();
    }
    (lines, raw)
}

async fn open_tap(c: SocketAddr, query: &str) -> Incoming {
    let req = Request::get(format!("http://{c}/v1/groups/shop/tap?{query}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h1_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/x-ndjson",
        "a stream of JSON lines"
    );
    resp.into_body()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_and_tap_of_a_group_through_two_proxies() {
    let (cp, _dir) = start_control(Some(TOKEN)).await;
    let c = cp.addr;
    let (ok, bad) = backends().await;
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&group_config(ok.addr, bad.addr, 50)),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let proxies = [watching(c, "p1"), watching(c, "p2")];
    let mut addrs = Vec::new();
    for p in &proxies {
        addrs.push(applied(p, 1, "web").await);
    }

    traffic_counts_every_request_once(c, &addrs).await;
    tap_samples_matching_requests_while_watched(c, &proxies, &addrs, bad.addr).await;
    tap_keeps_the_rate(c, &proxies, &addrs).await;

    // A wrong token sees neither.
    for path in ["/v1/groups/shop/traffic", "/v1/groups/shop/tap"] {
        let (s, _) = call(c, "GET", path, None, Some("wrong")).await;
        assert_eq!(s, 401, "{path}");
    }

    the_cli_shows_the_same(c, &addrs).await;
}

/// `GET .../traffic` counts every request of both proxies once, per split side, with its
/// success rate and latency.
async fn traffic_counts_every_request_once(c: SocketAddr, addrs: &[SocketAddr]) {
    for addr in addrs {
        for i in 0..60 {
            get(*addr, &format!("/checkout/{i}"), &[]).await;
            assert_eq!(get(*addr, "/api/items", &[]).await.status, 200);
        }
    }
    let merged = eventually(Duration::from_secs(10), || async {
        let t = totals(c).await;
        let checkout: u64 = t.iter().filter(|r| r.0 == "checkout").map(|r| r.2).sum();
        let api: u64 = t.iter().filter(|r| r.0 == "api").map(|r| r.2).sum();
        checkout == 120 && api == 120
    })
    .await;
    assert!(
        merged,
        "every request of both proxies counted once: {:?}",
        totals(c).await
    );
    let t = totals(c).await;
    let side = |cluster: &str| {
        t.iter()
            .find(|r| r.0 == "checkout" && r.1 == cluster)
            .unwrap()
    };
    let (v1, v2) = (side("v1"), side("v2"));
    assert!(
        v1.2 > 20 && v2.2 > 20,
        "both split sides carry traffic: {} / {}",
        v1.2,
        v2.2
    );
    assert_eq!(v1.3["side"], 0);
    assert_eq!(v2.3["side"], 1);
    assert_eq!(v1.3["total"]["success_rate"], 1.0);
    assert_eq!(
        v2.3["total"]["success_rate"], 0.0,
        "the broken side fails every request"
    );
    assert!(v1.3["total"]["p99_ms"].as_f64().unwrap() > 0.0);
    let (_, doc) = call(c, "GET", "/v1/groups/shop/traffic", None, Some(TOKEN)).await;
    assert_eq!(
        (doc["window_s"].as_u64(), doc["step_s"].as_u64()),
        (Some(900), Some(10))
    );
    let series = doc["routes"][0]["series"].as_array().unwrap();
    assert_eq!(series.len(), 90, "15 minutes in 10 s steps");
    let moved: u64 = series.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
    assert!(moved > 0, "the newest steps hold the requests");
    let clusters: Vec<&str> = doc["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cluster"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, ["v1", "v2"]);
    assert_eq!(doc["clusters"][0]["endpoints"], 1);
    assert_eq!(doc["clusters"][0]["ejected"], 0);
}

/// Tap: sampling starts with a watcher and stops when it leaves; lines match its filter and
/// carry no header value and no query.
async fn tap_samples_matching_requests_while_watched(
    c: SocketAddr,
    proxies: &[Arc<Proxy>],
    addrs: &[SocketAddr],
    bad: SocketAddr,
) {
    assert!(proxies.iter().all(|p| !p.shared.tap.is_on()));
    let mut tap = open_tap(c, "route=checkout&status=5xx").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxies.iter().all(|p| p.shared.tap.is_on())
        })
        .await,
        "a tap turns sampling on in every proxy of the group"
    );
    let sender = {
        let addrs = addrs.to_vec();
        tokio::spawn(async move {
            for i in 0..40 {
                for addr in &addrs {
                    get(*addr, "/api/skip", &[]).await;
                    get(
                        *addr,
                        &format!("/checkout/x{i}?card=4111-secret"),
                        &[("x-secret", "hunter2-header"), ("x-user-group", "beta")],
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (lines, raw) = read_lines(&mut tap, Duration::from_secs(10), |ls| {
        ["p1", "p2"]
            .iter()
            .all(|n| ls.iter().any(|l| l["node"] == *n))
            && ls.len() >= 6
    })
    .await;
    sender.await.unwrap();
    assert!(
        ["p1", "p2"]
            .iter()
            .all(|n| lines.iter().any(|l| l["node"] == *n)),
        "lines from both proxies: {raw}"
    );
    for l in &lines {
        assert_eq!(l["route"], "checkout", "the route filter holds: {l}");
        assert_eq!(l["status"], 500, "the status filter holds: {l}");
        assert_eq!(l["cluster"], "v2");
        assert_eq!(l["split"], 1);
        assert_eq!(l["method"], "GET");
        assert!(l["path"].as_str().unwrap().starts_with("/checkout/x"));
        assert_eq!(l["endpoint"], bad.to_string());
        assert_eq!(l["attempts"], 1);
        assert!(l["duration_ms"].as_f64().unwrap() > 0.0);
        for field in ["ts", "grpc_status", "flags", "error"] {
            assert!(l.get(field).is_some(), "{field} in {l}");
        }
    }
    for secret in ["hunter2", "card", "4111", "beta"] {
        assert!(
            !raw.contains(secret),
            "no header value and no query in tap lines: {raw}"
        );
    }

    // The tapper leaves: the proxies stop sampling.
    drop(tap);
    assert!(
        eventually(Duration::from_secs(8), || async {
            proxies.iter().all(|p| !p.shared.tap.is_on())
        })
        .await,
        "sampling stops when nobody watches"
    );
}

/// At most 100 lines a second per proxy, kept by the proxy itself.
async fn tap_keeps_the_rate(c: SocketAddr, proxies: &[Arc<Proxy>], addrs: &[SocketAddr]) {
    let mut tap = open_tap(c, "").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxies[0].shared.tap.is_on()
        })
        .await
    );
    // At least 1.5 s of requests, and (for up to 10 s on a busy machine) enough of them
    // that a proxy that tapped every one would go over the bound below.
    let bound = |elapsed: Duration| 100 * (elapsed.as_secs_f64().ceil() as usize + 1);
    let burst = Instant::now();
    let mut sent = 0usize;
    while burst.elapsed() < Duration::from_millis(1500)
        || (sent <= bound(burst.elapsed()) + 100 && burst.elapsed() < Duration::from_secs(10))
    {
        let reqs: Vec<_> = (0..20).map(|_| get(addrs[0], "/api/burst", &[])).collect();
        futures_util::future::join_all(reqs).await;
        sent += 20;
    }
    let took = burst.elapsed();
    let secs = took.as_secs_f64().ceil() as usize;
    let (lines, _) = read_lines(&mut tap, Duration::from_secs(3), |_| false).await;
    let burst_lines = lines.iter().filter(|l| l["path"] == "/api/burst").count();
    eprintln!("the burst: {sent} requests in {took:?}, {burst_lines} tapped");
    assert!(
        sent > bound(took),
        "the burst sent {sent} requests in {secs} s: too few to test the rate"
    );
    assert!(burst_lines > 0, "some lines arrive");
    assert!(
        burst_lines <= 100 * (secs + 1),
        "{burst_lines} lines of {sent} requests in {secs} s: more than 100/s"
    );
    // The proxy kept the rate itself: the control plane's own cap dropped nothing.
    let scraped = get(c, "/metrics", &[]).await.text();
    assert_eq!(
        metric_in(&scraped, "spur_control_tap_lines_over_rate_total", &[]),
        Some(0.0),
        "a proxy sent more than 100 lines a second"
    );
    assert!(metric_in(&scraped, "spur_control_tap_lines_total", &[]) >= Some(burst_lines as f64));
    drop(tap);
}

/// `spur top` prints the same figures, `spur tap` the same lines; without the token, 401.
async fn the_cli_shows_the_same(c: SocketAddr, addrs: &[SocketAddr]) {
    let dir = temp_dir("top");
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let url = format!("http://{c}");
    let top = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["top", "--control", &url, "--group", "shop", "--once"])
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(text.contains("ROUTE") && text.contains("EJECTED"), "{text}");
    let row = |route: &str, cluster: &str| {
        text.lines()
            .find(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 2 && w[0] == route && w[1] == cluster
            })
            .unwrap_or_else(|| panic!("no {route}/{cluster} row in:\n{text}"))
            .to_string()
    };
    assert!(row("checkout", "v2").contains("0.00%"), "{text}");
    assert!(row("api", "v1").contains("100.00%"), "{text}");
    let top = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["top", "--control", &url, "--group", "shop", "--once"])
        .output()
        .unwrap();
    assert_eq!(top.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&top.stderr).contains("401"));

    let mut spur_tap = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "tap",
            "--control",
            &url,
            "--group",
            "shop",
            "--route",
            "checkout",
        ])
        .args(["--status", "5xx", "--count", "3", "--token-file"])
        .arg(&token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sending = Instant::now();
    while spur_tap.try_wait().unwrap().is_none() && sending.elapsed() < Duration::from_secs(15) {
        get(addrs[1], "/checkout/cli", &[]).await;
        get(addrs[1], "/api/cli", &[]).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let _ = spur_tap.kill();
    let out = spur_tap.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in &lines {
        assert_eq!(
            (l["route"].as_str(), l["status"].as_u64()),
            (Some("checkout"), Some(500))
        );
        assert_eq!(l["node"], "p2");
    }
}

/// The console's own calls: groups, the diff of two versions, a dry run that stores
/// nothing, the config as YAML; and the security headers on every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_diff_dry_run_and_security_headers() {
    let (cp, _dir) = start_control(Some(TOKEN)).await;
    let c = cp.addr;
    let (ok, bad) = backends().await;
    let put = |yaml: String, query: &'static str| async move {
        call(
            c,
            "PUT",
            &format!("/v1/groups/shop/config{query}"),
            Some(&yaml),
            Some(TOKEN),
        )
        .await
    };
    assert_eq!(put(group_config(ok.addr, bad.addr, 50), "").await.0, 200);
    assert_eq!(put(group_config(ok.addr, bad.addr, 5), "").await.0, 200);

    let (s, v) = call(
        c,
        "GET",
        "/v1/groups/shop/diff?from=1&to=2",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let diff = v["diff"].as_str().unwrap();
    assert!(
        diff.starts_with("--- shop version 1\n+++ shop version 2\n@@ "),
        "{diff}"
    );
    let changed: Vec<String> = diff
        .lines()
        .skip(2)
        .filter(|l| l.starts_with('-') || l.starts_with('+'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(changed, ["- weight: 50", "+ weight: 5"], "{diff}");
    let (s, v) = call(
        c,
        "GET",
        "/v1/groups/shop/diff?from=1&to=9",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!((s, v["errors"][0]["path"].as_str()), (404, Some("to")));
    let (s, _) = call(
        c,
        "GET",
        "/v1/groups/shop/diff?from=x&to=2",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 400);

    // Dry run: errors at their paths, or a summary; nothing stored either way.
    let broken = group_config(ok.addr, bad.addr, 50).replace("cluster: v1\n", "cluster: nope\n");
    let (s, v) = put(broken, "?dry_run=true").await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        v["errors"][0]["path"], "listeners[0].routes[1].cluster",
        "{v}"
    );
    let (s, v) = put(group_config(ok.addr, bad.addr, 70), "?dry_run=true").await;
    assert_eq!((s, v["valid"].as_bool()), (200, Some(true)), "{v}");
    let (_, v) = call(
        c,
        "GET",
        "/v1/groups/shop/config?format=yaml",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(v["version"], 2, "a dry run stores nothing");
    assert!(v["yaml"].as_str().unwrap().contains("weight: 5\n"), "{v}");

    let (s, v) = call(c, "GET", "/v1/groups", None, Some(TOKEN)).await;
    assert_eq!(s, 200);
    assert_eq!(v["groups"][0]["group"], "shop");
    assert_eq!(v["groups"][0]["version"], 2);
    let (s, _) = call(c, "GET", "/v1/groups", None, None).await;
    assert_eq!(s, 401, "the console's data needs the token");

    // The page itself is open (it holds no data) and every answer carries the CSP.
    for (path, token, status, kind) in [
        ("/ui", None, 200, "text/html"),
        ("/ui/app.js", None, 200, "text/javascript"),
        ("/ui/app.css", None, 200, "text/css"),
        ("/v1/groups", Some(TOKEN), 200, "application/json"),
        ("/v1/groups", None, 401, "application/json"),
        ("/ui/nope", None, 404, "application/json"),
    ] {
        let mut req = Request::get(format!("http://{c}{path}"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let a = send(&h1_client(), req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(a.status, status, "{path}");
        assert!(
            a.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        let csp = a.header("content-security-policy").unwrap_or("");
        assert!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self'")
                && !csp.contains("unsafe-inline"),
            "{path}: {csp}"
        );
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("x-frame-options"), Some("DENY"));
    }
    let page = get(c, "/ui", &[]).await.text();
    assert!(page.contains("<script src=\"/ui/app.js\""));
    assert!(!page.contains("<script>"), "no inline script");
}
