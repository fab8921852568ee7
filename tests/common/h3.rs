//! An HTTP/3 client for the tests (quinn + h3), used by the `http3*` test files through
//! `#[path]` (the other test binaries do not need it).
#![allow(dead_code)]

use crate::common::pki::Leaf;
use crate::common::{reserved_port, HeldPort};
use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use http::{Request, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// A TLS 1.3 client config for `h3` trusting `ca`, with `auth`'s certificate if given.
pub fn client_tls(ca: &str, auth: Option<&Leaf>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match auth {
        Some(leaf) => {
            let chain = CertificateDer::pem_file_iter(&leaf.cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&leaf.key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    cfg
}

/// The peer stopped our sending side with `H3_NO_ERROR`: it has what it needs and its
/// response is (or will be) complete. RFC 9114 §4.1: a client must not discard that
/// response, so the request is not failed for it.
pub fn stopped_without_error(e: &StreamError) -> bool {
    matches!(e, StreamError::RemoteTerminate { code, .. } if *code == Code::H3_NO_ERROR)
}

/// A QUIC connection to `addr` (server name `localhost`), handshake done, no HTTP/3 yet.
pub async fn quic_connect(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connecting = endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?;
    let quic = tokio::time::timeout(Duration::from_secs(2), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    Ok((endpoint, quic))
}

/// A client HTTP/3 connection to `addr` (server name `localhost`).
pub struct H3Conn {
    pub send: H3Send,
    pub quic: quinn::Connection,
    pub _endpoint: quinn::Endpoint,
}

impl H3Conn {
    pub async fn open(addr: SocketAddr, tls: rustls::ClientConfig) -> Result<H3Conn, String> {
        let (endpoint, quic) = quic_connect(addr, tls).await?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Conn {
            send,
            quic,
            _endpoint: endpoint,
        })
    }

    /// The serial number of the certificate the server presented.
    pub fn server_serial(&self) -> Vec<u8> {
        let chain = self
            .quic
            .peer_identity()
            .unwrap()
            .downcast::<Vec<CertificateDer<'static>>>()
            .unwrap();
        spur_proxy::tls::der::serial(&chain[0]).unwrap().to_vec()
    }

    /// Sends a request whose body is `chunks`, and reads the whole response. A server that
    /// stops the request with `H3_NO_ERROR` (it answered without needing the rest) does
    /// not fail it; any other stop or reset does.
    pub async fn request(
        &self,
        req: Request<()>,
        chunks: Vec<Bytes>,
    ) -> Result<(Response<()>, Bytes), String> {
        let mut send = self.send.clone();
        let mut stream = send.send_request(req).await.map_err(|e| e.to_string())?;
        let mut stopped = false;
        for c in chunks {
            match stream.send_data(c).await {
                Ok(()) => {}
                Err(e) if stopped_without_error(&e) => {
                    stopped = true;
                    break;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if !stopped {
            match stream.finish().await {
                Ok(()) => {}
                Err(e) if stopped_without_error(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
            let n = chunk.remaining();
            body.extend_from_slice(&chunk.copy_to_bytes(n));
        }
        Ok((resp, Bytes::from(body)))
    }

    pub async fn get(&self, path: &str) -> Result<(Response<()>, Bytes), String> {
        let req = Request::get(format!("https://localhost{path}"))
            .body(())
            .unwrap();
        self.request(req, Vec::new()).await
    }
}

pub fn header<'a>(r: &'a Response<()>, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A port for a TCP and an `http3` listener side by side: TCP held by [`reserved_port`]
/// (the proxy's listener binds over it), UDP by the socket returned, which the test drops
/// just before its `http3` listener binds the port. Chosen by a TCP bind, which skips
/// ports a TIME-WAIT connection holds (a UDP bind does not, and the TCP listener then
/// failed with EADDRINUSE on a loaded machine); held, because a port chosen and let go
/// may be given to another test's socket before the proxy binds it (QUIC clients bind
/// UDP ports all the time).
pub fn tcp_and_udp_port() -> (HeldPort, std::net::UdpSocket) {
    for _ in 0..100 {
        let tcp = reserved_port();
        if let Ok(udp) = std::net::UdpSocket::bind(tcp.addr) {
            return (tcp, udp);
        }
    }
    panic!("no port free for both TCP and UDP");
}
