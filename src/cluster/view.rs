//! What this node knows of the others: which node holds which slot (its
//! bit in the members' shard masks, above the local shards'), when each
//! was last heard, and each one's sessions of the meshes this node follows.
use super::wire::PartSession;
use super::{slot_bit, MAX_NODES};
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::peers::{Listed, RemotePart};
use crate::mesh::plan::key;
use crate::mesh::stranded::{away_entry, Stranded};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Seen {
    id: String,
    last_heard: Instant,
}

/// The other live nodes, by slot.
#[derive(Default)]
pub struct Nodes {
    slots: Vec<Option<Seen>>,
}

impl Nodes {
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.id == id))
            .map(|i| i as u8)
    }

    pub fn id(&self, slot: u8) -> Option<&str> {
        self.slots
            .get(slot as usize)?
            .as_ref()
            .map(|s| s.id.as_str())
    }

    /// A node was heard from: its slot, and whether it is new. `None` when
    /// every slot is taken (more than `MAX_NODES` other nodes).
    pub fn heard(&mut self, id: &str, now: Instant) -> Option<(u8, bool)> {
        if let Some(slot) = self.slot_of(id) {
            if let Some(seen) = &mut self.slots[slot as usize] {
                seen.last_heard = now;
            }
            return Some((slot, false));
        }
        let seen = Seen {
            id: id.to_owned(),
            last_heard: now,
        };
        match self.slots.iter().position(Option::is_none) {
            Some(free) => {
                self.slots[free] = Some(seen);
                Some((free as u8, true))
            }
            None if self.slots.len() < MAX_NODES => {
                self.slots.push(Some(seen));
                Some((self.slots.len() as u8 - 1, true))
            }
            None => None,
        }
    }

    /// Nodes silent for `after`, removed (their slots free again).
    pub fn take_dead(&mut self, now: Instant, after: Duration) -> Vec<(u8, String)> {
        let mut dead = Vec::new();
        for (slot, seen) in self.slots.iter_mut().enumerate() {
            if seen
                .as_ref()
                .is_some_and(|s| now.duration_since(s.last_heard) >= after)
            {
                dead.push((slot as u8, seen.take().expect("checked").id));
            }
        }
        dead
    }

    /// After this node's own bus connection came back: nobody could be
    /// heard meanwhile, so everyone gets a fresh grace.
    pub fn forgive(&mut self, now: Instant) {
        for seen in self.slots.iter_mut().flatten() {
            seen.last_heard = now;
        }
    }

    /// Every live node's bit.
    pub fn all(&self) -> u64 {
        (0..self.slots.len() as u8)
            .filter(|&slot| self.slots[slot as usize].is_some())
            .fold(0, |mask, slot| mask | slot_bit(slot))
    }

    /// The ids of the nodes in `mask` (remote bits).
    pub fn ids_in(&self, mask: u64) -> Vec<String> {
        (0..self.slots.len() as u8)
            .filter(|&slot| mask & slot_bit(slot) != 0)
            .filter_map(|slot| self.id(slot).map(str::to_owned))
            .collect()
    }
}

/// One member's sessions on one node: live at all, and taking `next`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Presence {
    live: bool,
    open: bool,
}

/// A mesh this node follows: the other nodes' sessions of it.
pub struct MeshView {
    pub mesh: Arc<MeshEntry>,
    parts: FxHashMap<u8, FxHashMap<usize, (Arc<MemberEntry>, Presence)>>,
}

impl MeshView {
    pub fn new(mesh: Arc<MeshEntry>) -> Self {
        MeshView {
            mesh,
            parts: FxHashMap::default(),
        }
    }

    /// Replaces the part of the node in `slot`: its sessions listed, and
    /// its bit in each member's masks. Returns the members it gained a bit
    /// for (they may have held envelopes that node can now take), and
    /// whether it lists a member this node has not loaded.
    pub fn apply(
        &mut self,
        slot: u8,
        sessions: &[PartSession<'_>],
    ) -> (Vec<Arc<MemberEntry>>, bool) {
        let mut unknown = false;
        let view = self.mesh.view();
        let mut fresh: FxHashMap<usize, (Arc<MemberEntry>, Presence)> = FxHashMap::default();
        let mut entries = Vec::new();
        let mut live = 0;
        let mut session_keys = FxHashMap::default();
        let mut by_session_id = FxHashMap::default();
        let mut listed = Vec::with_capacity(sessions.len());
        let mut stranded = Vec::new();
        for session in sessions {
            if session.stranded_ms != 0 {
                stranded.push(session);
                continue;
            }
            if !entries.is_empty() {
                entries.push(b',');
            }
            let start = entries.len();
            entries.extend_from_slice(session.entry);
            let entry = start..entries.len();
            live += u32::from(session.live);
            // A member this node has not loaded yet (just added) is listed
            // but not routed to until the bus reloads the mesh's members.
            let Some(member) = view.member_by_pubkey(session.member) else {
                unknown = true;
                continue;
            };
            let presence: Box<str> = session.presence.into();
            let session_key = session.lowercase_key();
            match &session_key {
                Some(k) => {
                    session_keys.insert(k.clone(), (member.clone(), presence.clone()));
                }
                None => {
                    by_session_id.insert((key(member), session.session_hash), presence.clone());
                }
            }
            listed.push(Listed {
                member: member.clone(),
                session_hash: session.session_hash,
                session_key,
                presence,
                entry,
            });
            let at = fresh
                .entry(key(member))
                .or_insert_with(|| (member.clone(), Presence::default()));
            at.1.live |= session.live;
            at.1.open |= session.live && session.open;
        }
        let old = self.parts.remove(&slot).unwrap_or_default();
        let bit = slot_bit(slot);
        let mut gained = Vec::new();
        for (k, (member, now)) in &fresh {
            let before = old.get(k).map(|(_, p)| *p).unwrap_or_default();
            set_bits(member, bit, *now);
            if (now.live && !before.live) || (now.open && !before.open) {
                gained.push(member.clone());
            }
        }
        for (k, (member, _)) in &old {
            if !fresh.contains_key(k) {
                set_bits(member, bit, Presence::default());
            }
        }
        let part = (!sessions.is_empty()).then_some(RemotePart {
            entries,
            sessions: live,
            session_keys,
            by_session_id,
            listed,
        });
        // A dead node's sessions this node lists again: taken over there.
        if !self.mesh.remote.stranded.is_empty() {
            let presences: rustc_hash::FxHashSet<&str> = sessions
                .iter()
                .filter(|s| s.stranded_ms == 0)
                .map(|s| s.presence)
                .collect();
            self.mesh.remote.stranded.forget(|p| presences.contains(p));
        }
        // Sent to later, the keys of sessions no node lists any more name
        // their members.
        if let Some(old) = self.mesh.remote.replace(slot, part) {
            for (key, (member, _)) in &old.session_keys {
                if self.mesh.remote.session(key).is_none() {
                    self.mesh.session_keys.ended_elsewhere(key, member);
                }
            }
        }
        if !sessions.is_empty() {
            self.parts.insert(slot, fresh);
        }
        self.learn_stranded(&stranded);
        (gained, unknown)
    }

    /// A node is gone: its sessions and bits go.
    pub fn drop_node(&mut self, slot: u8) {
        self.apply(slot, &[]);
    }

    /// A dead node's sessions another node lists away: listed here too,
    /// but for those some node (this one included) has again.
    fn learn_stranded(&self, lines: &[&PartSession<'_>]) {
        if lines.is_empty() {
            return;
        }
        let view = self.mesh.view();
        let now = Instant::now();
        let stranded = lines
            .iter()
            .filter_map(|line| {
                let member = view.member_by_pubkey(line.member)?;
                Some(Stranded {
                    member: member.clone(),
                    session_hash: line.session_hash,
                    session_key: line.lowercase_key(),
                    presence: line.presence.into(),
                    entry: line.entry.to_vec(),
                    until: now + Duration::from_millis(line.stranded_ms),
                })
            })
            .filter(|o| !self.has_again(o))
            .collect();
        self.mesh.remote.stranded.add(stranded);
    }

    /// Whether some node lists the stranded session again (taken over).
    fn has_again(&self, stranded: &Stranded) -> bool {
        let key = stranded.session_key.as_deref();
        let member = &stranded.member;
        member.sessions.has_hashed(stranded.session_hash, key)
            || self
                .mesh
                .remote
                .presence_of(member, stranded.session_hash, key)
                .is_some()
    }

    /// A node died: its sessions leave the routing (as `drop_node`) but stay
    /// listed away until `until`, for a hello on any node to take over
    /// (`StrandedSessions`), but for those some node already has again.
    pub fn strand_node(&mut self, slot: u8, until: Instant) {
        let part = self.mesh.remote.part(slot);
        self.drop_node(slot);
        let Some(part) = part else {
            return;
        };
        let stranded = part
            .listed
            .iter()
            .map(|l| Stranded {
                member: l.member.clone(),
                session_hash: l.session_hash,
                session_key: l.session_key.clone(),
                presence: l.presence.clone(),
                entry: away_entry(&part.entries[l.entry.clone()]),
                until,
            })
            .filter(|o| !self.has_again(o))
            .collect();
        self.mesh.remote.stranded.add(stranded);
    }

    /// Every node's sessions and bits go (this node stops following it).
    pub fn clear(&mut self) {
        let slots: Vec<u8> = self.parts.keys().copied().collect();
        for slot in slots {
            self.drop_node(slot);
        }
    }
}

fn set_bits(member: &MemberEntry, bit: u64, presence: Presence) {
    let shard = bit.trailing_zeros() as usize;
    if presence.live {
        member.live_shards.set(shard);
    } else {
        member.live_shards.clear(shard);
    }
    if presence.open {
        member.open_shards.set(shard);
    } else {
        member.open_shards.clear(shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};
    use crate::protocol::Priority;
    use std::sync::atomic::AtomicI64;

    fn mesh() -> Arc<MeshEntry> {
        let directory = Directory::new(Arc::new(AtomicI64::new(0)));
        let rows: Vec<MemberRow> = ["aa", "bb"]
            .iter()
            .map(|k| MemberRow {
                id: format!("id-{k}"),
                peer_pubkey: k.to_string(),
                ..MemberRow::default()
            })
            .collect();
        directory.install("m", &rows)
    }

    fn session<'a>(member: &'a str, live: bool, open: bool) -> PartSession<'a> {
        PartSession {
            member,
            live,
            open,
            session_key: None,
            presence: "p",
            session_hash: 0,
            entry: b"{}",
            stranded_ms: 0,
        }
    }

    #[test]
    fn a_part_sets_and_clears_its_node_bits_only() {
        let mesh = mesh();
        let a = mesh.view().member_by_pubkey("aa").unwrap().clone();
        a.live_shards.set(0);
        let mut view = MeshView::new(mesh.clone());
        let (gained, unknown) =
            view.apply(2, &[session("aa", true, false), session("aa", true, true)]);
        assert!(!unknown);
        assert_eq!(gained.len(), 1);
        let bit = slot_bit(2);
        assert_eq!(a.shards_for(Priority::Now), 1 | bit);
        assert_eq!(a.shards_for(Priority::Next), bit);
        assert_eq!(mesh.remote.sessions(), 2);
        // Busy there now: live, not open; no gain.
        assert!(view.apply(2, &[session("aa", true, false)]).0.is_empty());
        assert_eq!(a.shards_for(Priority::Next), 0);
        assert_eq!(a.shards_for(Priority::Now), 1 | bit);
        // Away sessions are listed but route nothing.
        let (_, unknown) = view.apply(2, &[session("aa", false, false), session("zz", true, true)]);
        assert!(unknown, "zz is no member here");
        assert_eq!(a.shards_for(Priority::Now), 1);
        assert_eq!(mesh.remote.sessions(), 1);
        view.drop_node(2);
        assert_eq!(a.shards_for(Priority::Now), 1);
        assert_eq!(mesh.remote.sessions(), 0);
    }

    #[test]
    fn a_session_key_names_its_node_then_its_member_once_unlisted() {
        use crate::mesh::peers::KeyTarget;
        let mesh = mesh();
        let mut view = MeshView::new(mesh.clone());
        let keyed = PartSession {
            session_key: Some("AB12"),
            ..session("aa", true, true)
        };
        view.apply(3, &[keyed]);
        let resolve = || mesh.session_keys.resolve("ab12", &mesh.remote);
        assert!(matches!(resolve(), Some(KeyTarget::Remote { slot: 3, .. })));
        view.apply(3, &[session("aa", true, true)]);
        assert!(matches!(resolve(), Some(KeyTarget::Member(m)) if *m.pubkey == *"aa"));
        assert!(mesh.session_keys.resolve("cd", &mesh.remote).is_none());
    }

    #[test]
    fn slots_are_reused_and_the_silent_are_dead() {
        let mut nodes = Nodes::default();
        let t0 = Instant::now();
        assert_eq!(nodes.heard("a", t0), Some((0, true)));
        assert_eq!(nodes.heard("b", t0), Some((1, true)));
        assert_eq!(
            nodes.heard("a", t0 + Duration::from_secs(2)),
            Some((0, false))
        );
        let dead = nodes.take_dead(t0 + Duration::from_secs(3), Duration::from_secs(3));
        assert_eq!(dead, vec![(1, "b".to_owned())]);
        assert_eq!(nodes.heard("c", t0), Some((1, true)));
        assert_eq!(nodes.ids_in(slot_bit(0) | slot_bit(1)), vec!["a", "c"]);
        nodes.forgive(t0 + Duration::from_secs(10));
        assert!(nodes
            .take_dead(t0 + Duration::from_secs(11), Duration::from_secs(3))
            .is_empty());
        for i in 2..MAX_NODES {
            assert!(nodes.heard(&format!("n{i}"), t0).is_some());
        }
        assert_eq!(nodes.heard("one-too-many", t0), None);
    }
}
