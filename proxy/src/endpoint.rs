//! Per-endpoint state that outlives config swaps: in-flight counts, latency estimates,
//! breaker and health state, the upstream connection pool and the endpoint's metric series.
//!
//! A compiled snapshot refers to endpoints through `Arc<EndpointState>` handed out by the
//! [`crate::registry::Registry`]; compiling a new snapshot asks the registry again, which
//! returns the same state for an endpoint that is still there. So a config push neither
//! resets an endpoint's load figures nor drops its pooled connections. When the last
//! snapshot and the last request let go of an endpoint, its state goes, and the registry
//! removes its metric series.

use crate::metrics::{CodeCounters, EndpointLabels, Metrics, TcpLabels, UpstreamLabels};
use crate::policy::balance::{Candidate, PeakEwma};
use crate::policy::breaker::{self, Breaker, Transition};
use crate::policy::health::Health;
use crate::upstream::pool::Pool;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct EndpointState {
    pub cluster: Arc<str>,
    pub addr: SocketAddr,
    /// `ip:port`, the endpoint label in metrics and logs.
    pub label: Arc<str>,
    pub authority: http::uri::Authority,
    weight: AtomicU32,
    in_flight: AtomicU32,
    ewma: Mutex<PeakEwma>,
    breaker: Mutex<Breaker>,
    /// Mirrors "the breaker is not closed", so that the common case reads one atomic.
    open: AtomicBool,
    health: Mutex<Health>,
    healthy: AtomicBool,
    /// Since when the endpoint is in slow start: nanoseconds after [`RAMP_EPOCH`] (0: not).
    ramp_since: AtomicU64,
    /// HTTP/1.1 and HTTP/2 connections to this endpoint.
    pub pool: Pool,
    pub metrics: Arc<EndpointMetrics>,
}

/// The metric series of one endpoint; the registry removes them once the endpoint is gone.
pub struct EndpointMetrics {
    /// `spur_upstream_requests_total{cluster, endpoint, code}`.
    pub tries: CodeCounters<UpstreamLabels>,
    /// `spur_endpoint_ejected`.
    pub ejected: Gauge,
    /// `spur_endpoint_healthy`.
    pub healthy: Gauge,
    labels: EndpointLabels,
    /// `spur_tcp_connections_total` series of this endpoint (by listener and result).
    tcp: Mutex<Vec<(TcpLabels, Counter)>>,
}

impl EndpointMetrics {
    fn new(m: &Metrics, cluster: &Arc<str>, label: &Arc<str>) -> EndpointMetrics {
        let labels = EndpointLabels {
            cluster: cluster.clone(),
            endpoint: label.clone(),
        };
        let tries = CodeCounters::new(
            &m.upstream_requests,
            UpstreamLabels {
                cluster: cluster.clone(),
                endpoint: label.clone(),
                code: 0,
                grpc_status: None,
            },
        );
        let ejected = m.endpoint_ejected.get_or_create(&labels).clone();
        let healthy = m.endpoint_healthy.get_or_create(&labels).clone();
        healthy.set(1);
        EndpointMetrics {
            tries,
            ejected,
            healthy,
            labels,
            tcp: Mutex::new(Vec::new()),
        }
    }

    /// Counts a connection of a `tcp` listener to this endpoint.
    pub fn tcp_connection(&self, m: &Metrics, listener: &Arc<str>, result: &'static str) {
        let mut tcp = self.tcp.lock().unwrap();
        if let Some((_, c)) = tcp
            .iter()
            .find(|(l, _)| l.result == result && l.listener == *listener)
        {
            c.inc();
            return;
        }
        let labels = TcpLabels {
            listener: listener.clone(),
            cluster: self.labels.cluster.clone(),
            endpoint: self.labels.endpoint.clone(),
            result,
        };
        let c = m.tcp_connections.get_or_create(&labels).clone();
        c.inc();
        tcp.push((labels, c));
    }

    /// Removes every series of this endpoint.
    pub fn remove(&self, m: &Metrics) {
        self.tries.remove_all();
        m.endpoint_ejected.remove(&self.labels);
        m.endpoint_healthy.remove(&self.labels);
        for (labels, _) in self.tcp.lock().unwrap().iter() {
            m.tcp_connections.remove(labels);
        }
    }
}

impl EndpointState {
    pub fn new(cluster: &str, addr: SocketAddr, metrics: &Metrics) -> EndpointState {
        let cluster: Arc<str> = cluster.into();
        let label: Arc<str> = addr.to_string().into();
        let now = crate::clock::now();
        EndpointState {
            metrics: Arc::new(EndpointMetrics::new(metrics, &cluster, &label)),
            cluster,
            addr,
            authority: label.parse().expect("a socket address is an authority"),
            label,
            weight: AtomicU32::new(1),
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma::new(now)),
            breaker: Mutex::new(Breaker::new(now)),
            open: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
            healthy: AtomicBool::new(true),
            ramp_since: AtomicU64::new(0),
            pool: Pool::default(),
        }
    }

    /// Whether the balancer may choose this endpoint now: healthy, and its breaker closed
    /// or ready for a probe.
    pub fn is_available(&self, now: Instant) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && (!self.open.load(Ordering::Relaxed) || self.breaker.lock().unwrap().available(now))
    }

    /// Claims a request slot from the breaker: `None` when refused, `Some(true)` when this
    /// request is the single probe of a half-open breaker.
    pub fn try_acquire(&self, now: Instant) -> Option<bool> {
        if !self.open.load(Ordering::Relaxed) {
            return Some(false);
        }
        self.breaker.lock().unwrap().acquire(now)
    }

    pub fn is_ejected(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records a try's result in the breaker; `may_eject` is asked only when this failure
    /// would eject the endpoint.
    pub fn record(
        &self,
        failed: bool,
        settings: &breaker::Settings,
        may_eject: impl FnOnce() -> bool,
        probe: bool,
        now: Instant,
    ) -> Transition {
        let mut b = self.breaker.lock().unwrap();
        let may = failed && !b.is_ejected() && may_eject_needed(&b, settings) && may_eject();
        let t = b.record(failed, now, settings, may, probe);
        self.open.store(b.is_ejected(), Ordering::Relaxed);
        drop(b);
        match t {
            Transition::Ejected => {
                self.metrics.ejected.set(1);
            }
            Transition::Restored => {
                self.metrics.ejected.set(0);
            }
            Transition::None => {}
        }
        t
    }

    /// Records a health check; returns the new health when it changed.
    pub fn record_check(
        &self,
        passed: bool,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
    ) -> Option<bool> {
        let mut h = self.health.lock().unwrap();
        if !h.record(passed, unhealthy_threshold, healthy_threshold) {
            return None;
        }
        self.healthy.store(h.healthy, Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(h.healthy));
        Some(h.healthy)
    }

    /// Counts a request in flight until the guard is dropped; `probe` as returned by
    /// [`EndpointState::try_acquire`].
    pub fn start(self: &Arc<Self>, probe: bool) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            probe,
        }
    }

    /// Starts the endpoint afresh in the balancer, at its peers' typical latency, with its
    /// old latency and failures forgotten: it is back (its probe succeeded, or health checks
    /// passed again) and should get its share at once.
    pub fn restart_estimate(&self, members: &crate::snapshot::Members, now: Instant) {
        let me = members
            .endpoints
            .iter()
            .position(|e| std::ptr::eq(&**e, self))
            .unwrap_or(usize::MAX);
        let estimate = crate::policy::balance::peer_estimate(&members.endpoints, me, now);
        self.ewma.lock().unwrap().reset(estimate, now);
        self.start_ramp(now);
    }

    /// Starts the endpoint's slow start at `now` (it is new to its cluster, or back). It
    /// matters only in a cluster with `slow_start`; the ramp ends by itself.
    pub fn start_ramp(&self, now: Instant) {
        let epoch = *RAMP_EPOCH.get_or_init(|| now - Duration::from_secs(1));
        let ns = now.saturating_duration_since(epoch).as_nanos() as u64;
        self.ramp_since.store(ns.max(1), Ordering::Relaxed);
    }

    /// Since when the endpoint is in slow start.
    pub fn ramp_since(&self) -> Option<Instant> {
        let ns = self.ramp_since.load(Ordering::Relaxed);
        let epoch = RAMP_EPOCH.get()?;
        (ns != 0).then(|| *epoch + Duration::from_nanos(ns))
    }

    /// Records how long the endpoint took to answer, or that it failed.
    pub fn observe(&self, rtt: Duration, failed: bool, now: Instant) {
        self.ewma.lock().unwrap().observe(rtt, failed, now);
    }

    pub fn in_flight_now(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma_ms(&self) -> f64 {
        self.ewma.lock().unwrap().estimate_ns(crate::clock::now()) / 1e6
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Ordering::Relaxed);
    }

    /// Forgets any ejection (the cluster no longer has a circuit breaker).
    pub fn reset_breaker(&self) {
        if self.open.load(Ordering::Relaxed) {
            *self.breaker.lock().unwrap() = Breaker::new(crate::clock::now());
            self.open.store(false, Ordering::Relaxed);
            self.metrics.ejected.set(0);
        }
    }

    pub fn weight_now(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }
}

/// Whether the next failure would reach the ejection threshold (so the cluster must be
/// asked whether an ejection is allowed).
fn may_eject_needed(b: &Breaker, s: &breaker::Settings) -> bool {
    b.consecutive() + 1 >= s.consecutive_failures
}

impl Candidate for Arc<EndpointState> {
    fn weight(&self) -> u32 {
        self.weight_now()
    }
    fn in_flight(&self) -> u32 {
        self.in_flight_now()
    }
    fn latency_ns(&self, now: Instant) -> f64 {
        self.ewma.lock().unwrap().estimate_ns(now)
    }
    fn available(&self, now: Instant) -> bool {
        self.is_available(now)
    }
    fn ramp_since(&self) -> Option<Instant> {
        EndpointState::ramp_since(self)
    }
}

/// The instant slow-start stamps count from (set by the first one).
static RAMP_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A request in flight to an endpoint; dropping it ends the count.
pub struct InFlight {
    pub endpoint: Arc<EndpointState>,
    /// This request holds the half-open probe slot.
    pub probe: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            // A probe that ended without a verdict (the client went away) frees the slot;
            // after a verdict the breaker is no longer half-open and this does nothing.
            self.endpoint.breaker.lock().unwrap().release();
        }
    }
}

/// A cluster's concurrency limits (`max_requests`, `max_pending`): at most `max_requests`
/// requests (tcp: connections) in flight; up to `max_pending` more wait for a slot; the rest
/// fail fast.
pub struct ClusterLimits {
    pub max_requests: u32,
    pub max_pending: u32,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub waiting: AtomicU32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::balance::DEFAULT_RTT;

    fn endpoint(m: &Metrics) -> Arc<EndpointState> {
        endpoint_at(m, "10.0.0.1:80")
    }

    fn endpoint_at(m: &Metrics, addr: &str) -> Arc<EndpointState> {
        Arc::new(EndpointState::new("c", addr.parse().unwrap(), m))
    }

    #[test]
    fn an_endpoint_restored_by_its_probe_starts_afresh() {
        let m = Metrics::new();
        let e = endpoint(&m);
        let s = breaker::Settings {
            consecutive_failures: 1,
            ejection_time: Duration::from_secs(10),
        };
        let t0 = crate::clock::now();
        // It was slow, then failed: ejected, and its estimate is high.
        e.observe(Duration::from_secs(3), false, t0);
        assert_eq!(e.record(true, &s, || true, false, t0), Transition::Ejected);
        assert!(m
            .encode()
            .contains(r#"spur_endpoint_ejected{cluster="c",endpoint="10.0.0.1:80"} 1"#));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(e.try_acquire(t1), Some(true), "the probe");
        assert_eq!(e.record(false, &s, || true, true, t1), Transition::Restored);
        assert!(m
            .encode()
            .contains(r#"spur_endpoint_ejected{cluster="c",endpoint="10.0.0.1:80"} 0"#));
        // Back: it starts at its fastest peer's estimate, its slow past forgotten.
        let peer = endpoint_at(&m, "10.0.0.2:80");
        peer.observe(Duration::from_millis(2), false, t1);
        let members = crate::snapshot::Members::build(
            spur_config::LbPolicy::Ewma,
            vec![e.clone(), peer.clone()],
            vec![1, 1],
        );
        assert!(e.latency_ns(t1) > 1e9);
        e.restart_estimate(&members, t1);
        assert_eq!(e.latency_ns(t1), peer.latency_ns(t1));
    }

    #[test]
    fn health_checks_mark_an_endpoint_down_and_up() {
        let m = Metrics::new();
        let e = endpoint(&m);
        assert_eq!(e.record_check(false, 1, 1), Some(false));
        assert!(m
            .encode()
            .contains(r#"spur_endpoint_healthy{cluster="c",endpoint="10.0.0.1:80"} 0"#));
        assert_eq!(e.record_check(true, 1, 1), Some(true));
        assert!(m
            .encode()
            .contains(r#"spur_endpoint_healthy{cluster="c",endpoint="10.0.0.1:80"} 1"#));
        // With no peer to compare to, a restart starts from the default.
        let alone =
            crate::snapshot::Members::build(spur_config::LbPolicy::Ewma, vec![e.clone()], vec![1]);
        let now = crate::clock::now();
        e.observe(Duration::from_secs(2), false, now);
        e.restart_estimate(&alone, now);
        assert_eq!(e.latency_ns(now), DEFAULT_RTT.as_nanos() as f64);
    }

    #[test]
    fn removing_its_series_leaves_no_trace() {
        let m = Metrics::new();
        let e = endpoint(&m);
        e.metrics.tries.inc(200);
        e.metrics.tries.inc(0);
        e.metrics.tcp_connection(&m, &"db".into(), "refused");
        assert!(m.encode().contains("10.0.0.1:80"));
        e.metrics.remove(&m);
        assert!(!m.encode().contains("10.0.0.1:80"), "{}", m.encode());
    }
}
