//! Who may talk to the daemon. The socket's mode and group are the first
//! gate (the kernel's); these allow-lists, checked against each connection's
//! `SO_PEERCRED` credentials, are the second. Control operations (roll,
//! metrics) can be limited to a smaller set. Empty lists allow everyone the
//! socket lets in. Only the peer's primary gid is known from `SO_PEERCRED`,
//! so a gid rule matches a process's primary group, not supplementary ones.

use serde::{Deserialize, Serialize};

/// A peer's credentials, as the kernel reported them at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id, when known.
    pub pid: Option<i32>,
}

/// The allow-lists from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessPolicy {
    /// Uids that may connect; with `allowed_gids` empty too: anyone.
    pub allowed_uids: Vec<u32>,
    /// Primary gids that may connect.
    pub allowed_gids: Vec<u32>,
    /// Uids that may roll workers and read metrics; with `control_gids`
    /// empty too: everyone allowed to connect.
    pub control_uids: Vec<u32>,
    /// Primary gids that may roll workers and read metrics.
    pub control_gids: Vec<u32>,
}

impl AccessPolicy {
    /// May `peer` use the daemon at all? `Err` says which rule refused it.
    pub fn admit(&self, peer: Peer) -> Result<(), String> {
        if matches_lists(&self.allowed_uids, &self.allowed_gids, peer) {
            Ok(())
        } else {
            Err(format!(
                "uid {} / gid {} is not in allowed_uids or allowed_gids",
                peer.uid, peer.gid
            ))
        }
    }

    /// May `peer` run control operations?
    pub fn control(&self, peer: Peer) -> Result<(), String> {
        self.admit(peer)?;
        if matches_lists(&self.control_uids, &self.control_gids, peer) {
            Ok(())
        } else {
            Err(format!(
                "uid {} / gid {} is not in control_uids or control_gids",
                peer.uid, peer.gid
            ))
        }
    }
}

fn matches_lists(uids: &[u32], gids: &[u32], peer: Peer) -> bool {
    (uids.is_empty() && gids.is_empty()) || uids.contains(&peer.uid) || gids.contains(&peer.gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Peer = Peer {
        uid: 1000,
        gid: 1000,
        pid: None,
    };
    const OPS: Peer = Peer {
        uid: 2000,
        gid: 50,
        pid: None,
    };

    #[test]
    fn empty_lists_allow_everyone() {
        let policy = AccessPolicy::default();
        assert!(policy.admit(ALICE).is_ok());
        assert!(policy.control(ALICE).is_ok());
    }

    #[test]
    fn uid_and_gid_lists_admit_either_match() {
        let policy = AccessPolicy {
            allowed_uids: vec![1000],
            allowed_gids: vec![50],
            ..AccessPolicy::default()
        };
        assert!(policy.admit(ALICE).is_ok());
        assert!(policy.admit(OPS).is_ok());
        let stranger = Peer {
            uid: 3000,
            gid: 3000,
            pid: Some(7),
        };
        let reason = policy.admit(stranger).unwrap_err();
        assert!(reason.contains("uid 3000"), "{reason}");
        assert!(
            policy.control(stranger).is_err(),
            "control implies admission"
        );
    }

    #[test]
    fn control_can_be_narrower() {
        let policy = AccessPolicy {
            control_gids: vec![50],
            ..AccessPolicy::default()
        };
        assert!(policy.admit(ALICE).is_ok());
        assert!(policy.control(ALICE).unwrap_err().contains("control_uids"));
        assert!(policy.control(OPS).is_ok());
    }
}
