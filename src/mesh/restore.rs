//! Putting back the held envelopes Postgres kept (an earlier run's, or the
//! old claudemesh broker's) into their members' held queues, where they go
//! before anything sent in this run.
use super::directory::{MemberEntry, MeshEntry};
use super::{Envelope, EnvelopeTarget, PushFrame};
use crate::protocol::{Priority, PushFields};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Whom a stored row is still for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredTarget {
    /// A direct row: its `target_spec`, the member's pubkey.
    Member(String),
    /// A `*` or group row (`spec`, as written): the ids of the members that
    /// have not got it yet.
    Members { spec: String, ids: Vec<String> },
}

/// One undelivered, unexpired `mesh.message_queue` row.
#[derive(Debug, Clone)]
pub struct StoredEnvelope {
    pub id: String,
    pub sender_member_id: String,
    pub sender_pubkey: String,
    pub target: StoredTarget,
    pub priority: Priority,
    pub nonce: String,
    pub ciphertext: String,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    /// The sender's `client_message_id`: it keeps deduplicating the
    /// sender's retries across the restart (PROTOCOL.md §11).
    pub client_message_id: Option<String>,
}

/// Holds a stored row for each member it is still for (the mesh's current
/// members; one revoked since gets nothing). Returns how many members it
/// was held for.
pub fn restore(mesh: &Arc<MeshEntry>, row: StoredEnvelope) -> usize {
    let view = mesh.view();
    let members: Vec<Arc<MemberEntry>> = match &row.target {
        StoredTarget::Member(pubkey) => {
            view.member_by_pubkey(pubkey).cloned().into_iter().collect()
        }
        StoredTarget::Members { ids, .. } => ids
            .iter()
            .filter_map(|id| view.member(id).cloned())
            .collect(),
    };
    if members.is_empty() {
        return 0;
    }
    let sender = view
        .member(&row.sender_member_id)
        .cloned()
        .unwrap_or_else(|| MemberEntry::former(&row.sender_member_id, &row.sender_pubkey));
    let created = humantime::format_rfc3339_millis(row.created_at).to_string();
    let push = PushFrame::encode(&PushFields {
        message_id: &row.id,
        mesh_id: &mesh.id,
        // The sending session's key is not stored: after a restart a held
        // envelope carries its member's key in both fields.
        sender_pubkey: &sender.pubkey,
        sender_member_pubkey: &sender.pubkey,
        target_spec: match &row.target {
            StoredTarget::Member(_) => None,
            StoredTarget::Members { spec, .. } => Some(spec),
        },
        priority: row.priority,
        client_message_id: row.client_message_id.as_deref(),
        nonce: &row.nonce,
        ciphertext: &row.ciphertext,
        created_at: &created,
    });
    let envelope = Arc::new(Envelope {
        message_id: row.id.into_boxed_str(),
        mesh: mesh.clone(),
        sender,
        target: match row.target {
            StoredTarget::Member(_) => EnvelopeTarget::Member(members[0].clone()),
            StoredTarget::Members { spec, .. } => EnvelopeTarget::Many(spec.into()),
        },
        priority: row.priority,
        created_at: row.created_at,
        expires_at: row.expires_at,
        frame: push.frame,
        nonce: push.nonce,
        ciphertext: push.ciphertext,
        sent_at: Instant::now(),
        restored: true,
        holds_in_flight: Default::default(),
        redelivered_frame: Default::default(),
        client_message_id: row.client_message_id.map(Into::into),
        session: None,
    });
    if let Some(client_id) = &envelope.client_message_id {
        envelope
            .sender
            .sent_ids
            .remember(client_id, &envelope.message_id, envelope.created_at);
    }
    for member in &members {
        member.held.hand_back(vec![envelope.clone()]);
    }
    members.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};
    use std::time::Duration;

    fn row(id: &str) -> MemberRow {
        MemberRow {
            id: id.into(),
            peer_pubkey: format!("{id}-key"),
            revoked: false,
            ..MemberRow::default()
        }
    }

    fn stored(id: &str, target: StoredTarget, age_secs: u64) -> StoredEnvelope {
        let created_at = SystemTime::now() - Duration::from_secs(age_secs);
        StoredEnvelope {
            id: id.into(),
            sender_member_id: "gone".into(),
            sender_pubkey: "gone-key".into(),
            target,
            priority: Priority::Next,
            nonce: "n\"1".into(),
            ciphertext: "c1".into(),
            created_at,
            expires_at: created_at + Duration::from_secs(3600),
            client_message_id: None,
        }
    }

    #[test]
    fn rows_go_to_their_members_before_this_runs_envelopes() {
        let dir = Directory::default();
        let mesh = dir.install("m", &[row("a"), row("b"), row("c")]);
        let (a, b) = (
            mesh.view().member("a").unwrap().clone(),
            mesh.view().member("b").unwrap().clone(),
        );
        // Loaded newest first on purpose: the queue sorts by creation.
        let n = restore(
            &mesh,
            stored(
                "new",
                StoredTarget::Members {
                    spec: "*".into(),
                    ids: vec!["a".into(), "b".into(), "x".into()],
                },
                10,
            ),
        );
        assert_eq!(n, 2, "a member that no longer exists gets nothing");
        assert_eq!(
            restore(
                &mesh,
                stored("old", StoredTarget::Member("a-key".into()), 20)
            ),
            1
        );
        assert_eq!(
            restore(
                &mesh,
                stored("revoked", StoredTarget::Member("zz".into()), 5)
            ),
            0
        );
        assert_eq!((a.held.len(), b.held.len()), (2, 1));
        let mut expired = Vec::new();
        let first = a.held.take_next(SystemTime::now(), &mut expired, |_| {
            crate::mesh::held::Take::Yes
        });
        let first = first.unwrap();
        assert_eq!(&*first.message_id, "old");
        assert!(first.restored);
        // A sender that is no longer a member still signs the push.
        let frame = String::from_utf8_lossy(&first.frame).into_owned();
        assert!(frame.contains("\"senderPubkey\":\"gone-key\""), "{frame}");
        assert_eq!(first.nonce_json(), b"n\\\"1");
    }
}
