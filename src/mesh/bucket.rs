//! A member's send budget (PROTOCOL.md §9): a token bucket of `burst`
//! tokens refilled at `per_minute`, shared by the member's sessions on
//! every shard. It is kept as one atomic "theoretical arrival time" (the
//! generic cell rate algorithm), so taking a token is one compare-and-swap
//! on the member's entry: exact across shards, no lock, no per-shard split.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the bucket's times count from: the first use in this process.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The rate a bucket is refilled at and how much it holds.
#[derive(Clone, Copy, Debug)]
pub struct SendRate {
    /// Nanoseconds per token.
    interval: u64,
    /// Nanoseconds of tokens a full bucket holds (`burst` × `interval`).
    depth: u64,
}

impl SendRate {
    pub fn new(per_minute: u32, burst: u32) -> SendRate {
        let interval =
            (Duration::from_secs(60).as_nanos() as u64 / u64::from(per_minute.max(1))).max(1);
        SendRate {
            interval,
            depth: interval.saturating_mul(u64::from(burst.max(1))),
        }
    }
}

/// Starts full: its arrival time is in the past.
#[derive(Default)]
pub struct SendBucket {
    /// When the bucket will be full again, in ns since `epoch`.
    full_at: AtomicU64,
}

impl SendBucket {
    /// Takes one token at `now`; false when the bucket is empty.
    pub fn take(&self, rate: SendRate, now: Instant) -> bool {
        let now = now.saturating_duration_since(epoch()).as_nanos() as u64;
        self.full_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |full_at| {
                let next = full_at.max(now) + rate.interval;
                (next - now <= rate.depth).then_some(next)
            })
            .is_ok()
    }
}

impl SendBucket {
    /// `n` tokens the member spent on another node (README "Several
    /// nodes"): taken here too, never below empty, so its sessions on
    /// every node share one budget, as closely as the bus carries it.
    pub fn spent_elsewhere(&self, rate: SendRate, n: u32, now: Instant) {
        let now = now.saturating_duration_since(epoch()).as_nanos() as u64;
        let _ = self
            .full_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |full_at| {
                let spent = full_at.max(now) + rate.interval.saturating_mul(u64::from(n));
                Some(spent.min(now + rate.depth))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_the_burst_then_the_rate() {
        let rate = SendRate::new(60, 3);
        let bucket = SendBucket::default();
        let t0 = epoch() + Duration::from_secs(100);
        assert!((0..3).all(|_| bucket.take(rate, t0)));
        assert!(!bucket.take(rate, t0));
        // One token a second.
        assert!(!bucket.take(rate, t0 + Duration::from_millis(999)));
        assert!(bucket.take(rate, t0 + Duration::from_secs(1)));
        assert!(!bucket.take(rate, t0 + Duration::from_secs(1)));
        // Refilling stops at the burst.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| bucket.take(rate, later)));
        assert!(!bucket.take(rate, later));
    }

    #[test]
    fn spends_of_other_nodes_empty_it_but_never_below_empty() {
        let rate = SendRate::new(60, 3);
        let bucket = SendBucket::default();
        let t0 = epoch() + Duration::from_secs(100);
        bucket.spent_elsewhere(rate, 2, t0);
        assert!(bucket.take(rate, t0));
        assert!(!bucket.take(rate, t0));
        bucket.spent_elsewhere(rate, 1000, t0);
        // Empty, not in debt: one token a second from now on.
        assert!(bucket.take(rate, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn shared_by_threads_it_never_overspends() {
        let rate = SendRate::new(1, 100);
        let bucket = std::sync::Arc::new(SendBucket::default());
        let now = Instant::now();
        let taken: usize = (0..4)
            .map(|_| {
                let bucket = bucket.clone();
                std::thread::spawn(move || (0..100).filter(|_| bucket.take(rate, now)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(taken, 100);
    }
}
