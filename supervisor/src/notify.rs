//! systemd service notifications (`sd_notify(3)`): `READY=1`, `RELOADING=1`,
//! `STOPPING=1`, `STATUS=` and `WATCHDOG=1`, sent as datagrams to the socket
//! named by `NOTIFY_SOCKET`.
//!
//! [`Notifier::from_env`] reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
//! `WATCHDOG_PID` once and leaves the environment alone (setting or removing
//! variables is unsound once threads run); workers get none of these because
//! the worker spawn removes them from the child's environment. Without
//! `NOTIFY_SOCKET` (not run by systemd, or `Type=` is not `notify`) every
//! method is a no-op, so the daemon calls them unconditionally.
//!
//! The message texts come from the `sd-notify` crate's [`NotifyState`]; the
//! sending is done here because that crate only sends to the socket named by
//! the live environment and treats `@name` as a relative file path, while
//! systemd may hand out abstract-namespace sockets (`NOTIFY_SOCKET=@...`).
//!
//! Sending never fails the daemon: the first failure is logged with
//! `warn!`, later ones at `debug!`. The datagrams are sent, in order, by a
//! thread of the notifier's own: the event loop only queues them, so a
//! stalled service manager never stalls it. A send waits at most
//! [`SEND_TIMEOUT`] when systemd's receive queue is full.
//!
//! Order of calls over the daemon's life (see `DESIGN.md`, "Signals and
//! systemd"): [`Notifier::ready`] once the socket is bound and the first
//! worker is Ready; on SIGHUP [`Notifier::reloading`] before the rolling
//! restart and [`Notifier::ready`] after it (also when it failed, with a
//! status saying so, or systemd times the reload out); on SIGTERM/SIGINT
//! [`Notifier::stopping`] right after the accept loop stops;
//! [`Notifier::status`] whenever the pool summary changes; and
//! [`Notifier::watchdog`] from the event loop every
//! [`Notifier::watchdog_interval`].

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// The longest a single notification may block on a full receive queue.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Talks to systemd's `NOTIFY_SOCKET` (no-op when unset).
#[derive(Debug)]
pub struct Notifier {
    /// The sending thread; `None` when there is no usable `NOTIFY_SOCKET`,
    /// which makes every method a no-op.
    sender: Option<Sender>,
    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when the
    /// watchdog is meant for this process.
    watchdog: Option<Duration>,
    /// Set by the sending thread's first failed send, so a broken channel
    /// warns only once; kept here for tests to look at.
    #[cfg(test)]
    warned: Arc<AtomicBool>,
}

/// The queue to the thread that sends the datagrams.
#[derive(Debug)]
struct Sender {
    /// Messages, in order; dropping it ends the thread.
    queue: Option<mpsc::Sender<String>>,
    /// Joined on drop, so queued messages go out before the daemon exits.
    thread: Option<JoinHandle<()>>,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(sender) = &mut self.sender {
            drop(sender.queue.take());
            if let Some(thread) = sender.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// An open channel to the service manager.
#[derive(Debug)]
struct Target {
    /// An unbound datagram socket (close-on-exec, as std creates it). Each
    /// message is sent to `addr` afresh, so a service manager that re-binds
    /// its socket (`systemctl daemon-reexec`) is still reached.
    socket: UnixDatagram,
    /// The notification socket: a path or an abstract name.
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for log messages.
    name: String,
}

/// Why a `NOTIFY_SOCKET` value cannot be used.
#[derive(Debug, thiserror::Error)]
enum TargetError {
    /// Neither an absolute path nor `@abstract` (e.g. systemd's `vsock:`).
    #[error("unsupported address (expected an absolute path or @name)")]
    Unsupported,
    /// The address does not fit a `sockaddr_un`.
    #[error("invalid socket address")]
    Address(#[source] io::Error),
    /// socket(2) or setting its send timeout failed.
    #[error("cannot create the notification socket")]
    Socket(#[source] io::Error),
}

impl Notifier {
    /// The notifier systemd asks for through `NOTIFY_SOCKET`, `WATCHDOG_USEC`
    /// and `WATCHDOG_PID`; read once, and left in the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::from_values(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    /// A notifier that sends to `socket` (an absolute path, or `@name` for an
    /// abstract socket), without a watchdog. An unusable address gives a
    /// disabled notifier and a warning.
    pub fn with_socket(socket: impl AsRef<OsStr>) -> Notifier {
        let socket = socket.as_ref();
        let warned = Arc::new(AtomicBool::new(false));
        let target = match Target::open(socket) {
            Ok(target) => target,
            Err(err) => {
                warn!(
                    notify_socket = %socket.to_string_lossy(),
                    error = %inferd_proto::error_chain(&err),
                    "NOTIFY_SOCKET unusable; systemd will not hear from inferd"
                );
                return Notifier::disabled();
            }
        };
        let (queue, messages) = mpsc::channel::<String>();
        let thread_warned = Arc::clone(&warned);
        let thread = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for message in messages {
                    target.deliver(&message, &thread_warned);
                }
            });
        let sender = match thread {
            Ok(thread) => Sender {
                queue: Some(queue),
                thread: Some(thread),
            },
            Err(err) => {
                warn!(error = %err, "cannot start the systemd notification thread; systemd will not hear from inferd");
                return Notifier::disabled();
            }
        };
        Notifier {
            sender: Some(sender),
            watchdog: None,
            #[cfg(test)]
            warned,
        }
    }

    /// [`Notifier::from_env`] with the variables' values given:
    /// `notify_socket` is `NOTIFY_SOCKET` (unset or empty: disabled),
    /// `watchdog_usec` and `watchdog_pid` are `WATCHDOG_USEC` and
    /// `WATCHDOG_PID`, and `our_pid` is this process's pid.
    pub fn from_values(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        our_pid: u32,
    ) -> Notifier {
        let Some(socket) = notify_socket.filter(|s| !s.is_empty()) else {
            return Notifier::disabled();
        };
        let mut notifier = Notifier::with_socket(socket);
        if notifier.sender.is_some() {
            notifier.watchdog = watchdog_interval(watchdog_usec, watchdog_pid, our_pid);
        }
        notifier
    }

    /// A notifier that sends nothing (not under systemd).
    pub fn disabled() -> Notifier {
        Notifier {
            sender: None,
            watchdog: None,
            #[cfg(test)]
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// `READY=1` with a one-line status: startup finished, or a reload
    /// (after [`Notifier::reloading`]) is over.
    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// `RELOADING=1` plus `MONOTONIC_USEC=` (the current `CLOCK_MONOTONIC`
    /// in microseconds, which `Type=notify-reload` requires to match the
    /// reload to its SIGHUP). Follow it with [`Notifier::ready`].
    pub fn reloading(&self) {
        if self.sender.is_none() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(err) => {
                warn!(error = %err, "cannot read CLOCK_MONOTONIC; sending RELOADING=1 without MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// `STATUS=` with `line`, newlines and NULs replaced by spaces (systemd
    /// shows one line in `systemctl status`).
    pub fn status(&self, line: &str) {
        let line = one_line(line);
        self.send(&[NotifyState::Status(&line)]);
    }

    /// How often to call [`Notifier::watchdog`]: half of `WATCHDOG_USEC`,
    /// if systemd set it for this process (`WATCHDOG_PID` unset or ours).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `WATCHDOG=1`: the event loop is alive.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Queues `states` as one datagram, one `KEY=VALUE` per line.
    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(queue) = self.sender.as_ref().and_then(|s| s.queue.as_ref()) else {
            return;
        };
        let message = states
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        // The thread ends only when this queue is dropped.
        let _ = queue.send(message);
    }
}

impl Target {
    /// Sends one message (on the notification thread).
    fn deliver(&self, message: &str, warned: &AtomicBool) {
        let result = match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(n) if n == message.len() => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {n} of {} bytes", message.len()),
            )),
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            let first_line = message.lines().next().unwrap_or_default();
            if warned.swap(true, Ordering::Relaxed) {
                debug!(notify_socket = %self.name, message = first_line, error = %err, "cannot notify systemd");
            } else {
                warn!(notify_socket = %self.name, message = first_line, error = %err, "cannot notify systemd (further failures are logged at debug level)");
            }
        }
    }

    /// Resolves `NOTIFY_SOCKET` and creates the sending socket.
    fn open(socket: &OsStr) -> Result<Target, TargetError> {
        let bytes = socket.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(socket),
            _ => return Err(TargetError::Unsupported),
        }
        .map_err(TargetError::Address)?;
        let udp = UnixDatagram::unbound().map_err(TargetError::Socket)?;
        udp.set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(TargetError::Socket)?;
        Ok(Target {
            socket: udp,
            addr,
            name: socket.to_string_lossy().into_owned(),
        })
    }
}

/// Half of `WATCHDOG_USEC` if the watchdog is on (a positive number of
/// microseconds) and meant for `our_pid` (`WATCHDOG_PID` unset or equal).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec = usec?.trim().parse::<u64>().ok().filter(|&usec| usec > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// `text` with line breaks and NULs (which would end or corrupt the
/// `KEY=VALUE` line) replaced by spaces.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r', '\0'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicU32;

    /// A real notification socket in a temp dir, standing in for systemd.
    struct Listener {
        /// Keeps the socket's directory alive.
        _dir: tempfile::TempDir,
        /// The bound socket.
        socket: UnixDatagram,
        /// Its path.
        path: std::path::PathBuf,
    }

    impl Listener {
        fn bind() -> Listener {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("set a read timeout");
            Listener {
                _dir: dir,
                socket,
                path,
            }
        }
    }

    /// The next datagram on `socket`, as text.
    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram")
    }

    /// `CLOCK_MONOTONIC` in microseconds, read independently of sd-notify.
    fn monotonic_usec() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
        u64::try_from(ts.tv_sec).expect("non-negative seconds") * 1_000_000
            + u64::try_from(ts.tv_nsec).expect("non-negative nanoseconds") / 1_000
    }

    #[test]
    fn sends_the_lifecycle_messages_in_order() {
        let systemd = Listener::bind();
        let notifier = Notifier::with_socket(&systemd.path);
        assert!(notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);

        notifier.ready("2 workers ready");
        assert_eq!(recv(&systemd.socket), "READY=1\nSTATUS=2 workers ready");

        notifier.status("rolling\nrestart\r\0now");
        assert_eq!(recv(&systemd.socket), "STATUS=rolling restart  now");

        let before = monotonic_usec();
        notifier.reloading();
        let after = monotonic_usec();
        let reloading = recv(&systemd.socket);
        let usec = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("unexpected reload message {reloading:?}"));
        let usec: u64 = usec.parse().expect("MONOTONIC_USEC is a number");
        assert!(
            (before..=after).contains(&usec),
            "MONOTONIC_USEC={usec} outside [{before}, {after}]"
        );

        notifier.ready("reloaded");
        assert_eq!(recv(&systemd.socket), "READY=1\nSTATUS=reloaded");
        notifier.stopping();
        assert_eq!(recv(&systemd.socket), "STOPPING=1");
        notifier.watchdog();
        assert_eq!(recv(&systemd.socket), "WATCHDOG=1");
        assert!(!notifier.warned.load(Ordering::Relaxed));
    }

    #[test]
    fn reaches_an_abstract_socket() {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "inferd-notify-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a read timeout");

        let notifier = Notifier::from_values(
            Some(OsStr::new(&format!("@{name}"))),
            None,
            None,
            std::process::id(),
        );
        assert!(notifier.is_enabled());
        notifier.ready("up");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=up");
    }

    #[test]
    fn disabled_without_a_usable_socket() {
        let pid = std::process::id();
        for socket in [None, Some(""), Some("relative/path"), Some("vsock:2:1234")] {
            let notifier =
                Notifier::from_values(socket.map(OsStr::new), Some("20000000"), None, pid);
            assert!(!notifier.is_enabled(), "{socket:?}");
            assert_eq!(notifier.watchdog_interval(), None, "{socket:?}");
            // No-ops: nothing to send to, nothing to fail.
            notifier.ready("x");
            notifier.reloading();
            notifier.status("x");
            notifier.stopping();
            notifier.watchdog();
            assert!(!notifier.warned.load(Ordering::Relaxed));
        }
        let too_long = format!("/{}", "x".repeat(200));
        assert!(!Notifier::with_socket(too_long).is_enabled());
        assert!(!Notifier::disabled().is_enabled());
    }

    #[test]
    fn send_failures_are_not_fatal_and_warn_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let notifier = Notifier::with_socket(dir.path().join("nobody-listens.sock"));
        assert!(notifier.is_enabled());
        notifier.ready("x");
        notifier.stopping();
        let warned = Arc::clone(&notifier.warned);
        // Dropping the notifier waits for its thread to send what is queued.
        drop(notifier);
        assert!(warned.load(Ordering::Relaxed));
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_our_pid() {
        let systemd = Listener::bind();
        let socket = Some(systemd.path.as_os_str());
        let pid = 4242;
        let interval =
            |usec, wpid| Notifier::from_values(socket, usec, wpid, pid).watchdog_interval();

        assert_eq!(
            interval(Some("20000000"), None),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            interval(Some("20000000"), Some("4242")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            interval(Some("30000001"), None),
            Some(Duration::from_micros(15_000_000))
        );
        assert_eq!(interval(Some("20000000"), Some("4243")), None);
        assert_eq!(interval(Some("20000000"), Some("not a pid")), None);
        assert_eq!(interval(Some("0"), None), None);
        assert_eq!(interval(Some("soon"), None), None);
        assert_eq!(interval(None, Some("4242")), None);
    }
}
