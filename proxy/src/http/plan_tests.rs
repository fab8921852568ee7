//! The plan as a table: a config, a request head, what the connection knows, and the
//! decision expected. No sockets, no runtime.

use super::*;
use crate::metrics::Metrics;
use crate::registry::Registry;
use std::time::Duration;

const CONFIG: &str = r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: fallback
    limits: { max_header_bytes: 1KiB }
    routes:
      - name: beta
        match: { path_prefix: /shop, flag: new-shop }
        cluster: v2
      - name: shop
        match: { path_prefix: /shop }
        split: [{ cluster: v1, weight: 50 }, { cluster: v2, weight: 50 }]
        hash_on: header:x-user
        timeout: 2s
        retry: { attempts: 3, retry_on: [connect-failure] }
        mirror: { cluster: v2, percent: 100 }
      - name: admin
        match: { path: /admin, method: POST, host: ops.example, headers: [{ name: x-team, value: sre }] }
        cluster: v1
      - name: broken
        match: { path_prefix: /broken }
        cluster: v1
        fault: { abort: { percent: 100, status: 418 } }
      - name: slow
        match: { path_prefix: /slow }
        cluster: v1
        fault: { delay: { percent: 100, duration: 300ms } }
  - name: strict
    listen: 127.0.0.1:0
    routes:
      - match: { path_prefix: /only }
        cluster: v1
  - name: out
    listen: 127.0.0.1:0
    original_dst: true
  - name: guarded
    listen: 127.0.0.1:0
    cluster: fallback
    limits: { max_header_bytes: 1KiB }
    authz:
      default: deny
      rules:
        - { name: internal, action: allow, from: { cidrs: ["192.0.2.0/24"] } }
        - { name: no-admin, action: deny, to: { path_prefixes: [/admin] } }
clusters:
  - { name: v1, endpoints: ["10.0.0.1:80"] }
  - { name: v2, endpoints: ["10.0.0.2:80", "10.0.0.3:80"] }
  - { name: fallback, endpoints: ["10.0.0.9:80"] }
flags:
  new-shop:
    enabled: true
    rules: [{ header: x-group, values: [beta] }]
"#;

fn snapshot() -> Snapshot {
    snapshot_and_metrics().0
}

fn snapshot_and_metrics() -> (Snapshot, Metrics) {
    let cfg = spur_config::load(CONFIG, Some("t.yaml")).expect("valid config");
    let registry = Registry::default();
    let metrics = Metrics::new();
    let snap = Snapshot::compile(Arc::new(cfg), 1, &registry, &metrics, None).expect("compiles");
    (snap, metrics)
}

/// The value of one series, as `/metrics` shows it.
fn metric_value(metrics: &Metrics, series: &str) -> Option<f64> {
    let text = metrics.encode();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{series} ")))?;
    line.rsplit_once(' ')?.1.parse().ok()
}

/// A request head; HTTP/1.1 needs a Host, so one is added where the case gives none.
fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if !uri.starts_with("http") && !headers.iter().any(|(k, _)| *k == "host") {
        b = b.header("host", "svc.example");
    }
    b.body(()).unwrap().into_parts().0
}

pub(super) const CLIENT: Peer<'static> = Peer {
    addr: SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(192, 0, 2, 7),
        40000,
    )),
    identity: None,
    original_dst: None,
};

struct Case {
    listener: &'static str,
    head: Parts,
    peer: Peer<'static>,
}

fn case(method: &str, uri: &str, headers: &[(&str, &str)]) -> Case {
    Case {
        listener: "web",
        head: head(method, uri, headers),
        peer: CLIENT,
    }
}

/// What a plan says, in a form a table can compare.
#[derive(Debug, PartialEq)]
pub(super) enum Said {
    Forward {
        route: String,
        cluster: String,
    },
    Refuse {
        route: String,
        reason: Reason,
        status: u16,
    },
    /// An answer with headers of its own: its status and `Location`, if any.
    Answer {
        route: String,
        status: u16,
        location: Option<String>,
    },
}

fn decide<'s>(snap: &'s Snapshot, c: &Case) -> (Said, Plan<'s>) {
    let lst = &snap.listeners[c.listener];
    let mut rng = fastrand::Rng::with_seed(7);
    let mut head = c.head.clone();
    let p = plan(snap, lst, c.peer, &mut head, Instant::now(), &mut rng);
    (said(&p), p)
}

/// What a plan says.
pub(super) fn said(p: &Plan<'_>) -> Said {
    let route = p.route_name.as_deref().unwrap_or("-").to_string();
    match &p.action {
        Action::Forward(f) => Said::Forward {
            route,
            cluster: f.cluster.name.to_string(),
        },
        Action::Refuse(r) => Said::Refuse {
            route,
            reason: r.reason,
            status: r.status.as_u16(),
        },
        Action::Answer(a) => Said::Answer {
            route,
            status: a.status.as_u16(),
            location: a
                .headers
                .get("location")
                .map(|v| v.to_str().unwrap().to_string()),
        },
    }
}

fn fwd(route: &str, cluster: &str) -> Said {
    Said::Forward {
        route: route.into(),
        cluster: cluster.into(),
    }
}

fn refuse(route: &str, reason: Reason, status: u16) -> Said {
    Said::Refuse {
        route: route.into(),
        reason,
        status,
    }
}

#[test]
fn routes_and_refusals() {
    let snap = snapshot();
    let big = "x".repeat(2000);
    let table: Vec<(Case, Said)> = vec![
        (
            case("GET", "/shop/cart", &[("x-user", "u1")]),
            fwd("shop", "v2"),
        ),
        (
            case("GET", "/shop", &[("x-group", "beta")]),
            fwd("beta", "v2"),
        ),
        (case("GET", "/elsewhere", &[]), fwd("default", "fallback")),
        (
            case("POST", "http://ops.example/admin", &[("x-team", "sre")]),
            fwd("admin", "v1"),
        ),
        (
            case(
                "POST",
                "/admin",
                &[("host", "ops.example:8080"), ("x-team", "sre")],
            ),
            fwd("admin", "v1"),
        ),
        // One condition off each time: the default cluster answers.
        (
            case(
                "GET",
                "/admin",
                &[("host", "ops.example"), ("x-team", "sre")],
            ),
            fwd("default", "fallback"),
        ),
        (
            case(
                "POST",
                "/admin",
                &[("host", "dev.example"), ("x-team", "sre")],
            ),
            fwd("default", "fallback"),
        ),
        (
            case(
                "POST",
                "/admin",
                &[("host", "ops.example"), ("x-team", "web")],
            ),
            fwd("default", "fallback"),
        ),
        (
            case(
                "POST",
                "/admin/x",
                &[("host", "ops.example"), ("x-team", "sre")],
            ),
            fwd("default", "fallback"),
        ),
        (
            case("GET", "/broken", &[]),
            refuse("broken", Reason::Fault, 418),
        ),
        (
            case("GET", "/shop", &[("x-big", big.as_str())]),
            refuse("-", Reason::HeadersTooLarge, 431),
        ),
        (
            Case {
                listener: "strict",
                ..case("GET", "/other", &[])
            },
            refuse("-", Reason::NoRoute, 404),
        ),
    ];
    for (c, want) in &table {
        let (said, _) = decide(&snap, c);
        assert_eq!(&said, want, "{} {}", c.head.method, c.head.uri);
    }
}

/// Issue 20 items 4 and 5: routes see the host and path the upstream will receive.
#[test]
fn routes_see_the_normalised_host_and_path() {
    let snap = snapshot();
    let admin = |uri: &str, host: &str| case("POST", uri, &[("host", host), ("x-team", "sre")]);
    let mut table: Vec<(Case, Said)> = [
        "/admin",
        "/%61dmin",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/x/..;/admin",
    ]
    .into_iter()
    .map(|p| (admin(p, "ops.example"), fwd("admin", "v1")))
    .collect();
    table.extend([
        // The absolute-form target's authority is the host, whatever Host says.
        (
            admin("http://ops.example/admin", "dev.example"),
            fwd("admin", "v1"),
        ),
        (
            admin("http://dev.example/admin", "ops.example"),
            fwd("default", "fallback"),
        ),
        (admin("/admin", "OPS.example."), fwd("admin", "v1")),
        (
            case("GET", "/shop/%2e%2e/admin", &[("x-user", "u1")]),
            fwd("default", "fallback"),
        ),
        // Parameters on a segment do not hide it from a prefix rule.
        (
            case("GET", "/shop;jsessionid=1/cart", &[("x-user", "u1")]),
            fwd("shop", "v2"),
        ),
        (
            case("GET", "/a%2Fb", &[]),
            refuse("-", Reason::InvalidPath, 400),
        ),
        (
            case("GET", "/a\\b", &[]),
            refuse("-", Reason::InvalidPath, 400),
        ),
        (
            case("GET", "/", &[("host", "a.example"), ("host", "b.example")]),
            refuse("-", Reason::InvalidHost, 400),
        ),
    ]);
    let mut h2 = case(
        "GET",
        "https://ops.example/admin",
        &[("host", "dev.example")],
    );
    h2.head.version = http::Version::HTTP_2;
    table.push((h2, refuse("-", Reason::InvalidHost, 400)));
    let mut no_host = case("GET", "/", &[]);
    no_host.head.headers.remove("host");
    table.push((no_host, refuse("-", Reason::InvalidHost, 400)));
    for (c, want) in &table {
        let (said, _) = decide(&snap, c);
        assert_eq!(&said, want, "{} {}", c.head.method, c.head.uri);
    }
}

#[test]
fn the_policy_decides_after_admission_and_before_routing() {
    let (snap, metrics) = snapshot_and_metrics();
    let guarded = |method, uri, addr: &str| Case {
        listener: "guarded",
        head: head(method, uri, &[]),
        peer: Peer {
            addr: addr.parse().unwrap(),
            ..CLIENT
        },
    };
    let big = "x".repeat(2000);
    for (c, want, rule) in [
        (
            guarded("GET", "/shop", "192.0.2.7:1000"),
            fwd("default", "fallback"),
            Some("internal"),
        ),
        (
            guarded("GET", "/admin/users", "192.0.2.7:1000"),
            refuse("-", Reason::Forbidden, 403),
            Some("no-admin"),
        ),
        (
            guarded("GET", "/shop", "198.51.100.1:1000"),
            refuse("-", Reason::Forbidden, 403),
            Some("default"),
        ),
        // Admission first: an oversized head is 431 whoever sends it.
        (
            Case {
                head: head("GET", "/shop", &[("x-big", big.as_str())]),
                ..guarded("GET", "/shop", "198.51.100.1:1000")
            },
            refuse("-", Reason::HeadersTooLarge, 431),
            None,
        ),
        // A listener without a policy says nothing about it.
        (
            case("GET", "/shop", &[("x-user", "u1")]),
            fwd("shop", "v2"),
            None,
        ),
    ] {
        let (said, p) = decide(&snap, &c);
        assert_eq!(said, want, "{} {}", c.head.method, c.head.uri);
        assert_eq!(
            p.authz_rule.as_deref(),
            rule,
            "{} {}",
            c.head.method,
            c.head.uri
        );
    }
    // Counted once per request, in its rule's series.
    let count = |rule: &str, decision: &str| {
        metric_value(&metrics, &format!(
            "spur_authz_decisions_total{{listener=\"guarded\",rule=\"{rule}\",decision=\"{decision}\"}}"
        ))
    };
    assert_eq!(count("internal", "allow"), Some(1.0));
    assert_eq!(count("no-admin", "deny"), Some(1.0));
    assert_eq!(count("default", "deny"), Some(1.0));
}

#[test]
fn a_forward_carries_its_deadline_retry_mirror_and_sticky_side() {
    let snap = snapshot();
    let c = case("GET", "/shop", &[("x-user", "alice")]);
    let before = Instant::now();
    let (_, p) = decide(&snap, &c);
    let Action::Forward(f) = &p.action else {
        panic!("forwarded")
    };
    let deadline = f.deadline.expect("route timeout");
    assert!(deadline >= before + Duration::from_secs(2));
    assert!(deadline <= Instant::now() + Duration::from_secs(2));
    assert_eq!(f.retry.expect("retry").policy.attempts, 3);
    assert!(f.mirror.is_some(), "percent 100");
    assert_eq!(f.hash_key.as_deref(), Some(&b"alice"[..]));
    // Sticky: the same user, the same side, whatever the random draws.
    let side = f.split_side.expect("a split");
    for seed in 0..20 {
        let lst = &snap.listeners["web"];
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut head = c.head.clone();
        let again = plan(&snap, lst, CLIENT, &mut head, Instant::now(), &mut rng);
        let Action::Forward(g) = again.action else {
            panic!()
        };
        assert_eq!(g.split_side, Some(side));
    }
    // The default route has no deadline, retry or mirror.
    let (_, p) = decide(&snap, &case("GET", "/x", &[]));
    let Action::Forward(f) = &p.action else {
        panic!()
    };
    assert!(f.deadline.is_none() && f.retry.is_none() && f.mirror.is_none());
}

/// The first try takes the exchange's clock reading only when nothing before it can wait:
/// not after an injected delay, nor a body read whole for a retry or a mirror.
#[test]
fn the_first_try_starts_at_the_requests_start_only_when_nothing_waits() {
    let snap = snapshot();
    for (uri, at_start) in [
        ("/x", true),
        ("/admin-x", true),
        ("/slow", false),
        ("/shop", false),
    ] {
        let (_, p) = decide(&snap, &case("GET", uri, &[]));
        let Action::Forward(f) = &p.action else {
            panic!("{uri} forwarded")
        };
        assert_eq!(f.at_start, at_start, "{uri}");
    }
}

#[test]
fn an_upgrade_is_never_retried_nor_mirrored() {
    let snap = snapshot();
    let mut c = case(
        "GET",
        "/shop",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    );
    c.head.version = http::Version::HTTP_11;
    let (_, p) = decide(&snap, &c);
    let Action::Forward(f) = &p.action else {
        panic!()
    };
    assert!(f.retry.is_none() && f.mirror.is_none());
}

/// Issue 20 item 3: an h2c upgrade (or any the route does not list) is stripped: the
/// request goes on as a plain one, retried and mirrored like any other.
#[test]
fn an_upgrade_the_route_does_not_tunnel_is_a_plain_request() {
    let snap = snapshot();
    for proto in ["h2c", "foo", "h2c, foo"] {
        let mut c = case(
            "GET",
            "/shop",
            &[
                ("connection", "upgrade, http2-settings"),
                ("upgrade", proto),
            ],
        );
        c.head.version = http::Version::HTTP_11;
        let (_, p) = decide(&snap, &c);
        let Action::Forward(f) = &p.action else {
            panic!()
        };
        assert!(f.upgrade.is_none(), "{proto}");
        assert!(f.retry.is_some() && f.mirror.is_some(), "{proto}");
    }
    let mut c = case(
        "GET",
        "/shop",
        &[("connection", "upgrade"), ("upgrade", "h2c, websocket")],
    );
    c.head.version = http::Version::HTTP_11;
    let (_, p) = decide(&snap, &c);
    let Action::Forward(f) = &p.action else {
        panic!()
    };
    assert_eq!(f.upgrade.as_ref().unwrap(), "websocket");
}

#[test]
fn a_split_side_without_endpoints_gives_its_share_away() {
    let snap = snapshot();
    // v2's endpoints fail their health checks.
    for e in snap.clusters["v2"].members.load().endpoints.iter() {
        e.record_check(false, 1, 1);
    }
    for user in 0..50 {
        let c = case("GET", "/shop", &[("x-user", &format!("user-{user}"))]);
        let (said, _) = decide(&snap, &c);
        assert_eq!(said, fwd("shop", "v1"));
    }
}

#[test]
fn fault_delay_is_planned_not_slept() {
    let snap = snapshot();
    let (said, p) = decide(&snap, &case("GET", "/slow", &[]));
    assert_eq!(said, fwd("slow", "v1"));
    assert_eq!(p.delay, Some(Duration::from_millis(300)));
}

#[test]
fn request_ids_and_trace_context() {
    let snap = snapshot();
    let (_, p) = decide(&snap, &case("GET", "/", &[("x-request-id", "abc-1")]));
    assert_eq!(p.request_id.unwrap(), "abc-1");
    let (_, p) = decide(&snap, &case("GET", "/", &[]));
    assert_eq!(p.request_id.unwrap().len(), 36, "a UUID is made");
    let (_, p) = decide(&snap, &case("GET", "/", &[("x-request-id", "bad id")]));
    assert_ne!(p.request_id.unwrap(), "bad id");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, p) = decide(&snap, &case("GET", "/", &[("traceparent", tp)]));
    let t = p.trace.unwrap();
    assert_eq!(&t.trace_id, b"4bf92f3577b34da6a3ce929d0e0e4736");
    // Without `tracing`: no span of this hop; the caller's context passes unchanged.
    assert_eq!(t.traceparent().to_header(), tp, "passed as it came");
    assert!(!t.write && t.sampled);
    let (_, p) = decide(&snap, &case("GET", "/", &[]));
    let t = p.trace.unwrap();
    assert!(t.write && !t.sampled, "a new trace, unsampled");
}

#[test]
fn flags_are_decided_here_or_kept_from_a_trusted_peer() {
    let snap = snapshot();
    // A client cannot switch a flag on by sending the header.
    let (_, p) = decide(
        &snap,
        &case("GET", "/shop", &[("x-spur-flags", "new-shop")]),
    );
    assert_eq!(
        p.route_name.as_deref(),
        Some("shop"),
        "not the flag's route"
    );
    assert_eq!(p.flags_on, vec![false]);
    assert_eq!(p.flags_header.unwrap(), "");
    // An mTLS peer's decision is kept, and flags unknown here pass on.
    let id: Arc<str> = "spiffe://td/ns/a/sa/web".into();
    let id: &'static Arc<str> = Box::leak(Box::new(id));
    let c = Case {
        peer: Peer {
            identity: Some(id),
            ..CLIENT
        },
        ..case("GET", "/shop", &[("x-spur-flags", "other,new-shop")])
    };
    let (said, p) = decide(&snap, &c);
    assert_eq!(said, fwd("beta", "v2"));
    assert_eq!(p.flags_on, vec![true]);
    assert_eq!(p.flags_header.unwrap(), "new-shop,other");
}

#[test]
fn transparent_mode_routes_by_original_destination() {
    let snap = snapshot();
    let to = |addr: &str| Case {
        listener: "out",
        peer: Peer {
            original_dst: Some(addr.parse().unwrap()),
            ..CLIENT
        },
        ..case("GET", "/", &[])
    };
    assert_eq!(decide(&snap, &to("10.0.0.3:80")).0, fwd("default", "v2"));
    // An address no cluster owns is never forwarded as is.
    assert_eq!(
        decide(&snap, &to("10.9.9.9:80")).0,
        refuse("-", Reason::NoRoute, 404)
    );
}

#[test]
fn the_head_forwarded_is_the_head_routed() {
    let snap = snapshot();
    let lst = &snap.listeners["web"];
    let mut rng = fastrand::Rng::with_seed(1);
    let mut h = head(
        "POST",
        "http://ops.example//x/../%61dmin?q=%2F",
        &[("host", "internal.example"), ("x-team", "sre")],
    );
    let p = plan(&snap, lst, CLIENT, &mut h, Instant::now(), &mut rng);
    assert_eq!(p.route_name.as_deref(), Some("admin"));
    assert_eq!(h.uri, "/admin?q=%2F");
    assert_eq!(h.headers["host"], "ops.example");
    assert_eq!(h.headers.get_all("host").iter().count(), 1);
}

/// Issue 20 item 13: a request that has crossed `MAX_HOPS` proxies is in a loop.
#[test]
fn too_many_hops_is_a_loop() {
    let snap = snapshot();
    let max = headers::MAX_HOPS.to_string();
    let below = (headers::MAX_HOPS - 1).to_string();
    let (said, p) = decide(&snap, &case("GET", "/x", &[("x-spur-hops", &below)]));
    assert_eq!(said, fwd("default", "fallback"));
    assert_eq!(p.hops, headers::MAX_HOPS);
    let (said, _) = decide(&snap, &case("GET", "/x", &[("x-spur-hops", &max)]));
    assert_eq!(said, refuse("-", Reason::LoopDetected, 508));
    let (_, p) = decide(&snap, &case("GET", "/x", &[]));
    assert_eq!(p.hops, 1);
}

#[test]
fn grpc_calls_route_by_service_and_bring_their_deadline() {
    let cfg = spur_config::load(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: fallback
    routes:
      - name: get
        match: { grpc: { service: shop.Cart, method: Get } }
        cluster: v1
        timeout: 2s
      - name: cart
        match: { grpc: { service: shop.Cart } }
        cluster: v2
clusters:
  - { name: v1, endpoints: ["10.0.0.1:80"] }
  - { name: v2, endpoints: ["10.0.0.2:80"] }
  - { name: fallback, endpoints: ["10.0.0.3:80"] }
"#,
        Some("t.yaml"),
    )
    .unwrap();
    let snap = Snapshot::compile(
        Arc::new(cfg),
        1,
        &Registry::default(),
        &Metrics::new(),
        None,
    )
    .unwrap();
    let grpc = |path: &str, timeout: Option<&str>| {
        let mut h = vec![("content-type", "application/grpc+proto")];
        if let Some(t) = timeout {
            h.push(("grpc-timeout", t));
        }
        case("POST", path, &h)
    };
    let deadline = |p: &Plan<'_>| match &p.action {
        Action::Forward(f) => (
            f.deadline
                .map(|d| d.saturating_duration_since(Instant::now())),
            f.grpc_timeout,
        ),
        Action::Refuse(_) | Action::Answer(_) => panic!("not forwarded"),
    };
    let near = |d: Option<Duration>, want: u64| {
        d.is_some_and(|d| d <= Duration::from_millis(want) && d > Duration::from_millis(want - 50))
    };
    // The method's route; its 2 s timeout unless the call's own deadline is sooner.
    let (said, p) = decide(&snap, &grpc("/shop.Cart/Get", Some("100m")));
    assert_eq!(said, fwd("get", "v1"));
    assert!(p.grpc);
    let (d, forwarded) = deadline(&p);
    assert!(near(d, 100) && forwarded, "{d:?}");
    let (_, p) = decide(&snap, &grpc("/shop.Cart/Get", Some("10S")));
    let (d, forwarded) = deadline(&p);
    assert!(
        near(d, 2000) && forwarded,
        "the route's timeout is sooner: {d:?}"
    );
    // Another method of the service; a call without a deadline has none.
    let (said, p) = decide(&snap, &grpc("/shop.Cart/Put", None));
    assert_eq!(said, fwd("cart", "v2"));
    assert_eq!(deadline(&p), (None, false));
    // The default cluster's calls are bounded by their deadline too.
    let (said, p) = decide(&snap, &grpc("/other.Svc/Get", Some("1S")));
    assert_eq!(said, fwd("default", "fallback"));
    assert!(near(deadline(&p).0, 1000));
    // Not gRPC: no gRPC route, and `grpc-timeout` means nothing.
    let (said, p) = decide(
        &snap,
        &case("POST", "/shop.Cart/Get", &[("grpc-timeout", "1m")]),
    );
    assert_eq!(said, fwd("default", "fallback"));
    assert!(!p.grpc);
    assert_eq!(deadline(&p), (None, false));
}
