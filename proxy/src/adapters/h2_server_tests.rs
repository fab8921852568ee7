//! Spur's own HTTP/2 server over real sockets on 127.0.0.1, with the h2 crate's client and
//! a handler standing in for the request path: what a client sees back.

use super::*;
use crate::adapters::idle::{Activity, IdleIo};
use crate::tls::Stream;
use h2::RecvStream;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn full(text: &'static str) -> TestBody {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body of these frames, in order.
fn frames(frames: Vec<Result<http_body::Frame<Bytes>, BoxError>>) -> TestBody {
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

struct Server {
    client: h2::client::SendRequest<Bytes>,
    /// How [`serve`] ended.
    ended: JoinHandle<Result<(), H2Error>>,
    head: HeadClock,
    closing: Arc<AtomicBool>,
}

/// Both ends of a TCP connection on 127.0.0.1: (client, server).
async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (tcp, server)
}

/// An HTTP/2 client connected to [`serve`] with `handler`, served in a task of its own.
async fn start<H, F>(handler: H) -> Server
where
    H: Fn(Request<InBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let (tcp, server) = socket_pair().await;
    let head = HeadClock::start();
    let closing = Arc::new(AtomicBool::new(false));
    let ended = tokio::spawn({
        let (head, closing) = (head.clone(), closing.clone());
        async move {
            let io = IdleIo::with_head(Stream::Plain(server), Activity::new(), head.clone());
            serve(
                Rewind::new(io, Bytes::new()),
                &handler,
                &head,
                &closing,
                16 * 1024,
            )
            .await
        }
    });
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Server {
        client,
        ended,
        head,
        closing,
    }
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://spur.test{path}"))
        .body(())
        .unwrap()
}

/// Reads a response body to its end: its bytes, and its trailers.
async fn read_all(mut body: RecvStream) -> Result<(Vec<u8>, Option<HeaderMap>), h2::Error> {
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    Ok((got, body.trailers().await?))
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("within 10 s")
}

#[tokio::test]
async fn a_get_is_answered_with_a_date_a_length_and_no_connection_headers() {
    let mut s = start(|req: Request<InBody>| async move {
        assert!(req.body().is_end_stream(), "a GET has no body");
        assert_eq!(req.version(), Version::HTTP_2);
        let mut resp = Response::new(full("hello"));
        // h2 refuses to send these: the server takes them out.
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        resp
    })
    .await;
    let (resp, _) = s.client.send_request(get("/"), true).unwrap();
    let resp = within(resp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h[header::CONTENT_LENGTH], "5");
    assert_eq!(
        h[header::DATE].len(),
        29,
        "an IMF-fixdate: {:?}",
        h[header::DATE]
    );
    assert_eq!(h["x-kept"], "yes");
    for gone in ["connection", "x-private", "keep-alive", "transfer-encoding"] {
        assert!(!h.contains_key(gone), "{gone} was sent");
    }
    let (body, trailers) = within(read_all(resp.into_body())).await.unwrap();
    assert_eq!(body, b"hello");
    assert!(trailers.is_none());
    assert!(!s.head.in_request(), "the request ended with its response");
}

#[tokio::test]
async fn a_request_body_larger_than_the_windows_is_read_whole() {
    // 3 MiB against 1 MiB windows: the client can send it all only if the server gives
    // what it read back to the windows.
    let mut s = start(|req: Request<InBody>| async move {
        assert_eq!(req.body().size_hint().exact(), Some(3 << 20));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let all_x = body.iter().all(|b| *b == b'x');
        Response::new(
            Full::new(Bytes::from(format!("{} {all_x}", body.len())))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
    })
    .await;
    let req = Request::post("http://spur.test/upload")
        .header(header::CONTENT_LENGTH, 3 << 20)
        .body(())
        .unwrap();
    let (resp, mut send) = s.client.send_request(req, false).unwrap();
    send.send_data(Bytes::from(vec![b'x'; 3 << 20]), true)
        .unwrap();
    let resp = within(resp).await.unwrap();
    let (body, _) = within(read_all(resp.into_body())).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&body), format!("{} true", 3 << 20));
}

#[tokio::test]
async fn a_client_reset_drops_the_request_in_progress() {
    let dropped = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let mut s = start({
        let (dropped, started) = (dropped.clone(), started.clone());
        move |req: Request<InBody>| {
            let (dropped, started) = (dropped.clone(), started.clone());
            async move {
                if req.uri().path() != "/slow" {
                    return Response::new(full("ok"));
                }
                // Notifies `dropped` when this future is dropped, not before.
                struct OnDrop(Arc<Notify>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.notify_one();
                    }
                }
                let _on_drop = OnDrop(dropped);
                started.notify_one();
                std::future::pending::<Response<TestBody>>().await
            }
        }
    })
    .await;
    let (resp, mut send) = s.client.send_request(get("/slow"), true).unwrap();
    within(started.notified()).await;
    assert!(s.head.in_request());
    send.send_reset(h2::Reason::CANCEL);
    within(dropped.notified()).await;
    drop(resp);
    // The connection goes on serving.
    assert!(!s.head.in_request());
    let (resp, _) = s.client.send_request(get("/"), true).unwrap();
    let resp = within(resp).await.unwrap();
    let (body, _) = within(read_all(resp.into_body())).await.unwrap();
    assert_eq!(body, b"ok");
}

#[tokio::test]
async fn trailers_go_through() {
    let mut s = start(|_req| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Response::new(frames(vec![
            Ok(http_body::Frame::data(Bytes::from_static(
                b"\0\0\0\0\x02hi",
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ]))
    })
    .await;
    let (resp, _) = s.client.send_request(get("/svc/Method"), true).unwrap();
    let resp = within(resp).await.unwrap();
    let (body, trailers) = within(read_all(resp.into_body())).await.unwrap();
    assert_eq!(body, b"\0\0\0\0\x02hi");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn a_response_body_error_resets_the_stream_with_its_h2_reason() {
    let mut s = start(|req: Request<InBody>| async move {
        let error: BoxError = match req.uri().path() {
            // An upstream HTTP/2 stream's reset, behind the body's error.
            "/refused" => Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)),
            _ => "the upstream connection broke".into(),
        };
        Response::new(frames(vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
            Err(error),
        ]))
    })
    .await;
    for (path, reason) in [
        ("/refused", h2::Reason::REFUSED_STREAM),
        ("/broken", h2::Reason::INTERNAL_ERROR),
    ] {
        let (resp, _) = s.client.send_request(get(path), true).unwrap();
        // The reset may come before the client has read the head it follows.
        let err = match within(resp).await {
            Ok(resp) => within(read_all(resp.into_body())).await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(err.reason(), Some(reason), "{path}: {err}");
    }
}

#[tokio::test]
async fn closing_lets_the_stream_in_progress_finish_then_ends_the_connection() {
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let mut s = start({
        let (release, started) = (release.clone(), started.clone());
        move |req: Request<InBody>| {
            let (release, started) = (release.clone(), started.clone());
            async move {
                assert_eq!(req.method(), Method::GET);
                started.notify_one();
                release.notified().await;
                Response::new(full("finished"))
            }
        }
    })
    .await;
    let (resp, _) = s.client.send_request(get("/"), true).unwrap();
    within(started.notified()).await;
    s.closing.store(true, Ordering::Release);
    // Seen when the connection's task runs next: here, when the answer is ready.
    release.notify_one();
    let resp = within(resp).await.unwrap();
    let (body, _) = within(read_all(resp.into_body())).await.unwrap();
    assert_eq!(body, b"finished");
    within(&mut s.ended).await.unwrap().unwrap();
    // GOAWAY came: the client takes no new request on this connection.
    let refused = match s.client.send_request(get("/"), true) {
        Err(_) => true,
        Ok((resp, _)) => within(resp).await.is_err(),
    };
    assert!(refused, "a request after the GOAWAY was served");
}

/// Drives `conn` as [`serve`] does while `until` runs; `until`'s output.
async fn driving<S, MK, T>(
    conn: &mut Conn,
    streams: &mut StreamSet<S>,
    make: &mut MK,
    until: impl Future<Output = T>,
) -> T
where
    S: StreamLike,
    MK: FnMut(Request<InBody>) -> S,
{
    let mut until = std::pin::pin!(until);
    within(std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.turn(cx, streams, make) {
            panic!("the connection ended: {r:?}");
        }
        until.as_mut().poll(cx)
    }))
    .await
}

#[tokio::test]
async fn a_connection_holds_no_buffer_between_turns() {
    let (tcp, server) = socket_pair().await;
    let head = HeadClock::start();
    let io = IdleIo::with_head(Stream::Plain(server), Activity::new(), head.clone());
    let mut conn = Conn::new(Rewind::new(io, Bytes::new()), 16 * 1024);
    let mut streams = StreamSet::new();
    let mut make = |_req: Request<InBody>| {
        crate::adapters::h2_stream::Stream::new(
            async { Response::new(full("hello")) },
            head.head_done(Version::HTTP_2),
        )
    };
    let m = &mut make;
    let handshake = h2::client::handshake(tcp);
    let (mut client, h2conn) = driving(&mut conn, &mut streams, m, handshake)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = h2conn.await;
    });
    let mut lent = None;
    for round in 0..3 {
        let (resp, _) = client.send_request(get("/"), true).unwrap();
        let got = driving(&mut conn, &mut streams, m, async {
            let body = read_all(resp.await.unwrap().into_body()).await.unwrap();
            // Whatever the client sends after the response (acks, window updates) is read.
            tokio::time::sleep(Duration::from_millis(50)).await;
            body
        })
        .await;
        assert_eq!(got.0, b"hello", "round {round}");
        assert_eq!(streams.len(), 0);
        assert_eq!(conn.rbuf.capacity(), 0, "read buffer kept, round {round}");
        assert_eq!(
            conn.out.buf.capacity(),
            0,
            "write buffer kept, round {round}"
        );
        // The worker has them, and lends the same ones every turn.
        let (mut read, mut write) = (lend::read_buf(), lend::write_buf());
        assert!(read.capacity() >= MAX_FRAME_SIZE, "round {round}");
        assert!(write.capacity() >= WRITE_BUF, "round {round}");
        let at = (read.as_ptr(), write.as_ptr());
        assert_eq!(*lent.get_or_insert(at), at, "round {round}: made again");
        lend::give_read(&mut read);
        lend::give_write(&mut write);
    }
}
