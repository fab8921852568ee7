//! SPIFFE IDs: `spiffe://trust-domain/path`, the identity a workload certificate carries as
//! its one URI SAN (`spiffe://cluster.local/ns/shop/sa/web`).
//!
//! One type for every place an identity appears: config (`allow_identities`,
//! `expect_identities`), the mesh CA (what it signs), verified certificates and the command
//! line. It is parsed once, by the rules of the SPIFFE ID specification, so that two
//! spellings of one identity cannot exist: an ID that is not canonical (upper-case trust
//! domain, dot segments, empty segments, percent-escapes, a query, a port) is refused, not
//! normalised. After that, string equality is identity equality (the path is case-sensitive).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// The longest SPIFFE ID accepted, in bytes (the specification's limit for URIs).
pub const MAX_LEN: usize = 2048;
/// The longest trust domain accepted, in bytes (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("`{0}` is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("`{0}` is not a SPIFFE ID: the trust domain must be non-empty lowercase letters, digits, `.`, `-`, `_` (no port or user info), at most 255 bytes")]
    TrustDomain(String),
    #[error("`{0}` is not a SPIFFE ID: path segments must be non-empty letters, digits, `.`, `-`, `_` (not `.` or `..`, no trailing `/`, no query or escapes)")]
    Path(String),
    #[error("a SPIFFE ID is at most {MAX_LEN} bytes (this one has {0})")]
    TooLong(usize),
}

impl SpiffeId {
    /// Parses a SPIFFE ID by the rules of the SPIFFE ID specification: the `spiffe` scheme,
    /// a trust domain of lowercase letters, digits, `.`, `-` and `_`, and a path of
    /// non-empty segments of letters, digits, `.`, `-` and `_` that are not `.` or `..`;
    /// no query, fragment, port, user info, percent-escape or trailing `/`.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let domain_ok = !domain.is_empty()
            && domain.len() <= MAX_TRUST_DOMAIN_LEN
            && domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !domain_ok {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        if !path.is_empty() && !path[1..].split('/').all(valid_segment) {
            return Err(SpiffeIdError::Path(s.to_string()));
        }
        Ok(SpiffeId(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared string, for logs and headers.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }

    /// `cluster.local` in `spiffe://cluster.local/ns/shop/sa/web`.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or(rest)
    }

    /// `/ns/shop/sa/web` in `spiffe://cluster.local/ns/shop/sa/web` (empty for a bare
    /// trust-domain ID).
    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.find('/').map_or("", |i| &rest[i..])
    }

    /// The Kubernetes namespace of an ID of the form `spiffe://TD/ns/NS/...`.
    pub fn namespace(&self) -> Option<&str> {
        let mut segs = self.path().strip_prefix('/')?.split('/');
        match (segs.next(), segs.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }
}

/// A path segment of a SPIFFE ID.
pub fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_spiffe_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            format!("{id:?}"),
            "SpiffeId(spiffe://cluster.local/ns/shop/sa/web)"
        );
        let bare = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!((bare.trust_domain(), bare.path()), ("example.org", ""));
        assert_eq!(bare.namespace(), None);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        for bad in [
            "web",
            "https://cluster.local/ns/a",
            "SPIFFE://td/ns/a",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://Cluster.Local/ns/a",
            "spiffe://td:8080/ns/a",
            "spiffe://user@td/ns/a",
            "spiffe://td/ns//a",
            "spiffe://td/ns/a/",
            "spiffe://td/",
            "spiffe://td/ns/../a",
            "spiffe://td/ns/./a",
            "spiffe://td/ns/a?x=1",
            "spiffe://td/ns/a#f",
            "spiffe://td/ns/a%2Fb",
            "spiffe://td/ns/a b",
            long.as_str(),
            long_td.as_str(),
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
            assert!(serde_json::from_value::<SpiffeId>(bad.into()).is_err());
        }
        // The limits are inclusive: 2048 bytes in all, 255 for the trust domain.
        let longest = format!("spiffe://td/{}", "a".repeat(MAX_LEN - 12));
        assert_eq!(longest.len(), MAX_LEN);
        assert!(SpiffeId::parse(&longest).is_ok());
        assert!(SpiffeId::parse(&format!("{longest}a")).is_err());
        assert!(SpiffeId::parse(&format!("spiffe://{}/a", "a".repeat(255))).is_ok());
    }
}
