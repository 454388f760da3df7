//! Metrics: per-shard counters and HDR latency histograms, merged at scrape time.
//!
//! # Design
//! - [`Metrics`] (one, `Arc`-shared) holds one [`ShardMetrics`] per shard and a
//!   [`GlobalMetrics`]. Shard `i` writes only `metrics.shard(i)`; the `/metrics`
//!   route (any shard) calls [`Metrics::render`].
//! - Counters are `AtomicU64`s bumped with `Relaxed` by their shard thread only, so
//!   each cache line stays with its writer (`ShardMetrics` is cache-line aligned).
//! - Latencies go into a shard-local [`LocalHistograms`] (plain `hdrhistogram`,
//!   microseconds, 1 µs..60 s, 3 significant figures; not `Sync`, no lock). About
//!   once a second the shard calls [`LocalHistograms::publish`], which adds them into
//!   the shard's `Mutex`-guarded published copy and clears them: the hot path never
//!   locks and a scrape sees data at most ~1 s old. Histograms are allocated on
//!   first use (≈140 KiB each), so unused priorities cost nothing.
//! - Global values (DB health, held-envelope depth, TTL sweeps, audit-batch latency
//!   and audit drops) are written by whichever thread owns them; see
//!   [`GlobalMetrics`].
//! - [`Metrics::render`] sums the shards and encodes OpenMetrics text with
//!   `prometheus-client`. prometheus-client 0.22 cannot encode summaries, so the
//!   p50/p90/p99/p99.9 summaries are written by hand as `<histogram>_quantiles`
//!   families just before `# EOF`.
//!
//! # Label values
//! All bounded: priorities, [`RejectReason`], the error codes in
//! [`MESSAGE_REJECT_REASONS`], shard indexes, and close reasons — `&'static str`s
//! chosen by the caller (at most [`MAX_LABELS`] distinct ones per family; any more
//! are counted as `other`).
//!
//! # Files
//! - `counters`   — per-shard and global counters, labelled ones in fixed tables.
//! - `histograms` — HDR latency histograms: shard-local, published once a second.
//! - `render`     — the scrape: shards summed into a snapshot, encoded as text.
//! - `testing`    — (tests only) a strict parser of the exposition the tests share.
mod counters;
mod histograms;
mod render;
#[cfg(test)]
mod testing;

pub use counters::{GlobalMetrics, ShardMetrics};
pub use histograms::LocalHistograms;

use histograms::ShardLats;
use render::{HistSnapshot, Snapshot};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::registry::Registry;

pub use crate::mesh::held::HeldLimit;
pub use crate::protocol::{CloseReason, Priority};

/// Which deadline closed a connection still in its HTTP phase
/// (`broker_http_timeouts_total{limit}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpTimeout {
    /// `HELLO_TIMEOUT_SECONDS`: the first request never arrived whole.
    Hello,
    /// `HTTP_IDLE_TIMEOUT_SECONDS`: a keep-alive connection sent no next request.
    Idle,
}

impl HttpTimeout {
    pub const ALL: [HttpTimeout; 2] = [HttpTimeout::Hello, HttpTimeout::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpTimeout::Hello => "hello",
            HttpTimeout::Idle => "idle",
        }
    }
}

/// Why a hello was refused (`broker_connections_rejected_total{reason}`).
/// Every authentication failure (bad signature, stale timestamp, not a member) is
/// `Unauthorized`. `MaxConnections` is no hello: a socket accepted over
/// `MAX_CONNECTIONS` and closed unread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    Capacity,
    Unauthorized,
    MaxConnections,
}

impl RejectReason {
    pub const ALL: [RejectReason; 3] = [
        RejectReason::Capacity,
        RejectReason::Unauthorized,
        RejectReason::MaxConnections,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Capacity => "capacity",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::MaxConnections => "max_connections",
        }
    }
}

/// The `reason`s of `broker_messages_rejected_total` that always appear (with 0).
pub const MESSAGE_REJECT_REASONS: [&str; 11] = [
    "bad_json",
    "unknown_type",
    "invalid_field",
    "no_hello",
    "already_hello",
    "too_large",
    "unsupported_target",
    "unknown_target",
    "unavailable",
    "rate_limited",
    "internal",
];

/// Most distinct label values per caller-labelled family; more go to `other`.
pub const MAX_LABELS: usize = 32;
pub(super) const OVERFLOW_LABEL: &str = "other";

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves consistent-enough data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All metrics of the broker: `Arc`-shared by the shards, the DB thread and the
/// scrape handler.
#[derive(Debug)]
pub struct Metrics {
    shards: Vec<Arc<ShardMetrics>>,
    global: GlobalMetrics,
}

impl Metrics {
    pub fn new(shards: usize) -> Arc<Self> {
        Arc::new(Metrics {
            shards: (0..shards)
                .map(|i| Arc::new(ShardMetrics::new(i)))
                .collect(),
            global: GlobalMetrics::new(),
        })
    }

    /// Shard `i`'s metrics (panics when there is no such shard).
    pub fn shard(&self, i: usize) -> &Arc<ShardMetrics> {
        &self.shards[i]
    }

    pub fn global(&self) -> &GlobalMetrics {
        &self.global
    }

    /// Connections open on all shards now.
    pub fn connections_active(&self) -> i64 {
        self.shards.iter().map(|s| s.connections_active()).sum()
    }

    /// The OpenMetrics text exposition (what the `/metrics` route serves).
    pub fn render(&self) -> String {
        let snap = self.snapshot();
        let mut out = String::with_capacity(16 * 1024);
        let summaries = snap.summaries();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snap));
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
        out.push_str(&summaries);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            connections_total: 0,
            rejected_conns: [0; RejectReason::ALL.len()],
            accept_errors: 0,
            closed: [0; CloseReason::ALL.len()],
            http_timeouts: [0; 2],
            held_refused: [0; 2],
            routed: [0; 3],
            rejected_msgs: Vec::new(),
            hook_requests: 0,
            hook_rate_limited: 0,
            sessions_away: 0,
            sessions_resumed: 0,
            sessions_replaced: 0,
            peer_events: 0,
            sends_rate_limited: 0,
            group_sends: 0,
            peers_listed: 0,
            leases_open: 0,
            lease_bytes: 0,
            leases_acked: 0,
            leases_expired: 0,
            redelivered: 0,
            duplicate_sends: 0,
            shard_active: Vec::with_capacity(self.shards.len()),
            shard_messages: Vec::with_capacity(self.shards.len()),
            shard_socket_writes: Vec::with_capacity(self.shards.len()),
            shard_frames_written: Vec::with_capacity(self.shards.len()),
            queue_depth: self.global.queue_depth.load(Relaxed),
            ttl_sweeps: self.global.ttl_sweeps.load(Relaxed),
            ttl_flipped: self.global.ttl_flipped.load(Relaxed),
            held_expired: self.global.held_expired.load(Relaxed),
            audit_dropped: self.global.audit_dropped.load(Relaxed),
            db_healthy: self.global.db_healthy(),
            http: HistSnapshot::default(),
            send_ack: Default::default(),
            send_push: Default::default(),
            audit_batch: lock(&self.global.audit_batch).snapshot(),
            held_batch: lock(&self.global.held_batch).snapshot(),
        };
        let mut lats = ShardLats::default();
        for shard in &self.shards {
            s.shard_active.push(shard.connections_active());
            s.connections_total += shard.conns_opened.load(Relaxed);
            for (dst, src) in s.rejected_conns.iter_mut().zip(&shard.conns_rejected) {
                *dst += src.load(Relaxed);
            }
            s.accept_errors += shard.accept_errors.load(Relaxed);
            for (dst, src) in s.closed.iter_mut().zip(&shard.conns_closed) {
                *dst += src.load(Relaxed);
            }
            let limits = &shard.limits;
            for (dst, src) in s.http_timeouts.iter_mut().zip(&limits.http_timeouts) {
                *dst += src.load(Relaxed);
            }
            for (dst, src) in s.held_refused.iter_mut().zip(&limits.held_refused) {
                *dst += src.load(Relaxed);
            }
            for (dst, src) in s.routed.iter_mut().zip(&shard.routed) {
                *dst += src.load(Relaxed);
            }
            shard.rejected.collect_into(&mut s.rejected_msgs);
            s.shard_messages.push(shard.messages_in.load(Relaxed));
            s.shard_socket_writes
                .push(shard.socket_writes.load(Relaxed));
            s.shard_frames_written
                .push(shard.frames_written.load(Relaxed));
            s.hook_requests += shard.hook_requests.load(Relaxed);
            s.hook_rate_limited += shard.hook_rate_limited.load(Relaxed);
            let sessions = &shard.sessions;
            s.sessions_away += sessions.away.load(Relaxed);
            s.sessions_resumed += sessions.resumed.load(Relaxed);
            s.sessions_replaced += sessions.replaced.load(Relaxed);
            s.peer_events += sessions.peer_events.load(Relaxed);
            s.sends_rate_limited += sessions.rate_limited.load(Relaxed);
            s.group_sends += sessions.group_sends.load(Relaxed);
            s.peers_listed += sessions.peers_listed.load(Relaxed);
            let leases = &shard.leases;
            s.leases_open += leases.open.load(Relaxed);
            s.lease_bytes += leases.bytes.load(Relaxed);
            s.leases_acked += leases.acked.load(Relaxed);
            s.leases_expired += leases.expired.load(Relaxed);
            s.redelivered += leases.redelivered.load(Relaxed);
            s.duplicate_sends += leases.duplicate_sends.load(Relaxed);
            lats.add(&lock(&shard.published));
        }
        // A session may go away on one shard and leave grace on another,
        // and the shards are read one after the other: never show less than 0.
        s.sessions_away = s.sessions_away.max(0);
        // The same for a lease closed on another shard than its own.
        s.leases_open = s.leases_open.max(0);
        s.lease_bytes = s.lease_bytes.max(0);
        s.http = lats.http.snapshot();
        for i in 0..3 {
            s.send_ack[i] = lats.send_ack[i].snapshot();
            s.send_push[i] = lats.send_push[i].snapshot();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_names() {
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse("NOW"), None);
    }
}
