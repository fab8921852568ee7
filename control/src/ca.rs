//! The mesh CA: with `--ca-dir`, the control plane holds a root CA and signs short-lived
//! workload certificates, so a mesh needs no outside CA to start.
//!
//! `POST /v1/identity/certify` takes a PKCS#10 CSR whose URI SAN is the requested SPIFFE ID
//! and the join token; it answers a certificate for exactly that identity (nothing else
//! the CSR asks for is copied: no other names, no CA rights), valid for the configured
//! lifetime (default 24 h), usable for both client and server authentication. The private
//! key never leaves the proxy: only its public half comes in the CSR.
//!
//! The CA key is created on first start (`ca.key`, mode 0600, and `ca.crt` under the CA
//! directory) and loaded afterwards, so certificates stay valid across restarts.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {message}")]
    Dir { path: String, message: String },
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
            let key =
                KeyPair::generate().map_err(|e| dir_err(dir, format!("cannot make a key: {e}")))?;
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
                .map_err(|e| dir_err(dir, format!("cannot sign the CA: {e}")))?;
            write_private(&key_path, &key.serialize_pem()).map_err(|e| dir_err(&key_path, e))?;
            std::fs::write(&crt_path, cert.pem()).map_err(|e| dir_err(&crt_path, e))?;
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

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Signs a CSR for the SPIFFE ID it names, in this CA's trust domain.
    pub fn certify(&self, csr_pem: &str) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CaError::Request(format!("not a valid PEM certificate signing request: {e}"))
        })?;
        let ids: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str().to_string()),
                _ => None,
            })
            .collect();
        let [identity] = ids.as_slice() else {
            return Err(CaError::Request(
                "the CSR must carry exactly one URI SAN: the SPIFFE ID".into(),
            ));
        };
        let prefix = format!("spiffe://{}/", self.trust_domain);
        if !identity.starts_with(&prefix)
            || identity.len() == prefix.len()
            || identity.contains(char::is_whitespace)
        {
            return Err(CaError::Request(format!(
                "`{identity}` is not a SPIFFE ID of trust domain `{}` (spiffe://{}/...)",
                self.trust_domain, self.trust_domain
            )));
        }
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
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
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
        let issued = ca
            .certify(&csr_for("spiffe://cluster.local/ns/shop/sa/web"))
            .unwrap();
        assert!(issued
            .certificate_pem
            .starts_with("-----BEGIN CERTIFICATE-----"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(issued.expires_at.abs_diff(now + 3600) < 5);
        assert!(ca
            .certify(&csr_for("spiffe://evil.example/ns/shop/sa/web"))
            .is_err());
        assert!(ca.certify("not a csr").is_err());
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
