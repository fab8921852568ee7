//! End-to-end: Spur reads gRPC statuses, not only HTTP ones (issue 15, item 1). A real tonic
//! client calls through a Spur listener to tonic servers (h2c):
//! - `UNAVAILABLE` in trailers-only responses is retried (`retry_on: [unavailable]`) and
//!   ejects the endpoint after `consecutive_failures`;
//! - `UNAVAILABLE` in the trailers after a message is counted as a failure, never retried;
//! - `grpc_status` labels the request and try counters;
//! - `grpc-timeout` bounds the call and reaches the server reduced;
//! - no route, and Spur's other answers, are gRPC errors a gRPC client reports as such.

mod common;
mod grpc_support;

use bytes::Bytes;
use common::*;
use grpc_support::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Code, Request, Response, Status};

const STEP: Duration = Duration::from_secs(10);
const GET: &str = "/shop.Cart/Get";
const WATCH: &str = "/shop.Cart/Watch";

/// A server whose every call fails with UNAVAILABLE before any message (trailers-only).
async fn unavailable() -> GrpcServer {
    grpc_server(|req| unary(req, |_| async { Err(Status::unavailable("down")) })).await
}

/// A server that echoes unary calls, and streams one message then UNAVAILABLE.
async fn healthy() -> GrpcServer {
    grpc_server(|req| async move {
        if req.uri().path() == WATCH {
            return server_stream(
                req,
                vec![
                    Ok(Bytes::from_static(b"first")),
                    Err(Status::unavailable("lost it")),
                ],
            )
            .await;
        }
        unary(req, |r: Request<Bytes>| {
            let body = r.into_inner();
            async move { Ok(Response::new(body)) }
        })
        .await
    })
    .await
}

fn config(endpoints: &[std::net::SocketAddr], extra_route: &str, cluster: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: grpc
    listen: 127.0.0.1:0
    routes:
      - name: cart
        match: {{ grpc: {{ service: shop.Cart }} }}
        cluster: cart
        {extra_route}
clusters:
  - name: cart
    protocol: http2
    lb: round_robin
    endpoints: [{}]
    {cluster}
"#,
        eps.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_before_any_message_is_retried_and_ejects_the_endpoint() {
    let bad = unavailable().await;
    let good = healthy().await;
    let proxy = start_proxy(&config(
        &[bad.addr, good.addr],
        "retry: { attempts: 2, retry_on: [unavailable], backoff: { base: 1ms, max: 1ms } }",
        "circuit_breaker: { consecutive_failures: 3, ejection_time: 60s }",
    ))
    .await;
    let admin = proxy.admin_addr().unwrap();
    let mut client = channel(proxy.listener_addr("grpc").unwrap()).await;
    for i in 0..20 {
        let msg = Bytes::from(format!("m{i}"));
        let r = grpc_call(&mut client, GET, Request::new(msg.clone()))
            .await
            .unwrap_or_else(|e| panic!("call {i}: the retry should have answered: {e:?}"));
        assert_eq!(r.into_inner(), msg);
    }
    assert_eq!(
        bad.calls(),
        3,
        "three UNAVAILABLE in a row eject the endpoint; nothing reaches it after"
    );
    let bad_label = bad.addr.to_string();
    let ep = [("cluster", "cart"), ("endpoint", bad_label.as_str())];
    assert_eq!(metric(admin, "spur_endpoint_ejected", &ep).await, Some(1.0));
    let tries = [
        ("cluster", "cart"),
        ("endpoint", bad_label.as_str()),
        ("code", "200"),
        ("grpc_status", "14"),
    ];
    assert_eq!(
        metric(admin, "spur_upstream_requests_total", &tries).await,
        Some(3.0)
    );
    let retries = [("cluster", "cart"), ("reason", "unavailable")];
    assert_eq!(
        metric(admin, "spur_retries_total", &retries).await,
        Some(3.0)
    );
    let ok = [
        ("listener", "grpc"),
        ("route", "cart"),
        ("cluster", "cart"),
        ("code", "200"),
        ("grpc_status", "0"),
    ];
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_requests_total", &ok).await == Some(20.0)
        })
        .await,
        "20 calls answered OK: {:?}",
        metric(admin, "spur_requests_total", &ok).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_after_a_message_is_a_failure_but_is_not_retried() {
    let server = healthy().await;
    let proxy = start_proxy(&config(
        &[server.addr],
        "retry: { attempts: 3, retry_on: [unavailable], backoff: { base: 1ms, max: 1ms } }",
        "circuit_breaker: { consecutive_failures: 2, ejection_time: 60s, max_ejection_percent: 100 }",
    ))
    .await;
    let admin = proxy.admin_addr().unwrap();
    let mut client = channel(proxy.listener_addr("grpc").unwrap()).await;
    let (got, end) = call_stream(&mut client, WATCH).await;
    assert_eq!(
        got,
        [Bytes::from_static(b"first")],
        "the message went through"
    );
    let status = end.expect_err("the stream ends with the server's status");
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "lost it")
    );
    assert_eq!(server.calls(), 1, "a message was sent: never retried");
    let label = server.addr.to_string();
    let tries = [
        ("cluster", "cart"),
        ("endpoint", label.as_str()),
        ("code", "200"),
        ("grpc_status", "14"),
    ];
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_upstream_requests_total", &tries).await == Some(1.0)
        })
        .await,
        "the try is counted with its status from the trailers"
    );
    let requests = [
        ("listener", "grpc"),
        ("route", "cart"),
        ("cluster", "cart"),
        ("code", "200"),
        ("grpc_status", "14"),
    ];
    assert_eq!(
        metric(admin, "spur_requests_total", &requests).await,
        Some(1.0)
    );
    // A second such call is the second failure in a row: the breaker ejects the endpoint.
    let _ = call_stream(&mut client, WATCH).await;
    let ep = [("cluster", "cart"), ("endpoint", label.as_str())];
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_endpoint_ejected", &ep).await == Some(1.0)
        })
        .await,
        "failures in trailers count against the endpoint"
    );
    let err = grpc_call(&mut client, GET, Request::new(Bytes::new()))
        .await
        .expect_err("no endpoint left");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "no_healthy_endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_bounds_the_call_and_reaches_the_server_reduced() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let slow = grpc_server(move |req| {
        let record = record.clone();
        async move {
            let t = req
                .headers()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_string());
            record.lock().unwrap().push(t.unwrap_or_default());
            unary(req, |_| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Response::new(Bytes::new()))
            })
            .await
        }
    })
    .await;
    let proxy = start_proxy(&config(&[slow.addr], "timeout: 30s", "")).await;
    let web = proxy.listener_addr("grpc").unwrap();
    // A gRPC call over plain HTTP/2 (hyper): tonic's client would enforce `grpc-timeout`
    // itself, and this test is about what Spur does with it.
    let req = http::Request::post(format!("http://{web}{GET}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "100m")
        .body(http_body_util::Full::new(Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let start = Instant::now();
    let answer = tokio::time::timeout(STEP, send(&h2_client(), req))
        .await
        .expect("answered");
    let took = start.elapsed();
    assert_eq!(answer.status, 200, "trailers-only gRPC answer");
    assert_eq!(answer.header("grpc-status"), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(answer.header("grpc-message"), Some("timeout"));
    assert_eq!(answer.header("x-spur-error"), Some("timeout"));
    assert!(answer.body.is_empty());
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(600),
        "ended after {took:?}, not ~100 ms"
    );
    // A tonic client with a deadline of its own reports DEADLINE_EXCEEDED (whichever of
    // it and Spur ends the call first).
    let mut client = channel(web).await;
    let mut req = Request::new(Bytes::new());
    req.set_timeout(Duration::from_millis(100));
    let err = grpc_call(&mut client, GET, req)
        .await
        .expect_err("deadline");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let v = &seen[0];
    let (digits, unit) = v.split_at(v.len() - 1);
    let nanos: u64 = digits.parse().unwrap();
    let nanos = match unit {
        "n" => nanos,
        "u" => nanos * 1_000,
        "m" => nanos * 1_000_000,
        other => panic!("unit {other} in {v}"),
    };
    assert!(
        nanos > 0 && nanos < 100_000_000,
        "the server gets what is left of 100 ms, not more: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spur_answers_grpc_calls_with_grpc_errors() {
    let server = healthy().await;
    let dead = refusing_addr();
    let dead_addr = dead.addr;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: grpc
    listen: 127.0.0.1:0
    routes:
      - name: cart
        match: {{ grpc: {{ service: shop.Cart, method: Get }} }}
        cluster: cart
      - name: down
        match: {{ grpc: {{ service: shop.Down }} }}
        cluster: down
clusters:
  - {{ name: cart, protocol: http2, endpoints: ["{}"] }}
  - {{ name: down, protocol: http2, endpoints: ["{dead_addr}"] }}
"#,
        server.addr
    ))
    .await;
    let admin = proxy.admin_addr().unwrap();
    let mut client = channel(proxy.listener_addr("grpc").unwrap()).await;
    let ok = grpc_call(&mut client, GET, Request::new(Bytes::from_static(b"hi")))
        .await
        .expect("the grpc route matches");
    assert_eq!(ok.into_inner(), Bytes::from_static(b"hi"));
    // Another method of the service, and another service: no route.
    for path in [WATCH, "/shop.Other/Get"] {
        let err = grpc_call(&mut client, path, Request::new(Bytes::new()))
            .await
            .expect_err("no route");
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
        assert_eq!(err.message(), "no_route");
        assert!(err.metadata().get("x-request-id").is_some());
    }
    let err = grpc_call(&mut client, "/shop.Down/Get", Request::new(Bytes::new()))
        .await
        .expect_err("nothing listens there");
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unavailable, "upstream_unreachable")
    );
    let unrouted = [
        ("listener", "grpc"),
        ("route", "-"),
        ("cluster", "-"),
        ("code", "200"),
        ("grpc_status", "12"),
    ];
    assert_eq!(
        metric(admin, "spur_requests_total", &unrouted).await,
        Some(2.0)
    );
    // A plain HTTP request to the same listener still gets a plain 404.
    let plain = get(proxy.listener_addr("grpc").unwrap(), GET, &[]).await;
    assert_eq!(plain.status, 404);
    assert_eq!(plain.header("x-spur-error"), Some("no_route"));
    assert_eq!(plain.header("grpc-status"), None);
}
