//! Client library for the inferd daemon, and the code behind `inferctl`.
//!
//! A [`Client`] owns one Unix-socket connection to the supervisor, opened with
//! the protocol handshake (see [`inferd_proto`] for the byte layout). It sends
//! one request at a time and checks that the answer carries that request's
//! id, so a confused or hostile peer shows up as
//! [`ClientError::UnexpectedResponse`] instead of a wrong result.
//!
//! ```no_run
//! # async fn demo() -> Result<(), inferd_client::ClientError> {
//! let mut client = inferd_client::Client::connect("/run/inferd/inferd.sock").await?;
//! let result = client.embed(vec!["hello world".into()], None).await?;
//! assert_eq!(result.embeddings.len(), 1);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, clippy::unwrap_used)]

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use inferd_proto::{
    ClientMessage, Connection, ProtoError, ServerMessage, TokenizeResult, DEFAULT_MAX_FRAME_BYTES,
};
use tokio::net::UnixStream;

mod display;
mod ready;

pub use display::format_status;
pub use inferd_proto::{
    Counters, EmbedResult, ErrorKind, ExitKind, PoolStatus, RecycleTrigger, RefusalReason,
    RequestError, RollReport, RollState, WorkerStateKind, WorkerStatus,
};
pub use ready::{wait_ready, NotReady, READY_POLL};

/// Program name sent in the hello by [`Client::connect`].
pub const DEFAULT_PROGRAM: &str = "inferd-client";

/// Everything that can go wrong talking to the daemon.
///
/// Each variant's message includes the underlying error's message, so
/// `to_string()` alone is a complete sentence; [`std::error::Error::source`]
/// still leads to the cause for callers that walk the chain.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to {}: {source} (is inferd running? check --socket or INFERD_SOCKET)", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// The hello exchange failed (including a protocol version mismatch,
    /// whose message names both versions).
    #[error("handshake with inferd failed: {0}")]
    Handshake(#[source] ProtoError),
    /// Sending a request failed.
    #[error("sending the request to inferd failed: {0}")]
    Send(#[source] ProtoError),
    /// Reading or decoding the answer failed.
    #[error("reading the answer from inferd failed: {0}")]
    Receive(#[source] ProtoError),
    /// The daemon closed the connection before answering.
    #[error("inferd closed the connection before answering")]
    Closed,
    /// The daemon answered the request with a typed error.
    #[error(transparent)]
    Request(RequestError),
    /// The daemon answered with the wrong message kind or for another request.
    #[error("unexpected answer from inferd: expected {expected}, got {got}")]
    UnexpectedResponse {
        /// What the request should have been answered with.
        expected: &'static str,
        /// What came instead.
        got: String,
    },
}

impl ClientError {
    /// True when the daemon itself answered with an error, as opposed to the
    /// connection or the protocol failing (`inferctl` exits 1 vs 2).
    pub fn is_request_error(&self) -> bool {
        matches!(self, Self::Request(_))
    }
}

/// One connection to the daemon; requests are sent one at a time.
#[derive(Debug)]
pub struct Client {
    /// The framed socket, after a successful handshake.
    conn: Connection<UnixStream, ClientMessage, ServerMessage>,
    /// Id for the next request; ids let us match answers to requests.
    next_id: u64,
}

impl Client {
    /// Connects to the daemon's socket and exchanges hellos, naming this
    /// program [`DEFAULT_PROGRAM`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_as(path, DEFAULT_PROGRAM).await
    }

    /// Like [`Client::connect`], naming `program` in the hello (shows in the
    /// daemon's log).
    pub async fn connect_as(path: impl AsRef<Path>, program: &str) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Self::handshake(stream, program).await
    }

    /// Runs the handshake over an already connected stream.
    pub async fn handshake(stream: UnixStream, program: &str) -> Result<Client, ClientError> {
        let mut conn = Connection::new(stream, DEFAULT_MAX_FRAME_BYTES);
        conn.handshake(program)
            .await
            .map_err(ClientError::Handshake)?;
        Ok(Client { conn, next_id: 1 })
    }

    /// Embeds `texts` as one batch. `deadline` bounds the time the daemon may
    /// take (its default applies when `None`).
    pub async fn embed(
        &mut self,
        texts: Vec<String>,
        deadline: Option<Duration>,
    ) -> Result<EmbedResult, ClientError> {
        let id = self.take_id();
        let deadline_ms = deadline.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match self
            .request(&ClientMessage::Embed {
                id,
                texts,
                deadline_ms,
            })
            .await?
        {
            ServerMessage::Embeddings {
                id: got, result, ..
            } if got == id => Ok(result),
            ServerMessage::Error { id: got, error } if got == id => {
                Err(ClientError::Request(error))
            }
            other => Err(unexpected("embeddings", id, &other)),
        }
    }

    /// Tokenizes `texts` with the model's tokenizer, as embedding them
    /// would: one token list per text, in order.
    pub async fn tokenize(
        &mut self,
        texts: Vec<String>,
        deadline: Option<Duration>,
    ) -> Result<TokenizeResult, ClientError> {
        let id = self.take_id();
        let deadline_ms = deadline.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match self
            .request(&ClientMessage::Tokenize {
                id,
                texts,
                deadline_ms,
            })
            .await?
        {
            ServerMessage::Tokens {
                id: got, result, ..
            } if got == id => Ok(result),
            ServerMessage::Error { id: got, error } if got == id => {
                Err(ClientError::Request(error))
            }
            other => Err(unexpected("tokens", id, &other)),
        }
    }

    /// Asks for a snapshot of the pool.
    pub async fn status(&mut self) -> Result<PoolStatus, ClientError> {
        let id = self.take_id();
        match self.request(&ClientMessage::Status { id }).await? {
            ServerMessage::Status { id: got, status } if got == id => Ok(*status),
            ServerMessage::Error { id: got, error } if got == id => {
                Err(ClientError::Request(error))
            }
            other => Err(unexpected("status", id, &other)),
        }
    }

    /// Rolls every worker (a rolling restart with the running
    /// configuration); returns when the roll is complete, with the number of
    /// workers replaced. Takes as long as loading that many models.
    pub async fn roll(&mut self) -> Result<u32, ClientError> {
        let id = self.take_id();
        match self.request(&ClientMessage::Roll { id }).await? {
            ServerMessage::Rolled { id: got, replaced } if got == id => Ok(replaced),
            ServerMessage::Error { id: got, error } if got == id => {
                Err(ClientError::Request(error))
            }
            other => Err(unexpected("rolled", id, &other)),
        }
    }

    /// The daemon's counters and gauges in Prometheus text format.
    pub async fn metrics(&mut self) -> Result<String, ClientError> {
        let id = self.take_id();
        match self.request(&ClientMessage::Metrics { id }).await? {
            ServerMessage::Metrics { id: got, text } if got == id => Ok(text),
            ServerMessage::Error { id: got, error } if got == id => {
                Err(ClientError::Request(error))
            }
            other => Err(unexpected("metrics", id, &other)),
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends one request and reads one answer. A connection the daemon
    /// refused (too many connections, permission denied) answers every
    /// request with the refusal's error.
    async fn request(&mut self, message: &ClientMessage) -> Result<ServerMessage, ClientError> {
        if let Err(e) = self.conn.send(message).await {
            if !is_peer_gone(&e) {
                return Err(ClientError::Send(e));
            }
            // The daemon may have refused the connection and closed it
            // before our request went out: its reason is still buffered.
            return match self.conn.recv().await {
                Ok(Some(ServerMessage::Refused { error })) => Err(ClientError::Request(error)),
                _ => Err(ClientError::Closed),
            };
        }
        match self.conn.recv().await {
            Ok(Some(ServerMessage::Refused { error })) => Err(ClientError::Request(error)),
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(ClientError::Closed),
            Err(e) if is_peer_gone(&e) => Err(ClientError::Closed),
            Err(e) => Err(ClientError::Receive(e)),
        }
    }
}

/// A broken pipe or a reset means the daemon closed its end.
fn is_peer_gone(err: &ProtoError) -> bool {
    matches!(err, ProtoError::Io(e) if matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    ))
}

/// Builds a [`ClientError::UnexpectedResponse`] for an answer that is not
/// `expected` (a message kind) for request `id`.
fn unexpected(expected: &'static str, id: u64, got: &ServerMessage) -> ClientError {
    let got = match got {
        ServerMessage::Embeddings { id: g, .. } => format!("embeddings for request {g}"),
        ServerMessage::Tokens { id: g, .. } => format!("tokens for request {g}"),
        ServerMessage::Status { id: g, .. } => format!("status for request {g}"),
        ServerMessage::Rolled { id: g, .. } => format!("roll result for request {g}"),
        ServerMessage::Metrics { id: g, .. } => format!("metrics for request {g}"),
        ServerMessage::Error { id: g, error } => format!("error for request {g} ({error})"),
        ServerMessage::Refused { error } => format!("a refusal of the connection ({error})"),
    };
    ClientError::UnexpectedResponse {
        expected,
        got: format!("{got} while waiting for request {id}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use inferd_proto::{encode_frame, Hello, Timing, PROTOCOL_VERSION};
    use std::future::Future;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    type ServerConn = Connection<UnixStream, ServerMessage, ClientMessage>;

    /// Binds a listener in a fresh temp dir and runs `serve` on the first
    /// accepted connection; returns the socket path (and the dir guard).
    fn fake_server<F, Fut>(serve: F) -> (tempfile::TempDir, PathBuf)
    where
        F: FnOnce(UnixStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            serve(stream).await;
        });
        (dir, path)
    }

    /// A fake daemon that completes the handshake then answers each request
    /// with `answer(request)`; `None` closes the connection.
    fn scripted<A>(mut answer: A) -> (tempfile::TempDir, PathBuf)
    where
        A: FnMut(ClientMessage) -> Option<ServerMessage> + Send + 'static,
    {
        fake_server(move |stream| async move {
            let mut conn: ServerConn = Connection::new(stream, DEFAULT_MAX_FRAME_BYTES);
            conn.handshake("fake-inferd").await.unwrap();
            while let Some(request) = conn.recv().await.unwrap() {
                match answer(request) {
                    Some(reply) => conn.send(&reply).await.unwrap(),
                    None => return,
                }
            }
        })
    }

    fn sample_result() -> EmbedResult {
        EmbedResult {
            model: "fake".into(),
            dims: 2,
            embeddings: vec![vec![0.6, 0.8]],
            truncated: vec![false],
            token_counts: vec![3],
        }
    }

    fn request_id(msg: &ClientMessage) -> u64 {
        msg.id()
    }

    #[tokio::test]
    async fn embed_round_trip_with_matching_ids() {
        let (_dir, path) = scripted(|req| match req {
            ClientMessage::Embed {
                id,
                texts,
                deadline_ms,
            } => {
                assert_eq!(texts, vec!["hi".to_string()]);
                assert_eq!(deadline_ms, Some(1500));
                Some(ServerMessage::Embeddings {
                    id,
                    result: sample_result(),
                    timing: Timing::default(),
                })
            }
            other => panic!("unexpected {other:?}"),
        });
        let mut client = Client::connect(&path).await.unwrap();
        for _ in 0..3 {
            let result = client
                .embed(vec!["hi".into()], Some(Duration::from_millis(1500)))
                .await
                .unwrap();
            assert_eq!(result, sample_result());
        }
    }

    #[tokio::test]
    async fn wrong_id_is_an_unexpected_response() {
        let (_dir, path) = scripted(|req| {
            Some(ServerMessage::Embeddings {
                id: request_id(&req) + 100,
                result: sample_result(),
                timing: Timing::default(),
            })
        });
        let mut client = Client::connect(&path).await.unwrap();
        let err = client.embed(vec!["x".into()], None).await.unwrap_err();
        match &err {
            ClientError::UnexpectedResponse { got, .. } => {
                assert!(got.contains("request 101"), "{got}");
            }
            other => panic!("expected UnexpectedResponse, got {other:?}"),
        }
        assert!(!err.is_request_error());
    }

    #[tokio::test]
    async fn wrong_variant_is_an_unexpected_response() {
        let (_dir, path) = scripted(|req| {
            Some(ServerMessage::Embeddings {
                id: request_id(&req),
                result: sample_result(),
                timing: Timing::default(),
            })
        });
        let mut client = Client::connect(&path).await.unwrap();
        let err = client.status().await.unwrap_err();
        assert!(
            matches!(&err, ClientError::UnexpectedResponse { expected, .. } if expected.contains("status")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn server_closing_is_closed() {
        let (_dir, path) = scripted(|_| None);
        let mut client = Client::connect(&path).await.unwrap();
        let err = client.embed(vec!["x".into()], None).await.unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err:?}");
        assert!(err.to_string().contains("closed the connection"));
    }

    /// A daemon over its connection cap writes its hello and the refusal
    /// and closes at once, possibly before our hello or request is out.
    #[tokio::test]
    async fn refusal_is_the_error_of_the_first_request() {
        let (_dir, path) = fake_server(|mut stream| async move {
            let mut bytes = encode_frame(&Hello::new("fake-inferd")).unwrap();
            bytes.extend(
                encode_frame(&ServerMessage::Refused {
                    error: RequestError::TooManyConnections {
                        reason: "4096 client connections are open".into(),
                    },
                })
                .unwrap(),
            );
            stream.write_all(&bytes).await.unwrap();
            // Closed without reading anything the client sent.
        });
        let mut client = Client::connect(&path).await.unwrap();
        let err = client.embed(vec!["x".into()], None).await.unwrap_err();
        match &err {
            ClientError::Request(RequestError::TooManyConnections { reason }) => {
                assert!(reason.contains("4096"), "{reason}")
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
        assert!(err.to_string().starts_with("too many connections"), "{err}");
    }

    #[tokio::test]
    async fn error_frame_is_a_typed_request_error() {
        let (_dir, path) = scripted(|req| {
            Some(ServerMessage::Error {
                id: request_id(&req),
                error: RequestError::Overloaded { capacity: 7 },
            })
        });
        let mut client = Client::connect(&path).await.unwrap();
        let err = client.embed(vec!["x".into()], None).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Request(RequestError::Overloaded { capacity: 7 })
            ),
            "{err:?}"
        );
        assert!(err.is_request_error());
        // The typed error's own message, unchanged.
        assert_eq!(
            err.to_string(),
            RequestError::Overloaded { capacity: 7 }.to_string()
        );
        // A typed error leaves the connection usable.
        let err = client.status().await.unwrap_err();
        assert!(err.is_request_error(), "{err:?}");
    }

    #[tokio::test]
    async fn version_mismatch_names_both_versions() {
        let theirs = PROTOCOL_VERSION + 41;
        let (_dir, path) = fake_server(move |mut stream| async move {
            let hello = Hello {
                protocol_version: theirs,
                software: "inferd from the future".into(),
            };
            stream
                .write_all(&encode_frame(&hello).unwrap())
                .await
                .unwrap();
            // Keep the socket open until the client has read the hello.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink).await;
        });
        let err = Client::connect(&path).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Handshake(ProtoError::VersionMismatch { .. })
            ),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&PROTOCOL_VERSION.to_string()), "{message}");
        assert!(message.contains(&theirs.to_string()), "{message}");
    }

    #[tokio::test]
    async fn server_closing_during_handshake_is_a_handshake_error() {
        let (_dir, path) = fake_server(|stream| async move { drop(stream) });
        let err = Client::connect(&path).await.unwrap_err();
        assert!(matches!(err, ClientError::Handshake(_)), "{err:?}");
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-home.sock");
        let err = Client::connect(&path).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("nobody-home.sock"), "{message}");
        assert!(message.contains("is inferd running?"), "{message}");
    }
}
