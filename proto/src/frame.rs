//! Length-prefixed frames: `u32` little-endian payload length, then payload.

use bytes::{Buf, BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use crate::ProtoError;

/// Default upper bound for one frame's payload: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

const LEN_BYTES: usize = 4;

/// Most bytes [`FrameDecoder::decode`] reserves beyond what is buffered, per
/// call: room is made as the frame arrives, not when its length is announced.
const RESERVE_STEP: usize = 64 * 1024;

/// bincode charges every integer against its byte limit at its in-memory
/// width (a `u64` costs 8 even when its varint is 1 byte), so a valid payload
/// can use up to 8 bytes of limit per payload byte.
const LIMIT_PER_PAYLOAD_BYTE: usize = 8;

/// Smallest decode limit, so that short messages with many small integers
/// (claiming 8 bytes each) always fit.
const MIN_DECODE_LIMIT: usize = 1024;

/// The wire format. Decoding adds a byte limit (see [`decode_payload`]),
/// which does not change the encoding.
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
///
/// No length declared inside the payload is trusted. bincode allocates a
/// string's declared length before reading it (a 14-byte hello claiming a
/// 2^60-byte string aborted the daemon), so the decode runs under a bincode
/// byte limit of the smallest power of two ≥ max(8 × payload length, 1 KiB):
/// no string can be longer than that, at most 16 bytes per payload byte.
/// (It cannot be tighter: bincode charges each integer at its in-memory
/// width, so a valid payload of one-byte varints uses 8 bytes of limit per
/// byte.) Sequences are bounded separately. The resulting bounds on a
/// decode's peak heap, per message type, are in the crate docs.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    let limit = payload
        .len()
        .saturating_mul(LIMIT_PER_PAYLOAD_BYTE)
        .max(MIN_DECODE_LIMIT);
    let (value, used) = decode_with_limit(payload, limit)?;
    if used != payload.len() {
        return Err(ProtoError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(value)
}

/// Decodes under bincode's byte limit rounded up to a power of two: the
/// limit is a const generic, so each bucket is its own instantiation.
fn decode_with_limit<T: DeserializeOwned>(
    payload: &[u8],
    limit: usize,
) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! buckets {
        ($($k:literal)*) => {
            $(
                if limit <= 1 << $k {
                    let config = bincode_config().with_limit::<{ 1 << $k }>();
                    return bincode::serde::decode_from_slice(payload, config);
                }
            )*
        };
    }
    // 2^35 = 8 × 4 GiB covers every payload a u32 length prefix can carry.
    buckets!(10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34);
    bincode::serde::decode_from_slice(payload, bincode_config().with_limit::<{ 1 << 35 }>())
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

    /// The payload length the frame at the front of `buf` announces, once
    /// its length prefix is buffered (not checked against the limit).
    pub fn announced_len(&self, buf: &[u8]) -> Option<usize> {
        let prefix: [u8; LEN_BYTES] = buf.get(..LEN_BYTES)?.try_into().ok()?;
        Some(u32::from_le_bytes(prefix) as usize)
    }

    /// Takes one whole frame's payload off the front of `buf`, `Ok(None)` if
    /// more bytes are needed. Reserves room for the rest of a frame only after
    /// its length passed the limit check, and then only up to 64 KiB beyond
    /// what is buffered: a peer that announces a large frame and sends
    /// nothing costs little, and `BytesMut` doubles its capacity as a large
    /// frame arrives, so reading one stays amortised.
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
            buf.reserve((LEN_BYTES + len - buf.len()).min(RESERVE_STEP));
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
    use crate::{
        ClientMessage, Hello, ServerMessage, WorkerCommand, WorkerEvent, MAX_TEXTS_PER_REQUEST,
    };

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

    /// A bincode varint: the `0xfd` marker, then the value as a LE `u64`.
    fn varint_u64(value: u64) -> Vec<u8> {
        let mut out = vec![0xfd];
        out.extend_from_slice(&value.to_le_bytes());
        out
    }

    fn decode_error<T: DeserializeOwned + std::fmt::Debug>(payload: &[u8]) -> String {
        match decode_payload::<T>(payload) {
            Err(ProtoError::Decode(err)) => err.to_string(),
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    #[test]
    fn hostile_hello_from_issue_7_is_a_decode_error() {
        // The 14-byte frame that aborted the daemon: version 3, then a
        // `software` string claiming 2^60 bytes.
        let frame = [10, 0, 0, 0, 0x03, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let mut buf = BytesMut::from(&frame[..]);
        let payload = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES)
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(&payload[..], &frame[4..]);
        assert_eq!(decode_error::<Hello>(&payload), "LimitExceeded");
    }

    #[test]
    fn embed_text_claiming_a_huge_length_is_a_decode_error() {
        for claimed in [1u64 << 40, 1 << 60] {
            // Variant 0 (Embed), id 1, one text, whose length is `claimed`.
            let mut payload = vec![0, 1, 1];
            payload.extend(varint_u64(claimed));
            payload.extend_from_slice(b"short");
            assert_eq!(decode_error::<ClientMessage>(&payload), "LimitExceeded");
        }
    }

    #[test]
    fn worker_command_text_claiming_a_huge_length_is_a_decode_error() {
        // Variant 1 (Embed), request id 5, one text of "2^60" bytes.
        let mut payload = vec![1, 5, 1];
        payload.extend(varint_u64(1 << 60));
        assert_eq!(decode_error::<WorkerCommand>(&payload), "LimitExceeded");
    }

    #[test]
    fn embedded_result_claiming_huge_lengths_is_a_decode_error() {
        // Variant 2 (Embedded), request id 7, then the EmbedResult.
        let mut model_claim = vec![2, 7];
        model_claim.extend(varint_u64(1 << 60));
        assert_eq!(decode_error::<WorkerEvent>(&model_claim), "LimitExceeded");

        // Model "m", dims 4, then an embeddings list claiming 2^60 vectors.
        let mut vectors_claim = vec![2, 7, 1, b'm', 4];
        vectors_claim.extend(varint_u64(1 << 60));
        let err = decode_error::<WorkerEvent>(&vectors_claim);
        assert!(err.contains("exceed the wire limit of 4096"), "{err}");

        // One vector claiming 2^60 floats: no count cap, but no allocation
        // for the claim either; it fails where the floats run out.
        let mut floats_claim = vec![2, 7, 1, b'm', 4, 1];
        floats_claim.extend(varint_u64(1 << 60));
        floats_claim.extend_from_slice(&1.0f32.to_le_bytes());
        assert!(decode_error::<WorkerEvent>(&floats_claim).contains("UnexpectedEnd"));
    }

    fn embed_with_texts(count: usize) -> (ClientMessage, WorkerCommand) {
        let texts = vec![String::new(); count];
        let client = ClientMessage::Embed {
            id: 1,
            texts: texts.clone(),
            deadline_ms: None,
        };
        let worker = WorkerCommand::Embed {
            request_id: 1,
            texts: texts.into(),
        };
        (client, worker)
    }

    #[test]
    fn more_texts_than_the_wire_cap_are_refused() {
        let (client, worker) = embed_with_texts(MAX_TEXTS_PER_REQUEST + 1);
        let frame = encode_frame(&client).unwrap();
        let err = decode_error::<ClientMessage>(&frame[LEN_BYTES..]);
        assert!(
            err.contains("4097 texts in one request exceed the wire limit of 4096"),
            "{err}"
        );
        let frame = encode_frame(&worker).unwrap();
        let err = decode_error::<WorkerCommand>(&frame[LEN_BYTES..]);
        assert!(err.contains("exceed the wire limit of 4096"), "{err}");
    }

    #[test]
    fn the_densest_valid_message_fits_the_decode_limit() {
        // 4096 empty texts: one byte each on the wire, but bincode charges 8
        // against the limit for each length. A limit of only 2 × the payload
        // would refuse this valid request.
        let (client, worker) = embed_with_texts(MAX_TEXTS_PER_REQUEST);
        let frame = encode_frame(&client).unwrap();
        assert!(frame.len() < MAX_TEXTS_PER_REQUEST + 16);
        assert_eq!(
            decode_payload::<ClientMessage>(&frame[LEN_BYTES..]).unwrap(),
            client
        );
        let frame = encode_frame(&worker).unwrap();
        assert_eq!(
            decode_payload::<WorkerCommand>(&frame[LEN_BYTES..]).unwrap(),
            worker
        );
        // Many one-byte ints in a result, likewise.
        let result = ServerMessage::Embeddings {
            id: 1,
            result: crate::EmbedResult {
                model: String::new(),
                dims: 0,
                embeddings: vec![Vec::new(); MAX_TEXTS_PER_REQUEST],
                truncated: vec![false; MAX_TEXTS_PER_REQUEST],
                token_counts: vec![7; MAX_TEXTS_PER_REQUEST],
            },
            timing: crate::Timing::default(),
        };
        let frame = encode_frame(&result).unwrap();
        assert_eq!(
            decode_payload::<ServerMessage>(&frame[LEN_BYTES..]).unwrap(),
            result
        );
    }

    #[test]
    fn a_declared_string_length_is_bounded_by_the_payload() {
        // A hello claiming a 1000-byte string, within the 1 KiB floor of the
        // limit: bincode allocates it, then finds the bytes missing.
        let mut small = vec![4];
        small.extend(varint_u64(1000));
        assert!(decode_error::<Hello>(&small).contains("UnexpectedEnd"));
        // A 4 KiB payload gets a 32 KiB limit (8 per byte): a string claiming
        // more than that is refused before anything is allocated.
        let mut big = vec![4];
        big.extend(varint_u64(40 * 1024));
        big.resize(4096, b'x');
        assert_eq!(decode_error::<Hello>(&big), "LimitExceeded");
    }

    #[test]
    fn the_decode_limit_does_not_change_the_encoding() {
        let (client, _) = embed_with_texts(3);
        let plain = bincode::serde::encode_to_vec(&client, bincode_config()).unwrap();
        let limited =
            bincode::serde::encode_to_vec(&client, bincode_config().with_limit::<1024>()).unwrap();
        assert_eq!(plain, limited);
        assert_eq!(plain, encode_frame(&client).unwrap()[LEN_BYTES..]);
    }

    #[test]
    fn a_huge_announced_frame_reserves_little() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(DEFAULT_MAX_FRAME_BYTES as u32);
        buf.put_slice(&[0; 100]);
        let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        assert!(decoder.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= LEN_BYTES + 100 + RESERVE_STEP);
        assert!(
            buf.capacity() <= 2 * (LEN_BYTES + 100 + RESERVE_STEP),
            "reserved {} bytes for 104 received",
            buf.capacity()
        );
    }

    #[test]
    fn a_large_frame_arriving_in_pieces_decodes() {
        let text = "x".repeat(3 * 1024 * 1024);
        let message = ClientMessage::Embed {
            id: 9,
            texts: vec![text],
            deadline_ms: None,
        };
        let frame = encode_frame(&message).unwrap();
        let decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
        let mut buf = BytesMut::new();
        let mut payload = None;
        for chunk in frame.chunks(4096) {
            assert!(payload.is_none(), "frame complete early");
            buf.extend_from_slice(chunk);
            payload = decoder.decode(&mut buf).unwrap();
            if payload.is_none() {
                // Never more than one step ahead of what has arrived (plus
                // the doubling that keeps it amortised).
                assert!(buf.capacity() <= 2 * (buf.len() + RESERVE_STEP));
            }
        }
        let payload = payload.expect("whole frame fed");
        assert_eq!(decode_payload::<ClientMessage>(&payload).unwrap(), message);
    }
}
