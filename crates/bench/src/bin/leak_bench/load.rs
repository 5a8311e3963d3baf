//! The client load: each client sends one-text embed requests back to back
//! over its own connection and logs every success and failure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_client::{Client, ClientError};

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

/// What one client (or all of them, merged) saw.
#[derive(Debug, Default)]
pub(crate) struct LoadLog {
    /// Requests answered with embeddings.
    pub(crate) ok: u64,
    /// Latency of each successful request, milliseconds.
    pub(crate) latencies_ms: Vec<f64>,
    /// Every failure, in the order seen.
    pub(crate) failures: Vec<Failure>,
}

impl LoadLog {
    pub(crate) fn absorb(&mut self, other: LoadLog) {
        self.ok += other.ok;
        self.latencies_ms.extend(other.latencies_ms);
        self.failures.extend(other.failures);
    }
}

/// One failed request or connection attempt.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// Seconds since the load started.
    pub(crate) t_s: f64,
    /// Client index.
    pub(crate) client: usize,
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
    stop: Arc<AtomicBool>,
) -> LoadLog {
    let mut log = LoadLog::default();
    let mut connection: Option<Client> = None;
    let mut next_text = index;
    let fail = |log: &mut LoadLog, kind: &str, error: String| {
        log.failures.push(Failure {
            t_s: start.elapsed().as_secs_f64(),
            client: index,
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
                    fail(&mut log, client_error_kind(&err), err.to_string());
                    pause_before_retry(end).await;
                    continue;
                }
                Err(_) => {
                    fail(
                        &mut log,
                        "connect_timeout",
                        format!("no connection within {CONNECT_TIMEOUT:?}"),
                    );
                    continue;
                }
            },
        };
        let text = TEXTS[next_text % TEXTS.len()];
        next_text += 1;
        let sent = Instant::now();
        match tokio::time::timeout(request_timeout, client.embed(vec![text.to_owned()], None)).await
        {
            Ok(Ok(_)) => {
                log.ok += 1;
                log.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            Ok(Err(err)) => {
                fail(&mut log, client_error_kind(&err), err.to_string());
                if !err.is_request_error() {
                    connection = None;
                }
                pause_before_retry(end).await;
            }
            Err(_) => {
                // The answer may still come; the connection is out of step.
                fail(
                    &mut log,
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
