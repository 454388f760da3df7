//! The audit lane: audit events from the shards to `mesh.audit_log`, written
//! by a task of its own on the db thread over a connection of its own, so
//! audit writes never delay presence writes or held envelopes.
//!
//! - **Handing over.** [`AuditLane::send`] never blocks: a shard hands over
//!   the events of one flush as one `Vec` on a bounded channel. When the
//!   channel is full (the db thread starved) or gone, the events are dropped
//!   and counted (`broker_audit_dropped_total`). The writer keeps draining
//!   the channel while it connects, writes or waits.
//! - **Ids.** The writer gives each event its id as it accepts it, from an
//!   `IdGen` with a shard number no shard uses ([`AUDIT_ID_SHARD`]), so a
//!   batch retried after an unknown outcome (a timeout, a lost connection)
//!   is `ON CONFLICT (id) DO NOTHING` and never writes a row twice.
//! - **Batches.** A batch closes at `max_rows` events or once its oldest
//!   event has waited `max_wait` (`AUDIT_BATCH_MAX_ROWS`,
//!   `AUDIT_BATCH_MAX_WAIT_US`). It is one transaction of two round trips:
//!   `BEGIN`, the meshes' chain locks, their last chained rows (and, for
//!   rows of an attempt whose outcome is unknown, which are written
//!   already) pipelined; then one multi-row INSERT over column arrays
//!   (`UNNEST`) and `COMMIT` pipelined. Events that arrive while it is
//!   written gather for the next one.
//! - **The chain** (PROTOCOL.md §13, see `chain`). Every row is written with
//!   its `prev_hash` and `hash`. A batch is sorted in chain order
//!   (`created_at`, then `id`) and each row is linked after its mesh's last
//!   chained row as read in the same transaction, under a per-mesh advisory
//!   lock: the last hashes are not kept across batches, so a batch that
//!   fails leaves nothing ahead of what is committed, a reconnect needs no
//!   reload, and a second broker writing the same database chains after
//!   the first instead of forking. A row arriving older than its mesh's
//!   last chained row (shards hand over independently) is stamped just
//!   after it (`chain::Tips::link`), so chain order stays the order rows
//!   were chained in. Rows a retried batch finds written already are left
//!   out before chaining (`ON CONFLICT DO NOTHING` alone would skip them
//!   but chain the rows after them to hashes never stored).
//! - **Postgres down.** Events wait in a buffer of at most `max_buffered`
//!   (`AUDIT_BUFFER_EVENTS`); over it the oldest are dropped and counted.
//!   The writer reconnects with the presence writer's backoff, reset only
//!   by a successful write (a server that takes connections but fails every
//!   write is not retried in a loop). Until the presence writer has migrated
//!   a fresh database, preparing the INSERT fails like a failed connect.
//! - **Refused data.** The INSERT skips rows whose mesh is gone (a deleted
//!   mesh must not wedge the lane on the foreign key). A batch the server
//!   still refuses for its data is split in halves until each refused row
//!   is alone; those are dropped (counted, `audit write rejected`) and every
//!   other row is written.
//! - **Shutdown.** `DbThread::join` stops this task with the presence
//!   writer: it writes everything queued within the same deadline
//!   (`DbOptions::shutdown_flush`, 8 s), counts what is left as dropped
//!   (`audit flush abandoned`) and ends.
use std::collections::HashSet;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Statement};

use super::backlog::Backlog;
use super::chain::{
    Tips, Unchained, CHAIN_LOCK_CLASS, EXISTING_IDS_SQL, LOCK_MESHES_SQL, TIPS_SQL,
};
use super::intake::{until, Intake};
use super::worker::{connect, is_transient, Backoff, ConnTask};
use super::{BatchObserver, BatchStats, DbError, WRITE_TIMEOUT};
use crate::audit::AuditEvent;
use crate::ids::IdGen;

/// The shard number of audit ids: the largest an id can hold, far above
/// any shard's, so audit ids never collide with ids made on a shard.
pub(crate) const AUDIT_ID_SHARD: u16 = 1023;
const _: () = assert!(crate::config::MAX_SHARDS < AUDIT_ID_SHARD as usize);

/// Hand-overs the channel holds (each a shard's flush). The writer moves
/// them into its buffer as they come, so this fills only when the db
/// thread cannot run.
pub(crate) const QUEUE_HANDOVERS: usize = 4096;
/// Hand-overs taken from the channel at once.
const RECEIVE_MAX: usize = 64;

pub(crate) const INSERT_AUDIT_SQL: &str = "\
INSERT INTO mesh.audit_log (id, mesh_id, event_type, actor_peer_id, target_peer_id, metadata,
  created_at, prev_hash, hash)
SELECT t.id, t.mesh_id, t.event_type, t.actor, t.target, t.metadata::jsonb, t.created_at,
  t.prev_hash, t.hash
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
  $7::timestamp[], $8::text[], $9::text[])
  AS t(id, mesh_id, event_type, actor, target, metadata, created_at, prev_hash, hash)
WHERE EXISTS (SELECT 1 FROM mesh.mesh m WHERE m.id = t.mesh_id)
ON CONFLICT (id) DO NOTHING";

/// Tuning of the audit lane (part of [`super::DbOptions`]).
pub struct AuditOptions {
    /// A batch closes at this many events (`AUDIT_BATCH_MAX_ROWS`).
    pub max_rows: usize,
    /// … or once its oldest event has waited this long
    /// (`AUDIT_BATCH_MAX_WAIT_US`).
    pub max_wait: Duration,
    /// Most events kept while Postgres is down (`AUDIT_BUFFER_EVENTS`).
    pub max_buffered: usize,
    /// Every event accepted and never written is counted here
    /// (`broker_audit_dropped_total`).
    pub dropped: Arc<AtomicU64>,
    /// Called after every committed audit batch.
    pub on_batch: Option<BatchObserver>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            max_rows: 1024,
            max_wait: Duration::from_micros(2000),
            max_buffered: 100_000,
            dropped: Arc::default(),
            on_batch: None,
        }
    }
}

impl std::fmt::Debug for AuditOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditOptions")
            .field("max_rows", &self.max_rows)
            .field("max_wait", &self.max_wait)
            .field("max_buffered", &self.max_buffered)
            .field("on_batch", &self.on_batch.is_some())
            .finish()
    }
}

/// The shards' side of the lane. Cheap to clone.
#[derive(Clone)]
pub(crate) struct AuditLane {
    tx: mpsc::Sender<Vec<AuditEvent>>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLane").finish_non_exhaustive()
    }
}

impl AuditLane {
    /// The lane and the writer that drains it (to run on the db thread).
    pub(crate) fn new(
        config: Config,
        options: AuditOptions,
        shutdown_flush: Duration,
    ) -> (AuditLane, AuditWriter) {
        let (tx, rx) = mpsc::channel(QUEUE_HANDOVERS);
        let lane = AuditLane {
            tx,
            dropped: options.dropped.clone(),
        };
        let writer = AuditWriter {
            config,
            intake: Intake::new(rx, Arc::new(Notify::new()), shutdown_flush),
            received: Vec::with_capacity(RECEIVE_MAX),
            buffer: Backlog::new(options.max_buffered),
            ids: IdGen::new(AUDIT_ID_SHARD),
            max_rows: options.max_rows.max(1),
            max_wait: options.max_wait,
            dropped: options.dropped,
            on_batch: options.on_batch,
        };
        (lane, writer)
    }

    /// Never blocks; drops (and counts) the events when the lane is full.
    pub(crate) fn send(&self, events: Vec<AuditEvent>) {
        if events.is_empty() {
            return;
        }
        if let Err(e) = self.tx.try_send(events) {
            let events = match e {
                mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v,
            };
            self.dropped
                .fetch_add(events.len() as u64, Ordering::Relaxed);
        }
    }
}

/// An event the writer accepted: its row id and when it came.
struct Accepted {
    id: String,
    at: Instant,
    event: AuditEvent,
    /// In an attempt whose outcome is unknown: it may be written already.
    retried: bool,
}

struct Live {
    client: Client,
    task: ConnTask,
    lock: Statement,
    tips: Statement,
    existing: Statement,
    insert: Statement,
}

async fn open(config: &Config) -> Result<Live, DbError> {
    let (client, task) = connect(config).await?;
    let lock = client.prepare(LOCK_MESHES_SQL).await?;
    let tips = client.prepare(TIPS_SQL).await?;
    let existing = client.prepare(EXISTING_IDS_SQL).await?;
    let insert = client.prepare(INSERT_AUDIT_SQL).await?;
    Ok(Live {
        client,
        task,
        lock,
        tips,
        existing,
        insert,
    })
}

/// What to do after writing a batch.
enum Flow {
    Continue,
    /// The connection is unusable: reconnect.
    Down,
    /// The shutdown deadline passed.
    Stop,
}

enum Attempt {
    Written,
    Retry(String),
    Rejected(String),
    Deadline,
}

/// A batch as the INSERT's column arrays, chained.
#[derive(Debug, PartialEq)]
struct Columns<'a> {
    id: Vec<&'a str>,
    mesh_id: Vec<&'a str>,
    event_type: Vec<&'static str>,
    actor: Vec<Option<&'a str>>,
    target: Vec<Option<&'a str>>,
    metadata: Vec<&'a str>,
    created_at: Vec<SystemTime>,
    prev_hash: Vec<String>,
    hash: Vec<String>,
}

impl<'a> Columns<'a> {
    /// `text` holds every row's metadata back to back, row `i`'s ending at
    /// `ends[i]` (one allocation for the whole batch). Each row is linked
    /// after its mesh's tip in `tips`, in the order of `rows` (chain order).
    fn chain(rows: &[&'a Accepted], text: &'a str, ends: &[usize], tips: &mut Tips) -> Self {
        let mut c = Columns {
            id: Vec::with_capacity(rows.len()),
            mesh_id: Vec::with_capacity(rows.len()),
            event_type: Vec::with_capacity(rows.len()),
            actor: Vec::with_capacity(rows.len()),
            target: Vec::with_capacity(rows.len()),
            metadata: Vec::with_capacity(rows.len()),
            created_at: Vec::with_capacity(rows.len()),
            prev_hash: Vec::with_capacity(rows.len()),
            hash: Vec::with_capacity(rows.len()),
        };
        let mut start = 0;
        for (row, &end) in rows.iter().zip(ends) {
            let e = &row.event;
            let metadata = &text[start..end];
            let link = tips.link(&Unchained {
                id: &row.id,
                mesh_id: e.mesh_id(),
                event_type: e.kind.event_type(),
                actor: e.actor_id(),
                target: e.target_id(),
                metadata,
                at: e.at,
            });
            c.id.push(&row.id);
            c.mesh_id.push(e.mesh_id());
            c.event_type.push(e.kind.event_type());
            c.actor.push(e.actor_id());
            c.target.push(e.target_id());
            c.metadata.push(metadata);
            c.created_at.push(link.created_at);
            c.prev_hash.push(link.prev_hash);
            c.hash.push(link.hash);
            start = end;
        }
        c
    }
}

fn render_metadata(rows: &[&Accepted]) -> (String, Vec<usize>) {
    let mut text = String::with_capacity(rows.len() * 96);
    let ends = rows
        .iter()
        .map(|row| {
            row.event.render_metadata(&mut text);
            text.len()
        })
        .collect();
    (text, ends)
}

/// Chain order within a batch: `created_at` (as stored, to the
/// microsecond), then `id` bytewise.
fn sort_in_chain_order(batch: &mut [Accepted]) {
    fn key(r: &Accepted) -> (SystemTime, &[u8]) {
        (
            super::chain::truncate_to_micros(r.event.at),
            r.id.as_bytes(),
        )
    }
    batch.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
}

/// Ends a transaction that failed before its `COMMIT` was sent (the
/// connection may go on writing); a dead connection is replaced anyway.
async fn rollback(client: &Client) {
    let _ = client.batch_execute("ROLLBACK").await;
}

/// Writes `rows` (in chain order) in one transaction: see "Batches" and
/// "The chain" in the module doc.
async fn write_chained(live: &Live, rows: &[Accepted]) -> Result<(), tokio_postgres::Error> {
    let client = &live.client;
    let mut meshes: Vec<&str> = rows.iter().map(|r| r.event.mesh_id()).collect();
    meshes.sort_unstable();
    meshes.dedup();
    let retried: Vec<&str> = rows
        .iter()
        .filter(|r| r.retried)
        .map(|r| r.id.as_str())
        .collect();
    let lock_params: [&(dyn ToSql + Sync); 2] = [&meshes, &CHAIN_LOCK_CLASS];
    let tips_params: [&(dyn ToSql + Sync); 1] = [&meshes];
    let existing = async {
        if retried.is_empty() {
            return Ok(Vec::new());
        }
        client.query(&live.existing, &[&retried]).await
    };
    // Biased: polled in order, so tokio-postgres sends them back to back
    // in this order; the tips are read by a statement that starts once the
    // locks are held, so they include whatever another writer committed.
    let opened = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.execute(&live.lock, &lock_params),
        client.query(&live.tips, &tips_params),
        existing,
    );
    let (_, _, tips, existing) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            rollback(client).await;
            return Err(e);
        }
    };
    let mut tips = Tips::from_rows(&tips);
    let written: HashSet<&str> = existing.iter().map(|row| row.get(0)).collect();
    let todo: Vec<&Accepted> = rows
        .iter()
        .filter(|r| !written.contains(&r.id.as_str()))
        .collect();
    let (text, ends) = render_metadata(&todo);
    let c = Columns::chain(&todo, &text, &ends, &mut tips);
    let params: [&(dyn ToSql + Sync); 9] = [
        &c.id,
        &c.mesh_id,
        &c.event_type,
        &c.actor,
        &c.target,
        &c.metadata,
        &c.created_at,
        &c.prev_hash,
        &c.hash,
    ];
    let insert = async {
        if todo.is_empty() {
            return Ok(0);
        }
        client.execute(&live.insert, &params).await
    };
    // A failing INSERT aborts the transaction and COMMIT then rolls back.
    tokio::try_join!(biased; insert, client.batch_execute("COMMIT"))?;
    Ok(())
}

/// The task writing `mesh.audit_log`; see the module doc.
pub(crate) struct AuditWriter {
    config: Config,
    intake: Intake<mpsc::Receiver<Vec<AuditEvent>>>,
    received: Vec<Vec<AuditEvent>>,
    buffer: Backlog<Accepted>,
    ids: IdGen,
    max_rows: usize,
    max_wait: Duration,
    dropped: Arc<AtomicU64>,
    on_batch: Option<BatchObserver>,
}

impl AuditWriter {
    /// Notified by `DbThread::join`: take what is queued, write it, stop.
    pub(crate) fn stopper(&self) -> Arc<Notify> {
        self.intake.stopper()
    }

    fn closed(&self) -> bool {
        self.intake.closed()
    }

    fn expired(&self) -> bool {
        self.intake.expired()
    }

    fn count_dropped(&self, n: usize) {
        if n > 0 {
            self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Waits for events and accepts them into the buffer. On a stop or the
    /// channel's end, starts the shutdown clock; never resolves after it.
    async fn receive(&mut self) {
        if self.intake.receive(&mut self.received, RECEIVE_MAX).await == 0 {
            return;
        }
        let now = Instant::now();
        let ids = &mut self.ids;
        let accepted = self.received.drain(..).flatten().map(|event| Accepted {
            id: ids.next_id(),
            at: now,
            event,
            retried: false,
        });
        let dropped = self.buffer.extend(accepted);
        self.count_dropped(dropped);
    }

    /// Runs `fut` while still accepting events. `None` when the shutdown
    /// deadline passes first (`fut` is then dropped).
    async fn drive<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            let deadline = self.intake.deadline();
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                _ = until(deadline) => return None,
                _ = self.receive() => {}
            }
        }
    }

    /// When the next batch closes: `None` with nothing buffered, a time
    /// already past when it is full or the lane is flushing.
    fn due(&self) -> Option<Instant> {
        let oldest = self.buffer.front()?.at;
        if self.closed() || self.buffer.len() >= self.max_rows {
            return Some(oldest);
        }
        Some(oldest + self.max_wait)
    }

    /// One transaction writing `rows` chained, timed; the observer hears
    /// of commits.
    async fn attempt(&mut self, live: &Live, rows: &[Accepted]) -> Attempt {
        let started = Instant::now();
        let insert = write_chained(live, rows);
        match self.drive(timeout(WRITE_TIMEOUT, insert)).await {
            Some(Ok(Ok(_))) => {
                if let Some(observe) = self.on_batch.as_mut() {
                    observe(BatchStats {
                        commands: rows.len(),
                        elapsed: started.elapsed(),
                    });
                }
                Attempt::Written
            }
            Some(Ok(Err(e))) if is_transient(&e, &live.client) => Attempt::Retry(e.to_string()),
            Some(Ok(Err(e))) => Attempt::Rejected(e.to_string()),
            Some(Err(_)) => Attempt::Retry("audit write timed out".to_owned()),
            None => Attempt::Deadline,
        }
    }

    /// Writes a batch. A range the server refuses is split in halves, so
    /// the refused rows end up alone and are dropped while the rest is
    /// written; on a transient failure everything not yet written goes back
    /// to the front of the buffer.
    async fn write(&mut self, live: &Live, mut batch: Vec<Accepted>) -> Flow {
        // Every range below is then in chain order too.
        sort_in_chain_order(&mut batch);
        // Ranges still to write, the next on top: what is not written yet
        // is always the batch from the popped range's start on.
        let mut todo: Vec<Range<usize>> = Vec::with_capacity(16);
        todo.push(0..batch.len());
        let mut unwritten = None;
        while let Some(range) = todo.pop() {
            match self.attempt(live, &batch[range.clone()]).await {
                Attempt::Written => {}
                Attempt::Rejected(error) if range.len() == 1 => {
                    tracing::warn!(target: "db", error = %error, rows = 1, "audit write rejected");
                    self.count_dropped(1);
                }
                Attempt::Rejected(_) => {
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
                Attempt::Retry(error) => {
                    tracing::warn!(target: "db", error = %error, rows = batch.len() - range.start,
                        "audit write failed");
                    unwritten = Some((range.start, Flow::Down));
                    break;
                }
                Attempt::Deadline => {
                    unwritten = Some((range.start, Flow::Stop));
                    break;
                }
            }
        }
        let Some((from, flow)) = unwritten else {
            return Flow::Continue;
        };
        // The attempt may have committed after all: the next one checks.
        let rest: Vec<Accepted> = batch
            .into_iter()
            .skip(from)
            .map(|row| Accepted {
                retried: true,
                ..row
            })
            .collect();
        let dropped = self.buffer.requeue_front(rest);
        self.count_dropped(dropped);
        flow
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut conn: Option<Live> = None;
        loop {
            if self.expired() {
                break;
            }
            let Some(due) = self.due() else {
                if self.closed() {
                    break; // flushed
                }
                self.receive().await;
                continue;
            };
            if Instant::now() < due {
                tokio::select! {
                    _ = self.receive() => {}
                    _ = sleep_until(due) => {}
                }
                continue;
            }
            if conn.as_ref().is_some_and(|live| live.client.is_closed()) {
                conn = None;
            }
            let Some(live) = conn.as_ref() else {
                let config = self.config.clone();
                match self.drive(open(&config)).await {
                    None => break,
                    Some(Ok(live)) => conn = Some(live),
                    Some(Err(e)) => {
                        // The presence writer logs Postgres being away.
                        tracing::debug!(target: "db", error = %e, "audit connect failed");
                        if self.drive(sleep(backoff.next_delay())).await.is_none() {
                            break;
                        }
                    }
                }
                continue;
            };
            let batch = self.buffer.take_batch(self.max_rows);
            match self.write(live, batch).await {
                Flow::Continue => backoff.reset(),
                Flow::Down => {
                    if let Some(live) = conn.take() {
                        live.task.abort();
                    }
                    if self.drive(sleep(backoff.next_delay())).await.is_none() {
                        break;
                    }
                }
                Flow::Stop => break,
            }
        }
        // What the deadline cut off: the buffer, and hand-overs not yet
        // received.
        self.intake.rx.close();
        let mut lost = self.buffer.len();
        while let Ok(events) = self.intake.rx.try_recv() {
            lost += events.len();
        }
        if lost > 0 {
            self.count_dropped(lost);
            tracing::warn!(target: "db", lost, "audit flush abandoned");
        }
        if let Some(live) = conn {
            live.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::directory::{Directory, MemberRow};

    fn accepted(n: usize) -> Vec<Accepted> {
        let rows = [MemberRow {
            id: "alice".into(),
            peer_pubkey: "aa".into(),
            revoked: false,
            ..MemberRow::default()
        }];
        let mesh = Directory::default().install("mesh-1", &rows);
        let alice = mesh.view().member("alice").unwrap().clone();
        let mut ids = IdGen::new(AUDIT_ID_SHARD);
        (0..n)
            .map(|i| Accepted {
                id: ids.next_id(),
                at: Instant::now(),
                event: AuditEvent::connect(
                    &mesh,
                    &alice,
                    &format!("p{i}"),
                    "s",
                    1,
                    "control-plane",
                ),
                retried: false,
            })
            .collect()
    }

    #[test]
    fn columns_line_up_with_the_rows() {
        let rows = accepted(3);
        let refs: Vec<&Accepted> = rows.iter().collect();
        let (text, ends) = render_metadata(&refs);
        let c = Columns::chain(&refs, &text, &ends, &mut Tips::default());
        assert_eq!(c.id, rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>());
        assert_eq!(c.mesh_id, vec!["mesh-1"; 3]);
        assert_eq!(c.event_type, vec!["connect"; 3]);
        assert_eq!(c.actor, vec![Some("alice"); 3]);
        assert_eq!(c.target, vec![None; 3]);
        assert_eq!(c.created_at.len(), 3);
        for (i, m) in c.metadata.iter().enumerate() {
            assert_eq!(
                *m,
                format!(
                    r#"{{"pid":1,"presenceId":"p{i}","role":"control-plane","sessionId":"s"}}"#
                )
            );
        }
        // One chain, from genesis, each row after the one before.
        assert_eq!(c.prev_hash[0], crate::db::chain::GENESIS);
        assert_eq!(c.prev_hash[1..], c.hash[..2]);
        assert!(c.created_at.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_batch_is_sorted_in_chain_order() {
        let mut rows = accepted(4);
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // Arrived out of order (two shards' hand-overs), one tie in time.
        for (row, micros) in rows.iter_mut().zip([30, 10, 20, 10]) {
            row.event.at = base + Duration::from_micros(micros);
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        sort_in_chain_order(&mut rows);
        let got: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(got, [&ids[1], &ids[3], &ids[2], &ids[0]]);
    }

    #[test]
    fn audit_ids_are_unique_and_apart_from_shard_ids() {
        let rows = accepted(1000);
        let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        // The shard digits (after 10 of time) are 1023's, never a shard's.
        let mut shard_ids = IdGen::new((crate::config::MAX_SHARDS - 1) as u16);
        assert_ne!(&shard_ids.next_id()[10..12], &rows[0].id[10..12]);
        assert_eq!(&rows[0].id[10..12], "zz");
    }

    #[test]
    fn insert_is_one_idempotent_statement_that_skips_deleted_meshes() {
        let sql = INSERT_AUDIT_SQL;
        assert!(sql.starts_with("INSERT INTO mesh.audit_log"));
        assert_eq!(sql.matches("UNNEST(").count(), 1);
        assert!(sql.contains("t.metadata::jsonb"));
        assert!(sql.contains("created_at, prev_hash, hash)"));
        assert!(sql.contains("WHERE EXISTS (SELECT 1 FROM mesh.mesh m WHERE m.id = t.mesh_id)"));
        assert!(sql.ends_with("ON CONFLICT (id) DO NOTHING"));
    }

    #[test]
    fn a_full_lane_drops_and_counts() {
        let config: Config = "postgres://localhost/x".parse().unwrap();
        let (lane, writer) = AuditLane::new(config, AuditOptions::default(), Duration::ZERO);
        let events = || accepted(2).into_iter().map(|a| a.event).collect::<Vec<_>>();
        for _ in 0..QUEUE_HANDOVERS {
            lane.send(events());
        }
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 0);
        lane.send(events());
        lane.send(Vec::new());
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 2);
        drop(writer);
        lane.send(events());
        assert_eq!(lane.dropped.load(Ordering::Relaxed), 4);
    }
}
