//! The client socket: bind with stale-socket detection, set its mode, and
//! remove it on exit (only if the path still names our socket).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tracing::{info, warn};

/// Failure to set up the client socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Another process accepts connections on this path.
    #[error("another daemon is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Removing a stale socket failed.
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// bind(2) failed.
    #[error("cannot bind {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `socket_group` names no group.
    #[error("socket_group {0:?} is not a known group")]
    UnknownGroup(String),
    /// chown failed.
    #[error("cannot give {path} to group {group}")]
    SetGroup {
        /// The path.
        path: PathBuf,
        /// The group.
        group: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// chmod failed.
    #[error("cannot set mode {mode:o} on {path}")]
    SetMode {
        /// The path.
        path: PathBuf,
        /// The requested mode.
        mode: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The bound client socket. Dropping it removes the socket file if the path
/// still refers to the inode we bound.
#[derive(Debug)]
pub struct ClientSocket {
    /// The listener.
    listener: Option<UnixListener>,
    /// Where it is bound.
    path: PathBuf,
    /// (device, inode) of the socket file we created; `None` for a socket
    /// systemd passed us, whose file systemd owns.
    identity: Option<(u64, u64)>,
}

impl ClientSocket {
    /// Binds `path` with permission bits `mode`. An existing socket file that
    /// accepts connections means another daemon runs (error); one that
    /// refuses is stale and is replaced.
    pub async fn bind(path: &Path, mode: u32) -> Result<ClientSocket, ListenerError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(ListenerError::AlreadyRunning(path.to_owned()));
                }
                warn!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path).map_err(|source| ListenerError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Ok(_) => return Err(ListenerError::NotASocket(path.to_owned())),
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|source| ListenerError::Bind {
            path: path.to_owned(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| ListenerError::SetMode {
                path: path.to_owned(),
                mode,
                source,
            },
        )?;
        let meta = std::fs::metadata(path).map_err(|source| ListenerError::Bind {
            path: path.to_owned(),
            source,
        })?;
        info!(path = %path.display(), mode = format!("{mode:o}"), "listening");
        Ok(ClientSocket {
            listener: Some(listener),
            path: path.to_owned(),
            identity: Some((meta.dev(), meta.ino())),
        })
    }

    /// Takes a listening socket passed by systemd (socket activation). Its
    /// file belongs to systemd: mode and group come from the `.socket` unit,
    /// and it is not removed on exit.
    pub fn adopt(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
    ) -> Result<ClientSocket, ListenerError> {
        let listener = UnixListener::from_std(listener).map_err(|source| ListenerError::Bind {
            path: path.to_owned(),
            source,
        })?;
        info!(path = %path.display(), "listening on the socket systemd passed (socket activation)");
        Ok(ClientSocket {
            listener: Some(listener),
            path: path.to_owned(),
            identity: None,
        })
    }

    /// Gives the socket file to `group` (a name or a number), so members of
    /// that group can connect (with mode 0660).
    pub fn set_group(&self, group: &str) -> Result<(), ListenerError> {
        let gid = match group.parse::<u32>() {
            Ok(gid) => nix::unistd::Gid::from_raw(gid),
            Err(_) => match nix::unistd::Group::from_name(group) {
                Ok(Some(found)) => found.gid,
                _ => return Err(ListenerError::UnknownGroup(group.to_owned())),
            },
        };
        nix::unistd::chown(&self.path, None, Some(gid)).map_err(|source| ListenerError::SetGroup {
            path: self.path.clone(),
            group: group.to_owned(),
            source: source.into(),
        })
    }

    /// The listener, until [`ClientSocket::stop_accepting`].
    pub fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }

    /// Closes the listening socket: new connections are refused from now on.
    pub fn stop_accepting(&mut self) {
        self.listener = None;
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        self.listener = None;
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if Some((meta.dev(), meta.ino())) == self.identity => {
                if let Err(err) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %err, "cannot remove socket");
                }
            }
            // Someone replaced or removed it: not ours to delete.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_detects_live_and_stale_sockets_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let first = ClientSocket::bind(&path, 0o660).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            ClientSocket::bind(&path, 0o660).await,
            Err(ListenerError::AlreadyRunning(_))
        ));
        // A socket file nobody listens on is stale.
        drop(first);
        assert!(!path.exists(), "dropping removes the socket file");
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let second = ClientSocket::bind(&path, 0o600).await.unwrap();
        drop(second);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, "data").unwrap();
        assert!(matches!(
            ClientSocket::bind(&path, 0o660).await,
            Err(ListenerError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
