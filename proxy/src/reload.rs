//! Where new configs come from while the proxy runs: the control plane's watch stream, or
//! the config file (on SIGHUP, and polled with `--watch`). Either way a new config goes
//! through [`Proxy::apply`], which rejects it whole or applies it whole.

use crate::Proxy;
use bytes::{Bytes, BytesMut};
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use spur_config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long the watch stream may stay silent (the control plane sends a heartbeat line
/// every 10 s) before the proxy treats the connection as dead and reconnects.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A watch stream that stayed open this long was a working connection: the next reconnect
/// starts the backoff afresh. A shorter one (accepted, then closed at once) keeps growing
/// it, so a control plane or a middlebox that drops every stream is not hammered.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// Where to watch for configs.
#[derive(Clone, Debug)]
pub struct ControlSource {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub url: String,
    /// The HTTP(S) client for it ([`crate::control_client::client`]).
    pub client: crate::control_client::ControlClient,
    pub node: String,
    pub group: String,
    pub token: Option<String>,
}

/// A line of the watch stream: a version, or a tap order (see [`crate::tap`]).
#[derive(Deserialize)]
struct Pushed {
    version: Option<u64>,
    config: Option<serde_json::Value>,
    tap: Option<spur_config::report::TapOrder>,
}

type HttpClient = crate::control_client::ControlClient;

/// Capped exponential backoff with full jitter.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = BACKOFF_BASE
            .saturating_mul(1 << self.attempt.min(10))
            .min(BACKOFF_MAX);
        self.attempt += 1;
        Duration::from_millis(fastrand::u64(
            cap.as_millis() as u64 / 2..=cap.as_millis() as u64,
        ))
    }
}

/// Ends a task when dropped (with the watch task that started it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a watch stream ended: each is logged as what it is, so "unreachable" means that.
#[derive(Debug)]
enum WatchEnd {
    /// The control plane closed the stream (a restart, a drain).
    Closed,
    /// No connection: refused, timed out, TLS failed.
    Unreachable(String),
    /// Connected, but the watch was answered with an error status (a wrong token, a bad
    /// group name).
    Refused(String),
    /// The stream broke or fell silent past [`SILENCE_LIMIT`].
    Broken(String),
}

/// Watches the control plane for the proxy's group, for as long as the process runs:
/// applies each version, reports the outcome, reconnects with backoff when the stream
/// breaks, and resumes after the newest version it has seen.
///
/// A version the proxy rejects (invalid here, or a listener it cannot bind) is reported
/// once and the stream stays open, waiting for the next version: reconnecting could only
/// fetch the same version again.
pub fn spawn_control(proxy: Arc<Proxy>, src: ControlSource) -> tokio::task::JoinHandle<()> {
    let reporter = crate::report::Reporter::spawn(&proxy, src.clone());
    tokio::spawn(async move {
        // Demand reports of group rate limits (see `group_share`).
        let _reporter = AbortOnDrop(crate::group_share::spawn_reporter(
            proxy.clone(),
            src.clone(),
        ));
        let client: HttpClient = src.client.clone();
        let mut seen = proxy.version();
        let mut backoff = Backoff { attempt: 0 };
        loop {
            let opened = Instant::now();
            let url = src.url.as_str();
            let end = watch_once(&proxy, &reporter, &client, &src, &mut seen).await;
            // Whoever asked for a tap may be gone with the stream: ask again or stay off.
            proxy.shared.tap.stop();
            match end {
                WatchEnd::Closed => {
                    tracing::info!(
                        url,
                        "the control plane closed the watch stream; reconnecting"
                    )
                }
                WatchEnd::Unreachable(error) => tracing::warn!(
                    url,
                    error,
                    "control plane unreachable; serving the last good config (will retry)"
                ),
                WatchEnd::Refused(error) => tracing::warn!(
                    url,
                    error,
                    "the control plane refused the watch; serving the last good config (will retry)"
                ),
                WatchEnd::Broken(error) => tracing::warn!(
                    url,
                    error,
                    "watch stream broken; serving the last good config (will reconnect)"
                ),
            }
            if opened.elapsed() >= STABLE_STREAM {
                backoff.attempt = 0;
            }
            tokio::time::sleep(backoff.next()).await;
        }
    })
}

/// A request to the control plane, with the API token when there is one.
pub(crate) fn request(
    src: &ControlSource,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", src.url));
    if let Some(t) = &src.token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    req.body(Full::new(body))
        .map_err(|e| format!("bad control URL {}: {e}", src.url))
}

async fn watch_once(
    proxy: &Arc<Proxy>,
    reporter: &crate::report::Reporter,
    client: &HttpClient,
    src: &ControlSource,
    seen: &mut u64,
) -> WatchEnd {
    let path = format!(
        "/v1/groups/{}/watch?after={}&node={}",
        src.group, *seen, src.node
    );
    let req = match request(src, http::Method::GET, &path, Bytes::new()) {
        Ok(r) => r,
        Err(e) => return WatchEnd::Refused(e),
    };
    let resp = match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
        Err(_) => return WatchEnd::Unreachable("connect timed out".into()),
        Ok(Err(e)) => return WatchEnd::Unreachable(crate::control_client::error_chain(&e)),
        Ok(Ok(r)) => r,
    };
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return WatchEnd::Refused(format!(
            "watch answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    tracing::info!(
        url = src.url.as_str(),
        group = src.group.as_str(),
        after = *seen,
        "watching the control plane"
    );
    reporter.set(proxy.version(), None);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(SILENCE_LIMIT, body.frame()).await {
            Err(_) => {
                return WatchEnd::Broken(format!(
                    "no word from the control plane for {SILENCE_LIMIT:?}"
                ))
            }
            Ok(None) => return WatchEnd::Closed,
            Ok(Some(Err(e))) => return WatchEnd::Broken(e.to_string()),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(pos + 1);
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue; // heartbeat
            }
            if crate::group_share::handle_line(proxy, text.trim()) {
                continue;
            }
            handle_line(proxy, reporter, src, text.trim(), seen).await;
        }
    }
}

/// Applies one pushed version and reports the outcome. Either way the version is done
/// with: a rejected one (an invalid config, a port that cannot be bound) stays rejected
/// until a newer version arrives (a PUT of the fixed config, or a rollback).
async fn handle_line(
    proxy: &Arc<Proxy>,
    reporter: &crate::report::Reporter,
    src: &ControlSource,
    line: &str,
    seen: &mut u64,
) {
    let pushed: Pushed = match serde_json::from_str(line) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable line from the control plane");
            return;
        }
    };
    if let Some(order) = pushed.tap {
        tracing::debug!(on = order.on, "tap order from the control plane");
        proxy.shared.tap.order(order, src);
        return;
    }
    let (Some(version), Some(config)) = (pushed.version, pushed.config) else {
        tracing::warn!("a line from the control plane without a version and a config");
        return;
    };
    if version <= *seen {
        return; // already applied or rejected
    }
    *seen = version;
    let result = match serde_json::from_value::<Config>(config) {
        Ok(cfg) => proxy
            .apply_pushed(cfg, version)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => {
            proxy.shared.metrics.count_update("rejected");
            let e = format!("config does not parse: {e}");
            tracing::warn!(version, error = %e, "config rejected; the previous one stays");
            Err(e)
        }
    };
    match result {
        Ok(()) => reporter.set(version, None),
        Err(e) => {
            tracing::info!(
                version,
                "rejected version reported to the control plane; waiting for the next one"
            );
            reporter.set(proxy.version(), Some((version, e)))
        }
    }
}

/// Reloads the config file on SIGHUP, and every second when it changed if `poll` is set.
pub fn spawn_file(proxy: Arc<Proxy>, path: PathBuf, poll: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut stamp = file_stamp(&path);
        loop {
            let tick = tokio::time::sleep(Duration::from_secs(1));
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let forced = tokio::select! {
                _ = hangup => true,
                _ = tick => false,
            };
            let now = file_stamp(&path);
            if forced || (poll && now != stamp) {
                stamp = now;
                reload_file(&proxy, &path).await;
            }
        }
    })
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

async fn reload_file(proxy: &Proxy, path: &std::path::Path) {
    let started = Instant::now();
    match spur_config::load_file(path) {
        Ok(cfg) => {
            if *proxy.shared.snapshot.load().config == cfg {
                tracing::debug!(file = %path.display(), "config file unchanged");
                return;
            }
            let version = proxy.version() + 1;
            if proxy.apply(cfg, version).await.is_ok() {
                tracing::info!(file = %path.display(), version, took_ms = started.elapsed().as_millis() as u64, "config file reloaded");
            }
        }
        Err(e) => {
            proxy.shared.metrics.count_update("rejected");
            tracing::warn!(file = %path.display(), errors = %e, "config file rejected; the previous one stays");
        }
    }
}
