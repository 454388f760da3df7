//! The shard's side of the durable lane (`db::held`): what must reach
//! Postgres (holds, delivery marks, expiries) is gathered during a turn of
//! the loop and handed over in one batch by the flusher; an ack that must
//! wait for its hold's commit waits here, in sequence order, and goes out
//! when the shard's commit watermark passes it — the loop never waits.
use super::link::SessionLink;
use super::outbound::{Stamp, StampKind};
use super::state::Shard;
use crate::audit::AuditEvent;
use crate::db::held::{HeldBatch, HeldCommand};
use crate::mesh::deliver::give_back;
use crate::mesh::directory::MemberEntry;
use crate::mesh::{Envelope, HeldLate, Orphan};
use crate::protocol::{self, ErrorCode};
use crate::ws::{self, OpCode};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// A send's ack waiting for its hold to be committed.
struct WaitingAck {
    seq: u64,
    link: Rc<SessionLink>,
    id: Box<str>,
    req_id: Option<Box<str>>,
    envelope: Arc<Envelope>,
    read_at: Instant,
}

#[derive(Default)]
pub struct Durable {
    outbox: RefCell<Vec<HeldCommand>>,
    /// Sequence of the last hold an ack waits on.
    last_seq: Cell<u64>,
    acks: RefCell<VecDeque<WaitingAck>>,
}

impl Durable {
    pub(super) fn has_outbox(&self) -> bool {
        !self.outbox.borrow().is_empty()
    }
}

impl Shard {
    pub(super) fn to_lane(&self, command: HeldCommand) {
        self.durable.outbox.borrow_mut().push(command);
        self.wake_flusher();
    }

    /// A send held at planning for `members`: stored, and acked once the
    /// row is committed (or, with Postgres away, once the writer says so,
    /// with `"durable":false`).
    pub fn store_and_ack(
        &self,
        link: &Rc<SessionLink>,
        (id, req_id): (&str, Option<&str>),
        envelope: &Arc<Envelope>,
        members: Vec<Arc<MemberEntry>>,
        read_at: Instant,
    ) {
        let seq = self.durable.last_seq.get() + 1;
        self.durable.last_seq.set(seq);
        self.to_lane(HeldCommand::Hold {
            envelope: envelope.clone(),
            members,
            ack: seq,
        });
        self.durable.acks.borrow_mut().push_back(WaitingAck {
            seq,
            link: link.clone(),
            id: id.into(),
            req_id: req_id.map(Into::into),
            envelope: envelope.clone(),
            read_at,
        });
    }

    /// Envelopes that became held after their ack: stored too, their bytes
    /// forced into the budget (they cannot be refused any more).
    pub fn store_late(&self, late: Vec<HeldLate>) {
        let audited = self.audits("held");
        for (envelope, member) in late {
            if audited {
                self.audit(AuditEvent::held(&envelope, &member));
            }
            self.store_unawaited(envelope, member);
        }
    }

    /// An envelope leased to `member` that was never held: stored now, so
    /// a crash before the client ack delivers it again (PROTOCOL.md §11).
    pub(super) fn store_leased(&self, envelope: Arc<Envelope>, member: Arc<MemberEntry>) {
        envelope.hold_in_flight();
        self.store_unawaited(envelope, member);
    }

    /// A hold no ack waits for (its hold in flight already counted).
    fn store_unawaited(&self, envelope: Arc<Envelope>, member: Arc<MemberEntry>) {
        self.ctx.held.budget.force(envelope.frame.len());
        self.to_lane(HeldCommand::Hold {
            envelope,
            members: vec![member],
            ack: 0,
        });
    }

    /// What a session whose teardown is done had not written goes back to
    /// its member.
    pub fn give_back(&self, link: &SessionLink, orphans: Vec<Orphan>) {
        if orphans.is_empty() {
            return;
        }
        if let Some((mesh, member)) = link.member() {
            let left = give_back(&member, orphans);
            self.store_late(left.late);
            self.request_drain(&mesh, &member, left.drain);
        }
    }

    /// A held envelope was written to a session of `member` (or, leased,
    /// acked by one).
    pub fn mark_delivered(&self, envelope: Arc<Envelope>, member: &Arc<MemberEntry>) {
        member.redeliveries.remove(&envelope.message_id);
        if self.audits("deliver") {
            self.audit(AuditEvent::deliver(&envelope, member));
        }
        self.to_lane(HeldCommand::Delivered {
            envelope,
            member: member.clone(),
            at: SystemTime::now(),
        });
    }

    /// Held envelopes dropped unpushed, past their expiry, with the member
    /// each was held for.
    pub fn expired(&self, expired: Vec<HeldLate>) {
        if expired.is_empty() {
            return;
        }
        self.ctx.metrics.global().held_expired(expired.len() as u64);
        for (envelope, member) in expired {
            self.audit(AuditEvent::expired(&envelope, &member));
            self.to_lane(HeldCommand::Expired { envelope });
        }
    }

    /// The 15 s sweep: every expired held envelope goes (shard 0 sweeps
    /// the whole directory).
    pub(super) fn sweep_expired(&self) {
        self.expired(self.ctx.directory.expire_held(SystemTime::now()));
    }

    /// Hands what this turn gathered to the db writer.
    pub(super) fn flush_lane(&self) {
        let commands = std::mem::take(&mut *self.durable.outbox.borrow_mut());
        if !commands.is_empty() {
            self.ctx.held.submit(HeldBatch {
                shard: self.index,
                commands,
            });
        }
    }

    /// Sends the acks the db writer has answered.
    fn release_acks(&self, durable: u64, resolved: u64) {
        let commits = &self.ctx.held.commits[self.index];
        let mut acks = self.durable.acks.borrow_mut();
        while acks.front().is_some_and(|a| a.seq <= resolved) {
            let waiting = acks.pop_front().expect("front checked");
            if commits.take_refused(waiting.seq) {
                // Postgres refused the row for good: the send is refused,
                // rather than acked as something it is not.
                let mut error = Vec::with_capacity(128);
                protocol::write_error(
                    &mut error,
                    ErrorCode::Unavailable,
                    "the envelope could not be stored",
                    Some(&waiting.id),
                    waiting.req_id.as_deref(),
                );
                self.metrics
                    .message_rejected(ErrorCode::Unavailable.as_str());
                waiting
                    .link
                    .reply(ws::encode_server_frame(OpCode::Text, &error), None);
                continue;
            }
            let durable = (waiting.seq > durable).then_some(false);
            let stamp = Stamp {
                sent_at: waiting.read_at,
                priority: waiting.envelope.priority,
                kind: StampKind::Ack,
            };
            waiting.link.ack(
                &protocol::Ack {
                    id: &waiting.id,
                    message_id: &waiting.envelope.message_id,
                    durable,
                    duplicate: false,
                    req_id: waiting.req_id.as_deref(),
                },
                Some(stamp),
            );
        }
    }
}

/// Waits on this shard's commit watermark and sends the acks it releases.
pub(super) async fn ack_loop(shard: Rc<Shard>) {
    let commits = &shard.ctx.held.commits[shard.index];
    let mut seen = 0;
    loop {
        let (durable, resolved) = poll_fn(|cx| commits.poll_past(seen, cx)).await;
        seen = resolved;
        shard.release_acks(durable, resolved);
    }
}
