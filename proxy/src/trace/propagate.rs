//! Trace context in and out: W3C Trace Context (`traceparent`; `tracestate` passes as it
//! came) and Zipkin's B3, as one `b3` header or as `x-b3-*` headers.
//!
//! Read in order: `traceparent`, then `b3`, then `x-b3-traceid`/`x-b3-spanid`, each only
//! when the listener's `propagation` accepts its format. A 64-bit B3 trace ID is widened to
//! 128 bits with leading zeros (as Zipkin and W3C agree), so the same trace has one ID in
//! both formats. Written: the formats `propagation` lists; B3 in the form it came in (the
//! multi-header form when it came otherwise).

use crate::headers::TRACEPARENT;
use crate::policy::correlation::TraceParent;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

pub static B3: HeaderName = HeaderName::from_static("b3");
pub static X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub static X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub static X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub static X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub static X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The formats a proxy reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3: bool,
}

/// How B3 came in, so that it goes out the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum B3Form {
    Single,
    Multi,
}

/// A caller's trace context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// 32 lower-case hex digits.
    pub trace_id: [u8; 32],
    /// The caller's span: 16 lower-case hex digits.
    pub span_id: [u8; 16],
    /// The caller's sampling decision (`None`: it made none, B3 allows that).
    pub sampled: Option<bool>,
    /// Set when it came as B3.
    pub b3: Option<B3Form>,
}

/// The caller's context in these headers, in the formats accepted.
pub fn read(headers: &HeaderMap, formats: Formats) -> Option<Caller> {
    if formats.w3c {
        if let Some(tp) = headers
            .get(&TRACEPARENT)
            .and_then(|v| TraceParent::parse(v.as_bytes()))
        {
            return Some(Caller {
                trace_id: tp.trace_id,
                span_id: tp.parent_id,
                sampled: Some(sampled_flag(tp.flags)),
                b3: None,
            });
        }
    }
    if !formats.b3 {
        return None;
    }
    if let Some(v) = headers.get(&B3) {
        return single(v.as_bytes());
    }
    multi(headers)
}

/// `b3: {trace}-{span}[-{sampling}[-{parent}]]` (a bare sampling state carries no context).
fn single(v: &[u8]) -> Option<Caller> {
    let mut parts = v.split(|b| *b == b'-');
    let trace_id = trace_id(parts.next()?)?;
    let span_id = span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => Some(sampling(s)?),
    };
    Some(Caller {
        trace_id,
        span_id,
        sampled,
        b3: Some(B3Form::Single),
    })
}

fn multi(headers: &HeaderMap) -> Option<Caller> {
    let trace_id = trace_id(headers.get(&X_B3_TRACEID)?.as_bytes())?;
    let span_id = span_id(headers.get(&X_B3_SPANID)?.as_bytes())?;
    let debug = headers.get(&X_B3_FLAGS).is_some_and(|v| v == "1");
    let sampled = match headers.get(&X_B3_SAMPLED) {
        _ if debug => Some(true),
        None => None,
        Some(v) => match v.as_bytes() {
            b"1" | b"true" => Some(true),
            b"0" | b"false" => Some(false),
            _ => return None,
        },
    };
    Some(Caller {
        trace_id,
        span_id,
        sampled,
        b3: Some(B3Form::Multi),
    })
}

/// The W3C `sampled` bit of a `trace-flags` field (two hex digits).
pub fn sampled_flag(flags: [u8; 2]) -> bool {
    let low = flags[1];
    let v = if low.is_ascii_digit() {
        low - b'0'
    } else {
        low.wrapping_sub(b'a') + 10
    };
    v & 1 == 1
}

fn sampling(s: &[u8]) -> Option<bool> {
    match s {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

fn lower_hex(b: &[u8]) -> bool {
    b.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// A B3 trace ID: 16 or 32 lower-case hex digits, not all zero; 64-bit IDs widened.
fn trace_id(b: &[u8]) -> Option<[u8; 32]> {
    if !(b.len() == 16 || b.len() == 32) || !lower_hex(b) || b.iter().all(|c| *c == b'0') {
        return None;
    }
    let mut id = [b'0'; 32];
    id[32 - b.len()..].copy_from_slice(b);
    Some(id)
}

fn span_id(b: &[u8]) -> Option<[u8; 16]> {
    if b.len() != 16 || !lower_hex(b) || b.iter().all(|c| *c == b'0') {
        return None;
    }
    b.try_into().ok()
}

/// Writes the context of a request going upstream: `span_id` is the span the upstream's
/// work hangs under (this proxy's client span), `parent_id` the one above it (for B3).
pub fn write(
    headers: &mut HeaderMap,
    formats: Formats,
    b3_form: Option<B3Form>,
    trace_id: &[u8; 32],
    span_id: &[u8; 16],
    parent_id: &[u8; 16],
    sampled: bool,
) {
    if formats.w3c {
        let tp = TraceParent {
            trace_id: *trace_id,
            parent_id: *span_id,
            flags: if sampled { *b"01" } else { *b"00" },
        };
        headers.insert(TRACEPARENT.clone(), tp.to_header());
    }
    if !formats.b3 {
        return;
    }
    let flag = if sampled { b'1' } else { b'0' };
    if b3_form == Some(B3Form::Single) {
        let mut v = [0u8; 32 + 1 + 16 + 1 + 1 + 1 + 16];
        v[..32].copy_from_slice(trace_id);
        v[32] = b'-';
        v[33..49].copy_from_slice(span_id);
        v[49] = b'-';
        v[50] = flag;
        v[51] = b'-';
        v[52..].copy_from_slice(parent_id);
        headers.insert(B3.clone(), hex_value(&v));
        return;
    }
    headers.remove(&X_B3_FLAGS);
    headers.insert(X_B3_TRACEID.clone(), hex_value(trace_id));
    headers.insert(X_B3_SPANID.clone(), hex_value(span_id));
    headers.insert(X_B3_PARENTSPANID.clone(), hex_value(parent_id));
    headers.insert(
        X_B3_SAMPLED.clone(),
        HeaderValue::from_static(if sampled { "1" } else { "0" }),
    );
}

fn hex_value(b: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(b).expect("hex digits and dashes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Formats = Formats {
        w3c: true,
        b3: true,
    };

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn w3c_first_then_b3_single_then_multi() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = read(
            &headers(&[
                ("traceparent", tp),
                ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
            ]),
            BOTH,
        )
        .unwrap();
        assert_eq!(&c.trace_id, b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((c.sampled, c.b3), (Some(true), None));
        let c = read(
            &headers(&[(
                "b3",
                "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90",
            )]),
            BOTH,
        )
        .unwrap();
        assert_eq!(&c.span_id, b"e457b5a2e4d86bd1");
        assert_eq!((c.sampled, c.b3), (Some(false), Some(B3Form::Single)));
        let c = read(
            &headers(&[
                ("x-b3-traceid", "a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
                ("x-b3-sampled", "1"),
            ]),
            BOTH,
        )
        .unwrap();
        assert_eq!(&c.trace_id, b"0000000000000000a3ce929d0e0e4736", "widened");
        assert_eq!((c.sampled, c.b3), (Some(true), Some(B3Form::Multi)));
        let debug = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(read(&debug, BOTH).unwrap().sampled, Some(true));
        // A format not accepted is not read.
        assert_eq!(
            read(
                &debug,
                Formats {
                    w3c: true,
                    b3: false
                }
            ),
            None
        );
        let w3c_only = headers(&[("traceparent", tp)]);
        assert_eq!(
            read(
                &w3c_only,
                Formats {
                    w3c: false,
                    b3: true
                }
            ),
            None
        );
        for bad in [
            "1",
            "0",
            "x-y",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-2",
            "00000000000000000000000000000000-e457b5a2e4d86bd1",
        ] {
            assert_eq!(read(&headers(&[("b3", bad)]), BOTH), None, "{bad}");
        }
    }

    #[test]
    fn written_in_the_formats_listed_and_read_back() {
        let (trace, span, parent) = (
            *b"4bf92f3577b34da6a3ce929d0e0e4736",
            *b"00f067aa0ba902b7",
            *b"e457b5a2e4d86bd1",
        );
        for form in [Some(B3Form::Single), None] {
            let mut h = HeaderMap::new();
            write(&mut h, BOTH, form, &trace, &span, &parent, true);
            let tp = h.get("traceparent").unwrap().to_str().unwrap();
            assert_eq!(
                tp,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            );
            let only_b3 = Formats {
                w3c: false,
                b3: true,
            };
            let back = read(&h, only_b3).unwrap();
            assert_eq!(
                (back.trace_id, back.span_id, back.sampled),
                (trace, span, Some(true))
            );
            assert_eq!(h.contains_key("b3"), form == Some(B3Form::Single));
        }
        let mut h = HeaderMap::new();
        write(
            &mut h,
            Formats {
                w3c: true,
                b3: false,
            },
            None,
            &trace,
            &span,
            &parent,
            false,
        );
        assert!(h
            .get("traceparent")
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-00"));
        assert_eq!(h.len(), 1);
    }
}
