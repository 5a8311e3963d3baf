//! Per-worker memory cgroups: the kernel enforces each worker's hard memory
//! limit, and an OOM kill is attributed from a counter, never guessed.
//!
//! # How it works
//!
//! Each worker runs in its own leaf cgroup whose memory limit is the
//! configured hard limit. When the worker goes over it, the kernel's OOM
//! killer acts *inside that leaf*: it kills the worker and nothing else, and
//! bumps the leaf's `oom_kill` counter. When the supervisor reaps a worker
//! that died of a SIGKILL it did not send, it reads the counter
//! ([`Leaf::oom_kills`]): if it rose, the end is `OomKilled`. Without a
//! per-worker cgroup the only evidence is the host-wide `oom_kill` count in
//! `/proc/vmstat` ([`host_oom_kills`]), which is worth a "likely OOM" at best.
//!
//! The steps: [`detect`] finds a usable memory cgroup (one line for the
//! startup log if there is none), [`CgroupSupport::prepare`] makes it ready to
//! hold leaves, [`Cgroups::create_leaf`] creates one leaf per worker, and
//! [`Leaf::add_process`] moves the worker in.
//!
//! # cgroup v2 (unified hierarchy)
//!
//! `/proc/self/cgroup` has the line `0::/path`; the hierarchy is the
//! `cgroup2` mount (normally `/sys/fs/cgroup`). The supervisor may only
//! manage the subtree below its own cgroup when that subtree was *delegated*
//! to it: under systemd, `Delegate=yes` (systemd marks such cgroups with the
//! `trusted.delegate` / `user.delegate` xattr, which detection checks on
//! systemd-managed paths), in a container, a cgroup namespace of its own. The
//! memory controller must also be available there (listed in the cgroup's
//! `cgroup.controllers`).
//!
//! v2's *no internal processes* rule says a cgroup that enables controllers
//! for its children (`cgroup.subtree_control`) holds no processes itself. So
//! [`CgroupSupport::prepare`] first moves the supervisor (and any other
//! process of the delegated cgroup) into the leaf `<own>/supervisor`, then
//! writes `+memory` to `<own>/cgroup.subtree_control`; worker leaves are
//! `<own>/<name>`. Each leaf gets `memory.max` = the limit,
//! `memory.swap.max = 0` (where swap is accounted: the worker cannot escape
//! to swap). The counter is `oom_kill` in the leaf's `memory.events`.
//! `memory.oom.group` is left off: a worker is one process, and with it on
//! the kernel counts each kill twice. A supervisor that
//! already runs in a cgroup named `supervisor` (a restart in the same
//! process, or systemd's `DelegateSubgroup=supervisor`) uses its parent.
//!
//! # cgroup v1 (the `memory` hierarchy)
//!
//! `/proc/self/cgroup` has a line `N:memory:/path`; the hierarchy is the
//! `cgroup` mount with the `memory` option, found in `/proc/self/mountinfo`
//! (normally `/sys/fs/cgroup/memory`). v1 has no delegation model: the
//! supervisor can use it when it may create directories there (typically
//! root). There is no internal-process rule, so the supervisor stays where
//! it is and the leaves go right under its own memory cgroup. Each leaf gets
//! `memory.limit_in_bytes` = the limit and, where swap accounting is on,
//! `memory.memsw.limit_in_bytes` = the limit too. The counter is `oom_kill`
//! in `memory.oom_control` (Linux 4.13+).
//!
//! # Move the worker in before it allocates
//!
//! A page is charged to the cgroup of the process that faulted it in, and
//! stays charged there when the process moves (v2 never moves charges; v1's
//! `memory.move_charge_at_immigrate` is deprecated and off by default). A
//! worker that loaded its model before being moved would have its memory
//! counted against the supervisor's cgroup, outside its limit. So the worker
//! is spawned, moved into its leaf, and only then told to start (it waits for
//! its start frame). Page cache of the memory-mapped model file is charged
//! the same way, to the leaf of the worker that first read it; it is
//! reclaimable, so a leaf at its limit drops cache before anything is killed.
//!
//! # Cleanup
//!
//! [`Leaf::remove`] (and dropping a [`Leaf`]) removes the directory. A cgroup
//! cannot be removed while a process is in it, and a worker that was just
//! killed may not have left yet: removal retries on `EBUSY` for at most
//! [`REMOVE_TIMEOUT`], blocking the calling thread, so remove a leaf after its
//! worker was reaped. A leaf left over by a crashed supervisor is removed by
//! [`Cgroups::create_leaf`], or reused (with a warning) if it still holds
//! processes.
//!
//! All of this is short synchronous reads and writes of cgroupfs files
//! (the pool removes leaves off its own thread).
//!
//! # Layout
//!
//! This module holds the types, [`detect`] and the setup; `detect` finds
//! the cgroup to use (parsing `/proc/self/cgroup` and `mountinfo`), `v2`
//! prepares a v2 parent, and `leaf` is the per-worker cgroup.

mod detect;
mod leaf;
#[cfg(test)]
mod tests;
mod v2;

pub use detect::own_memory_limit;
use detect::{detect_at, detect_own};
use leaf::remove_dir_bounded;
pub use leaf::{Leaf, LeafError};
use v2::prepare_v2;

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tracing::{debug, warn};

/// Name of the v2 leaf the supervisor moves itself into (no internal
/// processes rule); never a worker leaf name.
pub const SUPERVISOR_LEAF: &str = "supervisor";
/// How long removing a leaf waits for its last process to leave.
pub const REMOVE_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest pause between two removal attempts.
const REMOVE_MAX_PAUSE: Duration = Duration::from_millis(50);
/// How many times `prepare` sweeps the processes of a v2 cgroup into the
/// supervisor leaf (new ones may appear while it moves the others).
const MOVE_SWEEPS: usize = 3;
/// v1 reports "no limit" as the largest page-aligned i64; anything this
/// large is treated as unlimited.
const V1_UNLIMITED: u64 = 1 << 62;
/// Distinguishes the probe directories of concurrent `detect` calls.
static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Whether this process can put workers into memory cgroups, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    /// Unified hierarchy; `parent` is the delegated cgroup that will hold
    /// the supervisor leaf and the worker leaves.
    V2 {
        /// Directory of the delegated cgroup.
        parent: PathBuf,
    },
    /// Legacy `memory` hierarchy; `parent` is the supervisor's own memory
    /// cgroup (or the override), which will hold the worker leaves.
    V1 {
        /// Directory of the parent memory cgroup.
        parent: PathBuf,
    },
    /// No usable memory cgroup; `reason` fits one startup log line.
    Unavailable {
        /// Why, and where relevant what to change.
        reason: String,
    },
}

/// Which cgroup interface a [`Cgroups`] or [`Leaf`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// Unified hierarchy.
    V2,
}

/// Failure to make the detected cgroup ready for worker leaves
/// ([`CgroupSupport::prepare`]).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `prepare` was called although detection found no usable cgroup.
    #[error("memory cgroups unavailable: {reason}")]
    Unavailable {
        /// What detection said.
        reason: String,
    },
    /// Reading the processes of the v2 parent cgroup failed.
    #[error("cannot list the processes in {path}")]
    ListProcesses {
        /// The `cgroup.procs` file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Moving the supervisor (or a fellow process) into its v2 leaf failed.
    #[error("cannot move process {pid} into the supervisor cgroup {path}")]
    MoveSupervisor {
        /// The process.
        pid: Pid,
        /// The `cgroup.procs` file of the supervisor leaf.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The v2 parent holds processes and the supervisor is not one of them:
    /// moving them would touch someone else's processes.
    #[error("{path} holds processes other than the supervisor; cannot enable the memory controller there")]
    ForeignProcesses {
        /// The parent cgroup.
        path: PathBuf,
    },
    /// Writing `+memory` to `cgroup.subtree_control` failed.
    #[error("cannot enable the memory controller in {path}")]
    EnableController {
        /// The `cgroup.subtree_control` file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// mkdir of the v2 supervisor leaf failed.
    #[error("cannot create the supervisor cgroup {path}")]
    CreateSupervisorLeaf {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Finds a memory cgroup this process can create worker leaves in.
///
/// Without an override: the supervisor's own cgroup, v1 `memory` hierarchy
/// if one exists (hybrid systems mount both), else cgroup v2. With an
/// override: that directory (created if missing), v1 or v2 by its control
/// files; the systemd delegation check is skipped, the operator chose it.
/// Either way a throwaway child directory is created and removed to prove
/// write access.
pub fn detect(parent_override: Option<&Path>) -> CgroupSupport {
    let result = match parent_override {
        Some(dir) => detect_at(dir),
        None => detect_own(),
    };
    result.unwrap_or_else(|reason| CgroupSupport::Unavailable { reason })
}

impl CgroupSupport {
    /// Makes the detected cgroup ready to hold worker leaves. v1: nothing to
    /// do. v2: moves the supervisor into `<parent>/supervisor` and enables
    /// the memory controller for `<parent>`'s children.
    pub fn prepare(&self) -> Result<Cgroups, SetupError> {
        match self {
            Self::V1 { parent } => Ok(Cgroups {
                version: CgroupVersion::V1,
                parent: parent.clone(),
            }),
            Self::V2 { parent } => {
                prepare_v2(parent)?;
                Ok(Cgroups {
                    version: CgroupVersion::V2,
                    parent: parent.clone(),
                })
            }
            Self::Unavailable { reason } => Err(SetupError::Unavailable {
                reason: reason.clone(),
            }),
        }
    }
}

/// A prepared parent cgroup; creates one leaf per worker.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// Which interface the files speak.
    version: CgroupVersion,
    /// The directory the leaves are created in.
    parent: PathBuf,
}

impl Cgroups {
    /// v1 or v2.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The directory the leaves are created in.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// Creates the leaf `<parent>/<name>` with memory limit `limit_bytes`
    /// (none: unlimited until [`Leaf::set_limit`]; no swap where swap is
    /// accounted). A leftover leaf of the same name is removed first, or
    /// reused if a process still holds it.
    pub fn create_leaf(&self, name: &str, limit_bytes: Option<u64>) -> Result<Leaf, LeafError> {
        validate_name(name)?;
        let path = self.parent.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a crashed run (names never collide with control
                // files, so this is a directory).
                match remove_dir_bounded(&path) {
                    Ok(()) => fs::create_dir(&path).map_err(|source| LeafError::CreateLeaf {
                        path: path.clone(),
                        source,
                    })?,
                    Err(err) => {
                        warn!(path = %path.display(), error = %err, "stale worker cgroup is still in use; reusing it");
                    }
                }
            }
            Err(source) => return Err(LeafError::CreateLeaf { path, source }),
        }
        // From here on the leaf is ours: dropping it on error removes it.
        let leaf = Leaf {
            version: self.version,
            path,
            removed: false,
        };
        leaf.set_limit(limit_bytes)?;
        Ok(leaf)
    }
}

/// The host-wide count of OOM kills (`oom_kill` in `/proc/vmstat`), for
/// "likely OOM" attribution without a per-worker cgroup; `None` if
/// unreadable or the kernel predates the counter (4.13).
pub fn host_oom_kills() -> Option<u64> {
    let text = fs::read_to_string("/proc/vmstat").ok()?;
    keyed_value(&text, "oom_kill")
}

/// The value of the line `<key> <number>` in a flat keyed file
/// (`memory.oom_control`, `memory.events`, `/proc/vmstat`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()? != key {
            return None;
        }
        fields.next()?.parse().ok()
    })
}

/// A file holding one number; `max` (v2 "unlimited") and errors read as
/// `None`.
fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes a limit that must take effect.
fn write_limit(path: &Path, value: &str) -> Result<(), LeafError> {
    fs::write(path, value).map_err(|source| LeafError::SetLimit {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a setting that helps but is not essential (swap accounting may be
/// off, an old kernel may lack the file).
fn write_optional(path: &Path, value: &str) {
    if let Err(err) = fs::write(path, value) {
        if err.kind() != io::ErrorKind::NotFound {
            debug!(path = %path.display(), value, error = %err, "optional cgroup setting not applied");
        }
    }
}

/// Leaf names are single plain path components that cannot collide with a
/// control file (`memory.*`, `cgroup.*`) or the supervisor leaf.
fn validate_name(name: &str) -> Result<(), LeafError> {
    let invalid = |reason| {
        Err(LeafError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return invalid("must be 1 to 200 bytes long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return invalid("only ASCII letters, digits, '-' and '_' are allowed");
    }
    if name == SUPERVISOR_LEAF {
        return invalid("reserved for the supervisor's own cgroup");
    }
    Ok(())
}
