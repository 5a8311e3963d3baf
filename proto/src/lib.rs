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
//! default; [`HELLO_MAX_BYTES`] for the hello) *before* any buffer is grown
//! for it, and the read buffer then grows only as the frame's bytes arrive
//! (at most 64 KiB ahead of them), so a hostile length prefix costs the
//! reader little. A payload that does not decode, or that leaves bytes
//! unread, is an error that closes that one connection.
//!
//! # Sequence
//!
//! Both ends open with a [`Hello`] frame carrying [`PROTOCOL_VERSION`]; the
//! `Hello` layout never changes, so a peer speaking another version gets a
//! clear [`ProtoError::VersionMismatch`] rather than a decode failure. The
//! peer's hello is read before anything else is known about the peer, under
//! [`HELLO_MAX_BYTES`] (1 KiB) rather than the connection's frame limit.
//! After that:
//!
//! * client ⇄ supervisor: the client sends [`ClientMessage`]s, each carrying a
//!   client-chosen id; the supervisor answers each with exactly one
//!   [`ServerMessage`] carrying the same id. Requests may be pipelined and the
//!   answers may come back in any order. A supervisor that refuses the
//!   connection (too many connections, permission) sends one
//!   [`ServerMessage::Refused`] right after the hellos and closes it; every
//!   request sent on it fails with that error.
//! * supervisor ⇄ worker: the supervisor sends [`WorkerCommand::Start`] (the
//!   worker allocates nothing big before it), the worker answers
//!   [`WorkerEvent::Ready`] or [`WorkerEvent::LoadFailed`]; then one
//!   [`WorkerCommand::Embed`] or [`WorkerCommand::Tokenize`] at a time,
//!   each answered by one [`WorkerEvent::Embedded`] (or
//!   [`WorkerEvent::Tokenized`]) or [`WorkerEvent::Rejected`];
//!   [`WorkerCommand::Shutdown`] or EOF makes the worker exit 0.
//!
//! # Bounds on what a peer's bytes can make a decoder allocate
//!
//! No length declared inside a payload is trusted:
//!
//! * strings: a decode runs under a byte limit of at most 16 bytes per
//!   payload byte (at least 1 KiB), checked before a string's declared length
//!   is allocated (see [`decode_payload`]);
//! * lists of texts (and so the per-text lists of an [`EmbedResult`]): at most
//!   [`MAX_TEXTS_PER_REQUEST`] elements, refused as soon as the count is read;
//! * every list: preallocates at most 4 KiB on the strength of its declared
//!   length, then grows only as elements decode.
//!
//! So one [`decode_payload`] of an `n`-byte payload holds at most this much
//! heap at once (the decoded value included; checked for every type by the
//! fuzz test `proto/tests/fuzz.rs`, which counts allocations, also on
//! hand-made worst cases):
//!
//! | type | decoded by | bound | worst measured |
//! |---|---|---|---|
//! | [`Hello`] | everyone, before the peer is admitted | 16 n + 4 KiB (and n ≤ 1 KiB) | 15.8 n: 2036 B for 129 B, a string claiming all the limit allows |
//! | [`ClientMessage`] | supervisor, from clients | 16 n + 256 KiB | 196 KiB for 2.7 KiB (72 n): 2721 empty texts (24 B each in memory, 1 B on the wire) while their vector grows; 27.9 n: 4095 empty texts, then one claiming the limit |
//! | [`WorkerCommand`] | worker | 16 n + 256 KiB | as `ClientMessage`; 229 KiB for 4096 empty texts (the vector and the shared copy) |
//! | [`WorkerEvent`] | supervisor, from workers | 16 n + 256 KiB | 24 n (196 KiB): 2721 empty vectors; 16 n: a string claiming the limit |
//! | [`ServerMessage`] | client | 34 n + 256 KiB | 29.5 n: 897 default [`WorkerStatus`]es (17 B on the wire, 144 B in memory, in a vector just doubled) then a string claiming the limit |
//!
//! The constant covers the capped lists (at most 4096 elements); the per-byte
//! part is the string limit, plus for `ServerMessage` the uncapped worker and
//! exit lists of [`PoolStatus`]. A [`FrameDecoder`] adds its read buffer:
//! at most 2 × (bytes received + 64 KiB).

mod bounded;
mod connection;
mod frame;
mod kinds;
mod message;

pub use connection::{Connection, FREE_FRAME_BYTES, HANDSHAKE_TIMEOUT, HELLO_MAX_BYTES};
pub use frame::{
    decode_payload, encode_frame, put_raw_frame, FrameDecoder, DEFAULT_MAX_FRAME_BYTES,
};
pub use kinds::{
    ErrorKind, ExitKind, RecycleStage, RecycleTrigger, RefusalReason, WorkerStateKind,
};
pub use message::*;

/// Version of the message layer. Bump on any change to the message enums.
pub const PROTOCOL_VERSION: u32 = 7;

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
