//! End-to-end: what bounds mirroring (copies in flight, body size, a shadow that fails),
//! and upstream connection pools that survive config pushes.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `spur_mirror_requests_total{cluster, outcome}`.
async fn mirrored(admin: SocketAddr, cluster: &str, outcome: &str) -> Option<f64> {
    metric(
        admin,
        "spur_mirror_requests_total",
        &[("cluster", cluster), ("outcome", outcome)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_is_bounded_in_flight_and_by_body_size_and_counts_failures() {
    // The app reads every body before it answers, as an upload handler does: an upstream
    // that answers a 64 KiB upload unread closes the connection with a reset, and whether
    // the answer or the reset reaches the proxy first is a race of the kernel's.
    let app = backend(|req: Request<Incoming>| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        Response::new(Full::new(Bytes::from("app")))
    })
    .await;
    // The shadow holds every copy until `release` turns true.
    let (release, released) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(AtomicUsize::new(0));
    let seen = arrived.clone();
    let shadow = backend(move |_req: Request<Incoming>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            Response::new(Full::new(Bytes::from("app")))
        }
    })
    .await;
    // A port nothing listens on, for a shadow that cannot be reached.
    let dead_port = refusing_addr();
    let dead = dead_port.addr;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: /dead }}, cluster: app, mirror: {{ cluster: dead, percent: 100 }} }}
      - {{ match: {{ path_prefix: / }}, cluster: app, mirror: {{ cluster: shadow, percent: 100 }} }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: shadow, endpoints: ["{shadow}"] }}
  - {{ name: dead, endpoints: ["{dead}"], connect_timeout: 200ms }}
"#,
        app = app.addr,
        shadow = shadow.addr,
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    // A shadow that cannot be reached: the client is served; the copy is an error.
    let a = get(web, "/dead", &[]).await;
    assert_eq!((a.status, a.text().as_str()), (200, "app"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            mirrored(admin, "dead", "error").await == Some(1.0)
        })
        .await,
        "{:?}",
        mirrored(admin, "dead", "error").await
    );

    // A body over 64 KiB is not copied (the copy would have to hold it): dropped.
    let big = Request::post(format!("http://{web}/upload"))
        .body(Full::new(Bytes::from(vec![b'x'; 64 * 1024 + 1])))
        .unwrap();
    assert_eq!(send(&h1_client(), big).await.status, 200);
    assert_eq!(mirrored(admin, "shadow", "dropped").await, Some(1.0));
    // 64 KiB exactly is copied.
    let fits = Request::post(format!("http://{web}/upload"))
        .body(Full::new(Bytes::from(vec![b'x'; 64 * 1024])))
        .unwrap();
    assert_eq!(send(&h1_client(), fits).await.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            arrived.load(Ordering::SeqCst) == 1
        })
        .await
    );

    // At most 256 copies in flight for the whole proxy: with the shadow holding them,
    // of 300 more requests 255 are copied and 45 dropped; every client is served.
    for i in 0..300 {
        let a = get(web, &format!("/r/{i}"), &[]).await;
        assert_eq!(a.status, 200, "request {i}");
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            arrived.load(Ordering::SeqCst) == 256
        })
        .await,
        "{} copies reached the shadow",
        arrived.load(Ordering::SeqCst)
    );
    assert_eq!(mirrored(admin, "shadow", "dropped").await, Some(46.0));

    // Released, the copies complete and are compared; the slots are free again.
    release.send(true).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            mirrored(admin, "shadow", "same").await == Some(256.0)
        })
        .await,
        "{:?}",
        mirrored(admin, "shadow", "same").await
    );
    assert_eq!(get(web, "/again", &[]).await.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            arrived.load(Ordering::SeqCst) == 257
        })
        .await
    );
    assert_eq!(mirrored(admin, "shadow", "dropped").await, Some(46.0));
    proxy.shutdown().await;
}

/// A backend that counts the TCP connections it accepts.
async fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = tcp.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("app"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// Config pushes that leave a cluster's connection settings alone keep its pooled
/// connections: the upstream sees one connection for requests across 20 pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_connections_survive_config_pushes() {
    let (app, accepted) = counting_backend().await;
    let yaml = |n: u32| {
        format!(
            r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: / }}, cluster: app, timeout: {}ms }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: other-{n}, endpoints: ["127.0.0.1:9"] }}
"#,
            1000 + n
        )
    };
    let proxy = start_proxy(&yaml(0)).await;
    let web = proxy.listener_addr("web").unwrap();
    // Sequential requests: one pooled connection.
    for _ in 0..5 {
        assert_eq!(get(web, "/", &[]).await.text(), "app");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    for n in 1..=20 {
        proxy
            .apply(spur_config::load(&yaml(n), None).unwrap(), u64::from(n))
            .await
            .unwrap();
        assert_eq!(get(web, "/", &[]).await.text(), "app", "after push {n}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a push opened new upstream connections"
    );
    // A push that changes the cluster's connection settings gets a new pool.
    let changed = yaml(21).replace(
        &format!("endpoints: [\"{app}\"] }}"),
        &format!("endpoints: [\"{app}\"], connect_timeout: 2s }}"),
    );
    proxy
        .apply(spur_config::load(&changed, None).unwrap(), 21)
        .await
        .unwrap();
    assert_eq!(get(web, "/", &[]).await.text(), "app");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}
