//! End-to-end: canary rollouts on autopilot (issue 21). A real `spur control`, two `spur
//! proxy` processes of group `shop` and two backends (v1, the baseline; v2, the canary,
//! healthy, failing or slow on demand); load at about 50 requests a second, each user on
//! one proxy as a client is on its sidecar. The rollout is started, paused, resumed and
//! read through the API and `spur rollout`, and judged on the proxies' reports.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "rollout-secret";
const HEALTHY: u8 = 0;
/// 30% of the canary's answers are 500s.
const FAILING: u8 = 1;
/// The canary answers 200 ms late.
const SLOW: u8 = 2;

fn config(
    v1: SocketAddr,
    v2: SocketAddr,
    interval: &str,
    on_failure: &str,
    w: (u32, u32),
) -> String {
    format!(
        r#"
listeners:
  - name: web
    listen: "127.0.0.1:0"
    routes:
      - name: checkout
        match: {{ path_prefix: / }}
        split: [{{ cluster: v1, weight: {} }}, {{ cluster: v2, weight: {} }}]
        hash_on: header:x-user-id
clusters:
  - {{ name: v1, endpoints: ["{v1}"] }}
  - {{ name: v2, endpoints: ["{v2}"] }}
rollouts:
  checkout-v2:
    route: checkout
    canary: v2
    steps: [20, 50, 100]
    interval: {interval}
    min_requests: 15
    max_error_rate_increase: 5%
    max_p99_increase: 50%
    min_p99_increase: 100ms
    on_failure: {on_failure}
"#,
        w.0, w.1
    )
}

struct Mesh {
    control: SpurProcess,
    addr: SocketAddr,
    data: std::path::PathBuf,
    token_file: String,
    proxies: Vec<SpurProcess>,
    v1: Backend,
    v2: Backend,
}

async fn backend_of(name: &'static str, mode: Arc<AtomicU8>) -> Backend {
    let count = Arc::new(AtomicU64::new(0));
    backend(move |_req: Request<Incoming>| {
        let mode = mode.load(Ordering::Relaxed);
        let n = count.fetch_add(1, Ordering::Relaxed);
        async move {
            if mode == SLOW {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Three of every ten: exactly 30%, whatever the order of arrival.
            let status = if mode == FAILING && n % 10 < 3 {
                500
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

/// A control plane process with the group's config, and two proxies watching it.
async fn mesh(canary: u8, interval: &str, on_failure: &str) -> Mesh {
    let v1 = backend_of("v1", Arc::new(AtomicU8::new(HEALTHY))).await;
    let v2 = backend_of("v2", Arc::new(AtomicU8::new(canary))).await;
    let data = temp_dir("rollouts");
    let token_file = data.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let token_file = token_file.to_str().unwrap().to_string();
    let control = start_control_process(&data, &token_file, "127.0.0.1:0");
    let addr = control.control.unwrap();
    let (s, v) = call(
        addr,
        "PUT",
        "/v1/groups/shop/config",
        Some(&config(v1.addr, v2.addr, interval, on_failure, (90, 10))),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let url = format!("http://{addr}");
    let proxies = (0..2)
        .map(|i| {
            let node = format!("p{i}");
            spawn_spur_with(
                &[
                    "proxy",
                    "--control",
                    &url,
                    "--node",
                    &node,
                    "--group",
                    "shop",
                    "--token-file",
                    &token_file,
                ],
                1,
                false,
            )
        })
        .collect();
    Mesh {
        control,
        addr,
        data,
        token_file,
        proxies,
        v1,
        v2,
    }
}

fn start_control_process(data: &std::path::Path, token_file: &str, listen: &str) -> SpurProcess {
    spawn_spur_control(&[
        "--listen",
        listen,
        "--data-dir",
        data.to_str().unwrap(),
        "--token-file",
        token_file,
    ])
}

/// What the load saw: each answer with when it came, the user and the backend.
#[derive(Default)]
struct Seen {
    answers: Vec<(Instant, String, String, u16)>,
}

impl Seen {
    /// Per user, the backends that answered, in order.
    fn by_user(&self) -> HashMap<&str, Vec<&str>> {
        let mut out: HashMap<&str, Vec<&str>> = HashMap::new();
        for (_, user, backend, _) in &self.answers {
            out.entry(user).or_default().push(backend);
        }
        out
    }
}

const USERS: usize = 100;

/// About 50 requests a second spread over [`USERS`] users, each user always through the
/// same proxy, until `stop` is set or two minutes pass.
fn load(mesh: &Mesh, stop: Arc<AtomicBool>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let proxies: Vec<SocketAddr> = mesh.proxies.iter().map(|p| p.listeners["web"]).collect();
    let out = seen.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            tick.tick().await;
            let u = i % USERS;
            let user = format!("user-{u}");
            let addr = proxies[u % proxies.len()];
            let out = out.clone();
            tokio::spawn(async move {
                let a = get(addr, "/buy", &[("x-user-id", &user)]).await;
                let backend = a.header("x-backend").unwrap_or("-").to_string();
                let mut s = out.lock().unwrap();
                s.answers.push((Instant::now(), user, backend, a.status));
            });
            i += 1;
        }
    });
    seen
}

async fn status(addr: SocketAddr) -> Value {
    let (s, v) = call(
        addr,
        "GET",
        "/v1/groups/shop/rollouts/checkout-v2",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn act(addr: SocketAddr, action: &str) -> (u16, Value) {
    let path = format!("/v1/groups/shop/rollouts/checkout-v2/{action}");
    call(addr, "POST", &path, None, Some(TOKEN)).await
}

/// Polls the rollout's status until `done` holds; panics with the last status after
/// `within`.
async fn until(addr: SocketAddr, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some((200, v)) = try_call(
            addr,
            "GET",
            "/v1/groups/shop/rollouts/checkout-v2",
            None,
            Some(TOKEN),
        )
        .await
        {
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "gave up waiting; status: {v:#}");
        } else {
            assert!(
                Instant::now() < deadline,
                "the control plane did not answer"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn history(addr: SocketAddr) -> Vec<String> {
    let (s, v) = call(addr, "GET", "/v1/groups/shop/history", None, Some(TOKEN)).await;
    assert_eq!(s, 200);
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["action"].as_str().unwrap().to_string())
        .collect()
}

async fn weights(addr: SocketAddr) -> Vec<u64> {
    let (_, v) = call(addr, "GET", "/v1/groups/shop/config", None, Some(TOKEN)).await;
    v["config"]["listeners"][0]["routes"][0]["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["weight"].as_u64().unwrap())
        .collect()
}

async fn control_metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = get(addr, "/metrics", &[]).await.text();
    metric_in(&text, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_within_two_intervals() {
    let m = mesh(FAILING, "3s", "rollback").await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = load(&m, stop.clone());
    let (s, v) = act(m.addr, "start").await;
    assert_eq!(s, 200, "{v}");
    let started = Instant::now();
    assert_eq!(
        (
            v["state"].as_str(),
            v["step"].as_u64(),
            v["weight"].as_u64()
        ),
        (Some("running"), Some(1), Some(20))
    );
    let v = until(m.addr, Duration::from_secs(20), |v| v["state"] != "running").await;
    let took = started.elapsed();
    assert_eq!(v["state"], "rolled_back", "{v:#}");
    assert!(
        took <= Duration::from_secs(6),
        "rolled back after {took:?}, more than two 3 s intervals"
    );
    let verdict = &v["verdicts"][0];
    assert_eq!(
        (verdict["step"].as_u64(), verdict["result"].as_str()),
        (Some(1), Some("fail"))
    );
    let rate = verdict["canary"]["error_rate"].as_f64().unwrap();
    assert!((0.2..=0.4).contains(&rate), "canary error rate {rate}");
    assert_eq!(verdict["baseline"]["error_rate"].as_f64(), Some(0.0));
    assert!(verdict["canary"]["requests"].as_u64().unwrap() >= 15);
    // The history names the numbers; the canary gets nothing any more.
    let h = history(m.addr).await;
    assert!(
        h[0].starts_with("rollout checkout-v2: rolled back — canary error rate ")
            && h[0].contains("% vs baseline 0.0% (max +5%)"),
        "{h:?}"
    );
    assert_eq!(h[1], "rollout checkout-v2: step 1/3 (20%)");
    assert_eq!(weights(m.addr).await, vec![100, 0]);
    assert_eq!(
        control_metric(
            m.addr,
            "spur_control_rollout_verdicts_total",
            &[
                ("group", "shop"),
                ("rollout", "checkout-v2"),
                ("verdict", "fail")
            ]
        )
        .await,
        Some(1.0)
    );
    // Proxies apply the rollback version within moments: from then on, only v1.
    let after = Instant::now() + Duration::from_millis(500);
    let later = || {
        seen.lock()
            .unwrap()
            .answers
            .iter()
            .filter(|a| a.0 > after)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || async { later() >= 40 }).await,
        "the load goes on"
    );
    let s = seen.lock().unwrap();
    let wrong: Vec<_> = s
        .answers
        .iter()
        .filter(|a| a.0 > after && a.2 != "v1")
        .collect();
    assert!(
        wrong.is_empty(),
        "answers not from v1 after the rollback: {wrong:?}"
    );
    drop(s);
    stop.store(true, Ordering::Relaxed);
    drop(m.v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_walks_every_step_and_users_stay_on_it() {
    let m = mesh(HEALTHY, "2s", "rollback").await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = load(&m, stop.clone());
    // Before the start: idle, at the config's 10%.
    let v = status(m.addr).await;
    assert_eq!(
        (v["state"].as_str(), v["weight"].as_u64()),
        (Some("idle"), Some(10))
    );
    let (s, v) = act(m.addr, "start").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = act(m.addr, "start").await;
    assert_eq!(s, 409, "a running rollout does not start again: {v}");
    let v = until(m.addr, Duration::from_secs(40), |v| v["state"] != "running").await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(
        (v["step"].as_u64(), v["weight"].as_u64()),
        (Some(3), Some(100))
    );
    let verdicts = v["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 2, "steps 1 and 2 judged: {v:#}");
    for (k, verdict) in verdicts.iter().enumerate() {
        assert_eq!(verdict["result"], "pass", "{verdict}");
        assert_eq!(verdict["step"].as_u64(), Some(k as u64 + 1));
        assert!(verdict["baseline"]["requests"].as_u64().unwrap() > 0);
        assert!(verdict["canary"]["p99_ms"].as_f64().is_some());
    }
    let h = history(m.addr).await;
    assert_eq!(
        &h[..3],
        [
            "rollout checkout-v2: succeeded — step 3/3 (100%)",
            "rollout checkout-v2: step 2/3 (50%)",
            "rollout checkout-v2: step 1/3 (20%)",
        ],
        "{h:?}"
    );
    assert_eq!(weights(m.addr).await, vec![0, 100]);
    assert_eq!(
        control_metric(
            m.addr,
            "spur_control_rollout_step",
            &[("group", "shop"), ("rollout", "checkout-v2")]
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        control_metric(
            m.addr,
            "spur_control_rollout_verdicts_total",
            &[
                ("group", "shop"),
                ("rollout", "checkout-v2"),
                ("verdict", "pass")
            ]
        )
        .await,
        Some(2.0)
    );
    // Stickiness across steps: a user who got the canary never went back to v1.
    let s = seen.lock().unwrap();
    assert!(s.answers.iter().all(|a| a.3 == 200));
    let mut moved = 0;
    for (user, backends) in &s.by_user() {
        if let Some(first) = backends.iter().position(|b| *b == "v2") {
            assert!(
                backends[first..].iter().all(|b| *b == "v2"),
                "{user} saw the canary and then v1 again: {backends:?}"
            );
            moved += usize::from(backends[0] == "v1");
        }
    }
    assert!(
        moved >= 5,
        "only {moved} users moved to the canary during the rollout"
    );
    drop(s);

    // `spur rollout status` prints the verdicts.
    let out = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "rollout",
            "status",
            "--control",
            &format!("http://{}", m.addr),
            "--group",
            "shop",
            "--token-file",
            &m.token_file,
            "checkout-v2",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("rollout checkout-v2 (group shop): succeeded, step 3/3 (100%)"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" pass ")).count(),
        2,
        "{text}"
    );
    assert!(
        text.contains("canary error rate 0.0% vs baseline 0.0%"),
        "{text}"
    );
    drop(m.v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_fails_on_p99_and_pauses() {
    let m = mesh(SLOW, "2s", "pause").await;
    let stop = Arc::new(AtomicBool::new(false));
    let _seen = load(&m, stop.clone());
    let (s, _) = act(m.addr, "start").await;
    assert_eq!(s, 200);
    let v = until(m.addr, Duration::from_secs(20), |v| v["state"] != "running").await;
    assert_eq!(v["state"], "paused", "{v:#}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("canary p99 2") && reason.ends_with("(max +50%)"),
        "{reason}"
    );
    assert_eq!(v["verdicts"][0]["result"], "fail");
    assert!(v["verdicts"][0]["canary"]["p99_ms"].as_f64().unwrap() >= 200.0);
    // Paused: the weights stay where the step put them.
    assert_eq!(
        (v["step"].as_u64(), v["weight"].as_u64()),
        (Some(1), Some(20))
    );
    assert_eq!(weights(m.addr).await, vec![80, 20]);
    // Abort sends the canary nothing; a second abort is refused.
    let (s, v) = act(m.addr, "abort").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["state"].as_str(), v["weight"].as_u64()),
        (Some("aborted"), Some(0))
    );
    assert_eq!(weights(m.addr).await, vec![100, 0]);
    let (s, v) = act(m.addr, "abort").await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("is aborted"),
        "{v}"
    );
    stop.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_resumes_the_step_and_a_users_put_pauses() {
    let mut m = mesh(HEALTHY, "3s", "rollback").await;
    let stop = Arc::new(AtomicBool::new(false));
    let _seen = load(&m, stop.clone());
    let (s, _) = act(m.addr, "start").await;
    assert_eq!(s, 200);
    until(m.addr, Duration::from_secs(20), |v| v["step"] == 2).await;
    // kill -9, and the same address and data directory again.
    m.control.child.kill().unwrap();
    m.control.child.wait().unwrap();
    m.control = start_control_process(&m.data, &m.token_file, &m.addr.to_string());
    let v = status(m.addr).await;
    assert_eq!(
        (
            v["state"].as_str(),
            v["step"].as_u64(),
            v["weight"].as_u64()
        ),
        (Some("running"), Some(2), Some(50)),
        "{v:#}"
    );
    assert_eq!(weights(m.addr).await, vec![50, 50]);
    // A user's PUT that changes the split wins: the rollout pauses and says why.
    let (s, v) = call(
        m.addr,
        "PUT",
        "/v1/groups/shop/config",
        Some(&config(m.v1.addr, m.v2.addr, "3s", "rollback", (70, 30))),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let put = v["version"].as_u64().unwrap();
    let v = until(m.addr, Duration::from_secs(5), |v| v["state"] != "running").await;
    assert_eq!(v["state"], "paused", "{v:#}");
    assert_eq!(
        v["reason"].as_str().unwrap(),
        format!("version {put} (put) changed route `checkout`'s split to 70/30: the user's change wins; resume to go on from step 2 (50%)")
    );
    assert_eq!(
        weights(m.addr).await,
        vec![70, 30],
        "the user's weights stay"
    );
    // Resume: the step's weights again, then on to the end.
    let (s, v) = act(m.addr, "resume").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        history(m.addr).await[0],
        "rollout checkout-v2: step 2/3 (50%) (resumed)"
    );
    let v = until(m.addr, Duration::from_secs(40), |v| v["state"] != "running").await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    stop.store(true, Ordering::Relaxed);
}

#[tokio::test]
async fn rollout_calls_say_what_is_wrong() {
    let (cp, _dir) = start_control(Some(TOKEN)).await;
    let c = cp.addr;
    let path = "/v1/groups/shop/rollouts/checkout-v2";
    let (s, _) = call(c, "GET", path, None, None).await;
    assert_eq!(s, 401, "the token is needed");
    let (s, v) = call(c, "GET", path, None, Some(TOKEN)).await;
    assert_eq!(s, 404, "{v}");
    let cfg = config(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "2s",
        "rollback",
        (90, 10),
    );
    let (s, _) = call(c, "PUT", "/v1/groups/shop/config", Some(&cfg), Some(TOKEN)).await;
    assert_eq!(s, 200);
    let (s, v) = call(
        c,
        "POST",
        "/v1/groups/shop/rollouts/nope/start",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        v["errors"][0]["message"],
        "group `shop` has no rollout `nope` in its config (its rollouts: checkout-v2); add one under `rollouts:` with PUT .../config"
    );
    let (s, v) = call(c, "POST", &format!("{path}/pause"), None, Some(TOKEN)).await;
    assert_eq!(
        (s, v["errors"][0]["message"].as_str()),
        (
            409,
            Some("rollout `checkout-v2` is idle (never started): cannot pause it")
        )
    );
    let (s, v) = call(c, "POST", &format!("{path}/frobnicate"), None, Some(TOKEN)).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = call(c, "GET", "/v1/groups/shop/rollouts", None, Some(TOKEN)).await;
    assert_eq!(s, 200);
    assert_eq!(v["rollouts"][0]["state"], "idle");
    assert_eq!(v["rollouts"][0]["steps"], serde_json::json!([20, 50, 100]));
    // A config whose rollout names a route without a split is refused at its path.
    let bad = cfg.replace("route: checkout", "route: nowhere");
    let (s, v) = call(c, "PUT", "/v1/groups/shop/config", Some(&bad), Some(TOKEN)).await;
    assert_eq!(s, 400);
    assert_eq!(v["errors"][0]["path"], "rollouts.checkout-v2.route");
}
