//! Authorization: whether a listener lets a peer make a request (or, on `tcp` listeners,
//! open a connection), and which rule said so.
//!
//! A policy is a set of named rules and a default. [`Policy::decide`] evaluates them all:
//! any matching `deny` rule denies, else any matching `allow` rule allows, else the default
//! applies. Deny wins so that a rule written to keep something out cannot be undone by a
//! broader allow written elsewhere (or later, by someone else): the safe reading of two
//! rules that disagree is the refusal. Because no rule's position matters, the order of
//! the rules cannot change a decision, and a policy can be reviewed one rule at a time.
//!
//! `audit` rules decide nothing. [`Policy::would_deny`] names the audit rules that match a
//! request the policy allows: exactly the requests each would refuse if it were switched
//! to `deny`. That is the rollout path for a new refusal: write it as `audit`, watch its
//! count (`spur_authz_decisions_total{decision="audit_would_deny"}`), then push it as
//! `deny`. A request that is denied anyway is not counted there, as switching the rule
//! would change nothing for it.
//!
//! The policy is pure: the caller says who the peer is ([`Subject`]) and what it asks
//! ([`Asked`], none for a TCP connection). The proxy counts and enforces the [`Verdict`];
//! `spur authz explain` prints [`Policy::explain`], which runs the same matching.

use super::route::{compile_header, header_holds, prefix_matches, HeaderCond};
use http::{HeaderMap, HeaderName, Method};
use spur_config::peers::namespace_of;
use spur_config::{Authz, AuthzAction, AuthzDefault, AuthzRule, Cidr, IdentityGlob};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// Who the peer is.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The verified SPIFFE ID (mutual TLS), as the certificate gave it.
    pub identity: Option<&'a str>,
    pub addr: IpAddr,
}

/// What a request asks for: its method, its path (without the query, as normalised for
/// routing) and its headers.
#[derive(Clone, Copy, Debug)]
pub struct Asked<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// A decision and the rule that made it (`None`: the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// The index of the deciding rule in [`Policy::rules`].
    pub rule: Option<usize>,
}

/// A compiled policy.
pub struct Policy {
    rules: Vec<Rule>,
    default: Decision,
}

/// A compiled rule, with what it was compiled from (for explanations).
pub struct Rule {
    pub name: Arc<str>,
    pub action: AuthzAction,
    pub source: AuthzRule,
    from: Option<FromMatch>,
    to: Option<ToMatch>,
}

struct FromMatch {
    identities: Option<Vec<IdentityGlob>>,
    namespaces: Option<Vec<String>>,
    cidrs: Option<Vec<Cidr>>,
    unauthenticated: bool,
}

struct ToMatch {
    paths: Option<Vec<String>>,
    prefixes: Option<Vec<String>>,
    methods: Option<Vec<Method>>,
    headers: Option<Vec<(HeaderName, HeaderCond)>>,
    /// Service, and method (`None`: any).
    grpc: Option<Vec<(String, Option<String>)>>,
}

/// The condition of a rule that a peer or request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    Identities,
    Namespaces,
    Cidrs,
    Unauthenticated,
    Paths,
    PathPrefixes,
    Methods,
    Headers,
    Grpc,
    /// The rule has `to` and this is a connection, not a request.
    NoRequest,
}

impl Policy {
    /// Compiles a policy from values spur-config parsed and validated (it cannot fail).
    pub fn compile(a: &Authz) -> Policy {
        Policy {
            rules: a.rules.iter().map(Rule::compile).collect(),
            default: match a.default {
                AuthzDefault::Allow => Decision::Allow,
                AuthzDefault::Deny => Decision::Deny,
            },
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn default_decision(&self) -> Decision {
        self.default
    }

    /// The decision for this peer and request: the first matching `deny` rule, else the
    /// first matching `allow` rule, else the default.
    pub fn decide(&self, who: Subject<'_>, asked: Option<Asked<'_>>) -> Verdict {
        let first = |action| {
            self.rules
                .iter()
                .position(|r| r.action == action && r.matches(who, asked))
        };
        if let Some(i) = first(AuthzAction::Deny) {
            return Verdict {
                decision: Decision::Deny,
                rule: Some(i),
            };
        }
        if let Some(i) = first(AuthzAction::Allow) {
            return Verdict {
                decision: Decision::Allow,
                rule: Some(i),
            };
        }
        Verdict {
            decision: self.default,
            rule: None,
        }
    }

    /// The audit rules that would deny this request, given `verdict` (from
    /// [`Policy::decide`]): those that match it when it is allowed; none when it is denied.
    pub fn would_deny<'p, 'a>(
        &'p self,
        verdict: Verdict,
        who: Subject<'a>,
        asked: Option<Asked<'a>>,
    ) -> impl Iterator<Item = usize> + use<'p, 'a> {
        let allowed = verdict.decision == Decision::Allow;
        self.rules
            .iter()
            .enumerate()
            .filter(move |(_, r)| {
                allowed && r.action == AuthzAction::Audit && r.matches(who, asked)
            })
            .map(|(i, _)| i)
    }

    /// Every rule's outcome for this peer and request, and the verdict: what
    /// `spur authz explain` prints.
    pub fn explain<'p>(&'p self, who: Subject<'_>, asked: Option<Asked<'_>>) -> Explanation<'p> {
        let verdict = self.decide(who, asked);
        Explanation {
            policy: self,
            verdict,
            misses: self
                .rules
                .iter()
                .map(|r| r.first_miss(who, asked))
                .collect(),
            would_deny: self.would_deny(verdict, who, asked).collect(),
            identity: who.identity.map(str::to_string),
            addr: who.addr,
            asked: asked.map(|a| (a.method.to_string(), a.path.to_string())),
        }
    }
}

impl Rule {
    fn compile(r: &AuthzRule) -> Rule {
        let from = r.from.as_ref().map(|f| FromMatch {
            identities: f.identities.clone(),
            namespaces: f
                .namespaces
                .as_ref()
                .map(|ns| ns.iter().map(|n| n.as_str().to_string()).collect()),
            cidrs: f
                .cidrs
                .as_ref()
                .map(|c| c.iter().map(|c| *c.get()).collect()),
            unauthenticated: f.unauthenticated == Some(true),
        });
        let to = r.to.as_ref().map(|t| ToMatch {
            paths: t.paths.clone(),
            prefixes: t.path_prefixes.clone(),
            methods: t
                .methods
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.get().clone()).collect()),
            headers: t
                .headers
                .as_ref()
                .map(|hs| hs.iter().map(compile_header).collect()),
            grpc: t.grpc.as_ref().map(|gs| {
                gs.iter()
                    .map(|g| {
                        let method = g.method.as_ref().map(|m| m.as_str().to_string());
                        (g.service.as_str().to_string(), method)
                    })
                    .collect()
            }),
        });
        Rule {
            name: r.name.as_str().into(),
            action: r.action,
            source: r.clone(),
            from,
            to,
        }
    }

    /// Whether the rule matches this peer and request.
    pub fn matches(&self, who: Subject<'_>, asked: Option<Asked<'_>>) -> bool {
        self.first_miss(who, asked).is_none()
    }

    /// The first condition the peer or request fails (`None`: the rule matches).
    fn first_miss(&self, who: Subject<'_>, asked: Option<Asked<'_>>) -> Option<Cond> {
        if let Some(f) = &self.from {
            if let Some(miss) = f.first_miss(who) {
                return Some(miss);
            }
        }
        match (&self.to, asked) {
            (None, _) => None,
            (Some(_), None) => Some(Cond::NoRequest),
            (Some(t), Some(a)) => t.first_miss(a),
        }
    }
}

/// `false` when the list is given and no entry passes; an absent list does not restrict.
fn any_of<T>(list: &Option<Vec<T>>, pass: impl Fn(&T) -> bool) -> bool {
    list.as_ref().is_none_or(|l| l.iter().any(pass))
}

impl FromMatch {
    fn first_miss(&self, who: Subject<'_>) -> Option<Cond> {
        let id = who.identity;
        if !any_of(&self.identities, |g| id.is_some_and(|id| g.matches(id))) {
            return Some(Cond::Identities);
        }
        let ns = id.and_then(namespace_of);
        if !any_of(&self.namespaces, |n| ns == Some(n.as_str())) {
            return Some(Cond::Namespaces);
        }
        if !any_of(&self.cidrs, |c| c.contains(who.addr)) {
            return Some(Cond::Cidrs);
        }
        if self.unauthenticated && id.is_some() {
            return Some(Cond::Unauthenticated);
        }
        None
    }
}

impl ToMatch {
    fn first_miss(&self, a: Asked<'_>) -> Option<Cond> {
        if !any_of(&self.paths, |p| a.path == p) {
            return Some(Cond::Paths);
        }
        if !any_of(&self.prefixes, |p| prefix_matches(a.path, p)) {
            return Some(Cond::PathPrefixes);
        }
        if !any_of(&self.methods, |m| a.method == m) {
            return Some(Cond::Methods);
        }
        if !any_of(&self.headers, |(n, c)| header_holds(a.headers, n, c)) {
            return Some(Cond::Headers);
        }
        let call = grpc_call(a.path);
        let grpc_ok = any_of(&self.grpc, |(service, method)| {
            call.is_some_and(|(s, m)| s == service && method.as_ref().is_none_or(|x| x == m))
        });
        if !grpc_ok {
            return Some(Cond::Grpc);
        }
        None
    }
}

/// The service and method of a gRPC path, `/package.Service/Method`.
pub fn grpc_call(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// Every rule's outcome for one peer and request, printed by `spur authz explain`.
pub struct Explanation<'p> {
    policy: &'p Policy,
    pub verdict: Verdict,
    /// Per rule: the condition it failed (`None`: it matches).
    pub misses: Vec<Option<Cond>>,
    pub would_deny: Vec<usize>,
    identity: Option<String>,
    addr: IpAddr,
    asked: Option<(String, String)>,
}

impl Explanation<'_> {
    /// What the peer or request had, for the condition it failed.
    fn had(&self, cond: Cond) -> String {
        let id = || match &self.identity {
            Some(id) => format!("the identity is {id}"),
            None => "the peer has no verified identity".to_string(),
        };
        let (method, path) = self.asked.clone().unwrap_or_default();
        match cond {
            Cond::Identities | Cond::Unauthenticated => id(),
            Cond::Namespaces => match self.identity.as_deref().and_then(namespace_of) {
                Some(ns) => format!("the namespace is {ns}"),
                None => format!("{}, with no namespace", id()),
            },
            Cond::Cidrs => format!("the source is {}", self.addr),
            Cond::Paths | Cond::PathPrefixes => format!("the path is {path}"),
            Cond::Methods => format!("the method is {method}"),
            Cond::Headers => "no header condition holds".to_string(),
            Cond::Grpc => match grpc_call(&path) {
                Some((s, m)) => format!("the call is {s}/{m}"),
                None => format!("{path} is not a gRPC path"),
            },
            Cond::NoRequest => "a connection has no request".to_string(),
        }
    }
}

/// The field a condition comes from, as the config spells it.
fn field(cond: Cond) -> &'static str {
    match cond {
        Cond::Identities => "from.identities",
        Cond::Namespaces => "from.namespaces",
        Cond::Cidrs => "from.cidrs",
        Cond::Unauthenticated => "from.unauthenticated",
        Cond::Paths => "to.paths",
        Cond::PathPrefixes => "to.path_prefixes",
        Cond::Methods => "to.methods",
        Cond::Headers => "to.headers",
        Cond::Grpc => "to.grpc",
        Cond::NoRequest => "to",
    }
}

fn action_str(a: AuthzAction) -> &'static str {
    match a {
        AuthzAction::Allow => "allow",
        AuthzAction::Deny => "deny",
        AuthzAction::Audit => "audit",
    }
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.verdict;
        match v.rule {
            Some(i) => {
                let r = &self.policy.rules[i];
                let why = if v.decision == Decision::Deny {
                    "a matching deny rule wins"
                } else {
                    "no deny rule matches; this is the first matching allow rule"
                };
                writeln!(f, "{}: rule `{}` ({why})", v.decision.as_str(), r.name)?;
            }
            None => writeln!(
                f,
                "{}: the default (no allow or deny rule matches)",
                v.decision.as_str()
            )?,
        }
        for (i, (r, miss)) in self.policy.rules.iter().zip(&self.misses).enumerate() {
            let action = action_str(r.action);
            let mark = if v.rule == Some(i) { "*" } else { " " };
            match miss {
                None if r.from.is_none() && r.to.is_none() => writeln!(
                    f,
                    "{mark} {action:5} {}: matches (it has no conditions)",
                    r.name
                )?,
                None => writeln!(f, "{mark} {action:5} {}: matches", r.name)?,
                Some(c) => writeln!(
                    f,
                    "{mark} {action:5} {}: no match on {} ({})",
                    r.name,
                    field(*c),
                    self.had(*c)
                )?,
            }
        }
        for i in &self.would_deny {
            writeln!(
                f,
                "audit: rule `{}` would deny this (it matches; as `deny` it would win)",
                self.policy.rules[*i].name
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
