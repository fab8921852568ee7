//! End-to-end: protection against bad clients, TCP listeners, graceful drain.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_all(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

fn limits_config(app: std::net::SocketAddr) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    limits: {{ max_connections: 3, max_header_bytes: 2KiB, header_timeout: 300ms, idle_timeout: 700ms }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_clear_answers() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&limits_config(app.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    // Malformed request line: 400, and the proxy keeps serving.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
    let (text, closed) = read_all(&mut s, Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed);
    assert_eq!(get(web, "/", &[]).await.text(), "app");

    // Headers over the limit (but within the parser buffer): 431 from Spur.
    let big = "x".repeat(3000);
    let a = get(web, "/", &[("x-big", &big)]).await;
    assert_eq!(
        (a.status, a.header("x-spur-error")),
        (431, Some("headers_too_large"))
    );
    assert!(a.header("x-request-id").is_some());
    // Far over the limit: the parser refuses it, still 431.
    let mut s = TcpStream::connect(web).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-huge: {}\r\n\r\n",
        "y".repeat(200 * 1024)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let (text, _) = read_all(&mut s, Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // A slow client that never finishes its headers is cut off after header_timeout.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let t = Instant::now();
    let (_, closed) = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "slow client still connected");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "cut off after {:?}",
        t.elapsed()
    );

    // An idle keep-alive connection is closed after idle_timeout.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let (text, closed) = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        closed && t.elapsed() >= Duration::from_millis(300),
        "idle close after {:?}",
        t.elapsed()
    );

    // max_connections: the 4th concurrent connection is refused at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        held.push(s);
    }
    let mut extra = TcpStream::connect(web).await.unwrap();
    let _ = extra.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (text, closed) = read_all(&mut extra, Duration::from_secs(2)).await;
    assert!(
        closed && text.is_empty(),
        "over-limit connection got: {text}"
    );
    drop(held);

    let text = get(admin, "/metrics", &[]).await.text();
    for reason in [
        "malformed",
        "headers_too_large",
        "header_timeout",
        "max_connections",
    ] {
        assert!(
            metric_in(
                &text,
                "spur_downstream_rejected_total",
                &[("listener", "web"), ("reason", reason)]
            ) >= Some(1.0),
            "no {reason} counted:\n{text}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_passes_bytes_and_half_close() {
    // Echo server that, after the client half-closes, sends a trailer and closes.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                        Err(_) => return,
                    }
                }
                s.write_all(b"|bye").await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - {{ name: raw, listen: 127.0.0.1:0, protocol: tcp, cluster: echo }}
clusters:
  - {{ name: echo, endpoints: ["{echo_addr}"] }}
"#
    ))
    .await;
    let raw = proxy.listener_addr("raw").unwrap();
    let mut s = TcpStream::connect(raw).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap(); // half-close: we are done sending
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::join!(send, recv);
    assert_eq!(got.len(), payload.len() + 4);
    assert_eq!(&got[..payload.len()], &payload[..]);
    assert_eq!(&got[payload.len()..], b"|bye");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let seen = arrived.clone();
    let slow = backend(move |_req| {
        let seen = seen.clone();
        async move {
            seen.notify_one();
            tokio::time::sleep(Duration::from_millis(800)).await;
            http::Response::new(Full::new(Bytes::from("finished")))
        }
    })
    .await;
    let mut spur = spawn_spur(
        &format!(
            r#"
drain_timeout: 5s
listeners:
  - {{ name: web, listen: 127.0.0.1:0, cluster: slow }}
clusters:
  - {{ name: slow, endpoints: ["{}"] }}
"#,
            slow.addr
        ),
        1,
    );
    let web = spur.listeners["web"];
    let in_flight = tokio::spawn(async move { get(web, "/", &[]).await });
    // SIGTERM once the request is at the backend, i.e. in flight through the proxy.
    tokio::time::timeout(Duration::from_secs(5), arrived.notified())
        .await
        .expect("request reached the backend");
    spur.sigterm();
    let answer = in_flight.await.unwrap();
    assert_eq!((answer.status, answer.text().as_str()), (200, "finished"));
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = spur.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
    .expect("spur exits after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        TcpStream::connect(web).await.is_err(),
        "still accepting after shutdown"
    );
}
