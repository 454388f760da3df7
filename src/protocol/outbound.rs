//! Server → client messages, written by hand into a byte buffer (see mod.rs).
use super::{Capabilities, ErrorCode, Priority};

/// The fields of a `push`, borrowed from the send that caused it.
pub struct PushFields<'a> {
    pub message_id: &'a str,
    pub mesh_id: &'a str,
    /// The sending session's key: its own for a `session_hello` session,
    /// else its member's (PROTOCOL.md §9).
    pub sender_pubkey: &'a str,
    /// The sending member's key.
    pub sender_member_pubkey: &'a str,
    /// The send's `targetSpec` as written, for every non-direct send
    /// (PROTOCOL.md §10); `None` for a direct one.
    pub target_spec: Option<&'a str>,
    pub priority: Priority,
    /// The send's `client_message_id` (PROTOCOL.md §11), passed through on
    /// every push of the envelope; `None` when it had none.
    pub client_message_id: Option<&'a str>,
    pub nonce: &'a str,
    pub ciphertext: &'a str,
    pub created_at: &'a str,
}

/// Where the nonce and the ciphertext (JSON-escaped, without quotes) were
/// written in `out`, so a held envelope reaches them without a copy.
pub struct PushRanges {
    pub nonce: std::ops::Range<usize>,
    pub ciphertext: std::ops::Range<usize>,
}

pub fn write_push(out: &mut Vec<u8>, push: &PushFields<'_>) -> PushRanges {
    let spec_len = push.target_spec.map_or(0, |spec| 16 + spec.len());
    let client_id_len = push.client_message_id.map_or(0, |id| 24 + id.len());
    out.reserve(250 + spec_len + client_id_len + push.nonce.len() + push.ciphertext.len());
    out.extend_from_slice(b"{\"type\":\"push\",\"messageId\":");
    write_str(out, push.message_id);
    out.extend_from_slice(b",\"meshId\":");
    write_str(out, push.mesh_id);
    out.extend_from_slice(b",\"senderPubkey\":");
    write_str(out, push.sender_pubkey);
    out.extend_from_slice(b",\"senderMemberPubkey\":");
    write_str(out, push.sender_member_pubkey);
    if let Some(spec) = push.target_spec {
        out.extend_from_slice(b",\"targetSpec\":");
        write_str(out, spec);
    }
    out.extend_from_slice(b",\"priority\":\"");
    out.extend_from_slice(push.priority.as_str().as_bytes());
    out.push(b'"');
    if let Some(id) = push.client_message_id {
        out.extend_from_slice(b",\"client_message_id\":");
        write_str(out, id);
    }
    out.extend_from_slice(b",\"nonce\":");
    let nonce = quoted(out, push.nonce);
    out.extend_from_slice(b",\"ciphertext\":");
    let ciphertext = quoted(out, push.ciphertext);
    out.extend_from_slice(b",\"createdAt\":");
    write_str(out, push.created_at);
    out.push(b'}');
    PushRanges { nonce, ciphertext }
}

/// Writes a JSON string; returns where its contents (between the quotes) went.
fn quoted(out: &mut Vec<u8>, s: &str) -> std::ops::Range<usize> {
    let start = out.len() + 1;
    write_str(out, s);
    start..out.len() - 1
}

/// A push frame as `write_push` wrote it, marked as a redelivery
/// (PROTOCOL.md §11): the same object with `,"redelivered":true` before its
/// final `}`. Everything before that brace keeps its place, so the nonce and
/// ciphertext ranges of the original frame hold in the marked one too.
pub fn mark_redelivered(push_json: &[u8]) -> Vec<u8> {
    const MARK: &[u8] = b",\"redelivered\":true";
    let end = push_json.iter().rposition(|&b| b == b'}');
    debug_assert!(end.is_some(), "a push is a JSON object");
    let end = end.unwrap_or(push_json.len());
    let mut out = Vec::with_capacity(push_json.len() + MARK.len());
    out.extend_from_slice(&push_json[..end]);
    out.extend_from_slice(MARK);
    out.extend_from_slice(&push_json[end..]);
    out
}

/// The fields of an `ack` (PROTOCOL.md §4, §9, §11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack<'a> {
    /// The send's `id`, echoed (`""` when it had none).
    pub id: &'a str,
    pub message_id: &'a str,
    /// `None` for the normal ack, `Some(false)` while Postgres is down.
    pub durable: Option<bool>,
    /// The send repeated a `client_message_id` accepted within the
    /// dedupe window: `message_id` is the first send's, and the ack says
    /// `"duplicate":true`.
    pub duplicate: bool,
    /// The send's `_reqId`, echoed.
    pub req_id: Option<&'a str>,
}

pub fn write_ack(out: &mut Vec<u8>, ack: &Ack<'_>) {
    out.extend_from_slice(b"{\"type\":\"ack\",\"id\":");
    write_str(out, ack.id);
    out.extend_from_slice(b",\"messageId\":");
    write_str(out, ack.message_id);
    out.extend_from_slice(b",\"queued\":true");
    if let Some(durable) = ack.durable {
        out.extend_from_slice(if durable {
            b",\"durable\":true"
        } else {
            b",\"durable\":false"
        });
    }
    if ack.duplicate {
        out.extend_from_slice(b",\"duplicate\":true");
    }
    write_req_id(out, ack.req_id);
    out.push(b'}');
}

/// A group and the member's role in it, as `{"name","role"}` (the role
/// `null` when it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupRole<'a> {
    pub name: &'a str,
    pub role: Option<&'a str>,
}

/// The fields of a `hello_ack` (PROTOCOL.md §4, §9).
pub struct HelloAck<'a> {
    pub presence_id: &'a str,
    pub mesh_id: &'a str,
    pub member_id: &'a str,
    /// The member's `display_name`.
    pub member_display_name: &'a str,
    /// This session's name (the hello's `displayName`, else the member's).
    pub display_name: &'a str,
    /// The member's groups after admit.
    pub groups: &'a [GroupRole<'a>],
    /// The capabilities granted.
    pub capabilities: Capabilities,
    /// Whether this hello took over an existing presence.
    pub resumed: bool,
    /// The session key, for a `session_hello`.
    pub session_pubkey: Option<&'a str>,
    pub req_id: Option<&'a str>,
}

pub fn write_hello_ack(out: &mut Vec<u8>, ack: &HelloAck<'_>) {
    out.extend_from_slice(b"{\"type\":\"hello_ack\",\"presenceId\":");
    write_str(out, ack.presence_id);
    out.extend_from_slice(b",\"meshId\":");
    write_str(out, ack.mesh_id);
    out.extend_from_slice(b",\"memberId\":");
    write_str(out, ack.member_id);
    out.extend_from_slice(b",\"memberDisplayName\":");
    write_str(out, ack.member_display_name);
    out.extend_from_slice(b",\"displayName\":");
    write_str(out, ack.display_name);
    out.extend_from_slice(b",\"groups\":");
    write_groups(out, ack.groups);
    out.extend_from_slice(b",\"capabilities\":[");
    for (i, name) in ack.capabilities.names().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
    }
    out.extend_from_slice(if ack.resumed {
        b"],\"resumed\":true"
    } else {
        b"],\"resumed\":false"
    });
    if let Some(key) = ack.session_pubkey {
        out.extend_from_slice(b",\"sessionPubkey\":");
        write_str(out, key);
    }
    write_req_id(out, ack.req_id);
    out.push(b'}');
}

/// `id` echoes a send's id, `req_id` the message's `_reqId`.
pub fn write_error(
    out: &mut Vec<u8>,
    code: ErrorCode,
    message: &str,
    id: Option<&str>,
    req_id: Option<&str>,
) {
    out.extend_from_slice(b"{\"type\":\"error\",\"code\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    write_str(out, message);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_str(out, id);
    }
    write_req_id(out, req_id);
    out.push(b'}');
}

/// One session of the peer directory: a `peers_list` entry, and the
/// `eventData` of a peer event (PROTOCOL.md §9).
pub struct PeerFields<'a> {
    /// The member's pubkey.
    pub pubkey: &'a str,
    pub member_id: &'a str,
    pub display_name: &'a str,
    pub presence_id: &'a str,
    pub session_id: &'a str,
    pub status: &'static str,
    pub status_source: &'static str,
    pub summary: Option<&'a str>,
    pub groups: &'a [GroupRole<'a>],
    pub cwd: &'a str,
    /// RFC 3339.
    pub connected_at: &'a str,
    /// True while the session is in its grace.
    pub away: bool,
    /// Its own key (`session_hello`), `None` for a `hello` session.
    pub session_pubkey: Option<&'a str>,
    /// `control-plane` (`hello`) or `session` (`session_hello`).
    pub peer_role: &'static str,
}

/// One peer as a JSON object; `self` is written only when `is_self` is
/// `Some` (a `peers_list` entry), never in a peer event.
pub fn write_peer(out: &mut Vec<u8>, peer: &PeerFields<'_>, is_self: Option<bool>) {
    out.extend_from_slice(b"{\"pubkey\":");
    write_str(out, peer.pubkey);
    out.extend_from_slice(b",\"memberId\":");
    write_str(out, peer.member_id);
    out.extend_from_slice(b",\"displayName\":");
    write_str(out, peer.display_name);
    out.extend_from_slice(b",\"presenceId\":");
    write_str(out, peer.presence_id);
    out.extend_from_slice(b",\"sessionId\":");
    write_str(out, peer.session_id);
    out.extend_from_slice(b",\"status\":");
    write_str(out, peer.status);
    out.extend_from_slice(b",\"statusSource\":");
    write_str(out, peer.status_source);
    out.extend_from_slice(b",\"summary\":");
    write_opt_str(out, peer.summary);
    out.extend_from_slice(b",\"groups\":");
    write_groups(out, peer.groups);
    out.extend_from_slice(b",\"cwd\":");
    write_str(out, peer.cwd);
    out.extend_from_slice(b",\"connectedAt\":");
    write_str(out, peer.connected_at);
    out.extend_from_slice(if peer.away {
        b",\"away\":true"
    } else {
        b",\"away\":false"
    });
    out.extend_from_slice(b",\"sessionPubkey\":");
    write_opt_str(out, peer.session_pubkey);
    out.extend_from_slice(b",\"peerRole\":");
    write_str(out, peer.peer_role);
    match is_self {
        None => {}
        Some(true) => out.extend_from_slice(b",\"self\":true"),
        Some(false) => out.extend_from_slice(b",\"self\":false"),
    }
    out.push(b'}');
}

/// Writes a `peers_list` answer entry by entry into one buffer:
/// `begin`, then `peer` for each entry, then `finish`.
#[must_use = "a peers_list is only whole once finished"]
pub struct PeersListWriter<'o> {
    out: &'o mut Vec<u8>,
    entries: usize,
}

impl<'o> PeersListWriter<'o> {
    pub fn begin(out: &'o mut Vec<u8>) -> Self {
        out.extend_from_slice(b"{\"type\":\"peers_list\",\"peers\":[");
        PeersListWriter { out, entries: 0 }
    }

    /// Appends one entry; `is_self` as for `write_peer`.
    pub fn peer(&mut self, peer: &PeerFields<'_>, is_self: Option<bool>) {
        if self.entries > 0 {
            self.out.push(b',');
        }
        self.entries += 1;
        write_peer(self.out, peer, is_self);
    }

    /// Appends entries written elsewhere (comma-separated; another node's).
    pub fn written(&mut self, entries: &[u8]) {
        if entries.is_empty() {
            return;
        }
        if self.entries > 0 {
            self.out.push(b',');
        }
        self.entries += 1;
        self.out.extend_from_slice(entries);
    }

    /// Closes the list, echoing the request's `_reqId`.
    pub fn finish(self, req_id: Option<&str>) {
        self.out.push(b']');
        write_req_id(self.out, req_id);
        self.out.push(b'}');
    }
}

/// A peer event push (PROTOCOL.md §9: `peer_joined`, `peer_left`,
/// `peer_returned`, `peer_status`, `peer_summary`), from `system`.
pub fn write_peer_event(
    out: &mut Vec<u8>,
    event: &str,
    message_id: &str,
    mesh_id: &str,
    created_at: &str,
    peer: &PeerFields<'_>,
) {
    let data = |out: &mut Vec<u8>| write_peer(out, peer, None);
    write_peer_event_with(out, event, message_id, mesh_id, created_at, data);
}

/// The same, its `eventData` written by `data` (a peer another node
/// listed, as JSON already).
pub fn write_peer_event_with(
    out: &mut Vec<u8>,
    event: &str,
    message_id: &str,
    mesh_id: &str,
    created_at: &str,
    data: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(b"{\"type\":\"push\",\"subtype\":\"system\",\"event\":");
    write_str(out, event);
    out.extend_from_slice(b",\"eventData\":");
    data(out);
    out.extend_from_slice(b",\"messageId\":");
    write_str(out, message_id);
    out.extend_from_slice(b",\"meshId\":");
    write_str(out, mesh_id);
    out.extend_from_slice(
        b",\"senderPubkey\":\"system\",\"priority\":\"low\",\"nonce\":\"\",\"ciphertext\":\"\",\"createdAt\":",
    );
    write_str(out, created_at);
    out.push(b'}');
}

/// A JSON array of `items`, each written by `each`.
pub(super) fn write_array<T>(out: &mut Vec<u8>, items: &[T], each: impl Fn(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item);
    }
    out.push(b']');
}

/// `[{"name":…,"role":…|null},…]`.
fn write_groups(out: &mut Vec<u8>, groups: &[GroupRole<'_>]) {
    write_array(out, groups, |out, group| {
        out.extend_from_slice(b"{\"name\":");
        write_str(out, group.name);
        out.extend_from_slice(b",\"role\":");
        write_opt_str(out, group.role);
        out.push(b'}');
    });
}

/// `,"_reqId":"…"` when there is one.
pub(super) fn write_req_id(out: &mut Vec<u8>, req_id: Option<&str>) {
    if let Some(req_id) = req_id {
        out.extend_from_slice(b",\"_reqId\":");
        write_str(out, req_id);
    }
}

/// A JSON string, or `null`.
pub(super) fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string literal. Nonces and ciphertexts are base64 and almost never
/// need escaping: one vectorizable scan decides, and the common case is a
/// single copy.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // A fold without early exit, so the compiler vectorizes the scan.
    if !bytes
        .iter()
        .fold(false, |found, &b| found | needs_escape(b))
    {
        out.extend_from_slice(bytes);
    } else {
        write_escaped(out, bytes);
    }
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 15) as usize]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("valid JSON")
    }

    fn push(target_spec: Option<&str>, client_message_id: Option<&str>) -> (Vec<u8>, PushRanges) {
        let mut out = b"prefix".to_vec();
        let ranges = write_push(
            &mut out,
            &PushFields {
                message_id: "m1",
                mesh_id: "mesh\"1",
                sender_pubkey: "ab",
                sender_member_pubkey: "cd",
                target_spec,
                priority: Priority::Low,
                client_message_id,
                nonce: "n\\o\n",
                ciphertext: "c\u{1}é",
                created_at: "2026-01-01T00:00:00.000Z",
            },
        );
        (out.split_off(6), shift(ranges, 6))
    }

    fn shift(ranges: PushRanges, by: usize) -> PushRanges {
        PushRanges {
            nonce: ranges.nonce.start - by..ranges.nonce.end - by,
            ciphertext: ranges.ciphertext.start - by..ranges.ciphertext.end - by,
        }
    }

    /// Every (targetSpec, client_message_id) a push may carry.
    const PUSH_CASES: [(Option<&str>, Option<&str>); 6] = [
        (None, None),
        (Some("@eng"), None),
        (Some("#a\"b"), None),
        (None, Some("c-1")),
        (Some("*"), Some("id \"with\" \\escapes\n")),
        (None, Some("")),
    ];

    #[test]
    fn push_round_trips_with_escapes() {
        for (spec, client_id) in PUSH_CASES {
            let (out, ranges) = push(spec, client_id);
            let v = parsed(&out);
            assert_eq!(v["type"], "push");
            assert_eq!(v["meshId"], "mesh\"1");
            assert_eq!(v["senderPubkey"], "ab");
            assert_eq!(v["senderMemberPubkey"], "cd");
            assert_eq!(v["priority"], "low");
            assert_eq!(v["nonce"], "n\\o\n");
            assert_eq!(v["ciphertext"], "c\u{1}é");
            assert_eq!(v["createdAt"], "2026-01-01T00:00:00.000Z");
            match spec {
                Some(spec) => assert_eq!(v["targetSpec"], spec),
                None => assert!(v.get("targetSpec").is_none()),
            }
            match client_id {
                Some(id) => assert_eq!(v["client_message_id"], id),
                None => assert!(v.get("client_message_id").is_none()),
            }
            // The ranges hold the escaped contents, between the quotes.
            assert_eq!(&out[ranges.nonce.clone()], br"n\\o\n");
            assert_eq!(&out[ranges.ciphertext.clone()], "c\\u0001é".as_bytes());
            assert_eq!(out[ranges.nonce.start - 1], b'"');
            assert_eq!(out[ranges.ciphertext.end], b'"');
        }
        let (out, _) = push(Some("*"), None);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.contains(
            r#""senderPubkey":"ab","senderMemberPubkey":"cd","targetSpec":"*","priority""#
        ));
        // client_message_id comes right after the priority.
        let (out, _) = push(None, Some("c-1"));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains(r#""priority":"low","client_message_id":"c-1","nonce":"#),
            "{text}"
        );
    }

    #[test]
    fn a_redelivered_push_keeps_every_field_and_its_ranges() {
        for (spec, client_id) in PUSH_CASES {
            let (out, ranges) = push(spec, client_id);
            let marked = mark_redelivered(&out);
            assert_eq!(marked.len(), out.len() + r#","redelivered":true"#.len());
            assert!(marked.ends_with(br#","redelivered":true}"#));
            let (before, after) = (parsed(&out), parsed(&marked));
            let mut want = before.as_object().unwrap().clone();
            want.insert("redelivered".into(), serde_json::Value::Bool(true));
            assert_eq!(after.as_object().unwrap(), &want);
            assert_eq!(&marked[ranges.nonce.clone()], &out[ranges.nonce.clone()]);
            assert_eq!(
                &marked[ranges.ciphertext.clone()],
                &out[ranges.ciphertext.clone()]
            );
        }
        // A peer event push too: the mark goes after its eventData object.
        let mut event = Vec::new();
        write_peer_event(&mut event, "peer_left", "m", "x", "t", &peer(None));
        let v = parsed(&mark_redelivered(&event));
        assert_eq!(v["redelivered"], true);
        assert!(v["eventData"].get("redelivered").is_none());
    }

    #[test]
    fn ack_and_error_shapes() {
        let mut out = Vec::new();
        let mut ack = Ack {
            id: "c1",
            message_id: "m1",
            durable: None,
            duplicate: false,
            req_id: None,
        };
        write_ack(&mut out, &ack);
        let v = parsed(&out);
        assert_eq!(object_keys(&v), ["id", "messageId", "queued", "type"]);
        assert_eq!(v["type"], "ack");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["messageId"], "m1");
        assert_eq!(v["queued"], true);
        out.clear();
        ack.id = "";
        ack.durable = Some(false);
        ack.req_id = Some("r\"1");
        write_ack(&mut out, &ack);
        let v = parsed(&out);
        assert_eq!(v["id"], "");
        assert_eq!(v["durable"], false);
        assert_eq!(v["_reqId"], "r\"1");
        assert!(v.get("duplicate").is_none());
        out.clear();
        ack.durable = Some(true);
        ack.duplicate = true;
        write_ack(&mut out, &ack);
        let v = parsed(&out);
        assert_eq!(
            object_keys(&v),
            [
                "_reqId",
                "duplicate",
                "durable",
                "id",
                "messageId",
                "queued",
                "type"
            ]
        );
        assert_eq!(v["durable"], true);
        assert_eq!(v["duplicate"], true);
        out.clear();
        write_error(
            &mut out,
            ErrorCode::UnknownTarget,
            "no such \"member\"",
            Some("x"),
            Some("r2"),
        );
        let v = parsed(&out);
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "unknown_target");
        assert_eq!(v["message"], "no such \"member\"");
        assert_eq!(v["id"], "x");
        assert_eq!(v["_reqId"], "r2");
        out.clear();
        write_error(&mut out, ErrorCode::NoHello, "hello first", None, None);
        let v = parsed(&out);
        assert!(v.get("id").is_none() && v.get("_reqId").is_none());
        out.clear();
        write_error(
            &mut out,
            ErrorCode::UnsupportedProtocol,
            "v3",
            None,
            Some("h"),
        );
        let v = parsed(&out);
        assert_eq!(v["code"], "unsupported_protocol");
        assert_eq!(v["_reqId"], "h");
    }

    fn object_keys(v: &serde_json::Value) -> Vec<&str> {
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn hello_ack_shape() {
        let groups = [
            GroupRole {
                name: "eng/backend",
                role: Some("lead \"1\""),
            },
            GroupRole {
                name: "ops",
                role: None,
            },
        ];
        let mut ack = HelloAck {
            presence_id: "p",
            mesh_id: "m",
            member_id: "u",
            member_display_name: "Ada\n",
            display_name: "ada's laptop",
            groups: &groups,
            capabilities: Capabilities {
                peer_events: true,
                client_ack: true,
            },
            resumed: true,
            session_pubkey: None,
            req_id: Some("r"),
        };
        let mut out = Vec::new();
        write_hello_ack(&mut out, &ack);
        let v = parsed(&out);
        assert_eq!(
            object_keys(&v),
            [
                "_reqId",
                "capabilities",
                "displayName",
                "groups",
                "memberDisplayName",
                "memberId",
                "meshId",
                "presenceId",
                "resumed",
                "type"
            ]
        );
        assert_eq!(v["type"], "hello_ack");
        assert_eq!(v["presenceId"], "p");
        assert_eq!(v["meshId"], "m");
        assert_eq!(v["memberId"], "u");
        assert_eq!(v["memberDisplayName"], "Ada\n");
        assert_eq!(v["displayName"], "ada's laptop");
        assert_eq!(
            v["groups"],
            serde_json::json!([
                {"name": "eng/backend", "role": "lead \"1\""},
                {"name": "ops", "role": null}
            ])
        );
        assert_eq!(
            v["capabilities"],
            serde_json::json!(["peer_events", "client_ack"])
        );
        assert_eq!(v["resumed"], true);
        assert_eq!(v["_reqId"], "r");
        ack.groups = &[];
        ack.capabilities = Capabilities {
            peer_events: false,
            client_ack: true,
        };
        ack.resumed = false;
        ack.req_id = None;
        out.clear();
        write_hello_ack(&mut out, &ack);
        let v = parsed(&out);
        assert_eq!(v["groups"], serde_json::json!([]));
        assert_eq!(v["capabilities"], serde_json::json!(["client_ack"]));
        assert_eq!(v["resumed"], false);
        assert!(v.get("_reqId").is_none());
        ack.capabilities = Capabilities::default();
        out.clear();
        write_hello_ack(&mut out, &ack);
        assert_eq!(parsed(&out)["capabilities"], serde_json::json!([]));
        ack.session_pubkey = Some("5e");
        out.clear();
        write_hello_ack(&mut out, &ack);
        assert_eq!(parsed(&out)["sessionPubkey"], "5e");
    }

    const GROUPS: [GroupRole<'static>; 1] = [GroupRole {
        name: "eng",
        role: None,
    }];

    fn peer(summary: Option<&'static str>) -> PeerFields<'static> {
        PeerFields {
            pubkey: "ab12",
            member_id: "u1",
            display_name: "Ada \"the\" dev",
            presence_id: "p1",
            session_id: "s1",
            status: "working",
            status_source: "hook",
            summary,
            groups: &GROUPS,
            cwd: "C:\\work",
            connected_at: "2026-01-01T00:00:00.000Z",
            away: true,
            session_pubkey: Some("5e"),
            peer_role: "session",
        }
    }

    const PEER_KEYS: [&str; 14] = [
        "away",
        "connectedAt",
        "cwd",
        "displayName",
        "groups",
        "memberId",
        "peerRole",
        "presenceId",
        "pubkey",
        "sessionId",
        "sessionPubkey",
        "status",
        "statusSource",
        "summary",
    ];

    fn check_peer(v: &serde_json::Value, summary: Option<&str>) {
        assert_eq!(v["pubkey"], "ab12");
        assert_eq!(v["memberId"], "u1");
        assert_eq!(v["displayName"], "Ada \"the\" dev");
        assert_eq!(v["presenceId"], "p1");
        assert_eq!(v["sessionId"], "s1");
        assert_eq!(v["status"], "working");
        assert_eq!(v["statusSource"], "hook");
        match summary {
            Some(summary) => assert_eq!(v["summary"], summary),
            None => assert!(v["summary"].is_null()),
        }
        assert_eq!(
            v["groups"],
            serde_json::json!([{"name": "eng", "role": null}])
        );
        assert_eq!(v["cwd"], "C:\\work");
        assert_eq!(v["connectedAt"], "2026-01-01T00:00:00.000Z");
        assert_eq!(v["away"], true);
        assert_eq!(v["sessionPubkey"], "5e");
        assert_eq!(v["peerRole"], "session");
    }

    #[test]
    fn peer_entry_fields() {
        let mut out = Vec::new();
        write_peer(&mut out, &peer(Some("fixing\tbugs")), None);
        let v = parsed(&out);
        assert_eq!(object_keys(&v), PEER_KEYS);
        check_peer(&v, Some("fixing\tbugs"));
        for is_self in [true, false] {
            out.clear();
            write_peer(&mut out, &peer(None), Some(is_self));
            let v = parsed(&out);
            check_peer(&v, None);
            assert!(v.as_object().unwrap().contains_key("summary"));
            assert_eq!(v["self"], is_self);
            assert_eq!(object_keys(&v).len(), PEER_KEYS.len() + 1);
        }
    }

    #[test]
    fn peers_list_is_written_entry_by_entry() {
        let mut out = Vec::new();
        PeersListWriter::begin(&mut out).finish(None);
        let v = parsed(&out);
        assert_eq!(v["type"], "peers_list");
        assert_eq!(v["peers"], serde_json::json!([]));
        assert!(v.get("_reqId").is_none());
        out.clear();
        let mut list = PeersListWriter::begin(&mut out);
        list.peer(&peer(None), Some(true));
        list.peer(&peer(Some("s")), Some(false));
        list.peer(&peer(None), Some(false));
        list.finish(Some("q\\1"));
        let v = parsed(&out);
        assert_eq!(object_keys(&v), ["_reqId", "peers", "type"]);
        assert_eq!(v["_reqId"], "q\\1");
        let peers = v["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 3);
        check_peer(&peers[0], None);
        check_peer(&peers[1], Some("s"));
        assert_eq!(peers[0]["self"], true);
        assert_eq!(peers[1]["self"], false);
        assert_eq!(peers[2]["self"], false);
    }

    #[test]
    fn peer_event_shape() {
        let mut out = Vec::new();
        write_peer_event(
            &mut out,
            "peer_joined",
            "m9",
            "mesh\"1",
            "2026-01-02T00:00:00.000Z",
            &peer(Some("hi")),
        );
        let v = parsed(&out);
        assert_eq!(
            object_keys(&v),
            [
                "ciphertext",
                "createdAt",
                "event",
                "eventData",
                "meshId",
                "messageId",
                "nonce",
                "priority",
                "senderPubkey",
                "subtype",
                "type"
            ]
        );
        assert_eq!(v["type"], "push");
        assert_eq!(v["subtype"], "system");
        assert_eq!(v["event"], "peer_joined");
        assert_eq!(v["messageId"], "m9");
        assert_eq!(v["meshId"], "mesh\"1");
        assert_eq!(v["senderPubkey"], "system");
        assert_eq!(v["priority"], "low");
        assert_eq!(v["nonce"], "");
        assert_eq!(v["ciphertext"], "");
        assert_eq!(v["createdAt"], "2026-01-02T00:00:00.000Z");
        assert_eq!(object_keys(&v["eventData"]), PEER_KEYS);
        check_peer(&v["eventData"], Some("hi"));
    }
}
