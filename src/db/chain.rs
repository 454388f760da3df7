//! The audit chain (PROTOCOL.md §13): each mesh's `mesh.audit_log` rows
//! form one hash chain, so a row changed, removed or slipped in afterwards
//! shows.
//!
//! - **The formula.** A row's `hash` is the lowercase hex SHA-256 of
//!   `prev_hash|mesh_id|event_type|actor_peer_id|target_peer_id|metadata|created_at`
//!   ([`entry_hash`]): `metadata` as canonical JSON (keys sorted bytewise at
//!   every level, arrays in order, no whitespace; [`canonical_json`]),
//!   `created_at` as RFC 3339 UTC with milliseconds
//!   (`2026-12-01T18:00:00.123Z`), an absent actor or target as the empty
//!   string, and `prev_hash` the hash of the mesh's chained row before it,
//!   or [`GENESIS`] for its first.
//! - **`created_at`** is stored as Postgres keeps it, to the microsecond
//!   (so rows keep the order they happened in, to the microsecond), and the
//!   hash covers its truncation to milliseconds: the writer and the
//!   verifier both hash the stored value cut to the millisecond. A change
//!   below the millisecond is the one change the hash does not cover (it
//!   still shows if it reorders rows: their links then break).
//! - **Chain order** is `created_at`, then `id` compared bytewise (SQL
//!   `id COLLATE "C"`, whatever the database's collation). The writer
//!   (`db::audit`) makes every row it chains come after the mesh's last one
//!   in that order ([`Tips::link`]), so the order rows are chained in is the
//!   order [`verify_chain`] walks.
//! - **Several writers.** Each batch's transaction takes a transaction-scoped
//!   advisory lock per mesh it writes ([`LOCK_MESHES_SQL`]) and only then
//!   reads the meshes' last chained rows ([`TIPS_SQL`]), so a second broker
//!   sharing the database chains after the first instead of forking.
//! - **Rows from before the chain** (no `prev_hash`, no `hash`: the old
//!   broker's, the web app's) are skipped and counted, wherever they fall.
//!   A row with only one of the two is broken: the writer always sets both.
//!
//! [`verify_chain`] is the check, for `meshbroker audit verify` and the
//! shard's `audit_verify` alike: it needs only a connected client.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::DbError;

/// `prev_hash` of a mesh's first chained row.
pub const GENESIS: &str = "genesis";

/// First key of the two-key advisory locks taken per mesh while chaining
/// ("audc" in ASCII); the second is `hashtext(mesh_id)`. The two-key form
/// never collides with the one-key migration lock.
pub(crate) const CHAIN_LOCK_CLASS: i32 = 0x6175_6463;

/// Locks the meshes `$1` for the rest of the transaction, in the order of
/// their keys so two writers never wait on each other in a circle. Must be
/// its own statement, before [`TIPS_SQL`]: a statement reads the snapshot
/// taken when it starts, which would predate a lock it waited for.
pub(crate) const LOCK_MESHES_SQL: &str = "\
SELECT pg_advisory_xact_lock($2, k.key)
FROM (SELECT DISTINCT hashtext(m) AS key FROM UNNEST($1::text[]) AS m ORDER BY 1) AS k";

/// The last chained row of each mesh in `$1` (none for a mesh with no
/// chained row yet).
pub(crate) const TIPS_SQL: &str = "\
SELECT m, t.hash, t.created_at, t.id
FROM UNNEST($1::text[]) AS m
CROSS JOIN LATERAL (
  SELECT a.hash, a.created_at, a.id FROM mesh.audit_log a
  WHERE a.mesh_id = m AND a.hash IS NOT NULL
  ORDER BY a.created_at DESC, a.id COLLATE \"C\" DESC
  LIMIT 1) AS t";

/// Which of the ids `$1` are written already (a batch retried after an
/// unknown outcome may have been committed).
pub(crate) const EXISTING_IDS_SQL: &str = "SELECT id FROM mesh.audit_log WHERE id = ANY($1)";

/// The columns a row's hash covers, as stored.
#[derive(Debug, Clone, Copy)]
pub struct ChainInput<'a> {
    pub prev_hash: &'a str,
    pub mesh_id: &'a str,
    pub event_type: &'a str,
    pub actor_peer_id: Option<&'a str>,
    pub target_peer_id: Option<&'a str>,
    /// Canonical JSON ([`canonical_json`]).
    pub metadata: &'a str,
    /// As [`created_at_text`] prints it.
    pub created_at: &'a str,
}

/// The row's `hash`: lowercase hex SHA-256 of its [`ChainInput`] joined by
/// `|`, absent values as empty strings.
pub fn entry_hash(input: &ChainInput<'_>) -> String {
    let mut sha = Sha256::new();
    let parts = [
        input.prev_hash,
        input.mesh_id,
        input.event_type,
        input.actor_peer_id.unwrap_or(""),
        input.target_peer_id.unwrap_or(""),
        input.metadata,
    ];
    for part in parts {
        sha.update(part.as_bytes());
        sha.update(b"|");
    }
    sha.update(input.created_at.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in sha.finalize() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// `t` cut to whole microseconds: what a `timestamp` column holds, so what
/// the writer stores is exactly what it chained (times before 1970, which
/// it never stores, are left as they are).
pub fn truncate_to_micros(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64),
        Err(_) => t,
    }
}

/// `created_at` as the hash covers it: RFC 3339 UTC, truncated (not
/// rounded) to milliseconds. `None` outside years 1970–9999, which the
/// writer never stores (such a row cannot verify).
pub fn created_at_text(t: SystemTime) -> Option<String> {
    const YEAR_10000: u64 = 253_402_300_800;
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    if since.as_secs() >= YEAR_10000 {
        return None;
    }
    let millis = UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64);
    Some(humantime::format_rfc3339_millis(millis).to_string())
}

/// `value` as canonical JSON: object keys sorted bytewise at every level,
/// arrays in order, no whitespace, strings escaped as `serde_json` escapes
/// them (which is how `audit::AuditEvent::render_metadata` writes).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, value);
    out
}

fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_canonical(out, value);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::String(s) => write_string(out, s),
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    // Serializing a str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// A mesh's last chained row: what the next row links to and must come
/// after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tip {
    pub(crate) hash: String,
    pub(crate) created_at: SystemTime,
    pub(crate) id: String,
}

/// How the writer chained one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
    /// What to store as `created_at` (the hash covers it).
    pub(crate) created_at: SystemTime,
}

/// One row to chain, in its columns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unchained<'a> {
    pub(crate) id: &'a str,
    pub(crate) mesh_id: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) actor: Option<&'a str>,
    pub(crate) target: Option<&'a str>,
    /// Canonical JSON.
    pub(crate) metadata: &'a str,
    /// When it happened (on the shard): stored truncated to milliseconds.
    pub(crate) at: SystemTime,
}

/// The last chained row of each mesh a batch writes, as read under the
/// batch's locks and moved along as the batch's rows are chained. Lives for
/// one transaction only: nothing outlives a batch that fails, and a batch
/// always starts from what is committed (whoever committed it).
#[derive(Debug, Default)]
pub(crate) struct Tips {
    tips: HashMap<String, Tip>,
}

impl Tips {
    /// From [`TIPS_SQL`]'s rows.
    pub(crate) fn from_rows(rows: &[tokio_postgres::Row]) -> Self {
        let tips = rows
            .iter()
            .map(|row| {
                let tip = Tip {
                    hash: row.get(1),
                    created_at: row.get(2),
                    id: row.get(3),
                };
                (row.get(0), tip)
            })
            .collect();
        Tips { tips }
    }

    #[cfg(test)]
    fn insert(&mut self, mesh_id: &str, tip: Tip) {
        self.tips.insert(mesh_id.to_owned(), tip);
    }

    #[cfg(test)]
    fn get(&self, mesh_id: &str) -> Option<&Tip> {
        self.tips.get(mesh_id)
    }

    /// Chains `row` after its mesh's tip and makes it the tip. Its
    /// `created_at` is its time (to the microsecond), moved forward when
    /// that would not come after the tip in chain order (`created_at`,
    /// `id`): to the tip's time when its id sorts after the tip's, else one
    /// microsecond past it. Shards hand their events over independently and
    /// another broker may have written meanwhile, so a row can arrive older
    /// than the tip; it is then stamped as written just after it, later than
    /// it happened by at most the lag it arrived with.
    pub(crate) fn link(&mut self, row: &Unchained<'_>) -> Link {
        let tip = self.tips.get(row.mesh_id);
        let mut created_at = truncate_to_micros(row.at);
        // A clock before 1970 or past 9999 cannot be printed: such a row
        // goes at the epoch (and so right after its tip).
        if created_at_text(created_at).is_none() {
            created_at = UNIX_EPOCH;
        }
        if let Some(tip) = tip {
            if (created_at, row.id.as_bytes()) <= (tip.created_at, tip.id.as_bytes()) {
                created_at = if row.id.as_bytes() > tip.id.as_bytes() {
                    tip.created_at
                } else {
                    tip.created_at + Duration::from_micros(1)
                };
            }
        }
        let prev_hash = tip.map_or(GENESIS, |t| t.hash.as_str()).to_owned();
        // Printable unless the tip itself was not (a row changed by hand).
        let text = created_at_text(created_at).unwrap_or_default();
        let hash = entry_hash(&ChainInput {
            prev_hash: &prev_hash,
            mesh_id: row.mesh_id,
            event_type: row.event_type,
            actor_peer_id: row.actor,
            target_peer_id: row.target,
            metadata: row.metadata,
            created_at: &text,
        });
        self.tips.insert(
            row.mesh_id.to_owned(),
            Tip {
                hash: hash.clone(),
                created_at,
                id: row.id.to_owned(),
            },
        );
        Link {
            prev_hash,
            hash,
            created_at,
        }
    }
}

/// What [`verify_chain`] found. Serializes as `audit_verify_result`'s
/// fields (`valid`, `entries`, `unchained`, `brokenAt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainReport {
    /// No chained row is broken.
    pub valid: bool,
    /// Chained rows checked (every row with a `hash` or a `prev_hash`).
    pub entries: u64,
    /// Rows without `hash` and `prev_hash` (written before the chain),
    /// skipped.
    pub unchained: u64,
    /// The id of the first broken row in chain order: its `prev_hash` is not
    /// the hash of the chained row before it (or `genesis` for the first),
    /// its `hash` is not the formula over its stored columns, or it has only
    /// one of the two. A row changed shows at itself; a row removed, or one
    /// whose hash was cleared, shows at the chained row after it.
    pub broken_at: Option<String>,
}

/// Rows read per query while walking a chain.
const VERIFY_PAGE: i64 = 1000;

const VERIFY_COLUMNS: &str = "\
SELECT id, event_type, actor_peer_id, target_peer_id, metadata::text, created_at, prev_hash, hash
FROM mesh.audit_log";

/// The first page of a mesh's rows, and each next one (keyset, after the
/// last row of the page before), in chain order.
fn verify_sql(first: bool) -> String {
    let after = if first {
        ""
    } else {
        " AND (created_at, id COLLATE \"C\") > ($3, $4)"
    };
    format!(
        "{VERIFY_COLUMNS} WHERE mesh_id = $1{after} ORDER BY created_at, id COLLATE \"C\" LIMIT $2"
    )
}

/// Walks `mesh_id`'s rows in chain order (`created_at`, then `id`
/// bytewise), recomputing each chained row's hash from its stored columns
/// and checking that its `prev_hash` is the hash of the chained row before
/// it. The whole chain is walked, so the counts cover every row; after a
/// broken row the walk goes on from that row's stored hash.
///
/// Pages through the rows by key, so it holds no transaction open and may
/// run on a connection others use; a mesh with no rows is valid with 0
/// entries. Errors are the database's (the chain columns missing from an
/// unmigrated database among them).
pub async fn verify_chain(client: &Client, mesh_id: &str) -> Result<ChainReport, DbError> {
    let first = client.prepare(&verify_sql(true)).await?;
    let next = client.prepare(&verify_sql(false)).await?;
    let mut walk = Walk::default();
    let mut cursor: Option<(SystemTime, String)> = None;
    loop {
        let rows = match &cursor {
            None => client.query(&first, &[&mesh_id, &VERIFY_PAGE]).await?,
            Some((created_at, id)) => {
                let params: [&(dyn ToSql + Sync); 4] = [&mesh_id, &VERIFY_PAGE, created_at, id];
                client.query(&next, &params).await?
            }
        };
        for row in &rows {
            walk.check(&StoredRow {
                id: row.get(0),
                mesh_id,
                event_type: row.get(1),
                actor: row.get(2),
                target: row.get(3),
                metadata: row.get(4),
                created_at: row.get(5),
                prev_hash: row.get(6),
                hash: row.get(7),
            });
        }
        match rows.last() {
            Some(last) if rows.len() as i64 == VERIFY_PAGE => {
                cursor = Some((last.get(5), last.get(0)));
            }
            _ => break,
        }
    }
    Ok(walk.report())
}

/// One `mesh.audit_log` row as stored.
#[derive(Debug, Clone, Copy)]
struct StoredRow<'a> {
    id: &'a str,
    mesh_id: &'a str,
    event_type: &'a str,
    actor: Option<&'a str>,
    target: Option<&'a str>,
    /// `metadata::text` (jsonb's own spelling, not canonical).
    metadata: &'a str,
    created_at: SystemTime,
    prev_hash: Option<&'a str>,
    hash: Option<&'a str>,
}

impl StoredRow<'_> {
    /// The formula over the stored columns with `prev_hash`; `None` when a
    /// column cannot be what the writer stored (metadata that is not JSON, a
    /// time it cannot print).
    fn recompute(&self, prev_hash: &str) -> Option<String> {
        let metadata: Value = serde_json::from_str(self.metadata).ok()?;
        let created_at = created_at_text(self.created_at)?;
        Some(entry_hash(&ChainInput {
            prev_hash,
            mesh_id: self.mesh_id,
            event_type: self.event_type,
            actor_peer_id: self.actor,
            target_peer_id: self.target,
            metadata: &canonical_json(&metadata),
            created_at: &created_at,
        }))
    }
}

/// The state of a walk along one chain.
#[derive(Debug)]
struct Walk {
    /// What the next chained row's `prev_hash` must be.
    expected: String,
    entries: u64,
    unchained: u64,
    broken_at: Option<String>,
}

impl Default for Walk {
    fn default() -> Self {
        Walk {
            expected: GENESIS.to_owned(),
            entries: 0,
            unchained: 0,
            broken_at: None,
        }
    }
}

impl Walk {
    fn check(&mut self, row: &StoredRow<'_>) {
        let (prev_hash, hash) = match (row.prev_hash, row.hash) {
            (None, None) => {
                self.unchained += 1;
                return;
            }
            (Some(prev_hash), Some(hash)) => (prev_hash, hash),
            // Half a link: the writer always writes both.
            (_, hash) => {
                self.entries += 1;
                self.broken(row.id);
                if let Some(hash) = hash {
                    self.expected = hash.to_owned();
                }
                return;
            }
        };
        self.entries += 1;
        let linked = prev_hash == self.expected;
        let intact = row.recompute(prev_hash).as_deref() == Some(hash);
        if !(linked && intact) {
            self.broken(row.id);
        }
        self.expected = hash.to_owned();
    }

    fn broken(&mut self, id: &str) {
        if self.broken_at.is_none() {
            self.broken_at = Some(id.to_owned());
        }
    }

    fn report(self) -> ChainReport {
        ChainReport {
            valid: self.broken_at.is_none(),
            entries: self.entries,
            unchained: self.unchained,
            broken_at: self.broken_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(millis: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis) + Duration::from_micros(micros)
    }

    /// 2026-12-01T18:00:00.123Z
    const DEC_1_2026_18H_MS: u64 = 1_796_148_000_123;

    #[test]
    fn created_at_is_rfc3339_utc_cut_to_milliseconds() {
        let t = at(DEC_1_2026_18H_MS, 999) + Duration::from_nanos(999);
        assert_eq!(created_at_text(t).unwrap(), "2026-12-01T18:00:00.123Z");
        assert_eq!(truncate_to_micros(t), at(DEC_1_2026_18H_MS, 999));
        assert_eq!(
            created_at_text(UNIX_EPOCH).unwrap(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(created_at_text(UNIX_EPOCH - Duration::from_secs(1)), None);
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(created_at_text(far), None);
    }

    #[test]
    fn the_hash_is_sha256_hex_of_the_fields_joined_by_bars() {
        let input = ChainInput {
            prev_hash: GENESIS,
            mesh_id: "mesh-1",
            event_type: "connect",
            actor_peer_id: Some("alice"),
            target_peer_id: None,
            metadata: r#"{"pid":1}"#,
            created_at: "2026-12-01T18:00:00.123Z",
        };
        let text = "genesis|mesh-1|connect|alice||{\"pid\":1}|2026-12-01T18:00:00.123Z";
        let digest = Sha256::digest(text.as_bytes());
        let want: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(entry_hash(&input), want);
        assert_eq!(want.len(), 64);
        // The empty-string digest, as a known answer for the hex encoding.
        let empty = Sha256::digest(b"");
        assert_eq!(
            empty.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// The worked example of README.md ("The audit chain"), end to end
    /// through the writer's linking: two rows of one mesh.
    #[test]
    fn the_readme_example_hashes_as_printed() {
        let mut tips = Tips::default();
        let stored = at(DEC_1_2026_18H_MS, 456);
        let connect = tips.link(&Unchained {
            id: "01",
            mesh_id: "mesh-1",
            event_type: "connect",
            actor: Some("m-ada"),
            target: None,
            metadata: r#"{"pid":4242,"presenceId":"p1","sessionId":"s1"}"#,
            at: stored,
        });
        assert_eq!(connect.prev_hash, GENESIS);
        assert_eq!(connect.created_at, stored);
        assert_eq!(
            connect.hash,
            "02faf1a312cfe1c2f657f4ac8943a285d73ea542606eec67e8c7c462093dad1a"
        );
        let change = tips.link(&Unchained {
            id: "02",
            mesh_id: "mesh-1",
            event_type: "status_change",
            actor: Some("m-ada"),
            target: None,
            metadata: r#"{"from":"idle","presenceId":"p1","source":"manual","status":"working"}"#,
            at: at(DEC_1_2026_18H_MS + 877, 0),
        });
        assert_eq!(change.prev_hash, connect.hash);
        assert_eq!(
            change.hash,
            "72fa9074b8796e1dfaa39b46d4aee22f4bc82de3803817236d5ef5e8b6e147a8"
        );
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level_and_drops_whitespace() {
        // As jsonb prints it: shorter keys first, spaces after separators.
        let stored = r#"{"b": 1, "aa": [3, {"z": null, "y": true}], "a\"": "x\n\u00e9"}"#;
        let value: Value = serde_json::from_str(stored).unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"a\"":"x\né","aa":[3,{"y":true,"z":null}],"b":1}"#
        );
        assert_eq!(canonical_json(&json!({})), "{}");
        assert_eq!(canonical_json(&json!([])), "[]");
        assert_eq!(canonical_json(&json!(-12)), "-12");
    }

    fn unchained<'a>(id: &'a str, mesh_id: &'a str, at: SystemTime) -> Unchained<'a> {
        Unchained {
            id,
            mesh_id,
            event_type: "connect",
            actor: Some("alice"),
            target: None,
            metadata: "{}",
            at,
        }
    }

    #[test]
    fn links_start_at_genesis_per_mesh_and_follow_each_other() {
        let mut tips = Tips::default();
        let a1 = tips.link(&unchained("01", "a", at(1000, 400)));
        let b1 = tips.link(&unchained("02", "b", at(1000, 0)));
        let a2 = tips.link(&unchained("03", "a", at(1001, 0)));
        assert_eq!(
            (a1.prev_hash.as_str(), b1.prev_hash.as_str()),
            (GENESIS, GENESIS)
        );
        assert_eq!(a2.prev_hash, a1.hash);
        assert_ne!(a1.hash, b1.hash);
        // Stored to the microsecond (the hash covers the millisecond).
        assert_eq!(a1.created_at, at(1000, 400));
        assert_eq!(tips.get("a").unwrap().hash, a2.hash);
        assert_eq!(tips.get("a").unwrap().id, "03");
    }

    #[test]
    fn a_row_older_than_its_tip_is_stamped_just_after_it() {
        let mut tips = Tips::default();
        let tip = |id: &str| Tip {
            hash: "h".into(),
            created_at: at(5000, 0),
            id: id.into(),
        };
        let stamped = |tips: &mut Tips, id: &str, t: SystemTime| {
            tips.insert("m", tip("05"));
            tips.link(&unchained(id, "m", t)).created_at
        };
        // Older, with an id after the tip's: the tip's time.
        assert_eq!(stamped(&mut tips, "06", at(4000, 0)), at(5000, 0));
        // Older, or the same time, with an id before: one microsecond past.
        assert_eq!(stamped(&mut tips, "04", at(4000, 0)), at(5000, 1));
        assert_eq!(stamped(&mut tips, "04", at(5000, 0)), at(5000, 1));
        // Newer, even within the tip's millisecond: its own time.
        assert_eq!(stamped(&mut tips, "04", at(5000, 7)), at(5000, 7));
        assert_eq!(stamped(&mut tips, "01", at(6000, 9)), at(6000, 9));
        // Sub-microsecond parts are cut (a timestamp column keeps none).
        let t = at(7000, 3) + Duration::from_nanos(600);
        assert_eq!(stamped(&mut tips, "01", t), at(7000, 3));
    }

    /// Rows chained by `Tips`, stored as the writer stores them.
    struct Stored {
        id: String,
        metadata: String,
        created_at: SystemTime,
        prev_hash: Option<String>,
        hash: Option<String>,
    }

    fn store(ids: &[&str]) -> Vec<Stored> {
        let mut tips = Tips::default();
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let metadata = format!(r#"{{"n":{i},"presenceId":"p"}}"#);
                let row = Unchained {
                    metadata: &metadata,
                    ..unchained(id, "m", at(1000 + i as u64, 250))
                };
                let link = tips.link(&row);
                Stored {
                    id: id.to_string(),
                    // jsonb's spelling, which the verifier makes canonical.
                    metadata: format!(r#"{{"n": {i}, "presenceId": "p"}}"#),
                    created_at: link.created_at,
                    prev_hash: Some(link.prev_hash),
                    hash: Some(link.hash),
                }
            })
            .collect()
    }

    fn walk(rows: &[Stored]) -> ChainReport {
        let mut walk = Walk::default();
        for r in rows {
            walk.check(&StoredRow {
                id: &r.id,
                mesh_id: "m",
                event_type: "connect",
                actor: Some("alice"),
                target: None,
                metadata: &r.metadata,
                created_at: r.created_at,
                prev_hash: r.prev_hash.as_deref(),
                hash: r.hash.as_deref(),
            });
        }
        walk.report()
    }

    fn report(entries: u64, unchained: u64, broken_at: Option<&str>) -> ChainReport {
        ChainReport {
            valid: broken_at.is_none(),
            entries,
            unchained,
            broken_at: broken_at.map(str::to_owned),
        }
    }

    #[test]
    fn what_the_writer_chains_verifies() {
        let rows = store(&["1", "2", "3"]);
        assert_eq!(walk(&rows), report(3, 0, None));
        assert_eq!(walk(&[]), report(0, 0, None));
    }

    #[test]
    fn a_changed_column_breaks_at_its_row() {
        let mut rows = store(&["1", "2", "3"]);
        rows[1].metadata = r#"{"n": 9, "presenceId": "p"}"#.into();
        assert_eq!(walk(&rows), report(3, 0, Some("2")));
        let mut rows = store(&["1", "2", "3"]);
        rows[2].created_at += Duration::from_millis(1);
        assert_eq!(walk(&rows), report(3, 0, Some("3")));
        // Below the millisecond is not hashed.
        let mut rows = store(&["1", "2", "3"]);
        rows[0].created_at += Duration::from_micros(5);
        assert_eq!(walk(&rows), report(3, 0, None));
    }

    #[test]
    fn a_removed_or_cleared_row_breaks_at_the_next() {
        let mut rows = store(&["1", "2", "3"]);
        rows.remove(1);
        assert_eq!(walk(&rows), report(2, 0, Some("3")));
        let mut rows = store(&["1", "2", "3"]);
        rows.remove(0);
        assert_eq!(walk(&rows), report(2, 0, Some("2")));
        // Both chain columns cleared: skipped as unchained, and the next
        // row no longer links.
        let mut rows = store(&["1", "2", "3"]);
        rows[1].prev_hash = None;
        rows[1].hash = None;
        assert_eq!(walk(&rows), report(2, 1, Some("3")));
        // One cleared: broken at the row itself.
        let mut rows = store(&["1", "2", "3"]);
        rows[1].hash = None;
        assert_eq!(walk(&rows), report(3, 0, Some("2")));
    }

    #[test]
    fn rows_from_before_the_chain_are_skipped_and_counted() {
        let mut rows = store(&["3", "4"]);
        for id in ["1", "2"] {
            rows.insert(
                0,
                Stored {
                    id: id.into(),
                    metadata: "{}".into(),
                    created_at: at(10, 0),
                    prev_hash: None,
                    hash: None,
                },
            );
        }
        assert_eq!(walk(&rows), report(2, 2, None));
    }

    #[test]
    fn only_the_first_break_is_named_and_the_walk_goes_on() {
        let mut rows = store(&["1", "2", "3", "4"]);
        rows[1].metadata = "{}".into();
        rows[3].metadata = "{}".into();
        assert_eq!(walk(&rows), report(4, 0, Some("2")));
        let mut rows = store(&["1", "2"]);
        rows[0].metadata = "not json".into();
        assert_eq!(walk(&rows), report(2, 0, Some("1")));
    }

    #[test]
    fn the_report_serializes_as_audit_verify_result_fields() {
        let json = serde_json::to_value(report(3, 1, Some("x"))).unwrap();
        assert_eq!(
            json,
            json!({"valid": false, "entries": 3, "unchained": 1, "brokenAt": "x"})
        );
    }

    #[test]
    fn the_lock_is_its_own_statement_in_key_order() {
        assert!(!LOCK_MESHES_SQL.contains(';'));
        assert!(LOCK_MESHES_SQL.contains("ORDER BY 1"));
        assert!(TIPS_SQL.contains("a.hash IS NOT NULL"));
        assert!(TIPS_SQL.contains("a.id COLLATE \"C\" DESC"));
        assert!(verify_sql(false).contains("ORDER BY created_at, id COLLATE \"C\""));
    }
}
