//! The client socket: bind with stale-socket detection, with its final mode
//! and group from the first moment it is reachable, and remove it on exit
//! (only if the path still names our socket).
//!
//! bind(2) creates the socket file with the umask's permissions; chmod and
//! chown can only follow. Done at the final path, that leaves a moment in
//! which anyone may connect. So [`ClientSocket::bind`]:
//!
//! 1. refuses if another daemon answers on the path, removes a stale socket;
//! 2. creates a private directory (mode 0700) next to the final path, so both
//!    names are on one filesystem, and binds the socket in it, where nobody
//!    else can reach it;
//! 3. sets group and mode there;
//! 4. gives it its final name with link(2), which fails rather than replace
//!    anything that appeared meanwhile;
//! 5. removes the temporary name and the directory (on every error path
//!    too).
//!
//! The listener's own address (`local_addr`) stays the temporary path: the
//! kernel records the name given to bind(2). Nothing in inferd reads it.

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::unistd::Gid;
use tokio::net::UnixListener;
use tracing::{info, warn};

/// Longest path a Unix socket address holds: `sun_path` has 108 bytes, one
/// of them for the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Name of the socket inside the private directory: one byte, to keep the
/// temporary path, which must fit in `sun_path` too, short.
const STAGED_NAME: &str = "s";

/// Directory names to try when one is taken (by a leftover of a killed
/// process that had our pid) before giving up.
const PRIVATE_DIR_ATTEMPTS: u32 = 16;

/// Numbers the private directories of this process, so concurrent binds
/// (tests) never share one.
static NEXT_PRIVATE_DIR: AtomicU32 = AtomicU32::new(0);

/// Failure to set up the client socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Another process accepts connections on this path.
    #[error("another daemon is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Something that accepts no connections was created at the path while
    /// the socket was being prepared (after the stale-socket check).
    #[error("{0} was created by someone else while inferd was preparing its socket there")]
    PathTaken(PathBuf),
    /// The path does not fit in a Unix socket address.
    #[error(
        "socket path {path} is {len} bytes; a Unix socket address holds at most {MAX_SOCKET_PATH}"
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The path fits, but the temporary path in the private directory next
    /// to it does not.
    #[error(
        "socket path {path} is too long: inferd first binds it as {temporary} ({len} bytes), \
         and a Unix socket address holds at most {MAX_SOCKET_PATH}; choose a shorter socket path"
    )]
    TemporaryPathTooLong {
        /// The configured path.
        path: PathBuf,
        /// The temporary path that does not fit.
        temporary: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Removing a stale socket failed.
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The private directory to bind in could not be created.
    #[error("cannot create the private directory {path} to prepare the socket in")]
    PrivateDir {
        /// The directory.
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
    /// link(2) from the private directory to the final path failed.
    #[error("cannot move the socket into place at {path}")]
    Link {
        /// The final path.
        path: PathBuf,
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
    /// Binds `path` with permission bits `mode` and, if given, owned by
    /// `group` (a name or a number): the socket is reachable at `path` only
    /// once both are set (see the module doc). An existing socket file that
    /// accepts connections means another daemon runs (error); one that
    /// refuses is stale and is replaced.
    pub async fn bind(
        path: &Path,
        mode: u32,
        group: Option<&str>,
    ) -> Result<ClientSocket, ListenerError> {
        let len = path.as_os_str().len();
        // Checked here because the final path is never given to bind(2),
        // which would have refused it; clients could not connect to it.
        if len > MAX_SOCKET_PATH {
            return Err(ListenerError::PathTooLong {
                path: path.to_owned(),
                len,
            });
        }
        // Resolved before anything is created: nothing to clean up.
        let group = group
            .map(|name| resolve_group(name).map(|gid| (name, gid)))
            .transpose()?;
        remove_stale(path).await?;
        let staged = Staged::bind(path, mode, group)?;
        let identity = staged.identity;
        let listener = staged.publish(path).await?;
        info!(path = %path.display(), mode = format!("{mode:o}"), group = group.map(|(name, _)| name), "listening");
        Ok(ClientSocket {
            listener: Some(listener),
            path: path.to_owned(),
            identity: Some(identity),
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

/// A group name or number as a gid.
fn resolve_group(group: &str) -> Result<Gid, ListenerError> {
    match group.parse::<u32>() {
        Ok(gid) => Ok(Gid::from_raw(gid)),
        Err(_) => match nix::unistd::Group::from_name(group) {
            Ok(Some(found)) => Ok(found.gid),
            _ => Err(ListenerError::UnknownGroup(group.to_owned())),
        },
    }
}

/// Clears the way at `path`: nothing there, or a stale socket (removed).
/// A socket that accepts connections belongs to a running daemon.
async fn remove_stale(path: &Path) -> Result<(), ListenerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ListenerError::AlreadyRunning(path.to_owned()));
            }
            warn!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|source| ListenerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(ListenerError::NotASocket(path.to_owned())),
        Err(_) => Ok(()),
    }
}

/// A mode-0700 directory next to the final path, holding the socket while
/// its mode and group are set. Dropping it removes the socket's temporary
/// name and the directory, on success and on every error path alike.
#[derive(Debug)]
struct PrivateDir {
    /// The directory: `.inferd.<pid>.<n>` beside the final path.
    dir: PathBuf,
    /// The socket's temporary path in it.
    socket: PathBuf,
}

impl PrivateDir {
    /// Creates the directory beside `path`. Fails if the socket path in it
    /// would not fit in a Unix socket address.
    fn create(path: &Path) -> Result<PrivateDir, ListenerError> {
        // Same directory as the final path: link(2) works only within one
        // filesystem. `parent` is `Some("")` for a bare file name (the
        // current directory) and `None` only for "/", which exists and is
        // not a socket, so `remove_stale` has refused it already.
        let parent = path.parent().unwrap_or(Path::new(""));
        let pid = std::process::id();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let n = NEXT_PRIVATE_DIR.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!(".inferd.{pid}.{n}"));
            let socket = dir.join(STAGED_NAME);
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(ListenerError::TemporaryPathTooLong {
                    path: path.to_owned(),
                    temporary: socket,
                    len,
                });
            }
            // 0700 (the umask can only take bits away): only this user can
            // reach the socket inside before it has its final mode and group.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(PrivateDir { dir, socket }),
                Err(err)
                    if err.kind() == io::ErrorKind::AlreadyExists
                        && attempts < PRIVATE_DIR_ATTEMPTS =>
                {
                    // A leftover of a killed process that had our pid: not
                    // ours to judge; try the next name.
                }
                Err(source) => return Err(ListenerError::PrivateDir { path: dir, source }),
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            // Bind failed before the name was created.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                warn!(path = %self.socket.display(), error = %err, "cannot remove the temporary socket name")
            }
        }
        if let Err(err) = std::fs::remove_dir(&self.dir) {
            warn!(path = %self.dir.display(), error = %err, "cannot remove the private socket directory");
        }
    }
}

/// A listening socket with its final mode and group, not yet at its final
/// path.
#[derive(Debug)]
struct Staged {
    /// The listener, bound at `dir.socket`.
    listener: UnixListener,
    /// (device, inode) of the socket file: the same under both names.
    identity: (u64, u64),
    /// Where it is bound; dropping it removes the temporary name and the
    /// directory, so an error anywhere after bind leaves nothing behind.
    dir: PrivateDir,
}

impl Staged {
    /// Binds a socket in a new private directory beside `path`, gives it to
    /// `group` and sets `mode`.
    fn bind(path: &Path, mode: u32, group: Option<(&str, Gid)>) -> Result<Staged, ListenerError> {
        let dir = PrivateDir::create(path)?;
        let listener = UnixListener::bind(&dir.socket).map_err(|source| ListenerError::Bind {
            path: dir.socket.clone(),
            source,
        })?;
        if let Some((name, gid)) = group {
            nix::unistd::chown(&dir.socket, None, Some(gid)).map_err(|source| {
                ListenerError::SetGroup {
                    path: path.to_owned(),
                    group: name.to_owned(),
                    source: source.into(),
                }
            })?;
        }
        // After chown, which may clear set-id bits: the mode ends up exactly
        // as asked.
        std::fs::set_permissions(&dir.socket, std::fs::Permissions::from_mode(mode)).map_err(
            |source| ListenerError::SetMode {
                path: path.to_owned(),
                mode,
                source,
            },
        )?;
        let meta =
            std::fs::symlink_metadata(&dir.socket).map_err(|source| ListenerError::Bind {
                path: dir.socket.clone(),
                source,
            })?;
        Ok(Staged {
            listener,
            identity: (meta.dev(), meta.ino()),
            dir,
        })
    }

    /// Gives the socket its final name `path` and drops the temporary one.
    ///
    /// link(2), not rename(2): rename silently replaces whatever is at
    /// `path`, so a second daemon that bound it after our stale-socket check
    /// would lose its socket to us, and both would run. link fails with
    /// EEXIST instead, as bind(2) at `path` would have. (renameat2 with
    /// RENAME_NOREPLACE would do too, but std has no wrapper and not every
    /// filesystem supports the flag.) For a moment the socket has both
    /// names; the temporary one is inside the 0700 directory.
    async fn publish(self, path: &Path) -> Result<UnixListener, ListenerError> {
        match std::fs::hard_link(&self.dir.socket, path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(if tokio::net::UnixStream::connect(path).await.is_ok() {
                    ListenerError::AlreadyRunning(path.to_owned())
                } else {
                    ListenerError::PathTaken(path.to_owned())
                });
            }
            Err(source) => {
                return Err(ListenerError::Link {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        let Staged { listener, dir, .. } = self;
        // Removes the temporary name and the directory.
        drop(dir);
        Ok(listener)
    }
}
