//! The HTTP request path, as named phases run in this order for every request:
//!
//! 1. **correlate**: keep or make the request ID; child span in `traceparent`.
//! 2. **admit**: a peer outside the listener's `allow_identities` gets 403 `forbidden`; the
//!    request head must fit `max_header_bytes`, else 431.
//! 3. **route**: first matching route of the listener, else its default cluster, else 404.
//! 4. **split**: the route's cluster, or one side of its weighted split (sticky by `hash_on`).
//! 5. **fault**: injected delay or abort, when the route asks for it.
//! 6. **limit**: a slot among the cluster's `max_requests`, waiting among `max_pending`, or
//!    503 `overloaded`.
//! 7. **tries**: pick an endpoint (balancer, breaker), send on the cluster's pooled client
//!    within the per-try and whole-request timeouts; on a retryable outcome, and while the
//!    body can be replayed and the budget allows, back off and try another endpoint.
//! 8. **respond**: hop-by-hop headers out, request ID in, body streamed back; protocol
//!    upgrades (WebSocket) are spliced into a byte tunnel.
//!
//! The exchange record (access log, request metrics) is written when the response body
//! ends, see [`crate::exchange`].

use crate::body::InBody;
use crate::endpoint::EndpointState;
use crate::exchange::{local_response, Exchange, RespBody};
use crate::headers::{self, TRACEPARENT, X_SPUR_PEER_IDENTITY};
use crate::metrics::{ClusterLabels, ClusterReasonLabels, EndpointLabels, UpstreamLabels};
use crate::mirror;
use crate::policy::breaker::Transition;
use crate::policy::correlation::{new_request_id, valid_request_id, TraceParent};
use crate::policy::retry::Outcome;
use crate::policy::route::RequestView;
use crate::policy::{flags, split};
use crate::snapshot::{ClusterRt, ListenerRt, RouteRt, Snapshot, Target};
use crate::upstream::{self, Buffered, ReqBody, UpstreamError};
use crate::Shared;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub static X_SPUR_ATTEMPT: header::HeaderName = header::HeaderName::from_static("x-spur-attempt");
pub static X_SPUR_FLAGS: header::HeaderName = header::HeaderName::from_static("x-spur-flags");
pub static X_SPUR_MIRROR: header::HeaderName = header::HeaderName::from_static("x-spur-mirror");

/// What a connection knows about itself, shared by its requests.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// Where the connection was going before an iptables redirect, on `original_dst`
    /// listeners (the local address when it was not redirected); `None` elsewhere.
    pub original_dst: Option<SocketAddr>,
    /// The connection's place in its listener's accounting (active count, drain). An
    /// upgraded connection outlives hyper's connection task, so its tunnel holds this too.
    pub guard: Arc<crate::adapters::listener::ConnGuard>,
    pub activity: crate::adapters::idle::Activity,
    pub idle_timeout: Duration,
    /// Turns true when the listener drains; an upgraded tunnel then gets the drain timeout.
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// The SPIFFE ID of the verified mTLS peer: in the access log, and sent upstream in
    /// `x-spur-peer-identity`.
    pub peer_identity: Option<Arc<str>>,
    /// Set when the connection came over TLS.
    pub tls: Option<TlsSession>,
}

/// What the TLS handshake settled for a connection, prepared once for all its requests.
pub struct TlsSession {
    /// `x-spur-peer-identity` for upstream requests.
    pub identity_header: Option<HeaderValue>,
    /// The peer passes the listener's `allow_identities`; if not, every request gets 403.
    pub allowed: bool,
}

pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    Ok(handle_any(&ctx, req.map(InBody::Http)).await)
}

/// The request path for a request from any transport (HTTP/1.1, HTTP/2, HTTP/3).
pub async fn handle_any(ctx: &ConnCtx, req: Request<InBody>) -> Response<RespBody> {
    let snap = ctx.shared.snapshot.load_full();
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut ex = Exchange::new(
        ctx.shared.clone(),
        ctx.listener.clone(),
        req.method().clone(),
        path,
    );
    ex.peer_identity = ctx.peer_identity.clone();
    let Some(lst) = snap.listeners.get(&*ctx.listener).cloned() else {
        // The listener was removed by a config push while this connection was open.
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_route",
            &snap.correlation.header,
            Some(ex),
        );
    };
    let mut resp = proxy(ctx, &snap, &lst, req, ex).await;
    if let Some(v) = &lst.alt_svc {
        resp.headers_mut().insert(header::ALT_SVC, v.clone());
    }
    resp
}

async fn proxy(
    ctx: &ConnCtx,
    snap: &Snapshot,
    lst: &ListenerRt,
    mut req: Request<InBody>,
    mut ex: Exchange,
) -> Response<RespBody> {
    let id_header = &snap.correlation.header;

    // 1. correlate (first, so that even a refused request carries its ID)
    let rid = match req.headers().get(id_header) {
        Some(v) if valid_request_id(v) => Some(v.clone()),
        _ if snap.correlation.generate => Some(new_request_id()),
        _ => None,
    };
    match &rid {
        Some(v) => {
            req.headers_mut().insert(id_header.clone(), v.clone());
        }
        None => {
            req.headers_mut().remove(id_header);
        }
    }
    ex.request_id = rid;
    if snap.correlation.trace_context {
        let tp = req
            .headers()
            .get(&TRACEPARENT)
            .and_then(|v| TraceParent::parse(v.as_bytes()))
            .map_or_else(TraceParent::new_root, |p| p.child());
        ex.trace_id = Some(tp.trace_id);
        req.headers_mut()
            .insert(TRACEPARENT.clone(), tp.to_header());
    }

    // 2. admit
    if ctx.tls.as_ref().is_some_and(|t| !t.allowed) {
        ctx.shared.metrics.reject(&lst.name, "forbidden");
        return local_response(StatusCode::FORBIDDEN, "forbidden", id_header, Some(ex));
    }
    if headers::head_size(&req) > lst.limits.max_header_bytes.get() as usize {
        ctx.shared.metrics.reject(&lst.name, "headers_too_large");
        return local_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            id_header,
            Some(ex),
        );
    }

    // 2b. flags
    let flags_on = decide_flags(ctx, snap, lst, req.headers_mut());

    // 3. route
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        host: headers::host(&req),
        headers: req.headers(),
    };
    let route: Option<&RouteRt> = lst.route(&view, &flags_on);
    // 4. split
    let hash_key: Option<Bytes> = route
        .and_then(|r| r.hash_on.as_ref())
        .and_then(|h| h.key(req.headers()))
        .map(Bytes::copy_from_slice);
    let cluster: Arc<ClusterRt> = match route.map(|r| &r.target) {
        Some(Target::Cluster(c)) => c.clone(),
        Some(Target::Split {
            clusters,
            weights,
            total,
        }) => choose_split(clusters, weights, *total, hash_key.as_deref()),
        // Transparent mode: no route matched, so the cluster owning the original destination.
        None => match ctx
            .original_dst
            .and_then(|a| snap.cluster_for_addr(a))
            .or_else(|| lst.default_cluster.clone())
        {
            Some(c) => c,
            None => return local_response(StatusCode::NOT_FOUND, "no_route", id_header, Some(ex)),
        },
    };
    ex.route = route.map_or_else(|| lst.default_route_name.clone(), |r| r.name.clone());
    ex.cluster = cluster.name.clone();

    // 5. fault
    if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
        if let Some(d) = &fault.delay {
            if fastrand::f64() * 100.0 < d.percent {
                tokio::time::sleep(d.duration.get()).await;
            }
        }
        if let Some(a) = &fault.abort {
            if fastrand::f64() * 100.0 < a.percent {
                let status =
                    StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return local_response(status, "fault", id_header, Some(ex));
            }
        }
    }

    // 6. limit
    if let Some(limits) = &cluster.limits {
        let permit = match limits.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let waiting = limits.waiting.fetch_add(1, Ordering::AcqRel);
                let _unwait = scopeguard(|| {
                    limits.waiting.fetch_sub(1, Ordering::AcqRel);
                });
                if waiting >= limits.max_pending {
                    let reason = if limits.max_pending == 0 {
                        "max_requests"
                    } else {
                        "max_pending"
                    };
                    circuit_open(ctx, &cluster, reason);
                    return local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        id_header,
                        Some(ex),
                    );
                }
                // Waiting for a slot spends the request's own time, not a fresh timeout.
                let wait = route
                    .and_then(|r| r.timeout)
                    .map(|t| (ex.start + t).saturating_duration_since(Instant::now()))
                    .unwrap_or(Duration::from_secs(3600));
                match tokio::time::timeout(wait, limits.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        circuit_open(ctx, &cluster, "max_pending");
                        return local_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "overloaded",
                            id_header,
                            Some(ex),
                        );
                    }
                }
            }
        };
        ex.permit = Some(permit);
    }

    // 7. tries
    let upgrade = headers::is_upgrade(&req).then(|| {
        let proto = req.headers().get(header::UPGRADE).cloned();
        (hyper::upgrade::on(&mut req), proto)
    });
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&X_SPUR_PEER_IDENTITY);
    let proto = match &ctx.tls {
        Some(tls) => {
            if let Some(id) = &tls.identity_header {
                parts
                    .headers
                    .insert(X_SPUR_PEER_IDENTITY.clone(), id.clone());
            }
            "https"
        }
        None => "http",
    };
    headers::set_forwarded(&mut parts.headers, ctx.peer.ip(), proto);
    if let Some((_, Some(proto))) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    parts.version = cluster.http_version();
    if parts.version == Version::HTTP_2 {
        parts.headers.remove(header::HOST);
    }

    let retry = route
        .and_then(|r| r.retry.as_ref())
        .filter(|_| upgrade.is_none());
    let deadline = route.and_then(|r| r.timeout).map(|t| ex.start + t);
    let mirror_to = route
        .and_then(|r| r.mirror.as_ref())
        .filter(|m| upgrade.is_none() && fastrand::f64() * 100.0 < m.percent);
    // The body: buffered whole when a retry may need to send it again, or a mirror a copy.
    let buffer_limit = match (retry, mirror_to) {
        (Some(r), Some(_)) => Some(r.policy.max_body.max(mirror::MAX_BODY)),
        (Some(r), None) => Some(r.policy.max_body),
        (None, Some(_)) => Some(mirror::MAX_BODY),
        (None, None) => None,
    };
    if let Some(r) = retry {
        r.budget.deposit(Instant::now());
    }
    let mut replay: Option<(Bytes, Option<HeaderMap>)> = None;
    let mut first_body = None;
    match buffer_limit {
        Some(limit) => match upstream::buffer(body, limit, ex.bytes_received.clone()).await {
            Buffered::Whole(data, trailers) => replay = Some((data, trailers)),
            Buffered::Stream(b) => first_body = Some(b),
            Buffered::Broken => {
                return local_response(StatusCode::BAD_REQUEST, "bad_request", id_header, Some(ex));
            }
        },
        None => first_body = Some(ReqBody::counted(body, ex.bytes_received.clone())),
    }

    // A retry may resend only a body within its own max_body.
    let retry_replayable = match (&replay, retry) {
        (Some((data, _)), Some(r)) => data.len() as u64 <= r.policy.max_body,
        _ => false,
    };
    if let Some(m) = mirror_to {
        let tx = match &replay {
            Some(body) => mirror::spawn(
                ctx.shared.clone(),
                m.cluster.clone(),
                &parts,
                ex.path.clone(),
                body.clone(),
                ex.request_id.clone(),
            ),
            None => {
                mirror::dropped(&ctx.shared, &m.cluster.name);
                None
            }
        };
        ex.mirror = tx.map(|tx| (tx, mirror::BodyHash::default()));
    }

    if deadline.is_some_and(|d| Instant::now() >= d) {
        return local_response(StatusCode::GATEWAY_TIMEOUT, "timeout", id_header, Some(ex));
    }
    let mut attempt: u32 = 1;
    let mut exclude: Option<usize> = None;
    let result = loop {
        // Pick an endpoint the balancer and its breaker agree on.
        let members = cluster.members.load_full();
        let now = Instant::now();
        let mut skip = exclude;
        let picked = loop {
            let Some(i) = members
                .balancer
                .pick(&members.endpoints, skip, now, hash_key.as_deref())
            else {
                break None;
            };
            if let Some(probe) = members.endpoints[i].try_acquire(now) {
                break Some((i, probe));
            }
            if skip == Some(i) {
                break None;
            }
            skip = Some(i);
        };
        let Some((idx, probe)) = picked else {
            break TryResult::NoEndpoint;
        };
        let endpoint = members.endpoints[idx].clone();
        ex.endpoint = Some(endpoint.start(probe));

        let mut try_parts = match (&replay, attempt) {
            (None, _) => std::mem::replace(&mut parts, Request::new(()).into_parts().0),
            _ => clone_parts(&parts),
        };
        if attempt > 1 {
            try_parts
                .headers
                .insert(X_SPUR_ATTEMPT.clone(), HeaderValue::from(attempt));
        }
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(cluster.scheme());
        uri.authority = Some(endpoint.authority.clone());
        uri.path_and_query = Some(ex.path.clone());
        try_parts.uri = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        let try_body = match &replay {
            Some((data, trailers)) => ReqBody::replay(data, trailers),
            None => first_body.take().unwrap_or(ReqBody::Replay(None, None)),
        };
        let up_req = Request::from_parts(try_parts, try_body);

        let per_try = retry.and_then(|r| r.policy.per_try_timeout);
        let limit = earliest(per_try.map(|t| Instant::now() + t), deadline);
        let sent = Instant::now();
        let call = cluster.client.request(up_req);
        let outcome_resp = match limit {
            Some(at) => match tokio::time::timeout_at(at.into(), call).await {
                Ok(r) => r.map_err(|e| classify_error(ctx, &cluster, e)),
                Err(_) => Err(Outcome::Timeout),
            },
            None => call.await.map_err(|e| classify_error(ctx, &cluster, e)),
        };
        let outcome = match &outcome_resp {
            Ok(r) => Outcome::Status(r.status().as_u16()),
            Err(o) => *o,
        };
        record(
            ctx,
            &cluster,
            &members,
            &endpoint,
            outcome,
            sent.elapsed(),
            probe,
        );

        let whole_request_over = deadline.is_some_and(|d| Instant::now() >= d);
        // The pause before a retry; a retry whose pause alone reaches the deadline is not
        // made, so the client gets this answer rather than a 504.
        let pause = retry.map(|r| r.policy.backoff(attempt)).unwrap_or_default();
        let fits = deadline.is_none_or(|d| Instant::now() + pause < d);
        let may_retry = retry.is_some_and(|r| r.policy.retryable(outcome, attempt))
            && !whole_request_over
            && fits;
        if may_retry {
            let r = retry.expect("checked");
            if !retry_replayable {
                ctx.shared
                    .metrics
                    .retry_skipped
                    .get_or_create(&ClusterReasonLabels {
                        cluster: cluster.name.clone(),
                        reason: "body_too_large",
                    })
                    .inc();
            } else if !r.budget.withdraw(Instant::now()) {
                ctx.shared
                    .metrics
                    .retry_budget_exhausted
                    .get_or_create(&ClusterLabels {
                        cluster: cluster.name.clone(),
                    })
                    .inc();
            } else {
                ctx.shared
                    .metrics
                    .retries
                    .get_or_create(&ClusterReasonLabels {
                        cluster: cluster.name.clone(),
                        reason: outcome.reason(),
                    })
                    .inc();
                drop(outcome_resp);
                tokio::time::sleep(pause).await;
                attempt += 1;
                exclude = Some(idx);
                continue;
            }
        }
        break match outcome_resp {
            Ok(resp) => TryResult::Response(resp),
            Err(o) => TryResult::Failed(o, whole_request_over),
        };
    };

    let mut resp = match result {
        TryResult::Response(r) => r,
        TryResult::NoEndpoint => {
            return local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_endpoint",
                id_header,
                Some(ex),
            );
        }
        TryResult::Failed(outcome, whole_request_timed_out) => {
            let (status, reason) = match outcome {
                _ if whole_request_timed_out => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                Outcome::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
                Outcome::ConnectFailure => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
                _ => (StatusCode::BAD_GATEWAY, "upstream_reset"),
            };
            return local_response(status, reason, id_header, Some(ex));
        }
    };

    // 8. respond
    if resp.version() == Version::HTTP_3 {
        // hyper's HTTP/1.1 server writes the version it is given; HTTP/3 is not one.
        *resp.version_mut() = Version::HTTP_11;
    }
    let status = resp.status();
    ex.status = status.as_u16();
    let resp_upgrade = resp.headers().get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(resp.headers_mut());
    if let Some(id) = &ex.request_id {
        resp.headers_mut().insert(id_header.clone(), id.clone());
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        match (upgrade, resp_upgrade) {
            (Some((downstream, _)), Some(proto)) => {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                resp.headers_mut().insert(header::UPGRADE, proto);
                let upstream = hyper::upgrade::on(&mut resp);
                ex.upgraded = true;
                let drained = crate::adapters::idle::drained(ctx.drain.clone(), snap.drain_timeout);
                tokio::spawn(tunnel(
                    downstream,
                    upstream,
                    ctx.guard.clone(),
                    ctx.activity.clone(),
                    ctx.idle_timeout,
                    drained,
                ));
            }
            _ => {
                return local_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream_reset",
                    id_header,
                    Some(ex),
                )
            }
        }
    }
    resp.map(|b| RespBody::upstream(b, ex))
}

/// One side of a split; a side with no available endpoint gives its share to the others
/// (chosen the same sticky way), rather than failing its users.
fn choose_split(
    clusters: &[Arc<ClusterRt>],
    weights: &[u32],
    total: u64,
    key: Option<&[u8]>,
) -> Arc<ClusterRt> {
    let first = split::choose(weights, total, key);
    if clusters[first].has_available_endpoint() {
        return clusters[first].clone();
    }
    let live: Vec<u32> = clusters
        .iter()
        .zip(weights)
        .map(|(c, w)| if c.has_available_endpoint() { *w } else { 0 })
        .collect();
    let live_total: u64 = live.iter().map(|w| u64::from(*w)).sum();
    if live_total == 0 {
        return clusters[first].clone();
    }
    clusters[split::choose(&live, live_total, key)].clone()
}

/// Decides which flags are on for this request: the trusted peer's decisions from
/// `x-spur-flags`, or else each flag evaluated once here. Rewrites `x-spur-flags` for the
/// upstream with the flags that are on (an untrusted client's header never passes).
fn decide_flags(
    ctx: &ConnCtx,
    snap: &Snapshot,
    lst: &ListenerRt,
    headers: &mut HeaderMap,
) -> Vec<bool> {
    let incoming = headers.remove(&X_SPUR_FLAGS);
    let trusted = lst.trust_incoming_flags || ctx.peer_identity.is_some();
    let mut on = vec![false; snap.flags.len()];
    let value = match incoming
        .as_ref()
        .filter(|_| trusted)
        .and_then(|v| v.to_str().ok())
    {
        Some(kept) => {
            for name in flags::parse_header(kept) {
                if let Some(i) = snap.flags.iter().position(|f| &*f.name == name) {
                    on[i] = true;
                }
            }
            for (i, f) in snap.flags.iter().enumerate() {
                if on[i] {
                    f.on.inc()
                } else {
                    f.off.inc()
                };
            }
            // Flags this proxy does not know pass on unchanged, for the hops after it.
            HeaderValue::from_str(&flags::header_value(flags::parse_header(kept))).ok()
        }
        None => {
            for (i, f) in snap.flags.iter().enumerate() {
                on[i] = f.flag.evaluate(headers);
                if on[i] {
                    f.on.inc()
                } else {
                    f.off.inc()
                };
            }
            if snap.flags.is_empty() {
                Some(HeaderValue::from_static(""))
            } else {
                HeaderValue::from_str(&flags::header_value(
                    snap.flags
                        .iter()
                        .zip(&on)
                        .filter(|(_, o)| **o)
                        .map(|(f, _)| &*f.name),
                ))
                .ok()
            }
        }
    };
    if let Some(v) = value {
        headers.insert(X_SPUR_FLAGS.clone(), v);
    }
    on
}

enum TryResult {
    Response(Response<InBody>),
    /// The last try's outcome, and whether the whole-request timeout ended the tries.
    Failed(Outcome, bool),
    NoEndpoint,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn classify_error(ctx: &ConnCtx, cluster: &ClusterRt, e: UpstreamError) -> Outcome {
    tracing::debug!(error = %e, "upstream error");
    if let Some(reason) = e.tls_reason {
        tracing::debug!(cluster = &*cluster.name, reason, error = %e, "upstream TLS handshake failed");
        ctx.shared.metrics.upstream_tls_error(&cluster.name, reason);
    }
    if e.connect {
        Outcome::ConnectFailure
    } else {
        Outcome::Reset
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// Feeds a try's outcome to the endpoint's latency estimate, its breaker and the metrics.
fn record(
    ctx: &ConnCtx,
    cluster: &ClusterRt,
    members: &crate::snapshot::Members,
    endpoint: &Arc<EndpointState>,
    outcome: Outcome,
    rtt: Duration,
    probe: bool,
) {
    let failed = outcome.is_failure();
    endpoint.observe(rtt, failed);
    let code = match outcome {
        Outcome::Status(s) => s,
        _ => 0,
    };
    ctx.shared
        .metrics
        .upstream_requests
        .get_or_create(&UpstreamLabels {
            cluster: cluster.name.clone(),
            endpoint: endpoint.label.clone(),
            code,
        })
        .inc();
    if let Some(b) = &cluster.breaker {
        match endpoint.record(failed, &b.settings, || cluster.may_eject(members), probe) {
            Transition::Ejected => {
                tracing::warn!(
                    cluster = &*cluster.name,
                    endpoint = &*endpoint.label,
                    "endpoint ejected"
                );
                circuit_open(ctx, cluster, "ejection");
                set_ejected(ctx, cluster, endpoint, 1);
            }
            Transition::Restored => {
                tracing::info!(
                    cluster = &*cluster.name,
                    endpoint = &*endpoint.label,
                    "endpoint restored"
                );
                set_ejected(ctx, cluster, endpoint, 0);
            }
            Transition::None => {}
        }
    }
}

fn set_ejected(ctx: &ConnCtx, cluster: &ClusterRt, endpoint: &EndpointState, v: i64) {
    ctx.shared
        .metrics
        .endpoint_ejected
        .get_or_create(&EndpointLabels {
            cluster: cluster.name.clone(),
            endpoint: endpoint.label.clone(),
        })
        .set(v);
}

fn circuit_open(ctx: &ConnCtx, cluster: &ClusterRt, reason: &'static str) {
    ctx.shared
        .metrics
        .circuit_open
        .get_or_create(&ClusterReasonLabels {
            cluster: cluster.name.clone(),
            reason,
        })
        .inc();
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Splices an upgraded client connection to the upgraded upstream one, for as long as
/// bytes move (the listener's idle timeout applies), holding the connection's guard.
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _guard: Arc<crate::adapters::listener::ConnGuard>,
    activity: crate::adapters::idle::Activity,
    idle_timeout: Duration,
    drained: impl std::future::Future<Output = ()>,
) {
    let (d, u) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut d = TokioIo::new(d);
    let mut u = TokioIo::new(u);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut d, &mut u) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        _ = activity.idle_for(idle_timeout) => tracing::debug!("upgraded connection idle timeout"),
        _ = drained => tracing::debug!("upgraded connection closed: drain timeout"),
    }
}
