//! What the shard (routing, hooks, housekeeping, shutdown) holds of a live
//! WebSocket session: its outbound queue, its status, whose envelopes it
//! takes, and its liveness clock. The session task itself owns the
//! socket's read side and the protocol state.
use super::outbound::{Outbound, Stamp};
use crate::mesh::deliver::{Delivery, Recipient};
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::held::priority_bit;
use crate::mesh::lease::SessionLeases;
use crate::mesh::peers::SessionEntry;
use crate::mesh::{Envelope, Orphan};
use crate::protocol::CloseReason;
use crate::protocol::{self, Priority};
use crate::status::StatusState;
use crate::ws::{self, OpCode};
use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a closing peer gets to answer our close frame (or, when it is
/// too slow to read, to take it) before the socket is shut.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A `client_ack` session's leases and their bound.
pub struct LeaseBound {
    pub held: SessionLeases,
    pub max_count: usize,
    pub max_bytes: usize,
}

pub struct SessionLink {
    fd: RawFd,
    /// Its connection's id on its shard.
    pub conn: u64,
    pub out: Outbound,
    last_heard: Cell<Instant>,
    last_ping: Cell<Instant>,
    closing: Cell<Option<CloseReason>>,
    shut_at: Cell<Option<Instant>>,
    /// Until the hello is accepted: when it must have been
    /// (`HELLO_TIMEOUT_SECONDS` from accept).
    hello_by: Cell<Option<Instant>>,
    /// Set at hello: whose envelopes this session receives.
    member: RefCell<Option<(Arc<MeshEntry>, Arc<MemberEntry>)>>,
    /// Set at hello: the session it holds (its presence), shared with the
    /// directory and with a later connection that resumes it.
    entry: RefCell<Option<Arc<SessionEntry>>>,
    /// Its own copy of the entry's status: routing reads it on every push.
    status: Cell<StatusState>,
    /// It asked for peer events (`hello.capabilities`).
    peer_events: Cell<bool>,
    /// Set when it asked for `client_ack`: its written pushes are leases
    /// (PROTOCOL.md §11), bounded by count and bytes.
    leases: RefCell<Option<LeaseBound>>,
    /// A transcript read is on its way before held envelopes are released
    /// (PROTOCOL.md §5): until it answers, the session takes `now` only, as
    /// if working (whatever says `next` meanwhile is held, then drained).
    inferring: Cell<bool>,
    orphans: RefCell<Vec<Orphan>>,
    /// Set once the teardown took the orphans: later ones go straight back.
    torn_down: Cell<bool>,
}

/// Ends a socket's pending reads and writes so its tasks finish.
pub(crate) fn shutdown_socket(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor the shard still owns; errors (e.g.
    // already disconnected) are harmless here.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

impl SessionLink {
    pub fn new(fd: RawFd, conn: u64, outbound_limit: usize, hello_by: Instant) -> Self {
        let now = Instant::now();
        SessionLink {
            fd,
            conn,
            out: Outbound::new(outbound_limit),
            last_heard: Cell::new(now),
            last_ping: Cell::new(now),
            closing: Cell::new(None),
            shut_at: Cell::new(None),
            hello_by: Cell::new(Some(hello_by)),
            member: RefCell::new(None),
            entry: RefCell::new(None),
            status: Cell::new(StatusState::new(now)),
            peer_events: Cell::new(false),
            leases: RefCell::new(None),
            inferring: Cell::new(false),
            orphans: RefCell::new(Vec::new()),
            torn_down: Cell::new(false),
        }
    }

    /// At hello, before the session is routed to: whose envelopes it takes,
    /// the session it holds (with the status it starts or resumes with),
    /// and whether it wants peer events.
    pub fn joined(&self, mesh: &Arc<MeshEntry>, entry: &Arc<SessionEntry>, peer_events: bool) {
        self.hello_by.set(None);
        *self.member.borrow_mut() = Some((mesh.clone(), entry.member.clone()));
        self.status.set(entry.state().status);
        *self.entry.borrow_mut() = Some(entry.clone());
        self.peer_events.set(peer_events);
    }

    pub fn member(&self) -> Option<(Arc<MeshEntry>, Arc<MemberEntry>)> {
        self.member.borrow().clone()
    }

    /// From its hello on, its written pushes are leases.
    pub fn lease_pushes(&self, max_count: usize, max_bytes: usize) {
        *self.leases.borrow_mut() = Some(LeaseBound {
            held: SessionLeases::default(),
            max_count,
            max_bytes,
        });
    }

    pub fn is_leasing(&self) -> bool {
        self.leases.borrow().is_some()
    }

    /// Its leases, when it leases pushes.
    pub fn leases(&self) -> std::cell::RefMut<'_, Option<LeaseBound>> {
        self.leases.borrow_mut()
    }

    /// Whether one more push of `bytes` stays within its lease bound;
    /// leases acked through other sessions are forgotten first when it
    /// looks full.
    fn lease_room(&self, member: &MemberEntry, bytes: usize) -> bool {
        let mut leases = self.leases.borrow_mut();
        let Some(bound) = leases.as_mut() else {
            return true;
        };
        if bound.held.has_room(bytes, bound.max_count, bound.max_bytes) {
            return true;
        }
        bound
            .held
            .prune(|id, token| member.leases.is_open(id, token));
        bound.held.has_room(bytes, bound.max_count, bound.max_bytes)
    }

    pub fn entry(&self) -> Option<Arc<SessionEntry>> {
        self.entry.borrow().clone()
    }

    pub fn presence_id(&self) -> Box<str> {
        self.entry
            .borrow()
            .as_ref()
            .map_or_else(|| "".into(), |e| e.presence_id.clone())
    }

    pub fn status(&self) -> StatusState {
        self.status.get()
    }

    /// Records a status, in the shared entry too; the caller tells routing
    /// (`status_changed`).
    pub fn set_status(&self, status: StatusState) {
        self.status.set(status);
        if let Some(entry) = &*self.entry.borrow() {
            entry.set_status(status);
        }
    }

    /// Takes `now` only until the transcript's answer (`inferred`); the
    /// caller tells routing.
    pub fn start_inference(&self) {
        self.inferring.set(true);
    }

    pub fn inferred(&self) {
        self.inferring.set(false);
    }

    /// The member, when it has envelopes held that this session may take.
    /// Asked after every socket write: one atomic load when nothing is held.
    pub fn member_with_held(&self) -> Option<(Arc<MeshEntry>, Arc<MemberEntry>)> {
        let joined = self.member.borrow();
        let (_, member) = joined.as_ref()?;
        let entry = self.entry.borrow();
        // What was sent to this session's key waits in its own queue.
        let own = entry
            .as_ref()
            .and_then(|e| e.held.as_deref())
            .map(|h| &h.queue)
            .filter(|q| !q.is_empty());
        if member.held.is_empty() && own.is_none() {
            return None;
        }
        let accepted = Priority::ALL
            .iter()
            .filter(|&&p| self.accepts(p))
            .fold(0, |mask, &p| mask | priority_bit(p));
        if member.held.has_any(accepted) || own.is_some_and(|q| q.has_any(accepted)) {
            joined.clone()
        } else {
            None
        }
    }

    /// Any frame from the peer proves it alive.
    pub fn heard(&self, now: Instant) {
        self.last_heard.set(now);
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closing.get()
    }

    /// Starts a broker-side close: the close frame goes out after what is
    /// queued (or instead of it, for a slow reader), and the socket is shut
    /// if the peer has not finished the handshake within the grace period.
    /// What a slow reader's queue still held is kept for the session's
    /// teardown to hand back to its member (see `take_orphans`).
    pub fn close(&self, reason: CloseReason) {
        let orphans = self.start_close(reason);
        self.orphans.borrow_mut().extend(orphans);
    }

    /// Envelopes this session was cut off before writing, at its teardown.
    pub fn take_orphans(&self) -> Vec<Orphan> {
        self.torn_down.set(true);
        std::mem::take(&mut *self.orphans.borrow_mut())
    }

    /// The peer is gone: nothing more is written. What was never written
    /// (`unwritten`, and what is still queued) is kept for the teardown;
    /// after it, it is returned for the caller to give back.
    pub fn abort(&self, mut unwritten: Vec<Orphan>) -> Vec<Orphan> {
        unwritten.extend(self.out.abort());
        if self.torn_down.get() {
            return unwritten;
        }
        self.orphans.borrow_mut().extend(unwritten);
        Vec::new()
    }

    /// `close`, returning the envelopes a slow reader's queue still held.
    fn start_close(&self, reason: CloseReason) -> Vec<Orphan> {
        if self.closing.get().is_some() {
            return Vec::new();
        }
        self.closing.set(Some(reason));
        let grace = match reason {
            CloseReason::Timeout => Duration::ZERO,
            _ => CLOSE_GRACE,
        };
        self.shut_at.set(Some(Instant::now() + grace));
        self.out.close(
            ws::close_frame(reason.code(), reason.as_str()),
            reason == CloseReason::SlowReader,
        )
    }

    /// Records that the peer closed first; our answer echoes its code.
    pub fn peer_closed(&self, code: Option<u16>) {
        if self.closing.get().is_none() {
            self.closing.set(Some(CloseReason::ClientClosed));
            self.out
                .close(ws::close_frame(code.unwrap_or(1000), ""), false);
        }
    }

    /// Each housekeeping tick: ping, time out, or shut a close that overran
    /// its grace.
    pub fn tick(&self, now: Instant, ping_interval: Duration, ping_timeout: Duration) {
        if let Some(at) = self.shut_at.get() {
            if now >= at {
                self.shut_at.set(None);
                shutdown_socket(self.fd);
            }
            return;
        }
        if self.hello_by.get().is_some_and(|by| now >= by) {
            self.close(CloseReason::HelloTimeout);
        } else if now.duration_since(self.last_heard.get()) >= ping_timeout {
            self.close(CloseReason::Timeout);
        } else if now.duration_since(self.last_ping.get()) >= ping_interval {
            self.last_ping.set(now);
            // A full queue here means a slow reader: push() cuts it off.
            self.send_control(OpCode::Ping, b"");
        }
    }

    pub fn send_control(&self, opcode: OpCode, payload: &[u8]) {
        if self
            .out
            .push(ws::encode_server_frame(opcode, payload), None)
            .is_err()
        {
            self.close(CloseReason::SlowReader);
        }
    }

    /// Queue the ack of a send.
    pub fn ack(&self, ack: &protocol::Ack<'_>, stamp: Option<Stamp>) {
        let mut json = Vec::with_capacity(112);
        protocol::write_ack(&mut json, ack);
        self.reply(ws::encode_server_frame(OpCode::Text, &json), stamp);
    }

    /// Queue a frame this session answers with (ack, error, hello_ack).
    pub fn reply(&self, frame: bytes::Bytes, stamp: Option<Stamp>) {
        if self.out.push(frame, stamp).is_err() {
            self.close(CloseReason::SlowReader);
        }
    }

    /// Shut the socket now (the peer is gone or the shard is done waiting).
    pub fn shut(&self) {
        shutdown_socket(self.fd);
    }
}

impl Recipient for SessionLink {
    fn accepts(&self, priority: Priority) -> bool {
        self.closing.get().is_none()
            && (priority == Priority::Now
                || (!self.inferring.get() && self.status.get().accepts(priority)))
    }

    fn deliver(&self, envelope: &Arc<Envelope>, stored: bool, shared: bool) -> Delivery {
        if self.closing.get().is_some() {
            return Delivery::Refused;
        }
        // Only a held envelope can be one a lapsed lease put back.
        let mut redelivered = false;
        if stored || self.is_leasing() {
            let member = self.member.borrow();
            let member = &member.as_ref().expect("routed after hello").1;
            redelivered = stored && member.redeliveries.contains(&envelope.message_id);
            // A reader that leaves its leases unacked is a slow reader.
            if !self.lease_room(member, envelope.frame.len()) {
                return Delivery::CutOff(self.start_close(CloseReason::SlowReader));
            }
        }
        match self
            .out
            .push_envelope(envelope, stored, shared, redelivered)
        {
            Ok(()) => Delivery::Taken,
            Err(_) => Delivery::CutOff(self.start_close(CloseReason::SlowReader)),
        }
    }

    fn room(&self) -> usize {
        if self.closing.get().is_some() {
            0
        } else {
            self.out.room()
        }
    }

    fn wants_peer_events(&self) -> bool {
        self.peer_events.get()
    }

    fn notify(&self, frame: &bytes::Bytes) -> bool {
        if self.closing.get().is_some() {
            return false;
        }
        self.reply(frame.clone(), None);
        self.closing.get().is_none()
    }

    fn session(&self) -> Option<Arc<SessionEntry>> {
        self.entry()
    }
}
