//! The run's summary: a table for people, one JSON object for scripts. The
//! field names are loadgen's (loadgen/src/report.rs), so bench scripts
//! read both alike; `broker_*` is the nats-server here.
use loadgen::stats::Percentiles;
use serde::Serialize;
use std::fmt::Write;

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Report {
    pub scenario: &'static str,
    pub mode: &'static str,
    pub threads: usize,
    pub peers: usize,
    pub senders: usize,
    pub payload: usize,
    pub window: usize,
    /// Seconds of load, and until the last message arrived (or the grace
    /// period ran out): the interval the CPU figures cover.
    pub duration_s: f64,
    pub active_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub pushes: u64,
    pub expected_pushes: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    /// Messages that were not another client's publish of this run.
    pub unexpected_pushes: u64,
    pub sends_per_s: f64,
    pub pushes_per_s: f64,
    pub push_ms: Percentiles,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_pct: Option<f64>,
    pub broker_cpu_us_per_push: Option<f64>,
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_pct: f64,
    pub ok: bool,
    pub failure: Option<String>,
}

impl Report {
    /// Sets `ok`, and `failure` where only the counts say what went wrong.
    pub(crate) fn judge(mut self) -> Report {
        if self.failure.is_none() {
            if self.unexpected_pushes > 0 {
                self.failure = Some(format!(
                    "{} messages that are not another client's publish",
                    self.unexpected_pushes
                ));
            } else if self.pushes == 0 {
                self.failure = Some("no message was received".into());
            }
        }
        self.ok = self.failure.is_none()
            && self.lost == 0
            && self.duplicates == 0
            && self.order_violations == 0;
        self
    }

    pub(crate) fn failure_summary(&self) -> String {
        let mut parts = Vec::new();
        if self.lost > 0 {
            parts.push(format!(
                "{} of {} expected messages lost",
                self.lost, self.expected_pushes
            ));
        }
        if self.duplicates > 0 {
            parts.push(format!("{} duplicates", self.duplicates));
        }
        if self.order_violations > 0 {
            parts.push(format!("{} out of order", self.order_violations));
        }
        parts.extend(self.failure.clone());
        parts.join("; ")
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<20} {v}");
        };
        let _ = writeln!(
            t,
            "natsref {} ({}; {} threads) — {} peers, {} publishing, payload {} B, window {}",
            self.scenario,
            self.mode,
            self.threads,
            self.peers,
            self.senders,
            self.payload,
            self.window
        );
        row(
            &mut t,
            "duration",
            format!(
                "{:.2} s load, {:.2} s until drained",
                self.duration_s, self.active_s
            ),
        );
        row(
            &mut t,
            "publishes",
            format!(
                "{} sent ({:.0}/s), {} acked by PONG",
                self.sent, self.sends_per_s, self.acked
            ),
        );
        row(
            &mut t,
            "messages",
            format!(
                "{} of {} expected ({:.0}/s); lost {}, duplicates {}, out of order {}",
                self.pushes,
                self.expected_pushes,
                self.pushes_per_s,
                self.lost,
                self.duplicates,
                self.order_violations
            ),
        );
        let p = &self.push_ms;
        row(
            &mut t,
            "publish→receive ms",
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                p.p50, p.p90, p.p99, p.p999, p.max
            ),
        );
        let server = match (self.broker_pid, self.broker_cpu_s) {
            (Some(pid), Some(cpu)) => format!(
                "pid {pid}: {cpu:.2} s CPU ({:.1} % of a core), {} µs per message",
                self.broker_cpu_pct.unwrap_or(0.0),
                self.broker_cpu_us_per_push
                    .map_or("-".into(), |us| format!("{us:.3}"))
            ),
            (Some(pid), None) => format!("pid {pid}: /proc not readable"),
            (None, _) => "unknown pid (--server-pid)".into(),
        };
        row(&mut t, "nats-server", server);
        row(
            &mut t,
            "natsref",
            format!(
                "{:.2} s CPU ({:.1} % of a core)",
                self.loadgen_cpu_s, self.loadgen_cpu_pct
            ),
        );
        let verdict = if self.ok {
            "ok".into()
        } else {
            format!("FAILED: {}", self.failure_summary())
        };
        row(&mut t, "result", verdict);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_and_serializes() {
        let good = Report {
            pushes: 10,
            expected_pushes: 10,
            ..Default::default()
        }
        .judge();
        assert!(good.ok);
        let json: serde_json::Value = serde_json::from_str(&good.to_json()).unwrap();
        assert_eq!(json["ok"], true);
        assert_eq!(json["failure"], serde_json::Value::Null);
        assert!(json["push_ms"]["p999"].is_number());
        assert!(json["broker_cpu_us_per_push"].is_null());

        let lossy = Report {
            pushes: 8,
            expected_pushes: 10,
            lost: 2,
            ..Default::default()
        }
        .judge();
        assert!(!lossy.ok);
        assert_eq!(lossy.failure_summary(), "2 of 10 expected messages lost");
        assert!(lossy.table().contains("FAILED: 2 of 10"));

        let empty = Report::default().judge();
        assert!(!empty.ok);
        assert_eq!(empty.failure.as_deref(), Some("no message was received"));
    }
}
