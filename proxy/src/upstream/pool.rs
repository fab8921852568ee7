//! The connections to one endpoint, HTTP/1.1 or HTTP/2 over TCP (plain or TLS).
//!
//! HTTP/1.1: a stack of connections, each carrying one exchange at a time. A connection goes
//! back on the stack as soon as its response head arrives; it is handed out again only once
//! hyper says it is ready (its response body has been read to the end), so no task waits for
//! that moment. The most recently used ready connection is taken first (its TCP window and
//! the server's keep-alive timer are the freshest), closed ones are dropped on the way.
//!
//! Spur's own HTTP/1.1 client ([`h1`], for requests without a body to plaintext endpoints)
//! keeps a second stack: its connections are on it only while idle (a response body holds
//! its connection until it ends, then puts it back), most recently used first, and the idle
//! sweep closes them like hyper's.
//!
//! HTTP/2: one multiplexed connection, shared by every request, made again when it closes.
//! Requests arriving while it is being made wait for that one handshake.
//!
//! A pooled connection that turns out closed takes the request back unwritten (hyper returns
//! it): the request then goes on one fresh connection, and the try is not charged for the
//! stale one. A fresh connection that does the same is [`Failure::NotSent`].
//!
//! An HTTP/1.1 connection nobody used for 60 to 90 seconds is closed (hyper keeps about
//! 30 KB of buffers and channels per connection, and an origin may never close its idle
//! ones): while connections sit on a stack, a task of that worker ticks every 30 s and
//! closes those that were idle through two whole ticks. Checking a connection in only
//! notes the current tick, so the request path reads no clock for it.

use super::{h1, HttpConnector, ReqBody, UpstreamError};
use crate::body::InBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use spur_config::UpstreamProtocol;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Connections kept per endpoint beyond which a returning one is closed.
const MAX_H1: usize = 1024;

/// The idle sweep's tick; an HTTP/1.1 connection idle through [`IDLE_TICKS`] - 1 whole ticks
/// is closed at the next one (so after 60 to 90 s unused).
const IDLE_TICK: Duration = Duration::from_secs(30);
const IDLE_TICKS: u64 = 3;

/// One shard per worker (see `crate::workers`): a request takes connections its own thread
/// drives, so no wake-up crosses to another core.
pub struct Pool {
    pub(super) shards: Box<[Arc<Shard>]>,
}

pub struct Shard {
    h1: Mutex<Vec<H1>>,
    /// Idle connections of Spur's own HTTP/1.1 client (see [`super::h1`]). Boxed: a
    /// connection moves between this stack and a response body whole, as one pointer.
    #[allow(clippy::vec_box)]
    pub(super) raw: Mutex<Vec<Box<h1::Conn>>>,
    h2: Mutex<Option<H2>>,
    /// Serializes making a new HTTP/2 connection.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Ticks of the idle sweep so far.
    tick: AtomicU64,
    /// Whether a sweep task runs (it ends when the stack is empty).
    sweeping: AtomicBool,
    idle_tick: Duration,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::with_idle_tick(IDLE_TICK)
    }
}

struct H1 {
    send: http1::SendRequest<ReqBody>,
    generation: u64,
    /// The sweep's tick when the connection last went back on the stack.
    tick: u64,
}

#[derive(Clone)]
struct H2 {
    send: http2::SendRequest<ReqBody>,
    generation: u64,
}

type Answer = Result<http::Response<InBody>, UpstreamError>;

/// On a response that went over a connection made for it: how long making it took (TCP,
/// TLS, HTTP handshake). Not the endpoint's answer time, so its latency estimate leaves it
/// out (see `crate::attempt`).
#[derive(Clone, Copy, Debug)]
pub struct Connecting(pub std::time::Duration);

impl Pool {
    fn with_idle_tick(idle_tick: Duration) -> Pool {
        Pool {
            shards: (0..crate::workers::count())
                .map(|_| {
                    Arc::new(Shard {
                        h1: Mutex::default(),
                        raw: Mutex::default(),
                        h2: Mutex::default(),
                        h2_connecting: tokio::sync::Mutex::default(),
                        tick: AtomicU64::new(0),
                        sweeping: AtomicBool::new(false),
                        idle_tick,
                    })
                })
                .collect(),
        }
    }

    /// Sends `req` to `addr` on a pooled or new connection made by `conn`.
    pub fn send<'a>(
        &'a self,
        conn: &'a HttpConnector,
        addr: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Sending<'a> {
        let shard = &self.shards[crate::workers::index() % self.shards.len()];
        if conn.protocol == UpstreamProtocol::Http2 {
            return Sending::Other(Box::pin(shard.send_h2(conn, addr, req)));
        }
        if conn.tls.is_some() || !h1::eligible(&req) {
            return Sending::Other(Box::pin(shard.send_h1(conn, addr, req)));
        }
        // Spur's own client: inline, the common case; a new connection boxed.
        match shard.checkout_raw(conn.generation) {
            Some(c) => Sending::Raw {
                exchange: c.start(req),
                shard,
                conn,
                addr,
            },
            None => {
                let mut head = bytes::BytesMut::new();
                h1::encode_head(&req, &mut head);
                let head_request = req.method() == http::Method::HEAD;
                Sending::Other(Box::pin(shard.send_raw_fresh(
                    conn,
                    addr,
                    head,
                    head_request,
                )))
            }
        }
    }

    /// Open HTTP/1.1 connections (idle or busy) and open HTTP/2 ones, over all shards.
    pub fn connections(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(h1, h2), s| {
            let open =
                s.h2.lock()
                    .unwrap()
                    .as_ref()
                    .is_some_and(|c| !c.send.is_closed());
            let h1 = h1 + s.h1.lock().unwrap().len() + s.raw.lock().unwrap().len();
            (h1, h2 + usize::from(open))
        })
    }
}

impl Shard {
    fn checkout_h1(&self, generation: u64) -> Option<H1> {
        let mut stack = self.h1.lock().unwrap();
        let mut i = stack.len();
        while i > 0 {
            i -= 1;
            let c = &stack[i];
            if c.send.is_closed() || c.generation != generation {
                stack.swap_remove(i);
            } else if c.send.is_ready() {
                return Some(stack.swap_remove(i));
            }
        }
        None
    }

    fn checkin_h1(self: &Arc<Self>, mut c: H1) {
        c.tick = self.tick.load(Ordering::Relaxed);
        {
            let mut stack = self.h1.lock().unwrap();
            if stack.len() >= MAX_H1 {
                return;
            }
            stack.push(c);
        }
        self.ensure_sweep();
    }

    fn checkout_raw(&self, generation: u64) -> Option<Box<h1::Conn>> {
        let mut stack = self.raw.lock().unwrap();
        while let Some(c) = stack.pop() {
            if c.generation == generation && !c.is_stale() {
                return Some(c);
            }
        }
        None
    }

    /// Starts the idle sweep unless it runs: after a push, since a sweep that found the
    /// stacks empty said so under their locks.
    fn ensure_sweep(self: &Arc<Self>) {
        if !self.sweeping.load(Ordering::Relaxed) && !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep_idle(Arc::downgrade(self), self.idle_tick));
        }
    }

    /// A request head encoded for Spur's own client, on a new connection.
    async fn send_raw_fresh(
        self: &Arc<Self>,
        conn: &HttpConnector,
        addr: SocketAddr,
        head: bytes::BytesMut,
        head_request: bool,
    ) -> Answer {
        let started = crate::clock::now();
        let crate::tls::Stream::Plain(tcp) = conn.connect(addr, false).await? else {
            return Err(UpstreamError::connect(
                "a TLS connection where plain TCP was asked",
            ));
        };
        let home: Weak<dyn h1::Home> = Arc::downgrade(self) as Weak<Shard>;
        let c = h1::Conn::new(tcp, home, conn.generation);
        let connecting = Connecting(crate::clock::now().saturating_duration_since(started));
        match c.resume(head, head_request).await {
            Ok(resp) => {
                let mut resp = resp.map(InBody::H1);
                resp.extensions_mut().insert(connecting);
                Ok(resp)
            }
            Err(f) if f.unsent.is_some() => Err(UpstreamError::not_sent(f.error)),
            Err(f) => Err(UpstreamError::sent(f.error)),
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        conn: &HttpConnector,
        addr: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Answer {
        // The common case inline; a new connection (rare, and large: TCP, TLS, handshake)
        // boxed, so every request's future stays small.
        let Some(mut c) = self.checkout_h1(conn.generation) else {
            return Box::pin(self.send_h1_fresh(conn, addr, req)).await;
        };
        match c.send.try_send_request(req).await {
            Ok(resp) => {
                framing(&resp)?; // else `c` is dropped: the connection closes
                self.checkin_h1(c);
                Ok(resp.map(InBody::Http))
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) => Box::pin(self.send_h1_fresh(conn, addr, unsent)).await,
                None => Err(UpstreamError::sent(e.into_error())),
            },
        }
    }

    /// `req` on a new connection.
    async fn send_h1_fresh(
        self: &Arc<Self>,
        conn: &HttpConnector,
        addr: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Answer {
        let started = crate::clock::now();
        let mut c = connect_h1(conn, addr).await?;
        let connecting = Connecting(crate::clock::now().saturating_duration_since(started));
        match c.send.try_send_request(req).await {
            Ok(resp) => {
                framing(&resp)?;
                self.checkin_h1(c);
                let mut resp = resp.map(InBody::Http);
                resp.extensions_mut().insert(connecting);
                Ok(resp)
            }
            Err(mut e) => Err(match e.take_message() {
                Some(_) => UpstreamError::not_sent(e.into_error()),
                None => UpstreamError::sent(e.into_error()),
            }),
        }
    }

    async fn send_h2(
        &self,
        conn: &HttpConnector,
        addr: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Answer {
        let Some(mut c) = self.current_h2(conn.generation) else {
            return Box::pin(self.send_h2_fresh(conn, addr, req)).await;
        };
        match c.send.try_send_request(req).await {
            Ok(resp) => Ok(resp.map(InBody::Http)),
            Err(mut e) => match e.take_message() {
                // The shared connection closed under us: one new connection.
                Some(unsent) => {
                    self.forget_h2(&c);
                    Box::pin(self.send_h2_fresh(conn, addr, unsent)).await
                }
                None => Err(UpstreamError::sent(e.into_error())),
            },
        }
    }

    /// `req` on the HTTP/2 connection made now (or by another request meanwhile).
    async fn send_h2_fresh(
        &self,
        conn: &HttpConnector,
        addr: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Answer {
        let started = crate::clock::now();
        let mut c = self.connect_h2(conn, addr).await?;
        let connecting = Connecting(crate::clock::now().saturating_duration_since(started));
        c.send
            .try_send_request(req)
            .await
            .map(|r| {
                let mut r = r.map(InBody::Http);
                r.extensions_mut().insert(connecting);
                r
            })
            .map_err(|mut e| match e.take_message() {
                Some(_) => UpstreamError::not_sent(e.into_error()),
                None => UpstreamError::sent(e.into_error()),
            })
    }

    fn current_h2(&self, generation: u64) -> Option<H2> {
        let h2 = self.h2.lock().unwrap();
        h2.as_ref()
            .filter(|c| c.generation == generation && !c.send.is_closed())
            .cloned()
    }

    fn forget_h2(&self, stale: &H2) {
        let mut h2 = self.h2.lock().unwrap();
        if h2
            .as_ref()
            .is_some_and(|c| c.send.is_closed() || c.generation != stale.generation)
        {
            *h2 = None;
        }
    }

    /// The shared HTTP/2 connection, made now unless another request made it meanwhile.
    async fn connect_h2(
        &self,
        conn: &HttpConnector,
        addr: SocketAddr,
    ) -> Result<H2, UpstreamError> {
        let _one_at_a_time = self.h2_connecting.lock().await;
        if let Some(c) = self.current_h2(conn.generation) {
            return Ok(c);
        }
        let io = TokioIo::new(conn.connect(addr, false).await?);
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false)
            .adaptive_window(true);
        let (send, connection) = builder
            .handshake(io)
            .await
            .map_err(UpstreamError::connect)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        let c = H2 {
            send,
            generation: conn.generation,
        };
        *self.h2.lock().unwrap() = Some(c.clone());
        Ok(c)
    }
}

/// A request on its way to an endpoint: through Spur's own HTTP/1.1 client on a pooled
/// connection, inline (a small future, on most requests' path), or any other way, boxed.
pub enum Sending<'a> {
    Raw {
        exchange: h1::Exchange,
        shard: &'a Arc<Shard>,
        conn: &'a HttpConnector,
        addr: SocketAddr,
    },
    Other(std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'a>>),
}

impl std::future::Future for Sending<'_> {
    type Output = Answer;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Answer> {
        let this = self.get_mut();
        loop {
            let (shard, conn, addr, failed) = match this {
                Sending::Other(f) => return f.as_mut().poll(cx),
                Sending::Raw {
                    exchange,
                    shard,
                    conn,
                    addr,
                } => match std::task::ready!(std::pin::Pin::new(exchange).poll(cx)) {
                    Ok(resp) => return std::task::Poll::Ready(Ok(resp.map(InBody::H1))),
                    Err(f) => (*shard, *conn, *addr, f),
                },
            };
            let Some((head, head_request)) = failed.unsent else {
                return std::task::Poll::Ready(Err(UpstreamError::sent(failed.error)));
            };
            // The pooled connection took nothing: the head goes on a fresh one.
            *this = Sending::Other(Box::pin(shard.send_raw_fresh(
                conn,
                addr,
                head,
                head_request,
            )));
        }
    }
}

impl h1::Home for Shard {
    fn checkin(self: Arc<Self>, mut conn: Box<h1::Conn>) {
        conn.tick = self.tick.load(Ordering::Relaxed);
        {
            let mut stack = self.raw.lock().unwrap();
            if stack.len() >= MAX_H1 {
                return;
            }
            stack.push(conn);
        }
        self.ensure_sweep();
    }
}

/// Refuses an HTTP/1.1 response whose framing is ambiguous (see
/// [`crate::headers::ambiguous_framing`]); its connection is then dropped, not pooled.
fn framing<B>(resp: &http::Response<B>) -> Result<(), UpstreamError> {
    if crate::headers::ambiguous_framing(resp.headers()) {
        return Err(UpstreamError::sent(
            "the response has both content-length and transfer-encoding",
        ));
    }
    Ok(())
}

/// Every tick while `shard` holds HTTP/1.1 connections: closes those idle through
/// [`IDLE_TICKS`] - 1 whole ticks. A connection still reading its response body counts as
/// used. Ends when the stack is empty (the next check-in starts another) or the endpoint
/// is gone.
async fn sweep_idle(shard: Weak<Shard>, tick: Duration) {
    loop {
        tokio::time::sleep(tick).await;
        let Some(shard) = shard.upgrade() else {
            return;
        };
        let now = shard.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let mut stack = shard.h1.lock().unwrap();
        stack.retain_mut(|c| {
            if !c.send.is_ready() {
                c.tick = now; // busy (its body is being read) or closed
                return !c.send.is_closed();
            }
            now - c.tick < IDLE_TICKS
        });
        let mut raw = shard.raw.lock().unwrap();
        // A connection of Spur's own client is on its stack only while idle.
        raw.retain(|c| now - c.tick < IDLE_TICKS && !c.is_stale());
        if stack.is_empty() && raw.is_empty() {
            shard.sweeping.store(false, Ordering::Relaxed);
            return;
        }
    }
}

async fn connect_h1(conn: &HttpConnector, addr: SocketAddr) -> Result<H1, UpstreamError> {
    let io = TokioIo::new(conn.connect(addr, false).await?);
    let (send, connection) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(UpstreamError::connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok(H1 {
        send,
        generation: conn.generation,
        tick: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// A body of `left` chunks of "ok", 0.4 s apart.
    struct Chunks {
        left: u32,
        pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>>
        {
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            if let Some(pause) = self.pause.as_mut() {
                std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
            }
            self.left -= 1;
            self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(400))));
            let data = bytes::Bytes::from_static(b"ok");
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
        }
    }

    /// An HTTP/1.1 origin on 127.0.0.1 that answers 200; counts its open connections, and
    /// all it accepted.
    async fn origin() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (count, total) = (open.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                total.fetch_add(1, Ordering::SeqCst);
                count.fetch_add(1, Ordering::SeqCst);
                let count = count.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<_>| async move {
                        // /slow: ten chunks 0.4 s apart.
                        let left = if req.uri().path() == "/slow" { 10 } else { 1 };
                        let body = Chunks { left, pause: None };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, open, accepted)
    }

    async fn get(pool: &Pool, conn: &HttpConnector, addr: SocketAddr) {
        get_path(pool, conn, addr, "/").await;
    }

    async fn get_path(pool: &Pool, conn: &HttpConnector, addr: SocketAddr, path: &str) -> usize {
        let req = http::Request::builder()
            .uri(format!("http://{addr}{path}"))
            .body(ReqBody::empty())
            .unwrap();
        let resp = pool.send(conn, addr, req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes().len()
    }

    fn plain_http1() -> HttpConnector {
        HttpConnector {
            protocol: UpstreamProtocol::Http1,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            generation: 1,
        }
    }

    /// Waits (up to 20 s) until the origin has `n` connections open; when that happened.
    async fn until_open(open: &AtomicUsize, n: usize) -> Instant {
        let give_up = Instant::now() + Duration::from_secs(20);
        while open.load(Ordering::SeqCst) != n {
            assert!(
                Instant::now() < give_up,
                "origin still has {open:?} connections open, waiting for {n}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    }

    #[tokio::test]
    async fn idle_http1_connections_close_after_two_whole_ticks_and_a_used_one_stays_longer() {
        let (addr, open, _) = origin().await;
        let tick = Duration::from_secs(1);
        let pool = Pool::with_idle_tick(tick);
        let conn = plain_http1();
        let start = Instant::now();
        // Two at once: two connections, both back on the stack at tick 0.
        tokio::join!(get(&pool, &conn, addr), get(&pool, &conn, addr));
        assert_eq!(open.load(Ordering::SeqCst), 2);
        // One of them used again after the first tick: it goes back at tick 1.
        tokio::time::sleep(tick * 3 / 2).await;
        get(&pool, &conn, addr).await;
        assert_eq!(
            open.load(Ordering::SeqCst),
            2,
            "a pooled connection was used again"
        );
        // The other closes at tick 3 (timers never fire early: not before 3 ticks), the one
        // used again a tick later.
        let first = until_open(&open, 1).await;
        assert!(
            first - start >= tick * 3,
            "closed after {:?}",
            first - start
        );
        let second = until_open(&open, 0).await;
        assert!(second - first >= tick / 2, "both closed together");
        assert_eq!(pool.connections(), (0, 0));
        // The sweep ended with the stack empty; a connection made now is swept again.
        get(&pool, &conn, addr).await;
        assert_eq!(open.load(Ordering::SeqCst), 1);
        until_open(&open, 0).await;
    }

    /// A connection goes back on the stack when its response head arrives; while its body
    /// is still coming it is in use, however many ticks the body takes, and it is reused
    /// after.
    #[tokio::test]
    async fn a_connection_reading_a_long_body_counts_as_used() {
        let (addr, open, accepted) = origin().await;
        let tick = Duration::from_millis(300);
        let pool = Pool::with_idle_tick(tick);
        let conn = plain_http1();
        // 3.6 s of body: twelve ticks.
        assert_eq!(get_path(&pool, &conn, addr, "/slow").await, 20);
        get(&pool, &conn, addr).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection was reused"
        );
        assert_eq!(open.load(Ordering::SeqCst), 1);
        until_open(&open, 0).await;
    }
}
