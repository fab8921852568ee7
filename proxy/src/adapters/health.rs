//! Active health checks: each endpoint of a cluster with `health_check` gets a `GET path`
//! every `interval`; a 2xx within `timeout` passes. Thresholds turn runs of results into
//! down/up (see `policy::health`); a down endpoint gets no traffic.
//!
//! One task per compiled cluster. It holds the cluster weakly and ends when a config swap
//! drops that cluster; the health state itself lives with the endpoint, so the next
//! snapshot's task carries on from it.

use crate::metrics::EndpointLabels;
use crate::snapshot::ClusterRt;
use crate::upstream::ReqBody;
use crate::Shared;
use http::Request;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn(shared: Arc<Shared>, cluster: &Arc<ClusterRt>) {
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
                let uri = format!("{}://{}{}", c.scheme(), ep.label, hc.path);
                let req = Request::get(uri)
                    .header("user-agent", "spur-health-check")
                    .version(c.http_version());
                let Ok(req) = req.body(ReqBody::Replay(None, None)) else {
                    continue;
                };
                let client = c.client.clone();
                let call = async move { client.request(req).await };
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
                shared
                    .metrics
                    .endpoint_healthy
                    .get_or_create(&EndpointLabels {
                        cluster: c.name.clone(),
                        endpoint: ep.label.clone(),
                    })
                    .set(i64::from(ep.is_healthy()));
            }
            let interval = hc.interval.get();
            drop((c, members));
            tokio::time::sleep(interval.max(Duration::from_millis(10))).await;
        }
    });
}
