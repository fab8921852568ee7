//! Spur's own HTTP/1.1 server, for the common request: HTTP/1.1, no body, no upgrade, a
//! target in origin form.
//!
//! hyper's HTTP/1.1 server runs a dispatcher state machine around the service, with its own
//! read and write buffers, its body channel and a wake-up per step: about 13k of the
//! 34k instructions Spur spent on a proxied GET. Here the connection's task reads a head,
//! calls the request path, writes the response and reads the next head.
//!
//! **What goes to hyper.** The first request this server does not take (a body, `Expect`,
//! `TE`, an upgrade or `CONNECT`, HTTP/1.0, a target not in origin form, more than
//! [`MAX_HEADERS`] headers, a head it cannot parse or that outgrows the listener's limit)
//! hands the connection to hyper, with every byte read so far: hyper reads that request
//! itself and answers it as it always has (a malformed head gets hyper's 400 or 431). The
//! connection comes back here when hyper parks it (idle, see `http_conn`).
//!
//! **Responses are written as hyper writes them**: the status line (with the upstream's
//! reason phrase when hyper's client kept one, and `HTTP/1.0` for an HTTP/1.0 origin's
//! response), the headers in the map's order, names in lower case, `connection`,
//! `transfer-encoding` and `trailer` values joined on one line; `content-length` from the
//! body's exact size (`0` when it is empty), else `chunked` (for HTTP/1.0, until the
//! connection closes); a body longer than its length cut to it; no body for `HEAD`, `204`
//! and `304`; a `date` when the response has none; `connection: close` when the client asked
//! for it or the listener is draining, and the connection closed after that response. No
//! trailers: hyper sends them only to a request with `te: trailers`, which goes to hyper.
//! As with hyper, a client that closes its side while its request is in flight or its
//! response is streaming cancels that request (no half-close); pipelined requests are
//! answered in order; a head arriving in pieces is parsed again only once a blank line may
//! have come; the write buffer is written out at 64 KiB, and flushed whenever the body
//! waits.

use super::http_conn::Io;
use super::idle::HeadClock;
use crate::body::{BoxError, InBody};
use crate::headers::{put, put_field, SPARE_HEADERS};
use crate::upstream::h1::has_token;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;

/// The most headers a request read here may have; more goes to hyper (which takes 100).
pub const MAX_HEADERS: usize = 64;
/// A data frame at least this large is written from its own buffer, not copied.
const COPY_MAX: usize = 4 * 1024;
/// The most bytes the write buffer holds before they are written.
const OUT_MAX: usize = 64 * 1024;

/// How the server left a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Closed, or to be closed: the client left, asked to close, or an error.
    Closed,
    /// A request for hyper: the read buffer starts with it.
    ToHyper,
}

/// The connection as this server sees it.
pub struct Conn<'a> {
    pub io: &'a mut Io,
    /// Bytes read and not yet used: kept by the caller when the connection goes to hyper
    /// or is parked.
    pub buf: &'a mut BytesMut,
    pub head: HeadClock,
    /// Set when the listener drains: the response in progress says `connection: close`,
    /// and a connection waiting for a request closes.
    pub closing: &'a AtomicBool,
    /// The most bytes a head may take before it goes to hyper (which refuses it).
    pub max_head: usize,
}

/// Serves requests until the connection ends or a request is for hyper. `handler` is the
/// request path.
pub async fn serve<H, F, B>(mut c: Conn<'_>, handler: &H) -> Ended
where
    H: Fn(Request<InBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    // The write buffer, and the last response's header map (cleared) for the next request,
    // as hyper keeps them; both go when the connection parks.
    let mut out = BytesMut::new();
    let mut spare = HeaderMap::new();
    loop {
        let (req, mut keep_alive) = match read_head(&mut c, &mut spare).await {
            Ok(head) => head,
            Err(ended) => return ended,
        };
        // Held until the response is written: the connection is busy (not parkable, not
        // idle for the drain) until then.
        let busy = c.head.head_done(Version::HTTP_11);
        let head_request = req.method() == Method::HEAD;
        // Pinned here, not moved into `answer`: the request path's future is two
        // kilobytes, and each move of it is a copy.
        let Some(resp) = answer(&mut c, pin!(handler(req))).await else {
            return Ended::Closed;
        };
        keep_alive &= !c.closing.load(Ordering::Acquire);
        let written = write_response(&mut c, &mut out, resp, head_request, keep_alive).await;
        drop(busy);
        match written {
            Ok((true, headers)) if !c.closing.load(Ordering::Acquire) => spare = headers,
            Ok(_) => {
                let _ = c.io.shutdown().await;
                return Ended::Closed;
            }
            Err(e) => {
                tracing::debug!(error = %e, "response not written: connection closed");
                return Ended::Closed;
            }
        }
    }
}

/// A request read, and whether its client keeps the connection open after it.
type ReadHead = (Request<InBody>, bool);

/// Reads the next request head. A drain closes a connection waiting for one, unless part
/// of it has come (that request is answered, with `connection: close`).
async fn read_head(c: &mut Conn<'_>, spare: &mut HeaderMap) -> Result<ReadHead, Ended> {
    // How much of the buffer was looked at: a head arriving in pieces is parsed once it
    // can be whole (a blank line has come), not at every piece.
    let mut scanned = 0;
    loop {
        if !c.buf.is_empty() && (scanned == 0 || may_be_whole(c.buf, scanned)) {
            match parse(c.buf, spare) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(ended) => return Err(ended),
            }
        }
        if c.buf.len() > c.max_head {
            return Err(Ended::ToHyper);
        }
        scanned = c.buf.len();
        let filled = poll_fn(|cx| {
            if c.buf.is_empty() && c.closing.load(Ordering::Acquire) {
                return Poll::Ready(Ok(0));
            }
            poll_fill(c.io, c.buf, cx)
        })
        .await;
        match filled {
            Ok(0) | Err(_) => return Err(Ended::Closed),
            Ok(_) => {}
        }
    }
}

/// Whether `buf` holds a blank line (`\n\n` or `\n\r\n`) that was not there when `scanned`
/// bytes of it had been looked at: the end of a head, or of something hyper refuses.
fn may_be_whole(buf: &[u8], scanned: usize) -> bool {
    let new = &buf[scanned.saturating_sub(2)..];
    new.windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && new.get(i + 2) == Some(&b'\n')))
}

/// Reads what the socket has into `buf`: the number of bytes (0 at its end). A buffer
/// without capacity (a new or parked connection) is only made once the socket is readable,
/// so that an idle plaintext connection holds none.
fn poll_fill(
    io: &mut Io,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() == 0 {
        if let Some(tcp) = io.get_ref().plain() {
            std::task::ready!(tcp.poll_read_ready(cx))?;
        }
    }
    crate::headers::make_room_to_read(buf);
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Parses a request head at the start of `buf`, taking it out of `buf` when it is one this
/// server answers (`None`: not whole yet; `Ended::ToHyper`: one for hyper). `spare` is a
/// cleared header map to fill.
fn parse(buf: &mut BytesMut, spare: &mut HeaderMap) -> Result<Option<ReadHead>, Ended> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Ended::ToHyper),
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Ended::ToHyper);
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Err(Ended::ToHyper);
    };
    if method == Method::CONNECT || !path.starts_with('/') {
        return Err(Ended::ToHyper);
    }
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let target = (offset(path.as_bytes()), path.len());
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = req.headers.len();
    let mut keep_alive = true;
    let mut seen_length = false;
    for (span, h) in spans.iter_mut().zip(req.headers.iter()) {
        let name = h.name.as_bytes();
        if !plain_header(name, h.value, &mut keep_alive, &mut seen_length) {
            return Err(Ended::ToHyper);
        }
        *span = (
            offset(name) as u32,
            name.len() as u32,
            offset(h.value) as u32,
            h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let Some((uri, headers)) = request_parts(&head, target, &spans[..count], spare) else {
        // Not one hyper's parser would take either: it answers (400, or 414 for a target
        // too long).
        let mut back = BytesMut::with_capacity(head.len() + buf.len());
        back.extend_from_slice(&head);
        back.extend_from_slice(buf);
        *buf = back;
        return Err(Ended::ToHyper);
    };
    let mut request = Request::new(InBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(Some((request, keep_alive)))
}

/// The target and the header map of a parsed head (`spans`: where each header's name and
/// value are in `head`), sharing `head`'s bytes.
fn request_parts(
    head: &Bytes,
    target: (usize, usize),
    spans: &[(u32, u32, u32, u32)],
    spare: &mut HeaderMap,
) -> Option<(Uri, HeaderMap)> {
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)).ok()?;
    let mut headers = std::mem::take(spare);
    headers.reserve(spans.len() + SPARE_HEADERS);
    for &(n, nl, v, vl) in spans {
        let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[n..n + nl]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl)).ok()?;
        headers.append(name, value);
    }
    Some((uri, headers))
}

/// Whether a request header leaves the request one this server answers; a `connection:
/// close` clears `keep_alive`. One `content-length: 0` is no body; a second one goes to
/// hyper (which keeps one).
fn plain_header(name: &[u8], value: &[u8], keep_alive: &mut bool, seen_length: &mut bool) -> bool {
    match name.len() {
        2 if name.eq_ignore_ascii_case(b"te") => false,
        6 if name.eq_ignore_ascii_case(b"expect") => false,
        7 if name.eq_ignore_ascii_case(b"upgrade") => false,
        10 if name.eq_ignore_ascii_case(b"connection") => {
            if has_token(value, b"close") {
                *keep_alive = false;
            }
            true
        }
        14 if name.eq_ignore_ascii_case(b"content-length") => {
            !std::mem::replace(seen_length, true) && value == b"0"
        }
        17 if name.eq_ignore_ascii_case(b"transfer-encoding") => false,
        _ => true,
    }
}

/// The request path's answer, unless the client closes its side first (`None`): the
/// request is then dropped, as hyper drops it. Bytes the client sends meanwhile (the next
/// requests) are kept in the read buffer.
async fn answer<F: Future>(c: &mut Conn<'_>, mut fut: Pin<&mut F>) -> Option<F::Output> {
    let mut watching = c.buf.is_empty();
    poll_fn(|cx| {
        if let Poll::Ready(resp) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        if watching {
            match poll_fill(c.io, c.buf, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => watching = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// How a response body goes on the wire.
enum Framing {
    /// None (`HEAD`, `204`, `304`, or an empty body).
    Bodiless,
    /// This many bytes left.
    Length(u64),
    Chunked,
    /// Until the connection closes: an HTTP/1.0 response of unknown length.
    Close,
}

/// Writes a response: true when the connection may carry another request; with the
/// response's header map, emptied. Trailers are not sent: hyper sends them only to a
/// request with `te: trailers`, and those go to hyper.
async fn write_response<B>(
    c: &mut Conn<'_>,
    out: &mut BytesMut,
    resp: Response<B>,
    head_request: bool,
    keep_alive: bool,
) -> std::io::Result<(bool, HeaderMap)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (mut parts, mut body) = resp.into_parts();
    let head = encode_head(&mut parts, &body, head_request, keep_alive, out)?;
    parts.headers.clear();
    let mut framing = head.framing;
    if let Framing::Bodiless = framing {
        // Never polled, as hyper leaves it.
        drop(body);
        write_out(c.io, out, None).await?;
        c.io.flush().await?;
        return Ok((head.keep_alive, parts.headers));
    }
    // Written to the socket since the last flush (TLS may hold it until a flush).
    let mut unflushed = false;
    loop {
        let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // The body waits: what is ready goes out first, and the client is watched
                // meanwhile (as hyper does, one that closes its side ends the response).
                if !out.is_empty() || unflushed {
                    write_out(c.io, out, None).await?;
                    c.io.flush().await?;
                    unflushed = false;
                }
                answer(c, pin!(body.frame()))
                    .await
                    .ok_or_else(|| std::io::Error::other("the client closed its side"))?
            }
        };
        let mut data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
            Some(Err(e)) => {
                let _ = write_out(c.io, out, None).await;
                return Err(std::io::Error::other(e.into()));
            }
        };
        match &mut framing {
            Framing::Length(left) => {
                // Past the length: dropped, as hyper drops it.
                data.truncate(data.len().min(*left as usize));
                *left -= data.len() as u64;
            }
            Framing::Chunked if !data.is_empty() => {
                put_number(out, data.len() as u64, 16);
                put(out, b"\r\n");
            }
            _ => {}
        }
        if data.is_empty() {
            continue;
        }
        if data.len() < COPY_MAX {
            put(out, &data);
        } else {
            write_out(c.io, out, Some(&mut data)).await?;
            unflushed = true;
        }
        if let Framing::Chunked = framing {
            put(out, b"\r\n");
        }
        if out.len() >= OUT_MAX {
            write_out(c.io, out, None).await?;
            unflushed = true;
        }
    }
    let keep_alive = match framing {
        Framing::Length(0) | Framing::Bodiless => head.keep_alive,
        Framing::Chunked => {
            put(out, b"0\r\n\r\n");
            head.keep_alive
        }
        Framing::Close => false,
        Framing::Length(_) => {
            let _ = write_out(c.io, out, None).await;
            return Err(std::io::Error::other("the body ended before its length"));
        }
    };
    write_out(c.io, out, None).await?;
    c.io.flush().await?;
    Ok((keep_alive, parts.headers))
}

/// `n` in base 10 or 16 (upper case, as hyper writes chunk sizes).
fn put_number(out: &mut BytesMut, mut n: u64, base: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789ABCDEF"[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    put(out, &digits[at..]);
}

/// Writes `out` (emptied) and then `data` (all of it), in one vectored write when it can.
async fn write_out(
    io: &mut Io,
    out: &mut BytesMut,
    mut data: Option<&mut Bytes>,
) -> std::io::Result<()> {
    loop {
        let rest = data.as_ref().map_or(0, |d| d.len());
        if out.is_empty() && rest == 0 {
            out.clear();
            return Ok(());
        }
        let n = match data.as_deref() {
            Some(d) if !d.is_empty() => {
                io.write_vectored(&[IoSlice::new(out), IoSlice::new(d)])
                    .await?
            }
            _ => io.write(out).await?,
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_out = n.min(out.len());
        out.advance(from_out);
        if let Some(d) = data.as_deref_mut() {
            d.advance(n - from_out);
        }
    }
}

/// What the encoded head decided.
struct Head {
    framing: Framing,
    keep_alive: bool,
}

/// What decides a response head's framing, as hyper's encoder sees it.
struct Shape {
    head_request: bool,
    /// No body may be sent (`HEAD`, `1xx`, `204`, `304`).
    bodiless: bool,
    /// A `content-length` may be written (not `1xx`, `204`, `304`).
    may_have_length: bool,
    /// hyper's `BodyLength`: 0 for an ended body, else its exact size, or unknown.
    length: Option<u64>,
    /// The body has ended already.
    empty: bool,
    /// An HTTP/1.0 response (from an HTTP/1.0 origin): it keeps its version, as with hyper.
    http10: bool,
}

/// What writing the response's own headers found.
struct Written {
    framing: Option<Framing>,
    keep_alive: bool,
    /// A `connection` header was written.
    closing_said: bool,
    /// A `date` header was written.
    dated: bool,
}

/// Encodes the response head into `out`, as hyper's HTTP/1.1 server does.
fn encode_head<B: Body>(
    parts: &mut http::response::Parts,
    body: &B,
    head_request: bool,
    keep_alive: bool,
    out: &mut BytesMut,
) -> std::io::Result<Head> {
    let status = parts.status;
    let may_have_length = !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    let empty = body.is_end_stream();
    let shape = Shape {
        head_request,
        bodiless: head_request || !may_have_length,
        may_have_length,
        length: match empty {
            true => Some(0),
            false => body.size_hint().exact(),
        },
        empty,
        http10: parts.version == Version::HTTP_10,
    };
    out.reserve(32 + parts.headers.len() * 32);
    put_status_line(parts, shape.http10, out);
    let mut written = Written {
        framing: None,
        keep_alive,
        closing_said: false,
        dated: false,
    };
    put_headers(&parts.headers, &shape, &mut written, out)?;
    if !written.keep_alive && !written.closing_said {
        put(out, b"connection: close\r\n");
    }
    let framing = match written.framing {
        Some(f) => f,
        None => put_framing(&shape, out),
    };
    if !written.dated {
        put(out, b"date: ");
        crate::headers::with_http_date(|v| put(out, v.as_bytes()));
        put(out, b"\r\n");
    }
    put(out, b"\r\n");
    let framing = match framing {
        _ if shape.bodiless => Framing::Bodiless,
        Framing::Length(0) => Framing::Bodiless,
        f => f,
    };
    Ok(Head {
        framing,
        keep_alive: written.keep_alive,
    })
}

/// The status line, with the upstream's reason phrase when hyper's client kept one.
fn put_status_line(parts: &http::response::Parts, http10: bool, out: &mut BytesMut) {
    let status = parts.status;
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() && !http10 {
        put(out, b"HTTP/1.1 200 OK\r\n");
        return;
    }
    put(out, if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    put(out, status.as_str().as_bytes());
    put(out, b" ");
    match reason {
        Some(r) => put(out, r.as_bytes()),
        None => put(
            out,
            status.canonical_reason().unwrap_or("<none>").as_bytes(),
        ),
    }
    put(out, b"\r\n");
}

/// The response's own headers, in one pass over the map (whose values of one name come
/// one after the other): the run of values of the name being written.
fn put_headers(
    h: &HeaderMap,
    shape: &Shape,
    written: &mut Written,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    let mut run: Option<(&HeaderName, Run)> = None;
    for (name, value) in h {
        let v = value.as_bytes();
        if let Some((prev, state)) = &mut run {
            if std::ptr::eq(*prev, name) {
                state.more(name, v, shape.length.is_none(), out)?;
                continue;
            }
        }
        if let Some((_, Run::Joined(join))) = run.take() {
            join.end(out, &mut written.keep_alive, &mut written.framing);
        }
        let state = match *name {
            // An empty body's `content-length: 0` is written by `put_framing`.
            header::CONTENT_LENGTH if shape.empty && !shape.head_request => Run::Skip,
            header::CONTENT_LENGTH => {
                let declared = match shape.length {
                    Some(n) => n,
                    None => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| std::io::Error::other("invalid content-length"))?,
                };
                header_line(out, name, v);
                written.framing = Some(Framing::Length(declared));
                Run::Length(v)
            }
            header::TRANSFER_ENCODING | header::TRAILER if shape.bodiless || shape.http10 => {
                Run::Skip
            }
            header::TRANSFER_ENCODING | header::CONNECTION | header::TRAILER => {
                written.closing_said |= *name == header::CONNECTION;
                put(out, name.as_str().as_bytes());
                put(out, b": ");
                put(out, v);
                let mut join = Join::new(name);
                join.saw(v);
                Run::Joined(join)
            }
            _ => {
                written.dated |= *name == header::DATE;
                header_line(out, name, v);
                Run::Lines
            }
        };
        run = Some((name, state));
    }
    if let Some((_, Run::Joined(join))) = run {
        join.end(out, &mut written.keep_alive, &mut written.framing);
    }
    Ok(())
}

/// The framing of a response whose headers named none: from the body's length, with the
/// header hyper adds for it.
fn put_framing(shape: &Shape, out: &mut BytesMut) -> Framing {
    match shape.length {
        None if shape.bodiless => Framing::Bodiless,
        None if shape.http10 => Framing::Close,
        None => {
            put(out, b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
        Some(0) => {
            if shape.may_have_length && !shape.head_request {
                put(out, b"content-length: 0\r\n");
            }
            Framing::Length(0)
        }
        Some(n) => {
            if shape.may_have_length {
                put(out, b"content-length: ");
                put_number(out, n, 10);
                put(out, b"\r\n");
            }
            Framing::Length(n)
        }
    }
}

/// What [`encode_head`] does with the values of the name it is at.
enum Run<'h> {
    /// A line each.
    Lines,
    /// Not written.
    Skip,
    /// `content-length`: the first value is written; the others must agree with it.
    Length(&'h [u8]),
    /// All on one line, comma-separated (`connection`, `transfer-encoding`, `trailer`).
    Joined(Join),
}

impl Run<'_> {
    /// Another value of the name this run is at (`unknown_length`: the body does not tell
    /// its length, so every `content-length` must agree).
    fn more(
        &mut self,
        name: &HeaderName,
        v: &[u8],
        unknown_length: bool,
        out: &mut BytesMut,
    ) -> std::io::Result<()> {
        match self {
            Run::Lines => header_line(out, name, v),
            Run::Skip => {}
            Run::Length(first) if unknown_length && v != *first => {
                return Err(std::io::Error::other("content-length values disagree"));
            }
            Run::Length(_) => {}
            Run::Joined(join) => {
                put(out, b", ");
                put(out, v);
                join.saw(v);
            }
        }
        Ok(())
    }
}

/// A line of joined values being written.
struct Join {
    kind: JoinKind,
    /// `connection`: a value had `close`; `transfer-encoding`: the last value ends with
    /// `chunked`.
    flag: bool,
}

#[derive(PartialEq)]
enum JoinKind {
    Connection,
    TransferEncoding,
    Trailer,
}

impl Join {
    fn new(name: &HeaderName) -> Join {
        let kind = match *name {
            header::CONNECTION => JoinKind::Connection,
            header::TRANSFER_ENCODING => JoinKind::TransferEncoding,
            _ => JoinKind::Trailer,
        };
        Join { kind, flag: false }
    }

    fn saw(&mut self, v: &[u8]) {
        match self.kind {
            JoinKind::Connection => self.flag |= has_token(v, b"close"),
            JoinKind::TransferEncoding => {
                let last = v.rsplit(|&b| b == b',').next().unwrap_or_default();
                self.flag = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
            JoinKind::Trailer => {}
        }
    }

    /// Ends the line, as hyper does: `chunked` last in `transfer-encoding` (the body is
    /// chunked), `close` in `connection` when the connection closes after this response.
    fn end(self, out: &mut BytesMut, keep_alive: &mut bool, framing: &mut Option<Framing>) {
        match self.kind {
            JoinKind::Connection => {
                *keep_alive &= !self.flag;
                if !*keep_alive && !self.flag {
                    put(out, b", close");
                }
            }
            JoinKind::TransferEncoding => {
                if !self.flag {
                    put(out, b", chunked");
                }
                *framing = Some(Framing::Chunked);
            }
            JoinKind::Trailer => {}
        }
        put(out, b"\r\n");
    }
}

fn header_line(out: &mut BytesMut, name: &HeaderName, value: &[u8]) {
    put_field(out, name.as_str().as_bytes(), value);
}

#[cfg(test)]
#[path = "h1_server_tests.rs"]
mod tests;
