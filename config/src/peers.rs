//! Who a peer is, as an authorization rule's `from` names it: SPIFFE ID patterns
//! (`spiffe://cluster.local/ns/shop/*`), Kubernetes namespaces and source CIDRs.
//!
//! Each is parsed once here, like every config value (see [`crate::values`]): the proxy's
//! policy and `spur authz explain` match on the parsed form and cannot disagree about what
//! a pattern means.
//!
//! Why `*` stays inside one path segment (`spiffe://td/ns/*/sa/web` does not match
//! `spiffe://td/ns/a/b/sa/web`): a SPIFFE ID's segments carry meaning (namespace, service
//! account), and a star that crossed them could let an identity from a deeper or stranger
//! path through a rule written for one shape. "Everything below" is said explicitly, with a
//! final `/*`, the way SPEC's join-token patterns (`spur control --join-tokens`) say it.

use crate::spiffe::{valid_segment, SpiffeId};
use crate::values::{text_serde, ConfigValue};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// A pattern of SPIFFE IDs: an exact ID, `*` alone (any verified identity), or an ID where
/// `*` stands for any part of one segment and a final `/*` for one or more segments below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityGlob {
    text: Arc<str>,
    kind: GlobKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum GlobKind {
    Any,
    Exact,
    /// The trust domain and path segments (each may hold `*`), and whether a final `/*`
    /// lets one or more further segments follow.
    Segments {
        segments: Vec<String>,
        below: bool,
    },
}

const GLOB: &str = "a SPIFFE ID, where `*` stands for any part of one segment \
     (`spiffe://td/ns/shop/sa/*`) and a final `/*` for everything below \
     (`spiffe://td/ns/shop/*`); or `*` alone for any verified identity";

impl IdentityGlob {
    /// Whether the identity `id` (a canonical SPIFFE ID, as verified certificates give)
    /// matches.
    pub fn matches(&self, id: &str) -> bool {
        match &self.kind {
            GlobKind::Any => true,
            GlobKind::Exact => id == &*self.text,
            GlobKind::Segments { segments, below } => {
                let Some(rest) = id.strip_prefix("spiffe://") else {
                    return false;
                };
                let mut parts = rest.split('/');
                for pattern in segments {
                    match parts.next() {
                        Some(part) if segment_matches(pattern, part) => {}
                        _ => return false,
                    }
                }
                let more = parts.next().is_some();
                more == *below
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// `*` matches any run of characters (none included) of one segment.
fn segment_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last star was, and how much of the text it has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

impl ConfigValue for IdentityGlob {
    const EXPECTED: &'static str = GLOB;

    fn parse_value(text: &str) -> Result<IdentityGlob, String> {
        let bad = || format!("`{text}` is not {GLOB}");
        let kind = if text == "*" {
            GlobKind::Any
        } else if !text.contains('*') {
            SpiffeId::parse(text).map_err(|e| e.to_string())?;
            GlobKind::Exact
        } else {
            // The same characters as an ID: check the pattern with each star as a letter.
            SpiffeId::parse(&text.replace('*', "x")).map_err(|_| bad())?;
            let rest = &text["spiffe://".len()..];
            let mut segments: Vec<String> = rest.split('/').map(str::to_string).collect();
            let below = segments.len() > 1 && segments.last().is_some_and(|s| s == "*");
            if below {
                segments.pop();
            }
            GlobKind::Segments { segments, below }
        };
        Ok(IdentityGlob {
            text: text.into(),
            kind,
        })
    }
}

impl fmt::Display for IdentityGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

text_serde!(IdentityGlob);

/// A Kubernetes namespace as it appears in a SPIFFE ID (`spiffe://td/ns/NAMESPACE/...`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ConfigValue for Namespace {
    const EXPECTED: &'static str = "a namespace name such as shop";

    fn parse_value(text: &str) -> Result<Namespace, String> {
        if !valid_segment(text) {
            return Err(format!(
                "`{text}` is not a namespace: letters, digits, `.`, `-` and `_`, as in a SPIFFE ID"
            ));
        }
        Ok(Namespace(text.to_string()))
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

text_serde!(Namespace);

/// The namespace of a SPIFFE ID of the form `spiffe://TD/ns/NS/...` (as
/// [`SpiffeId::namespace`], on the text a verified certificate gave).
pub fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let mut segs = rest.split('/').skip(1);
    match (segs.next(), segs.next()) {
        (Some("ns"), Some(ns)) => Some(ns),
        _ => None,
    }
}

/// A block of addresses: `10.0.0.0/8`, `2001:db8::/32`, or one address (`10.1.2.3`, which is
/// `/32`, or `/128` for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

const CIDR: &str = "an address block such as 10.0.0.0/8 or 2001:db8::/32, or one IP address";

impl Cidr {
    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, how a
    /// dual-stack socket shows an IPv4 peer) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(ip)), self.prefix, 32) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(ip), self.prefix, 128) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` with everything after the first `prefix` of `width` bits cleared.
fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
    let host = u32::from(width - prefix);
    if host >= 128 {
        0
    } else {
        (bits >> host) << host
    }
}

impl ConfigValue for Cidr {
    const EXPECTED: &'static str = CIDR;

    fn parse_value(text: &str) -> Result<Cidr, String> {
        let bad = || format!("`{text}` is not {CIDR}");
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, len)) => {
                let ip: IpAddr = ip.parse().map_err(|_| bad())?;
                let digits =
                    !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit());
                let len: u8 = if digits {
                    len.parse().map_err(|_| bad())?
                } else {
                    return Err(bad());
                };
                (ip, len)
            }
            None => {
                let ip: IpAddr = text.parse().map_err(|_| bad())?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let (width, bits) = match ip {
            IpAddr::V4(v4) => (32, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (128, u128::from(v6)),
        };
        if prefix > width {
            return Err(format!(
                "`{text}`: the prefix length is at most {width} for this address"
            ));
        }
        if masked(bits, prefix, width) != bits {
            let net = match ip {
                IpAddr::V4(_) => IpAddr::from((masked(bits, prefix, 32) as u32).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(masked(bits, prefix, 128).to_be_bytes()),
            };
            return Err(format!(
                "`{text}` has bits set after its /{prefix} prefix: write `{net}/{prefix}`"
            ));
        }
        Ok(Cidr { addr: ip, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::Parsed;

    fn glob(t: &str) -> IdentityGlob {
        IdentityGlob::parse_value(t).unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    #[test]
    fn identity_patterns_match_within_segments_and_below_a_final_star() {
        let web = "spiffe://td/ns/shop/sa/web";
        assert!(glob("*").matches(web));
        assert!(glob(web).matches(web));
        assert!(!glob(web).matches("spiffe://td/ns/shop/sa/web2"));
        let below = glob("spiffe://td/ns/shop/*");
        assert!(below.matches(web));
        assert!(below.matches("spiffe://td/ns/shop/x"));
        assert!(!below.matches("spiffe://td/ns/shop"), "below, not itself");
        assert!(!below.matches("spiffe://td/ns/shopping/sa/web"));
        assert!(!below.matches("spiffe://other/ns/shop/sa/web"));
        let any_ns = glob("spiffe://td/ns/*/sa/web");
        assert!(any_ns.matches(web));
        assert!(!any_ns.matches("spiffe://td/ns/a/b/sa/web"), "one segment");
        assert!(!any_ns.matches("spiffe://td/ns/shop/sa/api"));
        let part = glob("spiffe://td/ns/shop/sa/web-*");
        assert!(part.matches("spiffe://td/ns/shop/sa/web-1"));
        assert!(part.matches("spiffe://td/ns/shop/sa/web-"));
        assert!(!part.matches(web));
        let mid = glob("spiffe://*.local/ns/a*c/sa/*");
        assert!(mid.matches("spiffe://cluster.local/ns/abc/sa/x"));
        assert!(mid.matches("spiffe://cluster.local/ns/ac/sa/x"));
        assert!(!mid.matches("spiffe://cluster.local/ns/abd/sa/x"));
        assert!(
            mid.matches("spiffe://cluster.local/ns/abc/sa/x/y"),
            "a final `/*` is everything below"
        );
        assert!(!mid.matches("spiffe://cluster.local/ns/abc/sa"));
        assert!(segment_matches("a*b*c", "a-b-b-c"));
        assert!(!segment_matches("a*b*c", "a-b-b-d"));
        assert_eq!(mid.as_str(), "spiffe://*.local/ns/a*c/sa/*");
        // A star as the whole trust domain is that one segment, not everything below.
        let any_td = glob("spiffe://*");
        assert!(any_td.matches("spiffe://td"));
        assert!(!any_td.matches("spiffe://td/ns/a"));
    }

    #[test]
    fn bad_identity_patterns_are_refused() {
        for bad in [
            "",
            "web",
            "spiffe://TD/*",
            "spiffe://td/ns//*",
            "spiffe://td/ns/a/",
            "spiffe://td/ns/a b/*",
            "https://td/*",
            "**x",
        ] {
            assert!(IdentityGlob::parse_value(bad).is_err(), "{bad} accepted");
        }
        let e = IdentityGlob::parse_value("spiffe://td/ns/*/../x").unwrap_err();
        assert!(e.contains("final `/*`"), "{e}");
    }

    #[test]
    fn namespaces_of_ids() {
        assert_eq!(namespace_of("spiffe://td/ns/shop/sa/web"), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/ns/shop"), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/x/shop"), None);
        assert_eq!(namespace_of("spiffe://td"), None);
        let id = SpiffeId::parse("spiffe://td/ns/pay/sa/api").unwrap();
        assert_eq!(namespace_of(id.as_str()), id.namespace());
        assert!(Namespace::parse_value("shop").is_ok());
        assert!(Namespace::parse_value("a/b").is_err());
        assert!(Namespace::parse_value("").is_err());
    }

    #[test]
    fn cidrs_contain_their_addresses() {
        let c = |t: &str| Parsed::<Cidr>::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        let ten = c("10.0.0.0/8");
        assert!(ten.contains(ip("10.255.1.2")));
        assert!(!ten.contains(ip("11.0.0.1")));
        assert!(ten.contains(ip("::ffff:10.0.0.1")), "mapped IPv4");
        assert!(!ten.contains(ip("::1")));
        assert!(c("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        let one = c("127.0.0.1");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert_eq!(one.text(), "127.0.0.1", "kept as written");
        assert!(c("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!c("2001:db8::/32").contains(ip("2001:db9::5")));
        assert_eq!(
            Parsed::<Cidr>::parse("10.0.0.1/8").unwrap_err(),
            "`10.0.0.1/8` has bits set after its /8 prefix: write `10.0.0.0/8`"
        );
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "ten/8",
            "10.0.0/8",
            "",
        ] {
            assert!(Parsed::<Cidr>::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
