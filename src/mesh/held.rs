//! Envelopes held for a member none of whose sessions could take them, in
//! creation order, each to be delivered once.
use super::Envelope;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Per-member bound, so one member that never connects cannot eat the heap;
/// a send that would go over it is answered `unavailable`.
pub const MAX_HELD_PER_MEMBER: usize = 10_000;

#[derive(Debug, PartialEq, Eq)]
pub struct HeldFull;

#[derive(Default)]
pub struct HeldQueue {
    queue: Mutex<VecDeque<Arc<Envelope>>>,
    /// Mirrors the queue's length, so writers can ask "anything held?"
    /// after every socket write without taking the lock.
    len: AtomicUsize,
}

impl HeldQueue {
    /// Appends under the lock and returns what `live_shards()` says right
    /// after, still under the lock. A session's hello marks its shard live
    /// before it drains, so either the drain sees this envelope or the caller
    /// sees the new shard and asks it to drain: nothing is stranded.
    pub fn hold(
        &self,
        envelope: Arc<Envelope>,
        live_shards: impl FnOnce() -> u64,
    ) -> Result<u64, HeldFull> {
        let mut queue = self.queue.lock().expect("held lock");
        if queue.len() >= MAX_HELD_PER_MEMBER {
            return Err(HeldFull);
        }
        queue.push_back(envelope);
        self.len.store(queue.len(), Ordering::Release);
        Ok(live_shards())
    }

    /// Takes the oldest envelope if `accept` agrees (a session has room).
    pub fn pop_front_if(&self, accept: impl FnOnce(&Envelope) -> bool) -> Option<Arc<Envelope>> {
        let mut queue = self.queue.lock().expect("held lock");
        let envelope = queue.pop_front_if(|envelope| accept(envelope))?;
        self.len.store(queue.len(), Ordering::Release);
        Some(envelope)
    }

    /// Puts envelopes taken out (or handed back by a cut-off session) back
    /// at the front, oldest first, ahead of anything held meanwhile.
    pub fn push_front(&self, envelopes: Vec<Arc<Envelope>>) {
        let mut queue = self.queue.lock().expect("held lock");
        for envelope in envelopes.into_iter().rev() {
            queue.push_front(envelope);
        }
        self.len.store(queue.len(), Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
