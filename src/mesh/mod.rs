//! Routing: who is where, held envelopes and the delivery rules; no sockets.
//!
//! - `directory` — the shared, read-mostly membership of every loaded mesh.
//! - `held`      — per-member queues of envelopes waiting for a session.
//! - `routes`    — one shard's slice of the routing table: its local sessions
//!   by member, and the plan that splits one send into local pushes,
//!   cross-shard routes and held envelopes.
pub mod directory;
pub mod held;
pub mod routes;

use crate::protocol::Priority;
use bytes::Bytes;
use std::time::Instant;

/// One routed message: its push frame is encoded once (WebSocket header and
/// JSON) and shared by every recipient on every shard.
pub struct Envelope {
    pub message_id: Box<str>,
    pub priority: Priority,
    pub frame: Bytes,
    /// When the send was read, for the send→push latency histogram.
    pub sent_at: Instant,
}
