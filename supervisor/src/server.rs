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
use tracing::{debug, info, info_span, warn, Instrument};

use crate::access::Peer;
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
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(err) => {
            warn!(error = %err, "cannot read the client's credentials; closing");
            return;
        }
    };
    let span = info_span!("conn", peer_uid = peer.uid, peer_gid = peer.gid, peer_pid = ?peer.pid);
    serve_peer(stream, peer, config, pool, shutdown)
        .instrument(span)
        .await;
}

async fn serve_peer(
    stream: UnixStream,
    peer: Peer,
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
    if let Err(reason) = config.access.admit(peer) {
        warn!(%reason, "refusing client");
        refuse_peer(&mut conn, reason).await;
        return;
    }
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<ServerMessage>();
    let mut outstanding: usize = 0;
    let mut reading = true;
    loop {
        tokio::select! {
            message = conn.recv(), if reading => match message {
                Ok(Some(message)) => {
                    outstanding += 1;
                    let responder = Responder::new(message.id(), answers_tx.clone());
                    if message.is_control() {
                        if let Err(reason) = config.access.control(peer) {
                            warn!(%reason, "refusing control request");
                            responder.fail(RequestError::PermissionDenied { reason });
                            continue;
                        }
                    }
                    submit(message, responder, &pool, &shutdown).await;
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

/// Answers the refused peer's first request with `permission denied`, so it
/// learns why, then the connection closes.
async fn refuse_peer(conn: &mut ClientConnection, reason: String) {
    let first = tokio::time::timeout(inferd_proto::HANDSHAKE_TIMEOUT, conn.recv()).await;
    if let Ok(Ok(Some(message))) = first {
        let answer = ServerMessage::Error {
            id: message.id(),
            error: RequestError::PermissionDenied { reason },
        };
        let _ = conn.send(&answer).await;
    }
}

/// Hands one request to the pool; embed requests after shutdown began are
/// answered at once.
async fn submit(
    message: ClientMessage,
    responder: Responder,
    pool: &mpsc::Sender<PoolMsg>,
    shutdown: &CancellationToken,
) {
    let msg = match message {
        ClientMessage::Embed {
            texts, deadline_ms, ..
        } => {
            if shutdown.is_cancelled() {
                responder.fail(RequestError::ShuttingDown);
                return;
            }
            PoolMsg::Embed {
                texts,
                deadline: deadline_ms.map(Duration::from_millis),
                responder,
            }
        }
        ClientMessage::Status { .. } => PoolMsg::Status { responder },
        ClientMessage::Metrics { .. } => PoolMsg::Metrics { responder },
        ClientMessage::Roll { .. } => PoolMsg::Roll {
            config: None,
            responder: Some(responder),
        },
    };
    if let Err(mpsc::error::SendError(msg)) = pool.send(msg).await {
        msg.refuse(RequestError::ShuttingDown);
    }
}
