//! Tests for the HPACK decoder and encoder: RFC 7541 Appendix C examples, every error
//! class, the malformed / too-large flags, and Huffman round trips over all octets.

use super::*;
use http::{HeaderMap, StatusCode};

/// Parses the RFC's hex dumps ("8286 8441 ...").
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Decodes `block` with no list-size limit, collecting the fields.
fn decode(d: &mut Decoder, block: &[u8]) -> Result<(Vec<Field>, Block), DecodeError> {
    decode_limited(d, block, usize::MAX)
}

fn decode_limited(
    d: &mut Decoder,
    block: &[u8],
    max: usize,
) -> Result<(Vec<Field>, Block), DecodeError> {
    let mut fields = Vec::new();
    let block = d.decode(block, max, &mut |f| fields.push(f))?;
    Ok((fields, block))
}

/// A field as ("name", "value") text, for comparing with the RFC's listings.
fn pair(f: &Field) -> (String, String) {
    match f {
        Field::Pseudo(p, v) => (p.as_str().into(), String::from_utf8_lossy(v).into()),
        Field::Header(n, v) => (
            n.as_str().into(),
            String::from_utf8_lossy(v.as_bytes()).into(),
        ),
    }
}

fn pairs(fields: &[Field]) -> Vec<(String, String)> {
    fields.iter().map(pair).collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The dynamic table, newest first, as ("name", "value") text.
fn table(d: &Decoder) -> Vec<(String, String)> {
    d.table
        .entries
        .iter()
        .map(|e| {
            let name = match &e.name {
                Name::Pseudo(p) => p.as_str().to_string(),
                Name::Header(h) => h.as_str().to_string(),
                Name::Bad(_) => "<bad>".to_string(),
            };
            let value = match &e.value {
                Value::Pseudo(b) => String::from_utf8_lossy(b).into(),
                Value::Header(v) => String::from_utf8_lossy(v.as_bytes()).into(),
                Value::Bad(_) => "<bad>".to_string(),
            };
            (name, value)
        })
        .collect()
}

/// Decodes one block of a sequence and checks fields, table contents and table size.
fn step(d: &mut Decoder, block: &str, fields: &[(&str, &str)], tbl: &[(&str, &str)], size: usize) {
    let (got, flags) = decode(d, &hex(block)).expect("decodable");
    assert_eq!(flags, Block::default());
    assert_eq!(pairs(&got), owned(fields));
    assert_eq!(table(d), owned(tbl));
    assert_eq!(d.table.size, size);
}

fn err(d: &mut Decoder, block: &str) -> &'static str {
    match decode(d, &hex(block)) {
        Err(DecodeError::Compression(why)) => why,
        Ok(_) => panic!("block {block} decoded"),
    }
}

// --- RFC 7541 Appendix C.2: literal representations ---

#[test]
fn c2_1_literal_with_indexing() {
    let mut d = Decoder::new(4096);
    let kv = [("custom-key", "custom-header")];
    step(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
        &kv,
        &kv,
        55,
    );
}

#[test]
fn c2_2_literal_without_indexing() {
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "040c 2f73 616d 706c 652f 7061 7468",
        &[(":path", "/sample/path")],
        &[],
        0,
    );
}

#[test]
fn c2_3_literal_never_indexed_is_sensitive() {
    let mut d = Decoder::new(4096);
    let (fields, _) = decode(&mut d, &hex("1008 7061 7373 776f 7264 0673 6563 7265 74")).unwrap();
    assert_eq!(pairs(&fields), owned(&[("password", "secret")]));
    assert!(matches!(&fields[0], Field::Header(_, v) if v.is_sensitive()));
    assert_eq!(d.table.size, 0);
}

#[test]
fn never_indexed_with_indexed_name_is_sensitive() {
    let mut d = Decoder::new(4096);
    // 0001 1111 + 8: name index 23 (authorization), value "secret".
    let (fields, _) = decode(&mut d, &hex("1f08 0673 6563 7265 74")).unwrap();
    assert_eq!(pairs(&fields), owned(&[("authorization", "secret")]));
    assert!(
        matches!(&fields[0], Field::Header(n, v) if n == header::AUTHORIZATION && v.is_sensitive())
    );
    assert!(d.table.entries.is_empty());
}

#[test]
fn c2_4_indexed() {
    let mut d = Decoder::new(4096);
    step(&mut d, "82", &[(":method", "GET")], &[], 0);
}

// --- C.3 / C.4: requests, one decoder for the three of them ---

const REQ1: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
];
const REQ2: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
    ("cache-control", "no-cache"),
];
const REQ3: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "https"),
    (":path", "/index.html"),
    (":authority", "www.example.com"),
    ("custom-key", "custom-value"),
];
const REQ_T1: &[(&str, &str)] = &[(":authority", "www.example.com")];
const REQ_T2: &[(&str, &str)] = &[
    ("cache-control", "no-cache"),
    (":authority", "www.example.com"),
];
const REQ_T3: &[(&str, &str)] = &[
    ("custom-key", "custom-value"),
    ("cache-control", "no-cache"),
    (":authority", "www.example.com"),
];

#[test]
fn c3_requests_without_huffman() {
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        REQ1,
        REQ_T1,
        57,
    );
    step(
        &mut d,
        "8286 84be 5808 6e6f 2d63 6163 6865",
        REQ2,
        REQ_T2,
        110,
    );
    step(
        &mut d,
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        REQ3,
        REQ_T3,
        164,
    );
}

#[test]
fn c4_requests_with_huffman() {
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        REQ1,
        REQ_T1,
        57,
    );
    step(&mut d, "8286 84be 5886 a8eb 1064 9cbf", REQ2, REQ_T2, 110);
    step(
        &mut d,
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        REQ3,
        REQ_T3,
        164,
    );
}

// --- C.5 / C.6: responses on a 256-octet table, with eviction ---

const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
const LOC: &str = "https://www.example.com";
const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";

/// Runs the three response blocks of C.5 or C.6 through one decoder.
fn responses(b1: &str, b2: &str, b3: &str) {
    let mut d = Decoder::new(256);
    let r1 = [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOC),
    ];
    let t1 = [
        ("location", LOC),
        ("date", DATE1),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    step(&mut d, b1, &r1, &t1, 222);
    let r2 = [
        (":status", "307"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOC),
    ];
    let t2 = [
        (":status", "307"),
        ("location", LOC),
        ("date", DATE1),
        ("cache-control", "private"),
    ];
    step(&mut d, b2, &r2, &t2, 222);
    let r3 = [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", DATE2),
        ("location", LOC),
        ("content-encoding", "gzip"),
        ("set-cookie", COOKIE),
    ];
    let t3 = [
        ("set-cookie", COOKIE),
        ("content-encoding", "gzip"),
        ("date", DATE2),
    ];
    step(&mut d, b3, &r3, &t3, 215);
}

#[test]
fn c5_responses_without_huffman() {
    responses(
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 \
         303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 \
         5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 \
         5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
    );
}

#[test]
fn c6_responses_with_huffman() {
    responses(
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b \
         ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad \
         94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 \
         65c0 03ed 4ee5 b106 3d50 07",
    );
}

// --- Table size updates ---

#[test]
fn size_updates_at_block_start() {
    let mut d = Decoder::new(4096);
    step(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
        &[("custom-key", "custom-header")],
        &[("custom-key", "custom-header")],
        55,
    );
    // Down to 0 (empties the table), then back to 4096 (3f e1 1f), in one block.
    step(&mut d, "20 3fe11f 82", &[(":method", "GET")], &[], 0);
    assert_eq!(d.table.max_size, 4096);
    // A size update alone is a valid (empty) block.
    step(&mut d, "3f45", &[], &[], 0);
    assert_eq!(d.table.max_size, 100);
}

#[test]
fn size_update_over_the_limit_is_an_error() {
    let mut d = Decoder::new(4096);
    assert_eq!(err(&mut d, "3fe21f"), "table size update over the limit");
}

#[test]
fn size_update_after_a_field_is_an_error() {
    let mut d = Decoder::new(4096);
    assert_eq!(err(&mut d, "82 20"), "table size update after a field");
}

#[test]
fn entry_larger_than_the_table_empties_it() {
    let mut d = Decoder::new(4096);
    // Size update to 60, then custom-key: custom-header (55) fits; a second entry evicts it.
    step(
        &mut d,
        "3f1d 400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
        &[("custom-key", "custom-header")],
        &[("custom-key", "custom-header")],
        55,
    );
    step(&mut d, "4001 6101 62", &[("a", "b")], &[("a", "b")], 34);
    // 10 + 20 + 32 = 62 > 60: table emptied, entry not added.
    step(
        &mut d,
        "400a 6161 6161 6161 6161 6161 1462 6262 6262 6262 6262 6262 6262 6262 6262 6262 62",
        &[("aaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbb")],
        &[],
        0,
    );
}

// --- Compression errors ---

#[test]
fn index_zero_is_an_error() {
    assert_eq!(err(&mut Decoder::new(4096), "80"), "index 0");
}

#[test]
fn index_past_the_table_is_an_error() {
    assert_eq!(err(&mut Decoder::new(4096), "be"), "index past the table");
    // Literal with a name index of 63 while only the static table exists.
    assert_eq!(
        err(&mut Decoder::new(4096), "7f00 0161"),
        "index past the table"
    );
    // 62 is fine once the dynamic table has an entry.
    let mut d = Decoder::new(4096);
    decode(&mut d, &hex("4001 6101 62")).unwrap();
    assert_eq!(
        pairs(&decode(&mut d, &hex("be")).unwrap().0),
        owned(&[("a", "b")])
    );
    assert_eq!(err(&mut d, "bf"), "index past the table");
}

#[test]
fn truncated_blocks_are_errors() {
    let t = "truncated header block";
    assert_eq!(err(&mut Decoder::new(4096), "7f"), t); // integer with no continuation
    assert_eq!(err(&mut Decoder::new(4096), "ff80"), t); // continuation bit, then nothing
    assert_eq!(err(&mut Decoder::new(4096), "3f"), t); // size update
    assert_eq!(err(&mut Decoder::new(4096), "0005 6162"), t); // string past the end
    assert_eq!(err(&mut Decoder::new(4096), "04"), t); // no value
    assert_eq!(err(&mut Decoder::new(4096), "00"), t); // no name
}

#[test]
fn integer_overflow_is_an_error() {
    assert_eq!(
        err(&mut Decoder::new(4096), "ff ffff ffff ff7f"),
        "integer too long"
    );
    assert_eq!(
        err(&mut Decoder::new(4096), "ff 8080 8080 0f"),
        "integer too large"
    );
    assert_eq!(
        err(&mut Decoder::new(4096), "0f ffff ffff 7f"),
        "integer too large"
    );
    // A 2^28 string length passes the integer check and then fails as truncated.
    assert_eq!(
        err(&mut Decoder::new(4096), "00 7f 81ff ff7f"),
        "truncated header block"
    );
}

#[test]
fn bad_huffman_padding_is_an_error() {
    // :path (without indexing, name index 4), Huffman value of one octet.
    // 'a' is 00011; padding 000 instead of 111.
    assert_eq!(
        err(&mut Decoder::new(4096), "0481 18"),
        "Huffman padding not all ones"
    );
    // 'a' then 11 one-bits: padding longer than 7 bits.
    assert_eq!(
        err(&mut Decoder::new(4096), "0482 1fff"),
        "Huffman padding longer than 7 bits"
    );
    // A whole octet of padding.
    assert_eq!(
        err(&mut Decoder::new(4096), "0481 ff"),
        "Huffman padding longer than 7 bits"
    );
    // The good one decodes.
    let (fields, _) = decode(&mut Decoder::new(4096), &hex("0481 1f")).unwrap();
    assert_eq!(pairs(&fields), owned(&[(":path", "a")]));
}

#[test]
fn eos_in_huffman_string_is_an_error() {
    assert_eq!(
        err(&mut Decoder::new(4096), "0484 ffff ffff"),
        "EOS in Huffman string"
    );
    // EOS after 'a' (00011 + 30 ones + 5 ones of padding).
    assert_eq!(
        err(&mut Decoder::new(4096), "0485 1fff ffff ff"),
        "EOS in Huffman string"
    );
}

// --- Malformed and too-large blocks ---

#[test]
fn malformed_fields_are_flagged_and_skipped() {
    let cases = [
        "0003 4162 63 0161",   // upper-case name "Abc"
        "0004 3a66 6f6f 0161", // unknown pseudo ":foo"
        "0001 61 010d",        // value with CR
        "0000 0161",           // empty name
        "0003 6120 62 0161",   // space in the name: not a token
        "0401 0a",             // :path value with LF
        "0002 3a3a 0161",      // "::"
    ];
    for block in cases {
        let mut d = Decoder::new(4096);
        let full = format!("82 {block} 84");
        let (fields, flags) = decode(&mut d, &hex(&full)).unwrap();
        assert!(flags.malformed, "{block}");
        assert!(!flags.too_large);
        assert_eq!(
            pairs(&fields),
            owned(&[(":method", "GET"), (":path", "/")]),
            "{block}"
        );
    }
}

#[test]
fn value_with_nul_is_malformed() {
    let (fields, flags) = decode(&mut Decoder::new(4096), &hex("0001 61 0100")).unwrap();
    assert!(flags.malformed);
    assert!(fields.is_empty());
}

#[test]
fn protocol_pseudo_header_is_accepted() {
    let (fields, flags) = decode(
        &mut Decoder::new(4096),
        &hex("0009 3a70 726f 746f 636f 6c09 7765 6273 6f63 6b65 74"),
    )
    .unwrap();
    assert_eq!(flags, Block::default());
    assert_eq!(
        fields,
        vec![Field::Pseudo(
            Pseudo::Protocol,
            Bytes::from_static(b"websocket")
        )]
    );
}

#[test]
fn static_names_are_premade() {
    let (fields, _) = decode(&mut Decoder::new(4096), &hex("7a03 6375 72")).unwrap(); // 58 user-agent
    assert_eq!(
        fields,
        vec![Field::Header(
            header::USER_AGENT,
            HeaderValue::from_static("cur")
        )]
    );
}

#[test]
fn malformed_entries_still_enter_the_table() {
    let mut d = Decoder::new(4096);
    // "Abc: x" with incremental indexing: malformed, but in the table (3 + 1 + 32).
    let (fields, flags) = decode(&mut d, &hex("4003 4162 63 0178")).unwrap();
    assert!(flags.malformed && fields.is_empty());
    assert_eq!(d.table.size, 36);
    // Referring to it again is malformed too; the table is unchanged.
    let (fields, flags) = decode(&mut d, &hex("be 82")).unwrap();
    assert!(flags.malformed);
    assert_eq!(pairs(&fields), owned(&[(":method", "GET")]));
    // A bad value with a good name: the name is still usable with a good value.
    let mut d = Decoder::new(4096);
    let (_, flags) = decode(&mut d, &hex("4001 61 010d")).unwrap();
    assert!(flags.malformed);
    let (fields, flags) = decode(&mut d, &hex("7e 0162")).unwrap(); // name index 62 ("a")
    assert!(!flags.malformed);
    assert_eq!(pairs(&fields), owned(&[("a", "b")]));
    assert_eq!(d.table.size, 68);
}

#[test]
fn too_large_stops_fields_but_not_the_table() {
    let mut d = Decoder::new(4096);
    // :method GET = 42, :path / = 38: exactly 80 is allowed.
    let (fields, flags) = decode_limited(&mut d, &hex("82 84"), 80).unwrap();
    assert!(!flags.too_large);
    assert_eq!(fields.len(), 2);
    // :scheme http takes it to 123; the indexed literal after it still enters the table.
    let block = hex("82 84 86 400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572 82");
    let (fields, flags) = decode_limited(&mut d, &block, 80).unwrap();
    assert!(flags.too_large && !flags.malformed);
    assert_eq!(pairs(&fields), owned(&[(":method", "GET"), (":path", "/")]));
    assert_eq!(table(&d), owned(&[("custom-key", "custom-header")]));
}

// --- Encoder ---

#[test]
fn encode_exact_bytes() {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    let mut dst = Vec::new();
    encode_response(StatusCode::OK, &h, &mut dst);
    assert_eq!(dst, hex("88 0f10 0a 7465 7874 2f70 6c61 696e"));

    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    let mut dst = Vec::new();
    encode_trailers(&t, &mut dst);
    assert_eq!(dst, hex("00 0b 6772 7063 2d73 7461 7475 73 01 30"));

    let mut dst = Vec::new();
    encode_response(StatusCode::FOUND, &HeaderMap::new(), &mut dst);
    assert_eq!(dst, hex("08 03 3330 32"));
}

#[test]
fn encode_integers_at_prefix_edges() {
    let cases: [(u32, usize, &str); 7] = [
        (5, 10, "0a"),
        (5, 1337, "1f9a0a"), // RFC 7541 C.1.2
        (8, 42, "2a"),       // C.1.3
        (4, 14, "0e"),
        (4, 15, "0f00"),
        (7, 127, "7f00"),
        (7, 255, "7f80 01"),
    ];
    for (prefix, value, want) in cases {
        let mut dst = Vec::new();
        encode_int(&mut dst, 0, prefix, value);
        assert_eq!(dst, hex(want), "{value} on {prefix} bits");
        if prefix < 8 {
            let mut r = Reader { buf: &dst, pos: 0 };
            assert_eq!(r.int(prefix), Ok(value));
        }
    }
}

#[test]
fn encode_then_decode_round_trip() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
    h.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
    h.insert("x-custom", HeaderValue::from_static("custom value"));
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
    let mut secret = HeaderValue::from_static("Bearer secret-token");
    secret.set_sensitive(true);
    h.insert(header::AUTHORIZATION, secret);
    let long_name = "x-".to_string() + &"n".repeat(300);
    let long_value = "v".repeat(5000);
    h.insert(
        HeaderName::from_bytes(long_name.as_bytes()).unwrap(),
        long_value.parse().unwrap(),
    );

    for status in [
        StatusCode::OK,
        StatusCode::NOT_FOUND,
        StatusCode::IM_A_TEAPOT,
        StatusCode::BAD_GATEWAY,
    ] {
        let mut dst = Vec::new();
        encode_response(status, &h, &mut dst);
        let mut d = Decoder::new(4096);
        let (fields, flags) = decode(&mut d, &dst).unwrap();
        assert_eq!(flags, Block::default());
        assert_eq!(
            fields[0],
            Field::Pseudo(
                Pseudo::Status,
                Bytes::copy_from_slice(status.as_str().as_bytes())
            )
        );
        let want: Vec<Field> = h
            .iter()
            .map(|(n, v)| Field::Header(n.clone(), v.clone()))
            .collect();
        assert_eq!(fields[1..], want[..]);
        for (got, want) in fields[1..].iter().zip(h.values()) {
            assert!(matches!(got, Field::Header(_, v) if v.is_sensitive() == want.is_sensitive()));
        }
        assert!(d.table.entries.is_empty());
    }
}

// --- Huffman ---

/// A test-only Huffman encoder from the same RFC table, padding with ones.
fn huffman_encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut nbits = 0;
    for &b in src {
        let (code, len) = HUFFMAN_CODES[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        nbits += u32::from(len);
        while nbits >= 8 {
            nbits -= 8;
            out.push((acc >> nbits) as u8);
        }
    }
    if nbits > 0 {
        out.push(((acc << (8 - nbits)) as u8) | (0xff >> nbits));
    }
    out
}

fn huffman_decoded(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    huffman_decode(src, &mut out).map(|()| out)
}

#[test]
fn huffman_table_is_canonical_and_complete() {
    let mut order: Vec<usize> = (0..257).collect();
    order.sort_by_key(|&s| (HUFFMAN_CODES[s].1, s));
    let mut code: u32 = 0;
    let mut prev_len = HUFFMAN_CODES[order[0]].1;
    for (i, &s) in order.iter().enumerate() {
        let (want, len) = HUFFMAN_CODES[s];
        if i > 0 {
            code = (code + 1) << (len - prev_len);
        }
        prev_len = len;
        assert_eq!(code, want, "symbol {s}");
    }
    // Kraft: the code lengths fill the code space exactly (sum of 2^(30 - len) = 2^30).
    let total: u64 = HUFFMAN_CODES
        .iter()
        .map(|&(_, len)| 1u64 << (30 - len))
        .sum();
    assert_eq!(total, 1 << 30);
    assert_eq!(HUFFMAN_CODES[256], (0x3fff_ffff, 30));
}

#[test]
fn huffman_encoder_matches_rfc_examples() {
    assert_eq!(
        huffman_encode(b"www.example.com"),
        hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
    );
    assert_eq!(huffman_encode(b"no-cache"), hex("a8eb 1064 9cbf"));
    assert_eq!(huffman_encode(b"custom-key"), hex("25a8 49e9 5ba9 7d7f"));
    assert_eq!(huffman_encode(b"302"), hex("6402"));
    assert_eq!(
        huffman_encode(DATE1.as_bytes()),
        hex("d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff")
    );
}

#[test]
fn huffman_round_trips_every_octet() {
    for b in 0..=255u8 {
        assert_eq!(
            huffman_decoded(&huffman_encode(&[b])),
            Ok(vec![b]),
            "octet {b}"
        );
        let run = vec![b; 40];
        assert_eq!(
            huffman_decoded(&huffman_encode(&run)),
            Ok(run),
            "run of {b}"
        );
        let mixed = [b'a', b, b'0', b, b'~', b];
        assert_eq!(
            huffman_decoded(&huffman_encode(&mixed)).unwrap(),
            mixed,
            "mixed {b}"
        );
    }
    let all: Vec<u8> = (0..=255).rev().collect();
    assert_eq!(huffman_decoded(&huffman_encode(&all)), Ok(all));
    assert_eq!(huffman_decoded(&[]), Ok(vec![]));
}

/// xorshift64: a small deterministic generator, so failures repeat.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn huffman_round_trips_random_strings() {
    let mut s = 0x9e37_79b9_7f4a_7c15;
    for i in 0..3000 {
        let len = (next(&mut s) % 100) as usize;
        let text: Vec<u8> = (0..len)
            .map(|_| {
                let r = next(&mut s);
                // Half the strings printable ASCII (the usual case), half any octet.
                if i % 2 == 0 {
                    b' ' + (r % 95) as u8
                } else {
                    r as u8
                }
            })
            .collect();
        let coded = huffman_encode(&text);
        assert_eq!(
            huffman_decoded(&coded).as_deref(),
            Ok(&text[..]),
            "{text:?}"
        );
        assert!(text.len() <= coded.len() * 8 / 5);
    }
}

#[test]
fn random_blocks_never_panic() {
    let mut s = 0x1234_5678_9abc_def1;
    let mut d = Decoder::new(4096);
    for _ in 0..20000 {
        let len = (next(&mut s) % 40) as usize;
        let block: Vec<u8> = (0..len).map(|_| next(&mut s) as u8).collect();
        let _ = decode_limited(&mut d, &block, 200);
        assert!(d.table.size <= d.table.max_size);
        let _ = huffman_decoded(&block);
    }
}

/// RFC 7541 Appendix A, written out again independently of `STATIC_TABLE`.
const RFC_STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[test]
fn static_table_matches_rfc_appendix_a() {
    let mut d = Decoder::new(4096);
    for (i, (name, value)) in RFC_STATIC.iter().enumerate() {
        let mut block = Vec::new();
        encode_int(&mut block, 0x80, 7, i + 1);
        let (fields, _) = decode(&mut d, &block).unwrap();
        assert_eq!(pairs(&fields), owned(&[(name, value)]), "index {}", i + 1);
        // The encoder's lookup gives the first index with this name.
        let first = RFC_STATIC
            .iter()
            .position(|(n, _)| n == name)
            .map(|p| p + 1);
        if !name.starts_with(':') {
            assert_eq!(static_name_index(name), first, "{name}");
        }
    }
    assert_eq!(static_name_index("x-custom"), None);
}
