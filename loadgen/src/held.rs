//! The `held` scenario's accounting: who is offline, what each send owes
//! whom, and the exactly-once check by the broker's `messageId` (every
//! acked envelope reaches each of its recipient members exactly once).
use crate::wire::SendTemplate;
use std::collections::HashMap;

/// A tagged id's target for a `*` send.
pub const BROADCAST: u32 = u32::MAX;

/// Message ids stored back to back (a run keeps millions of them).
#[derive(Clone, Debug, Default)]
pub struct IdLog {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl IdLog {
    pub fn push(&mut self, id: &[u8]) {
        self.bytes.extend_from_slice(id);
        self.ends.push(self.bytes.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(a, b)| &self.bytes[a as usize..b as usize])
    }
}

/// What the `held` scenario adds to a run.
pub struct HeldPlan {
    /// Per mesh: members `0..senders` are online and send; the others are
    /// offline recipients until the drain.
    pub senders: Vec<usize>,
    pub direct: SendTemplate,
    pub broadcast: SendTemplate,
    /// Every this-many-th send of a sender goes to `*`.
    pub broadcast_every: Option<u64>,
    /// End the load once a recipient has this many held sends addressed
    /// to it (the broker bounds each member's held queue).
    pub max_held_per_peer: u32,
}

impl HeldPlan {
    /// Whether a sender's send number `seq` goes to `*`.
    pub fn is_broadcast(&self, seq: u64) -> bool {
        self.broadcast_every.is_some_and(|k| seq % k == k - 1)
    }

    /// Pushes a send to `target` owes, and how many of them are held (for
    /// offline members): a direct send is held for its one recipient; `*`
    /// reaches the other online senders live.
    pub fn owed(&self, mesh: usize, mesh_size: usize, target: u32) -> (u64, u64) {
        if target == BROADCAST {
            let s = self.senders[mesh];
            ((mesh_size - 1) as u64, (mesh_size - s) as u64)
        } else {
            (1, 1)
        }
    }
}

/// One connection's held records.
#[derive(Clone, Debug, Default)]
pub struct HeldConn {
    /// An offline recipient (connects for the drain).
    pub recipient: bool,
    /// Sender side: the `messageId` of each ack, and the send's target
    /// (member index or [`BROADCAST`]), in the same order.
    pub acked: IdLog,
    pub acked_for: Vec<u32>,
    /// Every push's `messageId`, in arrival order.
    pub received: IdLog,
    /// Recipient: loadgen ns when it started connecting, and of its last push.
    pub connect_at: Option<u64>,
    pub last_push_at: Option<u64>,
}

impl HeldConn {
    pub fn new(recipient: bool) -> HeldConn {
        HeldConn {
            recipient,
            ..HeldConn::default()
        }
    }

    /// A push arrived (its `messageId`, if the broker gave one).
    pub fn record_push(&mut self, message_id: Option<&[u8]>, now: u64) {
        self.received.push(message_id.unwrap_or_default());
        if self.recipient {
            self.last_push_at = Some(now);
        }
    }

    pub fn record_ack(&mut self, message_id: &[u8], target: u32) {
        self.acked.push(message_id);
        self.acked_for.push(target);
    }
}

/// The exactly-once check, summed over meshes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactlyOnce {
    /// (messageId, member) deliveries the acks call for: one per direct
    /// ack, one per other member of the mesh per `*` ack.
    pub owed: u64,
    /// Of those, pushed (at least once).
    pub delivered: u64,
    /// Owed and never pushed.
    pub missing: u64,
    /// Pushes of a (messageId, member) beyond the first.
    pub duplicates: u64,
    /// Pushes whose messageId no ack named for that member (a send whose
    /// ack never came, a wrong recipient, a missing id).
    pub unexpected: u64,
    /// Acks that repeated a messageId another ack of the mesh had.
    pub reused_ids: u64,
}

impl ExactlyOnce {
    /// What fails the run.
    pub fn violations(&self) -> u64 {
        self.missing + self.duplicates + self.unexpected + self.reused_ids
    }
}

/// The run-wide outcome of the held checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldSummary {
    pub check: ExactlyOnce,
    /// First recipient connect → last push to a recipient, in ns.
    pub drain_ns: Option<u64>,
}

/// Merges every connection's records, keyed by (mesh, member);
/// `mesh_sizes` gives each mesh's member count.
pub fn verify(mesh_sizes: &[usize], conns: &[((u32, u32), HeldConn)]) -> HeldSummary {
    let mut out = HeldSummary::default();
    let (mut first_connect, mut last_push): (Option<u64>, Option<u64>) = (None, None);
    for (mesh, &size) in mesh_sizes.iter().enumerate() {
        let members: Vec<(u32, &HeldConn)> = conns
            .iter()
            .filter(|((m, _), _)| *m as usize == mesh)
            .map(|((_, p), c)| (*p, c))
            .collect();
        // messageId → (sender, target), over the mesh's acks.
        let mut acked: HashMap<&[u8], usize> = HashMap::new();
        let mut sends: Vec<(u32, u32)> = Vec::new();
        for &(sender, c) in &members {
            for (id, &target) in c.acked.iter().zip(&c.acked_for) {
                if acked.contains_key(id) {
                    out.check.reused_ids += 1;
                    continue;
                }
                acked.insert(id, sends.len());
                sends.push((sender, target));
                out.check.owed += if target == BROADCAST {
                    size.saturating_sub(1) as u64
                } else {
                    1
                };
            }
        }
        for &(member, c) in &members {
            if c.recipient {
                if let Some(t) = c.connect_at {
                    first_connect = Some(first_connect.map_or(t, |x| x.min(t)));
                }
                if let Some(t) = c.last_push_at {
                    last_push = Some(last_push.map_or(t, |x| x.max(t)));
                }
            }
            let mut got: Vec<usize> = Vec::with_capacity(c.received.len());
            for id in c.received.iter() {
                match acked.get(id).map(|&i| (i, sends[i])) {
                    Some((i, (sender, target)))
                        if target == member || (target == BROADCAST && sender != member) =>
                    {
                        got.push(i)
                    }
                    _ => out.check.unexpected += 1,
                }
            }
            got.sort_unstable();
            let all = got.len() as u64;
            got.dedup();
            out.check.delivered += got.len() as u64;
            out.check.duplicates += all - got.len() as u64;
        }
    }
    out.check.missing = out.check.owed - out.check.delivered;
    if let (Some(f), Some(l)) = (first_connect, last_push) {
        out.drain_ns = Some(l.saturating_sub(f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(acks: &[(&str, u32)]) -> HeldConn {
        let mut c = HeldConn::new(false);
        for &(id, target) in acks {
            c.record_ack(id.as_bytes(), target);
        }
        c
    }

    fn recipient(pushes: &[&str], connect_at: u64, last: u64) -> HeldConn {
        let mut c = HeldConn::new(true);
        c.connect_at = Some(connect_at);
        for id in pushes {
            c.record_push(Some(id.as_bytes()), last);
        }
        c
    }

    #[test]
    fn id_log_round_trips() {
        let mut log = IdLog::default();
        assert!(log.is_empty());
        for id in ["a", "", "bcd", "01kb2mz8a00003f2x1qz"] {
            log.push(id.as_bytes());
        }
        let back: Vec<&[u8]> = log.iter().collect();
        assert_eq!(
            back,
            [&b"a"[..], b"", b"bcd", b"01kb2mz8a00003f2x1qz"].to_vec()
        );
        assert_eq!(log.len(), 4);
    }

    #[test]
    fn owed_pushes_split_live_and_held() {
        let plan = HeldPlan {
            senders: vec![3],
            direct: SendTemplate::tagged(true, 0, 64),
            broadcast: SendTemplate::tagged(false, 0, 64),
            broadcast_every: Some(4),
            max_held_per_peer: 10,
        };
        // 3 senders, 7 offline: `*` reaches 2 senders live, 7 held.
        assert_eq!(plan.owed(0, 10, BROADCAST), (9, 7));
        assert_eq!(plan.owed(0, 10, 5), (1, 1));
        let every: Vec<u64> = (0..12).filter(|&s| plan.is_broadcast(s)).collect();
        assert_eq!(every, vec![3, 7, 11]);
        let never = HeldPlan {
            broadcast_every: None,
            ..plan
        };
        assert!(!(0..100).any(|s| never.is_broadcast(s)));
    }

    #[test]
    fn exactly_once_passes_when_every_ack_is_pushed_once() {
        // Mesh of 4: members 0, 1 send; 2, 3 are offline.
        let s0 = sender(&[("a", 2), ("b", 3), ("c", BROADCAST)]);
        let mut s1 = sender(&[("d", 2)]);
        s1.record_push(Some(b"c"), 50); // `*` reaches the other sender live
        let r2 = recipient(&["a", "c", "d"], 100, 400);
        let r3 = recipient(&["c", "b"], 150, 300);
        let s = verify(
            &[4],
            &[((0, 0), s0), ((0, 1), s1), ((0, 2), r2), ((0, 3), r3)],
        );
        assert_eq!(
            s.check,
            ExactlyOnce {
                owed: 6,
                delivered: 6,
                ..Default::default()
            }
        );
        assert_eq!(s.check.violations(), 0);
        // From the first recipient's connect to the last held push; the
        // sender's live push does not count.
        assert_eq!(s.drain_ns, Some(300));
    }

    #[test]
    fn missing_duplicate_and_unexpected_pushes_are_counted() {
        let mut s0 = sender(&[("a", 2), ("b", 2), ("c", BROADCAST)]);
        // `a` twice, `b` never, `c` reached 2 but not 1 (the other sender)
        // nor 3; `zz` was never acked; `c` to its own sender is wrong.
        let r2 = recipient(&["a", "a", "c", "zz"], 0, 10);
        let mut s1 = HeldConn::new(false);
        s1.record_push(None, 5);
        s0.record_push(Some(b"c"), 5);
        let r3 = recipient(&[], 0, 0);
        let s = verify(
            &[4],
            &[((0, 0), s0), ((0, 1), s1), ((0, 2), r2), ((0, 3), r3)],
        );
        assert_eq!(
            s.check,
            ExactlyOnce {
                owed: 5,
                delivered: 2,
                missing: 3,
                duplicates: 1,
                unexpected: 3,
                reused_ids: 0,
            }
        );
        assert_eq!(s.check.violations(), 7);
    }

    #[test]
    fn meshes_are_checked_apart_and_reused_ids_fail() {
        // The same id in two meshes is two envelopes; a push of mesh 0's
        // id to a member of mesh 1 is unexpected there.
        let m0 = sender(&[("x", 1)]);
        let m1 = sender(&[("x", 1), ("x", 1)]);
        let s = verify(
            &[2, 2],
            &[
                ((0, 0), m0),
                ((0, 1), recipient(&["x"], 0, 1)),
                ((1, 0), m1),
                ((1, 1), recipient(&["x"], 0, 1)),
            ],
        );
        assert_eq!(s.check.owed, 2);
        assert_eq!(s.check.delivered, 2);
        assert_eq!(s.check.reused_ids, 1);
        assert_eq!(s.check.violations(), 1);
    }
}
