//! Automatic memory limits and spare count: what `soft_limit = "auto"`,
//! `hard_limit = "auto"` and `spare_workers = "auto"` become.
//!
//! # How they are derived
//!
//! Nothing is guessed before a worker runs: once the first worker of a
//! configuration is Ready (model loaded, warm-up run), the pool reads its
//! memory — the **baseline** `b` — and calls [`derive`]. Each worker gets
//! room for one request's activations and allocator slack above its
//! baseline: `room = max(b, 256 MiB)` (a 64 × 256-token request run in
//! `max_batch_tokens` runs peaks ~150 MiB above the baseline of the
//! MiniLM models, docs/BENCHMARKS.md; a larger model needs more, roughly
//! in proportion to its size). Then
//!
//! * hard limit = `b + 2 × room`, soft limit = halfway between `b` and the
//!   hard limit (`b + room` when nothing caps the hard limit);
//! * both capped by the **memory available** to the service: the tightest
//!   memory limit of the supervisor's own cgroup and its ancestors, else
//!   the host's `MemTotal`, less a 64 MiB reserve for the supervisor, shared
//!   between `workers` + spares + `max_concurrent_recycles` (a recycle's
//!   replacement loads next to the worker it replaces). When the cap bites,
//!   the soft limit stays halfway between the baseline and the hard limit;
//!   the hard limit never goes below `b + 64 MiB` (a warning then says
//!   there are too many workers for the memory);
//! * one spare (`"auto"`) when that share, with the spare counted, still
//!   holds the uncapped hard limit; none otherwise.
//!
//! A fixed value in the configuration always wins (an automatic hard limit
//! is kept above a fixed soft one). The pool derives again when a roll's
//! first new worker is Ready (SIGHUP may change the model, `workers` or the
//! limits) and logs how each value came about; `inferctl status` and
//! `/info` show it.

use bytesize::ByteSize;

use crate::config::{Config, LimitSetting, SpareSetting};

/// Room above the baseline is at least this much.
const MIN_ROOM: u64 = 256 << 20;
/// Kept out of the memory available for the supervisor itself.
const SUPERVISOR_RESERVE: u64 = 64 << 20;
/// An automatic hard limit is never below the baseline plus this: less
/// would fail every start (too many workers for the memory there is; the
/// derivation warns instead, see [`Derived::tight`]).
const MIN_HEADROOM: u64 = 64 << 20;

/// The memory the service may use, and where that figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes.
    pub bytes: u64,
    /// "cgroup <dir>" or "host MemTotal".
    pub source: String,
}

impl MemoryBudget {
    /// Reads the supervisor's cgroup limit, else the host's memory; `None`
    /// if neither can be read.
    pub fn read() -> Option<Self> {
        if let Some((bytes, dir)) = crate::cgroup::own_memory_limit() {
            return Some(Self {
                bytes,
                source: format!("the limit of cgroup {}", dir.display()),
            });
        }
        let total = procfs::Current::current()
            .map(|m: procfs::Meminfo| m.mem_total)
            .ok()?;
        Some(Self {
            bytes: total,
            source: "host MemTotal; no cgroup memory limit".into(),
        })
    }
}

/// The limits and spare count in force, and how they came about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// Graceful recycle above this.
    pub soft: Option<u64>,
    /// Kill above this; the cgroup leaves' limit.
    pub hard: Option<u64>,
    /// Loaded workers held in reserve.
    pub spares: u32,
    /// Something "auto" is still waiting for a baseline.
    pub pending: bool,
    /// The memory available leaves a worker less than its baseline plus
    /// 64 MiB: too many workers for this machine or cgroup.
    pub tight: bool,
    /// How the values came about, in one line (logged, shown in status).
    pub origin: String,
}

/// Resolves the configured limits and spare count. `baseline` is the memory
/// of the first Ready worker of this configuration (`None` before there is
/// one); `budget` what [`MemoryBudget::read`] found.
pub fn derive(config: &Config, baseline: Option<u64>, budget: Option<&MemoryBudget>) -> Derived {
    let auto = matches!(config.soft_limit, LimitSetting::Auto)
        || matches!(config.hard_limit, LimitSetting::Auto)
        || matches!(config.spare_workers, SpareSetting::Auto);
    let fixed_spares = match config.spare_workers {
        SpareSetting::Count(n) => Some(n),
        SpareSetting::Auto => None,
    };
    let configured = |setting: LimitSetting| setting.fixed().map(|b| b.as_u64());
    if !auto {
        return Derived {
            soft: configured(config.soft_limit),
            hard: configured(config.hard_limit),
            spares: fixed_spares.unwrap_or(0),
            pending: false,
            tight: false,
            origin: "set in the configuration".into(),
        };
    }
    let Some(baseline) = baseline else {
        return Derived {
            soft: configured(config.soft_limit),
            hard: configured(config.hard_limit),
            spares: fixed_spares.unwrap_or(0),
            pending: true,
            tight: false,
            origin: "auto: waiting for the first worker to be Ready to measure its baseline".into(),
        };
    };
    let room = baseline.max(MIN_ROOM);
    let wanted_hard = baseline + 2 * room;
    let usable = budget.map(|b| b.bytes.saturating_sub(SUPERVISOR_RESERVE));
    let recycles = config.max_concurrent_recycles;
    let share =
        |spares: u32| usable.map(|bytes| bytes / u64::from(config.workers + spares + recycles));
    let spares = fixed_spares
        .unwrap_or_else(|| u32::from(share(1).is_none_or(|share| share >= wanted_hard)));
    let cap = share(spares);
    let tight = cap.is_some_and(|cap| cap < baseline + MIN_HEADROOM);
    let soft_fixed = configured(config.soft_limit);
    let hard = match config.hard_limit {
        LimitSetting::Fixed(bytes) => Some(bytes.as_u64()),
        LimitSetting::Off => None,
        LimitSetting::Auto => {
            let capped = cap.map_or(wanted_hard, |cap| wanted_hard.min(cap));
            let capped = capped.max(baseline + MIN_HEADROOM);
            // Above a fixed soft limit, or the soft limit could never act.
            Some(soft_fixed.map_or(capped, |soft| capped.max(soft + soft / 4)))
        }
    };
    let soft = match config.soft_limit {
        LimitSetting::Fixed(bytes) => Some(bytes.as_u64()),
        LimitSetting::Off => None,
        LimitSetting::Auto => match hard {
            Some(hard) => Some(baseline + hard.saturating_sub(baseline) / 2).filter(|&s| s < hard),
            None => Some(baseline + room),
        },
    };
    let mib = |bytes: u64| ByteSize::b(bytes).to_string();
    let mut origin = format!(
        "auto: baseline {} (first Ready worker), room per request {}",
        mib(baseline),
        mib(room)
    );
    match (budget, cap) {
        (Some(budget), Some(cap)) => origin.push_str(&format!(
            "; {} available ({}), {} per worker for {} workers + {} spare + {} recycle",
            mib(budget.bytes),
            budget.source,
            mib(cap),
            config.workers,
            spares,
            recycles
        )),
        _ => origin.push_str("; memory available unknown, no cap"),
    }
    if cap.is_some_and(|cap| cap < wanted_hard) {
        origin.push_str(&format!("; hard limit capped below {}", mib(wanted_hard)));
    }
    if tight {
        origin.push_str("; TOO TIGHT: less than the baseline + 64 MiB per worker");
    }
    let fixed: Vec<&str> = [
        ("soft_limit", &config.soft_limit),
        ("hard_limit", &config.hard_limit),
    ]
    .into_iter()
    .filter(|(_, setting)| !matches!(setting, LimitSetting::Auto))
    .map(|(key, _)| key)
    .collect();
    if !fixed.is_empty() {
        origin.push_str(&format!("; {} from the configuration", fixed.join(", ")));
    }
    Derived {
        soft,
        hard,
        spares,
        pending: false,
        tight,
        origin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn config() -> Config {
        Config {
            workers: 2,
            ..Config::default()
        }
    }

    fn budget(bytes: u64) -> MemoryBudget {
        MemoryBudget {
            bytes,
            source: "test".into(),
        }
    }

    #[test]
    fn a_roomy_host_gets_baseline_based_limits_and_one_spare() {
        let derived = derive(&config(), Some(100 * MIB), Some(&budget(24 * GIB)));
        assert_eq!(derived.hard, Some(612 * MIB), "100 + 2 x 256");
        assert_eq!(derived.soft, Some(356 * MIB), "halfway");
        assert_eq!(derived.spares, 1);
        assert!(!derived.pending);
        assert!(
            derived.origin.contains("baseline 100.0 MiB"),
            "{}",
            derived.origin
        );
        assert!(
            derived.origin.contains("2 workers + 1 spare + 1 recycle"),
            "{}",
            derived.origin
        );
    }

    #[test]
    fn a_large_model_gets_room_in_proportion() {
        let derived = derive(&config(), Some(GIB), Some(&budget(64 * GIB)));
        assert_eq!(derived.hard, Some(3 * GIB));
        assert_eq!(derived.soft, Some(2 * GIB));
    }

    #[test]
    fn a_small_cgroup_caps_the_limits_and_drops_the_spare() {
        // 1.5 GiB: with a spare, 4 slots of 368 MiB; without, 3 of 490
        // MiB: both below the 612 MiB wanted.
        let derived = derive(&config(), Some(100 * MIB), Some(&budget(3 * GIB / 2)));
        assert_eq!(derived.spares, 0);
        let share = (3 * GIB / 2 - 64 * MIB) / 3;
        assert_eq!(derived.hard, Some(share));
        assert_eq!(derived.soft, Some(100 * MIB + (share - 100 * MIB) / 2));
        assert!(derived.origin.contains("capped"), "{}", derived.origin);
        assert!(!derived.tight);
        let tight = derive(
            &Config {
                workers: 16,
                ..config()
            },
            Some(100 * MIB),
            Some(&budget(2 * GIB)),
        );
        assert!(tight.tight, "{tight:?}");
        assert_eq!(
            tight.hard,
            Some(164 * MIB),
            "never below the baseline + 64 MiB"
        );
        assert!(tight.soft.unwrap() < 164 * MIB, "{tight:?}");
        assert!(tight.origin.contains("TOO TIGHT"), "{}", tight.origin);
    }

    #[test]
    fn fixed_values_win_and_nothing_waits_without_auto() {
        let fixed = Config {
            soft_limit: LimitSetting::Fixed(ByteSize::mib(300)),
            hard_limit: LimitSetting::Off,
            spare_workers: SpareSetting::Count(2),
            ..config()
        };
        let derived = derive(&fixed, None, Some(&budget(GIB)));
        assert_eq!(
            (derived.soft, derived.hard, derived.spares),
            (Some(300 * MIB), None, 2)
        );
        assert!(!derived.pending);
        assert_eq!(derived.origin, "set in the configuration");
    }

    #[test]
    fn auto_waits_for_a_baseline_keeping_what_is_fixed() {
        let half = Config {
            hard_limit: LimitSetting::Fixed(ByteSize::mib(700)),
            ..config()
        };
        let waiting = derive(&half, None, Some(&budget(24 * GIB)));
        assert!(waiting.pending);
        assert_eq!(
            (waiting.soft, waiting.hard, waiting.spares),
            (None, Some(700 * MIB), 0)
        );
        let derived = derive(&half, Some(100 * MIB), Some(&budget(24 * GIB)));
        assert_eq!(derived.hard, Some(700 * MIB));
        assert_eq!(
            derived.soft,
            Some(400 * MIB),
            "halfway to the fixed hard limit"
        );
        assert!(
            derived.origin.contains("hard_limit from the configuration"),
            "{}",
            derived.origin
        );
    }

    #[test]
    fn an_automatic_hard_limit_stays_above_a_fixed_soft_one() {
        let soft_only = Config {
            soft_limit: LimitSetting::Fixed(ByteSize::gib(2)),
            ..config()
        };
        let derived = derive(&soft_only, Some(100 * MIB), Some(&budget(24 * GIB)));
        assert_eq!(derived.soft, Some(2 * GIB));
        assert!(derived.hard.unwrap() > 2 * GIB, "{derived:?}");
    }

    #[test]
    fn an_unknown_budget_means_no_cap_and_a_spare() {
        let derived = derive(&config(), Some(100 * MIB), None);
        assert_eq!(derived.hard, Some(612 * MIB));
        assert_eq!(derived.spares, 1);
        assert!(derived.origin.contains("unknown"), "{}", derived.origin);
    }

    #[test]
    fn this_machine_has_a_budget() {
        let budget = MemoryBudget::read().expect("cgroup limit or MemTotal is readable");
        assert!(budget.bytes > 64 * MIB, "{budget:?}");
    }
}
