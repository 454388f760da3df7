//! The audit trail (PROTOCOL.md §8, `mesh.audit_log`): what happened in a
//! mesh, by whom, to whom. Metadata only: no constructor takes a nonce or a
//! ciphertext, and a send is described by its message id, target, priority,
//! size and recipient count.
//!
//! An event is built where it happens (a shard's loop, the send and
//! delivery path) from what is already at hand: `Arc` handles to the mesh
//! and members (no string copies) and a few small ids. Its metadata JSON is
//! rendered later, on the db thread (`db::audit`), never on a shard.
//!
//! The hash chain of PROTOCOL.md §13 is made where rows are written
//! (`db::audit`, `db::chain`): metadata is rendered canonical here (keys
//! sorted, no whitespace, see [`AuditEvent::render_metadata`]), which is
//! the form the chain hashes.
use crate::hook::Status;
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::{Envelope, EnvelopeTarget};
use crate::protocol::CloseReason;
use crate::protocol::{ErrorCode, Priority, ProtocolError};
use crate::status::Source;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

/// Longest member id a refused hello may put in a row: the id is the
/// client's claim, not a known member, and must not let it write large rows.
const MAX_CLAIMED_ID: usize = 128;

/// Who acted (`actor_peer_id`).
pub(crate) enum Actor {
    Member(Arc<MemberEntry>),
    /// The member id a refused hello named, which may be no member at all
    /// (cut at [`MAX_CLAIMED_ID`] bytes).
    Claimed(Box<str>),
}

impl Actor {
    pub(crate) fn id(&self) -> &str {
        match self {
            Actor::Member(member) => &member.id,
            Actor::Claimed(id) => id,
        }
    }

    fn claimed(id: &str) -> Actor {
        Actor::Claimed(client_str(id))
    }
}

/// Where in a session an error was answered, for `rejected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// A refused hello (the connection closes).
    Hello,
    /// A message of a joined session (it stays open).
    Message,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Hello => "hello",
            Stage::Message => "message",
        }
    }
}

/// Every `event_type`, in the order of their bits in an [`AuditSelection`].
pub const EVENT_TYPES: [&str; 15] = [
    "connect",
    "disconnect",
    "send",
    "deliver",
    "held",
    "expired",
    "rejected",
    "hook_status",
    "status_change",
    "resume",
    "group_join",
    "group_leave",
    "redelivered",
    "client_ack",
    "member_joined",
];

/// Which event types are recorded (`AUDIT_EVENTS`): an operator whose
/// meshes send more than Postgres can audit may leave out the per-message
/// ones (`send`, `held`, `deliver`), which cost a row each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSelection(u16);

impl AuditSelection {
    pub const ALL: AuditSelection = AuditSelection((1 << EVENT_TYPES.len()) - 1);

    /// `all`, `none`, or a comma-separated list of event types.
    pub fn parse(text: &str) -> Option<AuditSelection> {
        match text.trim() {
            "all" => return Some(Self::ALL),
            "none" => return Some(AuditSelection(0)),
            _ => {}
        }
        let mut bits = 0;
        for name in text.split(',').map(str::trim) {
            let index = EVENT_TYPES.iter().position(|t| *t == name)?;
            bits |= 1 << index;
        }
        Some(AuditSelection(bits))
    }

    pub fn records(self, event_type: &str) -> bool {
        EVENT_TYPES
            .iter()
            .position(|t| *t == event_type)
            .is_some_and(|index| self.0 & (1 << index) != 0)
    }

    /// As `parse` reads it, for the `broker listening` line.
    pub fn describe(self) -> String {
        match self {
            Self::ALL => "all".to_owned(),
            AuditSelection(0) => "none".to_owned(),
            AuditSelection(bits) => EVENT_TYPES
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, t)| *t)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// What happened, with the metadata each event type records.
pub(crate) enum AuditKind {
    /// A hello was acknowledged.
    Connect {
        presence_id: Box<str>,
        session_id: Box<str>,
        pid: i32,
    },
    /// A hello took over a session in its grace, or a live one it replaced
    /// (PROTOCOL.md §9).
    Resume {
        presence_id: Box<str>,
        session_id: Box<str>,
        replaced: bool,
    },
    /// The member joined a group, or changed its role there.
    GroupJoin {
        name: Box<str>,
        role: Option<Box<str>>,
    },
    /// The member left a group.
    GroupLeave { name: Box<str> },
    /// A joined session's connection ended.
    Disconnect {
        presence_id: Box<str>,
        reason: CloseReason,
    },
    /// A send was accepted; the event's target is the member for a direct
    /// send, none for `*` and groups (whose target spec it keeps).
    Send {
        message_id: Box<str>,
        many: Option<Box<str>>,
        priority: Priority,
        /// Bytes of the push frame.
        size: u32,
        recipients: u32,
    },
    /// An envelope reached the event's target member.
    Deliver {
        message_id: Box<str>,
        priority: Priority,
    },
    /// An envelope waits for the event's target member.
    Held {
        message_id: Box<str>,
        priority: Priority,
    },
    /// A held envelope's time ran out before the target member took it.
    Expired {
        message_id: Box<str>,
        priority: Priority,
    },
    /// An envelope whose lease lapsed unacked was pushed again to the
    /// event's target member (PROTOCOL.md §11).
    Redelivered {
        message_id: Box<str>,
        priority: Priority,
    },
    /// The member acknowledged a push leased to it (§11).
    ClientAck { message_id: Box<str> },
    /// The member enrolled with an invite (`POST /join`, §12), with the
    /// role the invite gave it.
    MemberJoined { role: &'static str },
    /// An error answered a hello or a message; `request_id` is the `id`
    /// the error echoes.
    Rejected {
        code: ErrorCode,
        stage: Stage,
        request_id: Option<Box<str>>,
    },
    /// A hook signal reached a live session (whether the §5 rule let it
    /// change the status shows in a `status_change` after it).
    HookStatus {
        presence_id: Box<str>,
        status: Status,
    },
    /// A session's status changed, from any source.
    StatusChange {
        presence_id: Box<str>,
        from: Status,
        to: Status,
        source: Source,
    },
}

impl AuditKind {
    /// `mesh.audit_log.event_type`.
    pub(crate) fn event_type(&self) -> &'static str {
        match self {
            AuditKind::Connect { .. } => "connect",
            AuditKind::Resume { .. } => "resume",
            AuditKind::GroupJoin { .. } => "group_join",
            AuditKind::GroupLeave { .. } => "group_leave",
            AuditKind::Disconnect { .. } => "disconnect",
            AuditKind::Send { .. } => "send",
            AuditKind::Deliver { .. } => "deliver",
            AuditKind::Held { .. } => "held",
            AuditKind::Expired { .. } => "expired",
            AuditKind::Redelivered { .. } => "redelivered",
            AuditKind::ClientAck { .. } => "client_ack",
            AuditKind::MemberJoined { .. } => "member_joined",
            AuditKind::Rejected { .. } => "rejected",
            AuditKind::HookStatus { .. } => "hook_status",
            AuditKind::StatusChange { .. } => "status_change",
        }
    }
}

/// One `mesh.audit_log` row before it has an id (the audit writer gives it
/// one when it accepts it).
pub(crate) struct AuditEvent {
    pub(crate) mesh: Arc<MeshEntry>,
    pub(crate) actor: Option<Actor>,
    pub(crate) target: Option<Arc<MemberEntry>>,
    pub(crate) at: SystemTime,
    pub(crate) kind: AuditKind,
}

impl AuditEvent {
    fn new(
        mesh: &Arc<MeshEntry>,
        actor: Option<Actor>,
        target: Option<&Arc<MemberEntry>>,
        kind: AuditKind,
    ) -> Self {
        AuditEvent {
            mesh: mesh.clone(),
            actor,
            target: target.cloned(),
            at: SystemTime::now(),
            kind,
        }
    }

    fn by_member(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        target: Option<&Arc<MemberEntry>>,
        kind: AuditKind,
    ) -> Self {
        Self::new(mesh, Some(Actor::Member(member.clone())), target, kind)
    }

    /// The envelope's sender as actor, `target` as target.
    fn of_envelope(
        envelope: &Envelope,
        target: Option<&Arc<MemberEntry>>,
        kind: AuditKind,
    ) -> Self {
        Self::by_member(&envelope.mesh, &envelope.sender, target, kind)
    }

    pub(crate) fn connect(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        presence_id: &str,
        session_id: &str,
        pid: i32,
    ) -> Self {
        let kind = AuditKind::Connect {
            presence_id: presence_id.into(),
            session_id: session_id.into(),
            pid,
        };
        Self::by_member(mesh, member, None, kind)
    }

    pub(crate) fn disconnect(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        presence_id: &str,
        reason: CloseReason,
    ) -> Self {
        let kind = AuditKind::Disconnect {
            presence_id: presence_id.into(),
            reason,
        };
        Self::by_member(mesh, member, None, kind)
    }

    /// A hello took over `presence_id` (in its grace, or `replaced` live).
    pub(crate) fn resume(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        presence_id: &str,
        session_id: &str,
        replaced: bool,
    ) -> Self {
        let kind = AuditKind::Resume {
            presence_id: presence_id.into(),
            session_id: client_str(session_id),
            replaced,
        };
        Self::by_member(mesh, member, None, kind)
    }

    pub(crate) fn group_join(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        name: &str,
        role: Option<&str>,
    ) -> Self {
        let kind = AuditKind::GroupJoin {
            name: name.into(),
            role: role.map(client_str),
        };
        Self::by_member(mesh, member, None, kind)
    }

    pub(crate) fn group_leave(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        name: &str,
    ) -> Self {
        let kind = AuditKind::GroupLeave { name: name.into() };
        Self::by_member(mesh, member, None, kind)
    }

    /// A send accepted for `recipients` members (live or held).
    pub(crate) fn send(envelope: &Envelope, recipients: u32) -> Self {
        let (target, many) = match &envelope.target {
            EnvelopeTarget::Member(member) => (Some(member), None),
            EnvelopeTarget::Many(spec) => (None, Some(client_str(spec))),
        };
        let kind = AuditKind::Send {
            message_id: envelope.message_id.clone(),
            many,
            priority: envelope.priority,
            size: u32::try_from(envelope.frame.len()).unwrap_or(u32::MAX),
            recipients,
        };
        Self::of_envelope(envelope, target, kind)
    }

    /// `envelope` reached `member` (one of its sessions).
    pub(crate) fn deliver(envelope: &Envelope, member: &Arc<MemberEntry>) -> Self {
        let kind = AuditKind::Deliver {
            message_id: envelope.message_id.clone(),
            priority: envelope.priority,
        };
        Self::of_envelope(envelope, Some(member), kind)
    }

    /// `envelope` is held for `member`.
    pub(crate) fn held(envelope: &Envelope, member: &Arc<MemberEntry>) -> Self {
        let kind = AuditKind::Held {
            message_id: envelope.message_id.clone(),
            priority: envelope.priority,
        };
        Self::of_envelope(envelope, Some(member), kind)
    }

    /// `envelope`, held for `member`, expired.
    pub(crate) fn expired(envelope: &Envelope, member: &Arc<MemberEntry>) -> Self {
        let kind = AuditKind::Expired {
            message_id: envelope.message_id.clone(),
            priority: envelope.priority,
        };
        Self::of_envelope(envelope, Some(member), kind)
    }

    /// `envelope`'s lease to `member` lapsed: it goes back to the member's
    /// held queue, to be pushed again.
    pub(crate) fn redelivered(envelope: &Envelope, member: &Arc<MemberEntry>) -> Self {
        let kind = AuditKind::Redelivered {
            message_id: envelope.message_id.clone(),
            priority: envelope.priority,
        };
        Self::of_envelope(envelope, Some(member), kind)
    }

    /// A session of `member` acknowledged `message_id`, leased to it. The
    /// id is as the client wrote it (capped like every client string).
    pub(crate) fn client_ack(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        message_id: &str,
    ) -> Self {
        let kind = AuditKind::ClientAck {
            message_id: client_str(message_id),
        };
        Self::by_member(mesh, member, None, kind)
    }

    /// `member` was inserted by `POST /join` with `role` (`admin` or
    /// `member`); it is the actor, and its id is in the metadata too.
    pub(crate) fn member_joined(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        role: &'static str,
    ) -> Self {
        Self::by_member(mesh, member, None, AuditKind::MemberJoined { role })
    }

    /// `error` answered a message of `member`'s joined session.
    pub(crate) fn rejected(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        error: &ProtocolError,
    ) -> Self {
        let kind = AuditKind::Rejected {
            code: error.code,
            stage: Stage::Message,
            request_id: error.id.as_deref().map(client_str),
        };
        Self::by_member(mesh, member, None, kind)
    }

    /// A hello naming `member_id` in `mesh` (a mesh the directory knows)
    /// was refused with `code`.
    pub(crate) fn hello_refused(mesh: &Arc<MeshEntry>, member_id: &str, code: ErrorCode) -> Self {
        let actor = match mesh.view().member(member_id) {
            Some(member) => Actor::Member(member.clone()),
            None => Actor::claimed(member_id),
        };
        let kind = AuditKind::Rejected {
            code,
            stage: Stage::Hello,
            request_id: None,
        };
        Self::new(mesh, Some(actor), None, kind)
    }

    pub(crate) fn hook_status(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        presence_id: &str,
        status: Status,
    ) -> Self {
        let kind = AuditKind::HookStatus {
            presence_id: presence_id.into(),
            status,
        };
        Self::by_member(mesh, member, None, kind)
    }

    pub(crate) fn status_change(
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        presence_id: &str,
        from: Status,
        to: Status,
        source: Source,
    ) -> Self {
        let kind = AuditKind::StatusChange {
            presence_id: presence_id.into(),
            from,
            to,
            source,
        };
        Self::by_member(mesh, member, None, kind)
    }

    pub(crate) fn mesh_id(&self) -> &str {
        &self.mesh.id
    }

    pub(crate) fn actor_id(&self) -> Option<&str> {
        self.actor.as_ref().map(Actor::id)
    }

    pub(crate) fn target_id(&self) -> Option<&str> {
        self.target.as_deref().map(|m| &*m.id)
    }

    /// Appends the metadata as canonical JSON (keys sorted bytewise at every
    /// level, no whitespace): what `mesh.audit_log.metadata` holds, and
    /// what §13's hash is computed over (`db::chain::canonical_json` of the
    /// stored jsonb gives back the same text).
    pub(crate) fn render_metadata(&self, out: &mut String) {
        let mut o = Object::open(out);
        match &self.kind {
            AuditKind::Connect {
                presence_id,
                session_id,
                pid,
            } => {
                o.int("pid", i64::from(*pid));
                o.str("presenceId", presence_id);
                o.str("sessionId", session_id);
            }
            AuditKind::Resume {
                presence_id,
                session_id,
                replaced,
            } => {
                o.str("presenceId", presence_id);
                o.bool("replaced", *replaced);
                o.str("sessionId", session_id);
            }
            AuditKind::GroupJoin { name, role } => {
                o.str("name", name);
                if let Some(role) = role {
                    o.str("role", role);
                }
            }
            AuditKind::GroupLeave { name } => o.str("name", name),
            AuditKind::Disconnect {
                presence_id,
                reason,
            } => {
                o.int("code", i64::from(reason.code()));
                o.str("presenceId", presence_id);
                o.str("reason", reason.as_str());
            }
            AuditKind::Send {
                message_id,
                many,
                priority,
                size,
                recipients,
            } => {
                o.str("messageId", message_id);
                o.str("priority", priority.as_str());
                o.int("recipients", i64::from(*recipients));
                o.int("size", i64::from(*size));
                let spec = match (&self.target, many) {
                    (Some(member), _) => &*member.pubkey,
                    (None, Some(spec)) => spec,
                    (None, None) => "*",
                };
                o.str("targetSpec", spec);
            }
            AuditKind::Deliver {
                message_id,
                priority,
            }
            | AuditKind::Held {
                message_id,
                priority,
            }
            | AuditKind::Expired {
                message_id,
                priority,
            }
            | AuditKind::Redelivered {
                message_id,
                priority,
            } => {
                o.str("messageId", message_id);
                o.str("priority", priority.as_str());
            }
            AuditKind::ClientAck { message_id } => o.str("messageId", message_id),
            AuditKind::MemberJoined { role } => {
                let member = self.actor.as_ref().map(Actor::id).unwrap_or_default();
                o.str("memberId", member);
                o.str("role", role);
            }
            AuditKind::Rejected {
                code,
                stage,
                request_id,
            } => {
                o.str("code", code.as_str());
                if let Some(id) = request_id {
                    o.str("requestId", id);
                }
                o.str("stage", stage.as_str());
            }
            AuditKind::HookStatus {
                presence_id,
                status,
            } => {
                o.str("presenceId", presence_id);
                o.str("status", status.as_str());
            }
            AuditKind::StatusChange {
                presence_id,
                from,
                to,
                source,
            } => {
                o.str("from", from.as_str());
                o.str("presenceId", presence_id);
                o.str("source", source.as_str());
                o.str("status", to.as_str());
            }
        }
        o.close();
    }
}

/// A client-given id for a row: cut at [`MAX_CLAIMED_ID`] bytes, and NUL
/// (which Postgres text cannot hold) replaced.
fn client_str(id: &str) -> Box<str> {
    let mut end = id.len().min(MAX_CLAIMED_ID);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id[..end].replace('\0', "\u{fffd}").into_boxed_str()
}

/// A flat JSON object written in place; keys must come in sorted order
/// (checked in debug builds), which keeps the output canonical.
struct Object<'a> {
    out: &'a mut String,
    last: &'static str,
    first: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut String) -> Self {
        out.push('{');
        Object {
            out,
            last: "",
            first: true,
        }
    }

    fn key(&mut self, key: &'static str) {
        debug_assert!(self.first || key > self.last, "{key} after {}", self.last);
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.last = key;
        write_json_str(self.out, key);
        self.out.push(':');
    }

    fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        write_json_str(self.out, value);
    }

    fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn int(&mut self, key: &'static str, value: i64) {
        self.key(key);
        let _ = write!(self.out, "{value}");
    }

    fn close(self) {
        self.out.push('}');
    }
}

/// A JSON string. NUL becomes U+FFFD: jsonb refuses `\u0000`, and one
/// client-sent NUL must not cost its batch.
fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\0' => out.push('\u{fffd}'),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_select_by_type() {
        assert_eq!(AuditSelection::parse("all"), Some(AuditSelection::ALL));
        let none = AuditSelection::parse("none").unwrap();
        assert!(EVENT_TYPES.iter().all(|t| !none.records(t)));
        let some = AuditSelection::parse("connect, disconnect,rejected").unwrap();
        assert!(some.records("connect") && some.records("rejected"));
        assert!(!some.records("send") && !some.records("held"));
        assert_eq!(some.describe(), "connect,disconnect,rejected");
        assert_eq!(AuditSelection::parse("connect,sends"), None);
        assert_eq!(AuditSelection::ALL.describe(), "all");
    }
    use crate::mesh::directory::{Directory, MemberRow};
    use serde_json::{json, Value};
    use std::time::Instant;

    const SENDER_KEY: &str = "aa11";
    const TARGET_KEY: &str = "bb22";

    fn mesh() -> Arc<MeshEntry> {
        let rows = [("alice", SENDER_KEY), ("bob", TARGET_KEY)].map(|(id, key)| MemberRow {
            id: id.into(),
            peer_pubkey: key.into(),
            revoked: false,
            ..MemberRow::default()
        });
        Directory::default().install("mesh-1", &rows)
    }

    fn member(mesh: &MeshEntry, id: &str) -> Arc<MemberEntry> {
        mesh.view().member(id).unwrap().clone()
    }

    const NONCE: &str = "NONCE-never-in-audit";
    const CIPHERTEXT: &str = "CIPHERTEXT-never-in-audit";

    fn envelope(mesh: &Arc<MeshEntry>, target: EnvelopeTarget) -> Envelope {
        let frame = format!(r#"{{"nonce":"{NONCE}","ciphertext":"{CIPHERTEXT}"}}"#);
        Envelope {
            message_id: "msg-1".into(),
            mesh: mesh.clone(),
            sender: member(mesh, "alice"),
            target,
            priority: Priority::Next,
            created_at: SystemTime::now(),
            expires_at: SystemTime::now(),
            nonce: 10..30,
            ciphertext: 44..69,
            frame: bytes::Bytes::from(frame),
            sent_at: Instant::now(),
            restored: false,
            holds_in_flight: Default::default(),
            redelivered_frame: Default::default(),
            client_message_id: None,
        }
    }

    /// The rendered metadata, checked to be canonical: valid JSON whose
    /// re-serialization (serde_json sorts object keys) is byte-identical.
    fn metadata(event: &AuditEvent) -> Value {
        let mut out = String::new();
        event.render_metadata(&mut out);
        let value: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
        assert_eq!(serde_json::to_string(&value).unwrap(), out, "not canonical");
        // … and what the chain's verifier makes of the stored jsonb.
        assert_eq!(crate::db::chain::canonical_json(&value), out);
        assert!(!out.contains(NONCE) && !out.contains(CIPHERTEXT), "{out}");
        value
    }

    #[test]
    fn session_events_render_their_fields() {
        let mesh = mesh();
        let alice = member(&mesh, "alice");
        let connect = AuditEvent::connect(&mesh, &alice, "p1", "sess-1", 4242);
        assert_eq!(connect.kind.event_type(), "connect");
        assert_eq!(
            (connect.mesh_id(), connect.actor_id(), connect.target_id()),
            ("mesh-1", Some("alice"), None)
        );
        assert_eq!(
            metadata(&connect),
            json!({"pid": 4242, "presenceId": "p1", "sessionId": "sess-1"})
        );

        let gone = AuditEvent::disconnect(&mesh, &alice, "p1", CloseReason::SlowReader);
        assert_eq!(gone.kind.event_type(), "disconnect");
        assert_eq!(
            metadata(&gone),
            json!({"code": 1013, "presenceId": "p1", "reason": "slow_reader"})
        );

        let hook = AuditEvent::hook_status(&mesh, &alice, "p1", Status::Working);
        assert_eq!(hook.kind.event_type(), "hook_status");
        assert_eq!(
            metadata(&hook),
            json!({"presenceId": "p1", "status": "working"})
        );

        let change = AuditEvent::status_change(
            &mesh,
            &alice,
            "p1",
            Status::Idle,
            Status::Dnd,
            Source::Manual,
        );
        assert_eq!(change.kind.event_type(), "status_change");
        assert_eq!(
            metadata(&change),
            json!({"from": "idle", "presenceId": "p1", "source": "manual", "status": "dnd"})
        );
    }

    #[test]
    fn envelope_events_carry_metadata_never_the_payload() {
        let mesh = mesh();
        let bob = member(&mesh, "bob");
        let direct = envelope(&mesh, EnvelopeTarget::Member(bob.clone()));
        let size = direct.frame.len() as u64;
        let send = AuditEvent::send(&direct, 1);
        assert_eq!(send.kind.event_type(), "send");
        assert_eq!(
            (send.actor_id(), send.target_id()),
            (Some("alice"), Some("bob"))
        );
        assert_eq!(
            metadata(&send),
            json!({"messageId": "msg-1", "priority": "next", "recipients": 1,
                   "size": size, "targetSpec": TARGET_KEY})
        );

        let all = envelope(&mesh, EnvelopeTarget::Many("*".into()));
        let broadcast = AuditEvent::send(&all, 7);
        assert_eq!(broadcast.target_id(), None);
        assert_eq!(metadata(&broadcast)["targetSpec"], "*");
        assert_eq!(metadata(&broadcast)["recipients"], 7);

        for (event, kind) in [
            (AuditEvent::deliver(&all, &bob), "deliver"),
            (AuditEvent::held(&all, &bob), "held"),
            (AuditEvent::expired(&all, &bob), "expired"),
            (AuditEvent::redelivered(&all, &bob), "redelivered"),
            (AuditEvent::redelivered(&direct, &bob), "redelivered"),
        ] {
            assert_eq!(event.kind.event_type(), kind);
            assert_eq!(
                (event.actor_id(), event.target_id()),
                (Some("alice"), Some("bob"))
            );
            assert_eq!(
                metadata(&event),
                json!({"messageId": "msg-1", "priority": "next"})
            );
        }
    }

    #[test]
    fn client_ack_is_the_acking_member_and_the_id() {
        let mesh = mesh();
        let bob = member(&mesh, "bob");
        let ack = AuditEvent::client_ack(&mesh, &bob, "msg-1");
        assert_eq!(ack.kind.event_type(), "client_ack");
        assert_eq!(
            (ack.mesh_id(), ack.actor_id(), ack.target_id()),
            ("mesh-1", Some("bob"), None)
        );
        assert_eq!(metadata(&ack), json!({"messageId": "msg-1"}));
        // The id comes from the client: capped and free of NUL.
        let id_of = |id: &str| {
            metadata(&AuditEvent::client_ack(&mesh, &bob, id))["messageId"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let long = id_of(&"é".repeat(100));
        assert!(long.len() <= MAX_CLAIMED_ID && long.chars().all(|c| c == 'é'));
        assert_eq!(id_of("a\"\0b"), "a\"\u{fffd}b");
    }

    #[test]
    fn the_ack_events_are_selectable_by_name() {
        let some = AuditSelection::parse("redelivered,client_ack").unwrap();
        assert!(some.records("redelivered") && some.records("client_ack"));
        assert!(!some.records("deliver") && !some.records("send"));
        assert_eq!(some.describe(), "redelivered,client_ack");
        assert!(AuditSelection::ALL.records("redelivered"));
        assert!(AuditSelection::ALL.records("client_ack"));
    }

    #[test]
    fn member_joined_is_the_new_member_with_its_role() {
        let mesh = mesh();
        let bob = member(&mesh, "bob");
        let joined = AuditEvent::member_joined(&mesh, &bob, "admin");
        assert_eq!(joined.kind.event_type(), "member_joined");
        assert_eq!(
            (joined.mesh_id(), joined.actor_id(), joined.target_id()),
            ("mesh-1", Some("bob"), None)
        );
        assert_eq!(
            metadata(&joined),
            json!({"memberId": "bob", "role": "admin"})
        );
        let some = AuditSelection::parse("member_joined").unwrap();
        assert!(some.records("member_joined") && !some.records("connect"));
        assert!(AuditSelection::ALL.records("member_joined"));
    }

    #[test]
    fn rejections_name_code_stage_and_request() {
        let mesh = mesh();
        let alice = member(&mesh, "alice");
        let error = ProtocolError::new(ErrorCode::UnknownTarget, "no").with_id(Some("req-9"));
        let rejected = AuditEvent::rejected(&mesh, &alice, &error);
        assert_eq!(rejected.kind.event_type(), "rejected");
        assert_eq!(
            metadata(&rejected),
            json!({"code": "unknown_target", "requestId": "req-9", "stage": "message"})
        );
        let bare = ProtocolError::new(ErrorCode::BadJson, "no");
        assert_eq!(
            metadata(&AuditEvent::rejected(&mesh, &alice, &bare)),
            json!({"code": "bad_json", "stage": "message"})
        );

        let known = AuditEvent::hello_refused(&mesh, "alice", ErrorCode::Capacity);
        assert!(matches!(known.actor, Some(Actor::Member(_))));
        assert_eq!(
            metadata(&known),
            json!({"code": "capacity", "stage": "hello"})
        );
        let stranger = AuditEvent::hello_refused(&mesh, "mallory", ErrorCode::Unauthorized);
        assert_eq!(stranger.actor_id(), Some("mallory"));
    }

    #[test]
    fn client_strings_are_escaped_capped_and_free_of_nul() {
        let mesh = mesh();
        let alice = member(&mesh, "alice");
        let odd = "a\"b\\c\nd\u{1}e\0f\u{e9}";
        let connect = AuditEvent::connect(&mesh, &alice, "p1", odd, 1);
        assert_eq!(
            metadata(&connect)["sessionId"],
            "a\"b\\c\nd\u{1}e\u{fffd}f\u{e9}"
        );
        let long = "é".repeat(100);
        let refused = AuditEvent::hello_refused(&mesh, &long, ErrorCode::Unauthorized);
        let id = refused.actor_id().unwrap();
        assert!(id.len() <= MAX_CLAIMED_ID && id.chars().all(|c| c == 'é'));
        let nul = AuditEvent::hello_refused(&mesh, "x\0y", ErrorCode::Unauthorized);
        assert_eq!(nul.actor_id(), Some("x\u{fffd}y"));
    }
}
