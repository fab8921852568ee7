//! Buffers a worker lends its HTTP/2 connections for one turn at a time.
//!
//! A connection needs a read buffer and a write buffer only while it reads and writes: at
//! the end of a turn that left nothing in them (no frame half read, everything written),
//! they go back to the worker, and the next connection to take a turn on that worker
//! borrows them. So an idle connection holds no buffer at all, as HAProxy's connections
//! hold none from its buffer pools between reads, and a busy worker goes round its
//! connections with the same buffers, still in cache.
//!
//! A connection that keeps bytes over a turn (a frame half read, output the client has not
//! taken) keeps its buffer, and the next borrower gets another of the worker's, or a new
//! one. A worker keeps up to [`KEPT`] buffers of each kind given back; more are freed. Each
//! worker is one thread ([`crate::workers`]): the buffers are thread-local, and a turn
//! never spans two threads.
//!
//! HTTP/1.1 does not borrow: its read buffer is shared by the values of the request in
//! progress, so it would be given back only between requests, and borrowing it again for
//! every request cost about 370 instructions per request (1.4%) to save 2 KiB per idle
//! connection, which parking already frees.

use bytes::BytesMut;
use std::cell::RefCell;

/// Buffers of each kind a worker keeps.
const KEPT: usize = 64;

thread_local! {
    static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take<T: Default>(kept: &'static std::thread::LocalKey<RefCell<Vec<T>>>) -> T {
    kept.with(|k| k.borrow_mut().pop().unwrap_or_default())
}

fn keep<T>(kept: &'static std::thread::LocalKey<RefCell<Vec<T>>>, buf: T) {
    kept.with(|k| {
        let mut k = k.borrow_mut();
        if k.len() < KEPT {
            k.push(buf);
        }
    })
}

/// A read buffer of the worker's (one with no room when it has none left).
pub fn read_buf() -> BytesMut {
    take(&READ)
}

/// Gives an emptied read buffer back to the worker, from its front again (see
/// [`crate::headers::rewind_empty`]); a buffer with bytes in it stays.
pub fn give_read(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        crate::headers::rewind_empty(buf);
        keep(&READ, std::mem::take(buf));
    }
}

/// A write buffer of the worker's (one with no room when it has none left).
pub fn write_buf() -> Vec<u8> {
    take(&WRITE)
}

/// Gives an emptied write buffer back to the worker; one with bytes in it stays.
pub fn give_write(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        keep(&WRITE, std::mem::take(buf));
    }
}
