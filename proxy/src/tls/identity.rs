//! SPIFFE identities: `spiffe://trust-domain/path`, carried as the URI SAN of a workload
//! certificate (`spiffe://cluster.local/ns/shop/sa/web`).
//!
//! An identity is parsed once, from config or from a verified certificate, and compared as a
//! whole string afterwards: the SPIFFE spec makes IDs case-sensitive in the path and requires
//! a lowercase trust domain, so string equality is the right comparison.

use std::fmt;
use std::sync::Arc;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("`{0}` is not a SPIFFE ID: the trust domain must be non-empty lowercase letters, digits, `.`, `-`, `_`")]
    TrustDomain(String),
    #[error("`{0}` is not a SPIFFE ID: path segments must be non-empty letters, digits, `.`, `-`, `_` (not `.` or `..`)")]
    Path(String),
}

impl Identity {
    /// Parses a SPIFFE ID by the rules of the SPIFFE ID spec (no query, fragment, port or
    /// user info; no empty, `.` or `..` path segment; no trailing `/`).
    pub fn parse(s: &str) -> Result<Identity, IdentityError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let domain_ok = !domain.is_empty()
            && domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !domain_ok {
            return Err(IdentityError::TrustDomain(s.to_string()));
        }
        if !path.is_empty() {
            let segments_ok = path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            });
            if !segments_ok {
                return Err(IdentityError::Path(s.to_string()));
            }
        }
        Ok(Identity(s.into()))
    }

    /// The SPIFFE identity of a certificate: its first URI SAN that is a SPIFFE ID.
    pub fn from_cert(der: &[u8]) -> Option<Identity> {
        super::der::uri_sans(der)
            .into_iter()
            .find_map(|uri| Identity::parse(uri).ok())
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
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.0)
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_spiffe_ids() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        let bare = Identity::parse("spiffe://example.org").unwrap();
        assert_eq!((bare.trust_domain(), bare.path()), ("example.org", ""));
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "web",
            "https://cluster.local/ns/a",
            "spiffe://",
            "spiffe:///ns/a",
            "spiffe://Cluster.Local/ns/a",
            "spiffe://td:8080/ns/a",
            "spiffe://user@td/ns/a",
            "spiffe://td/ns//a",
            "spiffe://td/ns/a/",
            "spiffe://td/ns/../a",
            "spiffe://td/ns/a?x=1",
            "spiffe://td/ns/a#f",
            "spiffe://td/ns/a b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
