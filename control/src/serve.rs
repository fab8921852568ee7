//! Serving the control API: the accept loop and what bounds each connection.
//!
//! The control plane is reachable by every pod of the mesh, so a client that opens
//! connections and sends nothing must not be able to hold them: every connection must
//! start its first request within `header_timeout` (the TLS handshake included), an
//! HTTP/1.1 request head must be complete within it, an HTTP/2 peer must answer pings,
//! and at most `max_connections` are open at once (more are closed at accept and counted
//! in `spur_control_connections_rejected_total`). Watch streams are long-lived responses,
//! not silent connections: none of these limits cuts them.
//!
//! The protocol is chosen per connection without hyper's auto-detection (whose first read
//! has no deadline): by ALPN under TLS, else by peeking for the HTTP/2 preface.

use crate::tls::ApiTls;
use crate::Control;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What bounds the API's connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From accept to a complete first request head (TLS handshake included), and for each
    /// later HTTP/1.1 head; also the HTTP/2 ping interval and timeout.
    pub header_timeout: Duration,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Counts a connection as open until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts connections until the task is aborted; aborting it closes every connection
/// (they live in its JoinSet), watch streams included.
pub async fn accept_loop(
    tcp: TcpListener,
    control: Arc<Control>,
    tls: Option<Arc<ApiTls>>,
    limits: Limits,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            open.fetch_sub(1, Ordering::AcqRel);
            control.metrics.connections_rejected.inc();
            drop(stream);
            continue;
        }
        let guard = Open(open.clone());
        let (control, tls) = (control.clone(), tls.clone());
        conns.spawn(async move {
            control.metrics.connections.inc();
            serve_connection(stream, control.clone(), tls, limits).await;
            control.metrics.connections.dec();
            drop(guard);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    control: Arc<Control>,
    tls: Option<Arc<ApiTls>>,
    limits: Limits,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        None => match sniff_h2(&stream, limits.header_timeout).await {
            Some(h2) => serve_http(TokioIo::new(stream), h2, control, limits).await,
            None => tracing::debug!("control API connection sent no request in time"),
        },
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_http(TokioIo::new(s), h2, control, limits).await
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "control API TLS handshake failed"),
                Err(_) => tracing::debug!("control API TLS handshake timed out"),
            }
        }
    }
}

/// Whether a plaintext connection speaks HTTP/2 (prior knowledge): `Some(true)` once the
/// whole preface is there, `Some(false)` as soon as the bytes differ from it, `None` if
/// the client closes or is too slow to say.
async fn sniff_h2(tcp: &TcpStream, within: Duration) -> Option<bool> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far: peek does not consume, so wait a little before
        // looking again rather than spin.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if Instant::now() >= deadline {
            return None;
        }
    }
}

async fn serve_http<I>(io: TokioIo<I>, h2: bool, control: Arc<Control>, limits: Limits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let c = control.clone();
        async move { Ok::<_, std::convert::Infallible>(crate::api::route(c, req).await) }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(limits.header_timeout))
            .keep_alive_timeout(limits.header_timeout)
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(io, svc)
            .await;
    }
}
