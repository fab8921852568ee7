//! Thread per core: `workers` single-threaded runtimes, each on its own thread, each with its
//! own socket for every TCP listener (`SO_REUSEPORT`: the kernel spreads new connections
//! over them).
//!
//! A connection is accepted, served and proxied on one thread for its whole life: its tasks
//! never migrate, wake-ups stay on one core, and the scheduler needs no work-stealing
//! queues or cross-thread atomics — as HAProxy's, Envoy's and Pingora's workers do. The
//! upstream pools are sharded the same way ([`index`]), so a request reuses connections its
//! own thread drives.
//!
//! Worker 0 is the thread that runs `spur proxy`'s main loop: it also runs the admin server,
//! the control-plane client, DNS refreshes, health checks and HTTP/3 listeners (one UDP
//! socket each). In a test, or any program that builds a proxy inside its own runtime, that
//! runtime is the only worker.

use std::cell::Cell;
use std::sync::OnceLock;
use tokio::runtime::{Builder, Handle, Runtime};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

static COUNT: OnceLock<usize> = OnceLock::new();

/// This thread's worker number (0 on any thread that is not a worker).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers this process runs (1 until [`start`] says otherwise).
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// The handles of a process's workers, worker 0 first.
#[derive(Clone)]
pub struct Workers(Vec<Handle>);

impl Workers {
    /// The current runtime as the only worker.
    pub fn current() -> Option<Workers> {
        Handle::try_current().ok().map(|h| Workers(vec![h]))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn handle(&self, i: usize) -> &Handle {
        &self.0[i % self.0.len()]
    }

    /// Has each worker's thread keep freed blocks for its next allocations from now on
    /// ([`crate::alloc`]; where [`crate::alloc::ThreadCache`] is the process's allocator,
    /// as in Spur's binaries). `spur proxy` calls it once started, so that what start-up
    /// freed went back to glibc; only for workers [`start`] made, which live as long as
    /// the process (a thread that ends with its cache on leaks the blocks in it).
    pub fn keep_freed_blocks(&self) {
        for h in &self.0 {
            h.spawn(async { crate::alloc::ThreadCache::enable() });
        }
    }
}

/// How many workers to run: `TOKIO_WORKER_THREADS` (kept for compatibility), else the
/// config's `workers`, else one per core.
pub fn wanted(configured: Option<u32>) -> usize {
    let from_env = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0);
    from_env
        .or(configured.map(|n| n as usize))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// Starts `n` workers: returns worker 0's runtime (the caller runs it with `block_on`) and
/// the handles of all of them. Workers 1.. run on threads of their own until the process
/// exits.
pub fn start(n: usize) -> std::io::Result<(Runtime, Workers)> {
    let n = n.max(1);
    let _ = COUNT.set(n);
    let main = Builder::new_current_thread().enable_all().build()?;
    let mut handles = vec![main.handle().clone()];
    for i in 1..n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("spur-worker-{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i));
                let rt = match Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            })?;
        handles.push(rx.recv().map_err(std::io::Error::other)??);
    }
    Ok((main, Workers(handles)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::ThreadCache;
    use std::alloc::{GlobalAlloc, Layout};

    /// Allocates and frees a block on this thread; how many blocks its cache then holds.
    fn kept_after_a_free() -> usize {
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a block freed with the layout it was allocated with.
        unsafe { ThreadCache.dealloc(ThreadCache.alloc(layout), layout) };
        ThreadCache::cached().0
    }

    #[test]
    fn each_workers_cache_is_off_until_the_proxy_has_started() {
        std::thread::spawn(|| {
            // Worker 0 as `spur proxy` makes it (one worker: `start` makes no thread and
            // leaves the worker count at its default), and a second worker as `start` makes
            // the others: a runtime on a thread of its own.
            let (rt, first) = start(1).unwrap();
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let other = std::thread::spawn(move || {
                let rt = Builder::new_current_thread().build().unwrap();
                handle_tx.send(rt.handle().clone()).unwrap();
                let _ = rt.block_on(stop_rx);
                ThreadCache::flush();
            });
            let workers = Workers(vec![first.handle(0).clone(), handle_rx.recv().unwrap()]);
            let kept_on = |i: usize| {
                rt.block_on(workers.handle(i).spawn(async { kept_after_a_free() }))
                    .unwrap()
            };
            assert_eq!(
                (kept_on(0), kept_on(1)),
                (0, 0),
                "start-up's frees go to glibc"
            );
            workers.keep_freed_blocks();
            assert_eq!(
                (kept_on(0), kept_on(1)),
                (1, 1),
                "kept on every worker once started"
            );
            ThreadCache::flush();
            stop_tx.send(()).unwrap();
            other.join().unwrap();
        })
        .join()
        .unwrap();
    }
}
