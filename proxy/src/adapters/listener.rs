//! Downstream listeners: accept loops for `http` and `tcp` listeners, with the limits that
//! protect the proxy from bad clients, and draining on shutdown.
//!
//! A listener task has two signals. `stop` ends its accept loop (the listener was removed,
//! or moved to another address: a new task serves the new socket) while its established
//! connections carry on. `drain` asks those connections to finish: HTTP connections
//! complete their in-flight requests and close; after the drain timeout the rest are
//! dropped. Every connection task holds a clone of the task's completion sender, so the
//! task knows when the last one is gone.

use crate::adapters::idle::{Activity, Guarded, HeadClock, IdleIo};
use crate::http::{handle, ConnCtx};
use crate::metrics::ListenerLabels;
use crate::snapshot::ListenerRt;
use crate::Shared;
use hyper::service::service_fn;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// A bound listener, before its accept loops run.
pub struct Bound {
    pub name: Arc<str>,
    pub socket: Socket,
    pub addr: SocketAddr,
    /// Duplicates of its distinct sockets, kept while it accepts so that they can be
    /// handed to a new process in an upgrade (see [`crate::upgrade`]).
    pub handover: Vec<OwnedFd>,
}

pub enum Socket {
    /// One socket per worker (with `SO_REUSEPORT` when there are several), each accepted
    /// from on its own worker; not yet registered with any runtime.
    Tcp(Vec<std::net::TcpListener>),
    /// `http3` listeners: a QUIC endpoint on a UDP socket.
    Quic(quinn::Endpoint),
}

/// Binds a listener: for TCP, one socket per worker on the same address (the first one
/// picks the port when the config says 0). Sockets inherited in an upgrade for its address
/// are used instead: all of them (another process may have run more workers), and when
/// there are fewer than workers, some workers accept on the same socket.
pub async fn bind(
    lst: &ListenerRt,
    workers: usize,
    inherited: &crate::upgrade::Inherited,
) -> std::io::Result<Bound> {
    if lst.protocol == spur_config::ListenerProtocol::Http3 {
        let socket = match inherited.udp(&lst.name, lst.listen)? {
            Some(s) => s,
            None => std::net::UdpSocket::bind(lst.listen)?,
        };
        let handover = vec![OwnedFd::from(socket.try_clone()?)];
        let endpoint = crate::quic::server::bind(lst, socket)?;
        let addr = endpoint.local_addr()?;
        return Ok(Bound {
            name: lst.name.clone(),
            socket: Socket::Quic(endpoint),
            addr,
            handover,
        });
    }
    let mut sockets = match inherited.tcp(&lst.name, lst.listen)? {
        Some(sockets) => sockets,
        None => {
            let first = tcp_socket(lst.listen, workers > 1)?;
            let addr = first.local_addr()?;
            let mut sockets = vec![first];
            for _ in 1..workers {
                sockets.push(tcp_socket(addr, true)?);
            }
            sockets
        }
    };
    let addr = sockets[0].local_addr()?;
    let handover = sockets
        .iter()
        .map(|s| s.try_clone().map(OwnedFd::from))
        .collect::<std::io::Result<Vec<_>>>()?;
    for i in sockets.len()..workers {
        let shared = sockets[i % handover.len()].try_clone()?;
        sockets.push(shared);
    }
    for s in &sockets {
        s.set_nonblocking(true)?;
    }
    Ok(Bound {
        name: lst.name.clone(),
        socket: Socket::Tcp(sockets),
        addr,
        handover,
    })
}

/// A listening, non-blocking TCP socket on `addr`.
fn tcp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket as Raw, Type};
    let socket = Raw::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Where an accepted connection was going before an iptables `REDIRECT` (transparent mode,
/// `original_dst: true`): `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6. When
/// the call fails (the connection was not redirected, or conntrack is not loaded), its
/// original destination is the address it reached: the socket's local address.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    redirected_dst(stream).or_else(|| stream.local_addr().ok())
}

#[cfg(target_os = "linux")]
fn redirected_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;
    // From <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>; both 80.
    const SO_ORIGINAL_DST: libc::c_int = 80;
    const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = stream.as_raw_fd();
    // An IPv4 connection on a dual-stack `[::]` socket has an IPv4-mapped address: its
    // conntrack entry, and so its original destination, is IPv4's.
    let v6 = match stream.local_addr().ok()? {
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_none(),
        SocketAddr::V4(_) => false,
    };
    // SAFETY: a zeroed sockaddr_storage is valid, the length passed is its size, and the fd
    // is a live socket borrowed from `stream` for the duration of the call.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let (level, name) = if v6 {
            (libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)
        } else {
            (libc::SOL_IP, SO_ORIGINAL_DST)
        };
        let rc = libc::getsockopt(
            fd,
            level,
            name,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        );
        if rc != 0 {
            return None;
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn redirected_dst(_stream: &TcpStream) -> Option<SocketAddr> {
    None
}

/// Decrements the active-connection count and gauge when a connection ends.
pub struct ConnGuard {
    active: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    _drain: mpsc::Sender<()>,
}

impl ConnGuard {
    pub fn new(
        active: Arc<AtomicUsize>,
        gauge: prometheus_client::metrics::gauge::Gauge,
        drain: mpsc::Sender<()>,
    ) -> ConnGuard {
        active.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        ConnGuard {
            active,
            gauge,
            _drain: drain,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// Runs a listener's accept loops (one per worker, each on its worker) until `stop` turns
/// true; then waits for its connections to end, or, once `drain` turns true, for at most
/// the drain timeout.
pub async fn serve(
    shared: Arc<Shared>,
    bound: Bound,
    stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
) {
    let sockets = match bound.socket {
        Socket::Tcp(sockets) => sockets,
        Socket::Quic(endpoint) => {
            return crate::quic::server::serve(shared, bound.name, endpoint, stop, drain).await
        }
    };
    let (drain_tx, drain_rx) = mpsc::channel::<()>(1);
    let counts = Counts {
        active: Arc::new(AtomicUsize::new(0)),
        gauge: shared
            .metrics
            .connections_active
            .get_or_create(&ListenerLabels {
                listener: bound.name.clone(),
            })
            .clone(),
        drain: drain_tx,
    };
    let active = counts.active.clone();
    let loops: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let run = accept_loop(
                shared.clone(),
                bound.name.clone(),
                socket,
                stop.clone(),
                drain.clone(),
                counts.clone(),
            );
            shared.workers.handle(i).spawn(run)
        })
        .collect();
    drop(counts);
    for l in loops {
        let _ = l.await;
    }
    wait_connections(&shared, &bound.name, &active, drain_rx, drain).await;
}

/// What a listener's accept loops share: the open-connection count (for
/// `max_connections`), its gauge, and the sender each connection holds until it ends.
#[derive(Clone)]
struct Counts {
    active: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    drain: mpsc::Sender<()>,
}

/// One worker's accept loop on its own socket; its connections are served on that worker.
async fn accept_loop(
    shared: Arc<Shared>,
    name: Arc<str>,
    socket: std::net::TcpListener,
    mut stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
    counts: Counts,
) {
    let tcp = match TcpListener::from_std(socket) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(listener = &*name, error = %e, "cannot register the listening socket");
            return;
        }
    };
    let Counts {
        active,
        gauge,
        drain: drain_tx,
    } = counts;
    loop {
        let accepted = tokio::select! {
            r = tcp.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(listener = &*name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let snap = shared.snapshot.load();
        let Some(lst) = snap.listeners.get(&*name).cloned() else {
            continue;
        };
        if active.load(Ordering::Relaxed) >= lst.limits.max_connections as usize {
            shared.metrics.reject(&lst.name, "max_connections");
            drop(stream);
            continue;
        }
        let guard = ConnGuard::new(active.clone(), gauge.clone(), drain_tx.clone());
        let _ = stream.set_nodelay(true);
        let orig = if lst.original_dst {
            original_dst(&stream)
        } else {
            None
        };
        let shared = shared.clone();
        let shutdown = drain.clone();
        match lst.protocol {
            spur_config::ListenerProtocol::Tcp => {
                tokio::spawn(crate::adapters::tcp::serve_conn(
                    shared, lst, stream, peer, orig, shutdown, guard,
                ));
            }
            // Transparent HTTP listeners without TLS: protocol detection first.
            spur_config::ListenerProtocol::Http if lst.original_dst && lst.tls.is_none() => {
                tokio::spawn(crate::adapters::detect::serve(
                    shared, lst, stream, peer, orig, shutdown, guard,
                ));
            }
            _ => {
                tokio::spawn(serve_http_conn(
                    shared, lst, stream, peer, orig, shutdown, guard,
                ));
            }
        }
    }
}

/// After a listener's accept loop ends: waits for its connections to end on their own, or,
/// once `drain` turns true, for at most the drain timeout. The connections' guards hold the
/// senders of `drain_rx`.
pub(crate) async fn wait_connections(
    shared: &Shared,
    name: &str,
    active: &AtomicUsize,
    mut drain_rx: mpsc::Receiver<()>,
    mut drain: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = drain_rx.recv() => return, // every connection has ended on its own
        _ = drain.wait_for(|d| *d) => {}
    }
    let timeout = shared.snapshot.load().drain_timeout;
    if tokio::time::timeout(timeout, drain_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            open = active.load(Ordering::Relaxed),
            "drain timeout: closing connections still open"
        );
    }
}

pub(crate) async fn serve_http_conn(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    stream: TcpStream,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
    guard: ConnGuard,
) {
    // header_timeout runs from accept: the TLS handshake (bounded by it on its own too) and
    // the first request head share it.
    let head = HeadClock::start();
    let Some(down) = crate::adapters::tls::accept(&shared, &lst, stream, peer).await else {
        return;
    };
    let peer_identity = down.peer_identity();
    let h2_by_alpn = down.stream.alpn() == Some(b"h2");
    let activity = Activity::new();
    let io = IdleIo::with_head(down.stream, activity.clone(), head.clone());
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        listener: lst.name.clone(),
        peer,
        forwarded: Default::default(),
        original_dst,
        guard: Arc::new(guard),
        activity: activity.clone(),
        idle_timeout: lst.limits.idle_timeout.get(),
        drain: shutdown.clone(),
        peer_identity,
        tls: down.session,
    });
    let clock = head.clone();
    let own_ctx = ctx.clone();
    let own = |req| crate::http::handle_any(&own_ctx, req);
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let request = clock.head_done(req.version());
        let ctx = ctx.clone();
        // Boxed, and the request path's future built inside the box when first polled:
        // hyper moves a service future into its HTTP/1.1 dispatcher (HTTP/2 and bodiless
        // HTTP/1.1 requests go to Spur's own servers, which call the request path
        // directly), and the request path's is about 2 KiB; a box is one allocation where
        // those moves were copies of it.
        Box::pin(async move {
            let resp = handle(ctx, req).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Guarded::new(body, request)))
        })
    });
    let limits = crate::adapters::http_conn::Limits {
        shared: &shared,
        lst: &lst,
        peer,
        head,
        activity,
        shutdown,
    };
    crate::adapters::http_conn::serve(io, h2_by_alpn, svc, own, limits).await;
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn without_a_redirect_the_original_destination_is_the_local_address() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        assert_eq!(super::original_dst(&server), Some(addr));
    }

    #[tokio::test]
    // The redirected case (IPv4 conntrack for an IPv4-mapped connection) needs iptables:
    // tests/netns.rs covers it; here, only the unredirected fallback on such a socket.
    async fn without_a_redirect_a_dual_stack_socket_reports_its_local_address() {
        let Ok(l) = tokio::net::TcpListener::bind("[::]:0").await else {
            // No IPv6 here. Where transparent mode must be tested (SPUR_REQUIRE_NETNS=1, as
            // in CI) that is a failure, not a skip.
            assert!(
                std::env::var("SPUR_REQUIRE_NETNS").map_or(true, |v| v != "1"),
                "SPUR_REQUIRE_NETNS=1, but [::] cannot be bound"
            );
            eprintln!("skipped: no IPv6");
            return;
        };
        let port = l.local_addr().unwrap().port();
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        // Not redirected: the local address, as the mapped IPv4 address it is.
        let dst = super::original_dst(&server).unwrap();
        assert_eq!(dst.port(), port);
        match dst {
            std::net::SocketAddr::V6(a) => {
                assert_eq!(a.ip().to_ipv4_mapped(), Some(std::net::Ipv4Addr::LOCALHOST))
            }
            v4 => assert_eq!(v4.ip(), std::net::Ipv4Addr::LOCALHOST),
        }
    }
}
