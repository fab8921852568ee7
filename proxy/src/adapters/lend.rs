//! Buffers a worker lends its HTTP/2 connections for one turn at a time.
//!
//! A connection needs a read buffer and a write buffer only while it reads and writes: at
//! the end of a turn that left nothing in them (no frame half read, everything written),
//! they go back to the worker, and the next connection to take a turn on that worker
//! borrows them. So an idle connection holds no buffer at all, as HAProxy's connections
//! hold none from its buffer pools between reads, and a busy worker goes round its
//! connections with one read and one write buffer that stay in cache. A connection that
//! keeps bytes over a turn keeps its buffer; the next borrower then gets an empty one and
//! makes its own. Each worker is one thread ([`crate::workers`]): the buffers are
//! thread-local, and a turn never spans two threads.

use bytes::BytesMut;
use std::cell::Cell;

thread_local! {
    static READ: Cell<BytesMut> = Cell::new(BytesMut::new());
    static WRITE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// The worker's read buffer (one with no room when another connection has it).
pub fn read_buf() -> BytesMut {
    READ.with(Cell::take)
}

/// The worker's write buffer (one with no room when another connection has it).
pub fn write_buf() -> Vec<u8> {
    WRITE.with(Cell::take)
}

/// Gives an emptied read buffer back to the worker, from its front again (see
/// [`crate::headers::rewind_empty`]); a buffer with bytes in it stays.
pub fn give_read(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        crate::headers::rewind_empty(buf);
        READ.with(|spare| spare.set(std::mem::take(buf)));
    }
}

/// Gives an emptied write buffer back to the worker; a buffer with bytes in it stays.
pub fn give_write(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        WRITE.with(|spare| spare.set(std::mem::take(buf)));
    }
}
