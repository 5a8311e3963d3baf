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
//! All of this is short synchronous reads and writes of cgroupfs files.

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

/// Failure of a cgroup operation; each variant names the operation.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `prepare` was called although detection found no usable cgroup.
    #[error("memory cgroups unavailable: {reason}")]
    Unavailable {
        /// What detection said.
        reason: String,
    },
    /// The leaf name is not a plain directory name we accept.
    #[error("invalid cgroup leaf name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// mkdir of a leaf (or of the supervisor leaf) failed.
    #[error("cannot create cgroup {path}")]
    CreateLeaf {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the memory limit failed.
    #[error("cannot set the memory limit in {path}")]
    SetLimit {
        /// The control file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Moving a process into a leaf failed.
    #[error("cannot move process {pid} into {path}")]
    AddProcess {
        /// The process.
        pid: Pid,
        /// The `cgroup.procs` file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a counter file failed.
    #[error("cannot read {path}")]
    ReadCounter {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A counter file has no line for the key (kernel too old).
    #[error("{path} has no `{key}` line")]
    MissingCounter {
        /// The file.
        path: PathBuf,
        /// The key looked for.
        key: &'static str,
    },
    /// rmdir of a leaf failed (after retrying while it was busy).
    #[error("cannot remove cgroup {path}")]
    RemoveLeaf {
        /// The directory.
        path: PathBuf,
        /// The OS error of the last attempt.
        #[source]
        source: io::Error,
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
    pub fn prepare(&self) -> Result<Cgroups, CgroupError> {
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
            Self::Unavailable { reason } => Err(CgroupError::Unavailable {
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
    /// (and no swap where swap is accounted). A leftover leaf of the same
    /// name is removed first, or reused if a process still holds it.
    pub fn create_leaf(&self, name: &str, limit_bytes: u64) -> Result<Leaf, CgroupError> {
        validate_name(name)?;
        let path = self.parent.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a crashed run (names never collide with control
                // files, so this is a directory).
                match remove_dir_bounded(&path) {
                    Ok(()) => fs::create_dir(&path).map_err(|source| CgroupError::CreateLeaf {
                        path: path.clone(),
                        source,
                    })?,
                    Err(err) => {
                        warn!(path = %path.display(), error = %err, "stale worker cgroup is still in use; reusing it");
                    }
                }
            }
            Err(source) => return Err(CgroupError::CreateLeaf { path, source }),
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

/// One worker's cgroup. Dropping it removes the directory (best effort,
/// bounded); [`Leaf::remove`] does the same and reports the outcome.
#[derive(Debug)]
pub struct Leaf {
    /// Which interface the files speak.
    version: CgroupVersion,
    /// The leaf directory.
    path: PathBuf,
    /// Set once removal was attempted, so Drop does not try again.
    removed: bool,
}

impl Leaf {
    /// The leaf directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// v1 or v2.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Moves `pid` (all its threads) into the leaf. Do it before the process
    /// allocates: pages stay charged where they were faulted in.
    pub fn add_process(&self, pid: Pid) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.procs");
        fs::write(&path, pid.as_raw().to_string()).map_err(|source| CgroupError::AddProcess {
            pid,
            path,
            source,
        })
    }

    /// How many OOM kills the kernel recorded in this leaf since it was
    /// created (or since a crashed run created it, if it was reused). Ask
    /// whether it *rose* since a reading taken when the worker started, not
    /// by how much: it counts kill events, which need not be one per process.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let path = self.path.join(match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        });
        let text = fs::read_to_string(&path).map_err(|source| CgroupError::ReadCounter {
            path: path.clone(),
            source,
        })?;
        keyed_value(&text, "oom_kill").ok_or(CgroupError::MissingCounter {
            path,
            key: "oom_kill",
        })
    }

    /// Memory charged to the leaf now, page cache included; `None` if
    /// unreadable.
    pub fn memory_current(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.usage_in_bytes",
            CgroupVersion::V2 => "memory.current",
        };
        read_u64(&self.path.join(file))
    }

    /// The memory limit the kernel enforces; `None` if unlimited or
    /// unreadable.
    pub fn memory_limit(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        };
        read_u64(&self.path.join(file)).filter(|&limit| limit < V1_UNLIMITED)
    }

    /// Removes the leaf directory, waiting at most [`REMOVE_TIMEOUT`] for a
    /// dying process to leave. A leaf that is already gone counts as removed.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.removed = true;
        remove_dir_bounded(&self.path).map_err(|source| CgroupError::RemoveLeaf {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes the limit files; v1 also lifts the swap limit first so the
    /// memory limit may rise (v1 requires memory <= memory+swap).
    fn set_limit(&self, limit_bytes: u64) -> Result<(), CgroupError> {
        let limit = limit_bytes.to_string();
        match self.version {
            CgroupVersion::V1 => {
                let memsw = self.path.join("memory.memsw.limit_in_bytes");
                let has_memsw = memsw.exists();
                if has_memsw {
                    write_optional(&memsw, "-1");
                }
                write_limit(&self.path.join("memory.limit_in_bytes"), &limit)?;
                if has_memsw {
                    write_optional(&memsw, &limit);
                }
            }
            CgroupVersion::V2 => {
                write_limit(&self.path.join("memory.max"), &limit)?;
                write_optional(&self.path.join("memory.swap.max"), "0");
            }
        }
        Ok(())
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(err) = remove_dir_bounded(&self.path) {
            warn!(path = %self.path.display(), error = %err, "cannot remove worker cgroup");
        }
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
fn write_limit(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::SetLimit {
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

/// rmdir, retrying on EBUSY (a process still leaving) until
/// [`REMOVE_TIMEOUT`]; a missing directory counts as removed.
fn remove_dir_bounded(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(REMOVE_MAX_PAUSE);
            }
            Err(err) => return Err(err),
        }
    }
}

/// Leaf names are single plain path components that cannot collide with a
/// control file (`memory.*`, `cgroup.*`) or the supervisor leaf.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let invalid = |reason| {
        Err(CgroupError::InvalidName {
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

// ---------------------------------------------------------------------------
// Detection

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, PartialEq, Eq)]
struct CgroupLine {
    /// `0` for the unified hierarchy.
    hierarchy: String,
    /// Controllers bound to the hierarchy (empty for v2).
    controllers: Vec<String>,
    /// The process's cgroup, relative to the hierarchy root.
    path: String,
}

/// Parses `/proc/self/cgroup`; malformed lines are skipped.
fn parse_proc_cgroup(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.to_owned();
            let controllers = parts
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            let path = parts.next()?.to_owned();
            Some(CgroupLine {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// The part of a `/proc/self/mountinfo` line detection needs.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// The directory of the filesystem that is mounted (a cgroup path).
    root: String,
    /// Where it is mounted.
    mount_point: PathBuf,
    /// `cgroup` or `cgroup2` (or anything else).
    fs_type: String,
    /// Superblock options; for v1 they name the controllers.
    super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo` (`id parent dev root mount-point options
/// [optional...] - fstype source super-options`); malformed lines skipped.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split(' ');
            let root = unescape_mount_field(fields.nth(3)?);
            let mount_point = PathBuf::from(unescape_mount_field(fields.next()?));
            let mut after = after.split(' ');
            let fs_type = after.next()?.to_owned();
            let _source = after.next()?;
            let super_options = after.next()?.split(',').map(str::to_owned).collect();
            Some(Mount {
                root,
                mount_point,
                fs_type,
                super_options,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (as `/proc/self/cgroup` names it) in the
/// first matching mount whose root contains it.
fn cgroup_dir<'a>(
    mounts: impl IntoIterator<Item = &'a Mount>,
    path: &str,
) -> Option<(PathBuf, PathBuf)> {
    mounts.into_iter().find_map(|mount| {
        let relative = if mount.root == "/" {
            path
        } else {
            let rest = path.strip_prefix(mount.root.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        let relative = relative.trim_start_matches('/');
        Some((mount.mount_point.join(relative), mount.mount_point.clone()))
    })
}

/// Detection for the supervisor's own cgroup.
fn detect_own() -> Result<CgroupSupport, String> {
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|err| format!("cannot read /proc/self/cgroup: {err}"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|err| format!("cannot read /proc/self/mountinfo: {err}"))?;
    let lines = parse_proc_cgroup(&own);
    let mounts = parse_mountinfo(&mountinfo);

    if let Some(line) = lines
        .iter()
        .find(|line| line.controllers.iter().any(|c| c == "memory"))
    {
        let v1_memory = mounts
            .iter()
            .filter(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == "memory"));
        let (dir, _) = cgroup_dir(v1_memory, &line.path).ok_or_else(|| {
            format!(
                "the cgroup v1 memory hierarchy (cgroup {}) is not mounted here",
                line.path
            )
        })?;
        return check_v1(&dir);
    }

    let line = lines
        .iter()
        .find(|line| line.hierarchy == "0" && line.controllers.is_empty())
        .ok_or(
            "no memory cgroup: /proc/self/cgroup lists neither a v1 memory hierarchy nor cgroup v2",
        )?;
    let v2_mounts = mounts.iter().filter(|m| m.fs_type == "cgroup2");
    let (mut dir, mount_point) = cgroup_dir(v2_mounts, &line.path)
        .ok_or_else(|| format!("cgroup v2 (cgroup {}) is not mounted here", line.path))?;
    if dir.file_name().is_some_and(|name| name == SUPERVISOR_LEAF) {
        // Already moved by an earlier `prepare`, or started there by
        // systemd's DelegateSubgroup=.
        if let Some(parent) = dir.parent().filter(|p| p.starts_with(&mount_point)) {
            dir = parent.to_path_buf();
        }
    }
    if is_systemd_managed(&dir, &mount_point) && !is_delegated(&dir, &mount_point) {
        return Err(format!(
            "cgroup v2 memory controller not delegated: {} is managed by systemd without Delegate=yes (run under systemd with Delegate=yes)",
            dir.display()
        ));
    }
    check_v2(&dir)
}

/// Detection for an operator-chosen parent directory.
fn detect_at(dir: &Path) -> Result<CgroupSupport, String> {
    if !dir.exists() {
        let parent_is_cgroup = dir
            .parent()
            .is_some_and(|p| is_v1_memory_dir(p) || p.join("cgroup.controllers").exists());
        if !parent_is_cgroup {
            return Err(format!(
                "cgroup parent {} does not exist and is not inside a cgroup filesystem",
                dir.display()
            ));
        }
        fs::create_dir(dir)
            .map_err(|err| format!("cannot create cgroup parent {}: {err}", dir.display()))?;
    }
    if is_v1_memory_dir(dir) {
        check_v1(dir)
    } else if dir.join("cgroup.controllers").exists() {
        check_v2(dir)
    } else {
        Err(format!(
            "{} is not a memory cgroup (no memory.limit_in_bytes or cgroup.controllers)",
            dir.display()
        ))
    }
}

/// A directory of the v1 memory hierarchy.
fn is_v1_memory_dir(dir: &Path) -> bool {
    dir.join("memory.limit_in_bytes").exists()
}

/// v1: the directory is a memory cgroup and we may create children in it.
fn check_v1(dir: &Path) -> Result<CgroupSupport, String> {
    if !is_v1_memory_dir(dir) {
        return Err(format!(
            "{} is not a cgroup v1 memory directory",
            dir.display()
        ));
    }
    probe_mkdir(dir).map_err(|err| {
        format!(
            "no writable memory cgroup: cannot create a child of {}: {err}",
            dir.display()
        )
    })?;
    Ok(CgroupSupport::V1 {
        parent: dir.to_path_buf(),
    })
}

/// v2: the memory controller reaches the directory and we may create
/// children in it.
fn check_v2(dir: &Path) -> Result<CgroupSupport, String> {
    let controllers_file = dir.join("cgroup.controllers");
    let controllers = fs::read_to_string(&controllers_file)
        .map_err(|err| format!("cannot read {}: {err}", controllers_file.display()))?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(format!(
            "cgroup v2 memory controller not delegated to {} (run under systemd with Delegate=yes)",
            dir.display()
        ));
    }
    probe_mkdir(dir).map_err(|err| {
        format!(
            "cgroup v2 memory controller not delegated: cannot create a child of {}: {err} (run under systemd with Delegate=yes)",
            dir.display()
        )
    })?;
    Ok(CgroupSupport::V2 {
        parent: dir.to_path_buf(),
    })
}

/// Creates and removes a uniquely named child of `dir`.
fn probe_mkdir(dir: &Path) -> io::Result<()> {
    let probe = dir.join(format!(
        "inferd-probe-{}-{}",
        std::process::id(),
        PROBE_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&probe)?;
    if let Err(err) = fs::remove_dir(&probe) {
        warn!(path = %probe.display(), error = %err, "cannot remove cgroup probe directory");
    }
    Ok(())
}

/// Whether a cgroup below `mount_point` lies in a tree systemd manages
/// (a `.slice`, `.service` or `.scope` on the way).
fn is_systemd_managed(dir: &Path, mount_point: &Path) -> bool {
    dir.strip_prefix(mount_point).is_ok_and(|relative| {
        relative.components().any(|component| {
            let name = component.as_os_str().as_bytes();
            [&b".slice"[..], b".service", b".scope"]
                .iter()
                .any(|suffix| name.ends_with(suffix))
        })
    })
}

/// Whether systemd marked `dir` or an ancestor below `mount_point` as
/// delegated (`trusted.delegate` / `user.delegate` xattr, systemd 251+).
fn is_delegated(dir: &Path, mount_point: &Path) -> bool {
    dir.ancestors()
        .take_while(|a| a.starts_with(mount_point) && *a != mount_point)
        .any(has_delegate_xattr)
}

/// Reads the systemd delegation xattrs of one directory.
fn has_delegate_xattr(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let names: [&CStr; 2] = [c"trusted.delegate", c"user.delegate"];
    names.iter().any(|name| {
        let mut value = [0u8; 8];
        // SAFETY: `path` and `name` are NUL-terminated and outlive the call;
        // `value` is writable for `value.len()` bytes.
        let len = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        len > 0 && value[0] == b'1'
    })
}

/// v2: empty the parent of processes (into the supervisor leaf) and enable
/// the memory controller for its children.
fn prepare_v2(parent: &Path) -> Result<(), CgroupError> {
    let procs_file = parent.join("cgroup.procs");
    let own = nix::unistd::getpid();
    for _ in 0..MOVE_SWEEPS {
        let procs = read_pids(&procs_file)?;
        if procs.is_empty() {
            break;
        }
        let leaf = parent.join(SUPERVISOR_LEAF);
        // The others are fellow processes of the supervisor's cgroup if the
        // supervisor is still among them or already moved (an earlier or
        // concurrent `prepare`); otherwise they belong to someone else.
        let ours = procs.contains(&own)
            || read_pids(&leaf.join("cgroup.procs")).is_ok_and(|moved| moved.contains(&own));
        if !ours {
            return Err(CgroupError::ForeignProcesses {
                path: parent.to_path_buf(),
            });
        }
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::CreateLeaf { path: leaf, source }),
        }
        let target = leaf.join("cgroup.procs");
        // Ourselves first: the supervisor must end up in the leaf even if a
        // fellow process cannot be moved.
        let ordered = std::iter::once(own).chain(procs.into_iter().filter(|&pid| pid != own));
        for pid in ordered {
            match fs::write(&target, pid.as_raw().to_string()) {
                Ok(()) => {}
                // Exited meanwhile.
                Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {}
                Err(source) => {
                    return Err(CgroupError::MoveSupervisor {
                        pid,
                        path: target,
                        source,
                    })
                }
            }
        }
    }
    let subtree = parent.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&subtree)
        .is_ok_and(|text| text.split_whitespace().any(|c| c == "memory"));
    if !enabled {
        fs::write(&subtree, "+memory").map_err(|source| CgroupError::EnableController {
            path: subtree,
            source,
        })?;
    }
    Ok(())
}

/// The pids in a `cgroup.procs` file.
fn read_pids(path: &Path) -> Result<Vec<Pid>, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::ListProcesses {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok().map(Pid::from_raw))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};

    const MIB: u64 = 1024 * 1024;

    /// A leaf name unique across concurrent tests and test processes.
    fn unique(tag: &str) -> String {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        format!(
            "inferd-test-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The prepared cgroups, or `None` after printing why the test is
    /// skipped. `INFERD_TEST_CGROUP_PARENT` names a parent to use instead of
    /// the test process's own cgroup (e.g. an empty delegated v2 cgroup).
    fn cgroups_or_skip(test: &str) -> Option<Cgroups> {
        let parent = std::env::var_os("INFERD_TEST_CGROUP_PARENT").map(PathBuf::from);
        match detect(parent.as_deref()) {
            CgroupSupport::Unavailable { reason } => {
                // Straight to stderr: libtest captures `println!`, and a
                // skip must be seen.
                if std::env::var_os("INFERD_REQUIRE_CGROUPS").is_some_and(|v| v == "1") {
                    panic!("{test} needs cgroups, and INFERD_REQUIRE_CGROUPS=1 says this machine can make them: {reason}");
                }
                let _ = writeln!(std::io::stderr().lock(), "{test}: skipped: {reason}");
                None
            }
            support => Some(support.prepare().expect("prepare detected cgroups")),
        }
    }

    /// Kills and reaps the child if the test ends early.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Waits for the child's exit, polling for at most `limit`.
    fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "child did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn leaf_gets_its_limit_and_is_removed() {
        let Some(cgroups) = cgroups_or_skip("leaf_gets_its_limit_and_is_removed") else {
            return;
        };
        let leaf = cgroups
            .create_leaf(&unique("limit"), 64 * MIB)
            .expect("create leaf");
        let path = leaf.path().to_path_buf();
        println!("{:?} leaf {}", cgroups.version(), path.display());
        assert!(path.is_dir());
        assert_eq!(leaf.memory_limit(), Some(64 * MIB));
        assert_eq!(leaf.oom_kills().expect("read oom_kill"), 0);
        assert!(leaf.memory_current().is_some());
        leaf.remove().expect("remove leaf");
        assert!(!path.exists(), "{} still exists", path.display());
    }

    #[test]
    fn dropping_a_leaf_removes_it() {
        let Some(cgroups) = cgroups_or_skip("dropping_a_leaf_removes_it") else {
            return;
        };
        let leaf = cgroups
            .create_leaf(&unique("drop"), 32 * MIB)
            .expect("create leaf");
        let path = leaf.path().to_path_buf();
        drop(leaf);
        assert!(!path.exists(), "{} still exists", path.display());
    }

    #[test]
    fn stale_leaf_is_replaced() {
        let Some(cgroups) = cgroups_or_skip("stale_leaf_is_replaced") else {
            return;
        };
        let name = unique("stale");
        let stale = cgroups.parent().join(&name);
        fs::create_dir(&stale).expect("create stale leaf");
        write_limit(
            &stale.join(match cgroups.version() {
                CgroupVersion::V1 => "memory.limit_in_bytes",
                CgroupVersion::V2 => "memory.max",
            }),
            &(16 * MIB).to_string(),
        )
        .expect("stale limit");
        let leaf = cgroups
            .create_leaf(&name, 48 * MIB)
            .expect("create over stale leaf");
        assert_eq!(leaf.memory_limit(), Some(48 * MIB));
        leaf.remove().expect("remove leaf");
    }

    #[test]
    fn adding_a_missing_process_fails() {
        let Some(cgroups) = cgroups_or_skip("adding_a_missing_process_fails") else {
            return;
        };
        let leaf = cgroups
            .create_leaf(&unique("nopid"), 32 * MIB)
            .expect("create leaf");
        let err = leaf
            .add_process(Pid::from_raw(i32::MAX))
            .expect_err("no such process");
        assert!(matches!(err, CgroupError::AddProcess { .. }), "{err:?}");
        leaf.remove().expect("remove leaf");
    }

    #[test]
    fn invalid_leaf_names_are_rejected() {
        for name in [
            "",
            "a/b",
            "..",
            "memory.max",
            "cgroup.procs",
            SUPERVISOR_LEAF,
        ] {
            assert!(
                matches!(validate_name(name), Err(CgroupError::InvalidName { .. })),
                "{name:?} accepted"
            );
        }
        validate_name("worker-12_b").expect("plain name");
    }

    /// The kernel OOM-kills a process over its leaf's limit; the leaf's
    /// counter shows it and a sibling's does not.
    #[test]
    fn oom_kill_is_attributed_to_the_leaf() {
        let Some(cgroups) = cgroups_or_skip("oom_kill_is_attributed_to_the_leaf") else {
            return;
        };
        let leaf = cgroups
            .create_leaf(&unique("oom"), 64 * MIB)
            .expect("create leaf");
        let sibling = cgroups
            .create_leaf(&unique("sibling"), 64 * MIB)
            .expect("create sibling leaf");
        let host_before = host_oom_kills();

        // Waits for a line on stdin, then grows without bound (tail keeps a
        // newline-free stream in memory). ulimit -v caps it at 1 GiB in
        // case the cgroup limit does not hold.
        let child = Command::new("sh")
            .args(["-c", "ulimit -v 1048576; read go; exec tail /dev/zero"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let mut child = KillOnDrop(child);
        let pid = Pid::from_raw(i32::try_from(child.0.id()).expect("pid fits i32"));
        leaf.add_process(pid).expect("move child into leaf");
        let procs = fs::read_to_string(leaf.path().join("cgroup.procs")).expect("read procs");
        assert!(
            procs.split_whitespace().any(|p| p == pid.to_string()),
            "child {pid} in leaf: {procs:?}"
        );
        assert_eq!(leaf.oom_kills().expect("read oom_kill"), 0);

        child
            .0
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(b"go\n")
            .expect("start the child");
        let status = wait_bounded(&mut child.0, Duration::from_secs(30));

        let kills = leaf.oom_kills().expect("read oom_kill");
        let sibling_kills = sibling.oom_kills().expect("read sibling oom_kill");
        let host_after = host_oom_kills();
        println!(
            "child {status:?} (signal {:?}); leaf oom_kill 0 -> {kills}; sibling oom_kill {sibling_kills}; host oom_kill {host_before:?} -> {host_after:?}; leaf memory now {:?}",
            status.signal(),
            leaf.memory_current()
        );
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "child killed: {status:?}"
        );
        assert!(kills >= 1, "leaf oom_kill rose: {kills}");
        assert_eq!(sibling_kills, 0, "sibling untouched");
        if let (Some(before), Some(after)) = (host_before, host_after) {
            assert!(after > before, "host oom_kill rose: {before} -> {after}");
        }

        let path = leaf.path().to_path_buf();
        leaf.remove().expect("remove leaf");
        sibling.remove().expect("remove sibling");
        assert!(!path.exists());
    }

    #[test]
    fn host_oom_kills_is_readable() {
        let kills = host_oom_kills();
        println!("host oom_kill: {kills:?}");
        assert!(kills.is_some(), "/proc/vmstat has oom_kill on this kernel");
    }

    #[test]
    fn override_that_is_no_cgroup_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        match detect(Some(dir.path())) {
            CgroupSupport::Unavailable { reason } => {
                assert!(reason.contains("not a memory cgroup"), "{reason}");
            }
            other => panic!("a temp dir is no cgroup: {other:?}"),
        }
        let missing = dir.path().join("a/b");
        match detect(Some(&missing)) {
            CgroupSupport::Unavailable { reason } => {
                assert!(reason.contains("does not exist"), "{reason}");
            }
            other => panic!("a missing dir is no cgroup: {other:?}"),
        }
    }

    #[test]
    fn prepare_without_support_fails() {
        let support = CgroupSupport::Unavailable {
            reason: "test".into(),
        };
        assert!(matches!(
            support.prepare(),
            Err(CgroupError::Unavailable { .. })
        ));
    }

    #[test]
    fn parses_v1_oom_control() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(text, "oom_kill"), Some(3));
        assert_eq!(keyed_value(text, "oom_kill_disable"), Some(0));
        // Kernels before 4.13 have no counter.
        assert_eq!(
            keyed_value("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
            None
        );
    }

    #[test]
    fn parses_v2_memory_events() {
        let text = "low 0\nhigh 12\nmax 40\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(text, "oom_kill"), Some(1));
        assert_eq!(keyed_value(text, "oom"), Some(2));
        assert_eq!(keyed_value("", "oom_kill"), None);
        assert_eq!(keyed_value("oom_kill x\n", "oom_kill"), None);
    }

    #[test]
    fn parses_vmstat() {
        let text = "nr_free_pages 3618236\noom_kill 7\nnuma_hit 1\n";
        assert_eq!(keyed_value(text, "oom_kill"), Some(7));
        assert_eq!(keyed_value(text, "oom"), None, "whole keys only");
    }

    #[test]
    fn parses_proc_self_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/\nbogus\n";
        let lines = parse_proc_cgroup(text);
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[1],
            CgroupLine {
                hierarchy: "4".into(),
                controllers: vec!["memory".into()],
                path: "/process_api/abc".into()
            }
        );
        assert_eq!(lines[2].controllers, ["cpu", "cpuacct"]);
        assert_eq!(lines[3].hierarchy, "0");
        assert!(lines[3].controllers.is_empty());
    }

    #[test]
    fn parses_mountinfo_and_resolves_cgroup_dirs() {
        let text = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 31 0:40 /docker/abc /sys/fs/cgroup/with\\040space rw - cgroup cgroup rw,cpu,memory
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].fs_type, "cgroup");
        assert_eq!(mounts[0].super_options, ["rw", "memory"]);
        assert_eq!(mounts[1].fs_type, "cgroup2");
        assert_eq!(
            mounts[2].mount_point,
            PathBuf::from("/sys/fs/cgroup/with space")
        );
        assert_eq!(mounts[2].root, "/docker/abc");

        assert_eq!(
            cgroup_dir(&mounts[..1], "/process_api/abc").map(|(dir, _)| dir),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            cgroup_dir(&mounts[1..2], "/").map(|(dir, _)| dir),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A mount of a subtree: paths are relative to its root.
        assert_eq!(
            cgroup_dir(&mounts[2..], "/docker/abc/sub").map(|(dir, _)| dir),
            Some(PathBuf::from("/sys/fs/cgroup/with space/sub"))
        );
        assert_eq!(cgroup_dir(&mounts[2..], "/docker/abcd"), None);
        assert_eq!(cgroup_dir(&mounts[2..], "/other"), None);
    }

    #[test]
    fn recognises_systemd_managed_paths() {
        let mount = Path::new("/sys/fs/cgroup");
        assert!(is_systemd_managed(
            Path::new("/sys/fs/cgroup/system.slice/inferd.service"),
            mount
        ));
        assert!(is_systemd_managed(
            Path::new("/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"),
            mount
        ));
        assert!(!is_systemd_managed(Path::new("/sys/fs/cgroup"), mount));
        assert!(!is_systemd_managed(
            Path::new("/sys/fs/cgroup/docker/abc"),
            mount
        ));
    }
}
