//! End-to-end: the control plane in replicas (`spur control --store kubernetes`), as real
//! processes against the fake Kubernetes API (tests/support/fake_kube.rs): versions shared
//! through ConfigMaps, concurrent writes on two replicas, one mesh CA from the Secret, the
//! leader's Lease moving when the leader dies, and a proxy that follows the Service to
//! another replica.

mod common;
#[path = "support/fake_kube.rs"]
mod fake_kube;

use common::*;
use fake_kube::FakeKube;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(2);

/// `spur control --store kubernetes` on the fake API, namespace `spur`, with `extra` flags.
fn replica(kubeconfig: &Path, extra: &[&str]) -> SpurProcess {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--store",
        "kubernetes",
        "--namespace",
        "spur",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--lease-duration",
        "2s",
    ];
    args.extend_from_slice(extra);
    spawn_spur_control(&args)
}

async fn health(api: SocketAddr) -> Value {
    match try_call(api, "GET", "/healthz", None, None).await {
        Some((200, v)) => v,
        _ => Value::Null,
    }
}

/// Waits until the replica has listed the store.
async fn synced(api: SocketAddr) {
    let ok = eventually(Duration::from_secs(10), || async {
        health(api).await["synced"] == true
    })
    .await;
    assert!(ok, "replica {api} never synced: {}", health(api).await);
}

async fn leader(api: SocketAddr) -> bool {
    health(api).await["leader"] == true
}

/// A config told apart by its `node` field.
fn config(node: &str) -> String {
    format!(
        "node: {node}\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    cluster: app\nclusters:\n  - name: app\n    endpoints: [\"127.0.0.1:9\"]\n"
    )
}

async fn versions(api: SocketAddr, group: &str) -> Vec<u64> {
    let (s, v) = call(
        api,
        "GET",
        &format!("/v1/groups/{group}/history"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let list = v["versions"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect()
}

fn csr(uri: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_versions_watches_writes_and_the_ca() {
    let kube = FakeKube::start().await;
    let dir = temp_dir("replicas");
    let kc = kube.kubeconfig(&dir);
    let join = dir.join("join");
    std::fs::write(&join, "join-secret\n").unwrap();
    let ca_flags = ["--mesh-ca", "--join-token-file", join.to_str().unwrap()];
    let a = replica(&kc, &ca_flags);
    let b = replica(&kc, &ca_flags);
    let (a_api, b_api) = (a.control.unwrap(), b.control.unwrap());
    synced(a_api).await;
    synced(b_api).await;
    assert_eq!(health(a_api).await["store"], "kubernetes");
    let one_leader = eventually(Duration::from_secs(10), || async {
        leader(a_api).await != leader(b_api).await
    })
    .await;
    assert!(
        one_leader,
        "exactly one leader: {} {}",
        health(a_api).await,
        health(b_api).await
    );

    // A proxy watches replica B; the PUT goes to replica A.
    let proxy_url = format!("http://{b_api}");
    let proxy = std::thread::spawn(move || {
        spawn_spur_with(
            &[
                "proxy",
                "--control",
                &proxy_url,
                "--node",
                "p1",
                "--group",
                "shop",
            ],
            1,
            false,
        )
    });
    let (s, v) = call(
        a_api,
        "PUT",
        "/v1/groups/shop/config",
        Some(&config("v1")),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(1)), "{v}");
    let put_at = Instant::now();
    let served = eventually(Duration::from_secs(1), || async {
        let r = try_call(b_api, "GET", "/v1/groups/shop/config", None, None).await;
        r.is_some_and(|(s, v)| s == 200 && v["version"] == 1)
    })
    .await;
    assert!(served, "replica B serves A's version within a second");
    let proxy = proxy.join().unwrap();
    let applied = eventually(Duration::from_secs(5), || async {
        let (_, v) = call(b_api, "GET", "/v1/proxies", None, None).await;
        v.as_array().is_some_and(|l| {
            l.iter()
                .any(|p| p["node"] == "p1" && p["applied_version"] == 1)
        })
    })
    .await;
    assert!(applied, "the proxy on B applied version 1");
    eprintln!(
        "a PUT on A reached the proxy on B in {:?}",
        put_at.elapsed()
    );
    // Replica A lists the proxy too (replicas publish their proxies' reports to each other).
    let listed_on_a = eventually(Duration::from_secs(6), || async {
        let (_, v) = call(a_api, "GET", "/v1/proxies", None, None).await;
        v.as_array()
            .is_some_and(|l| l.len() == 1 && l[0]["node"] == "p1" && l[0]["applied_version"] == 1)
    })
    .await;
    assert!(
        listed_on_a,
        "{}",
        call(a_api, "GET", "/v1/proxies", None, None).await.1
    );
    assert!(proxy.listeners.contains_key("web"));

    // 50 concurrent PUTs spread over both replicas: 50 contiguous versions.
    let mut puts = Vec::new();
    for i in 0..50 {
        let api = if i % 2 == 0 { a_api } else { b_api };
        puts.push(tokio::spawn(async move {
            let body = config(&format!("put-{i}"));
            call(api, "PUT", "/v1/groups/shop/config", Some(&body), None).await
        }));
    }
    let mut got = Vec::new();
    for p in puts {
        let (s, v) = p.await.unwrap();
        assert_eq!(s, 200, "{v}");
        got.push(v["version"].as_u64().unwrap());
    }
    got.sort();
    assert_eq!(
        got,
        (2..=51).collect::<Vec<u64>>(),
        "each PUT got its own version"
    );
    let all: Vec<u64> = (1..=51).rev().collect();
    for api in [a_api, b_api] {
        let same = eventually(Duration::from_secs(2), || async {
            versions(api, "shop").await == all
        })
        .await;
        assert!(same, "{api}: {:?}", versions(api, "shop").await);
    }
    let notes: Vec<String> = (0..50).map(|i| format!("\"node\":\"put-{i}\"")).collect();
    let mut stored_notes = Vec::new();
    // Every PUT's config is in exactly one version (none lost, none stored twice).
    let cms = kube.objects("configmaps");
    for cm in &cms {
        if let Some(text) = cm["data"]["stored.json"].as_str() {
            stored_notes.push(text.to_string());
        }
    }
    assert_eq!(stored_notes.len(), 51);
    for n in &notes {
        let found = stored_notes
            .iter()
            .filter(|t| t.contains(n.as_str()))
            .count();
        assert_eq!(found, 1, "`{n}` stored once");
    }
    eprintln!(
        "version creates refused with 409 (another replica first): {}",
        kube.writes("POST", 409)
    );

    // certify on both replicas, one CA.
    let body = |id: &str| json!({ "csr": csr(id), "join_token": "join-secret" }).to_string();
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let (s1, c1) = call(a_api, "POST", "/v1/identity/certify", Some(&body(id)), None).await;
    let (s2, c2) = call(b_api, "POST", "/v1/identity/certify", Some(&body(id)), None).await;
    assert_eq!((s1, s2), (200, 200), "{c1} {c2}");
    assert!(c1["ca"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert_eq!(
        c1["ca"], c2["ca"],
        "both replicas sign with the CA of the Secret"
    );
    let secrets = kube.objects("secrets");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["metadata"]["name"], "spur-mesh-ca");

    // A replica started with an empty disk serves every version.
    let c = replica(&kc, &ca_flags);
    let c_api = c.control.unwrap();
    synced(c_api).await;
    assert_eq!(versions(c_api, "shop").await, all);
    let (_, newest) = call(c_api, "GET", "/v1/groups/shop/config", None, None).await;
    let (_, on_a) = call(a_api, "GET", "/v1/groups/shop/config", None, None).await;
    assert_eq!(newest, on_a);
    let (s3, c3) = call(c_api, "POST", "/v1/identity/certify", Some(&body(id)), None).await;
    assert_eq!((s3, &c3["ca"]), (200, &c1["ca"]));
}

/// The endpoints the newest version of `group` on `api` renders for its one cluster, and
/// the action that made it.
async fn rendered(api: SocketAddr, group: &str) -> (Vec<String>, String) {
    let path = format!("/v1/groups/{group}/config?rendered=true");
    let Some((200, v)) = try_call(api, "GET", &path, None, None).await else {
        return (Vec::new(), String::new());
    };
    let eps = v["config"]["clusters"][0]["endpoints"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|e| e.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    let (_, h) = call(
        api,
        "GET",
        &format!("/v1/groups/{group}/history"),
        None,
        None,
    )
    .await;
    let action = h["versions"][0]["action"]
        .as_str()
        .unwrap_or("")
        .to_string();
    (eps, action)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_moves_discovery_to_another_replica() {
    let kube = FakeKube::start().await;
    kube.slice("shop", "web", &["10.0.0.1"], 8080);
    let dir = temp_dir("failover");
    let kc = kube.kubeconfig(&dir);
    let mut a = replica(&kc, &["--kubernetes"]);
    let a_api = a.control.unwrap();
    synced(a_api).await;
    assert!(
        eventually(Duration::from_secs(5), || leader(a_api)).await,
        "A leads"
    );
    let cfg = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    cluster: web\nclusters:\n  - name: web\n    k8s: web.shop:8080\n";
    let (s, v) = call(a_api, "PUT", "/v1/groups/shop/config", Some(cfg), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(rendered(a_api, "shop").await.0, vec!["10.0.0.1:8080"]);

    // B starts as a follower. The Service's endpoint moves: the leader renders it (B serves
    // that version from the store); B itself makes no discovery version.
    let b = replica(&kc, &["--kubernetes"]);
    let b_api = b.control.unwrap();
    synced(b_api).await;
    assert!(!leader(b_api).await);
    kube.slice("shop", "web", &["10.0.0.2"], 8080);
    let served = eventually(Duration::from_secs(5), || async {
        rendered(b_api, "shop").await.0 == ["10.0.0.2:8080"]
    })
    .await;
    assert!(served, "B serves the leader's version");
    let made = |api: SocketAddr| async move {
        metric(api, "spur_control_k8s_discovery_versions_total", &[])
            .await
            .unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(made(b_api).await, 0.0, "a follower renders nothing");
    assert!(made(a_api).await >= 1.0, "the leader rendered the change");

    // The leader dies without a word (kill -9), and the endpoint moves again: nobody renders
    // it until B takes the Lease.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let killed = Instant::now();
    kube.slice("shop", "web", &["10.0.0.3"], 8080);
    // The Lease was renewed at most a third of its duration before the kill: for the next
    // 800 ms B is still a follower and must not render the change.
    let early = eventually(Duration::from_millis(800), || async {
        rendered(b_api, "shop").await.0 == ["10.0.0.3:8080"]
    })
    .await;
    assert!(
        !early || killed.elapsed() > LEASE / 2,
        "B rendered as a follower"
    );
    let moved = eventually(LEASE * 3, || async {
        let (eps, action) = rendered(b_api, "shop").await;
        eps == ["10.0.0.3:8080"] && action.starts_with("discovery:")
    })
    .await;
    let took = killed.elapsed();
    assert!(
        moved,
        "B rendered the new endpoints: {:?}",
        rendered(b_api, "shop").await
    );
    assert!(leader(b_api).await);
    eprintln!("discovery moved to the other replica {took:?} after the leader was killed (lease {LEASE:?})");
    assert!(
        took < LEASE + LEASE / 2 + Duration::from_millis(500),
        "{took:?}"
    );
    let holder = kube.lease_holder("spur", "spur-control").unwrap();
    assert!(!holder.is_empty());

    // A clean stop (SIGTERM) gives the Lease up: the next replica leads at once.
    let c = replica(&kc, &["--kubernetes"]);
    let c_api = c.control.unwrap();
    synced(c_api).await;
    b.sigterm();
    let stopped = Instant::now();
    assert!(eventually(LEASE * 3, || leader(c_api)).await, "C leads");
    let took = stopped.elapsed();
    eprintln!("after a clean stop of the leader, another replica led in {took:?}");
    assert!(took < LEASE / 2, "released, not expired: {took:?}");
}

/// A stand-in for a Kubernetes Service in front of the replicas: each connection goes to
/// the first replica that accepts it.
async fn service(replicas: Vec<SocketAddr>) -> SocketAddr {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = tcp.accept().await else {
                continue;
            };
            let replicas = replicas.clone();
            tokio::spawn(async move {
                for r in replicas {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(r).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_follows_the_service_to_another_replica() {
    let kube = FakeKube::start().await;
    let dir = temp_dir("follow");
    let kc = kube.kubeconfig(&dir);
    let mut a = replica(&kc, &[]);
    let b = replica(&kc, &[]);
    let (a_api, b_api) = (a.control.unwrap(), b.control.unwrap());
    synced(a_api).await;
    synced(b_api).await;
    let svc = service(vec![a_api, b_api]).await;
    let (s, _) = call(
        a_api,
        "PUT",
        "/v1/groups/shop/config",
        Some(&config("one")),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let url = format!("http://{svc}");
    let proxy = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--node",
            "p1",
            "--group",
            "shop",
        ],
        1,
        false,
    );
    let on = |api: SocketAddr, version: u64| async move {
        let Some((_, v)) = try_call(api, "GET", "/v1/proxies", None, None).await else {
            return false;
        };
        v.as_array().is_some_and(|l| {
            l.iter()
                .any(|p| p["node"] == "p1" && p["applied_version"] == version)
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || on(a_api, 1)).await,
        "through A"
    );

    // A goes away; the proxy reconnects through the Service, now to B, and takes B's push.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let (s, v) = call(
        b_api,
        "PUT",
        "/v1/groups/shop/config",
        Some(&config("two")),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)));
    let followed = eventually(Duration::from_secs(10), || on(b_api, 2)).await;
    assert!(followed, "the proxy applied version 2 from replica B");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_store_trims_refuses_taken_versions_and_keeps_documents() {
    use spur_control::store::{StoreError, KEEP_DISCOVERY};
    let kube = FakeKube::start().await;
    let kc = kube.kubeconfig(&temp_dir("kube-store"));
    let opts = spur_control::k8s::KubernetesOptions {
        kubeconfig: Some(kc),
    };
    let client = spur_control::k8s::client(&opts).await.unwrap();
    let store = spur_control::store::kube::open(client.clone(), "spur");
    assert!(eventually(Duration::from_secs(5), || async { store.synced() }).await);
    let cfg = spur_config::Config::default();
    store
        .append(
            "shop",
            1,
            "put".into(),
            cfg.clone(),
            Default::default(),
            None,
        )
        .await
        .unwrap();
    let taken = store
        .append(
            "shop",
            1,
            "put".into(),
            cfg.clone(),
            Default::default(),
            None,
        )
        .await;
    assert!(
        matches!(taken, Err(StoreError::Conflict { .. })),
        "{taken:?}"
    );
    let n = KEEP_DISCOVERY as u64 + 5;
    for v in 2..=n + 1 {
        let action = format!("discovery: change {v}");
        let made = store.append("shop", v, action, cfg.clone(), Default::default(), None);
        made.await.unwrap();
    }
    let versions = |cms: Vec<Value>| {
        cms.iter()
            .filter(|c| c["metadata"]["labels"]["spur.dev/kind"] == "version")
            .count()
    };
    assert_eq!(versions(kube.objects("configmaps")), KEEP_DISCOVERY + 1);
    assert!(store.get("shop", 1).is_some(), "user versions stay");
    assert!(
        store.get("shop", 2).is_none(),
        "the oldest discovery version went"
    );

    // Another replica's view: a second store on the same namespace sees the same history.
    let other = spur_control::store::kube::open(client, "spur");
    let same = eventually(Duration::from_secs(5), || async {
        other.synced() && other.history("shop").len() == KEEP_DISCOVERY + 1
    })
    .await;
    assert!(same, "{}", other.history("shop").len());

    // Documents: written twice (the second a replace with the resourceVersion read), read
    // back from the other replica.
    let doc = json!({ "state": "running", "step": 1 });
    store.save_doc("shop", "checkout-v2", &doc).await.unwrap();
    let doc2 = json!({ "state": "paused", "step": 2 });
    store.save_doc("shop", "checkout-v2", &doc2).await.unwrap();
    let docs = other.load_docs("shop").await.unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs["checkout-v2"], doc2);
    assert!(other.load_docs("pay").await.unwrap().is_empty());
}

#[tokio::test]
async fn the_directory_store_is_its_own_leader() {
    let (h, _dir) = start_control(None).await;
    let v = health(h.addr).await;
    assert_eq!(
        (&v["leader"], &v["store"], &v["synced"]),
        (&json!(true), &json!("dir"), &json!(true)),
        "{v}"
    );
    let (s, _) = call(h.addr, "GET", "/readyz", None, None).await;
    assert_eq!(s, 200);
}

/// A `scope: group` rate limit holds for the group, not per replica: two proxies, each
/// connected to another replica, admit the limit together (each replica hands out shares
/// over its own proxies and the other replica's, from the demand they publish). Judged
/// against what was sent in the window (see `common::load`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_limit_holds_across_replicas() {
    use common::load::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Arc;
    let kube = FakeKube::start().await;
    let dir = temp_dir("group-limit");
    let kc = kube.kubeconfig(&dir);
    let a = replica(&kc, &[]);
    let b = replica(&kc, &[]);
    let apis = [a.control.unwrap(), b.control.unwrap()];
    for api in apis {
        synced(api).await;
    }
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
        rate_limit: {{ requests: 200, per: 1s, burst: 100, scope: group }}
clusters: [{{ name: app, endpoints: ["{}"] }}]
"#,
        app.addr
    );
    let (status, _) = call(apis[0], "PUT", "/v1/groups/shop/config", Some(&yaml), None).await;
    assert_eq!(status, 200);
    let mut proxies = Vec::new();
    let mut watchers = Vec::new();
    for (node, api) in [("p1", apis[0]), ("p2", apis[1])] {
        let (proxy, watcher) =
            watching_proxy(format!("http://{api}"), node, "shop", 1, "web").await;
        watchers.push(watcher);
        proxies.push(proxy);
    }
    let share = |p: &spur_proxy::Proxy| p.shared.registry.rate_limits.groups()[0].1.share();
    let on = Arc::new(AtomicBool::new(true));
    let logs: Vec<Arc<LoadLog>> = (0..2).map(|_| Arc::default()).collect();
    let loaders: Vec<_> = (0..2)
        .map(|i| {
            paced_load(
                proxies[i].listener_addr("web").unwrap(),
                Arc::new(AtomicUsize::new(200)),
                logs[i].clone(),
                on.clone(),
            )
        })
        .collect();
    // Equal load: about half each once the replicas have read each other's demand (each
    // would hand its only proxy the whole limit otherwise).
    let settled = eventually(Duration::from_secs(10), || async {
        proxies.iter().all(|p| (0.35..0.65).contains(&share(p)))
    })
    .await;
    let shares: Vec<f64> = proxies.iter().map(|p| share(p)).collect();
    assert!(settled, "shares {shares:?}");
    let read = || proxies.iter().map(|p| share(p)).collect();
    let (from, to, mean) = watch_shares(Duration::from_secs(4), read).await;
    let sent = stop_and_tally(&on, loaders, &logs, from, to).await;
    // Two replicas divide from demand read at different moments: 10% to spare.
    let secs = (to - from).as_secs_f64();
    assert_group_limit(&sent, &mean, (200.0, 100.0), secs, 0.1);
    for w in watchers {
        w.abort();
    }
}
