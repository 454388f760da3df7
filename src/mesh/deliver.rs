//! One shard's slice of the routing table and the delivery rules that use
//! it (PROTOCOL.md §5): a route is pushed to every local session of a
//! target member that may take its priority now; a member none of whose
//! sessions anywhere may take it holds it; held envelopes go, oldest first,
//! each to the first session that may take it.
//!
//! Keys are the addresses of the shared member and mesh entries: sessions
//! hold those `Arc`s, so the addresses are stable while they count (Fx
//! hashing: the keys are addresses, hashed on every push).
use super::directory::{MemberEntry, MeshEntry};
use super::held::{HeldQueue, Take};
use super::peers::SessionEntry;
use super::plan::{key, Route, Targets};
use super::{Envelope, HeldLate, Orphan};
use crate::protocol::Priority;
use rustc_hash::FxHashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::SystemTime;

/// A live session as routing sees it.
pub trait Recipient {
    /// Whether it may take this priority now: its status allows it and it
    /// is not closing.
    fn accepts(&self, priority: Priority) -> bool;

    /// Queue the envelope's push frame; `stored` when it was held for this
    /// session's member, `shared` when other sessions of the member take it
    /// live too (see `Orphan`).
    fn deliver(&self, envelope: &Arc<Envelope>, stored: bool, shared: bool) -> Delivery;

    /// Bytes it can queue before its outbound bound.
    fn room(&self) -> usize;

    /// Whether it asked for peer events (PROTOCOL.md §9).
    fn wants_peer_events(&self) -> bool;

    /// Queue a peer event: never held, never gated; a session over its
    /// outbound bound is cut off like for any frame. True when queued.
    fn notify(&self, frame: &bytes::Bytes) -> bool;

    /// The directory entry of the session it holds (for sends to a session
    /// key, PROTOCOL.md §9).
    fn session(&self) -> Option<Arc<SessionEntry>> {
        None
    }
}

/// Whether `session` holds `entry`.
fn holds<S: Recipient>(session: &S, entry: &Arc<SessionEntry>) -> bool {
    session.session().is_some_and(|e| Arc::ptr_eq(&e, entry))
}

/// What a session did with an envelope.
pub enum Delivery {
    Taken,
    /// Closing: it takes nothing more.
    Refused,
    /// Over its outbound bound: cut off now, handing back the envelopes it
    /// had queued but not written (oldest first).
    CutOff(Vec<Orphan>),
}

struct MemberSessions<S> {
    member: Arc<MemberEntry>,
    sessions: Vec<Rc<S>>,
}

/// What applying a route on this shard did.
#[derive(Default)]
pub struct Delivered {
    pub pushes: usize,
    /// Members that had to hold envelopes after all (their sessions left or
    /// turned busy while the route was in flight, or a cut-off session
    /// handed its queue back), with the shards able to take them meanwhile.
    pub held: Vec<(Arc<MemberEntry>, u64)>,
    /// What became held here after its ack: to be stored.
    pub late: Vec<HeldLate>,
}

/// What draining a member's held queue did.
#[derive(Default)]
pub struct Drained {
    pub delivered: usize,
    /// A session here may take what is held but has no room now: its
    /// writer drains again once it has written.
    pub waiting_for_room: bool,
    /// Expired envelopes met on the way, dropped unpushed.
    pub expired: Vec<Arc<Envelope>>,
    /// Live envelopes a session cut off during the drain handed back.
    pub late: Vec<HeldLate>,
}

/// What a session leaving did.
#[derive(Default)]
pub struct Left {
    /// The shards to ask for a drain (something is held for the member).
    pub drain: u64,
    /// Live envelopes it had not written, now held: to be stored.
    pub late: Vec<HeldLate>,
    /// Sessions that got envelopes sent to their key back (a connection
    /// that was replaced): their holder is to drain them.
    pub sessions: Vec<Arc<SessionEntry>>,
}

/// What a session that is gone (or going) had not written goes back to its
/// member (see `reclaim`; live ones another session of the member may take
/// went there too).
pub fn give_back(member: &Arc<MemberEntry>, orphans: Vec<Orphan>) -> Left {
    let mut late = Vec::new();
    let sessions = reclaim(member, orphans, &mut late);
    let drain = if member.held.is_empty() {
        0
    } else {
        member.live_shards.get()
    };
    Left {
        drain,
        late,
        sessions,
    }
}

/// Gives a cut-off session's unwritten envelopes back to its member: those
/// held for the member always (they went to this session only), live ones
/// unless another session of the member took them too when they were
/// routed (`shared`; a session that arrived since has not got them).
/// What was sent to a session's key goes back to that session (to its
/// member once it has ended), live or not: no other session may have it.
/// The live ones given back are now held: they go to `late`. Returns the
/// sessions that got any back.
fn reclaim(
    member: &Arc<MemberEntry>,
    orphans: Vec<Orphan>,
    late: &mut Vec<HeldLate>,
) -> Vec<Arc<SessionEntry>> {
    let mut back = Vec::with_capacity(orphans.len());
    let mut sessions: Vec<Arc<SessionEntry>> = Vec::new();
    for orphan in orphans {
        let own = orphan.envelope.session.clone();
        if !orphan.stored {
            if own.is_none() && orphan.shared {
                continue;
            }
            orphan.envelope.hold_in_flight();
            late.push((orphan.envelope.clone(), member.clone()));
        }
        match own {
            Some(entry) => {
                entry.hand_back(vec![orphan.envelope]);
                if !sessions.iter().any(|e| Arc::ptr_eq(e, &entry)) {
                    sessions.push(entry);
                }
            }
            None => back.push(orphan.envelope),
        }
    }
    member.held.hand_back(back);
    sessions
}

pub struct LocalRoutes<S> {
    shard: usize,
    /// Local sessions by mesh, then by member.
    by_mesh: FxHashMap<usize, FxHashMap<usize, MemberSessions<S>>>,
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

    /// Registers a session (its status already set), marking this shard
    /// live for its member and mesh, and open if it may take `next`.
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
        self.status_changed(mesh, member);
    }

    /// A local session of `member` changed status (or started closing):
    /// this shard's open bit follows whether any of them may take `next`.
    /// A session that opens sets the bit before it drains (see `held`).
    pub fn status_changed(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>) {
        let open = self
            .sessions_of(mesh, member)
            .iter()
            .any(|s| s.accepts(Priority::Next));
        if open {
            member.open_shards.set(self.shard);
        } else {
            member.open_shards.clear(self.shard);
        }
    }

    /// A connection ends: it leaves the tables and what it was cut off
    /// before writing goes back to its member (see `reclaim`). Its session's
    /// slot in the mesh is released by the caller only after this (when the
    /// session ends, not while it is away), so an idle-mesh eviction cannot
    /// strand those envelopes in an entry nobody looks up any more.
    pub fn leave(
        &mut self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        session: &Rc<S>,
        orphans: Vec<Orphan>,
    ) -> Left {
        self.remove(mesh, member, session);
        give_back(member, orphans)
    }

    fn remove(&mut self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, session: &Rc<S>) {
        let Some(members) = self.by_mesh.get_mut(&key(mesh)) else {
            return;
        };
        if let Some(entry) = members.get_mut(&key(member)) {
            entry.sessions.retain(|s| !Rc::ptr_eq(s, session));
            if entry.sessions.is_empty() {
                members.remove(&key(member));
                member.live_shards.clear(self.shard);
                member.open_shards.clear(self.shard);
            }
        }
        if members.is_empty() {
            self.by_mesh.remove(&key(mesh));
            mesh.live_shards.clear(self.shard);
        } else {
            self.status_changed(mesh, member);
        }
    }

    pub fn sessions_of(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>) -> &[Rc<S>] {
        self.by_mesh
            .get(&key(mesh))
            .and_then(|members| members.get(&key(member)))
            .map_or(&[], |e| e.sessions.as_slice())
    }

    /// Every local session whose member has been revoked, and whether by
    /// an admin's ban.
    pub fn revoked_sessions(&self) -> Vec<(Rc<S>, bool)> {
        self.by_mesh
            .values()
            .flat_map(|members| members.values())
            .filter(|e| e.member.is_revoked())
            .flat_map(|e| {
                let banned = e.member.is_banned();
                e.sessions.iter().map(move |s| (s.clone(), banned))
            })
            .collect()
    }

    /// Applies a route to this shard's sessions. A direct target gets the
    /// envelope on every local session that may take it; a broadcast
    /// reaches every such local session of the mesh but the sender's
    /// member's and the held-for ones.
    pub fn deliver_route(&self, route: &Route) -> Delivered {
        let mut done = Delivered::default();
        if route.shards & self.bit() == 0 {
            return done;
        }
        let envelope = &route.envelope;
        match &route.targets {
            Targets::Member(member) => {
                let sessions = self.sessions_of(&envelope.mesh, member);
                self.deliver_to(member, sessions, route, &mut done);
            }
            Targets::Session(entry) => self.deliver_to_session(entry, route, &mut done),
            // Only ever routed to another node (its bit is no shard's).
            Targets::RemoteSession { .. } => {}
            Targets::AllBut { held_for } => {
                let skipped = |k: &usize| !held_for.is_empty() && held_for.binary_search(k).is_ok();
                self.deliver_to_mesh(route, |k| !skipped(k), &mut done);
            }
            Targets::Listed { members } => {
                self.deliver_to_mesh(route, |k| members.binary_search(k).is_ok(), &mut done);
            }
        }
        done
    }

    /// Delivers to every local member of the route's mesh but the sender's
    /// that `wanted` (by entry address).
    fn deliver_to_mesh(
        &self,
        route: &Route,
        wanted: impl Fn(&usize) -> bool,
        done: &mut Delivered,
    ) {
        let envelope = &route.envelope;
        let Some(members) = self.by_mesh.get(&key(&envelope.mesh)) else {
            return;
        };
        for (member_key, entry) in members {
            if Arc::ptr_eq(&entry.member, &envelope.sender) || !wanted(member_key) {
                continue;
            }
            self.deliver_to(&entry.member, &entry.sessions, route, done);
        }
    }

    /// Delivers to one member's local sessions that may take the envelope.
    /// If none did and no other shard the route names may take it for the
    /// member (its sessions here turned busy, are closing, or were just cut
    /// off), the member holds it — so an acked envelope is not lost.
    fn deliver_to(
        &self,
        member: &Arc<MemberEntry>,
        sessions: &[Rc<S>],
        route: &Route,
        done: &mut Delivered,
    ) {
        let envelope = &route.envelope;
        let mut took = false;
        let mut orphans = Vec::new();
        let others = |p: Priority| member.shards_for(p) & !self.bit();
        let takers = sessions
            .iter()
            .filter(|s| s.accepts(envelope.priority))
            .count();
        let shared = takers > 1 || others(envelope.priority) & route.shards != 0;
        for session in sessions {
            if !session.accepts(envelope.priority) {
                continue;
            }
            match session.deliver(envelope, false, shared) {
                Delivery::Taken => {
                    done.pushes += 1;
                    took = true;
                }
                Delivery::Refused => {}
                Delivery::CutOff(mut queued) => orphans.append(&mut queued),
            }
        }
        let mut reheld = !orphans.is_empty();
        reclaim(member, orphans, &mut done.late);
        if !took && others(envelope.priority) & route.shards == 0 {
            envelope.hold_in_flight();
            member.held.hand_back(vec![envelope.clone()]);
            done.late.push((envelope.clone(), member.clone()));
            reheld = true;
        }
        if reheld {
            done.held.push((member.clone(), member.live_shards.get()));
        }
    }

    /// Delivers an envelope sent to a session's key to that session only,
    /// if it is here and may take it; else the session holds it (its member,
    /// once it has ended), stored like any envelope held after its ack.
    fn deliver_to_session(&self, entry: &Arc<SessionEntry>, route: &Route, done: &mut Delivered) {
        let envelope = &route.envelope;
        let member = &entry.member;
        let sessions = self.sessions_of(&envelope.mesh, member);
        let mut orphans = Vec::new();
        let took = match sessions.iter().find(|s| holds(&***s, entry)) {
            Some(session) if session.accepts(envelope.priority) => {
                match session.deliver(envelope, false, false) {
                    Delivery::Taken => true,
                    Delivery::Refused => false,
                    Delivery::CutOff(queued) => {
                        orphans = queued;
                        false
                    }
                }
            }
            _ => false,
        };
        if took {
            done.pushes += 1;
        }
        let reheld = !orphans.is_empty();
        reclaim(member, orphans, &mut done.late);
        if !took {
            envelope.hold_in_flight();
            let eligible = entry.hold(envelope.clone());
            done.late.push((envelope.clone(), member.clone()));
            done.held.push((member.clone(), eligible));
        }
        if reheld {
            done.held.push((member.clone(), member.live_shards.get()));
        }
    }

    /// Queues a peer event about a session of `about` on every local
    /// session of the mesh that asked for events, but its own member's.
    /// Returns how many got it.
    pub fn notify_peers(
        &self,
        mesh: &Arc<MeshEntry>,
        about: &Arc<MemberEntry>,
        frame: &bytes::Bytes,
    ) -> usize {
        let Some(members) = self.by_mesh.get(&key(mesh)) else {
            return 0;
        };
        members
            .values()
            .filter(|entry| !Arc::ptr_eq(&entry.member, about))
            .flat_map(|entry| entry.sessions.iter())
            .filter(|session| session.wants_peer_events() && session.notify(frame))
            .count()
    }

    /// Delivers a member's held envelopes, oldest first across the
    /// priorities, each to the first of `session` (or, without one, of the
    /// member's local sessions) that may take it and has room; the first
    /// that a session may take but has no room for stops the drain, so
    /// order is kept, and its writer asks for more once it has written.
    pub fn drain_held(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        session: Option<&Rc<S>>,
    ) -> Drained {
        let sessions = self.sessions_of(mesh, member);
        let mut drained = Drained::default();
        // While an earlier run's envelopes load, the ones held now wait
        // behind them (the loader asks for a drain when it is done).
        if sessions.is_empty() || mesh.is_restoring() {
            return drained;
        }
        let candidates = session.map_or(sessions, std::slice::from_ref);
        let now = SystemTime::now();
        // What was sent to a session's key goes first, to that session only.
        for candidate in candidates {
            let Some(entry) = candidate.session() else {
                continue;
            };
            let Some(own) = entry.held.as_ref().filter(|h| !h.queue.is_empty()) else {
                continue;
            };
            let one = std::slice::from_ref(candidate);
            let put_back = |e: Arc<Envelope>| entry.hand_back(vec![e]);
            self.drain_queue(member, &own.queue, one, now, &mut drained, &put_back);
        }
        let put_back = |e: Arc<Envelope>| member.held.hand_back(vec![e]);
        self.drain_queue(
            member,
            &member.held,
            candidates,
            now,
            &mut drained,
            &put_back,
        );
        drained
    }

    /// Drains one queue (a member's, or a session's own) to `candidates`.
    #[allow(clippy::too_many_arguments)]
    fn drain_queue(
        &self,
        member: &Arc<MemberEntry>,
        queue: &HeldQueue,
        candidates: &[Rc<S>],
        now: SystemTime,
        drained: &mut Drained,
        put_back: &dyn Fn(Arc<Envelope>),
    ) {
        loop {
            let mut target = None;
            let taken = queue.take_next(now, &mut drained.expired, |envelope| {
                let mut takers = candidates
                    .iter()
                    .filter(|s| s.accepts(envelope.priority))
                    .peekable();
                if takers.peek().is_none() {
                    return Take::SkipPriority;
                }
                target = takers.find(|s| s.room() >= envelope.frame.len());
                if target.is_some() {
                    Take::Yes
                } else {
                    drained.waiting_for_room = true;
                    Take::Stop
                }
            });
            let Some(envelope) = taken else { break };
            match target
                .expect("taken with a target")
                .deliver(&envelope, true, false)
            {
                Delivery::Taken => drained.delivered += 1,
                Delivery::Refused => {
                    put_back(envelope);
                    break;
                }
                Delivery::CutOff(mut orphans) => {
                    let back = orphans.iter().filter(|o| o.stored).count();
                    drained.delivered -= back.min(drained.delivered);
                    orphans.push(Orphan {
                        envelope,
                        stored: true,
                        shared: false,
                    });
                    reclaim(member, orphans, &mut drained.late);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};
    use crate::mesh::held::{HeldBudget, HeldLimit};
    use crate::mesh::plan::{plan_direct, plan_many, Audience, HoldLimits, Refused};
    use crate::mesh::EnvelopeTarget;
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::{Instant, SystemTime};

    /// A session with a status (idle unless `busy`) and a byte budget; over
    /// it, it cuts itself off, handing back what it "had queued".
    struct Fake {
        busy: Cell<bool>,
        closing: Cell<bool>,
        room: Cell<usize>,
        got: RefCell<Vec<String>>,
        queued: RefCell<Vec<Orphan>>,
        wants_events: Cell<bool>,
        events: Cell<usize>,
        entry: RefCell<Option<Arc<SessionEntry>>>,
    }

    impl Fake {
        fn idle() -> Rc<Fake> {
            Rc::new(Fake {
                busy: Cell::new(false),
                closing: Cell::new(false),
                room: Cell::new(usize::MAX),
                got: RefCell::new(Vec::new()),
                queued: RefCell::new(Vec::new()),
                wants_events: Cell::new(false),
                events: Cell::new(0),
                entry: RefCell::new(None),
            })
        }

        fn working() -> Rc<Fake> {
            let fake = Fake::idle();
            fake.busy.set(true);
            fake
        }

        fn got(&self) -> Vec<String> {
            self.got.borrow().clone()
        }
    }

    impl Recipient for Fake {
        fn accepts(&self, priority: Priority) -> bool {
            !self.closing.get() && (!self.busy.get() || priority == Priority::Now)
        }

        fn deliver(&self, envelope: &Arc<Envelope>, stored: bool, shared: bool) -> Delivery {
            if self.closing.get() {
                return Delivery::Refused;
            }
            if envelope.frame.len() > self.room.get() {
                self.closing.set(true);
                return Delivery::CutOff(std::mem::take(&mut *self.queued.borrow_mut()));
            }
            self.room.set(self.room.get() - envelope.frame.len());
            self.got.borrow_mut().push(envelope.message_id.to_string());
            self.queued.borrow_mut().push(Orphan {
                envelope: envelope.clone(),
                stored,
                shared,
            });
            Delivery::Taken
        }

        fn room(&self) -> usize {
            self.room.get()
        }

        fn wants_peer_events(&self) -> bool {
            self.wants_events.get()
        }

        fn notify(&self, _frame: &bytes::Bytes) -> bool {
            self.events.set(self.events.get() + 1);
            true
        }

        fn session(&self) -> Option<Arc<SessionEntry>> {
            self.entry.borrow().clone()
        }
    }

    /// A `session_hello` session of `member` with key `key`, live on
    /// shard 0, held by a new idle fake.
    fn keyed_session(world: &World, member: &str, key: &str, conn: u64) -> Rc<Fake> {
        use crate::mesh::peers::{Claim, Holder, MemberSessions, NewSession};
        let member = world.member(member);
        let holder = Holder::Live { shard: 0, conn };
        let claim = MemberSessions::claim(&member, key, Some(key), holder, || {
            Ok::<_, ()>(NewSession {
                summary: None,
                presence_id: format!("p-{key}").into(),
                session_pubkey: Some(key.into()),
                pid: 1,
                cwd: "/w".into(),
                connected_at: "t".into(),
                display_name: "s".into(),
                status: crate::status::StatusState::new(std::time::Instant::now()),
            })
        })
        .unwrap();
        let Claim::New(entry) = claim else {
            panic!("a new session")
        };
        world.mesh.session_keys.insert(&entry);
        let fake = Fake::idle();
        *fake.entry.borrow_mut() = Some(entry);
        fake
    }

    #[test]
    fn a_session_given_up_to_another_node_neither_ends_nor_resumes_here() {
        use crate::mesh::peers::{Departure, Holder, MemberSessions};
        let world = World::new(&["a", "b"]);
        let live = keyed_session(&world, "b", "k1", 7);
        let entry = live.session().unwrap();
        let b = world.member("b");
        assert!(b.sessions.has("any id", Some("k1")));
        assert!(!b.sessions.has("k1", None));
        let was = MemberSessions::give_up(&entry);
        assert_eq!(was, Some(Holder::Live { shard: 0, conn: 7 }));
        assert!(b.sessions.is_empty() && b.sessions.by_presence("p-k1").is_none());
        // Its connection's close and any grace timer of this node are moot.
        let holder = Holder::Live { shard: 0, conn: 7 };
        assert_eq!(
            MemberSessions::depart(&entry, holder, true),
            Departure::TakenOver
        );
        assert!(!MemberSessions::end_away(&entry, 0, 1));
        assert_eq!(MemberSessions::give_up(&entry), None);
    }

    /// An envelope from `from` to the session `to` holds.
    fn to_session(world: &World, seq: u32, from: &str, to: &Fake, p: Priority) -> Arc<Envelope> {
        let entry = to.session().unwrap();
        let mut e = Arc::into_inner(world.envelope(seq, from, None, p)).unwrap();
        e.target = EnvelopeTarget::Member(entry.member.clone());
        e.session = Some(entry);
        Arc::new(e)
    }

    fn set_busy(world: &World, routes: &LocalRoutes<Fake>, fake: &Fake, busy: bool) {
        let entry = fake.session().unwrap();
        let status = if busy {
            crate::hook::Status::Working
        } else {
            crate::hook::Status::Idle
        };
        entry.set_status(crate::status::StatusState::with(
            status,
            crate::status::Source::Manual,
            std::time::Instant::now(),
        ));
        fake.busy.set(busy);
        routes.status_changed(&world.mesh, &entry.member);
    }

    #[test]
    fn a_session_key_send_goes_to_that_session_alone_until_it_ends() {
        use crate::mesh::plan::plan_session;
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let (one, two) = (
            keyed_session(&world, "b", "k1", 1),
            keyed_session(&world, "b", "k2", 2),
        );
        routes.add(&world.mesh, &b, one.clone());
        routes.add(&world.mesh, &b, two.clone());
        let entry = one.session().unwrap();

        // Live and idle: routed to its shard, taken by it alone.
        let live = to_session(&world, 1, "a", &one, Priority::Next);
        let plan = plan_session(&live, &entry, &world.limits(10)).unwrap();
        assert!(plan.held.is_empty());
        assert_eq!(routes.deliver_route(plan.route.as_ref().unwrap()).pushes, 1);
        assert_eq!((one.got(), two.got()), (vec!["m0001".into()], vec![]));

        // Busy: held for it, not for the member, and no drain gives it to
        // the idle sibling; it goes once the session may take it.
        set_busy(&world, &routes, &one, true);
        let held = to_session(&world, 2, "a", &one, Priority::Next);
        let plan = plan_session(&held, &entry, &world.limits(10)).unwrap();
        assert_eq!(plan.held.len(), 1, "held, so its ack waits for the row");
        assert!(b.held.is_empty());
        assert_eq!(entry.held_len(), 1);
        assert_eq!(routes.drain_held(&world.mesh, &b, None).delivered, 0);
        set_busy(&world, &routes, &one, false);
        assert_eq!(routes.drain_held(&world.mesh, &b, Some(&two)).delivered, 0);
        assert_eq!(routes.drain_held(&world.mesh, &b, None).delivered, 1);
        assert_eq!(one.got(), ["m0001", "m0002"]);
        assert!(two.got().is_empty());

        // A route that finds it busy on arrival holds it for it too.
        let racing = to_session(&world, 3, "a", &one, Priority::Next);
        let plan = plan_session(&racing, &entry, &world.limits(10)).unwrap();
        set_busy(&world, &routes, &one, true);
        let done = routes.deliver_route(plan.route.as_ref().unwrap());
        assert_eq!(
            (done.pushes, done.late.len()),
            (0, 1),
            "stored after its ack"
        );
        assert_eq!(entry.held_len(), 1);

        // It ends: what it held is its member's now, and its key names the
        // member; later holds for it go to the member as well.
        routes.leave(&world.mesh, &b, &one, Vec::new());
        assert!(entry.end_held());
        world.mesh.session_keys.ended(&entry);
        assert_eq!(b.held.len(), 1);
        assert!(matches!(
            world.mesh.session_keys.resolve("K1", &world.mesh.remote),
            Some(crate::mesh::peers::KeyTarget::Member(m)) if Arc::ptr_eq(&m, &b)
        ));
        entry.hold(to_session(&world, 4, "a", &one, Priority::Next));
        assert_eq!((entry.held_len(), b.held.len()), (0, 2));
        assert_eq!(routes.drain_held(&world.mesh, &b, None).delivered, 2);
        assert_eq!(two.got(), ["m0003", "m0004"]);
        assert_eq!(world.depth(), 0);
    }

    struct World {
        /// Envelope `seq` was read `seq` µs after this.
        epoch: Instant,
        directory: Directory,
        depth: Arc<AtomicI64>,
        mesh: Arc<MeshEntry>,
        budget: HeldBudget,
    }

    impl World {
        fn limits(&self, max_per_member: usize) -> HoldLimits<'_> {
            HoldLimits {
                max_per_member,
                max_bytes_per_member: usize::MAX,
                budget: &self.budget,
            }
        }

        fn new(members: &[&str]) -> World {
            let depth = Arc::new(AtomicI64::new(0));
            let directory = Directory::new(depth.clone());
            let rows: Vec<MemberRow> = members
                .iter()
                .map(|m| MemberRow {
                    id: m.to_string(),
                    peer_pubkey: format!("{m}-key"),
                    revoked: false,
                    ..MemberRow::default()
                })
                .collect();
            let mesh = directory.install("mesh", &rows);
            assert_eq!(
                mesh.try_admit(1000),
                crate::mesh::directory::Admission::Admitted
            );
            World {
                epoch: Instant::now(),
                directory,
                depth,
                mesh,
                budget: HeldBudget::new(usize::MAX / 2),
            }
        }

        fn member(&self, id: &str) -> Arc<MemberEntry> {
            self.mesh.view().member(id).unwrap().clone()
        }

        /// Ids sort by creation: `seq` orders them.
        fn envelope(&self, seq: u32, from: &str, to: Option<&str>, p: Priority) -> Arc<Envelope> {
            Arc::new(Envelope {
                message_id: format!("m{seq:04}").into(),
                mesh: self.mesh.clone(),
                sender: self.member(from),
                target: to.map_or(EnvelopeTarget::Many("*".into()), |t| {
                    EnvelopeTarget::Member(self.member(t))
                }),
                priority: p,
                created_at: SystemTime::now(),
                expires_at: SystemTime::now() + std::time::Duration::from_secs(3600),
                frame: bytes::Bytes::from_static(b"0123456789"),
                nonce: 0..0,
                ciphertext: 0..0,
                sent_at: self.epoch + std::time::Duration::from_micros(seq.into()),
                restored: false,
                holds_in_flight: Default::default(),
                redelivered_frame: Default::default(),
                client_message_id: None,
                session: None,
            })
        }

        /// A direct send from `a` to `b`, applied on `routes` (one shard).
        fn a_to_b(&self, routes: &LocalRoutes<Fake>, seq: u32, p: Priority) -> Delivered {
            send_direct(self, routes, &self.envelope(seq, "a", Some("b"), p), "b")
        }

        fn depth(&self) -> i64 {
            self.depth.load(Ordering::Relaxed)
        }
    }

    /// Plans a direct send and applies its route on `routes` (one shard).
    fn send_direct(
        world: &World,
        routes: &LocalRoutes<Fake>,
        envelope: &Arc<Envelope>,
        to: &str,
    ) -> Delivered {
        let plan = plan_direct(envelope, &world.member(to), &world.limits(10_000)).unwrap();
        plan.route
            .map(|route| routes.deliver_route(&route))
            .unwrap_or_default()
    }

    #[test]
    fn a_working_session_gets_now_and_next_waits_for_idle() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let session = Fake::working();
        routes.add(&world.mesh, &b, session.clone());
        assert_eq!(b.live_shards.get(), 1);
        assert_eq!(b.open_shards.get(), 0);
        world.a_to_b(&routes, 1, Priority::Next);
        world.a_to_b(&routes, 2, Priority::Now);
        world.a_to_b(&routes, 3, Priority::Low);
        assert_eq!(session.got(), ["m0002"]);
        assert_eq!(world.depth(), 2);
        // Idle again: the held ones follow in creation order.
        session.busy.set(false);
        routes.status_changed(&world.mesh, &b);
        assert_eq!(b.open_shards.get(), 1);
        let drained = routes.drain_held(&world.mesh, &b, Some(&session));
        assert_eq!(drained.delivered, 2);
        assert_eq!(session.got(), ["m0002", "m0001", "m0003"]);
        assert_eq!(world.depth(), 0);
    }

    #[test]
    fn a_held_now_behind_a_held_next_reaches_a_working_session() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        // Nobody is connected: both are held, `next` first.
        world.a_to_b(&LocalRoutes::new(0), 1, Priority::Next);
        world.a_to_b(&LocalRoutes::new(0), 2, Priority::Now);
        let mut routes = LocalRoutes::new(0);
        let session = Fake::working();
        routes.add(&world.mesh, &b, session.clone());
        assert_eq!(
            routes.drain_held(&world.mesh, &b, Some(&session)).delivered,
            1
        );
        assert_eq!(session.got(), ["m0002"]);
        assert_eq!(b.held.len(), 1);
    }

    #[test]
    fn of_two_sessions_only_the_idle_one_gets_next() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let (busy, idle) = (Fake::working(), Fake::idle());
        routes.add(&world.mesh, &b, busy.clone());
        routes.add(&world.mesh, &b, idle.clone());
        world.a_to_b(&routes, 1, Priority::Next);
        world.a_to_b(&routes, 2, Priority::Now);
        assert_eq!(busy.got(), ["m0002"]);
        assert_eq!(idle.got(), ["m0001", "m0002"]);
        // The busy one turning idle gets nothing its sibling got.
        busy.busy.set(false);
        routes.status_changed(&world.mesh, &b);
        assert_eq!(routes.drain_held(&world.mesh, &b, Some(&busy)).delivered, 0);
        assert_eq!(world.depth(), 0);
    }

    #[test]
    fn a_held_envelope_goes_to_one_session_only() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        world.a_to_b(&LocalRoutes::new(0), 1, Priority::Next);
        let mut routes = LocalRoutes::new(0);
        let (s1, s2) = (Fake::idle(), Fake::idle());
        routes.add(&world.mesh, &b, s1.clone());
        routes.add(&world.mesh, &b, s2.clone());
        assert_eq!(routes.drain_held(&world.mesh, &b, None).delivered, 1);
        assert_eq!(s1.got().len() + s2.got().len(), 1);
    }

    #[test]
    fn a_session_turning_busy_in_flight_makes_its_member_hold() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        let envelope = world.envelope(1, "a", Some("b"), Priority::Next);
        let plan = plan_direct(&envelope, &b, &world.limits(10)).unwrap();
        // The route is in flight when the session says working.
        session.busy.set(true);
        routes.status_changed(&world.mesh, &b);
        let done = routes.deliver_route(plan.route.as_ref().unwrap());
        assert_eq!(done.pushes, 0);
        assert_eq!(done.held.len(), 1);
        assert_eq!(b.held.len(), 1);
    }

    #[test]
    fn broadcast_skips_the_sender_and_members_it_was_held_for() {
        let world = World::new(&["a", "b", "c"]);
        let (a, b, c) = (world.member("a"), world.member("b"), world.member("c"));
        let mut routes = LocalRoutes::new(0);
        let (sa, sb) = (Fake::idle(), Fake::idle());
        routes.add(&world.mesh, &a, sa.clone());
        routes.add(&world.mesh, &b, sb.clone());
        let envelope = world.envelope(1, "a", None, Priority::Next);
        let plan = plan_many(&envelope, Audience::All, &world.limits(10)).unwrap();
        assert_eq!(plan.held.len(), 1);
        // `c` connects before the route is applied: it drains the held copy
        // and must not get the live one too.
        let sc = Fake::idle();
        routes.add(&world.mesh, &c, sc.clone());
        assert_eq!(routes.drain_held(&world.mesh, &c, Some(&sc)).delivered, 1);
        assert_eq!(routes.deliver_route(plan.route.as_ref().unwrap()).pushes, 1);
        assert!(sa.got().is_empty());
        assert_eq!(sb.got(), ["m0001"]);
        assert_eq!(sc.got(), ["m0001"]);
    }

    /// Review bug 1: a broadcast refused for one full queue held nothing.
    #[test]
    fn a_broadcast_refused_for_a_full_queue_holds_nothing() {
        let world = World::new(&["a", "b", "c"]);
        let c = world.member("c");
        for seq in 0..2 {
            plan_direct(
                &world.envelope(seq, "a", Some("c"), Priority::Next),
                &c,
                &world.limits(2),
            )
            .unwrap();
        }
        assert!(plan_many(
            &world.envelope(9, "a", None, Priority::Next),
            Audience::All,
            &world.limits(2)
        )
        .is_err());
        assert!(world.member("b").held.is_empty());
        assert_eq!(world.depth(), 2);
    }

    /// Review bug 2: an acked envelope is held even over the bound.
    #[test]
    fn a_cut_off_session_hands_everything_back_even_over_the_bound() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        session.room.set(25);
        routes.add(&world.mesh, &b, session.clone());
        let plan_cap = 1;
        for seq in 1..=3 {
            let envelope = world.envelope(seq, "a", Some("b"), Priority::Next);
            let plan = plan_direct(&envelope, &b, &world.limits(plan_cap)).unwrap();
            routes.deliver_route(plan.route.as_ref().unwrap());
        }
        // Two were queued, the third overflowed: all three are held.
        assert_eq!(b.held.len(), 3);
        assert_eq!(world.depth(), 3);
    }

    /// Review bug 3: a leaving session hands back before it releases its
    /// slot, so the mesh cannot be evicted with envelopes in it.
    #[test]
    fn leaving_hands_back_before_the_mesh_slot_is_released() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        let orphan = world.envelope(1, "a", Some("b"), Priority::Next);
        // Evict as soon as the slot is free: the hand-back came first.
        assert_eq!(world.directory.evict_idle(), 0);
        routes.leave(
            &world.mesh,
            &b,
            &session,
            vec![Orphan {
                envelope: orphan,
                stored: false,
                shared: false,
            }],
        );
        assert_eq!(
            world.directory.evict_idle(),
            0,
            "held envelopes keep the mesh"
        );
        assert_eq!(b.held.len(), 1);
    }

    #[test]
    fn draining_stops_at_the_sessions_room_and_keeps_order() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        for seq in 1..=3 {
            send_direct(
                &world,
                &LocalRoutes::new(0),
                &world.envelope(seq, "a", Some("b"), Priority::Low),
                "b",
            );
        }
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        session.room.set(25);
        routes.add(&world.mesh, &b, session.clone());
        let drained = routes.drain_held(&world.mesh, &b, Some(&session));
        assert_eq!((drained.delivered, drained.waiting_for_room), (2, true));
        session.room.set(100);
        assert_eq!(
            routes.drain_held(&world.mesh, &b, Some(&session)).delivered,
            1
        );
        assert_eq!(session.got(), ["m0001", "m0002", "m0003"]);
    }

    /// Ids sort by millisecond, then shard: an envelope read later on
    /// shard 0 must still follow one read earlier on shard 1.
    #[test]
    fn held_order_follows_the_read_clock_not_the_shard_in_the_id() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let on_shard = |id: &str, seq: u32| {
            let mut e =
                Arc::into_inner(world.envelope(seq, "a", Some("b"), Priority::Next)).unwrap();
            e.message_id = id.into();
            Arc::new(e)
        };
        b.hold(on_shard("t0001-s01", 1));
        b.hold(on_shard("t0001-s00", 2));
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        routes.drain_held(&world.mesh, &b, Some(&session));
        assert_eq!(session.got(), ["t0001-s01", "t0001-s00"]);
    }

    #[test]
    fn hand_back_keeps_creation_order_across_priorities() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        b.hold(world.envelope(3, "a", Some("b"), Priority::Next));
        b.held.hand_back(vec![
            world.envelope(1, "a", Some("b"), Priority::Low),
            world.envelope(2, "a", Some("b"), Priority::Now),
        ]);
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        routes.drain_held(&world.mesh, &b, Some(&session));
        assert_eq!(session.got(), ["m0001", "m0002", "m0003"]);
    }

    #[test]
    fn what_becomes_held_after_its_ack_is_reported_for_storing() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        let envelope = world.envelope(1, "a", Some("b"), Priority::Next);
        let plan = plan_direct(&envelope, &b, &world.limits(10)).unwrap();
        assert!(plan.held.is_empty(), "live at planning: acked at once");
        session.busy.set(true);
        routes.status_changed(&world.mesh, &b);
        let done = routes.deliver_route(plan.route.as_ref().unwrap());
        assert_eq!(done.late.len(), 1);
        assert!(Arc::ptr_eq(&done.late[0].0, &envelope));
        assert!(envelope.has_holds_in_flight(), "its marks wait for the row");
    }

    #[test]
    fn a_cut_off_session_gives_back_held_envelopes_always_and_live_ones_no_other_session_took() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let (s1, s2) = (Fake::idle(), Fake::idle());
        routes.add(&world.mesh, &b, s1.clone());
        routes.add(&world.mesh, &b, s2.clone());
        let shared = world.envelope(1, "a", Some("b"), Priority::Next);
        let held = world.envelope(2, "a", Some("b"), Priority::Next);
        // Routed while s1 was b's only session: s2, here now, never got it.
        let alone = world.envelope(3, "a", Some("b"), Priority::Next);
        let orphan = |envelope, stored, shared| Orphan {
            envelope,
            stored,
            shared,
        };
        let orphans = vec![
            orphan(shared, false, true),
            orphan(held.clone(), true, false),
            orphan(alone.clone(), false, false),
        ];
        let left = routes.leave(&world.mesh, &b, &s1, orphans);
        assert_eq!(left.late.len(), 1, "the live one s2 never got is stored");
        assert!(Arc::ptr_eq(&left.late[0].0, &alone));
        assert_eq!(b.held.len(), 2);
        assert_eq!(left.drain, 1);
        routes.drain_held(&world.mesh, &b, Some(&s2));
        assert_eq!(s2.got(), ["m0002", "m0003"]);
    }

    /// A live push is shared when another session of its member takes it
    /// too, here or on another shard its route names; a session that
    /// arrives later does not make it so (it was lost when that session
    /// arrived before the cut-off one's teardown).
    #[test]
    fn a_push_is_shared_only_with_the_sessions_it_was_routed_to() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let s1 = Fake::idle();
        routes.add(&world.mesh, &b, s1.clone());
        let first = world.envelope(1, "a", Some("b"), Priority::Now);
        routes.deliver_route(&Route {
            envelope: first,
            targets: Targets::Member(b.clone()),
            shards: 1,
        });
        let s2 = Fake::idle();
        routes.add(&world.mesh, &b, s2.clone());
        let second = world.envelope(2, "a", Some("b"), Priority::Now);
        routes.deliver_route(&Route {
            envelope: second,
            targets: Targets::Member(b.clone()),
            shards: 1,
        });
        let queued: Vec<bool> = s1.queued.borrow().iter().map(|o| o.shared).collect();
        assert_eq!(queued, [false, true]);
    }

    #[test]
    fn held_bytes_bound_a_member_and_are_given_back_on_every_way_out() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let envelope = |seq| world.envelope(seq, "a", Some("b"), Priority::Next);
        let frame = envelope(0).frame.len();
        let by_bytes = HoldLimits {
            max_per_member: 100,
            max_bytes_per_member: 2 * frame,
            budget: &world.budget,
        };
        for seq in 1..=2 {
            plan_direct(&envelope(seq), &b, &by_bytes).unwrap();
        }
        assert_eq!(b.held.bytes(), 2 * frame);
        let refused = plan_direct(&envelope(3), &b, &by_bytes).err();
        assert_eq!(refused, Some(Refused::HeldFull(HeldLimit::Bytes)));
        // The count bound is checked first.
        let refused = plan_direct(&envelope(3), &b, &world.limits(2)).err();
        assert_eq!(refused, Some(Refused::HeldFull(HeldLimit::Count)));
        assert_eq!(b.held.len(), 2);

        // Delivered: the bytes go with the envelopes.
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        assert_eq!(
            routes.drain_held(&world.mesh, &b, Some(&session)).delivered,
            2
        );
        assert_eq!(b.held.bytes(), 0);
        // Handed back, then swept as expired.
        b.held.hand_back(vec![envelope(4)]);
        assert_eq!(b.held.bytes(), frame);
        let later = SystemTime::now() + std::time::Duration::from_secs(7200);
        assert_eq!(world.directory.expire_held(later).len(), 1);
        assert_eq!(b.held.bytes(), 0);
    }

    #[test]
    fn an_expired_held_envelope_is_never_pushed() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let stale = {
            let mut e = Arc::into_inner(world.envelope(1, "a", Some("b"), Priority::Next)).unwrap();
            e.expires_at = SystemTime::now() - std::time::Duration::from_secs(1);
            Arc::new(e)
        };
        b.hold(stale);
        b.hold(world.envelope(2, "a", Some("b"), Priority::Next));
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        let drained = routes.drain_held(&world.mesh, &b, Some(&session));
        assert_eq!(session.got(), ["m0002"]);
        assert_eq!(drained.expired.len(), 1);
        assert_eq!(world.depth(), 0);
    }

    #[test]
    fn the_sweep_drops_expired_envelopes_anywhere_in_the_queue() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        b.hold(world.envelope(1, "a", Some("b"), Priority::Next));
        let later = SystemTime::now() + std::time::Duration::from_secs(7200);
        let expired = world.directory.expire_held(later);
        assert_eq!(expired.len(), 1);
        assert!(Arc::ptr_eq(&expired[0].1, &b));
        assert!(b.held.is_empty());
        assert_eq!(world.depth(), 0);
    }

    #[test]
    fn while_a_mesh_restores_sends_are_held_and_nothing_drains() {
        let world = World::new(&["a", "b"]);
        let b = world.member("b");
        let mut routes = LocalRoutes::new(0);
        let session = Fake::idle();
        routes.add(&world.mesh, &b, session.clone());
        world.mesh.set_restoring(true);
        let envelope = world.envelope(1, "a", Some("b"), Priority::Now);
        let plan = plan_direct(&envelope, &b, &world.limits(10)).unwrap();
        assert!(plan.route.is_none());
        assert_eq!(plan.held.len(), 1, "held behind the backlog");
        assert_eq!(routes.drain_held(&world.mesh, &b, None).delivered, 0);
        world.mesh.set_restoring(false);
        assert_eq!(routes.drain_held(&world.mesh, &b, None).delivered, 1);
        assert_eq!(session.got(), ["m0001"]);
    }

    #[test]
    fn a_send_that_must_be_held_reserves_its_bytes_or_is_refused() {
        let mut world = World::new(&["a", "b", "c"]);
        world.budget = HeldBudget::new(25);
        let b = world.member("b");
        let first = world.envelope(1, "a", Some("b"), Priority::Next);
        plan_direct(&first, &b, &world.limits(10)).unwrap();
        assert_eq!(world.budget.used(), 10);
        plan_many(
            &world.envelope(2, "a", None, Priority::Next),
            Audience::All,
            &world.limits(10),
        )
        .unwrap();
        assert_eq!(world.budget.used(), 20, "one reservation per envelope");
        let refused = plan_direct(
            &world.envelope(3, "a", Some("b"), Priority::Next),
            &b,
            &world.limits(10),
        );
        assert_eq!(refused.err(), Some(Refused::Unavailable));
        assert_eq!(b.held.len(), 2, "a refused send holds nothing");
    }

    fn join(world: &World, member: &str, group: &str) {
        let name = crate::protocol::GroupName::parse(group).unwrap();
        assert_eq!(world.member(member).join_group(name, None), Ok(true));
    }

    #[test]
    fn a_group_send_reaches_subgroups_holds_for_the_absent_and_skips_the_rest() {
        let world = World::new(&["a", "b", "c", "d"]);
        join(&world, "a", "eng");
        join(&world, "b", "eng/backend");
        join(&world, "c", "eng");
        join(&world, "d", "engineering");
        let mut routes = LocalRoutes::new(0);
        let sessions: Vec<Rc<Fake>> = ["a", "b", "d"]
            .iter()
            .map(|m| {
                let s = Fake::idle();
                routes.add(&world.mesh, &world.member(m), s.clone());
                s
            })
            .collect();
        let eng = crate::protocol::GroupName::parse("eng").unwrap();
        let envelope = world.envelope(1, "a", None, Priority::Next);
        let plan = plan_many(&envelope, Audience::Group(&eng), &world.limits(10)).unwrap();
        // `c` is offline: it holds it; the sender's member never gets it.
        assert_eq!(plan.held.len(), 1);
        assert!(Arc::ptr_eq(&plan.held[0].0, &world.member("c")));
        let done = routes.deliver_route(plan.route.as_ref().unwrap());
        assert_eq!(done.pushes, 1);
        let got: Vec<usize> = sessions.iter().map(|s| s.got().len()).collect();
        assert_eq!(got, [0, 1, 0]);
        // A member who joins while the route is in flight does not get it.
        join(&world, "d", "eng");
        routes.deliver_route(plan.route.as_ref().unwrap());
        assert_eq!(sessions[2].got().len(), 0);
    }

    #[test]
    fn a_group_with_nobody_but_the_sender_is_refused() {
        let world = World::new(&["a", "b"]);
        join(&world, "a", "solo");
        let solo = crate::protocol::GroupName::parse("solo").unwrap();
        let nobody = crate::protocol::GroupName::parse("nobody").unwrap();
        for group in [&solo, &nobody] {
            let envelope = world.envelope(1, "a", None, Priority::Now);
            let refused = plan_many(&envelope, Audience::Group(group), &world.limits(10));
            assert_eq!(refused.err(), Some(Refused::NobodyInGroup));
        }
        assert_eq!(world.budget.used(), 0);
    }

    #[test]
    fn peer_events_go_to_those_who_asked_but_never_to_the_own_member() {
        let world = World::new(&["a", "b", "c"]);
        let mut routes = LocalRoutes::new(0);
        let (a1, a2, b, c) = (Fake::idle(), Fake::idle(), Fake::working(), Fake::idle());
        for (member, session) in [("a", &a1), ("a", &a2), ("b", &b), ("c", &c)] {
            routes.add(&world.mesh, &world.member(member), (*session).clone());
        }
        for s in [&a2, &b] {
            s.wants_events.set(true);
        }
        let frame = bytes::Bytes::from_static(b"event");
        // About a session of `a`: `a2` asked but is `a`'s own; `b` is busy
        // but events are never gated; `c` did not ask.
        assert_eq!(
            routes.notify_peers(&world.mesh, &world.member("a"), &frame),
            1
        );
        assert_eq!(
            [
                a1.events.get(),
                a2.events.get(),
                b.events.get(),
                c.events.get()
            ],
            [0, 0, 1, 0]
        );
        assert_eq!(
            routes.notify_peers(&world.mesh, &world.member("c"), &frame),
            2
        );
    }
}
