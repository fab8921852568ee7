//! Certificate, key and CA files: reading them with errors that name the file and never its
//! content, and re-reading them while the proxy runs.
//!
//! Rotation works by polling. Once a second a background task reads every file a TLS
//! setting names; when their bytes changed it builds a complete new rustls config from them
//! and swaps it in. New handshakes take the config current at accept (or connect) time;
//! established connections keep the one they started with, so nothing is cut off.
//!
//! Why polling rather than inotify: certificate tooling replaces files by renaming a new
//! file over the old one (cert-manager, Kubernetes secret volumes swap a `..data` symlink),
//! which a watch on the old inode misses, and a one-second poll of a few kilobytes costs
//! nothing. Why a whole config rather than a certificate resolver: the certificate, its key
//! and the CA bundle change together, and one swap keeps them consistent; a half-replaced
//! pair (new certificate, old key) fails the key/certificate match, is not swapped in, and is
//! retried on the next tick, by which time the writer has usually finished.
//!
//! A TLS setting that names no files uses the proxy's workload identity instead
//! ([`Source::workload`]): its sources read the current certificate, key and mesh CA from
//! memory, so a renewal changes their bytes and is picked up by the same poll and swap.
//!
//! The task holds only a `Weak` reference: when the snapshot that owns the TLS setting is
//! replaced and dropped, the task ends on its next tick.

use super::workload::{Material, WorkloadIdentity};
use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often TLS files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A problem with one TLS file. Messages name the file, never its content: a key file's
/// bytes must not reach a log line, `/config` or an API answer.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key in the file (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("{path}: not a valid PEM file ({what})")]
    Pem { path: String, what: &'static str },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("no file given and this proxy has no workload identity (start it with --identity)")]
    NoIdentity,
    #[error("cert and key go together")]
    Paired,
}

/// A [`MaterialError`] and the config field it is about (`cert`, `key`, `client_ca`, `ca`,
/// `server_name`, `allow_identities[0]`...), so the caller can report the field's path.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {error}")]
pub struct TlsError {
    pub field: String,
    pub error: MaterialError,
}

impl TlsError {
    pub fn new(field: impl Into<String>, error: MaterialError) -> TlsError {
        TlsError {
            field: field.into(),
            error,
        }
    }
}

/// Which part of the workload identity's material a [`Source`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
    Ca,
}

/// One file a TLS setting reads, and the config field that names it; or, for a setting that
/// names no files, one part of the workload identity.
#[derive(Clone, Debug)]
pub struct Source {
    pub field: &'static str,
    /// The file; for the workload identity a description used in messages only.
    pub path: PathBuf,
    workload: Option<(Arc<WorkloadIdentity>, Part)>,
}

impl Source {
    pub fn new(field: &'static str, path: impl Into<PathBuf>) -> Source {
        Source {
            field,
            path: path.into(),
            workload: None,
        }
    }

    /// `part` of the workload identity's current material, in place of a file.
    pub fn workload(field: &'static str, id: &Arc<WorkloadIdentity>, part: Part) -> Source {
        let what = match part {
            Part::Cert => "certificate",
            Part::Key => "key",
            Part::Ca => "mesh CA",
        };
        Source {
            field,
            path: format!("(workload identity {}: {what})", id.identity()).into(),
            workload: Some((id.clone(), part)),
        }
    }

    fn read(&self, material: &mut Option<Arc<Material>>) -> Result<Vec<u8>, TlsError> {
        if let Some((id, part)) = &self.workload {
            // One load per read of all sources, so certificate and key come from the same
            // issue even when a renewal lands in between.
            let m = material.get_or_insert_with(|| id.material());
            return Ok(match part {
                Part::Cert => m.cert_pem.clone(),
                Part::Key => m.key_pem.clone(),
                Part::Ca => m.ca_pem.clone(),
            });
        }
        std::fs::read(&self.path).map_err(|source| {
            TlsError::new(
                self.field,
                MaterialError::Read {
                    path: self.path.display().to_string(),
                    source,
                },
            )
        })
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }

    /// Every certificate in the file, in order (leaf first for a chain).
    pub fn certs(&self, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.pem_error(e))?;
        if certs.is_empty() {
            return Err(TlsError::new(
                self.field,
                MaterialError::NoCertificate {
                    path: self.display(),
                },
            ));
        }
        Ok(certs)
    }

    /// The first private key in the file.
    pub fn key(&self, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::new(
                self.field,
                MaterialError::NoKey {
                    path: self.display(),
                },
            ),
            e => self.pem_error(e),
        })
    }

    /// A PEM error, described without the bytes some variants carry.
    fn pem_error(&self, e: pem::Error) -> TlsError {
        let what = match e {
            pem::Error::MissingSectionEnd { .. } => "a section has no END line",
            pem::Error::IllegalSectionStart { .. } => "malformed BEGIN line",
            pem::Error::Base64Decode(_) => "bad base64",
            pem::Error::SectionTooLarge => "section too large",
            _ => "unreadable",
        };
        TlsError::new(
            self.field,
            MaterialError::Pem {
                path: self.display(),
                what,
            },
        )
    }

    pub fn invalid(&self, what: impl Into<String>) -> TlsError {
        TlsError::new(
            self.field,
            MaterialError::Invalid {
                path: self.display(),
                what: what.into(),
            },
        )
    }
}

/// What a build step makes from the files: the config, and a line for the log (the leaf
/// certificate's serial) when it is swapped in.
pub struct Built<C> {
    pub config: C,
    pub summary: String,
}

type BuildFn<C> = dyn Fn(&[Vec<u8>]) -> Result<Built<C>, TlsError> + Send + Sync;

/// A config built from files and rebuilt when they change.
pub struct Watched<C> {
    /// `listener inbound`, `cluster checkout`: for log lines.
    label: String,
    sources: Vec<Source>,
    build: Box<BuildFn<C>>,
    current: ArcSwap<C>,
    fingerprint: AtomicU64,
}

impl<C: Send + Sync + 'static> Watched<C> {
    /// Reads every source and builds the first config; an error names the field.
    pub fn load(
        label: String,
        sources: Vec<Source>,
        build: Box<BuildFn<C>>,
    ) -> Result<Watched<C>, TlsError> {
        let files = read_all(&sources)?;
        let built = build(&files)?;
        Ok(Watched {
            label,
            fingerprint: AtomicU64::new(fingerprint(&files)),
            current: ArcSwap::from_pointee(built.config),
            sources,
            build,
        })
    }

    /// The config for a handshake starting now.
    pub fn current(&self) -> Arc<C> {
        self.current.load_full()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Re-reads the files; when their content changed, builds and swaps in a new config.
    /// Answers the new config's summary when it swapped one in.
    pub fn reload(&self) -> Result<Option<String>, TlsError> {
        let files = read_all(&self.sources)?;
        let fp = fingerprint(&files);
        if fp == self.fingerprint.load(Ordering::Acquire) {
            return Ok(None);
        }
        let built = (self.build)(&files)?;
        self.current.store(Arc::new(built.config));
        self.fingerprint.store(fp, Ordering::Release);
        Ok(Some(built.summary))
    }

    /// Starts the background task that calls [`Watched::reload`] every
    /// [`RELOAD_INTERVAL`] for as long as `this` is alive. Outside a Tokio runtime (a
    /// config compiled only to be checked) there is nothing to watch for.
    pub fn watch(this: &Arc<Watched<C>>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(poll(Arc::downgrade(this)));
    }
}

async fn poll<C: Send + Sync + 'static>(weak: Weak<Watched<C>>) {
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // The last failure logged, so that a file that stays broken is reported once.
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let Some(this) = weak.upgrade() else { return };
        let label = this.label.clone();
        let outcome = tokio::task::spawn_blocking(move || this.reload()).await;
        match outcome {
            Ok(Ok(Some(summary))) => {
                last_error = None;
                tracing::info!(what = %label, %summary, "TLS certificate files reloaded");
            }
            Ok(Ok(None)) => last_error = None,
            Ok(Err(e)) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(what = %label, error = %msg, "TLS files changed but cannot be used; keeping the previous ones");
                    last_error = Some(msg);
                }
            }
            Err(e) => tracing::warn!(what = %label, error = %e, "TLS reload task failed"),
        }
    }
}

fn read_all(sources: &[Source]) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut material = None;
    sources.iter().map(|s| s.read(&mut material)).collect()
}

fn fingerprint(files: &[Vec<u8>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// The system's CA bundle, for clusters that name no `ca`: the first of the usual places.
pub fn system_ca_bundle() -> Option<&'static Path> {
    [
        "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine
        "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
        "/etc/ssl/cert.pem",                  // macOS, some BSDs
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.is_file())
}
