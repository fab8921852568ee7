//! The process's allocator: the system's (glibc's), with a cache of freed small blocks on
//! each worker thread in front of it.
//!
//! glibc's own per-thread cache keeps seven freed blocks of a size, and only of sizes up to
//! 1,032 bytes; past either, `malloc` and `free` take its slow path (bins, splitting,
//! consolidation). A worker serving an HTTP/2 connection with ten streams at once frees
//! more than seven blocks of a size before it allocates them again, and a request's header
//! maps are above 1,032 bytes once Spur adds its headers: an HTTP/2 request made 13
//! allocations and 13 frees, about 4,300 of its 43,000 instructions, most on the slow path.
//! Here a worker keeps up to [`PER_CLASS`] freed blocks of each size class up to
//! [`MAX_CACHED`] bytes, [`BUDGET`] bytes in all, and hands them out again first: an
//! allocation from the cache is a few loads and stores.
//!
//! The budget is sized for a worker with about a hundred requests in flight (ten HTTP/2
//! connections of ten streams each, as `benches/run.sh` sends): an HTTP/2 request holds
//! about 9.5 KiB in a dozen blocks, 2.5 and 3.1 KiB the largest, so all of a hundred
//! requests' blocks come back into 1 MiB. With 256 KiB, about a fifth of those blocks went
//! to glibc and came back from it (2.4 calls to glibc's `malloc` per request under that
//! load), blocks of 1 KiB and more through its large bins, whose every allocation first
//! merges glibc's small freed blocks (`malloc_consolidate`). A worker's cache is turned on
//! once `spur proxy` has started ([`crate::workers::Workers::keep_freed_blocks`]), so
//! what start-up frees (with a config file, compiling it and binding its listeners) goes
//! back to glibc rather than staying in the cache; a config from the control plane comes
//! after, and what its compiling frees is kept like any other block, within the budget.
//!
//! Every block is a glibc block: a size class's blocks are allocated at the class's size
//! (a size glibc would round the request to anyway, so nothing is wasted), on every thread
//! whether its cache is on or not. So any block of a class can serve any request of that
//! class, and a block can be freed on any thread, into that thread's cache or to glibc.
//! Only threads that turned their cache on ([`ThreadCache::enable`]: `spur proxy`'s workers,
//! which live as long as the process) keep blocks; on any other thread the allocator is
//! glibc's. Alignments above 16 bytes and larger blocks always go to glibc.
//!
//! Mimalloc was measured in the first round of the performance work and not kept: idle
//! memory 11.8 -> 17.5 MiB and 24 -> 38 KiB per idle connection, for no gain beyond noise.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The step between size classes (glibc's chunk granularity on 64-bit).
const STEP: usize = 16;
/// The smallest class: glibc's smallest usable size.
const SMALLEST: usize = 24;
const CLASSES: usize = 256;
/// The largest size cached: the last class's size.
pub const MAX_CACHED: usize = SMALLEST + (CLASSES - 1) * STEP;
/// Freed blocks kept per class on a thread: more than a hundred requests' worth of a
/// request's most frequent size.
pub const PER_CLASS: u32 = 256;
/// Bytes kept in all on a thread (see the module's documentation).
pub const BUDGET: usize = 1024 * 1024;

/// The allocator (see the module's documentation).
pub struct ThreadCache;

struct Cache {
    on: bool,
    bytes: usize,
    /// Each class's freed blocks: a list linked through the blocks' first word.
    heads: [*mut u8; CLASSES],
    counts: [u32; CLASSES],
}

thread_local! {
    // Constant-initialised and without a destructor: reading it never allocates, so the
    // allocator can use it.
    static CACHE: UnsafeCell<Cache> = const {
        UnsafeCell::new(Cache {
            on: false,
            bytes: 0,
            heads: [ptr::null_mut(); CLASSES],
            counts: [0; CLASSES],
        })
    };
}

/// The class of a block of `layout`, if its blocks are cached.
#[inline]
fn class_of(layout: &Layout) -> Option<usize> {
    if layout.size() > MAX_CACHED || layout.align() > STEP {
        return None;
    }
    Some(layout.size().saturating_sub(SMALLEST).div_ceil(STEP))
}

#[inline]
fn class_size(class: usize) -> usize {
    SMALLEST + class * STEP
}

/// The layout glibc is asked for: the class's size.
#[inline]
fn class_layout(class: usize, align: usize) -> Layout {
    // SAFETY: align is a power of two up to 16 (it came from a Layout) and the size is
    // at most MAX_CACHED, far from overflowing when rounded up to it.
    unsafe { Layout::from_size_align_unchecked(class_size(class), align) }
}

/// Runs `f` on this thread's cache if it is on.
#[inline]
fn with_cache<R>(f: impl FnOnce(&mut Cache) -> Option<R>) -> Option<R> {
    CACHE
        .try_with(|c| {
            // SAFETY: the cache is this thread's, and `f` neither allocates nor frees (the
            // only way to re-enter this function on the same thread).
            let c = unsafe { &mut *c.get() };
            if c.on {
                f(c)
            } else {
                None
            }
        })
        .ok()
        .flatten()
}

/// A cached block of `class`, if there is one.
#[inline]
fn take(class: usize) -> Option<*mut u8> {
    with_cache(|c| {
        let head = c.heads[class];
        if head.is_null() {
            return None;
        }
        // SAFETY: a cached block holds the next block's address in its first word.
        c.heads[class] = unsafe { head.cast::<*mut u8>().read() };
        c.counts[class] -= 1;
        c.bytes -= class_size(class);
        Some(head)
    })
}

/// Keeps `block` of `class` if the cache has room; false when it does not.
#[inline]
fn keep(block: *mut u8, class: usize) -> bool {
    with_cache(|c| {
        let size = class_size(class);
        if c.counts[class] >= PER_CLASS || c.bytes + size > BUDGET {
            return None;
        }
        // SAFETY: the block is at least SMALLEST bytes and 8-aligned (glibc's), and no
        // longer in use: its first word links it in.
        unsafe { block.cast::<*mut u8>().write(c.heads[class]) };
        c.heads[class] = block;
        c.counts[class] += 1;
        c.bytes += size;
        Some(())
    })
    .is_some()
}

impl ThreadCache {
    /// Turns this thread's cache on (for a thread that lives as long as the process, or
    /// calls [`ThreadCache::flush`] before it ends: the blocks of a thread that ends with
    /// its cache on are not freed).
    pub fn enable() {
        let _ = CACHE.try_with(|c| {
            // SAFETY: this thread's cache, not in use by an allocation right now.
            unsafe { (*c.get()).on = true };
        });
    }

    /// Gives this thread's cached blocks back to glibc and turns its cache off.
    pub fn flush() {
        let _ = CACHE.try_with(|c| {
            // SAFETY: as in `enable`; the cache is off before the first free below, so
            // those frees do not come back into it.
            let c = unsafe { &mut *c.get() };
            c.on = false;
            for class in 0..CLASSES {
                let mut block = std::mem::replace(&mut c.heads[class], ptr::null_mut());
                while !block.is_null() {
                    // SAFETY: a cached block: its first word is the next one; it was
                    // allocated by glibc with the class's layout.
                    unsafe {
                        let next = block.cast::<*mut u8>().read();
                        System.dealloc(block, class_layout(class, 1));
                        block = next;
                    }
                }
                c.counts[class] = 0;
            }
            c.bytes = 0;
        });
    }

    /// Blocks and bytes this thread's cache holds.
    pub fn cached() -> (usize, usize) {
        CACHE
            .try_with(|c| {
                // SAFETY: a read of this thread's cache, not in use by an allocation.
                let c = unsafe { &*c.get() };
                (c.counts.iter().map(|&n| n as usize).sum(), c.bytes)
            })
            .unwrap_or((0, 0))
    }
}

// SAFETY: every block handed out is glibc's with at least the size asked for (a class's
// blocks are allocated at the class's size, on every thread, and only blocks of that class
// are cached in it) and the alignment asked for (16 at most here, which glibc gives every
// block; larger alignments go to glibc alone).
unsafe impl GlobalAlloc for ThreadCache {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(&layout) {
            Some(class) => match take(class) {
                Some(block) => block,
                // SAFETY: a non-zero size (the class's) and the caller's alignment.
                None => unsafe { System.alloc(class_layout(class, layout.align())) },
            },
            // SAFETY: the caller's layout, as the caller promised it.
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(&layout) {
            Some(class) => match take(class) {
                Some(block) => {
                    // SAFETY: the block has at least layout.size() bytes.
                    unsafe { ptr::write_bytes(block, 0, layout.size()) };
                    block
                }
                // SAFETY: as in `alloc`.
                None => unsafe { System.alloc_zeroed(class_layout(class, layout.align())) },
            },
            // SAFETY: as in `alloc`.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if let Some(class) = class_of(&layout) {
            if keep(block, class) {
                return;
            }
        }
        // SAFETY: a glibc block (every block is), no longer used by the caller.
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller promises new_size rounded up to the alignment does not
        // overflow.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(&layout), class_of(&new_layout)) {
            // Neither end is cached: glibc's realloc, which may grow in place.
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            // The same class: the block has room already.
            (Some(a), Some(b)) if a == b => block,
            _ => {
                // SAFETY: a valid layout (see above); the old block has layout.size()
                // bytes, the new one new_size, and they do not overlap.
                unsafe {
                    let fresh = self.alloc(new_layout);
                    if !fresh.is_null() {
                        ptr::copy_nonoverlapping(block, fresh, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    fresh
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ThreadCache = ThreadCache;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    /// Runs `f` on a thread of its own with its cache on, then flushes it.
    fn on_a_cached_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            ThreadCache::enable();
            f();
            ThreadCache::flush();
            assert_eq!(
                ThreadCache::cached(),
                (0, 0),
                "a flush gives everything back"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn every_block_has_its_whole_class_whether_cached_or_not() {
        // What makes it safe for a freed block to serve any size of its class.
        for size in 1..=MAX_CACHED + 64 {
            let l = layout(size);
            let p = unsafe { A.alloc(l) };
            let usable = unsafe { libc::malloc_usable_size(p.cast()) };
            let need = class_of(&l).map_or(size, class_size);
            assert!(need >= size, "size {size} in a class of {need}");
            assert!(usable >= need, "size {size}: usable {usable} < {need}");
            unsafe { A.dealloc(p, l) };
        }
    }

    #[test]
    fn a_freed_block_serves_the_next_allocation_of_its_class() {
        on_a_cached_thread(|| unsafe {
            let p = A.alloc(layout(1000));
            A.dealloc(p, layout(1000));
            assert_eq!(
                ThreadCache::cached(),
                (1, class_size(class_of(&layout(1000)).unwrap()))
            );
            // 990 and 1,000 bytes are one class (985..=1,000): the block comes back for
            // either.
            let q = A.alloc(layout(990));
            assert_eq!(q, p);
            assert_eq!(ThreadCache::cached(), (0, 0));
            // A zeroed allocation from the cache is zeroed.
            ptr::write_bytes(q, 0xAB, 990);
            A.dealloc(q, layout(990));
            let z = A.alloc_zeroed(layout(1000));
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, 1000).iter().all(|&b| b == 0));
            A.dealloc(z, layout(1000));
            // Over-aligned and large blocks are glibc's alone.
            let big = Layout::from_size_align(64, 64).unwrap();
            let b = A.alloc(big);
            A.dealloc(b, big);
            let l = A.alloc(layout(MAX_CACHED + 1));
            A.dealloc(l, layout(MAX_CACHED + 1));
            assert_eq!(ThreadCache::cached().0, 1);
        });
    }

    #[test]
    fn the_cache_keeps_a_class_count_and_a_byte_budget_at_most() {
        on_a_cached_thread(|| unsafe {
            let small: Vec<_> = (0..PER_CLASS + 10).map(|_| A.alloc(layout(64))).collect();
            for &p in &small {
                A.dealloc(p, layout(64));
            }
            assert_eq!(ThreadCache::cached().0, PER_CLASS as usize);
            ThreadCache::flush();
            ThreadCache::enable();
            // Two classes of large blocks, neither over its count: the budget stops them.
            const EACH: u32 = 200;
            const { assert!(EACH < PER_CLASS, "each class stays under its count") };
            let sizes = [MAX_CACHED, MAX_CACHED - STEP];
            let big: Vec<_> = (0..EACH)
                .flat_map(|_| sizes.map(|size| (A.alloc(layout(size)), size)))
                .collect();
            for &(p, size) in &big {
                A.dealloc(p, layout(size));
            }
            let (blocks, bytes) = ThreadCache::cached();
            assert!(blocks < big.len(), "{blocks} blocks kept");
            assert!(bytes <= BUDGET, "{bytes} bytes kept");
            assert!(bytes > BUDGET - MAX_CACHED, "{bytes} bytes kept");
        });
    }

    #[test]
    fn a_thread_without_its_cache_on_keeps_nothing() {
        std::thread::spawn(|| unsafe {
            let p = A.alloc(layout(100));
            A.dealloc(p, layout(100));
            assert_eq!(ThreadCache::cached(), (0, 0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_block_freed_on_another_thread_is_kept_there() {
        let p = unsafe { A.alloc(layout(200)) } as usize;
        on_a_cached_thread(move || unsafe {
            A.dealloc(p as *mut u8, layout(200));
            assert_eq!(ThreadCache::cached().0, 1);
            assert_eq!(A.alloc(layout(190)) as usize, p);
        });
        // (The test thread's cache is off: its allocation above was glibc's.)
    }

    #[test]
    fn realloc_keeps_the_contents_across_classes_and_sizes() {
        on_a_cached_thread(|| unsafe {
            let sizes = [
                10,
                24,
                25,
                700,
                1500,
                MAX_CACHED,
                MAX_CACHED + 1,
                20_000,
                300,
                5,
            ];
            let mut p = A.alloc(layout(sizes[0]));
            let mut size = sizes[0];
            for (i, b) in std::slice::from_raw_parts_mut(p, size)
                .iter_mut()
                .enumerate()
            {
                *b = i as u8;
            }
            for &next in &sizes[1..] {
                p = A.realloc(p, layout(size), next);
                let kept = size.min(next);
                let bytes = std::slice::from_raw_parts(p, kept);
                assert!(
                    bytes.iter().enumerate().all(|(i, &b)| b == i as u8),
                    "{size} -> {next}"
                );
                for (i, b) in std::slice::from_raw_parts_mut(p, next)
                    .iter_mut()
                    .enumerate()
                {
                    *b = i as u8;
                }
                let usable = libc::malloc_usable_size(p.cast());
                assert!(usable >= class_of(&layout(next)).map_or(next, class_size));
                size = next;
            }
            A.dealloc(p, layout(size));
        });
    }
}
