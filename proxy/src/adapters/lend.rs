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
//! one. A worker keeps up to [`KEPT`] buffers of each kind given back, none larger than
//! [`KEPT_MAX`] (a write buffer that grew for a slow client is freed, not kept); the rest
//! are freed. The buffers are thread-local: a Spur worker is one thread
//! ([`crate::workers`]). On a runtime of several threads (tests, an embedding program) a
//! buffer a connection kept over a turn may come back on another thread, which is
//! harmless: it joins that thread's buffers.
//!
//! HTTP/1.1 does not borrow: its read buffer is shared by the values of the request in
//! progress, so it would be given back only between requests, and borrowing it again for
//! every request cost about 370 instructions per request (1.4%) to save 2 KiB per idle
//! connection, which parking already frees.

use bytes::BytesMut;
use std::cell::RefCell;

/// Buffers of each kind a worker keeps.
const KEPT: usize = 64;
/// The largest buffer kept (bytes of capacity): a read buffer is 16 KiB and a frame head,
/// a write buffer 4 KiB unless a turn's output outgrew it.
const KEPT_MAX: usize = 32 * 1024;

thread_local! {
    static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static WRITE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take<T: Default>(kept: &'static std::thread::LocalKey<RefCell<Vec<T>>>) -> T {
    kept.with(|k| k.borrow_mut().pop().unwrap_or_default())
}

fn keep<T>(kept: &'static std::thread::LocalKey<RefCell<Vec<T>>>, buf: T, capacity: usize) {
    if capacity > KEPT_MAX {
        return;
    }
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
        let capacity = buf.capacity();
        keep(&READ, std::mem::take(buf), capacity);
    }
}

/// A write buffer of the worker's (one with no room when it has none left).
pub fn write_buf() -> Vec<u8> {
    take(&WRITE)
}

/// Gives an emptied write buffer back to the worker; one with bytes in it stays.
pub fn give_write(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        let capacity = buf.capacity();
        keep(&WRITE, std::mem::take(buf), capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_with_bytes_in_it_stays_with_its_connection() {
        let mut read = BytesMut::from(&b"half a frame"[..]);
        give_read(&mut read);
        assert_eq!(&read[..], b"half a frame");
        assert_eq!(
            read_buf().capacity(),
            0,
            "a read buffer with bytes was given back"
        );
        let mut write = b"unwritten".to_vec();
        give_write(&mut write);
        assert_eq!(write, b"unwritten");
        assert_eq!(
            write_buf().capacity(),
            0,
            "a write buffer with bytes was given back"
        );
    }

    #[test]
    fn emptied_buffers_are_lent_again_unless_too_large() {
        let mut read = BytesMut::with_capacity(16 * 1024);
        let at = read.as_ptr();
        give_read(&mut read);
        assert_eq!(read.capacity(), 0, "given back");
        assert_eq!(read_buf().as_ptr(), at, "the same buffer lent again");
        let mut big = Vec::with_capacity(KEPT_MAX + 1);
        give_write(&mut big);
        assert_eq!(big.capacity(), 0, "taken from the connection");
        assert_eq!(write_buf().capacity(), 0, "freed, not kept");
    }
}
