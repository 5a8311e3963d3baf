//! The pool's decisions, as pure functions of what it measured: when to
//! recycle or kill a worker ([`RecyclePolicy`]), and how fast to restart
//! workers that keep dying ([`RestartPacer`]). Kept apart from the pool's I/O
//! so they are unit-tested with a fake memory source and paused time.

use std::collections::VecDeque;
use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

use crate::config::{Config, MemoryMetric};
use crate::growth::reaches_within;
use crate::limits::Derived;
use crate::memory::{MemorySource, MemoryUsage};
use crate::process::{KillReason, RetireReason};

/// First restart delay after a failure; doubles with each further one.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `base` spread per worker between 1× and 1.5×, so workers started
/// together do not reach a request or lifetime limit together.
pub fn stagger(base: u64, worker_id: u64, workers: u32) -> u64 {
    let workers = u64::from(workers.max(1));
    base + base / 2 * (worker_id % workers) / workers
}

/// What the pool knows about one serving worker when it judges it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerFacts {
    /// Worker id (for the stagger).
    pub id: u64,
    /// Time since spawn.
    pub age: Duration,
    /// Requests answered.
    pub requests_served: u64,
    /// Memory figure per the configured metric, if it could be read.
    pub memory_bytes: Option<u64>,
    /// Started before the latest rolling restart began.
    pub stale: bool,
    /// Sustained memory growth, bytes per second (see [`crate::growth`]).
    pub growth_per_sec: Option<f64>,
    /// In a cgroup leaf of its own, whose kernel limit is the hard limit.
    pub in_own_cgroup: bool,
}

/// What to do with a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing.
    Keep,
    /// Replace it gracefully.
    Recycle(RetireReason),
    /// SIGKILL it now.
    Kill(KillReason),
}

/// Memory, request-count and lifetime limits of workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecyclePolicy {
    /// Graceful recycle above this.
    pub soft_limit: Option<u64>,
    /// Kill above this.
    pub hard_limit: Option<u64>,
    /// Recycle after about this many requests (staggered).
    pub max_requests: Option<u64>,
    /// Recycle after about this long (staggered).
    pub max_lifetime: Option<Duration>,
    /// No graceful recycle before this age.
    pub min_lifetime: Duration,
    /// Target pool size, for the stagger.
    pub workers: u32,
    /// Which memory figure the limits apply to.
    pub metric: MemoryMetric,
    /// How far ahead growth is projected against the hard limit: the time
    /// a replacement needs to be Ready, plus a margin.
    pub leak_horizon: Duration,
}

/// The leak horizon before any load time was measured.
pub const DEFAULT_LEAK_HORIZON: Duration = Duration::from_secs(3);

impl RecyclePolicy {
    /// The policy a configuration asks for, with its limits as resolved.
    pub fn new(config: &Config, limits: &Derived) -> Self {
        Self {
            soft_limit: limits.soft,
            hard_limit: limits.hard,
            max_requests: config.max_requests,
            max_lifetime: config.max_lifetime(),
            min_lifetime: config.min_lifetime(),
            workers: config.workers,
            metric: config.memory_metric,
            leak_horizon: DEFAULT_LEAK_HORIZON,
        }
    }

    /// A replacement took `load` to be Ready: project growth over that
    /// plus as much again (at least 1 s) from now on.
    pub fn measured_load_time(&mut self, load: Duration) {
        self.leak_horizon = load + load.max(Duration::from_secs(1));
    }

    /// Reads the configured memory figure of `pid`.
    pub fn measure(&self, source: &dyn MemorySource, pid: Pid) -> Option<u64> {
        self.figure(source.usage(pid)?)
    }

    /// The configured memory figure out of one reading.
    pub fn figure(&self, usage: MemoryUsage) -> Option<u64> {
        match self.metric {
            MemoryMetric::Rss => Some(usage.rss_bytes),
            MemoryMetric::Pss => usage.pss_bytes,
            MemoryMetric::Uss => usage.uss_bytes,
        }
    }

    /// Whether the policy needs memory readings at all.
    pub fn watches_memory(&self) -> bool {
        self.soft_limit.is_some() || self.hard_limit.is_some()
    }

    /// Judges one worker. The hard limit applies at any age, and so does a
    /// leak fast enough to reach it before a replacement could be Ready;
    /// the other graceful triggers wait for `min_lifetime`, so a worker
    /// that starts above the soft limit is not replaced in a loop.
    pub fn judge(&self, facts: &WorkerFacts) -> Verdict {
        let memory = facts.memory_bytes.unwrap_or(0);
        let over_hard = self.hard_limit.is_some_and(|hard| memory > hard);
        if over_hard && !facts.in_own_cgroup {
            return Verdict::Kill(KillReason::HardLimit);
        }
        // A roll replaces every worker, young ones included.
        if facts.stale {
            return Verdict::Recycle(RetireReason::Roll);
        }
        // In its own cgroup the kernel enforces the hard limit with exact
        // accounting (RSS also counts shared file pages charged elsewhere):
        // over it by RSS, the worker is past its soft limit at any age.
        if over_hard {
            return match self.soft_limit {
                Some(_) => Verdict::Recycle(RetireReason::SoftLimit),
                None => Verdict::Keep,
            };
        }
        if let (Some(hard), Some(growth)) = (self.hard_limit, facts.growth_per_sec) {
            if reaches_within(memory, growth, hard, self.leak_horizon) {
                return Verdict::Recycle(RetireReason::LeakRate);
            }
        }
        if facts.age < self.min_lifetime {
            return Verdict::Keep;
        }
        if self.soft_limit.is_some_and(|soft| memory > soft) {
            return Verdict::Recycle(RetireReason::SoftLimit);
        }
        if let Some(max) = self.max_requests {
            if facts.requests_served >= stagger(max, facts.id, self.workers) {
                return Verdict::Recycle(RetireReason::MaxRequests);
            }
        }
        if let Some(max) = self.max_lifetime {
            let limit = stagger(max.as_millis() as u64, facts.id, self.workers);
            if facts.age.as_millis() as u64 >= limit {
                return Verdict::Recycle(RetireReason::MaxLifetime);
            }
        }
        Verdict::Keep
    }
}

/// Paces worker (re)starts, OTP-style: failed starts back off exponentially;
/// more than `max_restarts` unexpected exits within `period` back off too.
/// Either way spawns per minute stay bounded, so a broken model or a crash
/// loop never turns into a fork bomb.
#[derive(Debug)]
pub struct RestartPacer {
    /// Allowed unexpected exits per period before slowing down.
    max_restarts: u32,
    /// The sliding window.
    period: Duration,
    /// Failed starts since a worker last became ready.
    failures_in_a_row: u32,
    /// Unexpected exits within the window.
    recent_exits: VecDeque<Instant>,
    /// No spawn before this.
    next_spawn_at: Instant,
    /// Why the last start failed.
    last_error: Option<String>,
}

impl RestartPacer {
    /// A pacer that allows spawning now.
    pub fn new(max_restarts: u32, period: Duration, now: Instant) -> Self {
        Self {
            max_restarts,
            period,
            failures_in_a_row: 0,
            recent_exits: VecDeque::new(),
            next_spawn_at: now,
            last_error: None,
        }
    }

    /// May a worker be spawned now?
    pub fn may_spawn(&self, now: Instant) -> bool {
        now >= self.next_spawn_at
    }

    /// A worker became ready: starts are healthy again.
    pub fn started(&mut self) {
        self.failures_in_a_row = 0;
        self.last_error = None;
    }

    /// A start failed (spawn error, or exit before ready); returns the delay
    /// before the next spawn.
    pub fn start_failed(&mut self, reason: String, now: Instant) -> Duration {
        self.failures_in_a_row += 1;
        self.last_error = Some(reason);
        self.delay(self.failures_in_a_row, now)
    }

    /// A ready worker died unexpectedly; returns a delay when this makes a
    /// crash loop (more than `max_restarts` within `period`).
    pub fn unexpected_exit(&mut self, now: Instant) -> Option<Duration> {
        self.recent_exits.push_back(now);
        while self
            .recent_exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.period)
        {
            self.recent_exits.pop_front();
        }
        let excess = (self.recent_exits.len() as u32).checked_sub(self.max_restarts)?;
        (excess > 0).then(|| self.delay(excess, now))
    }

    fn delay(&mut self, nth: u32, now: Instant) -> Duration {
        let exponent = nth.saturating_sub(1).min(16);
        let delay = BACKOFF_BASE.saturating_mul(1 << exponent).min(BACKOFF_MAX);
        self.next_spawn_at = self.next_spawn_at.max(now + delay);
        delay
    }

    /// Failed starts since a worker last became ready.
    pub fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row
    }

    /// Why the last start failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::FakeMemory;

    const MIB: u64 = 1 << 20;

    fn policy() -> RecyclePolicy {
        RecyclePolicy {
            soft_limit: Some(300 * MIB),
            hard_limit: Some(400 * MIB),
            max_requests: Some(1000),
            max_lifetime: Some(Duration::from_secs(3600)),
            min_lifetime: Duration::from_secs(5),
            workers: 4,
            metric: MemoryMetric::Rss,
            leak_horizon: Duration::from_secs(2),
        }
    }

    fn facts(memory: u64) -> WorkerFacts {
        WorkerFacts {
            id: 4,
            age: Duration::from_secs(60),
            requests_served: 10,
            memory_bytes: Some(memory),
            stale: false,
            growth_per_sec: None,
            in_own_cgroup: false,
        }
    }

    #[test]
    fn memory_limits_from_a_fake_source() {
        let source = FakeMemory::new();
        let pid = Pid::from_raw(4242);
        let policy = policy();
        let judge = |rss: u64| {
            source.set_rss(pid, rss);
            policy.judge(&WorkerFacts {
                memory_bytes: policy.measure(&source, pid),
                ..facts(0)
            })
        };
        assert_eq!(judge(200 * MIB), Verdict::Keep);
        assert_eq!(judge(301 * MIB), Verdict::Recycle(RetireReason::SoftLimit));
        assert_eq!(judge(401 * MIB), Verdict::Kill(KillReason::HardLimit));
        source.remove(pid);
        assert_eq!(
            policy.measure(&source, pid),
            None,
            "gone process: no reading"
        );
    }

    #[test]
    fn metric_selects_the_figure() {
        let source = FakeMemory::new();
        let pid = Pid::from_raw(7);
        source.set(
            pid,
            MemoryUsage {
                rss_bytes: 500 * MIB,
                pss_bytes: Some(350 * MIB),
                uss_bytes: Some(250 * MIB),
            },
        );
        let mut policy = policy();
        for (metric, expected) in [
            (MemoryMetric::Rss, 500 * MIB),
            (MemoryMetric::Pss, 350 * MIB),
            (MemoryMetric::Uss, 250 * MIB),
        ] {
            policy.metric = metric;
            assert_eq!(policy.measure(&source, pid), Some(expected));
        }
    }

    #[test]
    fn young_workers_are_only_killed_never_recycled() {
        let young = WorkerFacts {
            age: Duration::from_secs(1),
            ..facts(350 * MIB)
        };
        assert_eq!(policy().judge(&young), Verdict::Keep);
        let young_and_huge = WorkerFacts {
            memory_bytes: Some(500 * MIB),
            ..young
        };
        assert_eq!(
            policy().judge(&young_and_huge),
            Verdict::Kill(KillReason::HardLimit)
        );
    }

    #[test]
    fn a_roll_replaces_even_young_workers_but_hard_limit_comes_first() {
        let stale = WorkerFacts {
            age: Duration::from_millis(10),
            stale: true,
            ..facts(100 * MIB)
        };
        assert_eq!(policy().judge(&stale), Verdict::Recycle(RetireReason::Roll));
        let stale_and_huge = WorkerFacts {
            memory_bytes: Some(500 * MIB),
            ..stale
        };
        assert_eq!(
            policy().judge(&stale_and_huge),
            Verdict::Kill(KillReason::HardLimit)
        );
    }

    #[test]
    fn in_its_own_cgroup_a_worker_over_the_hard_limit_by_rss_is_recycled_not_killed() {
        let young_in_cgroup = WorkerFacts {
            age: Duration::from_secs(1),
            in_own_cgroup: true,
            ..facts(450 * MIB)
        };
        assert_eq!(
            policy().judge(&young_in_cgroup),
            Verdict::Recycle(RetireReason::SoftLimit),
            "the kernel enforces the exact limit; RSS over it is over the soft limit"
        );
        let stale = WorkerFacts {
            stale: true,
            ..young_in_cgroup
        };
        assert_eq!(policy().judge(&stale), Verdict::Recycle(RetireReason::Roll));
        let no_soft = RecyclePolicy {
            soft_limit: None,
            ..policy()
        };
        assert_eq!(no_soft.judge(&young_in_cgroup), Verdict::Keep);
    }

    #[test]
    fn a_fast_leak_is_recycled_whatever_its_age_a_slow_one_waits() {
        let young_leaker = WorkerFacts {
            age: Duration::from_millis(3500),
            growth_per_sec: Some(60.0 * MIB as f64),
            ..facts(290 * MIB)
        };
        // 290 + 60 x 2 s >= 400: would pass the hard limit before a
        // replacement is Ready.
        assert_eq!(
            policy().judge(&young_leaker),
            Verdict::Recycle(RetireReason::LeakRate)
        );
        let slow = WorkerFacts {
            growth_per_sec: Some(MIB as f64),
            ..young_leaker
        };
        assert_eq!(policy().judge(&slow), Verdict::Keep, "min_lifetime guards");
        let no_hard_limit = RecyclePolicy {
            hard_limit: None,
            ..policy()
        };
        assert_eq!(no_hard_limit.judge(&young_leaker), Verdict::Keep);
        let mut measured = policy();
        measured.measured_load_time(Duration::from_millis(300));
        assert_eq!(measured.leak_horizon, Duration::from_millis(1300));
        assert_eq!(
            measured.judge(&young_leaker),
            Verdict::Keep,
            "290 + 60 x 1.3 < 400"
        );
    }

    #[test]
    fn max_requests_is_staggered_across_workers() {
        let thresholds: Vec<u64> = (1..=4).map(|id| stagger(1000, id, 4)).collect();
        assert_eq!(thresholds, vec![1125, 1250, 1375, 1000]);
        let policy = policy();
        let at = |id, served| {
            policy.judge(&WorkerFacts {
                id,
                requests_served: served,
                ..facts(0)
            })
        };
        assert_eq!(at(1, 1124), Verdict::Keep);
        assert_eq!(at(1, 1125), Verdict::Recycle(RetireReason::MaxRequests));
        assert_eq!(at(4, 1000), Verdict::Recycle(RetireReason::MaxRequests));
    }

    #[test]
    fn max_lifetime_is_staggered_too() {
        let policy = policy();
        let aged = |id, secs| {
            policy.judge(&WorkerFacts {
                id,
                age: Duration::from_secs(secs),
                ..facts(0)
            })
        };
        assert_eq!(aged(4, 3599), Verdict::Keep);
        assert_eq!(aged(4, 3600), Verdict::Recycle(RetireReason::MaxLifetime));
        assert_eq!(
            aged(2, 3600),
            Verdict::Keep,
            "worker 2 is staggered to 1.25×"
        );
        assert_eq!(aged(2, 4500), Verdict::Recycle(RetireReason::MaxLifetime));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_starts_back_off_exponentially_and_stay_bounded() {
        let start = Instant::now();
        let mut pacer = RestartPacer::new(5, Duration::from_secs(60), start);
        let mut spawns = 0;
        // Every start fails at once; count spawns over one minute.
        while start.elapsed() < Duration::from_secs(60) {
            if pacer.may_spawn(Instant::now()) {
                spawns += 1;
                pacer.start_failed("model missing".into(), Instant::now());
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(
            (8..=12).contains(&spawns),
            "{spawns} spawns in the first minute"
        );
        assert_eq!(pacer.last_error(), Some("model missing"));
        // Once at the cap, about two spawns a minute.
        let later = Instant::now();
        let mut more = 0;
        while later.elapsed() < Duration::from_secs(60) {
            if pacer.may_spawn(Instant::now()) {
                more += 1;
                pacer.start_failed("model missing".into(), Instant::now());
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!(more <= 3, "{more} spawns in a later minute");
        pacer.started();
        assert_eq!(pacer.failures_in_a_row(), 0);
        assert_eq!(pacer.last_error(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_slows_restarts_only_past_the_intensity() {
        let mut pacer = RestartPacer::new(3, Duration::from_secs(10), Instant::now());
        for _ in 0..3 {
            assert_eq!(pacer.unexpected_exit(Instant::now()), None);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(pacer.unexpected_exit(Instant::now()), Some(BACKOFF_BASE));
        assert!(!pacer.may_spawn(Instant::now()));
        assert_eq!(
            pacer.unexpected_exit(Instant::now()),
            Some(BACKOFF_BASE * 2)
        );
        // Outside the window, exits are forgiven.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(pacer.may_spawn(Instant::now()));
        assert_eq!(pacer.unexpected_exit(Instant::now()), None);
    }
}
