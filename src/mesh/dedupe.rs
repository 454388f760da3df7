//! Duplicate sends (PROTOCOL.md §11): a member's `client_message_id`s of
//! the last `DEDUPE_WINDOW_SECONDS`, with the `messageId` each was given,
//! so a retried send is acked again instead of routed again. Kept in the
//! member's directory entry (shared by its sessions on every shard),
//! bounded per member, and filled at start from the held rows Postgres
//! kept, so the window holds across a restart for envelopes that were held.
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Most ids remembered per member; the oldest go first past it.
pub const MAX_REMEMBERED: usize = 10_000;

#[derive(Default)]
struct Window {
    by_client_id: FxHashMap<Box<str>, (Box<str>, SystemTime)>,
    /// Client ids in the order they were first seen.
    order: VecDeque<(SystemTime, Box<str>)>,
}

impl Window {
    fn forget_before(&mut self, oldest: SystemTime) {
        while let Some((at, _)) = self.order.front() {
            if *at >= oldest && self.order.len() <= MAX_REMEMBERED {
                break;
            }
            let (at, client_id) = self.order.pop_front().expect("front");
            if self
                .by_client_id
                .get(&client_id)
                .is_some_and(|(_, seen)| *seen == at)
            {
                self.by_client_id.remove(&client_id);
            }
        }
    }
}

#[derive(Default)]
pub struct SentIds(Mutex<Window>);

impl SentIds {
    /// A send with `client_id` at `now`: `Err` with the first send's
    /// message id when one with it was accepted within `window`; else it is
    /// remembered with `message_id`.
    pub fn claim(
        &self,
        client_id: &str,
        message_id: &str,
        now: SystemTime,
        window: Duration,
    ) -> Result<(), Box<str>> {
        let mut seen = self.0.lock().expect("sent ids lock");
        seen.forget_before(now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH));
        if let Some((first, at)) = seen.by_client_id.get(client_id) {
            if now.duration_since(*at).unwrap_or_default() < window {
                return Err(first.clone());
            }
        }
        seen.by_client_id
            .insert(client_id.into(), (message_id.into(), now));
        seen.order.push_back((now, client_id.into()));
        Ok(())
    }

    /// A send Postgres kept from an earlier run (a held row): retries of it
    /// stay duplicates across the restart, for what is left of the window.
    pub fn remember(&self, client_id: &str, message_id: &str, at: SystemTime) {
        let mut seen = self.0.lock().expect("sent ids lock");
        seen.by_client_id
            .insert(client_id.into(), (message_id.into(), at));
        seen.order.push_back((at, client_id.into()));
    }

    /// The send that claimed `client_id` was refused after all: a retry
    /// must be routed.
    pub fn release(&self, client_id: &str, message_id: &str) {
        let mut seen = self.0.lock().expect("sent ids lock");
        if seen
            .by_client_id
            .get(client_id)
            .is_some_and(|(id, _)| &**id == message_id)
        {
            seen.by_client_id.remove(client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_within_the_window_gets_the_first_id() {
        let ids = SentIds::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let window = Duration::from_secs(600);
        assert_eq!(ids.claim("c1", "m1", t0, window), Ok(()));
        assert_eq!(
            ids.claim("c1", "m2", t0 + Duration::from_secs(599), window),
            Err("m1".into())
        );
        assert_eq!(ids.claim("c2", "m3", t0, window), Ok(()));
        // Past the window it is a new send.
        let later = t0 + Duration::from_secs(600);
        assert_eq!(ids.claim("c1", "m4", later, window), Ok(()));
        assert_eq!(ids.claim("c1", "m5", later, window), Err("m4".into()));
        // A refused send frees its id.
        ids.release("c1", "m4");
        assert_eq!(ids.claim("c1", "m6", later, window), Ok(()));
    }

    #[test]
    fn it_is_bounded_per_member() {
        let ids = SentIds::default();
        let now = SystemTime::now();
        let window = Duration::from_secs(600);
        for i in 0..MAX_REMEMBERED + 10 {
            ids.claim(&format!("c{i}"), &format!("m{i}"), now, window)
                .unwrap();
        }
        let seen = ids.0.lock().unwrap();
        assert!(seen.by_client_id.len() <= MAX_REMEMBERED + 1);
        assert!(!seen.by_client_id.contains_key("c0"));
    }
}
