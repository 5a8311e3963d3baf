//! The inferd wire protocol, shared by `inferd`, `inferd-worker` and `inferctl`.
//!
//! # Byte layout
//!
//! Every message travels in one frame:
//!
//! ```text
//! +----------------------+--------------------------------------+
//! | length: u32 (LE)     | payload: `length` bytes, bincode 2    |
//! +----------------------+--------------------------------------+
//! ```
//!
//! The payload is a serde value encoded with [`bincode::config::standard`].
//! The length is checked against a maximum ([`DEFAULT_MAX_FRAME_BYTES`] by
//! default) *before* any buffer is grown for it, so a hostile length prefix
//! costs the reader nothing. A payload that does not decode, or that leaves
//! bytes unread, is an error that closes that one connection.
//!
//! # Sequence
//!
//! Both ends open with a [`Hello`] frame carrying [`PROTOCOL_VERSION`]; the
//! `Hello` layout never changes, so a peer speaking another version gets a
//! clear [`ProtoError::VersionMismatch`] rather than a decode failure. After
//! that:
//!
//! * client ⇄ supervisor: the client sends [`ClientMessage`]s, each carrying a
//!   client-chosen id; the supervisor answers each with exactly one
//!   [`ServerMessage`] carrying the same id. Requests may be pipelined and the
//!   answers may come back in any order.
//! * supervisor ⇄ worker: the supervisor sends [`WorkerCommand::Start`] (the
//!   worker allocates nothing big before it), the worker answers
//!   [`WorkerEvent::Ready`] or [`WorkerEvent::LoadFailed`]; then one
//!   [`WorkerCommand::Embed`] at a time, each answered by one
//!   [`WorkerEvent::Embedded`] or [`WorkerEvent::Rejected`];
//!   [`WorkerCommand::Shutdown`] or EOF makes the worker exit 0.

mod connection;
mod frame;
mod message;

pub use connection::{Connection, HANDSHAKE_TIMEOUT};
pub use frame::{
    decode_payload, encode_frame, put_raw_frame, FrameDecoder, DEFAULT_MAX_FRAME_BYTES,
};
pub use message::*;

/// Version of the message layer. Bump on any change to the message enums.
pub const PROTOCOL_VERSION: u32 = 3;

/// Everything that can go wrong on a framed connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Reading from or writing to the socket failed.
    #[error("socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame longer than this end accepts.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced payload length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed inside a frame ({buffered} bytes of a partial frame)")]
    TruncatedFrame {
        /// Bytes of the partial frame that had arrived.
        buffered: usize,
    },
    /// The payload is not a valid encoding of the expected message type.
    #[error("undecodable payload: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The payload decoded but left bytes unread.
    #[error("payload has {extra} trailing bytes after the message")]
    TrailingBytes {
        /// Unread bytes.
        extra: usize,
    },
    /// Encoding an outgoing message failed.
    #[error("could not encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this end speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`].
        ours: u32,
        /// The version in the peer's hello.
        theirs: u32,
    },
    /// The peer closed the connection before or during the handshake.
    #[error("peer closed the connection during the handshake")]
    ClosedDuringHandshake,
    /// The peer did not complete the handshake in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
}

impl ProtoError {
    /// True when the error only says the peer went away (reset, broken pipe,
    /// EOF inside a frame or the handshake), as opposed to the peer sending
    /// something malformed. A dead worker shows up as the former.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            Self::Io(_) | Self::TruncatedFrame { .. } | Self::ClosedDuringHandshake
        )
    }
}

/// `err` and its sources joined with ": ", for error texts that travel over
/// the wire (a typed error's `Display` often leaves the OS detail, such as
/// "No such file or directory", in `source()`).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
