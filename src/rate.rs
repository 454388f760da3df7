//! Token buckets per key, for the HTTP routes that limit their callers:
//! `/hook/set-status` per (pid, cwd) (`HOOK_RATE_LIMIT_PER_MIN`) and `/join`
//! per client address (`JOIN_RATE_LIMIT_PER_MIN`). No I/O; the owner keeps
//! the limiter behind a `Mutex` (both routes are low-rate).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Most buckets a limiter keeps (see [`RateLimiter`]).
pub const DEFAULT_MAX_BUCKETS: usize = 100_000;

/// Token-bucket state in integer "units" so refill is exact: one token is
/// `UNITS_PER_TOKEN` units and a bucket refills `limit` units per nanosecond
/// (= `limit` tokens per 60 s).
const UNITS_PER_TOKEN: u128 = 60_000_000_000;

/// How often `allow` garbage-collects on its own.
const AUTO_GC_EVERY: Duration = Duration::from_secs(60);
/// Least time between two forced collections when the table is full.
const FORCED_GC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: u128,
    at: Instant,
}

/// Token bucket per key: capacity `limit_per_min` tokens, refilled
/// continuously at `limit_per_min` per 60 s; a request takes one token.
///
/// Memory is bounded:
/// - a bucket that has refilled to full carries no information (a fresh bucket
///   would answer the same), so [`gc`](Self::gc) drops it; `allow` runs a `gc`
///   itself at most once a minute, the owner may call it more often;
/// - at most `max_buckets` (default [`DEFAULT_MAX_BUCKETS`]) are kept. A request
///   for a new key when the table is full forces a `gc` (at most once a
///   second, so a flood of new keys costs O(1) per request, not a full scan);
///   if the table is still full the request is **refused** (fail closed: a flood
///   of distinct keys must not open a hole in the limit). Buckets refill in
///   `60 s / limit` per token, so legitimate new clients get in again soon after
///   a flood stops.
///
/// `limit_per_min == 0` refuses everything (configuration should forbid it).
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: u32,
    max_buckets: usize,
    buckets: HashMap<K, Bucket>,
    last_gc: Option<Instant>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(limit_per_min: u32) -> Self {
        Self::with_max_buckets(limit_per_min, DEFAULT_MAX_BUCKETS)
    }

    pub fn with_max_buckets(limit_per_min: u32, max_buckets: usize) -> Self {
        RateLimiter {
            limit: limit_per_min,
            max_buckets,
            buckets: HashMap::new(),
            last_gc: None,
        }
    }

    fn capacity(&self) -> u128 {
        u128::from(self.limit) * UNITS_PER_TOKEN
    }

    /// Units in `b` at `now` (refilled, capped at capacity).
    fn level(&self, b: &Bucket, now: Instant) -> u128 {
        let elapsed = now.saturating_duration_since(b.at).as_nanos();
        b.units
            .saturating_add(elapsed.saturating_mul(u128::from(self.limit)))
            .min(self.capacity())
    }

    /// Take one token from `key`'s bucket; `false` means answer 429.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        if self
            .last_gc
            .is_none_or(|t| now.saturating_duration_since(t) >= AUTO_GC_EVERY)
        {
            self.gc(now);
        }
        let capacity = self.capacity();
        let limit = u128::from(self.limit);
        if let Some(b) = self.buckets.get_mut(&key) {
            let elapsed = now.saturating_duration_since(b.at).as_nanos();
            let units = b
                .units
                .saturating_add(elapsed.saturating_mul(limit))
                .min(capacity);
            // Never move the clock backwards: an older `now` refills nothing.
            b.at = b.at.max(now);
            if units >= UNITS_PER_TOKEN {
                b.units = units - UNITS_PER_TOKEN;
                return true;
            }
            b.units = units;
            return false;
        }
        if self.buckets.len() >= self.max_buckets {
            let may_gc = self
                .last_gc
                .is_none_or(|t| now.saturating_duration_since(t) >= FORCED_GC_EVERY);
            if may_gc {
                self.gc(now);
            }
            if self.buckets.len() >= self.max_buckets {
                return false;
            }
        }
        let bucket = Bucket {
            units: capacity - UNITS_PER_TOKEN,
            at: now,
        };
        self.buckets.insert(key, bucket);
        true
    }

    /// Drop every bucket that is full again at `now`; returns how many went.
    pub fn gc(&mut self, now: Instant) -> usize {
        self.last_gc = Some(now);
        let capacity = self.capacity();
        let limit = u128::from(self.limit);
        let before = self.buckets.len();
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_nanos();
            b.units.saturating_add(elapsed.saturating_mul(limit)) < capacity
        });
        before - self.buckets.len()
    }

    /// Buckets currently kept.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Tokens left for `key` at `now` (the limit when there is no bucket).
    pub fn tokens(&self, key: &K, now: Instant) -> u32 {
        match self.buckets.get(key) {
            Some(b) => (self.level(b, now) / UNITS_PER_TOKEN) as u32,
            None => self.limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    type PidCwd = (Option<i32>, &'static str);

    #[test]
    fn exact_limit_then_one_over() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::<PidCwd>::new(30);
        for i in 0..30 {
            assert!(rl.allow((Some(1), "/w"), t0), "request {i}");
        }
        assert!(!rl.allow((Some(1), "/w"), t0));
        assert!(!rl.allow((Some(1), "/w"), t0 + Duration::from_millis(1999)));
        // Other keys are independent: other pid, other cwd, no pid.
        assert!(rl.allow((Some(2), "/w"), t0));
        assert!(rl.allow((Some(1), "/x"), t0));
        assert!(rl.allow((None, "/w"), t0));
        assert_eq!(rl.len(), 4);
    }

    #[test]
    fn refills_continuously() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::<PidCwd>::new(30);
        for _ in 0..30 {
            assert!(rl.allow((None, "/w"), t0));
        }
        assert!(!rl.allow((None, "/w"), t0));
        // 30 per minute: one token every 2 s.
        assert!(!rl.allow((None, "/w"), t0 + Duration::from_millis(1999)));
        assert!(rl.allow((None, "/w"), t0 + Duration::from_secs(2)));
        assert!(!rl.allow((None, "/w"), t0 + Duration::from_secs(2)));
        // After a long pause the bucket is full again, but never above capacity.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(rl.tokens(&(None, "/w"), later), 30);
        for _ in 0..30 {
            assert!(rl.allow((None, "/w"), later));
        }
        assert!(!rl.allow((None, "/w"), later));
    }

    #[test]
    fn refused_requests_do_not_cost_tokens() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::<PidCwd>::new(1);
        assert!(rl.allow((Some(1), "/w"), t0));
        for s in 1..60 {
            assert!(!rl.allow((Some(1), "/w"), t0 + Duration::from_secs(s)));
        }
        assert!(rl.allow((Some(1), "/w"), t0 + Duration::from_secs(60)));
    }

    #[test]
    fn gc_drops_full_buckets_only() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::<PidCwd>::new(30);
        assert!(rl.allow((Some(1), "/a"), t0));
        for _ in 0..30 {
            rl.allow((Some(2), "/b"), t0);
        }
        assert_eq!(rl.len(), 2);
        assert_eq!(rl.gc(t0 + Duration::from_secs(1)), 0);
        // /a used one token: full after 2 s. /b used 30: full after 60 s.
        assert_eq!(rl.gc(t0 + Duration::from_secs(2)), 1);
        assert_eq!(rl.len(), 1);
        assert_eq!(rl.tokens(&(Some(2), "/b"), t0 + Duration::from_secs(2)), 1);
        assert_eq!(rl.gc(t0 + Duration::from_secs(60)), 1);
        assert!(rl.is_empty());
    }

    #[test]
    fn bucket_cap_fails_closed_then_recovers() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::<PidCwd>::with_max_buckets(30, 3);
        for pid in 0..3 {
            assert!(rl.allow((Some(pid), "/w"), t0));
        }
        // Full table, nothing idle yet: a new key is refused, known keys still work.
        assert!(!rl.allow((Some(9), "/w"), t0 + Duration::from_millis(500)));
        assert!(rl.allow((Some(0), "/w"), t0 + Duration::from_millis(600)));
        assert_eq!(rl.len(), 3);
        // pids 1 and 2 are full again after 2 s: the forced gc makes room.
        assert!(rl.allow((Some(9), "/w"), t0 + Duration::from_millis(2500)));
        assert_eq!(rl.len(), 2);
    }

    #[test]
    fn zero_limit_refuses() {
        let mut rl = RateLimiter::<PidCwd>::new(0);
        assert!(!rl.allow((None, "/w"), Instant::now()));
        assert!(rl.is_empty());
    }

    #[test]
    fn keyed_by_address() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::<IpAddr>::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        assert!(rl.allow(a, t0) && rl.allow(a, t0));
        assert!(!rl.allow(a, t0));
        assert!(rl.allow(b, t0));
        // 2 per minute: one token every 30 s.
        assert!(rl.allow(a, t0 + Duration::from_secs(30)));
    }
}
