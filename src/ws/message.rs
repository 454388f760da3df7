//! Turns decoded frames into messages: reassembles fragmented data messages
//! (with control frames allowed in between), enforces the message size limit
//! and checks that text is UTF-8. One assembler per connection; it owns a
//! buffer only while a fragmented message is in flight, so the many idle
//! connections cost a few words each. Unfragmented messages — nearly all of
//! them — are handed back as a slice of the caller's read buffer, uncopied.

use super::frame::{
    parse_close_payload, FrameError, FrameHeader, OpCode, OversizedFrame, TOO_LARGE_PREFIX,
};

/// A complete message or a control frame, borrowed from the caller's read
/// buffer (unfragmented) or from the assembler (reassembled).
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// UTF-8 already checked.
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer's close code, `None` for an empty Close payload.
    Close(Option<u16>),
}

/// Why a message was refused; every variant fails the connection.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("text message is not UTF-8")]
    InvalidUtf8,
    #[error("continuation frame without a fragmented message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message awaits its continuation")]
    ExpectedContinuation,
    #[error("message exceeds the size limit")]
    TooLarge,
}

impl MessageError {
    /// The close code to fail the connection with.
    pub fn close_code(&self) -> u16 {
        match self {
            MessageError::Frame(err) => err.close_code(),
            MessageError::InvalidUtf8 => 1007,
            MessageError::UnexpectedContinuation | MessageError::ExpectedContinuation => 1002,
            MessageError::TooLarge => 1009,
        }
    }
}

/// The start of a message refused as too large, for reading its `id`.
#[derive(Debug, PartialEq, Eq)]
pub struct MessageStart {
    /// At most `TOO_LARGE_PREFIX` bytes, unmasked.
    pub bytes: Vec<u8>,
    /// How many more bytes of the refused frame would lengthen `bytes`
    /// (0: it is as long as it can be).
    pub missing: usize,
}

/// Per-connection reassembly state.
pub struct MessageAssembler {
    /// Largest message accepted, inclusive.
    max_message: usize,
    /// `Text` or `Binary` while a fragmented message is in flight.
    fragmented: Option<OpCode>,
    /// The fragments so far. After a reassembled message is returned it
    /// stays here (the caller borrows it) until the next `push`, which frees
    /// it. After `MessageError::TooLarge`, the refused message's start.
    buf: Vec<u8>,
    /// Length of the prefix of `buf` known to be valid UTF-8 (text only).
    utf8_checked: usize,
}

impl MessageAssembler {
    pub fn new(max_message: usize) -> Self {
        MessageAssembler {
            max_message,
            fragmented: None,
            buf: Vec::new(),
            utf8_checked: 0,
        }
    }

    /// Feed one decoded frame: its header and its unmasked payload.
    ///
    /// `Ok(Some(_))`: a complete message or a control frame (control frames
    /// may arrive between the fragments of a message). `Ok(None)`: a
    /// fragment was buffered. An error means the connection must be failed
    /// with `err.close_code()`.
    pub fn push<'a>(
        &'a mut self,
        header: &FrameHeader,
        payload: &'a [u8],
    ) -> Result<Option<Incoming<'a>>, MessageError> {
        debug_assert_eq!(header.payload_len, payload.len());
        if self.fragmented.is_none() && self.buf.capacity() != 0 {
            // The last reassembled message has been consumed.
            self.buf = Vec::new();
        }
        match header.opcode {
            OpCode::Ping => Ok(Some(Incoming::Ping(payload))),
            OpCode::Pong => Ok(Some(Incoming::Pong(payload))),
            OpCode::Close => Ok(Some(Incoming::Close(parse_close_payload(payload)?))),
            OpCode::Text | OpCode::Binary => {
                if self.fragmented.is_some() {
                    return Err(MessageError::ExpectedContinuation);
                }
                if payload.len() > self.max_message {
                    self.buf.clear();
                    return Err(self.refuse(payload));
                }
                let text = header.opcode == OpCode::Text;
                if header.fin {
                    return if text {
                        std::str::from_utf8(payload).map_err(|_| MessageError::InvalidUtf8)?;
                        Ok(Some(Incoming::Text(payload)))
                    } else {
                        Ok(Some(Incoming::Binary(payload)))
                    };
                }
                self.fragmented = Some(header.opcode);
                self.buf.extend_from_slice(payload);
                self.utf8_checked = 0;
                if text {
                    self.check_utf8(false)?;
                }
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(opcode) = self.fragmented else {
                    return Err(MessageError::UnexpectedContinuation);
                };
                if payload.len() > self.max_message - self.buf.len() {
                    return Err(self.refuse(payload));
                }
                self.buf.extend_from_slice(payload);
                let text = opcode == OpCode::Text;
                if text {
                    self.check_utf8(header.fin)?;
                }
                if !header.fin {
                    return Ok(None);
                }
                self.fragmented = None;
                Ok(Some(if text {
                    Incoming::Text(&self.buf)
                } else {
                    Incoming::Binary(&self.buf)
                }))
            }
        }
    }

    /// Keeps what `refused_start` returns: the message's start so far
    /// (already in `buf`), then the refused frame's payload, up to
    /// `TOO_LARGE_PREFIX` bytes.
    fn refuse(&mut self, payload: &[u8]) -> MessageError {
        self.buf.truncate(TOO_LARGE_PREFIX);
        let room = TOO_LARGE_PREFIX - self.buf.len();
        self.buf
            .extend_from_slice(&payload[..payload.len().min(room)]);
        MessageError::TooLarge
    }

    /// After `push` failed with `MessageError::TooLarge`: the first (at
    /// most `TOO_LARGE_PREFIX`) bytes of the refused message, the fragments
    /// buffered before the frame that went over the limit included. The
    /// assembler is not to be fed after an error.
    pub fn refused_start(&self) -> &[u8] {
        &self.buf[..self.buf.len().min(TOO_LARGE_PREFIX)]
    }

    /// After `decode_client_frame` refused the frame at the start of
    /// `frame_bytes` with `FrameError::TooLarge` (from its header alone,
    /// before its payload arrived): the first (at most `TOO_LARGE_PREFIX`)
    /// bytes of the message it begins or, for a continuation, continues —
    /// the fragments buffered so far, then the frame's payload as far as
    /// `frame_bytes` holds it, unmasked — and how many more bytes of the
    /// frame would lengthen them. `frame_bytes` is not modified.
    pub fn oversized_start(&self, frame_bytes: &[u8]) -> MessageStart {
        let Some(frame) = OversizedFrame::parse(frame_bytes) else {
            return MessageStart {
                bytes: Vec::new(),
                missing: 0,
            };
        };
        let mut bytes = Vec::new();
        if frame.opcode == OpCode::Continuation && self.fragmented.is_some() {
            bytes.extend_from_slice(&self.buf[..self.buf.len().min(TOO_LARGE_PREFIX)]);
        }
        let room = TOO_LARGE_PREFIX - bytes.len();
        bytes.extend(frame.payload_start(frame_bytes, room));
        MessageStart {
            bytes,
            missing: frame.needed(room).saturating_sub(frame_bytes.len()),
        }
    }

    /// Check the text buffered since the last check, so that a bad sequence
    /// fails at once rather than when the message completes. A sequence cut
    /// by the end of a fragment may be completed by the next one, unless
    /// this was the last (`fin`).
    fn check_utf8(&mut self, fin: bool) -> Result<(), MessageError> {
        match std::str::from_utf8(&self.buf[self.utf8_checked..]) {
            Ok(_) => {
                self.utf8_checked = self.buf.len();
                Ok(())
            }
            Err(err) if err.error_len().is_none() && !fin => {
                self.utf8_checked += err.valid_up_to();
                Ok(())
            }
            Err(_) => Err(MessageError::InvalidUtf8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{decode_client_frame, encode_client_frame};

    /// An owned copy of `Incoming`, so results outlive the frame buffer.
    #[derive(Debug, PartialEq)]
    enum Got {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>),
    }

    impl From<Incoming<'_>> for Got {
        fn from(incoming: Incoming<'_>) -> Self {
            match incoming {
                Incoming::Text(b) => Got::Text(b.to_vec()),
                Incoming::Binary(b) => Got::Binary(b.to_vec()),
                Incoming::Ping(b) => Got::Ping(b.to_vec()),
                Incoming::Pong(b) => Got::Pong(b.to_vec()),
                Incoming::Close(code) => Got::Close(code),
            }
        }
    }

    /// Encode a client frame, decode it, and push it.
    fn feed(
        asm: &mut MessageAssembler,
        opcode: OpCode,
        payload: &[u8],
        fin: bool,
    ) -> Result<Option<Got>, MessageError> {
        let mut wire = encode_client_frame(opcode, payload, [0xA1, 0xB2, 0xC3, 0xD4], fin);
        let header = decode_client_frame(&mut wire, usize::MAX).unwrap().unwrap();
        asm.push(&header, &wire[header.payload_range()])
            .map(|m| m.map(Got::from))
    }

    #[test]
    fn unfragmented_messages_are_borrowed_not_copied() {
        let mut asm = MessageAssembler::new(100);
        let mut wire = encode_client_frame(OpCode::Text, "héllo".as_bytes(), [1, 2, 3, 4], true);
        let header = decode_client_frame(&mut wire, 100).unwrap().unwrap();
        let payload = &wire[header.payload_range()];
        let Some(Incoming::Text(text)) = asm.push(&header, payload).unwrap() else {
            panic!("expected text");
        };
        assert_eq!(text, "héllo".as_bytes());
        assert_eq!(text.as_ptr(), payload.as_ptr());
        assert_eq!(asm.buf.capacity(), 0);

        let mut asm = MessageAssembler::new(100);
        assert_eq!(
            feed(&mut asm, OpCode::Binary, &[0xFF, 0x00], true),
            Ok(Some(Got::Binary(vec![0xFF, 0x00])))
        );
    }

    #[test]
    fn control_frames_pass_through() {
        let mut asm = MessageAssembler::new(100);
        assert_eq!(
            feed(&mut asm, OpCode::Ping, b"hi", true),
            Ok(Some(Got::Ping(b"hi".to_vec())))
        );
        assert_eq!(
            feed(&mut asm, OpCode::Pong, b"", true),
            Ok(Some(Got::Pong(vec![])))
        );
        assert_eq!(
            feed(&mut asm, OpCode::Close, b"", true),
            Ok(Some(Got::Close(None)))
        );
        assert_eq!(
            feed(
                &mut asm,
                OpCode::Close,
                &[0x03, 0xE9, b'b', b'y', b'e'],
                true
            ),
            Ok(Some(Got::Close(Some(1001))))
        );
        let err = feed(&mut asm, OpCode::Close, &1005u16.to_be_bytes(), true).unwrap_err();
        assert_eq!(err, MessageError::Frame(FrameError::InvalidCloseCode(1005)));
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn fragments_reassemble_around_interleaved_control_frames() {
        let mut asm = MessageAssembler::new(100);
        assert_eq!(feed(&mut asm, OpCode::Text, b"Hel", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Ping, b"p", true),
            Ok(Some(Got::Ping(b"p".to_vec())))
        );
        assert_eq!(feed(&mut asm, OpCode::Continuation, b"lo", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Pong, b"", true),
            Ok(Some(Got::Pong(vec![])))
        );
        assert_eq!(feed(&mut asm, OpCode::Continuation, b"", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, b" world", true),
            Ok(Some(Got::Text(b"Hello world".to_vec())))
        );
        // The next message starts afresh.
        assert_eq!(feed(&mut asm, OpCode::Binary, &[1], false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &[2, 0xFF], true),
            Ok(Some(Got::Binary(vec![1, 2, 0xFF])))
        );
    }

    #[test]
    fn close_may_interrupt_a_fragmented_message() {
        let mut asm = MessageAssembler::new(100);
        assert_eq!(feed(&mut asm, OpCode::Binary, b"part", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Close, &1000u16.to_be_bytes(), true),
            Ok(Some(Got::Close(Some(1000))))
        );
    }

    #[test]
    fn reassembly_buffer_is_freed_once_consumed() {
        let mut asm = MessageAssembler::new(100);
        assert_eq!(asm.buf.capacity(), 0);
        feed(&mut asm, OpCode::Text, b"a", false).unwrap();
        assert!(asm.buf.capacity() > 0);
        feed(&mut asm, OpCode::Continuation, b"b", true).unwrap();
        feed(&mut asm, OpCode::Ping, b"", true).unwrap();
        assert_eq!(asm.buf.capacity(), 0);
    }

    #[test]
    fn continuation_without_a_start_is_a_protocol_error() {
        let mut asm = MessageAssembler::new(100);
        for fin in [true, false] {
            let err = feed(&mut asm, OpCode::Continuation, b"x", fin).unwrap_err();
            assert_eq!(err, MessageError::UnexpectedContinuation);
            assert_eq!(err.close_code(), 1002);
        }
        // Also after a fragmented message has completed.
        feed(&mut asm, OpCode::Text, b"a", false).unwrap();
        feed(&mut asm, OpCode::Continuation, b"b", true).unwrap();
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, b"c", true),
            Err(MessageError::UnexpectedContinuation)
        );
    }

    #[test]
    fn new_data_frame_while_expecting_continuation_is_a_protocol_error() {
        for (first, second, fin) in [
            (OpCode::Text, OpCode::Text, true),
            (OpCode::Text, OpCode::Binary, false),
            (OpCode::Binary, OpCode::Text, true),
        ] {
            let mut asm = MessageAssembler::new(100);
            assert_eq!(feed(&mut asm, first, b"a", false), Ok(None));
            let err = feed(&mut asm, second, b"b", fin).unwrap_err();
            assert_eq!(err, MessageError::ExpectedContinuation);
            assert_eq!(err.close_code(), 1002);
        }
    }

    #[test]
    fn invalid_utf8_text_fails_with_1007() {
        let mut asm = MessageAssembler::new(100);
        for bad in [
            &[0xFF][..],
            &[b'a', 0xC0, 0x80],
            &[0xED, 0xA0, 0x80],
            &[0xE2, 0x82],
        ] {
            let err = feed(&mut asm, OpCode::Text, bad, true).unwrap_err();
            assert_eq!(err, MessageError::InvalidUtf8);
            assert_eq!(err.close_code(), 1007);
        }
        // Binary is not checked.
        assert_eq!(
            feed(&mut asm, OpCode::Binary, &[0xFF], true),
            Ok(Some(Got::Binary(vec![0xFF])))
        );
    }

    #[test]
    fn multibyte_utf8_split_across_fragments_is_accepted() {
        let text = "a€𝄞b";
        let bytes = text.as_bytes();
        // Every way of cutting the message into three fragments.
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut asm = MessageAssembler::new(100);
                assert_eq!(feed(&mut asm, OpCode::Text, &bytes[..i], false), Ok(None));
                assert_eq!(
                    feed(&mut asm, OpCode::Continuation, &bytes[i..j], false),
                    Ok(None)
                );
                assert_eq!(
                    feed(&mut asm, OpCode::Continuation, &bytes[j..], true),
                    Ok(Some(Got::Text(bytes.to_vec())))
                );
            }
        }
    }

    #[test]
    fn invalid_utf8_in_a_fragment_fails_before_the_message_ends() {
        let mut asm = MessageAssembler::new(100);
        assert_eq!(feed(&mut asm, OpCode::Text, b"ok", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &[0xCE, 0xBA, 0xFF], false),
            Err(MessageError::InvalidUtf8)
        );

        let mut asm = MessageAssembler::new(100);
        assert_eq!(
            feed(&mut asm, OpCode::Text, &[0xF8], false),
            Err(MessageError::InvalidUtf8)
        );
    }

    #[test]
    fn text_ending_inside_a_multibyte_sequence_fails() {
        let mut asm = MessageAssembler::new(100);
        assert_eq!(feed(&mut asm, OpCode::Text, b"ok", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &[0xE2, 0x82], false),
            Ok(None)
        );
        let err = feed(&mut asm, OpCode::Continuation, b"", true).unwrap_err();
        assert_eq!(err, MessageError::InvalidUtf8);
    }

    #[test]
    fn size_limit_is_inclusive_for_single_frames() {
        let mut asm = MessageAssembler::new(10);
        assert_eq!(
            feed(&mut asm, OpCode::Text, b"0123456789", true),
            Ok(Some(Got::Text(b"0123456789".to_vec())))
        );
        let err = feed(&mut asm, OpCode::Text, b"0123456789a", true).unwrap_err();
        assert_eq!(err, MessageError::TooLarge);
        assert_eq!(err.close_code(), 1009);
        assert_eq!(
            feed(&mut asm, OpCode::Binary, &[0; 11], false),
            Err(MessageError::TooLarge)
        );
    }

    #[test]
    fn size_limit_is_inclusive_for_fragmented_messages() {
        let mut asm = MessageAssembler::new(10);
        assert_eq!(feed(&mut asm, OpCode::Binary, &[1; 4], false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &[2; 4], false),
            Ok(None)
        );
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &[3; 2], true),
            Ok(Some(Got::Binary(vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3])))
        );

        let mut asm = MessageAssembler::new(10);
        assert_eq!(feed(&mut asm, OpCode::Text, b"01234", false), Ok(None));
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, b"56789", false),
            Ok(None)
        );
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, b"a", true),
            Err(MessageError::TooLarge)
        );
    }

    #[test]
    fn refused_start_of_a_single_frame_message() {
        let mut asm = MessageAssembler::new(10);
        assert_eq!(
            feed(&mut asm, OpCode::Text, b"{\"id\":\"ab\"}", true),
            Err(MessageError::TooLarge)
        );
        assert_eq!(asm.refused_start(), b"{\"id\":\"ab\"}");

        let mut asm = MessageAssembler::new(5000);
        let big = payload_of(6000);
        assert_eq!(
            feed(&mut asm, OpCode::Binary, &big, true),
            Err(MessageError::TooLarge)
        );
        assert_eq!(asm.refused_start(), &big[..TOO_LARGE_PREFIX]);
    }

    #[test]
    fn refused_start_of_a_fragmented_message_is_its_beginning() {
        let message = payload_of(9000);
        // Fragments of 3000: the third goes over 8192.
        let mut asm = MessageAssembler::new(8192);
        assert_eq!(
            feed(&mut asm, OpCode::Text, &message[..3000], false),
            Ok(None)
        );
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &message[3000..6000], false),
            Ok(None)
        );
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &message[6000..], true),
            Err(MessageError::TooLarge)
        );
        assert_eq!(asm.refused_start(), &message[..TOO_LARGE_PREFIX]);

        // A short first fragment: the refused frame's payload fills up the
        // start.
        let mut asm = MessageAssembler::new(8192);
        assert_eq!(
            feed(&mut asm, OpCode::Text, &message[..100], false),
            Ok(None)
        );
        assert_eq!(
            feed(&mut asm, OpCode::Continuation, &message[100..], true),
            Err(MessageError::TooLarge)
        );
        assert_eq!(asm.refused_start(), &message[..TOO_LARGE_PREFIX]);
    }

    #[test]
    fn oversized_start_of_a_frame_refused_from_its_header() {
        const MASK: [u8; 4] = [9, 8, 7, 6];
        let message = payload_of(9000);
        let asm = MessageAssembler::new(8192);
        let wire = encode_client_frame(OpCode::Text, &message, MASK, true);
        // Header (8 bytes) and 1000 payload bytes so far.
        let part = &wire[..1008];
        assert!(matches!(
            decode_client_frame(&mut part.to_vec(), 8192),
            Err(FrameError::TooLarge { .. })
        ));
        let start = asm.oversized_start(part);
        assert_eq!(start.bytes, &message[..1000]);
        assert_eq!(start.missing, TOO_LARGE_PREFIX - 1000);
        let start = asm.oversized_start(&wire);
        assert_eq!(start.bytes, &message[..TOO_LARGE_PREFIX]);
        assert_eq!(start.missing, 0);
        // Only the length bytes: nothing yet.
        let start = asm.oversized_start(&wire[..4]);
        assert_eq!(
            (start.bytes.len(), start.missing),
            (0, TOO_LARGE_PREFIX + 4)
        );

        // A continuation over the limit after a buffered first fragment.
        let mut asm = MessageAssembler::new(8192);
        assert_eq!(
            feed(&mut asm, OpCode::Text, &message[..100], false),
            Ok(None)
        );
        let wire = encode_client_frame(OpCode::Continuation, &message[100..], MASK, true);
        let start = asm.oversized_start(&wire[..500]);
        assert_eq!(start.bytes, &message[..100 + 492]);
        assert_eq!(start.missing, TOO_LARGE_PREFIX - 100 - 492);
        let start = asm.oversized_start(&wire);
        assert_eq!(start.bytes, &message[..TOO_LARGE_PREFIX]);
        assert_eq!(start.missing, 0);

        // A new message's frame does not carry an earlier fragment along.
        let wire = encode_client_frame(OpCode::Binary, &message, MASK, true);
        assert_eq!(
            asm.oversized_start(&wire).bytes,
            &message[..TOO_LARGE_PREFIX]
        );
        // Not a frame header.
        assert_eq!(asm.oversized_start(b"x").bytes, b"");
    }

    /// ASCII text whose bytes vary (so a slip in unmasking shows).
    fn payload_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i * 7 % 26) as u8).collect()
    }

    #[test]
    fn frame_errors_keep_their_close_codes() {
        let too_large = MessageError::from(FrameError::TooLarge { len: 11, max: 10 });
        assert_eq!(too_large.close_code(), 1009);
        assert_eq!(
            MessageError::from(FrameError::ReservedBits).close_code(),
            1002
        );
        assert_eq!(
            MessageError::from(FrameError::InvalidCloseReason).close_code(),
            1007
        );
    }
}
