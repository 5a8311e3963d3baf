//! The inferd worker: one process, one model, one request at a time.
//!
//! The supervisor execs `inferd-worker --fd N` with one end of a socketpair
//! as fd N. The worker greets, then waits for [`WorkerCommand::Start`]: it
//! allocates nothing big before that frame, so the supervisor can first move
//! it into its own memory cgroup (pages stay charged to the cgroup they were
//! allocated in). It then loads the engine, runs one warm-up inference
//! (`warm_up`, on by default), reports `Ready` (or `LoadFailed` and exits 1
//! when either fails), and answers `Embed` commands one by one until `Shutdown` or
//! EOF, both of which end it with status 0. It dies with the supervisor
//! through `PR_SET_PDEATHSIG`, set by the supervisor before exec.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use inferd_engine::{Engine, EngineConfig};
use inferd_proto::{
    error_chain, ChaosOptions, Connection, EmbedResult, ProtoError, RequestError, Token,
    TokenizeResult, WorkerCommand, WorkerConfig, WorkerEvent, DEFAULT_MAX_FRAME_BYTES,
};
use tokio::net::UnixStream;
use tracing::{debug, error, info, info_span, warn, Instrument};

/// The worker's side of the supervisor connection.
type SupervisorConnection = Connection<UnixStream, WorkerEvent, WorkerCommand>;

/// Why the worker stopped other than by being told to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The inherited fd is not a usable socket.
    #[error("cannot use fd {fd} as the supervisor socket")]
    AdoptSocket {
        /// The fd number from `--fd`.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The hello exchange with the supervisor failed.
    #[error("handshake with the supervisor failed")]
    Handshake(#[source] ProtoError),
    /// Reading the next command failed.
    #[error("receiving a command from the supervisor failed")]
    ReceiveCommand(#[source] ProtoError),
    /// Writing an event failed.
    #[error("sending an event to the supervisor failed")]
    SendEvent(#[source] ProtoError),
    /// The supervisor sent something out of sequence.
    #[error("unexpected command: expected {expected}, got {received}")]
    UnexpectedCommand {
        /// What the protocol step expects.
        expected: &'static str,
        /// What arrived.
        received: String,
    },
    /// The model or tokenizer could not be loaded.
    #[error("loading the model failed: {0}")]
    Load(#[source] inferd_engine::EngineError),
    /// The model loaded but could not run the warm-up inference.
    #[error("the warm-up inference failed")]
    WarmUp,
}

/// Takes ownership of the inherited socket `fd` and serves on it.
///
/// # Safety
/// `fd` must be an open socket that nothing else in this process owns.
pub unsafe fn adopt_socket(fd: RawFd) -> Result<UnixStream, WorkerError> {
    // SAFETY: the caller guarantees `fd` is open and unowned.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let std_stream = std::os::unix::net::UnixStream::from(owned);
    std_stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(std_stream))
        .map_err(|source| WorkerError::AdoptSocket { fd, source })
}

/// Runs the whole worker protocol on `stream`. Returns `Ok` when told to
/// shut down or when the supervisor closed the socket.
pub async fn serve(stream: UnixStream) -> Result<(), WorkerError> {
    let mut conn = SupervisorConnection::new(stream, DEFAULT_MAX_FRAME_BYTES);
    conn.handshake("inferd-worker")
        .await
        .map_err(WorkerError::Handshake)?;
    let config = match conn.recv().await.map_err(WorkerError::ReceiveCommand)? {
        Some(WorkerCommand::Start(config)) => config,
        None => return Ok(()),
        Some(other) => {
            return Err(WorkerError::UnexpectedCommand {
                expected: "Start",
                received: format!("{other:?}"),
            })
        }
    };
    // Requests within the configured limits can be larger than the
    // default frame limit: the supervisor says what the link must carry.
    conn.set_max_frame_bytes(config.max_frame_bytes);
    let span = info_span!(
        "worker",
        worker_id = config.worker_id,
        pid = std::process::id()
    );
    serve_started(conn, config).instrument(span).await
}

async fn serve_started(
    mut conn: SupervisorConnection,
    config: WorkerConfig,
) -> Result<(), WorkerError> {
    if let Some(chaos) = config.chaos.describe() {
        warn!(%chaos, "test-only [chaos] options are on: this worker misbehaves on purpose");
    }
    let started = Instant::now();
    let engine = match Engine::load(&engine_config(&config)) {
        Ok(engine) => engine,
        Err(err) => {
            let reason = error_chain(&err);
            error!(%reason, "model load failed");
            // Best effort: the supervisor also sees our exit status.
            let _ = conn.send(&WorkerEvent::LoadFailed { reason }).await;
            return Err(WorkerError::Load(err));
        }
    };
    let load_ms = started.elapsed().as_millis() as u64;
    info!(
        model = engine.model_name(),
        dims = engine.dims(),
        load_ms,
        "model loaded"
    );
    if config.warm_up {
        if let Err(reason) = warm_up(&engine) {
            error!(%reason, "warm-up inference failed");
            let _ = conn.send(&WorkerEvent::LoadFailed { reason }).await;
            return Err(WorkerError::WarmUp);
        }
    }
    let ready = WorkerEvent::Ready {
        model: engine.model_name().to_owned(),
        dims: engine.dims() as u32,
        load_ms,
    };
    conn.send(&ready).await.map_err(WorkerError::SendEvent)?;

    let mut leaked = Vec::new();
    loop {
        match conn.recv().await.map_err(WorkerError::ReceiveCommand)? {
            Some(WorkerCommand::Embed { request_id, texts }) => {
                let event = embed(&engine, &config, request_id, &texts, &mut leaked);
                // Before the answer: the supervisor reads this worker's
                // memory when the answer arrives, and must see what is
                // live, not the request's peak (a peak read as growth
                // could look like a leak).
                if config.trim_memory && tokens_in(&event) >= TRIM_AFTER_TOKENS {
                    trim_freed_memory();
                }
                conn.send(&event).await.map_err(WorkerError::SendEvent)?;
            }
            Some(WorkerCommand::Tokenize { request_id, texts }) => {
                let event = tokenize(&engine, &config, request_id, &texts, &mut leaked);
                conn.send(&event).await.map_err(WorkerError::SendEvent)?;
            }
            Some(WorkerCommand::Shutdown) => {
                info!("shutdown requested");
                return Ok(());
            }
            None => {
                info!("supervisor closed the socket");
                return Ok(());
            }
            Some(other @ WorkerCommand::Start(_)) => {
                return Err(WorkerError::UnexpectedCommand {
                    expected: "Embed, Tokenize or Shutdown",
                    received: format!("{other:?}"),
                })
            }
        }
    }
}

fn engine_config(config: &WorkerConfig) -> EngineConfig {
    let mut engine = EngineConfig::new(config.model_path.clone(), config.tokenizer_path.clone());
    engine.max_seq_len = config.max_seq_len;
    engine.normalize = config.normalize;
    engine
}

/// Embeds `texts` in runs of at most `per_run` texts (0: all at once), so
/// the model's activation memory for one request is bounded; each text's
/// vector does not depend on which run it is in.
fn embed_in_runs(
    engine: &Engine,
    texts: &[String],
    per_run: usize,
) -> Result<inferd_engine::Embeddings, inferd_engine::EngineError> {
    if per_run == 0 || texts.len() <= per_run {
        return engine.embed(texts);
    }
    let mut all = inferd_engine::Embeddings {
        vectors: Vec::with_capacity(texts.len()),
        token_counts: Vec::with_capacity(texts.len()),
        truncated: Vec::with_capacity(texts.len()),
    };
    for run in texts.chunks(per_run) {
        let out = engine.embed(run)?;
        all.vectors.extend(out.vectors);
        all.token_counts.extend(out.token_counts);
        all.truncated.extend(out.truncated);
    }
    Ok(all)
}

/// A request of at least this many tokens is followed by a trim.
const TRIM_AFTER_TOKENS: u64 = 1024;

/// Tokens the model ran for an answered embed request.
fn tokens_in(event: &WorkerEvent) -> u64 {
    match event {
        WorkerEvent::Embedded { result, .. } => {
            result.token_counts.iter().map(|&n| u64::from(n)).sum()
        }
        _ => 0,
    }
}

/// Hands the pages glibc's allocator keeps after a large request back to
/// the system: without it, one large request leaves the worker's RSS high
/// for good (freed arena memory is kept for reuse), which a memory limit
/// cannot tell from a leak. Done before the answer is sent, so that the
/// supervisor's reading after the answer sees the trimmed figure; on a
/// request of 1024 tokens or more the trim's cost (logged at debug level)
/// is small next to the request's own time.
fn trim_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = Instant::now();
        // SAFETY: malloc_trim only releases free memory of the allocator's
        // own arenas; it has no preconditions.
        let released = unsafe { libc::malloc_trim(0) };
        debug!(
            released = released != 0,
            elapsed_us = started.elapsed().as_micros() as u64,
            "freed memory returned to the system"
        );
    }
}

/// Text of the warm-up inference.
const WARM_UP_TEXT: &str = "inferd warms up this worker before it takes requests.";

/// Runs the model once on a short text, so the first request is not the
/// plan's first run; the error, in words, if it cannot run.
fn warm_up(engine: &Engine) -> Result<(), String> {
    let started = Instant::now();
    let out = engine
        .embed(&[WARM_UP_TEXT.to_owned()])
        .map_err(|err| format!("the warm-up inference failed: {}", error_chain(&err)))?;
    if out.vectors.len() != 1 || out.vectors[0].iter().any(|v| !v.is_finite()) {
        return Err("the warm-up inference gave no finite vector".into());
    }
    info!(
        warm_up_us = started.elapsed().as_micros() as u64,
        "warm-up inference done"
    );
    Ok(())
}

/// Runs one request; every failure becomes a `Rejected` event, never a crash.
fn embed(
    engine: &Engine,
    config: &WorkerConfig,
    request_id: u64,
    texts: &[String],
    leaked: &mut Vec<Vec<u8>>,
) -> WorkerEvent {
    if let Some(refusal) = admit(config, request_id, texts, leaked) {
        return refusal;
    }
    let started = Instant::now();
    match embed_in_runs(engine, texts, config.max_batch_texts) {
        Ok(out) => {
            debug!(
                request_id,
                texts = texts.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "embedded"
            );
            WorkerEvent::Embedded {
                request_id,
                result: EmbedResult {
                    model: engine.model_name().to_owned(),
                    dims: engine.dims() as u32,
                    embeddings: out.vectors,
                    truncated: out.truncated,
                    token_counts: out.token_counts.into_iter().map(|n| n as u32).collect(),
                },
            }
        }
        Err(err) => {
            error!(request_id, error = %error_chain(&err), "inference failed");
            WorkerEvent::Rejected {
                request_id,
                error: RequestError::Internal {
                    message: format!("inference failed: {}", error_chain(&err)),
                },
            }
        }
    }
}

/// What every request goes through first: the chaos options (tests), then
/// the request limits; `Some` is the refusal to send instead of an answer.
fn admit(
    config: &WorkerConfig,
    request_id: u64,
    texts: &[String],
    leaked: &mut Vec<Vec<u8>>,
) -> Option<WorkerEvent> {
    apply_chaos(&config.chaos, texts, leaked);
    config
        .limits
        .check(texts)
        .err()
        .map(|error| WorkerEvent::Rejected { request_id, error })
}

/// Tokenizes one request as `embed` would; failures become `Rejected`.
fn tokenize(
    engine: &Engine,
    config: &WorkerConfig,
    request_id: u64,
    texts: &[String],
    leaked: &mut Vec<Vec<u8>>,
) -> WorkerEvent {
    if let Some(refusal) = admit(config, request_id, texts, leaked) {
        return refusal;
    }
    let tokens: Result<Vec<Vec<Token>>, _> = texts
        .iter()
        .map(|text| {
            engine
                .tokenize(text)
                .map(|encoding| tokens_of(text, &encoding))
        })
        .collect();
    match tokens {
        Ok(tokens) => WorkerEvent::Tokenized {
            request_id,
            result: TokenizeResult { tokens },
        },
        Err(err) => WorkerEvent::Rejected {
            request_id,
            error: RequestError::Internal {
                message: format!("tokenization failed: {}", error_chain(&err)),
            },
        },
    }
}

/// The tokens of `encoding`, with the text each covers in `text`.
fn tokens_of(text: &str, encoding: &inferd_engine::Encoding) -> Vec<Token> {
    let special = encoding.get_special_tokens_mask();
    encoding
        .get_ids()
        .iter()
        .zip(encoding.get_tokens())
        .zip(encoding.get_offsets())
        .enumerate()
        .map(|(i, ((&id, token), &(start, stop)))| {
            if special.get(i).is_some_and(|&s| s == 1) {
                return Token {
                    id,
                    text: token.clone(),
                    special: true,
                    start: None,
                    stop: None,
                };
            }
            Token {
                id,
                // Offsets are byte offsets into the text; `get` keeps a
                // tokenizer's odd offset from panicking.
                text: text.get(start..stop).unwrap_or(token).to_owned(),
                special: false,
                start: u32::try_from(start).ok(),
                stop: u32::try_from(stop).ok(),
            }
        })
        .collect()
}

/// Test-only behaviours, off unless the supervisor's config enables them.
/// `leaked` holds the simulated leak for the life of the process.
fn apply_chaos(chaos: &ChaosOptions, texts: &[String], leaked: &mut Vec<Vec<u8>>) {
    let has = |marker: &Option<String>| marker.as_ref().is_some_and(|m| texts.contains(m));
    if has(&chaos.crash_marker) {
        error!("chaos: crash marker received, aborting");
        std::process::abort();
    }
    if has(&chaos.hang_marker) {
        error!("chaos: hang marker received, hanging");
        loop {
            std::thread::park();
        }
    }
    if chaos.leak_bytes_per_request > 0 {
        // Non-zero bytes: zero pages could stay shared and not count as RSS.
        leaked.push(vec![0xA5; chaos.leak_bytes_per_request as usize]);
    }
}
