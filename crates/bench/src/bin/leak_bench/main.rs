//! `inferd-leak-bench`: a long-running leak scenario against the real `inferd`
//! daemon, recording how the pool recycles leaking workers.
//!
//! How it works:
//!
//! 1. **Config.** Builds the daemon's TOML config as a table: socket (in a
//!    temp dir), workers, model, and, unless `--no-leak-keys`, the recycling
//!    keys `soft_limit` and `hard_limit` (only when given: left out, the
//!    daemon's own default applies), optional `max_requests` and
//!    `[chaos] leak_bytes_per_request` (each worker keeps that many bytes per
//!    request: a simulated leak). Every `--set` line is parsed as raw TOML and
//!    merged on top, and `--unset` removes a key, so the tool keeps working
//!    when the daemon's keys are renamed. The result is written to the temp
//!    dir and copied to `OUT/inferd.toml`.
//! 2. **Start.** Runs `inferd --config FILE` (stdout and stderr to
//!    `OUT/inferd.log`) under a [`Daemon`] guard that SIGTERMs, then SIGKILLs,
//!    the daemon on every exit path, and polls `status` (bounded by
//!    `--startup-timeout`) until every worker is ready.
//! 3. **Load.** `--clients` tasks, one connection each, send embed requests
//!    back to back until `--duration` has passed: one short sentence each
//!    (`--traffic short`), or a cycle of short, long and batch requests
//!    (`--traffic mixed`). Each request is bounded by `--request-timeout`;
//!    every failure is kept with its request kind, error kind and error text.
//!    A connection error drops the connection and reconnects after a short
//!    pause.
//! 4. **Sample.** Meanwhile, every `--interval-ms`, the main task reads
//!    `status` (each worker's id, pid, state, RSS; the limits and spare
//!    target the daemon resolved) and the supervisor's own RSS and CPU time
//!    from `/proc/PID/statm` and `/proc/PID/stat`. With `--kill-every`, it
//!    SIGKILLs one serving worker from the latest sample on schedule. It
//!    also notices the daemon exiting early and Ctrl-C, both of which end
//!    the run early.
//! 5. **Stop.** Joins the clients (bounded), reads the final counters, sends
//!    SIGTERM and waits for the exit (bounded by `--shutdown-timeout`, then
//!    SIGKILL).
//! 6. **Report.** Writes `samples.csv`, `failures.csv`, `summary.json` and
//!    `rss.svg` (worker RSS over time with the limits, and the supervisor's
//!    RSS in a lower panel) into `--out`, and prints a Markdown table plus the
//!    exact command line. The limits reported and drawn are those the
//!    daemon's status gave, not the flags. Exits non-zero if the daemon died or was killed, or
//!    the run was interrupted, after writing what it has.
//!
//! "Serving" workers below are those in state `ready` or `busy`: under load a
//! healthy worker is mostly busy, so `ready` alone would say little.
//!
//! Run from a release build, from the repository root:
//! `cargo run --release -p inferd-bench --bin inferd-leak-bench -- --model-dir ~/.cache/inferd/models`.

mod config;
mod csv;
mod daemon;
mod kills;
mod load;
mod plot;
mod procfs;
mod report;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::config::{daemon_config, parse_limit, Requested};
use crate::csv::{write_failures_csv, write_samples_csv};
use crate::daemon::Daemon;
use crate::load::Traffic;
use crate::plot::plot;
use crate::procfs::ProcClock;
use crate::report::{command_line, Report};
use crate::scenario::scenario;

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
    /// What the clients send.
    #[arg(long, value_enum, default_value_t = Traffic::Short)]
    traffic: Traffic,
    /// SIGKILL one serving (ready or busy, never spare) worker every this
    /// many seconds of load, the first at SECS [default: none].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    kill_every: Option<u64>,
    /// Sampling period of status and /proc, in milliseconds (at least 10).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    interval_ms: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Bytes each worker keeps per request (`[chaos] leak_bytes_per_request`).
    #[arg(long, default_value_t = 2_097_152)]
    leak_bytes: u64,
    /// Graceful-recycle limit (`soft_limit`): a size such as 260MiB, `auto`
    /// or `off` [default: not set: the daemon's own default (auto)].
    #[arg(long, value_name = "SIZE|auto|off", value_parser = parse_limit)]
    soft_limit: Option<String>,
    /// Kill limit (`hard_limit`): a size such as 400MiB, `auto` or `off`
    /// [default: not set: the daemon's own default (auto)].
    #[arg(long, value_name = "SIZE|auto|off", value_parser = parse_limit)]
    hard_limit: Option<String>,
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
    let requested = Requested::from_config(&config);
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

    // The clients run on the worker threads; the sampler, in `block_on`, on
    // this one, so decoding big answers does not delay a sample.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let recorded = runtime.block_on(scenario(&args, &mut daemon, &proc_clock))?;
    let exit = daemon.stop(Duration::from_secs(args.shutdown_timeout));
    drop(runtime);

    let report = Report::new(&args, &command, &config_text, &requested, &recorded, &exit);
    write_samples_csv(&args.out.join("samples.csv"), &recorded.samples)?;
    write_failures_csv(&args.out.join("failures.csv"), &recorded.load.failures)?;
    let summary_path = args.out.join("summary.json");
    let json = serde_json::to_string_pretty(&report.summary).context("encoding summary.json")?;
    std::fs::write(&summary_path, json + "\n")
        .with_context(|| format!("writing {}", summary_path.display()))?;
    plot(
        &args.out.join("rss.svg"),
        &recorded.samples,
        recorded.settings.last().map(|(_, settings)| settings),
        [&report.title(), &report.supervisor_title()],
    )?;
    print!("{}", report.markdown(&args.out));

    if let Some(problem) = report.problem() {
        bail!("{problem} (outputs written to {})", args.out.display());
    }
    Ok(())
}
