//! The running process's side: it listens on its upgrade socket and, when a new process
//! asks, hands over its listening sockets and later drains.

use super::channel::{Channel, Message};
use super::{shown, UpgradeError};
use crate::Proxy;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::watch;

/// How long a new process may take, once it has the sockets, to become ready (it may be
/// fetching its certificate or its first config).
const READY_LIMIT: Duration = Duration::from_secs(120);

/// The upgrade socket, bound at its path with mode 0600.
pub struct Listening {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

/// Binds the upgrade socket at `path`. The socket is bound under a temporary name, made
/// owner-only, then renamed into place, so that it is never reachable with wider
/// permissions and a new process replaces an old one's path atomically (`replace`). Without
/// `replace`, a path where a live process answers is refused; a stale one is replaced.
pub fn listen(path: &Path, replace: bool) -> Result<Listening, UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: shown(path),
        source,
    };
    if !replace && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(UpgradeError::InUse {
            path: shown(path),
            message: "another running spur proxy listens there: start this one with --upgrade \
                      to take its place, or give it another --upgrade-socket PATH"
                .into(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    let ino = std::fs::metadata(path).map_err(io)?.ino();
    Ok(Listening {
        listener,
        path: path.to_path_buf(),
        ino,
    })
}

/// Completes once a new process has taken over (see [`serve`]).
pub struct Upgraded {
    done: watch::Receiver<bool>,
    path: PathBuf,
    ino: u64,
}

impl Upgraded {
    /// Waits until a new process has the sockets and has asked this one to drain.
    pub async fn wait(&mut self) {
        if self.done.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Removes the socket's path at a plain shutdown, unless another process has put its
    /// own socket there since.
    pub fn remove_path(&self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves upgrade requests on `sock`, one at a time; others are refused while one is in
/// progress, and every one after a new process has taken over.
pub fn serve(proxy: Arc<Proxy>, sock: Listening) -> Upgraded {
    let (tx, rx) = watch::channel(false);
    let upgraded = Upgraded {
        done: rx,
        path: sock.path.clone(),
        ino: sock.ino,
    };
    tracing::info!(path = %sock.path.display(), "upgrade socket listening");
    // The pid of the process being handed the sockets (0: none).
    let busy = Arc::new(AtomicU32::new(0));
    let tx = Arc::new(tx);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = sock.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (proxy, busy, tx) = (proxy.clone(), busy.clone(), tx.clone());
            tokio::spawn(async move {
                let ch = Channel::new(stream);
                if let Err(e) = converse(&proxy, ch, &busy, &tx).await {
                    tracing::warn!(error = %e, "upgrade abandoned; this process carries on");
                }
            });
        }
    });
    upgraded
}

/// One conversation with a would-be successor.
async fn converse(
    proxy: &Proxy,
    mut ch: Channel,
    busy: &AtomicU32,
    done: &watch::Sender<bool>,
) -> std::io::Result<()> {
    let me = std::process::id();
    let refuse = |message: String| Message::Refused { pid: me, message };
    let peer_uid = ch.stream().peer_cred()?.uid();
    // SAFETY: getuid has no preconditions and cannot fail.
    let my_uid = unsafe { libc::getuid() };
    if peer_uid != my_uid {
        let msg = format!("uid {peer_uid} may not take over a proxy of uid {my_uid}");
        return ch.send(&refuse(msg), &[]).await;
    }
    let new_pid = match ch.recv().await? {
        Some(Message::Hello { pid }) => pid,
        other => return Err(protocol(format!("expected hello, got {other:?}"))),
    };
    if let Err(current) = busy.compare_exchange(0, new_pid, Ordering::AcqRel, Ordering::Acquire) {
        let msg = if *done.borrow() {
            format!("it has been upgraded to pid {current} and is draining")
        } else {
            format!("an upgrade to pid {current} is already in progress")
        };
        return ch.send(&refuse(msg), &[]).await;
    }
    let result = hand_over(proxy, &mut ch, new_pid, done).await;
    if !*done.borrow() {
        busy.store(0, Ordering::Release);
    }
    result
}

/// Sends the sockets, then waits for the new process to be ready.
async fn hand_over(
    proxy: &Proxy,
    ch: &mut Channel,
    new_pid: u32,
    done: &watch::Sender<bool>,
) -> std::io::Result<()> {
    let sockets = proxy.handover_sockets().await?;
    let infos = sockets.iter().map(|(info, _)| info.clone()).collect();
    let fds: Vec<_> = sockets
        .iter()
        .flat_map(|(_, fds)| fds.iter().map(|f| f.as_raw_fd()))
        .collect();
    let msg = Message::Sockets {
        pid: std::process::id(),
        sockets: infos,
    };
    ch.send(&msg, &fds).await?;
    drop(sockets);
    tracing::info!(
        new_pid,
        sockets = fds.len(),
        "upgrade: sockets handed over, waiting for the new process to be ready"
    );
    match tokio::time::timeout(READY_LIMIT, ch.recv()).await {
        Ok(Ok(Some(Message::Drain))) => {
            // Decided: from here this process only drains, even if the reply is lost.
            done.send_replace(true);
            tracing::info!(new_pid, "upgrade: the new process is ready; draining");
            let _ = ch.send(&Message::Draining, &[]).await;
            Ok(())
        }
        Ok(Ok(None)) => Err(protocol(
            "the new process closed the connection before it was ready".into(),
        )),
        Ok(Ok(Some(other))) => Err(protocol(format!("expected drain, got {other:?}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(protocol(format!(
            "the new process was not ready within {READY_LIMIT:?}"
        ))),
    }
}

fn protocol(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}
