//! Caps on client connections, overall and per uid.
//!
//! Every accepted connection takes a [`ConnectionPermit`] before the
//! supervisor reads anything from it; the permit is given back when the
//! connection's task ends. Over a cap the connection is refused at once
//! (the peer gets the hello and a `Refused` frame naming the cap, see
//! [`crate::server`]), so a flood of idle connections can neither exhaust
//! the descriptors a worker spawn needs nor lock other users out: one uid
//! can hold at most `max_connections_per_uid` of them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use inferd_proto::{RefusalReason, RequestError};

use crate::request::Tenant;

/// The caps and the live counts.
#[derive(Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    max: u32,
    /// Most connections of one tenant open at once.
    per_tenant: u32,
    /// Counts, shared by the accept loop, the connection tasks (through
    /// their permits) and the pool (for status).
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Connections holding a permit.
    open: u32,
    /// The same, per tenant (entries at 0 are removed).
    by_tenant: HashMap<Tenant, u32>,
    /// Refused connections by reason.
    refused: BTreeMap<RefusalReason, u64>,
}

/// A connection's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionPermit {
    /// Where to give the place back.
    limits: Arc<ConnectionLimits>,
    /// Whose place it is.
    tenant: Tenant,
}

impl ConnectionLimits {
    /// Caps of `max` connections overall and `per_tenant` per tenant
    /// (`max_connections_per_uid`).
    pub fn new(max: u32, per_tenant: u32) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_tenant,
            state: Mutex::new(State::default()),
        })
    }

    /// A place for a connection of `tenant`, or the refusal to send it.
    pub fn try_admit(self: &Arc<Self>, tenant: Tenant) -> Result<ConnectionPermit, RequestError> {
        let mut state = self.lock();
        let of_tenant = state.by_tenant.get(&tenant).copied().unwrap_or(0);
        let refusal = if state.open >= self.max {
            Some((
                RefusalReason::MaxConnections,
                format!(
                    "{} client connections are open (max_connections); retry later",
                    self.max
                ),
            ))
        } else if of_tenant >= self.per_tenant {
            Some((
                RefusalReason::MaxConnectionsPerUid,
                format!(
                    "{tenant} has {} connections open (max_connections_per_uid); close some or retry later",
                    self.per_tenant
                ),
            ))
        } else {
            None
        };
        if let Some((kind, reason)) = refusal {
            *state.refused.entry(kind).or_default() += 1;
            return Err(RequestError::TooManyConnections { reason });
        }
        state.open += 1;
        *state.by_tenant.entry(tenant).or_default() += 1;
        Ok(ConnectionPermit {
            limits: Arc::clone(self),
            tenant,
        })
    }

    /// Counts a connection refused for another reason (`kind`).
    pub fn count_refusal(&self, kind: RefusalReason) {
        *self.lock().refused.entry(kind).or_default() += 1;
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.lock().open
    }

    /// The overall cap.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Refused connections so far, by reason.
    pub fn refused(&self) -> BTreeMap<RefusalReason, u64> {
        self.lock().refused.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The counts stay consistent even if a holder panicked: every update
        // is a single step.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut state = self.limits.lock();
        state.open = state.open.saturating_sub(1);
        if let Some(count) = state.by_tenant.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                state.by_tenant.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_overall_and_per_uid_and_permits_free_their_place() {
        let limits = ConnectionLimits::new(3, 2);
        let a1 = limits.try_admit(Tenant::Uid(1)).expect("first");
        let a2 = limits.try_admit(Tenant::Uid(1)).expect("second of uid 1");
        let err = limits
            .try_admit(Tenant::Uid(1))
            .expect_err("uid 1 is at its cap");
        assert!(err.to_string().contains("max_connections_per_uid"), "{err}");
        let b1 = limits
            .try_admit(Tenant::Uid(2))
            .expect("another uid still fits");
        let err = limits.try_admit(Tenant::Uid(3)).expect_err("overall cap");
        assert!(err.to_string().contains("3 client connections"), "{err}");
        assert_eq!(limits.open(), 3);
        drop(a1);
        assert_eq!(limits.open(), 2);
        let a3 = limits.try_admit(Tenant::Uid(1)).expect("a place was freed");
        limits.count_refusal(RefusalReason::PermissionDenied);
        let refused = limits.refused();
        assert_eq!(refused.get(&RefusalReason::MaxConnectionsPerUid), Some(&1));
        assert_eq!(refused.get(&RefusalReason::MaxConnections), Some(&1));
        assert_eq!(refused.get(&RefusalReason::PermissionDenied), Some(&1));
        drop((a2, a3, b1));
        assert_eq!(limits.open(), 0);
        assert!(limits.lock().by_tenant.is_empty());
    }
}
