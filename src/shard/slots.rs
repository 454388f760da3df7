//! `MAX_CONNECTIONS`: one count of open sockets shared by every shard, and
//! the guard an accepted socket holds for its whole life.
//!
//! The count is a plain atomic in the `BrokerContext`, claimed with a
//! compare-and-swap in the accept loop (so two shards racing for the last
//! slot cannot both win) and given back when the guard drops, whatever way
//! the connection ends (close, error, shutdown, a panic unwinding the task).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Open sockets over all shards, bounded by `MAX_CONNECTIONS`.
#[derive(Debug)]
pub struct ConnectionSlots {
    max: usize,
    open: AtomicUsize,
}

/// One claimed slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    slots: Arc<ConnectionSlots>,
}

impl ConnectionSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            max,
            open: AtomicUsize::new(0),
        })
    }

    /// A slot for a newly accepted socket, or `None` when `max` are open.
    pub fn try_claim(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot {
                slots: self.clone(),
            })
    }

    /// Sockets holding a slot now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_up_to_max_and_frees_on_drop() {
        let slots = ConnectionSlots::new(2);
        let a = slots.try_claim().expect("first");
        let b = slots.try_claim().expect("second");
        assert!(slots.try_claim().is_none(), "a third is over the limit");
        assert_eq!(slots.open(), 2);
        drop(a);
        assert_eq!(slots.open(), 1);
        let c = slots.try_claim().expect("a freed slot is claimable again");
        drop((b, c));
        assert_eq!(slots.open(), 0);
    }

    #[test]
    fn racing_threads_never_exceed_max() {
        let slots = ConnectionSlots::new(8);
        let held: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter_map(|_| slots.try_claim())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(held.len(), 8);
        assert_eq!(slots.open(), 8);
        drop(held);
        assert_eq!(slots.open(), 0);
    }
}
