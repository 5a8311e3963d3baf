//! What the run amounts to: `summary.json`, the plot titles, the Markdown
//! table, and the command line that produced it.
//!
//! Counts of the daemon's (recycles, exits, failures) are the change in its
//! counters over the load, for every kind it knows, zero or not. The limits
//! are the ones its status reported, whatever the flags asked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use inferd_client::{Counters, ErrorKind, ExitKind, RecycleTrigger};
use serde::Serialize;

use crate::config::Requested;
use crate::daemon::DaemonExit;
use crate::kills::{dip_after, time_below, DIP_WINDOW_S};
use crate::load::{KindLog, RequestKind};
use crate::scenario::{DaemonSettings, Recorded};
use crate::{Args, MIB};

/// A sample this much later than `--interval-ms` after the one before
/// counts as late.
const LATE_FACTOR: f64 = 1.5;

/// The contents of summary.json.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    /// The command line that produced this run.
    command: String,
    /// The daemon config the run used (TOML).
    config_toml: String,
    workers: u32,
    clients: usize,
    /// What the clients sent, in words.
    traffic: String,
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
    /// Every `--kill-every` kill and the dip in serving workers after it.
    kills: Vec<KillSummary>,
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
    /// Failures by kind, as the clients saw them (daemon error kinds and
    /// client-side kinds).
    failed_by_kind: BTreeMap<String, u64>,
    /// Up to three distinct error texts per kind (all are in failures.csv).
    failure_examples: BTreeMap<String, Vec<String>>,
    ok_per_s: f64,
    /// Latency over every kind of request.
    latency: Latency,
    /// Outcomes by request kind (short, long, batch).
    by_request: BTreeMap<RequestKind, KindSummary>,
    /// Tokens in the long text by the daemon's tokenizer (mixed traffic).
    long_text_tokens: Option<usize>,
    /// Failed requests by kind, from the daemon's counters.
    daemon_failed_by_kind: BTreeMap<ErrorKind, u64>,
    /// In-flight requests the daemon re-dispatched after their worker died.
    daemon_retries: u64,
}

#[derive(Debug, Serialize)]
struct KindSummary {
    ok: u64,
    failed: u64,
    latency: Latency,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

impl Latency {
    fn of(mut latencies: Vec<f64>) -> Latency {
        latencies.sort_by(f64::total_cmp);
        let rounded = |v: Option<f64>| v.map(|v| round(v, 2));
        Latency {
            p50_ms: rounded(percentile(&latencies, 0.5)),
            p99_ms: rounded(percentile(&latencies, 0.99)),
            max_ms: rounded(latencies.last().copied()),
        }
    }

    /// `p50 X, p99 Y, max Z`.
    fn describe(&self) -> String {
        format!(
            "p50 {}, p99 {}, max {}",
            opt(self.p50_ms, " ms"),
            opt(self.p99_ms, " ms"),
            opt(self.max_ms, " ms")
        )
    }
}

#[derive(Debug, Serialize)]
struct RecycleSummary {
    /// Worker exits during the run (each was replaced), from the counters.
    worker_exits: u64,
    /// The same by classified end kind, every kind.
    worker_exits_by_kind: BTreeMap<ExitKind, u64>,
    /// Exits that were OOM kills, certain or likely.
    oom_kills: u64,
    /// Exits by the supervisor's SIGKILL (hard limit, timeout, ...).
    supervisor_kills: u64,
    /// Workers spawned during the run, from the counters.
    workers_spawned: u64,
    /// Graceful recycles started, by trigger, every trigger.
    recycles_by_trigger: BTreeMap<RecycleTrigger, u64>,
    /// Recycles abandoned (the replacement ended before it was ready).
    recycles_failed_by_trigger: BTreeMap<RecycleTrigger, u64>,
}

#[derive(Debug, Serialize)]
struct MemorySummary {
    /// `soft_limit` as the config gave it; `None`: left out, the daemon's
    /// own default applied.
    soft_limit_requested: Option<String>,
    hard_limit_requested: Option<String>,
    /// The soft limit the daemon applied at the end of the run (its
    /// status); `None`: none.
    soft_limit_mib: Option<f64>,
    hard_limit_mib: Option<f64>,
    /// How the daemon derived its limits, in its words.
    limits_origin: String,
    /// The limits and spare target the daemon reported, first at the start
    /// of the load and then at each change.
    daemon_settings: Vec<SettingsAt>,
    leak_bytes_per_request: Option<u64>,
    max_requests: Option<u64>,
    /// Largest worker RSS in any sample.
    max_worker_rss_mib: Option<f64>,
    /// Which worker had it.
    max_worker_rss_worker_id: Option<u64>,
    /// Whether any sample showed a worker above the daemon's hard limit.
    hard_limit_exceeded: bool,
    /// Distinct worker ids seen in the samples.
    worker_ids_seen: usize,
}

#[derive(Debug, Serialize)]
struct SettingsAt {
    /// Seconds since the load started.
    t_s: f64,
    #[serde(flatten)]
    settings: DaemonSettings,
}

#[derive(Debug, Serialize)]
struct PoolSummary {
    samples: usize,
    /// Status reads that failed or timed out.
    status_errors: u64,
    /// Achieved time between samples, median and largest.
    sample_interval_p50_ms: Option<f64>,
    sample_interval_max_ms: Option<f64>,
    /// Samples that came more than 1.5 × `interval_ms` after the previous.
    late_samples: usize,
    /// Time one sample's reads took, median and largest.
    sample_read_p50_ms: Option<f64>,
    sample_read_max_ms: Option<f64>,
    /// Fewest workers ready or busy in any sample.
    min_serving_workers: Option<usize>,
    /// Time the serving count spent below `workers`, in all, ms.
    below_target_ms: f64,
    /// Spares the daemon aims to hold (its last status).
    target_spares: Option<u32>,
    /// Most workers in state spare in any sample.
    max_spares_seen: Option<usize>,
}

#[derive(Debug, Serialize)]
struct KillSummary {
    /// Seconds since the load started.
    t_s: f64,
    worker_id: Option<u64>,
    pid: Option<u32>,
    /// Why no signal was sent, if none was.
    skipped: Option<String>,
    /// Fewest serving workers from the kill until 5 s after it.
    min_serving_5s: Option<usize>,
    /// How long the serving count stayed below `workers` after the kill,
    /// from the first sample that showed it (0: none did).
    below_target_ms: f64,
    /// False if it had not recovered by the last sample.
    recovered: bool,
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
pub(crate) struct Report {
    pub(crate) summary: Summary,
    problem: Option<String>,
}

impl Report {
    pub(crate) fn new(
        args: &Args,
        command: &str,
        config_toml: &str,
        requested: &Requested,
        recorded: &Recorded,
        exit: &DaemonExit,
    ) -> Report {
        let wall = recorded.load_wall.as_secs_f64();
        let initial = &recorded.initial.counters;
        // Without final counters, nothing is known to have changed.
        let counters = recorded.final_counters.as_ref().map(|(c, _)| c.clone());
        let after = counters.as_ref().unwrap_or(initial);
        let settings = &recorded
            .settings
            .last()
            .expect("settings hold the initial status")
            .1;

        let requests = request_summary(recorded, wall, after, initial);
        let worker_exits_by_kind = delta(ExitKind::ALL, &after.worker_exits, &initial.worker_exits);
        let exits_where = |pick: fn(ExitKind) -> bool| -> u64 {
            worker_exits_by_kind
                .iter()
                .filter(|(kind, _)| pick(**kind))
                .map(|(_, n)| n)
                .sum()
        };
        let recycles = RecycleSummary {
            worker_exits: worker_exits_by_kind.values().sum(),
            oom_kills: exits_where(ExitKind::is_oom),
            supervisor_kills: exits_where(|kind| kind == ExitKind::KilledBySupervisor),
            worker_exits_by_kind,
            workers_spawned: after
                .workers_spawned
                .saturating_sub(initial.workers_spawned),
            recycles_by_trigger: delta(RecycleTrigger::ALL, &after.recycles, &initial.recycles),
            recycles_failed_by_trigger: delta(
                RecycleTrigger::ALL,
                &after.recycles_failed,
                &initial.recycles_failed,
            ),
        };

        let mut max_worker: Option<(u64, u64)> = None;
        let mut ids = BTreeSet::new();
        for worker in recorded.samples.iter().flat_map(|s| &s.workers) {
            ids.insert(worker.id);
            if let Some(rss) = worker.rss_bytes {
                if max_worker.is_none_or(|(_, max)| rss > max) {
                    max_worker = Some((worker.id, rss));
                }
            }
        }
        let mib = |bytes: u64| round(bytes as f64 / MIB, 2);
        let memory = MemorySummary {
            soft_limit_requested: requested.soft_limit.clone(),
            hard_limit_requested: requested.hard_limit.clone(),
            soft_limit_mib: settings.soft_limit_bytes.map(mib),
            hard_limit_mib: settings.hard_limit_bytes.map(mib),
            limits_origin: settings.limits_origin.clone(),
            daemon_settings: recorded
                .settings
                .iter()
                .map(|(t_s, settings)| SettingsAt {
                    t_s: round(*t_s, 3),
                    settings: settings.clone(),
                })
                .collect(),
            leak_bytes_per_request: requested.leak_bytes,
            max_requests: requested.max_requests,
            max_worker_rss_mib: max_worker.map(|(_, rss)| mib(rss)),
            max_worker_rss_worker_id: max_worker.map(|(id, _)| id),
            hard_limit_exceeded: max_worker
                .zip(settings.hard_limit_bytes)
                .is_some_and(|((_, rss), hard)| rss > hard),
            worker_ids_seen: ids.len(),
        };

        let target = args.workers as usize;
        let points: Vec<(f64, Option<usize>)> = recorded
            .samples
            .iter()
            .map(|s| (s.t_s, s.serving))
            .collect();
        let times: Vec<f64> = recorded.samples.iter().map(|s| s.t_s).collect();
        let sampling = SamplingStats::of(&times, args.interval_ms);
        let mut reads: Vec<f64> = recorded.samples.iter().map(|s| s.read_ms).collect();
        reads.sort_by(f64::total_cmp);
        let pool = PoolSummary {
            samples: recorded.samples.len(),
            status_errors: recorded.status_errors,
            sample_interval_p50_ms: sampling.p50_ms.map(|v| round(v, 2)),
            sample_interval_max_ms: sampling.max_ms.map(|v| round(v, 2)),
            late_samples: sampling.late,
            sample_read_p50_ms: percentile(&reads, 0.5).map(|v| round(v, 2)),
            sample_read_max_ms: reads.last().map(|v| round(*v, 2)),
            min_serving_workers: points.iter().filter_map(|(_, n)| *n).min(),
            below_target_ms: round(time_below(&points, target) * 1e3, 1),
            target_spares: Some(settings.target_spares),
            max_spares_seen: recorded.samples.iter().filter_map(|s| s.spares).max(),
        };
        let kills = recorded
            .kills
            .iter()
            .map(|kill| {
                let dip = dip_after(&points, kill.t_s, target);
                KillSummary {
                    t_s: round(kill.t_s, 3),
                    worker_id: kill.worker_id,
                    pid: kill.pid,
                    skipped: kill.skipped.clone(),
                    min_serving_5s: dip.min_serving,
                    below_target_ms: round(dip.below_target_ms, 1),
                    recovered: dip.recovered,
                }
            })
            .collect();

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
            traffic: args.traffic.describe(),
            interval_ms: args.interval_ms,
            duration_requested_s: args.duration,
            duration_s: round(wall, 3),
            cut_short: recorded.cut_short.clone(),
            requests,
            recycles,
            memory,
            pool,
            kills,
            supervisor: SupervisorSummary {
                rss_min_mib: supervisor_rss.clone().min().map(mib),
                rss_max_mib: supervisor_rss.max().map(mib),
                cpu_s: cpu_s.map(|s| round(s, 3)),
                cpu_percent_of_one_core: cpu_s.map(|s| round(100.0 * s / wall.max(1e-9), 2)),
            },
            daemon_exit: exit.describe(),
            daemon_counters: counters,
            daemon_counters_from: recorded.final_counters.as_ref().map(|(_, from)| *from),
        };
        Report { summary, problem }
    }

    pub(crate) fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The plot title: the key numbers.
    pub(crate) fn title(&self) -> String {
        let s = &self.summary;
        let leak = match s.memory.leak_bytes_per_request {
            Some(bytes) => format!("{} leaked/request", human_bytes(bytes)),
            None => "no leak configured".to_owned(),
        };
        format!(
            "inferd, {} workers, {leak}: {} ok, {} failed, {} worker exits in {:.0} s",
            s.workers, s.requests.ok, s.requests.failed, s.recycles.worker_exits, s.duration_s
        )
    }

    /// The caption of the supervisor panel.
    pub(crate) fn supervisor_title(&self) -> String {
        let s = &self.summary.supervisor;
        format!(
            "supervisor: RSS {} to {} MiB, CPU {} s ({}% of one core)",
            opt(s.rss_min_mib, ""),
            opt(s.rss_max_mib, ""),
            opt(s.cpu_s, ""),
            opt(s.cpu_percent_of_one_core, "")
        )
    }

    /// A Markdown table for docs/BENCHMARKS.md, with the command line.
    pub(crate) fn markdown(&self, out: &Path) -> String {
        let s = &self.summary;
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
                "{:.1} s, {} clients, {} workers, {}",
                s.duration_s, s.clients, s.workers, s.traffic
            ),
        );
        if s.requests.by_request.contains_key(&RequestKind::Long) {
            row(
                "long text",
                s.requests
                    .long_text_tokens
                    .map_or("n/a (the tokenize request failed)".to_owned(), |n| {
                        format!("{n} tokens by the daemon's tokenizer")
                    }),
            );
        }
        row(
            "leak",
            s.memory
                .leak_bytes_per_request
                .map_or("not configured".to_owned(), |b| {
                    format!("{} per request", human_bytes(b))
                }),
        );
        row("limits (daemon)", self.limits());
        row(
            "spares",
            format!(
                "target {}, most seen {}",
                s.pool
                    .target_spares
                    .map_or("n/a".to_owned(), |n| n.to_string()),
                s.pool
                    .max_spares_seen
                    .map_or("n/a".to_owned(), |n| n.to_string())
            ),
        );
        row(
            "requests ok",
            format!(
                "{} ({:.1}/s; {})",
                s.requests.ok,
                s.requests.ok_per_s,
                s.requests.latency.describe()
            ),
        );
        if s.requests.by_request.len() > 1 {
            for (kind, k) in &s.requests.by_request {
                row(
                    &format!("{kind} requests", kind = kind.as_str()),
                    format!(
                        "{} ok, {} failed ({})",
                        k.ok,
                        k.failed,
                        k.latency.describe()
                    ),
                );
            }
        }
        let failed = if s.requests.failed == 0 {
            "0".to_owned()
        } else {
            format!(
                "{} ({})",
                s.requests.failed,
                kinds(&s.requests.failed_by_kind, false)
            )
        };
        row("requests failed", failed);
        row(
            "daemon: failed, retried",
            format!(
                "failed: {}; re-dispatched after a worker died: {}",
                kinds(&s.requests.daemon_failed_by_kind, false),
                s.requests.daemon_retries
            ),
        );
        row(
            "worker exits",
            format!(
                "{} ({}); OOM kills {}, supervisor kills {}",
                s.recycles.worker_exits,
                kinds(&s.recycles.worker_exits_by_kind, false),
                s.recycles.oom_kills,
                s.recycles.supervisor_kills
            ),
        );
        let failed_recycles = kinds(&s.recycles.recycles_failed_by_trigger, false);
        row(
            "recycles by trigger",
            format!(
                "{}{}",
                kinds(&s.recycles.recycles_by_trigger, true),
                if failed_recycles == "none" {
                    String::new()
                } else {
                    format!("; failed: {failed_recycles}")
                }
            ),
        );
        row(
            "max worker RSS",
            format!(
                "{} ({}{})",
                opt(s.memory.max_worker_rss_mib, " MiB"),
                s.memory
                    .hard_limit_mib
                    .map_or("no hard limit".to_owned(), |v| format!(
                        "hard limit {v:.0} MiB"
                    )),
                if s.memory.hard_limit_exceeded {
                    ", EXCEEDED"
                } else {
                    ""
                }
            ),
        );
        row(
            "serving workers",
            format!(
                "fewest {} of {}; below {} for {:.0} ms in all",
                s.pool
                    .min_serving_workers
                    .map_or("n/a".to_owned(), |n| n.to_string()),
                s.workers,
                s.workers,
                s.pool.below_target_ms
            ),
        );
        for (i, kill) in s.kills.iter().enumerate() {
            let what = match (&kill.skipped, kill.worker_id, kill.pid) {
                (Some(why), _, _) => format!("not sent: {why}"),
                (None, Some(id), Some(pid)) => format!(
                    "worker {id} (pid {pid}): fewest serving {} within {DIP_WINDOW_S:.0} s, below {} for {:.0} ms{}",
                    kill.min_serving_5s.map_or("n/a".to_owned(), |n| n.to_string()),
                    s.workers,
                    kill.below_target_ms,
                    if kill.recovered { "" } else { " (not recovered)" }
                ),
                (None, _, _) => "sent".to_owned(),
            };
            row(&format!("kill {} at {:.2} s", i + 1, kill.t_s), what);
        }
        row(
            "sampling",
            format!(
                "{} samples, every {} ms asked; achieved median {}, max {}; {} late (> {LATE_FACTOR}x); reads p50 {}; {} status errors",
                s.pool.samples,
                s.interval_ms,
                opt(s.pool.sample_interval_p50_ms, " ms"),
                opt(s.pool.sample_interval_max_ms, " ms"),
                s.pool.late_samples,
                opt(s.pool.sample_read_p50_ms, " ms"),
                s.pool.status_errors
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

    /// The limits the daemon applied, how it got them, and what was asked.
    fn limits(&self) -> String {
        let m = &self.summary.memory;
        let limit = |mib: Option<f64>| mib.map_or("none".to_owned(), |v| format!("{v:.0} MiB"));
        let asked = |text: &Option<String>| text.clone().unwrap_or_else(|| "not set".to_owned());
        let origin = if m.limits_origin.is_empty() {
            "origin not reported".to_owned()
        } else {
            m.limits_origin.clone()
        };
        let changes = m.daemon_settings.len() - 1;
        format!(
            "soft {}, hard {} ({origin}){}; asked: soft {}, hard {}{}",
            limit(m.soft_limit_mib),
            limit(m.hard_limit_mib),
            if changes > 0 {
                format!(", changed {changes} time(s) during the run")
            } else {
                String::new()
            },
            asked(&m.soft_limit_requested),
            asked(&m.hard_limit_requested),
            m.max_requests
                .map(|n| format!(", max_requests {n}"))
                .unwrap_or_default()
        )
    }
}

/// The request outcomes, the clients' and the daemon's.
fn request_summary(
    recorded: &Recorded,
    wall: f64,
    after: &Counters,
    initial: &Counters,
) -> RequestSummary {
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
    let all_latencies = load
        .by_kind
        .values()
        .flat_map(|k| k.latencies_ms.iter().copied())
        .collect();
    let by_request = load
        .by_kind
        .iter()
        .map(
            |(
                kind,
                KindLog {
                    ok,
                    failed,
                    latencies_ms,
                },
            )| {
                let summary = KindSummary {
                    ok: *ok,
                    failed: *failed,
                    latency: Latency::of(latencies_ms.clone()),
                };
                (*kind, summary)
            },
        )
        .collect();
    let ok = load.ok();
    RequestSummary {
        ok,
        failed: load.failures.len() as u64,
        failed_by_kind,
        failure_examples,
        ok_per_s: round(ok as f64 / wall.max(1e-9), 2),
        latency: Latency::of(all_latencies),
        by_request,
        long_text_tokens: recorded.long_text_tokens,
        daemon_failed_by_kind: delta(
            ErrorKind::ALL,
            &after.requests_failed,
            &initial.requests_failed,
        ),
        daemon_retries: after.retries.saturating_sub(initial.retries),
    }
}

/// How regularly the samples came.
#[derive(Debug, PartialEq)]
struct SamplingStats {
    /// Median and largest time between consecutive samples.
    p50_ms: Option<f64>,
    max_ms: Option<f64>,
    /// Gaps longer than [`LATE_FACTOR`] × the asked interval.
    late: usize,
}

impl SamplingStats {
    fn of(times_s: &[f64], interval_ms: u64) -> SamplingStats {
        let mut gaps: Vec<f64> = times_s.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect();
        gaps.sort_by(f64::total_cmp);
        let late_after = interval_ms as f64 * LATE_FACTOR;
        SamplingStats {
            p50_ms: percentile(&gaps, 0.5),
            max_ms: gaps.last().copied(),
            late: gaps.iter().filter(|gap| **gap > late_after).count(),
        }
    }
}

/// The change of a counter map over the run, for every kind in `all`.
fn delta<K: Ord + Copy>(
    all: &[K],
    after: &BTreeMap<K, u64>,
    before: &BTreeMap<K, u64>,
) -> BTreeMap<K, u64> {
    let get = |map: &BTreeMap<K, u64>, kind| map.get(&kind).copied().unwrap_or(0);
    all.iter()
        .map(|kind| (*kind, get(after, *kind).saturating_sub(get(before, *kind))))
        .collect()
}

/// `kind n` pairs; zeros too if `zeros`, else "none" when all are zero.
fn kinds<K: std::fmt::Display>(map: &BTreeMap<K, u64>, zeros: bool) -> String {
    let parts: Vec<String> = map
        .iter()
        .filter(|(_, n)| zeros || **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The value at quantile `p` of sorted `values` (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64) * p).round() as usize])
}

/// A number with one decimal and its unit, or "n/a".
fn opt(value: Option<f64>, unit: &str) -> String {
    value.map_or("n/a".to_owned(), |v| format!("{v:.1}{unit}"))
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
pub(crate) fn command_line() -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::csv_field;

    #[test]
    fn counter_deltas_cover_every_kind() {
        let before = BTreeMap::from([(RecycleTrigger::SoftLimit, 2)]);
        let after = BTreeMap::from([
            (RecycleTrigger::SoftLimit, 5),
            (RecycleTrigger::LeakRate, 1),
        ]);
        let d = delta(RecycleTrigger::ALL, &after, &before);
        assert_eq!(d.len(), RecycleTrigger::ALL.len());
        assert_eq!(d[&RecycleTrigger::SoftLimit], 3);
        assert_eq!(d[&RecycleTrigger::LeakRate], 1);
        assert_eq!(d[&RecycleTrigger::Roll], 0);
        assert_eq!(kinds(&d, false), "soft_limit 3, leak_rate 1");
        assert_eq!(
            kinds(&d, true),
            "soft_limit 3, max_requests 0, max_lifetime 0, roll 0, leak_rate 1"
        );
        assert_eq!(kinds(&BTreeMap::<ExitKind, u64>::new(), false), "none");
    }

    #[test]
    fn sampling_counts_late_samples_and_the_median_gap() {
        let times = [0.0, 0.010, 0.020, 0.050, 0.060, 0.071];
        let stats = SamplingStats::of(&times, 10);
        assert_eq!(stats.late, 1);
        assert!(
            (stats.p50_ms.expect("gaps") - 10.0).abs() < 1e-6,
            "{stats:?}"
        );
        assert!((stats.max_ms.expect("gaps") - 30.0).abs() < 1e-6);
        assert_eq!(
            SamplingStats::of(&[1.0], 10),
            SamplingStats {
                p50_ms: None,
                max_ms: None,
                late: 0
            }
        );
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
