//! End-to-end: feature flags, their propagation between hops, live toggles, canary
//! fallback, and mirroring.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend that names itself and echoes the `x-spur-flags` it received.
async fn variant(name: &'static str) -> Backend {
    backend(move |req: Request<hyper::body::Incoming>| {
        let flags = req
            .headers()
            .get("x-spur-flags")
            .map(|v| v.to_str().unwrap().to_string());
        async move {
            let mut r = Response::builder().header("x-backend", name);
            if let Some(f) = flags {
                r = r.header("x-seen-flags", f);
            }
            r.body(Full::new(Bytes::from(name))).unwrap()
        }
    })
    .await
}

fn flag_config(
    v1: std::net::SocketAddr,
    v2: std::net::SocketAddr,
    percent: u32,
    trust: bool,
) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    trust_incoming_flags: {trust}
    routes:
      - {{ name: beta, match: {{ flag: new-checkout }}, cluster: v2 }}
      - {{ name: stable, match: {{ path_prefix: / }}, cluster: v1 }}
clusters:
  - {{ name: v1, endpoints: ["{v1}"] }}
  - {{ name: v2, endpoints: ["{v2}"] }}
flags:
  new-checkout:
    enabled: true
    rules:
      - {{ header: x-user-group, values: [beta] }}
      - {{ cookie: beta, values: ["1"] }}
      - {{ percent: {percent}, hash_on: "header:x-user-id" }}
"#
    )
}

/// Asks for every user once; returns which users were on the flagged variant.
async fn on_users(web: std::net::SocketAddr, users: usize) -> Vec<bool> {
    let next = Arc::new(AtomicU64::new(0));
    let results = Arc::new(std::sync::Mutex::new(vec![false; users]));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (next, results) = (next.clone(), results.clone());
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= users {
                    return;
                }
                let req = Request::get(format!("http://{web}/"))
                    .header("x-user-id", format!("user-{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let a = send(&client, req).await;
                assert_eq!(a.status, 200);
                results.lock().unwrap()[i] = a.header("x-backend") == Some("v2");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentage_rollout_is_sticky_and_grows_without_reshuffling() {
    let v1 = variant("v1").await;
    let v2 = variant("v2").await;
    let proxy = start_proxy(&flag_config(v1.addr, v2.addr, 10, false)).await;
    let web = proxy.listener_addr("web").unwrap();
    let first = on_users(web, 10_000).await;
    let on = first.iter().filter(|x| **x).count();
    eprintln!("10% rule: {on} of 10000 users on");
    assert!(
        (850..=1150).contains(&on),
        "{on} users on, 1000 ± 150 expected"
    );
    assert_eq!(
        on_users(web, 10_000).await,
        first,
        "the same users get the same answers"
    );

    proxy
        .apply(
            spur_config::load(&flag_config(v1.addr, v2.addr, 20, false), None).unwrap(),
            1,
        )
        .await
        .unwrap();
    let raised = on_users(web, 10_000).await;
    let on20 = raised.iter().filter(|x| **x).count();
    eprintln!("20% rule: {on20} of 10000 users on");
    assert!((1800..=2200).contains(&on20), "{on20}");
    for (i, (a, b)) in first.iter().zip(&raised).enumerate() {
        assert!(!a || *b, "user-{i} was on at 10% and is off at 20%");
    }
    let admin = proxy.admin_addr().unwrap();
    assert!(
        metric(
            admin,
            "spur_flag_evaluations_total",
            &[("flag", "new-checkout"), ("result", "on")]
        )
        .await
            >= Some((on + on + on20) as f64)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_cookie_rules_route_and_forged_flags_are_stripped() {
    let v1 = variant("v1").await;
    let v2 = variant("v2").await;
    let proxy = start_proxy(&flag_config(v1.addr, v2.addr, 0, false)).await;
    let web = proxy.listener_addr("web").unwrap();

    let a = get(web, "/", &[("x-user-group", "beta")]).await;
    assert_eq!(
        (a.header("x-backend"), a.header("x-seen-flags")),
        (Some("v2"), Some("new-checkout"))
    );
    let b = get(web, "/", &[("cookie", "theme=dark; beta=1")]).await;
    assert_eq!(b.header("x-backend"), Some("v2"));
    let c = get(web, "/", &[("x-user-group", "public")]).await;
    assert_eq!(
        (c.header("x-backend"), c.header("x-seen-flags")),
        (Some("v1"), Some(""))
    );
    // An untrusted client cannot turn a flag on by sending the header.
    let d = get(web, "/", &[("x-spur-flags", "new-checkout,admin-mode")]).await;
    assert_eq!(
        (d.header("x-backend"), d.header("x-seen-flags")),
        (Some("v1"), Some(""))
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_proxies_keeps_the_first_hops_decision() {
    let v1 = variant("v1").await;
    let v2 = variant("v2").await;
    // B routes by the flag; on its own it would turn it on for nobody (0%), but it trusts
    // A's decision.
    let b = start_proxy(&flag_config(v1.addr, v2.addr, 0, true)).await;
    let b_web = b.listener_addr("web").unwrap();
    // A: the same flag at 50%; both variants of A lead to B.
    let a = start_proxy(&flag_config(b_web, b_web, 50, false)).await;
    let a_web = a.listener_addr("web").unwrap();
    let mut seen_on = 0;
    for i in 0..200 {
        let user = format!("user-{i}");
        let answer = get(a_web, "/", &[("x-user-id", &user)]).await;
        // A decided; B's backend choice and the flags it saw agree with that decision.
        let on_at_a = answer.header("x-seen-flags") == Some("new-checkout");
        assert_eq!(answer.header("x-backend") == Some("v2"), on_at_a, "{user}");
        seen_on += usize::from(on_at_a);
    }
    assert!((60..=140).contains(&seen_on), "{seen_on} of 200 on at 50%");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patching_a_flag_off_reroutes_within_a_second_without_errors() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    let v1 = variant("v1").await;
    let v2 = variant("v2").await;
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/shop/config",
        Some(&flag_config(v1.addr, v2.addr, 100, false)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let proxy = Arc::new(spur_proxy::Proxy::idle().unwrap());
    spur_proxy::reload::spawn_control(
        proxy.clone(),
        spur_proxy::reload::ControlSource {
            client: spur_proxy::control_client::client(None).expect("a control client"),
            url: format!("http://{c}"),
            node: "n".into(),
            group: "shop".into(),
            token: None,
        },
    );
    let web = applied(&proxy, 1, "web").await;

    let failed = Arc::new(AtomicU64::new(0));
    // When each answer came, and from which variant.
    let answers = Arc::new(std::sync::Mutex::new(Vec::<(Instant, bool)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (failed, answers, stop) = (failed.clone(), answers.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let client = h1_client();
            let mut i = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                i += 1;
                let req = Request::get(format!("http://{web}/"))
                    .header("x-user-id", format!("w{w}-{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let v2 = r.headers().get("x-backend").is_some_and(|v| v == "v2");
                        answers.lock().unwrap().push((Instant::now(), v2));
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // The flag is on for everyone: v2 answers before the PATCH.
    assert!(
        eventually(Duration::from_secs(5), || async {
            answers.lock().unwrap().iter().filter(|a| a.1).count() >= 20
        })
        .await,
        "v2 never answered while the flag was on"
    );
    let patched = Instant::now();
    let (s, v) = call(
        c,
        "PATCH",
        "/v1/groups/shop/flags/new-checkout",
        Some(r#"{"enabled": false}"#),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)), "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let last_v2 = answers.iter().filter(|a| a.1).map(|a| a.0).max().unwrap();
    let switched_after = last_v2.saturating_duration_since(patched);
    eprintln!("flag off: last request on v2 {switched_after:?} after the PATCH");
    assert!(
        switched_after < Duration::from_secs(1),
        "still routed to v2 {switched_after:?} after the PATCH"
    );
    let settled = answers
        .iter()
        .filter(|a| a.0 > patched + Duration::from_secs(1))
        .count();
    assert!(settled > 0, "no request ran a second after the PATCH");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let (_, cfg) = call(c, "GET", "/v1/groups/shop/config", None, None).await;
    assert_eq!(cfg["config"]["flags"]["new-checkout"]["enabled"], false);
    assert_eq!(
        cfg["config"]["flags"]["new-checkout"]["rules"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "rules kept"
    );
    // Unknown fields and bad rules are refused.
    let (s, _) = call(
        c,
        "PATCH",
        "/v1/groups/shop/flags/new-checkout",
        Some(r#"{"enabld": true}"#),
        None,
    )
    .await;
    assert_eq!(s, 400);
    let (s, v) = call(
        c,
        "PATCH",
        "/v1/groups/shop/flags/new-checkout",
        Some(r#"{"rules": [{"percent": 150}]}"#),
        None,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        v["errors"][0]["path"],
        "flags.new-checkout.rules[0].percent"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_with_no_healthy_endpoint_gives_its_share_away() {
    let v1 = variant("v1").await;
    let dead_port = refusing_addr();
    let dead = dead_port.addr;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        split: [{{ cluster: v1, weight: 50 }}, {{ cluster: canary, weight: 50 }}]
        hash_on: header:x-user-id
clusters:
  - {{ name: v1, endpoints: ["{}"] }}
  - name: canary
    endpoints: ["{dead}"]
    health_check: {{ path: /healthz, interval: 50ms, timeout: 50ms, unhealthy_threshold: 1, healthy_threshold: 1 }}
"#,
        v1.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    // Once the health check marks the canary down, every user is served by v1.
    assert!(
        eventually(Duration::from_secs(3), || async {
            let mut all = true;
            for u in 0..20 {
                all &= get(web, "/", &[("x-user-id", &format!("u{u}"))])
                    .await
                    .status
                    == 200;
            }
            all
        })
        .await
    );
    for u in 0..100 {
        assert_eq!(
            get(web, "/", &[("x-user-id", &format!("user-{u}"))])
                .await
                .header("x-backend"),
            Some("v1")
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_never_slows_the_client_and_counts_differences_exactly() {
    let primary = backend(|req: Request<hyper::body::Incoming>| async move {
        Response::builder()
            .header("x-backend", "primary")
            .body(Full::new(Bytes::from(format!(
                "answer for {}",
                req.uri().path()
            ))))
            .unwrap()
    })
    .await;
    let mirrored = Arc::new(AtomicU64::new(0));
    let m = mirrored.clone();
    let shadow = backend(move |req: Request<hyper::body::Incoming>| {
        assert_eq!(
            req.headers().get("x-spur-mirror").map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        m.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let path = req.uri().path().to_string();
            // The new version disagrees on /diff/ paths only.
            let body = if path.starts_with("/diff/") {
                format!("new answer for {path}")
            } else {
                format!("answer for {path}")
            };
            Response::new(Full::new(Bytes::from(body)))
        }
    })
    .await;
    let config = |percent: u32| {
        format!(
            r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        cluster: primary
        mirror: {{ cluster: shadow, percent: {percent} }}
clusters:
  - {{ name: primary, endpoints: ["{}"] }}
  - {{ name: shadow, endpoints: ["{}"] }}
"#,
            primary.addr, shadow.addr
        )
    };
    let proxy = start_proxy(&config(0)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let run = |n: usize| async move {
        let mut lat = Vec::new();
        for i in 0..n {
            let path = if i % 4 == 0 {
                format!("/diff/{i}")
            } else {
                format!("/same/{i}")
            };
            let t = Instant::now();
            let a = get(web, &path, &[]).await;
            lat.push(t.elapsed());
            assert_eq!(
                a.text(),
                format!("answer for {path}"),
                "the client always gets the primary's answer"
            );
        }
        lat.sort();
        lat[lat.len() * 99 / 100]
    };
    let p99_off = run(200).await;
    proxy
        .apply(spur_config::load(&config(100), None).unwrap(), 1)
        .await
        .unwrap();
    let p99_on = run(200).await;
    eprintln!("client p99: mirroring off {p99_off:?}, on (mirror 500 ms slow) {p99_on:?}");
    // A client that waited for the mirror would wait its 500 ms; the bound stays well
    // clear of that, and of the pauses a busy machine puts into 200 requests (tens of ms).
    assert!(
        p99_on < p99_off + Duration::from_millis(250),
        "mirroring slowed the client: {p99_on:?} vs {p99_off:?}"
    );
    // 50 of the 200 went to /diff/.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = get(admin, "/metrics", &[]).await.text();
            let outcome = |o: &str| {
                metric_in(
                    &text,
                    "spur_mirror_requests_total",
                    &[("cluster", "shadow"), ("outcome", o)],
                )
                .unwrap_or(0.0)
            };
            outcome("differ") + outcome("same") >= 200.0
        })
        .await
    );
    assert_eq!(
        metric(
            admin,
            "spur_mirror_requests_total",
            &[("cluster", "shadow"), ("outcome", "differ")]
        )
        .await,
        Some(50.0)
    );
    assert_eq!(
        metric(
            admin,
            "spur_mirror_requests_total",
            &[("cluster", "shadow"), ("outcome", "same")]
        )
        .await,
        Some(150.0)
    );
    assert_eq!(mirrored.load(Ordering::Relaxed), 200);
    proxy.shutdown().await;
}
