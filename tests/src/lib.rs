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
    exit_count, ready_count, serving_count, worker_pids, Daemon, DaemonConfig, POLL_INTERVAL,
    READY_TIMEOUT,
};
pub use fixtures::{
    bin_dir, binary, default_model, max_abs_diff, model_dir, model_files, reference, sample_texts,
    small_model, test_model_name, Reference, ReferenceEmbedding, ReferenceModel, DEFAULT_MODEL,
    SMALL_MODEL,
};
pub use load::{BackgroundLoad, Expected, LoadReport, TOLERANCE};
pub use process::{children_of, pid_alive, proc_state, wait_pids_gone};
pub use raw::RawConn;

/// Tells whoever runs the tests that `test` did not run, and why. Written
/// straight to stderr: libtest captures only `print!` and `eprint!`, so a
/// skip is seen even when the test passes.
pub fn skipped(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{test}: skipped: {reason}");
}

/// [`skipped`] for a test that needs per-worker cgroups, except where
/// `INFERD_REQUIRE_CGROUPS=1` says the machine can make them (`.ci/run`
/// sets it where it can write its own memory cgroup): there, a skip is a
/// failure.
pub fn skipped_without_cgroups(test: &str, reason: &str) {
    if std::env::var_os("INFERD_REQUIRE_CGROUPS").is_some_and(|v| v == "1") {
        panic!("{test} needs per-worker cgroups, and INFERD_REQUIRE_CGROUPS=1 says this machine can make them: {reason}");
    }
    skipped(test, reason);
}

pub use bytesize::ByteSize;
pub use inferd_client::{Client, ClientError};
pub use inferd_proto::{
    EmbedResult, ErrorKind, ExitKind, PoolStatus, RecycleTrigger, RefusalReason, RequestError,
    RollReport, RollState, WorkerStateKind, WorkerStatus,
};
pub use inferd_supervisor::config::{CgroupMode, MemoryMetric};
pub use inferd_supervisor::Config;
pub use nix::sys::signal::Signal;
