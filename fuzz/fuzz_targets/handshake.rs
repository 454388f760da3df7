//! The opening handshake: upgrade requests built from fuzzer-chosen
//! header values go through `parse_head`, which must report the upgrade
//! facts the headers state; the key check must agree with RFC 6455 §4.1's
//! definition (base64 of 16 bytes), and the accept value must be the
//! 28-character base64 of a SHA-1 digest that ignores the key's padding
//! whitespace.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{
    accept_key, is_valid_client_key, parse_head, switching_protocols_response, Method,
};

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    http10: bool,
    path: String,
    key: Option<String>,
    version: Option<String>,
    upgrade: Option<String>,
    connection: Option<String>,
    /// Other header fields, by name index and value.
    extra: Vec<(u8, String)>,
}

const METHODS: [(&str, Method); 6] = [
    ("GET", Method::Get),
    ("POST", Method::Post),
    ("OPTIONS", Method::Options),
    ("HEAD", Method::Head),
    ("PUT", Method::Other),
    ("get", Method::Other),
];
const EXTRA_NAMES: [&str; 4] = ["Host", "Origin", "Sec-WebSocket-Protocol", "User-Agent"];

/// A header value httparse takes as it is: tab, visible ASCII, obs-text.
fn is_field_value(v: &str) -> bool {
    v.bytes()
        .all(|b| b == b'\t' || (0x20..0x7F).contains(&b) || b >= 0x80)
}

/// RFC 6455 §4.1: the key is the base64 (RFC 4648 §4, padded) of 16
/// bytes: 22 alphabet characters, the last of which has its low 4 bits
/// zero (they encode no data), then `==`.
fn is_rfc_key(key: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = key.as_bytes();
    b.len() == 24
        && b[..22].iter().all(|c| ALPHABET.contains(c))
        && ALPHABET.iter().position(|c| *c == b[21]).unwrap() & 0xF == 0
        && &b[22..] == b"=="
}

/// The list elements of a header value, as RFC 9110 §5.6.1 reads them.
fn lists(value: &Option<String>, token: &str) -> bool {
    value.as_deref().is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
    })
}

fuzz_target!(|input: Input| {
    let (method, want_method) = METHODS[usize::from(input.method) % METHODS.len()];
    let path: String = input
        .path
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "/_.-=&".contains(*c))
        .collect();
    let version = if input.http10 { "1.0" } else { "1.1" };
    let mut request = format!("{method} /{path} HTTP/{version}\r\n");
    let fields = [
        ("Sec-WebSocket-Key", &input.key),
        ("Sec-WebSocket-Version", &input.version),
        ("Upgrade", &input.upgrade),
        ("Connection", &input.connection),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            if !is_field_value(v) {
                return;
            }
            request.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    for (name, value) in &input.extra {
        if !is_field_value(value) {
            return;
        }
        let name = EXTRA_NAMES[usize::from(*name) % EXTRA_NAMES.len()];
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");

    let head = match parse_head(request.as_bytes()) {
        Ok(Some(head)) => head,
        // The request is well formed: only its size may be refused.
        Ok(None) => panic!("incomplete: {request:?}"),
        Err(err) => {
            assert!(
                input.extra.len() + 5 > 64 || request.len() > 16 * 1024,
                "{err:?}: {request:?}"
            );
            return;
        }
    };
    assert_eq!(head.head_len, request.len());
    assert_eq!(head.method, want_method);
    assert_eq!(head.path, format!("/{path}"));
    assert_eq!(head.ws_key.as_deref(), input.key.as_deref().map(str::trim));
    assert_eq!(
        head.ws_version.as_deref(),
        input.version.as_deref().map(str::trim)
    );
    assert_eq!(head.upgrade_websocket, lists(&input.upgrade, "websocket"));
    assert_eq!(head.connection_upgrade, lists(&input.connection, "upgrade"));

    if let Some(key) = &head.ws_key {
        assert_eq!(is_valid_client_key(key), is_rfc_key(key.trim()), "{key:?}");
        let accept = accept_key(key);
        assert_eq!(accept.len(), 28);
        assert!(accept.ends_with('='));
        assert_eq!(accept, accept_key(&format!(" \t{key} ")));
        let response = String::from_utf8(switching_protocols_response(key)).unwrap();
        assert!(response.contains(&format!("\r\nSec-WebSocket-Accept: {accept}\r\n")));
    }
});
