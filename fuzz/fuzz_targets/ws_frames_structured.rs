//! Structure-aware frames: opcode, FIN, RSV bits, mask, payload and the
//! length's encoding chosen by the fuzzer, encoded here (independently of
//! the crate's encoder) and decoded back to back. A valid frame must come
//! back as it was encoded; an invalid one must fail with the error RFC 6455
//! and the broker's rules give, checked in the decoder's documented order.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{decode_client_frame, FrameError, OpCode};

#[derive(Arbitrary, Debug)]
enum Length {
    /// The shortest encoding of the payload's length.
    Minimal,
    /// The 16-bit form, whatever the length (non-minimal below 126).
    Sixteen,
    /// The 64-bit form, whatever the length (non-minimal up to 65535).
    SixtyFour,
    /// The 64-bit form with its most significant bit set.
    SixtyFourMsb,
    /// The minimal form of a length this much larger than the payload
    /// given: the frame is cut off by the end of the stream.
    Declared(u32),
}

#[derive(Arbitrary, Debug)]
struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    length: Length,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    max: u16,
    frames: Vec<Frame>,
}

/// What decoding a frame must give.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Frame {
        fin: bool,
        opcode: OpCode,
        payload: Vec<u8>,
    },
    /// Cut off: more bytes are needed.
    Incomplete,
    Error(FrameError),
}

fn opcode(bits: u8) -> Option<OpCode> {
    Some(match bits {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        _ => return None,
    })
}

/// Appends the frame's bytes to `out` and says what decoding them gives.
fn encode(frame: &Frame, max: usize, out: &mut Vec<u8>) -> Expected {
    let rsv = frame.rsv & 0x7;
    let op = frame.opcode & 0xF;
    let len = frame.payload.len() as u64;
    let declared = match frame.length {
        Length::Declared(extra) => len + u64::from(extra),
        Length::SixtyFourMsb => len | 1 << 63,
        _ => len,
    };
    let form = match frame.length {
        Length::Sixteen if len <= 0xFFFF => 16,
        Length::SixtyFour | Length::SixtyFourMsb => 64,
        _ if declared < 126 => 7,
        _ if declared <= 0xFFFF => 16,
        _ => 64,
    };
    out.push(u8::from(frame.fin) << 7 | rsv << 4 | op);
    let mask_bit = if frame.mask.is_some() { 0x80 } else { 0 };
    let len7 = match form {
        7 => declared as u8,
        16 => 126,
        _ => 127,
    };
    out.push(mask_bit | len7);
    match form {
        16 => out.extend_from_slice(&(declared as u16).to_be_bytes()),
        64 => out.extend_from_slice(&declared.to_be_bytes()),
        _ => {}
    }
    let key = frame.mask.unwrap_or_default();
    if frame.mask.is_some() {
        out.extend_from_slice(&key);
    }
    out.extend(
        frame
            .payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4]),
    );

    let Some(opcode) = (rsv == 0).then(|| opcode(op)) else {
        return Expected::Error(FrameError::ReservedBits);
    };
    let Some(opcode) = opcode else {
        return Expected::Error(FrameError::ReservedOpcode(op));
    };
    if frame.mask.is_none() {
        return Expected::Error(FrameError::UnmaskedClientFrame);
    }
    if opcode.is_control() && !frame.fin {
        return Expected::Error(FrameError::FragmentedControl);
    }
    if opcode.is_control() && len7 > 125 {
        return Expected::Error(FrameError::ControlTooLong);
    }
    if form == 16 && declared < 126 {
        return Expected::Error(FrameError::NonMinimalLength);
    }
    if form == 64 && declared >> 63 != 0 {
        return Expected::Error(FrameError::LengthMsbSet);
    }
    if form == 64 && declared <= 0xFFFF {
        return Expected::Error(FrameError::NonMinimalLength);
    }
    if declared > max as u64 {
        return Expected::Error(FrameError::TooLarge { len: declared, max });
    }
    if declared > len {
        return Expected::Incomplete;
    }
    Expected::Frame {
        fin: frame.fin,
        opcode,
        payload: frame.payload.clone(),
    }
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for frame in &input.frames {
        let start = stream.len();
        let want = encode(frame, max, &mut stream);
        let last = !matches!(want, Expected::Frame { .. });
        expected.push((start, want));
        if last {
            // Nothing after a failed or cut-off frame is read.
            break;
        }
    }
    for (i, (start, want)) in expected.iter().enumerate() {
        let end = expected.get(i + 1).map_or(stream.len(), |next| next.0);
        let buf = &mut stream[*start..end];
        // Every shorter read of this frame asks for more bytes, or already
        // shows the same error.
        // (The header's cuts, and the last: between them nothing changes.)
        for cut in (0..buf.len()).filter(|&c| c <= 14 || c + 1 == buf.len()) {
            let mut part = buf[..cut].to_vec();
            match decode_client_frame(&mut part, max) {
                Ok(None) => {}
                Err(err) => assert!(
                    matches!(want, Expected::Error(w) if *w == err),
                    "frame {i} cut at {cut}: {err:?}, want {want:?}"
                ),
                Ok(Some(h)) => panic!("frame {i} cut at {cut}: {h:?}, want {want:?}"),
            }
        }
        let got = match decode_client_frame(buf, max) {
            Ok(None) => Expected::Incomplete,
            Ok(Some(header)) => {
                assert_eq!(header.payload_range().end, buf.len(), "frame {i} length");
                Expected::Frame {
                    fin: header.fin,
                    opcode: header.opcode,
                    payload: buf[header.payload_range()].to_vec(),
                }
            }
            Err(err) => Expected::Error(err),
        };
        assert_eq!(&got, want, "frame {i}");
    }
});
