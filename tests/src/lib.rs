//! Harness for the end-to-end tests: start the real `inferd` binary (which
//! starts real `inferd-worker`s), talk to it over its socket, send it real
//! signals, and read its log.
//!
//! The binaries are not built by `cargo test`: the test command runs
//! `cargo build --workspace --bins` first, and [`binary`] finds them next to
//! the test executable (`target/<profile>/`). Models come from the cache that
//! `scripts/fetch-model` fills ([`model_dir`]).
//!
//! Every wait here is a bounded poll with a short interval, never a fixed
//! sleep, and every [`Daemon`] has its own temp dir, config and socket.

#![warn(missing_docs)]

mod daemon;
mod fixtures;
mod load;
mod process;
mod raw;

pub use daemon::{
    ready_count, serving_count, worker_pids, Daemon, DaemonConfig, POLL_INTERVAL, READY_TIMEOUT,
};
pub use fixtures::{
    bin_dir, binary, default_model, max_abs_diff, model_dir, model_files, reference, sample_texts,
    small_model, test_model_name, Reference, ReferenceEmbedding, ReferenceModel, DEFAULT_MODEL,
    SMALL_MODEL,
};
pub use load::{BackgroundLoad, Expected, LoadReport, TOLERANCE};
pub use process::{children_of, pid_alive, proc_state, wait_pids_gone};
pub use raw::RawConn;

pub use inferd_client::{Client, ClientError};
pub use inferd_proto::{
    EmbedResult, PoolStatus, RequestError, RollReport, RollState, WorkerStatus,
};
pub use nix::sys::signal::Signal;
