//! Is a process alive? Zombies count as gone: a dead worker whose new parent
//! (init, in a container possibly a process that never reaps) has not reaped
//! it yet holds no memory and runs no code.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::daemon::POLL_INTERVAL;

/// The state letter from `/proc/PID/stat` (`R`, `S`, `Z`, …), `None` if the
/// process does not exist.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain ") ".
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.trim_start().chars().next()
}

/// True if `pid` exists and is not a zombie (`kill(pid, 0)` semantics, plus
/// the zombie check).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match kill(Pid::from_raw(raw), None) {
        Ok(()) => !matches!(proc_state(pid), Some('Z') | None),
        Err(Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Err(_) => true,
    }
}

/// Polls until none of `pids` is alive; `Err` with the survivors at the
/// deadline.
pub async fn wait_pids_gone(pids: &[u32], timeout: Duration) -> Result<(), Vec<u32>> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(alive);
        }
        tokio::time::sleep(POLL_INTERVAL.min(Duration::from_millis(10))).await;
    }
}

/// Pids whose parent is `parent`, from a scan of `/proc`.
pub fn children_of(parent: u32) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent))
        .collect()
}

/// The parent pid from `/proc/PID/stat` (the field after the state).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    fields.next()?; // state
    fields.next()?.parse().ok()
}

/// The command name from `/proc/PID/comm`.
pub(crate) fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_gone() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!pid_alive(pid));
    }

    #[test]
    fn a_zombie_counts_as_gone() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        // Not reaped yet: it becomes a zombie once it exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc_state(pid) != Some('Z') {
            assert!(Instant::now() < deadline, "child never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!pid_alive(pid));
        assert!(children_of(std::process::id()).contains(&pid));
        child.wait().expect("wait");
    }
}
