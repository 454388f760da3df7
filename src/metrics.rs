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
//! - Global values (DB health, held-envelope depth, TTL sweeps, audit-batch latency)
//!   are written by whichever thread owns them; see [`GlobalMetrics`].
//! - [`Metrics::render`] sums the shards and encodes OpenMetrics text with
//!   `prometheus-client`. prometheus-client 0.22 cannot encode summaries, so the
//!   p50/p90/p99/p99.9 summaries are written by hand as `<histogram>_quantiles`
//!   families just before `# EOF`. Serve it with [`CONTENT_TYPE`].
//!
//! # Label values
//! All bounded: priorities, [`RejectReason`], the error codes in
//! [`MESSAGE_REJECT_REASONS`], shard indexes, and close reasons — `&'static str`s
//! chosen by the caller (at most [`MAX_LABELS`] distinct ones per family; any more
//! are counted as `other`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};


pub use crate::protocol::Priority;

/// Why a hello was refused (`broker_connections_rejected_total{reason}`).
/// Every authentication failure (bad signature, stale timestamp, not a member) is
/// `Unauthorized`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    Capacity,
    Unauthorized,
}

impl RejectReason {
    pub const ALL: [RejectReason; 2] = [RejectReason::Capacity, RejectReason::Unauthorized];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Capacity => "capacity",
            RejectReason::Unauthorized => "unauthorized",
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
const OVERFLOW_LABEL: &str = "other";

/// Prometheus histogram bounds, seconds (`+Inf` added at encoding).
const BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Summary quantiles.
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

const HIST_LOW_US: u64 = 1;
const HIST_HIGH_US: u64 = 60_000_000;
const HIST_SIGFIG: u8 = 3;

// ---------------------------------------------------------------------------
// Counters labelled by caller-supplied &'static str.

/// Lock-free counters keyed by a `&'static str` label: a fixed table of slots, each
/// claimed once. Lookup is a short linear scan (a handful of labels in practice).
#[derive(Debug)]
struct LabeledCounters {
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
    fn collect_into(&self, into: &mut Vec<(&'static str, u64)>) {
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

    fn total(&self) -> u64 {
        let named: u64 = self.slots.iter().map(|s| s.count.load(Relaxed)).sum();
        named + self.overflow.load(Relaxed)
    }
}

// ---------------------------------------------------------------------------
// Latency histograms.

/// One latency distribution: HDR histogram (µs, allocated on first record) plus the
/// exact sum for `_sum`.
#[derive(Debug, Default)]
struct Lat {
    hist: Option<Histogram<u64>>,
    sum_ns: u64,
}

impl Lat {
    fn new_hist() -> Histogram<u64> {
        Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
            .expect("constant histogram bounds are valid")
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // Values above 60 s are clamped to the top bucket.
        self.hist
            .get_or_insert_with(Self::new_hist)
            .saturating_record(us);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    fn count(&self) -> u64 {
        self.hist.as_ref().map_or(0, |h| h.len())
    }

    /// `self += other`.
    fn add(&mut self, other: &Lat) {
        if let Some(src) = other.hist.as_ref().filter(|h| !h.is_empty()) {
            let dst = self.hist.get_or_insert_with(Self::new_hist);
            // Same bounds on both sides, so addition cannot fail.
            let _ = dst.add(src);
            self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        }
    }

    /// Empty it, keeping the allocation.
    fn clear(&mut self) {
        if let Some(h) = self.hist.as_mut().filter(|h| !h.is_empty()) {
            h.reset();
        }
        self.sum_ns = 0;
    }

    fn snapshot(&self) -> HistSnapshot {
        let mut per_bucket = [0u64; BUCKETS.len() + 1];
        let mut quantiles = [f64::NAN; QUANTILES.len()];
        let count = self.count();
        if let Some(h) = self.hist.as_ref().filter(|_| count > 0) {
            for v in h.iter_recorded() {
                // The lowest value of the HDR cell, so a value recorded exactly on a
                // bound lands in that bound's bucket.
                let secs = h.lowest_equivalent(v.value_iterated_to()) as f64 / 1e6;
                let i = BUCKETS.partition_point(|b| *b < secs);
                per_bucket[i] += v.count_at_value();
            }
            for (q, out) in QUANTILES.iter().zip(quantiles.iter_mut()) {
                *out = h.value_at_quantile(*q) as f64 / 1e6;
            }
        }
        let buckets = BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(per_bucket)
            .collect();
        HistSnapshot {
            sum_secs: self.sum_ns as f64 / 1e9,
            count,
            buckets,
            quantiles,
        }
    }
}

/// The histograms one shard records.
#[derive(Debug, Default)]
struct ShardLats {
    http: Lat,
    send_ack: [Lat; 3],
    send_push: [Lat; 3],
}

impl ShardLats {
    fn all(&self) -> impl Iterator<Item = &Lat> {
        std::iter::once(&self.http)
            .chain(self.send_ack.iter())
            .chain(self.send_push.iter())
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Lat> {
        std::iter::once(&mut self.http)
            .chain(self.send_ack.iter_mut())
            .chain(self.send_push.iter_mut())
    }

    fn add(&mut self, other: &ShardLats) {
        for (dst, src) in self.all_mut().zip(other.all()) {
            dst.add(src);
        }
    }
}

/// A shard's unpublished latencies: owned by the shard thread, no lock.
#[derive(Debug, Default)]
pub struct LocalHistograms {
    lats: ShardLats,
    dirty: bool,
}

impl LocalHistograms {
    pub fn new() -> Self {
        Self::default()
    }

    /// An HTTP request, head received → response queued.
    pub fn record_http(&mut self, d: Duration) {
        self.lats.http.record(d);
        self.dirty = true;
    }

    /// A `send`: received → ack queued.
    pub fn record_send_ack(&mut self, p: Priority, d: Duration) {
        self.lats.send_ack[p.index()].record(d);
        self.dirty = true;
    }

    /// A `send`: received → push queued to a recipient (once per recipient).
    pub fn record_send_push(&mut self, p: Priority, d: Duration) {
        self.lats.send_push[p.index()].record(d);
        self.dirty = true;
    }

    /// Move everything recorded since the last call into `into` (this shard's
    /// published histograms) and start over. Call about once a second; cheap when
    /// nothing was recorded.
    pub fn publish(&mut self, into: &ShardMetrics) {
        if !self.dirty {
            return;
        }
        lock(&into.published).add(&self.lats);
        for lat in self.lats.all_mut() {
            lat.clear();
        }
        self.dirty = false;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves consistent-enough data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Shard and global metrics.

/// One shard's counters (written by that shard only) and published histograms.
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    index: usize,
    conns_opened: AtomicU64,
    conns_closed: LabeledCounters,
    conns_rejected: [AtomicU64; 2],
    routed: [AtomicU64; 3],
    rejected: LabeledCounters,
    messages_in: AtomicU64,
    socket_writes: AtomicU64,
    frames_written: AtomicU64,
    hook_requests: AtomicU64,
    hook_rate_limited: AtomicU64,
    published: Mutex<ShardLats>,
}

impl ShardMetrics {
    fn new(index: usize) -> Self {
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
    db_healthy: AtomicBool,
    queue_depth: Arc<AtomicI64>,
    ttl_sweeps: AtomicU64,
    ttl_flipped: AtomicU64,
    audit_batch: Mutex<Lat>,
}

impl GlobalMetrics {
    fn new() -> Self {
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

    /// The OpenMetrics text exposition (serve with [`CONTENT_TYPE`]).
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
            rejected_conns: [0; 2],
            closed: Vec::new(),
            routed: [0; 3],
            rejected_msgs: Vec::new(),
            hook_requests: 0,
            hook_rate_limited: 0,
            shard_active: Vec::with_capacity(self.shards.len()),
            shard_messages: Vec::with_capacity(self.shards.len()),
            shard_socket_writes: Vec::with_capacity(self.shards.len()),
            shard_frames_written: Vec::with_capacity(self.shards.len()),
            queue_depth: self.global.queue_depth.load(Relaxed),
            ttl_sweeps: self.global.ttl_sweeps.load(Relaxed),
            ttl_flipped: self.global.ttl_flipped.load(Relaxed),
            db_healthy: self.global.db_healthy(),
            http: HistSnapshot::default(),
            send_ack: Default::default(),
            send_push: Default::default(),
            audit_batch: lock(&self.global.audit_batch).snapshot(),
        };
        let mut lats = ShardLats::default();
        for shard in &self.shards {
            s.shard_active.push(shard.connections_active());
            s.connections_total += shard.conns_opened.load(Relaxed);
            for (dst, src) in s.rejected_conns.iter_mut().zip(&shard.conns_rejected) {
                *dst += src.load(Relaxed);
            }
            shard.conns_closed.collect_into(&mut s.closed);
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
            lats.add(&lock(&shard.published));
        }
        s.http = lats.http.snapshot();
        for i in 0..3 {
            s.send_ack[i] = lats.send_ack[i].snapshot();
            s.send_push[i] = lats.send_push[i].snapshot();
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Encoding.

#[derive(Debug, Default)]
struct HistSnapshot {
    sum_secs: f64,
    count: u64,
    /// (upper bound, count in this bucket alone); the last bound is `f64::MAX` (+Inf).
    buckets: Vec<(f64, u64)>,
    /// Values at [`QUANTILES`], seconds; NaN when empty.
    quantiles: [f64; QUANTILES.len()],
}

/// Everything a scrape shows, summed over shards.
#[derive(Debug)]
struct Snapshot {
    connections_total: u64,
    rejected_conns: [u64; 2],
    closed: Vec<(&'static str, u64)>,
    routed: [u64; 3],
    rejected_msgs: Vec<(&'static str, u64)>,
    hook_requests: u64,
    hook_rate_limited: u64,
    shard_active: Vec<i64>,
    shard_messages: Vec<u64>,
    shard_socket_writes: Vec<u64>,
    shard_frames_written: Vec<u64>,
    queue_depth: i64,
    ttl_sweeps: u64,
    ttl_flipped: u64,
    db_healthy: bool,
    http: HistSnapshot,
    send_ack: [HistSnapshot; 3],
    send_push: [HistSnapshot; 3],
    audit_batch: HistSnapshot,
}

// Histogram family names (without the `_seconds` unit suffix prometheus-client adds).
const HTTP_HIST: &str = "broker_http_request_duration";
const ACK_HIST: &str = "broker_send_ack_latency";
const PUSH_HIST: &str = "broker_send_push_latency";
const AUDIT_HIST: &str = "broker_audit_batch_write";

/// (family name, help, [(priority label, data)]).
type LatencyFamily<'a> = (
    &'static str,
    &'static str,
    Vec<(Option<Priority>, &'a HistSnapshot)>,
);

impl Snapshot {
    fn priority_hists(
        hists: &[HistSnapshot; 3],
    ) -> impl Iterator<Item = (Option<Priority>, &HistSnapshot)> {
        Priority::ALL.into_iter().map(Some).zip(hists.iter())
    }

    /// (name, help, [(priority label, data)]) for every latency family.
    fn latency_families(&self) -> [LatencyFamily<'_>; 4] {
        [
            (
                HTTP_HIST,
                "HTTP request duration (head received to response queued).",
                vec![(None, &self.http)],
            ),
            (
                ACK_HIST,
                "Send to ack latency, by priority.",
                Self::priority_hists(&self.send_ack).collect(),
            ),
            (
                PUSH_HIST,
                "Send to push latency (per recipient), by priority.",
                Self::priority_hists(&self.send_push).collect(),
            ),
            (
                AUDIT_HIST,
                "Audit log batch write duration.",
                vec![(None, &self.audit_batch)],
            ),
        ]
    }

    /// The hand-written summary families (prometheus-client 0.22 has no summary).
    fn summaries(&self) -> String {
        let mut out = String::new();
        for (name, help, series) in self.latency_families() {
            let family = format!("{name}_seconds_quantiles");
            let _ = writeln!(
                out,
                "# HELP {family} {help} Quantiles from HdrHistogram, since start."
            );
            let _ = writeln!(out, "# TYPE {family} summary");
            for (priority, h) in series {
                let prefix =
                    priority.map_or(String::new(), |p| format!("priority=\"{}\",", p.as_str()));
                let plain = priority.map_or(String::new(), |p| {
                    format!("{{priority=\"{}\"}}", p.as_str())
                });
                for (q, v) in QUANTILES.iter().zip(h.quantiles) {
                    let _ = writeln!(out, "{family}{{{prefix}quantile=\"{q}\"}} {}", fmt_f64(v));
                }
                let _ = writeln!(out, "{family}_sum{plain} {}", fmt_f64(h.sum_secs));
                let _ = writeln!(out, "{family}_count{plain} {}", h.count);
            }
        }
        out
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{v}")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn labeled_counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        ConstCounter::new(n).encode(m.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut enc;
        let active: i64 = self.shard_active.iter().sum();
        gauge(
            e,
            "broker_connections_active",
            "Open WebSocket connections.",
            active,
        )?;
        counter(
            e,
            "broker_connections",
            "WebSocket connections opened.",
            self.connections_total,
        )?;
        labeled_counters(
            e,
            "broker_connections_rejected",
            "Hellos refused, by reason.",
            "reason",
            RejectReason::ALL
                .iter()
                .map(|r| r.as_str())
                .zip(self.rejected_conns),
        )?;
        labeled_counters(
            e,
            "broker_connections_closed",
            "WebSocket connections closed, by close reason.",
            "reason",
            self.closed.iter().copied(),
        )?;
        labeled_counters(
            e,
            "broker_messages_routed",
            "Sends routed, by priority.",
            "priority",
            Priority::ALL.iter().map(|p| p.as_str()).zip(self.routed),
        )?;
        labeled_counters(
            e,
            "broker_messages_rejected",
            "Client messages answered with an error, by error code.",
            "reason",
            self.rejected_msgs.iter().copied(),
        )?;
        gauge(
            e,
            "broker_queue_depth",
            "Held envelopes waiting for their recipient.",
            self.queue_depth,
        )?;
        counter(
            e,
            "broker_ttl_sweeps",
            "Status TTL sweeps run.",
            self.ttl_sweeps,
        )?;
        counter(
            e,
            "broker_ttl_flipped",
            "Sessions flipped from working to idle by the TTL sweep.",
            self.ttl_flipped,
        )?;
        counter(
            e,
            "broker_hook_requests",
            "POST /hook/set-status requests.",
            self.hook_requests,
        )?;
        counter(
            e,
            "broker_hook_requests_rate_limited",
            "POST /hook/set-status requests refused with 429.",
            self.hook_rate_limited,
        )?;
        gauge(
            e,
            "broker_db_healthy",
            "1 when Postgres answers, else 0.",
            i64::from(self.db_healthy),
        )?;
        {
            let mut m = e.encode_descriptor(
                "broker_shard_connections_active",
                "Open WebSocket connections, by shard.",
                None,
                MetricType::Gauge,
            )?;
            for (i, v) in self.shard_active.iter().enumerate() {
                ConstGauge::new(*v).encode(m.encode_family(&[("shard", i.to_string())])?)?;
            }
        }
        for (name, help, values) in [
            (
                "broker_shard_messages",
                "Client messages received, by shard.",
                &self.shard_messages,
            ),
            (
                "broker_shard_socket_writes",
                "WebSocket socket writes, by shard.",
                &self.shard_socket_writes,
            ),
            (
                "broker_shard_frames_written",
                "WebSocket frames written (frames per socket write is the write batching), by shard.",
                &self.shard_frames_written,
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (i, v) in values.iter().enumerate() {
                ConstCounter::new(*v).encode(m.encode_family(&[("shard", i.to_string())])?)?;
            }
        }
        for (name, help, series) in self.latency_families() {
            let mut m =
                e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            for (priority, h) in series {
                match priority {
                    None => m.encode_histogram::<()>(h.sum_secs, h.count, &h.buckets, None)?,
                    Some(p) => m
                        .encode_family(&[("priority", p.as_str())])?
                        .encode_histogram::<()>(h.sum_secs, h.count, &h.buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample line: `name{labels} value`.
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// Checks every line is a comment (`# HELP|TYPE|UNIT|EOF`) or a well-formed
    /// sample, and that `# EOF` ends the text. Returns the samples.
    fn parse_exposition(text: &str) -> Vec<Sample> {
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "must end with # EOF");
        assert!(text.ends_with("# EOF\n"));
        let mut samples = Vec::new();
        for line in &lines[..lines.len() - 1] {
            if let Some(rest) = line.strip_prefix("# ") {
                let kind = rest.split(' ').next().unwrap();
                assert!(
                    ["HELP", "TYPE", "UNIT"].contains(&kind),
                    "bad comment: {line}"
                );
                if kind == "TYPE" {
                    let t = rest.rsplit(' ').next().unwrap();
                    assert!(
                        ["counter", "gauge", "histogram", "summary"].contains(&t),
                        "{line}"
                    );
                }
                continue;
            }
            samples.push(parse_sample(line));
        }
        samples
    }

    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_sample(line: &str) -> Sample {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed: {line}"));
                let labels = body
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv
                            .split_once('=')
                            .unwrap_or_else(|| panic!("label: {line}"));
                        assert!(valid_name(k), "label name: {line}");
                        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                        let v = v.unwrap_or_else(|| panic!("label value not quoted: {line}"));
                        assert!(!v.contains('"') && !v.contains('\\'), "{line}");
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(valid_name(name), "metric name: {line}");
        Sample {
            name: name.to_owned(),
            labels,
            value,
        }
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        find(samples, name, labels).value
    }

    /// Bucket values of one histogram series, in order, with their `le`.
    fn buckets(samples: &[Sample], name: &str, extra: Option<(&str, &str)>) -> Vec<(String, f64)> {
        samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .filter(|s| {
                extra.map_or(s.labels.len() == 1, |(k, v)| {
                    s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v)
                })
            })
            .map(|s| {
                let le = s.labels.iter().find(|(k, _)| k == "le").unwrap().1.clone();
                (le, s.value)
            })
            .collect()
    }

    #[test]
    fn empty_render_is_valid_and_complete() {
        let m = Metrics::new(2);
        let text = m.render();
        let samples = parse_exposition(&text);
        for name in [
            "broker_connections_active",
            "broker_connections_total",
            "broker_queue_depth",
            "broker_ttl_sweeps_total",
            "broker_ttl_flipped_total",
            "broker_hook_requests_total",
            "broker_hook_requests_rate_limited_total",
            "broker_db_healthy",
        ] {
            assert_eq!(value(&samples, name, &[]), 0.0, "{name}");
        }
        for r in ["capacity", "unauthorized"] {
            assert_eq!(
                value(
                    &samples,
                    "broker_connections_rejected_total",
                    &[("reason", r)]
                ),
                0.0
            );
        }
        for p in ["now", "next", "low"] {
            assert_eq!(
                value(&samples, "broker_messages_routed_total", &[("priority", p)]),
                0.0
            );
        }
        for r in MESSAGE_REJECT_REASONS {
            assert_eq!(
                value(&samples, "broker_messages_rejected_total", &[("reason", r)]),
                0.0
            );
        }
        for shard in ["0", "1"] {
            let l = [("shard", shard)];
            assert_eq!(value(&samples, "broker_shard_connections_active", &l), 0.0);
            assert_eq!(value(&samples, "broker_shard_messages_total", &l), 0.0);
        }
        assert!(text.contains("# TYPE broker_connections_closed counter\n"));
        // Every latency family exists with zero counts, as histogram and summary.
        let single = [
            "broker_http_request_duration_seconds",
            "broker_audit_batch_write_seconds",
        ];
        for name in single {
            assert_eq!(value(&samples, &format!("{name}_count"), &[]), 0.0);
            assert_eq!(buckets(&samples, name, None).len(), BUCKETS.len() + 1);
            let q = format!("{name}_quantiles");
            assert_eq!(value(&samples, &format!("{q}_count"), &[]), 0.0);
            assert!(value(&samples, &q, &[("quantile", "0.99")]).is_nan());
        }
        for name in [
            "broker_send_ack_latency_seconds",
            "broker_send_push_latency_seconds",
        ] {
            for p in ["now", "next", "low"] {
                let l = [("priority", p)];
                assert_eq!(value(&samples, &format!("{name}_count"), &l), 0.0);
                assert_eq!(
                    buckets(&samples, name, Some(("priority", p))).len(),
                    BUCKETS.len() + 1
                );
                let q = format!("{name}_quantiles");
                assert_eq!(value(&samples, &format!("{q}_count"), &l), 0.0);
                assert!(value(&samples, &q, &[("priority", p), ("quantile", "0.5")]).is_nan());
            }
        }
        assert!(text.contains("# TYPE broker_http_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE broker_http_request_duration_seconds_quantiles summary\n"));
        // Family names are unique.
        let mut types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let n = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), n);
    }

    #[test]
    fn counters_sum_over_shards() {
        let m = Metrics::new(2);
        let (a, b) = (m.shard(0), m.shard(1));
        for _ in 0..3 {
            a.conn_opened();
        }
        b.conn_opened();
        a.conn_closed("normal");
        b.conn_closed("normal");
        a.conn_closed("ping_timeout");
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

        assert_eq!(a.connections_active(), 1);
        assert_eq!(b.connections_active(), 0);
        assert_eq!(m.connections_active(), 1);
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, "broker_connections_active", &[]), 1.0);
        assert_eq!(value(&s, "broker_connections_total", &[]), 4.0);
        let closed = "broker_connections_closed_total";
        assert_eq!(value(&s, closed, &[("reason", "normal")]), 2.0);
        assert_eq!(value(&s, closed, &[("reason", "ping_timeout")]), 1.0);
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
    }

    #[test]
    fn histograms_after_publish() {
        let m = Metrics::new(1);
        let shard = m.shard(0);
        let mut local = LocalHistograms::new();
        // 1..=1000 ms, one each.
        for ms in 1..=1000u64 {
            local.record_http(Duration::from_millis(ms));
        }
        let name = "broker_http_request_duration_seconds";
        // Not visible before publish.
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, &format!("{name}_count"), &[]), 0.0);

        local.publish(shard);
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, &format!("{name}_count"), &[]), 1000.0);
        let sum = value(&s, &format!("{name}_sum"), &[]);
        assert!((sum - 500.5).abs() < 1e-6, "sum {sum}");

        let b = buckets(&s, name, None);
        assert_eq!(b.last().unwrap().0, "+Inf");
        assert_eq!(b.last().unwrap().1, 1000.0);
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative: {b:?}");
        let le = |bound: f64| {
            b.iter()
                .find(|(l, _)| l.parse::<f64>().ok() == Some(bound))
                .unwrap_or_else(|| panic!("no bucket {bound}: {b:?}"))
                .1
        };
        assert_eq!(le(0.0005), 0.0);
        assert_eq!(le(0.001), 1.0);
        assert_eq!(le(0.01), 10.0);
        assert_eq!(le(0.1), 100.0);
        assert_eq!(le(0.5), 500.0);
        assert_eq!(le(1.0), 1000.0);

        // Quantiles of a uniform 1..1000 ms distribution, within HDR precision.
        let q = format!("{name}_quantiles");
        for (quantile, want) in [("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99), ("0.999", 0.999)] {
            let got = value(&s, &q, &[("quantile", quantile)]);
            assert!((got - want).abs() / want < 0.002, "q{quantile}: {got}");
        }
        assert_eq!(value(&s, &format!("{q}_count"), &[]), 1000.0);

        // publish() cleared the local histograms: publishing again adds nothing.
        local.publish(shard);
        let s = parse_exposition(&m.render());
        assert_eq!(value(&s, &format!("{name}_count"), &[]), 1000.0);
    }

    #[test]
    fn histograms_merge_across_shards() {
        let m = Metrics::new(2);
        let mut l0 = LocalHistograms::new();
        let mut l1 = LocalHistograms::new();
        for _ in 0..90 {
            l0.record_send_ack(Priority::Now, Duration::from_micros(100));
        }
        for _ in 0..10 {
            l1.record_send_ack(Priority::Now, Duration::from_millis(20));
        }
        l1.record_send_push(Priority::Low, Duration::from_secs(120)); // clamped to 60 s
        m.global().record_audit_batch(Duration::from_millis(3));
        l0.publish(m.shard(0));
        l1.publish(m.shard(1));

        let s = parse_exposition(&m.render());
        let ack = "broker_send_ack_latency_seconds";
        let now = [("priority", "now")];
        assert_eq!(value(&s, &format!("{ack}_count"), &now), 100.0);
        assert_eq!(
            value(&s, &format!("{ack}_count"), &[("priority", "next")]),
            0.0
        );
        let sum = value(&s, &format!("{ack}_sum"), &now);
        assert!(
            (sum - (90.0 * 0.0001 + 10.0 * 0.02)).abs() < 1e-9,
            "sum {sum}"
        );
        let b = buckets(&s, ack, Some(("priority", "now")));
        let at = |bound: &str| b.iter().find(|(l, _)| l == bound).map(|x| x.1);
        assert_eq!(b.last().unwrap().1, 100.0);
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(
            b.iter()
                .find(|(l, _)| l.parse::<f64>() == Ok(0.0001))
                .unwrap()
                .1,
            90.0
        );
        assert_eq!(
            b.iter()
                .find(|(l, _)| l.parse::<f64>() == Ok(0.025))
                .unwrap()
                .1,
            100.0
        );
        assert!(at("+Inf").is_some());
        let q = format!("{ack}_quantiles");
        let p50 = value(&s, &q, &[("priority", "now"), ("quantile", "0.5")]);
        let p99 = value(&s, &q, &[("priority", "now"), ("quantile", "0.99")]);
        assert!((p50 - 0.0001).abs() < 1e-6, "p50 {p50}");
        assert!((p99 - 0.02).abs() / 0.02 < 0.002, "p99 {p99}");

        let push = "broker_send_push_latency_seconds";
        let low = [("priority", "low")];
        assert_eq!(value(&s, &format!("{push}_count"), &low), 1.0);
        let pb = buckets(&s, push, Some(("priority", "low")));
        assert_eq!(pb[pb.len() - 2].1, 0.0, "above 10 s: only in +Inf");
        assert_eq!(pb.last().unwrap().1, 1.0);

        let audit = "broker_audit_batch_write_seconds";
        assert_eq!(value(&s, &format!("{audit}_count"), &[]), 1.0);
    }

    #[test]
    fn close_reason_labels_are_bounded() {
        let m = Metrics::new(1);
        let names: Vec<&'static str> = (0..MAX_LABELS + 5)
            .map(|i| &*Box::leak(format!("r{i}").into_boxed_str()))
            .collect();
        for n in &names {
            m.shard(0).conn_opened();
            m.shard(0).conn_closed(n);
        }
        m.shard(0).conn_opened();
        m.shard(0).conn_closed(names[0]);
        assert_eq!(m.connections_active(), 0);
        let s = parse_exposition(&m.render());
        let closed: Vec<&Sample> = s
            .iter()
            .filter(|x| x.name == "broker_connections_closed_total")
            .collect();
        assert_eq!(closed.len(), MAX_LABELS + 1);
        let c = "broker_connections_closed_total";
        assert_eq!(value(&s, c, &[("reason", "r0")]), 2.0);
        assert_eq!(value(&s, c, &[("reason", "other")]), 5.0);
    }

    #[test]
    fn priority_names() {
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse("NOW"), None);
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
