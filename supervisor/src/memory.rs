//! Worker memory as procfs reports it, behind a seam.
//!
//! The supervisor reads each worker's memory through [`MemorySource`]:
//! [`ProcfsMemory`] in production, [`FakeMemory`] in policy tests, so the
//! soft/hard limit logic can be driven deterministically.
//!
//! Three numbers, from cheap to expensive:
//! * **RSS** (`/proc/PID/statm`): resident pages, shared ones counted in
//!   full. One short read; taken every tick and after every answer, so the
//!   file stays open per worker and is re-read with one `pread` (opening it
//!   anew cost ~50 µs of supervisor CPU per answer on a 2-core VM).
//! * **PSS** (`/proc/PID/smaps_rollup`): each shared page divided by the
//!   number of processes mapping it. Sums to the real total across workers
//!   that share the mmapped model file.
//! * **USS** (`Private_Clean + Private_Dirty` from the same file): what the
//!   kernel would free if this worker exited.
//!
//! `smaps_rollup` walks every mapping under the process's mmap lock, so PSS
//! and USS are only read when [`ProcfsMemory::new`] was asked for them, and
//! the pool reads them only on its memory check timer: after an answer it
//! takes [`MemorySource::resident_bytes`] alone.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};

use nix::unistd::Pid;

/// One reading of a process's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUsage {
    /// Resident set size: every resident page the process maps, shared pages
    /// counted in full.
    pub rss_bytes: u64,
    /// Proportional set size; `None` unless detailed readings were asked for
    /// (or the kernel has no `smaps_rollup`).
    pub pss_bytes: Option<u64>,
    /// Unique set size (private clean + private dirty); `None` like
    /// [`Self::pss_bytes`].
    pub uss_bytes: Option<u64>,
}

/// What the supervisor reads each worker's memory through; procfs in
/// production, a fake in policy tests.
pub trait MemorySource: Send + 'static {
    /// Current memory of `pid`; `None` if the process is gone or its procfs
    /// files are unreadable.
    fn usage(&self, pid: Pid) -> Option<MemoryUsage>;

    /// Only the resident bytes of `pid`: the cheap reading, taken after
    /// every answer ([`MemorySource::usage`] may walk every mapping).
    fn resident_bytes(&self, pid: Pid) -> Option<u64> {
        self.usage(pid).map(|usage| usage.rss_bytes)
    }

    /// `pid` was reaped: drop whatever is kept for it (its number may be
    /// reused by an unrelated process).
    fn forget(&self, _pid: Pid) {}
}

/// Reads `/proc/PID/statm`, and `/proc/PID/smaps_rollup` when detailed.
#[derive(Debug)]
pub struct ProcfsMemory {
    /// Whether to also read PSS and USS (costs a walk of every mapping).
    detailed: bool,
    /// Each watched process's `statm`, kept open; a `Mutex` only because
    /// [`MemorySource`] is `Send` and reads through `&self` (never contended:
    /// the pool is one task).
    statm: Mutex<HashMap<i32, File>>,
}

impl ProcfsMemory {
    /// A procfs reader; `detailed` adds PSS and USS to every reading.
    pub fn new(detailed: bool) -> Self {
        Self {
            detailed,
            statm: Mutex::new(HashMap::new()),
        }
    }

    /// Resident bytes from `pid`'s kept-open `statm`, opening it the first
    /// time. A dead process reads as gone: the kernel answers an error, or
    /// zeros once its memory is released.
    fn statm_resident_bytes(&self, pid: Pid) -> Option<u64> {
        let mut files = self.statm.lock().unwrap_or_else(PoisonError::into_inner);
        let file = match files.entry(pid.as_raw()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                entry.insert(File::open(format!("/proc/{}/statm", pid.as_raw())).ok()?)
            }
        };
        // "size resident shared text lib data dt", in pages: ~30 bytes.
        let mut buf = [0u8; 128];
        let resident = file
            .read_at(&mut buf, 0)
            .ok()
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok())
            .and_then(|text| text.split_ascii_whitespace().nth(1)?.parse::<u64>().ok())
            .filter(|pages| *pages > 0);
        match resident {
            Some(pages) => Some(pages * procfs::page_size()),
            None => {
                files.remove(&pid.as_raw());
                None
            }
        }
    }
}

impl MemorySource for ProcfsMemory {
    fn resident_bytes(&self, pid: Pid) -> Option<u64> {
        self.statm_resident_bytes(pid)
    }

    fn usage(&self, pid: Pid) -> Option<MemoryUsage> {
        let mut usage = MemoryUsage {
            rss_bytes: self.statm_resident_bytes(pid)?,
            ..MemoryUsage::default()
        };
        if self.detailed {
            // A failure here (old kernel, process just exited) still leaves a
            // useful RSS reading.
            let process = procfs::process::Process::new(pid.as_raw()).ok();
            if let Some((pss, uss)) = process.as_ref().and_then(pss_and_uss) {
                usage.pss_bytes = Some(pss);
                usage.uss_bytes = Some(uss);
            }
        }
        Some(usage)
    }

    fn forget(&self, pid: Pid) {
        self.statm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid.as_raw());
    }
}

/// PSS and USS in bytes from `smaps_rollup` (procfs converts the `kB`
/// values to bytes).
fn pss_and_uss(process: &procfs::process::Process) -> Option<(u64, u64)> {
    let rollup = process.smaps_rollup().ok()?;
    let map = &rollup.memory_map_rollup.0.first()?.extension.map;
    let pss = *map.get("Pss")?;
    let private_clean = map.get("Private_Clean").copied().unwrap_or(0);
    let private_dirty = map.get("Private_Dirty").copied().unwrap_or(0);
    Some((pss, private_clean + private_dirty))
}

/// A [`MemorySource`] whose readings the test sets. Clones share the same
/// table, so a test keeps one clone and hands the other to the pool.
#[derive(Debug, Clone, Default)]
pub struct FakeMemory {
    /// Current reading per raw pid; a missing pid reads as gone.
    usages: Arc<Mutex<HashMap<i32, MemoryUsage>>>,
}

impl FakeMemory {
    /// An empty fake: every pid reads as gone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the whole reading for `pid`.
    pub fn set(&self, pid: Pid, usage: MemoryUsage) {
        self.table().insert(pid.as_raw(), usage);
    }

    /// Sets the RSS of `pid`, keeping its PSS and USS (none if it had no
    /// reading yet).
    pub fn set_rss(&self, pid: Pid, bytes: u64) {
        self.table().entry(pid.as_raw()).or_default().rss_bytes = bytes;
    }

    /// Makes `pid` read as gone.
    pub fn remove(&self, pid: Pid) {
        self.table().remove(&pid.as_raw());
    }

    /// The table; a panic in another test thread must not poison the fake.
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<i32, MemoryUsage>> {
        self.usages.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MemorySource for FakeMemory {
    fn usage(&self, pid: Pid) -> Option<MemoryUsage> {
        self.table().get(&pid.as_raw()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn reads_own_rss_and_none_for_missing_pid() {
        let procfs = ProcfsMemory::new(false);
        let own = procfs
            .usage(nix::unistd::getpid())
            .expect("own statm readable")
            .rss_bytes;
        assert!(
            own > MIB,
            "a test process has more than 1 MiB resident: {own}"
        );
        assert_eq!(procfs.usage(Pid::from_raw(i32::MAX)), None);
    }

    #[test]
    fn a_kept_open_statm_reads_as_gone_once_the_process_is_reaped() {
        let procfs = ProcfsMemory::new(false);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32);
        let first = procfs.usage(pid).expect("a live child has a reading");
        assert!(first.rss_bytes > 0, "{first:?}");
        // Read again through the kept-open file.
        assert!(procfs.usage(pid).is_some());
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert_eq!(procfs.usage(pid), None, "a reaped child reads as gone");
        procfs.forget(pid);
    }

    #[test]
    fn cheap_reading_has_no_pss_or_uss() {
        let usage = ProcfsMemory::new(false)
            .usage(nix::unistd::getpid())
            .expect("own statm readable");
        assert!(usage.rss_bytes > MIB, "{usage:?}");
        assert_eq!((usage.pss_bytes, usage.uss_bytes), (None, None));
    }

    #[test]
    fn detailed_reading_has_sane_pss_and_uss() {
        let usage = ProcfsMemory::new(true)
            .usage(nix::unistd::getpid())
            .expect("own statm readable");
        println!("own memory: {usage:?}");
        let pss = usage.pss_bytes.expect("this kernel has smaps_rollup");
        let uss = usage.uss_bytes.expect("USS comes with PSS");
        assert!(usage.rss_bytes > MIB, "{usage:?}");
        assert!(uss > 0, "a test process has private pages: {usage:?}");
        // PSS = private + a share of each shared page, so never below USS
        // (both come from one read of smaps_rollup).
        assert!(uss <= pss, "USS <= PSS: {usage:?}");
        // RSS was read a moment earlier from statm; other test threads may
        // have allocated in between, hence the slack.
        assert!(pss <= usage.rss_bytes + 64 * MIB, "PSS <= RSS: {usage:?}");
    }

    #[test]
    fn detailed_reading_of_missing_pid_is_none() {
        assert_eq!(ProcfsMemory::new(true).usage(Pid::from_raw(i32::MAX)), None);
    }

    #[test]
    fn fake_memory_is_shared_between_clones() {
        let fake = FakeMemory::new();
        let pool_side: Box<dyn MemorySource> = Box::new(fake.clone());
        let pid = Pid::from_raw(42);
        assert_eq!(pool_side.usage(pid), None);

        fake.set_rss(pid, 100 * MIB);
        assert_eq!(
            pool_side.usage(pid),
            Some(MemoryUsage {
                rss_bytes: 100 * MIB,
                pss_bytes: None,
                uss_bytes: None
            })
        );

        let detailed = MemoryUsage {
            rss_bytes: 300 * MIB,
            pss_bytes: Some(200 * MIB),
            uss_bytes: Some(150 * MIB),
        };
        fake.set(pid, detailed);
        assert_eq!(pool_side.usage(pid), Some(detailed));

        fake.set_rss(pid, 310 * MIB);
        assert_eq!(
            pool_side.usage(pid),
            Some(MemoryUsage {
                rss_bytes: 310 * MIB,
                ..detailed
            }),
            "set_rss keeps PSS and USS"
        );
        assert_eq!(pool_side.usage(Pid::from_raw(43)), None);

        fake.remove(pid);
        assert_eq!(pool_side.usage(pid), None);
    }
}
