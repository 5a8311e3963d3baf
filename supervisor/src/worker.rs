//! One worker as the supervisor sees it: its lifecycle state (one enum whose
//! variants carry their data, changed only through methods) and the task that
//! moves frames between its socket and the pool.
//!
//! ```text
//! Starting ──Ready──▶ Ready ◀──answer── Busy
//!    │ (a spare)        │ └──assign──────▲ │
//!    └──Ready──▶ Spare ─┘ promote          │ drain (recycle)
//!                       └─drain/retire─▶ Stopping ◀─answer── Draining
//!  any state ──kill──▶ Killed;  any live state ──EOF──▶ Lost
//!  (every state ends at waitpid; a Spare retires like a Ready worker)
//! ```

use std::sync::Arc;

use inferd_proto::{
    Connection, ProtoError, RequestLimits, WorkerCommand, WorkerConfig, WorkerEvent,
    WorkerStateKind,
};
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info_span, Instrument};

use crate::cgroup::Leaf;
use crate::growth::MemoryHistory;
use crate::memory::MemoryUsage;
use crate::process::{Intent, KillReason, RetireReason, SpawnedWorker};
use crate::request::{Request, Task};

/// Something from a worker's socket, tagged with the worker id by the sender.
#[derive(Debug)]
pub enum IoEvent {
    /// A decoded event frame.
    Event(WorkerEvent),
    /// The socket is done: clean EOF (`None`) or a protocol error.
    Closed(Option<ProtoError>),
}

/// Events from all worker IO tasks to the pool.
pub type IoEvents = mpsc::UnboundedSender<(u64, IoEvent)>;

/// The request a busy worker is running.
#[derive(Debug)]
pub struct Job {
    /// The request's supervisor id, echoed by the worker.
    pub request_id: u64,
    /// When it was handed to the worker.
    pub started: Instant,
    /// The request, until answered; `None` after its deadline passed and it
    /// was answered `timeout` while the worker kept running.
    pub request: Option<Request>,
}

/// Lifecycle state of one worker process.
#[derive(Debug)]
pub enum WorkerState {
    /// Spawned and told to load; not yet Ready.
    Starting {
        /// Spawn time.
        since: Instant,
    },
    /// Idle, takes requests.
    Ready {
        /// Idle since.
        since: Instant,
    },
    /// Loaded and warmed, held in reserve: takes no requests until
    /// promoted.
    Spare {
        /// Ready since.
        since: Instant,
    },
    /// Running one request.
    Busy(Job),
    /// Being recycled: gets no new work, finishes its request, then is asked
    /// to exit.
    Draining {
        /// Why it is recycled.
        reason: RetireReason,
        /// Draining since.
        since: Instant,
        /// The request it is finishing.
        job: Job,
    },
    /// Asked to exit; waiting for it to do so.
    Stopping {
        /// Why.
        reason: RetireReason,
        /// Asked at.
        since: Instant,
    },
    /// SIGKILL sent; waiting for waitpid.
    Killed {
        /// Why.
        reason: KillReason,
        /// Sent at.
        since: Instant,
    },
    /// Its socket closed unasked; waiting for waitpid.
    Lost {
        /// Seen at.
        since: Instant,
    },
}

/// The worker answered a request it was not running.
#[derive(Debug, thiserror::Error)]
#[error("worker answered request {got} while {state}")]
pub struct UnexpectedAnswer {
    /// The request id in the answer.
    pub got: u64,
    /// The state it was in.
    pub state: WorkerStateKind,
}

/// A worker process and the channel to its IO task.
#[derive(Debug)]
pub struct Worker {
    /// Supervisor-assigned id, never reused.
    pub id: u64,
    /// Process id.
    pub pid: Pid,
    /// Spawn time.
    pub spawned: Instant,
    /// When it first became Ready, if ever: a worker that ends without
    /// getting there counts as a failed start.
    pub ready_at: Option<Instant>,
    /// Requests answered.
    pub requests_served: u64,
    /// The pool's roll generation when it was spawned: a roll replaces every
    /// worker of an older generation.
    pub generation: u64,
    /// Latest memory reading.
    pub memory: Option<MemoryUsage>,
    /// Recent readings of the policy's memory figure, for the growth rate.
    pub history: MemoryHistory,
    /// Started to be a spare and not promoted yet.
    pub spare: bool,
    /// Why it could not load its model, as it reported before exiting.
    pub load_error: Option<String>,
    /// Its own memory cgroup, if the supervisor could make one.
    pub leaf: Option<Leaf>,
    /// Its cgroup's `oom_kill` count when it was placed there (a reused
    /// leaf may not start at 0).
    pub leaf_oom_kills_at_spawn: u64,
    /// Host-wide `oom_kill` count at spawn: the fallback OOM evidence.
    pub host_oom_kills_at_spawn: Option<u64>,
    /// The request limits it was started with (and enforces itself).
    pub limits: RequestLimits,
    /// Commands to the IO task, which writes them to the socket.
    commands: mpsc::UnboundedSender<WorkerCommand>,
    /// Lifecycle state.
    state: WorkerState,
}

impl Worker {
    /// Takes over a freshly spawned process (already in its cgroup leaf, if
    /// any): starts its IO task and queues the Start command (sent after the
    /// hello exchange). Cannot fail: a started process is always the pool's
    /// to reap.
    pub fn start(
        id: u64,
        spawned: SpawnedWorker,
        leaf: Option<Leaf>,
        config: WorkerConfig,
        events: IoEvents,
        now: Instant,
    ) -> Worker {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let span = info_span!("worker", worker_id = id, pid = spawned.pid.as_raw());
        let limits = config.limits;
        let link = Connection::new(spawned.stream, config.max_frame_bytes);
        tokio::spawn(run_io(id, link, command_rx, events).instrument(span));
        // The IO task holds the receiver, so this cannot fail yet.
        let _ = commands.send(WorkerCommand::Start(config));
        Worker {
            id,
            pid: spawned.pid,
            spawned: now,
            ready_at: None,
            requests_served: 0,
            generation: 0,
            memory: None,
            history: MemoryHistory::default(),
            spare: false,
            load_error: None,
            leaf_oom_kills_at_spawn: leaf.as_ref().and_then(|l| l.oom_kills().ok()).unwrap_or(0),
            leaf,
            limits,
            host_oom_kills_at_spawn: crate::cgroup::host_oom_kills(),
            commands,
            state: WorkerState::Starting { since: now },
        }
    }

    /// Current state.
    pub fn state(&self) -> &WorkerState {
        &self.state
    }

    /// State name for status output.
    pub fn state_kind(&self) -> WorkerStateKind {
        match self.state {
            WorkerState::Starting { .. } => WorkerStateKind::Starting,
            WorkerState::Ready { .. } => WorkerStateKind::Ready,
            WorkerState::Spare { .. } => WorkerStateKind::Spare,
            WorkerState::Busy(_) => WorkerStateKind::Busy,
            WorkerState::Draining { .. } => WorkerStateKind::Draining,
            WorkerState::Stopping { .. } => WorkerStateKind::Stopping,
            WorkerState::Killed { .. } | WorkerState::Lost { .. } => WorkerStateKind::Exiting,
        }
    }

    /// Not on its way out: starting, serving, or a spare.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            WorkerState::Starting { .. }
                | WorkerState::Ready { .. }
                | WorkerState::Busy(_)
                | WorkerState::Spare { .. }
        )
    }

    /// Live and not a spare: counts towards `workers`.
    pub fn is_active(&self) -> bool {
        self.is_live() && !self.spare
    }

    /// A loaded spare, ready to be promoted.
    pub fn is_ready_spare(&self) -> bool {
        matches!(self.state, WorkerState::Spare { .. })
    }

    /// A spare no more: a loaded one takes requests at once, a starting one
    /// will when Ready.
    pub fn promote(&mut self, now: Instant) {
        self.spare = false;
        if let WorkerState::Spare { .. } = self.state {
            self.state = WorkerState::Ready { since: now };
        }
    }

    /// Running a request (busy, or finishing one while draining).
    pub fn has_job(&self) -> bool {
        matches!(
            self.state,
            WorkerState::Busy(_) | WorkerState::Draining { .. }
        )
    }

    /// Serving or able to serve: Ready or Busy.
    pub fn is_serving(&self) -> bool {
        matches!(self.state, WorkerState::Ready { .. } | WorkerState::Busy(_))
    }

    /// What we did to it, for classifying its end.
    pub fn intent(&self) -> Intent {
        match self.state {
            WorkerState::Stopping { reason, .. } | WorkerState::Draining { reason, .. } => {
                Intent::Retire(reason)
            }
            WorkerState::Killed { reason, .. } => Intent::Kill(reason),
            _ => Intent::None,
        }
    }

    /// Starting → Ready (→ Spare for a spare). Returns false (and changes
    /// nothing) in other states.
    pub fn mark_ready(&mut self, now: Instant) -> bool {
        if matches!(self.state, WorkerState::Starting { .. }) {
            self.state = if self.spare {
                WorkerState::Spare { since: now }
            } else {
                WorkerState::Ready { since: now }
            };
            self.ready_at = Some(now);
            true
        } else {
            false
        }
    }

    /// Ready → Busy with `request`. Gives the request back if the worker is
    /// not Ready or its IO task is gone (then the worker is Lost).
    pub fn assign(&mut self, mut request: Request, now: Instant) -> Result<(), Box<Request>> {
        if !matches!(self.state, WorkerState::Ready { .. }) {
            return Err(Box::new(request));
        }
        request.dispatched = Some(now);
        // The request keeps its texts for a retry; the command shares them.
        let (request_id, texts) = (request.id, Arc::clone(&request.texts));
        let command = match request.task {
            Task::Embed => WorkerCommand::Embed { request_id, texts },
            Task::Tokenize => WorkerCommand::Tokenize { request_id, texts },
        };
        if self.commands.send(command).is_err() {
            self.state = WorkerState::Lost { since: now };
            return Err(Box::new(request));
        }
        self.state = WorkerState::Busy(Job {
            request_id: request.id,
            started: now,
            request: Some(request),
        });
        Ok(())
    }

    /// Busy → Ready (or Draining → Stopping) on the worker's answer to
    /// `request_id`; returns the request unless it was already answered
    /// (deadline passed).
    pub fn complete(
        &mut self,
        request_id: u64,
        now: Instant,
    ) -> Result<Option<Request>, UnexpectedAnswer> {
        let job = match &mut self.state {
            WorkerState::Busy(job) | WorkerState::Draining { job, .. }
                if job.request_id == request_id =>
            {
                job
            }
            _ => {
                return Err(UnexpectedAnswer {
                    got: request_id,
                    state: self.state_kind(),
                })
            }
        };
        let request = job.request.take();
        self.requests_served += 1;
        self.state = match self.state {
            WorkerState::Draining { reason, .. } => {
                let _ = self.commands.send(WorkerCommand::Shutdown);
                WorkerState::Stopping { reason, since: now }
            }
            _ => WorkerState::Ready { since: now },
        };
        Ok(request)
    }

    /// The running job, if it has one.
    pub fn job_mut(&mut self) -> Option<&mut Job> {
        match &mut self.state {
            WorkerState::Busy(job) | WorkerState::Draining { job, .. } => Some(job),
            _ => None,
        }
    }

    /// Takes the worker out of service: an idle or starting one is asked to
    /// exit now (→ Stopping), a busy one finishes its request first
    /// (→ Draining). Other states are already on their way out.
    pub fn retire(&mut self, reason: RetireReason, now: Instant) {
        // Placeholder while the old state is moved out; replaced just below.
        let previous = std::mem::replace(&mut self.state, WorkerState::Lost { since: now });
        self.state = match previous {
            WorkerState::Ready { .. }
            | WorkerState::Starting { .. }
            | WorkerState::Spare { .. } => {
                let _ = self.commands.send(WorkerCommand::Shutdown);
                WorkerState::Stopping { reason, since: now }
            }
            WorkerState::Busy(job) => WorkerState::Draining {
                reason,
                since: now,
                job,
            },
            other => other,
        };
    }

    /// The worker was sent SIGKILL: → Killed. Returns its unanswered
    /// request, if any.
    pub fn killed(&mut self, reason: KillReason, now: Instant) -> Option<Request> {
        if matches!(self.state, WorkerState::Killed { .. }) {
            // Killing twice keeps the first reason.
            return None;
        }
        match std::mem::replace(&mut self.state, WorkerState::Killed { reason, since: now }) {
            WorkerState::Busy(job) | WorkerState::Draining { job, .. } => job.request,
            _ => None,
        }
    }

    /// The socket closed without our asking: → Lost. Returns the unanswered
    /// request, if any. Stopping and Killed workers are expected to close.
    pub fn lost(&mut self, now: Instant) -> Option<Request> {
        if matches!(
            self.state,
            WorkerState::Stopping { .. } | WorkerState::Killed { .. } | WorkerState::Lost { .. }
        ) {
            return None;
        }
        match std::mem::replace(&mut self.state, WorkerState::Lost { since: now }) {
            WorkerState::Busy(job) | WorkerState::Draining { job, .. } => job.request,
            _ => None,
        }
    }

    /// At reap: the request it still held, if any.
    pub fn take_request(&mut self) -> Option<Request> {
        self.job_mut().and_then(|job| job.request.take())
    }
}

/// Moves frames between one worker's socket and the pool until either side
/// is done; then reports `Closed`.
async fn run_io(
    worker_id: u64,
    mut conn: Connection<UnixStream, WorkerCommand, WorkerEvent>,
    mut commands: mpsc::UnboundedReceiver<WorkerCommand>,
    events: IoEvents,
) {
    let result: Result<(), ProtoError> = async {
        conn.handshake("inferd").await?;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => conn.send(&command).await?,
                    // The pool let go of this worker.
                    None => return Ok(()),
                },
                event = conn.recv() => match event? {
                    Some(event) => {
                        if events.send((worker_id, IoEvent::Event(event))).is_err() {
                            return Ok(());
                        }
                    }
                    None => return Ok(()),
                },
            }
        }
    }
    .await;
    if let Err(err) = &result {
        debug!(error = %err, "worker connection failed");
    }
    let _ = events.send((worker_id, IoEvent::Closed(result.err())));
}
