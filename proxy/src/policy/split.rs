//! Weighted choice among a route's `split` targets, and the stable hash behind stickiness.
//!
//! With `hash_on`, the choice is a pure function of the key (a header or cookie value), so
//! the same user lands on the same side of a canary on every request and on every proxy.
//! Without a key, the choice is random in proportion to the weights.

use http::HeaderMap;

/// Where a sticky key comes from: `header:NAME` or `cookie:NAME` (parsed by spur-config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
}

impl From<&spur_config::HashOn> for HashOn {
    fn from(h: &spur_config::HashOn) -> HashOn {
        match h {
            spur_config::HashOn::Header(name) => HashOn::Header(name.clone()),
            spur_config::HashOn::Cookie(name) => HashOn::Cookie(name.as_str().to_string()),
        }
    }
}

impl HashOn {
    /// The key's bytes in this request, if it has one.
    pub fn key<'a>(&self, headers: &'a HeaderMap) -> Option<&'a [u8]> {
        match self {
            HashOn::Header(name) => headers.get(name).map(|v| v.as_bytes()),
            HashOn::Cookie(name) => cookie(headers, name).map(str::as_bytes),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// A stable 64-bit hash (FNV-1a, then a finalizer to spread the low bits). Stable across
/// processes, versions and platforms, unlike `std`'s `DefaultHasher`.
pub fn stable_hash(seed: u64, key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Picks an index in proportion to `weights` at position `point` in `[0, total)`.
pub fn pick_weighted(weights: &[u32], point: u64) -> usize {
    let mut acc = 0u64;
    for (i, w) in weights.iter().enumerate() {
        acc += u64::from(*w);
        if point < acc {
            return i;
        }
    }
    weights.len().saturating_sub(1)
}

/// Chooses a split target: sticky when a key is given, random otherwise.
/// `weights` must add up to `total > 0`.
pub fn choose(weights: &[u32], total: u64, key: Option<&[u8]>) -> usize {
    choose_with(weights, total, key, &mut fastrand::Rng::new())
}

/// [`choose`], drawing from `rng` when there is no key.
pub fn choose_with(
    weights: &[u32],
    total: u64,
    key: Option<&[u8]>,
    rng: &mut fastrand::Rng,
) -> usize {
    let point = match key {
        Some(k) => stable_hash(0x5b11_7000, k) % total,
        None => rng.u64(0..total),
    };
    pick_weighted(weights, point)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stable_hash_is_stable_across_releases() {
        // Sticky splits and flag percentages must put a user on the same side after an
        // upgrade, and every proxy of a group must agree: these values never change.
        assert_eq!(stable_hash(0, b"user-1"), 14166554182431137624);
        assert_eq!(stable_hash(0x7269_6e67, b"alice"), 13596344966509815848);
    }

    #[test]
    fn points_at_a_boundary_go_to_the_next_side() {
        // Weights 90/10 over [0, 100): 0..=89 the first side, 90..=99 the second.
        assert_eq!(pick_weighted(&[90, 10], 0), 0);
        assert_eq!(pick_weighted(&[90, 10], 89), 0);
        assert_eq!(pick_weighted(&[90, 10], 90), 1);
        assert_eq!(pick_weighted(&[90, 10], 99), 1);
        // A side of weight 0 gets no point.
        assert_eq!(pick_weighted(&[0, 5], 0), 1);
    }

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1; beta=yes".parse().unwrap());
        h.append("cookie", "c=\"q\"".parse().unwrap());
        assert_eq!(cookie(&h, "beta"), Some("yes"));
        assert_eq!(cookie(&h, "c"), Some("q"));
        assert_eq!(cookie(&h, "b"), None);
        let spec: spur_config::Parsed<spur_config::HashOn> = "cookie:beta".parse().unwrap();
        assert_eq!(HashOn::from(spec.get()).key(&h), Some(&b"yes"[..]));
    }

    #[test]
    fn shares_follow_weights() {
        let weights = [90, 10];
        let mut counts = [0u32; 2];
        for i in 0..20_000u32 {
            counts[choose(&weights, 100, Some(format!("user-{i}").as_bytes()))] += 1;
        }
        let share = f64::from(counts[1]) / 20_000.0;
        assert!((share - 0.10).abs() < 0.01, "sticky share {share}");
        let mut counts = [0u32; 2];
        for _ in 0..20_000 {
            counts[choose(&weights, 100, None)] += 1;
        }
        let share = f64::from(counts[1]) / 20_000.0;
        assert!((share - 0.10).abs() < 0.015, "random share {share}");
    }

    proptest! {
        #[test]
        fn sticky_choice_is_stable_and_never_picks_zero_weight(
            weights in proptest::collection::vec(0u32..100, 1..6),
            key in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
            prop_assume!(total > 0);
            let a = choose(&weights, total, Some(&key));
            prop_assert_eq!(a, choose(&weights, total, Some(&key)));
            prop_assert!(weights[a] > 0);
            let r = choose(&weights, total, None);
            prop_assert!(weights[r] > 0);
        }
    }
}
