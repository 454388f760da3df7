//! Acknowledged delivery (PROTOCOL.md §11), without sockets: a push written
//! to a `client_ack` session is leased, not done, until a session of its
//! member acks it; a lease that lapses (its time is up, or every session it
//! was written to is gone) puts the envelope back in its member's held
//! queue, in its creation-order place, to be pushed again with
//! `redelivered:true`.
//!
//! Leases belong to the member (an ack from any of its sessions, on any
//! shard, ends one), so they live in its directory entry behind a lock
//! taken once per leased write and per ack. Each session keeps the list
//! of what it holds, for its bound and for its close.
use super::Envelope;
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A session a lease was written to: `conn` on `shard`.
pub type Holder = (usize, u64);

struct Lease {
    envelope: Arc<Envelope>,
    /// Sessions it was written to that have not closed.
    holders: Vec<Holder>,
    /// Tells timers and sessions' lists whether this is still their lease.
    token: u64,
}

/// What writing a push to a `client_ack` session did.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// A new lease: its timer starts now, and its row must be stored if it
    /// is not already.
    New(u64),
    /// Another session of the member holds it already (both got it live).
    Joined(u64),
}

impl Opened {
    pub fn token(&self) -> u64 {
        match self {
            Opened::New(token) | Opened::Joined(token) => *token,
        }
    }
}

/// A member's open leases, by message id.
#[derive(Default)]
pub struct MemberLeases {
    leases: Mutex<FxHashMap<Box<str>, Lease>>,
    next_token: AtomicU64,
}

impl MemberLeases {
    fn lock(&self) -> MutexGuard<'_, FxHashMap<Box<str>, Lease>> {
        self.leases.lock().expect("leases lock")
    }

    /// `envelope`'s push was written to `holder`.
    pub fn open(&self, envelope: &Arc<Envelope>, holder: Holder) -> Opened {
        let mut leases = self.lock();
        if let Some(lease) = leases.get_mut(&envelope.message_id) {
            if !lease.holders.contains(&holder) {
                lease.holders.push(holder);
            }
            return Opened::Joined(lease.token);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        leases.insert(
            envelope.message_id.clone(),
            Lease {
                envelope: envelope.clone(),
                holders: vec![holder],
                token,
            },
        );
        Opened::New(token)
    }

    /// A client ack: ends the lease on `message_id` if the member has one.
    pub fn ack(&self, message_id: &str) -> Option<Arc<Envelope>> {
        self.lock().remove(message_id).map(|lease| lease.envelope)
    }

    /// The lease's time is up: it lapses, if it is still the one `token`
    /// names (not acked, and not lapsed and leased again meanwhile).
    pub fn expire(&self, message_id: &str, token: u64) -> Option<Arc<Envelope>> {
        let mut leases = self.lock();
        if leases.get(message_id)?.token != token {
            return None;
        }
        leases.remove(message_id).map(|lease| lease.envelope)
    }

    /// Session `holder` closed holding `held`: it lets go of each; those
    /// nobody holds any more lapse and are returned.
    pub fn release(&self, holder: Holder, held: &[(Box<str>, u64)]) -> Vec<Arc<Envelope>> {
        let mut leases = self.lock();
        let mut lapsed = Vec::new();
        for (message_id, token) in held {
            let Some(lease) = leases.get_mut(message_id) else {
                continue;
            };
            if lease.token != *token {
                continue;
            }
            lease.holders.retain(|h| *h != holder);
            if lease.holders.is_empty() {
                let lease = leases.remove(message_id).expect("present");
                lapsed.push(lease.envelope);
            }
        }
        lapsed
    }

    /// Whether `token` is still open on `message_id` (a session's list
    /// forgets what was acked elsewhere lazily, through this).
    pub fn is_open(&self, message_id: &str, token: u64) -> bool {
        self.lock()
            .get(message_id)
            .is_some_and(|l| l.token == token)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The member's envelopes to be pushed again after a lapsed lease: their
/// next push says `redelivered:true`.
#[derive(Default)]
pub struct Redeliveries {
    ids: Mutex<FxHashSet<Box<str>>>,
    /// So a push asks without the lock while there are none.
    count: AtomicUsize,
}

impl Redeliveries {
    fn lock(&self) -> MutexGuard<'_, FxHashSet<Box<str>>> {
        self.ids.lock().expect("redeliveries lock")
    }

    pub fn add(&self, message_id: &str) {
        if self.lock().insert(message_id.into()) {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn contains(&self, message_id: &str) -> bool {
        self.count.load(Ordering::Acquire) != 0 && self.lock().contains(message_id)
    }

    /// It was pushed again and is done (acked, or written to a session
    /// without leases), or it expired.
    pub fn remove(&self, message_id: &str) {
        if self.count.load(Ordering::Acquire) != 0 && self.lock().remove(message_id) {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What one `client_ack` session holds: the leases written to it, for its
/// bound (count and bytes) and to let go of them when it closes. Entries
/// acked through another session are forgotten lazily (`prune`).
#[derive(Default)]
pub struct SessionLeases {
    held: Vec<(Box<str>, u64, u32)>,
    bytes: usize,
}

impl SessionLeases {
    pub fn add(&mut self, message_id: &str, token: u64, bytes: usize) {
        self.held.push((message_id.into(), token, bytes as u32));
        self.bytes += bytes;
    }

    /// Forgets the leases `is_open` says are over (acked, or lapsed).
    pub fn prune(&mut self, is_open: impl Fn(&str, u64) -> bool) {
        let mut freed = 0;
        self.held.retain(|(id, token, bytes)| {
            let open = is_open(id, *token);
            if !open {
                freed += *bytes as usize;
            }
            open
        });
        self.bytes -= freed;
    }

    /// One was acked through this session.
    pub fn forget(&mut self, message_id: &str) {
        if let Some(i) = self.held.iter().position(|(id, ..)| &**id == message_id) {
            let (_, _, bytes) = self.held.swap_remove(i);
            self.bytes -= bytes as usize;
        }
    }

    /// Whether `bytes` more would stay within `max_count` leases and
    /// `max_bytes`.
    pub fn has_room(&self, bytes: usize, max_count: usize, max_bytes: usize) -> bool {
        self.held.len() < max_count && self.bytes + bytes <= max_bytes
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// At close: every lease it held, as `(message id, token)`.
    pub fn take(&mut self) -> Vec<(Box<str>, u64)> {
        self.bytes = 0;
        self.held
            .drain(..)
            .map(|(id, token, _)| (id, token))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};
    use crate::mesh::{Envelope, EnvelopeTarget};
    use crate::protocol::Priority;
    use std::time::{Instant, SystemTime};

    fn envelope(id: &str) -> Arc<Envelope> {
        let rows = [MemberRow {
            id: "a".into(),
            peer_pubkey: "aa".into(),
            ..MemberRow::default()
        }];
        let mesh = Directory::default().install("m", &rows);
        let sender = mesh.view().member("a").unwrap().clone();
        Arc::new(Envelope {
            message_id: id.into(),
            mesh,
            sender,
            target: EnvelopeTarget::Many("*".into()),
            priority: Priority::Now,
            created_at: SystemTime::now(),
            expires_at: SystemTime::now(),
            frame: bytes::Bytes::from_static(b"0123456789"),
            nonce: 0..0,
            ciphertext: 0..0,
            sent_at: Instant::now(),
            restored: false,
            holds_in_flight: Default::default(),
            redelivered_frame: Default::default(),
            client_message_id: None,
            session: None,
        })
    }

    #[test]
    fn a_lease_ends_by_ack_by_time_or_when_no_session_holds_it() {
        let leases = MemberLeases::default();
        let (m1, m2, m3) = (envelope("m1"), envelope("m2"), envelope("m3"));
        let t1 = leases.open(&m1, (0, 1)).token();
        assert_eq!(leases.open(&m1, (1, 7)), Opened::Joined(t1));
        let t2 = leases.open(&m2, (0, 1)).token();
        let t3 = leases.open(&m3, (0, 1)).token();
        // An ack ends it once; a later ack of it is ignored.
        assert!(leases.ack("m2").is_some());
        assert!(leases.ack("m2").is_none());
        assert!(!leases.is_open("m2", t2));
        // Its time: only with its own token.
        assert!(leases.expire("m3", t3 + 100).is_none());
        assert!(leases.expire("m3", t3).is_some());
        // m1 was written to two sessions: it lapses when both are gone.
        assert!(leases.release((0, 1), &[("m1".into(), t1)]).is_empty());
        let lapsed = leases.release((1, 7), &[("m1".into(), t1)]);
        assert_eq!(lapsed.len(), 1);
        assert!(leases.is_empty());
    }

    #[test]
    fn a_sessions_bound_forgets_what_was_acked_elsewhere() {
        let mut held = SessionLeases::default();
        held.add("m1", 1, 600);
        held.add("m2", 2, 600);
        assert!(!held.has_room(1, 2, 10_000));
        assert!(!held.has_room(1, 10, 1000));
        held.prune(|id, _| id == "m2");
        assert_eq!((held.len(), held.bytes()), (1, 600));
        assert!(held.has_room(1, 2, 10_000));
        held.forget("m2");
        assert!(held.is_empty());
        held.add("m3", 3, 10);
        assert_eq!(held.take(), vec![("m3".into(), 3)]);
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn redeliveries_are_marked_until_done() {
        let marks = Redeliveries::default();
        assert!(!marks.contains("m1"));
        marks.add("m1");
        marks.add("m1");
        assert!(marks.contains("m1"));
        marks.remove("m1");
        assert!(!marks.contains("m1"));
        marks.remove("m1");
    }
}
