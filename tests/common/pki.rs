//! A test certificate authority: rcgen certificates written as PEM files to a temp dir.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A test CA and the certificates it issues, as PEM files in a temp dir.
pub struct Pki {
    pub dir: PathBuf,
    pub params: rcgen::CertificateParams,
    pub key: rcgen::KeyPair,
    pub ca_path: String,
}

/// Paths of a certificate and its key.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spur-mtls-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("spur test CA {tag}"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca_path = dir.join("ca.crt").display().to_string();
        std::fs::write(&ca_path, cert.pem()).unwrap();
        Pki {
            dir,
            params,
            key,
            ca_path,
        }
    }

    /// A workload certificate: DNS `localhost`, IP 127.0.0.1 and (if given) a SPIFFE URI
    /// SAN; usable for client and server auth.
    pub fn issue(&self, name: &str, spiffe: Option<&str>, serial: u64) -> Leaf {
        self.issue_with(name, spiffe, serial, |_| {})
    }

    pub fn issue_with(
        &self,
        name: &str,
        spiffe: Option<&str>,
        serial: u64,
        adjust: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if let Some(uri) = spiffe {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(uri).unwrap(),
            ));
        }
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        adjust(&mut params);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{name}.crt")).display().to_string(),
            key: self.dir.join(format!("{name}.key")).display().to_string(),
        };
        write_atomically(&leaf.cert, &cert.pem());
        write_atomically(&leaf.key, &key.serialize_pem());
        leaf
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a temp file beside `path`, then renames it over `path`, as certificate tooling
/// does.
pub fn write_atomically(path: &str, content: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
