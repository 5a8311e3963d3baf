//! Well-behaved clients running in the background while a test does
//! something nasty, with every answer checked against expected vectors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_client::Client;
use inferd_proto::EmbedResult;
use tokio::task::JoinHandle;

use crate::daemon::{Daemon, POLL_INTERVAL};
use crate::fixtures::max_abs_diff;

/// Largest accepted difference between an answer and its expected vector.
pub const TOLERANCE: f32 = 1e-4;

/// Expected embedding per text, computed once through the daemon.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The texts, in the order given.
    texts: Arc<Vec<String>>,
    /// Text → vector.
    vectors: Arc<HashMap<String, Vec<f32>>>,
}

impl Expected {
    /// Embeds each text alone through `daemon` and remembers the vectors.
    pub async fn compute(daemon: &Daemon, texts: &[String]) -> Expected {
        let mut client = daemon.client().await;
        let mut vectors = HashMap::new();
        for text in texts {
            let result = client
                .embed(vec![text.clone()], None)
                .await
                .unwrap_or_else(|e| panic!("embedding {text:?} for the expectations failed: {e}"));
            assert_eq!(result.embeddings.len(), 1, "one vector per text");
            vectors.insert(text.clone(), result.embeddings[0].clone());
        }
        Expected {
            texts: Arc::new(texts.to_vec()),
            vectors: Arc::new(vectors),
        }
    }

    /// The texts, in the order given to [`Expected::compute`].
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// The expected vector of `text`; panics for a text not computed.
    pub fn vector(&self, text: &str) -> &[f32] {
        self.vectors
            .get(text)
            .unwrap_or_else(|| panic!("no expected vector for {text:?}"))
    }

    /// Checks that `result` answers `texts` with the expected vectors.
    pub fn check(&self, texts: &[String], result: &EmbedResult) -> Result<(), String> {
        if result.embeddings.len() != texts.len() {
            return Err(format!(
                "{} vectors for {} texts",
                result.embeddings.len(),
                texts.len()
            ));
        }
        for (text, got) in texts.iter().zip(&result.embeddings) {
            let diff = max_abs_diff(got, self.vector(text));
            if diff > TOLERANCE {
                return Err(format!(
                    "vector for {:?} differs by {diff} (> {TOLERANCE})",
                    preview(text)
                ));
            }
        }
        Ok(())
    }
}

/// The first 40 characters of a text, for messages.
fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}

/// What the background clients saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered with the expected vectors.
    pub ok: u64,
    /// Every failure, in words.
    pub errors: Vec<String>,
}

/// A few clients sending one-text requests in a loop until stopped.
#[derive(Debug)]
pub struct BackgroundLoad {
    /// Tells the clients to finish their current request and stop.
    stop: Arc<AtomicBool>,
    /// Requests answered correctly so far, over all clients.
    ok: Arc<AtomicU64>,
    /// One task per client; each returns its errors.
    tasks: Vec<JoinHandle<Vec<String>>>,
}

impl BackgroundLoad {
    /// Starts `clients` clients on `socket`, cycling through
    /// `expected.texts()` and checking every answer.
    pub fn start(socket: &Path, clients: usize, expected: &Expected) -> BackgroundLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|n| {
                tokio::spawn(client_loop(
                    socket.to_path_buf(),
                    n,
                    expected.clone(),
                    stop.clone(),
                    ok.clone(),
                ))
            })
            .collect();
        BackgroundLoad { stop, ok, tasks }
    }

    /// Requests answered correctly so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `more` further requests have been answered
    /// correctly; panics at `timeout`.
    pub async fn wait_progress(&self, more: u64, timeout: Duration) {
        let target = self.ok() + more;
        let deadline = Instant::now() + timeout;
        while self.ok() < target {
            if Instant::now() >= deadline {
                panic!(
                    "background clients made no progress: {} of {target} answers within {timeout:?}",
                    self.ok()
                );
            }
            tokio::time::sleep(POLL_INTERVAL.min(Duration::from_millis(5))).await;
        }
    }

    /// Stops the clients after their current request and reports.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut errors = Vec::new();
        for task in self.tasks {
            match task.await {
                Ok(errs) => errors.extend(errs),
                Err(e) => errors.push(format!("client task failed: {e}")),
            }
        }
        LoadReport {
            ok: self.ok.load(Ordering::SeqCst),
            errors,
        }
    }
}

async fn client_loop(
    socket: PathBuf,
    n: usize,
    expected: Expected,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut client: Option<Client> = None;
    let texts = expected.texts().to_vec();
    let mut i = n;
    while !stop.load(Ordering::SeqCst) {
        let conn = match client.as_mut() {
            Some(c) => c,
            None => match Client::connect_as(&socket, "inferd-tests-load").await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    errors.push(format!("client {n}: connect: {e}"));
                    tokio::time::sleep(POLL_INTERVAL).await;
                    continue;
                }
            },
        };
        let batch = vec![texts[i % texts.len()].clone()];
        i += 1;
        match conn.embed(batch.clone(), None).await {
            Ok(result) => match expected.check(&batch, &result) {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => errors.push(format!("client {n}: wrong answer: {e}")),
            },
            Err(e) => {
                errors.push(format!("client {n}: request failed: {e}"));
                // The connection may be unusable now; start a fresh one.
                client = None;
            }
        }
    }
    errors
}
