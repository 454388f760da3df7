//! Administration (PROTOCOL.md §13): the role check, targets by id, pubkey
//! and display name, kick (4001) and ban (4002) on both shards, unban,
//! list_bans, audit_query and audit_verify. Each test runs the real broker
//! binary (2 shards) against its own fresh database.
mod common;
mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::*;

fn make_admin(db: &str, member: &Member) {
    common::exec_sql(
        db,
        &format!(
            "UPDATE mesh.member SET role = 'admin' WHERE id = '{}'",
            member.id
        ),
    );
}

fn rename(db: &str, member: &Member, name: &str) {
    common::exec_sql(
        db,
        &format!(
            "UPDATE mesh.member SET display_name = '{name}' WHERE id = '{}'",
            member.id
        ),
    );
}

/// A mesh whose first member is an admin (set before anyone connects, so
/// the first load sees it).
fn mesh_with_admin(broker: &TestBroker, mesh: &str, n: usize) -> Vec<Member> {
    let members = seed_mesh(&broker.db, mesh, n);
    make_admin(&broker.db, &members[0]);
    members
}

fn revoked(db: &str, member: &Member) -> bool {
    common::query_rows(
        db,
        &format!(
            "SELECT revoked_at IS NOT NULL FROM mesh.member WHERE id = '{}'",
            member.id
        ),
    )[0]
    .get(0)
}

#[test]
fn only_admins_may_and_never_against_themselves() {
    let broker = start(&[]);
    let members = mesh_with_admin(&broker, "roles", 2);
    let mut admin = Peer::connect(&broker, &members[0]);
    let mut plain = Peer::connect(&broker, &members[1]);
    for message in [
        json!({"type": "kick", "target": members[0].id, "_reqId": "k"}),
        json!({"type": "list_bans", "_reqId": "k"}),
        json!({"type": "audit_query", "_reqId": "k"}),
        json!({"type": "audit_verify", "_reqId": "k"}),
    ] {
        let reply = plain.request(&message);
        assert_eq!(
            (reply["code"].as_str(), reply["_reqId"].as_str()),
            (Some("forbidden"), Some("k")),
            "{message}"
        );
    }
    for kind in ["kick", "ban"] {
        let reply = admin.request(&json!({"type": kind, "target": members[0].pubkey}));
        assert_eq!(reply["code"], "forbidden", "{kind} itself: {reply}");
    }
    let reply = admin.request(&json!({"type": "audit_query", "limit": 501}));
    assert_eq!(reply["code"], "invalid_field");
}

#[test]
fn targets_by_id_pubkey_or_name_within_the_mesh_only() {
    let broker = start(&[]);
    let members = mesh_with_admin(&broker, "names", 4);
    let others = seed_mesh(&broker.db, "othermesh", 1);
    rename(&broker.db, &members[1], "Alice");
    rename(&broker.db, &members[2], "bob");
    rename(&broker.db, &members[3], "BOB");
    let mut admin = Peer::connect(&broker, &members[0]);
    let mut alice = Peer::connect(&broker, &members[1]);
    let reply = admin.request(&json!({"type": "kick", "target": "alice", "_reqId": "n"}));
    assert_eq!(reply["type"], "kick_ack", "{reply}");
    assert_eq!(reply["kicked"], json!([alice.presence_id]));
    assert_eq!(reply["_reqId"], "n");
    alice.expect_close(4001);
    for (target, code) in [
        ("Bob", "ambiguous_target"),
        ("nobody", "unknown_target"),
        (others[0].id.as_str(), "unknown_target"),
        (others[0].pubkey.as_str(), "unknown_target"),
    ] {
        let reply = admin.request(&json!({"type": "kick", "target": target}));
        assert_eq!(reply["code"], code, "{target}: {reply}");
    }
    let reply = admin.request(&json!({"type": "kick", "target": members[2].pubkey.to_uppercase()}));
    assert_eq!(reply["type"], "kick_ack", "{reply}");
    assert_eq!(reply["kicked"], json!([]));
    // A kick is not a ban: alice says hello again at once.
    Peer::connect(&broker, &members[1]);
}

#[test]
fn kick_and_ban_reach_sessions_on_both_shards_and_unban_lets_the_member_back() {
    let broker = start(&[("MEMBER_REFRESH_SECONDS", "1")]);
    let members = mesh_with_admin(&broker, "ban", 2);
    let mut admin = Peer::connect(&broker, &members[0]);
    // Sessions of the target until both shards have one.
    let mut sessions = Vec::new();
    let mut shards = std::collections::HashSet::new();
    while shards.len() < 2 || sessions.len() < 2 {
        let peer = Peer::connect(&broker, &members[1]);
        shards.insert(broker.shard_of(&peer.presence_id));
        sessions.push(peer);
        assert!(sessions.len() < 40, "sessions never landed on both shards");
    }
    let reply = admin.request(&json!({"type": "kick", "target": members[1].id}));
    assert_eq!(
        reply["kicked"].as_array().unwrap().len(),
        sessions.len(),
        "{reply}"
    );
    for peer in &mut sessions {
        peer.expect_close(4001);
    }
    let mut again: Vec<Peer> = (0..3)
        .map(|_| Peer::connect(&broker, &members[1]))
        .collect();
    let reply = admin.request(
        &json!({"type": "ban", "target": members[1].pubkey, "reason": "spam", "_reqId": "b"}),
    );
    assert_eq!(
        reply,
        json!({"type": "ban_ack", "memberId": members[1].id, "_reqId": "b"})
    );
    for peer in &mut again {
        peer.expect_close(4002);
    }
    assert!(revoked(&broker.db, &members[1]));
    let mut refused = Peer::open(&broker);
    assert_eq!(refused.hello(&members[1])["code"], "unauthorized");
    let bans = admin.request(&json!({"type": "list_bans"}));
    assert_eq!(bans["type"], "bans_list");
    assert_eq!(bans["bans"][0]["memberId"], members[1].id.as_str());
    assert_eq!(bans["bans"][0]["pubkey"], members[1].pubkey.as_str());
    assert_rfc3339(bans["bans"][0]["revokedAt"].as_str().unwrap());
    // Still banned after a refresh.
    std::thread::sleep(Duration::from_millis(1500));
    let mut refused = Peer::open(&broker);
    assert_eq!(refused.hello(&members[1])["code"], "unauthorized");
    let reply = admin.request(&json!({"type": "unban", "target": members[1].id}));
    assert_eq!(reply["type"], "unban_ack", "{reply}");
    assert!(!revoked(&broker.db, &members[1]));
    Peer::connect(&broker, &members[1]);
    assert_eq!(
        admin.request(&json!({"type": "list_bans"}))["bans"],
        json!([])
    );
}

#[test]
fn audit_query_pages_newest_first_and_filters_and_verify_reports_the_chain() {
    let broker = start(&[]);
    let members = mesh_with_admin(&broker, "auditq", 2);
    let mut admin = Peer::connect(&broker, &members[0]);
    let mut other = Peer::connect(&broker, &members[1]);
    for i in 0..5 {
        other.send(&members[0].pubkey, "now", "n", "c", &format!("s{i}"));
    }
    let rows_of = |reply: &Value| reply["entries"].as_array().unwrap().clone();
    let sends = poll_rows(&mut admin, |r| {
        r.iter().filter(|e| e["eventType"] == "send").count() == 5
    });
    assert!(
        sends
            .windows(2)
            .all(|w| w[0]["createdAt"].as_str() >= w[1]["createdAt"].as_str()),
        "newest first"
    );
    let page = admin.request(&json!({"type": "audit_query", "eventType": "send", "limit": 2}));
    let first = rows_of(&page);
    assert_eq!(first.len(), 2);
    assert!(first
        .iter()
        .all(|e| e["eventType"] == "send" && e["actor"] == members[1].id.as_str()));
    assert!(first[0]["metadata"]["messageId"].is_string());
    let next = admin.request(
        &json!({"type": "audit_query", "eventType": "send", "limit": 2,
        "beforeId": first[1]["id"]}),
    );
    let second = rows_of(&next);
    assert_eq!(second.len(), 2);
    assert!(second
        .iter()
        .all(|e| e["id"] != first[0]["id"] && e["id"] != first[1]["id"]));
    let verify = admin.request(&json!({"type": "audit_verify", "_reqId": "v"}));
    assert_eq!(verify["type"], "audit_verify_result", "{verify}");
    assert_eq!(verify["valid"], true, "{verify}");
    assert_eq!(verify["brokenAt"], Value::Null);
    assert!(verify["entries"].as_u64().unwrap() >= 7);
    assert_eq!(verify["_reqId"], "v");
    // A row changed behind the broker's back breaks the chain there.
    let victim = first[1]["id"].as_str().unwrap();
    common::exec_sql(
        &broker.db,
        &format!(
            "UPDATE mesh.audit_log SET metadata = '{{\"tampered\":true}}' WHERE id = '{victim}'"
        ),
    );
    let verify = admin.request(&json!({"type": "audit_verify"}));
    assert_eq!(
        (verify["valid"].as_bool(), verify["brokenAt"].as_str()),
        (Some(false), Some(victim)),
        "{verify}"
    );
}

/// audit_query (limit 500) until `pred` holds for the entries.
fn poll_rows(admin: &mut Peer, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = poll(WAIT, || {
        let reply = admin.request(&json!({"type": "audit_query", "limit": 500}));
        last = reply["entries"].as_array().cloned().unwrap_or_default();
        pred(&last)
    });
    assert!(ok, "audit rows never matched: {last:?}");
    last
}
