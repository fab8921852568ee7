//! The access log: one line per request (and per TCP connection), target `spur::access`.
//!
//! Lines are formatted here directly instead of through `tracing`'s field visitors: the
//! access log runs on every request, and writing the JSON by hand costs a fraction of the
//! generic path. `tracing` still decides whether the line is wanted, so `SPUR_LOG` filters
//! it like any other log (`SPUR_LOG=info,spur::access=off`).

use crate::log::{self, LogFormat};

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
    /// The line being written, kept per thread with its room (a line is 600 to 800 bytes
    /// with the usual fields; a fresh buffer cost every request an allocation, a
    /// reallocation as it outgrew its start and a free), and the timestamp's text up to the
    /// second, made again only when the second changes.
    static LINE: std::cell::RefCell<Line> = const {
        std::cell::RefCell::new(Line { buf: Vec::new(), second: u64::MAX, stamp: *STAMP })
    };
}

struct Line {
    buf: Vec<u8>,
    /// The second since the epoch `stamp` holds, up to its fraction.
    second: u64,
    stamp: [u8; 27],
}

/// An RFC 3339 UTC timestamp with microseconds; the digits are filled in.
const STAMP: &[u8; 27] = b"0000-00-00T00:00:00.000000Z";

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
        line.buf.clear();
        if line.buf.capacity() > LINE_KEEP {
            line.buf = Vec::new();
        }
        line.buf.reserve(1024);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        stamp(&mut line.second, &mut line.stamp, now);
        write_line(&mut line.buf, &line.stamp, format, message, fields);
        out(&line.buf);
    });
}

fn write_line(
    line: &mut Vec<u8>,
    stamp: &[u8; 27],
    format: LogFormat,
    message: &str,
    fields: &[(&str, Val<'_>)],
) {
    match format {
        LogFormat::Json => {
            line.extend_from_slice(b"{\"timestamp\":\"");
            line.extend_from_slice(stamp);
            line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":");
            json_str(line, message);
            for (k, v) in fields {
                line.extend_from_slice(b",\"");
                line.extend_from_slice(k.as_bytes());
                line.extend_from_slice(b"\":");
                match v {
                    Val::Str(s) => json_str(line, s),
                    Val::U64(n) => push_u64(line, *n),
                    Val::Millis(d) => push_millis(line, *d),
                    Val::Bool(b) => line.extend_from_slice(if *b { b"true" } else { b"false" }),
                }
            }
            line.extend_from_slice(b",\"target\":\"spur::access\"}\n");
        }
        LogFormat::Text => {
            use std::io::Write as _;
            line.extend_from_slice(stamp);
            line.extend_from_slice(b"  INFO spur::access: ");
            line.extend_from_slice(message.as_bytes());
            for (k, v) in fields {
                line.push(b' ');
                line.extend_from_slice(k.as_bytes());
                line.push(b'=');
                match v {
                    Val::Str(s) => {
                        let _ = write!(line, "{s:?}");
                    }
                    Val::U64(n) => push_u64(line, *n),
                    Val::Millis(d) => push_millis(line, *d),
                    Val::Bool(b) => line.extend_from_slice(if *b { b"true" } else { b"false" }),
                }
            }
            line.push(b'\n');
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
/// in runs. Most values need no escape at all: a pass over eight bytes at a time finds
/// that, and the text is copied whole.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escaped.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escaped);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether `bytes` has a control character, `"` or `\`: eight bytes at a time, each
/// test a few word operations for all eight (any high bit set in the result: such a byte is
/// there).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below `n` (n <= 0x80) or equal to zero, for each byte of `x`.
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        if below(x, 0x20)
            | below(x ^ (ONES * u64::from(b'"')), 1)
            | below(x ^ (ONES * u64::from(b'\\')), 1)
            != 0
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `n` in decimal, without the formatting machinery.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let len = put_decimal(&mut digits, n);
    out.extend_from_slice(&digits[..len]);
}

/// `d` in milliseconds with three decimals (whole microseconds: `1.234` is 1,234 µs).
fn push_millis(out: &mut Vec<u8>, d: std::time::Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `text` made `2026-11-22T00:08:06.746610Z` for a duration since the Unix epoch: the
/// date and time of day only when the second is not the one `second` says `text` holds
/// already, the microseconds every time.
fn stamp(second: &mut u64, text: &mut [u8; 27], since_epoch: std::time::Duration) {
    // Zero-padded fields, without the formatting machinery (this runs for every line).
    fn field(text: &mut [u8; 27], at: usize, width: usize, mut v: u64) {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    let secs = since_epoch.as_secs();
    if secs != *second {
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
        field(text, 0, 4, year.clamp(0, 9999) as u64);
        field(text, 5, 2, month as u64);
        field(text, 8, 2, day as u64);
        field(text, 11, 2, rem / 3600);
        field(text, 14, 2, rem % 3600 / 60);
        field(text, 17, 2, rem % 60);
        *second = secs;
    }
    field(text, 20, 6, u64::from(since_epoch.subsec_micros()));
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
        LINE.with_borrow(|l| assert!(l.buf.capacity() <= LINE_KEEP, "{}", l.buf.capacity()));
    }

    /// A timestamp made in full, as a fresh thread's first line makes it.
    fn rfc3339(since_epoch: std::time::Duration) -> String {
        let (mut second, mut text) = (u64::MAX, *STAMP);
        stamp(&mut second, &mut text, since_epoch);
        String::from_utf8(text.to_vec()).unwrap()
    }

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// The kept date and time of day are made again when the second changes, and only the
    /// fraction within the same second; each stamp equals one made from nothing.
    #[test]
    fn a_kept_timestamp_follows_the_clock() {
        let (mut second, mut text) = (u64::MAX, *STAMP);
        let mut last = String::new();
        for micros in [
            1_795_305_686_746_610u64,
            1_795_305_686_999_999, // same second
            1_795_305_687_000_000, // next second
            1_795_305_599_999_999, // back in time (the wall clock was set back)
            1_795_305_600_000_000, // next day, 00:00:00
            951_868_799_000_000,   // 2000-02-29T23:59:59, a leap day's last second
            951_868_800_000_001,   // 2000-03-01
        ] {
            let d = std::time::Duration::from_micros(micros);
            stamp(&mut second, &mut text, d);
            let kept = String::from_utf8(text.to_vec()).unwrap();
            assert_eq!(kept, rfc3339(d), "{micros}");
            assert_ne!(kept, last);
            last = kept;
        }
    }

    /// Strings with and without characters to escape at every position of the eight-byte
    /// words the scan reads, against serde_json's reading of the result.
    #[test]
    fn escapes_are_found_anywhere_in_a_word() {
        for len in 0..20 {
            let plain = "abcdefghijklmnopqrstuvwxyz"[..len].to_string();
            let s = text(|o| json_str(o, &plain));
            assert_eq!(s, format!("\"{plain}\""));
            for at in 0..len {
                for c in ['"', '\\', '\n', '\u{1}', '\u{1f}'] {
                    let mut v = plain.clone().into_bytes();
                    v[at] = c as u8;
                    let v = String::from_utf8(v).unwrap();
                    let s = text(|o| json_str(o, &v));
                    let back: serde_json::Value = serde_json::from_str(&s).unwrap();
                    assert_eq!(back, v.as_str(), "{s}");
                    assert!(s.len() > len + 2, "{s}");
                }
                // Bytes next to the escaped ones that must not count: space, 0x7f, '#'
                // ('"' + 1), '[' ('\\' - 1), and UTF-8's high bytes.
                for c in [" ", "\u{7f}", "#", "[", "é"] {
                    let v = format!("{}{c}{}", &plain[..at], &plain[at..]);
                    assert!(!needs_escape(v.as_bytes()), "{v:?}");
                }
            }
        }
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
        let s = rfc3339(std::time::Duration::from_micros(1_795_305_686_746_610));
        assert_eq!(s, "2026-11-22T00:01:26.746610Z");
        let s = rfc3339(std::time::Duration::ZERO);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        let s = text(|o| json_str(o, "a\"b\\c\nd\u{1}é"));
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
            let s = self::text(|o| json_str(o, text));
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v, text, "{s}");
        }
        let s = text(|o| json_str(o, "\u{1f}"));
        assert_eq!(s, r#""\u001f""#);
        for (n, text) in [
            (0, "0"),
            (7, "7"),
            (10, "10"),
            (u64::MAX, "18446744073709551615"),
        ] {
            assert_eq!(self::text(|o| push_u64(o, n)), text);
        }
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_234, "1.234"),
            (60_000_050, "60000.050"),
        ] {
            let d = std::time::Duration::from_micros(micros);
            assert_eq!(self::text(|o| push_millis(o, d)), text);
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
            let s = rfc3339(std::time::Duration::from_micros(micros));
            let secs = (micros / 1_000_000) as i64;
            let parsed = chrono_like(&s);
            assert_eq!(parsed, (secs, (micros % 1_000_000) as u32), "{s}");
        }
    }
}
