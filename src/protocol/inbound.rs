//! Client → broker messages (see mod.rs for why the tree is walked by hand).
use super::{ErrorCode, Priority, ProtocolError};
use simd_json::prelude::*;
use simd_json::value::borrowed::{to_value_with_buffers, Value};
use simd_json::Buffers;
use std::borrow::Cow;

#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    Hello(Hello<'a>),
    Send(Send<'a>),
    SetStatus(crate::hook::Status),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    pub mesh_id: Cow<'a, str>,
    pub member_id: Cow<'a, str>,
    /// 64 lowercase-or-uppercase hex digits (checked).
    pub pubkey: Cow<'a, str>,
    pub session_id: Cow<'a, str>,
    pub pid: i32,
    pub cwd: Cow<'a, str>,
    /// Milliseconds since the epoch, as signed.
    pub timestamp: i64,
    /// 128 hex digits (checked).
    pub signature: Cow<'a, str>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A member's pubkey (64 hex digits).
    Member(Cow<'a, str>),
    /// `*`: every other member of the mesh.
    All,
    /// `#channel`, `tag:x` and any other form the broker does not route yet.
    Unsupported,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Send<'a> {
    pub target: Target<'a>,
    pub priority: Priority,
    pub nonce: Cow<'a, str>,
    pub ciphertext: Cow<'a, str>,
    /// Client correlation id; `""` when absent.
    pub id: Cow<'a, str>,
}

/// A shard's reusable parsing space: simd-json's buffers and two copies of
/// the message (simd-json parses in place), one per parser below.
#[derive(Default)]
pub struct Parser {
    buffers: Buffers,
    plain: Vec<u8>,
    full: Vec<u8>,
}

impl Parser {
    /// Parses one WebSocket message. A send with plain fields — nearly every
    /// message — is read straight into borrowed strings; anything else (or
    /// any problem) goes through the tree parser, whose errors name the field.
    pub fn parse<'a>(&'a mut self, data: &[u8]) -> Result<ClientMessage<'a>, ProtocolError> {
        self.plain.clear();
        self.plain.extend_from_slice(data);
        if let Ok(plain) = simd_json::serde::from_slice_with_buffers::<PlainSend<'_>>(
            &mut self.plain,
            &mut self.buffers,
        ) {
            if let Some(send) = plain.into_send() {
                return Ok(ClientMessage::Send(send));
            }
        }
        self.full.clear();
        self.full.extend_from_slice(data);
        parse_client_message(&mut self.full, &mut self.buffers)
    }
}

/// The fast path's view of a send: no tree, no field-by-field checks.
#[derive(serde::Deserialize)]
struct PlainSend<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "targetSpec")]
    target_spec: &'a str,
    #[serde(default)]
    priority: Option<&'a str>,
    nonce: &'a str,
    ciphertext: &'a str,
    #[serde(default)]
    id: Option<&'a str>,
}

impl<'a> PlainSend<'a> {
    /// `None` unless it is a valid send: errors are the tree parser's job.
    fn into_send(self) -> Option<Send<'a>> {
        if self.kind != "send" {
            return None;
        }
        let target = match classify_target(Cow::Borrowed(self.target_spec))? {
            Target::Unsupported => return None,
            target => target,
        };
        let priority = match self.priority {
            None => Priority::Next,
            Some(p) => Priority::parse(p)?,
        };
        Some(Send {
            target,
            priority,
            nonce: Cow::Borrowed(self.nonce),
            ciphertext: Cow::Borrowed(self.ciphertext),
            id: Cow::Borrowed(self.id.unwrap_or("")),
        })
    }
}

/// `*`, a member pubkey, or a form not routed yet; `None` when empty.
fn classify_target(spec: Cow<'_, str>) -> Option<Target<'_>> {
    if spec.is_empty() {
        None
    } else if spec == "*" {
        Some(Target::All)
    } else if is_hex(&spec, 64) {
        Some(Target::Member(spec))
    } else {
        Some(Target::Unsupported)
    }
}

/// The tree parser. `buf` is unescaped in place by simd-json; `buffers` is
/// reusable scratch space. Strings are moved out of the parsed tree, so they
/// stay borrowed from `buf` where they can.
pub fn parse_client_message<'a>(
    buf: &'a mut [u8],
    buffers: &mut Buffers,
) -> Result<ClientMessage<'a>, ProtocolError> {
    let root = to_value_with_buffers(buf, buffers)
        .map_err(|_| ProtocolError::new(ErrorCode::BadJson, "message is not valid JSON"))?;
    let Value::Object(object) = root else {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "message is not a JSON object",
        ));
    };
    let mut fields = Fields(*object);
    let kind = fields.required_str("type")?;
    match kind.as_ref() {
        "hello" => parse_hello(&mut fields).map(ClientMessage::Hello),
        "send" => {
            // Every error answering a send echoes its id, so read it first.
            let id = fields.optional_str("id")?.unwrap_or_default();
            parse_send(&mut fields, id.clone())
                .map(ClientMessage::Send)
                .map_err(|e| e.with_id(Some(&id)))
        }
        "set_status" => {
            let status = fields.required_str("status")?;
            crate::hook::Status::parse(&status)
                .map(ClientMessage::SetStatus)
                .ok_or_else(|| {
                    ProtocolError::invalid_field("status", "must be idle, working or dnd")
                })
        }
        _ => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            "unknown message type",
        )),
    }
}

fn parse_hello<'a>(fields: &mut Fields<'a>) -> Result<Hello<'a>, ProtocolError> {
    let mesh_id = fields.non_empty_str("meshId")?;
    let member_id = fields.non_empty_str("memberId")?;
    let pubkey = fields.required_str("pubkey")?;
    if !is_hex(&pubkey, 64) {
        return Err(ProtocolError::invalid_field(
            "pubkey",
            "must be 64 hex digits",
        ));
    }
    let session_id = fields.non_empty_str("sessionId")?;
    let pid = fields.required_i64("pid")?;
    let pid = i32::try_from(pid)
        .ok()
        .filter(|pid| *pid >= 0)
        .ok_or_else(|| {
            ProtocolError::invalid_field("pid", "must be a non-negative 32-bit integer")
        })?;
    let cwd = fields.non_empty_str("cwd")?;
    let timestamp = fields.required_i64("timestamp")?;
    let signature = fields.required_str("signature")?;
    if !is_hex(&signature, 128) {
        return Err(ProtocolError::invalid_field(
            "signature",
            "must be 128 hex digits",
        ));
    }
    Ok(Hello {
        mesh_id,
        member_id,
        pubkey,
        session_id,
        pid,
        cwd,
        timestamp,
        signature,
    })
}

fn parse_send<'a>(fields: &mut Fields<'a>, id: Cow<'a, str>) -> Result<Send<'a>, ProtocolError> {
    let target_spec = fields.non_empty_str("targetSpec")?;
    let target = classify_target(target_spec).expect("non-empty targetSpec");
    let priority = match fields.optional_str("priority")? {
        None => Priority::Next,
        Some(p) => Priority::parse(&p)
            .ok_or_else(|| ProtocolError::invalid_field("priority", "must be now, next or low"))?,
    };
    let nonce = fields.required_str("nonce")?;
    let ciphertext = fields.required_str("ciphertext")?;
    if target == Target::Unsupported {
        return Err(ProtocolError::new(
            ErrorCode::UnsupportedTarget,
            "targetSpec must be a member pubkey or '*'",
        ));
    }
    Ok(Send {
        target,
        priority,
        nonce,
        ciphertext,
        id,
    })
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The message's fields, taken out one by one with errors that name them.
struct Fields<'a>(simd_json::value::borrowed::Object<'a>);

impl<'a> Fields<'a> {
    fn take(&mut self, name: &'static str) -> Option<Value<'a>> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn optional_str(&mut self, name: &'static str) -> Result<Option<Cow<'a, str>>, ProtocolError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ProtocolError::invalid_field(name, "must be a string")),
        }
    }

    fn required_str(&mut self, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
        self.optional_str(name)?
            .ok_or_else(|| ProtocolError::invalid_field(name, "is required"))
    }

    fn non_empty_str(&mut self, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
        let s = self.required_str(name)?;
        if s.is_empty() {
            return Err(ProtocolError::invalid_field(name, "must not be empty"));
        }
        Ok(s)
    }

    fn required_i64(&mut self, name: &'static str) -> Result<i64, ProtocolError> {
        match self.take(name) {
            None => Err(ProtocolError::invalid_field(name, "is required")),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| ProtocolError::invalid_field(name, "must be an integer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through the shard's parser (fast path, then the tree parser).
    fn parse(json: &str) -> Result<String, (ErrorCode, String, Option<String>)> {
        Parser::default()
            .parse(json.as_bytes())
            .map(|m| format!("{m:?}"))
            .map_err(|e| (e.code, e.message.into_owned(), e.id))
    }

    fn parse_tree(json: &str) -> Result<String, (ErrorCode, String, Option<String>)> {
        let mut buf = json.as_bytes().to_vec();
        parse_client_message(&mut buf, &mut Buffers::default())
            .map(|m| format!("{m:?}"))
            .map_err(|e| (e.code, e.message.into_owned(), e.id))
    }

    #[test]
    fn the_fast_path_agrees_with_the_tree_parser() {
        let cases = [
            format!(r#"{{"type":"send","targetSpec":"{KEY}","priority":"low","nonce":"n","ciphertext":"c","id":"1"}}"#),
            r#"{"type":"send","targetSpec":"*","nonce":"a\"b","ciphertext":"\u00e9","extra":{"x":[1]}}"#.to_owned(),
            r#"{"type":"send","targetSpec":"*","priority":null,"nonce":"n","ciphertext":"c","id":null}"#.to_owned(),
            r#"{"ciphertext":"c","nonce":"n","targetSpec":"*","type":"send"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"","nonce":"n","ciphertext":"c","id":"e"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"tag:x","nonce":"n","ciphertext":"c","id":"u"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"*","priority":"soon","nonce":"n","ciphertext":"c"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"*","nonce":1,"ciphertext":"c","id":"t"}"#.to_owned(),
            r#"{"type":"set_status","status":"idle","targetSpec":"*","nonce":"n","ciphertext":"c"}"#.to_owned(),
        ];
        for json in cases {
            assert_eq!(parse(&json), parse_tree(&json), "{json}");
        }
    }

    const KEY: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn hello(extra: &str) -> String {
        let sig = "ab".repeat(64);
        format!(
            r#"{{"type":"hello","meshId":"m","memberId":"u","pubkey":"{KEY}","sessionId":"s","pid":12,"cwd":"/w","timestamp":1764200000000,"signature":"{sig}"{extra}}}"#
        )
    }

    #[test]
    fn hello_parses_and_ignores_unknown_fields() {
        let out = parse(&hello(r#","extra":[1,2]"#)).unwrap();
        assert!(out.contains("Hello"));
        assert!(out.contains("pid: 12"));
    }

    #[test]
    fn hello_field_errors_name_the_field() {
        let cases = [
            (hello("").replace(KEY, "abc"), "pubkey"),
            (hello("").replace(r#""pid":12"#, r#""pid":"12""#), "pid"),
            (hello("").replace(r#""pid":12"#, r#""pid":-1"#), "pid"),
            (hello("").replace(r#""meshId":"m","#, ""), "meshId"),
            (hello("").replace(r#""cwd":"/w""#, r#""cwd":"""#), "cwd"),
            (hello("").replace("1764200000000", "1.5"), "timestamp"),
            (hello("").replace(&"ab".repeat(64), "zz"), "signature"),
        ];
        for (json, field) in cases {
            let (code, message, _) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{json}");
            assert!(message.contains(field), "{message} should name {field}");
        }
    }

    #[test]
    fn send_defaults_and_targets() {
        let out =
            parse(r#"{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c"}"#).unwrap();
        assert!(out.contains("All") && out.contains("Next") && out.contains(r#"id: """#));
        let direct = format!(
            r#"{{"type":"send","targetSpec":"{KEY}","priority":"now","nonce":"n","ciphertext":"c","id":"7"}}"#
        );
        assert!(parse(&direct).unwrap().contains("Member"));
        for spec in ["#general", "tag:x", "bob"] {
            let json = format!(
                r#"{{"type":"send","targetSpec":"{spec}","nonce":"n","ciphertext":"c","id":"q"}}"#
            );
            let (code, _, id) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::UnsupportedTarget);
            assert_eq!(id.as_deref(), Some("q"));
        }
    }

    #[test]
    fn send_errors_echo_the_id() {
        let cases = [
            (
                r#"{"type":"send","nonce":"n","ciphertext":"c","id":"a"}"#,
                "targetSpec",
            ),
            (
                r#"{"type":"send","targetSpec":"*","priority":"urgent","nonce":"n","ciphertext":"c","id":"a"}"#,
                "priority",
            ),
            (
                r#"{"type":"send","targetSpec":"*","nonce":5,"ciphertext":"c","id":"a"}"#,
                "nonce",
            ),
            (
                r#"{"type":"send","targetSpec":"*","nonce":"n","id":"a"}"#,
                "ciphertext",
            ),
        ];
        for (json, field) in cases {
            let (code, message, id) = parse(json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField);
            assert!(message.contains(field), "{message}");
            assert_eq!(id.as_deref(), Some("a"));
        }
        let (code, message, _) = parse(r#"{"type":"send","id":5}"#).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(message.contains("id"));
    }

    #[test]
    fn bad_json_and_unknown_type() {
        assert_eq!(parse("{nope").unwrap_err().0, ErrorCode::BadJson);
        assert_eq!(parse("[1,2]").unwrap_err().0, ErrorCode::BadJson);
        assert_eq!(
            parse(r#"{"type":"dance"}"#).unwrap_err().0,
            ErrorCode::UnknownType
        );
        assert_eq!(
            parse(r#"{"kind":"send"}"#).unwrap_err().0,
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let out = parse(r#"{"type":"send","targetSpec":"*","nonce":"a\"b","ciphertext":"\u00e9"}"#)
            .unwrap();
        assert!(out.contains(r#"a\"b"#) && out.contains('é'));
    }

    #[test]
    fn set_status_values() {
        assert!(parse(r#"{"type":"set_status","status":"dnd"}"#)
            .unwrap()
            .contains("Dnd"));
        assert_eq!(
            parse(r#"{"type":"set_status","status":"busy"}"#)
                .unwrap_err()
                .0,
            ErrorCode::InvalidField
        );
    }
}
