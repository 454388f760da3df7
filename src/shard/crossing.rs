//! The shard's side of sends that cross to other nodes (README "Several
//! nodes"): a route naming remote bits goes to the bus with its ack, and
//! the ack is sent when the bus reports the nodes' confirms. What a node
//! did not confirm is held here first, for every target member that no
//! local shard and no confirming node may take, and the ack then waits
//! for its row like any held send's.
use super::outbound::{Stamp, StampKind};
use super::state::Shard;
use crate::audit::AuditEvent;
use crate::cluster::BusCommand;
use crate::db::held::HeldCommand;
use crate::inbox::PendingAck;
use crate::mesh::directory::MemberEntry;
use crate::mesh::plan::{key, Route, Targets};
use crate::protocol::Ack;
use std::sync::Arc;

impl Shard {
    /// Hands a route to the bus for the nodes in `remote`; with no bus, or
    /// its queue full, they count as not having confirmed.
    pub(super) fn cross(&self, route: Arc<Route>, remote: u64, ack: PendingAck) {
        let Some(cluster) = &self.ctx.cluster else {
            return self.confirmed(&route, ack, remote);
        };
        let command = BusCommand::Route {
            route,
            nodes: remote,
            ack: Some(ack),
        };
        if let Err(BusCommand::Route {
            route,
            ack: Some(ack),
            ..
        }) = cluster.send(command)
        {
            self.confirmed(&route, ack, remote);
        }
    }

    /// The nodes a send went to answered (or the deadline passed).
    pub(super) fn confirmed(&self, route: &Route, ack: PendingAck, missing: u64) {
        let envelope = &route.envelope;
        let mut members = ack.held;
        if missing != 0 {
            let extra = self.hold_missing(route, missing);
            if !extra.is_empty() {
                if members.is_empty() {
                    // Not held at its plan: its bytes and its hold count now.
                    self.ctx.held.budget.force(envelope.frame.len());
                    envelope.hold_in_flight();
                }
                if self.audits("held") {
                    for member in &extra {
                        self.audit(AuditEvent::held(envelope, member));
                    }
                }
                members.extend(extra);
            }
        }
        let Some(link) = self.session_of(ack.conn) else {
            // The sender left: nobody waits for the ack, the rows still go.
            if !members.is_empty() {
                self.to_lane(HeldCommand::Hold {
                    envelope: envelope.clone(),
                    members,
                    ack: 0,
                });
            }
            return;
        };
        if !members.is_empty() {
            let id = (&*ack.id, ack.req_id.as_deref());
            return self.store_and_ack(&link, id, envelope, members, ack.read_at);
        }
        let stamp = Stamp {
            sent_at: ack.read_at,
            priority: envelope.priority,
            kind: StampKind::Ack,
        };
        link.ack(
            &Ack {
                id: &ack.id,
                message_id: &envelope.message_id,
                durable: None,
                duplicate: false,
                req_id: ack.req_id.as_deref(),
            },
            Some(stamp),
        );
    }

    /// Holds the envelope for each target member with no taker left: no
    /// local shard and no node but the missing ones may take it (so none
    /// may drain it now: it waits for the member's next arrival or status).
    fn hold_missing(&self, route: &Route, missing: u64) -> Vec<Arc<MemberEntry>> {
        let envelope = &route.envelope;
        let priority = envelope.priority;
        let uncovered = |m: &MemberEntry| m.shards_for(priority) & !missing == 0;
        let view = envelope.mesh.view();
        let targets: Vec<Arc<MemberEntry>> = match &route.targets {
            Targets::Member(member) => vec![member.clone()],
            // A session's key is routed to its own shard only.
            Targets::Session(_) => Vec::new(),
            // Its node did not take it: the session is gone (or that node
            // is): its member's, whichever session takes it.
            Targets::RemoteSession { member, .. } => {
                let now_eligible = member.hold(envelope.clone());
                self.request_drain(&envelope.mesh, member, now_eligible);
                return vec![member.clone()];
            }
            Targets::AllBut { held_for } => view
                .members()
                .iter()
                .filter(|m| {
                    !Arc::ptr_eq(m, &envelope.sender) && held_for.binary_search(&key(m)).is_err()
                })
                .cloned()
                .collect(),
            Targets::Listed { members } => view
                .members()
                .iter()
                .filter(|m| members.binary_search(&key(m)).is_ok())
                .cloned()
                .collect(),
        };
        targets
            .into_iter()
            .filter(|m| uncovered(m))
            .inspect(|m| {
                m.hold(envelope.clone());
            })
            .collect()
    }
}
