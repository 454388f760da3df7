//! What an admin's messages read and write (PROTOCOL.md §13), answered by
//! the member loader's task on its connection: a ban or an unban and the
//! directory's refreshes never interleave, so an unban's fresh entry is
//! never revoked again by a refresh that read before it.
use super::chain::{verify_chain, ChainReport};
use super::members::{query_members, MemberLoader};
use super::{LookupFailed, WRITE_TIMEOUT};
use std::time::SystemTime;
use tokio::sync::oneshot;
use tokio::time::timeout;

/// Answered with `Err` when Postgres is unreachable or refuses.
pub type AdminReply<T> = oneshot::Sender<Result<T, LookupFailed>>;

/// A revoked member, for `bans_list`.
#[derive(Debug, Clone)]
pub struct BanRow {
    pub member_id: String,
    pub pubkey: String,
    pub display_name: String,
    pub revoked_at: SystemTime,
}

/// A `mesh.audit_log` row, for `audit_result` (chain order: `created_at`,
/// then `id` bytewise, as `db::chain` orders them).
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: String,
    pub event_type: String,
    pub actor: Option<String>,
    pub target: Option<String>,
    pub metadata: String,
    pub created_at: SystemTime,
    pub hash: Option<String>,
}

pub enum AdminRequest {
    /// `banned`: sets `revoked_at` (the shards have revoked the entry
    /// already); else clears it and reinstates the member in the directory.
    SetBanned {
        mesh_id: String,
        member_id: String,
        banned: bool,
        reply: AdminReply<()>,
    },
    ListBans {
        mesh_id: String,
        reply: AdminReply<Vec<BanRow>>,
    },
    /// Newest first, in chain order (`created_at`, then `id`).
    AuditQuery {
        mesh_id: String,
        limit: u32,
        before_id: Option<String>,
        event_type: Option<String>,
        reply: AdminReply<Vec<AuditRow>>,
    },
    /// Walks the mesh's audit chain (see `db::chain`).
    AuditVerify {
        mesh_id: String,
        reply: AdminReply<ChainReport>,
    },
}

const BAN_SQL: &str = "\
UPDATE mesh.member SET revoked_at = now() WHERE id = $1 AND mesh_id = $2 AND revoked_at IS NULL";
const UNBAN_SQL: &str = "UPDATE mesh.member SET revoked_at = NULL WHERE id = $1 AND mesh_id = $2";
const BANS_SQL: &str = "\
SELECT id, peer_pubkey, display_name, revoked_at FROM mesh.member
WHERE mesh_id = $1 AND revoked_at IS NOT NULL ORDER BY revoked_at, id";
const AUDIT_SQL: &str = "\
SELECT a.id, a.event_type, a.actor_peer_id, a.target_peer_id, a.metadata::text, a.created_at,
  a.hash
FROM mesh.audit_log a
WHERE a.mesh_id = $1
  AND ($2::text IS NULL OR a.event_type = $2)
  AND ($3::text IS NULL OR (a.created_at, a.id COLLATE \"C\") <
    (SELECT b.created_at, b.id COLLATE \"C\" FROM mesh.audit_log b
     WHERE b.id = $3 AND b.mesh_id = $1))
ORDER BY a.created_at DESC, a.id COLLATE \"C\" DESC
LIMIT $4";

impl MemberLoader {
    pub(super) async fn answer_admin(&mut self, request: AdminRequest) {
        match request {
            AdminRequest::SetBanned {
                mesh_id,
                member_id,
                banned,
                reply,
            } => {
                let done = if banned {
                    self.execute(BAN_SQL, &member_id, &mesh_id).await
                } else {
                    self.unban(&mesh_id, &member_id).await
                };
                let _ = reply.send(done);
            }
            AdminRequest::ListBans { mesh_id, reply } => {
                let _ = reply.send(self.bans(&mesh_id).await);
            }
            AdminRequest::AuditQuery {
                mesh_id,
                limit,
                before_id,
                event_type,
                reply,
            } => {
                let rows = self
                    .audit_rows(&mesh_id, limit, before_id, event_type)
                    .await;
                let _ = reply.send(rows);
            }
            AdminRequest::AuditVerify { mesh_id, reply } => {
                let report = match self.client().await {
                    Ok(client) => verify_chain(client, &mesh_id)
                        .await
                        .map_err(|e| self.failed(e)),
                    Err(e) => Err(e),
                };
                let _ = reply.send(report);
            }
        }
    }

    async fn execute(
        &mut self,
        sql: &str,
        member_id: &str,
        mesh_id: &str,
    ) -> Result<(), LookupFailed> {
        let client = self.client().await?;
        match timeout(WRITE_TIMEOUT, client.execute(sql, &[&member_id, &mesh_id])).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed("timed out")),
        }
    }

    async fn unban(&mut self, mesh_id: &str, member_id: &str) -> Result<(), LookupFailed> {
        self.execute(UNBAN_SQL, member_id, mesh_id).await?;
        let client = self.client().await?;
        let rows = match timeout(WRITE_TIMEOUT, query_members(client, &[mesh_id.to_owned()])).await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(self.failed(e)),
            Err(_) => return Err(self.failed("timed out")),
        };
        if let Some(directory) = self.directory() {
            let rows: Vec<_> = rows.into_iter().map(|(_, row)| row).collect();
            directory.reinstate(mesh_id, &rows, member_id);
        }
        Ok(())
    }

    async fn bans(&mut self, mesh_id: &str) -> Result<Vec<BanRow>, LookupFailed> {
        let client = self.client().await?;
        let rows = match timeout(WRITE_TIMEOUT, client.query(BANS_SQL, &[&mesh_id])).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(self.failed(e)),
            Err(_) => return Err(self.failed("timed out")),
        };
        Ok(rows
            .iter()
            .map(|r| BanRow {
                member_id: r.get(0),
                pubkey: r.get(1),
                display_name: r.get(2),
                revoked_at: r.get(3),
            })
            .collect())
    }

    async fn audit_rows(
        &mut self,
        mesh_id: &str,
        limit: u32,
        before_id: Option<String>,
        event_type: Option<String>,
    ) -> Result<Vec<AuditRow>, LookupFailed> {
        let client = self.client().await?;
        let limit = i64::from(limit);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&mesh_id, &event_type, &before_id, &limit];
        let rows = match timeout(WRITE_TIMEOUT, client.query(AUDIT_SQL, &params)).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(self.failed(e)),
            Err(_) => return Err(self.failed("timed out")),
        };
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                event_type: r.get(1),
                actor: r.get(2),
                target: r.get(3),
                metadata: r.get(4),
                created_at: r.get(5),
                hash: r.get(6),
            })
            .collect())
    }
}
