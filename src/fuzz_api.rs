//! The fuzz targets' one door into the crate (feature `fuzzing`, see
//! `fuzz/`): thin public entry points onto parsers that are crate-private,
//! so that none of their internals has to be made public for fuzzing.
//! Nothing here is part of the broker's API.

pub use crate::hook::{HookError, HookSignal, Status};
pub use crate::http::request::{HttpError, Method, RequestHead, MAX_HEADERS, MAX_HEAD_BYTES};
pub use crate::join::{InvitePayload, JoinError, JoinRequest};
pub use crate::protocol::{
    nesting_within, ClientMessage, ErrorCode, Parsed, Parser, ProtocolError, Target, MAX_JSON_DEPTH,
};
pub use crate::ws::{
    accept_key, decode_client_frame, is_valid_client_key, parse_close_payload,
    switching_protocols_response, FrameError, FrameHeader, Incoming, MessageAssembler,
    MessageError, OpCode,
};
pub use simd_json::Buffers;

/// `http::parse_head`: the request head at the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    crate::http::parse_head(buf)
}

/// `hook::parse_signal`: a `/hook/set-status` body (clobbered).
pub fn parse_hook_signal(body: &mut [u8]) -> Result<HookSignal, HookError> {
    crate::hook::parse_signal(body)
}

/// `join::parse_request`: step 1 of `/join`, the fields (body clobbered).
pub fn parse_join_request(body: &mut [u8]) -> Result<JoinRequest, JoinError> {
    crate::join::parse_request(body)
}

/// `join::validate`: steps 1 and 2 of `/join`, the fields and the
/// invite's signature (body clobbered).
pub fn validate_join(body: &mut [u8]) -> Result<JoinRequest, JoinError> {
    crate::join::validate(body)
}

/// The bytes an invite's signature covers.
pub fn invite_canonical(payload: &InvitePayload) -> String {
    payload.canonical()
}

/// The shard's parser: the fast send path, then the tree parser.
pub fn parse_message<'a>(parser: &'a mut Parser, data: &[u8]) -> Result<Parsed<'a>, ProtocolError> {
    parser.parse(data)
}

/// The fast send path alone (`None`: left to the tree parser).
pub fn parse_plain_send<'a>(buf: &'a mut [u8], buffers: &mut Buffers) -> Option<Parsed<'a>> {
    crate::protocol::parse_plain_send(buf, buffers)
}

/// The tree parser alone (`buf` is unescaped in place).
pub fn parse_tree<'a>(
    buf: &'a mut [u8],
    buffers: &mut Buffers,
) -> Result<Parsed<'a>, ProtocolError> {
    crate::protocol::parse_client_message(buf, buffers)
}

/// The top-level `id` and `_reqId` read from the start of a message too
/// large to parse (`protocol::peek_ids`).
pub fn peek_ids(prefix: &[u8]) -> (Option<String>, Option<String>) {
    let crate::protocol::PeekedIds { id, req_id } = crate::protocol::peek_ids(prefix);
    (id, req_id)
}

/// The text a hello's signature covers.
pub fn hello_signed_text(mesh_id: &str, member_id: &str, pubkey: &str, timestamp: i64) -> String {
    crate::protocol::hello_signed_text(mesh_id, member_id, pubkey, timestamp)
}

/// The text a `session_hello`'s parent attestation covers.
pub fn session_attest_text(parent_pubkey: &str, session_pubkey: &str, expires_at: i64) -> String {
    crate::protocol::session_attest_text(parent_pubkey, session_pubkey, expires_at)
}

/// The text a `session_hello`'s signature covers.
pub fn session_hello_signed_text(
    mesh_id: &str,
    parent_pubkey: &str,
    session_pubkey: &str,
    timestamp: i64,
) -> String {
    crate::protocol::session_hello_signed_text(mesh_id, parent_pubkey, session_pubkey, timestamp)
}
