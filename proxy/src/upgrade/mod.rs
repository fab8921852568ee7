//! Zero-downtime binary upgrade: `spur proxy ... --upgrade` takes over a running proxy's
//! listening sockets, becomes ready, then tells the old process to drain and exit.
//!
//! Why pass sockets rather than bind beside the old process with `SO_REUSEPORT`: a socket
//! added to a reuse-port group gets its share of new connections, but a socket that leaves
//! it takes the connections still waiting in its accept queue with it (they are reset).
//! Passing the very sockets (`SCM_RIGHTS`, as Envoy's hot restart and Pingora's upgrade
//! do) keeps every queue alive: whatever the old process has not accepted when it stops,
//! the new one accepts. No client sees a refused or reset connection.
//!
//! The conversation ([`channel`]), over the old process's Unix socket (0600, owner only;
//! a peer of another user is refused):
//!
//! ```text
//! new -> old   hello {pid}
//! old -> new   sockets {pid, [kind, name, listen, count]...} + the descriptors
//!              (or refused {message}: an upgrade is already in progress, or it is draining)
//! new          binds its config's listeners, taking the inherited socket of each address
//!              it finds (fresh sockets for new addresses), applies its config, is ready
//! new -> old   drain
//! old -> new   draining; the old process stops accepting, finishes its open requests and
//!              streams (drain_timeout), exits 0; the new one takes over the socket's path
//! ```
//!
//! Until `drain` both processes accept on the shared sockets; each connection is served by
//! whichever accepted it. If the new process fails before `drain`, the old one notices the
//! closed connection and carries on as if nothing happened.
//!
//! QUIC cannot share: datagrams of one UDP socket go to whichever process reads first, and
//! a QUIC connection's packets must all reach the process that holds its keys. So at
//! `drain` the old process closes its QUIC connections at once (CONNECTION_CLOSE,
//! `H3_NO_ERROR`) and stops reading the socket; HTTP/3 clients open a new connection,
//! served by the new process.

pub mod channel;
mod handover;
mod inherited;
mod sockets;
mod takeover;

pub use handover::{listen, serve, Listening, Upgraded};
pub use inherited::Inherited;
pub use takeover::{take_over, Takeover};

use std::path::{Path, PathBuf};

/// Why an upgrade could not be done.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no running proxy answers on {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the running proxy (pid {pid}) refused the upgrade: {message}")]
    Refused { pid: u32, message: String },
    #[error("upgrade socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("upgrade socket {path}: the other side broke the protocol: {message}")]
    Protocol { path: String, message: String },
    #[error("upgrade socket {path}: {message}")]
    InUse { path: String, message: String },
}

/// The default upgrade socket of a proxy whose admin server is on `admin_port`:
/// `$XDG_RUNTIME_DIR/spur-<port>.sock`, else `/tmp/spur-<port>.sock`.
pub fn default_path(admin_port: u16) -> PathBuf {
    path_in(std::env::var_os("XDG_RUNTIME_DIR"), admin_port)
}

fn path_in(runtime_dir: Option<std::ffi::OsString>, admin_port: u16) -> PathBuf {
    let dir = runtime_dir
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join(format!("spur-{admin_port}.sock"))
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod path_tests {
    use super::path_in;

    #[test]
    fn the_default_path_follows_xdg_runtime_dir() {
        let path = |dir: Option<&str>, port| path_in(dir.map(Into::into), port);
        assert_eq!(
            path(Some("/run/user/1000"), 9901).to_str(),
            Some("/run/user/1000/spur-9901.sock")
        );
        assert_eq!(path(Some(""), 9901).to_str(), Some("/tmp/spur-9901.sock"));
        assert_eq!(path(None, 80).to_str(), Some("/tmp/spur-80.sock"));
    }
}
