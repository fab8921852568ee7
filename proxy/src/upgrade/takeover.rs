//! The new process's side: ask the running proxy for its sockets, and, once ready, tell it
//! to drain.

use super::channel::{Channel, Message};
use super::inherited::Inherited;
use super::{shown, UpgradeError};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// How long each answer of the old process may take.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// An upgrade under way: the sockets are here; the old process serves until [`finish`].
///
/// [`finish`]: Takeover::finish
pub struct Takeover {
    ch: Channel,
    path: PathBuf,
    /// The old process.
    pub pid: u32,
}

/// Connects to the running proxy at `path` and receives its listening sockets.
pub async fn take_over(path: &Path) -> Result<(Takeover, Inherited), UpgradeError> {
    let connect = tokio::time::timeout(ANSWER_LIMIT, UnixStream::connect(path)).await;
    let stream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(UpgradeError::Connect {
                path: shown(path),
                source,
            })
        }
        Err(_) => {
            return Err(UpgradeError::Connect {
                path: shown(path),
                source: std::io::ErrorKind::TimedOut.into(),
            })
        }
    };
    let mut ch = Channel::new(stream);
    let io = |source| UpgradeError::Io {
        path: shown(path),
        source,
    };
    let hello = Message::Hello {
        pid: std::process::id(),
    };
    ch.send(&hello, &[]).await.map_err(io)?;
    let (pid, sockets) = match answer(&mut ch, path).await? {
        Message::Sockets { pid, sockets } => (pid, sockets),
        Message::Refused { pid, message } => return Err(UpgradeError::Refused { pid, message }),
        other => return Err(unexpected(path, "sockets", &other)),
    };
    let mut entries = Vec::with_capacity(sockets.len());
    for info in sockets {
        let fds = tokio::time::timeout(ANSWER_LIMIT, ch.recv_fds(info.count))
            .await
            .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
            .map_err(io)?;
        entries.push((info, fds));
    }
    let takeover = Takeover {
        ch,
        path: path.to_path_buf(),
        pid,
    };
    Ok((takeover, Inherited::new(entries)))
}

impl Takeover {
    /// Tells the old process to drain and exit; returns once it has said it does.
    pub async fn finish(mut self) -> Result<(), UpgradeError> {
        let path = self.path.clone();
        self.ch
            .send(&Message::Drain, &[])
            .await
            .map_err(|source| UpgradeError::Io {
                path: shown(&path),
                source,
            })?;
        match answer(&mut self.ch, &path).await? {
            Message::Draining => Ok(()),
            other => Err(unexpected(&path, "draining", &other)),
        }
    }
}

async fn answer(ch: &mut Channel, path: &Path) -> Result<Message, UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: shown(path),
        source,
    };
    match tokio::time::timeout(ANSWER_LIMIT, ch.recv()).await {
        Err(_) => Err(io(std::io::ErrorKind::TimedOut.into())),
        Ok(Err(e)) => Err(io(e)),
        Ok(Ok(None)) => Err(UpgradeError::Protocol {
            path: shown(path),
            message: "the running proxy closed the connection".into(),
        }),
        Ok(Ok(Some(m))) => Ok(m),
    }
}

fn unexpected(path: &Path, wanted: &str, got: &Message) -> UpgradeError {
    UpgradeError::Protocol {
        path: shown(path),
        message: format!("expected {wanted}, got {got:?}"),
    }
}
