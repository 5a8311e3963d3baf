//! Client connections: one task each. A connection reads requests, hands
//! them to the pool with a [`Responder`] that feeds its outgoing queue, and
//! writes answers as they come, so requests may be pipelined. A bad frame
//! closes this connection only; nothing it sends can reach another client.
//!
//! Before anything is read from a new connection, its peer credentials are
//! checked against the connection caps ([`ConnectionLimits`]) and the access
//! policy. A refused peer gets the supervisor's hello and a
//! [`ServerMessage::Refused`] frame saying why, and the connection closes;
//! nothing it sends is decoded. An admitted peer's hello is read with the
//! small pre-authentication limit ([`inferd_proto::HELLO_MAX_BYTES`]). When the client goes away (closes or resets
//! its socket, as opposed to only shutting down its writing side), the pool
//! is told at once and drops its queued requests unrun.
//!
//! The same socket serves HTTP: after admission, the connection's first
//! bytes are peeked at (bounded by the handshake timeout) and an HTTP
//! client is handed to [`crate::http`]; a native one continues here with
//! its bytes untouched.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use inferd_proto::{encode_frame, ClientMessage, Connection, Hello, RequestError, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::access::Peer;
use crate::config::LiveConfig;
use crate::connections::{ConnectionLimits, ConnectionPermit};
use crate::http::{self, HttpShared, Protocol};
use crate::pool::PoolMsg;
use crate::request::{ClientKey, Responder, Task, Tenant};

/// A refused peer gets this long to read the refusal before the connection
/// closes (closing while its hello is unread would turn our last frames into
/// a reset for some peers).
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes read (and discarded) from a refused peer while lingering.
pub(crate) const REFUSAL_READ_LIMIT: usize = 4096;
/// Embed requests of one connection on their way to the pool at once. The
/// channel to the pool is first come, first served; without this cap a
/// flooding connection could fill it whenever the pool falls behind, and
/// others' requests would wait behind its messages before the fair queue
/// ever saw them. Past the cap the connection stops reading (backpressure).
pub(crate) const IN_TRANSIT_PER_CONNECTION: usize = 4;

/// The supervisor's end of a client connection.
type ClientConnection = Connection<UnixStream, ServerMessage, ClientMessage>;

/// Everything a connection task needs besides its socket.
#[derive(Clone)]
pub struct ServeContext {
    /// The configuration as it is now (see [`LiveConfig`]).
    pub config: LiveConfig,
    /// The connection caps.
    pub limits: Arc<ConnectionLimits>,
    /// Refused peers allowed to linger at once; beyond that a refusal is
    /// written and the connection closed at once, so a flood of refused
    /// connections cannot hold descriptors.
    pub lingering: Arc<tokio::sync::Semaphore>,
    /// Shared by every connection: bytes of request frames still arriving
    /// beyond [`inferd_proto::FREE_FRAME_BYTES`] each (`max_queued_bytes`).
    pub read_budget: Arc<tokio::sync::Semaphore>,
    /// The pool.
    pub pool: mpsc::Sender<PoolMsg>,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
    /// State shared by the HTTP connections.
    pub http: Arc<HttpShared>,
}

/// Serves one client, numbered `conn_id`, until it disconnects, sends a bad
/// frame, or the daemon shuts down with nothing of this client's left to
/// answer.
pub async fn serve_client(stream: UnixStream, conn_id: u64, cx: ServeContext) {
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
    let span =
        info_span!("conn", conn_id, peer_uid = peer.uid, peer_gid = peer.gid, peer_pid = ?peer.pid);
    async move {
        let permit = match admit(&cx, peer) {
            Ok(permit) => permit,
            Err(error) => {
                refuse(stream, error, &cx.lingering).await;
                return;
            }
        };
        let sniff = tokio::time::timeout(inferd_proto::HANDSHAKE_TIMEOUT, http::sniff(&stream));
        let sniffed = tokio::select! {
            sniffed = sniff => sniffed,
            // Nothing of this client's is in the pool yet: nothing to finish.
            _ = cx.shutdown.cancelled() => {
                debug!("shutting down before the client's first bytes; closing");
                return;
            }
        };
        match sniffed {
            Ok(Ok(Protocol::Native)) => serve_peer(stream, peer, conn_id, permit, cx).await,
            Ok(Ok(Protocol::Http)) => {
                let http_cx = http::HttpContext {
                    config: cx.config,
                    pool: cx.pool,
                    shutdown: cx.shutdown,
                    shared: cx.http,
                    in_transit: IN_TRANSIT_PER_CONNECTION,
                };
                http::serve(stream, http::Door::Unix(peer), conn_id, permit, http_cx).await;
            }
            Ok(Err(err)) => info!(error = %err, "cannot read from the client; closing"),
            Err(_) => info!("client sent nothing within the handshake timeout; closing"),
        }
    }
    .instrument(span)
    .await;
}

/// The connection caps, then the access policy.
fn admit(cx: &ServeContext, peer: Peer) -> Result<ConnectionPermit, RequestError> {
    let permit = cx
        .limits
        .try_admit(Tenant::Uid(peer.uid))
        .inspect_err(|error| {
            warn!(%error, "refusing client connection");
        })?;
    if let Err(reason) = cx.config.borrow().access.admit(peer) {
        warn!(%reason, "refusing client");
        cx.limits
            .count_refusal(inferd_proto::RefusalReason::PermissionDenied);
        return Err(RequestError::PermissionDenied { reason });
    }
    Ok(permit)
}

/// Tells a refused peer why, in its own protocol, before anything of it is
/// decoded: a native peer gets our hello and a `Refused` frame, an HTTP one
/// a whole HTTP answer ([`http::refusal`]). With a lingering slot free, the
/// protocol is told from the peer's first bytes (waited for, bounded), and
/// then the peer gets time to finish its side, reading at most a few KiB;
/// without one, from the bytes already there.
async fn refuse(mut stream: UnixStream, error: RequestError, lingering: &tokio::sync::Semaphore) {
    let slot = lingering.try_acquire().ok();
    let mut head = [0u8; 64];
    if slot.is_some() {
        // Bounded; a peer that sends nothing gets the native refusal.
        let _ = tokio::time::timeout(REFUSAL_LINGER, http::sniff(&stream)).await;
    }
    let peeked = http::peek(&stream, &mut head).unwrap_or(0);
    let head = &head[..peeked];
    let bytes = if http::classify(head) == Some(Protocol::Http) {
        http::refusal(&error, http::is_openai_path(head))
    } else {
        let Ok(mut bytes) = encode_frame(&Hello::new("inferd")) else {
            return;
        };
        if let Ok(refusal) = encode_frame(&ServerMessage::Refused { error }) {
            bytes.extend_from_slice(&refusal);
        }
        bytes
    };
    let Some(_slot) = slot else {
        // A fresh socket's send buffer is empty: this small write goes
        // through whole without waiting.
        let _ = stream.try_write(&bytes);
        return;
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&bytes).await?;
        let mut sink = [0u8; 512];
        let mut read = 0;
        while read < REFUSAL_READ_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// True when the peer has closed its socket or reset it (both directions
/// are shut), as opposed to a half-close (shutdown of its writing side
/// only), after which it still reads its answers.
fn peer_gone(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd for an fd we own, and a zero timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

async fn serve_peer(
    stream: UnixStream,
    peer: Peer,
    conn_id: u64,
    _permit: ConnectionPermit,
    cx: ServeContext,
) {
    let ServeContext {
        config,
        read_budget,
        pool,
        shutdown,
        ..
    } = cx;
    // `max_frame_bytes` only takes effect at start: any snapshot will do.
    let max_frame_bytes = config.borrow().max_frame_bytes;
    let mut conn = ClientConnection::new(stream, max_frame_bytes).with_read_budget(read_budget);
    match conn.handshake("inferd").await {
        Ok(hello) => debug!(peer = %hello.software, "client connected"),
        Err(err) => {
            info!(error = %err, "client handshake failed; closing");
            return;
        }
    }
    let client = ClientKey {
        tenant: Tenant::Uid(peer.uid),
        conn: conn_id,
    };
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<ServerMessage>();
    let in_transit = Arc::new(tokio::sync::Semaphore::new(IN_TRANSIT_PER_CONNECTION));
    let mut outstanding: usize = 0;
    let mut reading = true;
    loop {
        tokio::select! {
            message = conn.recv(), if reading => match message {
                Ok(Some(message)) => {
                    outstanding += 1;
                    let responder = Responder::new(message.id(), answers_tx.clone());
                    // Access is checked against the configuration as it is
                    // now: a reload that drops this peer refuses its next
                    // request and closes the connection once it is answered.
                    let current = Arc::clone(&config.borrow());
                    if let Err(reason) = current.access.admit(peer) {
                        warn!(%reason, "the access lists no longer admit this client; closing its connection");
                        responder.fail(RequestError::PermissionDenied { reason });
                        reading = false;
                        continue;
                    }
                    if message.is_control() {
                        if let Err(reason) = current.access.control(peer) {
                            warn!(%reason, "refusing control request");
                            responder.fail(RequestError::PermissionDenied { reason });
                            continue;
                        }
                    }
                    submit(message, client, responder, &in_transit, &pool, &shutdown).await;
                }
                Ok(None) if peer_gone(conn.get_ref()) => {
                    debug!(outstanding, "client gone; dropping its queued requests");
                    break;
                }
                Ok(None) => {
                    debug!("client closed its writing side");
                    reading = false;
                }
                Err(err) if err.is_disconnect() => {
                    debug!(error = %err, outstanding, "client gone; dropping its queued requests");
                    break;
                }
                Err(err) => {
                    warn!(error = %err, "bad frame from client; closing its connection");
                    break;
                }
            },
            Some(answer) = answers.recv() => {
                outstanding -= 1;
                if let Err(err) = conn.send(&answer).await {
                    debug!(error = %err, "cannot write to client; closing");
                    break;
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
    if outstanding > 0 {
        // Dropping `answers` already marks this client's requests as
        // abandoned (the pool checks on its next tick); the message makes it
        // immediate. A full channel is not worth waiting for.
        drop(answers);
        let _ = pool.try_send(PoolMsg::Disconnected { conn: conn_id });
    }
}

/// Hands one request to the pool; embed requests after shutdown began are
/// answered at once.
async fn submit(
    message: ClientMessage,
    client: ClientKey,
    responder: Responder,
    in_transit: &Arc<tokio::sync::Semaphore>,
    pool: &mpsc::Sender<PoolMsg>,
    shutdown: &CancellationToken,
) {
    let task = match message {
        ClientMessage::Tokenize { .. } => Task::Tokenize,
        _ => Task::Embed,
    };
    let msg = match message {
        ClientMessage::Embed {
            texts, deadline_ms, ..
        }
        | ClientMessage::Tokenize {
            texts, deadline_ms, ..
        } => {
            if shutdown.is_cancelled() {
                responder.fail(RequestError::ShuttingDown);
                return;
            }
            let Ok(ticket) = Arc::clone(in_transit).acquire_owned().await else {
                // Never closed; answered rather than dropped all the same.
                responder.fail(RequestError::ShuttingDown);
                return;
            };
            PoolMsg::Embed {
                ticket,
                client,
                task,
                texts: Arc::from(texts),
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
