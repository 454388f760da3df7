//! A send (PROTOCOL.md §4): resolve the target, build the envelope with its
//! push frame serialized once, plan it, route it to the shards that may
//! take it, and ack.
use super::super::outbound::{Stamp, StampKind};
use super::Session;
use crate::audit::AuditEvent;
use crate::inbox::ShardEvent;
use crate::mesh::plan::{plan_broadcast, plan_direct, HoldLimits, Refused};
use crate::mesh::{Envelope, EnvelopeTarget, PushFrame};
use crate::protocol::{self, ErrorCode, ProtocolError, PushFields, Send, Target};
use crate::ws::{self, OpCode};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

impl Session {
    pub(super) fn process_send(&self, send: &Send<'_>, read_at: Instant) {
        let joined = self.joined.as_ref().expect("send after hello");
        let (priority, id) = (send.priority, &*send.id);
        let view = joined.mesh.view();
        // Resolve a direct target before doing any work for the send.
        let direct = match &send.target {
            Target::Member(pubkey) => match view.member_by_pubkey(pubkey) {
                Some(member) => Some(member),
                None => {
                    return self.reject(
                        &ProtocolError::new(
                            ErrorCode::UnknownTarget,
                            "targetSpec is not a current member of this mesh",
                        )
                        .with_id(Some(id)),
                    )
                }
            },
            Target::All => None,
            // Group sends are parsed but not routed yet: answered as before.
            Target::Group(_) => {
                return self.reject(
                    &ProtocolError::new(
                        ErrorCode::UnsupportedTarget,
                        "targetSpec must be a member pubkey or '*'",
                    )
                    .with_id(Some(id)),
                )
            }
            // The parser answers unsupported_target before a send gets here.
            Target::Unsupported => return,
        };
        let message_id = self.shard.ids.borrow_mut().next_id();
        let push = {
            let mut clock = self.shard.clock.borrow_mut();
            PushFrame::encode(&PushFields {
                message_id: &message_id,
                mesh_id: &joined.mesh.id,
                sender_pubkey: &joined.member.pubkey,
                target_spec: None,
                priority,
                nonce: &send.nonce,
                ciphertext: &send.ciphertext,
                created_at: clock.now_rfc3339(),
            })
        };
        let created_at = SystemTime::now();
        let envelope = Arc::new(Envelope {
            frame: push.frame,
            nonce: push.nonce,
            ciphertext: push.ciphertext,
            message_id: message_id.into_boxed_str(),
            mesh: joined.mesh.clone(),
            sender: joined.member.clone(),
            target: match direct {
                Some(member) => EnvelopeTarget::Member(member.clone()),
                None => EnvelopeTarget::All,
            },
            priority,
            created_at,
            expires_at: created_at + self.shard.ctx.config.held_ttl,
            sent_at: read_at,
            restored: false,
            holds_in_flight: Default::default(),
        });
        let limits = HoldLimits {
            max_per_member: self.shard.ctx.config.max_held_per_member,
            budget: &self.shard.ctx.held.budget,
        };
        let planned = match direct {
            Some(member) => plan_direct(&envelope, member, &limits),
            None => plan_broadcast(&envelope, &limits),
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err(refused) => {
                let message = match refused {
                    Refused::HeldFull => "a target's held queue is full",
                    Refused::Unavailable => "too much is waiting to be stored; try again shortly",
                };
                return self.reject(
                    &ProtocolError::new(ErrorCode::Unavailable, message).with_id(Some(id)),
                );
            }
        };
        let recipients = match direct {
            Some(_) => 1,
            None => view.members().len().saturating_sub(1) as u32,
        };
        if self.shard.audits("send") {
            self.shard.audit(AuditEvent::send(&envelope, recipients));
        }
        if self.shard.audits("held") {
            for (member, _) in &plan.held {
                self.shard.audit(AuditEvent::held(&envelope, member));
            }
        }
        self.shard.request_drains(&joined.mesh, &plan.held);
        let mut shards = plan.shards();
        if let Some(route) = plan.route {
            while shards != 0 {
                let dest = shards.trailing_zeros() as usize;
                shards &= shards - 1;
                self.shard.send_to(dest, ShardEvent::Route(route.clone()));
            }
        }
        self.shard.metrics.message_routed(priority);
        if !plan.held.is_empty() {
            // Held for someone: the ack waits for the row's commit.
            let members = plan.held.into_iter().map(|(member, _)| member).collect();
            self.shard
                .store_and_ack(&self.link, id, &envelope, members, read_at);
            return;
        }
        let mut ack = Vec::with_capacity(96);
        protocol::write_ack(&mut ack, id, &envelope.message_id, None, None);
        let stamp = Stamp {
            sent_at: read_at,
            priority,
            kind: StampKind::Ack,
        };
        self.link
            .reply(ws::encode_server_frame(OpCode::Text, &ack), Some(stamp));
    }
}
