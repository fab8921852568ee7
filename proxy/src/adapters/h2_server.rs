//! Spur's own HTTP/2 server (RFC 9113): framing, HPACK ([`super::hpack`]) and flow control,
//! driven by the connection's own task.
//!
//! The streams of a connection are futures polled by that task ([`super::stream_set`]),
//! each framing its response straight into the connection's write buffer
//! ([`super::h2_stream`]); request bodies are fed to their readers through
//! [`super::h2_body`]. Before this, the h2 crate did the framing: its frame and stream
//! records moved through several queues per request, and its HPACK encoder Huffman-coded
//! every string; that was about a third of the instructions of an HTTP/2 request through
//! Spur. What hyper's server did on the way is kept: the same settings (windows, frame
//! size, header list limit), hop-by-hop headers stripped from responses, a `date` when the
//! response has none, `content-length` from a body of known length, the request path's
//! future dropped when the client resets the stream, a response body error sent as a reset
//! with the h2 reason behind it (or `INTERNAL_ERROR`).
//!
//! Limits on what a client can make the server do: at most [`MAX_CONCURRENT_STREAMS`]
//! streams at once (more are refused), header blocks bounded while they are gathered, the
//! connection closed with `ENHANCE_YOUR_CALM` when its client resets (or has reset for it)
//! too many streams before their responses (the "rapid reset" attack), and nothing read
//! while the write buffer is full (a client that sends pings or settings and does not read
//! the answers stops being read).

use super::h2_body::{self, Credits};
use super::h2_frame::{self as frame, Head, PeerSettings};
use super::h2_stream::{Meta, Out, Stream, OUT_HIGH};
use super::hpack::{self, Field, Pseudo};
use super::lend;
use super::stream_set::StreamSet;
use crate::adapters::http_conn::{Io, Rewind};
use crate::adapters::idle::HeadClock;
use crate::body::{BoxError, InBody};
use bytes::{Bytes, BytesMut};
use h2::Reason;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// hyper's server defaults, which Spur's listeners have always had.
const WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: usize = 16 * 1024;
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams reset before their response (by the client, or by the server for the client's
/// errors), net of the responses completed, after which the connection is closed.
const MAX_RESETS: usize = 2 * MAX_CONCURRENT_STREAMS as usize;
/// The HPACK table size Spur's decoder allows (the default; not advertised).
const HEADER_TABLE_SIZE: usize = 4096;
/// Room a borrowed write buffer is given.
const WRITE_BUF: usize = 4096;

/// How a connection ended badly.
#[derive(Debug)]
pub enum H2Error {
    Io(std::io::Error),
    /// The client broke the protocol; the server sent `GOAWAY` with this reason.
    Protocol(Reason, &'static str),
    /// The client went away with an error.
    Peer(Reason),
}

impl std::fmt::Display for H2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H2Error::Io(e) => write!(f, "I/O error: {e}"),
            H2Error::Protocol(r, what) => write!(f, "client error ({r:?}): {what}"),
            H2Error::Peer(r) => write!(f, "client went away with {r:?}"),
        }
    }
}

impl std::error::Error for H2Error {}

/// A connection error: the reason for the `GOAWAY`, and what happened.
type ConnResult = Result<(), (Reason, &'static str)>;

/// Serves an HTTP/2 connection (its preface, if sniffed, is in `io`'s rewind bytes) until
/// it ends. `closing` set: a `GOAWAY`, and the streams in progress finish.
pub async fn serve<H, F, B>(
    io: Rewind<Io>,
    handler: &H,
    head: &HeadClock,
    closing: &AtomicBool,
    max_header_list: u32,
) -> Result<(), H2Error>
where
    H: Fn(Request<InBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut conn = Conn::new(io, max_header_list);
    let mut streams = StreamSet::new();
    let mut told = false;
    poll_fn(|cx| {
        if !told && closing.load(Ordering::Acquire) {
            conn.go_away(Reason::NO_ERROR);
            told = true;
        }
        conn.turn(cx, &mut streams, &mut |req: Request<InBody>| {
            Stream::new(handler(req), head.head_done(Version::HTTP_2))
        })
    })
    .await
}

/// The worker's write buffer (see [`lend`]), with room for a turn's usual output.
fn borrow_write_buf() -> Vec<u8> {
    let mut buf = lend::write_buf();
    buf.reserve(WRITE_BUF);
    buf
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
struct Gathering {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

struct Conn {
    io: Rewind<Io>,
    rbuf: BytesMut,
    out: Out,
    decoder: hpack::Decoder,
    credits: Arc<Credits>,
    /// Taken from `credits` (kept for its room).
    read: Vec<(u32, usize)>,
    /// What the client may still send on the connection, and what was read of it and not
    /// yet given back.
    recv_window: i64,
    recv_unacked: usize,
    /// The highest stream id the client opened.
    last_id: u32,
    gathering: Option<Gathering>,
    preface: bool,
    settings_seen: bool,
    /// `GOAWAY` sent: no new streams; the connection ends when the streams have.
    going_away: bool,
    /// The last stream id of the first `GOAWAY`: a later one never names more (§6.8).
    goaway_last: Option<u32>,
    /// The error the connection ends with, once its `GOAWAY` is written.
    failed: Option<H2Error>,
    /// The client will not send more (end of its stream, or its `GOAWAY`).
    read_closed: bool,
    /// Streams reset before their response, net of responses completed.
    resets: usize,
    max_header_list: usize,
}

impl Conn {
    fn new(io: Rewind<Io>, max_header_list: u32) -> Conn {
        let mut out = Out {
            buf: borrow_write_buf(),
            peer: PeerSettings::default(),
            send_window: frame::DEFAULT_WINDOW,
            meta: Vec::new(),
            ids: Vec::new(),
            blocked: Vec::new(),
            full: Vec::new(),
            reset_ids: Default::default(),
            completed: 0,
        };
        frame::put_settings(
            &mut out.buf,
            &[
                (
                    frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                    MAX_CONCURRENT_STREAMS,
                ),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, WINDOW),
                (frame::SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list),
            ],
        );
        let more = WINDOW - frame::DEFAULT_WINDOW as u32;
        frame::put_window_update(&mut out.buf, 0, more);
        Conn {
            io,
            rbuf: BytesMut::new(),
            out,
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            credits: Arc::new(Credits::default()),
            read: Vec::new(),
            recv_window: i64::from(WINDOW),
            recv_unacked: 0,
            last_id: 0,
            gathering: None,
            preface: false,
            settings_seen: false,
            going_away: false,
            goaway_last: None,
            failed: None,
            read_closed: false,
            resets: 0,
            // Room over the listener's limit, so that the request path's own check (which
            // answers 431 with `x-spur-error`) sees oversize heads first, as on HTTP/1.1.
            max_header_list: (max_header_list as usize * 2 + 16 * 1024).max(64 * 1024),
        }
    }

    /// `GOAWAY` with the last stream the server took: the streams in progress finish.
    fn go_away(&mut self, reason: Reason) {
        if !self.going_away {
            let last = *self.goaway_last.get_or_insert(self.last_id);
            frame::put_goaway(&mut self.out.buf, last, reason);
            self.going_away = true;
        }
    }

    fn fail(&mut self, (reason, what): (Reason, &'static str)) {
        tracing::debug!(?reason, what, "HTTP/2 connection error");
        self.going_away = false;
        self.go_away(reason);
        self.read_closed = true;
        self.failed = Some(H2Error::Protocol(reason, what));
    }

    /// One turn of the connection: streams, reads, writes, until nothing is left to do now.
    fn poll<S, MK>(
        &mut self,
        cx: &mut Context<'_>,
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> Poll<Result<(), H2Error>>
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        self.credits.task.register(cx.waker());
        loop {
            self.give_back();
            let out = &mut self.out;
            let _ = streams.poll_with(cx, |slot, s, cx| s.drive(cx, out, slot));
            if let Some(r) = self.check_resets() {
                self.fail(r);
            }
            let mut progress = false;
            if self.failed.is_none() && !self.read_closed && self.out.buf.len() < OUT_HIGH {
                match self.read(cx, streams, make) {
                    Poll::Ready(Ok(())) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            match self.flush(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(H2Error::Io(e))),
                Poll::Ready(Ok(())) if !self.out.full.is_empty() => {
                    for slot in self.out.full.drain(..) {
                        streams.wake(slot);
                    }
                }
                _ => {}
            }
            if self.out.buf.is_empty() {
                if let Some(e) = self.failed.take() {
                    return Poll::Ready(Err(e));
                }
                let ended = self.read_closed || self.going_away;
                if ended && streams.len() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            if !progress && !streams.has_fresh() {
                return Poll::Pending;
            }
        }
    }

    /// One turn ([`Conn::poll`]) with the worker's buffers (see [`lend`]): borrowed for the
    /// turn, given back at its end unless bytes are left in them.
    fn turn<S, MK>(
        &mut self,
        cx: &mut Context<'_>,
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> Poll<Result<(), H2Error>>
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        if self.out.buf.capacity() == 0 {
            self.out.buf = borrow_write_buf();
        }
        let polled = self.poll(cx, streams, make);
        lend::give_read(&mut self.rbuf);
        lend::give_write(&mut self.out.buf);
        polled
    }

    /// Too many streams reset before their response: the connection's error.
    fn check_resets(&mut self) -> Option<(Reason, &'static str)> {
        self.resets = self
            .resets
            .saturating_sub(std::mem::take(&mut self.out.completed));
        (self.resets > MAX_RESETS && self.failed.is_none())
            .then_some((Reason::ENHANCE_YOUR_CALM, "too many streams reset"))
    }

    /// Gives the client back the window of the request body bytes read since the last turn,
    /// in updates of at least half a window (or what a stream still expects).
    fn give_back(&mut self) {
        self.credits.take(&mut self.read);
        for (id, n) in self.read.drain(..) {
            self.recv_unacked += n;
            let Some(slot) = self.out.slot_of(id) else {
                continue;
            };
            let Some(meta) = self.out.meta[slot].as_mut() else {
                continue;
            };
            if meta.feed.is_none() {
                continue;
            }
            meta.recv_unacked += n;
            if meta.recv_unacked >= WINDOW as usize / 2 {
                frame::put_window_update(&mut self.out.buf, id, meta.recv_unacked as u32);
                meta.recv_window += meta.recv_unacked as i64;
                meta.recv_unacked = 0;
            }
        }
        if self.recv_unacked >= WINDOW as usize / 2 {
            frame::put_window_update(&mut self.out.buf, 0, self.recv_unacked as u32);
            self.recv_window += self.recv_unacked as i64;
            self.recv_unacked = 0;
        }
    }

    /// Writes the buffer out; ready when it is empty.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut written = 0;
        while written < self.out.buf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out.buf[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        self.out.buf.drain(..written);
        if !self.out.buf.is_empty() {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Reads what the client sent and handles its complete frames. Ready when something was
    /// read (or the client's side ended).
    fn read<S, MK>(
        &mut self,
        cx: &mut Context<'_>,
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> Poll<Result<(), H2Error>>
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        if self.rbuf.capacity() == 0 {
            // No buffer between turns (see [`lend`]): the worker's, on plain TCP once the
            // socket has something to read (TLS may hold bytes it decrypted already).
            if let Some(tcp) = self.io.drained_tcp() {
                if let Err(e) = std::task::ready!(tcp.poll_read_ready(cx)) {
                    return Poll::Ready(Err(H2Error::Io(e)));
                }
            }
            self.rbuf = lend::read_buf();
        }
        self.rbuf.reserve(MAX_FRAME_SIZE + frame::HEAD_LEN);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(H2Error::Io(e))),
            Poll::Ready(Ok(0)) => {
                self.read_closed = true;
                // The client is gone: its streams with it.
                for (_, slot) in &self.out.ids {
                    if let Some(meta) = self.out.meta[*slot].as_mut() {
                        meta.reset = true;
                        streams.wake(*slot);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(_)) => {}
        }
        if let Err(e) = self.frames(streams, make) {
            self.fail(e);
        }
        Poll::Ready(Ok(()))
    }

    /// Handles the complete frames in the read buffer.
    fn frames<S, MK>(&mut self, streams: &mut StreamSet<S>, make: &mut MK) -> ConnResult
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        if !self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                return match frame::PREFACE.starts_with(&self.rbuf) {
                    true => Ok(()),
                    false => Err((Reason::PROTOCOL_ERROR, "not the HTTP/2 preface")),
                };
            }
            if &self.rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                return Err((Reason::PROTOCOL_ERROR, "not the HTTP/2 preface"));
            }
            let _ = self.rbuf.split_to(frame::PREFACE.len());
            self.preface = true;
        }
        while self.rbuf.len() >= frame::HEAD_LEN && self.failed.is_none() {
            let head = frame::parse_head(&self.rbuf);
            if head.len > MAX_FRAME_SIZE {
                return Err((
                    Reason::FRAME_SIZE_ERROR,
                    "frame over SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.rbuf.len() < frame::HEAD_LEN + head.len {
                break;
            }
            let mut payload = self.rbuf.split_to(frame::HEAD_LEN + head.len);
            let payload = payload.split_off(frame::HEAD_LEN).freeze();
            self.frame(head, payload, streams, make)?;
        }
        Ok(())
    }

    fn frame<S, MK>(
        &mut self,
        head: Head,
        payload: Bytes,
        streams: &mut StreamSet<S>,
        make: &mut MK,
    ) -> ConnResult
    where
        S: StreamLike,
        MK: FnMut(Request<InBody>) -> S,
    {
        if self.gathering.is_some() && head.kind != frame::CONTINUATION {
            return Err((Reason::PROTOCOL_ERROR, "a header block was interrupted"));
        }
        if !self.settings_seen && head.kind != frame::SETTINGS {
            return Err((Reason::PROTOCOL_ERROR, "the first frame was not SETTINGS"));
        }
        match head.kind {
            frame::DATA => self.data(head, payload, streams),
            frame::HEADERS => self.headers(head, &payload, streams, make),
            frame::CONTINUATION => self.continuation(head, &payload, streams, make),
            frame::PRIORITY => match (head.stream, head.len) {
                (0, _) => Err((Reason::PROTOCOL_ERROR, "PRIORITY on stream 0")),
                (_, 5) => Ok(()),
                _ => Err((Reason::FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")),
            },
            frame::RST_STREAM => self.rst_stream(head, &payload, streams),
            frame::SETTINGS => self.settings(head, &payload, streams),
            frame::PUSH_PROMISE => Err((Reason::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            frame::PING => self.ping(head, &payload),
            frame::GOAWAY => self.goaway(head, &payload),
            frame::WINDOW_UPDATE => self.window_update(head, &payload, streams),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }
}

/// What the connection needs of a stream: [`Stream::drive`], for any request path future.
pub trait StreamLike {
    fn drive(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut Out, slot: usize) -> Poll<()>;
}

impl<F, B> StreamLike for Stream<F, B>
where
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn drive(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut Out, slot: usize) -> Poll<()> {
        Stream::drive(self, cx, out, slot)
    }
}

#[path = "h2_server_frames.rs"]
mod frames;

#[cfg(test)]
#[path = "h2_server_tests.rs"]
mod tests;
