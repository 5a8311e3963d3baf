//! Shutdown: on SIGTERM the pool takes no new requests, lets queued and
//! running ones finish until the drain deadline (a second signal moves it
//! to now), then asks every worker to exit.

use super::*;

impl Pool {
    pub(super) fn begin_drain(&mut self, now: Instant) {
        let deadline = now + self.config.drain_timeout();
        info!(
            queued = self.queue.len(),
            running = self.workers.values().filter(|w| w.has_job()).count(),
            drain_timeout_ms = self.config.drain_timeout_ms,
            "draining: no new requests; finishing queued and running ones"
        );
        self.phase = Phase::Draining { deadline };
        self.announce_stopping();
        if let Some(roll) = self.roll.take() {
            for waiter in roll.waiters {
                waiter.fail(RequestError::ShuttingDown);
            }
        }
        self.drain_step(deadline, now);
    }

    /// A drain whose deadline is still ahead can be cut short.
    pub(super) fn may_hurry(&self) -> bool {
        matches!(self.phase, Phase::Draining { deadline } if deadline > Instant::now())
    }

    /// Cuts the drain short: its deadline is now.
    pub(super) fn hurry_drain(&mut self, now: Instant) {
        warn!(
            queued = self.queue.len(),
            running = self.workers.values().filter(|w| w.has_job()).count(),
            "second stop signal: cutting the drain short"
        );
        self.phase = Phase::Draining { deadline: now };
        self.drain_step(now, now);
    }

    /// One step of the drain: past the deadline, give up on remaining work;
    /// once no work is left, ask every worker to exit.
    pub(super) fn drain_step(&mut self, deadline: Instant, now: Instant) {
        if now >= deadline {
            while let Some(request) = self.queue.pop() {
                self.finish(request, Err(RequestError::ShuttingDown), now);
            }
            let running: Vec<u64> = self
                .workers
                .values()
                .filter(|w| w.has_job())
                .map(|w| w.id)
                .collect();
            for worker_id in running {
                self.kill(worker_id, KillReason::DrainDeadline, now);
            }
        }
        let working = self.workers.values().any(Worker::has_job);
        if self.queue.is_empty() && !working {
            for worker in self.workers.values_mut() {
                worker.retire(RetireReason::Shutdown, now);
            }
        }
    }

    pub(super) fn drained(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. })
            && self.workers.is_empty()
            && self.queue.is_empty()
    }
}
