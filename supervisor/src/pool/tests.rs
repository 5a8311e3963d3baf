//! Unit tests of the pool.

use inferd_proto::ServerMessage;

use super::*;
use crate::connections::ConnectionLimits;
use crate::memory::ProcfsMemory;

/// A configuration whose workers can never start (no such binary): the
/// pool runs with no worker at all.
fn workerless_config() -> Arc<Config> {
    Arc::new(Config {
        model: "/nonexistent/model.onnx".into(),
        tokenizer: "/nonexistent/tokenizer.json".into(),
        worker_binary: "/nonexistent/inferd-worker".into(),
        ..Config::default()
    })
}

fn test_seams() -> Seams {
    Seams {
        processes: Box::new(process::OsProcesses),
        memory: Box::new(ProcfsMemory::new(false)),
        cgroups: None,
        cgroup_summary: "off (test)".into(),
        notifier: Notifier::disabled(),
        connections: ConnectionLimits::new(16, 16),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn messages_still_queued_when_the_pool_stops_are_answered_shutting_down() {
    let (pool_tx, pool_rx) = mpsc::channel(256);
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    for id in 0..200 {
        let responder = Responder::new(id, answers_tx.clone());
        let msg = if id % 2 == 0 {
            PoolMsg::Status { responder }
        } else {
            PoolMsg::Metrics { responder }
        };
        pool_tx.try_send(msg).expect("room in the channel");
    }
    drop(answers_tx);
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let run = Pool::run(
        workerless_config(),
        test_seams(),
        pool_rx,
        shutdown,
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("a pool with no worker stops at once when told to")
        .expect("pool ran");
    // The pool stopped while `pool_tx` is still open: whatever it did
    // not handle must have been answered all the same.
    let (mut served, mut refused) = (0, 0);
    while let Some(answer) = answers.recv().await {
        match answer {
            ServerMessage::Status { .. } | ServerMessage::Metrics { .. } => served += 1,
            ServerMessage::Error {
                error: RequestError::ShuttingDown,
                ..
            } => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(served + refused, 200, "every message answered once");
    assert!(
        refused > 0,
        "the pool stopped before it had handled all 200 messages"
    );
    assert!(pool_tx.is_closed(), "the pool closed its end");
}

/// A pool whose workers are `sh` scripts that sleep: real processes
/// that never speak the protocol, moved through states by hand.
fn pool_of_sleepers(dir: &std::path::Path) -> Pool {
    let script = dir.join("sleeper");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = Config {
        worker_binary: script,
        ..(*workerless_config()).clone()
    };
    let (io_events, _io_rx) = mpsc::unbounded_channel();
    Pool::new(Arc::new(config), test_seams(), io_events, Instant::now())
}

fn queued_request(pool: &mut Pool, now: Instant) -> Request {
    let client = ClientKey {
        tenant: crate::request::Tenant::Uid(0),
        conn: 1,
    };
    Request::new(
        pool.next_request_id,
        client,
        Task::Embed,
        vec!["text".to_owned()].into(),
        now,
        now + Duration::from_secs(60),
        Responder::detached(1),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_protocol_error_from_a_draining_worker_retries_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = pool_of_sleepers(dir.path());
    let now = Instant::now();
    let worker_id = pool.spawn(Spawn::Fill, now).expect("spawned");
    let request = queued_request(&mut pool, now);
    let worker = pool.workers.get_mut(&worker_id).unwrap();
    assert!(worker.mark_ready(now));
    worker.assign(request, now).expect("assigned");
    worker.retire(RetireReason::Roll, now);
    assert!(matches!(worker.state(), WorkerState::Draining { .. }));
    let pid = worker.pid;

    let garbage = inferd_proto::ProtoError::FrameTooLarge {
        len: 1 << 30,
        max: 1 << 24,
    };
    pool.handle_io(worker_id, IoEvent::Closed(Some(garbage)), now);

    let worker = &pool.workers[&worker_id];
    assert!(
        matches!(
            worker.state(),
            WorkerState::Killed {
                reason: KillReason::ProtocolViolation,
                ..
            }
        ),
        "the draining worker is killed: {:?}",
        worker.state()
    );
    assert_eq!(pool.queue.len(), 1, "its request waits for another worker");
    assert_eq!(pool.counters.retries, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process::try_reap(pid).unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sleeper was not killed"
        );
        tokio::task::yield_now().await;
    }
}

// ------------------------------------------------------------------------
// The pool's rules on fake workers, with paused time: the real loop, real
// sockets and the real protocol, no processes and no waiting.

use std::sync::atomic::{AtomicU64, Ordering};

use inferd_proto::{EmbedResult, RecycleTrigger, WorkerStateKind};
use tokio::sync::Semaphore;

use super::fake::{FakeWorkers, Script, CRASH, CRASH_ONCE, HANG};

/// A pool running on fake workers, and the handles a test drives it with.
struct Harness {
    pool: mpsc::Sender<PoolMsg>,
    shutdown: CancellationToken,
    hurry: CancellationToken,
    run: tokio::task::JoinHandle<Result<(), PoolError>>,
    fakes: FakeWorkers,
    tickets: Arc<Semaphore>,
    next_id: AtomicU64,
}

/// `workers` fake workers, no spare, no memory limits (the fakes have no
/// memory to read), recycles allowed at any age.
fn fake_config(workers: u32) -> Config {
    Config {
        workers,
        min_lifetime_ms: 0,
        spare_workers: crate::config::SpareSetting::Count(0),
        ..(*workerless_config()).clone()
    }
}

/// [`fake_config`] with one spare.
fn with_a_spare(workers: u32) -> Config {
    Config {
        spare_workers: crate::config::SpareSetting::Count(1),
        ..fake_config(workers)
    }
}

fn spares(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateKind::Spare)
        .count()
}

impl Harness {
    async fn start(config: Config, script: Script) -> Harness {
        let fakes = FakeWorkers::new(script);
        let seams = Seams {
            processes: Box::new(fakes.clone()),
            ..test_seams()
        };
        let (pool, requests) = mpsc::channel(64);
        let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
        let run = tokio::spawn(Pool::run(
            Arc::new(config),
            seams,
            requests,
            shutdown.clone(),
            hurry.clone(),
        ));
        let harness = Harness {
            pool,
            shutdown,
            hurry,
            run,
            fakes,
            tickets: Arc::new(Semaphore::new(1024)),
            next_id: AtomicU64::new(1),
        };
        let target = harness.status().await.target_workers as usize;
        harness
            .wait_for("the workers are ready", |s| ready(s) == target)
            .await;
        harness
    }

    /// Sends one embed request; the task resolves to its answer.
    fn embed(
        &self,
        texts: &[&str],
        deadline: Option<Duration>,
    ) -> tokio::task::JoinHandle<Result<EmbedResult, RequestError>> {
        let (tx, mut answers) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = PoolMsg::Embed {
            client: ClientKey {
                tenant: crate::request::Tenant::Uid(0),
                conn: id,
            },
            task: Task::Embed,
            texts: texts.iter().map(|t| (*t).to_owned()).collect(),
            deadline,
            responder: Responder::new(id, tx),
            ticket: Arc::clone(&self.tickets)
                .try_acquire_owned()
                .expect("a ticket"),
        };
        let pool = self.pool.clone();
        tokio::spawn(async move {
            pool.send(msg).await.expect("the pool takes requests");
            match answers.recv().await.expect("one answer") {
                ServerMessage::Embeddings { result, .. } => Ok(result),
                ServerMessage::Error { error, .. } => Err(error),
                other => panic!("unexpected answer {other:?}"),
            }
        })
    }

    /// Asks for a roll with the running configuration; resolves to its
    /// answer (once the roll is over).
    async fn roll(&self) -> Option<ServerMessage> {
        let (tx, mut answers) = mpsc::unbounded_channel();
        self.pool
            .send(PoolMsg::Roll {
                config: None,
                responder: Some(Responder::new(7, tx)),
            })
            .await
            .expect("the pool takes requests");
        answers.recv().await
    }

    async fn status(&self) -> PoolStatus {
        let (tx, mut answers) = mpsc::unbounded_channel();
        let responder = Responder::new(0, tx);
        self.pool
            .send(PoolMsg::Status { responder })
            .await
            .expect("the pool takes requests");
        match answers.recv().await.expect("one answer") {
            ServerMessage::Status { status, .. } => *status,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Polls status every 10 ms (of paused time) until `done`; gives up
    /// after a minute of it.
    async fn wait_for(&self, what: &str, done: impl Fn(&PoolStatus) -> bool) -> PoolStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 60 s: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn ready(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateKind::Ready)
        .count()
}

fn serving(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state.is_serving())
        .count()
}

fn pids(status: &PoolStatus) -> Vec<u32> {
    status.workers.iter().map(|w| w.pid).collect()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn fake_workers_answer_through_the_pool() {
    let pool = Harness::start(fake_config(2), Script::default()).await;
    let answer = pool.embed(&["a", "b"], None).await.unwrap();
    assert_eq!(answer.unwrap().embeddings.len(), 2);
    assert_eq!(pool.fakes.spawned(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_request_of_a_dead_worker_is_retried_once_on_another() {
    let pool = Harness::start(fake_config(2), Script::default()).await;
    let answer = pool.embed(&[CRASH_ONCE], None).await.unwrap();
    assert!(answer.is_ok(), "answered by the second worker: {answer:?}");
    let status = pool
        .wait_for("the dead worker is replaced", |s| ready(s) == 2)
        .await;
    assert_eq!(status.counters.retries, 1);
    assert_eq!(
        status.counters.worker_exits.get(&ExitKind::Signaled),
        Some(&1)
    );
    assert_eq!(status.counters.poison_rejections, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_request_that_kills_two_workers_is_answered_worker_lost() {
    let pool = Harness::start(fake_config(2), Script::default()).await;
    let answer = pool.embed(&[CRASH], None).await.unwrap();
    assert!(
        matches!(answer, Err(RequestError::WorkerLost { deaths: 2 })),
        "{answer:?}"
    );
    let status = pool
        .wait_for("both dead workers are replaced", |s| ready(s) == 2)
        .await;
    assert_eq!(status.counters.poison_rejections, 1);
    assert_eq!(
        status.counters.worker_exits.get(&ExitKind::Signaled),
        Some(&2)
    );
    // The pool serves on.
    assert!(pool.embed(&["after"], None).await.unwrap().is_ok());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadlines_hold_for_queued_and_running_requests() {
    let config = Config {
        request_timeout_ms: 5_000,
        ..fake_config(1)
    };
    let pool = Harness::start(config, Script::default()).await;
    let started = Instant::now();
    let running = pool.embed(&[HANG], None);
    pool.wait_for("the hang runs", |s| serving(s) == 1 && ready(s) == 0)
        .await;
    let queued = pool.embed(&["waits"], Some(Duration::from_secs(1)));

    let answer = queued.await.unwrap();
    let waited = started.elapsed();
    assert!(
        matches!(answer, Err(RequestError::Timeout { .. })),
        "{answer:?}"
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1500),
        "the queued request's deadline: answered after {waited:?}"
    );

    let answer = running.await.unwrap();
    let waited = started.elapsed();
    assert!(
        matches!(answer, Err(RequestError::Timeout { .. })),
        "{answer:?}"
    );
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "request_timeout: answered after {waited:?}"
    );
    let status = pool
        .wait_for("the killed worker is replaced", |s| ready(s) == 1)
        .await;
    assert_eq!(
        status
            .counters
            .worker_exits
            .get(&ExitKind::KilledBySupervisor),
        Some(&1)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_recycled_worker_serves_until_its_replacement_is_ready() {
    let config = Config {
        max_requests: Some(1),
        ..fake_config(1)
    };
    let script = Script {
        load: Duration::from_secs(2),
        ..Script::default()
    };
    let pool = Harness::start(config, script.clone()).await;
    let first = pids(&pool.status().await);
    assert!(pool.embed(&["one"], None).await.unwrap().is_ok());
    // The replacement loads for 2 s: the old worker keeps serving, and
    // nothing ever leaves the pool without a serving worker.
    let mut fewest = usize::MAX;
    let mut served_meanwhile = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = pool.status().await;
        fewest = fewest.min(serving(&status));
        let replaced = status.counters.worker_exits.get(&ExitKind::Retired) == Some(&1);
        if replaced && !pids(&status).contains(&first[0]) {
            break;
        }
        if status.workers.iter().any(|w| w.replaces.is_some()) && served_meanwhile < 3 {
            let answer = pool.embed(&["during"], None).await.unwrap();
            assert!(answer.is_ok(), "{answer:?}");
            served_meanwhile += 1;
        }
        assert!(Instant::now() < deadline, "no hand-over: {status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fewest, 1, "a serving worker at every sample");
    assert!(
        served_meanwhile > 0,
        "requests were served while the replacement loaded"
    );
    let status = pool.status().await;
    assert_eq!(
        status.counters.recycles.get(&RecycleTrigger::MaxRequests),
        Some(&1)
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_roll_whose_workers_cannot_start_fails_and_the_old_ones_serve_on() {
    let pool = Harness::start(fake_config(2), Script::default()).await;
    let before = pids(&pool.status().await);
    pool.fakes.set_script(Script {
        fail_load: true,
        ..Script::default()
    });
    match pool.roll().await {
        Some(ServerMessage::Error {
            error: RequestError::RollFailed { reason },
            ..
        }) => {
            // The load error, or the exit when the reap came first.
            assert!(
                reason.contains("cannot be loaded") || reason.contains("before it was ready"),
                "{reason}"
            )
        }
        other => panic!("the roll's answer: {other:?}"),
    }
    let status = pool.status().await;
    assert_eq!(pids(&status), before, "the old workers stay");
    assert_eq!(serving(&status), 2);
    assert!(matches!(
        status.roll.map(|r| r.state),
        Some(RollState::Failed { .. })
    ));
    assert!(pool.embed(&["still"], None).await.unwrap().is_ok());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_second_stop_signal_ends_the_drain_at_once() {
    let config = Config {
        request_timeout_ms: 600_000,
        drain_timeout_ms: 600_000,
        ..fake_config(1)
    };
    let pool = Harness::start(config, Script::default()).await;
    let hung = pool.embed(&[HANG], None);
    pool.wait_for("the hang runs", |s| ready(s) == 0).await;
    pool.shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !pool.run.is_finished(),
        "the first signal drains: the hang holds it"
    );

    let hurried = Instant::now();
    pool.hurry.cancel();
    pool.run.await.unwrap().unwrap();
    assert!(
        hurried.elapsed() < Duration::from_secs(1),
        "the pool stopped {:?} after the second signal",
        hurried.elapsed()
    );
    assert!(matches!(
        hung.await.unwrap(),
        Err(RequestError::ShuttingDown)
    ));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_replacement_that_cannot_start_fails_its_recycle_and_the_old_worker_serves_on() {
    let config = Config {
        max_requests: Some(1),
        ..fake_config(1)
    };
    let pool = Harness::start(config, Script::default()).await;
    let old = pids(&pool.status().await);
    pool.fakes.set_script(Script {
        fail_load: true,
        ..Script::default()
    });
    assert!(pool.embed(&["one"], None).await.unwrap().is_ok());
    let status = pool
        .wait_for("a failed recycle is counted", |s| {
            s.counters.recycles_failed.get(&RecycleTrigger::MaxRequests) >= Some(&1)
        })
        .await;
    assert!(
        pids(&status).contains(&old[0]),
        "the old worker stays: {status:?}"
    );
    assert!(
        pool.embed(&["two"], None).await.unwrap().is_ok(),
        "and serves"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn status_shows_a_recycle_while_its_replacement_loads() {
    let config = Config {
        max_requests: Some(1),
        ..fake_config(1)
    };
    let script = Script {
        load: Duration::from_secs(5),
        ..Script::default()
    };
    let pool = Harness::start(config, script).await;
    let old = pids(&pool.status().await)[0];
    assert!(pool.embed(&["one"], None).await.unwrap().is_ok());
    let status = pool
        .wait_for("the recycle shows", |s| !s.recycles.is_empty())
        .await;
    let recycle = &status.recycles[0];
    assert_eq!(recycle.trigger, RecycleTrigger::MaxRequests);
    assert_eq!(recycle.stage, inferd_proto::RecycleStage::Loading);
    let old_id = status.workers.iter().find(|w| w.pid == old).unwrap().id;
    assert_eq!(recycle.old_worker, old_id);
    pool.wait_for("the recycle completes", |s| {
        s.recycles.is_empty() && !pids(s).contains(&old)
    })
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_spare_takes_a_dead_workers_place_at_once() {
    let pool = Harness::start(with_a_spare(2), Script::default()).await;
    pool.wait_for("the spare is loaded", |s| spares(s) == 1)
        .await;
    assert!(pool
        .embed(&["a spare takes no work"], None)
        .await
        .unwrap()
        .is_ok());
    let answer = pool.embed(&[CRASH_ONCE], None).await.unwrap();
    assert!(answer.is_ok(), "{answer:?}");
    // The retry was answered after the death was seen; the spare took
    // the dead worker's place then, not after a 300 ms load.
    let status = pool.status().await;
    assert_eq!(serving(&status), 2, "{status:?}");
    assert_eq!(status.counters.spares_promoted, 1);
    assert_eq!(status.target_spares, 1);
    let status = pool
        .wait_for("a new spare is loaded", |s| {
            spares(s) == 1 && serving(s) == 2
        })
        .await;
    assert_eq!(status.workers.len(), 3, "{status:?}");
    let spare = status
        .workers
        .iter()
        .find(|w| w.state == WorkerStateKind::Spare)
        .unwrap();
    assert_eq!(spare.requests_served, 0, "a spare is never dispatched to");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn without_a_spare_a_death_leaves_a_gap_while_the_replacement_loads() {
    let pool = Harness::start(fake_config(2), Script::default()).await;
    assert!(pool.embed(&[CRASH_ONCE], None).await.unwrap().is_ok());
    assert_eq!(
        serving(&pool.status().await),
        1,
        "the counterpart of the spare test"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_recycle_promotes_the_spare_and_serving_never_dips() {
    let config = Config {
        max_requests: Some(1),
        ..with_a_spare(2)
    };
    let pool = Harness::start(config, Script::default()).await;
    pool.wait_for("the spare is loaded", |s| spares(s) == 1)
        .await;
    for round in 0..3 {
        assert!(pool.embed(&["recycle me"], None).await.unwrap().is_ok());
        // Every 10 ms for 2 s: the recycle, the old worker's exit and the
        // new spare's load.
        for _ in 0..200 {
            let status = pool.status().await;
            assert!(serving(&status) >= 2, "round {round}: {status:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let status = pool.status().await;
    assert_eq!(
        status.counters.recycles.get(&RecycleTrigger::MaxRequests),
        Some(&3)
    );
    assert_eq!(status.counters.spares_promoted, 3);
    assert_eq!(spares(&status), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_roll_replaces_the_spare_too() {
    let pool = Harness::start(with_a_spare(2), Script::default()).await;
    let before = pool
        .wait_for("the spare is loaded", |s| spares(s) == 1)
        .await;
    match pool.roll().await {
        Some(ServerMessage::Rolled { replaced, .. }) => assert_eq!(replaced, 2),
        other => panic!("the roll's answer: {other:?}"),
    }
    let after = pool
        .wait_for("a new spare is loaded", |s| {
            spares(s) == 1 && serving(s) == 2
        })
        .await;
    let old: Vec<u32> = pids(&before);
    assert!(
        pids(&after).iter().all(|pid| !old.contains(pid)),
        "every worker, the spare included, is new: {before:?} -> {after:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_worker_asked_to_exit_while_loading_is_not_killed_for_its_ready() {
    let pool = Harness::start(with_a_spare(1), Script::default()).await;
    pool.wait_for("the spare is loaded", |s| spares(s) == 1)
        .await;
    // The next spare loads for 5 s; the drain asks it to exit meanwhile.
    pool.fakes.set_script(Script {
        load: Duration::from_secs(5),
        ..Script::default()
    });
    assert!(pool.embed(&[CRASH_ONCE], None).await.unwrap().is_ok());
    pool.wait_for("a new spare is loading", |s| {
        s.workers
            .iter()
            .any(|w| w.spare && w.state == WorkerStateKind::Starting)
    })
    .await;
    pool.shutdown.cancel();
    pool.run.await.unwrap().unwrap();
    assert_eq!(
        pool.fakes.kills(),
        0,
        "its Ready crossed our Shutdown: it exits as asked, unkilled"
    );
}
