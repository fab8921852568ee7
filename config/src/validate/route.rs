//! Checks of one route: its match, its target, and its retry, mirror and fault settings.

use super::{
    check_cluster_ref, check_header_match, check_percent, check_positive, check_range, Errors,
};
use crate::route::Route;
use crate::types::Config;
use std::collections::HashSet;

pub(super) fn check(p: &str, r: &Route, cfg: &Config, clusters: &HashSet<&str>, e: &mut Errors) {
    let m = &r.matches;
    if m.path.is_some() && m.path_prefix.is_some() {
        e.push(
            format!("{p}.match"),
            "use either path or path_prefix, not both",
        );
    }
    for (field, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(v) = v {
            if !v.starts_with('/') {
                e.push(
                    format!("{p}.match.{field}"),
                    format!("`{v}` must start with `/`"),
                );
            }
        }
    }
    if m.grpc.is_some() && (m.path.is_some() || m.path_prefix.is_some()) {
        e.push(
            format!("{p}.match.grpc"),
            "a gRPC match is a path match (`/service/method`): use it without path or path_prefix",
        );
    }
    if let Some(host) = &m.host {
        if host.is_empty() || host.contains(['/', ' ']) {
            e.push(
                format!("{p}.match.host"),
                format!("`{host}` is not a host name"),
            );
        }
    }
    for (k, h) in m.headers.iter().enumerate() {
        check_header_match(&format!("{p}.match.headers[{k}]"), h, e);
    }
    if let Some(flag) = &m.flag {
        if !cfg.flags.contains_key(flag) {
            e.push(format!("{p}.match.flag"), format!("unknown flag `{flag}`"));
        }
    }
    if let Some(d) = &m.destination {
        check_cluster_ref(&format!("{p}.match.destination"), d, clusters, e);
    }
    check_target(p, r, clusters, e);
    if let Some(t) = r.timeout {
        check_positive(&format!("{p}.timeout"), t, e);
    }
    if let Some(retry) = &r.retry {
        let rp = format!("{p}.retry");
        check_range(&format!("{rp}.attempts"), retry.attempts, 1, 10, e);
        if let Some(t) = retry.per_try_timeout {
            check_positive(&format!("{rp}.per_try_timeout"), t, e);
        }
        if retry.backoff.base > retry.backoff.max {
            e.push(format!("{rp}.backoff"), "base must not exceed max");
        }
        if !(0.0..=1.0).contains(&retry.budget.ratio) {
            e.push(format!("{rp}.budget.ratio"), "must be between 0 and 1");
        }
        if retry.max_body.get() > 64 * 1024 * 1024 {
            e.push(format!("{rp}.max_body"), "must be at most 64MiB");
        }
    }
    if let Some(mirror) = &r.mirror {
        check_cluster_ref(&format!("{p}.mirror.cluster"), &mirror.cluster, clusters, e);
        check_percent(&format!("{p}.mirror.percent"), mirror.percent, e);
    }
    if let Some(fault) = &r.fault {
        if let Some(a) = &fault.abort {
            check_percent(&format!("{p}.fault.abort.percent"), a.percent, e);
            if !(200..=599).contains(&a.status) {
                e.push(
                    format!("{p}.fault.abort.status"),
                    "must be between 200 and 599",
                );
            }
        }
        if let Some(d) = &fault.delay {
            check_percent(&format!("{p}.fault.delay.percent"), d.percent, e);
        }
    }
}

/// `cluster` or `split` (weights that add up to more than 0), and `hash_on` with a split.
fn check_target(p: &str, r: &Route, clusters: &HashSet<&str>, e: &mut Errors) {
    match (&r.cluster, r.split.is_empty()) {
        (Some(c), true) => check_cluster_ref(&format!("{p}.cluster"), c, clusters, e),
        (None, false) => {
            let mut total: u64 = 0;
            for (k, s) in r.split.iter().enumerate() {
                check_cluster_ref(&format!("{p}.split[{k}].cluster"), &s.cluster, clusters, e);
                check_range(&format!("{p}.split[{k}].weight"), s.weight, 0, 1_000_000, e);
                total += u64::from(s.weight);
            }
            if total == 0 {
                e.push(
                    format!("{p}.split"),
                    "weights add up to 0: at least one must be above 0",
                );
            }
        }
        (Some(_), false) => e.push(p, "use either cluster or split, not both"),
        (None, true) if r.redirect.is_some() => {}
        (None, true) => e.push(p, "needs a cluster, a split or a redirect"),
    }
    if r.hash_on.is_some() && r.split.is_empty() {
        e.push(format!("{p}.hash_on"), "only applies to a split");
    }
}
