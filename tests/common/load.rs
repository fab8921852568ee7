//! Paced load for rate-limit tests, judged by when each request was sent.
//!
//! A test process on a loaded machine does not send at the pace it plans: its tasks wait for
//! a core, then send in a rush. So a limit is judged against what was actually sent in a
//! window (by send time, not by when the answer came back), never against the plan.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The requests of one [`paced_load`]: when each was sent and its status (0: no answer).
#[derive(Default)]
pub struct LoadLog {
    answered: Mutex<Vec<(Instant, u16)>>,
    in_flight: AtomicUsize,
}

/// What the requests sent in a window got.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tally {
    pub sent: usize,
    pub ok: usize,
    pub limited: usize,
}

impl LoadLog {
    /// The requests sent in `[from, to)`; call [`LoadLog::drained`] first so that every one
    /// has its answer.
    pub fn between(&self, from: Instant, to: Instant) -> Tally {
        let mut t = Tally::default();
        for (at, status) in self.answered.lock().unwrap().iter() {
            if (from..to).contains(at) {
                t.sent += 1;
                t.ok += usize::from(*status == 200);
                t.limited += usize::from(*status == 429);
            }
        }
        t
    }

    /// Whether every request sent has been answered (or failed) within `timeout`.
    pub async fn drained(&self, timeout: Duration) -> bool {
        super::eventually(timeout, || async {
            self.in_flight.load(Ordering::SeqCst) == 0
        })
        .await
    }
}

/// Stops the loads (`on` turns false, every loader ends) and, once every request has its
/// answer, tallies what each log's requests sent in `[from, to)` got.
pub async fn stop_and_tally(
    on: &AtomicBool,
    loaders: Vec<tokio::task::JoinHandle<()>>,
    logs: &[Arc<LoadLog>],
    from: Instant,
    to: Instant,
) -> Vec<Tally> {
    on.store(false, Ordering::SeqCst);
    for l in loaders {
        let _ = l.await;
    }
    let mut sent = Vec::new();
    for log in logs {
        assert!(
            log.drained(Duration::from_secs(10)).await,
            "requests unanswered"
        );
        sent.push(log.between(from, to));
    }
    sent
}

/// Sends `rate` requests a second to `addr`'s `/api` while `on` holds, each on its own task,
/// and logs them in `log`.
pub fn paced_load(
    addr: std::net::SocketAddr,
    rate: Arc<AtomicUsize>,
    log: Arc<LoadLog>,
    on: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = super::h1_client();
        let mut next = Instant::now();
        while on.load(Ordering::SeqCst) {
            let r = rate.load(Ordering::SeqCst).max(1);
            // Behind after a wait for a core: go on from now, not in a rush to catch up.
            next = (next + Duration::from_secs_f64(1.0 / r as f64))
                .max(Instant::now() - Duration::from_millis(50));
            tokio::time::sleep_until(next.into()).await;
            let (client, log) = (client.clone(), log.clone());
            log.in_flight.fetch_add(1, Ordering::SeqCst);
            let sent = Instant::now();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://{addr}/api"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let status = match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        // Read to the end, so that the connection goes back to the pool.
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        status
                    }
                    Err(_) => 0,
                };
                log.answered.lock().unwrap().push((sent, status));
                log.in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
    })
}

/// Watches a window of `length` from now, reading the proxies' shares every 100 ms: the
/// window's start and end, and each proxy's mean share over it.
pub async fn watch_shares(
    length: Duration,
    read: impl Fn() -> Vec<f64>,
) -> (Instant, Instant, Vec<f64>) {
    let from = Instant::now();
    let mut sum = read();
    let mut n = 1.0;
    while from.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (s, x) in sum.iter_mut().zip(read()) {
            *s += x;
        }
        n += 1.0;
    }
    (from, Instant::now(), sum.iter().map(|s| s / n).collect())
}

/// A group limit of `rate` requests a second (and `burst`) held over a window of `secs`
/// seconds where proxy `i` was sent `sent[i]` and held share `shares[i]`:
///
/// - the group admitted at most the rate over the window plus one burst (a token bucket
///   admits no more, whatever the load), with `spare` (a fraction of the rate) for shares
///   that add up to a little more than one for a moment: they move in the window, and
///   shares computed by different control-plane replicas, each from demand read at another
///   moment, add up to more than one while the load wobbles (up to 1.10 seen at load 17-18);
/// - and at least 85% of what its proxies' shares let through of what they were sent (each
///   proxy admits `min(sent, share × rate × secs)`): the limit is not stricter than its rate,
///   judged against the load that actually came, not the load planned.
pub fn assert_group_limit(
    sent: &[Tally],
    shares: &[f64],
    (rate, burst): (f64, f64),
    secs: f64,
    spare: f64,
) {
    let admitted: usize = sent.iter().map(|t| t.ok).sum();
    let admitted = admitted as f64;
    let most = rate * secs * (1.0 + spare) + burst;
    let expected: f64 = sent
        .iter()
        .zip(shares)
        .map(|(t, s)| (t.sent as f64).min(s * rate * secs))
        .sum();
    let figures = format!(
        "{admitted} admitted in {secs:.2} s ({:.0} req/s; limit {rate}/s, burst {burst}); \
         sent {sent:?}; mean shares {shares:?}; their shares let through {expected:.0}",
        admitted / secs
    );
    eprintln!("{figures}");
    assert!(admitted <= most, "more than the limit: {figures}");
    assert!(
        admitted >= 0.85 * expected,
        "less than the shares allow: {figures}"
    );
}
