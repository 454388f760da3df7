//! `gated`: N peers in a mesh sending direct messages of mixed priorities
//! to random others, while some of them have set themselves `working` (or
//! `dnd`). Checks PROTOCOL.md §5: no `next`/`low` push reaches a gating
//! peer before it says `idle`; afterwards each held envelope arrives,
//! exactly once and in creation order. Accounting: [`crate::gate`].
use super::{Scenario, Traffic};

pub struct Gated;

impl Scenario for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn traffic(&self) -> Option<Traffic> {
        Some(Traffic::Direct)
    }
    fn gates(&self) -> bool {
        true
    }
}
