//! The scrape: every shard's counters and published histograms summed into
//! a snapshot, encoded as Prometheus text with summaries written by hand.
use std::fmt::Write as _;

use super::histograms::*;
use super::*;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

// ---------------------------------------------------------------------------
// Encoding.

#[derive(Debug, Default)]
pub(super) struct HistSnapshot {
    pub(super) sum_secs: f64,
    pub(super) count: u64,
    /// (upper bound, count in this bucket alone); the last bound is `f64::MAX` (+Inf).
    pub(super) buckets: Vec<(f64, u64)>,
    /// Values at [`QUANTILES`], seconds; NaN when empty.
    pub(super) quantiles: [f64; QUANTILES.len()],
}

/// Everything a scrape shows, summed over shards.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) connections_total: u64,
    pub(super) rejected_conns: [u64; RejectReason::ALL.len()],
    pub(super) accept_errors: u64,
    pub(super) closed: [u64; CloseReason::ALL.len()],
    pub(super) http_timeouts: [u64; 2],
    pub(super) held_refused: [u64; 2],
    pub(super) routed: [u64; 3],
    pub(super) rejected_msgs: Vec<(&'static str, u64)>,
    pub(super) hook_requests: u64,
    pub(super) hook_rate_limited: u64,
    pub(super) sessions_away: i64,
    pub(super) sessions_resumed: u64,
    pub(super) sessions_replaced: u64,
    pub(super) peer_events: u64,
    pub(super) sends_rate_limited: u64,
    pub(super) group_sends: u64,
    pub(super) peers_listed: u64,
    pub(super) leases_open: i64,
    pub(super) lease_bytes: i64,
    pub(super) leases_acked: u64,
    pub(super) leases_expired: u64,
    pub(super) redelivered: u64,
    pub(super) duplicate_sends: u64,
    pub(super) shard_active: Vec<i64>,
    pub(super) shard_messages: Vec<u64>,
    pub(super) shard_socket_writes: Vec<u64>,
    pub(super) shard_frames_written: Vec<u64>,
    pub(super) queue_depth: i64,
    pub(super) ttl_sweeps: u64,
    pub(super) ttl_flipped: u64,
    pub(super) held_expired: u64,
    pub(super) audit_dropped: u64,
    pub(super) db_healthy: bool,
    pub(super) http: HistSnapshot,
    pub(super) send_ack: [HistSnapshot; 3],
    pub(super) send_push: [HistSnapshot; 3],
    pub(super) audit_batch: HistSnapshot,
    pub(super) held_batch: HistSnapshot,
}

// Histogram family names (without the `_seconds` unit suffix prometheus-client adds).
const HTTP_HIST: &str = "broker_http_request_duration";
const ACK_HIST: &str = "broker_send_ack_latency";
const PUSH_HIST: &str = "broker_send_push_latency";
const AUDIT_HIST: &str = "broker_audit_batch_write";
const HELD_HIST: &str = "broker_held_batch_write";

/// (family name, help, [(priority label, data)]).
type LatencyFamily<'a> = (
    &'static str,
    &'static str,
    Vec<(Option<Priority>, &'a HistSnapshot)>,
);

impl Snapshot {
    fn priority_hists(
        hists: &[HistSnapshot; 3],
    ) -> impl Iterator<Item = (Option<Priority>, &HistSnapshot)> {
        Priority::ALL.into_iter().map(Some).zip(hists.iter())
    }

    /// (name, help, [(priority label, data)]) for every latency family.
    fn latency_families(&self) -> [LatencyFamily<'_>; 5] {
        [
            (
                HTTP_HIST,
                "HTTP request duration (head received to response queued).",
                vec![(None, &self.http)],
            ),
            (
                ACK_HIST,
                "Send to ack latency, by priority.",
                Self::priority_hists(&self.send_ack).collect(),
            ),
            (
                PUSH_HIST,
                "Send to push latency (per recipient), by priority.",
                Self::priority_hists(&self.send_push).collect(),
            ),
            (
                AUDIT_HIST,
                "Audit log batch write duration.",
                vec![(None, &self.audit_batch)],
            ),
            (
                HELD_HIST,
                "Held-envelope batch commit duration (rows, delivery marks, expiries).",
                vec![(None, &self.held_batch)],
            ),
        ]
    }

    /// The hand-written summary families (prometheus-client 0.22 has no summary).
    pub(super) fn summaries(&self) -> String {
        let mut out = String::new();
        for (name, help, series) in self.latency_families() {
            let family = format!("{name}_seconds_quantiles");
            let _ = writeln!(
                out,
                "# HELP {family} {help} Quantiles from HdrHistogram, since start."
            );
            let _ = writeln!(out, "# TYPE {family} summary");
            for (priority, h) in series {
                let prefix =
                    priority.map_or(String::new(), |p| format!("priority=\"{}\",", p.as_str()));
                let plain = priority.map_or(String::new(), |p| {
                    format!("{{priority=\"{}\"}}", p.as_str())
                });
                for (q, v) in QUANTILES.iter().zip(h.quantiles) {
                    let _ = writeln!(out, "{family}{{{prefix}quantile=\"{q}\"}} {}", fmt_f64(v));
                }
                let _ = writeln!(out, "{family}_sum{plain} {}", fmt_f64(h.sum_secs));
                let _ = writeln!(out, "{family}_count{plain} {}", h.count);
            }
        }
        out
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{v}")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn labeled_counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        ConstCounter::new(n).encode(m.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut enc;
        let active: i64 = self.shard_active.iter().sum();
        gauge(
            e,
            "broker_connections_active",
            "Open WebSocket connections.",
            active,
        )?;
        counter(
            e,
            "broker_connections",
            "WebSocket connections opened.",
            self.connections_total,
        )?;
        labeled_counters(
            e,
            "broker_connections_rejected",
            "Hellos refused, and sockets closed unread over MAX_CONNECTIONS, by reason.",
            "reason",
            RejectReason::ALL
                .iter()
                .map(|r| r.as_str())
                .zip(self.rejected_conns),
        )?;
        counter(
            e,
            "broker_accept_errors",
            "Failed accepts (out of file descriptors, and others).",
            self.accept_errors,
        )?;
        labeled_counters(
            e,
            "broker_connections_closed",
            "WebSocket connections closed, by close reason.",
            "reason",
            CloseReason::ALL.iter().map(|r| r.as_str()).zip(self.closed),
        )?;
        labeled_counters(
            e,
            "broker_http_timeouts",
            "Connections closed in their HTTP phase by a deadline: hello \
             (HELLO_TIMEOUT_SECONDS before the first request) or idle \
             (HTTP_IDLE_TIMEOUT_SECONDS between keep-alive requests).",
            "limit",
            HttpTimeout::ALL
                .iter()
                .map(|t| t.as_str())
                .zip(self.http_timeouts),
        )?;
        labeled_counters(
            e,
            "broker_held_refused",
            "Sends refused unavailable because a target member's held queue is \
             full: count (MAX_HELD_PER_MEMBER) or bytes (MAX_HELD_BYTES_PER_MEMBER).",
            "limit",
            HeldLimit::ALL
                .iter()
                .map(|l| l.as_str())
                .zip(self.held_refused),
        )?;
        labeled_counters(
            e,
            "broker_messages_routed",
            "Sends routed, by priority.",
            "priority",
            Priority::ALL.iter().map(|p| p.as_str()).zip(self.routed),
        )?;
        labeled_counters(
            e,
            "broker_messages_rejected",
            "Client messages answered with an error, by error code.",
            "reason",
            self.rejected_msgs.iter().copied(),
        )?;
        gauge(
            e,
            "broker_queue_depth",
            "Held envelopes waiting for their recipient.",
            self.queue_depth,
        )?;
        counter(
            e,
            "broker_ttl_sweeps",
            "Status TTL sweeps run.",
            self.ttl_sweeps,
        )?;
        counter(
            e,
            "broker_ttl_flipped",
            "Sessions flipped from working to idle by the TTL sweep.",
            self.ttl_flipped,
        )?;
        counter(
            e,
            "broker_held_expired",
            "Held envelopes dropped unpushed past HELD_TTL_SECONDS.",
            self.held_expired,
        )?;
        counter(
            e,
            "broker_audit_dropped",
            "Audit events never written (lane full, Postgres away too long, refused rows).",
            self.audit_dropped,
        )?;
        counter(
            e,
            "broker_hook_requests",
            "POST /hook/set-status requests.",
            self.hook_requests,
        )?;
        counter(
            e,
            "broker_hook_requests_rate_limited",
            "POST /hook/set-status requests refused with 429.",
            self.hook_rate_limited,
        )?;
        gauge(
            e,
            "broker_sessions_away",
            "Sessions whose socket was lost, in their grace (SESSION_GRACE_SECONDS).",
            self.sessions_away,
        )?;
        counter(
            e,
            "broker_sessions_resumed",
            "Hellos that took over an existing presence (in grace, or replaced).",
            self.sessions_resumed,
        )?;
        counter(
            e,
            "broker_sessions_replaced",
            "Live sessions closed with 4000 by a newer hello of the same session.",
            self.sessions_replaced,
        )?;
        counter(
            e,
            "broker_peer_events",
            "Peer events pushed (one per receiving session).",
            self.peer_events,
        )?;
        counter(
            e,
            "broker_sends_rate_limited",
            "Sends refused by their member's send rate (SEND_RATE_PER_MIN, SEND_BURST).",
            self.sends_rate_limited,
        )?;
        counter(
            e,
            "broker_group_sends",
            "Sends to a group routed.",
            self.group_sends,
        )?;
        counter(
            e,
            "broker_list_peers",
            "list_peers requests answered.",
            self.peers_listed,
        )?;
        gauge(
            e,
            "broker_leases_open",
            "Pushes to client_ack sessions written and not yet acked or lapsed.",
            self.leases_open,
        )?;
        gauge(
            e,
            "broker_lease_bytes",
            "Bytes of the pushes in broker_leases_open.",
            self.lease_bytes,
        )?;
        counter(
            e,
            "broker_leases_acked",
            "Leases ended by a client_ack.",
            self.leases_acked,
        )?;
        counter(
            e,
            "broker_leases_expired",
            "Leases that lapsed unacked (CLIENT_ACK_TIMEOUT_SECONDS, or the session gone).",
            self.leases_expired,
        )?;
        counter(
            e,
            "broker_redelivered",
            "Pushes sent again after their lease lapsed (redelivered:true).",
            self.redelivered,
        )?;
        counter(
            e,
            "broker_duplicate_sends",
            "Sends not routed again: a client_message_id within DEDUPE_WINDOW_SECONDS.",
            self.duplicate_sends,
        )?;
        gauge(
            e,
            "broker_db_healthy",
            "1 when Postgres answers, else 0.",
            i64::from(self.db_healthy),
        )?;
        {
            let mut m = e.encode_descriptor(
                "broker_shard_connections_active",
                "Open WebSocket connections, by shard.",
                None,
                MetricType::Gauge,
            )?;
            for (i, v) in self.shard_active.iter().enumerate() {
                ConstGauge::new(*v).encode(m.encode_family(&[("shard", i.to_string())])?)?;
            }
        }
        for (name, help, values) in [
            (
                "broker_shard_messages",
                "Client messages received, by shard.",
                &self.shard_messages,
            ),
            (
                "broker_shard_socket_writes",
                "WebSocket socket writes, by shard.",
                &self.shard_socket_writes,
            ),
            (
                "broker_shard_frames_written",
                "WebSocket frames written (frames per socket write is the write batching), by shard.",
                &self.shard_frames_written,
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (i, v) in values.iter().enumerate() {
                ConstCounter::new(*v).encode(m.encode_family(&[("shard", i.to_string())])?)?;
            }
        }
        for (name, help, series) in self.latency_families() {
            let mut m =
                e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            for (priority, h) in series {
                match priority {
                    None => m.encode_histogram::<()>(h.sum_secs, h.count, &h.buckets, None)?,
                    Some(p) => m
                        .encode_family(&[("priority", p.as_str())])?
                        .encode_histogram::<()>(h.sum_secs, h.count, &h.buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::testing::{buckets, parse_exposition, value};

    #[test]
    fn empty_render_is_valid_and_complete() {
        let m = Metrics::new(2);
        let text = m.render();
        let samples = parse_exposition(&text);
        for name in [
            "broker_connections_active",
            "broker_connections_total",
            "broker_queue_depth",
            "broker_ttl_sweeps_total",
            "broker_ttl_flipped_total",
            "broker_audit_dropped_total",
            "broker_hook_requests_total",
            "broker_hook_requests_rate_limited_total",
            "broker_db_healthy",
            "broker_sessions_away",
            "broker_sessions_resumed_total",
            "broker_sessions_replaced_total",
            "broker_peer_events_total",
            "broker_sends_rate_limited_total",
            "broker_group_sends_total",
            "broker_list_peers_total",
            "broker_leases_open",
            "broker_lease_bytes",
            "broker_leases_acked_total",
            "broker_leases_expired_total",
            "broker_redelivered_total",
            "broker_duplicate_sends_total",
            "broker_accept_errors_total",
        ] {
            assert_eq!(value(&samples, name, &[]), 0.0, "{name}");
        }
        for r in ["capacity", "unauthorized", "max_connections"] {
            assert_eq!(
                value(
                    &samples,
                    "broker_connections_rejected_total",
                    &[("reason", r)]
                ),
                0.0
            );
        }
        for p in ["now", "next", "low"] {
            assert_eq!(
                value(&samples, "broker_messages_routed_total", &[("priority", p)]),
                0.0
            );
        }
        for r in MESSAGE_REJECT_REASONS {
            assert_eq!(
                value(&samples, "broker_messages_rejected_total", &[("reason", r)]),
                0.0
            );
        }
        for shard in ["0", "1"] {
            let l = [("shard", shard)];
            assert_eq!(value(&samples, "broker_shard_connections_active", &l), 0.0);
            assert_eq!(value(&samples, "broker_shard_messages_total", &l), 0.0);
        }
        assert!(text.contains("# TYPE broker_connections_closed counter\n"));
        for family in [
            "broker_sessions_away",
            "broker_leases_open",
            "broker_lease_bytes",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} gauge\n")),
                "{family}"
            );
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        }
        for family in [
            "broker_sessions_resumed",
            "broker_sessions_replaced",
            "broker_peer_events",
            "broker_sends_rate_limited",
            "broker_group_sends",
            "broker_list_peers",
            "broker_leases_acked",
            "broker_leases_expired",
            "broker_redelivered",
            "broker_duplicate_sends",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} counter\n")),
                "{family}"
            );
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        }
        // Every latency family exists with zero counts, as histogram and summary.
        let single = [
            "broker_http_request_duration_seconds",
            "broker_audit_batch_write_seconds",
            "broker_held_batch_write_seconds",
        ];
        for name in single {
            assert_eq!(value(&samples, &format!("{name}_count"), &[]), 0.0);
            assert_eq!(buckets(&samples, name, None).len(), BUCKETS.len() + 1);
            let q = format!("{name}_quantiles");
            assert_eq!(value(&samples, &format!("{q}_count"), &[]), 0.0);
            assert!(value(&samples, &q, &[("quantile", "0.99")]).is_nan());
        }
        for name in [
            "broker_send_ack_latency_seconds",
            "broker_send_push_latency_seconds",
        ] {
            for p in ["now", "next", "low"] {
                let l = [("priority", p)];
                assert_eq!(value(&samples, &format!("{name}_count"), &l), 0.0);
                assert_eq!(
                    buckets(&samples, name, Some(("priority", p))).len(),
                    BUCKETS.len() + 1
                );
                let q = format!("{name}_quantiles");
                assert_eq!(value(&samples, &format!("{q}_count"), &l), 0.0);
                assert!(value(&samples, &q, &[("priority", p), ("quantile", "0.5")]).is_nan());
            }
        }
        assert!(text.contains("# TYPE broker_http_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE broker_http_request_duration_seconds_quantiles summary\n"));
        // Family names are unique.
        let mut types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let n = types.len();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), n);
    }
}
