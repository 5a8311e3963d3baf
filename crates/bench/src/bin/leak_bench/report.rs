//! What the run amounts to: `summary.json`, the plot titles, the Markdown
//! table, and the command line that produced it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use inferd_client::{Counters, ExitKind};
use serde::Serialize;

use crate::config::Limits;
use crate::daemon::DaemonExit;
use crate::scenario::Recorded;
use crate::{Args, MIB};

/// The contents of summary.json.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
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
pub(crate) struct Report {
    pub(crate) summary: Summary,
    problem: Option<String>,
}

impl Report {
    pub(crate) fn new(
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
            "inferd, {} workers, {leak}: {} ok, {} failed, {} recycles in {:.0} s",
            s.workers, s.requests.ok, s.requests.failed, s.recycles.worker_exits, s.duration_s
        )
    }

    /// The caption of the supervisor panel.
    pub(crate) fn supervisor_title(&self) -> String {
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
    pub(crate) fn markdown(&self, out: &Path) -> String {
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
