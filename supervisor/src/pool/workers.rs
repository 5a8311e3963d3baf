//! Worker processes: spawning (into a cgroup leaf where there is one),
//! SIGKILL, reaping and classifying each exit, replacing what is missing
//! under the restart pacer, and the per-worker deadlines (request,
//! startup, drain, stop, lost socket).

use super::*;

impl Pool {
    /// SIGKILLs a worker; its request (if any) is re-dispatched, except after
    /// a request timeout, where it is answered `timeout`.
    pub(super) fn kill(&mut self, worker_id: u64, reason: KillReason, now: Instant) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        warn!(worker_id, pid = worker.pid.as_raw(), %reason, "killing worker");
        if let Err(err) = self.seams.processes.kill(worker.pid) {
            warn!(worker_id, pid = worker.pid.as_raw(), error = %err, "SIGKILL failed");
        }
        if let Some(request) = worker.killed(reason, now) {
            match reason {
                KillReason::RequestTimeout => self.time_out(request, now),
                // Only a shutdown gives up on the request; a recycle's drain
                // deadline retries it like any other death.
                KillReason::DrainDeadline if matches!(self.phase, Phase::Draining { .. }) => {
                    self.finish(request, Err(RequestError::ShuttingDown), now)
                }
                _ => self.fail_over(request, worker_id, now),
            }
        }
        self.ensure_workers(now);
    }

    /// Reaps every worker that has exited.
    pub(super) fn reap_all(&mut self, now: Instant) {
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for worker_id in ids {
            let Some(worker) = self.workers.get(&worker_id) else {
                continue;
            };
            let report = match self.seams.processes.try_reap(worker.pid) {
                Ok(None) => continue,
                Ok(Some(report)) => Some(report),
                Err(errno) => {
                    error!(worker_id, pid = worker.pid.as_raw(), %errno, "cannot wait for worker; forgetting it");
                    None
                }
            };
            let Some(mut worker) = self.workers.remove(&worker_id) else {
                continue;
            };
            self.seams.memory.forget(worker.pid);
            let end = report
                .map(|report| WorkerEnd::classify(report, worker.intent(), oom_evidence(&worker)));
            self.on_exit(&mut worker, end, now);
            if let Some(leaf) = worker.leaf.take() {
                // rmdir waits (up to 500 ms) for the kernel to let go of the
                // exited process: not on the pool's thread.
                self.cleanup.spawn_blocking(move || {
                    if let Err(err) = leaf.remove() {
                        warn!(worker_id, error = %inferd_proto::error_chain(&err), "cannot remove the worker's cgroup");
                    }
                });
            }
        }
        self.ensure_workers(now);
        self.dispatch(now);
    }

    pub(super) fn on_exit(&mut self, worker: &mut Worker, end: Option<WorkerEnd>, now: Instant) {
        let kind = end.map_or(ExitKind::Unknown, |end| end.kind());
        *self.counters.worker_exits.entry(kind).or_default() += 1;
        let description = end.map_or_else(|| "unknown".to_owned(), |end| end.to_string());
        let age_s = now.duration_since(worker.spawned).as_secs_f64();
        let (worker_id, pid, served) = (worker.id, worker.pid.as_raw(), worker.requests_served);
        let rss_mib = worker.memory.map(|m| m.rss_bytes >> 20);
        if matches!(end, Some(WorkerEnd::Retired { .. })) {
            info!(worker_id, pid, end = %description, %kind, served, age_s, "worker exited");
        } else {
            warn!(worker_id, pid, end = %description, %kind, served, age_s, last_rss_mib = ?rss_mib, "worker exited");
        }
        if self.recent_exits.len() == RECENT_EXITS {
            self.recent_exits.pop_front();
        }
        self.recent_exits.push_back(ExitRecord {
            worker_id,
            pid: pid as u32,
            kind,
            description: description.clone(),
            requests_served: served,
            age_secs: age_s,
            uptime_at_exit_secs: now.duration_since(self.started).as_secs_f64(),
        });
        if let Some(request) = worker.take_request() {
            self.fail_over(request, worker.id, now);
        }
        self.end_recycles_of(worker);
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        if worker.ready_at.is_none() {
            // Only evidence that starting cannot work counts towards
            // "unavailable"; a kill from outside is followed by a new start
            // at once.
            let failure = match worker.load_error.take() {
                Some(reason) => Some(reason),
                None if end.is_none_or(|end| end.is_failed_start()) => {
                    Some(format!("worker {description} before it was ready"))
                }
                None => None,
            };
            match failure {
                Some(reason) => {
                    self.start_failed(reason.clone(), now);
                    self.roll_start_failed(worker.generation, &reason, now);
                }
                // Killed from outside, or by us (a failed roll's
                // replacement): says nothing about the next start.
                None => info!(
                    worker_id,
                    pid,
                    end = %description,
                    "worker ended while starting, not by a failure of its own"
                ),
            }
        } else if end.is_some_and(|end| end.is_crash()) {
            if let Some(delay) = self.pacer.unexpected_exit(now) {
                error!(
                    max_restarts = self.config.max_restarts,
                    period_s = self.config.restart_period_secs,
                    retry_in_ms = delay.as_millis() as u64,
                    "workers keep dying: slowing restarts down"
                );
            }
        }
    }

    pub(super) fn start_failed(&mut self, reason: String, now: Instant) {
        let delay = self.pacer.start_failed(reason.clone(), now);
        error!(
            failures = self.pacer.failures_in_a_row(),
            retry_in_ms = delay.as_millis() as u64,
            %reason,
            "worker failed to start"
        );
        if let Some(reason) = self.unavailable() {
            while let Some(request) = self.queue.pop() {
                self.finish(
                    request,
                    Err(RequestError::Unavailable {
                        reason: reason.clone(),
                    }),
                    now,
                );
            }
        }
    }

    /// Why the pool cannot serve now, if workers keep failing to start.
    pub(super) fn unavailable(&self) -> Option<String> {
        let serving = self.workers.values().any(Worker::is_serving);
        if serving || self.pacer.failures_in_a_row() < UNAVAILABLE_AFTER {
            return None;
        }
        Some(format!(
            "workers fail to start ({} attempts in a row): {}",
            self.pacer.failures_in_a_row(),
            self.pacer.last_error().unwrap_or("unknown reason")
        ))
    }

    /// Brings the pool to its target: a missing worker's place goes to a
    /// spare at once where there is one, else to a new worker (paced by
    /// the restart backoff); then spares are started up to theirs.
    pub(super) fn ensure_workers(&mut self, now: Instant) {
        if let Phase::Draining { .. } = self.phase {
            if self.queue.is_empty() {
                return;
            }
        }
        while self.workers.values().filter(|w| w.is_active()).count() < self.config.workers as usize
        {
            if self.promote_spare(now) {
                continue;
            }
            if !self.pacer.may_spawn(now) || self.spawn(Spawn::Fill, now).is_none() {
                return;
            }
        }
        self.ensure_spares(now);
    }

    /// Starts one worker (in its own cgroup leaf where possible), for
    /// `purpose`. Returns its id. During a roll, replacements and spares
    /// start from the roll's configuration (a spare of the old one would
    /// only be replaced again); any other worker from the pool's.
    pub(super) fn spawn(&mut self, purpose: Spawn, now: Instant) -> Option<u64> {
        let (config, generation) = match &self.roll {
            Some(roll) if purpose != Spawn::Fill => (Arc::clone(&roll.candidate), roll.generation),
            _ => (Arc::clone(&self.config), self.config_generation),
        };
        let worker_id = self.next_worker_id;
        self.next_worker_id += 1;
        let spawned = match self.seams.processes.spawn(&config.worker_binary) {
            Ok(spawned) => spawned,
            Err(err) => {
                self.start_failed(inferd_proto::error_chain(&err), now);
                return None;
            }
        };
        let pid = spawned.pid;
        // Into the leaf before the Start frame: the model's pages must be
        // charged to the worker's own cgroup.
        let leaf = self.place_in_cgroup(worker_id, pid, &config);
        let mut worker = Worker::start(
            worker_id,
            spawned,
            leaf,
            worker_config(&config, worker_id),
            self.io_events.clone(),
            now,
        );
        info!(worker_id, pid = pid.as_raw(), cgroup = ?worker.leaf.as_ref().map(Leaf::path), ?purpose, "worker spawned");
        worker.generation = generation;
        worker.spare = purpose == Spawn::Spare;
        self.counters.workers_spawned += 1;
        self.workers.insert(worker_id, worker);
        Some(worker_id)
    }

    pub(super) fn place_in_cgroup(
        &self,
        worker_id: u64,
        pid: nix::unistd::Pid,
        config: &Config,
    ) -> Option<Leaf> {
        let cgroups = self.seams.cgroups.as_ref()?;
        let limit = self.leaf_limit(config)?;
        // The supervisor pid keeps leaves of daemons sharing a parent apart.
        let name = format!("inferd-{}-worker-{worker_id}", std::process::id());
        let placed = cgroups
            .create_leaf(&name, limit)
            .and_then(|leaf| leaf.add_process(pid).map(|()| leaf));
        match placed {
            Ok(leaf) => Some(leaf),
            Err(err) => {
                warn!(worker_id, error = %inferd_proto::error_chain(&err), "cannot place worker in its own cgroup; relying on procfs limits");
                None
            }
        }
    }

    pub(super) fn enforce_worker_deadlines(&mut self, now: Instant) {
        let request_timeout = self.config.request_timeout();
        let startup_timeout = self.config.startup_timeout();
        let recycle_drain = self.config.recycle_drain_timeout();
        let mut kills = Vec::new();
        let mut late = Vec::new();
        for worker in self.workers.values_mut() {
            let overdue = |since: Instant, limit: Duration| now.duration_since(since) > limit;
            let kill = match worker.state() {
                WorkerState::Busy(job) | WorkerState::Draining { job, .. }
                    if overdue(job.started, request_timeout) =>
                {
                    Some(KillReason::RequestTimeout)
                }
                WorkerState::Draining { since, .. } if overdue(*since, recycle_drain) => {
                    Some(KillReason::DrainDeadline)
                }
                WorkerState::Starting { since } if overdue(*since, startup_timeout) => {
                    Some(KillReason::StartupTimeout)
                }
                WorkerState::Stopping { since, .. } if overdue(*since, STOP_GRACE) => {
                    Some(KillReason::DrainDeadline)
                }
                WorkerState::Lost { since } if overdue(*since, LOST_GRACE) => {
                    Some(KillReason::SocketClosed)
                }
                _ => None,
            };
            if let Some(reason) = kill {
                kills.push((worker.id, reason));
            }
            // The client's deadline passed while the worker runs: answer now,
            // let the worker finish (its result is discarded).
            if let Some(job) = worker.job_mut() {
                if job.request.as_ref().is_some_and(|r| now >= r.deadline) {
                    late.extend(job.request.take());
                }
            }
        }
        for request in late {
            self.time_out(request, now);
        }
        for (worker_id, reason) in kills {
            self.kill(worker_id, reason, now);
        }
    }
}

/// What the OOM counters say about a reaped worker: its own cgroup's counter
/// if it had one, else whether the host's rose during its life.
fn oom_evidence(worker: &Worker) -> OomEvidence {
    if let Some(leaf) = &worker.leaf {
        return match leaf.oom_kills() {
            Ok(kills) if kills > worker.leaf_oom_kills_at_spawn => OomEvidence::CgroupCounter,
            Ok(_) => OomEvidence::None,
            Err(err) => {
                warn!(worker_id = worker.id, error = %inferd_proto::error_chain(&err), "cannot read the cgroup OOM counter");
                OomEvidence::None
            }
        };
    }
    match (worker.host_oom_kills_at_spawn, cgroup::host_oom_kills()) {
        (Some(before), Some(after)) if after > before => OomEvidence::HostCounter,
        _ => OomEvidence::None,
    }
}

pub(super) fn worker_config(config: &Config, worker_id: u64) -> WorkerConfig {
    WorkerConfig {
        worker_id,
        model_path: config.model.clone(),
        tokenizer_path: config.tokenizer.clone(),
        max_seq_len: config.max_seq_len,
        normalize: config.normalize,
        warm_up: config.warm_up,
        trim_memory: config.trim_memory,
        max_batch_texts: config.max_batch_texts(),
        limits: config.limits(),
        max_frame_bytes: config.limits().worker_frame_bytes(config.max_seq_len),
        chaos: config.chaos.clone(),
    }
}
