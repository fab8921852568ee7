//! A listener's authorization policy, as written: named rules that `allow`, `deny` or
//! `audit` what matches their `from` (who the peer is) and `to` (what it asks for), and a
//! `default` for what no rule matches.
//!
//! The rules are a set, not a list: every rule is evaluated, any matching `deny` wins, then
//! any matching `allow`, else the default. Order cannot change a decision, so a rule added
//! anywhere does what it says, and a policy reads the same from any end. `audit` rules
//! decide nothing: they count what they would deny, which is how a new `deny` is rolled out
//! (audit, watch its counter, switch it to deny with a push).
//!
//! Within `from` and within `to` the fields are ANDed; the entries of each list are ORed.
//! An absent field does not restrict; an empty list is an error (it would match nothing).
//!
//! `allow_identities` (the older, TLS-level form) is the policy [`listener_policy`] builds:
//! one allow rule named `allow_identities` and `default: deny`.

use crate::peers::{Cidr, IdentityGlob, Namespace};
use crate::route::HeaderMatch;
use crate::types::Listener;
use crate::values::{text_serde, ConfigValue, Parsed};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The name of the rule that `allow_identities` becomes (reserved in `authz`).
pub const ALLOW_IDENTITIES_RULE: &str = "allow_identities";
/// The rule label of a decision no rule made (reserved in `authz`).
pub const DEFAULT_RULE: &str = "default";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authz {
    /// The decision when no `allow` or `deny` rule matches.
    #[serde(default)]
    pub default: AuthzDefault,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzDefault {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    Allow,
    Deny,
    /// Decides nothing; counts the requests it would deny.
    Audit,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Unique on the listener: the `rule` label and the access log's `authz_rule`.
    pub name: String,
    pub action: AuthzAction,
    /// Absent: any peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzFrom>,
    /// Absent: any request. Not on `tcp` listeners (they see no requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthzTo>,
}

/// Who the peer is. Fields are ANDed, list entries ORed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzFrom {
    /// The verified SPIFFE ID matches one of these patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<Vec<IdentityGlob>>,
    /// The verified SPIFFE ID is `spiffe://TD/ns/NS/...` with NS one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<Namespace>>,
    /// The peer's address is in one of these blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidrs: Option<Vec<Parsed<Cidr>>>,
    /// `true`: the peer has no verified identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

/// What the request asks for. Fields are ANDed, list entries ORed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzTo {
    /// Exact paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Segment-aware prefixes, as a route's `path_prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefixes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<Parsed<http::Method>>>,
    /// Header conditions as in a route's `match.headers` (here any one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<HeaderMatch>>,
    /// gRPC calls, from the path `/package.Service/Method`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Vec<GrpcMatch>>,
}

/// A gRPC service, and optionally one of its methods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatch {
    pub service: GrpcName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcName>,
}

/// A protobuf name: identifiers (letters, digits, `_`, not starting with a digit) joined
/// by `.` (`shop.v1.Cart`, `Get`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrpcName(String);

impl GrpcName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ConfigValue for GrpcName {
    const EXPECTED: &'static str = "a protobuf name such as shop.v1.Cart";

    fn parse_value(text: &str) -> Result<GrpcName, String> {
        let ident = |s: &str| {
            s.bytes().next().is_some_and(|b| !b.is_ascii_digit())
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !text.split('.').all(ident) {
            return Err(format!(
                "`{text}` is not a protobuf name: identifiers (letters, digits, `_`) joined by `.`"
            ));
        }
        Ok(GrpcName(text.to_string()))
    }
}

impl fmt::Display for GrpcName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

text_serde!(GrpcName);

/// The policy a listener enforces: its `authz`, or the one `tls.allow_identities` stands
/// for (an allow rule named `allow_identities` and `default: deny`), or none. (Validation
/// refuses a listener with both.)
pub fn listener_policy(l: &Listener) -> Option<Authz> {
    if let Some(a) = &l.authz {
        return Some(a.clone());
    }
    let allow = &l.tls.as_ref()?.allow_identities;
    if allow.is_empty() {
        return None;
    }
    let identities = allow
        .iter()
        .map(|id| IdentityGlob::parse_value(id.as_str()).expect("a SPIFFE ID is an exact pattern"))
        .collect();
    Some(Authz {
        default: AuthzDefault::Deny,
        rules: vec![AuthzRule {
            name: ALLOW_IDENTITIES_RULE.to_string(),
            action: AuthzAction::Allow,
            from: Some(AuthzFrom {
                identities: Some(identities),
                ..AuthzFrom::default()
            }),
            to: None,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_names() {
        for good in ["Get", "shop.Cart", "shop.v1.Cart_2", "_x"] {
            assert!(GrpcName::parse_value(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "shop..Cart",
            ".Cart",
            "shop.Cart.",
            "1x",
            "shop/Cart",
            "a b",
        ] {
            assert!(GrpcName::parse_value(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn allow_identities_is_an_allow_rule_and_default_deny() {
        let cfg = crate::load(
            r#"
listeners:
  - name: a
    listen: 127.0.0.1:1
    cluster: c
    tls: { cert: c.pem, key: k.pem, client_ca: ca.pem, allow_identities: ["spiffe://td/ns/a/sa/web"] }
  - name: b
    listen: 127.0.0.1:2
    cluster: c
clusters: [{ name: c, endpoints: ["127.0.0.1:3"] }]
"#,
            None,
        )
        .unwrap();
        let p = listener_policy(&cfg.listeners[0]).unwrap();
        assert_eq!(p.default, AuthzDefault::Deny);
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].name, ALLOW_IDENTITIES_RULE);
        assert_eq!(p.rules[0].action, AuthzAction::Allow);
        let ids = p.rules[0]
            .from
            .as_ref()
            .unwrap()
            .identities
            .as_ref()
            .unwrap();
        assert!(ids[0].matches("spiffe://td/ns/a/sa/web"));
        assert!(!ids[0].matches("spiffe://td/ns/a/sa/web2"));
        assert_eq!(listener_policy(&cfg.listeners[1]), None);
    }
}
