//! Memory watch, recycling and exit attribution against the real daemon:
//! leaking workers are recycled gracefully under load, the kernel OOM killer
//! (in a per-worker cgroup) is recognised from the cgroup counter, the
//! supervisor's own kills are never called OOM, hung workers are killed at
//! `request_timeout`, `max_requests` recycles one worker at a time, and a
//! missing model leaves the daemon up, saying why, without a fork bomb.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inferd_supervisor::config::LimitSetting;
use inferd_tests::{
    exit_count, ready_count, sample_texts, serving_count, BackgroundLoad, Client, ClientError,
    Daemon, DaemonConfig, Expected, PoolStatus, RequestError, POLL_INTERVAL,
};
use inferd_tests::{ByteSize, CgroupMode};
use inferd_tests::{ErrorKind, ExitKind, RecycleTrigger, WorkerStateKind};

const MIB: u64 = 1 << 20;
const RECOVERY: Duration = Duration::from_secs(60);

fn recycles(status: &PoolStatus, trigger: RecycleTrigger) -> u64 {
    status.counters.recycles.get(&trigger).copied().unwrap_or(0)
}

/// Samples status every poll interval until stopped; keeps every sample.
struct Monitor {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<PoolStatus>>,
}

impl Monitor {
    fn start(daemon: &Daemon) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = daemon.socket_path().to_path_buf();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut client = Client::connect(&socket).await.expect("monitor connects");
            while !flag.load(Ordering::SeqCst) {
                samples.push(client.status().await.expect("monitor status"));
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            samples
        });
        Monitor { stop, task }
    }

    async fn stop(self) -> Vec<PoolStatus> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("monitor task")
    }
}

/// Sends `total` requests over `clients` connections; returns the errors.
async fn run_requests(
    daemon: &Daemon,
    expected: &Expected,
    total: usize,
    clients: usize,
) -> Vec<String> {
    let next = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for n in 0..clients {
        let (socket, expected, next) = (
            daemon.socket_path().to_path_buf(),
            expected.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut client = Client::connect(&socket).await.expect("client connects");
            loop {
                let i = {
                    let mut next = next.lock().expect("counter lock");
                    *next += 1;
                    *next - 1
                };
                if i >= total {
                    return errors;
                }
                let batch = vec![expected.texts()[(i + n) % expected.texts().len()].clone()];
                match client.embed(batch.clone(), None).await {
                    Ok(result) => {
                        if let Err(e) = expected.check(&batch, &result) {
                            errors.push(format!("request {i}: wrong answer: {e}"));
                        }
                    }
                    Err(e) => {
                        errors.push(format!("request {i}: {e}"));
                        client = Client::connect(&socket).await.expect("client reconnects");
                    }
                }
            }
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("client task"));
    }
    errors
}

/// Sends `total` requests from 4 clients while sampling status; asserts
/// every answer was correct and returns the samples.
async fn run_monitored(daemon: &Daemon, total: usize) -> Vec<PoolStatus> {
    let expected = Expected::compute(daemon, &sample_texts()).await;
    let monitor = Monitor::start(daemon);
    let errors = tokio::time::timeout(
        Duration::from_secs(600),
        run_requests(daemon, &expected, total, 4),
    )
    .await
    .unwrap_or_else(|_| panic!("{total} requests answered within 600 s"));
    let samples = monitor.stop().await;
    assert!(
        errors.is_empty(),
        "{} failed requests: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    samples
}

/// Sends requests one by one, each of which must succeed, until a worker
/// exit of `kind` is counted (bounded); returns how many were answered and
/// the status that showed the exit.
async fn request_until_exit(daemon: &Daemon, kind: ExitKind) -> (usize, PoolStatus) {
    let mut client = daemon.client().await;
    let texts = sample_texts();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answered = 0;
    loop {
        let result = client
            .embed(vec![texts[answered % texts.len()].clone()], None)
            .await;
        assert!(result.is_ok(), "request {answered} failed: {result:?}");
        answered += 1;
        let status = daemon.status().await;
        if exit_count(&status, kind) >= 1 {
            return (answered, status);
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} exit after {answered} requests: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaking_workers_are_recycled_without_a_failed_request() {
    // A loaded worker is ~135-150 MiB; the soft limit sits ~100 MiB above.
    // The hard limit leaves room for the leak that continues while the
    // replacement loads (recycles are one at a time).
    let soft = 250 * MIB;
    let hard = 700 * MIB;
    let daemon = Daemon::start(
        DaemonConfig::new()
            .with(|c| {
                c.soft_limit = LimitSetting::Fixed(ByteSize::mib(250));
                c.hard_limit = LimitSetting::Fixed(ByteSize::mib(700));
                c.min_lifetime_ms = 500;
            })
            .leak_per_request(2 * MIB),
    )
    .await;
    let samples = run_monitored(&daemon, 2000).await;

    let status = daemon.status().await;
    let max_rss = samples
        .iter()
        .flat_map(|s| s.workers.iter().filter_map(|w| w.rss_bytes))
        .max()
        .unwrap_or(0);
    println!(
        "recycles {:?}, exits {:?}, {} samples, highest RSS {} MiB",
        status.counters.recycles,
        status.counters.worker_exits,
        samples.len(),
        max_rss / MIB
    );
    assert!(
        recycles(&status, RecycleTrigger::SoftLimit) >= 3,
        "several soft-limit recycles: {status:?}"
    );
    assert_eq!(
        exit_count(&status, ExitKind::KilledBySupervisor),
        0,
        "no hard kills: {status:?}"
    );
    assert_eq!(
        exit_count(&status, ExitKind::OomKilled) + exit_count(&status, ExitKind::LikelyOomKilled),
        0
    );
    assert!(
        max_rss > soft,
        "the leak really went over the soft limit: {max_rss}"
    );
    assert!(
        max_rss < hard,
        "no worker ever above the hard limit: {max_rss}"
    );
    let min_serving = samples.iter().map(serving_count).min().unwrap_or(0);
    assert!(
        min_serving >= 2,
        "capacity dropped to {min_serving} serving workers"
    );
    assert!(
        daemon.log().contains("soft_limit"),
        "recycles are logged with their reason"
    );
}

#[tokio::test]
async fn kernel_oom_kill_in_a_worker_cgroup_is_attributed_and_retried() {
    // One worker: the request in flight at the OOM kill is retried on the
    // fresh replacement (with two equally leaky workers the retry could
    // land on one about to die too).
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .with(|c| {
                // The kill paths, not recycling: no soft limit.
                c.soft_limit = LimitSetting::Off;
                c.hard_limit = LimitSetting::Fixed(ByteSize::mib(320));
            })
            .leak_per_request(8 * MIB),
    )
    .await;
    let status = daemon.status().await;
    if !status.workers.iter().any(|w| w.cgroup.is_some()) {
        inferd_tests::skipped_without_cgroups(
            "kernel_oom_kill_in_a_worker_cgroup_is_attributed_and_retried",
            &format!("no per-worker cgroup on this machine ({})", status.cgroups),
        );
        return;
    }
    let old_pid = status.workers[0].pid;
    let old_cgroup = status.workers[0]
        .cgroup
        .clone()
        .expect("worker has a cgroup");
    assert!(std::path::Path::new(&old_cgroup).is_dir(), "{old_cgroup}");
    let (answered, _) = request_until_exit(&daemon, ExitKind::OomKilled).await;
    let status = daemon
        .wait_for(
            |s| ready_count(s) == 1 && s.workers.iter().all(|w| w.pid != old_pid),
            RECOVERY,
        )
        .await;
    assert_eq!(
        exit_count(&status, ExitKind::KilledBySupervisor),
        0,
        "{status:?}"
    );
    assert!(
        status.counters.retries >= 1,
        "the in-flight request was retried: {status:?}"
    );
    let exit = status
        .recent_exits
        .iter()
        .find(|e| e.pid == old_pid)
        .expect("exit recorded");
    assert_eq!(exit.kind, ExitKind::OomKilled, "{exit:?}");
    assert!(
        daemon.log().contains("OOM-killed by the kernel"),
        "classified in the log"
    );
    println!("OOM-killed after {answered} requests: {}", exit.description);
}

#[tokio::test]
async fn supervisor_hard_limit_kill_is_never_called_oom() {
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .with(|c| {
                c.cgroups = CgroupMode::Off;
                c.soft_limit = LimitSetting::Off;
                c.hard_limit = LimitSetting::Fixed(ByteSize::mib(260));
            })
            .leak_per_request(4 * MIB),
    )
    .await;
    let (_, status) = request_until_exit(&daemon, ExitKind::KilledBySupervisor).await;
    assert_eq!(status.cgroups, "off (configured)");
    assert_eq!(
        exit_count(&status, ExitKind::OomKilled) + exit_count(&status, ExitKind::LikelyOomKilled),
        0
    );
    let exit = status.recent_exits.last().expect("exit recorded");
    assert!(exit.description.contains("hard_limit"), "{exit:?}");
    daemon.wait_for(|s| ready_count(s) == 1, RECOVERY).await;
    let log = daemon.log();
    assert!(log.contains("killed by supervisor (hard_limit)"), "{log}");
    assert!(!log.contains("OOM-killed"), "never guessed as OOM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_worker_is_killed_at_request_timeout() {
    let daemon = Daemon::start(
        DaemonConfig::new()
            .request_timeout(Duration::from_secs(2))
            .hang_marker("__hang__"),
    )
    .await;
    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let load = BackgroundLoad::start(daemon.socket_path(), 2, &expected);
    let mut client = daemon.client().await;
    let started = Instant::now();
    let err = client
        .embed(vec!["__hang__".into()], None)
        .await
        .expect_err("a hung request cannot succeed");
    assert!(
        matches!(err, ClientError::Request(RequestError::Timeout { .. })),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered near the timeout"
    );
    load.wait_progress(10, RECOVERY).await;
    let report = load.stop().await;
    assert!(
        report.errors.is_empty(),
        "other clients unaffected: {:?}",
        report.errors
    );
    let status = daemon
        .wait_for(
            |s| ready_count(s) == 2 && exit_count(s, ExitKind::KilledBySupervisor) == 1,
            RECOVERY,
        )
        .await;
    assert!(
        status
            .recent_exits
            .iter()
            .any(|e| e.description.contains("request_timeout")),
        "{:?}",
        status.recent_exits
    );
    assert_eq!(
        status.counters.requests_failed.get(&ErrorKind::Timeout),
        Some(&1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_requests_recycles_one_worker_at_a_time() {
    let daemon = Daemon::start(DaemonConfig::new().workers(4).with(|c| {
        c.max_requests = Some(40);
        c.min_lifetime_ms = 200;
    }))
    .await;
    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let monitor = Monitor::start(&daemon);
    let errors = tokio::time::timeout(
        Duration::from_secs(600),
        run_requests(&daemon, &expected, 500, 4),
    )
    .await
    .expect("500 requests answered within 600 s");
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    // Every first-generation worker served ~125 requests, over its
    // max_requests of 40 whatever its stagger. Recycles run one at a time and
    // each waits for a replacement to load, so how many finish while the
    // load runs depends on how fast the engine is; the rest go on after it
    // (an idle worker over its limit is recycled too). Watch until all four
    // are done.
    let status = daemon
        .wait_for(
            |s| ready_count(s) == 4 && recycles(s, RecycleTrigger::MaxRequests) >= 4,
            RECOVERY,
        )
        .await;
    let samples = monitor.stop().await;
    assert_eq!(
        exit_count(&status, ExitKind::Retired),
        recycles(&status, RecycleTrigger::MaxRequests).min(exit_count(&status, ExitKind::Retired))
    );
    for sample in &samples {
        let recycling = sample
            .workers
            .iter()
            .filter(|w| {
                w.replaces.is_some()
                    || w.state == WorkerStateKind::Draining
                    || w.state == WorkerStateKind::Stopping
            })
            .count();
        // One replacement plus the worker it replaces can be seen at once,
        // but never parts of two recycles.
        let replacements = sample
            .workers
            .iter()
            .filter(|w| w.replaces.is_some())
            .count();
        let leaving = recycling - replacements;
        assert!(
            replacements <= 1 && leaving <= 1,
            "two recycles at once: {sample:?}"
        );
        assert!(serving_count(sample) >= 4, "capacity below 4: {sample:?}");
    }
}

#[tokio::test]
async fn missing_model_keeps_the_daemon_up_and_explains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-model.onnx");
    let daemon = Daemon::spawn(DaemonConfig::with_model((
        missing.clone(),
        dir.path().join("tokenizer.json"),
    )));
    let status = daemon
        .wait_for(|s| s.unavailable_reason.is_some(), RECOVERY)
        .await;
    let reason = status.unavailable_reason.clone().unwrap_or_default();
    assert!(reason.contains("no-such-model.onnx"), "{reason}");

    let mut client = daemon.client().await;
    match client.embed(vec!["hello".into()], None).await {
        Err(ClientError::Request(RequestError::Unavailable { reason })) => {
            assert!(reason.contains("no-such-model.onnx"), "{reason}")
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    // Over a 10-second window the spawn rate stays bounded (exponential
    // backoff), and the daemon keeps answering.
    let window = Instant::now();
    let first = daemon.status().await.counters.workers_spawned;
    while window.elapsed() < Duration::from_secs(10) {
        let status = daemon.status().await;
        assert!(status.unavailable_reason.is_some());
        assert!(
            status.counters.workers_spawned - first <= 8,
            "{} spawns in {:?}",
            status.counters.workers_spawned - first,
            window.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        daemon.exit_status().is_none(),
        "the daemon is still running"
    );
    let text = inferctl_status(&daemon);
    assert!(text.contains("UNAVAILABLE"), "{text}");
}

fn inferctl_status(daemon: &Daemon) -> String {
    let out = daemon
        .inferctl()
        .arg("status")
        .output()
        .expect("inferctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_deadlines_hold_for_running_and_queued_requests() {
    // One worker, hung on purpose: the running request and the one queued
    // behind it are both answered `timeout` at their own deadlines, long
    // before request_timeout.
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .request_timeout(Duration::from_secs(30))
            .hang_marker("__hang__"),
    )
    .await;
    let socket = daemon.socket_path().to_path_buf();
    let running = tokio::spawn(async move {
        let mut client = Client::connect(&socket).await.expect("connect");
        let started = Instant::now();
        let result = client
            .embed(vec!["__hang__".into()], Some(Duration::from_millis(800)))
            .await;
        (result, started.elapsed())
    });
    daemon
        .wait_for(
            |s| s.workers.iter().any(|w| w.state == WorkerStateKind::Busy),
            RECOVERY,
        )
        .await;
    let mut client = daemon.client().await;
    let started = Instant::now();
    let queued = client
        .embed(
            vec!["queued behind a hung worker".into()],
            Some(Duration::from_millis(500)),
        )
        .await;
    let queued_elapsed = started.elapsed();
    let (running, running_elapsed) = running.await.expect("running request task");
    for (what, result, elapsed) in [
        ("running", running, running_elapsed),
        ("queued", queued, queued_elapsed),
    ] {
        assert!(
            matches!(
                result,
                Err(ClientError::Request(RequestError::Timeout { .. }))
            ),
            "{what}: {result:?}"
        );
        assert!(
            elapsed < Duration::from_secs(10),
            "{what} answered after {elapsed:?}"
        );
    }
    let status = daemon.status().await;
    assert_eq!(
        status.counters.requests_failed.get(&ErrorKind::Timeout),
        Some(&2),
        "{status:?}"
    );
    assert_eq!(
        exit_count(&status, ExitKind::KilledBySupervisor),
        0,
        "the worker is not killed for a client deadline"
    );
}

#[tokio::test]
async fn a_large_request_is_followed_by_a_trim_and_a_short_one_is_not() {
    let long = "A man is eating food while the band plays on the corner of the street. ".repeat(16);
    for trim in [true, false] {
        let daemon = Daemon::start(
            DaemonConfig::new()
                .workers(1)
                .rust_log("info,inferd_worker=debug")
                .with(|c| c.trim_memory = trim),
        )
        .await;
        let mut client = daemon.client().await;
        client
            .embed(vec!["short".into()], None)
            .await
            .expect("short request");
        // 8 texts of ~250 tokens: over the 1024 tokens that call for a trim.
        let result = client
            .embed(vec![long.clone(); 8], None)
            .await
            .expect("large request");
        assert!(result.token_counts.iter().sum::<u32>() >= 1024);
        // The worker trims right after sending an answer and before it reads
        // the next command: once "after" is answered, its line is written.
        client
            .embed(vec!["after".into()], None)
            .await
            .expect("after");
        let trims = daemon
            .log()
            .matches("freed memory returned to the system")
            .count();
        assert_eq!(
            trims,
            usize::from(trim),
            "trim_memory = {trim}: one trim, after the large request only"
        );
    }
}
