//! Reading whole files: every error once, in plain words; overlapping listen addresses;
//! round trips that change nothing; the fields added for the proxy's retries and HTTP/3.

use super::*;
use std::time::Instant;

fn errors_of(text: &str, file: &str) -> Vec<String> {
    match load(text, Some(file)) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_file_with_three_mistakes_reports_three_errors() {
    // The example of the issue: a bad duration, an unknown cluster, a duplicate port.
    let yaml = r#"
listeners:
  - name: a
    listen: 127.0.0.1:8080
    routes:
      - { match: { path_prefix: / }, cluster: nope }
  - name: b
    listen: 127.0.0.1:8080
    cluster: app
clusters:
  - name: app
    endpoints: ["127.0.0.1:9000"]
    circuit_breaker: { ejection_time: 10 }
"#;
    let errs = errors_of(yaml, "c.yaml");
    assert_eq!(
        errs,
        [
            "clusters[0].circuit_breaker.ejection_time: `10` has no unit (write e.g. `250ms`, `2s`, `1m`)",
            "listeners[0].routes[0].cluster: unknown cluster `nope`",
            "listeners[1].listen: 127.0.0.1:8080 is used by another listener (`a`)",
        ]
    );
    // The same file as JSON reports the same errors.
    let json = r#"{"listeners": [
        {"name": "a", "listen": "127.0.0.1:8080", "routes": [{"match": {"path_prefix": "/"}, "cluster": "nope"}]},
        {"name": "b", "listen": "127.0.0.1:8080", "cluster": "app"}],
      "clusters": [{"name": "app", "endpoints": ["127.0.0.1:9000"], "circuit_breaker": {"ejection_time": 10}}]}"#;
    assert_eq!(errors_of(json, "c.json"), errs);
}

#[test]
fn parse_errors_say_what_was_expected_in_words() {
    let yaml = r#"
drain_timeout: soon
listeners:
  - name: a
    listen: [127.0.0.1, 80]
    trust_incoming_flags: yes please
    limits: { max_connections: -1 }
    routes:
      - split: [{ cluster: app, weight: ninety }, { cluster: app, weight: 10 }]
        retry: { attempts: 2.5, retry_on: [reset, 200] }
clusters:
  - { name: app, endpoints: ["127.0.0.1:1"], lb: random, protocol: { http: 2 } }
"#;
    let errs = errors_of(yaml, "c.yaml");
    assert_eq!(
        errs,
        [
            "drain_timeout: `soon` is not a duration (write e.g. `250ms`, `2s`, `1m`)",
            "listeners[0].listen: expected an IP address with a port such as 127.0.0.1:8080, found a list",
            "listeners[0].trust_incoming_flags: expected true or false, found `yes please`",
            "listeners[0].limits.max_connections: expected a whole number from 0 to 4294967295, found `-1`",
            "listeners[0].routes[0].split[0].weight: expected a whole number from 0 to 4294967295, found `ninety`",
            "listeners[0].routes[0].retry.attempts: expected a whole number from 0 to 4294967295, found `2.5`",
            "listeners[0].routes[0].retry.retry_on[1]: `200` is not a retry condition (connect-failure, reset, reset-before-request, timeout, 5xx, retriable-4xx, a status code 400-599, or a gRPC status: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)",
            "clusters[0].lb: `random` is not one of: ewma, least_request, round_robin, ring_hash",
            "clusters[0].protocol: expected one of: http1, http2, http3",
        ],
        "the rest of the file is still read"
    );
    for e in &errs {
        let (path, message) = e.split_once(": ").unwrap();
        assert!(!message.contains(path), "path repeated in `{e}`");
        assert!(
            !message.contains("u32") && !message.contains("invalid type"),
            "{e}"
        );
    }
}

#[test]
fn a_left_out_element_keeps_later_paths_in_the_files_terms() {
    let yaml = r#"
listeners:
  - just a name
  - { name: bad, listen: "localhost:1", cluster: nope1 }
  - { name: a, listen: "127.0.0.1:1", cluster: nope2 }
  - { listen: "127.0.0.1:2", cluster: nope3 }
clusters:
  - { name: app, endpoints: ["not an address", "127.0.0.1:3", "127.0.0.1:3"] }
  - { name: solo, endpoints: ["localhost:80"] }
"#;
    assert_eq!(
        errors_of(yaml, "c.yaml"),
        [
            "listeners[0]: expected a map of settings (`name: value`), found `just a name`",
            "listeners[1].listen: `localhost:1` is not an IP address with a port such as 127.0.0.1:8080",
            "listeners[3].name: missing: this field is required",
            "clusters[0].endpoints[0]: `not an address` is not an IP address with a port such as 127.0.0.1:8080",
            // Not also "clusters[1]: needs exactly one of endpoints, dns, k8s": with its
            // only endpoint left out, the cluster has none, but that is the same mistake.
            "clusters[1].endpoints[0]: `localhost:80` is not an IP address with a port such as 127.0.0.1:8080 (for a host name, use `dns:` instead of `endpoints`)",
            // A listener whose listen or name failed is still checked (with a stand-in).
            "listeners[1].cluster: unknown cluster `nope1`",
            "listeners[2].cluster: unknown cluster `nope2`",
            "listeners[3].cluster: unknown cluster `nope3`",
            "clusters[0].endpoints[2]: 127.0.0.1:3 is listed twice",
        ]
    );
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let n = 100_000;
    for (text, file) in [
        (
            format!("listeners: {}{}", "{a: ".repeat(n), "}".repeat(n)),
            "c.yaml",
        ),
        (
            format!("{{\"listeners\": {}{}}}", "[".repeat(n), "]".repeat(n)),
            "c.json",
        ),
    ] {
        let t = Instant::now();
        let err = load(&text, Some(file)).unwrap_err();
        assert!(t.elapsed().as_millis() < 200, "{:?}", t.elapsed());
        assert_eq!(
            err.to_string(),
            "the document is nested more than 64 levels deep"
        );
    }
    assert!(check_depth("a: [[[]]]", Format::Yaml).is_ok());
}

#[test]
fn overlapping_listen_addresses_are_refused_per_transport() {
    let with = |listens: &[(&str, &str)]| {
        let listeners: String = listens
            .iter()
            .enumerate()
            .map(|(i, (addr, proto))| {
                let tls = if *proto == "http3" { ", tls: { cert: c, key: k }" } else { "" };
                format!("  - {{ name: l{i}, listen: \"{addr}\", protocol: {proto}, cluster: c{tls} }}\n")
            })
            .collect();
        let yaml = format!(
            "listeners:\n{listeners}clusters: [{{ name: c, endpoints: [\"127.0.0.1:9\"] }}]\n"
        );
        errors_of(&yaml, "c.yaml")
    };
    let clash = |a: &str, b: &str| {
        format!("listeners[1].listen: {b} overlaps {a} of listener `l0`: both need TCP port 8080 on the same address, so they cannot both be bound")
    };
    assert_eq!(
        with(&[("0.0.0.0:8080", "http"), ("127.0.0.1:8080", "http")]),
        [clash("0.0.0.0:8080", "127.0.0.1:8080")]
    );
    assert_eq!(
        with(&[("127.0.0.1:8080", "http"), ("0.0.0.0:8080", "tcp")]),
        [clash("127.0.0.1:8080", "0.0.0.0:8080")]
    );
    assert_eq!(
        with(&[("[::]:8080", "http"), ("127.0.0.1:8080", "http")]),
        [clash("[::]:8080", "127.0.0.1:8080")]
    );
    assert_eq!(
        with(&[("0.0.0.0:8080", "http"), ("[::]:8080", "http")]),
        [clash("0.0.0.0:8080", "[::]:8080")]
    );
    assert_eq!(
        with(&[("[::1]:8080", "http"), ("[::]:8080", "http")]),
        [clash("[::1]:8080", "[::]:8080")]
    );
    assert_eq!(
        with(&[
            ("127.0.0.1:8080", "http"),
            ("[::ffff:127.0.0.1]:8080", "http")
        ]),
        [clash("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080")]
    );
    // Apart: other addresses, other ports, port 0, TCP beside UDP, IPv4 wildcard beside an
    // IPv6 address.
    for ok in [
        vec![("127.0.0.1:8080", "http"), ("127.0.0.2:8080", "http")],
        vec![("0.0.0.0:8080", "http"), ("0.0.0.0:8081", "http")],
        vec![
            ("0.0.0.0:0", "http"),
            ("127.0.0.1:0", "http"),
            ("[::]:0", "tcp"),
        ],
        vec![("0.0.0.0:8080", "http"), ("[::]:8080", "http3")],
        vec![("0.0.0.0:8080", "http"), ("[::1]:8080", "http")],
    ] {
        assert_eq!(with(&ok), Vec::<String>::new(), "{ok:?}");
    }
    let udp = with(&[("[::]:8443", "http3"), ("127.0.0.1:8443", "http3")]);
    assert!(udp[0].contains("UDP port 8443"), "{udp:?}");
}

#[test]
fn a_round_trip_through_json_changes_nothing() {
    let yaml = r#"
admin: { listen: "[0:0::1]:9901" }
correlation: { request_id_header: X-Request-Id }
listeners:
  - name: in
    listen: 0.0.0.0:8443
    tls: { allow_identities: ["spiffe://td/ns/a/sa/web"] }
    routes:
      - match: { method: PURGE, headers: [{ name: X-Version, regex: "v[0-9]+" }] }
        split: [{ cluster: c, weight: 1 }]
        hash_on: header:X-User
        retry: { retry_on: [reset-before-request, 503, 5xx], retry_non_idempotent: true }
clusters:
  - name: c
    dns: checkout.shop.svc:8080
    protocol: http3
    fallback_period: 5s
    tls: { server_name: Checkout.Shop.svc, expect_identities: ["spiffe://td/ns/a/sa/c"] }
flags:
  f: { enabled: true, rules: [{ header: X-Group, values: [beta] }, { percent: 10, hash_on: "cookie:uid" }] }
"#;
    let cfg = load(yaml, Some("c.yaml")).unwrap();
    let json = serde_json::to_string(&cfg).unwrap();
    for written in [
        "\"[0:0::1]:9901\"",
        "\"X-Request-Id\"",
        "\"X-Version\"",
        "\"v[0-9]+\"",
        "\"header:X-User\"",
        "[\"reset-before-request\",\"503\",\"5xx\"]",
        "\"checkout.shop.svc:8080\"",
        "\"Checkout.Shop.svc\"",
        "\"X-Group\"",
        "\"cookie:uid\"",
        "\"PURGE\"",
    ] {
        assert!(json.contains(written), "{written} not in {json}");
    }
    let back = load(&json, Some("c.json")).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    // The parsed values are the ones the proxy uses.
    let route = &cfg.listeners[0].routes[0];
    assert_eq!(
        route.matches.method.as_deref(),
        Some(&http::Method::from_bytes(b"PURGE").unwrap())
    );
    assert_eq!(cfg.correlation.request_id_header.as_str(), "x-request-id");
    let retry = route.retry.as_ref().unwrap();
    assert!(
        retry.retry_non_idempotent && retry.retry_on.contains(RetryCondition::ResetBeforeRequest)
    );
    assert_eq!(cfg.clusters[0].fallback_period(), Duration::from_secs(5));
}

#[test]
fn the_new_fields_have_their_defaults_and_their_places() {
    let cfg = load(
        "listeners: [{ name: a, listen: 127.0.0.1:1, routes: [{ cluster: c, retry: {} }] }]\nclusters: [{ name: c, endpoints: [\"127.0.0.1:2\"], circuit_breaker: {} }]\n",
        Some("c.yaml"),
    )
    .unwrap();
    let retry = cfg.listeners[0].routes[0].retry.as_ref().unwrap();
    assert!(!retry.retry_non_idempotent);
    assert_eq!(retry.retry_on, RetryOn::default());
    assert_eq!(
        cfg.clusters[0].circuit_breaker.unwrap().max_pending,
        0,
        "fail fast"
    );
    assert_eq!(cfg.clusters[0].fallback_period(), Duration::from_secs(30));
    let errs = errors_of(
        "clusters:\n  - { name: a, endpoints: [\"127.0.0.1:2\"], fallback_period: 5s }\n  - { name: b, endpoints: [\"127.0.0.1:3\"], protocol: http3, tls: {}, fallback_period: 0ms }\n",
        "c.yaml",
    );
    assert_eq!(
        errs,
        [
            "clusters[0].fallback_period: only applies to protocol http3",
            "clusters[1].fallback_period: must be greater than 0ms",
        ]
    );
}

#[test]
fn every_example_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")) {
            continue;
        }
        if let Err(e) = load_file(&path) {
            panic!("config/examples/{name} does not validate:\n{e}");
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(checked, ["sidecar.yaml", "standalone.yaml"]);
}

#[test]
fn workers_is_a_number_of_threads() {
    let cfg = crate::load("workers: 4\n", None).unwrap();
    assert_eq!(cfg.workers, Some(4));
    assert_eq!(crate::load("{}", None).unwrap().workers, None);
    let errs = crate::load("workers: 0\n", None).unwrap_err();
    assert_eq!(errs.to_string(), "workers: must be between 1 and 1024");
}

#[test]
fn anchors_that_nest_deeper_than_the_text_are_refused_as_too_deep() {
    // Each line nests 50 levels (the token count passes), but each alias repeats the line
    // above inside its own brackets: `c` is 150 levels deep, past the YAML reader's own
    // limit (128). That is reported as too deep, not as a syntax error.
    let (o, c) = ("[".repeat(50), "]".repeat(50));
    let text = format!("a: &x {o}1{c}\nb: &y {o}*x{c}\nc: {o}*y{c}\n");
    assert!(crate::depth::check_yaml(&text).is_ok());
    assert_eq!(
        errors_of(&text, "c.yaml"),
        ["the document is nested more than 64 levels deep"]
    );
    // 30 a line: 91 levels, read, then refused by the tree's depth.
    let (o, c) = ("[".repeat(30), "]".repeat(30));
    let text = format!("a: &x {o}1{c}\nb: &y {o}*x{c}\nc: {o}*y{c}\n");
    assert_eq!(
        errors_of(&text, "c.yaml"),
        ["the document is nested more than 64 levels deep"]
    );
}

#[test]
fn every_required_field_that_is_missing_is_reported_and_the_rest_still_checked() {
    // listeners[0] lacks both required fields, listeners[1] lacks the one filled last in
    // listeners[0]: each stand-in must fit although another listener (or the same one)
    // still misses a field, or a whole listener would be left out with its other errors.
    let yaml = "listeners:\n  - { cluster: nope1 }\n  - { name: m, cluster: nope2 }\n\
                clusters: [{ name: c, endpoints: [\"127.0.0.1:9\"] }]\n";
    assert_eq!(
        errors_of(yaml, "c.yaml"),
        [
            "listeners[0].name: missing: this field is required",
            "listeners[0].listen: missing: this field is required",
            "listeners[1].listen: missing: this field is required",
            "listeners[0].cluster: unknown cluster `nope1`",
            "listeners[1].cluster: unknown cluster `nope2`",
        ]
    );
}

#[test]
fn the_tag_spur_uses_inside_is_refused_in_a_file_like_any_other() {
    // `!spur-skipped` is the tag the reader gives a node it left out; written in a file
    // it must not make a node silently absent, in a map or in a list.
    let yaml = "node: !spur-skipped n\n\
                listeners:\n  - !spur-skipped { name: l }\n  - { name: m, listen: 127.0.0.1:1, cluster: c }\n\
                clusters: [{ name: c, endpoints: [\"127.0.0.1:9\"] }]\n";
    let tag = "YAML tags (`!name`) are not used in a Spur config";
    assert_eq!(
        errors_of(yaml, "c.yaml"),
        [format!("node: {tag}"), format!("listeners[0]: {tag}")]
    );
    assert_eq!(errors_of("!spur-skipped {}", "c.yaml"), [tag]);
}

#[test]
fn every_default_is_the_value_the_spec_shows() {
    // The same config three ways: every defaulted field written out with the value SPEC.md
    // (or README) gives as its default, each section left empty, and each left out.
    let written = r#"
drain_timeout: 10s
admin: { listen: 127.0.0.1:9901 }
correlation: { request_id_header: x-request-id, generate: true, trace_context: true }
listeners:
  - name: a
    listen: 127.0.0.1:1
    limits: { max_connections: 10000, max_header_bytes: 64KiB, header_timeout: 10s, idle_timeout: 5m, body_timeout: 30s }
    rate_limit: { requests: 5, per: 1s, key: route, max_keys: 100000 }
    routes:
      - cluster: c
        retry:
          attempts: 2
          retry_on: [connect-failure, reset]
          backoff: { base: 25ms, max: 250ms }
          budget: { ratio: 0.2, min_per_sec: 10 }
          max_body: 64KiB
        mirror: { cluster: c, percent: 100 }
      - redirect: { status: 301, host: example.com }
clusters:
  - name: c
    endpoints: [{ address: "127.0.0.1:2", weight: 1 }]
    connect_timeout: 1s
    circuit_breaker: { consecutive_failures: 5, ejection_time: 10s, max_ejection_percent: 50, max_requests: 1024, max_pending: 0 }
    health_check: { path: /h, interval: 5s, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2 }
"#;
    let load_ok = |text: &str| load(text, Some("c.yaml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let want = load_ok(written);
    let empty = |s: &str| {
        let mut out = s.to_string();
        for (from, to) in [
            ("{ listen: 127.0.0.1:9901 }", "{}"),
            (
                "{ request_id_header: x-request-id, generate: true, trace_context: true }",
                "{}",
            ),
            ("{ max_connections: 10000, max_header_bytes: 64KiB, header_timeout: 10s, idle_timeout: 5m, body_timeout: 30s }", "{}"),
            ("per: 1s, key: route, max_keys: 100000 ", ""),
            ("          attempts: 2\n          retry_on: [connect-failure, reset]\n", ""),
            ("{ base: 25ms, max: 250ms }", "{}"),
            ("{ ratio: 0.2, min_per_sec: 10 }", "{}"),
            ("\n          max_body: 64KiB", ""),
            (", percent: 100", ""),
            ("status: 301, ", ""),
            ("{ address: \"127.0.0.1:2\", weight: 1 }", "{ address: \"127.0.0.1:2\" }"),
            ("    connect_timeout: 1s\n", ""),
            ("{ consecutive_failures: 5, ejection_time: 10s, max_ejection_percent: 50, max_requests: 1024, max_pending: 0 }", "{}"),
            (", interval: 5s, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2", ""),
        ] {
            assert!(out.contains(from), "{from}");
            out = out.replace(from, to);
        }
        out
    };
    let emptied = empty(written);
    assert_eq!(load_ok(&emptied), want, "{emptied}");
    let left_out = emptied
        .replace("drain_timeout: 10s\n", "")
        .replace("correlation: {}\n", "")
        .replace("    limits: {}\n", "")
        .replace("          backoff: {}\n", "")
        .replace("          budget: {}", "          attempts: 2");
    assert_eq!(load_ok(&left_out), want, "{left_out}");
    assert_eq!(want.clusters[0].panic_threshold(), 50);
}
