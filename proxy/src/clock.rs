//! The request path's clock: `std::time::Instant`s read from tokio's clock, so that tests
//! with tokio's paused clock (`start_paused`) drive deadlines, backoffs, breakers, budgets
//! and latency estimates alike. Outside such tests it is the monotonic clock itself.

use std::time::Instant;

/// Now, as the request path sees it.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Sleeps until `at` (a time from [`now`]).
pub async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await
}

/// `f`, unless `at` (a time from [`now`]) comes first: then `None`.
pub async fn until<F: std::future::Future>(at: Option<Instant>, f: F) -> Option<F::Output> {
    match at {
        Some(at) => tokio::time::timeout_at(at.into(), f).await.ok(),
        None => Some(f.await),
    }
}
