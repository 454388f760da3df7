//! Sessions and the peer directory (PROTOCOL.md §9): list_peers across
//! shards, `_reqId`, peer events, grace and resume, replacement, the
//! per-member send rate, and what an older client sees. Each test runs the
//! real broker binary (2 shards) against its own fresh database.
mod common;
mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::*;

/// A hello for `member` with `extra` fields merged in (they win).
fn hello_with(member: &Member, extra: Value) -> Value {
    let mut hello = hello(member);
    for (k, v) in extra.as_object().expect("extra is an object") {
        hello[k] = v.clone();
    }
    hello
}

/// Says `hello` on a new connection; returns the peer and its hello_ack.
fn connect_with(broker: &TestBroker, member: &Member, hello: &Value) -> (Peer, Value) {
    let mut peer = Peer::open(broker);
    let ack = peer.request(hello);
    assert_eq!(ack["type"], "hello_ack", "hello as {}: {ack}", member.id);
    peer.presence_id = ack["presenceId"].as_str().unwrap().to_owned();
    peer.member = Some(member.clone());
    (peer, ack)
}

/// A session of each member, opened until one landed on each shard;
/// returns them with the shard each is on.
fn on_both_shards(broker: &TestBroker, members: &[Member]) -> Vec<(Peer, u64)> {
    let mut peers: Vec<(Peer, u64)> = Vec::new();
    for member in members {
        let peer = Peer::connect(broker, member);
        let shard = broker.shard_of(&peer.presence_id);
        peers.push((peer, shard));
    }
    let shards: std::collections::HashSet<u64> = peers.iter().map(|(_, s)| *s).collect();
    assert_eq!(shards.len(), 2, "sessions on both shards");
    peers
}

fn list_peers(peer: &mut Peer) -> Vec<Value> {
    let reply = peer.request(&json!({"type": "list_peers"}));
    assert_eq!(reply["type"], "peers_list", "{reply}");
    reply["peers"].as_array().expect("peers array").clone()
}

/// Polls list_peers on `peer` until `pred` holds for its entries.
fn wait_list(peer: &mut Peer, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = poll(WAIT, || {
        last = list_peers(peer);
        pred(&last)
    });
    assert!(ok, "{what}: {last:?}");
    last
}

fn entry<'a>(peers: &'a [Value], presence_id: &str) -> Option<&'a Value> {
    peers.iter().find(|p| p["presenceId"] == presence_id)
}

/// Ends a connection without a close frame (the socket just goes).
fn drop_socket(mut peer: Peer) {
    peer.stream()
        .shutdown(std::net::Shutdown::Both)
        .expect("shutdown");
}

/// Events (`subtype: system` pushes) among what `peer` receives until it
/// is quiet.
fn events(peer: &mut Peer) -> Vec<Value> {
    let pushes = peer.drain_pushes(QUIET);
    for push in &pushes {
        assert_eq!(push["subtype"], "system", "only events expected: {push}");
    }
    pushes
}

fn event_names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn list_peers_spans_both_shards_with_self_away_and_no_other_mesh() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "30")]);
    let members = seed_mesh(&broker.db, "dir", 12);
    let others = seed_mesh(&broker.db, "elsewhere", 2);
    let _stranger = Peer::connect(&broker, &others[0]);
    let mut peers = on_both_shards(&broker, &members);
    let (gone, _) = peers.pop().unwrap();
    let gone_id = gone.presence_id.clone();
    drop_socket(gone);
    let (me, _) = &mut peers[0];
    let my_id = me.presence_id.clone();
    let ids: Vec<String> = peers.iter().map(|(p, _)| p.presence_id.clone()).collect();
    let (me, _) = &mut peers[0];
    let list = wait_list(me, "the lost session shows away", |l| {
        entry(l, &gone_id).is_some_and(|e| e["away"] == true)
    });
    assert_eq!(list.len(), members.len(), "every session of the mesh, once");
    for id in &ids {
        let e = entry(&list, id).unwrap_or_else(|| panic!("{id} listed"));
        assert_eq!(e["away"], false);
        assert_eq!(e["self"], *id == my_id, "{e}");
    }
    let mine = entry(&list, &my_id).unwrap();
    let member = &members[0];
    assert_eq!(mine["pubkey"], member.pubkey.as_str());
    assert_eq!(mine["memberId"], member.id.as_str());
    assert_eq!(mine["status"], "idle");
    assert_eq!(mine["statusSource"], "jsonl");
    assert_eq!(mine["summary"], Value::Null);
    assert_eq!(mine["groups"], json!([]));
    assert_eq!(mine["cwd"], "/work/project");
    assert!(mine["sessionId"].as_str().unwrap().starts_with("sess-"));
    assert!(mine["displayName"].is_string());
    assert_rfc3339(mine["connectedAt"].as_str().unwrap());
    assert!(list.iter().all(|e| e["memberId"] != others[0].id.as_str()));
}

#[test]
fn req_id_is_echoed_on_every_answer() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "req", 2);
    let (mut a, ack) = connect_with(
        &broker,
        &members[0],
        &hello_with(&members[0], json!({"_reqId": "h-1"})),
    );
    assert_eq!(ack["_reqId"], "h-1");
    let _b = Peer::connect(&broker, &members[1]);
    let reply = a.request(&json!({"type": "list_peers", "_reqId": "l-2"}));
    assert_eq!(reply["_reqId"], "l-2");
    let reply = a.request(&json!({"type": "send", "targetSpec": members[1].pubkey,
        "nonce": "n", "ciphertext": "c", "id": "s", "_reqId": "s-3"}));
    assert_eq!(
        (reply["type"].as_str(), reply["_reqId"].as_str()),
        (Some("ack"), Some("s-3"))
    );
    let reply = a.request(&json!({"type": "send", "targetSpec": "tag:x",
        "nonce": "n", "ciphertext": "c", "id": "t", "_reqId": "e-4"}));
    assert_eq!(reply["code"], "unsupported_target");
    assert_eq!(
        (reply["id"].as_str(), reply["_reqId"].as_str()),
        (Some("t"), Some("e-4"))
    );
    let reply = a.request(&json!({"type": "dance", "_reqId": "u-5"}));
    assert_eq!(
        (reply["code"].as_str(), reply["_reqId"].as_str()),
        (Some("unknown_type"), Some("u-5"))
    );
    let reply = a.request(&json!({"type": "set_summary", "summary": 5, "_reqId": "v-6"}));
    assert_eq!(
        (reply["code"].as_str(), reply["_reqId"].as_str()),
        (Some("invalid_field"), Some("v-6"))
    );
    let long = "r".repeat(65);
    let reply = a.request(&json!({"type": "list_peers", "_reqId": long}));
    assert_eq!(reply["code"], "invalid_field");
    assert!(
        reply["message"].as_str().unwrap().contains("_reqId"),
        "{reply}"
    );
    // Before hello too.
    let mut early = Peer::open(&broker);
    let reply = early.request(&json!({"type": "list_peers", "_reqId": "n-7"}));
    assert_eq!(
        (reply["code"].as_str(), reply["_reqId"].as_str()),
        (Some("no_hello"), Some("n-7"))
    );
}

#[test]
fn events_reach_only_those_who_asked_and_never_concern_their_own_member() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "30")]);
    let members = seed_mesh(&broker.db, "events", 3);
    let wants = json!({"capabilities": ["peer_events", "something_else"]});
    let (mut watcher, ack) = connect_with(
        &broker,
        &members[0],
        &hello_with(&members[0], wants.clone()),
    );
    assert_eq!(ack["capabilities"], json!(["peer_events"]));
    assert_eq!(ack["resumed"], false);
    let mut deaf = Peer::connect(&broker, &members[1]);
    // Events about sessions on different shards may come in either order:
    // take this one before the next session's.
    assert_eq!(event_names(&events(&mut watcher)), ["peer_joined"]);
    // A second session of the watcher's own member: no event about it.
    let (mut own, _) = connect_with(&broker, &members[0], &hello_with(&members[0], wants));
    let (mut other, _) = connect_with(&broker, &members[2], &hello(&members[2]));
    other.send_json(&json!({"type": "set_status", "status": "working"}));
    other.send_json(&json!({"type": "set_summary", "summary": "fixing the build"}));
    other.send_json(&json!({"type": "set_summary", "summary": "fixing the build"}));
    let seen = events(&mut watcher);
    assert_eq!(
        event_names(&seen),
        ["peer_joined", "peer_status", "peer_summary"],
        "other joined, other's status and (one) summary"
    );
    let summary = &seen[2];
    assert_eq!(summary["eventData"]["summary"], "fixing the build");
    assert_eq!(summary["eventData"]["status"], "working");
    assert_eq!(
        summary["eventData"]["presenceId"],
        other.presence_id.as_str()
    );
    assert!(summary["eventData"].get("self").is_none());
    for field in ["senderPubkey", "priority", "nonce", "ciphertext"] {
        assert!(summary.get(field).is_some(), "{field} in {summary}");
    }
    assert_eq!(summary["senderPubkey"], "system");
    assert_eq!(summary["priority"], "low");
    // The own member's second session saw `deaf` and `other`, never the watcher.
    assert_eq!(
        event_names(&events(&mut own)),
        ["peer_joined", "peer_status", "peer_summary"]
    );
    deaf.expect_nothing(QUIET);
    other.close();
    assert_eq!(event_names(&events(&mut watcher)), ["peer_left"]);
}

#[test]
fn a_lost_socket_is_away_and_resumes_within_the_grace_with_its_state_and_held_envelopes() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "30")]);
    let members = seed_mesh(&broker.db, "blip", 3);
    let (mut watcher, _) = connect_with(
        &broker,
        &members[2],
        &hello_with(&members[2], json!({"capabilities": ["peer_events"]})),
    );
    let laptop_hello = hello_with(&members[0], json!({"sessionId": "laptop-1"}));
    let (mut laptop, _) = connect_with(&broker, &members[0], &laptop_hello);
    laptop.send_json(&json!({"type": "set_status", "status": "working"}));
    laptop.send_json(&json!({"type": "set_summary", "summary": "on a train"}));
    let presence = laptop.presence_id.clone();
    assert_eq!(
        event_names(&events(&mut watcher)),
        ["peer_joined", "peer_status", "peer_summary"]
    );
    drop_socket(laptop);
    broker.wait_metric("broker_sessions_away", |v| v == 1.0);
    // While away, a send to the member is held.
    let mut sender = Peer::connect(&broker, &members[1]);
    events(&mut watcher);
    let ack = sender.send(&members[0].pubkey, "now", "n1", "while-away", "w1");
    // Resume: same presence, state kept, held envelope drained.
    let again = hello_with(&members[0], json!({"sessionId": "laptop-1"}));
    let (mut laptop, ack2) = connect_with(&broker, &members[0], &again);
    assert_eq!(ack2["resumed"], true);
    assert_eq!(ack2["presenceId"], presence.as_str());
    let push = laptop.recv_push(WAIT);
    assert_push(&push, &ack, &members[1], "now", "n1", "while-away");
    assert_eq!(event_names(&events(&mut watcher)), ["peer_returned"]);
    let list = list_peers(&mut laptop);
    let me = entry(&list, &presence).expect("listed");
    assert_eq!(
        (me["status"].as_str(), me["summary"].as_str()),
        (Some("working"), Some("on a train"))
    );
    assert_eq!(me["away"], false);
    assert_eq!(
        list.len(),
        3,
        "no second entry for the resumed session: {list:?}"
    );
    let rows = common::query_rows(
        &broker.db,
        &format!("SELECT disconnected_at IS NULL FROM mesh.presence WHERE id = '{presence}'"),
    );
    assert!(rows[0].get::<_, bool>(0), "the presence never ended");
    assert_eq!(broker.metric("broker_sessions_resumed_total"), 1.0);
    assert_eq!(broker.metric("broker_sessions_away"), 0.0);
}

#[test]
fn after_the_grace_a_lost_session_ends_with_peer_left() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "1")]);
    let members = seed_mesh(&broker.db, "gone", 2);
    let (mut watcher, _) = connect_with(
        &broker,
        &members[1],
        &hello_with(&members[1], json!({"capabilities": ["peer_events"]})),
    );
    let (lost, _) = connect_with(
        &broker,
        &members[0],
        &hello_with(&members[0], json!({"sessionId": "s"})),
    );
    let presence = lost.presence_id.clone();
    assert_eq!(event_names(&events(&mut watcher)), ["peer_joined"]);
    drop_socket(lost);
    let left = watcher.recv_push(Duration::from_secs(5));
    assert_eq!(left["event"], "peer_left", "{left}");
    assert_eq!(left["eventData"]["presenceId"], presence.as_str());
    let ended = poll(WAIT, || {
        common::query_rows(
            &broker.db,
            &format!(
                "SELECT disconnected_at IS NOT NULL FROM mesh.presence WHERE id = '{presence}'"
            ),
        )[0]
        .get::<_, bool>(0)
    });
    assert!(ended, "disconnected_at written after the grace");
    assert!(entry(&list_peers(&mut watcher), &presence).is_none());
    // The same session id now starts a new session.
    let (_, ack) = connect_with(
        &broker,
        &members[0],
        &hello_with(&members[0], json!({"sessionId": "s"})),
    );
    assert_eq!(ack["resumed"], false);
    assert_ne!(ack["presenceId"], presence.as_str());
}

#[test]
fn a_close_frame_ends_the_session_at_once() {
    let broker = start(&[("SESSION_GRACE_SECONDS", "60")]);
    let members = seed_mesh(&broker.db, "bye", 2);
    let (mut watcher, _) = connect_with(
        &broker,
        &members[1],
        &hello_with(&members[1], json!({"capabilities": ["peer_events"]})),
    );
    let leaving = Peer::connect(&broker, &members[0]);
    assert_eq!(event_names(&events(&mut watcher)), ["peer_joined"]);
    leaving.close();
    assert_eq!(event_names(&events(&mut watcher)), ["peer_left"]);
    assert_eq!(list_peers(&mut watcher).len(), 1);
}

#[test]
fn a_hello_with_a_live_session_id_replaces_it_and_other_members_are_unaffected() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "replace", 3);
    let (mut watcher, _) = connect_with(
        &broker,
        &members[2],
        &hello_with(&members[2], json!({"capabilities": ["peer_events"]})),
    );
    let shared = json!({"sessionId": "pid-77-1764200000"});
    let (mut old, _) = connect_with(
        &broker,
        &members[0],
        &hello_with(&members[0], shared.clone()),
    );
    // Another member with the same session id: a separate session.
    let (mut neighbour, ack) = connect_with(
        &broker,
        &members[1],
        &hello_with(&members[1], shared.clone()),
    );
    assert_eq!(ack["resumed"], false);
    // Events about sessions on different shards may come in either order:
    // take the joins before the summary.
    assert_eq!(
        event_names(&events(&mut watcher)),
        ["peer_joined", "peer_joined"]
    );
    old.send_json(&json!({"type": "set_summary", "summary": "kept"}));
    assert_eq!(event_names(&events(&mut watcher)), ["peer_summary"]);
    let (mut new, ack) = connect_with(&broker, &members[0], &hello_with(&members[0], shared));
    assert_eq!(ack["resumed"], true);
    assert_eq!(ack["presenceId"], old.presence_id.as_str());
    old.expect_close(4000);
    // No leave or join for a replacement.
    watcher.expect_nothing(QUIET);
    neighbour.expect_nothing(Duration::from_millis(10));
    let list = wait_list(&mut new, "one entry per session", |l| l.len() == 3);
    assert_eq!(entry(&list, &old.presence_id).unwrap()["summary"], "kept");
    assert!(entry(&list, &neighbour.presence_id).is_some());
    // Both still work.
    let ack = neighbour.send(&members[0].pubkey, "now", "n", "to-new", "x");
    assert_push(
        &new.recv_push(WAIT),
        &ack,
        &members[1],
        "now",
        "n",
        "to-new",
    );
    assert_eq!(broker.metric("broker_sessions_replaced_total"), 1.0);
    let resumed = poll(WAIT, || {
        common::query_rows(
            &broker.db,
            &format!(
                "SELECT count(*) FROM mesh.audit_log WHERE event_type = 'resume' \
                 AND actor_peer_id = '{}' AND metadata->>'replaced' = 'true' \
                 AND metadata->>'presenceId' = '{}'",
                members[0].id, old.presence_id
            ),
        )[0]
        .get::<_, i64>(0)
            == 1
    });
    assert!(resumed, "the replacement is audited as a resume");
}

#[test]
fn the_send_rate_is_per_member_across_its_sessions() {
    let broker = start(&[("SEND_BURST", "4"), ("SEND_RATE_PER_MIN", "1")]);
    let members = seed_mesh(&broker.db, "rate", 3);
    let mut one = Peer::connect(&broker, &members[0]);
    let mut two = Peer::connect(&broker, &members[0]);
    let mut other = Peer::connect(&broker, &members[1]);
    let _sink = Peer::connect(&broker, &members[2]);
    let target = members[2].pubkey.clone();
    for i in 0..4 {
        let peer = if i % 2 == 0 { &mut one } else { &mut two };
        peer.send(&target, "now", "n", "c", &format!("ok{i}"));
    }
    // On several nodes, a spend reaches the member's other nodes in a bus turn.
    one.settle();
    let reply = two.request(&json!({"type": "send", "targetSpec": target,
        "nonce": "n", "ciphertext": "c", "id": "over"}));
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_str()),
        (Some("rate_limited"), Some("over"))
    );
    // A reconnect does not refill it.
    two.close();
    let mut three = Peer::connect(&broker, &members[0]);
    let reply = three.request(&json!({"type": "send", "targetSpec": "*",
        "nonce": "n", "ciphertext": "c", "id": "again"}));
    assert_eq!(reply["code"], "rate_limited");
    // Another member has its own bucket; non-send messages never count.
    other.send(&target, "now", "n", "c", "theirs");
    three.request(&json!({"type": "list_peers"}));
    assert_eq!(broker.metric("broker_sends_rate_limited_total"), 2.0);
}

#[test]
fn hello_extensions_are_checked_and_answered() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "ext", 1);
    let member = &members[0];
    let (mut peer, ack) = connect_with(
        &broker,
        member,
        &hello_with(
            member,
            json!({"displayName": "reviewer", "protocolVersion": 2,
            "groups": [{"name": "Eng/Backend", "role": "lead"}, {"name": "ops"}],
            "capabilities": ["client_ack"]}),
        ),
    );
    assert_eq!(ack["displayName"], "reviewer");
    assert_eq!(ack["memberDisplayName"], format!("peer {}", member.id));
    assert_eq!(
        ack["groups"],
        json!([{"name": "eng/backend", "role": "lead"}, {"name": "ops", "role": null}])
    );
    assert_eq!(ack["capabilities"], json!(["client_ack"]));
    let list = list_peers(&mut peer);
    assert_eq!(list[0]["displayName"], "reviewer");
    assert_eq!(list[0]["groups"], ack["groups"]);
    let refused = [
        (json!({"protocolVersion": 3}), "unsupported_protocol"),
        (json!({"protocolVersion": "2"}), "invalid_field"),
        (json!({"displayName": "x".repeat(65)}), "invalid_field"),
        (
            json!({"groups": [{"name": "Not A Group"}]}),
            "invalid_field",
        ),
        (
            json!({"groups": [{"name": "eng", "role": "r".repeat(33)}]}),
            "invalid_field",
        ),
        (
            json!({"groups": (0..65).map(|i| json!({"name": format!("g{i}")})).collect::<Vec<_>>()}),
            "invalid_field",
        ),
        (json!({"capabilities": "peer_events"}), "invalid_field"),
    ];
    for (extra, code) in refused {
        let mut peer = Peer::open(&broker);
        let reply = peer.request(&hello_with(member, extra.clone()));
        assert_eq!(reply["code"], code, "{extra}: {reply}");
        peer.expect_close(1008);
    }
}

#[test]
fn summaries_and_bad_messages_after_hello_keep_the_session_open() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "summ", 1);
    let mut peer = Peer::connect(&broker, &members[0]);
    peer.send_json(&json!({"type": "set_summary", "summary": "s".repeat(1024)}));
    assert_eq!(
        list_peers(&mut peer)[0]["summary"].as_str().unwrap().len(),
        1024
    );
    let reply = peer.request(&json!({"type": "set_summary", "summary": "s".repeat(1025)}));
    assert_eq!(reply["code"], "invalid_field");
    for clear in [json!(null), json!("")] {
        peer.send_json(&json!({"type": "set_summary", "summary": "x"}));
        peer.send_json(&json!({"type": "set_summary", "summary": clear}));
        assert_eq!(list_peers(&mut peer)[0]["summary"], Value::Null);
    }
    let reply = peer.request(&json!({"type": "join_group", "name": "-bad"}));
    assert_eq!(reply["code"], "invalid_field");
    let reply = peer.request(&json!({"type": "leave_group"}));
    assert_eq!(reply["code"], "invalid_field");
    // Still joined.
    assert_eq!(list_peers(&mut peer).len(), 1);
}

#[test]
fn an_older_client_sees_exactly_the_first_protocol() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "old", 3);
    let mut a = Peer::connect(&broker, &members[0]);
    let mut b = Peer::connect(&broker, &members[1]);
    let c = Peer::connect(&broker, &members[2]);
    // Nobody asked for events: none arrive, whoever comes and goes.
    c.close();
    let ack = a.send(&members[1].pubkey, "next", "n", "direct", "d");
    let push = b.recv_push(WAIT);
    assert_push(&push, &ack, &members[0], "next", "n", "direct");
    assert!(
        push.get("targetSpec").is_none(),
        "a direct push has no targetSpec"
    );
    assert!(push.get("subtype").is_none());
    let ack = a.send("*", "now", "n", "all", "b");
    let push = b.recv_push(WAIT);
    assert_push(&push, &ack, &members[0], "now", "n", "all");
    assert_eq!(push["targetSpec"], "*");
    for peer in [&mut a, &mut b] {
        peer.expect_nothing(QUIET);
    }
}

#[test]
fn a_peer_list_larger_than_the_outbound_bound_still_arrives() {
    let broker = start(&[
        ("MAX_OUTBOUND_BYTES", "65536"),
        ("MAX_CONNECTIONS_PER_MESH", "1000"),
    ]);
    let members = seed_mesh(&broker.db, "big", 200);
    let mut peers: Vec<Peer> = members.iter().map(|m| Peer::connect(&broker, m)).collect();
    let me = &mut peers[0];
    let list = wait_list(me, "all 200 listed", |l| l.len() == 200);
    let bytes: usize = list.iter().map(|e| e.to_string().len()).sum();
    assert!(bytes > 65536, "the list ({bytes} B) is over the bound");
    // Still a working session.
    let ack = me.send(&members[1].pubkey, "now", "n", "after", "a");
    assert_push(
        &peers[1].recv_push(WAIT),
        &ack,
        &members[0],
        "now",
        "n",
        "after",
    );
}
