//! What the control plane knows of each proxy, for `GET /v1/proxies`: the version it
//! applied, the error of the last version it rejected, when it was last heard from.
//!
//! Proxies come and go (every pod restart is a new node name), and anyone who may call
//! the API can report a status for any name, so the list must not grow for ever: a proxy
//! is forgotten once it has no watch stream open and has not been heard from for the
//! configured time (`spur control --forget-proxies-after`, default 1 h). A proxy with an
//! open stream is never forgotten: its heartbeats would bring it back anyway.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A proxy not heard from for this long is shown as stale (it reports every 2 s, and its
/// watch stream gets a heartbeat every 10 s).
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// How long a silent proxy without a watch stream is remembered, by default.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
struct Entry {
    applied_version: Option<u64>,
    last_error: Option<String>,
    /// Seconds since the Unix epoch, as shown.
    last_seen: u64,
    /// The same moment on the monotonic clock, to forget by.
    seen_at: Instant,
    /// Open watch streams of this proxy.
    watching: usize,
    /// When its workload certificate expires (Unix seconds), as it last reported.
    certificate_expires_at: Option<u64>,
}

type Key = (String, String);

pub struct Proxies {
    forget_after: Duration,
    entries: Mutex<BTreeMap<Key, Entry>>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Proxies {
    pub fn new(forget_after: Duration) -> Arc<Proxies> {
        Arc::new(Proxies {
            forget_after,
            entries: Mutex::new(BTreeMap::new()),
        })
    }

    /// Runs `f` on the proxy's entry (made if new, marked seen now), after forgetting the
    /// proxies whose time is up.
    fn touch<R>(&self, group: &str, node: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut entries = self.entries.lock().unwrap();
        self.forget_silent(&mut entries);
        let e = entries
            .entry((group.to_string(), node.to_string()))
            .or_insert_with(|| Entry {
                applied_version: None,
                last_error: None,
                last_seen: 0,
                seen_at: Instant::now(),
                watching: 0,
                certificate_expires_at: None,
            });
        e.last_seen = now_secs();
        e.seen_at = Instant::now();
        f(e)
    }

    fn forget_silent(&self, entries: &mut BTreeMap<Key, Entry>) {
        let ttl = self.forget_after;
        entries.retain(|_, e| e.watching > 0 || e.seen_at.elapsed() < ttl);
    }

    /// The proxy was heard from (a watch request, a heartbeat sent to it).
    pub fn seen(&self, group: &str, node: &str) {
        self.touch(group, node, |_| ());
    }

    /// A status report: the version applied (if it says), and the error of the last
    /// version it rejected (`None` clears it).
    pub fn status(&self, group: &str, node: &str, applied: Option<u64>, error: Option<String>) {
        self.touch(group, node, |e| {
            if applied.is_some() {
                e.applied_version = applied;
            }
            e.last_error = error;
        });
    }

    /// The expiry of the proxy's workload certificate, as it reported it.
    pub fn certificate(&self, group: &str, node: &str, expires_at: u64) {
        self.touch(group, node, |e| e.certificate_expires_at = Some(expires_at));
    }

    /// A watch stream of the proxy opened; it counts as open until the guard is dropped.
    pub fn watching(self: &Arc<Self>, group: &str, node: &str) -> WatchGuard {
        self.touch(group, node, |e| e.watching += 1);
        WatchGuard {
            proxies: self.clone(),
            key: (group.to_string(), node.to_string()),
        }
    }

    /// `GET /v1/proxies`: every proxy remembered, by group then node. `stale`: not heard
    /// from for [`STALE_AFTER`] (a proxy reports every 2 s).
    pub fn doc(&self) -> Value {
        let mut entries = self.entries.lock().unwrap();
        self.forget_silent(&mut entries);
        Value::Array(
            entries
                .iter()
                .map(|((group, node), s)| {
                    json!({
                        "node": node,
                        "group": group,
                        "applied_version": s.applied_version,
                        "last_error": s.last_error,
                        "last_seen": s.last_seen,
                        "stale": s.seen_at.elapsed() > STALE_AFTER,
                        "certificate_expires_at": s.certificate_expires_at,
                    })
                })
                .collect(),
        )
    }
}

/// `spur_control_proxy_certificate_expiry_timestamp_seconds{group, node}`: each proxy's
/// workload certificate expiry as it last reported it, read at every scrape (so a
/// forgotten proxy's series goes with it). For alerts on certificates near expiry: a
/// proxy renews at two thirds of the lifetime, so one close to expiry failed to renew.
#[derive(Debug)]
pub struct CertificateExpiry(pub Arc<Proxies>);

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxies").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for CertificateExpiry {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let expiries: Vec<(String, String, u64)> = {
            let entries = self.0.entries.lock().unwrap();
            entries
                .iter()
                .filter_map(|((g, n), e)| Some((g.clone(), n.clone(), e.certificate_expires_at?)))
                .collect()
        };
        let mut family = encoder.encode_descriptor(
            "spur_control_proxy_certificate_expiry_timestamp_seconds",
            "When each proxy's workload certificate expires (Unix seconds), as it last reported",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (group, node, at) in expiries {
            let labels = [("group", group), ("node", node)];
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(at as i64);
            gauge.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// An open watch stream of one proxy (see [`Proxies::watching`]).
pub struct WatchGuard {
    proxies: Arc<Proxies>,
    key: Key,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut entries = self.proxies.entries.lock().unwrap();
        if let Some(e) = entries.get_mut(&self.key) {
            e.watching = e.watching.saturating_sub(1);
            // The stream just ended: the forgetting clock starts now.
            e.seen_at = Instant::now();
            e.last_seen = now_secs();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(p: &Proxies) -> Vec<String> {
        p.doc()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["node"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn silent_proxies_are_forgotten_but_watching_ones_stay() {
        let p = Proxies::new(Duration::from_millis(50));
        p.status("g", "gone", Some(1), None);
        let guard = p.watching("g", "watching");
        p.seen("g", "fresh");
        assert_eq!(nodes(&p), ["fresh", "gone", "watching"]);
        std::thread::sleep(Duration::from_millis(80));
        p.seen("g", "fresh");
        assert_eq!(nodes(&p), ["fresh", "watching"]);
        drop(guard);
        assert_eq!(nodes(&p), ["fresh", "watching"], "remembered for a while");
        std::thread::sleep(Duration::from_millis(80));
        assert!(nodes(&p).is_empty());
    }

    #[test]
    fn a_report_keeps_the_applied_version_and_replaces_the_error() {
        let p = Proxies::new(DEFAULT_FORGET_AFTER);
        p.status("g", "n", Some(3), None);
        p.status("g", "n", None, Some("version 4 rejected: x".into()));
        let doc = p.doc();
        assert_eq!(doc[0]["applied_version"], 3);
        assert_eq!(doc[0]["last_error"], "version 4 rejected: x");
        p.status("g", "n", Some(5), None);
        assert!(p.doc()[0]["last_error"].is_null());
    }
}
