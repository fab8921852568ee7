//! Per-endpoint state that outlives config swaps: in-flight counts, latency estimates and
//! upstream connection pools.
//!
//! A compiled snapshot refers to endpoints through `Arc<EndpointState>` handed out by the
//! [`Registry`]; compiling a new snapshot asks the registry again, which returns the same
//! state for an endpoint that is still there. So a config push neither resets an endpoint's
//! load figures nor drops its pooled connections.

use crate::policy::balance::{Candidate, PeakEwma};
use crate::upstream::{Client, ClientKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
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
        }
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
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

    pub fn weight_now(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }
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
        true
    }
}

/// A request in flight to an endpoint; dropping it ends the count.
pub struct InFlight(pub Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where endpoint state and connection pools live between snapshots.
#[derive(Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<(String, SocketAddr), Weak<EndpointState>>>,
    clients: Mutex<HashMap<ClientKey, Client>>,
}

impl Registry {
    /// The state of endpoint `addr` of `cluster`: the existing one if a snapshot still holds
    /// it, else a new one. The weight is updated to the config's.
    pub fn endpoint(&self, cluster: &str, addr: SocketAddr, weight: u32) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap();
        let key = (cluster.to_string(), addr);
        if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
            existing.weight.store(weight, Ordering::Relaxed);
            return existing;
        }
        let state = Arc::new(EndpointState::new(addr, weight));
        map.insert(key, Arc::downgrade(&state));
        state
    }

    /// The pooled client for a cluster's upstream settings.
    pub fn client(&self, key: ClientKey) -> Client {
        self.clients
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_insert_with(|| crate::upstream::new_client(&key))
            .clone()
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
