//! The shard's side of acknowledged delivery (PROTOCOL.md §11): leases
//! opened as pushes are written to its `client_ack` sessions, their timers,
//! client acks, and what lapses (time up, or the session gone) going back
//! to the member's held queue to be pushed again.
//!
//! Every lease of a shard runs for the same `CLIENT_ACK_TIMEOUT_SECONDS`
//! from its write, so its deadlines come in order: one FIFO and one task
//! sleeping until the oldest is the whole timer, and a lapse is acted on at
//! its time, not at the next unrelated event.
use super::link::SessionLink;
use super::state::Shard;
use crate::audit::AuditEvent;
use crate::mesh::directory::{MemberEntry, MeshEntry};
use crate::mesh::lease::Opened;
use crate::mesh::Envelope;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

/// A lease's deadline, and what to look up when it passes.
struct Deadline {
    at: Instant,
    mesh: Arc<MeshEntry>,
    member: Arc<MemberEntry>,
    message_id: Box<str>,
    token: u64,
}

/// This shard's lease deadlines, oldest first.
#[derive(Default)]
pub(super) struct LeaseTimers {
    deadlines: RefCell<VecDeque<Deadline>>,
    waker: Cell<Option<Waker>>,
}

impl Shard {
    /// A push was written to `link`, a `client_ack` session: it is leased
    /// to the member until acked. A new lease is stored (if its envelope
    /// was not held already, with nothing waiting on the write) and its
    /// timer starts.
    pub(super) fn lease(
        &self,
        link: &SessionLink,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        envelope: Arc<Envelope>,
        stored: bool,
    ) {
        let opened = member.leases.open(&envelope, (self.index, link.conn));
        if let Some(bound) = link.leases().as_mut() {
            bound
                .held
                .add(&envelope.message_id, opened.token(), envelope.frame.len());
        }
        let Opened::New(token) = opened else {
            return;
        };
        self.metrics.lease_opened(envelope.frame.len());
        if !stored {
            self.store_leased(envelope.clone(), member.clone());
        }
        let timers = &self.leases;
        timers.deadlines.borrow_mut().push_back(Deadline {
            at: Instant::now() + self.ctx.config.client_ack_timeout,
            mesh: mesh.clone(),
            member: member.clone(),
            message_id: envelope.message_id.clone(),
            token,
        });
        if let Some(waker) = timers.waker.take() {
            waker.wake();
        }
    }

    /// `client_ack` from a session of `member`: each id leased to the
    /// member is done (marked delivered); any other id is ignored.
    pub(super) fn client_ack(
        &self,
        link: &SessionLink,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
        ids: &[impl AsRef<str>],
    ) {
        for id in ids {
            let id = id.as_ref();
            let Some(envelope) = member.leases.ack(id) else {
                continue;
            };
            if let Some(bound) = link.leases().as_mut() {
                bound.held.forget(id);
            }
            self.metrics.lease_acked();
            self.metrics.lease_closed(envelope.frame.len());
            if self.audits("client_ack") {
                self.audit(AuditEvent::client_ack(mesh, member, id));
            }
            self.mark_delivered(envelope, member);
        }
    }

    /// A `client_ack` session is gone: what it alone held lapses.
    pub(super) fn release_leases(
        &self,
        link: &SessionLink,
        mesh: &Arc<MeshEntry>,
        member: &Arc<MemberEntry>,
    ) {
        let held = match link.leases().as_mut() {
            Some(bound) if !bound.held.is_empty() => bound.held.take(),
            _ => return,
        };
        let lapsed = member.leases.release((self.index, link.conn), &held);
        self.lapse(mesh, member, lapsed);
    }

    /// Leases that lapsed go back to their member's held queue, in their
    /// creation-order place, marked to be pushed again as `redelivered`;
    /// a shard with a session of the member drains them.
    fn lapse(&self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>, lapsed: Vec<Arc<Envelope>>) {
        if lapsed.is_empty() {
            return;
        }
        let audited = self.audits("redelivered");
        for envelope in &lapsed {
            self.metrics.lease_expired();
            self.metrics.redelivered();
            self.metrics.lease_closed(envelope.frame.len());
            member.redeliveries.add(&envelope.message_id);
            if audited {
                self.audit(AuditEvent::redelivered(envelope, member));
            }
        }
        member.held.hand_back(lapsed);
        self.request_drain(mesh, member, member.live_shards.get());
    }

    /// Lapses the leases whose time is up.
    fn expire_leases(&self, now: Instant) {
        loop {
            let deadline = {
                let mut deadlines = self.leases.deadlines.borrow_mut();
                match deadlines.front() {
                    Some(d) if d.at <= now => deadlines.pop_front().expect("front"),
                    _ => return,
                }
            };
            if let Some(envelope) = deadline
                .member
                .leases
                .expire(&deadline.message_id, deadline.token)
            {
                self.lapse(&deadline.mesh, &deadline.member, vec![envelope]);
            }
        }
    }

    fn next_lease_deadline(&self) -> Option<Instant> {
        self.leases.deadlines.borrow().front().map(|d| d.at)
    }
}

/// Sleeps until the oldest lease deadline, lapses what is due, and again.
pub(super) async fn lease_loop(shard: Rc<Shard>) {
    loop {
        let next = poll_fn(|cx| match shard.next_lease_deadline() {
            Some(at) => Poll::Ready(at),
            None => {
                shard.leases.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        let wait = next.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            monoio::time::sleep(wait).await;
        }
        shard.expire_leases(Instant::now());
    }
}
