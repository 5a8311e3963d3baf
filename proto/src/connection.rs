//! A typed, framed connection over any async byte stream.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::frame::{decode_payload, encode_frame, FrameDecoder};
use crate::{Hello, ProtoError, PROTOCOL_VERSION};

/// How long a peer gets to send its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes a peer's hello payload may have. The hello comes before the
/// peer is known (or admitted), so it is read under this small limit rather
/// than the connection's `max_frame_bytes`: announcing a larger hello is an
/// immediate [`ProtoError::FrameTooLarge`], with nothing reserved for it.
pub const HELLO_MAX_BYTES: usize = 1024;

/// Bytes of one incoming frame a connection may buffer on its own. A larger
/// frame first takes permits (one per byte beyond this) from the read budget
/// shared by every connection ([`Connection::with_read_budget`]), so that many
/// connections each sending most of a large frame cannot together hold more
/// than the budget; a small request never waits for it.
pub const FREE_FRAME_BYTES: usize = 32 * 1024;

/// After a frame is taken, a read buffer with more capacity than this is
/// replaced by a small one, so an idle connection does not keep the memory of
/// the largest frame it ever sent.
const RETAINED_BUFFER_BYTES: usize = 64 * 1024;

/// One end of a connection that sends `Out` messages and receives `In`
/// messages. Owns the stream and the read buffer; [`Connection::recv`] is
/// cancel-safe (a partial frame stays buffered), so it can sit in a `select!`.
#[derive(Debug)]
pub struct Connection<S, Out, In> {
    /// The socket.
    stream: S,
    /// Bytes read but not yet returned as a frame.
    buffer: BytesMut,
    /// Frame splitting and the size limit.
    decoder: FrameDecoder,
    /// Shared budget for frames larger than [`FREE_FRAME_BYTES`]; `None`:
    /// no budget (a peer that is trusted, such as a worker).
    read_budget: Option<Arc<Semaphore>>,
    /// Permits held for the frame being read, returned once it is decoded.
    held: Option<OwnedSemaphorePermit>,
    /// Ties the message types to this connection without storing them.
    _messages: PhantomData<fn(Out) -> In>,
}

impl<S, Out, In> Connection<S, Out, In>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Out: Serialize,
    In: DeserializeOwned,
{
    /// Wraps `stream`; incoming frames over `max_frame_bytes` are errors.
    pub fn new(stream: S, max_frame_bytes: usize) -> Self {
        Self {
            stream,
            buffer: BytesMut::with_capacity(8 * 1024),
            decoder: FrameDecoder::new(max_frame_bytes),
            read_budget: None,
            held: None,
            _messages: PhantomData,
        }
    }

    /// Changes the limit on incoming frames from the next frame on (a
    /// worker learns its link's limit from the Start frame).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.decoder = FrameDecoder::new(max_frame_bytes);
    }

    /// Makes frames over [`FREE_FRAME_BYTES`] take one permit per further
    /// byte from `budget` before they are read (the connection waits for
    /// them: backpressure, not an error). `budget` must hold at least
    /// `max_frame_bytes` permits, or a largest frame would wait forever.
    pub fn with_read_budget(mut self, budget: Arc<Semaphore>) -> Self {
        self.read_budget = Some(budget);
        self
    }

    /// Sends our hello, reads the peer's, and checks the versions match.
    /// Both hellos go out before the check so the peer learns our version
    /// too. Bounded by [`HANDSHAKE_TIMEOUT`]; the peer's hello by
    /// [`HELLO_MAX_BYTES`].
    pub async fn handshake(&mut self, program: &str) -> Result<Hello, ProtoError> {
        // A peer that refuses us may close before our hello is out; its own
        // hello (and why it refused) can still be read, so a failed write
        // of ours is only reported if there is nothing to read either.
        let sent = self.write_frame(&encode_frame(&Hello::new(program))?).await;
        match sent {
            Err(err) if !err.is_disconnect() => return Err(err),
            _ => {}
        }
        let hello_decoder = FrameDecoder::new(HELLO_MAX_BYTES);
        let peer = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.read_payload(hello_decoder))
            .await
            .map_err(|_| ProtoError::HandshakeTimeout)??
            .ok_or(ProtoError::ClosedDuringHandshake)?;
        let hello: Hello = decode_payload(&peer)?;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: hello.protocol_version,
            });
        }
        Ok(hello)
    }

    /// Next message: `Ok(None)` on a clean EOF between frames, an error on EOF
    /// inside a frame, an oversize frame or an undecodable payload.
    pub async fn recv(&mut self) -> Result<Option<In>, ProtoError> {
        let message = match self.read_payload(self.decoder).await? {
            Some(payload) => Some(decode_payload(&payload)?),
            None => None,
        };
        // The frame's bytes are gone now; what it decoded to is the
        // caller's to account for.
        self.held = None;
        Ok(message)
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &Out) -> Result<(), ProtoError> {
        let frame = encode_frame(message)?;
        self.write_frame(&frame).await
    }

    /// The underlying stream (e.g. to read peer credentials).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    async fn write_frame(&mut self, frame: &[u8]) -> Result<(), ProtoError> {
        self.stream.write_all(frame).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Next frame's payload, split off by `decoder`. Bytes after it (a peer
    /// may send its first request right behind its hello) stay buffered.
    async fn read_payload(
        &mut self,
        decoder: FrameDecoder,
    ) -> Result<Option<BytesMut>, ProtoError> {
        loop {
            // Measured before the split: the bytes left behind keep the
            // whole allocation alive, whatever capacity they report.
            let large = self.buffer.capacity() > RETAINED_BUFFER_BYTES;
            if let Some(payload) = decoder.decode(&mut self.buffer)? {
                if large {
                    let mut fresh = BytesMut::with_capacity(self.buffer.len().max(8 * 1024));
                    fresh.extend_from_slice(&self.buffer);
                    self.buffer = fresh;
                }
                return Ok(Some(payload));
            }
            self.take_read_budget(decoder).await?;
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtoError::TruncatedFrame {
                        buffered: self.buffer.len(),
                    })
                };
            }
        }
    }

    /// Before more of a large frame is read: its permits from the read
    /// budget (cancel-safe: a cancelled wait holds nothing).
    async fn take_read_budget(&mut self, decoder: FrameDecoder) -> Result<(), ProtoError> {
        let (Some(budget), None) = (&self.read_budget, &self.held) else {
            return Ok(());
        };
        let Some(len) = decoder.announced_len(&self.buffer) else {
            return Ok(());
        };
        if len <= FREE_FRAME_BYTES || len > decoder.max_frame_bytes() {
            // Small, or about to be refused by the decoder anyway.
            return Ok(());
        }
        let permits = u32::try_from(len - FREE_FRAME_BYTES).unwrap_or(u32::MAX);
        let permit = Arc::clone(budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| ProtoError::Io(std::io::Error::other("the read budget was closed")))?;
        self.held = Some(permit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::put_raw_frame;
    use crate::{ClientMessage, ServerMessage};
    use tokio::io::{duplex, DuplexStream};

    type ServerEnd = Connection<DuplexStream, ServerMessage, ClientMessage>;

    fn server_end(stream: DuplexStream) -> ServerEnd {
        Connection::new(stream, 1024)
    }

    #[tokio::test]
    async fn eof_between_frames_is_clean() {
        let (mut client, stream) = duplex(4096);
        let mut server = server_end(stream);
        let frame = encode_frame(&ClientMessage::Status { id: 1 }).unwrap();
        client.write_all(&frame).await.unwrap();
        drop(client);
        assert_eq!(
            server.recv().await.unwrap(),
            Some(ClientMessage::Status { id: 1 })
        );
        assert_eq!(server.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (mut client, stream) = duplex(4096);
        let mut server = server_end(stream);
        let frame = encode_frame(&ClientMessage::Status { id: 1 }).unwrap();
        client.write_all(&frame[..frame.len() - 1]).await.unwrap();
        drop(client);
        let err = server.recv().await.unwrap_err();
        assert!(matches!(err, ProtoError::TruncatedFrame { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn eof_inside_the_length_prefix_is_an_error() {
        let (mut client, stream) = duplex(4096);
        let mut server = server_end(stream);
        client.write_all(&[1, 0]).await.unwrap();
        drop(client);
        let err = server.recv().await.unwrap_err();
        assert!(
            matches!(err, ProtoError::TruncatedFrame { buffered: 2 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn oversize_and_garbage_frames_are_errors() {
        let (mut client, stream) = duplex(4096);
        let mut server = server_end(stream);
        client.write_all(&2048u32.to_le_bytes()).await.unwrap();
        let err = server.recv().await.unwrap_err();
        assert!(matches!(
            err,
            ProtoError::FrameTooLarge {
                len: 2048,
                max: 1024
            }
        ));

        let (mut client, stream) = duplex(4096);
        let mut server = server_end(stream);
        let mut raw = BytesMut::new();
        put_raw_frame(&mut raw, b"\xff\xfe garbage");
        client.write_all(&raw).await.unwrap();
        let err = server.recv().await.unwrap_err();
        assert!(matches!(err, ProtoError::Decode(_)), "{err:?}");
    }

    #[tokio::test]
    async fn handshake_agrees_on_the_version() {
        let (a, b) = duplex(4096);
        let mut client: Connection<_, ClientMessage, ServerMessage> = Connection::new(a, 1024);
        let mut server = server_end(b);
        let (c, s) = tokio::join!(client.handshake("client"), server.handshake("server"));
        assert!(c.unwrap().software.starts_with("server"));
        assert!(s.unwrap().software.starts_with("client"));
    }

    #[tokio::test]
    async fn version_mismatch_is_a_clear_error() {
        let (mut client, stream) = duplex(4096);
        let mut server = server_end(stream);
        let old = Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            software: "future".into(),
        };
        client
            .write_all(&encode_frame(&old).unwrap())
            .await
            .unwrap();
        let err = server.handshake("server").await.unwrap_err();
        assert!(
            matches!(err, ProtoError::VersionMismatch { ours, theirs } if ours == PROTOCOL_VERSION && theirs == PROTOCOL_VERSION + 1),
            "{err:?}"
        );
        // The peer still got our hello, so it can report the mismatch too.
        let mut peer: Connection<_, ClientMessage, ServerMessage> = Connection::new(client, 1024);
        let payload = peer.read_payload(peer.decoder).await.unwrap().unwrap();
        let ours: Hello = decode_payload(&payload).unwrap();
        assert_eq!(ours.protocol_version, PROTOCOL_VERSION);
    }

    #[tokio::test]
    async fn an_oversize_hello_is_refused_at_once() {
        let (mut client, stream) = duplex(4096);
        let mut server: ServerEnd = Connection::new(stream, crate::DEFAULT_MAX_FRAME_BYTES);
        // Announce a 16 MiB hello (the connection's own limit) and send no
        // more: the hello limit applies, not the frame limit.
        let announced = crate::DEFAULT_MAX_FRAME_BYTES as u32;
        client.write_all(&announced.to_le_bytes()).await.unwrap();
        let err = server.handshake("server").await.unwrap_err();
        assert!(
            matches!(err, ProtoError::FrameTooLarge { len, max: HELLO_MAX_BYTES } if len == announced as usize),
            "{err:?}"
        );
        assert!(server.buffer.capacity() <= 8 * 1024, "nothing reserved");
    }

    #[tokio::test]
    async fn a_request_right_behind_the_hello_is_kept() {
        let (mut client, stream) = duplex(8192);
        let mut server: ServerEnd = Connection::new(stream, crate::DEFAULT_MAX_FRAME_BYTES);
        // Hello and a first request in one write, the request longer than
        // the hello limit: it is read under the connection's limit.
        let request = ClientMessage::Embed {
            id: 4,
            texts: vec!["y".repeat(2 * HELLO_MAX_BYTES)],
            deadline_ms: None,
        };
        let mut bytes = encode_frame(&Hello::new("client")).unwrap();
        bytes.extend(encode_frame(&request).unwrap());
        client.write_all(&bytes).await.unwrap();
        server.handshake("server").await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Some(request));
    }

    #[tokio::test]
    async fn large_frames_wait_for_the_shared_read_budget() {
        let budget = Arc::new(Semaphore::new(64 * 1024));
        let big = ClientMessage::Embed {
            id: 1,
            texts: vec!["x".repeat(80 * 1024)],
            deadline_ms: None,
        };
        let frame = encode_frame(&big).unwrap();
        let (mut a_client, a_stream) = duplex(1 << 20);
        let (mut b_client, b_stream) = duplex(1 << 20);
        let mut a = Connection::<_, ServerMessage, ClientMessage>::new(a_stream, 1 << 20)
            .with_read_budget(Arc::clone(&budget));
        let mut b = Connection::<_, ServerMessage, ClientMessage>::new(b_stream, 1 << 20)
            .with_read_budget(Arc::clone(&budget));
        // Both announce a frame; only the first gets its permits.
        a_client.write_all(&frame[..100]).await.unwrap();
        b_client.write_all(&frame[..100]).await.unwrap();
        let a_wait = tokio::time::timeout(Duration::from_millis(50), a.recv()).await;
        assert!(a_wait.is_err(), "a waits for the rest of its frame");
        assert!(a.held.is_some(), "a holds permits for its frame");
        let b_wait = tokio::time::timeout(Duration::from_millis(50), b.recv()).await;
        assert!(b_wait.is_err());
        assert!(b.held.is_none(), "b waits for the budget");
        // a completes; its permits return; b can go on.
        a_client.write_all(&frame[100..]).await.unwrap();
        assert_eq!(a.recv().await.unwrap(), Some(big.clone()));
        assert_eq!(budget.available_permits(), 64 * 1024);
        b_client.write_all(&frame[100..]).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), Some(big));
        assert!(
            b.buffer.capacity() <= RETAINED_BUFFER_BYTES,
            "the big buffer is let go"
        );
        // Small frames never touch the budget.
        let drained = budget.acquire_many(64 * 1024).await.unwrap();
        a_client
            .write_all(&encode_frame(&ClientMessage::Status { id: 2 }).unwrap())
            .await
            .unwrap();
        assert_eq!(
            a.recv().await.unwrap(),
            Some(ClientMessage::Status { id: 2 })
        );
        drop(drained);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out_in_handshake() {
        let (_client, stream) = duplex(4096);
        let mut server = server_end(stream);
        let err = server.handshake("server").await.unwrap_err();
        assert!(matches!(err, ProtoError::HandshakeTimeout), "{err:?}");
    }
}
