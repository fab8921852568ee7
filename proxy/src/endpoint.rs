//! Per-endpoint state that outlives config swaps: in-flight counts, latency estimates and
//! upstream connection pools.
//!
//! A compiled snapshot refers to endpoints through `Arc<EndpointState>` handed out by the
//! [`Registry`]; compiling a new snapshot asks the registry again, which returns the same
//! state for an endpoint that is still there. So a config push neither resets an endpoint's
//! load figures nor drops its pooled connections.

use crate::policy::balance::{Candidate, PeakEwma};
use crate::policy::breaker::{self, Breaker, Transition};
use crate::policy::budget::Budget;
use crate::policy::health::Health;
use crate::tls::ClientTlsRt;
use crate::upstream::{ClientKey, Upstream};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub struct EndpointState {
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
}

impl EndpointState {
    fn new(addr: SocketAddr, weight: u32) -> EndpointState {
        let label: Arc<str> = addr.to_string().into();
        EndpointState {
            addr,
            authority: label.parse().expect("a socket address is an authority"),
            label,
            weight: AtomicU32::new(weight),
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma::new(Instant::now())),
            breaker: Mutex::new(Breaker::new(Instant::now())),
            open: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
            healthy: AtomicBool::new(true),
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
    ) -> Transition {
        let now = Instant::now();
        let mut b = self.breaker.lock().unwrap();
        let may = failed && !b.is_ejected() && may_eject_needed(&b, settings) && may_eject();
        let t = b.record(failed, now, settings, may, probe);
        self.open.store(b.is_ejected(), Ordering::Relaxed);
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
        if h.record(passed, unhealthy_threshold, healthy_threshold) {
            self.healthy.store(h.healthy, Ordering::Relaxed);
            Some(h.healthy)
        } else {
            None
        }
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

    /// Records how long the endpoint took to answer (or fail).
    pub fn observe(&self, rtt: Duration, failed: bool) {
        self.ewma
            .lock()
            .unwrap()
            .observe(rtt, failed, Instant::now());
    }

    pub fn in_flight_now(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma_ms(&self) -> f64 {
        self.ewma.lock().unwrap().estimate_ns(Instant::now()) / 1e6
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Ordering::Relaxed);
    }

    /// Forgets any ejection (the cluster no longer has a circuit breaker).
    pub fn reset_breaker(&self) {
        if self.open.load(Ordering::Relaxed) {
            *self.breaker.lock().unwrap() = Breaker::new(Instant::now());
            self.open.store(false, Ordering::Relaxed);
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
    fn available(&self) -> bool {
        self.is_available(Instant::now())
    }
}

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
/// requests in flight; up to `max_pending` more wait for a slot; the rest fail fast.
pub struct ClusterLimits {
    pub max_requests: u32,
    pub max_pending: u32,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub waiting: AtomicU32,
}

/// A cluster's pooled client and the TLS it originates with (`None`: plain).
type PooledClient = (Upstream, Option<Arc<ClientTlsRt>>);

/// Where endpoint state, connection pools, concurrency limits and retry budgets live
/// between snapshots.
#[derive(Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<(String, SocketAddr), Weak<EndpointState>>>,
    clients: Mutex<HashMap<ClientKey, PooledClient>>,
    limits: Mutex<HashMap<String, Arc<ClusterLimits>>>,
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
}

impl Registry {
    /// The state of endpoint `addr` of `cluster`: the existing one if a snapshot still holds
    /// it, else a new one. The weight is updated to the config's.
    pub fn endpoint(&self, cluster: &str, addr: SocketAddr) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap();
        let key = (cluster.to_string(), addr);
        if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let state = Arc::new(EndpointState::new(addr, 1));
        map.insert(key, Arc::downgrade(&state));
        state
    }

    /// The pooled client for a cluster's upstream settings, and the TLS it originates with.
    /// `tls` (freshly loaded from the files) is used only when no client exists yet for these
    /// settings; an existing client keeps its own, which its watcher keeps current.
    pub fn client(
        &self,
        key: ClientKey,
        tls: Option<Arc<ClientTlsRt>>,
        metrics: &crate::metrics::Metrics,
    ) -> PooledClient {
        self.clients
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_insert_with(|| {
                (
                    crate::upstream::new_upstream(&key, tls.clone(), metrics),
                    tls,
                )
            })
            .clone()
    }

    /// The concurrency limits of `cluster`; kept across snapshots while the numbers stay.
    pub fn limits(&self, cluster: &str, max_requests: u32, max_pending: u32) -> Arc<ClusterLimits> {
        let mut map = self.limits.lock().unwrap();
        if let Some(l) = map.get(cluster) {
            if l.max_requests == max_requests && l.max_pending == max_pending {
                return l.clone();
            }
        }
        let l = Arc::new(ClusterLimits {
            max_requests,
            max_pending,
            slots: Arc::new(tokio::sync::Semaphore::new(max_requests as usize)),
            waiting: AtomicU32::new(0),
        });
        map.insert(cluster.to_string(), l.clone());
        l
    }

    /// The retry budget of a route (keyed `listener/route`); kept across snapshots while
    /// its settings stay.
    pub fn budget(&self, key: &str, ratio: f64, min_per_sec: u32) -> Arc<Budget> {
        let mut map = self.budgets.lock().unwrap();
        if let Some(b) = map.get(key) {
            if b.same_settings(ratio, min_per_sec) {
                return b.clone();
            }
        }
        let b = Arc::new(Budget::new(ratio, min_per_sec));
        map.insert(key.to_string(), b.clone());
        b
    }

    /// Forgets state no snapshot refers to any more, and clients for settings no cluster
    /// uses (their idle connections close).
    pub fn prune(&self, live_clients: &[ClientKey]) {
        self.endpoints
            .lock()
            .unwrap()
            .retain(|_, w| w.strong_count() > 0);
        self.clients
            .lock()
            .unwrap()
            .retain(|k, _| live_clients.contains(k));
    }
}
