//! Enforcing a listener's authorization policy: the pure [`Policy`] with its metric series
//! resolved when the snapshot is compiled, so that a decision on the request path counts
//! into a ready counter and formats no label.
//!
//! Where it runs: `http` and `http3` requests in [`crate::http::plan`] (after admission,
//! before routing, on the path routing sees), and `tcp` connections at accept in
//! [`crate::adapters::tcp`] (from the peer's identity and address; a denied connection is
//! closed before any byte reaches an endpoint). A config push swaps the snapshot, so the
//! next request on an open connection meets the new policy.

use crate::metrics::{AuthzLabels, Metrics};
use crate::policy::authz::{Asked, Decision, Policy, Subject};
use prometheus_client::metrics::counter::Counter;
use spur_config::authz::DEFAULT_RULE;
use spur_config::{Authz, AuthzAction};
use std::sync::Arc;

/// A listener's compiled policy and its counters.
pub struct AuthzRt {
    pub policy: Policy,
    /// Per rule: `spur_authz_decisions_total{rule, decision}` for what the rule decides
    /// (`allow`, `deny`, or `audit_would_deny` for an audit rule).
    rule_counters: Vec<Counter>,
    /// The default's series: `{rule="default", decision=<the default>}`.
    default_counter: Counter,
    default_name: Arc<str>,
}

/// What enforcing the policy came to for one request or connection.
#[derive(Clone, Debug)]
pub struct Authorized {
    pub allowed: bool,
    /// The deciding rule's name, or `default`: the access log's `authz_rule`.
    pub rule: Arc<str>,
}

impl AuthzRt {
    pub fn compile(listener: &Arc<str>, a: &Authz, metrics: &Metrics) -> AuthzRt {
        let policy = Policy::compile(a);
        let counter = |rule: &Arc<str>, decision| {
            metrics
                .authz_decisions
                .get_or_create(&AuthzLabels {
                    listener: listener.clone(),
                    rule: rule.clone(),
                    decision,
                })
                .clone()
        };
        let rule_counters = policy
            .rules()
            .iter()
            .map(|r| {
                let decision = match r.action {
                    AuthzAction::Allow => "allow",
                    AuthzAction::Deny => "deny",
                    AuthzAction::Audit => "audit_would_deny",
                };
                counter(&r.name, decision)
            })
            .collect();
        let default_name: Arc<str> = DEFAULT_RULE.into();
        let default_counter = counter(&default_name, policy.default_decision().as_str());
        AuthzRt {
            policy,
            rule_counters,
            default_counter,
            default_name,
        }
    }

    /// Decides for this peer and request (`None`: a tcp connection) and counts the decision
    /// once, and each audit rule that would have denied it.
    pub fn authorize(&self, who: Subject<'_>, asked: Option<Asked<'_>>) -> Authorized {
        let verdict = self.policy.decide(who, asked);
        let rule = match verdict.rule {
            Some(i) => {
                self.rule_counters[i].inc();
                self.policy.rules()[i].name.clone()
            }
            None => {
                self.default_counter.inc();
                self.default_name.clone()
            }
        };
        for i in self.policy.would_deny(verdict, who, asked) {
            self.rule_counters[i].inc();
        }
        Authorized {
            allowed: verdict.decision == Decision::Allow,
            rule,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_decision_is_counted_once_in_its_rules_series() {
        let cfg = spur_config::load(
            r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: c
    authz:
      default: deny
      rules:
        - { name: reads, action: allow, to: { methods: [GET] } }
        - { name: no-admin, action: deny, to: { path_prefixes: [/admin] } }
        - { name: watch, action: audit, to: { path_prefixes: [/api] } }
clusters: [{ name: c, endpoints: ["127.0.0.1:1"] }]
"#,
            None,
        )
        .unwrap();
        let metrics = Metrics::new();
        let rt = AuthzRt::compile(
            &"web".into(),
            cfg.listeners[0].authz.as_ref().unwrap(),
            &metrics,
        );
        let h = http::HeaderMap::new();
        let who = Subject {
            identity: None,
            addr: "127.0.0.1".parse().unwrap(),
        };
        let ask = |method: &'static http::Method, path: &'static str| Asked {
            method,
            path,
            headers: &h,
        };
        let get = &http::Method::GET;
        let post = &http::Method::POST;
        for (method, path, allowed, rule) in [
            (get, "/api/x", true, "reads"),
            (get, "/admin", false, "no-admin"),
            (post, "/api/x", false, "default"),
            (get, "/x", true, "reads"),
        ] {
            let a = rt.authorize(who, Some(ask(method, path)));
            assert_eq!((a.allowed, &*a.rule), (allowed, rule), "{method} {path}");
        }
        let text = metrics.encode();
        let series = |rule: &str, decision: &str| {
            format!("spur_authz_decisions_total{{listener=\"web\",rule=\"{rule}\",decision=\"{decision}\"}} ")
        };
        for (rule, decision, n) in [
            ("reads", "allow", 2),
            ("no-admin", "deny", 1),
            ("default", "deny", 1),
            // Only the allowed /api request: the denied one would change nothing.
            ("watch", "audit_would_deny", 1),
        ] {
            let line = format!("{}{n}", series(rule, decision));
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
