//! The run's summary: a table for people, one JSON object for scripts.
use crate::stats::Percentiles;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub mode: String,
    pub threads: usize,
    pub meshes: usize,
    pub peers: usize,
    pub connections: usize,
    pub senders: usize,
    pub payload: usize,
    pub priority: String,
    pub window: usize,
    pub rate: Option<f64>,
    /// Seconds of load (sending), and until the last push arrived (or the
    /// grace period ran out).
    pub duration_s: f64,
    pub active_s: f64,
    pub setup_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub send_errors: u64,
    pub pushes: u64,
    pub expected_pushes: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected_pushes: u64,
    pub foreign_pushes: u64,
    pub sends_per_s: f64,
    pub acks_per_s: f64,
    pub pushes_per_s: f64,
    pub ack_ms: Percentiles,
    pub push_ms: Percentiles,
    pub hello_ms: Percentiles,
    pub hellos: u64,
    pub run_hellos: u64,
    pub hellos_per_s: f64,
    pub hello_failures: u64,
    pub connection_failures: u64,
    pub broker_closes: u64,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_pct: Option<f64>,
    pub broker_cpu_us_per_push: Option<f64>,
    pub broker_cpu_us_per_send: Option<f64>,
    pub broker_cpu_us_per_hello: Option<f64>,
    pub broker_rss_bytes: Option<u64>,
    pub broker_rss_before_bytes: Option<u64>,
    pub broker_rss_per_conn_bytes: Option<f64>,
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_pct: f64,
    pub errors: BTreeMap<String, u64>,
    pub close_codes: BTreeMap<u16, u64>,
    pub failure: Option<String>,
}

impl Report {
    /// Nothing lost, no duplicate, no failure.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.failure.is_none()
    }

    pub fn failure_summary(&self) -> String {
        let mut parts = Vec::new();
        if self.lost > 0 {
            parts.push(format!(
                "{} of {} expected pushes lost",
                self.lost, self.expected_pushes
            ));
        }
        if self.duplicates > 0 {
            parts.push(format!("{} duplicate pushes", self.duplicates));
        }
        if let Some(f) = &self.failure {
            parts.push(f.clone());
        }
        parts.join("; ")
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("report serializes");
        v["ok"] = serde_json::Value::Bool(self.ok());
        v.to_string()
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let opt = |v: Option<f64>, digits: usize| match v {
            Some(x) => format!("{x:.digits$}"),
            None => "-".into(),
        };
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        let _ = writeln!(
            t,
            "loadgen {} ({}; {} threads) — {} mesh(es) × {} peers, {} connections, payload {} B, priority {}",
            self.scenario,
            self.mode,
            self.threads,
            self.meshes,
            self.peers,
            self.connections,
            self.payload,
            self.priority
        );
        row(
            &mut t,
            "duration",
            format!(
                "{:.2} s load, {:.2} s until drained, {:.2} s setup",
                self.duration_s, self.active_s, self.setup_s
            ),
        );
        if self.sent > 0 || self.expected_pushes > 0 {
            row(
                &mut t,
                "sent / acked / errors",
                format!("{} / {} / {}", self.sent, self.acked, self.send_errors),
            );
            row(
                &mut t,
                "pushes / expected",
                format!("{} / {}", self.pushes, self.expected_pushes),
            );
            row(
                &mut t,
                "lost / duplicates",
                format!("{} / {}", self.lost, self.duplicates),
            );
            row(&mut t, "sends/s", format!("{:.0}", self.sends_per_s));
            row(&mut t, "pushes/s", format!("{:.0}", self.pushes_per_s));
            let _ = writeln!(
                t,
                "  {:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency ms", "p50", "p90", "p99", "p99.9", "max"
            );
            for (name, p) in [("send→ack", &self.ack_ms), ("send→push", &self.push_ms)] {
                let _ = writeln!(
                    t,
                    "  {:<28} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name, p.p50, p.p90, p.p99, p.p999, p.max
                );
            }
        }
        row(
            &mut t,
            "hellos",
            format!(
                "{} ({} during the run, {:.0}/s; {} refused; {} connection failures)",
                self.hellos,
                self.run_hellos,
                self.hellos_per_s,
                self.hello_failures,
                self.connection_failures
            ),
        );
        row(
            &mut t,
            "hello latency ms",
            format!(
                "p50 {:.3} p99 {:.3} max {:.3}",
                self.hello_ms.p50, self.hello_ms.p99, self.hello_ms.max
            ),
        );
        row(
            &mut t,
            "broker pid",
            self.broker_pid
                .map_or("- (not found)".into(), |p| p.to_string()),
        );
        row(
            &mut t,
            "broker CPU",
            format!(
                "{} s ({}% of one core)",
                opt(self.broker_cpu_s, 3),
                opt(self.broker_cpu_pct, 0)
            ),
        );
        row(
            &mut t,
            "broker CPU µs/send, /push",
            format!(
                "{} , {}",
                opt(self.broker_cpu_us_per_send, 3),
                opt(self.broker_cpu_us_per_push, 3)
            ),
        );
        if self.run_hellos > 0 {
            row(
                &mut t,
                "broker CPU µs/hello",
                opt(self.broker_cpu_us_per_hello, 1),
            );
        }
        row(
            &mut t,
            "broker RSS",
            format!(
                "{} MiB (before setup {} MiB; {} B per connection)",
                opt(self.broker_rss_bytes.map(|b| b as f64 / 1048576.0), 1),
                opt(
                    self.broker_rss_before_bytes.map(|b| b as f64 / 1048576.0),
                    1
                ),
                opt(self.broker_rss_per_conn_bytes, 0)
            ),
        );
        row(
            &mut t,
            "loadgen CPU",
            format!(
                "{:.3} s ({:.0}% of one core)",
                self.loadgen_cpu_s, self.loadgen_cpu_pct
            ),
        );
        if !self.errors.is_empty() {
            row(&mut t, "errors", format!("{:?}", self.errors));
        }
        if !self.close_codes.is_empty() {
            row(&mut t, "close codes", format!("{:?}", self.close_codes));
        }
        let _ = writeln!(
            t,
            "  {:<28} {}",
            "result",
            if self.ok() {
                "OK".to_string()
            } else {
                format!("FAILED: {}", self.failure_summary())
            }
        );
        t
    }
}
