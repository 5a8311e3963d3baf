//! Finding a memory cgroup the supervisor may use: its own cgroup from
//! `/proc/self/cgroup` and `/proc/self/mountinfo`, or a configured parent;
//! v1 needs a writable memory hierarchy, v2 a delegated subtree with the
//! memory controller.

use super::*;

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CgroupLine {
    /// `0` for the unified hierarchy.
    pub(super) hierarchy: String,
    /// Controllers bound to the hierarchy (empty for v2).
    pub(super) controllers: Vec<String>,
    /// The process's cgroup, relative to the hierarchy root.
    pub(super) path: String,
}

/// Parses `/proc/self/cgroup`; malformed lines are skipped.
pub(super) fn parse_proc_cgroup(text: &str) -> Vec<CgroupLine> {
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
pub(super) struct Mount {
    /// The directory of the filesystem that is mounted (a cgroup path).
    pub(super) root: String,
    /// Where it is mounted.
    pub(super) mount_point: PathBuf,
    /// `cgroup` or `cgroup2` (or anything else).
    pub(super) fs_type: String,
    /// Superblock options; for v1 they name the controllers.
    pub(super) super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo` (`id parent dev root mount-point options
/// [optional...] - fstype source super-options`); malformed lines skipped.
pub(super) fn parse_mountinfo(text: &str) -> Vec<Mount> {
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
pub(super) fn cgroup_dir<'a>(
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

/// The supervisor's own memory cgroup: which hierarchy, its directory and
/// the mount point that holds it. The v1 `memory` hierarchy wins where both
/// are mounted (hybrid systems).
struct OwnCgroup {
    version: CgroupVersion,
    dir: PathBuf,
    mount_point: PathBuf,
}

/// Finds [`OwnCgroup`] from `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn locate_own() -> Result<OwnCgroup, String> {
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
        let (dir, mount_point) = cgroup_dir(v1_memory, &line.path).ok_or_else(|| {
            format!(
                "the cgroup v1 memory hierarchy (cgroup {}) is not mounted here",
                line.path
            )
        })?;
        return Ok(OwnCgroup {
            version: CgroupVersion::V1,
            dir,
            mount_point,
        });
    }

    let line = lines
        .iter()
        .find(|line| line.hierarchy == "0" && line.controllers.is_empty())
        .ok_or(
            "no memory cgroup: /proc/self/cgroup lists neither a v1 memory hierarchy nor cgroup v2",
        )?;
    let v2_mounts = mounts.iter().filter(|m| m.fs_type == "cgroup2");
    let (dir, mount_point) = cgroup_dir(v2_mounts, &line.path)
        .ok_or_else(|| format!("cgroup v2 (cgroup {}) is not mounted here", line.path))?;
    Ok(OwnCgroup {
        version: CgroupVersion::V2,
        dir,
        mount_point,
    })
}

/// Detection for the supervisor's own cgroup.
pub(super) fn detect_own() -> Result<CgroupSupport, String> {
    let OwnCgroup {
        version,
        mut dir,
        mount_point,
    } = locate_own()?;
    if version == CgroupVersion::V1 {
        return check_v1(&dir);
    }
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
pub(super) fn detect_at(dir: &Path) -> Result<CgroupSupport, String> {
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
pub(super) fn is_systemd_managed(dir: &Path, mount_point: &Path) -> bool {
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

/// The tightest memory limit on the supervisor's own memory cgroup and its
/// ancestors (v1 `memory.limit_in_bytes`, v2 `memory.max`), with the
/// directory that sets it; `None` when no ancestor is limited or the
/// hierarchy cannot be read. A parent's limit binds its children too, so
/// every level up to the mount point counts.
pub fn own_memory_limit() -> Option<(u64, PathBuf)> {
    let own = locate_own().ok()?;
    let file = match own.version {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    };
    tightest_limit(&own.dir, &own.mount_point, file)
}

/// The smallest limit in `file` from `dir` up to `mount_point` (v1's
/// "unlimited" is a huge number, v2's the word `max`: both read as none).
fn tightest_limit(dir: &Path, mount_point: &Path, file: &str) -> Option<(u64, PathBuf)> {
    dir.ancestors()
        .take_while(|level| level.starts_with(mount_point))
        .filter_map(|level| {
            let limit = read_u64(&level.join(file)).filter(|&limit| limit < V1_UNLIMITED)?;
            Some((limit, level.to_path_buf()))
        })
        .min_by_key(|(limit, _)| *limit)
}
