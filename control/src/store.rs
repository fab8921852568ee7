//! Versioned configs per group, persisted under the data directory.
//!
//! Layout: `<data-dir>/groups/<group>/<version, 20 digits>.json`, one file per version,
//! each a [`Stored`] record. A version is acknowledged only after its file is written,
//! fsynced and renamed into place and the directory is fsynced, so after a crash (even
//! `kill -9` mid-write) the store holds exactly the acknowledged versions: a half-written
//! file only ever exists under a temporary name, which loading removes.
//!
//! Versions count up per group from 1. History is the list of files, and a rollback stores
//! an old config again as a new version. Nothing a user wrote is ever deleted: every `put`,
//! `rollback` and `flag` version stays. Versions made by Kubernetes discovery (the same
//! config with new endpoints) are kept up to [`KEEP_DISCOVERY`] per group, the newest; a
//! cluster whose pods churn all day would otherwise grow the history (and the control
//! plane's memory) all day.

use serde::{Deserialize, Serialize};
use spur_config::Config;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
}

pub struct Store {
    dir: PathBuf,
    groups: Mutex<HashMap<String, BTreeMap<u64, Arc<Stored>>>>,
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

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Store {
    /// Opens (creating it if needed) the store under `dir` and loads every version.
    /// Leftover temporary files from an interrupted write are removed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let groups_dir = dir.join("groups");
        fs::create_dir_all(&groups_dir).map_err(|e| io_err(&groups_dir, e))?;
        let mut groups = HashMap::new();
        for entry in fs::read_dir(&groups_dir).map_err(|e| io_err(&groups_dir, e))? {
            let entry = entry.map_err(|e| io_err(&groups_dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !valid_group(&name) || !entry.path().is_dir() {
                continue;
            }
            let mut versions = BTreeMap::new();
            for file in fs::read_dir(entry.path()).map_err(|e| io_err(&entry.path(), e))? {
                let file = file.map_err(|e| io_err(&entry.path(), e))?;
                let path = file.path();
                let fname = file.file_name().to_string_lossy().into_owned();
                if fname.starts_with(".tmp") {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                if !fname.ends_with(".json") {
                    continue;
                }
                let text = fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
                match serde_json::from_str::<Stored>(&text) {
                    Ok(s) => {
                        versions.insert(s.version, Arc::new(s));
                    }
                    // Cannot happen with rename-into-place; say so loudly rather than stop.
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "unreadable stored version skipped")
                    }
                }
            }
            for old in Store::prune_discovery(&mut versions) {
                let _ = fs::remove_file(entry.path().join(format!("{old:020}.json")));
            }
            groups.insert(name, versions);
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            groups: Mutex::new(groups),
        })
    }

    pub fn current(&self, group: &str) -> Option<Arc<Stored>> {
        self.groups
            .lock()
            .unwrap()
            .get(group)?
            .values()
            .next_back()
            .cloned()
    }

    pub fn get(&self, group: &str, version: u64) -> Option<Arc<Stored>> {
        self.groups
            .lock()
            .unwrap()
            .get(group)?
            .get(&version)
            .cloned()
    }

    /// Every version of a group, newest first.
    pub fn history(&self, group: &str) -> Vec<Arc<Stored>> {
        self.groups
            .lock()
            .unwrap()
            .get(group)
            .map(|v| v.values().rev().cloned().collect())
            .unwrap_or_default()
    }

    pub fn groups(&self) -> Vec<String> {
        let mut g: Vec<String> = self.groups.lock().unwrap().keys().cloned().collect();
        g.sort();
        g
    }

    /// Stores `config` (with the endpoints discovered for it) as the group's next version;
    /// returns it once it is durable. Callers serialize writes per store (the API holds a
    /// write lock), so the version read here is still the newest when the file lands.
    pub fn append(
        &self,
        group: &str,
        action: String,
        config: Config,
        discovered: crate::k8s::Discovered,
    ) -> Result<Arc<Stored>, StoreError> {
        let version = self.current(group).map_or(1, |c| c.version + 1);
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stored = Arc::new(Stored {
            version,
            created_at,
            action,
            config,
            discovered,
        });
        let dir = self.dir.join("groups").join(group);
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let json = serde_json::to_vec_pretty(&*stored).expect("a config serializes");
        let tmp = dir.join(format!(".tmp-{version:020}"));
        let dest = dir.join(format!("{version:020}.json"));
        {
            let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all(&json).map_err(|e| io_err(&tmp, e))?;
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
        }
        fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
        // The rename is durable only once the directory entry is. If that cannot be made
        // sure, the version is not acknowledged: remove it so the number is not reused
        // for a different config after a crash.
        if let Err(e) = fs::File::open(&dir).and_then(|d| d.sync_all()) {
            let _ = fs::remove_file(&dest);
            return Err(io_err(&dir, e));
        }
        let pruned = {
            let mut groups = self.groups.lock().unwrap();
            let versions = groups.entry(group.to_string()).or_default();
            versions.insert(version, stored.clone());
            if by_discovery(&stored) {
                Store::prune_discovery(versions)
            } else {
                Vec::new()
            }
        };
        for old in pruned {
            // Best effort: a file left behind is loaded (and pruned) again at the next start.
            let path = dir.join(format!("{old:020}.json"));
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a pruned discovery version");
            }
        }
        Ok(stored)
    }

    /// Drops the oldest discovery-made versions beyond [`KEEP_DISCOVERY`] (never the
    /// newest version); returns their numbers.
    fn prune_discovery(versions: &mut BTreeMap<u64, Arc<Stored>>) -> Vec<u64> {
        let Some(newest) = versions.values().next_back().cloned() else {
            return Vec::new();
        };
        let older: Vec<u64> = versions
            .values()
            .filter(|s| by_discovery(s) && s.version != newest.version)
            .map(|s| s.version)
            .collect();
        let keep = KEEP_DISCOVERY - usize::from(by_discovery(&newest));
        let excess = older.len().saturating_sub(keep);
        let pruned: Vec<u64> = older.into_iter().take(excess).collect();
        for v in &pruned {
            versions.remove(v);
        }
        pruned
    }
}

/// Rollout states (issue 21), one file each beside the group's versions:
/// `<data-dir>/groups/<group>/rollouts/<name>.json`, written like a version (temporary
/// file, fsync, rename, directory fsync), so a state is either the old one or the new one.
/// Kept to this pair of functions so that another store can hold them too.
impl Store {
    pub fn save_rollout_state(
        &self,
        group: &str,
        name: &str,
        state: &crate::rollout::RolloutState,
    ) -> Result<(), StoreError> {
        let dir = self.dir.join("groups").join(group).join("rollouts");
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let json = serde_json::to_vec_pretty(state).expect("a rollout state serializes");
        let tmp = dir.join(format!(".tmp-{name}"));
        let dest = dir.join(format!("{name}.json"));
        {
            let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all(&json).map_err(|e| io_err(&tmp, e))?;
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
        }
        fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&dir, e))
    }

    /// Every stored rollout state: `(group, name, state)`. An unreadable file is logged and
    /// left out (its rollout reads as idle).
    pub fn load_rollout_states(&self) -> Vec<(String, String, crate::rollout::RolloutState)> {
        let mut out = Vec::new();
        for group in self.groups() {
            let dir = self.dir.join("groups").join(&group).join("rollouts");
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let fname = entry.file_name().to_string_lossy().into_owned();
                if fname.starts_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                    continue;
                }
                let Some(name) = fname.strip_suffix(".json") else {
                    continue;
                };
                let read = fs::read_to_string(entry.path())
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
                match read {
                    Ok(state) => out.push((group.clone(), name.to_string(), state)),
                    Err(e) => {
                        tracing::error!(file = %entry.path().display(), error = %e, "unreadable rollout state skipped")
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(node: &str) -> Config {
        Config {
            node: Some(node.into()),
            ..Config::default()
        }
    }

    #[test]
    fn versions_survive_a_reopen_and_temp_files_are_dropped() {
        let dir = std::env::temp_dir().join(format!("spur-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        assert_eq!(
            s.append("shop", "put".into(), cfg("a"), Default::default())
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            s.append("shop", "put".into(), cfg("b"), Default::default())
                .unwrap()
                .version,
            2
        );
        assert_eq!(
            s.append("other", "put".into(), cfg("c"), Default::default())
                .unwrap()
                .version,
            1
        );
        // A write interrupted before its rename.
        fs::write(
            dir.join("groups/shop/.tmp-00000000000000000003"),
            b"{\"version\": 3, \"trunc",
        )
        .unwrap();
        drop(s);
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.current("shop").unwrap().config, cfg("b"));
        assert_eq!(
            s.history("shop")
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(s.groups(), vec!["other".to_string(), "shop".to_string()]);
        assert!(!dir.join("groups/shop/.tmp-00000000000000000003").exists());
        assert_eq!(
            s.append("shop", "put".into(), cfg("d"), Default::default())
                .unwrap()
                .version,
            3
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn discovery_versions_are_pruned_but_user_versions_stay() {
        let dir = std::env::temp_dir().join(format!("spur-store-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        s.append("shop", "put".into(), cfg("a"), Default::default())
            .unwrap();
        let extra = 5;
        for i in 0..KEEP_DISCOVERY + extra {
            if i == 50 {
                s.append("shop", "flag beta".into(), cfg("a"), Default::default())
                    .unwrap();
            }
            s.append(
                "shop",
                format!("discovery: web.shop:8080 {i} -> {} endpoint(s)", i + 1),
                cfg("a"),
                Default::default(),
            )
            .unwrap();
        }
        let newest = (KEEP_DISCOVERY + extra + 2) as u64;
        let check = |s: &Store| {
            let history = s.history("shop");
            assert_eq!(
                history.iter().filter(|v| by_discovery(v)).count(),
                KEEP_DISCOVERY
            );
            assert!(history.iter().any(|v| v.action == "put" && v.version == 1));
            assert!(history.iter().any(|v| v.action == "flag beta"));
            assert_eq!(history.len(), KEEP_DISCOVERY + 2);
            assert_eq!(s.current("shop").unwrap().version, newest);
            assert!(
                s.get("shop", 2).is_none(),
                "the oldest discovery version went"
            );
            let files = fs::read_dir(dir.join("groups/shop")).unwrap().count();
            assert_eq!(files, KEEP_DISCOVERY + 2);
        };
        check(&s);
        drop(s);
        let s = Store::open(&dir).unwrap();
        check(&s);
        let next = s
            .append("shop", "put".into(), cfg("b"), Default::default())
            .unwrap();
        assert_eq!(next.version, newest + 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn group_names() {
        assert!(valid_group("shop-1.prod"));
        assert!(!valid_group("../etc"));
        assert!(!valid_group(".hidden"));
        assert!(!valid_group(""));
    }
}
