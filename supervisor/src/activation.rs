//! Socket activation (`sd_listen_fds(3)`): the client socket handed over by
//! systemd when inferd runs with `inferd.socket`.
//!
//! systemd binds the socket itself, starts inferd with the listening fd at
//! 3 and sets `LISTEN_PID` (our pid) and `LISTEN_FDS` (the number of fds).
//! [`listener_from_env`] checks those, checks that fd 3 really is a
//! listening Unix stream socket, marks it close-on-exec (so workers never
//! inherit it) and non-blocking (so `tokio::net::UnixListener::from_std`
//! can take it).
//!
//! When it returns a listener, the daemon uses it instead of binding
//! `config.socket`, and must NOT remove the socket file on exit: systemd
//! owns it (`inferd.socket` sets its mode and owner, keeps it while
//! `inferd.service` restarts so clients queue instead of failing, and
//! removes it when the socket unit stops). Call it once, early in startup,
//! before anything else can open or close fd 3; a second call is an error.
//!
//! The `LISTEN_*` variables are read and left alone (changing the
//! environment is unsound once threads run); workers get none of them
//! because the worker spawn removes them from the child's environment.
//! `LISTEN_FDNAMES` is ignored: inferd takes exactly one socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Set once fd 3 has been wrapped in an owner, so it is never owned twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the socket passed by systemd cannot be used. Each variant names the
/// step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is set but is not a pid.
    #[error("LISTEN_PID={0:?} is not a pid")]
    ListenPid(String),
    /// `LISTEN_FDS` is set but is not a count.
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    ListenFds(String),
    /// systemd passed a number of fds other than one.
    #[error("systemd passed {0} file descriptors (LISTEN_FDS={0}); inferd needs exactly one: a single ListenStream= in inferd.socket")]
    FdCount(u32),
    /// [`listener_from_env`] already handed out the socket.
    #[error("the socket passed by systemd was already taken")]
    AlreadyTaken,
    /// The fd is not open.
    #[error("fd {fd} passed by systemd is not open")]
    NotOpen {
        /// The fd.
        fd: RawFd,
        /// From fcntl(F_GETFD).
        #[source]
        source: Errno,
    },
    /// getsockopt(SO_TYPE) failed: most likely not a socket.
    #[error("cannot read the socket type of fd {fd} (getsockopt SO_TYPE); is it a socket?")]
    SocketType {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// A datagram, seqpacket, ... socket.
    #[error(
        "fd {fd} is a {kind:?} socket, not a stream socket (use ListenStream= in inferd.socket)"
    )]
    NotStream {
        /// The fd.
        fd: RawFd,
        /// Its type.
        kind: SockType,
    },
    /// getsockopt(SO_ACCEPTCONN) failed.
    #[error("cannot tell whether fd {fd} is listening (getsockopt SO_ACCEPTCONN)")]
    AcceptConn {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// A stream socket that is not listening (e.g. a connection passed
    /// because the socket unit says `Accept=yes`).
    #[error("fd {fd} is not a listening socket (inferd.socket must not set Accept=yes)")]
    NotListening {
        /// The fd.
        fd: RawFd,
    },
    /// getsockname(2) failed.
    #[error("cannot read the address of fd {fd} (getsockname)")]
    SockName {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// A TCP (or other non-Unix) socket.
    #[error("fd {fd} is not a Unix socket (address family {family}); ListenStream= in inferd.socket must be a path")]
    NotUnix {
        /// The fd.
        fd: RawFd,
        /// Its address family, as far as nix knows it.
        family: String,
    },
    /// fcntl(F_SETFD, FD_CLOEXEC) failed.
    #[error("cannot set close-on-exec on fd {fd}")]
    CloseOnExec {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// Making the listener non-blocking failed.
    #[error("cannot make fd {fd} non-blocking")]
    NonBlocking {
        /// The fd.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A listening socket passed by systemd (`LISTEN_FDS`/`LISTEN_PID`, fd 3),
/// if any: `Ok(None)` when inferd was not socket-activated. The listener is
/// close-on-exec and non-blocking. Call at most once per process.
pub fn listener_from_env() -> Result<Option<UnixListener>, ActivationError> {
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    let Some(fd) = listener_from_fds(
        listen_pid.as_deref(),
        listen_fds.as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(None);
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ActivationError::AlreadyTaken);
    }
    fcntl(fd, FcntlArg::F_GETFD).map_err(|source| ActivationError::NotOpen { fd, source })?;
    // SAFETY: the fd is open (checked just above), systemd passed it to this
    // process (LISTEN_PID is ours) for this purpose, and TAKEN guarantees it
    // gets exactly one owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    listener_from_fd(owned).map(Some)
}

/// Which fd holds the activation socket, from the values of `LISTEN_PID`
/// and `LISTEN_FDS`: `None` unless `LISTEN_PID` is `our_pid` and
/// `LISTEN_FDS` is set (the variables may be left over from a parent);
/// exactly one fd is accepted.
pub fn listener_from_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    our_pid: u32,
) -> Result<Option<RawFd>, ActivationError> {
    let Some(listen_pid) = listen_pid else {
        return Ok(None);
    };
    let pid: u32 = listen_pid
        .parse()
        .map_err(|_| ActivationError::ListenPid(listen_pid.to_owned()))?;
    if pid != our_pid {
        return Ok(None);
    }
    let Some(listen_fds) = listen_fds else {
        return Ok(None);
    };
    let count: u32 = listen_fds
        .parse()
        .map_err(|_| ActivationError::ListenFds(listen_fds.to_owned()))?;
    if count != 1 {
        return Err(ActivationError::FdCount(count));
    }
    Ok(Some(LISTEN_FDS_START))
}

/// Checks that `fd` is a listening Unix stream socket.
pub fn validate_listener(fd: BorrowedFd<'_>) -> Result<(), ActivationError> {
    let raw = fd.as_raw_fd();
    let kind = getsockopt(&fd, sockopt::SockType)
        .map_err(|source| ActivationError::SocketType { fd: raw, source })?;
    if kind != SockType::Stream {
        return Err(ActivationError::NotStream { fd: raw, kind });
    }
    let listening = getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|source| ActivationError::AcceptConn { fd: raw, source })?;
    if !listening {
        return Err(ActivationError::NotListening { fd: raw });
    }
    let addr: SockaddrStorage =
        getsockname(raw).map_err(|source| ActivationError::SockName { fd: raw, source })?;
    match addr.family() {
        Some(AddressFamily::Unix) => Ok(()),
        family => Err(ActivationError::NotUnix {
            fd: raw,
            family: family.map_or_else(|| "unknown".to_owned(), |f| format!("{f:?}")),
        }),
    }
}

/// Takes a socket passed by systemd: checks it with [`validate_listener`],
/// sets close-on-exec and makes it non-blocking. On error the fd is closed.
pub fn listener_from_fd(fd: OwnedFd) -> Result<UnixListener, ActivationError> {
    validate_listener(fd.as_fd())?;
    let raw = fd.as_raw_fd();
    let flags = fcntl(raw, FcntlArg::F_GETFD)
        .map_err(|source| ActivationError::CloseOnExec { fd: raw, source })?;
    let flags = FdFlag::from_bits_retain(flags) | FdFlag::FD_CLOEXEC;
    fcntl(raw, FcntlArg::F_SETFD(flags))
        .map_err(|source| ActivationError::CloseOnExec { fd: raw, source })?;
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|source| ActivationError::NonBlocking { fd: raw, source })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{TcpListener, UdpSocket};
    use std::os::unix::net::{UnixDatagram, UnixStream};

    use nix::fcntl::OFlag;

    #[test]
    fn activation_only_for_our_pid_and_one_fd() {
        let ours = 4242;
        let from = |pid, fds| listener_from_fds(pid, fds, ours);
        assert_eq!(from(None, None).expect("no activation"), None);
        assert_eq!(from(None, Some("1")).expect("no LISTEN_PID"), None);
        assert_eq!(from(Some("4243"), Some("1")).expect("someone else's"), None);
        assert_eq!(from(Some("4243"), Some("7")).expect("someone else's"), None);
        assert_eq!(from(Some("4242"), None).expect("no LISTEN_FDS"), None);
        assert_eq!(from(Some("4242"), Some("1")).expect("ours"), Some(3));

        let err = from(Some("4242"), Some("2")).expect_err("two sockets");
        assert!(matches!(err, ActivationError::FdCount(2)), "{err:?}");
        assert!(
            err.to_string().contains("passed 2 file descriptors"),
            "{err}"
        );
        let err = from(Some("4242"), Some("0")).expect_err("no sockets");
        assert!(matches!(err, ActivationError::FdCount(0)), "{err:?}");
        let err = from(Some("4242"), Some("one")).expect_err("not a number");
        assert!(matches!(err, ActivationError::ListenFds(_)), "{err:?}");
        let err = from(Some("me"), Some("1")).expect_err("not a pid");
        assert!(matches!(err, ActivationError::ListenPid(_)), "{err:?}");
    }

    #[test]
    fn accepts_a_listening_unix_stream_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = UnixListener::bind(dir.path().join("s.sock")).expect("bind");
        validate_listener(listener.as_fd()).expect("a listening Unix socket");
    }

    #[test]
    fn rejects_other_fds() {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        let err = validate_listener(udp.as_fd()).expect_err("UDP");
        assert!(
            matches!(
                err,
                ActivationError::NotStream {
                    kind: SockType::Datagram,
                    ..
                }
            ),
            "{err:?}"
        );

        let dir = tempfile::tempdir().expect("temp dir");
        let dgram = UnixDatagram::bind(dir.path().join("d.sock")).expect("bind datagram");
        let err = validate_listener(dgram.as_fd()).expect_err("Unix datagram");
        assert!(matches!(err, ActivationError::NotStream { .. }), "{err:?}");

        let (stream, _peer) = UnixStream::pair().expect("socketpair");
        let err = validate_listener(stream.as_fd()).expect_err("connected Unix stream");
        assert!(
            matches!(err, ActivationError::NotListening { .. }),
            "{err:?}"
        );

        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind TCP");
        let err = validate_listener(tcp.as_fd()).expect_err("TCP listener");
        assert!(matches!(err, ActivationError::NotUnix { .. }), "{err:?}");
        assert!(err.to_string().contains("Inet"), "{err}");

        let file = tempfile::tempfile().expect("temp file");
        let err = validate_listener(file.as_fd()).expect_err("a regular file");
        assert!(
            matches!(
                err,
                ActivationError::SocketType {
                    source: Errno::ENOTSOCK,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn adopted_listener_is_cloexec_nonblocking_and_serves() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        // As systemd hands it over: inheritable and blocking.
        let raw = listener.as_raw_fd();
        fcntl(raw, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");

        let listener = listener_from_fd(OwnedFd::from(listener)).expect("adopt");
        let fd_flags = FdFlag::from_bits_retain(
            fcntl(listener.as_raw_fd(), FcntlArg::F_GETFD).expect("F_GETFD"),
        );
        assert!(fd_flags.contains(FdFlag::FD_CLOEXEC));
        let fl_flags = OFlag::from_bits_retain(
            fcntl(listener.as_raw_fd(), FcntlArg::F_GETFL).expect("F_GETFL"),
        );
        assert!(fl_flags.contains(OFlag::O_NONBLOCK));

        let listener = tokio::net::UnixListener::from_std(listener).expect("tokio takes it");
        let (client, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        client.expect("connect");
        accepted.expect("accept");
    }

    #[test]
    fn a_rejected_fd_is_closed_not_leaked() {
        use std::io::Read;

        let (stream, mut peer) = UnixStream::pair().expect("socketpair");
        let err = listener_from_fd(OwnedFd::from(stream)).expect_err("not listening");
        assert!(
            matches!(err, ActivationError::NotListening { .. }),
            "{err:?}"
        );
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("set a read timeout");
        let mut buf = [0u8; 1];
        assert_eq!(peer.read(&mut buf).expect("EOF, not a timeout"), 0);
    }
}
