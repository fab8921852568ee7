//! One downstream HTTP connection: HTTP/1.1 or HTTP/2 (by ALPN, or by the client's first
//! bytes: the HTTP/2 preface means prior knowledge), served by hyper, with the listener's
//! timeouts and draining.
//!
//! **Idle HTTP/1.1 connections are parked.** hyper keeps an 8 KiB read buffer and an 8 KiB
//! write buffer for every connection for as long as it lives, and the request future's box
//! with them: most of what a sidecar's idle keep-alive connections cost (HAProxy frees its
//! buffers between requests). Once a connection has had no request in progress, nothing
//! left to flush and no byte moving for [`PARK_AFTER`], hyper's connection is taken apart
//! (`into_parts`: nothing is closed, nothing is sent) and only the socket is kept, waiting
//! to become readable; the next request's bytes start a fresh hyper connection on it. A
//! busy connection never parks, so the rebuild (a few small allocations) is paid only by
//! connections that were idle anyway.

use crate::adapters::idle::{watchdog, Activity, HeadClock, IdleIo, Watch};
use crate::metrics::ListenerReasonLabels;
use crate::snapshot::ListenerRt;
use crate::tls::Stream;
use crate::Shared;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// How long an HTTP/1.1 connection stays idle before hyper's state for it is dropped.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// The HTTP/2 connection preface a client with prior knowledge starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The socket under hyper: the client's stream with Spur's activity and head clocks.
pub type Io = IdleIo<Stream>;

/// What the connection's loop needs besides hyper: where to count and log, and its clocks.
pub struct Limits<'a> {
    pub shared: &'a Shared,
    pub lst: &'a ListenerRt,
    pub peer: SocketAddr,
    pub head: HeadClock,
    pub activity: Activity,
    pub shutdown: watch::Receiver<bool>,
}

/// Serves a connection until it closes, times out or is drained.
pub async fn serve<S, B>(io: Io, h2_by_alpn: bool, svc: S, mut limits: Limits<'_>)
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut io = Rewind::new(io, Bytes::new());
    let h2 = h2_by_alpn || {
        let sniffed = guard(&mut limits, sniff(&mut io)).await;
        match sniffed {
            Some(Ok(h2)) => h2,
            _ => return,
        }
    };
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(limits.lst.limits.max_header_bytes.get() as u32)
            .max_concurrent_streams(1024);
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        drive(Box::pin(conn).as_mut(), &mut limits, false).await;
        return;
    }
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Off: hyper's would also run between requests (see adapters::idle); the head
        // clock applies header_timeout instead.
        .header_read_timeout(None)
        .max_buf_size(header_buf_size(limits.lst.limits.max_header_bytes.get()))
        .keep_alive(true);
    loop {
        let conn = builder
            .serve_connection(TokioIo::new(io), svc.clone())
            .with_upgrades();
        let mut conn = Box::pin(conn);
        if !drive(conn.as_mut(), &mut limits, true).await {
            return;
        }
        // Parked: hyper's state goes; the socket (and any bytes hyper read ahead) stays.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return;
        };
        let (mut stream, unread) = parts.io.into_inner().into_parts();
        let mut prefix = BytesMut::new();
        prefix.extend_from_slice(&unread);
        prefix.extend_from_slice(&parts.read_buf);
        // Before waiting: the read-ahead bytes share hyper's whole read buffer.
        drop((unread, parts.read_buf, parts.service));
        crate::footprint::parked();
        if prefix.is_empty() {
            // Waits for the next request's first bytes with no buffer of hyper's. Plain
            // TCP: until the socket is readable, with no buffer at all. TLS may hold bytes
            // it decrypted already, so it waits in a read.
            if let Some(tcp) = stream.get_ref().plain() {
                match guard(&mut limits, tcp.readable()).await {
                    Some(Ok(())) => {}
                    _ => return,
                }
            }
            prefix.reserve(1024);
            match guard(&mut limits, stream.read_buf(&mut prefix)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        io = Rewind::new(stream, prefix.freeze());
    }
}

/// Reads the client's first bytes until they are the HTTP/2 preface or cannot become it.
async fn sniff(io: &mut Rewind<Io>) -> std::io::Result<bool> {
    let mut buf = BytesMut::with_capacity(PREFACE.len());
    while buf.len() < PREFACE.len() {
        if io.inner.read_buf(&mut buf).await? == 0 {
            break;
        }
        if !PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
            break;
        }
    }
    let h2 = buf.len() >= PREFACE.len() && buf[..PREFACE.len()] == *PREFACE;
    io.prefix = buf.freeze();
    Ok(h2)
}

/// `f`, unless the connection's clocks or the drain end it first (`None`).
///
/// After an upgrade ([`crate::Shared::handed_over`]) the drain does not end the wait: the
/// client may be sending its next request already; that one is answered (and closes the
/// connection), unless the drain timeout passes first.
async fn guard<F: Future>(limits: &mut Limits<'_>, f: F) -> Option<F::Output> {
    let header_timeout = limits.lst.limits.header_timeout.get();
    let idle = limits.lst.limits.idle_timeout.get();
    let gentle = limits.shared.handed_over.load(Ordering::Acquire);
    let drained = match gentle {
        true => Some(limits.shared.snapshot.load().drain_timeout),
        false => None,
    }
    .map(|timeout| crate::adapters::idle::drained(limits.shutdown.clone(), timeout));
    tokio::select! {
        r = f => Some(r),
        _ = limits.head.expired(header_timeout) => {
            limits.shared.metrics.reject(&limits.lst.name, "header_timeout");
            None
        }
        _ = limits.activity.idle_for(idle) => None,
        _ = limits.shutdown.wait_for(|s| *s), if !gentle => None,
        _ = async { drained.expect("made when gentle").await }, if gentle => None,
    }
}

/// A hyper connection that can be asked to finish what it is doing and close.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn shutdown_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs a hyper connection with the listener's timeouts and draining. True when it was
/// left idle long enough to be parked (`may_park`); false when it has ended.
async fn drive<C: Graceful + ?Sized>(
    mut conn: Pin<&mut C>,
    limits: &mut Limits<'_>,
    may_park: bool,
) -> bool {
    let lst = limits.lst;
    let idle = lst.limits.idle_timeout.get();
    let header_timeout = lst.limits.header_timeout.get();
    let mut draining = false;
    // hyper told to finish: at once, or (HTTP/1.1 after an upgrade, when no request is in
    // progress) at the next request, so that the client gets `Connection: close` on its
    // response instead of a connection closed under a request it may be sending.
    let mut told = false;
    // Once draining, the connection gets the drain timeout to finish, then it is dropped.
    let drain_deadline = tokio::time::sleep(Duration::from_secs(10 * 365 * 86_400));
    tokio::pin!(drain_deadline);
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    if let Some(reason) = classify(&e) {
                        limits.shared.metrics.rejected
                            .get_or_create(&ListenerReasonLabels { listener: lst.name.clone(), reason })
                            .inc();
                    }
                    tracing::debug!(listener = &*lst.name, peer = %limits.peer, error = %e, "connection ended with an error");
                }
                return false;
            }
            _ = limits.shutdown.wait_for(|s| *s), if !draining => {
                draining = true;
                let gentle = may_park && limits.shared.handed_over.load(Ordering::Acquire);
                if !gentle || limits.head.in_request() {
                    conn.as_mut().shutdown_gracefully();
                    told = true;
                }
                let timeout = limits.shared.snapshot.load().drain_timeout;
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
            _ = limits.head.request_started(), if draining && !told => {
                conn.as_mut().shutdown_gracefully();
                told = true;
            }
            _ = &mut drain_deadline, if draining => {
                tracing::debug!(listener = &*lst.name, peer = %limits.peer, "drain timeout: connection closed");
                return false;
            }
            watch = watchdog(
                &limits.head,
                &limits.activity,
                header_timeout,
                idle,
                (may_park && !draining).then_some(PARK_AFTER),
            ) => match watch {
                Watch::HeaderTimeout => {
                    limits.shared.metrics.reject(&lst.name, "header_timeout");
                    tracing::debug!(listener = &*lst.name, peer = %limits.peer, "header timeout");
                    return false;
                }
                Watch::Idle => {
                    tracing::debug!(listener = &*lst.name, peer = %limits.peer, "idle timeout");
                    return false;
                }
                Watch::Parkable => return true,
            },
        }
    }
}

fn header_buf_size(limit: u64) -> usize {
    // hyper needs at least 8 KiB; leave room over the limit so that Spur's own check (which
    // answers 431 with x-spur-error) sees oversize heads before hyper's parser refuses them.
    (limit as usize * 2 + 16 * 1024).max(64 * 1024)
}

/// Names the reason a connection failed, for the rejection metric.
fn classify(h: &hyper::Error) -> Option<&'static str> {
    if h.is_timeout() {
        Some("header_timeout")
    } else if h.is_parse_too_large() {
        Some("headers_too_large")
    } else if h.is_parse() {
        Some("malformed")
    } else {
        None
    }
}

/// An IO with bytes already read from it put back in front.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(inner: T, prefix: Bytes) -> Rewind<T> {
        Rewind { prefix, inner }
    }

    fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
