//! Envelopes held for a member none of whose sessions could take them now:
//! one queue per priority, each in creation order, served merged by
//! creation order over the priorities a session accepts, so a `now` held
//! behind a `next` still reaches a working session. Each envelope is
//! delivered once.
use super::Envelope;
use crate::protocol::Priority;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Which of a member's held-queue bounds a send would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldLimit {
    /// `MAX_HELD_PER_MEMBER` envelopes.
    Count,
    /// `MAX_HELD_BYTES_PER_MEMBER` of push frames.
    Bytes,
}

impl HeldLimit {
    pub const ALL: [HeldLimit; 2] = [HeldLimit::Count, HeldLimit::Bytes];

    pub fn as_str(self) -> &'static str {
        match self {
            HeldLimit::Count => "count",
            HeldLimit::Bytes => "bytes",
        }
    }
}

/// Bytes of held envelopes accepted but not yet committed to Postgres
/// (`MAX_HELD_MEMORY_BYTES`): a send that must be held reserves its frame
/// here and is refused (`unavailable`) over the bound; the db writer
/// releases it once the row is committed. What became held after its ack
/// is forced in: it cannot be refused any more.
#[derive(Debug)]
pub struct HeldBudget {
    used: AtomicUsize,
    max: usize,
}

impl HeldBudget {
    pub fn new(max: usize) -> Self {
        HeldBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    pub fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.max).then_some(used + bytes)
            })
            .is_ok()
    }

    pub fn force(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// At or over its bound (forced holds and leases may pass it).
    pub fn is_full(&self) -> bool {
        self.used() >= self.max
    }
}

/// What a drain decides about the oldest held envelope it may consider.
pub enum Take {
    /// Deliver it now.
    Yes,
    /// No session here accepts this priority: look at the others.
    SkipPriority,
    /// A session accepts it but has no room: stop, keeping order.
    Stop,
}

/// Bit of a priority in `HeldQueue::nonempty`.
pub fn priority_bit(p: Priority) -> u8 {
    1 << p.index()
}

pub struct HeldQueue {
    queues: Mutex<[VecDeque<Arc<Envelope>>; 3]>,
    /// Priorities with something held, so writers can ask "anything for
    /// me?" after every socket write without taking the lock.
    nonempty: AtomicU8,
    /// How many are held, so a send's room check (`MemberEntry::has_room`,
    /// once per offline member of a broadcast) takes no lock.
    count: AtomicUsize,
    /// Push-frame bytes held, for the same lock-free room check.
    bytes: AtomicUsize,
    /// Envelopes held across the broker (`broker_queue_depth`): every
    /// change of a held queue goes through here, so the gauge is kept in
    /// one place.
    depth: Arc<AtomicI64>,
}

impl HeldQueue {
    pub fn new(depth: Arc<AtomicI64>) -> Self {
        HeldQueue {
            queues: Mutex::new(Default::default()),
            nonempty: AtomicU8::new(0),
            count: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            depth,
        }
    }

    /// Holds an envelope in its creation-order place and returns what
    /// `eligible` (the shards that may take its priority) says right after,
    /// still under the lock. A session that becomes eligible marks its
    /// shard before it drains, so either that drain sees this envelope or
    /// the caller sees the shard and asks it to drain: nothing is stranded.
    pub fn hold(&self, envelope: Arc<Envelope>, eligible: impl FnOnce(Priority) -> u64) -> u64 {
        let priority = envelope.priority;
        let mut queues = self.queues.lock().expect("held lock");
        self.bytes
            .fetch_add(envelope.frame.len(), Ordering::Release);
        insert_in_order(&mut queues[priority.index()], envelope);
        self.publish(&queues);
        self.depth.fetch_add(1, Ordering::Relaxed);
        eligible(priority)
    }

    /// Puts back envelopes that were taken out or handed back by a cut-off
    /// session, each in its creation-order place.
    pub fn hand_back(&self, envelopes: Vec<Arc<Envelope>>) {
        if envelopes.is_empty() {
            return;
        }
        let count = envelopes.len() as i64;
        let mut queues = self.queues.lock().expect("held lock");
        for envelope in envelopes {
            self.bytes
                .fetch_add(envelope.frame.len(), Ordering::Release);
            insert_in_order(&mut queues[envelope.priority.index()], envelope);
        }
        self.publish(&queues);
        self.depth.fetch_add(count, Ordering::Relaxed);
    }

    /// Takes the oldest envelope (by creation, across priorities) that
    /// `decide` accepts; priorities it skips are passed over, a `Stop`
    /// ends the search. An expired envelope met on the way is never
    /// offered: it goes to `expired`.
    pub fn take_next(
        &self,
        now: SystemTime,
        expired: &mut Vec<Arc<Envelope>>,
        mut decide: impl FnMut(&Envelope) -> Take,
    ) -> Option<Arc<Envelope>> {
        let mut queues = self.queues.lock().expect("held lock");
        let mut skipped = 0u8;
        loop {
            let oldest = (0..3)
                .filter(|&i| skipped & (1 << i) == 0)
                .filter_map(|i| queues[i].front().map(|e| (i, e)))
                .min_by(|a, b| order(a.1).cmp(&order(b.1)))?;
            let index = oldest.0;
            if oldest.1.is_expired(now) {
                expired.extend(queues[index].pop_front().map(|e| self.taken(e)));
                self.publish(&queues);
                self.depth.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            match decide(oldest.1) {
                Take::Yes => {
                    let envelope = queues[index].pop_front().map(|e| self.taken(e));
                    self.publish(&queues);
                    self.depth.fetch_sub(1, Ordering::Relaxed);
                    return envelope;
                }
                Take::SkipPriority => skipped |= 1 << index,
                Take::Stop => return None,
            }
        }
    }

    /// Drops every expired envelope (the 15 s sweep), returning them.
    pub fn expire(&self, now: SystemTime) -> Vec<Arc<Envelope>> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut queues = self.queues.lock().expect("held lock");
        let mut expired = Vec::new();
        for queue in queues.iter_mut() {
            queue.retain(|e| {
                let gone = e.is_expired(now);
                if gone {
                    expired.push(self.taken(e.clone()));
                }
                !gone
            });
        }
        if !expired.is_empty() {
            self.publish(&queues);
            self.depth
                .fetch_sub(expired.len() as i64, Ordering::Relaxed);
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Push-frame bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Whether one more envelope of `bytes` stays within `max_count` and
    /// `max_bytes`; read without the lock, so concurrent sends on other
    /// shards may pass a bound by what they hold at the same moment.
    pub fn room_for(
        &self,
        bytes: usize,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<(), HeldLimit> {
        if self.len() >= max_count {
            Err(HeldLimit::Count)
        } else if self.bytes() + bytes > max_bytes {
            Err(HeldLimit::Bytes)
        } else {
            Ok(())
        }
    }

    /// Accounts for an envelope leaving the queues (under the lock).
    fn taken(&self, envelope: Arc<Envelope>) -> Arc<Envelope> {
        self.bytes
            .fetch_sub(envelope.frame.len(), Ordering::Release);
        envelope
    }

    pub fn is_empty(&self) -> bool {
        self.nonempty.load(Ordering::Acquire) == 0
    }

    /// Whether anything is held in the priorities of `mask` (`priority_bit`s).
    pub fn has_any(&self, mask: u8) -> bool {
        self.nonempty.load(Ordering::Acquire) & mask != 0
    }

    fn publish(&self, queues: &[VecDeque<Arc<Envelope>>; 3]) {
        let mask = (0..3)
            .filter(|&i| !queues[i].is_empty())
            .fold(0, |m, i| m | (1 << i));
        self.nonempty.store(mask, Ordering::Release);
        let count = queues.iter().map(VecDeque::len).sum();
        self.count.store(count, Ordering::Release);
    }
}

impl Drop for HeldQueue {
    fn drop(&mut self) {
        let left = self.len() as i64;
        self.depth.fetch_sub(left, Ordering::Relaxed);
    }
}

/// Creation order. What an earlier run left comes first, by its stored
/// creation time; then what this run read, by when it was read on the one
/// monotonic clock all shards share; the id breaks ties. (Ids alone sort by
/// millisecond, then shard: within one millisecond an envelope read on
/// shard 0 would sort before one read earlier on shard 1, even one whose
/// ack its sender had already seen.)
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Order<'a> {
    Restored(std::time::SystemTime, &'a str),
    Read(std::time::Instant, &'a str),
}

fn order(envelope: &Envelope) -> Order<'_> {
    if envelope.restored {
        Order::Restored(envelope.created_at, &envelope.message_id)
    } else {
        Order::Read(envelope.sent_at, &envelope.message_id)
    }
}

/// The common case (newest) appends.
fn insert_in_order(queue: &mut VecDeque<Arc<Envelope>>, envelope: Arc<Envelope>) {
    match queue.back() {
        Some(last) if order(last) > order(&envelope) => {
            let at = queue.partition_point(|e| order(e) < order(&envelope));
            queue.insert(at, envelope);
        }
        _ => queue.push_back(envelope),
    }
}
