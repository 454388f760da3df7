//! The JSON messages of PROTOCOL.md §4 and §9–§11, parsed and serialized;
//! no I/O.
//!
//! Inbound messages are parsed with simd-json into a borrowed tree over the
//! frame's own buffer, then checked field by field so that every error names
//! the field it is about. Outbound messages are written by hand straight into
//! a byte buffer: they are few, fixed in shape, and the push frame is on the
//! hottest path of the broker. A message too large to parse is only
//! scanned (`peek_ids`) for the `id` and `_reqId` to echo in its `error
//! too_large`.
mod admin;
mod close;
mod group;
mod inbound;
mod outbound;
mod peek;

pub use admin::{
    write_audit_result, write_audit_verify_result, write_ban_ack, write_bans_list, write_kick_ack,
    Admin, AuditEntry, BanEntry, VerifyResult,
};
pub use close::CloseReason;
pub use group::GroupName;
#[cfg(feature = "fuzzing")]
pub(crate) use inbound::parse_plain_send;
pub(crate) use inbound::{hello_signed_text, session_attest_text, session_hello_signed_text};
pub use inbound::{
    parse_client_message, Attestation, ClientMessage, GroupJoin, Hello, Parsed, Parser, Send,
    SessionHello, Target, MAX_CLIENT_ACK_IDS, MAX_CLIENT_MESSAGE_ID_CHARS,
};
pub use outbound::{
    mark_redelivered, write_ack, write_error, write_hello_ack, write_peer, write_peer_event,
    write_peer_event_with, write_push, write_str as write_json_str, Ack, GroupRole, HelloAck,
    PeerFields, PeersListWriter, PushFields, PushRanges,
};
pub(crate) use peek::peek_ids;
#[cfg(feature = "fuzzing")]
pub(crate) use peek::PeekedIds;

use std::borrow::Cow;

/// Deepest nesting of arrays and objects accepted in any client JSON (a
/// message, a hook or `/join` body). simd-json builds its tree, and serde
/// walks an ignored field, by recursion: a 64 KiB run of `[` overflowed a
/// shard's stack and took the whole process down. Nothing the contract
/// defines nests past 3 levels.
pub const MAX_JSON_DEPTH: usize = 64;

/// Whether `json` nests arrays and objects at most `max` deep, looking
/// only at brackets outside strings: one pass, no allocation, run before
/// any parser sees the bytes. Malformed input is left to the parser.
pub fn nesting_within(json: &[u8], max: usize) -> bool {
    // Nearly every message has a handful of brackets (a ciphertext has
    // none): a count that vectorizes settles it without the walk.
    if json.iter().filter(|&&b| b == b'[' || b == b'{').count() <= max {
        return true;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Most characters in a `_reqId` (PROTOCOL.md §9).
pub const MAX_REQ_ID_CHARS: usize = 64;

/// Delivery priority of an envelope (`mesh.message_priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    Now,
    Next,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Now, Priority::Next, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Now => "now",
            Priority::Next => "next",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "now" => Some(Priority::Now),
            "next" => Some(Priority::Next),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The opt-in features of PROTOCOL.md §9–§11 a hello asks for, or a
/// hello_ack grants (`capabilities`, an array of their names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// `peer_events`: pushes about the other sessions of the mesh (§9).
    pub peer_events: bool,
    /// `client_ack`: acknowledged delivery (§11).
    pub client_ack: bool,
}

impl Capabilities {
    /// Turns on the capability `name`; unknown names are ignored (§9).
    pub fn insert(&mut self, name: &str) {
        match name {
            "peer_events" => self.peer_events = true,
            "client_ack" => self.client_ack = true,
            _ => {}
        }
    }

    /// The names of the capabilities that are on, in a fixed order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        [
            (self.peer_events, "peer_events"),
            (self.client_ack, "client_ack"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
    }
}

/// The `code` of an `error` message (PROTOCOL.md §4, §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NoHello,
    AlreadyHello,
    BadJson,
    UnknownType,
    InvalidField,
    BadSignature,
    StaleTimestamp,
    Unauthorized,
    Capacity,
    TooLarge,
    RateLimited,
    UnsupportedTarget,
    UnknownTarget,
    Unavailable,
    Internal,
    /// A hello's `protocolVersion` above the versions the broker speaks.
    UnsupportedProtocol,
    Forbidden,
    AmbiguousTarget,
    /// A `session_hello` whose attestation names other keys (§9).
    AttestationMismatch,
    /// A `session_hello` attestation whose `expiresAt` has passed.
    Expired,
    /// A `session_hello` attestation valid more than 24 h ahead.
    TtlTooLong,
    /// A `session_hello` whose parent key is a member with another id.
    ParentMemberIdMismatch,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoHello => "no_hello",
            ErrorCode::AlreadyHello => "already_hello",
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::StaleTimestamp => "stale_timestamp",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Capacity => "capacity",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnsupportedTarget => "unsupported_target",
            ErrorCode::UnknownTarget => "unknown_target",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::AmbiguousTarget => "ambiguous_target",
            ErrorCode::AttestationMismatch => "attestation_mismatch",
            ErrorCode::Expired => "expired",
            ErrorCode::TtlTooLong => "ttl_too_long",
            ErrorCode::ParentMemberIdMismatch => "parent_member_id_mismatch",
        }
    }
}

/// An error to answer with an `error` message; `id` echoes a send's id and
/// `req_id` the message's `_reqId` (PROTOCOL.md §9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub id: Option<String>,
    pub req_id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            id: None,
            req_id: None,
        }
    }

    pub fn with_id(mut self, id: Option<&str>) -> Self {
        self.id = id.map(str::to_owned);
        self
    }

    pub fn with_req_id(mut self, req_id: Option<&str>) -> Self {
        self.req_id = req_id.map(str::to_owned);
        self
    }

    pub fn invalid_field(field: &'static str, expected: &'static str) -> Self {
        ProtocolError::new(
            ErrorCode::InvalidField,
            format!("field '{field}' {expected}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(nesting_within(
            deep(MAX_JSON_DEPTH).as_bytes(),
            MAX_JSON_DEPTH
        ));
        assert!(!nesting_within(
            deep(MAX_JSON_DEPTH + 1).as_bytes(),
            MAX_JSON_DEPTH
        ));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(3), "}".repeat(3));
        assert!(nesting_within(objects.as_bytes(), 3));
        assert!(!nesting_within(objects.as_bytes(), 2));
        // Brackets in strings, escaped quotes included, do not count.
        let quoted = format!(r#"{{"s":"{}\"[[[","t":1}}"#, "[".repeat(100));
        assert!(nesting_within(quoted.as_bytes(), 1));
        // Unbalanced input is the parser's to refuse.
        assert!(nesting_within(b"]]]}", 1));
    }
}
