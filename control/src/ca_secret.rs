//! The mesh CA with `--store kubernetes`: its key and certificate live in the Secret
//! `spur-mesh-ca` of the store's namespace, which every replica reads at start, so every
//! replica signs with the same CA and the CA outlives any one pod.
//!
//! The first replica to start without the Secret makes the CA and creates it; replicas
//! racing to do so all end up with the one whose create succeeded (the others get 409
//! AlreadyExists and read it). Keys: `ca.key`, `ca.crt` (the signing CA) and the optional
//! `trust.crt` (more trust anchors handed out with every certificate: the other CA while
//! the CA is rotated, see docs/control-plane.md). A Secret that lacks `ca.key` or `ca.crt`
//! is an error, never overwritten.

use crate::ca::{CaError, MeshCa};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use std::time::Duration;

pub const SECRET: &str = "spur-mesh-ca";

fn err(ns: &str, message: impl ToString) -> CaError {
    CaError::Load {
        origin: format!("Secret {ns}/{SECRET}"),
        message: message.to_string(),
    }
}

fn field(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Loads the CA from the Secret, or makes it and creates the Secret.
pub async fn open(
    client: kube::Client,
    ns: &str,
    trust_domain: &str,
    ttl: Duration,
) -> Result<MeshCa, CaError> {
    let api: Api<Secret> = Api::namespaced(client, ns);
    let secret = match api.get_opt(SECRET).await.map_err(|e| err(ns, e))? {
        Some(s) => s,
        None => {
            let (key, cert) = MeshCa::generate(trust_domain).map_err(|e| err(ns, e))?;
            let data = [
                ("ca.key".to_string(), ByteString(key.into_bytes())),
                ("ca.crt".to_string(), ByteString(cert.into_bytes())),
            ];
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(SECRET.into()),
                    labels: Some(
                        [(
                            crate::store::kube::MANAGED_BY.to_string(),
                            crate::store::kube::MANAGER.to_string(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                data: Some(data.into()),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(s) => {
                    tracing::info!(namespace = ns, "created the mesh CA in Secret {SECRET}");
                    s
                }
                // Another replica made it first: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    api.get(SECRET).await.map_err(|e| err(ns, e))?
                }
                Err(e) => return Err(err(ns, e)),
            }
        }
    };
    let (Some(key), Some(cert)) = (field(&secret, "ca.key"), field(&secret, "ca.crt")) else {
        return Err(err(ns, "needs the keys ca.key and ca.crt (PEM)"));
    };
    let trust = field(&secret, "trust.crt").unwrap_or_default();
    MeshCa::from_pem(
        &key,
        &cert,
        &trust,
        trust_domain,
        ttl,
        &format!("Secret {ns}/{SECRET}"),
    )
}
