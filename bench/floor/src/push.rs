//! A send read without a JSON parser — its fields found by key, their
//! values copied as written (JSON-escaped) — and the ack and push it is
//! answered with, each written straight into its server frame.
use bytes::Bytes;
use meshbroker::ws::{self, OpCode};
use std::io::Write as _;
use std::time::SystemTime;

const SEND: &[u8] = b"{\"type\":\"send\"";

/// What a message after the hello is answered with.
pub(crate) enum Answer {
    /// The sender's ack, and the push for every other subscriber.
    Broadcast { ack: Bytes, push: Bytes },
    /// An `error` frame: the floor takes only sends to `*`.
    Refused(Bytes),
}

/// Answers one message after the hello. `sender` is the connection's
/// [`sender_fields`]; `message_id` names the envelope.
pub(crate) fn answer(message: &[u8], message_id: &[u8; 16], sender: &[u8]) -> Answer {
    let id = field(message, b"\"id\":\"");
    if !message.starts_with(SEND) {
        return Answer::Refused(error("unknown_type", "the floor takes only sends", id));
    }
    if field(message, b"\"targetSpec\":\"") != Some(b"*") {
        return Answer::Refused(error("unsupported_target", "the floor only broadcasts", id));
    }
    let Some(ciphertext) = field(message, b"\"ciphertext\":\"") else {
        return Answer::Refused(error("invalid_field", "ciphertext", id));
    };
    let priority = field(message, b"\"priority\":\"").unwrap_or(b"next");
    let nonce = field(message, b"\"nonce\":\"").unwrap_or_default();
    let id = id.unwrap_or_default();
    let ack = frame(64 + id.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"ack\",\"id\":\"");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\",\"messageId\":\"");
        out.extend_from_slice(message_id);
        out.extend_from_slice(b"\",\"queued\":true}");
    });
    let push = frame(128 + sender.len() + nonce.len() + ciphertext.len(), |out| {
        out.extend_from_slice(b"{\"type\":\"push\",\"messageId\":\"");
        out.extend_from_slice(message_id);
        out.extend_from_slice(sender);
        out.extend_from_slice(priority);
        out.extend_from_slice(b"\",\"nonce\":\"");
        out.extend_from_slice(nonce);
        out.extend_from_slice(b"\",\"ciphertext\":\"");
        out.extend_from_slice(ciphertext);
        out.extend_from_slice(b"\",\"createdAt\":\"");
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        write!(out, "{now}\"}}").expect("writing to a Vec");
    });
    Answer::Broadcast { ack, push }
}

/// What every push of one sender carries between its `messageId` and its
/// `priority` value, written once at the hello: the fields a broker push
/// of a broadcast has (PROTOCOL.md §4, §10).
pub(crate) fn sender_fields(mesh_id: &str, pubkey: &str) -> Box<[u8]> {
    use meshbroker::protocol::write_json_str;
    let mut out = b"\",\"meshId\":".to_vec();
    write_json_str(&mut out, mesh_id);
    out.extend_from_slice(b",\"senderPubkey\":");
    write_json_str(&mut out, pubkey);
    out.extend_from_slice(b",\"senderMemberPubkey\":");
    write_json_str(&mut out, pubkey);
    out.extend_from_slice(b",\"targetSpec\":\"*\",\"priority\":\"");
    out.into_boxed_slice()
}

/// `{"type":"error",…}`, echoing the send's `id` as written.
pub(crate) fn error(code: &str, message: &str, id: Option<&[u8]>) -> Bytes {
    frame(64 + message.len(), |out| {
        write!(
            out,
            "{{\"type\":\"error\",\"code\":\"{code}\",\"message\":\"{message}\""
        )
        .expect("writing to a Vec");
        if let Some(id) = id {
            out.extend_from_slice(b",\"id\":\"");
            out.extend_from_slice(id);
            out.push(b'"');
        }
        out.push(b'}');
    })
}

/// A text frame whose payload `write` puts after room for its header.
fn frame(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut out = Vec::with_capacity(ws::SERVER_HEADER_ROOM + capacity);
    out.resize(ws::SERVER_HEADER_ROOM, 0);
    write(&mut out);
    ws::finish_server_frame(out, OpCode::Text)
}

/// The string value after `key` (`"name":"`), still escaped: enough for
/// the flat objects the loadgen sends, and never a copy.
fn field<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = memchr::memmem::find(json, key)? + key.len();
    let mut at = start;
    loop {
        at += memchr::memchr2(b'"', b'\\', json.get(at..)?)?;
        if json[at] == b'"' {
            return Some(&json[start..at]);
        }
        // An escape: the next byte is never the closing quote.
        at += 2;
    }
}

pub(crate) fn put_hex(out: &mut [u8], mut v: u64) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> serde_json::Value {
        serde_json::from_slice(ws::server_frame_payload(frame)).unwrap()
    }

    #[test]
    fn a_broadcast_is_acked_and_pushed_with_its_fields_as_written() {
        let send = br#"{"type":"send","targetSpec":"*","priority":"now","nonce":"n1","ciphertext":"a\"b","id":"00000000000003e8"}"#;
        let sender = sender_fields("mesh-1", &"ab".repeat(32));
        let Answer::Broadcast { ack, push } = answer(send, b"0001000000000002", &sender) else {
            panic!("refused");
        };
        assert!(
            ws::server_frame_payload(&ack).starts_with(br#"{"type":"ack","id":"00000000000003e8""#)
        );
        assert_eq!(payload(&ack)["messageId"], "0001000000000002");
        let push = payload(&push);
        assert_eq!(push["type"], "push");
        assert_eq!(push["meshId"], "mesh-1");
        assert_eq!(push["senderPubkey"], "ab".repeat(32));
        assert_eq!(push["priority"], "now");
        assert_eq!(push["nonce"], "n1");
        assert_eq!(push["ciphertext"], "a\"b");
        assert!(push["createdAt"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn anything_but_a_send_to_star_is_refused() {
        for (message, code, id) in [
            (
                &br#"{"type":"send","targetSpec":"abc","id":"7"}"#[..],
                "unsupported_target",
                Some("7"),
            ),
            (
                br#"{"type":"set_status","status":"idle"}"#,
                "unknown_type",
                None,
            ),
            (
                br#"{"type":"send","targetSpec":"*"}"#,
                "invalid_field",
                None,
            ),
        ] {
            let Answer::Refused(error) = answer(message, &[b'0'; 16], b"") else {
                panic!("{message:?} accepted");
            };
            let error = payload(&error);
            assert_eq!(error["code"], code);
            assert_eq!(error["id"].as_str(), id);
        }
    }

    #[test]
    fn fields_end_at_their_unescaped_quote() {
        assert_eq!(
            field(br#"{"a":"x\\","b":"y"}"#, b"\"a\":\""),
            Some(&br"x\\"[..])
        );
        assert_eq!(
            field(br#"{"a":"x\"y"}"#, b"\"a\":\""),
            Some(&br#"x\"y"#[..])
        );
        assert_eq!(field(br#"{"a":"x\"#, b"\"a\":\""), None);
        assert_eq!(field(br#"{"b":"x"}"#, b"\"a\":\""), None);
    }
}
