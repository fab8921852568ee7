//! Load-balancer choice: which endpoint of a cluster takes a request.
//!
//! The policies only read each endpoint's load through [`Candidate`]; the counters and
//! latency estimates live with the endpoint state (see `crate::endpoint`), which outlives
//! config swaps. Policies:
//!
//! - `round_robin`: a precomputed smooth weighted schedule walked by an atomic cursor.
//! - `least_request`: power of two choices on in-flight requests per unit of weight.
//! - `ring_hash`: consistent hashing of the route's `hash_on` key onto a ring of virtual
//!   nodes (100 per unit of weight), so removing one of N endpoints moves only ~1/N of keys.
//! - `ewma`: power of two choices on peak-EWMA latency × (in-flight + 1) per unit of weight.
//!   A failure adds a penalty that fades within about two seconds, so an endpoint that fails
//!   fast never looks like the fastest one, yet one that recovers is soon tried again.
//!
//! Two random choices rather than a full scan: it is O(1), avoids the herd effect of every
//! proxy picking the same "best" endpoint, and is what finagle, linkerd and Envoy do.
//!
//! Two settings of a cluster shape every policy ([`Tuning`]):
//!
//! - **panic threshold** (default 50%): when fewer than this share of the endpoints is
//!   available (yet at least one is), all of them are candidates, the unavailable ones
//!   included. A health check or breaker that has marked most of a fleet down is more
//!   likely wrong (or the fleet overloaded) than right, and sending everything to the few
//!   left would take them down too (Envoy's panic mode). With none available, nothing is
//!   chosen: the request gets `no_healthy_endpoint`.
//! - **slow start** (`window`): an endpoint that is new to its cluster, or back from an
//!   ejection or failed health checks, is chosen with a factor that grows from 10% to 100%
//!   linearly over the window: when it wins a choice, the win stands with the probability
//!   of the factor (else the other candidate is taken). That covers `ewma` and
//!   `least_request` (power of two choices: Envoy's slow start does not) as well as
//!   `round_robin` (its turn is taken with that probability). Not `ring_hash`: a key stays
//!   on its endpoint. A recovered endpoint also starts at its fastest peer's latency estimate
//!   ([`peer_estimate`]), so without slow start it gets its full share at once.

use super::split::stable_hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What a policy may know about an endpoint.
pub trait Candidate {
    fn weight(&self) -> u32;
    /// Requests sent and not yet answered.
    fn in_flight(&self) -> u32;
    /// Decayed peak-EWMA latency in nanoseconds, as of `now`.
    fn latency_ns(&self, now: Instant) -> f64;
    /// False while the endpoint must not be chosen (ejected, or failing health checks).
    fn available(&self, now: Instant) -> bool;
    /// Since when the endpoint is in slow start (new, or recovered); `None`: it is not.
    fn ramp_since(&self) -> Option<Instant> {
        None
    }
}

/// A cluster's panic threshold and slow start (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// Percent of endpoints that must be available (0: no panic mode).
    pub panic_threshold: u32,
    pub slow_start: Option<Duration>,
}

/// The least a ramping endpoint weighs: a tenth of its weight, so that it is tried and its
/// latency learned.
pub const RAMP_FLOOR: f64 = 0.1;

impl Tuning {
    /// The share of its weight an endpoint has now: from [`RAMP_FLOOR`] to 1 over the
    /// slow-start window.
    pub fn ramp<E: Candidate>(&self, e: &E, now: Instant) -> f64 {
        let (Some(window), Some(since)) = (self.slow_start, e.ramp_since()) else {
            return 1.0;
        };
        let f = now.saturating_duration_since(since).as_secs_f64() / window.as_secs_f64();
        f.clamp(RAMP_FLOOR, 1.0)
    }

    /// Whether `eps` is in panic: fewer than the threshold available, but some.
    pub fn panics<E: Candidate>(&self, eps: &[E], now: Instant) -> bool {
        if self.panic_threshold == 0 || eps.is_empty() {
            return false;
        }
        let available = eps.iter().filter(|e| e.available(now)).count();
        available > 0
            && (available as u64) * 100 < u64::from(self.panic_threshold) * eps.len() as u64
    }
}

/// What [`Balancer::pick_with`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    /// Chosen in panic mode: it may be an unavailable endpoint (the breaker is not asked).
    pub panic: bool,
}

#[derive(Debug)]
pub enum Balancer {
    RoundRobin {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    LeastRequest,
    Ewma,
    /// Sorted (point, endpoint index) pairs.
    RingHash {
        ring: Vec<(u64, u32)>,
    },
}

impl Balancer {
    pub fn round_robin(weights: &[u32]) -> Balancer {
        Balancer::RoundRobin {
            schedule: smooth_schedule(weights),
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// A ring for endpoints identified by `ids` (their addresses), with these weights.
    ///
    /// A point is the hash of the virtual node's number under the hash of the id. (The
    /// number as the seed of the id's hash made ids that differ in their first byte share
    /// their points, `a:1` vnode 3 = `b:1` vnode 0, and the first such endpoint took
    /// every key.)
    pub fn ring_hash(ids: &[&str], weights: &[u32]) -> Balancer {
        let mut ring = Vec::new();
        for (i, (id, w)) in ids.iter().zip(weights).enumerate() {
            let vnodes = (u64::from(*w).min(100) * 100).max(1);
            let seed = stable_hash(0, id.as_bytes());
            for v in 0..vnodes {
                ring.push((stable_hash(seed, &v.to_le_bytes()), i as u32));
            }
        }
        ring.sort_unstable();
        Balancer::RingHash { ring }
    }

    /// Chooses an endpoint, avoiding those in `exclude` (the ones a request's earlier tries
    /// failed on) while another is available. `key` is the request's hash key, used by
    /// `ring_hash` only. `None` when no endpoint is available.
    pub fn pick<E: Candidate>(
        &self,
        eps: &[E],
        exclude: &[usize],
        now: Instant,
        key: Option<&[u8]>,
    ) -> Option<usize> {
        self.pick_with(eps, exclude, now, key, Tuning::default())
            .map(|p| p.index)
    }

    /// [`Balancer::pick`] with the cluster's panic threshold and slow start.
    pub fn pick_with<E: Candidate>(
        &self,
        eps: &[E],
        exclude: &[usize],
        now: Instant,
        key: Option<&[u8]>,
        tuning: Tuning,
    ) -> Option<Pick> {
        let panic = tuning.panics(eps, now);
        let available = |i: usize| panic || eps[i].available(now);
        let usable = |i: usize| available(i) && !exclude.contains(&i);
        let any_usable = exclude.is_empty() || (0..eps.len()).any(usable);
        let usable = |i: usize| {
            if any_usable {
                usable(i)
            } else {
                available(i)
            }
        };
        let weight = |i: usize| f64::from(eps[i].weight().max(1));
        let ramp = |i: usize| tuning.ramp(&eps[i], now);
        let index = match self {
            Balancer::RoundRobin { schedule, next } => {
                if schedule.is_empty() {
                    return None;
                }
                let mut fallback = None;
                let mut chosen = None;
                for _ in 0..schedule.len() {
                    let i =
                        schedule[next.fetch_add(1, Ordering::Relaxed) % schedule.len()] as usize;
                    if i < eps.len() && usable(i) {
                        // A ramping endpoint takes its turn with the probability of its factor.
                        let ramp = tuning.ramp(&eps[i], now);
                        if ramp >= 1.0 || fastrand::f64() < ramp {
                            chosen = Some(i);
                            break;
                        }
                        fallback.get_or_insert(i);
                    }
                }
                chosen.or(fallback)
            }
            Balancer::LeastRequest => p2c(
                &usable,
                &weight,
                &ramp,
                |i| f64::from(eps[i].in_flight()),
                0.0,
                eps.len(),
            ),
            Balancer::Ewma => p2c(
                &usable,
                &weight,
                &ramp,
                |i| eps[i].latency_ns(now) * f64::from(eps[i].in_flight() + 1),
                EWMA_TIE,
                eps.len(),
            ),
            Balancer::RingHash { ring } => {
                let Some(key) = key else {
                    return weighted_draw(eps.len(), &usable, &weight, None)
                        .map(|index| Pick { index, panic });
                };
                if ring.is_empty() {
                    return None;
                }
                let h = stable_hash(0x7269_6e67, key);
                let start = ring.partition_point(|(p, _)| *p < h);
                (0..ring.len())
                    .map(|k| ring[(start + k) % ring.len()].1 as usize)
                    .find(|i| *i < eps.len() && usable(*i))
            }
        }?;
        Some(Pick { index, panic })
    }
}

/// How much lower (as a fraction) one EWMA cost must be than the other to win; closer costs
/// are a tie, which goes to the first of the two random draws. Without it, endpoints whose
/// estimates decay together from a common peak keep their order for tens of seconds: the
/// lowest of three takes two thirds of the requests and the highest none, however small the
/// difference (an endpoint back from ejection, started at its peers' estimate, got 2% of
/// the traffic in its first second).
pub const EWMA_TIE: f64 = 0.1;

/// Power of two choices: two distinct endpoints drawn at random in proportion to weight;
/// the one with the lower `load / weight` wins (by more than `tie`, a fraction of the other's
/// cost; else the first draw does). A winner in slow start keeps its win with
/// the probability of its ramp factor, else the other one is taken: so its share grows in
/// proportion to the factor, whatever the number of endpoints (scaling its weight instead
/// would do nothing with two endpoints, which are always both drawn).
fn p2c(
    usable: &impl Fn(usize) -> bool,
    weight: &impl Fn(usize) -> f64,
    ramp: &impl Fn(usize) -> f64,
    load: impl Fn(usize) -> f64,
    tie: f64,
    n: usize,
) -> Option<usize> {
    // One endpoint (a sidecar's own application): what the draws would give, without them.
    if n == 1 {
        return usable(0).then_some(0);
    }
    let a = weighted_draw(n, usable, weight, None)?;
    let Some(b) = weighted_draw(n, usable, weight, Some(a)) else {
        return Some(a);
    };
    let cost = |i: usize| load(i) / weight(i);
    let (win, lose) = if cost(b) < cost(a) * (1.0 - tie) {
        (b, a)
    } else {
        (a, b)
    };
    let r = ramp(win);
    Some(if r >= 1.0 || fastrand::f64() < r {
        win
    } else {
        lose
    })
}

fn weighted_draw(
    n: usize,
    usable: &impl Fn(usize) -> bool,
    weight: &impl Fn(usize) -> f64,
    skip: Option<usize>,
) -> Option<usize> {
    let ok = |i: usize| Some(i) != skip && usable(i);
    let total: f64 = (0..n).filter(|i| ok(*i)).map(weight).sum();
    if total <= 0.0 {
        return None;
    }
    let mut point = fastrand::f64() * total;
    let mut last = None;
    for i in (0..n).filter(|i| ok(*i)) {
        let w = weight(i);
        if point < w {
            return Some(i);
        }
        point -= w;
        last = Some(i);
    }
    last
}

/// The latency a recovered endpoint starts from: the lowest estimate among the other
/// available endpoints (those without a failure penalty), or [`DEFAULT_RTT`] when there are
/// none. The lowest, so that it is tried at once (two random choices pick the cheaper of
/// two: an endpoint ranked in the middle of three can get a third of the traffic or none);
/// its first real answer then sets its estimate (a higher sample replaces it outright).
pub fn peer_estimate<E: Candidate>(eps: &[E], except: usize, now: Instant) -> f64 {
    (0..eps.len())
        .filter(|i| *i != except && eps[*i].available(now))
        .map(|i| eps[i].latency_ns(now))
        .filter(|l| *l < FAILURE_PENALTY.as_nanos() as f64 / 10.0)
        .min_by(f64::total_cmp)
        .unwrap_or(DEFAULT_RTT.as_nanos() as f64)
}

/// nginx's smooth weighted round robin, unrolled into a schedule of endpoint indices:
/// weights 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c. Weights are scaled down
/// (keeping each at least 1) so the schedule stays at most 4096 entries.
pub fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let scale = (total as f64 / 4096.0).max(1.0);
    let w: Vec<i64> = weights
        .iter()
        .map(|x| ((f64::from(*x) / scale).round() as i64).max(1))
        .collect();
    let sum: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("non-empty");
        current[best] -= sum;
        out.push(best as u32);
    }
    out
}

/// Peak-EWMA latency estimate of one endpoint, plus a fading penalty for failures.
///
/// A latency sample above the estimate replaces it at once (the "peak"); a lower one is
/// blended in with a weight that grows with the time since the last sample (decay constant
/// [`TAU`]), so an endpoint recovers its reputation within seconds, not requests.
///
/// Failures are not latency: a failed try leaves the estimate alone and sets a penalty of
/// [`FAILURE_PENALTY`] (or the time the failure took, if longer), which fades with its own,
/// short constant [`PENALTY_TAU`]. So an endpoint failing fast is avoided, but a dead one is
/// tried again within about two seconds of its last failure, and one that came back gets
/// traffic again that soon. (A failure counted as a one-second latency sample under the
/// ten-second `TAU` kept a recovered endpoint out of rotation for about a minute.)
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    penalty_ns: f64,
    penalty_stamp: Instant,
}

pub const TAU: Duration = Duration::from_secs(10);
/// How fast a failure's penalty fades: below a millisecond about 1.7 s after a 1 s penalty.
pub const PENALTY_TAU: Duration = Duration::from_millis(250);
/// The estimate of an endpoint with no samples yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// The penalty a failure adds (at least): much slower than any healthy answer.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        PeakEwma {
            estimate_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
            penalty_ns: 0.0,
            penalty_stamp: now,
        }
    }

    pub fn observe(&mut self, rtt: Duration, failed: bool, now: Instant) {
        if failed {
            self.penalty_ns = rtt.max(FAILURE_PENALTY).as_nanos() as f64;
            self.penalty_stamp = now;
            return;
        }
        let sample = rtt.as_nanos() as f64;
        if sample > self.estimate_ns {
            self.estimate_ns = sample;
        } else {
            let decay = decay(self.stamp, now, TAU);
            self.estimate_ns = self.estimate_ns * decay + sample * (1.0 - decay);
        }
        self.stamp = now;
    }

    /// Starts afresh at `estimate_ns` (its peers' typical latency), without a penalty:
    /// after a breaker's probe succeeded or health checks brought the endpoint back. Not
    /// [`DEFAULT_RTT`]: against peers answering in a tenth of it, a recovered endpoint would
    /// get a fraction of its share for seconds (each fast sample blends in slowly); nor zero,
    /// which would send it every request until its first answer.
    pub fn reset(&mut self, estimate_ns: f64, now: Instant) {
        *self = PeakEwma {
            estimate_ns,
            stamp: now,
            penalty_ns: 0.0,
            penalty_stamp: now,
        };
    }

    /// The estimate as of `now`, decayed towards zero since the last sample so that an
    /// endpoint that was slow once gets tried again, plus what is left of a failure penalty.
    pub fn estimate_ns(&self, now: Instant) -> f64 {
        self.estimate_ns * decay(self.stamp, now, TAU)
            + self.penalty_ns * decay(self.penalty_stamp, now, PENALTY_TAU)
    }
}

fn decay(since: Instant, now: Instant, tau: Duration) -> f64 {
    let elapsed = now.saturating_duration_since(since).as_secs_f64();
    (-elapsed / tau.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Ep {
        weight: u32,
        in_flight: u32,
        latency: f64,
        available: bool,
        ramp_since: Option<Instant>,
    }

    impl Candidate for Ep {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn in_flight(&self) -> u32 {
            self.in_flight
        }
        fn latency_ns(&self, _: Instant) -> f64 {
            self.latency
        }
        fn available(&self, _: Instant) -> bool {
            self.available
        }
        fn ramp_since(&self) -> Option<Instant> {
            self.ramp_since
        }
    }

    fn ep(weight: u32, in_flight: u32, latency_ms: f64) -> Ep {
        Ep {
            weight,
            in_flight,
            latency: latency_ms * 1e6,
            available: true,
            ramp_since: None,
        }
    }

    fn shares(b: &Balancer, eps: &[Ep], now: Instant, tuning: Tuning) -> Vec<f64> {
        let mut counts = vec![0usize; eps.len()];
        for _ in 0..4000 {
            counts[b.pick_with(eps, &[], now, None, tuning).unwrap().index] += 1;
        }
        counts.iter().map(|c| *c as f64 / 4000.0).collect()
    }

    #[test]
    fn below_the_panic_threshold_every_endpoint_is_a_candidate() {
        let now = Instant::now();
        let mut eps: Vec<Ep> = (0..4).map(|_| ep(1, 0, 1.0)).collect();
        let tuning = Tuning {
            panic_threshold: 50,
            slow_start: None,
        };
        for b in [
            Balancer::Ewma,
            Balancer::LeastRequest,
            Balancer::round_robin(&[1; 4]),
        ] {
            eps.iter_mut().for_each(|e| e.available = true);
            // 2 of 4 available: 50% is not below 50%: only those two.
            eps[0].available = false;
            eps[1].available = false;
            let s = shares(&b, &eps, now, tuning);
            assert_eq!(s[0] + s[1], 0.0, "{s:?}");
            assert!(!b.pick_with(&eps, &[], now, None, tuning).unwrap().panic);
            // 1 of 4: panic, all four share.
            eps[2].available = false;
            let s = shares(&b, &eps, now, tuning);
            assert!(s.iter().all(|x| *x > 0.15), "{s:?}");
            assert!(b.pick_with(&eps, &[], now, None, tuning).unwrap().panic);
            // Threshold 0: no panic mode.
            let off = Tuning::default();
            assert_eq!(shares(&b, &eps, now, off)[3], 1.0);
            // None available: nothing (no_healthy_endpoint), panic or not.
            eps[3].available = false;
            assert_eq!(b.pick_with(&eps, &[], now, None, tuning), None);
        }
    }

    #[test]
    fn slow_start_ramps_an_endpoints_share_for_every_policy() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let tuning = Tuning {
            panic_threshold: 50,
            slow_start: Some(window),
        };
        let mut eps: Vec<Ep> = (0..2).map(|_| ep(1, 0, 1.0)).collect();
        eps[1].ramp_since = Some(t0);
        for b in [
            Balancer::Ewma,
            Balancer::LeastRequest,
            Balancer::round_robin(&[1, 1]),
        ] {
            let at = |secs: u64| shares(&b, &eps, t0 + Duration::from_secs(secs), tuning)[1];
            let (start, mid, end) = (at(0), at(5), at(20));
            assert!(start < 0.15, "at the start: {start}");
            assert!(start + 0.1 < mid && mid + 0.05 < end, "{start} {mid} {end}");
            assert!((0.4..0.6).contains(&end), "after the window: {end}");
            // Without slow start, no ramp.
            assert!(shares(&b, &eps, t0, Tuning::default())[1] > 0.4);
        }
    }

    #[test]
    fn a_single_endpoint_is_picked_while_available_and_retried_when_excluded() {
        let now = Instant::now();
        let mut eps = vec![ep(3, 5, 2.0)];
        eps[0].ramp_since = Some(now);
        let tuning = Tuning {
            panic_threshold: 0,
            slow_start: Some(Duration::from_secs(10)),
        };
        for b in [Balancer::Ewma, Balancer::LeastRequest] {
            for _ in 0..20 {
                let pick = b.pick_with(&eps, &[], now, None, tuning).unwrap();
                assert_eq!(pick.index, 0);
                // A retry excluding it goes to it again: there is no other.
                let pick = b.pick_with(&eps, &[0], now, None, tuning).unwrap();
                assert_eq!(pick.index, 0);
            }
            eps[0].available = false;
            assert_eq!(b.pick_with(&eps, &[], now, None, tuning), None);
            eps[0].available = true;
        }
    }

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        let big = smooth_schedule(&[10_000, 10_000, 1]);
        assert!(big.len() <= 4096 + 3);
        assert!(big.contains(&2));
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unavailable() {
        let mut eps = vec![ep(2, 0, 1.0), ep(1, 0, 1.0), ep(1, 0, 1.0)];
        let rr = Balancer::round_robin(&[2, 1, 1]);
        let now = Instant::now();
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[rr.pick(&eps, &[], now, None).unwrap()] += 1;
        }
        assert_eq!(counts, [200, 100, 100]);
        eps[0].available = false;
        for _ in 0..50 {
            assert_ne!(rr.pick(&eps, &[], now, None), Some(0));
        }
        assert_ne!(rr.pick(&eps, &[1], now, None), Some(1));
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let eps = vec![ep(1, 10, 1.0), ep(1, 0, 1.0)];
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(Balancer::LeastRequest.pick(&eps, &[], now, None), Some(1));
        }
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let eps = vec![ep(1, 0, 1.0), ep(1, 0, 50.0), ep(1, 0, 1.0)];
        let now = Instant::now();
        let mut slow = 0;
        for _ in 0..3000 {
            if Balancer::Ewma.pick(&eps, &[], now, None) == Some(1) {
                slow += 1;
            }
        }
        // The slow one wins only when drawn twice, which p2c never does: 0.
        assert_eq!(slow, 0);
    }

    #[test]
    fn ewma_shares_evenly_among_near_equal_estimates() {
        // Estimates a few microseconds apart, as when they decay together from one peak:
        // a strict comparison gives the highest nothing and the lowest two thirds.
        let eps = vec![ep(1, 0, 2.548), ep(1, 0, 2.549), ep(1, 0, 2.550)];
        let s = shares(&Balancer::Ewma, &eps, Instant::now(), Tuning::default());
        for (i, share) in s.iter().enumerate() {
            assert!((0.25..0.42).contains(share), "endpoint {i} got {share}");
        }
        // Clearly slower (by more than the tie margin) still loses every comparison.
        let eps = vec![ep(1, 0, 1.0), ep(1, 0, 1.2), ep(1, 0, 1.0)];
        let s = shares(&Balancer::Ewma, &eps, Instant::now(), Tuning::default());
        assert_eq!(s[1], 0.0);
    }

    #[test]
    fn exclude_is_avoided_unless_it_is_the_only_one() {
        let eps = vec![ep(1, 0, 1.0), ep(1, 0, 1.0)];
        let now = Instant::now();
        for b in [
            Balancer::Ewma,
            Balancer::LeastRequest,
            Balancer::round_robin(&[1, 1]),
        ] {
            for _ in 0..50 {
                assert_eq!(b.pick(&eps, &[0], now, None), Some(1));
            }
            assert_eq!(b.pick(&eps[..1], &[0], now, None), Some(0));
        }
    }

    #[test]
    fn peak_ewma_takes_peaks_and_decays() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), false, t0);
        assert_eq!(e.estimate_ns(t0), 100e6);
        // A fast sample right away barely moves it.
        e.observe(
            Duration::from_millis(1),
            false,
            t0 + Duration::from_millis(1),
        );
        assert!(e.estimate_ns(t0) > 99e6);
        // After 3 TAU the old peak has mostly faded.
        assert!(e.estimate_ns(t0 + TAU * 3) < 6e6);
        // A failure that answered in 1ms counts as a second, but not for long.
        let mut f = PeakEwma::new(t0);
        f.observe(Duration::from_millis(1), true, t0);
        assert!(f.estimate_ns(t0) >= 1e9);
        assert!(f.estimate_ns(t0 + Duration::from_millis(1800)) < 1e6 + 5e6);
        // A success does not erase a fresh penalty; a reset does.
        f.observe(Duration::from_millis(1), false, t0);
        assert!(f.estimate_ns(t0) >= 1e9);
        f.reset(2e6, t0);
        assert_eq!(f.estimate_ns(t0), 2e6);
    }

    #[test]
    fn a_recovered_endpoint_starts_from_its_fastest_peer() {
        let now = Instant::now();
        let mut eps = vec![ep(1, 0, 1.0), ep(1, 0, 3.0), ep(1, 0, 2.0), ep(1, 0, 900.0)];
        // The others of 1: 1, 2 and (penalised, not counted) 900 ms.
        assert_eq!(peer_estimate(&eps, 1, now), 1e6);
        eps[0].available = false;
        assert_eq!(peer_estimate(&eps, 1, now), 2e6);
        assert_eq!(
            peer_estimate(&eps[..1], 0, now),
            DEFAULT_RTT.as_nanos() as f64
        );
    }

    #[test]
    fn exclusion_covers_every_tried_endpoint() {
        let eps = vec![ep(1, 0, 1.0), ep(1, 0, 1.0), ep(1, 0, 1.0), ep(1, 0, 1.0)];
        let now = Instant::now();
        for b in [
            Balancer::Ewma,
            Balancer::LeastRequest,
            Balancer::round_robin(&[1; 4]),
        ] {
            for _ in 0..100 {
                assert_eq!(b.pick(&eps, &[0, 1, 3], now, None), Some(2));
                assert!(!matches!(
                    b.pick(&eps, &[2, 0], now, None),
                    Some(0) | Some(2)
                ));
            }
            // All tried: any available one, rather than none.
            assert!(b.pick(&eps, &[0, 1, 2, 3], now, None).is_some());
        }
    }

    #[test]
    fn ring_hash_is_sticky_and_moves_few_keys_when_an_endpoint_goes() {
        let ids: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:80")).collect();
        let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
        let eps: Vec<Ep> = (0..5).map(|_| ep(1, 0, 1.0)).collect();
        let ring = Balancer::ring_hash(&refs, &[1; 5]);
        let now = Instant::now();
        let keys: Vec<String> = (0..5000).map(|k| format!("user-{k}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| ring.pick(&eps, &[], now, Some(k.as_bytes())).unwrap())
            .collect();
        // Same key, same endpoint.
        for (k, b) in keys.iter().zip(&before).take(100) {
            assert_eq!(ring.pick(&eps, &[], now, Some(k.as_bytes())), Some(*b));
        }
        // Shares are roughly even.
        for i in 0..5 {
            let share = before.iter().filter(|b| **b == i).count() as f64 / 5000.0;
            assert!((0.12..0.28).contains(&share), "endpoint {i} share {share}");
        }
        // Remove endpoint 4: only its keys move.
        let ring4 = Balancer::ring_hash(&refs[..4], &[1; 4]);
        let after: Vec<usize> = keys
            .iter()
            .map(|k| ring4.pick(&eps[..4], &[], now, Some(k.as_bytes())).unwrap())
            .collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let on_removed = before.iter().filter(|b| **b == 4).count();
        assert_eq!(moved, on_removed, "only the removed endpoint's keys move");
        let frac = moved as f64 / 5000.0;
        assert!(
            (0.12..0.28).contains(&frac),
            "remapped fraction {frac}, about 1/5 expected"
        );
    }

    #[test]
    fn equal_loads_share_in_proportion_to_weight() {
        // Equal costs are a tie, which goes to the first draw (drawn by weight): so the
        // shares follow the weights, 3:1 (the second draw winning ties would give 1:3).
        // (Latency per unit of weight is what EWMA compares: 3 ms on weight 3 equals 1 ms
        // on weight 1.)
        let eps = vec![ep(3, 0, 3.0), ep(1, 0, 1.0)];
        for b in [Balancer::Ewma, Balancer::LeastRequest] {
            let s = shares(&b, &eps, Instant::now(), Tuning::default());
            assert!((0.68..0.82).contains(&s[0]), "{b:?}: {s:?}");
        }
    }

    #[test]
    fn load_is_compared_per_unit_of_weight() {
        // 3 in flight on weight 4 (0.75 each) beats 1 on weight 1: endpoint 0 always wins.
        let now = Instant::now();
        let eps = vec![ep(4, 3, 1.0), ep(1, 1, 1.0)];
        for _ in 0..100 {
            assert_eq!(Balancer::LeastRequest.pick(&eps, &[], now, None), Some(0));
        }
        let eps = vec![ep(4, 0, 3.0), ep(1, 0, 1.0)];
        for _ in 0..100 {
            assert_eq!(Balancer::Ewma.pick(&eps, &[], now, None), Some(0));
        }
        // EWMA weighs latency by the requests in flight (+1): 1 ms × 10 loses to 5 ms × 1.
        let eps = vec![ep(1, 9, 1.0), ep(1, 0, 5.0)];
        for _ in 0..100 {
            assert_eq!(Balancer::Ewma.pick(&eps, &[], now, None), Some(1));
        }
    }

    #[test]
    fn a_ring_has_a_hundred_points_per_unit_of_weight_up_to_a_hundred() {
        let Balancer::RingHash { ring } =
            Balancer::ring_hash(&["a", "b", "c", "d"], &[1, 3, 0, 500])
        else {
            unreachable!()
        };
        assert_eq!(ring.len(), 100 + 300 + 1 + 10_000);
        assert!(ring.windows(2).all(|w| w[0] <= w[1]), "sorted");
    }

    #[test]
    fn ring_hash_shares_evenly_among_ids_that_differ_in_their_first_byte() {
        // Such ids once shared all their points: the first endpoint took every key.
        let eps: Vec<Ep> = (0..3).map(|_| ep(1, 0, 1.0)).collect();
        let now = Instant::now();
        for ids in [
            ["a:1", "b:1", "c:1"],
            ["1.0.0.1:80", "2.0.0.1:80", "3.0.0.1:80"],
        ] {
            let ring = Balancer::ring_hash(&ids, &[1; 3]);
            let mut counts = [0usize; 3];
            for k in 0..3000 {
                let key = format!("user-{k}");
                counts[ring.pick(&eps, &[], now, Some(key.as_bytes())).unwrap()] += 1;
            }
            assert!(
                counts.iter().all(|c| (600..1500).contains(c)),
                "{ids:?}: {counts:?}"
            );
        }
    }

    #[test]
    fn ring_hash_passes_an_unavailable_endpoints_keys_on_clockwise() {
        // An unavailable endpoint's keys go where they would go if it had left the ring;
        // the other keys stay.
        let ids: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:80")).collect();
        let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
        let mut eps: Vec<Ep> = (0..5).map(|_| ep(1, 0, 1.0)).collect();
        eps[4].available = false;
        let ring = Balancer::ring_hash(&refs, &[1; 5]);
        let ring4 = Balancer::ring_hash(&refs[..4], &[1; 4]);
        let now = Instant::now();
        for k in 0..2000 {
            let key = format!("user-{k}");
            let key = Some(key.as_bytes());
            assert_eq!(
                ring.pick(&eps, &[], now, key),
                ring4.pick(&eps[..4], &[], now, key)
            );
        }
    }

    #[test]
    fn a_schedule_or_ring_longer_than_the_endpoints_skips_the_missing_ones() {
        // Built for three endpoints, asked with two (a swap in between): never the third.
        let ids = ["a:1", "b:1", "c:1"];
        let eps = vec![ep(1, 0, 1.0), ep(1, 0, 1.0)];
        let now = Instant::now();
        let rr = Balancer::round_robin(&[1, 1, 1]);
        let ring = Balancer::ring_hash(&ids, &[1, 1, 1]);
        for k in 0..300u32 {
            assert!(rr.pick(&eps, &[], now, None).is_some_and(|i| i < 2));
            let key = k.to_le_bytes();
            assert!(ring.pick(&eps, &[], now, Some(&key)).is_some_and(|i| i < 2));
        }
    }

    #[test]
    fn ring_hash_without_a_key_draws_by_weight() {
        let ring = Balancer::ring_hash(&["a", "b"], &[3, 1]);
        let eps = vec![ep(3, 0, 1.0), ep(1, 0, 1.0)];
        let s = shares(&ring, &eps, Instant::now(), Tuning::default());
        assert!((0.68..0.82).contains(&s[0]), "{s:?}");
    }

    #[test]
    fn a_fast_sample_blends_in_by_the_time_since_the_last() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), false, t0);
        // One TAU later a 1 ms sample: 100 ms × e^-1 + 1 ms × (1 - e^-1).
        e.observe(Duration::from_millis(1), false, t0 + TAU);
        let d = (-1.0f64).exp();
        let want = 100e6 * d + 1e6 * (1.0 - d);
        let got = e.estimate_ns(t0 + TAU);
        assert!((got - want).abs() < 1e3, "{got} != {want}");
        // A failure's penalty: a second at first, e^-1 of it one PENALTY_TAU later.
        let mut f = PeakEwma::new(t0);
        f.observe(Duration::from_millis(1), true, t0);
        let want = DEFAULT_RTT.as_nanos() as f64 * (-0.025f64).exp() + 1e9 * d;
        let got = f.estimate_ns(t0 + PENALTY_TAU);
        assert!((got - want).abs() < 1e3, "{got} != {want}");
    }

    #[test]
    fn penalised_peers_are_not_a_starting_estimate() {
        let now = Instant::now();
        // The only other endpoint is penalised (100 ms or more): the default.
        let eps = vec![ep(1, 0, 100.0), ep(1, 0, 3.0)];
        assert_eq!(peer_estimate(&eps, 1, now), DEFAULT_RTT.as_nanos() as f64);
        let eps = vec![ep(1, 0, 99.0), ep(1, 0, 3.0)];
        assert_eq!(peer_estimate(&eps, 1, now), 99e6);
        // The endpoint itself does not count.
        assert_eq!(peer_estimate(&eps, 0, now), 3e6);
    }

    proptest! {
        #[test]
        fn never_picks_an_unavailable_endpoint_while_one_is_available(
            eps in proptest::collection::vec((1u32..10, 0u32..20, 0.1f64..100.0, any::<bool>()), 1..8),
            policy in 0usize..4,
        ) {
            let eps: Vec<Ep> = eps.into_iter().map(|(w, f, l, a)| Ep { weight: w, in_flight: f, latency: l * 1e6, available: a, ramp_since: None }).collect();
            let weights: Vec<u32> = eps.iter().map(|e| e.weight).collect();
            let ids: Vec<String> = (0..eps.len()).map(|i| format!("e{i}")).collect();
            let refs: Vec<&str> = ids.iter().map(|s| s.as_str()).collect();
            let b = match policy { 0 => Balancer::Ewma, 1 => Balancer::LeastRequest, 2 => Balancer::ring_hash(&refs, &weights), _ => Balancer::round_robin(&weights) };
            let any = eps.iter().any(|e| e.available);
            for k in 0..20u8 {
                match b.pick(&eps, &[], Instant::now(), Some(&[k])) {
                    Some(i) => prop_assert!(eps[i].available),
                    None => prop_assert!(!any),
                }
            }
        }
    }
}
