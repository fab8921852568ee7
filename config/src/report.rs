//! What a proxy tells the control plane about its traffic, every 2 s with its status report:
//! per route and split side, requests, errors, retries and a latency [`Sketch`]; per cluster,
//! its endpoints and how many are ejected. Also the tap line a sampled request becomes.
//!
//! Both ends use these types, so the proxy and the control plane cannot disagree on the
//! latency buckets. Why a fixed-bucket histogram rather than a few quantiles: quantiles
//! cannot be added, and the control plane must combine many proxies and many 2 s reports
//! into one p99 for a window (the console's charts, a rollout's verdict on the canary side
//! against the baseline). Counts in fixed buckets add up exactly across proxies and time;
//! the price is a bounded relative error, here at most a quarter of a bucket's lower bound
//! (log-linear buckets, four per power of two), less with interpolation inside a bucket.

use serde::{Deserialize, Serialize};

/// Latency buckets of a [`Sketch`]: bucket 0 holds everything up to 128 µs; then four
/// buckets per power of two of microseconds (see [`bucket_of`]), the last one open-ended
/// (past about 100 s).
pub const BUCKETS: usize = 80;

/// The bucket of a duration in microseconds: a few integer operations, cheap enough for
/// every request.
#[inline]
pub fn bucket_of(micros: u64) -> usize {
    if micros < 128 {
        return 0;
    }
    let k = 63 - micros.leading_zeros() as usize; // 7.. for >= 128
    let quarter = ((micros >> (k - 2)) & 3) as usize;
    (4 * (k - 7) + quarter + 1).min(BUCKETS - 1)
}

/// The bounds of bucket `i` in microseconds: `(low, high]`.
pub fn bucket_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        return (0.0, 128.0);
    }
    let k = (i - 1) / 4 + 7;
    let q = ((i - 1) % 4) as f64;
    let base = (1u64 << k) as f64;
    (base * (1.0 + q / 4.0), base * (1.0 + (q + 1.0) / 4.0))
}

/// A latency histogram in [`BUCKETS`] fixed buckets. On the wire: the non-empty buckets as
/// `[[index, count], ...]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u16, u64)>", into = "Vec<(u16, u64)>")]
pub struct Sketch {
    pub counts: [u64; BUCKETS],
}

impl Default for Sketch {
    fn default() -> Sketch {
        Sketch {
            counts: [0; BUCKETS],
        }
    }
}

impl From<Vec<(u16, u64)>> for Sketch {
    fn from(sparse: Vec<(u16, u64)>) -> Sketch {
        let mut s = Sketch::default();
        for (i, n) in sparse {
            // An index past the last bucket (a newer proxy) counts in the open-ended one.
            let i = (i as usize).min(BUCKETS - 1);
            s.counts[i] = s.counts[i].saturating_add(n);
        }
        s
    }
}

impl From<Sketch> for Vec<(u16, u64)> {
    fn from(s: Sketch) -> Vec<(u16, u64)> {
        s.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i as u16, *n))
            .collect()
    }
}

impl Sketch {
    pub fn record_micros(&mut self, micros: u64) {
        self.counts[bucket_of(micros)] += 1;
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1) in milliseconds, interpolated inside its bucket; `None`
    /// without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, n) in self.counts.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let (lo, hi) = bucket_bounds(i);
                // The open-ended bucket has no upper bound: its lower bound is all we know.
                let hi = if i == BUCKETS - 1 { lo } else { hi };
                let within = (rank - below as f64) / *n as f64;
                return Some((lo + (hi - lo) * within) / 1000.0);
            }
            below += n;
        }
        None
    }
}

/// One proxy's traffic since its previous accepted report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// Requests by listener, route and cluster (a split's sides apart), with any counted.
    #[serde(default)]
    pub targets: Vec<TargetCounts>,
    /// Every cluster of the proxy's config, now.
    #[serde(default)]
    pub clusters: Vec<ClusterState>,
}

/// Requests answered for one route and one of its clusters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetCounts {
    pub listener: String,
    /// The route's name (`default` for a listener's default cluster).
    pub route: String,
    pub cluster: String,
    /// The index of this cluster among the route's split sides (`None`: no split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<u32>,
    pub requests: u64,
    /// Requests that failed: a 5xx status (Spur's own included) or no response at all.
    pub errors: u64,
    /// Tries after the first.
    pub retries: u64,
    /// Each request's duration, from received to the end of the response body.
    #[serde(default)]
    pub latency: Sketch,
}

/// A cluster as the proxy sees it at report time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    pub cluster: String,
    pub endpoints: u32,
    /// Endpoints ejected by outlier detection now.
    pub ejected: u32,
}

/// One sampled request, as a proxy sends it (`POST .../proxies/{node}/tap`, one JSON
/// object a line) and as `GET .../tap` streams it (with `node` added by the control plane).
/// No header values and no bodies, ever: only what the access log's summary fields say.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TapLine {
    /// Unix milliseconds at the end of the response.
    pub ts: u64,
    #[serde(default)]
    pub node: String,
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    pub route: String,
    pub cluster: String,
    pub endpoint: String,
    pub status: u16,
    #[serde(default)]
    pub grpc_status: Option<u16>,
    pub duration_ms: f64,
    /// The flags on for the request.
    #[serde(default)]
    pub flags: Vec<String>,
    /// The split side (index among the route's split) the request went to.
    #[serde(default)]
    pub split: Option<u32>,
    pub attempts: u32,
    /// Spur's own reason (`x-spur-error`), when Spur answered or cut the response.
    #[serde(default)]
    pub error: Option<String>,
}

/// What a tap asks the proxies to sample: requests matching any filter (an empty filter
/// matches every request).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusFilter>,
}

/// What the control plane asks a group's proxies over the watch stream (a line
/// `{"tap": {...}}`): sample requests matching any of `filters` for `ttl_ms` (renewed while
/// someone watches), or stop (`on: false`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapOrder {
    pub on: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<TapFilter>,
    #[serde(default)]
    pub ttl_ms: u64,
}

/// `5xx` (a class) or `503` (one status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StatusFilter {
    Class(u8),
    Exact(u16),
}

impl StatusFilter {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Class(c) => status / 100 == u16::from(c),
            StatusFilter::Exact(s) => status == s,
        }
    }
}

impl TryFrom<String> for StatusFilter {
    type Error = String;
    fn try_from(s: String) -> Result<StatusFilter, String> {
        s.parse()
    }
}

impl std::str::FromStr for StatusFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<StatusFilter, String> {
        let bad = || format!("`{s}` is not a status (503) or a class of them (5xx)");
        let b = s.as_bytes();
        match b {
            [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => Ok(StatusFilter::Class(c - b'0')),
            [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => {
                Ok(StatusFilter::Exact(s.parse().map_err(|_| bad())?))
            }
            _ => Err(bad()),
        }
    }
}

impl From<StatusFilter> for String {
    fn from(f: StatusFilter) -> String {
        match f {
            StatusFilter::Class(c) => format!("{c}xx"),
            StatusFilter::Exact(s) => s.to_string(),
        }
    }
}

impl TapFilter {
    pub fn matches(&self, route: &str, status: u16) -> bool {
        self.route.as_deref().is_none_or(|r| r == route)
            && self.status.is_none_or(|s| s.matches(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_duration_in_order() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            127,
            128,
            159,
            160,
            255,
            256,
            1000,
            10_000,
            1_000_000,
            u64::MAX,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "{us} µs went back to bucket {b}");
            last = b;
            let (lo, hi) = bucket_bounds(b);
            if b > 0 && b < BUCKETS - 1 {
                assert!(
                    us as f64 >= lo && (us as f64) < hi,
                    "{us} not in {lo}..{hi}"
                );
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // Bucket width stays within a quarter of the bucket's lower bound.
        for i in 1..BUCKETS - 1 {
            let (lo, hi) = bucket_bounds(i);
            assert!((hi - lo) / lo <= 0.25 + 1e-9);
            assert_eq!(
                bucket_bounds(i + 1).0,
                hi,
                "buckets {i} and {} touch",
                i + 1
            );
        }
    }

    #[test]
    fn quantiles_of_merged_sketches_are_close() {
        let mut a = Sketch::default();
        let mut b = Sketch::default();
        for ms in 1..=900u64 {
            a.record_micros(ms * 1000 / 10); // 0.1 .. 90 ms
        }
        for _ in 0..100 {
            b.record_micros(500_000); // 500 ms
        }
        a.merge(&b);
        assert_eq!(a.total(), 1000);
        let p50 = a.quantile_ms(0.5).unwrap();
        assert!((40.0..=56.0).contains(&p50), "p50 {p50}");
        let p99 = a.quantile_ms(0.99).unwrap();
        assert!((450.0..=560.0).contains(&p99), "p99 {p99}");
        assert_eq!(Sketch::default().quantile_ms(0.99), None);
    }

    #[test]
    fn sketches_travel_sparse() {
        let mut s = Sketch::default();
        s.record_micros(2000);
        s.record_micros(2000);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(text, format!("[[{},2]]", bucket_of(2000)));
        assert_eq!(serde_json::from_str::<Sketch>(&text).unwrap(), s);
        let far: Sketch = serde_json::from_str("[[500,3]]").unwrap();
        assert_eq!(far.counts[BUCKETS - 1], 3);
    }

    #[test]
    fn status_filters_parse_and_match() {
        let f: StatusFilter = "5xx".parse().unwrap();
        assert!(f.matches(503) && !f.matches(404));
        let f: StatusFilter = "404".parse().unwrap();
        assert!(f.matches(404) && !f.matches(403));
        for bad in ["6xx", "5x", "abc", "", "99"] {
            assert!(bad.parse::<StatusFilter>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_edges_are_exact() {
        // (micros, bucket): 0 up to 127; then four per power of two from 128.
        for (us, b) in [
            (127, 0),
            (128, 1),
            (159, 1),
            (160, 2),
            (191, 2),
            (192, 3),
            (224, 4),
            (255, 4),
            (256, 5),
            (320, 6),
            (511, 8),
            (512, 9),
        ] {
            assert_eq!(bucket_of(us), b, "{us} µs");
        }
        assert_eq!(bucket_bounds(0), (0.0, 128.0));
        assert_eq!(bucket_bounds(1), (128.0, 160.0));
        assert_eq!(bucket_bounds(4), (224.0, 256.0));
        assert_eq!(bucket_bounds(5), (256.0, 320.0));
        // The last bucket starts where the one before it ends, past 100 s.
        let (lo, _) = bucket_bounds(BUCKETS - 1);
        assert_eq!(lo, bucket_bounds(BUCKETS - 2).1);
        assert!(lo > 100e6, "{lo}");
        assert_eq!(bucket_of(lo as u64), BUCKETS - 1);
        assert_eq!(bucket_of(lo as u64 - 1), BUCKETS - 2);
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket_and_stop_at_the_open_one() {
        // Four samples in bucket 1 (128..160 µs): the quantiles step a quarter of it each.
        let mut s = Sketch::default();
        for _ in 0..4 {
            s.record_micros(130);
        }
        assert_eq!(s.quantile_ms(0.25), Some(0.136));
        assert_eq!(s.quantile_ms(0.5), Some(0.144));
        assert_eq!(s.quantile_ms(1.0), Some(0.16));
        // Out of range asks are clamped; the least rank is the first sample.
        assert_eq!(s.quantile_ms(2.0), Some(0.16));
        assert_eq!(s.quantile_ms(0.0), Some(0.136));
        assert_eq!(s.quantile_ms(-1.0), Some(0.136));
        // A rank exactly at a bucket's end is in that bucket, not the next.
        s.record_micros(1000);
        s.record_micros(1000);
        s.record_micros(1000);
        s.record_micros(1000);
        assert_eq!(s.quantile_ms(0.5), Some(0.16));
        // The open-ended bucket reports its lower bound.
        let mut far = Sketch::default();
        far.record_micros(u64::MAX);
        far.record_micros(u64::MAX);
        let lo = bucket_bounds(BUCKETS - 1).0 / 1000.0;
        assert_eq!(far.quantile_ms(0.5), Some(lo));
        assert_eq!(far.quantile_ms(1.0), Some(lo));
    }

    #[test]
    fn counts_saturate_when_added() {
        let mut a = Sketch::default();
        a.counts[3] = u64::MAX - 1;
        let mut b = Sketch::default();
        b.counts[3] = 5;
        b.counts[4] = 2;
        a.merge(&b);
        assert_eq!((a.counts[3], a.counts[4]), (u64::MAX, 2));
        let s: Sketch = serde_json::from_str("[[2,1],[2,2],[79,3],[90,4]]").unwrap();
        assert_eq!((s.counts[2], s.counts[BUCKETS - 1], s.total()), (3, 7, 10));
        let s: Sketch = serde_json::from_str(&format!("[[1,{}],[1,9]]", u64::MAX)).unwrap();
        assert_eq!(s.counts[1], u64::MAX);
    }

    #[test]
    fn status_filters_cover_each_class_and_travel_as_text() {
        for (text, filter, back) in [
            ("1xx", StatusFilter::Class(1), "1xx"),
            ("5XX", StatusFilter::Class(5), "5xx"),
            ("4xX", StatusFilter::Class(4), "4xx"),
            ("100", StatusFilter::Exact(100), "100"),
            ("599", StatusFilter::Exact(599), "599"),
            ("200", StatusFilter::Exact(200), "200"),
        ] {
            let f: StatusFilter = text.parse().unwrap();
            assert_eq!(f, filter, "{text}");
            assert_eq!(String::from(f), back);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{back}\""));
            assert_eq!(serde_json::from_str::<StatusFilter>(&json).unwrap(), f);
        }
        for bad in ["0xx", "6xx", "600", "099", "5xy", "5000", "50", "5 0"] {
            let e = bad.parse::<StatusFilter>().unwrap_err();
            assert_eq!(
                e,
                format!("`{bad}` is not a status (503) or a class of them (5xx)")
            );
        }
        assert!(serde_json::from_str::<StatusFilter>("\"7xx\"").is_err());
        let four = StatusFilter::Class(4);
        assert!(four.matches(400) && four.matches(499));
        assert!(!four.matches(399) && !four.matches(500));
    }

    #[test]
    fn a_tap_filter_needs_each_part_it_names() {
        let any = TapFilter::default();
        assert!(any.matches("a", 200) && any.matches("b", 503));
        let route = TapFilter {
            route: Some("a".into()),
            status: None,
        };
        assert!(route.matches("a", 200) && !route.matches("b", 200));
        let both = TapFilter {
            route: Some("a".into()),
            status: Some(StatusFilter::Class(5)),
        };
        assert!(both.matches("a", 503));
        assert!(!both.matches("a", 200) && !both.matches("b", 503));
        let status = TapFilter {
            route: None,
            status: Some(StatusFilter::Exact(404)),
        };
        assert!(status.matches("x", 404) && !status.matches("x", 403));
    }
}
