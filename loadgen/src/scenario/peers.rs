//! `peers`: the peer directory under load (PROTOCOL.md §9–§10). N sessions
//! per mesh say hello and every K-th joins a group; while a few senders
//! broadcast to `*` (as in `broadcast`) and one sends to the group at a
//! fixed rate, the listers issue `list_peers` at a paced rate. The figures
//! are request→`peers_list` latency (matched by `_reqId`), entries and bytes
//! per answer, and group send→push latency; an answer that does not list
//! exactly the mesh's sessions fails the run. Accounting: [`crate::peers`].
use super::{Scenario, Traffic};

pub struct Peers;

impl Scenario for Peers {
    fn name(&self) -> &'static str {
        "peers"
    }
    fn traffic(&self) -> Option<Traffic> {
        Some(Traffic::Broadcast)
    }
}
