//! The admin server: `/metrics`, `/ready`, `/live`, `/config`, `/clusters`.

use crate::Shared;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub async fn serve(shared: Arc<Shared>, tcp: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = tcp.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req)) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
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
