//! End-to-end, with real processes: `spur proxy --upgrade` takes over a running proxy
//! under load. HTTP/1.1 keep-alive loops and HTTP/2 loops see no failed request, an open
//! WebSocket and an open TCP stream keep working on the old process until they close, the
//! old process then exits 0, and the new one serves on the same addresses. HTTP/3: the
//! old process's QUIC connections are closed at the handover (`H3_NO_ERROR`, "upgrade") and
//! a new connection reaches the new process. Also: a second `--upgrade` while one is in
//! progress, and one with nothing to upgrade, fail clearly.

mod common;
#[path = "common/h3.rs"]
mod h3c;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// Every step must finish within this; a stalled stream fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// The load never runs longer than this, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(40);

/// A WebSocket echo server.
async fn ws_backend() -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP echo server.
async fn tcp_echo() -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn config(http: SocketAddr, ws: SocketAddr, echo: SocketAddr) -> String {
    format!(
        r#"
drain_timeout: 30s
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - {{ name: ws, match: {{ path_prefix: /ws }}, cluster: ws }}
      - {{ name: app, match: {{ path_prefix: / }}, cluster: app }}
  - {{ name: raw, listen: 127.0.0.1:0, protocol: tcp, cluster: echo }}
clusters:
  - {{ name: app, endpoints: ["{http}"] }}
  - {{ name: ws, endpoints: ["{ws}"], protocol: http1 }}
  - {{ name: echo, endpoints: ["{echo}"] }}
"#
    )
}

/// Requests that succeeded and failed in the load loops.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// One client loop: requests back to back on `client`'s keep-alive connections.
fn load_loop(
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    web: SocketAddr,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        while !tally.stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
            let req = || {
                Request::get(format!("http://{web}/hello"))
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            };
            let mut answer = tokio::time::timeout(STEP, client.request(req())).await;
            if matches!(&answer, Ok(Err(e)) if refused_by_goaway(e)) {
                // A stream the draining proxy's final GOAWAY (NO_ERROR) shows it never
                // processed: RFC 9113 §8.7 lets a client retry it, as HTTP/2 clients do.
                answer = tokio::time::timeout(STEP, client.request(req())).await;
            }
            let outcome = match answer {
                Ok(Ok(resp)) if resp.status() == 200 => resp.into_body().collect().await.is_ok(),
                Ok(Ok(resp)) => {
                    eprintln!("status {}", resp.status());
                    false
                }
                Ok(Err(e)) => {
                    eprintln!("request failed: {e:?}");
                    false
                }
                Err(_) => false,
            };
            let counter = if outcome { &tally.ok } else { &tally.failed };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// An HTTP/2 request refused by a graceful GOAWAY (NO_ERROR): not processed by the server.
fn refused_by_goaway(e: &hyper_util::client::legacy::Error) -> bool {
    let text = format!("{e:?}");
    text.contains("GoAway(") && text.contains("NO_ERROR")
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("an echo in time")
        .expect("the WebSocket is open")
        .expect("no protocol error");
    assert_eq!(got, Message::text(text));
}

async fn tcp_echo_line(stream: &mut tokio::net::TcpStream, text: &str) {
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; text.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut buf))
        .await
        .expect("an echo in time")
        .expect("the TCP stream is open");
    assert_eq!(buf, text.as_bytes());
}

fn upgrade_args<'a>(config: &'a str, socket: &'a str) -> Vec<&'a str> {
    vec!["proxy", "--config", config, "--upgrade-socket", socket]
}

/// Waits for the process to exit; its exit code.
fn exit_code(p: &mut SpurProcess, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn has_exited(p: &mut SpurProcess) -> bool {
    p.child.try_wait().unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_drops_nothing() {
    let http = backend(|_req| async { http::Response::new(Full::new(Bytes::from("hello"))) }).await;
    let ws = ws_backend().await;
    let echo = tcp_echo().await;
    let dir = temp_dir("upgrade");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, config(http.addr, ws, echo)).unwrap();
    let socket = dir.join("upgrade.sock");
    let (cfg, socket) = (cfg.to_str().unwrap(), socket.to_str().unwrap());

    let mut old = spawn_spur_with(&upgrade_args(cfg, socket), 2, true);
    let web = old.listeners["web"];
    let raw = old.listeners["raw"];
    let admin = old.admin.unwrap();
    let mode = std::fs::metadata(socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600, "owner only");

    // Long-lived streams, opened on the old process.
    let (mut wsc, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .expect("WebSocket through the old process");
    ws_echo(&mut wsc, "before").await;
    let mut tcp = tokio::net::TcpStream::connect(raw).await.unwrap();
    tcp_echo_line(&mut tcp, "before\n").await;

    // Load: HTTP/1.1 keep-alive and HTTP/2 loops.
    let tally = Arc::new(Tally::default());
    let mut loops = Vec::new();
    for _ in 0..3 {
        loops.push(load_loop(h1_client(), web, tally.clone()));
        loops.push(load_loop(h2_client(), web, tally.clone()));
    }
    let warm = eventually(STEP, || async { tally.ok.load(Ordering::Relaxed) >= 200 }).await;
    assert!(warm, "the load runs before the upgrade");

    let mut args = upgrade_args(cfg, socket);
    args.push("--upgrade");
    let new = spawn_spur_with(&args, 2, true);
    assert_eq!(
        new.listeners["web"], web,
        "the new process took the same socket"
    );
    assert_eq!(new.listeners["raw"], raw);
    assert_eq!(new.admin, Some(admin));
    let at_upgrade = tally.ok.load(Ordering::Relaxed);

    // The old process drains: its open streams still work, so it does not exit yet.
    ws_echo(&mut wsc, "after the upgrade").await;
    tcp_echo_line(&mut tcp, "after the upgrade\n").await;
    assert!(
        !has_exited(&mut old),
        "the old process waits for its open streams"
    );
    // New connections go to the new process (the old one no longer accepts).
    let (mut ws_new, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .expect("WebSocket through the new process");
    ws_echo(&mut ws_new, "new").await;

    // The streams close; the old process exits 0 without waiting for the drain timeout.
    wsc.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(STEP, wsc.next()).await {}
    drop(wsc);
    drop(tcp);
    let closed_at = Instant::now();
    let code = tokio::task::block_in_place(|| exit_code(&mut old, STEP));
    assert_eq!(
        code,
        Some(0),
        "the old process exits 0 once drained; its log: {:#?}",
        old.stderr_lines.lock().unwrap()
    );
    assert!(closed_at.elapsed() < Duration::from_secs(10));

    // The load goes on against the new process alone.
    let after_exit = tally.ok.load(Ordering::Relaxed);
    let more = eventually(STEP, || async {
        tally.ok.load(Ordering::Relaxed) >= after_exit + 200
    })
    .await;
    tally.stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("requests: {ok} ok, {failed} failed; {at_upgrade} before the upgrade");
    assert!(more, "requests succeed after the old process exited");
    assert_eq!(failed, 0, "no request failed across the upgrade");
    assert_eq!(get(admin, "/ready", &[]).await.status, 200);
    // The socket's path now belongs to the new process: it can be upgraded in turn.
    assert!(tokio::net::UnixStream::connect(socket).await.is_ok());
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upgrade_in_progress_and_a_missing_proxy_are_refused() {
    let http = backend(|_req| async { http::Response::new(Full::new(Bytes::from("hello"))) }).await;
    let dir = temp_dir("upgrade-busy");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, config(http.addr, http.addr, http.addr)).unwrap();
    let socket = dir.join("upgrade.sock");
    let (cfg, socket) = (cfg.to_str().unwrap(), socket.to_str().unwrap());

    // Nothing runs yet: --upgrade says so.
    let out = tokio::task::block_in_place(|| run_upgrade(cfg, socket));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--upgrade: no running proxy answers on") && err.contains(socket),
        "{err}"
    );

    let old = spawn_spur_with(&upgrade_args(cfg, socket), 2, true);
    let web = old.listeners["web"];
    // A first upgrade, held half-way: this client asked for the sockets and says no more.
    let mut first = tokio::net::UnixStream::connect(socket).await.unwrap();
    first
        .write_all(b"{\"op\":\"hello\",\"pid\":1}\n")
        .await
        .unwrap();
    let line = read_line(&mut first).await;
    assert!(line.contains("\"op\":\"sockets\""), "{line}");

    let out = tokio::task::block_in_place(|| run_upgrade(cfg, socket));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the upgrade: an upgrade to pid 1 is already in progress"),
        "{err}"
    );
    // The held upgrade gives up: the old process serves on, and can be upgraded again.
    drop(first);
    assert_eq!(get(web, "/x", &[]).await.status, 200);
    let ok = eventually(STEP, || async {
        let Ok(mut s) = tokio::net::UnixStream::connect(socket).await else {
            return false;
        };
        s.write_all(b"{\"op\":\"hello\",\"pid\":2}\n").await.is_ok()
            && read_line(&mut s).await.contains("\"op\":\"sockets\"")
    })
    .await;
    assert!(ok, "an abandoned upgrade frees the way for the next");
}

/// `spur proxy --upgrade` run to its end: it must fail (it would otherwise serve forever).
fn run_upgrade(cfg: &str, socket: &str) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(upgrade_args(cfg, socket))
        .arg("--upgrade")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("spur proxy --upgrade did not give up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

async fn read_line(s: &mut tokio::net::UnixStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while tokio::time::timeout(STEP, s.read_exact(&mut byte))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        if byte[0] == b'\n' {
            break;
        }
        out.push(byte[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_connections_are_closed_at_the_handover_and_reopen_on_the_new_process() {
    let pki = common::pki::Pki::new("upgrade-h3");
    let server = pki.issue("edge", None, 1);
    let http = backend(|_req| async { http::Response::new(Full::new(Bytes::from("hello"))) }).await;
    let dir = temp_dir("upgrade-h3");
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
drain_timeout: 30s
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: edge
    listen: 127.0.0.1:0
    protocol: http3
    tls: {{ cert: {cert}, key: {key} }}
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
            cert = server.cert,
            key = server.key,
            app = http.addr
        ),
    )
    .unwrap();
    let socket = dir.join("upgrade.sock");
    let (cfg, socket) = (cfg.to_str().unwrap(), socket.to_str().unwrap());
    let tls = || h3c::client_tls(&pki.ca_path, None);

    let mut old = spawn_spur_with(&upgrade_args(cfg, socket), 1, true);
    let edge = old.listeners["edge"];
    let before = h3c::H3Conn::open(edge, tls()).await.unwrap();
    assert_eq!(before.get("/").await.unwrap().0.status(), 200);

    let mut args = upgrade_args(cfg, socket);
    args.push("--upgrade");
    let new = spawn_spur_with(&args, 1, true);
    assert_eq!(new.listeners["edge"], edge, "the UDP socket moved");

    // The old process closes its QUIC connections at once: their datagrams now go to
    // whichever process reads first, so they could not go on.
    let closed = tokio::time::timeout(STEP, before.quic.closed())
        .await
        .expect("the old connection is closed at the handover");
    match &closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(0x100),
                "H3_NO_ERROR"
            );
            assert_eq!(&close.reason[..], b"upgrade");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    // It does not wait for the drain timeout to exit.
    let code = tokio::task::block_in_place(|| exit_code(&mut old, STEP));
    assert_eq!(code, Some(0));
    // A new connection reaches the new process.
    let after = h3c::H3Conn::open(edge, tls())
        .await
        .expect("a new QUIC connection");
    assert_eq!(after.get("/").await.unwrap().0.status(), 200);
    drop(new);
}
