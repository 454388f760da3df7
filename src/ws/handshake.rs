//! The server half of the RFC 6455 opening handshake (§4.2): check the
//! client's `Sec-WebSocket-Key` and build the `101 Switching Protocols`
//! answer. The HTTP layer parses the request; this only knows the key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Appended to the client key before hashing (RFC 6455 §1.3).
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client key: base64 of the SHA-1 of the key
/// followed by the RFC's GUID. Surrounding whitespace of the key is ignored.
pub fn accept_key(client_key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(client_key.trim().as_bytes());
    sha.update(WEBSOCKET_GUID);
    STANDARD.encode(sha.finalize())
}

/// A key is valid when it base64-decodes to exactly 16 bytes (§4.1), i.e.
/// 24 characters of canonical padded base64. Surrounding whitespace is
/// ignored.
pub fn is_valid_client_key(key: &str) -> bool {
    let key = key.trim();
    // 24 base64 characters decode to at most 18 bytes.
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut decoded), Ok(16))
}

/// The complete `101 Switching Protocols` response for a client key.
pub fn switching_protocols_response(client_key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\
         Access-Control-Allow-Origin: *\r\n\
         \r\n",
        accept_key(client_key)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn accept_key_ignores_surrounding_whitespace() {
        assert_eq!(
            accept_key(" dGhlIHNhbXBsZSBub25jZQ==\t"),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_keys_decode_to_16_bytes() {
        assert!(is_valid_client_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_valid_client_key("AAAAAAAAAAAAAAAAAAAAAA=="));
        assert!(is_valid_client_key(" dGhlIHNhbXBsZSBub25jZQ== "));
    }

    #[test]
    fn invalid_keys_are_refused() {
        for key in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",     // unpadded
            "dGhlIHNhbXBsZSBub25j",       // 15 bytes
            "dGhlIHNhbXBsZSBub25jZQ==AA", // trailing data
            "dGhlIHNhbXBsZSBub25jZQ=!",   // not base64
            "dGhlIHNhbXBsZSBub25jZR==",   // non-canonical trailing bits
            "AAAAAAAAAAAAAAAAAAAAAAAA",   // 18 bytes
            "dGhlIHNhbXBsZSBub25jZQ-_",   // URL-safe alphabet
        ] {
            assert!(!is_valid_client_key(key), "{key:?} accepted");
        }
    }

    #[test]
    fn response_has_status_line_headers_and_blank_line() {
        let response = switching_protocols_response("dGhlIHNhbXBsZSBub25jZQ==");
        let text = std::str::from_utf8(&response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        let headers: Vec<&str> = text.trim_end().lines().skip(1).collect();
        assert_eq!(
            headers,
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                "Access-Control-Allow-Origin: *",
            ]
        );
    }
}
