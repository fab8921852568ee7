//! End-to-end: WebSocket through a Spur HTTP listener (HTTP/1.1 upgrade, then a byte
//! tunnel): text, binary, ping/pong and a clean close, many sessions at once, and the
//! upgrade counted as a 101 on the admin `/metrics`.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::Message;

/// Every step must finish within this; a stalled tunnel fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// What the backend saw of one session.
#[derive(Debug)]
enum Seen {
    /// The handshake: request path and query, and whether it carried `x-request-id`.
    Handshake { path: String, request_id: bool },
    /// The echo loop ended (the client closed and the tunnel passed it on).
    Closed,
}

/// A WebSocket echo server on a raw TCP listener; reports each session's handshake and end.
struct WsBackend {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ws_backend() -> WsBackend {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let seen = seen_tx.clone();
            tokio::spawn(async move {
                // The callback's signature is tungstenite's, large error variant included.
                #[allow(clippy::result_large_err)]
                let on_handshake = |req: &WsRequest, resp: WsResponse| {
                    let _ = seen.send(Seen::Handshake {
                        path: req.uri().to_string(),
                        request_id: req.headers().contains_key("x-request-id"),
                    });
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, on_handshake).await
                else {
                    return;
                };
                // Echo data; tungstenite answers pings and the close handshake itself.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
                let _ = seen.send(Seen::Closed);
            });
        }
    });
    WsBackend { addr, seen, task }
}

fn config(backend: SocketAddr) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: ws
        match: {{ path_prefix: /ws }}
        cluster: ws
clusters:
  - {{ name: ws, endpoints: ["{backend}"], protocol: http1 }}
"#
    )
}

async fn next_seen(backend: &mut WsBackend) -> Seen {
    tokio::time::timeout(STEP, backend.seen.recv())
        .await
        .expect("the backend reports in time")
        .expect("backend alive")
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn recv(ws: &mut Ws) -> Message {
    tokio::time::timeout(STEP, ws.next())
        .await
        .expect("a message arrives in time")
        .expect("connection open")
        .expect("no protocol error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let mut backend = ws_backend().await;
    let proxy = start_proxy(&config(backend.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(format!("ws://{web}/ws?room=1")),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    assert!(
        resp.headers().contains_key("x-request-id"),
        "the 101 carries the request ID: {resp:?}"
    );
    match next_seen(&mut backend).await {
        Seen::Handshake { path, request_id } => {
            assert_eq!(path, "/ws?room=1");
            assert!(
                request_id,
                "the upgrade request carries x-request-id upstream"
            );
        }
        other => panic!("expected the handshake, got {other:?}"),
    }

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("hello"));

    let blob: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(blob));

    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );

    // Several in flight at once come back in order.
    for i in 0..20 {
        ws.feed(Message::text(format!("burst-{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..20 {
        assert_eq!(recv(&mut ws).await, Message::text(format!("burst-{i}")));
    }

    // Clean close: our close frame reaches the backend, its answer reaches us, and the
    // stream then ends without an error.
    ws.close(None).await.unwrap();
    let mut saw_close = false;
    loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("close completes in time")
        {
            Some(Ok(Message::Close(_))) => saw_close = true,
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            Some(Err(e)) => panic!("close was not clean: {e}"),
            None => break,
        }
    }
    assert!(saw_close, "the backend's close frame came back");
    assert!(matches!(next_seen(&mut backend).await, Seen::Closed));

    let labels = [
        ("listener", "web"),
        ("route", "ws"),
        ("cluster", "ws"),
        ("code", "101"),
    ];
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_requests_total", &labels).await == Some(1.0)
        })
        .await,
        "the upgrade is counted once as 101: {}",
        get(admin, "/metrics", &[]).await.text()
    );
    let endpoint = backend.addr.to_string();
    let up = [
        ("cluster", "ws"),
        ("endpoint", endpoint.as_str()),
        ("code", "101"),
    ];
    assert_eq!(
        metric(admin, "spur_upstream_requests_total", &up).await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_websocket_sessions_stay_apart() {
    let mut backend = ws_backend().await;
    let proxy = start_proxy(&config(backend.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    const SESSIONS: usize = 20;
    const MESSAGES: usize = 50;
    let mut tasks = Vec::new();
    for s in 0..SESSIONS {
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws/{s}"))
                .await
                .expect("handshake");
            for m in 0..MESSAGES {
                let text = format!("session-{s}-message-{m}");
                ws.send(Message::text(text.clone())).await.unwrap();
                assert_eq!(recv(&mut ws).await, Message::text(text));
            }
            ws.close(None).await.unwrap();
            while let Some(msg) = tokio::time::timeout(STEP, ws.next())
                .await
                .expect("close in time")
            {
                msg.expect("clean close");
            }
        }));
    }
    let all = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("every session finishes in time");
    for r in all {
        r.expect("session succeeded");
    }

    let mut closed = 0;
    while closed < SESSIONS {
        if matches!(next_seen(&mut backend).await, Seen::Closed) {
            closed += 1;
        }
    }
    let labels = [
        ("listener", "web"),
        ("route", "ws"),
        ("cluster", "ws"),
        ("code", "101"),
    ];
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_requests_total", &labels).await == Some(SESSIONS as f64)
        })
        .await,
        "every upgrade counted as 101: {:?}",
        metric(admin, "spur_requests_total", &labels).await
    );
}

/// An upgraded connection is still a client connection of the listener: it counts in
/// `spur_connections_active` while the session lasts, and stops counting when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_websocket_counts_as_an_active_connection() {
    let backend = ws_backend().await;
    let proxy = start_proxy(&config(backend.addr)).await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let active =
        || async move { metric(admin, "spur_connections_active", &[("listener", "web")]).await };

    let (mut ws, _) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(format!("ws://{web}/ws")),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("ping"));
    assert_eq!(
        active().await,
        Some(1.0),
        "the open session is an active connection"
    );

    ws.close(None).await.unwrap();
    while let Some(msg) = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("close in time")
    {
        msg.expect("clean close");
    }
    // The backend has closed; the tunnel ends when the client's side closes too (a TCP
    // half-close alone keeps the other direction open, as it must).
    drop(ws);
    assert!(
        eventually(STEP, || async { active().await == Some(0.0) }).await,
        "the closed session no longer counts: {:?}",
        active().await
    );
}
