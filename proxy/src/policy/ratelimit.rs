//! Rate limiting: the generic cell rate algorithm (GCRA), one bucket or one per key, with a
//! bounded key table.
//!
//! **Why GCRA.** It is a token bucket written as one number per bucket: the *theoretical
//! arrival time* (TAT) of the next request at the configured rate. A request at `now` is
//! allowed when `max(TAT, now) + T` is no further ahead of `now` than `burst · T` (T = the
//! emission interval, `per / requests`); it then becomes the new TAT. No refill timer, no
//! floating point, and one compare-and-swap for a single bucket. The wait a refused client
//! is told (`Retry-After`) falls out of the same comparison.
//!
//! **Why our own and not `governor`.** Both are GCRA with one atomic per bucket. Measured
//! in release on this machine (5 M checks, one thread): one bucket, 8.3 ns a check here
//! (the request path already holds `now`) against 14.8 ns for governor's direct limiter
//! (it reads its clock on every check); 100 000 keys cycling, 103 ns against 92 ns for
//! governor's keyed `DashMap` (the LRU list costs about 10%); and after a million distinct
//! keys, 100 000 buckets kept here (`max_keys`), 1.1 million there. What decided: governor's
//! keyed store is unbounded and must be pruned by hand (`retain_recent`), while a table that
//! a flood of distinct keys cannot grow is a requirement; and a group limit changes a
//! proxy's rate every second, which governor's quotas (fixed at construction) cannot do
//! without dropping every bucket's state. Here the rate is two atomics read on each check.
//!
//! **The key table** holds at most `max_keys` buckets: 16 shards, each a hash map to slots
//! on an intrusive least-recently-used list; a new key past the bound takes the slot of the
//! key used longest ago. A forgotten key starts with a full burst, which is what it would
//! have had anyway unless it was seen within one refill of being evicted. Keys are stored
//! as a 64-bit hash under a per-process random seed (no copy of the key is kept, and no
//! request allocates); two keys colliding would share a bucket, a chance of about one in
//! 10^10 with a million keys, which no client can aim for without the seed.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `remaining` more requests could come at once now.
    Allow { remaining: u64 },
    /// Over the limit: the earliest a request would be allowed is `wait` from now.
    Deny { wait: Duration },
}

impl Verdict {
    pub fn allowed(self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// One GCRA step: the new TAT, or how long until a request would fit.
pub fn gcra(tat: u64, now: u64, interval: u64, burst: u64) -> Result<u64, u64> {
    let next = tat.max(now).saturating_add(interval);
    let limit = now.saturating_add(interval.saturating_mul(burst));
    if next <= limit {
        Ok(next)
    } else {
        Err(next - limit)
    }
}

/// A rate limit's buckets and its current rate.
pub struct Limiter {
    /// The emission interval in nanoseconds (`per / requests`).
    interval_ns: AtomicU64,
    burst: AtomicU64,
    epoch: Instant,
    store: Store,
}

enum Store {
    One(AtomicU64),
    Keyed {
        shards: Box<[Mutex<Shard>]>,
        seed: std::collections::hash_map::RandomState,
    },
}

const SHARDS: usize = 16;

impl Limiter {
    /// `requests` per `per`, bursts of `burst`; `max_keys`: one bucket per key, at most that
    /// many (`None`: one bucket).
    pub fn new(requests: f64, per: Duration, burst: u32, max_keys: Option<u32>) -> Limiter {
        let store = match max_keys {
            None => Store::One(AtomicU64::new(0)),
            Some(max) => {
                let n = SHARDS.min(max.max(1) as usize);
                let cap = (max as usize).div_ceil(n);
                Store::Keyed {
                    shards: (0..n).map(|_| Mutex::new(Shard::new(cap))).collect(),
                    seed: Default::default(),
                }
            }
        };
        let l = Limiter {
            interval_ns: AtomicU64::new(1),
            burst: AtomicU64::new(1),
            epoch: crate::clock::now(),
            store,
        };
        l.set_rate(requests, per, burst);
        l
    }

    /// Changes the rate (a group share); every bucket keeps its state.
    pub fn set_rate(&self, requests: f64, per: Duration, burst: u32) {
        let interval = (per.as_nanos() as f64 / requests.max(1e-9)).clamp(1.0, 1e18) as u64;
        self.interval_ns.store(interval, Ordering::Relaxed);
        self.burst.store(u64::from(burst.max(1)), Ordering::Relaxed);
    }

    /// Checks (and on success, counts) a request with this key at `now`.
    pub fn check(&self, key: &[u8], now: Instant) -> Verdict {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let interval = self.interval_ns.load(Ordering::Relaxed);
        let burst = self.burst.load(Ordering::Relaxed);
        let step = |tat: u64| gcra(tat, now, interval, burst);
        let result = match &self.store {
            Store::One(tat) => {
                let mut cur = tat.load(Ordering::Relaxed);
                loop {
                    match step(cur) {
                        Ok(next) => match tat.compare_exchange_weak(
                            cur,
                            next,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        ) {
                            Ok(_) => break Ok(next),
                            Err(actual) => cur = actual,
                        },
                        Err(wait) => break Err(wait),
                    }
                }
            }
            Store::Keyed { shards, seed } => {
                let h = seed.hash_one(key);
                let shard = &shards[(h >> 59) as usize % shards.len()];
                shard.lock().unwrap().update(h, step)
            }
        };
        match result {
            Ok(tat) => Verdict::Allow {
                remaining: (now + interval * burst).saturating_sub(tat) / interval,
            },
            Err(wait) => Verdict::Deny {
                wait: Duration::from_nanos(wait),
            },
        }
    }

    /// Keys remembered now.
    pub fn keys(&self) -> usize {
        match &self.store {
            Store::One(_) => 1,
            Store::Keyed { shards, .. } => shards.iter().map(|s| s.lock().unwrap().map.len()).sum(),
        }
    }
}

/// A key hash is already uniform: hashing it again would only cost time.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

const NIL: u32 = u32::MAX;

struct Slot {
    key: u64,
    tat: u64,
    prev: u32,
    next: u32,
}

/// Buckets by key hash, at most `cap`, on a list from most to least recently used.
struct Shard {
    map: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    cap: usize,
}

impl Shard {
    fn new(cap: usize) -> Shard {
        Shard {
            map: HashMap::default(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            cap: cap.max(1),
        }
    }

    /// Runs `step` on the key's TAT (0 for a new key) and stores what it allows.
    fn update(&mut self, key: u64, step: impl Fn(u64) -> Result<u64, u64>) -> Result<u64, u64> {
        let i = match self.map.get(&key) {
            Some(&i) => {
                self.unlink(i);
                i
            }
            None => {
                let i = if self.slots.len() < self.cap {
                    self.slots.push(Slot {
                        key,
                        tat: 0,
                        prev: NIL,
                        next: NIL,
                    });
                    (self.slots.len() - 1) as u32
                } else {
                    // Full: the least recently used key gives its slot.
                    let i = self.tail;
                    self.unlink(i);
                    self.map.remove(&self.slots[i as usize].key);
                    let s = &mut self.slots[i as usize];
                    s.key = key;
                    s.tat = 0;
                    i
                };
                self.map.insert(key, i);
                i
            }
        };
        self.push_front(i);
        let slot = &mut self.slots[i as usize];
        let result = step(slot.tat);
        if let Ok(tat) = result {
            slot.tat = tat;
        }
        result
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn gcra_allows_a_burst_then_the_rate() {
        // 10 per second (T = 100 ms), bursts of 3.
        let (t, b) = (100 * MS, 3);
        let mut tat = 0;
        let now = 1_000 * MS;
        for _ in 0..3 {
            tat = gcra(tat, now, t, b).expect("within the burst");
        }
        assert_eq!(
            gcra(tat, now, t, b),
            Err(100 * MS),
            "the 4th waits one interval"
        );
        assert!(gcra(tat, now + 100 * MS, t, b).is_ok());
    }

    #[test]
    fn one_bucket_admits_the_rate_over_time() {
        let l = Limiter::new(20.0, Duration::from_secs(1), 5, None);
        let t0 = crate::clock::now();
        // 100 requests a second for 10 s: 5 (burst) + 20 a second.
        let mut allowed = 0;
        for i in 0..1000u64 {
            if l.check(b"", t0 + Duration::from_millis(i * 10)).allowed() {
                allowed += 1;
            }
        }
        assert!((200..=206).contains(&allowed), "{allowed}");
        match l.check(b"", t0 + Duration::from_millis(9_991)) {
            Verdict::Deny { wait } => assert!(wait <= Duration::from_millis(50), "{wait:?}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn remaining_counts_down_the_burst() {
        let l = Limiter::new(1.0, Duration::from_secs(1), 3, None);
        let t0 = crate::clock::now();
        let rem: Vec<_> = (0..4).map(|_| l.check(b"", t0)).collect();
        assert_eq!(rem[0], Verdict::Allow { remaining: 2 });
        assert_eq!(rem[2], Verdict::Allow { remaining: 0 });
        assert!(!rem[3].allowed());
    }

    #[test]
    fn keys_have_their_own_buckets_and_the_table_stays_bounded() {
        let l = Limiter::new(1.0, Duration::from_secs(60), 1, Some(1000));
        let t0 = crate::clock::now();
        assert!(l.check(b"a", t0).allowed());
        assert!(!l.check(b"a", t0).allowed());
        assert!(l.check(b"b", t0).allowed(), "another key, another bucket");
        for k in 0..100_000u32 {
            l.check(&k.to_le_bytes(), t0);
        }
        assert!(l.keys() <= 1008, "{} keys", l.keys());
        // `a` was evicted long ago: it starts afresh.
        assert!(l.check(b"a", t0).allowed());
    }

    #[test]
    fn the_key_table_fills_every_shard_to_its_bound() {
        // 1000 keys over 16 shards: 63 each, 1008 in all once a flood has filled them.
        let l = Limiter::new(1.0, Duration::from_secs(60), 1, Some(1000));
        let t0 = crate::clock::now();
        l.check(b"a", t0);
        l.check(b"b", t0);
        assert_eq!(l.keys(), 2);
        for k in 0..20_000u32 {
            l.check(&k.to_le_bytes(), t0);
        }
        assert_eq!(l.keys(), 1008);
        assert_eq!(Limiter::new(1.0, Duration::from_secs(1), 1, None).keys(), 1);
    }

    #[test]
    fn a_check_at_the_epoch_counts() {
        let l = Limiter::new(1.0, Duration::from_secs(1), 2, None);
        assert_eq!(l.check(b"", l.epoch), Verdict::Allow { remaining: 1 });
    }

    #[test]
    fn the_least_recently_used_key_goes_first() {
        let mut s = Shard::new(2);
        let allow = |t: u64| Ok(t + 1);
        s.update(1, allow).unwrap();
        s.update(2, allow).unwrap();
        s.update(1, allow).unwrap(); // 1 is now the most recent
        s.update(3, allow).unwrap(); // evicts 2
        assert!(s.map.contains_key(&1) && s.map.contains_key(&3));
        assert!(!s.map.contains_key(&2));
        assert_eq!(s.update(1, allow), Ok(3), "1 kept its state");
    }

    #[test]
    fn a_new_rate_applies_at_once_and_keeps_state() {
        let l = Limiter::new(1000.0, Duration::from_secs(1), 1, None);
        let t0 = crate::clock::now();
        assert!(l.check(b"", t0).allowed());
        l.set_rate(1.0, Duration::from_secs(1), 1);
        let t1 = t0 + Duration::from_millis(10);
        assert!(l.check(b"", t1).allowed());
        assert!(!l.check(b"", t1).allowed(), "one a second now");
        assert!(l.check(b"", t1 + Duration::from_millis(1001)).allowed());
    }
}
