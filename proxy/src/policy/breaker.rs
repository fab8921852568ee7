//! Outlier ejection, per endpoint: the circuit breaker's state machine.
//!
//! ```text
//!            N failures in a row                 ejection time over
//!  Closed ───────────────────────▶ Open(until) ─────────────────────▶ HalfOpen
//!    ▲                                  ▲                               │ one probe
//!    │            probe succeeded       │     probe failed: ejected     │ request
//!    └──────────────────────────────────┼───── again, for longer ◀──────┘
//! ```
//!
//! A failure is a 5xx, a connect failure, a reset or a timeout. The k-th ejection in a row
//! lasts `ejection_time × min(2^k, 10)`; after a probe succeeds and the endpoint then stays
//! closed for ten ejection times, the count starts again. Whether an ejection may happen at
//! all (`max_ejection_percent`) is the cluster's call: the caller passes `may_eject`.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    Ejected,
    Restored,
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    consecutive: u32,
    ejections: u32,
    closed_since: Instant,
}

/// How many endpoints of `total` may be ejected at once: `percent` of them rounded down,
/// but at least one (as in Envoy) unless the percentage is 0.
pub fn max_ejected(total: usize, percent: u32) -> usize {
    if percent == 0 {
        return 0;
    }
    (total * percent as usize / 100).max(1)
}

impl Breaker {
    pub fn new(now: Instant) -> Breaker {
        Breaker {
            state: State::Closed,
            consecutive: 0,
            ejections: 0,
            closed_since: now,
        }
    }

    /// Whether a request may be sent now (without claiming the probe slot).
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen { probing } => !probing,
        }
    }

    /// Failures in a row so far (while closed).
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    pub fn is_ejected(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    /// Claims the right to send a request: always while closed; once (the probe) when the
    /// ejection time is over. `None`: pick another endpoint; `Some(true)`: this request is
    /// the probe, and only its result decides the half-open state.
    pub fn acquire(&mut self, now: Instant) -> Option<bool> {
        match self.state {
            State::Closed => Some(false),
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probing: true };
                Some(true)
            }
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Some(true)
            }
            _ => None,
        }
    }

    /// A claimed request ended without a verdict (the client went away): free the probe.
    pub fn release(&mut self) {
        if let State::HalfOpen { probing: true } = self.state {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// Records the result of a request this breaker let through; `probe` says whether it
    /// was the half-open probe (other requests, sent before the ejection, do not decide).
    pub fn record(
        &mut self,
        failed: bool,
        now: Instant,
        s: &Settings,
        may_eject: bool,
        probe: bool,
    ) -> Transition {
        match self.state {
            State::HalfOpen { .. } if !probe => Transition::None,
            State::HalfOpen { .. } => {
                if failed {
                    self.eject(now, s);
                    Transition::None
                } else {
                    self.state = State::Closed;
                    self.consecutive = 0;
                    self.closed_since = now;
                    Transition::Restored
                }
            }
            State::Open { .. } => Transition::None, // a request sent before the ejection
            State::Closed => {
                if !failed {
                    self.consecutive = 0;
                    if self.ejections > 0
                        && now.saturating_duration_since(self.closed_since) > s.ejection_time * 10
                    {
                        self.ejections = 0;
                    }
                    return Transition::None;
                }
                self.consecutive += 1;
                if self.consecutive >= s.consecutive_failures && may_eject {
                    self.eject(now, s);
                    Transition::Ejected
                } else {
                    Transition::None
                }
            }
        }
    }

    fn eject(&mut self, now: Instant, s: &Settings) {
        let factor = 1u32.checked_shl(self.ejections).unwrap_or(u32::MAX).min(10);
        self.state = State::Open {
            until: now + s.ejection_time * factor,
        };
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        consecutive_failures: 3,
        ejection_time: Duration::from_secs(10),
    };

    #[test]
    fn ejects_after_n_failures_then_one_probe_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        assert_eq!(b.record(true, t0, &S, true, false), Transition::None);
        assert_eq!(
            b.record(false, t0, &S, true, false),
            Transition::None,
            "a success resets the run"
        );
        assert_eq!(b.record(true, t0, &S, true, false), Transition::None);
        assert_eq!(b.record(true, t0, &S, true, false), Transition::None);
        assert_eq!(b.record(true, t0, &S, true, false), Transition::Ejected);
        assert!(!b.available(t0 + Duration::from_secs(9)));
        assert_eq!(b.acquire(t0 + Duration::from_secs(9)), None);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.acquire(t1), Some(true), "the probe");
        assert_eq!(b.acquire(t1), None, "only one probe at a time");
        // A request sent before the ejection finishes now: it does not decide.
        assert_eq!(b.record(false, t1, &S, true, false), Transition::None);
        assert!(b.is_ejected());
        assert_eq!(b.record(false, t1, &S, true, true), Transition::Restored);
        assert_eq!(b.acquire(t1), Some(false));
        assert_eq!(b.acquire(t1), Some(false));
    }

    #[test]
    fn ejection_time_doubles_up_to_ten_times() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..3 {
            b.record(true, t0, &S, true, false);
        }
        let mut now = t0;
        let mut lengths = Vec::new();
        for _ in 0..5 {
            let mut probe = now;
            while !b.available(probe) {
                probe += Duration::from_secs(10);
            }
            lengths.push((probe - now).as_secs());
            assert_eq!(b.acquire(probe), Some(true));
            b.record(true, probe, &S, true, true); // the probe fails: ejected again
            now = probe;
        }
        assert_eq!(lengths, vec![10, 20, 40, 80, 100]);
    }

    /// Ejects `b` (closed) at `now`; when its probe may go (to the 10 s).
    fn ejected_until(b: &mut Breaker, now: Instant) -> Instant {
        for _ in 0..3 {
            b.record(true, now, &S, true, false);
        }
        let mut t = now;
        while !b.available(t) {
            t += Duration::from_secs(10);
        }
        t
    }

    /// Ejects `b` (closed) at `now`, lets its probe succeed when it may, and returns when.
    fn eject_and_restore(b: &mut Breaker, now: Instant) -> Instant {
        let t = ejected_until(b, now);
        assert_eq!(b.acquire(t), Some(true));
        assert_eq!(b.record(false, t, &S, true, true), Transition::Restored);
        t
    }

    /// The length of the next ejection of `b` (closed) made at `now`, in seconds.
    fn next_ejection(b: &mut Breaker, now: Instant) -> u64 {
        (ejected_until(b, now) - now).as_secs()
    }

    #[test]
    fn the_backoff_is_forgotten_after_ten_ejection_times_closed() {
        // Closed for exactly 10 ejection times, then a success: the backoff stays.
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        let back = eject_and_restore(&mut b, t0);
        let at = back + S.ejection_time * 10;
        b.record(false, at, &S, true, false);
        assert_eq!(
            next_ejection(&mut b, at),
            20,
            "the second ejection is twice as long"
        );
        // Closed for 5 ejection times: still remembered.
        let mut b = Breaker::new(t0);
        let back = eject_and_restore(&mut b, t0);
        let at = back + S.ejection_time * 5;
        b.record(false, at, &S, true, false);
        assert_eq!(next_ejection(&mut b, at), 20);
        // Longer than 10 ejection times: forgotten, the next ejection is the first again.
        let mut b = Breaker::new(t0);
        let back = eject_and_restore(&mut b, t0);
        let at = back + S.ejection_time * 10 + Duration::from_secs(1);
        b.record(false, at, &S, true, false);
        assert_eq!(next_ejection(&mut b, at), 10);
    }

    #[test]
    fn half_open_is_available_until_its_probe_is_claimed() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..3 {
            b.record(true, t0, &S, true, false);
        }
        let t1 = t0 + S.ejection_time;
        assert_eq!(b.acquire(t1), Some(true));
        assert!(!b.available(t1), "the probe is out");
        b.release();
        assert!(b.available(t1), "half open, no probe out");
    }

    #[test]
    fn released_probe_can_be_retried_and_may_eject_is_honoured() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..5 {
            assert_eq!(b.record(true, t0, &S, false, false), Transition::None);
        }
        assert!(!b.is_ejected(), "the cluster said no more ejections");
        for _ in 0..3 {
            b.record(true, t0, &S, true, false);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.acquire(t1), Some(true));
        b.release();
        assert_eq!(b.acquire(t1), Some(true));
    }

    #[test]
    fn max_ejected_counts() {
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(1, 10), 1);
        assert_eq!(max_ejected(5, 0), 0);
        assert_eq!(max_ejected(4, 100), 4);
    }
}
