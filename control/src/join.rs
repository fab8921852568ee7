//! Join tokens bound to identities: how a workload outside Kubernetes proves which SPIFFE
//! IDs it may hold (`spur control --join-tokens FILE`).
//!
//! A single shared token that obtains any identity makes every holder able to become every
//! other workload, and `allow_identities` then stops nobody inside the mesh. So each token
//! is bound to a pattern: an exact SPIFFE ID, or a prefix ending in `/*`
//! (`spiffe://cluster.local/ns/shop/*` covers `…/ns/shop/sa/web` but not `…/ns/pay/sa/api`
//! or `…/ns/shop` itself). The file holds one `TOKEN PATTERN` per line, `#` comments and
//! blank lines aside. The old `--join-token-file F` is one token with the pattern
//! `spiffe://TD/*` (any identity of the trust domain), and says so in a warning at start.
//!
//! Tokens are compared in constant time, and every token is compared, so the time taken
//! tells nothing about which one (or which prefix) was close.

use spur_config::SpiffeId;
use std::fmt;

/// What a token may obtain.
#[derive(Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Every identity whose string starts with this (`spiffe://td/ns/shop/`, always ending
    /// in `/`).
    Prefix(String),
}

impl Pattern {
    /// Parses a pattern, which must lie in `trust_domain`.
    pub fn parse(s: &str, trust_domain: &str) -> Result<Pattern, String> {
        let (id_part, prefix) = match s.strip_suffix("/*") {
            Some(base) => (base, true),
            None => (s, false),
        };
        if id_part.contains('*') {
            return Err(format!(
                "`{s}`: `*` may only end a pattern, as `/*` (spiffe://TD/ns/NS/*)"
            ));
        }
        let id = SpiffeId::parse(id_part).map_err(|e| format!("`{s}`: {e}"))?;
        if id.trust_domain() != trust_domain {
            return Err(format!(
                "`{s}` is not in the mesh CA's trust domain `{trust_domain}`"
            ));
        }
        Ok(if prefix {
            Pattern::Prefix(format!("{id}/"))
        } else {
            if id.path().is_empty() {
                return Err(format!(
                    "`{s}` names the trust domain, not a workload: write `{s}/*` for every identity in it"
                ));
            }
            Pattern::Exact(id)
        })
    }

    /// `spiffe://TD/*`: every identity of the trust domain.
    pub fn any(trust_domain: &str) -> Pattern {
        Pattern::Prefix(format!("spiffe://{trust_domain}/"))
    }

    pub fn covers(&self, id: &SpiffeId) -> bool {
        match self {
            Pattern::Exact(e) => e == id,
            Pattern::Prefix(p) => id.as_str().starts_with(p.as_str()),
        }
    }

    /// The one identity an exact pattern names (what a CSR without an ID gets).
    pub fn exact(&self) -> Option<&SpiffeId> {
        match self {
            Pattern::Exact(id) => Some(id),
            Pattern::Prefix(_) => None,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(id) => write!(f, "{id}"),
            Pattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({self})")
    }
}

/// A token and what it may obtain. `Debug` never shows the token.
#[derive(Clone)]
pub struct JoinToken {
    token: String,
    pub pattern: Pattern,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    pub fn new(token: impl Into<String>, pattern: Pattern) -> JoinToken {
        JoinToken {
            token: token.into(),
            pattern,
        }
    }
}

/// Constant-time comparison: the time taken does not depend on where the tokens differ.
pub fn same_token(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    diff == 0
}

/// The pattern of the token given, comparing it with every token.
pub fn find<'a>(tokens: &'a [JoinToken], given: &str) -> Option<&'a Pattern> {
    let given = given.trim().as_bytes();
    let mut found = None;
    for t in tokens {
        if same_token(given, t.token.as_bytes()) && found.is_none() {
            found = Some(&t.pattern);
        }
    }
    found
}

/// Parses a `--join-tokens` file: `TOKEN PATTERN` per line. Every error is reported with
/// its line number; a token listed twice is an error (which pattern would it have?).
pub fn parse_file(text: &str, trust_domain: &str) -> Result<Vec<JoinToken>, Vec<String>> {
    let (mut tokens, mut errors) = (Vec::<JoinToken>::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [token, pattern] = fields[..] else {
            errors.push(format!(
                "line {n}: expected `TOKEN PATTERN` (two fields), found {}",
                fields.len()
            ));
            continue;
        };
        match Pattern::parse(pattern, trust_domain) {
            Ok(pattern) => {
                if tokens.iter().any(|t| t.token == token) {
                    errors.push(format!("line {n}: this token is already listed above"));
                } else {
                    tokens.push(JoinToken::new(token, pattern));
                }
            }
            Err(e) => errors.push(format!("line {n}: {e}")),
        }
    }
    if tokens.is_empty() && errors.is_empty() {
        errors.push("no token in the file".into());
    }
    if errors.is_empty() {
        Ok(tokens)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn patterns_cover_their_identities_only() {
        let td = "cluster.local";
        let shop = Pattern::parse("spiffe://cluster.local/ns/shop/*", td).unwrap();
        assert!(shop.covers(&id("spiffe://cluster.local/ns/shop/sa/web")));
        assert!(!shop.covers(&id("spiffe://cluster.local/ns/shop")));
        assert!(!shop.covers(&id("spiffe://cluster.local/ns/shopping/sa/x")));
        assert!(!shop.covers(&id("spiffe://cluster.local/ns/pay/sa/api")));
        let exact = Pattern::parse("spiffe://cluster.local/ns/a/sa/b", td).unwrap();
        assert!(exact.covers(&id("spiffe://cluster.local/ns/a/sa/b")));
        assert!(!exact.covers(&id("spiffe://cluster.local/ns/a/sa/b2")));
        let any = Pattern::any(td);
        assert_eq!(any, Pattern::parse("spiffe://cluster.local/*", td).unwrap());
        assert!(any.covers(&id("spiffe://cluster.local/x")));
        assert!(!any.covers(&id("spiffe://other.org/x")));
        for bad in [
            "spiffe://cluster.local/ns/*/sa/web",
            "spiffe://cluster.local/ns/shop*",
            "spiffe://other.org/ns/shop/*",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/../x/*",
            "web",
        ] {
            assert!(Pattern::parse(bad, td).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_file_has_one_token_and_pattern_per_line() {
        let text =
            "# shop\nt-shop spiffe://td/ns/shop/*\n\n  t-api   spiffe://td/ns/pay/sa/api  \n";
        let tokens = parse_file(text, "td").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            find(&tokens, "t-shop").unwrap().to_string(),
            "spiffe://td/ns/shop/*"
        );
        assert_eq!(
            find(&tokens, " t-api\n").unwrap().exact(),
            Some(&id("spiffe://td/ns/pay/sa/api"))
        );
        assert!(find(&tokens, "t-sho").is_none());
        assert!(find(&tokens, "").is_none());
        let errors = parse_file(
            "a spiffe://td/x\nb\nc spiffe://td/y extra\na spiffe://td/z\nd spiffe://no/x\n",
            "td",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("line 2:"));
        assert!(errors[2].contains("already listed"));
        assert!(
            !format!("{:?}", tokens[0]).contains("t-shop"),
            "Debug hides the token"
        );
        assert_eq!(
            parse_file("# none\n", "td").unwrap_err(),
            ["no token in the file"]
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"secret", b"secret"));
        assert!(!same_token(b"secreT", b"secret"));
        assert!(!same_token(b"secret-and-more", b"secret"));
        assert!(!same_token(b"", b"secret"));
    }
}
