//! Correlation IDs: the request ID and the W3C trace context carried from hop to hop.
//!
//! - A valid incoming request ID is kept; a missing or invalid one is replaced by a UUIDv7
//!   (time-ordered, so IDs sort by arrival) when generation is on.
//! - `traceparent` (W3C Trace Context level 1): parsed and written here; what a hop does
//!   with it (pass it on, or make a span of its own) is decided in [`crate::trace`].

use http::HeaderValue;

/// A request ID is kept if it is 1..=200 visible ASCII characters.
pub fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 200 && b.iter().all(|c| (0x21..=0x7e).contains(c))
}

/// A UUIDv7: 48 bits of Unix milliseconds, then 74 random bits from the thread-local
/// generator (no system call per request, unlike `Uuid::now_v7`). The milliseconds come
/// from the kernel's coarse wall clock ([`crate::clock::coarse_millis`]): a timer tick's
/// precision, as RFC 9562 allows for the timestamp; the random bits keep IDs of one tick
/// apart.
pub fn new_request_id() -> HeaderValue {
    let millis = crate::clock::coarse_millis(libc::CLOCK_REALTIME_COARSE);
    let mut rand = [0u8; 10];
    rand[..8].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    rand[8..].copy_from_slice(&fastrand::u16(..).to_le_bytes());
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &rand).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    let s = id.hyphenated().encode_lower(&mut buf);
    let mut v = HeaderValue::from_str(s).expect("uuid is ASCII");
    // Unique to one request: HTTP/2 and HTTP/3 peers are told not to index it, which
    // spares their header tables (and Spur's HPACK encoder) an insert and an eviction.
    v.set_sensitive(true);
    v
}

/// A parsed `traceparent`: `00-<trace-id:32 hex>-<parent-id:16 hex>-<flags:2 hex>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 32],
    pub parent_id: [u8; 16],
    pub flags: [u8; 2],
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

impl TraceParent {
    pub fn parse(v: &[u8]) -> Option<TraceParent> {
        // Version 00 is exactly 55 bytes; a future version may append fields after a dash.
        if v.len() < 55 || (v.len() > 55 && v[55] != b'-') {
            return None;
        }
        let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        if !is_lower_hex(version) || version == b"ff" || (version == b"00" && v.len() != 55) {
            return None;
        }
        if !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
            return None;
        }
        if trace.iter().all(|c| *c == b'0') || parent.iter().all(|c| *c == b'0') {
            return None;
        }
        Some(TraceParent {
            trace_id: trace.try_into().ok()?,
            parent_id: parent.try_into().ok()?,
            flags: flags.try_into().ok()?,
        })
    }

    pub fn to_header(&self) -> HeaderValue {
        let mut b = [0u8; 55];
        b[0..3].copy_from_slice(b"00-");
        b[3..35].copy_from_slice(&self.trace_id);
        b[35] = b'-';
        b[36..52].copy_from_slice(&self.parent_id);
        b[52] = b'-';
        b[53..55].copy_from_slice(&self.flags);
        let mut v = HeaderValue::from_bytes(&b).expect("hex is a valid header value");
        // Unique to one request: not worth a place in an HPACK table (see new_request_id).
        v.set_sensitive(true);
        v
    }

    pub fn trace_id_str(&self) -> &str {
        std::str::from_utf8(&self.trace_id).unwrap_or("")
    }
}

/// A new trace ID: 32 lower-case hex digits, never all zero.
pub fn new_trace_id() -> [u8; 32] {
    let mut trace_id = [0u8; 32];
    hex_into(&mut trace_id[..16], fastrand::u64(1..));
    hex_into(&mut trace_id[16..], fastrand::u64(..));
    trace_id
}

/// A span ID as 16 lower-case hex digits.
pub fn hex16(v: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    hex_into(&mut id, v);
    id
}

/// 16 hex digits (as [`TraceParent::parse`] and the B3 parser accept them) as a number.
pub fn unhex16(id: &[u8; 16]) -> u64 {
    id.iter().fold(0u64, |v, c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => 0,
        };
        v << 4 | u64::from(d)
    })
}

/// A new span ID: 16 lower-case hex digits, never all zero.
pub fn new_span_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    hex_into(&mut id, fastrand::u64(1..));
    id
}

fn hex_into(out: &mut [u8], mut v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parsed_and_written_back_byte_for_byte() {
        let tp = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(tp.to_header(), GOOD);
        // Per-request values are never indexed by HPACK/QPACK.
        assert!(tp.to_header().is_sensitive());
        assert!(new_request_id().is_sensitive());
        assert_eq!(tp.trace_id_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
        // A future version may carry more fields.
        assert!(
            TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn new_ids_are_valid_and_distinct() {
        let a = TraceParent {
            trace_id: new_trace_id(),
            parent_id: new_span_id(),
            flags: *b"00",
        };
        assert_ne!(a.trace_id, new_trace_id());
        assert_eq!(TraceParent::parse(a.to_header().as_bytes()), Some(a));
    }

    #[test]
    fn each_dash_and_each_field_is_checked() {
        let good = GOOD.as_bytes();
        for (at, to) in [(35, b'_'), (52, b'_'), (40, b'g'), (54, b'x'), (1, b'Z')] {
            let mut bad = good.to_vec();
            bad[at] = to;
            assert_eq!(
                TraceParent::parse(&bad),
                None,
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
        // A future version: 55 bytes, or more after a dash.
        let mut v1 = good.to_vec();
        v1[1] = b'1';
        assert!(TraceParent::parse(&v1).is_some());
        v1.extend_from_slice(b"x");
        assert_eq!(TraceParent::parse(&v1), None, "no dash after the flags");
    }

    #[test]
    fn hex_digits_both_ways() {
        assert_eq!(&hex16(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&hex16(0xfedc_ba98_7654_3210), b"fedcba9876543210");
        assert_eq!(unhex16(b"0123456789abcdef"), 0x0123_4567_89ab_cdef);
        assert_eq!(unhex16(b"00f067aa0ba902b7"), 0x00f0_67aa_0ba9_02b7);
        let id = new_span_id();
        assert_eq!(hex16(unhex16(&id)), id);
        let t = new_trace_id();
        assert!(t
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(
            t[..16].iter().any(|c| *c != b'0'),
            "the high half is never zero"
        );
    }

    #[test]
    fn a_request_id_of_200_characters_is_kept() {
        assert!(valid_request_id(
            &HeaderValue::from_str(&"x".repeat(200)).unwrap()
        ));
        assert!(valid_request_id(&HeaderValue::from_static("!~")));
        assert!(!valid_request_id(
            &HeaderValue::from_bytes(&[b'a', 0x80]).unwrap()
        ));
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!valid_request_id(&HeaderValue::from_static("has space")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(
            &HeaderValue::from_str(&"x".repeat(201)).unwrap()
        ));
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.to_str().unwrap().as_bytes()[14], b'7', "UUID version 7");
        // Its timestamp is the wall clock's, within a tick or two.
        let uuid = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        let stamped = secs * 1000 + u64::from(nanos) / 1_000_000;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            stamped <= now && now - stamped < 100,
            "stamped {stamped}, now {now}"
        );
    }
}
