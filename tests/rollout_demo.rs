//! End-to-end: the README's rollout walk-through (issue 21) as `spur demo` prints it, run
//! against the demo with traffic, to the end.

mod common;

use common::*;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The README's walk-through: `spur demo` prints the rollout lines; run as printed, with
/// traffic, the demo's rollout walks to 100%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_walk_through_runs() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.trim().starts_with("Ctrl-C");
            out.push(line);
            if done {
                break;
            }
        }
        out
    })
    .await
    .unwrap();
    let addr_of = |key: &str| -> SocketAddr {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap();
        let url = line.split_whitespace().nth(1).unwrap();
        url.trim_start_matches("http://").parse().unwrap()
    };
    let (proxy, control) = (addr_of("proxy "), addr_of("control "));
    let printed = |what: &str| -> Vec<String> {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("spur rollout {what} ")))
            .unwrap_or_else(|| panic!("the demo prints `spur rollout {what}`: {lines:#?}"));
        line.split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                tick.tick().await;
                let user = format!("u{i}");
                tokio::spawn(async move { get(proxy, "/hello", &[("x-user-id", &user)]).await });
                i += 1;
            }
        })
    };
    let spur = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = spur(printed("start"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with("rollout v2 (group demo): running, step 1/3 (10%)"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let out = spur(printed("status"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !text.contains(": running,") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        text.starts_with("rollout v2 (group demo): succeeded, step 3/3 (100%)"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" pass ")).count(),
        2,
        "{text}"
    );
    let (_, v) = call(control, "GET", "/v1/groups/demo/config", None, None).await;
    let split = &v["config"]["listeners"][0]["routes"][3]["split"];
    assert_eq!(
        (split[0]["weight"].as_u64(), split[1]["weight"].as_u64()),
        (Some(0), Some(100)),
        "{split}"
    );
    // SIGTERM: the demo removes its data directory on the way out.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
