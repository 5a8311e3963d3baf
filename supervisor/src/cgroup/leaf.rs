//! One worker's cgroup: its limit, its process, its OOM counter, and its
//! removal once the worker was reaped.

use super::*;

/// Failure of an operation on one worker's leaf; each variant names it.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
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
}

/// One worker's cgroup. Dropping it removes the directory (best effort,
/// bounded); [`Leaf::remove`] does the same and reports the outcome.
#[derive(Debug)]
pub struct Leaf {
    /// Which interface the files speak.
    pub(super) version: CgroupVersion,
    /// The leaf directory.
    pub(super) path: PathBuf,
    /// Set once removal was attempted, so Drop does not try again.
    pub(super) removed: bool,
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
    pub fn add_process(&self, pid: Pid) -> Result<(), LeafError> {
        let path = self.path.join("cgroup.procs");
        fs::write(&path, pid.as_raw().to_string()).map_err(|source| LeafError::AddProcess {
            pid,
            path,
            source,
        })
    }

    /// How many OOM kills the kernel recorded in this leaf since it was
    /// created (or since a crashed run created it, if it was reused). Ask
    /// whether it *rose* since a reading taken when the worker started, not
    /// by how much: it counts kill events, which need not be one per process.
    pub fn oom_kills(&self) -> Result<u64, LeafError> {
        let path = self.path.join(match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        });
        let text = fs::read_to_string(&path).map_err(|source| LeafError::ReadCounter {
            path: path.clone(),
            source,
        })?;
        keyed_value(&text, "oom_kill").ok_or(LeafError::MissingCounter {
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
    pub fn remove(mut self) -> Result<(), LeafError> {
        self.removed = true;
        remove_dir_bounded(&self.path).map_err(|source| LeafError::RemoveLeaf {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes the limit files (`None`: unlimited); v1 also lifts the swap
    /// limit first so the memory limit may rise (v1 requires memory <=
    /// memory+swap). The pool sets a worker's limit again when automatic
    /// limits are derived after it started.
    pub fn set_limit(&self, limit_bytes: Option<u64>) -> Result<(), LeafError> {
        let unlimited = match self.version {
            CgroupVersion::V1 => "-1",
            CgroupVersion::V2 => "max",
        };
        let limit = limit_bytes.map_or_else(|| unlimited.to_owned(), |bytes| bytes.to_string());
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

/// rmdir, retrying on EBUSY (a process still leaving) until
/// [`REMOVE_TIMEOUT`]; a missing directory counts as removed.
pub(super) fn remove_dir_bounded(path: &Path) -> io::Result<()> {
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
