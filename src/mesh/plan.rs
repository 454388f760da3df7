//! Planning a send on the sender's shard: the envelope goes live to the
//! shards with a session that may take its priority, and is held now for
//! every target member with none. A direct route names its member; a
//! broadcast names the mesh and whom to skip, so planning clones nothing
//! per member and each shard walks only its own sessions of the mesh; a
//! group send is a broadcast restricted to the group's members, planned by
//! the same code, whose route lists the members it is live for.
use super::directory::MemberEntry;
use super::held::{HeldBudget, HeldLimit};
use super::peers::SessionEntry;
use super::Envelope;
use crate::protocol::{GroupName, Priority};
use std::sync::Arc;

/// Why a send was refused before anything of it was routed or held.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// A target member's held queue is at `MAX_HELD_PER_MEMBER` envelopes
    /// or would pass `MAX_HELD_BYTES_PER_MEMBER`.
    HeldFull(HeldLimit),
    /// Holding it would pass `MAX_HELD_MEMORY_BYTES` of envelopes not yet
    /// committed (Postgres is slow or away).
    Unavailable,
    /// A group send whose group has no member but the sender's.
    NobodyInGroup,
}

/// The bounds a send that must be held is checked against.
pub struct HoldLimits<'a> {
    pub max_per_member: usize,
    pub max_bytes_per_member: usize,
    pub budget: &'a HeldBudget,
}

impl HoldLimits<'_> {
    /// Whether `member` may hold `envelope` too.
    fn room(&self, member: &MemberEntry, envelope: &Envelope) -> Result<(), Refused> {
        member
            .held
            .room_for(
                envelope.frame.len(),
                self.max_per_member,
                self.max_bytes_per_member,
            )
            .map_err(Refused::HeldFull)
    }

    /// Reserves the envelope's bytes in the budget (released once its row
    /// is committed) and counts its hold in flight.
    fn reserve(&self, envelope: &Envelope) -> Result<(), Refused> {
        if self.budget.try_reserve(envelope.frame.len()) {
            envelope.hold_in_flight();
            Ok(())
        } else {
            Err(Refused::Unavailable)
        }
    }
}

/// The shards that may take `priority` for `member` now; none while the
/// mesh's earlier held envelopes are loading (`restoring`, read once per
/// send), so new sends queue behind them.
fn eligible(restoring: bool, member: &MemberEntry, priority: Priority) -> u64 {
    if restoring {
        0
    } else {
        member.shards_for(priority)
    }
}

/// Who a route is for.
pub enum Targets {
    /// One member.
    Member(Arc<MemberEntry>),
    /// One session, addressed by its key (PROTOCOL.md §9): only that
    /// session may take it.
    Session(Arc<SessionEntry>),
    /// One session of another node, by its key: that node finds it.
    RemoteSession {
        member: Arc<MemberEntry>,
        key: Box<str>,
    },
    /// Every member of the mesh but the sender's and those the envelope
    /// was held for (sorted entry addresses), as each shard finds them.
    AllBut { held_for: Vec<usize> },
    /// The members of a group it goes to live (sorted entry addresses):
    /// membership is decided once, here, whatever joins or leaves while
    /// the route is in flight.
    Listed { members: Vec<usize> },
}

/// Whom a send to several members is for, besides never the sender's member.
#[derive(Clone, Copy)]
pub enum Audience<'a> {
    /// `*` and `@all`.
    All,
    /// `@group` and `#group`: its members and those of the groups below it.
    Group(&'a GroupName),
}

impl Audience<'_> {
    fn includes(self, member: &MemberEntry) -> bool {
        match self {
            Audience::All => true,
            Audience::Group(group) => member.is_reached_by(group),
        }
    }
}

/// What a send routes live; shared (`Arc`) by every shard it names.
pub struct Route {
    pub envelope: Arc<Envelope>,
    pub targets: Targets,
    /// The shards this route goes to: a shard that finds no local taker
    /// leaves the envelope to another one only if that one is named here.
    pub shards: u64,
}

/// The outcome of planning one send.
#[derive(Default)]
pub struct Plan {
    pub route: Option<Arc<Route>>,
    /// Members the envelope was held for, with the shards that became able
    /// to take it meanwhile (non-zero: ask one of them to drain). When not
    /// empty, the envelope's bytes are reserved in the budget and its ack
    /// waits for its row to be committed.
    pub held: Vec<(Arc<MemberEntry>, u64)>,
}

impl Plan {
    /// Every shard the route names (this one included).
    pub fn shards(&self) -> u64 {
        self.route.as_ref().map_or(0, |r| r.shards)
    }
}

/// The address of a shared entry, the key of the routing tables.
pub fn key<T>(entry: &Arc<T>) -> usize {
    Arc::as_ptr(entry) as usize
}

/// A direct send's target (PROTOCOL.md §9).
pub enum Direct {
    /// A current member, by its key.
    Member(Arc<MemberEntry>),
    /// A session live or away here, by its key.
    Session(Arc<SessionEntry>),
    /// A session of the node whose bit is `node`, by its (lowercase) key.
    Remote {
        member: Arc<MemberEntry>,
        key: Box<str>,
        node: u64,
    },
}

impl Direct {
    pub fn member(&self) -> &Arc<MemberEntry> {
        match self {
            Direct::Member(member) | Direct::Remote { member, .. } => member,
            Direct::Session(entry) => &entry.member,
        }
    }
}

/// A direct send, by its target.
pub fn plan_to(
    envelope: &Arc<Envelope>,
    direct: &Direct,
    limits: &HoldLimits<'_>,
) -> Result<Plan, Refused> {
    match direct {
        Direct::Member(member) => plan_direct(envelope, member, limits),
        Direct::Session(entry) => plan_session(envelope, entry, limits),
        // That node delivers or holds it; if it does not confirm, the
        // sender holds it for the member (`shard::crossing`).
        Direct::Remote { member, key, node } => Ok(Plan {
            route: Some(Arc::new(Route {
                envelope: envelope.clone(),
                targets: Targets::RemoteSession {
                    member: member.clone(),
                    key: key.clone(),
                },
                shards: *node,
            })),
            held: Vec::new(),
        }),
    }
}

/// A send to one member: live where a session may take it, else held.
pub fn plan_direct(
    envelope: &Arc<Envelope>,
    member: &Arc<MemberEntry>,
    limits: &HoldLimits<'_>,
) -> Result<Plan, Refused> {
    let mut plan = Plan::default();
    let shards = eligible(envelope.mesh.is_restoring(), member, envelope.priority);
    if shards == 0 {
        limits.room(member, envelope)?;
        limits.reserve(envelope)?;
        let now_eligible = member.hold(envelope.clone());
        plan.held.push((member.clone(), now_eligible));
        return Ok(plan);
    }
    plan.route = Some(Arc::new(Route {
        envelope: envelope.clone(),
        targets: Targets::Member(member.clone()),
        shards,
    }));
    Ok(plan)
}

/// A send to a session's key (the envelope's `session`): live to the shard
/// holding it when it may take the priority now, else held for it alone
/// (its member, should it have ended meanwhile). Its row is its member's,
/// like any direct send's.
pub fn plan_session(
    envelope: &Arc<Envelope>,
    entry: &Arc<SessionEntry>,
    limits: &HoldLimits<'_>,
) -> Result<Plan, Refused> {
    let member = &entry.member;
    let mut plan = Plan::default();
    let shards = if envelope.mesh.is_restoring() {
        0
    } else {
        entry.eligible(envelope.priority)
    };
    if shards == 0 {
        // Its member's bounds, and the same bounds on its own queue (which
        // is its member's once it ends).
        limits.room(member, envelope)?;
        if let Some(own) = &entry.held {
            own.queue
                .room_for(
                    envelope.frame.len(),
                    limits.max_per_member,
                    limits.max_bytes_per_member,
                )
                .map_err(Refused::HeldFull)?;
        }
        limits.reserve(envelope)?;
        let now_eligible = entry.hold(envelope.clone());
        plan.held.push((member.clone(), now_eligible));
        return Ok(plan);
    }
    plan.route = Some(Arc::new(Route {
        envelope: envelope.clone(),
        targets: Targets::Session(entry.clone()),
        shards,
    }));
    Ok(plan)
}

/// A send to every other member of the sender's mesh in `audience`.
/// Either every member that must hold it has room, or nothing is held and
/// the send is refused: a refused send is never half delivered.
pub fn plan_many(
    envelope: &Arc<Envelope>,
    audience: Audience<'_>,
    limits: &HoldLimits<'_>,
) -> Result<Plan, Refused> {
    let view = envelope.mesh.view();
    let priority = envelope.priority;
    let restoring = envelope.mesh.is_restoring();
    let is_target = |member: &Arc<MemberEntry>| {
        !Arc::ptr_eq(member, &envelope.sender) && audience.includes(member)
    };
    let mut holds = false;
    let mut anyone = false;
    for member in view.members() {
        if !is_target(member) {
            continue;
        }
        anyone = true;
        if eligible(restoring, member, priority) == 0 {
            limits.room(member, envelope)?;
            holds = true;
        }
    }
    if !anyone && matches!(audience, Audience::Group(_)) {
        return Err(Refused::NobodyInGroup);
    }
    if holds {
        limits.reserve(envelope)?;
    }
    let mut plan = Plan::default();
    let mut shards = 0;
    let mut held_for = Vec::new();
    let mut live_for = Vec::new();
    for member in view.members() {
        if !is_target(member) {
            continue;
        }
        let eligible = eligible(restoring, member, priority);
        if eligible != 0 {
            shards |= eligible;
            if let Audience::Group(_) = audience {
                live_for.push(key(member));
            }
            continue;
        }
        // Checked above; one that filled up meanwhile still takes it, so
        // the bound is exceeded by at most the sends in flight.
        let now_eligible = member.hold(envelope.clone());
        plan.held.push((member.clone(), now_eligible));
        held_for.push(key(member));
    }
    // Members whose sessions came or went between the two passes: the
    // reservation follows what was actually held.
    match (holds, plan.held.is_empty()) {
        (false, false) => {
            limits.budget.force(envelope.frame.len());
            envelope.hold_in_flight();
        }
        (true, true) => {
            limits.budget.release(envelope.frame.len());
            envelope.hold_settled();
        }
        _ => {}
    }
    if shards != 0 {
        let targets = match audience {
            Audience::All => {
                held_for.sort_unstable();
                Targets::AllBut { held_for }
            }
            Audience::Group(_) => {
                live_for.sort_unstable();
                Targets::Listed { members: live_for }
            }
        };
        plan.route = Some(Arc::new(Route {
            envelope: envelope.clone(),
            targets,
            shards,
        }));
    }
    Ok(plan)
}

/// The lowest shard named in a mask.
pub fn first_shard(mask: u64) -> Option<usize> {
    (mask != 0).then(|| mask.trailing_zeros() as usize)
}

/// Every shard named in a mask, lowest first.
pub fn shards_in(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let shard = first_shard(mask)?;
        mask &= mask - 1;
        Some(shard)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_names_its_shards_lowest_first() {
        assert_eq!(shards_in(0).count(), 0);
        let mask = 1 | 1 << 5 | 1 << 63;
        assert_eq!(shards_in(mask).collect::<Vec<_>>(), [0, 5, 63]);
        assert_eq!(first_shard(mask), Some(0));
    }
}
