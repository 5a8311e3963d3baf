//! Prometheus text exposition (format 0.0.4) of a [`PoolStatus`].
//!
//! [`render`] turns one status snapshot into the text a Prometheus server
//! scrapes. Every family appears exactly once, as `# HELP`, then `# TYPE`,
//! then its samples; names carry the `inferd_` prefix and base units
//! (seconds, bytes), and counters end in `_total`. Label values are escaped
//! as the format requires (`\\`, `\"`, `\n`).
//!
//! ## Metrics
//!
//! Pool gauges:
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `inferd_up` | | always 1: the supervisor is running and answered |
//! | `inferd_uptime_seconds` | | seconds since the supervisor started |
//! | `inferd_workers_target` | | configured number of workers |
//! | `inferd_workers` | `state` | live worker processes per lifecycle state; every state (`starting`, `ready`, `busy`, `draining`, `stopping`, `spare`, `exiting`) is always present, 0 when none |
//! | `inferd_queue_depth` | | requests waiting for a worker |
//! | `inferd_queue_capacity` | | requests the queue holds before new ones are answered `overloaded` |
//! | `inferd_queued_bytes` | | bytes of text held by queued requests |
//! | `inferd_queued_bytes_budget` | | `max_queued_bytes`: the most queued text the supervisor holds |
//! | `inferd_connections` | | client connections open |
//! | `inferd_connections_max` | | the connection cap in force (`max_connections`, lowered at start if the descriptor limit is too small) |
//! | `inferd_unavailable` | | 1 while the pool cannot serve requests (e.g. workers fail to load; the reason is in `inferctl status` and the log), else 0 |
//! | `inferd_last_roll_failed` | | 1 when the last rolling restart gave up because its new workers could not start (the old ones keep serving; the reason is in `inferctl status`), else 0 |
//! | `inferd_memory_soft_limit_bytes` | | per-worker memory above which a worker is recycled gracefully; only when set |
//! | `inferd_memory_hard_limit_bytes` | | per-worker memory above which a worker is killed (and its cgroup's limit); only when set (an automatic limit once derived) |
//! | `inferd_spare_workers_target` | | loaded workers held in reserve, target (`spare_workers`, as resolved) |
//!
//! Per-worker gauges, one sample per live worker process:
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `inferd_worker_resident_memory_bytes` | `worker_id`, `pid` | resident set size (RSS); absent for a worker whose memory could not be read |
//! | `inferd_worker_proportional_memory_bytes` | `worker_id`, `pid` | proportional set size (PSS); only when the memory metric reads `smaps_rollup` |
//! | `inferd_worker_unique_memory_bytes` | `worker_id`, `pid` | unique set size (USS); only when the memory metric reads `smaps_rollup` |
//! | `inferd_worker_requests_served` | `worker_id`, `pid` | requests this worker answered so far |
//! | `inferd_worker_age_seconds` | `worker_id`, `pid` | seconds since this worker was spawned |
//! | `inferd_worker_memory_growth_bytes_per_second` | `worker_id`, `pid` | sustained memory growth (what leak-rate recycling projects against the hard limit); absent until a worker has a few seconds of readings |
//!
//! Counters, cumulative since the supervisor started:
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `inferd_requests_accepted_total` | | embed requests accepted into the queue |
//! | `inferd_requests_ok_total` | | requests answered with embeddings |
//! | `inferd_requests_failed_total` | `kind` | requests answered with an error, per error kind: `bad_request`, `overloaded`, `timeout`, `worker_lost`, `shutting_down`, `unavailable`, `too_many_connections`, `permission_denied`, `roll_failed`, `internal`, each always present (connection refusals and failed rolls are counted elsewhere, so those two stay 0) |
//! | `inferd_requests_rejected_total` | | embed requests answered with an error at once, never queued (also in `inferd_requests_failed_total` under their kind); `accepted + rejected = ok + failed + abandoned` once nothing is queued or running |
//! | `inferd_requests_abandoned_total` | | queued requests dropped unrun because their client disconnected |
//! | `inferd_connections_refused_total` | `reason` | client connections refused, per reason: `max_connections`, `max_connections_per_uid`, `permission_denied`, each always present |
//! | `inferd_request_retries_total` | | in-flight requests re-dispatched after their worker died |
//! | `inferd_poison_rejections_total` | | requests quarantined as poison inputs (answered `worker_lost`) |
//! | `inferd_workers_spawned_total` | | worker processes spawned |
//! | `inferd_spares_promoted_total` | | spares promoted to take a dead or recycled worker's place |
//! | `inferd_recycles_total` | `trigger` | graceful recycles started, per trigger: `soft_limit`, `max_requests`, `max_lifetime`, `roll` (SIGHUP), `leak_rate` (growth projected past the hard limit before a replacement could be Ready), each always present |
//! | `inferd_recycles_failed_total` | `trigger` | recycles abandoned because the replacement ended before it was Ready (the old worker serves on and is judged again), per trigger, each always present |
//! | `inferd_worker_exits_total` | `end` | worker exits per classified end: `retired`, `killed_by_supervisor`, `oom_killed`, `likely_oom_killed` (no per-worker cgroup, the host's OOM counter rose), `signaled`, `exited`, `unknown` (it could not be waited for), each always present |

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::{self, Display, Write as _};

use inferd_proto::{
    ErrorKind, ExitKind, PoolStatus, RecycleTrigger, RefusalReason, RollState, WorkerStateKind,
    WorkerStatus,
};

/// Renders `status` as Prometheus text exposition: every counter and gauge
/// with # HELP and # TYPE lines.
pub fn render(status: &PoolStatus) -> String {
    Exposition(status).to_string()
}

/// The exposition of one status snapshot; rendering it through `Display`
/// lets every write propagate with `?`.
struct Exposition<'a>(&'a PoolStatus);

impl Display for Exposition<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Type::{Counter, Gauge};
        let status = self.0;
        let counters = &status.counters;

        scalar(
            f,
            "inferd_up",
            Gauge,
            "1 while the supervisor is running.",
            1u64,
        )?;
        scalar(
            f,
            "inferd_uptime_seconds",
            Gauge,
            "Seconds since the supervisor started.",
            status.uptime_secs,
        )?;
        scalar(
            f,
            "inferd_workers_target",
            Gauge,
            "Configured number of workers.",
            status.target_workers,
        )?;
        labelled(
            f,
            "inferd_workers",
            Gauge,
            "Live worker processes by lifecycle state.",
            "state",
            WorkerStateKind::ALL,
            status.workers.iter().map(|w| (w.state, 1)),
        )?;
        scalar(
            f,
            "inferd_queue_depth",
            Gauge,
            "Requests waiting for a worker.",
            status.queue_depth,
        )?;
        scalar(
            f,
            "inferd_queue_capacity",
            Gauge,
            "Requests the queue holds before answering overloaded.",
            status.queue_capacity,
        )?;
        scalar(
            f,
            "inferd_queued_bytes",
            Gauge,
            "Bytes of text held by queued requests.",
            status.queued_bytes,
        )?;
        scalar(
            f,
            "inferd_queued_bytes_budget",
            Gauge,
            "Most bytes of queued text the supervisor holds (max_queued_bytes).",
            status.queued_bytes_budget,
        )?;
        scalar(
            f,
            "inferd_connections",
            Gauge,
            "Client connections open.",
            status.connections,
        )?;
        scalar(
            f,
            "inferd_connections_max",
            Gauge,
            "The client connection cap in force.",
            status.max_connections,
        )?;
        scalar(
            f,
            "inferd_unavailable",
            Gauge,
            "1 while the pool cannot serve requests (e.g. workers fail to load), else 0.",
            u64::from(status.unavailable_reason.is_some()),
        )?;
        scalar(
            f,
            "inferd_last_roll_failed",
            Gauge,
            "1 when the last rolling restart gave up (its new workers could not start), else 0.",
            u64::from(matches!(
                status.roll.as_ref().map(|r| &r.state),
                Some(RollState::Failed { .. })
            )),
        )?;
        scalar(
            f,
            "inferd_spare_workers_target",
            Gauge,
            "Loaded workers held in reserve, target.",
            status.target_spares,
        )?;
        if let Some(bytes) = status.soft_limit_bytes {
            scalar(
                f,
                "inferd_memory_soft_limit_bytes",
                Gauge,
                "Per-worker memory above which a worker is recycled gracefully.",
                bytes,
            )?;
        }
        if let Some(bytes) = status.hard_limit_bytes {
            scalar(
                f,
                "inferd_memory_hard_limit_bytes",
                Gauge,
                "Per-worker memory above which a worker is killed.",
                bytes,
            )?;
        }

        let workers = &status.workers;
        per_worker(
            f,
            "inferd_worker_resident_memory_bytes",
            "Resident set size of each worker process.",
            workers,
            Presence::Always,
            |w| w.rss_bytes.map(Number::from),
        )?;
        per_worker(
            f,
            "inferd_worker_proportional_memory_bytes",
            "Proportional set size (PSS) of each worker process.",
            workers,
            Presence::WhenAny,
            |w| w.pss_bytes.map(Number::from),
        )?;
        per_worker(
            f,
            "inferd_worker_unique_memory_bytes",
            "Unique set size (USS) of each worker process.",
            workers,
            Presence::WhenAny,
            |w| w.uss_bytes.map(Number::from),
        )?;
        per_worker(
            f,
            "inferd_worker_requests_served",
            "Requests each worker process answered.",
            workers,
            Presence::Always,
            |w| Some(w.requests_served.into()),
        )?;
        per_worker(
            f,
            "inferd_worker_age_seconds",
            "Seconds since each worker process was spawned.",
            workers,
            Presence::Always,
            |w| Some(w.age_secs.into()),
        )?;
        per_worker(
            f,
            "inferd_worker_memory_growth_bytes_per_second",
            "Sustained memory growth of each worker process.",
            workers,
            Presence::WhenAny,
            |w| w.growth_bytes_per_sec.map(Number::from),
        )?;

        scalar(
            f,
            "inferd_requests_accepted_total",
            Counter,
            "Embed requests accepted into the queue.",
            counters.requests_accepted,
        )?;
        scalar(
            f,
            "inferd_requests_ok_total",
            Counter,
            "Requests answered with embeddings.",
            counters.requests_ok,
        )?;
        labelled(
            f,
            "inferd_requests_failed_total",
            Counter,
            "Requests answered with an error, by error kind.",
            "kind",
            ErrorKind::ALL,
            counted(&counters.requests_failed),
        )?;
        scalar(
            f,
            "inferd_requests_rejected_total",
            Counter,
            "Embed requests answered with an error at once, never queued.",
            counters.requests_rejected,
        )?;
        scalar(
            f,
            "inferd_requests_abandoned_total",
            Counter,
            "Queued requests dropped unrun because their client disconnected.",
            counters.requests_abandoned,
        )?;
        labelled(
            f,
            "inferd_connections_refused_total",
            Counter,
            "Client connections refused, by reason.",
            "reason",
            RefusalReason::ALL,
            counted(&counters.connections_refused),
        )?;
        scalar(
            f,
            "inferd_request_retries_total",
            Counter,
            "In-flight requests re-dispatched after their worker died.",
            counters.retries,
        )?;
        scalar(
            f,
            "inferd_poison_rejections_total",
            Counter,
            "Requests quarantined as poison inputs (answered worker_lost).",
            counters.poison_rejections,
        )?;
        scalar(
            f,
            "inferd_workers_spawned_total",
            Counter,
            "Worker processes spawned.",
            counters.workers_spawned,
        )?;
        scalar(
            f,
            "inferd_spares_promoted_total",
            Counter,
            "Spares promoted to take a dead or recycled worker's place.",
            counters.spares_promoted,
        )?;
        labelled(
            f,
            "inferd_recycles_total",
            Counter,
            "Graceful worker recycles started, by trigger.",
            "trigger",
            RecycleTrigger::ALL,
            counted(&counters.recycles),
        )?;
        labelled(
            f,
            "inferd_recycles_failed_total",
            Counter,
            "Recycles abandoned because the replacement ended before it was ready, by trigger.",
            "trigger",
            RecycleTrigger::ALL,
            counted(&counters.recycles_failed),
        )?;
        labelled(
            f,
            "inferd_worker_exits_total",
            Counter,
            "Worker process exits, by classified end.",
            "end",
            ExitKind::ALL,
            counted(&counters.worker_exits),
        )
    }
}

/// A metric family's type, as the `# TYPE` line names it.
#[derive(Debug, Clone, Copy)]
enum Type {
    /// Only ever goes up (until the supervisor restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        })
    }
}

/// A sample value: integers print exactly, floats in the format's spelling
/// of the special values.
#[derive(Debug, Clone, Copy)]
enum Number {
    /// A count or a size.
    Int(u64),
    /// A duration in seconds.
    Float(f64),
}

impl From<u64> for Number {
    fn from(n: u64) -> Self {
        Self::Int(n)
    }
}

impl From<u32> for Number {
    fn from(n: u32) -> Self {
        Self::Int(n.into())
    }
}

impl From<f64> for Number {
    fn from(x: f64) -> Self {
        Self::Float(x)
    }
}

impl Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Float(x) if x.is_nan() => f.write_str("NaN"),
            Self::Float(x) if x == f64::INFINITY => f.write_str("+Inf"),
            Self::Float(x) if x == f64::NEG_INFINITY => f.write_str("-Inf"),
            Self::Float(x) => write!(f, "{x}"),
        }
    }
}

/// A label value escaped for the exposition: backslash, double quote and
/// newline become `\\`, `\"` and `\n`.
struct Escaped<'a>(&'a str);

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Whether a per-worker family is exported when no worker has a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// Always, with no samples if need be.
    Always,
    /// Only when at least one worker has a value (the metric is configured).
    WhenAny,
}

/// Writes a family's `# HELP` and `# TYPE` lines. `help` must hold no
/// backslash or newline (all callers pass constants).
fn header(f: &mut fmt::Formatter<'_>, name: &str, kind: Type, help: &str) -> fmt::Result {
    writeln!(f, "# HELP {name} {help}")?;
    writeln!(f, "# TYPE {name} {kind}")
}

/// Writes one sample line.
fn sample(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    labels: &[(&str, &str)],
    value: Number,
) -> fmt::Result {
    f.write_str(name)?;
    for (i, (label, value)) in labels.iter().enumerate() {
        let open = if i == 0 { '{' } else { ',' };
        write!(f, "{open}{label}=\"{}\"", Escaped(value))?;
    }
    if !labels.is_empty() {
        f.write_char('}')?;
    }
    writeln!(f, " {value}")
}

/// A family with one unlabelled sample.
fn scalar(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    kind: Type,
    help: &str,
    value: impl Into<Number>,
) -> fmt::Result {
    header(f, name, kind, help)?;
    sample(f, name, &[], value.into())
}

/// A family with one label: a sample for each of `known` (0 unless counted)
/// and for every other value in `counts`, summed per value, in label order.
fn labelled<K: Copy + Ord + Display>(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    kind: Type,
    help: &str,
    label: &str,
    every: &[K],
    counts: impl IntoIterator<Item = (K, u64)>,
) -> fmt::Result {
    let mut values: BTreeMap<K, u64> = every.iter().map(|&k| (k, 0)).collect();
    for (value, n) in counts {
        *values.entry(value).or_default() += n;
    }
    header(f, name, kind, help)?;
    for (value, n) in values {
        sample(f, name, &[(label, &value.to_string())], n.into())?;
    }
    Ok(())
}

/// The entries of a counter map, for [`labelled`].
fn counted<K: Copy>(map: &BTreeMap<K, u64>) -> impl Iterator<Item = (K, u64)> + '_ {
    map.iter().map(|(&k, &n)| (k, n))
}

/// A gauge family with a sample per worker that has a `value`, labelled with
/// its id and pid.
fn per_worker(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    help: &str,
    workers: &[WorkerStatus],
    presence: Presence,
    value: impl Fn(&WorkerStatus) -> Option<Number>,
) -> fmt::Result {
    if presence == Presence::WhenAny && workers.iter().all(|w| value(w).is_none()) {
        return Ok(());
    }
    header(f, name, Type::Gauge, help)?;
    for worker in workers {
        if let Some(number) = value(worker) {
            let id = worker.id.to_string();
            let pid = worker.pid.to_string();
            sample(f, name, &[("worker_id", &id), ("pid", &pid)], number)?;
        }
    }
    Ok(())
}
