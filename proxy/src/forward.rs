//! The HTTP request path, as named phases run in this order for every request:
//!
//! 1. **admit**: the request head within `max_header_bytes`, else 431.
//! 2. **correlate**: keep or make the request ID; child span in `traceparent`.
//! 3. **route**: first matching route of the listener, else its default cluster, else 404.
//! 4. **split**: the route's cluster, or one side of its weighted split (sticky by `hash_on`).
//! 5. **balance**: an endpoint of that cluster, by its load-balancing policy.
//! 6. **forward**: hop-by-hop headers out, forwarding headers in, sent on the cluster's
//!    pooled client within the route's `timeout`.
//! 7. **respond**: hop-by-hop headers out, request ID in, body streamed back; protocol
//!    upgrades (WebSocket) are spliced into a byte tunnel.
//!
//! The exchange record (access log, request metrics) is written when the response body
//! ends, see [`crate::exchange`].

use crate::exchange::{local_response, Exchange, RespBody};
use crate::headers::{self, TRACEPARENT, X_SPUR_PEER_IDENTITY};
use crate::metrics::UpstreamLabels;
use crate::policy::correlation::{new_request_id, valid_request_id, TraceParent};
use crate::policy::route::RequestView;
use crate::policy::split;
use crate::snapshot::{ClusterRt, ListenerRt, Snapshot, Target};
use crate::upstream::ReqBody;
use crate::Shared;
use http::uri::{PathAndQuery, Scheme};
use http::{header, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use spur_config::UpstreamProtocol;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// What a connection knows about itself, shared by its requests.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
}

pub async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let snap = ctx.shared.snapshot.load_full();
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let ex = Exchange::new(
        ctx.shared.clone(),
        ctx.listener.clone(),
        req.method().clone(),
        path,
    );
    let Some(lst) = snap.listeners.get(&*ctx.listener).cloned() else {
        // The listener was removed by a config push while this connection was open.
        return Ok(local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_route",
            &snap.correlation.header,
            Some(ex),
        ));
    };
    Ok(proxy(&ctx, &snap, &lst, req, ex).await)
}

async fn proxy(
    ctx: &ConnCtx,
    snap: &Snapshot,
    lst: &ListenerRt,
    mut req: Request<Incoming>,
    mut ex: Exchange,
) -> Response<RespBody> {
    let id_header = &snap.correlation.header;

    // 2. correlate (first, so that even a refused request carries its ID)
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

    // 1. admit
    if headers::head_size(&req) > lst.limits.max_header_bytes.get() as usize {
        ctx.shared.metrics.reject(&lst.name, "headers_too_large");
        return local_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            id_header,
            Some(ex),
        );
    }

    // 3. route
    let view = RequestView {
        method: req.method(),
        path: req.uri().path(),
        host: headers::host(&req),
        headers: req.headers(),
    };
    let (route_name, target, timeout) = match lst.route(&view) {
        Some(r) => (r.name.clone(), Some(&r.target), r.timeout),
        None => (lst.default_route_name.clone(), None, None),
    };
    // 4. split
    let cluster: Arc<ClusterRt> = match target {
        Some(Target::Cluster(c)) => c.clone(),
        Some(Target::Split {
            clusters,
            weights,
            total,
            hash_on,
        }) => {
            let key = hash_on.as_ref().and_then(|h| h.key(req.headers()));
            clusters[split::choose(weights, *total, key)].clone()
        }
        None => match &lst.default_cluster {
            Some(c) => c.clone(),
            None => return local_response(StatusCode::NOT_FOUND, "no_route", id_header, Some(ex)),
        },
    };
    ex.route = route_name;
    ex.cluster = cluster.name.clone();

    // 5. balance
    let Some(idx) = cluster
        .balancer
        .pick(&cluster.endpoints, None, Instant::now())
    else {
        return local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_endpoint",
            id_header,
            Some(ex),
        );
    };
    let endpoint = cluster.endpoints[idx].clone();
    ex.endpoint = Some(endpoint.start());

    // 6. forward
    let upgrade = headers::is_upgrade(&req).then(|| {
        let proto = req.headers().get(header::UPGRADE).cloned();
        (hyper::upgrade::on(&mut req), proto)
    });
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&X_SPUR_PEER_IDENTITY);
    headers::set_forwarded(&mut parts.headers, ctx.peer.ip(), "http");
    if let Some((_, Some(proto))) = &upgrade {
        parts.headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    if !parts.headers.contains_key(header::HOST) {
        if let Some(auth) = parts.uri.authority() {
            if let Ok(v) = header::HeaderValue::from_str(auth.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    match cluster.protocol {
        UpstreamProtocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
        _ => parts.version = Version::HTTP_11,
    }
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(endpoint.authority.clone());
    uri.path_and_query = Some(ex.path.clone());
    parts.uri = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
    let up_req = Request::from_parts(parts, ReqBody::counted(body, ex.bytes_received.clone()));

    let sent = Instant::now();
    let call = cluster.client.request(up_req);
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, call).await {
            Ok(r) => r,
            Err(_) => {
                endpoint.observe(sent.elapsed(), true);
                count_upstream(ctx, &cluster, &endpoint.label, 0);
                return local_response(StatusCode::GATEWAY_TIMEOUT, "timeout", id_header, Some(ex));
            }
        },
        None => call.await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            endpoint.observe(sent.elapsed(), true);
            count_upstream(ctx, &cluster, &endpoint.label, 0);
            let reason = if e.is_connect() {
                "upstream_unreachable"
            } else {
                "upstream_reset"
            };
            tracing::debug!(cluster = &*cluster.name, endpoint = &*endpoint.label, error = %e, "upstream error");
            return local_response(StatusCode::BAD_GATEWAY, reason, id_header, Some(ex));
        }
    };
    let status = resp.status();
    endpoint.observe(sent.elapsed(), status.is_server_error());
    count_upstream(ctx, &cluster, &endpoint.label, status.as_u16());

    // 7. respond
    ex.status = status.as_u16();
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let resp_upgrade = resp.headers().get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(resp.headers_mut());
    if let Some(id) = &ex.request_id {
        resp.headers_mut().insert(id_header.clone(), id.clone());
    }
    if switching {
        match (upgrade, resp_upgrade) {
            (Some((downstream, _)), Some(proto)) => {
                resp.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("upgrade"),
                );
                resp.headers_mut().insert(header::UPGRADE, proto);
                let upstream = hyper::upgrade::on(&mut resp);
                ex.upgraded = true;
                tokio::spawn(tunnel(downstream, upstream));
            }
            _ => {
                return local_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream_reset",
                    id_header,
                    Some(ex),
                );
            }
        }
    }
    resp.map(|b| RespBody::upstream(b, ex))
}

fn count_upstream(ctx: &ConnCtx, cluster: &ClusterRt, endpoint: &Arc<str>, code: u16) {
    ctx.shared
        .metrics
        .upstream_requests
        .get_or_create(&UpstreamLabels {
            cluster: cluster.name.clone(),
            endpoint: endpoint.clone(),
            code,
        })
        .inc();
}

/// Splices an upgraded client connection to the upgraded upstream one.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (d, u) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut d = TokioIo::new(d);
    let mut u = TokioIo::new(u);
    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}
