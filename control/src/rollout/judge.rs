//! The two decisions of a rollout, apart from any I/O: the split's weights at a canary
//! percent, and the verdict on a step from the canary's and the baseline's traffic.
//!
//! Weights are always written as percentages (they add up to 100): a sticky user's place
//! in the split is `hash % total` (see the proxy's `policy::split`), so a total that stays
//! the same from step to step is what keeps a user who saw the canary on it while it
//! grows (the canary being the first or last side does the rest; validation sees to it).
//!
//! A verdict compares, over the step's window and all proxies merged, the canary's error
//! rate with the baseline's (an absolute difference: 0.2% against 0.1% is not a doubling
//! worth a rollback) and its p99 with the baseline's (a relative one, with a floor in
//! milliseconds below which a difference is noise). No verdict before the canary served
//! `min_requests`: a handful of requests proves nothing either way.

use crate::traffic::Totals;
use serde::{Deserialize, Serialize};
use spur_config::Rollout;

/// One side's figures in a verdict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub requests: u64,
    /// Failed requests over requests (0 to 1).
    pub error_rate: f64,
    /// `None` without requests.
    pub p99_ms: Option<f64>,
}

impl Figures {
    pub fn of(t: &Totals) -> Figures {
        Figures {
            requests: t.requests,
            error_rate: if t.requests == 0 {
                0.0
            } else {
                round(t.errors.min(t.requests) as f64 / t.requests as f64, 6)
            },
            p99_ms: t.latency.quantile_ms(0.99).map(|p| round(p, 3)),
        }
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Pass or fail, and why in words (the fail reason goes into the history).
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub pass: bool,
    pub reason: String,
    pub canary: Figures,
    pub baseline: Figures,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The verdict on a step, or `None` while the canary has fewer than `min_requests`.
pub fn judge(spec: &Rollout, canary: &Totals, baseline: &Totals) -> Option<Judgement> {
    if canary.requests < spec.min_requests {
        return None;
    }
    let c = Figures::of(canary);
    let b = Figures::of(baseline);
    let errors = format!(
        "canary error rate {} vs baseline {}",
        pct(c.error_rate),
        pct(b.error_rate)
    );
    if c.error_rate - b.error_rate > spec.max_error_rate_increase.fraction() + 1e-9 {
        let reason = format!("{errors} (max +{})", spec.max_error_rate_increase);
        return Some(Judgement {
            pass: false,
            reason,
            canary: c,
            baseline: b,
        });
    }
    let floor_ms = spec.min_p99_increase.get().as_secs_f64() * 1000.0;
    let latency = match (c.p99_ms, b.p99_ms) {
        (Some(cp), Some(bp)) => {
            let text = format!("canary p99 {cp:.1} ms vs baseline {bp:.1} ms");
            let limit = bp * (1.0 + spec.max_p99_increase.fraction());
            if cp > limit && cp - bp > floor_ms {
                let reason = format!("{text} (max +{})", spec.max_p99_increase);
                return Some(Judgement {
                    pass: false,
                    reason,
                    canary: c,
                    baseline: b,
                });
            }
            text
        }
        // No baseline traffic (it may be all but gone at a late step): nothing to compare.
        _ => "no baseline p99 to compare".to_string(),
    };
    Some(Judgement {
        pass: true,
        reason: format!("{errors}, {latency}"),
        canary: c,
        baseline: b,
    })
}

/// The split's weights with the canary (side `canary`) at `percent`: the baseline sides
/// share the rest in proportion to `baseline` (their weights when the rollout started;
/// equally when those were all 0), largest remainders first so the total is exactly 100.
pub fn weights(baseline: &[u32], canary: usize, percent: u32) -> Vec<u32> {
    let percent = percent.min(100);
    let rest = 100 - percent;
    let others: Vec<usize> = (0..baseline.len()).filter(|i| *i != canary).collect();
    let total: u64 = others.iter().map(|i| u64::from(baseline[*i])).sum();
    let share = |i: usize| -> u64 {
        if total == 0 {
            1
        } else {
            u64::from(baseline[i])
        }
    };
    let denom = if total == 0 {
        others.len() as u64
    } else {
        total
    };
    let mut out = vec![0u32; baseline.len()];
    if let Some(c) = out.get_mut(canary) {
        *c = percent;
    }
    if others.is_empty() || denom == 0 {
        return out;
    }
    let mut given = 0u32;
    let mut remainders = Vec::new();
    for &i in &others {
        let exact = u64::from(rest) * share(i);
        out[i] = (exact / denom) as u32;
        given += out[i];
        remainders.push((exact % denom, i));
    }
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders.into_iter().take((rest - given) as usize) {
        out[i] += 1;
    }
    out
}

/// The canary's share of a split in percent (rounded), as a user would read it.
pub fn canary_percent(weights: &[u32], canary: usize) -> u32 {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let c = weights.get(canary).copied().unwrap_or(0);
    if total == 0 {
        return 0;
    }
    ((u64::from(c) * 100 + total / 2) / total) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_config::report::Sketch;

    fn spec() -> Rollout {
        let cfg = spur_config::load(
            r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: r
        split: [{ cluster: a, weight: 1 }, { cluster: b, weight: 1 }]
clusters:
  - { name: a, endpoints: ["127.0.0.1:1"] }
  - { name: b, endpoints: ["127.0.0.1:2"] }
rollouts:
  x: { route: r, canary: b, steps: [10, 100], min_requests: 50 }
"#,
            Some("c.yaml"),
        )
        .unwrap();
        cfg.rollouts["x"].clone()
    }

    fn totals(requests: u64, errors: u64, ms: u64) -> Totals {
        let mut latency = Sketch::default();
        for _ in 0..requests {
            latency.record_micros(ms * 1000);
        }
        Totals {
            requests,
            errors,
            retries: 0,
            latency,
        }
    }

    #[test]
    fn no_verdict_before_min_requests() {
        assert_eq!(judge(&spec(), &totals(49, 49, 1), &totals(500, 0, 1)), None);
        assert!(
            judge(&spec(), &totals(50, 0, 1), &totals(500, 0, 1))
                .unwrap()
                .pass
        );
    }

    #[test]
    fn error_rate_fails_on_the_absolute_increase() {
        let j = judge(&spec(), &totals(100, 31, 2), &totals(1000, 2, 2)).unwrap();
        assert!(!j.pass);
        assert_eq!(
            j.reason,
            "canary error rate 31.0% vs baseline 0.2% (max +1%)"
        );
        assert_eq!((j.canary.error_rate, j.baseline.requests), (0.31, 1000));
        // 1% more errors is allowed; 2% more is not.
        assert!(
            judge(&spec(), &totals(100, 2, 2), &totals(100, 1, 2))
                .unwrap()
                .pass
        );
        assert!(
            !judge(&spec(), &totals(100, 3, 2), &totals(100, 1, 2))
                .unwrap()
                .pass
        );
        // A baseline without traffic counts as error-free.
        assert!(
            !judge(&spec(), &totals(100, 5, 2), &totals(0, 0, 0))
                .unwrap()
                .pass
        );
    }

    #[test]
    fn p99_fails_on_the_relative_increase_above_the_floor() {
        let slow = judge(&spec(), &totals(100, 0, 205), &totals(100, 0, 5)).unwrap();
        assert!(!slow.pass);
        assert!(
            slow.reason.starts_with("canary p99 2") && slow.reason.ends_with("(max +20%)"),
            "{}",
            slow.reason
        );
        // Three times slower, but 4 ms: under the 10 ms floor, noise.
        assert!(
            judge(&spec(), &totals(100, 0, 6), &totals(100, 0, 2))
                .unwrap()
                .pass
        );
        // 10% slower at 100 ms: within +20%.
        assert!(
            judge(&spec(), &totals(100, 0, 110), &totals(100, 0, 100))
                .unwrap()
                .pass
        );
    }

    #[test]
    fn weights_add_up_to_100_at_every_step() {
        assert_eq!(weights(&[90, 10], 1, 5), vec![95, 5]);
        assert_eq!(weights(&[90, 10], 1, 100), vec![0, 100]);
        assert_eq!(weights(&[90, 10], 1, 0), vec![100, 0]);
        assert_eq!(weights(&[0, 7], 0, 25), vec![25, 75]);
        assert_eq!(weights(&[1, 1, 0], 2, 25), vec![38, 37, 25]);
        assert_eq!(weights(&[0, 0, 0], 0, 1), vec![1, 50, 49]);
        for p in 0..=100 {
            let w = weights(&[3, 5, 7, 11], 3, p);
            assert_eq!(w.iter().sum::<u32>(), 100);
            assert_eq!(canary_percent(&w, 3), p);
        }
        assert_eq!(canary_percent(&[900, 100], 1), 10);
    }
}
