//! `tcp` listeners: opaque bytes both ways between the client and an endpoint of the
//! listener's cluster. Half-close is passed on: when one side finishes sending, the other
//! side's write half is shut down and the opposite direction keeps flowing.

use crate::access::{self, Val};
use crate::adapters::idle::{Activity, IdleIo};
use crate::adapters::listener::ConnGuard;
use crate::metrics::UpstreamLabels;
use crate::snapshot::ListenerRt;
use crate::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::watch;

pub(crate) async fn serve_conn(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    mut client: TcpStream,
    peer: SocketAddr,
    _shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let start = Instant::now();
    let Some(cluster) = lst.default_cluster.clone() else {
        return;
    };
    let members = cluster.members.load_full();
    let now = Instant::now();
    let picked = members
        .balancer
        .pick(&members.endpoints, None, now, None)
        .filter(|i| members.endpoints[*i].try_acquire(now));
    let Some(idx) = picked else {
        tracing::warn!(
            listener = &*lst.name,
            cluster = &*cluster.name,
            "no endpoint available"
        );
        return;
    };
    let endpoint = members.endpoints[idx].clone();
    let _in_flight = endpoint.start();
    let connect_timeout = cluster.connect_timeout;
    let upstream =
        match tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) | Err(_) => {
                endpoint.observe(start.elapsed(), true);
                count(&shared, &cluster.name, &endpoint.label, 0);
                log_conn(
                    &lst.name,
                    &cluster.name,
                    &endpoint.label,
                    peer,
                    (0, 0),
                    start,
                    "upstream_unreachable",
                );
                return;
            }
        };
    endpoint.observe(start.elapsed(), false);
    let _ = upstream.set_nodelay(true);
    let activity = Activity::new();
    let mut up = IdleIo::new(upstream, activity.clone());
    let idle = lst.limits.idle_timeout.get();
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => r.map_err(|e| e.to_string()),
        _ = activity.idle_for(idle) => Err("idle_timeout".to_string()),
    };
    count(&shared, &cluster.name, &endpoint.label, 200);
    let (bytes, error) = match &result {
        Ok((to_up, to_client)) => ((*to_up, *to_client), "-"),
        Err(e) => ((0, 0), e.as_str()),
    };
    log_conn(
        &lst.name,
        &cluster.name,
        &endpoint.label,
        peer,
        bytes,
        start,
        error,
    );
}

/// One access line per TCP connection: bytes are (received from the client, sent to it).
fn log_conn(
    listener: &str,
    cluster: &str,
    endpoint: &str,
    peer: SocketAddr,
    bytes: (u64, u64),
    start: Instant,
    error: &str,
) {
    if !access::enabled() {
        return;
    }
    let peer = peer.to_string();
    access::emit(
        "tcp",
        &[
            ("listener", Val::Str(listener)),
            ("cluster", Val::Str(cluster)),
            ("endpoint", Val::Str(endpoint)),
            ("peer", Val::Str(&peer)),
            ("bytes_received", Val::U64(bytes.0)),
            ("bytes_sent", Val::U64(bytes.1)),
            ("duration_ms", Val::F64(start.elapsed().as_secs_f64() * 1e3)),
            ("error", Val::Str(error)),
        ],
    );
}

fn count(shared: &Shared, cluster: &Arc<str>, endpoint: &Arc<str>, code: u16) {
    shared
        .metrics
        .upstream_requests
        .get_or_create(&UpstreamLabels {
            cluster: cluster.clone(),
            endpoint: endpoint.clone(),
            code,
        })
        .inc();
}
