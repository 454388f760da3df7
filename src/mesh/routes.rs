//! One shard's slice of the routing table and the delivery rules that use it.
//!
//! A send is split by `plan_send` into: the route (members with a live
//! session somewhere, each with the shards it was live on at send time) and
//! envelopes held for members with none. Every shard named by the route —
//! the sender's own included — applies it with `deliver_route` to its local
//! sessions. Keys are the addresses of the shared member and mesh entries:
//! sessions hold those `Arc`s, so the addresses are stable while they count.
use super::directory::{MemberEntry, MeshEntry};
use super::held::HeldFull;
use super::Envelope;
use rustc_hash::FxHashMap;
use std::rc::Rc;
use std::sync::Arc;

/// A live session as routing sees it.
pub trait Recipient {
    /// Queue the envelope's frame; false when the session could not take it
    /// (it is being cut off or closed), so another session should.
    fn deliver(&self, envelope: &Envelope) -> bool;
}

/// A member with a live session somewhere when the send was routed.
pub struct LiveTarget {
    pub member: Arc<MemberEntry>,
    pub shards: u64,
}

/// What a send routes live; shared (`Arc`) by every shard it names.
pub struct Route {
    pub envelope: Arc<Envelope>,
    pub targets: Box<[LiveTarget]>,
}

/// The outcome of planning one send.
#[derive(Default)]
pub struct Plan {
    pub route: Option<Arc<Route>>,
    /// Every shard the route names (this one included).
    pub shards: u64,
    /// Members an envelope was held for, with the shards that went live
    /// meanwhile (non-zero: ask one of them to drain the member's queue).
    pub held: Vec<(Arc<MemberEntry>, u64)>,
}

/// Splits a send to `targets` into its live route and held envelopes.
pub fn plan_send<'a>(
    envelope: &Arc<Envelope>,
    targets: impl Iterator<Item = &'a Arc<MemberEntry>>,
) -> Result<Plan, HeldFull> {
    let mut plan = Plan::default();
    let mut live = Vec::new();
    for member in targets {
        let shards = member.live_shards.get();
        if shards != 0 {
            plan.shards |= shards;
            live.push(LiveTarget {
                member: member.clone(),
                shards,
            });
        } else {
            let now_live = member
                .held
                .hold(envelope.clone(), || member.live_shards.get())?;
            plan.held.push((member.clone(), now_live));
        }
    }
    if !live.is_empty() {
        plan.route = Some(Arc::new(Route {
            envelope: envelope.clone(),
            targets: live.into_boxed_slice(),
        }));
    }
    Ok(plan)
}

/// The lowest shard named in a mask.
pub fn first_shard(mask: u64) -> Option<usize> {
    (mask != 0).then(|| mask.trailing_zeros() as usize)
}

struct MemberSessions<S> {
    member: Arc<MemberEntry>,
    sessions: Vec<Rc<S>>,
}

/// What applying a route on this shard did.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub pushes: usize,
    /// Members it had to hold the envelope for after all (their sessions
    /// left while the route was in flight), with shards live meanwhile.
    pub held: Vec<(usize, u64)>,
}

pub struct LocalRoutes<S> {
    shard: usize,
    by_member: FxHashMap<usize, MemberSessions<S>>,
    /// Local session count per mesh.
    by_mesh: FxHashMap<usize, usize>,
}

fn key<T>(entry: &Arc<T>) -> usize {
    Arc::as_ptr(entry) as usize
}

impl<S: Recipient> LocalRoutes<S> {
    pub fn new(shard: usize) -> Self {
        LocalRoutes {
            shard,
            by_member: FxHashMap::default(),
            by_mesh: FxHashMap::default(),
        }
    }

    fn bit(&self) -> u64 {
        1 << self.shard
    }

    /// Registers a session, marking this shard live for its member and mesh.
    pub fn add(&mut self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, session: Rc<S>) {
        let entry = self
            .by_member
            .entry(key(member))
            .or_insert_with(|| MemberSessions {
                member: member.clone(),
                sessions: Vec::new(),
            });
        entry.sessions.push(session);
        if entry.sessions.len() == 1 {
            member.live_shards.set(self.shard);
        }
        let count = self.by_mesh.entry(key(mesh)).or_insert(0);
        *count += 1;
        if *count == 1 {
            mesh.live_shards.set(self.shard);
        }
    }

    /// Unregisters a session; the last one of a member or mesh clears this
    /// shard's bit.
    pub fn remove(&mut self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, session: &Rc<S>) {
        if let Some(entry) = self.by_member.get_mut(&key(member)) {
            entry.sessions.retain(|s| !Rc::ptr_eq(s, session));
            if entry.sessions.is_empty() {
                self.by_member.remove(&key(member));
                member.live_shards.clear(self.shard);
            }
        }
        if let Some(count) = self.by_mesh.get_mut(&key(mesh)) {
            *count -= 1;
            if *count == 0 {
                self.by_mesh.remove(&key(mesh));
                mesh.live_shards.clear(self.shard);
            }
        }
    }

    pub fn sessions_of(&self, member: &Arc<MemberEntry>) -> &[Rc<S>] {
        self.by_member
            .get(&key(member))
            .map_or(&[], |e| e.sessions.as_slice())
    }

    /// Every local session whose member has been revoked.
    pub fn revoked_sessions(&self) -> Vec<Rc<S>> {
        self.by_member
            .values()
            .filter(|e| e.member.is_revoked())
            .flat_map(|e| e.sessions.iter().cloned())
            .collect()
    }

    /// Applies a route to this shard's sessions: each target member live here
    /// at send time gets the envelope on every local session. A target whose
    /// sessions here are gone — and which no other shard of the route still
    /// serves — holds it instead, so it is never lost.
    pub fn deliver_route(&self, route: &Route) -> Delivered {
        let mut done = Delivered::default();
        for target in route.targets.iter() {
            if target.shards & self.bit() == 0 {
                continue;
            }
            let mut pushed = false;
            for session in self.sessions_of(&target.member) {
                if session.deliver(&route.envelope) {
                    done.pushes += 1;
                    pushed = true;
                }
            }
            if pushed {
                continue;
            }
            let others = target.shards & !self.bit() & target.member.live_shards.get();
            if others == 0 {
                let member = &target.member;
                if let Ok(now_live) = member
                    .held
                    .hold(route.envelope.clone(), || member.live_shards.get())
                {
                    done.held.push((key(member), now_live));
                }
            }
        }
        done
    }

    /// Delivers a member's held envelopes, oldest first, to `session` (or,
    /// without one, to the first local session that takes each). Returns the
    /// number delivered; envelopes no session took are held again.
    pub fn drain_held(&self, member: &Arc<MemberEntry>, session: Option<&Rc<S>>) -> usize {
        let sessions = self.sessions_of(member);
        if sessions.is_empty() {
            return 0;
        }
        let mut delivered = 0;
        for envelope in member.held.take_all() {
            let took = match session {
                Some(s) => s.deliver(&envelope),
                None => sessions.iter().any(|s| s.deliver(&envelope)),
            };
            if took {
                delivered += 1;
            } else {
                // Back in the queue for the member's next session.
                let _ = member.held.hold(envelope, || 0);
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};
    use crate::protocol::Priority;
    use std::cell::RefCell;
    use std::time::Instant;

    #[derive(Default)]
    struct Inbox(RefCell<Vec<String>>);

    impl Recipient for Inbox {
        fn deliver(&self, envelope: &Envelope) -> bool {
            self.0.borrow_mut().push(envelope.message_id.to_string());
            true
        }
    }

    fn envelope(id: &str) -> Arc<Envelope> {
        Arc::new(Envelope {
            message_id: id.into(),
            priority: Priority::Next,
            frame: bytes::Bytes::new(),
            sent_at: Instant::now(),
        })
    }

    fn mesh(members: &[&str]) -> Arc<MeshEntry> {
        let rows: Vec<MemberRow> = members
            .iter()
            .map(|m| MemberRow {
                id: m.to_string(),
                peer_pubkey: format!("{m}-key"),
                revoked: false,
            })
            .collect();
        Directory::default().install("mesh", &rows)
    }

    #[test]
    fn offline_members_hold_and_drain_in_order() {
        let mesh = mesh(&["a", "b"]);
        let view = mesh.view();
        let b = view.member("b").unwrap().clone();
        for id in ["m1", "m2"] {
            let plan = plan_send(&envelope(id), std::iter::once(&b)).unwrap();
            assert!(plan.route.is_none());
            assert_eq!(plan.held.len(), 1);
        }
        let mut routes = LocalRoutes::new(0);
        let session = Rc::new(Inbox::default());
        routes.add(&mesh, &b, session.clone());
        assert_eq!(routes.drain_held(&b, Some(&session)), 2);
        assert_eq!(*session.0.borrow(), ["m1", "m2"]);
        assert!(b.held.is_empty());
    }

    #[test]
    fn route_reaches_every_local_session_once_and_holds_if_gone() {
        let mesh = mesh(&["a", "b"]);
        let view = mesh.view();
        let b = view.member("b").unwrap().clone();
        let mut routes = LocalRoutes::new(1);
        let (s1, s2) = (Rc::new(Inbox::default()), Rc::new(Inbox::default()));
        routes.add(&mesh, &b, s1.clone());
        routes.add(&mesh, &b, s2.clone());
        assert_eq!(b.live_shards.get(), 0b10);
        assert_eq!(mesh.live_shards.get(), 0b10);
        let plan = plan_send(&envelope("m1"), view.members().iter()).unwrap();
        // `a` has no session: held; `b` is live on shard 1.
        assert_eq!(plan.held.len(), 1);
        assert_eq!(plan.shards, 0b10);
        let route = plan.route.unwrap();
        assert_eq!(routes.deliver_route(&route).pushes, 2);
        assert_eq!(s1.0.borrow().len(), 1);
        assert_eq!(s2.0.borrow().len(), 1);
        // Both sessions leave before a second route lands: it is held.
        let plan = plan_send(&envelope("m2"), std::iter::once(&b)).unwrap();
        routes.remove(&mesh, &b, &s1);
        routes.remove(&mesh, &b, &s2);
        assert_eq!(b.live_shards.get(), 0);
        assert_eq!(mesh.live_shards.get(), 0);
        let done = routes.deliver_route(&plan.route.unwrap());
        assert_eq!(done.pushes, 0);
        assert_eq!(b.held.len(), 1);
    }
}
