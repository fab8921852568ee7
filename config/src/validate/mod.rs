//! Cross-field validation: every error, each with its field path.
//!
//! Values were parsed when the config was read ([`crate::values`]); what is left is what
//! relates fields to each other or bounds them: references, ranges, duplicates, overlapping
//! addresses, settings that only apply beside others. Validation never stops at the first
//! problem: an operator fixing a config wants the whole list. Paths use the same form as
//! parse errors (`listeners[0].routes[2].retry.attempts`).

mod authz;
mod cluster;
mod edge;
mod listen;
mod rollout;
mod route;

use crate::types::*;
use crate::FieldError;
use std::collections::{BTreeSet, HashSet};

pub(crate) struct Errors(pub Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Why a `k8s:` cluster is refused where there is no Kubernetes discovery.
pub const K8S_NEEDS_DISCOVERY: &str = "k8s clusters need `spur control --kubernetes`, which \
     watches the Service's EndpointSlices and pushes its ready endpoints to the proxies; \
     this config goes to a proxy or control plane without it (use `endpoints` or `dns` \
     here, or give the config to a control plane started with --kubernetes)";

/// Checks everything that parsing cannot: references, ranges, duplicates, overlaps.
pub(crate) fn check(cfg: &Config, rules: crate::Rules, e: &mut Errors) {
    let clusters: HashSet<&str> = cfg.clusters.iter().map(|c| c.name.as_str()).collect();

    if let Some(node) = &cfg.node {
        if node.trim().is_empty() {
            e.push("node", "must not be empty");
        }
    }
    if let Some(w) = cfg.workers {
        if !(1..=1024).contains(&w) {
            e.push("workers", "must be between 1 and 1024");
        }
    }
    let mut listener_names = BTreeSet::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let p = format!("listeners[{i}]");
        check_name(
            &format!("{p}.name"),
            &l.name,
            &mut listener_names,
            "listener",
            e,
        );
        check_listener(&p, l, cfg, &clusters, e);
    }
    listen::check_overlaps(&cfg.listeners, e);

    let mut cluster_names = BTreeSet::new();
    for (i, c) in cfg.clusters.iter().enumerate() {
        cluster::check(&format!("clusters[{i}]"), c, &mut cluster_names, rules, e);
        edge::check_cluster(&format!("clusters[{i}]"), c, e);
    }

    if let Some(t) = &cfg.tracing {
        check_tracing(t, cfg, e);
    }
    for (name, flag) in &cfg.flags {
        let p = format!("flags.{name}");
        if !valid_name(name) {
            e.push(
                &p,
                "a flag name uses letters, digits, `-`, `_` and `.` only",
            );
        }
        for (k, rule) in flag.rules.iter().enumerate() {
            check_flag_rule(&format!("{p}.rules[{k}]"), rule, e);
        }
    }
    for (name, r) in &cfg.rollouts {
        rollout::check(name, r, cfg, e);
    }
}

fn check_tracing(t: &crate::Tracing, cfg: &Config, e: &mut Errors) {
    if !(0.0..=1.0).contains(&t.sampling) {
        e.push("tracing.sampling", "must be between 0 and 1");
    }
    if t.service_name.as_ref().is_some_and(|s| s.trim().is_empty()) {
        e.push("tracing.service_name", "must not be empty");
    }
    if t.propagation.is_empty() {
        e.push(
            "tracing.propagation",
            "must name at least one format (w3c, b3)",
        );
    }
    if !cfg.correlation.trace_context {
        e.push(
            "tracing",
            "needs correlation.trace_context (spans are carried in trace headers)",
        );
    }
}

fn check_listener(p: &str, l: &Listener, cfg: &Config, clusters: &HashSet<&str>, e: &mut Errors) {
    if let Some(c) = &l.cluster {
        check_cluster_ref(&format!("{p}.cluster"), c, clusters, e);
    }
    match l.protocol {
        ListenerProtocol::Tcp => {
            // With original_dst the cluster owning the destination is enough.
            if l.cluster.is_none() && !l.original_dst {
                e.push(format!("{p}.cluster"), "a tcp listener needs a cluster");
            }
            if !l.routes.is_empty() {
                e.push(
                    format!("{p}.routes"),
                    "a tcp listener has no routes (use cluster)",
                );
            }
            if l.allow_encoded_slashes {
                e.push(
                    format!("{p}.allow_encoded_slashes"),
                    "applies to http and http3 listeners (a tcp listener reads no paths)",
                );
            }
        }
        ListenerProtocol::Http | ListenerProtocol::Http3 => {
            if l.cluster.is_none() && l.routes.is_empty() && !l.original_dst {
                e.push(
                    p,
                    "an http listener needs routes, a default cluster or original_dst",
                );
            }
        }
    }
    check_limits(&format!("{p}.limits"), &l.limits, e);
    if let Some(tls) = &l.tls {
        // No cert and key: the proxy's workload identity (checked when applied, where it
        // is known whether the proxy has one).
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                check_file(&format!("{p}.tls.cert"), cert, e);
                check_file(&format!("{p}.tls.key"), key, e);
            }
            (None, None) => {}
            _ => e.push(format!("{p}.tls"), "cert and key go together"),
        }
        if let Some(ca) = &tls.client_ca {
            check_file(&format!("{p}.tls.client_ca"), ca, e);
        }
        // Without files the mesh CA verifies client certificates.
        let verifies_clients = tls.client_ca.is_some() || tls.cert.is_none();
        if !tls.allow_identities.is_empty() && !verifies_clients {
            e.push(
                format!("{p}.tls.allow_identities"),
                "needs client_ca: identities come from verified client certificates",
            );
        }
    } else if l.protocol == ListenerProtocol::Http3 {
        e.push(
            format!("{p}.tls"),
            "an http3 listener needs tls (QUIC always encrypts)",
        );
    }
    if l.original_dst && l.protocol == ListenerProtocol::Http3 {
        e.push(
            format!("{p}.original_dst"),
            "applies to tcp and http listeners (redirected TCP connections)",
        );
    }
    if l.alt_svc_h3.is_some() && l.protocol != ListenerProtocol::Http {
        e.push(
            format!("{p}.alt_svc_h3"),
            "applies to http listeners (it advertises an http3 one)",
        );
    }
    if l.alt_svc_h3 == Some(0) {
        e.push(
            format!("{p}.alt_svc_h3"),
            "must be a port between 1 and 65535",
        );
    }
    if let Some(authz) = &l.authz {
        authz::check(p, authz, l, e);
    }
    edge::check_listener(p, l, e);
    let mut route_names = BTreeSet::new();
    for (j, r) in l.routes.iter().enumerate() {
        let rp = format!("{p}.routes[{j}]");
        if let Some(name) = &r.name {
            check_name(&format!("{rp}.name"), name, &mut route_names, "route", e);
        }
        route::check(&rp, r, cfg, clusters, e);
        edge::check_route(&rp, r, l, e);
        if r.matches.destination.is_some() && !l.original_dst {
            e.push(
                format!("{rp}.match.destination"),
                "only applies on a listener with original_dst (the destination is the connection's original one)",
            );
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_name<'a>(
    path: &str,
    name: &'a str,
    seen: &mut BTreeSet<&'a str>,
    what: &str,
    e: &mut Errors,
) {
    if !valid_name(name) {
        e.push(
            path,
            format!(
                "a {what} name must be non-empty and use letters, digits, `-`, `_` and `.` only"
            ),
        );
    } else if !seen.insert(name) {
        e.push(path, format!("duplicate {what} name `{name}`"));
    }
}

fn check_file(path: &str, file: &str, e: &mut Errors) {
    if file.trim().is_empty() {
        e.push(path, "must name a file");
    }
}

fn check_cluster_ref(path: &str, name: &str, clusters: &HashSet<&str>, e: &mut Errors) {
    if !clusters.contains(name) {
        e.push(path, format!("unknown cluster `{name}`"));
    }
}

fn check_positive(path: &str, d: crate::Duration, e: &mut Errors) {
    if d.is_zero() {
        e.push(path, "must be greater than 0ms");
    }
}

fn check_percent(path: &str, p: f64, e: &mut Errors) {
    if !(0.0..=100.0).contains(&p) {
        e.push(path, "must be between 0 and 100");
    }
}

fn check_range(path: &str, v: u32, lo: u32, hi: u32, e: &mut Errors) {
    if v < lo || v > hi {
        e.push(path, format!("must be between {lo} and {hi}"));
    }
}

fn check_limits(p: &str, l: &Limits, e: &mut Errors) {
    check_range(
        &format!("{p}.max_connections"),
        l.max_connections,
        1,
        1_000_000,
        e,
    );
    let h = l.max_header_bytes.get();
    if !(1024..=1024 * 1024).contains(&h) {
        e.push(
            format!("{p}.max_header_bytes"),
            "must be between 1KiB and 1MiB",
        );
    }
    check_positive(&format!("{p}.header_timeout"), l.header_timeout, e);
    check_positive(&format!("{p}.idle_timeout"), l.idle_timeout, e);
    check_positive(&format!("{p}.body_timeout"), l.body_timeout, e);
}

/// One header condition (a route's `match.headers`, an authz rule's `to.headers`).
fn check_header_match(path: &str, h: &crate::route::HeaderMatch, e: &mut Errors) {
    let kinds = [h.value.is_some(), h.present.is_some(), h.regex.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds != 1 {
        e.push(path, "needs exactly one of value, present, regex");
    }
}

fn check_flag_rule(p: &str, r: &FlagRule, e: &mut Errors) {
    let kinds = [r.header.is_some(), r.cookie.is_some(), r.percent.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds != 1 {
        e.push(p, "needs exactly one of header, cookie, percent");
        return;
    }
    if r.header.is_some() || r.cookie.is_some() {
        if r.values.is_empty() {
            e.push(format!("{p}.values"), "needs at least one value");
        }
        if r.hash_on.is_some() {
            e.push(format!("{p}.hash_on"), "only applies to a percent rule");
        }
    }
    if let Some(pct) = r.percent {
        check_percent(&format!("{p}.percent"), pct, e);
        if !r.values.is_empty() {
            e.push(format!("{p}.values"), "a percent rule has no values");
        }
    }
}
