//! The policy as a table of peers, requests and decisions; and its invariants as
//! properties: a matching deny always wins, audit rules never change a decision, and the
//! order of the rules does not matter.

use super::*;
use proptest::prelude::*;

/// A policy from the `authz` block of an mTLS listener, written as YAML.
fn policy(authz: &str) -> Policy {
    let yaml = format!(
        "listeners:\n  - name: l\n    listen: 127.0.0.1:1\n    cluster: c\n    tls: {{ cert: c.pem, key: k.pem, client_ca: ca.pem }}\n    authz: {authz}\nclusters: [{{ name: c, endpoints: [\"127.0.0.1:2\"] }}]\n"
    );
    let cfg = spur_config::load(&yaml, Some("t.yaml")).unwrap_or_else(|e| panic!("{e}"));
    Policy::compile(cfg.listeners[0].authz.as_ref().unwrap())
}

const SPEC: &str = r#"
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
          to: { grpc: [{ service: shop.Cart, method: Get }], headers: [{ name: x-tenant, value: a }] }
        - name: batch-watch
          action: audit
          from: { identities: ["spiffe://cluster.local/ns/jobs/*"] }
"#;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const JOB: &str = "spiffe://cluster.local/ns/jobs/sa/nightly";

fn who(identity: Option<&'static str>, addr: &str) -> Subject<'static> {
    Subject {
        identity,
        addr: addr.parse().unwrap(),
    }
}

/// A request: method, path and headers.
type Req<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// (decision, deciding rule or "default", audit rules that would deny).
fn outcome(p: &Policy, who: Subject<'_>, req: Option<Req<'_>>) -> (Decision, String, Vec<String>) {
    let headers_and = req.map(|(m, path, hs)| {
        let mut h = HeaderMap::new();
        for (k, v) in hs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        (
            Method::from_bytes(m.as_bytes()).unwrap(),
            path.to_string(),
            h,
        )
    });
    let asked = headers_and.as_ref().map(|(m, path, h)| Asked {
        method: m,
        path,
        headers: h,
    });
    let v = p.decide(who, asked);
    let rule = v
        .rule
        .map_or("default".to_string(), |i| p.rules()[i].name.to_string());
    let audits = p
        .would_deny(v, who, asked)
        .map(|i| p.rules()[i].name.to_string())
        .collect();
    (v.decision, rule, audits)
}

#[test]
fn specs_policy_as_a_table() {
    use Decision::*;
    let p = policy(SPEC);
    let none: &[(&str, &str)] = &[];
    let cases: Vec<(Subject, Req, Decision, &str)> = vec![
        (
            who(None, "192.0.2.1"),
            ("GET", "/healthz", none),
            Allow,
            "probes",
        ),
        (
            who(None, "192.0.2.1"),
            ("GET", "/healthz/x", none),
            Allow,
            "default",
        ),
        (
            who(Some(WEB), "192.0.2.1"),
            ("GET", "/api/items", none),
            Allow,
            "web-reads",
        ),
        (
            who(Some(WEB), "192.0.2.1"),
            ("HEAD", "/api/items", none),
            Allow,
            "web-reads",
        ),
        (
            who(Some(WEB), "192.0.2.1"),
            ("POST", "/api/items", none),
            Allow,
            "default",
        ),
        (
            who(Some(WEB), "192.0.2.1"),
            ("GET", "/admin", none),
            Deny,
            "no-admin",
        ),
        (
            who(Some(WEB), "192.0.2.1"),
            ("GET", "/admin/users", none),
            Deny,
            "no-admin",
        ),
        (
            who(None, "192.0.2.1"),
            ("GET", "/administrator", none),
            Allow,
            "default",
        ),
        (
            who(None, "10.1.2.3"),
            ("POST", "/shop.Cart/Get", &[("x-tenant", "a")]),
            Allow,
            "legacy",
        ),
        (
            who(None, "::ffff:10.1.2.3"),
            ("POST", "/shop.Cart/Get", &[("x-tenant", "a")]),
            Allow,
            "legacy",
        ),
        (
            who(None, "11.1.2.3"),
            ("POST", "/shop.Cart/Get", &[("x-tenant", "a")]),
            Allow,
            "default",
        ),
        (
            who(Some(WEB), "10.1.2.3"),
            ("POST", "/shop.Cart/Get", &[("x-tenant", "a")]),
            Allow,
            "default",
        ),
        (
            who(None, "10.1.2.3"),
            ("POST", "/shop.Cart/Put", &[("x-tenant", "a")]),
            Allow,
            "default",
        ),
        (
            who(None, "10.1.2.3"),
            ("POST", "/shop.Cart/Get", &[("x-tenant", "b")]),
            Allow,
            "default",
        ),
    ];
    for (w, req, decision, rule) in cases {
        let (d, r, _) = outcome(&p, w, Some(req));
        assert_eq!((d, r.as_str()), (decision, rule), "{w:?} {req:?}");
    }
    // The default decides for whatever no rule matches; with `default: deny` it refuses.
    let closed = policy(&SPEC.replace("default: allow", "default: deny"));
    let (d, r, _) = outcome(
        &closed,
        who(Some(WEB), "192.0.2.1"),
        Some(("POST", "/api/x", none)),
    );
    assert_eq!((d, r.as_str()), (Deny, "default"));
    let (d, r, _) = outcome(
        &closed,
        who(Some(WEB), "192.0.2.1"),
        Some(("GET", "/api/x", none)),
    );
    assert_eq!((d, r.as_str()), (Allow, "web-reads"));
}

#[test]
fn deny_beats_allow_whatever_the_order() {
    for rules in [
        "[{ name: all, action: allow }, { name: no-admin, action: deny, to: { path_prefixes: [/admin] } }]",
        "[{ name: no-admin, action: deny, to: { path_prefixes: [/admin] } }, { name: all, action: allow }]",
    ] {
        let p = policy(&format!("{{ default: deny, rules: {rules} }}"));
        let (d, r, _) = outcome(&p, who(Some(WEB), "127.0.0.1"), Some(("GET", "/admin", &[])));
        assert_eq!((d, r.as_str()), (Decision::Deny, "no-admin"));
        let (d, r, _) = outcome(&p, who(Some(WEB), "127.0.0.1"), Some(("GET", "/shop", &[])));
        assert_eq!((d, r.as_str()), (Decision::Allow, "all"));
    }
}

#[test]
fn audit_rules_report_what_they_would_deny_and_decide_nothing() {
    let p = policy(SPEC);
    // An allowed request the audit rule matches: allowed, and "would deny".
    let (d, r, audits) = outcome(
        &p,
        who(Some(JOB), "192.0.2.1"),
        Some(("GET", "/healthz", &[])),
    );
    assert_eq!(
        (d, r.as_str(), audits),
        (Decision::Allow, "probes", vec!["batch-watch".to_string()])
    );
    let (d, r, audits) = outcome(&p, who(Some(JOB), "192.0.2.1"), Some(("GET", "/x", &[])));
    assert_eq!(
        (d, r.as_str(), audits),
        (Decision::Allow, "default", vec!["batch-watch".to_string()])
    );
    // Denied anyway: switching the audit rule would change nothing, so it is not counted.
    let (d, _, audits) = outcome(
        &p,
        who(Some(JOB), "192.0.2.1"),
        Some(("GET", "/admin", &[])),
    );
    assert_eq!((d, audits), (Decision::Deny, vec![]));
    // Not matched: nothing to report.
    let (_, _, audits) = outcome(&p, who(Some(WEB), "192.0.2.1"), Some(("GET", "/x", &[])));
    assert!(audits.is_empty());
}

#[test]
fn connections_match_rules_without_to() {
    let p = policy(
        r#"{ default: deny, rules: [
            { name: web, action: allow, from: { identities: ["spiffe://cluster.local/ns/shop/*"] } },
            { name: local, action: allow, from: { cidrs: ["127.0.0.0/8"], unauthenticated: true } },
            { name: reads, action: allow, to: { methods: [GET] } } ] }"#,
    );
    let (d, r, _) = outcome(&p, who(Some(WEB), "192.0.2.1"), None);
    assert_eq!((d, r.as_str()), (Decision::Allow, "web"));
    let (d, r, _) = outcome(&p, who(None, "127.0.0.9"), None);
    assert_eq!((d, r.as_str()), (Decision::Allow, "local"));
    let (d, r, _) = outcome(&p, who(Some(JOB), "127.0.0.9"), None);
    assert_eq!(
        (d, r.as_str()),
        (Decision::Deny, "default"),
        "a rule with `to` never matches a connection"
    );
}

#[test]
fn grpc_paths_and_list_entries_or() {
    assert_eq!(grpc_call("/shop.Cart/Get"), Some(("shop.Cart", "Get")));
    assert_eq!(grpc_call("/shop.Cart/Get/x"), None);
    assert_eq!(grpc_call("/shop.Cart"), None);
    assert_eq!(grpc_call("//Get"), None);
    let p = policy(
        r#"{ default: deny, rules: [
            { name: cart, action: allow, to: { grpc: [{ service: shop.Cart }, { service: shop.Orders, method: List }] } },
            { name: tenants, action: allow, to: { headers: [{ name: x-tenant, value: a }, { name: x-admin, present: true }] } } ] }"#,
    );
    for (path, headers, rule) in [
        ("/shop.Cart/Put", &[][..], "cart"),
        ("/shop.Orders/List", &[], "cart"),
        ("/shop.Orders/Delete", &[], "default"),
        ("/x", &[("x-tenant", "a")], "tenants"),
        ("/x", &[("x-admin", "1")], "tenants"),
        ("/x", &[("x-tenant", "b")], "default"),
    ] {
        let (_, r, _) = outcome(&p, who(None, "127.0.0.1"), Some(("POST", path, headers)));
        assert_eq!(r, rule, "{path} {headers:?}");
    }
}

#[test]
fn an_explanation_names_the_deciding_rule_and_each_miss() {
    let p = policy(SPEC);
    let h = HeaderMap::new();
    let asked = Asked {
        method: &Method::POST,
        path: "/api/items",
        headers: &h,
    };
    let text = p
        .explain(who(Some(JOB), "192.0.2.1"), Some(asked))
        .to_string();
    let expected = "\
allow: the default (no allow or deny rule matches)
  allow probes: no match on to.paths (the path is /api/items)
  allow web-reads: no match on from.identities (the identity is spiffe://cluster.local/ns/jobs/sa/nightly)
  deny  no-admin: no match on to.path_prefixes (the path is /api/items)
  allow legacy: no match on from.cidrs (the source is 192.0.2.1)
  audit batch-watch: matches
audit: rule `batch-watch` would deny this (it matches; as `deny` it would win)
";
    assert_eq!(text, expected);
    let asked = Asked {
        method: &Method::GET,
        path: "/admin/x",
        headers: &h,
    };
    let text = p.explain(who(None, "192.0.2.1"), Some(asked)).to_string();
    assert!(
        text.starts_with("deny: rule `no-admin` (a matching deny rule wins)\n"),
        "{text}"
    );
    assert!(text.contains("* deny  no-admin: matches\n"), "{text}");
    assert!(
        text.contains("no match on from.identities (the peer has no verified identity)"),
        "{text}"
    );
}

// ------------------------------------------------------------- properties --

const IDS: [Option<&str>; 4] = [
    None,
    Some("spiffe://td/ns/shop/sa/web"),
    Some("spiffe://td/ns/shop/sa/api"),
    Some("spiffe://td/ns/pay/sa/api"),
];
const ADDRS: [&str; 3] = ["10.0.0.1", "192.0.2.1", "127.0.0.1"];
const PATHS: [&str; 4] = ["/", "/admin", "/admin/x", "/api/items"];
const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];

/// One rule as YAML, from small pools of conditions (so that rules often overlap).
fn rule_yaml() -> impl Strategy<Value = (String, String)> {
    let action = prop::sample::select(vec!["allow", "deny", "audit"]);
    let from = prop::sample::select(vec![
        "",
        "from: { identities: [\"spiffe://td/ns/shop/*\"] }",
        "from: { identities: [\"spiffe://td/ns/*/sa/api\"] }",
        "from: { namespaces: [pay] }",
        "from: { cidrs: [\"10.0.0.0/8\"] }",
        "from: { unauthenticated: true }",
    ]);
    let to = prop::sample::select(vec![
        "",
        "to: { path_prefixes: [/admin] }",
        "to: { paths: [/] }",
        "to: { methods: [GET] }",
        "to: { methods: [POST, DELETE], path_prefixes: [/api] }",
    ]);
    (action, from, to).prop_map(|(a, f, t)| {
        let sep = if f.is_empty() || t.is_empty() {
            ""
        } else {
            ", "
        };
        (a.to_string(), format!("action: {a}, {f}{sep}{t}"))
    })
}

fn policy_yaml(default: &str, rules: &[(String, String)]) -> String {
    let rules: Vec<String> = rules
        .iter()
        .enumerate()
        .map(|(i, (_, body))| format!("{{ name: r{i}, {} }}", body.trim_end_matches(", ")))
        .collect();
    format!("{{ default: {default}, rules: [{}] }}", rules.join(", "))
}

/// Every peer and request of the pools, and the verdict for each.
fn verdicts(p: &Policy) -> Vec<(Decision, Option<String>)> {
    let h = HeaderMap::new();
    let mut out = Vec::new();
    for id in IDS {
        for addr in ADDRS {
            for path in PATHS {
                for m in METHODS {
                    let method = Method::from_bytes(m.as_bytes()).unwrap();
                    let asked = Asked {
                        method: &method,
                        path,
                        headers: &h,
                    };
                    let v = p.decide(who(id, addr), Some(asked));
                    out.push((v.decision, v.rule.map(|i| p.rules()[i].name.to_string())));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_matching_deny_always_wins(
        rules in prop::collection::vec(rule_yaml(), 1..6),
        default in prop::sample::select(vec!["allow", "deny"]),
    ) {
        let p = policy(&policy_yaml(default, &rules));
        let h = HeaderMap::new();
        for id in IDS {
            for addr in ADDRS {
                for path in PATHS {
                    let asked = Asked { method: &Method::GET, path, headers: &h };
                    let w = who(id, addr);
                    let v = p.decide(w, Some(asked));
                    let denied_by_rule = p.rules().iter().any(|r| r.action == AuthzAction::Deny && r.matches(w, Some(asked)));
                    let allowed_by_rule = p.rules().iter().any(|r| r.action == AuthzAction::Allow && r.matches(w, Some(asked)));
                    if denied_by_rule {
                        prop_assert_eq!(v.decision, Decision::Deny);
                        prop_assert_eq!(p.rules()[v.rule.unwrap()].action, AuthzAction::Deny);
                    } else if allowed_by_rule {
                        prop_assert_eq!(v.decision, Decision::Allow);
                    } else {
                        prop_assert_eq!(v, Verdict { decision: p.default_decision(), rule: None });
                    }
                }
            }
        }
    }

    #[test]
    fn adding_an_audit_rule_never_changes_a_decision(
        rules in prop::collection::vec(rule_yaml(), 0..5),
        audit in rule_yaml(),
        at in 0usize..6,
    ) {
        let before = policy(&policy_yaml("deny", &rules));
        let mut with_audit = rules.clone();
        let body = audit.1.replacen(&format!("action: {}", audit.0), "action: audit", 1);
        with_audit.insert(at.min(rules.len()), ("audit".into(), body));
        // Rule names are by position: compare decisions and the deciding rule's body.
        let after = policy(&policy_yaml("deny", &with_audit));
        let body_of = |p: &Policy, name: &Option<String>| name.as_ref().map(|n| {
            p.rules().iter().find(|r| &*r.name == n).unwrap().source.clone()
        }).map(|mut r| { r.name.clear(); r });
        let (b, a) = (verdicts(&before), verdicts(&after));
        for (x, y) in b.iter().zip(&a) {
            prop_assert_eq!(x.0, y.0);
            prop_assert_eq!(body_of(&before, &x.1), body_of(&after, &y.1));
        }
    }

    #[test]
    fn the_order_of_the_rules_does_not_change_a_decision(
        rules in prop::collection::vec(rule_yaml(), 1..6),
    ) {
        let forward = policy(&policy_yaml("allow", &rules));
        let mut reversed = rules.clone();
        reversed.reverse();
        let backward = policy(&policy_yaml("allow", &reversed));
        let decisions = |p: &Policy| verdicts(p).into_iter().map(|v| v.0).collect::<Vec<_>>();
        prop_assert_eq!(decisions(&forward), decisions(&backward));
    }
}
