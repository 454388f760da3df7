//! An admin's messages (PROTOCOL.md §13): the role is checked from the
//! directory (no Postgres read for it), targets are resolved within the
//! admin's mesh, kicks and bans take effect on every shard at once, and
//! what must be read or written in Postgres goes to the db thread, whose
//! answer this session awaits (its own reads wait; the shard's loop does
//! not).
use super::Session;
use crate::cluster::wire::AdminAction;
use crate::db::admin::AdminRequest;
use crate::mesh::directory::{MemberEntry, MeshEntry, Unresolved};
use crate::protocol::{self, Admin, AuditEntry, BanEntry, ErrorCode, ProtocolError, VerifyResult};
use crate::ws::{self, OpCode};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::oneshot;

/// An admin message detached from the parse buffer, so it can be awaited.
pub(super) enum OwnedAdmin {
    Kick(String),
    Ban(String),
    Unban(String),
    ListBans,
    AuditQuery {
        limit: u32,
        before_id: Option<String>,
        event_type: Option<String>,
    },
    AuditVerify,
}

impl OwnedAdmin {
    pub(super) fn new(admin: Admin<'_>) -> Self {
        match admin {
            Admin::Kick { target } => OwnedAdmin::Kick(target.into_owned()),
            Admin::Ban { target, .. } => OwnedAdmin::Ban(target.into_owned()),
            Admin::Unban { target } => OwnedAdmin::Unban(target.into_owned()),
            Admin::ListBans => OwnedAdmin::ListBans,
            Admin::AuditQuery {
                limit,
                before_id,
                event_type,
            } => OwnedAdmin::AuditQuery {
                limit,
                before_id: before_id.map(|s| s.into_owned()),
                event_type: event_type.map(|s| s.into_owned()),
            },
            Admin::AuditVerify => OwnedAdmin::AuditVerify,
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

impl Session {
    pub(super) async fn process_admin(&mut self, admin: OwnedAdmin, req_id: Option<String>) {
        let req_id = req_id.as_deref();
        let Some(joined) = &self.joined else { return };
        let (mesh, me) = (joined.mesh.clone(), joined.member.clone());
        let refuse =
            |code, message: &'static str| ProtocolError::new(code, message).with_req_id(req_id);
        if !me.is_admin() {
            return self.reject(&refuse(
                ErrorCode::Forbidden,
                "only a mesh admin may do this",
            ));
        }
        let banned = matches!(admin, OwnedAdmin::Ban(_));
        let answer = match admin {
            OwnedAdmin::Kick(target) => match self.target(&mesh, &me, &target, false) {
                Ok(member) => {
                    let mut kicked = member.sessions.presence_ids();
                    kicked.extend(mesh.remote.presences_of(&member));
                    self.shard.kick(&mesh, &member, false);
                    let kicked: Vec<&str> = kicked.iter().map(|p| &**p).collect();
                    let mut json = Vec::with_capacity(64);
                    protocol::write_kick_ack(&mut json, &kicked, req_id);
                    Ok(json)
                }
                Err(e) => Err(e),
            },
            OwnedAdmin::Ban(target) | OwnedAdmin::Unban(target) => {
                match self.target(&mesh, &me, &target, !banned) {
                    Ok(member) => {
                        if banned {
                            member.ban();
                            self.shard.kick(&mesh, &member, true);
                        }
                        let (reply, answer) = oneshot::channel();
                        let request = AdminRequest::SetBanned {
                            mesh_id: mesh.id.to_string(),
                            member_id: member.id.to_string(),
                            banned,
                            reply,
                        };
                        self.ask(request, answer).await.map(|()| {
                            if !banned {
                                let unban = AdminAction::Unban;
                                self.shard.tell_nodes_admin(&mesh, &member, unban);
                            }
                            let mut json = Vec::with_capacity(64);
                            protocol::write_ban_ack(&mut json, banned, &member.id, req_id);
                            json
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            OwnedAdmin::ListBans => {
                let (reply, answer) = oneshot::channel();
                let request = AdminRequest::ListBans {
                    mesh_id: mesh.id.to_string(),
                    reply,
                };
                self.ask(request, answer).await.map(|bans| {
                    let times: Vec<String> = bans.iter().map(|b| rfc3339(b.revoked_at)).collect();
                    let entries: Vec<BanEntry<'_>> = bans
                        .iter()
                        .zip(&times)
                        .map(|(b, at)| BanEntry {
                            member_id: &b.member_id,
                            pubkey: &b.pubkey,
                            display_name: &b.display_name,
                            revoked_at: at,
                        })
                        .collect();
                    let mut json = Vec::with_capacity(256);
                    protocol::write_bans_list(&mut json, &entries, req_id);
                    json
                })
            }
            OwnedAdmin::AuditQuery {
                limit,
                before_id,
                event_type,
            } => {
                let (reply, answer) = oneshot::channel();
                let request = AdminRequest::AuditQuery {
                    mesh_id: mesh.id.to_string(),
                    limit,
                    before_id,
                    event_type,
                    reply,
                };
                self.ask(request, answer).await.map(|rows| {
                    let times: Vec<String> = rows.iter().map(|r| rfc3339(r.created_at)).collect();
                    let entries: Vec<AuditEntry<'_>> = rows
                        .iter()
                        .zip(&times)
                        .map(|(r, at)| AuditEntry {
                            id: &r.id,
                            event_type: &r.event_type,
                            actor: r.actor.as_deref(),
                            target: r.target.as_deref(),
                            metadata_json: &r.metadata,
                            created_at: at,
                            hash: r.hash.as_deref(),
                        })
                        .collect();
                    let mut json = Vec::with_capacity(1024);
                    protocol::write_audit_result(&mut json, &entries, req_id);
                    json
                })
            }
            OwnedAdmin::AuditVerify => {
                let (reply, answer) = oneshot::channel();
                let request = AdminRequest::AuditVerify {
                    mesh_id: mesh.id.to_string(),
                    reply,
                };
                self.ask(request, answer).await.map(|report| {
                    let mut json = Vec::with_capacity(128);
                    let result = VerifyResult {
                        valid: report.valid,
                        entries: report.entries,
                        unchained: report.unchained,
                        broken_at: report.broken_at.as_deref(),
                    };
                    protocol::write_audit_verify_result(&mut json, &result, req_id);
                    json
                })
            }
        };
        match answer {
            Ok(json) => self
                .link
                .reply(ws::encode_server_frame(OpCode::Text, &json), None),
            Err(error) => self.reject(&error.with_req_id(req_id)),
        }
    }

    /// An admin's target within its mesh; an admin never targets itself.
    fn target(
        &self,
        mesh: &MeshEntry,
        me: &Arc<MemberEntry>,
        target: &str,
        revoked: bool,
    ) -> Result<Arc<MemberEntry>, ProtocolError> {
        let member = mesh.view().resolve(target, revoked).map_err(|e| match e {
            Unresolved::Unknown => {
                ProtocolError::new(ErrorCode::UnknownTarget, "no such member in this mesh")
            }
            Unresolved::Ambiguous => ProtocolError::new(
                ErrorCode::AmbiguousTarget,
                "several members have that display name",
            ),
        })?;
        if Arc::ptr_eq(&member, me) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "an admin cannot kick or ban itself",
            ));
        }
        Ok(member)
    }

    /// Sends `request` to the db thread and awaits its answer.
    async fn ask<T>(
        &self,
        request: AdminRequest,
        answer: oneshot::Receiver<Result<T, crate::db::LookupFailed>>,
    ) -> Result<T, ProtocolError> {
        let unavailable =
            || ProtocolError::new(ErrorCode::Unavailable, "the database is unavailable");
        if !self.shard.ctx.db.admin(request) {
            return Err(unavailable());
        }
        answer
            .await
            .map_err(|_| unavailable())?
            .map_err(|_| unavailable())
    }
}
