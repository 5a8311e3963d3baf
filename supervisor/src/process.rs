//! Worker processes at the OS level: fork+exec with an inherited socket,
//! non-blocking reaping, and the one classification of how a worker ended.
//!
//! The supervisor spawns workers with `std::process::Command` and drops the
//! `Child` handle, so nothing but [`try_reap`] ever calls waitpid on them (no
//! tokio process reaper runs alongside). `try_reap` waits on one known pid
//! at a time rather than `waitpid(-1)`, so it never steals another child's
//! status.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use inferd_proto::{ExitKind, RecycleTrigger};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The fd number the worker finds its supervisor socket on.
pub const WORKER_FD: i32 = 3;

/// Environment variables a worker must not inherit: they address the
/// supervisor's own systemd notification and socket-activation channels.
const SUPERVISOR_ONLY_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Failure to start or signal a worker process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// socketpair(2) failed.
    #[error("cannot create the worker socketpair")]
    SocketPair(#[source] io::Error),
    /// fork or exec of the worker binary failed.
    #[error("cannot start worker binary {binary}")]
    Exec {
        /// The executable.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Making our socket end non-blocking failed.
    #[error("cannot set up the worker socket")]
    SocketSetup(#[source] io::Error),
}

/// A freshly started worker: its pid and our end of its socket.
#[derive(Debug)]
pub struct SpawnedWorker {
    /// The worker's pid.
    pub pid: Pid,
    /// Our end of the socketpair, registered with tokio.
    pub stream: tokio::net::UnixStream,
}

/// Starts `binary --fd 3` with one end of a new socketpair as fd 3. The child
/// dies with this thread (`PR_SET_PDEATHSIG`; the supervisor runs a
/// current-thread runtime so "this thread" is the whole daemon), leads its
/// own process group (a terminal's Ctrl-C reaches only the supervisor, which
/// then drains), and does not inherit systemd's variables.
///
/// Everything that can fail is done before the fork: once a child exists,
/// this returns it, so no started worker is ever left unreaped (a zombie) or
/// outside the pool's sight. Must be called inside the tokio runtime.
pub fn spawn_worker(binary: &Path) -> Result<SpawnedWorker, ProcessError> {
    let (ours, theirs) = UnixStream::pair().map_err(ProcessError::SocketPair)?;
    ours.set_nonblocking(true)
        .map_err(ProcessError::SocketSetup)?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(ProcessError::SocketSetup)?;
    let their_fd = theirs.as_raw_fd();
    let supervisor_pid = std::process::id() as libc::pid_t;
    let mut command = Command::new(binary);
    command
        .arg("--fd")
        .arg(WORKER_FD.to_string())
        .stdin(Stdio::null());
    for name in SUPERVISOR_ONLY_ENV {
        command.env_remove(name);
    }
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (prctl, getppid, setpgid, dup2, fcntl).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl.
            if libc::getppid() != supervisor_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if their_fd == WORKER_FD {
                // dup2 onto itself would keep FD_CLOEXEC set.
                if libc::fcntl(WORKER_FD, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(their_fd, WORKER_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| ProcessError::Exec {
        binary: binary.to_owned(),
        source,
    })?;
    drop(theirs);
    // Dropping `child` neither waits nor kills: reaping is `try_reap`'s job.
    Ok(SpawnedWorker {
        pid: Pid::from_raw(child.id() as i32),
        stream: ours,
    })
}

/// Sends SIGKILL. `Ok` also when the process is already gone (a zombie
/// still accepts signals; ESRCH means it was reaped already).
pub fn sigkill(pid: Pid) -> Result<(), Errno> {
    match kill(pid, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(err) => Err(err),
    }
}

/// How a reaped process ended, as waitpid reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReport {
    /// exit(code).
    Exited(i32),
    /// Killed by this signal.
    Signaled(Signal),
}

/// Non-blocking waitpid on one pid. `Ok(None)`: still running.
/// ECHILD (someone else reaped it, or it never was our child) is reported
/// as `Err`, so the caller can drop the worker rather than wait forever.
pub fn try_reap(pid: Pid) -> Result<Option<ExitReport>, Errno> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Some(ExitReport::Exited(code))),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(Some(ExitReport::Signaled(signal)))
            }
            Ok(WaitStatus::StillAlive) => return Ok(None),
            // Stop/continue notifications are not ends; we did not ask for
            // them (no WUNTRACED), but handle them rather than misclassify.
            Ok(WaitStatus::Stopped(..) | WaitStatus::Continued(_)) => return Ok(None),
            Ok(WaitStatus::PtraceEvent(..) | WaitStatus::PtraceSyscall(_)) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err),
        }
    }
}

/// How the pool starts, kills and reaps worker processes: the OS
/// ([`OsProcesses`]) in the daemon, in-process fakes in the pool's unit
/// tests, so its rules can be driven with paused time.
pub trait Processes: Send + 'static {
    /// Starts `binary` as a worker: its pid and our end of its socket.
    fn spawn(&mut self, binary: &Path) -> Result<SpawnedWorker, ProcessError>;
    /// Sends SIGKILL; `Ok` when it is already gone.
    fn kill(&mut self, pid: Pid) -> Result<(), Errno>;
    /// How `pid` ended, once it has; `Ok(None)` while it runs.
    fn try_reap(&mut self, pid: Pid) -> Result<Option<ExitReport>, Errno>;
}

/// Real processes: [`spawn_worker`], [`sigkill`], [`try_reap`].
#[derive(Debug, Default)]
pub struct OsProcesses;

impl Processes for OsProcesses {
    fn spawn(&mut self, binary: &Path) -> Result<SpawnedWorker, ProcessError> {
        spawn_worker(binary)
    }

    fn kill(&mut self, pid: Pid) -> Result<(), Errno> {
        sigkill(pid)
    }

    fn try_reap(&mut self, pid: Pid) -> Result<Option<ExitReport>, Errno> {
        try_reap(pid)
    }
}

/// Why the supervisor asked a worker to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireReason {
    /// The daemon is shutting down.
    Shutdown,
    /// Its memory went over `soft_limit`.
    SoftLimit,
    /// It served `max_requests` (staggered).
    MaxRequests,
    /// It lived `max_lifetime_secs` (staggered).
    MaxLifetime,
    /// Rolling restart (SIGHUP or `inferctl roll`).
    Roll,
    /// Its memory grows fast enough to pass the hard limit before a
    /// replacement could be Ready.
    LeakRate,
    /// A spare no longer needed (fewer spares, or a roll replaces it).
    SpareSurplus,
}

impl RetireReason {
    /// The recycle trigger it counts under; a shutdown is no recycle.
    pub fn trigger(self) -> Option<RecycleTrigger> {
        match self {
            Self::Shutdown => None,
            Self::SoftLimit => Some(RecycleTrigger::SoftLimit),
            Self::MaxRequests => Some(RecycleTrigger::MaxRequests),
            Self::MaxLifetime => Some(RecycleTrigger::MaxLifetime),
            Self::Roll => Some(RecycleTrigger::Roll),
            Self::LeakRate => Some(RecycleTrigger::LeakRate),
            Self::SpareSurplus => None,
        }
    }
}

/// Why the supervisor SIGKILLed a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// Its memory went over `hard_limit`.
    HardLimit,
    /// One request ran past `request_timeout`.
    RequestTimeout,
    /// The model did not load within `startup_timeout`.
    StartupTimeout,
    /// Asked to exit, it did not within the drain deadline.
    DrainDeadline,
    /// It sent something the protocol does not allow.
    ProtocolViolation,
    /// It closed its socket but kept running.
    SocketClosed,
    /// A replacement still loading when its rolling restart gave up.
    RollFailed,
}

impl fmt::Display for RetireReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shutdown => "shutdown",
            Self::SoftLimit => "soft_limit",
            Self::MaxRequests => "max_requests",
            Self::MaxLifetime => "max_lifetime",
            Self::Roll => "roll",
            Self::LeakRate => "leak_rate",
            Self::SpareSurplus => "spare_surplus",
        })
    }
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HardLimit => "hard_limit",
            Self::RequestTimeout => "request_timeout",
            Self::StartupTimeout => "startup_timeout",
            Self::DrainDeadline => "drain_deadline",
            Self::ProtocolViolation => "protocol_violation",
            Self::SocketClosed => "socket_closed",
            Self::RollFailed => "roll_failed",
        })
    }
}

/// What the supervisor had done to a worker before it ended: the other half
/// of the evidence next to the wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Nothing: any end is the worker's own (or someone else's doing).
    None,
    /// We asked it to exit.
    Retire(RetireReason),
    /// We sent SIGKILL.
    Kill(KillReason),
}

/// Evidence of the kernel OOM killer, read when a worker is reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomEvidence {
    /// None found.
    None,
    /// The worker's own cgroup counted an OOM kill: certain.
    CgroupCounter,
    /// No cgroup, but the host's `oom_kill` count rose while it lived.
    HostCounter,
}

/// The classified end of a worker: decided once, then logged, counted and
/// shown in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnd {
    /// We asked it to stop and it exited 0.
    Retired {
        /// Why we asked.
        reason: RetireReason,
    },
    /// We sent SIGKILL and it died of SIGKILL.
    KilledBySupervisor {
        /// Why we killed it.
        reason: KillReason,
    },
    /// The kernel OOM killer took it.
    OomKilled {
        /// Only the host-wide counter says so (no per-worker cgroup).
        likely: bool,
    },
    /// It died of a signal we did not send.
    Signaled {
        /// The signal.
        signal: Signal,
    },
    /// It exited by itself.
    Exited {
        /// Exit status.
        code: i32,
    },
}

impl WorkerEnd {
    /// Combines waitpid's report with what we did to the worker and what the
    /// OOM counters say. A SIGKILL is ours only if we sent one; the kernel's
    /// own cgroup counter beats everything, the host-wide counter only a
    /// SIGKILL nobody in inferd sent.
    pub fn classify(report: ExitReport, intent: Intent, oom: OomEvidence) -> Self {
        match (report, intent, oom) {
            (ExitReport::Signaled(Signal::SIGKILL), _, OomEvidence::CgroupCounter) => {
                Self::OomKilled { likely: false }
            }
            (ExitReport::Signaled(Signal::SIGKILL), Intent::Kill(reason), _) => {
                Self::KilledBySupervisor { reason }
            }
            (ExitReport::Signaled(Signal::SIGKILL), _, OomEvidence::HostCounter) => {
                Self::OomKilled { likely: true }
            }
            (ExitReport::Exited(0), Intent::Retire(reason), _) => Self::Retired { reason },
            (ExitReport::Signaled(signal), _, _) => Self::Signaled { signal },
            (ExitReport::Exited(code), _, _) => Self::Exited { code },
        }
    }

    /// Its kind, for counters and metrics.
    pub fn kind(&self) -> ExitKind {
        match self {
            Self::Retired { .. } => ExitKind::Retired,
            Self::KilledBySupervisor { .. } => ExitKind::KilledBySupervisor,
            Self::OomKilled { likely: false } => ExitKind::OomKilled,
            Self::OomKilled { likely: true } => ExitKind::LikelyOomKilled,
            Self::Signaled { .. } => ExitKind::Signaled,
            Self::Exited { .. } => ExitKind::Exited,
        }
    }

    /// True for ends inferd asked for.
    pub fn was_requested(&self) -> bool {
        matches!(self, Self::Retired { .. } | Self::KilledBySupervisor { .. })
    }

    /// For a worker that ended before it was Ready: does this end say that
    /// starting a worker does not work (so that retrying at once is futile)?
    /// A load failure, a crash, a non-zero exit, an OOM kill while loading
    /// (the limit is below what the model needs), or no Ready in time do. A
    /// signal from outside (an operator's or a neighbour's `kill`) does not:
    /// it says nothing about the next start, which goes ahead at once.
    pub fn is_failed_start(&self) -> bool {
        match self {
            Self::Retired { .. } => false,
            Self::KilledBySupervisor { reason } => !matches!(
                reason,
                KillReason::DrainDeadline | KillReason::RequestTimeout | KillReason::RollFailed
            ),
            // Its own cgroup's limit is below what loading needs; a host-wide
            // OOM kill says nothing certain about this worker.
            Self::OomKilled { likely } => !likely,
            Self::Exited { .. } => true,
            Self::Signaled { signal } => is_self_inflicted(*signal),
        }
    }

    /// For a worker that had been Ready: is this end part of a crash loop
    /// (the worker failing by itself)? Crashes and exits are; anything inferd
    /// asked for, OOM kills (the leaks inferd contains: each replacement must
    /// load and serve before it can die again) and signals from outside are
    /// not, so a kill storm never slows replacements down.
    pub fn is_crash(&self) -> bool {
        match self {
            Self::Exited { .. } => true,
            Self::Signaled { signal } => is_self_inflicted(*signal),
            Self::Retired { .. } | Self::KilledBySupervisor { .. } | Self::OomKilled { .. } => {
                false
            }
        }
    }
}

/// Signals a process gets from its own faults (bad memory access, abort,
/// illegal instruction...), as opposed to ones somebody else sends it.
fn is_self_inflicted(signal: Signal) -> bool {
    matches!(
        signal,
        Signal::SIGSEGV
            | Signal::SIGBUS
            | Signal::SIGILL
            | Signal::SIGFPE
            | Signal::SIGABRT
            | Signal::SIGSYS
            | Signal::SIGTRAP
    )
}

impl fmt::Display for WorkerEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retired { reason } => write!(f, "retired ({reason})"),
            Self::KilledBySupervisor { reason } => write!(f, "killed by supervisor ({reason})"),
            Self::OomKilled { likely: false } => {
                f.write_str("OOM-killed by the kernel (its cgroup's oom_kill counter rose)")
            }
            Self::OomKilled { likely: true } => f.write_str(
                "likely OOM-killed (SIGKILL not sent by inferd; the host oom_kill counter rose)",
            ),
            Self::Signaled { signal } => write!(f, "killed by {signal} (not sent by inferd)"),
            Self::Exited { code } => write!(f, "exited with status {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_workers_own_failures_count_against_starts_and_crash_loops() {
        let external = WorkerEnd::Signaled {
            signal: Signal::SIGKILL,
        };
        let sigterm = WorkerEnd::Signaled {
            signal: Signal::SIGTERM,
        };
        let abort = WorkerEnd::Signaled {
            signal: Signal::SIGABRT,
        };
        let segv = WorkerEnd::Signaled {
            signal: Signal::SIGSEGV,
        };
        let exit1 = WorkerEnd::Exited { code: 1 };
        let startup = WorkerEnd::KilledBySupervisor {
            reason: KillReason::StartupTimeout,
        };
        let oom = WorkerEnd::OomKilled { likely: false };
        let likely_oom = WorkerEnd::OomKilled { likely: true };
        let retired = WorkerEnd::Retired {
            reason: RetireReason::Roll,
        };
        let failed_start: Vec<bool> = [
            external, sigterm, abort, segv, exit1, startup, oom, likely_oom, retired,
        ]
        .iter()
        .map(WorkerEnd::is_failed_start)
        .collect();
        assert_eq!(
            failed_start,
            [false, false, true, true, true, true, true, false, false]
        );
        let crash: Vec<bool> = [external, sigterm, abort, segv, exit1, startup, oom, retired]
            .iter()
            .map(WorkerEnd::is_crash)
            .collect();
        assert_eq!(crash, [false, false, true, true, true, false, false, false]);
    }

    #[test]
    fn classification_uses_status_intent_and_oom_evidence() {
        use OomEvidence as O;
        let kill = Intent::Kill(KillReason::RequestTimeout);
        let retire = Intent::Retire(RetireReason::Shutdown);
        let sigkill = ExitReport::Signaled(Signal::SIGKILL);
        let cases = [
            (sigkill, kill, O::None, ExitKind::KilledBySupervisor),
            // A SIGKILL we did not send is never ours.
            (sigkill, Intent::None, O::None, ExitKind::Signaled),
            (sigkill, retire, O::None, ExitKind::Signaled),
            // The cgroup counter is the kernel's own word.
            (sigkill, Intent::None, O::CgroupCounter, ExitKind::OomKilled),
            (sigkill, kill, O::CgroupCounter, ExitKind::OomKilled),
            // The host counter only explains a SIGKILL nobody here sent.
            (
                sigkill,
                Intent::None,
                O::HostCounter,
                ExitKind::LikelyOomKilled,
            ),
            (sigkill, kill, O::HostCounter, ExitKind::KilledBySupervisor),
            (
                ExitReport::Signaled(Signal::SIGABRT),
                Intent::None,
                O::CgroupCounter,
                ExitKind::Signaled,
            ),
            // We sent SIGKILL but it died of something else first.
            (
                ExitReport::Signaled(Signal::SIGABRT),
                kill,
                O::None,
                ExitKind::Signaled,
            ),
            (ExitReport::Exited(0), retire, O::None, ExitKind::Retired),
            (ExitReport::Exited(1), retire, O::None, ExitKind::Exited),
            (
                ExitReport::Exited(0),
                Intent::None,
                O::None,
                ExitKind::Exited,
            ),
            (ExitReport::Exited(0), kill, O::None, ExitKind::Exited),
        ];
        for (report, intent, oom, kind) in cases {
            assert_eq!(
                WorkerEnd::classify(report, intent, oom).kind(),
                kind,
                "{report:?} + {intent:?} + {oom:?}"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn spawn_passes_the_socket_and_reaps_the_exit() {
        // `sh -c` stands in for the worker: it writes to fd 3 and exits 7.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-worker");
        std::fs::write(&script, "#!/bin/sh\necho \"$1 $2\" >&3\nexit 7\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut worker = spawn_worker(&script).unwrap();
        let mut line = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut worker.stream, &mut line)
            .await
            .unwrap();
        assert_eq!(line, "--fd 3\n");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let report = loop {
            if let Some(report) = try_reap(worker.pid).unwrap() {
                break report;
            }
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::yield_now();
        };
        assert_eq!(report, ExitReport::Exited(7));
        assert_eq!(try_reap(worker.pid), Err(Errno::ECHILD));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn missing_binary_is_an_exec_error() {
        let err = spawn_worker(Path::new("/nonexistent/inferd-worker")).unwrap_err();
        assert!(matches!(err, ProcessError::Exec { .. }), "{err:?}");
    }
}
