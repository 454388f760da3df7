//! The WebSocket side of the one port: the opening handshake, frame-level
//! behaviour (ping, close, protocol violations, size limit, fragmentation,
//! UTF-8), pre-hello message errors, and the spread over shards.

mod common;
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{http, metric, poll_until, Broker, RawWs, WS_KEY};
use meshbroker::ws::OpCode;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

type Client = tungstenite::WebSocket<TcpStream>;

fn connect(broker: &Broker) -> Client {
    let stream = TcpStream::connect(broker.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (ws, response) = tungstenite::client(broker.ws_url(), stream).expect("ws handshake");
    assert_eq!(response.status(), 101);
    ws
}

fn upgrade_headers<'a>(key: &'a str, version: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
    ]
}

/// (method, path, headers, acceptable statuses)
type HandshakeCase<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a [u16]);

#[test]
fn handshake_accepted_on_ws_only() {
    let broker = Broker::start(&[]);
    let addr = broker.addr();

    let ws = connect(&broker);
    drop(ws);
    // The raw client checks the 101 status line too.
    drop(RawWs::connect(addr));

    let cases: &[HandshakeCase] = &[
        ("GET", "/other", upgrade_headers(WS_KEY, "13"), &[404]),
        ("GET", "/health", upgrade_headers(WS_KEY, "13"), &[404]),
        ("GET", "/ws", upgrade_headers(WS_KEY, "8"), &[426]),
        (
            "GET",
            "/ws",
            vec![
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "13"),
            ],
            &[400],
        ),
        ("GET", "/ws", upgrade_headers("not-a-key", "13"), &[400]),
        ("GET", "/ws", upgrade_headers("c2hvcnQ=", "13"), &[400]),
        (
            "POST",
            "/ws",
            upgrade_headers(WS_KEY, "13"),
            &[400, 404, 405],
        ),
        ("GET", "/ws", vec![], &[400, 426]),
    ];
    for (method, path, headers, want) in cases {
        let reply = http(addr, method, path, headers, b"");
        assert_ne!(
            reply.status, 101,
            "{method} {path} {headers:?} was upgraded"
        );
        assert!(
            want.contains(&reply.status),
            "{method} {path} {headers:?}: got {} {}, want one of {want:?}",
            reply.status,
            reply.text()
        );
        assert_eq!(reply.header("Access-Control-Allow-Origin"), Some("*"));
    }
    let reply = http(addr, "GET", "/ws", &upgrade_headers(WS_KEY, "8"), b"");
    assert_eq!(reply.header("Sec-WebSocket-Version"), Some("13"));
}

#[test]
fn ping_pong_and_client_close() {
    let broker = Broker::start(&[]);

    let mut ws = connect(&broker);
    ws.send(Message::Ping(b"are you there".to_vec())).unwrap();
    let pong = loop {
        match ws.read().expect("read") {
            Message::Pong(p) => break p,
            Message::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    };
    assert_eq!(pong, b"are you there");

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    let answer = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no close answer: {e}"),
        }
    };
    assert_eq!(answer.map(|f| f.code), Some(CloseCode::Normal));
    // Then the broker closes the TCP connection.
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }

    // The same with raw frames: our close(1000) is echoed, then EOF.
    let mut raw = RawWs::connect(broker.addr());
    raw.send_frame(OpCode::Ping, b"raw", true);
    let pong = raw.expect_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"raw"[..]));
    raw.send_frame(OpCode::Close, &1000u16.to_be_bytes(), true);
    assert_eq!(raw.read_close_code(), Some(1000));
    assert!(raw.wait_eof(), "TCP not closed after the close handshake");
}

/// Sends `text` and expects `{"type":"error","code":code}` back.
fn expect_error(ws: &mut RawWs, text: &[u8], code: &str) -> serde_json::Value {
    ws.send_frame(OpCode::Text, text, true);
    let reply = ws.read_json();
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(reply["message"].is_string(), "{reply}");
    reply
}

/// The connection is still usable: a message gets an answer.
fn assert_still_open(ws: &mut RawWs) {
    expect_error(ws, br#"{"type":"set_status","status":"idle"}"#, "no_hello");
}

const MAX: usize = 2048;
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

#[test]
fn frame_violations_close_with_the_right_code() {
    let broker = Broker::start(&[("MAX_MESSAGE_BYTES", &MAX.to_string())]);
    let addr = broker.addr();

    // An unmasked client frame: 1002.
    let mut ws = RawWs::connect(addr);
    let payload = br#"{"type":"dance"}"#;
    let mut unmasked = vec![0x81, payload.len() as u8];
    unmasked.extend_from_slice(payload);
    ws.send_raw(&unmasked);
    assert_eq!(ws.read_close_code(), Some(1002));
    assert!(ws.wait_eof());

    // A text message one byte over MAX_MESSAGE_BYTES: 1009.
    let mut ws = RawWs::connect(addr);
    ws.send_frame(OpCode::Text, &vec![b'x'; MAX + 1], true);
    assert_eq!(ws.read_close_code(), Some(1009));
    assert!(ws.wait_eof());

    // Over the limit only once reassembled: 1009 too.
    let mut ws = RawWs::connect(addr);
    ws.send_frame(OpCode::Text, &vec![b'x'; MAX / 2], false);
    ws.send_frame(OpCode::Continuation, &vec![b'x'; MAX / 2 + 1], true);
    assert_eq!(ws.read_close_code(), Some(1009));

    // Other RFC 6455 violations: 1002 each.
    let violations: Vec<(&str, Vec<u8>)> = vec![
        (
            "close code 999",
            meshbroker::ws::encode_client_frame(OpCode::Close, &999u16.to_be_bytes(), MASK, true),
        ),
        (
            "ping over 125 bytes",
            meshbroker::ws::encode_client_frame(OpCode::Ping, &[b'p'; 126], MASK, true),
        ),
        (
            "fragmented ping",
            meshbroker::ws::encode_client_frame(OpCode::Ping, b"p", MASK, false),
        ),
        (
            "continuation with nothing to continue",
            meshbroker::ws::encode_client_frame(OpCode::Continuation, b"x", MASK, true),
        ),
        (
            "close payload of one byte",
            meshbroker::ws::encode_client_frame(OpCode::Close, &[3], MASK, true),
        ),
        ("reserved bit set", {
            let mut f = meshbroker::ws::encode_client_frame(OpCode::Text, b"{}", MASK, true);
            f[0] |= 0x40;
            f
        }),
        ("reserved opcode 0x3", {
            let mut f = meshbroker::ws::encode_client_frame(OpCode::Text, b"{}", MASK, true);
            f[0] = (f[0] & 0xF0) | 0x3;
            f
        }),
        ("new text inside a fragmented message", {
            let mut f = meshbroker::ws::encode_client_frame(OpCode::Text, b"{\"ty", MASK, false);
            f.extend(meshbroker::ws::encode_client_frame(
                OpCode::Text,
                b"{}",
                MASK,
                true,
            ));
            f
        }),
    ];
    for (what, bytes) in violations {
        let mut ws = RawWs::connect(addr);
        ws.send_raw(&bytes);
        assert_eq!(ws.read_close_code(), Some(1002), "{what}");
        assert!(ws.wait_eof(), "{what}: TCP not closed");
    }

    // Invalid UTF-8 in a text frame: 1007.
    let mut ws = RawWs::connect(addr);
    ws.send_frame(OpCode::Text, b"{\"type\":\"\xff\xfe\"}", true);
    assert_eq!(ws.read_close_code(), Some(1007));
    assert!(ws.wait_eof());
}

#[test]
fn messages_before_hello_get_errors_and_keep_the_connection() {
    let broker = Broker::start(&[("MAX_MESSAGE_BYTES", &MAX.to_string())]);
    let mut ws = RawWs::connect(broker.addr());

    // Exactly MAX_MESSAGE_BYTES is accepted (and, being padding, is not JSON).
    expect_error(&mut ws, &vec![b'x'; MAX], "bad_json");
    assert_still_open(&mut ws);

    // Also when it arrives in fragments that add up to exactly the limit.
    ws.send_frame(OpCode::Text, &vec![b'y'; MAX - 100], false);
    ws.send_frame(OpCode::Continuation, &[b'y'; 100], true);
    assert_eq!(ws.read_json()["code"], "bad_json");

    expect_error(&mut ws, b"nope", "bad_json");
    assert_still_open(&mut ws);

    expect_error(&mut ws, br#"{"type":"dance"}"#, "unknown_type");
    assert_still_open(&mut ws);

    // A client_ack (PROTOCOL.md §11) is a known message: before a hello it
    // gets no_hello, with its _reqId.
    let reply = expect_error(
        &mut ws,
        br#"{"type":"client_ack","messageId":"m1","_reqId":"a1"}"#,
        "no_hello",
    );
    assert_eq!(reply["_reqId"], "a1", "{reply}");

    let reply = expect_error(
        &mut ws,
        br#"{"type":"send","targetSpec":"*","nonce":"n","ciphertext":"c","id":"early-1"}"#,
        "no_hello",
    );
    assert_eq!(reply["id"], "early-1", "{reply}");

    // Binary frames carry the same JSON.
    ws.send_frame(OpCode::Binary, br#"{"type":"dance"}"#, true);
    assert_eq!(ws.read_json()["code"], "unknown_type");

    // A send split over three frames with a ping in between is reassembled:
    // the ping is answered at once, the send gets no_hello with its id.
    let send = br#"{"type":"send","targetSpec":"*","priority":"now","nonce":"bm9uY2U=","ciphertext":"Y2lwaGVy","id":"frag-7"}"#;
    let (a, rest) = send.split_at(20);
    let (b, c) = rest.split_at(40);
    ws.send_frame(OpCode::Text, a, false);
    ws.send_frame(OpCode::Ping, b"mid", true);
    ws.send_frame(OpCode::Continuation, b, false);
    ws.send_frame(OpCode::Continuation, c, true);
    let pong = ws.expect_frame();
    assert_eq!(pong.opcode, 0xA, "{pong:?}");
    assert_eq!(pong.payload, b"mid");
    let reply = ws.read_json();
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "no_hello", "{reply}");
    assert_eq!(reply["id"], "frag-7", "{reply}");
    assert_still_open(&mut ws);

    // Invalid UTF-8 split across fragments is still refused with 1007.
    let mut bad = RawWs::connect(broker.addr());
    bad.send_frame(OpCode::Text, b"{\"a\":\"\xe2\x82", false);
    bad.send_frame(OpCode::Continuation, b"\x28\"}", true);
    assert_eq!(bad.read_close_code(), Some(1007));

    // Nothing above closed the connection: a normal close still works.
    ws.send_frame(OpCode::Close, &1000u16.to_be_bytes(), true);
    assert_eq!(ws.read_close_code(), Some(1000));
}

#[test]
fn frames_sent_with_the_handshake_are_not_lost() {
    let broker = Broker::start(&[]);
    let mut early = meshbroker::ws::encode_client_frame(OpCode::Ping, b"early", MASK, true);
    early.extend(meshbroker::ws::encode_client_frame(
        OpCode::Text,
        br#"{"type":"dance"}"#,
        MASK,
        true,
    ));
    let mut ws = RawWs::connect_with(broker.addr(), &early);
    let pong = ws.expect_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"early"[..]));
    assert_eq!(ws.read_json()["code"], "unknown_type");
}

#[test]
fn connections_spread_over_both_shards() {
    let broker = Broker::start(&[("BROKER_SHARDS", "2")]);
    let clients: Vec<RawWs> = (0..40).map(|_| RawWs::connect(broker.addr())).collect();
    let samples = poll_until(Duration::from_secs(10), "40 active connections", || {
        let samples = broker.scrape();
        (metric(&samples, "broker_connections_active", &[]) == Some(40.0)).then_some(samples)
    });
    let shard0 = metric(
        &samples,
        "broker_shard_connections_active",
        &[("shard", "0")],
    )
    .expect("shard 0 gauge");
    let shard1 = metric(
        &samples,
        "broker_shard_connections_active",
        &[("shard", "1")],
    )
    .expect("shard 1 gauge");
    assert!(
        shard0 > 0.0 && shard1 > 0.0,
        "shard0={shard0} shard1={shard1}"
    );
    assert_eq!(shard0 + shard1, 40.0);
    drop(clients);
    poll_until(
        Duration::from_secs(10),
        "connections to be released",
        || (metric(&broker.scrape(), "broker_connections_active", &[]) == Some(0.0)).then_some(()),
    );
}

#[test]
fn default_limit_with_64_bit_lengths() {
    // The default MAX_MESSAGE_BYTES (65536) needs the 64-bit length form.
    let broker = Broker::start(&[]);
    let mut ws = RawWs::connect(broker.addr());
    let mut big = vec![b' '; 65536];
    big[..4].copy_from_slice(b"nope");
    expect_error(&mut ws, &big, "bad_json");
    assert_still_open(&mut ws);
    // A ping with the largest control payload is echoed whole.
    ws.send_frame(OpCode::Ping, &[b'q'; 125], true);
    let pong = ws.expect_frame();
    assert_eq!((pong.opcode, pong.payload.len()), (0xA, 125));
    ws.send_frame(OpCode::Text, &vec![b' '; 65537], true);
    assert_eq!(ws.read_close_code(), Some(1009));
}

/// A `send` of exactly `len` bytes: `before` (fields, each followed by a
/// comma) ahead of a ciphertext padded to length, `after` (fields, each
/// preceded by a comma) behind it.
fn big_send(before: &str, after: &str, len: usize) -> Vec<u8> {
    let head =
        format!(r#"{{"type":"send","targetSpec":"*","nonce":"bm9uY2U=",{before}"ciphertext":""#);
    let tail = format!(r#""{after}}}"#);
    let pad = len - head.len() - tail.len();
    format!(
        "{head}{}{tail}",
        "QUJD".repeat(pad / 4 + 1)[..pad].to_owned()
    )
    .into_bytes()
}

/// Writes raw client frames under a `Peer`'s WebSocket.
fn send_frames(peer: &mut support::Peer, frames: &[(OpCode, &[u8], bool)]) {
    let mut wire = Vec::new();
    for &(opcode, payload, fin) in frames {
        wire.extend(meshbroker::ws::encode_client_frame(
            opcode,
            payload,
            rand::random(),
            fin,
        ));
    }
    peer.stream().write_all(&wire).expect("write frames");
}

/// The next message must be `error too_large` (echoing `id`, or without
/// one), then the close must be 1009.
fn expect_too_large(peer: &mut support::Peer, id: Option<&str>) {
    let error = peer.expect_error("too_large");
    assert!(error["message"].is_string(), "{error}");
    match id {
        Some(id) => assert_eq!(error["id"], id, "{error}"),
        None => assert!(error.get("id").is_none(), "no id to echo: {error}"),
    }
    peer.expect_close(1009);
}

#[test]
fn too_large_is_answered_with_the_id_from_the_first_4_kib_before_1009() {
    const SMALL: usize = 8192;
    let broker = support::start(&[("MAX_MESSAGE_BYTES", &SMALL.to_string())]);
    let members = support::seed_mesh(&broker.db, "big", 1);
    let joined = || support::Peer::connect(&broker, &members[0]);

    // One frame over the limit, the id near the start.
    let mut peer = joined();
    let send = big_send(r#""id":"big-1","#, "", SMALL + 2000);
    send_frames(&mut peer, &[(OpCode::Text, &send, true)]);
    expect_too_large(&mut peer, Some("big-1"));

    // The id still within the first 4 KiB, but past what the first read
    // of the frame brings (the read buffer is sized from the hello): the
    // broker reads on for it.
    let mut peer = joined();
    let before = format!(r#""pad":"{}","id":"big-3k","#, "p".repeat(3000));
    let send = big_send(&before, "", SMALL + 2000);
    send_frames(&mut peer, &[(OpCode::Text, &send, true)]);
    expect_too_large(&mut peer, Some("big-3k"));

    // The id after 5 KiB of ciphertext: not in the first 4 KiB.
    let mut peer = joined();
    let send = big_send("", r#","id":"big-2""#, SMALL + 2000);
    assert!(String::from_utf8_lossy(&send).find("big-2").unwrap() > 5 * 1024);
    send_frames(&mut peer, &[(OpCode::Text, &send, true)]);
    expect_too_large(&mut peer, None);

    // Fragmented: the third fragment takes the message over the limit.
    let mut peer = joined();
    let send = big_send(r#""id":"frag-big","#, "", 9000);
    send_frames(
        &mut peer,
        &[
            (OpCode::Text, &send[..3000], false),
            (OpCode::Continuation, &send[3000..6000], false),
            (OpCode::Continuation, &send[6000..], true),
        ],
    );
    expect_too_large(&mut peer, Some("frag-big"));

    // Fragmented, with a continuation whose header alone is over the limit:
    // the id comes from the fragment buffered before it.
    let mut peer = joined();
    let send = big_send(r#""id":"frag-huge","#, "", SMALL + 2000);
    send_frames(
        &mut peer,
        &[
            (OpCode::Text, &send[..60], false),
            (OpCode::Continuation, &send[60..], true),
        ],
    );
    expect_too_large(&mut peer, Some("frag-huge"));

    // Before hello as well.
    let mut raw = RawWs::connect(broker.addr());
    raw.send_frame(
        OpCode::Text,
        &big_send(r#""id":"early-big","#, "", SMALL + 1),
        true,
    );
    let error = raw.read_json();
    assert_eq!(
        (&error["code"], &error["id"]),
        (&"too_large".into(), &"early-big".into()),
        "{error}"
    );
    assert_eq!(raw.read_close_code(), Some(1009));
    assert!(raw.wait_eof());

    // Nothing else was affected: a send of exactly the limit is routed.
    let mut peer = joined();
    let send = big_send(r#""id":"at-limit","#, "", SMALL);
    send_frames(&mut peer, &[(OpCode::Text, &send, true)]);
    let ack = peer.next_reply(support::WAIT);
    assert_eq!(
        (&ack["type"], &ack["id"]),
        (&"ack".into(), &"at-limit".into()),
        "{ack}"
    );
}
