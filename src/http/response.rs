//! Responses: built by the router, serialized once into the bytes to write.

use std::fmt::Write as _;

/// An HTTP response with a complete body (we never stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Written after the standard headers. A `Connection` entry here replaces the
    /// one [`Response::to_bytes`] would write (e.g. `Connection: Upgrade` on a 101).
    pub extra_headers: Vec<(&'static str, String)>,
}

pub const JSON: &str = "application/json";

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type,
            body,
            extra_headers: Vec::new(),
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self::new(status, JSON, body)
    }

    pub fn empty(status: u16) -> Self {
        Self::new(status, "", Vec::new())
    }

    /// Add a header (builder style).
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.extra_headers.push((name, value.into()));
        self
    }

    /// Serialize: status line with reason phrase, `Content-Length` (not on 1xx/204),
    /// `Content-Type` (when there is a body), `Access-Control-Allow-Origin: *`,
    /// `Connection: keep-alive|close`, the extra headers, then the body.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        let no_body_allowed = self.status < 200 || self.status == 204 || self.status == 304;
        if !no_body_allowed {
            let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        }
        if !self.body.is_empty() && !self.content_type.is_empty() {
            let _ = write!(head, "Content-Type: {}\r\n", self.content_type);
        }
        head.push_str("Access-Control-Allow-Origin: *\r\n");
        let own_connection = self
            .extra_headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("connection"));
        if !own_connection {
            head.push_str(if keep_alive {
                "Connection: keep-alive\r\n"
            } else {
                "Connection: close\r\n"
            });
        }
        for (name, value) in &self.extra_headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if !no_body_allowed {
            out.extend_from_slice(&self.body);
        }
        out
    }

    /// The answer to a HEAD request: the same head (the `Content-Length` a
    /// GET would get included) and no body (RFC 9110 §9.3.2), so the next
    /// response on a keep-alive connection is not misread.
    pub fn to_head_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = self.to_bytes(keep_alive);
        let no_body_allowed = self.status < 200 || self.status == 204 || self.status == 304;
        if !no_body_allowed {
            out.truncate(out.len() - self.body.len());
        }
        out
    }
}

/// The OPTIONS answer on any path: 204 with permissive CORS headers.
pub fn preflight() -> Response {
    Response::empty(204)
        .with_header("Access-Control-Allow-Methods", "POST, GET, OPTIONS")
        .with_header("Access-Control-Allow-Headers", "Content-Type")
}

/// `{"ok":false,"error":msg}` with the given status.
pub fn error_json(status: u16, msg: &str) -> Response {
    let body = serde_json::json!({ "ok": false, "error": msg });
    Response::json(status, body.to_string().into_bytes())
}

/// `{"ok":false,"error":code,"message":message}` with the given status
/// (the answers of `POST /join`, whose `error` is a stable code).
pub fn error_code_json(status: u16, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "ok": false, "error": code, "message": message });
    Response::json(status, body.to_string().into_bytes())
}

/// The reason phrase for a status code (`""` for codes we never send).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(r: &Response, keep_alive: bool) -> String {
        String::from_utf8(r.to_bytes(keep_alive)).unwrap()
    }

    #[test]
    fn json_response_bytes() {
        let r = Response::json(200, br#"{"ok":true}"#.to_vec());
        assert_eq!(
            text_of(&r, true),
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\
             Access-Control-Allow-Origin: *\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}"
        );
        assert!(text_of(&r, false).contains("\r\nConnection: close\r\n"));
    }

    #[test]
    fn empty_response_has_zero_length_and_no_type() {
        let s = text_of(&Response::empty(404), true);
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(s.contains("Content-Length: 0\r\n"));
        assert!(!s.contains("Content-Type"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn preflight_is_204_with_cors() {
        let s = text_of(&preflight(), true);
        assert!(s.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!s.contains("Content-Length"));
        assert!(s.contains("Access-Control-Allow-Origin: *\r\n"));
        assert!(s.contains("Access-Control-Allow-Methods: POST, GET, OPTIONS\r\n"));
        assert!(s.contains("Access-Control-Allow-Headers: Content-Type\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn error_json_escapes() {
        let r = error_json(400, "bad \"thing\"");
        assert_eq!(r.status, 400);
        assert_eq!(r.content_type, JSON);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": false, "error": "bad \"thing\""})
        );
        assert!(text_of(&r, false).starts_with("HTTP/1.1 400 Bad Request\r\n"));
    }

    #[test]
    fn error_code_json_has_code_and_message() {
        let r = error_code_json(429, "rate_limited", "slow down");
        assert_eq!(r.status, 429);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": false, "error": "rate_limited", "message": "slow down"})
        );
        assert!(text_of(&r, false).starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
    }

    #[test]
    fn extra_connection_header_replaces_ours() {
        let r = Response::empty(101)
            .with_header("Upgrade", "websocket")
            .with_header("Connection", "Upgrade");
        let s = text_of(&r, true);
        assert!(s.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert_eq!(s.matches("Connection:").count(), 1);
        assert!(s.contains("Connection: Upgrade\r\n"));
        assert!(!s.contains("Content-Length"));
    }
}
