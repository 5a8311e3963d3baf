//! Automatic limits and hot spares, as the pool runs them.
//!
//! **Limits.** The configuration's limits are resolved by
//! [`crate::limits::derive`]. What is "auto" waits for the first worker of
//! a configuration to be Ready: its memory is the baseline, the limits are
//! derived from it and from the memory available, logged, and applied to
//! the policy and to every worker's cgroup leaf (leaves are created
//! unlimited until then). A roll's configuration is derived again from
//! its first new worker.
//!
//! **Spares.** Up to the resolved spare count, loaded and warmed workers
//! wait in state `Spare` and take no requests. When a worker dies (or is
//! killed) one is promoted at once, and when a worker is recycled a spare
//! takes its place at once instead of a replacement that must load first;
//! either way a new spare starts behind it.

use super::*;

/// What a new worker is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spawn {
    /// A missing worker (start-up, a death with no spare to promote).
    Fill,
    /// The replacement in a recycle (loads next to the worker it replaces).
    Replacement,
    /// A spare.
    Spare,
}

impl Pool {
    /// Worker `worker_id` is Ready: its load time sets the leak horizon,
    /// and if the limits wait for a baseline, its memory is that baseline.
    pub(super) fn on_worker_ready(&mut self, worker_id: u64, now: Instant) {
        let Some(worker) = self.workers.get(&worker_id) else {
            return;
        };
        self.policy
            .measured_load_time(now.duration_since(worker.spawned));
        if !self.limits.pending || worker.generation != self.config_generation {
            return;
        }
        let baseline = self
            .seams
            .memory
            .usage(worker.pid)
            .and_then(|usage| self.policy.figure(usage));
        if let Some(baseline) = baseline {
            self.resolve_limits(Some(baseline));
        }
    }

    /// Resolves the configuration's limits and spare count (with a
    /// baseline, or waiting for one), and applies them.
    pub(super) fn resolve_limits(&mut self, baseline: Option<u64>) {
        // Only a baseline makes the budget count.
        let budget = baseline.and_then(|_| MemoryBudget::read());
        let derived = limits::derive(&self.config, baseline, budget.as_ref());
        let mib = |bytes: Option<u64>| bytes.map(|b| b >> 20);
        if derived.pending {
            info!(origin = %derived.origin, "memory limits");
        } else {
            info!(
                soft_limit_mib = ?mib(derived.soft),
                hard_limit_mib = ?mib(derived.hard),
                spare_workers = derived.spares,
                origin = %derived.origin,
                "memory limits"
            );
        }
        if derived.tight {
            warn!(
                baseline_mib = ?baseline.map(|b| b >> 20),
                hard_limit_mib = ?mib(derived.hard),
                workers = self.config.workers,
                "the memory available leaves each worker little room above its baseline: \
                 lower `workers` or give the service more memory"
            );
        }
        let horizon = self.policy.leak_horizon;
        self.policy = RecyclePolicy::new(&self.config, &derived);
        self.policy.leak_horizon = horizon;
        self.limits = derived;
        self.apply_leaf_limits();
    }

    /// Sets the hard limit on every worker's cgroup leaf, except where the
    /// worker already holds more (lowering the limit under it would make
    /// the kernel OOM-kill it; the policy recycles it instead).
    fn apply_leaf_limits(&self) {
        let Some(limit) = self.leaf_limit(&self.config) else {
            return;
        };
        for worker in self.workers.values() {
            let Some(leaf) = &worker.leaf else { continue };
            let holds = worker.memory.map_or(0, |m| m.rss_bytes);
            if limit.is_some_and(|limit| holds >= limit) {
                warn!(
                    worker_id = worker.id,
                    rss_mib = holds >> 20,
                    "worker already above the new hard limit; its cgroup keeps the old one"
                );
                continue;
            }
            if let Err(err) = leaf.set_limit(limit) {
                warn!(worker_id = worker.id, error = %inferd_proto::error_chain(&err), "cannot set the worker's cgroup limit");
            }
        }
    }

    /// The limit a worker started from `config` gets in its leaf:
    /// `Some(None)` is a leaf without a limit (yet), `None` no leaf at all
    /// (`hard_limit = "off"`: there is nothing for it to enforce).
    pub(super) fn leaf_limit(&self, config: &Config) -> Option<Option<u64>> {
        match config.hard_limit {
            LimitSetting::Off => None,
            LimitSetting::Fixed(bytes) => Some(Some(bytes.as_u64())),
            LimitSetting::Auto => Some(self.limits.hard),
        }
    }

    /// Spares wanted now: none while draining.
    fn target_spares(&self) -> usize {
        match self.phase {
            Phase::Running => self.limits.spares as usize,
            Phase::Draining { .. } => 0,
        }
    }

    /// Promotes a spare to take a missing worker's place: a loaded one if
    /// there is one, else one still starting. Returns whether there was one.
    pub(super) fn promote_spare(&mut self, now: Instant) -> bool {
        let pick = self
            .workers
            .values()
            .filter(|w| w.is_live() && w.spare)
            .max_by_key(|w| (w.is_ready_spare(), std::cmp::Reverse(w.spawned)))
            .map(|w| w.id);
        let Some(spare_id) = pick else { return false };
        self.promote(spare_id, now);
        true
    }

    /// Spare `spare_id` takes requests from now on (once loaded).
    pub(super) fn promote(&mut self, spare_id: u64, now: Instant) {
        if let Some(spare) = self.workers.get_mut(&spare_id) {
            info!(
                worker_id = spare_id,
                pid = spare.pid.as_raw(),
                loaded = spare.is_ready_spare(),
                "promoting a spare"
            );
            spare.promote(now);
            self.counters.spares_promoted += 1;
        }
    }

    /// A loaded spare of the configuration in force (not one a roll is
    /// about to replace), for a recycle to promote.
    pub(super) fn ready_spare(&self) -> Option<u64> {
        let current = self
            .roll
            .as_ref()
            .map_or(self.config_generation, |roll| roll.generation);
        self.workers
            .values()
            .find(|w| w.is_ready_spare() && w.generation >= current)
            .map(|w| w.id)
    }

    /// Starts spares up to the target, and retires surplus ones (a reload
    /// lowered the count).
    pub(super) fn ensure_spares(&mut self, now: Instant) {
        let spares: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.is_live() && w.spare)
            .map(|w| w.id)
            .collect();
        let target = self.target_spares();
        for &surplus in spares.iter().skip(target) {
            if let Some(worker) = self.workers.get_mut(&surplus) {
                info!(worker_id = surplus, target, "retiring a surplus spare");
                worker.retire(RetireReason::SpareSurplus, now);
            }
        }
        for _ in spares.len()..target {
            if !self.pacer.may_spawn(now) || self.spawn(Spawn::Spare, now).is_none() {
                return;
            }
        }
    }
}
