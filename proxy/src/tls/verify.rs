//! Certificate verifiers that add SPIFFE identity checks to webpki's chain validation.
//!
//! webpki checks that a certificate chains to a trusted root, is within its validity period
//! and is meant for the purpose (client or server auth), and for servers that it names the
//! host dialled as a DNS or IP SAN. It does not look at URI SANs, where SPIFFE identities
//! live. So:
//!
//! - [`ClientIdentityVerifier`] (server side) runs webpki's client verifier, then, when it
//!   enforces `allow_identities`, refuses a certificate whose SPIFFE ID is not listed.
//! - [`ServerIdentityVerifier`] (client side, for clusters with `expect_identities`) runs
//!   webpki's chain validation without the name check (a SPIFFE certificate may carry no DNS
//!   name at all), then requires the server's SPIFFE ID to be one of those expected.
//!
//! A refused identity is `CertificateError::ApplicationVerificationFailure`, which rustls
//! sends as an `access_denied` alert and [`super::reason`] reports as `identity_not_allowed`
//! (server side) or `identity_not_expected` (client side).
//!
//! Both verifiers also refuse a certificate with more than one URI SAN, whatever the lists
//! say: an X.509-SVID carries exactly one, and with several the identity would depend on
//! their order (`[web, admin]` passing as `web` where `[admin, web]` fails). That refusal
//! is a `bad_certificate` alert, counted as `bad_certificate`.

use super::{identity, Identity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::SignatureScheme;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore};
use std::sync::Arc;

fn identity_refused() -> Error {
    Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Why a certificate with several URI SANs is refused.
#[derive(Debug)]
struct SeveralUriSans(usize);

impl std::fmt::Display for SeveralUriSans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the certificate has {} URI SANs; a SPIFFE certificate has exactly one",
            self.0
        )
    }
}

impl std::error::Error for SeveralUriSans {}

/// Refuses a certificate with more than one URI SAN (see the module documentation).
fn one_uri_san_at_most(end_entity: &CertificateDer<'_>, peer: &str) -> Result<(), Error> {
    let n = super::der::uri_sans(end_entity).len();
    if n > 1 {
        tracing::debug!(
            peer,
            uri_sans = n,
            "certificate with several URI SANs refused"
        );
        return Err(Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(SeveralUriSans(n))),
        )));
    }
    Ok(())
}

/// Client certificates: webpki's verifier, then the peer's SPIFFE ID against the allowed
/// list (when the list is enforced at the handshake).
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    /// Empty: any identity (or none) passes.
    pub allow: Arc<[Identity]>,
    pub listener: Arc<str>,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        one_uri_san_at_most(end_entity, &self.listener)?;
        if !self.allow.is_empty() {
            let id = identity::from_cert(end_entity);
            if !id.as_ref().is_some_and(|id| self.allow.contains(id)) {
                tracing::debug!(
                    listener = &*self.listener,
                    identity = id.as_ref().map_or("-", |i| i.as_str()),
                    "client identity not allowed"
                );
                return Err(identity_refused());
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server certificates when the cluster expects SPIFFE identities: chain validation without
/// a name check, then the server's SPIFFE ID against `expect`.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    pub roots: Arc<RootCertStore>,
    pub expect: Arc<[Identity]>,
    pub provider: Arc<CryptoProvider>,
    pub cluster: Arc<str>,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        one_uri_san_at_most(end_entity, &self.cluster)?;
        let id = identity::from_cert(end_entity);
        if !id.as_ref().is_some_and(|id| self.expect.contains(id)) {
            tracing::debug!(
                cluster = &*self.cluster,
                identity = id.as_ref().map_or("-", |i| i.as_str()),
                "server identity not expected"
            );
            return Err(identity_refused());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server verifier for a cluster: SPIFFE identities when it expects some, else
/// webpki's standard one (chain and server name).
pub fn server_verifier(
    roots: Arc<RootCertStore>,
    expect: Arc<[Identity]>,
    provider: Arc<CryptoProvider>,
    cluster: Arc<str>,
) -> Result<Arc<dyn ServerCertVerifier>, rustls::client::VerifierBuilderError> {
    if expect.is_empty() {
        let v = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        Ok(v)
    } else {
        Ok(Arc::new(ServerIdentityVerifier {
            roots,
            expect,
            provider,
            cluster,
        }))
    }
}
