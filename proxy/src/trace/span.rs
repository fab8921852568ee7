//! The spans of one sampled request: a server span for the exchange, a client span per
//! try, and a linked span for a mirrored copy.
//!
//! A [`Recording`] rides in the exchange record (boxed: only sampled requests have one).
//! Times are wall-clock for the collector but measured on the request path's monotonic
//! clock: the exchange's start is read once from both, and every other time is that start
//! plus a monotonic offset (one system-clock read per sampled request).

use super::new_span;
use super::{Trace, Tracer};
use crate::policy::correlation::hex16;
use crate::policy::retry::Outcome;
use http::Request;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// A value of a span attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Str(Arc<str>),
    Static(&'static str),
    Text(String),
    Int(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// One finished span, as it goes to the exporter.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: [u8; 32],
    pub span_id: [u8; 16],
    pub parent: Option<[u8; 16]>,
    pub name: String,
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: Vec<(&'static str, Attr)>,
    /// A linked span (trace, span): a mirrored copy's link to the request it copies.
    pub link: Option<([u8; 32], [u8; 16])>,
    pub error: bool,
}

/// A try in progress (or the last one, until the exchange ends).
struct TrySpan {
    span_id: NonZeroU64,
    number: u32,
    endpoint: Arc<str>,
    started: Instant,
    /// When its answer (or failure) came, and what it was.
    ended: Option<(Instant, Outcome)>,
}

/// What a sampled request records until its exchange ends.
pub struct Recording {
    pub tracer: Arc<Tracer>,
    pub trace: Trace,
    /// The exchange's start, on both clocks.
    start: Instant,
    start_unix_ns: u64,
    /// The side of a split the request took (its cluster's name).
    pub split: Option<Arc<str>>,
    /// `x-spur-flags`: the flags on for this request.
    pub flags: Option<http::HeaderValue>,
    current: Option<TrySpan>,
}

impl Recording {
    pub fn new(tracer: Arc<Tracer>, trace: Trace, start: Instant) -> Recording {
        let now_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let since = crate::clock::now().saturating_duration_since(start);
        Recording {
            tracer,
            trace,
            start,
            start_unix_ns: now_unix.saturating_sub(since.as_nanos() as u64),
            split: None,
            flags: None,
            current: None,
        }
    }

    /// The recording of a request the plan sampled with `tracing` on (`None` for the
    /// rest, which record nothing).
    pub fn for_plan(
        snap: &crate::snapshot::Snapshot,
        plan: &crate::http::plan::Plan<'_>,
        start: Instant,
    ) -> Option<Box<Recording>> {
        let trace = plan.trace.filter(|t| t.recorded)?;
        let tracer = snap.tracer.as_ref()?;
        let mut rec = Recording::new(tracer.clone(), trace, start);
        rec.flags = plan.flags_header.clone();
        if let crate::http::plan::Action::Forward(f) = &plan.action {
            rec.split = f.split_side.map(|_| f.cluster.name.clone());
        }
        Some(Box::new(rec))
    }

    fn unix(&self, t: Instant) -> u64 {
        self.start_unix_ns + t.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// A try starts: its client span gets an ID, which the upstream gets as its parent.
    /// The try before it (a retried one) is exported now.
    pub fn begin_try<B>(
        &mut self,
        req: &mut Request<B>,
        number: u32,
        endpoint: &Arc<str>,
        cluster: &Arc<str>,
        started: Instant,
    ) {
        self.flush_try(cluster, None);
        let span_id = new_span();
        self.trace.write_upstream(req.headers_mut(), span_id);
        self.current = Some(TrySpan {
            span_id,
            number,
            endpoint: endpoint.clone(),
            started,
            ended: None,
        });
    }

    /// The try's answer (or failure) came.
    pub fn end_try(&mut self, outcome: Outcome) {
        if let Some(t) = self.current.as_mut() {
            t.ended = Some((crate::clock::now(), outcome));
        }
    }

    /// Exports the current try's span; `end` is the exchange's end for the last try (which
    /// lasts as long as its response streams), else the time its answer came.
    fn flush_try(&mut self, cluster: &Arc<str>, end: Option<(Instant, Option<u8>)>) {
        let Some(t) = self.current.take() else {
            return;
        };
        let (ended, outcome) = t.ended.unwrap_or((t.started, Outcome::ClientAbort));
        let mut attrs = vec![
            ("spur.attempt", Attr::Int(i64::from(t.number))),
            ("spur.cluster", Attr::Str(cluster.clone())),
            ("spur.endpoint", Attr::Str(t.endpoint.clone())),
            ("server.address", Attr::Str(t.endpoint.clone())),
        ];
        // The try's own answer; the last one lasts until the exchange ends, and a gRPC
        // stream's status comes in its trailers.
        let (status, grpc, end_time) = match (outcome, end) {
            (Outcome::Status(s), Some((at, grpc))) => (Some(s), grpc, at),
            (Outcome::Grpc(c), Some((at, _))) => (Some(200), Some(c), at),
            (Outcome::Status(s), None) => (Some(s), None, ended),
            (Outcome::Grpc(c), None) => (Some(200), Some(c), ended),
            (_, _) => (None, None, ended),
        };
        if let Some(s) = status {
            attrs.push(("http.response.status_code", Attr::Int(i64::from(s))));
        }
        if let Some(g) = grpc {
            attrs.push(("rpc.grpc.status_code", Attr::Int(i64::from(g))));
        }
        let failure = outcome.failure_reason();
        if let Some(r) = failure {
            attrs.push(("spur.error", Attr::Static(r.as_str())));
        }
        let error =
            failure.is_some() || status.is_some_and(|s| s >= 500) || grpc.is_some_and(|g| g != 0);
        let record = SpanRecord {
            trace_id: self.trace.trace_id,
            span_id: hex16(t.span_id.get()),
            parent: Some(hex16(self.trace.span_id.get())),
            name: format!("try {}", t.number),
            kind: Kind::Client,
            start_ns: self.unix(t.started),
            end_ns: self.unix(end_time),
            attrs,
            link: None,
            error,
        };
        self.tracer.exporter.send(record);
    }

    /// The exchange ended: exports the last try's span and the server span.
    pub fn finish(&mut self, ex: &ServerSpan<'_>) {
        let now = crate::clock::now();
        self.flush_try(ex.cluster, Some((now, ex.grpc)));
        let mut attrs = vec![
            ("http.request.method", Attr::Text(ex.method.to_string())),
            ("url.path", Attr::Text(ex.path.to_string())),
            ("spur.listener", Attr::Str(ex.listener.clone())),
            ("spur.route", Attr::Str(ex.route.clone())),
            ("spur.cluster", Attr::Str(ex.cluster.clone())),
            ("spur.attempts", Attr::Int(i64::from(ex.attempts))),
        ];
        if ex.status != 0 {
            attrs.push(("http.response.status_code", Attr::Int(i64::from(ex.status))));
        }
        let optional = [
            ("spur.endpoint", ex.endpoint.cloned().map(Attr::Str)),
            ("spur.split", self.split.clone().map(Attr::Str)),
            (
                "spur.peer_identity",
                ex.peer_identity.cloned().map(Attr::Str),
            ),
            ("spur.error", ex.error.map(Attr::Static)),
            (
                "spur.flags",
                self.flags
                    .as_ref()
                    .and_then(|f| f.to_str().ok())
                    .filter(|f| !f.is_empty())
                    .map(|f| Attr::Text(f.to_string())),
            ),
            (
                "rpc.grpc.status_code",
                ex.grpc.map(|g| Attr::Int(i64::from(g))),
            ),
        ];
        attrs.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        let record = SpanRecord {
            trace_id: self.trace.trace_id,
            span_id: hex16(self.trace.span_id.get()),
            parent: self.trace.caller.map(|c| hex16(c.get())),
            name: format!("{} {}", ex.method, ex.route),
            kind: Kind::Server,
            start_ns: self.start_unix_ns,
            end_ns: self.unix(now),
            attrs,
            link: None,
            error: ex.error.is_some() || ex.status >= 500 || ex.grpc.is_some_and(|g| g != 0),
        };
        self.tracer.exporter.send(record);
    }

    /// The trace context of a mirrored copy: a new trace, sampled, whose root span (the
    /// copy's client span) links back to this request's server span.
    pub fn mirror(&self) -> MirrorSpan {
        MirrorSpan {
            tracer: self.tracer.clone(),
            trace: Trace {
                trace_id: crate::policy::correlation::new_trace_id(),
                span_id: new_span(),
                caller: None,
                sampled: true,
                recorded: true,
                write: true,
                formats: self.trace.formats,
                b3: None,
            },
            link: (self.trace.trace_id, hex16(self.trace.span_id.get())),
        }
    }
}

/// What the exchange record tells its server span.
pub struct ServerSpan<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub listener: &'a Arc<str>,
    pub route: &'a Arc<str>,
    pub cluster: &'a Arc<str>,
    pub endpoint: Option<&'a Arc<str>>,
    pub peer_identity: Option<&'a Arc<str>>,
    pub error: Option<&'static str>,
    pub status: u16,
    pub grpc: Option<u8>,
    pub attempts: u32,
}

/// A mirrored copy's span: a trace of its own, linked to the request it copies.
pub struct MirrorSpan {
    tracer: Arc<Tracer>,
    trace: Trace,
    link: ([u8; 32], [u8; 16]),
}

impl MirrorSpan {
    /// Sets the copy's trace headers (the copy's span as the mirror cluster's parent).
    pub fn write(&self, h: &mut http::HeaderMap) {
        h.remove(&super::propagate::B3);
        self.trace.write_upstream(h, self.trace.span_id);
    }

    /// Exports the copy's span, from `start` until now, with its status (`None`: failed).
    pub fn finish(self, cluster: &Arc<str>, start: SystemTime, status: Option<u16>) {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        };
        let mut attrs = vec![
            ("spur.cluster", Attr::Str(cluster.clone())),
            ("spur.mirror", Attr::Static("true")),
        ];
        if let Some(s) = status {
            attrs.push(("http.response.status_code", Attr::Int(i64::from(s))));
        }
        self.tracer.exporter.send(SpanRecord {
            trace_id: self.trace.trace_id,
            span_id: hex16(self.trace.span_id.get()),
            parent: None,
            name: "mirror".into(),
            kind: Kind::Client,
            start_ns: unix(start),
            end_ns: unix(SystemTime::now()),
            attrs,
            link: Some(self.link),
            error: status.is_none_or(|s| s >= 500),
        });
    }
}
