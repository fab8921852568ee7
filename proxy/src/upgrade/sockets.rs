//! The proxy's side of an upgrade: which sockets it hands over, the sockets it inherits,
//! and how it steps down.

use super::channel::{Kind, SocketInfo};
use super::Inherited;
use crate::Proxy;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

impl Proxy {
    /// Gives this proxy the sockets received from the process it upgrades: the next config
    /// applied takes them for the addresses it listens on (call before the first apply, and
    /// before [`Proxy::pin_admin`]).
    pub async fn inherit(&self, sockets: Inherited) {
        self.running.lock().await.inherited = sockets;
    }

    /// Drops the inherited sockets no listener took (once the old process drains).
    pub async fn forget_inherited(&self) {
        self.running.lock().await.inherited.clear();
    }

    /// Duplicates of every socket it accepts on: each listener's (per worker) and the admin
    /// server's.
    pub async fn handover_sockets(&self) -> std::io::Result<Vec<(SocketInfo, Vec<OwnedFd>)>> {
        let running = self.running.lock().await;
        let mut out = Vec::new();
        let mut names: Vec<&String> = running.listeners.keys().collect();
        names.sort();
        for name in names {
            let task = &running.listeners[name];
            let fds = task
                .handover
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            let info = SocketInfo {
                kind: if task.udp { Kind::Udp } else { Kind::Tcp },
                name: name.clone(),
                listen: task.listen.to_string(),
                count: fds.len(),
            };
            out.push((info, fds));
        }
        if let Some(admin) = &running.admin {
            if let Some(fd) = &admin.handover {
                let info = SocketInfo {
                    kind: Kind::Admin,
                    name: "admin".into(),
                    listen: admin
                        .listen
                        .parse::<std::net::SocketAddr>()
                        .map_or_else(|_| admin.listen.clone(), |a| a.to_string()),
                    count: 1,
                };
                out.push((info, vec![fd.try_clone()?]));
            }
        }
        Ok(out)
    }

    /// Steps down after a new process took over: like [`Proxy::shutdown`] (stop accepting,
    /// drain), except that QUIC connections are closed at once, since the new process reads
    /// their UDP socket now, and that an idle HTTP/1.1 connection is closed after its next
    /// response rather than at once (see [`crate::Shared::handed_over`]).
    pub async fn shutdown_for_upgrade(&self) {
        self.shared.ready.store(false, Ordering::Release);
        self.shared.handed_over.store(true, Ordering::Release);
        {
            let running = self.running.lock().await;
            for task in running.listeners.values() {
                if let Some(endpoint) = &task.quic {
                    endpoint.close(H3_NO_ERROR.into(), b"upgrade");
                }
            }
        }
        self.shutdown().await;
    }
}

/// HTTP/3's "no error" code: the connection is closed on purpose.
const H3_NO_ERROR: u32 = 0x100;
