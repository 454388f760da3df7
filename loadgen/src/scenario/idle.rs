//! `idle`: open every connection, say hello, hold them for the duration;
//! the figure is the broker's RSS per connection.
use super::{Scenario, Traffic};

pub struct Idle;

impl Scenario for Idle {
    fn name(&self) -> &'static str {
        "idle"
    }
    fn traffic(&self) -> Option<Traffic> {
        None
    }
    fn measures_rss_per_connection(&self) -> bool {
        true
    }
}
