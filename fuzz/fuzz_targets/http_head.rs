//! `parse_head` on arbitrary bytes: no panic, and what it reports is
//! consistent with the bytes it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{parse_head, HttpError, MAX_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    let result = parse_head(data);
    match &result {
        Ok(Some(head)) => {
            assert!(head.head_len <= data.len(), "head_len past the input");
            assert!(head.head_len <= MAX_HEAD_BYTES, "head_len past the limit");
            assert_eq!(data[head.head_len - 1], b'\n', "head does not end a line");
            assert!(!(head.chunked && head.content_length.is_some()));
            assert!(
                !head.path.contains(['?', '#']),
                "query left in {:?}",
                head.path
            );
            // The head alone parses the same: what follows it is not read.
            let alone = parse_head(&data[..head.head_len]);
            assert_eq!(format!("{alone:?}"), format!("{result:?}"));
            // A shorter read never looks complete (the shard parses as the
            // bytes arrive).
            for cut in [head.head_len - 1, head.head_len / 2] {
                assert!(
                    !matches!(parse_head(&data[..cut]), Ok(Some(_))),
                    "complete at {cut} of {}",
                    head.head_len
                );
            }
        }
        Ok(None) => assert!(data.len() < MAX_HEAD_BYTES, "incomplete past the limit"),
        Err(HttpError::HeadTooLarge) => assert!(data.len() >= MAX_HEAD_BYTES),
        Err(err) => assert!(matches!(err.status(), 400 | 431 | 501 | 505)),
    }
});
