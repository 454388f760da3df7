//! `held`: PROTOCOL.md §4 held envelopes. Phase 1 (hold): the first
//! `--senders` members of each mesh connect and send direct messages (and,
//! with `--broadcast-every`, `*`) to the other members, who are offline;
//! the figure is send→ack latency and acks/s while every envelope must be
//! held. Phase 2 (drain): the offline members connect and must get every
//! acked envelope exactly once (checked by `messageId`). Accounting:
//! [`crate::held`].
use super::{Scenario, Traffic};

pub struct Held;

impl Scenario for Held {
    fn name(&self) -> &'static str {
        "held"
    }
    fn traffic(&self) -> Option<Traffic> {
        Some(Traffic::Direct)
    }
}
