//! The status report: which version the proxy serves (or rejected, and why), and what its
//! traffic did since the previous report, sent to the control plane every
//! [`REPORT_EVERY`] and at once when the status changes.
//!
//! Why push summaries rather than let the control plane scrape: the control plane then
//! needs no network path to any proxy (a sidecar's admin port is usually closed to the
//! mesh), and one connection per proxy carries everything. Why deltas: the control plane
//! only adds what arrives into time slots, and a proxy restart needs no special case. A
//! report that does not get through is not lost: the next one carries its counts too,
//! because only an accepted report moves the "sent" marks.
//!
//! On the request path this is [`Target::record`]: four relaxed atomic adds into counters
//! resolved when the snapshot was compiled (no lock, no allocation, no map lookup).

use crate::reload::ControlSource;
use crate::Proxy;
use bytes::Bytes;
use spur_config::report::{bucket_of, ClusterState, Sketch, TargetCounts, Traffic, BUCKETS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a proxy reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Which route, cluster and split side a [`Target`] counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
    pub side: Option<u32>,
}

/// The counters of one route's cluster (one side of a split), for the life of the process.
pub struct Target {
    pub key: Key,
    requests: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

/// Whether a request counts as failed in the reports (and so in a rollout's error rate):
/// a 5xx, Spur's own included, or no response at all (status 0); for a gRPC call, a
/// status that says the server side failed (`grpc` is the call's gRPC status): UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE or DATA_LOSS, the codes a 5xx
/// maps to. A client's own mistake (NOT_FOUND, INVALID_ARGUMENT, ...) or its cancel is not
/// the upstream failing.
#[inline]
pub fn failed(status: u16, grpc: Option<u8>) -> bool {
    match grpc {
        Some(code) => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
        None => status >= 500 || status == 0,
    }
}

/// A [`Target`]'s counters read at one moment.
#[derive(Clone, PartialEq)]
struct Counts {
    requests: u64,
    errors: u64,
    retries: u64,
    latency: Sketch,
}

impl Target {
    fn new(key: Key) -> Target {
        Target {
            key,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts one finished request: whether it failed (see [`failed`]), tries made and
    /// duration.
    #[inline]
    pub fn record(&self, failed: bool, attempts: u32, elapsed: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
        if attempts > 1 {
            self.retries.fetch_add(u64::from(attempts - 1), Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket_of(micros)].fetch_add(1, Relaxed);
    }

    fn read(&self) -> Counts {
        let mut latency = Sketch::default();
        for (c, a) in latency.counts.iter_mut().zip(self.latency.iter()) {
            *c = a.load(Relaxed);
        }
        Counts {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            latency,
        }
    }
}

impl Counts {
    fn zero() -> Counts {
        Counts {
            requests: 0,
            errors: 0,
            retries: 0,
            latency: Sketch::default(),
        }
    }

    fn minus(&self, before: &Counts) -> Counts {
        let mut latency = Sketch::default();
        for ((d, now), was) in latency
            .counts
            .iter_mut()
            .zip(self.latency.counts.iter())
            .zip(before.latency.counts.iter())
        {
            *d = now.saturating_sub(*was);
        }
        Counts {
            requests: self.requests.saturating_sub(before.requests),
            errors: self.errors.saturating_sub(before.errors),
            retries: self.retries.saturating_sub(before.retries),
            latency,
        }
    }
}

struct Entry {
    target: Arc<Target>,
    /// What the last accepted report covered.
    sent: Counts,
}

/// Every [`Target`] of the process, by key. Compiling a snapshot fetches its targets here
/// (the same one again for an unchanged route), so counts survive config pushes; a target
/// no snapshot or request holds any more is dropped once its last counts were reported.
#[derive(Default)]
pub struct Targets {
    map: Mutex<HashMap<Key, Entry>>,
}

/// The counts a report carried, to mark as sent once it is accepted.
pub struct Marks(Vec<(Key, Counts)>);

impl Targets {
    /// The target of this route's cluster (made if new). Called when compiling.
    pub fn get(
        &self,
        listener: &Arc<str>,
        route: &Arc<str>,
        cluster: &Arc<str>,
        side: Option<u32>,
    ) -> Arc<Target> {
        let key = Key {
            listener: listener.clone(),
            route: route.clone(),
            cluster: cluster.clone(),
            side,
        };
        let mut map = self.map.lock().unwrap();
        map.entry(key.clone())
            .or_insert_with(|| Entry {
                target: Arc::new(Target::new(key)),
                sent: Counts::zero(),
            })
            .target
            .clone()
    }

    /// What the targets counted since the last accepted report (targets with nothing new
    /// are left out), and the marks to commit when this report is accepted.
    pub fn delta(&self) -> (Vec<TargetCounts>, Marks) {
        let map = self.map.lock().unwrap();
        let mut out = Vec::new();
        let mut marks = Vec::new();
        for (key, e) in map.iter() {
            let now = e.target.read();
            if now == e.sent {
                continue;
            }
            let d = now.minus(&e.sent);
            out.push(TargetCounts {
                listener: key.listener.to_string(),
                route: key.route.to_string(),
                cluster: key.cluster.to_string(),
                side: key.side,
                requests: d.requests,
                errors: d.errors,
                retries: d.retries,
                latency: d.latency,
            });
            marks.push((key.clone(), now));
        }
        (out, Marks(marks))
    }

    /// The report with these marks was accepted: its counts are sent. Targets nobody uses
    /// any more and with nothing left to send go.
    pub fn commit(&self, marks: Marks) {
        let mut map = self.map.lock().unwrap();
        for (key, counts) in marks.0 {
            if let Some(e) = map.get_mut(&key) {
                e.sent = counts;
            }
        }
        map.retain(|_, e| Arc::strong_count(&e.target) > 1 || e.target.read() != e.sent);
    }
}

/// The proxy's status as last set by the config watch.
#[derive(Clone, Default)]
struct Status {
    applied: u64,
    rejected: Option<(u64, String)>,
}

/// Sends the status reports of one proxy: [`Reporter::set`] changes the status and sends it
/// at once; the loop resends it every [`REPORT_EVERY`] with the traffic since the last one.
pub struct Reporter {
    status: Mutex<Option<Status>>,
    wake: tokio::sync::Notify,
}

impl Reporter {
    /// Starts the report loop of `proxy`; it sends nothing before the first [`Reporter::set`]
    /// (the proxy has not reached the control plane yet) and ends with the proxy.
    pub fn spawn(proxy: &Arc<Proxy>, src: ControlSource) -> Arc<Reporter> {
        let reporter = Arc::new(Reporter {
            status: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        });
        let weak = Arc::downgrade(proxy);
        let me = reporter.clone();
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(REPORT_EVERY, me.wake.notified()).await;
                let Some(proxy) = weak.upgrade() else { return };
                let status = me.status.lock().unwrap().clone();
                if let Some(status) = status {
                    send(&proxy, &src, &status).await;
                }
            }
        });
        reporter
    }

    /// The version served, and the one rejected with why (`None`: no error to report).
    pub fn set(&self, applied: u64, rejected: Option<(u64, String)>) {
        *self.status.lock().unwrap() = Some(Status { applied, rejected });
        self.wake.notify_one();
    }
}

/// Every cluster of the serving config, with its ejected endpoints.
fn clusters(proxy: &Proxy) -> Vec<ClusterState> {
    let snap = proxy.shared.snapshot.load();
    let mut out: Vec<ClusterState> = snap
        .clusters
        .values()
        .map(|c| {
            let members = c.members.load();
            ClusterState {
                cluster: c.name.to_string(),
                endpoints: members.endpoints.len() as u32,
                ejected: members.endpoints.iter().filter(|e| e.is_ejected()).count() as u32,
            }
        })
        .collect();
    out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    out
}

async fn send(proxy: &Proxy, src: &ControlSource, status: &Status) {
    let (targets, marks) = proxy.shared.registry.traffic.delta();
    let traffic = Traffic {
        targets,
        clusters: clusters(proxy),
    };
    let mut doc = serde_json::json!({ "applied_version": status.applied, "traffic": traffic });
    if let Some((v, e)) = &status.rejected {
        doc["rejected_version"] = (*v).into();
        doc["error"] = e.as_str().into();
    }
    if let Some(id) = proxy.identity() {
        doc["certificate_expires_at"] = id.material().expires_at.into();
    }
    let path = format!("/v1/groups/{}/proxies/{}/status", src.group, src.node);
    let Ok(req) =
        crate::reload::request(src, http::Method::POST, &path, Bytes::from(doc.to_string()))
    else {
        return;
    };
    match tokio::time::timeout(Duration::from_secs(3), src.client.request(req)).await {
        Ok(Ok(r)) if r.status().is_success() => proxy.shared.registry.traffic.commit(marks),
        Ok(Ok(r)) => tracing::warn!(status = %r.status(), "status report refused"),
        Ok(Err(e)) => tracing::debug!(error = %e, "status report failed"),
        Err(_) => tracing::debug!("status report timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_calls_fail_on_server_side_codes_not_on_the_http_status() {
        // A gRPC error rides on HTTP 200: only its gRPC status says it failed.
        assert!(failed(200, Some(14)), "UNAVAILABLE");
        assert!(failed(200, Some(13)), "INTERNAL");
        assert!(!failed(200, Some(0)), "OK");
        assert!(!failed(200, Some(5)), "NOT_FOUND is the client's mistake");
        assert!(!failed(200, Some(1)), "CANCELLED by the client");
        assert!(failed(502, None) && failed(0, None) && !failed(404, None));
    }

    #[test]
    fn deltas_carry_over_until_a_report_is_accepted() {
        let targets = Targets::default();
        let (l, r, c): (Arc<str>, Arc<str>, Arc<str>) = ("web".into(), "api".into(), "v2".into());
        let t = targets.get(&l, &r, &c, Some(1));
        t.record(failed(200, None), 1, Duration::from_millis(3));
        t.record(failed(503, None), 3, Duration::from_millis(40));
        let (d, _lost) = targets.delta();
        assert_eq!((d[0].requests, d[0].errors, d[0].retries), (2, 1, 2));
        assert_eq!(d[0].side, Some(1));
        // Not accepted: the next report carries these too.
        t.record(failed(200, None), 1, Duration::from_millis(3));
        let (d, marks) = targets.delta();
        assert_eq!(d[0].requests, 3);
        assert_eq!(d[0].latency.total(), 3);
        targets.commit(marks);
        let (d, _) = targets.delta();
        assert!(d.is_empty(), "nothing new since the accepted report");
        // The same key again is the same target: counts survive a recompile.
        assert!(Arc::ptr_eq(&t, &targets.get(&l, &r, &c, Some(1))));
        // Unused and fully reported: dropped at the next commit.
        drop(t);
        let (_, marks) = targets.delta();
        targets.commit(marks);
        assert!(targets.map.lock().unwrap().is_empty());
    }
}
