//! The worker pool: one task owns every worker's state, the request queue and
//! the counters, and reacts to four event sources in one `select!`: client
//! requests, worker socket events, SIGCHLD, and a 100 ms tick for deadlines.
//!
//! The never-hang invariant lives here. An accepted request is always in
//! exactly one place — the queue, or the `Busy` job of one worker — and
//! leaves it only by being answered. A worker's death is seen by EOF on its
//! socket or by waitpid, whichever comes first; either takes the job back
//! and re-queues it at the front, once. A request that was in flight at two
//! deaths is answered `worker_lost` (poison). Deadlines are checked on every
//! tick, queued or running.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_proto::{
    Counters, EmbedResult, PoolStatus, RequestError, WorkerConfig, WorkerEvent, WorkerStatus,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::process::{self, KillReason, RetireReason, WorkerEnd};
use crate::request::{Request, Responder};
use crate::worker::{IoEvent, Worker, WorkerState};

/// How often deadlines, stuck workers and missed reaps are checked.
const TICK: Duration = Duration::from_millis(100);
/// A worker asked to exit gets this long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A worker whose socket closed gets this long to exit before SIGKILL.
const LOST_GRACE: Duration = Duration::from_secs(2);
/// A request in flight at this many worker deaths is poison.
const MAX_DEATHS: u32 = 2;
/// First restart delay after a failed start; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Consecutive failed starts (with no worker Ready) after which requests are
/// answered `unavailable` instead of waiting.
const UNAVAILABLE_AFTER: u32 = 3;

/// A message from a client connection to the pool.
#[derive(Debug)]
pub enum PoolMsg {
    /// Embed `texts`.
    Embed {
        /// The texts.
        texts: Vec<String>,
        /// Client deadline, relative to arrival.
        deadline: Option<Duration>,
        /// Where the answer goes.
        responder: Responder,
    },
    /// Report status.
    Status {
        /// Where the answer goes.
        responder: Responder,
    },
}

/// Fatal pool failures (per-worker trouble is never fatal).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The SIGCHLD handler could not be installed.
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

/// Whether the pool takes new work.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Normal operation.
    Running,
    /// SIGTERM: no new requests; queued and running ones finish until
    /// `deadline`, then the workers are stopped.
    Draining {
        /// After this, remaining requests are answered `shutting_down`.
        deadline: Instant,
    },
}

/// Restart pacing after failed starts.
#[derive(Debug)]
struct StartupHealth {
    /// Failed starts since the last worker became Ready.
    consecutive_failures: u32,
    /// No spawn before this.
    next_spawn_at: Instant,
    /// Why the last start failed, for status and `unavailable` answers.
    last_error: Option<String>,
}

/// The pool task's state.
pub struct Pool {
    /// Daemon configuration.
    config: Arc<Config>,
    /// Workers by id, including those on their way out until reaped.
    workers: BTreeMap<u64, Worker>,
    /// Accepted requests waiting for a worker; retries go to the front.
    queue: VecDeque<Request>,
    /// Cumulative counters.
    counters: Counters,
    /// Next worker id.
    next_worker_id: u64,
    /// Next supervisor request id.
    next_request_id: u64,
    /// Given to each worker's IO task.
    io_events: mpsc::UnboundedSender<(u64, IoEvent)>,
    /// Restart pacing.
    startup: StartupHealth,
    /// Running or draining.
    phase: Phase,
    /// Pool start, for uptime.
    started: Instant,
}

impl Pool {
    /// Runs the pool until a drain completes: requests arrive on `requests`;
    /// `shutdown` starts the drain.
    pub async fn run(
        config: Arc<Config>,
        mut requests: mpsc::Receiver<PoolMsg>,
        shutdown: CancellationToken,
    ) -> Result<(), PoolError> {
        let mut sigchld = signal(SignalKind::child()).map_err(PoolError::Signal)?;
        let (io_events, mut io_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut pool = Pool {
            config,
            workers: BTreeMap::new(),
            queue: VecDeque::new(),
            counters: Counters::default(),
            next_worker_id: 1,
            next_request_id: 1,
            io_events,
            startup: StartupHealth {
                consecutive_failures: 0,
                next_spawn_at: now,
                last_error: None,
            },
            phase: Phase::Running,
            started: now,
        };
        pool.ensure_workers(now);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut requests_open = true;
        loop {
            tokio::select! {
                msg = requests.recv(), if requests_open => match msg {
                    Some(msg) => pool.handle_msg(msg, Instant::now()),
                    None => requests_open = false,
                },
                Some((worker_id, event)) = io_rx.recv() => pool.handle_io(worker_id, event, Instant::now()),
                _ = sigchld.recv() => pool.reap_all(Instant::now()),
                _ = tick.tick() => pool.on_tick(Instant::now()),
                _ = shutdown.cancelled(), if matches!(pool.phase, Phase::Running) => {
                    pool.begin_drain(Instant::now());
                }
            }
            if pool.drained() {
                info!("pool stopped");
                return Ok(());
            }
        }
    }

    fn handle_msg(&mut self, msg: PoolMsg, now: Instant) {
        match msg {
            PoolMsg::Status { responder } => responder.status(self.status(now)),
            PoolMsg::Embed {
                texts,
                deadline,
                responder,
            } => self.accept(texts, deadline, responder, now),
        }
    }

    fn accept(
        &mut self,
        texts: Vec<String>,
        deadline: Option<Duration>,
        responder: Responder,
        now: Instant,
    ) {
        let rejection = if let Phase::Draining { .. } = self.phase {
            Some(RequestError::ShuttingDown)
        } else if let Err(err) = self.config.limits().check(&texts) {
            Some(err)
        } else if self.queue.len() >= self.config.queue_capacity {
            Some(RequestError::Overloaded {
                capacity: self.config.queue_capacity as u32,
            })
        } else {
            self.unavailable()
                .map(|reason| RequestError::Unavailable { reason })
        };
        if let Some(error) = rejection {
            self.count_failure(&error);
            responder.embed(Err(error));
            return;
        }
        let deadline = now + deadline.unwrap_or_else(|| self.config.default_deadline());
        let request = Request::new(self.next_request_id, texts, now, deadline, responder);
        self.next_request_id += 1;
        self.counters.requests_accepted += 1;
        self.queue.push_back(request);
        self.dispatch(now);
    }

    /// Hands queued requests to idle workers, longest-idle first.
    fn dispatch(&mut self, now: Instant) {
        loop {
            let idle = self
                .workers
                .values()
                .filter_map(|w| match w.state() {
                    WorkerState::Ready { since } => Some((*since, w.id)),
                    _ => None,
                })
                .min();
            let Some((_, worker_id)) = idle else { return };
            let Some(request) = self.pop_runnable(now) else {
                return;
            };
            let Some(worker) = self.workers.get_mut(&worker_id) else {
                return;
            };
            debug!(
                worker_id,
                request_id = request.id,
                texts = request.texts.len(),
                bytes = request.text_bytes(),
                "dispatch"
            );
            if let Err(request) = worker.assign(request, now) {
                self.queue.push_front(request);
            }
        }
    }

    /// Next queued request worth running: drops those whose client left and
    /// answers those past their deadline.
    fn pop_runnable(&mut self, now: Instant) -> Option<Request> {
        while let Some(request) = self.queue.pop_front() {
            if request.responder.client_gone() {
                self.abandon(request);
                continue;
            }
            if now >= request.deadline {
                let elapsed_ms = now.duration_since(request.accepted).as_millis() as u64;
                self.finish(request, Err(RequestError::Timeout { elapsed_ms }), now);
                continue;
            }
            return Some(request);
        }
        None
    }

    fn handle_io(&mut self, worker_id: u64, event: IoEvent, now: Instant) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            // Already reaped and removed; its late events mean nothing.
            return;
        };
        let pid = worker.pid.as_raw();
        match event {
            IoEvent::Event(WorkerEvent::Ready {
                model,
                dims,
                load_ms,
            }) => {
                if worker.mark_ready(now) {
                    info!(worker_id, pid, %model, dims, load_ms, "worker ready");
                    self.startup.consecutive_failures = 0;
                    self.startup.last_error = None;
                } else {
                    warn!(
                        worker_id,
                        pid,
                        state = worker.state_name(),
                        "unexpected Ready; killing"
                    );
                    self.kill(worker_id, KillReason::ProtocolViolation, now);
                }
            }
            IoEvent::Event(WorkerEvent::LoadFailed { reason }) => {
                error!(worker_id, pid, %reason, "worker could not load the model");
                self.startup.last_error = Some(reason);
            }
            IoEvent::Event(WorkerEvent::Embedded { request_id, result }) => {
                self.complete(worker_id, request_id, Ok(result), now);
            }
            IoEvent::Event(WorkerEvent::Rejected { request_id, error }) => {
                self.complete(worker_id, request_id, Err(error), now);
            }
            IoEvent::Closed(Some(err)) if !err.is_disconnect() => {
                if worker.is_live() {
                    warn!(worker_id, pid, error = %err, "protocol error on worker socket; killing");
                    self.kill(worker_id, KillReason::ProtocolViolation, now);
                }
            }
            // EOF, reset or a cut-off frame: the worker died (or is dying);
            // waitpid will tell how.
            IoEvent::Closed(_) => {
                if let Some(request) = worker.lost(now) {
                    warn!(
                        worker_id,
                        pid, "worker closed its socket while running a request"
                    );
                    self.fail_over(request, worker_id, now);
                } else {
                    debug!(worker_id, pid, "worker socket closed");
                }
                self.ensure_workers(now);
            }
        }
        self.dispatch(now);
    }

    fn complete(
        &mut self,
        worker_id: u64,
        request_id: u64,
        result: Result<EmbedResult, RequestError>,
        now: Instant,
    ) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        match worker.complete(request_id, now) {
            Ok(Some(request)) => self.finish(request, result, now),
            // Answered already (its deadline passed while it ran).
            Ok(None) => {}
            Err(err) => {
                warn!(worker_id, pid = worker.pid.as_raw(), error = %err, "protocol violation; killing");
                self.kill(worker_id, KillReason::ProtocolViolation, now);
            }
        }
    }

    /// SIGKILLs a worker; its request (if any) is re-dispatched, except after
    /// a request timeout, where it is answered `timeout`.
    fn kill(&mut self, worker_id: u64, reason: KillReason, now: Instant) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        warn!(worker_id, pid = worker.pid.as_raw(), %reason, "killing worker");
        if let Some(request) = worker.kill(reason, now) {
            match reason {
                KillReason::RequestTimeout => {
                    let elapsed_ms = now.duration_since(request.accepted).as_millis() as u64;
                    self.finish(request, Err(RequestError::Timeout { elapsed_ms }), now);
                }
                KillReason::DrainDeadline => {
                    self.finish(request, Err(RequestError::ShuttingDown), now)
                }
                _ => self.fail_over(request, worker_id, now),
            }
        }
        self.ensure_workers(now);
    }

    /// The worker running `request` died: retry once, then quarantine.
    fn fail_over(&mut self, mut request: Request, worker_id: u64, now: Instant) {
        request.deaths += 1;
        if request.deaths >= MAX_DEATHS {
            self.counters.poison_rejections += 1;
            error!(
                worker_id,
                request_id = request.id,
                fingerprint = format!("{:016x}", request.fingerprint),
                texts = request.texts.len(),
                bytes = request.text_bytes(),
                deaths = request.deaths,
                "request was in flight at repeated worker deaths; quarantined as poison"
            );
            let deaths = request.deaths;
            self.finish(request, Err(RequestError::WorkerLost { deaths }), now);
        } else {
            self.counters.retries += 1;
            info!(
                worker_id,
                request_id = request.id,
                "re-dispatching the request of a dead worker"
            );
            self.queue.push_front(request);
        }
    }

    /// Reaps every worker that has exited.
    fn reap_all(&mut self, now: Instant) {
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for worker_id in ids {
            let Some(worker) = self.workers.get(&worker_id) else {
                continue;
            };
            let end = match process::try_reap(worker.pid) {
                Ok(None) => continue,
                Ok(Some(report)) => Some(WorkerEnd::classify(report, worker.intent())),
                Err(errno) => {
                    error!(worker_id, pid = worker.pid.as_raw(), %errno, "cannot wait for worker; forgetting it");
                    None
                }
            };
            let Some(mut worker) = self.workers.remove(&worker_id) else {
                continue;
            };
            self.on_exit(&mut worker, end, now);
        }
        self.ensure_workers(now);
        self.dispatch(now);
    }

    fn on_exit(&mut self, worker: &mut Worker, end: Option<WorkerEnd>, now: Instant) {
        let kind = end.map_or("unknown", |end| end.kind());
        *self
            .counters
            .worker_exits
            .entry(kind.to_owned())
            .or_default() += 1;
        let description = end.map_or_else(|| "unknown".to_owned(), |end| end.to_string());
        let age_s = now.duration_since(worker.spawned).as_secs_f64();
        let (worker_id, pid) = (worker.id, worker.pid.as_raw());
        match end {
            Some(WorkerEnd::Retired { .. }) => {
                info!(worker_id, pid, end = %description, kind, served = worker.requests_served, age_s, "worker exited")
            }
            _ => {
                warn!(worker_id, pid, end = %description, kind, served = worker.requests_served, age_s, "worker exited")
            }
        }
        if let Some(request) = worker.take_request() {
            self.fail_over(request, worker.id, now);
        }
        if worker.ready_at.is_none() && matches!(self.phase, Phase::Running) {
            let reason = self
                .startup
                .last_error
                .clone()
                .unwrap_or_else(|| format!("worker {description} before it was ready"));
            self.start_failed(reason, now);
        }
    }

    fn start_failed(&mut self, reason: String, now: Instant) {
        self.startup.consecutive_failures += 1;
        let exponent = self.startup.consecutive_failures.saturating_sub(1).min(16);
        let delay = BACKOFF_BASE.saturating_mul(1 << exponent).min(BACKOFF_MAX);
        self.startup.next_spawn_at = now + delay;
        error!(
            failures = self.startup.consecutive_failures,
            retry_in_ms = delay.as_millis() as u64,
            %reason,
            "worker failed to start"
        );
        self.startup.last_error = Some(reason);
        if let Some(reason) = self.unavailable() {
            while let Some(request) = self.queue.pop_front() {
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
    fn unavailable(&self) -> Option<String> {
        let serving = self
            .workers
            .values()
            .any(|w| matches!(w.state(), WorkerState::Ready { .. } | WorkerState::Busy(_)));
        if serving || self.startup.consecutive_failures < UNAVAILABLE_AFTER {
            return None;
        }
        Some(format!(
            "workers fail to start ({} attempts in a row): {}",
            self.startup.consecutive_failures,
            self.startup
                .last_error
                .as_deref()
                .unwrap_or("unknown reason")
        ))
    }

    /// Spawns workers up to the target, paced by the restart backoff.
    fn ensure_workers(&mut self, now: Instant) {
        if let Phase::Draining { .. } = self.phase {
            if self.queue.is_empty() {
                return;
            }
        }
        while self.workers.values().filter(|w| w.is_live()).count() < self.config.workers as usize {
            if now < self.startup.next_spawn_at {
                return;
            }
            let worker_id = self.next_worker_id;
            self.next_worker_id += 1;
            let spawned = process::spawn_worker(&self.config.worker_binary).and_then(|spawned| {
                Worker::start(
                    worker_id,
                    spawned,
                    self.worker_config(worker_id),
                    self.io_events.clone(),
                    now,
                )
            });
            match spawned {
                Ok(worker) => {
                    info!(worker_id, pid = worker.pid.as_raw(), "worker spawned");
                    self.counters.workers_spawned += 1;
                    self.workers.insert(worker_id, worker);
                }
                Err(err) => {
                    self.start_failed(inferd_proto::error_chain(&err), now);
                    return;
                }
            }
        }
    }

    fn worker_config(&self, worker_id: u64) -> WorkerConfig {
        WorkerConfig {
            worker_id,
            model_path: self.config.model.clone(),
            tokenizer_path: self.config.tokenizer.clone(),
            max_seq_len: self.config.max_seq_len,
            normalize: self.config.normalize,
            limits: self.config.limits(),
            chaos: self.config.chaos.clone(),
        }
    }

    fn on_tick(&mut self, now: Instant) {
        self.reap_all(now);
        self.enforce_worker_deadlines(now);
        self.expire_queued(now);
        if let Phase::Draining { deadline } = self.phase {
            self.drain_step(deadline, now);
        }
        self.ensure_workers(now);
        self.dispatch(now);
    }

    fn enforce_worker_deadlines(&mut self, now: Instant) {
        let request_timeout = self.config.request_timeout();
        let startup_timeout = self.config.startup_timeout();
        let mut kills = Vec::new();
        for worker in self.workers.values_mut() {
            let overdue = |since: Instant, limit: Duration| now.duration_since(since) > limit;
            match worker.state() {
                WorkerState::Busy(job) if overdue(job.started, request_timeout) => {
                    kills.push((worker.id, KillReason::RequestTimeout));
                }
                WorkerState::Starting { since } if overdue(*since, startup_timeout) => {
                    kills.push((worker.id, KillReason::StartupTimeout));
                }
                WorkerState::Stopping { since, .. } if overdue(*since, STOP_GRACE) => {
                    kills.push((worker.id, KillReason::DrainDeadline));
                }
                WorkerState::Lost { since } if overdue(*since, LOST_GRACE) => {
                    kills.push((worker.id, KillReason::SocketClosed));
                }
                _ => {}
            }
            // The client's deadline passed while the worker runs: answer now,
            // let the worker finish (its result is discarded).
            if let Some(job) = worker.job_mut() {
                if job.request.as_ref().is_some_and(|r| now >= r.deadline) {
                    if let Some(request) = job.request.take() {
                        let elapsed_ms = now.duration_since(request.accepted).as_millis() as u64;
                        count_failure(&mut self.counters, "timeout");
                        request
                            .responder
                            .embed(Err(RequestError::Timeout { elapsed_ms }));
                    }
                }
            }
        }
        for (worker_id, reason) in kills {
            self.kill(worker_id, reason, now);
        }
    }

    fn expire_queued(&mut self, now: Instant) {
        if !self
            .queue
            .iter()
            .any(|r| now >= r.deadline || r.responder.client_gone())
        {
            return;
        }
        let queued = std::mem::take(&mut self.queue);
        for request in queued {
            if now >= request.deadline {
                let elapsed_ms = now.duration_since(request.accepted).as_millis() as u64;
                self.finish(request, Err(RequestError::Timeout { elapsed_ms }), now);
            } else if request.responder.client_gone() {
                self.abandon(request);
            } else {
                self.queue.push_back(request);
            }
        }
    }

    fn begin_drain(&mut self, now: Instant) {
        let deadline = now + self.config.drain_timeout();
        info!(
            queued = self.queue.len(),
            busy = self.workers.values().filter(|w| w.is_busy()).count(),
            drain_timeout_ms = self.config.drain_timeout_ms,
            "draining: no new requests; finishing queued and running ones"
        );
        self.phase = Phase::Draining { deadline };
        self.drain_step(deadline, now);
    }

    /// One step of the drain: past the deadline, give up on remaining work;
    /// once no work is left, ask every worker to exit.
    fn drain_step(&mut self, deadline: Instant, now: Instant) {
        if now >= deadline {
            while let Some(request) = self.queue.pop_front() {
                self.finish(request, Err(RequestError::ShuttingDown), now);
            }
            let busy: Vec<u64> = self
                .workers
                .values()
                .filter(|w| w.is_busy())
                .map(|w| w.id)
                .collect();
            for worker_id in busy {
                self.kill(worker_id, KillReason::DrainDeadline, now);
            }
        }
        let working = self.workers.values().any(|w| w.is_busy());
        if self.queue.is_empty() && !working {
            for worker in self.workers.values_mut() {
                worker.retire(RetireReason::Shutdown, now);
            }
        }
    }

    fn drained(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. })
            && self.workers.is_empty()
            && self.queue.is_empty()
    }

    /// Sends the one answer for `request` and counts it.
    fn finish(
        &mut self,
        request: Request,
        result: Result<EmbedResult, RequestError>,
        now: Instant,
    ) {
        match &result {
            Ok(_) => self.counters.requests_ok += 1,
            Err(err) => self.count_failure(err),
        }
        debug!(
            request_id = request.id,
            ok = result.is_ok(),
            elapsed_us = now.duration_since(request.accepted).as_micros() as u64,
            "answered"
        );
        request.responder.embed(result);
    }

    /// Drops a queued request whose client disconnected: nobody to answer.
    fn abandon(&mut self, request: Request) {
        debug!(
            request_id = request.id,
            "client gone; dropping its queued request"
        );
        count_failure(&mut self.counters, "client_gone");
        request.responder.abandon();
    }

    fn count_failure(&mut self, error: &RequestError) {
        count_failure(&mut self.counters, error.kind());
    }

    fn status(&self, now: Instant) -> PoolStatus {
        PoolStatus {
            pid: std::process::id(),
            uptime_secs: now.duration_since(self.started).as_secs(),
            model: self.config.model.clone(),
            target_workers: self.config.workers,
            workers: self
                .workers
                .values()
                .map(|w| WorkerStatus {
                    id: w.id,
                    pid: w.pid.as_raw() as u32,
                    state: w.state_name().to_owned(),
                    rss_bytes: crate::memory::rss_bytes(w.pid),
                    requests_served: w.requests_served,
                    age_secs: now.duration_since(w.spawned).as_secs_f64(),
                })
                .collect(),
            queue_depth: self.queue.len() as u32,
            queue_capacity: self.config.queue_capacity as u32,
            unavailable_reason: self.unavailable(),
            counters: self.counters.clone(),
        }
    }
}

fn count_failure(counters: &mut Counters, kind: &str) {
    *counters.requests_failed.entry(kind.to_owned()).or_default() += 1;
}
