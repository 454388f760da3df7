//! `broadcast`: M meshes × N peers; senders send to `*`, every other
//! member's session gets each push.
use super::{Scenario, Traffic};

pub struct Broadcast;

impl Scenario for Broadcast {
    fn name(&self) -> &'static str {
        "broadcast"
    }
    fn traffic(&self) -> Option<Traffic> {
        Some(Traffic::Broadcast)
    }
}
