//! The access log: one line per request (and per TCP connection), target `spur::access`.
//!
//! Lines are formatted here directly instead of through `tracing`'s field visitors: the
//! access log runs on every request, and writing the JSON by hand costs a fraction of the
//! generic path. `tracing` still decides whether the line is wanted, so `SPUR_LOG` filters
//! it like any other log (`SPUR_LOG=info,spur::access=off`).

use crate::log::{self, LogFormat};
use std::fmt::Write as _;

pub enum Val<'a> {
    Str(&'a str),
    U64(u64),
    /// A duration, written in milliseconds with three decimals (`12.345`).
    Millis(std::time::Duration),
    Bool(bool),
}

/// Whether access lines are wanted (a subscriber is installed and lets them through).
pub fn enabled() -> bool {
    log::format().is_some() && tracing::enabled!(target: "spur::access", tracing::Level::INFO)
}

thread_local! {
    /// The line being written, kept per thread with its room: a line is 600 to 800 bytes
    /// with the usual fields, and a fresh buffer cost every request an allocation, a
    /// reallocation as it outgrew its start and a free.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A line's room kept between lines (a longer line's is given back).
const LINE_KEEP: usize = 4096;

/// Writes one access line with these fields, after the timestamp, level and target.
pub fn emit(message: &str, fields: &[(&str, Val<'_>)]) {
    let Some(format) = log::format() else { return };
    emit_to(format, message, fields, log::write_line);
}

/// [`emit`] with the line handed to `out`.
fn emit_to(format: LogFormat, message: &str, fields: &[(&str, Val<'_>)], out: impl FnOnce(&[u8])) {
    LINE.with_borrow_mut(|line| {
        line.clear();
        if line.capacity() > LINE_KEEP {
            *line = String::new();
        }
        line.reserve(1024);
        write_line(line, format, message, fields);
        out(line.as_bytes());
    });
}

fn write_line(line: &mut String, format: LogFormat, message: &str, fields: &[(&str, Val<'_>)]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    match format {
        LogFormat::Json => {
            line.push_str("{\"timestamp\":\"");
            rfc3339(line, now);
            line.push_str("\",\"level\":\"INFO\",\"message\":");
            json_str(line, message);
            for (k, v) in fields {
                line.push_str(",\"");
                line.push_str(k);
                line.push_str("\":");
                match v {
                    Val::Str(s) => json_str(line, s),
                    Val::U64(n) => push_u64(line, *n),
                    Val::Millis(d) => push_millis(line, *d),
                    Val::Bool(b) => line.push_str(if *b { "true" } else { "false" }),
                }
            }
            line.push_str(",\"target\":\"spur::access\"}\n");
        }
        LogFormat::Text => {
            rfc3339(line, now);
            line.push_str("  INFO spur::access: ");
            line.push_str(message);
            for (k, v) in fields {
                line.push(' ');
                line.push_str(k);
                line.push('=');
                match v {
                    Val::Str(s) => {
                        let _ = write!(line, "{s:?}");
                    }
                    Val::U64(n) => push_u64(line, *n),
                    Val::Millis(d) => push_millis(line, *d),
                    Val::Bool(b) => line.push_str(if *b { "true" } else { "false" }),
                }
            }
            line.push('\n');
        }
    }
}

/// Room for the longest socket address text (`[v6%scope]:port`).
pub const ADDR_MAX: usize = 64;

/// `addr` written into `buf` (no allocation): `1.2.3.4:5` or `[::1]:5`. IPv4 (every
/// request's client on most listeners) digit by digit, without the formatting machinery.
pub fn socket_addr(buf: &mut [u8; ADDR_MAX], addr: std::net::SocketAddr) -> &str {
    use std::io::Write as _;
    if let std::net::SocketAddr::V4(v4) = addr {
        let mut n = 0;
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            n += put_decimal(&mut buf[n..], u64::from(octet));
        }
        buf[n] = b':';
        n += 1;
        n += put_decimal(&mut buf[n..], u64::from(v4.port()));
        return std::str::from_utf8(&buf[..n]).unwrap_or("-");
    }
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{addr}");
    let n = cursor.position() as usize;
    std::str::from_utf8(&buf[..n]).unwrap_or("-")
}

/// `n` in decimal at the start of `out` (which has room for it): the digits written.
fn put_decimal(out: &mut [u8], n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - at;
    out[..len].copy_from_slice(&digits[at..]);
    len
}

/// `s` as a JSON string. Only ASCII bytes are escaped, so the text between them is copied
/// in runs (every index where an escape starts is a char boundary). Most values need no
/// escape at all: one pass without branches finds that, and the text is copied whole.
fn json_str(out: &mut String, s: &str) {
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `n` in decimal, without the formatting machinery.
fn push_u64(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let len = put_decimal(&mut digits, n);
    out.push_str(std::str::from_utf8(&digits[..len]).unwrap_or("-"));
}

/// `d` in milliseconds with three decimals (whole microseconds: `1.234` is 1,234 µs).
fn push_millis(out: &mut String, d: std::time::Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    out.push('.');
    let frac = micros % 1000;
    for digit in [frac / 100, frac / 10 % 10, frac % 10] {
        out.push(char::from(b'0' + digit as u8));
    }
}

/// `2026-11-22T00:08:06.746610Z` from a duration since the Unix epoch.
fn rfc3339(out: &mut String, since_epoch: std::time::Duration) {
    let secs = since_epoch.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Zero-padded fields, without the formatting machinery (this runs for every line).
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut field = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    field(0, 4, year.clamp(0, 9999) as u64);
    field(5, 2, month as u64);
    field(8, 2, day as u64);
    field(11, 2, rem / 3600);
    field(14, 2, rem % 3600 / 60);
    field(17, 2, rem % 60);
    field(20, 6, u64::from(since_epoch.subsec_micros()));
    out.push_str(std::str::from_utf8(&text).unwrap_or("-"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reused line starts empty each time, and a very long line's room is not kept.
    #[test]
    fn each_line_is_written_once_and_alone() {
        let long = "x".repeat(3 * LINE_KEEP);
        let mut lines = Vec::new();
        for (id, path) in [("a", "/short"), ("b", long.as_str()), ("c", "/")] {
            emit_to(
                LogFormat::Json,
                "access",
                &[("request_id", Val::Str(id)), ("path", Val::Str(path))],
                |l| lines.push(String::from_utf8(l.to_vec()).unwrap()),
            );
        }
        for (line, id) in lines.iter().zip(["a", "b", "c"]) {
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["request_id"], id);
        }
        assert!(lines[2].len() < 200);
        LINE.with_borrow(|l| assert!(l.capacity() <= LINE_KEEP, "{}", l.capacity()));
    }

    /// Seconds since the epoch and microseconds of an RFC 3339 UTC timestamp, by days from
    /// civil (the inverse of the formatter's arithmetic, written independently).
    fn chrono_like(s: &str) -> (i64, u32) {
        let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
        let (y, m, d) = (n(0..4), n(5..7), n(8..10));
        let (hh, mm, ss) = (n(11..13), n(14..16), n(17..19));
        let micros = n(20..26) as u32;
        assert_eq!(&s[26..], "Z");
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        (days * 86_400 + hh * 3600 + mm * 60 + ss, micros)
    }

    #[test]
    fn timestamps_and_escaping() {
        let mut s = String::new();
        rfc3339(
            &mut s,
            std::time::Duration::from_micros(1_795_305_686_746_610),
        );
        assert_eq!(s, "2026-11-22T00:01:26.746610Z");
        let mut s = String::new();
        rfc3339(&mut s, std::time::Duration::ZERO);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
        // Each escape on its own too: a value with only one kind must not pass as plain.
        for text in [
            "",
            "plain",
            "é\u{1f}\"",
            "\t\r\u{7f}ü\\",
            "say \"hi\"",
            "back\\slash",
            "new\nline",
            "\u{0}",
        ] {
            let mut s = String::new();
            json_str(&mut s, text);
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v, text, "{s}");
        }
        let mut s = String::new();
        json_str(&mut s, "\u{1f}");
        assert_eq!(s, r#""\u001f""#);
        for (n, text) in [
            (0, "0"),
            (7, "7"),
            (10, "10"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, text);
        }
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_234, "1.234"),
            (60_000_050, "60000.050"),
        ] {
            let mut s = String::new();
            push_millis(&mut s, std::time::Duration::from_micros(micros));
            assert_eq!(s, text);
        }
        let mut buf = [0u8; ADDR_MAX];
        let mut long = std::net::SocketAddrV6::new(
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            65535,
            0,
            u32::MAX,
        );
        assert_eq!(socket_addr(&mut buf, long.into()), long.to_string());
        long.set_scope_id(0);
        assert_eq!(socket_addr(&mut buf, long.into()), long.to_string());
        for text in [
            "192.0.2.7:40000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.100.9:8",
        ] {
            let v4: std::net::SocketAddr = text.parse().unwrap();
            let mut buf = [0u8; ADDR_MAX];
            assert_eq!(socket_addr(&mut buf, v4), text);
        }
        // Against std's formatting, over the whole range of each field's digit counts.
        for (ip, port) in [([1, 22, 133, 4], 1), ([9, 99, 100, 255], 10_000)] {
            let a = std::net::SocketAddr::from((ip, port));
            let mut buf = [0u8; ADDR_MAX];
            assert_eq!(socket_addr(&mut buf, a), a.to_string());
        }
        for micros in [
            0u64,
            951_782_400_000_001,   // 2000-02-29 (a leap day)
            4_102_444_799_999_999, // 2099-12-31T23:59:59.999999Z
            1_795_305_686_746_610,
        ] {
            let mut s = String::new();
            rfc3339(&mut s, std::time::Duration::from_micros(micros));
            let secs = (micros / 1_000_000) as i64;
            let parsed = chrono_like(&s);
            assert_eq!(parsed, (secs, (micros % 1_000_000) as u32), "{s}");
        }
    }
}
