//! End-to-end: load balancing, retries, budgets, circuit breaking, health checks, faults.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `total` GETs of `path` with `concurrency` workers, bounded by `limit`; returns the
/// answers (status, backend name, latency).
async fn load(
    addr: std::net::SocketAddr,
    path: &str,
    total: usize,
    concurrency: usize,
    limit: Duration,
) -> Vec<(u16, String, Duration)> {
    let client = h1_client();
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + limit;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let path = path.to_string();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total as u64 && Instant::now() < deadline {
                let req = Request::get(format!("http://{addr}{path}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let t = Instant::now();
                let a = send(&client, req).await;
                out.push((
                    a.status,
                    a.header("x-backend").unwrap_or("-").to_string(),
                    t.elapsed(),
                ));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all
}

fn percentile(lat: &mut [Duration], p: usize) -> Duration {
    lat.sort();
    lat[(lat.len() * p / 100).min(lat.len() - 1)]
}

fn ok_backend_named(
    name: &'static str,
    delay: Duration,
) -> impl std::future::Future<Output = Backend> {
    backend(move |_req| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Response::builder()
            .header("x-backend", name)
            .body(Full::new(Bytes::from(name)))
            .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_endpoint_mid_load_loses_no_requests_and_ejects_it() {
    let a = ok_backend_named("a", Duration::ZERO).await;
    let b = ok_backend_named("b", Duration::ZERO).await;
    let c_hits = Arc::new(AtomicU64::new(0));
    let ch = c_hits.clone();
    let c = backend(move |_req| {
        ch.fetch_add(1, Ordering::Relaxed);
        async {
            Response::builder()
                .header("x-backend", "c")
                .body(Full::new(Bytes::from("c")))
                .unwrap()
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        cluster: app
        timeout: 5s
        retry: {{ attempts: 3, retry_on: [connect-failure, reset, "503"], backoff: {{ base: 5ms, max: 50ms }}, budget: {{ ratio: 0.5, min_per_sec: 50 }} }}
clusters:
  - name: app
    endpoints: ["{}", "{}", "{}"]
    lb: round_robin
    circuit_breaker: {{ consecutive_failures: 3, ejection_time: 30s, max_ejection_percent: 50 }}
"#,
        a.addr, b.addr, c.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    let killer = async move {
        // Kill `c` once the load is well under way (it has served 300 requests).
        assert!(
            eventually(Duration::from_secs(20), || async {
                c_hits.load(Ordering::Relaxed) >= 300
            })
            .await
        );
        c.kill();
        // Its port stays held (refused): no other test's listener is given it meanwhile.
        let held = hold_again(c.addr.port()).await;
        (c, held)
    };
    let (answers, (_c, _held)) =
        tokio::join!(load(web, "/", 3000, 16, Duration::from_secs(30)), killer);
    assert!(answers.len() >= 2000, "only {} requests ran", answers.len());
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let rate = ok as f64 / answers.len() as f64;
    assert!(
        rate >= 0.999,
        "success rate {rate} ({ok}/{})",
        answers.len()
    );

    let dead = _c.addr.to_string();
    assert_eq!(
        metric(
            admin,
            "spur_endpoint_ejected",
            &[("cluster", "app"), ("endpoint", &dead)]
        )
        .await,
        Some(1.0)
    );
    assert!(
        metric(
            admin,
            "spur_circuit_open_total",
            &[("cluster", "app"), ("reason", "ejection")]
        )
        .await
            >= Some(1.0)
    );
    let clusters: serde_json::Value =
        serde_json::from_slice(&get(admin, "/clusters", &[]).await.body).unwrap();
    let eps = clusters["clusters"][0]["endpoints"].as_array().unwrap();
    for ep in eps {
        assert_eq!(ep["ejected"], ep["address"] == dead.as_str(), "{ep}");
    }
    eprintln!(
        "kill test: {ok}/{} succeeded ({:.3}%)",
        answers.len(),
        rate * 100.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ewma_avoids_a_slow_endpoint_where_round_robin_does_not() {
    // Every answer of the slow endpoint takes at least this long.
    const SLOW: Duration = Duration::from_millis(150);
    let fast1 = ok_backend_named("fast1", Duration::ZERO).await;
    let fast2 = ok_backend_named("fast2", Duration::ZERO).await;
    let slow = ok_backend_named("slow", SLOW).await;
    let eps = format!(r#"["{}", "{}", "{}"]"#, fast1.addr, fast2.addr, slow.addr);
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: /ewma }}, cluster: by-ewma }}
      - {{ match: {{ path_prefix: /rr }}, cluster: by-rr }}
clusters:
  - {{ name: by-ewma, endpoints: {eps}, lb: ewma }}
  - {{ name: by-rr, endpoints: {eps}, lb: round_robin }}
"#
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let mut report = Vec::new();
    let mut fast_p95 = Duration::ZERO;
    for path in ["/ewma", "/rr"] {
        // Warm up: the balancer learns the latencies (steady state is what is measured).
        load(web, path, 100, 8, Duration::from_secs(30)).await;
        let answers = load(web, path, 600, 8, Duration::from_secs(30)).await;
        assert!(answers.iter().all(|a| a.0 == 200));
        let slow_share =
            answers.iter().filter(|a| a.1 == "slow").count() as f64 / answers.len() as f64;
        let mut lat: Vec<Duration> = answers.iter().map(|a| a.2).collect();
        // p95: a loaded machine's hiccups make even EWMA send a slow answer now and then,
        // which a p99 over 600 answers would show; avoiding the slow endpoint shows at p95.
        report.push((path, slow_share, percentile(&mut lat, 95)));
        if path == "/rr" {
            // The fast endpoints' own tail, measured in the same run.
            let mut fast: Vec<Duration> = answers
                .iter()
                .filter(|a| a.1 != "slow")
                .map(|a| a.2)
                .collect();
            fast_p95 = percentile(&mut fast, 95);
        }
    }
    eprintln!(
        "ewma vs round robin (path, slow share, p95): {report:?}; fast endpoints' p95 {fast_p95:?}"
    );
    let (_, ewma_share, ewma_p95) = report[0];
    let (_, rr_share, rr_p95) = report[1];
    assert!(
        ewma_share < 0.05,
        "ewma sent {ewma_share} to the slow endpoint"
    );
    assert!(
        rr_share > 0.30,
        "round robin sent {rr_share} to the slow endpoint"
    );
    assert!(rr_p95 >= SLOW, "round robin p95 {rr_p95:?}");
    // Not the slow endpoint's tail, which round robin's shows: a p95 under the slow
    // endpoint's delay means fewer than 5% of the answers took that long. Not a fixed bar
    // nearer the fast endpoints' answers: with every worker on them, this run saturates
    // the test's two threads, and on a loaded machine their p95 here was 13-61 ms (against
    // 1-9 ms in the round-robin run, whose workers mostly wait on the slow endpoint). With
    // the slow endpoint at 50 ms and a 25 ms bar, 27 of 30 runs failed under load.
    assert!(
        ewma_p95 < SLOW && ewma_p95 < rr_p95,
        "ewma p95 {ewma_p95:?}, fast endpoints' {fast_p95:?}, round robin {rr_p95:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ewma_counts_fast_failures_against_an_endpoint() {
    let good1 = ok_backend_named("good1", Duration::from_millis(2)).await;
    let good2 = ok_backend_named("good2", Duration::from_millis(2)).await;
    let failing = backend(|_req| async {
        Response::builder()
            .status(503)
            .header("x-backend", "failing")
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - {{ name: app, endpoints: ["{}", "{}", "{}"], lb: ewma }}
"#,
        good1.addr, good2.addr, failing.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let answers = load(web, "/", 1000, 8, Duration::from_secs(30)).await;
    let failing_share =
        answers.iter().filter(|a| a.1 == "failing").count() as f64 / answers.len() as f64;
    eprintln!("instant-503 endpoint share under ewma: {failing_share}");
    assert!(
        failing_share < 0.05,
        "ewma sent {failing_share} to an endpoint that fails instantly"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_amplification_when_everything_fails() {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let down = backend(move |_req| {
        h.fetch_add(1, Ordering::Relaxed);
        async {
            Response::builder()
                .status(503)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        cluster: down
        retry: {{ attempts: 3, retry_on: ["503"], backoff: {{ base: 0ms, max: 0ms }}, budget: {{ ratio: 0.2, min_per_sec: 5 }} }}
clusters:
  - {{ name: down, endpoints: ["{}"] }}
"#,
        down.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let started = Instant::now();
    let answers = load(web, "/", 500, 8, Duration::from_secs(20)).await;
    let secs = started.elapsed().as_secs_f64().ceil();
    let requests = answers.len() as f64;
    assert!(answers.iter().all(|a| a.0 == 503));
    let tries = hits.load(Ordering::Relaxed) as f64;
    let bound = requests * 1.2 + 5.0 * secs;
    eprintln!(
        "budget: {requests} requests, {tries} upstream tries (bound {bound}), {:.3}x",
        tries / requests
    );
    assert!(tries <= bound, "{tries} tries > {bound}");
    assert!(tries > requests, "some retries expected");
    let ep = down.addr.to_string();
    assert_eq!(
        metric(
            admin,
            "spur_upstream_requests_total",
            &[("cluster", "down"), ("endpoint", &ep), ("code", "503")]
        )
        .await,
        Some(tries)
    );
    assert!(
        metric(
            admin,
            "spur_retry_budget_exhausted_total",
            &[("cluster", "down")]
        )
        .await
            >= Some(requests * 0.5)
    );
    assert_eq!(
        metric(
            admin,
            "spur_retries_total",
            &[("cluster", "down"), ("reason", "503")]
        )
        .await,
        Some(tries - requests)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_ejects_after_n_failures_and_one_probe_closes_it() {
    let broken = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicU64::new(0));
    let (br, h) = (broken.clone(), hits.clone());
    let flaky = backend(move |_req| {
        h.fetch_add(1, Ordering::Relaxed);
        let status = if br.load(Ordering::Relaxed) { 503 } else { 200 };
        async move {
            Response::builder()
                .status(status)
                .header("x-backend", "flaky")
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let steady = ok_backend_named("steady", Duration::ZERO).await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - name: app
    endpoints: ["{}", "{}"]
    lb: round_robin
    circuit_breaker: {{ consecutive_failures: 3, ejection_time: 400ms, max_ejection_percent: 50 }}
"#,
        flaky.addr, steady.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let flaky_ep = flaky.addr.to_string();

    // Round robin alternates: after 3 failures at `flaky` it is ejected.
    let mut failures = 0;
    while hits.load(Ordering::Relaxed) < 3 {
        if get(web, "/", &[]).await.status == 503 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3);
    assert_eq!(
        metric(
            admin,
            "spur_endpoint_ejected",
            &[("cluster", "app"), ("endpoint", &flaky_ep)]
        )
        .await,
        Some(1.0)
    );
    // While ejected it gets nothing.
    for _ in 0..20 {
        let a = get(web, "/", &[]).await;
        assert_eq!((a.status, a.header("x-backend")), (200, Some("steady")));
    }
    assert_eq!(hits.load(Ordering::Relaxed), 3);

    // It recovers; after the ejection time, one probe goes through and closes the breaker.
    broken.store(false, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(web, "/", &[]).await;
            hits.load(Ordering::Relaxed) == 4
        })
        .await,
        "no probe reached the endpoint"
    );
    assert_eq!(
        metric(
            admin,
            "spur_endpoint_ejected",
            &[("cluster", "app"), ("endpoint", &flaky_ep)]
        )
        .await,
        Some(0.0)
    );
    let mut backends = HashMap::new();
    for _ in 0..10 {
        *backends
            .entry(
                get(web, "/", &[])
                    .await
                    .header("x-backend")
                    .unwrap()
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    assert_eq!(
        backends.get("flaky"),
        Some(&5),
        "traffic is shared again: {backends:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_fails_fast_instead_of_queueing() {
    // Held until `release` turns true: a state that stays set, so a request that arrives
    // after the release is not held forever.
    let (release, released) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(AtomicU64::new(0));
    let arr = arrived.clone();
    let held = backend(move |_req| {
        let mut released = released.clone();
        arr.fetch_add(1, Ordering::Relaxed);
        async move {
            let _ = released.wait_for(|r| *r).await;
            Response::new(Full::new(Bytes::from("done")))
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - name: app
    endpoints: ["{}"]
    circuit_breaker: {{ max_requests: 2, max_pending: 1 }}
"#,
        held.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let bounded = |web| async move {
        tokio::time::timeout(Duration::from_secs(10), get(web, "/", &[]))
            .await
            .expect("answered within 10 s")
    };
    let first: Vec<_> = (0..3).map(|_| tokio::spawn(bounded(web))).collect();
    // Two in flight at the backend; the third waits in the proxy, or is refused if a
    // probe below took the waiting place first.
    assert!(
        eventually(Duration::from_secs(3), || async {
            arrived.load(Ordering::Relaxed) == 2
        })
        .await
    );
    // A request that finds both slots and the waiting place taken: 503 at once. A probe
    // that is made to wait instead (the third request has not reached the proxy yet) is
    // abandoned after 1 s, which frees the place again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let over = loop {
        assert!(Instant::now() < deadline, "no request was refused");
        let t = Instant::now();
        if let Ok(a) = tokio::time::timeout(Duration::from_secs(1), get(web, "/", &[])).await {
            assert_eq!(a.status, 503, "{}", a.text());
            assert!(t.elapsed() < Duration::from_secs(1));
            break a;
        }
    };
    assert_eq!(over.header("x-spur-error"), Some("overloaded"));
    assert!(
        metric(
            admin,
            "spur_circuit_open_total",
            &[("cluster", "app"), ("reason", "max_pending")]
        )
        .await
            >= Some(1.0)
    );
    assert_eq!(
        arrived.load(Ordering::Relaxed),
        2,
        "the backend never saw more than max_requests"
    );
    // Releasing lets the held and the waiting request finish.
    release.send(true).unwrap();
    let mut statuses = Vec::new();
    for f in first {
        statuses.push(f.await.unwrap().status);
    }
    statuses.sort();
    assert!(
        statuses == [200, 200, 200] || statuses == [200, 200, 503],
        "{statuses:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_posts_are_not_replayed_small_bodies_and_gets_are() {
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let always_503 = backend(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let attempt = req
                .headers()
                .get("x-spur-attempt")
                .map(|v| v.to_str().unwrap().to_string());
            let method = req.method().to_string();
            let len = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            seen.lock().unwrap().push((method, len, attempt));
            Response::builder()
                .status(503)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        cluster: app
        retry: {{ attempts: 2, retry_on: ["503"], backoff: {{ base: 1ms, max: 1ms }}, max_body: 64KiB }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        always_503.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    assert_eq!(get(web, "/", &[]).await.status, 503);
    let small = Request::post(format!("http://{web}/"))
        .body(Full::new(Bytes::from(vec![7u8; 1024])))
        .unwrap();
    assert_eq!(send(&h1_client(), small).await.status, 503);
    let big = Request::post(format!("http://{web}/"))
        .body(Full::new(Bytes::from(vec![7u8; 1 << 20])))
        .unwrap();
    assert_eq!(send(&h1_client(), big).await.status, 503);

    let seen = bodies.lock().unwrap().clone();
    let s = |m: &str, len: usize, a: Option<&str>| (m.to_string(), len, a.map(str::to_string));
    assert_eq!(
        seen,
        vec![
            s("GET", 0, None),
            s("GET", 0, Some("2")),
            s("POST", 1024, None),
            s("POST", 1024, Some("2")),
            s("POST", 1 << 20, None),
        ]
    );
    assert_eq!(
        metric(
            admin,
            "spur_retry_skipped_total",
            &[("cluster", "app"), ("reason", "body_too_large")]
        )
        .await,
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_on_another_endpoint() {
    let stuck = ok_backend_named("stuck", Duration::from_secs(10)).await;
    let quick = ok_backend_named("quick", Duration::ZERO).await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        cluster: app
        timeout: 3s
        retry: {{ attempts: 2, per_try_timeout: 200ms, retry_on: [timeout], backoff: {{ base: 1ms, max: 1ms }} }}
clusters:
  - {{ name: app, endpoints: ["{}", "{}"], lb: round_robin }}
"#,
        stuck.addr, quick.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    for _ in 0..4 {
        let t = Instant::now();
        let a = get(web, "/", &[]).await;
        assert_eq!((a.status, a.header("x-backend")), (200, Some("quick")));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    assert!(
        metric(
            proxy.admin_addr().unwrap(),
            "spur_retries_total",
            &[("cluster", "app"), ("reason", "timeout")]
        )
        .await
            >= Some(2.0)
    );
    proxy.shutdown().await;
}

/// A retry goes to another endpoint than the try that just failed: four endpoints behind
/// `ewma` (power of two choices, so nothing alternates by construction), each answering
/// the first two tries of every request with 409. A 409 is retriable but does not count
/// against the endpoint's latency estimate, and one endpoint answers 20 times faster than
/// the others: its estimate stays the lowest even with the failed try still in flight, so
/// only the retry's exclusion keeps the next try away from it. (Only the last failed
/// endpoint is excluded: a third try may go back to the first one's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_goes_back_to_the_endpoint_that_failed_it() {
    // (request id, attempt, endpoint) as each endpoint saw them.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, String, usize)>::new()));
    let mut eps = Vec::new();
    for n in 0..4 {
        let seen = seen.clone();
        eps.push(
            backend(move |req: Request<hyper::body::Incoming>| {
                let h = |k: &str| {
                    req.headers()
                        .get(k)
                        .map(|v| v.to_str().unwrap().to_string())
                };
                let (rid, attempt) = (h("x-request-id").unwrap(), h("x-spur-attempt"));
                let attempt = attempt.unwrap_or_else(|| "1".into());
                let status = if attempt == "3" { 200 } else { 409 };
                seen.lock().unwrap().push((rid, attempt, n));
                async move {
                    if n > 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                }
            })
            .await,
        );
    }
    let list: Vec<String> = eps.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: / }}
        cluster: app
        retry: {{ attempts: 3, retry_on: [retriable-4xx], backoff: {{ base: 0ms, max: 0ms }}, budget: {{ ratio: 1, min_per_sec: 10000 }} }}
clusters:
  - {{ name: app, endpoints: [{}], lb: ewma }}
"#,
        list.join(", ")
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    for _ in 0..60 {
        assert_eq!(get(web, "/", &[]).await.status, 200);
    }
    let seen = seen.lock().unwrap().clone();
    let mut by_request: HashMap<String, Vec<(String, usize)>> = HashMap::new();
    for (rid, attempt, ep) in seen {
        by_request.entry(rid).or_default().push((attempt, ep));
    }
    assert_eq!(by_request.len(), 60);
    let mut used = std::collections::HashSet::new();
    for (rid, mut tries) in by_request {
        tries.sort();
        let attempts: Vec<&str> = tries.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(attempts, ["1", "2", "3"], "{rid}");
        for pair in tries.windows(2) {
            assert_ne!(
                pair[0].1, pair[1].1,
                "{rid}: a retry went back to the endpoint that failed it: {tries:?}"
            );
        }
        used.extend(tries.iter().map(|t| t.1));
    }
    assert_eq!(used.len(), 4, "the balancer spread the tries");
    proxy.shutdown().await;
}

/// `/clusters` reports each endpoint's latency estimate (`ewma_ms`), whatever the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_report_each_endpoints_latency_estimate() {
    let fast = ok_backend_named("fast", Duration::ZERO).await;
    let slow = ok_backend_named("slow", Duration::from_millis(80)).await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - {{ name: app, endpoints: ["{}", "{}"], lb: round_robin }}
"#,
        fast.addr, slow.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let ewma = || async {
        let v: serde_json::Value =
            serde_json::from_slice(&get(admin, "/clusters", &[]).await.body).unwrap();
        assert_eq!(v["clusters"][0]["lb"], "round_robin", "{v}");
        let mut out = HashMap::new();
        for e in v["clusters"][0]["endpoints"].as_array().unwrap() {
            let ms = e["ewma_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("no ewma_ms: {e}"));
            out.insert(e["address"].as_str().unwrap().to_string(), ms);
        }
        out
    };
    let before = ewma().await;
    for _ in 0..20 {
        assert_eq!(get(web, "/", &[]).await.status, 200);
    }
    let after = ewma().await;
    let (f, s) = (&fast.addr.to_string(), &slow.addr.to_string());
    eprintln!("ewma_ms before {before:?}, after {after:?}");
    assert!(
        (60.0..1000.0).contains(&after[s]),
        "the slow endpoint's estimate: {} ms",
        after[s]
    );
    assert!(
        after[f] < 30.0 && after[f] < after[s] / 2.0,
        "the fast endpoint's estimate: {} ms",
        after[f]
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_failing_endpoint_out_and_back() {
    let sick = Arc::new(AtomicBool::new(false));
    let s = sick.clone();
    let checked = backend(move |req: Request<hyper::body::Incoming>| {
        let sick = s.load(Ordering::Relaxed);
        async move {
            if req.uri().path() == "/healthz" {
                let status = if sick { 500 } else { 200 };
                return Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
            }
            Response::builder()
                .header("x-backend", "checked")
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let other = ok_backend_named("other", Duration::ZERO).await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - name: app
    endpoints: ["{}", "{}"]
    lb: round_robin
    health_check: {{ path: /healthz, interval: 50ms, timeout: 100ms, unhealthy_threshold: 2, healthy_threshold: 2 }}
"#,
        checked.addr, other.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let ep = checked.addr.to_string();
    sick.store(true, Ordering::Relaxed);
    // Down once /clusters says so (the gauge alone could be read before its first sample).
    assert!(
        eventually(Duration::from_secs(3), || async {
            let clusters: serde_json::Value =
                serde_json::from_slice(&get(admin, "/clusters", &[]).await.body).unwrap();
            clusters["clusters"][0]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["address"] == ep.as_str() && e["healthy"] == false)
        })
        .await
    );
    assert_eq!(
        metric(
            admin,
            "spur_endpoint_healthy",
            &[("cluster", "app"), ("endpoint", &ep)]
        )
        .await,
        Some(0.0)
    );
    for _ in 0..10 {
        assert_eq!(get(web, "/", &[]).await.header("x-backend"), Some("other"));
    }
    let clusters: serde_json::Value =
        serde_json::from_slice(&get(admin, "/clusters", &[]).await.body).unwrap();
    let down: Vec<_> = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["healthy"] == false)
        .collect();
    assert_eq!(down.len(), 1);
    assert_eq!(down[0]["address"], ep.as_str());
    sick.store(false, Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(web, "/", &[]).await.header("x-backend") == Some("checked")
        })
        .await
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_and_ring_hash_is_sticky() {
    let a = ok_backend_named("a", Duration::ZERO).await;
    let b = ok_backend_named("b", Duration::ZERO).await;
    let c = ok_backend_named("c", Duration::ZERO).await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: /abort }}, cluster: app, fault: {{ abort: {{ percent: 100, status: 418 }} }} }}
      - {{ match: {{ path_prefix: /delay }}, cluster: app, fault: {{ delay: {{ percent: 100, duration: 150ms }} }} }}
      - match: {{ path_prefix: /sticky }}
        split: [{{ cluster: ring, weight: 1 }}]
        hash_on: header:x-user-id
clusters:
  - {{ name: app, endpoints: ["{a}"] }}
  - {{ name: ring, endpoints: ["{a}", "{b}", "{c}"], lb: ring_hash }}
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let x = get(web, "/abort", &[]).await;
    assert_eq!((x.status, x.header("x-spur-error")), (418, Some("fault")));
    let t = Instant::now();
    assert_eq!(get(web, "/delay", &[]).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    let mut seen = std::collections::HashSet::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        let first = get(web, "/sticky", &[("x-user-id", &user)])
            .await
            .header("x-backend")
            .unwrap()
            .to_string();
        for _ in 0..3 {
            assert_eq!(
                get(web, "/sticky", &[("x-user-id", &user)])
                    .await
                    .header("x-backend"),
                Some(first.as_str())
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "keys spread over every endpoint");
    proxy.shutdown().await;
}

/// A `dns:` cluster resolves a name through the system resolver: `localhost`, on every
/// address it has (127.0.0.1, and ::1 where there is IPv6). Refresh and "keep the last
/// good answer" are unit-tested with a scripted resolver (proxy/src/adapters/dns.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_clusters_resolve_a_name() {
    let app = ok_backend_named("app", Duration::ZERO).await;
    let port = app.addr.port();
    // The same port on ::1, when this machine has IPv6 loopback.
    let app6 = backend_on(format!("[::1]:{port}").parse().unwrap(), |_req| async {
        Response::builder()
            .header("x-backend", "app")
            .body(Full::new(Bytes::from("app")))
            .unwrap()
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: app }}
clusters:
  - {{ name: app, dns: "localhost:{port}", lb: round_robin }}
"#
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let clusters: serde_json::Value =
        serde_json::from_slice(&get(admin, "/clusters", &[]).await.body).unwrap();
    let addrs: Vec<&str> = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    let v4 = format!("127.0.0.1:{port}");
    assert!(
        addrs.contains(&v4.as_str()),
        "localhost resolved to {addrs:?}"
    );
    assert!(
        addrs
            .iter()
            .all(|a| *a == v4 || *a == format!("[::1]:{port}")),
        "localhost resolved to {addrs:?}"
    );
    eprintln!(
        "localhost:{port} resolved to {addrs:?}; ::1 served: {}",
        app6.is_some()
    );
    if app6.is_none() && addrs.len() > 1 {
        return; // ::1 in the answer but no IPv6 loopback to serve it on: nothing to send to
    }
    for _ in 0..4 {
        assert_eq!(get(web, "/", &[]).await.header("x-backend"), Some("app"));
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upload_is_never_forwarded_short() {
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let app = backend(move |_req| {
        h.fetch_add(1, Ordering::Relaxed);
        async { Response::new(Full::new(Bytes::new())) }
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: / }}, cluster: app, retry: {{ attempts: 2, retry_on: ["503"] }} }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(web).await.unwrap();
        // Promises 1000 bytes, sends 10, then goes away.
        s.write_all(b"POST /pay HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            metric(
                admin,
                "spur_requests_total",
                &[
                    ("listener", "web"),
                    ("route", "web#0"),
                    ("cluster", "app"),
                    ("code", "400"),
                ],
            )
            .await
                == Some(1.0)
        })
        .await,
        "the broken upload is answered 400"
    );
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "the upstream never saw a truncated request"
    );
    proxy.shutdown().await;
}
