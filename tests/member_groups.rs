//! Group membership in Postgres (PROTOCOL.md §10) through the db thread:
//! members are loaded with their display name and `mesh.member_group`
//! rows, and `DbCommand::GroupMembership` batches upsert and delete them.
//! Real Postgres (one throwaway cluster per test process).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::fresh_database;
use meshbroker::db::{self, run_migrations, DbCommand, DbHandle, DbOptions, DbStatus, DbThread};
use meshbroker::mesh::directory::MemberRow;
use tokio_postgres::{Client, NoTls};

async fn client(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    client
}

/// A migrated fresh database with `seed` run on it, and a client.
async fn seeded(seed: &str) -> (String, Client) {
    let url = fresh_database();
    let mut c = client(&url).await;
    run_migrations(&mut c).await.unwrap();
    c.batch_execute(seed).await.unwrap();
    (url, c)
}

/// Two meshes; Ada has groups whose names sort differently by byte and by
/// most locales, Bob none, Cy is revoked, Dee is in the other mesh.
const MESHES: &str = "\
INSERT INTO mesh.mesh (id, name, slug, owner_user_id)
  VALUES ('mesh-1', 'One', 'one', 'u'), ('mesh-2', 'Two', 'two', 'u');
INSERT INTO mesh.member (id, mesh_id, peer_pubkey, display_name, revoked_at) VALUES
  ('m-ada', 'mesh-1', 'aa', 'Ada Lovelace', NULL),
  ('m-bob', 'mesh-1', 'bb', 'Bob', NULL),
  ('m-cy', 'mesh-1', 'cc', 'Cy', now()),
  ('m-dee', 'mesh-2', 'dd', 'Dee', NULL);
INSERT INTO mesh.member_group (member_id, name, role) VALUES
  ('m-ada', 'eng_b', NULL),
  ('m-ada', 'eng/backend', 'lead'),
  ('m-ada', 'eng', 'member'),
  ('m-ada', 'eng.a', ''),
  ('m-ada', 'eng-x', NULL),
  ('m-cy', 'ops', 'oncall'),
  ('m-dee', 'eng', 'lead');";

async fn lookup(handle: &DbHandle, mesh_id: &str) -> Vec<MemberRow> {
    let answer = handle.lookup_members(mesh_id).expect("lookup queued");
    let mut rows = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered in time")
        .expect("loader alive")
        .expect("lookup succeeded");
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

fn group(name: &str, role: Option<&str>) -> (String, Option<String>) {
    (name.to_owned(), role.map(str::to_owned))
}

#[tokio::test]
async fn members_come_with_display_name_and_groups_by_name() {
    let (url, _c) = seeded(MESHES).await;
    let (handle, thread) = db::spawn(url, Arc::new(DbStatus::new())).unwrap();

    let rows = lookup(&handle, "mesh-1").await;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["m-ada", "m-bob", "m-cy"]);
    let ada = &rows[0];
    assert_eq!(ada.display_name, "Ada Lovelace");
    assert_eq!(ada.peer_pubkey, "aa");
    assert!(!ada.revoked);
    // Byte order: '-' < '.' < '/' < '_'; NULL and '' roles kept apart.
    assert_eq!(
        ada.groups,
        [
            group("eng", Some("member")),
            group("eng-x", None),
            group("eng.a", Some("")),
            group("eng/backend", Some("lead")),
            group("eng_b", None),
        ]
    );
    assert_eq!(rows[1].display_name, "Bob");
    assert!(rows[1].groups.is_empty());
    assert!(rows[2].revoked);
    assert_eq!(rows[2].groups, [group("ops", Some("oncall"))]);

    let other = lookup(&handle, "mesh-2").await;
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].groups, [group("eng", Some("lead"))]);
    assert!(lookup(&handle, "no-such-mesh").await.is_empty());

    drop(handle);
    thread.join();
}

/// Ada and Bob in one mesh; Ada is already in `ops` since 2025.
const TWO_MEMBERS: &str = "\
INSERT INTO mesh.mesh (id, name, slug, owner_user_id) VALUES ('mesh-1', 'One', 'one', 'u');
INSERT INTO mesh.member (id, mesh_id, peer_pubkey, display_name) VALUES
  ('m-ada', 'mesh-1', 'aa', 'Ada'), ('m-bob', 'mesh-1', 'bb', 'Bob');
INSERT INTO mesh.member_group (member_id, name, role, joined_at)
  VALUES ('m-ada', 'ops', 'old', '2025-01-01 00:00:00');";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_200_000 + secs)
}

fn join(member_id: &str, name: &str, role: Option<&str>, t: u64) -> DbCommand {
    DbCommand::GroupMembership {
        member_id: member_id.to_owned(),
        name: name.to_owned(),
        role: role.map(str::to_owned),
        joined: true,
        at: at(t),
    }
}

fn leave(member_id: &str, name: &str, t: u64) -> DbCommand {
    DbCommand::GroupMembership {
        member_id: member_id.to_owned(),
        name: name.to_owned(),
        role: None,
        joined: false,
        at: at(t),
    }
}

/// The writer, with the size of every batch it committed.
struct Writer {
    handle: DbHandle,
    thread: DbThread,
    status: Arc<DbStatus>,
    batches: Arc<Mutex<Vec<usize>>>,
}

impl Writer {
    fn spawn(url: &str) -> Writer {
        let status = Arc::new(DbStatus::new());
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let options = DbOptions {
            on_batch: Some(Box::new(move |b| seen.lock().unwrap().push(b.commands))),
            ..DbOptions::default()
        };
        let (handle, thread) = db::spawn_with(url.to_owned(), status.clone(), options).unwrap();
        Writer {
            handle,
            thread,
            status,
            batches,
        }
    }

    fn send(&self, cmds: Vec<DbCommand>) {
        for cmd in cmds {
            self.handle.try_send(cmd).unwrap();
        }
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    fn stop(self) {
        drop(self.handle);
        self.thread.join();
    }
}

/// `(member_id, name, role, joined_at)` of every row, in key order.
type GroupRow = (String, String, Option<String>, SystemTime);

async fn group_rows(c: &Client) -> Vec<GroupRow> {
    c.query(
        "SELECT member_id, name, role, joined_at FROM mesh.member_group
         ORDER BY member_id COLLATE \"C\", name COLLATE \"C\"",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Polls until the table holds `want` (≤ 10 s); returns what it holds.
async fn wait_for_rows(c: &Client, want: &[GroupRow]) -> Vec<GroupRow> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = group_rows(c).await;
        if rows == want || Instant::now() >= until {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn row(member_id: &str, name: &str, role: Option<&str>, joined_at: SystemTime) -> GroupRow {
    (
        member_id.to_owned(),
        name.to_owned(),
        role.map(str::to_owned),
        joined_at,
    )
}

fn since_2025() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600)
}

#[tokio::test]
async fn a_batch_of_group_changes_ends_as_the_last_command_per_group_says() {
    let (url, c) = seeded(TWO_MEMBERS).await;
    let writer = Writer::spawn(&url);
    // Queued before the writer has connected: one batch.
    writer.send(vec![
        join("m-ada", "eng", Some("member"), 1),
        leave("m-ada", "eng", 2),
        join("m-ada", "eng", Some("lead"), 3),
        join("m-bob", "eng", None, 4),
        leave("m-bob", "eng", 5),
        join("m-ada", "ops", Some("new"), 6),
        join("m-ada", "design", None, 7),
        leave("m-bob", "never-joined", 8),
    ]);
    let want = vec![
        row("m-ada", "design", None, at(7)),
        row("m-ada", "eng", Some("lead"), at(3)),
        // A join of a group it is in: the new role, the first join's time.
        row("m-ada", "ops", Some("new"), since_2025()),
    ];
    assert_eq!(wait_for_rows(&c, &want).await, want);
    // Written as one batch, not retried command by command.
    assert_eq!(writer.batches(), [8]);
    assert_eq!(writer.status.writes_dropped(), 0);

    // Later batches: a leave, a role cleared, a rejoin after leaving.
    writer.send(vec![
        leave("m-ada", "design", 10),
        join("m-ada", "ops", None, 11),
        join("m-bob", "eng", Some("x"), 12),
    ]);
    let want = vec![
        row("m-ada", "eng", Some("lead"), at(3)),
        row("m-ada", "ops", None, since_2025()),
        row("m-bob", "eng", Some("x"), at(12)),
    ];
    assert_eq!(wait_for_rows(&c, &want).await, want);
    // And the member lookup sees them.
    let rows = lookup(&writer.handle, "mesh-1").await;
    assert_eq!(
        rows[0].groups,
        [group("eng", Some("lead")), group("ops", None)]
    );
    assert_eq!(rows[1].groups, [group("eng", Some("x"))]);
    assert_eq!(writer.status.writes_dropped(), 0);
    writer.stop();
}

#[tokio::test]
async fn a_join_for_a_member_that_is_gone_is_skipped_and_the_batch_written() {
    let (url, c) = seeded(TWO_MEMBERS).await;
    let writer = Writer::spawn(&url);
    writer.send(vec![
        join("m-ghost", "eng", None, 1),
        join("m-bob", "eng", None, 2),
        leave("m-ghost", "ops", 3),
    ]);
    let want = vec![
        row("m-ada", "ops", Some("old"), since_2025()),
        row("m-bob", "eng", None, at(2)),
    ];
    assert_eq!(wait_for_rows(&c, &want).await, want);
    assert_eq!(writer.batches(), [3]);
    assert_eq!(writer.status.writes_dropped(), 0);
    assert!(writer.status.is_up());
    writer.stop();
}

/// A member deleted while its join is being written (after the join's
/// existence check, before its foreign key check): the server refuses the
/// batch, the writer retries it one command at a time, and that retry
/// skips the join. Nothing wedges and nothing else is lost.
#[tokio::test]
async fn a_member_deleted_under_a_batch_costs_a_retry_not_the_batch() {
    let (url, c) = seeded(TWO_MEMBERS).await;
    // Another session deletes Bob and keeps its transaction open: the
    // writer's foreign key check on Bob's row will wait for it.
    let mut deleter = client(&url).await;
    let tx = deleter.transaction().await.unwrap();
    tx.execute("DELETE FROM mesh.member WHERE id = 'm-bob'", &[])
        .await
        .unwrap();
    // Queued before the writer has connected: one batch.
    let writer = Writer::spawn(&url);
    writer.send(vec![
        join("m-bob", "eng", None, 1),
        join("m-ada", "eng", Some("lead"), 2),
    ]);
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO mesh.member_group%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the writer never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.commit().await.unwrap();

    let want = vec![
        row("m-ada", "eng", Some("lead"), at(2)),
        row("m-ada", "ops", Some("old"), since_2025()),
    ];
    assert_eq!(wait_for_rows(&c, &want).await, want);
    // The batch of two was refused (23503) and written one by one; the
    // skipped join is not a refusal, so nothing counts as dropped.
    let until = Instant::now() + Duration::from_secs(5);
    while writer.batches().len() < 2 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(writer.batches(), [1, 1]);
    assert_eq!(writer.status.writes_dropped(), 0);
    assert!(writer.status.is_up());
    // Later commands still flow.
    writer.send(vec![leave("m-ada", "ops", 3)]);
    let want = vec![row("m-ada", "eng", Some("lead"), at(2))];
    assert_eq!(wait_for_rows(&c, &want).await, want);
    writer.stop();
}
