//! Group membership in Postgres (PROTOCOL.md §10) through the db thread:
//! members are loaded with their display name and `mesh.member_group`
//! rows, and `DbCommand::GroupMembership` batches upsert and delete them.
//! Real Postgres (one throwaway cluster per test process).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fresh_database;
use meshbroker::db::{self, run_migrations, DbHandle, DbStatus};
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
