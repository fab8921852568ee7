//! `GET /v1/proxies` across replicas (`--store kubernetes`): each proxy reports to the
//! replica it is connected to, so each replica publishes what its proxies reported, and
//! every replica answers with all of it.
//!
//! Every [`PUBLISH_EVERY`], a replica writes its own list as the document `proxies
//! IDENTITY` of the reserved group `""` (not a valid group name, so it never meets a
//! config) and reads the other replicas' documents. A document not rewritten for
//! [`EXPIRE`] belongs to a replica that is gone: it is ignored, and the leader deletes it.
//! A proxy listed by several replicas (it moved) is shown once, as last heard of. So a
//! proxy's status on another replica is at most [`PUBLISH_EVERY`] old.

use crate::Control;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The reserved group of the replicas' documents.
const GROUP: &str = "";
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
pub const EXPIRE: Duration = Duration::from_secs(30);
/// Another replica's group-limit demands count while its document is at most this old
/// (whole seconds: its proxies report every second, it publishes every two).
pub const DEMAND_FRESH: Duration = Duration::from_secs(5);

/// What the other replicas' proxies reported, as last read.
#[derive(Default)]
pub struct Shared {
    others: Mutex<Vec<Value>>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Publishes this replica's proxies and reads the others', for as long as it runs.
pub async fn run(control: Arc<Control>, identity: String) {
    let mine = format!("proxies {identity}");
    loop {
        let doc = json!({
            "written_at": now_secs(),
            "proxies": control.proxies.doc(),
            "demand": control.group_limits.local_demand(),
        });
        if let Err(e) = control.store.save_doc(GROUP, &mine, &doc).await {
            tracing::warn!(error = %e, "cannot publish this replica's proxies");
        }
        match control.store.load_docs(GROUP).await {
            Ok(docs) => {
                let others = fresh_others(&control, docs, &mine).await;
                *control.shared_proxies.others.lock().unwrap() = others;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the other replicas' proxies"),
        }
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}

/// The proxies of the other replicas' documents that are fresh; the leader deletes the
/// documents of replicas gone for longer than [`EXPIRE`].
async fn fresh_others(control: &Control, docs: BTreeMap<String, Value>, mine: &str) -> Vec<Value> {
    let now = now_secs();
    let mut out = Vec::new();
    let mut demand = Vec::new();
    for (name, doc) in docs {
        if name == mine || !name.starts_with("proxies ") {
            continue;
        }
        let age = now.saturating_sub(doc["written_at"].as_u64().unwrap_or(0));
        if age <= DEMAND_FRESH.as_secs() {
            demand.extend(demand_of(&doc));
        }
        if age > EXPIRE.as_secs() {
            if control.leader.is_leader() {
                let _ = control.store.remove_doc(GROUP, &name).await;
            }
            continue;
        }
        out.extend(doc["proxies"].as_array().cloned().unwrap_or_default());
    }
    control.group_limits.set_remote(demand);
    out
}

/// The group-limit demands a replica's document lists, per (group, node).
fn demand_of(doc: &Value) -> Vec<((String, String), BTreeMap<String, f64>)> {
    let list = doc["demand"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    list.iter()
        .filter_map(|e| {
            let key = (
                e["group"].as_str()?.to_string(),
                e["node"].as_str()?.to_string(),
            );
            let demand = e["demand"]
                .as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect();
            Some((key, demand))
        })
        .collect()
}

/// `GET /v1/proxies`: this replica's proxies and the other replicas', each proxy once (as
/// last heard of), by group then node.
pub fn merged(control: &Control) -> Value {
    let mut by_key: BTreeMap<(String, String), Value> = BTreeMap::new();
    let local = control.proxies.doc();
    let others = control.shared_proxies.others.lock().unwrap().clone();
    let now = now_secs();
    for mut p in others
        .into_iter()
        .chain(local.as_array().cloned().unwrap_or_default())
    {
        let key = (
            p["group"].as_str().unwrap_or("").to_string(),
            p["node"].as_str().unwrap_or("").to_string(),
        );
        let seen = p["last_seen"].as_u64().unwrap_or(0);
        p["stale"] = json!(now.saturating_sub(seen) > crate::proxies::STALE_AFTER.as_secs());
        let newer = by_key
            .get(&key)
            .is_none_or(|old| old["last_seen"].as_u64().unwrap_or(0) <= seen);
        if newer {
            by_key.insert(key, p);
        }
    }
    Value::Array(by_key.into_values().collect())
}
