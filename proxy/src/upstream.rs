//! Upstream connections: pooled HTTP/1.1 and HTTP/2 (prior knowledge) clients, and the
//! request body type sent through them.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use spur_config::UpstreamProtocol;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub type Client = hyper_util::client::legacy::Client<HttpConnector, ReqBody>;

/// The settings that shape a client; clusters with equal settings share nothing but the
/// key shape (each cluster has its own pool, keyed by name).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ClientKey {
    pub cluster: String,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
}

pub fn new_client(key: &ClientKey) -> Client {
    let mut conn = HttpConnector::new();
    conn.set_connect_timeout(Some(key.connect_timeout));
    conn.set_nodelay(true);
    conn.set_keepalive(Some(Duration::from_secs(60)));
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

/// A request body on its way upstream: streamed from the client, or bytes Spur holds.
pub enum ReqBody {
    /// Streamed from the client; the counter adds up the bytes for the access log.
    Streaming(Incoming, Arc<AtomicU64>),
    Full(Option<Bytes>),
}

impl ReqBody {
    pub fn counted(body: Incoming, counter: Arc<AtomicU64>) -> ReqBody {
        ReqBody::Streaming(body, counter)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Streaming(b, counter) => {
                let polled = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(d) = frame.data_ref() {
                        counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                polled
            }
            ReqBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Streaming(b, _) => b.is_end_stream(),
            ReqBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Streaming(b, _) => b.size_hint(),
            ReqBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
