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

pub(super) const HIST_LOW_US: u64 = 1;
pub(super) const HIST_HIGH_US: u64 = 60_000_000;
pub(super) const HIST_SIGFIG: u8 = 3;

/// One latency distribution: HDR histogram (µs, allocated on first record) plus the
/// exact sum for `_sum`.
#[derive(Debug, Default)]
pub(super) struct Lat {
    pub(super) hist: Option<Histogram<u64>>,
    pub(super) sum_ns: u64,
}

impl Lat {
    pub(super) fn new_hist() -> Histogram<u64> {
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

    pub(super) fn count(&self) -> u64 {
        self.hist.as_ref().map_or(0, |h| h.len())
    }

    /// `self += other`.
    pub(super) fn add(&mut self, other: &Lat) {
        if let Some(src) = other.hist.as_ref().filter(|h| !h.is_empty()) {
            let dst = self.hist.get_or_insert_with(Self::new_hist);
            // Same bounds on both sides, so addition cannot fail.
            let _ = dst.add(src);
            self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        }
    }

    /// Empty it, keeping the allocation.
    pub(super) fn clear(&mut self) {
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
    pub(super) fn all(&self) -> impl Iterator<Item = &Lat> {
        std::iter::once(&self.http)
            .chain(self.send_ack.iter())
            .chain(self.send_push.iter())
    }

    pub(super) fn all_mut(&mut self) -> impl Iterator<Item = &mut Lat> {
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
    pub(super) lats: ShardLats,
    pub(super) dirty: bool,
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
