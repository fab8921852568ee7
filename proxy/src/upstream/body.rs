//! The request body on its way upstream: streamed from the client, or held whole so a
//! retry or a mirrored copy can send it again.
//!
//! Whatever happens to the client's body is recorded in its [`BodyStats`]: the bytes read
//! (for the access log) and whether the client's own stream broke off or went silent. A
//! try that fails because of either is the client's failure, never the endpoint's (see
//! `crate::attempt::Outcome::ClientAbort`).
//!
//! **`body_timeout`** bounds the time between two reads of the client's body, so that a
//! client sending a byte now and then cannot hold an upstream connection and a cluster
//! slot for as long as it likes. Only waiting for the client counts: while the upstream
//! is slow to take the body, the client is not polled and no time runs. The timer costs
//! nothing to a body that is never waited for (most are read in one go, and requests
//! without a body never poll it); a body that waits gets one timer, allocated once, whose
//! deadline is pushed back lazily: it may fire at a stale deadline (an earlier wait's),
//! and is then reset to the current one, so a streaming upload costs one clock read per
//! wait and a timer reset at most once per `body_timeout`, not a timer per read.

use crate::body::{BoxError, InBody};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// What the request body did: shared by the exchange record and the body sent upstream.
#[derive(Debug, Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    /// [`CLIENT_OK`], [`CLIENT_BROKE`] or [`CLIENT_SILENT`].
    client: AtomicU8,
}

const CLIENT_OK: u8 = 0;
const CLIENT_BROKE: u8 = 1;
const CLIENT_SILENT: u8 = 2;

impl BodyStats {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The client's body broke off (a cut upload, an invalid chunk, a reset stream) or
    /// went silent for longer than `body_timeout`.
    pub fn client_failed(&self) -> bool {
        self.client.load(Ordering::Relaxed) != CLIENT_OK
    }

    /// Why the client's body failed, as Spur answers it: 408 `body_timeout` for a silent
    /// client, else 400 `bad_request`.
    pub fn client_reason(&self) -> crate::reason::Reason {
        match self.client.load(Ordering::Relaxed) {
            CLIENT_SILENT => crate::reason::Reason::BodyTimeout,
            _ => crate::reason::Reason::BadRequest,
        }
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn failed(&self, how: u8) {
        self.client.store(how, Ordering::Relaxed);
    }
}

/// The client's request body as Spur reads it: counted in its [`BodyStats`] and bounded by
/// `body_timeout` between reads.
pub struct ClientBody {
    body: InBody,
    stats: Arc<BodyStats>,
    timer: BodyTimer,
}

impl ClientBody {
    pub fn new(body: InBody, stats: Arc<BodyStats>, body_timeout: Duration) -> ClientBody {
        ClientBody {
            body,
            stats,
            timer: BodyTimer {
                limit: body_timeout,
                sleep: None,
                waiting_since: None,
            },
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.timer.waiting_since = None;
                if let Some(d) = frame.data_ref() {
                    self.stats.add(d.len());
                }
            }
            Poll::Ready(Some(Err(_))) => self.stats.failed(CLIENT_BROKE),
            Poll::Ready(None) => self.timer.waiting_since = None,
            Poll::Pending => {
                if self.timer.expired(cx) {
                    self.stats.failed(CLIENT_SILENT);
                    return Poll::Ready(Some(Err("no byte of the request body within \
                         body_timeout"
                        .into())));
                }
            }
        }
        polled
    }
}

/// `body_timeout` for one body (see the module doc).
struct BodyTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the current wait for the client began (`None`: not waiting).
    waiting_since: Option<Instant>,
}

impl BodyTimer {
    /// Whether the client has been silent for `limit`; else the timer is armed to wake
    /// this task when it will have been.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let deadline = since + self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if sleep.deadline() >= deadline {
                return true;
            }
            // It fired for an earlier wait: this one ends later.
            sleep.as_mut().reset(deadline);
        }
    }
}

/// A request body on its way upstream.
pub enum ReqBody {
    /// Streamed from the client.
    Streaming(ClientBody),
    /// The part Spur read while trying to buffer, then the rest of the stream.
    Prefixed(Option<Bytes>, ClientBody),
    /// A whole body held in memory, with its trailers if it had any (boxed: rare, and a
    /// header map is large).
    Replay(Option<Bytes>, Option<Box<HeaderMap>>),
}

impl ReqBody {
    pub fn empty() -> ReqBody {
        ReqBody::Replay(None, None)
    }

    pub fn streaming(body: ClientBody) -> ReqBody {
        ReqBody::Streaming(body)
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
pub async fn buffer(mut body: ClientBody, max: u64) -> Buffered {
    if body.body.is_end_stream() {
        return Buffered::Whole(Bytes::new(), None);
    }
    if body.body.size_hint().lower() > max {
        return Buffered::Stream(ReqBody::streaming(body));
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        match std::future::poll_fn(|cx| body.poll(cx)).await {
            None => return Buffered::Whole(buf.freeze(), None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    buf.extend_from_slice(&d);
                    if buf.len() as u64 > max {
                        return Buffered::Stream(ReqBody::Prefixed(Some(buf.freeze()), body));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Buffered::Whole(buf.freeze(), Some(trailers));
                    }
                }
            },
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
            ReqBody::Prefixed(prefix @ Some(_), _) => {
                Poll::Ready(prefix.take().map(|d| Ok(Frame::data(d))))
            }
            ReqBody::Streaming(b) | ReqBody::Prefixed(None, b) => b.poll(cx),
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
            ReqBody::Streaming(b) => b.body.is_end_stream(),
            ReqBody::Prefixed(p, b) => p.is_none() && b.body.is_end_stream(),
            ReqBody::Replay(d, t) => d.is_none() && t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Streaming(b) => b.body.size_hint(),
            ReqBody::Prefixed(..) => SizeHint::default(),
            ReqBody::Replay(d, _) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
