//! Timing of a downstream connection: an IO wrapper that stamps the time of the last byte
//! moved either way ([`Activity`], for `idle_timeout`), and the request-head clock
//! ([`HeadClock`], for `header_timeout`).
//!
//! Why a head clock of our own: hyper's `header_read_timeout` starts whenever it waits for a
//! request head, so it also runs while a keep-alive connection sits idle between requests,
//! closing it at `header_timeout` (and counting a header timeout that never happened),
//! while a connection that never sends a byte is only bounded by `idle_timeout`. Spur
//! applies the two as nginx (`client_header_timeout`, `keepalive_timeout`) and HAProxy
//! (`timeout http-request`, `timeout http-keep-alive`) do:
//!
//! - from accept until the first request head is complete: `header_timeout` (the TLS
//!   handshake included);
//! - between requests: `idle_timeout`, until the first byte of the next request;
//! - from that byte until its head is complete: `header_timeout` again.
//!
//! The IO wrapper starts the clock on the first byte read while no request is in flight;
//! the service stops it when hyper hands it a parsed head, and the response body's guard
//! marks the request done. HTTP/2 frames flow between requests (pings, window updates),
//! so on an HTTP/2 connection the clock runs only until its first request.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The module's clock, in milliseconds: the kernel's coarse monotonic clock (see
/// [`crate::clock::coarse_millis`]). It is read at every read and write of a served
/// connection, two or more times per request, where whole milliseconds and a tick's lag are
/// precise enough for limits of a second or more.
fn now_ms() -> u64 {
    crate::clock::coarse_millis(libc::CLOCK_MONOTONIC_COARSE)
}

/// How far [`now_ms`] may lag the time, in whole milliseconds rounded up: one tick
/// (`clock_getres`, 4 ms at 250 Hz).
fn lag_ms() -> u64 {
    static LAG: OnceLock<u64> = OnceLock::new();
    *LAG.get_or_init(|| {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as in `now_ms`.
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
        (res.tv_sec as u64 * 1000 + (res.tv_nsec as u64).div_ceil(1_000_000)).max(1)
    })
}

/// Whole milliseconds surely gone since `since` (a [`now_ms`] reading). Each reading lags
/// the time by up to a tick and is cut to the millisecond, so the time gone can be up to a
/// tick and 1 ms less than their difference: a limit judged on this is not reached early
/// (header_timeout and idle_timeout end a connection no sooner than configured, up to two
/// ticks and a millisecond later), unless the kernel ran a tick late when `since` was read
/// (a stalled virtual machine), by as much as it was late.
fn surely_gone_since(since: u64) -> u64 {
    now_ms().saturating_sub(since).saturating_sub(lag_ms() + 1)
}

/// The time of a connection's last activity, shared between its IO and its watchdog.
#[derive(Clone)]
pub struct Activity(Arc<ActivityState>);

struct ActivityState {
    last: AtomicU64,
    /// Bytes were written since the last flush completed.
    unflushed: AtomicBool,
}

impl Activity {
    pub fn new() -> Activity {
        Activity(Arc::new(ActivityState {
            last: AtomicU64::new(now_ms()),
            unflushed: AtomicBool::new(false),
        }))
    }

    /// Something happened on the connection now.
    pub fn touch(&self) {
        self.touch_at(now_ms());
    }

    /// [`Activity::touch`] with a clock reading taken already.
    fn touch_at(&self, ms: u64) {
        self.0.last.store(ms, Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.touch();
        self.0.unflushed.store(true, Ordering::Relaxed);
    }

    fn flushed(&self) {
        self.0.unflushed.store(false, Ordering::Relaxed);
    }

    /// Everything written has been flushed to the socket.
    pub fn is_flushed(&self) -> bool {
        !self.0.unflushed.load(Ordering::Relaxed)
    }

    /// Completes once no byte has moved for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        let limit_ms = limit.as_millis() as u64;
        loop {
            let idle = surely_gone_since(self.0.last.load(Ordering::Relaxed));
            if idle >= limit_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(limit_ms - idle)).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// `since` when no request head is being read.
const NO_HEAD: u64 = u64::MAX;

/// When the request head being read on a connection began (see the module doc).
#[derive(Clone)]
pub struct HeadClock(Arc<HeadState>);

struct HeadState {
    /// When reading the current head began (ms on the module's clock), or [`NO_HEAD`].
    since: AtomicU64,
    /// Requests whose head was read and whose response has not ended.
    in_flight: AtomicUsize,
    /// HTTP/2: the clock stopped for good at the first request.
    multiplexed: AtomicBool,
    /// Wakes [`HeadClock::expired`] when a head starts.
    started: Notify,
}

impl HeadClock {
    /// A clock that starts now: call it at accept, so that the TLS handshake counts too.
    pub fn start() -> HeadClock {
        HeadClock(Arc::new(HeadState {
            since: AtomicU64::new(now_ms()),
            in_flight: AtomicUsize::new(0),
            multiplexed: AtomicBool::new(false),
            started: Notify::new(),
        }))
    }

    /// Bytes arrived: the first ones while no request is in flight begin the next head.
    /// Bytes arrived at `ms` (a [`now_ms`] reading).
    fn on_read(&self, ms: u64) {
        let s = &self.0;
        if s.in_flight.load(Ordering::Acquire) == 0
            && !s.multiplexed.load(Ordering::Acquire)
            && s.since
                .compare_exchange(NO_HEAD, ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            s.started.notify_one();
        }
    }

    /// A request head is complete: the clock stops until the request is done (drop the
    /// guard when its response ends).
    /// No request is in progress: none answered but not yet finished, no head started.
    pub fn is_idle(&self) -> bool {
        let s = &self.0;
        s.in_flight.load(Ordering::Acquire) == 0 && s.since.load(Ordering::Acquire) == NO_HEAD
    }

    pub fn head_done(&self, version: http::Version) -> RequestGuard {
        let s = &self.0;
        if version == http::Version::HTTP_2 {
            s.multiplexed.store(true, Ordering::Release);
        }
        s.in_flight.fetch_add(1, Ordering::AcqRel);
        s.since.store(NO_HEAD, Ordering::Release);
        RequestGuard(self.clone())
    }

    /// A request's head was read and its response has not ended.
    pub fn in_request(&self) -> bool {
        self.0.in_flight.load(Ordering::Acquire) > 0
    }

    /// Completes once a request is in progress: its head read and handed to the service.
    /// Used only while draining, so it may poll briefly while a head is half read.
    pub async fn request_started(&self) {
        let s = &self.0;
        loop {
            let started = s.started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            if s.in_flight.load(Ordering::Acquire) > 0 {
                return;
            }
            if s.since.load(Ordering::Acquire) == NO_HEAD {
                started.await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Completes once a request head has been pending for `limit`.
    pub async fn expired(&self, limit: Duration) {
        let limit_ms = limit.as_millis() as u64;
        loop {
            let started = self.0.started.notified();
            tokio::pin!(started);
            started.as_mut().enable();
            let since = self.0.since.load(Ordering::Acquire);
            if since == NO_HEAD {
                started.await;
                continue;
            }
            let waited = surely_gone_since(since);
            if waited >= limit_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(limit_ms - waited)).await;
        }
    }
}

/// Which of a connection's clocks ran out (see [`watchdog`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Watch {
    /// A request head has been pending for `header_timeout`.
    HeaderTimeout,
    /// No byte moved for `idle_timeout`.
    Idle,
    /// No request in progress, nothing unflushed, and no byte moved for the park delay.
    Parkable,
}

/// `header_timeout`, `idle_timeout` and (with `park`) parking, on one timer: what a served
/// connection's task polls at every wake-up (several per request), so it costs one sleep's
/// poll. The timer is set for the earliest time one of them could end; when it fires, the
/// clocks are read again and it is set again. No head in progress: a head that starts later
/// ends later than `header_timeout` from now, so that is when to look again.
pub async fn watchdog(
    head: &HeadClock,
    activity: &Activity,
    header_timeout: Duration,
    idle_timeout: Duration,
    park: Option<Duration>,
) -> Watch {
    let header_ms = header_timeout.as_millis() as u64;
    let idle_ms = idle_timeout.as_millis() as u64;
    let park_ms = park.map(|p| p.as_millis() as u64);
    loop {
        let since = head.0.since.load(Ordering::Acquire);
        let mut wait = header_ms;
        if since != NO_HEAD {
            let waited = surely_gone_since(since);
            if waited >= header_ms {
                return Watch::HeaderTimeout;
            }
            wait = header_ms - waited;
        }
        let quiet = surely_gone_since(activity.0.last.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            return Watch::Idle;
        }
        wait = wait.min(idle_ms - quiet);
        if let Some(park_ms) = park_ms {
            if quiet < park_ms {
                wait = wait.min(park_ms - quiet);
            } else if head.is_idle() && activity.is_flushed() {
                return Watch::Parkable;
            } else {
                // Quiet but busy (a response still being made): look again later.
                wait = wait.min(park_ms);
            }
        }
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
}

/// A request in flight on a [`HeadClock`]'s connection; dropped when its response ends.
pub struct RequestGuard(HeadClock);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`RequestGuard`] until it ends or is dropped.
pub struct Guarded<B> {
    body: B,
    guard: Option<RequestGuard>,
}

impl<B> Guarded<B> {
    pub fn new(body: B, guard: RequestGuard) -> Guarded<B> {
        Guarded {
            body,
            guard: Some(guard),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Guarded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pub struct IdleIo<T> {
    inner: T,
    activity: Activity,
    head: Option<HeadClock>,
    /// Bytes read from and written to `inner` so far.
    read: u64,
    written: u64,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        IdleIo {
            inner,
            activity,
            head: None,
            read: 0,
            written: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes (read from, written to) the inner stream so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.read, self.written)
    }

    /// [`IdleIo::new`] that also starts `head` on the first byte of each request.
    pub fn with_head(inner: T, activity: Activity, head: HeadClock) -> Self {
        IdleIo {
            inner,
            activity,
            head: Some(head),
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.read += (buf.filled().len() - before) as u64;
            // One clock reading for both clocks.
            let ms = now_ms();
            this.activity.touch_at(ms);
            if let Some(head) = &this.head {
                head.on_read(ms);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                this.written += *n as u64;
                this.activity.wrote();
            }
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                this.written += *n as u64;
                this.activity.wrote();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            this.activity.flushed();
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Completes `drain_timeout` after `drain` turns true: how long a connection that cannot be
/// closed gracefully (raw TCP, an upgraded tunnel) may still run once draining starts.
pub async fn drained(mut drain: tokio::sync::watch::Receiver<bool>, drain_timeout: Duration) {
    if drain.wait_for(|d| *d).await.is_err() {
        // The listener task is gone without draining (the process is exiting).
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(drain_timeout).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coarse clock lags by up to a tick: a time judged gone is not more than the time
    /// that went. Red with the tick's lag not taken off (a quarter of these tries judge too
    /// much then); two are let off, for a tick the kernel ran late (a stalled machine).
    #[test]
    fn time_judged_gone_is_not_more_than_the_time_that_went() {
        let mut over = Vec::new();
        for _ in 0..40 {
            let started = std::time::Instant::now();
            let since = now_ms();
            std::thread::sleep(Duration::from_millis(1));
            let gone = surely_gone_since(since);
            let went = started.elapsed().as_millis() as u64;
            if gone > went {
                over.push((gone, went));
            }
        }
        assert!(over.len() <= 2, "(judged gone, went) in ms: {over:?}");
        // And it follows the time: 50 ms later, no more than a tick's lag at each reading
        // and a millisecond go uncounted (here with room for a tick the kernel was late with).
        let since = now_ms();
        std::thread::sleep(Duration::from_millis(50));
        let gone = surely_gone_since(since);
        assert!(
            gone + 2 * lag_ms() + 1 + 10 >= 50,
            "{gone} ms judged gone of 50"
        );
    }
}
