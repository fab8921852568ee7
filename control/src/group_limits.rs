//! Group-wide rate limits: dividing each `scope: group` limit's rate among the group's
//! proxies in proportion to their demand.
//!
//! Proxies report their demand per limit every second (`{"demand": {...}}` on their status
//! call); every second [`GroupLimits::tick`] computes each proxy's share and sends the
//! proxies whose shares changed a `{"shares": {...}}` line on their watch stream. A share is
//! a floor plus a part of the rest in proportion to demand ([`shares`]): with every proxy
//! over its share, each refuses the same fraction of its requests, as one shared bucket
//! would, and the group admits the whole rate; the floor keeps an idle proxy able to
//! serve the first requests that reach it before its next report.
//!
//! A proxy whose report is late keeps its place in the division (with its last demand)
//! while its watch stream is open: it is alive and still enforces the last share it was
//! sent, so handing that share to the others would let the group admit more than its rate
//! (with three proxies, a loaded one would take the whole rate while the late ones keep
//! theirs). A proxy silent for [`STALE`] whose stream is closed (it is gone, or
//! reconnecting and about to report afresh), or silent for [`HOLD`] even with its stream
//! open, leaves the division: its share goes to the others.
//!
//! With several control-plane replicas, a proxy reports to the one it is connected to; so
//! each replica publishes its proxies' demand beside their status ([`crate::shared_proxies`])
//! and divides each limit over its own proxies and the others' ([`GroupLimits::set_remote`]),
//! sending shares only to its own. Every replica sees the same demands (within a publish
//! period), so the shares of the whole group still add up to one.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A proxy whose last demand report is older than this no longer has a share, unless its
/// watch stream is still open.
pub const STALE: Duration = Duration::from_secs(3);
/// A proxy whose last demand report is older than this no longer has a share, even with
/// its watch stream open (and is forgotten).
pub const HOLD: Duration = Duration::from_secs(60);
/// How often shares are computed.
pub const TICK: Duration = Duration::from_secs(1);
/// The part of a limit's rate divided evenly among its proxies, whatever their demand.
pub const FLOOR: f64 = 0.1;

type Key = (String, String);

struct Node {
    at: Instant,
    demand: BTreeMap<String, f64>,
    /// Shares last sent.
    sent: BTreeMap<String, f64>,
}

#[derive(Default)]
pub struct GroupLimits {
    nodes: Mutex<HashMap<Key, Node>>,
    channels: Mutex<HashMap<Key, watch::Sender<Option<Bytes>>>>,
    /// The demand of other replicas' proxies, as last read.
    remote: Mutex<HashMap<Key, BTreeMap<String, f64>>>,
}

/// Shares of one limit for these demands (requests per second, in order): `FLOOR` evenly,
/// the rest in proportion to demand (evenly when there is none). They add up to 1.
pub fn shares(demands: &[f64]) -> Vec<f64> {
    let n = demands.len() as f64;
    let total: f64 = demands.iter().map(|d| d.max(0.0)).sum();
    demands
        .iter()
        .map(|d| {
            let part = if total > 0.0 {
                d.max(0.0) / total
            } else {
                1.0 / n
            };
            FLOOR / n + (1.0 - FLOOR) * part
        })
        .collect()
}

impl Node {
    /// Whether this proxy takes part in the division: it reported lately, or it still holds
    /// the share it was last sent (its stream is open) and has not been silent for long.
    fn counts(&self, stream_open: bool) -> bool {
        let silent = self.at.elapsed();
        silent < STALE || (stream_open && silent < HOLD)
    }
}

/// Whether a proxy's shares stream is read by an open watch stream.
fn stream_open(channels: &HashMap<Key, watch::Sender<Option<Bytes>>>, key: &Key) -> bool {
    channels.get(key).is_some_and(|tx| tx.receiver_count() > 0)
}

impl GroupLimits {
    /// A proxy's demand report.
    pub fn report(&self, group: &str, node: &str, demand: BTreeMap<String, f64>) {
        let mut nodes = self.nodes.lock().unwrap();
        let e = nodes
            .entry((group.to_string(), node.to_string()))
            .or_insert_with(|| Node {
                at: Instant::now(),
                demand: BTreeMap::new(),
                sent: BTreeMap::new(),
            });
        e.at = Instant::now();
        e.demand = demand;
    }

    /// The demand of this replica's proxies that take part in the division, to publish for
    /// the other replicas: `[{"group", "node", "demand": {limit: requests per second}}]`.
    pub fn local_demand(&self) -> serde_json::Value {
        let nodes = self.nodes.lock().unwrap();
        let channels = self.channels.lock().unwrap();
        let list: Vec<serde_json::Value> = nodes
            .iter()
            .filter(|(k, n)| n.counts(stream_open(&channels, k)) && !n.demand.is_empty())
            .map(|((group, node), n)| {
                serde_json::json!({ "group": group, "node": node, "demand": n.demand })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Replaces what the other replicas' proxies demand (their fresh published lists).
    pub fn set_remote(&self, entries: impl IntoIterator<Item = (Key, BTreeMap<String, f64>)>) {
        *self.remote.lock().unwrap() = entries.into_iter().collect();
    }

    /// The shares lines for a proxy's watch stream.
    pub fn subscribe(&self, group: &str, node: &str) -> watch::Receiver<Option<Bytes>> {
        // Locks nodes before channels, as everything else does.
        let mut nodes = self.nodes.lock().unwrap();
        let key = (group.to_string(), node.to_string());
        // A new stream starts without what the old one was sent.
        if let Some(n) = nodes.get_mut(&key) {
            n.sent.clear();
        }
        let mut channels = self.channels.lock().unwrap();
        channels
            .entry(key)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Computes every share and sends the proxies whose shares changed.
    pub fn tick(&self) {
        let mut nodes = self.nodes.lock().unwrap();
        nodes.retain(|_, n| n.at.elapsed() < HOLD);
        let channels = self.channels.lock().unwrap();
        // (group, limit) -> the nodes taking part and their demand.
        let mut limits: BTreeMap<(&str, &str), Vec<(&Key, f64)>> = BTreeMap::new();
        let counts = |key: &Key, n: &Node| n.counts(stream_open(&channels, key));
        for (key, n) in nodes.iter().filter(|(k, n)| counts(k, n)) {
            for (limit, d) in &n.demand {
                limits.entry((&key.0, limit)).or_default().push((key, *d));
            }
        }
        // Other replicas' proxies take part in the division (a proxy that moved here counts
        // once, as reported here); their shares are theirs to send.
        let remote = self.remote.lock().unwrap();
        for (key, demand) in remote.iter() {
            if nodes.get(key).is_some_and(|n| counts(key, n)) {
                continue;
            }
            for (limit, d) in demand {
                limits.entry((&key.0, limit)).or_default().push((key, *d));
            }
        }
        let mut next: HashMap<Key, BTreeMap<String, f64>> = HashMap::new();
        for ((_, limit), who) in &limits {
            let demands: Vec<f64> = who.iter().map(|(_, d)| *d).collect();
            for ((key, _), share) in who.iter().zip(shares(&demands)) {
                next.entry((*key).clone())
                    .or_default()
                    .insert(limit.to_string(), share);
            }
        }
        for (key, new) in next {
            let Some(n) = nodes.get_mut(&key) else {
                continue;
            };
            let changed = new.len() != n.sent.len()
                || new
                    .iter()
                    .any(|(k, v)| n.sent.get(k).is_none_or(|old| (old - v).abs() > 0.005));
            if !changed {
                continue;
            }
            if let Some(tx) = channels.get(&key) {
                let mut line =
                    serde_json::to_vec(&serde_json::json!({ "shares": new })).unwrap_or_default();
                line.push(b'\n');
                tx.send_replace(Some(Bytes::from(line)));
                n.sent = new;
            }
        }
    }

    /// Forgets the channels no stream reads and whose proxy is gone.
    fn sweep(&self) {
        let nodes = self.nodes.lock().unwrap();
        self.channels
            .lock()
            .unwrap()
            .retain(|k, tx| tx.receiver_count() > 0 || nodes.contains_key(k));
    }
}

/// Ticks every second for as long as the control plane runs.
pub fn spawn(limits: Arc<GroupLimits>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TICK).await;
            limits.tick();
            limits.sweep();
        }
    })
}

/// Waits for the next shares line of a stream (`None`: the stream has none, or no more).
pub async fn next_line(rx: &mut Option<watch::Receiver<Option<Bytes>>>) -> Option<Bytes> {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    if r.changed().await.is_err() {
        *rx = None;
        return None;
    }
    r.borrow_and_update().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_demand_above_a_floor_and_add_up_to_one() {
        let s = shares(&[500.0, 50.0, 50.0]);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((s[0] - (0.1 / 3.0 + 0.9 * 500.0 / 600.0)).abs() < 1e-9);
        assert!(s[1] > 0.1 / 3.0 && s[1] == s[2]);
        assert_eq!(shares(&[0.0, 0.0]), vec![0.5, 0.5]);
        assert_eq!(shares(&[7.0]), vec![1.0]);
    }

    #[tokio::test]
    async fn proxies_get_their_shares_when_they_change() {
        let g = GroupLimits::default();
        let mut a = Some(g.subscribe("g", "a"));
        g.report("g", "a", demand(90.0));
        g.report("g", "b", demand(10.0));
        g.tick();
        let line = next_line(&mut a).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let share = v["shares"]["web/api"].as_f64().unwrap();
        assert!((share - (0.05 + 0.9 * 0.9)).abs() < 1e-9, "{share}");
        // Unchanged: nothing new is sent.
        g.tick();
        assert!(!a.as_mut().unwrap().has_changed().unwrap());
    }

    #[tokio::test]
    async fn other_replicas_proxies_take_part_in_the_division() {
        // Replica 1 has proxy a; replica 2 has b and c, whose demand replica 1 read.
        let r1 = GroupLimits::default();
        let r2 = GroupLimits::default();
        let mut a = Some(r1.subscribe("g", "a"));
        r1.report("g", "a", demand(100.0));
        r2.report("g", "b", demand(100.0));
        r2.report("g", "c", demand(100.0));
        let published = r2.local_demand();
        assert_eq!(published.as_array().unwrap().len(), 2, "{published}");
        r1.set_remote(published.as_array().unwrap().iter().map(|e| {
            let key = (
                e["group"].as_str().unwrap().into(),
                e["node"].as_str().unwrap().into(),
            );
            (key, demand(e["demand"]["web/api"].as_f64().unwrap()))
        }));
        // A proxy that moved to replica 1 is counted once, as reported there.
        r1.report("g", "b", demand(100.0));
        r1.tick();
        let line = next_line(&mut a).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let share = v["shares"]["web/api"].as_f64().unwrap();
        assert!(
            (share - 1.0 / 3.0).abs() < 1e-9,
            "a third each, not a half: {share}"
        );
    }

    /// A proxy's demand for the one limit these tests use.
    fn demand(d: f64) -> BTreeMap<String, f64> {
        [("web/api".to_string(), d)].into()
    }

    /// Makes a proxy's last report `ago` old.
    fn silent(g: &GroupLimits, node: &str, ago: Duration) {
        let mut nodes = g.nodes.lock().unwrap();
        let n = nodes.get_mut(&("g".to_string(), node.to_string())).unwrap();
        n.at = Instant::now().checked_sub(ago).unwrap();
    }

    fn share_of(line: &Bytes) -> f64 {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        v["shares"]["web/api"].as_f64().unwrap()
    }

    #[tokio::test]
    async fn a_late_proxy_with_its_stream_open_keeps_its_share() {
        let g = GroupLimits::default();
        let mut a = Some(g.subscribe("g", "a"));
        let b = Some(g.subscribe("g", "b"));
        g.report("g", "a", demand(400.0));
        g.report("g", "b", demand(40.0));
        g.tick();
        let before = share_of(&next_line(&mut a).await.unwrap());
        assert!(before < 0.9, "{before}");
        // b's report is late, but its stream is open: it still enforces its share, so a
        // does not take the whole rate (nor is it published as gone).
        silent(&g, "b", STALE + Duration::from_secs(1));
        g.tick();
        assert!(
            !a.as_mut().unwrap().has_changed().unwrap(),
            "a's share moved"
        );
        assert_eq!(g.local_demand().as_array().unwrap().len(), 2);
        // Its stream closed: b is gone, and a has the whole rate.
        drop(b);
        g.tick();
        let after = share_of(&next_line(&mut a).await.unwrap());
        assert_eq!(after, 1.0);
        assert_eq!(g.local_demand().as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_proxy_silent_for_long_leaves_even_with_its_stream_open() {
        let g = GroupLimits::default();
        let mut a = Some(g.subscribe("g", "a"));
        let _b = Some(g.subscribe("g", "b"));
        g.report("g", "a", demand(100.0));
        g.report("g", "b", demand(100.0));
        g.tick();
        assert!((share_of(&next_line(&mut a).await.unwrap()) - 0.5).abs() < 1e-9);
        silent(&g, "b", HOLD + Duration::from_secs(1));
        g.tick();
        assert_eq!(share_of(&next_line(&mut a).await.unwrap()), 1.0);
    }
}
