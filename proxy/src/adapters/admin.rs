//! The admin server: `/metrics`, `/ready`, `/live`, `/config`, `/clusters`.
//!
//! Bounded like the listeners and the control API, since anything that reaches the port can
//! connect: a connection must send its first request head within [`HEAD_TIMEOUT`] (and each
//! later HTTP/1.1 head too; an HTTP/2 peer must answer pings), and at most
//! [`MAX_CONNECTIONS`] are open at once (more are closed at accept). Both are counted in
//! `spur_downstream_rejected_total{listener="admin"}`, as `max_connections` and as
//! `header_timeout` (a connection silent from the start).
//! The protocol is chosen by peeking for the HTTP/2 preface under the same deadline, not
//! by hyper's auto-detection, whose first read has none.

use crate::Shared;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// From accept to a complete request head; also the HTTP/2 ping interval and timeout.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once (scrapers and probes need a handful).
pub const MAX_CONNECTIONS: usize = 256;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Counts a connection as open until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub async fn serve(shared: Arc<Shared>, tcp: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let open = Arc::new(AtomicUsize::new(0));
    let label: Arc<str> = "admin".into();
    loop {
        let (stream, _) = tokio::select! {
            r = tcp.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.reject(&label, "max_connections");
            continue;
        }
        let guard = Open(open.clone());
        tokio::spawn(serve_conn(shared.clone(), stream, guard, label.clone()));
    }
}

async fn serve_conn(shared: Arc<Shared>, stream: TcpStream, _open: Open, label: Arc<str>) {
    let h2 = match tokio::time::timeout(HEAD_TIMEOUT, is_h2(&stream)).await {
        Ok(Some(h2)) => h2,
        Ok(None) => return,
        Err(_) => {
            shared.metrics.reject(&label, "header_timeout");
            return;
        }
    };
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, req)) }
    });
    let io = TokioIo::new(stream);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(HEAD_TIMEOUT)
            .keep_alive_timeout(HEAD_TIMEOUT)
            .max_concurrent_streams(16)
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .serve_connection(io, svc)
            .await;
    }
}

/// Whether the connection starts with the HTTP/2 preface (`None`: closed first).
async fn is_h2(stream: &TcpStream) -> Option<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far: peek does not consume, so wait a little before
        // looking again rather than spin (the caller's deadline bounds the wait).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static parts are valid")
}

fn json_reply(value: serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(&value).unwrap_or_default(),
    )
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            // Exemplars (trace IDs on request durations) only for a scraper that asks for
            // OpenMetrics: the Prometheus text format has no place for them.
            let openmetrics = req.headers().get_all(header::ACCEPT).iter().any(|v| {
                v.as_bytes()
                    .windows(28)
                    .any(|w| w.eq_ignore_ascii_case(b"application/openmetrics-text"))
            });
            let text = if openmetrics {
                shared.metrics.encode_openmetrics()
            } else {
                shared.metrics.encode()
            };
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => {
            if shared.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/config" => {
            let snap = shared.snapshot.load();
            json_reply(json!({ "version": snap.version, "config": &*snap.config }))
        }
        "/clusters" => {
            let snap = shared.snapshot.load();
            let mut names: Vec<&String> = snap.clusters.keys().collect();
            names.sort();
            let clusters: Vec<_> = names
                .into_iter()
                .map(|name| {
                    let c = &snap.clusters[name];
                    let members = c.members.load();
                    let endpoints: Vec<_> = members
                        .endpoints
                        .iter()
                        .map(|e| {
                            json!({
                                "address": &*e.label,
                                "weight": e.weight_now(),
                                "healthy": e.is_healthy(),
                                "ejected": e.is_ejected(),
                                "in_flight": e.in_flight_now(),
                                "ewma_ms": (e.ewma_ms() * 1000.0).round() / 1000.0,
                            })
                        })
                        .collect();
                    json!({ "name": name, "lb": c.lb, "endpoints": endpoints })
                })
                .collect();
            json_reply(json!({ "version": snap.version, "clusters": clusters }))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics /ready /live /config /clusters\n",
        ),
    }
}
