//! TLS and mutual TLS between sidecars, per the `tls` settings of listeners and clusters.
//!
//! - A listener with `tls` terminates TLS ([`ServerTls`]); with `client_ca` it requires a
//!   client certificate from that CA (mutual TLS). The client's SPIFFE ID (its URI SAN,
//!   [`Identity`]) becomes the connection's peer identity: logged, and sent upstream in
//!   `x-spur-peer-identity`.
//! - `allow_identities` on `tcp` listeners is checked in the handshake itself
//!   (`access_denied` alert): a byte stream has no other way to answer. Everywhere else it
//!   is a rule of the listener's authorization policy ([`crate::authorize`]), decided per
//!   request (403 `forbidden` with the request ID, which tells the caller what happened
//!   instead of a bare connection error) like any other rule.
//! - A cluster with `tls` originates TLS ([`ClientTlsRt`]), presenting `cert`/`key` when
//!   set, verifying the server against `ca` (or the system bundle) and, with
//!   `expect_identities`, its SPIFFE ID instead of its DNS name.
//! - A `tls` block that names no files uses the proxy's workload identity from the mesh CA
//!   ([`WorkloadIdentity`]): it presents the workload certificate and trusts the mesh CA,
//!   so a listener requires client certificates (mutual TLS) and a cluster presents one.
//! - Every certificate, key and CA file is re-read when it changes ([`files`]): new
//!   handshakes use the new material, established connections keep theirs.
//!
//! One crypto provider for the whole process: aws-lc-rs, passed explicitly to every config
//! builder ([`provider`]), so nothing depends on a process-wide default being installed.
//! Error messages name files and fields, never file content, so key material cannot leak
//! into logs, `/config` or API answers.

pub mod der;
pub mod files;
mod identity;
mod stream;
mod verify;
pub mod workload;

pub use files::{MaterialError, TlsError, RELOAD_INTERVAL};
pub use identity::{Identity, IdentityError};
pub use stream::Stream;
pub use workload::{CertifyError, Credential, WorkloadIdentity};

use files::{Built, Part, Source, Watched};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoClientAuth, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use spur_config::{ListenerProtocol, UpstreamProtocol};
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;

/// The process's one crypto provider (aws-lc-rs). The first call also installs it as the
/// process default, so that a library that builds its own rustls config without naming a
/// provider finds this one instead of panicking (it is a no-op if one is installed already).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            Arc::new(rustls::crypto::aws_lc_rs::default_provider())
        })
        .clone()
}

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
pub const ALPN_H3: &[u8] = b"h3";

/// A listener's TLS: the current server config (rebuilt when its files change).
pub struct ServerTls {
    config: Arc<Watched<ServerConfig>>,
}

/// A connection a TLS listener accepted.
pub struct Accepted {
    pub stream: Stream,
    /// The client certificate's SPIFFE ID, when it presented one that has one.
    pub peer: Option<Identity>,
}

impl ServerTls {
    /// Reads the files and builds the config; starts watching them for changes. For a
    /// proxy without a workload identity.
    pub fn load(
        listener: &str,
        cfg: &spur_config::ServerTls,
        protocol: ListenerProtocol,
    ) -> Result<ServerTls, TlsError> {
        ServerTls::load_with(listener, cfg, protocol, None)
    }

    /// [`ServerTls::load`]; without `cert`/`key` the listener presents `identity`'s
    /// certificate, and then without `client_ca` it requires client certificates from the
    /// mesh CA.
    pub fn load_with(
        listener: &str,
        cfg: &spur_config::ServerTls,
        protocol: ListenerProtocol,
        identity: Option<&Arc<WorkloadIdentity>>,
    ) -> Result<ServerTls, TlsError> {
        let listener: Arc<str> = listener.into();
        // tcp listeners check `allow_identities` in the certificate verifier; the others
        // through their authorization policy, per request.
        let handshake_allow: Arc<[Identity]> = if protocol == ListenerProtocol::Tcp {
            cfg.allow_identities.iter().cloned().collect()
        } else {
            Arc::from([])
        };
        let alpn: Vec<Vec<u8>> = match protocol {
            ListenerProtocol::Tcp => Vec::new(),
            ListenerProtocol::Http3 => vec![ALPN_H3.to_vec()],
            ListenerProtocol::Http => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
        };
        let mut sources = match (&cfg.cert, &cfg.key, identity) {
            (Some(cert), Some(key), _) => vec![Source::new("cert", cert), Source::new("key", key)],
            (None, None, Some(id)) => vec![
                Source::workload("cert", id, Part::Cert),
                Source::workload("key", id, Part::Key),
            ],
            (None, None, None) => return Err(TlsError::new("cert", MaterialError::NoIdentity)),
            (Some(_), None, _) => return Err(TlsError::new("key", MaterialError::Paired)),
            (None, Some(_), _) => return Err(TlsError::new("cert", MaterialError::Paired)),
        };
        match (&cfg.client_ca, identity) {
            (Some(ca), _) => sources.push(Source::new("client_ca", ca)),
            (None, Some(id)) if cfg.cert.is_none() => {
                sources.push(Source::workload("client_ca", id, Part::Ca))
            }
            (None, _) => {}
        }
        let (src, who) = (sources.clone(), listener.clone());
        let build = move |files: &[Vec<u8>]| -> Result<Built<ServerConfig>, TlsError> {
            let p = provider();
            let (key, summary) = certified_key(&src[0], &files[0], &src[1], &files[1], &p)?;
            let verifier: Arc<dyn ClientCertVerifier> = match (src.get(2), files.get(2)) {
                (Some(ca_src), Some(ca)) => {
                    let roots = roots(ca_src, ca)?;
                    let inner = WebPkiClientVerifier::builder_with_provider(roots, p.clone())
                        .build()
                        .map_err(|e| ca_src.invalid(format!("unusable as client CA: {e}")))?;
                    Arc::new(verify::ClientIdentityVerifier {
                        inner,
                        allow: handshake_allow.clone(),
                        listener: who.clone(),
                    })
                }
                _ => Arc::new(NoClientAuth),
            };
            let mut config = ServerConfig::builder_with_provider(p)
                .with_safe_default_protocol_versions()
                .map_err(|e| src[0].invalid(e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
            config.alpn_protocols = alpn.clone();
            Ok(Built { config, summary })
        };
        let config = Arc::new(Watched::load(
            format!("listener {listener}"),
            sources,
            Box::new(build),
        )?);
        Watched::watch(&config);
        Ok(ServerTls { config })
    }

    /// The server config new handshakes use now (it changes when the files rotate).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.current()
    }

    /// The verified peer's identity from its certificate chain (for TLS over TCP and over
    /// QUIC alike).
    pub fn peer_identity(&self, chain: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
        chain
            .and_then(|c| c.first())
            .and_then(|leaf| identity::from_cert(leaf))
    }

    /// The TLS handshake on an accepted connection, bounded by `timeout`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<Accepted, HandshakeError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.current());
        let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Err(_) => return Err(HandshakeError::Timeout),
            Ok(Err(e)) => return Err(HandshakeError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let peer = self.peer_identity(stream.get_ref().1.peer_certificates());
        Ok(Accepted {
            stream: Stream::Server(Box::new(stream)),
            peer,
        })
    }
}

/// A cluster's TLS: the current client config (rebuilt when its files change), the name to
/// verify and the protocols to offer.
pub struct ClientTlsRt {
    config: Arc<Watched<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
    alpn: Vec<Vec<u8>>,
}

impl ClientTlsRt {
    /// Reads the files and builds the config; starts watching them for changes. For a
    /// proxy without a workload identity.
    pub fn load(
        cluster: &str,
        cfg: &spur_config::ClientTls,
        protocol: UpstreamProtocol,
    ) -> Result<ClientTlsRt, TlsError> {
        ClientTlsRt::load_with(cluster, cfg, protocol, None)
    }

    /// [`ClientTlsRt::load`]; a block that names no files (no `ca`, `cert`, `key`) on a
    /// proxy with a workload identity presents its certificate and trusts the mesh CA. (On
    /// a proxy without one it verifies against the system CA bundle, as before: TLS to
    /// services outside the mesh.)
    pub fn load_with(
        cluster: &str,
        cfg: &spur_config::ClientTls,
        protocol: UpstreamProtocol,
        identity: Option<&Arc<WorkloadIdentity>>,
    ) -> Result<ClientTlsRt, TlsError> {
        let cluster: Arc<str> = cluster.into();
        let expect: Arc<[Identity]> = cfg.expect_identities.iter().cloned().collect();
        let no_files = cfg.ca.is_none() && cfg.cert.is_none() && cfg.key.is_none();
        let workload = identity.filter(|_| no_files);
        if workload.is_some() && expect.is_empty() {
            // Mesh certificates name a SPIFFE ID only, no DNS name to check.
            return Err(TlsError::new(
                "expect_identities",
                MaterialError::Invalid {
                    path: "(none)".into(),
                    what: "with the workload identity, list the SPIFFE IDs the servers may have (mesh certificates carry no DNS name)".into(),
                },
            ));
        }
        let server_name = cfg.server_name.as_ref().map(|n| n.get().clone());
        let ca = match (workload, &cfg.ca, files::system_ca_bundle()) {
            (Some(id), _, _) => Source::workload("ca", id, Part::Ca),
            (None, Some(ca), _) => Source::new("ca", ca),
            (None, None, Some(system)) => Source::new("ca", system),
            (None, None, None) => {
                return Err(TlsError::new(
                    "ca",
                    MaterialError::Invalid {
                        path: "(none)".into(),
                        what: "no ca given and no system CA bundle found".into(),
                    },
                ))
            }
        };
        let system_roots = cfg.ca.is_none() && workload.is_none();
        let mut sources = vec![ca];
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            sources.push(Source::new("cert", cert));
            sources.push(Source::new("key", key));
        } else if let Some(id) = workload {
            sources.push(Source::workload("cert", id, Part::Cert));
            sources.push(Source::workload("key", id, Part::Key));
        }
        let (src, label) = (sources.clone(), format!("cluster {cluster}"));
        let build = move |files: &[Vec<u8>]| -> Result<Built<ClientConfig>, TlsError> {
            let p = provider();
            let roots = if system_roots {
                system_roots_from(&src[0], &files[0])?
            } else {
                roots(&src[0], &files[0])?
            };
            let verifier: Arc<dyn ServerCertVerifier> =
                verify::server_verifier(roots, expect.clone(), p.clone(), cluster.clone())
                    .map_err(|e| src[0].invalid(format!("unusable as CA: {e}")))?;
            let builder = ClientConfig::builder_with_provider(p.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| src[0].invalid(e.to_string()))?
                // Not a shortcut: the verifier validates the chain (see verify.rs).
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let (config, summary) = if src.len() == 3 {
                let (key, summary) = certified_key(&src[1], &files[1], &src[2], &files[2], &p)?;
                (
                    builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key))),
                    summary,
                )
            } else {
                (
                    builder.with_no_client_auth(),
                    "no client certificate".to_string(),
                )
            };
            Ok(Built { config, summary })
        };
        let config = Arc::new(Watched::load(label, sources, Box::new(build))?);
        Watched::watch(&config);
        // What TCP connections offer; an http3 cluster's QUIC connections offer `h3` (see
        // `crate::quic::client`), and its TCP fallback is HTTP/2.
        let alpn = match protocol {
            UpstreamProtocol::Http1 => vec![ALPN_HTTP11.to_vec()],
            _ => vec![ALPN_H2.to_vec()],
        };
        Ok(ClientTlsRt {
            config,
            server_name,
            alpn,
        })
    }

    /// The client config new handshakes use now (it changes when the files rotate).
    pub fn current(&self) -> Arc<ClientConfig> {
        self.config.current()
    }

    /// The name to verify when connecting to `ip`: `server_name`, or the address itself.
    pub fn server_name_for(&self, ip: IpAddr) -> String {
        match &self.server_name {
            Some(ServerName::DnsName(n)) => n.as_ref().to_string(),
            Some(ServerName::IpAddress(a)) => IpAddr::from(*a).to_string(),
            _ => ip.to_string(),
        }
    }

    /// The TLS handshake on a new upstream connection to `ip`. `opaque` (a tcp listener's
    /// bytes) offers no ALPN protocol; HTTP offers the cluster's.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        ip: IpAddr,
        opaque: bool,
    ) -> Result<Stream, HandshakeError> {
        let name = self
            .server_name
            .clone()
            .unwrap_or(ServerName::IpAddress(ip.into()));
        let alpn = if opaque {
            Vec::new()
        } else {
            self.alpn.clone()
        };
        let connector = tokio_rustls::TlsConnector::from(self.config.current());
        let stream = connector
            .with_alpn(alpn)
            .connect(name, tcp)
            .await
            .map_err(HandshakeError::Io)?;
        Ok(Stream::Client(Box::new(stream)))
    }
}

/// The certificate chain and its key, checked to belong together; and the leaf's serial
/// for the log.
fn certified_key(
    cert_src: &Source,
    cert_pem: &[u8],
    key_src: &Source,
    key_pem: &[u8],
    p: &CryptoProvider,
) -> Result<(CertifiedKey, String), TlsError> {
    let chain: Vec<CertificateDer<'static>> = cert_src.certs(cert_pem)?;
    let serial = der::serial_hex(&chain[0]).unwrap_or_else(|| "?".into());
    let identity = identity::from_cert(&chain[0]);
    let key: PrivateKeyDer<'static> = key_src.key(key_pem)?;
    let certified = CertifiedKey::from_der(chain, key, p).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_src.invalid(format!(
            "does not match the certificate in {}",
            cert_src.path.display()
        )),
        // rustls describes an unusable key by its type, never its bytes.
        e => key_src.invalid(e.to_string()),
    })?;
    let summary = match identity {
        Some(id) => format!("serial {serial}, identity {id}"),
        None => format!("serial {serial}"),
    };
    Ok((certified, summary))
}

fn roots(src: &Source, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in src.certs(pem)? {
        roots
            .add(cert)
            .map_err(|e| src.invalid(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The system bundle holds hundreds of certificates, some in forms webpki refuses; keep the
/// usable ones.
fn system_roots_from(src: &Source, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(src.certs(pem)?);
    if added == 0 {
        return Err(src.invalid("no usable CA certificate"));
    }
    Ok(Arc::new(roots))
}

/// A failed TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Io(#[source] io::Error),
}

/// Which end of the handshake Spur was, for naming the reason of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl HandshakeError {
    /// A short reason for metrics: `no_client_cert`, `unknown_ca`, `expired`,
    /// `not_yet_valid`, `identity_not_allowed` (server) / `identity_not_expected` (client),
    /// `name_mismatch`, `bad_certificate`, `peer_alert` (the other end refused us),
    /// `protocol`, `timeout`, `eof`, `io`.
    pub fn reason(&self, role: Role) -> &'static str {
        let e = match self {
            HandshakeError::Timeout => return "timeout",
            HandshakeError::Io(e) => e,
        };
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return rustls_reason(tls, role);
        }
        match e.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        }
    }
}

fn rustls_reason(e: &rustls::Error, role: Role) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => "unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::ApplicationVerificationFailure if role == Role::Server => "identity_not_allowed",
            C::ApplicationVerificationFailure => "identity_not_expected",
            C::NotValidForName | C::NotValidForNameContext { .. } => "name_mismatch",
            _ => "bad_certificate",
        },
        rustls::Error::AlertReceived(_) => "peer_alert",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests;
