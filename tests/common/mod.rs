//! Helpers shared by the end-to-end tests: real backends on 127.0.0.1, the proxy in
//! process or as a child process, and real HTTP clients.
#![allow(dead_code)]

pub mod load;
pub mod pki;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use spur_proxy::Proxy;
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// A backend serving HTTP/1.1 and h2c on 127.0.0.1 with `handler`.
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Backend {
    /// Stops the backend as a crashed process would: the port refuses connections and
    /// every open connection is reset.
    pub fn kill(&self) {
        self.task.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn backend<F, Fut>(handler: F) -> Backend
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_backend(tcp, handler)
}

/// [`backend`] on a given address (another loopback IP such as 127.0.0.2, so that several
/// backends can share one port as a Service's pods do); `None` if it cannot be bound.
pub async fn backend_on<F, Fut>(addr: SocketAddr, handler: F) -> Option<Backend>
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let tcp = TcpListener::bind(addr).await.ok()?;
    Some(serve_backend(tcp, handler))
}

fn serve_backend<F, Fut>(tcp: TcpListener, handler: F) -> Backend
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let addr = tcp.local_addr().unwrap();
    let handler = Arc::new(handler);
    let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
    let tracked = conns.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let conn = tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
            let mut list = tracked.lock().unwrap();
            list.retain(|h| !h.is_finished());
            list.push(conn.abort_handle());
        }
    });
    Backend { addr, task, conns }
}

/// A backend that answers `name` and echoes the request headers as `x-echo-<name>` headers.
pub async fn named_backend(name: &'static str) -> Backend {
    backend(move |req: Request<Incoming>| async move {
        let mut resp = Response::builder().header("x-backend", name);
        for (k, v) in req.headers() {
            resp = resp.header(format!("x-echo-{}", k.as_str()), v.clone());
        }
        resp.body(Full::new(Bytes::from(name))).unwrap()
    })
    .await
}

/// Starts a proxy in this process from YAML; listeners should use port 0.
pub async fn start_proxy(yaml: &str) -> Proxy {
    let cfg = spur_config::load(yaml, Some("test.yaml"))
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    Proxy::start(cfg).await.expect("proxy starts")
}

/// Waits (at most 5 s) until `proxy` serves `version` with its listener `listener` bound;
/// returns the listener's address. A version is published with its listeners' addresses,
/// but a test polls for what it needs anyway.
pub async fn applied(proxy: &Proxy, version: u64, listener: &str) -> SocketAddr {
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.version() == version && proxy.listener_addr(listener).is_some()
        })
        .await,
        "version {version} with listener `{listener}` not applied (at version {})",
        proxy.version()
    );
    proxy.listener_addr(listener).unwrap()
}

/// A plain HTTP/1.1 client (pooled).
pub fn h1_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    req: Request<Full<Bytes>>,
) -> Answer {
    let resp = client
        .request(req)
        .await
        .expect("request reaches the proxy");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&h1_client(), req.body(Full::new(Bytes::new())).unwrap()).await
}

/// Scrapes the admin `/metrics` and returns the value of the sample with exactly these
/// name and labels (in any order; a label left out must be empty in the series, as
/// `grpc_status=""` of a request that is not gRPC); `None` when there is no such series, so that a renamed
/// or missing metric fails an assertion instead of reading as 0. Compare with `Some(x)`
/// (`== Some(0.0)`, `>= Some(1.0)`: `None` is less than any `Some`).
pub async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = get(admin, "/metrics", &[]).await.text();
    metric_in(&text, name, labels)
}

/// [`metric`] on a scraped text.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, v)| lbls.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        let count = lbls
            .split(',')
            .filter(|p| !p.is_empty() && !p.ends_with("=\"\""))
            .count()
            + labels.iter().filter(|(_, v)| v.is_empty()).count();
        if all && count == labels.len() {
            return Some(
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: `{value}` is not a number")),
            );
        }
    }
    None
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `spur` binary as a child process, with the addresses it logged when it bound.
pub struct SpurProcess {
    pub child: Child,
    pub listeners: std::collections::HashMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// `spur control`: the API's address.
    pub control: Option<SocketAddr>,
    pub stderr_lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for SpurProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SpurProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn sigterm(&self) {
        unsafe_kill(self.pid(), "TERM");
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Writes `yaml` to a temp file and runs `spur proxy --config` on it; waits until every
/// listener (and the admin server, if any) has logged its address.
pub fn spawn_spur(yaml: &str, expect_listeners: usize) -> SpurProcess {
    spawn_spur_env(yaml, &[], expect_listeners)
}

/// Runs `spur ARGS` (JSON logs) and waits until `expect_listeners` listeners (and the admin
/// server, when `expect_admin`) have logged their addresses.
pub fn spawn_spur_with(args: &[&str], expect_listeners: usize, expect_admin: bool) -> SpurProcess {
    spawn_until(args, &[], expect_listeners, expect_admin, false)
}

/// [`spawn_spur`] with extra environment variables.
pub fn spawn_spur_env(yaml: &str, env: &[(&str, &str)], expect_listeners: usize) -> SpurProcess {
    let dir = temp_dir("spur-test");
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let path = path.to_str().unwrap().to_string();
    spawn_until(
        &["proxy", "--config", &path],
        env,
        expect_listeners,
        yaml.contains("admin:"),
        false,
    )
}

/// Runs `spur control ARGS` (JSON logs; add `--listen 127.0.0.1:0`) and waits until it
/// has logged the address it listens on.
pub fn spawn_spur_control(args: &[&str]) -> SpurProcess {
    let mut all = vec!["control"];
    all.extend_from_slice(args);
    spawn_until(&all, &[], 0, false, true)
}

fn spawn_until(
    args: &[&str],
    env: &[(&str, &str)],
    expect_listeners: usize,
    expect_admin: bool,
    expect_control: bool,
) -> SpurProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .args(["--log-format", "json"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spur");
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            sink.lock().unwrap().push(line);
        }
    });
    let mut listeners = std::collections::HashMap::new();
    let mut admin = None;
    let mut control = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while listeners.len() < expect_listeners
        || (expect_admin && admin.is_none())
        || (expect_control && control.is_none())
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("spur did not start; stderr: {:?}", lines.lock().unwrap()));
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let msg = v["message"].as_str().unwrap_or("");
        if msg == "listening" {
            listeners.insert(
                v["listener"].as_str().unwrap().to_string(),
                v["addr"].as_str().unwrap().parse().unwrap(),
            );
        } else if msg == "admin listening" {
            admin = Some(v["addr"].as_str().unwrap().parse().unwrap());
        } else if msg == "control plane listening" {
            control = Some(v["addr"].as_str().unwrap().parse().unwrap());
        }
    }
    SpurProcess {
        child,
        listeners,
        admin,
        control,
        stderr_lines: lines,
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// A TCP port on 127.0.0.1 held by a socket that is bound but not listening, for as long
/// as this value lives. Connections to it are refused, and no `bind(0)` anywhere on the
/// machine is given it (the kernel skips bound ports), unlike a port taken by
/// `bind(0)`-then-drop, which the next test's listener may get meanwhile.
pub struct HeldPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl HeldPort {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn hold_port(port: u16, reuse: bool) -> std::io::Result<HeldPort> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(reuse)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let addr = socket.local_addr()?.as_socket().expect("an IPv4 address");
    Ok(HeldPort {
        addr,
        _socket: socket,
    })
}

/// An address nothing listens on, and nothing else can bind while the value lives (bound
/// without `SO_REUSEADDR`): a dead endpoint whose connections are refused.
pub fn refusing_addr() -> HeldPort {
    hold_port(0, false).expect("bind 127.0.0.1:0")
}

/// A port for a listener the test names before it is bound (a config pushed later, a
/// listener added and removed live). Held with `SO_REUSEADDR` so that a listener that sets
/// it too (Spur's, std's, tokio's) can bind and listen on it, while `bind(0)` elsewhere
/// never gets it; it stays held in the gaps when the test's own listener is not there.
pub fn reserved_port() -> HeldPort {
    hold_port(0, true).expect("bind 127.0.0.1:0")
}

/// Holds `port` again once its listener is gone (a killed [`Backend`]), so that it stays
/// refused and free for the test until it serves there again; waits (at most 5 s) for
/// the old listener to close.
pub async fn hold_again(port: u16) -> HeldPort {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match hold_port(port, true) {
            Ok(h) => return h,
            Err(e) if Instant::now() > deadline => panic!("port {port} not released: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spur-{tag}-{}-{}",
        std::process::id(),
        fastrand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A control plane in this process, on a free port, with its own data directory.
pub async fn start_control(
    token: Option<&str>,
) -> (spur_control::ControlHandle, std::path::PathBuf) {
    let dir = temp_dir("control");
    let h = spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.clone(),
        token: token.map(str::to_string),
        ca: None,
        kubernetes: None,
        ..Default::default()
    })
    .await
    .expect("control plane starts");
    (h, dir)
}

/// Sends a request with an optional body and bearer token; returns status and JSON body.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    try_call(addr, method, path, body, token)
        .await
        .expect("request reaches the server")
}

/// [`call`], but `None` when the server cannot be reached or the answer is cut off.
pub async fn try_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Option<(u16, serde_json::Value)> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .unwrap();
    let resp = h1_client().request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Some((status, v))
}

/// An idle in-process proxy fed by the control plane at `url` as `node` of `group`, once it
/// has applied version `version` (with listener `listener`); and its watch task.
pub async fn watching_proxy(
    url: String,
    node: &str,
    group: &str,
    version: u64,
    listener: &str,
) -> (std::sync::Arc<Proxy>, tokio::task::JoinHandle<()>) {
    let proxy = std::sync::Arc::new(Proxy::idle().unwrap());
    let watcher = spur_proxy::reload::spawn_control(
        proxy.clone(),
        spur_proxy::reload::ControlSource {
            url,
            client: spur_proxy::control_client::client(None).unwrap(),
            node: node.into(),
            group: group.into(),
            token: None,
        },
    );
    applied(&proxy, version, listener).await;
    (proxy, watcher)
}

/// Reads an h2 crate response body whole, and its trailers; each wait bounded (5 s).
pub async fn h2_read_body(mut body: h2::RecvStream) -> (Vec<u8>, Option<http::HeaderMap>) {
    const STEP: Duration = Duration::from_secs(5);
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, body.data())
        .await
        .expect("data in time")
    {
        let chunk = chunk.expect("body data");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(STEP, body.trailers())
        .await
        .expect("trailers in time")
        .expect("trailers");
    (out, trailers)
}
