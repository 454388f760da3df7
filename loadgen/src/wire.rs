//! What goes over the socket: the broker address, the HTTP upgrade, server
//! frames, pre-built send frames, and a cheap look at incoming messages.
//!
//! Client frames are masked with the all-zero key: a valid key (the server
//! must unmask with whatever key it is given), and it makes the frame's bytes
//! equal to the JSON, so a send is a template copy plus a few fixed-width
//! patches, never a per-byte XOR.
use anyhow::{bail, Context, Result};
use meshbroker::ws::{encode_client_frame, OpCode};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// The fixed `Sec-WebSocket-Key` every connection sends (any 16 bytes,
/// base64): the accept value is then computed once.
pub const WS_KEY: &str = "bWVzaGJyb2tlcmxvYWRnbg==";

/// The broker address from `--url`.
#[derive(Clone, Debug)]
pub struct WsTarget {
    pub addr: SocketAddr,
    pub host_header: String,
    pub path: String,
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl WsTarget {
    /// `ws://host:port/path`; `wss` is not supported. Refuses a non-loopback
    /// address unless `allow_remote`.
    pub fn parse(url: &str, allow_remote: bool) -> Result<WsTarget> {
        let Some(rest) = url.strip_prefix("ws://") else {
            bail!("--url must start with ws:// (got {url:?}; wss is not supported)");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            bail!("--url has no host");
        }
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_string()
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("--url: cannot resolve {authority:?}"))?
            .find(|a| allow_remote || is_loopback(a.ip()))
            .with_context(|| {
                format!("--url: {authority} is not a loopback address (pass --allow-remote to target another host)")
            })?;
        Ok(WsTarget {
            addr,
            host_header: authority.to_string(),
            path: path.to_string(),
        })
    }

    pub fn is_ipv4_loopback(&self) -> bool {
        matches!(self.addr.ip(), IpAddr::V4(v4) if v4.is_loopback())
    }

    pub fn upgrade_request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.path, self.host_header
        )
        .into_bytes()
    }
}

/// Checks a response head (everything up to and including the blank line):
/// status 101 and the right `Sec-WebSocket-Accept`.
pub fn check_upgrade_response(head: &[u8], expected_accept: &str) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {status}"));
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim().to_string());
    match accept {
        Some(a) if a == expected_accept => Ok(()),
        other => Err(format!("bad Sec-WebSocket-Accept {other:?}")),
    }
}

/// One server frame header, parsed from the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub opcode: u8,
    pub fin: bool,
    pub header_len: usize,
    pub payload_len: usize,
}

impl ServerFrame {
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// `Ok(None)`: incomplete. Errors for a masked server frame or reserved bits.
pub fn parse_server_frame(buf: &[u8]) -> Result<Option<ServerFrame>, &'static str> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("reserved bits set");
    }
    if b1 & 0x80 != 0 {
        return Err("masked server frame");
    }
    let (len, header_len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().unwrap()), 10),
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    if len > (1 << 30) {
        return Err("frame too large");
    }
    let frame = ServerFrame {
        opcode: b0 & 0x0F,
        fin: b0 & 0x80 != 0,
        header_len,
        payload_len: len as usize,
    };
    if buf.len() < frame.total_len() {
        return Ok(None);
    }
    Ok(Some(frame))
}

/// A masked (zero key) client frame.
pub fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    encode_client_frame(opcode, payload, [0; 4], true)
}

/// A client Close frame with `code`.
pub fn close_frame(code: u16) -> Vec<u8> {
    client_frame(OpCode::Close, &code.to_be_bytes())
}

/// Width of the metadata at the start of every ciphertext:
/// sender index (8 hex) · sequence (8 hex) · send time ns (16 hex).
pub const META_LEN: usize = 32;
const NONCE: &str = "bG9hZGdlbi1ub25jZS0wMDAwMDAwMA";

const HEX: &[u8; 16] = b"0123456789abcdef";

pub fn put_hex(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 15) as usize];
        v >>= 4;
    }
}

pub fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u64;
    }
    Some(v)
}

/// A pre-built send frame: copy, then patch the target (direct), the
/// metadata and the id in place. Every field is fixed-width, so the frame
/// length never changes.
#[derive(Clone, Debug)]
pub struct SendTemplate {
    frame: Vec<u8>,
    /// Offset of the 64-hex target, for direct templates.
    target_at: Option<usize>,
    meta_at: usize,
    id_at: usize,
    /// Gated templates: the id carries target and seq after the timestamp.
    tagged: bool,
    /// Offset of the 16-hex counter of the `client_message_id`, when the
    /// sends carry one (`--client-message-ids`).
    client_id_at: Option<usize>,
}

/// Priority markers: the ciphertext's first byte after the metadata in
/// `gated` sends, so a receiver knows what the sender asked for (`now`,
/// `next`, `low`) without trusting the broker's label.
pub const PRIORITY_MARKS: [u8; 3] = [b'N', b'X', b'L'];

/// A gated send's id: timestamp (16 hex) · target member (8 hex) · seq
/// (8 hex) · priority index (1 digit).
pub const TAGGED_ID_LEN: usize = 33;

impl SendTemplate {
    /// `direct`: a 64-hex target slot; else `"*"`.
    pub fn new(direct: bool, priority: &str, payload: usize) -> SendTemplate {
        SendTemplate::build((!direct).then_some("*"), priority, payload, None, None)
    }

    /// As [`SendTemplate::new`], and every send carries a
    /// `client_message_id` (PROTOCOL.md §11): `prefix` then a 16-hex
    /// counter patched by [`SendTemplate::patch_client_id`]. `prefix` must
    /// need no JSON escaping.
    pub fn with_client_ids(
        direct: bool,
        priority: &str,
        payload: usize,
        prefix: &str,
    ) -> SendTemplate {
        assert!(
            !prefix.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20),
            "a client id prefix that needs no escaping"
        );
        assert!(prefix.len() + 16 <= MAX_CLIENT_ID_LEN);
        let spec = (!direct).then_some("*");
        SendTemplate::build(spec, priority, payload, None, Some(prefix))
    }

    /// To a fixed `targetSpec` (`@group`, `#name`, `*`). The spec is
    /// written as is: it must need no JSON escaping (group names never do).
    pub fn to_spec(spec: &str, priority: &str, payload: usize) -> SendTemplate {
        assert!(
            !spec.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20),
            "a target spec that needs no escaping"
        );
        SendTemplate::build(Some(spec), priority, payload, None, None)
    }

    /// A direct send for the `gated` scenario: priority `PRIORITIES[p]`,
    /// its marker after the metadata and a tagged id.
    pub fn gated(p: usize, payload: usize) -> SendTemplate {
        SendTemplate::tagged(true, p, payload)
    }

    /// Like [`SendTemplate::gated`], direct or to `*` (the `held` scenario:
    /// a tagged id tells the ack's reader whom the send was for).
    pub fn tagged(direct: bool, p: usize, payload: usize) -> SendTemplate {
        assert!(payload > META_LEN, "tagged sends carry a priority marker");
        let spec = (!direct).then_some("*");
        SendTemplate::build(spec, crate::gate::PRIORITIES[p], payload, Some(p), None)
    }

    /// `spec`: a fixed `targetSpec`; `None`: a 64-hex slot patched per send.
    /// `client_prefix`: the sends carry a `client_message_id`.
    fn build(
        spec: Option<&str>,
        priority: &str,
        payload: usize,
        tag: Option<usize>,
        client_prefix: Option<&str>,
    ) -> SendTemplate {
        assert!(payload >= META_LEN);
        let direct = spec.is_none();
        let target = spec.map_or_else(|| "0".repeat(64), str::to_string);
        let head = format!(
            "{{\"type\":\"send\",\"targetSpec\":\"{target}\",\"priority\":\"{priority}\",\"nonce\":\"{NONCE}\",\"ciphertext\":\""
        );
        let mut json = head.clone().into_bytes();
        let meta_at = json.len();
        json.extend(std::iter::repeat_n(b'0', META_LEN));
        json.extend((0..payload - META_LEN).map(|i| b'A' + (i % 26) as u8));
        if let Some(p) = tag {
            json[meta_at + META_LEN] = PRIORITY_MARKS[p];
        }
        json.extend_from_slice(b"\",\"id\":\"");
        let id_at = json.len();
        json.extend(std::iter::repeat_n(b'0', 16));
        if let Some(p) = tag {
            json.extend(std::iter::repeat_n(b'0', 16));
            json.push(b'0' + p as u8);
        }
        let mut client_id_at = None;
        if let Some(prefix) = client_prefix {
            json.extend_from_slice(b"\",\"client_message_id\":\"");
            json.extend_from_slice(prefix.as_bytes());
            client_id_at = Some(json.len());
            json.extend(std::iter::repeat_n(b'0', 16));
        }
        json.extend_from_slice(b"\"}");
        let frame = client_frame(OpCode::Text, &json);
        let header = frame.len() - json.len();
        let target_at = direct.then(|| header + head.find("targetSpec").unwrap() + 13);
        SendTemplate {
            frame,
            target_at,
            meta_at: header + meta_at,
            id_at: header + id_at,
            tagged: tag.is_some(),
            client_id_at: client_id_at.map(|at| header + at),
        }
    }

    /// Whether the sends carry a `client_message_id`.
    pub fn has_client_ids(&self) -> bool {
        self.client_id_at.is_some()
    }

    /// Sets the counter of the `client_message_id` of one send frame just
    /// written (`frame` starts where it starts); no-op without client ids.
    pub fn patch_client_id(&self, frame: &mut [u8], n: u64) {
        if let Some(at) = self.client_id_at {
            put_hex(&mut frame[at..at + 16], n);
        }
    }

    /// Appends one gated send: as [`SendTemplate::write`], and the id also
    /// names the target member and the seq.
    pub fn write_tagged(
        &self,
        out: &mut Vec<u8>,
        target: &[u8],
        target_index: u32,
        sender: u32,
        seq: u32,
        ts_ns: u64,
    ) {
        debug_assert!(self.tagged);
        let start = out.len();
        self.write(out, target, sender, seq, ts_ns);
        let at = start + self.id_at + 16;
        put_hex(&mut out[at..at + 8], target_index as u64);
        put_hex(&mut out[at + 8..at + 16], seq as u64);
    }

    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    /// Appends one send frame to `out`. `target` is the 64 hex pubkey for
    /// a direct template (ignored otherwise).
    pub fn write(&self, out: &mut Vec<u8>, target: &[u8], sender: u32, seq: u32, ts_ns: u64) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        let f = &mut out[start..];
        if let Some(at) = self.target_at {
            f[at..at + 64].copy_from_slice(&target[..64]);
        }
        let m = self.meta_at;
        put_hex(&mut f[m..m + 8], sender as u64);
        put_hex(&mut f[m + 8..m + 16], seq as u64);
        put_hex(&mut f[m + 16..m + 32], ts_ns);
        put_hex(&mut f[self.id_at..self.id_at + 16], ts_ns);
    }
}

/// What an incoming text message is, read without a JSON parser for the
/// two hot kinds.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Push {
        sender: u32,
        seq: u32,
        ts_ns: u64,
    },
    /// A push whose ciphertext the loadgen did not write.
    ForeignPush,
    Ack {
        ts_ns: Option<u64>,
    },
    /// The ack of a gated send (its id is tagged).
    TaggedAck {
        ts_ns: u64,
        target: u32,
        seq: u32,
        priority: usize,
    },
    /// The ack of the gating barrier (a `now` send to oneself).
    BarrierAck,
    HelloAck {
        /// The broker granted the `client_ack` capability (PROTOCOL.md §11).
        client_ack: bool,
    },
    /// A `peers_list` answer (PROTOCOL.md §9), read by [`crate::peers`].
    PeersList,
    Error {
        code: String,
        id: Option<String>,
        /// The `_reqId` it echoes (PROTOCOL.md §9), if any.
        req_id: Option<String>,
    },
    Other,
}

const PUSH_PREFIX: &[u8] = b"{\"type\":\"push\"";
/// How the broker begins a `peers_list` (large: never parsed as a tree here).
pub const PEERS_LIST_PREFIX: &[u8] = b"{\"type\":\"peers_list\"";
const ACK_PREFIX: &[u8] = b"{\"type\":\"ack\",\"id\":\"";
const CIPHERTEXT_KEY: &[u8] = b"\"ciphertext\":\"";

thread_local! {
    static CIPHERTEXT_FINDER: memchr::memmem::Finder<'static> =
        memchr::memmem::Finder::new(CIPHERTEXT_KEY);
}

fn parse_meta(meta: &[u8]) -> Option<(u32, u32, u64)> {
    if meta.len() < META_LEN {
        return None;
    }
    Some((
        parse_hex(&meta[0..8])? as u32,
        parse_hex(&meta[8..16])? as u32,
        parse_hex(&meta[16..32])?,
    ))
}

/// Target, seq and priority index from a tagged id (after the timestamp).
pub fn parse_tag(id: &[u8]) -> Option<(u64, u32, u32, usize)> {
    if id.len() != TAGGED_ID_LEN {
        return None;
    }
    let p = (id[32] as char).to_digit(10).filter(|&p| p < 3)? as usize;
    Some((
        parse_hex(&id[..16])?,
        parse_hex(&id[16..24])? as u32,
        parse_hex(&id[24..32])? as u32,
        p,
    ))
}

fn ack_for_id(id: &[u8]) -> Message {
    if id == BARRIER_ID.as_bytes() {
        return Message::BarrierAck;
    }
    if let Some((ts_ns, target, seq, priority)) = parse_tag(id) {
        return Message::TaggedAck {
            ts_ns,
            target,
            seq,
            priority,
        };
    }
    Message::Ack {
        ts_ns: parse_hex(id),
    }
}

/// The id and ciphertext of the gating barrier.
pub const BARRIER_ID: &str = "loadgen-gate-barrier";
const BARRIER_CIPHERTEXT: &str = "bG9hZGdlbi1nYXRlLWJhcnJpZXI";

/// `{"type":"set_status","status":…}`.
pub fn set_status_frame(status: &str) -> Vec<u8> {
    let json = format!("{{\"type\":\"set_status\",\"status\":\"{status}\"}}");
    client_frame(OpCode::Text, json.as_bytes())
}

/// A `now` send to oneself with [`BARRIER_ID`]: its ack proves the broker
/// has processed everything this connection sent before it.
pub fn barrier_frame(own_pubkey: &[u8]) -> Vec<u8> {
    let json = format!(
        "{{\"type\":\"send\",\"targetSpec\":\"{}\",\"priority\":\"now\",\"nonce\":\"{NONCE}\",\"ciphertext\":\"{BARRIER_CIPHERTEXT}\",\"id\":\"{BARRIER_ID}\"}}",
        String::from_utf8_lossy(own_pubkey)
    );
    client_frame(OpCode::Text, json.as_bytes())
}

fn ciphertext_of(payload: &[u8]) -> Option<&[u8]> {
    let at = CIPHERTEXT_FINDER.with(|f| f.find(payload))?;
    let rest = &payload[at + CIPHERTEXT_KEY.len()..];
    Some(&rest[..memchr::memchr(b'"', rest)?])
}

const MESSAGE_ID_KEY: &[u8] = b"\"messageId\":\"";

/// The `messageId` of an ack or a push (the broker's id, opaque here).
pub fn message_id(payload: &[u8]) -> Option<&[u8]> {
    let at = memchr::memmem::find(payload, MESSAGE_ID_KEY)?;
    let rest = &payload[at + MESSAGE_ID_KEY.len()..];
    Some(&rest[..memchr::memchr(b'"', rest)?])
}

/// The longest `client_message_id` the broker takes (PROTOCOL.md §11).
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// A push marked `"redelivered":true` (PROTOCOL.md §11: its lease lapsed
/// and it comes again, same `messageId`). The loadgen's ciphertexts never
/// contain a `"`, so the mark cannot be part of one.
pub fn is_redelivered(payload: &[u8]) -> bool {
    payload.ends_with(b",\"redelivered\":true}")
        || memchr::memmem::find(payload, b"\"redelivered\":true").is_some()
}

/// An ack saying `"duplicate":true` (PROTOCOL.md §11: the send repeated a
/// `client_message_id`, and was not routed again).
pub fn is_duplicate_ack(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\"duplicate\":true").is_some()
}

/// A push that carries a `client_message_id`.
pub fn has_client_id(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\"client_message_id\":\"").is_some()
}

/// A message id that can be written back between quotes as it is (the
/// broker's are; one needing escapes is not acked).
pub fn is_plain_id(id: &[u8]) -> bool {
    !id.is_empty() && !id.iter().any(|&b| b == b'\\' || b < 0x20)
}

/// An ack saying `"durable":false` (PROTOCOL.md §4: held in memory only,
/// while Postgres is unreachable).
pub fn is_non_durable_ack(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"\"durable\":false").is_some()
}

/// `{"type":"join_group","name":…}` (PROTOCOL.md §10; no reply). `name`
/// must need no JSON escaping (a valid group name never does).
pub fn join_group_frame(name: &str) -> Vec<u8> {
    let json = serde_json::json!({"type": "join_group", "name": name}).to_string();
    client_frame(OpCode::Text, json.as_bytes())
}

/// `{"type":"list_peers","_reqId":"<req_id>"}` (PROTOCOL.md §9).
pub fn list_peers_frame(req_id: u64) -> Vec<u8> {
    let json = format!("{{\"type\":\"list_peers\",\"_reqId\":\"{req_id}\"}}");
    client_frame(OpCode::Text, json.as_bytes())
}

/// The barrier's own push (when the broker delivers a send to oneself).
pub fn is_barrier_push(payload: &[u8]) -> bool {
    ciphertext_of(payload) == Some(BARRIER_CIPHERTEXT.as_bytes())
}

/// The priority index a gated push's sender asked for (its marker).
pub fn push_priority(payload: &[u8]) -> Option<usize> {
    let mark = *ciphertext_of(payload)?.get(META_LEN)?;
    PRIORITY_MARKS.iter().position(|&m| m == mark)
}

pub fn classify(payload: &[u8]) -> Message {
    if payload.starts_with(PUSH_PREFIX) {
        let at = CIPHERTEXT_FINDER.with(|f| f.find(&payload[PUSH_PREFIX.len()..]));
        let Some(at) = at else {
            return Message::ForeignPush;
        };
        let start = PUSH_PREFIX.len() + at + CIPHERTEXT_KEY.len();
        return match payload.get(start..start + META_LEN).and_then(parse_meta) {
            Some((sender, seq, ts_ns)) => Message::Push { sender, seq, ts_ns },
            None => Message::ForeignPush,
        };
    }
    if payload.starts_with(ACK_PREFIX) {
        let rest = &payload[ACK_PREFIX.len()..];
        if rest.get(16) == Some(&b'"') {
            return Message::Ack {
                ts_ns: parse_hex(&rest[..16]),
            };
        }
        let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
        return ack_for_id(&rest[..end]);
    }
    if payload.starts_with(PEERS_LIST_PREFIX) {
        return Message::PeersList;
    }
    // Rare kinds: a real JSON parse.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Message::Other;
    };
    match value["type"].as_str() {
        Some("hello_ack") => Message::HelloAck {
            client_ack: value["capabilities"]
                .as_array()
                .is_some_and(|c| c.iter().any(|v| v == "client_ack")),
        },
        Some("ack") => ack_for_id(value["id"].as_str().unwrap_or_default().as_bytes()),
        Some("error") => Message::Error {
            code: value["code"].as_str().unwrap_or("?").to_string(),
            id: value["id"].as_str().map(str::to_string),
            req_id: value["_reqId"].as_str().map(str::to_string),
        },
        Some("peers_list") => Message::PeersList,
        Some("push") => Message::ForeignPush,
        _ => Message::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parsing() {
        let t = WsTarget::parse("ws://127.0.0.1:7900/ws", false).unwrap();
        assert_eq!(t.addr.port(), 7900);
        assert_eq!(t.path, "/ws");
        assert!(t.is_ipv4_loopback());
        let req = String::from_utf8(t.upgrade_request()).unwrap();
        assert!(req.starts_with("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:7900\r\n"));
        assert!(WsTarget::parse("ws://192.0.2.1:7900/ws", false).is_err());
        assert_eq!(
            WsTarget::parse("ws://127.0.0.2", false)
                .unwrap()
                .addr
                .port(),
            80
        );
    }

    #[test]
    fn upgrade_response_check() {
        let accept = meshbroker::ws::accept_key(WS_KEY);
        let ok = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        assert!(check_upgrade_response(ok.as_bytes(), &accept).is_ok());
        assert!(check_upgrade_response(b"HTTP/1.1 404 Not Found\r\n\r\n", &accept).is_err());
        let wrong = "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(check_upgrade_response(wrong.as_bytes(), &accept).is_err());
    }

    #[test]
    fn send_template_round_trip() {
        for direct in [true, false] {
            let t = SendTemplate::new(direct, "now", 100);
            let mut out = vec![1, 2, 3];
            let target = "ab".repeat(32);
            t.write(&mut out, target.as_bytes(), 7, 42, 0x1234_5678_9abc);
            assert_eq!(out.len(), 3 + t.frame_len());
            let mut frame = out[3..].to_vec();
            let h = meshbroker::ws::decode_client_frame(&mut frame, 1 << 20)
                .unwrap()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&frame[h.payload_range()]).unwrap();
            assert_eq!(v["type"], "send");
            assert_eq!(v["priority"], "now");
            let ct = v["ciphertext"].as_str().unwrap();
            assert_eq!(ct.len(), 100);
            assert_eq!(parse_meta(ct.as_bytes()), Some((7, 42, 0x1234_5678_9abc)));
            assert_eq!(
                parse_hex(v["id"].as_str().unwrap().as_bytes()),
                Some(0x1234_5678_9abc)
            );
            let spec = v["targetSpec"].as_str().unwrap();
            assert_eq!(spec, if direct { target.as_str() } else { "*" });
        }
    }

    #[test]
    fn classifies_broker_messages() {
        let push = br#"{"type":"push","messageId":"m1","meshId":"x","senderPubkey":"ab","priority":"now","nonce":"n","ciphertext":"0000000300000009000000000000abcdAAAA","createdAt":"t"}"#;
        assert_eq!(
            classify(push),
            Message::Push {
                sender: 3,
                seq: 9,
                ts_ns: 0xabcd
            }
        );
        let foreign = br#"{"type":"push","messageId":"m1","ciphertext":"hello"}"#;
        assert_eq!(classify(foreign), Message::ForeignPush);
        let ack = br#"{"type":"ack","id":"00000000000003e8","messageId":"m","queued":true}"#;
        assert_eq!(classify(ack), Message::Ack { ts_ns: Some(1000) });
        assert_eq!(
            classify(br#"{"type":"hello_ack","presenceId":"p","meshId":"m","memberId":"u"}"#),
            Message::HelloAck { client_ack: false }
        );
        assert_eq!(
            classify(br#"{"type":"hello_ack","presenceId":"p","capabilities":["client_ack"]}"#),
            Message::HelloAck { client_ack: true }
        );
        assert_eq!(
            classify(br#"{"type":"hello_ack","capabilities":["peer_events"]}"#),
            Message::HelloAck { client_ack: false }
        );
        assert_eq!(
            classify(br#"{"type":"error","code":"unknown_target","message":"x","id":"00"}"#),
            Message::Error {
                code: "unknown_target".into(),
                id: Some("00".into()),
                req_id: None,
            }
        );
        assert_eq!(
            classify(br#"{"type":"error","code":"unavailable","message":"x","_reqId":"17"}"#),
            Message::Error {
                code: "unavailable".into(),
                id: None,
                req_id: Some("17".into()),
            }
        );
        assert_eq!(
            classify(br#"{"type":"peers_list","peers":[],"_reqId":"3"}"#),
            Message::PeersList
        );
        // Another field order takes the slow path to the same answer.
        assert_eq!(
            classify(br#"{"peers":[],"type":"peers_list"}"#),
            Message::PeersList
        );
    }

    #[test]
    fn group_sends_and_directory_frames() {
        let t = SendTemplate::to_spec("@load", "next", 64);
        let mut out = Vec::new();
        t.write(&mut out, b"", 4, 11, 0xabc);
        let h = meshbroker::ws::decode_client_frame(&mut out, 1 << 20)
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out[h.payload_range()]).unwrap();
        assert_eq!(v["targetSpec"], "@load");
        assert_eq!(v["priority"], "next");
        let ct = v["ciphertext"].as_str().unwrap();
        assert_eq!(parse_meta(ct.as_bytes()), Some((4, 11, 0xabc)));
        for (mut frame, want) in [
            (
                join_group_frame("load/g"),
                serde_json::json!({"type": "join_group", "name": "load/g"}),
            ),
            (
                list_peers_frame(42),
                serde_json::json!({"type": "list_peers", "_reqId": "42"}),
            ),
        ] {
            let h = meshbroker::ws::decode_client_frame(&mut frame, 1 << 20)
                .unwrap()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&frame[h.payload_range()]).unwrap();
            assert_eq!(v, want);
        }
    }

    #[test]
    fn gated_templates_tag_id_and_mark_priority() {
        for p in 0..3 {
            let t = SendTemplate::gated(p, 64);
            let mut out = Vec::new();
            let target = "cd".repeat(32);
            t.write_tagged(&mut out, target.as_bytes(), 17, 5, 300, 0xfeed);
            let h = meshbroker::ws::decode_client_frame(&mut out, 1 << 20)
                .unwrap()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out[h.payload_range()]).unwrap();
            assert_eq!(v["priority"], crate::gate::PRIORITIES[p]);
            assert_eq!(v["targetSpec"], target);
            let ct = v["ciphertext"].as_str().unwrap();
            assert_eq!(ct.len(), 64);
            assert_eq!(parse_meta(ct.as_bytes()), Some((5, 300, 0xfeed)));
            let id = v["id"].as_str().unwrap();
            assert_eq!(parse_tag(id.as_bytes()), Some((0xfeed, 17, 300, p)));
            // The broker's push carries the ciphertext unchanged.
            let push = format!(
                r#"{{"type":"push","messageId":"m","priority":"now","ciphertext":"{ct}"}}"#
            );
            assert_eq!(push_priority(push.as_bytes()), Some(p));
            assert!(!is_barrier_push(push.as_bytes()));
            let ack = format!(r#"{{"type":"ack","id":"{id}","messageId":"m","queued":true}}"#);
            assert_eq!(
                classify(ack.as_bytes()),
                Message::TaggedAck {
                    ts_ns: 0xfeed,
                    target: 17,
                    seq: 300,
                    priority: p
                }
            );
            // Same, field order changed (the slow path).
            let ack = format!(r#"{{"type":"ack","messageId":"m","id":"{id}"}}"#);
            assert!(matches!(
                classify(ack.as_bytes()),
                Message::TaggedAck { .. }
            ));
        }
        assert_eq!(parse_tag(b"0000000000000001000000020000000039"), None);
        assert_eq!(parse_tag(b"000000000000000100000002000000003"), None);
    }

    #[test]
    fn broadcast_templates_tag_too_and_ids_are_read() {
        let t = SendTemplate::tagged(false, 1, 64);
        let mut out = Vec::new();
        t.write_tagged(&mut out, b"", u32::MAX, 2, 9, 0xbeef);
        let h = meshbroker::ws::decode_client_frame(&mut out, 1 << 20)
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out[h.payload_range()]).unwrap();
        assert_eq!(v["targetSpec"], "*");
        assert_eq!(v["priority"], "next");
        let id = v["id"].as_str().unwrap();
        assert_eq!(parse_tag(id.as_bytes()), Some((0xbeef, u32::MAX, 9, 1)));
        let ack = br#"{"type":"ack","id":"x","messageId":"01kb2m","queued":true}"#;
        assert_eq!(message_id(ack), Some(&b"01kb2m"[..]));
        assert!(!is_non_durable_ack(ack));
        let outage = br#"{"type":"ack","id":"x","messageId":"m2","queued":true,"durable":false}"#;
        assert_eq!(message_id(outage), Some(&b"m2"[..]));
        assert!(is_non_durable_ack(outage));
        assert!(!is_non_durable_ack(br#"{"durable":true}"#));
        let push = br#"{"type":"push","messageId":"m3","meshId":"x","ciphertext":"c"}"#;
        assert_eq!(message_id(push), Some(&b"m3"[..]));
        assert_eq!(message_id(br#"{"type":"push"}"#), None);
    }

    #[test]
    fn barrier_round_trip() {
        let me = "ef".repeat(32);
        let mut frame = barrier_frame(me.as_bytes());
        let h = meshbroker::ws::decode_client_frame(&mut frame, 1 << 20)
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&frame[h.payload_range()]).unwrap();
        assert_eq!(v["targetSpec"], me);
        assert_eq!(v["priority"], "now");
        let push = format!(
            r#"{{"type":"push","messageId":"m","ciphertext":"{}"}}"#,
            v["ciphertext"].as_str().unwrap()
        );
        assert!(is_barrier_push(push.as_bytes()));
        assert_eq!(classify(push.as_bytes()), Message::ForeignPush);
        let ack = format!(r#"{{"type":"ack","id":"{BARRIER_ID}","messageId":"m","queued":true}}"#);
        assert_eq!(classify(ack.as_bytes()), Message::BarrierAck);
        let mut status = set_status_frame("dnd");
        let h = meshbroker::ws::decode_client_frame(&mut status, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            &status[h.payload_range()],
            br#"{"type":"set_status","status":"dnd"}"#
        );
        // Untagged acks keep their old meaning.
        assert_eq!(
            classify(br#"{"type":"ack","id":"","messageId":"m","queued":true}"#),
            Message::Ack { ts_ns: None }
        );
    }

    #[test]
    fn client_ids_are_patched_and_acknowledged_delivery_is_read() {
        for direct in [true, false] {
            let t = SendTemplate::with_client_ids(direct, "now", 64, "lg-r1-");
            assert!(t.has_client_ids());
            let mut out = Vec::new();
            let target = "ab".repeat(32);
            t.write(&mut out, target.as_bytes(), 3, 4, 0x55);
            t.patch_client_id(&mut out, 0x1f);
            assert_eq!(out.len(), t.frame_len());
            let h = meshbroker::ws::decode_client_frame(&mut out, 1 << 20)
                .unwrap()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out[h.payload_range()]).unwrap();
            assert_eq!(v["client_message_id"], "lg-r1-000000000000001f");
            assert_eq!(parse_hex(v["id"].as_str().unwrap().as_bytes()), Some(0x55));
            let ct = v["ciphertext"].as_str().unwrap();
            assert_eq!(parse_meta(ct.as_bytes()), Some((3, 4, 0x55)));
            assert_eq!(v["targetSpec"], if direct { target.as_str() } else { "*" });
        }
        let plain = SendTemplate::new(true, "now", 64);
        assert!(!plain.has_client_ids());
        let mut out = Vec::new();
        plain.write(&mut out, "ab".repeat(32).as_bytes(), 0, 0, 0);
        let before = out.clone();
        plain.patch_client_id(&mut out, 9);
        assert_eq!(out, before);

        let push = br#"{"type":"push","messageId":"m1","priority":"now","client_message_id":"c","nonce":"n","ciphertext":"0000000300000009000000000000abcdAAAA","createdAt":"t","redelivered":true}"#;
        assert!(is_redelivered(push));
        assert!(has_client_id(push));
        assert_eq!(
            classify(push),
            Message::Push {
                sender: 3,
                seq: 9,
                ts_ns: 0xabcd
            }
        );
        let first = br#"{"type":"push","messageId":"m1","ciphertext":"x","createdAt":"t"}"#;
        assert!(!is_redelivered(first));
        assert!(!has_client_id(first));
        assert!(is_redelivered(br#"{"redelivered":true,"type":"push"}"#));
        let dup = br#"{"type":"ack","id":"0000000000000001","messageId":"m0","queued":true,"duplicate":true}"#;
        assert!(is_duplicate_ack(dup));
        assert_eq!(classify(dup), Message::Ack { ts_ns: Some(1) });
        assert!(!is_duplicate_ack(
            br#"{"type":"ack","id":"x","messageId":"m0"}"#
        ));
        assert!(is_plain_id(b"01kb2m"));
        assert!(!is_plain_id(b"a\\b"));
        assert!(!is_plain_id(b""));
    }

    #[test]
    fn server_frame_parsing() {
        let frame = meshbroker::ws::encode_server_frame(OpCode::Text, &[b'x'; 300]);
        let h = parse_server_frame(&frame).unwrap().unwrap();
        assert_eq!(
            (h.opcode, h.fin, h.header_len, h.payload_len),
            (1, true, 4, 300)
        );
        assert_eq!(parse_server_frame(&frame[..100]), Ok(None));
        assert!(parse_server_frame(&client_frame(OpCode::Text, b"x")).is_err());
    }
}
