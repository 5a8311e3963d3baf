//! Waiting for a daemon to serve: the one readiness wait that the
//! end-to-end tests, the benchmarks and scripts use.

use std::path::Path;
use std::time::Duration;

use inferd_proto::{PoolStatus, WorkerStateKind};
use tokio::time::Instant;

use crate::Client;

/// How often [`wait_ready`] asks for status.
pub const READY_POLL: Duration = Duration::from_millis(20);
/// The longest one status question may take before it counts as no answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why [`wait_ready`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The caller's check said the daemon is gone (it exited).
    #[error("inferd stopped before its workers were ready: {0}")]
    Stopped(String),
    /// Not enough workers were Ready in time.
    #[error("inferd did not get {want} ready workers within {waited:?}; last: {last}")]
    Timeout {
        /// Workers asked for.
        want: usize,
        /// How long it waited.
        waited: Duration,
        /// The last status seen, in short, or why there was none.
        last: String,
    },
}

/// Polls the daemon on `socket` every [`READY_POLL`] until at least `want`
/// workers are Ready, and returns that status; gives up after `timeout`.
/// Before each poll `alive` is asked whether the daemon still runs (`Err`
/// with why not): a daemon that exited will never be ready. Each poll is
/// bounded, and a connection that failed is made afresh.
pub async fn wait_ready(
    socket: &Path,
    want: usize,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<PoolStatus, NotReady> {
    let started = Instant::now();
    let mut client: Option<Client> = None;
    loop {
        alive().map_err(NotReady::Stopped)?;
        let poll = async {
            let connected = match client.as_mut() {
                Some(connected) => connected,
                None => client.insert(Client::connect(socket).await?),
            };
            connected.status().await
        };
        let last = match tokio::time::timeout(STATUS_TIMEOUT, poll).await {
            Ok(Ok(status)) => {
                let ready = status
                    .workers
                    .iter()
                    .filter(|w| w.state == WorkerStateKind::Ready)
                    .count();
                if ready >= want {
                    return Ok(status);
                }
                match &status.unavailable_reason {
                    Some(reason) => format!("{ready}/{want} workers ready, unavailable: {reason}"),
                    None => format!("{ready}/{want} workers ready"),
                }
            }
            Ok(Err(err)) => {
                client = None;
                format!("status failed: {err}")
            }
            Err(_) => {
                client = None;
                format!("status not answered within {STATUS_TIMEOUT:?}")
            }
        };
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(NotReady::Timeout { want, waited, last });
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_daemon_that_never_answers_times_out_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nobody.sock");
        let started = Instant::now();
        let err = wait_ready(&socket, 2, Duration::from_millis(200), || Ok(()))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        match err {
            NotReady::Timeout { want: 2, last, .. } => {
                assert!(last.contains("status failed"), "{last}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stopped_daemon_ends_the_wait_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nobody.sock");
        let err = wait_ready(&socket, 1, Duration::from_secs(60), || {
            Err("exited with status 3".into())
        })
        .await
        .unwrap_err();
        assert!(
            matches!(&err, NotReady::Stopped(why) if why.contains("status 3")),
            "{err:?}"
        );
    }
}
