//! Feature flags: which flags are on for a request.
//!
//! A flag is on when it is `enabled` and any of its rules matches: a header or cookie whose
//! value is in a list, or a percentage of users chosen by a stable hash of a key (`hash_on`).
//! The hash is seeded with the flag's name and cut into 10,000 buckets; a user is on when
//! their bucket is below `percent × 100`. So the same user always gets the same answer, two
//! flags pick independent users, and raising 10% to 20% keeps every user who was on.
//!
//! All flags are evaluated once per request, up front: the answers feed route matching
//! (`match.flag`) and the `x-spur-flags` header sent upstream. A request from a trusted
//! peer that already carries `x-spur-flags` keeps those decisions instead, so one user's
//! request sees the same variant at every hop of a call chain.

use super::split::{cookie, stable_hash, HashOn};
use http::{HeaderMap, HeaderName};
use spur_config::{Flag, FlagRule};
use std::collections::BTreeMap;

#[derive(Debug)]
enum Rule {
    Header(HeaderName, Vec<String>),
    Cookie(String, Vec<String>),
    /// On for `basis_points` of 10,000 buckets of the key's hash. Without a key (no
    /// `hash_on`, or the request lacks it) the rule does not match: stickiness would be lost.
    Percent {
        basis_points: u64,
        hash_on: Option<HashOn>,
    },
}

#[derive(Debug)]
pub struct CompiledFlag {
    pub name: String,
    enabled: bool,
    rules: Vec<Rule>,
}

impl CompiledFlag {
    pub fn compile(name: &str, f: &Flag) -> CompiledFlag {
        let rules = f.rules.iter().map(compile_rule).collect();
        CompiledFlag {
            name: name.to_string(),
            enabled: f.enabled,
            rules,
        }
    }

    /// Whether the flag is on for a request with these headers.
    pub fn evaluate(&self, headers: &HeaderMap) -> bool {
        self.enabled && self.rules.iter().any(|r| self.rule_matches(r, headers))
    }

    fn rule_matches(&self, rule: &Rule, headers: &HeaderMap) -> bool {
        match rule {
            Rule::Header(name, values) => headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| values.iter().any(|w| w == v.trim())),
            Rule::Cookie(name, values) => {
                cookie(headers, name).is_some_and(|v| values.iter().any(|w| w == v))
            }
            Rule::Percent {
                basis_points,
                hash_on,
            } => {
                let key = match hash_on {
                    Some(h) => h.key(headers),
                    None => None,
                };
                match key {
                    Some(k) => bucket(&self.name, k) < *basis_points,
                    None => *basis_points >= 10_000,
                }
            }
        }
    }
}

/// The bucket (0..10,000) of `key` for flag `flag`.
pub fn bucket(flag: &str, key: &[u8]) -> u64 {
    stable_hash(stable_hash(0xf1a6, flag.as_bytes()), key) % 10_000
}

/// A rule of a validated flag: exactly one of header, cookie, percent (validation refuses
/// any other); values were parsed by spur-config.
fn compile_rule(r: &FlagRule) -> Rule {
    if let Some(h) = &r.header {
        return Rule::Header(h.get().clone(), r.values.clone());
    }
    if let Some(c) = &r.cookie {
        return Rule::Cookie(c.as_str().to_string(), r.values.clone());
    }
    Rule::Percent {
        basis_points: (r.percent.unwrap_or(0.0) * 100.0)
            .round()
            .clamp(0.0, 10_000.0) as u64,
        hash_on: r.hash_on.as_deref().map(HashOn::from),
    }
}

/// Parses an `x-spur-flags` value: comma-separated flag names.
pub fn parse_header(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The `x-spur-flags` value for a set of flags that are on: sorted, comma-separated.
pub fn header_value<'a>(on: impl IntoIterator<Item = &'a str>) -> String {
    let set: BTreeMap<&str, ()> = on.into_iter().map(|n| (n, ())).collect();
    set.into_keys().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flag(yaml: &str) -> CompiledFlag {
        let f: Flag = serde_json::from_str(yaml).unwrap();
        CompiledFlag::compile("new-checkout", &f)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn header_and_cookie_rules() {
        let f = flag(
            r#"{"enabled": true, "rules": [{"header": "x-user-group", "values": ["beta", "staff"]}, {"cookie": "beta", "values": ["1"]}]}"#,
        );
        assert!(f.evaluate(&headers(&[("x-user-group", "beta")])));
        assert!(f.evaluate(&headers(&[("x-user-group", "staff")])));
        assert!(!f.evaluate(&headers(&[("x-user-group", "public")])));
        assert!(f.evaluate(&headers(&[("cookie", "a=2; beta=1")])));
        assert!(!f.evaluate(&headers(&[("cookie", "beta=0")])));
        assert!(!f.evaluate(&HeaderMap::new()));
        let off = flag(
            r#"{"enabled": false, "rules": [{"header": "x-user-group", "values": ["beta"]}]}"#,
        );
        assert!(!off.evaluate(&headers(&[("x-user-group", "beta")])));
    }

    #[test]
    fn percent_rules_hit_their_share_and_grow_without_reshuffling() {
        let ten =
            flag(r#"{"enabled": true, "rules": [{"percent": 10, "hash_on": "header:x-user-id"}]}"#);
        let twenty =
            flag(r#"{"enabled": true, "rules": [{"percent": 20, "hash_on": "header:x-user-id"}]}"#);
        let mut on10 = 0;
        for i in 0..10_000 {
            let h = headers(&[("x-user-id", &format!("user-{i}"))]);
            let a = ten.evaluate(&h);
            assert_eq!(a, ten.evaluate(&h), "sticky");
            if a {
                on10 += 1;
                assert!(
                    twenty.evaluate(&h),
                    "user-{i} was on at 10% and must stay on at 20%"
                );
            }
        }
        assert!((850..=1150).contains(&on10), "{on10} of 10000 on at 10%");
        // No key: a partial percentage cannot be sticky, so it does not match.
        assert!(!ten.evaluate(&HeaderMap::new()));
        let all = flag(r#"{"enabled": true, "rules": [{"percent": 100}]}"#);
        assert!(all.evaluate(&HeaderMap::new()));
    }

    #[test]
    fn a_key_at_the_percentage_boundary_is_off() {
        // A key whose bucket is exactly the rule's basis points is just outside it: 0%
        // turns nobody on, and a share of p% is buckets 0..p*100.
        let key = (0..100_000)
            .map(|i| format!("user-{i}"))
            .find(|k| bucket("new-checkout", k.as_bytes()) == 1234)
            .expect("some key lands in bucket 1234");
        let h = headers(&[("x-user-id", &key)]);
        let at = |p: &str| {
            flag(&format!(
                r#"{{"enabled": true, "rules": [{{"percent": {p}, "hash_on": "header:x-user-id"}}]}}"#
            ))
            .evaluate(&h)
        };
        assert!(!at("12.34"), "bucket 1234 is outside 12.34%");
        assert!(at("12.35"));
        let zero = (0..100_000)
            .map(|i| format!("user-{i}"))
            .find(|k| bucket("new-checkout", k.as_bytes()) == 0)
            .expect("some key lands in bucket 0");
        let h0 = headers(&[("x-user-id", &zero)]);
        let none =
            flag(r#"{"enabled": true, "rules": [{"percent": 0, "hash_on": "header:x-user-id"}]}"#);
        assert!(!none.evaluate(&h0), "0% turns nobody on");
    }

    #[test]
    fn header_values() {
        assert_eq!(parse_header(" a, b,,c "), vec!["a", "b", "c"]);
        assert_eq!(header_value(["b", "a", "b"]), "a,b");
        assert_eq!(header_value([]), "");
    }

    proptest! {
        #[test]
        fn raising_a_percentage_never_turns_a_user_off(key in "[a-z0-9]{1,16}", lo in 0u32..100, step in 0u32..100) {
            let hi = (lo + step).min(100);
            let mk = |p: u32| CompiledFlag::compile("f", &serde_json::from_str::<Flag>(&format!(r#"{{"enabled": true, "rules": [{{"percent": {p}, "hash_on": "header:x-k"}}]}}"#)).unwrap());
            let h = headers(&[("x-k", &key)]);
            if mk(lo).evaluate(&h) {
                prop_assert!(mk(hi).evaluate(&h));
            }
        }
    }
}
