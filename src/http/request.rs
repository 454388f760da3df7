//! Request-head parsing (request line and header fields) with `httparse`.

/// Largest request head (request line + headers + blank line) we accept.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields we accept in one request.
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Options,
    Head,
    Other,
}

impl Method {
    fn from_token(m: &str) -> Method {
        // Methods are case-sensitive (RFC 9110 §9.1).
        match m {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "OPTIONS" => Method::Options,
            "HEAD" => Method::Head,
            _ => Method::Other,
        }
    }
}

/// What the router needs to know about a request, owned so the read buffer can be
/// reused for the body.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    /// The path, without query string (`/hook/set-status?x=1` → `/hook/set-status`).
    /// An absolute-form target (`http://host/p`) is reduced to its path.
    pub path: String,
    /// `Content-Length`, when present (duplicates must agree).
    pub content_length: Option<usize>,
    /// `Transfer-Encoding: chunked` (the only transfer coding accepted).
    pub chunked: bool,
    /// HTTP/1.1: true unless `Connection: close`; HTTP/1.0: only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Upgrade` lists the token `websocket` (any case).
    pub upgrade_websocket: bool,
    /// `Connection` lists the token `upgrade` (any case).
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Key`, trimmed (appearing twice is `Malformed`).
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`, trimmed.
    pub ws_version: Option<String>,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before sending the
    /// body (curl does this for bodies over 1 KiB).
    pub expect_continue: bool,
    /// Bytes of the head, including the final CRLF CRLF; the body starts here.
    pub head_len: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("request head too large")]
    HeadTooLarge,
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("malformed request")]
    Malformed,
    #[error("invalid Content-Length")]
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding` (a request-smuggling shape).
    #[error("both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    /// A transfer coding other than plain `chunked`.
    #[error("unsupported Transfer-Encoding")]
    UnsupportedTransferEncoding,
    /// Not HTTP/1.0 or HTTP/1.1 (e.g. an HTTP/2 preface).
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
}

impl HttpError {
    /// The status code to answer with (then close the connection).
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::Malformed | HttpError::BadContentLength | HttpError::AmbiguousLength => 400,
            HttpError::UnsupportedTransferEncoding => 501,
            HttpError::UnsupportedVersion => 505,
        }
    }
}

/// Parse the request head at the start of `buf`.
///
/// `Ok(None)`: the head is not complete yet, read more. Once `buf` holds
/// [`MAX_HEAD_BYTES`] without a complete head the answer is `Err(HeadTooLarge)`, so
/// the caller never needs to buffer more than that. Bytes after the head (the body,
/// or a pipelined request) are left alone: see [`RequestHead::head_len`].
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if window.len() >= MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(HttpError::UnsupportedVersion),
        Err(_) => return Err(HttpError::Malformed),
    };
    // httparse fills these on Complete.
    let method = Method::from_token(req.method.ok_or(HttpError::Malformed)?);
    let target = req.path.ok_or(HttpError::Malformed)?;
    let minor_version = req.version.ok_or(HttpError::Malformed)?;

    let mut head = RequestHead {
        method,
        path: path_of(target).to_owned(),
        content_length: None,
        chunked: false,
        keep_alive: minor_version >= 1,
        upgrade_websocket: false,
        connection_upgrade: false,
        ws_key: None,
        ws_version: None,
        expect_continue: false,
        head_len,
    };
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut transfer_encoding = false;

    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::BadContentLength)?;
            // "42, 42" and repeated identical fields are the same length (RFC 9112 §6.3);
            // anything that disagrees is refused.
            for part in v.split(',') {
                let n = parse_length(part.trim()).ok_or(HttpError::BadContentLength)?;
                match head.content_length {
                    Some(prev) if prev != n => return Err(HttpError::BadContentLength),
                    _ => head.content_length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
            for coding in tokens(v) {
                if head.chunked {
                    // chunked must be the final coding, applied once.
                    return Err(HttpError::Malformed);
                }
                if coding.eq_ignore_ascii_case("chunked") {
                    head.chunked = true;
                } else {
                    transfer_encoding = true;
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens_bytes(h.value) {
                if t.eq_ignore_ascii_case("close") {
                    conn_close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    conn_keep_alive = true;
                } else if t.eq_ignore_ascii_case("upgrade") {
                    head.connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            if tokens_bytes(h.value).any(|t| t.eq_ignore_ascii_case("websocket")) {
                head.upgrade_websocket = true;
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if head.ws_key.is_some() {
                return Err(HttpError::Malformed);
            }
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
            head.ws_key = Some(v.trim().to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            let v = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed)?;
            head.ws_version = Some(v.trim().to_owned());
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = std::str::from_utf8(h.value)
                .map(|v| v.trim().eq_ignore_ascii_case("100-continue"))
                .unwrap_or(false);
        }
    }

    if transfer_encoding || (head.chunked && minor_version == 0) {
        // A coding other than chunked (alone) — or any coding on HTTP/1.0, which has none.
        if !head.chunked && transfer_encoding {
            // The body length cannot be determined (RFC 9112 §6.3 item 4).
            return Err(HttpError::Malformed);
        }
        return Err(HttpError::UnsupportedTransferEncoding);
    }
    if head.chunked && head.content_length.is_some() {
        return Err(HttpError::AmbiguousLength);
    }
    head.keep_alive = if minor_version >= 1 {
        !conn_close
    } else {
        conn_keep_alive && !conn_close
    };
    Ok(Some(head))
}

/// The path part of a request target: query dropped, absolute form reduced.
fn path_of(target: &str) -> &str {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        // Compared as bytes: the target may hold UTF-8 that a `str` slice at
        // the scheme's length would cut inside a character (a panic).
        let n = scheme.len();
        if t.len() > n && t.as_bytes()[..n].eq_ignore_ascii_case(scheme.as_bytes()) {
            let rest = &t[n..];
            t = rest.find('/').map_or("/", |i| &rest[i..]);
            break;
        }
    }
    let end = t.find(['?', '#']).unwrap_or(t.len());
    &t[..end]
}

/// A Content-Length value: ASCII digits only (no sign, no spaces), fitting usize.
fn parse_length(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Comma-separated list elements, trimmed, empty ones skipped.
fn tokens(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Like [`tokens`] on raw header bytes; a non-UTF-8 value has no tokens we know.
fn tokens_bytes(v: &[u8]) -> impl Iterator<Item = &str> {
    tokens(std::str::from_utf8(v).unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `http_head` fuzz target: a target with UTF-8 where the
    /// scheme's length ends was sliced inside a character (a shard panic).
    #[test]
    fn fuzz_multibyte_target_at_the_scheme_length_is_not_cut() {
        let raw = b"E tp:/\xd1\x97\xc5\xbf HTTP/1.1\n\n";
        let head = parse_head(raw).expect("parses").expect("complete");
        assert_eq!(head.path, "tp:/\u{457}\u{17f}");
        assert_eq!(
            ok("GET h\u{e9}tps://x/y HTTP/1.1\r\n\r\n").path,
            "h\u{e9}tps://x/y"
        );
    }

    fn parse(s: &str) -> Result<Option<RequestHead>, HttpError> {
        parse_head(s.as_bytes())
    }

    fn ok(s: &str) -> RequestHead {
        parse(s).expect("parse error").expect("incomplete")
    }

    #[test]
    fn complete_get() {
        let raw = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        let h = ok(raw);
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path, "/health");
        assert_eq!(h.head_len, raw.len());
        assert_eq!(h.content_length, None);
        assert!(!h.chunked && h.keep_alive && !h.upgrade_websocket && !h.expect_continue);
    }

    #[test]
    fn head_len_excludes_body() {
        let raw = "POST /hook/set-status HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let h = ok(raw);
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.content_length, Some(2));
        assert_eq!(&raw.as_bytes()[h.head_len..], b"{}");
    }

    #[test]
    fn partial_heads_are_incomplete() {
        let raw = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..raw.len() {
            assert_eq!(
                parse(&raw[..cut]).map(|h| h.is_some()),
                Ok(false),
                "cut {cut}"
            );
        }
        assert!(ok(raw).head_len == raw.len());
    }

    #[test]
    fn methods() {
        for (m, want) in [
            ("GET", Method::Get),
            ("POST", Method::Post),
            ("OPTIONS", Method::Options),
            ("HEAD", Method::Head),
            ("DELETE", Method::Other),
            ("get", Method::Other),
        ] {
            assert_eq!(ok(&format!("{m} / HTTP/1.1\r\n\r\n")).method, want);
        }
    }

    #[test]
    fn query_is_stripped() {
        assert_eq!(ok("GET /ws?token=abc HTTP/1.1\r\n\r\n").path, "/ws");
        assert_eq!(ok("GET /metrics? HTTP/1.1\r\n\r\n").path, "/metrics");
        assert_eq!(
            ok("GET http://h:7900/health?x HTTP/1.1\r\n\r\n").path,
            "/health"
        );
        assert_eq!(ok("GET http://h:7900 HTTP/1.1\r\n\r\n").path, "/");
        assert_eq!(ok("OPTIONS * HTTP/1.1\r\n\r\n").path, "*");
    }

    #[test]
    fn keep_alive_rules() {
        assert!(ok("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(
            !ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n").keep_alive
        );
    }

    #[test]
    fn header_count_limit() {
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert!(ok(&raw).keep_alive);
        let over = raw.replacen("\r\n\r\n", "\r\nX-last: v\r\n\r\n", 1);
        assert_eq!(parse(&over).unwrap_err(), HttpError::TooManyHeaders);
        assert_eq!(HttpError::TooManyHeaders.status(), 431);
    }

    #[test]
    fn head_size_limit() {
        // Incomplete and already MAX_HEAD_BYTES long: too large.
        let mut raw = String::from("GET / HTTP/1.1\r\nX-Big: ");
        raw.push_str(&"a".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            parse(&raw[..MAX_HEAD_BYTES - 1]).map(|h| h.is_some()),
            Ok(false)
        );
        assert_eq!(
            parse(&raw[..MAX_HEAD_BYTES]).unwrap_err(),
            HttpError::HeadTooLarge
        );
        assert_eq!(parse(&raw).unwrap_err(), HttpError::HeadTooLarge);
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
        // A head of exactly MAX_HEAD_BYTES is fine, even with a body after it.
        let prefix = "GET / HTTP/1.1\r\nX-Big: ";
        let fill = MAX_HEAD_BYTES - prefix.len() - 4;
        let exact = format!("{prefix}{}\r\n\r\nBODY", "b".repeat(fill));
        assert_eq!(ok(&exact).head_len, MAX_HEAD_BYTES);
        // One byte more is refused.
        let over = format!("{prefix}{}\r\n\r\n", "b".repeat(fill + 1));
        assert_eq!(parse(&over).unwrap_err(), HttpError::HeadTooLarge);
    }

    #[test]
    fn content_length_rules() {
        let cl = |v: &str| parse(&format!("POST / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n"));
        assert_eq!(cl("0").unwrap().unwrap().content_length, Some(0));
        assert_eq!(cl("65536").unwrap().unwrap().content_length, Some(65536));
        assert_eq!(cl("7, 7").unwrap().unwrap().content_length, Some(7));
        for bad in [
            "",
            "-1",
            "+5",
            "abc",
            "1 2",
            "0x10",
            "5, 6",
            "99999999999999999999999",
        ] {
            assert_eq!(cl(bad).unwrap_err(), HttpError::BadContentLength, "{bad:?}");
        }
        let dup_same = "POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(ok(dup_same).content_length, Some(3));
        let dup_diff = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(parse(dup_diff).unwrap_err(), HttpError::BadContentLength);
        assert_eq!(HttpError::BadContentLength.status(), 400);
    }

    #[test]
    fn transfer_encoding() {
        let h = ok("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert!(h.chunked);
        assert_eq!(h.content_length, None);
        let both = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(parse(both).unwrap_err(), HttpError::AmbiguousLength);
        let gz = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(
            parse(gz).unwrap_err(),
            HttpError::UnsupportedTransferEncoding
        );
        assert_eq!(HttpError::UnsupportedTransferEncoding.status(), 501);
        let not_last = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(parse(not_last).unwrap_err(), HttpError::Malformed);
        let only_gz = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(parse(only_gz).unwrap_err(), HttpError::Malformed);
        let twice =
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(twice).unwrap_err(), HttpError::Malformed);
        let http10 = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse(http10).unwrap_err(),
            HttpError::UnsupportedTransferEncoding
        );
    }

    #[test]
    fn upgrade_detection() {
        let raw = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\
                   Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ== \r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
        let h = ok(raw);
        assert!(h.upgrade_websocket && h.connection_upgrade && h.keep_alive);
        assert_eq!(h.ws_key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(h.ws_version.as_deref(), Some("13"));

        let h = ok("GET /ws HTTP/1.1\r\nupgrade: h2c, websocket\r\nconnection: UPGRADE\r\n\r\n");
        assert!(h.upgrade_websocket && h.connection_upgrade);
        let h = ok("GET /ws HTTP/1.1\r\nUpgrade: h2c\r\nConnection: keep-alive\r\n\r\n");
        assert!(!h.upgrade_websocket && !h.connection_upgrade);
        // "upgrade" must be a whole token.
        let h = ok("GET /ws HTTP/1.1\r\nUpgrade: websockets\r\nConnection: upgraded\r\n\r\n");
        assert!(!h.upgrade_websocket && !h.connection_upgrade);
        let dup = "GET /ws HTTP/1.1\r\nSec-WebSocket-Key: a\r\nSec-WebSocket-Key: b\r\n\r\n";
        assert_eq!(parse(dup).unwrap_err(), HttpError::Malformed);
    }

    #[test]
    fn expect_continue() {
        let h = ok("POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-Continue\r\n\r\n");
        assert!(h.expect_continue);
    }

    #[test]
    fn malformed_and_versions() {
        assert_eq!(
            parse("GET / HTTP/1.1\r\nBad Header\r\n\r\n").unwrap_err(),
            HttpError::Malformed
        );
        assert_eq!(
            parse("\x16\x03\x01\x02\x00").unwrap_err(),
            HttpError::Malformed
        );
        assert_eq!(
            parse("GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            HttpError::UnsupportedVersion
        );
        assert_eq!(HttpError::UnsupportedVersion.status(), 505);
        assert_eq!(HttpError::Malformed.status(), 400);
    }
}
