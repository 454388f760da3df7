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
//! The directory is a `PeerBoard` per mesh: one immutable snapshot per
//! shard of the sessions it hosts, swapped in whole by that shard (at most
//! once per `PUBLISH_EVERY`) and read by any shard without a lock. A
//! session taken over by another shard is listed only by the shard that
//! holds it now, so a list never shows it twice.
use super::directory::MemberEntry;
use crate::config::MAX_SHARDS;
use crate::protocol::{write_peer_event, GroupRole, PeerFields, PeersListWriter};
use crate::status::StatusState;
use crate::ws::{self, OpCode};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use std::sync::{Arc, Mutex, MutexGuard};

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
    state: Mutex<SessionState>,
}

/// What a new session starts with.
pub struct NewSession {
    pub presence_id: Box<str>,
    pub pid: i32,
    pub cwd: Box<str>,
    pub connected_at: Box<str>,
    pub display_name: Arc<str>,
    pub status: StatusState,
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
}

impl Claim {
    pub fn entry(&self) -> &Arc<SessionEntry> {
        match self {
            Claim::New(entry) | Claim::Resumed { entry, .. } | Claim::Replaced { entry, .. } => {
                entry
            }
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
    /// Session ids are only ever compared within one member.
    pub fn claim<E>(
        member: &Arc<MemberEntry>,
        session_id: &str,
        holder: Holder,
        admit: impl FnOnce() -> Result<NewSession, E>,
    ) -> Result<Claim, E> {
        let mut sessions = member.sessions.lock();
        if let Some(entry) = sessions.iter().find(|e| &*e.session_id == session_id) {
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
        let entry = Arc::new(SessionEntry {
            presence_id: new.presence_id,
            session_id: session_id.into(),
            member: member.clone(),
            pid: new.pid,
            cwd: new.cwd,
            connected_at: new.connected_at,
            state: Mutex::new(SessionState {
                display_name: new.display_name,
                status: new.status,
                summary: None,
                holder,
                spells: 0,
            }),
        });
        sessions.push(entry.clone());
        Ok(Claim::New(entry))
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
    })
}

/// `peers_list` for `me`: every session on the board, `me` marked `self`.
pub fn write_peers_list(
    out: &mut Vec<u8>,
    board: &PeerBoard,
    me: &Arc<SessionEntry>,
    req_id: Option<&str>,
) {
    let mut list = PeersListWriter::begin(out);
    board.for_each(|entry, state| {
        with_fields(entry, state, |fields| {
            list.peer(fields, Some(Arc::ptr_eq(entry, me)));
        })
    });
    list.finish(req_id);
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
