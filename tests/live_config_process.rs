//! End-to-end with real processes: the control plane survives `kill -9` mid-push, a proxy
//! binary follows the control plane (and keeps its memory flat over 1,000 pushes), and a
//! file-mode proxy reloads its file.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_control(port: u16, dir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "control",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_healthy(addr: std::net::SocketAddr) {
    assert!(
        eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
                && call(addr, "GET", "/healthz", None, None).await.0 == 200
        })
        .await,
        "control plane did not come up"
    );
}

fn config_for(node: &str, backend: std::net::SocketAddr) -> String {
    format!(
        "node: {node}\nadmin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\nclusters:\n  - {{ name: app, endpoints: [\"{backend}\"] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_push_keeps_every_acknowledged_version() {
    let dir = temp_dir("kill9");
    // Held for the whole test: the control plane is down between its runs, and a port
    // merely chosen and let go may be taken by then.
    let held = reserved_port();
    let port = held.port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let backend: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut acknowledged: Vec<(u64, String)> = Vec::new();
    for round in 0..3 {
        let mut cp = spawn_control(port, &dir);
        wait_healthy(addr).await;
        // Writers push as fast as they can; the process is killed while they do.
        let pusher = tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..10_000 {
                let node = format!("r{round}-n{i}");
                let Some((s, v)) = try_call(
                    addr,
                    "PUT",
                    "/v1/groups/g/config",
                    Some(&config_for(&node, backend)),
                    None,
                )
                .await
                else {
                    break;
                };
                if s != 200 {
                    break;
                }
                acks.push((v["version"].as_u64().unwrap(), node));
            }
            acks
        });
        tokio::time::sleep(Duration::from_millis(300 + 150 * round)).await;
        cp.kill().unwrap(); // SIGKILL
        cp.wait().unwrap();
        let acks = tokio::time::timeout(Duration::from_secs(10), pusher)
            .await
            .expect("pusher stops")
            .unwrap();
        assert!(!acks.is_empty(), "round {round}: nothing was acknowledged");
        acknowledged.extend(acks);
    }
    let mut cp = spawn_control(port, &dir);
    wait_healthy(addr).await;
    let (_, h) = call(addr, "GET", "/v1/groups/g/history", None, None).await;
    let stored: std::collections::HashMap<u64, String> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["config"]["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (version, node) in &acknowledged {
        assert_eq!(
            stored.get(version),
            Some(node),
            "acknowledged version {version} lost or changed"
        );
    }
    // Versions are contiguous: no hole, no half-written one.
    let max = *stored.keys().max().unwrap();
    assert_eq!(stored.len() as u64, max, "versions 1..={max} all present");
    eprintln!(
        "kill -9 x3: {} acknowledged versions, {} stored, all intact",
        acknowledged.len(),
        stored.len()
    );
    let _ = cp.kill();
    let _ = cp.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_binary_follows_the_control_plane_with_flat_memory() {
    let (cp, _dir) = start_control(Some("t0ken")).await;
    let c = cp.addr;
    let app = named_backend("app").await;
    let other = named_backend("other").await;
    let token_file = temp_dir("token").join("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let (s, _) = call(
        c,
        "PUT",
        "/v1/groups/g/config",
        Some(&config_for("p", app.addr)),
        Some("t0ken"),
    )
    .await;
    assert_eq!(s, 200);
    let url = format!("http://{c}");
    let spur = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--node",
            "bin-1",
            "--group",
            "g",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        1,
        true,
    );
    let web = spur.listeners["web"];
    let admin = spur.admin.unwrap();
    assert_eq!(get(admin, "/ready", &[]).await.status, 200);
    assert_eq!(get(web, "/", &[]).await.text(), "app");

    let rss_before = spur.rss_kib();
    let mut last = 1;
    for i in 0..1000 {
        let target = if i % 2 == 0 { other.addr } else { app.addr };
        let (s, v) = call(
            c,
            "PUT",
            "/v1/groups/g/config",
            Some(&config_for(&format!("p{i}"), target)),
            Some("t0ken"),
        )
        .await;
        assert_eq!(s, 200);
        last = v["version"].as_u64().unwrap();
    }
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(admin, "spur_config_version", &[]).await == Some(last as f64)
        })
        .await,
        "the proxy did not reach version {last}"
    );
    assert_eq!(
        get(web, "/", &[]).await.text(),
        "app",
        "version 1001 routes to app"
    );
    let rss_after = spur.rss_kib();
    eprintln!(
        "1000 pushes: proxy RSS {} KiB before, {} KiB after ({:+} KiB); caught up {:?} after the last PUT",
        rss_before,
        rss_after,
        rss_after as i64 - rss_before as i64,
        t.elapsed()
    );
    // Normal growth is 130-220 KiB; every compiled config leaked adds ~3 MiB.
    assert!(
        rss_after < rss_before + 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    let (_, proxies) = call(c, "GET", "/v1/proxies", None, Some("t0ken")).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            call(c, "GET", "/v1/proxies", None, Some("t0ken")).await.1[0]["applied_version"] == last
        })
        .await,
        "{proxies}"
    );
}

/// Writes `spur.yaml` in `dir` for one listener in front of `target`, replacing the file
/// atomically as editors and config managers do.
fn write_file_config(dir: &std::path::Path, target: std::net::SocketAddr, extra: &str) {
    let path = dir.join("spur.yaml");
    let text = format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\nclusters:\n  - {{ name: app, endpoints: [\"{target}\"]{extra} }}\n"
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_with_watch_reloads_on_change() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let dir = temp_dir("filewatch");
    let path = dir.join("spur.yaml");
    write_file_config(&dir, a.addr, "");
    let spur = spawn_spur_with(
        &["proxy", "--config", path.to_str().unwrap(), "--watch"],
        1,
        true,
    );
    let web = spur.listeners["web"];
    let admin = spur.admin.unwrap();
    assert_eq!(get(web, "/", &[]).await.text(), "a");

    write_file_config(&dir, b.addr, "");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(web, "/", &[]).await.text() == "b"
        })
        .await,
        "--watch picked up the edit"
    );
    // A broken edit is refused and the last good config keeps serving.
    std::fs::write(&path, "listeners: [ {name: web, listen: nope").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                admin,
                "spur_config_updates_total",
                &[("result", "rejected")],
            )
            .await
                >= Some(1.0)
        })
        .await
    );
    assert_eq!(get(web, "/", &[]).await.text(), "b");
    write_file_config(&dir, a.addr, ", connect_timeout: 2s");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(web, "/", &[]).await.text() == "a"
        })
        .await
    );
}

/// SIGHUP on a proxy started without `--watch`: nothing else would re-read the file, so
/// the reload can only come from the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mode_without_watch_reloads_on_sighup_only() {
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let dir = temp_dir("sighup");
    let path = dir.join("spur.yaml");
    write_file_config(&dir, a.addr, "");
    let spur = spawn_spur_with(&["proxy", "--config", path.to_str().unwrap()], 1, true);
    let web = spur.listeners["web"];
    let admin = spur.admin.unwrap();
    assert_eq!(get(web, "/", &[]).await.text(), "a");
    let v = metric(admin, "spur_config_version", &[])
        .await
        .expect("spur_config_version");

    // Edited, but no --watch: still the old config after several of --watch's periods.
    write_file_config(&dir, b.addr, "");
    let waited = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < waited {
        assert_eq!(
            get(web, "/", &[]).await.text(),
            "a",
            "reloaded without SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(admin, "spur_config_version", &[]).await, Some(v));

    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(spur.pid().to_string())
        .status();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(web, "/", &[]).await.text() == "b"
        })
        .await,
        "SIGHUP reloads the file"
    );
    assert!(metric(admin, "spur_config_version", &[]).await > Some(v));
    assert_eq!(
        metric(admin, "spur_config_updates_total", &[("result", "applied")]).await,
        Some(2.0),
        "the start and the SIGHUP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_is_live_at_once_and_ready_after_its_first_config() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    let app = named_backend("app").await;
    let url = format!("http://{c}");
    // No config for the group yet: the admin server (pinned by --admin) answers anyway.
    let spur = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--node",
            "pod-1",
            "--group",
            "shop",
            "--admin",
            "127.0.0.1:0",
        ],
        0,
        true,
    );
    let admin = spur.admin.unwrap();
    assert_eq!(get(admin, "/live", &[]).await.status, 200);
    assert_eq!(
        get(admin, "/ready", &[]).await.status,
        503,
        "not ready before the first config"
    );
    let cfg = format!("listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\nclusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n", app.addr);
    let (s, _) = call(c, "PUT", "/v1/groups/shop/config", Some(&cfg), None).await;
    assert_eq!(s, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(admin, "/ready", &[]).await.status == 200
        })
        .await
    );
    // A config that tries to move the pinned admin server is rejected and reported.
    let moved = format!("admin: {{ listen: \"127.0.0.1:1\" }}\n{cfg}");
    call(c, "PUT", "/v1/groups/shop/config", Some(&moved), None).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            call(c, "GET", "/v1/proxies", None, None).await.1[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("admin.listen") && e.contains("--admin"))
        })
        .await
    );
    assert_eq!(metric(admin, "spur_config_version", &[]).await, Some(1.0));
}
