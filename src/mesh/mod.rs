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
pub mod bucket;
pub mod dedupe;
pub mod deliver;
pub mod directory;
pub mod held;
pub mod identity;
pub mod lease;
pub mod peers;
pub mod plan;
pub mod restore;
pub mod stranded;

use crate::protocol::{self, Priority, PushFields};
use crate::ws;
use bytes::Bytes;
use directory::{MemberEntry, MeshEntry};
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

/// Whom a send was addressed to.
pub enum EnvelopeTarget {
    Member(Arc<MemberEntry>),
    /// `*`, `@all`, `@group` or `#group`, as written: several members, each
    /// with its own delivery state when held (`mesh.message_delivery`).
    Many(Box<str>),
}

impl EnvelopeTarget {
    /// `target_spec` as stored and as pushed.
    pub fn spec(&self) -> &str {
        match self {
            EnvelopeTarget::Member(member) => &member.pubkey,
            EnvelopeTarget::Many(spec) => spec,
        }
    }
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
    /// When the send was read: its place in held queues, and the start of
    /// its send→push latency.
    pub sent_at: Instant,
    /// Loaded from Postgres at start (an earlier run's): it goes before
    /// everything sent in this run, and has no send→push latency.
    pub restored: bool,
    /// Holds of it sent to the db writer and not yet committed: its
    /// delivery marks wait for them, so a mark never reaches Postgres
    /// before the row it marks.
    pub holds_in_flight: AtomicU32,
    /// Its push with `"redelivered":true`, made the first time a lapsed
    /// lease pushes it again (PROTOCOL.md §11), then shared like `frame`.
    pub redelivered_frame: OnceLock<Bytes>,
    /// The sender's `client_message_id`, passed through on every push.
    pub client_message_id: Option<Box<str>>,
    /// Sent to this session's key while it was live or away (PROTOCOL.md
    /// §9): for it alone, until it ends. `target` is its member, which
    /// stores the envelope's row and takes it once the session is gone.
    pub session: Option<Arc<peers::SessionEntry>>,
}

/// An envelope queued on a session, or handed back by one that was cut
/// off before writing it: `stored` when it was held for the session's
/// member (a pending `mesh.message_queue` row stands for it, which its
/// writing marks delivered), not when it came live.
pub struct Orphan {
    pub envelope: Arc<Envelope>,
    pub stored: bool,
    /// Queued live on another session of its member too (on this shard or
    /// another its route named): the member has it without this one.
    pub shared: bool,
}

/// An envelope that became held for a member outside its send's plan
/// (after its ack: the member's sessions left, turned busy or were cut off
/// while it crossed shards); it must be written to Postgres too.
pub type HeldLate = (Arc<Envelope>, Arc<MemberEntry>);

/// A push serialized once straight into its WebSocket frame, with where
/// its nonce and ciphertext sit in it.
pub struct PushFrame {
    pub frame: Bytes,
    pub nonce: Range<u32>,
    pub ciphertext: Range<u32>,
}

impl PushFrame {
    pub fn encode(fields: &PushFields<'_>) -> PushFrame {
        let mut frame = Vec::with_capacity(
            ws::SERVER_HEADER_ROOM + 200 + fields.nonce.len() + fields.ciphertext.len(),
        );
        frame.resize(ws::SERVER_HEADER_ROOM, 0);
        let ranges = protocol::write_push(&mut frame, fields);
        let written = frame.len();
        let frame = ws::finish_server_frame(frame, ws::OpCode::Text);
        // The header took the tail of the reserved room: offsets shift.
        let shift = written - frame.len();
        let place = |r: Range<usize>| (r.start - shift) as u32..(r.end - shift) as u32;
        PushFrame {
            frame,
            nonce: place(ranges.nonce),
            ciphertext: place(ranges.ciphertext),
        }
    }
}

impl Envelope {
    /// Counts a hold of it that must be written (before it is placed in a
    /// queue, so no drain can mark it first).
    pub fn hold_in_flight(&self) {
        self.holds_in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A hold was committed (or refused for good).
    pub fn hold_settled(&self) {
        self.holds_in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn has_holds_in_flight(&self) -> bool {
        self.holds_in_flight.load(Ordering::Acquire) != 0
    }

    /// Whether it may no longer be pushed (PROTOCOL.md §4).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at <= now
    }

    /// The push frame, or its redelivered form.
    pub fn push_frame(&self, redelivered: bool) -> &Bytes {
        if !redelivered {
            return &self.frame;
        }
        self.redelivered_frame.get_or_init(|| {
            let json = ws::server_frame_payload(&self.frame);
            ws::encode_server_frame(ws::OpCode::Text, &protocol::mark_redelivered(json))
        })
    }

    /// The nonce as it stands in the push frame (JSON-escaped).
    pub fn nonce_json(&self) -> &[u8] {
        &self.frame[self.nonce.start as usize..self.nonce.end as usize]
    }

    /// The ciphertext as it stands in the push frame (JSON-escaped).
    pub fn ciphertext_json(&self) -> &[u8] {
        &self.frame[self.ciphertext.start as usize..self.ciphertext.end as usize]
    }
}
