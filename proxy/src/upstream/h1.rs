//! Spur's own HTTP/1.1 client, for the common exchange: a request with no body, to a
//! plaintext endpoint.
//!
//! hyper's `client::conn::http1` runs each connection as a task of its own: a request goes
//! to it through a channel, the response head comes back through another, and the body
//! through a third, with a wake-up of one task by the other at each step (five task polls
//! per request, about a third of the instructions Spur spent on a proxied GET). Here the
//! request's own task writes the head, reads the response and its body, and puts the
//! connection back in the pool when the body has ended: no task, no channel.
//!
//! What goes through hyper instead (see [`eligible`]): a request with a body (streamed,
//! `Expect`, `Transfer-Encoding`), an upgrade or `CONNECT`, a TLS endpoint, anything but
//! an origin-form HTTP/1.1 request. Both share the endpoint's pool and its idle sweep.
//!
//! The response is read as RFC 9112 says: informational heads skipped (a `101` is an
//! error: nothing asked to switch), no body for `HEAD`, `204` and `304`, `chunked` (with
//! trailers), `content-length` (several values must agree), else until the connection
//! closes. A connection is reused only after an HTTP/1.1 response without
//! `connection: close`, whose body was read to its end with nothing after it.
//!
//! A pooled connection is checked before it is used, without a system call: the runtime
//! knows whether its socket turned readable while it sat in the pool (the origin closed it,
//! or sent bytes nobody asked for). A connection whose request could not be written at all
//! gives the request back, like hyper's, so it goes on a fresh connection.

use crate::body::BoxError;
use crate::headers::{put, put_field, SPARE_HEADERS};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

/// The most headers a response head (or its trailers) may have, as hyper's client.
const MAX_HEADERS: usize = 100;
/// The most bytes a response head, a chunk-size line or a trailer section may take.
const MAX_HEAD: usize = 400 * 1024;

/// Where a connection goes back when its exchange is over (the endpoint's pool shard).
pub trait Home: Send + Sync + 'static {
    fn checkin(self: Arc<Self>, conn: Box<Conn>);
}

/// One upstream HTTP/1.1 connection, idle between exchanges. Boxed once when made, so a
/// response body that holds it stays small.
pub struct Conn {
    tcp: TcpStream,
    /// Its pool (weak: the pool holds its idle connections).
    home: Weak<dyn Home>,
    /// Bytes read and not yet used; empty between exchanges.
    buf: BytesMut,
    /// The request's header map, cleared, for the response's headers (no allocation: see
    /// [`Conn::start`]); empty between exchanges.
    spare: HeaderMap,
    pub generation: u64,
    /// The idle sweep's tick when it last went back to the pool.
    pub tick: u64,
}

/// Whether a request can go through this client rather than hyper's.
pub fn eligible<B: Body>(req: &Request<B>) -> bool {
    let h = req.headers();
    req.version() == Version::HTTP_11
        && req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && req.uri().scheme().is_none()
        && req.uri().authority().is_none()
        && h.iter().all(|(name, value)| {
            // One pass over the names (most requests have none of these) rather than four
            // lookups.
            *name != header::UPGRADE
                && *name != header::EXPECT
                && *name != header::TRANSFER_ENCODING
                && (*name != header::CONTENT_LENGTH || value == "0")
        })
}

/// Why an exchange failed, and what of the request was not written.
#[derive(Debug)]
pub struct Failed {
    pub error: BoxError,
    /// Nothing was written: the encoded head, and whether it is a `HEAD` request (`None`:
    /// some or all of the request was written).
    pub unsent: Option<(BytesMut, bool)>,
}

impl Failed {
    fn sent(error: impl Into<BoxError>) -> Failed {
        Failed {
            error: error.into(),
            unsent: None,
        }
    }
}

impl Conn {
    pub fn new(tcp: TcpStream, home: Weak<dyn Home>, generation: u64) -> Box<Conn> {
        Box::new(Conn {
            tcp,
            home,
            buf: BytesMut::new(),
            spare: HeaderMap::new(),
            generation,
            tick: 0,
        })
    }

    /// The origin closed the connection, or sent something, while it sat in the pool.
    pub fn is_stale(&self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if self.tcp.poll_read_ready(&mut cx).is_pending() {
            return false;
        }
        // Readable: an end of stream or bytes, unless the readiness is only left over from
        // the last read (then this read finds nothing and clears it).
        let mut probe = [0u8; 1];
        !matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// The exchange of `req`: its head is encoded now, so the returned future holds nothing
    /// of `req` (its body is empty: see [`eligible`]). The request's header map, cleared,
    /// takes the response's headers when it has room for them: with Spur's HTTP/1.1
    /// server, which keeps a response's map for the connection's next request, a request
    /// then allocates no map at all.
    pub fn start<B>(mut self: Box<Self>, req: Request<B>) -> Exchange {
        // The connection's own buffer: empty while it is idle (see `ResponseBody`).
        self.buf.clear();
        encode_head(&req, &mut self.buf);
        let head = std::mem::take(&mut self.buf);
        let head_request = req.method() == Method::HEAD;
        let headers = req.into_parts().0.headers;
        // A smaller map would be rebuilt for the response (a new one is made then).
        if headers.capacity() >= 2 * SPARE_HEADERS {
            self.spare = headers;
            self.spare.clear();
        }
        self.resume(head, head_request)
    }

    /// The exchange of a request head encoded already (`head`, for a `HEAD` request when
    /// `head_request`).
    pub fn resume(mut self: Box<Self>, head: BytesMut, head_request: bool) -> Exchange {
        self.buf = head;
        Exchange {
            conn: Some(self),
            head_request,
            written: Some(0),
        }
    }

    /// The response head at the front of the buffer, taken from it; `None` until whole.
    /// Informational heads are dropped on the way.
    #[allow(clippy::type_complexity)]
    fn parse_head(
        &mut self,
        head_request: bool,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, Failed> {
        loop {
            let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut res, &self.buf, &mut slots);
            let len = match parsed {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(Failed::sent(format!("invalid response head: {e}"))),
            };
            let code = res.code.unwrap_or(0);
            if (100..200).contains(&code) {
                if code == 101 {
                    return Err(Failed::sent("101 to a request that asked for no upgrade"));
                }
                self.buf.advance(len);
                continue;
            }
            let status = StatusCode::from_u16(code).map_err(Failed::sent)?;
            let version = match res.version {
                Some(1) => Version::HTTP_11,
                _ => Version::HTTP_10,
            };
            let base = self.buf.as_ptr() as usize;
            let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
            let count = res.headers.len();
            for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
                let name = (h.name.as_ptr() as usize - base) as u32;
                let value = (h.value.as_ptr() as usize - base) as u32;
                *span = (name, h.name.len() as u32, value, h.value.len() as u32);
            }
            let head = self.buf.split_to(len).freeze();
            // Room beyond the origin's headers: Spur's HTTP/1.1 server keeps a response's
            // map (cleared) for the next request on its connection, to which Spur adds its
            // own headers (request id, forwarding, tracing); without the room, that map
            // grows, rehashing and reallocating, on every request.
            let mut headers = std::mem::take(&mut self.spare);
            headers.reserve(count + SPARE_HEADERS);
            let mut close = false;
            // Which framing headers arrived, seen here so that `framing` looks up only
            // those (each lookup hashes the name).
            let mut present = Present::default();
            for &(n, nl, v, vl) in &spans[..count] {
                let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
                let (name, value) = (&head[n..n + nl], &head[v..v + vl]);
                // Hop-by-hop headers that only concern this connection never reach the map:
                // `keep-alive`, and a `connection` that lists only `keep-alive` or `close`
                // (nginx answers every HTTP/1.1 request with `connection: keep-alive`), so
                // the response has nothing to strip on its way to the client. A
                // `connection` naming other headers stays, for the strip to find them.
                if name.eq_ignore_ascii_case(b"connection") {
                    close |= has_token(value, b"close");
                    if only_tokens(value, &[b"keep-alive", b"close"]) {
                        continue;
                    }
                } else if name.eq_ignore_ascii_case(b"keep-alive") {
                    continue;
                }
                let name = HeaderName::from_bytes(name).map_err(Failed::sent)?;
                present.transfer_encoding |= name == header::TRANSFER_ENCODING;
                present.content_length |= name == header::CONTENT_LENGTH;
                let value =
                    HeaderValue::from_maybe_shared(head.slice(v..v + vl)).map_err(Failed::sent)?;
                headers.append(name, value);
            }
            let framing = framing(head_request, status, &headers, present)?;
            let keep_alive =
                !close && !matches!(framing, Framing::Close) && version == Version::HTTP_11;
            let mut parts = Response::new(()).into_parts().0;
            parts.status = status;
            parts.version = version;
            parts.headers = headers;
            return Ok(Some((parts, framing, keep_alive)));
        }
    }

    /// Reads what the socket has into the buffer: the number of bytes (0 at its end).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        crate::headers::make_room_to_read(&mut self.buf);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.buf)
    }
}

/// Writes a request head, then reads the response head; the body is read by the
/// response's [`ResponseBody`], which puts the connection back in its pool when it ends.
/// A named future (not an `async fn`) so that the pool's [`super::pool::Sending`] can hold
/// it inline: on every request's path.
pub struct Exchange {
    conn: Option<Box<Conn>>,
    head_request: bool,
    /// Bytes of the head written so far, while writing.
    written: Option<usize>,
}

impl std::future::Future for Exchange {
    type Output = Result<Response<ResponseBody>, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let conn = this
            .conn
            .as_mut()
            .expect("an exchange polled after it ended");
        while let Some(at) = this.written {
            if at == conn.buf.len() {
                conn.buf.clear();
                this.written = None;
                break;
            }
            let failed = match Pin::new(&mut conn.tcp).poll_write(cx, &conn.buf[at..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    BoxError::from("the connection closed while the request was written")
                }
                Poll::Ready(Ok(n)) => {
                    this.written = Some(at + n);
                    continue;
                }
                Poll::Ready(Err(e)) => e.into(),
            };
            let result = match at {
                // Nothing written: the head goes back, for another connection.
                0 => Failed {
                    error: failed,
                    unsent: Some((conn.buf.split(), this.head_request)),
                },
                _ => Failed::sent(failed),
            };
            this.conn = None;
            return Poll::Ready(Err(result));
        }
        loop {
            if !conn.buf.is_empty() {
                if let Some((parts, framing, keep_alive)) = conn.parse_head(this.head_request)? {
                    let mut body = ResponseBody {
                        conn: this.conn.take(),
                        framing,
                        keep_alive,
                    };
                    if matches!(body.framing, Framing::Length(0)) {
                        body.finish();
                    }
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                if conn.buf.len() > MAX_HEAD {
                    return Poll::Ready(Err(Failed::sent("the response head is too large")));
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(Failed::sent(
                        "the connection closed before a response head arrived",
                    )))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Failed::sent(e))),
            }
        }
    }
}

/// The request head in HTTP/1.1 form, as hyper writes it: origin form, names as they are
/// (lower case), one line per value.
pub fn encode_head<B>(req: &Request<B>, out: &mut BytesMut) {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let size = req.method().as_str().len()
        + target.len()
        + 12
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
        + 2;
    out.reserve(size);
    put(out, req.method().as_str().as_bytes());
    put(out, b" ");
    put(out, target.as_bytes());
    put(out, b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    put(out, b"\r\n");
}

/// Which of the framing headers a response has.
#[derive(Clone, Copy, Default)]
struct Present {
    transfer_encoding: bool,
    content_length: bool,
}

/// How the response body is delimited (RFC 9112 section 6.3). A body that ends with the
/// connection ([`Framing::Close`]) leaves no connection to reuse.
fn framing(
    head_request: bool,
    status: StatusCode,
    h: &HeaderMap,
    present: Present,
) -> Result<Framing, Failed> {
    if present.transfer_encoding && present.content_length {
        return Err(Failed::sent(
            "the response has both content-length and transfer-encoding",
        ));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if present.transfer_encoding {
        let last = h.get_all(header::TRANSFER_ENCODING).iter().next_back();
        let chunked = last.is_some_and(|v| {
            v.as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        });
        return Ok(match chunked {
            true => Framing::Chunked(Chunk::Size),
            false => Framing::Close,
        });
    }
    let mut length = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_length(part.trim_ascii())
                .ok_or_else(|| Failed::sent("invalid content-length in the response"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Failed::sent("content-length values disagree"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether every token of a comma-separated header value is one of `tokens`
/// (case-insensitive; empty elements allowed).
fn only_tokens(list: &[u8], tokens: &[&[u8]]) -> bool {
    list.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .all(|t| t.is_empty() || tokens.iter().any(|k| t.eq_ignore_ascii_case(k)))
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub(crate) fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

enum Framing {
    /// This many bytes of body left.
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes.
    Close,
    Done,
}

enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// A response body read from its connection by whoever polls it; the connection goes back
/// to its pool when the body ends (and is closed if the body is dropped before).
pub struct ResponseBody {
    conn: Option<Box<Conn>>,
    framing: Framing,
    keep_alive: bool,
}

impl ResponseBody {
    /// The body ended: its connection goes home if it can carry another exchange.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                if let Some(home) = conn.home.upgrade() {
                    home.checkin(conn);
                }
            }
        }
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Polled {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e.into())))
    }

    /// Reads more of the body into the buffer; an end of stream is an error.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err("the response body's connection is gone".into()));
        };
        match ready!(conn.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(
                "the connection closed before the response body ended".into()
            )),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }

    fn buf(&mut self) -> &mut BytesMut {
        &mut self
            .conn
            .as_mut()
            .expect("a body being read has its connection")
            .buf
    }

    /// Reads more of the body: `Continue` to look at the buffer again, or what
    /// `poll_frame` returns (pending, or the failure).
    fn more(&mut self, cx: &mut Context<'_>) -> Step {
        match self.poll_more(cx) {
            Poll::Pending => ControlFlow::Break(Poll::Pending),
            Poll::Ready(Ok(())) => ControlFlow::Continue(()),
            Poll::Ready(Err(e)) => ControlFlow::Break(self.fail(e)),
        }
    }

    /// Up to `left` bytes from the buffer (which is not empty), and how many are left after.
    fn take(&mut self, left: u64) -> (Bytes, u64) {
        let buf = self.buf();
        let n = (buf.len() as u64).min(left);
        (buf.split_to(n as usize).freeze(), left - n)
    }

    /// A body of `left` more bytes (`Content-Length`).
    fn length(&mut self, left: u64, cx: &mut Context<'_>) -> Step {
        if self.buf().is_empty() {
            return self.more(cx);
        }
        let (data, rest) = self.take(left);
        self.framing = Framing::Length(rest);
        if rest == 0 {
            self.finish();
        }
        ControlFlow::Break(Poll::Ready(Some(Ok(Frame::data(data)))))
    }

    /// A body that ends when the origin closes the connection.
    fn until_close(&mut self, cx: &mut Context<'_>) -> Step {
        if self.buf().is_empty() {
            let conn = self
                .conn
                .as_mut()
                .expect("a body being read has its connection");
            return match conn.poll_fill(cx) {
                Poll::Pending => ControlFlow::Break(Poll::Pending),
                Poll::Ready(Ok(0)) => {
                    self.framing = Framing::Done;
                    self.conn = None;
                    ControlFlow::Break(Poll::Ready(None))
                }
                Poll::Ready(Ok(_)) => ControlFlow::Continue(()),
                Poll::Ready(Err(e)) => ControlFlow::Break(self.fail(e)),
            };
        }
        let data = self.buf().split().freeze();
        ControlFlow::Break(Poll::Ready(Some(Ok(Frame::data(data)))))
    }

    /// Inside a chunk: `left` more bytes of data.
    fn chunk_data(&mut self, left: u64, cx: &mut Context<'_>) -> Step {
        if self.buf().is_empty() {
            return self.more(cx);
        }
        let (data, rest) = self.take(left);
        self.framing = Framing::Chunked(match rest {
            0 => Chunk::DataEnd,
            rest => Chunk::Data(rest),
        });
        ControlFlow::Break(Poll::Ready(Some(Ok(Frame::data(data)))))
    }

    /// The CRLF after a chunk's data.
    fn chunk_end(&mut self, cx: &mut Context<'_>) -> Step {
        let buf = self.buf();
        if buf.len() < 2 {
            return self.more(cx);
        }
        if &buf[..2] != b"\r\n" {
            return ControlFlow::Break(
                self.fail("invalid chunked encoding: no CRLF after a chunk"),
            );
        }
        buf.advance(2);
        self.framing = Framing::Chunked(Chunk::Size);
        ControlFlow::Continue(())
    }

    /// A chunk-size line (extensions ignored); size 0 is the last chunk.
    fn chunk_size_line(&mut self, cx: &mut Context<'_>) -> Step {
        let buf = self.buf();
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() > MAX_HEAD {
                return ControlFlow::Break(self.fail("a chunk-size line is too long"));
            }
            return self.more(cx);
        };
        let Some(size) = chunk_size(&buf[..end]) else {
            return ControlFlow::Break(self.fail("invalid chunked encoding: bad chunk size"));
        };
        buf.advance(end + 2);
        self.framing = Framing::Chunked(match size {
            0 => Chunk::Trailers,
            n => Chunk::Data(n),
        });
        ControlFlow::Continue(())
    }

    /// After the last chunk: trailer fields (a frame of their own), then an empty line.
    fn trailers(&mut self, cx: &mut Context<'_>) -> Step {
        let buf = self.buf();
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            self.finish();
            return ControlFlow::Break(Poll::Ready(None));
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (len, map) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((len, fields))) => {
                let mut map = HeaderMap::with_capacity(fields.len());
                for f in fields {
                    let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(f.name.as_bytes()),
                        HeaderValue::from_bytes(f.value),
                    ) else {
                        return ControlFlow::Break(self.fail("invalid trailer field"));
                    };
                    map.append(name, value);
                }
                (len, map)
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return ControlFlow::Break(self.fail("the trailers are too large"));
                }
                return self.more(cx);
            }
            Err(e) => return ControlFlow::Break(self.fail(format!("invalid trailers: {e}"))),
        };
        self.buf().advance(len);
        self.finish();
        ControlFlow::Break(Poll::Ready(Some(Ok(Frame::trailers(map)))))
    }
}

/// What [`ResponseBody::poll_frame`] returns.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// One step of reading a body: `Continue` to take the next (the framing moved on, or more
/// bytes came), or `Break` with what `poll_frame` returns.
type Step = ControlFlow<Polled>;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        loop {
            let step = match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => this.length(left, cx),
                Framing::Close => this.until_close(cx),
                Framing::Chunked(Chunk::Data(left)) => this.chunk_data(left, cx),
                Framing::Chunked(Chunk::DataEnd) => this.chunk_end(cx),
                Framing::Chunked(Chunk::Size) => this.chunk_size_line(cx),
                Framing::Chunked(Chunk::Trailers) => this.trailers(cx),
            };
            if let ControlFlow::Break(polled) = step {
                return polled;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A chunk-size line's size (hex digits, then optional extensions after `;`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        n = n * 16 + u64::from((d as char).to_digit(16)?);
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::super::pool::Pool;
    use super::super::{Failure, HttpConnector, ReqBody};
    use super::*;
    use http_body_util::BodyExt;
    use spur_config::UpstreamProtocol;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An origin on 127.0.0.1 that answers each request head it reads with the next of
    /// `answers` as raw bytes (closing the connection after an answer that ends in
    /// `"CLOSE"`, which is not sent); records the heads and counts connections.
    struct Origin {
        addr: SocketAddr,
        heads: Arc<Mutex<Vec<String>>>,
        accepted: Arc<AtomicUsize>,
    }

    async fn origin(answers: &[&'static str]) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let queue = Arc::new(Mutex::new(answers.to_vec()));
        let (h, a) = (heads.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (h, queue) = (h.clone(), queue.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let mut b = [0u8; 4096];
                        let n = match sock.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        got.extend_from_slice(&b[..n]);
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = got.drain(..end + 4).collect();
                            h.lock().unwrap().push(String::from_utf8(head).unwrap());
                            let answer = queue.lock().unwrap().remove(0);
                            let (bytes, close) = match answer.strip_suffix("CLOSE") {
                                Some(b) => (b, true),
                                None => (answer, false),
                            };
                            sock.write_all(bytes.as_bytes()).await.unwrap();
                            if close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Origin {
            addr,
            heads,
            accepted,
        }
    }

    fn connector() -> HttpConnector {
        HttpConnector {
            protocol: UpstreamProtocol::Http1,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            generation: 1,
        }
    }

    fn get(method: &str, path: &str) -> Request<ReqBody> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "origin.test")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(ReqBody::empty())
            .unwrap()
    }

    /// Status, headers and the whole body (data and trailers) of one exchange.
    async fn exchange(
        pool: &Pool,
        o: &Origin,
        req: Request<ReqBody>,
    ) -> Result<(StatusCode, HeaderMap, Bytes, Option<HeaderMap>), String> {
        let limit = Duration::from_secs(5);
        let conn = connector();
        let sent = tokio::time::timeout(limit, pool.send(&conn, o.addr, req));
        let resp = sent
            .await
            .map_err(|_| "no response head".to_string())?
            .map_err(|e| format!("{:?}: {e}", e.failure))?;
        let (parts, body) = resp.into_parts();
        let collected = tokio::time::timeout(limit, body.collect())
            .await
            .map_err(|_| "body: not whole in time".to_string())?
            .map_err(|e| format!("body: {e}"))?;
        let trailers = collected.trailers().cloned();
        Ok((parts.status, parts.headers, collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn content_length_then_the_connection_is_reused() {
        let o = origin(&[
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Echo: 1\r\n\r\nhello",
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let pool = Pool::default();
        let (status, headers, body, _) = exchange(&pool, &o, get("GET", "/a?b=c")).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
        assert_eq!(headers["x-echo"], "1");
        let (status, _, body, _) = exchange(&pool, &o, get("GET", "/next")).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::NOT_FOUND, 0));
        assert_eq!(
            o.accepted.load(Ordering::SeqCst),
            1,
            "one connection for both"
        );
        let heads = o.heads.lock().unwrap().clone();
        assert_eq!(
            heads[0],
            "GET /a?b=c HTTP/1.1\r\nhost: origin.test\r\nx-multi: a\r\nx-multi: b\r\n\r\n"
        );
        assert!(heads[1].starts_with("GET /next HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_response_has_only_the_origins_headers_on_the_requests_map() {
        // The second request goes on the pooled connection (`Conn::start`), whose response
        // takes the request's header map: cleared, it must hold the origin's headers alone.
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Echo: 1\r\n\r\nok";
        let o = origin(&[answer, answer]).await;
        let pool = Pool::default();
        for _ in 0..2 {
            let mut req = get("GET", "/");
            req.headers_mut().reserve(32);
            let (_, headers, body, _) = exchange(&pool, &o, req).await.unwrap();
            assert_eq!(&body[..], b"ok");
            let mut names: Vec<_> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
                .collect();
            names.sort();
            assert_eq!(names, [("content-length", "2"), ("x-echo", "1")]);
        }
        assert_eq!(
            o.accepted.load(Ordering::SeqCst),
            1,
            "the connection was reused"
        );
    }

    #[tokio::test]
    async fn chunked_with_extensions_and_trailers() {
        let o = origin(&[
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ])
        .await;
        let pool = Pool::default();
        let (_, _, body, trailers) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(&body[..], b"hello!");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        let (_, _, body, trailers) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!((&body[..], trailers), (&b"abc"[..], None));
        assert_eq!(
            o.accepted.load(Ordering::SeqCst),
            1,
            "reused after a chunked body"
        );
    }

    #[tokio::test]
    async fn connection_only_headers_stay_out_of_the_response() {
        let o = origin(&[
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok",
            // Names another header: stays for the strip on the way out (which removes both).
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-a\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = Pool::default();
        let (_, headers, _, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        let names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a", "content-length"]);
        let (_, headers, _, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(headers["connection"], "keep-alive, x-a");
        let (_, headers, _, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert!(!headers.contains_key("connection"));
        assert_eq!(
            o.accepted.load(Ordering::SeqCst),
            1,
            "kept alive until the close"
        );
        exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2, "closed after 'close'");
    }

    #[tokio::test]
    async fn a_body_until_close_and_connection_close_are_not_reused() {
        let o = origin(&[
            "HTTP/1.1 200 OK\r\n\r\nuntil the endCLOSE",
            // These two do not close (as a careless origin might): Spur must.
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = Pool::default();
        let (_, _, body, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(&body[..], b"until the end");
        for _ in 0..3 {
            let (_, _, body, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(o.accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn no_body_for_head_204_and_304_and_informational_heads_are_skipped() {
        let o = origin(&[
            "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
            "HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = Pool::default();
        let (status, headers, body, _) = exchange(&pool, &o, get("HEAD", "/")).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        assert_eq!(headers["content-length"], "1000");
        let (status, _, body, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (status, _, _, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        let (status, headers, body, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert!(
            !headers.contains_key("link"),
            "the 103's fields stay with it"
        );
        assert_eq!(o.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bad_responses_are_errors_after_the_request_was_sent() {
        let bad = [
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "CLOSE",
        ];
        for answer in bad {
            let o = origin(&[answer]).await;
            let pool = Pool::default();
            let e = pool.send(&connector(), o.addr, get("GET", "/")).await.err();
            let e = e.unwrap_or_else(|| panic!("{answer:?} was taken"));
            assert_eq!(e.failure, Failure::Sent, "{answer:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_or_badly_chunked_fails_and_is_not_reused() {
        for answer in [
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshortCLOSE",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nCLOSE",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokCLOSE",
        ] {
            let o = origin(&[answer, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
            let pool = Pool::default();
            let r =
                tokio::time::timeout(Duration::from_secs(5), exchange(&pool, &o, get("GET", "/")));
            let e = r.await.expect("no hang").unwrap_err();
            assert!(
                e.starts_with("body: ") && !e.contains("in time"),
                "{answer:?}: {e}"
            );
            exchange(&pool, &o, get("GET", "/")).await.unwrap();
            assert_eq!(o.accepted.load(Ordering::SeqCst), 2, "{answer:?}");
        }
    }

    /// A connection the origin closed while it sat in the pool is not used: the request
    /// goes on a new one and succeeds.
    #[tokio::test]
    async fn a_pooled_connection_the_origin_closed_is_left_out() {
        let o = origin(&[
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokCLOSE",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        // The origin closes after its answer, though the answer allows keep-alive.
        let pool = Pool::default();
        exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(pool.connections().0, 1, "pooled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, _, body, _) = exchange(&pool, &o, get("GET", "/")).await.unwrap();
        assert_eq!(&body[..], b"ok");
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
    }

    /// A pooled connection that takes none of the request's head (here: shut for writing
    /// after the stale check, as when the origin's reset arrives just then) hands the head
    /// to a new connection, and the request succeeds there.
    #[tokio::test]
    async fn a_head_a_pooled_connection_did_not_take_goes_on_a_new_one() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let o = origin(&[ok, ok]).await;
        let pool = Pool::default();
        exchange(&pool, &o, get("GET", "/one")).await.unwrap();
        let (shard, c) = pool
            .shards
            .iter()
            .find_map(|s| Some((s, s.raw.lock().unwrap().pop()?)))
            .expect("the first connection is pooled");
        socket2::SockRef::from(&c.tcp)
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let conn = connector();
        let sending = super::super::Sending::Raw {
            exchange: c.start(get("GET", "/two")),
            shard,
            conn: &conn,
            addr: o.addr,
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), sending)
            .await
            .expect("an answer in time")
            .expect("the request is sent again on a new connection");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(o.accepted.load(Ordering::SeqCst), 2);
        let heads = o.heads.lock().unwrap();
        assert_eq!(heads.len(), 2);
        assert!(
            heads[1].starts_with("GET /two HTTP/1.1\r\n"),
            "{:?}",
            heads[1]
        );
    }

    #[test]
    fn only_bodiless_origin_form_http11_requests_are_eligible() {
        assert!(eligible(&get("GET", "/")));
        assert!(eligible(&get("DELETE", "/x")));
        let with = |name: &str, value: &str| {
            let mut r = get("GET", "/");
            r.headers_mut().insert("x-one", "1".parse().unwrap());
            r.headers_mut().insert("accept", "*/*".parse().unwrap());
            r.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            eligible(&r)
        };
        assert!(with("content-length", "0"));
        assert!(!with("content-length", "3"));
        assert!(!with("transfer-encoding", "chunked"));
        assert!(!with("upgrade", "websocket"));
        assert!(!with("expect", "100-continue"));
        let mut r = get("GET", "/");
        *r.version_mut() = Version::HTTP_2;
        assert!(!eligible(&r));
        assert!(!eligible(&get("GET", "http://a.test/")));
        let body = Request::builder()
            .uri("/")
            .body(ReqBody::replay(&Bytes::from_static(b"x"), &None))
            .unwrap();
        assert!(!eligible(&body));
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"FF ; name=value"), Some(255));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"-1"), None);
        assert_eq!(chunk_size(b"1g"), None);
        assert_eq!(chunk_size(b"1000000000000000"), None, "over 15 hex digits");
    }
}
