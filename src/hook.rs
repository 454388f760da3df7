//! `POST /hook/set-status` (PROTOCOL.md §5) without I/O: body validation and the
//! per-(pid, cwd) token bucket. The shard reads the body, calls [`parse_signal`],
//! asks the shared [`HookRateLimiter`] (behind a `Mutex`: hooks are low-rate), then
//! applies the signal to the mesh state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use simd_json::prelude::*;
use simd_json::BorrowedValue;

/// A session's working status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Idle,
    Working,
    Dnd,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Idle => "idle",
            Status::Working => "working",
            Status::Dnd => "dnd",
        }
    }

    /// The wire name (`idle`, `working`, `dnd`; exact case) to a status.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "idle" => Some(Status::Idle),
            "working" => Some(Status::Working),
            "dnd" => Some(Status::Dnd),
            _ => None,
        }
    }
}

/// A validated hook body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSignal {
    pub cwd: String,
    pub pid: Option<i32>,
    pub status: Status,
    pub session_id: Option<String>,
}

/// Every variant answers 400; the `Display` text is the `error` of
/// `{"ok":false,"error":…}`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HookError {
    #[error("body is not a JSON object")]
    BadJson,
    #[error("missing field: {0}")]
    MissingField(&'static str),
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    #[error("unknown status: {0:?} (expected idle, working or dnd)")]
    UnknownStatus(String),
}

impl HookError {
    pub fn status(&self) -> u16 {
        400
    }
}

/// Longest unknown status echoed back in the error message.
const MAX_ECHO: usize = 64;

/// Parse and validate a hook body. simd-json parses in place, so `body` is clobbered.
///
/// `cwd`: required, a non-empty string. `status`: required, `idle|working|dnd`.
/// `pid`: optional (absent or `null`), else an integer that fits `i32`.
/// `session_id`: optional (absent or `null`), else a string. Other fields are ignored.
pub fn parse_signal(body: &mut [u8]) -> Result<HookSignal, HookError> {
    let value = simd_json::to_borrowed_value(body).map_err(|_| HookError::BadJson)?;
    let obj = value.as_object().ok_or(HookError::BadJson)?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());

    let cwd = match field("cwd") {
        None => return Err(HookError::MissingField("cwd")),
        Some(v) => match v.as_str() {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => return Err(HookError::InvalidField("cwd")),
        },
    };
    let status = match field("status") {
        None => return Err(HookError::MissingField("status")),
        Some(v) => {
            let s = v.as_str().ok_or(HookError::InvalidField("status"))?;
            Status::parse(s).ok_or_else(|| HookError::UnknownStatus(truncate(s, MAX_ECHO)))?
        }
    };
    let pid = match field("pid") {
        None => None,
        Some(v) => Some(as_i32(v).ok_or(HookError::InvalidField("pid"))?),
    };
    let session_id = match field("session_id") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or(HookError::InvalidField("session_id"))?
                .to_owned(),
        ),
    };
    Ok(HookSignal {
        cwd,
        pid,
        status,
        session_id,
    })
}

/// An integer JSON number that fits `i32` (`12.0` and `"12"` are refused).
fn as_i32(v: &BorrowedValue<'_>) -> Option<i32> {
    if v.is_f64() {
        return None;
    }
    if let Some(i) = v.as_i64() {
        return i32::try_from(i).ok();
    }
    None
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Most buckets the limiter keeps (see [`HookRateLimiter`]).
pub const DEFAULT_MAX_BUCKETS: usize = 100_000;

/// Token-bucket state in integer "units" so refill is exact: one token is
/// `UNITS_PER_TOKEN` units and a bucket refills `limit` units per nanosecond
/// (= `limit` tokens per 60 s).
const UNITS_PER_TOKEN: u128 = 60_000_000_000;

/// How often `allow` garbage-collects on its own.
const AUTO_GC_EVERY: Duration = Duration::from_secs(60);
/// Least time between two forced collections when the table is full.
const FORCED_GC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: u128,
    at: Instant,
}

/// Token bucket per (pid, cwd): capacity `limit_per_min` tokens, refilled
/// continuously at `limit_per_min` per 60 s; a request takes one token.
///
/// Memory is bounded:
/// - a bucket that has refilled to full carries no information (a fresh bucket
///   would answer the same), so [`gc`](Self::gc) drops it; `allow` runs a `gc`
///   itself at most once a minute, the owner may call it more often;
/// - at most `max_buckets` (default [`DEFAULT_MAX_BUCKETS`]) are kept. A request
///   for a new (pid, cwd) when the table is full forces a `gc` (at most once a
///   second, so a flood of new keys costs O(1) per request, not a full scan);
///   if the table is still full the request is **refused** (fail closed: a flood
///   of distinct keys must not open a hole in the limit). Buckets refill in
///   `60 s / limit` per token, so legitimate new clients get in again soon after
///   a flood stops.
///
/// `limit_per_min == 0` refuses everything (configuration should forbid it).
///
/// The map is keyed by cwd first so the common path (bucket exists) looks it up
/// by `&str` without allocating.
#[derive(Debug)]
pub struct HookRateLimiter {
    limit: u32,
    max_buckets: usize,
    buckets: HashMap<Box<str>, HashMap<Option<i32>, Bucket>>,
    len: usize,
    last_gc: Option<Instant>,
}

impl HookRateLimiter {
    pub fn new(limit_per_min: u32) -> Self {
        Self::with_max_buckets(limit_per_min, DEFAULT_MAX_BUCKETS)
    }

    pub fn with_max_buckets(limit_per_min: u32, max_buckets: usize) -> Self {
        HookRateLimiter {
            limit: limit_per_min,
            max_buckets,
            buckets: HashMap::new(),
            len: 0,
            last_gc: None,
        }
    }

    fn capacity(&self) -> u128 {
        u128::from(self.limit) * UNITS_PER_TOKEN
    }

    /// Units in `b` at `now` (refilled, capped at capacity).
    fn level(&self, b: &Bucket, now: Instant) -> u128 {
        let elapsed = now.saturating_duration_since(b.at).as_nanos();
        b.units
            .saturating_add(elapsed.saturating_mul(u128::from(self.limit)))
            .min(self.capacity())
    }

    /// Take one token from the (pid, cwd) bucket; `false` means answer 429.
    pub fn allow(&mut self, pid: Option<i32>, cwd: &str, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        if self
            .last_gc
            .is_none_or(|t| now.saturating_duration_since(t) >= AUTO_GC_EVERY)
        {
            self.gc(now);
        }
        let capacity = self.capacity();
        let limit = u128::from(self.limit);
        if let Some(b) = self.buckets.get_mut(cwd).and_then(|m| m.get_mut(&pid)) {
            let elapsed = now.saturating_duration_since(b.at).as_nanos();
            let units = b
                .units
                .saturating_add(elapsed.saturating_mul(limit))
                .min(capacity);
            // Never move the clock backwards: an older `now` refills nothing.
            b.at = b.at.max(now);
            if units >= UNITS_PER_TOKEN {
                b.units = units - UNITS_PER_TOKEN;
                return true;
            }
            b.units = units;
            return false;
        }
        if self.len >= self.max_buckets {
            let may_gc = self
                .last_gc
                .is_none_or(|t| now.saturating_duration_since(t) >= FORCED_GC_EVERY);
            if may_gc {
                self.gc(now);
            }
            if self.len >= self.max_buckets {
                return false;
            }
        }
        let bucket = Bucket {
            units: capacity - UNITS_PER_TOKEN,
            at: now,
        };
        self.buckets
            .entry(cwd.into())
            .or_default()
            .insert(pid, bucket);
        self.len += 1;
        true
    }

    /// Drop every bucket that is full again at `now`; returns how many went.
    pub fn gc(&mut self, now: Instant) -> usize {
        self.last_gc = Some(now);
        let capacity = self.capacity();
        let mut removed = 0;
        let limit = u128::from(self.limit);
        self.buckets.retain(|_, per_pid| {
            per_pid.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.at).as_nanos();
                let full = b.units.saturating_add(elapsed.saturating_mul(limit)) >= capacity;
                removed += usize::from(full);
                !full
            });
            !per_pid.is_empty()
        });
        self.len -= removed;
        removed
    }

    /// Buckets currently kept.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens left for (pid, cwd) at `now` (the limit when there is no bucket).
    pub fn tokens(&self, pid: Option<i32>, cwd: &str, now: Instant) -> u32 {
        match self.buckets.get(cwd).and_then(|m| m.get(&pid)) {
            Some(b) => (self.level(b, now) / UNITS_PER_TOKEN) as u32,
            None => self.limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<HookSignal, HookError> {
        let mut v = s.as_bytes().to_vec();
        parse_signal(&mut v)
    }

    #[test]
    fn status_names_round_trip() {
        for s in [Status::Idle, Status::Working, Status::Dnd] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("Idle"), None);
        assert_eq!(Status::parse(""), None);
    }

    #[test]
    fn full_body() {
        let s = parse(r#"{"cwd":"/w/p","pid":4242,"status":"working","session_id":"abc","x":[1]}"#)
            .unwrap();
        assert_eq!(
            s,
            HookSignal {
                cwd: "/w/p".into(),
                pid: Some(4242),
                status: Status::Working,
                session_id: Some("abc".into()),
            }
        );
    }

    #[test]
    fn optional_fields_absent_or_null() {
        let s = parse(r#"{"cwd":"/w","status":"dnd"}"#).unwrap();
        assert_eq!((s.pid, s.session_id, s.status), (None, None, Status::Dnd));
        let s = parse(r#"{"cwd":"/w","status":"idle","pid":null,"session_id":null}"#).unwrap();
        assert_eq!((s.pid, s.session_id), (None, None));
    }

    #[test]
    fn bad_json() {
        for body in [
            "",
            "{",
            "not json",
            "[1,2]",
            "\"cwd\"",
            "null",
            "{\"cwd\":\"/w\",}",
        ] {
            assert_eq!(parse(body).unwrap_err(), HookError::BadJson, "{body:?}");
        }
        let mut invalid_utf8 = b"{\"cwd\":\"\xff\",\"status\":\"idle\"}".to_vec();
        assert_eq!(
            parse_signal(&mut invalid_utf8).unwrap_err(),
            HookError::BadJson
        );
    }

    #[test]
    fn missing_fields() {
        assert_eq!(
            parse(r#"{"status":"idle"}"#).unwrap_err(),
            HookError::MissingField("cwd")
        );
        assert_eq!(
            parse(r#"{"cwd":null,"status":"idle"}"#).unwrap_err(),
            HookError::MissingField("cwd")
        );
        assert_eq!(
            parse(r#"{"cwd":"/w"}"#).unwrap_err(),
            HookError::MissingField("status")
        );
        assert_eq!(parse("{}").unwrap_err(), HookError::MissingField("cwd"));
    }

    #[test]
    fn invalid_fields() {
        let cases = [
            (r#"{"cwd":"","status":"idle"}"#, "cwd"),
            (r#"{"cwd":42,"status":"idle"}"#, "cwd"),
            (r#"{"cwd":"/w","status":1}"#, "status"),
            (r#"{"cwd":"/w","status":"idle","pid":"12"}"#, "pid"),
            (r#"{"cwd":"/w","status":"idle","pid":12.5}"#, "pid"),
            (r#"{"cwd":"/w","status":"idle","pid":12.0}"#, "pid"),
            (r#"{"cwd":"/w","status":"idle","pid":2147483648}"#, "pid"),
            (r#"{"cwd":"/w","status":"idle","pid":-2147483649}"#, "pid"),
            (
                r#"{"cwd":"/w","status":"idle","pid":18446744073709551615}"#,
                "pid",
            ),
            (
                r#"{"cwd":"/w","status":"idle","session_id":7}"#,
                "session_id",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(
                parse(body).unwrap_err(),
                HookError::InvalidField(field),
                "{body}"
            );
        }
        let s = parse(r#"{"cwd":"/w","status":"idle","pid":2147483647}"#).unwrap();
        assert_eq!(s.pid, Some(i32::MAX));
    }

    #[test]
    fn unknown_status() {
        let e = parse(r#"{"cwd":"/w","status":"busy"}"#).unwrap_err();
        assert_eq!(e, HookError::UnknownStatus("busy".into()));
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("busy"));
        let long = format!(r#"{{"cwd":"/w","status":"{}"}}"#, "é".repeat(100));
        match parse(&long).unwrap_err() {
            HookError::UnknownStatus(s) => assert!(s.len() <= MAX_ECHO && !s.is_empty()),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn exact_limit_then_one_over() {
        let t0 = Instant::now();
        let mut rl = HookRateLimiter::new(30);
        for i in 0..30 {
            assert!(rl.allow(Some(1), "/w", t0), "request {i}");
        }
        assert!(!rl.allow(Some(1), "/w", t0));
        assert!(!rl.allow(Some(1), "/w", t0 + Duration::from_millis(1999)));
        // Other keys are independent: other pid, other cwd, no pid.
        assert!(rl.allow(Some(2), "/w", t0));
        assert!(rl.allow(Some(1), "/x", t0));
        assert!(rl.allow(None, "/w", t0));
        assert_eq!(rl.len(), 4);
    }

    #[test]
    fn refills_continuously() {
        let t0 = Instant::now();
        let mut rl = HookRateLimiter::new(30);
        for _ in 0..30 {
            assert!(rl.allow(None, "/w", t0));
        }
        assert!(!rl.allow(None, "/w", t0));
        // 30 per minute: one token every 2 s.
        assert!(!rl.allow(None, "/w", t0 + Duration::from_millis(1999)));
        assert!(rl.allow(None, "/w", t0 + Duration::from_secs(2)));
        assert!(!rl.allow(None, "/w", t0 + Duration::from_secs(2)));
        // After a long pause the bucket is full again, but never above capacity.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(rl.tokens(None, "/w", later), 30);
        for _ in 0..30 {
            assert!(rl.allow(None, "/w", later));
        }
        assert!(!rl.allow(None, "/w", later));
    }

    #[test]
    fn refused_requests_do_not_cost_tokens() {
        let t0 = Instant::now();
        let mut rl = HookRateLimiter::new(1);
        assert!(rl.allow(Some(1), "/w", t0));
        for s in 1..60 {
            assert!(!rl.allow(Some(1), "/w", t0 + Duration::from_secs(s)));
        }
        assert!(rl.allow(Some(1), "/w", t0 + Duration::from_secs(60)));
    }

    #[test]
    fn gc_drops_full_buckets_only() {
        let t0 = Instant::now();
        let mut rl = HookRateLimiter::new(30);
        assert!(rl.allow(Some(1), "/a", t0));
        for _ in 0..30 {
            rl.allow(Some(2), "/b", t0);
        }
        assert_eq!(rl.len(), 2);
        assert_eq!(rl.gc(t0 + Duration::from_secs(1)), 0);
        // /a used one token: full after 2 s. /b used 30: full after 60 s.
        assert_eq!(rl.gc(t0 + Duration::from_secs(2)), 1);
        assert_eq!(rl.len(), 1);
        assert_eq!(rl.tokens(Some(2), "/b", t0 + Duration::from_secs(2)), 1);
        assert_eq!(rl.gc(t0 + Duration::from_secs(60)), 1);
        assert!(rl.is_empty());
        assert!(rl.buckets.is_empty());
    }

    #[test]
    fn bucket_cap_fails_closed_then_recovers() {
        let t0 = Instant::now();
        let mut rl = HookRateLimiter::with_max_buckets(30, 3);
        for pid in 0..3 {
            assert!(rl.allow(Some(pid), "/w", t0));
        }
        // Full table, nothing idle yet: a new key is refused, known keys still work.
        assert!(!rl.allow(Some(9), "/w", t0 + Duration::from_millis(500)));
        assert!(rl.allow(Some(0), "/w", t0 + Duration::from_millis(600)));
        assert_eq!(rl.len(), 3);
        // pids 1 and 2 are full again after 2 s: the forced gc makes room.
        assert!(rl.allow(Some(9), "/w", t0 + Duration::from_millis(2500)));
        assert_eq!(rl.len(), 2);
    }

    #[test]
    fn zero_limit_refuses() {
        let mut rl = HookRateLimiter::new(0);
        assert!(!rl.allow(None, "/w", Instant::now()));
        assert!(rl.is_empty());
    }
}
