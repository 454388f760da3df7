//! Accounting for the `gated` scenario (PROTOCOL.md §5: a `working` or
//! `dnd` session receives only `now`; its `next` and `low` envelopes are
//! held and arrive, in creation order, once it sets itself `idle`).
//!
//! - which peers gate themselves ([`is_working`]) and the priority mix;
//! - how one first (non-duplicate) push is judged: live, held, or a gating
//!   violation ([`judge`]);
//! - the held-order check after the idle flip ([`check_held_order`]),
//!   against two references: the order in which the *sender* got its acks
//!   (per sender; a violation fails the run), and happens-before across
//!   senders (an envelope acked before another was even sent was created
//!   first; reported, and failing with `--strict-order`: a broker that
//!   orders held envelopes by message id, whose ties within one
//!   millisecond break by shard, inverts such pairs sent microseconds
//!   apart from different shards);
//! - the run-wide merge of every connection's records ([`verify`]).
use crate::stats::Latency;
use crate::wire::{self, SendTemplate};
use anyhow::{bail, Result};
use std::collections::HashMap;

/// Priorities by index, as in [`Mix`] and the send id's last digit.
pub const PRIORITIES: [&str; 3] = ["now", "next", "low"];
pub const NOW: usize = 0;

/// Relative weights of `now`, `next` and `low` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [u32; 3],
    total: u64,
}

impl Mix {
    /// `"now:next:low"` weights, e.g. `1:1:1` or `0:3:1`.
    pub fn parse(s: &str) -> Result<Mix> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 {
            bail!("--mix must be three weights now:next:low (e.g. 1:1:1), got {s:?}");
        }
        let mut weights = [0u32; 3];
        for (w, p) in weights.iter_mut().zip(&parts) {
            *w = p
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| {
                    anyhow::anyhow!("--mix: {p:?} is not a weight (an integer 0..=1000000)")
                })?;
        }
        let total = weights.iter().map(|&w| w as u64).sum();
        if total == 0 {
            bail!("--mix: at least one weight must be positive");
        }
        Ok(Mix { weights, total })
    }

    /// The priority index for a uniform random `r`.
    pub fn pick(&self, r: u64) -> usize {
        let mut x = r % self.total;
        for (i, &w) in self.weights.iter().enumerate() {
            if x < w as u64 {
                return i;
            }
            x -= w as u64;
        }
        unreachable!("x < total")
    }

    pub fn label(&self) -> String {
        let [a, b, c] = self.weights;
        format!("mix now:next:low {a}:{b}:{c}")
    }
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            weights: [1, 1, 1],
            total: 3,
        }
    }
}

/// Whether member `p` of `n` gates itself when `working` of them do: spread
/// evenly over the member indices (with half: every odd one), so that the
/// first `--senders` members include both kinds.
pub fn is_working(p: usize, n: usize, working: usize) -> bool {
    n > 0 && (p + 1) * working / n > p * working / n
}

/// What a first (non-duplicate) push is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed at once: `now`, or any push to an idle session.
    Live,
    /// `next`/`low` to a gating session after it said `idle`.
    Held,
    /// `next`/`low` reaching a session while it is `working`/`dnd`.
    Violation,
}

/// `gating`: the session set itself working (or dnd) before the load;
/// `released`: it has since sent `set_status idle`.
pub fn judge(gating: bool, released: bool, priority: usize) -> Verdict {
    if priority == NOW || !gating {
        Verdict::Live
    } else if released {
        Verdict::Held
    } else {
        Verdict::Violation
    }
}

/// One ack a sender got for a send to a gating peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    pub seq: u32,
    /// When the ack was read (loadgen monotonic ns): the envelope was
    /// created no later than this.
    pub at_ns: u64,
}

/// One held push as it arrived at its recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub sender: u32,
    pub seq: u32,
    /// The send's timestamp from the ciphertext: the envelope was created
    /// no earlier than this.
    pub sent_ns: u64,
}

/// Result of the held-order check, summed over recipients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrderCheck {
    /// Held pushes looked at.
    pub checked: u64,
    /// Held pushes that arrived after one their sender got the ack for
    /// later (the sender's ack order is the reference).
    pub sender_order: u64,
    /// Held pushes that arrived after an envelope (any sender's) that was
    /// sent only after this one had been acked: certainly created later.
    pub creation_order: u64,
    /// Held pushes whose send the sender never saw acked (not judged).
    pub never_acked: u64,
}

impl OrderCheck {
    pub fn add(&mut self, o: &OrderCheck) {
        self.checked += o.checked;
        self.sender_order += o.sender_order;
        self.creation_order += o.creation_order;
        self.never_acked += o.never_acked;
    }
}

/// Checks one recipient's held arrivals (in arrival order) against the
/// acks each sender got for its sends to this recipient (in ack order).
///
/// A push counts as out of order once per arrival: when some envelope that
/// arrived before it ranks after it (per sender: acked later; across
/// senders: sent after this one was acked). Gaps are not order violations;
/// lost pushes are counted elsewhere.
pub fn check_held_order(held: &[Arrival], acks: &HashMap<u32, &[Acked]>) -> OrderCheck {
    // Per sender: seq → (rank in ack order, ack time).
    let mut ranks: HashMap<u32, Vec<Option<(u32, u64)>>> = HashMap::new();
    for (&sender, list) in acks {
        let len = list.iter().map(|a| a.seq as usize + 1).max().unwrap_or(0);
        let mut table = vec![None; len];
        for (rank, a) in list.iter().enumerate() {
            table[a.seq as usize] = Some((rank as u32, a.at_ns));
        }
        ranks.insert(sender, table);
    }
    let mut out = OrderCheck::default();
    let mut highest_rank: HashMap<u32, u32> = HashMap::new();
    let mut latest_sent = 0u64;
    for a in held {
        out.checked += 1;
        latest_sent = latest_sent.max(a.sent_ns);
        let Some((rank, acked_at)) = ranks
            .get(&a.sender)
            .and_then(|t| t.get(a.seq as usize).copied().flatten())
        else {
            out.never_acked += 1;
            continue;
        };
        match highest_rank.get_mut(&a.sender) {
            Some(h) if rank < *h => out.sender_order += 1,
            Some(h) => *h = rank,
            None => {
                highest_rank.insert(a.sender, rank);
            }
        }
        // `latest_sent` includes this arrival's own send time, which is
        // always before its ack: only an earlier arrival can trip this.
        if acked_at < latest_sent {
            out.creation_order += 1;
        }
    }
    out
}

/// What the `gated` scenario adds to a run.
pub struct GatePlan {
    /// Per mesh, per member: whether it gates itself.
    pub working: Vec<Vec<bool>>,
    pub mix: Mix,
    /// One send template per priority (tagged ids, priority marker).
    pub templates: [SendTemplate; 3],
    /// `set_status` to `working` or `dnd`, and back to `idle`.
    pub gate_frame: Vec<u8>,
    pub idle_frame: Vec<u8>,
    /// Stop the load once a gating peer has this many held sends addressed
    /// to it (the broker's per-member held queue is bounded).
    pub max_held_per_peer: u32,
}

impl GatePlan {
    pub fn new(
        working: Vec<Vec<bool>>,
        mix: Mix,
        status: &str,
        payload: usize,
        max_held_per_peer: u32,
    ) -> GatePlan {
        GatePlan {
            working,
            mix,
            templates: [0, 1, 2].map(|p| SendTemplate::gated(p, payload)),
            gate_frame: wire::set_status_frame(status),
            idle_frame: wire::set_status_frame("idle"),
            max_held_per_peer,
        }
    }
}

/// One connection's gated records.
#[derive(Clone, Debug, Default)]
pub struct GateConn {
    /// This session sets itself working/dnd before the load.
    pub working: bool,
    /// Loadgen ns when it sent `set_status idle`.
    pub released_at: Option<u64>,
    /// Loadgen ns of its last held push.
    pub last_held_at: Option<u64>,
    /// Sender side, per target member (empty for idle targets): the acks
    /// for sends to gating peers, in the order they came.
    pub acks: Vec<Vec<Acked>>,
    /// Recipient side: held pushes in arrival order.
    pub held: Vec<Arrival>,
}

impl GateConn {
    pub fn new(working: bool, mesh_size: usize) -> GateConn {
        GateConn {
            working,
            acks: vec![Vec::new(); mesh_size],
            ..GateConn::default()
        }
    }
}

/// The run-wide outcome of the gated checks.
#[derive(Clone, Default)]
pub struct GateSummary {
    pub order: OrderCheck,
    /// From the first idle flip to the last held push, in ns.
    pub drain_ns: Option<u64>,
    /// Per gating peer that got held pushes: its flip to its last one.
    pub drain_per_peer: Latency,
}

/// Merges every connection's records, keyed by (mesh, member).
pub fn verify(conns: &[((u32, u32), GateConn)]) -> GateSummary {
    let by_member: HashMap<(u32, u32), &GateConn> = conns.iter().map(|(k, c)| (*k, c)).collect();
    let mut out = GateSummary::default();
    let mut first_flip: Option<u64> = None;
    let mut last_held: Option<u64> = None;
    for (&(mesh, member), c) in &by_member {
        if let Some(f) = c.released_at {
            first_flip = Some(first_flip.map_or(f, |x| x.min(f)));
        }
        if let Some(l) = c.last_held_at {
            last_held = Some(last_held.map_or(l, |x| x.max(l)));
            if let Some(f) = c.released_at {
                out.drain_per_peer.record_since(f, l);
            }
        }
        if c.held.is_empty() {
            continue;
        }
        let acks: HashMap<u32, &[Acked]> = c
            .held
            .iter()
            .map(|a| a.sender)
            .filter_map(|s| {
                let sender = by_member.get(&(mesh, s))?;
                Some((s, sender.acks.get(member as usize)?.as_slice()))
            })
            .collect();
        out.order.add(&check_held_order(&c.held, &acks));
    }
    if let (Some(f), Some(l)) = (first_flip, last_held) {
        out.drain_ns = Some(l.saturating_sub(f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(seqs: &[(u32, u64)]) -> Vec<Acked> {
        seqs.iter()
            .map(|&(seq, at_ns)| Acked { seq, at_ns })
            .collect()
    }

    fn arrivals(list: &[(u32, u32, u64)]) -> Vec<Arrival> {
        list.iter()
            .map(|&(sender, seq, sent_ns)| Arrival {
                sender,
                seq,
                sent_ns,
            })
            .collect()
    }

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let m = Mix::parse("1:1:1").unwrap();
        assert_eq!(m, Mix::default());
        let mut counts = [0u64; 3];
        for r in 0..3000u64 {
            counts[m.pick(r)] += 1;
        }
        assert_eq!(counts, [1000, 1000, 1000]);
        let only_held = Mix::parse("0:3:1").unwrap();
        let mut counts = [0u64; 3];
        for r in 0..400u64 {
            counts[only_held.pick(r)] += 1;
        }
        assert_eq!(counts, [0, 300, 100]);
        assert_eq!(only_held.label(), "mix now:next:low 0:3:1");
        for bad in ["", "1:1", "1:1:1:1", "0:0:0", "a:1:1", "-1:1:1"] {
            assert!(Mix::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn working_peers_are_spread_evenly() {
        let half: Vec<usize> = (0..10).filter(|&p| is_working(p, 10, 5)).collect();
        assert_eq!(half, vec![1, 3, 5, 7, 9]);
        for (n, w) in [(100, 50), (7, 3), (2, 1), (5, 5), (5, 0), (1000, 1)] {
            assert_eq!((0..n).filter(|&p| is_working(p, n, w)).count(), w);
        }
    }

    #[test]
    fn gating_violations_are_next_and_low_before_the_flip() {
        use Verdict::*;
        // An idle session may get anything, at any time.
        for p in 0..3 {
            assert_eq!(judge(false, false, p), Live);
        }
        // A working session: `now` is live; next/low are violations
        // until it said idle, held afterwards.
        assert_eq!(judge(true, false, NOW), Live);
        assert_eq!(judge(true, false, 1), Violation);
        assert_eq!(judge(true, false, 2), Violation);
        assert_eq!(judge(true, true, 1), Held);
        assert_eq!(judge(true, true, 2), Held);
        assert_eq!(judge(true, true, NOW), Live);
    }

    #[test]
    fn held_order_follows_each_senders_ack_order() {
        // Sender 3's acks came 0, 2, 1 (the broker may answer out of send
        // order): that, not the sequence number, is the reference.
        let a3 = acked(&[(0, 100), (2, 110), (1, 120)]);
        let acks = HashMap::from([(3, a3.as_slice())]);
        let in_order = arrivals(&[(3, 0, 10), (3, 2, 11), (3, 1, 12)]);
        assert_eq!(
            check_held_order(&in_order, &acks),
            OrderCheck {
                checked: 3,
                ..Default::default()
            }
        );
        // 1 before 2: 2 arrives after an envelope acked after it.
        let swapped = arrivals(&[(3, 0, 10), (3, 1, 12), (3, 2, 11)]);
        let c = check_held_order(&swapped, &acks);
        assert_eq!((c.sender_order, c.creation_order), (1, 0));
        // The last acked first: each of the others counts.
        let reversed = arrivals(&[(3, 1, 12), (3, 2, 11), (3, 0, 10)]);
        assert_eq!(check_held_order(&reversed, &acks).sender_order, 2);
    }

    #[test]
    fn held_order_across_senders_uses_happens_before() {
        // Sender 1's seq 0 was acked at 100; sender 2 sent its seq 1 at 90
        // (before that ack) and its seq 0 at 150 (after it).
        let a1 = acked(&[(0, 100)]);
        let a2 = acked(&[(1, 120), (0, 160)]);
        let acks = HashMap::from([(1, a1.as_slice()), (2, a2.as_slice())]);
        // Delivering 2:1 (sent at 90, concurrent with 1:0) first is fine.
        let ok = arrivals(&[(2, 1, 90), (1, 0, 50), (2, 0, 150)]);
        let c = check_held_order(&ok, &acks);
        assert_eq!(
            c,
            OrderCheck {
                checked: 3,
                ..Default::default()
            }
        );
        // 2:0 was sent after 1:0 was acked: delivering it first is wrong.
        let bad = arrivals(&[(2, 0, 150), (1, 0, 50)]);
        let c = check_held_order(&bad, &acks);
        assert_eq!((c.creation_order, c.sender_order), (1, 0), "{c:?}");
    }

    #[test]
    fn unacked_held_pushes_are_not_judged() {
        let a = acked(&[(0, 100)]);
        let acks = HashMap::from([(0, a.as_slice())]);
        let held = arrivals(&[(0, 5, 10), (7, 0, 10), (0, 0, 10)]);
        let c = check_held_order(&held, &acks);
        assert_eq!(
            c,
            OrderCheck {
                checked: 3,
                never_acked: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn verify_merges_senders_and_recipients() {
        // Mesh 0: member 0 sends to member 1 (gating); member 1 got 1 and
        // then 0, which member 0 had acked in the order 0, 1.
        let mut sender = GateConn::new(false, 2);
        sender.acks[1] = acked(&[(0, 100), (1, 200)]);
        let mut recipient = GateConn::new(true, 2);
        recipient.released_at = Some(1_000);
        recipient.held = arrivals(&[(0, 1, 150), (0, 0, 50)]);
        recipient.last_held_at = Some(4_000);
        // Another gating peer, released later, that got nothing held.
        let mut other = GateConn::new(true, 2);
        other.released_at = Some(1_500);
        let s = verify(&[((0, 0), sender), ((0, 1), recipient), ((1, 0), other)]);
        assert_eq!(s.order.checked, 2);
        assert_eq!(s.order.sender_order, 1);
        // 0:1 was sent at 150, after 0:0's ack at 100.
        assert_eq!(s.order.creation_order, 1);
        assert_eq!(s.drain_ns, Some(3_000));
        assert_eq!(s.drain_per_peer.len(), 1);
    }
}
