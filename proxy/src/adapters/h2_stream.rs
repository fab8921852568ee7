//! The streams of Spur's HTTP/2 server: each one's request path future and response, and
//! what the connection keeps for it (its windows, its request body's feed).
//!
//! A stream is polled by its connection's task with the connection's output at hand
//! ([`Out`]): its response head and body are framed straight into the connection's write
//! buffer, as far as the client's flow-control windows allow.

use super::h2_body::Feed;
use super::h2_frame::{self as frame, PeerSettings};
use super::hpack;
use crate::adapters::idle::RequestGuard;
use crate::body::BoxError;
use bytes::{Buf, Bytes};
use h2::Reason;
use http::header::{self, HeaderValue};
use http::Response;
use http_body::Body;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The write buffer's size past which streams stop adding to it until it is written out.
pub const OUT_HIGH: usize = 64 * 1024;

/// What the connection keeps for one stream, at its slot's index.
pub struct Meta {
    pub id: u32,
    /// What Spur may still send on the stream.
    pub send_window: i64,
    /// What the client may still send on the stream.
    pub recv_window: i64,
    /// Bytes of the request body read and not yet given back to the stream's window.
    pub recv_unacked: usize,
    /// The request body's feed, while the client may still send on the stream.
    pub feed: Option<Feed>,
    /// `content-length` minus the body bytes received, when the client declared one.
    pub expect: Option<u64>,
    /// Set when the stream is to end without more being sent: the client reset it, or
    /// the server did. The stream's future is dropped at its next poll.
    pub reset: bool,
}

/// The connection's output and per-stream state, as streams see it while they are polled.
pub struct Out {
    pub buf: Vec<u8>,
    pub peer: PeerSettings,
    /// What Spur may still send on the connection.
    pub send_window: i64,
    /// Per stream slot (see [`super::stream_set::StreamSet`]); `None` when free.
    pub meta: Vec<Option<Meta>>,
    /// Open streams' (id, slot), in the order of their ids.
    pub ids: Vec<(u32, usize)>,
    /// Slots of streams waiting for window.
    pub blocked: Vec<usize>,
    /// Slots of streams waiting for room in `buf`.
    pub full: Vec<usize>,
    /// The last streams the server reset while the client could still send on them: what
    /// the client sent before it saw the reset is ignored, not an error (RFC 9113 §5.1).
    pub reset_ids: VecDeque<u32>,
    /// Responses that ended normally since the connection counted them (see the rapid
    /// reset guard in [`super::h2_server`]).
    pub completed: usize,
}

/// How many of the streams the server reset are remembered: twice as many as may be open.
const RESETS_KEPT: usize = 2 * super::h2_server::MAX_CONCURRENT_STREAMS as usize;

/// [`Out::reset`] on `Out`'s fields, for callers holding one of its streams' state.
pub fn reset_on(buf: &mut Vec<u8>, ids: &mut VecDeque<u32>, id: u32, reason: Reason) {
    frame::put_rst(buf, id, reason);
    if ids.len() == RESETS_KEPT {
        ids.pop_front();
    }
    ids.push_back(id);
}

impl Out {
    /// Resets stream `id` with `reason`.
    pub fn reset(&mut self, id: u32, reason: Reason) {
        reset_on(&mut self.buf, &mut self.reset_ids, id, reason);
    }

    /// Whether the server reset stream `id` lately (see [`Out::reset_ids`]).
    pub fn was_reset(&self, id: u32) -> bool {
        self.reset_ids.contains(&id)
    }

    pub fn slot_of(&self, id: u32) -> Option<usize> {
        let at = self.ids.binary_search_by_key(&id, |(i, _)| *i).ok()?;
        Some(self.ids[at].1)
    }

    pub fn open(&mut self, slot: usize, meta: Meta) {
        if self.meta.len() <= slot {
            self.meta.resize_with(slot + 1, || None);
        }
        // Ids only grow: a new stream goes last.
        self.ids.push((meta.id, slot));
        self.meta[slot] = Some(meta);
    }

    /// The stream in `slot` has ended: when the client may still send on it, it is told
    /// to stop (RFC 9113 §8.1: `NO_ERROR`, the response is complete).
    fn close(&mut self, slot: usize) {
        let Some(meta) = self.meta[slot].take() else {
            return;
        };
        if let Ok(at) = self.ids.binary_search_by_key(&meta.id, |(i, _)| *i) {
            self.ids.remove(at);
        }
        // A slot is queued at most once per wait; the next stream in it starts afresh.
        self.blocked.retain(|s| *s != slot);
        self.full.retain(|s| *s != slot);
        if let Some(feed) = meta.feed {
            if !meta.reset {
                self.reset(meta.id, Reason::NO_ERROR);
            }
            feed.reset(Reason::CANCEL);
        }
    }

    fn meta(&mut self, slot: usize) -> &mut Meta {
        self.meta[slot]
            .as_mut()
            .expect("a polled stream has its state")
    }
}

pin_project_lite::pin_project! {
    /// A stream's work: the request path's answer, then the response body.
    pub struct Stream<F, B> {
        #[pin]
        answer: F,
        // Set once the response head has gone: the answer is not polled again.
        sending: Option<SendBody<B>>,
        _busy: RequestGuard,
    }
}

impl<F, B> Stream<F, B>
where
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(answer: F, busy: RequestGuard) -> Self {
        Stream {
            answer,
            sending: None,
            _busy: busy,
        }
    }

    /// Ready when the stream is done (its state in `out` is gone then).
    pub fn drive(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut Out,
        slot: usize,
    ) -> Poll<()> {
        let this = self.project();
        let done = match this.sending {
            _ if out.meta(slot).reset => true,
            Some(send) => send.poll(cx, out, slot).is_ready(),
            None => match this.answer.poll(cx) {
                Poll::Pending => false,
                Poll::Ready(resp) => match send_head(out, slot, resp) {
                    Some(send) => this.sending.insert(send).poll(cx, out, slot).is_ready(),
                    None => true,
                },
            },
        };
        if !done {
            return Poll::Pending;
        }
        if !out.meta(slot).reset {
            out.completed += 1;
        }
        out.close(slot);
        Poll::Ready(())
    }
}

/// Sends the response head, with what hyper's server adds to it; what is left to send of
/// its body, if anything.
fn send_head<B: Body<Data = Bytes>>(
    out: &mut Out,
    slot: usize,
    resp: Response<B>,
) -> Option<SendBody<B>> {
    let (mut parts, body) = resp.into_parts();
    // HTTP/2 forbids connection-specific headers; upstream responses have lost theirs
    // already, so this is one pass over the names.
    let has = crate::headers::strip_response(&mut parts.headers);
    if !has.date {
        parts
            .headers
            .insert(header::DATE, crate::headers::http_date());
    }
    let end = body.is_end_stream();
    if !end && !has.content_length {
        if let Some(n) = body.size_hint().exact() {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    let id = out.meta(slot).id;
    let max_frame = out.peer.max_frame;
    frame::put_headers(&mut out.buf, id, end, max_frame, |dst| {
        hpack::encode_response(parts.status, &parts.headers, dst)
    });
    (!end).then_some(SendBody {
        body,
        waiting: None,
    })
}

/// A response body on its way: a chunk is read from the body only once the one before it
/// has gone into the connection's buffer, as far as the windows allowed.
struct SendBody<B> {
    body: B,
    /// A chunk not yet sent whole, and whether it is the body's last.
    waiting: Option<(Bytes, bool)>,
}

impl<B> SendBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Ready when the body has ended or failed.
    fn poll(&mut self, cx: &mut Context<'_>, out: &mut Out, slot: usize) -> Poll<()> {
        loop {
            if let Some((data, last)) = &mut self.waiting {
                if !send_chunk(out, slot, data, *last) {
                    return Poll::Pending;
                }
                let last = *last;
                self.waiting = None;
                if last {
                    return Poll::Ready(());
                }
                continue;
            }
            let id = out.meta(slot).id;
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    // Ended without an end-of-stream flag on a data frame or trailers.
                    frame::put_data(&mut out.buf, id, &[], true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "HTTP/2 response body failed");
                    out.reset(id, reason_of(&*e));
                    out.meta(slot).reset = true;
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => self.waiting = Some((data, self.body.is_end_stream())),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let max_frame = out.peer.max_frame;
                        frame::put_headers(&mut out.buf, id, true, max_frame, |dst| {
                            hpack::encode_trailers(&trailers, dst)
                        });
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

/// Frames as much of `data` as the windows, the client's frame size and the write
/// buffer's room allow: true when all of it went (with the end of the stream if `last`);
/// false when the stream must wait (it is marked blocked, to be polled again when the
/// connection has window or room).
fn send_chunk(out: &mut Out, slot: usize, data: &mut Bytes, last: bool) -> bool {
    if data.is_empty() && !last {
        return true;
    }
    loop {
        let meta = out.meta[slot]
            .as_ref()
            .expect("a polled stream has its state");
        let (id, stream_window) = (meta.id, meta.send_window);
        let window = out.send_window.min(stream_window).max(0) as usize;
        let room = OUT_HIGH.saturating_sub(out.buf.len());
        let n = data.len().min(window).min(out.peer.max_frame).min(room);
        if n == 0 && !data.is_empty() {
            match window {
                0 => out.blocked.push(slot),
                _ => out.full.push(slot),
            }
            return false;
        }
        let end = last && n == data.len();
        frame::put_data(&mut out.buf, id, &data[..n], end);
        out.send_window -= n as i64;
        out.meta(slot).send_window -= n as i64;
        data.advance(n);
        if data.is_empty() {
            return true;
        }
    }
}

/// The reset reason for a response body's error: the h2 reason behind it (an upstream
/// HTTP/2 stream's reset), else `INTERNAL_ERROR`.
fn reason_of(e: &(dyn std::error::Error + 'static)) -> Reason {
    crate::body::find_cause::<h2::Error>(e)
        .and_then(h2::Error::reason)
        .unwrap_or(Reason::INTERNAL_ERROR)
}
