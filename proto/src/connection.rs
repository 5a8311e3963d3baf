//! A typed, framed connection over any async byte stream.

use std::marker::PhantomData;
use std::time::Duration;

use bytes::BytesMut;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{decode_payload, encode_frame, FrameDecoder};
use crate::{Hello, ProtoError, PROTOCOL_VERSION};

/// How long a peer gets to send its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes a peer's hello payload may have. The hello comes before the
/// peer is known (or admitted), so it is read under this small limit rather
/// than the connection's `max_frame_bytes`: announcing a larger hello is an
/// immediate [`ProtoError::FrameTooLarge`], with nothing reserved for it.
pub const HELLO_MAX_BYTES: usize = 1024;

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
            _messages: PhantomData,
        }
    }

    /// Sends our hello, reads the peer's, and checks the versions match.
    /// Both hellos go out before the check so the peer learns our version
    /// too. Bounded by [`HANDSHAKE_TIMEOUT`]; the peer's hello by
    /// [`HELLO_MAX_BYTES`].
    pub async fn handshake(&mut self, program: &str) -> Result<Hello, ProtoError> {
        self.write_frame(&encode_frame(&Hello::new(program))?)
            .await?;
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
        match self.read_payload(self.decoder).await? {
            Some(payload) => Ok(Some(decode_payload(&payload)?)),
            None => Ok(None),
        }
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
            if let Some(payload) = decoder.decode(&mut self.buffer)? {
                return Ok(Some(payload));
            }
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

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out_in_handshake() {
        let (_client, stream) = duplex(4096);
        let mut server = server_end(stream);
        let err = server.handshake("server").await.unwrap_err();
        assert!(matches!(err, ProtoError::HandshakeTimeout), "{err:?}");
    }
}
