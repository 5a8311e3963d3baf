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
//!
//! This module is the loop and the routing of its events; the rules live in
//! one submodule per concern, each an `impl Pool` block over the same state:
//! `requests` (admission, dispatch, answers, failover, queued deadlines),
//! `workers` (spawning, cgroup placement, kills, reaping, exits, worker
//! deadlines), `recycle` (memory and age verdicts, recycles, rolls),
//! `drain` (shutdown), `auto` (automatic limits and spares) and `report`
//! (status, and every systemd notification). The OS is reached through [`Seams`], so the unit tests
//! (`tests`) run the real loop on in-process fake workers with paused time.

mod auto;
mod drain;
#[cfg(test)]
mod fake;
mod recycle;
mod report;
mod requests;
#[cfg(test)]
mod tests;
mod workers;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use inferd_proto::{
    Counters, ExitKind, ExitRecord, PoolStatus, RecycleReport, RecycleStage, RequestError,
    RequestLimits, RollReport, RollState, WorkerConfig, WorkerEvent, WorkerStatus,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::cgroup::{self, Cgroups, Leaf};
use crate::config::{Config, LimitSetting};
use crate::connections::ConnectionLimits;
use crate::growth;
use crate::limits::{self, Derived, MemoryBudget};
use crate::memory::{MemorySource, MemoryUsage};
use crate::notify::Notifier;
use crate::policy::{RecyclePolicy, RestartPacer, Verdict, WorkerFacts};
use crate::process::{self, KillReason, OomEvidence, RetireReason, WorkerEnd};
use crate::queue::{FairQueue, Measure};
use crate::request::{ClientKey, Outcome, Request, Responder, Task};
use crate::worker::{IoEvent, Worker, WorkerState};
use auto::Spawn;
use recycle::{Recycle, RollProgress};

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
    /// SIGHUP found a configuration it cannot use: nothing changes, and
    /// systemd hears so.
    ReloadRefused {
        /// Why, in one line.
        reason: String,
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
            Self::Disconnected { .. } | Self::ReloadRefused { .. } => {}
        }
    }
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
    /// How worker processes are started, killed and reaped.
    pub processes: Box<dyn process::Processes>,
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
    /// The limits and spare count in force, as resolved from `config`.
    limits: Derived,
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
    /// Recycles under way.
    recycles: Vec<Recycle>,
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
        // No worker yet, so no baseline: the budget plays no part.
        let limits = limits::derive(&config, None, None);
        info!(origin = %limits.origin, "memory limits");
        Pool {
            workers: BTreeMap::new(),
            queue: FairQueue::new(),
            counters: Counters::default(),
            next_worker_id: 1,
            next_request_id: 1,
            io_events,
            pacer: RestartPacer::new(config.max_restarts, config.restart_period(), now),
            policy: RecyclePolicy::new(&config, &limits),
            limits,
            seams,
            last_memory_check: now,
            recent_exits: VecDeque::new(),
            generation: 0,
            config_generation: 0,
            roll: None,
            last_roll: None,
            recycles: Vec::new(),
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
            PoolMsg::ReloadRefused { reason } => self.announce_reload_refused(&reason),
        }
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
                    let spare = worker.spare;
                    info!(worker_id, pid, %model, dims, load_ms, spare, "worker ready");
                    self.pacer.started();
                    let generation = worker.generation;
                    self.prove_roll(generation, worker_id);
                    self.on_worker_ready(worker_id, now);
                    self.hand_over(worker_id, now);
                    if !self.announced_ready && self.roll.is_none() && !spare {
                        // The socket is bound before the pool starts, so
                        // this is the moment the daemon can serve.
                        self.announce_ready();
                    }
                } else if let WorkerState::Stopping { .. } = worker.state() {
                    // Asked to exit while it loaded (a drain, a surplus
                    // spare): its Ready crossed our Shutdown, which it
                    // reads next.
                    debug!(worker_id, pid, "Ready from a worker already asked to exit");
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
}
