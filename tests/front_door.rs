//! End-to-end: what a new user meets first (issue 19, items 6, 7, 9): `spur help
//! COMMAND`, the demo's mirrors, and the metrics a Prometheus user looks for first.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn spur(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .output()
        .unwrap()
}

/// `spur help proxy` prints the options of `spur proxy`, not the general help.
#[test]
fn spur_help_command_prints_that_commands_options() {
    for cmd in [
        "proxy",
        "control",
        "validate",
        "demo",
        "inject",
        "init-iptables",
    ] {
        let help = spur(&["help", cmd]);
        let direct = spur(&[cmd, "--help"]);
        assert!(help.status.success(), "spur help {cmd}");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            text.starts_with(&format!("usage: spur {cmd}")),
            "spur help {cmd}:\n{text}"
        );
        assert_eq!(
            help.stdout, direct.stdout,
            "spur help {cmd} = spur {cmd} --help"
        );
    }
    let general = spur(&["help"]);
    assert!(String::from_utf8_lossy(&general.stdout).contains("help [COMMAND]"));
    let unknown = spur(&["help", "frobnicate"]);
    assert_eq!(unknown.status.code(), Some(2));
}

/// The demo mirrors /catalog to another instance of the same build, which the comparison
/// finds `same`, and /checkout to another version, which it finds `differ`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_mirrors_show_same_and_differ() {
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
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (urls, printed) = tokio::task::spawn_blocking(move || {
        let mut urls = std::collections::HashMap::new();
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            printed.push_str(&line);
            printed.push('\n');
            let mut words = line.split_whitespace();
            if let (Some(k @ ("proxy" | "admin")), Some(u)) = (words.next(), words.next()) {
                let addr: std::net::SocketAddr = u.trim_start_matches("http://").parse().unwrap();
                urls.insert(k.to_string(), addr);
            }
            if line.trim().starts_with("Ctrl-C") {
                break;
            }
        }
        (urls, printed)
    })
    .await
    .unwrap();
    assert!(printed.contains("/catalog"), "{printed}");
    let (addr, admin) = (urls["proxy"], urls["admin"]);
    let catalog = get(addr, "/catalog", &[]).await;
    assert_eq!(catalog.status, 200);
    assert_eq!(catalog.header("x-backend"), Some("catalog"));
    assert_eq!(get(addr, "/checkout", &[]).await.status, 200);
    let mirrored = |cluster: &'static str, outcome: &'static str| async move {
        metric(
            admin,
            "spur_mirror_requests_total",
            &[("cluster", cluster), ("outcome", outcome)],
        )
        .await
        .unwrap_or(0.0)
    };
    let both = eventually(Duration::from_secs(5), || async {
        mirrored("catalog-next", "same").await >= 1.0 && mirrored("v2", "differ").await >= 1.0
    })
    .await;
    assert!(both, "{}", get(admin, "/metrics", &[]).await.text());
    assert_eq!(mirrored("catalog-next", "differ").await, 0.0);
    let _ = child.kill();
    let _ = child.wait();
}

/// Checks the process metrics and `spur_build_info` in a scrape of a process that started
/// at `started` (Unix seconds).
fn check_process_metrics(text: &str, started: f64) {
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric_in(text, "spur_build_info", &[("version", version)]).unwrap_or(-1.0),
        1.0,
        "{text}"
    );
    let rss = metric_in(text, "process_resident_memory_bytes", &[]).unwrap_or(-1.0);
    assert!(rss > 1_000_000.0, "rss {rss}");
    assert!(metric_in(text, "process_virtual_memory_bytes", &[]).unwrap_or(-1.0) >= rss);
    let fds = metric_in(text, "process_open_fds", &[]).unwrap_or(-1.0);
    assert!(fds >= 4.0, "open fds {fds}");
    assert!(metric_in(text, "process_max_fds", &[]).unwrap_or(-1.0) >= fds);
    assert!(metric_in(text, "process_threads", &[]).unwrap_or(-1.0) >= 1.0);
    let start = metric_in(text, "process_start_time_seconds", &[]).unwrap_or(-1.0);
    assert!(
        (start - started).abs() < 30.0,
        "start time {start}, spawned at {started}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds counter"),
        "{text}"
    );
    assert!(text
        .lines()
        .any(|l| l.starts_with("process_cpu_seconds_total ")));
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `process_*` and `spur_build_info{version}` on the proxy's and the control plane's
/// `/metrics`, as real processes report them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_control_plane_report_process_metrics() {
    let started = now();
    let proxy = spawn_spur(
        "admin: { listen: \"127.0.0.1:0\" }\nlisteners:\n  - { name: web, listen: \"127.0.0.1:0\", cluster: app }\nclusters:\n  - { name: app, endpoints: [\"127.0.0.1:9\"] }\n",
        1,
    );
    let text = get(proxy.admin.unwrap(), "/metrics", &[]).await.text();
    check_process_metrics(&text, started);

    let data = temp_dir("front-door-control");
    let control = spawn_spur_control(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let c = control.control.unwrap();
    let text = get(c, "/metrics", &[]).await.text();
    check_process_metrics(&text, started);
}
