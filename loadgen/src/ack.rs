//! Acknowledged delivery from the client's side (PROTOCOL.md §11, with
//! `--client-ack`): which pushes a session acks (`--ack-fraction`, decided
//! by a hash of the `messageId` so a run is repeatable), the batched
//! `client_ack` messages, and the bookkeeping that tells a redelivery
//! (`"redelivered":true`) from a new push and from a true duplicate.
use crate::wire;
use meshbroker::ws::OpCode;
use std::collections::HashMap;

/// Most ids in one `client_ack` (the broker's bound, PROTOCOL.md §11).
pub const MAX_IDS_PER_ACK: usize = 1000;
/// A batch is also sent once its JSON reaches this size, well under the
/// broker's default MAX_MESSAGE_BYTES (65536) whatever the ids' length.
const MAX_ACK_JSON: usize = 48 * 1024;

const ACK_HEAD: &[u8] = b"{\"type\":\"client_ack\",\"messageIds\":[";
const ACK_TAIL: &[u8] = b"]}";

/// `--client-ack`: what every session of the run does with its pushes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AckPlan {
    /// Of the first copies of pushes, the share acked (redeliveries are
    /// always acked).
    pub fraction: f64,
}

impl AckPlan {
    /// Whether a first push of `message_id` is acked.
    pub fn acks(&self, message_id: &[u8]) -> bool {
        acks(message_id, self.fraction)
    }
}

/// A 64-bit hash of a message id: FNV-1a, then a finalizer so that ids
/// differing only in their last characters spread over the whole range.
pub fn id_hash(id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in id {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Whether a first push of `message_id` is acked under `fraction`: the
/// same id always gets the same answer; 1 acks everything, 0 nothing.
pub fn acks(message_id: &[u8], fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    // The top 53 bits as a uniform number in [0, 1).
    let u = (id_hash(message_id) >> 11) as f64 / (1u64 << 53) as f64;
    u < fraction
}

/// One connection's pending `client_ack`: the ids gathered since the
/// last one was written.
#[derive(Clone, Debug, Default)]
pub struct AckBatch {
    json: Vec<u8>,
    count: usize,
}

impl AckBatch {
    /// Adds one id; when the batch is full, its message goes to `out` at
    /// once. Returns the ids of a message written, if one was.
    pub fn add(&mut self, id: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        if self.count == 0 {
            self.json.clear();
            self.json.extend_from_slice(ACK_HEAD);
        } else {
            self.json.push(b',');
        }
        self.json.push(b'"');
        self.json.extend_from_slice(id);
        self.json.push(b'"');
        self.count += 1;
        if self.count >= MAX_IDS_PER_ACK || self.json.len() >= MAX_ACK_JSON {
            return self.finish(out);
        }
        None
    }

    /// Writes the pending message, if any, as one client frame to `out`;
    /// returns how many ids it carried.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        if self.count == 0 {
            return None;
        }
        self.json.extend_from_slice(ACK_TAIL);
        out.extend_from_slice(&wire::client_frame(OpCode::Text, &self.json));
        let n = self.count;
        self.count = 0;
        self.json.clear();
        if self.json.capacity() > 4 * MAX_ACK_JSON {
            self.json.shrink_to(MAX_ACK_JSON);
        }
        Some(n)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Forgets what was gathered (the connection is gone).
    pub fn clear(&mut self) {
        self.count = 0;
        self.json.clear();
    }
}

/// What a push with `"redelivered":true` turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redelivery {
    /// Of a first copy this session left unacked on purpose, same id.
    OfUnacked,
    /// Of a first copy this session acked (the ack came too late, or the
    /// broker lost it).
    AfterAck,
    /// Its first copy never arrived: it counts as the delivery.
    Unseen,
    /// Same sender and sequence as a first copy left unacked, another
    /// `messageId`: a broker fault.
    IdMismatch,
}

/// One connection's client-ack state.
#[derive(Clone, Debug, Default)]
pub struct AckConn {
    pub batch: AckBatch,
    /// First copies left unacked on purpose, by (sender, seq), with their
    /// id's hash: what a redelivery is matched against.
    unacked: HashMap<(u32, u32), u64>,
}

impl AckConn {
    /// A first copy was left unacked.
    pub fn leave_unacked(&mut self, sender: u32, seq: u32, id: &[u8]) {
        self.unacked.insert((sender, seq), id_hash(id));
    }

    /// A redelivered push of (sender, seq) with `id`; `seen`: whether the
    /// session had its first copy.
    pub fn redelivered(&mut self, sender: u32, seq: u32, id: &[u8], seen: bool) -> Redelivery {
        match self.unacked.remove(&(sender, seq)) {
            Some(h) if h == id_hash(id) => Redelivery::OfUnacked,
            Some(_) => Redelivery::IdMismatch,
            None if seen => Redelivery::AfterAck,
            None => Redelivery::Unseen,
        }
    }

    /// First copies left unacked that have not come again.
    pub fn awaiting(&self) -> usize {
        self.unacked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        // Shaped like time-ordered broker ids: long common prefixes.
        (0..n).map(|i| format!("01kb2m7q{i:018}")).collect()
    }

    #[test]
    fn the_fraction_is_deterministic_and_close() {
        let ids = ids(20_000);
        for fraction in [0.0, 0.1, 0.5, 0.9] {
            let acked = ids
                .iter()
                .filter(|id| acks(id.as_bytes(), fraction))
                .count();
            let share = acked as f64 / ids.len() as f64;
            assert!((share - fraction).abs() < 0.02, "{fraction}: {share}");
        }
        assert!(ids.iter().all(|id| acks(id.as_bytes(), 1.0)));
        assert!(!ids.iter().any(|id| acks(id.as_bytes(), 0.0)));
        let plan = AckPlan { fraction: 0.5 };
        for id in &ids[..100] {
            assert_eq!(plan.acks(id.as_bytes()), plan.acks(id.as_bytes()));
        }
        assert_ne!(id_hash(b"m1"), id_hash(b"m2"));
    }

    fn decode(frames: &mut [u8]) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < frames.len() {
            let h = meshbroker::ws::decode_client_frame(&mut frames[at..], 1 << 20)
                .unwrap()
                .unwrap();
            let range = h.payload_range();
            out.push(serde_json::from_slice(&frames[at..][range.clone()]).unwrap());
            at += range.end;
        }
        out
    }

    #[test]
    fn batches_hold_at_most_a_thousand_ids() {
        let mut batch = AckBatch::default();
        let mut out = Vec::new();
        assert_eq!(batch.finish(&mut out), None);
        assert!(out.is_empty());
        let ids = ids(2_345);
        let mut written = Vec::new();
        for id in &ids {
            written.extend(batch.add(id.as_bytes(), &mut out));
        }
        assert_eq!(written, vec![1000, 1000]);
        assert!(!batch.is_empty());
        written.extend(batch.finish(&mut out));
        assert_eq!(written, vec![1000, 1000, 345]);
        assert!(batch.is_empty());
        let messages = decode(&mut out);
        assert_eq!(messages.len(), 3);
        let mut back = Vec::new();
        for m in &messages {
            assert_eq!(m["type"], "client_ack");
            assert_eq!(m.as_object().unwrap().len(), 2);
            back.extend(
                m["messageIds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string()),
            );
        }
        assert_eq!(back, ids);
        // Long ids: the batch closes on size first.
        let long = "x".repeat(100);
        let mut out = Vec::new();
        let mut first = None;
        for i in 0..1000 {
            if let Some(n) = batch.add(long.as_bytes(), &mut out) {
                first = Some((i, n));
                break;
            }
        }
        let (i, n) = first.expect("closed on size");
        assert_eq!(i + 1, n);
        assert!(n < 1000);
        assert!(out.len() < 65_536);
        batch.clear();
        assert_eq!(batch.finish(&mut out), None);
    }

    #[test]
    fn redeliveries_are_told_apart() {
        let mut conn = AckConn::default();
        conn.leave_unacked(1, 7, b"m7");
        conn.leave_unacked(1, 8, b"m8");
        assert_eq!(conn.awaiting(), 2);
        assert_eq!(conn.redelivered(1, 7, b"m7", true), Redelivery::OfUnacked);
        // Once matched, another redelivery of it is one after an ack.
        assert_eq!(conn.redelivered(1, 7, b"m7", true), Redelivery::AfterAck);
        assert_eq!(
            conn.redelivered(1, 8, b"other", true),
            Redelivery::IdMismatch
        );
        assert_eq!(conn.redelivered(2, 0, b"n0", false), Redelivery::Unseen);
        assert_eq!(conn.awaiting(), 0);
    }
}
