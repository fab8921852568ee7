//! Upstream connections: pooled HTTP/1.1 and HTTP/2 clients, plain or over TLS, and the
//! request body type sent through them.
//!
//! TLS clusters connect through [`Connector`]: hyper-util's TCP connector, then the
//! cluster's TLS handshake ([`crate::tls::ClientTlsRt`]) with ALPN `h2` or `http/1.1` by the
//! cluster's protocol. Not hyper-rustls: its connector holds one fixed `ClientConfig`, while
//! Spur swaps configs when certificate files rotate, verifies a name other than the
//! dialled address (`server_name`, or SPIFFE identities), and counts handshake failures by
//! reason.

use crate::body::{BoxError, InBody};
use crate::tls::{ClientTlsRt, HandshakeError, Stream};
use bytes::Bytes;
use http::Uri;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use spur_config::UpstreamProtocol;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub type Client = hyper_util::client::legacy::Client<Connector, ReqBody>;

/// The settings that shape a client; clusters with equal settings share nothing but the
/// key shape (each cluster has its own pool, keyed by name). TLS settings are part of it, so
/// a change of `tls` makes a new pool rather than reusing connections made with the old one.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ClientKey {
    pub cluster: String,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub tls: Option<spur_config::ClientTls>,
    pub fallback: Option<UpstreamProtocol>,
}

/// TCP, then TLS for clusters that have it.
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    tls: Option<Arc<ClientTlsRt>>,
    /// Bounds the TLS handshake (the TCP connect has its own, equal, bound).
    handshake_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri);
        let tls = self.tls.clone();
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            };
            let ip = tcp.peer_addr()?.ip();
            match tokio::time::timeout(timeout, tls.connect(tcp, ip, false)).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(HandshakeError::Timeout.into()),
            }
        })
    }
}

/// The TLS handshake failure behind an upstream request error, if that is what it was.
pub fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a HandshakeError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HandshakeError>() {
            return Some(h);
        }
        cur = err.source();
    }
    None
}

/// A cluster's way to its endpoints: a pooled hyper client (HTTP/1.1, HTTP/2, over TCP or
/// TLS), or HTTP/3 over QUIC (with its TCP fallback).
// One per cluster, cloned rarely (health checks): the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Upstream {
    Hyper(Client),
    H3(Arc<crate::quic::client::H3Client>),
}

/// Why an upstream request failed, as the breaker and retries see it.
#[derive(Debug)]
pub struct UpstreamError {
    /// No connection could be made (refused, unreachable, handshake failed): the request
    /// never reached the endpoint.
    pub connect: bool,
    /// A TLS handshake to the endpoint failed, with this reason (TCP connections; QUIC
    /// handshakes are counted by the QUIC client).
    pub tls_reason: Option<&'static str>,
    pub error: BoxError,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl UpstreamError {
    pub fn from_hyper(e: hyper_util::client::legacy::Error) -> UpstreamError {
        UpstreamError {
            connect: e.is_connect(),
            tls_reason: tls_failure(&e).map(|h| h.reason(crate::tls::Role::Client)),
            error: e.into(),
        }
    }
}

impl Upstream {
    pub async fn request(&self, req: Request<ReqBody>) -> Result<Response<InBody>, UpstreamError> {
        match self {
            Upstream::Hyper(c) => match c.request(req).await {
                Ok(r) => Ok(r.map(InBody::Http)),
                Err(e) => Err(UpstreamError::from_hyper(e)),
            },
            Upstream::H3(c) => c.request(req).await,
        }
    }
}

/// The client for a cluster's settings: HTTP/3 over QUIC for `http3` clusters (with a TCP
/// client for `fallback`), else a pooled hyper client.
pub fn new_upstream(
    key: &ClientKey,
    tls: Option<Arc<ClientTlsRt>>,
    metrics: &crate::metrics::Metrics,
) -> Upstream {
    match (key.protocol, tls) {
        (UpstreamProtocol::Http3, Some(tls)) => {
            let fallback = key.fallback.map(|p| {
                let tcp = ClientKey {
                    protocol: p,
                    ..key.clone()
                };
                let version = if p == UpstreamProtocol::Http2 {
                    http::Version::HTTP_2
                } else {
                    http::Version::HTTP_11
                };
                (new_client(&tcp, Some(tls.clone())), version)
            });
            Upstream::H3(Arc::new(crate::quic::client::H3Client::new(
                &key.cluster,
                tls,
                key.connect_timeout,
                fallback,
                metrics,
            )))
        }
        (_, tls) => Upstream::Hyper(new_client(key, tls)),
    }
}

pub fn new_client(key: &ClientKey, tls: Option<Arc<ClientTlsRt>>) -> Client {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(key.connect_timeout));
    tcp.set_nodelay(true);
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    // The scheme says nothing here: the cluster's `tls` decides.
    tcp.enforce_http(false);
    let conn = Connector {
        tcp,
        tls,
        handshake_timeout: key.connect_timeout,
    };
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .set_host(true);
    if key.protocol == UpstreamProtocol::Http2 {
        builder
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(false)
            .http2_adaptive_window(true);
    }
    builder.build(conn)
}

/// A request body on its way upstream: streamed from the client, or bytes Spur holds
/// (which can be sent again on a retry).
pub enum ReqBody {
    /// Streamed from the client; the counter adds up the bytes for the access log.
    Streaming(InBody, Arc<AtomicU64>),
    /// The part Spur read while trying to buffer, then the rest of the stream.
    Prefixed(Option<Bytes>, InBody, Arc<AtomicU64>),
    /// A whole body held in memory, with its trailers if it had any.
    Replay(Option<Bytes>, Option<HeaderMap>),
}

impl ReqBody {
    pub fn counted(body: InBody, counter: Arc<AtomicU64>) -> ReqBody {
        ReqBody::Streaming(body, counter)
    }

    pub fn replay(data: &Bytes, trailers: &Option<HeaderMap>) -> ReqBody {
        ReqBody::Replay((!data.is_empty()).then(|| data.clone()), trailers.clone())
    }
}

/// A request body read for a possible retry.
pub enum Buffered {
    /// The whole body (at most `max` bytes) and its trailers: replayable.
    Whole(Bytes, Option<HeaderMap>),
    /// Too large (or failed to read): stream it, once.
    Stream(ReqBody),
    /// The client's body broke off while being read: the request must not go upstream.
    Broken,
}

/// Reads up to `max` bytes of `body` so the request can be retried; a longer body (by its
/// declared length, or once `max` is passed) is handed back as a stream.
pub async fn buffer(mut body: InBody, max: u64, counter: Arc<AtomicU64>) -> Buffered {
    if body.is_end_stream() {
        return Buffered::Whole(Bytes::new(), None);
    }
    if body.size_hint().lower() > max {
        return Buffered::Stream(ReqBody::Streaming(body, counter));
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Whole(buf.freeze(), None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&d);
                    if buf.len() as u64 > max {
                        return Buffered::Stream(ReqBody::Prefixed(
                            Some(buf.freeze()),
                            body,
                            counter,
                        ));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Buffered::Whole(buf.freeze(), Some(trailers));
                    }
                }
            },
            // The client's body broke: send what there is; the upstream sees a short body
            // and the exchange fails as it would have without buffering.
            Some(Err(_)) => return Buffered::Broken,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Prefixed(prefix @ Some(_), _, _) => {
                Poll::Ready(prefix.take().map(|d| Ok(Frame::data(d))))
            }
            ReqBody::Streaming(b, counter) | ReqBody::Prefixed(None, b, counter) => {
                let polled = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(d) = frame.data_ref() {
                        counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                polled
            }
            ReqBody::Replay(data, trailers) => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Streaming(b, _) => b.is_end_stream(),
            ReqBody::Prefixed(p, b, _) => p.is_none() && b.is_end_stream(),
            ReqBody::Replay(d, t) => d.is_none() && t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Streaming(b, _) => b.size_hint(),
            ReqBody::Prefixed(..) => SizeHint::default(),
            ReqBody::Replay(d, _) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
