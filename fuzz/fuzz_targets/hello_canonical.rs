//! The text a hello's signature covers (PROTOCOL.md §4,
//! `meshId|memberId|pubkey|timestamp`), for every hello the shard's parser
//! accepts: it must be that text, and it must name one hello only (read
//! back, it gives the same four fields), or a signature made for one
//! hello would verify for another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{hello_signed_text, parse_message, ClientMessage, Parser};

fuzz_target!(|data: &[u8]| {
    let mut parser = Parser::default();
    let Ok(parsed) = parse_message(&mut parser, data) else {
        return;
    };
    let ClientMessage::Hello(hello) = parsed.message else {
        return;
    };
    let text = hello_signed_text(
        &hello.mesh_id,
        &hello.member_id,
        &hello.pubkey,
        hello.timestamp,
    );
    assert_eq!(
        text,
        format!(
            "{}|{}|{}|{}",
            hello.mesh_id, hello.member_id, hello.pubkey, hello.timestamp
        )
    );
    let fields: Vec<&str> = text.split('|').collect();
    assert_eq!(
        fields.len(),
        4,
        "{text:?} does not split into one hello's fields"
    );
    assert_eq!(fields[0], hello.mesh_id);
    assert_eq!(fields[1], hello.member_id);
    assert_eq!(fields[2], hello.pubkey);
    assert_eq!(fields[3].parse::<i64>().ok(), Some(hello.timestamp));
});
