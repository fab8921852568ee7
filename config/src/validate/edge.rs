//! Checks of edge policy: rate limits, header rules, rewrites, redirects, CORS, forwarding
//! headers, and a cluster's panic threshold and slow start.

use super::{check_positive, check_range, Errors};
use crate::edge::{Cors, HeaderRules, LimitKey, LimitScope, OriginPattern, RateLimit, Redirect};
use crate::route::Route;
use crate::types::{Listener, ListenerProtocol};
use crate::{Cluster, LbPolicy};
use std::collections::BTreeSet;

/// Headers a rule may not touch: they describe the connection or the message framing, or
/// have a field of their own (`rewrite.host`).
const RESERVED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "content-length",
    "host",
    "http2-settings",
];

/// Whether the listener verifies client certificates (so requests can have a client_id).
fn verifies_clients(l: &Listener) -> bool {
    l.tls
        .as_ref()
        .is_some_and(|t| t.client_ca.is_some() || t.cert.is_none())
}

pub(super) fn check_rate_limit(p: &str, r: &RateLimit, l: &Listener, e: &mut Errors) {
    check_range(&format!("{p}.requests"), r.requests, 1, 1_000_000_000, e);
    check_positive(&format!("{p}.per"), r.per, e);
    if r.per.get() > std::time::Duration::from_secs(24 * 3600) {
        e.push(format!("{p}.per"), "must be at most 24h");
    }
    if let Some(b) = r.burst {
        check_range(&format!("{p}.burst"), b, 1, 1_000_000_000, e);
    }
    check_range(&format!("{p}.max_keys"), r.max_keys, 1, 10_000_000, e);
    if r.key == LimitKey::ClientId && !verifies_clients(l) {
        e.push(
            format!("{p}.key"),
            "client_id is the verified mTLS identity: the listener needs tls with client_ca (or tls without files, the mesh CA)",
        );
    }
    if r.scope == LimitScope::Group && r.key != LimitKey::Route {
        e.push(
            format!("{p}.scope"),
            "not supported yet: a group limit is one bucket shared by the group's proxies (key: route)",
        );
    }
}

pub(super) fn check_listener(p: &str, l: &Listener, e: &mut Errors) {
    let tcp = l.protocol == ListenerProtocol::Tcp;
    if let Some(r) = &l.rate_limit {
        if tcp {
            e.push(
                format!("{p}.rate_limit"),
                "not supported yet on tcp listeners (http and http3 only)",
            );
        } else {
            check_rate_limit(&format!("{p}.rate_limit"), r, l, e);
        }
    }
    if let Some(x) = &l.x_forwarded {
        if tcp {
            e.push(
                format!("{p}.x_forwarded"),
                "applies to http and http3 listeners (a tcp listener reads no headers)",
            );
        }
        check_range(
            &format!("{p}.x_forwarded.trusted_hops"),
            x.trusted_hops,
            0,
            10,
            e,
        );
    }
}

/// A route's edge policy.
pub(super) fn check_route(p: &str, r: &Route, l: &Listener, e: &mut Errors) {
    if let Some(rl) = &r.rate_limit {
        check_rate_limit(&format!("{p}.rate_limit"), rl, l, e);
    }
    if let Some(h) = &r.request_headers {
        check_rules(&format!("{p}.request_headers"), h, e);
    }
    if let Some(h) = &r.response_headers {
        check_rules(&format!("{p}.response_headers"), h, e);
    }
    if let Some(rw) = &r.rewrite {
        if rw.path_prefix.is_none() && rw.host.is_none() {
            e.push(format!("{p}.rewrite"), "needs path_prefix, host or both");
        }
        if let Some(pp) = &rw.path_prefix {
            check_path(&format!("{p}.rewrite.path_prefix"), pp, e);
        }
    }
    if let Some(rd) = &r.redirect {
        check_redirect(&format!("{p}.redirect"), rd, e);
        let upstream = [
            ("cluster", r.cluster.is_some()),
            ("split", !r.split.is_empty()),
            ("retry", r.retry.is_some()),
            ("timeout", r.timeout.is_some()),
            ("mirror", r.mirror.is_some()),
            ("fault", r.fault.is_some()),
            ("rewrite", r.rewrite.is_some()),
            ("request_headers", r.request_headers.is_some()),
            ("upgrades", r.upgrades.is_some()),
        ];
        for (field, set) in upstream {
            if set {
                e.push(
                    format!("{p}.{field}"),
                    "a redirect route answers itself and sends nothing upstream: leave this out",
                );
            }
        }
    }
    if let Some(c) = &r.cors {
        check_cors(&format!("{p}.cors"), c, e);
    }
}

fn check_path(path: &str, v: &str, e: &mut Errors) {
    if !v.starts_with('/') {
        e.push(path, format!("`{v}` must start with `/`"));
    } else if v.contains(['?', '#']) || v.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        e.push(
            path,
            format!("`{v}` is not a path (no query, fragment, spaces or control characters)"),
        );
    }
}

fn check_rules(p: &str, h: &HeaderRules, e: &mut Errors) {
    let mut seen = BTreeSet::new();
    let named = h
        .set
        .0
        .iter()
        .map(|(k, _)| ("set", k))
        .chain(h.add.0.iter().map(|(k, _)| ("add", k)))
        .chain(h.remove.iter().map(|k| ("remove", k)));
    for (field, name) in named {
        let path = format!("{p}.{field}.{}", name.text());
        if RESERVED.contains(&name.as_str()) {
            let why = if name.as_str() == "host" {
                "is set by `rewrite.host`"
            } else {
                "describes the connection or the message framing; Spur manages it"
            };
            e.push(&path, format!("`{}` {why}", name.text()));
        }
        if field != "remove" && !seen.insert(name.as_str()) {
            e.push(
                &path,
                format!("`{}` is given twice in set and add", name.text()),
            );
        }
    }
    if h.set.is_empty() && h.add.is_empty() && h.remove.is_empty() {
        e.push(p, "needs set, add or remove");
    }
}

fn check_redirect(p: &str, r: &Redirect, e: &mut Errors) {
    if ![301, 302, 303, 307, 308].contains(&r.status) {
        e.push(format!("{p}.status"), "must be 301, 302, 303, 307 or 308");
    }
    if let Some(h) = &r.host {
        if h.0.port().is_some() {
            e.push(format!("{p}.host"), "a host without a port (use `port`)");
        }
    }
    if r.port == Some(0) {
        e.push(format!("{p}.port"), "must be a port between 1 and 65535");
    }
    match (&r.path, &r.path_prefix) {
        (Some(_), Some(_)) => e.push(p, "use either path or path_prefix, not both"),
        (Some(v), None) => check_path(&format!("{p}.path"), v, e),
        (None, Some(v)) => check_path(&format!("{p}.path_prefix"), v, e),
        (None, None) => {}
    }
    let changes = r.scheme.is_some()
        || r.host.is_some()
        || r.port.is_some()
        || r.path.is_some()
        || r.path_prefix.is_some();
    if !changes {
        e.push(
            p,
            "needs scheme, host, port, path or path_prefix (a redirect to the same URL loops)",
        );
    }
}

fn check_cors(p: &str, c: &Cors, e: &mut Errors) {
    if c.allow_origins.is_empty() {
        e.push(
            format!("{p}.allow_origins"),
            "needs at least one origin (`*` for any)",
        );
    }
    let any = c.allow_origins.iter().any(|o| **o == OriginPattern::Any);
    if any && c.allow_credentials {
        e.push(
            format!("{p}.allow_credentials"),
            "with allow_origins `*`, every web site could send requests carrying the user's cookies: list the origins",
        );
    }
    if let Some(m) = c.max_age {
        if m.get() > std::time::Duration::from_secs(24 * 3600) {
            e.push(format!("{p}.max_age"), "must be at most 24h");
        }
    }
}

pub(super) fn check_cluster(p: &str, c: &Cluster, e: &mut Errors) {
    if let Some(t) = c.panic_threshold {
        check_range(&format!("{p}.panic_threshold"), t, 0, 100, e);
    }
    if let Some(s) = &c.slow_start {
        check_positive(&format!("{p}.slow_start.window"), s.window, e);
        if s.window.get() > std::time::Duration::from_secs(3600) {
            e.push(format!("{p}.slow_start.window"), "must be at most 1h");
        }
        if c.lb == LbPolicy::RingHash {
            e.push(
                format!("{p}.slow_start"),
                "not supported with lb ring_hash: a key stays on its endpoint, so there is no share to ramp (use ewma, least_request or round_robin)",
            );
        }
    }
}
