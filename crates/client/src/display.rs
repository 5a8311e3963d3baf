//! Human-readable rendering of a [`PoolStatus`] for `inferctl status`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use inferd_proto::{PoolStatus, WorkerStateKind};

/// Renders `status` as a few header lines, one table row per worker, then the
/// counters. Ends with a newline.
pub fn format_status(status: &PoolStatus) -> String {
    let mut out = String::new();
    let count = |state: WorkerStateKind| status.workers.iter().filter(|w| w.state == state).count();
    // Writing into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        out,
        "supervisor   pid {}, up {}",
        status.pid,
        human_duration(status.uptime_secs as f64)
    );
    let _ = writeln!(out, "model        {}", status.model.display());
    let _ = writeln!(
        out,
        "workers      {} ready, {} busy / {} target; {} spare / {} target ({} processes)",
        count(WorkerStateKind::Ready),
        count(WorkerStateKind::Busy),
        status.target_workers,
        count(WorkerStateKind::Spare),
        status.target_spares,
        status.workers.len()
    );
    let _ = writeln!(
        out,
        "queue        {} / {} requests, {} / {} of text",
        status.queue_depth,
        status.queue_capacity,
        mib(status.queued_bytes),
        mib(status.queued_bytes_budget)
    );
    let _ = writeln!(
        out,
        "connections  {} / {}",
        status.connections, status.max_connections
    );
    let limit = |bytes: Option<u64>| bytes.map_or_else(|| "none".into(), mib);
    let _ = writeln!(
        out,
        "memory       soft limit {}, hard limit {}; cgroups: {}",
        limit(status.soft_limit_bytes),
        limit(status.hard_limit_bytes),
        status.cgroups
    );
    if !status.limits_origin.is_empty() {
        let _ = writeln!(out, "limits       {}", status.limits_origin);
    }
    if let Some(reason) = &status.unavailable_reason {
        let _ = writeln!(out, "UNAVAILABLE  {reason}");
    }
    if let Some(chaos) = &status.chaos {
        let _ = writeln!(out, "CHAOS        test-only options on: {chaos}");
    }
    for recycle in &status.recycles {
        let _ = writeln!(
            out,
            "recycle      worker {} -> {} ({}): {}, {}",
            recycle.old_worker,
            recycle.replacement,
            recycle.trigger,
            recycle.stage,
            human_duration(recycle.age_secs)
        );
    }
    if let Some(roll) = &status.roll {
        let _ = writeln!(
            out,
            "roll         generation {}: {}, {} worker(s) replaced",
            roll.generation, roll.state, roll.replaced
        );
    }

    out.push('\n');
    let _ = writeln!(
        out,
        "{:>4}  {:>8}  {:<9}  {:>9}  {:>9}  {:>10}  NOTE",
        "ID", "PID", "STATE", "RSS(MiB)", "REQUESTS", "AGE"
    );
    if status.workers.is_empty() {
        let _ = writeln!(out, "(no worker processes)");
    }
    for w in &status.workers {
        let rss = w
            .rss_bytes
            .map(|b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "-".into());
        let mut note = Vec::new();
        if let Some(old) = w.replaces {
            note.push(format!("replacing worker {old}"));
        }
        if w.spare && w.state == WorkerStateKind::Starting {
            note.push("spare".into());
        }
        if let Some(growth) = w.growth_bytes_per_sec.filter(|g| *g > 0.0) {
            note.push(format!("growing {}/s", mib(growth as u64)));
        }
        if let Some(pss) = w.pss_bytes {
            note.push(format!("pss {}", mib(pss)));
        }
        if let Some(uss) = w.uss_bytes {
            note.push(format!("uss {}", mib(uss)));
        }
        if let Some(cgroup) = &w.cgroup {
            note.push(format!("cgroup {cgroup}"));
        }
        let _ = writeln!(
            out,
            "{:>4}  {:>8}  {:<9}  {:>9}  {:>9}  {:>10}  {}",
            w.id,
            w.pid,
            w.state,
            rss,
            w.requests_served,
            human_duration(w.age_secs),
            note.join(", ")
        );
    }

    let c = &status.counters;
    out.push('\n');
    let _ = writeln!(out, "counters");
    let _ = writeln!(out, "  requests accepted   {}", c.requests_accepted);
    let _ = writeln!(out, "  requests ok         {}", c.requests_ok);
    let _ = writeln!(out, "  requests failed     {}", by_kind(&c.requests_failed));
    let _ = writeln!(out, "  requests rejected   {}", c.requests_rejected);
    let _ = writeln!(out, "  requests abandoned  {}", c.requests_abandoned);
    let _ = writeln!(
        out,
        "  refused connections {}",
        by_kind(&c.connections_refused)
    );
    let _ = writeln!(out, "  retries             {}", c.retries);
    let _ = writeln!(out, "  poison rejections   {}", c.poison_rejections);
    let _ = writeln!(out, "  workers spawned     {}", c.workers_spawned);
    let _ = writeln!(out, "  recycles            {}", by_kind(&c.recycles));
    let _ = writeln!(out, "  recycles failed     {}", by_kind(&c.recycles_failed));
    let _ = writeln!(out, "  spares promoted     {}", c.spares_promoted);
    let _ = writeln!(out, "  worker exits        {}", by_kind(&c.worker_exits));
    if !status.recent_exits.is_empty() {
        out.push('\n');
        let _ = writeln!(out, "recent worker exits (oldest first)");
        for exit in &status.recent_exits {
            let _ = writeln!(
                out,
                "  worker {} (pid {}) at {}: {}; served {}, lived {}",
                exit.worker_id,
                exit.pid,
                human_duration(exit.uptime_at_exit_secs),
                exit.description,
                exit.requests_served,
                human_duration(exit.age_secs)
            );
        }
    }
    out
}

/// `123.4MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `kind=n kind=n`, or `0` when empty.
fn by_kind<K: std::fmt::Display>(counts: &BTreeMap<K, u64>) -> String {
    if counts.is_empty() {
        return "0".into();
    }
    let total: u64 = counts.values().sum();
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
    format!("{total} ({})", parts.join(" "))
}

/// `42s`, `3m07s`, `5h02m`, `2d03h`.
fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferd_proto::{Counters, ErrorKind, ExitKind, RefusalReason, WorkerStatus};

    fn worker(id: u64, pid: u32, state: WorkerStateKind) -> WorkerStatus {
        WorkerStatus {
            id,
            pid,
            state,
            rss_bytes: Some(183 * 1024 * 1024),
            pss_bytes: None,
            uss_bytes: None,
            requests_served: 12,
            age_secs: 3725.0,
            cgroup: None,
            replaces: None,
            spare: false,
            growth_bytes_per_sec: None,
        }
    }

    #[test]
    fn table_has_header_rows_and_counters() {
        let mut counters = Counters {
            requests_accepted: 10,
            requests_ok: 8,
            retries: 1,
            poison_rejections: 1,
            workers_spawned: 4,
            ..Counters::default()
        };
        counters.requests_failed.insert(ErrorKind::WorkerLost, 1);
        counters.requests_failed.insert(ErrorKind::Timeout, 1);
        counters.worker_exits.insert(ExitKind::Signaled, 2);
        counters.requests_abandoned = 3;
        counters
            .connections_refused
            .insert(RefusalReason::MaxConnectionsPerUid, 9);
        let status = PoolStatus {
            pid: 4242,
            uptime_secs: 90,
            model: "/models/m.onnx".into(),
            target_workers: 2,
            workers: vec![
                worker(3, 100, WorkerStateKind::Ready),
                WorkerStatus {
                    growth_bytes_per_sec: Some(64.0 * 1024.0 * 1024.0),
                    ..worker(4, 101, WorkerStateKind::Busy)
                },
                worker(6, 102, WorkerStateKind::Spare),
            ],
            queue_depth: 5,
            queue_capacity: 256,
            queued_bytes: 3 << 20,
            queued_bytes_budget: 64 << 20,
            connections: 7,
            max_connections: 4096,
            unavailable_reason: Some("model file missing".into()),
            soft_limit_bytes: Some(300 << 20),
            hard_limit_bytes: None,
            limits_origin: "auto: baseline 90.0 MiB".into(),
            target_spares: 1,
            cgroups: "off (configured)".into(),
            recent_exits: vec![inferd_proto::ExitRecord {
                worker_id: 2,
                pid: 99,
                kind: ExitKind::OomKilled,
                description: "OOM-killed by the kernel".into(),
                requests_served: 7,
                age_secs: 30.0,
                uptime_at_exit_secs: 60.0,
            }],
            roll: Some(inferd_proto::RollReport {
                generation: 3,
                replaced: 0,
                state: inferd_proto::RollState::Failed {
                    reason: "model.onnx: not an ONNX file".into(),
                },
            }),
            chaos: Some("crash_marker \"boom\"".into()),
            recycles: vec![inferd_proto::RecycleReport {
                old_worker: 3,
                replacement: 5,
                trigger: inferd_proto::RecycleTrigger::SoftLimit,
                age_secs: 2.0,
                stage: inferd_proto::RecycleStage::Loading,
            }],
            counters,
        };
        let text = format_status(&status);
        assert!(text.contains("pid 4242, up 1m30s"), "{text}");
        assert!(text.contains("/models/m.onnx"), "{text}");
        assert!(
            text.contains("1 ready, 1 busy / 2 target; 1 spare / 1 target (3 processes)"),
            "{text}"
        );
        assert!(
            text.contains("limits       auto: baseline 90.0 MiB"),
            "{text}"
        );
        assert!(text.contains("growing 64.0MiB/s"), "{text}");
        assert!(
            text.contains("5 / 256 requests, 3.0MiB / 64.0MiB of text"),
            "{text}"
        );
        assert!(text.contains("connections  7 / 4096"), "{text}");
        assert!(text.contains("requests abandoned  3"), "{text}");
        assert!(
            text.contains("refused connections 9 (max_connections_per_uid=9)"),
            "{text}"
        );
        assert!(text.contains("UNAVAILABLE  model file missing"), "{text}");
        assert!(
            text.contains("CHAOS        test-only options on: crash_marker \"boom\""),
            "{text}"
        );
        assert!(
            text.contains("recycle      worker 3 -> 5 (soft_limit): loading, 2.0s"),
            "{text}"
        );
        assert!(
            text.contains("roll         generation 3: FAILED: model.onnx: not an ONNX file, 0 worker(s) replaced"),
            "{text}"
        );
        assert!(text.contains("RSS(MiB)"), "{text}");
        assert!(
            text.contains("soft limit 300.0MiB, hard limit none"),
            "{text}"
        );
        assert!(
            text.contains("worker 2 (pid 99) at 1m00s: OOM-killed by the kernel"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.contains(" 101 "))
            .unwrap_or_default();
        assert!(
            row.contains("busy") && row.contains("183.0") && row.contains("1h02m"),
            "{row}"
        );
        assert!(text.contains("2 (timeout=1 worker_lost=1)"), "{text}");
        assert!(
            text.contains("worker exits        2 (signaled=2)"),
            "{text}"
        );
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(human_duration(1.34), "1.3s");
        assert_eq!(human_duration(59.0), "59s");
        assert_eq!(human_duration(187.0), "3m07s");
        assert_eq!(human_duration(90_000.0), "1d01h");
    }
}
