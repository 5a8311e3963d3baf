//! Client connections: one task each. A connection reads requests, hands
//! them to the pool with a [`Responder`] that feeds its outgoing queue, and
//! writes answers as they come, so requests may be pipelined. A bad frame
//! closes this connection only; nothing it sends can reach another client.

use std::sync::Arc;
use std::time::Duration;

use inferd_proto::{ClientMessage, Connection, RequestError, ServerMessage};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::pool::PoolMsg;
use crate::request::Responder;

/// The supervisor's end of a client connection.
type ClientConnection = Connection<UnixStream, ServerMessage, ClientMessage>;

/// Serves one client until it disconnects, sends a bad frame, or the daemon
/// shuts down with nothing of this client's left to answer.
pub async fn serve_client(
    stream: UnixStream,
    config: Arc<Config>,
    pool: mpsc::Sender<PoolMsg>,
    shutdown: CancellationToken,
) {
    let mut conn = ClientConnection::new(stream, config.max_frame_bytes);
    match conn.handshake("inferd").await {
        Ok(hello) => debug!(peer = %hello.software, "client connected"),
        Err(err) => {
            info!(error = %err, "client handshake failed; closing");
            return;
        }
    }
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<ServerMessage>();
    let mut outstanding: usize = 0;
    let mut reading = true;
    loop {
        tokio::select! {
            message = conn.recv(), if reading => match message {
                Ok(Some(message)) => {
                    outstanding += 1;
                    submit(message, &answers_tx, &pool, &shutdown).await;
                }
                Ok(None) => {
                    debug!("client closed its end");
                    reading = false;
                }
                Err(err) => {
                    warn!(error = %err, "bad frame from client; closing its connection");
                    return;
                }
            },
            Some(answer) = answers.recv() => {
                outstanding -= 1;
                if let Err(err) = conn.send(&answer).await {
                    debug!(error = %err, "cannot write to client; closing");
                    return;
                }
            }
            _ = shutdown.cancelled(), if outstanding == 0 => {
                debug!("shutting down: closing idle client connection");
                return;
            }
        }
        if !reading && outstanding == 0 {
            return;
        }
    }
}

/// Hands one request to the pool; requests after shutdown began are answered
/// at once.
async fn submit(
    message: ClientMessage,
    answers: &mpsc::UnboundedSender<ServerMessage>,
    pool: &mpsc::Sender<PoolMsg>,
    shutdown: &CancellationToken,
) {
    let (msg, id) = match message {
        ClientMessage::Embed {
            id,
            texts,
            deadline_ms,
        } => (
            PoolMsg::Embed {
                texts,
                deadline: deadline_ms.map(Duration::from_millis),
                responder: Responder::new(id, answers.clone()),
            },
            id,
        ),
        ClientMessage::Status { id } => (
            PoolMsg::Status {
                responder: Responder::new(id, answers.clone()),
            },
            id,
        ),
    };
    let refuse = |msg: PoolMsg| match msg {
        PoolMsg::Embed { responder, .. } => responder.embed(Err(RequestError::ShuttingDown)),
        PoolMsg::Status { responder } => responder.embed(Err(RequestError::ShuttingDown)),
    };
    if shutdown.is_cancelled() && matches!(msg, PoolMsg::Embed { .. }) {
        debug!(client_request_id = id, "refusing request: shutting down");
        refuse(msg);
        return;
    }
    if let Err(mpsc::error::SendError(msg)) = pool.send(msg).await {
        refuse(msg);
    }
}
