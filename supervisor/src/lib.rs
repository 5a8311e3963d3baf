//! The inferd supervisor daemon.
//!
//! [`run`] wires the parts together: the client socket ([`listener`]), one
//! task per client connection ([`server`]), and the pool task ([`pool`]) that
//! owns the workers ([`worker`], [`process`]). SIGTERM and SIGINT are events
//! in the main `select!`: they stop the accept loop and cancel one token that
//! every task watches; the pool then drains and stops its workers, and the
//! socket file is removed when the listener is dropped.

pub mod cgroup;
pub mod config;
pub mod listener;
pub mod memory;
pub mod policy;
pub mod pool;
pub mod process;
pub mod request;
pub mod server;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::{Args, Config, ConfigError};

/// Capacity of the channel from connections to the pool; senders wait when
/// it is full, which slows clients down rather than dropping anything.
const POOL_CHANNEL: usize = 1024;
/// After the pool stopped, how long connections get to flush answers.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of fds) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Failures that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The client socket could not be set up.
    #[error(transparent)]
    Listen(#[from] listener::ListenerError),
    /// A signal handler could not be installed.
    #[error("cannot install the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    /// The pool task failed.
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    /// The pool task panicked.
    #[error("the pool task panicked")]
    PoolPanicked(#[source] tokio::task::JoinError),
}

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns.
/// Must run on a current-thread runtime: workers die with the thread that
/// spawned them (`PR_SET_PDEATHSIG`).
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    if !config.model.exists() {
        warn!(model = %config.model.display(), "model file does not exist; workers will fail to start");
    }
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
    let mut socket = listener::ClientSocket::bind(
        &config.socket,
        config.socket_mode_bits().map_err(|_| {
            // Validated at load; unreachable in practice.
            listener::ListenerError::NotASocket(config.socket.clone())
        })?,
    )
    .await?;

    let shutdown = CancellationToken::new();
    let (pool_tx, pool_rx) = mpsc::channel(POOL_CHANNEL);
    let seams = pool::Seams {
        memory: Box::new(memory::ProcfsMemory::new(
            config.memory_metric != config::MemoryMetric::Rss,
        )),
        ..prepare_cgroups(&config)
    };
    let mut pool_task = tokio::spawn(pool::Pool::run(
        config.clone(),
        seams,
        pool_rx,
        shutdown.clone(),
    ));
    let connections = TaskTracker::new();
    info!(workers = config.workers, model = %config.model.display(), "inferd started");

    let pool_result = loop {
        let Some(listener) = socket.listener() else {
            break None;
        };
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break None; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break None; }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(server::serve_client(stream, config.clone(), pool_tx.clone(), shutdown.clone()));
                }
                Err(err) => {
                    warn!(error = %err, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            result = &mut pool_task => { break Some(result); }
        }
    };
    socket.stop_accepting();
    shutdown.cancel();
    drop(pool_tx);
    let pool_result = match pool_result {
        Some(result) => result,
        None => (&mut pool_task).await,
    };
    connections.close();
    if tokio::time::timeout(FLUSH_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        warn!("some client connections did not finish in time");
    }
    drop(socket);
    match pool_result {
        Ok(Ok(())) => {
            info!("inferd stopped");
            Ok(())
        }
        Ok(Err(err)) => {
            error!(error = %err, "pool failed");
            Err(err.into())
        }
        Err(join) => Err(DaemonError::PoolPanicked(join)),
    }
}

/// Sets up per-worker cgroups as configured and says once, in the log, what
/// the pool will rely on. Leaves carry the hard limit, so without one there
/// is nothing for them to enforce.
fn prepare_cgroups(config: &Config) -> pool::Seams {
    let none = |summary: String| pool::Seams {
        memory: Box::new(memory::FakeMemory::new()),
        cgroups: None,
        cgroup_summary: summary,
    };
    if config.cgroups == config::CgroupMode::Off {
        info!("per-worker cgroups off (cgroups = \"off\"); memory limits are enforced from procfs");
        return none("off (configured)".into());
    }
    if config.hard_limit.is_none() {
        return none("not used: no hard_limit set".into());
    }
    let support = cgroup::detect(config.cgroup_parent.as_deref());
    match support.prepare() {
        Ok(cgroups) => {
            let summary = format!(
                "{:?} under {}",
                cgroups.version(),
                cgroups.parent().display()
            );
            info!(cgroups = %summary, "each worker gets its own memory cgroup limited to hard_limit");
            pool::Seams {
                memory: Box::new(memory::FakeMemory::new()),
                cgroups: Some(cgroups),
                cgroup_summary: summary,
            }
        }
        Err(err) => {
            let reason = inferd_proto::error_chain(&err);
            warn!(%reason, "no per-worker cgroups; hard_limit is enforced from procfs polling and OOM kills can only be \"likely\"");
            none(format!("unavailable: {reason}"))
        }
    }
}
