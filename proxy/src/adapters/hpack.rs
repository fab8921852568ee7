//! HPACK (RFC 7541): the header compression of HTTP/2, for Spur's own HTTP/2 server.
//!
//! The [`Decoder`] reads the header blocks a client sends (requests and trailers) and keeps
//! the dynamic table in step with the client's encoder. [`encode_response`] and
//! [`encode_trailers`] write Spur's responses without a dynamic table or Huffman coding, so
//! the client's decoder never has to hold state for us and the encoder costs little CPU.

use std::collections::VecDeque;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};

/// Pseudo-header fields of a request (and :status for completeness).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pseudo {
    Method,
    Scheme,
    Authority,
    Path,
    Protocol,
    Status,
}

impl Pseudo {
    /// The field name as it appears on the wire, for size accounting.
    fn as_str(self) -> &'static str {
        match self {
            Pseudo::Method => ":method",
            Pseudo::Scheme => ":scheme",
            Pseudo::Authority => ":authority",
            Pseudo::Path => ":path",
            Pseudo::Protocol => ":protocol",
            Pseudo::Status => ":status",
        }
    }
}

/// One decoded field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// A pseudo-header and its value bytes as sent.
    Pseudo(Pseudo, Bytes),
    /// A regular header; the value is marked sensitive when the peer sent it "never indexed".
    Header(HeaderName, HeaderValue),
}

/// Why a header block could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// COMPRESSION_ERROR: the block cannot be decoded (bad index, bad integer, bad Huffman,
    /// truncated, table size update over the limit or not at the block's start). A connection error.
    Compression(&'static str),
}

/// What a decodable block turned out to be, beyond its fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Block {
    /// A field name not lower-case or not a valid token, an unknown pseudo-header (":foo"),
    /// or a value HeaderValue refuses (CR, LF, NUL): the request is malformed (a stream error,
    /// PROTOCOL_ERROR). Such fields are not passed to `f`.
    pub malformed: bool,
    /// The decoded list's size (RFC 7541 §4.1: name + value + 32 per field) went over
    /// `max_list_size`: fields after that point are not passed to `f` (decoding goes on for the table).
    pub too_large: bool,
}

/// A field name as the tables keep it: a pre-made name, or only the length of a name that
/// makes any field using it malformed (kept so the table's size stays right).
#[derive(Clone, Debug)]
enum Name {
    Pseudo(Pseudo),
    Header(HeaderName),
    Bad(usize),
}

impl Name {
    /// Octet length of the name, as RFC 7541 §4.1 counts it.
    fn len(&self) -> usize {
        match self {
            Name::Pseudo(p) => p.as_str().len(),
            Name::Header(h) => h.as_str().len(),
            Name::Bad(n) => *n,
        }
    }

    /// Reads a literal name: a known pseudo-header, or a lower-case token; anything else is
    /// kept as `Bad` (a malformed request, not a compression error).
    fn parse(raw: &[u8]) -> Name {
        match raw {
            b":method" => Name::Pseudo(Pseudo::Method),
            b":scheme" => Name::Pseudo(Pseudo::Scheme),
            b":authority" => Name::Pseudo(Pseudo::Authority),
            b":path" => Name::Pseudo(Pseudo::Path),
            b":protocol" => Name::Pseudo(Pseudo::Protocol),
            b":status" => Name::Pseudo(Pseudo::Status),
            // `HeaderName::from_bytes` would quietly lower-case; HTTP/2 forbids upper case.
            [b':', ..] => Name::Bad(raw.len()),
            _ if raw.iter().any(u8::is_ascii_uppercase) => Name::Bad(raw.len()),
            _ => HeaderName::from_bytes(raw).map_or(Name::Bad(raw.len()), Name::Header),
        }
    }
}

/// A field value as the tables keep it, already checked against its name's kind so an
/// indexed hit is a reference-count bump rather than a new validation.
#[derive(Clone, Debug)]
enum Value {
    Pseudo(Bytes),
    Header(HeaderValue),
    Bad(usize),
}

impl Value {
    /// Checks `raw` for use with `name`: pseudo values must hold no CR, LF or NUL (RFC 9113
    /// §8.2.1), header values must be what `HeaderValue` accepts.
    fn new(name: &Name, raw: Bytes) -> Value {
        let len = raw.len();
        match name {
            Name::Pseudo(_) if raw.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') => {
                Value::Bad(len)
            }
            Name::Pseudo(_) => Value::Pseudo(raw),
            Name::Header(_) => {
                HeaderValue::from_maybe_shared(raw).map_or(Value::Bad(len), Value::Header)
            }
            Name::Bad(_) => Value::Bad(len),
        }
    }

    /// Octet length of the value, as RFC 7541 §4.1 counts it.
    fn len(&self) -> usize {
        match self {
            Value::Pseudo(b) => b.len(),
            Value::Header(v) => v.len(),
            Value::Bad(n) => *n,
        }
    }
}

/// The field a name and value make, or `None` when either one is malformed.
fn to_field(name: Name, value: Value) -> Option<Field> {
    match (name, value) {
        (Name::Pseudo(p), Value::Pseudo(v)) => Some(Field::Pseudo(p, v)),
        (Name::Header(n), Value::Header(v)) => Some(Field::Header(n, v)),
        _ => None,
    }
}

/// RFC 7541 §4.1: every entry costs its name, its value and 32 octets of overhead.
const ENTRY_OVERHEAD: usize = 32;

/// Integers above this are refused: no index, length or table size Spur accepts comes near
/// it, and it keeps every sum below overflow.
const MAX_INT: u64 = 1 << 28;

/// Number of entries in the static table (RFC 7541 Appendix A).
const STATIC_LEN: usize = 61;

/// Builds a static-table entry for a regular header.
const fn hdr(name: HeaderName, value: &'static str) -> (Name, Value) {
    (
        Name::Header(name),
        Value::Header(HeaderValue::from_static(value)),
    )
}

/// Builds a static-table entry for a pseudo-header.
const fn pseudo(p: Pseudo, value: &'static [u8]) -> (Name, Value) {
    (Name::Pseudo(p), Value::Pseudo(Bytes::from_static(value)))
}

/// The static table of RFC 7541 Appendix A (index 1 is element 0), with pre-made names and
/// values so a hit costs no parsing.
static STATIC_TABLE: [(Name, Value); STATIC_LEN] = [
    pseudo(Pseudo::Authority, b""),
    pseudo(Pseudo::Method, b"GET"),
    pseudo(Pseudo::Method, b"POST"),
    pseudo(Pseudo::Path, b"/"),
    pseudo(Pseudo::Path, b"/index.html"),
    pseudo(Pseudo::Scheme, b"http"),
    pseudo(Pseudo::Scheme, b"https"),
    pseudo(Pseudo::Status, b"200"),
    pseudo(Pseudo::Status, b"204"),
    pseudo(Pseudo::Status, b"206"),
    pseudo(Pseudo::Status, b"304"),
    pseudo(Pseudo::Status, b"400"),
    pseudo(Pseudo::Status, b"404"),
    pseudo(Pseudo::Status, b"500"),
    hdr(header::ACCEPT_CHARSET, ""),
    hdr(header::ACCEPT_ENCODING, "gzip, deflate"),
    hdr(header::ACCEPT_LANGUAGE, ""),
    hdr(header::ACCEPT_RANGES, ""),
    hdr(header::ACCEPT, ""),
    hdr(header::ACCESS_CONTROL_ALLOW_ORIGIN, ""),
    hdr(header::AGE, ""),
    hdr(header::ALLOW, ""),
    hdr(header::AUTHORIZATION, ""),
    hdr(header::CACHE_CONTROL, ""),
    hdr(header::CONTENT_DISPOSITION, ""),
    hdr(header::CONTENT_ENCODING, ""),
    hdr(header::CONTENT_LANGUAGE, ""),
    hdr(header::CONTENT_LENGTH, ""),
    hdr(header::CONTENT_LOCATION, ""),
    hdr(header::CONTENT_RANGE, ""),
    hdr(header::CONTENT_TYPE, ""),
    hdr(header::COOKIE, ""),
    hdr(header::DATE, ""),
    hdr(header::ETAG, ""),
    hdr(header::EXPECT, ""),
    hdr(header::EXPIRES, ""),
    hdr(header::FROM, ""),
    hdr(header::HOST, ""),
    hdr(header::IF_MATCH, ""),
    hdr(header::IF_MODIFIED_SINCE, ""),
    hdr(header::IF_NONE_MATCH, ""),
    hdr(header::IF_RANGE, ""),
    hdr(header::IF_UNMODIFIED_SINCE, ""),
    hdr(header::LAST_MODIFIED, ""),
    hdr(header::LINK, ""),
    hdr(header::LOCATION, ""),
    hdr(header::MAX_FORWARDS, ""),
    hdr(header::PROXY_AUTHENTICATE, ""),
    hdr(header::PROXY_AUTHORIZATION, ""),
    hdr(header::RANGE, ""),
    hdr(header::REFERER, ""),
    hdr(header::REFRESH, ""),
    hdr(header::RETRY_AFTER, ""),
    hdr(header::SERVER, ""),
    hdr(header::SET_COOKIE, ""),
    hdr(header::STRICT_TRANSPORT_SECURITY, ""),
    hdr(header::TRANSFER_ENCODING, ""),
    hdr(header::USER_AGENT, ""),
    hdr(header::VARY, ""),
    hdr(header::VIA, ""),
    hdr(header::WWW_AUTHENTICATE, ""),
];

/// The encoder's name lookup: the first static-table index carrying `name`, if any.
fn static_name_index(name: &str) -> Option<usize> {
    let i = match name {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    };
    Some(i)
}

/// One dynamic-table entry with its §4.1 size, kept so eviction needs no recount.
struct Entry {
    name: Name,
    value: Value,
    size: usize,
}

/// The dynamic table (RFC 7541 §2.3.2, §4): newest entry first, evicting the oldest.
struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    /// Applies a size update, evicting the oldest entries until the table fits (§4.3).
    fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    /// Drops the oldest entries until the table's size is at most `target`.
    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }

    /// Adds an entry (§4.4): first evicting what must go; an entry bigger than the whole
    /// table empties it and is not added.
    fn insert(&mut self, name: Name, value: Value) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.entries.push_front(Entry { name, value, size });
    }
}

/// A cursor over one header block.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads an integer with an `prefix`-bit prefix (RFC 7541 §5.1), refusing more than
    /// five continuation octets or a value above `MAX_INT`.
    fn int(&mut self, prefix: u32) -> Result<usize, DecodeError> {
        let mask = (1u8 << prefix).wrapping_sub(1);
        let first = *self.buf.get(self.pos).ok_or(TRUNCATED)?;
        self.pos += 1;
        let mut value = u64::from(first & mask);
        if value < u64::from(mask) {
            return Ok(value as usize);
        }
        let mut shift = 0;
        loop {
            let b = *self.buf.get(self.pos).ok_or(TRUNCATED)?;
            self.pos += 1;
            value += u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 28 {
                return Err(DecodeError::Compression("integer too long"));
            }
        }
        if value > MAX_INT {
            return Err(DecodeError::Compression("integer too large"));
        }
        Ok(value as usize)
    }

    /// Reads a string literal's header and octets (§5.2): the raw octets and whether they
    /// are Huffman-coded.
    fn string(&mut self) -> Result<(&'a [u8], bool), DecodeError> {
        let huffman = self.buf.get(self.pos).ok_or(TRUNCATED)? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.pos.checked_add(len).ok_or(TRUNCATED)?;
        let raw = self.buf.get(self.pos..end).ok_or(TRUNCATED)?;
        self.pos = end;
        Ok((raw, huffman))
    }

    /// Reads a string literal as owned value bytes, Huffman-decoded when flagged.
    fn value(&mut self) -> Result<Bytes, DecodeError> {
        let (raw, huffman) = self.string()?;
        if !huffman {
            return Ok(Bytes::copy_from_slice(raw));
        }
        // Every symbol takes at least 5 bits, so this is all the block could produce.
        let mut out = Vec::with_capacity(raw.len() * 8 / 5);
        huffman_decode(raw, &mut out)?;
        Ok(Bytes::from(out))
    }
}

/// The error for a block that ends in the middle of a representation.
const TRUNCATED: DecodeError = DecodeError::Compression("truncated header block");

/// The HPACK decoder of one HTTP/2 connection: the dynamic table the peer's encoder fills.
pub struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE Spur advertised: size updates may not exceed it.
    limit: usize,
    /// Reused buffer for Huffman-coded names, which are parsed and then dropped.
    scratch: Vec<u8>,
}

impl Decoder {
    /// `max_table_size`: the SETTINGS_HEADER_TABLE_SIZE Spur advertises (4096, the default).
    pub fn new(max_table_size: usize) -> Decoder {
        Decoder {
            table: DynamicTable {
                entries: VecDeque::new(),
                size: 0,
                max_size: max_table_size,
            },
            limit: max_table_size,
            scratch: Vec::new(),
        }
    }

    /// Decodes one complete header block (HEADERS + CONTINUATION payloads joined).
    /// Calls `f` for each field in order. Returns Ok(Block) when decodable.
    /// The dynamic table is always updated as the block says, even when the block is
    /// malformed or too large (the peer's encoder state must stay in sync).
    pub fn decode(
        &mut self,
        block: &[u8],
        max_list_size: usize,
        f: &mut dyn FnMut(Field),
    ) -> Result<Block, DecodeError> {
        let mut r = Reader { buf: block, pos: 0 };
        let mut out = Block::default();
        let mut list_size = 0usize;
        let mut seen_field = false;
        while let Some(&first) = block.get(r.pos) {
            if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the first field (§4.2).
                if seen_field {
                    return Err(DecodeError::Compression("table size update after a field"));
                }
                let size = r.int(5)?;
                if size > self.limit {
                    return Err(DecodeError::Compression("table size update over the limit"));
                }
                self.table.set_max_size(size);
                continue;
            }
            seen_field = true;
            let (name, value) = self.field(&mut r, first)?;
            list_size = list_size.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
            if list_size > max_list_size {
                out.too_large = true;
            }
            if out.too_large {
                continue;
            }
            match to_field(name, value) {
                Some(field) => f(field),
                None => out.malformed = true,
            }
        }
        Ok(out)
    }

    /// Reads one field representation starting with octet `first` (§6.1, §6.2), updating
    /// the dynamic table when it says so.
    fn field(&mut self, r: &mut Reader<'_>, first: u8) -> Result<(Name, Value), DecodeError> {
        if first & 0x80 != 0 {
            let (name, value) = self.entry(r.int(7)?)?;
            return Ok((name.clone(), value.clone()));
        }
        // 01xxxxxx: incremental indexing; 0001xxxx: never indexed; 0000xxxx: without indexing.
        let (prefix, indexing, never) = match first {
            b if b & 0x40 != 0 => (6, true, false),
            b if b & 0x10 != 0 => (4, false, true),
            _ => (4, false, false),
        };
        let index = r.int(prefix)?;
        let name = if index == 0 {
            self.literal_name(r)?
        } else {
            self.entry(index)?.0.clone()
        };
        let mut value = Value::new(&name, r.value()?);
        if never {
            if let Value::Header(v) = &mut value {
                v.set_sensitive(true);
            }
        }
        if indexing {
            self.table.insert(name.clone(), value.clone());
        }
        Ok((name, value))
    }

    /// The static or dynamic entry at `index` (§2.3.3); 0 and indexes past the end are
    /// compression errors.
    fn entry(&self, index: usize) -> Result<(&Name, &Value), DecodeError> {
        if index == 0 {
            return Err(DecodeError::Compression("index 0"));
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name, value));
        }
        match self.table.entries.get(index - 1 - STATIC_LEN) {
            Some(e) => Ok((&e.name, &e.value)),
            None => Err(DecodeError::Compression("index past the table")),
        }
    }

    /// Reads a literal name, Huffman-decoding it into the reused scratch buffer if needed.
    fn literal_name(&mut self, r: &mut Reader<'_>) -> Result<Name, DecodeError> {
        let (raw, huffman) = r.string()?;
        if !huffman {
            return Ok(Name::parse(raw));
        }
        self.scratch.clear();
        huffman_decode(raw, &mut self.scratch)?;
        Ok(Name::parse(&self.scratch))
    }
}

/// RFC 7541 Appendix B: the Huffman code as (code, length in bits) for octets 0..=255 and
/// EOS (256), the code right-aligned. The code is canonical: within a length, codes rise
/// with the symbol, and shorter codes come first (a test checks this).
static HUFFMAN_CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28), // 0..
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28), // 4..
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28), // 8..
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28), // 12..
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28), // 16..
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28), // 20..
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28), // 24..
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28), // 28..
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12), // 32..
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11), // 36..
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11), // 40..
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6), // 44..
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6), // 48..
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6), // 52..
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8), // 56..
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10), // 60..
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7), // 64..
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7), // 68..
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7), // 72..
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7), // 76..
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7), // 80..
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7), // 84..
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13), // 88..
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6), // 92..
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5), // 96..
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6), // 100..
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7), // 104..
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5), // 108..
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5), // 112..
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7), // 116..
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15), // 120..
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28), // 124..
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20), // 128..
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23), // 132..
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23), // 136..
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23), // 140..
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23), // 144..
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23), // 148..
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23), // 152..
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24), // 156..
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22), // 160..
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21), // 164..
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24), // 168..
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23), // 172..
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21), // 176..
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23), // 180..
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22), // 184..
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23), // 188..
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19), // 192..
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25), // 196..
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27), // 200..
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25), // 204..
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27), // 208..
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24), // 212..
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26), // 216..
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27), // 220..
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21), // 224..
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23), // 228..
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25), // 232..
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23), // 236..
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26), // 240..
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27), // 244..
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27), // 248..
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),  // 252..
    (0x3fffffff, 30), // 256..
];

/// The symbol number of EOS, which may never appear in a string (§5.2).
const EOS: u32 = 256;

/// Bits looked up at once by the decoder's first table: every code up to this long
/// (all letters, digits and common punctuation) decodes with one load.
const FAST_BITS: u32 = 10;

/// The longest code (EOS and three control characters).
const MAX_CODE_LEN: usize = 30;

/// Huffman decoding tables, built at compile time from `HUFFMAN_CODES`.
struct HuffmanTables {
    /// Indexed by the next `FAST_BITS` bits: `symbol | length << 9` for codes up to
    /// `FAST_BITS` long, 0 for longer ones.
    fast: [u16; 1 << FAST_BITS],
    /// Per length, one past its last code, left-aligned in 32 bits: the next 32 bits of
    /// input are below `limit[l]` (and not below `limit[l - 1]`) exactly when the code has
    /// length `l`.
    limit: [u64; MAX_CODE_LEN + 1],
    /// Per length, its first (smallest) code.
    first: [u32; MAX_CODE_LEN + 1],
    /// Per length, where its symbols start in `sorted`.
    offset: [u16; MAX_CODE_LEN + 1],
    /// The symbols in code order (by length, then symbol).
    sorted: [u16; 257],
}

/// Builds the canonical-code tables (the slow path) from the code lengths alone and the
/// one-load table from the codes themselves.
const fn build_huffman() -> HuffmanTables {
    let mut t = HuffmanTables {
        fast: [0; 1 << FAST_BITS],
        limit: [0; MAX_CODE_LEN + 1],
        first: [0; MAX_CODE_LEN + 1],
        offset: [0; MAX_CODE_LEN + 1],
        sorted: [0; 257],
    };
    let mut code: u32 = 0;
    let mut index: usize = 0;
    let mut len = 1;
    while len <= MAX_CODE_LEN {
        t.first[len] = code;
        t.offset[len] = index as u16;
        let mut sym = 0;
        while sym < 257 {
            if HUFFMAN_CODES[sym].1 as usize == len {
                t.sorted[index] = sym as u16;
                index += 1;
                code += 1;
            }
            sym += 1;
        }
        t.limit[len] = (code as u64) << (32 - len);
        code <<= 1;
        len += 1;
    }
    let mut sym = 0;
    while sym < 256 {
        let (code, len) = HUFFMAN_CODES[sym];
        if len as u32 <= FAST_BITS {
            let spare = FAST_BITS - len as u32;
            let start = (code << spare) as usize;
            let mut i = 0;
            while i < 1 << spare {
                t.fast[start + i] = sym as u16 | (len as u16) << 9;
                i += 1;
            }
        }
        sym += 1;
    }
    t
}

/// The decoding tables, in read-only data: no start-up cost and no lock.
static HUFFMAN: HuffmanTables = build_huffman();

/// Decodes a code longer than `FAST_BITS` from the next 32 bits of input (`window`),
/// by finding its length first: the canonical code makes that a run of comparisons.
fn huffman_slow(window: u64) -> Result<(u32, u32), DecodeError> {
    let t = &HUFFMAN;
    for len in FAST_BITS as usize + 1..=MAX_CODE_LEN {
        if window < t.limit[len] {
            let code = (window >> (32 - len)) as u32;
            let index = code.wrapping_sub(t.first[len]) as usize + usize::from(t.offset[len]);
            if let Some(&sym) = t.sorted.get(index) {
                return Ok((u32::from(sym), len as u32));
            }
            break;
        }
    }
    Err(DecodeError::Compression("bad Huffman code"))
}

/// Appends the Huffman decoding of `src` (§5.2) to `dst`. Refuses an EOS symbol, and
/// padding longer than 7 bits or not all ones.
fn huffman_decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), DecodeError> {
    // Pending input bits, left-aligned: the next code starts at bit 63.
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    let mut pos = 0;
    loop {
        // Refill only when the longest code might not fit: one refill serves several symbols.
        if nbits < MAX_CODE_LEN as u32 {
            if let Some(chunk) = src.get(pos..pos + 8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                // Bits past the whole octets counted here are loaded again next time.
                acc |= u64::from_be_bytes(word) >> nbits;
                let octets = (63 - nbits) / 8;
                pos += octets as usize;
                nbits += octets * 8;
            } else {
                while let (true, Some(&b)) = (nbits <= 56, src.get(pos)) {
                    acc |= u64::from(b) << (56 - nbits);
                    nbits += 8;
                    pos += 1;
                }
            }
        }
        if nbits == 0 {
            return Ok(());
        }
        let entry = HUFFMAN.fast[(acc >> (64 - FAST_BITS)) as usize];
        let (sym, len) = if entry != 0 {
            (u32::from(entry & 0x1ff), u32::from(entry >> 9))
        } else {
            huffman_slow(acc >> 32)?
        };
        if len > nbits {
            // Only at the end of input: what is left must be padding (§5.2).
            return huffman_padding(acc, nbits);
        }
        if sym == EOS {
            return Err(DecodeError::Compression("EOS in Huffman string"));
        }
        dst.push(sym as u8);
        acc <<= len;
        nbits -= len;
    }
}

/// Checks the `nbits` bits left at the top of `acc` after the last symbol: at most 7, all
/// ones (the most significant bits of EOS).
fn huffman_padding(acc: u64, nbits: u32) -> Result<(), DecodeError> {
    if nbits > 7 {
        return Err(DecodeError::Compression(
            "Huffman padding longer than 7 bits",
        ));
    }
    if acc >> (64 - nbits) != (1u64 << nbits) - 1 {
        return Err(DecodeError::Compression("Huffman padding not all ones"));
    }
    Ok(())
}

/// Encodes a response head: `:status` then `headers`, in order, as one header block appended to `dst`.
/// No dynamic table and no Huffman (cheap for Spur's CPU; always valid for the peer): `:status`
/// as an indexed field when the static table has it (200, 204, 206, 304, 400, 404, 500), else a
/// literal with the indexed name; each header as a "literal without indexing" with the static
/// table's name index when the name is in the static table, else a literal name; a value marked
/// sensitive (`HeaderValue::is_sensitive`) as "never indexed".
pub fn encode_response(status: http::StatusCode, headers: &http::HeaderMap, dst: &mut Vec<u8>) {
    let index = match status.as_u16() {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if index != 0 {
        dst.push(0x80 | index);
    } else {
        // Literal without indexing, name from static index 8 (:status).
        dst.push(0x08);
        encode_string(dst, status.as_str().as_bytes());
    }
    encode_trailers(headers, dst);
}

/// Encodes trailers (no pseudo-headers) the same way.
pub fn encode_trailers(headers: &http::HeaderMap, dst: &mut Vec<u8>) {
    for (name, value) in headers {
        // 0000xxxx: without indexing; 0001xxxx: never indexed (§6.2.2, §6.2.3).
        let flags = if value.is_sensitive() { 0x10 } else { 0x00 };
        let name = name.as_str();
        match static_name_index(name) {
            Some(index) => encode_int(dst, flags, 4, index),
            None => {
                dst.push(flags);
                encode_string(dst, name.as_bytes());
            }
        }
        encode_string(dst, value.as_bytes());
    }
}

/// Writes a string literal without Huffman coding (§5.2).
fn encode_string(dst: &mut Vec<u8>, s: &[u8]) {
    encode_int(dst, 0, 7, s.len());
    dst.extend_from_slice(s);
}

/// Writes `value` with a `prefix`-bit prefix (§5.1), `flags` in the first octet's high bits.
fn encode_int(dst: &mut Vec<u8>, flags: u8, prefix: u32, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        dst.push(flags | value as u8);
        return;
    }
    dst.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        dst.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    dst.push(value as u8);
}

#[cfg(test)]
#[path = "hpack_tests.rs"]
mod tests;
