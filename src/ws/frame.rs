//! RFC 6455 frame codec: decode client frames, encode server frames.
//!
//! Hand-written rather than taken from a WebSocket crate because the broker's
//! two hot paths want shapes a general-purpose codec does not offer:
//! - Server frames are unmasked, so one encoded push frame (header and
//!   payload together in one `bytes::Bytes`) is built once and shared by
//!   every recipient on every shard; fan-out to thousands of sockets clones a
//!   reference count, never a frame.
//! - Client frames are parsed in place from the connection's read buffer: the
//!   header is validated before anything is allocated (an oversized length is
//!   refused from the header alone, before its payload arrives), and the
//!   payload is unmasked where it lies, so control frames and unfragmented
//!   messages are handled without a copy or an allocation.

use std::ops::Range;

use bytes::Bytes;

/// Frame opcodes defined by RFC 6455 §5.2; the reserved ones are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Result<Self, FrameError> {
        Ok(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(FrameError::ReservedOpcode(other)),
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong: never fragmented, payload at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Why a frame (or a close payload) was refused. Every variant fails the
/// connection; `close_code` says with which code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("client frame is not masked")]
    UnmaskedClientFrame,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload over 125 bytes")]
    ControlTooLong,
    #[error("payload length not encoded in the minimal number of bytes")]
    NonMinimalLength,
    #[error("64-bit payload length with the most significant bit set")]
    LengthMsbSet,
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("close payload of one byte")]
    CloseTooShort,
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    #[error("close reason is not UTF-8")]
    InvalidCloseReason,
}

impl FrameError {
    /// The close code to fail the connection with: 1009 for an oversized
    /// frame, 1007 for a non-UTF-8 close reason, 1002 for everything else.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLarge { .. } => 1009,
            FrameError::InvalidCloseReason => 1007,
            _ => 1002,
        }
    }
}

/// A decoded frame header. The payload sits in the caller's buffer at
/// `payload_range()`, already unmasked in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload_len: usize,
    /// Bytes before the payload (2..=14, mask key included).
    pub header_len: usize,
}

impl FrameHeader {
    /// Where the payload lies in the decoded buffer; `.end` is the whole
    /// frame's length, i.e. how far to advance the read buffer.
    pub fn payload_range(&self) -> Range<usize> {
        self.header_len..self.header_len + self.payload_len
    }
}

/// Largest payload a control frame may carry (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Decode one client frame from the start of `buf`.
///
/// `Ok(None)`: more bytes are needed; nothing was modified. On
/// `Ok(Some(h))` the payload `buf[h.payload_range()]` has been unmasked in
/// place. Header errors are reported as soon as the bytes that show them
/// have arrived; a length over `max_payload` is refused from the header
/// alone, before the payload arrives.
pub fn decode_client_frame(
    buf: &mut [u8],
    max_payload: usize,
) -> Result<Option<FrameHeader>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F)?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::UnmaskedClientFrame);
    }
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::ControlTooLong);
        }
    }

    let (len, len_bytes) = match len7 {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([ext[0], ext[1]]);
            if len < 126 {
                return Err(FrameError::NonMinimalLength);
            }
            (u64::from(len), 2)
        }
        127 => {
            let Some(ext) = buf.get(2..10) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(ext.try_into().expect("8-byte slice"));
            if len >> 63 != 0 {
                return Err(FrameError::LengthMsbSet);
            }
            if len <= u64::from(u16::MAX) {
                return Err(FrameError::NonMinimalLength);
            }
            (len, 8)
        }
        short => (u64::from(short), 0),
    };
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    // Fits in usize: bounded by `max_payload` just above.
    let payload_len = len as usize;
    let header_len = 2 + len_bytes + 4;
    if buf.len() < header_len || buf.len() - header_len < payload_len {
        return Ok(None);
    }
    let mask: [u8; 4] = buf[header_len - 4..header_len]
        .try_into()
        .expect("4-byte slice");
    apply_mask(&mut buf[header_len..header_len + payload_len], mask);
    Ok(Some(FrameHeader {
        fin,
        opcode,
        payload_len,
        header_len,
    }))
}

/// How much of the start of a message over the size limit is kept for
/// reading its `id` (PROTOCOL.md §4: "from the message's first 4 KiB").
pub const TOO_LARGE_PREFIX: usize = 4096;

/// A frame that `decode_client_frame` refused with `TooLarge`, its header
/// read again so that the start of its payload can be reached. Only that
/// error path pays for this: the decoder itself keeps no extra state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OversizedFrame {
    pub opcode: OpCode,
    /// Bytes before the payload (mask key included), as in `FrameHeader`.
    pub header_len: usize,
    /// The length the header declares.
    pub payload_len: u64,
}

impl OversizedFrame {
    /// Reads the header of the masked client frame at the start of `buf`.
    /// Only its length bytes need to have arrived (they have whenever the
    /// decoder reported `TooLarge`); `None` if they have not, or if `buf`
    /// does not start with a masked frame header.
    pub fn parse(buf: &[u8]) -> Option<OversizedFrame> {
        let [b0, b1, ..] = *buf else {
            return None;
        };
        let opcode = OpCode::from_bits(b0 & 0x0F).ok()?;
        if b1 & 0x80 == 0 {
            return None;
        }
        let (payload_len, len_bytes) = match b1 & 0x7F {
            126 => (
                u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
                2,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 8),
            short => (u64::from(short), 0),
        };
        Some(OversizedFrame {
            opcode,
            header_len: 2 + len_bytes + 4,
            payload_len,
        })
    }

    /// Bytes from the frame's start that hold its header and the first
    /// `limit` bytes of its payload (all of it, if shorter).
    pub fn needed(&self, limit: usize) -> usize {
        let prefix = self.payload_len.min(limit as u64) as usize;
        self.header_len + prefix
    }

    /// The first `limit` bytes of the payload, as far as `buf` (starting at
    /// the frame's first byte) holds them, unmasked into a copy; `buf` is
    /// left as it is. Empty while the mask key has not arrived.
    pub fn payload_start(&self, buf: &[u8], limit: usize) -> Vec<u8> {
        let Some(mask) = buf.get(self.header_len - 4..self.header_len) else {
            return Vec::new();
        };
        let mask: [u8; 4] = mask.try_into().expect("4-byte slice");
        let end = buf.len().min(self.needed(limit));
        let mut payload = buf[self.header_len..end].to_vec();
        apply_mask(&mut payload, mask);
        payload
    }
}

/// XOR `data` with the repeating 4-byte `mask` (masking and unmasking are
/// the same operation), eight bytes at a time.
fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8-byte chunk")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // Chunks are a multiple of 4 long, so the remainder starts at mask[0].
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Append the first header byte and the payload length (7, 16 or 64 bits,
/// always the minimal form) with the mask bit as given.
fn write_header(out: &mut Vec<u8>, first: u8, masked: bool, len: usize) {
    let (header, header_len) = encode_header(first, masked, len);
    out.extend_from_slice(&header[..header_len]);
}

/// A frame header (without masking key) and its length.
fn encode_header(first: u8, masked: bool, len: usize) -> ([u8; 10], usize) {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut header = [0u8; 10];
    header[0] = first;
    if len < 126 {
        header[1] = mask_bit | len as u8;
        (header, 2)
    } else if let Ok(len16) = u16::try_from(len) {
        header[1] = mask_bit | 126;
        header[2..4].copy_from_slice(&len16.to_be_bytes());
        (header, 4)
    } else {
        header[1] = mask_bit | 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (header, 10)
    }
}

/// Header length of an unmasked frame carrying `len` payload bytes.
fn server_header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Append one unmasked server frame (FIN set) to `out`, for callers that
/// batch several frames into one write buffer.
pub fn write_server_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    debug_assert!(!opcode.is_control() || payload.len() <= MAX_CONTROL_PAYLOAD);
    out.reserve(server_header_len(payload.len()) + payload.len());
    write_header(out, 0x80 | opcode.bits(), false, payload.len());
    out.extend_from_slice(payload);
}

/// Encode one unmasked server frame (FIN set), header and payload in one
/// `Bytes` that can be shared by any number of recipients.
pub fn encode_server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    // Exact capacity, so the Vec converts to Bytes without reallocating.
    let mut out = Vec::with_capacity(server_header_len(payload.len()) + payload.len());
    write_server_frame(&mut out, opcode, payload);
    Bytes::from(out)
}

/// The payload of an unmasked server frame this broker encoded (its
/// header is 2, 4 or 10 bytes, by the length byte).
pub fn server_frame_payload(frame: &[u8]) -> &[u8] {
    let header = match frame[1] & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[header..]
}

/// Room a caller leaves at the front of a buffer for `finish_server_frame`.
pub const SERVER_HEADER_ROOM: usize = 10;

/// Turns a buffer that starts with `SERVER_HEADER_ROOM` spare bytes followed
/// by the payload into one server frame, writing the header into the end of
/// the room: the hot path serializes a push straight into its frame, no copy.
pub fn finish_server_frame(mut buf: Vec<u8>, opcode: OpCode) -> Bytes {
    let len = buf.len() - SERVER_HEADER_ROOM;
    let (header, header_len) = encode_header(0x80 | opcode.bits(), false, len);
    let start = SERVER_HEADER_ROOM - header_len;
    buf[start..SERVER_HEADER_ROOM].copy_from_slice(&header[..header_len]);
    Bytes::from(buf).slice(start..)
}

/// An encoded server Close frame whose payload is the 2-byte `code` and
/// `reason`, the reason cut at a character boundary so that the control
/// frame's payload stays within 125 bytes.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    encode_server_frame(OpCode::Close, &payload[..2 + end])
}

/// Whether a peer may send `code` in a Close frame: the codes defined for
/// use on the wire (1000-1003, 1007-1011), those IANA registered since
/// (1012-1014; the broker itself sends 1013), and the ranges for libraries
/// and applications (3000-4999). 1004, 1005, 1006, 1015 and anything else
/// are refused.
fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parse a received Close payload: `None` when empty, else its code.
/// A one-byte payload or an invalid code is a protocol error (1002); a reason
/// that is not UTF-8 fails with 1007.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(FrameError::InvalidCloseCode(code));
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::InvalidCloseReason)?;
            Ok(Some(code))
        }
    }
}

/// Encode one masked client frame, for tests and the load generator.
pub fn encode_client_frame(opcode: OpCode, payload: &[u8], mask: [u8; 4], fin: bool) -> Vec<u8> {
    let first = if fin { 0x80 } else { 0 } | opcode.bits();
    let mut out = Vec::with_capacity(server_header_len(payload.len()) + 4 + payload.len());
    write_header(&mut out, first, true, payload.len());
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_server_frame_gives_back_its_payload() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![7u8; len];
            let frame = encode_server_frame(OpCode::Text, &payload);
            assert_eq!(server_frame_payload(&frame), &payload[..], "{len}");
        }
    }

    #[test]
    fn finished_frames_match_encoded_ones() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let mut buf = vec![0u8; SERVER_HEADER_ROOM];
            buf.extend_from_slice(&payload);
            assert_eq!(
                finish_server_frame(buf, OpCode::Text),
                encode_server_frame(OpCode::Text, &payload)
            );
        }
    }

    use super::*;

    const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    /// A payload whose bytes differ from each other and from the mask.
    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn decode(frame: &[u8], max: usize) -> Result<Option<FrameHeader>, FrameError> {
        decode_client_frame(&mut frame.to_vec(), max)
    }

    #[test]
    fn lengths_round_trip_in_all_three_encodings() {
        for (len, header_len) in [
            (0, 6),
            (1, 6),
            (5, 6),
            (125, 6),
            (126, 8),
            (127, 8),
            (65535, 8),
            (65536, 14),
            (200_000, 14),
        ] {
            for (opcode, fin) in [(OpCode::Text, true), (OpCode::Binary, false)] {
                let original = payload(len);
                let mut wire = encode_client_frame(opcode, &original, MASK, fin);
                assert_eq!(wire.len(), header_len + len);
                let header = decode_client_frame(&mut wire, len).unwrap().unwrap();
                assert_eq!(
                    header,
                    FrameHeader {
                        fin,
                        opcode,
                        payload_len: len,
                        header_len
                    }
                );
                assert_eq!(header.payload_range().end, wire.len());
                assert_eq!(&wire[header.payload_range()], &original[..]);
            }
        }
    }

    #[test]
    fn unmasking_is_right_at_every_length_and_alignment() {
        for len in 0..40 {
            let original = payload(len);
            let mut wire = encode_client_frame(OpCode::Binary, &original, MASK, true);
            // The masked payload on the wire differs from the original.
            if len > 0 {
                assert_ne!(&wire[6..], &original[..]);
            }
            let header = decode_client_frame(&mut wire, 1 << 20).unwrap().unwrap();
            assert_eq!(&wire[header.payload_range()], &original[..], "len {len}");
        }
    }

    #[test]
    fn every_partial_frame_needs_more_bytes_and_is_left_untouched() {
        for len in [0, 3, 125, 126, 300, 65536] {
            let wire = encode_client_frame(OpCode::Binary, &payload(len), MASK, true);
            for split in 0..wire.len() {
                let mut partial = wire[..split].to_vec();
                assert_eq!(
                    decode_client_frame(&mut partial, 1 << 20),
                    Ok(None),
                    "len {len} split {split}"
                );
                assert_eq!(partial, wire[..split], "len {len} split {split}");
            }
            assert!(decode(&wire, 1 << 20).unwrap().is_some());
        }
    }

    #[test]
    fn frames_back_to_back_decode_one_at_a_time() {
        let mut wire = encode_client_frame(OpCode::Text, b"first", MASK, true);
        wire.extend(encode_client_frame(
            OpCode::Ping,
            b"second",
            [9, 8, 7, 6],
            true,
        ));
        let first = decode_client_frame(&mut wire, 100).unwrap().unwrap();
        assert_eq!(&wire[first.payload_range()], b"first");
        let rest = &mut wire[first.payload_range().end..];
        let second = decode_client_frame(rest, 100).unwrap().unwrap();
        assert_eq!(second.opcode, OpCode::Ping);
        assert_eq!(&rest[second.payload_range()], b"second");
        assert_eq!(second.payload_range().end, rest.len());
    }

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        let wire = encode_server_frame(OpCode::Text, b"hello");
        let err = decode(&wire, 100).unwrap_err();
        assert_eq!(err, FrameError::UnmaskedClientFrame);
        assert_eq!(err.close_code(), 1002);
        // Known from the first two bytes.
        assert_eq!(
            decode(&wire[..2], 100),
            Err(FrameError::UnmaskedClientFrame)
        );
    }

    #[test]
    fn reserved_bits_are_a_protocol_error() {
        for bit in [0x40, 0x20, 0x10] {
            let mut wire = encode_client_frame(OpCode::Text, b"x", MASK, true);
            wire[0] |= bit;
            let err = decode(&wire, 100).unwrap_err();
            assert_eq!(err, FrameError::ReservedBits);
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn reserved_opcodes_are_a_protocol_error() {
        for opcode in (3..=7).chain(11..=15) {
            let mut wire = encode_client_frame(OpCode::Binary, b"x", MASK, true);
            wire[0] = 0x80 | opcode;
            let err = decode(&wire, 100).unwrap_err();
            assert_eq!(err, FrameError::ReservedOpcode(opcode));
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn control_frames_must_be_final_and_short() {
        for opcode in [OpCode::Close, OpCode::Ping, OpCode::Pong] {
            let body = if opcode == OpCode::Close {
                let mut body = 1000u16.to_be_bytes().to_vec();
                body.resize(125, b'a');
                body
            } else {
                payload(125)
            };
            let header = decode(&encode_client_frame(opcode, &body, MASK, true), 1000)
                .unwrap()
                .unwrap();
            assert_eq!((header.opcode, header.payload_len), (opcode, 125));

            let fragmented = encode_client_frame(opcode, b"", MASK, false);
            assert_eq!(
                decode(&fragmented, 1000),
                Err(FrameError::FragmentedControl)
            );

            let long = encode_client_frame(opcode, &payload(126), MASK, true);
            let err = decode(&long, 1000).unwrap_err();
            assert_eq!(err, FrameError::ControlTooLong);
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn non_minimal_lengths_are_a_protocol_error() {
        // 16-bit length holding 125.
        let mut wire = vec![0x82, 0x80 | 126, 0, 125];
        wire.extend_from_slice(&MASK);
        wire.extend(payload(125));
        assert_eq!(decode(&wire, 1000), Err(FrameError::NonMinimalLength));
        // 64-bit length holding 65535.
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&65535u64.to_be_bytes());
        assert_eq!(decode(&wire, 1 << 20), Err(FrameError::NonMinimalLength));
        assert_eq!(FrameError::NonMinimalLength.close_code(), 1002);
    }

    #[test]
    fn length_with_most_significant_bit_is_a_protocol_error() {
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(1u64 << 63 | 200_000).to_be_bytes());
        let err = decode(&wire, usize::MAX).unwrap_err();
        assert_eq!(err, FrameError::LengthMsbSet);
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn size_limit_is_inclusive() {
        for max in [100, 126, 65535, 65536] {
            let at = encode_client_frame(OpCode::Binary, &payload(max), MASK, true);
            assert_eq!(decode(&at, max).unwrap().unwrap().payload_len, max);

            let over = encode_client_frame(OpCode::Binary, &payload(max + 1), MASK, true);
            let err = decode(&over, max).unwrap_err();
            assert_eq!(
                err,
                FrameError::TooLarge {
                    len: max as u64 + 1,
                    max
                }
            );
            assert_eq!(err.close_code(), 1009);
        }
    }

    #[test]
    fn too_large_is_known_from_the_header_alone() {
        let wire = encode_client_frame(OpCode::Binary, &payload(70_000), MASK, true);
        // Length bytes only: no mask key, no payload.
        assert_eq!(
            decode(&wire[..10], 65536),
            Err(FrameError::TooLarge {
                len: 70_000,
                max: 65536
            })
        );
        let wire = encode_client_frame(OpCode::Text, &payload(1000), MASK, true);
        assert_eq!(
            decode(&wire[..4], 999),
            Err(FrameError::TooLarge {
                len: 1000,
                max: 999
            })
        );
    }

    #[test]
    fn oversized_frame_payload_start_is_unmasked_from_what_has_arrived() {
        for len in [200usize, 70_000] {
            let original = payload(len);
            let wire = encode_client_frame(OpCode::Text, &original, MASK, true);
            let max = len - 1;
            let header_len = if len > 65535 { 14 } else { 8 };
            // At every cut from the length bytes on: refused, and the
            // header read again gives what has arrived of the payload.
            for cut in [
                header_len - 4,
                header_len - 1,
                header_len,
                header_len + 5,
                150,
                wire.len(),
            ] {
                let mut buf = wire[..cut].to_vec();
                assert!(
                    matches!(
                        decode_client_frame(&mut buf, max),
                        Err(FrameError::TooLarge { .. })
                    ),
                    "len {len} cut {cut}"
                );
                assert_eq!(buf, wire[..cut], "the decoder left the buffer alone");
                let frame = OversizedFrame::parse(&buf).unwrap();
                assert_eq!(
                    frame,
                    OversizedFrame {
                        opcode: OpCode::Text,
                        header_len,
                        payload_len: len as u64
                    }
                );
                assert_eq!(frame.needed(100), header_len + 100);
                assert_eq!(frame.needed(usize::MAX), header_len + len);
                let start = frame.payload_start(&buf, 100);
                let have = cut.saturating_sub(header_len).min(100);
                assert_eq!(start, original[..have], "len {len} cut {cut}");
                assert_eq!(
                    frame.payload_start(&buf, TOO_LARGE_PREFIX),
                    original[..cut.saturating_sub(header_len).min(TOO_LARGE_PREFIX)]
                );
            }
        }
    }

    #[test]
    fn oversized_frame_header_must_have_arrived() {
        let wire = encode_client_frame(OpCode::Continuation, &payload(70_000), MASK, false);
        for cut in 0..10 {
            assert_eq!(OversizedFrame::parse(&wire[..cut]), None, "cut {cut}");
        }
        let frame = OversizedFrame::parse(&wire[..10]).unwrap();
        assert_eq!(frame.opcode, OpCode::Continuation);
        assert!(frame.payload_start(&wire[..10], 100).is_empty());
        // Not a client frame.
        let server = encode_server_frame(OpCode::Text, &payload(300));
        assert_eq!(OversizedFrame::parse(&server), None);
    }

    #[test]
    fn server_frames_use_minimal_unmasked_headers() {
        assert_eq!(&encode_server_frame(OpCode::Text, b"")[..], [0x81, 0]);
        assert_eq!(
            &encode_server_frame(OpCode::Pong, b"ab")[..],
            [0x8A, 2, b'a', b'b']
        );

        let frame = encode_server_frame(OpCode::Binary, &payload(126));
        assert_eq!(&frame[..4], [0x82, 126, 0, 126]);
        assert_eq!(&frame[4..], &payload(126)[..]);

        let frame = encode_server_frame(OpCode::Binary, &payload(65535));
        assert_eq!(&frame[..4], [0x82, 126, 0xFF, 0xFF]);
        assert_eq!(frame.len(), 4 + 65535);

        let frame = encode_server_frame(OpCode::Text, &payload(65536));
        assert_eq!(&frame[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&frame[10..], &payload(65536)[..]);
    }

    #[test]
    fn write_server_frame_appends() {
        let mut out = Vec::new();
        write_server_frame(&mut out, OpCode::Text, b"one");
        write_server_frame(&mut out, OpCode::Ping, b"");
        write_server_frame(&mut out, OpCode::Binary, &payload(300));
        let mut expected = encode_server_frame(OpCode::Text, b"one").to_vec();
        expected.extend_from_slice(&encode_server_frame(OpCode::Ping, b""));
        expected.extend_from_slice(&encode_server_frame(OpCode::Binary, &payload(300)));
        assert_eq!(out, expected);
    }

    #[test]
    fn client_frames_without_fin_clear_the_fin_bit() {
        let wire = encode_client_frame(OpCode::Text, b"part", MASK, false);
        assert_eq!(wire[0], 0x01);
        assert_eq!(wire[1], 0x80 | 4);
        assert_eq!(wire[2..6], MASK);
        assert!(!decode(&wire, 100).unwrap().unwrap().fin);
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let frame = close_frame(1001, "shutting down");
        assert_eq!(frame[0], 0x88);
        assert_eq!(usize::from(frame[1]), 2 + "shutting down".len());
        assert_eq!(&frame[2..4], 1001u16.to_be_bytes());
        assert_eq!(&frame[4..], b"shutting down");
        assert_eq!(parse_close_payload(&frame[2..]), Ok(Some(1001)));

        assert_eq!(&close_frame(1000, "")[..], [0x88, 2, 0x03, 0xE8]);
    }

    #[test]
    fn close_frame_reason_is_cut_to_fit_at_a_char_boundary() {
        let frame = close_frame(1008, &"x".repeat(500));
        assert_eq!(frame.len(), 2 + 125);
        assert_eq!(frame[1], 125);
        assert_eq!(&frame[4..], "x".repeat(123).as_bytes());

        // 'é' is two bytes: 61 of them fit in 123, the 62nd would be cut.
        let frame = close_frame(1008, &"é".repeat(100));
        assert_eq!(frame[1], 2 + 122);
        assert_eq!(std::str::from_utf8(&frame[4..]).unwrap(), "é".repeat(61));
        assert_eq!(parse_close_payload(&frame[2..]), Ok(Some(1008)));
    }

    #[test]
    fn close_payload_parsing() {
        assert_eq!(parse_close_payload(b""), Ok(None));
        assert_eq!(parse_close_payload(&[0x03]), Err(FrameError::CloseTooShort));
        assert_eq!(FrameError::CloseTooShort.close_code(), 1002);
        assert_eq!(parse_close_payload(&[0x03, 0xE8]), Ok(Some(1000)));
        assert_eq!(
            parse_close_payload(&[0x0F, 0xA0, b'o', b'k']),
            Ok(Some(4000))
        );

        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xCE, 0xBA, 0xE1, 0xBD]);
        let err = parse_close_payload(&bad_reason).unwrap_err();
        assert_eq!(err, FrameError::InvalidCloseReason);
        assert_eq!(err.close_code(), 1007);
    }

    #[test]
    fn close_code_validity() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert_eq!(
                parse_close_payload(&code.to_be_bytes()),
                Ok(Some(code)),
                "{code}"
            );
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let err = parse_close_payload(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err, FrameError::InvalidCloseCode(code));
            assert_eq!(err.close_code(), 1002);
        }
    }
}
