//! cgroup v2 setup: the no-internal-processes rule means the supervisor
//! moves into a leaf of its own before the memory controller is enabled
//! for the worker leaves.

use super::*;

/// v2: empty the parent of processes (into the supervisor leaf) and enable
/// the memory controller for its children.
pub(super) fn prepare_v2(parent: &Path) -> Result<(), SetupError> {
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
            return Err(SetupError::ForeignProcesses {
                path: parent.to_path_buf(),
            });
        }
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(SetupError::CreateSupervisorLeaf { path: leaf, source }),
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
                    return Err(SetupError::MoveSupervisor {
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
        fs::write(&subtree, "+memory").map_err(|source| SetupError::EnableController {
            path: subtree,
            source,
        })?;
    }
    Ok(())
}

/// The pids in a `cgroup.procs` file.
fn read_pids(path: &Path) -> Result<Vec<Pid>, SetupError> {
    let text = fs::read_to_string(path).map_err(|source| SetupError::ListProcesses {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok().map(Pid::from_raw))
        .collect())
}
