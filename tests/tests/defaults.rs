//! The daemon as `make run` starts it, with no memory setting written:
//! automatic limits are derived from the first worker and applied to its
//! cgroup, a leaking worker is recycled with no failed request, with the
//! default spare a worker killed under load never leaves fewer than
//! `workers` serving, and SIGHUP derives the limits again (a fixed value
//! winning).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inferd_proto::RollState;
use inferd_supervisor::config::{LimitSetting, SpareSetting};
use inferd_tests::{
    exit_count, sample_texts, serving_count, BackgroundLoad, Client, Daemon, DaemonConfig,
    ExitKind, Expected, PoolStatus, RecycleTrigger, Signal, WorkerStateKind,
};

const MIB: u64 = 1 << 20;

/// The fixture's config with the daemon's own default spare count (the
/// fixture turns spares off for the other tests).
fn defaults() -> DaemonConfig {
    DaemonConfig::new().with(|c| c.spare_workers = SpareSetting::Auto)
}

/// The smallest worker RSS in `status`: a fresh worker's baseline.
fn lowest_rss(status: &PoolStatus) -> u64 {
    status
        .workers
        .iter()
        .filter_map(|w| w.rss_bytes)
        .min()
        .expect("a worker's memory was read")
}

/// The kernel's limit on a worker's cgroup leaf.
fn leaf_limit(dir: &str) -> Option<u64> {
    ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|file| std::fs::read_to_string(format!("{dir}/{file}")).ok())
        .and_then(|text| text.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn defaults_derive_limits_and_recycle_a_leaking_worker_without_a_failed_request() {
    let daemon = Daemon::start(defaults().leak_per_request(512 * 1024)).await;
    let status = daemon
        .wait_for(|s| s.hard_limit_bytes.is_some(), Duration::from_secs(30))
        .await;
    println!("limits: {}", status.limits_origin);
    assert!(
        status.limits_origin.starts_with("auto: baseline"),
        "{}",
        status.limits_origin
    );
    let (soft, hard) = (
        status.soft_limit_bytes.unwrap(),
        status.hard_limit_bytes.unwrap(),
    );
    let baseline = lowest_rss(&status);
    assert!(
        baseline < soft && soft < hard,
        "{baseline} < {soft} < {hard}"
    );
    assert!(
        hard - baseline >= 2 * 256 * MIB,
        "room above the baseline: {status:?}"
    );
    match status.workers.iter().find_map(|w| w.cgroup.clone()) {
        Some(dir) => {
            // v1 rounds the limit down to whole pages.
            let limit = leaf_limit(&dir).expect("the leaf's limit is readable");
            assert!(
                limit <= hard && hard - limit < 4096,
                "{dir}: limit {limit}, hard limit {hard}"
            );
        }
        None => inferd_tests::skipped_without_cgroups(
            "defaults_derive_limits_and_recycle_a_leaking_worker_without_a_failed_request (cgroup part)",
            &format!("no per-worker cgroup on this machine ({})", status.cgroups),
        ),
    }

    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let load = BackgroundLoad::start(daemon.socket_path(), 4, &expected);
    let recycled = |s: &PoolStatus| {
        [RecycleTrigger::SoftLimit, RecycleTrigger::LeakRate]
            .iter()
            .filter_map(|t| s.counters.recycles.get(t))
            .sum::<u64>()
    };
    let status = daemon
        .wait_for(
            |s| recycled(s) >= 2 && s.recycles.is_empty(),
            Duration::from_secs(240),
        )
        .await;
    let report = load.stop().await;
    println!(
        "{} requests ok; recycles {:?}; exits {:?}",
        report.ok, status.counters.recycles, status.counters.worker_exits
    );
    assert!(
        report.errors.is_empty(),
        "failed requests: {:?}",
        report.errors
    );
    assert_eq!(
        exit_count(&status, ExitKind::OomKilled)
            + exit_count(&status, ExitKind::LikelyOomKilled)
            + exit_count(&status, ExitKind::KilledBySupervisor),
        0,
        "recycled, never killed: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_default_spare_a_killed_worker_leaves_no_gap() {
    let daemon = Daemon::start(defaults()).await;
    let status = daemon
        .wait_for(
            |s| !s.limits_origin.contains("waiting"),
            Duration::from_secs(30),
        )
        .await;
    if status.target_spares == 0 {
        inferd_tests::skipped(
            "with_the_default_spare_a_killed_worker_leaves_no_gap",
            &format!(
                "no spare by default on this machine: {}",
                status.limits_origin
            ),
        );
        return;
    }
    let spare_loaded = |s: &PoolStatus| s.workers.iter().any(|w| w.state == WorkerStateKind::Spare);
    daemon.wait_for(spare_loaded, Duration::from_secs(30)).await;
    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let load = BackgroundLoad::start(daemon.socket_path(), 2, &expected);
    load.wait_progress(20, Duration::from_secs(30)).await;

    // Serving workers every 10 ms, from before the kill until a new spare
    // is loaded.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (socket, stop) = (daemon.socket_path().to_path_buf(), stop.clone());
        tokio::spawn(async move {
            let mut client = Client::connect(&socket).await.expect("sampler connects");
            let mut samples = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                samples.push(client.status().await.expect("status"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = daemon.status().await;
    let victim = status
        .workers
        .iter()
        .find(|w| w.state.is_serving())
        .expect("a serving worker");
    daemon.signal_worker(victim.pid, Signal::SIGKILL);
    let victim = victim.pid;
    daemon
        .wait_for(
            |s| !s.workers.iter().any(|w| w.pid == victim) && spare_loaded(s),
            Duration::from_secs(30),
        )
        .await;
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.expect("sampler");
    let report = load.stop().await;
    let fewest = samples.iter().map(serving_count).min().unwrap_or(0);
    let status = daemon.status().await;
    println!(
        "{} samples, fewest serving {fewest}, spares promoted {}",
        samples.len(),
        status.counters.spares_promoted
    );
    assert!(samples.len() >= 20, "{} samples", samples.len());
    assert!(fewest >= 2, "capacity dipped to {fewest} serving workers");
    assert_eq!(status.counters.spares_promoted, 1, "{status:?}");
    assert!(
        report.errors.is_empty(),
        "failed requests: {:?}",
        report.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_derives_the_limits_again_and_a_fixed_value_wins() {
    let daemon = Daemon::start(defaults()).await;
    let first = daemon
        .wait_for(|s| s.hard_limit_bytes.is_some(), Duration::from_secs(30))
        .await;
    assert!(
        first.limits_origin.contains("for 2 workers"),
        "{}",
        first.limits_origin
    );
    // Three workers, and a fixed hard limit: the soft limit and the spare
    // stay automatic around it.
    let fixed = 900 * MIB;
    let reloaded = defaults().workers(3).with(|c| {
        c.hard_limit = LimitSetting::Fixed(inferd_tests::ByteSize::b(fixed));
    });
    std::fs::write(daemon.config_path(), reloaded.to_toml(daemon.socket_path()))
        .expect("write the new config");
    daemon.signal(Signal::SIGHUP);
    let status = daemon
        .wait_for(
            |s| {
                s.limits_origin.contains("for 3 workers")
                    && s.roll.as_ref().is_some_and(|r| r.state == RollState::Done)
                    && s.workers.len() as u32 == 3 + s.target_spares
            },
            Duration::from_secs(120),
        )
        .await;
    println!("after the reload: {}", status.limits_origin);
    assert_eq!(status.hard_limit_bytes, Some(fixed));
    assert!(
        status
            .limits_origin
            .contains("hard_limit from the configuration"),
        "{}",
        status.limits_origin
    );
    let baseline = lowest_rss(&status);
    let soft = status.soft_limit_bytes.unwrap();
    assert!(
        soft > baseline && soft < fixed,
        "the automatic soft limit sits between the baseline {baseline} and {fixed}: {soft}"
    );
    for dir in status.workers.iter().filter_map(|w| w.cgroup.as_deref()) {
        let limit = leaf_limit(dir).expect("the leaf's limit is readable");
        assert!(limit <= fixed && fixed - limit < 4096, "{dir}: {limit}");
    }
}
