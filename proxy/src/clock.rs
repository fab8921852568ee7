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
