//! The Kubernetes store (`--store kubernetes --namespace NS`): each version of a group is a
//! ConfigMap in NS, and every replica watches them.
//!
//! Why ConfigMaps rather than a `SpurConfig` custom resource: they need no CRD, and so no
//! cluster-wide install with cluster-admin rights before the control plane can start; the
//! control plane's Role is namespaced (configmaps, secrets, leases in NS), and `kubectl get
//! configmaps -l app.kubernetes.io/managed-by=spur-control` shows every version. What a CRD
//! would add (a schema checked by the API server) Spur does itself: every config is
//! validated before it is stored. A ConfigMap holds up to 1 MiB, far above any config.
//!
//! - Version N of group G: ConfigMap `spur-v-<slug>-<hash>-<N>` (slug: G lowercased, at
//!   most 40 characters; hash: 64-bit FNV-1a of G, so distinct groups never share names),
//!   labels `app.kubernetes.io/managed-by=spur-control`, `spur.dev/kind=version`,
//!   `spur.dev/group-hash`, `spur.dev/version`; annotation `spur.dev/group` (the exact
//!   name); data `stored.json` (the [`Stored`] record).
//! - Making version N is a create of that name: the API server lets exactly one create of a
//!   name succeed and answers 409 AlreadyExists to the others, which is the store's
//!   [`StoreError::Conflict`].
//! - Documents: ConfigMap `spur-d-<slug>-<hash of group and name>`, kind `doc`, annotation
//!   `spur.dev/doc`, data `doc.json`; replaced with a `resourceVersion` precondition (409
//!   Conflict: read again and retry).
//! - The feed: kube's watcher (list, then watch from its resourceVersion; re-list on 410
//!   Gone; errors back off) puts every version into the cache; the store counts as synced
//!   once the first list is in.

use super::{Backend, Cache, Store, StoreError, Stored};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "spur-control";
const KIND: &str = "spur.dev/kind";
const GROUP_HASH: &str = "spur.dev/group-hash";
const GROUP: &str = "spur.dev/group";
const DOC: &str = "spur.dev/doc";
const VERSION: &str = "spur.dev/version";

/// 64-bit FNV-1a, as 16 hex digits: names and labels for any group name.
fn hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The readable part of an object name: lowercase letters and digits, `-` for the rest.
fn slug(group: &str) -> String {
    let s: String = group
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        "g".into()
    } else {
        s.into()
    }
}

pub fn version_name(group: &str, version: u64) -> String {
    format!("spur-v-{}-{}-{version}", slug(group), hash(group))
}

fn doc_object_name(group: &str, name: &str) -> String {
    format!(
        "spur-d-{}-{}",
        slug(group),
        hash(&format!("{group}\n{name}"))
    )
}

fn kube_err(what: &str, e: kube::Error) -> StoreError {
    StoreError::Kubernetes(format!("{what}: {e}"))
}

fn status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The labels of one kind of object of one group.
fn selector(kind: &str, group: &str) -> String {
    format!(
        "{MANAGED_BY}={MANAGER},{KIND}={kind},{GROUP_HASH}={}",
        hash(group)
    )
}

fn labels(kind: &str, group: &str) -> BTreeMap<String, String> {
    [
        (MANAGED_BY.to_string(), MANAGER.to_string()),
        (KIND.to_string(), kind.to_string()),
        (GROUP_HASH.to_string(), hash(group)),
    ]
    .into()
}

/// The group and version record a version ConfigMap holds (`None` for anything else).
fn read_version(cm: &ConfigMap) -> Option<(String, Stored)> {
    let group = cm.metadata.annotations.as_ref()?.get(GROUP)?.clone();
    let text = cm.data.as_ref()?.get("stored.json")?;
    match serde_json::from_str::<Stored>(text) {
        Ok(s) => Some((group, s)),
        Err(e) => {
            tracing::error!(object = ?cm.metadata.name, error = %e, "unreadable stored version skipped");
            None
        }
    }
}

pub struct KubeBackend {
    api: Api<ConfigMap>,
}

/// Opens the store in namespace `ns` and starts its feed; the store is synced once the
/// feed's first list has arrived ([`Store::synced`]).
pub fn open(client: kube::Client, ns: &str) -> Store {
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let cache = Arc::new(Cache::default());
    let feed = tokio::spawn(feed(api.clone(), cache.clone()));
    Store::new(Box::new(KubeBackend { api }), cache, Some(feed))
}

/// Keeps the cache equal to the versions in the cluster, for as long as the store is open.
async fn feed(api: Api<ConfigMap>, cache: Arc<Cache>) {
    let config =
        watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGER},{KIND}=version"));
    let events = watcher::watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                if let Some((group, s)) = read_version(&cm) {
                    cache.insert(&group, Arc::new(s));
                }
            }
            Ok(watcher::Event::Delete(cm)) => {
                if let Some((group, s)) = read_version(&cm) {
                    cache.remove(&group, s.version);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if !cache.synced.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    tracing::info!("Kubernetes store: versions listed, now watching");
                }
            }
            Ok(watcher::Event::Init) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Kubernetes store: watch of ConfigMaps failed; serving what is known, retrying with backoff")
            }
        }
    }
}

impl KubeBackend {
    async fn get_version(&self, group: &str, v: u64) -> Result<Option<Stored>, StoreError> {
        let cm = self
            .api
            .get_opt(&version_name(group, v))
            .await
            .map_err(|e| kube_err("reading a version", e))?;
        Ok(cm.as_ref().and_then(read_version).map(|(_, s)| s))
    }

    async fn list(&self, kind: &str, group: &str) -> Result<Vec<ConfigMap>, StoreError> {
        let lp = ListParams::default().labels(&selector(kind, group));
        let list = self
            .api
            .list(&lp)
            .await
            .map_err(|e| kube_err("listing", e))?;
        Ok(list.items)
    }
}

impl Backend for KubeBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn create<'a>(
        &'a self,
        group: &'a str,
        stored: &'a Stored,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut labels = labels("version", group);
            labels.insert(VERSION.into(), stored.version.to_string());
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(version_name(group, stored.version)),
                    labels: Some(labels),
                    annotations: Some([(GROUP.to_string(), group.to_string())].into()),
                    ..Default::default()
                },
                data: Some(
                    [(
                        "stored.json".to_string(),
                        serde_json::to_string(stored).expect("a config serializes"),
                    )]
                    .into(),
                ),
                ..Default::default()
            };
            match self.api.create(&PostParams::default(), &cm).await {
                Ok(_) => Ok(()),
                Err(e) if status(&e) == Some(409) => Err(StoreError::Conflict {
                    group: group.to_string(),
                    version: stored.version,
                }),
                Err(e) => Err(kube_err("writing a version", e)),
            }
        })
    }

    fn newer<'a>(
        &'a self,
        group: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<Vec<Stored>, StoreError>> {
        Box::pin(async move {
            // The usual case: a few versions just made by another replica, one GET each.
            let mut out = Vec::new();
            while let Some(s) = self
                .get_version(group, after + 1 + out.len() as u64)
                .await?
            {
                out.push(s);
            }
            if !out.is_empty() {
                return Ok(out);
            }
            // The next one is missing (trimmed): list the group.
            let mut all: Vec<Stored> = self
                .list("version", group)
                .await?
                .iter()
                .filter_map(read_version)
                .map(|(_, s)| s)
                .filter(|s| s.version > after)
                .collect();
            all.sort_by_key(|s| s.version);
            Ok(all)
        })
    }

    fn remove<'a>(
        &'a self,
        group: &'a str,
        versions: &'a [u64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for v in versions {
                match self
                    .api
                    .delete(&version_name(group, *v), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if status(&e) == Some(404) => {}
                    Err(e) => return Err(kube_err("deleting a version", e)),
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
            let object = doc_object_name(group, name);
            let mut cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(object.clone()),
                    labels: Some(labels("doc", group)),
                    annotations: Some(
                        [
                            (GROUP.to_string(), group.to_string()),
                            (DOC.to_string(), name.to_string()),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                },
                data: Some([("doc.json".to_string(), doc.to_string())].into()),
                ..Default::default()
            };
            // Replace what is there (precondition: the resourceVersion just read), or create.
            for _ in 0..5 {
                let current = self
                    .api
                    .get_opt(&object)
                    .await
                    .map_err(|e| kube_err("reading a document", e))?;
                let result = match current {
                    Some(old) => {
                        cm.metadata.resource_version = old.metadata.resource_version;
                        self.api.replace(&object, &PostParams::default(), &cm).await
                    }
                    None => {
                        cm.metadata.resource_version = None;
                        self.api.create(&PostParams::default(), &cm).await
                    }
                };
                match result {
                    Ok(_) => return Ok(()),
                    Err(e) if status(&e) == Some(409) => continue,
                    Err(e) => return Err(kube_err("writing a document", e)),
                }
            }
            Err(StoreError::Kubernetes(format!(
                "document `{name}` of group `{group}`: changed by another replica at every try"
            )))
        })
    }

    fn load_docs<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, Value>, StoreError>> {
        Box::pin(async move {
            let mut out = BTreeMap::new();
            for cm in self.list("doc", group).await? {
                let name = cm.metadata.annotations.as_ref().and_then(|a| a.get(DOC));
                let text = cm.data.as_ref().and_then(|d| d.get("doc.json"));
                if let (Some(name), Some(text)) = (name, text) {
                    match serde_json::from_str(text) {
                        Ok(v) => {
                            out.insert(name.clone(), v);
                        }
                        Err(e) => {
                            tracing::error!(object = ?cm.metadata.name, error = %e, "unreadable document skipped")
                        }
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
            let object = doc_object_name(group, name);
            match self.api.delete(&object, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(e) if status(&e) == Some(404) => Ok(()),
                Err(e) => Err(kube_err("deleting a document", e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_valid_and_distinct() {
        let names = [
            version_name("shop", 1),
            version_name("Shop", 1),
            version_name("shop_1.prod", 12),
            version_name("...", 3),
            version_name(&"x".repeat(128), u64::MAX),
            doc_object_name("shop", "checkout-v2"),
        ];
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        for n in &names {
            assert!(
                n.chars().all(|c| alnum(c) || c == '-')
                    && n.starts_with(alnum)
                    && n.ends_with(alnum)
                    && n.len() <= 253,
                "{n}"
            );
        }
        assert_ne!(names[0], names[1], "case matters in group names");
        assert_eq!(version_name("shop", 7), version_name("shop", 7));
    }
}
