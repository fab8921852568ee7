//! The proxy's HTTP client for the control plane (config watch, status reports, the mesh
//! CA): plain HTTP for `--control http://…`, or HTTPS for `--control https://…`, where the
//! control plane's certificate must chain to `--control-ca FILE` (else to the system CA
//! bundle) and be valid for the URL's host.

use crate::tls::Stream;
use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub type ControlClient = Client<ControlConnector, Full<Bytes>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP, then TLS for `https` URLs.
#[derive(Clone)]
pub struct ControlConnector {
    http: HttpConnector,
    /// Why there is none when no CA could be loaded: `https` URLs then fail with it.
    tls: Result<Arc<rustls::ClientConfig>, Arc<str>>,
}

/// A client for the control plane. `ca`: the PEM bundle its certificate must chain to
/// (`--control-ca`); without it, the system bundle. Fails only on a `ca` that cannot be
/// read or holds no usable certificate.
pub fn client(ca: Option<&Path>) -> Result<ControlClient, String> {
    let tls = match ca {
        Some(path) => Ok(tls_config(path)?),
        None => match crate::tls::files::system_ca_bundle().map(tls_config) {
            Some(r) => r.map_err(Arc::from),
            None => Err("no system CA bundle found: give --control-ca FILE".into()),
        },
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    Ok(Client::builder(TokioExecutor::new()).build(ControlConnector { http, tls }))
}

fn tls_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("--control-ca: cannot read {shown}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("--control-ca: {shown} is not PEM: {e}"))?;
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("--control-ca: no usable CA certificate in {shown}"));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl tower_service::Service<Uri> for ControlConnector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string());
        let connecting = self.http.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            if !https {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            }
            let tls = tls.map_err(|why| why.to_string())?;
            let name = ServerName::try_from(host.unwrap_or_default())
                .map_err(|_| "the control URL has no valid host name")?;
            let stream = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            .map_err(|_| "TLS handshake with the control plane timed out")?
            .map_err(|e| format!("TLS handshake with the control plane failed: {e}"))?;
            Ok(TokioIo::new(Stream::Client(Box::new(stream))))
        })
    }
}

/// An error and its causes, `a: b: c`: hyper's client errors say only "client error
/// (Connect)" at the top, the reason (refused, TLS) is in the chain.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
