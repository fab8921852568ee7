use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match load(yaml, Some("c.yaml")) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_has(errors: &[String], expected: &str) {
    assert!(
        errors.iter().any(|e| e == expected),
        "expected error `{expected}` among {errors:#?}"
    );
}

const GOOD: &str = r#"
node: orders-1
drain_timeout: 5s
admin: { listen: 127.0.0.1:9901 }
listeners:
  - name: inbound
    listen: 0.0.0.0:8443
    cluster: app
    limits: { max_connections: 100, max_header_bytes: 16KiB, header_timeout: 5s, idle_timeout: 1m }
    routes:
      - name: api
        match: { path_prefix: /api, method: GET, headers: [{ name: x-a, value: b }, { name: x-c, present: true }, { name: x-d, regex: "^v[0-9]+$" }] }
        split:
          - { cluster: app, weight: 90 }
          - { cluster: canary, weight: 10 }
        hash_on: header:x-user-id
        timeout: 2s
      - match: { host: example.com, path: /exact }
        cluster: canary
  - name: raw
    listen: 127.0.0.1:9000
    protocol: tcp
    cluster: app
clusters:
  - name: app
    endpoints: ["127.0.0.1:8080", { address: "127.0.0.1:8081", weight: 2 }]
    lb: least_request
  - name: canary
    endpoints: ["[::1]:8080"]
    protocol: http2
    lb: round_robin
    connect_timeout: 250ms
"#;

#[test]
fn a_good_config_loads() {
    let cfg = load(GOOD, None).unwrap();
    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(cfg.listeners[0].limits.max_header_bytes, ByteSize::kib(16));
    assert_eq!(cfg.listeners[1].limits, Limits::default());
    assert_eq!(cfg.clusters[1].protocol, UpstreamProtocol::Http2);
    assert_eq!(
        summary(&cfg),
        "ok: 2 listener(s), 2 route(s), 2 cluster(s) with 3 static endpoint(s), 0 flag(s)"
    );
}

#[test]
fn defaults_are_the_documented_ones() {
    let cfg = load("listeners: []", None).unwrap();
    assert_eq!(cfg.drain_timeout, Duration::from_secs(10));
    assert_eq!(cfg.correlation.request_id_header.text(), "x-request-id");
    assert!(cfg.correlation.generate && cfg.correlation.trace_context);
    let l = Limits::default();
    assert_eq!(
        (
            l.max_connections,
            l.max_header_bytes,
            l.header_timeout,
            l.idle_timeout
        ),
        (
            10_000,
            ByteSize::kib(64),
            Duration::from_secs(10),
            Duration::from_secs(300)
        )
    );
    assert!(load("", Some("empty.yaml")).is_ok());
}

#[test]
fn every_error_is_reported_with_its_path() {
    let errs = errors_of(
        r#"
admin: { listen: "localhost" }
correlation: { request_id_header: "bad header" }
listeners:
  - name: a
    listen: 127.0.0.1:80
    routes:
      - match: { path: nope, path_prefix: /x, headers: [{ name: x, value: a, present: true }] }
        cluster: missing
      - split: [{ cluster: app, weight: 0 }]
      - cluster: app
        split: [{ cluster: app, weight: 1 }]
      - {}
      - match: { method: "GE T", headers: [{ name: y, regex: "(" }] }
        split: [{ cluster: app, weight: 1 }]
        hash_on: ip:x
  - name: a
    listen: 127.0.0.1:80
    protocol: tcp
clusters:
  - name: app
    endpoints: ["127.0.0.1:1", "127.0.0.1:1", "svc.local:80", { address: "127.0.0.1:2", weight: 0 }]
    connect_timeout: 0ms
  - name: app
    endpoints: []
"#,
    );
    for expected in [
        "admin.listen: `localhost` is not an IP address with a port such as 127.0.0.1:8080",
        "correlation.request_id_header: `bad header` is not a valid header name",
        "listeners[0].routes[0].match: use either path or path_prefix, not both",
        "listeners[0].routes[0].match.path: `nope` must start with `/`",
        "listeners[0].routes[4].match.method: `GE T` is not an HTTP method such as GET",
        "listeners[0].routes[0].match.headers[0]: needs exactly one of value, present, regex",
        "listeners[0].routes[0].cluster: unknown cluster `missing`",
        "listeners[0].routes[1].split: weights add up to 0: at least one must be above 0",
        "listeners[0].routes[2]: use either cluster or split, not both",
        "listeners[0].routes[4].hash_on: `ip:x` must be `header:NAME` or `cookie:NAME`",
        "listeners[0].routes[3]: needs a cluster, a split or a redirect",
        "listeners[1].name: duplicate listener name `a`",
        "listeners[1].listen: 127.0.0.1:80 is used by another listener (`a`)",
        "listeners[1].cluster: a tcp listener needs a cluster",
        "clusters[0].endpoints[1]: 127.0.0.1:1 is listed twice",
        "clusters[0].endpoints[2]: `svc.local:80` is not an IP address with a port such as 127.0.0.1:8080 (for a host name, use `dns:` instead of `endpoints`)",
        "clusters[0].endpoints[3].weight: must be between 1 and 10000",
        "clusters[0].connect_timeout: must be greater than 0ms",
        "clusters[1].name: duplicate cluster name `app`",
        "clusters[1]: needs exactly one of endpoints, dns, k8s",
    ] {
        assert_has(&errs, expected);
    }
    assert_has(
        &errs,
        "listeners[0].routes[4].match.headers[0].regex: `(` is not a valid regular expression: unclosed group",
    );
    // Each path once: no message repeats its path, and no path comes twice.
    let paths: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
    let unique: std::collections::BTreeSet<&str> = paths.iter().copied().collect();
    assert_eq!(paths.len(), unique.len(), "{errs:#?}");
    assert!(
        errs.iter()
            .all(|e| e.matches("listeners[").count() + e.matches("clusters[").count() <= 1),
        "{errs:#?}"
    );
}

#[test]
fn retry_ranges_are_checked() {
    let errs = errors_of(
        r#"
listeners:
  - name: a
    listen: 127.0.0.1:1
    routes:
      - cluster: c
        retry: { attempts: 11, retry_on: [connect-failure, "200", teapot], backoff: { base: 2s, max: 1s }, budget: { ratio: 1.5 } }
clusters: [{ name: c, endpoints: ["127.0.0.1:2"] }]
"#,
    );
    assert_has(
        &errs,
        "listeners[0].routes[0].retry.attempts: must be between 1 and 10",
    );
    assert_has(&errs, "listeners[0].routes[0].retry.retry_on[1]: `200` is not a retry condition (connect-failure, reset, reset-before-request, timeout, 5xx, retriable-4xx, a status code 400-599, or a gRPC status: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)");
    assert!(errs
        .iter()
        .any(|e| e.starts_with("listeners[0].routes[0].retry.retry_on[2]:")));
    assert_has(
        &errs,
        "listeners[0].routes[0].retry.backoff: base must not exceed max",
    );
    assert_has(
        &errs,
        "listeners[0].routes[0].retry.budget.ratio: must be between 0 and 1",
    );
}

#[test]
fn http3_settings_are_checked() {
    // One port for TCP and UDP is fine; http3 needs tls; original_dst and alt_svc_h3 have
    // their places.
    let ok = errors_of(
        r#"
listeners:
  - name: a
    listen: 127.0.0.1:8443
    cluster: c
    alt_svc_h3: 8443
    tls: { cert: Cargo.toml, key: Cargo.toml }
  - name: q
    listen: 127.0.0.1:8443
    protocol: http3
    cluster: c
    tls: { cert: Cargo.toml, key: Cargo.toml }
clusters:
  - name: c
    endpoints: ["127.0.0.1:3"]
    protocol: http3
    fallback: http2
    tls: { ca: Cargo.toml }
"#,
    );
    assert!(ok.is_empty(), "{ok:#?}");
    let errs = errors_of(
        r#"
listeners:
  - name: q
    listen: 127.0.0.1:2
    protocol: http3
    cluster: c
    original_dst: true
  - name: t
    listen: 127.0.0.1:3
    protocol: tcp
    cluster: c
    alt_svc_h3: 8443
clusters:
  - name: c
    endpoints: ["127.0.0.1:3"]
    protocol: http3
    fallback: http3
"#,
    );
    for expected in [
        "listeners[0].tls: an http3 listener needs tls (QUIC always encrypts)",
        "listeners[0].original_dst: applies to tcp and http listeners (redirected TCP connections)",
        "listeners[1].alt_svc_h3: applies to http listeners (it advertises an http3 one)",
        "clusters[0].tls: an http3 cluster needs tls (QUIC always encrypts)",
        "clusters[0].fallback: must be http1 or http2",
    ] {
        assert_has(&errs, expected);
    }
    assert_eq!(errs.len(), 5, "{errs:#?}");
    let cfg = load("access_log: { query: true }\n", Some("c.yaml")).unwrap();
    assert!(cfg.access_log.query);
    assert!(
        !load("{}", Some("c.json")).unwrap().access_log.query,
        "off by default"
    );
    let errs = errors_of("access_log: { query: yes please }\n");
    assert!(
        errs.iter().any(|e| e.starts_with("access_log.query")),
        "{errs:#?}"
    );
    let errs = errors_of("access_log: { queries: true }\n");
    assert!(errs.iter().any(|e| e.contains("queries")), "{errs:#?}");
}

#[test]
fn original_dst_listeners_need_no_cluster() {
    let yaml = r#"
listeners:
  - name: out
    listen: 127.0.0.1:15001
    original_dst: true
  - name: raw
    listen: 127.0.0.1:15002
    protocol: tcp
    original_dst: true
clusters:
  - name: c
    endpoints: ["10.0.0.1:8080"]
"#;
    assert_eq!(errors_of(yaml), Vec::<String>::new());
    let without = yaml.replace("    original_dst: true\n", "");
    let errs = errors_of(&without);
    assert_has(
        &errs,
        "listeners[0]: an http listener needs routes, a default cluster or original_dst",
    );
    assert_has(
        &errs,
        "listeners[1].cluster: a tcp listener needs a cluster",
    );
}

#[test]
fn tls_on_listeners_and_clusters_is_accepted() {
    let cfg = load(
        r#"
listeners:
  - name: inbound
    listen: 127.0.0.1:1
    cluster: c
    tls:
      cert: /etc/spur/tls/tls.crt
      key: /etc/spur/tls/tls.key
      client_ca: /etc/spur/tls/ca.crt
      allow_identities: ["spiffe://cluster.local/ns/shop/sa/web"]
clusters:
  - name: c
    endpoints: ["127.0.0.1:2"]
    tls:
      ca: /etc/spur/tls/ca.crt
      cert: /etc/spur/tls/tls.crt
      key: /etc/spur/tls/tls.key
      server_name: checkout.shop.svc
      expect_identities: ["spiffe://cluster.local/ns/shop/sa/checkout"]
"#,
        None,
    )
    .expect("tls settings validate");
    let tls = cfg.clusters[0].tls.as_ref().unwrap();
    assert_eq!(
        tls.server_name.as_ref().map(|n| n.text()),
        Some("checkout.shop.svc")
    );
    // Files are read by the proxy when it applies the config, not by validation.
    assert!(errors_of("listeners: [{ name: a, listen: 127.0.0.1:1, cluster: c, tls: { cert: c.pem } }]\nclusters: [{ name: c, endpoints: [\"127.0.0.1:2\"] }]")
        .iter()
        .any(|e| e == "listeners[0].tls: cert and key go together"));
    // No files at all: the proxy's workload identity (whether it has one is checked when
    // the config is applied); allow_identities then needs no client_ca (the mesh CA).
    load(
        "listeners: [{ name: a, listen: 127.0.0.1:1, cluster: c, tls: { allow_identities: [\"spiffe://td/a\"] } }]\nclusters: [{ name: c, endpoints: [\"127.0.0.1:2\"], tls: {} }]",
        None,
    )
    .expect("tls blocks without files validate");
}

#[test]
fn flag_rules_and_identities_are_checked() {
    let errs = errors_of(
        r#"
listeners:
  - name: a
    listen: 127.0.0.1:1
    cluster: c
    tls: { cert: c.pem, key: k.pem, allow_identities: ["web"] }
  - name: b
    listen: 127.0.0.1:2
    cluster: c
    tls: { cert: c.pem, key: k.pem, allow_identities: ["spiffe://td/web"] }
clusters:
  - name: c
    endpoints: ["127.0.0.1:2"]
    protocol: http1
    fallback: http2
flags:
  f:
    enabled: true
    rules:
      - { header: x-group, percent: 10 }
      - { cookie: beta }
      - { percent: 150 }
"#,
    );
    assert_has(
        &errs,
        "listeners[0].tls.allow_identities[0]: `web` is not a SPIFFE ID: it must start with spiffe://",
    );
    assert_has(
        &errs,
        "listeners[1].tls.allow_identities: needs client_ca: identities come from verified client certificates",
    );
    assert_has(
        &errs,
        "clusters[0].fallback: only applies to protocol http3",
    );
    assert_has(
        &errs,
        "flags.f.rules[0]: needs exactly one of header, cookie, percent",
    );
    assert_has(&errs, "flags.f.rules[1].values: needs at least one value");
    assert_has(&errs, "flags.f.rules[2].percent: must be between 0 and 100");
}

#[test]
fn parse_errors_name_the_field() {
    let err = load(
        "listeners:\n  - name: a\n    listen: 127.0.0.1:1\n    limits: { idle_timeout: 5 }\n",
        None,
    )
    .unwrap_err();
    assert_eq!(err.errors.len(), 1);
    assert_eq!(err.errors[0].path, "listeners[0].limits.idle_timeout");
    let err = load("drain_timeout: 10x", None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("drain_timeout: `10x` has an unknown unit"),
        "{err}"
    );
}

#[test]
fn k8s_clusters_need_discovery_and_a_well_formed_target() {
    let yaml = r#"
listeners: [{ name: web, listen: 127.0.0.1:1, cluster: a }]
clusters:
  - { name: a, k8s: "checkout.shop:8080" }
  - { name: b, k8s: "foo" }
  - { name: c, k8s: "Checkout.shop:8080" }
  - { name: d, k8s: "checkout.shop.svc:8080" }
  - { name: e, k8s: "checkout.shop:0" }
  - { name: f, k8s: "checkout.shop:8080", endpoints: ["127.0.0.1:1"] }
"#;
    // A proxy (file, `spur validate`): every well-formed k8s cluster is refused, saying why.
    let errs = errors_of(yaml);
    let needs = format!("clusters[0].k8s: {K8S_NEEDS_DISCOVERY}");
    assert_has(&errs, &needs);
    assert!(K8S_NEEDS_DISCOVERY.contains("spur control --kubernetes"));
    let form = |path: &str, value: &str| format!("{path}: `{value}`: {K8S_TARGET_FORM}");
    for (path, value) in [
        ("clusters[1].k8s", "foo"),
        ("clusters[2].k8s", "Checkout.shop:8080"),
        ("clusters[3].k8s", "checkout.shop.svc:8080"),
        ("clusters[4].k8s", "checkout.shop:0"),
    ] {
        assert_has(&errs, &form(path, value));
    }
    assert!(K8S_TARGET_FORM.starts_with("expected name.namespace:port"));
    assert_has(
        &errs,
        "clusters[5]: needs exactly one of endpoints, dns, k8s",
    );

    // A control plane with discovery: only the malformed ones and the mixed one remain.
    let rules = Rules {
        k8s_discovery: true,
        rendered: false,
    };
    let errs: Vec<String> = load_text(yaml, Format::Yaml, rules)
        .unwrap_err()
        .errors
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        !errs.iter().any(|e| e.starts_with("clusters[0]")),
        "{errs:#?}"
    );

    let target: K8sTarget = "checkout.shop:8080".parse().unwrap();
    assert_eq!(
        (target.name.as_str(), target.namespace.as_str(), target.port),
        ("checkout", "shop", 8080)
    );
    assert_eq!(target.to_string(), "checkout.shop:8080");
    assert!(
        "9lives.shop:80".parse::<K8sTarget>().is_err(),
        "a Service name starts with a letter"
    );
    assert!(
        "web.9-ns:80".parse::<K8sTarget>().is_ok(),
        "a namespace may start with a digit"
    );
}

#[test]
fn only_rendered_configs_may_have_a_cluster_without_endpoints() {
    let yaml = "listeners: [{ name: web, listen: 127.0.0.1:1, cluster: a }]\nclusters: [{ name: a, endpoints: [] }]\n";
    assert_eq!(
        errors_of(yaml),
        vec!["clusters[0]: needs exactly one of endpoints, dns, k8s".to_string()]
    );
    let cfg = parse(yaml, Format::Yaml).unwrap();
    let rendered = Rules {
        k8s_discovery: false,
        rendered: true,
    };
    assert_eq!(validate_with(&cfg, rendered), Ok(()));
}

#[test]
fn hostile_input_settings_are_checked() {
    let ok = errors_of(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    allow_encoded_slashes: true
    routes:
      - { match: { path_prefix: /ws }, cluster: c, upgrades: [websocket, My-Proto] }
      - { match: { path_prefix: /plain }, cluster: c, upgrades: [] }
clusters:
  - { name: c, endpoints: ["127.0.0.1:1"] }
"#,
    );
    assert!(ok.is_empty(), "{ok:#?}");
    let errs = errors_of(
        r#"
listeners:
  - name: raw
    listen: 127.0.0.1:0
    protocol: tcp
    cluster: c
    allow_encoded_slashes: true
  - name: web
    listen: 127.0.0.1:0
    limits: { body_timeout: 0ms }
    routes:
      - { cluster: c, upgrades: [websocket, h2c, "two words", ""] }
clusters:
  - { name: c, endpoints: ["127.0.0.1:1"] }
"#,
    );
    for expected in [
        "listeners[0].allow_encoded_slashes: applies to http and http3 listeners (a tcp listener reads no paths)",
        "listeners[1].routes[0].upgrades[1]: h2c is never tunnelled: requests inside it would skip routing, header hygiene, the access log and metrics (Spur strips h2c upgrades; clients can speak HTTP/2 to Spur directly)",
        "listeners[1].routes[0].upgrades[2]: `two words` is not a protocol name (letters, digits and !#$%&'*+-.^_`|~)",
        "listeners[1].routes[0].upgrades[3]: `` is not a protocol name (letters, digits and !#$%&'*+-.^_`|~)",
        "listeners[1].limits.body_timeout: must be greater than 0ms",
    ] {
        assert_has(&errs, expected);
    }
    assert_eq!(errs.len(), 5, "{errs:#?}");
    let cfg = load("access_log: { query: true }\n", Some("c.yaml")).unwrap();
    assert!(cfg.access_log.query);
    assert!(
        !load("{}", Some("c.json")).unwrap().access_log.query,
        "off by default"
    );
    let errs = errors_of("access_log: { query: yes please }\n");
    assert!(
        errs.iter().any(|e| e.starts_with("access_log.query")),
        "{errs:#?}"
    );
    let errs = errors_of("access_log: { queries: true }\n");
    assert!(errs.iter().any(|e| e.contains("queries")), "{errs:#?}");
}
