//! `tcp` listeners: opaque bytes both ways between the client and an endpoint of the
//! listener's cluster. Half-close is passed on: when one side finishes sending, the other
//! side's write half is shut down and the opposite direction keeps flowing.
//!
//! Either side may be TLS: the listener's `tls` terminates it (identities outside
//! `allow_identities` are refused in the handshake, as a byte stream has no other way to
//! answer), the cluster's `tls` originates it (no ALPN: the bytes are opaque). Over TLS a
//! half-close is a `close_notify` followed by the TCP write shutdown.

use crate::access::{self, Val};
use crate::adapters::idle::{Activity, IdleIo};
use crate::adapters::listener::ConnGuard;
use crate::metrics::UpstreamLabels;
use crate::snapshot::{ClusterRt, ListenerRt};
use crate::tls::{HandshakeError, Role, Stream};
use crate::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::watch;

pub(crate) async fn serve_conn(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    client: TcpStream,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let start = Instant::now();
    // Transparent mode: the cluster that owns the original destination, else the listener's.
    // Never the original destination itself: an address no cluster owns is not an open
    // door (no open proxy).
    let owner = original_dst.and_then(|a| shared.snapshot.load().cluster_for_addr(a));
    let Some(cluster) = owner.or_else(|| lst.default_cluster.clone()) else {
        return;
    };
    let Some(down) = crate::adapters::tls::accept(&shared, &lst, client, peer).await else {
        return;
    };
    let identity = down.peer_identity();
    let mut client = down.stream;
    let conn = Conn {
        listener: &lst.name,
        cluster: &cluster.name,
        peer,
        peer_identity: identity.as_deref(),
        start,
    };
    let members = cluster.members.load_full();
    let now = Instant::now();
    let picked = members
        .balancer
        .pick(&members.endpoints, None, now, None)
        .and_then(|i| {
            members.endpoints[i]
                .try_acquire(now)
                .map(|probe| (i, probe))
        });
    let Some((idx, probe)) = picked else {
        tracing::warn!(
            listener = &*lst.name,
            cluster = &*cluster.name,
            "no endpoint available"
        );
        return;
    };
    let endpoint = members.endpoints[idx].clone();
    let _in_flight = endpoint.start(probe);
    let upstream = match connect(&shared, &cluster, endpoint.addr).await {
        Ok(s) => s,
        Err(error) => {
            endpoint.observe(start.elapsed(), true);
            count(&shared, &cluster.name, &endpoint.label, 0);
            conn.log(&endpoint.label, (0, 0), error);
            return;
        }
    };
    endpoint.observe(start.elapsed(), false);
    let activity = Activity::new();
    let mut up = IdleIo::new(upstream, activity.clone());
    let idle = lst.limits.idle_timeout.get();
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => r.map_err(|e| e.to_string()),
        _ = activity.idle_for(idle) => Err("idle_timeout".to_string()),
        _ = crate::adapters::idle::drained(shutdown, shared.snapshot.load().drain_timeout) => Err("drain_timeout".to_string()),
    };
    count(&shared, &cluster.name, &endpoint.label, 200);
    let (bytes, error) = match &result {
        Ok((to_up, to_client)) => ((*to_up, *to_client), "-"),
        Err(e) => ((0, 0), e.as_str()),
    };
    conn.log(&endpoint.label, bytes, error);
}

/// TCP to the endpoint, then TLS when the cluster has it, each within `connect_timeout`.
/// A failure answers the access log's error field.
async fn connect(
    shared: &Shared,
    cluster: &ClusterRt,
    addr: SocketAddr,
) -> Result<Stream, &'static str> {
    let timeout = cluster.connect_timeout;
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => return Err("upstream_unreachable"),
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &cluster.tls else {
        return Ok(Stream::Plain(tcp));
    };
    let handshake = match tokio::time::timeout(timeout, tls.connect(tcp, addr.ip(), true)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout),
    };
    handshake.map_err(|e| {
        let reason = e.reason(Role::Client);
        tracing::debug!(cluster = &*cluster.name, %addr, reason, error = %e, "upstream TLS handshake failed");
        shared.metrics.upstream_tls_error(&cluster.name, reason);
        "upstream_tls"
    })
}

/// What the access line of a TCP connection says besides the endpoint and the outcome.
struct Conn<'a> {
    listener: &'a str,
    cluster: &'a str,
    peer: SocketAddr,
    peer_identity: Option<&'a str>,
    start: Instant,
}

impl Conn<'_> {
    /// One access line per TCP connection: bytes are (received from the client, sent to it).
    fn log(&self, endpoint: &str, bytes: (u64, u64), error: &str) {
        if !access::enabled() {
            return;
        }
        let peer = self.peer.to_string();
        access::emit(
            "tcp",
            &[
                ("listener", Val::Str(self.listener)),
                ("cluster", Val::Str(self.cluster)),
                ("endpoint", Val::Str(endpoint)),
                ("peer", Val::Str(&peer)),
                ("peer_identity", Val::Str(self.peer_identity.unwrap_or("-"))),
                ("bytes_received", Val::U64(bytes.0)),
                ("bytes_sent", Val::U64(bytes.1)),
                (
                    "duration_ms",
                    Val::F64(self.start.elapsed().as_secs_f64() * 1e3),
                ),
                ("error", Val::Str(error)),
            ],
        );
    }
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
