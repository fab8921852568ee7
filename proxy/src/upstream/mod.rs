//! Upstream connections: how a try reaches an endpoint.
//!
//! - HTTP/1.1 and HTTP/2 over TCP, plain or TLS: Spur's own per-endpoint pool
//!   ([`pool::Pool`], on hyper's `client::conn`), held by the endpoint's state, so the
//!   connections go when the endpoint goes and a config push keeps them. A request with
//!   no body to a plaintext HTTP/1.1 endpoint (most of them) goes through Spur's own
//!   HTTP/1.1 client instead ([`h1`]), read and written by the request's own task.
//! - HTTP/3 over QUIC ([`crate::quic::client`]), with its TCP fallback through the pool.
//!
//! Why not hyper-util's pooled `Client`: it hides what the try needs to know. Spur tells
//! apart a connection that could not be made, a request that was never written (the pooled
//! connection was already closed: safe to send again, whatever the method), and a request
//! that was written when the connection broke; the first two can be retried for a POST, the
//! last cannot. It also keys pools by endpoint state, which a config push does not drop,
//! and costs less per request. TLS is the cluster's own [`ClientTlsRt`]: it swaps configs
//! when certificate files rotate, verifies SPIFFE identities and counts failures by reason.

pub mod body;
pub mod h1;
pub mod pool;

pub use body::{buffer, BodyStats, Buffered, ClientBody, ReqBody};
pub use pool::Sending;

use crate::body::BoxError;
use crate::endpoint::EndpointState;
use crate::tls::{ClientTlsRt, HandshakeError, Role, Stream};
use http::Request;
use spur_config::UpstreamProtocol;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How a cluster's TCP connections are made and what they speak.
pub struct HttpConnector {
    /// HTTP/1.1 or HTTP/2 (an http3 cluster's fallback speaks one of these).
    pub protocol: UpstreamProtocol,
    pub tls: Option<Arc<ClientTlsRt>>,
    /// Bounds the TCP connect, and the TLS handshake after it.
    pub connect_timeout: Duration,
    /// Connections made with other settings (an earlier `tls` block) are not reused.
    pub generation: u64,
}

/// A cluster's way to its endpoints.
#[derive(Clone)]
pub enum Upstream {
    Http(Arc<HttpConnector>),
    H3(Arc<crate::quic::client::H3Client>),
    /// An in-memory upstream for the request path's own tests.
    #[cfg(test)]
    Fake(Arc<dyn fake::Fake>),
}

/// How far a failed try got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, timed out, TLS failed).
    Connect,
    /// A connection was made but nothing of the request was written to it.
    NotSent,
    /// The request was (at least partly) written when the connection broke, before a
    /// whole response head arrived.
    Sent,
}

impl Failure {
    /// What the try came to, for retries and the endpoint's record.
    pub fn outcome(self) -> crate::policy::retry::Outcome {
        use crate::policy::retry::Outcome;
        match self {
            Failure::Connect => Outcome::ConnectFailure,
            Failure::NotSent => Outcome::ResetBeforeRequest,
            Failure::Sent => Outcome::Reset,
        }
    }
}

/// Why an upstream request failed.
#[derive(Debug)]
pub struct UpstreamError {
    pub failure: Failure,
    /// A TLS handshake to the endpoint failed, with this reason.
    pub tls_reason: Option<&'static str>,
    pub error: BoxError,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl UpstreamError {
    pub fn connect(error: impl Into<BoxError>) -> UpstreamError {
        UpstreamError {
            failure: Failure::Connect,
            tls_reason: None,
            error: error.into(),
        }
    }

    pub fn not_sent(error: impl Into<BoxError>) -> UpstreamError {
        UpstreamError {
            failure: Failure::NotSent,
            tls_reason: None,
            error: error.into(),
        }
    }

    pub fn sent(error: impl Into<BoxError>) -> UpstreamError {
        UpstreamError {
            failure: Failure::Sent,
            tls_reason: None,
            error: error.into(),
        }
    }
}

impl Upstream {
    /// Sends `req` to `endpoint` (the URI's authority is the endpoint's address). The
    /// future is small when the request goes through Spur's own HTTP/1.1 client on a pooled
    /// connection (most requests); every other way is boxed inside it (the QUIC path's
    /// state, hyper's, a new connection's are kilobytes).
    pub fn send<'a>(&'a self, endpoint: &'a EndpointState, req: Request<ReqBody>) -> Sending<'a> {
        match self {
            Upstream::Http(c) => endpoint.pool.send(c, endpoint.addr, req),
            Upstream::H3(c) => Sending::Other(Box::pin(c.request(endpoint, req))),
            #[cfg(test)]
            Upstream::Fake(f) => Sending::Other(f.send(endpoint.addr, req)),
        }
    }

    /// Forgets per-address state of endpoints that left (QUIC connections, fallbacks).
    pub fn retain(&self, live: &dyn Fn(SocketAddr) -> bool) {
        if let Upstream::H3(c) = self {
            c.retain(live);
        }
    }
}

impl HttpConnector {
    /// A new connection to `addr`: TCP within `connect_timeout`, then the TLS handshake
    /// (offering `h2` or `http/1.1` by ALPN, or nothing for opaque bytes) within it again.
    pub async fn connect(&self, addr: SocketAddr, opaque: bool) -> Result<Stream, UpstreamError> {
        let tcp = connect_tcp(addr, self.connect_timeout).await?;
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let handshake =
            tokio::time::timeout(self.connect_timeout, tls.connect(tcp, addr.ip(), opaque));
        let result = match handshake.await {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::Timeout),
        };
        result.map_err(|e| UpstreamError {
            failure: Failure::Connect,
            tls_reason: Some(e.reason(Role::Client)),
            error: e.into(),
        })
    }
}

/// A TCP connection to `addr` within `timeout`, with no Nagle delay and keep-alive probes
/// after a minute of silence.
pub async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, UpstreamError> {
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::connect(e)),
        Err(_) => {
            return Err(UpstreamError::connect(format!(
                "no connection to {addr} within {timeout:?}"
            )))
        }
    };
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    Ok(tcp)
}

#[cfg(test)]
pub mod fake {
    //! An upstream in memory: each try calls a function of the test's, which answers (or
    //! fails, or waits on tokio's clock) as the test needs.
    use super::*;
    use crate::body::InBody;
    use http::Response;
    use std::future::Future;
    use std::pin::Pin;

    pub type Answer = Result<Response<InBody>, UpstreamError>;

    pub trait Fake: Send + Sync {
        fn send(
            &self,
            addr: SocketAddr,
            req: Request<ReqBody>,
        ) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>>;
    }

    impl<F, Fut> Fake for F
    where
        F: Fn(SocketAddr, Request<ReqBody>) -> Fut + Send + Sync,
        Fut: Future<Output = Answer> + Send + 'static,
    {
        fn send(
            &self,
            addr: SocketAddr,
            req: Request<ReqBody>,
        ) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
            Box::pin(self(addr, req))
        }
    }
}
