//! Migrations and the db-writer thread against a real Postgres: an empty
//! database, an existing claudemesh database (the shared fixture), the
//! stash path end to end, shutdown, and an outage in the middle.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{fresh_database, pg};
use meshbroker::db::{
    self, migrate::MIGRATIONS, run_migrations, DbCommand, DbOptions, DbStatus, PendingStatus,
};
use tokio_postgres::{Client, NoTls};

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/claudemesh-existing-schema.sql"
));

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().expect("database in url")
}

async fn client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    client
}

/// (table, column, type as `format_type` prints it, nullable) for every
/// column PROTOCOL.md §8 names, as the fixture declares them.
const SECTION_8_COLUMNS: &[(&str, &str, &str, bool)] = &[
    ("mesh", "id", "text", false),
    ("mesh", "name", "text", false),
    ("mesh", "slug", "text", false),
    ("mesh", "owner_user_id", "text", false),
    ("member", "id", "text", false),
    ("member", "mesh_id", "text", false),
    ("member", "peer_pubkey", "text", false),
    ("member", "display_name", "text", false),
    ("member", "role", "mesh.role", false),
    ("member", "revoked_at", "timestamp without time zone", true),
    (
        "member",
        "last_seen_at",
        "timestamp without time zone",
        true,
    ),
    ("presence", "id", "text", false),
    ("presence", "member_id", "text", false),
    ("presence", "session_id", "text", false),
    ("presence", "pid", "integer", false),
    ("presence", "cwd", "text", false),
    ("presence", "status", "mesh.presence_status", false),
    (
        "presence",
        "status_source",
        "mesh.presence_status_source",
        false,
    ),
    (
        "presence",
        "status_updated_at",
        "timestamp without time zone",
        false,
    ),
    (
        "presence",
        "connected_at",
        "timestamp without time zone",
        false,
    ),
    (
        "presence",
        "last_ping_at",
        "timestamp without time zone",
        false,
    ),
    (
        "presence",
        "disconnected_at",
        "timestamp without time zone",
        true,
    ),
    ("message_queue", "id", "text", false),
    ("message_queue", "mesh_id", "text", false),
    ("message_queue", "sender_member_id", "text", false),
    ("message_queue", "target_spec", "text", false),
    ("message_queue", "priority", "mesh.message_priority", false),
    ("message_queue", "nonce", "text", false),
    ("message_queue", "ciphertext", "text", false),
    (
        "message_queue",
        "created_at",
        "timestamp without time zone",
        false,
    ),
    (
        "message_queue",
        "delivered_at",
        "timestamp without time zone",
        true,
    ),
    (
        "message_queue",
        "expires_at",
        "timestamp without time zone",
        true,
    ),
    ("pending_status", "id", "text", false),
    ("pending_status", "pid", "integer", false),
    ("pending_status", "cwd", "text", false),
    ("pending_status", "status", "text", false),
    ("pending_status", "status_source", "text", false),
    (
        "pending_status",
        "created_at",
        "timestamp without time zone",
        false,
    ),
    (
        "pending_status",
        "applied_at",
        "timestamp without time zone",
        true,
    ),
    ("audit_log", "id", "text", false),
    ("audit_log", "mesh_id", "text", false),
    ("audit_log", "event_type", "text", false),
    ("audit_log", "actor_peer_id", "text", true),
    ("audit_log", "target_peer_id", "text", true),
    ("audit_log", "metadata", "jsonb", false),
    (
        "audit_log",
        "created_at",
        "timestamp without time zone",
        false,
    ),
];

/// The same for `mesh.member_group` (PROTOCOL.md §10).
const SECTION_10_COLUMNS: &[(&str, &str, &str, bool)] = &[
    ("member_group", "member_id", "text", false),
    ("member_group", "name", "text", false),
    ("member_group", "role", "text", true),
    (
        "member_group",
        "joined_at",
        "timestamp without time zone",
        false,
    ),
];

/// The same for what §11 adds to `mesh.message_queue`.
const SECTION_11_COLUMNS: &[(&str, &str, &str, bool)] =
    &[("message_queue", "client_message_id", "text", true)];

const ENUMS: &[(&str, &[&str])] = &[
    ("role", &["admin", "member"]),
    ("tier", &["free", "pro", "team", "enterprise"]),
    ("transport", &["managed", "tailscale", "self_hosted"]),
    ("visibility", &["private", "public"]),
    ("message_priority", &["now", "next", "low"]),
    ("presence_status", &["idle", "working", "dnd"]),
    ("presence_status_source", &["hook", "manual", "jsonl"]),
];

const BROKER_INDEXES: &[&str] = &[
    "member_mesh_id_idx",
    "member_mesh_id_peer_pubkey_idx",
    "presence_open_member_id_idx",
    "message_queue_undelivered_mesh_created_idx",
    "pending_status_unapplied_idx",
    "audit_log_mesh_id_created_at_idx",
    "message_queue_sender_client_message_id_idx",
];

async fn assert_section_8_schema(c: &Client) {
    let columns = SECTION_8_COLUMNS
        .iter()
        .chain(SECTION_10_COLUMNS)
        .chain(SECTION_11_COLUMNS);
    for (table, column, ty, nullable) in columns {
        let rows = c
            .query(
                "SELECT format_type(a.atttypid, a.atttypmod), NOT a.attnotnull
                 FROM pg_attribute a
                 JOIN pg_class t ON t.oid = a.attrelid
                 JOIN pg_namespace n ON n.oid = t.relnamespace
                 WHERE n.nspname = 'mesh' AND t.relname = $1 AND a.attname = $2
                   AND a.attnum > 0 AND NOT a.attisdropped",
                &[table, column],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "mesh.{table}.{column} missing");
        let got_ty: String = rows[0].get(0);
        let got_null: bool = rows[0].get(1);
        assert_eq!(&got_ty, ty, "type of mesh.{table}.{column}");
        assert_eq!(got_null, *nullable, "nullability of mesh.{table}.{column}");
    }
    for (name, labels) in ENUMS {
        let got: Vec<String> = c
            .query(
                "SELECT e.enumlabel::text FROM pg_enum e
                 JOIN pg_type t ON t.oid = e.enumtypid
                 JOIN pg_namespace n ON n.oid = t.typnamespace
                 WHERE n.nspname = 'mesh' AND t.typname = $1
                 ORDER BY e.enumsortorder",
                &[name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(got, *labels, "enum mesh.{name}");
    }
    for table in ["invite", "broker_schema_migrations", "member_group"] {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM information_schema.tables
                 WHERE table_schema = 'mesh' AND table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "mesh.{table}");
    }
    for index in BROKER_INDEXES {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = 'mesh' AND indexname = $1",
                &[index],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "index mesh.{index}");
    }
}

/// Foreign keys from a mesh table to a table outside schema mesh.
async fn foreign_keys_leaving_mesh(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_constraint k
         JOIN pg_class src ON src.oid = k.conrelid
         JOIN pg_namespace sn ON sn.oid = src.relnamespace
         JOIN pg_class dst ON dst.oid = k.confrelid
         JOIN pg_namespace dn ON dn.oid = dst.relnamespace
         WHERE k.contype = 'f' AND sn.nspname = 'mesh' AND dn.nspname <> 'mesh'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn empty_database_gets_the_whole_schema_once() {
    let url = fresh_database();
    let mut c = client(&url).await;
    assert_eq!(run_migrations(&mut c).await.unwrap(), MIGRATIONS.len());
    assert_section_8_schema(&c).await;
    assert_eq!(foreign_keys_leaving_mesh(&c).await, 0);
    let no_public_tables: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(no_public_tables, 0);

    assert_eq!(run_migrations(&mut c).await.unwrap(), 0);
    let recorded: Vec<i32> = c
        .query(
            "SELECT version FROM mesh.broker_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(recorded, expected);

    // The blocking entry point (`meshbroker migrate`) agrees.
    let n = tokio::task::spawn_blocking(move || db::migrate_blocking(&url))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn brokers_migrating_together_do_not_race() {
    let url = fresh_database();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&url).await;
            run_migrations(&mut c).await.unwrap()
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, MIGRATIONS.len());
}

fn stash(id: &str, pid: Option<i32>, cwd: &str, status: &str) -> DbCommand {
    DbCommand::StashPendingStatus(PendingStatus {
        id: id.to_owned(),
        pid,
        cwd: cwd.to_owned(),
        status: status.to_owned(),
        created_at: SystemTime::now(),
    })
}

/// Polls until `mesh.pending_status` has a row with `id` (≤ `within`).
async fn wait_for_pending(c: &Client, id: &str, within: Duration) -> Option<tokio_postgres::Row> {
    let until = Instant::now() + within;
    loop {
        let rows = c
            .query(
                "SELECT pid, cwd, status, status_source, created_at, applied_at
                 FROM mesh.pending_status WHERE id = $1",
                &[&id],
            )
            .await
            .ok()
            .unwrap_or_default();
        if let Some(row) = rows.into_iter().next() {
            return Some(row);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Joins on a helper thread so a hang fails the test instead of blocking it.
fn join_within(thread: db::DbThread, limit: Duration) -> Duration {
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        thread.join();
        let _ = tx.send(());
    });
    rx.recv_timeout(limit)
        .expect("db thread did not stop in time");
    started.elapsed()
}

#[tokio::test]
async fn runs_on_an_existing_claudemesh_database_and_stashes() {
    let url = fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    assert_eq!(run_migrations(&mut c).await.unwrap(), MIGRATIONS.len());
    assert_eq!(run_migrations(&mut c).await.unwrap(), 0);
    assert_section_8_schema(&c).await;
    // The web app's own foreign keys are left as they were.
    assert_eq!(foreign_keys_leaving_mesh(&c).await, 3);

    let status = Arc::new(DbStatus::new());
    let (handle, thread) = db::spawn(url.clone(), status.clone()).unwrap();
    handle
        .try_send(stash("ps-fixture", Some(4242), "/srv/app", "working"))
        .unwrap();
    let row = wait_for_pending(&c, "ps-fixture", Duration::from_secs(5))
        .await
        .expect("stashed row within 5 s");
    assert_eq!(row.get::<_, i32>("pid"), 4242);
    assert_eq!(row.get::<_, &str>("status_source"), "hook");
    assert!(status.is_up());
    drop(handle);
    join_within(thread, Duration::from_secs(3));
}

/// A mesh with two members on the fixture schema (its `user` row too).
const SEED_MESH: &str = "\
INSERT INTO public.\"user\" (id) VALUES ('u-1');
INSERT INTO mesh.mesh (id, name, slug, owner_user_id) VALUES ('mesh-1', 'One', 'one', 'u-1');
INSERT INTO mesh.member (id, mesh_id, user_id, peer_pubkey, display_name)
  VALUES ('m-ada', 'mesh-1', 'u-1', 'aa', 'Ada'), ('m-bob', 'mesh-1', NULL, 'bb', 'Bob');";

/// `mesh.member_group` as a claudemesh web app may already have made it.
const EXISTING_MEMBER_GROUP: &str = "\
CREATE TABLE mesh.member_group (
  member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
  name text NOT NULL,
  role text,
  joined_at timestamp NOT NULL DEFAULT now(),
  PRIMARY KEY (member_id, name)
);
INSERT INTO mesh.member_group (member_id, name, role, joined_at)
  VALUES ('m-ada', 'eng/backend', 'lead', '2025-01-02 03:04:05');";

#[tokio::test]
async fn an_existing_member_group_table_keeps_its_rows() {
    let url = fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    c.batch_execute(SEED_MESH).await.unwrap();
    c.batch_execute(EXISTING_MEMBER_GROUP).await.unwrap();
    assert_eq!(run_migrations(&mut c).await.unwrap(), MIGRATIONS.len());
    assert_section_8_schema(&c).await;
    let rows = c
        .query(
            "SELECT member_id, name, role, joined_at::text FROM mesh.member_group",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, &str>(0), "m-ada");
    assert_eq!(rows[0].get::<_, &str>(1), "eng/backend");
    assert_eq!(rows[0].get::<_, Option<&str>>(2), Some("lead"));
    assert_eq!(rows[0].get::<_, &str>(3), "2025-01-02 03:04:05");

    // The broker reads it: members come with their groups.
    let (handle, thread) = db::spawn(url.clone(), Arc::new(DbStatus::new())).unwrap();
    let answer = handle.lookup_members("mesh-1").expect("lookup queued");
    let mut members = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered in time")
        .unwrap()
        .expect("lookup succeeded");
    members.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(members.len(), 2);
    assert_eq!(members[0].display_name, "Ada");
    assert_eq!(
        members[0].groups,
        [("eng/backend".to_owned(), Some("lead".to_owned()))]
    );
    assert!(members[1].groups.is_empty());

    // And writes it: a rejoin keeps the row's joined_at, a leave deletes.
    let group =
        |member_id: &str, name: &str, role: Option<&str>, joined| DbCommand::GroupMembership {
            member_id: member_id.to_owned(),
            name: name.to_owned(),
            role: role.map(str::to_owned),
            joined,
            at: SystemTime::now(),
        };
    handle
        .try_send(group("m-ada", "eng/backend", Some("chief"), true))
        .unwrap();
    handle.try_send(group("m-bob", "ops", None, true)).unwrap();
    handle.try_send(group("m-bob", "ops", None, false)).unwrap();
    handle.try_send(group("m-bob", "eng", None, true)).unwrap();
    let want = vec![
        (
            "m-ada".to_owned(),
            "eng/backend".to_owned(),
            Some("chief".to_owned()),
            "2025-01-02 03:04:05".to_owned(),
        ),
        ("m-bob".to_owned(), "eng".to_owned(), None, String::new()),
    ];
    let until = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while Instant::now() < until {
        got = c
            .query(
                "SELECT member_id, name, role,
                   CASE WHEN member_id = 'm-ada' THEN joined_at::text ELSE '' END
                 FROM mesh.member_group ORDER BY member_id, name",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect::<Vec<(String, String, Option<String>, String)>>();
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, want);
    drop(handle);
    join_within(thread, Duration::from_secs(3));
}

#[tokio::test]
async fn member_group_rows_go_with_their_member() {
    let url = fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    run_migrations(&mut c).await.unwrap();
    c.batch_execute(SEED_MESH).await.unwrap();
    c.batch_execute(
        "INSERT INTO mesh.member_group (member_id, name) VALUES ('m-ada', 'ops'), ('m-bob', 'ops');
         UPDATE mesh.member SET id = 'm-ada-2' WHERE id = 'm-ada';
         DELETE FROM mesh.member WHERE id = 'm-bob';",
    )
    .await
    .unwrap();
    let rows = c
        .query(
            "SELECT member_id, name, role, joined_at FROM mesh.member_group",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, &str>(0), "m-ada-2");
    assert_eq!(rows[0].get::<_, Option<&str>>(2), None);
    // The default `now()` is UTC: sessions run with TimeZone = 'UTC'.
    let joined: SystemTime = rows[0].get(3);
    let skew = SystemTime::now()
        .duration_since(joined)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "joined_at off by {skew:?}");
    // (member_id, name) is the key.
    let dup = c
        .execute(
            "INSERT INTO mesh.member_group (member_id, name) VALUES ('m-ada-2', 'ops')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        dup.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

/// A held envelope as a broker before migration 0006 wrote it (no
/// `client_message_id`), from Ada to Bob.
const HELD_BEFORE_0006: &str = "\
INSERT INTO mesh.message_queue (id, mesh_id, sender_member_id, target_spec, nonce, ciphertext)
  VALUES ('q-old', 'mesh-1', 'm-ada', 'bb', 'n', 'c');";

/// Migration 0006's index: non-unique, on (sender, id), only over rows with
/// an id; and what the duplicate lookup's query plans with it.
async fn assert_client_message_id_index(c: &mut Client) {
    let row = c
        .query_one(
            "SELECT i.indisunique, x.indexdef
             FROM pg_indexes x
             JOIN pg_class ic ON ic.relname = x.indexname
             JOIN pg_namespace n ON n.oid = ic.relnamespace AND n.nspname = x.schemaname
             JOIN pg_index i ON i.indexrelid = ic.oid
             WHERE x.schemaname = 'mesh'
               AND x.indexname = 'message_queue_sender_client_message_id_idx'",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "the index must not be unique");
    let def: String = row.get(1);
    assert!(
        def.ends_with(
            "ON mesh.message_queue USING btree (sender_member_id, client_message_id) \
             WHERE (client_message_id IS NOT NULL)"
        ),
        "{def}"
    );
    // The lookup a send's (member, client_message_id) makes uses it (seq
    // scans off: the test's table is tiny).
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = tx
        .query(
            "EXPLAIN SELECT id FROM mesh.message_queue
             WHERE sender_member_id = 'm-ada' AND client_message_id = 'c-1'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().await.unwrap();
    assert!(
        plan.iter()
            .any(|l| l.contains("message_queue_sender_client_message_id_idx")),
        "{plan:#?}"
    );
}

#[tokio::test]
async fn client_message_id_is_added_on_an_existing_database_with_its_index() {
    let url = fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    c.batch_execute(SEED_MESH).await.unwrap();
    c.batch_execute(HELD_BEFORE_0006).await.unwrap();
    assert_eq!(run_migrations(&mut c).await.unwrap(), MIGRATIONS.len());
    assert_section_8_schema(&c).await;
    // The row written before keeps its place, with no id.
    let old: Option<String> = c
        .query_one(
            "SELECT client_message_id FROM mesh.message_queue WHERE id = 'q-old'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, None);
    // Idempotent on its own, as every migration file is.
    let file = MIGRATIONS
        .iter()
        .find(|m| m.name == "client_message_id")
        .expect("migration 0006");
    c.batch_execute(file.sql).await.unwrap();
    c.batch_execute(file.sql).await.unwrap();
    assert_client_message_id_index(&mut c).await;
    // Not unique: the window is the broker's rule, so the same pair may be
    // stored again; another sender's same id is another key altogether.
    c.batch_execute(
        "INSERT INTO mesh.message_queue
           (id, mesh_id, sender_member_id, target_spec, nonce, ciphertext, client_message_id)
         VALUES ('q-1', 'mesh-1', 'm-ada', 'bb', 'n', 'c', 'c-1'),
                ('q-2', 'mesh-1', 'm-ada', 'bb', 'n', 'c', 'c-1'),
                ('q-3', 'mesh-1', 'm-bob', 'aa', 'n', 'c', 'c-1')",
    )
    .await
    .unwrap();
    let ada: Vec<String> = c
        .query(
            "SELECT id FROM mesh.message_queue
             WHERE sender_member_id = 'm-ada' AND client_message_id = 'c-1' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ada, ["q-1", "q-2"]);
}

#[tokio::test]
async fn a_client_message_id_column_made_before_keeps_its_values() {
    let url = fresh_database();
    pg().run_sql(db_name(&url), FIXTURE).expect("load fixture");
    let mut c = client(&url).await;
    c.batch_execute(SEED_MESH).await.unwrap();
    c.batch_execute(
        "ALTER TABLE mesh.message_queue ADD COLUMN client_message_id text;
         INSERT INTO mesh.message_queue
           (id, mesh_id, sender_member_id, target_spec, nonce, ciphertext, client_message_id)
         VALUES ('q-web', 'mesh-1', 'm-ada', 'bb', 'n', 'c', 'w-1');",
    )
    .await
    .unwrap();
    assert_eq!(run_migrations(&mut c).await.unwrap(), MIGRATIONS.len());
    assert_section_8_schema(&c).await;
    let kept: Option<String> = c
        .query_one(
            "SELECT client_message_id FROM mesh.message_queue WHERE id = 'q-web'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept.as_deref(), Some("w-1"));
    assert_client_message_id_index(&mut c).await;
}

#[tokio::test]
async fn spawn_stashes_in_batches_and_join_returns_promptly() {
    let url = fresh_database();
    let status = Arc::new(DbStatus::new());
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = batches.clone();
    let options = DbOptions {
        on_batch: Some(Box::new(move |b| seen.lock().unwrap().push(b))),
        ..DbOptions::default()
    };
    let (handle, thread) = db::spawn_with(url.clone(), status.clone(), options).unwrap();
    // Returns at once and works before Postgres is known to be up.
    let before = SystemTime::now();
    handle
        .try_send(stash("ps-1", None, "/home/a/p", "idle"))
        .unwrap();
    let other = handle.clone();
    for i in 0..1000 {
        other
            .try_send(stash(&format!("ps-bulk-{i}"), Some(i), "/bulk", "working"))
            .unwrap();
    }
    drop(other);

    let c = client(&url).await; // migrated by the thread by the time a row shows
    let row = wait_for_pending(&c, "ps-1", Duration::from_secs(5))
        .await
        .expect("stashed row within 5 s");
    // No pid from the hook: stored as 0 (the column is NOT NULL).
    assert_eq!(row.get::<_, i32>("pid"), 0);
    assert_eq!(row.get::<_, &str>("cwd"), "/home/a/p");
    assert_eq!(row.get::<_, &str>("status"), "idle");
    assert_eq!(row.get::<_, &str>("status_source"), "hook");
    assert!(row.get::<_, Option<SystemTime>>("applied_at").is_none());
    // Stored as UTC wall-clock time, read back as the same instant.
    let created: SystemTime = row.get("created_at");
    let skew = created
        .duration_since(before)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(5), "created_at off by {skew:?}");
    assert!(status.is_up());

    drop(handle);
    let took = join_within(thread, Duration::from_secs(3));
    assert!(took < Duration::from_secs(2), "join took {took:?}");
    // Everything was flushed before the thread returned.
    let n: i64 = c
        .query_one("SELECT count(*) FROM mesh.pending_status", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1001);
    let batches = batches.lock().unwrap();
    assert_eq!(batches.iter().map(|b| b.commands).sum::<usize>(), 1001);
    assert!(batches.iter().all(|b| b.commands <= db::BATCH_MAX));
    assert!(
        batches.len() < 100,
        "{} batches for 1001 rows",
        batches.len()
    );
    assert_eq!(status.writes_dropped(), 0);
}

#[test]
fn unreachable_postgres_never_blocks_and_shutdown_is_bounded() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/nothing");
    let status = Arc::new(DbStatus::new());
    let options = DbOptions {
        max_buffered: 3,
        shutdown_flush: Duration::from_millis(600),
        ..DbOptions::default()
    };
    let started = Instant::now();
    let (handle, thread) = db::spawn_with(url, status.clone(), options).unwrap();
    assert!(started.elapsed() < Duration::from_millis(200));
    for i in 0..5 {
        handle
            .try_send(stash(&format!("x{i}"), Some(i), "/x", "idle"))
            .unwrap();
    }
    // Over the bound of 3: the two oldest go.
    let until = Instant::now() + Duration::from_secs(2);
    while status.writes_dropped() < 2 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(status.writes_dropped(), 2);
    assert_eq!(status.buffered(), 3);
    assert!(!status.is_up());
    drop(handle);
    let took = join_within(thread, Duration::from_secs(3));
    assert!(
        took >= Duration::from_millis(500),
        "gave up too early: {took:?}"
    );
    // What was still buffered is counted as lost.
    assert_eq!(status.writes_dropped(), 5);
}

#[test]
fn bad_url_is_refused_at_spawn() {
    let err = db::spawn("mysql://x".into(), Arc::new(DbStatus::new())).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(db::migrate_blocking("not a url at all").is_err());
}

#[tokio::test]
async fn survives_a_postgres_restart_and_writes_what_it_held() {
    // A private cluster: this test stops it.
    let root = common::world_traversable_tempdir("meshbroker-test-db-restart-");
    let own = meshbroker::devdb::LocalPostgres::start(&root.join("data"), true).unwrap();
    let url = own.url(meshbroker::devdb::DEFAULT_DATABASE);
    let status = Arc::new(DbStatus::new());
    let (handle, thread) = db::spawn(url.clone(), status.clone()).unwrap();
    let up = |want: bool, within: Duration| {
        let status = status.clone();
        async move {
            let until = Instant::now() + within;
            while status.is_up() != want && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            status.is_up() == want
        }
    };
    assert!(up(true, Duration::from_secs(5)).await, "never came up");

    own.stop().unwrap();
    // Noticed by the connection ending or by the next ping (every 2 s).
    assert!(up(false, Duration::from_secs(5)).await, "never noticed");
    handle
        .try_send(stash("held-1", Some(7), "/w", "working"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    own.restart().unwrap();
    // Reconnect backoff is at most 5 s.
    assert!(up(true, Duration::from_secs(8)).await, "never reconnected");
    let c = client(&url).await;
    let row = wait_for_pending(&c, "held-1", Duration::from_secs(5)).await;
    assert!(row.is_some(), "held stash not written after reconnect");
    assert_eq!(status.writes_dropped(), 0);
    drop(handle);
    join_within(thread, Duration::from_secs(3));
    drop(own);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn a_command_the_server_refuses_is_dropped_not_retried_forever() {
    let url = fresh_database();
    let status = Arc::new(DbStatus::new());
    let (handle, thread) = db::spawn(url.clone(), status.clone()).unwrap();
    // Postgres text cannot hold NUL: the server refuses the whole batch.
    handle
        .try_send(stash("good-1", Some(1), "/a", "idle"))
        .unwrap();
    handle
        .try_send(stash("poison", Some(2), "/a\0b", "idle"))
        .unwrap();
    handle
        .try_send(stash("good-2", Some(3), "/a", "idle"))
        .unwrap();
    let c = loop {
        if status.is_up() {
            break client(&url).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for id in ["good-1", "good-2"] {
        assert!(
            wait_for_pending(&c, id, Duration::from_secs(5))
                .await
                .is_some(),
            "{id} not written"
        );
    }
    let until = Instant::now() + Duration::from_secs(2);
    while status.writes_dropped() == 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status.writes_dropped(), 1);
    assert!(status.is_up(), "a refused command is not an outage");
    // Later commands still flow.
    handle.try_send(stash("good-3", None, "/a", "dnd")).unwrap();
    assert!(wait_for_pending(&c, "good-3", Duration::from_secs(5))
        .await
        .is_some());
    drop(handle);
    join_within(thread, Duration::from_secs(3));
}
