//! Group-wide rate limits without Redis (issue 17), end to end: a control plane and three
//! proxies of one group, each watching it; a `scope: group` limit of 300 req/s; load
//! 10:1:1 across the proxies. Together they admit 300 req/s, and the shares follow when the
//! load moves. What was admitted is judged against what was sent in the window (see
//! `common::load`), and the burst (half a second of the rate) lets a proxy's load pause for
//! a moment without losing admissions.

mod common;

use common::load::*;
use common::*;
use spur_proxy::Proxy;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn share(p: &Proxy) -> f64 {
    p.shared.registry.rate_limits.groups()[0].1.share()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_share_a_group_limit_in_proportion_to_their_load() {
    let (cp, _dir) = start_control(None).await;
    let app = named_backend("app").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: api
        match: {{ path_prefix: /api }}
        cluster: app
        rate_limit: {{ requests: 300, per: 1s, burst: 150, scope: group }}
clusters: [{{ name: app, endpoints: ["{}"] }}]
"#,
        app.addr
    );
    let (status, _) = call(cp.addr, "PUT", "/v1/groups/shop/config", Some(&yaml), None).await;
    assert_eq!(status, 200);
    let mut proxies = Vec::new();
    let mut watchers = Vec::new();
    for node in ["p1", "p2", "p3"] {
        let (proxy, watcher) =
            watching_proxy(format!("http://{}", cp.addr), node, "shop", 1, "web").await;
        watchers.push(watcher);
        proxies.push(proxy);
    }
    let on = Arc::new(AtomicBool::new(true));
    let rates: Vec<Arc<AtomicUsize>> = [400, 40, 40]
        .iter()
        .map(|r| Arc::new(AtomicUsize::new(*r)))
        .collect();
    let logs: Vec<Arc<LoadLog>> = (0..3).map(|_| Arc::default()).collect();
    let mut loaders = Vec::new();
    for i in 0..3 {
        loaders.push(paced_load(
            proxies[i].listener_addr("web").unwrap(),
            rates[i].clone(),
            logs[i].clone(),
            on.clone(),
        ));
    }
    // Shares settle within a few seconds; then measure four seconds.
    let settled = eventually(Duration::from_secs(6), || async {
        share(&proxies[0]) > 0.6 && share(&proxies[1]) < 0.2 && share(&proxies[2]) < 0.2
    })
    .await;
    let shares: Vec<f64> = proxies.iter().map(|p| share(p)).collect();
    assert!(settled, "shares {shares:?}");
    // A second for the loaded buckets to drain, then four seconds measured (the bound allows
    // for a full burst at the start all the same).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let read = || proxies.iter().map(|p| share(p)).collect();
    let (from, to, mean) = watch_shares(Duration::from_secs(4), read).await;

    // The load moves to the third proxy: its share follows within 3 s.
    rates[0].store(40, Ordering::SeqCst);
    rates[2].store(400, Ordering::SeqCst);
    let moved = Instant::now();
    let followed = eventually(Duration::from_secs(3), || async {
        share(&proxies[2]) > 0.6 && share(&proxies[0]) < 0.2
    })
    .await;
    let shares: Vec<f64> = proxies.iter().map(|p| share(p)).collect();
    assert!(followed, "after {:?}: shares {shares:?}", moved.elapsed());
    let sent = stop_and_tally(&on, loaders, &logs, from, to).await;
    let secs = (to - from).as_secs_f64();
    // One control plane: the shares add up to one but for the moments they move.
    assert_group_limit(&sent, &mean, (300.0, 150.0), secs, 0.05);
    for w in watchers {
        w.abort();
    }
}
