//! The `inferd` child process: starting it, watching for its exit, stopping
//! it (SIGTERM, then SIGKILL), and how it ended.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The daemon child; stopped (SIGTERM, then SIGKILL) and reaped on drop, so
/// no error path leaves it running.
pub(crate) struct Daemon {
    /// The `inferd` process.
    child: Child,
    /// Its client socket.
    pub(crate) socket: PathBuf,
    /// Its log file, quoted in errors.
    log: PathBuf,
    /// Exit status once reaped.
    exit: Option<ExitStatus>,
}

impl Daemon {
    pub(crate) fn start(
        inferd: &Path,
        config: &Path,
        socket: PathBuf,
        log: &Path,
    ) -> Result<Daemon> {
        let stderr = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = stderr
            .try_clone()
            .context("duplicating the log file handle")?;
        let child = Command::new(inferd)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", inferd.display()))?;
        Ok(Daemon {
            child,
            socket,
            log: log.to_owned(),
            exit: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the daemon has exited (reaping it).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            // An error here (ECHILD) cannot happen for our own unreaped child;
            // treating it as "still running" keeps the bounded waits in charge.
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait.
    pub(crate) fn stop(&mut self, grace: Duration) -> DaemonExit {
        if let Some(status) = self.exited() {
            return DaemonExit::Early(status);
        }
        let started = Instant::now();
        self.signal(Signal::SIGTERM);
        while started.elapsed() < grace {
            if let Some(status) = self.exited() {
                return DaemonExit::AfterSigterm {
                    status,
                    after: started.elapsed(),
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(Signal::SIGKILL);
        match self.child.wait() {
            Ok(status) => {
                self.exit = Some(status);
                DaemonExit::Killed {
                    status: Some(status),
                    grace,
                }
            }
            Err(_) => DaemonExit::Killed {
                status: None,
                grace,
            },
        }
    }

    fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // ESRCH (already exited, not yet reaped) is fine: the wait that
            // follows collects it.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// The last `lines` lines of the daemon's log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// How the daemon ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DaemonExit {
    /// It exited on its own before we asked it to.
    Early(ExitStatus),
    /// It exited after our SIGTERM.
    AfterSigterm { status: ExitStatus, after: Duration },
    /// It ignored SIGTERM for `grace` and was SIGKILLed.
    Killed {
        status: Option<ExitStatus>,
        grace: Duration,
    },
}

impl DaemonExit {
    pub(crate) fn clean(&self) -> bool {
        matches!(self, Self::AfterSigterm { status, .. } if status.success())
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Early(status) => format!("exited on its own during the run ({status})"),
            Self::AfterSigterm { status, after } => {
                format!("{status} {:.2} s after SIGTERM", after.as_secs_f64())
            }
            Self::Killed { status, grace } => format!(
                "still running {} s after SIGTERM; SIGKILLed ({})",
                grace.as_secs(),
                status.map_or("not reaped".to_owned(), |s| s.to_string())
            ),
        }
    }
}
