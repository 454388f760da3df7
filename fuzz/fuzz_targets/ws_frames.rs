//! The frame decoder and the message assembler over a byte stream that
//! arrives in pieces cut where the fuzzer says: the messages (and the
//! error that ends them) must not depend on where the reads were cut, and
//! the decoder must not touch a frame it has not taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{decode_client_frame, Incoming, MessageAssembler, MessageError};

/// What came out, owned so that it outlives the read buffer.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
    /// Fragments buffered, no message yet.
    Fragment,
    Failed(MessageError, u16, Vec<u8>),
}

/// Feeds `stream` in the pieces `cuts` (increasing offsets) make, the way
/// a connection does: append what was read, take every whole frame.
fn run(stream: &[u8], cuts: &[usize], max: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut assembler = MessageAssembler::new(max);
    let mut buf: Vec<u8> = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            let before = buf.clone();
            match decode_client_frame(&mut buf, max) {
                Ok(None) => {
                    assert_eq!(buf, before, "an incomplete frame was modified");
                    break;
                }
                Ok(Some(header)) => {
                    let range = header.payload_range();
                    assert!((2..=14).contains(&header.header_len));
                    assert!(range.end <= buf.len());
                    assert!(header.payload_len <= max);
                    let event = match assembler.push(&header, &buf[range.clone()]) {
                        Ok(Some(Incoming::Text(t))) => {
                            assert!(std::str::from_utf8(t).is_ok());
                            Event::Text(t.to_vec())
                        }
                        Ok(Some(Incoming::Binary(b))) => Event::Binary(b.to_vec()),
                        Ok(Some(Incoming::Ping(p))) => Event::Ping(p.to_vec()),
                        Ok(Some(Incoming::Pong(p))) => Event::Pong(p.to_vec()),
                        Ok(Some(Incoming::Close(code))) => Event::Close(code),
                        Ok(None) => Event::Fragment,
                        Err(err) => {
                            let code = err.close_code();
                            let start = match err {
                                MessageError::TooLarge => assembler.refused_start().to_vec(),
                                _ => Vec::new(),
                            };
                            events.push(Event::Failed(err, code, start));
                            return events;
                        }
                    };
                    events.push(event);
                    buf.drain(..range.end);
                }
                Err(err) => {
                    let code = err.close_code();
                    events.push(Event::Failed(err.into(), code, Vec::new()));
                    return events;
                }
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let [limit, ncuts, rest @ ..] = data else {
        return;
    };
    // Small limits reach the size checks; 0 is a large one.
    let max = if *limit == 0 {
        1 << 20
    } else {
        usize::from(*limit) * 3
    };
    let ncuts = usize::from(*ncuts % 16).min(rest.len() / 2);
    let (cut_bytes, stream) = rest.split_at(ncuts * 2);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let whole = run(stream, &[], max);
    let split = run(stream, &cuts, max);
    assert_eq!(whole, split, "cut at {cuts:?}");
    // One byte at a time, the hardest split there is.
    if stream.len() <= 256 {
        let bytes: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(whole, run(stream, &bytes, max), "one byte at a time");
    }
});
