//! Who used the CPUs during a run: the whole machine (`/proc/stat`), the
//! servers under test (`--watch-pid` process trees, children included:
//! inferd's workers, gunicorn's workers), and this tool. What is left is
//! everybody else, the measure of how noisy a shared machine was; the load
//! average cannot tell, since the benchmark's own processes raise it.
//!
//! Sampled only at the start and end of the run: scanning `/proc` between
//! phases would itself perturb a per-request alternation.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::Serialize;

/// A reading of the counters.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    /// Busy clock ticks of the whole machine (all CPUs).
    machine: u64,
    /// Ticks of the watched process trees.
    watched: u64,
    /// Ticks of this process.
    own: u64,
}

/// CPU use over a run, in cores (1.0 = one CPU busy the whole time).
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Online CPUs.
    pub cpus: usize,
    /// The whole machine.
    pub machine_cores: f64,
    /// The watched servers, their children included.
    pub servers_cores: f64,
    /// This load generator.
    pub load_tool_cores: f64,
    /// Everything else: other people's work on a shared machine.
    pub others_cores: f64,
}

impl Sample {
    /// Reads the counters now; `None` where /proc cannot be read.
    pub fn take(watch: &[i32]) -> Option<Sample> {
        Some(Sample {
            at: Instant::now(),
            machine: machine_busy_ticks()?,
            watched: tree_ticks(watch),
            own: process_ticks("self")?,
        })
    }

    /// CPU use from `self` to `later`.
    pub fn usage_until(&self, later: &Sample) -> Usage {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        let hz = clock_ticks_per_second();
        let cores = |from: u64, to: u64| to.saturating_sub(from) as f64 / hz / seconds;
        let machine = cores(self.machine, later.machine);
        let servers = cores(self.watched, later.watched);
        let own = cores(self.own, later.own);
        Usage {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            machine_cores: machine,
            servers_cores: servers,
            load_tool_cores: own,
            others_cores: (machine - servers - own).max(0.0),
        }
    }
}

/// One process's own CPU time per answered request.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub pid: i32,
    /// CPU time of its threads over the run, ms.
    pub cpu_ms: f64,
    /// Requests answered over the run, warm-up included.
    pub answers: usize,
    pub ms_per_1000_answers: f64,
}

impl ProcessCpu {
    pub fn new(pid: i32, cpu_ns: u64, answers: usize) -> ProcessCpu {
        let cpu_ms = cpu_ns as f64 / 1e6;
        ProcessCpu {
            pid,
            cpu_ms,
            answers,
            ms_per_1000_answers: cpu_ms * 1000.0 / answers.max(1) as f64,
        }
    }
}

/// CPU time of `pid`'s threads (not its children), in nanoseconds: the sum
/// of the first field of each `/proc/PID/task/TID/schedstat`, which counts
/// to the nanosecond where `stat`'s utime + stime count 10 ms ticks. Threads
/// that exited before the reading are missing, which is fine for a
/// supervisor whose threads live as long as it does.
pub fn process_cpu_ns(pid: i32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok();
        if let Some(ns) = schedstat
            .as_deref()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    Some(total)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// user + nice + system + irq + softirq + steal of the `cpu` line.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// Parent pid and utime + stime of `/proc/<pid>/stat`.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    // The command name is in parentheses and may hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, ticks)| ticks)
}

/// Ticks of the processes in `roots` and all their descendants.
fn tree_ticks(roots: &[i32]) -> u64 {
    if roots.is_empty() {
        return 0;
    }
    let mut processes: HashMap<i32, (i32, u64)> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(parsed) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                processes.insert(pid, parsed);
            }
        }
    }
    let mut inside: HashSet<i32> = roots.iter().copied().collect();
    // Parents before children is not guaranteed: repeat until stable.
    loop {
        let before = inside.len();
        for (&pid, &(ppid, _)) in &processes {
            if inside.contains(&ppid) {
                inside.insert(pid);
            }
        }
        if inside.len() == before {
            break;
        }
    }
    inside
        .iter()
        .filter_map(|pid| processes.get(pid))
        .map(|&(_, ticks)| ticks)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let stat = "4242 (inferd (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 3 0 100 1000000 500";
        assert_eq!(parse_stat(stat), Some((1, 175)));
    }

    #[test]
    fn own_thread_cpu_grows_with_work() {
        let pid = std::process::id() as i32;
        let before = process_cpu_ns(pid).expect("schedstat");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let after = process_cpu_ns(pid).expect("schedstat");
        assert!(after > before, "{before} -> {after}");
        let p = ProcessCpu::new(pid, 2_000_000, 100);
        assert!((p.ms_per_1000_answers - 20.0).abs() < 1e-9);
    }

    #[test]
    fn this_process_is_found() {
        let first = Sample::take(&[std::process::id() as i32]).expect("procfs");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let usage = first.usage_until(&Sample::take(&[std::process::id() as i32]).expect("procfs"));
        assert!(usage.machine_cores >= 0.0 && usage.others_cores >= 0.0);
        assert!(usage.servers_cores >= 0.0);
    }
}
