//! The request queue, fair between clients.
//!
//! Every accepted request waits here until a worker is free. Requests are
//! kept in one FIFO *lane* per client connection; lanes are grouped by the
//! connection's [`Tenant`]: its uid, or "TCP" for every client of the TCP
//! listener together. Dispatch takes turns: the next tenant in rotation,
//! then the next connection of that tenant, one request each. A client
//! that was idle for a whole round goes ahead of the busy ones, in the
//! order such clients arrived ([`Rotation`]). So a client that floods the
//! daemon delays another client by about one request per worker, not by
//! the whole queue; clients that each send one request at a time are
//! served in turn and cannot starve a busy one; and a user cannot buy a
//! larger share by opening more connections than another user (fairness is
//! per uid first, then per connection within a uid, because several
//! services often share one uid and must not starve each other either).
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

/// Whose turn it is, at one level (tenants, or one tenant's connections):
/// those that just became active (`new`, oldest first), ahead of those that
/// were served and still have work or were served last time round (`old`).
/// A key served from `new` goes to the back of `old`, even if it has
/// nothing left: its place there keeps it from coming back as new at once,
/// so clients that each send one request at a time take turns in order, and
/// together cannot starve a busy client (fq_codel's rule).
#[derive(Debug)]
struct Rotation<K> {
    /// Just became active, oldest first.
    new: VecDeque<K>,
    /// Served before, in turn order.
    old: VecDeque<K>,
}

impl<K> Default for Rotation<K> {
    fn default() -> Self {
        Self {
            new: VecDeque::new(),
            old: VecDeque::new(),
        }
    }
}

impl<K> Rotation<K> {
    /// The next key to serve, taken out.
    fn next(&mut self) -> Option<K> {
        self.new.pop_front().or_else(|| self.old.pop_front())
    }

    /// True when no key is scheduled.
    fn is_empty(&self) -> bool {
        self.new.is_empty() && self.old.is_empty()
    }
}

/// One connection's waiting requests. A lane exists while its connection is
/// in its tenant's rotation, possibly empty (served last time round).
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
    /// Lanes by connection id, while scheduled.
    lanes: HashMap<u64, Lane>,
    /// Per tenant, its scheduled connections. A connection whose lane is
    /// gone (it disconnected) is skipped when its turn comes.
    rings: BTreeMap<Tenant, Rotation<u64>>,
    /// Tenants with a ring, in turn order.
    turns: Rotation<Tenant>,
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
        match self.lanes.get_mut(&conn) {
            Some(lane) => lane.requests.push_back(request),
            None => {
                self.lanes.insert(
                    conn,
                    Lane {
                        tenant,
                        requests: VecDeque::from([request]),
                    },
                );
                self.activate(tenant, conn);
            }
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
        loop {
            let tenant = self.turns.next()?;
            let Some(ring) = self.rings.get_mut(&tenant) else {
                continue;
            };
            let mut served = None;
            while let Some(conn) = ring.next() {
                let Some(lane) = self.lanes.get_mut(&conn) else {
                    continue; // disconnected
                };
                match lane.requests.pop_front() {
                    Some(request) => {
                        ring.old.push_back(conn);
                        served = Some(request);
                        break;
                    }
                    // Served last time round and idle since: its turn
                    // has passed.
                    None => {
                        self.lanes.remove(&conn);
                    }
                }
            }
            match served {
                Some(request) => {
                    self.turns.old.push_back(tenant);
                    self.count_out(&request);
                    return Some(request);
                }
                None => {
                    self.rings.remove(&tenant);
                }
            }
        }
    }

    /// Takes every request of connection `conn` out (its client is gone).
    pub fn remove_connection(&mut self, conn: u64) -> Vec<Request> {
        let Some(lane) = self.lanes.remove(&conn) else {
            return Vec::new();
        };
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
        for lane in self.lanes.values_mut() {
            let requests = std::mem::take(&mut lane.requests);
            for request in requests {
                if pred(&request) {
                    taken.push(request);
                } else {
                    lane.requests.push_back(request);
                }
            }
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
        let victim = self.lanes.get_mut(&conn)?.requests.pop_back()?;
        self.count_out(&victim);
        Some(victim)
    }

    /// Schedules a connection that had no lane: after the others that just
    /// became active, ahead of those that stayed busy (sparse flows first,
    /// as fq_codel does), so a client sending one request at a time waits
    /// for the next free worker, not for a turn behind every flooder. See
    /// [`Rotation`] for why this cannot starve anyone.
    fn activate(&mut self, tenant: Tenant, conn: u64) {
        let ring = self.rings.entry(tenant).or_default();
        if ring.is_empty() {
            self.turns.new.push_back(tenant);
        }
        ring.new.push_back(conn);
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
        // Both became active while idle: in that order, then they alternate.
        assert_eq!(drain(&mut queue), [1, 10, 2, 11, 3, 4, 5]);
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
        // take turns, in the order they became active.
        assert_eq!(drain(&mut queue), [10, 100, 20, 101, 30, 11, 21, 31]);
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

    /// Clients that each send one request at a time, more of them than
    /// workers, next to a flooder: every one is served in turn, the flooder
    /// too, and nobody waits long (a lane that just became active used to
    /// go first among them, last in first out, and one client starved).
    #[test]
    fn one_at_a_time_clients_take_turns_and_cannot_starve_a_flooder() {
        const WORKERS: usize = 2;
        let mut queue = FairQueue::new();
        let mut next_id = 0;
        let mut push = |queue: &mut FairQueue, conn: u64| {
            next_id += 1;
            queue.push(request(next_id, 0, conn, "x"));
        };
        for _ in 0..1000 {
            push(&mut queue, 99); // the flooder's backlog
        }
        for conn in 1..=4 {
            push(&mut queue, conn);
        }
        let mut served: BTreeMap<u64, u32> = BTreeMap::new();
        let mut waited: BTreeMap<u64, u32> = BTreeMap::new();
        let mut longest_wait = 0;
        for _ in 0..200 {
            // Each round the workers take one request each; a polite client
            // sends its next request as soon as its answer comes.
            let taken: Vec<Request> = (0..WORKERS).filter_map(|_| queue.pop()).collect();
            for (&conn, rounds) in &mut waited {
                if taken.iter().all(|r| r.client.conn != conn) {
                    *rounds += 1;
                    longest_wait = longest_wait.max(*rounds);
                }
            }
            for request in taken {
                let conn = request.client.conn;
                *served.entry(conn).or_default() += 1;
                if conn != 99 {
                    waited.insert(conn, 0);
                    push(&mut queue, conn);
                }
            }
        }
        let polite: Vec<u32> = (1..=4)
            .map(|c| served.get(&c).copied().unwrap_or(0))
            .collect();
        let (fewest, most) = (polite.iter().min().unwrap(), polite.iter().max().unwrap());
        assert!(
            most - fewest <= 1,
            "polite clients served unevenly: {polite:?}"
        );
        assert!(
            served.get(&99).copied().unwrap_or(0) >= 40,
            "the flooder starved: {served:?}"
        );
        assert!(
            longest_wait <= 3,
            "a polite client waited {longest_wait} rounds"
        );
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
