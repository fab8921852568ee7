//! Service-account tokens checked with the Kubernetes TokenReview API: how a pod proves
//! which workload it is (`spur control --ca-dir D --kubernetes`).
//!
//! A sidecar presents the projected ServiceAccount token the kubelet mounts into its pod
//! (audience `spur`, rotated by the kubelet). The control plane does not read the token
//! itself: it asks the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`,
//! audiences `[spur]`), which checks its signature, expiry, audience and that the pod and
//! service account still exist. An authenticated answer names the user
//! `system:serviceaccount:NS:SA`, and that alone decides the identity:
//! `spiffe://TD/ns/NS/sa/SA`. A token for another audience (the pod's default API token,
//! say) is refused, so a token leaked from one place is no key to the other.
//!
//! The control plane needs `create` on `tokenreviews` for this, and nothing more.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use spur_config::SpiffeId;
use std::time::Duration;

/// The audience sidecar tokens are minted for.
pub const AUDIENCE: &str = "spur";

/// How long one TokenReview may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The service account a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// `system:serviceaccount:NS:SA`, the user name the API gives a service account.
    pub fn from_username(username: &str) -> Option<ServiceAccount> {
        let rest = username.strip_prefix("system:serviceaccount:")?;
        let (namespace, name) = rest.split_once(':')?;
        let ok = |s: &str| spur_config::spiffe::valid_segment(s) && !s.contains(':');
        (ok(namespace) && ok(name)).then(|| ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// `spiffe://TD/ns/NS/sa/SA`.
    pub fn spiffe_id(&self, trust_domain: &str) -> Option<SpiffeId> {
        SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.name
        ))
        .ok()
    }
}

/// Why a token gave no service account.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server says the token is not valid (or not for audience `spur`): 401.
    #[error("{0}")]
    Rejected(String),
    /// Valid, but not a service account's: 403.
    #[error("{0}")]
    NotServiceAccount(String),
    /// The review itself failed (API unreachable, forbidden to us): 503, worth retrying.
    #[error("{0}")]
    Unavailable(String),
}

/// Asks the Kubernetes API about tokens.
#[derive(Clone)]
pub struct Reviewer {
    client: kube::Client,
}

impl Reviewer {
    pub fn new(client: kube::Client) -> Reviewer {
        Reviewer { client }
    }

    /// The service account `token` authenticates, for audience [`AUDIENCE`].
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let request = TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec {
                token: token.trim().to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            status: None,
        };
        let answer = tokio::time::timeout(TIMEOUT, api.create(&PostParams::default(), &request))
            .await
            .map_err(|_| ReviewError::Unavailable("the TokenReview API did not answer in 5 s".into()))?
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 403 => ReviewError::Unavailable(format!(
                    "the control plane may not create tokenreviews (its ClusterRole needs `create` on `tokenreviews`): {e}"
                )),
                _ => ReviewError::Unavailable(format!("TokenReview failed: {e}")),
            })?;
        let status = answer.status.ok_or_else(|| {
            ReviewError::Unavailable("the TokenReview answer has no status".into())
        })?;
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(ReviewError::Rejected(format!(
                "the Kubernetes API rejected the service account token: {why}"
            )));
        }
        if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
            return Err(ReviewError::Rejected(format!(
                "the service account token is not for audience `{AUDIENCE}` (mount a projected token with audience: {AUDIENCE})"
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        ServiceAccount::from_username(&username).ok_or_else(|| {
            ReviewError::NotServiceAccount(format!(
                "the token belongs to `{username}`, not to a service account"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_from_user_names() {
        let sa = ServiceAccount::from_username("system:serviceaccount:shop:web").unwrap();
        assert_eq!(
            sa.spiffe_id("cluster.local").unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        for bad in [
            "system:node:n1",
            "system:serviceaccount:shop",
            "system:serviceaccount:shop:web:x",
            "system:serviceaccount::web",
            "system:serviceaccount:..:web",
            "alice",
        ] {
            assert!(ServiceAccount::from_username(bad).is_none(), "{bad}");
        }
    }
}
