//! The connections to one endpoint, HTTP/1.1 or HTTP/2 over TCP (plain or TLS).
//!
//! HTTP/1.1: a stack of connections, each carrying one exchange at a time. A connection goes
//! back on the stack as soon as its response head arrives; it is handed out again only once
//! hyper says it is ready (its response body has been read to the end), so no task waits for
//! that moment. The most recently used ready connection is taken first (its TCP window and
//! the server's keep-alive timer are the freshest), closed ones are dropped on the way.
//!
//! HTTP/2: one multiplexed connection, shared by every request, made again when it closes.
//! Requests arriving while it is being made wait for that one handshake.
//!
//! A pooled connection that turns out closed takes the request back unwritten (hyper returns
//! it): the request then goes on one fresh connection, and the try is not charged for the
//! stale one. A fresh connection that does the same is [`Failure::NotSent`].

use super::{HttpConnector, ReqBody, UpstreamError};
use crate::body::InBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use spur_config::UpstreamProtocol;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Connections kept per endpoint beyond which a returning one is closed.
const MAX_H1: usize = 1024;

/// One shard per worker (see `crate::workers`): a request takes connections its own thread
/// drives, so no wake-up crosses to another core.
pub struct Pool {
    shards: Box<[Shard]>,
}

#[derive(Default)]
struct Shard {
    h1: Mutex<Vec<H1>>,
    h2: Mutex<Option<H2>>,
    /// Serializes making a new HTTP/2 connection.
    h2_connecting: tokio::sync::Mutex<()>,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            shards: (0..crate::workers::count())
                .map(|_| Shard::default())
                .collect(),
        }
    }
}

struct H1 {
    send: http1::SendRequest<ReqBody>,
    generation: u64,
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
    /// Sends `req` to `addr` on a pooled or new connection made by `conn`.
    pub async fn send(
        &self,
        conn: &HttpConnector,
        addr: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Answer {
        let shard = &self.shards[crate::workers::index() % self.shards.len()];
        match conn.protocol {
            UpstreamProtocol::Http2 => shard.send_h2(conn, addr, req).await,
            _ => shard.send_h1(conn, addr, req).await,
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
            (h1 + s.h1.lock().unwrap().len(), h2 + usize::from(open))
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

    fn checkin_h1(&self, c: H1) {
        let mut stack = self.h1.lock().unwrap();
        if stack.len() < MAX_H1 {
            stack.push(c);
        }
    }

    async fn send_h1(
        &self,
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
        &self,
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
    })
}
