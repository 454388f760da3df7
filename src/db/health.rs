//! `DbStatus`: the lock-free view of Postgres health that `/health`, the
//! `broker_db_healthy` gauge and the shards read, and that only the
//! db-writer thread writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shared, lock-free view of Postgres health for /health and the
/// broker_db_healthy gauge, plus the writer's loss counters.
#[derive(Debug, Default)]
pub struct DbStatus {
    up: AtomicBool,
    writes_dropped: AtomicU64,
    buffered: AtomicU64,
}

impl DbStatus {
    /// Starts "down": nothing is known about Postgres until the db-writer
    /// thread has connected and migrated.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while the db-writer holds a connection that answered its last
    /// ping (and on which migrations have run).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Set by the db-writer thread; public so that tests of other modules
    /// can fake either state without a database.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// Commands the writer accepted but will never write: dropped (oldest
    /// first) because the in-memory buffer was full while Postgres was
    /// down, or still buffered when the shutdown flush gave up.
    pub fn writes_dropped(&self) -> u64 {
        self.writes_dropped.load(Ordering::Relaxed)
    }

    /// Commands the writer holds in memory, waiting for Postgres (a gauge).
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }

    pub(crate) fn add_dropped(&self, n: u64) {
        self.writes_dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn set_buffered(&self, n: usize) {
        self.buffered.store(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_down_and_counts_drops() {
        let s = DbStatus::new();
        assert!(!s.is_up());
        s.set_up(true);
        assert!(s.is_up());
        s.add_dropped(3);
        s.add_dropped(2);
        assert_eq!(s.writes_dropped(), 5);
        s.set_buffered(7);
        assert_eq!(s.buffered(), 7);
    }
}
