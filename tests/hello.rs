//! The hello handshake (PROTOCOL.md §4): admission, every refusal, capacity,
//! message validation around it, and revocation of a live session. Each test
//! runs the real broker binary (2 shards) against its own fresh database.
mod common;
mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn presence_row(db: &str, id: &str) -> Option<tokio_postgres::Row> {
    common::query_rows(
        db,
        &format!(
            "SELECT member_id, session_id, pid, cwd, disconnected_at IS NULL AS live \
             FROM mesh.presence WHERE id = '{id}'"
        ),
    )
    .into_iter()
    .next()
}

#[test]
fn signed_hello_is_acked_and_recorded_as_presence() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "alpha", 1);
    let member = &members[0];

    let mut peer = Peer::open(&broker);
    let mut hello = hello(member);
    hello["sessionId"] = json!("session-one");
    hello["pid"] = json!(31337);
    hello["cwd"] = json!("/home/dev/project");
    let ack = peer.request(&hello);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    assert_eq!(ack["meshId"], "alpha", "{ack}");
    assert_eq!(ack["memberId"], member.id.as_str(), "{ack}");
    let presence = ack["presenceId"].as_str().expect("presenceId").to_owned();
    assert!(!presence.is_empty());

    assert!(
        poll(WAIT, || presence_row(&broker.db, &presence).is_some()),
        "no mesh.presence row {presence}"
    );
    let row = presence_row(&broker.db, &presence).unwrap();
    assert_eq!(row.get::<_, String>("member_id"), member.id);
    assert_eq!(row.get::<_, String>("session_id"), "session-one");
    assert_eq!(row.get::<_, i32>("pid"), 31337);
    assert_eq!(row.get::<_, String>("cwd"), "/home/dev/project");
    assert!(
        row.get::<_, bool>("live"),
        "disconnected_at is NULL while connected"
    );
    let seen = |db: &str| {
        common::query_rows(
            db,
            &format!(
                "SELECT last_seen_at IS NOT NULL FROM mesh.member WHERE id = '{}'",
                member.id
            ),
        )[0]
        .get::<_, bool>(0)
    };

    peer.close();
    assert!(
        poll(WAIT, || !presence_row(&broker.db, &presence)
            .unwrap()
            .get::<_, bool>("live")),
        "disconnected_at was not set after the close"
    );
    assert!(
        poll(WAIT, || seen(&broker.db)),
        "member.last_seen_at was not set"
    );
}

/// PROTOCOL.md §7: shutdown marks every live presence disconnected.
#[test]
fn shutdown_closes_every_live_presence() {
    let mut broker = start(&[]);
    let members = seed_mesh(&broker.db, "closing", 4);
    let peers: Vec<Peer> = members.iter().map(|m| Peer::connect(&broker, m)).collect();
    let ids: Vec<String> = peers.iter().map(|p| p.presence_id.clone()).collect();
    assert!(
        poll(WAIT, || ids
            .iter()
            .all(|id| presence_row(&broker.db, id).is_some())),
        "presence rows were not written"
    );
    broker.broker.sigterm();
    let status = broker
        .broker
        .wait_exit(Duration::from_secs(20))
        .expect("exits");
    assert_eq!(status.code(), Some(0));
    for id in &ids {
        let row = presence_row(&broker.db, id).expect("row");
        assert!(
            !row.get::<_, bool>("live"),
            "presence {id} still open after shutdown"
        );
    }
    drop(peers);
}

#[test]
fn refused_hellos_answer_the_code_then_close_1008() {
    let broker = start(&[]);
    let a = seed_mesh(&broker.db, "mesh-a", 2);
    // Mesh B exists and has a member, but not a[0].
    let _b = seed_mesh(&broker.db, "mesh-b", 1);
    let revoked = add_member(&broker.db, "mesh-a", "mesh-a-revoked");
    common::exec_sql(
        &broker.db,
        "UPDATE mesh.member SET revoked_at = now() WHERE id = 'mesh-a-revoked'",
    );
    let member = &a[0];
    let other_key = new_key();

    let mut cases: Vec<(&str, Value, &str)> = Vec::new();

    let mut h = hello(member);
    let sig = h["signature"].as_str().unwrap().to_owned();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    h["signature"] = json!(format!("{flipped}{}", &sig[1..]));
    cases.push(("flipped signature byte", h, "bad_signature"));

    let mut h = hello(member);
    let ts = h["timestamp"].as_i64().unwrap();
    h["signature"] = json!(sign_hello(
        &other_key,
        &member.mesh_id,
        &member.id,
        &member.pubkey,
        ts
    ));
    cases.push(("signed by another key", h, "bad_signature"));

    cases.push((
        "timestamp 120 s old",
        hello_at(member, now_ms() - 120_000),
        "stale_timestamp",
    ));

    let mut ghost = member.clone();
    ghost.id = "no-such-member".into();
    cases.push(("unknown member id", hello(&ghost), "unauthorized"));

    cases.push(("revoked member", hello(&revoked), "unauthorized"));

    let mut wrong_mesh = member.clone();
    wrong_mesh.mesh_id = "mesh-b".into();
    cases.push(("member of another mesh", hello(&wrong_mesh), "unauthorized"));

    // A key that is not the member's own (correctly signed by that key).
    let mut impostor = member.clone();
    impostor.key = other_key.clone();
    impostor.pubkey = pubkey_hex(&other_key);
    cases.push(("pubkey not the member's", hello(&impostor), "unauthorized"));

    let mut h = hello(member);
    h.as_object_mut().unwrap().remove("pubkey");
    cases.push(("missing pubkey", h, "invalid_field"));

    let mut h = hello(member);
    h["pubkey"] = json!("abc123");
    cases.push(("pubkey not 64 hex", h, "invalid_field"));

    let mut h = hello(member);
    h["pubkey"] = json!("zz".repeat(32));
    cases.push(("pubkey with non-hex digits", h, "invalid_field"));

    for (what, hello, code) in cases {
        let mut peer = Peer::open(&broker);
        peer.send_json(&hello);
        let error = peer.next_reply(WAIT);
        assert_eq!(error["type"], "error", "{what}: {error}");
        assert_eq!(error["code"], code, "{what}: {error}");
        if code == "invalid_field" {
            let message = error["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("pubkey"),
                "{what}: message names the field: {error}"
            );
        }
        peer.expect_close(1008);
    }

    // The member itself still gets in.
    Peer::connect(&broker, member);
    broker.wait_metric(
        "broker_connections_rejected_total{reason=\"unauthorized\"}",
        |v| v >= 4.0,
    );
}

#[test]
fn mesh_capacity_refuses_the_extra_hello_only_in_that_mesh() {
    let broker = start(&[("MAX_CONNECTIONS_PER_MESH", "3")]);
    let full = seed_mesh(&broker.db, "full", 4);
    let other = seed_mesh(&broker.db, "other", 1);

    let mut sessions: Vec<Peer> = full[..3]
        .iter()
        .map(|m| Peer::connect(&broker, m))
        .collect();

    let mut fourth = Peer::open(&broker);
    fourth.send_json(&hello(&full[3]));
    fourth.expect_error("capacity");
    fourth.expect_close(1008);

    // Capacity is per mesh: another mesh still connects.
    let _elsewhere = Peer::connect(&broker, &other[0]);

    // One of the three leaves: its slot frees up.
    sessions.remove(0).close();
    let mut last = Value::Null;
    let admitted = poll(WAIT, || {
        let mut peer = Peer::open(&broker);
        last = peer.hello(&full[3]);
        if last["type"] == "hello_ack" {
            sessions.push(peer);
            true
        } else {
            assert_eq!(last["code"], "capacity", "{last}");
            false
        }
    });
    assert!(admitted, "no slot after a session closed: {last}");

    broker.wait_metric(
        "broker_connections_rejected_total{reason=\"capacity\"}",
        |v| v >= 1.0,
    );
}

#[test]
fn messages_are_validated_and_never_end_the_session() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "checks", 2);
    let (me, you) = (&members[0], &members[1]);
    let mut peer = Peer::open(&broker);

    // Before hello: no_hello with the send's id; the connection stays.
    peer.send_json(&json!({
        "type": "send", "targetSpec": you.pubkey, "nonce": "n", "ciphertext": "c", "id": "early-1"
    }));
    let error = peer.expect_error("no_hello");
    assert_eq!(error["id"], "early-1", "{error}");
    let ack = peer.hello(me);
    assert_eq!(ack["type"], "hello_ack", "hello after no_hello: {ack}");

    let _you = Peer::connect(&broker, you);
    let mut acks = 0;
    let mut still_works = |peer: &mut Peer| {
        acks += 1;
        peer.send(&you.pubkey, "now", "n", "c", &format!("ok-{acks}"));
    };

    // A second hello.
    peer.send_json(&hello(me));
    peer.expect_error("already_hello");
    still_works(&mut peer);

    peer.send_text("{\"type\":\"send\",");
    peer.expect_error("bad_json");
    still_works(&mut peer);

    peer.send_json(&json!({"type": "dance"}));
    peer.expect_error("unknown_type");
    still_works(&mut peer);

    let valid = json!({
        "type": "send", "targetSpec": you.pubkey, "priority": "next",
        "nonce": "bm9uY2U=", "ciphertext": "Y2lwaGVy", "id": "bad-1"
    });
    let invalid: [(&str, Value); 4] = [
        ("targetSpec", Value::Null),
        ("priority", json!("urgent")),
        ("nonce", json!(12345)),
        ("ciphertext", Value::Null),
    ];
    for (i, (field, value)) in invalid.into_iter().enumerate() {
        let mut send = valid.clone();
        let id = format!("bad-{i}");
        send["id"] = json!(id);
        if value.is_null() {
            send.as_object_mut().unwrap().remove(field);
        } else {
            send[field] = value;
        }
        peer.send_json(&send);
        let error = peer.expect_error("invalid_field");
        assert_eq!(error["id"], id.as_str(), "{field}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "message names {field}: {error}");
        still_works(&mut peer);
    }

    for (i, target) in ["channel:general", "tag:x"].into_iter().enumerate() {
        let mut send = valid.clone();
        let id = format!("unsupported-{i}");
        send["targetSpec"] = json!(target);
        send["id"] = json!(id);
        peer.send_json(&send);
        let error = peer.expect_error("unsupported_target");
        assert_eq!(error["id"], id.as_str(), "{target}: {error}");
        still_works(&mut peer);
    }

    let mut send = valid.clone();
    send["targetSpec"] = json!(pubkey_hex(&new_key()));
    send["id"] = json!("stranger");
    peer.send_json(&send);
    let error = peer.expect_error("unknown_target");
    assert_eq!(error["id"], "stranger", "{error}");
    still_works(&mut peer);

    // Nothing else (no stray error, no close) is pending.
    peer.expect_nothing(QUIET);
}

#[test]
fn revoking_a_member_closes_its_live_session() {
    let broker = start(&[("MEMBER_REFRESH_SECONDS", "1")]);
    let members = seed_mesh(&broker.db, "revoke", 2);
    let (doomed, keeper) = (&members[0], &members[1]);
    let mut victim = Peer::connect(&broker, doomed);
    let mut bystander = Peer::connect(&broker, keeper);

    common::exec_sql(
        &broker.db,
        &format!(
            "UPDATE mesh.member SET revoked_at = now() WHERE id = '{}'",
            doomed.id
        ),
    );
    victim.expect_close_within(1008, Duration::from_secs(10));

    // A new hello for the revoked member is refused.
    let mut again = Peer::open(&broker);
    again.send_json(&hello(doomed));
    again.expect_error("unauthorized");
    again.expect_close(1008);

    // The other member is untouched and can no longer reach the revoked one.
    let error = bystander.request(&json!({
        "type": "send", "targetSpec": doomed.pubkey, "nonce": "n", "ciphertext": "c", "id": "to-revoked"
    }));
    assert_eq!(error["code"], "unknown_target", "{error}");
    bystander.send("*", "now", "n", "c", "still-here");
}

#[test]
fn a_member_added_to_a_loaded_mesh_can_connect_at_once() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "growing", 1);
    // The first hello loads the mesh into the broker's directory.
    let mut first = Peer::connect(&broker, &members[0]);
    // A peer is invited (a new member row) and connects straight away.
    let newcomer = add_member(&broker.db, "growing", "growing-new");
    let mut peer = Peer::open(&broker);
    let ack = peer.hello(&newcomer);
    assert_eq!(ack["type"], "hello_ack", "a new member was refused: {ack}");
    let sent = first.send(&newcomer.pubkey, "now", "n", "welcome", "hi");
    assert_push(
        &peer.recv_push(WAIT),
        &sent,
        &members[0],
        "now",
        "n",
        "welcome",
    );
}
