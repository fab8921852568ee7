//! End-to-end: an `http3` listener holds its clients' QPACK streams to RFC 9204. Spur
//! advertises no dynamic table (`SETTINGS_QPACK_MAX_TABLE_CAPACITY` 0), so a client whose
//! encoder stream sets a capacity above 0, inserts or duplicates an entry is closed with
//! `QPACK_ENCODER_STREAM_ERROR` (0x201); a second encoder or decoder stream closes it with
//! `H3_STREAM_CREATION_ERROR` (0x103), a finished encoder stream with
//! `H3_CLOSED_CRITICAL_STREAM` (0x104). A client whose encoder stream only says "capacity 0"
//! (or nothing, as h3's does) is served.
//!
//! The hostile clients are raw quinn connections writing the stream bytes themselves.

mod common;
#[path = "common/h3.rs"]
mod h3c;

use common::pki::*;
use common::*;
use h3c::{client_tls, quic_connect, H3Conn};
use std::net::SocketAddr;
use std::time::Duration;

const QPACK_ENCODER_STREAM_ERROR: u64 = 0x201;
const H3_STREAM_CREATION_ERROR: u64 = 0x103;
const H3_CLOSED_CRITICAL_STREAM: u64 = 0x104;

/// Unidirectional stream types (RFC 9114 §6.2, RFC 9204 §4.2).
const CONTROL: u8 = 0x00;
const ENCODER: u8 = 0x02;
const DECODER: u8 = 0x03;

/// Set Dynamic Table Capacity 4096: `001` and a 5-bit prefix integer (31 + 4065).
const CAPACITY_4096: [u8; 3] = [0x3f, 0xe1, 0x1f];
/// Set Dynamic Table Capacity 0.
const CAPACITY_0: u8 = 0x20;

fn edge_yaml(leaf: &Leaf, app: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - name: edge
    listen: 127.0.0.1:0
    protocol: http3
    tls: {{ cert: {cert}, key: {key} }}
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
        cert = leaf.cert,
        key = leaf.key,
    )
}

/// A client that has sent its control stream (empty SETTINGS) and is ready for more.
struct RawClient {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// Kept open: a closed control stream is an error of its own.
    _control: quinn::SendStream,
}

impl RawClient {
    async fn connect(addr: SocketAddr, ca: &str) -> RawClient {
        let (endpoint, conn) = quic_connect(addr, client_tls(ca, None)).await.unwrap();
        let mut control = conn.open_uni().await.unwrap();
        // Stream type, then SETTINGS (type 0x04) with no settings.
        control.write_all(&[CONTROL, 0x04, 0x00]).await.unwrap();
        RawClient {
            _endpoint: endpoint,
            conn,
            _control: control,
        }
    }

    /// Opens a unidirectional stream and writes `bytes` on it (left open).
    async fn uni(&self, bytes: &[u8]) -> quinn::SendStream {
        let mut s = self.conn.open_uni().await.unwrap();
        s.write_all(bytes).await.unwrap();
        s
    }

    /// The server's close: its application error code and reason.
    async fn closed(&self) -> (u64, String) {
        let why = tokio::time::timeout(Duration::from_secs(5), self.conn.closed())
            .await
            .expect("the server did not close the connection within 5 s");
        match why {
            quinn::ConnectionError::ApplicationClosed(c) => (
                c.error_code.into_inner(),
                String::from_utf8_lossy(&c.reason).into_owned(),
            ),
            other => panic!("closed by {other:?}, not by the server's HTTP/3 error"),
        }
    }

    /// `GET /` on a request stream, its HEADERS frame encoded by hand with QPACK's static
    /// table only (RFC 9204 Appendix A); returns the response's bytes (frames).
    async fn get(&self) -> Vec<u8> {
        let mut block = vec![0x00, 0x00]; // Required Insert Count 0, Base 0
        block.extend([0xd1, 0xd7, 0xc1]); // :method GET, :scheme https, :path /
        block.extend([0x50, 9]); // :authority, a literal of 9 bytes
        block.extend(b"localhost");
        let mut frame = vec![0x01, block.len() as u8]; // HEADERS
        frame.extend(block);
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64 * 1024))
            .await
            .expect("no response within 5 s")
            .unwrap()
    }
}

/// The response frames start with HEADERS whose field section begins with `:status 200`
/// (Required Insert Count 0, Base 0, then static index 25), and carry a DATA frame with the
/// app's body `app`.
fn is_200_app(resp: &[u8]) -> bool {
    // The frame's length, a QUIC variable-length integer: its size is in its first 2 bits.
    let Some(&first) = resp.get(1) else {
        return false;
    };
    let block = 1 + (1usize << (first >> 6));
    resp.first() == Some(&0x01)
        && resp.get(block..block + 3) == Some(&[0x00, 0x00, 0xd9][..])
        && resp.windows(5).any(|w| w == [0x00, 0x03, b'a', b'p', b'p'])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qpack_encoder_stream_beyond_capacity_0_closes_the_connection() {
    let pki = Pki::new("h3-qpack");
    let leaf = pki.issue("edge", None, 1);
    let app = named_backend("app").await;
    let proxy = start_proxy(&edge_yaml(&leaf, app.addr)).await;
    let addr = proxy.listener_addr("edge").unwrap();
    let ca = pki.ca_path.as_str();

    // A dynamic table of 4096 bytes, which Spur never offered.
    let c = RawClient::connect(addr, ca).await;
    let _enc = c.uni(&[&[ENCODER][..], &CAPACITY_4096].concat()).await;
    let (code, reason) = c.closed().await;
    assert_eq!(code, QPACK_ENCODER_STREAM_ERROR, "{reason}");
    assert!(reason.contains("capacity 4096"), "{reason}");

    // Inserts (here: with a literal name "a", value "b"), even after a valid capacity 0.
    let c = RawClient::connect(addr, ca).await;
    let _enc = c.uni(&[ENCODER, CAPACITY_0, 0x41, b'a', 0x01, b'b']).await;
    assert_eq!(c.closed().await.0, QPACK_ENCODER_STREAM_ERROR);

    // Two encoder streams; two decoder streams (h3's own check, behind Spur's).
    let c = RawClient::connect(addr, ca).await;
    let _first = c.uni(&[ENCODER]).await;
    let _second = c.uni(&[ENCODER]).await;
    assert_eq!(c.closed().await.0, H3_STREAM_CREATION_ERROR);
    let c = RawClient::connect(addr, ca).await;
    let _first = c.uni(&[DECODER]).await;
    let _second = c.uni(&[DECODER]).await;
    assert_eq!(c.closed().await.0, H3_STREAM_CREATION_ERROR);

    // An encoder stream closed by the client.
    let c = RawClient::connect(addr, ca).await;
    let mut enc = c.uni(&[ENCODER]).await;
    enc.finish().unwrap();
    assert_eq!(c.closed().await.0, H3_CLOSED_CRITICAL_STREAM);

    // Capacity 0 is what Spur allows: the client is served, and stays connected.
    let c = RawClient::connect(addr, ca).await;
    let _enc = c.uni(&[ENCODER, CAPACITY_0]).await;
    let _dec = c.uni(&[DECODER]).await;
    let resp = c.get().await;
    assert!(is_200_app(&resp), "{resp:x?}");
    let resp = c.get().await;
    assert!(is_200_app(&resp), "{resp:x?}");
    assert!(
        c.conn.close_reason().is_none(),
        "{:?}",
        c.conn.close_reason()
    );

    // And an h3 client, whose encoder stream carries nothing, still is.
    let h3 = H3Conn::open(addr, client_tls(ca, None)).await.unwrap();
    let (resp, body) = h3.get("/").await.unwrap();
    assert_eq!((resp.status().as_u16(), &body[..]), (200, &b"app"[..]));
}
