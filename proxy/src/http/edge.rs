//! Edge policy on the request path: a listener's and a route's rate limits, CORS, redirects,
//! rewrites and header rules, compiled with the snapshot and applied at four points:
//!
//! 1. **decide** (in [`super::plan`]): the listener's limit after authorization
//!    ([`listener_limit`]); after routing, the route's CORS check or preflight answer, its
//!    limit and its redirect ([`decide_route`]). Each is an answer or nothing;
//! 2. **rewrite** ([`rewrite`]): the path prefix and Host the upstream receives, before the
//!    exchange records the path;
//! 3. **request head** ([`on_request`]): forwarding headers (see [`super::forwarded`]) and
//!    `request_headers`, after Spur's own headers are set;
//! 4. **response** ([`on_response`]): `response_headers` and CORS headers, on every answer
//!    of the route (Spur's own included).
//!
//! A route or listener without these settings holds `None`s: the request path tests an
//! option and moves on, nothing allocated, no lock taken.

use super::answer::Answer;
use super::cors::{self, CorsRt, Decision};
use super::forwarded::{self, Trust};
use super::plan::{Peer, Plan};
use super::rules::{self, HeaderRulesRt, RedirectRt, RewriteRt};
use super::ConnCtx;
use crate::metrics::Metrics;
use crate::ratelimit::{Keys, LimitRegistry, RateLimitRt};
use crate::reason::Reason;
use crate::snapshot::{ListenerRt, RouteRt, Snapshot};
use http::request::Parts;
use http::HeaderMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

/// A listener's edge policy.
#[derive(Default)]
pub struct ListenerEdge {
    pub rate_limit: Option<RateLimitRt>,
    /// `x_forwarded.trusted_hops` (at most 10).
    pub trusted_hops: u8,
    /// The listener terminates TLS (the scheme of redirects and same-origin checks).
    pub tls: bool,
}

impl ListenerEdge {
    pub fn compile(
        name: &Arc<str>,
        l: &spur_config::Listener,
        limits: &LimitRegistry,
        metrics: &Metrics,
    ) -> ListenerEdge {
        ListenerEdge {
            rate_limit: l
                .rate_limit
                .as_ref()
                .map(|r| RateLimitRt::compile(name, None, r, limits, metrics)),
            trusted_hops: l.x_forwarded.map_or(0, |x| x.trusted_hops.min(10) as u8),
            tls: l.tls.is_some(),
        }
    }
}

/// A route's edge policy.
#[derive(Default)]
pub struct RouteEdge {
    pub rate_limit: Option<RateLimitRt>,
    pub request_headers: Option<HeaderRulesRt>,
    pub response_headers: Option<HeaderRulesRt>,
    pub rewrite: Option<RewriteRt>,
    pub redirect: Option<RedirectRt>,
    pub cors: Option<CorsRt>,
}

impl RouteEdge {
    pub fn compile(
        listener: &Arc<str>,
        route: &Arc<str>,
        r: &spur_config::Route,
        limits: &LimitRegistry,
        metrics: &Metrics,
    ) -> RouteEdge {
        RouteEdge {
            rate_limit: r
                .rate_limit
                .as_ref()
                .map(|rl| RateLimitRt::compile(listener, Some(route), rl, limits, metrics)),
            request_headers: r.request_headers.as_ref().map(HeaderRulesRt::compile),
            response_headers: r.response_headers.as_ref().map(HeaderRulesRt::compile),
            rewrite: r
                .rewrite
                .as_ref()
                .map(|rw| RewriteRt::compile(rw, &r.matches)),
            redirect: r
                .redirect
                .as_ref()
                .map(|rd| RedirectRt::compile(rd, &r.matches)),
            cors: r.cors.as_ref().map(CorsRt::compile),
        }
    }
}

/// The names of the rate limits a snapshot uses (their state is kept; others go).
pub fn limit_names(snap: &Snapshot) -> HashSet<Arc<str>> {
    let mut names = HashSet::new();
    for l in snap.listeners.values() {
        if let Some(r) = &l.edge.rate_limit {
            names.insert(r.name.clone());
        }
        for route in &l.routes {
            if let Some(r) = &route.edge.rate_limit {
                names.insert(r.name.clone());
            }
        }
    }
    names
}

/// How far the listener believes the peer's forwarding headers.
pub fn trust(lst: &ListenerRt, peer: Peer<'_>) -> Trust {
    Trust {
        mesh_peer: peer.identity.is_some(),
        trusted_hops: lst.edge.trusted_hops,
    }
}

fn check(
    rl: &RateLimitRt,
    trust: Trust,
    peer: Peer<'_>,
    head: &Parts,
    now: Instant,
) -> Option<Box<Answer>> {
    let keys = Keys {
        identity: peer.identity.map(|i| &**i),
        client_ip: forwarded::client_ip(&head.headers, peer.addr.ip(), trust),
        headers: &head.headers,
    };
    rl.check(&keys, now).map(|l| Box::new(l.answer()))
}

/// The listener's own rate limit.
pub fn listener_limit(
    lst: &ListenerRt,
    peer: Peer<'_>,
    head: &Parts,
    now: Instant,
) -> Option<Box<Answer>> {
    let rl = lst.edge.rate_limit.as_ref()?;
    check(rl, trust(lst, peer), peer, head, now)
}

/// What the route's edge policy answers, if anything: a preflight (`preflight` is the
/// method a CORS preflight announced, when the request is one), a refused origin, a 429,
/// a redirect. An allowed CORS origin is kept in the plan for the response.
pub fn decide_route(
    route: &RouteRt,
    lst: &ListenerRt,
    peer: Peer<'_>,
    head: &Parts,
    preflight: bool,
    now: Instant,
    plan: &mut Plan<'_>,
) -> Option<Result<Box<Answer>, Reason>> {
    let e = &route.edge;
    if let Some(c) = &e.cors {
        match c.decide(&head.headers, &head.uri, lst.edge.tls) {
            Decision::Forbidden => return Some(Err(Reason::CorsForbidden)),
            Decision::Allowed(origin) if preflight => return Some(Ok(c.preflight(origin))),
            Decision::Allowed(origin) => plan.cors_origin = Some(Box::new(origin)),
            Decision::None => {}
        }
    }
    if let Some(rl) = &e.rate_limit {
        if let Some(a) = check(rl, trust(lst, peer), peer, head, now) {
            return Some(Ok(a));
        }
    }
    if let Some(r) = &e.redirect {
        let mut h = HeaderMap::with_capacity(1);
        let Some(loc) = r.location(head, lst.edge.tls) else {
            return Some(Err(Reason::InvalidHost));
        };
        h.insert(http::header::LOCATION, loc);
        return Some(Ok(Answer::empty(r.status, h)));
    }
    None
}

/// Which route a request goes to: for a CORS preflight, the route of the request it
/// announces when that route has `cors` (else the route of the `OPTIONS` itself). Also
/// whether the request is such a preflight.
pub fn route_for<'s>(
    lst: &'s ListenerRt,
    view: &crate::policy::route::RequestView<'_>,
    flags_on: &[bool],
) -> (Option<&'s RouteRt>, bool) {
    if let Some(m) = cors::preflight_method(view.method, view.headers) {
        let announced = crate::policy::route::RequestView {
            method: &m,
            ..*view
        };
        if let Some(r) = lst
            .route(&announced, flags_on)
            .filter(|r| r.edge.cors.is_some())
        {
            return (Some(r), true);
        }
    }
    (lst.route(view, flags_on), false)
}

/// The route's `rewrite`, on the head the upstream will receive.
pub fn rewrite(route: &RouteRt, head: &mut Parts) {
    if let Some(rw) = &route.edge.rewrite {
        rw.apply(head);
    }
}

/// Forwarding headers and the route's `request_headers`, on the upstream's head.
pub fn on_request(ctx: &ConnCtx, plan: &Plan<'_>, h: &mut HeaderMap, proto: &'static str) {
    let peer = ctx
        .forwarded
        .get_or_init(|| forwarded::peer_value(ctx.peer.ip()));
    forwarded::apply(h, peer, proto, plan.trust);
    if let Some(rules) = plan.route.and_then(|r| r.edge.request_headers.as_ref()) {
        rules.apply(h, &rules::vars(plan, ctx));
    }
}

/// The route's `response_headers` and CORS headers, on the response to the client.
pub fn on_response(ctx: &ConnCtx, plan: &Plan<'_>, h: &mut HeaderMap) {
    let Some(route) = plan.route else { return };
    if let Some(rules) = &route.edge.response_headers {
        rules.apply(h, &rules::vars(plan, ctx));
    }
    if let (Some(c), Some(origin)) = (&route.edge.cors, &plan.cors_origin) {
        c.on_response(origin, h);
    }
}
