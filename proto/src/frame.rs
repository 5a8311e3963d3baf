//! Length-prefixed frames: `u32` little-endian payload length, then payload.

use bytes::{Buf, BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use crate::ProtoError;

/// Default upper bound for one frame's payload: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

const LEN_BYTES: usize = 4;

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `message` as one complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; LEN_BYTES];
    bincode::serde::encode_into_std_write(message, &mut out, bincode_config())?;
    let len = u32::try_from(out.len() - LEN_BYTES).map_err(|_| ProtoError::FrameTooLarge {
        len: out.len() - LEN_BYTES,
        max: u32::MAX as usize,
    })?;
    out[..LEN_BYTES].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Decodes one payload (without its length prefix); it must be consumed whole.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    let (value, used) = bincode::serde::decode_from_slice(payload, bincode_config())?;
    if used != payload.len() {
        return Err(ProtoError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(value)
}

/// Splits frames off a byte buffer, mini-redis style: first check that a
/// whole frame is buffered, then take it.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder that rejects payloads longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The configured payload limit.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Takes one whole frame's payload off the front of `buf`, `Ok(None)` if
    /// more bytes are needed. Reserves room for the rest of a frame only after
    /// its length passed the limit check.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, ProtoError> {
        if buf.len() < LEN_BYTES {
            return Ok(None);
        }
        let mut len_bytes = [0u8; LEN_BYTES];
        len_bytes.copy_from_slice(&buf[..LEN_BYTES]);
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > self.max_frame_bytes {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if buf.len() < LEN_BYTES + len {
            buf.reserve(LEN_BYTES + len - buf.len());
            return Ok(None);
        }
        buf.advance(LEN_BYTES);
        Ok(Some(buf.split_to(len)))
    }
}

/// Appends one frame to `buf` (used by tests that build byte streams by hand).
pub fn put_raw_frame(buf: &mut BytesMut, payload: &[u8]) {
    buf.put_u32_le(payload.len() as u32);
    buf.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientMessage, Hello};

    #[test]
    fn frame_round_trip() {
        let msg = ClientMessage::Embed {
            id: 7,
            texts: vec!["héllo".into(), String::new()],
            deadline_ms: Some(250),
        };
        let bytes = encode_frame(&msg).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let payload = FrameDecoder::new(1024).decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(decode_payload::<ClientMessage>(&payload).unwrap(), msg);
    }

    #[test]
    fn partial_frame_needs_more_bytes() {
        let bytes = encode_frame(&Hello::new("t")).unwrap();
        let decoder = FrameDecoder::new(1024);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(decoder.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
            assert_eq!(buf.len(), cut, "a partial frame must stay buffered");
        }
    }

    #[test]
    fn oversize_length_rejected_before_allocating() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(u32::MAX);
        let err = FrameDecoder::new(1024).decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, ProtoError::FrameTooLarge { len, max: 1024 } if len == u32::MAX as usize)
        );
        assert!(
            buf.capacity() < 1024,
            "no room reserved for the hostile frame"
        );
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let err = decode_payload::<ClientMessage>(&[0xff; 9]).unwrap_err();
        assert!(matches!(err, ProtoError::Decode(_)), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut payload = encode_frame(&ClientMessage::Status { id: 1 }).unwrap()[4..].to_vec();
        payload.push(0);
        let err = decode_payload::<ClientMessage>(&payload).unwrap_err();
        assert!(
            matches!(err, ProtoError::TrailingBytes { extra: 1 }),
            "{err:?}"
        );
    }

    #[test]
    fn hostile_inner_length_does_not_allocate_wildly() {
        // Variant 0 (Embed), id, then a Vec length claiming 2^40 strings.
        let mut payload = vec![0u8, 1];
        payload.extend_from_slice(&[253]); // varint marker for u64
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode_payload::<ClientMessage>(&payload).unwrap_err();
        assert!(matches!(err, ProtoError::Decode(_)), "{err:?}");
    }
}
