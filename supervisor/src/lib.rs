//! The inferd supervisor daemon.
//!
//! [`run`] wires the parts together: the client socket ([`listener`]), one
//! task per client connection ([`server`], or [`http`] for a connection
//! that speaks HTTP), and the pool task ([`pool`]) that
//! owns the workers ([`worker`], [`process`]). SIGTERM and SIGINT are events
//! in the main `select!`: they stop the accept loop and cancel one token that
//! every task watches; the pool then drains and stops its workers, and the
//! socket file is removed when the listener is dropped. A second stop signal
//! during the drain cancels a second token that cuts the drain short. Nothing
//! in the main `select!` waits inside an arm (a SIGHUP's roll is sent from
//! its own task, a failed accept pauses the listeners with a timer arm), so
//! signals are always handled.

pub mod access;
pub mod activation;
pub mod cgroup;
pub mod config;
pub mod connections;
pub mod fdlimit;
pub mod growth;
pub mod http;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod metrics_http;
pub mod notify;
pub mod policy;
pub mod pool;
pub mod process;
pub mod queue;
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

pub use config::{Args, Config, ConfigError, LogFormat};

/// Capacity of the channel from connections to the pool; senders wait when
/// it is full, which slows clients down rather than dropping anything.
const POOL_CHANNEL: usize = 1024;
/// After the pool stopped, how long connections get to flush answers.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of fds) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refused connections that may linger at once to read their refusal.
const LINGERING_REFUSALS: usize = 64;

/// Failures that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The client socket could not be set up.
    #[error(transparent)]
    Listen(#[from] listener::ListenerError),
    /// The metrics listener could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP API's TCP address could not be bound.
    #[error("cannot listen for HTTP on {addr}")]
    HttpListen {
        /// The configured `http_listen`.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// systemd passed a socket that cannot be used.
    #[error("socket activation failed")]
    Activation(#[from] activation::ActivationError),
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
/// `args` are kept to re-read the configuration on SIGHUP.
/// Must run on a current-thread runtime: workers die with the thread that
/// spawned them (`PR_SET_PDEATHSIG`).
pub async fn run(args: Args, config: Config) -> Result<(), DaemonError> {
    let mut config = Arc::new(config);
    let nofile = raise_nofile();
    if !config.model.exists() {
        warn!(model = %config.model.display(), "model file does not exist; workers will fail to start");
    }
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    let mut socket = match activation::listener_from_env()? {
        Some(passed) => listener::ClientSocket::adopt(passed, &config.socket)?,
        None => {
            let mode = config.socket_mode_bits().map_err(|_| {
                // Validated at load; unreachable in practice.
                listener::ListenerError::NotASocket(config.socket.clone())
            })?;
            listener::ClientSocket::bind(&config.socket, mode, config.socket_group.as_deref())
                .await?
        }
    };

    let shutdown = CancellationToken::new();
    let hurry = CancellationToken::new();
    let (pool_tx, pool_rx) = mpsc::channel(POOL_CHANNEL);
    let limits = connections::ConnectionLimits::new(
        connection_cap(&config, nofile),
        config.max_connections_per_uid,
    );
    let lingering = Arc::new(tokio::sync::Semaphore::new(LINGERING_REFUSALS));
    // Validated: at least max_frame_bytes, so a largest frame can be read.
    let read_budget = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(config.max_queued_bytes.as_u64()).unwrap_or(usize::MAX >> 4),
    ));
    let (cgroups, cgroup_summary) = prepare_cgroups(&config);
    let seams = pool::Seams {
        processes: Box::new(process::OsProcesses),
        memory: Box::new(memory::ProcfsMemory::new(
            config.memory_metric != config::MemoryMetric::Rss,
        )),
        cgroups,
        cgroup_summary,
        notifier: notify::Notifier::from_env(),
        connections: Arc::clone(&limits),
    };
    let mut pool_task = tokio::spawn(pool::Pool::run(
        config.clone(),
        seams,
        pool_rx,
        shutdown.clone(),
        hurry.clone(),
    ));
    let connection_tasks = TaskTracker::new();
    let http_shared = Arc::new(http::HttpShared::new(
        Arc::clone(&read_budget),
        config.api_keys.clone(),
    ));
    let http_listener = match config.http_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::HttpListen { addr, source })?;
            let local = listener.local_addr().unwrap_or(addr);
            info!(addr = %local, keys = !config.api_keys.is_empty(), "HTTP API on http://{local}/");
            Some(listener)
        }
        None => None,
    };
    if let Some(addr) = config.metrics_listen {
        let listener = metrics_http::bind(addr)
            .await
            .map_err(|source| DaemonError::MetricsListen { addr, source })?;
        connection_tasks.spawn(metrics_http::serve(
            listener,
            pool_tx.clone(),
            shutdown.clone(),
        ));
    }
    info!(workers = config.workers, model = %config.model.display(), "inferd started");
    warn_about_chaos(&config);
    let mut next_conn_id: u64 = 0;
    // Connections read the configuration through this, so a reload reaches
    // those already open.
    let (config_tx, live_config) = tokio::sync::watch::channel(Arc::clone(&config));
    // A failed accept pauses both listeners for a moment; the pause is an
    // event of its own so that signals are handled meanwhile.
    let mut accept_pause = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut accept_paused = false;

    let pool_result = loop {
        let Some(listener) = socket.listener() else {
            break None;
        };
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break None; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break None; }
            _ = sighup.recv() => {
                // A valid config starts a roll; either way the pool tells
                // systemd (RELOADING=1, then READY=1).
                let message = match reload(&args, &config) {
                    Ok(reloaded) => {
                        config = reloaded;
                        config_tx.send_replace(Arc::clone(&config));
                        http_shared.set_api_keys(config.api_keys.clone());
                        pool::PoolMsg::Roll { config: Some(config.clone()), responder: None }
                    }
                    Err(reason) => pool::PoolMsg::ReloadRefused { reason },
                };
                // Sent from a task of its own: waiting here for room in a
                // full channel would hold up signal handling.
                let pool_tx = pool_tx.clone();
                tokio::spawn(async move { let _ = pool_tx.send(message).await; });
            }
            () = &mut accept_pause, if accept_paused => accept_paused = false,
            accepted = listener.accept(), if !accept_paused => match accepted {
                Ok((stream, _)) => {
                    next_conn_id += 1;
                    let cx = server::ServeContext {
                        config: live_config.clone(),
                        limits: Arc::clone(&limits),
                        lingering: Arc::clone(&lingering),
                        read_budget: Arc::clone(&read_budget),
                        pool: pool_tx.clone(),
                        shutdown: shutdown.clone(),
                        http: Arc::clone(&http_shared),
                    };
                    connection_tasks.spawn(server::serve_client(stream, next_conn_id, cx));
                }
                Err(err) => {
                    warn!(error = %err, "accept failed; backing off");
                    accept_pause.as_mut().reset(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    accept_paused = true;
                }
            },
            accepted = accept_tcp(http_listener.as_ref()), if !accept_paused => match accepted {
                Ok((stream, remote)) => {
                    next_conn_id += 1;
                    let cx = http::TcpContext {
                        limits: Arc::clone(&limits),
                        lingering: Arc::clone(&lingering),
                        http: http::HttpContext {
                            config: live_config.clone(),
                            pool: pool_tx.clone(),
                            shutdown: shutdown.clone(),
                            shared: Arc::clone(&http_shared),
                            in_transit: server::IN_TRANSIT_PER_CONNECTION,
                        },
                    };
                    connection_tasks.spawn(http::serve_tcp(stream, remote, next_conn_id, cx));
                }
                Err(err) => {
                    warn!(error = %err, "HTTP accept failed; backing off");
                    accept_pause.as_mut().reset(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    accept_paused = true;
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
        None => {
            // A second SIGTERM or SIGINT cuts the drain short, as systemd
            // and nginx users expect.
            loop {
                tokio::select! {
                    result = &mut pool_task => break result,
                    _ = sigterm.recv() => hurry_drain(&hurry, "SIGTERM"),
                    _ = sigint.recv() => hurry_drain(&hurry, "SIGINT"),
                }
            }
        }
    };
    connection_tasks.close();
    if tokio::time::timeout(FLUSH_TIMEOUT, connection_tasks.wait())
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

/// `[chaos]` options make workers crash, hang or leak on purpose: fine in
/// tests, never what production wants, so each start and reload says so.
fn warn_about_chaos(config: &Config) {
    if let Some(chaos) = config.chaos.describe() {
        warn!(%chaos, "test-only [chaos] options are on: workers will misbehave on purpose");
    }
}

/// A stop signal during the drain: the pool answers what is left
/// `shutting_down` and stops its workers now.
fn hurry_drain(hurry: &CancellationToken, signal: &str) {
    if !hurry.is_cancelled() {
        warn!(signal, "second stop signal during the drain: stopping now");
        hurry.cancel();
    }
}

/// The next connection of the TCP listener; never, without one.
async fn accept_tcp(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Raises the soft descriptor limit to the hard one, so that connections
/// and worker spawns do not compete for the 1024 a service gets by default.
/// Returns the soft limit in force, if it could be read.
fn raise_nofile() -> Option<u64> {
    match fdlimit::raise_nofile() {
        Ok(limit) => {
            info!(
                before = limit.before,
                soft = limit.soft,
                hard = limit.hard,
                "descriptor limit (RLIMIT_NOFILE)"
            );
            Some(limit.soft)
        }
        Err(err) => {
            warn!(error = %inferd_proto::error_chain(&err), "cannot raise RLIMIT_NOFILE");
            match err {
                fdlimit::FdLimitError::RaiseLimit { from, .. } => Some(from),
                fdlimit::FdLimitError::GetLimit(_) => None,
            }
        }
    }
}

/// `max_connections`, lowered if the descriptor limit cannot hold it plus a
/// reserve for the workers, the listener and refusals in progress.
fn connection_cap(config: &Config, nofile: Option<u64>) -> u32 {
    let Some(soft) = nofile else {
        return config.max_connections;
    };
    let cap = fdlimit::connection_cap(
        soft,
        config.max_connections,
        config.workers,
        LINGERING_REFUSALS,
    );
    if cap.lowered {
        warn!(
            max_connections = cap.max_connections,
            configured = config.max_connections,
            rlimit_nofile = soft,
            "max_connections lowered: the descriptor limit must leave room for worker spawns"
        );
    }
    cap.max_connections
}

/// Sets up per-worker cgroups as configured and says once, in the log, what
/// the pool will rely on. Leaves carry the hard limit, so without one there
/// is nothing for them to enforce.
fn prepare_cgroups(config: &Config) -> (Option<cgroup::Cgroups>, String) {
    if config.cgroups == config::CgroupMode::Off {
        info!("per-worker cgroups off (cgroups = \"off\"); memory limits are enforced from procfs");
        return (None, "off (configured)".into());
    }
    if config.hard_limit == config::LimitSetting::Off {
        return (None, "not used: hard_limit = \"off\"".into());
    }
    match cgroup::detect(config.cgroup_parent.as_deref()).prepare() {
        Ok(cgroups) => {
            remove_stale_leaves(cgroups.parent());
            let summary = format!(
                "{:?} under {}",
                cgroups.version(),
                cgroups.parent().display()
            );
            info!(cgroups = %summary, "each worker gets its own memory cgroup limited to hard_limit");
            (Some(cgroups), summary)
        }
        Err(err) => {
            let reason = inferd_proto::error_chain(&err);
            warn!(%reason, "no per-worker cgroups; hard_limit is enforced from procfs polling and OOM kills can only be \"likely\"");
            (None, format!("unavailable: {reason}"))
        }
    }
}

/// Re-reads the configuration for SIGHUP. An invalid file is logged and
/// changes nothing; settings that only take effect at start (the socket and
/// the framing limit) keep their running values, with a warning.
fn reload(args: &Args, running: &Arc<Config>) -> Result<Arc<Config>, String> {
    let refuse = |reason: String| {
        error!(error = %reason, "SIGHUP: invalid configuration; keeping the running one and rolling nothing");
        Err(reason)
    };
    let mut new = match Config::load(args) {
        Ok(new) => new,
        Err(err) => {
            // One log line: TOML errors come with a multi-line snippet.
            let reason = inferd_proto::error_chain(&err)
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            return refuse(reason);
        }
    };
    // At start a missing model leaves the daemon up and saying why; a
    // reload must not trade working workers for that.
    for (key, path) in [("model", &new.model), ("tokenizer", &new.tokenizer)] {
        if !path.is_file() {
            return refuse(format!("{key}: {} is not a file", path.display()));
        }
    }
    let start_only = [
        ("socket", new.socket != running.socket),
        ("socket_mode", new.socket_mode != running.socket_mode),
        ("socket_group", new.socket_group != running.socket_group),
        (
            "max_frame_bytes",
            new.max_frame_bytes != running.max_frame_bytes,
        ),
        ("http_listen", new.http_listen != running.http_listen),
        (
            "metrics_listen",
            new.metrics_listen != running.metrics_listen,
        ),
        (
            "max_connections",
            new.max_connections != running.max_connections
                || new.max_connections_per_uid != running.max_connections_per_uid,
        ),
        (
            "cgroups",
            new.cgroups != running.cgroups || new.cgroup_parent != running.cgroup_parent,
        ),
    ];
    for (key, changed) in start_only {
        if changed {
            warn!(
                key,
                "SIGHUP: this setting only takes effect at start; keeping the running value"
            );
        }
    }
    new.socket = running.socket.clone();
    new.socket_mode = running.socket_mode.clone();
    new.socket_group = running.socket_group.clone();
    new.max_frame_bytes = running.max_frame_bytes;
    new.cgroups = running.cgroups;
    new.cgroup_parent = running.cgroup_parent.clone();
    new.http_listen = running.http_listen;
    new.metrics_listen = running.metrics_listen;
    new.max_connections = running.max_connections;
    new.max_connections_per_uid = running.max_connections_per_uid;
    info!("SIGHUP: configuration re-read; rolling every worker");
    warn_about_chaos(&new);
    Ok(Arc::new(new))
}

/// Removes worker leaves (`inferd-<pid>-worker-<id>`) left behind by a
/// supervisor that is gone (SIGKILLed or crashed before it could clean up).
/// Only empty cgroups can be removed, so a leaf that still holds a process
/// stays; leaves of live supervisors are never touched.
fn remove_stale_leaves(parent: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix("inferd-"))
            .and_then(|rest| rest.split_once("-worker-"))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || std::path::Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        match std::fs::remove_dir(entry.path()) {
            Ok(()) => info!(leaf = %entry.path().display(), "removed a stale worker cgroup"),
            Err(err) => {
                warn!(leaf = %entry.path().display(), error = %err, "cannot remove a stale worker cgroup")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_leaves_of_dead_supervisors_are_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let own = std::process::id();
        // 4194304 is above the kernel's largest pid_max: never a live pid.
        let names = [
            "inferd-4194304-worker-1".to_owned(),
            format!("inferd-{own}-worker-2"),
            "inferd-1-worker-3".to_owned(),
            "unrelated".to_owned(),
        ];
        for name in &names {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        super::remove_stale_leaves(dir.path());
        let left: Vec<bool> = names.iter().map(|n| dir.path().join(n).exists()).collect();
        assert_eq!(
            left,
            [false, true, true, true],
            "only the dead supervisor's leaf goes"
        );
    }
}
