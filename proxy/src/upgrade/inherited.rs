//! The sockets a new process received from the old one, matched to its config's listeners
//! by address.
//!
//! A listener takes the inherited socket(s) of the same kind whose configured address is
//! its own (a port-0 address matches only the listener of the same name, since its real
//! port was picked by the old process). The pool hands out duplicates and keeps its own
//! descriptors until the old process has confirmed it drains ([`Inherited::clear`]): a
//! config that is rejected before then can be retried without losing a socket.

use super::channel::{Kind, SocketInfo};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

/// Sockets received in an upgrade, not yet all claimed.
#[derive(Default)]
pub struct Inherited {
    entries: Vec<(SocketInfo, Vec<OwnedFd>)>,
}

impl Inherited {
    pub fn new(entries: Vec<(SocketInfo, Vec<OwnedFd>)>) -> Inherited {
        Inherited { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every descriptor the pool holds (the listeners keep their own).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn find(&self, kind: Kind, name: &str, listen: &str, port: u16) -> Option<&[OwnedFd]> {
        self.entries
            .iter()
            .find(|(info, fds)| {
                info.kind == kind
                    && info.listen == listen
                    && (port != 0 || info.name == name)
                    && !fds.is_empty()
            })
            .map(|(_, fds)| fds.as_slice())
    }

    /// The TCP sockets of a listener on `listen`, checked to be bound there.
    pub fn tcp(
        &self,
        name: &str,
        listen: SocketAddr,
    ) -> io::Result<Option<Vec<std::net::TcpListener>>> {
        let Some(fds) = self.find(Kind::Tcp, name, &listen.to_string(), listen.port()) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(fds.len());
        for fd in fds {
            let socket = std::net::TcpListener::from(fd.try_clone()?);
            check(socket.local_addr()?, listen)?;
            out.push(socket);
        }
        Ok(Some(out))
    }

    /// The UDP socket of an `http3` listener on `listen`.
    pub fn udp(&self, name: &str, listen: SocketAddr) -> io::Result<Option<std::net::UdpSocket>> {
        let Some(fds) = self.find(Kind::Udp, name, &listen.to_string(), listen.port()) else {
            return Ok(None);
        };
        let socket = std::net::UdpSocket::from(fds[0].try_clone()?);
        check(socket.local_addr()?, listen)?;
        Ok(Some(socket))
    }

    /// The admin server's socket, if the old one listened on `listen` too.
    pub fn admin(&self, listen: SocketAddr) -> io::Result<Option<std::net::TcpListener>> {
        let Some(fds) = self.find(Kind::Admin, "admin", &listen.to_string(), 1) else {
            return Ok(None);
        };
        let socket = std::net::TcpListener::from(fds[0].try_clone()?);
        check(socket.local_addr()?, listen)?;
        Ok(Some(socket))
    }
}

/// An inherited socket must be bound where the config says (any port for port 0).
fn check(actual: SocketAddr, listen: SocketAddr) -> io::Result<()> {
    if actual.ip() == listen.ip() && (listen.port() == 0 || actual.port() == listen.port()) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the socket inherited for {listen} is bound to {actual}"),
        ))
    }
}
