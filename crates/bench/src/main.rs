//! `inferd-bench`: the in-process engine against the same model served by a
//! real `inferd` daemon (started here, 1 and 2 workers), for a short and a
//! ~128-token text. Prints a Markdown table of requests/s, p50 and p99
//! latency, and the daemon/in-process ratios, all measured in one run so the
//! ratios compare like with like on a noisy machine.
//!
//! Run from a release build: `make bench`, or
//! `cargo run --release -p inferd-bench -- --model-dir ~/.cache/inferd/models`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use inferd_client::{wait_ready, Client};
use inferd_engine::{Engine, EngineConfig};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Benchmark the in-process engine against the inferd daemon.
#[derive(Parser, Debug)]
#[command(name = "inferd-bench")]
struct Args {
    /// Model cache laid out by scripts/fetch-model.
    #[arg(long, env = "INFERD_MODEL_DIR")]
    model_dir: PathBuf,
    /// Model subdirectory.
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    /// Timed requests per scenario.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Untimed requests before each scenario.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// The inferd executable [default: inferd beside this executable].
    #[arg(long)]
    inferd: Option<PathBuf>,
}

/// Bound on the wait for a started daemon's workers to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SHORT_TEXT: &str = "A man is eating food.";
const LONG_SENTENCE: &str =
    "The quick brown fox jumps over the lazy dog near the river bank while the sun sets slowly. ";

/// Latencies of one scenario plus its wall time.
struct Measurement {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Measurement {
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index].as_secs_f64() * 1e3
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model_dir = args.model_dir.join(&args.model);
    let engine =
        Engine::load(&EngineConfig::for_model_dir(&model_dir)).context("loading the engine")?;
    let long_text = long_text(&engine, 128)?;
    let texts = [("short", SHORT_TEXT.to_owned()), ("128-token", long_text)];
    let tokens: Vec<usize> = texts
        .iter()
        .map(|(_, t)| {
            engine
                .embed(std::slice::from_ref(t))
                .map(|e| e.token_counts[0])
        })
        .collect::<Result<_, _>>()?;
    println!(
        "model {}, {} requests per row after {} warm-up, one text per request ({} and {} tokens)\n",
        args.model, args.requests, args.warmup, tokens[0], tokens[1]
    );
    println!("| text | setup | clients | req/s | p50 ms | p99 ms | p50 vs in-process | req/s vs in-process |");
    println!("|---|---|---|---|---|---|---|---|");

    let inferd = match args.inferd.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("inferd"),
    };
    for (name, text) in &texts {
        let base = in_process(&engine, text, args.warmup, args.requests)?;
        row(name, "in-process engine, 1 thread", 1, &base, &base);
        for workers in [1usize, 2] {
            let daemon = Daemon::start(&inferd, &model_dir, workers)?;
            let measured =
                through_daemon(daemon.socket(), text, workers, args.warmup, args.requests)?;
            drop(daemon);
            row(
                name,
                &format!("daemon, {workers} worker(s)"),
                workers,
                &measured,
                &base,
            );
        }
    }
    Ok(())
}

fn row(text: &str, setup: &str, clients: usize, m: &Measurement, base: &Measurement) {
    println!(
        "| {text} | {setup} | {clients} | {:.1} | {:.2} | {:.2} | {:.2}× | {:.2}× |",
        m.throughput(),
        m.percentile_ms(0.5),
        m.percentile_ms(0.99),
        m.percentile_ms(0.5) / base.percentile_ms(0.5),
        m.throughput() / base.throughput(),
    );
}

/// A text of about `target` tokens (special tokens included).
fn long_text(engine: &Engine, target: usize) -> Result<String> {
    let source = LONG_SENTENCE.repeat(20);
    let mut text = String::new();
    for word in source.split_whitespace() {
        let candidate = if text.is_empty() {
            word.to_owned()
        } else {
            format!("{text} {word}")
        };
        if engine.embed(std::slice::from_ref(&candidate))?.token_counts[0] > target {
            return Ok(text);
        }
        text = candidate;
    }
    bail!("could not build a {target}-token text")
}

fn in_process(engine: &Engine, text: &str, warmup: usize, requests: usize) -> Result<Measurement> {
    let input = vec![text.to_owned()];
    for _ in 0..warmup {
        engine.embed(&input)?;
    }
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        engine.embed(&input)?;
        latencies.push(t.elapsed());
    }
    Ok(Measurement {
        latencies,
        wall: start.elapsed(),
    })
}

/// `clients` concurrent connections share `requests` sequential requests.
fn through_daemon(
    socket: &Path,
    text: &str,
    clients: usize,
    warmup: usize,
    requests: usize,
) -> Result<Measurement> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..clients {
            let mut client = Client::connect(socket).await?;
            for _ in 0..warmup {
                client.embed(vec![text.to_owned()], None).await?;
            }
            connections.push(client);
        }
        let start = Instant::now();
        let tasks: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(i, mut client)| {
                let share = requests / clients + usize::from(i < requests % clients);
                let text = text.to_owned();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(share);
                    for _ in 0..share {
                        let t = Instant::now();
                        client.embed(vec![text.clone()], None).await?;
                        latencies.push(t.elapsed());
                    }
                    anyhow::Ok(latencies)
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(requests);
        for task in tasks {
            latencies.extend(task.await??);
        }
        Ok(Measurement {
            latencies,
            wall: start.elapsed(),
        })
    })
}

/// A daemon started for one scenario; SIGTERM and wait on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(inferd: &Path, model_dir: &Path, workers: usize) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("inferd.sock");
        let child = Command::new(inferd)
            .arg("--socket")
            .arg(&socket)
            .arg("--workers")
            .arg(workers.to_string())
            .arg("--model")
            .arg(model_dir.join("model.onnx"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", inferd.display()))?;
        let mut daemon = Daemon {
            child,
            socket,
            _dir: dir,
        };
        daemon.wait_ready(workers)?;
        Ok(daemon)
    }

    fn socket(&self) -> &Path {
        &self.socket
    }

    /// Polls status (bounded) until every worker is ready.
    fn wait_ready(&mut self, workers: usize) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let child = &mut self.child;
        let alive = || match child.try_wait() {
            Ok(Some(status)) => Err(format!("exited with {status}")),
            Ok(None) | Err(_) => Ok(()),
        };
        runtime.block_on(wait_ready(&self.socket, workers, READY_TIMEOUT, alive))?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
