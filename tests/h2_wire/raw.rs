//! A raw HTTP/2 client for the wire tests: frames written by hand on a TCP socket and read
//! back one by one, every wait bounded; a minimal HPACK encoder for requests (literals
//! without indexing, no Huffman, plus static-table entries) and just enough of a decoder
//! to read a response's `:status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The longest any single wait may take.
pub const STEP: Duration = Duration::from_secs(5);

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

// Settings (RFC 9113 §6.5.2).
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

#[derive(Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The error code of a RST_STREAM or GOAWAY.
    pub fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        be32(&self.payload[at..at + 4])
    }

    /// Whether this is a graceful GOAWAY (NO_ERROR) under which `stream` may still finish.
    pub fn lets_finish(&self, stream: u32) -> bool {
        self.kind == GOAWAY && self.code() == NO_ERROR && self.last_stream() >= stream
    }

    /// A GOAWAY's last stream ID.
    pub fn last_stream(&self) -> u32 {
        be32(&self.payload[..4]) & 0x7fff_ffff
    }

    /// A HEADERS frame's field block fragment, or a DATA frame's data: without the padding
    /// and the priority fields.
    pub fn content(&self) -> &[u8] {
        let mut p = &self.payload[..];
        let mut pad = 0;
        if self.has(PADDED) && (self.kind == DATA || self.kind == HEADERS) {
            pad = p[0] as usize;
            p = &p[1..];
        }
        if self.kind == HEADERS && self.has(PRIORITY_FLAG) {
            p = &p[5..];
        }
        &p[..p.len() - pad]
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.kind {
            DATA => "DATA",
            HEADERS => "HEADERS",
            PRIORITY => "PRIORITY",
            RST_STREAM => "RST_STREAM",
            SETTINGS => "SETTINGS",
            PING => "PING",
            GOAWAY => "GOAWAY",
            WINDOW_UPDATE => "WINDOW_UPDATE",
            CONTINUATION => "CONTINUATION",
            _ => "UNKNOWN",
        };
        write!(
            f,
            "{name}(stream {}, flags {:#x}, {} bytes",
            self.stream,
            self.flags,
            self.payload.len()
        )?;
        match self.kind {
            RST_STREAM if self.payload.len() == 4 => write!(f, ", code {:#x}", self.code())?,
            GOAWAY if self.payload.len() >= 8 => write!(
                f,
                ", last {}, code {:#x}, debug {:?}",
                self.last_stream(),
                self.code(),
                String::from_utf8_lossy(&self.payload[8..])
            )?,
            WINDOW_UPDATE if self.payload.len() == 4 => {
                write!(f, ", increment {}", be32(&self.payload))?
            }
            _ => {}
        }
        write!(f, ")")
    }
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A frame as bytes on the wire: the 9-byte header, then the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(9 + len);
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, value) in pairs {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
    out
}

pub fn goaway(last: u32, code: u32) -> Vec<u8> {
    let mut out = last.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out
}

/// What [`Conn::next`] saw.
pub enum Event {
    Frame(Frame),
    /// The server closed (or reset) the connection.
    Closed,
    Timeout,
}

/// A client connection: the preface and SETTINGS sent, the server's SETTINGS read and
/// acknowledged.
pub struct Conn {
    rd: OwnedReadHalf,
    wr: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    buf: Vec<u8>,
    /// The server's first SETTINGS.
    pub server: Vec<(u16, u32)>,
    /// Every frame read so far, for failure messages.
    pub seen: Vec<String>,
}

impl Conn {
    /// Connects with empty client SETTINGS.
    pub async fn open(addr: SocketAddr) -> Conn {
        Conn::open_with(addr, &[]).await
    }

    pub async fn open_with(addr: SocketAddr, client: &[(u16, u32)]) -> Conn {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connects in time")
            .expect("connects");
        tcp.set_nodelay(true).unwrap();
        let (rd, wr) = tcp.into_split();
        let mut conn = Conn {
            rd,
            wr: Arc::new(tokio::sync::Mutex::new(wr)),
            buf: Vec::new(),
            server: Vec::new(),
            seen: Vec::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &settings(client)));
        conn.write(&hello).await;
        // The server's preface is a SETTINGS frame, first.
        let first = conn.frame().await;
        assert!(
            first.kind == SETTINGS && !first.has(ACK),
            "the server's first frame is SETTINGS: {first:?}"
        );
        conn.server = first
            .payload
            .chunks(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), be32(&c[2..])))
            .collect();
        conn.send(SETTINGS, ACK, 0, &[]).await;
        conn
    }

    /// A value of the server's SETTINGS.
    pub fn setting(&self, id: u16) -> Option<u32> {
        self.server
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|p| p.1)
    }

    /// The write half, shared: for a task that writes while this one reads.
    pub fn writer(&self) -> Arc<tokio::sync::Mutex<OwnedWriteHalf>> {
        self.wr.clone()
    }

    /// Writes bytes; a failed write (the server closed) is ignored: what the server sent
    /// before closing is still to be read.
    pub async fn write(&mut self, bytes: &[u8]) {
        let mut w = self.wr.lock().await;
        let _ = tokio::time::timeout(STEP, w.write_all(bytes)).await;
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.write(&frame(kind, flags, stream, payload)).await;
    }

    /// A request's header block in one HEADERS frame with END_HEADERS (and END_STREAM if
    /// `end`).
    pub async fn headers(&mut self, stream: u32, block: &[u8], end: bool) {
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, block).await;
    }

    /// The next frame, the end of the connection, or nothing within `within`.
    pub async fn next(&mut self, within: Duration) -> Event {
        let deadline = Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let len = (self.buf[0] as usize) << 16
                    | (self.buf[1] as usize) << 8
                    | self.buf[2] as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: be32(&self.buf[5..9]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    self.seen.push(format!("{f:?}"));
                    return Event::Frame(f);
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rd.read(&mut chunk)).await {
                Err(_) => return Event::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Event::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame; fails the test on a timeout or the end of the connection.
    pub async fn frame(&mut self) -> Frame {
        match self.next(STEP).await {
            Event::Frame(f) => f,
            Event::Closed => panic!("connection closed; frames: {:?}", self.seen),
            Event::Timeout => panic!("no frame within {STEP:?}; frames: {:?}", self.seen),
        }
    }

    /// The first frame for which `want` holds (others skipped), within [`STEP`].
    pub async fn until(&mut self, what: &str, mut want: impl FnMut(&Frame) -> bool) -> Frame {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Event::Frame(f) if want(&f) => return f,
                Event::Frame(_) => {}
                Event::Closed => panic!("closed before {what}; frames: {:?}", self.seen),
                Event::Timeout => panic!("no {what} within {STEP:?}; frames: {:?}", self.seen),
            }
        }
    }

    /// The connection error the server reports: GOAWAY's code, once the server has also
    /// closed the connection (both within [`STEP`]). Fails on a RST_STREAM before it.
    pub async fn goaway(&mut self) -> u32 {
        let f = self
            .until("GOAWAY", |f| {
                assert!(
                    f.kind != RST_STREAM,
                    "a stream error, not a connection error"
                );
                f.kind == GOAWAY
            })
            .await;
        assert_eq!(f.stream, 0, "GOAWAY on stream 0");
        assert!(
            self.closes().await,
            "the server closes the connection after its GOAWAY; frames: {:?}",
            self.seen
        );
        f.code()
    }

    /// The code of the RST_STREAM the server sends on `stream` (within [`STEP`]); fails on
    /// a GOAWAY or the end of the connection before it.
    pub async fn reset(&mut self, stream: u32) -> u32 {
        self.until("RST_STREAM", |f| {
            assert!(f.kind != GOAWAY, "a connection error, not a stream error");
            f.kind == RST_STREAM && f.stream == stream
        })
        .await
        .code()
    }

    /// A stream error on `stream` (RST_STREAM) or a connection error (GOAWAY, then the
    /// connection closed), whichever the server sends first.
    pub async fn error(&mut self, stream: u32) -> Ended {
        let f = self
            .until("RST_STREAM or GOAWAY", |f| {
                f.kind == GOAWAY || (f.kind == RST_STREAM && f.stream == stream)
            })
            .await;
        if f.kind == RST_STREAM {
            return Ended::Stream(f.code());
        }
        assert!(self.closes().await, "closed after GOAWAY: {:?}", self.seen);
        Ended::Connection(f.code())
    }

    /// Whether the server closes the connection within [`STEP`] (frames before the end are
    /// read and skipped).
    pub async fn closes(&mut self) -> bool {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Event::Frame(_) => {}
                Event::Closed => return true,
                Event::Timeout => return false,
            }
        }
    }

    /// The whole response on `stream` (small enough for the default windows): its status,
    /// data and whether trailers ended it. Fails on a reset or a GOAWAY first, except a
    /// graceful GOAWAY (NO_ERROR) that lets the stream finish.
    pub async fn response(&mut self, stream: u32) -> Reply {
        let mut resp = Reply {
            status: 0,
            body: Vec::new(),
            trailers: false,
        };
        loop {
            let f = self
                .until("the response", |f| {
                    let ours = f.stream == stream;
                    (ours && matches!(f.kind, HEADERS | DATA | CONTINUATION | RST_STREAM))
                        || (f.kind == GOAWAY && !f.lets_finish(stream))
                })
                .await;
            match f.kind {
                HEADERS if resp.status == 0 => {
                    resp.status = status(f.content())
                        .unwrap_or_else(|| panic!("no :status in {:02x?}", f.content()))
                }
                HEADERS => resp.trailers = true,
                DATA => resp.body.extend_from_slice(f.content()),
                CONTINUATION => {}
                _ => panic!("the response on stream {stream} failed: {:?}", self.seen),
            }
            if f.has(END_STREAM) && (f.kind == DATA || f.kind == HEADERS) {
                return resp;
            }
        }
    }
}

/// How a stream ended with an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Stream(u32),
    Connection(u32),
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub trailers: bool,
}

// ---------------------------------------------------------------- HPACK (RFC 7541)

/// An integer with an N-bit prefix (§5.1), the first byte's other bits being `first`.
pub fn int(out: &mut Vec<u8>, first: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A string literal without Huffman coding (§5.2).
pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// A field block, built field by field.
#[derive(Default, Clone)]
pub struct Block(pub Vec<u8>);

impl Block {
    pub fn new() -> Block {
        Block::default()
    }

    /// An indexed field (§6.1).
    pub fn indexed(mut self, index: usize) -> Block {
        int(&mut self.0, 0x80, 7, index);
        self
    }

    /// A literal without indexing whose name is the static table's `index` (§6.2.2).
    pub fn named(mut self, index: usize, value: &[u8]) -> Block {
        int(&mut self.0, 0x00, 4, index);
        string(&mut self.0, value);
        self
    }

    /// A literal without indexing with a literal name (§6.2.2).
    pub fn field(mut self, name: &str, value: &[u8]) -> Block {
        self.0.push(0x00);
        string(&mut self.0, name.as_bytes());
        string(&mut self.0, value);
        self
    }

    pub fn method_get(self) -> Block {
        self.indexed(2)
    }
    pub fn method_post(self) -> Block {
        self.indexed(3)
    }
    pub fn scheme_http(self) -> Block {
        self.indexed(6)
    }
    pub fn path(self, path: &str) -> Block {
        match path {
            "/" => self.indexed(4),
            _ => self.named(4, path.as_bytes()),
        }
    }
    pub fn authority(self) -> Block {
        self.named(1, b"spur.test")
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// `GET path` on http://spur.test, no other field.
pub fn get_block(path: &str) -> Block {
    Block::new()
        .method_get()
        .scheme_http()
        .path(path)
        .authority()
}

/// `POST path` on http://spur.test, no other field.
pub fn post_block(path: &str) -> Block {
    Block::new()
        .method_post()
        .scheme_http()
        .path(path)
        .authority()
}

/// A response's `:status`, from the first field of its block (the pseudo-fields come
/// first): an indexed static entry (0x88 is 200), or a literal with the static name
/// `:status` (index 8) and a value in plain text or Huffman-coded digits. Dynamic table
/// size updates before it are skipped. `None` for anything else (a dynamic-table index).
pub fn status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    // Dynamic table size updates (001xxxxx) may open a block.
    while i < block.len() && block[i] & 0xe0 == 0x20 {
        let (_, n) = read_int(&block[i..], 5)?;
        i += n;
    }
    let b = *block.get(i)?;
    if b & 0x80 != 0 {
        let (index, _) = read_int(&block[i..], 7)?;
        return [200, 204, 206, 304, 400, 404, 500]
            .get(index.checked_sub(8)?)
            .copied();
    }
    // A literal: with incremental indexing (01xxxxxx, 6-bit index), without indexing
    // (0000xxxx) or never indexed (0001xxxx), 4-bit index.
    let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
    let (index, n) = read_int(&block[i..], prefix)?;
    if index != 8 {
        return None;
    }
    i += n;
    let huffman = *block.get(i)? & 0x80 != 0;
    let (len, n) = read_int(&block[i..], 7)?;
    i += n;
    let raw = block.get(i..i + len)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

/// An HPACK integer with an N-bit prefix: its value and the bytes it took.
fn read_int(b: &[u8], prefix: u32) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let mut v = (*b.first()? as usize) & max;
    if v < max {
        return Some((v, 1));
    }
    let mut shift = 0;
    for (i, byte) in b.iter().enumerate().skip(1) {
        v += ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
        if shift > 28 {
            return None;
        }
    }
    None
}

/// Huffman-coded decimal digits (RFC 7541 Appendix B: '0' to '2' are the 5-bit codes 0 to
/// 2, '3' to '9' the 6-bit codes 0x19 to 0x1f), then padding with 1 bits.
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut at = 0;
    while at < bits.len() {
        let rest = &bits[at..];
        if rest.len() < 8 && rest.iter().all(|&b| b == 1) {
            break;
        }
        let code = |n: usize| -> Option<u8> {
            rest.get(..n)
                .map(|b| b.iter().fold(0u8, |acc, &bit| acc << 1 | bit))
        };
        let five = code(5)?;
        if five <= 2 {
            out.push((b'0' + five) as char);
            at += 5;
            continue;
        }
        let six = code(6)?;
        if (0x19..=0x1f).contains(&six) {
            out.push((b'3' + six - 0x19) as char);
            at += 6;
            continue;
        }
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_static_and_literal_forms() {
        assert_eq!(status(&[0x88]), Some(200));
        assert_eq!(status(&[0x8d]), Some(404));
        // Literal, indexed name :status, plain "431".
        assert_eq!(status(&[0x08, 3, b'4', b'3', b'1']), Some(431));
        // Literal with incremental indexing, Huffman "431": the codes 011010, 011001 and
        // 00001, then 1s to the byte's end.
        let bits = "011010011001000011111111";
        let bytes: Vec<u8> = (0..bits.len() / 8)
            .map(|i| u8::from_str_radix(&bits[i * 8..i * 8 + 8], 2).unwrap())
            .collect();
        let mut block = vec![0x48, 0x80 | bytes.len() as u8];
        block.extend(bytes);
        assert_eq!(status(&block), Some(431));
        // A dynamic table size update first.
        assert_eq!(status(&[0x20, 0x88]), Some(200));
    }

    #[test]
    fn integers_round_trip() {
        for v in [0, 1, 14, 15, 16, 126, 127, 128, 300, 16384, 1 << 20] {
            let mut out = Vec::new();
            int(&mut out, 0, 4, v);
            assert_eq!(read_int(&out, 4), Some((v, out.len())), "{v}");
        }
    }
}
