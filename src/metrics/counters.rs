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
    slots: Box<[Slot]>,
    overflow: AtomicU64,
}

#[derive(Debug, Default)]
struct Slot {
    name: OnceLock<&'static str>,
    count: AtomicU64,
}

impl LabeledCounters {
    fn new(seed: &[&'static str]) -> Self {
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

    fn inc(&self, label: &'static str) {
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
}

// ---------------------------------------------------------------------------
// Shard and global metrics.

/// One shard's counters (written by that shard only) and published histograms.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    index: usize,
    pub(super) conns_opened: AtomicU64,
    /// By `CloseReason` (its declaration order, as in `CloseReason::ALL`).
    pub(super) conns_closed: [AtomicU64; CloseReason::ALL.len()],
    pub(super) conns_rejected: [AtomicU64; RejectReason::ALL.len()],
    pub(super) accept_errors: AtomicU64,
    pub(super) routed: [AtomicU64; 3],
    pub(super) rejected: LabeledCounters,
    pub(super) messages_in: AtomicU64,
    pub(super) socket_writes: AtomicU64,
    pub(super) frames_written: AtomicU64,
    pub(super) hook_requests: AtomicU64,
    pub(super) hook_rate_limited: AtomicU64,
    pub(super) sessions: SessionCounters,
    pub(super) leases: LeaseCounters,
    pub(super) limits: LimitCounters,
    pub(super) published: Mutex<ShardLats>,
}

/// The sessions and peer directory counters (PROTOCOL.md §9–§10).
#[derive(Debug, Default)]
pub(super) struct SessionCounters {
    /// Signed: a session may go away on one shard and leave grace on
    /// another; only the sum over shards is shown.
    pub(super) away: AtomicI64,
    pub(super) resumed: AtomicU64,
    pub(super) replaced: AtomicU64,
    pub(super) peer_events: AtomicU64,
    pub(super) rate_limited: AtomicU64,
    pub(super) group_sends: AtomicU64,
    pub(super) peers_listed: AtomicU64,
}

/// The operator's limits biting (issue 13): each counter says which one.
#[derive(Debug, Default)]
pub(super) struct LimitCounters {
    /// By `HttpTimeout`.
    pub(super) http_timeouts: [AtomicU64; 2],
    /// By `HeldLimit`.
    pub(super) held_refused: [AtomicU64; 2],
}

/// The acknowledged delivery counters (PROTOCOL.md §11).
#[derive(Debug, Default)]
pub(super) struct LeaseCounters {
    /// Signed, like `SessionCounters::away`: a lease may be opened on one
    /// shard and closed on another; only the sum over shards is shown.
    pub(super) open: AtomicI64,
    pub(super) bytes: AtomicI64,
    pub(super) acked: AtomicU64,
    pub(super) expired: AtomicU64,
    pub(super) redelivered: AtomicU64,
    pub(super) duplicate_sends: AtomicU64,
}

impl ShardMetrics {
    pub(super) fn new(index: usize) -> Self {
        ShardMetrics {
            index,
            conns_opened: AtomicU64::new(0),
            conns_closed: Default::default(),
            conns_rejected: Default::default(),
            accept_errors: AtomicU64::new(0),
            routed: Default::default(),
            rejected: LabeledCounters::new(&MESSAGE_REJECT_REASONS),
            messages_in: AtomicU64::new(0),
            socket_writes: AtomicU64::new(0),
            frames_written: AtomicU64::new(0),
            hook_requests: AtomicU64::new(0),
            hook_rate_limited: AtomicU64::new(0),
            sessions: SessionCounters::default(),
            leases: LeaseCounters::default(),
            limits: LimitCounters::default(),
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
    pub fn conn_closed(&self, reason: CloseReason) {
        self.conns_closed[reason as usize].fetch_add(1, Relaxed);
    }

    /// A connection in its HTTP phase was closed by one of its deadlines.
    pub fn http_timed_out(&self, limit: HttpTimeout) {
        self.limits.http_timeouts[limit as usize].fetch_add(1, Relaxed);
    }

    /// A send was refused `unavailable` because a target member's held
    /// queue is at one of its bounds.
    pub fn held_refused(&self, limit: HeldLimit) {
        self.limits.held_refused[limit as usize].fetch_add(1, Relaxed);
    }

    /// A hello was refused (the connection still closes: call `conn_closed` too).
    pub fn conn_rejected(&self, reason: RejectReason) {
        self.conns_rejected[reason as usize].fetch_add(1, Relaxed);
    }

    /// An `accept` on this shard's listener failed (`broker_accept_errors_total`).
    pub fn accept_failed(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
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
        let closed: u64 = self.conns_closed.iter().map(|c| c.load(Relaxed)).sum();
        let opened = self.conns_opened.load(Relaxed);
        opened.saturating_sub(closed) as i64
    }
}

impl ShardMetrics {
    /// A session lost its socket without a close frame and is now `away`
    /// in its grace (`broker_sessions_away` +1).
    pub fn session_went_away(&self) {
        self.sessions.away.fetch_add(1, Relaxed);
    }

    /// A session counted by [`session_went_away`](Self::session_went_away)
    /// left its grace: resumed, or its grace ran out, or the broker stopped
    /// (`broker_sessions_away` −1). Call exactly once per away session.
    pub fn session_away_ended(&self) {
        self.sessions.away.fetch_sub(1, Relaxed);
    }

    /// A hello took over an existing presence: a session in grace, or a
    /// live one it replaced (`hello_ack.resumed` true).
    pub fn session_resumed(&self) {
        self.sessions.resumed.fetch_add(1, Relaxed);
    }

    /// A live session was closed with 4000 (`session_replaced`) by a newer
    /// hello of its member with the same session id or session key.
    pub fn session_replaced(&self) {
        self.sessions.replaced.fetch_add(1, Relaxed);
    }

    /// `n` peer events (`peer_joined`, `peer_left`, …) were pushed, one per
    /// receiving session.
    pub fn peer_events_sent(&self, n: u64) {
        self.sessions.peer_events.fetch_add(n, Relaxed);
    }

    /// A send was refused with `rate_limited` by its member's send bucket.
    pub fn send_rate_limited(&self) {
        self.sessions.rate_limited.fetch_add(1, Relaxed);
    }

    /// A send to a group (`@<group>`, `#<name>`) was routed.
    pub fn group_send(&self) {
        self.sessions.group_sends.fetch_add(1, Relaxed);
    }

    /// A `list_peers` was answered.
    pub fn peers_listed(&self) {
        self.sessions.peers_listed.fetch_add(1, Relaxed);
    }
}

impl ShardMetrics {
    /// A push of `bytes` to a `client_ack` session was written and is now
    /// leased (`broker_leases_open` +1, `broker_lease_bytes` +`bytes`).
    pub fn lease_opened(&self, bytes: usize) {
        self.leases.open.fetch_add(1, Relaxed);
        self.leases.bytes.fetch_add(bytes as i64, Relaxed);
    }

    /// A lease counted by [`lease_opened`](Self::lease_opened) ended,
    /// acked or lapsed (both gauges back down). Call exactly once per
    /// opened lease, with the bytes it was opened with.
    pub fn lease_closed(&self, bytes: usize) {
        self.leases.open.fetch_sub(1, Relaxed);
        self.leases.bytes.fetch_sub(bytes as i64, Relaxed);
    }

    /// A `client_ack` named a lease of its member: the envelope is done.
    pub fn lease_acked(&self) {
        self.leases.acked.fetch_add(1, Relaxed);
    }

    /// A lease lapsed unacked (`CLIENT_ACK_TIMEOUT_SECONDS` passed, or its
    /// session closed or lost its socket): the envelope goes back to its
    /// member's held queue.
    pub fn lease_expired(&self) {
        self.leases.expired.fetch_add(1, Relaxed);
    }

    /// An envelope whose lease lapsed was pushed again (`redelivered:true`).
    pub fn redelivered(&self) {
        self.leases.redelivered.fetch_add(1, Relaxed);
    }

    /// A send repeated a `client_message_id` of its member accepted within
    /// `DEDUPE_WINDOW_SECONDS`: not routed, acked with `duplicate:true`.
    pub fn duplicate_send(&self) {
        self.leases.duplicate_sends.fetch_add(1, Relaxed);
    }
}

/// Values owned by one component rather than by a shard. Atomics may be written
/// from any thread; `record_audit_batch` takes a lock (the DB thread's batch rate
/// is low and only scrapes contend).
#[derive(Debug)]
pub struct GlobalMetrics {
    db_healthy: AtomicBool,
    pub(super) queue_depth: Arc<AtomicI64>,
    pub(super) ttl_sweeps: AtomicU64,
    pub(super) ttl_flipped: AtomicU64,
    pub(super) held_expired: AtomicU64,
    pub(super) audit_batch: Mutex<Lat>,
    pub(super) held_batch: Mutex<Lat>,
    pub(super) audit_dropped: Arc<AtomicU64>,
}

impl GlobalMetrics {
    pub(super) fn new() -> Self {
        GlobalMetrics {
            db_healthy: AtomicBool::new(false),
            queue_depth: Arc::new(AtomicI64::new(0)),
            ttl_sweeps: AtomicU64::new(0),
            ttl_flipped: AtomicU64::new(0),
            held_expired: AtomicU64::new(0),
            audit_batch: Mutex::new(Lat::default()),
            held_batch: Mutex::new(Lat::default()),
            audit_dropped: Arc::new(AtomicU64::new(0)),
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

    /// Held envelopes dropped unpushed past their expiry.
    pub fn held_expired(&self, n: u64) {
        self.held_expired.fetch_add(n, Relaxed);
    }

    /// One durable-lane batch (held envelopes, marks) committed in `d`.
    pub fn record_held_batch(&self, d: Duration) {
        lock(&self.held_batch).record(d);
    }

    /// Audit events accepted and never written, counted by the audit lane
    /// itself (`broker_audit_dropped_total`).
    pub fn audit_dropped_counter(&self) -> Arc<AtomicU64> {
        self.audit_dropped.clone()
    }

    /// One audit batch was written to Postgres in `d`.
    pub fn record_audit_batch(&self, d: Duration) {
        lock(&self.audit_batch).record(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::{parse_exposition, value};

    #[test]
    fn counters_sum_over_shards() {
        let m = Metrics::new(2);
        let (a, b) = (m.shard(0), m.shard(1));
        for _ in 0..3 {
            a.conn_opened();
        }
        b.conn_opened();
        a.conn_closed(CloseReason::ClientClosed);
        b.conn_closed(CloseReason::ClientClosed);
        a.conn_closed(CloseReason::Timeout);
        a.conn_rejected(RejectReason::Capacity);
        b.conn_rejected(RejectReason::Unauthorized);
        b.conn_rejected(RejectReason::Unauthorized);
        a.message_routed(Priority::Now);
        b.message_routed(Priority::Now);
        b.message_routed(Priority::Low);
        a.message_rejected("bad_json");
        b.message_rejected("bad_json");
        b.message_rejected("rate_limited");
        for _ in 0..5 {
            a.message_received();
        }
        b.message_received();
        a.hook_request(false);
        b.hook_request(true);
        let g = m.global();
        g.set_db_healthy(true);
        let depth = g.queue_depth_counter();
        depth.fetch_add(5, Relaxed);
        depth.fetch_sub(2, Relaxed);
        g.ttl_sweep(true, 0);
        g.ttl_sweep(false, 1);
        g.ttl_sweep(true, 3);
        g.audit_dropped_counter().fetch_add(6, Relaxed);

        assert_eq!(a.connections_active(), 1);
        assert_eq!(b.connections_active(), 0);
        assert_eq!(m.connections_active(), 1);
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, "broker_connections_active", &[]), 1.0);
        assert_eq!(value(&s, "broker_connections_total", &[]), 4.0);
        let closed = "broker_connections_closed_total";
        assert_eq!(value(&s, closed, &[("reason", "client_closed")]), 2.0);
        assert_eq!(value(&s, closed, &[("reason", "timeout")]), 1.0);
        let rej = "broker_connections_rejected_total";
        assert_eq!(value(&s, rej, &[("reason", "capacity")]), 1.0);
        assert_eq!(value(&s, rej, &[("reason", "unauthorized")]), 2.0);
        let routed = "broker_messages_routed_total";
        assert_eq!(value(&s, routed, &[("priority", "now")]), 2.0);
        assert_eq!(value(&s, routed, &[("priority", "next")]), 0.0);
        assert_eq!(value(&s, routed, &[("priority", "low")]), 1.0);
        let mrej = "broker_messages_rejected_total";
        assert_eq!(value(&s, mrej, &[("reason", "bad_json")]), 2.0);
        assert_eq!(value(&s, mrej, &[("reason", "rate_limited")]), 1.0);
        assert_eq!(value(&s, mrej, &[("reason", "internal")]), 0.0);
        let sm = "broker_shard_messages_total";
        assert_eq!(value(&s, sm, &[("shard", "0")]), 5.0);
        assert_eq!(value(&s, sm, &[("shard", "1")]), 1.0);
        let sa = "broker_shard_connections_active";
        assert_eq!(value(&s, sa, &[("shard", "0")]), 1.0);
        assert_eq!(value(&s, sa, &[("shard", "1")]), 0.0);
        assert_eq!(value(&s, "broker_hook_requests_total", &[]), 2.0);
        assert_eq!(
            value(&s, "broker_hook_requests_rate_limited_total", &[]),
            1.0
        );
        assert_eq!(value(&s, "broker_db_healthy", &[]), 1.0);
        assert_eq!(value(&s, "broker_queue_depth", &[]), 3.0);
        assert_eq!(value(&s, "broker_ttl_sweeps_total", &[]), 2.0);
        assert_eq!(value(&s, "broker_ttl_flipped_total", &[]), 4.0);
        assert_eq!(value(&s, "broker_audit_dropped_total", &[]), 6.0);
    }

    #[test]
    fn session_counters_sum_over_shards() {
        let m = Metrics::new(2);
        let (a, b) = (m.shard(0), m.shard(1));
        a.session_went_away();
        a.session_went_away();
        b.session_went_away();
        // One resumed on the other shard, one timed out.
        b.session_away_ended();
        b.session_resumed();
        a.session_away_ended();
        a.session_resumed();
        a.session_replaced();
        a.peer_events_sent(3);
        b.peer_events_sent(4);
        b.peer_events_sent(0);
        a.send_rate_limited();
        b.send_rate_limited();
        b.send_rate_limited();
        a.group_send();
        b.peers_listed();
        b.peers_listed();

        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, "broker_sessions_away", &[]), 1.0);
        assert_eq!(value(&s, "broker_sessions_resumed_total", &[]), 2.0);
        assert_eq!(value(&s, "broker_sessions_replaced_total", &[]), 1.0);
        assert_eq!(value(&s, "broker_peer_events_total", &[]), 7.0);
        assert_eq!(value(&s, "broker_sends_rate_limited_total", &[]), 3.0);
        assert_eq!(value(&s, "broker_group_sends_total", &[]), 1.0);
        assert_eq!(value(&s, "broker_list_peers_total", &[]), 2.0);
        // Not mixed into the connection counters.
        assert_eq!(value(&s, "broker_connections_active", &[]), 0.0);

        b.session_away_ended();
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, "broker_sessions_away", &[]), 0.0);
    }

    #[test]
    fn lease_counters_sum_over_shards() {
        let m = Metrics::new(2);
        let (a, b) = (m.shard(0), m.shard(1));
        a.lease_opened(100);
        a.lease_opened(250);
        b.lease_opened(1000);
        // One acked, one lapsed and pushed again (a new lease, on the other
        // shard), one still open.
        a.lease_closed(100);
        a.lease_acked();
        a.lease_closed(250);
        a.lease_expired();
        b.redelivered();
        b.lease_opened(250);
        a.duplicate_send();
        b.duplicate_send();

        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, "broker_leases_open", &[]), 2.0);
        assert_eq!(value(&s, "broker_lease_bytes", &[]), 1250.0);
        assert_eq!(value(&s, "broker_leases_acked_total", &[]), 1.0);
        assert_eq!(value(&s, "broker_leases_expired_total", &[]), 1.0);
        assert_eq!(value(&s, "broker_redelivered_total", &[]), 1.0);
        assert_eq!(value(&s, "broker_duplicate_sends_total", &[]), 2.0);
        // Not mixed into the send counters.
        assert_eq!(
            value(&s, "broker_messages_routed_total", &[("priority", "now")]),
            0.0
        );

        // The redelivered lease (opened on b) is closed on a: only the sum
        // over shards counts.
        a.lease_closed(250);
        a.lease_acked();
        b.lease_closed(1000);
        b.lease_expired();
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, "broker_leases_open", &[]), 0.0);
        assert_eq!(value(&s, "broker_lease_bytes", &[]), 0.0);
        assert_eq!(value(&s, "broker_leases_acked_total", &[]), 2.0);
        assert_eq!(value(&s, "broker_leases_expired_total", &[]), 2.0);
    }

    #[test]
    fn every_close_reason_and_limit_is_exported_before_it_bites() {
        let m = Metrics::new(2);
        m.shard(1).conn_opened();
        m.shard(1).conn_closed(CloseReason::HelloTimeout);
        m.shard(0).http_timed_out(HttpTimeout::Idle);
        m.shard(1).held_refused(HeldLimit::Bytes);
        let s = parse_exposition(&m.render());
        let c = "broker_connections_closed_total";
        for reason in CloseReason::ALL {
            let expected = if reason == CloseReason::HelloTimeout {
                1.0
            } else {
                0.0
            };
            assert_eq!(value(&s, c, &[("reason", reason.as_str())]), expected);
        }
        let t = "broker_http_timeouts_total";
        assert_eq!(value(&s, t, &[("limit", "hello")]), 0.0);
        assert_eq!(value(&s, t, &[("limit", "idle")]), 1.0);
        let h = "broker_held_refused_total";
        assert_eq!(value(&s, h, &[("limit", "count")]), 0.0);
        assert_eq!(value(&s, h, &[("limit", "bytes")]), 1.0);
        assert_eq!(m.connections_active(), 0);
    }

    #[test]
    fn shard_metrics_are_cache_line_aligned() {
        assert!(std::mem::align_of::<ShardMetrics>() >= 128);
        let m = Metrics::new(3);
        for i in 0..3 {
            assert_eq!(m.shard(i).index(), i);
            assert_eq!(Arc::as_ptr(m.shard(i)) as usize % 128, 0);
        }
    }
}
