//! Group-wide rate limits without a shared store: each proxy enforces its share of the
//! group's rate, and the control plane moves the shares with the demand.
//!
//! Every second a proxy with `scope: group` limits reports, per limit, the requests that
//! reached it (admitted or not) over the last second: `POST .../proxies/{node}/status` with
//! `{"demand": {"listener/route": requests_per_second}}`, the call it already makes for
//! versions. The control plane answers on the watch stream the proxy already holds, with a
//! line `{"shares": {"listener/route": share}}` when this proxy's shares change. A proxy
//! whose control plane is away keeps its last shares (at first, the whole rate).
//!
//! Why not a shared counter (Envoy's rate-limit service with Redis): a request would wait
//! for a network round trip, and the limit would fail open or closed with the store. Here a
//! request only reads its local bucket; the price is that the group's total follows a change
//! of load within a couple of seconds instead of at once.

use crate::reload::ControlSource;
use crate::Proxy;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often demand is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Reports this proxy's demand on its group limits every second, for as long as it runs
/// (nothing is sent while it has none).
pub fn spawn_reporter(proxy: Arc<Proxy>, src: ControlSource) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(REPORT_EVERY).await;
            let limits = proxy.shared.registry.rate_limits.groups();
            let elapsed = last.elapsed().as_secs_f64().max(0.001);
            last = Instant::now();
            if limits.is_empty() {
                continue;
            }
            let demand: BTreeMap<&str, f64> = limits
                .iter()
                .map(|(name, l)| {
                    (
                        &**name,
                        l.demand.swap(0, Ordering::Relaxed) as f64 / elapsed,
                    )
                })
                .collect();
            let doc = serde_json::json!({ "demand": demand });
            let path = format!("/v1/groups/{}/proxies/{}/status", src.group, src.node);
            let Ok(req) = crate::reload::request(
                &src,
                http::Method::POST,
                &path,
                Bytes::from(doc.to_string()),
            ) else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(2), src.client.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => {}
                Ok(Ok(r)) => tracing::debug!(status = %r.status(), "demand report refused"),
                Ok(Err(e)) => tracing::debug!(error = %e, "demand report failed"),
                Err(_) => tracing::debug!("demand report timed out"),
            }
        }
    })
}

#[derive(serde::Deserialize)]
struct Shares {
    shares: BTreeMap<String, f64>,
}

/// Takes a `{"shares": ...}` line from the watch stream; false when the line is not one.
pub fn handle_line(proxy: &Proxy, line: &str) -> bool {
    if !line.starts_with("{\"shares\"") {
        return false;
    }
    let Ok(s) = serde_json::from_str::<Shares>(line) else {
        tracing::warn!("unreadable shares line from the control plane");
        return true;
    };
    for (name, l) in proxy.shared.registry.rate_limits.groups() {
        if let Some(share) = s.shares.get(&*name) {
            if share.is_finite() && *share > 0.0 {
                l.set_share(*share);
                tracing::debug!(limit = &*name, share, "group limit share");
            }
        }
    }
    true
}
