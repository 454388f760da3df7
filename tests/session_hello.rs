//! `session_hello` (PROTOCOL.md §9): one ed25519 key per Claude Code
//! session, vouched for by its member's key. The two-stage proof and every
//! refusal, sends addressed to a session key (live, away, gone), the keys
//! pushes carry, the directory's role fields, one presence per session key,
//! capacity, and what Postgres keeps. Each test runs the real broker binary
//! (2 shards) against its own fresh database.
mod common;
mod support;

use common::query_rows;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// A Claude Code session's own key, vouched for by `parent`.
struct SessionKey {
    parent: Member,
    key: SigningKey,
    pubkey: String,
}

impl SessionKey {
    fn new(parent: &Member) -> SessionKey {
        let key = new_key();
        SessionKey {
            parent: parent.clone(),
            pubkey: pubkey_hex(&key),
            key,
        }
    }
}

fn sign(key: &SigningKey, text: &str) -> String {
    hex(&key.sign(text.as_bytes()).to_bytes())
}

/// A correct `session_hello` for `s`: the parent's attestation valid for an
/// hour, the session signature now; `extra` fields merged in (they win).
fn session_hello(s: &SessionKey, extra: Value) -> Value {
    let parent = &s.parent;
    let expires = now_ms() + 3_600_000;
    let ts = now_ms();
    let mut hello = json!({
        "type": "session_hello",
        "meshId": parent.mesh_id,
        "parentMemberId": parent.id,
        "parentMemberPubkey": parent.pubkey,
        "sessionPubkey": s.pubkey,
        "sessionId": format!("cc-{}", rand::random::<u32>()),
        "pid": 5151,
        "cwd": "/work/session",
        "timestamp": ts,
        "signature": sign(&s.key, &format!(
            "claudemesh-session-hello|{}|{}|{}|{ts}", parent.mesh_id, parent.pubkey, s.pubkey)),
        "parentAttestation": attestation(&parent.key, &parent.pubkey, &s.pubkey, expires),
    });
    for (k, v) in extra.as_object().expect("extra is an object") {
        hello[k] = v.clone();
    }
    hello
}

fn attestation(signer: &SigningKey, parent: &str, session: &str, expires: i64) -> Value {
    json!({
        "sessionPubkey": session,
        "parentMemberPubkey": parent,
        "expiresAt": expires,
        "signature": sign(signer, &format!("claudemesh-session-attest|{parent}|{session}|{expires}")),
    })
}

/// Says `hello` (a session_hello or a hello) on a new connection.
fn open_with(broker: &TestBroker, member: &Member, hello: &Value) -> (Peer, Value) {
    let mut peer = Peer::open(broker);
    let ack = peer.request(hello);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    peer.presence_id = ack["presenceId"].as_str().unwrap().to_owned();
    peer.member = Some(member.clone());
    (peer, ack)
}

fn open_session(broker: &TestBroker, s: &SessionKey) -> (Peer, Value) {
    open_with(broker, &s.parent, &session_hello(s, json!({})))
}

fn refused(broker: &TestBroker, hello: &Value, code: &str) {
    let mut peer = Peer::open(broker);
    peer.send_json(hello);
    let error = peer.expect_error(code);
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    peer.expect_close(1008);
}

fn list_peers(peer: &mut Peer) -> Vec<Value> {
    let reply = peer.request(&json!({"type": "list_peers"}));
    assert_eq!(reply["type"], "peers_list", "{reply}");
    reply["peers"].as_array().expect("peers array").clone()
}

fn drop_socket(mut peer: Peer) {
    peer.stream()
        .shutdown(std::net::Shutdown::Both)
        .expect("shutdown");
}

fn set_status(peer: &mut Peer, status: &str) {
    peer.send_json(&json!({"type": "set_status", "status": status}));
    // A request answered after it: the status is applied by then.
    list_peers(peer);
}

#[test]
fn every_check_refuses_with_its_code_and_1008_in_the_contract_order() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "sh", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let s = SessionKey::new(alice);
    let other = SessionKey::new(alice);
    let late = now_ms() + 3_600_000;

    // Malformed: a refused hello like any (invalid_field, then 1008).
    refused(
        &broker,
        &json!({"type": "session_hello", "meshId": "sh"}),
        "invalid_field",
    );
    let mut no_attestation = session_hello(&s, json!({}));
    no_attestation
        .as_object_mut()
        .unwrap()
        .remove("parentAttestation");
    refused(&broker, &no_attestation, "invalid_field");

    let mut tampered = session_hello(&s, json!({}));
    let sig = tampered["parentAttestation"]["signature"].as_str().unwrap();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    );
    tampered["parentAttestation"]["signature"] = json!(flipped);
    refused(&broker, &tampered, "bad_signature");

    // Properly signed, but for another session key.
    let att = attestation(&alice.key, &alice.pubkey, &other.pubkey, late);
    refused(
        &broker,
        &session_hello(&s, json!({ "parentAttestation": att })),
        "attestation_mismatch",
    );
    // Signed by bob for bob: it verifies, but is not this hello's parent.
    let att = attestation(&bob.key, &bob.pubkey, &s.pubkey, late);
    refused(
        &broker,
        &session_hello(&s, json!({ "parentAttestation": att })),
        "attestation_mismatch",
    );

    let att = attestation(&alice.key, &alice.pubkey, &s.pubkey, now_ms() - 1000);
    refused(
        &broker,
        &session_hello(&s, json!({ "parentAttestation": att })),
        "expired",
    );
    let att = attestation(
        &alice.key,
        &alice.pubkey,
        &s.pubkey,
        now_ms() + DAY_MS + 3_600_000,
    );
    refused(
        &broker,
        &session_hello(&s, json!({ "parentAttestation": att })),
        "ttl_too_long",
    );

    // The session signature made with the member key instead.
    let ts = now_ms();
    let by_member = sign(
        &alice.key,
        &format!(
            "claudemesh-session-hello|{}|{}|{}|{ts}",
            alice.mesh_id, alice.pubkey, s.pubkey
        ),
    );
    refused(
        &broker,
        &session_hello(&s, json!({"timestamp": ts, "signature": by_member})),
        "bad_signature",
    );

    let stale = now_ms() - 120_000;
    let old = sign(
        &s.key,
        &format!(
            "claudemesh-session-hello|{}|{}|{}|{stale}",
            alice.mesh_id, alice.pubkey, s.pubkey
        ),
    );
    refused(
        &broker,
        &session_hello(&s, json!({"timestamp": stale, "signature": old})),
        "stale_timestamp",
    );

    // A key that is no member's: a self-vouched stranger.
    let stranger = Member {
        mesh_id: alice.mesh_id.clone(),
        id: alice.id.clone(),
        pubkey: pubkey_hex(&new_key()),
        key: new_key(),
    };
    let stranger = Member {
        pubkey: pubkey_hex(&stranger.key),
        ..stranger
    };
    refused(
        &broker,
        &session_hello(&SessionKey::new(&stranger), json!({})),
        "unauthorized",
    );

    let mut wrong_id = session_hello(&s, json!({}));
    wrong_id["parentMemberId"] = json!(bob.id);
    refused(&broker, &wrong_id, "parent_member_id_mismatch");

    // A revoked parent, in a mesh not loaded before.
    let revoked = &seed_mesh(&broker.db, "sh-revoked", 1)[0];
    common::exec_sql(
        &broker.db,
        &format!(
            "UPDATE mesh.member SET revoked_at = now() WHERE id = '{}'",
            revoked.id
        ),
    );
    refused(
        &broker,
        &session_hello(&SessionKey::new(revoked), json!({})),
        "unauthorized",
    );

    // A good one: its ack names the session key; Postgres keeps it with the
    // presence, and the audit's connect row says which role it has.
    let (_peer, ack) = open_session(&broker, &s);
    assert_eq!(ack["sessionPubkey"], s.pubkey.as_str());
    assert_eq!(ack["memberId"], alice.id.as_str());
    assert_eq!(ack["resumed"], false);
    let presence = ack["presenceId"].as_str().unwrap().to_owned();
    let (_daemon, daemon_ack) = open_with(&broker, alice, &hello(alice));
    assert!(daemon_ack.get("sessionPubkey").is_none(), "{daemon_ack}");
    let ok = poll(WAIT, || {
        let rows = query_rows(
            &broker.db,
            &format!("SELECT session_pubkey FROM mesh.presence WHERE id = '{presence}'"),
        );
        rows.first()
            .is_some_and(|r| r.get::<_, Option<String>>(0).as_deref() == Some(s.pubkey.as_str()))
    });
    assert!(ok, "the presence row keeps the session key");
    let ok = poll(WAIT, || {
        let rows = query_rows(
            &broker.db,
            "SELECT metadata->>'role' FROM mesh.audit_log \
             WHERE mesh_id = 'sh' AND event_type = 'connect' ORDER BY created_at, id",
        );
        let roles: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
        roles.len() == 2
            && roles.contains(&Some("session".into()))
            && roles.contains(&Some("control-plane".into()))
    });
    assert!(ok, "connect rows record the role");

    let outcome =
        |o: &str| broker.metric(&format!("broker_session_hellos_total{{outcome=\"{o}\"}}"));
    assert_eq!(outcome("bad_signature"), 2.0);
    assert_eq!(outcome("attestation_mismatch"), 2.0);
    assert_eq!(outcome("expired"), 1.0);
    assert_eq!(outcome("ttl_too_long"), 1.0);
    assert_eq!(outcome("stale_timestamp"), 1.0);
    assert_eq!(outcome("unauthorized"), 2.0);
    assert_eq!(outcome("parent_member_id_mismatch"), 1.0);
    assert_eq!(outcome("ok"), 1.0);
}

#[test]
fn a_session_key_send_is_for_that_session_alone_and_pushes_carry_both_keys() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "2")]);
    let members = seed_mesh(&broker.db, "sk", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let (s1, s2) = (SessionKey::new(alice), SessionKey::new(alice));
    let (mut daemon, _) = open_with(&broker, alice, &hello(alice));
    let (mut one, _) = open_session(&broker, &s1);
    let (mut two, _) = open_session(&broker, &s2);
    let mut b = Peer::connect(&broker, bob);

    // The directory: one control-plane entry and two session entries (a
    // list reflects what happened at least 100 ms before it, §9).
    let mut list = Vec::new();
    let ok = poll(WAIT, || {
        list = list_peers(&mut b);
        list.len() == 4
    });
    assert!(ok, "every session listed: {list:?}");
    let mine: Vec<&Value> = list
        .iter()
        .filter(|e| e["memberId"] == alice.id.as_str())
        .collect();
    assert_eq!(mine.len(), 3, "{list:?}");
    for e in &mine {
        assert_eq!(e["pubkey"], alice.pubkey.as_str(), "the member's key: {e}");
        if e["presenceId"] == daemon.presence_id.as_str() {
            assert_eq!(e["peerRole"], "control-plane");
            assert_eq!(e["sessionPubkey"], Value::Null);
        } else {
            assert_eq!(e["peerRole"], "session");
            let key = if e["presenceId"] == one.presence_id.as_str() {
                &s1.pubkey
            } else {
                &s2.pubkey
            };
            assert_eq!(e["sessionPubkey"], key.as_str());
        }
    }
    let me = list
        .iter()
        .find(|e| e["presenceId"] == b.presence_id.as_str())
        .unwrap();
    assert_eq!(
        (&me["peerRole"], &me["sessionPubkey"]),
        (&json!("control-plane"), &Value::Null)
    );

    // To s1's key: s1 alone, though s2 and the daemon are idle.
    let ack = b.send(&s1.pubkey, "next", "n1", "c1", "to-s1");
    let push = one.recv_push(WAIT);
    assert_eq!(push["messageId"], ack["messageId"]);
    assert_eq!(push["senderPubkey"], bob.pubkey.as_str());
    assert_eq!(push["senderMemberPubkey"], bob.pubkey.as_str());
    assert!(push.get("targetSpec").is_none(), "a direct push: {push}");
    two.expect_nothing(QUIET);
    daemon.expect_nothing(QUIET);

    // While s1 cannot take `next`, it is held for s1, not given to s2.
    set_status(&mut one, "working");
    let held = b.send(&s1.pubkey, "next", "n2", "c2", "held-for-s1");
    two.expect_nothing(QUIET);
    daemon.expect_nothing(QUIET);
    one.expect_nothing(QUIET);
    set_status(&mut one, "idle");
    assert_eq!(one.recv_push(WAIT)["messageId"], held["messageId"]);
    two.expect_nothing(QUIET);

    // Pushes from a session carry its key and its member's.
    let from_session = one.send(&bob.pubkey, "now", "n3", "c3", "from-s1");
    let push = b.recv_push(WAIT);
    assert_eq!(push["messageId"], from_session["messageId"]);
    assert_eq!(push["senderPubkey"], s1.pubkey.as_str());
    assert_eq!(push["senderMemberPubkey"], alice.pubkey.as_str());
    daemon.send(&bob.pubkey, "now", "n4", "c4", "from-daemon");
    let push = b.recv_push(WAIT);
    assert_eq!(push["senderPubkey"], alice.pubkey.as_str());
    assert_eq!(push["senderMemberPubkey"], alice.pubkey.as_str());

    // s1 away in its grace: still for s1 alone, held through the grace,
    // then its member's, so one of its other sessions gets it.
    drop_socket(one);
    let away = b.send(&s1.pubkey, "next", "n5", "c5", "to-away-s1");
    two.expect_nothing(Duration::from_millis(800));
    daemon.expect_nothing(Duration::from_millis(100));
    member_gets(&mut [&mut two, &mut daemon], &away["messageId"], 1);
    // Later sends to the gone key are its member's like any direct send:
    // live to every session of it that may take them.
    let later = b.send(&s1.pubkey, "now", "n6", "c6", "after-s1-ended");
    member_gets(&mut [&mut two, &mut daemon], &later["messageId"], 2);
}

/// Waits until `sessions` got the push of `id`, `times` times in all.
fn member_gets(sessions: &mut [&mut Peer], id: &Value, times: usize) {
    let mut got = 0;
    let ok = poll(WAIT, || {
        for peer in sessions.iter_mut() {
            got += peer
                .drain_pushes(Duration::from_millis(50))
                .iter()
                .filter(|p| p["messageId"] == *id)
                .count();
        }
        got > 0
    });
    assert!(ok, "the member never got {id}");
    for peer in sessions.iter_mut() {
        got += peer
            .drain_pushes(QUIET)
            .iter()
            .filter(|p| p["messageId"] == *id)
            .count();
    }
    assert_eq!(got, times, "{id} reached the member's sessions");
}

#[test]
fn a_send_to_the_key_of_a_session_that_left_is_held_for_its_member() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "gone", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let s1 = SessionKey::new(alice);
    let (one, _) = open_session(&broker, &s1);
    // Connected first: on several nodes, a node learns that a session of
    // another one ended only while it follows the mesh.
    let mut b = Peer::connect(&broker, bob);
    one.close();
    b.settle();
    // The close ended the session: the key names the member, who has no
    // session now, so it is held (durably: the ack waited for the row).
    let ack = b.send(&s1.pubkey, "next", "n1", "c1", "to-gone");
    let ok = poll(WAIT, || {
        let id = ack["messageId"].as_str().unwrap();
        !query_rows(
            &broker.db,
            &format!("SELECT 1 FROM mesh.message_queue WHERE id = '{id}'"),
        )
        .is_empty()
    });
    assert!(ok, "the held envelope has its row");
    let (mut next, _) = open_session(&broker, &SessionKey::new(alice));
    let push = next.recv_push(WAIT);
    assert_eq!(push["messageId"], ack["messageId"]);
    assert_eq!(push["ciphertext"], "c1");
    // A key nobody ever had is still unknown.
    b.send_json(
        &json!({"type": "send", "targetSpec": pubkey_hex(&new_key()),
        "nonce": "n", "ciphertext": "c", "id": "nobody"}),
    );
    b.expect_error("unknown_target");
}

#[test]
fn one_presence_per_session_key_replace_and_grace_takeover() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "30")]);
    let members = seed_mesh(&broker.db, "one", 2);
    let alice = &members[0];
    let s1 = SessionKey::new(alice);
    let (mut first, ack) = open_session(&broker, &s1);
    assert_eq!(ack["resumed"], false);
    let presence = first.presence_id.clone();

    // The same key with another sessionId replaces the live one.
    let (second, ack) = open_with(
        &broker,
        alice,
        &session_hello(&s1, json!({"sessionId": "another-id"})),
    );
    assert_eq!(ack["resumed"], true, "{ack}");
    assert_eq!(ack["presenceId"], presence.as_str());
    first.expect_close(4000);

    // Lost socket: away in its grace; the same key takes it over.
    drop_socket(second);
    let mut b = Peer::connect(&broker, &members[1]);
    let ok = poll(WAIT, || {
        list_peers(&mut b)
            .iter()
            .any(|e| e["presenceId"] == presence.as_str() && e["away"] == true)
    });
    assert!(ok, "away in its grace");
    let (mut third, ack) = open_session(&broker, &s1);
    assert_eq!(ack["resumed"], true, "{ack}");
    assert_eq!(ack["presenceId"], presence.as_str());
    // The list reflects what happened at least 100 ms before it (§9).
    let mut list = Vec::new();
    let ok = poll(WAIT, || {
        list = list_peers(&mut third);
        let keyed: Vec<&Value> = list
            .iter()
            .filter(|e| e["sessionPubkey"] == s1.pubkey.as_str())
            .collect();
        keyed.len() == 1 && keyed[0]["away"] == false
    });
    assert!(ok, "one presence per session key, live again: {list:?}");
    let session_id = list
        .iter()
        .find(|e| e["sessionPubkey"] == s1.pubkey.as_str())
        .unwrap()["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    // A member's hello with the sessionId of a session_hello session does
    // not take it over: a hello only ever takes over a hello session.
    let (_daemon, ack) = open_with(&broker, alice, &hello_with_session_id(alice, &session_id));
    assert_eq!(ack["resumed"], false);
    third.expect_nothing(QUIET);
}

fn hello_with_session_id(member: &Member, session_id: &str) -> Value {
    let mut hello = hello(member);
    hello["sessionId"] = json!(session_id);
    hello
}

#[test]
fn capacity_counts_session_connections() {
    let broker = start(&[("MAX_CONNECTIONS_PER_MESH", "2")]);
    let members = seed_mesh(&broker.db, "cap", 1);
    let alice = &members[0];
    let (_daemon, _) = open_with(&broker, alice, &hello(alice));
    let (_one, _) = open_session(&broker, &SessionKey::new(alice));
    refused(
        &broker,
        &session_hello(&SessionKey::new(alice), json!({})),
        "capacity",
    );
    refused(&broker, &hello(alice), "capacity");
    assert_eq!(
        broker.metric("broker_session_hellos_total{outcome=\"capacity\"}"),
        1.0
    );
}
