//! Span export: a bounded queue, and a thread of its own that batches the queue and posts
//! each batch to the collector as OTLP/HTTP protobuf.
//!
//! The request path only ever *tries* to queue a span ([`Exporter::send`]): a full queue
//! drops it and counts it, so a slow or absent collector costs spans, never a request or a
//! wait. The thread (one per tracer, on a current-thread runtime, off the workers) sends a
//! batch when it holds [`BATCH`] spans or [`FLUSH`] after its first span, one batch at a
//! time, each bounded by [`TIMEOUT`]; a batch the collector did not take is dropped and
//! counted. When the tracer goes (a config without `tracing`), the queue closes, the
//! thread sends what it holds and ends.

use super::span::{Attr, Kind, SpanRecord};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Spans waiting for export, at most.
pub const QUEUE: usize = 4096;
/// Spans per request to the collector, at most.
pub const BATCH: usize = 512;
/// How long a span waits for its batch to fill.
pub const FLUSH: Duration = Duration::from_millis(500);
/// One export, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The request path's end of the export queue.
pub struct Exporter {
    tx: mpsc::Sender<SpanRecord>,
    dropped: Counter,
}

impl Exporter {
    /// Starts the export thread for `endpoint`.
    pub fn start(
        endpoint: spur_config::OtlpEndpoint,
        service: Arc<str>,
        dropped: Counter,
    ) -> Exporter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counter = dropped.clone();
        let started = std::thread::Builder::new()
            .name("spur-trace-export".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                rt.block_on(run(rx, endpoint, service, counter));
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the span exporter: spans will be dropped");
        }
        Exporter { tx, dropped }
    }

    /// Queues a span, or drops it (counted) when the queue is full.
    pub fn send(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<SpanRecord>,
    endpoint: spur_config::OtlpEndpoint,
    service: Arc<str>,
    dropped: Counter,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let flush_at = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(flush_at, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let body = encode(&service, &batch);
        match tokio::time::timeout(TIMEOUT, post(&endpoint, body)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, spans = batch.len(), "span export failed");
                dropped.inc_by(batch.len() as u64);
            }
            Err(_) => {
                tracing::debug!(spans = batch.len(), "span export timed out");
                dropped.inc_by(batch.len() as u64);
            }
        }
        batch.clear();
    }
}

/// Posts one encoded batch: a 2xx is success.
async fn post(endpoint: &spur_config::OtlpEndpoint, body: Vec<u8>) -> Result<(), String> {
    let authority = endpoint.authority();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connect to {authority}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = endpoint
        .uri
        .path_and_query()
        .map_or("/v1/traces", |p| p.as_str());
    let req = http::Request::post(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {status}"))
    }
}

/// One OTLP `ExportTraceServiceRequest` for these spans.
pub fn encode(service: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let resource = Resource {
        attributes: vec![kv("service.name", text(service))],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: "spur".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope),
                spans: spans.iter().map(to_proto).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    request.encode_to_vec()
}

fn to_proto(s: &SpanRecord) -> Span {
    Span {
        trace_id: unhex(&s.trace_id),
        span_id: unhex(&s.span_id),
        parent_span_id: s.parent.as_ref().map(|p| unhex(p)).unwrap_or_default(),
        flags: 1,
        name: s.name.clone(),
        kind: match s.kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: s.start_ns,
        end_time_unix_nano: s.end_ns,
        attributes: s.attrs.iter().map(|(k, v)| kv(k, value(v))).collect(),
        links: s
            .link
            .iter()
            .map(|(trace, span)| span::Link {
                trace_id: unhex(trace),
                span_id: unhex(span),
                flags: 1,
                ..Default::default()
            })
            .collect(),
        status: Some(Status {
            code: if s.error {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn text(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

fn value(v: &Attr) -> AnyValue {
    match v {
        Attr::Str(s) => text(s),
        Attr::Static(s) => text(s),
        Attr::Text(s) => text(s),
        Attr::Int(i) => AnyValue {
            value: Some(any_value::Value::IntValue(*i)),
        },
    }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(value),
        ..Default::default()
    }
}

/// Lower-case hex digits to bytes.
fn unhex(hex: &[u8]) -> Vec<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    };
    hex.chunks(2)
        .map(|p| digit(p[0]) << 4 | digit(p[1]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp_and_decode_back() {
        let span = SpanRecord {
            trace_id: *b"4bf92f3577b34da6a3ce929d0e0e4736",
            span_id: *b"00f067aa0ba902b7",
            parent: Some(*b"e457b5a2e4d86bd1"),
            name: "GET r".into(),
            kind: Kind::Server,
            start_ns: 1,
            end_ns: 2,
            attrs: vec![
                ("spur.route", Attr::Static("r")),
                ("spur.attempts", Attr::Int(2)),
            ],
            link: Some((*b"0000000000000000a3ce929d0e0e4736", *b"00f067aa0ba902b7")),
            error: true,
        };
        let bytes = encode("web", &[span]);
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let rs = &back.resource_spans[0];
        let service = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(service.key, "service.name");
        let s = &rs.scope_spans[0].spans[0];
        assert_eq!(
            s.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(s.parent_span_id.len(), 8);
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.attributes.len(), 2);
        assert_eq!(s.links.len(), 1);
        assert_eq!(
            s.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
    }
}
