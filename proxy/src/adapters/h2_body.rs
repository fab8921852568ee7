//! A request body on a stream of Spur's HTTP/2 server: what the connection's task has read
//! for the stream, handed to whoever reads the body (the request path, or an upstream
//! connection's task), and the bytes read given back to the client's flow-control windows.

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use h2::Reason;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::body::BoxError;

/// What the bodies of a connection share with its task: the bytes they have read, per
/// stream, for the task to give back to the client as window updates.
#[derive(Default)]
pub struct Credits {
    read: Mutex<Vec<(u32, usize)>>,
    pub task: AtomicWaker,
}

impl Credits {
    /// The (stream, bytes) read since the last call.
    pub fn take(&self, into: &mut Vec<(u32, usize)>) {
        let mut read = lock(&self.read);
        if !read.is_empty() {
            std::mem::swap(&mut *read, into);
        }
    }

    fn give(&self, stream: u32, n: usize) {
        if n == 0 {
            return;
        }
        lock(&self.read).push((stream, n));
        self.task.wake();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection task's half of a request body.
pub struct Feed(Arc<Shared>);

struct Shared {
    stream: u32,
    credits: Arc<Credits>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// No more data comes: the client ended the stream, or it was reset.
    ended: bool,
    /// The stream was reset (by the client, or by the server for a malformed body).
    reset: Option<Reason>,
    /// The reader dropped the body: what comes is discarded (and its window given back).
    dropped: bool,
    waker: Option<Waker>,
}

impl Feed {
    fn with(&self, f: impl FnOnce(&mut State)) {
        let mut state = lock(&self.0.state);
        f(&mut state);
        if let Some(w) = state.waker.take() {
            drop(state);
            w.wake();
        }
    }

    /// Hands the reader a chunk; false when the reader is gone (the caller gives the
    /// window back itself).
    pub fn data(&self, data: Bytes) -> bool {
        let mut kept = true;
        self.with(|s| match s.dropped {
            true => kept = false,
            false => s.chunks.push_back(data),
        });
        kept
    }

    /// The client ended the stream, with these trailers if it sent any.
    pub fn end(&self, trailers: Option<HeaderMap>) {
        self.with(|s| {
            s.ended = true;
            s.trailers = trailers;
        });
    }

    /// The stream was reset: the reader sees the error after what it was given already
    /// (nothing, if the reason is `NO_ERROR`: the client had no more to send).
    pub fn reset(&self, reason: Reason) {
        self.with(|s| {
            s.ended = true;
            s.reset.get_or_insert(reason);
        });
    }
}

impl Drop for Feed {
    /// The connection is gone without the client ending the stream (an I/O error, a
    /// protocol error, a drain): the reader sees the body fail, not wait forever (a body
    /// read by an upstream connection's task would hold its stream open).
    fn drop(&mut self) {
        let ended = lock(&self.0.state).ended;
        if !ended {
            self.reset(Reason::CANCEL);
        }
    }
}

/// The reader's half: [`crate::body::InBody::H2`].
pub struct H2Recv {
    shared: Arc<Shared>,
    /// `content-length` minus the bytes read; [`UNKNOWN`] when the client declared none.
    length: u64,
}

const UNKNOWN: u64 = u64::MAX;

/// A request body for `stream`, whose head declared `length` (if it did).
pub fn channel(stream: u32, credits: &Arc<Credits>, length: Option<u64>) -> (Feed, H2Recv) {
    let shared = Arc::new(Shared {
        stream,
        credits: credits.clone(),
        state: Mutex::new(State::default()),
    });
    let recv = H2Recv {
        shared: shared.clone(),
        length: length.unwrap_or(UNKNOWN),
    };
    (Feed(shared), recv)
}

impl H2Recv {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.shared.state);
        if let Some(data) = s.chunks.pop_front() {
            drop(s);
            self.shared.credits.give(self.shared.stream, data.len());
            if self.length != UNKNOWN {
                self.length = self.length.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match s.reset {
            Some(Reason::NO_ERROR) => return Poll::Ready(None),
            Some(reason) => return Poll::Ready(Some(Err(h2::Error::from(reason).into()))),
            None => {}
        }
        if s.ended {
            return Poll::Ready(s.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// True only for a body that ended cleanly: one reset with an error has that error to
    /// give (a reader that trusts this would not poll for it, and would pass on a cut body
    /// as whole).
    pub fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared.state);
        let clean = matches!(s.reset, None | Some(Reason::NO_ERROR));
        s.ended && clean && s.chunks.is_empty() && s.trailers.is_none()
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.length {
            _ if self.is_end_stream() => SizeHint::with_exact(0),
            UNKNOWN => SizeHint::default(),
            n => SizeHint::with_exact(n),
        }
    }
}

impl Drop for H2Recv {
    /// What was read for the body and not taken goes back to the client's windows, and
    /// what comes later is discarded by the connection.
    fn drop(&mut self) {
        let mut s = lock(&self.shared.state);
        s.dropped = true;
        let unread: usize = s.chunks.drain(..).map(|c| c.len()).sum();
        drop(s);
        self.shared.credits.give(self.shared.stream, unread);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker_ref;

    fn poll(recv: &mut H2Recv) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        recv.poll_frame(&mut Context::from_waker(noop_waker_ref()))
    }

    fn data(p: Poll<Option<Result<Frame<Bytes>, BoxError>>>) -> Bytes {
        match p {
            Poll::Ready(Some(Ok(f))) => f.into_data().expect("a data frame"),
            _ => panic!("no data"),
        }
    }

    #[test]
    fn a_reset_after_queued_data_is_not_a_clean_end() {
        let credits = Arc::new(Credits::default());
        let (feed, mut recv) = channel(1, &credits, None);
        assert!(feed.data(Bytes::from_static(b"abc")));
        feed.reset(Reason::CANCEL);
        assert!(!recv.is_end_stream(), "the reset is still to be seen");
        assert_eq!(data(poll(&mut recv)), "abc");
        assert!(!recv.is_end_stream());
        assert!(matches!(poll(&mut recv), Poll::Ready(Some(Err(_)))));
        let mut read = Vec::new();
        credits.take(&mut read);
        assert_eq!(read, vec![(1, 3)], "what was read goes back to the window");
    }

    #[test]
    fn a_feed_dropped_before_the_end_fails_the_body() {
        let credits = Arc::new(Credits::default());
        let (feed, mut recv) = channel(1, &credits, Some(10));
        assert!(poll(&mut recv).is_pending());
        drop(feed);
        assert!(matches!(poll(&mut recv), Poll::Ready(Some(Err(_)))));
    }

    #[test]
    fn an_ended_body_stays_clean_when_its_feed_is_dropped() {
        let credits = Arc::new(Credits::default());
        let (feed, mut recv) = channel(1, &credits, Some(2));
        feed.data(Bytes::from_static(b"ok"));
        feed.end(None);
        drop(feed);
        assert_eq!(data(poll(&mut recv)), "ok");
        assert!(recv.is_end_stream());
        assert!(matches!(poll(&mut recv), Poll::Ready(None)));
    }
}
