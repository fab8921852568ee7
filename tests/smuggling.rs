//! Request smuggling, as a property: generated HTTP/1.1 request heads, valid and malformed
//! (Content-Length and Transfer-Encoding in every combination, obs-fold, NUL, bare CR,
//! duplicate, huge and negative lengths, broken chunks, pipelined extras), are sent to
//! Spur on raw connections. The backend behind it parses what it receives with a strict
//! HTTP/1.1 parser and records every request. Whatever Spur does with an input (refuse it,
//! forward it), the backend must only ever see well-formed requests, each of which Spur
//! answered to the client with that backend's response: no extra request hidden in a
//! body, no bytes left between two requests, no framing the two sides read differently.
//! Inputs that are valid must arrive as sent (method, path, body).
//!
//! The cases come from a fixed seed (`SEED`, or `SPUR_SMUGGLING_SEED` to explore), a few
//! hundred of them, each bounded in time.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SEED: u64 = 20;
const CASES: usize = 400;
/// The longest a case may take before it fails (a proxy waiting for bytes that never
/// come is cut by its own timeouts well before).
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// A request as the backend received it.
#[derive(Clone, Debug, PartialEq)]
struct Received {
    method: String,
    path: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct Log {
    requests: Vec<Received>,
    /// Bytes that were not a well-formed request, with why.
    violations: Vec<String>,
    /// Per open connection: bytes received and not yet a whole request.
    pending: std::collections::HashMap<usize, usize>,
}

/// The strict backend: one [`Log`] for all its connections; each request is answered
/// `200` with `x-seq: N` (its number) so the client can tell the backend's answers apart.
async fn strict_backend() -> (SocketAddr, Arc<Mutex<Log>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log: Arc<Mutex<Log>> = Arc::default();
    let shared = log.clone();
    tokio::spawn(async move {
        let mut id = 0;
        while let Ok((s, _)) = l.accept().await {
            id += 1;
            tokio::spawn(serve_strictly(s, id, shared.clone()));
        }
    });
    (addr, log)
}

async fn serve_strictly(mut s: TcpStream, id: usize, log: Arc<Mutex<Log>>) {
    let mut buf = Vec::new();
    loop {
        loop {
            match parse_request(&buf) {
                Ok(Some((req, used))) => {
                    buf.drain(..used);
                    let seq = {
                        let mut l = log.lock().unwrap();
                        l.requests.push(req);
                        l.pending.insert(id, buf.len());
                        l.requests.len()
                    };
                    let body = seq.to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-seq: {seq}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(why) => {
                    let mut l = log.lock().unwrap();
                    l.violations
                        .push(format!("{why}: {:?}", String::from_utf8_lossy(&buf)));
                    l.pending.remove(&id);
                    return;
                }
            }
        }
        log.lock().unwrap().pending.insert(id, buf.len());
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                // A request cut off by a closing connection is no violation: the proxy
                // abandons an upstream request whose client left.
                log.lock().unwrap().pending.remove(&id);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One line ending in CRLF at `at`: its bytes and where the next begins; `Ok(None)` if
/// incomplete. A bare CR or LF is a violation.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    let Some(i) = rest.iter().position(|b| *b == b'\n') else {
        return match rest.iter().position(|b| *b == b'\r') {
            Some(j) if j + 1 < rest.len() => Err("bare CR".into()),
            _ => Ok(None),
        };
    };
    if i == 0 || rest[i - 1] != b'\r' {
        return Err("bare LF".into());
    }
    let l = &rest[..i - 1];
    if l.contains(&b'\r') {
        return Err("bare CR".into());
    }
    Ok(Some((l, at + i + 1)))
}

/// A strict RFC 9112 reading of one request at the start of `buf`: the request and the
/// bytes it took, `Ok(None)` if more bytes are needed, or why the bytes are not one.
fn parse_request(buf: &[u8]) -> Result<Option<(Received, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((start, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let start = std::str::from_utf8(start).map_err(|_| "request line not UTF-8")?;
    let parts: Vec<&str> = start.split(' ').collect();
    let [method, path, "HTTP/1.1"] = parts[..] else {
        return Err(format!("request line `{start}`"));
    };
    if method.is_empty() || !method.bytes().all(tchar) || !path.starts_with('/') {
        return Err(format!("request line `{start}`"));
    }
    let mut hosts = 0;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let Some((l, next)) = line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if l.is_empty() {
            break;
        }
        let colon = l
            .iter()
            .position(|b| *b == b':')
            .ok_or("header without colon")?;
        let (name, value) = (&l[..colon], &l[colon + 1..]);
        if name.is_empty() || !name.iter().all(|b| tchar(*b)) {
            return Err(format!("header name {:?}", String::from_utf8_lossy(name)));
        }
        if value
            .iter()
            .any(|b| *b == 0 || (*b < 0x20 && *b != b'\t') || *b == 0x7f)
        {
            return Err("control byte in a header value".into());
        }
        let value = String::from_utf8_lossy(value).trim().to_string();
        match name.to_ascii_lowercase().as_slice() {
            b"host" => hosts += 1,
            b"content-length" => {
                if length.is_some()
                    || value.is_empty()
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(format!("content-length `{value}` (or a second one)"));
                }
                length = Some(value.parse().map_err(|_| "content-length too large")?);
            }
            b"transfer-encoding" => {
                if chunked || value != "chunked" {
                    return Err(format!("transfer-encoding `{value}`"));
                }
                chunked = true;
            }
            _ => {}
        }
    }
    if hosts != 1 {
        return Err(format!("{hosts} Host headers"));
    }
    if chunked && length.is_some() {
        return Err("both content-length and transfer-encoding".into());
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let Some((size, next)) = line(buf, at)? else {
                return Ok(None);
            };
            let size = std::str::from_utf8(size).map_err(|_| "chunk size")?;
            let hex = size.split(';').next().unwrap_or_default();
            if hex.is_empty() || hex.len() > 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("chunk size `{size}`"));
            }
            let n = usize::from_str_radix(hex, 16).unwrap();
            at = next;
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    let Some((t, next)) = line(buf, at)? else {
                        return Ok(None);
                    };
                    at = next;
                    if t.is_empty() {
                        break;
                    }
                    if !t.contains(&b':') {
                        return Err("trailer without colon".into());
                    }
                }
                break;
            }
            if buf.len() < at + n + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[at..at + n]);
            if &buf[at + n..at + n + 2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            at += n + 2;
        }
    } else if let Some(n) = length {
        if buf.len() < at + n {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + n]);
        at += n;
    }
    Ok(Some((
        Received {
            method: method.into(),
            path: path.into(),
            body,
        },
        at,
    )))
}

/// One generated input: its bytes, and when it is a valid request (or two, pipelined),
/// what the backend must receive.
struct Case {
    bytes: Vec<u8>,
    expect: Option<Vec<Received>>,
    what: String,
}

fn body_bytes(rng: &mut fastrand::Rng) -> Vec<u8> {
    let n = rng.usize(0..40);
    (0..n).map(|_| rng.alphanumeric() as u8).collect()
}

fn chunked(rng: &mut fastrand::Rng, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = rng.usize(1..=rest.len());
        let ext = if rng.u8(..10) == 0 { ";ext=1" } else { "" };
        out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    if rng.u8(..5) == 0 {
        out.extend_from_slice(b"x-trailer: 1\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The ways a head can frame its body; the first two are valid.
const FRAMINGS: &[&str] = &[
    "length",
    "chunked",
    "length+chunked",
    "chunked+length",
    "length twice",
    "two lengths",
    "length list",
    "negative length",
    "huge length",
    "plus length",
    "spaced length",
    "hex length",
    "te chunked,identity",
    "te identity",
    "te Chunked",
    "te xchunked",
    "te chunked;q",
    "te twice",
    "bad chunk size",
    "huge chunk size",
    "chunk without crlf",
    "obs-fold",
    "nul in value",
    "bare cr in value",
    "bare lf lines",
    "space before colon",
    "bad header name",
    "two hosts",
    "no host",
    "double space",
    "http/1.0 with length",
];

fn generate(rng: &mut fastrand::Rng, i: usize) -> Case {
    let method = ["GET", "POST", "PUT", "DELETE", "PATCH"][rng.usize(..5)];
    let path = format!("/case/{i}");
    let body = body_bytes(rng);
    let framing = if rng.bool() {
        FRAMINGS[rng.usize(..2)]
    } else {
        FRAMINGS[rng.usize(..FRAMINGS.len())]
    };
    let n = body.len();
    let mut version = "HTTP/1.1";
    let mut sp = " ";
    let mut headers: Vec<String> = vec!["host: svc".into()];
    let mut framed = body.clone();
    match framing {
        "length" => headers.push(format!("content-length: {n}")),
        "chunked" => {
            headers.push("transfer-encoding: chunked".into());
            framed = chunked(rng, &body);
        }
        "length+chunked" | "chunked+length" => {
            let (a, b) = (
                format!("content-length: {n}"),
                "transfer-encoding: chunked".into(),
            );
            headers.extend(if framing == "length+chunked" {
                [a, b]
            } else {
                [b, a]
            });
            if rng.bool() {
                framed = chunked(rng, &body);
            }
        }
        "length twice" => {
            headers.push(format!("content-length: {n}"));
            headers.push(format!("content-length: {n}"));
        }
        "two lengths" => {
            headers.push(format!("content-length: {n}"));
            headers.push(format!("content-length: {}", n / 2));
        }
        "length list" => headers.push(format!("content-length: {n}, {n}")),
        "negative length" => headers.push("content-length: -1".into()),
        "huge length" => headers.push("content-length: 99999999999999999999999".into()),
        "plus length" => headers.push(format!("content-length: +{n}")),
        "spaced length" => headers.push(format!("content-length: {n} 0")),
        "hex length" => headers.push(format!("content-length: 0x{n:x}")),
        "te chunked,identity" | "te identity" | "te Chunked" | "te xchunked" | "te chunked;q" => {
            let v = &framing[3..];
            headers.push(format!("transfer-encoding: {v}"));
            if rng.bool() {
                framed = chunked(rng, &body);
            }
        }
        "te twice" => {
            headers.push("transfer-encoding: chunked".into());
            headers.push("transfer-encoding: chunked".into());
            framed = chunked(rng, &body);
        }
        "bad chunk size" | "huge chunk size" | "chunk without crlf" => {
            headers.push("transfer-encoding: chunked".into());
            framed = match framing {
                "bad chunk size" => format!("-{n:x}\r\n").into_bytes(),
                "huge chunk size" => b"fffffffffffffffffff\r\n".to_vec(),
                _ => format!("{:x}\r\n", n + 1).into_bytes(),
            };
            framed.extend_from_slice(&body);
            framed.extend_from_slice(b"x0\r\n\r\n");
        }
        "obs-fold" => {
            headers.push(format!("content-length: {n}"));
            headers.push("x-folded: a\r\n continued".into());
        }
        "nul in value" => {
            headers.push(format!("content-length: {n}"));
            headers.push("x-nul: a\0b".into());
        }
        "bare cr in value" => {
            headers.push(format!("content-length: {n}"));
            headers.push("x-cr: a\rb".into());
        }
        "bare lf lines" => headers.push(format!("content-length: {n}\nx-lf: 1")),
        "space before colon" => headers.push(format!("content-length : {n}")),
        "bad header name" => {
            headers.push(format!("content-length: {n}"));
            headers.push("x bad: 1".into());
        }
        "two hosts" => {
            headers.push("host: other".into());
            headers.push(format!("content-length: {n}"));
        }
        "no host" => {
            headers.remove(0);
            headers.push(format!("content-length: {n}"));
        }
        "double space" => {
            sp = "  ";
            headers.push(format!("content-length: {n}"));
        }
        "http/1.0 with length" => {
            version = "HTTP/1.0";
            headers.push(format!("content-length: {n}"));
        }
        other => unreachable!("{other}"),
    }
    let valid = matches!(framing, "length" | "chunked");
    // The last request of an input asks to close, so the case ends when Spur closes.
    let extra = rng.u8(..3) == 0;
    if !extra {
        headers.push("connection: close".into());
    }
    let mut bytes = format!("{method}{sp}{path} {version}\r\n").into_bytes();
    for h in &headers {
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(&framed);
    let mut expect = vec![Received {
        method: method.into(),
        path: path.clone(),
        body,
    }];
    // Sometimes a second request right behind: pipelining, or a smuggling attempt when
    // the first one's framing is not what it seems.
    if extra {
        let extra = format!("GET {path}/extra HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n");
        bytes.extend_from_slice(extra.as_bytes());
        expect.push(Received {
            method: "GET".into(),
            path: format!("{path}/extra"),
            body: vec![],
        });
    }
    Case {
        bytes,
        expect: valid.then_some(expect),
        what: framing.into(),
    }
}

/// The responses in `bytes` (as Spur writes them: content-length or chunked, or to the
/// end): how many carry the backend's `x-seq`, and their statuses.
fn responses(mut bytes: &[u8]) -> (usize, Vec<u16>) {
    let mut from_backend = 0;
    let mut statuses = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        bytes = &bytes[end + 4..];
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        statuses.push(status);
        if head.contains("\r\nx-seq:") {
            from_backend += 1;
        }
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if let Some(n) = field("content-length:").and_then(|v| v.parse::<usize>().ok()) {
            bytes = &bytes[n.min(bytes.len())..];
        } else if field("transfer-encoding:").is_some() {
            loop {
                let Some(i) = bytes.windows(2).position(|w| w == b"\r\n") else {
                    return (from_backend, statuses);
                };
                let n = usize::from_str_radix(
                    String::from_utf8_lossy(&bytes[..i])
                        .split(';')
                        .next()
                        .unwrap(),
                    16,
                )
                .unwrap_or(0);
                bytes = &bytes[(i + 2 + n + 2).min(bytes.len())..];
                if n == 0 {
                    break;
                }
            }
        } else if status != 304 && status != 204 && !(100..200).contains(&status) {
            break;
        }
    }
    (from_backend, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_generated_head_smuggles_anything_to_the_backend() {
    let (backend, log) = strict_backend().await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
    # An input that leaves Spur waiting for more is ended by these, not by the test.
    limits: {{ header_timeout: 500ms, body_timeout: 500ms, idle_timeout: 1s }}
clusters:
  - {{ name: app, endpoints: ["{backend}"] }}
"#
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let seed = std::env::var("SPUR_SMUGGLING_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut refused = 0;
    for i in 0..CASES {
        let case = generate(&mut rng, i);
        let before = log.lock().unwrap().requests.len();
        let mut s = TcpStream::connect(web).await.unwrap();
        // Not half-closed: a server may take that as the client leaving.
        s.write_all(&case.bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(CASE_LIMIT, s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("case {i} ({}) took over {CASE_LIMIT:?}", case.what))
            .ok();
        let (answered, statuses) = responses(&out);
        let ctx = format!(
            "seed {seed}, case {i} ({}): {:?}\nresponses: {statuses:?}\n{}",
            case.what,
            String::from_utf8_lossy(&case.bytes),
            String::from_utf8_lossy(&out)
        );
        // Each backend request of this case is one the client got the answer to.
        let got: Vec<Received> = {
            let l = log.lock().unwrap();
            assert!(l.violations.is_empty(), "{:?}\n{ctx}", l.violations);
            l.requests[before..].to_vec()
        };
        assert_eq!(got.len(), answered, "{ctx}\nbackend got {got:?}");
        if let Some(expect) = &case.expect {
            assert_eq!(&got, expect, "{ctx}");
        }
        if got.is_empty() {
            refused += 1;
        }
    }
    // Nothing left half-sent on the pooled upstream connections.
    assert!(
        eventually(Duration::from_secs(2), || async {
            log.lock().unwrap().pending.values().all(|n| *n == 0)
        })
        .await,
        "bytes left between requests: {:?}",
        log.lock().unwrap().pending
    );
    assert!(log.lock().unwrap().violations.is_empty());
    // The generator made both kinds.
    assert!(
        refused > CASES / 10 && refused < CASES * 9 / 10,
        "{refused} refused"
    );
}
