//! One request's record: what the access log line and the request metrics say about it,
//! written once when the response body ends (or is dropped), so the duration and byte
//! counts cover the whole exchange.

use crate::access::{self, Val};
use crate::body::{BoxError, InBody};
use crate::endpoint::InFlight;
use crate::grpc;
use crate::headers::X_SPUR_ERROR;
use crate::http::plan::Plan;
use crate::metrics::{
    ClientRouteLabels, Finished, RequestLabels, RouteLabels, TargetMetrics, TraceIdLabel,
    TraceLabel,
};
use crate::policy::retry::Outcome;
use crate::reason::Reason;
use crate::snapshot::ListenerRt;
use crate::trace::span::ServerSpan;
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
    /// The request is a gRPC call.
    pub grpc: bool,
    /// Its gRPC status, once known (a trailers-only head, the trailers, Spur's answer).
    pub grpc_status: Option<u8>,
    /// The time to the response head.
    pub first_byte: Option<std::time::Duration>,
    /// The try whose verdict waits for the gRPC status in the trailers.
    pub deferred: Option<Box<crate::attempt::Deferred>>,
    /// The response body ended (rather than being dropped or breaking off).
    pub ended: bool,
    /// The spans of a sampled request (with `tracing`).
    pub span: Option<Box<crate::trace::span::Recording>>,
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
        // Written into its box: `Box::new` built the record aside and copied it in.
        let mut ex = Box::<Exchange>::new_uninit();
        ex.write(Exchange {
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
            grpc: false,
            grpc_status: None,
            first_byte: None,
            deferred: None,
            ended: false,
            span: None,
        });
        // SAFETY: written just above.
        unsafe { ex.assume_init() }
    }

    /// Takes what the plan decided into the record: request ID, trace, route, cluster and
    /// the series to count the request in.
    pub fn record_plan(&mut self, plan: &Plan<'_>, lst: &ListenerRt) {
        self.request_id = plan.request_id.clone();
        self.grpc = plan.grpc;
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
        let grpc = self.grpc_label();
        if let (Some(d), Some(e)) = (self.deferred.take(), &self.endpoint) {
            d.record(e, self.stream_outcome(), &self.shared.metrics);
        }
        let exemplar = self.finish_spans(grpc);
        let finished = Finished {
            client: self.peer_identity.as_ref(),
            status: self.status,
            grpc,
            elapsed,
            first_byte: self.first_byte,
            bytes_in: self.body.bytes(),
            bytes_out: self.bytes_sent,
            exemplar,
        };
        match &self.target {
            Some(t) => t.record(&finished),
            None => self.count_slowly(&finished),
        }
        if let Some(live) = &self.live {
            live.record(
                crate::report::failed(self.status, self.grpc_label()),
                self.attempts,
                elapsed,
            );
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
                (
                    "grpc_status",
                    grpc.map_or(Val::Str(DASH), |g| Val::U64(u64::from(g))),
                ),
                ("attempts", Val::U64(u64::from(self.attempts))),
                ("duration_ms", Val::Millis(elapsed)),
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
    /// Exports a sampled request's spans; the exemplar for its duration.
    fn finish_spans(&mut self, grpc: Option<u8>) -> Option<TraceLabel> {
        let mut rec = self.span.take()?;
        rec.finish(&ServerSpan {
            method: &self.method,
            path: self.path.path(),
            listener: &self.listener,
            route: &self.route,
            cluster: &self.cluster,
            endpoint: self.endpoint.as_ref().map(|e| &e.endpoint.label),
            peer_identity: self.peer_identity.as_ref(),
            error: self.error,
            status: self.status,
            grpc,
            attempts: self.attempts,
        });
        Some(TraceLabel {
            trace_id: TraceIdLabel(rec.trace.trace_id),
        })
    }

    /// `grpc_status` of a gRPC call (`None` for other requests): the status that came, or
    /// what its client is left with: the HTTP status's gRPC meaning, `CANCELLED` when the
    /// client went away first, `UNKNOWN` when the stream ended or broke without one.
    pub(crate) fn grpc_label(&self) -> Option<u8> {
        if !self.grpc {
            return None;
        }
        Some(self.grpc_status.unwrap_or(match self.status {
            200 if !self.ended && self.error.is_none() => grpc::CANCELLED,
            200 | 0 => grpc::UNKNOWN,
            s => grpc::from_http(s),
        }))
    }

    /// How a deferred gRPC try ended, for its endpoint's record.
    fn stream_outcome(&self) -> Outcome {
        match self.grpc_status {
            Some(c) => Outcome::Grpc(c),
            None if self.error.is_some() => Outcome::Reset,
            None if self.ended => Outcome::Grpc(grpc::UNKNOWN),
            None => Outcome::ClientAbort,
        }
    }

    /// Counts a request whose series were not resolved by the plan (refused before a
    /// route, or sent to an original destination's cluster).
    fn count_slowly(&self, f: &Finished<'_>) {
        let m = &self.shared.metrics;
        let client_id = f.client.cloned().unwrap_or_else(|| "".into());
        m.requests
            .get_or_create(&RequestLabels {
                listener: self.listener.clone(),
                route: self.route.clone(),
                cluster: self.cluster.clone(),
                code: f.status,
                grpc_status: f.grpc,
                client_id: client_id.clone(),
            })
            .inc();
        m.request_duration
            .get_or_create(&ClientRouteLabels {
                listener: self.listener.clone(),
                route: self.route.clone(),
                cluster: self.cluster.clone(),
                client_id,
            })
            .observe(f.elapsed.as_secs_f64(), f.exemplar.clone(), None);
        let labels = RouteLabels {
            listener: self.listener.clone(),
            route: self.route.clone(),
            cluster: self.cluster.clone(),
        };
        if let Some(d) = f.first_byte {
            m.response_first_byte
                .get_or_create(&labels)
                .observe(d.as_secs_f64());
        }
        m.request_bytes.get_or_create(&labels).inc_by(f.bytes_in);
        m.response_bytes.get_or_create(&labels).inc_by(f.bytes_out);
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
                if let Some(ex) = this.exchange.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        ex.bytes_sent += d.len() as u64;
                        if let Some((_, hash)) = ex.mirror.as_mut() {
                            hash.update(d);
                        }
                    } else if let (true, Some(t)) = (ex.grpc, frame.trailers_ref()) {
                        ex.grpc_status = grpc::status_in(t);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(ex) = this.exchange.as_mut() {
                    ex.error = Some(Reason::UpstreamReset.as_str());
                }
                this.close();
            }
            Poll::Ready(None) => {
                if let Some(ex) = this.exchange.as_mut() {
                    ex.ended = true;
                }
                this.close();
            }
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
/// request ID; to a gRPC call, a trailers-only gRPC error (see [`grpc`]).
pub fn local_response(
    status: StatusCode,
    reason: Reason,
    request_id_header: &http::HeaderName,
    mut exchange: Option<Box<Exchange>>,
) -> Response<RespBody> {
    if let Some(ex) = exchange.as_mut().filter(|ex| ex.grpc) {
        ex.first_byte = Some(crate::clock::now().saturating_duration_since(ex.start));
        let code = reason.grpc_status(status);
        ex.grpc_status = Some(code);
        ex.status = 200;
        ex.error = Some(reason.as_str());
        let mut resp = Response::new(RespBody {
            inner: Inner::Local(None),
            exchange: None,
        });
        let h = resp.headers_mut();
        grpc::trailers_only(h, code, reason.as_str());
        h.insert(&X_SPUR_ERROR, HeaderValue::from_static(reason.as_str()));
        if let Some(id) = &ex.request_id {
            h.insert(request_id_header.clone(), id.clone());
        }
        resp.body_mut().exchange = exchange;
        return resp;
    }
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
        ex.first_byte = Some(crate::clock::now().saturating_duration_since(ex.start));
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
