//! Load balancing for real fleets (issue 17), end to end: the panic threshold spreads
//! traffic over a fleet whose health checks mark most of it down, and slow start ramps a
//! new endpoint's share of requests up over its window.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend named `name` whose `/healthz` answers 503 while `down` is set; every other
/// path answers 200 with its name (`/slow` after 3 ms).
async fn fleet_backend(name: &'static str, down: Arc<AtomicBool>) -> Backend {
    backend(move |req: Request<hyper::body::Incoming>| {
        let down = down.load(Ordering::SeqCst);
        async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            let status = if req.uri().path() == "/healthz" && down {
                503
            } else {
                200
            };
            Response::builder()
                .status(status)
                .header("x-backend", name)
                .body(Full::new(Bytes::from(name)))
                .unwrap()
        }
    })
    .await
}

/// How many of `n` requests each backend answered.
async fn spread(web: std::net::SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let a = get(web, "/", &[]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        *counts.entry(a.text()).or_insert(0) += 1;
    }
    counts
}

/// Issue 17: at the default 50% panic threshold, 2 of 4 endpoints down leaves traffic on
/// the 2 healthy ones; 3 of 4 down (25% available) spreads it over all four rather than
/// overloading the last one, and is counted in `spur_lb_panic_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_panic_threshold_traffic_spreads_over_the_whole_fleet() {
    let names = ["a", "b", "c", "d"];
    let flags: Vec<Arc<AtomicBool>> = names.iter().map(|_| Arc::default()).collect();
    let mut backends = Vec::new();
    for (n, f) in names.iter().zip(&flags) {
        backends.push(fleet_backend(n, f.clone()).await);
    }
    let eps: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: fleet }}
clusters:
  - name: fleet
    endpoints: [{}]
    lb: least_request
    health_check: {{ path: /healthz, interval: 100ms, timeout: 1s, unhealthy_threshold: 1, healthy_threshold: 1 }}
"#,
        eps.join(", ")
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let healthy = |name: &str| {
        let label = backends[names.iter().position(|n| *n == name).unwrap()]
            .addr
            .to_string();
        async move {
            metric(
                admin,
                "spur_endpoint_healthy",
                &[("cluster", "fleet"), ("endpoint", &label)],
            )
            .await
        }
    };
    flags[0].store(true, Ordering::SeqCst);
    flags[1].store(true, Ordering::SeqCst);
    for n in ["a", "b"] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                healthy(n).await == Some(0.0)
            })
            .await
        );
    }
    let counts = spread(web, 200).await;
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["c", "d"], "{counts:?}");
    assert_eq!(
        metric(admin, "spur_lb_panic_total", &[("cluster", "fleet")]).await,
        Some(0.0)
    );

    flags[2].store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            healthy("c").await == Some(0.0)
        })
        .await
    );
    let counts = spread(web, 400).await;
    assert_eq!(counts.len(), 4, "{counts:?}");
    for (name, c) in &counts {
        assert!(*c >= 40, "{name} got {c} of 400: {counts:?}");
    }
    assert!(metric(admin, "spur_lb_panic_total", &[("cluster", "fleet")]).await >= Some(400.0));
}

/// Issue 17: an endpoint added to a serving cluster with `slow_start` gets a share of
/// requests that ramps up over the window (ewma balancing, where Envoy has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_endpoints_share() {
    let (a, b, c) = (
        fleet_backend("a", Arc::default()).await,
        fleet_backend("b", Arc::default()).await,
        fleet_backend("new", Arc::default()).await,
    );
    let yaml = |eps: &str| {
        format!(
            "listeners:\n  - {{ name: web, listen: 127.0.0.1:0, cluster: fleet }}\n\
             clusters:\n  - {{ name: fleet, endpoints: [{eps}], lb: ewma, slow_start: {{ window: 4s }} }}\n"
        )
    };
    let proxy = start_proxy(&yaml(&format!("\"{}\", \"{}\"", a.addr, b.addr))).await;
    let web = proxy.listener_addr("web").unwrap();
    spread(web, 50).await;
    let cfg = spur_config::load(
        &yaml(&format!("\"{}\", \"{}\", \"{}\"", a.addr, b.addr, c.addr)),
        Some("c.yaml"),
    )
    .unwrap();
    proxy.apply(cfg, 2).await.unwrap();
    // Eight clients for five seconds (so that in-flight counts and latencies settle as
    // they do under load); the new endpoint's share of each second's requests.
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while start.elapsed() < Duration::from_secs(5) {
                let a = get(web, "/slow", &[]).await;
                assert_eq!(a.status, 200);
                seen.push((start.elapsed().as_secs() as usize, a.text() == "new"));
            }
            seen
        }));
    }
    let mut buckets = [(0usize, 0usize); 6];
    for c in clients {
        for (second, new) in c.await.unwrap() {
            buckets[second].0 += usize::from(new);
            buckets[second].1 += 1;
        }
    }
    let shares: Vec<f64> = buckets[..5]
        .iter()
        .map(|(new, all)| *new as f64 / (*all).max(1) as f64)
        .collect();
    eprintln!("new endpoint's share by second: {shares:?}");
    // A third of the requests once ramped up; a fraction of that in the first second.
    assert!((0.01..0.15).contains(&shares[0]), "{shares:?}");
    assert!(shares[4] > 0.2, "{shares:?}");
    assert!(
        shares[0] * 1.6 < shares[2] && shares[2] < shares[4] + 0.1,
        "{shares:?}"
    );
}
