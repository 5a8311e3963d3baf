//! The [`Daemon`] fixture: one real `inferd` process with its own temp dir,
//! config file, socket and log.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use inferd_client::{format_status, wait_ready, Client, ClientError};
use inferd_proto::{ExitKind, PoolStatus, WorkerStateKind};
use inferd_supervisor::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::fixtures::{binary, model_files, test_model_name};
use crate::process::{children_of, comm, pid_alive};

/// Interval of every bounded poll in the harness.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Default bound on the wait for a started daemon's workers to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything that goes into a test daemon: its configuration, as the
/// daemon's own [`Config`] (written to its TOML file, so a key the daemon
/// does not know cannot be set), plus how the harness runs it. Build with
/// [`DaemonConfig::new`], the setters and [`DaemonConfig::with`].
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The daemon's configuration. `socket` is replaced by one in the
    /// daemon's temp dir unless [`DaemonConfig::socket`] chose one.
    pub config: Config,
    /// The socket [`DaemonConfig::socket`] chose, if any.
    pub socket: Option<PathBuf>,
    /// Extra environment variables for the daemon (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// A listening socket passed as fd 3 with `LISTEN_FDS=1` and
    /// `LISTEN_PID` = the daemon's pid, as systemd's socket activation does.
    pub listen_socket: Option<std::sync::Arc<std::os::unix::net::UnixListener>>,
    /// `RUST_LOG` for the daemon (and its workers, which inherit it).
    pub rust_log: String,
    /// Bound on [`Daemon::wait_ready`].
    pub ready_timeout: Duration,
    /// `RLIMIT_NOFILE` (soft = hard) the daemon starts with, as systemd's
    /// `LimitNOFILE=` sets it; `None` inherits the test process's limit.
    pub nofile_limit: Option<u64>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl DaemonConfig {
    /// Two workers serving [`crate::DEFAULT_MODEL`] (or
    /// `$INFERD_TEST_MODEL`, see [`test_model_name`]), everything else at the
    /// daemon's defaults, `RUST_LOG=info`.
    pub fn new() -> Self {
        Self::with_model(model_files(&test_model_name()))
    }

    /// Two workers serving `(model.onnx, tokenizer.json)`, everything else at
    /// the daemon's defaults except the spare: none unless a test asks
    /// (the tests count worker processes, and a spare is one more model
    /// load per test; `tests/defaults.rs` runs the true defaults),
    /// `RUST_LOG=info`. The files are not checked.
    pub fn with_model((model, tokenizer): (PathBuf, PathBuf)) -> Self {
        Self {
            config: Config {
                workers: 2,
                model,
                tokenizer,
                spare_workers: inferd_supervisor::config::SpareSetting::Count(0),
                ..Config::default()
            },
            socket: None,
            env: Vec::new(),
            listen_socket: None,
            rust_log: "info".into(),
            ready_timeout: READY_TIMEOUT,
            nofile_limit: None,
        }
    }

    /// Changes the daemon's configuration, e.g.
    /// `.with(|c| c.max_requests = Some(500))`.
    pub fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self
    }

    /// Sets the pool size.
    pub fn workers(self, workers: u32) -> Self {
        self.with(|c| c.workers = workers)
    }

    /// Serves another model, given as `(model.onnx, tokenizer.json)`.
    pub fn model(self, (model, tokenizer): (PathBuf, PathBuf)) -> Self {
        self.with(|c| {
            c.model = model;
            c.tokenizer = tokenizer;
        })
    }

    /// Uses this socket path instead of one in the daemon's temp dir.
    pub fn socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.socket = Some(socket.into());
        self
    }

    /// Sets `worker_binary`.
    pub fn worker_binary(self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.with(|c| c.worker_binary = path)
    }

    /// Sets `max_seq_len`.
    pub fn max_seq_len(self, tokens: usize) -> Self {
        self.with(|c| c.max_seq_len = tokens)
    }

    /// Sets `normalize`.
    pub fn normalize(self, normalize: bool) -> Self {
        self.with(|c| c.normalize = normalize)
    }

    /// Sets `queue_capacity`.
    pub fn queue_capacity(self, capacity: usize) -> Self {
        self.with(|c| c.queue_capacity = capacity)
    }

    /// Sets `max_frame_bytes`.
    pub fn max_frame_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_frame_bytes = bytes)
    }

    /// Sets `max_texts`.
    pub fn max_texts(self, texts: usize) -> Self {
        self.with(|c| c.max_texts = texts)
    }

    /// Sets `max_text_bytes`.
    pub fn max_text_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_text_bytes = bytes)
    }

    /// Sets `request_timeout_ms`.
    pub fn request_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.request_timeout_ms = millis(timeout))
    }

    /// Sets `default_deadline_ms`.
    pub fn default_deadline(self, deadline: Duration) -> Self {
        self.with(|c| c.default_deadline_ms = millis(deadline))
    }

    /// Sets `drain_timeout_ms`.
    pub fn drain_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.drain_timeout_ms = millis(timeout))
    }

    /// Enables `[chaos] crash_marker`: a worker given a text equal to
    /// `marker` aborts.
    pub fn crash_marker(self, marker: impl Into<String>) -> Self {
        let marker = marker.into();
        self.with(|c| c.chaos.crash_marker = Some(marker))
    }

    /// Enables `[chaos] hang_marker`: a worker given a text equal to
    /// `marker` never answers.
    pub fn hang_marker(self, marker: impl Into<String>) -> Self {
        let marker = marker.into();
        self.with(|c| c.chaos.hang_marker = Some(marker))
    }

    /// Enables `[chaos] leak_bytes_per_request`.
    pub fn leak_per_request(self, bytes: u64) -> Self {
        self.with(|c| c.chaos.leak_bytes_per_request = bytes)
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Passes `listener` to the daemon the way systemd socket activation
    /// does (fd 3, `LISTEN_FDS=1`, `LISTEN_PID`).
    pub fn listen_socket(mut self, listener: std::os::unix::net::UnixListener) -> Self {
        self.listen_socket = Some(std::sync::Arc::new(listener));
        self
    }

    /// Sets the daemon's `RUST_LOG`.
    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// Starts the daemon with `RLIMIT_NOFILE` soft = hard = `limit`, e.g.
    /// 1024 for the soft limit systemd gives every service by default (here
    /// the hard limit too, so the daemon cannot raise it past that).
    pub fn nofile_limit(mut self, limit: u64) -> Self {
        self.nofile_limit = Some(limit);
        self
    }

    /// Sets the bound on the wait for readiness.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The config file's text for a daemon listening on `socket`: the
    /// daemon's own [`Config`], serialised.
    pub fn to_toml(&self, socket: &Path) -> String {
        let config = Config {
            socket: socket.to_owned(),
            ..self.config.clone()
        };
        toml::to_string(&config).expect("the daemon's config serialises to TOML")
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Number of workers in state "ready".
pub fn ready_count(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateKind::Ready)
        .count()
}

/// Number of workers that serve: in state "ready" or "busy".
pub fn serving_count(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state.is_serving())
        .count()
}

/// Worker exits of `kind` counted in `status`.
pub fn exit_count(status: &PoolStatus, kind: ExitKind) -> u64 {
    status
        .counters
        .worker_exits
        .get(&kind)
        .copied()
        .unwrap_or(0)
}

/// Pids of all workers in `status`.
pub fn worker_pids(status: &PoolStatus) -> Vec<u32> {
    status.workers.iter().map(|w| w.pid).collect()
}

/// A running `inferd`. Dropping it SIGKILLs the daemon and any worker it
/// started that is still alive, and removes its temp dir (kept when
/// `INFERD_TEST_KEEP` is set; the log tail is printed when the test panics).
#[derive(Debug)]
pub struct Daemon {
    /// Holds the config, the log and (by default) the socket.
    dir: tempfile::TempDir,
    /// What the daemon was started with.
    config: DaemonConfig,
    /// The socket the daemon listens on.
    socket: PathBuf,
    /// The config file passed with `--config`.
    config_path: PathBuf,
    /// stdout and stderr of the daemon (and its workers), interleaved.
    log_path: PathBuf,
    /// The daemon process; a mutex so that `&self` methods can reap it.
    child: Mutex<Child>,
    /// The daemon's pid.
    pid: u32,
    /// Every worker pid any status answer showed, to clean up on drop.
    seen_workers: Mutex<BTreeSet<u32>>,
}

impl Daemon {
    /// Starts a daemon and waits (bounded) until its socket answers and
    /// `config.workers` workers are "ready". Panics, with the daemon's log,
    /// if it exits or is not ready in time.
    pub async fn start(config: DaemonConfig) -> Daemon {
        let daemon = Daemon::spawn(config);
        daemon.wait_ready().await;
        daemon
    }

    /// Starts a daemon without waiting for it.
    pub fn spawn(config: DaemonConfig) -> Daemon {
        let inferd = binary("inferd");
        // The worker binary must exist too, or every test fails obscurely.
        let _ = binary("inferd-worker");
        let dir = tempfile::Builder::new()
            .prefix("inferd-e2e-")
            .tempdir()
            .expect("create a temp dir");
        let socket = config
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("inferd.sock"));
        let config_path = dir.path().join("inferd.toml");
        std::fs::write(&config_path, config.to_toml(&socket)).expect("write the config file");
        let log_path = dir.path().join("inferd.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create the log file");
        let log_err = log.try_clone().expect("clone the log file handle");
        let mut command = match &config.listen_socket {
            // LISTEN_PID must be the daemon's own pid: a shell sets it to
            // its pid ($$) and then execs the daemon, keeping that pid.
            Some(listener) => {
                let fd = std::os::fd::AsRawFd::as_raw_fd(listener.as_ref());
                let mut command = Command::new("/bin/sh");
                command
                    .arg("-c")
                    .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
                    .arg(&inferd);
                // SAFETY: dup2 is async-signal-safe; fd stays open in the
                // parent (the config holds the listener) until spawn returns.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                        if libc::dup2(fd, 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                command
            }
            None => Command::new(&inferd),
        };
        if let Some(limit) = config.nofile_limit {
            // Runs after any pre_exec registered above (closures run in
            // order); the limit is inherited through the shell's exec.
            // SAFETY: setrlimit is async-signal-safe and allocates nothing.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", &config.rust_log)
            .env("RUST_BACKTRACE", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("INFERD_SOCKET")
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", inferd.display()));
        let pid = child.id();
        Daemon {
            dir,
            config,
            socket,
            config_path,
            log_path,
            child: Mutex::new(child),
            pid,
            seen_workers: Mutex::new(BTreeSet::new()),
        }
    }

    /// Waits (bounded by the config's `ready_timeout`) until the socket
    /// answers status with `workers` workers in state "ready".
    pub async fn wait_ready(&self) -> PoolStatus {
        let want = self.config.config.workers as usize;
        let alive = || match self.exit_status() {
            Some(status) => Err(format!("exited with {status}")),
            None => Ok(()),
        };
        match wait_ready(&self.socket, want, self.config.ready_timeout, alive).await {
            Ok(status) => status,
            Err(err) => panic!("{err}"),
        }
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The daemon's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// What the daemon was started with.
    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A connected client; panics if connecting fails.
    pub async fn client(&self) -> Client {
        self.try_client()
            .await
            .unwrap_or_else(|e| panic!("cannot connect a client: {e}"))
    }

    /// A connected client, or why not.
    pub async fn try_client(&self) -> Result<Client, ClientError> {
        Client::connect_as(&self.socket, "inferd-tests").await
    }

    /// A status snapshot over a fresh connection; panics on failure.
    pub async fn status(&self) -> PoolStatus {
        self.try_status()
            .await
            .unwrap_or_else(|e| panic!("status failed: {e}"))
    }

    /// A status snapshot over a fresh connection, or why not. Records the
    /// worker pids it shows, for cleanup.
    pub async fn try_status(&self) -> Result<PoolStatus, ClientError> {
        let status = self.try_client().await?.status().await?;
        lock(&self.seen_workers).extend(worker_pids(&status));
        Ok(status)
    }

    /// Polls status until `pred` holds; panics with the last status and the
    /// log at `timeout`. Failing status requests are retried until then.
    pub async fn wait_for(
        &self,
        mut pred: impl FnMut(&PoolStatus) -> bool,
        timeout: Duration,
    ) -> PoolStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_status().await {
                Ok(status) if pred(&status) => return status,
                Ok(status) => format_status(&status),
                Err(err) => format!("status failed: {err}"),
            };
            if Instant::now() >= deadline {
                panic!("condition on the status not met within {timeout:?}; last status:\n{last}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Polls the log until it contains `needle`; returns the log. Panics at
    /// `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() >= deadline {
                panic!("the daemon log did not mention {needle:?} within {timeout:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The log so far (daemon and workers, stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        kill(pid_of(self.pid), signal)
            .unwrap_or_else(|e| panic!("kill({}, {signal}) failed: {e}", self.pid));
    }

    /// Sends `signal` to the worker with pid `pid`.
    pub fn signal_worker(&self, pid: u32, signal: Signal) {
        kill(pid_of(pid), signal).unwrap_or_else(|e| panic!("kill({pid}, {signal}) failed: {e}"));
    }

    /// The daemon's exit status if it has exited (reaps it).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .try_wait()
            .expect("try_wait on the daemon")
    }

    /// Polls until the daemon exits; `None` if it still runs at `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL.min(Duration::from_millis(10))).await;
        }
    }

    /// An `inferctl` command aimed at this daemon's socket.
    pub fn inferctl(&self) -> Command {
        let mut cmd = Command::new(binary("inferctl"));
        cmd.env("INFERD_SOCKET", &self.socket);
        cmd
    }

    /// The last lines of the log, framed for a panic message.
    pub fn log_report(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(120)..];
        format!(
            "---- inferd log ({}, last {} of {} lines) ----\n{}\n---- end of log ----",
            self.log_path.display(),
            tail.len(),
            lines.len(),
            tail.join("\n")
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Collect the workers before the daemon dies and they are reparented.
        let mut workers = std::mem::take(
            self.seen_workers
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
        );
        workers.extend(children_of(self.pid));
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in workers {
            // Only ours: a recycled pid would now run something else.
            let ours = comm(pid).is_some_and(|c| c.starts_with("inferd"));
            if ours && pid_alive(pid) {
                let _ = kill(pid_of(pid), Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_report());
        }
        if std::env::var_os("INFERD_TEST_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("keeping {}", self.dir.path().display());
        }
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pids fit in an i32"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_has_the_contract_keys() {
        let config = DaemonConfig::with_model(("/m/model.onnx".into(), "/m/tokenizer.json".into()))
            .workers(3)
            .max_texts(8)
            .request_timeout(Duration::from_secs(2))
            .crash_marker("__crash__");
        let text = config.to_toml(Path::new("/tmp/x/inferd.sock"));
        let value: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(value["socket"].as_str(), Some("/tmp/x/inferd.sock"));
        assert_eq!(value["workers"].as_integer(), Some(3));
        assert_eq!(value["model"].as_str(), Some("/m/model.onnx"));
        assert_eq!(value["tokenizer"].as_str(), Some("/m/tokenizer.json"));
        assert_eq!(value["max_texts"].as_integer(), Some(8));
        assert_eq!(value["request_timeout_ms"].as_integer(), Some(2000));
        assert_eq!(value["chaos"]["crash_marker"].as_str(), Some("__crash__"));
        // What the daemon reads back is the configuration the test built.
        let read: Config = toml::from_str(&text).expect("the daemon's own format");
        assert_eq!(
            read,
            Config {
                socket: "/tmp/x/inferd.sock".into(),
                ..config.config
            }
        );
    }
}
