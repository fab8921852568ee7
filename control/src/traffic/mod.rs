//! The group's traffic as its proxies report it: per route and split side, and per
//! cluster, requests, errors, retries and latency in 2 s slots for the last
//! [`KEEP_SECS`]; answered as time series by `GET /v1/groups/{group}/traffic` (the
//! console's traffic page, `spur top`), and as window totals by [`Traffic::totals`] (what a
//! rollout's verdict compares: the canary side against the baseline, all proxies merged).
//!
//! Each report is a proxy's delta since its previous accepted one, added into the slot of
//! the moment it arrives: the control plane's clock decides, so proxies' clocks never
//! skew a chart, and no report is counted twice or needs to be matched to another. Latency
//! is a fixed-bucket [`Sketch`]: the sketches of many proxies and slots add up exactly into
//! one p50/p99.
//!
//! Bounds: anyone with the API token can report, so a group keeps at most [`MAX_SERIES`]
//! series, the control plane at most [`MAX_GROUPS`] groups, and names are cut to
//! [`MAX_NAME`] bytes; slots older than [`KEEP_SECS`] are dropped at every report.

pub mod tap;

use serde::Serialize;
use serde_json::{json, Value};
use spur_config::report::{Sketch, Traffic as Report};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// Seconds per slot: the proxies' report interval.
pub const SLOT_SECS: u64 = 2;
/// How far back slots are kept (the console charts the last 15 minutes).
pub const KEEP_SECS: u64 = 16 * 60;
/// The live figures cover this many seconds before the current slot.
pub const NOW_SECS: u64 = 10;
pub const MAX_SERIES: usize = 1000;
pub const MAX_GROUPS: usize = 1000;
pub const MAX_NAME: usize = 200;

/// One route's cluster (a split side) across the group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SeriesKey {
    pub listener: String,
    pub route: String,
    pub cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<u32>,
}

/// Counts over some time: one slot, a step of a chart, a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub retries: u64,
    pub latency: Sketch,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.retries += o.retries;
        self.latency.merge(&o.latency);
    }

    /// The figures a person reads: rate over `secs`, success rate, p50, p99, retries.
    pub fn figures(&self, secs: u64) -> Value {
        let success = (self.requests > 0).then(|| 1.0 - self.errors as f64 / self.requests as f64);
        json!({
            "requests": self.requests,
            "rps": round(self.requests as f64 / secs.max(1) as f64),
            "success_rate": success.map(round),
            "p50_ms": self.latency.quantile_ms(0.5).map(round),
            "p99_ms": self.latency.quantile_ms(0.99).map(round),
            "retries": self.retries,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Slots of one series, oldest first; each `(slot number, counts)`.
#[derive(Default)]
struct Series(VecDeque<(u64, Totals)>);

impl Series {
    fn slot(&mut self, at: u64) -> &mut Totals {
        if self.0.back().is_none_or(|(s, _)| *s < at) {
            self.0.push_back((at, Totals::default()));
        }
        // Reports arrive in time order; an older slot (clock stepped back) folds into the
        // newest.
        &mut self.0.back_mut().expect("just pushed").1
    }

    fn prune(&mut self, oldest: u64) {
        while self.0.front().is_some_and(|(s, _)| *s < oldest) {
            self.0.pop_front();
        }
    }

    fn sum(&self, from: u64, to: u64) -> Totals {
        let mut t = Totals::default();
        for (_, c) in self.0.iter().filter(|(s, _)| *s >= from && *s < to) {
            t.add(c);
        }
        t
    }
}

/// A cluster's endpoints and ejections as each proxy last reported them.
#[derive(Default)]
struct ClusterSeen {
    /// node -> (slot of its last report, endpoints, ejected)
    nodes: BTreeMap<String, (u64, u32, u32)>,
    /// Ejected endpoints (summed over proxies) per slot.
    ejected: VecDeque<(u64, u32)>,
}

#[derive(Default)]
struct Group {
    series: BTreeMap<SeriesKey, Series>,
    clusters: BTreeMap<String, ClusterSeen>,
}

/// Every group's traffic (in [`crate::Control`]).
#[derive(Default)]
pub struct Traffic {
    groups: Mutex<HashMap<String, Group>>,
    /// Tap: live sampled requests.
    pub taps: tap::Taps,
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_NAME {
        return s.to_string();
    }
    let mut end = MAX_NAME;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Traffic {
    /// Adds one proxy's report, received at `now` (Unix seconds).
    pub fn ingest(&self, group: &str, node: &str, report: &Report, now: u64) {
        let slot = now / SLOT_SECS;
        let oldest = (now.saturating_sub(KEEP_SECS)) / SLOT_SECS;
        let mut groups = self.groups.lock().unwrap();
        if !groups.contains_key(group) && groups.len() >= MAX_GROUPS {
            return;
        }
        let g = groups.entry(group.to_string()).or_default();
        for t in &report.targets {
            let key = SeriesKey {
                listener: cut(&t.listener),
                route: cut(&t.route),
                cluster: cut(&t.cluster),
                side: t.side,
            };
            if !g.series.contains_key(&key) && g.series.len() >= MAX_SERIES {
                continue;
            }
            let s = g.series.entry(key).or_default().slot(slot);
            s.add(&Totals {
                requests: t.requests,
                errors: t.errors.min(t.requests),
                retries: t.retries,
                latency: t.latency.clone(),
            });
        }
        for c in report.clusters.iter().take(MAX_SERIES) {
            let name = cut(&c.cluster);
            if !g.clusters.contains_key(&name) && g.clusters.len() >= MAX_SERIES {
                continue;
            }
            let seen = g.clusters.entry(name).or_default();
            seen.nodes
                .insert(cut(node), (slot, c.endpoints, c.ejected.min(c.endpoints)));
            let total: u32 = seen
                .nodes
                .values()
                .filter(|(s, _, _)| *s + NOW_SECS / SLOT_SECS >= slot)
                .map(|(_, _, e)| *e)
                .sum();
            match seen.ejected.back_mut() {
                Some((s, e)) if *s == slot => *e = (*e).max(total),
                _ => seen.ejected.push_back((slot, total)),
            }
        }
        for s in g.series.values_mut() {
            s.prune(oldest);
        }
        g.series.retain(|_, s| !s.0.is_empty());
        for c in g.clusters.values_mut() {
            while c.ejected.front().is_some_and(|(s, _)| *s < oldest) {
                c.ejected.pop_front();
            }
            c.nodes.retain(|_, (s, _, _)| *s >= oldest);
        }
        g.clusters.retain(|_, c| !c.nodes.is_empty());
    }

    /// Every series' totals over `[from, to)` (Unix seconds), all proxies merged.
    pub fn totals(&self, group: &str, from: u64, to: u64) -> BTreeMap<SeriesKey, Totals> {
        let groups = self.groups.lock().unwrap();
        let Some(g) = groups.get(group) else {
            return BTreeMap::new();
        };
        g.series
            .iter()
            .map(|(k, s)| (k.clone(), s.sum(from / SLOT_SECS, to.div_ceil(SLOT_SECS))))
            .collect()
    }

    /// `GET /v1/groups/{group}/traffic`: per route and per cluster, the live figures (the
    /// last [`NOW_SECS`] of complete slots), the window's totals and its time series in
    /// steps of `step` seconds, the newest step last.
    pub fn doc(&self, group: &str, window: u64, step: u64, now: u64) -> Value {
        let groups = self.groups.lock().unwrap();
        let empty = Group::default();
        let g = groups.get(group).unwrap_or(&empty);
        let current = now / SLOT_SECS; // incomplete: left out of the live figures
        let per_step = (step / SLOT_SECS).max(1);
        let steps = window.div_ceil(step).max(1);
        let end = current + 1;
        let start = end.saturating_sub(steps * per_step);
        let live_from = current.saturating_sub(NOW_SECS / SLOT_SECS);
        let line = |sum: &dyn Fn(u64, u64) -> Totals| {
            let series: Vec<Value> = (0..steps)
                .map(|i| {
                    let from = start + i * per_step;
                    let mut p = sum(from, from + per_step).figures(per_step * SLOT_SECS);
                    p["ts"] = json!(from * SLOT_SECS);
                    p
                })
                .collect();
            json!({
                "now": sum(live_from, current).figures(NOW_SECS),
                "total": sum(start, end).figures(window),
                "series": series,
            })
        };
        let routes: Vec<Value> = g
            .series
            .iter()
            .map(|(k, s)| {
                let mut v = line(&|a, b| s.sum(a, b));
                v["listener"] = json!(k.listener);
                v["route"] = json!(k.route);
                v["cluster"] = json!(k.cluster);
                v["side"] = json!(k.side);
                v
            })
            .collect();
        let mut names: Vec<&String> = g.clusters.keys().collect();
        for k in g.series.keys() {
            if !g.clusters.contains_key(&k.cluster) {
                names.push(&k.cluster);
            }
        }
        names.sort();
        names.dedup();
        let clusters: Vec<Value> = names
            .into_iter()
            .map(|name| {
                let of_cluster: Vec<&Series> = g
                    .series
                    .iter()
                    .filter(|(k, _)| &k.cluster == name)
                    .map(|(_, s)| s)
                    .collect();
                let mut v = line(&|a, b| {
                    let mut t = Totals::default();
                    for s in &of_cluster {
                        t.add(&s.sum(a, b));
                    }
                    t
                });
                v["cluster"] = json!(name);
                if let Some(seen) = g.clusters.get(name) {
                    let fresh = |s: &u64| *s + NOW_SECS / SLOT_SECS >= current;
                    let (eps, ej) = seen
                        .nodes
                        .values()
                        .filter(|(s, _, _)| fresh(s))
                        .fold((0u32, 0u32), |(a, b), (_, e, j)| (a.max(*e), b + j));
                    v["endpoints"] = json!(eps);
                    v["ejected"] = json!(ej);
                    if let Some(points) = v["series"].as_array_mut() {
                        for p in points {
                            let ts = p["ts"].as_u64().unwrap_or(0) / SLOT_SECS;
                            let e = seen
                                .ejected
                                .iter()
                                .filter(|(s, _)| *s >= ts && *s < ts + per_step)
                                .map(|(_, e)| *e)
                                .max();
                            p["ejected"] = json!(e);
                        }
                    }
                }
                v
            })
            .collect();
        json!({
            "group": group,
            "window_s": window,
            "step_s": per_step * SLOT_SECS,
            "now": now,
            "routes": routes,
            "clusters": clusters,
        })
    }
}

/// `window=15m&step=10s` (both optional): the window (at most [`KEEP_SECS`] less a
/// minute) and the step of its series (by default 90 steps), in seconds.
pub fn window_and_step(query: Option<&str>) -> Result<(u64, u64), (String, String)> {
    let mut window = 15 * 60;
    let mut step = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let secs = || {
            v.parse::<spur_config::Duration>()
                .map(|d| d.get().as_secs())
                .map_err(|e| (k.to_string(), format!("`{v}`: {e}")))
        };
        match k {
            "window" => window = secs()?,
            "step" => step = Some(secs()?),
            _ => {}
        }
    }
    let max = KEEP_SECS - 60;
    if !(SLOT_SECS..=max).contains(&window) {
        return Err((
            "window".into(),
            format!("must be between {SLOT_SECS}s and {}m", max / 60),
        ));
    }
    let step = step.unwrap_or_else(|| (window / 90).max(SLOT_SECS));
    if step < SLOT_SECS || step > window {
        return Err((
            "step".into(),
            format!("must be between {SLOT_SECS}s and the window"),
        ));
    }
    Ok((window, step.div_ceil(SLOT_SECS) * SLOT_SECS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_config::report::{ClusterState, TargetCounts};

    fn report(route: &str, side: Option<u32>, requests: u64, errors: u64, ms: u64) -> Report {
        let mut latency = Sketch::default();
        for _ in 0..requests {
            latency.record_micros(ms * 1000);
        }
        Report {
            targets: vec![TargetCounts {
                listener: "web".into(),
                route: route.into(),
                cluster: format!("c{}", side.unwrap_or(0)),
                side,
                requests,
                errors,
                retries: 1,
                latency,
            }],
            clusters: vec![ClusterState {
                cluster: format!("c{}", side.unwrap_or(0)),
                endpoints: 2,
                ejected: 1,
            }],
        }
    }

    #[test]
    fn reports_of_many_proxies_merge_into_one_series() {
        let t = Traffic::default();
        let now = 1_000_000;
        t.ingest("g", "a", &report("api", Some(1), 10, 1, 5), now - 6);
        t.ingest("g", "b", &report("api", Some(1), 30, 3, 50), now - 5);
        t.ingest("g", "a", &report("api", Some(0), 5, 0, 5), now - 4);
        let totals = t.totals("g", now - 10, now);
        let canary = totals.iter().find(|(k, _)| k.side == Some(1)).unwrap().1;
        assert_eq!((canary.requests, canary.errors, canary.retries), (40, 4, 2));
        let p99 = canary.latency.quantile_ms(0.99).unwrap();
        assert!((45.0..=60.0).contains(&p99), "{p99}");
        let doc = t.doc("g", 60, 10, now);
        assert_eq!(doc["routes"].as_array().unwrap().len(), 2);
        let canary = &doc["routes"][1];
        assert_eq!(canary["side"], 1);
        assert_eq!(canary["total"]["requests"], 40);
        assert_eq!(canary["now"]["success_rate"], 0.9);
        assert_eq!(canary["series"].as_array().unwrap().len(), 6);
        let c1 = doc["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cluster"] == "c1")
            .unwrap();
        assert_eq!(
            (c1["ejected"].as_u64(), c1["endpoints"].as_u64()),
            (Some(2), Some(2))
        );
        // Old slots go.
        t.ingest(
            "g",
            "a",
            &report("api", Some(0), 1, 0, 5),
            now + KEEP_SECS + 10,
        );
        assert_eq!(t.totals("g", 0, now + 10).len(), 1);
    }

    #[test]
    fn windows_and_steps_parse() {
        assert_eq!(window_and_step(None), Ok((900, 10)));
        assert_eq!(window_and_step(Some("window=1m&step=5s")), Ok((60, 6)));
        assert!(window_and_step(Some("window=2h")).is_err());
        assert!(window_and_step(Some("window=abc")).is_err());
    }
}
