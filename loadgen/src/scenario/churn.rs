//! `churn`: connect, upgrade, signed hello, close, again, on every
//! connection slot at once; the figure is hellos per second.
use super::{Lifecycle, Scenario, Traffic};
use crate::report::Report;

pub struct Churn;

impl Scenario for Churn {
    fn name(&self) -> &'static str {
        "churn"
    }
    fn traffic(&self) -> Option<Traffic> {
        None
    }
    fn lifecycle(&self) -> Lifecycle {
        Lifecycle::Churn
    }
    fn check(&self, report: &Report) -> Option<String> {
        (report.run_hellos == 0).then(|| "no hello completed during the run".to_string())
    }
}
