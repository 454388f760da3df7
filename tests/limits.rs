//! The limits an operator sets against one client exhausting the broker
//! (issue 13): the hello deadline, the HTTP keep-alive idle timeout, the
//! close after sustained send-rate abuse, and a member's held bytes. Each
//! is seen as a client sees it and counted in `/metrics`. Real broker,
//! real Postgres, real sockets.
mod common;
mod support;

use common::{RawWs, WS_KEY};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use support::*;

/// A deadline of 1 s is checked on the 1 s housekeeping tick: cut within 3 s.
const CUT: Duration = Duration::from_secs(4);

fn connect(broker: &TestBroker) -> TcpStream {
    let stream = TcpStream::connect(broker.addr()).expect("connect");
    stream.set_read_timeout(Some(CUT)).unwrap();
    stream
}

/// Everything the broker sends until it closes the connection; panics if
/// it is still open after `CUT`.
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => got,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => got,
        Err(e) => panic!("still open after {CUT:?} ({e}); got {got:?}"),
    }
}

/// `broker_connections_closed_total{reason}` once it reaches `expected`
/// (a close is counted just after the socket is shut).
fn assert_closed_total(broker: &TestBroker, reason: &str, expected: f64) {
    let mut last = 0.0;
    let reached = poll(WAIT, || {
        last = common::metric(
            &broker.scrape(),
            "broker_connections_closed_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0);
        last >= expected
    });
    assert!(
        reached && last == expected,
        "closed {{reason={reason}}}: {last}"
    );
}

fn labelled(broker: &TestBroker, name: &str, limit: &str) -> f64 {
    common::metric(&broker.scrape(), name, &[("limit", limit)]).unwrap_or(0.0)
}

#[test]
fn sockets_that_say_nothing_or_trickle_are_cut_at_the_hello_deadline() {
    let broker = start(&[
        ("HELLO_TIMEOUT_SECONDS", "1"),
        ("HTTP_IDLE_TIMEOUT_SECONDS", "1"),
    ]);
    let members = seed_mesh(&broker.db, "quiet", 1);

    // Connects and sends nothing: closed without an answer.
    let mut silent = connect(&broker);
    assert_eq!(read_to_close(&mut silent), b"");

    // Trickles a request head and never finishes it: 408, then closed.
    let mut trickle = connect(&broker);
    for byte in b"GET /health" {
        trickle.write_all(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = String::from_utf8(read_to_close(&mut trickle)).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with(r#"{"error":"request timeout","ok":false}"#),
        "{answer}"
    );
    assert!(answer.contains("Connection: close\r\n"), "{answer}");

    // A head in time but a body that never comes whole: 408 too.
    let mut body = connect(&broker);
    body.write_all(b"POST /hook/set-status HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let answer = String::from_utf8(read_to_close(&mut body)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");

    // Upgraded but never says hello: close 1008, reason hello_timeout.
    let mut mute = RawWs::connect(broker.addr());
    let frame = mute.expect_frame();
    assert_eq!(frame.close_code(), Some(1008), "{frame:?}");
    assert_eq!(&frame.payload[2..], b"hello_timeout");
    assert!(mute.wait_eof());

    let t = "broker_http_timeouts_total";
    assert_eq!(labelled(&broker, t, "hello"), 3.0);
    assert_eq!(labelled(&broker, t, "idle"), 0.0);
    assert_closed_total(&broker, "hello_timeout", 1.0);

    // A hello in time is not cut when the deadline passes afterwards.
    let mut peer = Peer::connect(&broker, &members[0]);
    std::thread::sleep(Duration::from_millis(2500));
    let reply = peer.request(&json!({"type": "list_peers"}));
    assert_eq!(reply["type"], "peers_list", "{reply}");
    assert_closed_total(&broker, "hello_timeout", 1.0);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() {
    let broker = start(&[
        ("HELLO_TIMEOUT_SECONDS", "1"),
        ("HTTP_IDLE_TIMEOUT_SECONDS", "2"),
    ]);
    let request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut conn = connect(&broker);
    // Requests every 700 ms: past the hello deadline, never idle 2 s.
    for _ in 0..4 {
        conn.write_all(request).unwrap();
        let mut buf = [0u8; 4096];
        let n = conn.read(&mut buf).expect("answered");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
        std::thread::sleep(Duration::from_millis(700));
    }
    // Then idle: closed without a word.
    assert_eq!(read_to_close(&mut conn), b"");
    assert_eq!(labelled(&broker, "broker_http_timeouts_total", "idle"), 1.0);
    assert_eq!(
        labelled(&broker, "broker_http_timeouts_total", "hello"),
        0.0
    );

    // The upgrade of a keep-alive connection: the hello deadline still
    // counts from accept, so a late upgrade gets no time to say hello.
    let mut late = connect(&broker);
    late.write_all(request).unwrap();
    let mut buf = [0u8; 4096];
    let _ = late.read(&mut buf).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    late.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let answer = read_to_close(&mut late);
    assert!(answer.starts_with(b"HTTP/1.1 101 "));
    // The close frame: 0x88, length, code 1008, "hello_timeout".
    let close = &answer[answer.len() - 17..];
    assert_eq!(&close[..4], &[0x88, 15, 0x03, 0xf0]);
}

#[test]
fn a_member_that_keeps_sending_over_its_rate_is_closed_1008() {
    let broker = start(&[
        ("SEND_RATE_PER_MIN", "60"),
        ("SEND_BURST", "1"),
        ("RATE_LIMIT_CLOSE_AFTER", "3"),
    ]);
    let members = seed_mesh(&broker.db, "rate", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let target = members[1].pubkey.clone();
    let send = |sender: &mut Peer, id: &str| {
        sender.send_json(
            &json!({"type": "send", "targetSpec": target, "priority": "now",
            "nonce": "n", "ciphertext": "c", "id": id}),
        );
    };
    send(&mut sender, "s0");
    assert_eq!(sender.next_reply(WAIT)["type"], "ack");
    for id in ["s1", "s2"] {
        send(&mut sender, id);
        assert_eq!(sender.expect_error("rate_limited")["id"], id);
    }
    // The bucket refills one send a second: an accepted send in between
    // starts the count again.
    std::thread::sleep(Duration::from_millis(1300));
    send(&mut sender, "s3");
    assert_eq!(sender.next_reply(WAIT)["type"], "ack");
    for id in ["s4", "s5"] {
        send(&mut sender, id);
        assert_eq!(sender.expect_error("rate_limited")["id"], id);
    }
    // The third refusal in a row is answered, then the session is closed.
    send(&mut sender, "s6");
    assert_eq!(sender.expect_error("rate_limited")["id"], "s6");
    sender.expect_close(1008);
    assert_closed_total(&broker, "rate_limited", 1.0);
    assert_eq!(broker.metric("broker_sends_rate_limited_total"), 5.0);

    // The member is not banned: it connects again and sends when it may.
    std::thread::sleep(Duration::from_millis(1100));
    let mut again = Peer::connect(&broker, &members[0]);
    again.send(&target, "now", "n", "c", "after");
}

#[test]
fn a_member_holding_too_many_bytes_refuses_new_sends_until_it_drains() {
    let mut env = UNLIMITED_SENDS.to_vec();
    env.push(("MAX_HELD_BYTES_PER_MEMBER", "65536"));
    let broker = start(&env);
    let members = seed_mesh(&broker.db, "bytes", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    let (away, other) = (&members[1], &members[2]);
    // About 20 KB of push frame each: three fit in 64 KiB, a fourth does not.
    let ct = "x".repeat(20_000);
    for i in 0..3 {
        let ack = sender.send(&away.pubkey, "now", "n", &ct, &format!("h{i}"));
        assert_eq!(ack["queued"], true);
    }
    sender.send_json(
        &json!({"type": "send", "targetSpec": away.pubkey, "priority": "now",
        "nonce": "n", "ciphertext": ct, "id": "h3"}),
    );
    let refused = sender.expect_error("unavailable");
    assert_eq!(refused["id"], "h3");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("MAX_HELD_BYTES_PER_MEMBER"),
        "{refused}"
    );
    // A broadcast that would have to hold for it is refused whole, and
    // reaches nobody.
    let mut bystander = Peer::connect(&broker, other);
    sender.send_json(
        &json!({"type": "send", "targetSpec": "*", "priority": "now",
        "nonce": "n", "ciphertext": ct, "id": "all"}),
    );
    assert_eq!(sender.expect_error("unavailable")["id"], "all");
    bystander.expect_nothing(QUIET);
    let h = "broker_held_refused_total";
    assert_eq!(labelled(&broker, h, "bytes"), 2.0);
    assert_eq!(labelled(&broker, h, "count"), 0.0);

    // Small sends for others still go; once the member takes what it
    // holds, it has room again.
    sender.send(&other.pubkey, "now", "n", "small", "o1");
    assert_eq!(bystander.recv_push(WAIT)["ciphertext"], "small");
    let mut back = Peer::connect(&broker, away);
    for i in 0..3 {
        let push = back.recv_push(WAIT);
        assert_eq!(push["ciphertext"].as_str().unwrap().len(), 20_000, "h{i}");
    }
    back.close();
    std::thread::sleep(Duration::from_millis(300));
    let ack = sender.send(&away.pubkey, "now", "n", &ct, "h4");
    assert_eq!(ack["queued"], true);
}

#[test]
fn limits_are_validated_at_start() {
    for (var, bad) in [
        ("HELLO_TIMEOUT_SECONDS", "0"),
        ("HTTP_IDLE_TIMEOUT_SECONDS", "soon"),
        ("RATE_LIMIT_CLOSE_AFTER", "0"),
        ("MAX_HELD_BYTES_PER_MEMBER", "1024"),
    ] {
        let (status, stderr) = common::run_broker_expect_exit(&[(var, bad)]);
        assert_eq!(status.code(), Some(1), "{var}={bad}: {stderr}");
        assert!(stderr.contains(var), "{var}={bad}: {stderr}");
    }
}
