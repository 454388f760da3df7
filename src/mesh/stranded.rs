//! The sessions of a node that died (README "Several nodes"): the other
//! nodes list them away until the session grace ends, and a hello with
//! one's `sessionId` (or key) on any node takes it over, as a hello takes
//! over a session in its grace on one node.
use super::directory::MemberEntry;
use super::identity::names_session;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// One session of a dead node.
#[derive(Clone)]
pub struct Stranded {
    pub member: Arc<MemberEntry>,
    /// Its `sessionId`, hashed as parts carry it.
    pub session_hash: u64,
    pub session_key: Option<Box<str>>,
    pub presence: Box<str>,
    /// Its `peers_list` entry as that node published it, `away` now.
    pub entry: Vec<u8>,
    /// The end of its grace.
    pub until: Instant,
}

impl Stranded {
    /// Its peer as a peer event tells it (the entry without `self`).
    pub fn event_data(&self) -> Vec<u8> {
        const SELF: &[u8] = b",\"self\":false}";
        match self.entry.strip_suffix(SELF) {
            Some(rest) => [rest, b"}"].concat(),
            None => self.entry.clone(),
        }
    }

    /// Whether a hello of `member` with `session_hash` (and key) names it:
    /// a `session_hello` by its key, a `hello` by its `sessionId`.
    fn is(&self, member: &Arc<MemberEntry>, session_hash: u64, key: Option<&str>) -> bool {
        Arc::ptr_eq(&self.member, member)
            && names_session(key, self.session_key.as_deref(), || {
                self.session_hash == session_hash
            })
    }
}

/// A mesh's stranded sessions, few and short-lived: a list.
#[derive(Default)]
pub struct StrandedSessions(Mutex<Vec<Stranded>>);

impl StrandedSessions {
    fn lock(&self) -> MutexGuard<'_, Vec<Stranded>> {
        self.0.lock().expect("stranded lock")
    }

    /// Adds those not known yet (by presence): a node learns of a dead
    /// node's sessions from its own view and from other nodes' parts.
    pub fn add(&self, stranded: Vec<Stranded>) {
        let mut known = self.lock();
        for stranded in stranded {
            if !known.iter().any(|o| o.presence == stranded.presence) {
                known.push(stranded);
            }
        }
    }

    /// Copies of those still in their grace, with what is left of it, for
    /// this node's part (so a node that did not follow the mesh when that
    /// node died learns of them too).
    pub fn listed(&self, now: Instant) -> Vec<(Stranded, u64)> {
        self.lock()
            .iter()
            .filter(|o| o.until > now)
            .map(|o| {
                let left = o.until.duration_since(now).as_millis().max(1) as u64;
                (o.clone(), left)
            })
            .collect()
    }

    /// The stranded session a hello takes over, no longer listed.
    pub fn take(
        &self,
        member: &Arc<MemberEntry>,
        session_hash: u64,
        key: Option<&str>,
    ) -> Option<Stranded> {
        let mut stranded = self.lock();
        let now = Instant::now();
        let at = stranded
            .iter()
            .position(|o| o.until > now && o.is(member, session_hash, key))?;
        Some(stranded.swap_remove(at))
    }

    /// Drops the sessions a live node lists again (taken over there, or the
    /// node was not dead after all).
    pub fn forget(&self, listed: impl Fn(&str) -> bool) {
        let mut stranded = self.lock();
        if !stranded.is_empty() {
            stranded.retain(|o| !listed(&o.presence));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Drops those whose grace is over (their sessions have ended),
    /// returning them.
    pub fn expire(&self, now: Instant) -> Vec<Stranded> {
        let mut stranded = self.lock();
        if stranded.iter().all(|o| o.until > now) {
            return Vec::new();
        }
        let (gone, kept) = std::mem::take(&mut *stranded)
            .into_iter()
            .partition(|o| o.until <= now);
        *stranded = kept;
        gone
    }

    /// Each one's entry, for `list_peers` (those past their grace are
    /// not listed, even before a sweep drops them).
    pub fn for_each_entry(&self, mut f: impl FnMut(&[u8])) {
        let now = Instant::now();
        for stranded in self.lock().iter().filter(|o| o.until > now) {
            f(&stranded.entry);
        }
    }
}

/// `entry` as listed while away. Entries are written by
/// `protocol::write_peer`, where `"away":false` appears once and outside
/// any string (a quote inside a string is escaped).
pub fn away_entry(entry: &[u8]) -> Vec<u8> {
    const LIVE: &[u8] = b"\"away\":false";
    match entry.windows(LIVE.len()).position(|w| w == LIVE) {
        Some(at) => [&entry[..at], b"\"away\":true", &entry[at + LIVE.len()..]].concat(),
        None => entry.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};
    use std::sync::atomic::AtomicI64;
    use std::time::Duration;

    fn member(id: &str) -> Arc<MemberEntry> {
        let directory = Directory::new(Arc::new(AtomicI64::new(0)));
        let row = MemberRow {
            id: id.to_owned(),
            peer_pubkey: id.to_owned(),
            ..MemberRow::default()
        };
        directory.install("m", &[row]).view().members()[0].clone()
    }

    fn session(member: &Arc<MemberEntry>, hash: u64, key: Option<&str>, p: &str) -> Stranded {
        Stranded {
            member: member.clone(),
            session_hash: hash,
            session_key: key.map(Into::into),
            presence: p.into(),
            entry: away_entry(br#"{"summary":"\"away\":false","away":false,"x":1}"#),
            until: Instant::now() + Duration::from_secs(60),
        }
    }

    #[test]
    fn a_hello_takes_its_own_stranded_session_once_and_the_rest_expire() {
        let (a, b) = (member("a"), member("b"));
        let sessions = StrandedSessions::default();
        sessions.add(vec![
            session(&a, 7, None, "p1"),
            session(&a, 7, Some("k"), "p2"),
            session(&b, 7, None, "p3"),
        ]);
        let mut entries = Vec::new();
        sessions.for_each_entry(|e| entries.push(e.to_vec()));
        assert_eq!(
            entries[0],
            br#"{"summary":"\"away\":false","away":true,"x":1}"#.to_vec()
        );
        let listed = session(&a, 1, None, "p9");
        let listed = Stranded {
            entry: br#"{"presenceId":"p9","away":true,"self":false}"#.to_vec(),
            ..listed
        };
        assert_eq!(
            listed.event_data(),
            br#"{"presenceId":"p9","away":true}"#.to_vec()
        );
        assert!(sessions.take(&a, 8, None).is_none(), "another sessionId");
        assert!(
            sessions.take(&b, 7, Some("k")).is_none(),
            "another member's key"
        );
        assert_eq!(&*sessions.take(&a, 7, Some("k")).unwrap().presence, "p2");
        assert_eq!(&*sessions.take(&a, 7, None).unwrap().presence, "p1");
        assert!(sessions.take(&a, 7, None).is_none(), "taken once");
        sessions.forget(|p| p == "nobody");
        assert!(sessions.expire(Instant::now()).is_empty());
        let gone = sessions.expire(Instant::now() + Duration::from_secs(61));
        assert_eq!(gone.len(), 1);
        assert_eq!(&*gone[0].presence, "p3");
    }
}
