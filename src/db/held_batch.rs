//! One durable-lane batch as one transaction: `BEGIN`, one multi-row
//! statement per kind (column arrays through `UNNEST`, as in `batch`) and
//! `COMMIT`, sent back to back so the batch costs one round trip. The
//! statements run in an order that keeps rows consistent inside a batch:
//! rows before the member rows that reference them, holds before the marks
//! of what they hold, marks before the roll-up of broadcast rows, and
//! expiries last. Each is idempotent, so a batch retried after a timeout
//! whose outcome is unknown changes nothing twice.
use std::borrow::Cow;
use std::time::SystemTime;

use tokio_postgres::{Client, Statement};

use super::held::HeldCommand;
use crate::mesh::{Envelope, EnvelopeTarget};

macro_rules! insert_rows_sql {
    ($filter:literal) => {
        concat!(
            "INSERT INTO mesh.message_queue (id, mesh_id, sender_member_id, target_spec, priority,
  nonce, ciphertext, created_at, expires_at, client_message_id, held_by)
SELECT t.id, t.mesh_id, t.sender, t.target_spec, t.priority::mesh.message_priority, t.nonce,
  t.ciphertext, t.created_at, t.expires_at, t.client_message_id,
  current_setting('meshbroker.node_id', true)
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
  $8::timestamp[], $9::timestamp[], $10::text[])
  AS t(id, mesh_id, sender, target_spec, priority, nonce, ciphertext, created_at, expires_at,
    client_message_id)
",
            $filter,
            "ON CONFLICT (id) DO NOTHING"
        )
    };
}

const INSERT_ROWS_SQL: &str = insert_rows_sql!("");

/// The same, skipping rows whose mesh or sender is gone (deleted while
/// they waited): the fallback for a batch refused for its foreign keys,
/// so rows that can never be written cost one statement, not one each.
const INSERT_ROWS_CHECKED_SQL: &str = insert_rows_sql!(
    "WHERE EXISTS (SELECT 1 FROM mesh.mesh m WHERE m.id = t.mesh_id)
  AND EXISTS (SELECT 1 FROM mesh.member s WHERE s.id = t.sender)
"
);

/// Broadcast holds: who each is held for. A member held again after the
/// row was rolled up as delivered reopens it.
macro_rules! insert_members_sql {
    ($filter:literal) => {
        concat!(
            "WITH added AS (
  INSERT INTO mesh.message_delivery (message_id, member_id)
  SELECT * FROM UNNEST($1::text[], $2::text[]) AS t(message_id, member_id)
",
            $filter,
            "  ON CONFLICT DO NOTHING
  RETURNING message_id
)
UPDATE mesh.message_queue q SET delivered_at = NULL
WHERE q.id IN (SELECT message_id FROM added) AND q.delivered_at IS NOT NULL"
        )
    };
}

const INSERT_MEMBERS_SQL: &str = insert_members_sql!("");

/// The same for rows whose message row was skipped (see above).
const INSERT_MEMBERS_CHECKED_SQL: &str = insert_members_sql!(
    "  WHERE EXISTS (SELECT 1 FROM mesh.message_queue q WHERE q.id = t.message_id)
"
);

const MARK_DIRECT_SQL: &str = "\
UPDATE mesh.message_queue q SET delivered_at = t.at
FROM UNNEST($1::text[], $2::timestamp[]) AS t(id, at)
WHERE q.id = t.id AND q.delivered_at IS NULL";

/// Broadcast deliveries, then the rows every member they were held for
/// now has. (The outer statement sees `message_delivery` as it was before
/// the CTE's update: pending rows not marked just now are the ones left.)
const MARK_MEMBERS_SQL: &str = "\
WITH marked AS (
  UPDATE mesh.message_delivery d SET delivered_at = t.at
  FROM UNNEST($1::text[], $2::text[], $3::timestamp[]) AS t(message_id, member_id, at)
  WHERE d.message_id = t.message_id AND d.member_id = t.member_id AND d.delivered_at IS NULL
  RETURNING d.message_id, d.member_id, d.delivered_at
)
UPDATE mesh.message_queue q SET delivered_at = m.at
FROM (SELECT message_id, max(delivered_at) AS at FROM marked GROUP BY message_id) m
WHERE q.id = m.message_id AND q.delivered_at IS NULL
  AND NOT EXISTS (
    SELECT 1 FROM mesh.message_delivery d
    WHERE d.message_id = q.id AND d.delivered_at IS NULL
      AND NOT EXISTS (
        SELECT 1 FROM marked x WHERE x.message_id = d.message_id AND x.member_id = d.member_id
      )
  )";

/// Direct rows handed over to this node become its own.
const ADOPT_SQL: &str = "\
UPDATE mesh.message_queue SET held_by = current_setting('meshbroker.node_id', true)
WHERE id = ANY($1::text[]) AND delivered_at IS NULL";

/// Expired envelopes go, with their member rows (ON DELETE CASCADE).
const EXPIRE_SQL: &str = "\
DELETE FROM mesh.message_queue WHERE id = ANY($1::text[]) AND delivered_at IS NULL";

pub(crate) struct HeldStatements {
    insert_rows: Statement,
    insert_members: Statement,
    insert_rows_checked: Statement,
    insert_members_checked: Statement,
    mark_direct: Statement,
    mark_members: Statement,
    expire: Statement,
    adopt: Statement,
}

impl HeldStatements {
    pub(crate) async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            insert_rows: client.prepare(INSERT_ROWS_SQL).await?,
            insert_members: client.prepare(INSERT_MEMBERS_SQL).await?,
            insert_rows_checked: client.prepare(INSERT_ROWS_CHECKED_SQL).await?,
            insert_members_checked: client.prepare(INSERT_MEMBERS_CHECKED_SQL).await?,
            mark_direct: client.prepare(MARK_DIRECT_SQL).await?,
            mark_members: client.prepare(MARK_MEMBERS_SQL).await?,
            expire: client.prepare(EXPIRE_SQL).await?,
            adopt: client.prepare(ADOPT_SQL).await?,
        })
    }
}

/// A nonce or ciphertext as the client sent it: the frame holds it
/// JSON-escaped, which base64 text never needs.
fn unescaped(json: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(json) {
        Ok(text) if !json.contains(&b'\\') => Cow::Borrowed(text),
        _ => {
            let mut quoted = Vec::with_capacity(json.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(json);
            quoted.push(b'"');
            // The broker wrote these bytes as a JSON string itself.
            Cow::Owned(serde_json::from_slice(&quoted).unwrap_or_default())
        }
    }
}

/// Column arrays for one batch, borrowing from its commands.
#[derive(Default)]
struct HeldRows<'a> {
    id: Vec<&'a str>,
    mesh_id: Vec<&'a str>,
    sender: Vec<&'a str>,
    target_spec: Vec<&'a str>,
    priority: Vec<&'static str>,
    nonce: Vec<Cow<'a, str>>,
    ciphertext: Vec<Cow<'a, str>>,
    created_at: Vec<SystemTime>,
    expires_at: Vec<SystemTime>,
    client_message_id: Vec<Option<&'a str>>,
    member_message: Vec<&'a str>,
    member_id: Vec<&'a str>,
    direct_id: Vec<&'a str>,
    direct_at: Vec<SystemTime>,
    marked_message: Vec<&'a str>,
    marked_member: Vec<&'a str>,
    marked_at: Vec<SystemTime>,
    expired: Vec<&'a str>,
    adopted: Vec<&'a str>,
}

fn is_broadcast(envelope: &Envelope) -> bool {
    matches!(envelope.target, EnvelopeTarget::Many(_))
}

impl<'a> HeldRows<'a> {
    fn push(&mut self, command: &'a HeldCommand) {
        match command {
            HeldCommand::Hold {
                envelope, members, ..
            } => {
                self.id.push(&envelope.message_id);
                self.mesh_id.push(&envelope.mesh.id);
                self.sender.push(&envelope.sender.id);
                self.target_spec.push(envelope.target.spec());
                self.priority.push(envelope.priority.as_str());
                self.nonce.push(unescaped(envelope.nonce_json()));
                self.ciphertext.push(unescaped(envelope.ciphertext_json()));
                self.created_at.push(envelope.created_at);
                self.expires_at.push(envelope.expires_at);
                self.client_message_id
                    .push(envelope.client_message_id.as_deref());
                if is_broadcast(envelope) {
                    for member in members {
                        self.member_message.push(&envelope.message_id);
                        self.member_id.push(&member.id);
                    }
                }
            }
            HeldCommand::Delivered {
                envelope,
                member,
                at,
            } => {
                if is_broadcast(envelope) {
                    self.marked_message.push(&envelope.message_id);
                    self.marked_member.push(&member.id);
                    self.marked_at.push(*at);
                } else {
                    self.direct_id.push(&envelope.message_id);
                    self.direct_at.push(*at);
                }
            }
            HeldCommand::Expired { envelope } => self.expired.push(&envelope.message_id),
            HeldCommand::Adopt { envelope } if !is_broadcast(envelope) => {
                self.adopted.push(&envelope.message_id)
            }
            HeldCommand::Adopt { .. } => {}
        }
    }
}

/// Whether a batch's inserts skip rows that can no longer be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inserts {
    Plain,
    Checked,
}

/// Writes one batch in one transaction (see the module doc).
pub(crate) async fn write_held_batch(
    client: &Client,
    statements: &HeldStatements,
    commands: &[&HeldCommand],
    inserts: Inserts,
) -> Result<(), tokio_postgres::Error> {
    let (insert_rows_statement, insert_members_statement) = match inserts {
        Inserts::Plain => (&statements.insert_rows, &statements.insert_members),
        Inserts::Checked => (
            &statements.insert_rows_checked,
            &statements.insert_members_checked,
        ),
    };
    let mut rows = HeldRows::default();
    for command in commands {
        rows.push(command);
    }
    let r = &rows;
    let skip = || async { Ok::<u64, tokio_postgres::Error>(0) };
    let insert_rows = async {
        if r.id.is_empty() {
            return skip().await;
        }
        client
            .execute(
                insert_rows_statement,
                &[
                    &r.id,
                    &r.mesh_id,
                    &r.sender,
                    &r.target_spec,
                    &r.priority,
                    &r.nonce,
                    &r.ciphertext,
                    &r.created_at,
                    &r.expires_at,
                    &r.client_message_id,
                ],
            )
            .await
    };
    let insert_members = async {
        if r.member_id.is_empty() {
            return skip().await;
        }
        client
            .execute(insert_members_statement, &[&r.member_message, &r.member_id])
            .await
    };
    let mark_direct = async {
        if r.direct_id.is_empty() {
            return skip().await;
        }
        client
            .execute(&statements.mark_direct, &[&r.direct_id, &r.direct_at])
            .await
    };
    let mark_members = async {
        if r.marked_member.is_empty() {
            return skip().await;
        }
        client
            .execute(
                &statements.mark_members,
                &[&r.marked_message, &r.marked_member, &r.marked_at],
            )
            .await
    };
    let expire = async {
        if r.expired.is_empty() {
            return skip().await;
        }
        client.execute(&statements.expire, &[&r.expired]).await
    };
    let adopt = async {
        if r.adopted.is_empty() {
            return skip().await;
        }
        client.execute(&statements.adopt, &[&r.adopted]).await
    };
    // try_join! polls in order, so the requests go out back to back; a
    // failing statement aborts the transaction and COMMIT then rolls back.
    tokio::try_join!(
        client.batch_execute("BEGIN"),
        insert_rows,
        insert_members,
        mark_direct,
        mark_members,
        expire,
        adopt,
        client.batch_execute("COMMIT"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_hold_json_escapes_and_rows_get_the_text() {
        assert!(matches!(unescaped(b"YWJj+/="), Cow::Borrowed("YWJj+/=")));
        assert_eq!(unescaped(br#"a\"b\\c\u0001"#), "a\"b\\c\u{1}");
    }
}
