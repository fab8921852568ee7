//! One try at one endpoint, for every protocol: HTTP/1.1, HTTP/2, HTTP/3 and TCP.
//!
//! The request path (and the TCP relay) does the I/O; an [`Attempt`] owns everything that
//! ties a try to the cluster and its endpoint:
//!
//! 1. **admission** ([`admit`]): one of the cluster's `max_requests` slots (tcp: concurrent
//!    connections), held for the whole exchange; over it, waiting among `max_pending`, or
//!    `overloaded` at once;
//! 2. **pick** ([`Attempt::pick`]): the balancer's choice among available endpoints, never
//!    one this request already tried while another is available, with the breaker's
//!    consent (a half-open endpoint admits a single probe);
//! 3. **in flight**: the endpoint's in-flight count (the balancer's load figure) while the
//!    try lasts;
//! 4. **record** ([`Attempt::record`]): what the endpoint did, into its latency estimate,
//!    its breaker and `spur_upstream_requests_total`. Only what the endpoint did: a try
//!    that failed because the client's own body broke off is charged to nobody. A gRPC
//!    response whose status comes in its trailers is judged when they come
//!    ([`Attempt::defer`]): its latency (to the head) is recorded at once, its verdict
//!    ([`Deferred::record`]) at the end of the stream.

use crate::endpoint::{ClusterLimits, EndpointState, InFlight};
use crate::metrics::{ClusterReasonLabels, Metrics};
use crate::policy::breaker::Transition;
use crate::policy::retry::Outcome;
use crate::reason::Reason;
use crate::snapshot::{ClusterRt, Members};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;

/// A cluster slot held for one exchange (`None`: the cluster has no limits).
pub type Slot = Option<OwnedSemaphorePermit>;

/// Takes one of the cluster's `max_requests` slots: at once, or after waiting as one of at
/// most `max_pending` (until `deadline`), or `overloaded`.
pub async fn admit(
    cluster: &ClusterRt,
    deadline: Option<Instant>,
    metrics: &Metrics,
) -> Result<Slot, Reason> {
    let Some(limits) = &cluster.limits else {
        return Ok(None);
    };
    if let Ok(p) = limits.slots.clone().try_acquire_owned() {
        return Ok(Some(p));
    }
    let waiting = Waiting::join(limits);
    if waiting.position >= limits.max_pending {
        let reason = if limits.max_pending == 0 {
            "max_requests"
        } else {
            "max_pending"
        };
        circuit_open(metrics, cluster, reason);
        return Err(Reason::Overloaded);
    }
    // Waiting for a slot spends the request's own time, not a fresh timeout.
    match crate::clock::until(deadline, limits.slots.clone().acquire_owned()).await {
        Some(Ok(p)) => Ok(Some(p)),
        _ => {
            circuit_open(metrics, cluster, "max_pending");
            Err(Reason::Overloaded)
        }
    }
}

/// A place among the requests waiting for a slot, given up when dropped.
struct Waiting<'a> {
    limits: &'a ClusterLimits,
    position: u32,
}

impl<'a> Waiting<'a> {
    fn join(limits: &'a ClusterLimits) -> Waiting<'a> {
        let position = limits.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting { limits, position }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.limits.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The endpoints a request has tried, so its retries go elsewhere.
#[derive(Default)]
pub struct Tried(Vec<usize>);

impl Tried {
    pub fn add(&mut self, index: usize) {
        if !self.0.contains(&index) {
            self.0.push(index);
        }
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }
}

/// A try in progress at one endpoint.
pub struct Attempt {
    pub cluster: Arc<ClusterRt>,
    pub members: Arc<Members>,
    pub index: usize,
    pub in_flight: InFlight,
    pub started: Instant,
}

impl Attempt {
    /// Picks an endpoint of `cluster` the balancer and its breaker agree on, avoiding the
    /// ones in `tried` while another is available; `key` is the request's hash key
    /// (`ring_hash`); `now`, a reading of the request path's clock, is when the try starts.
    /// `None`: no endpoint is available.
    pub fn pick(
        cluster: &Arc<ClusterRt>,
        tried: &Tried,
        key: Option<&[u8]>,
        now: Instant,
    ) -> Option<Attempt> {
        let members = cluster.members.load_full();
        let mut skip: Option<Vec<usize>> = None;
        loop {
            let exclude = skip.as_deref().unwrap_or(tried.as_slice());
            let pick = members.balancer.pick_with(
                &members.endpoints,
                exclude,
                now,
                key,
                cluster.tuning,
            )?;
            let i = pick.index;
            // In panic mode every endpoint is a candidate: the breaker is not asked.
            let acquired = if pick.panic {
                cluster.lb_panic.inc();
                Some(false)
            } else {
                members.endpoints[i].try_acquire(now)
            };
            if let Some(probe) = acquired {
                let in_flight = members.endpoints[i].start(probe);
                return Some(Attempt {
                    cluster: cluster.clone(),
                    members,
                    index: i,
                    in_flight,
                    started: now,
                });
            }
            // The breaker refused (another request holds its probe): never pick it again.
            let skip = skip.get_or_insert_with(|| tried.as_slice().to_vec());
            if skip.contains(&i) {
                return None;
            }
            skip.push(i);
        }
    }

    /// Leaves `setup` (making a connection for this try) out of the endpoint's latency
    /// sample: a one-off cost, not how fast the endpoint answers.
    pub fn discount(&mut self, setup: std::time::Duration) {
        self.started += setup;
    }

    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.in_flight.endpoint
    }

    /// Feeds what the endpoint did with an HTTP try to its latency estimate, its breaker and
    /// `spur_upstream_requests_total` (`grpc`: the request is a gRPC call, so the try's
    /// `grpc_status` is counted too). A client abort is recorded nowhere: the endpoint did
    /// nothing wrong. Returns when it was recorded (the request path's clock, read once
    /// for the latency estimate and the response's first byte alike).
    pub fn record(&self, outcome: Outcome, grpc: bool, metrics: &Metrics) -> Option<Instant> {
        if outcome == Outcome::ClientAbort {
            return None;
        }
        count_try(self.endpoint(), outcome, grpc);
        let failed = outcome.is_failure(self.cluster.grpc_failures);
        Some(self.charge(failed, metrics))
    }

    /// For a gRPC response whose status will come in its trailers: records the latency to
    /// the head now, and leaves the verdict (count, breaker) to [`Deferred::record`], with
    /// the [`InFlight`] the exchange holds until the stream ends.
    pub fn defer(self) -> (InFlight, Box<Deferred>, Instant) {
        let now = crate::clock::now();
        let endpoint = self.endpoint();
        endpoint.observe(now.saturating_duration_since(self.started), false, now);
        let deferred = Box::new(Deferred {
            cluster: self.cluster,
            members: self.members,
        });
        (self.in_flight, deferred, now)
    }

    /// Feeds a TCP connection attempt to the endpoint's latency estimate and breaker (a
    /// refused connection is a failure), and counts it in `spur_tcp_connections_total`.
    pub fn record_tcp(&self, connected: bool, listener: &Arc<str>, metrics: &Metrics) {
        let result = if connected { "connected" } else { "refused" };
        self.endpoint()
            .metrics
            .tcp_connection(metrics, listener, result);
        self.charge(!connected, metrics);
    }

    fn charge(&self, failed: bool, metrics: &Metrics) -> Instant {
        let now = crate::clock::now();
        let endpoint = self.endpoint();
        endpoint.observe(now.saturating_duration_since(self.started), failed, now);
        judge(
            &self.cluster,
            &self.members,
            &self.in_flight,
            failed,
            now,
            metrics,
        );
        now
    }
}

/// The verdict of a gRPC try that waits for its trailers (see [`Attempt::defer`]).
pub struct Deferred {
    cluster: Arc<ClusterRt>,
    members: Arc<Members>,
}

impl Deferred {
    /// Records how the stream ended: its status (`Outcome::Grpc`), or `Reset` when it broke
    /// off; `ClientAbort` (the client left first) is recorded nowhere.
    pub fn record(&self, in_flight: &InFlight, outcome: Outcome, metrics: &Metrics) {
        if outcome == Outcome::ClientAbort {
            return;
        }
        count_try(&in_flight.endpoint, outcome, true);
        let failed = outcome.is_failure(self.cluster.grpc_failures);
        let now = crate::clock::now();
        if failed {
            in_flight
                .endpoint
                .observe(std::time::Duration::ZERO, true, now);
        }
        judge(
            &self.cluster,
            &self.members,
            in_flight,
            failed,
            now,
            metrics,
        );
    }
}

/// `spur_upstream_requests_total` for one try: its HTTP status (0: no response) and, for a
/// gRPC call, its gRPC status.
fn count_try(endpoint: &EndpointState, outcome: Outcome, grpc: bool) {
    let (code, grpc_status) = match outcome {
        Outcome::Status(s) => (s, grpc.then(|| crate::grpc::from_http(s))),
        Outcome::Grpc(c) => (200, Some(c)),
        _ => (0, None),
    };
    endpoint.metrics.tries.inc_grpc(code, grpc_status);
}

/// Feeds a try's verdict to the endpoint's breaker.
fn judge(
    cluster: &ClusterRt,
    members: &Members,
    in_flight: &InFlight,
    failed: bool,
    now: Instant,
    metrics: &Metrics,
) {
    let Some(b) = &cluster.breaker else {
        return;
    };
    let endpoint = &in_flight.endpoint;
    let may_eject = || cluster.may_eject(members);
    match endpoint.record(failed, &b.settings, may_eject, in_flight.probe, now) {
        Transition::Ejected => {
            tracing::warn!(
                cluster = &*cluster.name,
                endpoint = &*endpoint.label,
                "endpoint ejected"
            );
            circuit_open(metrics, cluster, "ejection");
        }
        Transition::Restored => {
            endpoint.restart_estimate(members, now);
            tracing::info!(
                cluster = &*cluster.name,
                endpoint = &*endpoint.label,
                "endpoint restored"
            );
        }
        Transition::None => {}
    }
}

/// Counts a breaker refusing or removing capacity (`spur_circuit_open_total`).
pub fn circuit_open(metrics: &Metrics, cluster: &ClusterRt, reason: &'static str) {
    metrics
        .circuit_open
        .get_or_create(&ClusterReasonLabels {
            cluster: cluster.name.clone(),
            reason,
        })
        .inc();
}
