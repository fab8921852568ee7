//! The `tracing` block, gRPC route matches, retry conditions and failure codes: as a user
//! writes them, and every mistake at its path.

use super::*;

fn errors_of(yaml: &str) -> Vec<String> {
    match load(yaml, Some("c.yaml")) {
        Ok(_) => vec![],
        Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
    }
}

const GOOD: &str = r#"
node: web-1
tracing:
  otlp_endpoint: http://otel-collector:4318/v1/traces
  sampling: 0.1
  propagation: [w3c, b3]
listeners:
  - name: in
    listen: 127.0.0.1:8080
    routes:
      - match: { grpc: { service: shop.Cart, method: Get } }
        cluster: api
        retry: { retry_on: [unavailable, resource-exhausted, "503"] }
      - match: { grpc: { service: shop.Cart } }
        cluster: api
clusters:
  - name: api
    protocol: http2
    endpoints: ["127.0.0.1:9000"]
    grpc_failure_codes: [unavailable, internal]
  - name: other
    endpoints: ["127.0.0.1:9001"]
"#;

#[test]
fn the_spec_example_loads_with_its_defaults() {
    let cfg = load(GOOD, Some("c.yaml")).unwrap();
    let t = cfg.tracing.as_ref().unwrap();
    assert_eq!(t.otlp_endpoint.get().authority(), "otel-collector:4318");
    assert_eq!(t.sampling, 0.1);
    assert_eq!(t.propagation, [Propagation::W3c, Propagation::B3]);
    let r = &cfg.listeners[0].routes[0];
    let g = r.matches.grpc.as_ref().unwrap();
    assert_eq!(
        (g.service.as_str(), g.method.as_ref().map(|m| m.as_str())),
        ("shop.Cart", Some("Get"))
    );
    let on = &r.retry.as_ref().unwrap().retry_on;
    assert!(on.contains(RetryCondition::Grpc(GrpcCode::UNAVAILABLE)));
    assert!(on.contains(RetryCondition::Grpc(GrpcCode::RESOURCE_EXHAUSTED)));
    assert!(on.contains(RetryCondition::Status(503)));
    assert_eq!(
        cfg.clusters[0].grpc_failure_codes(),
        [GrpcCode::UNAVAILABLE, GrpcCode::INTERNAL]
    );
    assert_eq!(
        cfg.clusters[1].grpc_failure_codes(),
        GrpcCode::default_failures()
    );
    // Written back as read (the control plane stores and pushes JSON).
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(load(&json, Some("c.json")).unwrap(), cfg);
    let minimal = load(
        "tracing: { otlp_endpoint: \"http://127.0.0.1:4318/v1/traces\" }\n",
        Some("c.yaml"),
    )
    .unwrap();
    let t = minimal.tracing.unwrap();
    assert_eq!((t.sampling, t.service_name), (1.0, None));
    assert_eq!(t.propagation, [Propagation::W3c, Propagation::B3]);
}

#[test]
fn mistakes_are_reported_at_their_paths() {
    let errs = errors_of(
        r#"
correlation: { trace_context: false }
tracing: { otlp_endpoint: "grpc://otel:4317", sampling: 1.5, service_name: " ", propagation: [] }
listeners:
  - name: in
    listen: 127.0.0.1:8080
    routes:
      - match: { grpc: { service: shop.Cart }, path_prefix: /x }
        cluster: api
        retry: { retry_on: [not-found] }
      - match: { grpc: { service: "shop/Cart", method: Get } }
        cluster: api
clusters:
  - { name: api, endpoints: ["127.0.0.1:9000"], grpc_failure_codes: [unavailable, Unavailable] }
"#,
    );
    for expected in [
        "tracing.otlp_endpoint: `grpc://` is not supported yet: OTLP over plain HTTP/protobuf (`http://`) is",
        "listeners[0].routes[0].retry.retry_on[0]: `not-found` is a gRPC status that is not retried (the gRPC conditions are cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)",
        "listeners[0].routes[1].match.grpc.service: `shop/Cart` is not a protobuf name: identifiers (letters, digits, `_`) joined by `.`",
    ] {
        assert!(errs.iter().any(|e| e == expected), "{expected} not in {errs:#?}");
    }
    assert!(
        errs.iter().any(|e| e.starts_with(
            "clusters[0].grpc_failure_codes[1]: `Unavailable` is not a gRPC status code name"
        )),
        "{errs:#?}"
    );
    // Validation errors, seen once the values parse.
    let errs = errors_of(
        r#"
correlation: { trace_context: false }
tracing: { otlp_endpoint: "http://otel:4318/v1/traces", sampling: 1.5, service_name: " ", propagation: [] }
listeners:
  - name: in
    listen: 127.0.0.1:8080
    routes:
      - match: { grpc: { service: shop.Cart }, path_prefix: /x }
        cluster: api
clusters:
  - { name: api, endpoints: ["127.0.0.1:9000"] }
"#,
    );
    assert_eq!(
        errs,
        [
            "listeners[0].routes[0].match.grpc: a gRPC match is a path match (`/service/method`): use it without path or path_prefix",
            "tracing.sampling: must be between 0 and 1",
            "tracing.service_name: must not be empty",
            "tracing.propagation: must name at least one format (w3c, b3)",
            "tracing: needs correlation.trace_context (spans are carried in trace headers)",
        ]
    );
}
