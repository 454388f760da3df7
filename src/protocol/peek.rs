//! Reads the top-level `"id"` of a JSON message from its first bytes only,
//! for answering a message too large to parse (PROTOCOL.md §4: `error
//! too_large` echoes the send's `id` when it can be read from the first
//! 4 KiB). The prefix may be cut anywhere, so this is a small forgiving
//! scanner, not a parser: it walks the top-level object's members, skips
//! their values (nested objects, arrays and strings, which may contain an
//! `"id"` of their own) and stops at the first top-level `"id"` whose value
//! is a complete string. Anything it cannot read gives `None`.

/// The value of the top-level `"id"` string field of the JSON object that
/// `prefix` begins, if it lies complete within `prefix`. Keys and values
/// are compared and returned unescaped; an `id` that is not a string is
/// ignored (a later string-valued one is still found).
pub(crate) fn peek_id(prefix: &[u8]) -> Option<String> {
    let mut s = Scanner { buf: prefix, at: 0 };
    s.skip_ws();
    s.expect(b'{')?;
    loop {
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
        if key == b"id" && s.peek()? == b'"' {
            return String::from_utf8(s.string()?).ok();
        }
        s.skip_value()?;
    }
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
    use super::peek_id;

    fn id(text: &str) -> Option<String> {
        peek_id(text.as_bytes())
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
}
