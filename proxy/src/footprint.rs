//! Giving memory back once connections go idle.
//!
//! A parked connection (see `crate::adapters::http_conn`) frees hyper's buffers, but glibc's
//! allocator keeps freed memory in its arenas: the process's resident size stays at its
//! high-water mark. After connections have parked, [`spawn_trimmer`] asks the allocator
//! (`malloc_trim`) to return free pages to the system — at most once a second, and only
//! when something parked since the last time, so a busy proxy never pays for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static PARKED: AtomicU64 = AtomicU64::new(0);

/// Counts a connection that just dropped its buffers.
pub fn parked() {
    PARKED.fetch_add(1, Ordering::Relaxed);
}

/// Connections parked since the process started.
pub fn parked_total() -> u64 {
    PARKED.load(Ordering::Relaxed)
}

/// Starts the once-a-second trim on the current runtime; it ends when the runtime does.
pub fn spawn_trimmer() {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async {
        let mut seen = PARKED.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = PARKED.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                trim();
            }
        }
    });
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's own arenas to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
