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
    /// `--stalled-readers`: members per mesh that stopped reading.
    pub stalled_readers: usize,
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
    /// Open loop only: each paced send's actual − due time, and whether
    /// its p99 stayed under one pacer tick (`--tick-us`).
    pub tick_us: u64,
    pub schedule_lag_ms: Option<Percentiles>,
    pub kept_schedule: Option<bool>,
    pub hellos: u64,
    pub run_hellos: u64,
    pub hellos_per_s: f64,
    pub hello_failures: u64,
    pub connection_failures: u64,
    pub broker_closes: u64,
    /// Every `--url`, in order; peer i of the roster connected to
    /// `urls[i % urls.len()]`.
    pub urls: Vec<String>,
    /// The first of `broker_pids`.
    pub broker_pid: Option<u32>,
    /// Every broker measured: `broker_cpu_*` and `broker_rss_*` are sums
    /// over them.
    pub broker_pids: Vec<u32>,
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
    /// `held` only (else `None`).
    pub held: Option<HeldReport>,
    /// `peers` only (else `None`): the peer directory and groups.
    pub directory: Option<PeersReport>,
    /// With `--client-ack` or `--client-message-ids` (else `None`).
    pub acks: Option<AckReport>,
    /// `--hgrm`: the percentile distributions written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hgrm_files: Option<Vec<std::path::PathBuf>>,
}

/// Acknowledged delivery and duplicate sends (PROTOCOL.md §11). The
/// run-wide `pushes` count each push once: a redelivery of one a session
/// had is counted here, not there (one whose first copy never came counts
/// there too, as the delivery); `duplicates` stay pushes of the same send
/// again *without* `redelivered`, a broker fault.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AckReport {
    /// `--client-ack`, and `--ack-fraction`.
    pub client_ack: bool,
    pub ack_fraction: Option<f64>,
    /// `client_ack` messages written, the ids they carried, and the mean.
    pub client_acks: u64,
    pub client_acked_ids: u64,
    pub ids_per_client_ack: Option<f64>,
    /// First copies left unacked on purpose (`--ack-fraction` below 1).
    pub unacked: u64,
    /// Pushes marked `"redelivered":true`; of those, of a first copy left
    /// unacked, of one acked (the ack late or lost), of one never seen,
    /// and under another `messageId` than their first copy (a fault).
    pub redeliveries: u64,
    pub redelivered_unacked: u64,
    pub redelivered_after_ack: u64,
    pub redelivered_unseen: u64,
    pub redelivered_mismatch: u64,
    /// Left unacked and not come again by the end.
    pub awaiting_redelivery: u64,
    /// `--client-message-ids`; acks saying `"duplicate":true` (every id is
    /// unique: a fault); pushes of the run's sends without the id (it is
    /// passed through on every push: a fault).
    pub client_message_ids: bool,
    pub duplicate_acks: u64,
    pub pushes_without_client_id: u64,
}

impl AckReport {
    /// What fails the run (redeliveries are reported only: the loadgen
    /// does not know the broker's CLIENT_ACK_TIMEOUT_SECONDS).
    pub fn violations(&self) -> u64 {
        self.redelivered_mismatch + self.duplicate_acks + self.pushes_without_client_id
    }
}

/// What the `peers` scenario adds (PROTOCOL.md §9 `list_peers`, §10
/// groups). The run-wide `sent`, `pushes`, `expected_pushes`, `lost` and
/// `duplicates` count broadcasts and group sends together, `push_ms` is
/// of broadcasts only, `ack_ms` of both.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeersReport {
    /// Listers over all meshes, and their `list_peers` per second in all.
    pub listers: usize,
    pub list_rate: f64,
    pub lists_sent: u64,
    /// Answered by a `peers_list` echoing the request's `_reqId`.
    pub lists_answered: u64,
    pub lists_per_s: f64,
    /// Answered by an `error` (e.g. `unavailable`).
    pub list_errors: u64,
    /// Neither answered nor refused by the end of the grace period.
    pub list_unanswered: u64,
    /// Answers not listing exactly the sessions of the lister's mesh.
    pub list_mismatches: u64,
    /// Answers without one of our `_reqId`s, or not exactly one `self`, or
    /// that the cheap reading and the JSON parser read differently.
    pub list_malformed: u64,
    /// Request (its intended time: paced, coordinated-omission corrected)
    /// → `peers_list`, in microseconds.
    pub list_us: Percentiles,
    pub mean_entries: Option<f64>,
    pub mean_answer_bytes: Option<f64>,
    pub broadcast_pushes: u64,
    pub broadcast_pushes_per_s: f64,
    pub group: String,
    pub group_target: String,
    pub group_every: usize,
    /// Members that joined the group, over all meshes.
    pub group_members: usize,
    pub group_rate: f64,
    pub group_sent: u64,
    pub group_sends_per_s: f64,
    /// Pushes the group sends called for (one per group member but the
    /// sender's, for each acked or pending send) and those received.
    pub group_expected: u64,
    pub group_pushes: u64,
    pub group_pushes_per_s: f64,
    /// Group send → push, per receiving member.
    pub group_push_ms: Percentiles,
}

impl PeersReport {
    /// What fails the run.
    pub fn violations(&self) -> u64 {
        self.list_mismatches + self.list_errors + self.list_unanswered + self.list_malformed
    }
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

/// What the `held` scenario adds (PROTOCOL.md §4 held envelopes). The
/// run-wide figures (sends/s, acks/s, `ack_ms`, broker CPU per send) are
/// those of the hold phase, when every direct send must be held;
/// `pushes`/`push_ms` there are the live copies of `*` sends; `lost` and
/// `duplicates` come from the exactly-once check below.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeldReport {
    /// Offline members over all meshes (connected only for the drain).
    pub recipients: usize,
    /// `--broadcast-every`.
    pub broadcast_every: Option<u64>,
    /// Pushes owed to offline members by the sends (acked or pending;
    /// refused ones excluded), and those that arrived in the drain.
    pub held_expected: u64,
    pub held_pushes: u64,
    /// Acks that said `"durable":false` (held in memory only).
    pub non_durable_acks: u64,
    /// Sends refused with `unavailable` (the broker's bound on held
    /// envelopes): counted, not a failure.
    pub unavailable: u64,
    /// Sends neither acked nor refused by the end.
    pub never_acked: u64,
    /// Exactly-once by `messageId`: (id, member) deliveries the acks call
    /// for, those pushed, never pushed, pushed again, pushed without an
    /// ack naming that member, and acks repeating an id.
    pub owed: u64,
    pub delivered: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    pub reused_ids: u64,
    /// First recipient connect → last held push, in seconds.
    pub drain_s: Option<f64>,
    pub drain_pushes_per_s: Option<f64>,
    /// The broker's CPU during the drain, per held push.
    pub drain_broker_cpu_us_per_push: Option<f64>,
    /// The load ended early: a recipient reached --max-held-per-peer.
    pub held_cap_reached: bool,
}

impl HeldReport {
    /// What fails the run.
    pub fn violations(&self) -> u64 {
        self.missing + self.duplicates + self.unexpected + self.reused_ids + self.never_acked
    }
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
    /// Nothing lost, no duplicate, no push to a non-target, no failure, no
    /// gating or order violation.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.unexpected_pushes == 0
            && self.failure.is_none()
            && self.gated.as_ref().is_none_or(|g| g.violations() == 0)
            && self.held.as_ref().is_none_or(|h| h.violations() == 0)
            && self
                .directory
                .as_ref()
                .is_none_or(|p| p.violations() == 0 && p.lists_answered > 0)
            && self.acks.as_ref().is_none_or(|a| a.violations() == 0)
    }

    pub fn failure_summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(h) = self.held.as_ref().filter(|h| h.missing > 0) {
            parts.push(format!(
                "{} of {} acked deliveries never pushed",
                h.missing, h.owed
            ));
        } else if self.lost > 0 {
            parts.push(format!(
                "{} of {} expected pushes lost",
                self.lost, self.expected_pushes
            ));
        }
        if self.duplicates > 0 {
            parts.push(format!("{} duplicate pushes", self.duplicates));
        }
        if self.unexpected_pushes > 0 {
            parts.push(format!(
                "{} pushes to sessions that were not targets",
                self.unexpected_pushes
            ));
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
        if let Some(h) = &self.held {
            for (n, what) in [
                (
                    h.unexpected,
                    "pushes whose messageId no ack named for that member",
                ),
                (h.reused_ids, "acks reusing another send's messageId"),
                (h.never_acked, "sends neither acked nor refused"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
        }
        if let Some(p) = &self.directory {
            for (n, what) in [
                (
                    p.list_mismatches,
                    "peers_list answers without exactly the mesh's sessions",
                ),
                (p.list_errors, "list_peers answered with error"),
                (p.list_unanswered, "list_peers never answered"),
                (p.list_malformed, "malformed peers_list answers"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
            if p.lists_answered == 0 {
                parts.push("no list_peers answered".into());
            }
        }
        if let Some(a) = &self.acks {
            for (n, what) in [
                (
                    a.redelivered_mismatch,
                    "redelivered pushes with another messageId than their first copy",
                ),
                (
                    a.duplicate_acks,
                    "acks saying duplicate:true for a unique client_message_id",
                ),
                (
                    a.pushes_without_client_id,
                    "pushes without their send's client_message_id",
                ),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
        }
        if let Some(f) = &self.failure {
            parts.push(f.clone());
        }
        if self.errors.contains_key("rate_limited") {
            parts.push(
                "(rate_limited: the broker's per-member SEND_RATE_PER_MIN / SEND_BURST are below this load)"
                    .into(),
            );
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
        if self.stalled_readers > 0 {
            row(
                &mut t,
                "stalled readers",
                format!(
                    "{} per mesh (not counted as receivers)",
                    self.stalled_readers
                ),
            );
        }
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
            row(
                &mut t,
                if self.held.is_some() {
                    "pushes/s (live)"
                } else {
                    "pushes/s"
                },
                format!("{:.0}", self.pushes_per_s),
            );
            let _ = writeln!(
                t,
                "  {:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency ms", "p50", "p90", "p99", "p99.9", "max"
            );
            let push_name = if self.gated.is_some() || self.held.is_some() {
                "send→push (live)"
            } else {
                "send→push"
            };
            let push_name = if self.directory.is_some() {
                "send→push (broadcast)"
            } else {
                push_name
            };
            let mut rows = vec![("send→ack", &self.ack_ms), (push_name, &self.push_ms)];
            if let Some(g) = self.gated.as_ref().filter(|g| g.drain_ms.count > 0) {
                rows.push(("idle flip→last held, /peer", &g.drain_ms));
            }
            if let Some(p) = self
                .directory
                .as_ref()
                .filter(|p| p.group_push_ms.count > 0)
            {
                rows.push(("group send→push", &p.group_push_ms));
            }
            if let Some(lag) = &self.schedule_lag_ms {
                rows.push(("due→sent (schedule lag)", lag));
            }
            for (name, p) in rows {
                let _ = writeln!(
                    t,
                    "  {:<28} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name, p.p50, p.p90, p.p99, p.p999, p.max
                );
            }
            if let Some(kept) = self.kept_schedule {
                row(
                    &mut t,
                    "kept schedule",
                    if kept {
                        format!("yes (p99 lag under one tick of {} µs)", self.tick_us)
                    } else {
                        format!(
                            "NO: p99 lag over one tick of {} µs, the loadgen set the pace",
                            self.tick_us
                        )
                    },
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
        if let Some(h) = &self.held {
            row(
                &mut t,
                "held for",
                format!(
                    "{} offline members ({}){}",
                    h.recipients,
                    h.broadcast_every
                        .map_or("direct sends only".into(), |k| format!(
                            "every {k}th send to *"
                        )),
                    if h.held_cap_reached {
                        "; load ended at --max-held-per-peer"
                    } else {
                        ""
                    }
                ),
            );
            row(
                &mut t,
                "acks/s (hold phase)",
                format!(
                    "{:.0} (durable:false {}, unavailable {})",
                    self.acks_per_s, h.non_durable_acks, h.unavailable
                ),
            );
            row(
                &mut t,
                "held: drained / expected",
                format!("{} / {}", h.held_pushes, h.held_expected),
            );
            row(
                &mut t,
                "drain",
                format!(
                    "{} s, {} pushes/s, broker {} µs/push",
                    opt(h.drain_s, 3),
                    opt(h.drain_pushes_per_s, 0),
                    opt(h.drain_broker_cpu_us_per_push, 3)
                ),
            );
            row(
                &mut t,
                "exactly once (messageId)",
                format!(
                    "{} / {} delivered; missing {}, duplicates {}, unexpected {}, reused ids {}, never acked {}",
                    h.delivered,
                    h.owed,
                    h.missing,
                    h.duplicates,
                    h.unexpected,
                    h.reused_ids,
                    h.never_acked
                ),
            );
        }
        if let Some(p) = &self.directory {
            row(
                &mut t,
                "list_peers",
                format!(
                    "{} answered of {} sent ({:.0}/s from {} listers; aim {}/s)",
                    p.lists_answered, p.lists_sent, p.lists_per_s, p.listers, p.list_rate
                ),
            );
            row(
                &mut t,
                "list_peers faults",
                format!(
                    "{} wrong counts, {} errors, {} unanswered, {} malformed",
                    p.list_mismatches, p.list_errors, p.list_unanswered, p.list_malformed
                ),
            );
            row(
                &mut t,
                "per answer",
                format!(
                    "{} entries, {} bytes on average",
                    opt(p.mean_entries, 1),
                    opt(p.mean_answer_bytes, 0)
                ),
            );
            let _ = writeln!(
                t,
                "  {:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency µs", "p50", "p90", "p99", "p99.9", "max"
            );
            let l = &p.list_us;
            let _ = writeln!(
                t,
                "  {:<28} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
                "list_peers→peers_list", l.p50, l.p90, l.p99, l.p999, l.max
            );
            row(
                &mut t,
                "broadcast pushes",
                format!("{} ({:.0}/s)", p.broadcast_pushes, p.broadcast_pushes_per_s),
            );
            row(
                &mut t,
                "group",
                format!(
                    "{} members joined {} (one in {}); sends to {} at {}/s",
                    p.group_members, p.group, p.group_every, p.group_target, p.group_rate
                ),
            );
            row(
                &mut t,
                "group sends / pushes",
                format!(
                    "{} ({:.0}/s) / {} of {} expected ({:.0}/s); send→push p50 {:.3} p99 {:.3} ms",
                    p.group_sent,
                    p.group_sends_per_s,
                    p.group_pushes,
                    p.group_expected,
                    p.group_pushes_per_s,
                    p.group_push_ms.p50,
                    p.group_push_ms.p99
                ),
            );
        }
        if let Some(a) = &self.acks {
            if a.client_ack {
                row(
                    &mut t,
                    "client acks",
                    format!(
                        "{} messages, {} ids ({} per message); ack fraction {}",
                        a.client_acks,
                        a.client_acked_ids,
                        opt(a.ids_per_client_ack, 1),
                        opt(a.ack_fraction, 3)
                    ),
                );
                row(
                    &mut t,
                    "redeliveries",
                    format!(
                        "{} (of unacked {}, after ack {}, first copy unseen {}, id mismatch {}); left unacked {}, awaiting {}",
                        a.redeliveries,
                        a.redelivered_unacked,
                        a.redelivered_after_ack,
                        a.redelivered_unseen,
                        a.redelivered_mismatch,
                        a.unacked,
                        a.awaiting_redelivery
                    ),
                );
            }
            if a.client_message_ids {
                row(
                    &mut t,
                    "client_message_id",
                    format!(
                        "{} duplicate:true acks, {} pushes without it",
                        a.duplicate_acks, a.pushes_without_client_id
                    ),
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
        if self.urls.len() > 1 {
            row(&mut t, "broker URLs (round-robin)", self.urls.join(", "));
        }
        if self.broker_pids.len() > 1 {
            let pids: Vec<String> = self.broker_pids.iter().map(u32::to_string).collect();
            row(&mut t, "broker pids (summed)", pids.join(", "));
        } else {
            row(
                &mut t,
                "broker pid",
                self.broker_pid
                    .map_or("- (not found)".into(), |p| p.to_string()),
            );
        }
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
        for path in self.hgrm_files.iter().flatten() {
            row(
                &mut t,
                "percentile distribution",
                path.display().to_string(),
            );
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
        // Other scenarios have no gated or held block.
        let direct = Report::default();
        assert!(direct.ok());
        let json: serde_json::Value = serde_json::from_str(&direct.to_json()).unwrap();
        assert!(json["gated"].is_null());
        assert!(json["held"].is_null());
    }

    #[test]
    fn directory_faults_fail_a_peers_run() {
        let clean = Report {
            directory: Some(PeersReport {
                lists_sent: 10,
                lists_answered: 10,
                mean_entries: Some(1000.0),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(clean.ok(), "{}", clean.failure_summary());
        assert!(clean.table().contains("list_peers→peers_list"));
        let with = |f: &dyn Fn(&mut PeersReport)| {
            let mut r = clean.clone();
            f(r.directory.as_mut().unwrap());
            r
        };
        for (r, text) in [
            (
                with(&|p| p.list_mismatches = 3),
                "3 peers_list answers without exactly the mesh's sessions",
            ),
            (
                with(&|p| p.list_errors = 2),
                "2 list_peers answered with error",
            ),
            (
                with(&|p| p.list_unanswered = 1),
                "1 list_peers never answered",
            ),
            (
                with(&|p| p.list_malformed = 4),
                "4 malformed peers_list answers",
            ),
            (with(&|p| p.lists_answered = 0), "no list_peers answered"),
        ] {
            assert!(!r.ok());
            assert!(
                r.failure_summary().contains(text),
                "{}",
                r.failure_summary()
            );
            let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            assert_eq!(json["ok"], false);
            assert!(json["directory"].is_object());
        }
        let mut limited = clean.clone();
        limited.errors.insert("rate_limited".into(), 5);
        limited.send_errors = 5;
        limited.failure = Some("5 sends answered with error".into());
        assert!(limited.failure_summary().contains("SEND_RATE_PER_MIN"));
    }

    #[test]
    fn acknowledged_delivery_faults_fail_the_run_redeliveries_do_not() {
        let clean = Report {
            acks: Some(AckReport {
                client_ack: true,
                ack_fraction: Some(0.9),
                client_acks: 10,
                client_acked_ids: 900,
                ids_per_client_ack: Some(90.0),
                unacked: 100,
                redeliveries: 104,
                redelivered_unacked: 100,
                redelivered_after_ack: 3,
                redelivered_unseen: 1,
                client_message_ids: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(clean.ok(), "{}", clean.failure_summary());
        let table = clean.table();
        assert!(
            table.contains("10 messages, 900 ids (90.0 per message)"),
            "{table}"
        );
        assert!(
            table.contains("104 (of unacked 100, after ack 3"),
            "{table}"
        );
        assert!(table.contains("0 duplicate:true acks"), "{table}");
        let with = |f: &dyn Fn(&mut AckReport)| {
            let mut r = clean.clone();
            f(r.acks.as_mut().unwrap());
            r
        };
        for (r, text) in [
            (
                with(&|a| a.redelivered_mismatch = 2),
                "2 redelivered pushes with another messageId",
            ),
            (
                with(&|a| a.duplicate_acks = 1),
                "1 acks saying duplicate:true",
            ),
            (
                with(&|a| a.pushes_without_client_id = 5),
                "5 pushes without their send's client_message_id",
            ),
            (
                // A true duplicate (no redelivered mark) fails as ever.
                Report {
                    duplicates: 1,
                    ..clean.clone()
                },
                "1 duplicate pushes",
            ),
        ] {
            assert!(!r.ok());
            assert!(
                r.failure_summary().contains(text),
                "{}",
                r.failure_summary()
            );
            let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
            assert_eq!(json["ok"], false);
            assert!(json["acks"].is_object());
        }
        // Without the options there is no block.
        let json: serde_json::Value = serde_json::from_str(&Report::default().to_json()).unwrap();
        assert!(json["acks"].is_null());
        assert!(!Report::default().table().contains("client acks"));
    }

    #[test]
    fn exactly_once_violations_fail_a_held_run() {
        let clean = Report {
            held: Some(HeldReport {
                owed: 10,
                delivered: 10,
                held_expected: 10,
                held_pushes: 10,
                // Refusals at the broker's bound and non-durable acks are
                // reported, never failures.
                unavailable: 4,
                non_durable_acks: 2,
                ..Default::default()
            }),
            send_errors: 4,
            ..Default::default()
        };
        assert!(clean.ok(), "{}", clean.failure_summary());
        assert!(clean.table().contains("durable:false 2, unavailable 4"));
        let with = |f: &dyn Fn(&mut HeldReport)| {
            let mut r = clean.clone();
            f(r.held.as_mut().unwrap());
            r
        };
        for (r, text) in [
            (
                with(&|h| h.missing = 3),
                "3 of 10 acked deliveries never pushed",
            ),
            (
                // The run reports the id check's duplicates as its own.
                Report {
                    duplicates: 2,
                    ..with(&|h| h.duplicates = 2)
                },
                "2 duplicate pushes",
            ),
            (
                with(&|h| h.unexpected = 1),
                "1 pushes whose messageId no ack named for that member",
            ),
            (
                with(&|h| h.reused_ids = 1),
                "1 acks reusing another send's messageId",
            ),
            (
                with(&|h| h.never_acked = 5),
                "5 sends neither acked nor refused",
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
    }
}
