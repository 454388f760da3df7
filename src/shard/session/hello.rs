//! The hello (PROTOCOL.md §4): timestamp, signature, membership and
//! capacity, then the session's admission: its first status (a stashed hook
//! signal, or idle), its place in the routing table and the hook index, its
//! presence row, and its held envelopes.
use super::{Joined, Session};
use crate::audit::AuditEvent;
use crate::cluster::BusCommand;
use crate::db::DbCommand;
use crate::inbox::ShardEvent;
use crate::mesh::directory::{Admission, MemberEntry, MeshEntry};
use crate::mesh::peers::{Claim, Holder, MemberSessions, MovedSession, NewSession, PeerEvent};
use crate::metrics::RejectReason;
use crate::protocol::CloseReason;
use crate::protocol::{
    self, Capabilities, ErrorCode, GroupName, GroupRole, Hello, HelloAck, ProtocolError,
    SessionHello,
};
use crate::status::hook_index::HookTarget;
use crate::status::{Source, StatusState};
use crate::ws::{self, OpCode};
use ed25519_dalek::{Signature, VerifyingKey};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Hello timestamps further than this from the broker's clock are stale.
const MAX_CLOCK_SKEW_MS: u64 = 60_000;
/// Longest a parent attestation may still be valid for (PROTOCOL.md §9).
const MAX_ATTESTATION_MS: i64 = 24 * 3600 * 1000;

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Session {
    /// Every refused hello: the error, then close 1008.
    pub(super) fn refuse_hello(&self, error: ProtocolError) {
        match error.code {
            ErrorCode::Capacity => self.shard.metrics.conn_rejected(RejectReason::Capacity),
            ErrorCode::Unauthorized
            | ErrorCode::BadSignature
            | ErrorCode::StaleTimestamp
            | ErrorCode::AttestationMismatch
            | ErrorCode::Expired
            | ErrorCode::TtlTooLong
            | ErrorCode::ParentMemberIdMismatch => {
                self.shard.metrics.conn_rejected(RejectReason::Unauthorized)
            }
            _ => {}
        }
        tracing::info!(target: "ws", peer = %self.peer, code = error.code.as_str(), "ws hello refused");
        self.send_error(&error);
        self.link.close(if error.code == ErrorCode::Unavailable {
            CloseReason::Internal
        } else {
            CloseReason::HelloRefused
        });
    }

    pub(super) async fn process_hello(&mut self, hello: OwnedHello) {
        let admitted = self.admit(&hello).await;
        if hello.session.is_some() {
            let code = admitted.as_ref().err().map(|e| e.code);
            self.shard.metrics.session_hello(code);
        }
        match admitted {
            Ok((joined, claim)) => self.welcome(&hello, joined, &claim),
            Err(e) => {
                // Audited only in a mesh the directory knows: the row's
                // mesh must exist, and an unknown one is anyone's guess.
                if let Some(mesh) = self.shard.ctx.directory.get(&hello.mesh_id) {
                    self.shard
                        .audit(AuditEvent::hello_refused(&mesh, &hello.member_id, e.code));
                }
                self.refuse_hello(e.with_req_id(hello.req_id.as_deref()))
            }
        }
    }

    /// After admission: the hello's groups, the answer, the audit, the
    /// peers' events, the session that was taken over, and what is held.
    fn welcome(&mut self, hello: &OwnedHello, joined: Joined, claim: &Claim) {
        let shard = &self.shard;
        let (mesh, member) = (&joined.mesh, &joined.member);
        let entry = claim.entry();
        for (name, role) in &hello.groups {
            // Within MAX_GROUPS: the parser refused more.
            let _ = shard.join_group(mesh, member, name.clone(), role.as_deref());
        }
        let groups = member.groups();
        let roles: Vec<GroupRole<'_>> = groups
            .iter()
            .map(|m| GroupRole {
                name: m.name.as_str(),
                role: m.role.as_deref(),
            })
            .collect();
        let state = entry.state();
        let member_name = member.display_name();
        let mut json = Vec::with_capacity(256);
        protocol::write_hello_ack(
            &mut json,
            &HelloAck {
                presence_id: &entry.presence_id,
                mesh_id: &mesh.id,
                member_id: &member.id,
                member_display_name: &member_name,
                display_name: &state.display_name,
                groups: &roles,
                capabilities: hello.capabilities,
                resumed: !matches!(claim, Claim::New(_)),
                session_pubkey: entry.session_pubkey.as_deref(),
                req_id: hello.req_id.as_deref(),
            },
        );
        self.link
            .reply(ws::encode_server_frame(OpCode::Text, &json), None);
        tracing::info!(target: "ws", peer = %self.peer, shard = shard.index, mesh = %mesh.id,
            member = %member.id, presence = %entry.presence_id, session = %hello.session_id,
            status = self.link.status().status.as_str(), resumed = !matches!(claim, Claim::New(_)), "ws hello");
        shard.audit(AuditEvent::connect(
            mesh,
            member,
            &entry.presence_id,
            &hello.session_id,
            hello.pid,
            entry.peer_role(),
        ));
        match claim {
            Claim::New(_) => shard.announce(mesh, entry, PeerEvent::Joined),
            Claim::Resumed { from_shard, .. } => {
                shard.metrics.session_resumed();
                shard.metrics.session_away_ended();
                shard.audit(AuditEvent::resume(
                    mesh,
                    member,
                    &entry.presence_id,
                    &entry.session_id,
                    false,
                ));
                shard.send_to(
                    *from_shard,
                    ShardEvent::Resumed {
                        mesh: mesh.clone(),
                        entry: entry.clone(),
                    },
                );
                shard.announce(mesh, entry, PeerEvent::Returned);
            }
            Claim::Moved { was_live, .. } => {
                match was_live {
                    true => shard.metrics.session_replaced(),
                    false => shard.metrics.session_resumed(),
                }
                shard.audit(AuditEvent::resume(
                    mesh,
                    member,
                    &entry.presence_id,
                    &entry.session_id,
                    *was_live,
                ));
                if !was_live {
                    shard.announce(mesh, entry, PeerEvent::Returned);
                }
            }
            Claim::Replaced {
                shard: at, conn, ..
            } => {
                shard.metrics.session_replaced();
                shard.audit(AuditEvent::resume(
                    mesh,
                    member,
                    &entry.presence_id,
                    &entry.session_id,
                    true,
                ));
                shard.send_to(*at, ShardEvent::Replaced { conn: *conn });
            }
        }
        // Inference runs before held envelopes are released; its
        // answer drains them. Without a reader, drain now. On several
        // nodes another node may hold the member's envelopes: it hands
        // them over once this node's part says the session takes them,
        // which waits for the inference too.
        let window = shard.ctx.config.hook_fresh_window;
        let held_here = !member.held.is_empty() || entry.held_len() != 0;
        let infer = (held_here || shard.ctx.cluster.is_some())
            && self.link.status().inference_allowed(Instant::now(), window)
            && shard.request_inference(self.conn, &joined.cwd);
        if infer {
            self.link.start_inference();
            shard.routes.borrow().status_changed(mesh, member);
        } else {
            shard.drain_held_to(mesh, member, &self.link);
        }
        self.joined = Some(joined);
    }

    /// PROTOCOL.md §4 hello checks, then the session: a new one (if the
    /// mesh has room), or the member's session with this `sessionId`
    /// taken over (§9), then registration.
    async fn admit(&mut self, hello: &OwnedHello) -> Result<(Joined, Claim), ProtocolError> {
        let stale = || {
            ProtocolError::new(
                ErrorCode::StaleTimestamp,
                "timestamp is more than 60 s from the broker's clock",
            )
        };
        // abs_diff: a client's timestamp can be anything, and `now - i64::MIN`
        // overflowed (a panic that took the shard and the process down).
        let fresh = now_millis().abs_diff(hello.timestamp) <= MAX_CLOCK_SKEW_MS;
        match &hello.session {
            None => {
                fresh.then_some(()).ok_or_else(stale)?;
                verify_signature(hello)?;
            }
            // The §9 order: attestation, its keys, its expiry, the session
            // signature, then the clock.
            Some(session) => {
                verify_session(hello, session, now_millis())?;
                fresh.then_some(()).ok_or_else(stale)?;
            }
        }
        let ctx = self.shard.ctx.clone();
        let unauthorized = || {
            ProtocolError::new(
                ErrorCode::Unauthorized,
                "not a current member of this mesh with this key",
            )
        };
        let holder = Holder::Live {
            shard: self.shard.index,
            conn: self.conn,
        };
        let now = Instant::now();
        let mut moved = None;
        let (mesh, member, claim) = loop {
            let mesh = ctx
                .directory_lookup(&hello.mesh_id, &hello.member_id, &hello.pubkey)
                .await
                .map_err(|_| {
                    ProtocolError::new(
                        ErrorCode::Unavailable,
                        "membership is unavailable (database down)",
                    )
                })?
                .ok_or_else(unauthorized)?;
            let member = match &hello.session {
                None => mesh
                    .view()
                    .member(&hello.member_id)
                    // A member banned a moment ago is refused before any refresh.
                    .filter(|m| m.pubkey.eq_ignore_ascii_case(&hello.pubkey) && !m.is_revoked())
                    .cloned()
                    .ok_or_else(unauthorized)?,
                // A session's parent is found by its key, then its id checked.
                Some(_) => {
                    let member = mesh
                        .view()
                        .member_by_pubkey(&hello.pubkey)
                        .filter(|m| !m.is_revoked())
                        .cloned()
                        .ok_or_else(unauthorized)?;
                    if *member.id != *hello.member_id {
                        return Err(ProtocolError::new(
                            ErrorCode::ParentMemberIdMismatch,
                            "parentMemberPubkey belongs to a member with another id",
                        ));
                    }
                    member
                }
            };
            self.await_other_nodes(&mesh).await;
            let session_key = hello.session_key();
            if moved.is_none() && !member.sessions.has(&hello.session_id, session_key) {
                moved = self.take_from_other_node(&mesh, &member, hello).await;
            }
            // A session taken over counted on its node already.
            let max = match moved {
                Some(_) => u32::MAX,
                None => ctx.config.max_connections_per_mesh,
            };
            let claimed =
                MemberSessions::claim(&member, &hello.session_id, session_key, holder, || {
                    match mesh.try_admit(max) {
                        Admission::Admitted => Ok(match &moved {
                            Some(moved) => self.moved_session(hello, moved, now),
                            None => self.new_session(hello, &member, now),
                        }),
                        Admission::Full => Err(Some(ProtocolError::new(
                            ErrorCode::Capacity,
                            "mesh is at MAX_CONNECTIONS_PER_MESH",
                        ))),
                        // Evicted while we looked: the next lookup loads it afresh.
                        Admission::Evicted => Err(None),
                    }
                });
            match claimed {
                Ok(Claim::New(entry)) if moved.is_some() => {
                    let was_live = moved.as_ref().is_some_and(|m| m.was_live);
                    break (mesh, member, Claim::Moved { entry, was_live });
                }
                Ok(claim) => break (mesh, member, claim),
                Err(Some(refused)) => return Err(refused),
                Err(None) => continue,
            }
        };
        if ctx.config.fault_panic_session_id.as_deref() == Some(hello.session_id.as_str()) {
            panic!("fault injection: BROKER_FAULT_PANIC_SESSION_ID");
        }
        let entry = claim.entry();
        if let Claim::New(entry) | Claim::Moved { entry, .. } = &claim {
            mesh.session_keys.insert(entry);
        }
        if let (false, Some(name)) = (matches!(claim, Claim::New(_)), &hello.display_name) {
            entry.set_display_name(name.as_str().into());
        }
        self.link
            .joined(&mesh, entry, hello.capabilities.peer_events);
        if hello.capabilities.client_ack {
            mesh.leasing.add();
            member.leasing.add();
            self.link.lease_pushes(
                ctx.config.client_ack_max_leases,
                ctx.config.client_ack_max_lease_bytes,
            );
        }
        self.shard
            .routes
            .borrow_mut()
            .add(&mesh, &member, self.link.clone());
        self.shard.board_add(&mesh, entry);
        ctx.hooks.insert(
            hello.pid,
            &hello.cwd,
            HookTarget {
                shard: self.shard.index,
                conn: self.conn,
                presence_id: entry.presence_id.clone(),
            },
            now_millis().max(0) as u64,
        );
        let status = entry.state().status;
        let open = || DbCommand::PresenceOpen {
            id: entry.presence_id.clone(),
            member_id: member.id.clone(),
            session_id: hello.session_id.clone(),
            pid: hello.pid,
            cwd: hello.cwd.clone(),
            session_pubkey: entry.session_pubkey.clone(),
            status: status.status,
            source: status.source,
            at: SystemTime::now(),
        };
        // A presence taken over keeps its row (still open: a session in
        // grace has not ended); one taken over from another node is this
        // node's now (the ping sets the row's node_id), and is written
        // here first if its node died before writing it (an existing row
        // is left as it is).
        let ping = || DbCommand::PresencePing {
            id: entry.presence_id.to_string(),
            at: SystemTime::now(),
        };
        match claim {
            Claim::New(_) => self.shard.to_db(open()),
            Claim::Moved { .. } => {
                self.shard.to_db(open());
                self.shard.to_db(ping());
            }
            Claim::Resumed { .. } | Claim::Replaced { .. } => self.shard.to_db(ping()),
        }
        let joined = Joined {
            mesh,
            member,
            entry: entry.clone(),
            cwd: hello.cwd.clone(),
        };
        Ok((joined, claim))
    }

    /// A new session's presence: its id, and its first status (a hook that
    /// came before the session did, so it holds accordingly from its first
    /// envelope, or idle).
    fn new_session(&self, hello: &OwnedHello, member: &MemberEntry, now: Instant) -> NewSession {
        let status = match self
            .shard
            .ctx
            .hooks
            .take_pending(hello.pid, &hello.cwd, now)
        {
            Some((status, at)) => StatusState::with(status, Source::Hook, at),
            None => StatusState::new(now),
        };
        NewSession {
            summary: None,
            presence_id: self.shard.ids.borrow_mut().next_id().into(),
            session_pubkey: hello.session_key().map(Into::into),
            pid: hello.pid,
            cwd: hello.cwd.as_str().into(),
            connected_at: self.shard.clock.borrow_mut().now_rfc3339().into(),
            display_name: hello.display_name_or(&member.display_name()),
            status,
        }
    }
}

impl Session {
    /// On several nodes, the first hello of a mesh this node does not
    /// follow yet waits (once, `FIRST_PARTS_WAIT`) for the other nodes'
    /// parts of it, so that it counts and may take over their sessions.
    async fn await_other_nodes(&self, mesh: &Arc<MeshEntry>) {
        let Some(cluster) = &self.shard.ctx.cluster else {
            return;
        };
        if mesh.synced.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let mesh = mesh.clone();
        if cluster.send(BusCommand::Follow { mesh, reply }).is_ok() {
            let _ = answer.await;
        }
    }

    /// A hello whose session another node lists (README "Several nodes"):
    /// that node gives it up and says what it brings. `None`: no node
    /// lists it, or it ended there meanwhile, or no answer in time.
    async fn take_from_other_node(
        &self,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        hello: &OwnedHello,
    ) -> Option<MovedSession> {
        let cluster = self.shard.ctx.cluster.as_ref()?;
        let session_key = hello.session_key();
        let hash = crate::mesh::identity::session_hash(&hello.session_id);
        // A dead node's session in its grace: taken over from its listing.
        if let Some(stranded) = mesh.remote.stranded.take(member, hash, session_key) {
            return Some(MovedSession::from_stranded(&stranded));
        }
        let (slot, presence) = mesh.remote.presence_of(member, hash, session_key)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let asked = cluster.send(BusCommand::Take {
            mesh: mesh.clone(),
            member: member.clone(),
            slot,
            presence,
            session_id: hello.session_id.clone(),
            session_key: session_key.map(str::to_owned),
            reply,
        });
        if asked.is_err() {
            return None;
        }
        answer.await.ok().flatten()
    }

    /// The session taken over from another node, as it was there.
    fn moved_session(&self, hello: &OwnedHello, moved: &MovedSession, now: Instant) -> NewSession {
        let status = match (
            crate::hook::Status::parse(&moved.status),
            Source::parse(&moved.source),
        ) {
            (Some(status), Some(source)) => {
                let age = std::time::Duration::from_millis(moved.status_age_ms);
                StatusState::with(status, source, now.checked_sub(age).unwrap_or(now))
            }
            _ => StatusState::new(now),
        };
        NewSession {
            presence_id: moved.presence_id.as_str().into(),
            session_pubkey: hello.session_key().map(Into::into),
            pid: hello.pid,
            cwd: hello.cwd.as_str().into(),
            connected_at: moved.connected_at.as_str().into(),
            display_name: hello.display_name_or(&moved.display_name),
            status,
            summary: moved.summary.as_deref().map(Into::into),
        }
    }
}

fn verify_signature(hello: &OwnedHello) -> Result<(), ProtocolError> {
    let signed = protocol::hello_signed_text(
        &hello.mesh_id,
        &hello.member_id,
        &hello.pubkey,
        hello.timestamp,
    );
    verifies(&hello.pubkey, &hello.signature, &signed)
        .then_some(())
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadSignature,
                "signature does not verify for this pubkey",
            )
        })
}

/// The two-stage proof of a `session_hello` (PROTOCOL.md §9), in the
/// contract's order; membership and capacity come after, as for `hello`.
/// Each value is signed as the client wrote it (hex case included).
fn verify_session(hello: &OwnedHello, s: &SessionProof, now: i64) -> Result<(), ProtocolError> {
    let refuse = |code, message: &'static str| Err(ProtocolError::new(code, message));
    let attested =
        protocol::session_attest_text(&s.attested_parent, &s.attested_session, s.expires_at);
    if !verifies(&s.attested_parent, &s.attestation_signature, &attested) {
        return refuse(
            ErrorCode::BadSignature,
            "parentAttestation.signature does not verify for its parentMemberPubkey",
        );
    }
    if !s.attested_parent.eq_ignore_ascii_case(&hello.pubkey)
        || !s.attested_session.eq_ignore_ascii_case(&s.session_pubkey)
    {
        return refuse(
            ErrorCode::AttestationMismatch,
            "parentAttestation names other keys than this session_hello",
        );
    }
    if s.expires_at <= now {
        return refuse(ErrorCode::Expired, "parentAttestation has expired");
    }
    if s.expires_at.saturating_sub(now) > MAX_ATTESTATION_MS {
        return refuse(
            ErrorCode::TtlTooLong,
            "parentAttestation expiresAt is more than 24 h ahead",
        );
    }
    let signed = protocol::session_hello_signed_text(
        &hello.mesh_id,
        &hello.pubkey,
        &s.signed_session,
        hello.timestamp,
    );
    if !verifies(&s.signed_session, &hello.signature, &signed) {
        return refuse(
            ErrorCode::BadSignature,
            "signature does not verify for this sessionPubkey",
        );
    }
    Ok(())
}

/// Whether `signature` (hex) is ed25519 by `pubkey` (hex) over `message`.
fn verifies(pubkey: &str, signature: &str, message: &str) -> bool {
    let mut key = [0u8; 32];
    let mut sig = [0u8; 64];
    if decode_hex(pubkey, &mut key).is_none() || decode_hex(signature, &mut sig).is_none() {
        return false;
    }
    VerifyingKey::from_bytes(&key).is_ok_and(|key| {
        key.verify_strict(message.as_bytes(), &Signature::from_bytes(&sig))
            .is_ok()
    })
}

fn decode_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(())
}

/// A refused hello must close 1008 even when a field is malformed.
pub(super) fn looks_like_hello(data: &[u8]) -> bool {
    let mut copy = data.to_vec();
    simd_json::to_borrowed_value(&mut copy)
        .ok()
        .and_then(|v| {
            use simd_json::prelude::*;
            v.get_str("type")
                .map(|t| t == "hello" || t == "session_hello")
        })
        .unwrap_or(false)
}

/// A hello detached from the scratch buffer, so the session can await a
/// directory load without holding a borrow of it.
pub(super) struct OwnedHello {
    mesh_id: String,
    member_id: String,
    pubkey: String,
    session_id: String,
    pid: i32,
    cwd: String,
    timestamp: i64,
    signature: String,
    display_name: Option<String>,
    groups: Vec<(GroupName, Option<String>)>,
    capabilities: Capabilities,
    req_id: Option<String>,
    /// A `session_hello`'s own part; `member_id` and `pubkey` above are
    /// then its parent's, `signature` the session key's.
    session: Option<Box<SessionProof>>,
}

/// What a `session_hello` adds to a hello.
struct SessionProof {
    /// Lowercase: the session's identity in the directory.
    session_pubkey: String,
    /// As written: the session signature is checked over it.
    signed_session: String,
    attested_session: String,
    attested_parent: String,
    expires_at: i64,
    attestation_signature: String,
}

impl OwnedHello {
    /// A `session_hello`'s own key (lowercase).
    fn session_key(&self) -> Option<&str> {
        self.session.as_ref().map(|s| s.session_pubkey.as_str())
    }

    /// The name it gives, else `fallback`.
    fn display_name_or(&self, fallback: &str) -> Arc<str> {
        self.display_name.as_deref().unwrap_or(fallback).into()
    }

    pub(super) fn from_session(hello: SessionHello<'_>, req_id: Option<&str>) -> Self {
        let attestation = hello.attestation;
        let proof = SessionProof {
            session_pubkey: hello.session_pubkey.to_ascii_lowercase(),
            signed_session: hello.session_pubkey.into_owned(),
            attested_session: attestation.session_pubkey.into_owned(),
            attested_parent: attestation.parent_member_pubkey.into_owned(),
            expires_at: attestation.expires_at,
            attestation_signature: attestation.signature.into_owned(),
        };
        OwnedHello {
            session: Some(Box::new(proof)),
            ..OwnedHello::new(hello.hello, req_id)
        }
    }

    pub(super) fn new(hello: Hello<'_>, req_id: Option<&str>) -> Self {
        OwnedHello {
            mesh_id: hello.mesh_id.into_owned(),
            member_id: hello.member_id.into_owned(),
            pubkey: hello.pubkey.into_owned(),
            session_id: hello.session_id.into_owned(),
            pid: hello.pid,
            cwd: hello.cwd.into_owned(),
            timestamp: hello.timestamp,
            signature: hello.signature.into_owned(),
            display_name: hello.display_name.map(|n| n.into_owned()),
            groups: hello
                .groups
                .into_iter()
                .map(|g| (g.name, g.role.map(|r| r.into_owned())))
                .collect(),
            capabilities: hello.capabilities,
            req_id: req_id.map(str::to_owned),
            session: None,
        }
    }
}
