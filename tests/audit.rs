//! The audit trail (PROTOCOL.md §8 `mesh.audit_log`), black box: what a
//! session's life writes (connect, status changes, hook signals, refused
//! messages, disconnect with its reason), refused hellos in a known mesh,
//! the batch metrics, that no nonce or ciphertext ever lands in the table,
//! that a deleted mesh does not wedge the lane, that events made while
//! Postgres is down are written when it is back, and that SIGTERM flushes
//! what is queued. Writes are batched, so every check polls the table.
mod common;
mod support;

use std::time::Duration;

use common::{exec_sql, http, query_rows, world_traversable_tempdir, Broker};
use meshbroker::devdb::LocalPostgres;
use serde_json::{json, Value};
use support::*;

/// One `mesh.audit_log` row.
#[derive(Debug, Clone)]
struct Row {
    event_type: String,
    actor: Option<String>,
    target: Option<String>,
    metadata: Value,
}

/// A mesh's rows in the order they were written.
fn rows(db: &str, mesh_id: &str) -> Vec<Row> {
    query_rows(
        db,
        &format!(
            "SELECT event_type, actor_peer_id, target_peer_id, metadata::text \
             FROM mesh.audit_log WHERE mesh_id = '{mesh_id}' ORDER BY created_at, id"
        ),
    )
    .iter()
    .map(|r| Row {
        event_type: r.get(0),
        actor: r.get(1),
        target: r.get(2),
        metadata: serde_json::from_str(r.get::<_, &str>(3)).expect("metadata is JSON"),
    })
    .collect()
}

/// Polls until `done` holds for the mesh's rows; returns them.
fn wait_rows(db: &str, mesh_id: &str, done: impl Fn(&[Row]) -> bool) -> Vec<Row> {
    let mut last = Vec::new();
    let ok = poll(WAIT, || {
        last = rows(db, mesh_id);
        done(&last)
    });
    assert!(ok, "audit rows of {mesh_id} never complete: {last:#?}");
    last
}

fn count(rows: &[Row], event_type: &str) -> usize {
    rows.iter().filter(|r| r.event_type == event_type).count()
}

/// A row's (event type, actor, target, metadata), for comparing in one go.
fn summary(row: &Row) -> (String, Option<String>, Option<String>, Value) {
    (
        row.event_type.clone(),
        row.actor.clone(),
        row.target.clone(),
        row.metadata.clone(),
    )
}

fn expected(
    event_type: &str,
    actor: &str,
    metadata: Value,
) -> (String, Option<String>, Option<String>, Value) {
    (
        event_type.to_owned(),
        Some(actor.to_owned()),
        None,
        metadata,
    )
}

#[test]
fn a_session_life_is_audited_in_order_with_its_metadata() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "life", 1);
    let alice = &members[0];
    let mut peer = Peer::open(&broker);
    let hello = hello(alice);
    let session_id = hello["sessionId"].as_str().unwrap().to_owned();
    let ack = peer.request(&hello);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    let presence = ack["presenceId"].as_str().unwrap().to_owned();

    peer.send_json(&json!({"type": "set_status", "status": "working"}));
    peer.send_text("{not json");
    peer.expect_error("bad_json");
    // The harness's hello says pid 4242 in /work/project.
    let reply = http(
        broker.addr(),
        "POST",
        "/hook/set-status",
        &[("Content-Type", "application/json")],
        json!({"cwd": "/work/project", "pid": 4242, "status": "idle"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    peer.close();

    let rows = wait_rows(&broker.db, "life", |r| count(r, "disconnect") == 1);
    let got: Vec<_> = rows.iter().map(summary).collect();
    let p = presence.as_str();
    let want = vec![
        expected(
            "connect",
            &alice.id,
            json!({"pid": 4242, "presenceId": p, "role": "control-plane", "sessionId": session_id}),
        ),
        expected(
            "status_change",
            &alice.id,
            json!({"from": "idle", "presenceId": p, "source": "manual", "status": "working"}),
        ),
        expected(
            "rejected",
            &alice.id,
            json!({"code": "bad_json", "stage": "message"}),
        ),
        expected(
            "hook_status",
            &alice.id,
            json!({"presenceId": p, "status": "idle"}),
        ),
        expected(
            "status_change",
            &alice.id,
            json!({"from": "working", "presenceId": p, "source": "hook", "status": "idle"}),
        ),
        expected(
            "disconnect",
            &alice.id,
            json!({"code": 1000, "presenceId": p, "reason": "client_closed"}),
        ),
    ];
    assert_eq!(got, want);

    // Every row came through a committed, timed batch, and none was lost.
    assert!(broker.metric("broker_audit_batch_write_seconds_count") > 0.0);
    assert_eq!(broker.metric("broker_audit_dropped_total"), 0.0);
    assert!(broker
        .metrics_text()
        .lines()
        .any(|l| l == "broker_audit_dropped_total 0"));
}

#[test]
fn refused_hellos_in_a_known_mesh_are_audited_with_their_code() {
    let broker = start(&[("MAX_CONNECTIONS_PER_MESH", "1")]);
    let members = seed_mesh(&broker.db, "gate", 2);
    let (alice, bob) = (&members[0], &members[1]);
    let _alice = Peer::connect(&broker, alice);

    let refuse = |hello: Value, code: &str| {
        let mut peer = Peer::open(&broker);
        peer.send_json(&hello);
        peer.expect_error(code);
        peer.expect_close(1008);
    };
    refuse(support::hello(bob), "capacity");
    let key = new_key();
    let mallory = Member {
        mesh_id: "gate".into(),
        id: "gate-mallory".into(),
        pubkey: pubkey_hex(&key),
        key,
    };
    refuse(support::hello(&mallory), "unauthorized");
    let mut forged = support::hello(bob);
    forged["signature"] = json!("00".repeat(64));
    refuse(forged, "bad_signature");
    // A mesh nobody knows cannot have rows (and costs no drop).
    let stranger = Member {
        mesh_id: "no-such-mesh".into(),
        ..mallory.clone()
    };
    refuse(support::hello(&stranger), "unauthorized");

    let rows = wait_rows(&broker.db, "gate", |r| count(r, "rejected") == 3);
    // Rows from different shards a few milliseconds apart may be chained
    // (and so ordered) either way: compare them as a set.
    let mut rejected: Vec<_> = rows
        .iter()
        .filter(|r| r.event_type == "rejected")
        .map(summary)
        .map(|r| format!("{r:?}"))
        .collect();
    rejected.sort();
    let hello_refused = |actor: &str, code: &str| {
        format!(
            "{:?}",
            expected("rejected", actor, json!({"code": code, "stage": "hello"}))
        )
    };
    let mut wanted = vec![
        hello_refused(&bob.id, "capacity"),
        hello_refused(&mallory.id, "unauthorized"),
        hello_refused(&bob.id, "bad_signature"),
    ];
    wanted.sort();
    assert_eq!(rejected, wanted);
    let none = query_rows(
        &broker.db,
        "SELECT count(*) FROM mesh.audit_log WHERE mesh_id = 'no-such-mesh'",
    );
    assert_eq!(none[0].get::<_, i64>(0), 0);
    assert_eq!(broker.metric("broker_audit_dropped_total"), 0.0);
}

#[test]
fn audit_rows_never_hold_a_nonce_or_a_ciphertext() {
    const NONCE: &str = "bm9uY2VDYW5hcnk5MTc3";
    const CIPHERTEXT: &str = "Y2lwaGVydGV4dENhbmFyeTkxNzc";
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "secret", 3);
    let (alice, bob, carol) = (&members[0], &members[1], &members[2]);
    let mut a = Peer::connect(&broker, alice);
    let mut b = Peer::connect(&broker, bob);
    // Direct to an online member, and a broadcast that carol (offline)
    // holds: whatever the send and delivery path audits, it is metadata.
    let direct = a.send(&bob.pubkey, "now", NONCE, CIPHERTEXT, "s1");
    assert_push(&b.recv_push(WAIT), &direct, alice, "now", NONCE, CIPHERTEXT);
    let all = a.send("*", "next", NONCE, CIPHERTEXT, "s2");
    assert_push(&b.recv_push(WAIT), &all, alice, "next", NONCE, CIPHERTEXT);
    let mut c = Peer::connect(&broker, carol);
    assert_push(&c.recv_push(WAIT), &all, alice, "next", NONCE, CIPHERTEXT);
    a.close();
    b.close();
    c.close();
    // Each shard hands its events over in order, so once every session's
    // disconnect is written, so is everything its shard audited before.
    wait_rows(&broker.db, "secret", |r| count(r, "disconnect") == 3);

    let grep = |needle: &str| {
        query_rows(
            &broker.db,
            &format!(
                "SELECT count(*) FROM mesh.audit_log WHERE position('{needle}' IN \
                 concat_ws('|', id, mesh_id, event_type, actor_peer_id, target_peer_id, \
                 metadata::text)) > 0"
            ),
        )[0]
        .get::<_, i64>(0)
    };
    let total = query_rows(&broker.db, "SELECT count(*) FROM mesh.audit_log")[0].get::<_, i64>(0);
    assert!(total >= 6, "only {total} audit rows");
    assert_eq!(grep(CIPHERTEXT), 0, "a ciphertext in mesh.audit_log");
    assert_eq!(grep(NONCE), 0, "a nonce in mesh.audit_log");
    // The grep itself works: it finds what is there.
    assert!(grep(&alice.id) > 0);
}

#[test]
fn a_deleted_mesh_does_not_wedge_the_lane() {
    let broker = start(&[("MEMBER_REFRESH_SECONDS", "1")]);
    let kept = seed_mesh(&broker.db, "kept", 1);
    let gone = seed_mesh(&broker.db, "gone", 1);
    let keeper = Peer::connect(&broker, &kept[0]);
    let mut doomed = Peer::connect(&broker, &gone[0]);
    wait_rows(&broker.db, "gone", |r| count(r, "connect") == 1);

    // The cascade takes the mesh's members and rows; the refresh then
    // closes the session, whose disconnect names a mesh that is no more.
    exec_sql(&broker.db, "DELETE FROM mesh.mesh WHERE id = 'gone'");
    doomed.expect_close_within(1008, Duration::from_secs(10));
    keeper.close();

    let kept = wait_rows(&broker.db, "kept", |r| count(r, "disconnect") == 1);
    assert_eq!(kept.last().unwrap().metadata["reason"], "client_closed");
    assert!(rows(&broker.db, "gone").is_empty());
    assert_eq!(broker.metric("broker_audit_dropped_total"), 0.0);
}

#[test]
fn events_made_while_postgres_is_down_are_written_when_it_is_back() {
    // A cluster of its own: stopping the shared one would hit other tests.
    let root = world_traversable_tempdir("meshbroker-audit-outage-");
    let pg = LocalPostgres::start(&root.join("data"), true).expect("start Postgres");
    pg.create_database("outage").expect("create the database");
    let db = pg.url("outage");
    let broker = TestBroker::single(Broker::start(&[("DATABASE_URL", db.as_str())]), db.clone());
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "down", 1);
    let mut peer = Peer::connect(&broker, &members[0]);
    wait_rows(&db, "down", |r| count(r, "connect") == 1);

    pg.stop().expect("stop Postgres");
    let health = || http(broker.addr(), "GET", "/health", &[], b"").status;
    assert!(poll(WAIT, || health() == 503), "/health stayed up");
    // A joined session keeps working; its events wait in the buffer.
    for status in ["working", "idle", "dnd"] {
        peer.send_json(&json!({"type": "set_status", "status": status}));
    }
    peer.send_text("{not json");
    peer.expect_error("bad_json");

    pg.restart().expect("restart Postgres");
    let rows = wait_rows(&db, "down", |r| {
        count(r, "status_change") == 3 && count(r, "rejected") == 1
    });
    let statuses: Vec<&Value> = rows
        .iter()
        .filter(|r| r.event_type == "status_change")
        .map(|r| &r.metadata["status"])
        .collect();
    assert_eq!(statuses, ["working", "idle", "dnd"]);
    assert_eq!(broker.metric("broker_audit_dropped_total"), 0.0);
    // Batches retried across the outage chained once (PROTOCOL.md §13).
    let chain = meshbroker::db::verify_chain_blocking(&db, "down").expect("verify");
    assert!(chain.valid, "{chain:?}");
    assert_eq!(chain.entries, rows.len() as u64);
    drop(peer);
    drop(broker);
    drop(pg);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sigterm_flushes_the_disconnects_it_causes() {
    let mut broker = start(&[]);
    let members = seed_mesh(&broker.db, "stop", 2);
    let mut peers: Vec<Peer> = members.iter().map(|m| Peer::connect(&broker, m)).collect();
    wait_rows(&broker.db, "stop", |r| count(r, "connect") == 2);

    broker.sigterm();
    for peer in &mut peers {
        peer.expect_close(1001);
    }
    let status = broker.broker.wait_exit(WAIT).expect("the broker exits");
    assert_eq!(status.code(), Some(0), "{}", broker.stderr_text());

    let stopped = rows(&broker.db, "stop");
    let reasons: Vec<Option<&str>> = stopped
        .iter()
        .filter(|r| r.event_type == "disconnect")
        .map(|r| r.metadata["reason"].as_str())
        .collect();
    assert_eq!(reasons, vec![Some("shutdown"); 2], "{stopped:#?}");
}
