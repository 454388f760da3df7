//! `POST /join` on the db thread (PROTOCOL.md §12, steps 3 to 7), and the
//! rows `meshbroker mesh create` and `meshbroker invite` write.
//!
//! A task of its own with a connection of its own, so a join never waits
//! behind presence batches or the member refresh. It takes one job at a
//! time from a bounded channel ([`JOIN_QUEUE`]; full → the shard answers
//! 503) and answers on the job's oneshot. Each job is one transaction,
//! bounded by `WRITE_TIMEOUT`:
//!
//! 1. a transaction-scoped advisory lock on (mesh, peer key), so two joins
//!    of the same key — from two brokers sharing the database — cannot
//!    both find "no member yet" and insert two;
//! 2. the mesh row, then the invite row, judged by `join::check_mesh` and
//!    `join::check_invite` (the contract's order lives there, pure);
//! 3. an existing non-revoked member with that key: answered with its id,
//!    nothing written (no use taken);
//! 4. the use taken by ONE statement, `UPDATE … SET used_count =
//!    used_count + 1 WHERE token = $1 AND used_count < max_uses RETURNING
//!    role`: under concurrent joins the row lock makes each see the count
//!    the one before it committed, so a one-use invite is taken once;
//! 5. the member inserted with the invite's role, and the commit.
//!
//! After the commit the mesh's member rows are read again on this
//! connection and installed in the directory before the answer goes out,
//! so the new member's very next hello is admitted without waiting for a
//! refresh. (A periodic refresh whose read began before this commit may
//! install its older rows afterwards; a hello then meets a directory miss,
//! which reloads the mesh, and is still admitted.) The shard audits
//! `member_joined` through the audit lane once it has the answer.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_postgres::{Client, Config};

use super::members::query_members;
use super::worker::{connect, ConnTask};
use super::{DbError, WRITE_TIMEOUT};
use crate::ids::IdGen;
use crate::join::{self, InviteRow, JoinError, JoinRequest, MeshRow, Role};
use crate::mesh::directory::{Directory, MemberEntry, MeshEntry};

/// Joins waiting at once; more are answered 503 by the shard.
pub(crate) const JOIN_QUEUE: usize = 256;

/// First key of the join's advisory lock ("join"); the second is a hash
/// of (mesh, peer key). The two-key lock space is apart from the
/// one-key space the migration lock uses.
const JOIN_LOCK_CLASS: i32 = 0x6a6f_696e;

const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1::int4, hashtext($2::text))";
const MESH_SQL: &str =
    "SELECT archived_at IS NOT NULL, owner_pubkey, root_key FROM mesh.mesh WHERE id = $1";
const INVITE_SQL: &str = "\
SELECT mesh_id, revoked_at IS NOT NULL, expires_at, role::text
FROM mesh.invite WHERE token = $1";
const EXISTING_SQL: &str = "\
SELECT id FROM mesh.member
WHERE mesh_id = $1 AND lower(peer_pubkey) = $2 AND revoked_at IS NULL
ORDER BY joined_at, id LIMIT 1";
const TAKE_USE_SQL: &str = "\
UPDATE mesh.invite SET used_count = used_count + 1
WHERE token = $1 AND used_count < max_uses
RETURNING role::text";
const INSERT_MEMBER_SQL: &str = "\
INSERT INTO mesh.member (id, mesh_id, peer_pubkey, display_name, role, joined_at)
VALUES ($1, $2, $3, $4, $5::text::mesh.role, now() AT TIME ZONE 'UTC')";

/// A join for the db thread: the validated request and the id a new
/// member gets (made on the shard).
#[derive(Debug)]
pub struct JoinJob {
    pub request: JoinRequest,
    pub member_id: String,
    pub reply: oneshot::Sender<JoinOutcome>,
}

pub type JoinOutcome = Result<Joined, JoinFailed>;

/// A successful join.
pub struct Joined {
    pub member_id: String,
    /// Step 5: the key was a member already; nothing was written.
    pub already_member: bool,
    pub role: Role,
    /// The mesh and the new member as the directory now holds them, for
    /// the `member_joined` audit row; `None` for an existing member, or
    /// when the reload after the commit failed (the member is in
    /// Postgres; a hello finds it through a lookup).
    pub installed: Option<(Arc<MeshEntry>, Arc<MemberEntry>)>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("member_id", &self.member_id)
            .field("already_member", &self.already_member)
            .field("role", &self.role)
            .field("installed", &self.installed.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinFailed {
    /// One of the contract's refusals.
    #[error("{0}")]
    Refused(JoinError),
    /// Postgres is away or failed: nothing was committed (or, after a
    /// timeout, it is unknown; a retry is answered as a re-join).
    #[error("join unavailable: {0}")]
    Unavailable(String),
}

/// What the transaction did.
#[derive(Debug, PartialEq, Eq)]
enum Enrolled {
    Already { member_id: String },
    Inserted { role: Role },
}

#[derive(Debug)]
enum EnrollError {
    Refused(JoinError),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for EnrollError {
    fn from(e: tokio_postgres::Error) -> Self {
        EnrollError::Db(e)
    }
}

pub(crate) struct JoinTask {
    config: Config,
    jobs: mpsc::Receiver<JoinJob>,
    directory: Option<Arc<Directory>>,
    conn: Option<(Client, ConnTask)>,
}

impl JoinTask {
    pub(crate) fn new(
        config: Config,
        jobs: mpsc::Receiver<JoinJob>,
        directory: Option<Arc<Directory>>,
    ) -> Self {
        JoinTask {
            config,
            jobs,
            directory,
            conn: None,
        }
    }

    pub(crate) async fn run(mut self) {
        while let Some(job) = self.jobs.recv().await {
            let outcome = self.process(&job.request, &job.member_id).await;
            let _ = job.reply.send(outcome);
        }
    }

    fn drop_connection(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }

    async fn process(&mut self, request: &JoinRequest, new_id: &str) -> JoinOutcome {
        if self
            .conn
            .as_ref()
            .is_none_or(|(client, _)| client.is_closed())
        {
            self.drop_connection();
            let (client, task) = connect(&self.config)
                .await
                .map_err(|e| JoinFailed::Unavailable(e.to_string()))?;
            self.conn = Some((client, task));
        }
        let (client, _) = self.conn.as_mut().expect("connected above");
        let now = unix_seconds(SystemTime::now());
        let enrolled = match timeout(WRITE_TIMEOUT, enroll(client, request, new_id, now)).await {
            Ok(Ok(enrolled)) => enrolled,
            Ok(Err(EnrollError::Refused(e))) => return Err(JoinFailed::Refused(e)),
            Ok(Err(EnrollError::Db(e))) => {
                tracing::warn!(target: "db", error = %super::detail(&e), "join failed");
                self.drop_connection();
                return Err(JoinFailed::Unavailable(e.to_string()));
            }
            Err(_) => {
                tracing::warn!(target: "db", "join timed out");
                self.drop_connection();
                return Err(JoinFailed::Unavailable("join timed out".to_owned()));
            }
        };
        let mesh_id = &request.payload.mesh_id;
        match enrolled {
            Enrolled::Already { member_id } => Ok(Joined {
                member_id,
                already_member: true,
                role: request.payload.role,
                installed: None,
            }),
            Enrolled::Inserted { role } => {
                let installed = self.install(mesh_id, new_id).await;
                Ok(Joined {
                    member_id: new_id.to_owned(),
                    already_member: false,
                    role,
                    installed,
                })
            }
        }
    }

    /// Reloads `mesh_id`'s members into the directory (after the commit).
    async fn install(
        &mut self,
        mesh_id: &str,
        member_id: &str,
    ) -> Option<(Arc<MeshEntry>, Arc<MemberEntry>)> {
        let directory = self.directory.clone()?;
        let (client, _) = self.conn.as_ref()?;
        let mesh_ids = [mesh_id.to_owned()];
        let rows = match timeout(WRITE_TIMEOUT, query_members(client, &mesh_ids)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::warn!(target: "db", mesh = %mesh_id, error = %super::detail(&e),
                    "join directory reload failed");
                self.drop_connection();
                return None;
            }
            Err(_) => {
                tracing::warn!(target: "db", mesh = %mesh_id, "join directory reload timed out");
                self.drop_connection();
                return None;
            }
        };
        let rows: Vec<_> = rows.into_iter().map(|(_, row)| row).collect();
        let mesh = directory.install(mesh_id, &rows);
        let member = mesh.view().member(member_id).cloned()?;
        Some((mesh, member))
    }
}

/// Steps 3 to 7 in one transaction (see the module doc). `now`: Unix
/// seconds.
async fn enroll(
    client: &mut Client,
    request: &JoinRequest,
    new_id: &str,
    now: i64,
) -> Result<Enrolled, EnrollError> {
    let payload = &request.payload;
    let tx = client.transaction().await?;
    let lock_key = format!("{}|{}", payload.mesh_id, request.peer_pubkey);
    tx.execute(LOCK_SQL, &[&JOIN_LOCK_CLASS, &lock_key]).await?;

    let mesh = tx
        .query_opt(MESH_SQL, &[&payload.mesh_id])
        .await?
        .map(|row| -> Result<MeshRow, tokio_postgres::Error> {
            Ok(MeshRow {
                archived: row.try_get(0)?,
                owner_pubkey: row.try_get(1)?,
                root_key: row.try_get(2)?,
            })
        })
        .transpose()?;
    join::check_mesh(payload, mesh.as_ref()).map_err(EnrollError::Refused)?;

    let invite = tx
        .query_opt(INVITE_SQL, &[&request.invite_token])
        .await?
        .map(|row| -> Result<InviteRow, tokio_postgres::Error> {
            Ok(InviteRow {
                mesh_id: row.try_get(0)?,
                revoked: row.try_get(1)?,
                expires_at: unix_seconds(row.try_get(2)?),
                role: row.try_get(3)?,
            })
        })
        .transpose()?;
    join::check_invite(payload, invite.as_ref(), now).map_err(EnrollError::Refused)?;

    if let Some(row) = tx
        .query_opt(EXISTING_SQL, &[&payload.mesh_id, &request.peer_pubkey])
        .await?
    {
        // Nothing written: dropping the transaction rolls it back.
        return Ok(Enrolled::Already {
            member_id: row.try_get(0)?,
        });
    }

    let Some(taken) = tx.query_opt(TAKE_USE_SQL, &[&request.invite_token]).await? else {
        return Err(EnrollError::Refused(JoinError::InviteExhausted));
    };
    let role_text: String = taken.try_get(0)?;
    // check_invite saw this role; the column is a mesh.role.
    let role = Role::parse(&role_text).unwrap_or(payload.role);
    tx.execute(
        INSERT_MEMBER_SQL,
        &[
            &new_id,
            &payload.mesh_id,
            &request.peer_pubkey,
            &request.display_name,
            &role.as_str(),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Enrolled::Inserted { role })
}

/// Whole seconds since the epoch (0 before it).
fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ----------------------------------------------- the onboarding commands

/// `meshbroker mesh create`: the row written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedMesh {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub owner_pubkey: String,
    pub root_key: String,
}

/// What `meshbroker mesh create` asks for.
#[derive(Debug, Clone)]
pub struct NewMesh {
    pub name: String,
    pub slug: String,
    /// `mesh.mesh.owner_user_id`: the web app's user, where there is one.
    pub owner_user_id: String,
    pub owner_pubkey: String,
    pub root_key: String,
}

/// `meshbroker invite`: what the command needs of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteMesh {
    pub slug: String,
    pub owner_user_id: String,
    pub owner_pubkey: Option<String>,
    pub root_key: Option<String>,
}

/// What `meshbroker invite` writes (`mesh.invite`).
#[derive(Debug, Clone)]
pub struct NewInvite {
    pub mesh_id: String,
    pub token: String,
    pub max_uses: i32,
    pub role: Role,
    pub expires_at: SystemTime,
    pub created_by: String,
}

/// Ids for rows the commands write: the shard digits no shard (and not the
/// audit writer) uses; the random counter start keeps two runs apart.
const COMMAND_ID_SHARD: u16 = 1022;
const _: () = assert!(crate::config::MAX_SHARDS < COMMAND_ID_SHARD as usize);

/// One connection for one command, on a runtime of its own.
fn with_client<T>(
    database_url: &str,
    f: impl AsyncFnOnce(&mut Client) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let config = super::parse_url(database_url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (mut client, task) = connect(&config).await?;
        let out = timeout(Duration::from_secs(30), f(&mut client))
            .await
            .map_err(|_| DbError::Timeout("the command's statements"));
        drop(client);
        let _ = task.await;
        out?
    })
}

/// Inserts a `mesh.mesh` row (blocking; for `meshbroker mesh create`).
pub fn create_mesh_blocking(database_url: &str, mesh: &NewMesh) -> Result<CreatedMesh, DbError> {
    let id = IdGen::new(COMMAND_ID_SHARD).next_id();
    with_client(database_url, async |client| {
        client
            .execute(
                "INSERT INTO mesh.mesh (id, name, slug, owner_user_id, owner_pubkey, root_key) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &mesh.name,
                    &mesh.slug,
                    &mesh.owner_user_id,
                    &mesh.owner_pubkey,
                    &mesh.root_key,
                ],
            )
            .await?;
        Ok(())
    })?;
    Ok(CreatedMesh {
        id,
        name: mesh.name.clone(),
        slug: mesh.slug.clone(),
        owner_pubkey: mesh.owner_pubkey.clone(),
        root_key: mesh.root_key.clone(),
    })
}

/// The mesh an invite is for (`None`: no such mesh, or archived).
pub fn invite_mesh_blocking(
    database_url: &str,
    mesh_id: &str,
) -> Result<Option<InviteMesh>, DbError> {
    with_client(database_url, async |client| {
        let row = client
            .query_opt(
                "SELECT slug, owner_user_id, owner_pubkey, root_key FROM mesh.mesh \
                 WHERE id = $1 AND archived_at IS NULL",
                &[&mesh_id],
            )
            .await?;
        row.map(|row| {
            Ok(InviteMesh {
                slug: row.try_get(0)?,
                owner_user_id: row.try_get(1)?,
                owner_pubkey: row.try_get(2)?,
                root_key: row.try_get(3)?,
            })
        })
        .transpose()
    })
}

/// Sets a root key on a mesh that has none; returns the mesh's root key
/// (the one it had, if another writer was first).
pub fn ensure_root_key_blocking(
    database_url: &str,
    mesh_id: &str,
    root_key: &str,
) -> Result<String, DbError> {
    with_client(database_url, async |client| {
        let row = client
            .query_one(
                "UPDATE mesh.mesh SET root_key = COALESCE(NULLIF(root_key, ''), $2) \
                 WHERE id = $1 RETURNING root_key",
                &[&mesh_id, &root_key],
            )
            .await?;
        Ok(row.try_get(0)?)
    })
}

/// Inserts a `mesh.invite` row; returns its id.
pub fn create_invite_blocking(database_url: &str, invite: &NewInvite) -> Result<String, DbError> {
    let id = IdGen::new(COMMAND_ID_SHARD).next_id();
    with_client(database_url, async |client| {
        client
            .execute(
                "INSERT INTO mesh.invite \
                 (id, mesh_id, token, max_uses, used_count, role, expires_at, created_by, created_at) \
                 VALUES ($1, $2, $3, $4, 0, $5::text::mesh.role, $6, $7, now() AT TIME ZONE 'UTC')",
                &[
                    &id,
                    &invite.mesh_id,
                    &invite.token,
                    &invite.max_uses,
                    &invite.role.as_str(),
                    &invite.expires_at,
                    &invite.created_by,
                ],
            )
            .await?;
        Ok(())
    })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_use_is_taken_by_one_conditional_statement() {
        let sql = TAKE_USE_SQL;
        assert!(sql.starts_with("UPDATE mesh.invite SET used_count = used_count + 1"));
        assert!(sql.contains("WHERE token = $1 AND used_count < max_uses"));
        assert!(sql.contains("RETURNING role"));
    }

    #[test]
    fn only_live_members_count_as_already_joined() {
        assert!(EXISTING_SQL.contains("revoked_at IS NULL"));
        assert!(EXISTING_SQL.contains("lower(peer_pubkey) = $2"));
    }

    #[test]
    fn unix_seconds_before_and_after_the_epoch() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1500)), 1);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }

    #[test]
    fn command_ids_are_apart_from_shard_and_audit_ids() {
        let id = IdGen::new(COMMAND_ID_SHARD).next_id();
        assert_eq!(&id[10..12], "zy");
        assert_ne!(COMMAND_ID_SHARD, super::super::audit::AUDIT_ID_SHARD);
    }
}
