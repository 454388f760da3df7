//! Several broker nodes as one (README "Several nodes"), over NATS core.
//! Unused (no thread, no handle) when `NATS_URL` is unset.
//!
//! - `wire` — subjects and the bus messages' encoding.
//! - `view` — what this node knows of the others: their slots, and their
//!   sessions of each mesh this node follows.
//! - `bus`  — the bus thread (a tokio runtime of its own with async-nats):
//!   subscriptions, heartbeats, crossing sends and their confirms, held
//!   envelopes handed to the node that has their member, dead nodes.
//!
//! Other nodes are routed to like shards: a node's slot is a bit above
//! the local shards' in each member's live and open masks, set from what
//! that node publishes. `mesh::plan` is unchanged: a route naming a remote
//! bit goes to the bus, which publishes it once to the mesh's subject.
pub(crate) mod bus;
pub(crate) mod view;
pub(crate) mod wire;

use crate::inbox::PendingAck;
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::plan::Route;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Bit of the first remote node in a shard mask; local shards sit below.
pub const REMOTE_BASE: usize = 32;
/// Other nodes one node can route to.
pub const MAX_NODES: usize = 64 - REMOTE_BASE;
/// The local shards' bits of a mask.
pub const LOCAL: u64 = (1 << REMOTE_BASE) - 1;
/// What the shards may have waiting for the bus thread.
const QUEUE: usize = 65_536;

pub fn slot_bit(slot: u8) -> u64 {
    1 << (REMOTE_BASE + slot as usize)
}

pub enum BusCommand {
    /// Publish a route for the nodes in `nodes` (remote bits); with an ack,
    /// confirm it back to its shard.
    Route {
        route: Arc<Route>,
        nodes: u64,
        ack: Option<PendingAck>,
    },
    /// This node's sessions of a mesh changed (or it has some now).
    MeshChanged(Arc<MeshEntry>),
    /// A hello of a mesh this node does not follow yet: follow it, and
    /// answer once the other nodes' parts had time to arrive.
    Follow {
        mesh: Arc<MeshEntry>,
        reply: tokio::sync::oneshot::Sender<()>,
    },
    /// Which session of the other nodes a hook signal would go to: every
    /// node answers with its best match, applying nothing; the best of
    /// them (`None`: no node has one).
    Hook {
        signal: crate::hook::HookSignal,
        reply: tokio::sync::oneshot::Sender<Option<HookCandidate>>,
    },
    /// A hook signal for the session another node found: it applies it and
    /// answers with the presence id (`None`: closed meanwhile).
    HookApply {
        signal: crate::hook::HookSignal,
        candidate: HookCandidate,
        reply: tokio::sync::oneshot::Sender<Option<Box<str>>>,
    },
    /// A hook signal no node had a session for, stashed here: every other
    /// node stashes it too, so a session that connects anywhere soon
    /// starts with it.
    Stash(crate::hook::HookSignal),
    /// A peer event about a session of `about` (its frame, encoded once),
    /// for the sessions of other nodes that asked for events.
    PeerEvent {
        mesh: Arc<MeshEntry>,
        about: Arc<MemberEntry>,
        frame: bytes::Bytes,
    },
    /// A member joined (or changed its role in) or left a group here: the
    /// other nodes change their copy of its groups too.
    Group {
        mesh: Arc<MeshEntry>,
        member: Arc<MemberEntry>,
        change: wire::GroupChange,
    },
    /// A hello here takes over `member`'s session `presence` of the node
    /// in `slot`: that node gives it up and answers with what it brings
    /// (`None`: ended there meanwhile, or no answer in time).
    Take {
        mesh: Arc<MeshEntry>,
        member: Arc<MemberEntry>,
        slot: u8,
        presence: Box<str>,
        session_id: String,
        session_key: Option<String>,
        reply: tokio::sync::oneshot::Sender<Option<crate::mesh::peers::MovedSession>>,
    },
    /// An admin kicked, banned or unbanned a member here: every other
    /// node closes its sessions (and revokes it), or reinstates it.
    Admin {
        mesh: Arc<MeshEntry>,
        change: wire::AdminChange,
    },
    /// A member live on other nodes too took a token of its send rate
    /// here: they take it too.
    Spent {
        mesh: Arc<MeshEntry>,
        member: Arc<MemberEntry>,
    },
    /// A member's held envelopes may go to another node (remote bits).
    Drain {
        mesh: Arc<MeshEntry>,
        member: Arc<MemberEntry>,
    },
}

/// A session of another node a hook signal matches.
#[derive(Clone, Debug)]
pub struct HookCandidate {
    pub node: Box<str>,
    pub presence_id: Box<str>,
    pub rank: crate::status::hook_index::HookRank,
}

/// The shards' handle on the bus thread.
pub struct Cluster {
    pub node_id: Arc<str>,
    tx: mpsc::Sender<BusCommand>,
}

impl Cluster {
    pub fn new(node_id: &str) -> (Cluster, mpsc::Receiver<BusCommand>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Cluster {
                node_id: node_id.into(),
                tx,
            },
            rx,
        )
    }

    /// Never blocks; a full queue gives the command back.
    pub fn send(&self, command: BusCommand) -> Result<(), BusCommand> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
        })
    }

    /// Once per burst of changes of a mesh (until the bus republishes it).
    pub fn mesh_changed(&self, mesh: &Arc<MeshEntry>) {
        if !mesh.changed.swap(true, Ordering::AcqRel)
            && self.send(BusCommand::MeshChanged(mesh.clone())).is_err()
        {
            // The bus republishes every followed mesh each heartbeat.
            mesh.changed.store(false, Ordering::Release);
        }
    }
}
