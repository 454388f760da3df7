//! Groups (PROTOCOL.md §10): membership that persists, `@group` with its
//! subgroups on both shards, held for members who are away, `#name` and
//! `@all`, and the refusals. Each test runs the real broker binary
//! (2 shards) against its own fresh database.
mod common;
mod support;

use common::Broker;
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

fn join(peer: &mut Peer, name: &str) {
    peer.send_json(&json!({"type": "join_group", "name": name}));
    peer.settle();
}

/// A round trip, so what was sent before has been applied.
fn sync(peer: &mut Peer) {
    let reply = peer.request(&json!({"type": "list_peers"}));
    assert_eq!(reply["type"], "peers_list", "{reply}");
}

fn group_names(ack: &Value) -> Vec<String> {
    ack["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_owned())
        .collect()
}

fn send_to(peer: &mut Peer, target: &str, id: &str) -> Value {
    peer.request(
        &json!({"type": "send", "targetSpec": target, "priority": "next",
        "nonce": "n", "ciphertext": format!("c-{id}"), "id": id}),
    )
}

#[test]
fn at_group_reaches_subgroups_on_both_shards_holds_for_the_absent_and_skips_the_sender() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "grp", 12);
    // members[0] sends; its second session is in `eng` too and must not
    // get it. Sessions of members 1.. land on both shards.
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut sender_twin = Peer::connect(&broker, &members[0]);
    join(&mut sender, "eng");
    let mut in_group = Vec::new();
    let mut shards = std::collections::HashSet::new();
    for (i, member) in members[1..10].iter().enumerate() {
        let mut peer = Peer::connect(&broker, member);
        shards.insert(broker.shard_of(&peer.presence_id));
        join(&mut peer, if i % 2 == 0 { "eng" } else { "eng/backend" });
        in_group.push(peer);
    }
    assert_eq!(shards.len(), 2, "group members on both shards");
    let mut outsider = Peer::connect(&broker, &members[10]);
    join(&mut outsider, "engineering");
    // An offline member of a subgroup: joined, then gone.
    let mut offline = Peer::connect(&broker, &members[11]);
    join(&mut offline, "eng/backend/db");
    offline.close();
    for peer in in_group.iter_mut().chain([&mut sender, &mut outsider]) {
        sync(peer);
    }
    let ack = send_to(&mut sender, "@eng", "g1");
    assert_eq!(ack["type"], "ack", "{ack}");
    for peer in &mut in_group {
        let push = peer.recv_push(WAIT);
        assert_push(&push, &ack, &members[0], "next", "n", "c-g1");
        assert_eq!(push["targetSpec"], "@eng");
        peer.expect_nothing(Duration::from_millis(20));
    }
    std::thread::sleep(QUIET);
    for peer in [&mut sender, &mut sender_twin, &mut outsider] {
        peer.expect_nothing(Duration::from_millis(5));
    }
    // The offline member gets it on its next hello, once.
    let mut back = Peer::connect(&broker, &members[11]);
    let push = back.recv_push(WAIT);
    assert_push(&push, &ack, &members[0], "next", "n", "c-g1");
    assert_eq!(push["targetSpec"], "@eng");
    back.expect_nothing(QUIET);
    let held: i64 = common::query_rows(
        &broker.db,
        "SELECT count(*) FROM mesh.message_queue WHERE target_spec = '@eng'",
    )[0]
    .get(0);
    assert_eq!(held, 1, "held durably, like `*`");
    assert!(broker.metric("broker_group_sends_total") >= 1.0);
}

#[test]
fn hash_names_and_at_all_are_aliases() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "alias", 3);
    let mut a = Peer::connect(&broker, &members[0]);
    let mut b = Peer::connect(&broker, &members[1]);
    let mut c = Peer::connect(&broker, &members[2]);
    join(&mut b, "general");
    sync(&mut b);
    let ack = send_to(&mut a, "#general", "h");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(b.recv_push(WAIT)["targetSpec"], "#general");
    let ack = send_to(&mut a, "@all", "all");
    assert_eq!(ack["type"], "ack", "{ack}");
    for peer in [&mut b, &mut c] {
        let push = peer.recv_push(WAIT);
        assert_eq!(push["messageId"], ack["messageId"]);
        assert_eq!(push["targetSpec"], "@all");
    }
    c.expect_nothing(QUIET);
}

#[test]
fn group_targets_that_reach_nobody_or_are_malformed_are_refused() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "nobody", 2);
    let mut a = Peer::connect(&broker, &members[0]);
    let _b = Peer::connect(&broker, &members[1]);
    join(&mut a, "solo");
    sync(&mut a);
    for (target, code) in [
        ("@solo", "unknown_target"),
        ("@nosuch", "unknown_target"),
        ("#nosuch", "unknown_target"),
        ("@Not Valid", "invalid_field"),
        ("@", "invalid_field"),
        ("tag:x", "unsupported_target"),
    ] {
        let reply = send_to(&mut a, target, target);
        assert_eq!(reply["type"], "error", "{target}: {reply}");
        assert_eq!(reply["code"], code, "{target}: {reply}");
        assert_eq!(reply["id"], target);
    }
}

#[test]
fn leaving_a_group_stops_its_sends_and_membership_survives_a_restart() {
    let db = common::fresh_database();
    let members = {
        let broker = Broker::start(&[("DATABASE_URL", &db)]);
        broker.wait_for_log("db healthy", Duration::from_secs(30));
        let members = seed_mesh(&db, "keep", 3);
        let mut a = Peer::connect(&broker, &members[0]);
        let mut b = Peer::open(&broker);
        let ack = b.request(&{
            let mut hello = hello(&members[1]);
            hello["groups"] = json!([{"name": "ops", "role": "oncall"}, {"name": "eng"}]);
            hello
        });
        assert_eq!(group_names(&ack), ["eng", "ops"]);
        let mut c = Peer::connect(&broker, &members[2]);
        join(&mut c, "eng");
        c.send_json(&json!({"type": "leave_group", "name": "eng"}));
        sync(&mut c);
        let ack = send_to(&mut a, "@eng", "before");
        assert_eq!(ack["type"], "ack");
        assert_eq!(b.recv_push(WAIT)["messageId"], ack["messageId"]);
        c.expect_nothing(QUIET);
        let mut broker = broker;
        broker.sigterm();
        broker.wait_exit(Duration::from_secs(15)).expect("exits");
        members
    };
    let rows = common::query_rows(
        &db,
        "SELECT member_id, name, role FROM mesh.member_group ORDER BY member_id, name",
    );
    let stored: Vec<(String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        stored,
        [
            (members[1].id.clone(), "eng".into(), None),
            (members[1].id.clone(), "ops".into(), Some("oncall".into())),
        ]
    );
    let audited: Vec<(String, String, Value)> = common::query_rows(
        &db,
        "SELECT event_type, actor_peer_id, metadata::text FROM mesh.audit_log \
         WHERE event_type LIKE 'group_%' ORDER BY created_at, id",
    )
    .iter()
    .map(|r| {
        let metadata: String = r.get(2);
        (r.get(0), r.get(1), serde_json::from_str(&metadata).unwrap())
    })
    .collect();
    assert_eq!(
        audited,
        [
            (
                "group_join".into(),
                members[1].id.clone(),
                json!({"name": "ops", "role": "oncall"})
            ),
            (
                "group_join".into(),
                members[1].id.clone(),
                json!({"name": "eng"})
            ),
            (
                "group_join".into(),
                members[2].id.clone(),
                json!({"name": "eng"})
            ),
            (
                "group_leave".into(),
                members[2].id.clone(),
                json!({"name": "eng"})
            ),
        ]
    );
    let broker = Broker::start(&[("DATABASE_URL", &db)]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let mut b = Peer::open(&broker);
    let ack = b.request(&hello(&members[1]));
    assert_eq!(
        ack["groups"],
        json!([{"name": "eng", "role": null}, {"name": "ops", "role": "oncall"}])
    );
    let mut a = Peer::connect(&broker, &members[0]);
    let ack = send_to(&mut a, "@ops", "after");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(b.recv_push(WAIT)["targetSpec"], "@ops");
}
