//! The supervisor's own RSS and CPU time, read from `/proc/PID/statm` and
//! `/proc/PID/stat`, and a process's parent (to check a worker before
//! `--kill-every` signals it).

use anyhow::{Context, Result};

/// Page size and clock ticks, for turning /proc numbers into bytes and seconds.
pub(crate) struct ProcClock {
    page_size: u64,
    ticks_per_s: f64,
}

/// The supervisor's own numbers at one instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcReading {
    pub(crate) rss_bytes: u64,
    pub(crate) cpu_s: f64,
}

impl ProcClock {
    pub(crate) fn new() -> Result<ProcClock> {
        Ok(ProcClock {
            page_size: sysconf(libc::_SC_PAGESIZE).context("sysconf(_SC_PAGESIZE)")?,
            ticks_per_s: sysconf(libc::_SC_CLK_TCK).context("sysconf(_SC_CLK_TCK)")? as f64,
        })
    }

    pub(crate) fn read(&self, pid: u32) -> Result<ProcReading> {
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let pages = parse_statm_resident(&statm).context("parsing statm")?;
        let ticks = parse_stat_cpu_ticks(&stat).context("parsing stat")?;
        Ok(ProcReading {
            rss_bytes: pages * self.page_size,
            cpu_s: ticks as f64 / self.ticks_per_s,
        })
    }
}

/// The parent pid of `pid`, from `/proc/PID/stat`; `None` if it is gone.
pub(crate) fn parent_pid(pid: u32) -> Option<u32> {
    parse_stat_ppid(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

/// Resident pages: the second field of `/proc/PID/statm`.
fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The parent pid: field 4 of `/proc/PID/stat`, counted like the CPU
/// ticks below.
fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime (fields 14 and 15) of `/proc/PID/stat`, in clock ticks.
/// Fields are counted after the command name's closing parenthesis, since
/// the name itself may contain spaces and parentheses.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name, field 3 (state) is index 0, so utime (14) is index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_statm_resident("12345 678 90 1 0 200 0\n"), Some(678));
        let stat = "4242 (inferd (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 3 0 100 1000000 500";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(175));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_ppid(stat), Some(1));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn own_process_reads() {
        let clock = ProcClock::new().expect("sysconf");
        let own = clock.read(std::process::id()).expect("own /proc readable");
        assert!(own.rss_bytes > 1024 * 1024, "{own:?}");
        assert!(own.cpu_s >= 0.0);
        let parent = std::os::unix::process::parent_id();
        assert_eq!(parent_pid(std::process::id()), Some(parent));
    }
}
