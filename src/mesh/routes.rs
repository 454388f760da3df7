//! One shard's slice of the routing table and the delivery rules that use it.
//!
//! A send is planned on the sender's shard: envelopes are held for target
//! members with no live session anywhere, and a `Route` (shared by `Arc`)
//! names the shards that have sessions of the others. Every shard the route
//! names — the sender's own included — applies it with `deliver_route` to
//! its local sessions. A direct route names its member; a broadcast names
//! the mesh and whom to skip, so planning it clones nothing per member and
//! each shard walks only its own sessions of that mesh. Keys are the
//! addresses of the shared member and mesh entries: sessions hold those
//! `Arc`s, so the addresses are stable while they count (Fx hashing: the
//! keys are addresses, hashed on every push).
use super::directory::{MemberEntry, MeshEntry};
use super::held::HeldFull;
use super::Envelope;
use rustc_hash::FxHashMap;
use std::rc::Rc;
use std::sync::Arc;

/// A live session as routing sees it.
pub trait Recipient {
    /// Queue the envelope's push frame.
    fn deliver(&self, envelope: &Arc<Envelope>) -> Delivery;

    /// Bytes it can queue before its outbound bound.
    fn room(&self) -> usize;
}

/// What a session did with an envelope.
pub enum Delivery {
    Taken,
    /// Closing: it takes nothing more.
    Refused,
    /// Over its outbound bound: cut off now, handing back the envelopes it
    /// had queued but not written (oldest first).
    CutOff(Vec<Arc<Envelope>>),
}

/// Who a route is for.
pub enum Targets {
    /// One member, with the shards it was live on at send time.
    Member {
        member: Arc<MemberEntry>,
        shards: u64,
    },
    /// Every member of the mesh but the sender's and those the envelope
    /// was held for (sorted entry addresses), as each shard finds them.
    AllBut {
        sender: Arc<MemberEntry>,
        held_for: Vec<usize>,
    },
}

/// What a send routes live; shared (`Arc`) by every shard it names.
pub struct Route {
    pub envelope: Arc<Envelope>,
    pub mesh: Arc<MeshEntry>,
    pub targets: Targets,
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

/// A send to one member: live somewhere, or held for it.
pub fn plan_direct(
    envelope: &Arc<Envelope>,
    mesh: &Arc<MeshEntry>,
    member: &Arc<MemberEntry>,
) -> Result<Plan, HeldFull> {
    let mut plan = Plan::default();
    let shards = member.live_shards.get();
    if shards == 0 {
        let now_live = member.hold(envelope.clone())?;
        plan.held.push((member.clone(), now_live));
        return Ok(plan);
    }
    plan.shards = shards;
    plan.route = Some(Arc::new(Route {
        envelope: envelope.clone(),
        mesh: mesh.clone(),
        targets: Targets::Member {
            member: member.clone(),
            shards,
        },
    }));
    Ok(plan)
}

/// A send to every other member of the sender's mesh.
pub fn plan_broadcast(
    envelope: &Arc<Envelope>,
    mesh: &Arc<MeshEntry>,
    sender: &Arc<MemberEntry>,
) -> Result<Plan, HeldFull> {
    let mut plan = Plan::default();
    let mut held_for = Vec::new();
    for member in mesh.view().members() {
        if Arc::ptr_eq(member, sender) {
            continue;
        }
        let shards = member.live_shards.get();
        if shards != 0 {
            plan.shards |= shards;
            continue;
        }
        let now_live = member.hold(envelope.clone())?;
        plan.held.push((member.clone(), now_live));
        held_for.push(key(member));
    }
    if plan.shards != 0 {
        held_for.sort_unstable();
        plan.route = Some(Arc::new(Route {
            envelope: envelope.clone(),
            mesh: mesh.clone(),
            targets: Targets::AllBut {
                sender: sender.clone(),
                held_for,
            },
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
#[derive(Default)]
pub struct Delivered {
    pub pushes: usize,
    /// Members it had to hold the envelope for after all (their sessions
    /// left while the route was in flight), with shards live meanwhile.
    pub held: Vec<(Arc<MemberEntry>, u64)>,
}

pub struct LocalRoutes<S> {
    shard: usize,
    /// Local sessions by mesh, then by member.
    by_mesh: FxHashMap<usize, FxHashMap<usize, MemberSessions<S>>>,
}

fn key<T>(entry: &Arc<T>) -> usize {
    Arc::as_ptr(entry) as usize
}

impl<S: Recipient> LocalRoutes<S> {
    pub fn new(shard: usize) -> Self {
        LocalRoutes {
            shard,
            by_mesh: FxHashMap::default(),
        }
    }

    fn bit(&self) -> u64 {
        1 << self.shard
    }

    /// Registers a session, marking this shard live for its member and mesh.
    pub fn add(&mut self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, session: Rc<S>) {
        let members = self.by_mesh.entry(key(mesh)).or_default();
        if members.is_empty() {
            mesh.live_shards.set(self.shard);
        }
        let entry = members
            .entry(key(member))
            .or_insert_with(|| MemberSessions {
                member: member.clone(),
                sessions: Vec::new(),
            });
        entry.sessions.push(session);
        if entry.sessions.len() == 1 {
            member.live_shards.set(self.shard);
        }
    }

    /// Unregisters a session; the last one of a member or mesh clears this
    /// shard's bit.
    pub fn remove(&mut self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, session: &Rc<S>) {
        let Some(members) = self.by_mesh.get_mut(&key(mesh)) else {
            return;
        };
        if let Some(entry) = members.get_mut(&key(member)) {
            entry.sessions.retain(|s| !Rc::ptr_eq(s, session));
            if entry.sessions.is_empty() {
                members.remove(&key(member));
                member.live_shards.clear(self.shard);
            }
        }
        if members.is_empty() {
            self.by_mesh.remove(&key(mesh));
            mesh.live_shards.clear(self.shard);
        }
    }

    fn sessions_of(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>) -> &[Rc<S>] {
        self.by_mesh
            .get(&key(mesh))
            .and_then(|members| members.get(&key(member)))
            .map_or(&[], |e| e.sessions.as_slice())
    }

    /// Every local session whose member has been revoked.
    pub fn revoked_sessions(&self) -> Vec<Rc<S>> {
        self.by_mesh
            .values()
            .flat_map(|members| members.values())
            .filter(|e| e.member.is_revoked())
            .flat_map(|e| e.sessions.iter().cloned())
            .collect()
    }

    /// Applies a route to this shard's sessions. A direct target live here
    /// at send time gets the envelope on every local session; a broadcast
    /// reaches every local session of the mesh but the sender's member's and
    /// the held-for ones.
    pub fn deliver_route(&self, route: &Route) -> Delivered {
        let mut done = Delivered::default();
        match &route.targets {
            Targets::Member { member, shards } => {
                if shards & self.bit() == 0 {
                    return done;
                }
                let others = shards & !self.bit() & member.live_shards.get();
                let sessions = self.sessions_of(&route.mesh, member);
                self.deliver_to(member, sessions, &route.envelope, others, &mut done);
            }
            Targets::AllBut { sender, held_for } => {
                let Some(members) = self.by_mesh.get(&key(&route.mesh)) else {
                    return done;
                };
                for (member_key, entry) in members {
                    if Arc::ptr_eq(&entry.member, sender)
                        || (!held_for.is_empty() && held_for.binary_search(member_key).is_ok())
                    {
                        continue;
                    }
                    let others = entry.member.live_shards.get() & !self.bit();
                    self.deliver_to(
                        &entry.member,
                        &entry.sessions,
                        &route.envelope,
                        others,
                        &mut done,
                    );
                }
            }
        }
        done
    }

    /// Delivers to one member's local sessions. If none of them took it and
    /// no other shard serves the member (its sessions here are closing, or
    /// were just cut off), the envelope is held instead — after whatever a
    /// cut-off session still had queued — so an acked envelope is not lost.
    fn deliver_to(
        &self,
        member: &Arc<MemberEntry>,
        sessions: &[Rc<S>],
        envelope: &Arc<Envelope>,
        other_shards: u64,
        done: &mut Delivered,
    ) {
        let mut took = false;
        let mut orphans = Vec::new();
        for session in sessions {
            match session.deliver(envelope) {
                Delivery::Taken => {
                    done.pushes += 1;
                    took = true;
                }
                Delivery::Refused => {}
                Delivery::CutOff(mut queued) => orphans.append(&mut queued),
            }
        }
        if took || other_shards != 0 {
            // The member has it on another session, which also had
            // everything the cut-off one had queued.
            return;
        }
        for envelope in orphans.into_iter().chain(std::iter::once(envelope.clone())) {
            if let Ok(now_live) = member.hold(envelope) {
                done.held.push((member.clone(), now_live));
            }
        }
    }

    /// Delivers a member's held envelopes, oldest first, to `session` (or,
    /// without one, to any local session of the member), as many as fit
    /// its outbound bound: the rest stay held, in order, and its writer
    /// asks for more once it has written. Returns the number delivered.
    pub fn drain_held(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        session: Option<&Rc<S>>,
    ) -> usize {
        let sessions = self.sessions_of(mesh, member);
        if sessions.is_empty() {
            return 0;
        }
        let candidates = session.map_or(sessions, std::slice::from_ref);
        let mut delivered = 0;
        loop {
            let mut target = None;
            let Some(envelope) = member.held.pop_front_if(|envelope| {
                target = candidates.iter().find(|s| s.room() >= envelope.frame.len());
                target.is_some()
            }) else {
                break;
            };
            match target.expect("accepted with a target").deliver(&envelope) {
                Delivery::Taken => delivered += 1,
                Delivery::Refused => {
                    member.held.push_front(vec![envelope]);
                    break;
                }
                Delivery::CutOff(mut orphans) => {
                    delivered -= orphans.len().min(delivered);
                    orphans.push(envelope);
                    member.held.push_front(orphans);
                    break;
                }
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
        fn deliver(&self, envelope: &Arc<Envelope>) -> Delivery {
            self.0.borrow_mut().push(envelope.message_id.to_string());
            Delivery::Taken
        }

        fn room(&self) -> usize {
            usize::MAX
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
            let plan = plan_direct(&envelope(id), &mesh, &b).unwrap();
            assert!(plan.route.is_none());
            assert_eq!(plan.held.len(), 1);
        }
        let mut routes = LocalRoutes::new(0);
        let session = Rc::new(Inbox::default());
        routes.add(&mesh, &b, session.clone());
        assert_eq!(routes.drain_held(&mesh, &b, Some(&session)), 2);
        assert_eq!(*session.0.borrow(), ["m1", "m2"]);
        assert!(b.held.is_empty());
    }

    #[test]
    fn route_reaches_every_local_session_once_and_holds_if_gone() {
        let mesh = mesh(&["a", "b", "c"]);
        let view = mesh.view();
        let b = view.member("b").unwrap().clone();
        let mut routes = LocalRoutes::new(1);
        let (s1, s2) = (Rc::new(Inbox::default()), Rc::new(Inbox::default()));
        routes.add(&mesh, &b, s1.clone());
        routes.add(&mesh, &b, s2.clone());
        assert_eq!(b.live_shards.get(), 0b10);
        assert_eq!(mesh.live_shards.get(), 0b10);
        let a = view.member("a").unwrap().clone();
        let plan = plan_broadcast(&envelope("m1"), &mesh, &a).unwrap();
        // `c` has no session: held; `b` is live on shard 1; `a` sends.
        assert_eq!(plan.held.len(), 1);
        assert_eq!(plan.shards, 0b10);
        let route = plan.route.unwrap();
        assert_eq!(routes.deliver_route(&route).pushes, 2);
        assert_eq!(s1.0.borrow().len(), 1);
        assert_eq!(s2.0.borrow().len(), 1);
        // Both sessions leave before a second route lands: it is held.
        let plan = plan_direct(&envelope("m2"), &mesh, &b).unwrap();
        routes.remove(&mesh, &b, &s1);
        routes.remove(&mesh, &b, &s2);
        assert_eq!(b.live_shards.get(), 0);
        assert_eq!(mesh.live_shards.get(), 0);
        let done = routes.deliver_route(&plan.route.unwrap());
        assert_eq!(done.pushes, 0);
        assert_eq!(b.held.len(), 1);
    }

    #[test]
    fn broadcast_skips_the_sender_and_members_it_was_held_for() {
        let mesh = mesh(&["a", "b", "c"]);
        let view = mesh.view();
        let (a, b, c) = (
            view.member("a").unwrap().clone(),
            view.member("b").unwrap().clone(),
            view.member("c").unwrap().clone(),
        );
        let mut routes = LocalRoutes::new(0);
        let (sa, sb) = (Rc::new(Inbox::default()), Rc::new(Inbox::default()));
        routes.add(&mesh, &a, sa.clone());
        routes.add(&mesh, &b, sb.clone());
        let plan = plan_broadcast(&envelope("m1"), &mesh, &a).unwrap();
        assert_eq!(plan.held.len(), 1);
        // `c` connects before the route is applied: it drains the held copy
        // and must not get the live one too.
        let sc = Rc::new(Inbox::default());
        routes.add(&mesh, &c, sc.clone());
        assert_eq!(routes.drain_held(&mesh, &c, Some(&sc)), 1);
        assert_eq!(routes.deliver_route(&plan.route.unwrap()).pushes, 1);
        assert!(sa.0.borrow().is_empty());
        assert_eq!(*sb.0.borrow(), ["m1"]);
        assert_eq!(*sc.0.borrow(), ["m1"]);
    }

    /// Takes frames until `room` bytes are used, then cuts itself off.
    struct Tight {
        room: std::cell::Cell<usize>,
        got: RefCell<Vec<String>>,
    }

    impl Recipient for Tight {
        fn deliver(&self, envelope: &Arc<Envelope>) -> Delivery {
            if envelope.frame.len() > self.room.get() {
                return Delivery::CutOff(Vec::new());
            }
            self.room.set(self.room.get() - envelope.frame.len());
            self.got.borrow_mut().push(envelope.message_id.to_string());
            Delivery::Taken
        }

        fn room(&self) -> usize {
            self.room.get()
        }
    }

    #[test]
    fn draining_stops_at_the_sessions_room_and_keeps_order() {
        let mesh = mesh(&["a"]);
        let a = mesh.view().member("a").unwrap().clone();
        for id in ["m1", "m2", "m3"] {
            let envelope = Arc::new(Envelope {
                message_id: id.into(),
                priority: Priority::Next,
                frame: bytes::Bytes::from_static(b"0123456789"),
                sent_at: Instant::now(),
            });
            plan_direct(&envelope, &mesh, &a).unwrap();
        }
        let mut routes = LocalRoutes::new(0);
        let session = Rc::new(Tight {
            room: std::cell::Cell::new(25),
            got: RefCell::new(Vec::new()),
        });
        routes.add(&mesh, &a, session.clone());
        assert_eq!(routes.drain_held(&mesh, &a, Some(&session)), 2);
        assert_eq!(*session.got.borrow(), ["m1", "m2"]);
        assert_eq!(a.held.len(), 1);
        // The writer freed room: the rest follows, in order.
        session.room.set(100);
        assert_eq!(routes.drain_held(&mesh, &a, Some(&session)), 1);
        assert_eq!(*session.got.borrow(), ["m1", "m2", "m3"]);
        assert!(a.held.is_empty());
    }
}
