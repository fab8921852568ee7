//! A message body coming into the proxy from either transport: a hyper connection (HTTP/1.1
//! and HTTP/2, client side or upstream side) or an HTTP/3 stream. The request path reads
//! both the same way, so HTTP/3 requests and responses take the one request path.

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The first error of type `T` in `e`'s chain of causes (`e` itself included).
pub fn find_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

pub enum InBody {
    /// No body: a request read by Spur's own HTTP/1.1 server.
    Empty,
    Http(Incoming),
    /// A request body on a stream of Spur's own HTTP/2 server.
    H2(crate::adapters::h2_body::H2Recv),
    /// A response read by Spur's own HTTP/1.1 client.
    H1(crate::upstream::h1::ResponseBody),
    /// Boxed: an h3 stream is large, and hyper bodies are the common case.
    H3(Box<H3Recv>),
    /// Any body, for the request path's own tests (requests and fake upstreams' answers).
    #[cfg(test)]
    Test(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl From<Incoming> for InBody {
    fn from(b: Incoming) -> InBody {
        InBody::Http(b)
    }
}

impl Body for InBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            InBody::Empty => Poll::Ready(None),
            InBody::Http(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            InBody::H2(b) => b.poll_frame(cx),
            InBody::H1(b) => Pin::new(b).poll_frame(cx),
            InBody::H3(b) => b.poll_frame(cx),
            #[cfg(test)]
            InBody::Test(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            InBody::Empty => true,
            InBody::Http(b) => b.is_end_stream(),
            InBody::H2(b) => b.is_end_stream(),
            InBody::H1(b) => b.is_end_stream(),
            InBody::H3(b) => b.state == H3State::Done,
            #[cfg(test)]
            InBody::Test(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            InBody::Empty => SizeHint::with_exact(0),
            InBody::Http(b) => b.size_hint(),
            InBody::H2(b) => b.size_hint(),
            InBody::H1(b) => b.size_hint(),
            InBody::H3(b) => match b.length {
                Some(n) if b.state == H3State::Data => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
            #[cfg(test)]
            InBody::Test(b) => b.size_hint(),
        }
    }
}

/// The receiving half of an HTTP/3 request stream (a request body on a listener) or of a
/// response stream (a response body from an upstream).
pub struct H3Recv {
    stream: H3Stream,
    state: H3State,
    /// `content-length`, when the peer declared one.
    length: Option<u64>,
}

enum H3Stream {
    Server(h3::server::RequestStream<h3_quinn::RecvStream, Bytes>),
    /// The connection's request sender rides along: h3 closes a connection when its last
    /// sender is dropped, and a pooled connection that was replaced must live until its
    /// responses are read.
    Client {
        stream: h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
        _keep: ClientKeep,
    },
    /// Handed to [`read_out`] when the body was dropped.
    Gone,
}

/// What a response body from an upstream keeps alive: the connection's request sender,
/// and the request body's cancel signal (dropped with the response body).
pub type ClientKeep = (
    h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    tokio::sync::oneshot::Sender<()>,
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum H3State {
    Data,
    Trailers,
    Done,
}

impl H3Recv {
    pub fn server(
        stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
        headers: &HeaderMap,
    ) -> H3Recv {
        H3Recv {
            stream: H3Stream::Server(stream),
            state: H3State::Data,
            length: content_length(headers),
        }
    }

    pub fn client(
        stream: h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
        headers: &HeaderMap,
        keep: ClientKeep,
    ) -> H3Recv {
        H3Recv {
            stream: H3Stream::Client {
                stream,
                _keep: keep,
            },
            state: H3State::Data,
            length: content_length(headers),
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match self.state {
                H3State::Data => {
                    let polled = match &mut self.stream {
                        H3Stream::Server(s) => ready!(s.poll_recv_data(cx))
                            .map(|o| o.map(|mut b| b.copy_to_bytes(b.remaining()))),
                        H3Stream::Client { stream: s, .. } => ready!(s.poll_recv_data(cx))
                            .map(|o| o.map(|mut b| b.copy_to_bytes(b.remaining()))),
                        H3Stream::Gone => return Poll::Ready(None),
                    };
                    match polled {
                        Ok(Some(data)) if data.is_empty() => continue,
                        Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(None) => self.state = H3State::Trailers,
                        Err(e) => {
                            self.state = H3State::Done;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
                H3State::Trailers => {
                    let polled = match &mut self.stream {
                        H3Stream::Server(s) => ready!(s.poll_recv_trailers(cx)),
                        H3Stream::Client { stream: s, .. } => ready!(s.poll_recv_trailers(cx)),
                        H3Stream::Gone => return Poll::Ready(None),
                    };
                    self.state = H3State::Done;
                    return Poll::Ready(match polled {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e.into())),
                    });
                }
                H3State::Done => return Poll::Ready(None),
            }
        }
    }
}

/// How much of a request body nobody reads any more the server still reads (and discards)
/// before it stops the stream, and for how long.
const READ_OUT_BYTES: usize = 64 * 1024;
const READ_OUT_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// A request body dropped before its end (the answer did not need the rest: a backend that
/// answered without reading it, a refusal). Dropping the stream would make quinn stop it
/// with code 0, which the client reads as an aborted request — even a GET whose end (FIN,
/// after h3's grease frame on a connection's first request) is still in flight. So the rest
/// is read out instead: a request that ends soon ends cleanly; one that goes on past
/// [`READ_OUT_BYTES`] is stopped with `H3_NO_ERROR`, as RFC 9114 §4.1 says a server that
/// does not need the rest should, so that the client keeps the complete response.
impl Drop for H3Recv {
    fn drop(&mut self) {
        if self.state == H3State::Done || !matches!(self.stream, H3Stream::Server(_)) {
            return;
        }
        let H3Stream::Server(stream) = std::mem::replace(&mut self.stream, H3Stream::Gone) else {
            return;
        };
        let data_done = self.state == H3State::Trailers;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(read_out(stream, data_done));
        }
    }
}

/// Reads a request to its end, or stops it with `H3_NO_ERROR` after [`READ_OUT_BYTES`].
/// After [`READ_OUT_TIME`] with a read in flight the stream is dropped (h3-quinn cannot
/// stop a stream while a read holds it).
async fn read_out(
    mut stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    data_done: bool,
) {
    let ended = tokio::time::timeout(READ_OUT_TIME, async {
        let mut left = READ_OUT_BYTES;
        if !data_done {
            loop {
                match stream.recv_data().await {
                    Ok(Some(chunk)) if chunk.remaining() >= left => return false,
                    Ok(Some(chunk)) => left -= chunk.remaining(),
                    Ok(None) => break,
                    // Reset by the client, or the connection is gone: nothing to stop.
                    Err(_) => return true,
                }
            }
        }
        let _ = stream.recv_trailers().await;
        true
    })
    .await;
    if ended == Ok(false) {
        stop_no_error(&mut stream).await;
    }
}

/// Stops the stream with `H3_NO_ERROR`. h3-quinn 0.0.10 panics (an `unwrap` on its stream)
/// when asked to stop while a read of its own is in flight — h3 may have started one for
/// the rest of a frame before handing back the part it had: then that read is let finish
/// (its bytes discarded) and the stop tried again, a few times at most.
async fn stop_no_error(stream: &mut h3::server::RequestStream<h3_quinn::RecvStream, Bytes>) {
    for _ in 0..8 {
        let stopped = quiet_catch_unwind(std::panic::AssertUnwindSafe(|| {
            stream.stop_sending(h3::error::Code::H3_NO_ERROR)
        }));
        if stopped.is_ok() {
            return;
        }
        match tokio::time::timeout(std::time::Duration::from_secs(1), stream.recv_data()).await {
            Ok(Ok(Some(_))) => continue,
            _ => return,
        }
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind` whose panic is not printed (the panic hook is told to keep quiet for this
/// thread while `f` runs).
fn quiet_catch_unwind<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> std::thread::Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(f);
    QUIET.with(|q| q.set(false));
    r
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The sending half of an HTTP/3 stream: a response on a listener, or a request body to an
/// upstream.
pub enum H3Send {
    Server(h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>),
    Client(h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>),
}

impl H3Send {
    /// Sends `body` (data, then trailers or the end of the stream); a body that fails, or
    /// `cancelled` resolving first, resets the stream with `cancel`, so the peer sees a
    /// broken message, not a short one.
    pub async fn send_body<B>(
        mut self,
        mut body: B,
        cancel: h3::error::Code,
        cancelled: impl std::future::Future<Output = ()>,
    ) where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        use http_body_util::BodyExt;
        tokio::pin!(cancelled);
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = &mut cancelled => {
                    self.reset(cancel);
                    return;
                }
            };
            let sent = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => tokio::select! {
                        r = self.data(d) => r,
                        _ = &mut cancelled => {
                            self.reset(cancel);
                            return;
                        }
                    },
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            let _ = self.trailers(t).await;
                            return;
                        }
                        Err(_) => Ok(()),
                    },
                },
                None => {
                    let _ = self.finish().await;
                    return;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "body failed: HTTP/3 stream reset");
                    self.reset(cancel);
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    }

    async fn data(&mut self, d: Bytes) -> Result<(), h3::error::StreamError> {
        match self {
            H3Send::Server(s) => s.send_data(d).await,
            H3Send::Client(s) => s.send_data(d).await,
        }
    }

    async fn trailers(&mut self, t: HeaderMap) -> Result<(), h3::error::StreamError> {
        match self {
            H3Send::Server(s) => s.send_trailers(t).await,
            H3Send::Client(s) => s.send_trailers(t).await,
        }
    }

    async fn finish(&mut self) -> Result<(), h3::error::StreamError> {
        match self {
            H3Send::Server(s) => s.finish().await,
            H3Send::Client(s) => s.finish().await,
        }
    }

    fn reset(&mut self, code: h3::error::Code) {
        match self {
            H3Send::Server(s) => s.stop_stream(code),
            H3Send::Client(s) => s.stop_stream(code),
        }
    }
}
