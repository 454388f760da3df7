//! The hello (PROTOCOL.md §4): timestamp, signature, membership and
//! capacity, then the session's admission: its first status (a stashed hook
//! signal, or idle), its place in the routing table and the hook index, its
//! presence row, and its held envelopes.
use super::{Joined, Session};
use crate::audit::AuditEvent;
use crate::db::DbCommand;
use crate::mesh::directory::Admission;
use crate::metrics::RejectReason;
use crate::protocol::{self, ErrorCode, Hello, ProtocolError};
use crate::shard::CloseReason;
use crate::status::hook_index::HookTarget;
use crate::status::{Source, StatusState};
use crate::ws::{self, OpCode};
use ed25519_dalek::{Signature, VerifyingKey};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Hello timestamps further than this from the broker's clock are stale.
const MAX_CLOCK_SKEW_MS: i64 = 60_000;

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
            ErrorCode::Unauthorized | ErrorCode::BadSignature | ErrorCode::StaleTimestamp => {
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
        match self.admit(&hello).await {
            Ok(joined) => {
                let mut json = Vec::with_capacity(128);
                protocol::write_hello_ack(
                    &mut json,
                    &protocol::HelloAck {
                        presence_id: &joined.presence_id,
                        mesh_id: &joined.mesh.id,
                        member_id: &joined.member.id,
                        member_display_name: "",
                        display_name: "",
                        groups: &[],
                        capabilities: Default::default(),
                        resumed: false,
                        req_id: None,
                    },
                );
                self.link
                    .reply(ws::encode_server_frame(OpCode::Text, &json), None);
                tracing::info!(target: "ws", peer = %self.peer, shard = self.shard.index, mesh = %joined.mesh.id,
                    member = %joined.member.id, presence = %joined.presence_id, session = %hello.session_id,
                    status = self.link.status().status.as_str(), "ws hello");
                self.shard.audit(AuditEvent::connect(
                    &joined.mesh,
                    &joined.member,
                    &joined.presence_id,
                    &hello.session_id,
                    hello.pid,
                ));
                // Inference runs before held envelopes are released; its
                // answer drains them. Without a reader, drain now.
                let window = self.shard.ctx.config.hook_fresh_window;
                let infer = !joined.member.held.is_empty()
                    && self.link.status().inference_allowed(Instant::now(), window)
                    && self.shard.request_inference(self.conn, &joined.cwd);
                if infer {
                    self.link.start_inference();
                    self.shard
                        .routes
                        .borrow()
                        .status_changed(&joined.mesh, &joined.member);
                } else {
                    self.shard
                        .drain_held_to(&joined.mesh, &joined.member, &self.link);
                }
                self.joined = Some(joined);
            }
            Err(e) => {
                // Audited only in a mesh the directory knows: the row's
                // mesh must exist, and an unknown one is anyone's guess.
                if let Some(mesh) = self.shard.ctx.directory.get(&hello.mesh_id) {
                    self.shard
                        .audit(AuditEvent::hello_refused(&mesh, &hello.member_id, e.code));
                }
                self.refuse_hello(e)
            }
        }
    }

    /// PROTOCOL.md §4 hello checks, then registration.
    async fn admit(&mut self, hello: &OwnedHello) -> Result<Joined, ProtocolError> {
        if (now_millis() - hello.timestamp).abs() > MAX_CLOCK_SKEW_MS {
            return Err(ProtocolError::new(
                ErrorCode::StaleTimestamp,
                "timestamp is more than 60 s from the broker's clock",
            ));
        }
        verify_signature(hello)?;
        let ctx = self.shard.ctx.clone();
        let unauthorized = || {
            ProtocolError::new(
                ErrorCode::Unauthorized,
                "not a current member of this mesh with this key",
            )
        };
        let (mesh, member) = loop {
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
            let member = mesh
                .view()
                .member(&hello.member_id)
                .filter(|m| m.pubkey.eq_ignore_ascii_case(&hello.pubkey))
                .cloned()
                .ok_or_else(unauthorized)?;
            match mesh.try_admit(ctx.config.max_connections_per_mesh) {
                Admission::Admitted => break (mesh, member),
                Admission::Full => {
                    return Err(ProtocolError::new(
                        ErrorCode::Capacity,
                        "mesh is at MAX_CONNECTIONS_PER_MESH",
                    ))
                }
                // Evicted while we looked: the next lookup loads it afresh.
                Admission::Evicted => continue,
            }
        };
        if ctx.config.fault_panic_session_id.as_deref() == Some(hello.session_id.as_str()) {
            panic!("fault injection: BROKER_FAULT_PANIC_SESSION_ID");
        }
        let presence_id = self.shard.ids.borrow_mut().next_id();
        // A hook that came before the session did sets its first status, so
        // it holds accordingly from its first envelope.
        let now = Instant::now();
        let status = match ctx.hooks.take_pending(hello.pid, &hello.cwd, now) {
            Some((status, at)) => StatusState::with(status, Source::Hook, at),
            None => StatusState::new(now),
        };
        self.link.joined(&mesh, &member, &presence_id, status);
        self.shard
            .routes
            .borrow_mut()
            .add(&mesh, &member, self.link.clone());
        ctx.hooks.insert(
            hello.pid,
            &hello.cwd,
            HookTarget {
                shard: self.shard.index,
                conn: self.conn,
                presence_id: presence_id.as_str().into(),
            },
        );
        self.shard.to_db(DbCommand::PresenceOpen {
            id: presence_id.clone(),
            member_id: member.id.to_string(),
            session_id: hello.session_id.clone(),
            pid: hello.pid,
            cwd: hello.cwd.clone(),
            status: status.status,
            source: status.source,
            at: SystemTime::now(),
        });
        Ok(Joined {
            mesh,
            member,
            presence_id,
            cwd: hello.cwd.clone(),
        })
    }
}

fn verify_signature(hello: &OwnedHello) -> Result<(), ProtocolError> {
    let bad = || {
        ProtocolError::new(
            ErrorCode::BadSignature,
            "signature does not verify for this pubkey",
        )
    };
    let mut key = [0u8; 32];
    let mut sig = [0u8; 64];
    decode_hex(&hello.pubkey, &mut key).ok_or_else(bad)?;
    decode_hex(&hello.signature, &mut sig).ok_or_else(bad)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| bad())?;
    let signed = format!(
        "{}|{}|{}|{}",
        hello.mesh_id, hello.member_id, hello.pubkey, hello.timestamp
    );
    key.verify_strict(signed.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| bad())
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
            v.get_str("type").map(|t| t == "hello")
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
}

impl From<Hello<'_>> for OwnedHello {
    fn from(hello: Hello<'_>) -> Self {
        OwnedHello {
            mesh_id: hello.mesh_id.into_owned(),
            member_id: hello.member_id.into_owned(),
            pubkey: hello.pubkey.into_owned(),
            session_id: hello.session_id.into_owned(),
            pid: hello.pid,
            cwd: hello.cwd.into_owned(),
            timestamp: hello.timestamp,
            signature: hello.signature.into_owned(),
        }
    }
}
