//! The `authz` block: SPEC's example reads into typed values and back unchanged, and every
//! mistake is reported at its path.

use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match load(yaml, Some("c.yaml")) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

/// SPEC's example, on an mTLS listener.
const SPEC_EXAMPLE: &str = r#"
listeners:
  - name: inbound
    listen: 127.0.0.1:8443
    tls: { cert: c.pem, key: k.pem, client_ca: ca.pem }
    cluster: app
    authz:
      default: allow
      rules:
        - name: probes
          action: allow
          to: { paths: [/healthz, /ready] }
        - name: web-reads
          action: allow
          from: { identities: ["spiffe://cluster.local/ns/shop/sa/web"], namespaces: [shop] }
          to: { path_prefixes: [/api/], methods: [GET, HEAD] }
        - name: no-admin
          action: deny
          to: { path_prefixes: [/admin] }
        - name: legacy
          action: allow
          from: { cidrs: ["10.0.0.0/8"], unauthenticated: true }
          to: { grpc: [{ service: shop.Cart, method: Get }], headers: [{ name: X-Tenant, value: a }] }
        - name: watch
          action: audit
          from: { identities: ["spiffe://cluster.local/ns/*/sa/batch-*", "spiffe://cluster.local/ns/ops/*"] }
clusters: [{ name: app, endpoints: ["127.0.0.1:8080"] }]
"#;

#[test]
fn specs_example_reads_into_typed_values_and_back() {
    let cfg = load(SPEC_EXAMPLE, Some("c.yaml")).unwrap();
    let a = cfg.listeners[0].authz.as_ref().unwrap();
    assert_eq!(a.default, AuthzDefault::Allow);
    assert_eq!(a.rules.len(), 5);
    assert_eq!(a.rules[2].action, AuthzAction::Deny);
    assert_eq!(a.rules[4].action, AuthzAction::Audit);
    let from = a.rules[1].from.as_ref().unwrap();
    assert!(from.identities.as_ref().unwrap()[0].matches("spiffe://cluster.local/ns/shop/sa/web"));
    assert_eq!(from.namespaces.as_ref().unwrap()[0].as_str(), "shop");
    let to = a.rules[1].to.as_ref().unwrap();
    assert_eq!(*to.methods.as_ref().unwrap()[1], http::Method::HEAD);
    let legacy = &a.rules[3];
    let cidr = &legacy.from.as_ref().unwrap().cidrs.as_ref().unwrap()[0];
    assert!(cidr.contains("10.1.2.3".parse().unwrap()));
    let grpc = &legacy.to.as_ref().unwrap().grpc.as_ref().unwrap()[0];
    assert_eq!(
        (
            grpc.service.as_str(),
            grpc.method.as_ref().map(|m| m.as_str())
        ),
        ("shop.Cart", Some("Get"))
    );
    let watch = a.rules[4]
        .from
        .as_ref()
        .unwrap()
        .identities
        .as_ref()
        .unwrap();
    assert!(watch[0].matches("spiffe://cluster.local/ns/jobs/sa/batch-7"));
    assert!(watch[1].matches("spiffe://cluster.local/ns/ops/sa/anyone"));
    // Stored and pushed as JSON: back exactly as written.
    let json = serde_json::to_string(&cfg).unwrap();
    for written in [
        "\"X-Tenant\"",
        "\"10.0.0.0/8\"",
        "\"spiffe://cluster.local/ns/*/sa/batch-*\"",
    ] {
        assert!(json.contains(written), "{written} not in {json}");
    }
    let back = load(&json, Some("c.json")).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
}

#[test]
fn values_that_do_not_parse_are_reported_at_their_paths() {
    let errs = errors_of(
        r#"
listeners:
  - name: in
    listen: 127.0.0.1:1
    tls: { cert: c.pem, key: k.pem, client_ca: ca.pem }
    cluster: app
    authz:
      default: maybe
      rules:
        - name: a
          action: permit
          from: { identities: ["spiffe://td/ns/a b/*"], cidrs: ["10.0.0.1/8"], namespaces: ["a/b"] }
          to: { methods: [get], grpc: [{ service: "shop/Cart" }], hosts: [x] }
clusters: [{ name: app, endpoints: ["127.0.0.1:8080"] }]
"#,
    );
    let p = "listeners[0].authz";
    for expected in [
        format!("{p}.default: `maybe` is not one of: allow, deny"),
        format!("{p}.rules[0].action: `permit` is not one of: allow, deny, audit"),
        format!("{p}.rules[0].from.identities[0]: `spiffe://td/ns/a b/*` is not a SPIFFE ID, where `*` stands for any part of one segment (`spiffe://td/ns/shop/sa/*`) and a final `/*` for everything below (`spiffe://td/ns/shop/*`); or `*` alone for any verified identity"),
        format!("{p}.rules[0].from.cidrs[0]: `10.0.0.1/8` has bits set after its /8 prefix: write `10.0.0.0/8`"),
        format!("{p}.rules[0].from.namespaces[0]: `a/b` is not a namespace: letters, digits, `.`, `-` and `_`, as in a SPIFFE ID"),
        format!("{p}.rules[0].to.methods[0]: `get` is not an HTTP method: methods are case-sensitive, write `GET`"),
        format!("{p}.rules[0].to.grpc[0].service: `shop/Cart` is not a protobuf name: identifiers (letters, digits, `_`) joined by `.`"),
        format!("{p}.rules[0].to.hosts: unknown field `hosts` (the fields here are: paths, path_prefixes, methods, headers, grpc)"),
    ] {
        assert!(errs.contains(&expected), "expected `{expected}` among {errs:#?}");
    }
    assert_eq!(errs.len(), 8, "{errs:#?}");
}

#[test]
fn rules_that_could_never_match_or_say_nothing_are_refused() {
    let errs = errors_of(
        r#"
listeners:
  - name: plain
    listen: 127.0.0.1:1
    cluster: app
    authz:
      rules:
        - { name: who, action: allow, from: { identities: ["*"] } }
        - { name: ns, action: deny, from: { namespaces: [shop] } }
        - { name: who, action: deny, to: { paths: [/x] } }
        - { name: default, action: deny, to: { paths: [admin, "/a?b=1"] } }
        - { name: allow_identities, action: allow }
        - { name: "bad name", action: allow, from: {}, to: {} }
        - { name: lists, action: allow, from: { cidrs: [] }, to: { methods: [], headers: [{ name: x-a }] } }
        - { name: anon, action: allow, from: { unauthenticated: false } }
  - name: mtls
    listen: 127.0.0.1:2
    cluster: app
    tls: { cert: c.pem, key: k.pem, client_ca: ca.pem, allow_identities: ["spiffe://td/a"] }
    authz:
      default: deny
      rules:
        - { name: both, action: allow, from: { identities: ["spiffe://td/*"], unauthenticated: true } }
  - name: raw
    listen: 127.0.0.1:3
    protocol: tcp
    cluster: app
    authz: { rules: [{ name: paths, action: deny, to: { paths: [/x] } }] }
  - name: nothing
    listen: 127.0.0.1:4
    cluster: app
    authz: { default: allow }
clusters: [{ name: app, endpoints: ["127.0.0.1:8080"] }]
"#,
    );
    let r = |l: usize, j: usize| format!("listeners[{l}].authz.rules[{j}]");
    let expected = [
        format!("{}.from.identities: needs a listener that verifies client certificates (tls with client_ca, or tls without files: the mesh CA); here no peer has an identity", r(0, 0)),
        format!("{}.from.namespaces: needs a listener that verifies client certificates (tls with client_ca, or tls without files: the mesh CA); here no peer has an identity", r(0, 1)),
        format!("{}.name: duplicate rule name `who`", r(0, 2)),
        format!("{}.name: `default` is reserved (`default` labels decisions no rule made, `allow_identities` the rule tls.allow_identities makes): choose another name", r(0, 3)),
        format!("{}.to.paths[0]: `admin` must start with `/`", r(0, 3)),
        format!("{}.to.paths[1]: `/a?b=1`: the query is not matched, write the path alone", r(0, 3)),
        format!("{}.name: `allow_identities` is reserved (`default` labels decisions no rule made, `allow_identities` the rule tls.allow_identities makes): choose another name", r(0, 4)),
        format!("{}.name: a rule name must be non-empty and use letters, digits, `-`, `_` and `.` only", r(0, 5)),
        format!("{}.from: is empty: give identities, namespaces, cidrs or unauthenticated, or leave `from` out to match every peer", r(0, 5)),
        format!("{}.to: is empty: give paths, path_prefixes, methods, headers or grpc, or leave `to` out to match every request", r(0, 5)),
        format!("{}.from.cidrs: is empty, so the rule could never match: list at least one, or leave the field out", r(0, 6)),
        format!("{}.to.methods: is empty, so the rule could never match: list at least one, or leave the field out", r(0, 6)),
        format!("{}.to.headers[0]: needs exactly one of value, present, regex", r(0, 6)),
        format!("{}.from.unauthenticated: `false` is not a condition: write `true` (peers without a verified identity), or leave it out (`identities: [\"*\"]` matches every verified identity)", r(0, 7)),
        "listeners[1].tls.allow_identities: use either tls.allow_identities or authz, not both: allow_identities is the rule `{ name: allow_identities, action: allow, from: { identities: [...] } }` with `default: deny`; write it in authz.rules".to_string(),
        format!("{}.from: never matches: an `unauthenticated` peer has no identity or namespace to match", r(1, 0)),
        format!("{}.to: a tcp listener sees connections, not requests: `to` applies to http and http3 listeners (a tcp listener decides at accept, by `from`)", r(2, 0)),
        "listeners[3].authz.rules: no rules and `default: allow`: this policy allows everything; add rules, or set `default: deny`".to_string(),
    ];
    for e in &expected {
        assert!(errs.contains(e), "expected `{e}` among {errs:#?}");
    }
    assert_eq!(errs.len(), expected.len(), "{errs:#?}");
}

#[test]
fn what_the_listener_can_know_is_accepted() {
    // tcp: from is fine; no tls: cidrs and unauthenticated are; the mesh CA (tls without
    // files) verifies clients; `default: deny` alone denies everything.
    load(
        r#"
listeners:
  - name: raw
    listen: 127.0.0.1:1
    protocol: tcp
    cluster: app
    tls: {}
    authz: { default: deny, rules: [{ name: web, action: allow, from: { identities: ["spiffe://td/ns/shop/sa/web"] } }] }
  - name: plain
    listen: 127.0.0.1:2
    cluster: app
    authz: { rules: [{ name: outside, action: deny, from: { cidrs: ["0.0.0.0/0"], unauthenticated: true } }] }
  - name: closed
    listen: 127.0.0.1:3
    cluster: app
    authz: { default: deny }
  - name: h3
    listen: 127.0.0.1:4
    protocol: http3
    cluster: app
    tls: {}
    authz: { rules: [{ name: no-admin, action: deny, to: { path_prefixes: [/admin] } }] }
clusters: [{ name: app, endpoints: ["127.0.0.1:8080"] }]
"#,
        None,
    )
    .expect("valid policies");
}
