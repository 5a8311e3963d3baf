//! The run itself: wait for every worker to be ready, drive the clients while
//! sampling status and /proc (and, with `--kill-every`, killing a serving
//! worker now and then), then collect the final counters.
//!
//! The sampler runs on the runtime's main thread and the clients on its
//! worker threads, so decoding large batch answers does not delay samples.
//! Each sample is one status read over the Unix socket plus two small reads
//! of the supervisor's /proc files; worker RSS comes from the status, not
//! from /proc. How long each sample took is recorded, and the report counts
//! the samples that came late.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use inferd_client::{Client, Counters, PoolStatus, WorkerStateKind};
use serde::Serialize;

use crate::daemon::Daemon;
use crate::kills::{kill_one, Kill};
use crate::load::{client_loop, long_text, Failure, LoadLog, Traffic};
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
    /// The settings the daemon resolved: at the start of the load, then
    /// each time a status showed them changed (an "auto" limit is derived
    /// once the first worker is ready), with the seconds since the load
    /// started. Never empty.
    pub(crate) settings: Vec<(f64, DaemonSettings)>,
    /// Every `--kill-every` kill, in order.
    pub(crate) kills: Vec<Kill>,
    /// Tokens in the long text, as the daemon's tokenizer counts them
    /// (`--traffic mixed` only; `None` if that read failed).
    pub(crate) long_text_tokens: Option<usize>,
}

/// What the daemon made of its memory and spare settings, from its status:
/// what it applies, whatever the config said (or left out).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct DaemonSettings {
    pub(crate) soft_limit_bytes: Option<u64>,
    pub(crate) hard_limit_bytes: Option<u64>,
    /// How the daemon derived the limits, in its words.
    pub(crate) limits_origin: String,
    pub(crate) target_spares: u32,
}

impl DaemonSettings {
    fn of(status: &PoolStatus) -> DaemonSettings {
        DaemonSettings {
            soft_limit_bytes: status.soft_limit_bytes,
            hard_limit_bytes: status.hard_limit_bytes,
            limits_origin: status.limits_origin.clone(),
            target_spares: status.target_spares,
        }
    }
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
    /// Workers in state spare; `None` if status could not be read.
    pub(crate) spares: Option<usize>,
    /// How long the status and /proc reads took, milliseconds.
    pub(crate) read_ms: f64,
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
    /// The daemon's estimate of its memory growth.
    pub(crate) growth_bytes_per_sec: Option<f64>,
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
    let long_text_tokens = match args.traffic {
        Traffic::Short => None,
        Traffic::Mixed => count_tokens(&daemon.socket, &long_text(0)).await,
    };
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
            args.traffic,
            Arc::clone(&stop),
        ));
    }
    let kill_every = args.kill_every.map(Duration::from_secs);
    // A kill at the very end of the load would leave nothing to measure.
    let before_end = |at: Instant| Some(at).filter(|at| *at < end);
    let mut next_kill = kill_every.and_then(|every| before_end(start + every));
    let mut kills = Vec::new();
    let mut settings = vec![(0.0, DaemonSettings::of(&initial))];

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
        let sample_start = Instant::now();
        let status = status_once(&mut sampler, &daemon.socket).await;
        let own = clock.read(pid).ok();
        let read_ms = sample_start.elapsed().as_secs_f64() * 1e3;
        let t_s = start.elapsed().as_secs_f64();
        match &status {
            Some(status) => {
                last_counters = Some(status.counters.clone());
                note_settings(&mut settings, t_s, status);
            }
            None => status_errors += 1,
        }
        let sample = Sample {
            t_s,
            serving: status
                .as_ref()
                .map(|s| count_in(s, WorkerStateKind::is_serving)),
            spares: status
                .as_ref()
                .map(|s| count_in(s, |state| state == WorkerStateKind::Spare)),
            read_ms,
            workers: status
                .map(|s| {
                    s.workers
                        .into_iter()
                        .map(|w| WorkerSample {
                            id: w.id,
                            pid: w.pid,
                            state: w.state,
                            rss_bytes: w.rss_bytes,
                            growth_bytes_per_sec: w.growth_bytes_per_sec,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            supervisor_rss: own.map(|p| p.rss_bytes),
            supervisor_cpu_s: own.map(|p| p.cpu_s),
        };
        // The victim comes from this sample: the freshest view of the pool.
        if let (Some(at), Some(every)) = (next_kill, kill_every) {
            if Instant::now() >= at {
                let kill = kill_one(start.elapsed().as_secs_f64(), &sample.workers, pid);
                match &kill.skipped {
                    None => eprintln!(
                        "inferd-leak-bench: {:.2} s: SIGKILLed worker {} (pid {})",
                        kill.t_s,
                        kill.worker_id.unwrap_or_default(),
                        kill.pid.unwrap_or_default()
                    ),
                    Some(why) => eprintln!("inferd-leak-bench: {:.2} s: no kill: {why}", kill.t_s),
                }
                kills.push(kill);
                next_kill = before_end(at + every);
            }
        }
        samples.push(sample);
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
                    request: None,
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
        Some(status) => {
            note_settings(&mut settings, load_wall.as_secs_f64(), &status);
            Some((status.counters, "status after the load"))
        }
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
        settings,
        kills,
        long_text_tokens,
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

/// Appends the settings in `status` if they differ from the last ones.
fn note_settings(settings: &mut Vec<(f64, DaemonSettings)>, t_s: f64, status: &PoolStatus) {
    let now = DaemonSettings::of(status);
    if settings.last().is_none_or(|(_, last)| *last != now) {
        settings.push((t_s, now));
    }
}

/// Workers whose state passes `pick`.
fn count_in(status: &PoolStatus, pick: impl Fn(WorkerStateKind) -> bool) -> usize {
    status.workers.iter().filter(|w| pick(w.state)).count()
}

/// Tokens in `text` by the daemon's tokenizer (bounded); `None` on failure.
async fn count_tokens(socket: &Path, text: &str) -> Option<usize> {
    let read = async {
        let mut client = Client::connect_as(socket, "inferd-leak-bench").await.ok()?;
        let result = client.tokenize(vec![text.to_owned()], None).await.ok()?;
        result.tokens.first().map(Vec::len)
    };
    tokio::time::timeout(STATUS_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}
