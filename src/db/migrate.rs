//! Schema migrations: the SQL files in `migrations/`, embedded at build
//! time and applied in version order.
//!
//! All pending migrations run in ONE transaction that first takes a
//! transaction-scoped advisory lock, so two brokers starting together
//! serialize: the second waits, then sees the versions the first recorded
//! and applies nothing. Applied versions are recorded in
//! `mesh.broker_schema_migrations` (a broker-only table; the web app's own
//! migration bookkeeping is left alone). Each file is also idempotent on its
//! own, which is what lets it run on top of an existing claudemesh database
//! that already has the tables but no record of this broker.

use super::DbError;

/// One embedded migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in the order it must run. Versions are strictly
/// increasing (checked by a unit test).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "mesh_schema",
        sql: include_str!("../../migrations/0001_mesh_schema.sql"),
    },
    Migration {
        version: 2,
        name: "broker_indexes",
        sql: include_str!("../../migrations/0002_broker_indexes.sql"),
    },
    Migration {
        version: 3,
        name: "held_delivery",
        sql: include_str!("../../migrations/0003_held_delivery.sql"),
    },
    Migration {
        version: 4,
        name: "held_indexes",
        sql: include_str!("../../migrations/0004_held_indexes.sql"),
    },
    Migration {
        version: 5,
        name: "member_group",
        sql: include_str!("../../migrations/0005_member_group.sql"),
    },
    Migration {
        version: 6,
        name: "client_message_id",
        sql: include_str!("../../migrations/0006_client_message_id.sql"),
    },
    Migration {
        version: 7,
        name: "audit_chain",
        sql: include_str!("../../migrations/0007_audit_chain.sql"),
    },
    Migration {
        version: 8,
        name: "join",
        sql: include_str!("../../migrations/0008_join.sql"),
    },
    Migration {
        version: 9,
        name: "presence_session_pubkey",
        sql: include_str!("../../migrations/0009_presence_session_pubkey.sql"),
    },
    Migration {
        version: 10,
        name: "cluster_nodes",
        sql: include_str!("../../migrations/0010_cluster_nodes.sql"),
    },
];

/// Key of the transaction-scoped advisory lock serializing migrations
/// across brokers sharing a database ("meshbrkr" in ASCII).
pub const MIGRATION_LOCK_KEY: i64 = 0x6d65_7368_6272_6b72;

/// Created before anything else so the applied versions can be read; the
/// schema must exist first for a fresh database.
const BOOKKEEPING_SQL: &str = "\
CREATE SCHEMA IF NOT EXISTS mesh;
CREATE TABLE IF NOT EXISTS mesh.broker_schema_migrations (
  version integer PRIMARY KEY,
  name text NOT NULL,
  applied_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
);";

/// The migrations not yet in `applied`, in order.
pub fn pending<'a>(all: &'a [Migration], applied: &[i32]) -> Vec<&'a Migration> {
    all.iter()
        .filter(|m| !applied.contains(&m.version))
        .collect()
}

/// Applies every migration not yet recorded, in one transaction under the
/// advisory lock. Returns how many were applied now (0 when up to date).
pub async fn run_migrations(client: &mut tokio_postgres::Client) -> Result<usize, DbError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    tx.batch_execute(BOOKKEEPING_SQL).await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM mesh.broker_schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let todo = pending(MIGRATIONS, &applied);
    for m in &todo {
        tx.batch_execute(m.sql)
            .await
            .map_err(|source| DbError::Migration {
                version: m.version,
                name: m.name,
                source,
            })?;
        tx.execute(
            "INSERT INTO mesh.broker_schema_migrations (version, name, applied_at) \
             VALUES ($1, $2, now() AT TIME ZONE 'UTC')",
            &[&m.version, &m.name],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(todo.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase_and_names_match_files() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        for m in MIGRATIONS {
            assert!(!m.sql.trim().is_empty(), "{} is empty", m.name);
        }
    }

    #[test]
    fn pending_skips_applied_and_keeps_order() {
        let all = MIGRATIONS;
        assert_eq!(pending(all, &[]).len(), all.len());
        let rest: Vec<i32> = pending(all, &[1]).iter().map(|m| m.version).collect();
        assert_eq!(rest, vec![2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(pending(all, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).is_empty());
    }

    #[test]
    fn no_reference_outside_schema_mesh() {
        for m in MIGRATIONS {
            let sql = m.sql.to_ascii_lowercase();
            for (i, _) in sql.match_indices("references ") {
                let target = &sql[i + "references ".len()..];
                assert!(
                    target.starts_with("mesh."),
                    "migration {} references {}",
                    m.name,
                    &target[..target.len().min(30)]
                );
            }
            assert!(
                !sql.contains("public."),
                "migration {} touches public",
                m.name
            );
        }
    }
}
