//! Checks of one rollout: its route and canary exist in this config, its steps climb to
//! 100, and its thresholds are in range.
//!
//! The canary must be the first or the last side of the split: a sticky user's place in
//! the split is a fixed point in `[0, total)` (see the proxy's `policy::split`), and only a
//! side at either end grows over the points it already covered as its weight rises, so
//! that whoever saw the canary keeps seeing it at every step.

use super::{valid_name, Errors};
use crate::rollout::Rollout;
use crate::types::Config;

/// The shortest step: proxies report every 2 s, so a shorter one would judge at most one
/// report.
const MIN_INTERVAL_MS: u128 = 2_000;
/// The longest step: the control plane keeps 16 minutes of reported traffic.
const MAX_INTERVAL_MS: u128 = 15 * 60_000;

pub(super) fn check(name: &str, r: &Rollout, cfg: &Config, e: &mut Errors) {
    let p = format!("rollouts.{name}");
    if !valid_name(name) || name.starts_with('.') || name.len() > 128 {
        e.push(
            &p,
            "a rollout name uses letters, digits, `-`, `_` and `.` only (not first), at most 128",
        );
    }
    check_route(&p, name, r, cfg, e);
    if r.steps.is_empty() {
        e.push(
            format!("{p}.steps"),
            "needs at least one step (the last 100)",
        );
    }
    for (k, s) in r.steps.iter().enumerate() {
        if !(1..=100).contains(s) {
            e.push(format!("{p}.steps[{k}]"), "must be between 1 and 100");
        } else if k > 0 && *s <= r.steps[k - 1] {
            e.push(
                format!("{p}.steps[{k}]"),
                format!("steps must ascend: {s} after {}", r.steps[k - 1]),
            );
        }
    }
    if r.steps.last().is_some_and(|s| *s != 100) {
        e.push(
            format!("{p}.steps[{}]", r.steps.len() - 1),
            "the last step must be 100 (the canary takes all traffic)",
        );
    }
    let ms = r.interval.get().as_millis();
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ms) {
        e.push(
            format!("{p}.interval"),
            "must be between 2s (proxies report every 2s) and 15m",
        );
    }
    if !(1..=100_000_000).contains(&r.min_requests) {
        e.push(
            format!("{p}.min_requests"),
            "must be between 1 and 100000000",
        );
    }
    let err = r.max_error_rate_increase.0;
    if !(0.0..=100.0).contains(&err) {
        e.push(
            format!("{p}.max_error_rate_increase"),
            "must be between 0% and 100%",
        );
    }
    let p99 = r.max_p99_increase.0;
    if !(0.0..=10_000.0).contains(&p99) {
        e.push(
            format!("{p}.max_p99_increase"),
            "must be between 0% and 10000%",
        );
    }
    if r.min_p99_increase.get() > std::time::Duration::from_secs(60) {
        e.push(format!("{p}.min_p99_increase"), "must be at most 1m");
    }
    let others = cfg
        .rollouts
        .iter()
        .take_while(|(n, _)| n.as_str() != name)
        .find(|(_, o)| o.route == r.route);
    if let Some((other, _)) = others {
        e.push(
            format!("{p}.route"),
            format!("route `{}` already has rollout `{other}`", r.route),
        );
    }
}

fn check_route(p: &str, name: &str, r: &Rollout, cfg: &Config, e: &mut Errors) {
    let routes: Vec<(&str, &crate::route::Route)> = cfg
        .listeners
        .iter()
        .flat_map(|l| l.routes.iter().map(move |rt| (l.name.as_str(), rt)))
        .filter(|(_, rt)| rt.name.as_deref() == Some(r.route.as_str()))
        .collect();
    let route = match routes.as_slice() {
        [] => {
            return e.push(
                format!("{p}.route"),
                format!("no route is named `{}`", r.route),
            )
        }
        [(_, route)] => route,
        many => {
            let ls: Vec<&str> = many.iter().map(|(l, _)| *l).collect();
            return e.push(
                format!("{p}.route"),
                format!(
                    "routes named `{}` are in listeners {}: a rollout ramps one route (rename the others)",
                    r.route,
                    ls.join(", ")
                ),
            );
        }
    };
    if route.split.len() < 2 {
        return e.push(
            format!("{p}.route"),
            format!(
                "route `{}` has no split of two or more clusters to ramp (rollout `{name}`)",
                r.route
            ),
        );
    }
    let sides: Vec<&str> = route.split.iter().map(|s| s.cluster.as_str()).collect();
    let at: Vec<usize> = (0..sides.len()).filter(|i| sides[*i] == r.canary).collect();
    match at.as_slice() {
        [] => e.push(
            format!("{p}.canary"),
            format!(
                "`{}` is not a side of route `{}`'s split (its sides: {})",
                r.canary,
                r.route,
                sides.join(", ")
            ),
        ),
        [i] if *i != 0 && *i != sides.len() - 1 => e.push(
            format!("{p}.canary"),
            "must be the first or the last side of the split (so that users who saw the \
             canary keep seeing it as it grows)",
        ),
        [_] => {}
        _ => e.push(
            format!("{p}.canary"),
            format!("`{}` is more than one side of the split", r.canary),
        ),
    }
}
