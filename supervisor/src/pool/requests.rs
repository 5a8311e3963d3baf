//! The request side of the pool: admission (limits, queue room), dispatch
//! to the longest-idle worker, answers, failover of a dead worker's
//! request (once; twice is poison), and the deadlines of queued requests.
//! Every answer to an accepted request leaves through [`Pool::finish`] (or
//! [`Pool::time_out`], which goes through it) or [`Pool::abandon`]; a
//! request turned away at the door through [`Pool::reject`].

use super::*;

impl Pool {
    /// The limits a request must meet: the configuration's, narrowed by
    /// those of every worker still running that was started with other
    /// limits (after a reload, until the roll has replaced them), so that
    /// no worker can refuse or fail to read a request the pool admitted.
    pub(super) fn request_limits(&self) -> RequestLimits {
        self.workers
            .values()
            .filter(|w| w.is_live())
            .fold(self.config.limits(), |limits, w| limits.narrowest(w.limits))
    }

    pub(super) fn accept(
        &mut self,
        client: ClientKey,
        task: Task,
        texts: Arc<[String]>,
        deadline: Option<Duration>,
        responder: Responder,
        now: Instant,
    ) {
        let rejection = if let Phase::Draining { .. } = self.phase {
            Some(RequestError::ShuttingDown)
        } else if let Err(err) = self.request_limits().check(&texts) {
            Some(err)
        } else {
            self.unavailable()
                .map(|reason| RequestError::Unavailable { reason })
        };
        if let Some(error) = rejection {
            self.reject(responder, error);
            return;
        }
        let deadline = now + deadline.unwrap_or_else(|| self.config.default_deadline());
        let request = Request::new(
            self.next_request_id,
            client,
            task,
            texts,
            now,
            deadline,
            responder,
        );
        self.next_request_id += 1;
        if !self.make_room(&request, now) {
            let error = self.overloaded();
            self.reject(request.responder, error);
            return;
        }
        self.counters.requests_accepted += 1;
        self.queue.push(request);
        self.dispatch(now);
    }

    /// Makes room in a full queue (by count or by bytes) for `request`:
    /// pushes out the newest requests of heavier clients. False when the
    /// newcomer is the heaviest and must be refused itself.
    pub(super) fn make_room(&mut self, request: &Request, now: Instant) -> bool {
        let budget = self.config.max_queued_bytes.as_u64();
        loop {
            let measure = if self.queue.len() >= self.config.queue_capacity {
                Measure::Count
            } else if self.queue.bytes() + request.bytes > budget {
                Measure::Bytes
            } else {
                return true;
            };
            let weight = match measure {
                Measure::Count => 1,
                Measure::Bytes => request.bytes,
            };
            let Some(victim) = self.queue.evict_for(request.client, weight, measure) else {
                return false;
            };
            debug!(
                request_id = victim.id,
                for_request = request.id,
                ?measure,
                "queue full: pushing out the heaviest client's newest request"
            );
            let error = self.overloaded();
            self.finish(victim, Err(error), now);
        }
    }

    pub(super) fn overloaded(&self) -> RequestError {
        RequestError::Overloaded {
            capacity: self.config.queue_capacity as u32,
        }
    }

    /// Hands queued requests to idle workers, longest-idle first.
    pub(super) fn dispatch(&mut self, now: Instant) {
        loop {
            let idle = self
                .workers
                .values()
                .filter_map(|w| match w.state() {
                    WorkerState::Ready { since } => Some((*since, w.id)),
                    _ => None,
                })
                .min();
            let Some((_, worker_id)) = idle else { return };
            let Some(request) = self.pop_runnable(now) else {
                return;
            };
            let Some(worker) = self.workers.get_mut(&worker_id) else {
                return;
            };
            debug!(
                worker_id,
                request_id = request.id,
                texts = request.texts.len(),
                bytes = request.bytes,
                "dispatch"
            );
            if let Err(request) = worker.assign(request, now) {
                self.queue.push_front(*request);
            }
        }
    }

    /// Next queued request worth running: drops those whose client left and
    /// answers those past their deadline.
    pub(super) fn pop_runnable(&mut self, now: Instant) -> Option<Request> {
        while let Some(request) = self.queue.pop() {
            if request.responder.client_gone() {
                self.abandon(request);
                continue;
            }
            if now >= request.deadline {
                self.time_out(request, now);
                continue;
            }
            return Some(request);
        }
        None
    }

    pub(super) fn complete(
        &mut self,
        worker_id: u64,
        request_id: u64,
        result: Result<Outcome, RequestError>,
        now: Instant,
    ) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        match worker.complete(request_id, now) {
            Ok(Some(request)) => {
                self.finish(request, result, now);
                self.judge_worker(worker_id, Reading::Resident, now);
            }
            // Answered already (its deadline passed while it ran).
            Ok(None) => self.judge_worker(worker_id, Reading::Resident, now),
            Err(err) => {
                warn!(worker_id, pid = worker.pid.as_raw(), error = %err, "protocol violation; killing");
                self.kill(worker_id, KillReason::ProtocolViolation, now);
            }
        }
    }

    /// The worker running `request` died: retry once, then quarantine.
    pub(super) fn fail_over(&mut self, mut request: Request, worker_id: u64, now: Instant) {
        request.deaths += 1;
        if request.deaths >= MAX_DEATHS {
            self.counters.poison_rejections += 1;
            error!(
                worker_id,
                request_id = request.id,
                fingerprint = format!("{:016x}", request.fingerprint),
                texts = request.texts.len(),
                bytes = request.bytes,
                deaths = request.deaths,
                "request was in flight at repeated worker deaths; quarantined as poison"
            );
            let deaths = request.deaths;
            self.finish(request, Err(RequestError::WorkerLost { deaths }), now);
        } else {
            self.counters.retries += 1;
            info!(
                worker_id,
                request_id = request.id,
                "re-dispatching the request of a dead worker"
            );
            self.queue.push_retry(request);
        }
    }

    pub(super) fn expire_queued(&mut self, now: Instant) {
        let done = |r: &Request| now >= r.deadline || r.responder.client_gone();
        if !self.queue.any(done) {
            return;
        }
        for request in self.queue.take_where(done) {
            if now >= request.deadline {
                self.time_out(request, now);
            } else {
                self.abandon(request);
            }
        }
    }

    /// Answers `request` `timeout`, with the time since it was accepted.
    pub(super) fn time_out(&mut self, request: Request, now: Instant) {
        let elapsed_ms =
            u64::try_from(now.duration_since(request.accepted).as_millis()).unwrap_or(u64::MAX);
        self.finish(request, Err(RequestError::Timeout { elapsed_ms }), now);
    }

    /// Sends the one answer for `request` and counts it.
    pub(super) fn finish(
        &mut self,
        request: Request,
        result: Result<Outcome, RequestError>,
        now: Instant,
    ) {
        match &result {
            Ok(_) => self.counters.requests_ok += 1,
            Err(err) => self.count_failure(err),
        }
        debug!(
            request_id = request.id,
            ok = result.is_ok(),
            elapsed_us = now.duration_since(request.accepted).as_micros() as u64,
            "answered"
        );
        match result {
            Ok(outcome) => {
                let timing = request.timing(now);
                request.responder.answer(outcome, timing);
            }
            Err(error) => request.responder.fail(error),
        }
    }

    /// Drops a queued request whose client disconnected, unrun: nobody
    /// would read the answer, and a client that gave up and retries must
    /// not double the load.
    pub(super) fn abandon(&mut self, request: Request) {
        debug!(
            request_id = request.id,
            conn = request.client.conn,
            "client gone; dropping its queued request"
        );
        self.counters.requests_abandoned += 1;
        request.responder.abandon();
    }

    /// Answers a request turned away at the door, never queued.
    fn reject(&mut self, responder: Responder, error: RequestError) {
        self.counters.requests_rejected += 1;
        self.count_failure(&error);
        responder.fail(error);
    }

    fn count_failure(&mut self, error: &RequestError) {
        *self
            .counters
            .requests_failed
            .entry(error.kind())
            .or_default() += 1;
    }
}
