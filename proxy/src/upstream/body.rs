//! The request body on its way upstream: streamed from the client, or held whole so a
//! retry or a mirrored copy can send it again.
//!
//! Whatever happens to the client's body is recorded in its [`BodyStats`]: the bytes read
//! (for the access log) and whether the client's own stream broke off. A try that fails
//! because of the latter is the client's failure, never the endpoint's (see
//! `crate::attempt::Outcome::ClientAbort`).

use crate::body::{BoxError, InBody};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// What the request body did: shared by the exchange record and the body sent upstream.
#[derive(Debug, Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    client_failed: AtomicBool,
}

impl BodyStats {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The client's body broke off (a cut upload, an invalid chunk, a reset stream).
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn failed(&self) {
        self.client_failed.store(true, Ordering::Relaxed);
    }
}

/// A request body on its way upstream.
pub enum ReqBody {
    /// Streamed from the client.
    Streaming(InBody, Arc<BodyStats>),
    /// The part Spur read while trying to buffer, then the rest of the stream.
    Prefixed(Option<Bytes>, InBody, Arc<BodyStats>),
    /// A whole body held in memory, with its trailers if it had any (boxed: rare, and a
    /// header map is large).
    Replay(Option<Bytes>, Option<Box<HeaderMap>>),
}

impl ReqBody {
    pub fn empty() -> ReqBody {
        ReqBody::Replay(None, None)
    }

    pub fn streaming(body: InBody, stats: Arc<BodyStats>) -> ReqBody {
        ReqBody::Streaming(body, stats)
    }

    pub fn replay(data: &Bytes, trailers: &Option<HeaderMap>) -> ReqBody {
        ReqBody::Replay(
            (!data.is_empty()).then(|| data.clone()),
            trailers.as_ref().map(|t| Box::new(t.clone())),
        )
    }
}

/// A request body read for a possible retry or mirror.
pub enum Buffered {
    /// The whole body (at most `max` bytes) and its trailers: replayable.
    Whole(Bytes, Option<HeaderMap>),
    /// Too large: stream it, once.
    Stream(ReqBody),
    /// The client's body broke off while being read: the request must not go upstream.
    Broken,
}

/// Reads up to `max` bytes of `body` so the request can be sent again; a longer body (by its
/// declared length, or once `max` is passed) is handed back as a stream.
pub async fn buffer(mut body: InBody, max: u64, stats: Arc<BodyStats>) -> Buffered {
    if body.is_end_stream() {
        return Buffered::Whole(Bytes::new(), None);
    }
    if body.size_hint().lower() > max {
        return Buffered::Stream(ReqBody::Streaming(body, stats));
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Whole(buf.freeze(), None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    stats.add(d.len());
                    buf.extend_from_slice(&d);
                    if buf.len() as u64 > max {
                        return Buffered::Stream(ReqBody::Prefixed(
                            Some(buf.freeze()),
                            body,
                            stats,
                        ));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Buffered::Whole(buf.freeze(), Some(trailers));
                    }
                }
            },
            Some(Err(_)) => {
                stats.failed();
                return Buffered::Broken;
            }
        }
    }
}

fn poll_client(
    body: &mut InBody,
    stats: &BodyStats,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let polled = Pin::new(body).poll_frame(cx);
    match &polled {
        Poll::Ready(Some(Ok(frame))) => {
            if let Some(d) = frame.data_ref() {
                stats.add(d.len());
            }
        }
        Poll::Ready(Some(Err(_))) => stats.failed(),
        _ => {}
    }
    polled
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
            ReqBody::Streaming(b, stats) | ReqBody::Prefixed(None, b, stats) => {
                poll_client(b, stats, cx)
            }
            ReqBody::Replay(data, trailers) => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
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
