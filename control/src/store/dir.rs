//! The directory store (`--store dir`, the default): one process, files under the data
//! directory.
//!
//! Layout: `<data-dir>/groups/<group>/<version, 20 digits>.json`, one file per version,
//! each a [`Stored`] record; documents in `<data-dir>/docs/<group>/<name, hex>.json`. A
//! version is acknowledged only after its file is written, fsynced and renamed into place
//! and the directory is fsynced, so after a crash (even `kill -9` mid-write) the store holds
//! exactly the acknowledged versions: a half-written file only ever exists under a
//! temporary name, which loading removes. Nothing else writes the directory, so it is read
//! once at start and the process is always the leader.

use super::{excess_discovery, Backend, Cache, Store, StoreError, Stored};
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct DirBackend {
    dir: PathBuf,
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn version_file(v: u64) -> String {
    format!("{v:020}.json")
}

/// Writes `bytes` to `dest` durably: a temporary file, fsync, rename, directory fsync.
fn write_durably(dir: &Path, tmp_name: &str, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tmp = dir.join(tmp_name);
    {
        let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
    }
    fs::rename(&tmp, dest).map_err(|e| io_err(dest, e))?;
    // The rename is durable only once the directory entry is. If that cannot be made
    // sure, the write is not acknowledged: remove it so a version number is not reused
    // for a different config after a crash.
    if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        let _ = fs::remove_file(dest);
        return Err(io_err(dir, e));
    }
    Ok(())
}

/// Every version of one group's directory; temporary files are removed.
fn load_group(path: &Path) -> Result<BTreeMap<u64, Stored>, StoreError> {
    let mut versions = BTreeMap::new();
    for file in fs::read_dir(path).map_err(|e| io_err(path, e))? {
        let file = file.map_err(|e| io_err(path, e))?;
        let fpath = file.path();
        let fname = file.file_name().to_string_lossy().into_owned();
        if fname.starts_with(".tmp") {
            let _ = fs::remove_file(&fpath);
            continue;
        }
        if !fname.ends_with(".json") {
            continue;
        }
        let text = fs::read_to_string(&fpath).map_err(|e| io_err(&fpath, e))?;
        match serde_json::from_str::<Stored>(&text) {
            Ok(s) => {
                versions.insert(s.version, s);
            }
            // Cannot happen with rename-into-place; say so loudly rather than stop.
            Err(e) => {
                tracing::error!(file = %fpath.display(), error = %e, "unreadable stored version skipped")
            }
        }
    }
    Ok(versions)
}

/// Opens (creating it if needed) the store under `dir` and loads every version.
pub fn open(dir: &Path) -> Result<Store, StoreError> {
    let groups_dir = dir.join("groups");
    fs::create_dir_all(&groups_dir).map_err(|e| io_err(&groups_dir, e))?;
    let cache = Arc::new(Cache::default());
    for entry in fs::read_dir(&groups_dir).map_err(|e| io_err(&groups_dir, e))? {
        let entry = entry.map_err(|e| io_err(&groups_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !super::valid_group(&name) || !entry.path().is_dir() {
            continue;
        }
        let mut versions: super::Versions = load_group(&entry.path())?
            .into_iter()
            .map(|(v, s)| (v, Arc::new(s)))
            .collect();
        for old in excess_discovery(&versions) {
            versions.remove(&old);
            let _ = fs::remove_file(entry.path().join(version_file(old)));
        }
        for s in versions.into_values() {
            cache.insert(&name, s);
        }
    }
    cache.set_synced();
    let backend = DirBackend {
        dir: dir.to_path_buf(),
    };
    Ok(Store::new(Box::new(backend), cache, None))
}

/// A document name as a file name: hex, so any name is safe.
fn doc_file(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

fn doc_name(file: &str) -> Option<String> {
    let hex = file.strip_suffix(".json")?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

impl Backend for DirBackend {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn create<'a>(
        &'a self,
        group: &'a str,
        stored: &'a Stored,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dir = self.dir.join("groups").join(group);
            let dest = dir.join(version_file(stored.version));
            if dest.exists() {
                return Err(StoreError::Conflict {
                    group: group.to_string(),
                    version: stored.version,
                });
            }
            let json = serde_json::to_vec_pretty(stored).expect("a config serializes");
            write_durably(&dir, &format!(".tmp-{:020}", stored.version), &dest, &json)
        })
    }

    fn newer<'a>(
        &'a self,
        group: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Vec<Stored>, StoreError>> {
        Box::pin(async move {
            let dir = self.dir.join("groups").join(group);
            if !dir.is_dir() {
                return Ok(Vec::new());
            }
            Ok(load_group(&dir)?
                .split_off(&(after + 1))
                .into_values()
                .collect())
        })
    }

    fn remove<'a>(
        &'a self,
        group: &'a str,
        versions: &'a [u64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dir = self.dir.join("groups").join(group);
            for v in versions {
                let path = dir.join(version_file(*v));
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path, e)),
                }
            }
            Ok(())
        })
    }

    fn save_doc<'a>(
        &'a self,
        group: &'a str,
        name: &'a str,
        doc: &'a Value,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dir = self.dir.join("docs").join(group);
            let file = doc_file(name);
            let json = serde_json::to_vec_pretty(doc).expect("JSON serializes");
            write_durably(&dir, &format!(".tmp-{file}"), &dir.join(&file), &json)
        })
    }

    fn load_docs<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Value>, StoreError>> {
        Box::pin(async move {
            let dir = self.dir.join("docs").join(group);
            let mut out = BTreeMap::new();
            let Ok(entries) = fs::read_dir(&dir) else {
                return Ok(out);
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_err(&dir, e))?;
                let fname = entry.file_name().to_string_lossy().into_owned();
                let Some(name) = doc_name(&fname) else {
                    continue;
                };
                let text = fs::read_to_string(entry.path()).map_err(|e| io_err(&dir, e))?;
                match serde_json::from_str(&text) {
                    Ok(v) => {
                        out.insert(name, v);
                    }
                    Err(e) => {
                        tracing::error!(file = %entry.path().display(), error = %e, "unreadable document skipped")
                    }
                }
            }
            Ok(out)
        })
    }

    fn remove_doc<'a>(
        &'a self,
        group: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.dir.join("docs").join(group).join(doc_file(name));
            match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(&path, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{by_discovery, KEEP_DISCOVERY};
    use spur_config::Config;

    /// Appends as the version after the newest.
    async fn append(
        s: &Store,
        group: &str,
        action: String,
        config: Config,
        discovered: crate::k8s::Discovered,
    ) -> Result<Arc<Stored>, StoreError> {
        let next = s.current(group).map_or(1, |c| c.version + 1);
        s.append(group, next, action, config, discovered, None)
            .await
    }

    fn cfg(node: &str) -> Config {
        Config {
            node: Some(node.into()),
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn versions_survive_a_reopen_and_temp_files_are_dropped() {
        let dir = std::env::temp_dir().join(format!("spur-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        assert_eq!(
            append(&s, "shop", "put".into(), cfg("a"), Default::default())
                .await
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            append(&s, "shop", "put".into(), cfg("b"), Default::default())
                .await
                .unwrap()
                .version,
            2
        );
        assert_eq!(
            append(&s, "other", "put".into(), cfg("c"), Default::default())
                .await
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
            append(&s, "shop", "put".into(), cfg("d"), Default::default())
                .await
                .unwrap()
                .version,
            3
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn discovery_versions_are_pruned_but_user_versions_stay() {
        let dir = std::env::temp_dir().join(format!("spur-store-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        append(&s, "shop", "put".into(), cfg("a"), Default::default())
            .await
            .unwrap();
        let extra = 5;
        for i in 0..KEEP_DISCOVERY + extra {
            if i == 50 {
                append(&s, "shop", "flag beta".into(), cfg("a"), Default::default())
                    .await
                    .unwrap();
            }
            append(
                &s,
                "shop",
                format!("discovery: web.shop:8080 {i} -> {} endpoint(s)", i + 1),
                cfg("a"),
                Default::default(),
            )
            .await
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
        let next = append(&s, "shop", "put".into(), cfg("b"), Default::default())
            .await
            .unwrap();
        assert_eq!(next.version, newest + 1);
        // A version that exists is refused, and nothing is overwritten.
        let again = s
            .append(
                "shop",
                newest,
                "put".into(),
                cfg("z"),
                Default::default(),
                None,
            )
            .await;
        assert!(
            matches!(again, Err(StoreError::Conflict { .. })),
            "{again:?}"
        );
        assert_eq!(s.get("shop", newest).unwrap().config, cfg("a"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn documents_round_trip_by_any_name() {
        let dir = std::env::temp_dir().join(format!("spur-store-docs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        let doc = serde_json::json!({ "state": "running", "step": 2 });
        s.save_doc("shop", "checkout-v2/../x", &doc).await.unwrap();
        s.save_doc("shop", "b", &serde_json::json!(1))
            .await
            .unwrap();
        s.save_doc("shop", "b", &serde_json::json!(2))
            .await
            .unwrap();
        drop(s);
        let s = Store::open(&dir).unwrap();
        let docs = s.load_docs("shop").await.unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs["checkout-v2/../x"], doc);
        assert_eq!(docs["b"], serde_json::json!(2));
        s.remove_doc("shop", "b").await.unwrap();
        s.remove_doc("shop", "b").await.unwrap();
        assert_eq!(s.load_docs("shop").await.unwrap().len(), 1);
        assert!(s.load_docs("other").await.unwrap().is_empty());
        assert!(s.groups().is_empty(), "documents are not versions");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn group_names() {
        assert!(crate::store::valid_group("shop-1.prod"));
        assert!(!crate::store::valid_group("../etc"));
        assert!(!crate::store::valid_group(".hidden"));
        assert!(!crate::store::valid_group(""));
    }
}
