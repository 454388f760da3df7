//! A shard's state, shared by its tasks (`Rc`): its connections, its slice
//! of the routing table, what it gathers for other shards and the db
//! thread, and what it does with an event from its inbox, a status write,
//! a drain or a sweep.
use super::durable::Durable;
use super::leases::LeaseTimers;
use super::link::{shutdown_socket, SessionLink};
use super::presence::LocalBoard;
use super::signal::LocalSignal;
use crate::audit::AuditEvent;
use crate::cluster::{BusCommand, LOCAL};
use crate::context::BrokerContext;
use crate::db::held::HeldCommand;
use crate::db::DbCommand;
use crate::hook::Status;
use crate::ids::{IdGen, Rfc3339Clock};
use crate::inbox::ShardEvent;
use crate::mesh::deliver::{Drained, LocalRoutes};
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::peers::PeerEvent;
use crate::mesh::plan::{first_shard, Route};
use crate::metrics::{LocalHistograms, ShardMetrics};
use crate::protocol::CloseReason;
use crate::status::Source;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

/// A connection the shard knows about, for shutdown and housekeeping.
pub(super) struct ConnSlot {
    pub(super) fd: RawFd,
    pub(super) session: Option<Rc<SessionLink>>,
}

pub struct Shard {
    pub index: usize,
    pub ctx: Arc<BrokerContext>,
    pub metrics: Arc<ShardMetrics>,
    pub histograms: RefCell<LocalHistograms>,
    pub ids: RefCell<IdGen>,
    pub clock: RefCell<Rfc3339Clock>,
    /// Parsing space shared by the shard's sessions: one per shard rather
    /// than per connection keeps idle connections small.
    pub parser: RefCell<crate::protocol::Parser>,
    pub routes: RefCell<LocalRoutes<SessionLink>>,
    pub(super) conns: RefCell<HashMap<u64, ConnSlot>>,
    pub(super) next_conn: Cell<u64>,
    /// Events for other shards, gathered during one turn of the event loop
    /// and sent by the flusher as one batch per destination.
    pub(super) outgoing: RefCell<Vec<Vec<ShardEvent>>>,
    pub(super) flusher: Cell<Option<Waker>>,
    /// Presence writes gathered for the db thread and handed over together
    /// every `DB_FLUSH`: one cross-thread wakeup per burst, not per hello.
    pub(super) db_outbox: RefCell<Vec<DbCommand>>,
    /// Audit events, gathered and handed over the same way, in one `Vec`.
    pub(super) audit_outbox: RefCell<Vec<AuditEvent>>,
    pub(super) db_flusher: Cell<Option<Waker>>,
    /// Holds, marks and acks of the durable lane (see `durable`).
    pub(super) durable: Durable,
    /// This shard's parts of the meshes' peer boards (see `presence`).
    pub(super) board: LocalBoard,
    /// Deadlines of the leases opened here (see `leases`).
    pub(super) leases: LeaseTimers,
    pub(super) shutdown: LocalSignal,
    pub(super) all_closed: LocalSignal,
}

impl Shard {
    /// Queue a presence write for the db thread (see `db_flush_loop`).
    pub fn to_db(&self, command: DbCommand) {
        self.db_outbox.borrow_mut().push(command);
        if let Some(waker) = self.db_flusher.take() {
            waker.wake();
        }
    }

    /// Queue an audit event for the db thread's audit lane (see
    /// `db_flush_loop`): a push here, one hand-over per flush.
    pub(crate) fn audit(&self, event: AuditEvent) {
        if !self.audits(event.kind.event_type()) {
            return;
        }
        self.audit_outbox.borrow_mut().push(event);
        if let Some(waker) = self.db_flusher.take() {
            waker.wake();
        }
    }

    /// Whether `AUDIT_EVENTS` records this event type: the hot path asks
    /// before it builds an event.
    pub(crate) fn audits(&self, event_type: &str) -> bool {
        self.ctx.config.audit_events.records(event_type)
    }

    pub(super) fn has_db_work(&self) -> bool {
        !self.db_outbox.borrow().is_empty() || !self.audit_outbox.borrow().is_empty()
    }

    pub(super) fn flush_db(&self) {
        let commands = std::mem::take(&mut *self.db_outbox.borrow_mut());
        for command in commands {
            // A full queue means Postgres has been away for long: the db
            // thread counts what it drops; presence rows are best effort.
            let _ = self.ctx.db.try_send(command);
        }
        // Never blocks; what the lane cannot take it counts as dropped.
        self.ctx
            .audit
            .send(std::mem::take(&mut *self.audit_outbox.borrow_mut()));
    }

    /// Tells the bus (when there is one) that this node's sessions of
    /// `mesh` changed, so the other nodes hear of it.
    pub(super) fn cluster_changed(&self, mesh: &Arc<MeshEntry>) {
        if let Some(cluster) = &self.ctx.cluster {
            cluster.mesh_changed(mesh);
        }
    }

    /// Queue an event for another shard (or handle it here, for this one).
    pub fn send_to(&self, dest: usize, event: ShardEvent) {
        if dest == self.index {
            self.process_event(event);
            return;
        }
        self.outgoing.borrow_mut()[dest].push(event);
        self.wake_flusher();
    }

    pub(super) fn wake_flusher(&self) {
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
    }

    pub(super) fn process_event(&self, event: ShardEvent) {
        match event {
            ShardEvent::Route(route) => self.deliver_route(&route),
            ShardEvent::DrainHeld(mesh, member) => self.drain_held(&mesh, &member),
            ShardEvent::Confirmed {
                route,
                ack,
                missing,
            } => self.confirmed(&route, ack, missing),
            ShardEvent::HookStatus {
                conn,
                status,
                reply,
            } => {
                let presence = self.session_of(conn).and_then(|s| Some((s.member()?, s)));
                let answer = presence.map(|((mesh, member), session)| {
                    let presence_id = session.presence_id();
                    self.audit(AuditEvent::hook_status(
                        &mesh,
                        &member,
                        &presence_id,
                        status,
                    ));
                    self.write_status(&session, status, Source::Hook);
                    presence_id
                });
                let _ = reply.send(answer);
            }
            ShardEvent::PeerEvent { mesh, about, frame } => {
                self.deliver_peer_event(&mesh, &about, &frame)
            }
            ShardEvent::Replaced { conn } => self.close_replaced(conn),
            ShardEvent::StrandedLeft { mesh, gone } => self.stranded_left(&mesh, gone),
            ShardEvent::Adopted(envelope) => self.to_lane(HeldCommand::Adopt { envelope }),
            ShardEvent::GiveUp { mesh, entry, reply } => {
                let _ = reply.send(self.give_up(&mesh, &entry));
            }
            ShardEvent::Kick {
                mesh,
                member,
                banned,
            } => self.kick_here(&mesh, &member, banned),
            ShardEvent::Resumed { mesh, entry } => self.board_release(&mesh, &entry),
            ShardEvent::Inferred { conn, status } => {
                if let Some(session) = self.session_of(conn) {
                    let now = Instant::now();
                    let window = self.ctx.config.hook_fresh_window;
                    session.inferred();
                    if session.status().inference_allowed(now, window) {
                        self.write_status(&session, status, Source::Jsonl);
                    }
                    if let Some((mesh, member)) = session.member() {
                        self.routes.borrow().status_changed(&mesh, &member);
                    }
                    // Inference precedes a hello's first drain (see `hello`).
                    self.drain_to_session(&session);
                }
            }
        }
    }

    pub fn deliver_route(&self, route: &Route) {
        let done = self.routes.borrow().deliver_route(route);
        self.store_late(done.late);
        self.request_drains(&route.envelope.mesh, &done.held);
    }

    /// Asks a shard that became able to take envelopes just held (a
    /// non-zero mask) to drain them.
    pub fn request_drains(&self, mesh: &Arc<MeshEntry>, held: &[(Arc<MemberEntry>, u64)]) {
        for (member, now_eligible) in held {
            self.request_drain(mesh, member, *now_eligible);
        }
    }

    /// Ask a shard that has a session of `member` to drain its held queue.
    pub fn request_drain(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        live_shards: u64,
    ) {
        if let Some(dest) = first_shard(live_shards & LOCAL) {
            self.send_to(dest, ShardEvent::DrainHeld(mesh.clone(), member.clone()));
        } else if live_shards != 0 {
            // Live on other nodes only: the bus hands them over.
            if let Some(cluster) = &self.ctx.cluster {
                let _ = cluster.send(BusCommand::Drain {
                    mesh: mesh.clone(),
                    member: member.clone(),
                });
            }
        }
    }

    /// Held envelopes of `member` to one session (its hello, status change,
    /// or room freed).
    pub fn drain_held_to(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        session: &Rc<SessionLink>,
    ) {
        let drained = self.routes.borrow().drain_held(mesh, member, Some(session));
        self.drained(member, drained);
    }

    /// What a drain of `member`'s queue dropped or had handed back goes to
    /// the lane.
    fn drained(&self, member: &Arc<MemberEntry>, mut drained: Drained) -> Drained {
        let expired = std::mem::take(&mut drained.expired);
        self.expired(expired.into_iter().map(|e| (e, member.clone())).collect());
        self.store_late(std::mem::take(&mut drained.late));
        drained
    }

    pub(super) fn drain_to_session(&self, session: &Rc<SessionLink>) {
        if let Some((mesh, member)) = session.member_with_held() {
            self.drain_held_to(&mesh, &member, session);
        }
    }

    pub fn drain_held(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>) {
        let drained = self.routes.borrow().drain_held(mesh, member, None);
        let drained = self.drained(member, drained);
        if drained.delivered == 0 && !drained.waiting_for_room && !member.held.is_empty() {
            // None of our sessions may take what is held (they left or
            // turned busy meanwhile): pass it on to a shard that may.
            let others = member.live_shards.get() & !(1 << self.index);
            self.request_drain(mesh, member, others);
        }
    }

    /// Writes a status from `source` by the PROTOCOL.md §5 rule; a change
    /// reaches routing, the presence row and, when the session may now
    /// take more, its member's held envelopes.
    pub fn write_status(&self, session: &Rc<SessionLink>, status: Status, source: Source) {
        let Some((mesh, member)) = session.member() else {
            return;
        };
        let mut state = session.status();
        let from = state.status;
        let now = Instant::now();
        let changed = state.write(status, source, now, self.ctx.config.hook_fresh_window);
        session.set_status(state);
        let presence_id = session.presence_id();
        if changed {
            self.audit(AuditEvent::status_change(
                &mesh,
                &member,
                &presence_id,
                from,
                state.status,
                state.source,
            ));
        }
        self.to_db(DbCommand::PresenceStatus {
            id: presence_id.into(),
            status: state.status,
            source: state.source,
            at: std::time::SystemTime::now(),
        });
        if changed {
            self.routes.borrow().status_changed(&mesh, &member);
            self.cluster_changed(&mesh);
            if let Some(entry) = session.entry() {
                self.announce(&mesh, &entry, PeerEvent::Status);
            }
            self.drain_to_session(session);
        }
    }

    /// The TTL sweep: sessions `working` longer than `STATUS_TTL_SECONDS`
    /// flip to idle (source jsonl), which releases what is held for them.
    pub(super) fn sweep_statuses(&self, now: Instant) {
        let ttl = self.ctx.config.status_ttl;
        let expired: Vec<Rc<SessionLink>> = self
            .sessions()
            .into_iter()
            .filter(|s| s.member().is_some() && s.status().ttl_expired(now, ttl))
            .collect();
        for session in &expired {
            self.write_status(session, Status::Idle, Source::Jsonl);
        }
        self.ctx
            .metrics
            .global()
            .ttl_sweep(self.index == 0, expired.len() as u64);
    }

    /// Asks the transcript reader what a session's transcript says; the
    /// answer comes back through this shard's inbox. False when there is
    /// no reader or its queue is full.
    pub fn request_inference(&self, conn: u64, cwd: &str) -> bool {
        let Some(reader) = &self.ctx.transcripts else {
            return false;
        };
        let inbox = self.ctx.shards[self.index].clone();
        reader.request(
            cwd.to_owned(),
            Box::new(move |status| {
                let _ = inbox.try_send(vec![ShardEvent::Inferred { conn, status }]);
            }),
        )
    }

    pub(super) fn session_of(&self, conn: u64) -> Option<Rc<SessionLink>> {
        self.conns.borrow().get(&conn)?.session.clone()
    }

    pub(super) fn sessions(&self) -> Vec<Rc<SessionLink>> {
        self.conns
            .borrow()
            .values()
            .filter_map(|c| c.session.clone())
            .collect()
    }

    pub(super) fn register_conn(&self, fd: RawFd) -> u64 {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        self.conns
            .borrow_mut()
            .insert(id, ConnSlot { fd, session: None });
        id
    }

    pub(super) fn attach_session(&self, conn: u64, session: Rc<SessionLink>) {
        if let Some(slot) = self.conns.borrow_mut().get_mut(&conn) {
            slot.session = Some(session);
        }
    }

    pub(super) fn unregister_conn(&self, conn: u64) {
        let mut conns = self.conns.borrow_mut();
        conns.remove(&conn);
        if conns.is_empty() && self.shutdown.is_fired() {
            self.all_closed.fire();
        }
    }

    pub(super) fn is_shutting_down(&self) -> bool {
        self.shutdown.is_fired()
    }

    /// Shutdown: WebSockets get a 1001 close; idle HTTP keep-alive sockets
    /// are shut so their pending reads end.
    pub(super) fn close_all(&self) {
        let conns: Vec<(RawFd, Option<Rc<SessionLink>>)> = self
            .conns
            .borrow()
            .values()
            .map(|c| (c.fd, c.session.clone()))
            .collect();
        if conns.is_empty() {
            self.all_closed.fire();
        }
        for (fd, session) in conns {
            match session {
                Some(session) => session.close(CloseReason::Shutdown),
                None => shutdown_socket(fd),
            }
        }
    }

    pub(super) fn check_liveness(&self, now: Instant) {
        let config = &self.ctx.config;
        for session in self.sessions() {
            session.tick(now, config.ping_interval, config.ping_timeout);
        }
    }
}
