//! Spur's own HTTP/2 server: the h2 crate (the framing, HPACK and flow control hyper's
//! HTTP/2 server uses) driven by the connection's own task.
//!
//! hyper's server spawns a task per stream and boxes the request path's future in it; a
//! worker serves a connection on one thread anyway ([`crate::workers`]), so here the
//! streams of a connection are futures polled by the connection's task: no task to spawn,
//! schedule and free per request, and no wake-up crossing between a stream's task and its
//! connection's; a stream's future goes into a slot a finished stream left (see
//! [`super::stream_set`]), not into a new allocation. What hyper's server does on the way is kept: the same settings (windows,
//! frame size, send buffer, header list limit), hop-by-hop headers stripped from responses,
//! a `date` when the response has none, `content-length` from a body of known length, the
//! request path's future dropped when the client resets the stream, a response body error
//! sent as a reset with the h2 reason behind it (or `INTERNAL_ERROR`).

use crate::adapters::http_conn::{Io, Rewind};
use crate::adapters::idle::{HeadClock, RequestGuard};
use crate::body::{BoxError, H2Recv, InBody};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body::Body;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// hyper's server defaults, which Spur's listeners have always had.
const WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Serves an HTTP/2 connection (its preface, if sniffed, is in `io`'s rewind bytes) until
/// it ends. `closing` set: a `GOAWAY`, and the streams in progress finish.
pub async fn serve<H, F, B>(
    io: Rewind<Io>,
    handler: &H,
    head: &HeadClock,
    closing: &AtomicBool,
    max_header_list: u32,
) -> Result<(), h2::Error>
where
    H: Fn(Request<InBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(max_header_list)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(io)
        .await?;
    let mut streams = super::stream_set::StreamSet::new();
    let mut told = false;
    poll_fn(|cx| loop {
        if !told && closing.load(Ordering::Acquire) {
            conn.graceful_shutdown();
            told = true;
        }
        // The streams first: what they send goes out when the connection is polled next.
        let _ = streams.poll(cx);
        match conn.poll_accept(cx) {
            Poll::Ready(Some(Ok((req, respond)))) => {
                streams.push_with(|| stream(handler, head, req, respond));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            // Closed: every stream has ended, or the connection failed under them.
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// One request, from the request path's answer to the response's end.
fn stream<H, F, B>(
    handler: &H,
    head: &HeadClock,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Stream<F, B>
where
    H: Fn(Request<InBody>) -> F,
{
    // Held until the response has ended: the connection is busy until then.
    let busy = head.head_done(Version::HTTP_2);
    let (parts, recv) = req.into_parts();
    let body = match recv.is_end_stream() {
        true => InBody::Empty,
        false => InBody::H2(H2Recv::new(recv, &parts.headers)),
    };
    Stream {
        answer: handler(Request::from_parts(parts, body)),
        respond,
        sending: None,
        _busy: busy,
    }
}

pin_project_lite::pin_project! {
    /// A stream's work: the request path's answer, then the response body.
    ///
    /// Written out rather than an `async fn`, which would keep the request beside the
    /// request path's future made from it, and the stream's handle twice: the future is the
    /// largest part of a stream's slot, copied into it whole for each request.
    struct Stream<F, B> {
        #[pin]
        answer: F,
        respond: SendResponse<Bytes>,
        // Set once the response head has gone: the answer is not polled again.
        sending: Option<SendBody<B>>,
        _busy: RequestGuard,
    }
}

impl<F, B> Future for Stream<F, B>
where
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(send) = this.sending {
            return send.poll(cx);
        }
        let resp = match this.answer.poll(cx) {
            Poll::Ready(resp) => resp,
            // A client's reset cancels the request (the request path's future is dropped
            // with the stream's).
            Poll::Pending => return this.respond.poll_reset(cx).map(drop),
        };
        match send_head(this.respond, resp) {
            Some(send) => this.sending.insert(send).poll(cx),
            None => Poll::Ready(()),
        }
    }
}

/// Sends the response head; what is left to send of its body, if anything.
fn send_head<B>(respond: &mut SendResponse<Bytes>, resp: Response<B>) -> Option<SendBody<B>>
where
    B: Body<Data = Bytes> + Unpin,
{
    let (mut parts, body) = resp.into_parts();
    // HTTP/2 forbids connection-specific headers (h2 refuses to send them); upstream
    // responses have lost theirs already, so this is one pass over the names.
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
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(tx) if !end => Some(SendBody {
            body,
            tx,
            waiting: None,
        }),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/2 response not sent");
            respond.send_reset(Reason::INTERNAL_ERROR);
            None
        }
    }
}

/// Sends a response body on its stream as the client's flow-control windows allow, as
/// hyper's server does: a chunk is read from the body only once the one before it has
/// been given to the stream, and only a byte of the connection's window is claimed ahead
/// (h2 claims the rest as the chunk goes out), so a stream waiting for its body does not
/// hold window the others need. The last chunk goes to the stream without the wait.
struct SendBody<B> {
    body: B,
    tx: SendStream<Bytes>,
    /// A chunk that is not the last, given to the stream once it has window for it.
    waiting: Option<Bytes>,
}

impl<B> SendBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Ready when the body has ended, failed, or the stream was reset.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let tx = &mut self.tx;
        loop {
            if let Poll::Ready(reason) = tx.poll_reset(cx) {
                tracing::debug!(?reason, "HTTP/2 stream reset while its response was sent");
                return Poll::Ready(());
            }
            if let Some(data) = self.waiting.take() {
                while tx.capacity() == 0 {
                    match tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            self.waiting = Some(data);
                            return Poll::Pending;
                        }
                    }
                }
                if tx.send_data(data, false).is_err() {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    // Ended without an end-of-stream flag on a data frame or trailers.
                    let _ = tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "HTTP/2 response body failed");
                    tx.send_reset(reason_of(&*e));
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => {
                    let end = self.body.is_end_stream();
                    if tx.send_data(data, end).is_err() || end {
                        return Poll::Ready(());
                    }
                }
                // The last chunk (often the only one) is given to the stream at once: h2
                // claims the window it needs as it goes out, which is what waiting for it
                // would do, and there is no next chunk to hold back.
                Ok(data) if self.body.is_end_stream() => {
                    let _ = tx.send_data(data, true);
                    return Poll::Ready(());
                }
                Ok(data) => {
                    tx.reserve_capacity(1);
                    self.waiting = Some(data);
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.reserve_capacity(0);
                        let _ = tx.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            }
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

#[cfg(test)]
#[path = "h2_server_tests.rs"]
mod tests;
