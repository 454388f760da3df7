//! `direct`: N peers in a mesh, each sending to random others.
use super::{Scenario, Traffic};

pub struct Direct;

impl Scenario for Direct {
    fn name(&self) -> &'static str {
        "direct"
    }
    fn traffic(&self) -> Option<Traffic> {
        Some(Traffic::Direct)
    }
}
