//! Checks of one cluster: where its endpoints come from, its protocol settings, TLS,
//! circuit breaker and health check.

use super::{check_name, check_positive, check_range, Errors, K8S_NEEDS_DISCOVERY};
use crate::cluster::{Cluster, EndpointSpec, UpstreamProtocol};
use std::collections::BTreeSet;

pub(super) fn check<'a>(
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
    check_endpoints(p, c, e);
    if c.k8s.is_some() && !rules.k8s_discovery {
        e.push(format!("{p}.k8s"), K8S_NEEDS_DISCOVERY);
    }
    check_protocol(p, c, e);
    check_positive(&format!("{p}.connect_timeout"), c.connect_timeout, e);
    if let Some(tls) = &c.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            e.push(format!("{p}.tls"), "cert and key go together");
        }
    } else if c.protocol == UpstreamProtocol::Http3 {
        e.push(
            format!("{p}.tls"),
            "an http3 cluster needs tls (QUIC always encrypts)",
        );
    }
    check_breaker(p, c, e);
    check_health(p, c, e);
}

/// Endpoint addresses: each once, a real port, weights in range.
fn check_endpoints(p: &str, c: &Cluster, e: &mut Errors) {
    let mut seen = BTreeSet::new();
    for (k, ep) in c.endpoints.iter().enumerate() {
        let ep_path = match ep {
            EndpointSpec::Address(_) => format!("{p}.endpoints[{k}]"),
            EndpointSpec::Weighted(_) => format!("{p}.endpoints[{k}].address"),
        };
        let addr = ep.addr();
        if !seen.insert(addr) {
            e.push(&ep_path, format!("{addr} is listed twice"));
        }
        if addr.port() == 0 {
            e.push(&ep_path, "port 0 is not a destination");
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
    for (k, a) in c.service_addresses.iter().enumerate() {
        if a.port() == 0 {
            e.push(
                format!("{p}.service_addresses[{k}]"),
                "port 0 is not a destination",
            );
        }
    }
}

fn check_breaker(p: &str, c: &Cluster, e: &mut Errors) {
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
}

fn check_health(p: &str, c: &Cluster, e: &mut Errors) {
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

/// `fallback` and `fallback_period` belong to `http3` clusters.
fn check_protocol(p: &str, c: &Cluster, e: &mut Errors) {
    let http3 = c.protocol == UpstreamProtocol::Http3;
    if let Some(fb) = c.fallback {
        if !http3 {
            e.push(format!("{p}.fallback"), "only applies to protocol http3");
        }
        if fb == UpstreamProtocol::Http3 {
            e.push(format!("{p}.fallback"), "must be http1 or http2");
        }
    }
    if let Some(period) = c.fallback_period {
        if !http3 {
            e.push(
                format!("{p}.fallback_period"),
                "only applies to protocol http3",
            );
        } else {
            check_positive(&format!("{p}.fallback_period"), period, e);
        }
    }
}
