//! The upgrade conversation's transport: JSON lines over a Unix stream socket, with file
//! descriptors passed beside them as `SCM_RIGHTS` ancillary data.
//!
//! std and tokio do not expose ancillary data, and neither `nix` nor `rustix` is in the
//! tree, so the two system calls are made here with `libc` (already a dependency). Both
//! sides only ever read with `recvmsg`: a plain `read` would silently close descriptors
//! attached to the bytes it consumes. Descriptors go in batches of [`BATCH`], each batch
//! on one `sendmsg` with one byte (`\n`, an empty line the reader skips); the kernel never
//! merges two batches into one `recvmsg`, and the reader keeps whatever arrives in order.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Descriptors per `sendmsg` (the kernel's limit, `SCM_MAX_FD`, is 253).
const BATCH: usize = 64;

/// Room for the descriptors of one `recvmsg`.
const RECV_FDS: usize = 253;

/// What a running process can hand over: one listening socket, or a listener's sockets (one
/// per worker when they share the address with `SO_REUSEPORT`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    pub kind: Kind,
    /// The listener's name (`admin` for the admin server).
    pub name: String,
    /// The address as configured (port 0 stays 0): new listeners are matched on it.
    pub listen: String,
    /// How many descriptors follow for it.
    pub count: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `http` and `tcp` listeners.
    Tcp,
    /// `http3` listeners: the QUIC endpoint's UDP socket.
    Udp,
    /// The admin server.
    Admin,
}

/// One line of the conversation.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    /// New to old: hand me your sockets.
    Hello { pid: u32 },
    /// Old to new: these sockets follow, descriptors in this order.
    Sockets { pid: u32, sockets: Vec<SocketInfo> },
    /// Old to new: no (another upgrade is in progress, or this process is draining).
    Refused { pid: u32, message: String },
    /// New to old: I am ready; drain and exit.
    Drain,
    /// Old to new: draining now; the upgrade socket's path is yours.
    Draining,
}

/// One end of an upgrade conversation.
pub struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Channel {
        Channel {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `msg`, then `fds` in batches.
    pub async fn send(&self, msg: &Message, fds: &[RawFd]) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut data: &[u8] = &line;
        while !data.is_empty() {
            let n = self.send_raw(data, &[]).await?;
            data = &data[n..];
        }
        for batch in fds.chunks(BATCH) {
            // One byte carries the batch; a stream socket takes it whole or not at all.
            self.send_raw(b"\n", batch).await?;
        }
        Ok(())
    }

    async fn send_raw(&self, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        loop {
            self.stream.writable().await?;
            match self
                .stream
                .try_io(Interest::WRITABLE, || sendmsg(fd, data, fds))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// The next message; `None` when the other side has closed the connection.
    pub async fn recv(&mut self) -> io::Result<Option<Message>> {
        loop {
            while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.len() == 1 {
                    continue; // a batch's carrier byte
                }
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The next `n` descriptors, in the order they were sent.
    pub async fn recv_fds(&mut self, n: usize) -> io::Result<Vec<OwnedFd>> {
        while self.fds.len() < n {
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other process closed the upgrade socket mid-handover",
                ));
            }
        }
        Ok(self.fds.drain(..n).collect())
    }

    /// One `recvmsg`: bytes to the line buffer, descriptors to the queue. 0 at the end.
    async fn fill(&mut self) -> io::Result<usize> {
        let fd = self.stream.as_raw_fd();
        let mut chunk = [0u8; 4096];
        let mut got = Vec::new();
        let n = loop {
            self.stream.readable().await?;
            match self
                .stream
                .try_io(Interest::READABLE, || recvmsg(fd, &mut chunk, &mut got))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        self.buf.extend_from_slice(&chunk[..n]);
        self.fds.extend(got);
        Ok(n)
    }
}

/// `sendmsg` with `fds` as one `SCM_RIGHTS` message (none when empty).
fn sendmsg(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid (no name, no control); every pointer set below
    // points into `iov` or `control`, which outlive the call, with their true lengths.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), bytes);
        }
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// `recvmsg` into `buf`; received descriptors (close-on-exec) are pushed to `fds`.
fn recvmsg(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let fd_size = std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE((RECV_FDS * fd_size) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `sendmsg`; the kernel writes at most `msg_controllen` bytes of control
    // data, and each descriptor it reports is new and owned by this process.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..len / fd_size {
                    let raw = std::ptr::read_unaligned(data.add(i * fd_size).cast::<RawFd>());
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptors were dropped in transit (control data truncated)",
            ));
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[tokio::test]
    async fn messages_and_descriptors_arrive_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, mut b) = (Channel::new(a), Channel::new(b));
        // 150 open files, each with its own content: more than two batches.
        let files: Vec<std::fs::File> = (0..150)
            .map(|i| {
                let mut f = tempfile_in_memory();
                write!(f, "file {i}").unwrap();
                f
            })
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        a.send(&Message::Hello { pid: 7 }, &raw).await.unwrap();
        a.send(&Message::Drain, &[]).await.unwrap();
        assert!(matches!(
            b.recv().await.unwrap(),
            Some(Message::Hello { pid: 7 })
        ));
        let got = b.recv_fds(150).await.unwrap();
        for (i, fd) in got.into_iter().enumerate() {
            let mut f = std::fs::File::from(fd);
            f.rewind().unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, format!("file {i}"));
        }
        assert!(matches!(b.recv().await.unwrap(), Some(Message::Drain)));
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }

    /// An anonymous file (memfd): no path on disk to clean up.
    fn tempfile_in_memory() -> std::fs::File {
        // SAFETY: the name is a valid C string; a returned descriptor is new and ours.
        let fd = unsafe { libc::memfd_create(c"spur-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: just created, owned by nobody else.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }
}
