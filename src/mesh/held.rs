//! Envelopes held for a member none of whose sessions could take them, in
//! creation order, each to be delivered once.
use super::Envelope;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Per-member bound, so one member that never connects cannot eat the heap;
/// a send that would go over it is answered `unavailable`.
pub const MAX_HELD_PER_MEMBER: usize = 10_000;

#[derive(Debug, PartialEq, Eq)]
pub struct HeldFull;

#[derive(Default)]
pub struct HeldQueue {
    queue: Mutex<VecDeque<Arc<Envelope>>>,
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
        Ok(live_shards())
    }

    /// Takes every held envelope, oldest first.
    pub fn take_all(&self) -> VecDeque<Arc<Envelope>> {
        std::mem::take(&mut *self.queue.lock().expect("held lock"))
    }

    pub fn len(&self) -> usize {
        self.queue.lock().expect("held lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
