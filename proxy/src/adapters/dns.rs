//! `dns:` clusters: the endpoints are what `host:port` resolves to, re-resolved every
//! [`REFRESH`]. A failed or empty answer keeps the last good set (a DNS hiccup must not
//! empty a cluster). Endpoint state is fetched from the registry, so an address that stays
//! in the answer keeps its pool, latency estimate and breaker.

use crate::snapshot::{ClusterRt, Members};
use crate::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const REFRESH: Duration = Duration::from_secs(5);

async fn resolve(target: &str) -> Option<Vec<SocketAddr>> {
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(target)).await {
        Ok(Ok(addrs)) => {
            let mut v: Vec<SocketAddr> = addrs.collect();
            v.sort();
            v.dedup();
            (!v.is_empty()).then_some(v)
        }
        Ok(Err(e)) => {
            tracing::warn!(target, error = %e, "DNS resolution failed; keeping the last endpoints");
            None
        }
        Err(_) => {
            tracing::warn!(
                target,
                "DNS resolution timed out; keeping the last endpoints"
            );
            None
        }
    }
}

/// Resolves once and installs the answer if it differs from the current endpoints.
pub async fn refresh(shared: &Shared, cluster: &ClusterRt) {
    let Some(target) = &cluster.dns else { return };
    let Some(addrs) = resolve(target).await else {
        return;
    };
    let current = cluster.members.load();
    let same = current.endpoints.len() == addrs.len()
        && current
            .endpoints
            .iter()
            .zip(&addrs)
            .all(|(e, a)| e.addr == *a);
    if same {
        return;
    }
    let endpoints: Vec<_> = addrs
        .iter()
        .map(|a| shared.registry.endpoint(&cluster.name, *a, &shared.metrics))
        .collect();
    let weights = vec![1; endpoints.len()];
    cluster
        .members
        .store(Arc::new(Members::build(cluster.lb, endpoints, weights)));
    tracing::info!(
        cluster = &*cluster.name,
        target = target.as_str(),
        endpoints = addrs.len(),
        "DNS endpoints updated"
    );
}

/// Re-resolves every [`REFRESH`] while the cluster is in use.
pub fn spawn(shared: Arc<Shared>, cluster: &Arc<ClusterRt>) {
    if cluster.dns.is_none() {
        return;
    }
    let weak = Arc::downgrade(cluster);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH).await;
            let Some(c) = weak.upgrade() else { return };
            refresh(&shared, &c).await;
        }
    });
}
