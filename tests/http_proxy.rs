//! End-to-end: HTTP routing, correlation, error answers and metrics through real sockets.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn routing_config(v1: std::net::SocketAddr, v2: std::net::SocketAddr) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: beta
        match: {{ headers: [{{ name: x-user-group, value: beta }}] }}
        cluster: v2
      - name: exact
        match: {{ path: /exact, method: POST }}
        cluster: v2
      - name: host
        match: {{ host: v2.example }}
        cluster: v2
      - name: canary
        match: {{ path_prefix: /shop }}
        split: [{{ cluster: v1, weight: 80 }}, {{ cluster: v2, weight: 20 }}]
        hash_on: header:x-user-id
  - name: strict
    listen: 127.0.0.1:0
    routes:
      - match: {{ path_prefix: /only }}
        cluster: v1
clusters:
  - {{ name: v1, endpoints: ["{v1}"], lb: round_robin }}
  - {{ name: v2, endpoints: ["{v2}"], protocol: http2 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_header_path_method_host_and_split() {
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let proxy = start_proxy(&routing_config(v1.addr, v2.addr)).await;
    let web = proxy.listener_addr("web").unwrap();

    assert_eq!(
        get(web, "/shop", &[("x-user-group", "beta")]).await.text(),
        "v2"
    );
    assert_eq!(
        get(web, "/", &[("host", "v2.example:80")]).await.text(),
        "v2"
    );
    let post = Request::post(format!("http://{web}/exact"))
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    assert_eq!(send(&h1_client(), post).await.text(), "v2");
    // GET /exact matches no route and the listener has no default cluster.
    let miss = get(web, "/exact", &[]).await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.header("x-spur-error"), Some("no_route"));

    // Sticky split: each user always lands on the same side; shares follow the weights.
    let mut v2_users = 0;
    for u in 0..400 {
        let user = format!("user-{u}");
        let first = get(web, "/shop/cart", &[("x-user-id", &user)]).await.text();
        let again = get(web, "/shop/cart", &[("x-user-id", &user)]).await.text();
        assert_eq!(first, again, "user {user} moved between variants");
        if first == "v2" {
            v2_users += 1;
        }
    }
    assert!(
        (50..=110).contains(&v2_users),
        "20% of 400 users expected on v2, got {v2_users}"
    );

    // HTTP/2 (h2c prior knowledge) downstream works the same way.
    let req = Request::get(format!("http://{web}/shop"))
        .header("x-user-group", "beta")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&h2_client(), req).await;
    assert_eq!((a.status, a.text().as_str()), (200, "v2"));

    let strict = proxy.listener_addr("strict").unwrap();
    assert_eq!(get(strict, "/only/x", &[]).await.text(), "v1");
    assert_eq!(get(strict, "/other", &[]).await.status, 404);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_headers_reach_upstream_and_come_back() {
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let proxy = start_proxy(&routing_config(v1.addr, v2.addr)).await;
    let web = proxy.listener_addr("web").unwrap();

    // No ID: one is generated (UUIDv7), sent upstream and returned.
    let a = get(web, "/shop", &[("x-user-id", "u1")]).await;
    let id = a.header("x-request-id").expect("generated id").to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "7", "UUIDv7");
    assert_eq!(a.header("x-echo-x-request-id"), Some(id.as_str()));
    let tp = a
        .header("x-echo-traceparent")
        .expect("traceparent upstream");
    assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    assert_eq!(a.header("x-echo-x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(a.header("x-echo-x-forwarded-proto"), Some("http"));

    // A valid incoming ID is kept; without `tracing` the caller's trace context passes
    // unchanged (this proxy makes no span of its own that no collector would see).
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let b = get(
        web,
        "/shop",
        &[
            ("x-request-id", "abc-123"),
            ("traceparent", incoming),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
        ],
    )
    .await;
    assert_eq!(b.header("x-request-id"), Some("abc-123"));
    assert_eq!(b.header("x-echo-x-request-id"), Some("abc-123"));
    assert_eq!(b.header("x-echo-traceparent"), Some(incoming));
    assert_eq!(
        b.header("x-echo-x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );

    // An invalid ID and traceparent are replaced.
    let c = get(
        web,
        "/shop",
        &[("x-request-id", "has space"), ("traceparent", "garbage")],
    )
    .await;
    assert_ne!(c.header("x-request-id"), Some("has space"));
    assert_eq!(c.header("x-echo-traceparent").unwrap().len(), 55);

    // Responses Spur makes itself carry the ID too.
    let d = get(web, "/exact", &[("x-request-id", "mine-1")]).await;
    assert_eq!(d.status, 404);
    assert_eq!(d.header("x-request-id"), Some("mine-1"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_cluster_and_code() {
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let proxy = start_proxy(&routing_config(v1.addr, v2.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    for _ in 0..7 {
        assert_eq!(
            get(web, "/x", &[("x-user-group", "beta")]).await.status,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(get(web, "/nowhere", &[]).await.status, 404);
    }
    let text = get(admin, "/metrics", &[]).await.text();
    assert_eq!(
        metric_in(
            &text,
            "spur_requests_total",
            &[
                ("listener", "web"),
                ("route", "beta"),
                ("cluster", "v2"),
                ("code", "200")
            ]
        ),
        Some(7.0)
    );
    assert_eq!(
        metric_in(
            &text,
            "spur_requests_total",
            &[
                ("listener", "web"),
                ("route", "-"),
                ("cluster", "-"),
                ("code", "404")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_in(
            &text,
            "spur_request_duration_seconds_count",
            &[("listener", "web"), ("route", "beta"), ("cluster", "v2")]
        ),
        Some(7.0)
    );
    let ep = v2.addr.to_string();
    assert_eq!(
        metric_in(
            &text,
            "spur_upstream_requests_total",
            &[("cluster", "v2"), ("endpoint", &ep), ("code", "200")]
        ),
        Some(7.0)
    );
    assert_eq!(metric_in(&text, "spur_config_version", &[]), Some(0.0));
    assert!(text.contains("spur_connections_active"), "{text}");

    // The other admin endpoints.
    assert_eq!(get(admin, "/ready", &[]).await.status, 200);
    assert_eq!(get(admin, "/live", &[]).await.status, 200);
    let config: serde_json::Value =
        serde_json::from_slice(&get(admin, "/config", &[]).await.body).unwrap();
    assert_eq!(config["version"], 0);
    assert_eq!(config["config"]["listeners"][0]["name"], "web");
    let clusters: serde_json::Value =
        serde_json::from_slice(&get(admin, "/clusters", &[]).await.body).unwrap();
    assert_eq!(clusters["clusters"][1]["name"], "v2");
    assert_eq!(clusters["clusters"][1]["endpoints"][0]["address"], ep);
    assert_eq!(clusters["clusters"][1]["endpoints"][0]["in_flight"], 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_get_spur_errors() {
    // A port with nothing listening.
    let dead_port = refusing_addr();
    let dead = dead_port.addr;
    let slow = backend(|_req| async {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        http::Response::new(Full::new(Bytes::from("late")))
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ match: {{ path_prefix: /slow }}, cluster: slow, timeout: 200ms }}
      - {{ match: {{ path_prefix: /dead }}, cluster: dead }}
clusters:
  - {{ name: slow, endpoints: ["{}"] }}
  - {{ name: dead, endpoints: ["{dead}"], connect_timeout: 500ms }}
"#,
        slow.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let t = std::time::Instant::now();
    let a = get(web, "/slow", &[]).await;
    assert_eq!((a.status, a.header("x-spur-error")), (504, Some("timeout")));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "timeout took {:?}",
        t.elapsed()
    );
    assert!(a.header("x-request-id").is_some());
    let b = get(web, "/dead", &[]).await;
    assert_eq!(
        (b.status, b.header("x-spur-error")),
        (502, Some("upstream_unreachable"))
    );
    assert!(b.text().contains("upstream_unreachable"));
    proxy.shutdown().await;
}
