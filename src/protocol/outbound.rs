//! Server → client messages, written by hand into a byte buffer (see mod.rs).
use super::{ErrorCode, Priority};

/// The fields of a `push`, borrowed from the send that caused it.
pub struct PushFields<'a> {
    pub message_id: &'a str,
    pub mesh_id: &'a str,
    pub sender_pubkey: &'a str,
    pub priority: Priority,
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
    out.reserve(160 + push.nonce.len() + push.ciphertext.len());
    out.extend_from_slice(b"{\"type\":\"push\",\"messageId\":");
    write_str(out, push.message_id);
    out.extend_from_slice(b",\"meshId\":");
    write_str(out, push.mesh_id);
    out.extend_from_slice(b",\"senderPubkey\":");
    write_str(out, push.sender_pubkey);
    out.extend_from_slice(b",\"priority\":\"");
    out.extend_from_slice(push.priority.as_str().as_bytes());
    out.extend_from_slice(b"\",\"nonce\":");
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

/// `durable` is `None` for the normal ack, `Some(false)` while Postgres is down.
pub fn write_ack(out: &mut Vec<u8>, id: &str, message_id: &str, durable: Option<bool>) {
    out.extend_from_slice(b"{\"type\":\"ack\",\"id\":");
    write_str(out, id);
    out.extend_from_slice(b",\"messageId\":");
    write_str(out, message_id);
    out.extend_from_slice(b",\"queued\":true");
    if let Some(durable) = durable {
        out.extend_from_slice(if durable {
            b",\"durable\":true"
        } else {
            b",\"durable\":false"
        });
    }
    out.push(b'}');
}

pub fn write_hello_ack(out: &mut Vec<u8>, presence_id: &str, mesh_id: &str, member_id: &str) {
    out.extend_from_slice(b"{\"type\":\"hello_ack\",\"presenceId\":");
    write_str(out, presence_id);
    out.extend_from_slice(b",\"meshId\":");
    write_str(out, mesh_id);
    out.extend_from_slice(b",\"memberId\":");
    write_str(out, member_id);
    out.push(b'}');
}

pub fn write_error(out: &mut Vec<u8>, code: ErrorCode, message: &str, id: Option<&str>) {
    out.extend_from_slice(b"{\"type\":\"error\",\"code\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    write_str(out, message);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        write_str(out, id);
    }
    out.push(b'}');
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

    #[test]
    fn push_round_trips_with_escapes() {
        let mut out = Vec::new();
        write_push(
            &mut out,
            &PushFields {
                message_id: "m1",
                mesh_id: "mesh\"1",
                sender_pubkey: "ab",
                priority: Priority::Low,
                nonce: "n\\o\n",
                ciphertext: "c\u{1}é",
                created_at: "2026-01-01T00:00:00.000Z",
            },
        );
        let v = parsed(&out);
        assert_eq!(v["type"], "push");
        assert_eq!(v["meshId"], "mesh\"1");
        assert_eq!(v["priority"], "low");
        assert_eq!(v["nonce"], "n\\o\n");
        assert_eq!(v["ciphertext"], "c\u{1}é");
    }

    #[test]
    fn ack_error_and_hello_ack_shapes() {
        let mut out = Vec::new();
        write_ack(&mut out, "c1", "m1", None);
        let v = parsed(&out);
        assert_eq!(v["queued"], true);
        assert!(v.get("durable").is_none());
        out.clear();
        write_ack(&mut out, "", "m1", Some(false));
        assert_eq!(parsed(&out)["durable"], false);
        out.clear();
        write_error(
            &mut out,
            ErrorCode::UnknownTarget,
            "no such member",
            Some("x"),
        );
        let v = parsed(&out);
        assert_eq!(v["code"], "unknown_target");
        assert_eq!(v["id"], "x");
        out.clear();
        write_error(&mut out, ErrorCode::NoHello, "hello first", None);
        assert!(parsed(&out).get("id").is_none());
        out.clear();
        write_hello_ack(&mut out, "p", "m", "u");
        assert_eq!(parsed(&out)["presenceId"], "p");
    }
}
