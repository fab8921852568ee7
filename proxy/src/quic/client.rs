//! Upstream HTTP/3: one QUIC connection per endpoint, shared by all requests to it (each
//! request is a stream), opened on first use and again after it closes.
//!
//! A connection failure (no handshake within `connect_timeout`, refused, a TLS failure) is
//! a connect failure for the breaker and the retry policy, exactly like a TCP one. With
//! `fallback`, a QUIC connection that cannot be made for a reason other than TLS
//! verification (UDP blocked, nothing listening, timeout) sends the request over the
//! cluster's TCP+TLS connections instead (the endpoint's pool), and that endpoint stays on
//! TCP for the cluster's `fallback_period` (default [`FALLBACK_PERIOD`]; the environment
//! variable `SPUR_QUIC_FALLBACK_PERIOD` overrides it for every cluster); then one QUIC
//! handshake is tried in the background (requests stay on TCP meanwhile) and QUIC takes
//! over again if it succeeds. Each turn to TCP is counted in
//! `spur_quic_fallback_total{cluster}`.
//!
//! Requests waiting while a connection is being made share its outcome: a handshake that
//! fails fails them all at once, rather than each trying its own in turn.

use crate::body::{H3Recv, H3Send, InBody};
use crate::endpoint::EndpointState;
use crate::metrics::{ClusterLabels, ReasonLabel, Side};
use crate::tls::{ClientTlsRt, Role};
use crate::upstream::{HttpConnector, ReqBody, UpstreamError};
use bytes::Bytes;
use http::{header, Request, Response, Version};
use http_body::Body;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an endpoint whose QUIC connection failed stays on the TCP fallback when the
/// cluster's `fallback_period` does not say.
pub const FALLBACK_PERIOD: Duration = Duration::from_secs(30);

/// The cluster's `fallback_period`, unless the environment variable
/// `SPUR_QUIC_FALLBACK_PERIOD` (e.g. `5s`) overrides it.
fn fallback_period(configured: Duration) -> Duration {
    match std::env::var("SPUR_QUIC_FALLBACK_PERIOD") {
        Ok(v) => match v.parse::<spur_config::Duration>() {
            Ok(d) if !d.get().is_zero() => d.get(),
            _ => {
                tracing::warn!(
                    value = v.as_str(),
                    "SPUR_QUIC_FALLBACK_PERIOD is not a duration like 30s: using the cluster's fallback_period"
                );
                configured
            }
        },
        Err(_) => configured,
    }
}
/// Keep-alives hold pooled connections open through idle periods.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

#[derive(Clone)]
struct Conn {
    send: SendRequest,
    quic: quinn::Connection,
}

pub struct H3Client {
    cluster: Arc<str>,
    tls: Arc<ClientTlsRt>,
    connect_timeout: Duration,
    /// Client endpoints (UDP sockets), one per address family, made on first use.
    sockets: Mutex<[Option<quinn::Endpoint>; 2]>,
    /// The rustls config a quinn config was last built from, and that quinn config.
    quic_config: Mutex<Option<(Arc<rustls::ClientConfig>, quinn::ClientConfig)>>,
    conns: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Slot>>>>,
    fallback: Option<Fallback>,
    metrics: QuicMetrics,
}

/// An endpoint's connection, and the last failed attempt to make one.
#[derive(Default)]
struct Slot {
    conn: Option<Conn>,
    /// When the last attempt failed, and why.
    failed: Option<(Instant, Arc<str>)>,
}

struct Fallback {
    connector: Arc<HttpConnector>,
    period: Duration,
    /// Endpoints on TCP: until when, and whether a QUIC probe is under way.
    until: Mutex<HashMap<SocketAddr, (Instant, bool)>>,
}

enum Route {
    Quic,
    Tcp,
    /// TCP, and this request's turn to start the background QUIC probe.
    TcpAndProbe,
}

struct QuicMetrics {
    active: Gauge,
    streams: Counter,
    fallback: Counter,
    errors: Family<crate::metrics::SideReasonLabels, Counter>,
}

/// Why no QUIC connection could be made.
struct ConnectFailure {
    error: crate::body::BoxError,
    /// Worth trying TCP: the network failed, not the peer's certificate.
    may_fall_back: bool,
    /// Another request turned this endpoint to TCP while this one waited for it.
    fell_back: bool,
}

impl H3Client {
    pub fn new(
        cluster: &str,
        tls: Arc<ClientTlsRt>,
        connect_timeout: Duration,
        fallback: Option<(Arc<HttpConnector>, Duration)>,
        metrics: &crate::metrics::Metrics,
    ) -> H3Client {
        let cluster: Arc<str> = cluster.into();
        let side = Side::Cluster(cluster.clone());
        H3Client {
            metrics: QuicMetrics {
                active: metrics.quic_connections_active.get_or_create(&side).clone(),
                streams: metrics.quic_streams.get_or_create(&side).clone(),
                fallback: metrics
                    .quic_fallback
                    .get_or_create(&ClusterLabels {
                        cluster: cluster.clone(),
                    })
                    .clone(),
                errors: metrics.quic_handshake_errors.clone(),
            },
            cluster,
            tls,
            connect_timeout,
            sockets: Mutex::new([None, None]),
            quic_config: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            fallback: fallback.map(|(connector, period)| Fallback {
                connector,
                period: fallback_period(period),
                until: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Forgets connections and fallbacks of addresses that are no longer endpoints.
    pub fn retain(&self, live: &dyn Fn(SocketAddr) -> bool) {
        self.conns.lock().unwrap().retain(|a, _| live(*a));
        if let Some(fb) = &self.fallback {
            fb.until.lock().unwrap().retain(|a, _| live(*a));
        }
    }

    pub async fn request(
        self: &Arc<Self>,
        endpoint: &EndpointState,
        mut req: Request<ReqBody>,
    ) -> Result<Response<InBody>, UpstreamError> {
        let addr = endpoint.addr;
        if let Some(fb) = &self.fallback {
            match fb.route(addr) {
                Route::Quic => {}
                Route::Tcp => return fb.send(endpoint, req).await,
                Route::TcpAndProbe => {
                    let this = self.clone();
                    tokio::spawn(async move { this.probe(addr).await });
                    return fb.send(endpoint, req).await;
                }
            }
        }
        // A pooled connection may have closed since its last use (the peer's idle timeout,
        // a restart, its GOAWAY); a request that could not open a stream on it gets one
        // fresh connection. Its body is untouched until a stream is open.
        let mut stale = None;
        loop {
            let conn = match self.connection(addr, stale, false).await {
                Ok(c) => c,
                Err(f) => {
                    if let (Some(fb), true) = (&self.fallback, f.fell_back) {
                        return fb.send(endpoint, req).await;
                    }
                    return Err(UpstreamError::connect(f.error));
                }
            };
            match self.send(&conn, req).await {
                Ok(resp) => return Ok(resp),
                Err(Unsent::Again(r)) if stale.is_none() => {
                    req = *r;
                    stale = Some(conn.quic.stable_id());
                }
                Err(Unsent::Again(_)) => {
                    return Err(UpstreamError::not_sent(
                        "the new QUIC connection closed before the request was sent",
                    ))
                }
                Err(Unsent::Failed(e)) => return Err(e),
            }
        }
    }

    /// After the fallback period: one QUIC handshake; QUIC again if it works, another
    /// period on TCP if not.
    async fn probe(&self, addr: SocketAddr) {
        let Some(fb) = &self.fallback else { return };
        match self.connection(addr, None, true).await {
            Ok(_) => {
                fb.end(addr);
                tracing::info!(cluster = &*self.cluster, endpoint = %addr, "QUIC works again: leaving the TCP fallback");
            }
            Err(f) => {
                fb.start(addr);
                tracing::debug!(cluster = &*self.cluster, endpoint = %addr, error = %f.error, "QUIC still fails: staying on TCP");
            }
        }
    }

    /// The endpoint's pooled connection, or a new one. `stale`: the pooled connection with
    /// this id failed, make another (unless someone already has). `probe`: the fallback's
    /// background attempt.
    async fn connection(
        &self,
        addr: SocketAddr,
        stale: Option<usize>,
        probe: bool,
    ) -> Result<Conn, ConnectFailure> {
        let asked = Instant::now();
        let slot = self.conns.lock().unwrap().entry(addr).or_default().clone();
        let mut slot = slot.lock().await;
        if !probe && self.fallback.as_ref().is_some_and(|f| f.on_tcp(addr)) {
            return Err(ConnectFailure {
                error: "on the TCP fallback".into(),
                may_fall_back: true,
                fell_back: true,
            });
        }
        if let Some(c) = &slot.conn {
            if c.quic.close_reason().is_none() && Some(c.quic.stable_id()) != stale {
                return Ok(c.clone());
            }
        }
        // An attempt that failed while this request waited answers for it too.
        if let Some((at, error)) = &slot.failed {
            if *at >= asked && !probe {
                return Err(ConnectFailure {
                    error: error.to_string().into(),
                    may_fall_back: false,
                    fell_back: false,
                });
            }
        }
        // A replaced connection (closed, or going away after the server's GOAWAY) lives on
        // for the requests still using it; h3 closes it when the last of them is done.
        slot.conn = None;
        let attempt = tokio::time::timeout(self.connect_timeout, self.connect(addr)).await;
        let failure = match attempt {
            Ok(Ok(conn)) => {
                slot.conn = Some(conn.clone());
                slot.failed = None;
                return Ok(conn);
            }
            Ok(Err(f)) => f,
            Err(_) => {
                self.handshake_error("timeout");
                ConnectFailure {
                    error: format!(
                        "no QUIC handshake with {addr} within {:?}",
                        self.connect_timeout
                    )
                    .into(),
                    may_fall_back: true,
                    fell_back: false,
                }
            }
        };
        slot.failed = Some((Instant::now(), failure.error.to_string().into()));
        if let (Some(fb), true, false) = (&self.fallback, failure.may_fall_back, probe) {
            fb.start(addr);
            self.metrics.fallback.inc();
            tracing::warn!(
                cluster = &*self.cluster,
                endpoint = %addr,
                error = %failure.error,
                period_ms = fb.period.as_millis() as u64,
                "QUIC connection failed: falling back to TCP for this endpoint"
            );
            return Err(ConnectFailure {
                fell_back: true,
                ..failure
            });
        }
        Err(failure)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, ConnectFailure> {
        let io_failure = |e: String| ConnectFailure {
            error: e.into(),
            may_fall_back: true,
            fell_back: false,
        };
        let endpoint = self
            .socket(addr)
            .map_err(|e| io_failure(format!("cannot open a UDP socket: {e}")))?;
        let config = self.client_config().map_err(|e| ConnectFailure {
            error: e.into(),
            may_fall_back: false,
            fell_back: false,
        })?;
        let name = self.tls.server_name_for(addr.ip());
        let connecting = endpoint
            .connect_with(config, addr, &name)
            .map_err(|e| io_failure(format!("cannot connect to {addr}: {e}")))?;
        let quic = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                let reason = super::handshake_reason(&e, Role::Client);
                self.handshake_error(reason);
                tracing::debug!(cluster = &*self.cluster, endpoint = %addr, reason, error = %e, "QUIC handshake failed");
                return Err(ConnectFailure {
                    error: format!("QUIC handshake with {addr} failed ({reason}): {e}").into(),
                    // A TLS refusal would meet TCP + TLS the same way.
                    may_fall_back: super::tls_alert(&e).is_none(),
                    fell_back: false,
                });
            }
        };
        let (mut driver, send) = h3::client::builder()
            .build::<_, _, Bytes>(h3_quinn::Connection::new(quic.clone()))
            .await
            .map_err(|e| io_failure(format!("HTTP/3 setup with {addr} failed: {e}")))?;
        let active = self.metrics.active.clone();
        active.inc();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let e = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            active.dec();
            if !e.is_h3_no_error() {
                tracing::debug!(cluster = &*cluster, endpoint = %addr, error = %e, "HTTP/3 connection closed");
            }
        });
        Ok(Conn { send, quic })
    }

    fn handshake_error(&self, reason: &'static str) {
        self.metrics
            .errors
            .get_or_create(&(Side::Cluster(self.cluster.clone()), ReasonLabel { reason }))
            .inc();
    }

    fn socket(&self, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let mut sockets = self.sockets.lock().unwrap();
        let i = usize::from(addr.is_ipv6());
        if let Some(e) = &sockets[i] {
            return Ok(e.clone());
        }
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("an address")
        } else {
            "0.0.0.0:0".parse().expect("an address")
        };
        let e = quinn::Endpoint::client(bind)?;
        sockets[i] = Some(e.clone());
        Ok(e)
    }

    /// A quinn client config from the cluster's current rustls config with ALPN `h3`;
    /// rebuilt when the TLS files rotate.
    fn client_config(&self) -> Result<quinn::ClientConfig, String> {
        let current = self.tls.current();
        let mut cached = self.quic_config.lock().unwrap();
        if let Some((src, cfg)) = cached.as_ref() {
            if Arc::ptr_eq(src, &current) {
                return Ok(cfg.clone());
            }
        }
        let mut rustls_cfg = (*current).clone();
        rustls_cfg.alpn_protocols = vec![crate::tls::ALPN_H3.to_vec()];
        rustls_cfg.enable_early_data = false;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_cfg)
            .map_err(|e| format!("the cluster's TLS settings cannot carry QUIC: {e}"))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(super::transport(IDLE_TIMEOUT, Some(KEEP_ALIVE)));
        *cached = Some((current, cfg.clone()));
        Ok(cfg)
    }

    /// Sends one request as a stream of `conn`: the head, then the body (in its own task,
    /// while the response is awaited, so a server may answer before reading it all).
    async fn send(&self, conn: &Conn, req: Request<ReqBody>) -> Result<Response<InBody>, Unsent> {
        let (parts, body) = req.into_parts();
        if conn.quic.close_reason().is_some() {
            return Err(Unsent::Again(Box::new(Request::from_parts(parts, body))));
        }
        // The head as sent; `parts` stays as it came, for another connection or the fallback.
        let mut head = parts.clone();
        head.version = Version::HTTP_3;
        // `:authority` is the client's Host (so the next hop can route by it), while the
        // connection goes to the endpoint's address.
        if let Some(host) = head.headers.remove(header::HOST) {
            if let Ok(authority) = http::uri::Authority::try_from(host.as_bytes()) {
                let mut uri = head.uri.clone().into_parts();
                uri.authority = Some(authority);
                if let Ok(u) = http::Uri::from_parts(uri) {
                    head.uri = u;
                }
            }
        }
        let mut send = conn.send.clone();
        let stream = match send.send_request(Request::from_parts(head, ())).await {
            Ok(s) => s,
            Err(e @ h3::error::StreamError::HeaderTooBig { .. }) => {
                return Err(Unsent::Failed(reset(e)))
            }
            // Nothing was sent (the connection closed, or the server sent GOAWAY): the
            // request may go on a new connection.
            Err(_) => return Err(Unsent::Again(Box::new(Request::from_parts(parts, body)))),
        };
        self.metrics.streams.inc();
        let (mut tx, mut rx) = stream.split();
        // Dropped when this request is abandoned (a timeout) or its response is done: the
        // body task then resets the stream instead of sending on.
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        if body.is_end_stream() {
            if let Err(e) = tx.finish().await {
                return Err(Unsent::Failed(reset(e)));
            }
        } else {
            tokio::spawn(H3Send::Client(tx).send_body(
                body,
                h3::error::Code::H3_REQUEST_CANCELLED,
                async move {
                    let _ = cancelled.await;
                },
            ));
        }
        let head = match rx.recv_response().await {
            Ok(h) => h,
            Err(e) => {
                // Refused unprocessed (after the server's GOAWAY): safe to send again.
                let rejected = matches!(&e, h3::error::StreamError::RemoteTerminate { code, .. }
                    if *code == h3::error::Code::H3_REQUEST_REJECTED);
                return Err(Unsent::Failed(if rejected {
                    UpstreamError::not_sent(e)
                } else {
                    UpstreamError::sent(e)
                }));
            }
        };
        let (parts, ()) = head.into_parts();
        let body = InBody::H3(Box::new(H3Recv::client(
            rx,
            &parts.headers,
            (conn.send.clone(), cancel),
        )));
        Ok(Response::from_parts(parts, body))
    }
}

enum Unsent {
    /// No stream could be opened: the request, untouched, may go on another connection.
    Again(Box<Request<ReqBody>>),
    Failed(UpstreamError),
}

fn reset(e: impl std::error::Error + Send + Sync + 'static) -> UpstreamError {
    UpstreamError::sent(e)
}

impl Fallback {
    fn route(&self, addr: SocketAddr) -> Route {
        let mut until = self.until.lock().unwrap();
        match until.get_mut(&addr) {
            None => Route::Quic,
            Some((t, probing)) => {
                if Instant::now() < *t || *probing {
                    Route::Tcp
                } else {
                    *probing = true;
                    Route::TcpAndProbe
                }
            }
        }
    }

    fn on_tcp(&self, addr: SocketAddr) -> bool {
        self.until.lock().unwrap().contains_key(&addr)
    }

    fn start(&self, addr: SocketAddr) {
        self.until
            .lock()
            .unwrap()
            .insert(addr, (Instant::now() + self.period, false));
    }

    fn end(&self, addr: SocketAddr) {
        self.until.lock().unwrap().remove(&addr);
    }

    /// Sends the request over TCP (+TLS) through the endpoint's pool, in the fallback's
    /// HTTP version.
    async fn send(
        &self,
        endpoint: &EndpointState,
        mut req: Request<ReqBody>,
    ) -> Result<Response<InBody>, UpstreamError> {
        if self.connector.protocol == spur_config::UpstreamProtocol::Http2 {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        } else {
            *req.version_mut() = Version::HTTP_11;
            if let Some(a) = req.uri().authority() {
                if !req.headers().contains_key(header::HOST) {
                    if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                        req.headers_mut().insert(header::HOST, v);
                    }
                }
            }
            if let Some(p) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = http::Uri::from(p);
            }
        }
        endpoint
            .pool
            .send(&self.connector, endpoint.addr, req)
            .await
    }
}
