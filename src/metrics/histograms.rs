//! Latency histograms: recorded shard-locally without a lock, published into
//! the shard's copy about once a second, merged at scrape.
use std::time::Duration;

use super::render::HistSnapshot;
use super::*;
use hdrhistogram::Histogram;

/// Prometheus histogram bounds, seconds (`+Inf` added at encoding).
pub(super) const BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Summary quantiles.
pub(super) const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

const HIST_LOW_US: u64 = 1;
const HIST_HIGH_US: u64 = 60_000_000;
const HIST_SIGFIG: u8 = 3;

/// One latency distribution: HDR histogram (µs, allocated on first record) plus the
/// exact sum for `_sum`.
#[derive(Debug, Default)]
pub(super) struct Lat {
    hist: Option<Histogram<u64>>,
    sum_ns: u64,
}

impl Lat {
    fn new_hist() -> Histogram<u64> {
        Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
            .expect("constant histogram bounds are valid")
    }

    pub(super) fn record(&mut self, d: Duration) {
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

    pub(super) fn snapshot(&self) -> HistSnapshot {
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
pub(super) struct ShardLats {
    pub(super) http: Lat,
    pub(super) send_ack: [Lat; 3],
    pub(super) send_push: [Lat; 3],
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

    pub(super) fn add(&mut self, other: &ShardLats) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::{buckets, parse_exposition, value};

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
}
