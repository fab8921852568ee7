//! End-to-end: the control API's rough edges and what a hostile client can do to it —
//! flags that do not exist, proxies that are long gone, silent connections, slow bodies,
//! an open API on a public address.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FLAGGED: &str = r#"
listeners:
  - { name: web, listen: "127.0.0.1:0", cluster: app }
clusters:
  - { name: app, endpoints: ["127.0.0.1:9"] }
flags:
  new-checkout: { enabled: true }
  dark-mode: { enabled: false }
"#;

async fn control_with(opts: spur_control::Options) -> spur_control::ControlHandle {
    spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: temp_dir("control-api"),
        ..opts
    })
    .await
    .expect("control plane starts")
}

/// Issue 19, item 3: a PATCH of a flag that does not exist is a 404 that names the flags
/// that do, and stores nothing.
#[tokio::test]
async fn patching_an_unknown_flag_is_404_and_changes_nothing() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    assert_eq!(
        call(c, "PUT", "/v1/groups/shop/config", Some(FLAGGED), None)
            .await
            .0,
        200
    );
    let (s, v) = call(
        c,
        "PATCH",
        "/v1/groups/shop/flags/nope",
        Some(r#"{"enabled": true}"#),
        None,
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("no flag `nope`"), "{msg}");
    assert!(msg.contains("dark-mode, new-checkout"), "{msg}");
    let (_, cfg) = call(c, "GET", "/v1/groups/shop/config", None, None).await;
    assert_eq!(cfg["version"], 1, "nothing stored");
    assert!(cfg["config"]["flags"].get("nope").is_none());
    // The real flag still patches.
    let (s, v) = call(
        c,
        "PATCH",
        "/v1/groups/shop/flags/dark-mode",
        Some(r#"{"enabled": true}"#),
        None,
    )
    .await;
    assert_eq!((s, &v["version"]), (200, &serde_json::json!(2)));
}

/// Issue 20, item 13: `/v1/proxies` forgets proxies that have not been heard from for the
/// configured time, unless their watch stream is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_not_seen_for_a_while_are_forgotten() {
    let cp = control_with(spur_control::Options {
        forget_proxies_after: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let c = cp.addr;
    for i in 0..50 {
        let path = format!("/v1/groups/shop/proxies/fake-{i}/status");
        let (s, _) = call(c, "POST", &path, Some(r#"{"applied_version": 1}"#), None).await;
        assert_eq!(s, 200);
    }
    // A real proxy keeps its watch stream open.
    let proxy = std::sync::Arc::new(spur_proxy::Proxy::idle().unwrap());
    spur_proxy::reload::spawn_control(
        proxy.clone(),
        spur_proxy::reload::ControlSource {
            url: format!("http://{c}"),
            client: spur_proxy::control_client::client(None).unwrap(),
            node: "real".into(),
            group: "shop".into(),
            token: None,
        },
    );
    let nodes = || async {
        let (_, v) = call(c, "GET", "/v1/proxies", None, None).await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            nodes().await.contains(&"real".to_string())
        })
        .await
    );
    assert_eq!(nodes().await.len(), 51);
    let forgotten = eventually(Duration::from_secs(5), || async {
        nodes().await == ["real"]
    })
    .await;
    assert!(forgotten, "{:?}", nodes().await);
}

/// Issue 20, item 8: connections that send nothing (or never finish a request head) are
/// closed after the head timeout, and connections over the cap are closed at once; the
/// API keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_capped() {
    let cp = control_with(spur_control::Options {
        limits: spur_control::serve::Limits {
            header_timeout: Duration::from_millis(500),
            max_connections: 40,
        },
        ..Default::default()
    })
    .await;
    let c = cp.addr;
    let mut silent = Vec::new();
    for i in 0..30 {
        let mut s = tokio::net::TcpStream::connect(c).await.unwrap();
        if i % 3 == 1 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap(); // no end
        } else if i % 3 == 2 {
            s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(); // half a preface
        }
        silent.push(s);
    }
    let open = || async {
        metric(c, "spur_control_connections", &[])
            .await
            .unwrap_or(0.0)
    };
    assert!(eventually(Duration::from_secs(2), || async { open().await >= 30.0 }).await);
    // Over the cap: closed at accept.
    let mut extra = Vec::new();
    for _ in 0..15 {
        extra.push(tokio::net::TcpStream::connect(c).await.unwrap());
    }
    let mut closed = 0;
    for mut s in extra {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 5, "{closed} of 15 closed at once");
    assert!(
        metric(c, "spur_control_connections_rejected_total", &[])
            .await
            .unwrap_or(0.0)
            >= 5.0
    );
    // Every silent connection is closed by the server within the timeout (and some).
    let started = Instant::now();
    for mut s in silent {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "a silent connection was still open after {:?}",
            started.elapsed()
        );
    }
    assert!(eventually(Duration::from_secs(2), || async { open().await <= 1.0 }).await);
    assert_eq!(call(c, "GET", "/healthz", None, None).await.0, 200);
}

/// A config body that takes a while to parse and validate (~70k clusters, ~4 MB) and is
/// then refused (a duplicate name at the end), so nothing is stored.
fn heavy_body() -> String {
    let mut text = String::from("clusters:\n");
    let mut i = 0;
    while text.len() < 3_900_000 {
        text.push_str(&format!(
            "  - {{ name: c{i}, endpoints: [\"127.0.0.1:{}\"] }}\n",
            1000 + i % 60000
        ));
        i += 1;
    }
    text.push_str("  - { name: c0, endpoints: [\"127.0.0.1:1\"] }\n");
    text
}

/// Issue 20, item 9: bodies are parsed off the request threads, so slow PUTs do not
/// stall `/healthz` (nor the watch streams). The control plane is a real process with
/// its default worker threads (one per core).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_do_not_stall_the_api() {
    let data = temp_dir("control-heavy");
    let cp = spawn_spur_control(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let c = cp.control.unwrap();
    let body = std::sync::Arc::new(heavy_body());
    let mut puts = Vec::new();
    for _ in 0..4 {
        let body = body.clone();
        puts.push(tokio::spawn(async move {
            let started = Instant::now();
            let (s, _) = call(c, "PUT", "/v1/groups/shop/config", Some(&body), None).await;
            (s, started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest = Duration::ZERO;
    while !puts.iter().all(|p| p.is_finished()) {
        let started = Instant::now();
        assert_eq!(call(c, "GET", "/healthz", None, None).await.0, 200);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut longest_put = Duration::ZERO;
    for p in puts {
        let (s, took) = p.await.unwrap();
        assert_eq!(s, 400, "the heavy body is refused");
        longest_put = longest_put.max(took);
    }
    assert!(
        slowest < Duration::from_millis(500) && slowest * 3 < longest_put,
        "/healthz took up to {slowest:?} while PUTs took up to {longest_put:?}"
    );
}

/// Runs `spur ARGS` and waits for it to exit (for at most 20 s: a `spur control` that
/// starts when it should not is killed, and the test fails on its exit status).
fn spur(args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// Issue 20, item 10: `spur control` refuses to listen where other hosts can reach it
/// without a token, unless told the open API is meant; issue 19, item 6: a missing token
/// file says how to make one.
#[test]
fn an_open_api_on_a_public_address_is_refused() {
    let data = temp_dir("control-open");
    let d = data.to_str().unwrap();
    let out = spur(&["control", "--listen", "0.0.0.0:0", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-no-token"), "{err}");
    assert!(err.contains("head -c 32 /dev/urandom | base64 >"), "{err}");

    let missing = data.join("token");
    let out = spur(&[
        "control",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        d,
        "--token-file",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "make one with: head -c 32 /dev/urandom | base64 > {}",
            missing.display()
        )),
        "{err}"
    );

    let open = spawn_spur_control(&[
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        d,
        "--insecure-no-token",
    ]);
    let warned = open
        .stderr_lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("--insecure-no-token: anyone"));
    assert!(warned);
}
