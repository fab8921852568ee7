//! gRPC helpers for the end-to-end tests: messages as raw bytes (no protobuf), a tonic
//! server (h2c) whose methods are closures, and a tonic client channel.
#![allow(dead_code)]

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, Default)]
pub struct Raw;

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

pub type HttpResponse = http::Response<tonic::body::Body>;
type Handler = Arc<
    dyn Fn(http::Request<Incoming>) -> Pin<Box<dyn Future<Output = HttpResponse> + Send>>
        + Send
        + Sync,
>;

/// A gRPC server on 127.0.0.1 (HTTP/2 prior knowledge) that counts the calls it gets.
pub struct GrpcServer {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves every call with `handler` (which builds the whole response with tonic's
/// `server::Grpc`, see [`unary`] and [`server_stream`]).
pub async fn grpc_server<F, Fut>(handler: F) -> GrpcServer
where
    F: Fn(http::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    GrpcServer { addr, calls, task }
}

struct Unary<F>(F);

impl<F, Fut> tonic::server::UnaryService<Bytes> for Unary<F>
where
    F: FnMut(Request<Bytes>) -> Fut,
    Fut: Future<Output = Result<Response<Bytes>, Status>> + Send + 'static,
{
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin((self.0)(req))
    }
}

/// A unary method: `f` answers the call (an `Err` before any message is a trailers-only
/// response).
pub async fn unary<F, Fut>(req: http::Request<Incoming>, f: F) -> HttpResponse
where
    F: FnMut(Request<Bytes>) -> Fut,
    Fut: Future<Output = Result<Response<Bytes>, Status>> + Send + 'static,
{
    tonic::server::Grpc::new(Raw).unary(Unary(f), req).await
}

type MsgStream = tokio_stream::wrappers::ReceiverStream<Result<Bytes, Status>>;

struct Streamed(Vec<Result<Bytes, Status>>);

impl tonic::server::ServerStreamingService<Bytes> for Streamed {
    type Response = Bytes;
    type ResponseStream = MsgStream;
    type Future = std::future::Ready<Result<Response<MsgStream>, Status>>;
    fn call(&mut self, _req: Request<Bytes>) -> Self::Future {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let items = std::mem::take(&mut self.0);
        tokio::spawn(async move {
            for item in items {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        std::future::ready(Ok(Response::new(MsgStream::new(rx))))
    }
}

/// A server-streaming method answering these messages in order: an `Err` after a message
/// ends the stream with that status in the trailers.
pub async fn server_stream(
    req: http::Request<Incoming>,
    items: Vec<Result<Bytes, Status>>,
) -> HttpResponse {
    tonic::server::Grpc::new(Raw)
        .server_streaming(Streamed(items), req)
        .await
}

/// A client channel to `addr` (plain HTTP/2), with no deadline of its own: the tests set
/// `grpc-timeout` themselves where they need one.
pub async fn channel(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("tonic connects");
    tonic::client::Grpc::new(channel)
}

/// One unary call, bounded by 10 s of the test's own.
pub async fn grpc_call(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    tokio::time::timeout(Duration::from_secs(10), async {
        client.ready().await.expect("channel ready");
        client
            .unary(req, PathAndQuery::from_static(path), Raw)
            .await
    })
    .await
    .expect("the call ends within 10 s")
}

/// A server-streaming call: the messages it got, and how it ended.
pub async fn call_stream(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
) -> (Vec<Bytes>, Result<(), Status>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        client.ready().await.expect("channel ready");
        let mut stream = match client
            .server_streaming(
                Request::new(Bytes::new()),
                PathAndQuery::from_static(path),
                Raw,
            )
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return (Vec::new(), Err(s)),
        };
        let mut got = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) => got.push(m),
                Ok(None) => return (got, Ok(())),
                Err(s) => return (got, Err(s)),
            }
        }
    })
    .await
    .expect("the stream ends within 10 s")
}
