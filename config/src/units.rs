//! Durations (`250ms`, `2s`, `1m`) and sizes (`64KiB`, `1MiB`) as the config file writes them.
//!
//! Both parse from a string with a unit and print back the same way, so a config that is
//! parsed and dumped (the admin `/config` endpoint, the control plane's history) reads like
//! what the operator wrote.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A duration written with a unit: `ms`, `s`, `m` or `h` (`0ms` is allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{s}` has no unit (write e.g. `250ms`, `2s`, `1m`)"))?;
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "`{s}` is not a duration (write e.g. `250ms`, `2s`, `1m`)"
            ));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{unit}` (use ms, s, m or h)"
                ))
            }
        }
        .ok_or_else(|| format!("`{s}`: number too large"))?;
        Ok(Duration::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms != 0 && ms % 3_600_000 == 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms != 0 && ms % 1_000 == 0 {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A size in bytes, written as a plain number of bytes or with `B`, `KiB`, `MiB` or `GiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!("`{s}` is not a size (write e.g. `64KiB`, `1MiB`)"));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "`{s}` has an unknown unit `{other}` (use B, KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}`: number too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n % (1 << 30) == 0 {
            write!(f, "{}GiB", n >> 30)
        } else if n != 0 && n % (1 << 20) == 0 {
            write!(f, "{}MiB", n >> 20)
        } else if n != 0 && n % (1 << 10) == 0 {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as `64KiB` or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_back() {
        for (text, ms) in [
            ("250ms", 250),
            ("2s", 2000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("0ms", 0),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.0.as_millis(), ms);
            assert_eq!(d.to_string(), text);
        }
        assert_eq!("1500ms".parse::<Duration>().unwrap().to_string(), "1500ms");
        assert!("10".parse::<Duration>().unwrap_err().contains("no unit"));
        assert!("10d"
            .parse::<Duration>()
            .unwrap_err()
            .contains("unknown unit"));
        assert!("ms".parse::<Duration>().is_err());
        assert!("-1s".parse::<Duration>().is_err());
        assert!("99999999999999999999s".parse::<Duration>().is_err());
    }

    #[test]
    fn sizes_parse_and_print_back() {
        for (text, n) in [
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("2GiB", 2 << 30),
            ("100B", 100),
        ] {
            let s: ByteSize = text.parse().unwrap();
            assert_eq!(s.0, n);
            assert_eq!(s.to_string(), text);
        }
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        assert!("1KB"
            .parse::<ByteSize>()
            .unwrap_err()
            .contains("unknown unit"));
        let from_json: ByteSize = serde_json::from_str("4096").unwrap();
        assert_eq!(from_json, ByteSize::kib(4));
    }

    #[test]
    fn size_constructors_and_what_a_size_is_not() {
        assert_eq!(ByteSize::mib(3).get(), 3 << 20);
        assert_eq!(ByteSize::kib(3).get(), 3 << 10);
        let neg = serde_json::from_str::<ByteSize>("-1")
            .unwrap_err()
            .to_string();
        assert!(neg.contains("a size cannot be negative"), "{neg}");
        let other = serde_json::from_str::<ByteSize>("true")
            .unwrap_err()
            .to_string();
        assert!(
            other.contains("expected a size such as `64KiB` or a number of bytes"),
            "{other}"
        );
    }
}
