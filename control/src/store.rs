//! Versioned configs per group, kept by a [`Backend`] and served from memory.
//!
//! Two backends: [`dir`] (the default; one process, files under the data directory) and
//! [`kube`] (`--store kubernetes`: objects in the cluster, several replicas at once). Every
//! read (current, history, one version) is answered from this module's in-memory copy,
//! which the backend fills at start and keeps up to date: the directory backend loads its
//! files once (nothing else writes them); the Kubernetes backend watches its objects, so
//! a version written by another replica lands here too and is announced to this replica's
//! watchers ([`Store::subscribe`]).
//!
//! Versions count up per group from 1. A write names the version it makes (the newest
//! known plus one) and the backend refuses it with [`StoreError::Conflict`] when that
//! version exists already (another replica made it first): the caller catches up
//! ([`Store::catch_up`]) and tries again on the new newest version, so two replicas never
//! both make version N and no write is lost.
//!
//! History: nothing a user wrote is ever deleted (`put`, `rollback` and `flag` versions
//! stay). Versions made by Kubernetes discovery (the same config with new endpoints) are
//! kept up to [`KEEP_DISCOVERY`] per group, the newest; a cluster whose pods churn all day
//! would otherwise grow the history (and the control plane's memory) all day. Only the
//! leader makes discovery versions, so only the leader trims.
//!
//! Besides versions, a backend keeps small opaque documents per group ([`Store::save_doc`],
//! [`Store::load_docs`]): state that is not a config version, such as a rollout's progress.

pub mod dir;
pub mod kube;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spur_config::Config;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// One stored version of a group's config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Stored {
    pub version: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// What made this version: `put`, `rollback to N`, `flag NAME`, `discovery: ...`.
    pub action: String,
    /// The config as the user wrote it (`k8s:` clusters included).
    pub config: Config,
    /// The endpoints of its `k8s:` clusters when this version was made (Kubernetes
    /// discovery): proxies receive the config rendered with them
    /// ([`crate::k8s::render`]). Empty for configs without `k8s:` clusters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub discovered: crate::k8s::Discovered,
    /// The mesh rendered for the group when this version was made (`--mesh`): proxies
    /// receive `config` merged over it ([`crate::mesh::merge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<Arc<Config>>,
}

/// How many discovery-made versions each group keeps (the newest).
pub const KEEP_DISCOVERY: usize = 100;

/// Whether a version was made by Kubernetes discovery (and so may be pruned).
fn by_discovery(s: &Stored) -> bool {
    s.action.starts_with("discovery:")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write the data directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The version exists already: another replica wrote it first.
    #[error("version {version} of group `{group}` was written by another replica first")]
    Conflict { group: String, version: u64 },
    #[error("Kubernetes store: {0}")]
    Kubernetes(String),
}

/// Where versions and documents are kept. Every method may be called from any replica at
/// any time; [`Backend::create`] is the one that must be atomic across replicas.
pub trait Backend: Send + Sync + 'static {
    /// `dir` or `kubernetes`, as `/healthz` says.
    fn kind(&self) -> &'static str;
    /// Stores `stored` as version `stored.version` of `group`, or answers
    /// [`StoreError::Conflict`] when that version exists.
    fn create<'a>(
        &'a self,
        group: &'a str,
        stored: &'a Stored,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The versions of `group` newer than `after`, oldest first, as the backend has them.
    fn newer<'a>(
        &'a self,
        group: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Vec<Stored>, StoreError>>;
    /// Deletes these versions (trimming); a version already gone is not an error.
    fn remove<'a>(
        &'a self,
        group: &'a str,
        versions: &'a [u64],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Writes (replaces) the document `name` of `group`.
    fn save_doc<'a>(
        &'a self,
        group: &'a str,
        name: &'a str,
        doc: &'a Value,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Every document of `group`, by name.
    fn load_docs<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Value>, StoreError>>;
    /// Deletes the document `name` of `group` (gone already: not an error).
    fn remove_doc<'a>(
        &'a self,
        group: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

type Versions = BTreeMap<u64, Arc<Stored>>;

/// The in-memory copy of every group's versions, and the channels that announce each
/// group's newest version. Shared with the backend's change feed (Kubernetes watch).
#[derive(Default)]
pub struct Cache {
    groups: Mutex<HashMap<String, Versions>>,
    channels: Mutex<HashMap<String, watch::Sender<Option<Arc<Stored>>>>>,
    /// Whether the cache holds everything the backend had when it started.
    synced: AtomicBool,
}

impl Cache {
    /// Adds a version (a no-op when it is known); announces it when it is the newest.
    pub fn insert(&self, group: &str, stored: Arc<Stored>) {
        let newest = {
            let mut groups = self.groups.lock().unwrap();
            let versions = groups.entry(group.to_string()).or_default();
            if versions.contains_key(&stored.version) {
                return;
            }
            versions.insert(stored.version, stored.clone());
            versions.keys().next_back() == Some(&stored.version)
        };
        if newest {
            let mut channels = self.channels.lock().unwrap();
            let tx = channels
                .entry(group.to_string())
                .or_insert_with(|| watch::channel(None).0);
            tx.send_replace(Some(stored));
        }
    }

    /// Forgets a version (trimmed, here or by another replica).
    pub fn remove(&self, group: &str, version: u64) {
        if let Some(v) = self.groups.lock().unwrap().get_mut(group) {
            v.remove(&version);
        }
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }
}

pub struct Store {
    cache: Arc<Cache>,
    backend: Box<dyn Backend>,
    /// The backend's change feed, stopped with the store.
    feed: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(f) = &self.feed {
            f.abort();
        }
    }
}

/// Group names are used as directory names: letters, digits, `-`, `_`, `.` (not leading).
pub fn valid_group(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Store {
    /// A store over `backend`, its cache filled (or being filled) by the caller.
    pub fn new(
        backend: Box<dyn Backend>,
        cache: Arc<Cache>,
        feed: Option<tokio::task::JoinHandle<()>>,
    ) -> Store {
        Store {
            cache,
            backend,
            feed,
        }
    }

    /// Opens (creating it if needed) the directory store under `dir` and loads every
    /// version. Leftover temporary files from an interrupted write are removed.
    pub fn open(dir: &std::path::Path) -> Result<Store, StoreError> {
        dir::open(dir)
    }

    /// `dir` or `kubernetes`.
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Whether every version the backend had at start is loaded.
    pub fn synced(&self) -> bool {
        self.cache.synced.load(Ordering::Acquire)
    }

    pub fn current(&self, group: &str) -> Option<Arc<Stored>> {
        let groups = self.cache.groups.lock().unwrap();
        groups.get(group)?.values().next_back().cloned()
    }

    pub fn get(&self, group: &str, version: u64) -> Option<Arc<Stored>> {
        let groups = self.cache.groups.lock().unwrap();
        groups.get(group)?.get(&version).cloned()
    }

    /// Every version of a group, newest first.
    pub fn history(&self, group: &str) -> Vec<Arc<Stored>> {
        let groups = self.cache.groups.lock().unwrap();
        groups
            .get(group)
            .map(|v| v.values().rev().cloned().collect())
            .unwrap_or_default()
    }

    pub fn groups(&self) -> Vec<String> {
        let groups = self.cache.groups.lock().unwrap();
        let mut g: Vec<String> = groups
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        g.sort();
        g
    }

    /// A receiver of the group's newest version, whoever wrote it (created on first use).
    pub fn subscribe(&self, group: &str) -> watch::Receiver<Option<Arc<Stored>>> {
        let mut channels = self.cache.channels.lock().unwrap();
        channels
            .entry(group.to_string())
            .or_insert_with(|| watch::channel(self.current(group)).0)
            .subscribe()
    }

    /// Stores `config` (with the endpoints discovered for it) as version `version` of the
    /// group, which must be the newest known plus one; returns it once it is durable.
    /// [`StoreError::Conflict`]: another replica made that version first; [`Store::catch_up`]
    /// and build the write again on the new newest version.
    pub async fn append(
        &self,
        group: &str,
        version: u64,
        action: String,
        config: Config,
        discovered: crate::k8s::Discovered,
        mesh: Option<Arc<Config>>,
    ) -> Result<Arc<Stored>, StoreError> {
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stored = Arc::new(Stored {
            version,
            created_at,
            action,
            config,
            discovered,
            mesh,
        });
        self.backend.create(group, &stored).await?;
        self.cache.insert(group, stored.clone());
        if by_discovery(&stored) {
            self.trim(group).await;
        }
        Ok(stored)
    }

    /// Loads the versions of `group` that the backend has and this copy lacks (after a
    /// [`StoreError::Conflict`], the change feed may not have brought them yet).
    pub async fn catch_up(&self, group: &str) -> Result<(), StoreError> {
        let after = self.current(group).map_or(0, |c| c.version);
        for s in self.backend.newer(group, after).await? {
            self.cache.insert(group, Arc::new(s));
        }
        Ok(())
    }

    /// Deletes the oldest discovery-made versions of `group` beyond [`KEEP_DISCOVERY`]
    /// (never the newest). Failures are logged: what is left is trimmed next time.
    pub async fn trim(&self, group: &str) {
        let excess = {
            let groups = self.cache.groups.lock().unwrap();
            groups.get(group).map(excess_discovery).unwrap_or_default()
        };
        if excess.is_empty() {
            return;
        }
        match self.backend.remove(group, &excess).await {
            Ok(()) => {
                for v in excess {
                    self.cache.remove(group, v);
                }
            }
            Err(e) => tracing::warn!(group, error = %e, "cannot trim discovery versions"),
        }
    }

    /// [`Store::trim`] on every group (the leader, when it takes over).
    pub async fn trim_all(&self) {
        for group in self.groups() {
            self.trim(&group).await;
        }
    }

    /// Writes the opaque document `name` of `group` (for example a rollout's state).
    pub async fn save_doc(&self, group: &str, name: &str, doc: &Value) -> Result<(), StoreError> {
        self.backend.save_doc(group, name, doc).await
    }

    /// Every document of `group`, by name.
    pub async fn load_docs(&self, group: &str) -> Result<BTreeMap<String, Value>, StoreError> {
        self.backend.load_docs(group).await
    }

    /// Deletes the document `name` of `group`.
    pub async fn remove_doc(&self, group: &str, name: &str) -> Result<(), StoreError> {
        self.backend.remove_doc(group, name).await
    }
}

/// The oldest discovery-made versions beyond [`KEEP_DISCOVERY`] (never the newest).
fn excess_discovery(versions: &Versions) -> Vec<u64> {
    let Some(newest) = versions.values().next_back() else {
        return Vec::new();
    };
    let older: Vec<u64> = versions
        .values()
        .filter(|s| by_discovery(s) && s.version != newest.version)
        .map(|s| s.version)
        .collect();
    let keep = KEEP_DISCOVERY - usize::from(by_discovery(newest));
    let excess = older.len().saturating_sub(keep);
    older.into_iter().take(excess).collect()
}

/// Rollout states (issue 21): one document `rollout NAME` per rollout, in its group's
/// documents (a file beside the group's versions, or a ConfigMap with `--store
/// kubernetes`), so every replica, and the next leader, reads the same state.
impl Store {
    pub async fn save_rollout_state(
        &self,
        group: &str,
        name: &str,
        state: &crate::rollout::RolloutState,
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_value(state).expect("a rollout state serializes");
        self.save_doc(group, &format!("{ROLLOUT_DOC}{name}"), &doc)
            .await
    }

    /// Every stored rollout state: `(group, name, state)`. An unreadable one is logged and
    /// left out (its rollout reads as idle).
    pub async fn load_rollout_states(&self) -> Vec<(String, String, crate::rollout::RolloutState)> {
        let mut out = Vec::new();
        for group in self.groups() {
            let docs = match self.load_docs(&group).await {
                Ok(docs) => docs,
                Err(e) => {
                    tracing::error!(group, error = %e, "cannot read the group's rollout states");
                    continue;
                }
            };
            for (doc, value) in docs {
                let Some(name) = doc.strip_prefix(ROLLOUT_DOC) else {
                    continue;
                };
                match serde_json::from_value(value) {
                    Ok(state) => out.push((group.clone(), name.to_string(), state)),
                    Err(e) => {
                        tracing::error!(group, rollout = name, error = %e, "unreadable rollout state skipped")
                    }
                }
            }
        }
        out
    }
}

/// The document name prefix of rollout states.
const ROLLOUT_DOC: &str = "rollout ";
