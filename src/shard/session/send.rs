//! A send (PROTOCOL.md §4, §9–§10): the member's send rate, the target (a
//! member, everyone, or a group), the envelope with its push frame
//! serialized once, its plan, its route to the shards that may take it,
//! and the ack.
use super::super::outbound::{Stamp, StampKind};
use super::Session;
use crate::audit::AuditEvent;
use crate::cluster::{BusCommand, LOCAL};
use crate::inbox::PendingAck;
use crate::inbox::ShardEvent;
use crate::mesh::bucket::SendRate;
use crate::mesh::directory::{MemberEntry, MeshEntry, MeshView};
use crate::mesh::held::HeldLimit;
use crate::mesh::peers::KeyTarget;
use crate::mesh::plan::{plan_many, plan_to, shards_in, Audience, Direct, HoldLimits, Refused};
use crate::mesh::{Envelope, EnvelopeTarget, PushFrame};
use crate::protocol::{Ack, CloseReason, ErrorCode, ProtocolError, PushFields, Send, Target};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

impl Session {
    pub(super) fn process_send(&self, send: &Send<'_>, req_id: Option<&str>, read_at: Instant) {
        let joined = self.joined.as_ref().expect("send after hello");
        let (priority, id) = (send.priority, &*send.id);
        let refuse = |code, message| {
            self.reject(
                &ProtocolError::new(code, message)
                    .with_id(Some(id))
                    .with_req_id(req_id),
            )
        };
        let config = &self.shard.ctx.config;
        let rate = SendRate::new(config.send_rate_per_min, config.send_burst);
        if !joined.member.send_bucket.take(rate, read_at) {
            self.shard.metrics.send_rate_limited();
            refuse(
                ErrorCode::RateLimited,
                "this member is over SEND_RATE_PER_MIN (SEND_BURST at once)",
            );
            // A client that ignores the refusals is cut off rather than
            // parsed and refused forever.
            let in_a_row = self.rate_refusals.get() + 1;
            self.rate_refusals.set(in_a_row);
            if in_a_row >= config.rate_limit_close_after {
                self.link.close(CloseReason::RateLimited);
            }
            return;
        }
        self.rate_refusals.set(0);
        if let Some(cluster) = &self.shard.ctx.cluster {
            // Its sessions on other nodes share the budget.
            if joined.member.live_shards.get() & !LOCAL != 0 {
                let _ = cluster.send(BusCommand::Spent {
                    mesh: joined.mesh.clone(),
                    member: joined.member.clone(),
                });
            }
        }
        // What a client_ack session leases is stored as it is written: while
        // the rows not yet committed fill the held budget, a send that may
        // reach one is refused, so leases cannot outrun Postgres without
        // bound (sends that reach none are not affected).
        let budget = &self.shard.ctx.held.budget;
        let view = joined.mesh.view();
        // The target, resolved once: a direct one is a member's key, else a
        // session's (PROTOCOL.md §9).
        let resolved = match &send.target {
            Target::Member(pubkey) => match resolve_direct(&joined.mesh, &view, pubkey) {
                Some(direct) => Resolved::Direct(direct),
                None => Resolved::Unknown,
            },
            Target::All => Resolved::Many(Audience::All),
            Target::Group(name) => Resolved::Many(Audience::Group(name)),
            // The parser answers unsupported_target before a send gets here.
            Target::Unsupported => return,
        };
        let may_lease = match &resolved {
            Resolved::Direct(direct) => direct.member().leasing.any(),
            Resolved::Unknown => false,
            Resolved::Many(_) => joined.mesh.leasing.any(),
        };
        if may_lease && budget.is_full() {
            return refuse(
                ErrorCode::Unavailable,
                "too much is waiting to be stored; try again shortly",
            );
        }
        let message_id = self.shard.ids.borrow_mut().next_id();
        // A retry of a send accepted within the window is acked again with
        // the first send's id and not routed (PROTOCOL.md §11).
        let client_id = send.client_message_id.as_deref();
        if let Some(client_id) = client_id.filter(|_| !config.dedupe_window.is_zero()) {
            let claimed = joined.member.sent_ids.claim(
                client_id,
                &message_id,
                SystemTime::now(),
                config.dedupe_window,
            );
            if let Err(first) = claimed {
                self.shard.metrics.duplicate_send();
                return self.ack(
                    &Ack {
                        id,
                        message_id: &first,
                        durable: None,
                        duplicate: true,
                        req_id,
                    },
                    None,
                );
            }
        }
        // A refused send frees its client id for a retry.
        let refuse = |message_id: &str, code, message| {
            if let Some(client_id) = client_id {
                joined.member.sent_ids.release(client_id, message_id);
            }
            refuse(code, message)
        };
        // An unknown direct target is refused before any work for the send.
        let (direct, audience) = match resolved {
            Resolved::Direct(direct) => (Some(direct), Audience::All),
            Resolved::Unknown => {
                return refuse(
                    &message_id,
                    ErrorCode::UnknownTarget,
                    "targetSpec is not a current member or session of this mesh",
                )
            }
            Resolved::Many(audience) => (None, audience),
        };
        let push = {
            let mut clock = self.shard.clock.borrow_mut();
            PushFrame::encode(&PushFields {
                message_id: &message_id,
                mesh_id: &joined.mesh.id,
                sender_pubkey: joined.entry.sender_pubkey(),
                sender_member_pubkey: &joined.member.pubkey,
                target_spec: direct.is_none().then_some(&*send.target_spec),
                priority,
                client_message_id: client_id,
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
            target: match &direct {
                Some(direct) => EnvelopeTarget::Member(direct.member().clone()),
                None => EnvelopeTarget::Many(send.target_spec.as_ref().into()),
            },
            priority,
            created_at,
            expires_at: created_at + config.held_ttl,
            sent_at: read_at,
            restored: false,
            holds_in_flight: Default::default(),
            redelivered_frame: Default::default(),
            client_message_id: client_id.map(Into::into),
            session: match &direct {
                Some(Direct::Session(entry)) => Some(entry.clone()),
                _ => None,
            },
        });
        let limits = HoldLimits {
            max_per_member: config.max_held_per_member,
            max_bytes_per_member: config.max_held_bytes_per_member,
            budget: &self.shard.ctx.held.budget,
        };
        let planned = match &direct {
            Some(direct) => plan_to(&envelope, direct, &limits),
            None => plan_many(&envelope, audience, &limits),
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err(Refused::NobodyInGroup) => {
                return refuse(
                    &envelope.message_id,
                    ErrorCode::UnknownTarget,
                    "no member of that group but yours",
                )
            }
            Err(Refused::HeldFull(limit)) => {
                self.shard.metrics.held_refused(limit);
                let message = match limit {
                    HeldLimit::Count => "a target's held queue is full (MAX_HELD_PER_MEMBER)",
                    HeldLimit::Bytes => "a target's held queue is full (MAX_HELD_BYTES_PER_MEMBER)",
                };
                return refuse(&envelope.message_id, ErrorCode::Unavailable, message);
            }
            Err(Refused::Unavailable) => {
                return refuse(
                    &envelope.message_id,
                    ErrorCode::Unavailable,
                    "too much is waiting to be stored; try again shortly",
                )
            }
        };
        if let Audience::Group(_) = audience {
            self.shard.metrics.group_send();
        }
        if self.shard.audits("send") {
            let recipients = match (&direct, audience) {
                (Some(_), _) => 1,
                (None, Audience::All) => view.members().len().saturating_sub(1),
                (None, Audience::Group(group)) => view
                    .members()
                    .iter()
                    .filter(|m| !Arc::ptr_eq(m, &joined.member) && m.is_reached_by(group))
                    .count(),
            };
            self.shard
                .audit(AuditEvent::send(&envelope, recipients as u32));
        }
        if self.shard.audits("held") {
            for (member, _) in &plan.held {
                self.shard.audit(AuditEvent::held(&envelope, member));
            }
        }
        self.shard.request_drains(&joined.mesh, &plan.held);
        let remote = plan.shards() & !LOCAL;
        if let Some(route) = &plan.route {
            for dest in shards_in(plan.shards() & LOCAL) {
                self.shard.send_to(dest, ShardEvent::Route(route.clone()));
            }
        }
        self.shard.metrics.message_routed(priority);
        if let (Some(route), true) = (plan.route, remote != 0) {
            // Other nodes take part: the ack waits for their confirms.
            let ack = PendingAck {
                shard: self.shard.index,
                conn: self.conn,
                id: id.into(),
                req_id: req_id.map(Into::into),
                read_at,
                held: plan.held.into_iter().map(|(member, _)| member).collect(),
            };
            self.shard.cross(route, remote, ack);
            return;
        }
        if !plan.held.is_empty() {
            // Held for someone: the ack waits for the row's commit.
            let members = plan.held.into_iter().map(|(member, _)| member).collect();
            self.shard
                .store_and_ack(&self.link, (id, req_id), &envelope, members, read_at);
            return;
        }
        let stamp = Stamp {
            sent_at: read_at,
            priority,
            kind: StampKind::Ack,
        };
        self.ack(
            &Ack {
                id,
                message_id: &envelope.message_id,
                durable: None,
                duplicate: false,
                req_id,
            },
            Some(stamp),
        );
    }

    fn ack(&self, ack: &Ack<'_>, stamp: Option<Stamp>) {
        self.link.ack(ack, stamp);
    }
}

/// A send's target against the mesh's current view.
enum Resolved<'a, D> {
    /// A current member (or a session of one).
    Direct(D),
    /// A key that is neither.
    Unknown,
    /// Everyone, or a group.
    Many(Audience<'a>),
}

/// A direct send's target: a current member by its key, else a session by
/// its key — the session itself while it is live or away (here or on
/// another node), its member once it has ended (PROTOCOL.md §9). `None`:
/// nobody of this mesh.
fn resolve_direct(mesh: &MeshEntry, view: &MeshView, pubkey: &str) -> Option<Direct> {
    if let Some(member) = view.member_by_pubkey(pubkey) {
        return Some(Direct::Member(member.clone()));
    }
    let current = |member: &Arc<MemberEntry>| {
        view.member(&member.id)
            .is_some_and(|m| Arc::ptr_eq(m, member) && !m.is_revoked())
    };
    match mesh.session_keys.resolve(pubkey, &mesh.remote)? {
        KeyTarget::Session(entry) if current(&entry.member) => Some(Direct::Session(entry)),
        KeyTarget::Remote { member, slot } if current(&member) => Some(Direct::Remote {
            member,
            key: pubkey.to_ascii_lowercase().into(),
            node: crate::cluster::slot_bit(slot),
        }),
        KeyTarget::Member(member) if current(&member) => Some(Direct::Member(member)),
        _ => None,
    }
}
