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

static BUFFER: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
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

fn buffer() -> &'static Mutex<Vec<u8>> {
    BUFFER.get_or_init(|| {
        std::thread::Builder::new()
            .name("spur-log".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            })
            .expect("log flusher thread");
        Mutex::new(Vec::with_capacity(FLUSH_AT * 2))
    })
}

/// Writes out every buffered log line.
pub fn flush() {
    let Some(buf) = BUFFER.get() else { return };
    let pending = std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
    if !pending.is_empty() {
        let _ = std::io::stderr().lock().write_all(&pending);
    }
}

/// A writer for one log event: appends to the shared buffer.
pub struct BufferedStderr;

impl Write for BufferedStderr {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = buffer().lock().unwrap_or_else(|e| e.into_inner());
        buf.extend_from_slice(data);
        if buf.len() >= FLUSH_AT {
            let pending = std::mem::take(&mut *buf);
            drop(buf);
            std::io::stderr().lock().write_all(&pending)?;
        }
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
