//! HTTP/1.1 on the client socket: OpenAI's and text-embeddings-inference's
//! embedding APIs, `/health`, `/info` and `/metrics`.
//!
//! One socket path serves both protocols. After a connection is admitted
//! (connection caps, then the access policy, exactly as for native clients;
//! see [`crate::server`]), [`sniff`] peeks at its first bytes without
//! consuming them (`MSG_PEEK`), bounded by the handshake timeout: the native
//! protocol starts with the hello's `u32` little-endian length, at most
//! [`inferd_proto::HELLO_MAX_BYTES`] (1 KiB), so its third and fourth bytes
//! are zero; HTTP starts with an ASCII method (`GET `, `POST`). The stream
//! is then handed, untouched, to the native connection loop or to [`serve`].
//! So the daemon now writes its hello after the client's first bytes
//! arrived, not before; native clients send their hello without waiting for
//! ours.
//!
//! An optional TCP listener (`http_listen`) serves the same API: its
//! connections are admitted under the same connection caps, all of them
//! together as one tenant ([`Tenant::Tcp`]), and when `api_keys_file` is
//! set every route but `/health` needs a key ([`auth`]). A refused
//! connection (caps, access policy) that speaks HTTP gets an HTTP answer
//! ([`refusal`]), 503 with `Retry-After` or 403, not the native frame.
//!
//! [`serve`] runs hyper's HTTP/1.1 server on the connection with axum
//! routing ([`api`]). Every embedding route translates into the same
//! [`PoolMsg::Embed`] a native request becomes, with the connection's
//! [`ClientKey`] (so the fair queue takes turns between HTTP and native
//! clients alike), its own in-transit ticket and one [`Responder`] whose
//! answer the handler awaits: one queue, one deadline rule, one set of
//! counters. Keep-alive is on; [`HEADER_READ_TIMEOUT`] bounds both a
//! request head that trickles in and a keep-alive connection left idle, so
//! slow clients cannot pin connections. On shutdown the connection finishes
//! the request in progress and closes (hyper's graceful shutdown), like the
//! native path.
//!
//! [`Responder`]: crate::request::Responder

mod api;
pub mod auth;
pub mod error;
mod inputs;
mod openai_ids;

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use inferd_proto::RequestError;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, warn, Instrument};

use crate::access::Peer;
use crate::config::LiveConfig;
use crate::connections::{ConnectionLimits, ConnectionPermit};
use crate::pool::PoolMsg;
use crate::request::{ClientKey, Tenant};

use self::auth::ApiKeys;

/// A request head (or, between requests of a keep-alive connection, the
/// next one) must arrive within this long, or the connection is closed.
/// As uvicorn's keep-alive timeout: long enough for any real client, short
/// enough that idle or trickling connections do not hold places.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Which protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// inferd's bincode frames (starts with the hello's length prefix).
    Native,
    /// HTTP/1.x (starts with an ASCII method).
    Http,
}

/// Tells the protocol from up to four peeked bytes; `None` while more are
/// needed. Decided on the first byte where it can be: a length prefix whose
/// low byte is not an ASCII capital cannot be a method. Otherwise the third
/// byte decides: zero in every hello's length prefix (at most 1 KiB), a
/// letter in every HTTP method (all have at least three).
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    match bytes {
        [] => None,
        [first, ..] if !first.is_ascii_uppercase() => Some(Protocol::Native),
        [_] | [_, _] => None,
        [_, _, 0, ..] => Some(Protocol::Native),
        [_, _, _, ..] => Some(Protocol::Http),
    }
}

/// Peeks at the connection's first bytes, without consuming them, until
/// they tell the protocol. A peer that closes before that is treated as
/// native: the native loop reports its truncated hello as usual. The caller
/// bounds the wait (the handshake timeout).
pub async fn sniff(stream: &UnixStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; 4];
    loop {
        stream.readable().await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = peek(stream, &mut buf)?;
            if n == 0 {
                return Ok(None);
            }
            match classify(&buf[..n]) {
                Some(protocol) => Ok(Some(protocol)),
                // Too few bytes yet: report "would block" so tokio clears
                // the readiness and the next `readable()` waits for more
                // data, instead of peeking the same bytes in a busy loop.
                // A peer that already closed sends no more, so decide now.
                None if read_closed(stream) => Ok(Some(Protocol::Native)),
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        });
        match peeked {
            Ok(Some(protocol)) => return Ok(protocol),
            Ok(None) => return Ok(Protocol::Native),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}

/// `recv(MSG_PEEK)` of up to `buf.len()` bytes, without waiting.
pub fn peek(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes, and the fd is
    // owned by `stream`, alive for the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// True when the peer has shut down its writing side (or closed).
fn read_closed(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for an fd we own, and a zero timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// State shared by every HTTP connection of the daemon.
#[derive(Debug, Default)]
pub struct HttpShared {
    /// The native path's read budget (`max_queued_bytes`): a request body
    /// beyond [`inferd_proto::FREE_FRAME_BYTES`] takes its permits before it
    /// is read, so stalled large bodies cannot together hold more than the
    /// budget. `None` only in unit tests.
    read_budget: Option<Arc<Semaphore>>,
    /// The served model's vector length, learnt from the first answer
    /// (the supervisor never loads the model), with the model name it was
    /// learnt for: a reload may change the model.
    dims: Mutex<Option<(String, u32)>>,
    /// Keys TCP clients must present (`api_keys_file`); replaced on reload,
    /// and read per request, so a revoked key stops working at once even on
    /// an open keep-alive connection.
    api_keys: RwLock<ApiKeys>,
}

impl HttpShared {
    /// Shared state whose request bodies draw on `read_budget`, with the
    /// TCP listener's keys.
    pub fn new(read_budget: Arc<Semaphore>, api_keys: ApiKeys) -> Self {
        Self {
            read_budget: Some(read_budget),
            api_keys: RwLock::new(api_keys),
            ..Self::default()
        }
    }

    /// Replaces the TCP listener's keys (SIGHUP).
    pub fn set_api_keys(&self, keys: ApiKeys) {
        *self.api_keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// True when TCP clients need a key and `presented` (an `Authorization`
    /// header's value) carries none of them.
    fn refuses_key(&self, presented: Option<&[u8]>) -> bool {
        let keys = self.api_keys.read().unwrap_or_else(|p| p.into_inner());
        if keys.is_empty() {
            return false;
        }
        !presented
            .and_then(auth::bearer)
            .is_some_and(|key| keys.accepts(key))
    }

    /// Permits for a body of `len` bytes (`None`: unknown, chunked), held
    /// while it is read; none for a small body.
    async fn body_permits(&self, len: Option<u64>, max: usize) -> Option<OwnedSemaphorePermit> {
        let budget = self.read_budget.as_ref()?;
        let len = len.map_or(max, |l| usize::try_from(l).unwrap_or(max).min(max));
        let beyond = len
            .checked_sub(inferd_proto::FREE_FRAME_BYTES)
            .filter(|b| *b > 0)?;
        let permits = u32::try_from(beyond).unwrap_or(u32::MAX);
        Arc::clone(budget).acquire_many_owned(permits).await.ok()
    }

    /// The vector length of `model`, if an answer has told it.
    fn dims(&self, model: &str) -> Option<u32> {
        let known = self.dims.lock().unwrap_or_else(|p| p.into_inner());
        known
            .as_ref()
            .filter(|(name, _)| name == model)
            .map(|(_, dims)| *dims)
    }

    /// Remembers the vector length of `model`.
    fn learn_dims(&self, model: &str, dims: u32) {
        let mut known = self.dims.lock().unwrap_or_else(|p| p.into_inner());
        if known
            .as_ref()
            .is_none_or(|(name, d)| name != model || *d != dims)
        {
            *known = Some((model.to_owned(), dims));
        }
    }
}

/// Which listener a connection came in by, which decides what it must show.
#[derive(Debug, Clone, Copy)]
pub enum Door {
    /// The Unix socket: the peer's credentials were checked when it was
    /// accepted; `/metrics`, a control operation, checks them again.
    Unix(Peer),
    /// The TCP listener: every route but `/health` needs an API key when
    /// keys are configured.
    Tcp,
}

/// What the handlers of one HTTP connection share.
#[derive(Debug)]
struct ConnState {
    /// The configuration as it is now (see [`LiveConfig`]).
    config: LiveConfig,
    /// How the connection came in.
    door: Door,
    /// The connection, as the fair queue knows it.
    client: ClientKey,
    /// Places in the channel to the pool (see [`crate::server`]); HTTP/1.1
    /// answers one request at a time, but the rule is the same.
    in_transit: Arc<Semaphore>,
    /// The pool.
    pool: mpsc::Sender<PoolMsg>,
    /// Cancelled when the daemon shuts down.
    shutdown: CancellationToken,
    /// Numbers this connection's requests for their responders.
    next_id: AtomicU64,
    /// Daemon-wide HTTP state.
    shared: Arc<HttpShared>,
}

impl ConnState {
    /// The configuration now; each request takes one snapshot.
    fn config(&self) -> Arc<crate::config::Config> {
        Arc::clone(&self.config.borrow())
    }
}

/// Everything [`serve`] needs besides the socket.
pub struct HttpContext {
    /// The configuration as it is now (see [`LiveConfig`]).
    pub config: LiveConfig,
    /// The pool.
    pub pool: mpsc::Sender<PoolMsg>,
    /// Cancelled when the daemon shuts down.
    pub shutdown: CancellationToken,
    /// Daemon-wide HTTP state.
    pub shared: Arc<HttpShared>,
    /// Embed requests of one connection on their way to the pool at once.
    pub in_transit: usize,
}

/// Serves HTTP/1.1 on an admitted connection until the client closes it,
/// it idles past [`HEADER_READ_TIMEOUT`], or the daemon shuts down (after
/// the request in progress is answered).
pub async fn serve<S>(
    stream: S,
    door: Door,
    conn_id: u64,
    _permit: ConnectionPermit,
    cx: HttpContext,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = cx.shutdown.clone();
    let tenant = match door {
        Door::Unix(peer) => Tenant::Uid(peer.uid),
        Door::Tcp => Tenant::Tcp,
    };
    let state = Arc::new(ConnState {
        config: cx.config,
        door,
        client: ClientKey {
            tenant,
            conn: conn_id,
        },
        in_transit: Arc::new(Semaphore::new(cx.in_transit)),
        pool: cx.pool,
        shutdown: cx.shutdown,
        next_id: AtomicU64::new(0),
        shared: cx.shared,
    });
    let service = TowerToHyperService::new(api::router(state));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            debug!("shutting down: closing the HTTP connection after its request in progress");
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    match result {
        Ok(()) => debug!("HTTP client done"),
        // Header timeouts, resets and malformed requests end up here; hyper
        // already answered what it could (400, 408, 431).
        Err(err) => debug!(error = %err, "HTTP connection ended"),
    }
}

/// Everything a connection of the TCP listener needs besides its socket.
pub struct TcpContext {
    /// The connection caps (TCP clients are one tenant under them).
    pub limits: Arc<ConnectionLimits>,
    /// Refused peers allowed to linger at once (see [`crate::server`]).
    pub lingering: Arc<Semaphore>,
    /// What an admitted connection is served with.
    pub http: HttpContext,
}

/// Serves one connection of the TCP listener (`http_listen`): admitted
/// under the connection caps as [`Tenant::Tcp`] and served like an HTTP
/// client of the Unix socket, or refused with an HTTP answer.
pub async fn serve_tcp(stream: TcpStream, remote: SocketAddr, conn_id: u64, cx: TcpContext) {
    let span = info_span!("conn", conn_id, %remote);
    async move {
        let permit = match cx.limits.try_admit(Tenant::Tcp) {
            Ok(permit) => permit,
            Err(error) => {
                warn!(%error, "refusing TCP connection");
                refuse_tcp(stream, &error, &cx.lingering).await;
                return;
            }
        };
        // Answers are small and written whole: send them at once.
        if let Err(err) = stream.set_nodelay(true) {
            debug!(error = %err, "cannot set TCP_NODELAY");
        }
        serve(stream, Door::Tcp, conn_id, permit, cx.http).await;
    }
    .instrument(span)
    .await;
}

/// Answers a refused TCP client in HTTP and, with a lingering slot free,
/// reads (at most a few KiB of) what it sent before closing: closing with
/// unread bytes would reset the connection, and the client could lose the
/// answer.
async fn refuse_tcp(mut stream: TcpStream, error: &RequestError, lingering: &Semaphore) {
    let Ok(_slot) = lingering.try_acquire() else {
        let _ = stream.try_write(&refusal(error, false));
        return;
    };
    let _ = tokio::time::timeout(crate::server::REFUSAL_LINGER, async {
        let mut head = [0u8; 64];
        let n = stream.peek(&mut head).await?;
        stream
            .write_all(&refusal(error, is_openai_path(&head[..n])))
            .await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 512];
        let mut read = 0;
        while read < crate::server::REFUSAL_READ_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// The whole HTTP answer to a connection refused before it was served
/// (connection caps, access policy), closing it. `openai` picks the body
/// shape of the `/v1/*` routes.
pub fn refusal(error: &RequestError, openai: bool) -> Vec<u8> {
    let flavor = if openai {
        error::Flavor::OpenAi
    } else {
        error::Flavor::Tei
    };
    let api_error = error::ApiError::from_request(flavor, error);
    let status = api_error.status;
    let body = api_error.body().to_string();
    let retry_after = api_error
        .retry_after
        .map(|seconds| format!("Retry-After: {seconds}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry_after}Connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// True when a request's first bytes name a `/v1/` path (OpenAI's routes).
pub fn is_openai_path(head: &[u8]) -> bool {
    head.split(|b| *b == b' ')
        .nth(1)
        .is_some_and(|path| path.starts_with(b"/v1/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_native_from_http() {
        let hello_len = |len: u32| len.to_le_bytes();
        assert_eq!(classify(&hello_len(30)), Some(Protocol::Native));
        // A hello whose length's low byte is a capital letter ('G' = 71).
        assert_eq!(classify(&hello_len(71)), Some(Protocol::Native));
        assert_eq!(classify(&hello_len(1024)), Some(Protocol::Native));
        assert_eq!(classify(&hello_len(71)[..2]), None, "needs the third byte");
        for method in ["GET ", "POST", "PUT ", "HEAD", "DELE", "OPTI", "PATC"] {
            assert_eq!(
                classify(method.as_bytes()),
                Some(Protocol::Http),
                "{method}"
            );
        }
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(classify(&[0x03]), Some(Protocol::Native), "decided early");
    }

    #[tokio::test]
    async fn sniffing_peeks_without_consuming_and_waits_for_enough_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        client.write_all(b"GE").await.expect("write");
        let sniffing = tokio::spawn(async move {
            let protocol = sniff(&server).await.expect("sniff");
            (protocol, server)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sniffing.is_finished(), "two bytes do not decide");
        client.write_all(b"T / HTTP/1.1\r\n").await.expect("write");
        let (protocol, mut server) = tokio::time::timeout(Duration::from_secs(5), sniffing)
            .await
            .expect("decided once more bytes came")
            .expect("task");
        assert_eq!(protocol, Protocol::Http);
        let mut head = [0u8; 4];
        server.read_exact(&mut head).await.expect("read");
        assert_eq!(&head, b"GET ", "nothing was consumed");

        let (mut client, server) = UnixStream::pair().expect("socketpair");
        client.write_all(b"P").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let protocol = tokio::time::timeout(Duration::from_secs(5), sniff(&server))
            .await
            .expect("a closed peer is decided at once")
            .expect("sniff");
        assert_eq!(protocol, Protocol::Native);
    }
}
