//! A session's status as PROTOCOL.md §5 defines it, without sockets: the
//! (status, source, set-at) record, the write rule that merges signals of
//! different rank, what a status may receive, and the TTL. Transcript inference
//! (the lowest-rank source) lives in [`transcript`].
//!
//! Every function takes `now` and the windows as arguments, so the rule is
//! tested without sleeping and the caller decides which clock it reads.

pub(crate) mod hook_index;
pub(crate) mod transcript;

use std::time::{Duration, Instant};

use crate::hook::Status;
use crate::protocol::Priority;

/// Who set a status, in rank order `hook` > `manual` > `jsonl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Inferred from the session's transcript (or the TTL sweep).
    Jsonl,
    /// The session's own `set_status`.
    Manual,
    /// `POST /hook/set-status`.
    Hook,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Jsonl => "jsonl",
            Source::Manual => "manual",
            Source::Hook => "hook",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        [Source::Jsonl, Source::Manual, Source::Hook]
            .into_iter()
            .find(|source| source.as_str() == s)
    }

    /// Higher wins: hook 2, manual 1, jsonl 0.
    pub fn rank(self) -> u8 {
        match self {
            Source::Jsonl => 0,
            Source::Manual => 1,
            Source::Hook => 2,
        }
    }
}

/// One session's recorded status, the source that set it and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusState {
    pub status: Status,
    pub source: Source,
    pub set_at: Instant,
}

impl StatusState {
    /// A fresh session: `idle`, source `jsonl`, set now.
    pub fn new(now: Instant) -> StatusState {
        StatusState::with(Status::Idle, Source::Jsonl, now)
    }

    pub fn with(status: Status, source: Source, set_at: Instant) -> StatusState {
        StatusState {
            status,
            source,
            set_at,
        }
    }

    /// Whether the recorded source was set within `window` of `now` (strictly:
    /// a record exactly `window` old is stale). A `set_at` after `now` counts as
    /// just set.
    fn fresh(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.set_at) < window
    }

    /// Writes `status` from `source` at `now` by the §5 rule; `fresh_window` is
    /// `HOOK_FRESH_WINDOW_SECONDS`. Returns whether the status changed (the
    /// caller then emits `peer_status` and considers releasing held envelopes).
    ///
    /// `dnd` is sacred: a hook or a transcript never touches a `dnd` session,
    /// not even its time; only a manual `set_status` leaves it.
    pub fn write(
        &mut self,
        status: Status,
        source: Source,
        now: Instant,
        fresh_window: Duration,
    ) -> bool {
        if self.status == Status::Dnd && source != Source::Manual {
            return false;
        }
        if status != self.status {
            *self = StatusState::with(status, source, now);
            return true;
        }
        if source.rank() < self.source.rank() && self.fresh(now, fresh_window) {
            // A lower source agreeing with a fresh higher one: the higher one
            // stays in charge, and the agreement keeps it fresh.
            self.set_at = now;
        } else {
            self.source = source;
            self.set_at = now;
        }
        false
    }

    /// Whether transcript inference may run now: never for `dnd`, and never
    /// while a hook or manual status is fresh (it would lose to it anyway, and
    /// the read is not free).
    pub fn inference_allowed(&self, now: Instant, fresh_window: Duration) -> bool {
        match self.status {
            Status::Dnd => false,
            _ => match self.source {
                Source::Hook | Source::Manual => !self.fresh(now, fresh_window),
                Source::Jsonl => true,
            },
        }
    }

    /// Whether a session in this status may receive an envelope of priority `p`
    /// now: `idle` takes everything, `working` and `dnd` only `now`.
    pub fn accepts(&self, p: Priority) -> bool {
        match self.status {
            Status::Idle => true,
            Status::Working | Status::Dnd => p == Priority::Now,
        }
    }

    /// Whether the TTL sweep flips this session to `idle`: `working` for longer
    /// than `ttl` (`STATUS_TTL_SECONDS`). `dnd` never expires.
    pub fn ttl_expired(&self, now: Instant, ttl: Duration) -> bool {
        self.status == Status::Working && now.saturating_duration_since(self.set_at) > ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn source_names_and_ranks() {
        assert_eq!(Source::Jsonl.as_str(), "jsonl");
        assert_eq!(Source::Manual.as_str(), "manual");
        assert_eq!(Source::Hook.as_str(), "hook");
        assert!(Source::Hook.rank() > Source::Manual.rank());
        assert!(Source::Manual.rank() > Source::Jsonl.rank());
    }

    #[test]
    fn a_new_session_is_idle_from_jsonl() {
        let t0 = Instant::now();
        let s = StatusState::new(t0);
        assert_eq!(s, StatusState::with(Status::Idle, Source::Jsonl, t0));
    }

    #[test]
    fn a_different_status_is_recorded_with_its_source_and_time() {
        let t0 = Instant::now();
        // Even a lower source changes the status when it differs, fresh or not.
        let mut s = StatusState::with(Status::Working, Source::Hook, t0);
        assert!(s.write(Status::Idle, Source::Jsonl, t0 + secs(1), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Idle, Source::Jsonl, t0 + secs(1))
        );

        assert!(s.write(Status::Working, Source::Manual, t0 + secs(2), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Working, Source::Manual, t0 + secs(2))
        );
    }

    #[test]
    fn the_same_status_from_an_equal_or_higher_source_takes_it_over() {
        let t0 = Instant::now();
        let mut s = StatusState::with(Status::Working, Source::Jsonl, t0);
        assert!(!s.write(Status::Working, Source::Jsonl, t0 + secs(1), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Working, Source::Jsonl, t0 + secs(1))
        );

        assert!(!s.write(Status::Working, Source::Manual, t0 + secs(2), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Working, Source::Manual, t0 + secs(2))
        );

        assert!(!s.write(Status::Working, Source::Hook, t0 + secs(3), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Working, Source::Hook, t0 + secs(3))
        );

        assert!(!s.write(Status::Working, Source::Hook, t0 + secs(4), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Working, Source::Hook, t0 + secs(4))
        );
    }

    #[test]
    fn the_same_status_from_a_lower_source_keeps_a_fresh_source_and_bumps_the_time() {
        let t0 = Instant::now();
        let mut s = StatusState::with(Status::Idle, Source::Hook, t0);
        assert!(!s.write(Status::Idle, Source::Jsonl, t0 + secs(10), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Idle, Source::Hook, t0 + secs(10))
        );

        // The bump restarts the window: 35 s after t0 but 25 s after the bump.
        assert!(!s.write(Status::Idle, Source::Manual, t0 + secs(35), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Idle, Source::Hook, t0 + secs(35))
        );

        let mut m = StatusState::with(Status::Working, Source::Manual, t0);
        assert!(!m.write(Status::Working, Source::Jsonl, t0 + secs(29), WINDOW));
        assert_eq!(
            m,
            StatusState::with(Status::Working, Source::Manual, t0 + secs(29))
        );
    }

    #[test]
    fn the_same_status_from_a_lower_source_replaces_a_stale_source() {
        let t0 = Instant::now();
        let mut s = StatusState::with(Status::Working, Source::Hook, t0);
        assert!(!s.write(Status::Working, Source::Jsonl, t0 + secs(31), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Working, Source::Jsonl, t0 + secs(31))
        );

        // Exactly one window old is stale.
        let mut m = StatusState::with(Status::Idle, Source::Manual, t0);
        assert!(!m.write(Status::Idle, Source::Jsonl, t0 + WINDOW, WINDOW));
        assert_eq!(
            m,
            StatusState::with(Status::Idle, Source::Jsonl, t0 + WINDOW)
        );
    }

    #[test]
    fn dnd_is_sacred_to_hooks_and_transcripts() {
        let t0 = Instant::now();
        for source in [Source::Hook, Source::Jsonl] {
            for status in [Status::Idle, Status::Working, Status::Dnd] {
                // Whoever set it, fresh or stale.
                for recorded in [Source::Manual, Source::Hook, Source::Jsonl] {
                    let before = StatusState::with(Status::Dnd, recorded, t0);
                    let mut s = before;
                    assert!(!s.write(status, source, t0 + secs(100), WINDOW));
                    assert_eq!(s, before, "{source:?} wrote {status:?}");
                }
            }
        }
    }

    #[test]
    fn manual_can_leave_dnd() {
        let t0 = Instant::now();
        let mut s = StatusState::with(Status::Dnd, Source::Manual, t0);
        assert!(s.write(Status::Idle, Source::Manual, t0 + secs(1), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Idle, Source::Manual, t0 + secs(1))
        );

        // And enter it; from then on hooks are ignored again.
        assert!(s.write(Status::Dnd, Source::Manual, t0 + secs(2), WINDOW));
        assert!(!s.write(Status::Idle, Source::Hook, t0 + secs(3), WINDOW));
        assert_eq!(s.status, Status::Dnd);
    }

    #[test]
    fn a_hook_may_set_dnd_but_not_leave_it() {
        let t0 = Instant::now();
        let mut s = StatusState::new(t0);
        assert!(s.write(Status::Dnd, Source::Hook, t0 + secs(1), WINDOW));
        assert_eq!(
            s,
            StatusState::with(Status::Dnd, Source::Hook, t0 + secs(1))
        );
        assert!(!s.write(Status::Idle, Source::Hook, t0 + secs(2), WINDOW));
        assert_eq!(s.status, Status::Dnd);
    }

    #[test]
    fn inference_waits_for_fresh_hook_and_manual_statuses_to_decay() {
        let t0 = Instant::now();
        for source in [Source::Hook, Source::Manual] {
            let s = StatusState::with(Status::Working, source, t0);
            assert!(!s.inference_allowed(t0, WINDOW));
            assert!(!s.inference_allowed(t0 + secs(29), WINDOW));
            assert!(s.inference_allowed(t0 + WINDOW, WINDOW));
            assert!(s.inference_allowed(t0 + secs(31), WINDOW));
        }
        let j = StatusState::with(Status::Idle, Source::Jsonl, t0);
        assert!(j.inference_allowed(t0, WINDOW));
    }

    #[test]
    fn inference_never_runs_for_dnd() {
        let t0 = Instant::now();
        for source in [Source::Hook, Source::Manual, Source::Jsonl] {
            let s = StatusState::with(Status::Dnd, source, t0);
            assert!(!s.inference_allowed(t0, WINDOW));
            assert!(!s.inference_allowed(t0 + secs(3600), WINDOW));
        }
    }

    #[test]
    fn a_stale_hook_loses_to_inference() {
        // Decay end to end: once the window passes, inference may run and its
        // different answer is recorded.
        let t0 = Instant::now();
        let mut s = StatusState::with(Status::Working, Source::Hook, t0);
        assert!(!s.inference_allowed(t0 + secs(5), WINDOW));
        let later = t0 + secs(40);
        assert!(s.inference_allowed(later, WINDOW));
        assert!(s.write(Status::Idle, Source::Jsonl, later, WINDOW));
        assert_eq!(s, StatusState::with(Status::Idle, Source::Jsonl, later));
    }

    #[test]
    fn accepts_table() {
        let t0 = Instant::now();
        let cases = [
            (Status::Idle, [true, true, true]),
            (Status::Working, [true, false, false]),
            (Status::Dnd, [true, false, false]),
        ];
        for (status, expected) in cases {
            let s = StatusState::with(status, Source::Jsonl, t0);
            for (p, want) in Priority::ALL.into_iter().zip(expected) {
                assert_eq!(s.accepts(p), want, "{status:?} {p:?}");
            }
        }
    }

    #[test]
    fn ttl_expires_only_working() {
        let t0 = Instant::now();
        let ttl = secs(300);
        let w = StatusState::with(Status::Working, Source::Hook, t0);
        assert!(!w.ttl_expired(t0 + secs(299), ttl));
        assert!(!w.ttl_expired(t0 + ttl, ttl));
        assert!(w.ttl_expired(t0 + secs(301), ttl));
        for status in [Status::Idle, Status::Dnd] {
            let s = StatusState::with(status, Source::Hook, t0);
            assert!(!s.ttl_expired(t0 + secs(10_000), ttl), "{status:?}");
        }
    }

    #[test]
    fn a_set_at_after_now_counts_as_fresh() {
        let t0 = Instant::now();
        let s = StatusState::with(Status::Working, Source::Hook, t0 + secs(5));
        assert!(!s.inference_allowed(t0, WINDOW));
        assert!(!s.ttl_expired(t0, secs(1)));
    }
}
