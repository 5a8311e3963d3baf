//! Operations against the real daemon: SIGHUP and `inferctl roll` replace
//! every worker without a failed request, an invalid config on SIGHUP
//! changes nothing, access control refuses the wrong uid, and metrics are
//! valid Prometheus text.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inferd_tests::{
    children_of, proc_state, ready_count, sample_texts, serving_count, worker_pids, BackgroundLoad,
    Client, ClientError, Daemon, DaemonConfig, Expected, PoolStatus, RequestError, RollState,
    Signal, POLL_INTERVAL,
};
use inferd_tests::{RecycleTrigger, WorkerStateKind};

const ROLL: Duration = Duration::from_secs(120);

fn rolls(status: &PoolStatus) -> u64 {
    status
        .counters
        .recycles
        .get(&RecycleTrigger::Roll)
        .copied()
        .unwrap_or(0)
}

/// Fewest serving workers seen by a status poller running until stopped.
fn watch_capacity(daemon: &Daemon) -> (Arc<AtomicBool>, tokio::task::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let socket = daemon.socket_path().to_path_buf();
    let task = tokio::spawn(async move {
        let mut client = Client::connect(&socket).await.expect("watcher connects");
        let mut fewest = usize::MAX;
        while !flag.load(Ordering::SeqCst) {
            let status = client.status().await.expect("watcher status");
            fewest = fewest.min(serving_count(&status));
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        fewest
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_three_times_under_load_replaces_every_worker_and_fails_nothing() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let expected = Expected::compute(&daemon, &sample_texts()).await;
    let load = BackgroundLoad::start(daemon.socket_path(), 4, &expected);
    let (stop_watch, watcher) = watch_capacity(&daemon);
    let mut seen: BTreeSet<u32> = worker_pids(&daemon.status().await).into_iter().collect();

    // First SIGHUP; the second lands while the first roll is under way.
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for(|s| rolls(s) >= 1, ROLL).await;
    daemon.signal(Signal::SIGHUP);
    let status = daemon
        .wait_for(
            |s| {
                ready_count(s)
                    + s.workers
                        .iter()
                        .filter(|w| w.state == WorkerStateKind::Busy)
                        .count()
                    == 2
                    && s.workers.len() == 2
                    && s.workers
                        .iter()
                        .all(|w| !seen.contains(&w.pid) && w.replaces.is_none())
            },
            ROLL,
        )
        .await;
    seen.extend(worker_pids(&status));

    // Third, after the others completed.
    let before = worker_pids(&status);
    daemon.signal(Signal::SIGHUP);
    let status = daemon
        .wait_for(
            |s| {
                s.workers.len() == 2
                    && serving_count(s) == 2
                    && s.workers
                        .iter()
                        .all(|w| !before.contains(&w.pid) && w.replaces.is_none())
            },
            ROLL,
        )
        .await;
    load.wait_progress(10, ROLL).await;
    let report = load.stop().await;
    stop_watch.store(true, Ordering::SeqCst);
    let fewest = watcher.await.expect("watcher");

    assert!(
        report.errors.is_empty(),
        "failed requests: {:?}",
        report.errors
    );
    assert!(
        fewest >= 2,
        "capacity fell to {fewest} serving workers during the rolls"
    );
    assert!(
        rolls(&status) >= 4,
        "every worker of each generation replaced: {:?}",
        status.counters
    );
    // No orphan, no zombie: the daemon's children are exactly its 2 workers.
    let children = children_of(daemon.pid());
    let live: BTreeSet<u32> = worker_pids(&status).into_iter().collect();
    daemon
        .wait_for(
            |_| children_of(daemon.pid()) == live,
            Duration::from_secs(10),
        )
        .await;
    for pid in &children {
        assert_ne!(proc_state(*pid), Some('Z'), "zombie child {pid}");
    }
    println!(
        "served {} requests across 3 rolls; {:?}",
        report.ok, status.counters.recycles
    );
}

#[tokio::test]
async fn invalid_config_on_sighup_keeps_the_running_one() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let before = worker_pids(&daemon.status().await);
    std::fs::write(daemon.config_path(), "workers = \"many\"\n").expect("overwrite config");
    daemon.signal(Signal::SIGHUP);
    let log = daemon
        .wait_for_log("SIGHUP: invalid configuration", Duration::from_secs(10))
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("SIGHUP: invalid configuration"))
        .unwrap_or_default();
    assert!(
        line.contains("workers"),
        "the log line names the bad key: {line}"
    );
    let mut client = daemon.client().await;
    client
        .embed(vec!["still serving".into()], None)
        .await
        .expect("the old config keeps serving");
    let status = daemon.status().await;
    assert_eq!(worker_pids(&status), before, "nothing was rolled");
    assert_eq!(rolls(&status), 0);
}

#[tokio::test]
async fn inferctl_roll_waits_for_the_roll_to_complete() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let before = worker_pids(&daemon.status().await);
    let out = daemon
        .inferctl()
        .arg("roll")
        .output()
        .expect("inferctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("roll complete: 2 worker(s) replaced"),
        "{stdout}"
    );
    // Complete means: the new workers serve, the old ones are gone.
    let status = daemon.status().await;
    assert_eq!(ready_count(&status), 2, "{status:?}");
    assert!(
        worker_pids(&status).iter().all(|p| !before.contains(p)),
        "{status:?}"
    );
}

/// Writes a file that is not an ONNX model, next to the daemon's files.
fn not_a_model(daemon: &Daemon) -> std::path::PathBuf {
    let path = daemon.dir().join("broken.onnx");
    std::fs::write(&path, b"this is not an ONNX model").expect("write the broken model");
    path
}

fn roll_state(status: &PoolStatus) -> Option<&RollState> {
    status.roll.as_ref().map(|roll| &roll.state)
}

#[tokio::test]
async fn inferctl_roll_fails_cleanly_when_new_workers_cannot_start() {
    // The daemon serves a copy of the model, which is then broken on disk:
    // every new worker fails to load it.
    let dir = tempfile::Builder::new()
        .prefix("inferd-roll-")
        .tempdir()
        .expect("temp dir");
    let (model, tokenizer) = inferd_tests::model_files(&inferd_tests::test_model_name());
    let copy = dir.path().join("model.onnx");
    std::fs::copy(&model, &copy).expect("copy the model");
    let daemon = Daemon::start(DaemonConfig::new().model((copy.clone(), tokenizer))).await;
    let before = worker_pids(&daemon.status().await);
    std::fs::write(&copy, b"truncated").expect("break the model file");

    let out = tokio::task::spawn_blocking({
        let mut inferctl = daemon.inferctl();
        move || inferctl.args(["roll", "--timeout", "120"]).output()
    })
    .await
    .expect("inferctl task")
    .expect("inferctl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the daemon answers an error: {stderr}"
    );
    assert!(stderr.contains("roll failed"), "{stderr}");

    let status = daemon.status().await;
    assert!(
        matches!(roll_state(&status), Some(RollState::Failed { .. })),
        "status shows the failed roll: {:?}",
        status.roll
    );
    assert_eq!(worker_pids(&status), before, "the old workers stay");
    assert_eq!(serving_count(&status), 2);
    daemon
        .client()
        .await
        .embed(vec!["still serving".into()], None)
        .await
        .expect("the old workers keep serving");
    assert!(daemon.log().contains("rolling restart failed"));
}

#[tokio::test]
async fn sighup_to_a_broken_model_keeps_the_old_config_for_every_worker() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let before = worker_pids(&daemon.status().await);
    let broken = DaemonConfig::new().model((
        not_a_model(&daemon),
        daemon.config().config.tokenizer.clone(),
    ));
    std::fs::write(daemon.config_path(), broken.to_toml(daemon.socket_path()))
        .expect("write the new config");
    daemon.signal(Signal::SIGHUP);
    let status = daemon
        .wait_for(
            |s| matches!(roll_state(s), Some(RollState::Failed { .. })),
            ROLL,
        )
        .await;
    assert_eq!(worker_pids(&status), before, "the old workers stay");

    // A worker that dies now is replaced from the configuration that works.
    daemon.signal_worker(before[0], Signal::SIGKILL);
    let status = daemon
        .wait_for(
            |s| ready_count(s) == 2 && !worker_pids(s).contains(&before[0]),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        status.model.ends_with("model.onnx") && !status.model.ends_with("broken.onnx"),
        "the pool still serves the old model: {}",
        status.model.display()
    );
    daemon
        .client()
        .await
        .embed(vec!["served by the old config".into()], None)
        .await
        .expect("embed after the failed roll");
}

#[tokio::test]
async fn sighup_to_a_missing_model_is_refused_before_any_roll() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let before = worker_pids(&daemon.status().await);
    let missing = daemon.dir().join("no-such-model.onnx");
    let config = DaemonConfig::new().model((missing, daemon.config().config.tokenizer.clone()));
    std::fs::write(daemon.config_path(), config.to_toml(daemon.socket_path()))
        .expect("write the new config");
    daemon.signal(Signal::SIGHUP);
    let log = daemon
        .wait_for_log("SIGHUP: invalid configuration", Duration::from_secs(10))
        .await;
    assert!(log.contains("no-such-model.onnx"), "the log names the file");
    let status = daemon.status().await;
    assert_eq!(worker_pids(&status), before, "nothing was rolled");
    assert!(status.roll.is_none(), "no roll began: {:?}", status.roll);
}

#[tokio::test]
async fn uid_outside_the_allow_list_is_refused() {
    let own = nix::unistd::getuid().as_raw();
    let daemon =
        Daemon::spawn(DaemonConfig::new().with(|c| c.access.allowed_uids = vec![own + 4242]));
    daemon
        .wait_for_log("worker ready", Duration::from_secs(60))
        .await;
    let mut client = daemon.client().await;
    match client.embed(vec!["hello".into()], None).await {
        Err(ClientError::Request(RequestError::PermissionDenied { reason })) => {
            assert!(reason.contains(&format!("uid {own}")), "{reason}")
        }
        other => panic!("expected permission denied, got {other:?}"),
    }
    // Refused peers are disconnected.
    assert!(matches!(client.status().await, Err(ClientError::Closed)));
    assert!(daemon.log().contains("refusing client"));
}

/// One keep-alive HTTP/1.1 request on `stream`: the status line and whether
/// the answer says the connection closes.
fn http_get(stream: &mut std::os::unix::net::UnixStream, path: &str) -> (String, bool) {
    use std::io::{BufRead, BufReader, Read, Write};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: inferd\r\n\r\n").expect("send");
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        let lower = line.trim().to_ascii_lowercase();
        if lower.is_empty() {
            break;
        }
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().expect("content length");
        }
        close |= lower == "connection: close";
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    (status.trim().to_owned(), close)
}

#[tokio::test]
async fn a_reload_that_drops_a_uid_closes_its_open_connections() {
    let own = nix::unistd::getuid().as_raw();
    let daemon = Daemon::start(DaemonConfig::new().workers(1)).await;
    let mut native = daemon.client().await;
    native
        .embed(vec!["before the reload".into()], None)
        .await
        .expect("admitted at first");
    let mut http = std::os::unix::net::UnixStream::connect(daemon.socket_path()).expect("connect");
    http.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let (status, _) = http_get(&mut http, "/info");
    assert!(status.ends_with("200 OK"), "{status}");

    let config = daemon
        .config()
        .clone()
        .with(|c| c.access.allowed_uids = vec![own + 4242]);
    std::fs::write(daemon.config_path(), config.to_toml(daemon.socket_path()))
        .expect("write the new config");
    daemon.signal(Signal::SIGHUP);
    daemon
        .wait_for_log("SIGHUP: configuration re-read", Duration::from_secs(10))
        .await;

    match native.embed(vec!["after the reload".into()], None).await {
        Err(ClientError::Request(RequestError::PermissionDenied { reason })) => {
            assert!(reason.contains(&format!("uid {own}")), "{reason}")
        }
        other => panic!("an open native connection of a dropped uid got {other:?}"),
    }
    assert!(
        matches!(native.status().await, Err(ClientError::Closed)),
        "the native connection is closed after the refusal"
    );
    let (status, close) = tokio::task::spawn_blocking(move || http_get(&mut http, "/info"))
        .await
        .expect("http task");
    assert!(status.ends_with("403 Forbidden"), "{status}");
    assert!(close, "the HTTP connection is closed after the refusal");
}

#[tokio::test]
async fn control_operations_can_be_restricted_separately() {
    let own = nix::unistd::getuid().as_raw();
    let daemon =
        Daemon::start(DaemonConfig::new().with(|c| c.access.control_uids = vec![own + 4242])).await;
    let mut client = daemon.client().await;
    client
        .embed(vec!["users may embed".into()], None)
        .await
        .expect("embed allowed");
    for result in [
        client.metrics().await.map(drop),
        client.roll().await.map(drop),
    ] {
        assert!(
            matches!(
                result,
                Err(ClientError::Request(RequestError::PermissionDenied { .. }))
            ),
            "{result:?}"
        );
    }
    client.status().await.expect("same connection still usable");
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let mut client = daemon.client().await;
    client
        .embed(vec!["count me".into()], None)
        .await
        .expect("embed");
    let out = daemon
        .inferctl()
        .arg("metrics")
        .output()
        .expect("inferctl runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let exposition = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("not valid Prometheus text: {e:?}\n{text}"));
    for family in [
        "inferd_requests_ok_total",
        "inferd_workers",
        "inferd_worker_exits_total",
    ] {
        assert!(
            exposition.families.contains_key(family),
            "{family} missing:\n{text}"
        );
    }
    let ok_line = text
        .lines()
        .find(|l| l.starts_with("inferd_requests_ok_total "))
        .expect("ok counter sample");
    let ok: f64 = ok_line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!(ok >= 1.0, "{ok_line}");
}

#[tokio::test]
async fn metrics_are_served_over_loopback_http_when_configured() {
    let daemon = Daemon::start(
        DaemonConfig::new().with(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())),
    )
    .await;
    let log = daemon
        .wait_for_log("metrics on http://", Duration::from_secs(10))
        .await;
    let addr = log
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("address in the log")
        .to_owned();
    let get = move |path: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        response
    };
    let response = tokio::task::spawn_blocking(move || (get("/metrics"), get("/other")))
        .await
        .expect("http task");
    let (metrics, other) = response;
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    let body = metrics.split("\r\n\r\n").nth(1).expect("body");
    openmetrics_parser::prometheus::parse_prometheus(body)
        .unwrap_or_else(|e| panic!("not valid Prometheus text: {e:?}\n{body}"));
    assert!(body.contains("inferd_workers{state=\"ready\"} 2"), "{body}");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}
