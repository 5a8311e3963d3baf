//! Fair queueing and abandoned requests (issue #7): a client that floods the
//! daemon does not starve a normal one, and the queued requests of clients
//! that left are dropped unrun.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use inferd_proto::{decode_payload, encode_frame, ClientMessage, Counters, Hello, ServerMessage};
use inferd_tests::WorkerStateKind;
use inferd_tests::{Client, Daemon, DaemonConfig, Expected, PoolStatus, RawConn, RequestError};

/// Requests of the normal client per measurement.
const NORMAL_REQUESTS: usize = 200;
/// Frames per second the flooder writes, rate-limited (in batches) to what
/// one connection sensibly pushes: the 10,000 frames/s. An unlimited
/// writer measures the machine's CPU rather than the queue's fairness on a
/// 2-core box.
const FLOOD_RATE: u64 = 10_000;
/// Frames per write.
const FLOOD_BATCH: u64 = 100;
const SHORT_TEXT: &str = "A short sentence to embed.";

/// Nearest-rank percentile of sorted `samples`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time (user + system) a process has used so far, from
/// `/proc/PID/stat`; zero if it is gone.
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    // After the command: state is field 3; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(ticks as f64 / hz)
}

/// CPU time of the daemon, of its workers, and of this test process.
fn cpu_split(daemon: &Daemon, workers: &[u32]) -> [Duration; 3] {
    [
        cpu_time(daemon.pid()),
        workers.iter().map(|&p| cpu_time(p)).sum(),
        cpu_time(std::process::id()),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `NORMAL_REQUESTS` sequential one-text requests on one connection; the
/// sorted latencies, each with the flooder's backlog (written - answered,
/// the larger of before and after the request; 0 without a flooder).
async fn normal_client_latencies(
    client: &mut Client,
    expected: &Expected,
    backlog: Option<(&AtomicU64, &AtomicU64)>,
) -> Vec<(Duration, u64)> {
    let texts = vec![SHORT_TEXT.to_string()];
    let backlog_now = || {
        backlog.map_or(0, |(sent, answered)| {
            sent.load(Ordering::SeqCst)
                .saturating_sub(answered.load(Ordering::SeqCst))
        })
    };
    let mut latencies = Vec::with_capacity(NORMAL_REQUESTS);
    for _ in 0..NORMAL_REQUESTS {
        let before = backlog_now();
        let start = Instant::now();
        let result =
            tokio::time::timeout(Duration::from_secs(30), client.embed(texts.clone(), None))
                .await
                .expect("the normal client is answered within 30 s")
                .unwrap_or_else(|e| panic!("the normal client's request failed: {e}"));
        latencies.push((start.elapsed(), before.max(backlog_now())));
        expected
            .check(&texts, &result)
            .expect("the normal client gets the right vector");
    }
    latencies.sort();
    latencies
}

/// Latencies (sorted) of the samples whose backlog is in `range`, in words.
fn by_backlog(samples: &[(Duration, u64)], range: std::ops::Range<u64>) -> String {
    let label = if range.end == u64::MAX {
        format!(">= {}", range.start)
    } else {
        format!("< {}", range.end)
    };
    let picked: Vec<Duration> = samples
        .iter()
        .filter(|(_, b)| range.contains(b))
        .map(|(d, _)| *d)
        .collect();
    if picked.is_empty() {
        return format!("backlog {label}: none");
    }
    format!(
        "backlog {label}: {} requests, p50 {:.1} ms, max {:.1} ms",
        picked.len(),
        ms(percentile(&picked, 50.0)),
        ms(picked[picked.len() - 1])
    )
}

/// Reads one frame's payload from a blocking stream; `None` at EOF.
fn read_frame(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload).ok()?;
    Some(payload)
}

/// What the flooder's reader counted.
#[derive(Debug, Default)]
struct FloodAnswers {
    ok: u64,
    overloaded: u64,
    other: Vec<String>,
}

/// One connection writing embed frames as fast as `FLOOD_RATE` allows,
/// pipelined, from a writer thread, while a reader thread drains and counts
/// the answers. Plain threads, so that the flood does not compete with the
/// normal client for the test's async runtime.
struct Flooder {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    overloaded: Arc<AtomicU64>,
    started: Instant,
    writer: JoinHandle<Duration>,
    reader: JoinHandle<FloodAnswers>,
}

impl Flooder {
    fn start(socket: &Path) -> Flooder {
        let mut stream = StdUnixStream::connect(socket).expect("the flooder connects");
        stream
            .write_all(&encode_frame(&Hello::new("inferd-tests-flooder")).expect("encode"))
            .expect("send the hello");
        let hello: Hello =
            decode_payload(&read_frame(&mut stream).expect("the daemon's hello")).expect("a hello");
        assert_eq!(hello.protocol_version, inferd_proto::PROTOCOL_VERSION);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let overloaded = Arc::new(AtomicU64::new(0));
        let started = Instant::now();

        let mut write_side = stream.try_clone().expect("clone the stream");
        let writer = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut id = 1u64;
                while !stop.load(Ordering::SeqCst) {
                    let mut batch = Vec::new();
                    for _ in 0..FLOOD_BATCH {
                        batch.extend(
                            encode_frame(&ClientMessage::Embed {
                                id,
                                texts: vec![SHORT_TEXT.to_string()],
                                deadline_ms: None,
                            })
                            .expect("encode"),
                        );
                        id += 1;
                    }
                    if write_side.write_all(&batch).is_err() {
                        break;
                    }
                    let total = sent.fetch_add(FLOOD_BATCH, Ordering::SeqCst) + FLOOD_BATCH;
                    // The rate loop: wait until this batch is due.
                    let due = started + Duration::from_secs_f64(total as f64 / FLOOD_RATE as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                // Half-close: the daemon still answers everything it took.
                let _ = write_side.shutdown(std::net::Shutdown::Write);
                started.elapsed()
            })
        };
        let reader = {
            let (answered, overloaded) = (answered.clone(), overloaded.clone());
            let mut read_side = std::io::BufReader::with_capacity(1 << 16, stream);
            std::thread::spawn(move || {
                let mut answers = FloodAnswers::default();
                while let Some(payload) = read_frame(&mut read_side) {
                    match decode_payload::<ServerMessage>(&payload) {
                        Ok(ServerMessage::Embeddings { .. }) => answers.ok += 1,
                        Ok(ServerMessage::Error {
                            error: RequestError::Overloaded { .. },
                            ..
                        }) => {
                            answers.overloaded += 1;
                            overloaded.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(other) => answers.other.push(format!("{other:?}")),
                        Err(e) => answers.other.push(format!("undecodable answer: {e}")),
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                answers
            })
        };
        Flooder {
            stop,
            sent,
            answered,
            overloaded,
            started,
            writer,
            reader,
        }
    }

    /// Frames written so far and the rate since the start.
    fn sent(&self) -> (u64, f64) {
        let sent = self.sent.load(Ordering::SeqCst);
        (sent, sent as f64 / self.started.elapsed().as_secs_f64())
    }

    /// Stops writing, half-closes, and waits (bounded) for every answer.
    async fn stop(self) -> (u64, Duration, FloodAnswers) {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.writer.is_finished() || !self.reader.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the flooder's answers did not all come within 60 s ({} sent, {} answered)",
                self.sent.load(Ordering::SeqCst),
                self.answered.load(Ordering::SeqCst),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = self.writer.join().expect("writer thread");
        let answers = self.reader.join().expect("reader thread");
        (self.sent.load(Ordering::SeqCst), elapsed, answers)
    }
}

/// The two tests of this file run one at a time: each measures latencies or
/// loads both cores, and would distort the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rounds the flood test may take to see the 3x bound hold (see below). On
/// this 2-core machine a fair round measures 1.9x to 3.4x, so one round in
/// two or three misses by noise alone: five rounds keep a false failure
/// rare (about 1 %), while an unfair queue (~30x) still fails all five.
const FLOOD_ROUNDS: u32 = 5;

/// The bound is timing on a shared 2-core machine, where other processes'
/// load can inflate the flood-time latencies of any scheduler; so each round
/// is a fresh daemon, its correctness checks must all hold, and the timing
/// bound must hold in at least one of a few rounds. Without fair queueing
/// the ratio is ~30x and fails every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_client_does_not_starve_a_normal_one() {
    let _serial = SERIAL.lock().await;
    let mut misses = Vec::new();
    for round in 1..=FLOOD_ROUNDS {
        match flood_round().await {
            Ok(ratio) => {
                eprintln!("fairness: round {round}: p99 ratio {ratio:.2} within 3x");
                return;
            }
            Err(miss) => {
                eprintln!("fairness: round {round}: {miss}");
                misses.push(miss);
            }
        }
    }
    panic!(
        "the timing bound failed in all {FLOOD_ROUNDS} rounds:\n{}",
        misses.join("\n")
    );
}

/// One round: a fresh daemon, the normal client's latencies without and
/// with the flood. Every correctness check is asserted; the timing checks
/// (the flooder's rate, the 3x bound) are returned as `Err` with the numbers.
async fn flood_round() -> Result<f64, String> {
    let daemon = Daemon::start(DaemonConfig::new().workers(2)).await;
    let expected = Expected::compute(&daemon, &[SHORT_TEXT.to_string()]).await;
    let mut normal = daemon.client().await;
    // Warm-up, then the baseline.
    for _ in 0..20 {
        normal
            .embed(vec![SHORT_TEXT.into()], None)
            .await
            .expect("warm-up");
    }
    let workers: Vec<u32> = daemon
        .status()
        .await
        .workers
        .iter()
        .map(|w| w.pid)
        .collect();
    let cpu0 = cpu_split(&daemon, &workers);
    let base_start = Instant::now();
    let base: Vec<Duration> = normal_client_latencies(&mut normal, &expected, None)
        .await
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let base_window = base_start.elapsed();
    let cpu1 = cpu_split(&daemon, &workers);

    let flooder = Flooder::start(daemon.socket_path());
    // The flood is on once the queue is (nearly) full and the daemon pushes
    // the flooder's requests back.
    let capacity = daemon.status().await.queue_capacity;
    let full = daemon
        .wait_for(|s| s.queue_depth + 8 >= capacity, Duration::from_secs(20))
        .await;
    let overloaded_before = flooder.overloaded.load(Ordering::SeqCst);
    let flood_ok_before = flooder.answered.load(Ordering::SeqCst) - overloaded_before;
    let cpu2 = cpu_split(&daemon, &workers);
    let flood_start = Instant::now();
    // The flooder's backlog (written, not yet answered): about the queue's
    // capacity while the supervisor keeps up; more means its frames wait
    // in the socket and in the connection-to-pool channel.
    let lag_stop = Arc::new(AtomicBool::new(false));
    let lag_task = {
        let (sent, answered, lag_stop) = (
            flooder.sent.clone(),
            flooder.answered.clone(),
            lag_stop.clone(),
        );
        tokio::spawn(async move {
            let mut lags = Vec::new();
            while !lag_stop.load(Ordering::SeqCst) {
                lags.push(
                    sent.load(Ordering::SeqCst)
                        .saturating_sub(answered.load(Ordering::SeqCst)),
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lags.sort();
            lags
        })
    };
    let flood_samples = normal_client_latencies(
        &mut normal,
        &expected,
        Some((&flooder.sent, &flooder.answered)),
    )
    .await;
    let flood: Vec<Duration> = flood_samples.iter().map(|(d, _)| *d).collect();
    lag_stop.store(true, Ordering::SeqCst);
    let lags = lag_task.await.expect("backlog sampler");
    let backlog = format!(
        "flooder backlog (written - answered) p50 {} p90 {} max {}",
        lags[lags.len() / 2],
        lags[lags.len() * 9 / 10],
        lags[lags.len() - 1]
    );
    let flood_window = flood_start.elapsed();
    let cpu3 = cpu_split(&daemon, &workers);
    let flood_ok_during = flooder.answered.load(Ordering::SeqCst)
        - flooder.overloaded.load(Ordering::SeqCst)
        - flood_ok_before;
    let (sent_during, rate_during) = flooder.sent();
    let overloaded_during = flooder.overloaded.load(Ordering::SeqCst) - overloaded_before;
    let queue_after = daemon.status().await;
    let (sent, elapsed, answers) = flooder.stop().await;
    let settled = daemon
        .wait_for(
            |s| s.queue_depth == 0 && s.workers.iter().all(|w| w.state == WorkerStateKind::Ready),
            Duration::from_secs(60),
        )
        .await;

    let (p50_base, p99_base) = (percentile(&base, 50.0), percentile(&base, 99.0));
    let (p50_flood, p99_flood) = (percentile(&flood, 50.0), percentile(&flood, 99.0));
    let ratio = p99_flood.as_secs_f64() / p99_base.as_secs_f64();
    eprintln!(
        "fairness: normal client without flood: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p50_base),
        ms(p99_base),
        ms(base[base.len() - 1])
    );
    eprintln!(
        "fairness: normal client during flood:  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         p99 ratio {ratio:.2} (p50 ratio {:.2})",
        ms(p50_flood),
        ms(p99_flood),
        ms(flood[flood.len() - 1]),
        p50_flood.as_secs_f64() / p50_base.as_secs_f64()
    );
    eprintln!(
        "fairness: flooder: {sent} frames in {:.2} s ({:.0}/s; {sent_during} by the end of the \
         measurement, {rate_during:.0}/s), answers ok {} overloaded {} other {}; {overloaded_during} \
         overloaded during the {:.2} s measurement; queue depth {} when the flood was on, {} after \
         the measurement",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        answers.ok,
        answers.overloaded,
        answers.other.len(),
        flood_window.as_secs_f64(),
        full.queue_depth,
        queue_after.queue_depth,
    );

    let cores = |a: [Duration; 3], b: [Duration; 3], window: Duration| {
        let w = window.as_secs_f64();
        [0, 1, 2].map(|i| (b[i] - a[i]).as_secs_f64() / w)
    };
    let [sup_b, wrk_b, test_b] = cores(cpu0, cpu1, base_window);
    let [sup_f, wrk_f, test_f] = cores(cpu2, cpu3, flood_window);
    // Mean time a worker spends on one request: 2 workers' time over the
    // requests they completed (the flooder's and the normal client's).
    let service_base = base_window.as_secs_f64() / NORMAL_REQUESTS as f64;
    let service_flood =
        2.0 * flood_window.as_secs_f64() / (flood_ok_during as f64 + NORMAL_REQUESTS as f64);
    eprintln!("fairness: {backlog}");
    eprintln!(
        "fairness: normal client during flood by the flooder's backlog: {}; {}",
        by_backlog(&flood_samples, 0..600),
        by_backlog(&flood_samples, 600..u64::MAX)
    );
    eprintln!(
        "fairness: CPU in cores (supervisor / workers / test process): without flood \
         {sup_b:.2} / {wrk_b:.2} / {test_b:.2}, during flood {sup_f:.2} / {wrk_f:.2} / {test_f:.2}"
    );
    eprintln!(
        "fairness: mean service time per request: {:.2} ms without flood (one client, sequential), \
         {:.2} ms during flood ({flood_ok_during} flooder + {NORMAL_REQUESTS} normal requests run \
         in {:.2} s on 2 workers); perfect turn-taking predicts a normal request waits at most one \
         service and runs one: p50 <= ~{:.1} ms, p99 <= ~{:.1} ms",
        service_base * 1e3,
        service_flood * 1e3,
        flood_window.as_secs_f64(),
        1.5 * service_flood * 1e3,
        2.0 * service_flood * 1e3,
    );

    // Every embed request the daemon got ends once: answered ok, failed, or
    // abandoned; and it was either accepted into the queue or rejected at
    // the door (the flooder's newcomers when it is the heaviest client).
    let c = &settled.counters;
    let embeds_sent = 1 + 20 + 2 * NORMAL_REQUESTS as u64 + sent;
    let failed: u64 = c.requests_failed.values().sum();
    let ended = c.requests_ok + failed + c.requests_abandoned;
    eprintln!(
        "fairness: counters: embeds sent {embeds_sent}, accepted {}, rejected {}, ok {}, \
         failed {:?}, abandoned {}",
        c.requests_accepted,
        c.requests_rejected,
        c.requests_ok,
        c.requests_failed,
        c.requests_abandoned,
    );
    assert_eq!(
        c.requests_accepted + c.requests_rejected,
        embeds_sent,
        "every embed request is accepted or rejected"
    );
    assert_eq!(ended, embeds_sent, "every embed request ends exactly once");
    assert_eq!(
        c.requests_ok,
        answers.ok + 1 + 20 + 2 * NORMAL_REQUESTS as u64,
        "the daemon's ok count matches the answers"
    );

    assert!(
        answers.other.is_empty(),
        "the flooder got answers other than embeddings or overloaded: {:?}",
        &answers.other[..answers.other.len().min(5)]
    );
    assert_eq!(
        answers.ok + answers.overloaded,
        sent,
        "every flooded request is answered exactly once"
    );
    if rate_during < FLOOD_RATE as f64 * 0.9 {
        return Err(format!(
            "the flooder pushed only {rate_during:.0} frames/s (aim {FLOOD_RATE})"
        ));
    }
    if overloaded_during == 0 {
        return Err("the queue was not kept full during the measurement".into());
    }
    if p99_flood.as_secs_f64() > 3.0 * p99_base.as_secs_f64() {
        return Err(format!(
            "the normal client's p99 went from {:.2} ms to {:.2} ms ({ratio:.1}x) under the \
             flood; {backlog}; CPU during the flood: supervisor {sup_f:.2}, workers {wrk_f:.2} \
             cores (a backlog far above the queue capacity means the supervisor was short of CPU)",
            ms(p99_base),
            ms(p99_flood)
        ));
    }
    Ok(ratio)
}

/// About 200 words: slow enough (about 250 tokens) that a few hundred of
/// them queue up behind two workers.
fn long_text() -> String {
    "The quick brown fox jumps over the lazy dog while the supervisor keeps its workers healthy. "
        .repeat(12)
}

fn sum<K>(map: &std::collections::BTreeMap<K, u64>) -> u64 {
    map.values().sum()
}

fn served(status: &PoolStatus) -> u64 {
    status.workers.iter().map(|w| w.requests_served).sum()
}

fn embed_frame(id: u64, text: &str) -> ClientMessage {
    ClientMessage::Embed {
        id,
        texts: vec![text.to_string()],
        deadline_ms: None,
    }
}

const LEAVERS: u64 = 300;
const LEAVER_TASKS: u64 = 20;
const HALF_CLOSE_REQUESTS: u64 = 3;

/// Counter deltas between two snapshots.
struct Deltas {
    accepted: u64,
    ok: u64,
    failed: u64,
    abandoned: u64,
    served: u64,
}

impl Deltas {
    fn between(before: &PoolStatus, after: &PoolStatus) -> Deltas {
        let (c0, c1): (&Counters, &Counters) = (&before.counters, &after.counters);
        Deltas {
            accepted: c1.requests_accepted - c0.requests_accepted,
            ok: c1.requests_ok - c0.requests_ok,
            failed: sum(&c1.requests_failed) - sum(&c0.requests_failed),
            abandoned: c1.requests_abandoned - c0.requests_abandoned,
            served: served(after) - served(before),
        }
    }
}

/// Waits until nothing is queued or running.
async fn quiet(daemon: &Daemon) -> PoolStatus {
    daemon
        .wait_for(
            |s| s.queue_depth == 0 && s.workers.iter().all(|w| w.state == WorkerStateKind::Ready),
            Duration::from_secs(120),
        )
        .await
}

/// Checks one phase: every leaver's request was run or abandoned, nothing
/// failed, the workers ran exactly what was answered ok, and at most a
/// handful of the leavers' requests ran.
fn check_phase(name: &str, d: &Deltas, others_ok: u64) {
    let leavers_run = d.ok - others_ok;
    eprintln!(
        "abandon ({name}): accepted {}, ok {} ({leavers_run} of the leavers' requests run + \
         {others_ok} others), failed {}, abandoned {}; workers served {}",
        d.accepted, d.ok, d.failed, d.abandoned, d.served
    );
    assert_eq!(
        d.accepted,
        LEAVERS + others_ok,
        "{name}: every request accepted"
    );
    assert_eq!(d.failed, 0, "{name}: nothing failed");
    assert_eq!(
        d.served, d.ok,
        "{name}: the workers ran exactly the requests answered ok"
    );
    assert_eq!(
        leavers_run + d.abandoned,
        LEAVERS,
        "{name}: each leaver's request was either run or abandoned"
    );
    assert!(
        d.abandoned >= 250,
        "{name}: only {} of {LEAVERS} requests of clients that left were dropped unrun",
        d.abandoned
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_clients_that_left_are_dropped_unrun() {
    let _serial = SERIAL.lock().await;
    // Room for all 300 in the queue, so none is refused at the door.
    let daemon = Daemon::start(DaemonConfig::new().workers(2).queue_capacity(512)).await;
    let text = long_text();
    let expected = Expected::compute(&daemon, std::slice::from_ref(&text)).await;
    let socket = daemon.socket_path().to_path_buf();
    let start = daemon.status().await;
    let pids: Vec<u32> = start.workers.iter().map(|w| w.pid).collect();

    // Phase 1: 300 clients each send one request and close at once, 20 at a
    // time, behind a client that half-closes: its requests occupy both
    // workers and one waits in the queue, and all of them are answered.
    let mut half = RawConn::connect(&socket).await;
    half.handshake().await;
    for id in 1..=HALF_CLOSE_REQUESTS {
        half.send(&embed_frame(id, &text)).await.expect("send");
    }
    half.shutdown_write()
        .await
        .expect("shutdown the write side");
    let burst_start = Instant::now();
    let leavers: Vec<_> = (0..LEAVER_TASKS)
        .map(|task| {
            let (socket, text) = (socket.clone(), text.clone());
            tokio::spawn(async move {
                for n in 0..LEAVERS / LEAVER_TASKS {
                    let mut raw = RawConn::connect(&socket).await;
                    raw.handshake().await;
                    raw.send(&embed_frame(task * 1000 + n, &text))
                        .await
                        .expect("send the request");
                    drop(raw);
                }
            })
        })
        .collect();
    for leaver in leavers {
        leaver.await.expect("leaver task");
    }
    let burst = burst_start.elapsed();
    let mut answered = Vec::new();
    for _ in 0..HALF_CLOSE_REQUESTS {
        let payload = half
            .read_frame()
            .await
            .expect("the half-closed client gets its answers");
        match decode_payload::<ServerMessage>(&payload).expect("a server message") {
            ServerMessage::Embeddings { id, result, .. } => {
                expected
                    .check(std::slice::from_ref(&text), &result)
                    .unwrap_or_else(|e| panic!("request {id}: {e}"));
                answered.push(id);
            }
            other => panic!("the half-closed client got {other:?}"),
        }
    }
    answered.sort();
    assert_eq!(answered, (1..=HALF_CLOSE_REQUESTS).collect::<Vec<_>>());
    half.expect_closed(Duration::from_secs(10)).await;
    let mid = quiet(&daemon).await;
    eprintln!(
        "abandon (send and close): {LEAVERS} leavers in {:.0} ms",
        ms(burst)
    );
    check_phase(
        "send and close",
        &Deltas::between(&start, &mid),
        HALF_CLOSE_REQUESTS,
    );

    // Phase 2: 300 clients send one request each and stay until the daemon
    // has accepted all of them (so they really wait in the queue behind
    // the workers), then all close.
    let hold_start = Instant::now();
    let mut held = Vec::new();
    for n in 0..LEAVERS {
        let mut raw = RawConn::connect(&socket).await;
        raw.handshake().await;
        raw.send(&embed_frame(n, &text))
            .await
            .expect("send the request");
        held.push(raw);
    }
    let queued = daemon
        .wait_for(
            |s| s.counters.requests_accepted - mid.counters.requests_accepted == LEAVERS,
            Duration::from_secs(30),
        )
        .await;
    let held_for = hold_start.elapsed();
    drop(held);
    let end = quiet(&daemon).await;
    eprintln!(
        "abandon (queued, then closed): {LEAVERS} clients held for {:.0} ms; queue depth {} \
         when all were accepted",
        ms(held_for),
        queued.queue_depth
    );
    assert!(
        queued.queue_depth >= 250,
        "the requests were queued before their clients left: {}",
        queued.queue_depth
    );
    check_phase("queued, then closed", &Deltas::between(&mid, &end), 0);

    let c = &end.counters;
    eprintln!(
        "abandon: all-time counters: accepted {}, ok {}, failed {:?}, abandoned {}",
        c.requests_accepted, c.requests_ok, c.requests_failed, c.requests_abandoned
    );
    assert_eq!(
        c.requests_accepted + c.requests_rejected,
        c.requests_ok + sum(&c.requests_failed) + c.requests_abandoned,
        "accepted + rejected == ok + failed + abandoned once nothing is queued or running"
    );
    assert_eq!(
        end.workers.iter().map(|w| w.pid).collect::<Vec<_>>(),
        pids,
        "the same workers throughout"
    );
}
