//! RFC 6455 WebSocket: the opening handshake and the frame codec, pure (no
//! I/O). The connection code reads bytes, calls `decode_client_frame` on its
//! read buffer, feeds each frame to its `MessageAssembler`, and writes frames
//! built by `encode_server_frame` / `write_server_frame` / `close_frame`.
//!
//! - `handshake` — `Sec-WebSocket-Key` check and the `101` response.
//! - `frame`     — decode client frames in place, encode server frames.
//! - `message`   — reassemble fragmented messages, enforce the size limit
//!   and the UTF-8 of text.
//!
//! Refinements of the API first agreed on:
//! - `close_frame` returns the whole encoded server Close frame (header and
//!   payload), ready to write, not only its payload.
//! - `FrameHeader::payload_range()` gives the payload's place in the buffer;
//!   its `.end` is the frame's length, i.e. how far to advance.
//! - A close reason that is not UTF-8 fails with 1007 (like a non-UTF-8 text
//!   message), not 1002. Close codes 1012-1014 (IANA registered; the broker
//!   itself sends 1013) are accepted as well as 1000-1003, 1007-1011 and
//!   3000-4999.
//! - `FrameError` variants: `UnmaskedClientFrame`, `ReservedBits`,
//!   `ReservedOpcode(u8)`, `FragmentedControl`, `ControlTooLong`,
//!   `NonMinimalLength`, `LengthMsbSet`, `TooLarge { len, max }` (1009),
//!   `CloseTooShort`, `InvalidCloseCode(u16)`, `InvalidCloseReason` (1007).
//! - Fragmented text is checked for UTF-8 as each fragment arrives, so a bad
//!   sequence fails before the message completes.
//! - `OpCode::is_control()` is public, for callers that route control frames.
//! - A message over the limit is answered with `error too_large` echoing the
//!   `id` in its first `TOO_LARGE_PREFIX` bytes: `OversizedFrame` reaches
//!   the (unmasked) payload start of a frame refused from its header, and
//!   `MessageAssembler::refused_start` / `oversized_start` give the start
//!   of the whole message (fragments buffered before included).
pub mod frame;
pub mod handshake;
pub mod message;

pub use frame::{
    close_frame, decode_client_frame, encode_client_frame, encode_server_frame,
    finish_server_frame, parse_close_payload, server_frame_payload, write_server_frame, FrameError,
    FrameHeader, OpCode, OversizedFrame, SERVER_HEADER_ROOM, TOO_LARGE_PREFIX,
};
pub use handshake::{accept_key, is_valid_client_key, switching_protocols_response};
pub use message::{Incoming, MessageAssembler, MessageError, MessageStart};
