//! End-to-end: gRPC (tonic client and server, h2c) through a Spur listener whose cluster
//! speaks HTTP/2: unary calls, streams in both directions without buffering, and gRPC
//! status and trailers passing through unchanged.
//!
//! No protobuf: messages are raw bytes with a tiny codec, and the backend dispatches on the
//! method path by hand with `tonic::server::Grpc`.

mod common;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::server::{ServerStreamingService, StreamingService, UnaryService};
use tonic::{Code, Request, Response, Status, Streaming};

/// Every call and stream step must finish within this, so a proxy that buffers or stalls
/// fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

const UNARY: &str = "/spur.test.Echo/Unary";
const MISSING: &str = "/spur.test.Echo/Missing";
const CHAT: &str = "/spur.test.Echo/Chat";
const COUNT: &str = "/spur.test.Echo/Count";

// ---------------------------------------------------------------- codec: messages are bytes

#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// ---------------------------------------------------------------- the backend's methods

/// Echoes the request with a prefix, and reports in a response header the `te` header it
/// received (gRPC needs `te: trailers` end to end).
struct Unary;

impl UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = Ready<Result<Response<Bytes>, Status>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let te = req.metadata().get("te").cloned();
        let has_request_id = req.metadata().get("x-request-id").is_some();
        let mut body = b"echo: ".to_vec();
        body.extend_from_slice(req.get_ref());
        let mut resp = Response::new(Bytes::from(body));
        if let Some(te) = te {
            resp.metadata_mut().insert("x-saw-te", te);
        }
        resp.metadata_mut().insert(
            "x-saw-request-id",
            MetadataValue::from_static(if has_request_id { "yes" } else { "no" }),
        );
        ready(Ok(resp))
    }
}

/// Always fails with NOT_FOUND (a trailers-only response).
struct Missing;

impl UnaryService<Bytes> for Missing {
    type Response = Bytes;
    type Future = Ready<Result<Response<Bytes>, Status>>;
    fn call(&mut self, _req: Request<Bytes>) -> Self::Future {
        ready(Err(Status::not_found("x")))
    }
}

type MsgStream = ReceiverStream<Result<Bytes, Status>>;

/// Bidirectional: answers each message as it arrives, then ends with OK.
struct Chat;

impl StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = MsgStream;
    type Future = Ready<Result<Response<MsgStream>, Status>>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = incoming.message().await {
                let mut out = b"echo: ".to_vec();
                out.extend_from_slice(&msg);
                if tx.send(Ok(Bytes::from(out))).await.is_err() {
                    return;
                }
            }
        });
        ready(Ok(Response::new(ReceiverStream::new(rx))))
    }
}

/// Server streaming: the request is a number N; answers `item-0` .. `item-{N-1}`, then ends
/// with RESOURCE_EXHAUSTED carrying custom trailing metadata (real trailers after data).
struct Count;

impl ServerStreamingService<Bytes> for Count {
    type Response = Bytes;
    type ResponseStream = MsgStream;
    type Future = Ready<Result<Response<MsgStream>, Status>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let n: usize = match std::str::from_utf8(req.get_ref())
            .ok()
            .and_then(|s| s.parse().ok())
        {
            Some(n) => n,
            None => return ready(Err(Status::invalid_argument("want a number"))),
        };
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(Ok(Bytes::from(format!("item-{i}")))).await.is_err() {
                    return;
                }
            }
            let mut end = Status::resource_exhausted(format!("quota: {n} items"));
            end.metadata_mut()
                .insert("x-items-sent", n.to_string().parse().unwrap());
            let _ = tx.send(Err(end)).await;
        });
        ready(Ok(Response::new(ReceiverStream::new(rx))))
    }
}

async fn dispatch(
    req: http::Request<Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(Raw);
    let resp = match req.uri().path() {
        UNARY => grpc.unary(Unary, req).await,
        MISSING => grpc.unary(Missing, req).await,
        CHAT => grpc.streaming(Chat, req).await,
        COUNT => grpc.server_streaming(Count, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    };
    Ok(resp)
}

/// A gRPC server (HTTP/2 prior knowledge) on 127.0.0.1.
struct GrpcBackend {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn grpc_backend() -> GrpcBackend {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(dispatch))
                    .await;
            });
        }
    });
    GrpcBackend { addr, task }
}

// ---------------------------------------------------------------- set-up

struct Setup {
    _backend: GrpcBackend,
    proxy: spur_proxy::Proxy,
    client: tonic::client::Grpc<tonic::transport::Channel>,
}

async fn setup() -> Setup {
    let backend = grpc_backend().await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: grpc
    listen: 127.0.0.1:0
    routes:
      - name: echo
        match: {{ path_prefix: /spur.test.Echo/ }}
        cluster: echo
clusters:
  - {{ name: echo, endpoints: ["{}"], protocol: http2 }}
"#,
        backend.addr
    ))
    .await;
    let addr = proxy.listener_addr("grpc").unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(STEP)
        .timeout(STEP)
        .connect()
        .await
        .expect("tonic connects to the spur listener");
    Setup {
        _backend: backend,
        proxy,
        client: tonic::client::Grpc::new(channel),
    }
}

async fn unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    msg: Bytes,
) -> Result<Response<Bytes>, Status> {
    tokio::time::timeout(STEP, async {
        client.ready().await.expect("channel ready");
        client
            .unary(Request::new(msg), PathAndQuery::from_static(path), Raw)
            .await
    })
    .await
    .expect("unary call finishes in time")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_pass_through_with_headers_and_large_messages() {
    let mut s = setup().await;

    let resp = unary(&mut s.client, UNARY, Bytes::from_static(b"hello"))
        .await
        .expect("unary call succeeds");
    assert_eq!(resp.get_ref().as_ref(), b"echo: hello");
    assert_eq!(
        resp.metadata().get("x-saw-te").map(|v| v.to_str().unwrap()),
        Some("trailers"),
        "the backend must receive `te: trailers`"
    );
    assert_eq!(
        resp.metadata()
            .get("x-saw-request-id")
            .map(|v| v.to_str().unwrap()),
        Some("yes"),
        "the proxy adds x-request-id upstream"
    );
    assert!(
        resp.metadata().get("x-request-id").is_some(),
        "the response carries the request ID"
    );

    // A 1 MiB message crosses several HTTP/2 flow-control windows both ways.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let resp = unary(&mut s.client, UNARY, Bytes::from(big.clone()))
        .await
        .expect("large unary call succeeds");
    assert_eq!(&resp.get_ref()[..6], b"echo: ");
    assert!(
        resp.get_ref()[6..] == big[..],
        "large message comes back intact"
    );

    // Many calls multiplexed on the one client connection.
    let mut calls = Vec::new();
    for i in 0..50 {
        let mut c = s.client.clone();
        calls.push(tokio::spawn(async move {
            let r = unary(&mut c, UNARY, Bytes::from(format!("m{i}")))
                .await
                .expect("concurrent call succeeds");
            assert_eq!(r.get_ref().as_ref(), format!("echo: m{i}").as_bytes());
        }));
    }
    for c in calls {
        c.await.unwrap();
    }

    let admin = s.proxy.admin_addr().unwrap();
    let labels = [
        ("listener", "grpc"),
        ("route", "echo"),
        ("cluster", "echo"),
        ("code", "200"),
        ("grpc_status", "0"),
    ];
    assert!(
        eventually(STEP, || async {
            metric(admin, "spur_requests_total", &labels).await == Some(52.0)
        })
        .await,
        "52 gRPC calls counted as HTTP 200 and gRPC OK: {:?}",
        metric(admin, "spur_requests_total", &labels).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_status_reaches_the_client() {
    let mut s = setup().await;

    let err = unary(&mut s.client, MISSING, Bytes::from_static(b"?"))
        .await
        .expect_err("the method fails");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "x");

    // A path the backend does not serve: its UNIMPLEMENTED passes through too.
    let err = unary(&mut s.client, "/spur.test.Echo/Nope", Bytes::new())
        .await
        .expect_err("no such method");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    // The connection is still good after errors.
    let ok = unary(&mut s.client, UNARY, Bytes::from_static(b"again"))
        .await
        .expect("call after errors");
    assert_eq!(ok.get_ref().as_ref(), b"echo: again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_stream_is_not_buffered() {
    let mut s = setup().await;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let mut replies = tokio::time::timeout(STEP, async {
        s.client.ready().await.expect("channel ready");
        s.client
            .streaming(
                Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(CHAT),
                Raw,
            )
            .await
    })
    .await
    .expect("response headers arrive before any message is sent")
    .expect("stream opens")
    .into_inner();

    // Ping-pong: message i+1 is only sent once the reply to i came back, so a proxy that
    // held request or response data back would stall here.
    for i in 0..100 {
        tx.send(Bytes::from(format!("msg-{i}")))
            .await
            .expect("request stream open");
        let reply = tokio::time::timeout(STEP, replies.message())
            .await
            .unwrap_or_else(|_| panic!("reply {i} arrives in time"))
            .expect("no error mid-stream")
            .unwrap_or_else(|| panic!("stream ended early, before reply {i}"));
        assert_eq!(
            reply,
            Bytes::from(format!("echo: msg-{i}")),
            "replies in order"
        );
    }
    drop(tx);
    let end = tokio::time::timeout(STEP, replies.message())
        .await
        .expect("stream ends in time");
    assert!(
        matches!(end, Ok(None)),
        "clean end with status OK, got {end:?}"
    );
    let trailers = tokio::time::timeout(STEP, replies.trailers())
        .await
        .expect("trailers in time");
    assert!(trailers.is_ok(), "{trailers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_delivers_every_message_in_order_then_trailers() {
    let mut s = setup().await;
    let mut items = tokio::time::timeout(STEP, async {
        s.client.ready().await.expect("channel ready");
        s.client
            .server_streaming(
                Request::new(Bytes::from_static(b"100")),
                PathAndQuery::from_static(COUNT),
                Raw,
            )
            .await
    })
    .await
    .expect("stream opens in time")
    .expect("stream opens")
    .into_inner();

    for i in 0..100 {
        let item = tokio::time::timeout(STEP, items.message())
            .await
            .unwrap_or_else(|_| panic!("item {i} arrives in time"))
            .unwrap_or_else(|e| panic!("item {i}: unexpected status {e:?}"))
            .unwrap_or_else(|| panic!("stream ended after {i} items"));
        assert_eq!(item, Bytes::from(format!("item-{i}")));
    }
    // After the data, the status and custom metadata come in the HTTP/2 trailers.
    let status = tokio::time::timeout(STEP, items.message())
        .await
        .expect("status arrives in time")
        .expect_err("the stream ends with the backend's status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "quota: 100 items");
    assert_eq!(
        status
            .metadata()
            .get("x-items-sent")
            .map(|v| v.to_str().unwrap()),
        Some("100")
    );
}

/// A bidirectional stream opened before 20 config pushes (half of them adding or removing a
/// listener on another port) keeps working through all of them: pushes swap the snapshot
/// for new requests and never touch established streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_survives_twenty_config_pushes() {
    let mut s = setup().await;
    let backend = s._backend.addr;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    s.client.ready().await.expect("channel ready");
    let mut replies = s
        .client
        .streaming(
            Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(CHAT),
            Raw,
        )
        .await
        .expect("stream opens")
        .into_inner();
    for n in 1..=20u64 {
        // Every other push adds a listener, the next removes it. On a port of the system's
        // choosing each time: a fixed port, free in between, could be taken meanwhile (as
        // a client's ephemeral port) and fail the push.
        let extra = if n % 2 == 1 {
            "  - { name: extra, listen: \"127.0.0.1:0\", cluster: echo }\n".to_string()
        } else {
            String::new()
        };
        let yaml = format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\nlisteners:\n  - name: grpc\n    listen: 127.0.0.1:0\n    routes:\n      - {{ name: echo, match: {{ path_prefix: /spur.test.Echo/ }}, cluster: echo }}\n{extra}clusters:\n  - {{ name: echo, endpoints: [\"{backend}\"], protocol: http2, connect_timeout: {}ms }}\n",
            1000 + n
        );
        s.proxy
            .apply(spur_config::load(&yaml, None).unwrap(), n)
            .await
            .expect("push applies");
        assert_eq!(s.proxy.listener_addr("extra").is_some(), n % 2 == 1);
        tx.send(Bytes::from(format!("after push {n}")))
            .await
            .expect("request stream open");
        let reply = tokio::time::timeout(STEP, replies.message())
            .await
            .expect("reply in time")
            .expect("no error mid-stream")
            .expect("stream still open");
        assert_eq!(reply, Bytes::from(format!("echo: after push {n}")));
    }
    drop(tx);
    let end = tokio::time::timeout(STEP, replies.message())
        .await
        .expect("stream ends in time");
    assert!(matches!(end, Ok(None)), "clean end, got {end:?}");
}
