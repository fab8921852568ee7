//! End-to-end: how a real `spur proxy --control` process watches the control plane when
//! things go wrong — a version it cannot apply, a stream that keeps closing.

mod common;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Lines of the process's JSON log whose message is `message`.
fn logged(p: &SpurProcess, message: &str) -> usize {
    p.stderr_lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .count()
}

fn config(listen: &str, app: std::net::SocketAddr) -> String {
    format!(
        "listeners:\n  - {{ name: web, listen: \"{listen}\", cluster: app }}\nclusters:\n  - {{ name: app, endpoints: [\"{app}\"] }}\n"
    )
}

/// Issue 19, item 1: a version the proxy rejects (here: a port another process holds) is
/// reported once, and the proxy keeps its stream open for the next version instead of
/// reconnecting in a loop and logging "unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_version_is_reported_once_and_the_watch_stays_open() {
    let (cp, _dir) = start_control(None).await;
    let c = cp.addr;
    let app = named_backend("app").await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap().to_string();
    let put = |yaml: String| async move {
        call(c, "PUT", "/v1/groups/shop/config", Some(&yaml), None).await
    };
    assert_eq!(put(config("127.0.0.1:0", app.addr)).await.0, 200);
    let url = format!("http://{c}");
    let proxy = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--node",
            "n1",
            "--group",
            "shop",
            "--admin",
            "127.0.0.1:0",
        ],
        1,
        true,
    );
    let admin = proxy.admin.unwrap();

    let (s, v) = put(config(&held_addr, app.addr)).await;
    assert_eq!((s, &v["version"]), (200, &serde_json::json!(2)), "{v}");
    let reported = eventually(Duration::from_secs(10), || async {
        let (_, v) = call(c, "GET", "/v1/proxies", None, None).await;
        v[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("version 2 rejected"))
    })
    .await;
    assert!(
        reported,
        "{}",
        call(c, "GET", "/v1/proxies", None, None).await.1
    );
    // Watch what the proxy does for a while: nothing, until the next version.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(logged(&proxy, "config rejected; the previous one stays"), 1);
    assert_eq!(
        logged(&proxy, "watching the control plane"),
        1,
        "no reconnect"
    );
    assert_eq!(
        logged(
            &proxy,
            "control plane unreachable; serving the last good config (will retry)"
        ),
        0
    );
    assert_eq!(
        metric(
            admin,
            "spur_config_updates_total",
            &[("result", "rejected")]
        )
        .await
        .unwrap_or(0.0),
        1.0
    );
    // The version before it still serves.
    assert_eq!(get(proxy.listeners["web"], "/", &[]).await.status, 200);

    // The next version is taken from the same stream.
    assert_eq!(put(config("127.0.0.1:0", app.addr)).await.0, 200);
    let applied = eventually(Duration::from_secs(10), || async {
        let (_, v) = call(c, "GET", "/v1/proxies", None, None).await;
        v[0]["applied_version"] == 3 && v[0]["last_error"].is_null()
    })
    .await;
    assert!(
        applied,
        "{}",
        call(c, "GET", "/v1/proxies", None, None).await.1
    );
    assert_eq!(logged(&proxy, "watching the control plane"), 1);
    drop(held);
}

/// Issue 19, item 1: the backoff is reset by a stream that lasted, not by any byte that
/// arrived. A control plane that answers the watch, sends a heartbeat and closes at once
/// sees fewer and fewer reconnects, not one every 50-100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_closing_is_retried_with_growing_backoff() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let watches = Arc::new(AtomicUsize::new(0));
    let seen = watches.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    if req.uri().path().ends_with("/watch") {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    async move {
                        // A heartbeat, then the end of the stream.
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("\n")).boxed()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let url = format!("http://{addr}");
    let proxy = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--node",
            "n1",
            "--group",
            "shop",
            "--admin",
            "127.0.0.1:0",
        ],
        0,
        true,
    );
    let first = eventually(Duration::from_secs(5), || async {
        watches.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(first);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // 100, 200, 400, 800, 1600 ms caps (half to all of each, jittered): at most 8 in 3 s;
    // a backoff reset by the heartbeat made ~30-60.
    let n = watches.load(Ordering::SeqCst);
    assert!((2..=8).contains(&n), "{n} watch requests in ~3 s");
    assert!(
        logged(
            &proxy,
            "the control plane closed the watch stream; reconnecting"
        ) >= 1
    );
    server.abort();
}
