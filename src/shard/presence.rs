//! The shard's side of the peer directory (PROTOCOL.md §9): the part of
//! each mesh's board it publishes, peer events, and sessions in their
//! grace.
//!
//! Arrivals and departures mark the mesh's part dirty; the publisher
//! republishes dirty parts at the end of the loop turn, then at most once
//! per `PUBLISH_EVERY`, so a burst of hellos costs one copy per mesh and
//! `list_peers` on any shard sees changes well within its 100 ms.
use super::signal;
use super::state::Shard;
use crate::audit::AuditEvent;
use crate::cluster::wire::{AdminAction, AdminChange};
use crate::cluster::{BusCommand, LOCAL};
use crate::db::DbCommand;
use crate::inbox::ShardEvent;
use crate::mesh::directory::{MemberEntry, MeshEntry, TooManyGroups};
use crate::mesh::peers::{self, Holder, MemberSessions, PeerEvent, SessionEntry};
use crate::mesh::plan::{key, shards_in};
use crate::protocol::CloseReason;
use crate::protocol::GroupName;
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

/// Least time between two publications of one shard's parts.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// One mesh's sessions on this shard, live or away.
struct LocalPart {
    mesh: Arc<MeshEntry>,
    sessions: FxHashMap<usize, Arc<SessionEntry>>,
    dirty: bool,
}

/// This shard's parts of every mesh's board.
#[derive(Default)]
pub(super) struct LocalBoard {
    parts: RefCell<FxHashMap<usize, LocalPart>>,
    any_dirty: std::cell::Cell<bool>,
    publisher: std::cell::Cell<Option<std::task::Waker>>,
}

impl LocalBoard {
    fn mark(&self, part: &mut LocalPart) {
        part.dirty = true;
        self.any_dirty.set(true);
        if let Some(waker) = self.publisher.take() {
            waker.wake();
        }
    }
}

impl Shard {
    fn publish_board(&self) {
        self.board.any_dirty.set(false);
        self.board.parts.borrow_mut().retain(|_, part| {
            if part.dirty {
                part.dirty = false;
                part.mesh
                    .board
                    .publish(self.index, part.sessions.values().cloned().collect());
                self.cluster_changed(&part.mesh);
            }
            !part.sessions.is_empty()
        });
    }

    /// Lists a session this shard now holds.
    pub(super) fn board_add(&self, mesh: &Arc<MeshEntry>, entry: &Arc<SessionEntry>) {
        let mut parts = self.board.parts.borrow_mut();
        let part = parts.entry(key(mesh)).or_insert_with(|| LocalPart {
            mesh: mesh.clone(),
            sessions: FxHashMap::default(),
            dirty: false,
        });
        if part.sessions.insert(key(entry), entry.clone()).is_none() {
            self.board.mark(part);
        }
    }

    /// Stops listing a session here (it ended, or another shard holds it).
    pub(super) fn board_remove(&self, mesh: &Arc<MeshEntry>, entry: &Arc<SessionEntry>) {
        let mut parts = self.board.parts.borrow_mut();
        if let Some(part) = parts.get_mut(&key(mesh)) {
            if part.sessions.remove(&key(entry)).is_some() {
                self.board.mark(part);
            }
        }
    }

    /// Another shard took over a session this one listed.
    pub(super) fn board_release(&self, mesh: &Arc<MeshEntry>, entry: &Arc<SessionEntry>) {
        if entry.holder().shard() != self.index {
            self.board_remove(mesh, entry);
        }
    }

    /// Tells every session of the mesh that asked for peer events, on
    /// every shard, about `entry` (never its own member's sessions). The
    /// frame is encoded once and shared.
    pub(super) fn announce(&self, mesh: &Arc<MeshEntry>, entry: &SessionEntry, event: PeerEvent) {
        let frame = self.tell_shards(mesh, &entry.member, |message_id, created_at| {
            peers::event_frame(event, entry, &mesh.id, message_id, created_at)
        });
        if let Some(cluster) = &self.ctx.cluster {
            // The same frame for other nodes' sessions (README "Several
            // nodes"); a full bus queue drops it, like a slow reader's.
            let _ = cluster.send(BusCommand::PeerEvent {
                mesh: mesh.clone(),
                about: entry.member.clone(),
                frame,
            });
        }
    }

    /// A dead node's sessions ended at the end of their grace: `peer_left`
    /// to this node's sessions that asked (each node tells its own).
    pub(super) fn stranded_left(
        &self,
        mesh: &Arc<MeshEntry>,
        gone: Vec<crate::mesh::stranded::Stranded>,
    ) {
        for stranded in gone {
            self.tell_shards(mesh, &stranded.member, |message_id, created_at| {
                peers::stranded_left_frame(&stranded, &mesh.id, message_id, created_at)
            });
        }
    }

    /// A peer event about a session of `about`, its frame written (once)
    /// by `frame` from its message id and time, for this node's shards
    /// with sessions of the mesh. Returns the frame.
    fn tell_shards(
        &self,
        mesh: &Arc<MeshEntry>,
        about: &Arc<MemberEntry>,
        frame: impl FnOnce(&str, &str) -> bytes::Bytes,
    ) -> bytes::Bytes {
        let message_id = self.ids.borrow_mut().next_id();
        let frame = frame(&message_id, self.clock.borrow_mut().now_rfc3339());
        for dest in shards_in(mesh.live_shards.get() & LOCAL) {
            self.send_to(
                dest,
                ShardEvent::PeerEvent {
                    mesh: mesh.clone(),
                    about: about.clone(),
                    frame: frame.clone(),
                },
            );
        }
        frame
    }

    pub(super) fn deliver_peer_event(
        &self,
        mesh: &Arc<MeshEntry>,
        about: &Arc<MemberEntry>,
        frame: &bytes::Bytes,
    ) {
        let sent = self.routes.borrow().notify_peers(mesh, about, frame);
        self.metrics.peer_events_sent(sent as u64);
    }

    /// A session is over (its client closed, or its grace ran out): its
    /// listing, presence row and mesh slot go, and its peers hear it left.
    pub(super) fn end_session(&self, mesh: &Arc<MeshEntry>, entry: &Arc<SessionEntry>) {
        self.board_remove(mesh, entry);
        self.to_db(DbCommand::PresenceClose {
            id: entry.presence_id.to_string(),
            member_id: entry.member.id.to_string(),
            at: SystemTime::now(),
        });
        mesh.release();
        // Its key names its member from now on, and what waited for the
        // session alone is the member's now (PROTOCOL.md §9).
        mesh.session_keys.ended(entry);
        if entry.end_held() {
            let member = &entry.member;
            self.request_drain(mesh, member, member.live_shards.get());
        }
        self.announce(mesh, entry, PeerEvent::Left);
    }

    /// Envelopes sent to a session's key went back to it (its replaced
    /// connection's queue): the shard holding it now drains them.
    pub(super) fn request_session_drain(&self, mesh: &Arc<MeshEntry>, entry: &Arc<SessionEntry>) {
        if let Holder::Live { shard, .. } = entry.holder() {
            self.send_to(
                shard,
                ShardEvent::DrainHeld(mesh.clone(), entry.member.clone()),
            );
        }
    }

    /// A session whose socket was lost stays listed as away; after the
    /// grace, unless it was resumed meanwhile, it ends.
    pub(super) fn start_grace(
        self: &Rc<Self>,
        mesh: &Arc<MeshEntry>,
        entry: &Arc<SessionEntry>,
        spell: u64,
    ) {
        self.metrics.session_went_away();
        let shard = self.clone();
        let (mesh, entry) = (mesh.clone(), entry.clone());
        let grace = self.ctx.config.session_grace;
        monoio::spawn(async move {
            monoio::time::sleep(grace).await;
            if MemberSessions::end_away(&entry, shard.index, spell) {
                shard.metrics.session_away_ended();
                shard.end_session(&mesh, &entry);
            }
        });
    }

    /// An admin kicked or banned `member` (PROTOCOL.md §13): every shard
    /// closes its sessions and ends those away in their grace.
    pub(super) fn kick(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, banned: bool) {
        for dest in 0..self.ctx.shards.len() {
            self.send_to(
                dest,
                ShardEvent::Kick {
                    mesh: mesh.clone(),
                    member: member.clone(),
                    banned,
                },
            );
        }
        let action = match banned {
            true => AdminAction::Ban,
            false => AdminAction::Kick,
        };
        self.tell_nodes_admin(mesh, member, action);
    }

    /// Other nodes' sessions and directories follow an admin's action here
    /// (README "Several nodes"). A full bus queue drops it: the next
    /// member refresh applies a ban there anyway.
    pub(super) fn tell_nodes_admin(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &MemberEntry,
        action: AdminAction,
    ) {
        if let Some(cluster) = &self.ctx.cluster {
            let change = AdminChange {
                member: member.id.to_string(),
                action,
            };
            let mesh = mesh.clone();
            let _ = cluster.send(BusCommand::Admin { mesh, change });
        }
    }

    pub(super) fn kick_here(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, banned: bool) {
        let reason = if banned {
            CloseReason::Banned
        } else {
            CloseReason::Kicked
        };
        let sessions = self.routes.borrow().sessions_of(mesh, member).to_vec();
        for session in sessions {
            session.close(reason);
        }
        for (entry, spell) in member.sessions.away_on(self.index) {
            if MemberSessions::end_away(&entry, self.index, spell) {
                self.metrics.session_away_ended();
                self.end_session(mesh, &entry);
            }
        }
    }

    /// A hello on another node takes over `entry`: it stops counting and
    /// being listed here, its key is that node's, what waited for it alone
    /// is its member's (and goes where the member is live), and its
    /// connection, if live, is closed as replaced (4000). Nothing of it
    /// ends: no presence close, no `peer_left`.
    pub(super) fn give_up(
        &self,
        mesh: &Arc<MeshEntry>,
        entry: &Arc<SessionEntry>,
    ) -> Option<peers::MovedSession> {
        let was = MemberSessions::give_up(entry)?;
        let state = entry.state();
        self.board_remove(mesh, entry);
        mesh.release();
        mesh.session_keys.moved(entry);
        if entry.end_held() {
            let member = &entry.member;
            self.request_drain(mesh, member, member.live_shards.get());
        }
        let was_live = match was {
            Holder::Live { shard, conn } => {
                self.send_to(shard, ShardEvent::Replaced { conn });
                true
            }
            Holder::Away { .. } => {
                self.metrics.session_away_ended();
                false
            }
        };
        Some(peers::MovedSession {
            presence_id: entry.presence_id.to_string(),
            connected_at: entry.connected_at.to_string(),
            display_name: state.display_name.to_string(),
            status: state.status.status.as_str().to_owned(),
            source: state.status.source.as_str().to_owned(),
            status_age_ms: state.status.set_at.elapsed().as_millis() as u64,
            summary: state.summary.as_deref().map(str::to_owned),
            was_live,
        })
    }

    /// Closes a connection of this shard whose session a newer one took
    /// over (4000).
    pub(super) fn close_replaced(&self, conn: u64) {
        if let Some(session) = self.session_of(conn) {
            session.close(CloseReason::Replaced);
        }
    }
}

/// Republishes the dirty parts of this shard's board.
pub(super) async fn publish_loop(shard: Rc<Shard>) {
    loop {
        poll_fn(|cx| {
            if shard.board.any_dirty.get() {
                return Poll::Ready(());
            }
            shard.board.publisher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        // Let every arrival of this turn land first.
        signal::yield_now().await;
        shard.publish_board();
        monoio::time::sleep(PUBLISH_EVERY).await;
    }
}

impl Shard {
    /// `join_group` (or `hello.groups`): the member's groups change at
    /// once for every shard, and the change is written through.
    pub(super) fn join_group(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        name: GroupName,
        role: Option<&str>,
    ) -> Result<(), TooManyGroups> {
        if member.join_group(name.clone(), role)? {
            let role = member
                .groups()
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.role.as_deref().map(str::to_owned));
            self.audit(AuditEvent::group_join(
                mesh,
                member,
                name.as_str(),
                role.as_deref(),
            ));
            self.to_db(DbCommand::GroupMembership {
                member_id: member.id.to_string(),
                name: name.as_str().to_owned(),
                role: role.clone(),
                joined: true,
                at: SystemTime::now(),
            });
            self.tell_nodes_groups(mesh, member, &name, role, true);
        }
        Ok(())
    }

    /// Other nodes keep a copy of each member's groups (README "Several
    /// nodes"); a full bus queue loses the change there until the member
    /// is loaded again.
    fn tell_nodes_groups(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        name: &GroupName,
        role: Option<String>,
        joined: bool,
    ) {
        if let Some(cluster) = &self.ctx.cluster {
            let _ = cluster.send(BusCommand::Group {
                mesh: mesh.clone(),
                member: member.clone(),
                change: crate::cluster::wire::GroupChange {
                    member: String::new(),
                    name: name.as_str().to_owned(),
                    role,
                    joined,
                },
            });
        }
    }

    pub(super) fn leave_group(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        name: &GroupName,
    ) {
        if member.leave_group(name) {
            self.audit(AuditEvent::group_leave(mesh, member, name.as_str()));
            self.to_db(DbCommand::GroupMembership {
                member_id: member.id.to_string(),
                name: name.as_str().to_owned(),
                role: None,
                joined: false,
                at: SystemTime::now(),
            });
            self.tell_nodes_groups(mesh, member, name, None, false);
        }
    }
}
