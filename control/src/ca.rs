//! The mesh CA: with `--ca-dir`, the control plane holds a root CA and signs short-lived
//! workload certificates, so a mesh needs no outside CA to start.
//!
//! This module signs; [`crate::certify`] decides who may have which identity. What a
//! certificate carries is fixed here, whatever the CSR asks for: exactly one SAN, the URI
//! of the SPIFFE ID granted; `CA:FALSE`; key usage `digitalSignature` only; extended key
//! usages `serverAuth` and `clientAuth`; a lifetime of `--cert-ttl` (default 24 h). A CSR
//! asking for a CA, other key usages, DNS names or any other extension gets none of them:
//! only its public key and its one URI SAN are read. A CSR with more than one URI SAN, or
//! one that is not a canonical SPIFFE ID of this trust domain ([`spur_config::SpiffeId`]:
//! no dot segments, escapes, queries, empty segments; at most 2048 bytes), is refused.
//! The private key never leaves the proxy: only its public half comes in the CSR.
//!
//! The CA key is created on first start (`ca.key`, mode 0600, and `ca.crt` under the CA
//! directory) and loaded afterwards, so certificates stay valid across restarts.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use spur_config::SpiffeId;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {message}")]
    Dir { path: String, message: String },
    #[error("{origin}: {message}")]
    Load { origin: String, message: String },
    #[error("{0}")]
    Request(String),
}

pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    trust_domain: String,
    ttl: Duration,
}

/// A signed workload certificate.
pub struct Issued {
    pub certificate_pem: String,
    pub ca_pem: String,
    pub expires_at: u64,
}

fn dir_err(path: &Path, message: impl ToString) -> CaError {
    CaError::Dir {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

impl MeshCa {
    /// Loads the CA from `dir`, or creates it there.
    pub fn open(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<MeshCa, CaError> {
        std::fs::create_dir_all(dir).map_err(|e| dir_err(dir, e))?;
        let key_path = dir.join("ca.key");
        let crt_path = dir.join("ca.crt");
        if !key_path.exists() {
            let (key, cert) = MeshCa::generate(trust_domain).map_err(|e| dir_err(dir, e))?;
            write_private(&key_path, &key).map_err(|e| dir_err(&key_path, e))?;
            std::fs::write(&crt_path, cert).map_err(|e| dir_err(&crt_path, e))?;
            tracing::info!(dir = %dir.display(), "created the mesh CA");
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| dir_err(&key_path, e))?;
        let ca_pem = std::fs::read_to_string(&crt_path).map_err(|e| dir_err(&crt_path, e))?;
        // Never echo key material: the error says only that the file is unusable.
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|_| dir_err(&key_path, "not a usable private key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|_| dir_err(&crt_path, "not a usable CA certificate"))?;
        Ok(MeshCa {
            issuer,
            ca_pem,
            trust_domain: trust_domain.to_string(),
            ttl,
        })
    }

    /// A new root CA for `trust_domain`: its private key and its certificate, as PEM.
    pub fn generate(trust_domain: &str) -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Spur mesh CA ({trust_domain})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("cannot sign the CA: {e}"))?;
        Ok((key.serialize_pem(), cert.pem()))
    }

    /// The CA from its key and certificate (PEM; `origin` names where they came from in
    /// errors). `extra_trust`: more trust anchors handed to workloads with every
    /// certificate (the other CA while it is rotated; see docs/control-plane.md).
    pub fn from_pem(
        key_pem: &str,
        cert_pem: &str,
        extra_trust: &str,
        trust_domain: &str,
        ttl: Duration,
        origin: &str,
    ) -> Result<MeshCa, CaError> {
        let err = |m: &str| CaError::Load {
            origin: origin.to_string(),
            message: m.to_string(),
        };
        // Never echo key material: the error says only that it is unusable.
        let key = KeyPair::from_pem(key_pem).map_err(|_| err("not a usable private key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|_| err("not a usable CA certificate"))?;
        let mut ca_pem = cert_pem.trim_end().to_string();
        ca_pem.push('\n');
        if !extra_trust.trim().is_empty() {
            ca_pem.push_str(extra_trust.trim_end());
            ca_pem.push('\n');
        }
        Ok(MeshCa {
            issuer,
            ca_pem,
            trust_domain: trust_domain.to_string(),
            ttl,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Reads a CSR: its signature must verify (the requester holds the key), and it may
    /// ask for at most one URI SAN, a canonical SPIFFE ID of this trust domain. Every other
    /// thing it asks for is ignored.
    pub fn read_csr(&self, csr_pem: &str) -> Result<Csr, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::Request(format!("not a valid PEM certificate signing request: {e}"))
        })?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            })
            .collect();
        let requested = match uris[..] {
            [] => None,
            [uri] => {
                let id = SpiffeId::parse(uri).map_err(|e| CaError::Request(e.to_string()))?;
                if id.trust_domain() != self.trust_domain || id.path().is_empty() {
                    return Err(CaError::Request(format!(
                        "`{id}` is not a SPIFFE ID of trust domain `{td}` (spiffe://{td}/...)",
                        td = self.trust_domain
                    )));
                }
                Some(id)
            }
            _ => {
                return Err(CaError::Request(format!(
                    "the CSR asks for {} URI SANs: a workload certificate has exactly one, its SPIFFE ID",
                    uris.len()
                )))
            }
        };
        Ok(Csr {
            public_key: csr.public_key,
            requested,
        })
    }

    /// Signs `csr`'s key for `identity` (which the caller has decided the requester may
    /// have), with the fixed contents described in the module documentation.
    pub fn sign(&self, csr: Csr, identity: &SpiffeId) -> Result<Issued, CaError> {
        let now = time::OffsetDateTime::now_utc();
        let not_after = now + time::Duration::seconds(self.ttl.as_secs() as i64);
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .as_str()
                .try_into()
                .map_err(|_| CaError::Request("bad URI".into()))?,
        )];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(&fastrand::u64(1..).to_be_bytes()));
        params.use_authority_key_identifier_extension = true;
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Request(format!("cannot sign: {e}")))?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            ca_pem: self.ca_pem.clone(),
            expires_at: not_after.unix_timestamp().max(0) as u64,
        })
    }
}

/// A CSR that passed [`MeshCa::read_csr`].
pub struct Csr {
    public_key: rcgen::PublicKey,
    /// The SPIFFE ID it asks for, if it names one.
    pub requested: Option<SpiffeId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_spiffe_ids_of_its_trust_domain_only() {
        let dir = std::env::temp_dir().join(format!("spur-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = MeshCa::open(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        let certify = |uri: &str| -> Result<Issued, CaError> {
            let csr = ca.read_csr(&csr_for(uri))?;
            let id = csr.requested.clone().unwrap();
            ca.sign(csr, &id)
        };
        let issued = certify("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert!(issued
            .certificate_pem
            .starts_with("-----BEGIN CERTIFICATE-----"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(issued.expires_at.abs_diff(now + 3600) < 5);
        for bad in [
            "spiffe://evil.example/ns/shop/sa/web",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/../sa/web",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns%2Fshop",
            "spiffe://cluster.local/ns//shop",
        ] {
            assert!(certify(bad).is_err(), "{bad}");
        }
        assert!(ca.read_csr("not a csr").is_err());
        // The same CA comes back after a restart.
        let again = MeshCa::open(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        assert_eq!(again.ca_pem(), ca.ca_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
