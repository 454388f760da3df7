//! Latency recording, open-loop pacing with coordinated-omission
//! correction, and delivery accounting (lost and duplicated pushes).
use hdrhistogram::Histogram;
use serde::Serialize;

/// Nanoseconds on CLOCK_MONOTONIC (the clock every worker shares, and the
/// one timerfd deadlines are given in).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Highest latency tracked: one hour, in ns.
const MAX_NS: u64 = 3_600_000_000_000;

/// A latency histogram in nanoseconds (3 significant digits).
#[derive(Clone)]
pub struct Latency(pub Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    /// Records `now - start` (0 if the clock says otherwise), clamped.
    #[inline]
    pub fn record_since(&mut self, start_ns: u64, now_ns: u64) {
        let v = now_ns.saturating_sub(start_ns).clamp(1, MAX_NS);
        self.0.record(v).expect("clamped into range");
    }

    pub fn add(&mut self, other: &Latency) {
        self.0.add(&other.0).expect("same bounds");
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In milliseconds.
    pub fn percentiles(&self) -> Percentiles {
        self.percentiles_in(1e6)
    }

    /// In units of `unit_ns` nanoseconds (1e3: microseconds).
    pub fn percentiles_in(&self, unit_ns: f64) -> Percentiles {
        let at = |q: f64| self.0.value_at_quantile(q) as f64 / unit_ns;
        Percentiles {
            count: self.0.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: self.0.max() as f64 / unit_ns,
        }
    }
}

/// Latency percentiles, in milliseconds unless the field's name says
/// otherwise (`…_us`: microseconds).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Open-loop schedule of one sender: sends are *due* every `interval_ns`
/// whether or not the sender managed to send the previous ones on time.
/// Each send carries its due ("intended") time as its timestamp, so a stall
/// of the sender or of the broker shows up in the latency of every send
/// that should have gone out during it: the coordinated-omission correction.
#[derive(Clone, Debug)]
pub struct Pacer {
    pub interval_ns: u64,
    pub next_due_ns: u64,
}

impl Pacer {
    /// `offset` in [0, 1) staggers senders sharing a rate.
    pub fn new(rate_per_s: f64, start_ns: u64, offset: f64) -> Pacer {
        let interval_ns = (1e9 / rate_per_s).max(1.0) as u64;
        Pacer {
            interval_ns,
            next_due_ns: start_ns + (interval_ns as f64 * offset) as u64,
        }
    }

    /// The intended time of the next send if it is due at `now_ns`.
    #[inline]
    pub fn due(&mut self, now_ns: u64) -> Option<u64> {
        if self.next_due_ns > now_ns {
            return None;
        }
        let t = self.next_due_ns;
        self.next_due_ns += self.interval_ns;
        Some(t)
    }
}

/// Whether an open-loop run kept its schedule: 99 % of its paced sends went
/// out less than one pacer tick after they were due (the pacer wakes once a
/// tick, so that much lateness is by design; more means the loadgen, not
/// the broker, set the pace).
pub(crate) fn kept_schedule(lag_ms: &Percentiles, tick: std::time::Duration) -> bool {
    lag_ms.count > 0 && lag_ms.p99 < tick.as_secs_f64() * 1e3
}

/// A growable bitset of sequence numbers.
#[derive(Clone, Debug, Default)]
pub struct SeqSet {
    words: Vec<u64>,
}

impl SeqSet {
    /// Sets `seq`; false if it was already set.
    #[inline]
    pub fn insert(&mut self, seq: u32) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.words.len() {
            self.words.resize((w + 1).max(self.words.len() * 2), 0);
        }
        let was = self.words[w] >> b & 1 == 1;
        self.words[w] |= 1 << b;
        !was
    }

    pub fn contains(&self, seq: u32) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        self.words.get(w).is_some_and(|word| word >> b & 1 == 1)
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// What one receiving session has seen, per sender (index in the mesh):
/// sequence numbers are dense per (sender, receiver) in `direct` and per
/// sender in `broadcast`, so a bitset per sender detects duplicates exactly.
#[derive(Clone, Debug, Default)]
pub struct ReceiverLedger {
    by_sender: Vec<SeqSet>,
}

impl ReceiverLedger {
    /// Records a push; true if new, false for a duplicate.
    #[inline]
    pub fn record(&mut self, sender: u32, seq: u32) -> bool {
        let s = sender as usize;
        if s >= self.by_sender.len() {
            self.by_sender.resize_with(s + 1, SeqSet::default);
        }
        self.by_sender[s].insert(seq)
    }

    /// Whether the push was recorded already.
    pub fn contains(&self, sender: u32, seq: u32) -> bool {
        self.by_sender
            .get(sender as usize)
            .is_some_and(|s| s.contains(seq))
    }

    pub fn unique(&self) -> u64 {
        self.by_sender.iter().map(SeqSet::count).sum()
    }
}

/// Delivery totals of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Pushes the sends called for (one per live target session).
    pub expected: u64,
    /// Distinct (sender, seq) pushes received, summed over receivers.
    pub unique: u64,
    /// Pushes received again at the same receiver.
    pub duplicates: u64,
}

impl Delivery {
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.unique)
    }

    /// More distinct pushes than called for: a delivery to someone who was
    /// not a target (counted apart from duplicates).
    pub fn unexpected(&self) -> u64 {
        self.unique.saturating_sub(self.expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_loop_latency_is_recorded_from_the_send() {
        let mut h = Latency::default();
        for i in 0..1000u64 {
            h.record_since(i * 1_000_000, i * 1_000_000 + 200_000);
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 0.2).abs() < 0.001, "{p:?}");
        assert!((p.max - 0.2).abs() < 0.001, "{p:?}");
        let us = h.percentiles_in(1e3);
        assert!((us.p50 - 200.0).abs() < 1.0, "{us:?}");
        assert_eq!(us.count, 1000);
        // A clock going backwards records the minimum, never panics.
        h.record_since(10, 5);
    }

    /// 1000/s for 1 s, each answered in 100 µs, but the sender is stalled
    /// for 100 ms in the middle. Recording from the intended time charges the
    /// stall to the ~100 sends that should have gone out during it; the
    /// uncorrected view (from the actual send) sees one slow send at most.
    #[test]
    fn coordinated_omission_is_corrected() {
        let mut pacer = Pacer::new(1000.0, 0, 0.0);
        let mut corrected = Latency::default();
        let mut naive = Latency::default();
        let mut now = 0u64;
        let stall = 500_000_000..600_000_000;
        while now < 1_000_000_000 {
            if stall.contains(&now) {
                now = stall.end;
            }
            while let Some(intended) = pacer.due(now) {
                let actual = now;
                let answered = actual + 100_000;
                corrected.record_since(intended, answered);
                naive.record_since(actual, answered);
            }
            now += 10_000;
        }
        assert_eq!(corrected.len(), 1000);
        assert_eq!(naive.len(), 1000);
        let (c, n) = (corrected.percentiles(), naive.percentiles());
        assert!(n.p99 < 0.2, "naive {n:?}");
        assert!(n.max < 0.2, "naive {n:?}");
        // ~10% of sends were due during the stall: p90 sits in it, p99
        // is near its full length.
        assert!(c.p99 > 80.0 && c.p99 < 101.0, "corrected {c:?}");
        assert!(c.max > 99.0, "corrected {c:?}");
        assert!(c.p50 < 0.2, "corrected {c:?}");
    }

    #[test]
    fn pacer_staggers_and_never_skips() {
        let mut a = Pacer::new(100.0, 1_000, 0.5);
        assert_eq!(a.interval_ns, 10_000_000);
        assert_eq!(a.due(1_000), None);
        assert_eq!(a.due(5_001_000), Some(5_001_000));
        // Far behind: every missed slot comes out, in order.
        let late: Vec<u64> = std::iter::from_fn(|| a.due(45_001_000)).collect();
        assert_eq!(late.len(), 4);
        assert_eq!(late[0], 15_001_000);
    }

    /// A sender that wakes once per 50 µs tick keeps a 20 k/s schedule; one
    /// stalled for 100 ms of a second sends a tenth of it late.
    #[test]
    fn schedule_lag_shows_a_stalled_sender() {
        let tick = std::time::Duration::from_micros(50);
        let lag = |stall: std::ops::Range<u64>| {
            let mut pacer = Pacer::new(20_000.0, 0, 0.3);
            let mut lag = Latency::default();
            let mut now = 0u64;
            while now <= 1_000_000_000 {
                if stall.contains(&now) {
                    now = stall.end;
                }
                while let Some(due) = pacer.due(now) {
                    lag.record_since(due, now);
                }
                now += 50_000;
            }
            lag.percentiles()
        };
        let on_time = lag(0..0);
        assert_eq!(on_time.count, 20_000);
        assert!(on_time.max < 0.05, "{on_time:?}");
        assert!(kept_schedule(&on_time, tick));
        let stalled = lag(400_000_000..500_000_000);
        assert_eq!(stalled.count, 20_000);
        assert!(stalled.p99 > 90.0, "{stalled:?}");
        assert!(!kept_schedule(&stalled, tick));
        assert!(!kept_schedule(&Percentiles::default(), tick));
    }

    #[test]
    fn ledger_counts_unique_and_duplicates() {
        let mut ledger = ReceiverLedger::default();
        let mut d = Delivery {
            expected: 6,
            ..Default::default()
        };
        for (sender, seq) in [(0, 0), (0, 1), (3, 0), (0, 1), (3, 200), (3, 0)] {
            if ledger.record(sender, seq) {
                d.unique += 1;
            } else {
                d.duplicates += 1;
            }
        }
        assert_eq!(d.unique, 4);
        assert_eq!(d.duplicates, 2);
        assert!(ledger.contains(3, 200) && ledger.contains(0, 1));
        assert!(!ledger.contains(3, 1) && !ledger.contains(9, 0) && !ledger.contains(0, 1 << 20));
        assert_eq!(ledger.unique(), 4);
        assert_eq!(d.lost(), 2);
        assert_eq!(d.unexpected(), 0);
        d.expected = 3;
        assert_eq!(d.lost(), 0);
        assert_eq!(d.unexpected(), 1);
    }

    #[test]
    fn seqset_grows() {
        let mut s = SeqSet::default();
        assert!(s.insert(100_000));
        assert!(!s.insert(100_000));
        assert!(s.insert(63));
        assert!(s.insert(64));
        assert_eq!(s.count(), 3);
    }
}
