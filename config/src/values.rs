//! Values parsed once, where the config is read: socket addresses, HTTP methods, header
//! names, header regexes, `host:port` names.
//!
//! Why here: validation and the proxy's compile used to parse the same strings twice, and
//! two parsers drift (they once disagreed on legal cookie names). Now each value has one
//! parser, [`ConfigValue::parse_value`], run when the config is deserialized; the proxy
//! consumes the result and has nothing left that can fail.
//!
//! Why [`Parsed`] keeps the text: some parsers normalise (`X-User` becomes `x-user`,
//! `[0:0::1]:80` becomes `[::1]:80`). The control plane stores configs and pushes them as
//! JSON, and `/config` shows them: a value must serialize back to exactly what the user
//! wrote, so that a round trip changes nothing. Equality is by that text too.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

/// A value the config writes as text, with its one parser.
pub trait ConfigValue: Sized {
    /// What a valid value looks like, in words a user knows ("an IP address with a port
    /// such as 127.0.0.1:8080"). Used when the value is not even text.
    const EXPECTED: &'static str;

    /// Parses the text; the error says what is wrong, quoting the text.
    fn parse_value(text: &str) -> Result<Self, String>;
}

/// A parsed value and the text it was parsed from. Dereferences to the value; serializes
/// to the text; compares by the text.
#[derive(Clone)]
pub struct Parsed<T> {
    value: T,
    text: Arc<str>,
}

impl<T: ConfigValue> Parsed<T> {
    pub fn parse(text: &str) -> Result<Parsed<T>, String> {
        Ok(Parsed {
            value: T::parse_value(text)?,
            text: text.into(),
        })
    }
}

impl<T: ConfigValue + fmt::Display> Parsed<T> {
    /// A value built by a program (not read from a file): its text is its `Display`.
    pub fn from_value(value: T) -> Parsed<T> {
        Parsed {
            text: value.to_string().into(),
            value,
        }
    }
}

impl<T> Parsed<T> {
    pub fn get(&self) -> &T {
        &self.value
    }

    /// The text as the user wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl<T> std::ops::Deref for Parsed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> PartialEq for Parsed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<T> Eq for Parsed<T> {}

impl<T> std::hash::Hash for Parsed<T> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.text.hash(h)
    }
}

impl<T> fmt::Debug for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.text)
    }
}

impl<T> fmt::Display for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<T: ConfigValue> std::str::FromStr for Parsed<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Parsed::parse(s)
    }
}

impl<T> Serialize for Parsed<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de, T: ConfigValue> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(PhantomData::<T>, Parsed::<T>::parse))
    }
}

/// Reads a config value from text (or a number or boolean, read as its text: YAML users
/// write `retry_on: [503]`), with `T::EXPECTED` as what was expected.
pub(crate) struct TextVisitor<T, V>(pub PhantomData<T>, pub fn(&str) -> Result<V, String>);

impl<T: ConfigValue, V> de::Visitor<'_> for TextVisitor<T, V> {
    type Value = V;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V, E> {
        (self.1)(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<V, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<V, E> {
        self.visit_str(&v.to_string())
    }
}

/// Serde for a value whose `Display` is canonical (it prints what it parsed, exactly):
/// no text needs keeping.
macro_rules! text_serde {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any($crate::values::TextVisitor(
                    std::marker::PhantomData::<$t>,
                    <$t as $crate::values::ConfigValue>::parse_value,
                ))
            }
        }
    };
}
pub(crate) use text_serde;

/// The words used for an IP address with a port.
pub const SOCKET_ADDR: &str = "an IP address with a port such as 127.0.0.1:8080";

impl ConfigValue for SocketAddr {
    const EXPECTED: &'static str = SOCKET_ADDR;

    fn parse_value(text: &str) -> Result<SocketAddr, String> {
        text.parse()
            .map_err(|_| format!("`{text}` is not {SOCKET_ADDR}"))
    }
}

impl ConfigValue for http::Method {
    const EXPECTED: &'static str = "an HTTP method such as GET";

    /// Any token (`PURGE` is a method), but not a lower-case spelling of a standard one:
    /// methods are case-sensitive, so `get` would never match a `GET` request.
    fn parse_value(text: &str) -> Result<http::Method, String> {
        let upper = text.to_ascii_uppercase();
        let standard = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if upper != text && standard.contains(&upper.as_str()) {
            return Err(format!(
                "`{text}` is not an HTTP method: methods are case-sensitive, write `{upper}`"
            ));
        }
        match http::Method::from_bytes(text.as_bytes()) {
            Ok(m) if !text.is_empty() => Ok(m),
            _ => Err(format!("`{text}` is not an HTTP method such as GET")),
        }
    }
}

impl ConfigValue for http::HeaderName {
    const EXPECTED: &'static str = "a header name such as x-request-id";

    fn parse_value(text: &str) -> Result<http::HeaderName, String> {
        http::HeaderName::from_bytes(text.as_bytes())
            .map_err(|_| format!("`{text}` is not a valid header name"))
    }
}

/// A regular expression that must match a whole header value (anchored, as Envoy's
/// `safe_regex`): `v[0-9]+` matches `v12` but not `v12-beta`.
#[derive(Clone, Debug)]
pub struct HeaderRegex(regex::Regex);

/// The largest compiled regex accepted: ample for header patterns, and it keeps a hostile
/// config from costing seconds to compile.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl HeaderRegex {
    /// Whether the regex matches all of `value`.
    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }
}

impl ConfigValue for HeaderRegex {
    const EXPECTED: &'static str = "a regular expression such as `v[0-9]+`";

    fn parse_value(text: &str) -> Result<HeaderRegex, String> {
        regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(HeaderRegex)
            .map_err(|e| {
                format!(
                    "`{text}` is not a valid regular expression: {}",
                    regex_why(&e)
                )
            })
    }
}

/// The one line of a regex error that says what is wrong (its full text draws carets
/// under the pattern over several lines, and quotes the anchored pattern, not the user's).
fn regex_why(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .map(|l| l.trim_start_matches("error:").trim().to_string())
            .unwrap_or_else(|| "syntax error".into()),
        regex::Error::CompiledTooBig(_) => "it is too large once compiled".into(),
        other => other.to_string(),
    }
}

/// A name to resolve and the port to connect to: `checkout.shop.svc:8080`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl ConfigValue for HostPort {
    const EXPECTED: &'static str = "a host name with a port such as checkout.shop.svc:8080";

    fn parse_value(text: &str) -> Result<HostPort, String> {
        let bad =
            || format!("`{text}` is not a host name with a port such as checkout.shop.svc:8080");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = !host.is_empty()
            && !host.contains(|c: char| c.is_whitespace() || c == '/' || c.is_control());
        let port = parse_port(port).ok_or_else(bad)?;
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A port written as plain decimal digits (no sign, no spaces), 0-65535.
pub(crate) fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_the_text_they_were_parsed_from() {
        let a: Parsed<SocketAddr> = "[0:0::1]:80".parse().unwrap();
        assert_eq!(a.port(), 80);
        assert_eq!(a.text(), "[0:0::1]:80");
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""[0:0::1]:80""#);
        let h: Parsed<http::HeaderName> = "X-User-Id".parse().unwrap();
        assert_eq!(h.as_str(), "x-user-id");
        assert_eq!(h.to_string(), "X-User-Id");
        let back: Parsed<http::HeaderName> = serde_json::from_str(r#""X-User-Id""#).unwrap();
        assert_eq!(back, h);
        assert_ne!(back, "x-user-id".parse().unwrap(), "compared by text");
    }

    #[test]
    fn each_parser_refuses_what_it_must() {
        assert!(Parsed::<SocketAddr>::parse("localhost:80").is_err());
        assert!(Parsed::<http::Method>::parse("PURGE").is_ok());
        let lower = Parsed::<http::Method>::parse("get").unwrap_err();
        assert!(lower.contains("write `GET`"), "{lower}");
        assert!(Parsed::<http::Method>::parse("GE T").is_err());
        assert!(Parsed::<http::Method>::parse("").is_err());
        assert!(Parsed::<http::HeaderName>::parse("bad header").is_err());
        let re = Parsed::<HeaderRegex>::parse("v[0-9]+").unwrap();
        assert!(re.is_match("v12"));
        assert!(!re.is_match("v12-beta"), "anchored at the end");
        assert!(!re.is_match("xv12"), "anchored at the start");
        let alt = Parsed::<HeaderRegex>::parse("a|b").unwrap();
        assert!(
            alt.is_match("a") && !alt.is_match("ab"),
            "anchors bind the whole pattern"
        );
        let err = Parsed::<HeaderRegex>::parse("(").unwrap_err();
        assert_eq!(err, "`(` is not a valid regular expression: unclosed group");
        let big = Parsed::<HeaderRegex>::parse(r"\w{1000}{1000}").unwrap_err();
        assert!(big.contains("too large"), "{big}");
        for bad in [
            "svc",
            ":80",
            "svc:0",
            "svc:+80",
            "svc:65536",
            "a b:80",
            "svc:",
        ] {
            assert!(Parsed::<HostPort>::parse(bad).is_err(), "{bad} accepted");
        }
        let hp = Parsed::<HostPort>::parse("checkout.shop.svc:8080").unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("checkout.shop.svc", 8080));
        assert_eq!(hp.get().to_string(), "checkout.shop.svc:8080");
        assert_eq!(format!("{hp:?}"), r#""checkout.shop.svc:8080""#);
        // Five digits at most, the largest port included.
        assert_eq!(Parsed::<HostPort>::parse("svc:65535").unwrap().port, 65535);
        for bad in ["svc:000080", "a/b:80", "a\tb:80", "a\u{1}b:80"] {
            assert!(Parsed::<HostPort>::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
