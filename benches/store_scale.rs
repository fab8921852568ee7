//! Scale of the control plane in replicas (issue 23): N simulated proxies' watch streams
//! spread over R replicas of `spur control --store kubernetes` (on the fake Kubernetes API
//! of the tests), one push, and how long until every watcher has it; each replica's memory.
//! Not a test: run it with benches/store_scale.sh (see benches/README.md).
//!
//! A simulated watcher is what a proxy's control client does on the wire: one HTTP/1.1
//! connection, `GET /v1/groups/bench/watch?after=1&node=NAME`, reading the stream until the
//! line of version 2 arrives. The push is a PUT on the first replica; the others learn of
//! it through their watch of the store, as in a cluster.

#[path = "../tests/support/fake_kube.rs"]
mod fake_kube;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

struct Args {
    watchers: usize,
    replicas: usize,
    spur: String,
}

fn args() -> Args {
    let mut a = Args {
        watchers: 1000,
        replicas: 3,
        spur: "target/debug/spur".into(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--watchers" => a.watchers = value().parse().expect("--watchers N"),
            "--replicas" => a.replicas = value().parse().expect("--replicas N"),
            "--spur-bin" => a.spur = value(),
            other => panic!("unknown option {other} (--watchers N --replicas N --spur-bin PATH)"),
        }
    }
    a
}

struct Replica {
    child: Child,
    api: SocketAddr,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

fn start_replica(spur: &str, kubeconfig: &std::path::Path) -> Replica {
    let mut child = Command::new(spur)
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "kubernetes",
        ])
        .args(["--namespace", "bench", "--log-format", "json"])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {spur}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "control plane listening" {
                let _ = tx.send(v["addr"].as_str().unwrap_or("").to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the replica starts");
    Replica {
        child,
        api: addr.parse().unwrap(),
    }
}

/// One HTTP/1.1 request with `Connection: close`; the status and body.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

async fn until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A watcher: connects, then returns when the line of version 2 has arrived, with the
/// moment it did. Sends `()` on `connected` once the stream's head is in.
async fn watcher(addr: SocketAddr, n: usize, connected: tokio::sync::mpsc::Sender<()>) -> Instant {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head =
        format!("GET /v1/groups/bench/watch?after=1&node=w{n} HTTP/1.1\r\nHost: bench\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut told = false;
    while let Some(line) = lines.next_line().await.unwrap() {
        if !told && line.is_empty() {
            told = true;
            let _ = connected.send(()).await;
        }
        if line.contains("\"version\":2") {
            return Instant::now();
        }
    }
    panic!("watcher {n}: the stream ended before version 2");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn config(note: &str) -> String {
    format!(
        "node: {note}\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    cluster: app\nclusters:\n  - name: app\n    endpoints: [\"127.0.0.1:9\"]\n"
    )
}

#[tokio::main]
async fn main() {
    let a = args();
    let kube = fake_kube::FakeKube::start().await;
    let dir = std::env::temp_dir().join(format!("spur-store-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = kube.kubeconfig(&dir);
    let replicas: Vec<Replica> = (0..a.replicas)
        .map(|_| start_replica(&a.spur, &kubeconfig))
        .collect();
    for r in &replicas {
        until("replica synced", Duration::from_secs(20), async || {
            request(r.api, "GET", "/readyz", "").await.0 == 200
        })
        .await;
    }
    let (s, body) = request(
        replicas[0].api,
        "PUT",
        "/v1/groups/bench/config",
        &config("one"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    for r in &replicas {
        until(
            "version 1 everywhere",
            Duration::from_secs(10),
            async || {
                request(r.api, "GET", "/v1/groups/bench/config", "")
                    .await
                    .1
                    .contains("\"version\":1")
            },
        )
        .await;
    }
    let idle: Vec<f64> = replicas.iter().map(Replica::rss_mib).collect();

    let (tx, mut rx) = tokio::sync::mpsc::channel(a.watchers.max(1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..a.watchers)
        .map(|n| tokio::spawn(watcher(replicas[n % replicas.len()].api, n, tx.clone())))
        .collect();
    for _ in 0..a.watchers {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("every watcher connects within 60 s");
    }
    let connect_time = started.elapsed();
    let watching: Vec<f64> = replicas.iter().map(Replica::rss_mib).collect();

    let push = Instant::now();
    let (s, body) = request(
        replicas[0].api,
        "PUT",
        "/v1/groups/bench/config",
        &config("two"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let mut latencies = Vec::with_capacity(a.watchers);
    for t in tasks {
        let at = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every watcher gets the push within 60 s")
            .unwrap();
        latencies.push(at.saturating_duration_since(push));
    }
    latencies.sort();
    let after: Vec<f64> = replicas.iter().map(Replica::rss_mib).collect();

    println!(
        "{} watchers over {} replicas (connected in {connect_time:.2?}); one PUT on replica 0",
        a.watchers, a.replicas
    );
    println!(
        "until every watcher had it: p50 {:.1?}  p99 {:.1?}  max {:.1?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    for (i, _) in replicas.iter().enumerate() {
        println!(
            "replica {i}: RSS {:.1} MiB idle, {:.1} MiB with its watchers, {:.1} MiB after the push",
            idle[i], watching[i], after[i]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
