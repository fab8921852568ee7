//! **Decide**: what Spur will do with a request, before any I/O.
//!
//! [`plan`] reads the compiled snapshot, what the connection knows ([`Peer`]) and the request
//! head, and returns a [`Plan`]: the request ID and trace context to send, the flags that are
//! on, the route, and either where the request goes ([`Forward`]: cluster, split side, hash
//! key, deadline, retry policy, mirror) or why Spur answers it itself ([`Refusal`]). It is
//! synchronous, does no I/O and changes nothing but counters, so it is tested as a table
//! of requests and expected plans (see the tests below), and every capability that decides
//! something about a request (authorization, rate limits, header rules) plugs in here.
//!
//! The phases, in order:
//! 1. **correlate**: keep or make the request ID; the request's trace (the caller's
//!    passed on, or a span of this hop's with `tracing`; see [`crate::trace`]);
//! 2. **admit**: a head over `max_header_bytes` gets 431; then the head is **normalised**
//!    in place (one host, one path: see [`super::normalize`]), or refused with 400, so that
//!    every phase after this one, and the upstream, read the same request; a request that
//!    has crossed [`headers::MAX_HOPS`] proxies (`x-spur-hops`) is in a loop: 508
//!    `loop_detected`;
//! 3. **authorize**: the listener's policy (`authz`, `allow_identities`) on the peer and the
//!    request's method, normalised path and headers; denied: 403 `forbidden` (see
//!    [`crate::authorize`]);
//! 4. **flags**: each flag decided once (or kept from a trusted peer);
//! 5. **route**: the first matching route, else the original destination's cluster
//!    (transparent mode), else the listener's default cluster, else 404;
//! 6. **split**: the route's cluster or one side of its split (sticky by `hash_on`);
//! 7. **fault**: injected delay and abort.
//!
//! Edge policy (see [`super::edge`]) decides in two places: the listener's rate limit after
//! **authorize**; after **route**, the route's CORS (a preflight is routed as the request it
//! announces, and answered here), its rate limit and its redirect. These answers are
//! [`Action::Answer`]s (boxed: a forwarded request carries nothing more for them).

use crate::authorize::{Authorized, AuthzRt};
use crate::headers;
use crate::http::X_SPUR_FLAGS;
use crate::policy::authz::{Asked, Subject};
use crate::policy::correlation::{new_request_id, valid_request_id};
use crate::policy::flags;
use crate::policy::route::RequestView;
use crate::policy::split;
use crate::reason::Reason;
use crate::snapshot::{ClusterRt, ListenerRt, MirrorRt, RetryRt, RouteRt, Snapshot, Target};
use crate::trace::Trace;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, StatusCode};
use spur_config::Fault;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the connection knows about the peer, for every request on it.
#[derive(Clone, Copy)]
pub struct Peer<'a> {
    pub addr: SocketAddr,
    /// The verified mTLS peer's SPIFFE ID.
    pub identity: Option<&'a Arc<str>>,
    /// Transparent mode: where the connection was going before the redirect.
    pub original_dst: Option<SocketAddr>,
}

/// Everything decided about a request.
pub struct Plan<'s> {
    /// The request ID to send and answer with (`None`: none, generation is off).
    pub request_id: Option<HeaderValue>,
    /// The request's trace (see [`crate::trace`]): what goes upstream in `traceparent`
    /// (and B3), and whether its spans are recorded.
    pub trace: Option<Trace>,
    /// For each of the snapshot's flags (by index), whether it is on.
    pub flags_on: Vec<bool>,
    /// `x-spur-flags` for the upstream.
    pub flags_header: Option<HeaderValue>,
    /// The matched route (`None`: default cluster or original destination).
    pub route: Option<&'s RouteRt>,
    /// The route label for logs and metrics (`None`: refused before a route was chosen).
    pub route_name: Option<Arc<str>>,
    /// The injected delay to wait before going on (fault injection).
    pub delay: Option<Duration>,
    /// The authorization rule that decided (`default`: none matched); `None` without a
    /// policy.
    pub authz_rule: Option<Arc<str>>,
    /// `x-spur-hops` for the upstream: the request's hop count, this proxy included.
    pub hops: u32,
    /// How far the peer's forwarding headers are believed.
    pub trust: super::forwarded::Trust,
    /// A browser request from an origin the route's `cors` allows: the origin, for the
    /// response's CORS headers.
    pub cors_origin: Option<Box<HeaderValue>>,
    /// The request is a gRPC call: Spur answers it in gRPC's terms (see [`crate::grpc`]).
    pub grpc: bool,
    /// The headers the request arrived with that the request path looks for.
    pub seen: headers::Seen,
    pub action: Action<'s>,
}

pub enum Action<'s> {
    Forward(Forward<'s>),
    Refuse(Refusal),
    /// An answer with headers of its own: a 429, a redirect, a CORS preflight.
    Answer(Box<super::answer::Answer>),
}

/// Where a request goes and how it is tried.
pub struct Forward<'s> {
    pub cluster: Arc<ClusterRt>,
    /// The index of the split side chosen (`None`: no split).
    pub split_side: Option<usize>,
    /// The sticky key (split and `ring_hash`).
    pub hash_key: Option<Bytes>,
    /// The whole request's deadline: the route's `timeout`, or a gRPC call's
    /// `grpc-timeout` when that is sooner.
    pub deadline: Option<Instant>,
    /// The gRPC call came with `grpc-timeout`: each try forwards what is left of the
    /// deadline in its own.
    pub grpc_timeout: bool,
    pub retry: Option<&'s RetryRt>,
    /// Mirror this request (the route's `mirror`, sampled).
    pub mirror: Option<&'s MirrorRt>,
    /// The `Upgrade` to send, when the client asked for one the route tunnels (the
    /// response may then be `101` and the connection a tunnel); any other upgrade is
    /// stripped and the request is a plain one.
    pub upgrade: Option<HeaderValue>,
    /// The listener's `body_timeout`: the longest wait between reads of the request body.
    pub body_timeout: Duration,
    /// Nothing before the first try can wait (no injected delay, no admission queue, no
    /// body read whole for a retry or a mirror): the first try starts at the exchange's
    /// clock reading rather than a reading of its own (one per request's start, as an
    /// event loop reads its clock once per turn).
    pub at_start: bool,
}

/// An answer Spur makes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub status: StatusCode,
    /// The cluster label, when a cluster was chosen before the refusal (a fault abort).
    pub cluster: Option<&'static str>,
}

impl From<Reason> for Refusal {
    fn from(reason: Reason) -> Refusal {
        Refusal {
            reason,
            status: reason.status(),
            cluster: None,
        }
    }
}

impl Plan<'_> {
    /// The cluster chosen (`None` when refused).
    pub fn cluster(&self) -> Option<&Arc<ClusterRt>> {
        match &self.action {
            Action::Forward(f) => Some(&f.cluster),
            Action::Refuse(_) | Action::Answer(_) => None,
        }
    }
}

/// Decides what to do with a request with head `head` on listener `lst`, at `now`. `rng`
/// draws the random choices (split without a key, mirror and fault percentages).
pub fn plan<'s>(
    snap: &'s Snapshot,
    lst: &'s ListenerRt,
    peer: Peer<'_>,
    head: &mut Parts,
    now: Instant,
    rng: &mut fastrand::Rng,
) -> Plan<'s> {
    let (head_size, seen) = headers::scan(head, &snap.correlation.header);
    let (request_id, trace) = correlate(snap, head, seen);
    let grpc = seen.has(headers::Seen::CONTENT_TYPE) && crate::grpc::is_grpc(&head.headers);
    let mut plan = Plan {
        request_id,
        trace,
        flags_on: Vec::new(),
        flags_header: None,
        route: None,
        route_name: None,
        delay: None,
        authz_rule: None,
        hops: 0,
        trust: super::edge::trust(lst, peer),
        cors_origin: None,
        grpc,
        seen,
        action: Action::Refuse(Reason::NoRoute.into()),
    };
    if let Some(action) = gate(lst, peer, head, head_size, now, &mut plan) {
        plan.action = action;
        return plan;
    }
    let head = &*head;
    let (on, header) = decide_flags(snap, lst, peer, &head.headers, seen);
    plan.flags_on = on;
    plan.flags_header = header;
    let path = super::normalize::match_path(head.uri.path());
    // Transparent mode: the cluster owning the original destination (routes may match on
    // it; with no route, it takes the request).
    let owner = peer.original_dst.and_then(|a| snap.cluster_for_addr(a));
    let view = RequestView {
        destination: owner.as_deref().map(|c| &*c.name),
        method: &head.method,
        path: &path,
        host: headers::host_of(&head.uri, &head.headers),
        headers: &head.headers,
        grpc,
    };
    let grpc_deadline = grpc
        .then(|| head.headers.get(&crate::grpc::GRPC_TIMEOUT))
        .flatten()
        .and_then(crate::grpc::parse_timeout)
        .and_then(|t| now.checked_add(t));
    let (route, preflight) = super::edge::route_for(lst, &view, &plan.flags_on);
    plan.route = route;
    let Some(route) = plan.route else {
        if let Some(forward) = without_route(owner, lst, head, seen, grpc_deadline) {
            plan.route_name = Some(lst.default_route_name.clone());
            plan.action = Action::Forward(forward);
        }
        return plan;
    };
    plan.route_name = Some(route.name.clone());
    match super::edge::decide_route(route, lst, peer, head, preflight, now, &mut plan) {
        Some(Ok(answer)) => {
            plan.action = Action::Answer(answer);
            return plan;
        }
        Some(Err(reason)) => {
            plan.action = Action::Refuse(reason.into());
            return plan;
        }
        None => {}
    }
    let (cluster, split_side, hash_key) = choose_target(route, head, rng);
    let (delay, abort) = inject_fault(route.fault.as_ref(), rng);
    plan.delay = delay;
    if let Some(refusal) = abort {
        plan.action = Action::Refuse(refusal);
        return plan;
    }
    let (upgrade, retry, mirror) = upgrade_retry_mirror(route, head, seen, rng);
    let at_start =
        delay.is_none() && cluster.limits.is_none() && retry.is_none() && mirror.is_none();
    plan.action = Action::Forward(Forward {
        cluster,
        split_side,
        hash_key,
        deadline: earliest(route.timeout.map(|t| now + t), grpc_deadline),
        grpc_timeout: grpc_deadline.is_some(),
        retry,
        mirror,
        upgrade,
        body_timeout: lst.limits.body_timeout.get(),
        at_start,
    });
    plan
}

/// The route's upgrade to send (if the client asked for one it tunnels), and its retry
/// policy and mirror (sampled), neither of which a tunnel gets.
fn upgrade_retry_mirror<'s>(
    route: &'s RouteRt,
    head: &Parts,
    seen: headers::Seen,
    rng: &mut fastrand::Rng,
) -> (
    Option<HeaderValue>,
    Option<&'s RetryRt>,
    Option<&'s MirrorRt>,
) {
    let upgrade = upgrade_for(head, seen, |p| route.upgrades.iter().any(|u| **u == *p));
    let tunnel = upgrade.is_some();
    let retry = route.retry.as_ref().filter(|_| !tunnel);
    let mirror = route
        .mirror
        .as_ref()
        .filter(|m| !tunnel && rng.f64() * 100.0 < m.percent);
    (upgrade, retry, mirror)
}

/// The route's cluster, or its split's side (by the request's `hash_on` key, else at
/// random), with that key.
fn choose_target(
    route: &RouteRt,
    head: &Parts,
    rng: &mut fastrand::Rng,
) -> (Arc<ClusterRt>, Option<usize>, Option<Bytes>) {
    let hash_key = route
        .hash_on
        .as_ref()
        .and_then(|h| h.key(&head.headers))
        .map(Bytes::copy_from_slice);
    match &route.target {
        Target::Cluster(c) => (c.clone(), None, hash_key),
        Target::Split {
            clusters,
            weights,
            total,
        } => {
            let i = choose_split(clusters, weights, *total, hash_key.as_deref(), rng);
            (clusters[i].clone(), Some(i), hash_key)
        }
    }
}

/// What is checked before routing: the head's shape and limits, loops, authorization and
/// the listener's rate limit. `Some` holds the refusal or answer that ends the request.
fn gate<'s>(
    lst: &ListenerRt,
    peer: Peer<'_>,
    head: &mut Parts,
    head_size: usize,
    now: Instant,
    plan: &mut Plan<'s>,
) -> Option<Action<'s>> {
    if head_size > lst.limits.max_header_bytes.get() as usize {
        return Some(Action::Refuse(Reason::HeadersTooLarge.into()));
    }
    if let Err(reason) = super::normalize::head(head, plan.seen, lst.allow_encoded_slashes) {
        return Some(Action::Refuse(reason.into()));
    }
    let hops = match plan.seen.has(headers::Seen::HOPS) {
        true => headers::hops_of(&head.headers),
        false => 0,
    };
    if hops >= headers::MAX_HOPS {
        return Some(Action::Refuse(Reason::LoopDetected.into()));
    }
    plan.hops = hops + 1;
    if let Some(authz) = &lst.authz {
        let verdict = authorize(authz, peer, head);
        plan.authz_rule = Some(verdict.rule);
        if !verdict.allowed {
            return Some(Action::Refuse(Reason::Forbidden.into()));
        }
    }
    super::edge::listener_limit(lst, peer, head, now).map(Action::Answer)
}

/// No route matched: in transparent mode the cluster owning the original destination
/// (`owner`), else the listener's default cluster, with no retry or mirror; `None` when
/// there is neither.
fn without_route(
    owner: Option<Arc<ClusterRt>>,
    lst: &ListenerRt,
    head: &Parts,
    seen: headers::Seen,
    grpc_deadline: Option<Instant>,
) -> Option<Forward<'static>> {
    let cluster = owner.or_else(|| lst.default_cluster.clone())?;
    Some(Forward {
        at_start: cluster.limits.is_none(),
        cluster,
        split_side: None,
        hash_key: None,
        deadline: grpc_deadline,
        grpc_timeout: grpc_deadline.is_some(),
        retry: None,
        mirror: None,
        upgrade: upgrade_for(head, seen, |p| p == "websocket"),
        body_timeout: lst.limits.body_timeout.get(),
    })
}

/// The `Upgrade` to send upstream (see [`headers::upgrade_to_send`]); looked for only when
/// the request came with one.
fn upgrade_for(
    head: &Parts,
    seen: headers::Seen,
    allowed: impl Fn(&str) -> bool,
) -> Option<HeaderValue> {
    if !seen.has(headers::Seen::UPGRADE) {
        return None;
    }
    headers::upgrade_to_send(head.version, &head.headers, allowed)
}

/// A route's fault injection (if it has one), drawn: the delay to add and the refusal to answer with.
fn inject_fault(
    fault: Option<&Fault>,
    rng: &mut fastrand::Rng,
) -> (Option<Duration>, Option<Refusal>) {
    let Some(fault) = fault else {
        return (None, None);
    };
    let delay = fault
        .delay
        .as_ref()
        .filter(|d| rng.f64() * 100.0 < d.percent)
        .map(|d| d.duration.get());
    let abort = fault
        .abort
        .as_ref()
        .filter(|a| rng.f64() * 100.0 < a.percent)
        .map(|a| Refusal {
            reason: Reason::Fault,
            status: StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            cluster: None,
        });
    (delay, abort)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The request ID (kept when valid, else made when generation is on) and the trace context
/// (a child of the caller's, or a new trace). `seen`: the headers the request has.
fn correlate(
    snap: &Snapshot,
    head: &Parts,
    seen: headers::Seen,
) -> (Option<HeaderValue>, Option<Trace>) {
    let c = &snap.correlation;
    let sent = seen
        .has(headers::Seen::REQUEST_ID)
        .then(|| head.headers.get(&c.header))
        .flatten();
    let request_id = match sent {
        Some(v) if valid_request_id(v) => Some(v.clone()),
        _ if c.generate => Some(new_request_id()),
        _ => None,
    };
    let carried = match seen.has(headers::Seen::TRACE) {
        true => &head.headers,
        false => headers::none(),
    };
    let trace = Trace::decide(snap.tracer.as_deref(), c.trace_context, carried);
    (request_id, trace)
}

/// The listener's policy on this peer and request: the path is the one routing sees.
fn authorize(authz: &AuthzRt, peer: Peer<'_>, head: &Parts) -> Authorized {
    let who = Subject {
        identity: peer.identity.map(|id| &**id),
        addr: peer.addr.ip(),
    };
    let asked = Asked {
        method: &head.method,
        path: head.uri.path(),
        headers: &head.headers,
    };
    authz.authorize(who, Some(asked))
}

/// Decides which flags are on for this request: the trusted peer's decisions from
/// `x-spur-flags`, or else each flag evaluated here. Also the `x-spur-flags` value for the
/// upstream (an untrusted client's header never passes).
fn decide_flags(
    snap: &Snapshot,
    lst: &ListenerRt,
    peer: Peer<'_>,
    headers: &http::HeaderMap,
    seen: headers::Seen,
) -> (Vec<bool>, Option<HeaderValue>) {
    let trusted = lst.trust_incoming_flags || peer.identity.is_some();
    let mut on = vec![false; snap.flags.len()];
    let kept = (trusted && seen.has(headers::Seen::FLAGS))
        .then(|| headers.get(&X_SPUR_FLAGS))
        .flatten()
        .and_then(|v| v.to_str().ok());
    let value = match kept {
        Some(kept) => {
            for name in flags::parse_header(kept) {
                if let Some(i) = snap.flags.iter().position(|f| &*f.name == name) {
                    on[i] = true;
                }
            }
            // Flags this proxy does not know pass on unchanged, for the hops after it.
            HeaderValue::from_str(&flags::header_value(flags::parse_header(kept))).ok()
        }
        None => {
            for (i, f) in snap.flags.iter().enumerate() {
                on[i] = f.flag.evaluate(headers);
            }
            if snap.flags.is_empty() {
                Some(HeaderValue::from_static(""))
            } else {
                let names = snap.flags.iter().zip(&on).filter(|(_, o)| **o);
                HeaderValue::from_str(&flags::header_value(names.map(|(f, _)| &*f.name))).ok()
            }
        }
    };
    for (f, o) in snap.flags.iter().zip(&on) {
        let counter = if *o { &f.on } else { &f.off };
        counter.inc();
    }
    (on, value)
}

/// One side of a split; a side with no available endpoint gives its share to the others
/// (chosen the same sticky way), rather than failing its users.
fn choose_split(
    clusters: &[Arc<ClusterRt>],
    weights: &[u32],
    total: u64,
    key: Option<&[u8]>,
    rng: &mut fastrand::Rng,
) -> usize {
    let first = split::choose_with(weights, total, key, rng);
    if clusters[first].has_available_endpoint() {
        return first;
    }
    let live: Vec<u32> = clusters
        .iter()
        .zip(weights)
        .map(|(c, w)| if c.has_available_endpoint() { *w } else { 0 })
        .collect();
    let live_total: u64 = live.iter().map(|w| u64::from(*w)).sum();
    if live_total == 0 {
        return first;
    }
    split::choose_with(&live, live_total, key, rng)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "plan_edge_tests.rs"]
mod edge_tests;
