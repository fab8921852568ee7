//! The QUIC connection an `http3` listener hands to h3: h3-quinn's, except that Spur accepts
//! the client's unidirectional streams itself, to check the QPACK encoder stream.
//!
//! Why in front of h3: h3 (0.0.8) stores a client's encoder stream (type 0x02) and never
//! reads it, so instructions on it were ignored — a client could set a dynamic table
//! capacity Spur never offered, insert entries, or close the stream, and the connection
//! carried on. RFC 9204 makes each of these a connection error. h3's connection traits let
//! a transport be wrapped, so Spur does not patch h3: each new unidirectional stream's type
//! is read here; an encoder stream stays here and is checked as its bytes arrive
//! ([`super::encoder_stream`]); every other stream goes on to h3 with its type bytes in
//! front, as if unread (h3 handles control, decoder, push and unknown streams as before,
//! including a second decoder stream). The checks, each closing the connection:
//!
//! - an encoder instruction other than "capacity 0": `QPACK_ENCODER_STREAM_ERROR` (0x201);
//! - a second encoder stream: `H3_STREAM_CREATION_ERROR` (0x103, RFC 9204 §4.2; h3 checked
//!   this before the encoder stream moved here);
//! - an encoder stream finished or reset: `H3_CLOSED_CRITICAL_STREAM` (0x104, §4.2).
//!
//! The checks run when h3 polls for unidirectional streams, which it does on every poll of
//! `accept()` — the listener's connection loop always has one pending.

use super::encoder_stream::{EncoderStreamCheck, EncoderStreamError};
use bytes::{Buf, Bytes};
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId};
use quinn::{ConnectionError, ReadError, VarInt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// RFC 9204 §4.2: the QPACK encoder stream's type.
const ENCODER_STREAM: u64 = 0x02;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + Sync>>;

/// A unidirectional stream whose type has been read.
struct Typed {
    stream: quinn::RecvStream,
    ty: u64,
    /// The type's bytes as received, replayed to h3.
    raw: Bytes,
}

/// Why the connection is closed.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("QPACK encoder stream: {0}")]
    Encoder(#[from] EncoderStreamError),
    #[error("a second QPACK encoder stream")]
    SecondEncoder,
    #[error("the QPACK encoder stream was closed")]
    EncoderClosed,
}

impl Refusal {
    fn code(&self) -> Code {
        match self {
            Refusal::Encoder(_) => Code::QPACK_ENCODER_STREAM_ERROR,
            Refusal::SecondEncoder => Code::H3_STREAM_CREATION_ERROR,
            Refusal::EncoderClosed => Code::H3_CLOSED_CRITICAL_STREAM,
        }
    }
}

/// h3-quinn's connection, with the client's unidirectional streams accepted here.
pub struct GatedConnection {
    inner: h3_quinn::Connection,
    conn: quinn::Connection,
    accepting: BoxFuture<Result<quinn::RecvStream, ConnectionError>>,
    /// New streams whose type is still being read (at most the connection's limit of
    /// concurrent unidirectional streams).
    typing: Vec<BoxFuture<Option<Typed>>>,
    /// The client's encoder stream, read to its end or its first refused instruction.
    encoder: Option<BoxFuture<Option<Refusal>>>,
    had_encoder: bool,
}

impl GatedConnection {
    pub fn new(conn: quinn::Connection) -> Self {
        GatedConnection {
            inner: h3_quinn::Connection::new(conn.clone()),
            accepting: accept(conn.clone()),
            conn,
            typing: Vec::new(),
            encoder: None,
            had_encoder: false,
        }
    }

    /// Closes the connection with the refusal's code; h3 learns of it as a close.
    fn refuse(&mut self, why: Refusal) -> ConnectionErrorIncoming {
        let code = why.code().value();
        tracing::debug!(peer = %self.conn.remote_address(), reason = %why, "HTTP/3 connection closed");
        let reason = why.to_string();
        self.conn.close(
            VarInt::from_u64(code).unwrap_or_default(),
            reason.as_bytes(),
        );
        ConnectionErrorIncoming::ApplicationClose { error_code: code }
    }

    /// A stream whose type is known: the encoder stream stays, the others go to h3.
    fn route(&mut self, typed: Typed) -> Result<Option<ReplayStream>, Refusal> {
        if typed.ty != ENCODER_STREAM {
            return Ok(Some(ReplayStream {
                prefix: Some(typed.raw),
                stream: typed.stream,
            }));
        }
        if self.had_encoder {
            return Err(Refusal::SecondEncoder);
        }
        self.had_encoder = true;
        self.encoder = Some(Box::pin(check_encoder(typed.stream)));
        Ok(None)
    }
}

fn accept(conn: quinn::Connection) -> BoxFuture<Result<quinn::RecvStream, ConnectionError>> {
    Box::pin(async move { conn.accept_uni().await })
}

/// Reads a new stream's type (a QUIC variable-length integer); `None` when the stream or
/// the connection ends first (RFC 9114 §6.2: such a stream is ignored).
async fn read_type(mut stream: quinn::RecvStream) -> Option<Typed> {
    let mut raw = [0u8; 8];
    stream.read_exact(&mut raw[..1]).await.ok()?;
    let len = 1usize << (raw[0] >> 6);
    stream.read_exact(&mut raw[1..len]).await.ok()?;
    let ty = raw[1..len]
        .iter()
        .fold(u64::from(raw[0] & 0x3f), |v, b| (v << 8) | u64::from(*b));
    Some(Typed {
        stream,
        ty,
        raw: Bytes::copy_from_slice(&raw[..len]),
    })
}

/// Reads the client's encoder stream until a refusal (or the connection's end: `None`).
async fn check_encoder(mut stream: quinn::RecvStream) -> Option<Refusal> {
    let mut check = EncoderStreamCheck::default();
    loop {
        match stream.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = check.feed(&chunk.bytes) {
                    return Some(e.into());
                }
            }
            Ok(None) | Err(ReadError::Reset(_)) => return Some(Refusal::EncoderClosed),
            Err(_) => return None,
        }
    }
}

impl<B: Buf> quic::Connection<B> for GatedConnection {
    type RecvStream = ReplayStream;
    type OpenStreams = h3_quinn::OpenStreams;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ReplayStream, ConnectionErrorIncoming>> {
        loop {
            if let Some(encoder) = self.encoder.as_mut() {
                if let Poll::Ready(outcome) = encoder.as_mut().poll(cx) {
                    self.encoder = None;
                    if let Some(why) = outcome {
                        return Poll::Ready(Err(self.refuse(why)));
                    }
                }
            }
            if let Poll::Ready(accepted) = self.accepting.as_mut().poll(cx) {
                // A finished future must not be polled again, even after an error (a
                // closed connection's accept fails again at once).
                self.accepting = accept(self.conn.clone());
                let stream = accepted.map_err(incoming_error)?;
                self.typing.push(Box::pin(read_type(stream)));
                continue;
            }
            let mut done = None;
            for (i, t) in self.typing.iter_mut().enumerate() {
                if let Poll::Ready(typed) = t.as_mut().poll(cx) {
                    done = Some((i, typed));
                    break;
                }
            }
            let Some((i, typed)) = done else {
                return Poll::Pending;
            };
            drop(self.typing.swap_remove(i));
            let Some(typed) = typed else { continue };
            match self.route(typed) {
                Ok(Some(stream)) => return Poll::Ready(Ok(stream)),
                // The encoder stream: poll its check once before waiting.
                Ok(None) => continue,
                Err(why) => return Poll::Ready(Err(self.refuse(why))),
            }
        }
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        quic::Connection::<B>::poll_accept_bidi(&mut self.inner, cx)
    }

    fn opener(&self) -> Self::OpenStreams {
        quic::Connection::<B>::opener(&self.inner)
    }
}

impl<B: Buf> quic::OpenStreams<B> for GatedConnection {
    type BidiStream = h3_quinn::BidiStream<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        self.inner.poll_open_bidi(cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.inner.poll_open_send(cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason)
    }
}

/// A client's unidirectional stream for h3: the type bytes already read, then the rest.
pub struct ReplayStream {
    prefix: Option<Bytes>,
    stream: quinn::RecvStream,
}

impl quic::RecvStream for ReplayStream {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Ok(Some(prefix)));
        }
        // quinn's read_chunk is cancel-safe: a future dropped while pending loses nothing,
        // and the waker it registered stays with the stream.
        let read = std::pin::pin!(self.stream.read_chunk(usize::MAX, true));
        let chunk = ready!(read.poll(cx)).map_err(stream_error)?;
        Poll::Ready(Ok(chunk.map(|c| c.bytes)))
    }

    fn stop_sending(&mut self, error_code: u64) {
        let _ = self
            .stream
            .stop(VarInt::from_u64(error_code).unwrap_or_default());
    }

    fn recv_id(&self) -> StreamId {
        StreamId::try_from(u64::from(self.stream.id()))
            .expect("a QUIC stream id is a variable-length integer")
    }
}

/// quinn's connection errors as h3 takes them (as h3-quinn converts them).
fn incoming_error(e: ConnectionError) -> ConnectionErrorIncoming {
    match e {
        ConnectionError::ApplicationClosed(close) => ConnectionErrorIncoming::ApplicationClose {
            error_code: close.error_code.into_inner(),
        },
        ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        e => ConnectionErrorIncoming::Undefined(Arc::new(e)),
    }
}

fn stream_error(e: ReadError) -> StreamErrorIncoming {
    match e {
        ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        ReadError::ConnectionLost(e) => StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: incoming_error(e),
        },
        e => StreamErrorIncoming::Unknown(Box::new(e)),
    }
}
