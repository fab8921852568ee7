//! End-to-end: the metrics mesh users read first (issue 15, item 4): bytes each way, the
//! time to the response head beside the whole exchange's, duration buckets to 60 s, and
//! the `grpc_status`/`client_id` labels empty where they do not apply. (`client_id` with a
//! verified identity: tests/http3.rs; `grpc_status`: tests/grpc_semantics.rs.)

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP/1.1 app that reads a request, sends its head and a first chunk at once, and
/// the last chunk after `pause` (a stream, as a download or a server push would be).
async fn slow_stream_app(pause: Duration) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                // The head and a 1000-byte body (content-length).
                while !(seen.windows(4).any(|w| w == b"\r\n\r\n")
                    && seen.len() >= head_len(&seen) + 1000)
                {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(b"7d0\r\n").await;
                let _ = s.write_all(&[b'a'; 2000]).await;
                let _ = s.write_all(b"\r\n").await;
                tokio::time::sleep(pause).await;
                let _ = s.write_all(b"bb8\r\n").await;
                let _ = s.write_all(&[b'b'; 3000]).await;
                let _ = s.write_all(b"\r\n0\r\n\r\n").await;
            });
        }
    });
    (addr, task)
}

fn head_len(b: &[u8]) -> usize {
    b.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_first_byte_and_long_buckets() {
    let (app, _task) = slow_stream_app(Duration::from_millis(600)).await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ name: download, cluster: app }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let req = Request::post(format!("http://{web}/file"))
        .body(Full::new(Bytes::from(vec![1u8; 1000])))
        .unwrap();
    let answer = send(&h1_client(), req).await;
    assert_eq!((answer.status, answer.body.len()), (200, 5000));
    let target = [
        ("listener", "web"),
        ("route", "download"),
        ("cluster", "app"),
    ];
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(admin, "spur_response_bytes_total", &target).await == Some(5000.0)
        })
        .await,
        "response bytes: {:?}",
        metric(admin, "spur_response_bytes_total", &target).await
    );
    assert_eq!(
        metric(admin, "spur_request_bytes_total", &target).await,
        Some(1000.0)
    );
    // The head came at once; the exchange took the stream's 600 ms: the first-byte
    // histogram sees the one, the duration the other.
    let bucket = |name: &'static str, le: &'static str| {
        let mut labels = target.to_vec();
        labels.push(("le", le));
        async move { metric(admin, name, &labels).await }
    };
    assert_eq!(
        bucket("spur_response_first_byte_seconds_bucket", "0.25").await,
        Some(1.0)
    );
    assert_eq!(
        bucket("spur_request_duration_seconds_bucket", "0.25").await,
        Some(0.0),
        "the whole exchange is slower than its head"
    );
    assert_eq!(
        bucket("spur_request_duration_seconds_bucket", "1.0").await,
        Some(1.0)
    );
    // Buckets reach 60 s.
    for le in ["30.0", "60.0"] {
        assert_eq!(
            bucket("spur_request_duration_seconds_bucket", le).await,
            Some(1.0),
            "le={le}"
        );
        assert_eq!(
            bucket("spur_response_first_byte_seconds_bucket", le).await,
            Some(1.0),
            "le={le}"
        );
    }
    // Not gRPC, no verified client: both labels are there, empty.
    let text = get(admin, "/metrics", &[]).await.text();
    let line = text
        .lines()
        .find(|l| l.starts_with("spur_requests_total{") && l.contains("route=\"download\""))
        .unwrap_or_else(|| panic!("no request series in:\n{text}"));
    assert!(line.contains("grpc_status=\"\""), "{line}");
    assert!(line.contains("client_id=\"\""), "{line}");
}
