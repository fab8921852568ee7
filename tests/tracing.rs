//! End-to-end: traces that export (issue 15, items 2 and 3). An OTLP receiver (HTTP/protobuf,
//! decoded with `opentelemetry-proto`) gets the spans of one request through two proxies
//! with one retry; the collector going down under load fails no request and the drops are
//! counted; without `tracing`, a caller's `traceparent` reaches the app byte-identical; the
//! duration histogram carries the trace ID as an OpenMetrics exemplar.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const STEP: Duration = Duration::from_secs(10);

/// A received span and the `service.name` of its batch.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    span: Span,
}

/// An OTLP/HTTP receiver on 127.0.0.1 that keeps every span it decodes.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receiver_on(addr: SocketAddr) -> Receiver {
    let tcp = TcpListener::bind(addr).await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
    let kept = spans.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let kept = kept.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).expect("OTLP");
                        for rs in export.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    Value::StringValue(s) => Some(s.clone()),
                                    _ => None,
                                })
                                .unwrap_or_default();
                            for ss in rs.scope_spans {
                                for span in ss.spans {
                                    kept.lock().unwrap().push(Got {
                                        service: service.clone(),
                                        span,
                                    });
                                }
                            }
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Receiver { addr, spans, task }
}

impl Receiver {
    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    let kv = s.attributes.iter().find(|kv| kv.key == key)?;
    Some(match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(v) => v.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

/// An app that answers 503 to its first request and 200 after, echoing `traceparent`.
async fn flaky_app() -> (Backend, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let app = backend(move |req: Request<Incoming>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        let tp = req
            .headers()
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        async move {
            let status = if n == 0 { 503 } else { 200 };
            Response::builder()
                .status(status)
                .header("x-app-traceparent", tp)
                .body(Full::new(Bytes::from_static(b"app")))
                .unwrap()
        }
    })
    .await;
    (app, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_two_proxies_with_a_retry_is_one_trace() {
    let rx = receiver_on("127.0.0.1:0".parse().unwrap()).await;
    let (app, hits) = flaky_app().await;
    let shadow = named_backend("shadow").await;
    let b = start_proxy(&format!(
        r#"
node: proxy-b
admin: {{ listen: "127.0.0.1:0" }}
tracing: {{ otlp_endpoint: "http://{rx}/v1/traces", service_name: hop-b }}
listeners:
  - name: inbound
    listen: 127.0.0.1:0
    routes:
      - name: app
        cluster: app
        retry: {{ attempts: 2, retry_on: ["503"], backoff: {{ base: 1ms, max: 1ms }} }}
        mirror: {{ cluster: shadow }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: shadow, endpoints: ["{shadow}"] }}
"#,
        rx = rx.addr,
        app = app.addr,
        shadow = shadow.addr,
    ))
    .await;
    let a = start_proxy(&format!(
        r#"
node: hop-a
admin: {{ listen: "127.0.0.1:0" }}
tracing: {{ otlp_endpoint: "http://{rx}/v1/traces" }}
flags:
  beta: {{ enabled: true, rules: [{{ header: x-group, values: [beta] }}] }}
listeners:
  - name: outbound
    listen: 127.0.0.1:0
    routes:
      - name: to-b
        split: [{{ cluster: b, weight: 1 }}]
clusters:
  - {{ name: b, endpoints: ["{b}"] }}
"#,
        rx = rx.addr,
        b = b.listener_addr("inbound").unwrap(),
    ))
    .await;
    let resp = get(
        a.listener_addr("outbound").unwrap(),
        "/orders",
        &[("x-group", "beta")],
    )
    .await;
    assert_eq!(resp.status, 200, "the retry answered");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Both hops' spans, and the mirror's.
    assert!(
        eventually(STEP, || async { rx.spans().len() >= 6 }).await,
        "spans received: {:#?}",
        rx.spans()
    );
    let got = rx.spans();
    let mirror: Vec<&Got> = got
        .iter()
        .filter(|g| attr(&g.span, "spur.mirror").is_some())
        .collect();
    let main: Vec<&Got> = got
        .iter()
        .filter(|g| attr(&g.span, "spur.mirror").is_none())
        .collect();
    assert_eq!(main.len(), 5, "{main:#?}");
    let trace = &main[0].span.trace_id;
    assert!(main.iter().all(|g| &g.span.trace_id == trace), "one trace");
    let find = |service: &str, kind: SpanKind| -> Vec<&Span> {
        main.iter()
            .filter(|g| g.service == service && g.span.kind == kind as i32)
            .map(|g| &g.span)
            .collect()
    };
    let a_server = find("hop-a", SpanKind::Server);
    let a_client = find("hop-a", SpanKind::Client);
    let b_server = find("hop-b", SpanKind::Server);
    let mut b_client = find("hop-b", SpanKind::Client);
    assert_eq!(
        (
            a_server.len(),
            a_client.len(),
            b_server.len(),
            b_client.len()
        ),
        (1, 1, 1, 2),
        "{main:#?}"
    );
    let (a_server, a_client, b_server) = (a_server[0], a_client[0], b_server[0]);
    // The parent links: A's server span is the root; each try hangs under its hop's server
    // span; B's server span under A's try.
    assert!(
        a_server.parent_span_id.is_empty(),
        "a new trace starts at A"
    );
    assert_eq!(a_client.parent_span_id, a_server.span_id);
    assert_eq!(b_server.parent_span_id, a_client.span_id);
    b_client.sort_by_key(|s| attr(s, "spur.attempt"));
    for (i, c) in b_client.iter().enumerate() {
        assert_eq!(c.parent_span_id, b_server.span_id);
        assert_eq!(attr(c, "spur.attempt"), Some((i + 1).to_string()));
        assert_eq!(attr(c, "spur.cluster").as_deref(), Some("app"));
        assert_eq!(attr(c, "spur.endpoint"), Some(app.addr.to_string()));
    }
    assert_eq!(
        attr(b_client[0], "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(
        attr(b_client[1], "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(b_client[0].start_time_unix_nano <= b_client[1].start_time_unix_nano);
    // The app's parent is the try that reached it.
    let tp = resp.header("x-app-traceparent").unwrap();
    assert_eq!(
        tp,
        format!("00-{}-{}-01", hex(trace), hex(&b_client[1].span_id)),
        "the app hangs under B's second try"
    );
    // Attributes: route, cluster, endpoint, flags, split side, status.
    assert_eq!(attr(a_server, "spur.route").as_deref(), Some("to-b"));
    assert_eq!(attr(a_server, "spur.cluster").as_deref(), Some("b"));
    assert_eq!(attr(a_server, "spur.split").as_deref(), Some("b"));
    assert_eq!(attr(a_server, "spur.flags").as_deref(), Some("beta"));
    assert_eq!(
        attr(a_server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(b_server, "spur.route").as_deref(), Some("app"));
    assert_eq!(attr(b_server, "spur.attempts").as_deref(), Some("2"));
    assert_eq!(attr(b_server, "spur.endpoint"), Some(app.addr.to_string()));
    assert!(a_server.start_time_unix_nano <= b_server.start_time_unix_nano);
    assert!(b_server.end_time_unix_nano <= a_server.end_time_unix_nano);
    // The mirrored copy: a trace of its own, linked to B's server span.
    assert!(
        eventually(STEP, || async {
            rx.spans()
                .iter()
                .any(|g| attr(&g.span, "spur.mirror").is_some())
        })
        .await
    );
    let got = rx.spans();
    let m = &got
        .iter()
        .find(|g| attr(&g.span, "spur.mirror").is_some())
        .unwrap()
        .span;
    let _ = mirror;
    assert_ne!(&m.trace_id, trace);
    assert_eq!(m.links.len(), 1);
    assert_eq!(
        (&m.links[0].trace_id, &m.links[0].span_id),
        (trace, &b_server.span_id)
    );

    // The exemplar on A's request duration is this trace, for an OpenMetrics scraper only.
    let admin = a.admin_addr().unwrap();
    let open = get(
        admin,
        "/metrics",
        &[("accept", "application/openmetrics-text; version=1.0.0")],
    )
    .await;
    let wanted = format!("# {{trace_id=\"{}\"}}", hex(trace));
    let line = open
        .text()
        .lines()
        .find(|l| l.starts_with("spur_request_duration_seconds_bucket") && l.contains(&wanted))
        .map(str::to_string);
    assert!(line.is_some(), "no exemplar {wanted} in:\n{}", open.text());
    let plain = get(admin, "/metrics", &[]).await;
    assert!(
        !plain.text().contains("trace_id="),
        "no exemplars in the plain text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_is_read_and_written_in_the_form_it_came() {
    let rx = receiver_on("127.0.0.1:0".parse().unwrap()).await;
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "tracing: {{ otlp_endpoint: \"http://{}/v1/traces\", propagation: [w3c, b3] }}\n\
         listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        rx.addr, app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let single = get(
        web,
        "/",
        &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")],
    )
    .await;
    let b3 = single.header("x-echo-b3").unwrap();
    assert!(b3.starts_with("80f198ee56343ba864fe8b2a57d3eff7-"), "{b3}");
    assert!(
        !b3.contains("-e457b5a2e4d86bd1-"),
        "a span of this proxy: {b3}"
    );
    let tp = single.header("x-echo-traceparent").unwrap();
    assert!(
        tp.starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-"),
        "{tp}"
    );
    let multi = get(
        web,
        "/",
        &[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(
        multi.header("x-echo-x-b3-traceid"),
        Some("0000000000000000a3ce929d0e0e4736")
    );
    assert_eq!(multi.header("x-echo-x-b3-sampled"), Some("1"));
    assert_ne!(multi.header("x-echo-x-b3-spanid"), Some("00f067aa0ba902b7"));
    assert_eq!(multi.header("x-echo-b3"), None);
    // The server spans hang under the callers' B3 spans.
    assert!(eventually(STEP, || async { rx.spans().len() >= 4 }).await);
    let parents: Vec<String> = rx
        .spans()
        .iter()
        .filter(|g| g.span.kind == SpanKind::Server as i32)
        .map(|g| hex(&g.span.parent_span_id))
        .collect();
    assert!(
        parents.contains(&"e457b5a2e4d86bd1".to_string()),
        "{parents:?}"
    );
    assert!(
        parents.contains(&"00f067aa0ba902b7".to_string()),
        "{parents:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracing_traceparent_reaches_the_app_byte_identical() {
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    for tp in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        // A later version, with a field this proxy does not know.
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-future",
    ] {
        let a = get(
            web,
            "/",
            &[("traceparent", tp), ("tracestate", "vendor=x,other=y")],
        )
        .await;
        assert_eq!(a.header("x-echo-traceparent"), Some(tp));
        assert_eq!(a.header("x-echo-tracestate"), Some("vendor=x,other=y"));
    }
    // A new trace starts unsampled: Spur exports nothing, so it forces no one to record.
    let b = get(web, "/", &[]).await;
    let tp = b.header("x-echo-traceparent").unwrap();
    assert!(
        tp.starts_with("00-") && tp.ends_with("-00") && tp.len() == 55,
        "{tp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_down_under_load_fails_no_request_and_drops_are_counted() {
    let rx = receiver_on("127.0.0.1:0".parse().unwrap()).await;
    let collector = rx.addr;
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "admin: {{ listen: \"127.0.0.1:0\" }}\n\
         tracing: {{ otlp_endpoint: \"http://{collector}/v1/traces\" }}\n\
         listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    assert_eq!(get(web, "/", &[]).await.status, 200);
    assert!(eventually(STEP, || async { !rx.spans().is_empty() }).await);
    drop(rx);
    // 10 s of load from 4 clients with no collector.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            let client = h1_client();
            while std::time::Instant::now() < until {
                let req = Request::get(format!("http://{web}/"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match tokio::time::timeout(STEP, client.request(req)).await {
                    Ok(Ok(r)) if r.status() == StatusCode::OK => {
                        let _ = r.into_body().collect().await;
                        ok += 1
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed += f;
    }
    assert_eq!(failed, 0, "{ok} requests answered, {failed} failed");
    assert!(ok > 100, "load was made: {ok} requests");
    let dropped = metric(admin, "spur_trace_spans_dropped_total", &[]).await;
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_trace_spans_dropped_total", &[]).await >= Some(1.0)
        })
        .await,
        "drops counted: {dropped:?}"
    );
    // The collector comes back on its address: spans arrive again.
    let back = receiver_on(collector).await;
    assert_eq!(get(web, "/", &[]).await.status, 200);
    assert!(
        eventually(STEP, || async { !back.spans().is_empty() }).await,
        "export resumes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_decides_new_traces_and_a_callers_decision_is_kept() {
    let rx = receiver_on("127.0.0.1:0".parse().unwrap()).await;
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        "tracing: {{ otlp_endpoint: \"http://{}/v1/traces\", sampling: 0 }}\n\
         listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", cluster: app }}\n\
         clusters:\n  - {{ name: app, endpoints: [\"{}\"] }}\n",
        rx.addr, app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    // A new trace, not sampled at a ratio of 0: no span, and the app is told so.
    let new = get(web, "/new", &[]).await;
    let tp = new.header("x-echo-traceparent").unwrap();
    assert!(tp.ends_with("-00"), "{tp}");
    // The caller sampled its trace: this hop records its span, under the caller's.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let kept = get(web, "/kept", &[("traceparent", caller)]).await;
    let tp = kept.header("x-echo-traceparent").unwrap();
    assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"));
    assert!(!tp.contains("00f067aa0ba902b7"), "this hop's span: {tp}");
    // Spans leave in the order they were queued: a span of /new would have come first.
    assert!(eventually(STEP, || async { rx.spans().len() >= 2 }).await);
    let got = rx.spans();
    assert_eq!(
        got.len(),
        2,
        "server and client span of /kept only: {got:#?}"
    );
    assert!(got
        .iter()
        .all(|g| hex(&g.span.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736"));
}
