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
    let worker_id = pool.spawn(None, now).expect("spawned");
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
