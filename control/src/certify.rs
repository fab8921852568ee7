//! `POST /v1/identity/certify`: who may have which identity. [`crate::ca`] signs; this
//! decides, from the credential in the request:
//!
//! - `{"csr": PEM, "sa_token": JWT}` (with `--kubernetes`): the token is checked with the
//!   TokenReview API ([`crate::token_review`]); the identity is that service account's,
//!   `spiffe://TD/ns/NS/sa/SA`, and nothing else. A CSR that names no ID gets it; a CSR
//!   naming another ID gets 403 and no certificate; a token the API rejects gets 401.
//! - `{"csr": PEM, "join_token": T}`: the token's pattern ([`crate::join`]) must cover the
//!   ID the CSR names (403 otherwise); a CSR without an ID gets the pattern's ID when the
//!   pattern is exact.
//!
//! Answers: 200 `{"certificate", "ca", "expires_at", "identity"}`; 400 for a malformed
//! body or CSR; 401 for a credential that proves nothing; 403
//! `{"errors":[{"path":"csr",...}]}` for an identity the credential does not cover; 503
//! when the TokenReview API cannot be asked (the proxy retries).

use crate::api::{error, error_free, read_body, Body};
use crate::ca::{Csr, MeshCa};
use crate::join::{self, JoinToken};
use crate::token_review::{ReviewError, Reviewer};
use crate::Control;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use spur_config::SpiffeId;
use std::sync::Arc;

/// The mesh CA and what proves an identity to it.
pub struct Authority {
    pub ca: MeshCa,
    /// `--join-tokens` (and `--join-token-file`, as a `spiffe://TD/*` token).
    pub join_tokens: Vec<JoinToken>,
    /// With `--kubernetes`: service-account tokens.
    pub reviewer: Option<Reviewer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertifyBody {
    /// A PEM PKCS#10 request; its one URI SAN, if any, is the SPIFFE ID wanted.
    csr: String,
    join_token: Option<String>,
    sa_token: Option<String>,
}

/// A refusal: status, field and message.
type Refusal = (StatusCode, &'static str, String);

pub async fn certify(control: &Arc<Control>, req: Request<Incoming>) -> Response<Body> {
    let Some(auth) = &control.ca else {
        return error(
            StatusCode::NOT_FOUND,
            "",
            "the mesh CA is off: start spur control with --ca-dir and --join-tokens, --join-token-file or --kubernetes",
        );
    };
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request: CertifyBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "", e.to_string()),
    };
    let csr = match auth.ca.read_csr(&request.csr) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, "csr", e.to_string()),
    };
    let granted = match (&request.join_token, &request.sa_token) {
        (Some(token), None) => by_join_token(auth, token, &csr),
        (None, Some(token)) => by_service_account(auth, token, &csr).await,
        _ => Err((
            StatusCode::BAD_REQUEST,
            "",
            "give one credential: `join_token` or `sa_token`".into(),
        )),
    };
    let (identity, by) = match granted {
        Ok(g) => g,
        Err((status, path, message)) => {
            if status == StatusCode::UNAUTHORIZED {
                control.metrics.unauthorized.inc();
            } else if status == StatusCode::FORBIDDEN {
                control.metrics.certify_forbidden.inc();
                let requested = csr.requested.as_ref().map_or("-", |i| i.as_str());
                tracing::warn!(requested, reason = %message, "certificate refused");
            }
            return error(status, path, message);
        }
    };
    match auth.ca.sign(csr, &identity) {
        Ok(issued) => {
            control.metrics.certificates_issued.inc();
            tracing::info!(identity = %identity, by, "workload certificate issued");
            error_free(json!({
                "certificate": issued.certificate_pem,
                "ca": issued.ca_pem,
                "expires_at": issued.expires_at,
                "identity": identity,
            }))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "csr", e.to_string()),
    }
}

/// The identity a join token grants for this CSR, and how it was proven (for the log).
fn by_join_token(auth: &Authority, token: &str, csr: &Csr) -> Result<(SpiffeId, String), Refusal> {
    let Some(pattern) = join::find(&auth.join_tokens, token) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "join_token",
            "wrong join token: nothing issued".into(),
        ));
    };
    let identity = match (&csr.requested, pattern.exact()) {
        (Some(id), _) => id.clone(),
        (None, Some(exact)) => exact.clone(),
        (None, None) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "csr",
                format!("the CSR names no SPIFFE ID, and this join token may obtain several ({pattern}): put the one wanted in the CSR's URI SAN"),
            ))
        }
    };
    if !pattern.covers(&identity) {
        return Err((
            StatusCode::FORBIDDEN,
            "csr",
            format!("this join token may obtain {pattern} only, not {identity}"),
        ));
    }
    Ok((identity, format!("join token for {pattern}")))
}

/// The identity a service-account token proves, if the CSR asks for it (or for nothing).
async fn by_service_account(
    auth: &Authority,
    token: &str,
    csr: &Csr,
) -> Result<(SpiffeId, String), Refusal> {
    let Some(reviewer) = &auth.reviewer else {
        return Err((
            StatusCode::BAD_REQUEST,
            "sa_token",
            "this control plane checks no service account tokens: start it with --kubernetes"
                .into(),
        ));
    };
    let sa = reviewer.review(token).await.map_err(|e| match e {
        ReviewError::Rejected(m) => (StatusCode::UNAUTHORIZED, "sa_token", m),
        ReviewError::NotServiceAccount(m) => (StatusCode::FORBIDDEN, "sa_token", m),
        ReviewError::Unavailable(m) => {
            tracing::error!(error = %m, "cannot check a service account token");
            (StatusCode::SERVICE_UNAVAILABLE, "sa_token", m)
        }
    })?;
    let Some(identity) = sa.spiffe_id(auth.ca.trust_domain()) else {
        return Err((
            StatusCode::FORBIDDEN,
            "sa_token",
            format!(
                "service account {}/{} makes no valid SPIFFE ID",
                sa.namespace, sa.name
            ),
        ));
    };
    if let Some(asked) = &csr.requested {
        if *asked != identity {
            return Err((
                StatusCode::FORBIDDEN,
                "csr",
                format!(
                    "the token is service account {}/{}, whose identity is {identity}; the CSR asks for {asked}",
                    sa.namespace, sa.name
                ),
            ));
        }
    }
    Ok((
        identity,
        format!("service account {}/{}", sa.namespace, sa.name),
    ))
}
