//! Who is on a mesh (PROTOCOL.md §9): each session of a member, live on one
//! shard's connection or away in its grace, and the mesh-wide directory
//! `list_peers` reads.
//!
//! A session is a `SessionEntry` shared by every shard: its member keeps
//! the list of its sessions (locked only at hello, teardown and the end of
//! a grace), which is how a hello on any shard finds the session it
//! resumes or replaces. What changes often (status, summary) is read from
//! the entry when a list is written, so only arrivals and departures
//! republish anything.
//!
//! A `session_hello` session (§9) is known by its own key too: its entry
//! carries the key and a queue of what was sent to that key and waits for
//! it alone, and each mesh keeps `SessionKeys`, the key → session index a
//! direct send consults when its target is no member's key (and, once the
//! session has ended, key → member).
//!
//! The directory is a `PeerBoard` per mesh: one immutable snapshot per
//! shard of the sessions it hosts, swapped in whole by that shard (at most
//! once per `PUBLISH_EVERY`) and read by any shard without a lock. A
//! session taken over by another shard is listed only by the shard that
//! holds it now, so a list never shows it twice.
use super::directory::MemberEntry;
use super::held::HeldQueue;
use super::Envelope;
use crate::config::MAX_SHARDS;
use crate::protocol::{write_peer, write_peer_event, GroupRole, PeerFields, PeersListWriter};
use crate::status::StatusState;
use crate::ws::{self, OpCode};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use rustc_hash::FxHashMap;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::identity::{names_session, session_hash};
use super::stranded::{Stranded, StrandedSessions};

/// Where a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Its connection `conn` on `shard`.
    Live { shard: usize, conn: u64 },
    /// Its socket was lost; `shard` keeps it listed and ends it after the
    /// grace unless it is resumed first. `spell` tells that shard's timer
    /// whether this is still the absence it was started for.
    Away { shard: usize, spell: u64 },
}

impl Holder {
    pub fn shard(self) -> usize {
        match self {
            Holder::Live { shard, .. } | Holder::Away { shard, .. } => shard,
        }
    }
}

/// What may change during a session's life.
#[derive(Clone)]
pub struct SessionState {
    pub display_name: Arc<str>,
    pub status: StatusState,
    pub summary: Option<Arc<str>>,
    pub holder: Holder,
    /// Counts the session's absences (see `Holder::Away`).
    spells: u64,
}

/// One session of a member (one presence row), shared by every shard.
pub struct SessionEntry {
    pub presence_id: Box<str>,
    pub session_id: Box<str>,
    pub member: Arc<MemberEntry>,
    pub pid: i32,
    pub cwd: Box<str>,
    /// RFC 3339, when its presence began.
    pub connected_at: Box<str>,
    /// Its own key, for a `session_hello` session (lowercase hex); `None`
    /// for a `hello` one, which speaks with its member's key.
    pub session_pubkey: Option<Box<str>>,
    /// What was sent to its session key and waits for it (a `session_hello`
    /// session only; see `SessionHeld`).
    pub held: Option<Box<SessionHeld>>,
    state: Mutex<SessionState>,
}

/// Envelopes sent to a session's key that it cannot take yet (PROTOCOL.md
/// §9): they wait for that session alone. When the session ends they move
/// to its member's queue; `ended`, checked under the same lock as every
/// hold, makes sure none is put here after that move.
pub struct SessionHeld {
    ended: Mutex<bool>,
    pub queue: HeldQueue,
}

impl SessionHeld {
    fn new(queue: HeldQueue) -> Self {
        SessionHeld {
            ended: Mutex::new(false),
            queue,
        }
    }
}

/// A session's key, role and what waits for it alone.
impl SessionEntry {
    pub fn peer_role(&self) -> &'static str {
        match self.session_pubkey {
            Some(_) => "session",
            None => "control-plane",
        }
    }

    /// The key its pushes are sent with (`senderPubkey`).
    pub fn sender_pubkey(&self) -> &str {
        self.session_pubkey
            .as_deref()
            .unwrap_or(&self.member.pubkey)
    }

    /// Holds an envelope sent to this session's key, returning the shard
    /// that may take it right after (its holder, when live and accepting
    /// its priority), as `HeldQueue::hold` does for a member. Once the
    /// session has ended it is held for the member instead.
    pub fn hold(&self, envelope: Arc<Envelope>) -> u64 {
        let Some(held) = &self.held else {
            return self.member.hold(envelope);
        };
        let ended = held.ended.lock().expect("session held lock");
        if *ended {
            drop(ended);
            return self.member.hold(envelope);
        }
        held.queue
            .hold(envelope, |priority| self.eligible(priority))
    }

    /// Puts back envelopes for this session (a cut-off connection's, a
    /// refused drain's), or to the member once the session has ended.
    pub fn hand_back(&self, envelopes: Vec<Arc<Envelope>>) {
        match &self.held {
            Some(held) => {
                let ended = held.ended.lock().expect("session held lock");
                if *ended {
                    drop(ended);
                    self.member.held.hand_back(envelopes);
                } else {
                    held.queue.hand_back(envelopes);
                }
            }
            None => self.member.held.hand_back(envelopes),
        }
    }

    /// The session is over: what it still holds moves to its member, in
    /// creation order; true when anything moved.
    pub fn end_held(&self) -> bool {
        let Some(held) = &self.held else {
            return false;
        };
        let mut ended = held.ended.lock().expect("session held lock");
        *ended = true;
        let moved = held.queue.take_all();
        drop(ended);
        let any = !moved.is_empty();
        self.member.held.hand_back(moved);
        any
    }

    /// The shard mask that may take `priority` for this session now.
    pub fn eligible(&self, priority: crate::protocol::Priority) -> u64 {
        let state = self.lock();
        match state.holder {
            Holder::Live { shard, .. } if state.status.accepts(priority) => 1 << shard,
            _ => 0,
        }
    }

    /// How many envelopes wait for this session.
    pub fn held_len(&self) -> usize {
        self.held.as_ref().map_or(0, |h| h.queue.len())
    }
}

/// What a new session starts with.
pub struct NewSession {
    pub presence_id: Box<str>,
    pub session_pubkey: Option<Box<str>>,
    pub pid: i32,
    pub cwd: Box<str>,
    pub connected_at: Box<str>,
    pub display_name: Arc<str>,
    pub status: StatusState,
    pub summary: Option<Arc<str>>,
}

/// What a session taken over from another node brings (README "Several
/// nodes"): its presence and what its peers saw of it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MovedSession {
    pub presence_id: String,
    pub connected_at: String,
    pub display_name: String,
    pub status: String,
    pub source: String,
    /// How long ago its status was set.
    pub status_age_ms: u64,
    pub summary: Option<String>,
    /// Live there (its connection is replaced), or away in its grace.
    pub was_live: bool,
}

impl MovedSession {
    /// What a dead node's session brings to the hello that takes it over:
    /// what its entry says (its status's age is not in it: set now).
    pub fn from_stranded(stranded: &Stranded) -> MovedSession {
        let entry: serde_json::Value = serde_json::from_slice(&stranded.entry).unwrap_or_default();
        let text = |name: &str| entry[name].as_str().unwrap_or_default().to_owned();
        MovedSession {
            presence_id: stranded.presence.to_string(),
            connected_at: text("connectedAt"),
            display_name: text("displayName"),
            status: text("status"),
            source: text("statusSource"),
            status_age_ms: 0,
            summary: entry["summary"].as_str().map(str::to_owned),
            was_live: false,
        }
    }
}

/// How a hello found its session.
pub enum Claim {
    New(Arc<SessionEntry>),
    /// It took over a session in its grace, listed on `from_shard`.
    Resumed {
        entry: Arc<SessionEntry>,
        from_shard: usize,
    },
    /// It took over a live session, whose connection `conn` on `shard` is
    /// to be closed (4000).
    Replaced {
        entry: Arc<SessionEntry>,
        shard: usize,
        conn: u64,
    },
    /// It took over a session of another node (live there, or away).
    Moved {
        entry: Arc<SessionEntry>,
        was_live: bool,
    },
}

impl Claim {
    pub fn entry(&self) -> &Arc<SessionEntry> {
        match self {
            Claim::New(entry)
            | Claim::Resumed { entry, .. }
            | Claim::Replaced { entry, .. }
            | Claim::Moved { entry, .. } => entry,
        }
    }
}

/// What a connection's end did to its session.
#[derive(Debug, PartialEq, Eq)]
pub enum Departure {
    /// The session is over: its presence ends now.
    Ended,
    /// The session is away in its grace; end it after the grace with
    /// `end_away(spell)`.
    Away { spell: u64 },
    /// Another connection holds the session now: nothing of it ends.
    TakenOver,
}

impl SessionEntry {
    /// Whether a hello with `session_id` (and key) names this session: a
    /// `session_hello` by its key whatever its `sessionId`, a `hello` by
    /// its `sessionId`, and never the one the other.
    pub fn is(&self, session_id: &str, session_pubkey: Option<&str>) -> bool {
        names_session(session_pubkey, self.session_pubkey.as_deref(), || {
            &*self.session_id == session_id
        })
    }

    pub fn state(&self) -> SessionState {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().expect("session state lock")
    }

    pub fn set_status(&self, status: StatusState) {
        self.lock().status = status;
    }

    /// Returns whether the summary changed.
    pub fn set_summary(&self, summary: Option<Arc<str>>) -> bool {
        let mut state = self.lock();
        let changed = state.summary != summary;
        state.summary = summary;
        changed
    }

    pub fn set_display_name(&self, name: Arc<str>) {
        self.lock().display_name = name;
    }

    pub fn holder(&self) -> Holder {
        self.lock().holder
    }

    pub fn is_away(&self) -> bool {
        matches!(self.holder(), Holder::Away { .. })
    }
}

/// A member's sessions, live or away.
#[derive(Default)]
pub struct MemberSessions(Mutex<Vec<Arc<SessionEntry>>>);

impl MemberSessions {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<SessionEntry>>> {
        self.0.lock().expect("member sessions lock")
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The presence ids of every session, live or away.
    pub fn presence_ids(&self) -> Vec<Box<str>> {
        self.lock().iter().map(|e| e.presence_id.clone()).collect()
    }

    /// Drops the expired envelopes waiting for one of these sessions alone
    /// (the 15 s sweep), returning them.
    pub fn expire_held(&self, now: std::time::SystemTime) -> Vec<Arc<Envelope>> {
        self.lock()
            .iter()
            .filter_map(|e| e.held.as_ref())
            .flat_map(|h| h.queue.expire(now))
            .collect()
    }

    /// The sessions with envelopes waiting for them alone.
    pub fn with_held(&self) -> Vec<Arc<SessionEntry>> {
        self.lock()
            .iter()
            .filter(|e| e.held_len() != 0)
            .cloned()
            .collect()
    }

    /// The sessions away in their grace on `shard`, with their absence.
    pub fn away_on(&self, shard: usize) -> Vec<(Arc<SessionEntry>, u64)> {
        self.lock()
            .iter()
            .filter_map(|e| match e.holder() {
                Holder::Away { shard: s, spell } if s == shard => Some((e.clone(), spell)),
                _ => None,
            })
            .collect()
    }

    /// A hello of `member` with `session_id` on connection `holder`: takes
    /// over the member's session with that id (in its grace, or live on
    /// another connection), or else, if `admit` lets it in, starts a new one.
    /// A `session_hello` (`session_pubkey`) is known by its key instead:
    /// one presence per session key, whatever its `sessionId`; a `hello`
    /// only ever takes over a `hello` session. Session ids are only ever
    /// compared within one member.
    pub fn claim<E>(
        member: &Arc<MemberEntry>,
        session_id: &str,
        session_pubkey: Option<&str>,
        holder: Holder,
        admit: impl FnOnce() -> Result<NewSession, E>,
    ) -> Result<Claim, E> {
        let mut sessions = member.sessions.lock();
        let same = |e: &&Arc<SessionEntry>| e.is(session_id, session_pubkey);
        if let Some(entry) = sessions.iter().find(same) {
            let mut state = entry.lock();
            let was = std::mem::replace(&mut state.holder, holder);
            drop(state);
            let entry = entry.clone();
            return Ok(match was {
                Holder::Away { shard, .. } => Claim::Resumed {
                    entry,
                    from_shard: shard,
                },
                Holder::Live { shard, conn } => Claim::Replaced { entry, shard, conn },
            });
        }
        let new = admit()?;
        let held = new
            .session_pubkey
            .as_ref()
            .map(|_| Box::new(SessionHeld::new(member.held.sibling())));
        let entry = Arc::new(SessionEntry {
            presence_id: new.presence_id,
            session_pubkey: new.session_pubkey,
            held,
            session_id: session_id.into(),
            member: member.clone(),
            pid: new.pid,
            cwd: new.cwd,
            connected_at: new.connected_at,
            state: Mutex::new(SessionState {
                display_name: new.display_name,
                status: new.status,
                summary: new.summary,
                holder,
                spells: 0,
            }),
        });
        sessions.push(entry.clone());
        Ok(Claim::New(entry))
    }

    /// Whether a hello with `session_id` (and key) would take over one of
    /// these sessions.
    pub fn has(&self, session_id: &str, session_pubkey: Option<&str>) -> bool {
        self.lock().iter().any(|e| e.is(session_id, session_pubkey))
    }

    /// Whether one of these sessions is the one a part lists with this
    /// `sessionId` hash (and key).
    pub fn has_hashed(&self, session_hash_of: u64, session_pubkey: Option<&str>) -> bool {
        self.lock().iter().any(|e| {
            names_session(session_pubkey, e.session_pubkey.as_deref(), || {
                session_hash(&e.session_id) == session_hash_of
            })
        })
    }

    /// The session with this presence.
    pub fn by_presence(&self, presence_id: &str) -> Option<Arc<SessionEntry>> {
        self.lock()
            .iter()
            .find(|e| *e.presence_id == *presence_id)
            .cloned()
    }

    /// A hello on another node takes the session over: it leaves this
    /// node's lists without ending (no grace timer or connection of this
    /// node matches its holder any more). Where it was; `None` when it is
    /// not one of the member's sessions (it ended meanwhile).
    pub fn give_up(entry: &Arc<SessionEntry>) -> Option<Holder> {
        let mut sessions = entry.member.sessions.lock();
        let at = sessions.iter().position(|e| Arc::ptr_eq(e, entry))?;
        sessions.remove(at);
        let mut state = entry.lock();
        let was = state.holder;
        // Spells count from 1: spell 0 is no absence's.
        state.holder = Holder::Away {
            shard: was.shard(),
            spell: 0,
        };
        Some(was)
    }

    /// The connection `holder` ended. Unless another connection took the
    /// session over, it goes away in its grace (`keep`) or ends.
    pub fn depart(entry: &Arc<SessionEntry>, holder: Holder, keep: bool) -> Departure {
        let mut sessions = entry.member.sessions.lock();
        let mut state = entry.lock();
        if state.holder != holder {
            return Departure::TakenOver;
        }
        if keep {
            state.spells += 1;
            let spell = state.spells;
            state.holder = Holder::Away {
                shard: holder.shard(),
                spell,
            };
            return Departure::Away { spell };
        }
        drop(state);
        sessions.retain(|e| !Arc::ptr_eq(e, entry));
        Departure::Ended
    }

    /// The grace of absence `spell` is over: true when that ended the
    /// session (it was not resumed meanwhile).
    pub fn end_away(entry: &Arc<SessionEntry>, shard: usize, spell: u64) -> bool {
        let mut sessions = entry.member.sessions.lock();
        if entry.holder() != (Holder::Away { shard, spell }) {
            return false;
        }
        sessions.retain(|e| !Arc::ptr_eq(e, entry));
        true
    }
}

/// Most keys of ended sessions a mesh remembers (the oldest are forgotten
/// first): enough for replies to sessions that left a while ago, bounded
/// so that churning session keys cannot grow it without limit.
const MAX_ENDED_KEYS: usize = 4096;

/// What a session key names (PROTOCOL.md §9).
pub enum KeyTarget {
    /// A session that is live or away in its grace: for it alone.
    Session(Arc<SessionEntry>),
    /// The member of a session that has ended.
    Member(Arc<MemberEntry>),
    /// A session of another node (README "Several nodes"), in `slot`.
    Remote { member: Arc<MemberEntry>, slot: u8 },
}

/// A mesh's session keys, beside its member pubkeys: read by a direct send
/// only when its target is no member's key.
#[derive(Default)]
pub struct SessionKeys(Mutex<KeyIndex>);

#[derive(Default)]
struct KeyIndex {
    current: HashMap<Box<str>, Arc<SessionEntry>>,
    ended: HashMap<Box<str>, Arc<MemberEntry>>,
    /// Ended keys, oldest first, to forget past `MAX_ENDED_KEYS`.
    order: VecDeque<Box<str>>,
}

impl KeyIndex {
    fn remember_ended(&mut self, key: &str, member: &Arc<MemberEntry>) {
        self.ended.insert(key.into(), member.clone());
        self.order.push_back(key.into());
        while self.order.len() > MAX_ENDED_KEYS {
            if let Some(old) = self.order.pop_front() {
                if !self.current.contains_key(&old) {
                    self.ended.remove(&old);
                }
            }
        }
    }
}

impl SessionKeys {
    fn lock(&self) -> MutexGuard<'_, KeyIndex> {
        self.0.lock().expect("session keys lock")
    }

    /// A `session_hello` session began.
    pub fn insert(&self, entry: &Arc<SessionEntry>) {
        let Some(key) = &entry.session_pubkey else {
            return;
        };
        let mut index = self.lock();
        index.ended.remove(key);
        index.current.insert(key.clone(), entry.clone());
    }

    /// A session ended: its key names its member from now on (unless a
    /// newer session took the key meanwhile).
    pub fn ended(&self, entry: &Arc<SessionEntry>) {
        let Some(key) = &entry.session_pubkey else {
            return;
        };
        let mut index = self.lock();
        if !index
            .current
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            return;
        }
        index.current.remove(key);
        index.remember_ended(key, &entry.member);
    }

    /// A session moved to another node: its key is that node's now. Until
    /// that node's part arrives here it names its member (a send then is
    /// held for the member and handed over), not nobody.
    pub fn moved(&self, entry: &Arc<SessionEntry>) {
        let Some(key) = &entry.session_pubkey else {
            return;
        };
        let mut index = self.lock();
        if index
            .current
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            index.current.remove(key);
            index.remember_ended(key, &entry.member);
        }
    }

    /// A session of another node ended (its node's part no longer lists
    /// it, or that node died): its key names its member, as for one here.
    pub fn ended_elsewhere(&self, key: &str, member: &Arc<MemberEntry>) {
        let mut index = self.lock();
        if !index.current.contains_key(key) && !index.ended.contains_key(key) {
            index.remember_ended(key, member);
        }
    }

    /// The session of this node with that key (lowercase).
    pub fn current(&self, key: &str) -> Option<Arc<SessionEntry>> {
        self.lock().current.get(key).cloned()
    }

    /// What a session key names; `key` in any hex case. A session here
    /// first, then one of another node's, then an ended one's member.
    pub fn resolve(&self, key: &str, remote: &RemoteBoard) -> Option<KeyTarget> {
        let key = key.to_ascii_lowercase();
        if let Some(entry) = self.current(&key) {
            return Some(KeyTarget::Session(entry));
        }
        if let Some((slot, member)) = remote.session(&key) {
            return Some(KeyTarget::Remote { member, slot });
        }
        self.lock()
            .ended
            .get(key.as_str())
            .map(|m| KeyTarget::Member(m.clone()))
    }
}

/// A mesh's directory: what each shard last published of its sessions.
pub struct PeerBoard {
    shards: Box<[ArcSwapOption<Vec<Arc<SessionEntry>>>]>,
}

impl Default for PeerBoard {
    fn default() -> Self {
        PeerBoard {
            shards: (0..MAX_SHARDS).map(|_| ArcSwapOption::empty()).collect(),
        }
    }
}

impl PeerBoard {
    /// Replaces `shard`'s part in whole.
    pub fn publish(&self, shard: usize, sessions: Vec<Arc<SessionEntry>>) {
        self.shards[shard].store((!sessions.is_empty()).then(|| Arc::new(sessions)));
    }

    /// Every session listed, each once: a shard's part skips the sessions
    /// another shard took over since it published.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<SessionEntry>, &SessionState)) {
        for (shard, part) in self.shards.iter().enumerate() {
            let Some(part) = part.load_full() else {
                continue;
            };
            for entry in part.iter() {
                let state = entry.state();
                if state.holder.shard() == shard {
                    f(entry, &state);
                }
            }
        }
    }
}

/// A mesh's sessions on other nodes (README "Several nodes"), as each node
/// last published them: their `peers_list` entries, already written.
#[derive(Default)]
pub struct RemoteBoard {
    parts: Mutex<FxHashMap<u8, Arc<RemotePart>>>,
    /// Dead nodes' sessions, listed away until their grace ends.
    pub stranded: StrandedSessions,
    /// Their live sessions, for `MAX_CONNECTIONS_PER_MESH`.
    sessions: std::sync::atomic::AtomicU32,
}

/// One node's sessions of a mesh.
pub struct RemotePart {
    /// Its `peers_list` entries, comma-separated.
    pub entries: Vec<u8>,
    pub sessions: u32,
    /// Its `session_hello` sessions' keys (lowercase), with their members
    /// and presences.
    pub session_keys: FxHashMap<Box<str>, (Arc<MemberEntry>, Box<str>)>,
    /// Its `hello` sessions' presences by member (entry address) and
    /// `sessionId` hash.
    pub by_session_id: FxHashMap<(usize, u64), Box<str>>,
    /// Each session, with where its entry sits in `entries`.
    pub listed: Vec<Listed>,
}

/// One session of a remote part.
pub struct Listed {
    pub member: Arc<MemberEntry>,
    pub session_hash: u64,
    pub session_key: Option<Box<str>>,
    pub presence: Box<str>,
    pub entry: std::ops::Range<usize>,
}

impl RemoteBoard {
    /// Replaces (or, with `None`, drops) the part of the node in `slot`,
    /// returning the one it replaced.
    pub fn replace(&self, slot: u8, part: Option<RemotePart>) -> Option<Arc<RemotePart>> {
        let mut parts = self.parts.lock().expect("remote board lock");
        let old = match part {
            Some(part) => parts.insert(slot, Arc::new(part)),
            None => parts.remove(&slot),
        };
        let total = parts.values().map(|p| p.sessions).sum();
        self.sessions
            .store(total, std::sync::atomic::Ordering::Release);
        old
    }

    /// The node (slot) listing a session with this key, and its member.
    pub fn session(&self, key: &str) -> Option<(u8, Arc<MemberEntry>)> {
        let parts = self.parts.lock().expect("remote board lock");
        parts
            .iter()
            .find_map(|(slot, part)| Some((*slot, part.session_keys.get(key)?.0.clone())))
    }

    /// The presences of `member`'s sessions on other nodes.
    pub fn presences_of(&self, member: &Arc<MemberEntry>) -> Vec<Box<str>> {
        let parts = self.parts.lock().expect("remote board lock");
        parts
            .values()
            .flat_map(|part| &part.listed)
            .filter(|listed| Arc::ptr_eq(&listed.member, member))
            .map(|listed| listed.presence.clone())
            .collect()
    }

    /// The node (slot) listing the session a hello would take over, with
    /// its presence: by its key (`session_hello`), else by its member and
    /// `sessionId` hash.
    pub fn presence_of(
        &self,
        member: &Arc<MemberEntry>,
        session_hash: u64,
        session_key: Option<&str>,
    ) -> Option<(u8, Box<str>)> {
        let parts = self.parts.lock().expect("remote board lock");
        parts.iter().find_map(|(slot, part)| {
            let presence = match session_key {
                Some(key) => part
                    .session_keys
                    .get(key)
                    .filter(|(m, _)| Arc::ptr_eq(m, member))
                    .map(|(_, p)| p),
                None => part
                    .by_session_id
                    .get(&(Arc::as_ptr(member) as usize, session_hash)),
            };
            Some((*slot, presence?.clone()))
        })
    }

    /// Live sessions on other nodes.
    pub fn sessions(&self) -> u32 {
        self.sessions.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The part of the node in `slot`.
    pub fn part(&self, slot: u8) -> Option<Arc<RemotePart>> {
        self.parts
            .lock()
            .expect("remote board lock")
            .get(&slot)
            .cloned()
    }

    fn parts(&self) -> Vec<Arc<RemotePart>> {
        let parts = self.parts.lock().expect("remote board lock");
        parts.values().cloned().collect()
    }
}

/// What peer events tell (PROTOCOL.md §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    Joined,
    Left,
    /// A resume after the socket had closed.
    Returned,
    Status,
    Summary,
}

impl PeerEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerEvent::Joined => "peer_joined",
            PeerEvent::Left => "peer_left",
            PeerEvent::Returned => "peer_returned",
            PeerEvent::Status => "peer_status",
            PeerEvent::Summary => "peer_summary",
        }
    }
}

/// Calls `f` with a session's directory entry (its `peers_list` fields).
fn with_fields<R>(
    entry: &SessionEntry,
    state: &SessionState,
    f: impl FnOnce(&PeerFields<'_>) -> R,
) -> R {
    let groups = entry.member.groups();
    let roles: Vec<GroupRole<'_>> = groups
        .iter()
        .map(|m| GroupRole {
            name: m.name.as_str(),
            role: m.role.as_deref(),
        })
        .collect();
    f(&PeerFields {
        pubkey: &entry.member.pubkey,
        member_id: &entry.member.id,
        display_name: &state.display_name,
        presence_id: &entry.presence_id,
        session_id: &entry.session_id,
        status: state.status.status.as_str(),
        status_source: state.status.source.as_str(),
        summary: state.summary.as_deref(),
        groups: &roles,
        cwd: &entry.cwd,
        connected_at: &entry.connected_at,
        away: matches!(state.holder, Holder::Away { .. }),
        session_pubkey: entry.session_pubkey.as_deref(),
        peer_role: entry.peer_role(),
    })
}

/// `peers_list` for `me`: every session on the board, `me` marked `self`,
/// then those other nodes published.
pub fn write_peers_list(
    out: &mut Vec<u8>,
    board: &PeerBoard,
    remote: &RemoteBoard,
    me: &Arc<SessionEntry>,
    req_id: Option<&str>,
) {
    let mut list = PeersListWriter::begin(out);
    board.for_each(|entry, state| {
        with_fields(entry, state, |fields| {
            list.peer(fields, Some(Arc::ptr_eq(entry, me)));
        })
    });
    for part in remote.parts() {
        list.written(&part.entries);
    }
    remote.stranded.for_each_entry(|entry| list.written(entry));
    list.finish(req_id);
}

/// A session's `peers_list` entry as another node lists it (`self` false),
/// appended to `out`.
pub fn write_remote_entry(out: &mut Vec<u8>, entry: &SessionEntry, state: &SessionState) {
    with_fields(entry, state, |fields| write_peer(out, fields, Some(false)));
}

/// A `peer_left` about a dead node's session whose grace ran out with no
/// hello taking it over, as a WebSocket frame (README "Several nodes").
pub fn stranded_left_frame(
    stranded: &Stranded,
    mesh_id: &str,
    message_id: &str,
    created_at: &str,
) -> Bytes {
    let mut json = Vec::with_capacity(512);
    let data = stranded.event_data();
    let event = PeerEvent::Left.as_str();
    crate::protocol::write_peer_event_with(
        &mut json,
        event,
        message_id,
        mesh_id,
        created_at,
        |out| out.extend_from_slice(&data),
    );
    ws::encode_server_frame(OpCode::Text, &json)
}

/// A peer event about `entry`, as a WebSocket frame (encoded once, shared
/// by every shard and recipient).
pub fn event_frame(
    event: PeerEvent,
    entry: &SessionEntry,
    mesh_id: &str,
    message_id: &str,
    created_at: &str,
) -> Bytes {
    let state = entry.state();
    let mut json = Vec::with_capacity(512);
    with_fields(entry, &state, |fields| {
        write_peer_event(
            &mut json,
            event.as_str(),
            message_id,
            mesh_id,
            created_at,
            fields,
        )
    });
    ws::encode_server_frame(OpCode::Text, &json)
}
