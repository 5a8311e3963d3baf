//! Tests of the `metrics` module.

use std::collections::HashSet;

use inferd_proto::Counters;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};

use super::*;

type Parsed = MetricsExposition<PrometheusType, PrometheusValue>;

/// A failure kind that needs every escape.
const ODD_KIND: &str = "odd \"kind\" \\ with\nnewline";

fn map<K: Ord + Copy>(entries: &[(K, u64)]) -> BTreeMap<K, u64> {
    entries.iter().copied().collect()
}

fn representative() -> PoolStatus {
    PoolStatus {
        pid: 10,
        uptime_secs: 3600,
        model: "/models/m.onnx".into(),
        target_workers: 2,
        workers: vec![
            WorkerStatus {
                id: 1,
                pid: 101,
                state: WorkerStateKind::Ready,
                rss_bytes: Some(300 << 20),
                pss_bytes: Some(250 << 20),
                uss_bytes: Some(200 << 20),
                requests_served: 40,
                age_secs: 12.5,
                cgroup: None,
                replaces: None,
                spare: false,
                growth_bytes_per_sec: Some(1024.0),
            },
            WorkerStatus {
                id: 2,
                pid: 102,
                state: WorkerStateKind::Busy,
                rss_bytes: Some(310 << 20),
                pss_bytes: None,
                uss_bytes: None,
                requests_served: 7,
                age_secs: 0.25,
                cgroup: None,
                replaces: None,
                spare: false,
                growth_bytes_per_sec: Some(1024.0),
            },
        ],
        queue_depth: 3,
        queue_capacity: 64,
        queued_bytes: 4096,
        queued_bytes_budget: 1 << 26,
        connections: 12,
        max_connections: 4096,
        unavailable_reason: Some("model \"m\" failed\nto load".into()),
        soft_limit_bytes: Some(1 << 30),
        hard_limit_bytes: Some(2 << 30),
        limits_origin: "set in the configuration".into(),
        target_spares: 1,
        cgroups: "off".into(),
        recent_exits: Vec::new(),
        roll: None,
        chaos: None,
        recycles: Vec::new(),
        counters: Counters {
            requests_accepted: 100,
            requests_ok: 90,
            requests_failed: map(&[
                (ErrorKind::Timeout, 3),
                (ErrorKind::Overloaded, 2),
                (ErrorKind::Internal, 1),
            ]),
            requests_abandoned: 5,
            requests_rejected: 8,
            connections_refused: map(&[(RefusalReason::MaxConnectionsPerUid, 6)]),
            retries: 2,
            poison_rejections: 1,
            workers_spawned: 7,
            spares_promoted: 3,
            recycles: map(&[
                (RecycleTrigger::SoftLimit, 1),
                (RecycleTrigger::MaxRequests, 2),
            ]),
            recycles_failed: map(&[(RecycleTrigger::Roll, 1)]),
            worker_exits: map(&[
                (ExitKind::Retired, 3),
                (ExitKind::OomKilled, 1),
                (ExitKind::KilledBySupervisor, 1),
            ]),
        },
    }
}

/// Parses with a strict parser (it rejects malformed lines, a family
/// split in two, repeated HELP/TYPE lines and duplicate label sets), then
/// checks the rest of the contract on the parse and on the raw lines.
fn parse_checked(text: &str) -> Parsed {
    let parsed = parse_prometheus(text)
        .unwrap_or_else(|err| panic!("the parser rejected the exposition: {err}\n{text}"));
    assert!(text.ends_with('\n'), "no final newline");
    for (name, family) in &parsed.families {
        assert!(name.starts_with("inferd_"), "{name}: no prefix");
        assert!(!family.help.is_empty(), "{name}: no HELP");
        let expected = if name.ends_with("_total") {
            PrometheusType::Counter
        } else {
            PrometheusType::Gauge
        };
        assert_eq!(family.family_type, expected, "{name}: wrong TYPE");
    }
    // HELP, then TYPE, then samples of that family only; no family twice.
    let mut seen = HashSet::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let name = line
            .strip_prefix("# HELP ")
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("expected a HELP line, got {line:?}"));
        assert!(seen.insert(name.to_owned()), "{name} repeated");
        let kind = lines.next().and_then(|l| l.strip_prefix("# TYPE "));
        assert!(
            kind.is_some_and(|k| k.starts_with(&format!("{name} "))),
            "{name}: HELP not followed by its TYPE"
        );
        while let Some(next) = lines.next_if(|l| !l.starts_with('#')) {
            let sample_name = next.split(['{', ' ']).next();
            assert_eq!(
                sample_name,
                Some(name),
                "sample {next:?} outside its family"
            );
        }
    }
    assert_eq!(seen.len(), parsed.families.len());
    parsed
}

/// The one sample of `family` whose labels are exactly `labels`.
fn value(parsed: &Parsed, family: &str, labels: &[(&str, &str)]) -> f64 {
    let family = parsed
        .families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}"));
    let matching: Vec<_> = family
        .iter_samples()
        .filter(|s| {
            let set = s.get_labelset().expect("labels parse");
            set.iter().count() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .collect();
    assert_eq!(matching.len(), 1, "{labels:?} in {}", family.family_name);
    match &matching[0].value {
        PrometheusValue::Gauge(n) => n.as_f64(),
        PrometheusValue::Counter(c) => c.value.as_f64(),
        other => panic!("unexpected value {other:?}"),
    }
}

fn sample_count(parsed: &Parsed, family: &str) -> usize {
    parsed.families[family].iter_samples().count()
}

#[test]
fn representative_status_parses_with_the_expected_values() {
    let text = render(&representative());
    let parsed = parse_checked(&text);

    let families: HashSet<&str> = parsed.families.keys().map(String::as_str).collect();
    let expected: HashSet<&str> = [
        "inferd_up",
        "inferd_uptime_seconds",
        "inferd_workers_target",
        "inferd_workers",
        "inferd_queue_depth",
        "inferd_queue_capacity",
        "inferd_queued_bytes",
        "inferd_queued_bytes_budget",
        "inferd_connections",
        "inferd_connections_max",
        "inferd_unavailable",
        "inferd_last_roll_failed",
        "inferd_memory_soft_limit_bytes",
        "inferd_memory_hard_limit_bytes",
        "inferd_worker_resident_memory_bytes",
        "inferd_worker_proportional_memory_bytes",
        "inferd_worker_unique_memory_bytes",
        "inferd_worker_requests_served",
        "inferd_worker_age_seconds",
        "inferd_worker_memory_growth_bytes_per_second",
        "inferd_spare_workers_target",
        "inferd_spares_promoted_total",
        "inferd_requests_accepted_total",
        "inferd_requests_ok_total",
        "inferd_requests_failed_total",
        "inferd_requests_rejected_total",
        "inferd_requests_abandoned_total",
        "inferd_connections_refused_total",
        "inferd_request_retries_total",
        "inferd_poison_rejections_total",
        "inferd_workers_spawned_total",
        "inferd_recycles_total",
        "inferd_recycles_failed_total",
        "inferd_worker_exits_total",
    ]
    .into();
    assert_eq!(families, expected);

    let v = |family, labels: &[(&str, &str)]| value(&parsed, family, labels);
    assert_eq!(v("inferd_up", &[]), 1.0);
    assert_eq!(v("inferd_uptime_seconds", &[]), 3600.0);
    assert_eq!(v("inferd_workers_target", &[]), 2.0);
    assert_eq!(v("inferd_workers", &[("state", "ready")]), 1.0);
    assert_eq!(v("inferd_workers", &[("state", "busy")]), 1.0);
    assert_eq!(v("inferd_workers", &[("state", "starting")]), 0.0);
    assert_eq!(
        sample_count(&parsed, "inferd_workers"),
        WorkerStateKind::ALL.len()
    );
    assert_eq!(v("inferd_queue_depth", &[]), 3.0);
    assert_eq!(v("inferd_queue_capacity", &[]), 64.0);
    assert_eq!(v("inferd_unavailable", &[]), 1.0);
    assert_eq!(v("inferd_memory_soft_limit_bytes", &[]), f64::from(1 << 30));
    assert_eq!(
        v("inferd_memory_hard_limit_bytes", &[]),
        f64::from(2u32 << 30)
    );

    assert_eq!(v("inferd_spare_workers_target", &[]), 1.0);
    assert_eq!(v("inferd_spares_promoted_total", &[]), 3.0);
    let w1 = [("worker_id", "1"), ("pid", "101")];
    let w2 = [("worker_id", "2"), ("pid", "102")];
    assert_eq!(
        v("inferd_worker_memory_growth_bytes_per_second", &w1),
        1024.0
    );
    let rss = "inferd_worker_resident_memory_bytes";
    assert_eq!(v(rss, &w1), f64::from(300 << 20));
    assert_eq!(v(rss, &w2), f64::from(310 << 20));
    let pss = "inferd_worker_proportional_memory_bytes";
    assert_eq!(v(pss, &w1), f64::from(250 << 20));
    assert_eq!(sample_count(&parsed, pss), 1, "worker 2 has no PSS");
    assert_eq!(
        v("inferd_worker_unique_memory_bytes", &w1),
        f64::from(200 << 20)
    );
    assert_eq!(v("inferd_worker_requests_served", &w2), 7.0);
    assert_eq!(v("inferd_worker_age_seconds", &w1), 12.5);
    assert_eq!(v("inferd_worker_age_seconds", &w2), 0.25);

    let failed = "inferd_requests_failed_total";
    assert_eq!(v("inferd_requests_accepted_total", &[]), 100.0);
    assert_eq!(v("inferd_requests_ok_total", &[]), 90.0);
    assert_eq!(v(failed, &[("kind", "timeout")]), 3.0);
    assert_eq!(v(failed, &[("kind", "overloaded")]), 2.0);
    assert_eq!(v(failed, &[("kind", "internal")]), 1.0);
    assert_eq!(v("inferd_requests_abandoned_total", &[]), 5.0);
    assert_eq!(v("inferd_requests_rejected_total", &[]), 8.0);
    let refused = "inferd_connections_refused_total";
    assert_eq!(v(refused, &[("reason", "max_connections_per_uid")]), 6.0);
    assert_eq!(v(refused, &[("reason", "max_connections")]), 0.0);
    assert_eq!(sample_count(&parsed, refused), RefusalReason::ALL.len());
    assert_eq!(v("inferd_queued_bytes", &[]), 4096.0);
    assert_eq!(v("inferd_queued_bytes_budget", &[]), f64::from(1 << 26));
    assert_eq!(v("inferd_connections", &[]), 12.0);
    assert_eq!(v("inferd_connections_max", &[]), 4096.0);
    assert_eq!(v(failed, &[("kind", "bad_request")]), 0.0);
    assert_eq!(sample_count(&parsed, failed), ErrorKind::ALL.len());
    assert_eq!(v("inferd_request_retries_total", &[]), 2.0);
    assert_eq!(v("inferd_poison_rejections_total", &[]), 1.0);
    assert_eq!(v("inferd_workers_spawned_total", &[]), 7.0);
    assert_eq!(
        v("inferd_recycles_total", &[("trigger", "max_requests")]),
        2.0
    );
    assert_eq!(v("inferd_recycles_total", &[("trigger", "roll")]), 0.0);
    assert_eq!(
        v("inferd_recycles_failed_total", &[("trigger", "roll")]),
        1.0
    );
    assert_eq!(v("inferd_worker_exits_total", &[("end", "retired")]), 3.0);
    assert_eq!(
        v("inferd_worker_exits_total", &[("end", "oom_killed")]),
        1.0
    );
    assert_eq!(v("inferd_worker_exits_total", &[("end", "signaled")]), 0.0);

    // The module doc, which goes into the docs, lists every family.
    let doc: String = include_str!("mod.rs")
        .lines()
        .take_while(|l| l.starts_with("//!") || l.is_empty())
        .collect();
    for family in expected {
        assert!(
            doc.contains(&format!("`{family}`")),
            "{family} not documented"
        );
    }
}

#[test]
fn default_status_parses_with_zeros() {
    let parsed = parse_checked(&render(&PoolStatus::default()));
    assert_eq!(value(&parsed, "inferd_up", &[]), 1.0);
    assert_eq!(value(&parsed, "inferd_unavailable", &[]), 0.0);
    for state in WorkerStateKind::ALL {
        let labels = [("state", state.as_str())];
        assert_eq!(value(&parsed, "inferd_workers", &labels), 0.0);
    }
    for kind in ErrorKind::ALL {
        let labels = [("kind", kind.as_str())];
        assert_eq!(value(&parsed, "inferd_requests_failed_total", &labels), 0.0);
    }
    assert_eq!(
        sample_count(&parsed, "inferd_recycles_total"),
        RecycleTrigger::ALL.len()
    );
    assert_eq!(
        sample_count(&parsed, "inferd_worker_exits_total"),
        ExitKind::ALL.len()
    );
    assert_eq!(
        sample_count(&parsed, "inferd_worker_resident_memory_bytes"),
        0
    );
    for absent in [
        "inferd_worker_proportional_memory_bytes",
        "inferd_worker_unique_memory_bytes",
        "inferd_worker_memory_growth_bytes_per_second",
        "inferd_memory_soft_limit_bytes",
        "inferd_memory_hard_limit_bytes",
    ] {
        assert!(!parsed.families.contains_key(absent), "{absent} exported");
    }
}

#[test]
fn label_values_and_special_floats_are_escaped_as_the_format_says() {
    assert_eq!(
        Escaped(ODD_KIND).to_string(),
        r#"odd \"kind\" \\ with\nnewline"#
    );
    assert_eq!(Number::from(f64::NAN).to_string(), "NaN");
    assert_eq!(Number::from(f64::INFINITY).to_string(), "+Inf");
    assert_eq!(Number::from(f64::NEG_INFINITY).to_string(), "-Inf");
    assert_eq!(Number::from(1e-7).to_string(), "0.0000001");
    assert_eq!(Number::from(u64::MAX).to_string(), "18446744073709551615");
}
