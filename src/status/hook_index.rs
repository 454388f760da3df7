//! Where a hook signal goes (PROTOCOL.md §5): the live sessions of every
//! shard by cwd, and signals stashed for sessions not connected yet.
//! Written on hello and close, read by `POST /hook/set-status`; never
//! touched on the send path, so one lock is cheap here.
use crate::hook::Status;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A stashed signal applies to a session connecting within this window.
pub(crate) const PENDING_WINDOW: Duration = Duration::from_secs(10);

/// A live session as a hook finds it: its shard and the shard's
/// connection id, and its presence for the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HookTarget {
    pub shard: usize,
    pub conn: u64,
    pub presence_id: Box<str>,
}

/// How well a session matches a hook signal, comparable across nodes
/// (README "Several nodes"): a pid match beats any cwd match, then the
/// newest hello wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct HookRank {
    pub pid_match: bool,
    /// When the session said hello (ms since the epoch).
    pub since_ms: u64,
}

#[derive(Debug)]
struct Indexed {
    pid: i32,
    target: HookTarget,
    /// Hello order: the newest live session with a cwd wins the fallback
    /// (wall clock for other nodes, `seq` for ties on this one).
    since_ms: u64,
    seq: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    status: Status,
    at: Instant,
}

#[derive(Default, Debug)]
struct Tables {
    by_cwd: HashMap<Box<str>, Vec<Indexed>>,
    /// Keyed by (pid, cwd); a hook without pid stashes under `None`, which
    /// any pid with that cwd picks up.
    pending: HashMap<(Option<i32>, Box<str>), Pending>,
    seq: u64,
}

#[derive(Default, Debug)]
pub(crate) struct HookIndex {
    tables: Mutex<Tables>,
}

impl HookIndex {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().expect("hook index lock")
    }

    pub(crate) fn insert(&self, pid: i32, cwd: &str, target: HookTarget, since_ms: u64) {
        let mut tables = self.tables();
        tables.seq += 1;
        let seq = tables.seq;
        tables.by_cwd.entry(cwd.into()).or_default().push(Indexed {
            pid,
            target,
            since_ms,
            seq,
        });
    }

    pub(crate) fn remove(&self, cwd: &str, shard: usize, conn: u64) {
        let mut tables = self.tables();
        if let Some(sessions) = tables.by_cwd.get_mut(cwd) {
            sessions.retain(|s| !(s.target.shard == shard && s.target.conn == conn));
            if sessions.is_empty() {
                tables.by_cwd.remove(cwd);
            }
        }
    }

    /// The live session matching (pid, cwd), else the newest with that cwd,
    /// and how well it matches.
    pub(crate) fn find(&self, pid: Option<i32>, cwd: &str) -> Option<(HookTarget, HookRank)> {
        let tables = self.tables();
        let sessions = tables.by_cwd.get(cwd)?;
        let matched = pid.and_then(|pid| sessions.iter().rev().find(|s| s.pid == pid));
        let pid_match = matched.is_some();
        matched
            .or_else(|| sessions.iter().max_by_key(|s| s.seq))
            .map(|s| {
                let rank = HookRank {
                    pid_match,
                    since_ms: s.since_ms,
                };
                (s.target.clone(), rank)
            })
    }

    /// The live session with `presence_id` in `cwd` (another node chose it).
    pub(crate) fn by_presence(&self, cwd: &str, presence_id: &str) -> Option<HookTarget> {
        let tables = self.tables();
        tables
            .by_cwd
            .get(cwd)?
            .iter()
            .find(|s| &*s.target.presence_id == presence_id)
            .map(|s| s.target.clone())
    }

    /// Stashes a signal that found no session; the newest one wins.
    pub(crate) fn stash(&self, pid: Option<i32>, cwd: &str, status: Status, at: Instant) {
        self.tables()
            .pending
            .insert((pid, cwd.into()), Pending { status, at });
    }

    /// The newest signal stashed for (pid, cwd) (or for cwd without pid)
    /// within `PENDING_WINDOW`, taken out, with when it was stashed.
    pub(crate) fn take_pending(
        &self,
        pid: i32,
        cwd: &str,
        now: Instant,
    ) -> Option<(Status, Instant)> {
        let mut tables = self.tables();
        let exact = tables.pending.remove(&(Some(pid), cwd.into()));
        let any_pid = tables.pending.remove(&(None, cwd.into()));
        [exact, any_pid]
            .into_iter()
            .flatten()
            .filter(|p| now.duration_since(p.at) < PENDING_WINDOW)
            .max_by_key(|p| p.at)
            .map(|p| (p.status, p.at))
    }

    /// Drops stashes older than the window; returns how many.
    pub(crate) fn sweep_pending(&self, now: Instant) -> usize {
        let mut tables = self.tables();
        let before = tables.pending.len();
        tables
            .pending
            .retain(|_, p| now.duration_since(p.at) < PENDING_WINDOW);
        before - tables.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(shard: usize, conn: u64) -> HookTarget {
        HookTarget {
            shard,
            conn,
            presence_id: format!("p{shard}-{conn}").into(),
        }
    }

    #[test]
    fn pid_match_first_then_newest_with_the_cwd() {
        let index = HookIndex::default();
        index.insert(10, "/a", target(0, 1), 100);
        index.insert(11, "/a", target(1, 2), 100);
        let found = |pid, cwd| index.find(pid, cwd).map(|(t, _)| t);
        assert_eq!(found(Some(10), "/a"), Some(target(0, 1)));
        assert_eq!(found(Some(99), "/a"), Some(target(1, 2)));
        assert_eq!(found(None, "/a"), Some(target(1, 2)));
        assert_eq!(found(Some(10), "/b"), None);
        let exact = index.find(Some(10), "/a").unwrap().1;
        let newest = index.find(Some(99), "/a").unwrap().1;
        assert!(exact.pid_match && !newest.pid_match && exact > newest);
        assert_eq!(index.by_presence("/a", "p1-2"), Some(target(1, 2)));
        assert_eq!(index.by_presence("/b", "p1-2"), None);
        index.remove("/a", 1, 2);
        assert_eq!(found(None, "/a"), Some(target(0, 1)));
        index.remove("/a", 0, 1);
        assert_eq!(found(None, "/a"), None);
    }

    #[test]
    fn pending_is_taken_once_within_the_window() {
        let index = HookIndex::default();
        let t0 = Instant::now();
        index.stash(Some(5), "/a", Status::Working, t0);
        index.stash(Some(5), "/a", Status::Dnd, t0 + Duration::from_millis(1));
        let now = t0 + Duration::from_secs(1);
        assert_eq!(
            index.take_pending(5, "/a", now).map(|p| p.0),
            Some(Status::Dnd)
        );
        assert_eq!(index.take_pending(5, "/a", now), None);
        index.stash(None, "/b", Status::Working, t0);
        assert_eq!(
            index.take_pending(7, "/b", now).map(|p| p.0),
            Some(Status::Working)
        );
    }

    #[test]
    fn stale_pending_is_ignored_and_swept() {
        let index = HookIndex::default();
        let t0 = Instant::now();
        index.stash(Some(5), "/a", Status::Working, t0);
        index.stash(Some(6), "/a", Status::Working, t0);
        let late = t0 + PENDING_WINDOW;
        assert_eq!(index.take_pending(5, "/a", late), None);
        assert_eq!(index.sweep_pending(late), 1);
    }
}
