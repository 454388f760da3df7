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
    /// `gated` only (else `None`).
    pub gated: Option<GatedReport>,
}

/// What the `gated` scenario adds (PROTOCOL.md §5). `push_ms` then covers
/// live pushes only; held ones are timed by the drain.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatedReport {
    /// `working` or `dnd`.
    pub status: String,
    pub mix: String,
    /// Gating sessions over all meshes.
    pub working_peers: usize,
    /// `next`/`low` sends to gating peers (acked or pending; errors excluded).
    pub held_expected: u64,
    /// Of those, arrived after the idle flip.
    pub held_pushes: u64,
    /// `next`/`low` pushes that reached a peer while it was working/dnd.
    pub gating_violations: u64,
    /// Held pushes out of their sender's ack order.
    pub held_order_violations: u64,
    /// Held pushes delivered after an envelope certainly created later
    /// (sent only after this one's ack), whatever the senders. Counts
    /// towards failure only with `strict_order`.
    pub held_creation_order_violations: u64,
    /// `--strict-order`.
    pub strict_order: bool,
    /// Held pushes whose ack the sender never got (not order-checked).
    pub held_unacked: u64,
    /// First idle flip → last held push, in seconds (None: nothing held arrived).
    pub drain_s: Option<f64>,
    /// Per gating peer: its idle flip → its last held push.
    pub drain_ms: Percentiles,
    /// The load ended early: a peer reached --max-held-per-peer.
    pub held_cap_reached: bool,
}

impl GatedReport {
    /// What fails the run.
    pub fn violations(&self) -> u64 {
        let creation = if self.strict_order {
            self.held_creation_order_violations
        } else {
            0
        };
        self.gating_violations + self.held_order_violations + creation
    }
}

impl Report {
    /// Nothing lost, no duplicate, no failure, no gating or order violation.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.failure.is_none()
            && self.gated.as_ref().is_none_or(|g| g.violations() == 0)
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
        if let Some(g) = &self.gated {
            if g.gating_violations > 0 {
                parts.push(format!(
                    "{} next/low pushes reached a {} peer",
                    g.gating_violations, g.status
                ));
            }
            if g.held_order_violations > 0 {
                parts.push(format!(
                    "{} held pushes out of their sender's ack order",
                    g.held_order_violations
                ));
            }
            if g.strict_order && g.held_creation_order_violations > 0 {
                parts.push(format!(
                    "{} held pushes after one created later",
                    g.held_creation_order_violations
                ));
            }
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
            let push_name = if self.gated.is_some() {
                "send→push (live)"
            } else {
                "send→push"
            };
            let mut rows = vec![("send→ack", &self.ack_ms), (push_name, &self.push_ms)];
            if let Some(g) = self.gated.as_ref().filter(|g| g.drain_ms.count > 0) {
                rows.push(("idle flip→last held, /peer", &g.drain_ms));
            }
            for (name, p) in rows {
                let _ = writeln!(
                    t,
                    "  {:<28} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name, p.p50, p.p90, p.p99, p.p999, p.max
                );
            }
        }
        if let Some(g) = &self.gated {
            row(
                &mut t,
                "gating",
                format!(
                    "{} peers {} ({}){}",
                    g.working_peers,
                    g.status,
                    g.mix,
                    if g.held_cap_reached {
                        "; load ended at --max-held-per-peer"
                    } else {
                        ""
                    }
                ),
            );
            row(
                &mut t,
                "held: after idle / expected",
                format!("{} / {}", g.held_pushes, g.held_expected),
            );
            row(
                &mut t,
                "drain (idle flip→last held)",
                format!("{} s", opt(g.drain_s, 3)),
            );
            row(&mut t, "gating violations", g.gating_violations.to_string());
            row(
                &mut t,
                "held order: sender / created",
                format!(
                    "{} / {} violations ({}{} never acked)",
                    g.held_order_violations,
                    g.held_creation_order_violations,
                    if g.strict_order {
                        ""
                    } else {
                        "created: reported only, fails with --strict-order; "
                    },
                    g.held_unacked
                ),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gating_and_order_violations_fail_the_run() {
        let clean = Report {
            gated: Some(GatedReport {
                status: "working".into(),
                held_expected: 10,
                held_pushes: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(clean.ok(), "{}", clean.failure_summary());
        let with = |f: &dyn Fn(&mut GatedReport)| {
            let mut r = clean.clone();
            f(r.gated.as_mut().unwrap());
            r
        };
        for (r, text) in [
            (
                with(&|g| g.gating_violations = 3),
                "3 next/low pushes reached a working peer",
            ),
            (
                with(&|g| g.held_order_violations = 3),
                "3 held pushes out of their sender's ack order",
            ),
            (
                with(&|g| {
                    g.held_creation_order_violations = 3;
                    g.strict_order = true;
                }),
                "3 held pushes after one created later",
            ),
        ] {
            assert!(!r.ok());
            assert!(
                r.failure_summary().contains(text),
                "{}",
                r.failure_summary()
            );
            assert!(r.table().contains("FAILED"));
            let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            assert_eq!(json["ok"], false);
        }
        // Reported, not failing: cross-sender creation order without
        // --strict-order, and held pushes whose ack never came.
        let r = with(&|g| {
            g.held_creation_order_violations = 3;
            g.held_unacked = 2;
        });
        assert!(r.ok(), "{}", r.failure_summary());
        assert!(r.table().contains("reported only"));
        // Other scenarios have no gated block.
        let direct = Report::default();
        assert!(direct.ok());
        let json: serde_json::Value = serde_json::from_str(&direct.to_json()).unwrap();
        assert!(json["gated"].is_null());
    }
}
