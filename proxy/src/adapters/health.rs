//! Active health checks: each endpoint of a cluster with `health_check` gets a `GET path`
//! every `interval`; a 2xx within `timeout` passes. Thresholds turn runs of results into
//! down/up (see `policy::health`); a down endpoint gets no traffic.
//!
//! One task per compiled cluster. It holds the cluster weakly and ends when a config swap
//! drops that cluster; the health state itself lives with the endpoint, so the next
//! snapshot's task carries on from it.

use crate::endpoint::EndpointState;
use crate::snapshot::ClusterRt;
use crate::upstream::ReqBody;
use crate::Shared;
use http::Request;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn(_shared: Arc<Shared>, cluster: &Arc<ClusterRt>) {
    let Some(hc) = cluster.health_check.clone() else {
        return;
    };
    let weak = Arc::downgrade(cluster);
    tokio::spawn(async move {
        loop {
            let Some(c) = weak.upgrade() else { return };
            let members = c.members.load_full();
            let mut checks = Vec::with_capacity(members.endpoints.len());
            for ep in members.endpoints.iter() {
                let Ok(req) = check_request(&c, ep, &hc.path) else {
                    continue;
                };
                let client = c.client.clone();
                let endpoint = ep.clone();
                let call = async move { client.send(&endpoint, req).await };
                let timeout = hc.timeout.get();
                checks.push((
                    ep.clone(),
                    tokio::spawn(async move {
                        matches!(tokio::time::timeout(timeout, call).await, Ok(Ok(r)) if r.status().is_success())
                    }),
                ));
            }
            for (ep, check) in checks {
                let passed = check.await.unwrap_or(false);
                if let Some(healthy) =
                    ep.record_check(passed, hc.unhealthy_threshold, hc.healthy_threshold)
                {
                    if healthy {
                        ep.restart_estimate(&members, crate::clock::now());
                        tracing::info!(
                            cluster = &*c.name,
                            endpoint = &*ep.label,
                            "endpoint healthy"
                        );
                    } else {
                        tracing::warn!(
                            cluster = &*c.name,
                            endpoint = &*ep.label,
                            "endpoint failed health checks"
                        );
                    }
                }
            }
            let interval = hc.interval.get();
            drop((c, members));
            tokio::time::sleep(interval.max(Duration::from_millis(10))).await;
        }
    });
}

/// `GET path` to one endpoint, in the cluster's protocol (origin form over HTTP/1.1).
fn check_request(c: &ClusterRt, ep: &EndpointState, path: &str) -> http::Result<Request<ReqBody>> {
    let uri = if c.protocol == spur_config::UpstreamProtocol::Http1 {
        path.to_string()
    } else {
        format!("{}://{}{}", c.scheme(), ep.label, path)
    };
    let mut req = Request::get(uri)
        .header("user-agent", "spur-health-check")
        .version(c.http_version());
    if c.protocol == spur_config::UpstreamProtocol::Http1 {
        req = req.header(http::header::HOST, &*ep.label);
    }
    req.body(ReqBody::empty())
}
