//! Why a WebSocket connection closed (PROTOCOL.md §4 close codes): one
//! typed reason is the `broker_connections_closed_total` label, the
//! `ws close` log field and the audit `disconnect` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    ClientClosed,
    /// The TCP connection ended without a close handshake.
    PeerGone,
    /// Broker shutdown (1001).
    Shutdown,
    /// RFC 6455 violation (1002).
    ProtocolError,
    /// Text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// Message over MAX_MESSAGE_BYTES (1009).
    TooLarge,
    /// A hello was refused (1008).
    HelloRefused,
    /// The member was revoked while connected (1008).
    Revoked,
    /// The outbound buffer overflowed (1013).
    SlowReader,
    /// No answer to pings for 75 s.
    Timeout,
    /// A socket error.
    IoError,
    /// The broker could not serve the session (1011).
    Internal,
    /// A newer connection took over this one's session (4000, §9).
    Replaced,
    /// An admin kicked the member (4001, §13).
    Kicked,
    /// An admin banned the member (4002, §13).
    Banned,
    /// No hello was accepted within `HELLO_TIMEOUT_SECONDS` of accept (1008).
    HelloTimeout,
    /// Sends kept coming after `RATE_LIMIT_CLOSE_AFTER` refusals in a row
    /// for the member's send rate (1008).
    RateLimited,
}

impl CloseReason {
    /// Every reason, so each label is exported (at 0) before it first bites.
    pub const ALL: [CloseReason; 17] = [
        CloseReason::ClientClosed,
        CloseReason::PeerGone,
        CloseReason::Shutdown,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::TooLarge,
        CloseReason::HelloRefused,
        CloseReason::Revoked,
        CloseReason::SlowReader,
        CloseReason::Timeout,
        CloseReason::IoError,
        CloseReason::Internal,
        CloseReason::Replaced,
        CloseReason::Kicked,
        CloseReason::Banned,
        CloseReason::HelloTimeout,
        CloseReason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::TooLarge => "too_large",
            CloseReason::HelloRefused => "hello_refused",
            CloseReason::Revoked => "revoked",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::Timeout => "timeout",
            CloseReason::IoError => "io_error",
            CloseReason::Internal => "internal",
            CloseReason::Replaced => "session_replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::Banned => "banned",
            CloseReason::HelloTimeout => "hello_timeout",
            CloseReason::RateLimited => "rate_limited",
        }
    }

    /// The close code the broker sends for a close it starts.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ClientClosed | CloseReason::PeerGone | CloseReason::Timeout => 1000,
            CloseReason::Shutdown => 1001,
            CloseReason::ProtocolError | CloseReason::IoError => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::HelloRefused
            | CloseReason::Revoked
            | CloseReason::HelloTimeout
            | CloseReason::RateLimited => 1008,
            CloseReason::TooLarge => 1009,
            CloseReason::Internal => 1011,
            CloseReason::SlowReader => 1013,
            CloseReason::Replaced => 4000,
            CloseReason::Kicked => 4001,
            CloseReason::Banned => 4002,
        }
    }

    /// The socket was lost without a close handshake (reset, EOF, liveness
    /// timeout, slow-reader cut): the session waits out its grace (§9).
    pub fn is_lost(self) -> bool {
        matches!(
            self,
            CloseReason::PeerGone
                | CloseReason::IoError
                | CloseReason::Timeout
                | CloseReason::SlowReader
        )
    }

    /// The reason for a codec error's close code.
    pub fn from_code(code: u16) -> Self {
        match code {
            1007 => CloseReason::InvalidUtf8,
            1009 => CloseReason::TooLarge,
            _ => CloseReason::ProtocolError,
        }
    }
}
