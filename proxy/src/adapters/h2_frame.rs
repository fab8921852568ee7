//! HTTP/2 frames on the wire (RFC 9113 §4 and §6): the nine-byte frame header, and the
//! frames Spur's HTTP/2 server writes, appended to its output buffer.

use h2::Reason;

/// What a client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// DATA and HEADERS: the last frame the sender sends on the stream.
pub const END_STREAM: u8 = 0x1;
/// SETTINGS and PING: an acknowledgement.
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
/// HEADERS: a priority block (five bytes) comes first.
pub const PRIORITY_FLAG: u8 = 0x20;

pub const HEAD_LEN: usize = 9;
/// The largest window a sender may have (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The window every stream and the connection start with until SETTINGS change it.
pub const DEFAULT_WINDOW: i64 = 65_535;
pub const DEFAULT_MAX_FRAME: usize = 16_384;
const MAX_MAX_FRAME: u32 = (1 << 24) - 1;

/// SETTINGS identifiers (RFC 9113 §6.5.2).
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// A frame's header.
#[derive(Clone, Copy, Debug)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream identifier, its reserved bit cleared.
    pub stream: u32,
}

pub fn parse_head(b: &[u8]) -> Head {
    Head {
        len: (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize,
        kind: b[3],
        flags: b[4],
        stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
    }
}

pub fn put_head(dst: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    dst.extend_from_slice(&[l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]);
}

/// A 31-bit number (a window increment, a stream identifier) from four bytes.
pub fn u31(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
}

pub fn put_settings(dst: &mut Vec<u8>, settings: &[(u16, u32)]) {
    put_head(dst, settings.len() * 6, SETTINGS, 0, 0);
    for (id, value) in settings {
        dst.extend_from_slice(&id.to_be_bytes());
        dst.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn put_settings_ack(dst: &mut Vec<u8>) {
    put_head(dst, 0, SETTINGS, ACK, 0);
}

pub fn put_ping_ack(dst: &mut Vec<u8>, payload: &[u8]) {
    put_head(dst, 8, PING, ACK, 0);
    dst.extend_from_slice(payload);
}

pub fn put_window_update(dst: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(dst, 4, WINDOW_UPDATE, 0, stream);
    dst.extend_from_slice(&increment.to_be_bytes());
}

pub fn put_rst(dst: &mut Vec<u8>, stream: u32, reason: Reason) {
    put_head(dst, 4, RST_STREAM, 0, stream);
    dst.extend_from_slice(&u32::from(reason).to_be_bytes());
}

pub fn put_goaway(dst: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    put_head(dst, 8, GOAWAY, 0, 0);
    dst.extend_from_slice(&last_stream.to_be_bytes());
    dst.extend_from_slice(&u32::from(reason).to_be_bytes());
}

pub fn put_data(dst: &mut Vec<u8>, stream: u32, data: &[u8], end: bool) {
    put_head(
        dst,
        data.len(),
        DATA,
        if end { END_STREAM } else { 0 },
        stream,
    );
    dst.extend_from_slice(data);
}

/// A header block as HEADERS, then CONTINUATION frames when it is larger than the peer's
/// frame size. `encode` appends the block to the buffer it is given: it is written in
/// place after a frame header whose length is filled in afterwards, so the common case
/// (one frame) copies nothing.
pub fn put_headers(
    dst: &mut Vec<u8>,
    stream: u32,
    end_stream: bool,
    max_frame: usize,
    encode: impl FnOnce(&mut Vec<u8>),
) {
    let flags = if end_stream { END_STREAM } else { 0 };
    let start = dst.len();
    put_head(dst, 0, HEADERS, flags | END_HEADERS, stream);
    encode(dst);
    let len = dst.len() - start - HEAD_LEN;
    if len <= max_frame {
        let l = (len as u32).to_be_bytes();
        dst[start..start + 3].copy_from_slice(&l[1..]);
        return;
    }
    let block = dst.split_off(start + HEAD_LEN);
    dst.truncate(start);
    let mut chunks = block.chunks(max_frame).peekable();
    let mut kind = HEADERS;
    let mut first_flags = flags;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let f = first_flags | if last { END_HEADERS } else { 0 };
        put_head(dst, chunk.len(), kind, f, stream);
        dst.extend_from_slice(chunk);
        kind = CONTINUATION;
        first_flags = 0;
    }
}

/// A frame's payload without its padding (RFC 9113 §6.1): an error when the padding
/// length is not shorter than the payload.
pub fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], Reason> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(Reason::PROTOCOL_ERROR);
    };
    if pad as usize > rest.len() {
        return Err(Reason::PROTOCOL_ERROR);
    }
    Ok(&rest[..rest.len() - pad as usize])
}

/// The settings a client gave, as far as a server uses them.
#[derive(Clone, Copy, Debug)]
pub struct PeerSettings {
    pub initial_window: i64,
    pub max_frame: usize,
}

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            initial_window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Applies a SETTINGS frame's payload (not an acknowledgement) to `peer`: the error for
/// a value the RFC forbids (§6.5.2). Unknown settings are ignored, as the RFC asks.
pub fn apply_settings(peer: &mut PeerSettings, payload: &[u8]) -> Result<(), Reason> {
    if payload.len() % 6 != 0 {
        return Err(Reason::FRAME_SIZE_ERROR);
    }
    for s in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([s[0], s[1]]);
        let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        match id {
            SETTINGS_ENABLE_PUSH if value > 1 => return Err(Reason::PROTOCOL_ERROR),
            SETTINGS_INITIAL_WINDOW_SIZE if i64::from(value) > MAX_WINDOW => {
                return Err(Reason::FLOW_CONTROL_ERROR)
            }
            SETTINGS_INITIAL_WINDOW_SIZE => peer.initial_window = i64::from(value),
            SETTINGS_MAX_FRAME_SIZE if !(16_384..=MAX_MAX_FRAME).contains(&value) => {
                return Err(Reason::PROTOCOL_ERROR)
            }
            SETTINGS_MAX_FRAME_SIZE => peer.max_frame = value as usize,
            _ => {}
        }
    }
    Ok(())
}
