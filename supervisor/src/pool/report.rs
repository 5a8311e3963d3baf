//! What the pool tells the outside: the status snapshot (`inferctl
//! status`, `/metrics`) and every systemd notification — this is the one
//! place that talks to systemd.

use super::*;

impl Pool {
    /// `READY=1`: the daemon serves (first worker Ready), or a reload is
    /// over (roll complete).
    pub(super) fn announce_ready(&mut self) {
        self.announced_ready = true;
        let line = self.status_line();
        self.seams.notifier.ready(&line);
    }

    /// `READY=1` with `status` instead of the pool summary: a reload ended
    /// without its new configuration (systemd waits for READY=1 after every
    /// reload).
    pub(super) fn announce_ready_with(&mut self, status: &str) {
        self.announced_ready = true;
        self.seams.notifier.ready(status);
    }

    /// `RELOADING=1`: a roll begins.
    pub(super) fn announce_reloading(&self) {
        self.seams.notifier.reloading();
    }

    /// `RELOADING=1` then `READY=1` saying why: SIGHUP found a
    /// configuration it cannot use, and nothing changes.
    pub(super) fn announce_reload_refused(&mut self, reason: &str) {
        self.announce_reloading();
        self.announce_ready_with(&format!("reload failed: {reason}"));
    }

    /// `STOPPING=1`: the drain begins.
    pub(super) fn announce_stopping(&self) {
        self.seams.notifier.stopping();
    }

    /// STATUS= when the summary changed; WATCHDOG=1 while healthy (workers
    /// can be started), so systemd restarts a daemon stuck unable to serve.
    pub(super) fn report_to_systemd(&mut self, now: Instant) {
        if !self.seams.notifier.is_enabled() {
            return;
        }
        let line = self.status_line();
        if line != self.last_status_line {
            self.seams.notifier.status(&line);
            self.last_status_line = line;
        }
        if let Some(interval) = self.seams.notifier.watchdog_interval() {
            if now.duration_since(self.last_watchdog) >= interval && self.unavailable().is_none() {
                self.seams.notifier.watchdog();
                self.last_watchdog = now;
            }
        }
    }

    /// One line for systemd's STATUS=: workers ready/total, recycles, OOM kills.
    pub(super) fn status_line(&self) -> String {
        let ready = self.workers.values().filter(|w| w.is_serving()).count();
        let recycles: u64 = self.counters.recycles.values().sum();
        let oom: u64 = self
            .counters
            .worker_exits
            .iter()
            .filter(|(kind, _)| kind.is_oom())
            .map(|(_, n)| n)
            .sum();
        let spares = self.workers.values().filter(|w| w.is_ready_spare()).count();
        let mut line = format!(
            "{ready}/{} workers ready, {spares} spare, {recycles} recycles, {oom} OOM kills, queue {}",
            self.config.workers,
            self.queue.len()
        );
        if let Some(reason) = self.unavailable() {
            line = format!("UNAVAILABLE: {reason}");
        } else if self.roll.is_some() {
            line.push_str(", rolling");
        } else if let Some(RollReport {
            state: RollState::Failed { reason },
            ..
        }) = &self.last_roll
        {
            line.push_str(&format!(", last roll failed: {reason}"));
        }
        line
    }

    pub(super) fn status(&self, now: Instant) -> PoolStatus {
        PoolStatus {
            pid: std::process::id(),
            uptime_secs: now.duration_since(self.started).as_secs(),
            model: self.config.model.clone(),
            target_workers: self.config.workers,
            workers: self
                .workers
                .values()
                .map(|w| {
                    let memory = w.memory.or_else(|| self.seams.memory.usage(w.pid));
                    WorkerStatus {
                        id: w.id,
                        pid: w.pid.as_raw() as u32,
                        state: w.state_kind(),
                        rss_bytes: memory.map(|m| m.rss_bytes),
                        pss_bytes: memory.and_then(|m| m.pss_bytes),
                        uss_bytes: memory.and_then(|m| m.uss_bytes),
                        requests_served: w.requests_served,
                        age_secs: now.duration_since(w.spawned).as_secs_f64(),
                        cgroup: w.leaf.as_ref().map(|l| l.path().display().to_string()),
                        replaces: self
                            .recycles
                            .iter()
                            .find(|r| r.replacement == w.id && r.stage == RecycleStage::Loading)
                            .map(|r| r.old),
                        spare: w.spare,
                        growth_bytes_per_sec: w.history.growth_per_sec(),
                    }
                })
                .collect(),
            queue_depth: self.queue.len() as u32,
            queue_capacity: self.config.queue_capacity as u32,
            queued_bytes: self.queue.bytes(),
            queued_bytes_budget: self.config.max_queued_bytes.as_u64(),
            connections: self.seams.connections.open(),
            max_connections: self.seams.connections.max(),
            unavailable_reason: self.unavailable(),
            soft_limit_bytes: self.policy.soft_limit,
            hard_limit_bytes: self.policy.hard_limit,
            limits_origin: self.limits.origin.clone(),
            target_spares: self.limits.spares,
            cgroups: self.seams.cgroup_summary.clone(),
            recent_exits: self.recent_exits.iter().cloned().collect(),
            roll: self
                .roll
                .as_ref()
                .map(|roll| RollReport {
                    generation: roll.generation,
                    replaced: roll.replaced,
                    state: RollState::Running {
                        proven: roll.proven,
                    },
                })
                .or_else(|| self.last_roll.clone()),
            chaos: self.config.chaos.describe(),
            recycles: self
                .recycles
                .iter()
                .filter_map(|r| {
                    Some(RecycleReport {
                        old_worker: r.old,
                        replacement: r.replacement,
                        trigger: r.reason.trigger()?,
                        age_secs: now.duration_since(r.started).as_secs_f64(),
                        stage: r.stage,
                    })
                })
                .collect(),
            counters: Counters {
                connections_refused: self.seams.connections.refused(),
                ..self.counters.clone()
            },
        }
    }
}
