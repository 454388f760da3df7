//! Acknowledged delivery (PROTOCOL.md §11): leases, redelivery on time and
//! when a session goes, batch acks, acks that are not the member's, a crash
//! with open leases, gating of redeliveries, and duplicate sends. Each test
//! runs the real broker binary (2 shards) against its own fresh database,
//! with short timeouts through the environment.
mod common;
mod support;

use common::Broker;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

/// A session of `member` that asked for `client_ack`.
fn acking(broker: &Broker, member: &Member) -> Peer {
    let mut hello = hello(member);
    hello["capabilities"] = json!(["client_ack"]);
    let mut peer = Peer::open(broker);
    let ack = peer.request(&hello);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    assert_eq!(ack["capabilities"], json!(["client_ack"]), "granted: {ack}");
    peer.presence_id = ack["presenceId"].as_str().unwrap().to_owned();
    peer.member = Some(member.clone());
    peer
}

fn client_ack(peer: &mut Peer, message_id: &Value) {
    peer.send_json(&json!({"type": "client_ack", "messageId": message_id}));
}

/// A round trip, so what was sent before has been applied.
fn sync(peer: &mut Peer) {
    let reply = peer.request(&json!({"type": "list_peers"}));
    assert_eq!(reply["type"], "peers_list", "{reply}");
}

fn delivered(db: &str, message_id: &Value) -> bool {
    common::query_rows(
        db,
        &format!(
            "SELECT delivered_at IS NOT NULL FROM mesh.message_queue WHERE id = '{}'",
            message_id.as_str().unwrap()
        ),
    )
    .first()
    .is_some_and(|r| r.get::<_, bool>(0))
}

#[test]
fn an_unacked_push_comes_again_after_the_timeout_and_an_acked_one_never() {
    let broker = start(&[("CLIENT_ACK_TIMEOUT_SECONDS", "1")]);
    let members = seed_mesh(&broker.db, "lease", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut reader = acking(&broker, &members[1]);
    let kept = sender.send(&members[1].pubkey, "now", "n1", "kept", "k");
    let acked = sender.send(&members[1].pubkey, "now", "n2", "acked", "a");
    let first = reader.recv_push(WAIT);
    assert_push(&first, &kept, &members[0], "now", "n1", "kept");
    assert!(first.get("redelivered").is_none());
    let second = reader.recv_push(WAIT);
    assert_eq!(second["messageId"], acked["messageId"]);
    client_ack(&mut reader, &acked["messageId"]);
    let started = Instant::now();
    let again = reader.recv_push(Duration::from_secs(5));
    assert_push(&again, &kept, &members[0], "now", "n1", "kept");
    assert_eq!(again["redelivered"], true);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "on time, not on a later event"
    );
    client_ack(&mut reader, &again["messageId"]);
    reader.expect_nothing(Duration::from_millis(2500));
    assert!(poll(WAIT, || delivered(&broker.db, &acked["messageId"])
        && delivered(&broker.db, &kept["messageId"])));
    assert_eq!(broker.metric("broker_redelivered_total"), 1.0);
    assert_eq!(broker.metric("broker_leases_acked_total"), 2.0);
    assert_eq!(broker.metric("broker_leases_open"), 0.0);
}

#[test]
fn a_lease_of_a_closed_session_goes_at_once_to_the_members_other_session() {
    let broker = start(&[("CLIENT_ACK_TIMEOUT_SECONDS", "60")]);
    let members = seed_mesh(&broker.db, "handover", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut first = acking(&broker, &members[1]);
    let ack = sender.send(&members[1].pubkey, "now", "n", "c", "x");
    let push = first.recv_push(WAIT);
    let mut second = acking(&broker, &members[1]);
    // The second session got nothing of the first's lease yet.
    second.expect_nothing(QUIET);
    assert_eq!(push["messageId"], ack["messageId"]);
    first.close();
    let again = second.recv_push(Duration::from_secs(5));
    assert_eq!(again["messageId"], ack["messageId"]);
    assert_eq!(again["redelivered"], true);
    client_ack(&mut second, &again["messageId"]);
    second.expect_nothing(QUIET);
}

#[test]
fn a_lease_comes_back_to_the_members_next_session_after_a_reconnect() {
    let broker = start(&[
        ("CLIENT_ACK_TIMEOUT_SECONDS", "60"),
        ("SESSION_GRACE_SECONDS", "30"),
    ]);
    let members = seed_mesh(&broker.db, "reconnect", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut reader = acking(&broker, &members[1]);
    let ack = sender.send(&members[1].pubkey, "next", "n", "c", "x");
    reader.recv_push(WAIT);
    // The socket is lost (a session in grace cannot ack): it lapses now.
    reader.stream().shutdown(std::net::Shutdown::Both).unwrap();
    let mut back = acking(&broker, &members[1]);
    let again = back.recv_push(Duration::from_secs(5));
    assert_eq!(again["messageId"], ack["messageId"]);
    assert_eq!(again["redelivered"], true);
}

#[test]
fn batch_acks_end_leases_and_other_members_acks_are_ignored() {
    let broker = start(&[("CLIENT_ACK_TIMEOUT_SECONDS", "1")]);
    let members = seed_mesh(&broker.db, "batch", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut reader = acking(&broker, &members[1]);
    let mut stranger = acking(&broker, &members[2]);
    let ids: Vec<Value> = (0..5)
        .map(|i| {
            sender.send(&members[1].pubkey, "now", "n", "c", &format!("b{i}"))["messageId"].clone()
        })
        .collect();
    for _ in 0..5 {
        reader.recv_push(WAIT);
    }
    // Another member's ack of these leases does nothing.
    stranger.send_json(&json!({"type": "client_ack", "messageIds": ids}));
    sync(&mut stranger);
    reader.send_json(&json!({"type": "client_ack", "messageIds": ids[..4]}));
    let again = reader.recv_push(Duration::from_secs(5));
    assert_eq!(again["messageId"], ids[4]);
    assert_eq!(again["redelivered"], true);
    client_ack(&mut reader, &ids[4]);
    reader.expect_nothing(Duration::from_millis(2500));
    // Bad acks are refused with invalid_field and the session stays.
    let reply = reader.request(&json!({"type": "client_ack", "_reqId": "r"}));
    assert_eq!(
        (reply["code"].as_str(), reply["_reqId"].as_str()),
        (Some("invalid_field"), Some("r"))
    );
    let many: Vec<String> = (0..1001).map(|i| format!("m{i}")).collect();
    let reply = reader.request(&json!({"type": "client_ack", "messageIds": many}));
    assert_eq!(reply["code"], "invalid_field");
    sync(&mut reader);
}

#[test]
fn a_redelivered_next_waits_until_a_working_session_is_idle() {
    let broker = start(&[("CLIENT_ACK_TIMEOUT_SECONDS", "1")]);
    let members = seed_mesh(&broker.db, "gate", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut reader = acking(&broker, &members[1]);
    let ack = sender.send(&members[1].pubkey, "next", "n", "c", "x");
    reader.recv_push(WAIT);
    reader.send_json(&json!({"type": "set_status", "status": "working"}));
    sync(&mut reader);
    reader.expect_nothing(Duration::from_millis(2500));
    reader.send_json(&json!({"type": "set_status", "status": "idle"}));
    let again = reader.recv_push(WAIT);
    assert_eq!(again["messageId"], ack["messageId"]);
    assert_eq!(again["redelivered"], true);
}

#[test]
fn a_duplicate_client_message_id_is_acked_with_the_first_id_and_pushed_once() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "dup", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut reader = Peer::connect(&broker, &members[1]);
    let send = json!({"type": "send", "targetSpec": members[1].pubkey, "priority": "now",
        "nonce": "n", "ciphertext": "c", "id": "first", "client_message_id": "retry-me"});
    let first = sender.request(&send);
    assert_eq!(first["type"], "ack", "{first}");
    assert!(first.get("duplicate").is_none());
    let mut again = send.clone();
    again["id"] = json!("second");
    let second = sender.request(&again);
    assert_eq!(second["messageId"], first["messageId"]);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["id"], "second");
    let push = reader.recv_push(WAIT);
    assert_eq!(push["client_message_id"], "retry-me");
    reader.expect_nothing(QUIET);
    assert_eq!(broker.metric("broker_duplicate_sends_total"), 1.0);
}

#[test]
fn open_leases_survive_a_crash_and_acked_ones_do_not_come_back() {
    let db = common::fresh_database();
    let members = seed_after_start(&db);
    let mut broker = Broker::start(&[("DATABASE_URL", &db)]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut reader = acking(&broker, &members[1]);
    let ids: Vec<Value> = (0..6)
        .map(|i| {
            sender.send(&members[1].pubkey, "now", "n", "c", &format!("s{i}"))["messageId"].clone()
        })
        .collect();
    for _ in 0..6 {
        reader.recv_push(WAIT);
    }
    reader.send_json(&json!({"type": "client_ack", "messageIds": ids[..3]}));
    // The acks are in Postgres before the crash; the rest are open leases.
    assert!(poll(WAIT, || ids[..3].iter().all(|id| delivered(&db, id))));
    assert!(poll(WAIT, || {
        common::query_rows(&db, "SELECT count(*) FROM mesh.message_queue")[0].get::<_, i64>(0) == 6
    }));
    broker.sigkill();
    broker.wait_exit(Duration::from_secs(10));
    let broker = Broker::start(&[("DATABASE_URL", &db)]);
    broker.wait_for_log("held restored", Duration::from_secs(30));
    let mut back = acking(&broker, &members[1]);
    let pushes = back.drain_pushes(Duration::from_secs(1));
    let got: Vec<&Value> = pushes.iter().map(|p| &p["messageId"]).collect();
    assert_eq!(
        got,
        ids[3..].iter().collect::<Vec<_>>(),
        "every unacked one, once, in order"
    );
}

/// A mesh of two members in a database the broker has not started on yet.
fn seed_after_start(db: &str) -> Vec<Member> {
    let broker = Broker::start(&[("DATABASE_URL", db)]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    seed_mesh(db, "crash", 2)
}

#[test]
fn a_session_without_client_ack_keeps_the_first_protocol() {
    let broker = start(&[("CLIENT_ACK_TIMEOUT_SECONDS", "1")]);
    let members = seed_mesh(&broker.db, "plain", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut plain = Peer::connect(&broker, &members[1]);
    let mut leased = acking(&broker, &members[2]);
    let ack = sender.send("*", "now", "n", "c", "x");
    assert_eq!(plain.recv_push(WAIT)["messageId"], ack["messageId"]);
    assert_eq!(leased.recv_push(WAIT)["messageId"], ack["messageId"]);
    // Only the leased one comes again.
    plain.expect_nothing(Duration::from_millis(2500));
    assert_eq!(leased.recv_push(WAIT)["redelivered"], true);
}

#[test]
fn leases_cannot_outrun_postgres_while_sends_to_others_go_on() {
    let root = common::world_traversable_tempdir("meshbroker-leasebound-");
    let pg =
        meshbroker::devdb::LocalPostgres::start(&root.join("data"), true).expect("start Postgres");
    pg.create_database("bound").expect("create database");
    let db = pg.url("bound");
    let broker = Broker::start(&[
        ("DATABASE_URL", &db),
        ("MAX_HELD_MEMORY_BYTES", "65536"),
        UNLIMITED_SENDS[0],
        UNLIMITED_SENDS[1],
    ]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "bound", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut leased = acking(&broker, &members[1]);
    let mut plain = Peer::connect(&broker, &members[2]);
    pg.stop().expect("stop Postgres");
    // Every leased push waits to be stored; past the held budget (64 KiB)
    // sends to the client_ack member are refused, never buffered on.
    let big = "x".repeat(4000);
    let mut refused = None;
    for i in 0..200 {
        let reply = sender.request(&json!({"type": "send", "targetSpec": members[1].pubkey,
            "priority": "now", "nonce": "n", "ciphertext": big, "id": format!("l{i}")}));
        if reply["type"] == "error" {
            refused = Some((i, reply));
            break;
        }
        leased.recv_push(WAIT);
    }
    let (count, reply) = refused.expect("refused once the budget is full");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(count >= 10, "refused only past the budget ({count} leased)");
    // A member with no client_ack session is not held back.
    let ack = sender.send(&members[2].pubkey, "now", "n", "plain", "p");
    assert_eq!(plain.recv_push(WAIT)["messageId"], ack["messageId"]);
    drop(broker);
    let _ = pg.stop();
}
