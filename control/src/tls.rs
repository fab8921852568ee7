//! HTTPS for the control API: `spur control --tls-cert FILE --tls-key FILE`.
//!
//! The files are read at start (a bad pair refuses to start, naming the file) and again
//! when either changes (checked when a connection arrives, at most once a second), so a
//! renewed certificate is served without a restart; a pair that fails to load then keeps
//! the previous one, with an error in the log. Error messages name files, never their
//! content.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub struct ApiTls {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<State>,
}

struct State {
    config: Arc<ServerConfig>,
    /// The files' modification times the config was built from.
    stamp: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ApiTls {
    pub fn load(cert: &Path, key: &Path) -> Result<ApiTls, String> {
        let config = build(cert, key)?;
        Ok(ApiTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new(State {
                config,
                stamp: stamp(cert, key),
                checked: Instant::now(),
            }),
        })
    }

    /// The config for a new connection: rebuilt first if the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut st = self.state.lock().unwrap();
        if st.checked.elapsed() >= Duration::from_secs(1) {
            st.checked = Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now != st.stamp {
                match build(&self.cert, &self.key) {
                    Ok(c) => {
                        st.config = c;
                        st.stamp = now;
                        tracing::info!(cert = %self.cert.display(), "control API certificate reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "control API certificate not reloaded: keeping the previous one")
                    }
                }
            }
        }
        st.config.clone()
    }
}

fn stamp(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(cert), m(key))
}

fn build(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let read = |p: &Path, flag: &str| {
        std::fs::read(p).map_err(|e| format!("{flag}: cannot read {}: {e}", p.display()))
    };
    let cert_pem = read(cert, "--tls-cert")?;
    let key_pem = read(key, "--tls-key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!(
                "--tls-cert: {} is not a PEM certificate chain",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!("--tls-cert: no certificate in {}", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("--tls-key: no PEM private key in {}", key.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "--tls-key: {} does not match the certificate in {}",
            key.display(),
            cert.display()
        ),
        e => format!("--tls-key: {}: {e}", key.display()),
    })?;
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
