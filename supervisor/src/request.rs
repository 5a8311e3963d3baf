//! A client request inside the supervisor, and the handle that answers it.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use inferd_proto::{EmbedResult, PoolStatus, RequestError, ServerMessage, Timing, TokenizeResult};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::error;

/// Sends the one answer to a client request back to its connection. Consumed
/// by answering; if dropped unanswered (a bug), it answers `internal` itself,
/// so a request can never be left hanging.
#[derive(Debug)]
pub struct Responder {
    /// The client's id for the request.
    id: u64,
    /// The connection's outgoing queue; `None` once answered.
    tx: Option<mpsc::UnboundedSender<ServerMessage>>,
}

impl Responder {
    /// A responder for client request `id` on the connection behind `tx`.
    pub fn new(id: u64, tx: mpsc::UnboundedSender<ServerMessage>) -> Self {
        Self { id, tx: Some(tx) }
    }

    /// A responder with nowhere to answer (unit tests of the queue).
    #[cfg(test)]
    pub fn detached(id: u64) -> Self {
        Self { id, tx: None }
    }

    /// True when the client connection is gone: nobody would read an answer.
    pub fn client_gone(&self) -> bool {
        self.tx.as_ref().is_none_or(|tx| tx.is_closed())
    }

    /// Answers an embed or tokenize request with what the worker made.
    pub fn answer(self, outcome: Outcome, timing: Timing) {
        let id = self.id;
        self.send(match outcome {
            Outcome::Embedded(result) => ServerMessage::Embeddings { id, result, timing },
            Outcome::Tokenized(result) => ServerMessage::Tokens { id, result, timing },
        });
    }

    /// Answers any request with an error.
    pub fn fail(self, error: RequestError) {
        let id = self.id;
        self.send(ServerMessage::Error { id, error });
    }

    /// Answers a roll request: complete, `replaced` workers replaced.
    pub fn rolled(self, replaced: u32) {
        let id = self.id;
        self.send(ServerMessage::Rolled { id, replaced });
    }

    /// Answers a metrics request.
    pub fn metrics(self, text: String) {
        let id = self.id;
        self.send(ServerMessage::Metrics { id, text });
    }

    /// Answers a status request.
    pub fn status(self, status: PoolStatus) {
        let id = self.id;
        self.send(ServerMessage::Status {
            id,
            status: Box::new(status),
        });
    }

    /// Gives up on answering because the client is gone.
    pub fn abandon(mut self) {
        self.tx = None;
    }

    fn send(mut self, message: ServerMessage) {
        if let Some(tx) = self.tx.take() {
            // A closed connection cannot be answered; nothing else to do.
            let _ = tx.send(message);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            error!(
                client_request_id = self.id,
                "request dropped without an answer (bug)"
            );
            let _ = tx.send(ServerMessage::Error {
                id: self.id,
                error: RequestError::Internal {
                    message: "request dropped without an answer".into(),
                },
            });
        }
    }
}

/// Whose share of the queue and of the connection caps a connection draws
/// on: the fair queue takes turns between tenants, and each tenant holds at
/// most `max_connections_per_uid` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tenant {
    /// A Unix socket peer, by its uid (`SO_PEERCRED`).
    Uid(u32),
    /// Every client of the TCP listener, together: the network door
    /// cannot crowd out local users however many connections it opens.
    Tcp,
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Tcp => f.write_str("the TCP listener"),
        }
    }
}

/// Which client a request came from: the queue takes turns by tenant, then
/// by connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The connection's tenant.
    pub tenant: Tenant,
    /// The connection, numbered by the supervisor.
    pub conn: u64,
}

/// What a request asks a worker for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Vectors for the texts.
    Embed,
    /// The texts' tokens, as embedding them would see them.
    Tokenize,
}

/// A worker's answer to a request, by [`Task`].
#[derive(Debug)]
pub enum Outcome {
    /// Answer to [`Task::Embed`].
    Embedded(EmbedResult),
    /// Answer to [`Task::Tokenize`].
    Tokenized(TokenizeResult),
}

/// An accepted request (embed or tokenize), owned by the queue or by the
/// worker running it.
#[derive(Debug)]
pub struct Request {
    /// Supervisor-wide id (the client's own id is inside the responder).
    pub id: u64,
    /// Who sent it.
    pub client: ClientKey,
    /// What it asks for.
    pub task: Task,
    /// The texts, kept until answered so the request can be re-dispatched;
    /// shared with the worker command, never copied per dispatch.
    pub texts: Arc<[String]>,
    /// Bytes of text, counted against the queue's byte budget.
    pub bytes: u64,
    /// Hash of the texts: identifies a poison input in logs without logging it.
    pub fingerprint: u64,
    /// When the supervisor accepted it.
    pub accepted: Instant,
    /// When it must be answered by.
    pub deadline: Instant,
    /// When it was last handed to a worker.
    pub dispatched: Option<Instant>,
    /// Worker deaths it was in flight for.
    pub deaths: u32,
    /// Where the answer goes.
    pub responder: Responder,
}

impl Request {
    /// A new request accepted at `now`.
    pub fn new(
        id: u64,
        client: ClientKey,
        task: Task,
        texts: Arc<[String]>,
        now: Instant,
        deadline: Instant,
        responder: Responder,
    ) -> Self {
        let mut hasher = DefaultHasher::new();
        texts.hash(&mut hasher);
        Self {
            id,
            client,
            task,
            bytes: texts.iter().map(|t| t.len() as u64).sum(),
            texts,
            fingerprint: hasher.finish(),
            accepted: now,
            deadline,
            dispatched: None,
            deaths: 0,
            responder,
        }
    }

    /// Where its time went, answered at `now`: before the last dispatch,
    /// and since.
    pub fn timing(&self, now: Instant) -> Timing {
        let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let dispatched = self.dispatched.unwrap_or(now);
        Timing {
            queue_us: micros(dispatched.saturating_duration_since(self.accepted)),
            inference_us: micros(now.saturating_duration_since(dispatched)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_responder_answers_internal_exactly_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        drop(Responder::new(5, tx.clone()));
        match rx.try_recv().unwrap() {
            ServerMessage::Error {
                id: 5,
                error: RequestError::Internal { .. },
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        Responder::new(6, tx).fail(RequestError::ShuttingDown);
        assert_eq!(rx.try_recv().unwrap().id(), Some(6));
        assert!(rx.try_recv().is_err(), "answered once, nothing from drop");
    }
}
