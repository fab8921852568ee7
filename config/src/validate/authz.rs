//! Checks of a listener's `authz` block: rule names, conditions that could never match or
//! that say nothing, and what the listener can know (identities need verified client
//! certificates; `tcp` listeners see no requests).

use super::{check_header_match, check_name, Errors};
use crate::authz::{Authz, AuthzDefault, AuthzFrom, AuthzTo, ALLOW_IDENTITIES_RULE, DEFAULT_RULE};
use crate::types::{Listener, ListenerProtocol};
use std::collections::BTreeSet;

/// `lp` is the listener's path (`listeners[0]`).
pub(super) fn check(lp: &str, a: &Authz, l: &Listener, e: &mut Errors) {
    let p = format!("{lp}.authz");
    if l.tls
        .as_ref()
        .is_some_and(|t| !t.allow_identities.is_empty())
    {
        e.push(
            format!("{lp}.tls.allow_identities"),
            "use either tls.allow_identities or authz, not both: allow_identities is the rule \
             `{ name: allow_identities, action: allow, from: { identities: [...] } }` with \
             `default: deny`; write it in authz.rules",
        );
    }
    if a.rules.is_empty() && a.default == AuthzDefault::Allow {
        e.push(
            format!("{p}.rules"),
            "no rules and `default: allow`: this policy allows everything; add rules, or set \
             `default: deny`",
        );
    }
    let verifies_clients = l
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca.is_some() || t.cert.is_none());
    let mut names = BTreeSet::new();
    for (j, r) in a.rules.iter().enumerate() {
        let rp = format!("{p}.rules[{j}]");
        if r.name == DEFAULT_RULE || r.name == ALLOW_IDENTITIES_RULE {
            e.push(
                format!("{rp}.name"),
                format!(
                    "`{}` is reserved (`default` labels decisions no rule made, \
                     `allow_identities` the rule tls.allow_identities makes): choose another name",
                    r.name
                ),
            );
        } else {
            check_name(&format!("{rp}.name"), &r.name, &mut names, "rule", e);
        }
        if let Some(from) = &r.from {
            check_from(&format!("{rp}.from"), from, verifies_clients, e);
        }
        if let Some(to) = &r.to {
            if l.protocol == ListenerProtocol::Tcp {
                e.push(
                    format!("{rp}.to"),
                    "a tcp listener sees connections, not requests: `to` applies to http and \
                     http3 listeners (a tcp listener decides at accept, by `from`)",
                );
            } else {
                check_to(&format!("{rp}.to"), to, e);
            }
        }
    }
}

/// A list given but empty: no entry can match, so the rule never would.
fn check_list<T>(path: String, list: &Option<Vec<T>>, e: &mut Errors) {
    if list.as_ref().is_some_and(Vec::is_empty) {
        e.push(
            path,
            "is empty, so the rule could never match: list at least one, or leave the field out",
        );
    }
}

fn check_from(p: &str, f: &AuthzFrom, verifies_clients: bool, e: &mut Errors) {
    if f.identities.is_none()
        && f.namespaces.is_none()
        && f.cidrs.is_none()
        && f.unauthenticated.is_none()
    {
        e.push(
            p,
            "is empty: give identities, namespaces, cidrs or unauthenticated, or leave `from` \
             out to match every peer",
        );
        return;
    }
    check_list(format!("{p}.identities"), &f.identities, e);
    check_list(format!("{p}.namespaces"), &f.namespaces, e);
    check_list(format!("{p}.cidrs"), &f.cidrs, e);
    let by_identity = f.identities.is_some() || f.namespaces.is_some();
    match f.unauthenticated {
        Some(false) => e.push(
            format!("{p}.unauthenticated"),
            "`false` is not a condition: write `true` (peers without a verified identity), or \
             leave it out (`identities: [\"*\"]` matches every verified identity)",
        ),
        Some(true) if by_identity => e.push(
            p,
            "never matches: an `unauthenticated` peer has no identity or namespace to match",
        ),
        _ => {}
    }
    if by_identity && !verifies_clients {
        let field = if f.identities.is_some() {
            "identities"
        } else {
            "namespaces"
        };
        e.push(
            format!("{p}.{field}"),
            "needs a listener that verifies client certificates (tls with client_ca, or tls \
             without files: the mesh CA); here no peer has an identity",
        );
    }
}

fn check_to(p: &str, t: &AuthzTo, e: &mut Errors) {
    if t.paths.is_none()
        && t.path_prefixes.is_none()
        && t.methods.is_none()
        && t.headers.is_none()
        && t.grpc.is_none()
    {
        e.push(
            p,
            "is empty: give paths, path_prefixes, methods, headers or grpc, or leave `to` out \
             to match every request",
        );
        return;
    }
    check_list(format!("{p}.paths"), &t.paths, e);
    check_list(format!("{p}.path_prefixes"), &t.path_prefixes, e);
    check_list(format!("{p}.methods"), &t.methods, e);
    check_list(format!("{p}.headers"), &t.headers, e);
    check_list(format!("{p}.grpc"), &t.grpc, e);
    for (field, list) in [("paths", &t.paths), ("path_prefixes", &t.path_prefixes)] {
        for (k, path) in list.iter().flatten().enumerate() {
            if !path.starts_with('/') {
                e.push(
                    format!("{p}.{field}[{k}]"),
                    format!("`{path}` must start with `/`"),
                );
            } else if path.contains(['?', '#']) {
                e.push(
                    format!("{p}.{field}[{k}]"),
                    format!("`{path}`: the query is not matched, write the path alone"),
                );
            }
        }
    }
    for (k, h) in t.headers.iter().flatten().enumerate() {
        check_header_match(&format!("{p}.headers[{k}]"), h, e);
    }
}
