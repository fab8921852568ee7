//! Listen addresses that cannot all be bound: the same port on an address and on a
//! wildcard that covers it.
//!
//! `0.0.0.0:8080` takes port 8080 on every IPv4 address, so `127.0.0.1:8080` beside it
//! fails to bind; `[::]:8080` takes it on every IPv6 address and, since Linux binds `[::]`
//! dual-stack, on every IPv4 address too. TCP listeners and UDP (`http3`) listeners are
//! apart: one port number may serve both. Port 0 asks the system for a free port and never
//! overlaps.

use super::Errors;
use crate::types::{Listener, ListenerProtocol};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The listeners seen so far on one transport and port.
#[derive(Default)]
struct Port {
    /// The first on `[::]`, the first on `0.0.0.0`, the first on a specific IPv4 address.
    any6: Option<usize>,
    any4: Option<usize>,
    some4: Option<usize>,
    /// Each specific address, by its first listener.
    exact: HashMap<IpAddr, usize>,
}

impl Port {
    /// The earlier listener that `ip` overlaps, if any; then records `ip` as listener `i`.
    fn add(&mut self, ip: IpAddr, i: usize) -> Option<usize> {
        let clash = match ip {
            IpAddr::V6(v6) if v6.is_unspecified() => self
                .any6
                .or(self.any4)
                .or(self.some4)
                .or_else(|| self.first_exact()),
            IpAddr::V4(v4) if v4.is_unspecified() => self.any6.or(self.any4).or(self.some4),
            IpAddr::V4(_) => self
                .any6
                .or(self.any4)
                .or_else(|| self.exact.get(&ip).copied()),
            IpAddr::V6(_) => self.any6.or_else(|| self.exact.get(&ip).copied()),
        };
        match ip {
            IpAddr::V6(v6) if v6.is_unspecified() => {
                self.any6.get_or_insert(i);
            }
            IpAddr::V4(v4) if v4.is_unspecified() => {
                self.any4.get_or_insert(i);
            }
            _ => {
                if ip.is_ipv4() {
                    self.some4.get_or_insert(i);
                }
                self.exact.entry(ip).or_insert(i);
            }
        }
        clash
    }

    fn first_exact(&self) -> Option<usize> {
        self.exact.values().min().copied()
    }
}

/// An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) binds the IPv4 one.
fn canonical(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

pub(super) fn check_overlaps(listeners: &[Listener], e: &mut Errors) {
    let mut ports: HashMap<(bool, u16), Port> = HashMap::new();
    for (i, l) in listeners.iter().enumerate() {
        let addr = *l.listen.get();
        if addr.port() == 0 {
            continue;
        }
        let udp = l.protocol == ListenerProtocol::Http3;
        let port = ports.entry((udp, addr.port())).or_default();
        if let Some(j) = port.add(canonical(addr), i) {
            let other = &listeners[j];
            let transport = if udp { "UDP" } else { "TCP" };
            let message = if *other.listen.get() == addr {
                format!("{addr} is used by another listener (`{}`)", other.name)
            } else {
                format!(
                    "{addr} overlaps {} of listener `{}`: both need {transport} port {} on the same address, so they cannot both be bound",
                    other.listen, other.name, addr.port()
                )
            };
            e.push(format!("listeners[{i}].listen"), message);
        }
    }
}
