//! At start: every undelivered, unexpired `mesh.message_queue` row goes
//! back into its members' held queues, in the background, on a connection
//! of its own, so `/health` and the first hellos never wait for it.
//!
//! 1. Rows past their expiry are deleted (they were never pushed) and
//!    counted. A row with no `expires_at` (the old broker's) expires
//!    `HELD_TTL_SECONDS` after its creation.
//! 2. `*` rows the old broker wrote have no per-member state: they get one
//!    pending `mesh.message_delivery` row per member of the mesh but the
//!    sender, so that from then on each member gets it once.
//! 3. The meshes with rows are loaded into the directory and marked
//!    *restoring*: sends to them are held behind the backlog, and nothing is
//!    drained, until the mesh's rows are all in place. Until this step is
//!    done every mesh counts as restoring (the directory's start-up gate,
//!    opened at once if Postgres cannot be reached), so no send made in the
//!    first moments overtakes a backlog not yet known.
//! 4. The rows stream in creation order per mesh through a cursor, a page
//!    at a time; when a mesh is done it is released (`on_restored` asks the
//!    shards of its members to drain). A connection lost mid-way resumes
//!    after the last row placed.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::sleep;
use tokio_postgres::{Client, Config};

use super::members::query_members;
use super::worker::{connect, Backoff};
use super::{run_migrations, DbError};
use crate::mesh::directory::{Directory, MemberRow, MeshEntry};
use crate::mesh::restore::{restore, StoredEnvelope, StoredTarget};
use crate::protocol::Priority;

/// Rows fetched per round trip.
const PAGE_ROWS: i32 = 2000;

const DELETE_EXPIRED_SQL: &str = "\
DELETE FROM mesh.message_queue
WHERE delivered_at IS NULL
  AND COALESCE(expires_at, created_at + make_interval(secs => $1::float8)) <= now()";

const ADOPT_BROADCASTS_SQL: &str = "\
INSERT INTO mesh.message_delivery (message_id, member_id)
SELECT q.id, m.id
FROM mesh.message_queue q
JOIN mesh.member m ON m.mesh_id = q.mesh_id AND m.id <> q.sender_member_id
  AND m.revoked_at IS NULL
WHERE q.target_spec = '*' AND q.delivered_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM mesh.message_delivery d WHERE d.message_id = q.id)
ON CONFLICT DO NOTHING";

/// With several nodes (the connection's `meshbroker.node_id` is set, see
/// `db::spawn_with`), a node loads only the rows it holds (`held_by`);
/// rows of no node (the old broker's, a one-node run's) are claimed first,
/// by one node, in one statement.
macro_rules! own_rows {
    () => {
        "(current_setting('meshbroker.node_id', true) IS NULL
    OR q.held_by = current_setting('meshbroker.node_id', true))"
    };
}

const CLAIM_UNOWNED_SQL: &str = "\
UPDATE mesh.message_queue SET held_by = current_setting('meshbroker.node_id', true)
WHERE held_by IS NULL AND delivered_at IS NULL
  AND current_setting('meshbroker.node_id', true) IS NOT NULL";

/// A dead node's held rows, claimed by this one (`Takeover`).
const CLAIM_DEAD_SQL: &str = "\
UPDATE mesh.message_queue SET held_by = current_setting('meshbroker.node_id', true)
WHERE held_by = $1 AND delivered_at IS NULL
RETURNING id";

const MESHES_SQL: &str = concat!(
    "SELECT DISTINCT mesh_id FROM mesh.message_queue q
WHERE delivered_at IS NULL AND created_at < $1 AND ($2::text[] IS NULL OR q.id = ANY($2)) AND ",
    own_rows!()
);

/// Keyset on (mesh, creation, id): a resumed load starts after the last
/// row placed. Rows this run wrote (created since it started) are in
/// memory already.
const ROWS_SQL: &str = concat!(
    "SELECT q.id, q.mesh_id, q.sender_member_id, s.peer_pubkey, q.target_spec, q.priority::text,
  q.nonce, q.ciphertext, q.created_at,
  COALESCE(q.expires_at, q.created_at + make_interval(secs => $1::float8)),
  CASE WHEN q.target_spec = '*' OR left(q.target_spec, 1) IN ('@', '#') THEN ARRAY(
    SELECT d.member_id FROM mesh.message_delivery d
    WHERE d.message_id = q.id AND d.delivered_at IS NULL ORDER BY d.member_id)
  END,
  q.client_message_id
FROM mesh.message_queue q
JOIN mesh.member s ON s.id = q.sender_member_id
WHERE q.delivered_at IS NULL
  AND COALESCE(q.expires_at, q.created_at + make_interval(secs => $1::float8)) > now()
  AND (q.mesh_id, q.created_at, q.id) > ($2, $3, $4)
  AND q.created_at < $5
  AND ($6::text[] IS NULL OR q.id = ANY($6)) AND ",
    own_rows!(),
    "
ORDER BY q.mesh_id, q.created_at, q.id"
);

/// Called with each mesh once its rows are all held.
pub type OnRestored = Box<dyn Fn(&Arc<MeshEntry>) + Send + Sync>;

pub(crate) struct Restorer {
    pub(crate) config: Config,
    /// When this run started: rows created since are its own.
    pub(crate) started: SystemTime,
    pub(crate) directory: Arc<Directory>,
    pub(crate) held_ttl: Duration,
    pub(crate) on_restored: OnRestored,
    /// A takeover's: only the rows claimed from this dead node.
    pub(crate) takeover: Option<String>,
}

/// Where a (resumed) load goes on from.
struct Cursor {
    mesh_id: String,
    created_at: SystemTime,
    id: String,
}

/// What the load did, for its log line.
#[derive(Default)]
struct Restored {
    expired: u64,
    rows: u64,
    holds: u64,
}

impl Restorer {
    pub(crate) async fn run(self) {
        let mut backoff = Backoff::new();
        let mut cursor: Option<Cursor> = None;
        let mut prepared = false;
        let mut restored = Restored::default();
        let mut pending: Vec<Arc<MeshEntry>> = Vec::new();
        // A takeover's claimed ids (claimed once: a retry loads the same).
        let mut only: Option<Vec<String>> = None;
        loop {
            let attempt = async {
                let (mut client, task) = connect(&self.config).await?;
                run_migrations(&mut client).await?;
                if !prepared {
                    only = self.claim(&client).await?;
                    restored.expired = self.prepare(&client, &only, &mut pending).await?;
                    prepared = true;
                    self.open_gate();
                }
                self.load(&mut client, &only, &mut cursor, &mut pending, &mut restored)
                    .await?;
                drop(client);
                let _ = task.await;
                Ok::<(), DbError>(())
            };
            match attempt.await {
                Ok(()) => break,
                Err(e) => {
                    // Postgres is away (or refuses the load): live routing
                    // must not wait for it.
                    self.open_gate();
                    let delay = backoff.next_delay();
                    tracing::warn!(target: "db", error = %e, "held restore failed");
                    sleep(delay).await;
                }
            }
        }
        for mesh in pending.drain(..) {
            self.release(&mesh);
        }
        tracing::info!(target: "db", expired = restored.expired, rows = restored.rows,
            holds = restored.holds, takeover = self.takeover.as_deref().unwrap_or(""),
            "held restored");
    }

    /// With several nodes: the rows of no node become this node's; a
    /// takeover claims the dead node's and returns their ids. Each is one
    /// statement, so of two nodes claiming at once each row goes to one.
    async fn claim(&self, client: &Client) -> Result<Option<Vec<String>>, DbError> {
        let Some(dead) = &self.takeover else {
            client.execute(CLAIM_UNOWNED_SQL, &[]).await?;
            return Ok(None);
        };
        let rows = client.query(CLAIM_DEAD_SQL, &[dead]).await?;
        Ok(Some(rows.iter().map(|row| row.get(0)).collect()))
    }

    fn ttl_secs(&self) -> f64 {
        self.held_ttl.as_secs_f64()
    }

    /// Steps 1–3: drop the expired, adopt old broadcasts, mark the meshes.
    async fn prepare(
        &self,
        client: &Client,
        only: &Option<Vec<String>>,
        pending: &mut Vec<Arc<MeshEntry>>,
    ) -> Result<u64, DbError> {
        let expired = client
            .execute(DELETE_EXPIRED_SQL, &[&self.ttl_secs()])
            .await?;
        client.execute(ADOPT_BROADCASTS_SQL, &[]).await?;
        if only.as_ref().is_some_and(Vec::is_empty) {
            return Ok(expired);
        }
        let mesh_ids: Vec<String> = client
            .query(MESHES_SQL, &[&self.started, only])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if mesh_ids.is_empty() {
            return Ok(expired);
        }
        let members = query_members(client, &mesh_ids).await?;
        for mesh_id in &mesh_ids {
            let rows: Vec<MemberRow> = members
                .iter()
                .filter(|(mesh, _)| mesh == mesh_id)
                .map(|(_, row)| row.clone())
                .collect();
            let mesh = self.directory.install(mesh_id, &rows);
            mesh.set_restoring(true);
            pending.push(mesh);
        }
        Ok(expired)
    }

    /// Step 4, from `cursor` on.
    async fn load(
        &self,
        client: &mut Client,
        only: &Option<Vec<String>>,
        cursor: &mut Option<Cursor>,
        pending: &mut Vec<Arc<MeshEntry>>,
        restored: &mut Restored,
    ) -> Result<(), DbError> {
        let transaction = client.transaction().await?;
        let statement = transaction.prepare(ROWS_SQL).await?;
        let (mesh_id, created_at, id) = match cursor {
            Some(c) => (c.mesh_id.clone(), c.created_at, c.id.clone()),
            None => (String::new(), SystemTime::UNIX_EPOCH, String::new()),
        };
        let ttl = self.ttl_secs();
        let portal = transaction
            .bind(
                &statement,
                &[&ttl, &mesh_id, &created_at, &id, &self.started, only],
            )
            .await?;
        loop {
            let rows = transaction.query_portal(&portal, PAGE_ROWS).await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let mesh_id: String = row.get(1);
                // Rows come mesh by mesh: the one before this is done.
                if let Some(done) = cursor.as_ref().filter(|c| c.mesh_id != mesh_id) {
                    if let Some(at) = pending.iter().position(|m| *m.id == *done.mesh_id) {
                        self.release(&pending.swap_remove(at));
                    }
                }
                let stored = stored_envelope(row);
                *cursor = Some(Cursor {
                    mesh_id: mesh_id.clone(),
                    created_at: stored.created_at,
                    id: stored.id.clone(),
                });
                restored.rows += 1;
                if let Some(mesh) = pending.iter().find(|m| *m.id == *mesh_id) {
                    restored.holds += restore(mesh, stored) as u64;
                }
            }
        }
        transaction.commit().await?;
        Ok(())
    }

    /// The meshes with a backlog are marked: every other mesh may route
    /// and drain again (see `Directory::close_gate`).
    fn open_gate(&self) {
        for mesh in self.directory.open_gate() {
            if !mesh.is_restoring() {
                (self.on_restored)(&mesh);
            }
        }
    }

    fn release(&self, mesh: &Arc<MeshEntry>) {
        mesh.set_restoring(false);
        (self.on_restored)(mesh);
    }
}

fn stored_envelope(row: &tokio_postgres::Row) -> StoredEnvelope {
    let target_spec: String = row.get(4);
    let target = match row.get::<_, Option<Vec<String>>>(10) {
        Some(ids) => StoredTarget::Members {
            spec: target_spec,
            ids,
        },
        None => StoredTarget::Member(target_spec),
    };
    let priority: String = row.get(5);
    StoredEnvelope {
        id: row.get(0),
        sender_member_id: row.get(2),
        sender_pubkey: row.get(3),
        target,
        priority: Priority::parse(&priority).unwrap_or(Priority::Next),
        nonce: row.get(6),
        ciphertext: row.get(7),
        created_at: row.get(8),
        expires_at: row.get(9),
        client_message_id: row.get(11),
    }
}

/// Claims a dead node's held rows for this node and loads them into their
/// members' queues (README "Several nodes"); `config` carries this node's id.
pub(crate) async fn take_over(
    config: Config,
    dead: String,
    directory: Arc<Directory>,
    held_ttl: Duration,
    on_restored: OnRestored,
) {
    Restorer {
        config,
        started: SystemTime::now(),
        directory,
        held_ttl,
        on_restored,
        takeover: Some(dead),
    }
    .run()
    .await
}
