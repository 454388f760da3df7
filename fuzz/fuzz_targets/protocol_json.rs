//! The JSON protocol parser, its two paths against each other. The shard
//! parses every message with `Parser::parse`: the fast send path, and the
//! tree parser for anything the fast path does not take. The fast path is
//! only an optimisation, so the shard's answer must be exactly the tree
//! parser's (the same message, or the same error: code, message text,
//! echoed `id` and `_reqId`), and whatever the fast path takes alone must
//! be the tree parser's message too. (A message nested deeper than
//! `MAX_JSON_DEPTH` is refused before either path runs. A key given twice
//! is refused by both paths when the message reads it, and ignored by both
//! when it does not.)
//!
//! `peek_ids`, the scanner that reads the `id` and `_reqId` to echo from
//! the start of a message too large to parse, is checked here as well: on
//! a whole JSON object it must find the top-level string `id` and the
//! valid `_reqId` that the tree sees, and on any shorter read of the same
//! bytes it may find less but never something else. Objects with a key
//! written twice are left out of the first comparison, by design: the
//! tree takes the first `_reqId` (and answers `invalid_field` when that one
//! is too long), while `peek_ids` takes the first valid one, so that a
//! refusal of a message it never parses still echoes what it can; JSON
//! leaves duplicate names to the reader (RFC 8259 §4).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{
    nesting_within, parse_message, parse_plain_send, parse_tree, peek_ids, Buffers, ErrorCode,
    Parser, MAX_JSON_DEPTH,
};
use simd_json::prelude::*;
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let mut buffers = Buffers::default();
    let mut tree_buf = data.to_vec();
    let tree = parse_tree(&mut tree_buf, &mut buffers);

    let mut parser = Parser::default();
    let shard = parse_message(&mut parser, data);
    if nesting_within(data, MAX_JSON_DEPTH) {
        assert_eq!(shard, tree, "the shard's parser and the tree parser differ");
        let mut fast_buf = data.to_vec();
        if let Some(fast) = parse_plain_send(&mut fast_buf, &mut buffers) {
            assert_eq!(
                Ok(&fast),
                shard.as_ref(),
                "the fast path's message is not the shard's"
            );
        }
    } else {
        // Refused before either path runs.
        assert_eq!(shard.as_ref().unwrap_err().code, ErrorCode::BadJson);
    }

    let (id, req_id) = peek_ids(data);
    // Only JSON that a strict reader accepts too: simd-json takes some
    // invalid text (digits split by spaces or NULs, read as the first
    // run), which `peek_ids` rightly stops at.
    let strict = serde_json::from_slice::<serde_json::Value>(data).is_ok();
    let mut value_buf = data.to_vec();
    if let Some(value) = strict
        .then(|| simd_json::to_borrowed_value(&mut value_buf).ok())
        .flatten()
    {
        let unique = |object: &simd_json::value::borrowed::Object<'_>| {
            object.keys().collect::<HashSet<_>>().len() == object.len()
        };
        // simd-json decodes a lone surrogate escape (`"\uD901"`) to U+0000
        // where `peek_ids` refuses the string: both only lose an echo.
        let surrogate = data.windows(3).any(|w| w == b"\\uD" || w == b"\\ud");
        if let Some(object) = value.as_object().filter(|o| unique(o) && !surrogate) {
            let string = |key: &str| object.get(key).and_then(|v| v.as_str()).map(str::to_owned);
            assert_eq!(id, string("id"), "peeked id");
            let valid_req_id = string("_reqId").filter(|r| r.chars().count() <= 64);
            assert_eq!(req_id, valid_req_id, "peeked _reqId");
        }
    }
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let (short_id, short_req_id) = peek_ids(&data[..cut]);
        assert!(
            short_id.is_none() || short_id == id,
            "id at {cut}: {short_id:?}, whole {id:?}"
        );
        assert!(
            short_req_id.is_none() || short_req_id == req_id,
            "_reqId at {cut}: {short_req_id:?}, whole {req_id:?}"
        );
    }
});
