//! Spur's own HTTP/1.1 server over real sockets on 127.0.0.1, with a handler standing in
//! for the request path: what a client reads back, byte for byte where hyper's framing is
//! the contract.

use super::*;
use crate::adapters::idle::{Activity, IdleIo};
use crate::tls::Stream;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn full(text: &'static str) -> TestBody {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A client socket, and the server side served by [`serve`] with `handler` in a task that
/// reports how the server ended and what was left in its read buffer.
async fn start<H, F>(handler: H) -> (TcpStream, tokio::task::JoinHandle<(Ended, BytesMut)>)
where
    H: Fn(Request<InBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let task = tokio::spawn(async move {
        let head = HeadClock::start();
        let mut io = IdleIo::with_head(Stream::Plain(server), Activity::new(), head.clone());
        let mut buf = BytesMut::new();
        let closing = AtomicBool::new(false);
        let conn = Conn {
            io: &mut io,
            buf: &mut buf,
            head,
            closing: &closing,
            max_head: 64 * 1024,
        };
        let ended = serve(conn, &handler).await;
        (ended, buf)
    });
    (client, task)
}

async fn send(client: &mut TcpStream, bytes: &[u8]) {
    client.write_all(bytes).await.unwrap();
}

/// A response whose body (`text`, of a length it does not tell) has a `content-length` of
/// `length`.
fn declared(text: &'static [u8], length: &'static str) -> Response<TestBody> {
    let body = frames(vec![http_body::Frame::data(Bytes::from_static(text))]);
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-length", length.parse().unwrap());
    resp
}

/// Reads until `done` holds for what arrived so far (or the connection closes).
async fn read_until(client: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done(&String::from_utf8_lossy(&got)) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, client.read(&mut chunk))
            .await
            .expect("the response in time")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(got).unwrap()
}

/// The response as the client read it, with the `date` line's value blanked.
fn without_date(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("date: ") {
            Some(d) => {
                assert_eq!(d.len(), 29, "an IMF-fixdate: {d}");
                "date: -"
            }
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn echo_path(req: Request<InBody>) -> std::future::Ready<Response<TestBody>> {
    let text = format!("{} {}", req.method(), req.uri());
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    resp.headers_mut()
        .insert("x-host", req.headers()["host"].clone());
    std::future::ready(resp)
}

#[tokio::test]
async fn keep_alive_requests_and_pipelined_ones_are_answered_in_order() {
    let (mut client, task) = start(echo_path).await;
    send(&mut client, b"GET /a?x=1 HTTP/1.1\r\nHost: one\r\n\r\n").await;
    let first = read_until(&mut client, |t| t.ends_with("GET /a?x=1")).await;
    assert_eq!(
        without_date(&first),
        "HTTP/1.1 200 OK\nx-host: one\ncontent-length: 10\ndate: -\n\nGET /a?x=1"
    );
    // Two at once, the second in two pieces.
    send(
        &mut client,
        b"GET /b HTTP/1.1\r\nhost: two\r\n\r\nHEAD /c HTTP/1.1\r\nho",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    send(&mut client, b"st: three\r\n\r\n").await;
    let both = read_until(&mut client, |t| t.matches("date: ").count() == 2).await;
    assert_eq!(
        without_date(&both),
        "HTTP/1.1 200 OK\nx-host: two\ncontent-length: 6\ndate: -\n\nGET /b\
         HTTP/1.1 200 OK\nx-host: three\ncontent-length: 7\ndate: -\n",
        "HEAD: the length of the body it would have, and no body"
    );
    drop(client);
    let (ended, _) = task.await.unwrap();
    assert_eq!(ended, Ended::Closed);
}

#[tokio::test]
async fn a_request_with_a_body_goes_to_hyper_with_every_byte_read() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let (mut client, task) = start(move |req| {
        seen.fetch_add(1, Ordering::SeqCst);
        echo_path(req)
    })
    .await;
    let post = "POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello";
    send(
        &mut client,
        format!("GET / HTTP/1.1\r\nhost: h\r\n\r\n{post}").as_bytes(),
    )
    .await;
    let (ended, buf) = task.await.unwrap();
    assert_eq!(ended, Ended::ToHyper);
    assert_eq!(&buf[..], post.as_bytes(), "the POST, whole, for hyper");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the GET before it was answered"
    );
    let first = read_until(&mut client, |t| t.ends_with("GET /")).await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
}

#[tokio::test]
async fn what_this_server_leaves_to_hyper() {
    for head in [
        "GET / HTTP/1.0\r\n\r\n",
        "GET http://h/ HTTP/1.1\r\nhost: h\r\n\r\n",
        "CONNECT h:443 HTTP/1.1\r\nhost: h:443\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: h\r\nte: trailers\r\n\r\n",
        "GET / HTTP/1.1\r\nhost h\r\n\r\n",
        "GET /\x01 HTTP/1.1\r\nhost: h\r\n\r\n",
    ] {
        let (mut client, task) = start(echo_path).await;
        send(&mut client, head.as_bytes()).await;
        let (ended, buf) = task.await.unwrap();
        assert_eq!(ended, Ended::ToHyper, "{head:?}");
        assert_eq!(&buf[..], head.as_bytes(), "{head:?}: every byte, for hyper");
    }
    // More headers than this server takes.
    let mut head = String::from("GET / HTTP/1.1\r\n");
    for i in 0..=MAX_HEADERS {
        head.push_str(&format!("x-{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let (mut client, task) = start(echo_path).await;
    send(&mut client, head.as_bytes()).await;
    let (ended, buf) = task.await.unwrap();
    assert_eq!((ended, &buf[..]), (Ended::ToHyper, head.as_bytes()));
}

#[tokio::test]
async fn connection_close_is_answered_and_the_connection_closed() {
    let (mut client, task) = start(|_req| std::future::ready(Response::new(full("bye")))).await;
    send(
        &mut client,
        b"GET / HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n",
    )
    .await;
    // Read to the end: the server closes.
    let text = read_until(&mut client, |_| false).await;
    assert_eq!(
        without_date(&text),
        "HTTP/1.1 200 OK\nconnection: close\ncontent-length: 3\ndate: -\n\nbye"
    );
    assert_eq!(task.await.unwrap().0, Ended::Closed);
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_and_its_trailers_are_not_sent() {
    let (mut client, task) = start(|_req| {
        let body = frames(vec![
            http_body::Frame::data(Bytes::from_static(b"hello ")),
            http_body::Frame::data(Bytes::from(vec![b'w'; 5000])),
            http_body::Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("x-sum", "42".parse().unwrap());
                t
            }),
        ]);
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("trailer", "x-sum".parse().unwrap());
        std::future::ready(resp)
    })
    .await;
    send(&mut client, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let text = read_until(&mut client, |t| t.ends_with("\r\n0\r\n\r\n")).await;
    // As hyper: trailers only to a request with `te: trailers` (which goes to hyper).
    let want = format!(
        "HTTP/1.1 200 OK\ntrailer: x-sum\ntransfer-encoding: chunked\ndate: -\n\n\
         6\nhello \n1388\n{}\n0\n",
        "w".repeat(5000)
    );
    assert_eq!(without_date(&text), want);
    drop(client);
    task.await.unwrap();
}

#[tokio::test]
async fn an_http10_response_of_unknown_length_ends_with_the_connection() {
    let (mut client, task) = start(|_req| {
        let mut resp = Response::new(frames(vec![http_body::Frame::data(Bytes::from_static(
            b"old",
        ))]));
        *resp.version_mut() = Version::HTTP_10;
        std::future::ready(resp)
    })
    .await;
    send(&mut client, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let text = read_until(&mut client, |_| false).await;
    assert_eq!(without_date(&text), "HTTP/1.0 200 OK\ndate: -\n\nold");
    assert_eq!(task.await.unwrap().0, Ended::Closed);
}

#[tokio::test]
async fn a_body_longer_than_its_length_is_cut_to_it() {
    let (mut client, task) = start(|_req| std::future::ready(declared(b"abcdef", "4"))).await;
    send(
        &mut client,
        b"GET / HTTP/1.1\r\nhost: h\r\n\r\nGET / HTTP/1.1\r\nhost: h\r\n\r\n",
    )
    .await;
    let text = read_until(&mut client, |t| t.matches("abcd").count() == 2).await;
    assert_eq!(
        without_date(&text),
        "HTTP/1.1 200 OK\ncontent-length: 4\ndate: -\n\nabcd\
         HTTP/1.1 200 OK\ncontent-length: 4\ndate: -\n\nabcd"
    );
    drop(client);
    task.await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_during_a_streamed_body_ends_it() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let (mut client, task) = start(move |_req| {
        /// One frame, then a body that never ends.
        struct Stalled(bool, #[allow(dead_code)] OnDrop);
        impl Body for Stalled {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
                let first = Bytes::from_static(b"first");
                match std::mem::replace(&mut self.get_mut().0, true) {
                    false => Poll::Ready(Some(Ok(http_body::Frame::data(first)))),
                    true => Poll::Pending,
                }
            }
        }
        let body = Stalled(false, OnDrop(flag.clone()));
        std::future::ready(Response::new(body.boxed_unsync()))
    })
    .await;
    send(&mut client, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n").await;
    // What was ready came out before the body stalled.
    let text = read_until(&mut client, |t| t.ends_with("5\r\nfirst\r\n")).await;
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    leaves(client, task, &dropped).await;
}

/// Sets its flag when dropped.
struct OnDrop(Arc<AtomicBool>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The client goes: the server ends at once, and what it was serving (that sets `dropped`
/// when dropped) is dropped.
async fn leaves(
    client: TcpStream,
    task: tokio::task::JoinHandle<(Ended, BytesMut)>,
    dropped: &AtomicBool,
) {
    assert!(!dropped.load(Ordering::SeqCst));
    drop(client);
    let (ended, _) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server notices the client left")
        .unwrap();
    assert_eq!(ended, Ended::Closed);
    assert!(dropped.load(Ordering::SeqCst), "dropped");
}

#[test]
fn a_head_in_pieces_is_parsed_once_a_blank_line_may_have_come() {
    let head = b"GET / HTTP/1.1\r\nhost: h\r\n\r\n";
    let whole = |upto: usize, scanned: usize| may_be_whole(&head[..upto], scanned);
    assert_eq!(head.len(), 27);
    assert!(!whole(20, 0) && !whole(25, 20), "no blank line yet");
    assert!(whole(27, 25) && whole(27, 26), "across the pieces");
    assert!(!whole(26, 24), "\\n\\r\\n needs its last byte");
    assert!(may_be_whole(b"GET / HTTP/1.1\n\n", 15), "bare line feeds");
}

/// A body of frames that are ready one after the other, of a length it does not tell.
struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

fn frames(frames: Vec<http_body::Frame<Bytes>>) -> TestBody {
    Frames(frames.into()).boxed_unsync()
}

#[tokio::test]
async fn statuses_without_a_body_and_empty_bodies() {
    let (mut client, task) = start(|req| {
        let status = match req.uri().path() {
            "/204" => StatusCode::NO_CONTENT,
            "/304" => StatusCode::NOT_MODIFIED,
            _ => StatusCode::NOT_FOUND,
        };
        let mut resp = Response::new(full(""));
        *resp.status_mut() = status;
        std::future::ready(resp)
    })
    .await;
    send(
        &mut client,
        b"GET /204 HTTP/1.1\r\nhost: h\r\n\r\nGET /304 HTTP/1.1\r\nhost: h\r\n\r\n\
              GET /404 HTTP/1.1\r\nhost: h\r\n\r\n",
    )
    .await;
    let text = read_until(&mut client, |t| t.matches("date: ").count() == 3).await;
    assert_eq!(
        without_date(&text),
        "HTTP/1.1 204 No Content\ndate: -\n\n\
         HTTP/1.1 304 Not Modified\ndate: -\n\n\
         HTTP/1.1 404 Not Found\ncontent-length: 0\ndate: -\n"
    );
    drop(client);
    task.await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let (mut client, task) = start(move |_req| {
        let guard = OnDrop(flag.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Response::new(full("never"))
        }
    })
    .await;
    send(&mut client, b"GET /slow HTTP/1.1\r\nhost: h\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    leaves(client, task, &dropped).await;
}

#[tokio::test]
async fn a_body_shorter_than_its_length_closes_the_connection() {
    let (mut client, task) = start(|_req| std::future::ready(declared(b"abc", "10"))).await;
    send(&mut client, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let text = read_until(&mut client, |_| false).await;
    assert!(text.ends_with("\r\n\r\nabc"), "{text}");
    assert_eq!(task.await.unwrap().0, Ended::Closed);
}

#[test]
fn values_of_one_name_are_lines_or_one_joined_line_as_hyper_writes_them() {
    let mut resp = Response::new(frames(vec![]));
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-a", "1"),
        ("connection", "foo"),
        ("x-a", "2"),
        ("transfer-encoding", "gzip"),
        ("connection", "bar"),
        ("date", "then"),
    ] {
        h.append(name, value.parse().unwrap());
    }
    let (mut parts, body) = resp.into_parts();
    let mut out = BytesMut::new();
    // The client asked to close: `close` joins the response's own `connection` values.
    let head = encode_head(&mut parts, &body, false, false, &mut out).unwrap();
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        "HTTP/1.1 200 OK\r\nx-a: 1\r\nx-a: 2\r\nconnection: foo, bar, close\r\n\
         transfer-encoding: gzip, chunked\r\ndate: then\r\n\r\n"
    );
    assert!(matches!(head.framing, Framing::Chunked) && !head.keep_alive);
}
