//! Worker memory as procfs reports it.

use nix::unistd::Pid;

/// Resident set size of `pid` from `/proc/PID/statm`; `None` if the process
/// is gone or procfs is unreadable.
pub fn rss_bytes(pid: Pid) -> Option<u64> {
    let process = procfs::process::Process::new(pid.as_raw()).ok()?;
    let statm = process.statm().ok()?;
    Some(statm.resident * procfs::page_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss_and_none_for_missing_pid() {
        let own = rss_bytes(nix::unistd::getpid()).expect("own statm readable");
        assert!(
            own > 1024 * 1024,
            "a test process has more than 1 MiB resident: {own}"
        );
        assert_eq!(rss_bytes(Pid::from_raw(i32::MAX)), None);
    }
}
