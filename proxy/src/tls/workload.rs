//! Workload identity from the mesh CA: `spur proxy --sa-token-file PATH` (Kubernetes: the
//! pod's projected service-account token proves the identity, which the CA derives) or
//! `spur proxy --identity spiffe://… --join-token-file F` (a join token bound to identities).
//!
//! The proxy makes an ECDSA P-256 key pair in memory, sends a CSR (naming its SPIFFE ID as
//! the only SAN, when it knows it) with its credential to the control plane's
//! `POST /v1/identity/certify`, and
//! keeps the answer — its certificate, the key, and the mesh CA certificate — as one
//! [`Material`] behind an `ArcSwap`. TLS settings that name no files read that material
//! instead of files (see [`super::files::Source::workload`]); the one-second watcher that
//! rebuilds whole rustls configs when files change notices a renewal the same way, so new
//! handshakes present the new certificate and established connections keep theirs.
//!
//! Renewal happens at two thirds of the certificate's lifetime, with a fresh key each time,
//! asking for the identity the first certificate carried. A service-account token file is
//! read again for every request: the kubelet rotates it (its lifetime is an hour or so,
//! shorter than a certificate's), so the token sent is always the current one. A failed
//! renewal keeps the current certificate (still valid for a third of its life) and retries
//! with capped exponential backoff.
//!
//! Why the key stays in memory: it never needs to outlive the process (a restarted proxy
//! simply asks again), so it never touches disk, and nothing here formats it: errors and
//! logs name the identity, the CA URL and the certificate serial only. `Debug` is written
//! by hand for the same reason.

use super::{der, identity, Identity};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long one certify request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// The longest wait between two failed renewals.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One issued certificate with its key and the CA that signed it: swapped as a unit, so a
/// reader never pairs a new certificate with an old key.
pub struct Material {
    /// PEM: the workload certificate (leaf first).
    pub cert_pem: Vec<u8>,
    /// PEM PKCS#8: deliberately not `pub`, read only by the TLS config builders.
    pub(crate) key_pem: Vec<u8>,
    /// PEM: the mesh CA certificate, the trust anchor for peers.
    pub ca_pem: Vec<u8>,
    /// The leaf's serial, for logs (`aa:bb:…`).
    pub serial: String,
    /// Unix seconds, as the CA said.
    pub expires_at: u64,
    /// When it should be renewed: two thirds into its lifetime as seen by this process.
    renew_at: Instant,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What proves the proxy's identity to the mesh CA. `Debug` never shows a token.
#[derive(Clone)]
pub enum Credential {
    /// A join token (`--join-token-file`), bound on the CA to the identities it may obtain.
    JoinToken(String),
    /// A file holding a projected service-account token (`--sa-token-file`), read again
    /// for every request because the kubelet rotates it.
    ServiceAccountTokenFile(PathBuf),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::JoinToken(_) => f.write_str("JoinToken(..)"),
            Credential::ServiceAccountTokenFile(p) => {
                write!(f, "ServiceAccountTokenFile({})", p.display())
            }
        }
    }
}

impl Credential {
    /// The body field and token to send now.
    fn field(&self) -> Result<(&'static str, String), CertifyError> {
        match self {
            Credential::JoinToken(t) => Ok(("join_token", t.trim().to_string())),
            Credential::ServiceAccountTokenFile(path) => spur_config::read_token_file(path)
                .map(|t| ("sa_token", t))
                .map_err(|e| CertifyError::Local(format!("--sa-token-file: {e}"))),
        }
    }

    /// What a 401 refused, for its message.
    fn what(&self) -> &'static str {
        match self {
            Credential::JoinToken(_) => "join token",
            Credential::ServiceAccountTokenFile(_) => "service account token",
        }
    }
}

/// Why no certificate was obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// The CA answered 401: retrying cannot help.
    #[error("{what} refused (401) by the mesh CA at {url}: {message}")]
    Refused {
        what: &'static str,
        url: String,
        message: String,
    },
    /// The CA refused the request for another reason (4xx): retrying cannot help either.
    #[error("the mesh CA at {url} refused the request ({status}): {message}")]
    Rejected {
        url: String,
        status: u16,
        message: String,
    },
    /// Not reachable, timed out, 5xx, or an unusable answer: worth retrying.
    #[error("the mesh CA at {url} is unavailable: {message}")]
    Unavailable { url: String, message: String },
    /// A key, a CSR or a token file that cannot be made or read here.
    #[error("{0}")]
    Local(String),
    #[error("{0}")]
    Client(String),
}

impl CertifyError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, CertifyError::Unavailable { .. })
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    certificate: String,
    ca: String,
    expires_at: u64,
}

type HttpClient = crate::control_client::ControlClient;

/// This proxy's SPIFFE identity and its current certificate from the mesh CA.
pub struct WorkloadIdentity {
    id: Identity,
    /// `http://host:port` of the control plane, no trailing slash.
    control_url: String,
    credential: Credential,
    client: HttpClient,
    current: ArcSwap<Material>,
    /// Counts certificates obtained (1 after the first).
    generation: AtomicU64,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("id", &self.id)
            .field("control_url", &self.control_url)
            .field("serial", &self.current.load().serial)
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    /// Asks the mesh CA once for a certificate for `id` with a join token; on success
    /// starts renewing it in the background (for as long as the returned `Arc` lives,
    /// inside a Tokio runtime).
    pub async fn obtain(
        id: Identity,
        control_url: &str,
        join_token: &str,
    ) -> Result<Arc<WorkloadIdentity>, CertifyError> {
        let client = crate::control_client::client(None).map_err(CertifyError::Client)?;
        WorkloadIdentity::obtain_via(client, id, control_url, join_token).await
    }

    /// [`WorkloadIdentity::obtain`] through `client` (an HTTPS control plane's CA).
    pub async fn obtain_via(
        client: HttpClient,
        id: Identity,
        control_url: &str,
        join_token: &str,
    ) -> Result<Arc<WorkloadIdentity>, CertifyError> {
        let credential = Credential::JoinToken(join_token.to_string());
        WorkloadIdentity::obtain_as(client, control_url, Some(id), credential).await
    }

    /// Asks the mesh CA once for a certificate, proving who this is with `credential`:
    /// for `want`, or (without it) for whatever identity the credential proves (a service
    /// account's). Renews it in the background for as long as the `Arc` lives.
    pub async fn obtain_as(
        client: HttpClient,
        control_url: &str,
        want: Option<Identity>,
        credential: Credential,
    ) -> Result<Arc<WorkloadIdentity>, CertifyError> {
        let control_url = control_url.trim_end_matches('/').to_string();
        let (id, material) = certify(&client, &control_url, want.as_ref(), &credential).await?;
        let this = Arc::new(WorkloadIdentity {
            id,
            control_url,
            credential,
            client,
            current: ArcSwap::from_pointee(material),
            generation: AtomicU64::new(1),
        });
        tracing::info!(identity = %this.id, serial = %this.current.load().serial, "workload certificate obtained");
        tokio::spawn(renew_forever(Arc::downgrade(&this)));
        Ok(this)
    }

    /// [`WorkloadIdentity::obtain_via`] (a join token), retrying transient failures.
    pub async fn obtain_with_retry(
        client: HttpClient,
        id: Identity,
        control_url: &str,
        join_token: &str,
        limit: Duration,
    ) -> Result<Arc<WorkloadIdentity>, CertifyError> {
        let credential = Credential::JoinToken(join_token.to_string());
        WorkloadIdentity::obtain_as_with_retry(client, control_url, Some(id), credential, limit)
            .await
    }

    /// [`WorkloadIdentity::obtain_as`], retrying transient failures (CA unreachable, 5xx)
    /// with backoff for at most `limit`; a refused credential or request fails at once.
    pub async fn obtain_as_with_retry(
        client: HttpClient,
        control_url: &str,
        want: Option<Identity>,
        credential: Credential,
        limit: Duration,
    ) -> Result<Arc<WorkloadIdentity>, CertifyError> {
        let deadline = Instant::now() + limit;
        let mut attempt = 0;
        loop {
            let got = WorkloadIdentity::obtain_as(
                client.clone(),
                control_url,
                want.clone(),
                credential.clone(),
            )
            .await;
            match got {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    let wait =
                        backoff(attempt).min(deadline.saturating_duration_since(Instant::now()));
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "no workload certificate yet");
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// The current certificate, key and CA, consistent with each other.
    pub fn material(&self) -> Arc<Material> {
        self.current.load_full()
    }

    /// How many certificates this process has obtained (renewals included).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Gets a new certificate now and swaps it in. The TLS configs pick it up on their next
    /// reload tick.
    pub async fn renew(&self) -> Result<(), CertifyError> {
        let (_, m) = certify(
            &self.client,
            &self.control_url,
            Some(&self.id),
            &self.credential,
        )
        .await?;
        tracing::info!(identity = %self.id, serial = %m.serial, expires_at = m.expires_at, "workload certificate renewed");
        self.current.store(Arc::new(m));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// Capped exponential backoff with jitter (half to all of the cap).
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(10))
        .min(BACKOFF_MAX);
    let ms = cap.as_millis() as u64;
    Duration::from_millis(fastrand::u64(ms / 2..=ms))
}

/// Renews at two thirds of each certificate's lifetime until the identity is dropped.
async fn renew_forever(weak: Weak<WorkloadIdentity>) {
    let mut attempt = 0;
    loop {
        let Some(renew_at) = weak.upgrade().map(|w| w.current.load().renew_at) else {
            return;
        };
        tokio::time::sleep_until(renew_at.into()).await;
        loop {
            let Some(this) = weak.upgrade() else { return };
            match this.renew().await {
                Ok(()) => {
                    attempt = 0;
                    break;
                }
                Err(e) => {
                    let wait = backoff(attempt);
                    attempt += 1;
                    tracing::warn!(identity = %this.id, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "cannot renew the workload certificate; keeping the current one");
                    drop(this);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// One round trip to the CA: a new key, a CSR (for `want`, or naming no identity), the
/// answer checked; returns the identity the certificate carries with it.
async fn certify(
    client: &HttpClient,
    url: &str,
    want: Option<&Identity>,
    credential: &Credential,
) -> Result<(Identity, Material), CertifyError> {
    let local = |e: rcgen::Error| CertifyError::Local(format!("cannot make a key or CSR: {e}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(local)?;
    let mut params = CertificateParams::default();
    if let Some(id) = want {
        let uri = id.as_str().try_into().map_err(local)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(local)?;
    let (field, token) = credential.field()?;
    let mut body = serde_json::json!({ "csr": csr });
    body[field] = token.into();
    let body = body.to_string();
    let unavailable = |message: String| CertifyError::Unavailable {
        url: url.to_string(),
        message,
    };
    let req = Request::post(format!("{url}/v1/identity/certify"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| unavailable(format!("bad control URL: {e}")))?;
    let sent_at = (Instant::now(), SystemTime::now());
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
        .await
        .map_err(|_| unavailable("request timed out".into()))?
        .map_err(|e| unavailable(crate::control_client::error_chain(&e)))?;
    let status = resp.status();
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
        .await
        .map_err(|_| unavailable("answer timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?
        .to_bytes();
    if status != StatusCode::OK {
        let message = error_message(&bytes);
        return Err(match status.as_u16() {
            401 => CertifyError::Refused {
                what: credential.what(),
                url: url.to_string(),
                message,
            },
            s if status.is_client_error() => CertifyError::Rejected {
                url: url.to_string(),
                status: s,
                message,
            },
            s => unavailable(format!("answered {s}: {message}")),
        });
    }
    let answer: Answer = serde_json::from_slice(&bytes)
        .map_err(|e| unavailable(format!("unreadable answer: {e}")))?;
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| unavailable("the answer holds no PEM certificate".into()))?;
    let id = match (identity::from_cert(&leaf), want) {
        (Some(got), Some(want)) if got != *want => {
            return Err(unavailable(format!(
                "the certificate is not for {want} but {got}"
            )))
        }
        (Some(got), _) => got,
        (None, _) => return Err(unavailable("the certificate carries no SPIFFE ID".into())),
    };
    if CertificateDer::pem_slice_iter(answer.ca.as_bytes())
        .next()
        .and_then(Result::ok)
        .is_none()
    {
        return Err(unavailable("the answer holds no PEM CA certificate".into()));
    }
    let serial = der::serial_hex(&leaf).unwrap_or_else(|| "?".into());
    // The lifetime as this process measures it (from the request), so a skewed clock on
    // either side does not make it renew late.
    let issued = sent_at.1.duration_since(UNIX_EPOCH).unwrap_or_default();
    let life = Duration::from_secs(answer.expires_at).saturating_sub(issued);
    let material = Material {
        cert_pem: answer.certificate.into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
        ca_pem: answer.ca.into_bytes(),
        serial,
        expires_at: answer.expires_at,
        renew_at: sent_at.0 + life * 2 / 3,
    };
    Ok((id, material))
}

/// The message of a control-plane error answer (`{"errors":[{"message":…}]}`), or its text.
fn error_message(body: &[u8]) -> String {
    let doc: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    doc.as_ref()
        .and_then(|d| d["errors"][0]["message"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(200)
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert!(backoff(0) <= BACKOFF_BASE);
        assert!(backoff(40) <= BACKOFF_MAX && backoff(40) >= BACKOFF_MAX / 2);
    }

    #[test]
    fn error_messages_come_from_the_errors_array() {
        assert_eq!(
            error_message(br#"{"errors":[{"field":"join_token","message":"wrong"}]}"#),
            "wrong"
        );
        assert_eq!(error_message(b"plain\n"), "plain");
    }
}
