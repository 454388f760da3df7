//! The audit chain (PROTOCOL.md §13) against a real Postgres and running
//! brokers: migration 0007 on an existing claudemesh database, the rows a
//! broker writes forming one valid chain per mesh whose hashes this file
//! recomputes on its own from the contract's formula, a row changed by SQL
//! found (by `verify_chain` and by `meshbroker audit verify`), rows from
//! before the chain skipped and counted, a restart continuing the chain,
//! and two brokers sharing one database without forking it.
mod common;
mod support;

use std::time::Duration;

use common::{exec_sql, fresh_database, pg, query_rows, run_broker_capture, Broker};
use meshbroker::db::chain::ChainReport;
use meshbroker::db::{migrate::MIGRATIONS, verify_chain_blocking};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/claudemesh-existing-schema.sql"
));

/// One chained (or not) row as stored, `created_at` printed by Postgres.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    mesh_id: String,
    event_type: String,
    actor: Option<String>,
    target: Option<String>,
    metadata: String,
    /// `to_char(created_at)`: RFC 3339 UTC, milliseconds (truncated).
    created_at: String,
    prev_hash: Option<String>,
    hash: Option<String>,
}

/// A mesh's rows in chain order (`created_at`, then `id` bytewise).
fn chain_rows(db: &str, mesh_id: &str) -> Vec<Row> {
    query_rows(
        db,
        &format!(
            "SELECT id, mesh_id, event_type, actor_peer_id, target_peer_id, metadata::text,
               to_char(created_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), prev_hash, hash
             FROM mesh.audit_log WHERE mesh_id = '{mesh_id}'
             ORDER BY created_at, id COLLATE \"C\""
        ),
    )
    .iter()
    .map(|r| Row {
        id: r.get(0),
        mesh_id: r.get(1),
        event_type: r.get(2),
        actor: r.get(3),
        target: r.get(4),
        metadata: r.get(5),
        created_at: r.get(6),
        prev_hash: r.get(7),
        hash: r.get(8),
    })
    .collect()
}

/// The contract's formula, written here from PROTOCOL.md §13 alone:
/// lowercase hex SHA-256 of
/// `prev_hash|mesh_id|event_type|actor|target|canonical metadata|created_at`,
/// absent values empty. serde_json's map is ordered by key, and its compact
/// writer adds no whitespace: that is the canonical JSON.
fn contract_hash(row: &Row, prev_hash: &str) -> String {
    let metadata: Value = serde_json::from_str(&row.metadata).expect("metadata is JSON");
    let text = [
        prev_hash,
        &row.mesh_id,
        &row.event_type,
        row.actor.as_deref().unwrap_or(""),
        row.target.as_deref().unwrap_or(""),
        &serde_json::to_string(&metadata).unwrap(),
        &row.created_at,
    ]
    .join("|");
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks the chained rows link up from `genesis` and each hash is the
/// formula's; returns how many it checked.
fn assert_contract_chain(rows: &[Row]) -> usize {
    let mut prev = "genesis".to_owned();
    let mut checked = 0;
    for row in rows.iter().filter(|r| r.hash.is_some()) {
        assert_eq!(row.prev_hash.as_deref(), Some(prev.as_str()), "{row:#?}");
        let hash = row.hash.clone().unwrap();
        assert_eq!(hash, contract_hash(row, &prev), "{row:#?}");
        assert_eq!(hash.len(), 64);
        assert!(hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        prev = hash;
        checked += 1;
    }
    checked
}

fn count(rows: &[Row], event_type: &str) -> usize {
    rows.iter().filter(|r| r.event_type == event_type).count()
}

/// Polls until `done` holds for the mesh's rows; returns them.
fn wait_rows(db: &str, mesh_id: &str, done: impl Fn(&[Row]) -> bool) -> Vec<Row> {
    let mut last = Vec::new();
    let ok = poll(WAIT, || {
        last = chain_rows(db, mesh_id);
        done(&last)
    });
    assert!(ok, "audit rows of {mesh_id} never complete: {last:#?}");
    last
}

fn verify(db: &str, mesh_id: &str) -> ChainReport {
    verify_chain_blocking(db, mesh_id).expect("verify the chain")
}

fn report(entries: u64, unchained: u64, broken_at: Option<&str>) -> ChainReport {
    ChainReport {
        valid: broken_at.is_none(),
        entries,
        unchained,
        broken_at: broken_at.map(str::to_owned),
    }
}

/// `meshbroker audit verify --mesh ID`: exit code and its one JSON line.
fn verify_command(db: &str, mesh_id: &str) -> (Option<i32>, Value, String) {
    let (status, out, err) = run_broker_capture(
        &["audit", "verify", "--mesh", mesh_id],
        &[("DATABASE_URL", db)],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "stdout: {out:?}, stderr: {err}");
    let line = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{out:?}: {e}"));
    (status.code(), line, err)
}

/// A session that says hello, changes its status a few times, sends an
/// unparsable frame and leaves: a handful of rows of several types.
fn session(broker: &Broker, member: &Member, statuses: &[&str]) {
    let mut peer = Peer::connect(broker, member);
    for status in statuses {
        peer.send_json(&json!({"type": "set_status", "status": status}));
    }
    peer.send_text("{not json");
    peer.expect_error("bad_json");
    peer.close();
}

#[test]
fn migration_0007_adds_nullable_chain_columns_on_an_existing_database() {
    let url = fresh_database();
    let name = url.rsplit('/').next().unwrap();
    pg().run_sql(name, FIXTURE).expect("load the fixture");
    exec_sql(
        &url,
        "INSERT INTO public.\"user\" (id) VALUES ('u-1');
         INSERT INTO mesh.mesh (id, name, slug, owner_user_id) VALUES ('mesh-1', 'One', 'one', 'u-1');
         INSERT INTO mesh.audit_log (id, mesh_id, event_type, metadata)
           VALUES ('old-1', 'mesh-1', 'connect', '{\"pid\": 1}');",
    );
    assert_eq!(
        meshbroker::db::migrate_blocking(&url).unwrap(),
        MIGRATIONS.len()
    );
    let file = MIGRATIONS
        .iter()
        .find(|m| m.name == "audit_chain")
        .expect("migration 0007");
    assert_eq!(file.version, 7);
    // Idempotent on its own, as every migration file is.
    exec_sql(&url, file.sql);
    exec_sql(&url, file.sql);
    for column in ["prev_hash", "hash"] {
        let rows = query_rows(
            &url,
            &format!(
                "SELECT data_type, is_nullable, column_default FROM information_schema.columns
                 WHERE table_schema = 'mesh' AND table_name = 'audit_log'
                   AND column_name = '{column}'"
            ),
        );
        assert_eq!(rows.len(), 1, "mesh.audit_log.{column}");
        assert_eq!(rows[0].get::<_, &str>(0), "text");
        assert_eq!(rows[0].get::<_, &str>(1), "YES");
        assert_eq!(rows[0].get::<_, Option<&str>>(2), None);
    }
    // The old row stays, unchained: skipped and counted.
    let old = chain_rows(&url, "mesh-1");
    assert_eq!(
        (old[0].prev_hash.as_deref(), old[0].hash.as_deref()),
        (None, None)
    );
    assert_eq!(verify(&url, "mesh-1"), report(0, 1, None));
    assert_eq!(verify(&url, "no-such-mesh"), report(0, 0, None));
}

#[test]
fn a_running_broker_writes_one_valid_chain_per_mesh_with_the_contract_hashes() {
    // One shard writes a batch of its own per mesh, the other shard's
    // events interleave: the chain must hold across both.
    let broker = start(&[("AUDIT_BATCH_MAX_ROWS", "3")]);
    let one = seed_mesh(&broker.db, "chain-one", 2);
    let two = seed_mesh(&broker.db, "chain-two", 1);
    session(&broker, &one[0], &["working", "dnd", "idle"]);
    session(&broker, &two[0], &["working"]);
    session(&broker, &one[1], &["dnd", "working"]);

    let rows = wait_rows(&broker.db, "chain-one", |r| count(r, "disconnect") == 2);
    assert!(rows
        .iter()
        .all(|r| r.hash.is_some() && r.prev_hash.is_some()));
    assert_eq!(assert_contract_chain(&rows), rows.len());
    assert!(rows.len() >= 10, "{rows:#?}");
    assert_eq!(
        verify(&broker.db, "chain-one"),
        report(rows.len() as u64, 0, None)
    );

    // Each mesh is a chain of its own, from genesis.
    let other = wait_rows(&broker.db, "chain-two", |r| count(r, "disconnect") == 1);
    assert_eq!(other[0].prev_hash.as_deref(), Some("genesis"));
    assert_eq!(assert_contract_chain(&other), other.len());
    assert_eq!(
        verify(&broker.db, "chain-two"),
        report(other.len() as u64, 0, None)
    );

    // Chain order is the order a session's events happened in.
    let types: Vec<&str> = rows
        .iter()
        .filter(|r| r.actor.as_deref() == Some(&one[0].id))
        .map(|r| r.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "connect",
            "status_change",
            "status_change",
            "status_change",
            "rejected",
            "disconnect"
        ]
    );

    let (code, line, err) = verify_command(&broker.db, "chain-one");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        line,
        json!({"mesh": "chain-one", "valid": true, "entries": rows.len(),
               "unchained": 0, "brokenAt": null})
    );
}

#[test]
fn a_row_changed_by_sql_breaks_the_chain_at_that_row() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "tamper", 1);
    session(&broker, &members[0], &["working", "idle"]);
    let rows = wait_rows(&broker.db, "tamper", |r| count(r, "disconnect") == 1);
    let n = rows.len() as u64;
    assert_eq!(verify(&broker.db, "tamper"), report(n, 0, None));
    let victim = rows[2].id.clone();

    // Metadata rewritten: broken at that row, named by the subcommand.
    exec_sql(
        &broker.db,
        &format!(
            "UPDATE mesh.audit_log SET metadata = metadata || '{{\"status\": \"dnd\"}}'
             WHERE id = '{victim}'"
        ),
    );
    assert_eq!(verify(&broker.db, "tamper"), report(n, 0, Some(&victim)));
    let (code, line, err) = verify_command(&broker.db, "tamper");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(
        line,
        json!({"mesh": "tamper", "valid": false, "entries": n, "unchained": 0,
               "brokenAt": victim})
    );

    // Put back, it verifies again; then other columns, one at a time.
    exec_sql(
        &broker.db,
        &format!(
            "UPDATE mesh.audit_log SET metadata = '{}'::jsonb WHERE id = '{victim}'",
            rows[2].metadata
        ),
    );
    assert_eq!(verify(&broker.db, "tamper"), report(n, 0, None));
    let r = &rows[2];
    let changes = [
        (
            "actor_peer_id = 'someone-else'".to_owned(),
            format!("actor_peer_id = '{}'", r.actor.as_deref().unwrap()),
        ),
        (
            "event_type = 'send'".to_owned(),
            format!("event_type = '{}'", r.event_type),
        ),
        // Moved first in chain order: it no longer links to genesis.
        (
            "created_at = created_at - interval '1 hour'".to_owned(),
            "created_at = created_at + interval '1 hour'".to_owned(),
        ),
        (
            "hash = md5(hash) || md5(hash)".to_owned(),
            format!("hash = '{}'", r.hash.as_deref().unwrap()),
        ),
        (
            "prev_hash = NULL".to_owned(),
            format!("prev_hash = '{}'", r.prev_hash.as_deref().unwrap()),
        ),
    ];
    for (change, undo) in changes {
        let update = |set: &str| {
            exec_sql(
                &broker.db,
                &format!("UPDATE mesh.audit_log SET {set} WHERE id = '{victim}'"),
            )
        };
        update(&change);
        assert_eq!(
            verify(&broker.db, "tamper").broken_at.as_deref(),
            Some(victim.as_str()),
            "{change}"
        );
        update(&undo);
        assert_eq!(verify(&broker.db, "tamper"), report(n, 0, None), "{undo}");
    }

    // A row removed: broken at the next one.
    let next = rows[3].id.clone();
    exec_sql(
        &broker.db,
        &format!("DELETE FROM mesh.audit_log WHERE id = '{victim}'"),
    );
    assert_eq!(verify(&broker.db, "tamper"), report(n - 1, 0, Some(&next)));
    let (code, line, _) = verify_command(&broker.db, "tamper");
    assert_eq!((code, &line["brokenAt"]), (Some(1), &json!(next)));
}

#[test]
fn rows_from_before_the_chain_are_skipped_and_counted() {
    // An existing claudemesh database whose old broker wrote rows.
    let db = fresh_database();
    let name = db.rsplit('/').next().unwrap();
    pg().run_sql(name, FIXTURE).expect("load the fixture");
    exec_sql(
        &db,
        "INSERT INTO public.\"user\" (id) VALUES ('owner-legacy')",
    );
    let members = seed_mesh(&db, "legacy", 1);
    let member = &members[0].id;
    exec_sql(
        &db,
        &format!(
            "INSERT INTO mesh.audit_log (id, mesh_id, event_type, actor_peer_id, metadata, created_at)
             VALUES ('old-1', 'legacy', 'connect', '{member}', '{{\"pid\": 7}}',
                     now() - interval '2 days'),
                    ('old-2', 'legacy', 'disconnect', '{member}', '{{}}',
                     now() - interval '1 day')"
        ),
    );
    let broker = Broker::start(&[("DATABASE_URL", db.as_str())]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    session(&broker, &members[0], &["working"]);
    let rows = wait_rows(&db, "legacy", |r| count(r, "disconnect") == 2);
    assert_eq!(rows[0].id, "old-1");
    assert_eq!(rows[1].id, "old-2");
    assert!(rows[..2]
        .iter()
        .all(|r| r.hash.is_none() && r.prev_hash.is_none()));
    // The first chained row starts from genesis, after the old ones.
    assert_eq!(rows[2].prev_hash.as_deref(), Some("genesis"));
    let chained = assert_contract_chain(&rows) as u64;
    assert_eq!(chained, rows.len() as u64 - 2);
    assert_eq!(verify(&db, "legacy"), report(chained, 2, None));
    let (code, line, err) = verify_command(&db, "legacy");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        (&line["entries"], &line["unchained"]),
        (&json!(chained), &json!(2))
    );
}

#[test]
fn a_restart_continues_the_chain() {
    let db = fresh_database();
    let env = [("DATABASE_URL", db.as_str())];
    let mut first = Broker::start(&env);
    first.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "again", 1);
    session(&first, &members[0], &["working"]);
    let before = wait_rows(&db, "again", |r| count(r, "disconnect") == 1);
    first.sigterm();
    let status = first.wait_exit(WAIT).expect("the broker exits");
    assert_eq!(status.code(), Some(0), "{}", first.stderr_text());
    let last = before.last().unwrap().hash.clone().unwrap();

    let second = Broker::start(&env);
    second.wait_for_log("db healthy", Duration::from_secs(30));
    session(&second, &members[0], &["dnd"]);
    let after = wait_rows(&db, "again", |r| count(r, "disconnect") == 2);
    let first_new = &after[before.len()];
    assert_eq!(first_new.event_type, "connect");
    assert_eq!(first_new.prev_hash.as_deref(), Some(last.as_str()));
    assert_eq!(assert_contract_chain(&after), after.len());
    assert_eq!(verify(&db, "again"), report(after.len() as u64, 0, None));
}

#[test]
fn two_brokers_sharing_a_database_do_not_fork_a_chain() {
    let db = fresh_database();
    let env = [("DATABASE_URL", db.as_str()), ("AUDIT_BATCH_MAX_ROWS", "4")];
    let a = Broker::start(&env);
    let b = Broker::start(&env);
    a.wait_for_log("db healthy", Duration::from_secs(30));
    b.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "shared", 2);
    let statuses: Vec<&str> = ["working", "idle", "dnd"]
        .iter()
        .cycle()
        .take(60)
        .copied()
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| session(&a, &members[0], &statuses));
        s.spawn(|| session(&b, &members[1], &statuses));
    });
    let rows = wait_rows(&db, "shared", |r| count(r, "disconnect") == 2);
    // Both brokers' rows are there, one chain: every prev_hash once.
    assert!(rows.len() >= 120, "{} rows", rows.len());
    let mut prevs: Vec<&str> = rows.iter().filter_map(|r| r.prev_hash.as_deref()).collect();
    prevs.sort_unstable();
    prevs.dedup();
    assert_eq!(
        prevs.len(),
        rows.len(),
        "a prev_hash is shared: the chain forked"
    );
    assert_eq!(assert_contract_chain(&rows), rows.len());
    assert_eq!(verify(&db, "shared"), report(rows.len() as u64, 0, None));
}

#[test]
fn the_subcommand_wants_a_mesh_and_a_database() {
    let (status, out, err) = run_broker_capture(&["audit", "verify"], &[]);
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(err.contains("audit verify --mesh ID"), "{err}");
    let (status, out, err) = run_broker_capture(&["audit", "verify", "--mesh", "x"], &[]);
    // The harness's default DATABASE_URL points at nothing.
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
}
