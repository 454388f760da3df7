//! An envelope's life, with no sockets: plan → hold → deliver → written.
//! Every delivery rule of PROTOCOL.md §5 lives here and is unit-tested
//! without I/O; the shard only moves envelopes between threads and sockets.
//!
//! - `directory` — the shared, read-mostly membership of every loaded mesh;
//!   each member's live and open (idle) shard masks and its held queue.
//! - `held`      — per-member queues of envelopes waiting for a session that
//!   may take them, served in creation order across priorities.
//! - `plan`      — on the sender's shard: which shards get a send live and
//!   whom it is held for.
//! - `deliver`   — on each shard the plan names: its local sessions by member,
//!   status gating, hand-back of what a cut-off session had queued, drains
//!   of held envelopes, and a session's arrival, status change and leaving.
//!
//! One send: `shard::session` parses it and calls `plan`; the route crosses
//! to other shards through `shard::inbox`; `deliver` queues the shared frame
//! on each session's `shard::outbound`, whose writer puts it on the socket.
pub mod deliver;
pub mod directory;
pub mod held;
pub mod plan;

use crate::protocol::Priority;
use bytes::Bytes;
use directory::{MemberEntry, MeshEntry};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Whom a send was addressed to, as written.
pub enum EnvelopeTarget {
    Member(Arc<MemberEntry>),
    All,
}

/// One routed message. Its push frame is encoded once (WebSocket header and
/// JSON) and shared by every recipient on every shard; the nonce and
/// ciphertext are reached inside it (as JSON string contents), never copied.
pub struct Envelope {
    pub message_id: Box<str>,
    pub mesh: Arc<MeshEntry>,
    pub sender: Arc<MemberEntry>,
    pub target: EnvelopeTarget,
    pub priority: Priority,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub frame: Bytes,
    /// Where the nonce and ciphertext (JSON-escaped) sit in `frame`.
    pub nonce: Range<u32>,
    pub ciphertext: Range<u32>,
    /// When the send was read, for the send→push latency histogram.
    pub sent_at: Instant,
}

impl Envelope {
    /// The nonce as it stands in the push frame (JSON-escaped).
    pub fn nonce_json(&self) -> &[u8] {
        &self.frame[self.nonce.start as usize..self.nonce.end as usize]
    }

    /// The ciphertext as it stands in the push frame (JSON-escaped).
    pub fn ciphertext_json(&self) -> &[u8] {
        &self.frame[self.ciphertext.start as usize..self.ciphertext.end as usize]
    }
}
