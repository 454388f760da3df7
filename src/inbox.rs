//! What crosses into a shard from other threads (`ShardEvent`) and the
//! channel it crosses on. A shard's inbox: a bounded crossbeam channel plus a waker the shard's
//! monoio event loop awaits. Senders on other threads wake the shard only when
//! it is parked on an empty inbox (`AtomicWaker::wake` is a no-op otherwise),
//! and the shard drains a bounded batch per wakeup before yielding to its
//! sockets, so a busy inbox cannot starve connections.
use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use crate::hook::Status;
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::peers::SessionEntry;
use crate::mesh::plan::Route;

struct Shared {
    waker: AtomicWaker,
    shutdown: AtomicBool,
}

/// The sending side, one per shard, held by every thread that talks to it.
pub struct InboxSender<T> {
    tx: Sender<T>,
    shared: Arc<Shared>,
}

impl<T> Clone for InboxSender<T> {
    fn clone(&self) -> Self {
        InboxSender {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

pub struct Inbox<T> {
    rx: Receiver<T>,
    shared: Arc<Shared>,
}

pub fn inbox<T>(capacity: usize) -> (InboxSender<T>, Inbox<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let shared = Arc::new(Shared {
        waker: AtomicWaker::new(),
        shutdown: AtomicBool::new(false),
    });
    (
        InboxSender {
            tx,
            shared: shared.clone(),
        },
        Inbox { rx, shared },
    )
}

impl<T> InboxSender<T> {
    /// Never blocks: a full inbox hands the item back so the caller can keep
    /// it and retry on its next tick.
    pub fn try_send(&self, item: T) -> Result<(), T> {
        let result = match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) => Err(item),
        };
        self.shared.waker.wake();
        result
    }

    /// Out of band of the bounded queue, so shutdown gets through a full inbox.
    pub fn request_shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.waker.wake();
    }
}

/// What one wakeup of the inbox yields.
pub enum Wakeup {
    /// Up to `max` items were moved into the caller's vector.
    Items,
    Shutdown,
}

impl<T> Inbox<T> {
    /// Waits until the inbox has items or shutdown was requested, then moves
    /// at most `max` items into `out`.
    pub async fn next_batch(&self, out: &mut Vec<T>, max: usize) -> Wakeup {
        poll_fn(|cx| {
            if self.shared.shutdown.load(Ordering::Acquire) {
                return Poll::Ready(Wakeup::Shutdown);
            }
            if self.drain(out, max) {
                return Poll::Ready(Wakeup::Items);
            }
            // Register, then look again: an item sent between the first look
            // and the registration would otherwise sleep until the next one.
            self.shared.waker.register(cx.waker());
            if self.shared.shutdown.load(Ordering::Acquire) {
                return Poll::Ready(Wakeup::Shutdown);
            }
            if self.drain(out, max) {
                return Poll::Ready(Wakeup::Items);
            }
            Poll::Pending
        })
        .await
    }

    fn drain(&self, out: &mut Vec<T>, max: usize) -> bool {
        let before = out.len();
        while out.len() - before < max {
            match self.rx.try_recv() {
                Ok(item) => out.push(item),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        out.len() > before
    }
}

/// An ack that waits for other nodes to confirm a send (README "Several
/// nodes"): the bus hands it back to its shard in `Confirmed`.
pub struct PendingAck {
    pub shard: usize,
    pub conn: u64,
    pub id: Box<str>,
    pub req_id: Option<Box<str>>,
    pub read_at: Instant,
    /// Members the send was held for (their row is written once confirmed).
    pub held: Vec<Arc<MemberEntry>>,
}

/// What crosses from one shard to another.
pub enum ShardEvent {
    /// Deliver a routed envelope to this shard's sessions of its targets.
    Route(Arc<Route>),
    /// The nodes a send was routed to confirmed it (or the deadline passed:
    /// `missing` names those that did not take it): ack it, holding it
    /// first for whom it may now reach nowhere.
    Confirmed {
        route: Arc<Route>,
        ack: PendingAck,
        missing: u64,
    },
    /// A member's held queue has envelopes and this shard has a session of it.
    DrainHeld(Arc<MeshEntry>, Arc<MemberEntry>),
    /// A hook signal for a session of this shard; answered with its
    /// presence id, or `None` when the session is gone.
    HookStatus {
        conn: u64,
        status: Status,
        reply: tokio::sync::oneshot::Sender<Option<Box<str>>>,
    },
    /// A dead node's sessions whose grace ran out untaken: this node's
    /// sessions that asked for peer events hear they left.
    StrandedLeft {
        mesh: Arc<MeshEntry>,
        gone: Vec<crate::mesh::stranded::Stranded>,
    },
    /// A held envelope another node handed over is held here now: its row
    /// becomes this node's (`HeldCommand::Adopt`).
    Adopted(Arc<crate::mesh::Envelope>),
    /// A hello on another node takes over this session of this shard: it
    /// leaves here without ending, and the answer is what it brings there
    /// (`None`: it ended meanwhile).
    GiveUp {
        mesh: Arc<MeshEntry>,
        entry: Arc<SessionEntry>,
        reply: tokio::sync::oneshot::Sender<Option<crate::mesh::peers::MovedSession>>,
    },
    /// What a session's transcript says (from the transcript reader).
    Inferred { conn: u64, status: Status },
    /// A peer event about a session of `about`, for this shard's sessions
    /// of the mesh that asked for events (PROTOCOL.md §9).
    PeerEvent {
        mesh: Arc<MeshEntry>,
        about: Arc<MemberEntry>,
        frame: bytes::Bytes,
    },
    /// A hello on another shard took over the session of this shard's
    /// connection `conn`: close it (4000).
    Replaced { conn: u64 },
    /// An admin kicked or banned `member`: close its sessions here (4001 or
    /// 4002) and end those away here.
    Kick {
        mesh: Arc<MeshEntry>,
        member: Arc<MemberEntry>,
        banned: bool,
    },
    /// A hello on another shard resumed a session this shard kept away:
    /// stop listing it.
    Resumed {
        mesh: Arc<MeshEntry>,
        entry: Arc<SessionEntry>,
    },
}

/// Items are batches: one per sending shard per wakeup.
pub type ShardSender = InboxSender<Vec<ShardEvent>>;
pub type ShardInbox = Inbox<Vec<ShardEvent>>;

/// Inbox capacity in batches; a full inbox keeps the batch on the sending
/// shard and retries, it never drops.
pub const INBOX_BATCHES: usize = 4096;
