//! The descriptor limit: raise it at start, and keep client connections from
//! taking the descriptors a worker spawn needs.
//!
//! Every client connection holds one descriptor, every worker one more (our
//! end of its socketpair), and spawning a worker needs a few for a moment.
//! systemd starts services with a soft `RLIMIT_NOFILE` of 1024 (the default
//! that keeps select(2)-based programs safe) whatever the hard limit, so
//! about a thousand idle clients used to be enough to make every spawn fail
//! with EMFILE. Two steps at start fix that:
//!
//! 1. [`raise_nofile`] raises the soft limit to the hard limit (which needs
//!    no privilege; `LimitNOFILE=` in the unit sets both). Nothing in inferd
//!    uses select(2), whose `fd_set` cannot hold descriptors past 1024: tokio
//!    uses epoll. Workers inherit the raised limit; they use tokio too.
//! 2. [`connection_cap`] lowers `max_connections` where the soft limit
//!    cannot hold it plus [`reserve`], the descriptors that must stay free so
//!    a worker can always be spawned, even with every connection slot taken.
//!
//! Both are at start only; a reload that raises `workers` keeps the cap
//! computed at start.

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// Descriptors kept for everything that is neither a client connection nor a
/// worker: stdio and logging, the client and metrics listeners and metrics
/// scrapes, tokio's epoll and wake-up descriptors, the signal and sd_notify
/// sockets, and the procfs and cgroup files read for a moment.
pub const BASE_RESERVE: u64 = 64;

/// Connections the accept loop may have accepted and not yet admitted or
/// refused: it runs until tokio's cooperative budget (128 operations per
/// poll) makes it yield to the connection tasks, which then close what the
/// caps refuse. In a flood of connections that many are open beyond the cap.
pub const ACCEPT_BURST: u64 = 128;

/// Descriptors one worker holds while it lives: our end of its socketpair.
pub const FDS_PER_WORKER: u64 = 1;

/// Descriptors a spawn holds for a moment besides the new worker's own: the
/// child's end of the socketpair (closed once spawned), the close-on-exec
/// pipe std uses to report a failed exec (two ends), and `/dev/null` for the
/// child's stdin (see [`crate::process::spawn_worker`]). The pool spawns one
/// worker at a time, so these are counted once, not per worker.
pub const SPAWN_TRANSIENT_FDS: u64 = 4;

/// Soft limit to aim for when the hard limit is unlimited, where
/// `/proc/sys/fs/nr_open` (the kernel's ceiling) cannot be read: the
/// kernel's default for it.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// Failure to read or raise `RLIMIT_NOFILE`.
#[derive(Debug, thiserror::Error)]
pub enum FdLimitError {
    /// getrlimit(2) failed.
    #[error("cannot read RLIMIT_NOFILE")]
    GetLimit(#[source] nix::Error),
    /// setrlimit(2) failed.
    #[error("cannot raise the soft RLIMIT_NOFILE from {from} to {to}")]
    RaiseLimit {
        /// The soft limit, unchanged.
        from: u64,
        /// The soft limit asked for.
        to: u64,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
}

/// `RLIMIT_NOFILE` around [`raise_nofile`], for one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit now: how many descriptors inferd may have open.
    pub soft: u64,
    /// The hard limit: the most the soft limit can be raised to without
    /// privilege.
    pub hard: u64,
}

/// The connection cap that fits in the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCap {
    /// Client connections to admit at most.
    pub max_connections: u32,
    /// Whether that is below the configured `max_connections`.
    pub lowered: bool,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to the kernel's
/// `nr_open` if the hard limit is unlimited) and returns the limits before
/// and after. A soft limit already at the hard limit is left alone.
pub fn raise_nofile() -> Result<NofileLimit, FdLimitError> {
    let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(FdLimitError::GetLimit)?;
    let Some(target) = raise_target(before, hard, read_nr_open) else {
        return Ok(NofileLimit {
            before,
            soft: before,
            hard,
        });
    };
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(|source| {
        FdLimitError::RaiseLimit {
            from: before,
            to: target,
            source,
        }
    })?;
    Ok(NofileLimit {
        before,
        soft: target,
        hard,
    })
}

/// The soft limit to set, or `None` to leave `soft` as it is. An unlimited
/// hard limit cannot be the soft one for descriptors (the kernel refuses
/// anything over `nr_open`), so `nr_open()` is asked then.
fn raise_target(soft: u64, hard: u64, nr_open: impl FnOnce() -> u64) -> Option<u64> {
    let target = if hard == RLIM_INFINITY {
        nr_open()
    } else {
        hard
    };
    (target > soft).then_some(target)
}

/// The kernel's ceiling for `RLIMIT_NOFILE`.
fn read_nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(NR_OPEN_DEFAULT)
}

/// Descriptors to keep free of client connections so that a worker can
/// always be spawned: [`BASE_RESERVE`], `lingering_refusals` (refused
/// connections kept open a moment to read their refusal), [`ACCEPT_BURST`],
/// [`FDS_PER_WORKER`] for twice `workers` (during recycles and rolls a
/// replacement runs beside each worker it replaces), and
/// [`SPAWN_TRANSIENT_FDS`].
pub fn reserve(workers: u32, lingering_refusals: usize) -> u64 {
    // usize is at most 64 bits on every target Rust supports: lossless.
    let lingering = lingering_refusals as u64;
    (2 * u64::from(workers) * FDS_PER_WORKER)
        .saturating_add(lingering)
        .saturating_add(BASE_RESERVE + ACCEPT_BURST + SPAWN_TRANSIENT_FDS)
}

/// The connection cap for a process with `soft_limit` descriptors, running
/// `workers` workers and letting up to `lingering_refusals` refused
/// connections linger: the configured `max_connections`, or what is left
/// of the limit after [`reserve`] if that is less. Never below 1: a daemon
/// that refuses every client serves no one, and a limit that low is a
/// misconfiguration the caller's warning names.
pub fn connection_cap(
    soft_limit: u64,
    max_connections: u32,
    workers: u32,
    lingering_refusals: usize,
) -> ConnectionCap {
    // Saturated to u32: more than u32::MAX available is plenty for any cap.
    let available = u32::try_from(soft_limit.saturating_sub(reserve(workers, lingering_refusals)))
        .unwrap_or(u32::MAX);
    if available >= max_connections {
        ConnectionCap {
            max_connections,
            lowered: false,
        }
    } else {
        ConnectionCap {
            max_connections: available.max(1),
            lowered: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lingering_refusals` as `run` sets it.
    const LINGERING: usize = 64;

    #[test]
    fn reserve_counts_base_burst_lingering_replacements_and_one_spawn() {
        assert_eq!(reserve(0, 0), 64 + 128 + 4);
        // Two descriptors per worker: it and its replacement.
        assert_eq!(reserve(4, 0) - reserve(0, 0), 8);
        assert_eq!(reserve(4, LINGERING) - reserve(4, 0), 64);
    }

    #[test]
    fn enough_descriptors_keep_the_configured_cap() {
        // LimitNOFILE=65536 and the default max_connections (4096).
        let cap = connection_cap(65_536, 4096, 2, LINGERING);
        assert_eq!(
            cap,
            ConnectionCap {
                max_connections: 4096,
                lowered: false
            }
        );
        // Exactly enough is enough.
        let exact = 4096 + reserve(2, LINGERING);
        assert!(!connection_cap(exact, 4096, 2, LINGERING).lowered);
    }

    #[test]
    fn a_small_limit_lowers_the_cap_by_the_reserve() {
        // systemd's default soft limit, which the bug report ran into: the
        // old cap of 4096 let ~1000 connections starve spawns.
        let cap = connection_cap(1024, 4096, 2, LINGERING);
        let expected = 1024 - reserve(2, LINGERING);
        assert_eq!(u64::from(cap.max_connections), expected);
        assert!(cap.lowered);
        // One descriptor short of the configured cap lowers it by one.
        let short = 4096 + reserve(2, LINGERING) - 1;
        assert_eq!(
            connection_cap(short, 4096, 2, LINGERING),
            ConnectionCap {
                max_connections: 4095,
                lowered: true
            }
        );
    }

    #[test]
    fn more_workers_leave_fewer_connections() {
        let few = connection_cap(1024, 4096, 1, LINGERING).max_connections;
        let many = connection_cap(1024, 4096, 256, LINGERING).max_connections;
        assert_eq!(few - many, 2 * 255);
    }

    #[test]
    fn a_limit_below_the_reserve_still_admits_one_connection() {
        let cap = connection_cap(100, 4096, 2, LINGERING);
        assert_eq!(
            cap,
            ConnectionCap {
                max_connections: 1,
                lowered: true
            }
        );
    }

    #[test]
    fn huge_limits_do_not_overflow() {
        let cap = connection_cap(RLIM_INFINITY, u32::MAX, 256, LINGERING);
        assert_eq!(cap.max_connections, u32::MAX);
        assert!(!cap.lowered);
        // The reserve saturates rather than wrapping to a small number.
        assert_eq!(reserve(u32::MAX, usize::MAX), u64::MAX);
        assert_eq!(
            connection_cap(RLIM_INFINITY, 4096, 2, usize::MAX).max_connections,
            1
        );
    }

    #[test]
    fn the_soft_limit_is_raised_only_upwards() {
        let no_nr_open = || panic!("nr_open is read only for an unlimited hard limit");
        assert_eq!(raise_target(1024, 524_288, no_nr_open), Some(524_288));
        assert_eq!(raise_target(65_536, 65_536, no_nr_open), None);
        assert_eq!(raise_target(1024, RLIM_INFINITY, || 1 << 20), Some(1 << 20));
        assert_eq!(raise_target(1 << 20, RLIM_INFINITY, || 1 << 20), None);
    }

    /// The real call, in this test process, from a soft limit one below
    /// its ceiling (lowering it that little starves no other test).
    #[test]
    fn raise_nofile_lifts_the_soft_limit_to_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let ceiling = if hard == RLIM_INFINITY {
            read_nr_open()
        } else {
            hard
        };
        setrlimit(Resource::RLIMIT_NOFILE, ceiling - 1, hard)
            .expect("lowering the soft limit needs no privilege");
        let limit = raise_nofile().expect("raising to the hard limit needs no privilege");
        assert_eq!(
            limit,
            NofileLimit {
                before: ceiling - 1,
                soft: ceiling,
                hard
            }
        );
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(soft, ceiling, "the limit really changed");
    }
}
