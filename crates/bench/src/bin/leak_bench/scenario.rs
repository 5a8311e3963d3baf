//! The run itself: wait for every worker to be ready, drive the clients while
//! sampling status and /proc, then collect the final counters.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use inferd_client::{Client, Counters, PoolStatus, WorkerStateKind};

use crate::daemon::Daemon;
use crate::load::{client_loop, Failure, LoadLog};
use crate::procfs::ProcClock;
use crate::Args;

/// Everything the run recorded.
pub(crate) struct Recorded {
    /// Status of the pool at the start of the load.
    pub(crate) initial: PoolStatus,
    /// One entry per sampling tick.
    pub(crate) samples: Vec<Sample>,
    /// What the clients saw.
    pub(crate) load: LoadLog,
    /// Wall time of the load phase.
    pub(crate) load_wall: Duration,
    /// The daemon's counters after the clients stopped (before SIGTERM),
    /// or from the last good sample if that read failed (e.g. after Ctrl-C,
    /// which the daemon gets too), with where they came from.
    pub(crate) final_counters: Option<(Counters, &'static str)>,
    /// Supervisor CPU seconds when the load started.
    pub(crate) supervisor_cpu_start: Option<f64>,
    /// Status reads that failed or timed out during sampling.
    pub(crate) status_errors: u64,
    /// Why the run ended before `--duration`, if it did.
    pub(crate) cut_short: Option<String>,
}

/// One sampling tick.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Seconds since the load started.
    pub(crate) t_s: f64,
    /// Workers in the status; empty if status could not be read.
    pub(crate) workers: Vec<WorkerSample>,
    /// Workers ready or busy; `None` if status could not be read.
    pub(crate) serving: Option<usize>,
    /// Supervisor RSS, bytes.
    pub(crate) supervisor_rss: Option<u64>,
    /// Supervisor utime + stime since it started, seconds.
    pub(crate) supervisor_cpu_s: Option<f64>,
}

/// One worker in one sample.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSample {
    pub(crate) id: u64,
    pub(crate) pid: u32,
    pub(crate) state: WorkerStateKind,
    pub(crate) rss_bytes: Option<u64>,
}

pub(crate) async fn scenario(
    args: &Args,
    daemon: &mut Daemon,
    clock: &ProcClock,
) -> Result<Recorded> {
    let initial = wait_ready(
        daemon,
        args.workers,
        Duration::from_secs(args.startup_timeout),
    )
    .await?;
    eprintln!(
        "inferd-leak-bench: {} workers ready; {} clients for {} s",
        args.workers, args.clients, args.duration
    );
    let pid = daemon.pid();
    let supervisor_cpu_start = clock.read(pid).ok().map(|p| p.cpu_s);
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let request_timeout = Duration::from_secs(args.request_timeout);

    let mut clients = tokio::task::JoinSet::new();
    for index in 0..args.clients {
        clients.spawn(client_loop(
            index,
            daemon.socket.clone(),
            start,
            end,
            request_timeout,
            Arc::clone(&stop),
        ));
    }

    let mut samples = Vec::new();
    let mut status_errors = 0;
    let mut cut_short = None;
    let mut sampler: Option<Client> = None;
    let mut last_counters = None;
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                cut_short = Some("interrupted (Ctrl-C)".to_owned());
                break;
            }
        }
        if let Some(status) = daemon.exited() {
            cut_short = Some(format!(
                "the daemon exited during the run ({status}); log tail:\n{}",
                daemon.log_tail(20)
            ));
            break;
        }
        let status = status_once(&mut sampler, &daemon.socket).await;
        match &status {
            Some(status) => last_counters = Some(status.counters.clone()),
            None => status_errors += 1,
        }
        let own = clock.read(pid).ok();
        samples.push(Sample {
            t_s: start.elapsed().as_secs_f64(),
            serving: status.as_ref().map(serving_workers),
            workers: status
                .map(|s| {
                    s.workers
                        .into_iter()
                        .map(|w| WorkerSample {
                            id: w.id,
                            pid: w.pid,
                            state: w.state,
                            rss_bytes: w.rss_bytes,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            supervisor_rss: own.map(|p| p.rss_bytes),
            supervisor_cpu_s: own.map(|p| p.cpu_s),
        });
    }
    stop.store(true, Ordering::Relaxed);

    let mut load = LoadLog::default();
    let join_bound = request_timeout + CONNECT_TIMEOUT + Duration::from_secs(5);
    let joined = tokio::time::timeout(join_bound, async {
        while let Some(result) = clients.join_next().await {
            match result {
                Ok(log) => load.absorb(log),
                Err(err) => load.failures.push(Failure {
                    t_s: start.elapsed().as_secs_f64(),
                    client: usize::MAX,
                    kind: "client_task".into(),
                    error: err.to_string(),
                }),
            }
        }
    })
    .await;
    if joined.is_err() {
        clients.abort_all();
        cut_short.get_or_insert_with(|| {
            format!("clients did not stop within {} s", join_bound.as_secs())
        });
    }
    let load_wall = start.elapsed();
    let final_counters = match status_once(&mut None, &daemon.socket).await {
        Some(status) => Some((status.counters, "status after the load")),
        None => last_counters.map(|c| (c, "last sample (the final status read failed)")),
    };
    load.failures.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    Ok(Recorded {
        initial,
        samples,
        load,
        load_wall,
        final_counters,
        supervisor_cpu_start,
        status_errors,
        cut_short,
    })
}

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits (bounded) until `workers` workers are ready: the client library's
/// readiness wait, with the daemon's log tail when it fails.
async fn wait_ready(daemon: &mut Daemon, workers: u32, limit: Duration) -> Result<PoolStatus> {
    let socket = daemon.socket.clone();
    let result = {
        let alive = || match daemon.exited() {
            Some(status) => Err(format!("exited with {status}")),
            None => Ok(()),
        };
        inferd_client::wait_ready(&socket, workers as usize, limit, alive).await
    };
    result.map_err(|err| anyhow::anyhow!("{err}; log tail:\n{}", daemon.log_tail(20)))
}

/// One bounded status read over `client`, (re)connecting if needed; on any
/// failure the connection is dropped and `None` returned.
async fn status_once(client: &mut Option<Client>, socket: &Path) -> Option<PoolStatus> {
    let read = async {
        if client.is_none() {
            *client = Some(Client::connect_as(socket, "inferd-leak-bench").await.ok()?);
        }
        client.as_mut()?.status().await.ok()
    };
    let status = tokio::time::timeout(STATUS_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    if status.is_none() {
        *client = None;
    }
    status
}

fn serving_workers(status: &PoolStatus) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateKind::Ready || w.state == WorkerStateKind::Busy)
        .count()
}
