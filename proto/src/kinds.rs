//! The names the daemon reports things by: a worker's state, how a worker
//! ended, what triggered a recycle, what kind of error a request got, why a
//! connection was refused. Each is an enum here, shared by the pool, the
//! client, `inferctl`, the metrics and the tests, so nothing compares
//! strings; each has a stable snake_case name (its serde form, its metric
//! label) and an `ALL` list (metrics report every one, zero or not).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Defines a unit-only enum with its stable names, `ALL` and `Display`.
macro_rules! named_kinds {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable name: the serde form and the metric label.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad`, so that widths and alignment apply (status tables).
                f.pad(self.as_str())
            }
        }
    };
}

named_kinds! {
    /// A worker's lifecycle state, as status reports it.
    #[derive(Default)]
    pub enum WorkerStateKind {
        /// Spawned, loading its model.
        #[default]
        Starting => "starting",
        /// Idle, takes requests.
        Ready => "ready",
        /// Running a request.
        Busy => "busy",
        /// Being recycled: finishes its request, takes no new one.
        Draining => "draining",
        /// Asked to exit.
        Stopping => "stopping",
        /// Loaded and warmed, held in reserve: takes no requests until a
        /// death or a recycle promotes it.
        Spare => "spare",
        /// SIGKILLed, or its socket closed unasked: waiting to be reaped.
        Exiting => "exiting",
    }
}

impl WorkerStateKind {
    /// Ready or busy: the worker serves.
    pub fn is_serving(self) -> bool {
        matches!(self, Self::Ready | Self::Busy)
    }
}

named_kinds! {
    /// How a worker ended, as the supervisor classified it.
    pub enum ExitKind {
        /// Asked to stop (recycle, roll, shutdown), exited cleanly.
        Retired => "retired",
        /// SIGKILLed by the supervisor (hard limit, timeout, ...).
        KilledBySupervisor => "killed_by_supervisor",
        /// OOM-killed, by its own cgroup's evidence.
        OomKilled => "oom_killed",
        /// SIGKILL nobody here sent while the host's OOM count rose.
        LikelyOomKilled => "likely_oom_killed",
        /// Any other signal.
        Signaled => "signaled",
        /// Exited by itself.
        Exited => "exited",
        /// It could not be waited for.
        Unknown => "unknown",
    }
}

impl ExitKind {
    /// An OOM kill, certain or likely.
    pub fn is_oom(self) -> bool {
        matches!(self, Self::OomKilled | Self::LikelyOomKilled)
    }
}

named_kinds! {
    /// What started a graceful recycle.
    pub enum RecycleTrigger {
        /// Memory over `soft_limit`.
        SoftLimit => "soft_limit",
        /// `max_requests` served.
        MaxRequests => "max_requests",
        /// `max_lifetime_secs` lived.
        MaxLifetime => "max_lifetime",
        /// A rolling restart (SIGHUP, `inferctl roll`).
        Roll => "roll",
        /// Memory growing so fast that it would pass the hard limit before
        /// a replacement could be Ready: recycled early, whatever
        /// `min_lifetime_ms` says.
        LeakRate => "leak_rate",
    }
}

named_kinds! {
    /// Where a recycle stands.
    pub enum RecycleStage {
        /// The replacement is loading; the old worker serves.
        Loading => "loading",
        /// The replacement is Ready; the old worker finishes its request and
        /// exits.
        HandedOver => "handed_over",
    }
}

named_kinds! {
    /// The kind of a [`crate::RequestError`], for counters and metrics.
    pub enum ErrorKind {
        /// The request is invalid.
        BadRequest => "bad_request",
        /// The queue is full.
        Overloaded => "overloaded",
        /// Not answered in time.
        Timeout => "timeout",
        /// Quarantined as poison.
        WorkerLost => "worker_lost",
        /// The daemon is stopping.
        ShuttingDown => "shutting_down",
        /// Workers cannot start.
        Unavailable => "unavailable",
        /// A connection cap refused the client.
        TooManyConnections => "too_many_connections",
        /// The access lists refused the client.
        PermissionDenied => "permission_denied",
        /// A rolling restart gave up.
        RollFailed => "roll_failed",
        /// A bug.
        Internal => "internal",
    }
}

named_kinds! {
    /// Why a client connection was refused.
    pub enum RefusalReason {
        /// `max_connections` open in all.
        MaxConnections => "max_connections",
        /// `max_connections_per_uid` open for this uid (or TCP).
        MaxConnectionsPerUid => "max_connections_per_uid",
        /// The access lists do not admit the peer.
        PermissionDenied => "permission_denied",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value's serde form is its stable name (and its `Display`).
    fn names_are_serde_forms<K: Serialize + fmt::Display>(all: &[K]) {
        for kind in all {
            assert_eq!(serde_json::to_string(kind).unwrap(), format!("\"{kind}\""));
        }
    }

    #[test]
    fn names_are_the_serde_forms() {
        names_are_serde_forms(WorkerStateKind::ALL);
        names_are_serde_forms(ExitKind::ALL);
        names_are_serde_forms(RecycleTrigger::ALL);
        names_are_serde_forms(RecycleStage::ALL);
        names_are_serde_forms(ErrorKind::ALL);
        names_are_serde_forms(RefusalReason::ALL);
    }
}
