//! Logging to stderr: human-readable on a terminal, JSON lines otherwise. The filter comes
//! from `SPUR_LOG` (then `RUST_LOG`), default `info`; `SPUR_LOG=info,spur::access=off`
//! turns the access log off.
//!
//! When stderr is not a terminal, lines are buffered and written by a background thread
//! every [`FLUSH_EVERY`] (or at once when the buffer passes 64 KiB), so an access-log line
//! costs a memory copy rather than a system call on the request path. [`flush`] writes out
//! what is pending; the binaries call it before exiting.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_AT: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "json" => Some(LogFormat::Json),
            "text" => Some(LogFormat::Text),
            _ => None,
        }
    }
}

static BUFFER: OnceLock<Mutex<Pending>> = OnceLock::new();
/// The format chosen by [`init`], and whether lines are buffered.
static FORMAT: OnceLock<(LogFormat, bool)> = OnceLock::new();

/// The log format, once [`init`] has run.
pub fn format() -> Option<LogFormat> {
    FORMAT.get().map(|f| f.0)
}

/// Writes a preformatted log line (the access log's) the way the subscriber writes.
pub fn write_line(line: &[u8]) {
    match FORMAT.get() {
        Some((_, true)) => {
            let _ = BufferedStderr.write_all(line);
        }
        Some((_, false)) => {
            let _ = std::io::stderr().lock().write_all(line);
        }
        None => {}
    }
}

/// The lines waiting to be written, and an empty buffer that keeps its room for when they
/// are taken out: a buffer taken whole and not given back made the next lines grow a new
/// one from nothing (a reallocation and a copy at each doubling up to [`FLUSH_AT`]).
struct Pending {
    lines: Vec<u8>,
    spare: Vec<u8>,
    /// A thread is writing lines out: the others go on adding theirs, to be written after
    /// (one writer at a time keeps the lines in order, and nobody waits for stderr while
    /// holding the lock).
    writing: bool,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            lines: Vec::with_capacity(FLUSH_AT * 2),
            spare: Vec::with_capacity(FLUSH_AT * 2),
            writing: false,
        }
    }
}

fn buffer() -> &'static Mutex<Pending> {
    BUFFER.get_or_init(|| {
        std::thread::Builder::new()
            .name("spur-log".into())
            .spawn(|| {
                own_fd_table();
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                }
            })
            .expect("log flusher thread");
        Mutex::new(Pending::new())
    })
}

/// Gives the calling thread a file-descriptor table of its own that holds only stdin,
/// stdout and stderr (`close_range(3, ~0, CLOSE_RANGE_UNSHARE)`: the copy is made, then
/// closed above 2; the process's descriptors stay open). The flusher writes to stderr only,
/// and with it out of the process's table a one-worker proxy is again its table's only
/// user: the kernel then borrows a socket's file for each system call (`fdget`'s light
/// path) where a shared table makes every `send`, `recv` and `epoll_wait` take and drop a
/// reference, two atomic operations each (about 1% of Spur's CPU per request in a `perf
/// record` of the benchmark). On a kernel without `close_range` (before 5.9) the table
/// stays shared, as it was.
fn own_fd_table() {
    // SAFETY: a system call on integers; with CLOSE_RANGE_UNSHARE the descriptors closed
    // are those of this thread's new copy of the table, not the other threads'.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        )
    };
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lines taken out of `guard` (the spare buffer takes their place), written to
/// `sink()` outside the lock, and their buffer kept as the next spare. No other thread is
/// writing (the caller checked `writing`).
fn write_out<W: Write>(
    pending: &Mutex<Pending>,
    mut guard: std::sync::MutexGuard<'_, Pending>,
    sink: impl FnOnce() -> W,
) -> std::io::Result<()> {
    guard.writing = true;
    let spare = std::mem::take(&mut guard.spare);
    let mut out = std::mem::replace(&mut guard.lines, spare);
    drop(guard);
    let written = sink().write_all(&out);
    out.clear();
    let mut guard = lock(pending);
    guard.writing = false;
    if out.capacity() <= FLUSH_AT * 4 {
        guard.spare = out;
    }
    written
}

/// `data` added to the lines waiting; all of them written to `sink()` once they pass
/// [`FLUSH_AT`], unless another thread is writing (its turn ends, the next line writes).
fn append<W: Write>(
    pending: &Mutex<Pending>,
    data: &[u8],
    sink: impl FnOnce() -> W,
) -> std::io::Result<()> {
    let mut guard = lock(pending);
    guard.lines.extend_from_slice(data);
    if guard.lines.len() >= FLUSH_AT && !guard.writing {
        return write_out(pending, guard, sink);
    }
    Ok(())
}

/// Writes out every buffered log line, after the lines another thread is writing (waited
/// for a second at most: a writer that never ended its turn, a panic in it, must not hang
/// the exit).
pub fn flush() {
    if let Some(pending) = BUFFER.get() {
        flush_to(pending, || std::io::stderr().lock());
    }
}

/// [`flush`] of `pending` to `sink()`.
fn flush_to<W: Write>(pending: &Mutex<Pending>, sink: impl FnOnce() -> W) {
    let mut guard = lock(pending);
    for _ in 0..1000 {
        if !guard.writing {
            break;
        }
        drop(guard);
        std::thread::sleep(Duration::from_millis(1));
        guard = lock(pending);
    }
    if !guard.lines.is_empty() {
        let _ = write_out(pending, guard, sink);
    }
}

/// A writer for one log event: appends to the shared buffer.
pub struct BufferedStderr;

impl Write for BufferedStderr {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        append(buffer(), data, || std::io::stderr().lock())?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = BufferedStderr;
    fn make_writer(&'a self) -> BufferedStderr {
        BufferedStderr
    }
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(format: Option<LogFormat>) {
    let filter = std::env::var("SPUR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let _ = FORMAT.set((format, !terminal));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match (format, terminal) {
        (LogFormat::Json, false) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(BufferedStderr)
            .try_init(),
        (LogFormat::Json, true) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(false)
            .with_writer(BufferedStderr)
            .try_init(),
        (LogFormat::Text, true) => builder.with_writer(std::io::stderr).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flusher thread holds no copy of the process's other descriptors: a listener
    /// closed by the process is closed (a copy in a table of the flusher's own would keep
    /// it open), and the flusher's table is its own (a shared one would list the listener).
    #[test]
    fn the_flusher_holds_none_of_the_processs_descriptors() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (fd, addr) = (listener.as_raw_fd(), listener.local_addr().unwrap());
        let _ = buffer();
        // The flusher (the thread named spur-log), once it has unshared its table: until
        // then its table is the process's.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let fds = loop {
            let fds = flusher_fds();
            if fds.as_ref().is_some_and(|f| f.iter().all(|&f| f <= 2))
                || std::time::Instant::now() >= deadline
            {
                break fds.expect("the flusher thread runs");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            fds.iter().all(|&f| f <= 2),
            "the flusher's descriptors: {fds:?}"
        );
        assert!(!fds.contains(&fd));
        drop(listener);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still listens"
        );
    }

    /// The descriptors open in the spur-log thread's table (`None` before it runs).
    fn flusher_fds() -> Option<Vec<i32>> {
        let task = std::fs::read_dir("/proc/self/task").ok()?.find_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?;
            (comm.trim_end() == "spur-log").then_some(t)
        })?;
        let fds = std::fs::read_dir(task.join("fd")).ok()?;
        Some(
            fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
        )
    }

    /// Lines come out whole and in order, and the two buffers keep their room: no buffer
    /// grows again from nothing after a write-out.
    #[test]
    fn buffered_lines_keep_their_order_and_their_room() {
        let pending = Mutex::new(Pending::new());
        let mut sent = Vec::new();
        let mut written = Vec::new();
        let mut write_outs = 0;
        for i in 0..FLUSH_AT / 100 * 5 {
            let line = format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 200));
            sent.extend_from_slice(line.as_bytes());
            let before = written.len();
            append(&pending, line.as_bytes(), || &mut written).unwrap();
            if written.len() != before {
                write_outs += 1;
                let guard = lock(&pending);
                assert!(guard.lines.is_empty());
                assert!(guard.lines.capacity() >= FLUSH_AT, "write-out {write_outs}");
                assert!(guard.spare.capacity() >= FLUSH_AT, "write-out {write_outs}");
            }
        }
        assert!(write_outs >= 3, "{write_outs}");
        let rest = std::mem::take(&mut lock(&pending).lines);
        written.extend_from_slice(&rest);
        assert!(written == sent);
    }

    /// While one thread writes lines out, another's lines wait in the buffer (it neither
    /// writes them ahead of the first's nor waits for stderr); the first line after that
    /// turn writes them all.
    #[test]
    fn one_thread_writes_at_a_time() {
        let pending = Mutex::new(Pending::new());
        let line = [b'x'; 1000];
        lock(&pending).writing = true;
        let mut written = Vec::new();
        for _ in 0..FLUSH_AT / 1000 * 2 {
            append(&pending, &line, || &mut written).unwrap();
        }
        assert!(written.is_empty());
        let waiting = lock(&pending).lines.len();
        assert!(waiting >= 2 * FLUSH_AT - 2000, "{waiting}");
        lock(&pending).writing = false;
        append(&pending, b"end\n", || &mut written).unwrap();
        assert_eq!(written.len(), waiting + 4);
        assert!(written.ends_with(b"end\n"));
        assert!(!lock(&pending).writing);
    }

    /// flush waits for a turn in progress, but not for ever: a writer that never ended its
    /// turn leaves the lines to be written after a second.
    #[test]
    fn flush_waits_for_a_turn_a_second_at_most() {
        let pending = Mutex::new(Pending::new());
        append(&pending, b"a\n", Vec::new).unwrap();
        lock(&pending).writing = true;
        let mut written = Vec::new();
        let start = std::time::Instant::now();
        flush_to(&pending, || &mut written);
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(written, b"a\n");
    }
}
