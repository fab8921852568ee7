//! End-to-end with the real `spur` binary: bodies stream through the proxy in both
//! directions without being held in memory (1 GiB each way, with the proxy's resident
//! memory sampled during the transfer), and HTTP/2 trailers pass through both ways.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1024 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const CHUNKS: u64 = GIB / CHUNK as u64;
/// Sample the proxy's memory every this many bytes of a transfer (16 samples per GiB).
const SAMPLE_EVERY: u64 = 64 * 1024 * 1024;
/// The most the proxy's resident memory may grow while moving 1 GiB.
const MAX_GROWTH_KIB: u64 = 32 * 1024;
/// A transfer that takes longer than this fails.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

/// A backend (HTTP/1.1 and h2c) whose handler answers with any body, streamed.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// 1 GiB as a stream of 64 KiB frames made on the fly (one shared chunk, never 1 GiB held);
/// calls `at_sample` each time another `SAMPLE_EVERY` bytes have been produced.
fn gigabyte(at_sample: impl Fn() + Send + Sync + 'static) -> Body {
    let chunk = Bytes::from(vec![0xA5u8; CHUNK]);
    let frames = stream::iter((0..CHUNKS).map(move |i| {
        if (i * CHUNK as u64) % SAMPLE_EVERY == 0 {
            at_sample();
        }
        Ok::<_, Infallible>(Frame::data(chunk.clone()))
    }));
    StreamBody::new(frames).boxed()
}

fn text(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

fn spur_config(backend: SocketAddr, protocol: &str) -> String {
    format!(
        r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{backend}"], protocol: {protocol} }}
"#
    )
}

/// A fresh HTTP/1.1 connection to `addr`.
async fn h1_conn<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.expect("connect to spur");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    sender
}

/// Reads the proxy's resident memory while transfers run.
struct MemoryWatch {
    spur: Arc<SpurProcess>,
    baseline_kib: u64,
    samples: Mutex<Vec<u64>>,
}

impl MemoryWatch {
    fn new(spur: Arc<SpurProcess>) -> Arc<MemoryWatch> {
        let baseline_kib = spur.rss_kib();
        assert!(baseline_kib > 0, "can read the proxy's RSS");
        Arc::new(MemoryWatch {
            spur,
            baseline_kib,
            samples: Mutex::new(Vec::new()),
        })
    }

    fn sample(&self) {
        self.samples.lock().unwrap().push(self.spur.rss_kib());
    }

    /// Asserts that enough samples were taken and none grew past the bound.
    fn check(&self, what: &str) {
        self.sample();
        let samples = self.samples.lock().unwrap();
        assert!(
            samples.len() as u64 > GIB / SAMPLE_EVERY,
            "{what}: every milestone sampled: {samples:?}"
        );
        let peak = samples.iter().copied().max().unwrap();
        eprintln!(
            "{what}: RSS baseline {} KiB, peak {peak} KiB, samples {samples:?}",
            self.baseline_kib
        );
        assert!(
            peak.saturating_sub(self.baseline_kib) < MAX_GROWTH_KIB,
            "{what}: proxy RSS grew from {} KiB to {peak} KiB (bound {MAX_GROWTH_KIB} KiB): {samples:?}",
            self.baseline_kib
        );
    }
}

/// The access-log line (JSON) the proxy wrote for `path`, waited for with a deadline.
async fn access_log(spur: &SpurProcess, path: &str) -> serde_json::Value {
    let find = || {
        spur.stderr_lines
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["target"] == "spur::access" && v["path"] == path).then_some(v)
            })
    };
    assert!(
        eventually(STEP, || async { find().is_some() }).await,
        "an access log line for {path}"
    );
    find().unwrap()
}

/// One small exchange first, so that the baseline includes the pools and buffers every
/// request needs anyway.
async fn warm_up(addr: SocketAddr) {
    let a = tokio::time::timeout(STEP, get(addr, "/warmup", &[]))
        .await
        .expect("warm-up in time");
    assert_eq!(a.status, 200, "warm-up: {}", a.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_upload_streams_through_in_bounded_memory() {
    // The backend counts the body as it streams in, and answers the count.
    let backend = backend(|req: Request<Incoming>| async move {
        let mut body = req.into_body();
        let mut n: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(e) => {
                    return Response::builder()
                        .status(500)
                        .body(Full::new(Bytes::from(e.to_string())))
                        .unwrap()
                }
            }
        }
        Response::new(Full::new(Bytes::from(n.to_string())))
    })
    .await;
    let spur = Arc::new(spawn_spur(&spur_config(backend.addr, "http1"), 1));
    let web = spur.listeners["web"];
    warm_up(web).await;
    let watch = MemoryWatch::new(spur.clone());

    let started = Instant::now();
    let sampler = watch.clone();
    let answer = tokio::time::timeout(TRANSFER_DEADLINE, async {
        let mut sender = h1_conn(web).await;
        let req = Request::post(format!("http://{web}/upload"))
            .header("host", "app")
            .body(gigabyte(move || sampler.sample()))
            .unwrap();
        let resp = sender.send_request(req).await.expect("upload answered");
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("answer body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
    .await
    .unwrap_or_else(|_| panic!("1 GiB upload did not finish in {TRANSFER_DEADLINE:?}"));
    let took = started.elapsed();
    eprintln!(
        "upload: 1 GiB in {took:?} ({:.0} MiB/s)",
        1024.0 / took.as_secs_f64()
    );

    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(
        answer.1,
        GIB.to_string(),
        "the backend received exactly 1 GiB"
    );
    watch.check("upload");
    let log = access_log(&spur, "/upload").await;
    assert_eq!(
        log["bytes_received"], GIB,
        "access log counts the request body: {log}"
    );
    assert_eq!(log["status"], 200, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_download_streams_through_in_bounded_memory() {
    let backend = server(|req: Request<Incoming>| async move {
        if req.uri().path() != "/download" {
            return Response::new(text("ok"));
        }
        Response::builder()
            .header("content-length", GIB)
            .body(gigabyte(|| {}))
            .unwrap()
    })
    .await;
    let spur = Arc::new(spawn_spur(&spur_config(backend.addr, "http1"), 1));
    let web = spur.listeners["web"];
    warm_up(web).await;
    let watch = MemoryWatch::new(spur.clone());

    let started = Instant::now();
    let received = tokio::time::timeout(TRANSFER_DEADLINE, async {
        let mut sender = h1_conn(web).await;
        let req = Request::get(format!("http://{web}/download"))
            .header("host", "app")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("download answered");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap()),
            Some(GIB.to_string().as_str())
        );
        let mut body = resp.into_body();
        let mut n: u64 = 0;
        let mut next_sample = 0;
        while let Some(frame) = body.frame().await {
            n += frame
                .expect("body streams without error")
                .data_ref()
                .map_or(0, |d| d.len() as u64);
            if n >= next_sample {
                watch.sample();
                next_sample += SAMPLE_EVERY;
            }
        }
        n
    })
    .await
    .unwrap_or_else(|_| panic!("1 GiB download did not finish in {TRANSFER_DEADLINE:?}"));
    let took = started.elapsed();
    eprintln!(
        "download: 1 GiB in {took:?} ({:.0} MiB/s)",
        1024.0 / took.as_secs_f64()
    );

    assert_eq!(received, GIB, "the client received exactly 1 GiB");
    watch.check("download");
    let log = access_log(&spur, "/download").await;
    assert_eq!(
        log["bytes_sent"], GIB,
        "access log counts the response body: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trailers_pass_through_both_ways() {
    // The backend reads the request with its trailers, then answers a body in two frames
    // followed by trailers of its own (one of them echoing the client's).
    let backend = server(|req: Request<Incoming>| async move {
        let version = req.version();
        let got = req.into_body().collect().await.expect("request body");
        let client_trailer = got
            .trailers()
            .and_then(|t| t.get("x-client-checksum"))
            .cloned();
        let body_len = got.to_bytes().len();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
        trailers.insert(
            "x-backend-version",
            HeaderValue::from_str(&format!("{version:?}")).unwrap(),
        );
        trailers.insert("x-request-bytes", HeaderValue::from(body_len));
        if let Some(v) = client_trailer {
            trailers.insert("x-echo-client-checksum", v);
        }
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"part one, "))),
            Ok(Frame::data(Bytes::from_static(b"part two"))),
            Ok(Frame::trailers(trailers)),
        ];
        Response::new(StreamBody::new(stream::iter(frames)).boxed())
    })
    .await;
    let spur = spawn_spur(&spur_config(backend.addr, "http2"), 1);
    let web = spur.listeners["web"];

    let (status, version, data, trailers) = tokio::time::timeout(STEP, async {
        let tcp = TcpStream::connect(web).await.expect("connect to spur");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake with spur");
        tokio::spawn(conn);
        let mut req_trailers = HeaderMap::new();
        req_trailers.insert("x-client-checksum", HeaderValue::from_static("c-42"));
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"backend"))),
            Ok(Frame::trailers(req_trailers)),
        ];
        let req = Request::post(format!("http://{web}/trailers"))
            .header("te", "trailers")
            .body(StreamBody::new(stream::iter(frames)))
            .unwrap();
        let resp = sender.send_request(req).await.expect("answered");
        let (status, version) = (resp.status(), resp.version());
        let got = resp.into_body().collect().await.expect("response body");
        let trailers = got.trailers().cloned();
        (status, version, got.to_bytes(), trailers)
    })
    .await
    .expect("h2 exchange in time");

    assert_eq!(status, 200);
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(data, Bytes::from_static(b"part one, part two"));
    let trailers = trailers.expect("the response trailers reach the client");
    let t = |name: &str| trailers.get(name).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(t("x-checksum").as_deref(), Some("abc123"), "{trailers:?}");
    assert_eq!(
        t("x-backend-version").as_deref(),
        Some("HTTP/2.0"),
        "the cluster speaks h2 upstream"
    );
    assert_eq!(
        t("x-request-bytes").as_deref(),
        Some("13"),
        "request body intact"
    );
    assert_eq!(
        t("x-echo-client-checksum").as_deref(),
        Some("c-42"),
        "request trailers reach the backend"
    );
}
