//! The texts the hellos' signatures cover, for every hello and
//! session_hello the shard's parser accepts (PROTOCOL.md §4:
//! `meshId|memberId|pubkey|timestamp`; §9: the attestation's and the
//! session's texts): each must be exactly that text, and each must name one
//! hello only (read back, it gives the same fields), or a signature made for
//! one hello would verify for another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{
    hello_signed_text, parse_message, session_attest_text, session_hello_signed_text,
    ClientMessage, Parser,
};

/// `text` split on `|` must give back exactly `fields`, the last a decimal
/// number equal to `number`.
fn reads_back(text: &str, fields: &[&str], number: i64) {
    let parts: Vec<&str> = text.split('|').collect();
    assert_eq!(
        parts.len(),
        fields.len() + 1,
        "{text:?} does not split into one hello's fields"
    );
    assert_eq!(&parts[..fields.len()], fields, "{text:?}");
    assert_eq!(
        parts[fields.len()].parse::<i64>().ok(),
        Some(number),
        "{text:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut parser = Parser::default();
    let Ok(parsed) = parse_message(&mut parser, data) else {
        return;
    };
    match parsed.message {
        ClientMessage::Hello(hello) => {
            let text = hello_signed_text(
                &hello.mesh_id,
                &hello.member_id,
                &hello.pubkey,
                hello.timestamp,
            );
            reads_back(
                &text,
                &[&hello.mesh_id, &hello.member_id, &hello.pubkey],
                hello.timestamp,
            );
        }
        ClientMessage::SessionHello(session) => {
            let attestation = &session.attestation;
            let attested = session_attest_text(
                &attestation.parent_member_pubkey,
                &attestation.session_pubkey,
                attestation.expires_at,
            );
            reads_back(
                &attested,
                &[
                    "claudemesh-session-attest",
                    &attestation.parent_member_pubkey,
                    &attestation.session_pubkey,
                ],
                attestation.expires_at,
            );
            let hello = &session.hello;
            let signed = session_hello_signed_text(
                &hello.mesh_id,
                &hello.pubkey,
                &session.session_pubkey,
                hello.timestamp,
            );
            reads_back(
                &signed,
                &[
                    "claudemesh-session-hello",
                    &hello.mesh_id,
                    &hello.pubkey,
                    &session.session_pubkey,
                ],
                hello.timestamp,
            );
        }
        _ => {}
    }
});
