//! Opaque bytes both ways between a client and an upstream connection (`tcp` listeners,
//! and egress passthrough after protocol detection), until both sides have finished
//! sending, an error, `idle_timeout` or the drain's end. Half-close is passed on: when one
//! side finishes sending, the other side's write half is shut down and the opposite
//! direction keeps flowing.
//!
//! Where both sides are plain TCP (no TLS on either), on Linux, the bytes never come up to
//! user space once they stream: a direction copies its chunks through a 16 KiB buffer
//! until a read fills it, then `splice`s them from the source socket into a pipe and from
//! the pipe into the destination socket (the kernel hands the socket buffers' pages on
//! instead of copying every byte in and out of the proxy), until a chunk comes in under
//! 16 KiB. Small exchanges stay copied: for them a splice costs more than a read and a
//! write (`benches/tcp.sh` measures both). A connection holds no buffer and no pipe while
//! it waits: a direction takes one from its worker's pool when its source is readable and
//! gives it back once it has passed the chunk on, as HAProxy holds pipes only while data
//! is in flight. `SPUR_TCP_SPLICE=0` turns splicing off (every chunk copied).

use crate::adapters::idle::{Activity, IdleIo};
use crate::tls::Stream;
use std::future::Future;
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a relay ended other than both sides finishing: an IO error's text, `idle_timeout`
/// or `drain_timeout`.
pub type Ended = Result<(), String>;

/// Relays until the end; returns how it ended and the bytes (sent to the upstream,
/// received from it), counted also when it ended in an error or a timeout.
pub async fn relay(
    client: Stream,
    upstream: Stream,
    idle: Duration,
    drained: impl Future<Output = ()>,
) -> (Ended, (u64, u64)) {
    relay_as(client, upstream, idle, drained, cfg!(target_os = "linux")).await
}

/// [`relay`]; between plain sockets, with the module's own loop (that splices) when
/// `own_loop`, else with tokio's `copy_bidirectional` (as over TLS).
async fn relay_as(
    client: Stream,
    upstream: Stream,
    idle: Duration,
    drained: impl Future<Output = ()>,
    own_loop: bool,
) -> (Ended, (u64, u64)) {
    let activity = Activity::new();
    #[cfg(target_os = "linux")]
    if own_loop {
        if let (Some(c), Some(u)) = (client.plain(), upstream.plain()) {
            let moved = [AtomicU64::new(0), AtomicU64::new(0)];
            let both = splice::both_ways(c, u, &activity, &moved);
            let ended = until_end(both, &activity, idle, drained).await;
            let bytes = (
                moved[0].load(Ordering::Relaxed),
                moved[1].load(Ordering::Relaxed),
            );
            return (ended, bytes);
        }
    }
    let mut client = client;
    let mut up = IdleIo::new(upstream, activity.clone());
    let copy = async {
        tokio::io::copy_bidirectional(&mut client, &mut up)
            .await
            .map(|_| ())
    };
    let ended = until_end(copy, &activity, idle, drained).await;
    let (from_upstream, to_upstream) = up.bytes();
    (ended, (to_upstream, from_upstream))
}

async fn until_end(
    moving: impl Future<Output = std::io::Result<()>>,
    activity: &Activity,
    idle: Duration,
    drained: impl Future<Output = ()>,
) -> Ended {
    tokio::select! {
        r = moving => r.map_err(|e| e.to_string()),
        _ = activity.idle_for(idle) => Err("idle_timeout".to_string()),
        _ = drained => Err("drain_timeout".to_string()),
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use super::{Activity, AtomicU64, Ordering};
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::AtomicBool;
    use std::sync::LazyLock;
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Whether splicing is on: `SPUR_TCP_SPLICE=0` turns it off, and so does a kernel or
    /// sandbox that refuses it (the chunk that found out is copied instead).
    pub fn wanted() -> bool {
        ON.load(Ordering::Relaxed)
    }

    static ON: LazyLock<AtomicBool> = LazyLock::new(|| {
        AtomicBool::new(std::env::var("SPUR_TCP_SPLICE").map_or(true, |v| v != "0"))
    });

    /// A copied chunk's most; a read that fills it turns its direction to splicing.
    const BUF: usize = 16 * 1024;
    /// The most a splice moves at once: a pipe's default capacity (16 pages).
    const CHUNK: usize = 64 * 1024;
    /// Empty pipes (two descriptors each) and buffers a worker keeps for the next chunk.
    const POOL_KEEP: usize = 16;

    thread_local! {
        static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
        static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    /// A pipe's read and write ends, non-blocking.
    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        fn take() -> io::Result<Pipe> {
            if let Some(p) = PIPES.with_borrow_mut(Vec::pop) {
                return Ok(p);
            }
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded: both descriptors are open and owned by no one else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            #[cfg(test)]
            LIVE.set(LIVE.get() + 1);
            Ok(Pipe { read, write })
        }

        /// Back to the pool: only an empty pipe (one holding bytes is dropped, closing it).
        fn give_back(self) {
            PIPES.with_borrow_mut(|pool| {
                if pool.len() < POOL_KEEP {
                    pool.push(self);
                }
            });
        }
    }

    fn take_buf() -> Box<[u8]> {
        BUFS.with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice())
    }

    fn give_back_buf(buf: Box<[u8]>) {
        BUFS.with_borrow_mut(|pool| {
            if pool.len() < POOL_KEEP {
                pool.push(buf);
            }
        });
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
        // SAFETY: plain descriptors and null offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Both directions at once; the first error ends both, as `copy_bidirectional` does.
    /// `moved` is (client to upstream, upstream to client).
    pub async fn both_ways(
        client: &TcpStream,
        upstream: &TcpStream,
        activity: &Activity,
        moved: &[AtomicU64; 2],
    ) -> io::Result<()> {
        let up = one_way(client, upstream, activity, &moved[0]);
        let down = one_way(upstream, client, activity, &moved[1]);
        tokio::try_join!(up, down).map(|_| ())
    }

    /// `from`'s bytes into `to` until `from` has finished sending, then `to`'s write half
    /// shut down. Small chunks are copied through a buffer (a splice costs more than a read
    /// and a write of a few hundred bytes); once a read fills the buffer the direction
    /// streams, and its chunks are spliced until one comes in under a buffer's worth.
    async fn one_way(
        from: &TcpStream,
        to: &TcpStream,
        activity: &Activity,
        moved: &AtomicU64,
    ) -> io::Result<()> {
        let mut streaming = false;
        loop {
            // A chunk is one unit of the task's budget: a connection whose bytes never stop
            // (both sockets always ready) still lets its worker's other tasks, the other
            // direction and its own timeouts run.
            tokio::task::coop::consume_budget().await;
            from.readable().await?;
            let chunk = if streaming && wanted() {
                splice_chunk(from, to, activity, moved).await?
            } else {
                copy_chunk(from, to, activity, moved).await?
            };
            match chunk {
                // Nothing to read yet: the readiness is cleared, wait again.
                None => continue,
                Some(0) => return shut_write(to),
                Some(n) => streaming = n >= BUF,
            }
        }
    }

    /// One read's bytes copied into `to`: how many (0 at the end), or None if there were
    /// none yet.
    async fn copy_chunk(
        from: &TcpStream,
        to: &TcpStream,
        activity: &Activity,
        moved: &AtomicU64,
    ) -> io::Result<Option<usize>> {
        let mut buf = take_buf();
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back_buf(buf);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        activity.touch();
        let sock = socket2::SockRef::from(to);
        pass_on(to, n, activity, moved, |done| sock.send(&buf[done..n])).await?;
        #[cfg(test)]
        COPIED.set(COPIED.get() + n as u64);
        give_back_buf(buf);
        Ok(Some(n))
    }

    /// One splice's bytes moved into `to` through a pipe, as [`copy_chunk`]. Without a
    /// pipe (out of descriptors) the chunk is copied; a kernel that refuses to splice
    /// sockets turns splicing off for good.
    async fn splice_chunk(
        from: &TcpStream,
        to: &TcpStream,
        activity: &Activity,
        moved: &AtomicU64,
    ) -> io::Result<Option<usize>> {
        let Ok(pipe) = Pipe::take() else {
            return copy_chunk(from, to, activity, moved).await;
        };
        // The pipe is empty, so a splice that would block is the socket's: nothing to read
        // yet (try_io then clears the readiness).
        let filled = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        });
        let n = match filled {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                return Ok(None);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                ON.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "splice refused: tcp bytes are copied from now on");
                return copy_chunk(from, to, activity, moved).await;
            }
            Err(e) => return Err(e),
        };
        activity.touch();
        let (from_pipe, into) = (pipe.read.as_raw_fd(), to.as_raw_fd());
        pass_on(to, n, activity, moved, |done| {
            splice(from_pipe, into, n - done)
        })
        .await?;
        #[cfg(test)]
        SPLICED.set(SPLICED.get() + n as u64);
        pipe.give_back();
        Ok(Some(n))
    }

    /// `n` bytes written into `to` by `write(done)` (which writes what follows the first
    /// `done`), waiting for room as needed; counted in `moved` as they go, each step that
    /// moves some counting as activity (a slow peer that keeps taking bytes is not idle).
    async fn pass_on(
        to: &TcpStream,
        n: usize,
        activity: &Activity,
        moved: &AtomicU64,
        mut write: impl FnMut(usize) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < n {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || write(done)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    done += m;
                    moved.fetch_add(m as u64, Ordering::Relaxed);
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[cfg(test)]
    thread_local! {
        /// Pipes of this thread that are open, pooled or not.
        static LIVE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Bytes this thread copied and spliced.
        static COPIED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        static SPLICED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    #[cfg(test)]
    impl Drop for Pipe {
        fn drop(&mut self) {
            // Per thread: a pipe made on one thread and closed on another (a task that
            // moved) is not counted right, which the tests' single-threaded runtimes avoid.
            LIVE.set(LIVE.get().saturating_sub(1));
        }
    }

    /// Pipes of this thread taken out of its pool (or made) and not given back or closed.
    #[cfg(test)]
    pub fn held() -> usize {
        LIVE.get().saturating_sub(PIPES.with_borrow(Vec::len))
    }

    /// Bytes this thread has (copied, spliced) so far.
    #[cfg(test)]
    pub fn counted() -> (u64, u64) {
        (COPIED.get(), SPLICED.get())
    }

    fn shut_write(to: &TcpStream) -> io::Result<()> {
        match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A relay between two fresh connections: returns the client's end, the upstream's end
    /// and the relay's task.
    async fn relayed(
        own_loop: bool,
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Ended, (u64, u64))>,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let to_upstream = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (upstream, _) = back.accept().await.unwrap();
        let task = tokio::spawn(relay_as(
            Stream::Plain(accepted),
            Stream::Plain(to_upstream),
            idle,
            std::future::pending(),
            own_loop,
        ));
        (client, upstream, task)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Megabytes both ways, each side half-closing when done: every byte arrives in order,
    /// each half-close is passed on, and the relay counts both directions. Spliced and
    /// copied alike.
    #[tokio::test]
    async fn bytes_and_half_closes_pass_both_ways() {
        for own_loop in [true, false] {
            #[cfg(target_os = "linux")]
            let before = splice::counted();
            let (client, upstream, task) = relayed(own_loop, Duration::from_secs(30)).await;
            let (up_data, down_data) = (pattern(8_000_000, 0), pattern(2_000_000, 0x5a));
            // The client sends and reads at once; the upstream answers only once it has
            // seen the client's end (as a request/response protocol over TCP does).
            let client_talks = |mut s: TcpStream, send: Vec<u8>| async move {
                let (mut r, mut w) = s.split();
                let write = async {
                    w.write_all(&send).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let read = r.read_to_end(&mut got);
                let (_, n) = tokio::join!(write, read);
                n.unwrap();
                got
            };
            let upstream_answers = |mut s: TcpStream, send: Vec<u8>| async move {
                // A late reader: the relay meets a full socket and waits for room.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(&send).await.unwrap();
                s.shutdown().await.unwrap();
                got
            };
            let both = async {
                tokio::join!(
                    upstream_answers(upstream, down_data.clone()),
                    client_talks(client, up_data.clone())
                )
            };
            let (at_upstream, at_client) = tokio::time::timeout(Duration::from_secs(20), both)
                .await
                .unwrap_or_else(|_| {
                    panic!("own loop {own_loop}: a side never saw the other's end")
                });
            assert!(
                at_upstream == up_data,
                "own loop {own_loop}: upstream got {} bytes",
                at_upstream.len()
            );
            assert!(
                at_client == down_data,
                "own loop {own_loop}: client got {} bytes",
                at_client.len()
            );
            let (ended, bytes) = task.await.unwrap();
            assert_eq!(ended, Ok(()), "own loop {own_loop}");
            assert_eq!(bytes, (8_000_000, 2_000_000), "own loop {own_loop}");
            // A stream of megabytes goes to splicing after its first full buffer.
            #[cfg(target_os = "linux")]
            if own_loop {
                let (copied, spliced) = splice::counted();
                let (copied, spliced) = (copied - before.0, spliced - before.1);
                assert_eq!(copied + spliced, 10_000_000);
                assert!(spliced > 8_000_000, "copied {copied}, spliced {spliced}");
            }
        }
    }

    /// Small exchanges are copied, never spliced (a splice costs more than a read and a
    /// write of a few bytes), and a connection that waits holds no pipe: after messages
    /// each way, both directions gave back what they took while the connection stays open.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn small_exchanges_are_copied_and_a_waiting_connection_holds_no_pipe() {
        let before = splice::counted();
        let (mut client, mut upstream, task) = relayed(true, Duration::from_secs(30)).await;
        for _ in 0..3 {
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            upstream.read_exact(&mut buf).await.unwrap();
            upstream.write_all(b"pong").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"pong");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished());
        assert_eq!(splice::held(), 0);
        drop((client, upstream));
        let (ended, bytes) = task.await.unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(bytes, (12, 12));
        assert_eq!(splice::held(), 0);
        let (copied, spliced) = splice::counted();
        assert_eq!((copied - before.0, spliced - before.1), (24, 0));
    }

    /// No byte either way for `idle`: the relay ends with `idle_timeout` and the bytes moved
    /// before it. A reset upstream ends it with the error.
    #[tokio::test]
    async fn idle_and_reset_end_the_relay() {
        for own_loop in [true, false] {
            let idle = Duration::from_millis(300);
            let (mut client, mut upstream, task) = relayed(own_loop, idle).await;
            // Enough to stream (spliced chunks), then silence.
            let data = pattern(200_000, 1);
            client.write_all(&data).await.unwrap();
            let mut got = vec![0u8; data.len()];
            upstream.read_exact(&mut got).await.unwrap();
            assert!(got == data);
            let (ended, bytes) = task.await.unwrap();
            assert_eq!(
                ended,
                Err("idle_timeout".to_string()),
                "own loop {own_loop}"
            );
            assert_eq!(bytes, (200_000, 0), "own loop {own_loop}");

            let (mut client, upstream, task) = relayed(own_loop, Duration::from_secs(30)).await;
            socket2::SockRef::from(&upstream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(upstream); // a reset
            let ended = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    // Writing towards the reset upstream fails once the reset is seen.
                    if client.write_all(&[0u8; 1024]).await.is_err() {
                        break task.await.unwrap().0;
                    }
                    if task.is_finished() {
                        break task.await.unwrap().0;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let ended = ended.await.expect("the relay ends");
            assert!(ended.is_err(), "own loop {own_loop}: {ended:?}");
        }
    }
}
