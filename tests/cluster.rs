//! Several broker nodes as one mesh (README "Several nodes"): a real
//! nats-server on a loopback port and three broker nodes (2 shards each)
//! sharing one fresh database. Sessions are spread over the nodes by the
//! test; what each user sees is asserted: pushes once, acks, the merged
//! directory, status gating, held envelopes following their member, the
//! merged connection bound, a node killed with -9 (its held envelopes, its
//! leases, its sessions taken over within their grace), NATS restarted,
//! parts in chunks, a session moving between nodes.
//! Skipped (with a note) where nats-server is not installed; `.ci/run`
//! installs it.
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{query_rows, Broker};
use serde_json::{json, Value};
use support::*;

/// A NATS server and `n` nodes on one database.
struct Cluster {
    nats: Nats,
    db: String,
    nodes: Vec<Broker>,
}

/// `None` (the test is skipped) without nats-server.
fn cluster(n: usize, env: &[(&str, &str)]) -> Option<Cluster> {
    cluster_on_nats(n, env, "")
}

/// The same on a nats-server started with `config`.
fn cluster_on_nats(n: usize, env: &[(&str, &str)], config: &str) -> Option<Cluster> {
    if nats_binary().is_none() {
        eprintln!("skipped: nats-server is not installed (apt-get install nats-server)");
        return None;
    }
    let nats = Nats::start_with(config);
    let db = common::fresh_database();
    let mut cluster = Cluster {
        nats,
        db,
        nodes: Vec::new(),
    };
    for i in 0..n {
        cluster.start_node(i, env);
    }
    // Every node has heard every other before the test begins.
    wait_nodes_joined(&cluster.nodes.iter().collect::<Vec<_>>());
    Some(cluster)
}

impl Cluster {
    fn start_node(&mut self, i: usize, env: &[(&str, &str)]) {
        let node = start_node(&self.db, &self.nats, i, env);
        if i < self.nodes.len() {
            self.nodes[i] = node;
        } else {
            self.nodes.push(node);
        }
    }

    fn node(&self, i: usize) -> &Broker {
        &self.nodes[i]
    }

    /// A session of `member` on node `i`.
    fn connect(&self, i: usize, member: &Member) -> Peer {
        Peer::connect(self.node(i), member)
    }
}

/// `list_peers` as `peer` sees it: member keys of live entries, sorted.
fn peer_keys(peer: &mut Peer) -> Vec<String> {
    let reply = peer.request(&json!({"type": "list_peers"}));
    assert_eq!(reply["type"], "peers_list", "{reply}");
    let mut keys: Vec<String> = reply["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pubkey"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

/// Waits until `peer`'s `list_peers` lists exactly `members`.
fn wait_directory(peer: &mut Peer, members: &[&Member]) {
    let mut want: Vec<String> = members.iter().map(|m| m.pubkey.clone()).collect();
    want.sort();
    let mut last = Vec::new();
    let seen = poll(WAIT, || {
        last = peer_keys(peer);
        last == want
    });
    assert!(seen, "directory {last:?}, wanted {want:?}");
}

fn set_status(peer: &mut Peer, status: &str) {
    peer.send_json(&json!({"type": "set_status", "status": status}));
}

fn assert_one_push(peer: &mut Peer, from: &Member, ciphertext: &str) -> Value {
    let push = peer.recv_push(WAIT);
    assert_eq!(push["senderPubkey"], from.pubkey.as_str(), "{push}");
    assert_eq!(push["ciphertext"], ciphertext, "{push}");
    push
}

#[test]
fn a_direct_send_crosses_nodes_once_and_the_directory_is_merged() {
    let Some(cluster) = cluster(3, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "direct", 4);
    let mut alice = cluster.connect(0, &members[0]);
    let mut bob = cluster.connect(1, &members[1]);
    let mut carol = cluster.connect(2, &members[2]);
    wait_directory(&mut alice, &[&members[0], &members[1], &members[2]]);
    wait_directory(&mut carol, &[&members[0], &members[1], &members[2]]);

    let ack = alice.send(&members[1].pubkey, "now", "bm9uY2U=", "Y3Jvc3M=", "s1");
    assert!(ack.get("durable").is_none(), "taken live by node b: {ack}");
    let push = assert_one_push(&mut bob, &members[0], "Y3Jvc3M=");
    assert_eq!(push["messageId"], ack["messageId"]);
    // The other way, and to the third node.
    bob.send(&members[2].pubkey, "next", "bm9uY2U=", "YmFjaw==", "s2");
    assert_one_push(&mut carol, &members[1], "YmFjaw==");
    expect_nothing_all([&mut alice, &mut bob, &mut carol]);

    // A session that leaves one node leaves every node's directory.
    carol.close();
    wait_directory(&mut alice, &[&members[0], &members[1]]);
}

fn expect_nothing_all<'a>(peers: impl IntoIterator<Item = &'a mut Peer>) {
    std::thread::sleep(QUIET);
    for peer in peers {
        peer.expect_nothing(Duration::from_millis(5));
    }
}

#[test]
fn a_broadcast_reaches_each_session_on_every_node_once() {
    let Some(cluster) = cluster(3, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "bcast", 7);
    let mut sender = cluster.connect(0, &members[0]);
    let mut others: Vec<Peer> = (1..7)
        .map(|i| cluster.connect(i % 3, &members[i]))
        .collect();
    let all: Vec<&Member> = members.iter().collect();
    wait_directory(&mut sender, &all);
    for n in 0..20 {
        sender.send(
            "*",
            "now",
            "bm9uY2U=",
            &format!("Yi{n:02}"),
            &format!("b{n}"),
        );
    }
    for peer in &mut others {
        let pushes = peer.drain_pushes(QUIET);
        let got: Vec<&str> = pushes
            .iter()
            .map(|p| p["ciphertext"].as_str().unwrap())
            .collect();
        let want: Vec<String> = (0..20).map(|n| format!("Yi{n:02}")).collect();
        assert_eq!(got, want, "each broadcast once, in order");
    }
    sender.expect_nothing(Duration::from_millis(5));
}

#[test]
fn status_gating_holds_for_a_busy_member_on_another_node_until_it_is_idle() {
    let Some(cluster) = cluster(2, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "gate", 2);
    let mut alice = cluster.connect(0, &members[0]);
    let mut bob = cluster.connect(1, &members[1]);
    wait_directory(&mut alice, &[&members[0], &members[1]]);
    set_status(&mut bob, "working");
    // Node a hears bob is busy: `next` is held (durably), `now` goes through.
    std::thread::sleep(Duration::from_millis(300));
    let held = alice.send(&members[1].pubkey, "next", "bm9uY2U=", "bmV4dA==", "n1");
    alice.send(&members[1].pubkey, "now", "bm9uY2U=", "bm93", "n2");
    assert_one_push(&mut bob, &members[0], "bm93");
    bob.expect_nothing(QUIET);
    set_status(&mut bob, "idle");
    let push = assert_one_push(&mut bob, &members[0], "bmV4dA==");
    assert_eq!(push["messageId"], held["messageId"]);
    bob.expect_nothing(QUIET);
    // Delivered: its row is marked.
    let id = held["messageId"].as_str().unwrap();
    assert!(poll(WAIT, || {
        !query_rows(
            &cluster.db,
            &format!(
                "SELECT 1 FROM mesh.message_queue WHERE id = '{id}' AND delivered_at IS NOT NULL"
            ),
        )
        .is_empty()
    }));
}

#[test]
fn an_envelope_held_for_an_offline_member_reaches_it_on_another_node_once() {
    let Some(cluster) = cluster(3, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "held", 2);
    let mut alice = cluster.connect(0, &members[0]);
    let ack = alice.send(&members[1].pubkey, "next", "bm9uY2U=", "aGVsZA==", "h1");
    assert!(ack.get("durable").is_none(), "stored before the ack: {ack}");
    let mut bob = cluster.connect(2, &members[1]);
    let push = assert_one_push(&mut bob, &members[0], "aGVsZA==");
    assert_eq!(push["messageId"], ack["messageId"]);
    bob.expect_nothing(QUIET);
    // A second session on the third node gets nothing more.
    let mut bob2 = cluster.connect(1, &members[1]);
    bob2.expect_nothing(QUIET);
}

/// A hello on a new connection to node `i` with `sessionId`; its ack.
fn hello_on(cluster: &Cluster, i: usize, member: &Member, session_id: &str) -> (Peer, Value) {
    let mut peer = Peer::open(cluster.node(i));
    let mut hello = hello(member);
    hello["sessionId"] = json!(session_id);
    let ack = peer.request(&hello);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    (peer, ack)
}

fn presence_row(cluster: &Cluster, presence: &str) -> (Option<String>, bool) {
    let rows = query_rows(
        &cluster.db,
        &format!(
            "SELECT node_id, disconnected_at IS NULL FROM mesh.presence WHERE id = '{presence}'"
        ),
    );
    (rows[0].get(0), rows[0].get(1))
}

#[test]
fn a_session_moves_to_another_node_with_its_presence_and_row() {
    let Some(cluster) = cluster(3, &[("SESSION_GRACE_SECONDS", "30")]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "move", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let mut watcher = cluster.connect(2, bob);
    let (mut first, ack) = hello_on(&cluster, 0, alice, "laptop");
    let presence = ack["presenceId"].as_str().unwrap().to_owned();
    set_status(&mut first, "working");
    wait_directory(&mut watcher, &[alice, bob]);
    // The same sessionId on node 1 replaces the live one on node 0.
    let (second, ack) = hello_on(&cluster, 1, alice, "laptop");
    assert_eq!(
        (ack["resumed"].as_bool(), ack["presenceId"].as_str()),
        (Some(true), Some(presence.as_str()))
    );
    first.expect_close(4000);
    let moved = poll(WAIT, || {
        presence_row(&cluster, &presence) == (Some("node-b".into()), true)
    });
    assert!(
        moved,
        "the row is node-b's and still open: {:?}",
        presence_row(&cluster, &presence)
    );
    // Lost there, it resumes on node 2 with its status; what was sent to it
    // meanwhile follows.
    drop(second);
    let away = poll(WAIT, || {
        let reply = watcher.request(&json!({"type": "list_peers"}));
        let peers = reply["peers"].as_array().unwrap().clone();
        peers
            .iter()
            .any(|p| p["presenceId"] == presence.as_str() && p["away"] == true)
    });
    assert!(away, "away in its grace on node-b");
    let ack = watcher.send(&alice.pubkey, "now", "bm9uY2U=", "bW92ZWQ=", "m1");
    let (mut third, hello_ack) = hello_on(&cluster, 2, alice, "laptop");
    assert_eq!(hello_ack["presenceId"], presence.as_str());
    let push = assert_one_push(&mut third, bob, "bW92ZWQ=");
    assert_eq!(push["messageId"], ack["messageId"]);
    let listed = poll(WAIT, || {
        let reply = watcher.request(&json!({"type": "list_peers"}));
        let mine: Vec<&Value> = reply["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["pubkey"] == alice.pubkey.as_str())
            .collect();
        mine.len() == 1
            && mine[0]["presenceId"] == presence.as_str()
            && mine[0]["status"] == "working"
    });
    assert!(listed, "one entry, the same presence, its status kept");
}

#[test]
fn a_part_larger_than_one_nats_message_goes_in_chunks() {
    // 8 KB messages: 40 sessions' entries take several.
    let Some(cluster) = cluster_on_nats(2, &[], "max_payload: 8192") else {
        return;
    };
    let members = seed_mesh(&cluster.db, "big", 41);
    let sessions: Vec<Peer> = members[1..].iter().map(|m| cluster.connect(0, m)).collect();
    let mut watcher = cluster.connect(1, &members[0]);
    let everyone: Vec<&Member> = members.iter().collect();
    wait_directory(&mut watcher, &everyone);
    let ack = watcher.send(&members[40].pubkey, "now", "bm9uY2U=", "Y2h1bms=", "c1");
    let mut last = sessions.into_iter().last().unwrap();
    let push = assert_one_push(&mut last, &members[0], "Y2h1bms=");
    assert_eq!(push["messageId"], ack["messageId"]);
}

#[test]
fn the_connection_bound_counts_every_node() {
    let Some(cluster) = cluster(3, &[("MAX_CONNECTIONS_PER_MESH", "2")]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "cap", 3);
    let mut a = cluster.connect(0, &members[0]);
    let _b = cluster.connect(1, &members[1]);
    wait_directory(&mut a, &[&members[0], &members[1]]);
    // Node c follows the mesh from the hello on: give its view a moment.
    let mut refused = false;
    for _ in 0..20 {
        let mut c = Peer::open(cluster.node(2));
        let answer = c.hello(&members[2]);
        if answer["type"] == "error" {
            assert_eq!(answer["code"], "capacity", "{answer}");
            refused = true;
            break;
        }
        c.close();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused,
        "the third session of a mesh bounded to 2 is refused"
    );
}

#[test]
fn a_killed_node_loses_nothing_acked_its_held_envelopes_follow() {
    // Its sessions are listed away for 1 s after it is found dead.
    let env = [
        UNLIMITED_SENDS[0],
        UNLIMITED_SENDS[1],
        ("SESSION_GRACE_SECONDS", "1"),
    ];
    let Some(mut cluster) = cluster(2, &env) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "kill", 3);
    let mut alice = cluster.connect(0, &members[0]);
    let mut carol = Peer::open(cluster.node(1));
    let mut hello = hello(&members[2]);
    hello["capabilities"] = json!(["peer_events"]);
    assert_eq!(carol.request(&hello)["type"], "hello_ack");
    wait_directory(&mut alice, &[&members[0], &members[2]]);
    let alice_presence = alice.presence_id.clone();
    // Held on node a for bob (offline), acked after their rows commit.
    let mut acked = Vec::new();
    for n in 0..50 {
        let ack = alice.send(
            &members[1].pubkey,
            "next",
            "bm9uY2U=",
            &format!("aw{n:02}"),
            &format!("k{n}"),
        );
        acked.push(ack["messageId"].as_str().unwrap().to_owned());
    }
    cluster.nodes[0].sigkill();
    let _ = cluster.nodes[0].wait_exit(WAIT);
    // Node b notices (no heartbeat for 1.5 s), takes over a's held
    // envelopes, lists alice away for her grace, then tells carol she left;
    // bob connects there.
    let left = carol.recv_push(Duration::from_secs(10));
    assert_eq!(left["event"], "peer_left", "{left}");
    assert_eq!(left["eventData"]["presenceId"], alice_presence.as_str());
    assert!(left["eventData"].get("self").is_none(), "{left}");
    wait_directory(&mut carol, &[&members[2]]);
    let mut bob = cluster.connect(1, &members[1]);
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let push = bob.recv_push(WAIT);
        got.push(push["messageId"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, acked, "every acked envelope once, in order");
    bob.expect_nothing(QUIET);
    let ended = poll(WAIT, || {
        query_rows(
            &cluster.db,
            "SELECT 1 FROM mesh.presence WHERE node_id = 'node-a' AND disconnected_at IS NULL",
        )
        .is_empty()
    });
    assert!(ended, "the dead node's presences end after their grace");
}

#[test]
fn a_dead_nodes_session_is_taken_over_on_another_node_within_its_grace() {
    let Some(mut cluster) = cluster(3, &[("SESSION_GRACE_SECONDS", "30")]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "orphan", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let mut watcher = cluster.connect(2, bob);
    let (mut laptop, ack) = hello_on(&cluster, 0, alice, "laptop");
    let presence = ack["presenceId"].as_str().unwrap().to_owned();
    set_status(&mut laptop, "working");
    wait_directory(&mut watcher, &[alice, bob]);
    cluster.nodes[0].sigkill();
    let _ = cluster.nodes[0].wait_exit(WAIT);
    // Found dead, its session is listed away, not dropped.
    let entry_of = |watcher: &mut Peer| {
        let reply = watcher.request(&json!({"type": "list_peers"}));
        let peers = reply["peers"].as_array().unwrap().clone();
        peers
            .into_iter()
            .find(|p| p["presenceId"] == presence.as_str())
    };
    let away = poll(WAIT, || {
        entry_of(&mut watcher).is_some_and(|e| e["away"] == true)
    });
    assert!(away, "away in its grace: {:?}", entry_of(&mut watcher));
    // Its client, back through another node, gets it again.
    let (_again, ack) = hello_on(&cluster, 1, alice, "laptop");
    assert_eq!(
        (ack["resumed"].as_bool(), ack["presenceId"].as_str()),
        (Some(true), Some(presence.as_str()))
    );
    let live = poll(WAIT, || {
        entry_of(&mut watcher).is_some_and(|e| e["away"] == false && e["status"] == "working")
    });
    assert!(
        live,
        "live again, its status kept: {:?}",
        entry_of(&mut watcher)
    );
    let row = presence_row(&cluster, &presence);
    assert_eq!(
        row,
        (Some("node-b".into()), true),
        "the row is node-b's, open"
    );
}

/// A node that dies before its presence row is committed: the node that
/// takes the session over writes the row (its own, open).
#[test]
fn a_session_taken_over_from_a_node_that_died_before_writing_its_row_gets_one() {
    let Some(mut cluster) = cluster(2, &[("SESSION_GRACE_SECONDS", "30")]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "unwritten", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let mut watcher = cluster.connect(1, bob);
    let (_laptop, ack) = hello_on(&cluster, 0, alice, "laptop");
    let presence = ack["presenceId"].as_str().unwrap().to_owned();
    wait_directory(&mut watcher, &[alice, bob]);
    let written = poll(WAIT, || {
        let sql = format!("SELECT 1 FROM mesh.presence WHERE id = '{presence}'");
        !query_rows(&cluster.db, &sql).is_empty()
    });
    assert!(written, "node-a wrote its row");
    cluster.nodes[0].sigkill();
    let _ = cluster.nodes[0].wait_exit(WAIT);
    // As if node-a had died with the row still in its batch.
    let sql = format!("DELETE FROM mesh.presence WHERE id = '{presence}'");
    common::exec_sql(&cluster.db, &sql);
    let away = poll(WAIT, || {
        let reply = watcher.request(&json!({"type": "list_peers"}));
        reply["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["presenceId"] == presence.as_str() && p["away"] == true)
    });
    assert!(away, "listed away in its grace");
    let (_again, ack) = hello_on(&cluster, 1, alice, "laptop");
    assert_eq!(
        (ack["resumed"].as_bool(), ack["presenceId"].as_str()),
        (Some(true), Some(presence.as_str()))
    );
    let row = poll(WAIT, || {
        let sql = format!("SELECT 1 FROM mesh.presence WHERE id = '{presence}'");
        !query_rows(&cluster.db, &sql).is_empty()
    });
    assert!(row, "the row is written by the node that took it over");
    assert_eq!(
        presence_row(&cluster, &presence),
        (Some("node-b".into()), true),
        "the row is node-b's, open"
    );
}

#[test]
fn a_leased_envelope_handed_to_a_node_that_dies_reaches_its_member_elsewhere() {
    let Some(mut cluster) = cluster(3, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "lent", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let mut sender = cluster.connect(0, alice);
    // Held on node a for bob (offline), acked once its row committed.
    let ack = sender.send(&bob.pubkey, "now", "bm9uY2U=", "bGVudA==", "l1");
    // Bob takes it on node b with client_ack: leased, not acked, so its row
    // is not delivered yet; then node b dies.
    let mut leasing = Peer::open(cluster.node(1));
    let mut hello = hello(bob);
    hello["capabilities"] = json!(["client_ack"]);
    assert_eq!(leasing.request(&hello)["type"], "hello_ack");
    let push = leasing.recv_push(WAIT);
    assert_eq!(push["messageId"], ack["messageId"]);
    let adopted = poll(WAIT, || {
        let id = ack["messageId"].as_str().unwrap();
        let rows = query_rows(
            &cluster.db,
            &format!("SELECT held_by FROM mesh.message_queue WHERE id = '{id}'"),
        );
        rows[0].get::<_, Option<String>>(0).as_deref() == Some("node-b")
    });
    assert!(adopted, "the row is node b's once it holds the envelope");
    cluster.nodes[1].sigkill();
    let _ = cluster.nodes[1].wait_exit(WAIT);
    // The others take over node b's rows; bob, back on node c, gets it.
    let mut bob_again = cluster.connect(2, bob);
    let push = bob_again.recv_push(Duration::from_secs(10));
    assert_eq!(push["messageId"], ack["messageId"]);
    assert_eq!(push["ciphertext"], "bGVudA==");
    bob_again.expect_nothing(QUIET);
}

#[test]
fn nats_restarted_nodes_reconnect_and_nothing_acked_is_lost() {
    let Some(mut cluster) = cluster(2, &UNLIMITED_SENDS) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "restart", 2);
    let mut alice = cluster.connect(0, &members[0]);
    let mut bob = cluster.connect(1, &members[1]);
    wait_directory(&mut alice, &[&members[0], &members[1]]);
    let mut acked = Vec::new();
    let port = cluster.nats.port;
    for n in 0..60 {
        if n == 20 {
            cluster.nats.stop();
        }
        if n == 40 {
            cluster.nats = Nats::start_on(port);
        }
        let ack = alice.send(
            &members[1].pubkey,
            "now",
            "bm9uY2U=",
            &format!("cg{n:02}"),
            &format!("r{n}"),
        );
        acked.push(ack["messageId"].as_str().unwrap().to_owned());
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < acked.len() && Instant::now() < deadline {
        for push in bob.drain_pushes(Duration::from_millis(200)) {
            got.push(push["messageId"].as_str().unwrap().to_owned());
        }
    }
    got.sort();
    got.dedup();
    let mut want = acked.clone();
    want.sort();
    assert_eq!(got, want, "every acked send reached bob");
}

/// `POST /hook/set-status` to node `i`: the status code and JSON answer.
fn post_hook(cluster: &Cluster, i: usize, cwd: &str, status: &str) -> (u16, Value) {
    let body = json!({"cwd": cwd, "pid": 4242, "status": status});
    let reply = common::http(
        cluster.node(i).addr(),
        "POST",
        "/hook/set-status",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    let answer = serde_json::from_slice(&reply.body).unwrap();
    (reply.status, answer)
}

/// A session of `member` on node `i` with its own `cwd`, and its presence id.
fn connect_in(cluster: &Cluster, i: usize, member: &Member, cwd: &str) -> (Peer, String) {
    let mut peer = Peer::open(cluster.node(i));
    let mut request = hello(member);
    request["cwd"] = json!(cwd);
    let ack = peer.request(&request);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    let presence = ack["presenceId"].as_str().unwrap().to_owned();
    (peer, presence)
}

/// Whether `peer`'s `list_peers` shows a session of `member` with `status`
/// set by `source`.
fn lists_status(peer: &mut Peer, member: &Member, status: &str, source: &str) -> bool {
    let reply = peer.request(&json!({"type": "list_peers"}));
    reply["peers"].as_array().unwrap().iter().any(|p| {
        p["pubkey"] == member.pubkey.as_str()
            && p["status"] == status
            && p["statusSource"] == source
    })
}

#[test]
fn a_hook_reaching_a_node_without_the_session_is_applied_where_it_is() {
    let Some(cluster) = cluster(3, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "hook", 2);
    let mut alice = cluster.connect(0, &members[0]);
    let (mut bob, bob_presence) = connect_in(&cluster, 1, &members[1], "/work/bob");
    wait_directory(&mut alice, &[&members[0], &members[1]]);
    // Bob's session (pid 4242, /work/bob) is on node b; the hook goes to
    // node c, which has no session at all.
    let (code, answer) = post_hook(&cluster, 2, "/work/bob", "working");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["presence_id"], bob_presence.as_str(), "{answer}");
    // Node a hears bob is working: `next` waits, and is pushed once idle.
    assert!(poll(WAIT, || lists_status(
        &mut alice,
        &members[1],
        "working",
        "hook"
    )));
    alice.send(&members[1].pubkey, "next", "bm9uY2U=", "aG9vaw==", "k1");
    bob.expect_nothing(QUIET);
    set_status(&mut bob, "idle");
    assert_one_push(&mut bob, &members[0], "aG9vaw==");
}

#[test]
fn a_hook_stashed_on_one_node_sets_the_first_status_of_a_session_on_another() {
    let Some(cluster) = cluster(3, &[]) else {
        return;
    };
    let members = seed_mesh(&cluster.db, "stash", 2);
    let mut alice = cluster.connect(0, &members[0]);
    // No session has /work/carol anywhere: node c stashes it, and so do
    // the others.
    let (_, answer) = post_hook(&cluster, 2, "/work/carol", "working");
    assert_eq!(answer["pending"], true, "{answer}");
    std::thread::sleep(Duration::from_millis(200));
    // The session connects to node b.
    let (_carol, _) = connect_in(&cluster, 1, &members[1], "/work/carol");
    let working = poll(WAIT, || {
        lists_status(&mut alice, &members[1], "working", "hook")
    });
    assert!(working, "the stashed hook is carol's first status");
}
