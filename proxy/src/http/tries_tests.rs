//! The request path against a fake upstream, on tokio's paused clock: tries, retries,
//! timeouts, the breaker, the budget and the cluster's slots, step by step. Time only moves
//! when every task waits, so a 2 s timeout takes no real time and is exact.

use crate::adapters::idle::Activity;
use crate::adapters::listener::ConnGuard;
use crate::body::{BoxError, InBody};
use crate::http::{handle_any, ConnCtx};
use crate::snapshot::Snapshot;
use crate::upstream::{ReqBody, UpstreamError};
use crate::Proxy;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// One try as the fake upstream saw it.
#[derive(Clone, Debug)]
struct Hit {
    addr: SocketAddr,
    method: Method,
    attempt: Option<String>,
}

type Hits = Arc<Mutex<Vec<Hit>>>;

struct World {
    proxy: Proxy,
    ctx: ConnCtx,
    hits: Hits,
}

fn text(s: &'static str) -> InBody {
    InBody::Test(
        Full::new(Bytes::from_static(s.as_bytes()))
            .map_err(|e| -> BoxError { match e {} })
            .boxed_unsync(),
    )
}

fn answer(status: u16) -> Result<Response<InBody>, UpstreamError> {
    let mut r = Response::new(text("from upstream"));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(r)
}

/// A world whose every cluster sends to `upstream(hit_number, addr, method)`.
fn world<F, Fut>(yaml: &str, upstream: F) -> World
where
    F: Fn(usize, SocketAddr, Request<ReqBody>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<InBody>, UpstreamError>> + Send + 'static,
{
    let proxy = Proxy::idle().unwrap();
    let hits: Hits = Arc::default();
    let seen = hits.clone();
    let fake = move |addr: SocketAddr, req: Request<ReqBody>| {
        let n = {
            let mut h = seen.lock().unwrap();
            h.push(Hit {
                addr,
                method: req.method().clone(),
                attempt: req
                    .headers()
                    .get("x-spur-attempt")
                    .map(|v| v.to_str().unwrap().to_string()),
            });
            h.len()
        };
        upstream(n, addr, req)
    };
    *proxy.shared.registry.fake.lock().unwrap() = Some(Arc::new(fake));
    let cfg = spur_config::load(yaml, Some("t.yaml")).expect("valid config");
    let shared = &proxy.shared;
    let snap = Snapshot::compile(Arc::new(cfg), 1, &shared.registry, &shared.metrics, None)
        .expect("compiles");
    shared.snapshot.store(Arc::new(snap));
    let (drain_tx, _) = tokio::sync::mpsc::channel(1);
    let ctx = ConnCtx {
        shared: shared.clone(),
        listener: "web".into(),
        peer: "192.0.2.1:40000".parse().unwrap(),
        forwarded: Default::default(),
        original_dst: None,
        guard: Arc::new(ConnGuard::new(
            Arc::new(AtomicUsize::new(0)),
            Default::default(),
            drain_tx,
        )),
        activity: Activity::new(),
        idle_timeout: Duration::from_secs(60),
        drain: tokio::sync::watch::channel(false).1,
        peer_identity: None,
        tls: None,
    };
    World { proxy, ctx, hits }
}

impl World {
    async fn send(&self, method: &str, path: &str) -> (StatusCode, Option<String>) {
        self.send_body(method, path, text("")).await
    }

    async fn send_body(
        &self,
        method: &str,
        path: &str,
        body: InBody,
    ) -> (StatusCode, Option<String>) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "svc")
            .body(body)
            .unwrap();
        let resp = handle_any(&self.ctx, req).await;
        let status = resp.status();
        let error = resp
            .headers()
            .get("x-spur-error")
            .map(|v| v.to_str().unwrap().to_string());
        let _ = resp.into_body().collect().await;
        (status, error)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn metrics(&self) -> String {
        self.proxy.shared.metrics.encode()
    }
}

const THREE: &str = r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: r
        match: { path_prefix: / }
        cluster: c
        RETRY
clusters:
  - name: c
    lb: ewma
    endpoints: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]
    BREAKER
"#;

fn config(retry: &str, breaker: &str) -> String {
    THREE.replace("RETRY", retry).replace("BREAKER", breaker)
}

#[tokio::test(start_paused = true)]
async fn a_retry_never_goes_back_to_an_endpoint_that_failed() {
    // Every endpoint fails: four tries, four different endpoints.
    let w = world(
        &config(
            "retry: { attempts: 4, retry_on: ['503'], backoff: { base: 1ms, max: 1ms }, budget: { ratio: 1.0, min_per_sec: 100 } }",
            "",
        ),
        |_, _, _| async { answer(503) },
    );
    for _ in 0..20 {
        let before = w.hits().len();
        let (status, _) = w.send("GET", "/").await;
        assert_eq!(status, 503);
        let tries: Vec<Hit> = w.hits()[before..].to_vec();
        assert_eq!(tries.len(), 4);
        let mut addrs: Vec<SocketAddr> = tries.iter().map(|h| h.addr).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 4, "a retry reused an endpoint: {tries:?}");
        let attempts: Vec<Option<String>> = tries.iter().map(|h| h.attempt.clone()).collect();
        assert_eq!(
            attempts,
            [None, Some("2".into()), Some("3".into()), Some("4".into())]
        );
    }
    assert!(w
        .metrics()
        .contains(r#"spur_retries_total{cluster="c",reason="503"} 60"#));
}

#[tokio::test(start_paused = true)]
async fn a_slow_try_is_cut_at_the_per_try_timeout_and_retried() {
    let w = world(
        &config(
            "retry: { attempts: 2, per_try_timeout: 100ms, retry_on: [timeout], backoff: { base: 10ms, max: 10ms } }",
            "",
        ),
        |n, _, _| async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            answer(200)
        },
    );
    let start = Instant::now();
    let (status, _) = w.send("GET", "/").await;
    assert_eq!(status, 200);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took <= Duration::from_millis(111),
        "{took:?}"
    );
    assert_eq!(w.hits().len(), 2);
    assert!(w
        .metrics()
        .contains(r#"spur_retries_total{cluster="c",reason="timeout"} 1"#));
}

#[tokio::test(start_paused = true)]
async fn the_route_timeout_bounds_every_try_and_answers_504() {
    let w = world(
        "
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - match: { path_prefix: / }
        cluster: c
        timeout: 250ms
        retry: { attempts: 5, per_try_timeout: 100ms, retry_on: [timeout], backoff: { base: 1ms, max: 1ms } }
clusters:
  - { name: c, endpoints: ['10.0.0.1:80', '10.0.0.2:80', '10.0.0.3:80'] }
",
        |_, _, _| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            answer(200)
        },
    );
    let start = Instant::now();
    let (status, error) = w.send("GET", "/").await;
    assert_eq!(
        (status, error.as_deref()),
        (StatusCode::GATEWAY_TIMEOUT, Some("timeout"))
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(260),
        "{took:?}"
    );
    assert_eq!(w.hits().len(), 3, "100 + 100 + the last 50 ms");
}

#[tokio::test(start_paused = true)]
async fn a_post_reset_after_it_was_sent_is_not_sent_again_but_a_get_is() {
    let w = world(
        &config(
            "retry: { attempts: 3, retry_on: [reset], backoff: { base: 1ms, max: 1ms } }",
            "",
        ),
        |_, _, _| async { Err(UpstreamError::sent("connection reset after the request")) },
    );
    let (status, error) = w.send("POST", "/order").await;
    assert_eq!(
        (status, error.as_deref()),
        (StatusCode::BAD_GATEWAY, Some("upstream_reset"))
    );
    assert_eq!(w.hits().len(), 1, "an order is placed once");
    w.hits.lock().unwrap().clear();
    let (status, _) = w.send("GET", "/order").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(w.hits().len(), 3);
    assert!(w.hits().iter().all(|h| h.method == Method::GET));
}

#[tokio::test(start_paused = true)]
async fn a_request_never_written_may_be_sent_again_whatever_its_method() {
    let w = world(
        &config(
            "retry: { attempts: 3, retry_on: [reset-before-request], backoff: { base: 1ms, max: 1ms } }",
            "",
        ),
        |n, _, _| async move {
            if n == 1 {
                Err(UpstreamError::not_sent("closed before the request was written"))
            } else {
                answer(201)
            }
        },
    );
    assert_eq!(w.send("POST", "/order").await.0, StatusCode::CREATED);
    assert_eq!(w.hits().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_and_a_probe_restores() {
    let down = Arc::new(Mutex::new(true));
    let state = down.clone();
    let w = world(
        // Round robin: the failing endpoint keeps its turn (EWMA would avoid it at once).
        &config("", "circuit_breaker: { consecutive_failures: 3, ejection_time: 10s, max_ejection_percent: 100 }")
            .replace("lb: ewma", "lb: round_robin"),
        move |_, addr, _| {
            let down = *state.lock().unwrap();
            async move {
                if down && addr.to_string() == "10.0.0.1:80" {
                    Err(UpstreamError::connect("refused"))
                } else {
                    answer(200)
                }
            }
        },
    );
    // Requests until 10.0.0.1 has failed three times in a row.
    let bad = |w: &World| {
        w.hits()
            .iter()
            .filter(|h| h.addr.to_string() == "10.0.0.1:80")
            .count()
    };
    for _ in 0..500 {
        if bad(&w) >= 3 {
            break;
        }
        w.send("GET", "/").await;
    }
    assert_eq!(bad(&w), 3);
    assert!(w
        .metrics()
        .contains(r#"spur_endpoint_ejected{cluster="c",endpoint="10.0.0.1:80"} 1"#));
    // Ejected: no request reaches it for the ejection time.
    for _ in 0..200 {
        assert_eq!(w.send("GET", "/").await.0, 200);
    }
    assert_eq!(bad(&w), 3);
    // It recovers; after the ejection time one probe closes the breaker.
    *down.lock().unwrap() = false;
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..400 {
        w.send("GET", "/").await;
    }
    assert!(bad(&w) > 3 + 40, "back in rotation: {} tries", bad(&w) - 3);
    assert!(w
        .metrics()
        .contains(r#"spur_endpoint_ejected{cluster="c",endpoint="10.0.0.1:80"} 0"#));
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_retries_when_everything_fails() {
    let w = world(
        &config(
            "retry: { attempts: 3, retry_on: ['503'], backoff: { base: 1ms, max: 1ms }, budget: { ratio: 0.1, min_per_sec: 1 } }",
            "",
        ),
        |_, _, _| async { answer(503) },
    );
    for _ in 0..100 {
        w.send("GET", "/").await;
    }
    // 100 requests in well under a second: 10% of them plus one a second.
    let retries = w.hits().len() - 100;
    assert!((10..=11).contains(&retries), "{retries} retries");
    assert!(w
        .metrics()
        .contains(r#"spur_retry_budget_exhausted_total{cluster="c"}"#));
}

#[tokio::test(start_paused = true)]
async fn over_max_requests_the_next_request_fails_at_once() {
    let w = Arc::new(world(
        &config("", "circuit_breaker: { max_requests: 1 }"),
        |_, _, _| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            answer(200)
        },
    ));
    let first = {
        let w = w.clone();
        tokio::spawn(async move { w.send("GET", "/").await })
    };
    while w.hits().is_empty() {
        tokio::task::yield_now().await;
    }
    let start = Instant::now();
    let (status, error) = w.send("GET", "/").await;
    assert_eq!(
        (status, error.as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded"))
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "no wait at all");
    assert_eq!(first.await.unwrap().0, 200);
    assert!(w
        .metrics()
        .contains(r#"spur_circuit_open_total{cluster="c",reason="max_requests"} 1"#));
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_body_breaks_is_answered_400_and_no_endpoint_is_charged() {
    let w = world(
        &config(
            "",
            "circuit_breaker: { consecutive_failures: 2, max_ejection_percent: 100 }",
        ),
        |_, _, req: Request<ReqBody>| async move {
            // The upstream reads the body; the client's stream breaks; the exchange fails.
            let read = req.into_body().collect().await;
            match read {
                Ok(_) => answer(200),
                Err(e) => Err(UpstreamError::sent(e)),
            }
        },
    );
    for _ in 0..10 {
        let body = InBody::Test(
            Frames(
                [
                    Ok(http_body::Frame::data(Bytes::from_static(b"0123456789"))),
                    Err("the client went away mid-upload".into()),
                ]
                .into(),
            )
            .boxed_unsync(),
        );
        let (status, error) = w.send_body("POST", "/upload", body).await;
        assert_eq!(
            (status, error.as_deref()),
            (StatusCode::BAD_REQUEST, Some("bad_request"))
        );
    }
    let m = w.metrics();
    assert!(
        !m.contains("spur_endpoint_ejected{cluster=\"c\",endpoint=\"10.0.0.1:80\"} 1"),
        "{m}"
    );
    assert!(
        !m.contains("spur_upstream_requests_total"),
        "no try was charged: {m}"
    );
    assert!(
        m.contains(r#"spur_downstream_rejected_total{listener="web",reason="client_abort"} 10"#),
        "{m}"
    );
    // And the endpoints still serve.
    assert_eq!(w.send("GET", "/").await.0, 200);
}

/// A body that yields these frames, then ends.
struct Frames(std::collections::VecDeque<Result<http_body::Frame<Bytes>, BoxError>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::task::Poll::Ready(self.0.pop_front())
    }
}

/// A client body that sends one byte after each pause, then ends, or (`then_silent`)
/// sends nothing more.
struct Drip {
    pauses: std::collections::VecDeque<Duration>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    then_silent: bool,
}

impl http_body::Body for Drip {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        let this = &mut *self;
        if this.sleep.is_none() {
            match this.pauses.pop_front() {
                Some(p) => this.sleep = Some(Box::pin(tokio::time::sleep(p))),
                None if this.then_silent => return std::task::Poll::Pending,
                None => return std::task::Poll::Ready(None),
            }
        }
        std::task::ready!(this.sleep.as_mut().unwrap().as_mut().poll(cx));
        this.sleep = None;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"x")))))
    }
}

fn drip(pauses_ms: &[u64], then_silent: bool) -> InBody {
    InBody::Test(
        Drip {
            pauses: pauses_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            sleep: None,
            then_silent,
        }
        .boxed_unsync(),
    )
}

/// Issue 20 item 7: `body_timeout` bounds the time between two reads of the body, not the
/// body's whole time; a client that goes silent gets 408 and holds nothing after.
#[tokio::test(start_paused = true)]
async fn a_silent_body_is_cut_at_body_timeout_and_charged_to_nobody() {
    let yaml = r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    limits: { body_timeout: 2s }
    cluster: c
clusters:
  - name: c
    endpoints: ["10.0.0.1:80"]
    circuit_breaker: { consecutive_failures: 1, max_requests: 1, max_ejection_percent: 100 }
"#;
    let w = world(yaml, |_, _, req: Request<ReqBody>| async move {
        match req.into_body().collect().await {
            Ok(b) => {
                let mut r = Response::new(text("read"));
                *r.status_mut() = StatusCode::from_u16(200 + b.to_bytes().len() as u16).unwrap();
                Ok(r)
            }
            Err(e) => Err(UpstreamError::sent(e)),
        }
    });
    // Four bytes 1.5 s apart: 4.5 s in all, never 2 s without a byte.
    let start = Instant::now();
    let (status, _) = w
        .send_body("POST", "/", drip(&[0, 1500, 1500, 1500], false))
        .await;
    assert_eq!(status.as_u16(), 204, "all four bytes went through");
    assert_eq!(start.elapsed(), Duration::from_millis(4500));
    // Two bytes, then silence: cut 2 s after the last byte.
    let start = Instant::now();
    let silent = w.send_body("POST", "/", drip(&[0, 1500], true));
    let (status, error) = tokio::time::timeout(Duration::from_secs(60), silent)
        .await
        .expect("cut, not held for ever");
    assert_eq!(
        (status, error.as_deref()),
        (StatusCode::REQUEST_TIMEOUT, Some("body_timeout"))
    );
    assert_eq!(start.elapsed(), Duration::from_millis(3500));
    let m = w.metrics();
    assert!(
        m.contains(r#"spur_downstream_rejected_total{listener="web",reason="body_timeout"} 1"#),
        "{m}"
    );
    assert!(
        !m.contains(r#"spur_endpoint_ejected{cluster="c",endpoint="10.0.0.1:80"} 1"#),
        "{m}"
    );
    // Its slot (max_requests: 1) and the endpoint are free for the next client.
    assert_eq!(w.send("GET", "/").await.0.as_u16(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_silent_body_read_for_a_retry_is_cut_too() {
    let yaml = r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    limits: { body_timeout: 1s }
    routes:
      - { cluster: c, retry: { attempts: 2 } }
clusters:
  - name: c
    endpoints: ["10.0.0.1:80"]
"#;
    let w = world(yaml, |_, _, _| async { answer(200) });
    let start = Instant::now();
    let silent = w.send_body("POST", "/", drip(&[300], true));
    let (status, error) = tokio::time::timeout(Duration::from_secs(60), silent)
        .await
        .expect("cut, not held for ever");
    assert_eq!(
        (status, error.as_deref()),
        (StatusCode::REQUEST_TIMEOUT, Some("body_timeout"))
    );
    assert_eq!(start.elapsed(), Duration::from_millis(1300));
    assert!(w.hits().is_empty(), "nothing was sent upstream");
}

/// The request path's future is moved and initialised on every request: keep it small
/// (the rare paths — new connections, QUIC — are boxed).
#[tokio::test]
async fn the_request_future_stays_small() {
    let w = world(&config("", ""), |_, _, _| async { answer(200) });
    let req = Request::builder().uri("/").body(text("")).unwrap();
    let f = handle_any(&w.ctx, req);
    let size = std::mem::size_of_val(&f);
    eprintln!("handle_any's future: {size} bytes");
    assert!(size < 2048, "handle_any's future is {size} bytes");
}

#[tokio::test(start_paused = true)]
async fn making_a_connection_is_not_counted_as_the_endpoints_latency() {
    let w = world(
        "
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes: [{ match: { path_prefix: / }, cluster: c }]
clusters:
  - { name: c, endpoints: ['10.0.0.1:80'] }
",
        |_, _, _| async {
            // 90 ms to connect, then 10 ms to answer.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut r = answer(200)?;
            r.extensions_mut()
                .insert(crate::upstream::pool::Connecting(Duration::from_millis(90)));
            Ok(r)
        },
    );
    assert_eq!(w.send("GET", "/").await.0, 200);
    let snap = w.ctx.shared.snapshot.load_full();
    let ep = snap.clusters["c"].members.load().endpoints[0].clone();
    let ms = ep.ewma_ms();
    assert!((9.0..=11.0).contains(&ms), "latency estimate {ms} ms");
}

/// A connection's task holds its future for as long as the connection lives, idle or not:
/// 1,000 idle keep-alive connections cost 1,000 of them.
#[tokio::test]
async fn a_connections_future_stays_small() {
    let w = world(&config("", ""), |_, _, _| async { answer(200) });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let snap = w.ctx.shared.snapshot.load_full();
    let lst = snap.listeners.values().next().unwrap().clone();
    let (drain_tx, _) = tokio::sync::mpsc::channel(1);
    let guard = ConnGuard::new(Arc::new(AtomicUsize::new(0)), Default::default(), drain_tx);
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    let f = crate::adapters::listener::serve_http_conn(
        w.ctx.shared.clone(),
        lst,
        stream,
        "127.0.0.1:1".parse().unwrap(),
        None,
        shutdown,
        guard,
    );
    let size = std::mem::size_of_val(&f);
    eprintln!("serve_http_conn's future: {size} bytes");
    assert!(size < 3072, "serve_http_conn's future is {size} bytes");
}
