//! Scenarios: what each connection does once it said hello. One module
//! each; a later scenario (`hooks`) adds a module and a line in
//! [`by_name`], and overrides the trait methods it needs.
mod broadcast;
mod churn;
mod direct;
mod gated;
mod held;
mod idle;
mod peers;

use crate::cli::ScenarioName;
use crate::report::Report;
use std::sync::Arc;

/// Where a scenario's sends go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// To one random other member of the mesh (its pubkey).
    Direct,
    /// To `*`: every other member of the mesh.
    Broadcast,
}

/// What a connection does after its hello_ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Stay connected until the run ends.
    Hold,
    /// Close at once and connect again (hello storm).
    Churn,
}

pub trait Scenario: Send + Sync {
    fn name(&self) -> &'static str;
    /// `None`: the scenario sends nothing.
    fn traffic(&self) -> Option<Traffic>;
    fn lifecycle(&self) -> Lifecycle {
        Lifecycle::Hold
    }
    /// Report the broker's RSS growth per connection (measured after setup).
    fn measures_rss_per_connection(&self) -> bool {
        false
    }
    /// Pushes one send calls for, given the sender's mesh size.
    fn expected_per_send(&self, mesh_size: usize) -> u64 {
        match self.traffic() {
            Some(Traffic::Direct) => 1,
            Some(Traffic::Broadcast) => mesh_size.saturating_sub(1) as u64,
            None => 0,
        }
    }
    /// Some peers set themselves working/dnd and the run checks gated
    /// delivery (PROTOCOL.md §5): the `gated` scenario.
    fn gates(&self) -> bool {
        false
    }
    /// Scenario-specific failure, beyond lost pushes (e.g. no hellos at all).
    fn check(&self, _report: &Report) -> Option<String> {
        None
    }
}

pub fn by_name(name: ScenarioName) -> Arc<dyn Scenario> {
    match name {
        ScenarioName::Direct => Arc::new(direct::Direct),
        ScenarioName::Broadcast => Arc::new(broadcast::Broadcast),
        ScenarioName::Idle => Arc::new(idle::Idle),
        ScenarioName::Churn => Arc::new(churn::Churn),
        ScenarioName::Gated => Arc::new(gated::Gated),
        ScenarioName::Held => Arc::new(held::Held),
        ScenarioName::Peers => Arc::new(peers::Peers),
    }
}
