//! `http3` listeners: a QUIC endpoint on a UDP socket; each connection's request streams
//! become requests on the common request path ([`crate::http::handle_any`]).
//!
//! Like TCP listeners: `max_connections` (refused over it), `header_timeout` (from the first
//! packet until the first request, and for each request's headers), `idle_timeout`
//! (QUIC's idle timeout),
//! `max_header_bytes` (431 from the request path; h3 refuses heads far larger), draining
//! (GOAWAY, in-flight requests finish, then the drain timeout), the authorization policy
//! (`authz` and `allow_identities`: 403 per request, through the same plan) and the
//! verified peer identity in the access log and upstream. h3 gets the QUIC connection
//! through [`super::uni_streams`], which checks the client's QPACK encoder stream first.

use super::uni_streams::GatedConnection;
use crate::adapters::idle::Activity;
use crate::adapters::listener::ConnGuard;
use crate::body::{H3Recv, H3Send, InBody};
use crate::http::{handle_any, ConnCtx, TlsSession};
use crate::metrics::{ListenerLabels, ReasonLabel, Side};
use crate::snapshot::ListenerRt;
use crate::tls::{Role, ServerTls};
use crate::Shared;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use rustls::pki_types::CertificateDer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

type H3Conn = h3::server::Connection<GatedConnection, Bytes>;
type Resolver = h3::server::RequestResolver<GatedConnection, Bytes>;

/// How long a draining connection stays open once quiet, unless the client closes it first.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Makes the listener's QUIC endpoint on its UDP socket (bound, or inherited in an upgrade).
pub fn bind(lst: &ListenerRt, socket: std::net::UdpSocket) -> std::io::Result<quinn::Endpoint> {
    let tls = lst.tls.as_ref().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an http3 listener needs tls",
        )
    })?;
    let config = server_config(lst, &tls.current())?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

fn server_config(
    lst: &ListenerRt,
    tls: &Arc<rustls::ServerConfig>,
) -> std::io::Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the listener's TLS settings cannot carry QUIC: {e}"),
        )
    })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(super::transport(lst.limits.idle_timeout.get(), None));
    Ok(config)
}

/// The quinn config built from a rustls config (rebuilt when the files rotate, or when a
/// config push changes the listener's TLS).
struct ConfigCache {
    source: Arc<rustls::ServerConfig>,
    idle: std::time::Duration,
    config: Arc<quinn::ServerConfig>,
}

impl ConfigCache {
    fn get(
        cache: &mut Option<ConfigCache>,
        lst: &ListenerRt,
        tls: &ServerTls,
    ) -> std::io::Result<Arc<quinn::ServerConfig>> {
        let current = tls.current();
        let idle = lst.limits.idle_timeout.get();
        if let Some(c) = cache.as_ref() {
            if Arc::ptr_eq(&c.source, &current) && c.idle == idle {
                return Ok(c.config.clone());
            }
        }
        let config = Arc::new(server_config(lst, &current)?);
        *cache = Some(ConfigCache {
            source: current,
            idle,
            config: config.clone(),
        });
        Ok(config)
    }
}

/// The accept loop of an `http3` listener, then the wait for its connections (see
/// [`crate::adapters::listener`] for `stop` and `drain`).
pub async fn serve(
    shared: Arc<Shared>,
    name: Arc<str>,
    endpoint: quinn::Endpoint,
    mut stop: watch::Receiver<bool>,
    drain: watch::Receiver<bool>,
) {
    let (drain_tx, drain_rx) = mpsc::channel::<()>(1);
    let active = Arc::new(AtomicUsize::new(0));
    let gauge = shared
        .metrics
        .connections_active
        .get_or_create(&ListenerLabels {
            listener: name.clone(),
        })
        .clone();
    let mut cache = None;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(incoming) = incoming else { break };
        // RFC 9000 §8.1: before a client's address is validated, a server may send at most
        // three times the bytes it received; quinn's first flight to a lone Initial went
        // past that (3.19× measured). So an unvalidated address first gets a Retry, a
        // packet smaller than the Initial, and proves itself by echoing its token: one
        // extra round trip, once per client (later connections present the token quinn
        // hands out).
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let snap = shared.snapshot.load();
        let Some(lst) = snap.listeners.get(&*name).cloned() else {
            incoming.refuse();
            continue;
        };
        if active.load(Ordering::Relaxed) >= lst.limits.max_connections as usize {
            shared.metrics.reject(&lst.name, "max_connections");
            incoming.refuse();
            continue;
        }
        let Some(tls) = lst.tls.clone() else {
            incoming.refuse();
            continue;
        };
        let config = match ConfigCache::get(&mut cache, &lst, &tls) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(listener = &*name, error = %e, "QUIC connection refused");
                incoming.refuse();
                continue;
            }
        };
        let connecting = match incoming.accept_with(config) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(listener = &*name, error = %e, "QUIC connection failed");
                continue;
            }
        };
        let guard = ConnGuard::new(active.clone(), gauge.clone(), drain_tx.clone());
        tokio::spawn(serve_conn(
            shared.clone(),
            lst,
            tls,
            connecting,
            guard,
            drain.clone(),
        ));
    }
    // No new connections; established ones carry on (the endpoint's driver runs on its own).
    endpoint.set_server_config(None);
    drop(drain_tx);
    crate::adapters::listener::wait_connections(&shared, &name, &active, drain_rx, drain).await;
    endpoint.close(0u32.into(), b"listener closed");
    // Closed connections linger a few round trips (QUIC's draining state); the socket is
    // released once they are gone.
    let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
}

/// Decrements a gauge when dropped.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_conn(
    shared: Arc<Shared>,
    lst: Arc<ListenerRt>,
    tls: Arc<ServerTls>,
    connecting: quinn::Connecting,
    guard: ConnGuard,
    mut drain: watch::Receiver<bool>,
) {
    let peer = connecting.remote_address();
    let side = Side::Listener(lst.name.clone());
    let header_timeout = lst.limits.header_timeout.get();
    // header_timeout from the first packet until the first request: the handshake, the
    // HTTP/3 setup and the wait for a request stream share it, as they share a TCP
    // listener's (a silent QUIC connection holds ~100 KB until it is closed).
    let first_request_by = tokio::time::Instant::now() + header_timeout;
    let Some(conn) = handshake(&shared, &lst, &side, connecting, first_request_by).await else {
        return;
    };
    let quic_gauge = shared
        .metrics
        .quic_connections_active
        .get_or_create(&side)
        .clone();
    quic_gauge.inc();
    let _quic_gauge = GaugeGuard(quic_gauge);
    let streams = shared.metrics.quic_streams.get_or_create(&side).clone();

    let ctx = conn_ctx(&shared, &lst, &tls, &conn, guard, drain.clone());
    let Some(mut h3) = h3_setup(&shared, &lst, &conn, first_request_by).await else {
        return;
    };
    let mut requests = JoinSet::new();
    let drain_timeout = || shared.snapshot.load().drain_timeout;
    let mut draining = false;
    let mut timed_out = false;
    // Once draining, the time the requests in flight have left.
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(10 * 365 * 86_400));
    tokio::pin!(deadline);
    let first_request = tokio::time::sleep_until(first_request_by);
    tokio::pin!(first_request);
    let mut had_request = false;
    loop {
        let mut goaway = false;
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    had_request = true;
                    streams.inc();
                    requests.spawn(serve_request(ctx.clone(), resolver, header_timeout));
                }
                // The client's GOAWAY, or after ours: every accepted request is done (h3
                // refuses later streams with H3_REQUEST_REJECTED, so they can be retried).
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(listener = &*lst.name, %peer, error = %e, "HTTP/3 connection ended");
                    }
                    break;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            _ = drain.wait_for(|d| *d), if !draining => {
                draining = true;
                goaway = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + drain_timeout());
            }
            _ = &mut deadline, if draining => {
                tracing::debug!(listener = &*lst.name, %peer, "drain timeout: HTTP/3 connection closed");
                timed_out = true;
                break;
            }
            // Draining and nothing in flight: the client has had its answers (and its
            // requests that crossed the GOAWAY have arrived) once it is quiet for a moment.
            // A QUIC close discards bytes not yet acknowledged, and h3 does not say when
            // they are; so close when the client does, or after this quiet moment.
            _ = tokio::time::sleep(CLOSE_LINGER), if draining && requests.is_empty() => break,
            _ = conn.closed() => break,
            _ = &mut first_request, if !had_request && !draining => {
                no_request(&shared, &lst, &conn);
                return;
            }
        }
        if goaway {
            // GOAWAY naming the next stream: the ones accepted so far will be answered.
            let _ = h3.shutdown(1).await;
        }
    }
    let wait = if timed_out {
        None
    } else {
        Some(drain_timeout())
    };
    close(requests, &conn, wait, draining).await;
}

/// Sets HTTP/3 up on an established QUIC connection by `by` (the first request's
/// deadline); `None` when it fails, or (counted as a header timeout) takes too long.
async fn h3_setup(
    shared: &Shared,
    lst: &ListenerRt,
    conn: &quinn::Connection,
    by: tokio::time::Instant,
) -> Option<H3Conn> {
    // h3 refuses heads over this outright; the request path answers 431 for heads over
    // max_header_bytes, so leave it room to.
    let max_field = lst.limits.max_header_bytes.get().saturating_mul(2) + 16 * 1024;
    let mut builder = h3::server::builder();
    builder.max_field_section_size(max_field);
    let setup = builder.build(GatedConnection::new(conn.clone()));
    match tokio::time::timeout_at(by, setup).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            let peer = conn.remote_address();
            tracing::debug!(listener = &*lst.name, %peer, error = %e, "HTTP/3 setup failed");
            None
        }
        Err(_) => {
            no_request(shared, lst, conn);
            None
        }
    }
}

/// Completes a QUIC connection's handshake by `by`; `None` (counted) when it fails or
/// takes too long.
async fn handshake(
    shared: &Shared,
    lst: &ListenerRt,
    side: &Side,
    connecting: quinn::Connecting,
    by: tokio::time::Instant,
) -> Option<quinn::Connection> {
    let handshake_failed = |reason: &'static str| {
        shared
            .metrics
            .quic_handshake_errors
            .get_or_create(&(side.clone(), ReasonLabel { reason }))
            .inc();
    };
    let peer = connecting.remote_address();
    match tokio::time::timeout_at(by, connecting).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            let reason = super::handshake_reason(&e, Role::Server);
            handshake_failed(reason);
            tracing::debug!(listener = &*lst.name, %peer, reason, error = %e, "QUIC handshake failed");
            None
        }
        Err(_) => {
            handshake_failed("timeout");
            None
        }
    }
}

/// What every request of an established QUIC connection shares: its peer and proven
/// identity, its guard (counted in the listener's connections) and the drain signal.
fn conn_ctx(
    shared: &Arc<Shared>,
    lst: &ListenerRt,
    tls: &ServerTls,
    conn: &quinn::Connection,
    guard: ConnGuard,
    drain: watch::Receiver<bool>,
) -> Arc<ConnCtx> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
    let identity = tls.peer_identity(chain.as_deref().map(Vec::as_slice));
    let identity_header = identity
        .as_ref()
        .and_then(|id| HeaderValue::from_str(id.as_str()).ok());
    Arc::new(ConnCtx {
        shared: shared.clone(),
        listener: lst.name.clone(),
        peer: conn.remote_address(),
        forwarded: Default::default(),
        original_dst: None,
        guard: Arc::new(guard),
        activity: Activity::new(),
        idle_timeout: lst.limits.idle_timeout.get(),
        drain,
        peer_identity: identity.map(|i| i.as_arc().clone()),
        tls: Some(TlsSession { identity_header }),
    })
}

/// Ends a connection whose request loop is over: requests still running (the client left,
/// or the drain timeout passed) get `wait` at most (none when the drain timeout already
/// passed); then they are cancelled, which drops their upstream requests too.
async fn close(
    mut requests: JoinSet<()>,
    conn: &quinn::Connection,
    wait: Option<std::time::Duration>,
    draining: bool,
) {
    let finished = match wait {
        Some(wait) => tokio::time::timeout(wait, async {
            while requests.join_next().await.is_some() {}
        })
        .await
        .is_ok(),
        None => false,
    };
    if !finished {
        requests.abort_all();
    }
    if conn.close_reason().is_none() {
        if !draining {
            // The client's GOAWAY: it closes once it has its answers.
            let _ = tokio::time::timeout(CLOSE_LINGER, conn.closed()).await;
        }
        conn.close(0u32.into(), b"");
    }
}

/// Closes a connection that sent no request within `header_timeout`, counted as a header
/// timeout.
fn no_request(shared: &Shared, lst: &ListenerRt, conn: &quinn::Connection) {
    shared.metrics.reject(&lst.name, "header_timeout");
    tracing::debug!(listener = &*lst.name, peer = %conn.remote_address(), "no request within header_timeout: QUIC connection closed");
    let no_error = quinn::VarInt::from_u64(h3::error::Code::H3_NO_ERROR.value())
        .unwrap_or(quinn::VarInt::from_u32(0));
    conn.close(no_error, b"no request");
}

async fn serve_request(ctx: Arc<ConnCtx>, resolver: Resolver, header_timeout: std::time::Duration) {
    let (req, stream) = match tokio::time::timeout(header_timeout, resolver.resolve_request()).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(listener = &*ctx.listener, error = %e, "HTTP/3 request refused");
            return;
        }
        Err(_) => {
            ctx.shared.metrics.reject(&ctx.listener, "header_timeout");
            return;
        }
    };
    let (mut tx, rx) = stream.split();
    let (parts, ()) = req.into_parts();
    let body = InBody::H3(Box::new(H3Recv::server(rx, &parts.headers)));
    let resp = handle_any(&ctx, Request::from_parts(parts, body)).await;
    let (parts, body) = resp.into_parts();
    if let Err(e) = tx.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(listener = &*ctx.listener, error = %e, "HTTP/3 response not sent");
        return;
    }
    H3Send::Server(tx)
        .send_body(
            body,
            h3::error::Code::H3_INTERNAL_ERROR,
            std::future::pending(),
        )
        .await;
}
