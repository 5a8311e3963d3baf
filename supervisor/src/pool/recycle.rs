//! The recycle and roll pipeline: the memory and age policy's verdicts
//! after every answer and on the timer, a replacement spawned for a worker
//! to recycle (one at a time by default) and the old worker retired only
//! once its replacement is Ready, and rolling restarts — whose
//! configuration stays a candidate until one new worker is Ready, and
//! which give up cleanly when new workers keep failing to start.

use super::*;

/// One recycle under way: a replacement spawned for an old worker, which
/// serves until the replacement is Ready (`Loading`), then finishes its
/// request and exits (`HandedOver`). The record ends when the old worker is
/// reaped, or fails when the replacement ends before it was Ready.
#[derive(Debug)]
pub(super) struct Recycle {
    /// The worker being replaced.
    pub(super) old: u64,
    /// Its replacement.
    pub(super) replacement: u64,
    /// Why.
    pub(super) reason: RetireReason,
    /// When the replacement was spawned.
    pub(super) started: Instant,
    /// Where it stands.
    pub(super) stage: RecycleStage,
}

/// A rolling restart in progress. Its configuration is a candidate until
/// one of its new workers is Ready: until then the pool keeps the running
/// configuration (crash replacements start from it), and if new workers
/// keep failing to start, the roll gives up and the old workers stay.
#[derive(Debug)]
pub(super) struct RollProgress {
    /// Workers of an older generation are replaced.
    pub(super) generation: u64,
    /// The configuration its new workers start from.
    pub(super) candidate: Arc<Config>,
    /// One of its new workers was Ready: `candidate` is the pool's
    /// configuration now.
    pub(super) proven: bool,
    /// Its new workers that ended before they were Ready, while unproven.
    pub(super) failed_starts: u32,
    /// Old workers retired because their replacement was Ready.
    pub(super) replaced: u32,
    /// `inferctl roll` callers waiting for it to finish.
    pub(super) waiters: Vec<Responder>,
}

impl Pool {
    /// Starts (or restarts) a rolling restart: every worker spawned before
    /// now is replaced through the recycle pipeline. A roll that begins
    /// while another runs supersedes it; workers the first one already
    /// started stay, only older ones are replaced, each once.
    pub(super) fn begin_roll(
        &mut self,
        config: Option<Arc<Config>>,
        responder: Option<Responder>,
        now: Instant,
    ) {
        if !matches!(self.phase, Phase::Running) {
            if let Some(responder) = responder {
                responder.fail(RequestError::ShuttingDown);
            }
            return;
        }
        // `inferctl roll` during a SIGHUP's roll keeps that roll's config.
        let previous = self.roll.take();
        let candidate = config
            .or_else(|| previous.as_ref().map(|r| Arc::clone(&r.candidate)))
            .unwrap_or_else(|| Arc::clone(&self.config));
        let (mut waiters, replaced) = previous.map_or((Vec::new(), 0), |r| (r.waiters, r.replaced));
        waiters.extend(responder);
        self.generation += 1;
        let to_replace = self.workers.values().filter(|w| w.is_live()).count();
        info!(
            generation = self.generation,
            workers = to_replace,
            "rolling restart begins"
        );
        self.announce_reloading();
        self.roll = Some(RollProgress {
            generation: self.generation,
            candidate,
            proven: false,
            failed_starts: 0,
            replaced,
            waiters,
        });
        self.advance_roll(now);
    }

    /// Moves a roll along: judge the workers it still has to replace, and
    /// finish it once none is left.
    pub(super) fn advance_roll(&mut self, now: Instant) {
        let Some(roll) = &self.roll else { return };
        let generation = roll.generation;
        let stale: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.generation < generation && (w.is_live() || w.has_job()))
            .map(|w| w.id)
            .collect();
        // Complete only when the old workers are gone, not just retiring.
        let waiting =
            !self.recycles.is_empty() || self.workers.values().any(|w| w.generation < generation);
        if !waiting {
            if let Some(roll) = self.roll.take() {
                let replaced = roll.replaced;
                info!(generation, replaced, "rolling restart complete");
                if !roll.proven {
                    // Nothing was replaced (no worker was live): the new
                    // configuration is what workers start from now.
                    self.commit_config(roll.candidate, generation);
                }
                self.last_roll = Some(RollReport {
                    generation,
                    replaced,
                    state: RollState::Done,
                });
                self.announce_ready();
                for waiter in roll.waiters {
                    waiter.rolled(replaced);
                }
            }
            return;
        }
        for worker_id in stale {
            self.judge_worker(worker_id, Reading::Resident, now);
        }
    }

    /// A new worker of generation `generation` is Ready: if it is the first
    /// of the roll under way, the roll's configuration is proven and in
    /// force from now on.
    pub(super) fn prove_roll(&mut self, generation: u64, worker_id: u64) {
        let Some(roll) = &mut self.roll else { return };
        if roll.proven || generation != roll.generation {
            return;
        }
        roll.proven = true;
        let candidate = Arc::clone(&roll.candidate);
        info!(
            worker_id,
            generation, "a new worker is Ready: the roll's configuration is in force"
        );
        self.commit_config(candidate, generation);
    }

    /// `config` is the pool's from now on; what it leaves "auto" is
    /// derived again from the first worker started from it.
    pub(super) fn commit_config(&mut self, config: Arc<Config>, generation: u64) {
        self.config = config;
        self.config_generation = generation;
        self.resolve_limits(None);
    }

    /// A new worker of generation `generation` ended before it was Ready:
    /// too many of those before the roll is proven, and the roll gives up.
    pub(super) fn roll_start_failed(&mut self, generation: u64, reason: &str, now: Instant) {
        let Some(roll) = &mut self.roll else { return };
        if roll.proven || generation != roll.generation {
            return;
        }
        roll.failed_starts += 1;
        if roll.failed_starts >= ROLL_START_ATTEMPTS {
            self.fail_roll(reason, now);
        }
    }

    /// Gives up on the roll: its replacements still loading are killed, the
    /// old workers keep serving with the running configuration, and
    /// everyone who waits for it hears why (systemd included).
    pub(super) fn fail_roll(&mut self, reason: &str, now: Instant) {
        let Some(roll) = self.roll.take() else { return };
        error!(
            generation = roll.generation,
            attempts = roll.failed_starts,
            %reason,
            "rolling restart failed: its new workers cannot start; the old workers keep serving"
        );
        let loading: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.generation == roll.generation && w.is_live())
            .map(|w| w.id)
            .collect();
        for worker_id in loading {
            self.kill(worker_id, KillReason::RollFailed, now);
        }
        self.last_roll = Some(RollReport {
            generation: roll.generation,
            replaced: roll.replaced,
            state: RollState::Failed {
                reason: reason.to_owned(),
            },
        });
        self.announce_ready_with(&format!("roll failed, old workers serving: {reason}"));
        for waiter in roll.waiters {
            waiter.fail(RequestError::RollFailed {
                reason: reason.to_owned(),
            });
        }
    }

    /// Reads one worker's memory (`reading`) and acts on the policy's
    /// verdict.
    pub(super) fn judge_worker(&mut self, worker_id: u64, reading: Reading, now: Instant) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        if !worker.is_serving() && !worker.has_job() && !worker.is_ready_spare() {
            return;
        }
        // One procfs read per judgement, kept for status too.
        if self.policy.watches_memory() {
            worker.memory = match reading {
                Reading::Full => self.seams.memory.usage(worker.pid),
                // PSS and USS stay as the last timer read them.
                Reading::Resident => {
                    self.seams
                        .memory
                        .resident_bytes(worker.pid)
                        .map(|rss_bytes| MemoryUsage {
                            rss_bytes,
                            ..worker.memory.unwrap_or_default()
                        })
                }
            };
        }
        let memory_bytes = worker.memory.and_then(|usage| self.policy.figure(usage));
        if let Some(bytes) = memory_bytes {
            worker.history.record(now, bytes);
        }
        // Above the soft limit a large request's peak is no excuse: judge
        // growth on a short span there, to catch leaks that would reach the
        // hard limit before the usual span is complete.
        let above_soft = self
            .policy
            .soft_limit
            .zip(memory_bytes)
            .is_some_and(|(soft, bytes)| bytes > soft);
        let span = if above_soft {
            growth::SHORT_SPAN
        } else {
            growth::MIN_SPAN
        };
        let facts = WorkerFacts {
            id: worker.id,
            age: now.duration_since(worker.spawned),
            requests_served: worker.requests_served,
            memory_bytes,
            growth_per_sec: worker.history.growth_over(span),
            in_own_cgroup: worker.leaf.is_some(),
            stale: self
                .roll
                .as_ref()
                .is_some_and(|r| worker.generation < r.generation),
        };
        let serving = worker.is_serving();
        let spare = worker.is_ready_spare();
        let being_replaced = self.recycles.iter().any(|r| r.old == worker_id);
        match self.policy.judge(&facts) {
            Verdict::Keep => {}
            Verdict::Kill(reason) => {
                warn!(worker_id, memory_bytes = ?facts.memory_bytes, hard_limit = ?self.policy.hard_limit, "worker over its hard memory limit");
                self.kill(worker_id, reason, now);
            }
            Verdict::Recycle(reason) if serving && !being_replaced => {
                self.start_recycle(worker_id, reason, now);
            }
            // A spare serves no one: it is retired, and a new one (from
            // the configuration in force) starts behind it.
            Verdict::Recycle(reason) if spare => {
                if let Some(worker) = self.workers.get_mut(&worker_id) {
                    info!(worker_id, %reason, "retiring a spare");
                    worker.retire(reason, now);
                }
                self.ensure_workers(now);
            }
            Verdict::Recycle(_) => {}
        }
    }

    /// Spawns a replacement for `old_id` if the recycle limit allows; the old
    /// worker keeps serving until the replacement is Ready ([`Pool::hand_over`]).
    pub(super) fn start_recycle(&mut self, old_id: u64, reason: RetireReason, now: Instant) {
        if !matches!(self.phase, Phase::Running) || !self.pacer.may_spawn(now) {
            return;
        }
        // Replacements loading, and old workers on their way out.
        let loading = self
            .recycles
            .iter()
            .filter(|r| r.stage == RecycleStage::Loading)
            .count();
        let retiring = self
            .workers
            .values()
            .filter(
                |w| matches!(w.intent(), process::Intent::Retire(r) if r != RetireReason::Shutdown),
            )
            .count();
        let in_progress = loading + retiring;
        if in_progress >= self.config.max_concurrent_recycles as usize {
            return;
        }
        // A loaded spare takes over at once; otherwise a replacement loads.
        let promoted = self.ready_spare();
        let new_id = match promoted {
            Some(spare_id) => Some(spare_id),
            None => self.spawn(Spawn::Replacement, now),
        };
        if let Some(new_id) = new_id {
            self.recycles.push(Recycle {
                old: old_id,
                replacement: new_id,
                reason,
                started: now,
                stage: RecycleStage::Loading,
            });
            if let Some(trigger) = reason.trigger() {
                *self.counters.recycles.entry(trigger).or_default() += 1;
            }
            let old = self.workers.get(&old_id);
            info!(
                worker_id = old_id,
                pid = old.map(|w| w.pid.as_raw()),
                %reason,
                replacement_id = new_id,
                spare = promoted.is_some(),
                memory_bytes = ?old.and_then(|w| w.memory).map(|m| m.rss_bytes),
                requests_served = old.map(|w| w.requests_served),
                "recycling worker"
            );
            if promoted.is_some() {
                self.promote(new_id, now);
                self.hand_over(new_id, now);
                self.ensure_workers(now);
            }
        }
    }

    /// Worker `new_id` is Ready: if it is a replacement, the old worker
    /// stops taking work, finishes its request and exits.
    pub(super) fn hand_over(&mut self, new_id: u64, now: Instant) {
        let Some(recycle) = self
            .recycles
            .iter_mut()
            .find(|r| r.replacement == new_id && r.stage == RecycleStage::Loading)
        else {
            return;
        };
        recycle.stage = RecycleStage::HandedOver;
        let (old_id, reason) = (recycle.old, recycle.reason);
        match self.workers.get_mut(&old_id) {
            Some(old) if old.is_serving() => {
                info!(worker_id = old_id, pid = old.pid.as_raw(), replacement_id = new_id, %reason, "replacement ready; retiring worker");
                old.retire(reason, now);
                if let Some(roll) = &mut self.roll {
                    if old.generation < roll.generation {
                        roll.replaced += 1;
                    }
                }
            }
            _ => debug!(
                worker_id = old_id,
                replacement_id = new_id,
                "replaced worker already gone"
            ),
        }
    }

    /// Worker `worker_id` is a replacement still loading.
    pub(super) fn is_loading_replacement(&self, worker_id: u64) -> bool {
        self.recycles
            .iter()
            .any(|r| r.replacement == worker_id && r.stage == RecycleStage::Loading)
    }

    /// Worker `worker` ended: a recycle it was the replacement of, still
    /// loading, failed (the old worker serves on, and is judged again); one
    /// it was the old worker of is over.
    pub(super) fn end_recycles_of(&mut self, worker: &Worker) {
        let worker_id = worker.id;
        let mut failed = Vec::new();
        self.recycles.retain(|r| {
            if r.replacement == worker_id && r.stage == RecycleStage::Loading {
                failed.push((r.old, r.reason));
                return false;
            }
            r.old != worker_id
        });
        for (old_id, reason) in failed {
            warn!(worker_id, old_worker_id = old_id, %reason, "replacement died before it was ready; recycle abandoned");
            if let Some(trigger) = reason.trigger() {
                *self.counters.recycles_failed.entry(trigger).or_default() += 1;
            }
        }
    }

    /// After a reload lowered `workers`: retire idle workers, one per tick,
    /// until the pool is back at its target (replacements under way do not
    /// count; they take over another worker's place).
    pub(super) fn retire_surplus(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let established = self
            .workers
            .values()
            .filter(|w| w.is_active() && !self.is_loading_replacement(w.id))
            .count();
        if established <= self.config.workers as usize {
            return;
        }
        let idle = self
            .workers
            .values_mut()
            .filter(|w| matches!(w.state(), WorkerState::Ready { .. }))
            .min_by_key(|w| w.spawned);
        if let Some(worker) = idle {
            info!(
                worker_id = worker.id,
                pid = worker.pid.as_raw(),
                target = self.config.workers,
                "retiring a surplus worker"
            );
            worker.retire(RetireReason::Roll, now);
        }
    }
}
