//! Rollouts: a canary ramped through steps by the control plane, each step judged against
//! the baseline before the next (SPEC, "Rollouts").
//!
//! A rollout names a route with a `split` and the split side that ramps (`canary`); the
//! other sides are the baseline. The control plane rewrites the split's weights at each
//! step (a new config version), compares the canary's error rate and p99 with the
//! baseline's over the step, and moves on, rolls back or pauses. The proxies read nothing
//! here: they only ever see the weights the control plane wrote.
//!
//! What is checked where: shapes and units when the config is read; that the route exists
//! once, has a split with the canary as its first or last side, and that the steps climb to
//! 100, in `validate::rollout`.

use crate::units::Duration;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// One rollout, as written under `rollouts.NAME`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The name of the route whose split ramps.
    pub route: String,
    /// The split side (a cluster name) that ramps; the other sides are the baseline.
    pub canary: String,
    /// Canary percent per step, ascending, the last one 100.
    pub steps: Vec<u32>,
    /// How long each step is judged.
    #[serde(default = "interval")]
    pub interval: Duration,
    /// Canary requests in a step before any verdict.
    #[serde(default = "min_requests")]
    pub min_requests: u64,
    /// Canary error rate minus baseline error rate, at most.
    #[serde(default = "max_error_rate_increase")]
    pub max_error_rate_increase: Percent,
    /// Canary p99 over baseline p99, at most.
    #[serde(default = "max_p99_increase")]
    pub max_p99_increase: Percent,
    /// A slower canary p99 fails a step only when it is also at least this much slower
    /// than the baseline's: on a fast service a few milliseconds are timer and scheduling
    /// noise, not a regression.
    #[serde(default = "min_p99_increase")]
    pub min_p99_increase: Duration,
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn interval() -> Duration {
    Duration::from_secs(30)
}
fn min_requests() -> u64 {
    50
}
fn max_error_rate_increase() -> Percent {
    Percent(1.0)
}
fn max_p99_increase() -> Percent {
    Percent(20.0)
}
fn min_p99_increase() -> Duration {
    Duration::from_millis(10)
}

/// What a failed step does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The canary goes back to 0% and the rollout ends `rolled_back`.
    #[default]
    Rollback,
    /// The weights stay; the rollout is `paused` until resumed or aborted.
    Pause,
}

/// A percentage, written `1%`, `0.5%` or as a bare number (`20`). Holds the percent
/// (`1.0` for `1%`), not the fraction.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Percent(pub f64);

impl Percent {
    /// The fraction: `0.01` for `1%`.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Percent, String> {
        let t = s.trim();
        let num = t.strip_suffix('%').unwrap_or(t).trim();
        match num.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Percent(v)),
            _ => Err(format!(
                "`{s}` is not a percentage (write e.g. `1%`, `20%`)"
            )),
        }
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Percent, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage such as `1%` or `20`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Percent, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Percent, E> {
                Ok(Percent(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Percent, E> {
                Ok(Percent(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Percent, E> {
                Ok(Percent(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a rollout's route is in a config: listener and route index, and the canary's
/// index among the split's sides. `None` when the config has no such single route with
/// the canary in its split (validation says which).
pub fn locate(cfg: &crate::Config, r: &Rollout) -> Option<(usize, usize, usize)> {
    let mut found = None;
    for (i, l) in cfg.listeners.iter().enumerate() {
        for (j, route) in l.routes.iter().enumerate() {
            if route.name.as_deref() == Some(r.route.as_str()) {
                if found.is_some() {
                    return None;
                }
                let side = route.split.iter().position(|s| s.cluster == r.canary)?;
                found = Some((i, j, side));
            }
        }
    }
    found
}
