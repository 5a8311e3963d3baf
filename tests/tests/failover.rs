//! A worker that dies loses no request: its in-flight request is retried on
//! another worker, the pool replaces it, and an input that kills two workers
//! is quarantined instead of taking the whole pool down.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_tests::{
    pid_alive, ready_count, sample_texts, wait_pids_gone, worker_pids, BackgroundLoad, Client,
    ClientError, Daemon, DaemonConfig, Expected, PoolStatus, RequestError, Signal,
};
use inferd_tests::{ErrorKind, ExitKind, WorkerStateKind};

const REQUESTS: usize = 200;
const CLIENTS: usize = 6;
const RECOVERY: Duration = Duration::from_secs(30);

/// Outcome of a fixed number of requests spread over several clients.
struct Run {
    answered: usize,
    errors: Vec<String>,
}

/// Sends `total` requests from `clients` concurrent connections; request `i`
/// embeds text `i` (and every third one also text `i + 1`, as a batch).
/// `answered` counts correct answers as they come.
async fn run_requests(
    socket: PathBuf,
    expected: Expected,
    total: usize,
    clients: usize,
    answered: Arc<AtomicUsize>,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|n| {
            let (socket, expected, next, answered) = (
                socket.clone(),
                expected.clone(),
                next.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut client = Client::connect(&socket)
                    .await
                    .unwrap_or_else(|e| panic!("client {n}: {e}"));
                let texts = expected.texts();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        return errors;
                    }
                    let mut batch = vec![texts[i % texts.len()].clone()];
                    if i % 3 == 0 {
                        batch.push(texts[(i + 1) % texts.len()].clone());
                    }
                    match client.embed(batch.clone(), None).await {
                        Ok(result) => match expected.check(&batch, &result) {
                            Ok(()) => {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => errors.push(format!("request {i}: wrong answer: {e}")),
                        },
                        Err(e) => {
                            errors.push(format!("request {i}: {e}"));
                            if !matches!(e, ClientError::Request(_)) {
                                client = Client::connect(&socket)
                                    .await
                                    .unwrap_or_else(|e| panic!("client {n} reconnect: {e}"));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.expect("client task"));
    }
    Run {
        answered: answered.load(Ordering::SeqCst),
        errors,
    }
}

fn signaled(status: &PoolStatus) -> u64 {
    status
        .counters
        .worker_exits
        .get(&ExitKind::Signaled)
        .copied()
        .unwrap_or(0)
}

/// Polls until the pool has 2 ready workers, `victim` is not among them,
/// and the daemon counted at least `exits` signaled worker exits; checks
/// that exactly one of the old pids was replaced.
async fn assert_replaced(daemon: &Daemon, old: &[u32], victim: u32, exits: u64) -> PoolStatus {
    let status = daemon
        .wait_for(
            |s| ready_count(s) == 2 && !worker_pids(s).contains(&victim) && signaled(s) >= exits,
            RECOVERY,
        )
        .await;
    let new: Vec<u32> = worker_pids(&status)
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    assert_eq!(
        new.len(),
        1,
        "one new worker replaces the dead one: {status:?}"
    );
    wait_pids_gone(&[victim], Duration::from_secs(5))
        .await
        .expect("the killed worker is gone");
    // The classified end is in the log, on a line naming the worker.
    let log = daemon.log();
    let mentions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&victim.to_string()))
        .collect();
    assert!(
        mentions.iter().any(|l| l.to_lowercase().contains("sig")),
        "no log line names worker {victim} with its signal:\n{}",
        mentions.join("\n")
    );
    status
}

async fn kill_worker_and_check(busy: bool) {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let before = daemon.wait_for(|s| ready_count(s) == 2, RECOVERY).await;
    let old = worker_pids(&before);
    let answered = Arc::new(AtomicUsize::new(0));

    let victim = if busy {
        let load = tokio::spawn(run_requests(
            daemon.socket_path().to_path_buf(),
            expected.clone(),
            REQUESTS,
            CLIENTS,
            answered.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered.load(Ordering::SeqCst) < 50 {
            assert!(
                Instant::now() < deadline,
                "50 answers did not come within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let status = daemon.status().await;
        let victim = status
            .workers
            .iter()
            .find(|w| w.state == WorkerStateKind::Busy)
            .or_else(|| status.workers.first())
            .expect("a worker to kill")
            .pid;
        daemon.signal_worker(victim, Signal::SIGKILL);
        let run = tokio::time::timeout(Duration::from_secs(120), load)
            .await
            .expect("all requests answered within 120 s")
            .expect("load task");
        check_run(&run);
        victim
    } else {
        let victim = old[0];
        daemon.signal_worker(victim, Signal::SIGKILL);
        let run = tokio::time::timeout(
            Duration::from_secs(120),
            run_requests(
                daemon.socket_path().to_path_buf(),
                expected.clone(),
                REQUESTS,
                CLIENTS,
                answered.clone(),
            ),
        )
        .await
        .expect("all requests answered within 120 s");
        check_run(&run);
        victim
    };

    let status = assert_replaced(&daemon, &old, victim, 1).await;
    println!(
        "killed {victim} ({}): retries {}, exits {:?}",
        if busy { "busy" } else { "idle" },
        status.counters.retries,
        status.counters.worker_exits
    );
    assert!(!pid_alive(victim));
}

fn check_run(run: &Run) {
    assert!(
        run.errors.is_empty(),
        "{} of {REQUESTS} requests failed:\n{}",
        run.errors.len(),
        run.errors.join("\n"),
    );
    assert_eq!(run.answered, REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_under_load_loses_no_request() {
    kill_worker_and_check(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_while_idle_is_replaced() {
    kill_worker_and_check(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_input_is_quarantined_after_two_deaths() {
    const MARKER: &str = "__crash__";
    let daemon = Daemon::start(DaemonConfig::new().crash_marker(MARKER)).await;
    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let old = worker_pids(&daemon.status().await);
    let load = BackgroundLoad::start(daemon.socket_path(), 3, &expected);
    load.wait_progress(5, Duration::from_secs(60)).await;

    let mut client = daemon.client().await;
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        client.embed(vec!["an innocent text".into(), MARKER.into()], None),
    )
    .await
    .expect("the poison request is answered")
    .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Request(RequestError::WorkerLost { deaths: 2 })
        ),
        "{err:?}"
    );

    load.wait_progress(5, Duration::from_secs(60)).await;
    let report = load.stop().await;
    assert!(
        report.errors.is_empty(),
        "other clients saw errors:\n{}",
        report.errors.join("\n"),
    );

    let status = daemon
        .wait_for(|s| ready_count(s) == 2 && signaled(s) >= 2, RECOVERY)
        .await;
    assert_eq!(status.counters.poison_rejections, 1, "{status:?}");
    assert!(status.counters.retries >= 1, "{status:?}");
    assert_eq!(
        status
            .counters
            .requests_failed
            .get(&ErrorKind::WorkerLost)
            .copied(),
        Some(1),
        "{status:?}"
    );
    // The first death is an original worker; the retry went to the other
    // one or to the replacement, so at least one process is new.
    let new = worker_pids(&status)
        .into_iter()
        .filter(|p| !old.contains(p))
        .count();
    assert!(new >= 1, "{status:?}");

    // The pool still serves, on the same connection.
    client
        .embed(vec!["after the storm".into()], None)
        .await
        .expect("served after the poison");
}
