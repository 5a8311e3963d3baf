//! The client load: each client sends embed requests back to back over its
//! own connection and logs every success and failure, by request kind.
//!
//! `--traffic short` sends one short sentence per request. `--traffic mixed`
//! walks each client through [`MIXED_CYCLE`]: mostly short requests, some
//! one-text requests long enough to reach the model's 256-token truncation,
//! and a full batch of such texts, so one run loads the workers the way a
//! real mix would (long inputs are what make a worker's memory peak).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_client::{Client, ClientError};
use serde::Serialize;

use crate::scenario::CONNECT_TIMEOUT;

/// Short sentences the clients rotate through.
const TEXTS: [&str; 8] = [
    "A man is eating food.",
    "A woman is playing the violin.",
    "The new movie is awesome.",
    "Two dogs run across a snowy field.",
    "The stock market fell sharply on Monday.",
    "Can you recommend a good book on Rust?",
    "It will rain in the afternoon.",
    "The train to Lyon leaves at nine.",
];

/// English prose of about 1,500 characters: well over 256 WordPiece tokens,
/// so the model truncates it and every long request costs a full sequence.
const LONG_TEXT: &str = "The harbour town woke slowly on winter mornings. \
Before the sun had cleared the hills, the fishing boats were already coming back, \
their decks crowded with crates of cod and mackerel, and the gulls followed them \
in wide, noisy circles. On the quay, the auctioneer tested his bell while the \
buyers from the restaurants in the city compared prices on their phones and \
complained about the cold. Behind them, the bakery opened its shutters, and the \
smell of fresh bread drifted over the water. Most of the people who lived there \
had never thought of leaving. Their grandparents had mended nets on the same \
stones, and their children learned to tie knots before they learned to read. \
Yet every year a few young people took the early train to the capital, promising \
to come back for the summer festival, and every year fewer of them kept that \
promise. The mayor, a patient woman who had once been a schoolteacher, believed \
that the town could survive only if it found new work for the next generation. \
She persuaded the council to repair the old cannery and rent it to a small \
company that built sensors for weather stations. At first the fishermen laughed \
at the engineers, who wore thin jackets and got seasick on the ferry, but within \
two years the cannery employed forty people, the school had opened a second \
class, and the bakery had started selling sandwiches at lunchtime. When a \
journalist asked the mayor how she had done it, she said that she had simply \
listened to everyone, written down what they needed, and refused to give up \
when the first three banks said no. The journalist wrote that it sounded easy, \
and she answered that it was not.";

/// Texts in a batch request: the daemon's default `max_texts`.
const BATCH_TEXTS: usize = 64;

/// What the clients send (`--traffic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Traffic {
    /// One short sentence per request.
    Short,
    /// Per 20 requests: 16 short, 3 with one ~256-token text, 1 batch of 64
    /// such texts.
    Mixed,
}

impl Traffic {
    /// The kind of a client's `n`th request.
    pub(crate) fn kind_at(self, n: usize) -> RequestKind {
        match self {
            Traffic::Short => RequestKind::Short,
            Traffic::Mixed => MIXED_CYCLE[n % MIXED_CYCLE.len()],
        }
    }

    /// The load in words, for the report.
    pub(crate) fn describe(self) -> String {
        match self {
            Traffic::Short => "one short text per request".to_owned(),
            Traffic::Mixed => {
                let count = |kind| MIXED_CYCLE.iter().filter(|k| **k == kind).count();
                format!(
                    "mixed: per {} requests, {} short, {} long (one ~256-token text), {} batch ({BATCH_TEXTS} long texts)",
                    MIXED_CYCLE.len(),
                    count(RequestKind::Short),
                    count(RequestKind::Long),
                    count(RequestKind::Batch)
                )
            }
        }
    }
}

/// One request of `--traffic mixed`, in order; each client starts at its own
/// offset. The long and batch requests are spread out so that the clients'
/// expensive requests rarely line up.
const MIXED_CYCLE: [RequestKind; 20] = {
    use RequestKind::{Batch as B, Long as L, Short as S};
    [S, S, S, S, S, L, S, S, S, S, S, L, S, S, S, S, S, L, S, B]
};

/// The shape of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RequestKind {
    /// One short sentence.
    Short,
    /// One text past the model's 256-token truncation.
    Long,
    /// [`BATCH_TEXTS`] long texts.
    Batch,
}

impl RequestKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RequestKind::Short => "short",
            RequestKind::Long => "long",
            RequestKind::Batch => "batch",
        }
    }

    /// The texts of a client's `n`th request. Long texts are numbered so
    /// that no two in a batch are equal (nothing could answer them from one
    /// result).
    pub(crate) fn texts(self, n: usize) -> Vec<String> {
        match self {
            RequestKind::Short => vec![TEXTS[n % TEXTS.len()].to_owned()],
            RequestKind::Long => vec![long_text(n)],
            RequestKind::Batch => (0..BATCH_TEXTS).map(|i| long_text(n + i)).collect(),
        }
    }
}

/// The long text, numbered.
pub(crate) fn long_text(n: usize) -> String {
    format!("{n}. {LONG_TEXT}")
}

/// What one client (or all of them, merged) saw.
#[derive(Debug, Default)]
pub(crate) struct LoadLog {
    /// Outcomes by request kind.
    pub(crate) by_kind: BTreeMap<RequestKind, KindLog>,
    /// Every failure, in the order seen.
    pub(crate) failures: Vec<Failure>,
}

/// The outcomes of one request kind.
#[derive(Debug, Default)]
pub(crate) struct KindLog {
    /// Requests answered with embeddings.
    pub(crate) ok: u64,
    /// Requests that failed (connection failures before a request are only
    /// in [`LoadLog::failures`]).
    pub(crate) failed: u64,
    /// Latency of each successful request, milliseconds.
    pub(crate) latencies_ms: Vec<f64>,
}

impl LoadLog {
    pub(crate) fn absorb(&mut self, other: LoadLog) {
        for (kind, log) in other.by_kind {
            let mine = self.by_kind.entry(kind).or_default();
            mine.ok += log.ok;
            mine.failed += log.failed;
            mine.latencies_ms.extend(log.latencies_ms);
        }
        self.failures.extend(other.failures);
    }

    /// Requests answered with embeddings, all kinds.
    pub(crate) fn ok(&self) -> u64 {
        self.by_kind.values().map(|k| k.ok).sum()
    }
}

/// One failed request or connection attempt.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// Seconds since the load started.
    pub(crate) t_s: f64,
    /// Client index.
    pub(crate) client: usize,
    /// The request that failed; `None` for a connection failure.
    pub(crate) request: Option<RequestKind>,
    /// The daemon's error kind, or the client-side failure kind.
    pub(crate) kind: String,
    /// The full error text.
    pub(crate) error: String,
}

/// Sends requests back to back until `end` or `stop`; every await is bounded.
pub(crate) async fn client_loop(
    index: usize,
    socket: PathBuf,
    start: Instant,
    end: Instant,
    request_timeout: Duration,
    traffic: Traffic,
    stop: Arc<AtomicBool>,
) -> LoadLog {
    let mut log = LoadLog::default();
    let mut connection: Option<Client> = None;
    // Each client starts at its own place in the texts and the mixed cycle.
    let mut next_request = index * 7;
    let fail = |log: &mut LoadLog, request: Option<RequestKind>, kind: &str, error: String| {
        if let Some(request) = request {
            log.by_kind.entry(request).or_default().failed += 1;
        }
        log.failures.push(Failure {
            t_s: start.elapsed().as_secs_f64(),
            client: index,
            request,
            kind: kind.to_owned(),
            error,
        });
    };
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let client = match connection.as_mut() {
            Some(client) => client,
            None => match tokio::time::timeout(
                CONNECT_TIMEOUT,
                Client::connect_as(&socket, "inferd-leak-bench"),
            )
            .await
            {
                Ok(Ok(client)) => connection.insert(client),
                Ok(Err(err)) => {
                    fail(&mut log, None, client_error_kind(&err), err.to_string());
                    pause_before_retry(end).await;
                    continue;
                }
                Err(_) => {
                    fail(
                        &mut log,
                        None,
                        "connect_timeout",
                        format!("no connection within {CONNECT_TIMEOUT:?}"),
                    );
                    continue;
                }
            },
        };
        let request = traffic.kind_at(next_request);
        let texts = request.texts(next_request);
        next_request += 1;
        let sent = Instant::now();
        match tokio::time::timeout(request_timeout, client.embed(texts, None)).await {
            Ok(Ok(_)) => {
                let kind = log.by_kind.entry(request).or_default();
                kind.ok += 1;
                kind.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok(Err(err)) => {
                fail(
                    &mut log,
                    Some(request),
                    client_error_kind(&err),
                    err.to_string(),
                );
                if !err.is_request_error() {
                    connection = None;
                }
                pause_before_retry(end).await;
            }
            Err(_) => {
                // The answer may still come; the connection is out of step.
                fail(
                    &mut log,
                    Some(request),
                    "client_timeout",
                    format!("no answer within {request_timeout:?}"),
                );
                connection = None;
            }
        }
    }
    log
}

/// A short pause after a failure so a broken daemon is not hammered (and the
/// failure log stays a readable size); never past `end`.
async fn pause_before_retry(end: Instant) {
    let pause = Duration::from_millis(100).min(end.saturating_duration_since(Instant::now()));
    tokio::time::sleep(pause).await;
}

/// The failure kind: the daemon's own kind for typed errors, else what broke.
fn client_error_kind(err: &ClientError) -> &'static str {
    match err {
        ClientError::Request(request) => request.kind().as_str(),
        ClientError::Connect { .. } => "connect",
        ClientError::Handshake(_) => "handshake",
        ClientError::Send(_) => "send",
        ClientError::Receive(_) => "receive",
        ClientError::Closed => "closed",
        ClientError::UnexpectedResponse { .. } => "unexpected_response",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_cycle_is_16_short_3_long_1_batch() {
        let kinds: Vec<RequestKind> = (0..MIXED_CYCLE.len() * 5)
            .map(|n| Traffic::Mixed.kind_at(n))
            .collect();
        let count = |kind| kinds.iter().filter(|k| **k == kind).count();
        assert_eq!(
            [
                count(RequestKind::Short),
                count(RequestKind::Long),
                count(RequestKind::Batch)
            ],
            [16 * 5, 3 * 5, 5]
        );
        // Any 20 requests in a row, wherever a client starts, hold one batch.
        for offset in 0..MIXED_CYCLE.len() {
            let window = (offset..offset + 20).map(|n| Traffic::Mixed.kind_at(n));
            assert_eq!(window.filter(|k| *k == RequestKind::Batch).count(), 1);
        }
        assert!((0..40).all(|n| Traffic::Short.kind_at(n) == RequestKind::Short));
        assert_eq!(
            Traffic::Mixed.describe(),
            "mixed: per 20 requests, 16 short, 3 long (one ~256-token text), 1 batch (64 long texts)"
        );
    }

    #[test]
    fn request_texts_have_the_right_shape() {
        assert_eq!(RequestKind::Short.texts(9), [TEXTS[1]]);
        let long = RequestKind::Long.texts(3);
        assert_eq!(long.len(), 1);
        assert!(long[0].len() >= 1400, "{} characters", long[0].len());
        let batch = RequestKind::Batch.texts(0);
        assert_eq!(batch.len(), BATCH_TEXTS);
        let distinct: std::collections::BTreeSet<&String> = batch.iter().collect();
        assert_eq!(distinct.len(), BATCH_TEXTS);
        assert!(batch.iter().all(|t| t.len() > 1400));
    }

    #[test]
    fn logs_merge_by_kind() {
        let mut all = LoadLog::default();
        for ok in [2, 3] {
            let mut log = LoadLog::default();
            let short = log.by_kind.entry(RequestKind::Short).or_default();
            short.ok = ok;
            short.latencies_ms = vec![1.0; ok as usize];
            log.by_kind.entry(RequestKind::Batch).or_default().failed = 1;
            all.absorb(log);
        }
        assert_eq!(all.ok(), 5);
        assert_eq!(all.by_kind[&RequestKind::Short].latencies_ms.len(), 5);
        assert_eq!(all.by_kind[&RequestKind::Batch].failed, 2);
    }
}
