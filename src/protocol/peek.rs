//! Reads the top-level `"id"` and `"_reqId"` of a JSON message from its
//! first bytes only, for answering a message too large to parse
//! (PROTOCOL.md §4: `error too_large` echoes the send's `id` when it can be
//! read from the first 4 KiB; §9: every answer echoes `_reqId`). The prefix
//! may be cut anywhere, so this is a small forgiving scanner, not a parser:
//! it walks the top-level object's members, skips their values (nested
//! objects, arrays and strings, which may contain an `"id"` of their own)
//! and keeps the first top-level `"id"` and `"_reqId"` whose values are
//! complete strings. Anything it cannot read ends the walk with what it has.

use super::MAX_REQ_ID_CHARS;

/// The correlation ids found in a message's first bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PeekedIds {
    /// The top-level `"id"` string.
    pub id: Option<String>,
    /// The top-level `"_reqId"` string, when it is a valid one (at most
    /// 64 characters).
    pub req_id: Option<String>,
}

/// The values of the top-level `"id"` and `"_reqId"` string fields of the
/// JSON object that `prefix` begins, each if it lies complete within
/// `prefix`. Keys and values are compared and returned unescaped; a value
/// that is not a string (or a `_reqId` over its limit) is ignored, and a
/// later valid one is still found.
pub(crate) fn peek_ids(prefix: &[u8]) -> PeekedIds {
    let mut found = PeekedIds::default();
    let mut s = Scanner { buf: prefix, at: 0 };
    // `None` only says where the walk stopped: what was found is kept.
    let _ = walk(&mut s, &mut found);
    found
}

fn walk(s: &mut Scanner<'_>, found: &mut PeekedIds) -> Option<()> {
    s.skip_ws();
    s.expect(b'{')?;
    while found.id.is_none() || found.req_id.is_none() {
        s.skip_ws();
        match s.peek()? {
            b'}' => return None,
            b',' => {
                s.at += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key = s.string()?;
        s.skip_ws();
        s.expect(b':')?;
        s.skip_ws();
        let slot = match key.as_slice() {
            b"id" if found.id.is_none() => &mut found.id,
            b"_reqId" if found.req_id.is_none() => &mut found.req_id,
            _ => {
                s.skip_value()?;
                continue;
            }
        };
        if s.peek()? != b'"' {
            s.skip_value()?;
            continue;
        }
        let value = String::from_utf8(s.string()?).ok();
        let limit = if key == b"_reqId" {
            MAX_REQ_ID_CHARS
        } else {
            usize::MAX
        };
        *slot = value.filter(|v| v.chars().count() <= limit);
    }
    Some(())
}

struct Scanner<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string literal starting at the opening quote, unescaped; `None`
    /// when it is cut off or malformed.
    fn string(&mut self) -> Option<Vec<u8>> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            // Copy the run up to the next quote or backslash at once.
            let rest = &self.buf[self.at..];
            let run = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
            let plain = &rest[..run];
            if plain.iter().any(|&b| b < 0x20) {
                return None;
            }
            out.extend_from_slice(plain);
            self.at += run;
            match self.next()? {
                b'"' => return Some(out),
                _ => self.escape(&mut out)?,
            }
        }
    }

    /// One escape sequence after its backslash, appended as UTF-8.
    fn escape(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let byte = match self.next()? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0C,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let unit = self.hex4()?;
                let c = match unit {
                    0xD800..=0xDBFF => {
                        self.expect(b'\\')?;
                        self.expect(b'u')?;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return None;
                        }
                        let code = 0x10000
                            + ((u32::from(unit) - 0xD800) << 10)
                            + (u32::from(low) - 0xDC00);
                        char::from_u32(code)?
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => char::from_u32(u32::from(unit))?,
                };
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                return Some(());
            }
            _ => return None,
        };
        out.push(byte);
        Some(())
    }

    fn hex4(&mut self) -> Option<u16> {
        let digits = self.buf.get(self.at..self.at + 4)?;
        let text = std::str::from_utf8(digits).ok()?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.at += 4;
        u16::from_str_radix(text, 16).ok()
    }

    /// Skips one value: a string, an object or array (whatever it nests),
    /// or a scalar (number, `true`, `false`, `null`). `None` when the value
    /// is cut off or is not one of these.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                let start = self.at;
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    if !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')) {
                        return None;
                    }
                    self.at += 1;
                }
                // A scalar is only known to be whole once what follows it
                // has arrived.
                (self.at > start && self.peek().is_some()).then_some(())
            }
        }
    }

    /// Skips a string literal, escapes included, without decoding it.
    fn skip_string(&mut self) -> Option<()> {
        self.expect(b'"')?;
        loop {
            let rest = &self.buf[self.at..];
            let run = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
            self.at += run + 1;
            if rest[run] == b'"' {
                return Some(());
            }
            // The escaped byte (for `\u`, the first hex digit; the rest are
            // plain bytes).
            self.next()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{peek_ids, PeekedIds};

    fn id(text: &str) -> Option<String> {
        peek_id(text.as_bytes())
    }

    fn peek_id(prefix: &[u8]) -> Option<String> {
        peek_ids(prefix).id
    }

    fn req_id(text: &str) -> Option<String> {
        peek_ids(text.as_bytes()).req_id
    }

    #[test]
    fn plain_message() {
        assert_eq!(
            id(r#"{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c","id":"big-1"}"#),
            Some("big-1".into())
        );
        assert_eq!(
            id(" {\n \"id\" : \"a b\" ,\"type\":\"send\"}"),
            Some("a b".into())
        );
        assert_eq!(id(r#"{"id":""}"#), Some(String::new()));
        assert_eq!(id(r#"{"type":"send"}"#), None);
        assert_eq!(id(r#"{}"#), None);
    }

    #[test]
    fn id_after_a_truncated_ciphertext_is_not_found() {
        let mut text = String::from(r#"{"type":"send","ciphertext":""#);
        text.push_str(&"QUJD".repeat(2000));
        let full = format!(r#"{text}","id":"late"}}"#);
        assert_eq!(id(&full), Some("late".into()));
        // Only the first 4 KiB: cut inside the ciphertext.
        assert_eq!(peek_id(&full.as_bytes()[..4096]), None);
    }

    #[test]
    fn id_before_a_truncated_ciphertext_is_found() {
        let mut text = String::from(r#"{"type":"send","id":"early","ciphertext":""#);
        text.push_str(&"QUJD".repeat(2000));
        assert_eq!(peek_id(&text.as_bytes()[..4096]), Some("early".into()));
    }

    #[test]
    fn nested_ids_are_ignored() {
        assert_eq!(
            id(
                r#"{"meta":{"id":"inner","list":[{"id":"x"}]},"tags":["id","{\"id\":\"s\"}"],"id":"outer"}"#
            ),
            Some("outer".into())
        );
        assert_eq!(id(r#"{"meta":{"id":"inner"}}"#), None);
        assert_eq!(id(r#"{"list":[1,{"id":"x"}],"n":3}"#), None);
        // A string value that looks like the member.
        assert_eq!(id(r#"{"note":"\"id\":\"fake\"","x":1}"#), None);
        // Cut inside a nested object: the outer id is never seen.
        assert_eq!(id(r#"{"meta":{"id":"inner","#), None);
    }

    #[test]
    fn escapes_in_keys_and_values() {
        assert_eq!(id(r#"{"id":"a\"b\\c\/d\n"}"#), Some("a\"b\\c/d\n".into()));
        assert_eq!(
            id(r#"{"\u0069d":"escaped-key"}"#),
            Some("escaped-key".into())
        );
        assert_eq!(id(r#"{"i\"d":"no","id":"yes"}"#), Some("yes".into()));
        assert_eq!(id(r#"{"id":"\u00e9\ud83d\ude00"}"#), Some("é😀".into()));
        assert_eq!(id(r#"{"x":"ends with \\","id":"q"}"#), Some("q".into()));
        // A lone surrogate or an unknown escape is not a readable id.
        assert_eq!(id(r#"{"id":"\ud83d"}"#), None);
        assert_eq!(id(r#"{"id":"\q"}"#), None);
    }

    #[test]
    fn truncated_anywhere_gives_none_until_the_id_is_complete() {
        let text = r#"{"type":"send","priority":"now","n":12,"ok":true,"id":"a\"b"}"#;
        let value_end = text.rfind('"').unwrap() + 1;
        for cut in 0..text.len() {
            let got = peek_id(&text.as_bytes()[..cut]);
            if cut < value_end {
                assert_eq!(got, None, "cut at {cut}: {:?}", &text[..cut]);
            } else {
                assert_eq!(got, Some("a\"b".into()), "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_non_string_id_is_ignored() {
        assert_eq!(id(r#"{"id":5}"#), None);
        assert_eq!(id(r#"{"id":null,"type":"send"}"#), None);
        assert_eq!(id(r#"{"id":{"id":"inner"}}"#), None);
        assert_eq!(id(r#"{"id":5,"id":"second"}"#), Some("second".into()));
    }

    #[test]
    fn not_an_object() {
        assert_eq!(id(r#"["id","x"]"#), None);
        assert_eq!(id(r#""id""#), None);
        assert_eq!(id("nope"), None);
        assert_eq!(id(""), None);
        assert_eq!(peek_id(&[0xFF, b'{']), None);
        assert_eq!(id(r#"{id:"x"}"#), None);
        assert_eq!(peek_id(b"{\"id\":\"\xFF\"}"), None);
    }

    #[test]
    fn both_ids_in_any_order() {
        let both = PeekedIds {
            id: Some("s1".into()),
            req_id: Some("r1".into()),
        };
        assert_eq!(
            peek_ids(br#"{"type":"send","_reqId":"r1","id":"s1","ciphertext":"c"}"#),
            both
        );
        assert_eq!(peek_ids(br#"{"id":"s1","nonce":"n","_reqId":"r1"}"#), both);
        assert_eq!(
            req_id(r#"{"type":"list_peers","_reqId":"r\"2"}"#),
            Some("r\"2".into())
        );
        assert_eq!(req_id(r#"{"id":"s1"}"#), None);
        // A nested `_reqId` is not the message's.
        assert_eq!(req_id(r#"{"meta":{"_reqId":"inner"},"x":1}"#), None);
    }

    #[test]
    fn one_id_is_kept_when_the_prefix_ends_before_the_other() {
        let mut text = String::from(r#"{"_reqId":"early","ciphertext":""#);
        text.push_str(&"QUJD".repeat(2000));
        let full = format!(r#"{text}","id":"late"}}"#);
        let cut = peek_ids(&full.as_bytes()[..4096]);
        assert_eq!(cut.req_id.as_deref(), Some("early"));
        assert_eq!(cut.id, None);
        let whole = peek_ids(full.as_bytes());
        assert_eq!(whole.id.as_deref(), Some("late"));
        assert_eq!(whole.req_id.as_deref(), Some("early"));
    }

    #[test]
    fn a_req_id_over_64_chars_or_not_a_string_is_ignored() {
        let long = "é".repeat(65);
        assert_eq!(req_id(&format!(r#"{{"_reqId":"{long}","id":"x"}}"#)), None);
        assert_eq!(
            peek_ids(format!(r#"{{"_reqId":"{long}","id":"x"}}"#).as_bytes()).id,
            Some("x".into())
        );
        // 64 characters (128 bytes) is within the limit.
        let max = "é".repeat(64);
        assert_eq!(req_id(&format!(r#"{{"_reqId":"{max}"}}"#)), Some(max));
        assert_eq!(
            req_id(r#"{"_reqId":7,"_reqId":"second"}"#),
            Some("second".into())
        );
        assert_eq!(req_id(r#"{"_reqId":null}"#), None);
    }
}
