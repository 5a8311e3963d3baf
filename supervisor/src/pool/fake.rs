//! In-process fake workers for the pool's unit tests: [`FakeWorkers`]
//! stands in for the OS ([`Processes`]), and each "process" is a task that
//! speaks the real worker protocol on the other end of a real socketpair.
//! What a fake does is set by its [`Script`] and by marker texts, so tests
//! can make workers load slowly, fail to load, crash, hang or answer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use inferd_proto::{Connection, EmbedResult, WorkerCommand, WorkerEvent, DEFAULT_MAX_FRAME_BYTES};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::process::{ExitReport, ProcessError, Processes, SpawnedWorker};

/// A request containing this text aborts every fake that runs it.
pub(super) const CRASH: &str = "fake:crash";
/// A request containing this text aborts the first fake that runs it; the
/// retry is answered.
pub(super) const CRASH_ONCE: &str = "fake:crash-once";
/// A request containing this text is never answered.
pub(super) const HANG: &str = "fake:hang";

/// What the next fakes do.
#[derive(Debug, Clone)]
pub(super) struct Script {
    /// Time from the Start command to Ready.
    pub(super) load: Duration,
    /// Report a load failure and exit 1 instead of becoming Ready.
    pub(super) fail_load: bool,
    /// Time to answer one request.
    pub(super) work: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            load: Duration::from_millis(300),
            fail_load: false,
            work: Duration::from_millis(10),
        }
    }
}

/// The fake processes, shared by the pool (as its [`Processes`]) and the
/// test (to change the script and look at what ran).
#[derive(Debug, Clone, Default)]
pub(super) struct FakeWorkers {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Pids handed out: above the kernel's largest `pid_max`, so a fake pid
    /// is never a real process.
    next_pid: i32,
    script: Script,
    /// [`CRASH_ONCE`] crashed a fake already.
    crashed_once: bool,
    /// SIGKILLs the pool sent.
    kills: usize,
    processes: HashMap<i32, FakeProcess>,
}

#[derive(Debug)]
struct FakeProcess {
    task: JoinHandle<()>,
    /// How it ended, once it has (not yet reaped).
    exit: Option<ExitReport>,
}

impl FakeWorkers {
    /// Fakes that follow `script`.
    pub(super) fn new(script: Script) -> FakeWorkers {
        let fakes = FakeWorkers::default();
        fakes.lock().script = script;
        fakes
    }

    /// Changes what fakes started from now on do.
    pub(super) fn set_script(&self, script: Script) {
        self.lock().script = script;
    }

    /// Fakes started so far.
    pub(super) fn spawned(&self) -> usize {
        let shared = self.lock();
        usize::try_from(shared.next_pid).unwrap_or(0)
    }

    /// SIGKILLs the pool sent so far.
    pub(super) fn kills(&self) -> usize {
        self.lock().kills
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records how `pid` ended, unless it already had.
    fn ended(&self, pid: i32, exit: ExitReport) {
        if let Some(process) = self.lock().processes.get_mut(&pid) {
            process.exit.get_or_insert(exit);
        }
    }
}

/// Where fake pids start: above `PID_MAX_LIMIT` (4194304).
const FIRST_PID: i32 = 5_000_000;

impl Processes for FakeWorkers {
    fn spawn(&mut self, _binary: &Path) -> Result<SpawnedWorker, ProcessError> {
        let (ours, theirs) = UnixStream::pair().map_err(ProcessError::SocketPair)?;
        let mut shared = self.lock();
        let pid = FIRST_PID + shared.next_pid;
        shared.next_pid += 1;
        let fakes = self.clone();
        let task = tokio::spawn(async move {
            let exit = run(theirs, &fakes).await;
            fakes.ended(pid, exit);
        });
        shared
            .processes
            .insert(pid, FakeProcess { task, exit: None });
        Ok(SpawnedWorker {
            pid: Pid::from_raw(pid),
            stream: ours,
        })
    }

    fn kill(&mut self, pid: Pid) -> Result<(), Errno> {
        let mut shared = self.lock();
        shared.kills += 1;
        if let Some(process) = shared.processes.get_mut(&pid.as_raw()) {
            process.task.abort();
            process
                .exit
                .get_or_insert(ExitReport::Signaled(Signal::SIGKILL));
        }
        Ok(())
    }

    fn try_reap(&mut self, pid: Pid) -> Result<Option<ExitReport>, Errno> {
        let mut shared = self.lock();
        let Some(process) = shared.processes.get(&pid.as_raw()) else {
            return Err(Errno::ECHILD);
        };
        let Some(exit) = process.exit else {
            return Ok(None);
        };
        shared.processes.remove(&pid.as_raw());
        Ok(Some(exit))
    }
}

/// One fake worker's life on its socket; returns how it ends.
async fn run(stream: UnixStream, fakes: &FakeWorkers) -> ExitReport {
    let failed = ExitReport::Exited(1);
    let mut conn: Connection<UnixStream, WorkerEvent, WorkerCommand> =
        Connection::new(stream, DEFAULT_MAX_FRAME_BYTES);
    if conn.handshake("fake-worker").await.is_err() {
        return failed;
    }
    let Ok(Some(WorkerCommand::Start(_))) = conn.recv().await else {
        return failed;
    };
    let script = fakes.lock().script.clone();
    tokio::time::sleep(script.load).await;
    if script.fail_load {
        let reason = "fake: this model cannot be loaded".to_owned();
        let _ = conn.send(&WorkerEvent::LoadFailed { reason }).await;
        return failed;
    }
    let ready = WorkerEvent::Ready {
        model: "fake".into(),
        dims: 1,
        load_ms: script.load.as_millis() as u64,
    };
    if conn.send(&ready).await.is_err() {
        return failed;
    }
    loop {
        let (request_id, texts) = match conn.recv().await {
            Ok(Some(WorkerCommand::Embed { request_id, texts })) => (request_id, texts),
            Ok(Some(WorkerCommand::Shutdown) | None) => return ExitReport::Exited(0),
            // The tests never ask a fake to tokenize.
            Ok(Some(WorkerCommand::Start(_) | WorkerCommand::Tokenize { .. })) | Err(_) => {
                return failed
            }
        };
        let has = |marker: &str| texts.iter().any(|t| t == marker);
        if has(CRASH)
            || (has(CRASH_ONCE) && !std::mem::replace(&mut fakes.lock().crashed_once, true))
        {
            return ExitReport::Signaled(Signal::SIGABRT);
        }
        if has(HANG) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(script.work).await;
        let n = texts.len();
        let answer = WorkerEvent::Embedded {
            request_id,
            result: EmbedResult {
                model: "fake".into(),
                dims: 1,
                embeddings: vec![vec![1.0]; n],
                truncated: vec![false; n],
                token_counts: vec![1; n],
            },
        };
        if conn.send(&answer).await.is_err() {
            return failed;
        }
    }
}
