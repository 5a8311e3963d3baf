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
use std::time::Duration;

use inferd_proto::{
    Counters, ErrorKind, ExitKind, ExitRecord, PoolStatus, RequestError, RequestLimits, RollReport,
    RollState, WorkerConfig, WorkerEvent, WorkerStatus,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::cgroup::{self, Cgroups, Leaf};
use crate::config::Config;
use crate::connections::ConnectionLimits;
use crate::memory::{MemorySource, MemoryUsage};
use crate::notify::Notifier;
use crate::policy::{RecyclePolicy, RestartPacer, Verdict, WorkerFacts};
use crate::process::{self, KillReason, OomEvidence, RetireReason, WorkerEnd};
use crate::queue::{FairQueue, Measure};
use crate::request::{ClientKey, Outcome, Request, Responder, Task};
use crate::worker::{IoEvent, Worker, WorkerState};

/// How often deadlines, stuck workers and missed reaps are checked.
const TICK: Duration = Duration::from_millis(100);
/// A worker asked to exit (after its last request) gets this long before
/// SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// At stop, how long cgroup leaf removals still running may take.
const CLEANUP_GRACE: Duration = Duration::from_secs(2);
/// A worker whose socket closed gets this long to exit before SIGKILL.
const LOST_GRACE: Duration = Duration::from_secs(2);
/// A request in flight at this many worker deaths is poison.
const MAX_DEATHS: u32 = 2;
/// Worker exits kept for status.
const RECENT_EXITS: usize = 16;
/// Consecutive failed starts (with no worker Ready) after which requests are
/// answered `unavailable` instead of waiting.
const UNAVAILABLE_AFTER: u32 = 3;
/// New workers of a rolling restart that may fail to start, before any of
/// them was Ready, until the roll gives up.
const ROLL_START_ATTEMPTS: u32 = 3;

/// A message from a client connection to the pool.
#[derive(Debug)]
pub enum PoolMsg {
    /// Embed `texts`, or tokenize them (`task`).
    Embed {
        /// Who asks (the queue takes turns between clients).
        client: ClientKey,
        /// What is asked for the texts.
        task: Task,
        /// The texts.
        texts: Arc<[String]>,
        /// Client deadline, relative to arrival.
        deadline: Option<Duration>,
        /// Where the answer goes.
        responder: Responder,
        /// One of the connection's few places in the channel to the pool,
        /// given back when the pool takes the request (see
        /// [`crate::server`]).
        ticket: tokio::sync::OwnedSemaphorePermit,
    },
    /// Report status.
    Status {
        /// Where the answer goes.
        responder: Responder,
    },
    /// Report the counters as Prometheus text.
    Metrics {
        /// Where the answer goes.
        responder: Responder,
    },
    /// The client connection `conn` is gone: its queued requests are
    /// dropped unrun.
    Disconnected {
        /// The connection.
        conn: u64,
    },
    /// Start a rolling restart of every worker, with a new configuration
    /// (SIGHUP re-read the file) or the running one (`inferctl roll`).
    Roll {
        /// The configuration workers spawned from now on use.
        config: Option<Arc<Config>>,
        /// Answered when the roll is complete.
        responder: Option<Responder>,
    },
}

impl PoolMsg {
    /// Answers the request inside with `error` (the pool is gone).
    pub fn refuse(self, error: RequestError) {
        match self {
            Self::Embed { responder, .. }
            | Self::Status { responder }
            | Self::Metrics { responder } => responder.fail(error),
            Self::Roll { responder, .. } => {
                if let Some(responder) = responder {
                    responder.fail(error);
                }
            }
            Self::Disconnected { .. } => {}
        }
    }
}

/// A rolling restart in progress. Its configuration is a candidate until
/// one of its new workers is Ready: until then the pool keeps the running
/// configuration (crash replacements start from it), and if new workers
/// keep failing to start, the roll gives up and the old workers stay.
#[derive(Debug)]
struct RollProgress {
    /// Workers of an older generation are replaced.
    generation: u64,
    /// The configuration its new workers start from.
    candidate: Arc<Config>,
    /// One of its new workers was Ready: `candidate` is the pool's
    /// configuration now.
    proven: bool,
    /// Its new workers that ended before they were Ready, while unproven.
    failed_starts: u32,
    /// Old workers retired because their replacement was Ready.
    replaced: u32,
    /// `inferctl roll` callers waiting for it to finish.
    waiters: Vec<Responder>,
}

/// Fatal pool failures (per-worker trouble is never fatal).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The SIGCHLD handler could not be installed.
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

/// How much of a worker's memory a judgement reads.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// Everything the memory source gives (PSS and USS walk every mapping):
    /// on the memory check timer.
    Full,
    /// Resident bytes only (one `pread`): after every answer.
    Resident,
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

/// The pool's windows on the OS, injected so tests can replace them.
pub struct Seams {
    /// Where worker memory is read.
    pub memory: Box<dyn MemorySource>,
    /// Where worker cgroup leaves are made; `None`: no per-worker cgroups.
    pub cgroups: Option<Cgroups>,
    /// One line on the cgroup situation, for status.
    pub cgroup_summary: String,
    /// systemd's notification socket (a no-op outside systemd).
    pub notifier: Notifier,
    /// The client connection count and caps, for status and metrics.
    pub connections: Arc<ConnectionLimits>,
}

/// The pool task's state.
pub struct Pool {
    /// Daemon configuration: the one new workers start from, except the
    /// new workers of a roll that is not yet proven.
    config: Arc<Config>,
    /// The roll generation `config` came in with; workers started from it
    /// carry it.
    config_generation: u64,
    /// Workers by id, including those on their way out until reaped.
    workers: BTreeMap<u64, Worker>,
    /// Accepted requests waiting for a worker, fair between clients;
    /// retries go first.
    queue: FairQueue,
    /// Cumulative counters.
    counters: Counters,
    /// Next worker id.
    next_worker_id: u64,
    /// Next supervisor request id.
    next_request_id: u64,
    /// Given to each worker's IO task.
    io_events: mpsc::UnboundedSender<(u64, IoEvent)>,
    /// Restart pacing.
    pacer: RestartPacer,
    /// Recycle and kill decisions.
    policy: RecyclePolicy,
    /// Memory readings and cgroups.
    seams: Seams,
    /// Last periodic memory check.
    last_memory_check: Instant,
    /// Latest worker exits, newest last.
    recent_exits: VecDeque<ExitRecord>,
    /// The latest roll's generation; workers remember the generation of
    /// the configuration they started from.
    generation: u64,
    /// The rolling restart under way, if any.
    roll: Option<RollProgress>,
    /// How the last roll ended, for status.
    last_roll: Option<RollReport>,
    /// READY=1 was sent (once the first worker is Ready).
    announced_ready: bool,
    /// The last STATUS= line sent, to send only changes.
    last_status_line: String,
    /// Last WATCHDOG=1.
    last_watchdog: Instant,
    /// Running or draining.
    phase: Phase,
    /// Pool start, for uptime.
    started: Instant,
    /// Blocking clean-ups (cgroup leaf removal) running off the pool's
    /// thread; waited for, bounded, when the pool stops.
    cleanup: TaskTracker,
}

impl Pool {
    /// Runs the pool until a drain completes: requests arrive on `requests`;
    /// `shutdown` starts the drain.
    ///
    /// `hurry` cuts a drain short (a second SIGTERM): what is still queued
    /// or running is answered `shutting_down` at once and the workers are
    /// stopped. Messages still in `requests` when the pool stops are
    /// answered `shutting_down` too, never dropped.
    pub async fn run(
        config: Arc<Config>,
        seams: Seams,
        mut requests: mpsc::Receiver<PoolMsg>,
        shutdown: CancellationToken,
        hurry: CancellationToken,
    ) -> Result<(), PoolError> {
        let mut sigchld = signal(SignalKind::child()).map_err(PoolError::Signal)?;
        let (io_events, mut io_rx) = mpsc::unbounded_channel();
        let mut pool = Pool::new(config, seams, io_events, Instant::now());
        pool.ensure_workers(Instant::now());
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
                _ = hurry.cancelled(), if pool.may_hurry() => pool.hurry_drain(Instant::now()),
            }
            if pool.drained() {
                // Whatever connections sent meanwhile is answered, not
                // dropped: a dropped message would answer `internal`.
                requests.close();
                while let Ok(msg) = requests.try_recv() {
                    msg.refuse(RequestError::ShuttingDown);
                }
                pool.cleanup.close();
                if tokio::time::timeout(CLEANUP_GRACE, pool.cleanup.wait())
                    .await
                    .is_err()
                {
                    warn!(
                        "worker cgroup removal did not finish; the next start removes what is left"
                    );
                }
                info!("pool stopped");
                return Ok(());
            }
        }
    }

    /// A pool with no worker yet; `io_events` is what workers' IO tasks
    /// report on.
    fn new(
        config: Arc<Config>,
        seams: Seams,
        io_events: mpsc::UnboundedSender<(u64, IoEvent)>,
        now: Instant,
    ) -> Pool {
        Pool {
            workers: BTreeMap::new(),
            queue: FairQueue::new(),
            counters: Counters::default(),
            next_worker_id: 1,
            next_request_id: 1,
            io_events,
            pacer: RestartPacer::new(config.max_restarts, config.restart_period(), now),
            policy: RecyclePolicy::from_config(&config),
            seams,
            last_memory_check: now,
            recent_exits: VecDeque::new(),
            generation: 0,
            config_generation: 0,
            roll: None,
            last_roll: None,
            announced_ready: false,
            last_status_line: String::new(),
            last_watchdog: now,
            phase: Phase::Running,
            started: now,
            cleanup: TaskTracker::new(),
            config,
        }
    }

    fn handle_msg(&mut self, msg: PoolMsg, now: Instant) {
        match msg {
            PoolMsg::Status { responder } => responder.status(self.status(now)),
            PoolMsg::Metrics { responder } => {
                responder.metrics(crate::metrics::render(&self.status(now)))
            }
            PoolMsg::Embed {
                client,
                task,
                texts,
                deadline,
                responder,
                ticket,
            } => {
                drop(ticket);
                self.accept(client, task, texts, deadline, responder, now)
            }
            PoolMsg::Disconnected { conn } => {
                for request in self.queue.remove_connection(conn) {
                    self.abandon(request);
                }
            }
            PoolMsg::Roll { config, responder } => self.begin_roll(config, responder, now),
        }
    }

    /// Starts (or restarts) a rolling restart: every worker spawned before
    /// now is replaced through the recycle pipeline. A roll that begins
    /// while another runs supersedes it; workers the first one already
    /// started stay, only older ones are replaced, each once.
    fn begin_roll(
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
        self.seams.notifier.reloading();
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
    fn advance_roll(&mut self, now: Instant) {
        let Some(roll) = &self.roll else { return };
        let generation = roll.generation;
        let stale: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.generation < generation && (w.is_live() || w.has_job()))
            .map(|w| w.id)
            .collect();
        // Complete only when the old workers are gone, not just retiring.
        let waiting = self
            .workers
            .values()
            .any(|w| w.replaces.is_some() || w.generation < generation);
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
                self.announced_ready = true;
                self.seams.notifier.ready(&self.status_line());
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
    fn prove_roll(&mut self, generation: u64, worker_id: u64) {
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

    fn commit_config(&mut self, config: Arc<Config>, generation: u64) {
        self.policy = RecyclePolicy::from_config(&config);
        self.config = config;
        self.config_generation = generation;
    }

    /// A new worker of generation `generation` ended before it was Ready:
    /// too many of those before the roll is proven, and the roll gives up.
    fn roll_start_failed(&mut self, generation: u64, reason: &str, now: Instant) {
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
    fn fail_roll(&mut self, reason: &str, now: Instant) {
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
        self.seams
            .notifier
            .ready(&format!("roll failed, old workers serving: {reason}"));
        for waiter in roll.waiters {
            waiter.fail(RequestError::RollFailed {
                reason: reason.to_owned(),
            });
        }
    }

    /// The limits a request must meet: the configuration's, narrowed by
    /// those of every worker still running that was started with other
    /// limits (after a reload, until the roll has replaced them), so that
    /// no worker can refuse or fail to read a request the pool admitted.
    fn request_limits(&self) -> RequestLimits {
        self.workers
            .values()
            .filter(|w| w.is_live())
            .fold(self.config.limits(), |limits, w| limits.narrowest(w.limits))
    }

    fn accept(
        &mut self,
        client: ClientKey,
        task: Task,
        texts: Arc<[String]>,
        deadline: Option<Duration>,
        responder: Responder,
        now: Instant,
    ) {
        let rejection = if let Phase::Draining { .. } = self.phase {
            Some(RequestError::ShuttingDown)
        } else if let Err(err) = self.request_limits().check(&texts) {
            Some(err)
        } else {
            self.unavailable()
                .map(|reason| RequestError::Unavailable { reason })
        };
        if let Some(error) = rejection {
            self.counters.requests_rejected += 1;
            self.count_failure(&error);
            responder.fail(error);
            return;
        }
        let deadline = now + deadline.unwrap_or_else(|| self.config.default_deadline());
        let request = Request::new(
            self.next_request_id,
            client,
            task,
            texts,
            now,
            deadline,
            responder,
        );
        self.next_request_id += 1;
        if !self.make_room(&request, now) {
            self.counters.requests_rejected += 1;
            let error = self.overloaded();
            self.count_failure(&error);
            request.responder.fail(error);
            return;
        }
        self.counters.requests_accepted += 1;
        self.queue.push(request);
        self.dispatch(now);
    }

    /// Makes room in a full queue (by count or by bytes) for `request`:
    /// pushes out the newest requests of heavier clients. False when the
    /// newcomer is the heaviest and must be refused itself.
    fn make_room(&mut self, request: &Request, now: Instant) -> bool {
        let budget = self.config.max_queued_bytes.as_u64();
        loop {
            let measure = if self.queue.len() >= self.config.queue_capacity {
                Measure::Count
            } else if self.queue.bytes() + request.bytes > budget {
                Measure::Bytes
            } else {
                return true;
            };
            let weight = match measure {
                Measure::Count => 1,
                Measure::Bytes => request.bytes,
            };
            let Some(victim) = self.queue.evict_for(request.client, weight, measure) else {
                return false;
            };
            debug!(
                request_id = victim.id,
                for_request = request.id,
                ?measure,
                "queue full: pushing out the heaviest client's newest request"
            );
            let error = self.overloaded();
            self.finish(victim, Err(error), now);
        }
    }

    fn overloaded(&self) -> RequestError {
        RequestError::Overloaded {
            capacity: self.config.queue_capacity as u32,
        }
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
                bytes = request.bytes,
                "dispatch"
            );
            if let Err(request) = worker.assign(request, now) {
                self.queue.push_front(*request);
            }
        }
    }

    /// Next queued request worth running: drops those whose client left and
    /// answers those past their deadline.
    fn pop_runnable(&mut self, now: Instant) -> Option<Request> {
        while let Some(request) = self.queue.pop() {
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
                    self.pacer.started();
                    let replaces = worker.replaces.take();
                    let generation = worker.generation;
                    self.prove_roll(generation, worker_id);
                    if let Some((old_id, reason)) = replaces {
                        self.hand_over(old_id, worker_id, reason, now);
                    }
                    if !self.announced_ready && self.roll.is_none() {
                        // The socket is bound before the pool starts, so
                        // this is the moment the daemon can serve.
                        self.announced_ready = true;
                        self.seams.notifier.ready(&self.status_line());
                    }
                } else {
                    warn!(
                        worker_id,
                        pid,
                        state = %worker.state_kind(),
                        "unexpected Ready; killing"
                    );
                    self.kill(worker_id, KillReason::ProtocolViolation, now);
                }
            }
            IoEvent::Event(WorkerEvent::LoadFailed { reason }) => {
                error!(worker_id, pid, %reason, "worker could not load the model");
                worker.load_error = Some(reason);
            }
            IoEvent::Event(WorkerEvent::Embedded { request_id, result }) => {
                self.complete(worker_id, request_id, Ok(Outcome::Embedded(result)), now);
            }
            IoEvent::Event(WorkerEvent::Tokenized { request_id, result }) => {
                self.complete(worker_id, request_id, Ok(Outcome::Tokenized(result)), now);
            }
            IoEvent::Event(WorkerEvent::Rejected { request_id, error }) => {
                self.complete(worker_id, request_id, Err(error), now);
            }
            IoEvent::Closed(Some(err)) if !err.is_disconnect() => {
                // A draining worker still holds a request: killing it now
                // retries that request instead of leaving it to time out.
                if worker.is_live() || worker.has_job() {
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
        result: Result<Outcome, RequestError>,
        now: Instant,
    ) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        match worker.complete(request_id, now) {
            Ok(Some(request)) => {
                self.finish(request, result, now);
                self.judge_worker(worker_id, Reading::Resident, now);
            }
            // Answered already (its deadline passed while it ran).
            Ok(None) => self.judge_worker(worker_id, Reading::Resident, now),
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
                bytes = request.bytes,
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
            self.queue.push_retry(request);
        }
    }

    /// Reaps every worker that has exited.
    fn reap_all(&mut self, now: Instant) {
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for worker_id in ids {
            let Some(worker) = self.workers.get(&worker_id) else {
                continue;
            };
            let report = match process::try_reap(worker.pid) {
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

    fn on_exit(&mut self, worker: &mut Worker, end: Option<WorkerEnd>, now: Instant) {
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
        if let Some((old_id, reason)) = worker.replaces {
            warn!(worker_id, old_worker_id = old_id, %reason, "replacement died before it was ready; recycle abandoned");
        }
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
                None => info!(
                    worker_id,
                    pid, "worker killed from outside while starting; starting another"
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

    fn start_failed(&mut self, reason: String, now: Instant) {
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
    fn unavailable(&self) -> Option<String> {
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

    /// Spawns workers up to the target, paced by the restart backoff.
    fn ensure_workers(&mut self, now: Instant) {
        if let Phase::Draining { .. } = self.phase {
            if self.queue.is_empty() {
                return;
            }
        }
        while self.workers.values().filter(|w| w.is_live()).count() < self.config.workers as usize {
            if !self.pacer.may_spawn(now) || self.spawn(None, now).is_none() {
                return;
            }
        }
    }

    /// Starts one worker (in its own cgroup leaf where possible); `replaces`
    /// marks it as the replacement in a recycle. Returns its id.
    /// A replacement during a roll starts from the roll's configuration;
    /// any other worker from the pool's.
    fn spawn(&mut self, replaces: Option<(u64, RetireReason)>, now: Instant) -> Option<u64> {
        let (config, generation) = match &self.roll {
            Some(roll) if replaces.is_some() => (Arc::clone(&roll.candidate), roll.generation),
            _ => (Arc::clone(&self.config), self.config_generation),
        };
        let worker_id = self.next_worker_id;
        self.next_worker_id += 1;
        let spawned = match process::spawn_worker(&config.worker_binary) {
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
        info!(worker_id, pid = pid.as_raw(), cgroup = ?worker.leaf.as_ref().map(Leaf::path), "worker spawned");
        worker.replaces = replaces;
        worker.generation = generation;
        self.counters.workers_spawned += 1;
        self.workers.insert(worker_id, worker);
        Some(worker_id)
    }

    fn place_in_cgroup(
        &self,
        worker_id: u64,
        pid: nix::unistd::Pid,
        config: &Config,
    ) -> Option<Leaf> {
        let cgroups = self.seams.cgroups.as_ref()?;
        let limit = config.hard_limit?.as_u64();
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

    /// Reads one worker's memory (`reading`) and acts on the policy's
    /// verdict.
    fn judge_worker(&mut self, worker_id: u64, reading: Reading, now: Instant) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        if !worker.is_serving() && !worker.has_job() {
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
        let facts = WorkerFacts {
            id: worker.id,
            age: now.duration_since(worker.spawned),
            requests_served: worker.requests_served,
            memory_bytes: worker.memory.and_then(|usage| self.policy.figure(usage)),
            stale: self
                .roll
                .as_ref()
                .is_some_and(|r| worker.generation < r.generation),
        };
        let serving = worker.is_serving();
        let has_leaf = worker.leaf.is_some();
        let being_replaced = self
            .workers
            .values()
            .any(|w| w.replaces.is_some_and(|(old, _)| old == worker_id));
        match self.policy.judge(&facts) {
            Verdict::Keep => {}
            // A worker in its own cgroup has the kernel enforce the hard
            // limit with exact accounting (RSS also counts shared file pages
            // charged elsewhere); procfs polling is the fallback.
            Verdict::Kill(KillReason::HardLimit) if has_leaf => {}
            Verdict::Kill(reason) => {
                warn!(worker_id, memory_bytes = ?facts.memory_bytes, hard_limit = ?self.policy.hard_limit, "worker over its hard memory limit");
                self.kill(worker_id, reason, now);
            }
            Verdict::Recycle(reason) if serving && !being_replaced => {
                self.start_recycle(worker_id, reason, now);
            }
            Verdict::Recycle(_) => {}
        }
    }

    /// Spawns a replacement for `old_id` if the recycle limit allows; the old
    /// worker keeps serving until the replacement is Ready ([`Pool::hand_over`]).
    fn start_recycle(&mut self, old_id: u64, reason: RetireReason, now: Instant) {
        if !matches!(self.phase, Phase::Running) || !self.pacer.may_spawn(now) {
            return;
        }
        let in_progress = self
            .workers
            .values()
            .filter(|w| {
                w.replaces.is_some()
                    || matches!(w.intent(), process::Intent::Retire(r) if r != RetireReason::Shutdown)
            })
            .count();
        if in_progress >= self.config.max_concurrent_recycles as usize {
            return;
        }
        if let Some(new_id) = self.spawn(Some((old_id, reason)), now) {
            if let Some(trigger) = reason.trigger() {
                *self.counters.recycles.entry(trigger).or_default() += 1;
            }
            let old = self.workers.get(&old_id);
            info!(
                worker_id = old_id,
                pid = old.map(|w| w.pid.as_raw()),
                %reason,
                replacement_id = new_id,
                memory_bytes = ?old.and_then(|w| w.memory).map(|m| m.rss_bytes),
                requests_served = old.map(|w| w.requests_served),
                "recycling worker: replacement spawned"
            );
        }
    }

    /// The replacement is Ready: the old worker stops taking work, finishes
    /// its request and exits.
    fn hand_over(&mut self, old_id: u64, new_id: u64, reason: RetireReason, now: Instant) {
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

    fn on_tick(&mut self, now: Instant) {
        self.reap_all(now);
        self.enforce_worker_deadlines(now);
        self.expire_queued(now);
        if now.duration_since(self.last_memory_check) >= self.config.memory_check_interval() {
            self.last_memory_check = now;
            let ids: Vec<u64> = self.workers.keys().copied().collect();
            for worker_id in ids {
                self.judge_worker(worker_id, Reading::Full, now);
            }
        }
        self.advance_roll(now);
        if let Phase::Draining { deadline } = self.phase {
            self.drain_step(deadline, now);
        }
        self.retire_surplus(now);
        self.ensure_workers(now);
        self.dispatch(now);
        self.report_to_systemd(now);
    }

    /// STATUS= when the summary changed; WATCHDOG=1 while healthy (workers
    /// can be started), so systemd restarts a daemon stuck unable to serve.
    fn report_to_systemd(&mut self, now: Instant) {
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
    fn status_line(&self) -> String {
        let ready = self.workers.values().filter(|w| w.is_serving()).count();
        let recycles: u64 = self.counters.recycles.values().sum();
        let oom: u64 = self
            .counters
            .worker_exits
            .iter()
            .filter(|(kind, _)| kind.is_oom())
            .map(|(_, n)| n)
            .sum();
        let mut line = format!(
            "{ready}/{} workers ready, {recycles} recycles, {oom} OOM kills, queue {}",
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

    /// After a reload lowered `workers`: retire idle workers, one per tick,
    /// until the pool is back at its target (replacements under way do not
    /// count; they take over another worker's place).
    fn retire_surplus(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let established = self
            .workers
            .values()
            .filter(|w| w.is_live() && w.replaces.is_none())
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

    fn enforce_worker_deadlines(&mut self, now: Instant) {
        let request_timeout = self.config.request_timeout();
        let startup_timeout = self.config.startup_timeout();
        let recycle_drain = self.config.recycle_drain_timeout();
        let mut kills = Vec::new();
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
                    if let Some(request) = job.request.take() {
                        let elapsed_ms = now.duration_since(request.accepted).as_millis() as u64;
                        count_failure(&mut self.counters, ErrorKind::Timeout);
                        request.responder.fail(RequestError::Timeout { elapsed_ms });
                    }
                }
            }
        }
        for (worker_id, reason) in kills {
            self.kill(worker_id, reason, now);
        }
    }

    fn expire_queued(&mut self, now: Instant) {
        let done = |r: &Request| now >= r.deadline || r.responder.client_gone();
        if !self.queue.any(done) {
            return;
        }
        for request in self.queue.take_where(done) {
            if now >= request.deadline {
                let elapsed_ms = now.duration_since(request.accepted).as_millis() as u64;
                self.finish(request, Err(RequestError::Timeout { elapsed_ms }), now);
            } else {
                self.abandon(request);
            }
        }
    }

    fn begin_drain(&mut self, now: Instant) {
        let deadline = now + self.config.drain_timeout();
        info!(
            queued = self.queue.len(),
            running = self.workers.values().filter(|w| w.has_job()).count(),
            drain_timeout_ms = self.config.drain_timeout_ms,
            "draining: no new requests; finishing queued and running ones"
        );
        self.phase = Phase::Draining { deadline };
        self.seams.notifier.stopping();
        if let Some(roll) = self.roll.take() {
            for waiter in roll.waiters {
                waiter.fail(RequestError::ShuttingDown);
            }
        }
        self.drain_step(deadline, now);
    }

    /// A drain whose deadline is still ahead can be cut short.
    fn may_hurry(&self) -> bool {
        matches!(self.phase, Phase::Draining { deadline } if deadline > Instant::now())
    }

    /// Cuts the drain short: its deadline is now.
    fn hurry_drain(&mut self, now: Instant) {
        warn!(
            queued = self.queue.len(),
            running = self.workers.values().filter(|w| w.has_job()).count(),
            "second stop signal: cutting the drain short"
        );
        self.phase = Phase::Draining { deadline: now };
        self.drain_step(now, now);
    }

    /// One step of the drain: past the deadline, give up on remaining work;
    /// once no work is left, ask every worker to exit.
    fn drain_step(&mut self, deadline: Instant, now: Instant) {
        if now >= deadline {
            while let Some(request) = self.queue.pop() {
                self.finish(request, Err(RequestError::ShuttingDown), now);
            }
            let running: Vec<u64> = self
                .workers
                .values()
                .filter(|w| w.has_job())
                .map(|w| w.id)
                .collect();
            for worker_id in running {
                self.kill(worker_id, KillReason::DrainDeadline, now);
            }
        }
        let working = self.workers.values().any(Worker::has_job);
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
    fn finish(&mut self, request: Request, result: Result<Outcome, RequestError>, now: Instant) {
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
        match result {
            Ok(outcome) => {
                let timing = request.timing(now);
                request.responder.answer(outcome, timing);
            }
            Err(error) => request.responder.fail(error),
        }
    }

    /// Drops a queued request whose client disconnected, unrun: nobody
    /// would read the answer, and a client that gave up and retries must
    /// not double the load.
    fn abandon(&mut self, request: Request) {
        debug!(
            request_id = request.id,
            conn = request.client.conn,
            "client gone; dropping its queued request"
        );
        self.counters.requests_abandoned += 1;
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
                        replaces: w.replaces.map(|(old, _)| old),
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
            counters: Counters {
                connections_refused: self.seams.connections.refused(),
                ..self.counters.clone()
            },
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

fn worker_config(config: &Config, worker_id: u64) -> WorkerConfig {
    WorkerConfig {
        worker_id,
        model_path: config.model.clone(),
        tokenizer_path: config.tokenizer.clone(),
        max_seq_len: config.max_seq_len,
        normalize: config.normalize,
        limits: config.limits(),
        max_frame_bytes: config.limits().worker_frame_bytes(config.max_seq_len),
        chaos: config.chaos.clone(),
    }
}

fn count_failure(counters: &mut Counters, kind: ErrorKind) {
    *counters.requests_failed.entry(kind).or_default() += 1;
}

#[cfg(test)]
mod tests {
    use inferd_proto::ServerMessage;

    use super::*;
    use crate::connections::ConnectionLimits;
    use crate::memory::ProcfsMemory;

    /// A configuration whose workers can never start (no such binary): the
    /// pool runs with no worker at all.
    fn workerless_config() -> Arc<Config> {
        Arc::new(Config {
            model: "/nonexistent/model.onnx".into(),
            tokenizer: "/nonexistent/tokenizer.json".into(),
            worker_binary: "/nonexistent/inferd-worker".into(),
            ..Config::default()
        })
    }

    fn test_seams() -> Seams {
        Seams {
            memory: Box::new(ProcfsMemory::new(false)),
            cgroups: None,
            cgroup_summary: "off (test)".into(),
            notifier: Notifier::disabled(),
            connections: ConnectionLimits::new(16, 16),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn messages_still_queued_when_the_pool_stops_are_answered_shutting_down() {
        let (pool_tx, pool_rx) = mpsc::channel(256);
        let (answers_tx, mut answers) = mpsc::unbounded_channel();
        for id in 0..200 {
            let responder = Responder::new(id, answers_tx.clone());
            let msg = if id % 2 == 0 {
                PoolMsg::Status { responder }
            } else {
                PoolMsg::Metrics { responder }
            };
            pool_tx.try_send(msg).expect("room in the channel");
        }
        drop(answers_tx);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let run = Pool::run(
            workerless_config(),
            test_seams(),
            pool_rx,
            shutdown,
            CancellationToken::new(),
        );
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("a pool with no worker stops at once when told to")
            .expect("pool ran");
        // The pool stopped while `pool_tx` is still open: whatever it did
        // not handle must have been answered all the same.
        let (mut served, mut refused) = (0, 0);
        while let Some(answer) = answers.recv().await {
            match answer {
                ServerMessage::Status { .. } | ServerMessage::Metrics { .. } => served += 1,
                ServerMessage::Error {
                    error: RequestError::ShuttingDown,
                    ..
                } => refused += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(served + refused, 200, "every message answered once");
        assert!(
            refused > 0,
            "the pool stopped before it had handled all 200 messages"
        );
        assert!(pool_tx.is_closed(), "the pool closed its end");
    }

    /// A pool whose workers are `sh` scripts that sleep: real processes
    /// that never speak the protocol, moved through states by hand.
    fn pool_of_sleepers(dir: &std::path::Path) -> Pool {
        let script = dir.join("sleeper");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = Config {
            worker_binary: script,
            ..(*workerless_config()).clone()
        };
        let (io_events, _io_rx) = mpsc::unbounded_channel();
        Pool::new(Arc::new(config), test_seams(), io_events, Instant::now())
    }

    fn queued_request(pool: &mut Pool, now: Instant) -> Request {
        let client = ClientKey {
            tenant: crate::request::Tenant::Uid(0),
            conn: 1,
        };
        Request::new(
            pool.next_request_id,
            client,
            Task::Embed,
            vec!["text".to_owned()].into(),
            now,
            now + Duration::from_secs(60),
            Responder::detached(1),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_protocol_error_from_a_draining_worker_retries_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = pool_of_sleepers(dir.path());
        let now = Instant::now();
        let worker_id = pool.spawn(None, now).expect("spawned");
        let request = queued_request(&mut pool, now);
        let worker = pool.workers.get_mut(&worker_id).unwrap();
        assert!(worker.mark_ready(now));
        worker.assign(request, now).expect("assigned");
        worker.retire(RetireReason::Roll, now);
        assert!(matches!(worker.state(), WorkerState::Draining { .. }));
        let pid = worker.pid;

        let garbage = inferd_proto::ProtoError::FrameTooLarge {
            len: 1 << 30,
            max: 1 << 24,
        };
        pool.handle_io(worker_id, IoEvent::Closed(Some(garbage)), now);

        let worker = &pool.workers[&worker_id];
        assert!(
            matches!(
                worker.state(),
                WorkerState::Killed {
                    reason: KillReason::ProtocolViolation,
                    ..
                }
            ),
            "the draining worker is killed: {:?}",
            worker.state()
        );
        assert_eq!(pool.queue.len(), 1, "its request waits for another worker");
        assert_eq!(pool.counters.retries, 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process::try_reap(pid).unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the sleeper was not killed"
            );
            tokio::task::yield_now().await;
        }
    }
}
