//! One shard: a pinned thread running a monoio runtime (io_uring, or epoll
//! where io_uring cannot start) with its own SO_REUSEPORT listener. The shard
//! owns its connections and its slice of each mesh's routing table; it talks
//! to other shards only through their inboxes, in batches.
//!
//! - `conn`     — HTTP/1.1 on an accepted socket; hands upgrades to `session`.
//! - `session`  — one WebSocket peer: reader loop, writer task, hello, send.
//! - `link`     — what routing and housekeeping hold of a live session.
//! - `outbound` — a connection's bounded queue of encoded frames.
//! - `inbox`    — the cross-thread channel into a shard, with its wakeup.
//! - `close`    — typed close reasons.
//! - `signal`   — a one-shot signal shared by one shard's tasks.
mod close;
mod conn;
pub mod inbox;
pub mod link;
pub mod outbound;
mod session;
mod signal;

pub use close::CloseReason;

use crate::broker::BrokerContext;
use crate::config::IoDriver;
use crate::db::DbCommand;
use crate::hook::Status;
use crate::ids::{IdGen, Rfc3339Clock};
use crate::mesh::deliver::LocalRoutes;
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::plan::{first_shard, Route};
use crate::metrics::{LocalHistograms, ShardMetrics};
use crate::status::Source;
use inbox::{Inbox, InboxSender, Wakeup};
use link::{shutdown_socket, SessionLink};
use signal::LocalSignal;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// What crosses from one shard to another.
pub enum ShardEvent {
    /// Deliver a routed envelope to this shard's sessions of its targets.
    Route(Arc<Route>),
    /// A member's held queue has envelopes and this shard has a session of it.
    DrainHeld(Arc<MeshEntry>, Arc<MemberEntry>),
    /// A hook signal for a session of this shard; answered with its
    /// presence id, or `None` when the session is gone.
    HookStatus {
        conn: u64,
        status: Status,
        reply: tokio::sync::oneshot::Sender<Option<Box<str>>>,
    },
    /// What a session's transcript says (from the transcript reader).
    Inferred { conn: u64, status: Status },
}

/// Items are batches: one per sending shard per wakeup.
pub type ShardSender = InboxSender<Vec<ShardEvent>>;
pub type ShardInbox = Inbox<Vec<ShardEvent>>;

/// Inbox capacity in batches; a full inbox keeps the batch on the sending
/// shard and retries, it never drops.
pub const INBOX_BATCHES: usize = 4096;
/// Batches drained per inbox wakeup before yielding to sockets.
const INBOX_DRAIN: usize = 64;
/// How long connections get to finish their close handshake at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Housekeeping period: histograms, liveness, revocations.
const TICK: Duration = Duration::from_secs(1);
/// Housekeeping runs at least this often when the test knobs shorten the
/// ping interval.
const MIN_TICK: Duration = Duration::from_millis(10);
/// How long presence writes gather on the shard before the db thread gets them.
const DB_FLUSH: Duration = Duration::from_millis(5);

pub struct ShardSpec {
    pub index: usize,
    pub listener: std::net::TcpListener,
    pub core: Option<core_affinity::CoreId>,
    pub inbox: ShardInbox,
}

/// A connection the shard knows about, for shutdown and housekeeping.
struct ConnSlot {
    fd: RawFd,
    session: Option<Rc<SessionLink>>,
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
    conns: RefCell<HashMap<u64, ConnSlot>>,
    next_conn: Cell<u64>,
    /// Events for other shards, gathered during one turn of the event loop
    /// and sent by the flusher as one batch per destination.
    outgoing: RefCell<Vec<Vec<ShardEvent>>>,
    flusher: Cell<Option<Waker>>,
    /// Presence writes gathered for the db thread and handed over together
    /// every `DB_FLUSH`: one cross-thread wakeup per burst, not per hello.
    db_outbox: RefCell<Vec<DbCommand>>,
    db_flusher: Cell<Option<Waker>>,
    shutdown: LocalSignal,
    all_closed: LocalSignal,
}

/// Starts the shard's thread, named `shard-N` and pinned to its core. A
/// panic ends the thread; `panicked` then hears the shard's index, so the
/// broker stops instead of limping on with a dead shard.
pub fn spawn(
    spec: ShardSpec,
    ctx: Arc<BrokerContext>,
    panicked: crossbeam_channel::Sender<usize>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("shard-{}", spec.index))
        .spawn(move || {
            let _notice = PanicNotice {
                index: spec.index,
                panicked,
            };
            if let Some(core) = spec.core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(target: "shard", shard = spec.index, "pin failed");
                }
            }
            match build_runtime(spec.index, ctx.config.io_driver) {
                Ok(mut rt) => rt.block_on(run(spec, ctx)),
                Err(e) => {
                    tracing::error!(target: "shard", shard = spec.index, error = %e, "runtime failed");
                }
            }
        })
}

/// Dropped as the shard's thread ends; tells the broker if it unwinds.
struct PanicNotice {
    index: usize,
    panicked: crossbeam_channel::Sender<usize>,
}

impl Drop for PanicNotice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.panicked.send(self.index);
        }
    }
}

type ShardRuntime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// io_uring first; the epoll driver where io_uring is missing or refused
/// (old kernel, seccomp, memlock limits).
fn build_runtime(index: usize, driver: IoDriver) -> std::io::Result<ShardRuntime> {
    if driver == IoDriver::Epoll {
        tracing::info!(target: "shard", shard = index, driver = "epoll", "shard runtime");
        return epoll_runtime();
    }
    let uring = if monoio::utils::detect_uring() {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()
    } else {
        Err(std::io::Error::other("io_uring not available"))
    };
    match uring {
        Ok(rt) => {
            tracing::info!(target: "shard", shard = index, driver = "io_uring", "shard runtime");
            Ok(rt.into())
        }
        Err(e) => {
            tracing::warn!(target: "shard", shard = index, driver = "epoll", error = %e, "io_uring unavailable");
            epoll_runtime()
        }
    }
}

fn epoll_runtime() -> std::io::Result<ShardRuntime> {
    Ok(monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?
        .into())
}

async fn run(spec: ShardSpec, ctx: Arc<BrokerContext>) {
    let shards = ctx.shards.len();
    let shard = Rc::new(Shard {
        index: spec.index,
        metrics: ctx.metrics.shard(spec.index).clone(),
        histograms: RefCell::new(LocalHistograms::new()),
        ids: RefCell::new(IdGen::new(spec.index as u16)),
        clock: RefCell::new(Rfc3339Clock::default()),
        parser: RefCell::new(crate::protocol::Parser::default()),
        routes: RefCell::new(LocalRoutes::new(spec.index)),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
        outgoing: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
        flusher: Cell::new(None),
        db_outbox: RefCell::new(Vec::new()),
        db_flusher: Cell::new(None),
        shutdown: LocalSignal::default(),
        all_closed: LocalSignal::default(),
        ctx,
    });
    let listener = match monoio::net::TcpListener::from_std(spec.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(target: "shard", shard = spec.index, error = %e, "listener failed");
            return;
        }
    };
    monoio::spawn(inbox_loop(shard.clone(), spec.inbox));
    monoio::spawn(flush_loop(shard.clone()));
    monoio::spawn(db_flush_loop(shard.clone()));
    monoio::spawn(housekeeping(shard.clone()));
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    monoio::spawn(conn::serve(shard.clone(), stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(target: "shard", shard = shard.index, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shard.shutdown.wait() => break,
        }
    }
    drop(listener);
    shard.close_all();
    let _ = monoio::time::timeout(SHUTDOWN_GRACE, shard.all_closed.wait()).await;
    // The closed sessions' presence rows go to the db thread, which the
    // broker stops only after every shard has returned.
    shard.flush_db();
    shard.histograms.borrow_mut().publish(&shard.metrics);
}

async fn inbox_loop(shard: Rc<Shard>, inbox: ShardInbox) {
    let mut batches = Vec::with_capacity(INBOX_DRAIN);
    loop {
        match inbox.next_batch(&mut batches, INBOX_DRAIN).await {
            Wakeup::Shutdown => {
                shard.shutdown.fire();
                return;
            }
            Wakeup::Items => {
                for batch in batches.drain(..) {
                    for event in batch {
                        shard.process_event(event);
                    }
                }
            }
        }
        // Let the sockets written to by this batch run before the next one.
        signal::yield_now().await;
    }
}

/// Sends what this turn of the loop gathered for other shards, one batch per
/// destination. A full inbox keeps the batch here and is retried shortly.
async fn flush_loop(shard: Rc<Shard>) {
    loop {
        poll_fn(|cx| {
            if shard.outgoing.borrow().iter().any(|b| !b.is_empty()) {
                return Poll::Ready(());
            }
            shard.flusher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        // Yield once so every task runnable in this turn adds to the batch.
        signal::yield_now().await;
        let mut blocked = false;
        for (dest, sender) in shard.ctx.shards.iter().enumerate() {
            let batch = std::mem::take(&mut shard.outgoing.borrow_mut()[dest]);
            if batch.is_empty() {
                continue;
            }
            if let Err(batch) = sender.try_send(batch) {
                let mut outgoing = shard.outgoing.borrow_mut();
                let newer = std::mem::replace(&mut outgoing[dest], batch);
                outgoing[dest].extend(newer);
                blocked = true;
            }
        }
        if blocked {
            monoio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}

/// Hands the gathered presence writes to the db thread. They are not on
/// any client's path, so a few milliseconds of gathering cost nothing and
/// spare the db thread a wakeup per command.
async fn db_flush_loop(shard: Rc<Shard>) {
    loop {
        poll_fn(|cx| {
            if !shard.db_outbox.borrow().is_empty() {
                return Poll::Ready(());
            }
            shard.db_flusher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if !shard.is_shutting_down() {
            monoio::time::sleep(DB_FLUSH).await;
        }
        shard.flush_db();
    }
}

async fn housekeeping(shard: Rc<Shard>) {
    let config = &shard.ctx.config;
    let tick = TICK
        .min(config.ping_interval / 2)
        .min(config.sweep_interval)
        .max(MIN_TICK);
    let mut next_sweep = Instant::now() + config.sweep_interval;
    loop {
        monoio::time::sleep(tick).await;
        let now = Instant::now();
        shard.histograms.borrow_mut().publish(&shard.metrics);
        shard.check_liveness(now);
        for session in shard.routes.borrow().revoked_sessions() {
            session.close(CloseReason::Revoked);
        }
        if now >= next_sweep {
            next_sweep = now + config.sweep_interval;
            shard.sweep_statuses(now);
            if shard.index == 0 {
                shard.ctx.hooks.sweep_pending(now);
                shard
                    .ctx
                    .hook_limiter
                    .lock()
                    .expect("hook limiter lock")
                    .gc(now);
            }
        }
    }
}

impl Shard {
    /// Queue a presence write for the db thread (see `db_flush_loop`).
    pub fn to_db(&self, command: DbCommand) {
        self.db_outbox.borrow_mut().push(command);
        if let Some(waker) = self.db_flusher.take() {
            waker.wake();
        }
    }

    fn flush_db(&self) {
        let commands = std::mem::take(&mut *self.db_outbox.borrow_mut());
        for command in commands {
            // A full queue means Postgres has been away for long: the db
            // thread counts what it drops; presence rows are best effort.
            let _ = self.ctx.db.try_send(command);
        }
    }

    /// Queue an event for another shard (or handle it here, for this one).
    pub fn send_to(&self, dest: usize, event: ShardEvent) {
        if dest == self.index {
            self.process_event(event);
            return;
        }
        self.outgoing.borrow_mut()[dest].push(event);
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
    }

    fn process_event(&self, event: ShardEvent) {
        match event {
            ShardEvent::Route(route) => self.deliver_route(&route),
            ShardEvent::DrainHeld(mesh, member) => self.drain_held(&mesh, &member),
            ShardEvent::HookStatus {
                conn,
                status,
                reply,
            } => {
                let presence = self.session_of(conn).filter(|s| s.member().is_some());
                let answer = presence.map(|session| {
                    self.write_status(&session, status, Source::Hook);
                    session.presence_id()
                });
                let _ = reply.send(answer);
            }
            ShardEvent::Inferred { conn, status } => {
                if let Some(session) = self.session_of(conn) {
                    let now = Instant::now();
                    let window = self.ctx.config.hook_fresh_window;
                    if session.status().inference_allowed(now, window) {
                        self.write_status(&session, status, Source::Jsonl);
                    }
                    // Inference precedes a hello's first drain (see `hello`).
                    self.drain_to_session(&session);
                }
            }
        }
    }

    pub fn deliver_route(&self, route: &Route) {
        let done = self.routes.borrow().deliver_route(route);
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
        if let Some(dest) = first_shard(live_shards) {
            self.send_to(dest, ShardEvent::DrainHeld(mesh.clone(), member.clone()));
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
        self.routes.borrow().drain_held(mesh, member, Some(session));
    }

    fn drain_to_session(&self, session: &Rc<SessionLink>) {
        if let Some((mesh, member)) = session.member_with_held() {
            self.drain_held_to(&mesh, &member, session);
        }
    }

    pub fn drain_held(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>) {
        let drained = self.routes.borrow().drain_held(mesh, member, None);
        if drained.delivered == 0 && !drained.waiting_for_room && !member.held.is_empty() {
            // None of our sessions may take what is held (they left or
            // turned busy meanwhile): pass it on to a shard that may.
            let others = crate::protocol::Priority::ALL
                .iter()
                .fold(0, |mask, &p| mask | member.shards_for(p))
                & !(1 << self.index);
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
        let now = Instant::now();
        let changed = state.write(status, source, now, self.ctx.config.hook_fresh_window);
        session.set_status(state);
        self.to_db(DbCommand::PresenceStatus {
            id: session.presence_id().into(),
            status: state.status,
            source: state.source,
            at: std::time::SystemTime::now(),
        });
        if changed {
            self.routes.borrow().status_changed(&mesh, &member);
            self.drain_to_session(session);
        }
    }

    /// The TTL sweep: sessions `working` longer than `STATUS_TTL_SECONDS`
    /// flip to idle (source jsonl), which releases what is held for them.
    fn sweep_statuses(&self, now: Instant) {
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

    fn session_of(&self, conn: u64) -> Option<Rc<SessionLink>> {
        self.conns.borrow().get(&conn)?.session.clone()
    }

    fn sessions(&self) -> Vec<Rc<SessionLink>> {
        self.conns
            .borrow()
            .values()
            .filter_map(|c| c.session.clone())
            .collect()
    }

    fn register_conn(&self, fd: RawFd) -> u64 {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        self.conns
            .borrow_mut()
            .insert(id, ConnSlot { fd, session: None });
        id
    }

    fn attach_session(&self, conn: u64, session: Rc<SessionLink>) {
        if let Some(slot) = self.conns.borrow_mut().get_mut(&conn) {
            slot.session = Some(session);
        }
    }

    fn unregister_conn(&self, conn: u64) {
        let mut conns = self.conns.borrow_mut();
        conns.remove(&conn);
        if conns.is_empty() && self.shutdown.is_fired() {
            self.all_closed.fire();
        }
    }

    fn is_shutting_down(&self) -> bool {
        self.shutdown.is_fired()
    }

    /// Shutdown: WebSockets get a 1001 close; idle HTTP keep-alive sockets
    /// are shut so their pending reads end.
    fn close_all(&self) {
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

    fn check_liveness(&self, now: Instant) {
        let config = &self.ctx.config;
        for session in self.sessions() {
            session.tick(now, config.ping_interval, config.ping_timeout);
        }
    }
}
