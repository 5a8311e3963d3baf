//! `inferd-leak-bench`: a long-running leak scenario against the real `inferd`
//! daemon, recording how the pool recycles leaking workers.
//!
//! How it works:
//!
//! 1. **Config.** Builds the daemon's TOML config as a table: socket (in a
//!    temp dir), workers, model, and, unless `--no-leak-keys`, the recycling
//!    keys `soft_limit`, `hard_limit`, optional `max_requests` and
//!    `[chaos] leak_bytes_per_request` (each worker keeps that many bytes per
//!    request: a simulated leak). Every `--set` line is parsed as raw TOML and
//!    merged on top, and `--unset` removes a key, so the tool keeps working
//!    when the daemon's keys are renamed. The result is written to the temp
//!    dir and copied to `OUT/inferd.toml`.
//! 2. **Start.** Runs `inferd --config FILE` (stdout and stderr to
//!    `OUT/inferd.log`) under a [`Daemon`] guard that SIGTERMs, then SIGKILLs,
//!    the daemon on every exit path, and polls `status` (bounded by
//!    `--startup-timeout`) until every worker is ready.
//! 3. **Load.** `--clients` tasks, one connection each, send one-text embed
//!    requests (a rotating set of short sentences) back to back until
//!    `--duration` has passed. Each request is bounded by `--request-timeout`;
//!    every failure is kept with its kind and its error text. A connection
//!    error drops the connection and reconnects after a short pause.
//! 4. **Sample.** Meanwhile, every `--interval-ms`, the main task reads
//!    `status` (each worker's id, pid, state, RSS) and the supervisor's own RSS
//!    and CPU time from `/proc/PID/statm` and `/proc/PID/stat`. It also notices
//!    the daemon exiting early and Ctrl-C, both of which end the run early.
//! 5. **Stop.** Joins the clients (bounded), reads the final counters, sends
//!    SIGTERM and waits for the exit (bounded by `--shutdown-timeout`, then
//!    SIGKILL).
//! 6. **Report.** Writes `samples.csv`, `failures.csv`, `summary.json` and
//!    `rss.svg` (worker RSS over time with the limits, and the supervisor's
//!    RSS in a lower panel) into `--out`, and prints a Markdown table plus the
//!    exact command line. Exits non-zero if the daemon died or was killed, or
//!    the run was interrupted, after writing what it has.
//!
//! "Serving" workers below are those in state `ready` or `busy`: under load a
//! healthy worker is mostly busy, so `ready` alone would say little.
//!
//! Run from a release build, from the repository root:
//! `cargo run --release -p inferd-bench --bin inferd-leak-bench -- --model-dir ~/.cache/inferd/models`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use inferd_client::{Client, ClientError, Counters, PoolStatus};
use inferd_client::{ExitKind, WorkerStateKind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use toml::{Table, Value};

const MIB: f64 = 1024.0 * 1024.0;

/// Run a leak/recycle scenario against the inferd daemon and record it.
#[derive(Parser, Debug)]
#[command(name = "inferd-leak-bench")]
struct Args {
    /// Model cache laid out by scripts/fetch-model.
    #[arg(long, env = "INFERD_MODEL_DIR")]
    model_dir: PathBuf,
    /// Model subdirectory (holding model.onnx and tokenizer.json).
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    /// The inferd executable [default: inferd beside this executable].
    #[arg(long)]
    inferd: Option<PathBuf>,
    /// Output directory for the CSV, JSON, SVG, config and daemon log.
    #[arg(long, default_value = "docs/leak-bench")]
    out: PathBuf,
    /// Seconds of load.
    #[arg(long, default_value_t = 180)]
    duration: u64,
    /// Concurrent client connections sending requests back to back.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Sampling period of status and /proc, in milliseconds.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    interval_ms: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Bytes each worker keeps per request (`[chaos] leak_bytes_per_request`).
    #[arg(long, default_value_t = 2_097_152)]
    leak_bytes: u64,
    /// Graceful-recycle limit (`soft_limit`), e.g. 260MiB.
    #[arg(long, default_value = "260MiB", value_parser = Size::parse)]
    soft_limit: Size,
    /// Kill limit (`hard_limit`), e.g. 400MiB.
    #[arg(long, default_value = "400MiB", value_parser = Size::parse)]
    hard_limit: Size,
    /// Recycle a worker after this many requests (`max_requests`) [default: not set].
    #[arg(long)]
    max_requests: Option<u64>,
    /// Leave out soft_limit, hard_limit, max_requests and
    /// chaos.leak_bytes_per_request (for a daemon that does not know them).
    #[arg(long)]
    no_leak_keys: bool,
    /// Raw TOML merged into the daemon config, e.g. `--set max_requests=500`,
    /// `--set chaos.leak_bytes_per_request=1048576`; a value that is not
    /// valid TOML is taken as a string (`--set soft_limit=300MiB`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Remove a (dotted) key from the daemon config after the --set lines.
    /// Repeatable.
    #[arg(long = "unset", value_name = "KEY")]
    unset: Vec<String>,
    /// Seconds to wait for every worker to be ready.
    #[arg(long, default_value_t = 120)]
    startup_timeout: u64,
    /// Seconds one request may take, client side (the daemon's own default
    /// deadline is 60 s).
    #[arg(long, default_value_t = 65)]
    request_timeout: u64,
    /// Seconds to wait for the daemon to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 60)]
    shutdown_timeout: u64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("inferd-leak-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let command = command_line();
    let model_dir = args.model_dir.join(&args.model);
    let model_file = model_dir.join("model.onnx");
    if !model_file.is_file() {
        bail!(
            "{} not found (fetch it with scripts/fetch-model, or set --model-dir)",
            model_file.display()
        );
    }
    let inferd = match args.inferd.clone() {
        Some(path) => path,
        None => std::env::current_exe()
            .context("locating this executable to find inferd beside it")?
            .with_file_name("inferd"),
    };
    if !inferd.is_file() {
        bail!(
            "{} not found (build it with `cargo build --release -p inferd-supervisor -p inferd-worker`, or pass --inferd)",
            inferd.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let tmp = tempfile::Builder::new()
        .prefix("inferd-leak-bench")
        .tempdir()
        .context("creating a temp dir")?;
    let socket = tmp.path().join("inferd.sock");
    let config = daemon_config(&args, &socket, &model_file)?;
    let limits = Limits::from_config(&config, &args);
    let config_text = toml::to_string(&config).context("writing the daemon config as TOML")?;
    let config_path = tmp.path().join("inferd.toml");
    std::fs::write(&config_path, &config_text)
        .with_context(|| format!("writing {}", config_path.display()))?;
    std::fs::write(args.out.join("inferd.toml"), &config_text)
        .with_context(|| format!("writing {}", args.out.join("inferd.toml").display()))?;

    let proc_clock = ProcClock::new()?;
    let log_path = args.out.join("inferd.log");
    let mut daemon = Daemon::start(&inferd, &config_path, socket, &log_path)?;
    eprintln!(
        "inferd-leak-bench: started {} (pid {}), log {}",
        inferd.display(),
        daemon.pid(),
        log_path.display()
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let recorded = runtime.block_on(scenario(&args, &mut daemon, &proc_clock))?;
    let exit = daemon.stop(Duration::from_secs(args.shutdown_timeout));
    drop(runtime);

    let report = Report::new(&args, &command, &config_text, &limits, &recorded, &exit);
    write_samples_csv(&args.out.join("samples.csv"), &recorded.samples)?;
    write_failures_csv(&args.out.join("failures.csv"), &recorded.load.failures)?;
    let summary_path = args.out.join("summary.json");
    let json = serde_json::to_string_pretty(&report.summary).context("encoding summary.json")?;
    std::fs::write(&summary_path, json + "\n")
        .with_context(|| format!("writing {}", summary_path.display()))?;
    plot(
        &args.out.join("rss.svg"),
        &recorded.samples,
        &limits,
        [&report.title(), &report.supervisor_title()],
    )?;
    print!("{}", report.markdown(&args.out));

    if let Some(problem) = report.problem() {
        bail!("{problem} (outputs written to {})", args.out.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Daemon config

/// The daemon's config as a TOML table: the scenario's keys, then every
/// `--set` line merged on top, then every `--unset` key removed.
fn daemon_config(args: &Args, socket: &Path, model: &Path) -> Result<Table> {
    let mut config = Table::new();
    config.insert("socket".into(), path_value(socket)?);
    config.insert("workers".into(), Value::Integer(args.workers.into()));
    config.insert("model".into(), path_value(model)?);
    if !args.no_leak_keys {
        config.insert(
            "soft_limit".into(),
            Value::String(args.soft_limit.text.clone()),
        );
        config.insert(
            "hard_limit".into(),
            Value::String(args.hard_limit.text.clone()),
        );
        if let Some(n) = args.max_requests {
            config.insert("max_requests".into(), integer(n, "--max-requests")?);
        }
        let mut chaos = Table::new();
        chaos.insert(
            "leak_bytes_per_request".into(),
            integer(args.leak_bytes, "--leak-bytes")?,
        );
        config.insert("chaos".into(), Value::Table(chaos));
    }
    for line in &args.set {
        merge(&mut config, parse_set(line)?);
    }
    for key in &args.unset {
        if !unset(&mut config, key) {
            bail!("--unset {key}: no such key in the daemon config");
        }
    }
    Ok(config)
}

fn path_value(path: &Path) -> Result<Value> {
    let text = path
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))?;
    Ok(Value::String(text.to_owned()))
}

fn integer(n: u64, flag: &str) -> Result<Value> {
    let n = i64::try_from(n).with_context(|| format!("{flag} {n} does not fit a TOML integer"))?;
    Ok(Value::Integer(n))
}

/// One `--set` line as a TOML table: `key = value` as written, or, when the
/// value is not valid TOML, with the value taken as a string.
fn parse_set(line: &str) -> Result<Table> {
    if let Ok(table) = line.parse::<Table>() {
        return Ok(table);
    }
    let (key, value) = line
        .split_once('=')
        .with_context(|| format!("--set {line:?}: expected KEY=VALUE"))?;
    let quoted = format!(
        "{} = {}",
        key.trim(),
        Value::String(value.trim().to_owned())
    );
    quoted
        .parse::<Table>()
        .with_context(|| format!("--set {line:?} is not a TOML key/value line"))
}

/// Merges `from` into `into`; tables merge key by key, anything else replaces.
fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(existing)), Value::Table(incoming)) => merge(existing, incoming),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Removes the dotted `key`; false if it was not there.
fn unset(table: &mut Table, key: &str) -> bool {
    match key.split_once('.') {
        None => table.remove(key).is_some(),
        Some((head, rest)) => match table.get_mut(head) {
            Some(Value::Table(inner)) => unset(inner, rest),
            _ => false,
        },
    }
}

/// A memory size as given (`"260MiB"`) and in bytes.
#[derive(Debug, Clone, PartialEq)]
struct Size {
    /// The text as given, passed to the daemon unchanged.
    text: String,
    /// Its value, for the plot and the summary.
    bytes: u64,
}

impl Size {
    /// Parses `N[.N][unit]` with unit B, KB/MB/GB (powers of 1000) or
    /// K/M/G, KiB/MiB/GiB (powers of 1024); no unit means bytes.
    fn parse(text: &str) -> Result<Size, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a size such as 300MiB"))?;
        let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "k" | "kib" => 1024.0,
            "m" | "mib" => MIB,
            "g" | "gib" => MIB * 1024.0,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        Ok(Size {
            text: trimmed.to_owned(),
            bytes: (number * multiplier).round() as u64,
        })
    }

    fn mib(&self) -> f64 {
        self.bytes as f64 / MIB
    }
}

/// The limits the plot and summary show, read back from the final config so
/// that `--set` overrides are reflected.
#[derive(Debug, Clone)]
struct Limits {
    soft: Size,
    hard: Size,
    /// Whether the daemon was given the limits (false: drawn for reference).
    soft_configured: bool,
    hard_configured: bool,
    /// `chaos.leak_bytes_per_request` as configured, if any.
    leak_bytes: Option<u64>,
    /// `max_requests` as configured, if any.
    max_requests: Option<u64>,
}

impl Limits {
    fn from_config(config: &Table, args: &Args) -> Limits {
        let size_key = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Size::parse(s).ok(),
            Some(Value::Integer(n)) => u64::try_from(*n).ok().map(|bytes| Size {
                text: n.to_string(),
                bytes,
            }),
            _ => None,
        };
        let uint = |value: Option<&Value>| {
            value
                .and_then(Value::as_integer)
                .and_then(|n| u64::try_from(n).ok())
        };
        let soft = size_key("soft_limit");
        let hard = size_key("hard_limit");
        Limits {
            soft_configured: soft.is_some(),
            hard_configured: hard.is_some(),
            soft: soft.unwrap_or_else(|| args.soft_limit.clone()),
            hard: hard.unwrap_or_else(|| args.hard_limit.clone()),
            leak_bytes: uint(
                config
                    .get("chaos")
                    .and_then(Value::as_table)
                    .and_then(|chaos| chaos.get("leak_bytes_per_request")),
            ),
            max_requests: uint(config.get("max_requests")),
        }
    }
}

// ---------------------------------------------------------------------------
// Daemon process

/// The daemon child; stopped (SIGTERM, then SIGKILL) and reaped on drop, so
/// no error path leaves it running.
struct Daemon {
    /// The `inferd` process.
    child: Child,
    /// Its client socket.
    socket: PathBuf,
    /// Its log file, quoted in errors.
    log: PathBuf,
    /// Exit status once reaped.
    exit: Option<ExitStatus>,
}

impl Daemon {
    fn start(inferd: &Path, config: &Path, socket: PathBuf, log: &Path) -> Result<Daemon> {
        let stderr = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = stderr
            .try_clone()
            .context("duplicating the log file handle")?;
        let child = Command::new(inferd)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", inferd.display()))?;
        Ok(Daemon {
            child,
            socket,
            log: log.to_owned(),
            exit: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the daemon has exited (reaping it).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            // An error here (ECHILD) cannot happen for our own unreaped child;
            // treating it as "still running" keeps the bounded waits in charge.
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait.
    fn stop(&mut self, grace: Duration) -> DaemonExit {
        if let Some(status) = self.exited() {
            return DaemonExit::Early(status);
        }
        let started = Instant::now();
        self.signal(Signal::SIGTERM);
        while started.elapsed() < grace {
            if let Some(status) = self.exited() {
                return DaemonExit::AfterSigterm {
                    status,
                    after: started.elapsed(),
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(Signal::SIGKILL);
        match self.child.wait() {
            Ok(status) => {
                self.exit = Some(status);
                DaemonExit::Killed {
                    status: Some(status),
                    grace,
                }
            }
            Err(_) => DaemonExit::Killed {
                status: None,
                grace,
            },
        }
    }

    fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // ESRCH (already exited, not yet reaped) is fine: the wait that
            // follows collects it.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// The last `lines` lines of the daemon's log, for error messages.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// How the daemon ended.
#[derive(Debug, Clone, Copy)]
enum DaemonExit {
    /// It exited on its own before we asked it to.
    Early(ExitStatus),
    /// It exited after our SIGTERM.
    AfterSigterm { status: ExitStatus, after: Duration },
    /// It ignored SIGTERM for `grace` and was SIGKILLed.
    Killed {
        status: Option<ExitStatus>,
        grace: Duration,
    },
}

impl DaemonExit {
    fn clean(&self) -> bool {
        matches!(self, Self::AfterSigterm { status, .. } if status.success())
    }

    fn describe(&self) -> String {
        match self {
            Self::Early(status) => format!("exited on its own during the run ({status})"),
            Self::AfterSigterm { status, after } => {
                format!("{status} {:.2} s after SIGTERM", after.as_secs_f64())
            }
            Self::Killed { status, grace } => format!(
                "still running {} s after SIGTERM; SIGKILLed ({})",
                grace.as_secs(),
                status.map_or("not reaped".to_owned(), |s| s.to_string())
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// The scenario: wait for ready, load + sample, final counters

/// Everything the run recorded.
struct Recorded {
    /// Status of the pool at the start of the load.
    initial: PoolStatus,
    /// One entry per sampling tick.
    samples: Vec<Sample>,
    /// What the clients saw.
    load: LoadLog,
    /// Wall time of the load phase.
    load_wall: Duration,
    /// The daemon's counters after the clients stopped (before SIGTERM),
    /// or from the last good sample if that read failed (e.g. after Ctrl-C,
    /// which the daemon gets too), with where they came from.
    final_counters: Option<(Counters, &'static str)>,
    /// Supervisor CPU seconds when the load started.
    supervisor_cpu_start: Option<f64>,
    /// Status reads that failed or timed out during sampling.
    status_errors: u64,
    /// Why the run ended before `--duration`, if it did.
    cut_short: Option<String>,
}

/// One sampling tick.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the load started.
    t_s: f64,
    /// Workers in the status; empty if status could not be read.
    workers: Vec<WorkerSample>,
    /// Workers ready or busy; `None` if status could not be read.
    serving: Option<usize>,
    /// Supervisor RSS, bytes.
    supervisor_rss: Option<u64>,
    /// Supervisor utime + stime since it started, seconds.
    supervisor_cpu_s: Option<f64>,
}

/// One worker in one sample.
#[derive(Debug, Clone)]
struct WorkerSample {
    id: u64,
    pid: u32,
    state: WorkerStateKind,
    rss_bytes: Option<u64>,
}

async fn scenario(args: &Args, daemon: &mut Daemon, clock: &ProcClock) -> Result<Recorded> {
    let initial = wait_ready(
        daemon,
        args.workers,
        Duration::from_secs(args.startup_timeout),
    )
    .await?;
    eprintln!(
        "inferd-leak-bench: {} workers ready; {} clients for {} s",
        args.workers, args.clients, args.duration
    );
    let pid = daemon.pid();
    let supervisor_cpu_start = clock.read(pid).ok().map(|p| p.cpu_s);
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let request_timeout = Duration::from_secs(args.request_timeout);

    let mut clients = tokio::task::JoinSet::new();
    for index in 0..args.clients {
        clients.spawn(client_loop(
            index,
            daemon.socket.clone(),
            start,
            end,
            request_timeout,
            Arc::clone(&stop),
        ));
    }

    let mut samples = Vec::new();
    let mut status_errors = 0;
    let mut cut_short = None;
    let mut sampler: Option<Client> = None;
    let mut last_counters = None;
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                cut_short = Some("interrupted (Ctrl-C)".to_owned());
                break;
            }
        }
        if let Some(status) = daemon.exited() {
            cut_short = Some(format!(
                "the daemon exited during the run ({status}); log tail:\n{}",
                daemon.log_tail(20)
            ));
            break;
        }
        let status = status_once(&mut sampler, &daemon.socket).await;
        match &status {
            Some(status) => last_counters = Some(status.counters.clone()),
            None => status_errors += 1,
        }
        let own = clock.read(pid).ok();
        samples.push(Sample {
            t_s: start.elapsed().as_secs_f64(),
            serving: status.as_ref().map(serving_workers),
            workers: status
                .map(|s| {
                    s.workers
                        .into_iter()
                        .map(|w| WorkerSample {
                            id: w.id,
                            pid: w.pid,
                            state: w.state,
                            rss_bytes: w.rss_bytes,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            supervisor_rss: own.map(|p| p.rss_bytes),
            supervisor_cpu_s: own.map(|p| p.cpu_s),
        });
    }
    stop.store(true, Ordering::Relaxed);

    let mut load = LoadLog::default();
    let join_bound = request_timeout + CONNECT_TIMEOUT + Duration::from_secs(5);
    let joined = tokio::time::timeout(join_bound, async {
        while let Some(result) = clients.join_next().await {
            match result {
                Ok(log) => load.absorb(log),
                Err(err) => load.failures.push(Failure {
                    t_s: start.elapsed().as_secs_f64(),
                    client: usize::MAX,
                    kind: "client_task".into(),
                    error: err.to_string(),
                }),
            }
        }
    })
    .await;
    if joined.is_err() {
        clients.abort_all();
        cut_short.get_or_insert_with(|| {
            format!("clients did not stop within {} s", join_bound.as_secs())
        });
    }
    let load_wall = start.elapsed();
    let final_counters = match status_once(&mut None, &daemon.socket).await {
        Some(status) => Some((status.counters, "status after the load")),
        None => last_counters.map(|c| (c, "last sample (the final status read failed)")),
    };
    load.failures.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    Ok(Recorded {
        initial,
        samples,
        load,
        load_wall,
        final_counters,
        supervisor_cpu_start,
        status_errors,
        cut_short,
    })
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls status (bounded) until `workers` workers are ready.
async fn wait_ready(daemon: &mut Daemon, workers: u32, limit: Duration) -> Result<PoolStatus> {
    let deadline = Instant::now() + limit;
    let mut client = None;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(status) = daemon.exited() {
            bail!(
                "inferd exited during startup ({status}); log tail:\n{}",
                daemon.log_tail(20)
            );
        }
        if let Some(status) = status_once(&mut client, &daemon.socket).await {
            let ready = status
                .workers
                .iter()
                .filter(|w| w.state == WorkerStateKind::Ready)
                .count();
            if ready >= workers as usize {
                return Ok(status);
            }
            last = Some(format!(
                "{ready}/{workers} ready{}",
                status
                    .unavailable_reason
                    .as_deref()
                    .map(|r| format!(", unavailable: {r}"))
                    .unwrap_or_default()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "inferd not ready within {} s ({}); log tail:\n{}",
        limit.as_secs(),
        last.as_deref().unwrap_or("status never answered"),
        daemon.log_tail(20)
    )
}

/// One bounded status read over `client`, (re)connecting if needed; on any
/// failure the connection is dropped and `None` returned.
async fn status_once(client: &mut Option<Client>, socket: &Path) -> Option<PoolStatus> {
    let read = async {
        if client.is_none() {
            *client = Some(Client::connect_as(socket, "inferd-leak-bench").await.ok()?);
        }
        client.as_mut()?.status().await.ok()
    };
    let status = tokio::time::timeout(STATUS_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    if status.is_none() {
        *client = None;
    }
    status
}

fn serving_workers(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateKind::Ready || w.state == WorkerStateKind::Busy)
        .count()
}

// ---------------------------------------------------------------------------
// Load

/// Short sentences the clients rotate through.
const TEXTS: [&str; 8] = [
    "A man is eating food.",
    "A woman is playing the violin.",
    "The new movie is awesome.",
    "Two dogs run across a snowy field.",
    "The stock market fell sharply on Monday.",
    "Can you recommend a good book on Rust?",
    "It will rain in the afternoon.",
    "The train to Lyon leaves at nine.",
];

/// What one client (or all of them, merged) saw.
#[derive(Debug, Default)]
struct LoadLog {
    /// Requests answered with embeddings.
    ok: u64,
    /// Latency of each successful request, milliseconds.
    latencies_ms: Vec<f64>,
    /// Every failure, in the order seen.
    failures: Vec<Failure>,
}

impl LoadLog {
    fn absorb(&mut self, other: LoadLog) {
        self.ok += other.ok;
        self.latencies_ms.extend(other.latencies_ms);
        self.failures.extend(other.failures);
    }
}

/// One failed request or connection attempt.
#[derive(Debug, Clone)]
struct Failure {
    /// Seconds since the load started.
    t_s: f64,
    /// Client index.
    client: usize,
    /// The daemon's error kind, or the client-side failure kind.
    kind: String,
    /// The full error text.
    error: String,
}

/// Sends requests back to back until `end` or `stop`; every await is bounded.
async fn client_loop(
    index: usize,
    socket: PathBuf,
    start: Instant,
    end: Instant,
    request_timeout: Duration,
    stop: Arc<AtomicBool>,
) -> LoadLog {
    let mut log = LoadLog::default();
    let mut connection: Option<Client> = None;
    let mut next_text = index;
    let fail = |log: &mut LoadLog, kind: &str, error: String| {
        log.failures.push(Failure {
            t_s: start.elapsed().as_secs_f64(),
            client: index,
            kind: kind.to_owned(),
            error,
        });
    };
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let client = match connection.as_mut() {
            Some(client) => client,
            None => match tokio::time::timeout(
                CONNECT_TIMEOUT,
                Client::connect_as(&socket, "inferd-leak-bench"),
            )
            .await
            {
                Ok(Ok(client)) => connection.insert(client),
                Ok(Err(err)) => {
                    fail(&mut log, client_error_kind(&err), err.to_string());
                    pause_before_retry(end).await;
                    continue;
                }
                Err(_) => {
                    fail(
                        &mut log,
                        "connect_timeout",
                        format!("no connection within {CONNECT_TIMEOUT:?}"),
                    );
                    continue;
                }
            },
        };
        let text = TEXTS[next_text % TEXTS.len()];
        next_text += 1;
        let sent = Instant::now();
        match tokio::time::timeout(request_timeout, client.embed(vec![text.to_owned()], None)).await
        {
            Ok(Ok(_)) => {
                log.ok += 1;
                log.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok(Err(err)) => {
                fail(&mut log, client_error_kind(&err), err.to_string());
                if !err.is_request_error() {
                    connection = None;
                }
                pause_before_retry(end).await;
            }
            Err(_) => {
                // The answer may still come; the connection is out of step.
                fail(
                    &mut log,
                    "client_timeout",
                    format!("no answer within {request_timeout:?}"),
                );
                connection = None;
            }
        }
    }
    log
}

/// A short pause after a failure so a broken daemon is not hammered (and the
/// failure log stays a readable size); never past `end`.
async fn pause_before_retry(end: Instant) {
    let pause = Duration::from_millis(100).min(end.saturating_duration_since(Instant::now()));
    tokio::time::sleep(pause).await;
}

/// The failure kind: the daemon's own kind for typed errors, else what broke.
fn client_error_kind(err: &ClientError) -> &'static str {
    match err {
        ClientError::Request(request) => request.kind().as_str(),
        ClientError::Connect { .. } => "connect",
        ClientError::Handshake(_) => "handshake",
        ClientError::Send(_) => "send",
        ClientError::Receive(_) => "receive",
        ClientError::Closed => "closed",
        ClientError::UnexpectedResponse { .. } => "unexpected_response",
    }
}

// ---------------------------------------------------------------------------
// /proc readings of the supervisor

/// Page size and clock ticks, for turning /proc numbers into bytes and seconds.
struct ProcClock {
    page_size: u64,
    ticks_per_s: f64,
}

/// The supervisor's own numbers at one instant.
#[derive(Debug, Clone, Copy)]
struct ProcReading {
    rss_bytes: u64,
    cpu_s: f64,
}

impl ProcClock {
    fn new() -> Result<ProcClock> {
        Ok(ProcClock {
            page_size: sysconf(libc::_SC_PAGESIZE).context("sysconf(_SC_PAGESIZE)")?,
            ticks_per_s: sysconf(libc::_SC_CLK_TCK).context("sysconf(_SC_CLK_TCK)")? as f64,
        })
    }

    fn read(&self, pid: u32) -> Result<ProcReading> {
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let pages = parse_statm_resident(&statm).context("parsing statm")?;
        let ticks = parse_stat_cpu_ticks(&stat).context("parsing stat")?;
        Ok(ProcReading {
            rss_bytes: pages * self.page_size,
            cpu_s: ticks as f64 / self.ticks_per_s,
        })
    }
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

/// Resident pages: the second field of `/proc/PID/statm`.
fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime (fields 14 and 15) of `/proc/PID/stat`, in clock ticks.
/// Fields are counted after the command name's closing parenthesis, since
/// the name itself may contain spaces and parentheses.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // After the name, field 3 (state) is index 0, so utime (14) is index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

// ---------------------------------------------------------------------------
// Report: summary.json and the Markdown table

/// The contents of summary.json.
#[derive(Debug, Serialize)]
struct Summary {
    /// The command line that produced this run.
    command: String,
    /// The daemon config the run used (TOML).
    config_toml: String,
    workers: u32,
    clients: usize,
    interval_ms: u64,
    /// Requested load duration, seconds.
    duration_requested_s: u64,
    /// Actual load duration, seconds.
    duration_s: f64,
    /// Why the run ended early, if it did.
    cut_short: Option<String>,
    requests: RequestSummary,
    recycles: RecycleSummary,
    memory: MemorySummary,
    pool: PoolSummary,
    supervisor: SupervisorSummary,
    /// How the daemon ended.
    daemon_exit: String,
    /// The daemon's counters after the load (before SIGTERM), as it sent them.
    daemon_counters: Option<Counters>,
    /// Where `daemon_counters` come from.
    daemon_counters_from: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct RequestSummary {
    ok: u64,
    failed: u64,
    /// Failures by kind (daemon error kinds and client-side kinds).
    failed_by_kind: BTreeMap<String, u64>,
    /// Up to three distinct error texts per kind (all are in failures.csv).
    failure_examples: BTreeMap<String, Vec<String>>,
    ok_per_s: f64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_max_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct RecycleSummary {
    /// Worker exits during the run (each was replaced), from the final counters.
    worker_exits: u64,
    /// The same by classified end kind.
    worker_exits_by_kind: BTreeMap<ExitKind, u64>,
    /// Workers spawned during the run, from the counters.
    workers_spawned: u64,
    /// Any counter whose name mentions "recycl", as the daemon reports it.
    recycle_counters: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct MemorySummary {
    soft_limit: String,
    soft_limit_mib: f64,
    soft_limit_configured: bool,
    hard_limit: String,
    hard_limit_mib: f64,
    hard_limit_configured: bool,
    leak_bytes_per_request: Option<u64>,
    max_requests: Option<u64>,
    /// Largest worker RSS in any sample.
    max_worker_rss_mib: Option<f64>,
    /// Which worker had it.
    max_worker_rss_worker_id: Option<u64>,
    /// Whether any sample showed a worker above the hard limit.
    hard_limit_exceeded: bool,
    /// Distinct worker ids seen in the samples.
    worker_ids_seen: usize,
}

#[derive(Debug, Serialize)]
struct PoolSummary {
    samples: usize,
    /// Status reads that failed or timed out.
    status_errors: u64,
    /// Fewest workers ready or busy in any sample.
    min_serving_workers: Option<usize>,
}

#[derive(Debug, Serialize)]
struct SupervisorSummary {
    rss_min_mib: Option<f64>,
    rss_max_mib: Option<f64>,
    /// utime + stime spent during the load.
    cpu_s: Option<f64>,
    /// `cpu_s` as a share of one core over the load.
    cpu_percent_of_one_core: Option<f64>,
}

/// The summary plus what the Markdown and title need.
struct Report {
    summary: Summary,
    problem: Option<String>,
}

impl Report {
    fn new(
        args: &Args,
        command: &str,
        config_toml: &str,
        limits: &Limits,
        recorded: &Recorded,
        exit: &DaemonExit,
    ) -> Report {
        let load = &recorded.load;
        let mut failed_by_kind = BTreeMap::new();
        let mut failure_examples: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for failure in &load.failures {
            *failed_by_kind.entry(failure.kind.clone()).or_insert(0) += 1;
            let examples = failure_examples.entry(failure.kind.clone()).or_default();
            if examples.len() < 3 && !examples.contains(&failure.error) {
                examples.push(failure.error.clone());
            }
        }
        let mut latencies = load.latencies_ms.clone();
        latencies.sort_by(f64::total_cmp);
        let percentile = |p: f64| {
            let last = latencies.len().checked_sub(1)?;
            Some(latencies[((last as f64) * p).round() as usize])
        };
        let wall = recorded.load_wall.as_secs_f64();

        let counters = recorded.final_counters.as_ref().map(|(c, _)| c.clone());
        let initial = &recorded.initial.counters;
        let recycles = match &counters {
            Some(c) => RecycleSummary {
                worker_exits: c
                    .worker_exits
                    .values()
                    .sum::<u64>()
                    .saturating_sub(initial.worker_exits.values().sum::<u64>()),
                worker_exits_by_kind: c
                    .worker_exits
                    .iter()
                    .map(|(kind, n)| {
                        (
                            *kind,
                            n.saturating_sub(initial.worker_exits.get(kind).copied().unwrap_or(0)),
                        )
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                workers_spawned: c.workers_spawned.saturating_sub(initial.workers_spawned),
                recycle_counters: recycle_counters(c),
            },
            None => RecycleSummary {
                worker_exits: 0,
                worker_exits_by_kind: BTreeMap::new(),
                workers_spawned: 0,
                recycle_counters: serde_json::Map::new(),
            },
        };

        let mut max_worker: Option<(u64, u64)> = None;
        let mut ids = std::collections::BTreeSet::new();
        for worker in recorded.samples.iter().flat_map(|s| &s.workers) {
            ids.insert(worker.id);
            if let Some(rss) = worker.rss_bytes {
                if max_worker.is_none_or(|(_, max)| rss > max) {
                    max_worker = Some((worker.id, rss));
                }
            }
        }
        let supervisor_rss = recorded.samples.iter().filter_map(|s| s.supervisor_rss);
        let cpu_end = recorded
            .samples
            .iter()
            .rev()
            .find_map(|s| s.supervisor_cpu_s);
        let cpu_s = recorded
            .supervisor_cpu_start
            .zip(cpu_end)
            .map(|(a, b)| b - a);

        let mut problem = recorded.cut_short.clone();
        if !exit.clean() {
            problem.get_or_insert_with(|| format!("the daemon {}", exit.describe()));
        }
        let summary = Summary {
            command: command.to_owned(),
            config_toml: config_toml.to_owned(),
            workers: args.workers,
            clients: args.clients,
            interval_ms: args.interval_ms,
            duration_requested_s: args.duration,
            duration_s: round(wall, 3),
            cut_short: recorded.cut_short.clone(),
            requests: RequestSummary {
                ok: load.ok,
                failed: load.failures.len() as u64,
                failed_by_kind,
                failure_examples,
                ok_per_s: round(load.ok as f64 / wall.max(1e-9), 2),
                latency_p50_ms: percentile(0.5).map(|v| round(v, 2)),
                latency_p99_ms: percentile(0.99).map(|v| round(v, 2)),
                latency_max_ms: latencies.last().map(|v| round(*v, 2)),
            },
            recycles,
            memory: MemorySummary {
                soft_limit: limits.soft.text.clone(),
                soft_limit_mib: round(limits.soft.mib(), 2),
                soft_limit_configured: limits.soft_configured,
                hard_limit: limits.hard.text.clone(),
                hard_limit_mib: round(limits.hard.mib(), 2),
                hard_limit_configured: limits.hard_configured,
                leak_bytes_per_request: limits.leak_bytes,
                max_requests: limits.max_requests,
                max_worker_rss_mib: max_worker.map(|(_, rss)| round(rss as f64 / MIB, 2)),
                max_worker_rss_worker_id: max_worker.map(|(id, _)| id),
                hard_limit_exceeded: max_worker.is_some_and(|(_, rss)| rss > limits.hard.bytes),
                worker_ids_seen: ids.len(),
            },
            pool: PoolSummary {
                samples: recorded.samples.len(),
                status_errors: recorded.status_errors,
                min_serving_workers: recorded.samples.iter().filter_map(|s| s.serving).min(),
            },
            supervisor: SupervisorSummary {
                rss_min_mib: supervisor_rss
                    .clone()
                    .min()
                    .map(|b| round(b as f64 / MIB, 2)),
                rss_max_mib: supervisor_rss.max().map(|b| round(b as f64 / MIB, 2)),
                cpu_s: cpu_s.map(|s| round(s, 3)),
                cpu_percent_of_one_core: cpu_s.map(|s| round(100.0 * s / wall.max(1e-9), 2)),
            },
            daemon_exit: exit.describe(),
            daemon_counters: counters,
            daemon_counters_from: recorded.final_counters.as_ref().map(|(_, from)| *from),
        };
        Report { summary, problem }
    }

    fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The plot title: the key numbers.
    fn title(&self) -> String {
        let s = &self.summary;
        let leak = match s.memory.leak_bytes_per_request {
            Some(bytes) => format!("{} leaked/request", human_bytes(bytes)),
            None => "no leak configured".to_owned(),
        };
        format!(
            "inferd, {} workers, {leak}: {} ok, {} failed, {} recycles in {:.0} s",
            s.workers, s.requests.ok, s.requests.failed, s.recycles.worker_exits, s.duration_s
        )
    }

    /// The caption of the supervisor panel.
    fn supervisor_title(&self) -> String {
        let s = &self.summary.supervisor;
        let mib = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
        format!(
            "supervisor: RSS {} to {} MiB, CPU {} s ({}% of one core)",
            mib(s.rss_min_mib),
            mib(s.rss_max_mib),
            mib(s.cpu_s),
            mib(s.cpu_percent_of_one_core)
        )
    }

    /// A Markdown table for docs/BENCHMARKS.md, with the command line.
    fn markdown(&self, out: &Path) -> String {
        let s = &self.summary;
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.1}{unit}"));
        let configured = |yes: bool| if yes { "" } else { " (not configured)" };
        fn kinds<K: std::fmt::Display>(map: &BTreeMap<K, u64>) -> String {
            map.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
        let mut md = String::new();
        let _ = writeln!(md, "\nCommand: `{}`\n", s.command);
        let _ = writeln!(md, "| leak scenario | value |");
        let _ = writeln!(md, "|---|---|");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(md, "| {k} | {v} |");
        };
        row(
            "load",
            format!(
                "{:.1} s, {} clients, {} workers, one short text per request",
                s.duration_s, s.clients, s.workers
            ),
        );
        row(
            "leak",
            s.memory
                .leak_bytes_per_request
                .map_or("not configured".to_owned(), |b| {
                    format!("{} per request", human_bytes(b))
                }),
        );
        row(
            "limits",
            format!(
                "soft {}{}, hard {}{}{}",
                s.memory.soft_limit,
                configured(s.memory.soft_limit_configured),
                s.memory.hard_limit,
                configured(s.memory.hard_limit_configured),
                s.memory
                    .max_requests
                    .map(|n| format!(", max_requests {n}"))
                    .unwrap_or_default()
            ),
        );
        row(
            "requests ok",
            format!(
                "{} ({:.1}/s; p50 {}, p99 {}, max {})",
                s.requests.ok,
                s.requests.ok_per_s,
                opt(s.requests.latency_p50_ms, " ms"),
                opt(s.requests.latency_p99_ms, " ms"),
                opt(s.requests.latency_max_ms, " ms")
            ),
        );
        let failed = if s.requests.failed == 0 {
            "0".to_owned()
        } else {
            format!(
                "{} ({})",
                s.requests.failed,
                kinds(&s.requests.failed_by_kind)
            )
        };
        row("requests failed", failed);
        let exits = if s.recycles.worker_exits == 0 {
            "0".to_owned()
        } else {
            format!(
                "{} ({})",
                s.recycles.worker_exits,
                kinds(&s.recycles.worker_exits_by_kind)
            )
        };
        row("worker exits (recycles)", exits);
        if !s.recycles.recycle_counters.is_empty() {
            row(
                "recycle counters",
                describe_counters(&s.recycles.recycle_counters),
            );
        }
        row(
            "max worker RSS",
            format!(
                "{} (hard limit {:.0} MiB{})",
                opt(s.memory.max_worker_rss_mib, " MiB"),
                s.memory.hard_limit_mib,
                if s.memory.hard_limit_exceeded {
                    ", EXCEEDED"
                } else {
                    ""
                }
            ),
        );
        row(
            "min serving workers",
            format!(
                "{} of {} ({} samples every {} ms)",
                s.pool
                    .min_serving_workers
                    .map_or("n/a".to_owned(), |n| n.to_string()),
                s.workers,
                s.pool.samples,
                s.interval_ms
            ),
        );
        row(
            "supervisor RSS",
            format!(
                "{} to {}",
                opt(s.supervisor.rss_min_mib, " MiB"),
                opt(s.supervisor.rss_max_mib, " MiB")
            ),
        );
        row(
            "supervisor CPU",
            format!(
                "{} ({} of one core)",
                opt(s.supervisor.cpu_s, " s"),
                opt(s.supervisor.cpu_percent_of_one_core, "%")
            ),
        );
        row("daemon exit", s.daemon_exit.clone());
        let _ = writeln!(
            md,
            "\nFiles: {0}/samples.csv, {0}/failures.csv, {0}/summary.json, {0}/rss.svg, {0}/inferd.toml, {0}/inferd.log",
            out.display()
        );
        md
    }
}

/// Counters whose name mentions recycling, found by name so that counters
/// the daemon adds later show up without a change here.
fn recycle_counters(counters: &Counters) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(counters) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter(|(k, v)| k.contains("recycl") && !is_empty_counter(v))
            .collect(),
        _ => serde_json::Map::new(),
    }
}

/// Zero, or a map of nothing but zeros.
fn is_empty_counter(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Number(n) => n.as_u64() == Some(0),
        serde_json::Value::Object(map) => map.values().all(is_empty_counter),
        _ => false,
    }
}

/// `name n` pairs, one level of nesting flattened (`recycles.soft_limit 3`).
fn describe_counters(map: &serde_json::Map<String, serde_json::Value>) -> String {
    let mut parts = Vec::new();
    for (key, value) in map {
        match value {
            serde_json::Value::Object(inner) => {
                parts.extend(inner.iter().map(|(k, v)| format!("{key}.{k} {v}")))
            }
            other => parts.push(format!("{key} {other}")),
        }
    }
    parts.join(", ")
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

fn human_bytes(bytes: u64) -> String {
    let (value, unit) = match bytes as f64 {
        b if b >= MIB => (b / MIB, "MiB"),
        b if b >= 1024.0 => (b / 1024.0, "KiB"),
        b => (b, "B"),
    };
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
    }
}

/// The command line as typed, shell-quoted where needed.
fn command_line() -> String {
    std::env::args()
        .map(|arg| shell_quote(&arg))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------
// CSV files

fn write_samples_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(
        out,
        "t_s,worker_id,pid,rss_mib,ready_workers,supervisor_rss_mib,supervisor_cpu_s,state"
    )?;
    for sample in samples {
        let shared = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            write!(
                out,
                "{},{},{}",
                sample.serving.map(|n| n.to_string()).unwrap_or_default(),
                sample
                    .supervisor_rss
                    .map(|b| format!("{:.2}", b as f64 / MIB))
                    .unwrap_or_default(),
                sample
                    .supervisor_cpu_s
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or_default(),
            )
        };
        if sample.workers.is_empty() {
            write!(out, "{:.3},,,,", sample.t_s)?;
            shared(&mut out)?;
            writeln!(out, ",")?;
        }
        for worker in &sample.workers {
            write!(
                out,
                "{:.3},{},{},{},",
                sample.t_s,
                worker.id,
                worker.pid,
                worker
                    .rss_bytes
                    .map(|b| format!("{:.2}", b as f64 / MIB))
                    .unwrap_or_default()
            )?;
            shared(&mut out)?;
            writeln!(out, ",{}", csv_field(worker.state.as_str()))?;
        }
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

fn write_failures_csv(path: &Path, failures: &[Failure]) -> Result<()> {
    let mut out =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(out, "t_s,client,kind,error")?;
    for f in failures {
        writeln!(
            out,
            "{:.3},{},{},{}",
            f.t_s,
            f.client,
            csv_field(&f.kind),
            csv_field(&f.error)
        )?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

// ---------------------------------------------------------------------------
// Plot

/// Distinguishable line colours for workers (matplotlib's tab10 without its
/// orange and red, which mark the limits), cycled by worker id.
const WORKER_COLORS: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// `rss.svg`: worker RSS over time (one line per worker id) with the limits,
/// and the supervisor's RSS in a lower panel.
fn plot(path: &Path, samples: &[Sample], limits: &Limits, titles: [&str; 2]) -> Result<()> {
    use plotters::prelude::*;

    let mut workers: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in samples {
        for worker in &sample.workers {
            if let Some(rss) = worker.rss_bytes {
                workers
                    .entry(worker.id)
                    .or_default()
                    .push((sample.t_s, rss as f64 / MIB));
            }
        }
    }
    let supervisor: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.t_s, s.supervisor_rss? as f64 / MIB)))
        .collect();
    let x_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let highest =
        |points: &mut dyn Iterator<Item = &(f64, f64)>| points.map(|(_, y)| *y).fold(0.0, f64::max);
    let worker_max = highest(&mut workers.values().flatten());
    // Head room above the highest line for the legend box.
    let y_max = (limits.hard.mib().max(limits.soft.mib()).max(worker_max) * 1.3).max(1.0);
    let sup_max = (highest(&mut supervisor.iter()) * 1.25).max(1.0);
    let whole = |v: &f64| format!("{v:.0}");

    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(540);

    let mut chart = ChartBuilder::on(&upper)
        .caption(titles[0], ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("worker RSS (MiB)")
        .x_label_formatter(&whole)
        .y_label_formatter(&whole)
        .draw()?;
    let worker_color = |i: usize| {
        let (r, g, b) = WORKER_COLORS[i % WORKER_COLORS.len()];
        RGBColor(r, g, b)
    };
    for (i, points) in workers.values().enumerate() {
        let style = worker_color(i).stroke_width(2);
        let series = chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
        if i == 0 {
            series
                .label(format!(
                    "worker RSS, one line per worker id ({} ids)",
                    workers.len()
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    for (size, configured, name, color) in [
        (
            &limits.soft,
            limits.soft_configured,
            "soft limit",
            RGBColor(230, 140, 0),
        ),
        (&limits.hard, limits.hard_configured, "hard limit", RED),
    ] {
        let y = size.mib();
        // A limit the daemon was not given is drawn faint, for reference.
        let (style, note) = if configured {
            (color.stroke_width(2), "")
        } else {
            (color.mix(0.4).stroke_width(2), " (not configured)")
        };
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, y), (x_max, y)],
                8,
                5,
                style,
            ))?
            .label(format!("{name} {}{note}", size.text))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut chart = ChartBuilder::on(&lower)
        .caption(titles[1], ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..sup_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("supervisor RSS (MiB)")
        .x_label_formatter(&whole)
        .y_labels(5)
        .draw()?;
    chart.draw_series(LineSeries::new(supervisor, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["inferd-leak-bench", "--model-dir", "/models"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    fn config(extra: &[&str]) -> Table {
        daemon_config(
            &args(extra),
            Path::new("/tmp/s.sock"),
            Path::new("/m/model.onnx"),
        )
        .expect("config builds")
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(
            Size::parse("260MiB").map(|s| s.bytes),
            Ok(260 * 1024 * 1024)
        );
        assert_eq!(Size::parse(" 400 MB ").map(|s| s.bytes), Ok(400_000_000));
        assert_eq!(
            Size::parse("1.5GiB").map(|s| s.bytes),
            Ok(3 * 512 * 1024 * 1024)
        );
        assert_eq!(Size::parse("4096").map(|s| s.bytes), Ok(4096));
        assert!(Size::parse("lots").is_err());
        assert!(Size::parse("3 parsecs").is_err());
    }

    #[test]
    fn default_config_has_leak_keys_and_round_trips() {
        let table = config(&[]);
        let text = toml::to_string(&table).expect("serialises");
        let back: Table = text.parse().expect("valid TOML");
        assert_eq!(back, table);
        assert_eq!(back["soft_limit"].as_str(), Some("260MiB"));
        assert_eq!(back["hard_limit"].as_str(), Some("400MiB"));
        assert_eq!(
            back["chaos"]["leak_bytes_per_request"].as_integer(),
            Some(2_097_152)
        );
        assert_eq!(back["workers"].as_integer(), Some(2));
        assert!(back.get("max_requests").is_none());
    }

    #[test]
    fn no_leak_keys_leaves_only_todays_keys() {
        let table = config(&["--no-leak-keys"]);
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model", "socket", "workers"]);
    }

    #[test]
    fn set_merges_raw_toml_and_unset_removes() {
        let table = config(&[
            "--set",
            "soft_limit=300MiB",
            "--set",
            "chaos.crash_marker = \"boom\"",
            "--set",
            "memory = { hard_limit = \"1GiB\" }",
            "--unset",
            "hard_limit",
        ]);
        assert_eq!(table["soft_limit"].as_str(), Some("300MiB"));
        assert_eq!(table["chaos"]["crash_marker"].as_str(), Some("boom"));
        assert_eq!(
            table["chaos"]["leak_bytes_per_request"].as_integer(),
            Some(2_097_152)
        );
        assert_eq!(table["memory"]["hard_limit"].as_str(), Some("1GiB"));
        assert!(table.get("hard_limit").is_none());
        let limits = Limits::from_config(&table, &args(&[]));
        assert_eq!(limits.soft.text, "300MiB");
        assert!(limits.soft_configured);
        assert!(
            !limits.hard_configured,
            "hard limit drawn from the flag, marked unconfigured"
        );
        assert!(parse_set("no equals sign").is_err());
        let mut table = table;
        assert!(!unset(&mut table, "chaos.nope"));
    }

    #[test]
    fn recycle_counters_drop_zeros_and_flatten() {
        let counters = serde_json::json!({"recycles": {"soft_limit": 3, "max_requests": 0}, "recycles_total": 0});
        assert!(!is_empty_counter(&counters["recycles"]));
        assert!(is_empty_counter(&counters["recycles_total"]));
        assert!(is_empty_counter(&serde_json::json!({"a": 0, "b": {}})));
        let map = counters.as_object().expect("an object").clone();
        assert_eq!(
            describe_counters(&map),
            "recycles.max_requests 0, recycles.soft_limit 3, recycles_total 0"
        );
        assert!(recycle_counters(&Counters::default()).is_empty());
    }

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_statm_resident("12345 678 90 1 0 200 0\n"), Some(678));
        let stat = "4242 (inferd (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 3 0 100 1000000 500";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(175));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_process_reads() {
        let clock = ProcClock::new().expect("sysconf");
        let own = clock.read(std::process::id()).expect("own /proc readable");
        assert!(own.rss_bytes > 1024 * 1024, "{own:?}");
        assert!(own.cpu_s >= 0.0);
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(human_bytes(2_097_152), "2 MiB");
        assert_eq!(human_bytes(262_144), "256 KiB");
        assert_eq!(human_bytes(1_572_864), "1.5 MiB");
        assert_eq!(human_bytes(100), "100 B");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--duration"), "--duration");
        assert_eq!(
            shell_quote("soft_limit = \"1GiB\""),
            "'soft_limit = \"1GiB\"'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    }
}
