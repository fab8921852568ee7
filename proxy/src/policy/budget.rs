//! Retry budgets: retries may add at most `ratio` of the recent request load, plus
//! `min_per_sec` retries a second.
//!
//! Why a budget and not just `attempts`: with 3 attempts per request, a failing cluster
//! receives 3× its normal load exactly when it is least able to take it — a retry storm
//! that turns a partial outage into a full one. Counting attempts per request cannot see
//! that; a budget shared by all requests of a route can. When everything fails, the budget
//! keeps the total load at `requests × (1 + ratio) + min_per_sec × seconds`; when only a
//! few requests fail, it never gets in their way. (Finagle's and tower's retry budgets and
//! Envoy's `retry_budget` reason the same way.)
//!
//! The window is the last 10 seconds, counted in one-second slots.

use std::sync::Mutex;
use std::time::Instant;

const SLOTS: usize = 10;

#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    min_per_sec: u32,
    epoch: Instant,
    inner: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The second (since `epoch`) each slot counts.
    second: [u64; SLOTS],
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
}

impl Window {
    fn slot(&mut self, now_sec: u64) -> usize {
        let i = (now_sec % SLOTS as u64) as usize;
        if self.second[i] != now_sec {
            self.second[i] = now_sec;
            self.requests[i] = 0;
            self.retries[i] = 0;
        }
        i
    }

    fn totals(&self, now_sec: u64) -> (u64, u64) {
        let mut req = 0;
        let mut ret = 0;
        for i in 0..SLOTS {
            if now_sec.saturating_sub(self.second[i]) < SLOTS as u64 {
                req += self.requests[i];
                ret += self.retries[i];
            }
        }
        (req, ret)
    }
}

impl Budget {
    pub fn new(ratio: f64, min_per_sec: u32) -> Budget {
        Budget::starting_at(ratio, min_per_sec, Instant::now())
    }

    pub fn starting_at(ratio: f64, min_per_sec: u32, epoch: Instant) -> Budget {
        Budget {
            ratio,
            min_per_sec,
            epoch,
            inner: Mutex::new(Window::default()),
        }
    }

    pub fn same_settings(&self, ratio: f64, min_per_sec: u32) -> bool {
        self.ratio == ratio && self.min_per_sec == min_per_sec
    }

    fn sec(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Counts an original request (not a retry).
    pub fn deposit(&self, now: Instant) {
        let s = self.sec(now);
        let mut w = self.inner.lock().unwrap();
        let i = w.slot(s);
        w.requests[i] += 1;
    }

    /// Takes one retry from the budget if it has room; `false` means do not retry.
    pub fn withdraw(&self, now: Instant) -> bool {
        let s = self.sec(now);
        let mut w = self.inner.lock().unwrap();
        let (requests, retries) = w.totals(s);
        // The reserve grows with the window actually covered, so a fresh budget does not
        // grant ten seconds' worth of retries in its first second.
        let covered = (s + 1).min(SLOTS as u64);
        let allowed =
            (requests as f64 * self.ratio).floor() as u64 + u64::from(self.min_per_sec) * covered;
        if retries >= allowed {
            return false;
        }
        let i = w.slot(s);
        w.retries[i] += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn ratio_bounds_retries_when_everything_fails() {
        let t0 = Instant::now();
        let b = Budget::starting_at(0.2, 0, t0);
        let mut retries = 0;
        for i in 0..1000 {
            let now = t0 + Duration::from_millis(i * 5); // 5 s of traffic
            b.deposit(now);
            if b.withdraw(now) {
                retries += 1;
            }
        }
        assert!((195..=200).contains(&retries), "{retries}");
    }

    #[test]
    fn min_per_sec_allows_retries_at_low_traffic() {
        let t0 = Instant::now();
        let b = Budget::starting_at(0.0, 2, t0);
        assert!(b.withdraw(t0));
        assert!(b.withdraw(t0));
        assert!(!b.withdraw(t0));
        assert!(b.withdraw(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn old_traffic_leaves_the_window() {
        let t0 = Instant::now();
        let b = Budget::starting_at(0.5, 0, t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        assert!(b.withdraw(t0 + Duration::from_secs(9)));
        assert!(
            !b.withdraw(t0 + Duration::from_secs(11)),
            "the deposits are older than 10 s"
        );
    }

    #[test]
    fn deposits_of_earlier_seconds_keep_counting() {
        // 100 requests in second 0; in second 1, half of them may be retried, one by one
        // (each retry lands in second 1's slot, beside second 0's requests).
        let t0 = Instant::now();
        let b = Budget::starting_at(0.5, 0, t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        let granted = (0..60).filter(|_| b.withdraw(t1)).count();
        assert_eq!(granted, 50);
    }

    #[test]
    fn same_settings_means_both_settings() {
        let b = Budget::new(0.2, 5);
        assert!(b.same_settings(0.2, 5));
        assert!(!b.same_settings(0.3, 5));
        assert!(!b.same_settings(0.2, 6));
        assert!(!b.same_settings(0.3, 6));
    }

    #[test]
    fn a_slot_is_reused_for_its_new_second() {
        // Second 10 reuses second 0's slot: its own requests count, second 0's do not.
        let t0 = Instant::now();
        let b = Budget::starting_at(0.5, 0, t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        let t10 = t0 + Duration::from_secs(10);
        for _ in 0..10 {
            b.deposit(t10);
        }
        let granted = (0..60).filter(|_| b.withdraw(t10)).count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn the_window_is_ten_seconds_exactly() {
        let t0 = Instant::now();
        let b = Budget::starting_at(0.5, 0, t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        assert!(
            !b.withdraw(t0 + Duration::from_secs(10)),
            "deposits 10 s old are out"
        );
    }

    proptest! {
        #[test]
        fn retries_never_exceed_the_bound(
            ratio in 0.0f64..1.0,
            min_per_sec in 0u32..20,
            steps in proptest::collection::vec((0u64..50, any::<bool>()), 1..400),
        ) {
            let t0 = Instant::now();
            let b = Budget::starting_at(ratio, min_per_sec, t0);
            let mut ms = 0u64;
            let (mut requests, mut retries) = (0u64, 0u64);
            for (dt, _) in &steps {
                ms += dt;
                let now = t0 + Duration::from_millis(ms);
                b.deposit(now);
                requests += 1;
                if b.withdraw(now) { retries += 1; }
            }
            let secs = ms / 1000 + 1;
            let bound = (requests as f64 * ratio).floor() as u64 + u64::from(min_per_sec) * secs;
            prop_assert!(retries <= bound, "{} retries > bound {}", retries, bound);
        }
    }
}
