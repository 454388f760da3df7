//! The membership directory: which members each mesh has, shared read-mostly
//! by every shard so that no send waits on Postgres.
//!
//! The db thread loads a mesh the first time a hello names it and refreshes
//! every loaded mesh periodically (`MEMBER_REFRESH_SECONDS`) and on a miss. A
//! member's entry keeps its identity across refreshes: its live-shard mask and
//! held queue live in it. Shards read views through `ArcSwap` (no lock);
//! the directory's own map is locked only on hello and on refresh.
use super::bucket::SendBucket;
use super::dedupe::SentIds;
use super::held::HeldQueue;
use super::lease::{MemberLeases, Redeliveries};
use super::peers::{MemberSessions, PeerBoard, RemoteBoard, SessionKeys};
use super::{Envelope, HeldLate};
use crate::protocol::{GroupName, Priority};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

/// Bit i set while shard i has at least one live session of a member or
/// mesh. SeqCst: the hold/drain handshake (see `held`) relies on a hello's
/// set being ordered before its drain, and a hold's append before its read.
#[derive(Default)]
pub struct ShardMask(AtomicU64);

impl ShardMask {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, shard: usize) {
        self.0.fetch_or(1 << shard, Ordering::SeqCst);
    }

    pub fn clear(&self, shard: usize) {
        self.0.fetch_and(!(1 << shard), Ordering::SeqCst);
    }
}

/// One `mesh.member` row as the broker needs it, with the member's
/// `mesh.member_group` rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberRow {
    pub id: String,
    pub peer_pubkey: String,
    pub revoked: bool,
    pub display_name: String,
    /// `(name, role)` as stored.
    pub groups: Vec<(String, Option<String>)>,
    /// `mesh.member.role` is `admin` (PROTOCOL.md §13).
    pub admin: bool,
}

/// How many live `client_ack` sessions a member or mesh has.
#[derive(Default)]
pub struct Leasing(AtomicU32);

impl Leasing {
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    pub fn remove(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) != 0
    }
}

/// Most groups a member may be in (PROTOCOL.md §9).
pub const MAX_GROUPS: usize = 64;

/// A member's place in a group (`mesh.member_group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub name: GroupName,
    pub role: Option<Box<str>>,
}

/// A join over `MAX_GROUPS`.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyGroups;

pub struct MemberEntry {
    pub id: Box<str>,
    pub pubkey: Box<str>,
    /// `mesh.member.display_name`, kept fresh by the refresh.
    display_name: ArcSwap<Box<str>>,
    /// Its groups, by name. Loaded with the member and then changed only
    /// by this broker (written through to Postgres), so a refresh never
    /// undoes a join whose write is still on its way.
    groups: ArcSwap<Vec<Membership>>,
    /// Serializes joins and leaves (readers never wait).
    group_writes: Mutex<()>,
    /// Its sessions, live or away (see `peers`).
    pub sessions: MemberSessions,
    /// `mesh.member.role = 'admin'`, kept fresh by the refresh.
    admin: AtomicBool,
    /// Its send budget, shared by its sessions (`SEND_RATE_PER_MIN`).
    pub send_bucket: SendBucket,
    /// Pushes written to its `client_ack` sessions and not acked yet.
    pub leases: MemberLeases,
    /// Its recent sends' `client_message_id`s (duplicate sends).
    pub sent_ids: SentIds,
    /// What a lapsed lease put back: pushed again as `redelivered`.
    pub redeliveries: Redeliveries,
    /// Its live `client_ack` sessions (see `MeshEntry::leasing`).
    pub leasing: Leasing,
    revoked: AtomicBool,
    banned: AtomicBool,
    /// The shards with at least one live session of this member: they may
    /// take `now`, and so anything (an open shard is always live too).
    pub live_shards: ShardMask,
    /// The shards with at least one idle session of this member: they may
    /// take `next` and `low` too.
    pub open_shards: ShardMask,
    pub held: HeldQueue,
}

impl MemberEntry {
    fn new(row: &MemberRow, depth: &Arc<AtomicI64>) -> Self {
        let mut groups: Vec<Membership> = row
            .groups
            .iter()
            .filter_map(|(name, role)| {
                Some(Membership {
                    name: GroupName::parse(name)?,
                    role: role.as_deref().map(Into::into),
                })
            })
            .collect();
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        groups.dedup_by(|a, b| a.name == b.name);
        MemberEntry {
            id: row.id.as_str().into(),
            pubkey: row.peer_pubkey.to_ascii_lowercase().into(),
            display_name: ArcSwap::from_pointee(row.display_name.as_str().into()),
            groups: ArcSwap::from_pointee(groups),
            group_writes: Mutex::new(()),
            sessions: MemberSessions::default(),
            admin: AtomicBool::new(row.admin),
            send_bucket: SendBucket::default(),
            leases: MemberLeases::default(),
            sent_ids: SentIds::default(),
            redeliveries: Redeliveries::default(),
            leasing: Leasing::default(),
            revoked: AtomicBool::new(row.revoked),
            banned: AtomicBool::new(false),
            live_shards: ShardMask::default(),
            open_shards: ShardMask::default(),
            held: HeldQueue::new(depth.clone()),
        }
    }

    /// A sender that is no longer a member, for envelopes it left held (a
    /// restored row): it takes part in no routing.
    pub fn former(id: &str, pubkey: &str) -> Arc<MemberEntry> {
        let row = MemberRow {
            id: id.to_owned(),
            peer_pubkey: pubkey.to_owned(),
            revoked: true,
            ..MemberRow::default()
        };
        Arc::new(MemberEntry::new(&row, &Arc::default()))
    }

    /// The shards with a session that may take `priority` now (PROTOCOL.md
    /// §5: idle takes every priority, working and dnd only `now`).
    pub fn shards_for(&self, priority: Priority) -> u64 {
        match priority {
            Priority::Now => self.live_shards.get(),
            Priority::Next | Priority::Low => self.open_shards.get(),
        }
    }

    /// Holds an envelope for this member; returns the shards that may take
    /// it right after (see `HeldQueue::hold`). Never refuses: the bound is
    /// checked when a send is planned (`HeldQueue::room_for`), before anything is
    /// acked, so an envelope already acked is never dropped here.
    pub fn hold(&self, envelope: Arc<Envelope>) -> u64 {
        self.held.hold(envelope, |p| self.shards_for(p))
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Banned by an admin: at once for every shard, whatever the next
    /// refresh reads (a revocation is never undone by one; see
    /// `Directory::reinstate`).
    pub fn ban(&self) {
        self.banned.store(true, Ordering::Release);
        self.revoked.store(true, Ordering::Release);
    }

    /// Revoked by an admin's ban (its sessions close 4002), not by its row.
    pub fn is_banned(&self) -> bool {
        self.banned.load(Ordering::Acquire)
    }

    pub fn is_admin(&self) -> bool {
        self.admin.load(Ordering::Acquire)
    }

    pub fn display_name(&self) -> Arc<Box<str>> {
        self.display_name.load_full()
    }

    /// Its groups, sorted by name.
    pub fn groups(&self) -> Arc<Vec<Membership>> {
        self.groups.load_full()
    }

    /// Whether `@group` reaches it: it is in that group or one below it.
    pub fn is_reached_by(&self, group: &GroupName) -> bool {
        self.groups.load().iter().any(|m| m.name.is_within(group))
    }

    /// Joins a group, or changes its role there (a join without a role
    /// keeps the one it has). True when anything changed.
    pub fn join_group(&self, name: GroupName, role: Option<&str>) -> Result<bool, TooManyGroups> {
        let _writes = self.group_writes.lock().expect("group writes lock");
        let current = self.groups.load_full();
        let mut next: Vec<Membership> = (*current).clone();
        let full = next.len() >= MAX_GROUPS;
        match next.iter_mut().find(|m| m.name == name) {
            Some(member) => match role {
                Some(role) if member.role.as_deref() != Some(role) => {
                    member.role = Some(role.into())
                }
                _ => return Ok(false),
            },
            None if full => return Err(TooManyGroups),
            None => {
                next.push(Membership {
                    name,
                    role: role.map(Into::into),
                });
                next.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        self.groups.store(Arc::new(next));
        Ok(true)
    }

    /// Leaves a group; true when it was in it.
    pub fn leave_group(&self, name: &GroupName) -> bool {
        let _writes = self.group_writes.lock().expect("group writes lock");
        let current = self.groups.load_full();
        if !current.iter().any(|m| m.name == *name) {
            return false;
        }
        let next = current
            .iter()
            .filter(|m| m.name != *name)
            .cloned()
            .collect();
        self.groups.store(Arc::new(next));
        true
    }
}

/// An immutable snapshot of a mesh's current (non-revoked) members, and
/// of its revoked ones (for `unban`).
#[derive(Default)]
pub struct MeshView {
    by_id: HashMap<Box<str>, Arc<MemberEntry>>,
    by_pubkey: HashMap<Box<str>, Arc<MemberEntry>>,
    members: Vec<Arc<MemberEntry>>,
    revoked: Vec<Arc<MemberEntry>>,
}

/// Why an admin's `target` names nobody (PROTOCOL.md §13).
#[derive(Debug, PartialEq, Eq)]
pub enum Unresolved {
    Unknown,
    /// A display name several members have.
    Ambiguous,
}

impl MeshView {
    pub fn member(&self, id: &str) -> Option<&Arc<MemberEntry>> {
        self.by_id.get(id)
    }

    /// Pubkeys are compared in lowercase hex.
    pub fn member_by_pubkey(&self, pubkey: &str) -> Option<&Arc<MemberEntry>> {
        if pubkey.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.by_pubkey.get(pubkey.to_ascii_lowercase().as_str());
        }
        self.by_pubkey.get(pubkey)
    }

    pub fn members(&self) -> &[Arc<MemberEntry>] {
        &self.members
    }

    /// An admin's target: a member id, a pubkey, or a display name (exact,
    /// case-insensitive), among the current members or, for `revoked`,
    /// among the revoked ones.
    pub fn resolve(&self, target: &str, revoked: bool) -> Result<Arc<MemberEntry>, Unresolved> {
        let pool = if revoked {
            &self.revoked
        } else {
            &self.members
        };
        let lower = target.to_ascii_lowercase();
        if let Some(m) = pool
            .iter()
            .find(|m| *m.id == *target || *m.pubkey == *lower)
        {
            return Ok(m.clone());
        }
        let mut named = pool
            .iter()
            .filter(|m| m.display_name().to_lowercase() == target.to_lowercase());
        match (named.next(), named.next()) {
            (Some(m), None) => Ok(m.clone()),
            (Some(_), Some(_)) => Err(Unresolved::Ambiguous),
            (None, _) => Err(Unresolved::Unknown),
        }
    }
}

/// `live_sessions` of an entry taken out of the directory: no session may
/// join it any more (the hello looks the mesh up again).
const EVICTED: u32 = u32::MAX;

#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// At `MAX_CONNECTIONS_PER_MESH`.
    Full,
    /// The entry was evicted meanwhile: look the mesh up again.
    Evicted,
}

pub struct MeshEntry {
    pub id: Box<str>,
    /// Its sessions as `list_peers` sees them.
    pub board: PeerBoard,
    /// Its sessions on other nodes (README "Several nodes").
    pub remote: RemoteBoard,
    /// Set when a session of it arrived, left or changed status here and
    /// the bus has not yet republished this node's part (one notice per
    /// burst).
    pub changed: AtomicBool,
    /// Set once the bus has followed it long enough to have heard the
    /// other nodes' parts (cleared when it stops following): until then a
    /// hello waits for them, so its capacity check and takeover see the
    /// other nodes' sessions.
    pub synced: AtomicBool,
    /// Its `session_hello` sessions' keys (PROTOCOL.md §9).
    pub session_keys: SessionKeys,
    /// Its live `client_ack` sessions: a send that may reach one stores
    /// what it leases, so it is refused while the held budget is full.
    pub leasing: Leasing,
    view: ArcSwap<MeshView>,
    /// Live sessions on all shards, for `MAX_CONNECTIONS_PER_MESH`.
    live_sessions: AtomicU32,
    /// The shards with at least one live session of this mesh.
    pub live_shards: ShardMask,
    /// Set while the held envelopes Postgres kept for this mesh (an earlier
    /// run's) are being loaded: new sends are held behind them and nothing
    /// is drained until they are all in place.
    restoring: AtomicBool,
    loaded_at: Mutex<Instant>,
    /// The broker-wide held-envelope gauge, for new members' queues.
    depth: Arc<AtomicI64>,
    /// The directory's start-up gate (see `Directory::close_gate`).
    gate: Arc<AtomicBool>,
}

impl MeshEntry {
    pub fn view(&self) -> arc_swap::Guard<Arc<MeshView>> {
        self.view.load()
    }

    /// Claims a connection slot; sessions other nodes published count
    /// against the bound too.
    pub fn try_admit(&self, max: u32) -> Admission {
        let remote = self.remote.sessions();
        match self
            .live_sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n.saturating_add(remote) < max && n != EVICTED).then(|| n + 1)
            }) {
            Ok(_) => Admission::Admitted,
            Err(EVICTED) => Admission::Evicted,
            Err(_) => Admission::Full,
        }
    }

    pub fn release(&self) {
        self.live_sessions.fetch_sub(1, Ordering::AcqRel);
    }

    /// Live sessions on this node.
    pub fn local_sessions(&self) -> u32 {
        match self.live_sessions.load(Ordering::Acquire) {
            EVICTED => 0,
            n => n,
        }
    }

    /// While its earlier held envelopes load, or until the start-up load
    /// knows which meshes have some.
    pub fn is_restoring(&self) -> bool {
        self.restoring.load(Ordering::SeqCst) || self.gate.load(Ordering::SeqCst)
    }

    pub fn set_restoring(&self, restoring: bool) {
        self.restoring.store(restoring, Ordering::SeqCst);
    }

    pub fn loaded_since(&self) -> std::time::Duration {
        self.loaded_at.lock().expect("loaded_at lock").elapsed()
    }

    /// Install fresh rows, keeping the entries (and so the live masks and
    /// held queues) of members that are still there; `reinstated` (an
    /// unban) gets a fresh entry, since a revoked one stays revoked.
    fn apply(&self, rows: &[MemberRow], reinstated: Option<&str>) {
        let old = self.view.load();
        let mut view = MeshView::default();
        for row in rows {
            let known = old
                .by_id
                .get(row.id.as_str())
                .or_else(|| old.revoked.iter().find(|m| *m.id == *row.id))
                .filter(|_| reinstated != Some(row.id.as_str()));
            let entry = match known {
                Some(entry) if *entry.pubkey == *row.peer_pubkey.to_ascii_lowercase() => {
                    if ***entry.display_name.load() != *row.display_name {
                        entry
                            .display_name
                            .store(Arc::new(row.display_name.as_str().into()));
                    }
                    entry.clone()
                }
                _ => Arc::new(MemberEntry::new(row, &self.depth)),
            };
            entry.admin.store(row.admin, Ordering::Release);
            if row.revoked || entry.is_revoked() {
                entry.revoked.store(true, Ordering::Release);
                view.revoked.push(entry);
                continue;
            }
            view.by_pubkey
                .entry(entry.pubkey.clone())
                .or_insert_with(|| entry.clone());
            view.by_id.insert(entry.id.clone(), entry.clone());
            view.members.push(entry);
        }
        // Members that vanished (deleted rows, changed pubkeys) are revoked too:
        // their live sessions must go.
        for (id, entry) in &old.by_id {
            if view
                .by_id
                .get(id)
                .is_none_or(|new| !Arc::ptr_eq(new, entry))
            {
                entry.revoked.store(true, Ordering::Release);
            }
        }
        self.view.store(Arc::new(view));
        *self.loaded_at.lock().expect("loaded_at lock") = Instant::now();
    }
}

#[derive(Default)]
pub struct Directory {
    meshes: Mutex<HashMap<Box<str>, Arc<MeshEntry>>>,
    /// Envelopes held in every member's queue (`broker_queue_depth`).
    depth: Arc<AtomicI64>,
    /// Closed at start until the start-up load has marked the meshes with
    /// an earlier run's envelopes (or found Postgres unreachable): until
    /// then every mesh counts as restoring, so no send overtakes a backlog
    /// not yet known.
    gate: Arc<AtomicBool>,
}

impl Directory {
    /// A directory whose held queues count into `depth`.
    pub fn new(depth: Arc<AtomicI64>) -> Self {
        Directory {
            meshes: Mutex::default(),
            depth,
            gate: Arc::default(),
        }
    }

    pub fn close_gate(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }

    /// Opens the start-up gate; returns the meshes loaded meanwhile, whose
    /// members may now drain what was held behind it (none when it was
    /// open already: a retried start-up load asks for no drains again).
    pub fn open_gate(&self) -> Vec<Arc<MeshEntry>> {
        if !self.gate.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        self.meshes
            .lock()
            .expect("directory lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, mesh_id: &str) -> Option<Arc<MeshEntry>> {
        self.meshes
            .lock()
            .expect("directory lock")
            .get(mesh_id)
            .cloned()
    }

    /// Create or refresh a mesh from its member rows. A new entry is
    /// published only once its view is filled, so no hello sees it empty.
    pub fn install(&self, mesh_id: &str, rows: &[MemberRow]) -> Arc<MeshEntry> {
        if let Some(entry) = self.get(mesh_id) {
            entry.apply(rows, None);
            return entry;
        }
        let fresh = Arc::new(MeshEntry {
            id: mesh_id.into(),
            board: PeerBoard::default(),
            remote: RemoteBoard::default(),
            changed: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            session_keys: SessionKeys::default(),
            leasing: Leasing::default(),
            view: ArcSwap::from_pointee(MeshView::default()),
            live_sessions: AtomicU32::new(0),
            live_shards: ShardMask::default(),
            restoring: AtomicBool::new(false),
            loaded_at: Mutex::new(Instant::now()),
            depth: self.depth.clone(),
            gate: self.gate.clone(),
        });
        fresh.apply(rows, None);
        let entry = self
            .meshes
            .lock()
            .expect("directory lock")
            .entry(mesh_id.into())
            .or_insert_with(|| fresh.clone())
            .clone();
        if !Arc::ptr_eq(&entry, &fresh) {
            entry.apply(rows, None);
        }
        entry
    }

    /// After an unban: the mesh's fresh rows, with a new (not revoked)
    /// entry for `member_id`.
    pub fn reinstate(&self, mesh_id: &str, rows: &[MemberRow], member_id: &str) {
        match self.get(mesh_id) {
            Some(entry) => entry.apply(rows, Some(member_id)),
            None => {
                self.install(mesh_id, rows);
            }
        }
    }

    /// Drops meshes nobody is connected to and nothing is held for, so the
    /// periodic refresh only reloads meshes in use. An entry is closed to
    /// new sessions atomically before it goes (see `Admission::Evicted`).
    pub fn evict_idle(&self) -> usize {
        let mut meshes = self.meshes.lock().expect("directory lock");
        let before = meshes.len();
        meshes.retain(|_, mesh| {
            let nothing_held = mesh.view().members().iter().all(|m| m.held.is_empty());
            let evicted = nothing_held
                && !mesh.is_restoring()
                && mesh
                    .live_sessions
                    .compare_exchange(0, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            !evicted
        });
        before - meshes.len()
    }

    /// Drops every expired held envelope (the 15 s sweep), with the member
    /// it was held for.
    pub fn expire_held(&self, now: SystemTime) -> Vec<HeldLate> {
        let meshes: Vec<Arc<MeshEntry>> = self
            .meshes
            .lock()
            .expect("directory lock")
            .values()
            .cloned()
            .collect();
        let mut expired = Vec::new();
        for mesh in meshes {
            for member in mesh.view().members() {
                let own = member.sessions.expire_held(now);
                for envelope in member.held.expire(now).into_iter().chain(own) {
                    expired.push((envelope, member.clone()));
                }
            }
        }
        expired
    }

    /// The ids of every loaded mesh, for the periodic refresh.
    pub fn mesh_ids(&self) -> Vec<String> {
        self.meshes
            .lock()
            .expect("directory lock")
            .keys()
            .map(|k| k.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, key: &str, revoked: bool) -> MemberRow {
        MemberRow {
            id: id.into(),
            peer_pubkey: key.into(),
            revoked,
            ..MemberRow::default()
        }
    }

    #[test]
    fn refresh_keeps_identity_and_revokes() {
        let dir = Directory::default();
        let mesh = dir.install("m", &[row("a", "AA", false), row("b", "bb", false)]);
        let a = mesh.view().member("a").unwrap().clone();
        assert!(mesh.view().member_by_pubkey("aa").is_some());
        a.live_shards.set(1);
        dir.install("m", &[row("a", "aa", false), row("b", "bb", true)]);
        let view = mesh.view();
        assert!(Arc::ptr_eq(view.member("a").unwrap(), &a));
        assert_eq!(a.live_shards.get(), 2);
        assert!(view.member("b").is_none());
        assert_eq!(view.members().len(), 1);
        // A vanished member is revoked.
        dir.install("m", &[]);
        assert!(a.is_revoked());
    }

    #[test]
    fn capacity_is_exact() {
        let dir = Directory::default();
        let mesh = dir.install("m", &[]);
        assert_eq!(mesh.try_admit(2), Admission::Admitted);
        assert_eq!(mesh.try_admit(2), Admission::Admitted);
        assert_eq!(mesh.try_admit(2), Admission::Full);
        mesh.release();
        assert_eq!(mesh.try_admit(2), Admission::Admitted);
    }

    #[test]
    fn idle_meshes_are_evicted_and_closed_to_new_sessions() {
        let dir = Directory::default();
        let busy = dir.install("busy", &[row("a", "aa", false)]);
        assert_eq!(busy.try_admit(5), Admission::Admitted);
        let idle = dir.install("idle", &[row("b", "bb", false)]);
        assert_eq!(dir.evict_idle(), 1);
        assert!(dir.get("idle").is_none());
        assert!(dir.get("busy").is_some());
        assert_eq!(idle.try_admit(5), Admission::Evicted);
        // A fresh lookup makes a new, open entry.
        let again = dir.install("idle", &[row("b", "bb", false)]);
        assert_eq!(again.try_admit(5), Admission::Admitted);
    }
}
