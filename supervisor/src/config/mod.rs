//! Daemon configuration: a TOML file (`--config`) with command-line flags on
//! top. Every key has a default except `model`; unknown keys are errors so a
//! typo never silently falls back to a default.

mod auto;
#[cfg(test)]
mod tests;

pub use auto::{LimitSetting, SpareSetting};

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use clap::Parser;
use inferd_proto::{ChaosOptions, RequestLimits, DEFAULT_MAX_FRAME_BYTES, MAX_TEXTS_PER_REQUEST};
use serde::{Deserialize, Serialize};

use crate::access::AccessPolicy;
use crate::http::auth::ApiKeys;

/// Smallest accepted memory limit: a loaded worker needs far more.
const MIN_MEMORY_LIMIT: ByteSize = ByteSize::mib(16);

/// Command-line flags of `inferd`. Flags override the config file.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "inferd",
    version,
    about = "Supervisor daemon serving sentence embeddings through a pool of worker processes"
)]
pub struct Args {
    /// TOML configuration file (see systemd/inferd.toml for every key).
    #[arg(long, short = 'c', env = "INFERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Unix socket clients connect to [default: /run/inferd/inferd.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Number of worker processes [default: 2].
    #[arg(long)]
    pub workers: Option<u32>,
    /// ONNX model file the workers load (required here or in the file).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// tokenizer.json [default: tokenizer.json beside the model].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Worker executable [default: inferd-worker beside this executable].
    #[arg(long)]
    pub worker_binary: Option<PathBuf>,
    /// Most requests waiting for a worker; more are answered "overloaded".
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// A worker running one request longer than this is killed (ms).
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Recycle a worker gracefully above this much memory: "auto" (derived
    /// from the first worker's baseline and the memory available), "off", or
    /// a size ("1.5GiB") [default: auto].
    #[arg(long)]
    pub soft_limit: Option<LimitSetting>,
    /// Kill a worker above this much memory; also its cgroup limit: "auto",
    /// "off" or a size ("2GiB") [default: auto].
    #[arg(long)]
    pub hard_limit: Option<LimitSetting>,
    /// Loaded workers held in reserve, promoted at once when a worker dies
    /// or is recycled: "auto" (1 where memory allows, else 0) or a number
    /// [default: auto].
    #[arg(long)]
    pub spare_workers: Option<SpareSetting>,
    /// Recycle a worker after about this many requests.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Log format: "human" (colours, timestamps) for terminals, "plain" (no
    /// colours, no timestamps: journald adds its own), "auto": human on a
    /// terminal, plain otherwise.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

/// How `inferd` writes its log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human when stderr is a terminal, plain otherwise.
    #[default]
    Auto,
    /// Colours and timestamps.
    Human,
    /// No colours, no timestamps (journald records its own).
    Plain,
}

/// The resolved configuration. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client socket path.
    pub socket: PathBuf,
    /// Client socket permission bits, as an octal string ("0660").
    pub socket_mode: String,
    /// Group owning the client socket (name or number); unset: the daemon's.
    pub socket_group: Option<String>,
    /// Target number of worker processes.
    pub workers: u32,
    /// ONNX model file.
    pub model: PathBuf,
    /// tokenizer.json; empty means `tokenizer.json` beside the model.
    pub tokenizer: PathBuf,
    /// Worker executable; empty means `inferd-worker` beside `inferd`.
    pub worker_binary: PathBuf,
    /// Inputs are truncated to this many tokens.
    pub max_seq_len: usize,
    /// L2-normalise embeddings.
    pub normalize: bool,
    /// A new worker embeds a short text before it reports Ready: the first
    /// request it serves is not its first run, and a model that loads but
    /// cannot run fails the start instead of a request.
    pub warm_up: bool,
    /// After a large request the worker hands the memory it freed back to
    /// the system (`malloc_trim`), so its RSS tracks live memory.
    pub trim_memory: bool,
    /// Tokens the model runs at once: a request's texts are embedded in
    /// runs of `max_batch_tokens / max_seq_len` texts (at least one), which
    /// bounds a worker's peak memory per request. 0: one run per request.
    pub max_batch_tokens: usize,
    /// Most queued requests.
    pub queue_capacity: usize,
    /// Most bytes of text held by queued requests; over it, new requests get
    /// `overloaded` (or push out the heaviest client's newest request). The
    /// same amount again bounds request frames still arriving (beyond 32 KiB
    /// each); a connection waits for room before reading more of one.
    pub max_queued_bytes: ByteSize,
    /// Most client connections open at once; more are refused with
    /// `too many connections`. Lowered at start if the descriptor limit
    /// cannot hold it plus a reserve for workers.
    pub max_connections: u32,
    /// Most client connections of one uid open at once.
    pub max_connections_per_uid: u32,
    /// Largest accepted frame payload, in bytes.
    pub max_frame_bytes: usize,
    /// Most texts in one request.
    pub max_texts: usize,
    /// Most bytes in one text.
    pub max_text_bytes: usize,
    /// Per-execution limit on a worker: it is SIGKILLed past this (ms).
    pub request_timeout_ms: u64,
    /// Deadline for requests that carry none (ms).
    pub default_deadline_ms: u64,
    /// Model load limit: a worker not Ready by then is SIGKILLed (ms).
    pub startup_timeout_ms: u64,
    /// On SIGTERM, how long queued and in-flight requests may take (ms).
    pub drain_timeout_ms: u64,
    /// Memory above this (per worker, `memory_metric`): graceful recycle.
    /// "auto": derived once the first worker is Ready (see `crate::limits`).
    pub soft_limit: LimitSetting,
    /// Memory above this: SIGKILL at once. With cgroups, also the kernel
    /// limit of the worker's leaf, so the OOM killer stays inside it.
    /// "auto" like `soft_limit`.
    pub hard_limit: LimitSetting,
    /// Loaded, warmed workers that take no traffic: a death or a recycle
    /// promotes one at once, and a new spare starts behind it.
    pub spare_workers: SpareSetting,
    /// Which memory figure the limits apply to.
    pub memory_metric: MemoryMetric,
    /// How often worker memory is read (also after every answer) (ms).
    pub memory_check_interval_ms: u64,
    /// Recycle a worker after about this many requests: each worker's own
    /// threshold is spread between 1× and 1.5× so they do not recycle together.
    pub max_requests: Option<u64>,
    /// Recycle a worker after this long (s).
    pub max_lifetime_secs: Option<u64>,
    /// No graceful recycle of a worker younger than this (ms): anti-flapping.
    pub min_lifetime_ms: u64,
    /// Most graceful recycles in progress at once.
    pub max_concurrent_recycles: u32,
    /// A recycled worker gets this long to finish its request and exit (ms).
    pub recycle_drain_timeout_ms: u64,
    /// Per-worker memory cgroups: "auto" (use them where possible), "off".
    pub cgroups: CgroupMode,
    /// Parent cgroup directory to create worker leaves in (default: the
    /// supervisor's own memory cgroup).
    pub cgroup_parent: Option<PathBuf>,
    /// Crash-loop guard: more than this many unexpected worker exits...
    pub max_restarts: u32,
    /// ...within this many seconds slow restarts down (exponential backoff).
    pub restart_period_secs: u64,
    /// Serve Prometheus metrics over HTTP on this loopback address
    /// ("127.0.0.1:9464"); unset: only `inferctl metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the HTTP API on this TCP address too ("127.0.0.1:8080"); unset:
    /// only on the Unix socket. A non-loopback address needs `api_keys_file`.
    pub http_listen: Option<std::net::SocketAddr>,
    /// API keys for the TCP listener, one per line (re-read on SIGHUP);
    /// unset: TCP clients need no key (only allowed on loopback).
    pub api_keys_file: Option<PathBuf>,
    /// Other model names `/v1/embeddings` accepts for the served model
    /// (e.g. "text-embedding-3-small", for clients that hard-code one).
    pub model_aliases: Vec<String>,
    /// The keys read from `api_keys_file` (not a TOML key).
    #[serde(skip)]
    pub api_keys: ApiKeys,
    /// Who may connect, and who may run control operations.
    pub access: AccessPolicy,
    /// Test-only worker behaviours; never enable in production.
    pub chaos: ChaosOptions,
}

/// The memory figure compared with the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMetric {
    /// Resident set size (`/proc/PID/statm`): cheap, counts shared pages.
    #[default]
    Rss,
    /// Proportional set size (`smaps_rollup`): shared pages split fairly.
    Pss,
    /// Unique set size (`smaps_rollup` private pages): what exiting frees.
    Uss,
}

/// Whether workers get their own memory cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Where the supervisor can create cgroups; otherwise procfs only.
    #[default]
    Auto,
    /// Never; procfs polling only.
    Off,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/inferd/inferd.sock"),
            socket_mode: "0660".into(),
            socket_group: None,
            workers: 2,
            model: PathBuf::new(),
            tokenizer: PathBuf::new(),
            worker_binary: PathBuf::new(),
            max_seq_len: 256,
            normalize: true,
            warm_up: true,
            trim_memory: true,
            max_batch_tokens: 4096,
            queue_capacity: 256,
            max_queued_bytes: ByteSize::mib(64),
            max_connections: 4096,
            max_connections_per_uid: 1024,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_texts: RequestLimits::default().max_texts,
            max_text_bytes: RequestLimits::default().max_text_bytes,
            request_timeout_ms: 30_000,
            default_deadline_ms: 60_000,
            startup_timeout_ms: 60_000,
            drain_timeout_ms: 30_000,
            soft_limit: LimitSetting::Auto,
            hard_limit: LimitSetting::Auto,
            spare_workers: SpareSetting::Auto,
            memory_metric: MemoryMetric::Rss,
            memory_check_interval_ms: 1000,
            max_requests: None,
            max_lifetime_secs: None,
            min_lifetime_ms: 5_000,
            max_concurrent_recycles: 1,
            recycle_drain_timeout_ms: 30_000,
            cgroups: CgroupMode::Auto,
            cgroup_parent: None,
            max_restarts: 5,
            restart_period_secs: 60,
            metrics_listen: None,
            http_listen: None,
            api_keys_file: None,
            model_aliases: Vec::new(),
            api_keys: ApiKeys::default(),
            access: AccessPolicy::default(),
            chaos: ChaosOptions::default(),
        }
    }
}

/// The configuration as it is now: replaced on every valid reload, read by
/// connections for each request (access lists, model names, limits shown
/// to clients), so a reload reaches connections already open.
pub type LiveConfig = tokio::sync::watch::Receiver<std::sync::Arc<Config>>;

/// A configuration that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What the parser says (line, column, key).
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting `{key}`: {reason}")]
    Invalid {
        /// The TOML key (or flag) at fault.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The executable's own path is needed for a default and is unknown.
    #[error(
        "cannot locate the inferd executable to find inferd-worker beside it; set worker_binary"
    )]
    LocateExecutable(#[source] std::io::Error),
}

impl Config {
    /// Reads the file named by `args` (if any), applies the flags, fills the
    /// derived defaults and validates the result.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        config.apply_flags(args);
        config.resolve_defaults()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses one TOML file (no flags, no validation).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_owned(),
            source,
        })
    }

    fn apply_flags(&mut self, args: &Args) {
        let Args {
            config: _,
            socket,
            workers,
            model,
            tokenizer,
            worker_binary,
            queue_capacity,
            request_timeout_ms,
            soft_limit,
            hard_limit,
            spare_workers,
            max_requests,
            log_format: _,
        } = args.clone();
        if let Some(v) = socket {
            self.socket = v;
        }
        if let Some(v) = workers {
            self.workers = v;
        }
        if let Some(v) = model {
            self.model = v;
        }
        if let Some(v) = tokenizer {
            self.tokenizer = v;
        }
        if let Some(v) = worker_binary {
            self.worker_binary = v;
        }
        if let Some(v) = queue_capacity {
            self.queue_capacity = v;
        }
        if let Some(v) = request_timeout_ms {
            self.request_timeout_ms = v;
        }
        if let Some(v) = soft_limit {
            self.soft_limit = v;
        }
        if let Some(v) = hard_limit {
            self.hard_limit = v;
        }
        if let Some(v) = spare_workers {
            self.spare_workers = v;
        }
        if max_requests.is_some() {
            self.max_requests = max_requests;
        }
    }

    fn resolve_defaults(&mut self) -> Result<(), ConfigError> {
        if self.tokenizer.as_os_str().is_empty() {
            self.tokenizer = self.model.with_file_name("tokenizer.json");
        }
        if self.worker_binary.as_os_str().is_empty() {
            let exe = std::env::current_exe().map_err(ConfigError::LocateExecutable)?;
            self.worker_binary = exe.with_file_name("inferd-worker");
        }
        if let Some(path) = &self.api_keys_file {
            self.api_keys = ApiKeys::load(path).map_err(|reason| ConfigError::Invalid {
                key: "api_keys_file",
                reason,
            })?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.model.as_os_str().is_empty() {
            return invalid("model", "no model file given (set `model` or pass --model)");
        }
        if self.socket.as_os_str().is_empty() {
            return invalid("socket", "empty path");
        }
        self.socket_mode_bits()?;
        if !(1..=256).contains(&self.workers) {
            return invalid("workers", "must be between 1 and 256");
        }
        if self.queue_capacity == 0 {
            return invalid("queue_capacity", "must be at least 1");
        }
        if !(1..=8192).contains(&self.max_seq_len) {
            return invalid("max_seq_len", "must be between 1 and 8192");
        }
        if self.max_frame_bytes < 4096 || self.max_frame_bytes > u32::MAX as usize {
            return invalid("max_frame_bytes", "must be between 4096 and 4294967295");
        }
        if self.max_texts == 0 || self.max_text_bytes == 0 {
            return invalid(
                "max_texts",
                "max_texts and max_text_bytes must be at least 1",
            );
        }
        if self.max_texts > MAX_TEXTS_PER_REQUEST {
            return invalid(
                "max_texts",
                &format!("must be at most {MAX_TEXTS_PER_REQUEST} (the protocol's limit)"),
            );
        }
        let largest_request = self.max_texts as u64 * self.max_text_bytes as u64;
        if self.max_queued_bytes.as_u64() < largest_request {
            return invalid(
                "max_queued_bytes",
                &format!(
                    "{} cannot hold one largest request (max_texts x max_text_bytes = {})",
                    self.max_queued_bytes,
                    ByteSize::b(largest_request)
                ),
            );
        }
        if self.max_queued_bytes.as_u64() < self.max_frame_bytes as u64 {
            return invalid(
                "max_queued_bytes",
                &format!(
                    "{} is below max_frame_bytes ({}): a largest frame could never be read",
                    self.max_queued_bytes,
                    ByteSize::b(self.max_frame_bytes as u64)
                ),
            );
        }
        if self.max_connections == 0 || self.max_connections_per_uid == 0 {
            return invalid(
                "max_connections",
                "max_connections and max_connections_per_uid must be at least 1",
            );
        }
        for (key, ms) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("default_deadline_ms", self.default_deadline_ms),
            ("startup_timeout_ms", self.startup_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
            ("memory_check_interval_ms", self.memory_check_interval_ms),
            ("recycle_drain_timeout_ms", self.recycle_drain_timeout_ms),
            ("restart_period_secs", self.restart_period_secs),
        ] {
            if ms == 0 {
                return invalid(key, "must be greater than 0");
            }
        }
        if let (Some(soft), Some(hard)) = (self.soft_limit.fixed(), self.hard_limit.fixed()) {
            if soft >= hard {
                return invalid(
                    "soft_limit",
                    &format!("{soft} must be below hard_limit ({hard})"),
                );
            }
        }
        for (key, limit) in [
            ("soft_limit", self.soft_limit.fixed()),
            ("hard_limit", self.hard_limit.fixed()),
        ] {
            if limit.is_some_and(|l| l < MIN_MEMORY_LIMIT) {
                return invalid(key, &format!("must be at least {MIN_MEMORY_LIMIT}"));
            }
        }
        if self.max_requests == Some(0) || self.max_lifetime_secs == Some(0) {
            return invalid(
                "max_requests",
                "max_requests and max_lifetime_secs must be at least 1 when set",
            );
        }
        if self
            .metrics_listen
            .is_some_and(|addr| !addr.ip().is_loopback())
        {
            return invalid(
                "metrics_listen",
                "must be a loopback address (127.0.0.1 or ::1); metrics are not access-controlled",
            );
        }
        if let Some(addr) = self.http_listen {
            if !addr.ip().is_loopback() && self.api_keys_file.is_none() {
                return invalid(
                    "http_listen",
                    &format!(
                        "{addr} is not a loopback address: set api_keys_file so that \
                         clients on the network need a key (and put a TLS proxy in front)"
                    ),
                );
            }
        }
        if self
            .model_aliases
            .iter()
            .any(|alias| alias.trim().is_empty())
        {
            return invalid("model_aliases", "an alias cannot be empty");
        }
        if matches!(self.spare_workers, SpareSetting::Count(n) if n > 16) {
            return invalid("spare_workers", "must be \"auto\" or at most 16");
        }
        if self.max_concurrent_recycles == 0 {
            return invalid("max_concurrent_recycles", "must be at least 1");
        }
        Ok(())
    }

    /// Socket permission bits parsed from `socket_mode`.
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let digits = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 => Ok(mode),
            _ => Err(ConfigError::Invalid {
                key: "socket_mode",
                reason: format!("{:?} is not an octal mode like \"0660\"", self.socket_mode),
            }),
        }
    }

    /// Request size limits.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_texts: self.max_texts,
            max_text_bytes: self.max_text_bytes,
        }
    }

    /// See [`Config::request_timeout_ms`].
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// See [`Config::default_deadline_ms`].
    /// Texts per model run for `max_batch_tokens`: at least one; 0 when
    /// the budget is off.
    pub fn max_batch_texts(&self) -> usize {
        match self.max_batch_tokens {
            0 => 0,
            tokens => (tokens / self.max_seq_len.max(1)).max(1),
        }
    }

    pub fn default_deadline(&self) -> Duration {
        Duration::from_millis(self.default_deadline_ms)
    }

    /// See [`Config::startup_timeout_ms`].
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms)
    }

    /// See [`Config::memory_check_interval_ms`].
    pub fn memory_check_interval(&self) -> Duration {
        Duration::from_millis(self.memory_check_interval_ms)
    }

    /// See [`Config::min_lifetime_ms`].
    pub fn min_lifetime(&self) -> Duration {
        Duration::from_millis(self.min_lifetime_ms)
    }

    /// See [`Config::recycle_drain_timeout_ms`].
    pub fn recycle_drain_timeout(&self) -> Duration {
        Duration::from_millis(self.recycle_drain_timeout_ms)
    }

    /// See [`Config::max_lifetime_secs`].
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime_secs.map(Duration::from_secs)
    }

    /// See [`Config::restart_period_secs`].
    pub fn restart_period(&self) -> Duration {
        Duration::from_secs(self.restart_period_secs)
    }

    /// See [`Config::drain_timeout_ms`].
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}
