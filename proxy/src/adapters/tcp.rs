//! `tcp` listeners: opaque bytes both ways between the client and an endpoint of the
//! listener's cluster. Half-close is passed on: when one side finishes sending, the other
//! side's write half is shut down and the opposite direction keeps flowing; between plain
//! TCP sockets the kernel moves a stream's bytes (`splice`, see [`crate::adapters::relay`]).
//!
//! A connection is one [`Attempt`], as an HTTP try is: it takes one of the cluster's
//! `max_requests` slots (concurrent connections; over it the connection is closed at once,
//! counted `overloaded`), the balancer picks the endpoint, and the connect outcome feeds the
//! endpoint's breaker (consecutive refused connects eject it) and latency estimate.
//! Connections are counted in `spur_tcp_connections_total{result}` and their bytes in
//! `spur_tcp_bytes_total{direction}`, apart from HTTP requests.
//!
//! Either side may be TLS: the listener's `tls` terminates it (identities outside
//! `allow_identities` are refused in the handshake, as a byte stream has no other way to
//! answer), the cluster's `tls` originates it (no ALPN: the bytes are opaque). Over TLS a
//! half-close is a `close_notify` followed by the TCP write shutdown.
//!
//! The listener's `authz` policy decides once per connection, at accept, from the peer's
//! verified identity and address (rules with `to` never match a connection): a denied
//! connection is closed before an endpoint is chosen, counted in
//! `spur_authz_decisions_total` and `spur_downstream_rejected_total{reason="forbidden"}`,
//! and logged with its `authz_rule`.

use crate::access::{self, Val};
use crate::adapters::listener::ConnGuard;
use crate::adapters::relay::relay;
use crate::attempt::{self, Attempt, Tried};
use crate::metrics::{TcpBytesLabels, TcpLabels};
use crate::policy::authz::Subject;
use crate::reason::Reason;
use crate::snapshot::{ClusterRt, ListenerRt};
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
    // Transparent mode: the cluster that owns the original destination, else the listener's.
    // Never the original destination itself: an address no cluster owns is not an open
    // door (no open proxy).
    let owner = original_dst.and_then(|a| shared.snapshot.load().cluster_for_addr(a));
    let Some(cluster) = owner.or_else(|| lst.default_cluster.clone()) else {
        return;
    };
    serve_to(shared, lst, client, peer, cluster, shutdown, _guard).await
}

/// [`serve_conn`] once the cluster is chosen (by the original destination, the listener's
/// cluster, or protocol detection's SNI look-up).
pub(crate) async fn serve_to(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    client: TcpStream,
    peer: SocketAddr,
    cluster: Arc<ClusterRt>,
    shutdown: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let start = crate::clock::now();
    let Some(down) = crate::adapters::tls::accept(&shared, &lst, client, peer).await else {
        return;
    };
    let identity = down.peer_identity();
    let authorized = lst.authz.as_ref().map(|a| {
        let who = Subject {
            identity: identity.as_deref(),
            addr: peer.ip(),
        };
        a.authorize(who, None)
    });
    let conn = Conn {
        shared: &shared,
        listener: &lst.name,
        cluster: &cluster,
        peer,
        peer_identity: identity.as_deref(),
        authz_rule: authorized.as_ref().map(|a| &*a.rule),
        start,
    };
    if authorized.as_ref().is_some_and(|a| !a.allowed) {
        return conn.forbidden();
    }
    let deadline = Some(start + cluster.connect_timeout);
    let _slot = match attempt::admit(&cluster, deadline, &shared.metrics).await {
        Ok(slot) => slot,
        Err(reason) => return conn.refused(reason),
    };
    let Some(attempt) = Attempt::pick(&cluster, &Tried::default(), None, crate::clock::now())
    else {
        return conn.refused(Reason::NoHealthyEndpoint);
    };
    let endpoint = attempt.endpoint().clone();
    let upstream = match cluster.opaque.connect(endpoint.addr, true).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(reason) = e.tls_reason {
                shared.metrics.upstream_tls_error(&cluster.name, reason);
            }
            tracing::debug!(cluster = &*cluster.name, endpoint = &*endpoint.label, error = %e, "tcp connect failed");
            attempt.record_tcp(false, &lst.name, &shared.metrics);
            let error = if e.tls_reason.is_some() {
                "upstream_tls"
            } else {
                Reason::UpstreamUnreachable.as_str()
            };
            return conn.log(&endpoint.label, (0, 0), error);
        }
    };
    attempt.record_tcp(true, &lst.name, &shared.metrics);
    let idle = lst.limits.idle_timeout.get();
    let drain_timeout = shared.snapshot.load().drain_timeout;
    let drained = crate::adapters::idle::drained(shutdown, drain_timeout);
    let (result, bytes) = relay(down.stream, upstream, idle, drained).await;
    drop(attempt);
    let error = match &result {
        Ok(_) => "-",
        Err(e) => e.as_str(),
    };
    conn.count_bytes(bytes);
    conn.log(&endpoint.label, bytes, error);
}

/// One connection of a `tcp` listener, for its metrics and its access line.
struct Conn<'a> {
    shared: &'a Shared,
    listener: &'a Arc<str>,
    cluster: &'a ClusterRt,
    peer: SocketAddr,
    peer_identity: Option<&'a str>,
    /// The authorization rule that decided, when the listener has a policy.
    authz_rule: Option<&'a str>,
    start: Instant,
}

impl Conn<'_> {
    /// Closes a connection the listener's policy denies (dropping the stream closes it).
    fn forbidden(&self) {
        tracing::debug!(
            listener = &**self.listener,
            peer = %self.peer,
            rule = self.authz_rule.unwrap_or("-"),
            "tcp connection denied by the authorization policy"
        );
        self.shared
            .metrics
            .reject(self.listener, Reason::Forbidden.as_str());
        self.log("-", (0, 0), Reason::Forbidden.as_str());
    }

    /// Closes a connection no endpoint took: counted, and logged.
    fn refused(&self, reason: Reason) {
        let result = match reason {
            Reason::Overloaded => "overloaded",
            _ => "no_healthy_endpoint",
        };
        tracing::debug!(
            listener = &**self.listener,
            cluster = &*self.cluster.name,
            result,
            "tcp connection refused"
        );
        self.shared
            .metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                listener: self.listener.clone(),
                cluster: self.cluster.name.clone(),
                endpoint: self.shared.dash.clone(),
                result,
            })
            .inc();
        self.log("-", (0, 0), reason.as_str());
    }

    /// Bytes are (received from the client, sent to it).
    fn count_bytes(&self, (up, down): (u64, u64)) {
        for (direction, n) in [("upstream", up), ("downstream", down)] {
            self.shared
                .metrics
                .tcp_bytes
                .get_or_create(&TcpBytesLabels {
                    listener: self.listener.clone(),
                    cluster: self.cluster.name.clone(),
                    direction,
                })
                .inc_by(n);
        }
    }

    /// One access line per TCP connection: bytes are (received from the client, sent to it).
    fn log(&self, endpoint: &str, bytes: (u64, u64), error: &str) {
        if !access::enabled() {
            return;
        }
        let peer = self.peer.to_string();
        let elapsed = crate::clock::now().saturating_duration_since(self.start);
        access::emit(
            "tcp",
            &[
                ("listener", Val::Str(self.listener)),
                ("cluster", Val::Str(&self.cluster.name)),
                ("endpoint", Val::Str(endpoint)),
                ("peer", Val::Str(&peer)),
                ("peer_identity", Val::Str(self.peer_identity.unwrap_or("-"))),
                ("authz_rule", Val::Str(self.authz_rule.unwrap_or("-"))),
                ("bytes_received", Val::U64(bytes.0)),
                ("bytes_sent", Val::U64(bytes.1)),
                ("duration_ms", Val::Millis(elapsed)),
                ("error", Val::Str(error)),
            ],
        );
    }
}
