//! `POST /join` bodies: step 1 (the fields) and step 2 (the signature) on
//! arbitrary bytes. An accepted body's invite has canonical bytes that
//! read back to its fields (so the signature covers one invite only), and
//! the payload the broker writes for `meshbroker invite` (`to_json`,
//! `token`) parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{invite_canonical, parse_join_request, validate_join, JoinError};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_join_request(&mut data.to_vec());
    let validated = validate_join(&mut data.to_vec());
    let request = match (&parsed, &validated) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "step 1 failed, so validate must fail the same way");
            assert_eq!(a.code(), "invalid_field");
            return;
        }
        (Ok(_), Err(JoinError::BadSignature)) => parsed.unwrap(),
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            parsed.unwrap()
        }
        other => panic!("parse and validate disagree: {other:?}"),
    };

    let payload = &request.payload;
    let canonical = invite_canonical(payload);
    let fields: Vec<&str> = canonical.split('|').collect();
    let want = [
        payload.v.to_string(),
        payload.mesh_id.clone(),
        payload.mesh_slug.clone(),
        payload.broker_url.clone(),
        payload.expires_at.to_string(),
        payload.mesh_root_key.clone(),
        payload.role.as_str().to_owned(),
        payload.owner_pubkey.clone(),
    ];
    assert_eq!(fields, want, "canonical bytes {canonical:?}");

    assert_eq!(request.peer_pubkey.len(), 64);
    assert!(request
        .peer_pubkey
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    let chars = request.display_name.chars().count();
    assert!((1..=64).contains(&chars));

    // What the broker writes parses back to the same request.
    let body = format!(
        r#"{{"invite_token":"{}","invite_payload":{},"peer_pubkey":"{}","display_name":{}}}"#,
        payload.token(),
        payload.to_json(),
        request.peer_pubkey,
        serde_json::to_string(&request.display_name).unwrap(),
    );
    let again = parse_join_request(&mut body.into_bytes()).expect("the broker's own invite");
    assert_eq!(&again.payload, payload);
    assert_eq!(again.display_name, request.display_name);
});
