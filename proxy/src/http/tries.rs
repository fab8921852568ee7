//! **Do**: send a planned request to its cluster, trying again where the route allows.
//!
//! In order: take one of the cluster's slots ([`crate::attempt::admit`]); read the body
//! whole when a retry or a mirror may need it again (bounded by `max_body`); start the
//! mirrored copy; then one [`Attempt`] per try, each within the per-try and whole-request
//! deadlines. After a try, [`next_step`] decides: answer with what came, try again (another
//! endpoint, after the backoff, within the budget), or answer with Spur's own reason.

use super::plan::Forward;
use super::{respond, ConnCtx, X_SPUR_ATTEMPT};
use crate::attempt::{self, Attempt, Tried};
use crate::body::InBody;
use crate::exchange::{Exchange, RespBody};
use crate::metrics::{ClusterLabels, ClusterReasonLabels, Metrics};
use crate::mirror;
use crate::policy::retry::{self, Outcome};
use crate::reason::Reason;
use crate::snapshot::{ClusterRt, RetryRt, Snapshot};
use crate::upstream::pool::Connecting;
use crate::upstream::{self, Buffered, ClientBody, ReqBody, UpstreamError};
use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body::Body as _;
use spur_config::UpstreamProtocol;
use std::future::Future;
use std::time::{Duration, Instant};

/// Runs the tries of a planned request and answers the client.
///
/// Not an `async fn`, which keeps each argument twice in its future (as captured and as a
/// local): an `async move` block uses what it captured in place. The head (224 bytes)
/// stays in the caller's future.
#[allow(clippy::manual_async_fn)] // on purpose, as said above
pub fn run<'a>(
    ctx: &'a ConnCtx,
    snap: &'a Snapshot,
    fwd: &'a Forward<'a>,
    head: &'a mut Parts,
    body: InBody,
    mut ex: Box<Exchange>,
) -> impl Future<Output = Response<RespBody>> + 'a {
    async move {
        let metrics = &ctx.shared.metrics;
        match attempt::admit(&fwd.cluster, fwd.deadline, metrics).await {
            Ok(slot) => ex.permit = slot,
            Err(reason) => return respond::local(reason.into(), snap, ex),
        }
        // Only an upgrade the plan allowed may become a tunnel: a `101` to any other request
        // (its upgrade was stripped) is refused in `respond::upstream`.
        let downstream_upgrade = head
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .filter(|_| fwd.upgrade.is_some());
        let Some(mut body) = TryBody::read(fwd, body, &ex).await else {
            return client_failed(ctx, snap, ex, head.version);
        };
        if let Some(r) = fwd.retry {
            r.budget.deposit(crate::clock::now());
        }
        start_mirror(ctx, fwd, head, &body, &mut ex);
        let idempotent = retry::idempotent(&head.method);
        let mut tried = Tried::default();
        let mut number: u32 = 1;
        loop {
            let mut attempt = match start_try(fwd, &tried, &ex, number) {
                Ok(attempt) => attempt,
                Err(reason) => return respond::local(reason.into(), snap, ex),
            };
            let req = prepare(head, fwd, &attempt, &mut ex, body.for_try(), number);
            let per_try = fwd.retry.and_then(|r| r.policy.per_try_timeout);
            let limit = earliest(per_try.map(|t| attempt.started + t), fwd.deadline);
            // Small: the upstream boxes what is large (see `Upstream::send`).
            let send = fwd.cluster.client.send(attempt.endpoint(), req);
            let sent = crate::clock::until(limit, send).await;
            ex.attempts = number;
            let (outcome, result) = classify(sent, &ex, metrics, &fwd.cluster);
            if let Some(setup) = result
                .as_ref()
                .ok()
                .and_then(|r| r.extensions().get::<Connecting>())
            {
                attempt.discount(setup.0);
            }
            let (awaits_trailers, recorded) = settle(&attempt, outcome, &mut ex, metrics);
            let step = next_step(fwd, outcome, number, idempotent, &body, metrics);
            match step
                .and_then(|(r, pause)| budget(r, outcome, &fwd.cluster, metrics).then_some(pause))
            {
                Some(pause) => {
                    drop(result);
                    // Boxed: retries are rare, and a timer is large.
                    Box::pin(tokio::time::sleep(pause)).await;
                    tried.add(attempt.index);
                    number += 1;
                }
                None => {
                    let last = Last {
                        attempt,
                        outcome,
                        awaits_trailers,
                        recorded,
                    };
                    return answer(
                        ctx,
                        snap,
                        last,
                        result,
                        ex,
                        downstream_upgrade,
                        head.version,
                    );
                }
            }
        }
    }
}

/// Sends the mirrored copy, when the route mirrors and the body is held whole.
fn start_mirror(ctx: &ConnCtx, fwd: &Forward<'_>, head: &Parts, body: &TryBody, ex: &mut Exchange) {
    let Some(m) = fwd.mirror else {
        return;
    };
    ex.mirror = match body.replayable() {
        Some(data) => mirror::spawn(
            ctx.shared.clone(),
            m.cluster.clone(),
            head,
            ex.path.clone(),
            data,
            ex.request_id.clone(),
            ex.span.as_ref().map(|r| r.mirror()),
        ),
        None => {
            mirror::dropped(&ctx.shared, &m.cluster.name);
            None
        }
    }
    .map(|tx| (tx, mirror::BodyHash::default()));
}

/// The last try, as the answer needs it.
struct Last {
    attempt: Attempt,
    outcome: Outcome,
    /// A gRPC stream whose status will come in its trailers.
    awaits_trailers: bool,
    /// When the try was recorded (the response's first byte).
    recorded: Option<Instant>,
}

/// The client's answer after the last try: the upstream's response, or Spur's own.
fn answer(
    ctx: &ConnCtx,
    snap: &Snapshot,
    last: Last,
    result: Result<Response<InBody>, Reason>,
    mut ex: Box<Exchange>,
    downstream: Option<hyper::upgrade::OnUpgrade>,
    version: Version,
) -> Response<RespBody> {
    match result {
        Ok(resp) if last.awaits_trailers => {
            let (in_flight, deferred, at) = last.attempt.defer();
            ex.endpoint = Some(in_flight);
            ex.deferred = Some(deferred);
            ex.first_byte = Some(at.saturating_duration_since(ex.start));
            respond::upstream(ctx, snap, resp, ex, downstream)
        }
        Ok(resp) => {
            ex.endpoint = Some(last.attempt.in_flight);
            ex.first_byte = last
                .recorded
                .map(|at| at.saturating_duration_since(ex.start));
            respond::upstream(ctx, snap, resp, ex, downstream)
        }
        Err(_) if last.outcome == Outcome::ClientAbort => {
            ex.endpoint = Some(last.attempt.in_flight);
            client_failed(ctx, snap, ex, version)
        }
        Err(reason) => {
            ex.endpoint = Some(last.attempt.in_flight);
            respond::local(reason.into(), snap, ex)
        }
    }
}

/// The request one try sends, with what the try adds: the gRPC deadline left, and the
/// try's span as the upstream's parent when the request is traced.
fn prepare(
    head: &mut Parts,
    fwd: &Forward<'_>,
    attempt: &Attempt,
    ex: &mut Exchange,
    body: ReqBody,
    number: u32,
) -> Request<ReqBody> {
    let mut req = try_request(head, fwd, attempt, ex, body, number);
    if fwd.grpc_timeout {
        forward_grpc_timeout(&mut req, fwd.deadline);
    }
    if let Some(rec) = ex.span.as_mut() {
        let endpoint = &attempt.endpoint().label;
        rec.begin_try(
            &mut req,
            number,
            endpoint,
            &fwd.cluster.name,
            attempt.started,
        );
    }
    req
}

/// Records what a try came to: into its span, its endpoint's record (unless a gRPC stream's
/// verdict waits for its trailers: `true`), and the call's gRPC status. Returns when it was
/// recorded.
fn settle(
    attempt: &Attempt,
    outcome: Outcome,
    ex: &mut Exchange,
    metrics: &Metrics,
) -> (bool, Option<Instant>) {
    if let Some(rec) = ex.span.as_mut() {
        rec.end_try(outcome);
    }
    if let Outcome::Grpc(c) = outcome {
        ex.grpc_status = Some(c);
    }
    // A gRPC call answered with a stream: its status comes in the trailers, and is
    // recorded then (see `Attempt::defer`).
    if ex.grpc && outcome == Outcome::Status(200) {
        return (true, None);
    }
    (false, attempt.record(outcome, ex.grpc, metrics))
}

/// The answer to a client whose own body failed: 400 `bad_request` (it broke off) or 408
/// `body_timeout` (it went silent), counted as `client_abort` or `body_timeout`. An
/// HTTP/1.1 connection is closed after it: the rest of the body will not be read.
fn client_failed(
    ctx: &ConnCtx,
    snap: &Snapshot,
    ex: Box<Exchange>,
    version: Version,
) -> Response<RespBody> {
    let reason = ex.body.client_reason();
    let label = match reason {
        Reason::BodyTimeout => "body_timeout",
        _ => "client_abort",
    };
    ctx.shared.metrics.reject(&ctx.listener, label);
    let mut resp = respond::local(reason.into(), snap, ex);
    if matches!(version, Version::HTTP_10 | Version::HTTP_11) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Try `number`'s endpoint, unless the request's deadline has passed or no endpoint is
/// available. The try starts at the exchange's own clock reading when it is the first and
/// nothing waited before it (see `Forward::at_start`), else at a reading of its own.
fn start_try(
    fwd: &Forward<'_>,
    tried: &Tried,
    ex: &Exchange,
    number: u32,
) -> Result<Attempt, Reason> {
    if fwd.deadline.is_some_and(|d| crate::clock::now() >= d) {
        return Err(Reason::Timeout);
    }
    let now = match number == 1 && fwd.at_start {
        true => ex.start,
        false => crate::clock::now(),
    };
    Attempt::pick(&fwd.cluster, tried, fwd.hash_key.as_deref(), now)
        .ok_or(Reason::NoHealthyEndpoint)
}

/// The request body as the tries see it: held whole (so each try sends it again), or a
/// stream only the first try can send.
enum TryBody {
    Whole(Bytes, Option<HeaderMap>),
    Stream(Option<ReqBody>),
}

impl TryBody {
    /// Reads the body whole when a retry or a mirror may need it (up to the larger of their
    /// limits); `None` when the client's body broke off while being read.
    async fn read(fwd: &Forward<'_>, body: InBody, ex: &Exchange) -> Option<TryBody> {
        let limit = match (fwd.retry, fwd.mirror) {
            (Some(r), Some(_)) => Some(r.policy.max_body.max(mirror::MAX_BODY)),
            (Some(r), None) => Some(r.policy.max_body),
            (None, Some(_)) => Some(mirror::MAX_BODY),
            (None, None) => None,
        };
        let body = ClientBody::new(body, ex.body.clone(), fwd.body_timeout);
        let Some(limit) = limit else {
            return Some(TryBody::Stream(Some(ReqBody::streaming(body))));
        };
        match upstream::buffer(body, limit).await {
            Buffered::Whole(data, trailers) => Some(TryBody::Whole(data, trailers)),
            Buffered::Stream(b) => Some(TryBody::Stream(Some(b))),
            Buffered::Broken => None,
        }
    }

    /// The body held whole, if it is.
    fn replayable(&self) -> Option<(Bytes, Option<HeaderMap>)> {
        match self {
            TryBody::Whole(d, t) => Some((d.clone(), t.clone())),
            TryBody::Stream(_) => None,
        }
    }

    /// Whether a retry may send it again within the policy's own `max_body`.
    fn fits(&self, retry: &RetryRt) -> bool {
        matches!(self, TryBody::Whole(d, _) if d.len() as u64 <= retry.policy.max_body)
    }

    fn for_try(&mut self) -> ReqBody {
        match self {
            TryBody::Whole(d, t) => ReqBody::replay(d, t),
            TryBody::Stream(s) => s.take().unwrap_or_else(ReqBody::empty),
        }
    }
}

/// The request one try sends: the rewritten head, addressed to the endpoint, in the
/// cluster's HTTP version.
fn try_request(
    head: &mut Parts,
    fwd: &Forward<'_>,
    attempt: &Attempt,
    ex: &Exchange,
    body: ReqBody,
    number: u32,
) -> Request<ReqBody> {
    let cluster = &*fwd.cluster;
    let unknown_length = !body.is_end_stream() && body.size_hint().exact().is_none();
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    // Without a retry policy this is the only try: the headers move rather than copy.
    *req.headers_mut() = match fwd.retry {
        Some(_) => head.headers.clone(),
        None => std::mem::take(&mut head.headers),
    };
    if unknown_length
        && cluster.protocol == UpstreamProtocol::Http1
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        // A chunked body goes on chunked: hyper would otherwise send a GET's (or a
        // HEAD's) body of unknown length as no body at all.
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if number > 1 {
        req.headers_mut()
            .insert(X_SPUR_ATTEMPT.clone(), HeaderValue::from(number));
    }
    *req.version_mut() = cluster.http_version();
    *req.uri_mut() = upstream_uri(cluster, attempt, &ex.path);
    if req.version() == Version::HTTP_2 {
        // HTTP/2 carries the endpoint as its authority. (HTTP/3 turns Host into its
        // `:authority`, so the next hop can route by it, see `crate::quic::client`.)
        req.headers_mut().remove(header::HOST);
    }
    req
}

/// `grpc-timeout` for one try: what is left of the request's deadline (the client's
/// `grpc-timeout`, or the route's `timeout` when sooner), so the server stops working on a
/// call the client has given up on.
fn forward_grpc_timeout(req: &mut Request<ReqBody>, deadline: Option<Instant>) {
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(crate::clock::now());
        req.headers_mut().insert(
            crate::grpc::GRPC_TIMEOUT.clone(),
            crate::grpc::timeout_value(left),
        );
    }
}

/// HTTP/1.1 sends the origin form (`/path?query`); HTTP/2 and HTTP/3 need scheme and
/// authority, the endpoint's address.
fn upstream_uri(cluster: &ClusterRt, attempt: &Attempt, path: &http::uri::PathAndQuery) -> Uri {
    if cluster.protocol == UpstreamProtocol::Http1 {
        return Uri::from(path.clone());
    }
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(cluster.scheme());
    uri.authority = Some(attempt.endpoint().authority.clone());
    uri.path_and_query = Some(path.clone());
    Uri::from_parts(uri).expect("scheme, authority and path make a URI")
}

/// What a try came to, and the response or Spur's reason to answer with.
fn classify(
    sent: Option<Result<Response<InBody>, UpstreamError>>,
    ex: &Exchange,
    metrics: &Metrics,
    cluster: &ClusterRt,
) -> (Outcome, Result<Response<InBody>, Reason>) {
    let outcome = match &sent {
        None => Outcome::Timeout,
        Some(Ok(r)) if ex.grpc && r.status() == http::StatusCode::OK => {
            // Trailers-only: the status is in the head, before anything reached the client.
            match crate::grpc::status_in(r.headers()) {
                Some(c) => Outcome::Grpc(c),
                None => Outcome::Status(200),
            }
        }
        Some(Ok(r)) => Outcome::Status(r.status().as_u16()),
        Some(Err(e)) => {
            tracing::debug!(cluster = &*cluster.name, error = %e, "upstream error");
            if let Some(reason) = e.tls_reason {
                metrics.upstream_tls_error(&cluster.name, reason);
            }
            // The client's body broke off: whatever the upstream did, that is why.
            if ex.body.client_failed() {
                Outcome::ClientAbort
            } else {
                e.failure.outcome()
            }
        }
    };
    let result = match sent {
        Some(Ok(resp)) => Ok(resp),
        _ => Err(outcome.failure_reason().unwrap_or(Reason::UpstreamReset)),
    };
    (outcome, result)
}

/// Whether to try again after try number `number` came to `outcome`, and after what pause:
/// the policy allows it, the pause still ends before the deadline (a retry whose pause alone
/// reaches the deadline is not made: the client gets this answer rather than a 504), and the
/// body can be sent again (counted as `body_too_large` when it cannot).
fn next_step<'r>(
    fwd: &Forward<'r>,
    outcome: Outcome,
    number: u32,
    idempotent: bool,
    body: &TryBody,
    metrics: &Metrics,
) -> Option<(&'r RetryRt, Duration)> {
    let r = fwd.retry?;
    if !r.policy.retryable(outcome, number, idempotent) {
        return None;
    }
    let pause = r.policy.backoff(number);
    if fwd
        .deadline
        .is_some_and(|d| crate::clock::now() + pause >= d)
    {
        return None;
    }
    if !body.fits(r) {
        metrics
            .retry_skipped
            .get_or_create(&ClusterReasonLabels {
                cluster: fwd.cluster.name.clone(),
                reason: "body_too_large",
            })
            .inc();
        return None;
    }
    Some((r, pause))
}

/// Takes a retry from the route's budget: counted as a retry (by the failed try's reason),
/// or as the budget exhausted.
fn budget(r: &RetryRt, outcome: Outcome, cluster: &ClusterRt, metrics: &Metrics) -> bool {
    if r.budget.withdraw(crate::clock::now()) {
        metrics
            .retries
            .get_or_create(&ClusterReasonLabels {
                cluster: cluster.name.clone(),
                reason: outcome.reason(),
            })
            .inc();
        true
    } else {
        metrics
            .retry_budget_exhausted
            .get_or_create(&ClusterLabels {
                cluster: cluster.name.clone(),
            })
            .inc();
        false
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
#[path = "tries_tests.rs"]
mod tests;
