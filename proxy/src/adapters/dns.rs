//! `dns:` clusters: the endpoints are what `host:port` resolves to, re-resolved every
//! [`REFRESH`]. A failed, timed-out or empty answer keeps the last good set (a DNS hiccup
//! must not empty a cluster). Endpoint state is fetched from the registry, so an address
//! that stays in the answer keeps its pool, latency estimate and breaker.
//!
//! The lookup itself is a [`Resolve`]: the system resolver ([`SystemResolver`]) in the
//! proxy, a scripted one in the tests below, which is how refresh and "keep the last good
//! answer" are tested without a DNS server.

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::snapshot::{ClusterRt, Members};
use crate::Shared;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub const REFRESH: Duration = Duration::from_secs(5);
/// How long one lookup may take before it counts as failed.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

pub type Lookup<'a> = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Resolves `host:port` to socket addresses.
pub trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, target: &'a str) -> Lookup<'a>;
}

/// The operating system's resolver (`getaddrinfo`, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, target: &'a str) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// How a `dns:` cluster is resolved: by whom, how long one lookup may take, how often.
#[derive(Clone)]
pub struct Dns {
    pub resolver: Arc<dyn Resolve>,
    pub timeout: Duration,
    pub period: Duration,
}

impl Dns {
    /// The proxy's: the system resolver, [`LOOKUP_TIMEOUT`], every [`REFRESH`].
    pub fn system() -> Dns {
        Dns {
            resolver: Arc::new(SystemResolver),
            timeout: LOOKUP_TIMEOUT,
            period: REFRESH,
        }
    }

    /// One lookup, sorted and deduplicated; `None` (logged) when it failed, timed out or
    /// was empty.
    async fn resolve(&self, target: &str) -> Option<Vec<SocketAddr>> {
        match tokio::time::timeout(self.timeout, self.resolver.lookup(target)).await {
            Ok(Ok(mut v)) => {
                v.sort();
                v.dedup();
                if v.is_empty() {
                    tracing::warn!(target, "DNS answer is empty; keeping the last endpoints");
                }
                (!v.is_empty()).then_some(v)
            }
            Ok(Err(e)) => {
                tracing::warn!(target, error = %e, "DNS resolution failed; keeping the last endpoints");
                None
            }
            Err(_) => {
                tracing::warn!(
                    target,
                    "DNS resolution timed out; keeping the last endpoints"
                );
                None
            }
        }
    }

    /// Resolves once and installs the answer if it differs from the current endpoints;
    /// true when they changed.
    pub async fn refresh(
        &self,
        registry: &Registry,
        metrics: &Metrics,
        cluster: &ClusterRt,
    ) -> bool {
        let Some(target) = &cluster.dns else {
            return false;
        };
        let Some(addrs) = self.resolve(target).await else {
            return false;
        };
        let current = cluster.members.load();
        let same = current.endpoints.len() == addrs.len()
            && current
                .endpoints
                .iter()
                .zip(&addrs)
                .all(|(e, a)| e.addr == *a);
        if same {
            return false;
        }
        let endpoints: Vec<_> = addrs
            .iter()
            .map(|a| registry.endpoint(&cluster.name, *a, metrics))
            .collect();
        let weights = vec![1; endpoints.len()];
        let members = Arc::new(Members::build(cluster.lb, endpoints, weights));
        // New endpoints of a cluster that was serving start as recovered ones do: their
        // peers' latency, and slow start.
        let now = crate::clock::now();
        for e in &members.endpoints {
            if !current.endpoints.is_empty() && !current.endpoints.iter().any(|c| Arc::ptr_eq(c, e))
            {
                e.restart_estimate(&members, now);
            }
        }
        cluster.members.store(members);
        // Per-address upstream state (QUIC connections) of addresses that left goes.
        cluster.client.retain(&|a| addrs.contains(&a));
        tracing::info!(
            cluster = &*cluster.name,
            target = target.as_str(),
            endpoints = addrs.len(),
            "DNS endpoints updated"
        );
        true
    }

    /// Re-resolves every `period` while the cluster is in use: the task ends once the
    /// cluster is dropped (a config without it was applied).
    pub fn spawn(&self, shared: Arc<Shared>, cluster: &Arc<ClusterRt>) {
        if cluster.dns.is_none() {
            return;
        }
        let weak = Arc::downgrade(cluster);
        let dns = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(dns.period).await;
                let Some(c) = weak.upgrade() else { return };
                dns.refresh(&shared.registry, &shared.metrics, &c).await;
            }
        });
    }
}

/// Resolves once with the system resolver (see [`Dns::refresh`]).
pub async fn refresh(shared: &Shared, cluster: &ClusterRt) {
    Dns::system()
        .refresh(&shared.registry, &shared.metrics, cluster)
        .await;
}

/// Re-resolves with the system resolver every [`REFRESH`] (see [`Dns::spawn`]).
pub fn spawn(shared: Arc<Shared>, cluster: &Arc<ClusterRt>) {
    Dns::system().spawn(shared, cluster);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// What the scripted resolver answers next.
    enum Step {
        Answer(Vec<&'static str>),
        Fail,
        /// Never answers (the lookup times out).
        Hang,
    }

    /// Answers from a script, one step per lookup; the last step repeats.
    struct Scripted {
        steps: Mutex<VecDeque<Step>>,
        lookups: AtomicUsize,
        asked: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new(steps: Vec<Step>) -> Arc<Scripted> {
            Arc::new(Scripted {
                steps: Mutex::new(steps.into()),
                lookups: AtomicUsize::new(0),
                asked: Mutex::new(Vec::new()),
            })
        }

        /// Replaces what is left of the script.
        fn script(&self, steps: Vec<Step>) {
            *self.steps.lock().unwrap() = steps.into();
        }
    }

    impl Resolve for Scripted {
        fn lookup<'a>(&'a self, target: &'a str) -> Lookup<'a> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            self.asked.lock().unwrap().push(target.to_string());
            let step = {
                let mut steps = self.steps.lock().unwrap();
                if steps.len() > 1 {
                    steps.pop_front().unwrap()
                } else {
                    match steps.front() {
                        Some(Step::Answer(a)) => Step::Answer(a.clone()),
                        Some(Step::Fail) | None => Step::Fail,
                        Some(Step::Hang) => Step::Hang,
                    }
                }
            };
            Box::pin(async move {
                match step {
                    Step::Answer(a) => Ok(a.iter().map(|s| s.parse().unwrap()).collect()),
                    Step::Fail => Err(std::io::Error::other("no such host")),
                    Step::Hang => std::future::pending().await,
                }
            })
        }
    }

    /// Scripted answers, a 50 ms lookup timeout, every `period`.
    fn dns(script: &Arc<Scripted>, period: Duration) -> Dns {
        Dns {
            resolver: script.clone(),
            timeout: Duration::from_millis(50),
            period,
        }
    }

    /// A proxy's shared state and a compiled `dns:` cluster named `app`.
    fn dns_cluster() -> (Arc<Shared>, Arc<Snapshot>, Arc<ClusterRt>) {
        let shared = crate::Proxy::idle().unwrap().shared.clone();
        let cfg = spur_config::load(
            r#"
listeners:
  - { name: web, listen: "127.0.0.1:0", cluster: app }
clusters:
  - { name: app, dns: "app.example:8080" }
"#,
            Some("dns.yaml"),
        )
        .unwrap();
        let snap =
            Snapshot::compile(Arc::new(cfg), 1, &shared.registry, &shared.metrics, None).unwrap();
        let snap = Arc::new(snap);
        let cluster = snap.clusters["app"].clone();
        (shared, snap, cluster)
    }

    fn addrs(c: &ClusterRt) -> Vec<String> {
        c.members
            .load()
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    /// Polls `check` every 5 ms for at most 5 s.
    async fn until(mut check: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    #[tokio::test]
    async fn an_answer_is_installed_sorted_without_duplicates() {
        let (shared, _snap, app) = dns_cluster();
        assert!(addrs(&app).is_empty(), "nothing before the first answer");
        let script = Scripted::new(vec![Step::Answer(vec![
            "10.0.0.2:8080",
            "10.0.0.1:8080",
            "10.0.0.2:8080",
        ])]);
        let dns = dns(&script, REFRESH);
        assert!(dns.refresh(&shared.registry, &shared.metrics, &app).await);
        assert_eq!(addrs(&app), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(*script.asked.lock().unwrap(), ["app.example:8080"]);
        // The same answer again changes nothing.
        assert!(!dns.refresh(&shared.registry, &shared.metrics, &app).await);
    }

    #[tokio::test]
    async fn failed_empty_and_timed_out_answers_keep_the_last_good_endpoints() {
        let (shared, _snap, app) = dns_cluster();
        let script = Scripted::new(vec![
            Step::Answer(vec!["10.0.0.1:8080"]),
            Step::Fail,
            Step::Answer(vec![]),
            Step::Hang,
            Step::Answer(vec!["10.0.0.3:8080"]),
        ]);
        let dns = dns(&script, REFRESH);
        assert!(dns.refresh(&shared.registry, &shared.metrics, &app).await);
        let first = app.members.load().endpoints[0].clone();
        for what in ["a failure", "an empty answer", "a timeout"] {
            assert!(
                !dns.refresh(&shared.registry, &shared.metrics, &app).await,
                "{what}"
            );
            assert_eq!(addrs(&app), ["10.0.0.1:8080"], "after {what}");
        }
        // The endpoint state itself was kept, not rebuilt.
        assert!(Arc::ptr_eq(&first, &app.members.load().endpoints[0]));
        assert!(dns.refresh(&shared.registry, &shared.metrics, &app).await);
        assert_eq!(addrs(&app), ["10.0.0.3:8080"]);
    }

    #[tokio::test]
    async fn an_address_that_stays_keeps_its_endpoint_state() {
        let (shared, _snap, app) = dns_cluster();
        let script = Scripted::new(vec![
            Step::Answer(vec!["10.0.0.1:8080"]),
            Step::Answer(vec!["10.0.0.1:8080", "10.0.0.9:8080"]),
        ]);
        let dns = dns(&script, REFRESH);
        dns.refresh(&shared.registry, &shared.metrics, &app).await;
        let kept = app.members.load().endpoints[0].clone();
        dns.refresh(&shared.registry, &shared.metrics, &app).await;
        assert_eq!(addrs(&app), ["10.0.0.1:8080", "10.0.0.9:8080"]);
        assert!(Arc::ptr_eq(&kept, &app.members.load().endpoints[0]));
    }

    #[tokio::test]
    async fn the_refresh_loop_resolves_every_period_until_the_cluster_is_gone() {
        let (shared, snap, app) = dns_cluster();
        let script = Scripted::new(vec![Step::Answer(vec!["10.0.0.1:8080"])]);
        let period = Duration::from_millis(100);
        let started = std::time::Instant::now();
        dns(&script, period).spawn(shared.clone(), &app);
        assert!(until(|| addrs(&app) == ["10.0.0.1:8080"]).await);
        assert!(started.elapsed() >= period, "not before the first period");

        // The answer changes: it arrives on a later period. Then the resolver breaks: the
        // lookups go on and the last good answer stays.
        script.script(vec![Step::Answer(vec!["10.0.0.2:8080"]), Step::Fail]);
        assert!(until(|| addrs(&app) == ["10.0.0.2:8080"]).await);
        let now = script.lookups.load(Ordering::SeqCst);
        assert!(until(|| script.lookups.load(Ordering::SeqCst) >= now + 3).await);
        assert_eq!(addrs(&app), ["10.0.0.2:8080"], "kept through failures");

        // A config without the cluster: the loop stops asking.
        drop((snap, app));
        tokio::time::sleep(period * 2).await;
        let after = script.lookups.load(Ordering::SeqCst);
        tokio::time::sleep(period * 3).await;
        assert_eq!(script.lookups.load(Ordering::SeqCst), after);
    }
}
