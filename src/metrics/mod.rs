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
mod counters;
mod histograms;
mod render;

pub use counters::{GlobalMetrics, ShardMetrics};
pub use histograms::LocalHistograms;

use histograms::ShardLats;
use render::{HistSnapshot, Snapshot};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::registry::Registry;

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
pub(super) const OVERFLOW_LABEL: &str = "other";

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves consistent-enough data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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

#[cfg(test)]
mod tests {
    use super::histograms::BUCKETS;
    use super::*;
    use std::time::Duration;

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
