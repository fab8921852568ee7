//! The HTTP request path, for every transport (HTTP/1.1, HTTP/2, HTTP/3): **decide, then do**.
//!
//! 1. [`plan`]: a synchronous decision from the snapshot, the connection and the request
//!    head: request ID and trace context, admission, the head normalised ([`normalize`]:
//!    one host, one path), flags, route, split, fault, deadlines, retry policy, mirror; or
//!    the reason Spur answers itself. No I/O.
//! 2. [`forward`](head rewriting, here): the head the upstream will see — hop-by-hop
//!    headers out, Spur's own headers set from the plan, forwarding headers.
//! 3. [`tries`]: the cluster's slot, the body (buffered when a retry or mirror needs it),
//!    one [`crate::attempt::Attempt`] per try, the retry decision, the mirror.
//! 4. [`respond`]: the response back to the client (headers, upgrade tunnel), or Spur's own
//!    answer with its [`crate::reason::Reason`].
//!
//! The exchange record (access log, request metrics) is written when the response body
//! ends, see [`crate::exchange`].

pub mod answer;
pub mod cors;
pub mod edge;
pub mod forwarded;
pub mod normalize;
pub mod plan;
pub mod respond;
pub mod rules;
pub mod tries;

use crate::body::InBody;
use crate::exchange::{Exchange, RespBody};
use crate::headers::{self, X_SPUR_PEER_IDENTITY};
use crate::reason::Reason;
use crate::Shared;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use plan::{Action, Forward, Peer, Plan};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub static X_SPUR_ATTEMPT: header::HeaderName = header::HeaderName::from_static("x-spur-attempt");
pub static X_SPUR_FLAGS: header::HeaderName = header::HeaderName::from_static("x-spur-flags");
pub static X_SPUR_MIRROR: header::HeaderName = header::HeaderName::from_static("x-spur-mirror");

/// What a connection knows about itself, shared by its requests.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// `peer`'s address as an `x-forwarded-for` element, made on the first request.
    pub forwarded: std::sync::OnceLock<HeaderValue>,
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
}

impl ConnCtx {
    fn peer(&self) -> Peer<'_> {
        Peer {
            addr: self.peer,
            identity: self.peer_identity.as_ref(),
            original_dst: self.original_dst,
        }
    }
}

pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    Ok(handle_any(&ctx, req.map(InBody::Http)).await)
}

/// The request path for a request from any transport (HTTP/1.1, HTTP/2, HTTP/3).
///
/// Not an `async fn`, which would keep the request twice in its future (captured, then
/// split into locals): the block captures the head and body already split (see
/// `tries::run`).
pub fn handle_any(
    ctx: &ConnCtx,
    req: Request<InBody>,
) -> impl Future<Output = Response<RespBody>> + '_ {
    let (mut head, body) = req.into_parts();
    async move {
        let snap = ctx.shared.snapshot.load_full();
        let path = head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut ex = Exchange::new(
            ctx.shared.clone(),
            ctx.listener.clone(),
            ctx.peer,
            head.method.clone(),
            path,
        );
        ex.peer_identity = ctx.peer_identity.clone();
        ex.log_query = snap.log_query;
        let Some(lst) = snap.listeners.get(&*ctx.listener) else {
            // The listener was removed by a config push while this connection was open.
            ex.user_agent = head.headers.get(header::USER_AGENT).cloned();
            ex.grpc = crate::grpc::is_grpc(&head.headers);
            return respond::local(Reason::ListenerRemoved.into(), &snap, ex);
        };
        let plan = plan::plan(
            &snap,
            lst,
            ctx.peer(),
            &mut head,
            // The exchange's clock reading, a moment old: one reading for the request's start.
            ex.start,
            &mut fastrand::Rng::new(),
        );
        if plan.seen.has(headers::Seen::USER_AGENT) {
            ex.user_agent = head.headers.get(header::USER_AGENT).cloned();
        }
        ex.record_plan(&plan, lst);
        if let (Some(route), Action::Forward(_)) = (plan.route, &plan.action) {
            edge::rewrite(route, &mut head);
        }
        ex.span = crate::trace::span::Recording::for_plan(&snap, &plan, ex.start);
        if let Some(p) = head.uri.path_and_query() {
            // Normalised by the plan: logged, and sent upstream, as it was routed.
            ex.path = p.clone();
        }
        ex.host = head.headers.get(header::HOST).cloned();
        if let Some(delay) = plan.delay {
            // Boxed: rare, and a timer is a large part of a future every request carries.
            Box::pin(tokio::time::sleep(delay)).await;
        }
        let mut resp = match plan.action {
            Action::Refuse(refusal) => {
                if refusal.reason.rejects_client() {
                    ctx.shared
                        .metrics
                        .reject(&lst.name, refusal.reason.as_str());
                }
                respond::local(refusal, &snap, ex)
            }
            Action::Answer(ref answer) => {
                if let Some(reason) = answer.reason.filter(|r| r.rejects_client()) {
                    ctx.shared.metrics.reject(&lst.name, reason.as_str());
                }
                answer::respond(answer, &snap, ex)
            }
            Action::Forward(ref fwd) => {
                rewrite_head(ctx, &snap.correlation.header, &plan, fwd, &mut head);
                tries::run(ctx, &snap, fwd, &mut head, body, ex).await
            }
        };
        if let Some(v) = &lst.alt_svc {
            resp.headers_mut().insert(header::ALT_SVC, v.clone());
        }
        edge::on_response(ctx, &plan, resp.headers_mut());
        resp
    }
}

/// The head the upstream sees: hop-by-hop headers out (an upgrade only if the plan allows
/// it), Spur's own headers from the plan (a client cannot forge them), forwarding headers,
/// and a Host for HTTP/1.1.
fn rewrite_head(
    ctx: &ConnCtx,
    id_header: &header::HeaderName,
    plan: &Plan<'_>,
    fwd: &Forward<'_>,
    head: &mut Parts,
) {
    let h = &mut head.headers;
    match &plan.request_id {
        Some(v) => h.insert(id_header.clone(), v.clone()),
        None => h.remove(id_header),
    };
    if let Some(t) = &plan.trace {
        t.write_upstream(h, t.span_id);
    }
    // What the request came with, and the request ID header just set: hop-by-hop headers
    // and headers only Spur sets (a client's are dropped) are looked for only when there.
    let seen = plan.seen.with(id_header, id_header);
    if seen.has(headers::Seen::HOP_BY_HOP) {
        headers::strip_hop_by_hop(h);
    }
    if seen.has(headers::Seen::SPUR) {
        for name in [
            &X_SPUR_PEER_IDENTITY,
            &X_SPUR_ATTEMPT,
            &X_SPUR_MIRROR,
            &X_SPUR_FLAGS,
        ] {
            h.remove(name);
        }
    }
    h.insert(
        headers::X_SPUR_HOPS.clone(),
        headers::hops_header(plan.hops),
    );
    if let Some(v) = &plan.flags_header {
        h.insert(X_SPUR_FLAGS.clone(), v.clone());
    }
    let proto = match &ctx.tls {
        Some(tls) => {
            if let Some(id) = &tls.identity_header {
                h.insert(X_SPUR_PEER_IDENTITY.clone(), id.clone());
            }
            "https"
        }
        None => "http",
    };
    // Forwarding headers and the route's `request_headers` (see `edge`).
    edge::on_request(ctx, plan, h, proto);
    if let Some(proto) = &fwd.upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }
    if !h.contains_key(header::HOST) {
        if let Some(v) = head
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            h.insert(header::HOST, v);
        }
    }
}
