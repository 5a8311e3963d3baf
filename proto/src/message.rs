//! Message types of both families: client ⇄ supervisor and supervisor ⇄ worker.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{
    bounded, ErrorKind, ExitKind, RecycleStage, RecycleTrigger, RefusalReason, WorkerStateKind,
    PROTOCOL_VERSION,
};

/// Most texts one embed request may carry on the wire, in
/// [`ClientMessage::Embed`] and [`WorkerCommand::Embed`], and so most entries
/// in each per-text list of an [`EmbedResult`]. A decoder refuses a longer
/// list as soon as it reads the declared count, before allocating for it.
///
/// It is a hard bound on what a peer can make a decoder hold (each text costs
/// 24 bytes of `String` even when it is empty, 1 byte on the wire), not the
/// operator's limit: [`RequestLimits::max_texts`] should be at most this.
pub const MAX_TEXTS_PER_REQUEST: usize = 4096;

/// First frame in both directions on every connection. Its layout is frozen so
/// that any two versions can tell each other apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Free-form sender description (program and version), for logs.
    pub software: String,
}

impl Hello {
    /// A hello for this build, naming the sending program.
    pub fn new(program: &str) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            software: format!("{program} {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Client → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Embed `texts` as one batch.
    Embed {
        /// Client-chosen id, echoed in the answer.
        id: u64,
        /// The texts; one vector comes back per text, in order. At most
        /// [`MAX_TEXTS_PER_REQUEST`], or the frame does not decode.
        #[serde(deserialize_with = "bounded::texts")]
        texts: Vec<String>,
        /// Answer within this many milliseconds of arrival, or get
        /// [`RequestError::Timeout`]. `None` uses the daemon's default.
        deadline_ms: Option<u64>,
    },
    /// Tokenize `texts` with the model's tokenizer, as an embed request
    /// would (special tokens added, cut at `max_seq_len`).
    Tokenize {
        /// Client-chosen id, echoed in the answer.
        id: u64,
        /// The texts; at most [`MAX_TEXTS_PER_REQUEST`], as for `Embed`.
        #[serde(deserialize_with = "bounded::texts")]
        texts: Vec<String>,
        /// As for `Embed`.
        deadline_ms: Option<u64>,
    },
    /// Report the pool's state.
    Status {
        /// Client-chosen id, echoed in the answer.
        id: u64,
    },
    /// Rolling restart of every worker (as SIGHUP does, without re-reading
    /// the config file); answered when the roll is complete.
    Roll {
        /// Client-chosen id, echoed in the answer.
        id: u64,
    },
    /// The counters and gauges in Prometheus text exposition format.
    Metrics {
        /// Client-chosen id, echoed in the answer.
        id: u64,
    },
}

impl ClientMessage {
    /// The client's id for this request.
    pub fn id(&self) -> u64 {
        match self {
            Self::Embed { id, .. }
            | Self::Tokenize { id, .. }
            | Self::Status { id }
            | Self::Roll { id }
            | Self::Metrics { id } => *id,
        }
    }

    /// Operations that change or expose the daemon (as opposed to using it);
    /// they can be restricted to a separate set of users.
    pub fn is_control(&self) -> bool {
        matches!(self, Self::Roll { .. } | Self::Metrics { .. })
    }
}

/// Supervisor → client: exactly one per [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Answer to a successful [`ClientMessage::Embed`].
    Embeddings {
        /// The request's id.
        id: u64,
        /// The result.
        result: EmbedResult,
        /// Where the request's time went.
        timing: Timing,
    },
    /// Answer to a successful [`ClientMessage::Tokenize`].
    Tokens {
        /// The request's id.
        id: u64,
        /// The tokens.
        result: TokenizeResult,
        /// Where the request's time went.
        timing: Timing,
    },
    /// Answer to [`ClientMessage::Status`].
    Status {
        /// The request's id.
        id: u64,
        /// Pool snapshot. Boxed: it is several times larger than every
        /// other answer, which would otherwise all be that large.
        status: Box<PoolStatus>,
    },
    /// Answer to [`ClientMessage::Roll`]: every worker was replaced.
    Rolled {
        /// The request's id.
        id: u64,
        /// Workers replaced by the roll.
        replaced: u32,
    },
    /// Answer to [`ClientMessage::Metrics`].
    Metrics {
        /// The request's id.
        id: u64,
        /// Prometheus text exposition (format 0.0.4).
        text: String,
    },
    /// The request with this id failed.
    Error {
        /// The request's id.
        id: u64,
        /// Why.
        error: RequestError,
    },
    /// The server refuses this connection: sent right after the hello
    /// exchange, then the server closes the connection. Every request sent on
    /// it fails with `error`.
    Refused {
        /// Why (e.g. [`RequestError::TooManyConnections`]).
        error: RequestError,
    },
}

impl ServerMessage {
    /// The id of the request this message answers; `None` for
    /// [`ServerMessage::Refused`], which answers the connection as a whole.
    pub fn id(&self) -> Option<u64> {
        match self {
            Self::Embeddings { id, .. }
            | Self::Tokens { id, .. }
            | Self::Status { id, .. }
            | Self::Rolled { id, .. }
            | Self::Metrics { id, .. }
            | Self::Error { id, .. } => Some(*id),
            Self::Refused { .. } => None,
        }
    }
}

/// One token of a tokenized text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Its id in the model's vocabulary.
    pub id: u32,
    /// The text it covers (for a special token, the token itself).
    pub text: String,
    /// Added by the tokenizer (`[CLS]`, `[SEP]`), not from the text.
    pub special: bool,
    /// Byte offset of its start in the text; `None` for a special token.
    pub start: Option<u32>,
    /// Byte offset just past its end; `None` for a special token.
    pub stop: Option<u32>,
}

/// Tokens for one tokenize request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeResult {
    /// One list per input text, in order.
    #[serde(deserialize_with = "bounded::tokens")]
    pub tokens: Vec<Vec<Token>>,
}

/// Where an answered request's time went, as the supervisor measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timing {
    /// From arrival until the worker that answered was handed the request:
    /// waiting in the queue, and any attempts on workers that died.
    pub queue_us: u64,
    /// On the worker that answered, from dispatch to its answer:
    /// tokenization and the model run (plus the local socket round trip).
    pub inference_us: u64,
}

/// Embeddings for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedResult {
    /// Model name as the worker reports it.
    pub model: String,
    /// Vector length.
    pub dims: u32,
    /// One vector per input text, in input order.
    #[serde(deserialize_with = "bounded::embeddings")]
    pub embeddings: Vec<Vec<f32>>,
    /// Per text: was it cut at the model's maximum sequence length?
    #[serde(deserialize_with = "bounded::per_text")]
    pub truncated: Vec<bool>,
    /// Per text: tokens fed to the model (after truncation).
    #[serde(deserialize_with = "bounded::per_text")]
    pub token_counts: Vec<u32>,
}

/// Typed failure of one request. Every variant is final for that request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RequestError {
    /// The request itself is invalid; retrying it unchanged will fail again.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The request queue is full; retry later.
    #[error("overloaded: the request queue is full ({capacity} waiting); retry later")]
    Overloaded {
        /// Queue capacity.
        capacity: u32,
    },
    /// The request was not answered within its deadline.
    #[error("timed out after {elapsed_ms} ms")]
    Timeout {
        /// Time since the supervisor accepted it.
        elapsed_ms: u64,
    },
    /// The request was in flight when workers died repeatedly; it is treated
    /// as a poison input and not retried again.
    #[error("worker lost: {deaths} workers died while running this request; it was quarantined")]
    WorkerLost {
        /// Worker deaths this request was in flight for.
        deaths: u32,
    },
    /// The daemon is shutting down and accepts no new work.
    #[error("shutting down")]
    ShuttingDown,
    /// The pool cannot run requests right now (e.g. workers fail to load).
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why, in words an operator can act on.
        reason: String,
    },
    /// The server already serves as many connections as it accepts (in all,
    /// or from this client); sent in [`ServerMessage::Refused`].
    #[error("too many connections: {reason}")]
    TooManyConnections {
        /// Which limit, in words an operator can act on.
        reason: String,
    },
    /// This client (by its uid/gid) may not make this request.
    #[error("permission denied: {reason}")]
    PermissionDenied {
        /// Which rule refused it.
        reason: String,
    },
    /// A rolling restart gave up: its new workers could not start, so the
    /// old ones keep serving with the configuration they were started with.
    #[error("roll failed: {reason}")]
    RollFailed {
        /// Why the new workers could not start.
        reason: String,
    },
    /// A bug or an unexpected condition in the daemon.
    #[error("internal error: {message}")]
    Internal {
        /// Description.
        message: String,
    },
}

impl RequestError {
    /// Its kind, for counters and metrics.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BadRequest { .. } => ErrorKind::BadRequest,
            Self::Overloaded { .. } => ErrorKind::Overloaded,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::WorkerLost { .. } => ErrorKind::WorkerLost,
            Self::ShuttingDown => ErrorKind::ShuttingDown,
            Self::Unavailable { .. } => ErrorKind::Unavailable,
            Self::TooManyConnections { .. } => ErrorKind::TooManyConnections,
            Self::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Self::RollFailed { .. } => ErrorKind::RollFailed,
            Self::Internal { .. } => ErrorKind::Internal,
        }
    }
}

/// Size limits on one embed request, enforced by the supervisor before
/// queueing and again by the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLimits {
    /// Most texts in one request.
    pub max_texts: usize,
    /// Most bytes (UTF-8) in one text.
    pub max_text_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_texts: 64,
            max_text_bytes: 64 * 1024,
        }
    }
}

/// Per text, in a worker command or answer, besides the text's own bytes:
/// its length prefix, its truncation flag and token count.
const PER_TEXT_OVERHEAD: usize = 32;
/// Per token in a tokenize answer, besides the bytes of the text it covers
/// (which are the text's own): id, flags, offsets, length prefix, and the
/// text of a special token.
const PER_TOKEN_OVERHEAD: usize = 48;
/// Per text in an embed answer: a vector of up to 16384 dimensions.
const MAX_VECTOR_BYTES: usize = 16384 * 4 + 16;
/// Per frame: message tags, ids, the model's name (a path at most), list
/// lengths.
const PER_FRAME_OVERHEAD: usize = 64 * 1024;

impl RequestLimits {
    /// The largest frame a worker's socket must carry for requests within
    /// these limits, never below [`crate::DEFAULT_MAX_FRAME_BYTES`]: the
    /// command with the texts, or its answer (tokens cover the text's own
    /// bytes plus a fixed part each, vectors a fixed size per text),
    /// whichever is larger. Both ends of the link use it, so a request the
    /// supervisor admits always fits.
    pub fn worker_frame_bytes(&self, max_seq_len: usize) -> usize {
        let texts = self
            .max_texts
            .saturating_mul(self.max_text_bytes.saturating_add(PER_TEXT_OVERHEAD));
        let tokens = self
            .max_texts
            .saturating_mul(max_seq_len.saturating_add(2))
            .saturating_mul(PER_TOKEN_OVERHEAD);
        let vectors = self.max_texts.saturating_mul(MAX_VECTOR_BYTES);
        texts
            .saturating_add(tokens.max(vectors))
            .saturating_add(PER_FRAME_OVERHEAD)
            .clamp(crate::DEFAULT_MAX_FRAME_BYTES, u32::MAX as usize)
    }

    /// The limits that hold for both `self` and `other`: the smaller of each.
    pub fn narrowest(self, other: RequestLimits) -> RequestLimits {
        RequestLimits {
            max_texts: self.max_texts.min(other.max_texts),
            max_text_bytes: self.max_text_bytes.min(other.max_text_bytes),
        }
    }

    /// Checks `texts` against the limits; `Err` carries a
    /// [`RequestError::BadRequest`] that says which limit and which text.
    pub fn check(&self, texts: &[String]) -> Result<(), RequestError> {
        let bad = |reason: String| Err(RequestError::BadRequest { reason });
        if texts.is_empty() {
            return bad("the request has no texts".into());
        }
        if texts.len() > self.max_texts {
            return bad(format!(
                "{} texts in one request; the limit is {}",
                texts.len(),
                self.max_texts
            ));
        }
        if let Some((index, text)) = texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > self.max_text_bytes)
        {
            return bad(format!(
                "text {index} is {} bytes; the limit is {} bytes",
                text.len(),
                self.max_text_bytes
            ));
        }
        Ok(())
    }
}

/// Snapshot of the pool, for `inferctl status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Supervisor pid.
    pub pid: u32,
    /// Seconds since the supervisor started.
    pub uptime_secs: u64,
    /// Model path the workers load.
    pub model: PathBuf,
    /// Target number of workers.
    pub target_workers: u32,
    /// One entry per live worker process.
    #[serde(deserialize_with = "bounded::vec")]
    pub workers: Vec<WorkerStatus>,
    /// Requests waiting for a worker.
    pub queue_depth: u32,
    /// Queue capacity.
    pub queue_capacity: u32,
    /// Client connections open now (refused ones not counted).
    pub connections: u32,
    /// Most client connections served at once; more are refused with
    /// [`RequestError::TooManyConnections`].
    pub max_connections: u32,
    /// Bytes of text held by the requests waiting in the queue.
    pub queued_bytes: u64,
    /// Most bytes of text the queue holds; past it, requests are turned away
    /// with [`RequestError::Overloaded`].
    pub queued_bytes_budget: u64,
    /// Why the pool cannot serve, if it cannot (e.g. workers fail to load).
    pub unavailable_reason: Option<String>,
    /// Per-worker graceful recycle threshold, if set.
    pub soft_limit_bytes: Option<u64>,
    /// Per-worker kill threshold (and cgroup limit), if set.
    pub hard_limit_bytes: Option<u64>,
    /// Where the limits come from: the configuration, or how "auto"
    /// derived them (or that it waits for the first worker's baseline).
    pub limits_origin: String,
    /// Loaded workers held in reserve, target.
    pub target_spares: u32,
    /// Per-worker cgroups: in use where, or why not.
    pub cgroups: String,
    /// The latest worker exits, oldest first.
    #[serde(deserialize_with = "bounded::vec")]
    pub recent_exits: Vec<ExitRecord>,
    /// The rolling restart under way, or the last one.
    pub roll: Option<RollReport>,
    /// Recycles under way: a replacement loading, or an old worker on its
    /// way out.
    #[serde(deserialize_with = "bounded::vec")]
    pub recycles: Vec<RecycleReport>,
    /// Test-only `[chaos]` options the workers start with, in words.
    pub chaos: Option<String>,
    /// Cumulative counters.
    pub counters: Counters,
}

/// One recycle under way, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecycleReport {
    /// The worker being replaced.
    pub old_worker: u64,
    /// Its replacement.
    pub replacement: u64,
    /// Why.
    pub trigger: RecycleTrigger,
    /// Seconds since the replacement was spawned.
    pub age_secs: f64,
    /// Where it stands.
    pub stage: RecycleStage,
}

/// A rolling restart (SIGHUP or `inferctl roll`), as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollReport {
    /// The roll's generation: it replaces every worker of an older one.
    pub generation: u64,
    /// Workers replaced so far (the old one stopped after its replacement
    /// was Ready).
    pub replaced: u32,
    /// Where it stands.
    pub state: RollState,
}

/// Where a rolling restart stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollState {
    /// Replacing workers; the new configuration is not proven until one
    /// new worker is Ready.
    Running {
        /// A new worker was Ready: the new configuration is in force.
        proven: bool,
    },
    /// Every old worker was replaced.
    Done,
    /// New workers could not start; the old ones keep serving with the
    /// configuration they were started with.
    Failed {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for RollState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Running { proven: false } => {
                f.write_str("running, new configuration not yet proven")
            }
            Self::Running { proven: true } => f.write_str("running"),
            Self::Done => f.write_str("done"),
            Self::Failed { reason } => write!(f, "FAILED: {reason}"),
        }
    }
}

/// One worker exit, as classified by the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The worker's id.
    pub worker_id: u64,
    /// Its pid.
    pub pid: u32,
    /// Classified end kind (as in [`Counters::worker_exits`]).
    pub kind: ExitKind,
    /// The end in words, with its reason.
    pub description: String,
    /// Requests it answered.
    pub requests_served: u64,
    /// How long it lived, in seconds.
    pub age_secs: f64,
    /// Supervisor uptime at the exit, in seconds.
    pub uptime_at_exit_secs: f64,
}

/// One worker in [`PoolStatus`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Supervisor-assigned id, never reused.
    pub id: u64,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: WorkerStateKind,
    /// Resident set size in bytes, if procfs could be read.
    pub rss_bytes: Option<u64>,
    /// Proportional set size, when the memory metric reads smaps_rollup.
    pub pss_bytes: Option<u64>,
    /// Unique set size, when the memory metric reads smaps_rollup.
    pub uss_bytes: Option<u64>,
    /// Requests this worker answered.
    pub requests_served: u64,
    /// Seconds since spawn.
    pub age_secs: f64,
    /// Its memory cgroup directory, if it has its own.
    pub cgroup: Option<String>,
    /// Set while it starts up to replace the worker with this id.
    pub replaces: Option<u64>,
    /// Started to stand by as a spare (its state says `spare` once loaded);
    /// false once promoted.
    pub spare: bool,
    /// How fast its memory grows, bytes per second, from the lower envelope
    /// of its recent readings (transient peaks do not count); `None` until
    /// a few seconds of readings exist.
    pub growth_bytes_per_sec: Option<f64>,
}

/// Cumulative pool counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests accepted into the queue.
    pub requests_accepted: u64,
    /// Embed requests answered with an error at once, never queued (bad
    /// request, overloaded, unavailable, shutting down); each is also in
    /// `requests_failed` under its kind. Once nothing is queued or running,
    /// `requests_accepted + requests_rejected == requests_ok +
    /// sum(requests_failed) + requests_abandoned`.
    pub requests_rejected: u64,
    /// Requests answered with embeddings.
    pub requests_ok: u64,
    /// Failed requests by [`RequestError::kind`].
    pub requests_failed: BTreeMap<ErrorKind, u64>,
    /// In-flight requests re-dispatched after their worker died.
    pub retries: u64,
    /// Requests quarantined as poison (answered worker-lost).
    pub poison_rejections: u64,
    /// Queued requests dropped, unanswered, because their client disconnected
    /// before a worker took them.
    pub requests_abandoned: u64,
    /// Connections refused with [`ServerMessage::Refused`], by reason (the
    /// limit or rule that refused them).
    pub connections_refused: BTreeMap<RefusalReason, u64>,
    /// Workers spawned.
    pub workers_spawned: u64,
    /// Graceful recycles started, by trigger.
    pub recycles: BTreeMap<RecycleTrigger, u64>,
    /// Recycles abandoned because the replacement ended before it was
    /// Ready (the old worker serves on and is judged again), by trigger.
    pub recycles_failed: BTreeMap<RecycleTrigger, u64>,
    /// Worker exits by classified end kind.
    pub worker_exits: BTreeMap<ExitKind, u64>,
    /// Spares promoted to take a dead or recycled worker's place.
    pub spares_promoted: u64,
}

/// Test-and-demo behaviours of a worker. All off by default; never enable in
/// production.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosOptions {
    /// Abort the worker process (SIGABRT) when a request contains a text
    /// equal to this marker.
    pub crash_marker: Option<String>,
    /// Hang (sleep forever, never answer) when a request contains a text
    /// equal to this marker.
    pub hang_marker: Option<String>,
    /// Keep this many bytes (written, so resident) after every request: a
    /// simulated leak.
    pub leak_bytes_per_request: u64,
}

impl ChaosOptions {
    /// The options that are on, in words (for the startup warning and
    /// status); `None` when none is.
    pub fn describe(&self) -> Option<String> {
        let mut on = Vec::new();
        if let Some(marker) = &self.crash_marker {
            on.push(format!("crash_marker {marker:?}"));
        }
        if let Some(marker) = &self.hang_marker {
            on.push(format!("hang_marker {marker:?}"));
        }
        if self.leak_bytes_per_request > 0 {
            on.push(format!(
                "leak_bytes_per_request {}",
                self.leak_bytes_per_request
            ));
        }
        (!on.is_empty()).then(|| on.join(", "))
    }
}

/// Everything a worker needs to load its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Supervisor-assigned worker id (for logs).
    pub worker_id: u64,
    /// ONNX model file.
    pub model_path: PathBuf,
    /// tokenizer.json file.
    pub tokenizer_path: PathBuf,
    /// Longer inputs are truncated to this many tokens.
    pub max_seq_len: usize,
    /// L2-normalise each embedding.
    pub normalize: bool,
    /// Embed one short text before reporting Ready.
    pub warm_up: bool,
    /// Return freed memory to the system after a large request.
    pub trim_memory: bool,
    /// Texts per model run: `max_batch_tokens / max_seq_len`, at least 1;
    /// 0 for all of a request's texts in one run.
    pub max_batch_texts: usize,
    /// Request size limits, checked again in the worker.
    pub limits: RequestLimits,
    /// The largest frame either end of the worker's socket accepts after
    /// this Start frame ([`RequestLimits::worker_frame_bytes`]).
    pub max_frame_bytes: usize,
    /// Test-only behaviours.
    pub chaos: ChaosOptions,
}

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerCommand {
    /// Load the model with this configuration and report readiness. Sent once,
    /// after the supervisor has placed the worker (e.g. into its cgroup).
    Start(WorkerConfig),
    /// Embed one batch.
    Embed {
        /// Supervisor-internal request id, echoed back.
        request_id: u64,
        /// The texts; at most [`MAX_TEXTS_PER_REQUEST`]. Shared so that the
        /// supervisor keeps one copy of a request's texts however often it
        /// hands them to a worker; encoded exactly as a `Vec<String>`.
        #[serde(deserialize_with = "bounded::shared_texts")]
        texts: Arc<[String]>,
    },
    /// Tokenize one batch, as `Embed` would before running the model.
    Tokenize {
        /// Supervisor-internal request id, echoed back.
        request_id: u64,
        /// The texts, as for `Embed`.
        #[serde(deserialize_with = "bounded::shared_texts")]
        texts: Arc<[String]>,
    },
    /// Finish and exit 0.
    Shutdown,
}

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerEvent {
    /// The model is loaded; the worker takes requests.
    Ready {
        /// Model name.
        model: String,
        /// Embedding dimension.
        dims: u32,
        /// Load time in milliseconds.
        load_ms: u64,
    },
    /// The model could not be loaded; the worker exits after sending this.
    LoadFailed {
        /// Why, with the failing path.
        reason: String,
    },
    /// Answer to [`WorkerCommand::Embed`].
    Embedded {
        /// The request id.
        request_id: u64,
        /// The result.
        result: EmbedResult,
    },
    /// Answer to [`WorkerCommand::Tokenize`].
    Tokenized {
        /// The request id.
        request_id: u64,
        /// The tokens.
        result: TokenizeResult,
    },
    /// The worker refused or failed one request; it keeps running.
    Rejected {
        /// The request id.
        request_id: u64,
        /// Why (bad request or internal).
        error: RequestError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_payload, encode_frame};

    fn round_trip<T>(msg: T)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(
            u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        assert_eq!(decode_payload::<T>(&frame[4..]).unwrap(), msg);
    }

    #[test]
    fn every_message_family_round_trips() {
        round_trip(Hello::new("test"));
        round_trip(ClientMessage::Status { id: u64::MAX });
        round_trip(ServerMessage::Error {
            id: 3,
            error: RequestError::WorkerLost { deaths: 2 },
        });
        round_trip(ServerMessage::Embeddings {
            id: 4,
            result: EmbedResult {
                model: "m".into(),
                dims: 2,
                embeddings: vec![vec![0.5, -0.25]],
                truncated: vec![true],
                token_counts: vec![256],
            },
            timing: Timing {
                queue_us: 12,
                inference_us: 3400,
            },
        });
        round_trip(WorkerCommand::Start(WorkerConfig {
            worker_id: 1,
            model_path: "/m.onnx".into(),
            tokenizer_path: "/t.json".into(),
            max_seq_len: 256,
            normalize: true,
            warm_up: true,
            trim_memory: true,
            max_batch_texts: 16,
            limits: RequestLimits::default(),
            max_frame_bytes: RequestLimits::default().worker_frame_bytes(256),
            chaos: ChaosOptions {
                crash_marker: Some("boom".into()),
                hang_marker: None,
                leak_bytes_per_request: 1 << 20,
            },
        }));
        round_trip(WorkerEvent::Rejected {
            request_id: 9,
            error: RequestError::BadRequest { reason: "x".into() },
        });
        round_trip(PoolStatus {
            pid: 1,
            uptime_secs: 2,
            model: "/m".into(),
            target_workers: 2,
            workers: vec![WorkerStatus {
                id: 1,
                pid: 2,
                state: WorkerStateKind::Ready,
                rss_bytes: Some(1 << 20),
                pss_bytes: None,
                uss_bytes: None,
                requests_served: 3,
                age_secs: 1.5,
                cgroup: Some("/sys/fs/cgroup/x".into()),
                replaces: None,
                spare: false,
                growth_bytes_per_sec: Some(2048.5),
            }],
            queue_depth: 0,
            queue_capacity: 10,
            connections: 3,
            max_connections: 4096,
            queued_bytes: 12,
            queued_bytes_budget: 1 << 26,
            unavailable_reason: None,
            soft_limit_bytes: Some(1 << 28),
            hard_limit_bytes: None,
            limits_origin: "auto".into(),
            target_spares: 1,
            cgroups: "v1".into(),
            recent_exits: vec![ExitRecord {
                worker_id: 1,
                pid: 9,
                kind: ExitKind::OomKilled,
                description: "OOM".into(),
                requests_served: 4,
                age_secs: 2.0,
                uptime_at_exit_secs: 3.0,
            }],
            roll: Some(RollReport {
                generation: 2,
                replaced: 1,
                state: RollState::Failed {
                    reason: "model.onnx: not an ONNX file".into(),
                },
            }),
            chaos: Some("hang_marker \"h\"".into()),
            recycles: vec![RecycleReport {
                old_worker: 3,
                replacement: 5,
                trigger: RecycleTrigger::SoftLimit,
                age_secs: 1.5,
                stage: RecycleStage::Loading,
            }],
            counters: Counters {
                requests_abandoned: 2,
                connections_refused: [(RefusalReason::MaxConnections, 5)].into(),
                ..Counters::default()
            },
        });
        round_trip(ServerMessage::Refused {
            error: RequestError::TooManyConnections {
                reason: "4096 client connections are open".into(),
            },
        });
        round_trip(ClientMessage::Embed {
            id: 1,
            texts: vec!["a".into(), String::new()],
            deadline_ms: Some(5),
        });
        round_trip(WorkerCommand::Embed {
            request_id: 2,
            texts: vec!["b".to_owned(), "ç".to_owned()].into(),
        });
        round_trip(WorkerEvent::Embedded {
            request_id: 2,
            result: EmbedResult {
                model: "m".into(),
                dims: 1,
                embeddings: vec![vec![1.0], vec![-0.0]],
                truncated: vec![false, true],
                token_counts: vec![1, 300],
            },
        });
    }

    #[test]
    fn shared_texts_encode_exactly_like_a_vec() {
        /// `WorkerCommand` as it was, with `texts: Vec<String>`.
        #[derive(Serialize)]
        #[allow(dead_code)]
        enum VecCommand {
            Start(WorkerConfig),
            Embed { request_id: u64, texts: Vec<String> },
            Shutdown,
        }
        let texts = vec!["héllo".to_owned(), String::new(), "x".repeat(300)];
        let shared = encode_frame(&WorkerCommand::Embed {
            request_id: 77,
            texts: texts.clone().into(),
        })
        .unwrap();
        let plain = encode_frame(&VecCommand::Embed {
            request_id: 77,
            texts,
        })
        .unwrap();
        assert_eq!(shared, plain);
    }

    #[test]
    fn refusals_have_no_request_id() {
        let refused = ServerMessage::Refused {
            error: RequestError::TooManyConnections {
                reason: "uid 1000 has 1024 connections open".into(),
            },
        };
        assert_eq!(refused.id(), None);
        let answer = ServerMessage::Rolled { id: 8, replaced: 2 };
        assert_eq!(answer.id(), Some(8));
        let ServerMessage::Refused { error } = refused else {
            unreachable!()
        };
        assert_eq!(error.kind(), ErrorKind::TooManyConnections);
        assert_eq!(
            error.to_string(),
            "too many connections: uid 1000 has 1024 connections open"
        );
    }

    #[test]
    fn limits_name_the_offending_text() {
        let limits = RequestLimits {
            max_texts: 2,
            max_text_bytes: 4,
        };
        assert!(limits.check(&["ok".into()]).is_ok());
        let reason = |texts: &[String]| match limits.check(texts) {
            Err(RequestError::BadRequest { reason }) => reason,
            other => panic!("expected bad request, got {other:?}"),
        };
        assert!(reason(&[]).contains("no texts"));
        assert!(reason(&["a".into(), "b".into(), "c".into()]).contains("3 texts"));
        assert!(reason(&["ok".into(), "toolong".into()]).contains("text 1 is 7 bytes"));
    }

    #[test]
    fn the_worker_frame_limit_holds_the_largest_command_and_answers() {
        let limits = RequestLimits {
            max_texts: 3,
            max_text_bytes: 8 << 20,
        };
        let max_seq_len = 256;
        let bound = limits.worker_frame_bytes(max_seq_len);
        assert!(bound > crate::DEFAULT_MAX_FRAME_BYTES, "{bound}");
        let texts: Vec<String> = (0..limits.max_texts)
            .map(|_| "é".repeat(limits.max_text_bytes / 2))
            .collect();
        let fits = |frame: Vec<u8>, what: &str| {
            assert!(
                frame.len() - 4 <= bound,
                "{what}: {} bytes > {bound}",
                frame.len() - 4
            );
        };
        let command = WorkerCommand::Embed {
            request_id: u64::MAX,
            texts: texts.clone().into(),
        };
        fits(crate::encode_frame(&command).unwrap(), "embed command");
        // Tokens split each text's bytes between them, plus [CLS] and [SEP].
        let per_token = limits.max_text_bytes / max_seq_len;
        let token = |special: bool| Token {
            id: u32::MAX,
            text: if special {
                "[CLS]".into()
            } else {
                "x".repeat(per_token)
            },
            special,
            start: (!special).then_some(u32::MAX),
            stop: (!special).then_some(u32::MAX),
        };
        let tokens: Vec<Token> = std::iter::once(token(true))
            .chain((0..max_seq_len).map(|_| token(false)))
            .chain(std::iter::once(token(true)))
            .collect();
        let answer = WorkerEvent::Tokenized {
            request_id: u64::MAX,
            result: TokenizeResult {
                tokens: vec![tokens; limits.max_texts],
            },
        };
        fits(crate::encode_frame(&answer).unwrap(), "tokenize answer");
        let answer = WorkerEvent::Embedded {
            request_id: u64::MAX,
            result: EmbedResult {
                model: "m".repeat(4096),
                dims: 16384,
                embeddings: vec![vec![f32::MAX; 16384]; limits.max_texts],
                truncated: vec![true; limits.max_texts],
                token_counts: vec![u32::MAX; limits.max_texts],
            },
        };
        fits(crate::encode_frame(&answer).unwrap(), "embed answer");
        // The defaults keep the link at the default frame limit.
        assert_eq!(
            RequestLimits::default().worker_frame_bytes(256),
            crate::DEFAULT_MAX_FRAME_BYTES
        );
    }
}
