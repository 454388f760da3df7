//! Turning a batch of `DbCommand`s into as few statements as possible, and
//! writing it.
//!
//! Each command kind maps to one prepared multi-row statement that takes
//! its rows as column arrays (`INSERT … SELECT … FROM UNNEST($1::text[], …)`),
//! so a batch of up to `BATCH_MAX` commands of one kind is one Bind/Execute,
//! one round trip, and atomic by itself. Inserts carry the row id and use
//! `ON CONFLICT (id) DO NOTHING`, so a batch that is retried after a timeout
//! whose outcome is unknown cannot write a row twice.
//!
//! Adding a kind: a field in `Statements` (prepared once per connection),
//! a `…Rows` column set in `BatchRows`, an arm in `BatchRows::push`, and a
//! step in `write_batch`. When a batch holds several kinds, `write_batch`
//! must keep them atomic and in one round trip: send `BEGIN`, the
//! statements and `COMMIT` pipelined (`tokio::try_join!` polls its futures
//! in order, so tokio-postgres writes them back to back); statements run in
//! a fixed order per kind (e.g. presence inserts before presence updates),
//! and within a kind in arrival order. Commands that expect an answer
//! (lookups with a reply channel) are not rows: run their query after the
//! batch's writes and send the result (or the error) on the channel.

use std::collections::HashMap;
use std::time::SystemTime;

use tokio_postgres::{Client, Statement};

use super::{DbCommand, PendingStatus};

/// `pending_status.status_source` for a stashed hook signal.
const HOOK_SOURCE: &str = "hook";

pub(crate) const STASH_PENDING_STATUS_SQL: &str = "\
INSERT INTO mesh.pending_status (id, pid, cwd, status, status_source, created_at)
SELECT t.id, t.pid, t.cwd, t.status, $6, t.created_at
FROM UNNEST($1::text[], $2::integer[], $3::text[], $4::text[], $5::timestamp[])
  AS t(id, pid, cwd, status, created_at)
ON CONFLICT (id) DO NOTHING";

pub(crate) const PRESENCE_OPEN_SQL: &str = "\
INSERT INTO mesh.presence (id, member_id, session_id, pid, cwd, status, status_source,
  status_updated_at, connected_at, last_ping_at, session_pubkey, node_id)
SELECT t.id, t.member_id, t.session_id, t.pid, t.cwd, t.status::mesh.presence_status,
  t.source::mesh.presence_status_source, t.at, t.at, t.at, t.session_pubkey,
  current_setting('meshbroker.node_id', true)
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::integer[], $5::text[], $6::timestamp[],
  $7::text[], $8::text[], $9::text[])
  AS t(id, member_id, session_id, pid, cwd, at, status, source, session_pubkey)
ON CONFLICT (id) DO NOTHING";

pub(crate) const PRESENCE_STATUS_SQL: &str = "\
UPDATE mesh.presence p SET status = t.status::mesh.presence_status,
  status_source = t.source::mesh.presence_status_source, status_updated_at = t.at
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamp[]) AS t(id, status, source, at)
WHERE p.id = t.id";

pub(crate) const PRESENCE_PING_SQL: &str = "\
UPDATE mesh.presence p SET last_ping_at = t.at,
  node_id = current_setting('meshbroker.node_id', true)
FROM UNNEST($1::text[], $2::timestamp[]) AS t(id, at)
WHERE p.id = t.id";

pub(crate) const PRESENCE_CLOSE_SQL: &str = "\
UPDATE mesh.presence p SET disconnected_at = t.at
FROM UNNEST($1::text[], $2::timestamp[]) AS t(id, at)
WHERE p.id = t.id AND p.disconnected_at IS NULL";

pub(crate) const MEMBER_SEEN_SQL: &str = "\
UPDATE mesh.member m SET last_seen_at = t.at
FROM UNNEST($1::text[], $2::timestamp[]) AS t(id, at)
WHERE m.id = t.id";

/// Group joins: new rows, or a new role for a group the member is in
/// (`joined_at` stays). Joins for a member row that is gone are skipped
/// rather than refused by the foreign key, so they cannot cost the batch a
/// retry one command at a time. A member deleted while this runs (after
/// the check, before the key is checked) still gets the batch refused: the
/// per-command retry then skips the join, except in a batch of that one
/// command, which is dropped and counted like any refused command (no row
/// could be written anyway). Each `(member_id, name)` appears
/// at most once: an `ON CONFLICT DO UPDATE` may not touch a row twice.
pub(crate) const GROUP_JOIN_SQL: &str = "\
INSERT INTO mesh.member_group (member_id, name, role, joined_at)
SELECT t.member_id, t.name, t.role, t.at
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamp[]) AS t(member_id, name, role, at)
WHERE EXISTS (SELECT 1 FROM mesh.member m WHERE m.id = t.member_id)
ON CONFLICT (member_id, name) DO UPDATE SET role = EXCLUDED.role";

pub(crate) const GROUP_LEAVE_SQL: &str = "\
DELETE FROM mesh.member_group g
USING UNNEST($1::text[], $2::text[]) AS t(member_id, name)
WHERE g.member_id = t.member_id AND g.name = t.name";

/// The writer's statements, prepared once per connection.
pub(crate) struct Statements {
    stash_pending_status: Statement,
    presence_open: Statement,
    presence_status: Statement,
    presence_ping: Statement,
    presence_close: Statement,
    member_seen: Statement,
    group_join: Statement,
    group_leave: Statement,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            stash_pending_status: client.prepare(STASH_PENDING_STATUS_SQL).await?,
            presence_open: client.prepare(PRESENCE_OPEN_SQL).await?,
            presence_status: client.prepare(PRESENCE_STATUS_SQL).await?,
            presence_ping: client.prepare(PRESENCE_PING_SQL).await?,
            presence_close: client.prepare(PRESENCE_CLOSE_SQL).await?,
            member_seen: client.prepare(MEMBER_SEEN_SQL).await?,
            group_join: client.prepare(GROUP_JOIN_SQL).await?,
            group_leave: client.prepare(GROUP_LEAVE_SQL).await?,
        })
    }
}

/// Column arrays for new `mesh.presence` rows.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PresenceOpenRows<'a> {
    pub id: Vec<&'a str>,
    pub member_id: Vec<&'a str>,
    pub session_id: Vec<&'a str>,
    pub pid: Vec<i32>,
    pub cwd: Vec<&'a str>,
    pub at: Vec<SystemTime>,
    pub status: Vec<&'static str>,
    pub source: Vec<&'static str>,
    pub session_pubkey: Vec<Option<&'a str>>,
}

/// Column arrays for status updates: one row per presence, its last
/// status in the batch (an `UPDATE … FROM` applies one row per target).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PresenceStatusRows<'a> {
    pub id: Vec<&'a str>,
    pub status: Vec<&'static str>,
    pub source: Vec<&'static str>,
    pub at: Vec<SystemTime>,
}

impl<'a> PresenceStatusRows<'a> {
    fn push(&mut self, id: &'a str, status: &'static str, source: &'static str, at: SystemTime) {
        if let Some(i) = self.id.iter().position(|known| *known == id) {
            (self.status[i], self.source[i], self.at[i]) = (status, source, at);
            return;
        }
        self.id.push(id);
        self.status.push(status);
        self.source.push(source);
        self.at.push(at);
    }
}

/// `(id, at)` pairs as two column arrays, for the timestamp updates.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct IdTimes<'a> {
    pub id: Vec<&'a str>,
    pub at: Vec<SystemTime>,
}

impl<'a> IdTimes<'a> {
    fn push(&mut self, id: &'a str, at: SystemTime) {
        self.id.push(id);
        self.at.push(at);
    }
}

/// Column arrays for `mesh.pending_status` rows.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PendingStatusRows<'a> {
    pub id: Vec<&'a str>,
    pub pid: Vec<i32>,
    pub cwd: Vec<&'a str>,
    pub status: Vec<&'a str>,
    pub created_at: Vec<SystemTime>,
}

/// One group change: the last one per `(member_id, name)` in the batch.
#[derive(Debug, PartialEq)]
struct GroupChange<'a> {
    role: Option<&'a str>,
    joined: bool,
    at: SystemTime,
}

/// Group joins and leaves, one per `(member_id, name)`: a later command for
/// the same pair replaces the earlier one, so join → leave → join ends
/// joined and join → leave ends left. Kept in first-seen order.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct GroupRows<'a> {
    keys: Vec<(&'a str, &'a str)>,
    changes: Vec<GroupChange<'a>>,
    index: HashMap<(&'a str, &'a str), usize>,
}

/// Column arrays for the group upsert.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct GroupJoinRows<'a> {
    pub member_id: Vec<&'a str>,
    pub name: Vec<&'a str>,
    pub role: Vec<Option<&'a str>>,
    pub at: Vec<SystemTime>,
}

/// Column arrays for the group delete.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct GroupLeaveRows<'a> {
    pub member_id: Vec<&'a str>,
    pub name: Vec<&'a str>,
}

impl<'a> GroupRows<'a> {
    fn push(&mut self, member_id: &'a str, name: &'a str, change: GroupChange<'a>) {
        let key = (member_id, name);
        match self.index.get(&key) {
            Some(&i) => self.changes[i] = change,
            None => {
                self.index.insert(key, self.keys.len());
                self.keys.push(key);
                self.changes.push(change);
            }
        }
    }

    /// The pairs whose last command is a join, and those whose last is a
    /// leave.
    pub(crate) fn split(&self) -> (GroupJoinRows<'a>, GroupLeaveRows<'a>) {
        let mut joins = GroupJoinRows::default();
        let mut leaves = GroupLeaveRows::default();
        for (&(member_id, name), change) in self.keys.iter().zip(&self.changes) {
            if change.joined {
                joins.member_id.push(member_id);
                joins.name.push(name);
                joins.role.push(change.role);
                joins.at.push(change.at);
            } else {
                leaves.member_id.push(member_id);
                leaves.name.push(name);
            }
        }
        (joins, leaves)
    }
}

/// A batch split by kind into column arrays, borrowing from the commands.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct BatchRows<'a> {
    pub pending_status: PendingStatusRows<'a>,
    pub presence_open: PresenceOpenRows<'a>,
    pub presence_status: PresenceStatusRows<'a>,
    pub presence_ping: IdTimes<'a>,
    pub presence_close: IdTimes<'a>,
    pub member_seen: IdTimes<'a>,
    pub groups: GroupRows<'a>,
}

impl<'a> BatchRows<'a> {
    pub(crate) fn from_commands(cmds: &'a [DbCommand]) -> Self {
        let mut rows = Self::default();
        for cmd in cmds {
            rows.push(cmd);
        }
        rows
    }

    fn push(&mut self, cmd: &'a DbCommand) {
        match cmd {
            DbCommand::StashPendingStatus(p) => self.push_pending_status(p),
            DbCommand::PresenceOpen {
                id,
                member_id,
                session_id,
                pid,
                cwd,
                session_pubkey,
                status,
                source,
                at,
            } => {
                let rows = &mut self.presence_open;
                rows.session_pubkey.push(session_pubkey.as_deref());
                rows.id.push(id);
                rows.member_id.push(member_id);
                rows.session_id.push(session_id);
                rows.pid.push(*pid);
                rows.cwd.push(cwd);
                rows.at.push(*at);
                rows.status.push(status.as_str());
                rows.source.push(source.as_str());
            }
            DbCommand::PresenceStatus {
                id,
                status,
                source,
                at,
            } => self
                .presence_status
                .push(id, status.as_str(), source.as_str(), *at),
            DbCommand::PresencePing { id, at } => self.presence_ping.push(id, *at),
            DbCommand::PresenceClose { id, member_id, at } => {
                self.presence_close.push(id, *at);
                self.member_seen.push(member_id, *at);
            }
            DbCommand::GroupMembership {
                member_id,
                name,
                role,
                joined,
                at,
            } => self.groups.push(
                member_id,
                name,
                GroupChange {
                    role: role.as_deref(),
                    joined: *joined,
                    at: *at,
                },
            ),
        }
    }

    fn push_pending_status(&mut self, p: &'a PendingStatus) {
        let rows = &mut self.pending_status;
        rows.id.push(&p.id);
        // pending_status.pid is `integer NOT NULL` in the deployed schema,
        // but the hook may omit pid: store 0 (never a real process id) and
        // match it back the same way.
        rows.pid.push(p.pid.unwrap_or(0));
        rows.cwd.push(&p.cwd);
        rows.status.push(&p.status);
        rows.created_at.push(p.created_at);
    }
}

/// Writes one batch in one transaction: `BEGIN`, one statement per kind
/// present, in the order that keeps a session's rows consistent (open
/// before status before ping before close; then group joins and leaves,
/// whose pairs are disjoint), and `COMMIT`, sent back to
/// back so the batch costs one round trip. Each statement is idempotent, so
/// a batch retried after a timeout whose outcome is unknown is harmless.
pub(crate) async fn write_batch(
    client: &Client,
    statements: &Statements,
    cmds: &[DbCommand],
) -> Result<(), tokio_postgres::Error> {
    let rows = BatchRows::from_commands(cmds);
    let skip = || async { Ok::<u64, tokio_postgres::Error>(0) };
    let ps = &rows.pending_status;
    let stash = async {
        if ps.id.is_empty() {
            return skip().await;
        }
        client
            .execute(
                &statements.stash_pending_status,
                &[
                    &ps.id,
                    &ps.pid,
                    &ps.cwd,
                    &ps.status,
                    &ps.created_at,
                    &HOOK_SOURCE,
                ],
            )
            .await
    };
    let open = &rows.presence_open;
    let presence_open = async {
        if open.id.is_empty() {
            return skip().await;
        }
        client
            .execute(
                &statements.presence_open,
                &[
                    &open.id,
                    &open.member_id,
                    &open.session_id,
                    &open.pid,
                    &open.cwd,
                    &open.at,
                    &open.status,
                    &open.source,
                    &open.session_pubkey,
                ],
            )
            .await
    };
    let status = &rows.presence_status;
    let presence_status = async {
        if status.id.is_empty() {
            return skip().await;
        }
        client
            .execute(
                &statements.presence_status,
                &[&status.id, &status.status, &status.source, &status.at],
            )
            .await
    };

    let (joins, leaves) = rows.groups.split();
    let group_join = async {
        if joins.member_id.is_empty() {
            return skip().await;
        }
        client
            .execute(
                &statements.group_join,
                &[&joins.member_id, &joins.name, &joins.role, &joins.at],
            )
            .await
    };
    let group_leave = async {
        if leaves.member_id.is_empty() {
            return skip().await;
        }
        client
            .execute(&statements.group_leave, &[&leaves.member_id, &leaves.name])
            .await
    };
    // try_join! polls in order, so the requests go out back to back; a
    // failing statement aborts the transaction and COMMIT then rolls back.
    tokio::try_join!(
        client.batch_execute("BEGIN"),
        stash,
        presence_open,
        presence_status,
        update_times(client, &statements.presence_ping, &rows.presence_ping),
        update_times(client, &statements.presence_close, &rows.presence_close),
        update_times(client, &statements.member_seen, &rows.member_seen),
        group_join,
        group_leave,
        client.batch_execute("COMMIT"),
    )?;
    Ok(())
}

/// One of the timestamp updates, with its `(id, at)` column pair; nothing
/// is sent when there are no rows.
async fn update_times(
    client: &Client,
    statement: &Statement,
    pairs: &IdTimes<'_>,
) -> Result<u64, tokio_postgres::Error> {
    if pairs.id.is_empty() {
        return Ok(0);
    }
    client.execute(statement, &[&pairs.id, &pairs.at]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stash(id: &str, pid: Option<i32>, cwd: &str, status: &str) -> DbCommand {
        DbCommand::StashPendingStatus(PendingStatus {
            id: id.to_owned(),
            pid,
            cwd: cwd.to_owned(),
            status: status.to_owned(),
            created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_200_000),
        })
    }

    #[test]
    fn pending_status_rows_are_columns_in_order_with_pid_zero_for_none() {
        let cmds = vec![
            stash("a", Some(42), "/x", "working"),
            stash("b", None, "/y", "idle"),
        ];
        let rows = BatchRows::from_commands(&cmds);
        let ps = &rows.pending_status;
        assert_eq!(ps.id, vec!["a", "b"]);
        assert_eq!(ps.pid, vec![42, 0]);
        assert_eq!(ps.cwd, vec!["/x", "/y"]);
        assert_eq!(ps.status, vec!["working", "idle"]);
        assert_eq!(ps.created_at.len(), 2);
    }

    fn group(member_id: &str, name: &str, role: Option<&str>, joined: bool, t: u64) -> DbCommand {
        DbCommand::GroupMembership {
            member_id: member_id.to_owned(),
            name: name.to_owned(),
            role: role.map(str::to_owned),
            joined,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(t),
        }
    }

    #[test]
    fn only_the_last_group_command_per_member_and_name_counts() {
        let at = |t| SystemTime::UNIX_EPOCH + Duration::from_secs(t);
        let cmds = vec![
            // join → leave → join: joined, with the last role and time.
            group("ada", "eng", Some("member"), true, 1),
            group("ada", "eng", None, false, 2),
            group("ada", "eng", Some("lead"), true, 3),
            // join → leave: left.
            group("ada", "ops", Some("x"), true, 4),
            group("ada", "ops", None, false, 5),
            // The same name for another member is another row.
            group("bob", "eng", None, true, 6),
            // leave → join: joined; a role change is a second join.
            group("bob", "ops", None, false, 7),
            group("bob", "ops", Some("a"), true, 8),
            group("bob", "ops", Some("b"), true, 9),
            // A leave alone.
            group("cy", "eng", None, false, 10),
        ];
        let rows = BatchRows::from_commands(&cmds);
        let (joins, leaves) = rows.groups.split();
        assert_eq!(joins.member_id, vec!["ada", "bob", "bob"]);
        assert_eq!(joins.name, vec!["eng", "eng", "ops"]);
        assert_eq!(joins.role, vec![Some("lead"), None, Some("b")]);
        assert_eq!(joins.at, vec![at(3), at(6), at(9)]);
        assert_eq!(leaves.member_id, vec!["ada", "cy"]);
        assert_eq!(leaves.name, vec!["ops", "eng"]);
        // Nothing else in the batch picked them up.
        assert_eq!(
            BatchRows {
                groups: GroupRows::default(),
                ..rows
            },
            BatchRows::default()
        );
    }

    #[test]
    fn group_pairs_are_matched_exactly() {
        // Names arrive normalized (`GroupName`); what differs is a new pair.
        let cmds = vec![
            group("ada", "eng", None, true, 1),
            group("ada", "eng/backend", None, false, 2),
            group("ad", "aeng", None, false, 3),
        ];
        let (joins, leaves) = BatchRows::from_commands(&cmds).groups.split();
        assert_eq!(joins.name, vec!["eng"]);
        assert_eq!(leaves.member_id, vec!["ada", "ad"]);
        assert_eq!(leaves.name, vec!["eng/backend", "aeng"]);
    }

    #[test]
    fn group_sql_upserts_keeping_joined_at_and_deletes_in_one_statement_each() {
        let join = GROUP_JOIN_SQL;
        assert!(
            join.starts_with("INSERT INTO mesh.member_group (member_id, name, role, joined_at)")
        );
        assert_eq!(join.matches("UNNEST(").count(), 1);
        assert!(join.ends_with("ON CONFLICT (member_id, name) DO UPDATE SET role = EXCLUDED.role"));
        assert!(!join.contains("joined_at ="));
        let leave = GROUP_LEAVE_SQL;
        assert!(leave.starts_with("DELETE FROM mesh.member_group"));
        assert_eq!(leave.matches("UNNEST(").count(), 1);
    }

    #[test]
    fn empty_batch_has_no_rows() {
        assert_eq!(BatchRows::from_commands(&[]), BatchRows::default());
    }

    #[test]
    fn stash_sql_is_one_idempotent_multi_row_insert() {
        let sql = STASH_PENDING_STATUS_SQL;
        assert!(sql.starts_with("INSERT INTO mesh.pending_status"));
        assert_eq!(sql.matches("UNNEST(").count(), 1);
        // One array parameter per column of the row.
        for p in [
            "$1::text[]",
            "$2::integer[]",
            "$3::text[]",
            "$4::text[]",
            "$5::timestamp[]",
        ] {
            assert!(sql.contains(p), "{p}");
        }
        assert!(sql.ends_with("ON CONFLICT (id) DO NOTHING"));
    }
}
