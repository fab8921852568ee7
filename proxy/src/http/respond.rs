//! **Respond**: the upstream's response back to the client, or Spur's own answer.
//!
//! An upstream response loses its hop-by-hop headers and gets the request ID; its body
//! streams back carrying the exchange record (see [`crate::exchange`]). A `101 Switching
//! Protocols` to an upgrade the client asked for (WebSocket) becomes a byte tunnel between
//! the two upgraded connections. Spur's own answers carry their [`Reason`]'s status, the
//! `x-spur-error` header and the request ID.

use super::plan::Refusal;
use super::ConnCtx;
use crate::body::InBody;
use crate::exchange::{local_response, Exchange, RespBody};
use crate::headers;
use crate::reason::Reason;
use crate::snapshot::Snapshot;
use http::{header, HeaderValue, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Spur's own answer to a request.
pub fn local(refusal: Refusal, snap: &Snapshot, ex: Box<Exchange>) -> Response<RespBody> {
    local_response(
        refusal.status,
        refusal.reason,
        &snap.correlation.header,
        Some(ex),
    )
}

/// The upstream's response, on its way to the client. `downstream` is the client's
/// connection upgrade, when it asked for one.
pub fn upstream(
    ctx: &ConnCtx,
    snap: &Snapshot,
    mut resp: Response<InBody>,
    mut ex: Box<Exchange>,
    downstream: Option<hyper::upgrade::OnUpgrade>,
) -> Response<RespBody> {
    if matches!(resp.version(), Version::HTTP_2 | Version::HTTP_3) {
        // The client's connection decides its version; hyper's HTTP/1.1 server writes the
        // version it is given, and HTTP/3 is not one it knows.
        *resp.version_mut() = Version::HTTP_11;
    }
    let status = resp.status();
    ex.status = status.as_u16();
    let resp_upgrade = match status == StatusCode::SWITCHING_PROTOCOLS {
        true => resp.headers().get(header::UPGRADE).cloned(),
        false => None,
    };
    headers::strip_hop_by_hop(resp.headers_mut());
    if let Some(id) = &ex.request_id {
        resp.headers_mut()
            .insert(snap.correlation.header.clone(), id.clone());
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(downstream), Some(proto)) = (downstream, resp_upgrade) else {
            return local(Reason::UpstreamReset.into(), snap, ex);
        };
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
    resp.map(|b| RespBody::upstream(b, ex))
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
