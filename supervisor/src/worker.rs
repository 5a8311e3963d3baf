//! One worker as the supervisor sees it: its lifecycle state (one enum whose
//! variants carry their data, changed only through methods) and the task that
//! moves frames between its socket and the pool.
//!
//! ```text
//! Starting ──Ready──▶ Ready ◀──answer── Busy
//!    │                  │ └──assign──────▲
//!    │                  └─retire─▶ Stopping
//!    └─(any live state)─kill──▶ Killed      (all end at waitpid)
//!    └─(any live state)─EOF───▶ Lost
//! ```

use std::time::Instant;

use inferd_proto::{Connection, ProtoError, WorkerCommand, WorkerConfig, WorkerEvent};
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{debug, info_span, warn, Instrument};

use crate::process::{self, Intent, KillReason, ProcessError, RetireReason, SpawnedWorker};
use crate::request::Request;

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
    /// Running one request.
    Busy(Job),
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
    pub state: &'static str,
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
    /// Commands to the IO task, which writes them to the socket.
    commands: mpsc::UnboundedSender<WorkerCommand>,
    /// Lifecycle state.
    state: WorkerState,
}

impl Worker {
    /// Takes over a freshly spawned process: starts its IO task and queues the
    /// Start command (sent after the hello exchange).
    pub fn start(
        id: u64,
        spawned: SpawnedWorker,
        config: WorkerConfig,
        events: IoEvents,
        now: Instant,
    ) -> Result<Worker, ProcessError> {
        let stream = UnixStream::from_std(spawned.stream).map_err(ProcessError::SocketSetup)?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let span = info_span!("worker", worker_id = id, pid = spawned.pid.as_raw());
        tokio::spawn(run_io(id, stream, command_rx, events).instrument(span));
        // The IO task holds the receiver, so this cannot fail yet.
        let _ = commands.send(WorkerCommand::Start(config));
        Ok(Worker {
            id,
            pid: spawned.pid,
            spawned: now,
            ready_at: None,
            requests_served: 0,
            commands,
            state: WorkerState::Starting { since: now },
        })
    }

    /// Current state.
    pub fn state(&self) -> &WorkerState {
        &self.state
    }

    /// State name for status output.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            WorkerState::Starting { .. } => "starting",
            WorkerState::Ready { .. } => "ready",
            WorkerState::Busy(_) => "busy",
            WorkerState::Stopping { .. } => "stopping",
            WorkerState::Killed { .. } | WorkerState::Lost { .. } => "exiting",
        }
    }

    /// Counts towards pool capacity (not on its way out).
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            WorkerState::Starting { .. } | WorkerState::Ready { .. } | WorkerState::Busy(_)
        )
    }

    /// Running a request.
    pub fn is_busy(&self) -> bool {
        matches!(self.state, WorkerState::Busy(_))
    }

    /// What we did to it, for classifying its end.
    pub fn intent(&self) -> Intent {
        match self.state {
            WorkerState::Stopping { reason, .. } => Intent::Retire(reason),
            WorkerState::Killed { reason, .. } => Intent::Kill(reason),
            _ => Intent::None,
        }
    }

    /// Starting → Ready. Returns false (and changes nothing) in other states.
    pub fn mark_ready(&mut self, now: Instant) -> bool {
        if matches!(self.state, WorkerState::Starting { .. }) {
            self.state = WorkerState::Ready { since: now };
            self.ready_at = Some(now);
            true
        } else {
            false
        }
    }

    /// Ready → Busy with `request`. Gives the request back if the worker is
    /// not Ready or its IO task is gone (then the worker is Lost).
    pub fn assign(&mut self, request: Request, now: Instant) -> Result<(), Request> {
        if !matches!(self.state, WorkerState::Ready { .. }) {
            return Err(request);
        }
        // Cloned because the request must survive the worker for a retry.
        let command = WorkerCommand::Embed {
            request_id: request.id,
            texts: request.texts.clone(),
        };
        if self.commands.send(command).is_err() {
            self.state = WorkerState::Lost { since: now };
            return Err(request);
        }
        self.state = WorkerState::Busy(Job {
            request_id: request.id,
            started: now,
            request: Some(request),
        });
        Ok(())
    }

    /// Busy → Ready on the worker's answer to `request_id`; returns the
    /// request unless it was already answered (deadline passed).
    pub fn complete(
        &mut self,
        request_id: u64,
        now: Instant,
    ) -> Result<Option<Request>, UnexpectedAnswer> {
        match &mut self.state {
            WorkerState::Busy(job) if job.request_id == request_id => {
                let request = job.request.take();
                self.state = WorkerState::Ready { since: now };
                self.requests_served += 1;
                Ok(request)
            }
            _ => Err(UnexpectedAnswer {
                got: request_id,
                state: self.state_name(),
            }),
        }
    }

    /// The running job, if Busy.
    pub fn job_mut(&mut self) -> Option<&mut Job> {
        match &mut self.state {
            WorkerState::Busy(job) => Some(job),
            _ => None,
        }
    }

    /// Asks the worker to exit after its current command: → Stopping.
    /// Only for idle or starting workers; a busy one must finish first.
    pub fn retire(&mut self, reason: RetireReason, now: Instant) {
        if matches!(
            self.state,
            WorkerState::Ready { .. } | WorkerState::Starting { .. }
        ) {
            let _ = self.commands.send(WorkerCommand::Shutdown);
            self.state = WorkerState::Stopping { reason, since: now };
        }
    }

    /// SIGKILLs the worker: → Killed. Returns its unanswered request, if any.
    pub fn kill(&mut self, reason: KillReason, now: Instant) -> Option<Request> {
        if let Err(err) = process::sigkill(self.pid) {
            warn!(worker_id = self.id, pid = self.pid.as_raw(), error = %err, "SIGKILL failed");
        }
        if matches!(self.state, WorkerState::Killed { .. }) {
            // Killing twice keeps the first reason.
            return None;
        }
        match std::mem::replace(&mut self.state, WorkerState::Killed { reason, since: now }) {
            WorkerState::Busy(job) => job.request,
            _ => None,
        }
    }

    /// The socket closed without our asking: → Lost. Returns the unanswered
    /// request, if any. Stopping and Killed workers are expected to close.
    pub fn lost(&mut self, now: Instant) -> Option<Request> {
        if !self.is_live() {
            return None;
        }
        match std::mem::replace(&mut self.state, WorkerState::Lost { since: now }) {
            WorkerState::Busy(job) => job.request,
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
    stream: UnixStream,
    mut commands: mpsc::UnboundedReceiver<WorkerCommand>,
    events: IoEvents,
) {
    let mut conn: Connection<UnixStream, WorkerCommand, WorkerEvent> =
        Connection::new(stream, inferd_proto::DEFAULT_MAX_FRAME_BYTES);
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
