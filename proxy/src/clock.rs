//! The request path's clock: `std::time::Instant`s read from tokio's clock, so that tests
//! with tokio's paused clock (`start_paused`) drive deadlines, backoffs, breakers, budgets
//! and latency estimates alike. Outside such tests it is the monotonic clock itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Now, as the request path sees it.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Milliseconds on one of the kernel's coarse clocks (`CLOCK_MONOTONIC_COARSE`,
/// `CLOCK_REALTIME_COARSE`): what the kernel noted at its last timer tick, read by the vDSO
/// without the time-stamp counter (a few loads rather than `rdtsc` and a conversion), so a
/// tick's precision (4 ms at 250 Hz). Not tokio's clock: a paused test clock does not move it.
pub fn coarse_millis(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; both coarse clocks exist on every Linux
    // since 2.6.32 (the call cannot fail for them).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec.max(0) as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Sleeps until `at` (a time from [`now`]).
pub async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await
}

/// `f`, unless `at` (a time from [`now`]) comes first: then `None`. A named future rather
/// than an `async fn`, whose two branches would each hold their own copy of `f`: this one
/// is on every request's path.
pub fn until<F: Future>(at: Option<Instant>, f: F) -> Until<F> {
    match at {
        Some(at) => Until::Timed {
            inner: tokio::time::timeout_at(at.into(), f),
        },
        None => Until::Open { inner: f },
    }
}

pin_project_lite::pin_project! {
    /// See [`until`].
    #[project = UntilProj]
    pub enum Until<F> {
        Timed { #[pin] inner: tokio::time::Timeout<F> },
        Open { #[pin] inner: F },
    }
}

impl<F: Future> Future for Until<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            UntilProj::Timed { inner } => inner.poll(cx).map(Result::ok),
            UntilProj::Open { inner } => inner.poll(cx).map(Some),
        }
    }
}
