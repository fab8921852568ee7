//! One request's record: what the access log line and the request metrics say about it,
//! written once when the response body ends (or is dropped), so the duration and byte
//! counts cover the whole exchange.

use crate::access::{self, Val};
use crate::body::{BoxError, InBody};
use crate::endpoint::InFlight;
use crate::headers::X_SPUR_ERROR;
use crate::http::plan::Plan;
use crate::metrics::{RequestLabels, RouteLabels, TargetMetrics};
use crate::reason::Reason;
use crate::snapshot::ListenerRt;
use crate::upstream::BodyStats;
use crate::Shared;
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub struct Exchange {
    pub shared: Arc<Shared>,
    pub start: Instant,
    pub listener: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
    pub endpoint: Option<InFlight>,
    pub request_id: Option<HeaderValue>,
    pub trace_id: Option<[u8; 32]>,
    pub method: Method,
    pub path: http::uri::PathAndQuery,
    /// The client's address.
    pub client: std::net::SocketAddr,
    /// The request's Host (normalised) and User-Agent, for the access log.
    pub host: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// Tries made upstream (0: answered by Spur before any).
    pub attempts: u32,
    /// Write the query string in the access log (`access_log.query`).
    pub log_query: bool,
    pub status: u16,
    pub error: Option<&'static str>,
    pub bytes_sent: u64,
    /// What the request body did: bytes read, and whether the client's stream broke off.
    pub body: Arc<BodyStats>,
    /// The request series of this route and cluster, when the plan resolved them.
    pub target: Option<Arc<TargetMetrics>>,
    /// The traffic counters of this route and cluster (status reports), likewise.
    pub live: Option<Arc<crate::report::Target>>,
    /// `x-spur-flags` as sent upstream: kept only while tapped (see [`crate::tap`]).
    pub flags: Option<HeaderValue>,
    pub upgraded: bool,
    /// The cluster's `max_requests` slot, held until the response ends.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The verified mTLS peer's SPIFFE ID.
    pub peer_identity: Option<Arc<str>>,
    /// The authorization rule that decided (`default`: none matched); `None` without a
    /// policy.
    pub authz_rule: Option<Arc<str>>,
    /// When the request is mirrored: where to report this exchange's status and body hash.
    pub mirror: Option<(
        tokio::sync::oneshot::Sender<crate::mirror::PrimaryResult>,
        crate::mirror::BodyHash,
    )>,
}

static DASH: &str = "-";

impl Exchange {
    pub fn new(
        shared: Arc<Shared>,
        listener: Arc<str>,
        client: std::net::SocketAddr,
        method: Method,
        path: http::uri::PathAndQuery,
    ) -> Box<Exchange> {
        let unknown: Arc<str> = shared.dash.clone();
        Box::new(Exchange {
            shared,
            start: crate::clock::now(),
            listener,
            route: unknown.clone(),
            cluster: unknown,
            endpoint: None,
            request_id: None,
            trace_id: None,
            method,
            path,
            client,
            host: None,
            user_agent: None,
            attempts: 0,
            log_query: false,
            status: 0,
            error: None,
            bytes_sent: 0,
            body: Arc::new(BodyStats::default()),
            target: None,
            live: None,
            flags: None,
            upgraded: false,
            permit: None,
            peer_identity: None,
            authz_rule: None,
            mirror: None,
        })
    }

    /// Takes what the plan decided into the record: request ID, trace, route, cluster and
    /// the series to count the request in.
    pub fn record_plan(&mut self, plan: &Plan<'_>, lst: &ListenerRt) {
        self.request_id = plan.request_id.clone();
        self.trace_id = plan.trace.map(|t| t.trace_id);
        self.authz_rule = plan.authz_rule.clone();
        if self.shared.tap.is_on() {
            self.flags = plan.flags_header.clone();
        }
        if let Some(r) = &plan.route_name {
            self.route = r.clone();
        }
        let Some(cluster) = plan.cluster() else {
            return;
        };
        self.cluster = cluster.name.clone();
        self.target = match (plan.route, &plan.action) {
            (Some(r), crate::http::plan::Action::Forward(f)) => {
                r.metrics.get(f.split_side.unwrap_or(0)).cloned()
            }
            (None, _) => lst
                .default_cluster
                .as_ref()
                .filter(|d| Arc::ptr_eq(d, cluster))
                .and(lst.default_metrics.clone()),
            _ => None,
        };
        self.live = match (plan.route, &plan.action) {
            (Some(r), crate::http::plan::Action::Forward(f)) => {
                r.live.get(f.split_side.unwrap_or(0)).cloned()
            }
            (None, _) => lst
                .default_cluster
                .as_ref()
                .filter(|d| Arc::ptr_eq(d, cluster))
                .and(lst.default_live.clone()),
            _ => None,
        };
    }

    fn finish(&mut self) {
        if let Some((tx, hash)) = self.mirror.take() {
            let _ = tx.send((self.status, hash.value()));
        }
        let elapsed = crate::clock::now().saturating_duration_since(self.start);
        match &self.target {
            Some(t) => {
                t.requests.inc(self.status);
                t.duration.observe(elapsed.as_secs_f64());
            }
            None => self.count_slowly(elapsed),
        }
        if let Some(live) = &self.live {
            live.record(crate::report::failed(self.status), self.attempts, elapsed);
        }
        if self.shared.tap.is_on() {
            self.shared.tap.offer(self, elapsed);
        }
        if !access::enabled() {
            return;
        }
        let endpoint = self.endpoint.as_ref().map_or(DASH, |e| &e.endpoint.label);
        let path = if self.log_query {
            self.path.as_str()
        } else {
            self.path.path()
        };
        fn text(v: &Option<HeaderValue>) -> &str {
            v.as_ref()
                .map_or(DASH, |v| v.to_str().unwrap_or("(not text)"))
        }
        let mut client = [0u8; access::ADDR_MAX];
        let client = access::socket_addr(&mut client, self.client);
        access::emit(
            "access",
            &[
                (
                    "request_id",
                    Val::Str(
                        self.request_id
                            .as_ref()
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or(DASH),
                    ),
                ),
                (
                    "trace_id",
                    Val::Str(
                        self.trace_id
                            .as_ref()
                            .and_then(|t| std::str::from_utf8(t).ok())
                            .unwrap_or(DASH),
                    ),
                ),
                ("listener", Val::Str(&self.listener)),
                ("client", Val::Str(client)),
                ("host", Val::Str(text(&self.host))),
                ("user_agent", Val::Str(text(&self.user_agent))),
                ("route", Val::Str(&self.route)),
                ("cluster", Val::Str(&self.cluster)),
                ("endpoint", Val::Str(endpoint)),
                ("method", Val::Str(self.method.as_str())),
                ("path", Val::Str(path)),
                ("status", Val::U64(u64::from(self.status))),
                ("attempts", Val::U64(u64::from(self.attempts))),
                ("duration_ms", Val::F64(elapsed.as_secs_f64() * 1e3)),
                ("bytes_received", Val::U64(self.body.bytes())),
                ("bytes_sent", Val::U64(self.bytes_sent)),
                ("error", Val::Str(self.error.unwrap_or(DASH))),
                ("upgraded", Val::Bool(self.upgraded)),
                (
                    "peer_identity",
                    Val::Str(self.peer_identity.as_deref().unwrap_or(DASH)),
                ),
                (
                    "authz_rule",
                    Val::Str(self.authz_rule.as_deref().unwrap_or(DASH)),
                ),
            ],
        );
    }
}

impl Exchange {
    /// Counts a request whose series were not resolved by the plan (refused before a
    /// route, or sent to an original destination's cluster).
    fn count_slowly(&self, elapsed: std::time::Duration) {
        let m = &self.shared.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                listener: self.listener.clone(),
                route: self.route.clone(),
                cluster: self.cluster.clone(),
                code: self.status,
            })
            .inc();
        m.request_duration
            .get_or_create(&RouteLabels {
                listener: self.listener.clone(),
                route: self.route.clone(),
                cluster: self.cluster.clone(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// The response body Spur serves: the upstream's, streamed, or one Spur wrote itself. It
/// carries the request's [`Exchange`] and closes it when the body ends or is dropped.
pub struct RespBody {
    inner: Inner,
    exchange: Option<Box<Exchange>>,
}

enum Inner {
    Upstream(InBody),
    Local(Option<Bytes>),
}

impl RespBody {
    pub fn upstream(body: InBody, exchange: Box<Exchange>) -> RespBody {
        RespBody {
            inner: Inner::Upstream(body),
            exchange: Some(exchange),
        }
    }

    pub fn local(text: Bytes, exchange: Option<Box<Exchange>>) -> RespBody {
        RespBody {
            inner: Inner::Local(Some(text)),
            exchange,
        }
    }

    fn close(&mut self) {
        if let Some(mut ex) = self.exchange.take() {
            ex.finish();
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        self.close();
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx),
            Inner::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(ex), Some(d)) = (this.exchange.as_mut(), frame.data_ref()) {
                    ex.bytes_sent += d.len() as u64;
                    if let Some((_, hash)) = ex.mirror.as_mut() {
                        hash.update(d);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(ex) = this.exchange.as_mut() {
                    ex.error = Some(Reason::UpstreamReset.as_str());
                }
                this.close();
            }
            Poll::Ready(None) => this.close(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// A response Spur makes itself: short text, the status, `x-spur-error: <reason>`, and the
/// request ID.
pub fn local_response(
    status: StatusCode,
    reason: Reason,
    request_id_header: &http::HeaderName,
    mut exchange: Option<Box<Exchange>>,
) -> Response<RespBody> {
    let reason = reason.as_str();
    let text = Bytes::from(format!(
        "{} ({reason})\n",
        status.canonical_reason().unwrap_or("error")
    ));
    let mut builder = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(&X_SPUR_ERROR, reason);
    if let Some(ex) = exchange.as_mut() {
        ex.status = status.as_u16();
        ex.error = Some(reason);
        if let Some(id) = &ex.request_id {
            builder = builder.header(request_id_header, id.clone());
        }
    }
    builder
        .body(RespBody::local(text, exchange))
        .expect("static parts are valid")
}
