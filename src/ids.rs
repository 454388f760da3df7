//! Sortable, unique text ids made on the shard (and the shard's cached
//! RFC 3339 clock for `createdAt`), so nothing on the routing path
//! waits for an INSERT to learn its id.
//!
//! Shape (20 chars, Crockford base32, lowercase): 10 chars of milliseconds since
//! the epoch, 2 chars of shard number, 8 chars of a per-shard counter that starts
//! at a random value each run. Time first makes ids sort by creation; the shard
//! part keeps shards from colliding; the random counter start keeps two runs of
//! the broker from colliding inside the same millisecond.
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

pub struct IdGen {
    shard: u16,
    counter: u64,
}

impl IdGen {
    pub fn new(shard: u16) -> Self {
        let mut seed = [0u8; 8];
        // A failing getrandom only weakens the cross-restart guarantee; time still orders.
        let _ = getrandom::getrandom(&mut seed);
        IdGen {
            shard,
            counter: u64::from_le_bytes(seed),
        }
    }

    pub fn next_id(&mut self) -> String {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.counter = self.counter.wrapping_add(1);
        let mut out = String::with_capacity(20);
        push_base32(&mut out, millis, 10);
        push_base32(&mut out, u64::from(self.shard), 2);
        push_base32(&mut out, self.counter, 8);
        out
    }
}

fn push_base32(out: &mut String, value: u64, digits: u32) {
    for i in (0..digits).rev() {
        let digit = (value >> (i * 5)) & 31;
        out.push(ALPHABET[digit as usize] as char);
    }
}

/// The current time as RFC 3339 with milliseconds (a push's `createdAt`),
/// formatted at most once per millisecond per shard.
#[derive(Default)]
pub struct Rfc3339Clock {
    millis: u64,
    text: String,
}

impl Rfc3339Clock {
    pub fn now_rfc3339(&mut self) -> &str {
        let now = SystemTime::now();
        let millis = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if millis != self.millis || self.text.is_empty() {
            self.millis = millis;
            self.text.clear();
            use std::fmt::Write;
            let _ = write!(self.text, "{}", humantime::format_rfc3339_millis(now));
        }
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_fixed_width() {
        let mut gen = IdGen::new(3);
        let ids: Vec<String> = (0..1000).map(|_| gen.next_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 20));
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        // Time prefix never decreases.
        assert!(ids.windows(2).all(|w| w[0][..10] <= w[1][..10]));
    }

    #[test]
    fn clock_formats_rfc3339_millis() {
        let mut clock = Rfc3339Clock::default();
        let text = clock.now_rfc3339().to_owned();
        assert_eq!(text.len(), "2026-11-27T03:14:24.000Z".len());
        assert!(text.ends_with('Z') && text.as_bytes()[10] == b'T');
    }

    #[test]
    fn shards_never_share_ids() {
        let mut a = IdGen::new(0);
        let mut b = IdGen::new(1);
        b.counter = a.counter;
        assert_ne!(a.next_id(), b.next_id());
    }
}
