//! Counters: one cache-line-aligned set per shard, written by that shard only,
//! and the global values each owned by one component.
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::histograms::{Lat, ShardLats};
use super::*;

// ---------------------------------------------------------------------------
// Counters labelled by caller-supplied &'static str.

/// Lock-free counters keyed by a `&'static str` label: a fixed table of slots, each
/// claimed once. Lookup is a short linear scan (a handful of labels in practice).
#[derive(Debug)]
pub(super) struct LabeledCounters {
    pub(super) slots: Box<[Slot]>,
    pub(super) overflow: AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) name: OnceLock<&'static str>,
    pub(super) count: AtomicU64,
}

impl LabeledCounters {
    pub(super) fn new(seed: &[&'static str]) -> Self {
        let slots: Box<[Slot]> = (0..MAX_LABELS.max(seed.len()))
            .map(|_| Slot::default())
            .collect();
        for (slot, name) in slots.iter().zip(seed) {
            let _ = slot.name.set(name);
        }
        LabeledCounters {
            slots,
            overflow: AtomicU64::new(0),
        }
    }

    pub(super) fn inc(&self, label: &'static str) {
        for slot in self.slots.iter() {
            // Claims the first free slot; a racing writer with another label makes
            // us move on to the next one.
            let name = *slot.name.get_or_init(|| label);
            if std::ptr::eq(name, label) || name == label {
                slot.count.fetch_add(1, Relaxed);
                return;
            }
        }
        self.overflow.fetch_add(1, Relaxed);
    }

    /// Adds this table's counts into `into` (merged by label, first-seen order).
    pub(super) fn collect_into(&self, into: &mut Vec<(&'static str, u64)>) {
        let overflow = self.overflow.load(Relaxed);
        let named = self
            .slots
            .iter()
            .map_while(|s| s.name.get().map(|n| (*n, s.count.load(Relaxed))));
        for (name, n) in named.chain((overflow > 0).then_some((OVERFLOW_LABEL, overflow))) {
            match into.iter_mut().find(|(k, _)| *k == name) {
                Some((_, v)) => *v += n,
                None => into.push((name, n)),
            }
        }
    }

    pub(super) fn total(&self) -> u64 {
        let named: u64 = self.slots.iter().map(|s| s.count.load(Relaxed)).sum();
        named + self.overflow.load(Relaxed)
    }
}

// ---------------------------------------------------------------------------
// Latency histograms.

// ---------------------------------------------------------------------------
// Shard and global metrics.

/// One shard's counters (written by that shard only) and published histograms.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    pub(super) index: usize,
    pub(super) conns_opened: AtomicU64,
    pub(super) conns_closed: LabeledCounters,
    pub(super) conns_rejected: [AtomicU64; 2],
    pub(super) routed: [AtomicU64; 3],
    pub(super) rejected: LabeledCounters,
    pub(super) messages_in: AtomicU64,
    pub(super) socket_writes: AtomicU64,
    pub(super) frames_written: AtomicU64,
    pub(super) hook_requests: AtomicU64,
    pub(super) hook_rate_limited: AtomicU64,
    pub(super) published: Mutex<ShardLats>,
}

impl ShardMetrics {
    pub(super) fn new(index: usize) -> Self {
        ShardMetrics {
            index,
            conns_opened: AtomicU64::new(0),
            conns_closed: LabeledCounters::new(&[]),
            conns_rejected: Default::default(),
            routed: Default::default(),
            rejected: LabeledCounters::new(&MESSAGE_REJECT_REASONS),
            messages_in: AtomicU64::new(0),
            socket_writes: AtomicU64::new(0),
            frames_written: AtomicU64::new(0),
            hook_requests: AtomicU64::new(0),
            hook_rate_limited: AtomicU64::new(0),
            published: Mutex::new(ShardLats::default()),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// A WebSocket connection was upgraded on this shard (`_total` and active +1).
    pub fn conn_opened(&self) {
        self.conns_opened.fetch_add(1, Relaxed);
    }

    /// A connection counted by [`conn_opened`](Self::conn_opened) closed (active −1),
    /// with its close reason as the label. Call exactly once per opened connection.
    pub fn conn_closed(&self, reason: &'static str) {
        self.conns_closed.inc(reason);
    }

    /// A hello was refused (the connection still closes: call `conn_closed` too).
    pub fn conn_rejected(&self, reason: RejectReason) {
        self.conns_rejected[reason as usize].fetch_add(1, Relaxed);
    }

    /// A client message was parsed on this shard (any type, valid or not):
    /// `broker_shard_messages_total{shard}`.
    pub fn message_received(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }

    /// One WebSocket socket write carried `frames` frames: frames per write
    /// is the batching that decides fan-out throughput.
    pub fn socket_write(&self, frames: usize) {
        self.socket_writes.fetch_add(1, Relaxed);
        self.frames_written.fetch_add(frames as u64, Relaxed);
    }

    /// A `send` was routed (acked).
    pub fn message_routed(&self, p: Priority) {
        self.routed[p.index()].fetch_add(1, Relaxed);
    }

    /// A client message was answered with `error <code>`; `code` is the wire code
    /// (see [`MESSAGE_REJECT_REASONS`]).
    pub fn message_rejected(&self, code: &'static str) {
        self.rejected.inc(code);
    }

    /// A `POST /hook/set-status` was handled (every one, 429s included).
    pub fn hook_request(&self, rate_limited: bool) {
        self.hook_requests.fetch_add(1, Relaxed);
        if rate_limited {
            self.hook_rate_limited.fetch_add(1, Relaxed);
        }
    }

    /// Connections open on this shard now.
    pub fn connections_active(&self) -> i64 {
        // Closed first: a close is always counted after its open.
        let closed = self.conns_closed.total();
        let opened = self.conns_opened.load(Relaxed);
        opened.saturating_sub(closed) as i64
    }
}

/// Values owned by one component rather than by a shard. Atomics may be written
/// from any thread; `record_audit_batch` takes a lock (the DB thread's batch rate
/// is low and only scrapes contend).
#[derive(Debug)]
pub struct GlobalMetrics {
    pub(super) db_healthy: AtomicBool,
    pub(super) queue_depth: Arc<AtomicI64>,
    pub(super) ttl_sweeps: AtomicU64,
    pub(super) ttl_flipped: AtomicU64,
    pub(super) audit_batch: Mutex<Lat>,
}

impl GlobalMetrics {
    pub(super) fn new() -> Self {
        GlobalMetrics {
            db_healthy: AtomicBool::new(false),
            queue_depth: Arc::new(AtomicI64::new(0)),
            ttl_sweeps: AtomicU64::new(0),
            ttl_flipped: AtomicU64::new(0),
            audit_batch: Mutex::new(Lat::default()),
        }
    }

    pub fn set_db_healthy(&self, up: bool) {
        self.db_healthy.store(up, Relaxed);
    }

    pub fn db_healthy(&self) -> bool {
        self.db_healthy.load(Relaxed)
    }

    /// The held-envelope count, kept by the held queues themselves.
    pub fn queue_depth_counter(&self) -> Arc<AtomicI64> {
        self.queue_depth.clone()
    }

    /// A shard's part of a TTL sweep flipped `flipped` sessions from
    /// working to idle; one shard (`counted`) counts the sweep itself.
    pub fn ttl_sweep(&self, counted: bool, flipped: u64) {
        if counted {
            self.ttl_sweeps.fetch_add(1, Relaxed);
        }
        self.ttl_flipped.fetch_add(flipped, Relaxed);
    }

    /// One audit batch was written to Postgres in `d`.
    pub fn record_audit_batch(&self, d: Duration) {
        lock(&self.audit_batch).record(d);
    }
}
