//! One downstream HTTP connection: HTTP/1.1 or HTTP/2 (by ALPN, or by the client's first
//! bytes: the HTTP/2 preface means prior knowledge), with the listener's timeouts and
//! draining. HTTP/2 is Spur's own server ([`h2_server`]); HTTP/1.1 is Spur's own server
//! ([`h1_server`]) for the requests it takes, hyper's for the rest.
//!
//! **Idle HTTP/1.1 connections are parked.** hyper keeps an 8 KiB read buffer and an 8 KiB
//! write buffer for every connection for as long as it lives, and the request future's box
//! with them: most of what a sidecar's idle keep-alive connections cost (HAProxy frees its
//! buffers between requests). Once a connection has had no request in progress, nothing
//! left to flush and no byte moving for [`PARK_AFTER`], hyper's connection is taken apart
//! (`into_parts`: nothing is closed, nothing is sent) and only the socket is kept, waiting
//! to become readable; the next request's bytes start a fresh hyper connection on it. A
//! busy connection never parks, so the rebuild (a few small allocations) is paid only by
//! connections that were idle anyway. HTTP/2 connections do not park: an idle one holds no
//! buffer in the first place (see `adapters::lend`).

use crate::adapters::idle::{watchdog, Activity, HeadClock, IdleIo, Watch};
use crate::adapters::{h1_server, h2_server};
use crate::body::InBody;
use crate::metrics::ListenerReasonLabels;
use crate::snapshot::ListenerRt;
use crate::tls::Stream;
use crate::Shared;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Serves a connection until it closes, times out or is drained. HTTP/1.1 requests go to
/// `own` through Spur's own server ([`h1_server`]) where it takes them, else to `svc`
/// through hyper's.
pub async fn serve<S, B, H, F, O>(io: Io, h2_by_alpn: bool, svc: S, own: H, mut limits: Limits<'_>)
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    H: Fn(http::Request<InBody>) -> F,
    F: Future<Output = http::Response<O>>,
    O: http_body::Body<Data = Bytes> + Unpin,
    O::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
        return serve_h2(io, &own, &mut limits).await;
    }
    let max_head = header_buf_size(limits.lst.limits.max_header_bytes.get());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Off: hyper's would also run between requests (see adapters::idle); the head
        // clock applies header_timeout instead.
        .header_read_timeout(None)
        .max_buf_size(max_head)
        .keep_alive(true);
    let (mut io, sniffed) = io.into_parts();
    let mut buf = BytesMut::from(&sniffed[..]);
    drop(sniffed);
    loop {
        // Spur's own server, until a request it leaves to hyper.
        let driven = serve_own(&mut io, &mut buf, &own, &mut limits, max_head).await;
        match driven {
            Driven::Done(h1_server::Ended::ToHyper) => {}
            Driven::Parked => {
                // Idle: the server's buffers go (the read buffer's bytes, if any, stay).
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                crate::footprint::parked();
                if !wait_for_bytes(&mut io, &mut buf, &mut limits).await {
                    return;
                }
                continue;
            }
            Driven::Done(h1_server::Ended::Closed) | Driven::Ended => return,
        }
        // hyper, until the connection parks.
        let conn = builder
            .serve_connection(
                TokioIo::new(Rewind::new(io, buf.split().freeze())),
                svc.clone(),
            )
            .with_upgrades();
        let mut conn = Box::pin(conn);
        match drive(conn.as_mut(), &mut limits, true).await {
            Driven::Parked => {}
            Driven::Done(Err(e)) => {
                count_error(&limits, &e);
                return;
            }
            Driven::Done(Ok(())) | Driven::Ended => return,
        }
        // Parked: hyper's state goes; the socket (and any bytes hyper read ahead) stays.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return;
        };
        let (stream, unread) = parts.io.into_inner().into_parts();
        buf = BytesMut::new();
        buf.extend_from_slice(&unread);
        buf.extend_from_slice(&parts.read_buf);
        io = stream;
        // Before waiting: the read-ahead bytes share hyper's whole read buffer.
        drop((unread, parts.read_buf, parts.service));
        crate::footprint::parked();
        // Bytes hyper read ahead go to the server at once; it parks again if they are
        // only part of a head.
        if buf.is_empty() && !wait_for_bytes(&mut io, &mut buf, &mut limits).await {
            return;
        }
    }
}

/// An HTTP/2 connection, served by Spur's own HTTP/2 server ([`h2_server`]). Between its
/// turns it holds no read or write buffer unless one holds bytes (a frame half read, output
/// not yet written): the worker lends it its own (see `adapters::lend`), so it has no need
/// to park.
async fn serve_h2<H, F, O>(io: Rewind<Io>, own: &H, limits: &mut Limits<'_>)
where
    H: Fn(http::Request<InBody>) -> F,
    F: Future<Output = http::Response<O>>,
    O: http_body::Body<Data = Bytes> + Unpin,
    O::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let closing = AtomicBool::new(false);
    let max_header_list = limits.lst.limits.max_header_bytes.get() as u32;
    let head = limits.head.clone();
    // Boxed: the connection's state (its streams', the HPACK table) is kilobytes.
    let mut served = Box::pin(h2_server::serve(io, own, &head, &closing, max_header_list));
    let conn = Own {
        fut: served.as_mut(),
        closing: &closing,
    };
    match drive(pin!(conn), limits, false).await {
        Driven::Done(Err(e)) => {
            tracing::debug!(listener = &*limits.lst.name, peer = %limits.peer, error = %e, "HTTP/2 connection ended with an error");
        }
        // Not `Parked`: driven with `may_park` false.
        Driven::Done(Ok(())) | Driven::Ended | Driven::Parked => {}
    }
}

/// Spur's own HTTP/1.1 server on the connection, until it ends, parks, or meets a request
/// for hyper.
async fn serve_own<H, F, O>(
    io: &mut Io,
    buf: &mut BytesMut,
    own: &H,
    limits: &mut Limits<'_>,
    max_head: usize,
) -> Driven<h1_server::Ended>
where
    H: Fn(http::Request<InBody>) -> F,
    F: Future<Output = http::Response<O>>,
    O: http_body::Body<Data = Bytes> + Unpin,
    O::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let closing = AtomicBool::new(false);
    let conn = h1_server::Conn {
        io,
        buf,
        head: limits.head.clone(),
        closing: &closing,
        max_head,
    };
    // Boxed for as long as the connection is busy: the request path's future is inside
    // it, and an idle (parked) connection holds none.
    let mut served = Box::pin(h1_server::serve(conn, own));
    let own_conn = Own {
        fut: served.as_mut(),
        closing: &closing,
    };
    drive(pin!(own_conn), limits, true).await
}

/// Waits, on a parked connection, for the client's next bytes: false when the connection's
/// clocks or the drain end it first. Not parked again before then (the clocks that park a
/// connection would find it parkable at once). Plain TCP waits until the socket is
/// readable, with no buffer at all; TLS may hold bytes it decrypted already, so it waits in
/// a read.
async fn wait_for_bytes(io: &mut Io, buf: &mut BytesMut, limits: &mut Limits<'_>) -> bool {
    if let Some(tcp) = io.get_ref().plain() {
        let readable = matches!(guard(limits, tcp.readable()).await, Some(Ok(())));
        // Nothing read yet: without this, the connection would look parkable still.
        limits.activity.touch();
        return readable;
    }
    buf.reserve(1024);
    matches!(guard(limits, io.read_buf(buf)).await, Some(Ok(n)) if n > 0)
}

/// Counts and logs the error a hyper connection ended with.
fn count_error(limits: &Limits<'_>, e: &hyper::Error) {
    if let Some(reason) = classify(e) {
        limits
            .shared
            .metrics
            .rejected
            .get_or_create(&ListenerReasonLabels {
                listener: limits.lst.name.clone(),
                reason,
            })
            .inc();
    }
    tracing::debug!(listener = &*limits.lst.name, peer = %limits.peer, error = %e, "connection ended with an error");
}

/// Spur's own HTTP/1.1 or HTTP/2 server on a connection, told to finish through `closing`.
struct Own<'a, F> {
    fut: Pin<&'a mut F>,
    closing: &'a AtomicBool,
}

impl<F: Future> Future for Own<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.fut.as_mut().poll(cx)
    }
}

impl<F: Future> Graceful for Own<'_, F> {
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        // Seen at the server's next poll: `drive` polls it again at once.
        self.closing.store(true, Ordering::Release);
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

/// A connection that can be asked to finish what it is doing and close.
trait Graceful: Future {
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

/// How [`drive`] left a connection.
enum Driven<T> {
    /// The connection's future completed.
    Done(T),
    /// Idle long enough to be parked (only when `may_park`).
    Parked,
    /// Ended by a timeout or the drain.
    Ended,
}

/// Runs a connection with the listener's timeouts and draining. `may_park` (HTTP/1.1): it
/// may end parked when idle, and after an upgrade, with no request in progress, it is not
/// told to close at the drain (see [`guard`]).
async fn drive<C: Graceful + ?Sized>(
    mut conn: Pin<&mut C>,
    limits: &mut Limits<'_>,
    may_park: bool,
) -> Driven<C::Output> {
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
    // The connection wakes its task for every read and write; the drain signal and the
    // clocks rarely do. They are polled only after waking it themselves.
    let drain_gate = Gate::new();
    let clock_gate = Gate::new();
    loop {
        drain_gate.open();
        clock_gate.open();
        tokio::select! {
            biased;
            res = conn.as_mut() => return Driven::Done(res),
            _ = drain_gate.wrap(limits.shutdown.wait_for(|s| *s)), if !draining => {
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
                return Driven::Ended;
            }
            watch = clock_gate.wrap(watchdog(
                &limits.head,
                &limits.activity,
                header_timeout,
                idle,
                (may_park && !draining).then_some(PARK_AFTER),
            )) => match watch {
                Watch::HeaderTimeout => {
                    limits.shared.metrics.reject(&lst.name, "header_timeout");
                    tracing::debug!(listener = &*lst.name, peer = %limits.peer, "header timeout");
                    return Driven::Ended;
                }
                Watch::Idle => {
                    tracing::debug!(listener = &*lst.name, peer = %limits.peer, "idle timeout");
                    return Driven::Ended;
                }
                Watch::Parkable => return Driven::Parked,
            },
        }
    }
}

/// Polls a future only when it has woken its task since it was last polled (or when the
/// gate was opened): a future that waits for something rare is not polled again each time
/// something else wakes the task it shares.
struct Gate {
    flag: std::sync::Arc<GateFlag>,
    waker: std::task::Waker,
}

#[derive(Default)]
struct GateFlag {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for GateFlag {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Gate {
    fn new() -> Gate {
        let flag = std::sync::Arc::new(GateFlag::default());
        let waker = std::task::Waker::from(flag.clone());
        Gate { flag, waker }
    }

    /// The next poll polls the future (a new future must be polled to register its waker).
    fn open(&self) {
        self.flag.woken.store(true, Ordering::Relaxed);
    }

    fn wrap<F: Future>(&self, fut: F) -> Gated<'_, F> {
        Gated { gate: self, fut }
    }
}

pin_project_lite::pin_project! {
    struct Gated<'g, F> {
        gate: &'g Gate,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Gated<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let flag = &this.gate.flag;
        // Registered before the flag is read: a wake in between wakes this task again.
        flag.task.register(cx.waker());
        if !flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut.poll(&mut Context::from_waker(&this.gate.waker))
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
    pub(crate) fn new(inner: T, prefix: Bytes) -> Rewind<T> {
        Rewind { prefix, inner }
    }

    fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl Rewind<Io> {
    /// The plaintext socket under the connection, once the rewound bytes are read (`None`
    /// for TLS, whose layer may hold read bytes of its own).
    pub(crate) fn drained_tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self.prefix.is_empty() {
            true => self.inner.get_ref().plain(),
            false => None,
        }
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
