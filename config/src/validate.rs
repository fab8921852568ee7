//! Cross-field validation: every error, each with its field path.
//!
//! Validation never stops at the first problem: an operator fixing a config wants the whole
//! list. Paths use the same form as parse errors (`listeners[0].routes[2].retry.attempts`).

use crate::types::*;
use crate::FieldError;
use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;

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

/// Checks everything that parsing cannot: references, ranges, formats, duplicates.
pub(crate) fn check(cfg: &Config, rules: crate::Rules, e: &mut Errors) {
    let clusters: HashSet<&str> = cfg.clusters.iter().map(|c| c.name.as_str()).collect();

    if let Some(node) = &cfg.node {
        if node.trim().is_empty() {
            e.push("node", "must not be empty");
        }
    }
    if let Some(admin) = &cfg.admin {
        check_addr("admin.listen", &admin.listen, e);
    }
    if http::HeaderName::from_bytes(cfg.correlation.request_id_header.as_bytes()).is_err() {
        e.push(
            "correlation.request_id_header",
            format!(
                "`{}` is not a valid header name",
                cfg.correlation.request_id_header
            ),
        );
    }

    let mut listener_names = BTreeSet::new();
    let mut listen_addrs = BTreeSet::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let p = format!("listeners[{i}]");
        check_name(
            &format!("{p}.name"),
            &l.name,
            &mut listener_names,
            "listener",
            e,
        );
        if let Some(addr) = check_addr(&format!("{p}.listen"), &l.listen, e) {
            // An http3 listener's UDP port may equal a TCP listener's.
            let udp = l.protocol == ListenerProtocol::Http3;
            if addr.port() != 0 && !listen_addrs.insert((udp, addr)) {
                e.push(
                    format!("{p}.listen"),
                    format!("{addr} is used by another listener"),
                );
            }
        }
        if let Some(c) = &l.cluster {
            check_cluster_ref(&format!("{p}.cluster"), c, &clusters, e);
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
            }
            ListenerProtocol::Http | ListenerProtocol::Http3 => {
                if l.cluster.is_none() && l.routes.is_empty() && !l.original_dst {
                    e.push(
                        &p,
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
            for (k, id) in tls.allow_identities.iter().enumerate() {
                check_identity(&format!("{p}.tls.allow_identities[{k}]"), id, e);
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
        let mut route_names = BTreeSet::new();
        for (j, r) in l.routes.iter().enumerate() {
            let rp = format!("{p}.routes[{j}]");
            if let Some(name) = &r.name {
                check_name(&format!("{rp}.name"), name, &mut route_names, "route", e);
            }
            check_route(&rp, r, cfg, &clusters, e);
        }
    }

    let mut cluster_names = BTreeSet::new();
    for (i, c) in cfg.clusters.iter().enumerate() {
        check_cluster(&format!("clusters[{i}]"), c, &mut cluster_names, rules, e);
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

fn check_addr(path: &str, addr: &str, e: &mut Errors) -> Option<SocketAddr> {
    match addr.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            e.push(
                path,
                format!("`{addr}` is not an IP address with a port (e.g. 127.0.0.1:8080)"),
            );
            None
        }
    }
}

fn check_file(path: &str, file: &str, e: &mut Errors) {
    if file.trim().is_empty() {
        e.push(path, "must name a file");
    }
}

fn check_identity(path: &str, id: &str, e: &mut Errors) {
    let ok = id.strip_prefix("spiffe://").is_some_and(|rest| {
        !rest.is_empty() && !rest.starts_with('/') && !rest.contains(char::is_whitespace)
    });
    if !ok {
        e.push(
            path,
            format!("`{id}` is not a SPIFFE ID (spiffe://trust-domain/path)"),
        );
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

/// `header:NAME` or `cookie:NAME`.
pub(crate) fn check_hash_on(path: &str, spec: &str, e: &mut Errors) {
    let ok = match spec.split_once(':') {
        Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
        Some(("cookie", name)) => !name.is_empty() && !name.contains([';', '=', ' ']),
        _ => false,
    };
    if !ok {
        e.push(
            path,
            format!("`{spec}` must be `header:NAME` or `cookie:NAME`"),
        );
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
}

fn check_route(p: &str, r: &Route, cfg: &Config, clusters: &HashSet<&str>, e: &mut Errors) {
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
    if let Some(host) = &m.host {
        if host.is_empty() || host.contains(['/', ' ']) {
            e.push(
                format!("{p}.match.host"),
                format!("`{host}` is not a host name"),
            );
        }
    }
    if let Some(method) = &m.method {
        if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            e.push(
                format!("{p}.match.method"),
                format!("`{method}` is not an HTTP method"),
            );
        }
    }
    for (k, h) in m.headers.iter().enumerate() {
        let hp = format!("{p}.match.headers[{k}]");
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            e.push(
                format!("{hp}.name"),
                format!("`{}` is not a valid header name", h.name),
            );
        }
        let kinds = [h.value.is_some(), h.present.is_some(), h.regex.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if kinds != 1 {
            e.push(&hp, "needs exactly one of value, present, regex");
        }
        if let Some(re) = &h.regex {
            if let Err(err) = regex::Regex::new(re) {
                e.push(format!("{hp}.regex"), format!("invalid regex: {err}"));
            }
        }
    }
    if let Some(flag) = &m.flag {
        if !cfg.flags.contains_key(flag) {
            e.push(format!("{p}.match.flag"), format!("unknown flag `{flag}`"));
        }
    }

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
        (None, true) => e.push(p, "needs a cluster or a split"),
    }
    if let Some(h) = &r.hash_on {
        check_hash_on(&format!("{p}.hash_on"), h, e);
        if r.split.is_empty() {
            e.push(format!("{p}.hash_on"), "only applies to a split");
        }
    }
    if let Some(t) = r.timeout {
        check_positive(&format!("{p}.timeout"), t, e);
    }
    if let Some(retry) = &r.retry {
        let rp = format!("{p}.retry");
        check_range(&format!("{rp}.attempts"), retry.attempts, 1, 10, e);
        if let Some(t) = retry.per_try_timeout {
            check_positive(&format!("{rp}.per_try_timeout"), t, e);
        }
        for (k, cond) in retry.retry_on.iter().enumerate() {
            if !valid_retry_on(cond) {
                e.push(
                    format!("{rp}.retry_on[{k}]"),
                    format!("`{cond}` is not a retry condition (connect-failure, reset, reset-before-request, timeout, 5xx, retriable-4xx, or a status code 400-599)"),
                );
            }
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

fn valid_retry_on(cond: &str) -> bool {
    match cond {
        "connect-failure"
        | "reset"
        | "reset-before-request"
        | "timeout"
        | "5xx"
        | "retriable-4xx" => true,
        code => code.parse::<u16>().is_ok_and(|c| (400..=599).contains(&c)),
    }
}

fn check_cluster<'a>(
    p: &str,
    c: &'a Cluster,
    names: &mut BTreeSet<&'a str>,
    rules: crate::Rules,
    e: &mut Errors,
) {
    check_name(&format!("{p}.name"), &c.name, names, "cluster", e);
    let sources = [!c.endpoints.is_empty(), c.dns.is_some(), c.k8s.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    // A config rendered by the control plane lists a discovered service that has no ready
    // endpoint as a cluster with an empty `endpoints` list.
    if sources > 1 || (sources == 0 && !rules.rendered) {
        e.push(p, "needs exactly one of endpoints, dns, k8s");
    }
    let mut seen = BTreeSet::new();
    for (k, ep) in c.endpoints.iter().enumerate() {
        let ep_path = match ep {
            EndpointSpec::Address(_) => format!("{p}.endpoints[{k}]"),
            EndpointSpec::Weighted(_) => format!("{p}.endpoints[{k}].address"),
        };
        if let Some(addr) = check_addr(&ep_path, ep.address(), e) {
            if !seen.insert(addr) {
                e.push(&ep_path, format!("{addr} is listed twice"));
            }
            if addr.port() == 0 {
                e.push(&ep_path, "port 0 is not a destination");
            }
        } else if !ep.address().contains(char::is_whitespace) && ep.address().contains(':') {
            e.0.last_mut()
                .unwrap()
                .message
                .push_str(": for a host name use `dns:`");
        }
        if let EndpointSpec::Weighted(w) = ep {
            check_range(
                &format!("{p}.endpoints[{k}].weight"),
                w.weight,
                1,
                10_000,
                e,
            );
        }
    }
    if let Some(dns) = &c.dns {
        let ok = dns
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            e.push(format!("{p}.dns"), format!("`{dns}` must be host:port"));
        }
    }
    if let Some(k8s) = &c.k8s {
        if let Err(msg) = k8s.parse::<K8sTarget>() {
            e.push(format!("{p}.k8s"), msg);
        } else if !rules.k8s_discovery {
            e.push(format!("{p}.k8s"), K8S_NEEDS_DISCOVERY);
        }
    }
    if let Some(period) = c.fallback_period {
        check_positive(&format!("{p}.fallback_period"), period, e);
        if c.fallback.is_none() {
            e.push(format!("{p}.fallback_period"), "only applies with fallback");
        }
    }
    if let Some(fb) = c.fallback {
        if c.protocol != UpstreamProtocol::Http3 {
            e.push(format!("{p}.fallback"), "only applies to protocol http3");
        }
        if fb == UpstreamProtocol::Http3 {
            e.push(format!("{p}.fallback"), "must be http1 or http2");
        }
    }
    check_positive(&format!("{p}.connect_timeout"), c.connect_timeout, e);
    if let Some(tls) = &c.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            e.push(format!("{p}.tls"), "cert and key go together");
        }
        for (k, id) in tls.expect_identities.iter().enumerate() {
            check_identity(&format!("{p}.tls.expect_identities[{k}]"), id, e);
        }
    } else if c.protocol == UpstreamProtocol::Http3 {
        e.push(
            format!("{p}.tls"),
            "an http3 cluster needs tls (QUIC always encrypts)",
        );
    }
    if let Some(cb) = &c.circuit_breaker {
        let bp = format!("{p}.circuit_breaker");
        check_range(
            &format!("{bp}.consecutive_failures"),
            cb.consecutive_failures,
            1,
            1000,
            e,
        );
        check_positive(&format!("{bp}.ejection_time"), cb.ejection_time, e);
        check_range(
            &format!("{bp}.max_ejection_percent"),
            cb.max_ejection_percent,
            0,
            100,
            e,
        );
        check_range(
            &format!("{bp}.max_requests"),
            cb.max_requests,
            1,
            1_000_000,
            e,
        );
        check_range(
            &format!("{bp}.max_pending"),
            cb.max_pending,
            0,
            1_000_000,
            e,
        );
    }
    if let Some(hc) = &c.health_check {
        let hp = format!("{p}.health_check");
        if !hc.path.starts_with('/') {
            e.push(
                format!("{hp}.path"),
                format!("`{}` must start with `/`", hc.path),
            );
        }
        check_positive(&format!("{hp}.interval"), hc.interval, e);
        check_positive(&format!("{hp}.timeout"), hc.timeout, e);
        check_range(
            &format!("{hp}.unhealthy_threshold"),
            hc.unhealthy_threshold,
            1,
            100,
            e,
        );
        check_range(
            &format!("{hp}.healthy_threshold"),
            hc.healthy_threshold,
            1,
            100,
            e,
        );
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
    if let Some(h) = &r.header {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            e.push(
                format!("{p}.header"),
                format!("`{h}` is not a valid header name"),
            );
        }
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
        if let Some(h) = &r.hash_on {
            check_hash_on(&format!("{p}.hash_on"), h, e);
        }
    }
}
