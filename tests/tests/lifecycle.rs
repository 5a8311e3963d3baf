//! Starting and stopping: SIGTERM drains, SIGKILL of the supervisor takes
//! the workers with it, and the socket path is guarded against a second
//! daemon but not against a stale file.

use std::time::Duration;

use inferd_tests::WorkerStateKind;
use inferd_tests::{
    ready_count, reference, wait_pids_gone, worker_pids, Client, ClientError, Daemon, DaemonConfig,
    RequestError, Signal,
};

/// Clients with a heavy request each, so that at the signal two are running
/// on the workers and the rest wait in the queue.
const CLIENTS: usize = 5;
/// Texts per heavy request (the longest reference text, truncated to 256
/// tokens): long enough that nothing finishes while the test looks.
const HEAVY_TEXTS: usize = 24;

fn busy_count(status: &inferd_tests::PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateKind::Busy)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_requests_then_exits_0() {
    let daemon = Daemon::start(DaemonConfig::new().drain_timeout(Duration::from_secs(60))).await;
    let workers = worker_pids(&daemon.status().await);
    let long_text = reference()
        .texts
        .iter()
        .max_by_key(|t| t.len())
        .expect("reference texts")
        .clone();

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let socket = daemon.socket_path().to_path_buf();
            let heavy = vec![long_text.clone(); HEAVY_TEXTS];
            tokio::spawn(async move {
                let mut client = Client::connect(&socket)
                    .await
                    .unwrap_or_else(|e| panic!("client {n}: {e}"));
                let first = client.embed(heavy, None).await;
                // Sent after the first answer, so after the signal.
                let second = client.embed(vec!["one more".into()], None).await;
                (first, second)
            })
        })
        .collect();

    // All heavy requests accepted: two running, the rest queued.
    daemon
        .wait_for(
            |s| busy_count(s) + s.queue_depth as usize == CLIENTS,
            Duration::from_secs(30),
        )
        .await;
    daemon.signal(Signal::SIGTERM);

    let mut shutting_down = 0;
    for task in tasks {
        let (first, second) = tokio::time::timeout(Duration::from_secs(90), task)
            .await
            .expect("every client is answered within 90 s")
            .expect("client task");
        let result = first.unwrap_or_else(|e| panic!("a request in flight at SIGTERM failed: {e}"));
        assert_eq!(result.embeddings.len(), HEAVY_TEXTS);
        match second {
            Err(ClientError::Request(RequestError::ShuttingDown)) => shutting_down += 1,
            Err(ClientError::Closed) => {}
            other => panic!("a request sent after SIGTERM got {other:?}"),
        }
    }
    println!("{shutting_down} of {CLIENTS} late requests answered ShuttingDown, the rest closed");

    // New connections are refused or told the daemon is going away.
    match Client::connect(daemon.socket_path()).await {
        Err(ClientError::Connect { .. } | ClientError::Handshake(_)) => {}
        Err(other) => panic!("unexpected error connecting during shutdown: {other:?}"),
        Ok(mut client) => match client.embed(vec!["late".into()], None).await {
            Err(ClientError::Request(RequestError::ShuttingDown) | ClientError::Closed) => {}
            other => panic!("a new request during shutdown got {other:?}"),
        },
    }

    let status = daemon
        .wait_exit(Duration::from_secs(90))
        .await
        .unwrap_or_else(|| panic!("inferd did not exit after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        !daemon.socket_path().exists(),
        "the socket file is removed on shutdown"
    );
    if let Err(alive) = wait_pids_gone(&workers, Duration::from_secs(5)).await {
        panic!("workers {alive:?} outlived the daemon");
    }
}

#[tokio::test]
async fn a_second_sigterm_cuts_the_drain_short() {
    // The drain would wait up to two minutes for a request that never ends.
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .request_timeout(Duration::from_secs(120))
            .default_deadline(Duration::from_secs(120))
            .drain_timeout(Duration::from_secs(120))
            .hang_marker("__hang__"),
    )
    .await;
    let status = daemon.status().await;
    assert_eq!(
        status.chaos.as_deref(),
        Some("hang_marker \"__hang__\""),
        "status shows the test-only options"
    );
    let log = daemon.log();
    assert!(
        log.matches("test-only [chaos] options are on").count() >= 2,
        "the supervisor and its worker warn about [chaos]:\n{log}"
    );
    let workers = worker_pids(&status);
    let socket = daemon.socket_path().to_path_buf();
    let hung = tokio::spawn(async move {
        let mut client = Client::connect(&socket).await.expect("connect");
        client.embed(vec!["__hang__".into()], None).await
    });
    daemon
        .wait_for(|s| busy_count(s) == 1, Duration::from_secs(30))
        .await;

    daemon.signal(Signal::SIGTERM);
    daemon
        .wait_for_log("draining", Duration::from_secs(10))
        .await;
    assert!(
        daemon.exit_status().is_none(),
        "the first SIGTERM drains: the hung request keeps the daemon up"
    );
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("a second SIGTERM did not end the drain within 20 s"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let answer = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .expect("the hung request is answered")
        .expect("client task");
    match answer {
        Err(ClientError::Request(RequestError::ShuttingDown)) => {}
        other => panic!("the request cut off by the second SIGTERM got {other:?}"),
    }
    if let Err(alive) = wait_pids_gone(&workers, Duration::from_secs(5)).await {
        panic!("workers {alive:?} outlived the daemon");
    }
}

async fn idle_signal_exits_cleanly(signal: Signal) {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let workers = worker_pids(&daemon.status().await);
    daemon.signal(signal);
    let status = daemon
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("inferd did not exit after {signal}"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(!daemon.socket_path().exists(), "the socket file is removed");
    if let Err(alive) = wait_pids_gone(&workers, Duration::from_secs(5)).await {
        panic!("workers {alive:?} outlived the daemon");
    }
}

#[tokio::test]
async fn sigterm_when_idle_exits_0() {
    idle_signal_exits_cleanly(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_when_idle_exits_0() {
    idle_signal_exits_cleanly(Signal::SIGINT).await;
}

#[tokio::test]
async fn sigkill_of_the_supervisor_takes_the_workers_down() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let workers = worker_pids(&daemon.status().await);
    assert_eq!(workers.len(), 2);
    daemon.signal(Signal::SIGKILL);
    daemon
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the supervisor dies at once");
    if let Err(alive) = wait_pids_gone(&workers, Duration::from_secs(1)).await {
        let states: Vec<_> = alive
            .iter()
            .map(|&p| (p, inferd_tests::proc_state(p)))
            .collect();
        panic!("workers outlived the supervisor by more than 1 s: {states:?}");
    }
}

#[tokio::test]
async fn second_daemon_on_the_same_socket_fails_clearly() {
    let first = Daemon::start(DaemonConfig::new()).await;
    let second = Daemon::spawn(DaemonConfig::new().socket(first.socket_path()));
    let status = second
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("a second daemon on a socket in use kept running"));
    assert!(!status.success(), "the second daemon must fail: {status}");
    let log = second.log();
    let lower = log.to_lowercase();
    assert!(
        log.contains(&first.socket_path().display().to_string())
            && ["already", "in use", "another"]
                .iter()
                .any(|w| lower.contains(w)),
        "the error names the socket and says it is in use; the second daemon's log:\n{log}"
    );

    // The first one is untouched.
    assert!(first.socket_path().exists());
    let status = first.status().await;
    assert_eq!(ready_count(&status), 2);
    first
        .client()
        .await
        .embed(vec!["still mine".into()], None)
        .await
        .expect("the first daemon still serves");
}

#[tokio::test]
async fn stale_socket_file_is_replaced() {
    let dir = tempfile::Builder::new()
        .prefix("inferd-stale-")
        .tempdir()
        .expect("temp dir");
    let socket = dir.path().join("inferd.sock");
    // A socket file with no listener, as a crashed daemon leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());

    let daemon = Daemon::start(DaemonConfig::new().socket(&socket)).await;
    let result = daemon
        .client()
        .await
        .embed(vec!["fresh start".into()], None)
        .await
        .expect("served on the replaced socket");
    assert_eq!(result.embeddings.len(), 1);
}
