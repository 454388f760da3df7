//! The embedded Postgres and the shared test harness: the per-process
//! cluster, fresh databases, fixtures, and stop/restart under a client.

mod common;

use std::time::Instant;

use meshbroker::devdb::LocalPostgres;

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/claudemesh-existing-schema.sql"
));

fn columns(url: &str, schema: &str, table: &str) -> Vec<String> {
    common::query_rows(
        url,
        &format!(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = '{schema}' AND table_name = '{table}' ORDER BY ordinal_position"
        ),
    )
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

#[test]
fn shared_cluster_fresh_databases_and_fixture() {
    let pg = common::pg();
    // One cluster per process: the same instance every time.
    assert!(std::ptr::eq(pg, common::pg()));

    let a = common::fresh_database();
    let b = common::fresh_database();
    assert_ne!(a, b);
    assert!(a.starts_with(&format!(
        "postgres://postgres@127.0.0.1:{}/test_",
        pg.port()
    )));

    let name_a = a.rsplit('/').next().unwrap();
    pg.run_sql(name_a, FIXTURE)
        .expect("load the claudemesh fixture");

    let cols = columns(&a, "mesh", "member");
    for want in [
        "id",
        "mesh_id",
        "peer_pubkey",
        "display_name",
        "role",
        "revoked_at",
        "last_seen_at",
    ] {
        assert!(
            cols.iter().any(|c| c == want),
            "{want} missing from {cols:?}"
        );
    }
    // The other database is untouched.
    assert!(columns(&b, "mesh", "member").is_empty());
    // The broker's own database exists in every cluster.
    assert!(common::can_connect(&pg.url("meshbroker")));

    // run_sql stops at the first error and reports it.
    let err = pg
        .run_sql(name_a, "SELECT 1; SELECT * FROM no_such_table; SELECT 2;")
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");

    // Creating an existing database surfaces the server's error.
    let err = pg.create_database(name_a).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // The helpers agree with each other.
    common::exec_sql(&b, "CREATE TABLE t (x int); INSERT INTO t VALUES (41), (1)");
    let rows = common::query_rows(&b, "SELECT sum(x)::int FROM t");
    assert_eq!(rows[0].get::<_, i32>(0), 42);
}

#[test]
fn stop_restart_and_reuse_of_a_data_dir() {
    let root = common::world_traversable_tempdir("meshbroker-devdb-test-");
    let data = root.join("data");

    let t = Instant::now();
    let pg = LocalPostgres::start(&data, true).expect("start");
    eprintln!("initdb + start took {:?}", t.elapsed());
    let url = pg.url("meshbroker");
    let port = pg.port();
    assert!(common::can_connect(&url));
    pg.run_sql(
        "meshbroker",
        "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')",
    )
    .unwrap();

    pg.stop().unwrap();
    assert!(!common::can_connect(&url), "connected while stopped");
    // Stopping twice is fine.
    pg.stop().unwrap();

    let t = Instant::now();
    pg.restart().unwrap();
    eprintln!("restart took {:?}", t.elapsed());
    assert_eq!(pg.port(), port);
    assert!(common::can_connect(&url));
    let rows = common::query_rows(&url, "SELECT v FROM kept");
    assert_eq!(rows[0].get::<_, String>(0), "x");

    // Restart while running also works (stop, then start).
    pg.restart().unwrap();
    assert!(common::can_connect(&url));

    // Drop stops the server; a new start reuses the cluster (no initdb,
    // data kept) on a new port.
    drop(pg);
    assert!(!common::can_connect(&url));
    let pg = LocalPostgres::start(&data, true).expect("start again");
    let url = pg.url("meshbroker");
    assert_eq!(common::query_rows(&url, "SELECT v FROM kept").len(), 1);

    // A crash leaves postmaster.pid behind while the server keeps running:
    // forget this handle without stopping, and start over the same dir.
    let old_port = pg.port();
    std::mem::forget(pg);
    let pg = LocalPostgres::start(&data, true).expect("start over a leftover server");
    assert!(common::can_connect(&pg.url("meshbroker")));
    if old_port != pg.port() {
        let old = format!("postgres://postgres@127.0.0.1:{old_port}/meshbroker");
        assert!(!common::can_connect(&old), "the leftover server still runs");
    }
    drop(pg);

    // A stale postmaster.pid naming a live process that is not a server on
    // this data dir (here: ourselves) is removed, not obeyed.
    let pid_file = data.join("postmaster.pid");
    std::fs::write(
        &pid_file,
        format!(
            "{}\n{}\n0\n5432\n\n127.0.0.1\n0 0\nready\n",
            std::process::id(),
            data.display()
        ),
    )
    .unwrap();
    let pg = LocalPostgres::start(&data, true).expect("start over a stale pid file");
    assert!(common::can_connect(&pg.url("meshbroker")));
    drop(pg);

    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn unreachable_data_dir_is_explained_when_root() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // only root hands the data dir to another user
    }
    let root = common::world_traversable_tempdir("meshbroker-devdb-closed-");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = LocalPostgres::start(&root.join("data"), true).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("not searchable"), "{text}");
    std::fs::remove_dir_all(&root).unwrap();
}
