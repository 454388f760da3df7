//! A send (PROTOCOL.md §4): resolve the target, build the envelope with its
//! push frame serialized once, plan it, route it to the shards that may
//! take it, and ack.
use super::super::outbound::{Stamp, StampKind};
use super::Session;
use crate::inbox::ShardEvent;
use crate::mesh::plan::{plan_broadcast, plan_direct};
use crate::mesh::{Envelope, EnvelopeTarget};
use crate::protocol::{self, ErrorCode, ProtocolError, PushFields, Send, Target};
use crate::ws::{self, OpCode};
use std::ops::Range;
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
                    return self.send_error(
                        &ProtocolError::new(
                            ErrorCode::UnknownTarget,
                            "targetSpec is not a current member of this mesh",
                        )
                        .with_id(Some(id)),
                    )
                }
            },
            Target::All => None,
            // The parser answers unsupported_target before a send gets here.
            Target::Unsupported => return,
        };
        let message_id = self.shard.ids.borrow_mut().next_id();
        let (frame, nonce, ciphertext) = self.push_frame(send, &message_id);
        let created_at = SystemTime::now();
        let envelope = Arc::new(Envelope {
            frame,
            nonce,
            ciphertext,
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
        });
        let max_held = self.shard.ctx.config.max_held_per_member;
        let planned = match direct {
            Some(member) => plan_direct(&envelope, member, max_held),
            None => plan_broadcast(&envelope, max_held),
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err(_) => {
                return self.send_error(
                    &ProtocolError::new(ErrorCode::Unavailable, "a target's held queue is full")
                        .with_id(Some(id)),
                )
            }
        };
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
        let mut ack = Vec::with_capacity(96);
        protocol::write_ack(&mut ack, id, &envelope.message_id, None);
        let stamp = Stamp {
            sent_at: read_at,
            priority,
            kind: StampKind::Ack,
        };
        self.link
            .reply(ws::encode_server_frame(OpCode::Text, &ack), Some(stamp));
    }

    /// The push frame, serialized once straight into its WebSocket frame,
    /// with where its nonce and ciphertext sit in it.
    fn push_frame(
        &self,
        send: &Send<'_>,
        message_id: &str,
    ) -> (bytes::Bytes, Range<u32>, Range<u32>) {
        let joined = self.joined.as_ref().expect("send after hello");
        let mut clock = self.shard.clock.borrow_mut();
        let mut frame = Vec::with_capacity(
            ws::SERVER_HEADER_ROOM + 200 + send.nonce.len() + send.ciphertext.len(),
        );
        frame.resize(ws::SERVER_HEADER_ROOM, 0);
        let ranges = protocol::write_push(
            &mut frame,
            &PushFields {
                message_id,
                mesh_id: &joined.mesh.id,
                sender_pubkey: &joined.member.pubkey,
                priority: send.priority,
                nonce: &send.nonce,
                ciphertext: &send.ciphertext,
                created_at: clock.now_rfc3339(),
            },
        );
        let written = frame.len();
        let frame = ws::finish_server_frame(frame, OpCode::Text);
        // The header took the tail of the reserved room: offsets shift.
        let shift = written - frame.len();
        let place = |r: Range<usize>| (r.start - shift) as u32..(r.end - shift) as u32;
        (frame, place(ranges.nonce), place(ranges.ciphertext))
    }
}
