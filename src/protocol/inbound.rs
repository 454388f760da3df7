//! Client → broker messages (see mod.rs for why the tree is walked by hand).
use super::admin::{Admin, DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT};
use super::{Capabilities, ErrorCode, GroupName, Priority, ProtocolError, MAX_REQ_ID_CHARS};
use simd_json::prelude::*;
use simd_json::value::borrowed::{to_value_with_buffers, Value};
use simd_json::Buffers;
use std::borrow::Cow;
use std::fmt::Display;

/// Most characters in a hello's `displayName` (PROTOCOL.md §9).
const MAX_DISPLAY_NAME_CHARS: usize = 64;
/// Most characters in a group `role` (§10).
const MAX_ROLE_CHARS: usize = 32;
/// Most entries in a hello's `groups` (§9).
const MAX_HELLO_GROUPS: usize = 64;
/// Most characters in a `set_summary` (§9).
const MAX_SUMMARY_CHARS: usize = 1024;
/// The protocol versions the broker speaks (§9).
const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u64> = 1..=2;
/// Most characters in a send's `client_message_id` (§11).
pub const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 128;
/// Most ids in one `client_ack`'s `messageIds` (§11).
pub const MAX_CLIENT_ACK_IDS: usize = 1000;

/// A parsed message and the `_reqId` every answer to it echoes (§9).
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub message: ClientMessage<'a>,
    pub req_id: Option<Cow<'a, str>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    Hello(Hello<'a>),
    /// `session_hello` (§9): a session key vouched for by its member's.
    SessionHello(SessionHello<'a>),
    Send(Send<'a>),
    SetStatus(crate::hook::Status),
    /// `list_peers` (§9).
    ListPeers,
    /// `set_summary` (§9); `None` clears the summary (`null`, `""` or no
    /// `summary` at all).
    SetSummary(Option<Cow<'a, str>>),
    /// `join_group` (§10).
    JoinGroup(GroupJoin<'a>),
    /// `leave_group` (§10).
    LeaveGroup {
        name: GroupName,
    },
    /// `client_ack` (§11): the message ids acknowledged, from exactly one
    /// of `messageId`, `brokerMessageId` (the same meaning) or `messageIds`
    /// (1 to 1000 ids), in the order written. Never empty.
    ClientAck(Vec<Cow<'a, str>>),
    /// An administration message (§13).
    Admin(Admin<'a>),
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
    /// `displayName`, this session's name (at most 64 characters), as
    /// written; `None` when absent.
    pub display_name: Option<Cow<'a, str>>,
    /// `groups` to join on admit (at most 64), in the order written.
    pub groups: Vec<GroupJoin<'a>>,
    /// The `capabilities` asked for; unknown names are ignored.
    pub capabilities: Capabilities,
    /// `protocolVersion`: 1 (also when absent) or 2.
    pub protocol_version: u32,
}

/// `session_hello` (§9). Its fields shared with `hello` sit in `hello`:
/// `member_id` is `parentMemberId`, `pubkey` is `parentMemberPubkey`, and
/// `signature` is the session key's over the session-hello string.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionHello<'a> {
    pub hello: Hello<'a>,
    /// 64 hex digits (checked).
    pub session_pubkey: Cow<'a, str>,
    pub attestation: Attestation<'a>,
}

/// `parentAttestation`: the member key vouching for a session key until
/// `expires_at` (ms since the epoch).
#[derive(Debug, PartialEq, Eq)]
pub struct Attestation<'a> {
    pub session_pubkey: Cow<'a, str>,
    pub parent_member_pubkey: Cow<'a, str>,
    pub expires_at: i64,
    /// 128 hex digits (checked).
    pub signature: Cow<'a, str>,
}

/// The text a hello's `signature` covers (§4):
/// `meshId|memberId|pubkey|timestamp`, the timestamp in decimal.
/// Unambiguous because a hello with `|` in `meshId` or `memberId` is
/// refused (`pubkey` is hex, the timestamp digits).
pub(crate) fn hello_signed_text(
    mesh_id: &str,
    member_id: &str,
    pubkey: &str,
    timestamp: i64,
) -> String {
    format!("{mesh_id}|{member_id}|{pubkey}|{timestamp}")
}

/// The text a `session_hello`'s `parentAttestation.signature` covers (§9),
/// with the attestation's own values: two hex keys and a decimal time.
pub(crate) fn session_attest_text(
    parent_pubkey: &str,
    session_pubkey: &str,
    expires_at: i64,
) -> String {
    format!("claudemesh-session-attest|{parent_pubkey}|{session_pubkey}|{expires_at}")
}

/// The text a `session_hello`'s `signature` covers (§9). Unambiguous for
/// the same reason as `hello_signed_text`: `meshId` holds no `|`.
pub(crate) fn session_hello_signed_text(
    mesh_id: &str,
    parent_pubkey: &str,
    session_pubkey: &str,
    timestamp: i64,
) -> String {
    format!("claudemesh-session-hello|{mesh_id}|{parent_pubkey}|{session_pubkey}|{timestamp}")
}

/// A group to join, with the member's role in it (at most 32 characters):
/// `join_group` and each entry of a hello's `groups` (§10).
#[derive(Debug, PartialEq, Eq)]
pub struct GroupJoin<'a> {
    pub name: GroupName,
    pub role: Option<Cow<'a, str>>,
}

/// What a send's `targetSpec` names (§4, §10).
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A member's (or a session's) pubkey: 64 hex digits.
    Member(Cow<'a, str>),
    /// `*` or `@all`: every other member of the mesh.
    All,
    /// `@<group>` or `#<group>`: every other member in that group or a
    /// group below it.
    Group(GroupName),
    /// `tag:x`, a bare word and any other form the broker does not route:
    /// answered `unsupported_target`.
    Unsupported,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Send<'a> {
    pub target: Target<'a>,
    /// `targetSpec` as written (pushes of non-direct sends carry it).
    pub target_spec: Cow<'a, str>,
    pub priority: Priority,
    pub nonce: Cow<'a, str>,
    pub ciphertext: Cow<'a, str>,
    /// Client correlation id; `""` when absent.
    pub id: Cow<'a, str>,
    /// `client_message_id` (§11, at most 128 characters): the sender's own
    /// id for the envelope, passed through on its pushes and the key of
    /// duplicate detection. `None` when absent, `null` or `""` (an empty id
    /// would make every later send with it a duplicate).
    pub client_message_id: Option<Cow<'a, str>>,
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
    pub fn parse<'a>(&'a mut self, data: &[u8]) -> Result<Parsed<'a>, ProtocolError> {
        if !super::nesting_within(data, super::MAX_JSON_DEPTH) {
            return Err(ProtocolError::new(
                ErrorCode::BadJson,
                "message nests arrays and objects more than 64 deep",
            ));
        }
        self.plain.clear();
        self.plain.extend_from_slice(data);
        if let Some(parsed) = parse_plain_send(&mut self.plain, &mut self.buffers) {
            return Ok(parsed);
        }
        self.full.clear();
        self.full.extend_from_slice(data);
        parse_client_message(&mut self.full, &mut self.buffers)
    }
}

/// The fast path alone: `Some` only for a send with plain fields, which
/// the tree parser would parse to the same message; `None` for anything
/// else, left to the tree parser. `buf` is unescaped in place.
pub(crate) fn parse_plain_send<'a>(buf: &'a mut [u8], buffers: &mut Buffers) -> Option<Parsed<'a>> {
    simd_json::serde::from_slice_with_buffers::<PlainSend<'_>>(buf, buffers)
        .ok()?
        .into_parsed()
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
    #[serde(default)]
    client_message_id: Option<&'a str>,
    #[serde(default, rename = "_reqId")]
    req_id: Option<&'a str>,
}

impl<'a> PlainSend<'a> {
    /// `None` unless it is a valid send: errors are the tree parser's job.
    fn into_parsed(self) -> Option<Parsed<'a>> {
        if self.kind != "send" {
            return None;
        }
        // Refused by the tree parser, which names the field.
        let stored = [
            Some(self.nonce),
            Some(self.ciphertext),
            self.client_message_id,
        ];
        if stored.iter().flatten().any(|s| s.contains('\0')) {
            return None;
        }
        if self.req_id.is_some_and(|r| !fits(r, MAX_REQ_ID_CHARS)) {
            return None;
        }
        if self
            .client_message_id
            .is_some_and(|c| !fits(c, MAX_CLIENT_MESSAGE_ID_CHARS))
        {
            return None;
        }
        let target_spec = Cow::Borrowed(self.target_spec);
        let target = match classify_target(&target_spec)? {
            Target::Unsupported => return None,
            target => target,
        };
        let priority = match self.priority {
            None => Priority::Next,
            Some(p) => Priority::parse(p)?,
        };
        Some(Parsed {
            message: ClientMessage::Send(Send {
                target,
                target_spec,
                priority,
                nonce: Cow::Borrowed(self.nonce),
                ciphertext: Cow::Borrowed(self.ciphertext),
                id: Cow::Borrowed(self.id.unwrap_or("")),
                client_message_id: self
                    .client_message_id
                    .filter(|c| !c.is_empty())
                    .map(Cow::Borrowed),
            }),
            req_id: self.req_id.map(Cow::Borrowed),
        })
    }
}

/// Classifies a `targetSpec`: `None` for `@` or `#` before something that
/// is not a valid group name. `@all` (group names compare in lowercase, and
/// `#<name>` is `@<name>`) is `*`.
fn classify_target<'a>(spec: &Cow<'a, str>) -> Option<Target<'a>> {
    if spec == "*" {
        return Some(Target::All);
    }
    if is_hex(spec, 64) {
        return Some(Target::Member(spec.clone()));
    }
    let Some(name) = spec.strip_prefix(['@', '#']) else {
        return Some(Target::Unsupported);
    };
    let group = GroupName::parse(name)?;
    Some(if group.as_str() == "all" {
        Target::All
    } else {
        Target::Group(group)
    })
}

/// The tree parser. `buf` is unescaped in place by simd-json; `buffers` is
/// reusable scratch space. Strings are moved out of the parsed tree, so they
/// stay borrowed from `buf` where they can.
pub fn parse_client_message<'a>(
    buf: &'a mut [u8],
    buffers: &mut Buffers,
) -> Result<Parsed<'a>, ProtocolError> {
    let root = to_value_with_buffers(buf, buffers)
        .map_err(|_| ProtocolError::new(ErrorCode::BadJson, "message is not valid JSON"))?;
    let Value::Object(object) = root else {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "message is not a JSON object",
        ));
    };
    let mut fields = Fields::new(*object);
    // `_reqId` is taken first so that every error echoes it once it is
    // valid; a bad one is answered after `type` (and a send's `id`) are read.
    let (req_id, bad_req_id) = match fields.limited_str("_reqId", MAX_REQ_ID_CHARS) {
        Ok(req_id) => (req_id, None),
        Err(e) => (None, Some(e)),
    };
    let message =
        parse_message(&mut fields, bad_req_id).map_err(|e| e.with_req_id(req_id.as_deref()))?;
    Ok(Parsed { message, req_id })
}

fn parse_message<'a>(
    fields: &mut Fields<'a>,
    bad_req_id: Option<ProtocolError>,
) -> Result<ClientMessage<'a>, ProtocolError> {
    let kind = fields.required_str("type")?;
    if kind == "send" {
        // Every error answering a send echoes its id, so read it first.
        let id = fields.optional_str("id")?.unwrap_or_default();
        let send = match bad_req_id {
            Some(e) => Err(e),
            None => parse_send(fields, id.clone()),
        };
        return send
            .map(ClientMessage::Send)
            .map_err(|e| e.with_id(Some(&id)));
    }
    if let Some(e) = bad_req_id {
        return Err(e);
    }
    match kind.as_ref() {
        "hello" => parse_hello(fields, HelloNames::MEMBER).map(ClientMessage::Hello),
        "session_hello" => parse_session_hello(fields).map(ClientMessage::SessionHello),
        "set_status" => {
            let status = fields.required_str("status")?;
            crate::hook::Status::parse(&status)
                .map(ClientMessage::SetStatus)
                .ok_or_else(|| fields.invalid("status", "must be idle, working or dnd"))
        }
        "list_peers" => Ok(ClientMessage::ListPeers),
        "set_summary" => {
            let summary = fields.limited_str("summary", MAX_SUMMARY_CHARS)?;
            Ok(ClientMessage::SetSummary(
                summary.filter(|summary| !summary.is_empty()),
            ))
        }
        "join_group" => parse_group_join(fields).map(ClientMessage::JoinGroup),
        "leave_group" => Ok(ClientMessage::LeaveGroup {
            name: fields.group_name("name")?,
        }),
        "client_ack" => parse_client_ack(fields).map(ClientMessage::ClientAck),
        "kick" => Ok(ClientMessage::Admin(Admin::Kick {
            target: fields.non_empty_str("target")?,
        })),
        "ban" => Ok(ClientMessage::Admin(Admin::Ban {
            target: fields.non_empty_str("target")?,
            reason: fields.limited_str("reason", 256)?,
        })),
        "unban" => Ok(ClientMessage::Admin(Admin::Unban {
            target: fields.non_empty_str("target")?,
        })),
        "list_bans" => Ok(ClientMessage::Admin(Admin::ListBans)),
        "audit_query" => parse_audit_query(fields).map(ClientMessage::Admin),
        "audit_verify" => Ok(ClientMessage::Admin(Admin::AuditVerify)),
        _ => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            "unknown message type",
        )),
    }
}

/// Where `hello` and `session_hello` name the member.
struct HelloNames {
    member_id: &'static str,
    pubkey: &'static str,
}

impl HelloNames {
    const MEMBER: HelloNames = HelloNames {
        member_id: "memberId",
        pubkey: "pubkey",
    };
    const SESSION: HelloNames = HelloNames {
        member_id: "parentMemberId",
        pubkey: "parentMemberPubkey",
    };
}

fn parse_hello<'a>(fields: &mut Fields<'a>, names: HelloNames) -> Result<Hello<'a>, ProtocolError> {
    // First, so a client of a later protocol learns that, whatever the
    // shape of the rest of its hello.
    let protocol_version = parse_protocol_version(fields)?;
    let mesh_id = fields.signed_id("meshId")?;
    let mesh_id = fields.stored(mesh_id, "meshId")?;
    let member_id = fields.signed_id(names.member_id)?;
    let member_id = fields.stored(member_id, names.member_id)?;
    let pubkey = fields.hex(names.pubkey, 64)?;
    let session_id = fields.non_empty_str("sessionId")?;
    let session_id = fields.stored(session_id, "sessionId")?;
    let pid = fields.required_i64("pid")?;
    let pid = i32::try_from(pid)
        .ok()
        .filter(|pid| *pid >= 0)
        .ok_or_else(|| fields.invalid("pid", "must be a non-negative 32-bit integer"))?;
    let cwd = fields.non_empty_str("cwd")?;
    let cwd = fields.stored(cwd, "cwd")?;
    let timestamp = fields.required_i64("timestamp")?;
    let signature = fields.hex("signature", 128)?;
    let display_name = fields.limited_str("displayName", MAX_DISPLAY_NAME_CHARS)?;
    let display_name = display_name
        .map(|n| fields.stored(n, "displayName"))
        .transpose()?;
    let groups = parse_hello_groups(fields)?;
    let capabilities = parse_capabilities(fields)?;
    Ok(Hello {
        mesh_id,
        member_id,
        pubkey,
        session_id,
        pid,
        cwd,
        timestamp,
        signature,
        display_name,
        groups,
        capabilities,
        protocol_version,
    })
}

fn parse_session_hello<'a>(fields: &mut Fields<'a>) -> Result<SessionHello<'a>, ProtocolError> {
    let hello = parse_hello(fields, HelloNames::SESSION)?;
    let session_pubkey = fields.hex("sessionPubkey", 64)?;
    const NAME: &str = "parentAttestation";
    let object = match fields.take(NAME)? {
        Some(Value::Object(object)) => object,
        Some(_) => return Err(fields.invalid(NAME, "must be an object")),
        None => return Err(fields.invalid(NAME, "is required")),
    };
    let mut inner = Fields::nested(*object, NAME);
    let attestation = Attestation {
        session_pubkey: inner.hex("sessionPubkey", 64)?,
        parent_member_pubkey: inner.hex("parentMemberPubkey", 64)?,
        expires_at: inner.required_i64("expiresAt")?,
        signature: inner.hex("signature", 128)?,
    };
    Ok(SessionHello {
        hello,
        session_pubkey,
        attestation,
    })
}

/// `protocolVersion`: absent or `null` is 1; above 2 is answered
/// `unsupported_protocol`.
fn parse_protocol_version(fields: &mut Fields<'_>) -> Result<u32, ProtocolError> {
    const NAME: &str = "protocolVersion";
    let Some(value) = fields.take(NAME)? else {
        return Ok(1);
    };
    match value.as_u64() {
        Some(v) if PROTOCOL_VERSIONS.contains(&v) => Ok(v as u32),
        Some(v) if v > *PROTOCOL_VERSIONS.end() => Err(ProtocolError::new(
            ErrorCode::UnsupportedProtocol,
            format!("protocolVersion {v} is not supported: the broker speaks 1 and 2"),
        )),
        _ => Err(fields.invalid(NAME, "must be a positive integer")),
    }
}

/// A hello's `groups`: an array of at most 64 `{name, role}` objects.
fn parse_hello_groups<'a>(fields: &mut Fields<'a>) -> Result<Vec<GroupJoin<'a>>, ProtocolError> {
    const NAME: &str = "groups";
    let entries = match fields.take(NAME)? {
        None => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(fields.invalid(NAME, "must be an array of {name, role} objects")),
    };
    if entries.len() > MAX_HELLO_GROUPS {
        return Err(fields.invalid(
            NAME,
            format_args!("must have at most {MAX_HELLO_GROUPS} entries"),
        ));
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| match entry {
            Value::Object(object) => parse_group_join(&mut Fields::within(*object, NAME, index)),
            _ => Err(fields.invalid(
                NAME,
                format_args!("entry {index} is not a {{name, role}} object"),
            )),
        })
        .collect()
}

/// `{name, role}` of a join_group or of a hello's group.
fn parse_group_join<'a>(fields: &mut Fields<'a>) -> Result<GroupJoin<'a>, ProtocolError> {
    let name = fields.group_name("name")?;
    let role = fields.limited_str("role", MAX_ROLE_CHARS)?;
    let role = role.map(|r| fields.stored(r, "role")).transpose()?;
    Ok(GroupJoin { name, role })
}

/// A hello's `capabilities`: an array of strings, unknown ones ignored.
fn parse_capabilities(fields: &mut Fields<'_>) -> Result<Capabilities, ProtocolError> {
    const NAME: &str = "capabilities";
    let mut capabilities = Capabilities::default();
    match fields.take(NAME)? {
        None => {}
        Some(Value::Array(names)) => {
            for name in names.iter() {
                match name {
                    Value::String(name) => capabilities.insert(name),
                    _ => return Err(fields.invalid(NAME, "must be an array of strings")),
                }
            }
        }
        Some(_) => return Err(fields.invalid(NAME, "must be an array of strings")),
    }
    Ok(capabilities)
}

fn parse_send<'a>(fields: &mut Fields<'a>, id: Cow<'a, str>) -> Result<Send<'a>, ProtocolError> {
    let target_spec = fields.non_empty_str("targetSpec")?;
    let target = classify_target(&target_spec).ok_or_else(|| {
        fields.invalid(
            "targetSpec",
            "has '@' or '#' before what is not a valid group name",
        )
    })?;
    let priority = match fields.optional_str("priority")? {
        None => Priority::Next,
        Some(p) => Priority::parse(&p)
            .ok_or_else(|| fields.invalid("priority", "must be now, next or low"))?,
    };
    let nonce = fields.required_str("nonce")?;
    let nonce = fields.stored(nonce, "nonce")?;
    let ciphertext = fields.required_str("ciphertext")?;
    let ciphertext = fields.stored(ciphertext, "ciphertext")?;
    let client_message_id = fields
        .limited_str("client_message_id", MAX_CLIENT_MESSAGE_ID_CHARS)?
        .map(|c| fields.stored(c, "client_message_id"))
        .transpose()?
        .filter(|c| !c.is_empty());
    if target == Target::Unsupported {
        return Err(ProtocolError::new(
            ErrorCode::UnsupportedTarget,
            "targetSpec must be a member pubkey, '*', '@all', '@<group>' or '#<group>'",
        ));
    }
    Ok(Send {
        target,
        target_spec,
        priority,
        nonce,
        ciphertext,
        id,
        client_message_id,
    })
}

/// A `client_ack`'s ids: exactly one of `messageId`, `brokerMessageId` and
/// `messageIds` (an array of 1 to 1000 strings).
fn parse_audit_query<'a>(fields: &mut Fields<'a>) -> Result<Admin<'a>, ProtocolError> {
    let limit = match fields.take("limit")? {
        None => DEFAULT_AUDIT_LIMIT,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u64::from(MAX_AUDIT_LIMIT)).contains(n))
            .ok_or_else(|| {
                fields.invalid(
                    "limit",
                    format_args!("must be an integer from 1 to {MAX_AUDIT_LIMIT}"),
                )
            })? as u32,
    };
    // Both are query parameters: a NUL made Postgres refuse the query,
    // answered as if the database were down.
    let before_id = fields.optional_str("beforeId")?;
    let before_id = before_id
        .map(|b| fields.stored(b, "beforeId"))
        .transpose()?;
    let event_type = fields.optional_str("eventType")?;
    let event_type = event_type
        .map(|e| fields.stored(e, "eventType"))
        .transpose()?;
    Ok(Admin::AuditQuery {
        limit,
        before_id,
        event_type,
    })
}

fn parse_client_ack<'a>(fields: &mut Fields<'a>) -> Result<Vec<Cow<'a, str>>, ProtocolError> {
    const ONE: &str = "messageId";
    const BROKER: &str = "brokerMessageId";
    const MANY: &str = "messageIds";
    let one = fields.optional_str(ONE)?;
    let broker = fields.optional_str(BROKER)?;
    let many = fields.take(MANY)?;
    match (one, broker, many) {
        (None, None, None) => Err(fields.invalid(
            ONE,
            format_args!("is required (or '{BROKER}', or '{MANY}')"),
        )),
        (Some(_), Some(_), _) => {
            Err(fields.invalid(BROKER, format_args!("and '{ONE}' are both given: send one")))
        }
        (Some(_), None, Some(_)) => {
            Err(fields.invalid(MANY, format_args!("and '{ONE}' are both given: send one")))
        }
        (None, Some(_), Some(_)) => Err(fields.invalid(
            MANY,
            format_args!("and '{BROKER}' are both given: send one"),
        )),
        (Some(id), None, None) | (None, Some(id), None) => Ok(vec![id]),
        (None, None, Some(Value::Array(ids))) => {
            if ids.is_empty() || ids.len() > MAX_CLIENT_ACK_IDS {
                return Err(fields.invalid(
                    MANY,
                    format_args!("must have from 1 to {MAX_CLIENT_ACK_IDS} entries"),
                ));
            }
            ids.into_iter()
                .enumerate()
                .map(|(index, id)| match id {
                    Value::String(id) => Ok(id),
                    _ => Err(fields.invalid(MANY, format_args!("entry {index} is not a string"))),
                })
                .collect()
        }
        (None, None, Some(_)) => Err(fields.invalid(MANY, "must be an array of strings")),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` has at most `max` characters (not bytes).
fn fits(s: &str, max: usize) -> bool {
    s.len() <= max || s.chars().count() <= max
}

/// The message's fields (or those of an entry of one of its arrays), taken
/// out one by one with errors that name them.
struct Fields<'a> {
    object: simd_json::value::borrowed::Object<'a>,
    /// For an entry of an array field: the array's name and the index.
    within: Option<(&'static str, usize)>,
}

impl<'a> Fields<'a> {
    fn new(object: simd_json::value::borrowed::Object<'a>) -> Self {
        Fields {
            object,
            within: None,
        }
    }

    fn within(
        object: simd_json::value::borrowed::Object<'a>,
        array: &'static str,
        index: usize,
    ) -> Self {
        Fields {
            object,
            within: Some((array, index)),
        }
    }

    /// The fields of an object-valued field `parent`.
    fn nested(object: simd_json::value::borrowed::Object<'a>, parent: &'static str) -> Self {
        Fields {
            object,
            within: Some((parent, usize::MAX)),
        }
    }

    /// `invalid_field` about `name`, an entry's field named with its array.
    fn invalid(&self, name: &'static str, expected: impl Display) -> ProtocolError {
        let message = match self.within {
            None => format!("field '{name}' {expected}"),
            Some((parent, usize::MAX)) => format!("field '{parent}.{name}' {expected}"),
            Some((array, index)) => format!("field '{array}' entry {index}: '{name}' {expected}"),
        };
        ProtocolError::new(ErrorCode::InvalidField, message)
    }

    /// `s` unless it holds U+0000 (only an escaped `\u0000` gets there):
    /// these values reach Postgres `text`, which cannot hold it, and a row
    /// refused there came back as `unavailable` (a held send) or broke the
    /// session's presence row, depending on who was online.
    fn stored(&self, s: Cow<'a, str>, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
        if s.contains('\0') {
            return Err(self.invalid(name, "must not contain U+0000"));
        }
        Ok(s)
    }

    /// The field `name`, moved out. A field the message reads, given
    /// twice, is refused (`bad_json`): simd-json keeps both, and which one
    /// a read got depended on where the other keys sat. A repeated key no
    /// message reads is ignored like any unknown key, as the fast send
    /// path's decoder does, so both paths answer alike.
    fn take(&mut self, name: &'static str) -> Result<Option<Value<'a>>, ProtocolError> {
        let value = self.object.remove(name);
        if value.is_some() && self.object.contains_key(name) {
            let message = match self.within {
                None => format!("key '{name}' appears more than once"),
                Some((parent, usize::MAX)) => {
                    format!("key '{parent}.{name}' appears more than once")
                }
                Some((array, index)) => {
                    format!("field '{array}' entry {index}: key '{name}' appears more than once")
                }
            };
            return Err(ProtocolError::new(ErrorCode::BadJson, message));
        }
        Ok(value.filter(|v| !v.is_null()))
    }

    fn optional_str(&mut self, name: &'static str) -> Result<Option<Cow<'a, str>>, ProtocolError> {
        match self.take(name)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.invalid(name, "must be a string")),
        }
    }

    fn required_str(&mut self, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
        self.optional_str(name)?
            .ok_or_else(|| self.invalid(name, "is required"))
    }

    fn non_empty_str(&mut self, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
        let s = self.required_str(name)?;
        if s.is_empty() {
            return Err(self.invalid(name, "must not be empty"));
        }
        Ok(s)
    }

    /// A hello's `meshId` or `memberId`: non-empty and without `|`, which
    /// joins the signed text's fields (`hello_signed_text`); with one
    /// inside, two different hellos would have the same signed text.
    fn signed_id(&mut self, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
        let s = self.non_empty_str(name)?;
        if s.contains('|') {
            return Err(self.invalid(name, "must not contain '|'"));
        }
        Ok(s)
    }

    /// An optional string of at most `max` characters.
    fn limited_str(
        &mut self,
        name: &'static str,
        max: usize,
    ) -> Result<Option<Cow<'a, str>>, ProtocolError> {
        let s = self.optional_str(name)?;
        match s {
            Some(s) if !fits(&s, max) => {
                Err(self.invalid(name, format_args!("must be at most {max} characters")))
            }
            s => Ok(s),
        }
    }

    /// A required group name (§10), in lowercase.
    fn group_name(&mut self, name: &'static str) -> Result<GroupName, ProtocolError> {
        let s = self.required_str(name)?;
        GroupName::parse(&s).ok_or_else(|| self.invalid(name, "is not a valid group name"))
    }

    /// A required string of exactly `len` hex digits (a key or signature).
    fn hex(&mut self, name: &'static str, len: usize) -> Result<Cow<'a, str>, ProtocolError> {
        let s = self.required_str(name)?;
        if !is_hex(&s, len) {
            return Err(self.invalid(name, format_args!("must be {len} hex digits")));
        }
        Ok(s)
    }

    fn required_i64(&mut self, name: &'static str) -> Result<i64, ProtocolError> {
        match self.take(name)? {
            None => Err(self.invalid(name, "is required")),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| self.invalid(name, "must be an integer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error as the tests compare it: code, message, id, `_reqId`.
    type Refusal = (ErrorCode, String, Option<String>, Option<String>);

    fn refusal(e: ProtocolError) -> Refusal {
        (e.code, e.message.into_owned(), e.id, e.req_id)
    }

    /// Through the shard's parser (fast path, then the tree parser).
    fn parse(json: &str) -> Result<String, Refusal> {
        Parser::default()
            .parse(json.as_bytes())
            .map(|m| format!("{m:?}"))
            .map_err(refusal)
    }

    fn parse_tree(json: &str) -> Result<String, Refusal> {
        let mut buf = json.as_bytes().to_vec();
        parse_client_message(&mut buf, &mut Buffers::default())
            .map(|m| format!("{m:?}"))
            .map_err(refusal)
    }

    /// Whether the fast path alone takes `json`.
    fn fast(json: &str) -> bool {
        let mut buf = json.as_bytes().to_vec();
        parse_plain_send(&mut buf, &mut Buffers::default()).is_some()
    }

    fn plain_send(spec: &str, extra: &str) -> String {
        format!(
            r#"{{"type":"send","targetSpec":"{spec}","nonce":"n","ciphertext":"c","id":"s"{extra}}}"#
        )
    }

    #[test]
    fn the_fast_path_agrees_with_the_tree_parser() {
        let long = "x".repeat(65);
        let wide = "é".repeat(64);
        let mut cases = vec![
            format!(r#"{{"type":"send","targetSpec":"{KEY}","priority":"low","nonce":"n","ciphertext":"c","id":"1"}}"#),
            r#"{"type":"send","targetSpec":"*","nonce":"a\"b","ciphertext":"\u00e9","extra":{"x":[1]}}"#.to_owned(),
            r#"{"type":"send","targetSpec":"*","priority":null,"nonce":"n","ciphertext":"c","id":null}"#.to_owned(),
            r#"{"ciphertext":"c","nonce":"n","targetSpec":"*","type":"send"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"","nonce":"n","ciphertext":"c","id":"e"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"tag:x","nonce":"n","ciphertext":"c","id":"u"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"*","priority":"soon","nonce":"n","ciphertext":"c"}"#.to_owned(),
            r#"{"type":"send","targetSpec":"*","nonce":1,"ciphertext":"c","id":"t"}"#.to_owned(),
            r#"{"type":"set_status","status":"idle","targetSpec":"*","nonce":"n","ciphertext":"c"}"#.to_owned(),
            r#"{"type":"list_peers","targetSpec":"*","nonce":"n","ciphertext":"c","_reqId":"r"}"#.to_owned(),
            plain_send("*", r#","_reqId":"r1""#),
            plain_send("*", r#","_reqId":null"#),
            plain_send("*", r#","_reqId":"r\"1""#),
            plain_send("*", &format!(r#","_reqId":"{wide}""#)),
            plain_send("*", &format!(r#","_reqId":"{long}""#)),
            plain_send("*", r#","_reqId":7"#),
            plain_send("*", r#","priority":"soon","_reqId":"r2""#),
            plain_send("tag:x", r#","_reqId":"r3""#),
            plain_send("", r#","_reqId":"r4""#),
            plain_send("@", r#","_reqId":"r5""#),
            plain_send("*", r#","client_message_id":"c-1""#),
            plain_send("*", r#","client_message_id":"c\"1""#),
            plain_send("*", r#","client_message_id":null"#),
            plain_send("*", r#","client_message_id":"""#),
            plain_send("*", r#","client_message_id":7"#),
            plain_send("*", r#","client_message_id":["c"]"#),
            plain_send("*", &format!(r#","client_message_id":"{}""#, "é".repeat(128))),
            plain_send("*", &format!(r#","client_message_id":"{}""#, "x".repeat(129))),
            plain_send("*", &format!(r#","client_message_id":"{}","_reqId":"r6""#, "x".repeat(129))),
            plain_send("tag:x", r#","client_message_id":"c-2""#),
            plain_send(KEY, r#","client_message_id":"c-3","_reqId":"r7""#),
            r#"{"type":"client_ack","messageId":"m1","targetSpec":"*","nonce":"n","ciphertext":"c"}"#.to_owned(),
        ];
        for spec in [
            "@all",
            "@ALL",
            "#all",
            "@eng",
            "#eng",
            "@Eng/API",
            "@eng/",
            "#_x",
            "@a/b/c/d/e",
            "@e ng",
            "#",
            "bob",
            "*x",
        ] {
            cases.push(plain_send(spec, ""));
            cases.push(plain_send(spec, r#","_reqId":"q""#));
        }
        for json in cases {
            assert_eq!(parse(&json), parse_tree(&json), "{json}");
        }
    }

    #[test]
    fn the_fast_path_takes_plain_sends_to_every_routed_target() {
        for spec in ["*", "@all", "@eng", "#eng", "@eng/backend", KEY] {
            assert!(fast(&plain_send(spec, "")), "{spec}");
            assert!(fast(&plain_send(spec, r#","_reqId":"r""#)), "{spec}");
        }
        let wide = "é".repeat(64);
        assert!(fast(&plain_send("*", &format!(r#","_reqId":"{wide}""#))));
        let most = "é".repeat(128);
        for extra in [
            format!(r#","client_message_id":"{most}""#),
            r#","client_message_id":"c-1","_reqId":"r""#.to_owned(),
            r#","client_message_id":null"#.to_owned(),
        ] {
            assert!(fast(&plain_send("*", &extra)), "{extra}");
        }
        let long = "é".repeat(65);
        for json in [
            plain_send("*", &format!(r#","_reqId":"{long}""#)),
            plain_send(
                "*",
                &format!(r#","client_message_id":"{}""#, "x".repeat(129)),
            ),
            plain_send("tag:x", ""),
            plain_send("@_x", ""),
            plain_send("", ""),
        ] {
            assert!(!fast(&json), "{json}");
        }
    }

    const KEY: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn hello(extra: &str) -> String {
        let sig = "ab".repeat(64);
        format!(
            r#"{{"type":"hello","meshId":"m","memberId":"u","pubkey":"{KEY}","sessionId":"s","pid":12,"cwd":"/w","timestamp":1764200000000,"signature":"{sig}"{extra}}}"#
        )
    }

    /// Parses and hands the message to `check`.
    fn with_parsed(json: &str, check: impl FnOnce(Parsed<'_>)) {
        let mut parser = Parser::default();
        check(
            parser
                .parse(json.as_bytes())
                .unwrap_or_else(|e| panic!("{json}: {e:?}")),
        );
    }

    fn with_hello(extra: &str, check: impl FnOnce(Hello<'_>)) {
        with_parsed(&hello(extra), |parsed| match parsed.message {
            ClientMessage::Hello(hello) => check(hello),
            other => panic!("not a hello: {other:?}"),
        });
    }

    fn group(name: &str) -> GroupName {
        GroupName::parse(name).unwrap()
    }

    fn session_hello(extra: &str) -> String {
        let s = "5e".repeat(32);
        let sig = "cd".repeat(64);
        let att = format!(
            r#"{{"sessionPubkey":"{s}","parentMemberPubkey":"{KEY}","expiresAt":1764243200000,"signature":"{sig}"}}"#
        );
        session_hello_with(&att, extra)
    }

    fn session_hello_with(attestation: &str, extra: &str) -> String {
        format!(
            r#"{{"type":"session_hello","meshId":"m","parentMemberId":"u","parentMemberPubkey":"{KEY}","sessionPubkey":"{s}","sessionId":"s","pid":12,"cwd":"/w","timestamp":1764200000000,"signature":"{sig}","parentAttestation":{attestation}{extra}}}"#,
            s = "5e".repeat(32),
            sig = "cd".repeat(64),
        )
    }

    #[test]
    fn session_hello_parses_with_the_hello_fields() {
        with_parsed(
            &session_hello(r#","displayName":"cc","capabilities":["peer_events"]"#),
            |parsed| {
                let ClientMessage::SessionHello(s) = parsed.message else {
                    panic!("not a session_hello");
                };
                assert_eq!(s.hello.member_id, "u");
                assert_eq!(s.hello.pubkey, KEY);
                assert_eq!(s.hello.display_name.as_deref(), Some("cc"));
                assert!(s.hello.capabilities.peer_events);
                assert_eq!(s.session_pubkey, "5e".repeat(32));
                assert_eq!(s.attestation.parent_member_pubkey, KEY);
                assert_eq!(s.attestation.expires_at, 1764243200000);
            },
        );
        let att =
            r#"{"sessionPubkey":"5e","parentMemberPubkey":"x","expiresAt":1,"signature":"y"}"#;
        for (json, field) in [
            (
                session_hello("").replace(r#""parentMemberId":"u","#, ""),
                "parentMemberId",
            ),
            (
                session_hello("").replace(&"5e".repeat(32), "5e"),
                "sessionPubkey",
            ),
            (
                session_hello_with(att, ""),
                "parentAttestation.sessionPubkey",
            ),
            (session_hello_with("7", ""), "parentAttestation"),
        ] {
            let error = parse(&json).unwrap_err();
            assert_eq!(error.0, ErrorCode::InvalidField, "{json}");
            assert!(
                error.1.contains(&format!("'{field}'")),
                "{field}: {}",
                error.1
            );
        }
    }

    #[test]
    fn hello_parses_and_ignores_unknown_fields() {
        let out = parse(&hello(r#","extra":[1,2]"#)).unwrap();
        assert!(out.contains("Hello"));
        assert!(out.contains("pid: 12"));
    }

    #[test]
    fn hello_extensions_default_when_absent() {
        with_hello("", |hello| {
            assert_eq!(hello.display_name, None);
            assert!(hello.groups.is_empty());
            assert_eq!(hello.capabilities, Capabilities::default());
            assert_eq!(hello.protocol_version, 1);
        });
        let nulls =
            r#","displayName":null,"groups":null,"capabilities":null,"protocolVersion":null"#;
        with_hello(nulls, |hello| {
            assert_eq!(hello.display_name, None);
            assert!(hello.groups.is_empty());
            assert_eq!(hello.capabilities, Capabilities::default());
            assert_eq!(hello.protocol_version, 1);
        });
    }

    #[test]
    fn hello_extensions() {
        let name = "é".repeat(64);
        let extra = format!(
            r#","displayName":"{name}","groups":[{{"name":"Eng/Backend","role":"lead"}},{{"name":"ops"}},{{"name":"qa","role":null}}],"capabilities":["peer_events","telepathy","client_ack"],"protocolVersion":2,"_reqId":"h1""#
        );
        with_parsed(&hello(&extra), |parsed| {
            assert_eq!(parsed.req_id.as_deref(), Some("h1"));
            let ClientMessage::Hello(hello) = parsed.message else {
                panic!("not a hello");
            };
            assert_eq!(hello.display_name.as_deref(), Some(name.as_str()));
            assert_eq!(
                hello.groups,
                [
                    GroupJoin {
                        name: group("eng/backend"),
                        role: Some("lead".into()),
                    },
                    GroupJoin {
                        name: group("ops"),
                        role: None,
                    },
                    GroupJoin {
                        name: group("qa"),
                        role: None,
                    },
                ]
            );
            assert_eq!(
                hello.capabilities,
                Capabilities {
                    peer_events: true,
                    client_ack: true,
                }
            );
            assert_eq!(hello.protocol_version, 2);
        });
        with_hello(
            r#","capabilities":["client_ack"],"protocolVersion":1"#,
            |hello| {
                assert_eq!(
                    hello.capabilities,
                    Capabilities {
                        peer_events: false,
                        client_ack: true,
                    }
                );
                assert_eq!(hello.protocol_version, 1);
            },
        );
        let most: Vec<String> = (0..64).map(|i| format!(r#"{{"name":"g{i}"}}"#)).collect();
        with_hello(&format!(r#","groups":[{}]"#, most.join(",")), |hello| {
            assert_eq!(hello.groups.len(), 64);
        });
    }

    #[test]
    fn hello_field_errors_name_the_field() {
        let many: Vec<String> = (0..65).map(|i| format!(r#"{{"name":"g{i}"}}"#)).collect();
        let many = format!(r#","groups":[{}]"#, many.join(","));
        let long_name = format!(r#","displayName":"{}""#, "n".repeat(65));
        let long_role = format!(
            r#","groups":[{{"name":"eng","role":"{}"}}]"#,
            "r".repeat(33)
        );
        let cases = [
            (hello("").replace(KEY, "abc"), "pubkey"),
            (hello("").replace(r#""pid":12"#, r#""pid":"12""#), "pid"),
            (hello("").replace(r#""pid":12"#, r#""pid":-1"#), "pid"),
            (hello("").replace(r#""meshId":"m","#, ""), "meshId"),
            (hello("").replace(r#""cwd":"/w""#, r#""cwd":"""#), "cwd"),
            (hello("").replace("1764200000000", "1.5"), "timestamp"),
            (hello("").replace(&"ab".repeat(64), "zz"), "signature"),
            (hello(&long_name), "displayName"),
            (hello(r#","displayName":5"#), "displayName"),
            (hello(r#","groups":{"name":"eng"}"#), "groups"),
            (hello(r#","groups":"eng""#), "groups"),
            (hello(&many), "groups"),
            (hello(r#","groups":["eng"]"#), "groups"),
            (hello(r#","groups":[{"name":"eng"},null]"#), "groups"),
            (hello(r#","groups":[{"role":"x"}]"#), "groups"),
            (hello(&long_role), "groups"),
            (hello(r#","groups":[{"name":"eng","role":1}]"#), "groups"),
            (hello(r#","capabilities":"peer_events""#), "capabilities"),
            (
                hello(r#","capabilities":["peer_events",1]"#),
                "capabilities",
            ),
            (hello(r#","protocolVersion":0"#), "protocolVersion"),
            (hello(r#","protocolVersion":-2"#), "protocolVersion"),
            (hello(r#","protocolVersion":1.5"#), "protocolVersion"),
            (hello(r#","protocolVersion":"2""#), "protocolVersion"),
            (hello(r#","_reqId":5"#), "_reqId"),
        ];
        for (json, field) in cases {
            let (code, message, _, _) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{json}");
            assert!(message.contains(field), "{message} should name {field}");
        }
    }

    /// Found by the `hello_canonical` fuzz target: `m` and `|u` signed the
    /// text `m||u|…`, which is also that of `m|` and `u`.
    #[test]
    fn fuzz_a_bar_in_a_signed_id_is_refused() {
        let json = br#"{"type":"hello","meshId":"m","memberId":"|u","pubkey":"a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90","sessionId":"s","pid":12,"cwd":"/w","timestamp":1 ,"signature":"abababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababab","so":2}"#;
        let (code, message, _, _) = refusal(Parser::default().parse(json).unwrap_err());
        assert_eq!(code, ErrorCode::InvalidField);
        assert_eq!(message, "field 'memberId' must not contain '|'");
        let json = hello("").replace(r#""meshId":"m""#, r#""meshId":"m|""#);
        let (code, message, _, _) = parse(&json).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidField);
        assert_eq!(message, "field 'meshId' must not contain '|'");
    }

    #[test]
    fn a_bad_group_name_in_a_hello_names_groups_and_says_so() {
        for name in ["_eng", "a/b/c/d/e", "", "e ng"] {
            let json = hello(&format!(
                r#","groups":[{{"name":"ok"}},{{"name":"{name}"}}],"_reqId":"r""#
            ));
            let (code, message, _, req_id) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField);
            assert!(message.contains("'groups'"), "{message}");
            assert!(message.contains("entry 1"), "{message}");
            assert!(message.contains("not a valid group name"), "{message}");
            assert_eq!(req_id.as_deref(), Some("r"));
        }
    }

    #[test]
    fn a_later_protocol_is_unsupported_whatever_else_the_hello_says() {
        for version in ["3", "1000", "18446744073709551615"] {
            let json = hello(&format!(r#","protocolVersion":{version},"_reqId":"v""#));
            let (code, message, _, req_id) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::UnsupportedProtocol, "{version}");
            assert!(message.contains(version), "{message}");
            assert_eq!(req_id.as_deref(), Some("v"));
        }
        let json = r#"{"type":"hello","protocolVersion":3}"#;
        assert_eq!(parse(json).unwrap_err().0, ErrorCode::UnsupportedProtocol);
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
        for spec in ["tag:x", "bob", "*x", "all"] {
            let (code, _, id, _) = parse(&plain_send(spec, "")).unwrap_err();
            assert_eq!(code, ErrorCode::UnsupportedTarget, "{spec}");
            assert_eq!(id.as_deref(), Some("s"));
        }
    }

    /// The target and the spec as written of a send.
    fn target_of(json: &str) -> (String, String) {
        let mut out = None;
        with_parsed(json, |parsed| match parsed.message {
            ClientMessage::Send(send) => {
                out = Some((format!("{:?}", send.target), send.target_spec.into_owned()))
            }
            other => panic!("not a send: {other:?}"),
        });
        out.unwrap()
    }

    #[test]
    fn group_targets() {
        let all = format!("{:?}", Target::All);
        for spec in ["*", "@all", "@ALL", "#all"] {
            assert_eq!(target_of(&plain_send(spec, "")), (all.clone(), spec.into()));
        }
        for (spec, name) in [
            ("@eng", "eng"),
            ("#eng", "eng"),
            ("@Eng/Backend", "eng/backend"),
            ("#a/b/c/d", "a/b/c/d"),
            ("@allies", "allies"),
        ] {
            let want = format!("{:?}", Target::Group(group(name)));
            assert_eq!(target_of(&plain_send(spec, "")), (want, spec.into()));
        }
        let member = target_of(&plain_send(KEY, ""));
        assert_eq!(member.0, format!("{:?}", Target::Member(KEY.into())));
        assert_eq!(member.1, KEY);
        // Escaped: through the tree parser, still as written (unescaped).
        let escaped =
            target_of(r#"{"type":"send","targetSpec":"\u0040eng","nonce":"n","ciphertext":"c"}"#);
        assert_eq!(escaped.1, "@eng");
        for spec in ["@", "#", "@_x", "#eng/", "@a/b/c/d/e", "@e ng", "#é"] {
            let (code, message, id, req_id) =
                parse(&plain_send(spec, r#","_reqId":"g""#)).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{spec}");
            assert!(message.contains("targetSpec"), "{message}");
            assert!(message.contains("not a valid group name"), "{message}");
            assert_eq!(id.as_deref(), Some("s"));
            assert_eq!(req_id.as_deref(), Some("g"));
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
            (
                r#"{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c","id":"a","_reqId":[]}"#,
                "_reqId",
            ),
        ];
        for (json, field) in cases {
            let (code, message, id, _) = parse(json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField);
            assert!(message.contains(field), "{message}");
            assert_eq!(id.as_deref(), Some("a"));
        }
        let (code, message, _, _) = parse(r#"{"type":"send","id":5}"#).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(message.contains("id"));
    }

    #[test]
    fn req_id_is_read_and_echoed_by_every_later_error() {
        with_parsed(r#"{"type":"list_peers","_reqId":"a\"b"}"#, |parsed| {
            assert_eq!(parsed.message, ClientMessage::ListPeers);
            assert_eq!(parsed.req_id.as_deref(), Some("a\"b"));
        });
        with_parsed(&plain_send("*", r#","_reqId":"r""#), |parsed| {
            assert_eq!(parsed.req_id.as_deref(), Some("r"));
        });
        with_parsed(&plain_send("*", ""), |parsed| {
            assert_eq!(parsed.req_id, None)
        });
        let wide = "é".repeat(64);
        with_parsed(
            &format!(r#"{{"type":"list_peers","_reqId":"{wide}"}}"#),
            |parsed| assert_eq!(parsed.req_id.as_deref(), Some(wide.as_str())),
        );
        let cases = [
            (
                plain_send("*", r#","priority":"soon","_reqId":"r""#),
                ErrorCode::InvalidField,
                Some("s"),
            ),
            (
                plain_send("tag:x", r#","_reqId":"r""#),
                ErrorCode::UnsupportedTarget,
                Some("s"),
            ),
            (
                r#"{"type":"send","id":5,"_reqId":"r"}"#.to_owned(),
                ErrorCode::InvalidField,
                None,
            ),
            (
                hello(r#","pid":"x","_reqId":"r""#).replace(r#""pid":12,"#, ""),
                ErrorCode::InvalidField,
                None,
            ),
            (
                r#"{"_reqId":"r","type":"dance"}"#.to_owned(),
                ErrorCode::UnknownType,
                None,
            ),
            (
                r#"{"_reqId":"r"}"#.to_owned(),
                ErrorCode::InvalidField,
                None,
            ),
            (
                r#"{"_reqId":"r","type":"set_status","status":"busy"}"#.to_owned(),
                ErrorCode::InvalidField,
                None,
            ),
            (
                r#"{"_reqId":"r","type":"set_summary","summary":1}"#.to_owned(),
                ErrorCode::InvalidField,
                None,
            ),
            (
                r#"{"_reqId":"r","type":"join_group"}"#.to_owned(),
                ErrorCode::InvalidField,
                None,
            ),
        ];
        for (json, code, id) in cases {
            let got = parse(&json).unwrap_err();
            assert_eq!(got.0, code, "{json}");
            assert_eq!(got.2.as_deref(), id, "{json}");
            assert_eq!(got.3.as_deref(), Some("r"), "{json}");
        }
        let long = "x".repeat(65);
        for bad in [format!(r#""{long}""#), "5".to_owned(), "{}".to_owned()] {
            let json = format!(r#"{{"type":"list_peers","_reqId":{bad}}}"#);
            let (code, message, id, req_id) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{json}");
            assert!(message.contains("'_reqId'"), "{message}");
            assert_eq!((id, req_id), (None, None));
        }
        assert_eq!(parse("{nope").unwrap_err().3, None);
    }

    #[test]
    fn nul_is_refused_where_it_would_be_stored() {
        for (json, field) in [
            (
                plain_send("*", r#","nonce":"x\u0000""#).replace(r#""nonce":"n","#, ""),
                "'nonce'",
            ),
            (
                plain_send("*", "").replace(r#""ciphertext":"c""#, r#""ciphertext":"\u0000""#),
                "'ciphertext'",
            ),
            (
                plain_send("*", r#","client_message_id":"a\u0000""#),
                "'client_message_id'",
            ),
            (hello(r#","displayName":"\u0000""#), "'displayName'"),
            (
                hello("").replace(r#""cwd":"/w""#, r#""cwd":"/\u0000""#),
                "'cwd'",
            ),
            (
                r#"{"type":"join_group","name":"ok","role":"\u0000"}"#.to_owned(),
                "'role'",
            ),
            (
                r#"{"type":"audit_query","beforeId":"\u0000"}"#.to_owned(),
                "'beforeId'",
            ),
            (
                r#"{"type":"audit_query","eventType":"\u0000"}"#.to_owned(),
                "'eventType'",
            ),
        ] {
            let (code, message, _, _) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{json}");
            assert!(message.contains(field), "{json}: {message}");
        }
        // Elsewhere it is only text: a summary may hold one.
        assert!(parse(r#"{"type":"set_summary","summary":"a\u0000b"}"#).is_ok());
    }

    #[test]
    fn a_key_the_message_reads_given_twice_is_refused_wherever_it_sits() {
        for (json, key) in [
            (
                r#"{"type":"set_status","status":"busy","status":"idle"}"#.to_owned(),
                "'status'",
            ),
            (
                r#"{"type":"dance","type":"list_peers"}"#.to_owned(),
                "'type'",
            ),
            (
                r#"{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c","nonce":"m"}"#
                    .to_owned(),
                "'nonce'",
            ),
            // Among many keys.
            (
                format!(
                    r#"{{"type":"set_summary",{}"summary":"a","summary":"b"}}"#,
                    (0..40).map(|i| format!(r#""k{i}":1,"#)).collect::<String>()
                ),
                "'summary'",
            ),
            // Inside an entry and inside an object-valued field.
            (
                hello(r#","groups":[{"name":"g","name":"h"}]"#),
                "'groups' entry 0: key 'name'",
            ),
        ] {
            let (code, message, _, _) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::BadJson, "{json}");
            assert!(
                message.contains(key) && message.contains("appears more than once"),
                "{json}: {message}"
            );
        }
        // A repeated key no message reads is ignored like any unknown key,
        // by the tree as by the fast send path.
        let unknown = format!(
            r#"{{"type":"list_peers",{}"k3":1}}"#,
            (0..40).map(|i| format!(r#""k{i}":1,"#)).collect::<String>()
        );
        assert!(parse(&unknown).is_ok());
        assert!(parse(
            r#"{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c","x":1,"x":2}"#
        )
        .is_ok());
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

    fn message_of(json: &str) -> String {
        let mut out = String::new();
        with_parsed(json, |parsed| out = format!("{:?}", parsed.message));
        out
    }

    #[test]
    fn list_peers_and_set_summary() {
        assert_eq!(
            message_of(r#"{"type":"list_peers","extra":1}"#),
            format!("{:?}", ClientMessage::ListPeers)
        );
        let clear = format!("{:?}", ClientMessage::SetSummary(None));
        for json in [
            r#"{"type":"set_summary"}"#,
            r#"{"type":"set_summary","summary":null}"#,
            r#"{"type":"set_summary","summary":""}"#,
        ] {
            assert_eq!(message_of(json), clear, "{json}");
        }
        let most = "é".repeat(1024);
        let json = format!(r#"{{"type":"set_summary","summary":"{most}"}}"#);
        assert_eq!(
            message_of(&json),
            format!(
                "{:?}",
                ClientMessage::SetSummary(Some(most.as_str().into()))
            )
        );
        let over = format!(
            r#"{{"type":"set_summary","summary":"{}"}}"#,
            "x".repeat(1025)
        );
        for json in [
            over.as_str(),
            r#"{"type":"set_summary","summary":5}"#,
            r#"{"type":"set_summary","summary":["x"]}"#,
        ] {
            let (code, message, _, _) = parse(json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField);
            assert!(message.contains("'summary'"), "{message}");
        }
    }

    #[test]
    fn join_and_leave_group() {
        let join = |name: &str, role: Option<&str>| {
            format!(
                "{:?}",
                ClientMessage::JoinGroup(GroupJoin {
                    name: group(name),
                    role: role.map(Cow::Borrowed),
                })
            )
        };
        assert_eq!(
            message_of(r#"{"type":"join_group","name":"Eng/API"}"#),
            join("eng/api", None)
        );
        let role = "r".repeat(32);
        assert_eq!(
            message_of(&format!(
                r#"{{"type":"join_group","name":"ops","role":"{role}"}}"#
            )),
            join("ops", Some(&role))
        );
        assert_eq!(
            message_of(r#"{"type":"join_group","name":"ops","role":null}"#),
            join("ops", None)
        );
        assert_eq!(
            message_of(r#"{"type":"leave_group","name":"OPS"}"#),
            format!("{:?}", ClientMessage::LeaveGroup { name: group("ops") })
        );
        let long_role = format!(
            r#"{{"type":"join_group","name":"ops","role":"{}"}}"#,
            "r".repeat(33)
        );
        let cases = [
            (r#"{"type":"join_group"}"#, "'name'"),
            (r#"{"type":"join_group","name":5}"#, "'name'"),
            (r#"{"type":"join_group","name":"_x"}"#, "'name'"),
            (r#"{"type":"join_group","name":"a/b/c/d/e"}"#, "'name'"),
            (r#"{"type":"join_group","name":"ops","role":5}"#, "'role'"),
            (&long_role, "'role'"),
            (r#"{"type":"leave_group"}"#, "'name'"),
            (r#"{"type":"leave_group","name":"e ng"}"#, "'name'"),
        ];
        for (json, field) in cases {
            let (code, message, _, _) = parse(json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{json}");
            assert!(message.contains(field), "{message} should name {field}");
        }
    }

    /// The `client_message_id` of a send.
    fn client_message_id_of(json: &str) -> Option<String> {
        let mut out = None;
        with_parsed(json, |parsed| match parsed.message {
            ClientMessage::Send(send) => out = send.client_message_id.map(Cow::into_owned),
            other => panic!("not a send: {other:?}"),
        });
        out
    }

    #[test]
    fn send_client_message_id() {
        assert_eq!(client_message_id_of(&plain_send("*", "")), None);
        assert_eq!(
            client_message_id_of(&plain_send("*", r#","client_message_id":"c-1""#)),
            Some("c-1".into())
        );
        // Escaped: through the tree parser, unescaped.
        assert_eq!(
            client_message_id_of(&plain_send("@eng", r#","client_message_id":"a\"\u00e9""#)),
            Some("a\"é".into())
        );
        let most = "é".repeat(128);
        assert_eq!(
            client_message_id_of(&plain_send(
                KEY,
                &format!(r#","client_message_id":"{most}""#)
            )),
            Some(most)
        );
        for absent in [r#","client_message_id":null"#, r#","client_message_id":"""#] {
            assert_eq!(
                client_message_id_of(&plain_send("*", absent)),
                None,
                "{absent}"
            );
        }
        let long = format!(r#","client_message_id":"{}","_reqId":"q""#, "x".repeat(129));
        for extra in [
            long.as_str(),
            r#","client_message_id":5,"_reqId":"q""#,
            r#","client_message_id":{},"_reqId":"q""#,
        ] {
            let (code, message, id, req_id) = parse(&plain_send("*", extra)).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{extra}");
            assert!(message.contains("'client_message_id'"), "{message}");
            assert_eq!(id.as_deref(), Some("s"), "{extra}");
            assert_eq!(req_id.as_deref(), Some("q"), "{extra}");
        }
        let (_, message, _, _) = parse(&plain_send("*", &long)).unwrap_err();
        assert!(message.contains("at most 128 characters"), "{message}");
    }

    /// The ids of a client_ack, and its `_reqId`.
    fn acked(json: &str) -> (Vec<String>, Option<String>) {
        let mut out = None;
        with_parsed(json, |parsed| match parsed.message {
            ClientMessage::ClientAck(ids) => {
                out = Some((
                    ids.into_iter().map(Cow::into_owned).collect(),
                    parsed.req_id.map(Cow::into_owned),
                ))
            }
            other => panic!("not a client_ack: {other:?}"),
        });
        out.unwrap()
    }

    #[test]
    fn client_ack_takes_one_id_or_many() {
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            acked(r#"{"type":"client_ack","messageId":"m1"}"#),
            (ids(&["m1"]), None)
        );
        assert_eq!(
            acked(r#"{"type":"client_ack","brokerMessageId":"m\"2","_reqId":"r"}"#),
            (ids(&["m\"2"]), Some("r".into()))
        );
        // A null counts as absent, like every optional field.
        assert_eq!(
            acked(r#"{"type":"client_ack","messageId":null,"messageIds":["a","b","a"],"x":1}"#),
            (ids(&["a", "b", "a"]), None)
        );
        let most: Vec<String> = (0..MAX_CLIENT_ACK_IDS).map(|i| format!("m{i}")).collect();
        let json = format!(
            r#"{{"type":"client_ack","messageIds":{}}}"#,
            serde_json::to_string(&most).unwrap()
        );
        assert_eq!(acked(&json), (most, None));
    }

    #[test]
    fn client_ack_errors_name_the_field_and_echo_the_req_id() {
        let over: Vec<String> = (0..=MAX_CLIENT_ACK_IDS).map(|i| format!("m{i}")).collect();
        let over = format!(r#","messageIds":{}"#, serde_json::to_string(&over).unwrap());
        let cases = [
            ("", "'messageId' is required"),
            (r#","messageId":null"#, "'messageId' is required"),
            (r#","messageId":5"#, "'messageId' must be a string"),
            (
                r#","brokerMessageId":["m"]"#,
                "'brokerMessageId' must be a string",
            ),
            (
                r#","messageId":"a","brokerMessageId":"a""#,
                "'brokerMessageId'",
            ),
            (r#","messageId":"a","messageIds":["b"]"#, "'messageIds'"),
            (
                r#","brokerMessageId":"a","messageIds":["b"]"#,
                "'messageIds'",
            ),
            (
                r#","messageIds":[]"#,
                "'messageIds' must have from 1 to 1000",
            ),
            (over.as_str(), "'messageIds' must have from 1 to 1000"),
            (r#","messageIds":"m1""#, "'messageIds' must be an array"),
            (
                r#","messageIds":{"0":"m1"}"#,
                "'messageIds' must be an array",
            ),
            (
                r#","messageIds":["m1",2]"#,
                "'messageIds' entry 1 is not a string",
            ),
            (
                r#","messageIds":[null]"#,
                "'messageIds' entry 0 is not a string",
            ),
        ];
        for (extra, want) in cases {
            let json = format!(r#"{{"type":"client_ack","_reqId":"r"{extra}}}"#);
            let (code, message, id, req_id) = parse(&json).unwrap_err();
            assert_eq!(code, ErrorCode::InvalidField, "{json}");
            assert!(message.contains(want), "{message} should say {want}");
            assert_eq!(id, None, "{json}");
            assert_eq!(req_id.as_deref(), Some("r"), "{json}");
        }
        // A bad _reqId is reported as itself, with nothing to echo.
        let (code, message, _, req_id) =
            parse(r#"{"type":"client_ack","messageId":"m","_reqId":5}"#).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(message.contains("'_reqId'"), "{message}");
        assert_eq!(req_id, None);
    }
}
