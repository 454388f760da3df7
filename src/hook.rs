//! `POST /hook/set-status` (PROTOCOL.md §5) without I/O: body validation and the
//! per-(pid, cwd) token bucket. The shard reads the body, calls [`parse_signal`],
//! asks the shared [`HookRateLimiter`] (behind a `Mutex`: hooks are low-rate), then
//! applies the signal to the mesh state.

use crate::rate::RateLimiter;

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
    // Bounded first: the tree is built by recursion (see MAX_JSON_DEPTH).
    if !crate::protocol::nesting_within(body, crate::protocol::MAX_JSON_DEPTH) {
        return Err(HookError::BadJson);
    }
    let value = simd_json::to_borrowed_value(body).map_err(|_| HookError::BadJson)?;
    let obj = value.as_object().ok_or(HookError::BadJson)?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());

    let cwd = match field("cwd") {
        None => return Err(HookError::MissingField("cwd")),
        Some(v) => match v.as_str() {
            // No session's cwd holds U+0000 (a hello refuses it), and
            // Postgres text cannot store the stash.
            Some(s) if !s.is_empty() && !s.contains('\0') => s.to_owned(),
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

/// The `/hook/set-status` limiter: a token bucket per (pid, cwd), with
/// `HOOK_RATE_LIMIT_PER_MIN` tokens each (see [`RateLimiter`]).
pub type HookRateLimiter = RateLimiter<HookKey>;

/// What a hook signal is counted by: its (pid, cwd).
pub type HookKey = (Option<i32>, Box<str>);

/// The bucket key of a signal (one small allocation: hooks are low-rate).
pub fn hook_key(signal: &HookSignal) -> HookKey {
    (signal.pid, signal.cwd.as_str().into())
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
            (r#"{"cwd":"/w\u0000","status":"idle"}"#, "cwd"),
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
}
