//! Delivery (PROTOCOL.md §4 send/push and §5): direct and broadcast routing
//! within and across shards, multi-session members, mesh isolation, held
//! envelopes, slow readers, and a Node.js `ws` client. Each test runs the real
//! broker binary (2 shards) against its own fresh database.
mod common;
mod support;

use std::collections::HashSet;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

/// A base64-looking ciphertext of `len` bytes, different per `seed`.
fn ciphertext(seed: usize, len: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len)
        .map(|i| B64[(i * 7 + seed * 13 + i / 64) % 64] as char)
        .collect()
}

/// After one quiet period for all of them, none of `peers` has anything
/// more to read.
fn expect_nothing_all<'a>(peers: impl IntoIterator<Item = &'a mut Peer>) {
    std::thread::sleep(QUIET);
    for peer in peers {
        peer.expect_nothing(Duration::from_millis(5));
    }
}

#[test]
fn direct_send_reaches_the_target_on_either_shard_once() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "direct", 24);
    let mut sender = Peer::connect(&broker, &members[0]);
    let home = broker.shard_of(&sender.presence_id);

    // Shards are the kernel's choice: open sessions until one landed on the
    // sender's shard and one on the other.
    let mut same: Option<Peer> = None;
    let mut other: Option<Peer> = None;
    let mut bystanders: Vec<Peer> = Vec::new();
    for member in &members[1..] {
        let peer = Peer::connect(&broker, member);
        let shard = broker.shard_of(&peer.presence_id);
        if shard == home && same.is_none() {
            same = Some(peer);
        } else if shard != home && other.is_none() {
            other = Some(peer);
        } else {
            bystanders.push(peer);
        }
        if same.is_some() && other.is_some() {
            break;
        }
    }
    let mut same = same.expect("a session on the sender's shard");
    let mut other = other.expect("a session on the other shard");

    let tricky = "quote\" backslash\\ slash/ unicode é😀 tab\t".to_owned() + &ciphertext(1, 2048);
    let cases = [
        (&mut same, "now", "bm9uY2Ut", ciphertext(0, 3000)),
        (&mut other, "low", "bm9uY2Uu", tricky),
    ];
    let sender_member = sender.me().clone();
    for (i, (target, priority, nonce, ct)) in cases.into_iter().enumerate() {
        let ack = sender.send(target.pubkey(), priority, nonce, &ct, &format!("d{i}"));
        assert_eq!(ack["queued"], true, "{ack}");
        let push = target.recv_push(WAIT);
        assert_push(&push, &ack, &sender_member, priority, nonce, &ct);
    }
    let mut everyone: Vec<&mut Peer> = vec![&mut sender, &mut same, &mut other];
    everyone.extend(bystanders.iter_mut());
    expect_nothing_all(everyone);
}

#[test]
fn direct_send_reaches_every_session_of_the_member_once() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "multi", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut sessions: Vec<Peer> = (0..3)
        .map(|_| Peer::connect(&broker, &members[1]))
        .collect();

    let ct = ciphertext(6, 512);
    let ack = sender.send(&members[1].pubkey, "next", "n6", &ct, "to-three");
    for session in &mut sessions {
        let push = session.recv_push(WAIT);
        assert_push(&push, &ack, &members[0], "next", "n6", &ct);
    }
    expect_nothing_all(sessions.iter_mut().chain([&mut sender]));
}

#[test]
fn broadcast_reaches_every_other_member_once_across_shards() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "fanout", 50);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut twin = Peer::connect(&broker, &members[0]);
    let mut others: Vec<Peer> = members[1..]
        .iter()
        .map(|m| Peer::connect(&broker, m))
        .collect();
    let shards: HashSet<u64> = others
        .iter()
        .chain([&sender, &twin])
        .map(|p| broker.shard_of(&p.presence_id))
        .collect();
    assert_eq!(shards.len(), 2, "51 sessions all landed on one shard");

    let ct = ciphertext(7, 1024);
    let ack = sender.send("*", "now", "bm9uY2U=", &ct, "all");
    for peer in &mut others {
        let push = peer.recv_push(WAIT);
        assert_push(&push, &ack, &members[0], "now", "bm9uY2U=", &ct);
    }
    // Exactly once each, one ack, and nothing for the sender's other session.
    expect_nothing_all(others.iter_mut().chain([&mut sender, &mut twin]));
}

#[test]
fn meshes_are_isolated_even_for_the_same_key() {
    let broker = start(&[]);
    let a = seed_mesh(&broker.db, "iso-a", 1);
    create_mesh(&broker.db, "iso-b");
    let shared_key = new_key();
    let in_a = add_member_with_key(&broker.db, "iso-a", "iso-a-shared", shared_key.clone());
    let in_b = add_member_with_key(&broker.db, "iso-b", "iso-b-shared", shared_key);
    let b_other = add_member(&broker.db, "iso-b", "iso-b-other");
    assert_eq!(in_a.pubkey, in_b.pubkey);

    let mut sender = Peer::connect(&broker, &a[0]);
    let mut recv_a = Peer::connect(&broker, &in_a);
    let mut recv_b = Peer::connect(&broker, &in_b);
    let mut other_b = Peer::connect(&broker, &b_other);

    let ack = sender.send("*", "now", "n1", "broadcast-in-a", "bcast");
    let push = recv_a.recv_push(WAIT);
    assert_push(&push, &ack, &a[0], "now", "n1", "broadcast-in-a");
    assert_eq!(push["meshId"], "iso-a");

    let ack = sender.send(&in_a.pubkey, "now", "n2", "direct-in-a", "direct");
    let push = recv_a.recv_push(WAIT);
    assert_push(&push, &ack, &a[0], "now", "n2", "direct-in-a");
    assert_eq!(push["meshId"], "iso-a");

    expect_nothing_all([&mut recv_b, &mut other_b, &mut recv_a]);

    // And the other way round: mesh B traffic stays in mesh B.
    let ack = other_b.send("*", "now", "n3", "broadcast-in-b", "b-all");
    let push = recv_b.recv_push(WAIT);
    assert_push(&push, &ack, &b_other, "now", "n3", "broadcast-in-b");
    assert_eq!(push["meshId"], "iso-b");
    expect_nothing_all([&mut recv_a, &mut sender]);
}

#[test]
fn held_envelopes_reach_the_first_session_in_order_once() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "held", 2);
    let (from, to) = (&members[0], &members[1]);
    let mut sender = Peer::connect(&broker, from);

    // Three direct sends, then a broadcast, while `to` has no session.
    let sent: Vec<(Value, String)> = (0..4)
        .map(|i| {
            let ct = ciphertext(10 + i, 200);
            let target = if i < 3 { to.pubkey.as_str() } else { "*" };
            let ack = sender.send(target, "next", &format!("held-{i}"), &ct, &format!("h{i}"));
            (ack, ct)
        })
        .collect();
    broker.wait_metric("broker_queue_depth", |v| v == 4.0);

    let mut first = Peer::connect(&broker, to);
    for (i, (ack, ct)) in sent.iter().enumerate() {
        let push = first.recv_push(WAIT);
        assert_push(&push, ack, from, "next", &format!("held-{i}"), ct);
    }
    let mut second = Peer::connect(&broker, to);
    expect_nothing_all([&mut first, &mut second]);
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
}

/// A session with a tiny kernel receive buffer, for tests whose client stops
/// reading after its hello.
fn never_reading(broker: &TestBroker, member: &Member) -> Peer {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&broker.addr().into()).unwrap();
    let mut peer = Peer::over(broker, TcpStream::from(socket));
    assert_eq!(peer.hello(member)["type"], "hello_ack");
    peer
}

#[test]
fn a_slow_reader_is_cut_off_with_1013_and_others_keep_receiving() {
    slow_reader_keeps_every_acked_push(&[("MAX_OUTBOUND_BYTES", "65536")]);
}

/// Review bug: a cut-off session's queue was handed back through the
/// bounded hold, so over `MAX_HELD_PER_MEMBER` acked pushes were dropped.
#[test]
fn a_cut_off_reader_keeps_every_acked_push_even_over_the_held_bound() {
    slow_reader_keeps_every_acked_push(&[
        ("MAX_OUTBOUND_BYTES", "65536"),
        ("MAX_HELD_PER_MEMBER", "2"),
    ]);
}

fn slow_reader_keeps_every_acked_push(env: &[(&str, &str)]) {
    let mut all = UNLIMITED_SENDS.to_vec();
    all.extend_from_slice(env);
    let broker = start(&all);
    let members = seed_mesh(&broker.db, "slow", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut healthy = Peer::connect(&broker, &members[2]);

    let mut slow = never_reading(&broker, &members[1]);

    let ct = ciphertext(3, 4096);
    let mut sent_to_slow = 0;
    let mut cut = false;
    // 4 KiB each: the cap is far more than kernel buffers plus 64 KiB.
    for i in 0..4000 {
        sender.send(&members[1].pubkey, "now", "n", &ct, &format!("flood-{i}"));
        sent_to_slow += 1;
        if i % 16 == 0 {
            let ack = sender.send(
                &members[2].pubkey,
                "now",
                "h",
                "healthy",
                &format!("ok-{i}"),
            );
            let push = healthy.recv_push(WAIT);
            assert_push(&push, &ack, &members[0], "now", "h", "healthy");
            // Once the slow session is cut off, what it can no longer take is
            // held for its member: that is the sign to start reading.
            if broker.metric("broker_queue_depth") > 0.0 {
                cut = true;
                break;
            }
        }
    }
    assert!(
        cut,
        "the slow reader was never cut off after {sent_to_slow} pushes"
    );

    // The slow client finally reads: some pushes, then the close frame.
    let mut pushes = 0;
    let end = loop {
        match slow.next_event(WAIT) {
            Some(Event::Json(v)) if v["type"] == "push" => pushes += 1,
            Some(other) => break other,
            None => panic!("the slow reader's connection was left open"),
        }
    };
    assert!(
        matches!(end, Event::Close(Some(1013))),
        "expected close 1013 after {pushes} pushes, got {end:?}"
    );
    eprintln!("slow reader: {sent_to_slow} sent, {pushes} read before close");
    assert!(
        pushes < sent_to_slow,
        "it was cut off, not served everything"
    );

    // The healthy receiver is unaffected.
    let ack = sender.send(&members[2].pubkey, "now", "h", "after", "after");
    assert_push(
        &healthy.recv_push(WAIT),
        &ack,
        &members[0],
        "now",
        "h",
        "after",
    );
    broker.wait_metric(
        "broker_connections_closed_total{reason=\"slow_reader\"}",
        |v| v >= 1.0,
    );

    // Nothing acked is lost: what the cut-off session never got (queued but
    // unwritten, and everything sent after the cut) is held for its member
    // and arrives, once, when the member connects again.
    let mut again = Peer::connect(&broker, &members[1]);
    let rest = again.drain_pushes(Duration::from_secs(2));
    assert_eq!(
        pushes + rest.len(),
        sent_to_slow,
        "{pushes} read before the cut + {} after reconnecting",
        rest.len()
    );
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
}

/// The PKCS#8 DER form of an ed25519 secret key (RFC 8410), which Node's
/// `crypto.createPrivateKey` reads.
fn pkcs8_der_hex(key: &ed25519_dalek::SigningKey) -> String {
    format!("302e020100300506032b657004220420{}", hex(key.as_bytes()))
}

#[test]
fn a_node_ws_client_exchanges_messages_with_a_rust_peer() {
    let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    let has_node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_node || !node_dir.join("node_modules/ws").is_dir() {
        eprintln!(
            "skipping: needs `node` on PATH and `npm install --prefix tests/node` (ws) to have run"
        );
        return;
    }

    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "node", 2);
    let (js, rust) = (&members[0], &members[1]);
    let mut peer = Peer::connect(&broker, rust);

    let child = Command::new("node")
        .arg(node_dir.join("client.mjs"))
        .env("BROKER_WS_URL", broker.ws_url())
        .env("MESH_ID", &js.mesh_id)
        .env("MEMBER_ID", &js.id)
        .env("PUBKEY", &js.pubkey)
        .env("SECRET_PKCS8_HEX", pkcs8_der_hex(&js.key))
        .env("TARGET_PUBKEY", &rust.pubkey)
        .env("NONCE", "bm9kZS1ub25jZQ==")
        .env("CIPHERTEXT", "from-node \"quoted\" é")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");

    // Node → Rust.
    let push = peer.recv_push(Duration::from_secs(20));
    assert_eq!(push["senderPubkey"], js.pubkey.as_str(), "{push}");
    assert_eq!(push["meshId"], "node");
    assert_eq!(push["nonce"], "bm9kZS1ub25jZQ==");
    assert_eq!(push["ciphertext"], "from-node \"quoted\" é");
    // Rust → Node.
    let ack = peer.send(
        &js.pubkey,
        "now",
        "cnVzdC1ub25jZQ==",
        "from-rust ✓",
        "reply",
    );

    let output = child.wait_with_output().expect("wait for node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node client failed ({}):\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("node printed no JSON report ({e}): {stdout}"));
    assert_eq!(report["helloAck"]["type"], "hello_ack", "{report}");
    assert_eq!(report["helloAck"]["memberId"], js.id.as_str(), "{report}");
    assert_eq!(report["ack"]["type"], "ack", "{report}");
    assert_eq!(report["ack"]["id"], "from-node-1", "{report}");
    assert_eq!(report["ack"]["messageId"], push["messageId"], "{report}");
    let got = &report["push"];
    assert_push(got, &ack, rust, "now", "cnVzdC1ub25jZQ==", "from-rust ✓");
}

#[test]
fn held_envelopes_are_committed_to_postgres_before_the_ack() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "durable", 2);
    let (from, to) = (&members[0], &members[1]);
    let mut sender = Peer::connect(&broker, from);
    let ack = sender.send(&to.pubkey, "low", "n-durable", "c-durable", "keep");
    let id = ack["messageId"].as_str().unwrap().to_owned();
    // Committed before the ack: no polling.
    let rows = common::query_rows(
        &broker.db,
        &format!(
            "SELECT mesh_id, sender_member_id, target_spec, priority::text, nonce, ciphertext, \
             delivered_at IS NULL FROM mesh.message_queue WHERE id = '{id}'"
        ),
    );
    assert_eq!(rows.len(), 1, "no mesh.message_queue row for the held {id}");
    let row = &rows[0];
    assert_eq!(row.get::<_, String>(0), "durable");
    assert_eq!(row.get::<_, String>(1), from.id);
    assert_eq!(row.get::<_, String>(2), to.pubkey);
    assert_eq!(row.get::<_, String>(3), "low");
    assert_eq!(row.get::<_, String>(4), "n-durable");
    assert_eq!(row.get::<_, String>(5), "c-durable");
    assert!(row.get::<_, bool>(6), "not delivered yet");

    let mut receiver = Peer::connect(&broker, to);
    assert_push(
        &receiver.recv_push(WAIT),
        &ack,
        from,
        "low",
        "n-durable",
        "c-durable",
    );
    let delivered = poll(WAIT, || {
        common::query_rows(
            &broker.db,
            &format!(
                "SELECT 1 FROM mesh.message_queue WHERE id = '{id}' AND delivered_at IS NOT NULL"
            ),
        )
        .len()
            == 1
    });
    assert!(delivered, "delivered_at was not set for {id}");
}

/// The same routing on the epoll driver the broker falls back to where
/// io_uring is unavailable.
#[test]
fn routing_works_on_the_epoll_driver() {
    let broker = start(&[("BROKER_IO_DRIVER", "epoll")]);
    broker.wait_for_log_where("shard runtime", WAIT, |l| l["driver"] == "epoll");
    let members = seed_mesh(&broker.db, "epoll", 6);
    let mut peers: Vec<Peer> = members.iter().map(|m| Peer::connect(&broker, m)).collect();
    let ack = peers[0].send(&members[1].pubkey, "now", "n1", "direct", "d1");
    assert_push(
        &peers[1].recv_push(WAIT),
        &ack,
        &members[0],
        "now",
        "n1",
        "direct",
    );
    let ack = peers[2].send("*", "low", "n2", "to all", "b1");
    for (i, peer) in peers.iter_mut().enumerate() {
        if i != 2 {
            assert_push(
                &peer.recv_push(WAIT),
                &ack,
                &members[2],
                "low",
                "n2",
                "to all",
            );
        }
    }
    expect_nothing_all(peers.iter_mut());
}

/// A client that keeps sending but never reads is cut off when the answers
/// to its own messages fill its outbound queue; the pushes it was sent are
/// not lost.
#[test]
fn a_client_cut_off_by_its_own_answers_keeps_its_pushes() {
    // Unlimited sends: past its rate the flooder would be closed 1008
    // (RATE_LIMIT_CLOSE_AFTER) before its answers fill its queue.
    let mut env = UNLIMITED_SENDS.to_vec();
    env.push(("MAX_OUTBOUND_BYTES", "65536"));
    let broker = start(&env);
    let members = seed_mesh(&broker.db, "answers", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut flooder = never_reading(&broker, &members[1]);

    // Flood, with a push to the flooder now and then, until the broker has
    // cut it off: from then on its pushes are held for its member.
    let ct = ciphertext(5, 1024);
    let mut pushed = 0;
    let mut sends = 0;
    while broker.metric("broker_queue_depth") == 0.0 {
        assert!(
            pushed < 400,
            "the flooder was never cut off after {sends} sends"
        );
        for _ in 0..500 {
            // Not a member: each send is answered `unknown_target`.
            flooder.send_json(&serde_json::json!({
                "type": "send", "targetSpec": "ab".repeat(32), "nonce": "n",
                "ciphertext": "x", "id": format!("f{sends}"),
            }));
            sends += 1;
        }
        sender.send(&members[1].pubkey, "now", "p", &ct, &format!("p{pushed}"));
        pushed += 1;
    }

    // The flooder finally reads: answers and some pushes, then the close.
    let mut read = 0;
    loop {
        match flooder.next_event(WAIT) {
            Some(Event::Json(v)) if v["type"] == "push" => read += 1,
            Some(Event::Json(_)) => {}
            Some(Event::Close(code)) => {
                assert_eq!(code, Some(1013));
                break;
            }
            other => panic!("expected the close 1013, got {other:?}"),
        }
    }
    let mut again = Peer::connect(&broker, &members[1]);
    let rest = again.drain_pushes(Duration::from_secs(2));
    assert_eq!(
        read + rest.len(),
        pushed,
        "{read} read before the cut, {} after",
        rest.len()
    );
    broker.wait_metric(
        "broker_connections_closed_total{reason=\"slow_reader\"}",
        |v| v >= 1.0,
    );
}

/// Review bug: a broadcast refused for one member's full held queue had
/// already held the envelope for the members before it, uncounted.
#[test]
fn a_broadcast_refused_for_a_full_queue_reaches_nobody() {
    let broker = start(&[("MAX_HELD_PER_MEMBER", "2")]);
    let members = seed_mesh(&broker.db, "full", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    for i in 0..2 {
        sender.send(&members[2].pubkey, "next", "n", "held", &format!("f{i}"));
    }
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);
    sender.send_json(
        &serde_json::json!({"type":"send","targetSpec":"*","priority":"next",
        "nonce":"n","ciphertext":"all","id":"b1"}),
    );
    let error = sender.expect_error("unavailable");
    assert_eq!(error["id"], "b1");
    let mut late = Peer::connect(&broker, &members[1]);
    late.expect_nothing(Duration::from_millis(500));
    assert_eq!(broker.metric("broker_queue_depth"), 2.0);
}

/// Review bug: a shard that panicked went unnoticed. Now the broker stops,
/// says so, and exits non-zero for its supervisor to restart it.
#[test]
fn a_shard_panic_stops_the_broker_with_a_non_zero_exit() {
    let mut broker = start(&[("BROKER_FAULT_PANIC_SESSION_ID", "boom")]);
    let members = seed_mesh(&broker.db, "panic", 1);
    let mut peer = Peer::open(&broker);
    let mut hello = hello(&members[0]);
    hello["sessionId"] = "boom".into();
    peer.send_json(&hello);
    let status = broker
        .broker
        .wait_exit(Duration::from_secs(20))
        .expect("the broker exits after a shard panic");
    assert!(!status.success(), "exit status {status:?}");
    let logs = broker.logs();
    assert!(logs.iter().any(|l| l["msg"] == "panic"
        && l["thread"]
            .as_str()
            .is_some_and(|t| t.starts_with("shard-"))));
    assert!(logs
        .iter()
        .any(|l| l["msg"] == "shard panicked: stopping the broker"));
}
