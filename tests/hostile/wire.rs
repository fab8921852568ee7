//! Raw HTTP/1.1 on both sides of the proxy, for the hostile-input tests: a client that
//! writes bytes no polite client would, and a backend that records the heads it receives
//! as they arrived.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every step must finish within this; a hang fails instead of blocking the suite.
pub const STEP: Duration = Duration::from_secs(10);

/// Sends `bytes` on a new connection and reads until the proxy closes it or `STEP` passes;
/// the text of what came back.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_all(&mut s).await
}

pub async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of the first response in `text` (0 if there is none).
pub fn status_of(text: &str) -> u16 {
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The body of a response read whole from a connection the proxy closed.
pub fn body_of(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// A request on a new connection, closed after the answer: status and body.
pub async fn ask(addr: SocketAddr, head: &str) -> (u16, String) {
    let text = raw(addr, format!("{head}connection: close\r\n\r\n").as_bytes()).await;
    (status_of(&text), body_of(&text).to_string())
}

/// A backend on raw TCP: it reads each request head (and a `content-length` body), records
/// the head as it arrived, and writes `reply(head)`; after a `101` it echoes every byte.
pub struct RawBackend {
    pub addr: SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Connections accepted, and closed by the proxy.
    conns: std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.conns[0].load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn closed(&self) -> usize {
        self.conns[1].load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub async fn raw_backend(reply: fn(&str) -> String) -> RawBackend {
    // (Closures without captures coerce to `fn`.)
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let conns: std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]> = Default::default();
    let seen = heads.clone();
    let counts = conns.clone();
    let task = tokio::spawn(async move {
        use std::sync::atomic::Ordering::SeqCst;
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            let counts = counts.clone();
            counts[0].fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = find(&buf, b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                counts[1].fetch_add(1, SeqCst);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + length);
                    seen.lock().unwrap().push(head.clone());
                    let out = reply(&head);
                    if s.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                    if out.starts_with("HTTP/1.1 101") {
                        let (mut r, mut w) = s.split();
                        let _ = w.write_all(&buf).await;
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                }
            });
        }
    });
    RawBackend {
        addr,
        heads,
        conns,
        task,
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether a request head has this header (any case), with a value containing `part`.
pub fn has_header(head: &str, name: &str, part: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case(name) && v.to_ascii_lowercase().contains(part)
        })
    })
}
