//! Edge policy: SPEC's example reads into typed values and back unchanged, and every mistake
//! is reported at its path.

use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match load(yaml, Some("c.yaml")) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

const SPEC_EXAMPLE: &str = r#"
listeners:
  - name: web
    listen: 127.0.0.1:8443
    tls: { cert: c.pem, key: k.pem, client_ca: ca.pem }
    x_forwarded: { trusted_hops: 1 }
    rate_limit: { requests: 1000, key: client_ip }
    routes:
      - name: api
        match: { path_prefix: /api }
        cluster: app
        rate_limit: { requests: 100, per: 1s, burst: 20, key: client_id, mode: enforce, scope: proxy, max_keys: 100000 }
        request_headers:  { set: { x-env: prod }, add: { x-via: spur }, remove: [x-debug] }
        response_headers: { set: { x-request-id: "%REQUEST_ID%" }, remove: [server] }
        rewrite: { path_prefix: /v2/, host: api.internal }
        cors: { allow_origins: ["https://app.example.com", "https://*.example.com"], allow_methods: [GET, POST],
                allow_headers: [content-type], expose_headers: [x-request-id], allow_credentials: true, max_age: 10m }
      - name: old
        match: { path_prefix: /old }
        redirect: { status: 308, scheme: https, host: example.com, port: 443, path_prefix: /new/ }
      - name: group
        match: { path_prefix: /g }
        cluster: app
        rate_limit: { requests: 300, scope: group, mode: shadow }
clusters:
  - name: app
    endpoints: ["127.0.0.1:8080"]
    panic_threshold: 40
    slow_start: { window: 30s }
"#;

#[test]
fn spec_example_reads_and_round_trips() {
    let cfg = load(SPEC_EXAMPLE, Some("c.yaml")).unwrap();
    let r = &cfg.listeners[0].routes[0];
    let rl = r.rate_limit.as_ref().unwrap();
    assert_eq!((rl.requests, rl.burst(), rl.max_keys), (100, 20, 100_000));
    assert_eq!(rl.key, LimitKey::ClientId);
    let h = r.request_headers.as_ref().unwrap();
    assert_eq!(h.set.0[0].0.as_str(), "x-env");
    assert_eq!(h.remove[0].as_str(), "x-debug");
    assert_eq!(
        r.rewrite.as_ref().unwrap().host.as_ref().unwrap().text(),
        "api.internal"
    );
    let group = cfg.listeners[0].routes[2].rate_limit.as_ref().unwrap();
    assert_eq!((group.burst(), group.scope), (300, LimitScope::Group));
    assert_eq!(group.key, LimitKey::Route);
    assert_eq!(cfg.clusters[0].panic_threshold(), 40);
    assert_eq!(cfg.listeners[0].x_forwarded.unwrap().trusted_hops, 1);
    // Through JSON (the control plane's push) and back: nothing changes.
    let json = serde_json::to_string(&cfg).unwrap();
    let back: Config = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    validate(&back).unwrap();
}

#[test]
fn every_mistake_has_its_path() {
    let errs = errors_of(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:8080
    x_forwarded: { trusted_hops: 11 }
    routes:
      - match: { path_prefix: /a }
        cluster: app
        rate_limit: { requests: 0, per: 0ms, key: client_id, scope: group, max_keys: 0 }
        request_headers: { set: { host: x, X-A: "1" }, add: { x-a: "2" }, remove: [content-length] }
        response_headers: { set: { x-b: "50% off" } }
        rewrite: { path_prefix: v2 }
        cors: { allow_origins: ["*"], allow_credentials: true, max_age: 48h }
      - match: { path_prefix: /b }
        cluster: app
        redirect: { status: 200, path: /x, path_prefix: /y }
      - match: { path_prefix: /c }
        redirect: { status: 302 }
      - match: { path_prefix: /d }
        cluster: app
        cors: { allow_origins: ["app.example.com"] }
  - name: raw
    listen: 127.0.0.1:8081
    protocol: tcp
    cluster: app
    rate_limit: { requests: 5 }
clusters:
  - name: app
    endpoints: ["127.0.0.1:9"]
    lb: ring_hash
    panic_threshold: 101
    slow_start: { window: 0ms }
"#,
    );
    let want = [
        "listeners[0].routes[0].response_headers.set.x-b: `50% off`: a `%` starts a variable (%REQUEST_ID%, %PEER_IDENTITY%, %FLAGS%); write `%%` for a percent sign",
        "listeners[0].routes[3].cors.allow_origins[0]: `app.example.com` is not `*`, an origin such as https://app.example.com, or https://*.example.com: it starts with http:// or https://",
        "listeners[0].x_forwarded.trusted_hops: must be between 0 and 10",
        "listeners[0].routes[0].rate_limit.requests: must be between 1 and 1000000000",
        "listeners[0].routes[0].rate_limit.per: must be greater than 0ms",
        "listeners[0].routes[0].rate_limit.max_keys: must be between 1 and 10000000",
        "listeners[0].routes[0].rate_limit.key: client_id is the verified mTLS identity: the listener needs tls with client_ca (or tls without files, the mesh CA)",
        "listeners[0].routes[0].rate_limit.scope: not supported yet: a group limit is one bucket shared by the group's proxies (key: route)",
        "listeners[0].routes[0].request_headers.set.host: `host` is set by `rewrite.host`",
        "listeners[0].routes[0].request_headers.add.x-a: `x-a` is given twice in set and add",
        "listeners[0].routes[0].request_headers.remove.content-length: `content-length` describes the connection or the message framing; Spur manages it",
        "listeners[0].routes[0].rewrite.path_prefix: `v2` must start with `/`",
        "listeners[0].routes[0].cors.allow_credentials: with allow_origins `*`, every web site could send requests carrying the user's cookies: list the origins",
        "listeners[0].routes[0].cors.max_age: must be at most 24h",
        "listeners[0].routes[1].redirect.status: must be 301, 302, 303, 307 or 308",
        "listeners[0].routes[1].redirect: use either path or path_prefix, not both",
        "listeners[0].routes[1].cluster: a redirect route answers itself and sends nothing upstream: leave this out",
        "listeners[0].routes[2].redirect: needs scheme, host, port, path or path_prefix (a redirect to the same URL loops)",
        "listeners[1].rate_limit: not supported yet on tcp listeners (http and http3 only)",
        "clusters[0].panic_threshold: must be between 0 and 100",
        "clusters[0].slow_start.window: must be greater than 0ms",
        "clusters[0].slow_start: not supported with lb ring_hash: a key stays on its endpoint, so there is no share to ramp (use ewma, least_request or round_robin)",
    ];
    for w in want {
        assert!(
            errs.iter().any(|e| e == w),
            "missing: {w}\nall:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(errs.len(), want.len(), "{}", errs.join("\n"));
}

#[test]
fn keys_and_templates_are_parse_errors_at_their_path() {
    let errs = errors_of(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:8080
    routes:
      - match: { path_prefix: /a }
        cluster: app
        rate_limit: { requests: 5, key: ip, mode: strict }
        request_headers: { set: { "bad name": x, x-c: "%HOST%" } }
        rewrite: { host: "a b" }
clusters: [{ name: app, endpoints: ["127.0.0.1:9"] }]
"#,
    );
    let joined = errs.join("\n");
    for w in [
        "listeners[0].routes[0].rate_limit.key: `ip` is not a rate limit key (client_id, client_ip, header:NAME or route)",
        "listeners[0].routes[0].rate_limit.mode: `strict` is not one of: enforce, shadow",
        "listeners[0].routes[0].request_headers.set.bad name: `bad name` is not a valid header name",
        "listeners[0].routes[0].request_headers.set.x-c: `%HOST%`: unknown variable `%HOST%` (known: %REQUEST_ID%, %PEER_IDENTITY%, %FLAGS%; `%%` is a percent sign)",
        "listeners[0].routes[0].rewrite.host: `a b` is not a host name (with an optional port) such as api.internal",
    ] {
        assert!(errs.iter().any(|e| e == w), "missing: {w}\nall:\n{joined}");
    }
}
