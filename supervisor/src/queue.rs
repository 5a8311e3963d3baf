//! The request queue, fair between clients.
//!
//! Every accepted embed request waits here until a worker is free. Requests
//! are kept in one FIFO *lane* per client connection; lanes are grouped by
//! the connection's [`Tenant`]: its uid, or "TCP" for every client of the
//! TCP listener together. Dispatch takes turns: the next tenant in
//! rotation, then the next connection of that tenant, one request each; a client whose lane was
//! empty takes the next turn. So a client that floods the daemon delays
//! another client by about one request per worker, not by the whole queue, and a user cannot buy a larger share by
//! opening more connections than another user (fairness is per uid first,
//! then per connection within a uid, because several services often share
//! one uid and must not starve each other either).
//!
//! Admission is fair too (longest-queue drop): when the queue is at its
//! request capacity or its byte budget, a new request from a light client
//! pushes out the newest request of the heaviest client (the tenant, then the
//! connection, holding the most), which is answered `overloaded`. Only when
//! the newcomer is itself the heaviest is the newcomer refused.
//!
//! Requests retried after a worker died are not anyone's turn: they go first.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::request::{ClientKey, Request, Tenant};

/// One connection's waiting requests.
#[derive(Debug)]
struct Lane {
    /// The connection's tenant (the lane's group).
    tenant: Tenant,
    /// Oldest first.
    requests: VecDeque<Request>,
}

/// What an over-full queue is measured by when choosing whom to push out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Number of requests (against the queue capacity).
    Count,
    /// Bytes of text (against the byte budget).
    Bytes,
}

/// The queue: retries first, then lanes in rotation.
#[derive(Debug, Default)]
pub struct FairQueue {
    /// Re-dispatched requests of dead workers, served before any lane.
    retries: VecDeque<Request>,
    /// Lanes by connection id; a lane exists only while it holds requests.
    lanes: HashMap<u64, Lane>,
    /// Per tenant, its connections with waiting requests, in turn order.
    rings: BTreeMap<Tenant, VecDeque<u64>>,
    /// Tenants with waiting requests, in turn order.
    turns: VecDeque<Tenant>,
    /// Requests held, retries included.
    len: usize,
    /// Text bytes held, retries included.
    bytes: u64,
}

impl FairQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Text bytes of the waiting requests.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends `request` to its client's lane.
    pub fn push(&mut self, request: Request) {
        self.count_in(&request);
        let ClientKey { tenant, conn } = request.client;
        let lane = self.lanes.entry(conn).or_insert_with(|| Lane {
            tenant,
            requests: VecDeque::new(),
        });
        lane.requests.push_back(request);
        if lane.requests.len() == 1 {
            self.activate(tenant, conn);
        }
    }

    /// Puts `request` ahead of every lane: a retry after a worker death, or
    /// a request a worker could not take after all.
    pub fn push_retry(&mut self, request: Request) {
        self.count_in(&request);
        self.retries.push_back(request);
    }

    /// Like [`FairQueue::push_retry`], but ahead of the other retries (the
    /// request was just taken from the front).
    pub fn push_front(&mut self, request: Request) {
        self.count_in(&request);
        self.retries.push_front(request);
    }

    /// The next request by turn: retries first, then one request from the
    /// next connection of the next tenant.
    pub fn pop(&mut self) -> Option<Request> {
        if let Some(request) = self.retries.pop_front() {
            self.count_out(&request);
            return Some(request);
        }
        let tenant = self.turns.pop_front()?;
        let ring = self.rings.get_mut(&tenant)?;
        let conn = ring.pop_front()?;
        let lane = self.lanes.get_mut(&conn)?;
        let request = lane.requests.pop_front();
        if lane.requests.is_empty() {
            self.lanes.remove(&conn);
        } else {
            ring.push_back(conn);
        }
        if ring.is_empty() {
            self.rings.remove(&tenant);
        } else {
            self.turns.push_back(tenant);
        }
        if let Some(request) = &request {
            self.count_out(request);
        }
        request
    }

    /// Takes every request of connection `conn` out (its client is gone).
    pub fn remove_connection(&mut self, conn: u64) -> Vec<Request> {
        let Some(lane) = self.lanes.remove(&conn) else {
            return Vec::new();
        };
        self.deactivate(lane.tenant, conn);
        let requests: Vec<Request> = lane.requests.into_iter().collect();
        for request in &requests {
            self.count_out(request);
        }
        requests
    }

    /// Takes every request for which `pred` holds out, in no particular
    /// order (expired deadlines, clients gone).
    pub fn take_where(&mut self, mut pred: impl FnMut(&Request) -> bool) -> Vec<Request> {
        let mut taken = Vec::new();
        let retries = std::mem::take(&mut self.retries);
        for request in retries {
            if pred(&request) {
                taken.push(request);
            } else {
                self.retries.push_back(request);
            }
        }
        let mut emptied = Vec::new();
        for (&conn, lane) in &mut self.lanes {
            let requests = std::mem::take(&mut lane.requests);
            for request in requests {
                if pred(&request) {
                    taken.push(request);
                } else {
                    lane.requests.push_back(request);
                }
            }
            if lane.requests.is_empty() {
                emptied.push((lane.tenant, conn));
            }
        }
        for (tenant, conn) in emptied {
            self.lanes.remove(&conn);
            self.deactivate(tenant, conn);
        }
        for request in &taken {
            self.count_out(request);
        }
        taken
    }

    /// True if any waiting request satisfies `pred`.
    pub fn any(&self, mut pred: impl FnMut(&Request) -> bool) -> bool {
        self.retries.iter().any(&mut pred)
            || self
                .lanes
                .values()
                .any(|lane| lane.requests.iter().any(&mut pred))
    }

    /// Longest-queue drop: takes out the newest request of the client that
    /// holds the most (by `measure`) if it holds more than `newcomer` would
    /// after adding `weight`; `None` when the newcomer is itself the
    /// heaviest (then it is the one to refuse).
    pub fn evict_for(
        &mut self,
        newcomer: ClientKey,
        weight: u64,
        measure: Measure,
    ) -> Option<Request> {
        let size = |r: &Request| match measure {
            Measure::Count => 1,
            Measure::Bytes => r.bytes,
        };
        let mut per_tenant: BTreeMap<Tenant, u64> = BTreeMap::new();
        for lane in self.lanes.values() {
            *per_tenant.entry(lane.tenant).or_default() +=
                lane.requests.iter().map(size).sum::<u64>();
        }
        let (&tenant, &tenant_weight) = per_tenant.iter().max_by_key(|(_, w)| **w)?;
        let newcomer_tenant_weight =
            per_tenant.get(&newcomer.tenant).copied().unwrap_or(0) + weight;
        let (conn, lane_weight) = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.tenant == tenant)
            .map(|(conn, lane)| (*conn, lane.requests.iter().map(size).sum::<u64>()))
            .max_by_key(|(_, w)| *w)?;
        let heavier = if tenant != newcomer.tenant {
            tenant_weight > newcomer_tenant_weight
        } else {
            // Same user: compare the connections.
            let newcomer_lane = self
                .lanes
                .get(&newcomer.conn)
                .map_or(0, |lane| lane.requests.iter().map(size).sum::<u64>())
                + weight;
            conn != newcomer.conn && lane_weight > newcomer_lane
        };
        if !heavier {
            return None;
        }
        let lane = self.lanes.get_mut(&conn)?;
        let victim = lane.requests.pop_back()?;
        if lane.requests.is_empty() {
            self.lanes.remove(&conn);
            self.deactivate(tenant, conn);
        }
        self.count_out(&victim);
        Some(victim)
    }

    /// A lane that was empty gets the next turn, ahead of lanes that stayed
    /// busy (sparse flows first, as fq_codel does): a client sending one
    /// request at a time waits for the next free worker, not for a turn
    /// behind every flooder. A lane stays newly active only until served, so
    /// a busy client gains nothing from it.
    fn activate(&mut self, tenant: Tenant, conn: u64) {
        let ring = self.rings.entry(tenant).or_default();
        if ring.is_empty() {
            self.turns.push_front(tenant);
        }
        ring.push_front(conn);
    }

    fn deactivate(&mut self, tenant: Tenant, conn: u64) {
        let Some(ring) = self.rings.get_mut(&tenant) else {
            return;
        };
        ring.retain(|c| *c != conn);
        if ring.is_empty() {
            self.rings.remove(&tenant);
            self.turns.retain(|t| *t != tenant);
        }
    }

    fn count_in(&mut self, request: &Request) {
        self.len += 1;
        self.bytes += request.bytes;
    }

    fn count_out(&mut self, request: &Request) {
        self.len -= 1;
        self.bytes -= request.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Responder;
    use std::sync::Arc;
    use tokio::time::Instant;

    fn request(id: u64, uid: u32, conn: u64, text: &str) -> Request {
        let now = Instant::now();
        Request::new(
            id,
            ClientKey {
                tenant: Tenant::Uid(uid),
                conn,
            },
            crate::request::Task::Embed,
            Arc::from(vec![text.to_owned()]),
            now,
            now,
            Responder::detached(id),
        )
    }

    fn drain(queue: &mut FairQueue) -> Vec<u64> {
        std::iter::from_fn(|| queue.pop()).map(|r| r.id).collect()
    }

    #[test]
    fn connections_take_turns() {
        let mut queue = FairQueue::new();
        for id in 1..=5 {
            queue.push(request(id, 0, 1, "flood"));
        }
        queue.push(request(10, 0, 2, "polite"));
        queue.push(request(11, 0, 2, "polite"));
        assert_eq!(queue.len(), 7);
        // The newly active connection goes first, then they alternate.
        assert_eq!(drain(&mut queue), [10, 1, 11, 2, 3, 4, 5]);
        assert!(queue.is_empty());
        assert_eq!(queue.bytes(), 0);
    }

    #[test]
    fn users_take_turns_before_their_connections() {
        let mut queue = FairQueue::new();
        // uid 1 has three busy connections, uid 2 one.
        for conn in 1..=3 {
            for n in 0..2 {
                queue.push(request(conn * 10 + n, 1, conn, "a"));
            }
        }
        queue.push(request(100, 2, 9, "b"));
        queue.push(request(101, 2, 9, "b"));
        // Uids alternate while both have work; within uid 1 its connections
        // take turns (the latest to become active first).
        assert_eq!(drain(&mut queue), [100, 30, 101, 20, 10, 31, 21, 11]);
    }

    #[test]
    fn a_client_sending_one_at_a_time_goes_ahead_of_a_flood() {
        let mut queue = FairQueue::new();
        for id in 1..=50 {
            queue.push(request(id, 0, 1, "flood"));
        }
        assert_eq!(queue.pop().map(|r| r.id), Some(1));
        queue.push(request(100, 0, 2, "polite"));
        assert_eq!(queue.pop().map(|r| r.id), Some(100));
        assert_eq!(queue.pop().map(|r| r.id), Some(2));
        queue.push(request(101, 0, 2, "polite"));
        assert_eq!(queue.pop().map(|r| r.id), Some(101));
        // The flooder never counts as newly active: its lane never empties.
        assert_eq!(drain(&mut queue)[..2], [3, 4]);
    }

    #[test]
    fn retries_go_first() {
        let mut queue = FairQueue::new();
        queue.push(request(1, 0, 1, "x"));
        queue.push_retry(request(2, 0, 2, "x"));
        queue.push_front(request(3, 0, 3, "x"));
        assert_eq!(drain(&mut queue), [3, 2, 1]);
    }

    #[test]
    fn removing_a_connection_takes_its_requests_only() {
        let mut queue = FairQueue::new();
        queue.push(request(1, 0, 1, "gone"));
        queue.push(request(2, 0, 2, "stays"));
        queue.push(request(3, 0, 1, "gone"));
        let removed: Vec<u64> = queue.remove_connection(1).iter().map(|r| r.id).collect();
        assert_eq!(removed, [1, 3]);
        assert_eq!(queue.len(), 1);
        assert_eq!(drain(&mut queue), [2]);
        assert!(queue.remove_connection(7).is_empty());
    }

    #[test]
    fn take_where_keeps_the_rotation_consistent() {
        let mut queue = FairQueue::new();
        queue.push(request(1, 0, 1, "x"));
        queue.push(request(2, 0, 2, "expired"));
        queue.push(request(3, 0, 1, "x"));
        queue.push_retry(request(4, 0, 3, "expired"));
        let taken = queue.take_where(|r| r.texts[0] == "expired");
        assert_eq!(taken.len(), 2);
        assert!(queue.any(|r| r.id == 3));
        assert!(!queue.any(|r| r.id == 2));
        assert_eq!(drain(&mut queue), [1, 3]);
    }

    #[test]
    fn the_heaviest_client_is_pushed_out_not_the_newcomer() {
        let mut queue = FairQueue::new();
        for id in 1..=4 {
            queue.push(request(id, 0, 1, "flood"));
        }
        queue.push(request(5, 0, 2, "polite"));
        // Same uid, another connection: the flooder's newest goes.
        let victim = queue.evict_for(
            ClientKey {
                tenant: Tenant::Uid(0),
                conn: 2,
            },
            1,
            Measure::Count,
        );
        assert_eq!(victim.map(|r| r.id), Some(4));
        // The flooder itself gets nothing pushed out for it.
        assert!(queue
            .evict_for(
                ClientKey {
                    tenant: Tenant::Uid(0),
                    conn: 1
                },
                1,
                Measure::Count
            )
            .is_none());
        // Another uid: the heaviest uid loses, by bytes as well.
        let victim = queue.evict_for(
            ClientKey {
                tenant: Tenant::Uid(7),
                conn: 9,
            },
            3,
            Measure::Bytes,
        );
        assert_eq!(victim.map(|r| r.id), Some(3));
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.bytes(), 5 + 5 + 6);
        // Equal shares: nobody is heavier than a newcomer with as much.
        let mut even = FairQueue::new();
        even.push(request(1, 0, 1, "x"));
        assert!(even
            .evict_for(
                ClientKey {
                    tenant: Tenant::Uid(1),
                    conn: 2
                },
                1,
                Measure::Count
            )
            .is_none());
    }
}
