//! `inferd-http-load`: a small closed-loop load generator for embedding
//! servers, to compare sides in one run on a noisy machine.
//!
//! Targets are HTTP/1.1 servers (`--unix [LABEL=]PATH`, `--tcp
//! [LABEL=]HOST:PORT`; OpenAI's `/v1/embeddings` or TEI's `/embed`) and
//! inferd's native protocol (`--native [LABEL=]PATH`), in any mix; the
//! first one given is the baseline the others are compared with. Every
//! client holds one keep-alive connection per target and sends one request
//! at a time (closed loop). The run is cut into `--rounds`; in each round
//! every target gets its share of requests (or of `--duration`) from all
//! clients at once, one target after the other, in an order that rotates
//! each round (A B, B A, ...). Only one target is loaded at a time, and
//! slow drifts of a shared machine hit every side alike. With one client and
//! as many rounds as requests, the sides alternate request by request, and
//! the median of the paired differences gives the added latency of one side
//! over the other.
//!
//! Every answer is checked: HTTP 200, one vector per text in order, the
//! same dimension, unit norm, the expected token count (the built-in texts
//! have known counts for the all-MiniLM-L6-v2 tokenizer), and each target's
//! first vector against the baseline's (cosine). Errors are counted, the
//! first few printed, and any error (past `--max-errors`) or mismatch makes
//! the exit status 1.
//!
//! ```text
//! inferd-http-load --native native=/tmp/inferd.sock --unix http=/tmp/inferd.sock \
//!     --texts short --clients 1 --requests 400 --rounds 400 --model all-MiniLM-L6-v2
//! ```

mod conn;
mod cpu;
mod stats;
mod texts;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use hyper::body::Bytes;
use serde::Serialize;

use conn::{Conn, Protocol, RequestSpec, Target};
use stats::{ms, Round, Summary, Versus};
use texts::{Api, TextKind};

/// Closed-loop load generator: HTTP (OpenAI / TEI embeddings) and inferd's
/// native protocol, side by side, alternating, with checked answers.
#[derive(Parser, Debug)]
#[command(name = "inferd-http-load", version)]
struct Args {
    /// An HTTP target on a Unix socket, `[LABEL=]PATH` (repeatable; the
    /// first target of any kind is the baseline).
    #[arg(long, value_name = "[LABEL=]PATH")]
    unix: Vec<String>,
    /// An HTTP target on TCP, `[LABEL=]HOST:PORT` (repeatable).
    #[arg(long, value_name = "[LABEL=]HOST:PORT")]
    tcp: Vec<String>,
    /// An inferd target spoken to in the native protocol, `[LABEL=]PATH`
    /// (repeatable).
    #[arg(long, value_name = "[LABEL=]PATH")]
    native: Vec<String>,
    /// HTTP API: body and answer shape.
    #[arg(long, value_enum, default_value_t = Api::Openai)]
    api: Api,
    /// HTTP path [default: /v1/embeddings for openai, /embed for tei].
    #[arg(long)]
    path: Option<String>,
    /// `model` field of OpenAI request bodies (omitted when not given).
    #[arg(long)]
    model: Option<String>,
    /// The text every request carries.
    #[arg(long, value_enum, default_value_t = TextKind::Short)]
    texts: TextKind,
    /// Texts per request (copies of the text).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    batch: u16,
    /// Concurrent clients, each with one connection per target, each
    /// sending one request at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    clients: u16,
    /// Timed requests per target, all clients together [default: 200].
    #[arg(long, conflicts_with = "duration")]
    requests: Option<usize>,
    /// Timed seconds per target, instead of --requests.
    #[arg(long)]
    duration: Option<f64>,
    /// Rounds the run is cut into; targets take turns within each round.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Untimed requests per client and target before the first round.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// A request not answered within this is an error.
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
    /// Do not check token counts (for texts/models other than the
    /// built-in texts with the all-MiniLM-L6-v2 tokenizer).
    #[arg(long)]
    no_token_check: bool,
    /// Smallest cosine allowed between a target's first vector and the
    /// baseline's (same text, same model: should be ~1).
    #[arg(long, default_value_t = 0.999)]
    min_cosine: f64,
    /// Errors tolerated before the exit status is 1.
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// A server process whose CPU time (its children's included) counts
    /// as the servers' rather than as other people's (repeatable).
    #[arg(long, value_name = "PID")]
    watch_pid: Vec<i32>,
    /// A process whose own CPU time (all its threads, not its children:
    /// inferd's supervisor) is reported per 1000 answered requests of the
    /// whole run, warm-up included. Meaningful when every target is served
    /// by it.
    #[arg(long, value_name = "PID")]
    cpu_pid: Option<i32>,
    /// Write the full report (per-round figures included) here as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Print Markdown table rows instead of the plain table.
    #[arg(long)]
    markdown: bool,
    /// With --markdown: print the table's header first.
    #[arg(long, requires = "markdown")]
    header: bool,
    /// Scenario name for the first column of Markdown rows.
    #[arg(long)]
    scenario: Option<String>,
}

/// How much each target gets.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Amount {
    /// Requests per target.
    Requests(usize),
    /// Seconds per target.
    Seconds(f64),
}

/// One client's work in one phase.
#[derive(Debug, Clone, Copy)]
enum Budget {
    Requests(usize),
    Until(Instant),
}

/// What one client did in one phase.
#[derive(Debug, Default)]
struct PhaseResult {
    latencies_ms: Vec<f64>,
    /// Answers counted for throughput: each one whole, except that one
    /// still in flight at the deadline counts for the part of it done by
    /// then (see [`stats::Round::answers`]).
    answers: f64,
    errors: u64,
    error_samples: Vec<String>,
    connects_in_requests: u64,
    server_closes: u64,
    dims: Option<usize>,
    first: Option<Vec<f32>>,
    finished: Option<Instant>,
}

/// First error messages kept per target.
const ERROR_SAMPLES: usize = 5;

/// One client: one connection per target.
struct ClientState {
    conns: Vec<Conn>,
}

impl ClientState {
    /// Runs `budget` requests (or until the deadline) against `target`.
    async fn phase(
        mut self,
        target: usize,
        budget: Budget,
        spec: Arc<RequestSpec>,
    ) -> (ClientState, PhaseResult) {
        let mut result = PhaseResult::default();
        let conn = &mut self.conns[target];
        let note = |result: &mut PhaseResult, error: anyhow::Error| {
            result.errors += 1;
            if result.error_samples.len() < ERROR_SAMPLES {
                result.error_samples.push(format!("{error:#}"));
            }
        };
        if let Err(error) = conn.prepare().await {
            note(&mut result, error);
        }
        let mut sent = 0usize;
        loop {
            match budget {
                Budget::Requests(n) if sent >= n => break,
                Budget::Until(deadline) if Instant::now() >= deadline => break,
                _ => {}
            }
            sent += 1;
            let sent_at = Instant::now();
            match conn.request(&spec).await {
                Ok(answer) => {
                    result.latencies_ms.push(ms(answer.latency));
                    result.answers += match budget {
                        Budget::Until(deadline) => {
                            let took = sent_at.elapsed().as_secs_f64();
                            let before = deadline.saturating_duration_since(sent_at).as_secs_f64();
                            if took > 0.0 {
                                (before / took).min(1.0)
                            } else {
                                1.0
                            }
                        }
                        Budget::Requests(_) => 1.0,
                    };
                    result.connects_in_requests += u64::from(answer.connected_in_request);
                    result.server_closes += u64::from(answer.closed_by_server);
                    if result.first.is_none() {
                        result.dims = Some(answer.dims);
                        result.first = Some(answer.first);
                    }
                }
                Err(error) => {
                    note(&mut result, error);
                    // Do not spin on a dead server.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        result.finished = Some(Instant::now());
        (self, result)
    }
}

/// Everything measured for one target.
#[derive(Debug, Default)]
struct Tally {
    rounds: Vec<Round>,
    /// Timed answers per client (fairness: a starved client shows here).
    per_client: Vec<usize>,
    errors: u64,
    error_samples: Vec<String>,
    connects_in_requests: u64,
    server_closes: u64,
    dims: Option<usize>,
    first: Option<Vec<f32>>,
}

impl Tally {
    fn absorb(&mut self, result: &mut PhaseResult) {
        self.errors += result.errors;
        for sample in result.error_samples.drain(..) {
            if self.error_samples.len() < ERROR_SAMPLES {
                self.error_samples.push(sample);
            }
        }
        self.connects_in_requests += result.connects_in_requests;
        self.server_closes += result.server_closes;
        if self.first.is_none() {
            self.dims = result.dims;
            self.first = result.first.take();
        }
    }
}

/// The JSON report.
#[derive(Debug, Serialize)]
struct Report {
    scenario: Option<String>,
    texts: TextKind,
    text_tokens: u64,
    batch: usize,
    clients: usize,
    api: Api,
    path: String,
    amount: Amount,
    rounds: u32,
    warmup_per_client: usize,
    /// /proc/loadavg (1, 5, 15 min) before and after.
    load_before: Option<[f64; 3]>,
    load_after: Option<[f64; 3]>,
    /// CPU use over the run (warm-up included), by whom.
    cpu: Option<cpu::Usage>,
    /// `--cpu-pid`'s own CPU per 1000 answered requests (warm-up included).
    process_cpu: Option<cpu::ProcessCpu>,
    targets: Vec<TargetReport>,
}

/// One target in the JSON report.
#[derive(Debug, Serialize)]
struct TargetReport {
    target: Target,
    summary: Summary,
    /// Against the first target (absent for the first target itself).
    versus_base: Option<Versus>,
    errors: u64,
    error_samples: Vec<String>,
    /// Timed requests that had to open a connection first (the server had
    /// closed the previous one with `Connection: close`).
    connects_in_requests: u64,
    /// Answers that carried `Connection: close`.
    server_closes: u64,
    /// Connections found closed while idle between phases, reopened untimed.
    idle_reconnects: u64,
    dims: Option<usize>,
    /// Timed answers per client: equal shares unless a client was starved.
    answers_per_client: Vec<usize>,
    /// Cosine between this target's first vector and the baseline's.
    cosine_vs_base: Option<f64>,
    rounds_p50_ms: Vec<f64>,
    rounds_requests_per_s: Vec<f64>,
}

fn main() {
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("inferd-http-load: {error:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the tool; `Ok(false)` when the run finished but failed its checks.
fn real_main() -> Result<bool> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches)?;
    let targets = targets_in_order(&matches)?;
    ensure!(
        !targets.is_empty(),
        "no target: give --unix, --tcp or --native"
    );
    let batch = usize::from(args.batch);
    let clients = usize::from(args.clients);
    let amount = match (args.requests, args.duration) {
        (_, Some(seconds)) => {
            ensure!(
                seconds > 0.0 && seconds.is_finite(),
                "--duration must be positive"
            );
            Amount::Seconds(seconds)
        }
        (Some(n), None) => Amount::Requests(n),
        (None, None) => Amount::Requests(200),
    };
    if let Amount::Requests(n) = amount {
        ensure!(
            n >= args.rounds as usize * clients,
            "--requests {n} is fewer than --rounds × --clients: some phases would leave clients idle"
        );
    }
    let path = args
        .path
        .clone()
        .unwrap_or_else(|| args.api.default_path().to_owned());
    let text = args.texts.text();
    let spec = Arc::new(RequestSpec {
        api: args.api,
        path: path.clone(),
        body: Bytes::from(texts::json_body(
            args.api,
            text,
            batch,
            args.model.as_deref(),
        )),
        texts: vec![text.to_owned(); batch],
        expect_tokens: (!args.no_token_check).then(|| args.texts.tokens() * batch as u64),
        timeout: Duration::from_millis(args.timeout_ms),
    });

    let load_before = load_average();
    let cpu_before = cpu::Sample::take(&args.watch_pid);
    let process_before = args.cpu_pid.and_then(cpu::process_cpu_ns);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (tallies, idle_reconnects) = runtime.block_on(run(&args, &targets, amount, spec))?;
    let cpu_usage = cpu_before
        .zip(cpu::Sample::take(&args.watch_pid))
        .map(|(before, after)| before.usage_until(&after));
    let process_after = args.cpu_pid.and_then(cpu::process_cpu_ns);
    let load_after = load_average();

    let base_first = tallies[0].first.clone();
    let reports: Vec<TargetReport> = targets
        .iter()
        .zip(&tallies)
        .zip(idle_reconnects)
        .enumerate()
        .map(|(i, ((target, tally), idle))| TargetReport {
            target: target.clone(),
            summary: Summary::of(&tally.rounds, batch),
            versus_base: (i > 0).then(|| Versus::of(&tally.rounds, &tallies[0].rounds, batch)),
            errors: tally.errors,
            error_samples: tally.error_samples.clone(),
            connects_in_requests: tally.connects_in_requests,
            server_closes: tally.server_closes,
            idle_reconnects: idle,
            dims: tally.dims,
            answers_per_client: tally.per_client.clone(),
            cosine_vs_base: match (&tally.first, &base_first) {
                (Some(a), Some(b)) if i > 0 => Some(cosine(a, b)),
                _ => None,
            },
            rounds_p50_ms: tally
                .rounds
                .iter()
                .map(|r| stats::median(&r.latencies_ms))
                .collect(),
            rounds_requests_per_s: tally.rounds.iter().map(Round::throughput).collect(),
        })
        .collect();
    let report = Report {
        scenario: args.scenario.clone(),
        texts: args.texts,
        text_tokens: args.texts.tokens(),
        batch,
        clients,
        api: args.api,
        path,
        amount,
        rounds: args.rounds,
        warmup_per_client: args.warmup,
        load_before,
        load_after,
        cpu: cpu_usage,
        process_cpu: args.cpu_pid.zip(process_before).zip(process_after).map(
            |((pid, before), after)| {
                let answers = reports.iter().map(|t| t.summary.requests).sum::<usize>()
                    + args.warmup * clients * targets.len();
                cpu::ProcessCpu::new(pid, after.saturating_sub(before), answers)
            },
        ),
        targets: reports,
    };

    if let Some(out) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(out, json + "\n").with_context(|| format!("writing {}", out.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    if args.markdown {
        print_markdown(&mut stdout, &report, args.header)?;
    } else {
        print_plain(&mut stdout, &report)?;
    }
    stdout.flush()?;
    Ok(verdict(&report, args.max_errors, args.min_cosine))
}

/// `--unix`, `--tcp` and `--native` targets in command-line order.
fn targets_in_order(matches: &clap::ArgMatches) -> Result<Vec<Target>> {
    let mut found = Vec::new();
    for (id, protocol, tcp) in [
        ("unix", Protocol::Http, false),
        ("tcp", Protocol::Http, true),
        ("native", Protocol::Native, false),
    ] {
        if let (Some(values), Some(indices)) =
            (matches.get_many::<String>(id), matches.indices_of(id))
        {
            for (value, index) in values.zip(indices) {
                found.push((index, Target::parse(value, protocol, tcp)?));
            }
        }
    }
    found.sort_by_key(|(index, _)| *index);
    let targets: Vec<Target> = found.into_iter().map(|(_, t)| t).collect();
    for (i, target) in targets.iter().enumerate() {
        if targets[..i].iter().any(|t| t.label == target.label) {
            bail!("two targets are labelled `{}`", target.label);
        }
    }
    Ok(targets)
}

/// Warm-up, then the rounds. Returns each target's tally and its idle
/// reconnects.
async fn run(
    args: &Args,
    targets: &[Target],
    amount: Amount,
    spec: Arc<RequestSpec>,
) -> Result<(Vec<Tally>, Vec<u64>)> {
    let clients = usize::from(args.clients);
    let mut states: Vec<ClientState> = (0..clients)
        .map(|_| ClientState {
            conns: targets.iter().cloned().map(Conn::new).collect(),
        })
        .collect();
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();

    for (t, tally) in tallies.iter_mut().enumerate() {
        let budgets = vec![Budget::Requests(args.warmup); clients];
        let (_, mut results) = phase(&mut states, t, budgets, &spec).await?;
        for result in &mut results {
            tally.absorb(result);
        }
        // Warm-up answers are not timed, nor are their connects counted.
        tally.connects_in_requests = 0;
        tally.server_closes = 0;
    }

    let rounds = args.rounds as usize;
    for round in 0..rounds {
        for k in 0..targets.len() {
            let t = (round + k) % targets.len();
            let (budgets, timed) = match amount {
                Amount::Requests(n) => {
                    let this_round = share(n, rounds, round);
                    let budgets = (0..clients)
                        .map(|c| {
                            Budget::Requests(share(this_round, clients, (c + round) % clients))
                        })
                        .collect();
                    (budgets, None)
                }
                Amount::Seconds(s) => {
                    let length = Duration::from_secs_f64(s / rounds as f64);
                    (
                        vec![Budget::Until(Instant::now() + length); clients],
                        Some(length),
                    )
                }
            };
            let (wall, mut results) = phase(&mut states, t, budgets, &spec).await?;
            let per_client = &mut tallies[t].per_client;
            per_client.resize(clients, 0);
            for (count, result) in per_client.iter_mut().zip(&results) {
                *count += result.latencies_ms.len();
            }
            let mut latencies = Vec::new();
            let mut answers = 0.0;
            for result in &mut results {
                latencies.append(&mut result.latencies_ms);
                answers += result.answers;
                tallies[t].absorb(result);
            }
            tallies[t].rounds.push(Round {
                latencies_ms: latencies,
                answers,
                wall: timed.unwrap_or(wall),
            });
        }
    }
    let idle = (0..targets.len())
        .map(|t| states.iter().map(|s| s.conns[t].idle_reconnects).sum())
        .collect();
    Ok((tallies, idle))
}

/// All clients on target `t` at once; returns the wall time (start to last
/// answer) and each client's result.
async fn phase(
    states: &mut Vec<ClientState>,
    t: usize,
    budgets: Vec<Budget>,
    spec: &Arc<RequestSpec>,
) -> Result<(Duration, Vec<PhaseResult>)> {
    let started = Instant::now();
    let handles: Vec<_> = states
        .drain(..)
        .zip(budgets)
        .map(|(state, budget)| tokio::spawn(state.phase(t, budget, Arc::clone(spec))))
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    let mut finished = started;
    for handle in handles {
        let (state, result) = handle.await.context("a client task failed")?;
        states.push(state);
        finished = finished.max(result.finished.unwrap_or(started));
        results.push(result);
    }
    Ok((finished - started, results))
}

/// Part `index` of `total` split into `parts` near-equal parts.
fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

fn describe_amount(amount: Amount) -> String {
    match amount {
        Amount::Requests(n) => format!("{n} requests"),
        Amount::Seconds(s) => format!("{s} s"),
    }
}

fn load_text(load: Option<[f64; 3]>) -> String {
    load.map_or_else(|| "?".to_owned(), |l| format!("{:.2}", l[0]))
}

fn print_plain(out: &mut impl std::io::Write, report: &Report) -> Result<()> {
    writeln!(
        out,
        "{} × batch {}, {} client(s), {} per target in {} rounds, {} warm-up per client and target; \
         load average {} → {}",
        report.texts.describe(),
        report.batch,
        report.clients,
        describe_amount(report.amount),
        report.rounds,
        report.warmup_per_client,
        load_text(report.load_before),
        load_text(report.load_after),
    )?;
    if let Some(cpu) = &report.cpu {
        writeln!(
            out,
            "CPU use in cores ({} CPUs): machine {:.2}, servers {:.2}, this tool {:.2}, others {:.2}",
            cpu.cpus, cpu.machine_cores, cpu.servers_cores, cpu.load_tool_cores, cpu.others_cores
        )?;
        if cpu.servers_cores == 0.0 {
            writeln!(out, "    (no --watch-pid: \"others\" includes the servers)")?;
        }
    }
    if let Some(p) = &report.process_cpu {
        writeln!(
            out,
            "process {} CPU: {:.1} ms per 1000 answered requests ({} answers)",
            p.pid, p.ms_per_1000_answers, p.answers
        )?;
    }
    writeln!(
        out,
        "{:<24} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8} {:>9} {:>12} {:>11} {:>10}",
        "target",
        "answers",
        "req/s",
        "texts/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "connects",
        "p50 ×base",
        "Δp50 paired",
        "req/s ×base",
        "cos(base)"
    )?;
    for t in &report.targets {
        let s = &t.summary;
        let [ratio, paired, thr] =
            versus_cells(t.versus_base.as_ref(), 3, "", ["base", "", "base"]);
        writeln!(
            out,
            "{:<24} {:>7} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>6} {:>8} {:>9} {:>12} {:>11} {:>10}",
            t.target.label,
            s.requests,
            s.requests_per_s,
            s.texts_per_s,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.max_ms,
            t.errors,
            t.connects_in_requests,
            ratio,
            paired,
            thr,
            t.cosine_vs_base.map_or_else(String::new, |c| format!("{c:.6}")),
        )?;
        if report.clients > 1 {
            writeln!(out, "    answers per client: {:?}", t.answers_per_client)?;
        }
        for sample in &t.error_samples {
            writeln!(out, "    error: {sample}")?;
        }
    }
    Ok(())
}

/// The "versus the baseline" cells of a target's row: p50 ratio, paired
/// Δp50 and throughput ratio, with `digits` decimals and the ratios followed
/// by `times`; `base` for the baseline itself.
fn versus_cells(
    versus: Option<&Versus>,
    digits: usize,
    times: &str,
    base: [&str; 3],
) -> [String; 3] {
    match versus {
        Some(v) => [
            format!("{:.digits$}{times}", v.p50_ratio),
            format!("{:+.digits$} ms", v.p50_diff_paired_ms),
            format!("{:.digits$}{times}", v.throughput_ratio),
        ],
        None => base.map(str::to_owned),
    }
}

fn print_markdown(out: &mut impl std::io::Write, report: &Report, header: bool) -> Result<()> {
    if header {
        writeln!(
            out,
            "| scenario | text | batch | clients | target | req/s | texts/s | p50 ms | p90 ms | p99 ms \
             | p50 vs base | Δp50 (paired) | req/s vs base | others' CPU | supervisor CPU per 1000 req |"
        )?;
        writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
    }
    // Other people's CPU use when the servers are watched, else the load
    // average (which the benchmark itself raises).
    let load = match &report.cpu {
        Some(cpu) if cpu.servers_cores > 0.0 => format!("{:.2} cores", cpu.others_cores),
        _ => format!(
            "load {}→{}",
            load_text(report.load_before),
            load_text(report.load_after)
        ),
    };
    for t in &report.targets {
        let s = &t.summary;
        let [ratio, paired, thr] =
            versus_cells(t.versus_base.as_ref(), 2, "×", ["1.00×", "(base)", "1.00×"]);
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            report.scenario.as_deref().unwrap_or(""),
            report.texts.describe(),
            report.batch,
            report.clients,
            t.target.label,
            s.requests_per_s,
            s.texts_per_s,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            ratio,
            paired,
            thr,
            load,
            report
                .process_cpu
                .as_ref()
                .map_or_else(|| "–".to_owned(), |p| format!("{:.1} ms", p.ms_per_1000_answers)),
        )?;
    }
    Ok(())
}

/// Prints what failed; true when the run passed every check.
fn verdict(report: &Report, max_errors: u64, min_cosine: f64) -> bool {
    let mut ok = true;
    let errors: u64 = report.targets.iter().map(|t| t.errors).sum();
    if errors > max_errors {
        eprintln!("inferd-http-load: FAILED: {errors} errors (allowed: {max_errors})");
        for t in report.targets.iter().filter(|t| t.errors > 0) {
            eprintln!("  {}: {} errors", t.target.label, t.errors);
            for sample in &t.error_samples {
                eprintln!("    {sample}");
            }
        }
        ok = false;
    }
    for t in &report.targets {
        if let Some(c) = t.cosine_vs_base {
            if c.is_nan() || c < min_cosine {
                eprintln!(
                    "inferd-http-load: FAILED: {}'s vectors differ from the baseline's (cosine {c:.6} < {min_cosine})",
                    t.target.label
                );
                ok = false;
            }
        }
        if t.summary.requests == 0 {
            eprintln!(
                "inferd-http-load: FAILED: {} answered no timed request",
                t.target.label
            );
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, parts) in [(10, 3), (7, 7), (400, 4), (5, 10)] {
            let sum: usize = (0..parts).map(|i| share(total, parts, i)).sum();
            assert_eq!(sum, total);
        }
    }

    #[test]
    fn targets_keep_command_line_order() {
        let matches = Args::command()
            .try_get_matches_from([
                "inferd-http-load",
                "--native",
                "n=/tmp/a",
                "--unix",
                "h=/tmp/a",
                "--tcp",
                "t=127.0.0.1:1",
                "--unix",
                "g=/tmp/b",
            ])
            .expect("args");
        let labels: Vec<String> = targets_in_order(&matches)
            .expect("targets")
            .into_iter()
            .map(|t| t.label)
            .collect();
        assert_eq!(labels, ["n", "h", "t", "g"]);
    }

    #[test]
    fn duplicate_labels_are_refused() {
        let matches = Args::command()
            .try_get_matches_from(["inferd-http-load", "--unix", "a=/x", "--native", "a=/y"])
            .expect("args");
        assert!(targets_in_order(&matches).is_err());
    }

    #[test]
    fn cosine_of_equal_vectors_is_one() {
        assert!((cosine(&[0.6, 0.8], &[0.6, 0.8]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0], &[1.0, 0.0]).is_nan());
    }
}
