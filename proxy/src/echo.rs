//! A small echo backend for `spur demo` and for trying routes by hand: it answers every
//! request with JSON naming itself and describing the request it got (method, path,
//! headers, body size). The body is read as a stream and counted, never held.
//! [`start_fixed`] makes one that answers the same body to every request instead, which a
//! mirror comparison can find equal to another build's.

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Binds `addr` and serves echo responses as backend `name` until the task is dropped.
pub async fn start(
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve(name, addr, None).await
}

/// [`start`], answering `body` (JSON) to every request.
pub async fn start_fixed(
    name: &str,
    addr: SocketAddr,
    body: &'static str,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve(name, addr, Some(body)).await
}

async fn serve(
    name: &str,
    addr: SocketAddr,
    fixed: Option<&'static str>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let tcp = TcpListener::bind(addr).await?;
    let local = tcp.local_addr()?;
    let name: Arc<str> = name.into();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| echo(name.clone(), fixed, req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((local, task))
}

async fn echo(
    name: Arc<str>,
    fixed: Option<&'static str>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            body_bytes += d.len() as u64;
        }
    }
    if let Some(text) = fixed {
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-backend", &*name)
            .body(Full::new(Bytes::from_static(text.as_bytes())))
            .expect("static parts are valid"));
    }
    let headers: BTreeMap<&str, &str> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>")))
        .collect();
    let doc = serde_json::json!({
        "backend": &*name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    text.push(b'\n');
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-backend", &*name)
        .body(Full::new(Bytes::from(text)))
        .expect("static parts are valid"))
}
