//! The plan's edge-policy decisions as a table: rate limits, CORS preflights and refusals,
//! redirects. No sockets, no runtime.

use super::tests::{Said, CLIENT};
use super::*;
use crate::metrics::Metrics;
use crate::registry::Registry;

const CONFIG: &str = r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    routes:
      - name: api
        match: { path_prefix: /api, method: POST }
        cluster: app
        cors: { allow_origins: ["https://app.example.com"], allow_methods: [POST], max_age: 1m }
      - name: limited
        match: { path_prefix: /limited }
        cluster: app
        rate_limit: { requests: 1, per: 1m, burst: 2 }
      - name: per-ip
        match: { path_prefix: /per-ip }
        cluster: app
        rate_limit: { requests: 1, per: 1m, burst: 1, key: client_ip }
      - name: watch
        match: { path_prefix: /watch }
        cluster: app
        rate_limit: { requests: 1, per: 1m, burst: 1, mode: shadow }
      - name: old
        match: { path_prefix: /old }
        redirect: { status: 308, scheme: https, path_prefix: /new }
  - name: capped
    listen: 127.0.0.1:0
    cluster: app
    rate_limit: { requests: 1, per: 1m, burst: 1 }
clusters:
  - { name: app, endpoints: ["10.0.0.1:80"] }
"#;

fn snapshot() -> (Snapshot, Metrics) {
    let cfg = spur_config::load(CONFIG, Some("t.yaml")).expect("valid config");
    let metrics = Metrics::new();
    let snap = Snapshot::compile(Arc::new(cfg), 1, &Registry::default(), &metrics, None)
        .expect("compiles");
    (snap, metrics)
}

fn decide(
    snap: &Snapshot,
    listener: &str,
    peer: Peer<'_>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> Said {
    let mut b = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "svc.example");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut head = b.body(()).unwrap().into_parts().0;
    let lst = &snap.listeners[listener];
    let mut rng = fastrand::Rng::with_seed(7);
    let p = plan(snap, lst, peer, &mut head, Instant::now(), &mut rng);
    super::tests::said(&p)
}

fn answer(route: &str, status: u16, location: Option<&str>) -> Said {
    Said::Answer {
        route: route.into(),
        status,
        location: location.map(str::to_string),
    }
}

fn refuse(route: &str, reason: Reason) -> Said {
    Said::Refuse {
        route: route.into(),
        reason,
        status: reason.status().as_u16(),
    }
}

fn fwd(route: &str) -> Said {
    Said::Forward {
        route: route.into(),
        cluster: "app".into(),
    }
}

#[test]
fn cors_preflights_are_routed_as_the_request_they_announce() {
    let (snap, _) = snapshot();
    let d = |m: &str, h: &[(&str, &str)]| decide(&snap, "web", CLIENT, m, "/api/orders", h);
    let pre = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "POST"),
    ];
    // The route matches POST only: its preflight is answered all the same.
    assert_eq!(d("OPTIONS", &pre), answer("api", 204, None));
    let evil = [
        ("origin", "https://evil.test"),
        ("access-control-request-method", "POST"),
    ];
    assert_eq!(d("OPTIONS", &evil), refuse("api", Reason::CorsForbidden));
    assert_eq!(
        d("POST", &[("origin", "https://evil.test")]),
        refuse("api", Reason::CorsForbidden)
    );
    assert_eq!(
        d("POST", &[("origin", "https://app.example.com")]),
        fwd("api")
    );
    assert_eq!(d("POST", &[]), fwd("api"), "not a browser: no CORS");
    // A plain OPTIONS (no preflight headers) is routed as itself.
    assert_eq!(d("OPTIONS", &[]), fwd("default"));
}

#[test]
fn rate_limits_answer_429_or_count_in_shadow() {
    let (snap, metrics) = snapshot();
    let d = |path: &str, peer| decide(&snap, "web", peer, "GET", path, &[]);
    assert_eq!(d("/limited", CLIENT), fwd("limited"));
    assert_eq!(d("/limited", CLIENT), fwd("limited"), "the burst is 2");
    assert_eq!(d("/limited", CLIENT), answer("limited", 429, None));
    // client_ip: another client has its own bucket.
    let other = Peer {
        addr: "192.0.2.99:1".parse().unwrap(),
        ..CLIENT
    };
    assert_eq!(d("/per-ip", CLIENT), fwd("per-ip"));
    assert_eq!(d("/per-ip", CLIENT), answer("per-ip", 429, None));
    assert_eq!(d("/per-ip", other), fwd("per-ip"));
    // Shadow: let through, counted.
    for _ in 0..3 {
        assert_eq!(d("/watch", CLIENT), fwd("watch"));
    }
    let text = metrics.encode();
    for line in [
        r#"spur_rate_limited_total{listener="web",route="limited",mode="enforce"} 1"#,
        r#"spur_rate_limited_total{listener="web",route="watch",mode="shadow"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    // The listener's own limit, before routing.
    assert_eq!(
        decide(&snap, "capped", CLIENT, "GET", "/", &[]),
        fwd("default")
    );
    assert_eq!(
        decide(&snap, "capped", CLIENT, "GET", "/", &[]),
        Said::Answer {
            route: "-".into(),
            status: 429,
            location: None
        }
    );
}

#[test]
fn redirects_are_answered_with_their_location() {
    let (snap, _) = snapshot();
    assert_eq!(
        decide(&snap, "web", CLIENT, "GET", "/old/a?x=1", &[]),
        answer("old", 308, Some("https://svc.example/new/a?x=1"))
    );
}
