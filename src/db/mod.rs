//! The one thread that talks to Postgres ("db-writer").
//!
//! Shards never touch Postgres: they hand `DbCommand`s to a `DbHandle`,
//! whose `try_send` never blocks (a bounded tokio channel; `Err` when full).
//! The db-writer thread runs a current-thread tokio runtime with one
//! tokio-postgres connection and does everything else:
//!
//! - **Connect and migrate.** `NoTls`, session `TimeZone = 'UTC'` (columns
//!   are `timestamp without time zone` holding UTC), then
//!   [`migrate::run_migrations`] on every (re)connection — idempotent, so
//!   after the first it only logs `applied=0`. Failures retry with backoff
//!   (0.25 s doubling to 5 s); the thread never exits because Postgres went
//!   away.
//! - **Health.** While connected, `SELECT 1` every [`PING_INTERVAL`] with a
//!   [`PING_TIMEOUT`]. A failed ping, a failed write or the connection
//!   future ending marks [`DbStatus`] down (`db ping failed` / `db write
//!   failed` / `db connection lost`, at warn) and goes back to reconnecting;
//!   success logs `db healthy` and marks it up.
//! - **Batching.** Commands are received with `recv_many` into an in-memory
//!   backlog, and written oldest first in batches of up to [`BATCH_MAX`],
//!   each batch one transaction of one multi-row statement per command kind,
//!   sent back to back in one round trip (see `batch`). The
//!   channel keeps being drained while a connect, a write or a ping is in
//!   flight, so shards see `DbQueueFull` only if this thread is starved.
//! - **Postgres down.** The backlog keeps commands in order, bounded by
//!   [`DbOptions::max_buffered`] (default 100 000); over the bound the
//!   oldest are dropped and counted in [`DbStatus::writes_dropped`]. A
//!   batch whose write failed goes back to the front of the backlog and is
//!   retried after reconnecting (inserts are `ON CONFLICT DO NOTHING`, so a
//!   retry of a batch that did commit is harmless). A batch the server
//!   refuses for its data (an SQLSTATE outside the transient classes 08,
//!   40, 53, 57, 58 on a live connection) is retried one command at a
//!   time and the refused commands are dropped (`db write rejected`,
//!   counted in `writes_dropped`), so one bad command cannot wedge the
//!   queue.
//! - **Shutdown.** `DbThread::join` (called once the shards are gone)
//!   closes the channel; the thread flushes the backlog (reconnecting if
//!   needed) for at most [`SHUTDOWN_FLUSH_TIMEOUT`] (8 s,
//!   [`DbOptions::shutdown_flush`]), logs what it could not write (`db flush
//!   abandoned`, `lost=…`, at warn, also counted as dropped), closes every
//!   presence row this run opened, and returns.
//! - **Member lookups.** A second task with its own connection (`members`)
//!   answers hellos' member lookups (those waiting together with one
//!   query) and refreshes the directory every
//!   [`DbOptions::member_refresh`], so a lookup never waits behind writes.
//! - **Joins.** A task with its own connection (`join`) takes `POST
//!   /join` requests (PROTOCOL.md §12) one at a time from a bounded
//!   channel of its own, each in one transaction, and installs the mesh's
//!   fresh member rows in the directory before it answers.
//! - **Audit.** A third task with its own connection (`audit`) writes
//!   `mesh.audit_log` in batches from a lane of its own
//!   ([`DbOptions::audit`]), which may drop (counted) and never delays the
//!   presence writes; it stops with the presence writer, on its deadline.
//! - **Batch latency.** Histograms live in `metrics`, not here: pass a
//!   [`BatchObserver`] in [`DbOptions::on_batch`] (presence batches) or
//!   [`AuditOptions::on_batch`] (audit batches, what
//!   `broker_audit_batch_write_seconds` shows) to [`spawn_with`]; it is
//!   called on the db-writer thread after every committed batch with the
//!   batch size and the write's wall time (the round trip included).
//!   `spawn` is `spawn_with` and the defaults.
//!
//! Module map: `health` (DbStatus), `migrate` (embedded migrations),
//! `batch` (SQL and the batch write), `backlog` (bounded in-memory FIFO),
//! `worker` (the thread's loop), `members` (member lookups and refresh),
//! `audit` (the audit lane and its writer), `chain` (the audit chain's hash,
//! how the writer links rows, `verify_chain`), `join` (enrollment, and the
//! rows the onboarding commands write).

pub mod admin;
mod audit;
mod backlog;
mod batch;
pub mod chain;
mod health;
pub mod held;
mod held_batch;
mod intake;
pub mod join;
mod members;
pub mod migrate;
pub mod restore;
mod worker;

pub(crate) use members::reload_members;
pub(crate) use worker::connect;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::hook::Status;
use crate::mesh::directory::{Directory, MemberRow};
use crate::status::Source;
pub(crate) use audit::AuditLane;
pub use audit::AuditOptions;
pub use health::DbStatus;

/// Member lookups waiting at once; more are refused (the hello answers
/// `unavailable`).
const LOOKUP_QUEUE: usize = 4096;
pub use migrate::run_migrations;

/// How often a healthy connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// A ping not answered within this marks Postgres down.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on opening a connection (TCP/socket + startup + `SET TimeZone`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A batch write not done within this counts as failed (and is retried).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay after a failed attempt; doubles up to the max.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Ceiling of the reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most commands written in one batch (and taken per `recv_many`).
pub const BATCH_MAX: usize = 512;
/// How long, after the last `DbHandle` is dropped, the thread keeps trying
/// to flush its backlog (PROTOCOL.md §7 allows 10 s for the whole stop).
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(8);

/// A valid hook signal with no live session (PROTOCOL.md §5), stashed in
/// `mesh.pending_status` (with `status_source = 'hook'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingStatus {
    pub id: String,
    /// `None` when the hook gave no pid; stored as 0 because the column is
    /// `integer NOT NULL`.
    pub pid: Option<i32>,
    pub cwd: String,
    pub status: String,
    pub created_at: SystemTime,
}

/// Work for the db-writer thread. Add variants here and teach `batch`
/// how to write them (see its module doc). Deliberately not `Clone`: later
/// variants carry reply channels.
#[derive(Debug)]
pub enum DbCommand {
    StashPendingStatus(PendingStatus),
    /// A session said hello: its presence row, with the status it starts
    /// with (idle/jsonl, or a stashed hook signal).
    PresenceOpen {
        id: Box<str>,
        member_id: Box<str>,
        session_id: String,
        pid: i32,
        cwd: String,
        /// A `session_hello` session's key (PROTOCOL.md §9); `None` for `hello`.
        session_pubkey: Option<Box<str>>,
        status: Status,
        source: Source,
        at: SystemTime,
    },
    /// A status written by the §5 rule (a change, or a bumped time).
    PresenceStatus {
        id: String,
        status: Status,
        source: Source,
        at: SystemTime,
    },
    /// A pong: refreshes `last_ping_at`.
    PresencePing {
        id: String,
        at: SystemTime,
    },
    /// The session ended: `disconnected_at`, and the member's `last_seen_at`.
    PresenceClose {
        id: String,
        member_id: String,
        at: SystemTime,
    },
    /// A member joined (`joined`) or left a group (PROTOCOL.md §10):
    /// upserts or deletes its `mesh.member_group` row. `name` as
    /// `GroupName` normalizes it (lowercase). A join of a group the member
    /// is in only changes `role` (`joined_at` stays the first join's, `at`
    /// for a new row). Within one batch only the last command per
    /// `(member_id, name)` counts. A join for a member row that is gone is
    /// skipped.
    GroupMembership {
        member_id: String,
        name: String,
        role: Option<String>,
        joined: bool,
        at: SystemTime,
    },
}

/// The answer to a member lookup.
pub type MembersReply = tokio::sync::oneshot::Sender<Result<Vec<MemberRow>, LookupFailed>>;

/// A member lookup could not be answered (Postgres down or erroring).
#[derive(Debug, Clone, thiserror::Error)]
#[error("member lookup failed: {0}")]
pub struct LookupFailed(pub String);

/// `DbHandle::try_send` could not queue the command (queue full, or the
/// db-writer thread is gone). The command is handed back.
#[derive(Debug, thiserror::Error)]
#[error("db queue full")]
pub struct DbQueueFull(pub DbCommand);

/// The shards' side of the db-writer queue. Cheap to clone; the thread
/// stops once every clone is dropped.
#[derive(Clone, Debug)]
pub struct DbHandle {
    tx: mpsc::Sender<DbCommand>,
    lookups: mpsc::Sender<(String, MembersReply)>,
    admin: mpsc::Sender<admin::AdminRequest>,
    joins: mpsc::Sender<join::JoinJob>,
    audit: AuditLane,
}

impl DbHandle {
    /// The audit lane (see `audit`): events that may be dropped, never
    /// in the way of presence writes.
    pub(crate) fn audit(&self) -> &AuditLane {
        &self.audit
    }

    /// An admin's read or write (PROTOCOL.md §13). Never blocks; false
    /// when the queue is full or gone (the request is dropped with its
    /// reply, which the asker sees as an error).
    pub fn admin(&self, request: admin::AdminRequest) -> bool {
        self.admin.try_send(request).is_ok()
    }

    /// Asks for a mesh's member rows (hello on a mesh not loaded yet, or a
    /// miss). Never blocks; `None` when the lookup queue is full or gone.
    pub fn lookup_members(
        &self,
        mesh_id: &str,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Vec<MemberRow>, LookupFailed>>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.lookups.try_send((mesh_id.to_owned(), reply)).ok()?;
        Some(answer)
    }

    /// Hands a validated join to the db thread (see `join`). Never blocks;
    /// `None` when the join queue is full or gone.
    pub fn join(
        &self,
        request: crate::join::JoinRequest,
        member_id: String,
    ) -> Option<tokio::sync::oneshot::Receiver<join::JoinOutcome>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = join::JoinJob {
            request,
            member_id,
            reply,
        };
        self.joins.try_send(job).ok()?;
        Some(answer)
    }

    /// Never blocks: shards call it from their event loops. Err when the
    /// bounded queue is full (caller counts it / answers `unavailable`).
    pub fn try_send(&self, cmd: DbCommand) -> Result<(), DbQueueFull> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(cmd) | mpsc::error::TrySendError::Closed(cmd) => {
                DbQueueFull(cmd)
            }
        })
    }
}

/// What one committed batch cost, for the batch-latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Commands in the batch.
    pub commands: usize,
    /// Wall time of `write_batch` (the round trip included).
    pub elapsed: Duration,
}

/// Called on the db-writer thread after every committed batch.
pub type BatchObserver = Box<dyn FnMut(BatchStats) + Send>;

/// Tuning for [`spawn_with`]; `Default` is what the broker uses.
pub struct DbOptions {
    /// Capacity of the shards → db-writer channel.
    pub queue_capacity: usize,
    /// Most commands kept in memory while Postgres is down or slow.
    pub max_buffered: usize,
    /// How long the shutdown flush may take (default
    /// [`SHUTDOWN_FLUSH_TIMEOUT`]).
    pub shutdown_flush: Duration,
    /// See the module doc ("Batch latency").
    pub on_batch: Option<BatchObserver>,
    /// The membership directory kept fresh by the lookup task (see
    /// `members`); `None` runs no refresh.
    pub directory: Option<Arc<Directory>>,
    /// How often loaded meshes are reloaded (how long a revocation takes).
    pub member_refresh: Duration,
    /// The durable lane's receiving side; `None` runs no held writer.
    pub held: Option<HeldOptions>,
    /// Loading an earlier run's held envelopes at start (needs
    /// `directory`); `None` loads nothing.
    pub restore: Option<RestoreOptions>,
    /// The audit lane's batches and bounds.
    pub audit: AuditOptions,
    /// With several nodes (`NATS_URL`): this node's id, set on every
    /// connection as `meshbroker.node_id`, which the presence and held SQL
    /// read (whose rows to write, close and reload).
    pub node_id: Option<String>,
}

/// The durable lane's writer (see `held`).
pub struct HeldOptions {
    pub lane: held::HeldLane,
    pub rx: mpsc::UnboundedReceiver<held::HeldBatch>,
    pub batching: held::HeldBatching,
    /// Called after every committed held batch.
    pub on_batch: Option<BatchObserver>,
}

/// The start-up load of held envelopes (see `restore`).
pub struct RestoreOptions {
    /// `HELD_TTL_SECONDS`, for rows written without an `expires_at`.
    pub held_ttl: Duration,
    pub on_restored: restore::OnRestored,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 16_384,
            max_buffered: 100_000,
            shutdown_flush: SHUTDOWN_FLUSH_TIMEOUT,
            on_batch: None,
            directory: None,
            member_refresh: Duration::from_secs(5),
            held: None,
            restore: None,
            audit: AuditOptions::default(),
            node_id: None,
        }
    }
}

impl std::fmt::Debug for DbOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbOptions")
            .field("queue_capacity", &self.queue_capacity)
            .field("max_buffered", &self.max_buffered)
            .field("shutdown_flush", &self.shutdown_flush)
            .field("on_batch", &self.on_batch.is_some())
            .field("audit", &self.audit)
            .finish()
    }
}

/// The running db-writer thread.
#[derive(Debug)]
pub struct DbThread {
    join: std::thread::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
    held_stop: Arc<tokio::sync::Notify>,
    audit_stop: Arc<tokio::sync::Notify>,
}

impl DbThread {
    /// Stops taking commands (what is queued is still written), flushes
    /// (bounded: ~8 s when Postgres is down) and returns once the thread
    /// is done. Explicit rather than waiting for every `DbHandle` to drop,
    /// so a handle kept by a straggling task cannot hang shutdown.
    pub fn join(self) {
        self.stop.notify_one();
        self.held_stop.notify_one();
        self.audit_stop.notify_one();
        if self.join.join().is_err() {
            tracing::error!(target: "db", "db writer panicked");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url: {0}")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("postgres: {}", detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("cannot start the db runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// A Postgres error with the server's message, which tokio-postgres keeps
/// out of its own `Display` ("db error").
fn detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn parse_url(database_url: &str) -> Result<tokio_postgres::Config, DbError> {
    tokio_postgres::Config::from_str(database_url).map_err(DbError::InvalidUrl)
}

/// The connection settings, with `meshbroker.node_id` set when this node
/// is one of several.
pub(crate) fn node_config(
    database_url: &str,
    node_id: Option<&str>,
) -> Result<tokio_postgres::Config, DbError> {
    let mut config = parse_url(database_url)?;
    if let Some(node) = node_id {
        let options = format!(
            "{} -c meshbroker.node_id={node}",
            config.get_options().unwrap_or("")
        );
        config.options(options.trim());
    }
    Ok(config)
}

/// Spawns the thread named "db-writer" running a tokio current-thread
/// runtime. Returns at once (never waits for Postgres).
pub fn spawn(database_url: String, status: Arc<DbStatus>) -> std::io::Result<(DbHandle, DbThread)> {
    spawn_with(database_url, status, DbOptions::default())
}

/// [`spawn`] with explicit options (queue bounds, batch observer).
/// An unparsable URL is `ErrorKind::InvalidInput`.
pub fn spawn_with(
    database_url: String,
    status: Arc<DbStatus>,
    mut options: DbOptions,
) -> std::io::Result<(DbHandle, DbThread)> {
    let config = node_config(&database_url, options.node_id.as_deref())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
    let (lookups, lookup_rx) = mpsc::channel(LOOKUP_QUEUE);
    let (admin, admin_rx) = mpsc::channel(LOOKUP_QUEUE);
    let (joins, join_rx) = mpsc::channel(join::JOIN_QUEUE);
    let joiner = join::JoinTask::new(config.clone(), join_rx, options.directory.clone());
    let members = members::MemberLoader::new(
        config.clone(),
        lookup_rx,
        admin_rx,
        options.directory.clone(),
        options.member_refresh,
    );
    let (audit, audit_writer) = AuditLane::new(
        config.clone(),
        std::mem::take(&mut options.audit),
        options.shutdown_flush,
    );
    let audit_stop = audit_writer.stopper();
    let stop = Arc::new(tokio::sync::Notify::new());
    let held_stop = Arc::new(tokio::sync::Notify::new());
    let started = SystemTime::now();
    let restorer = match (options.restore.take(), options.directory.clone()) {
        (Some(restore), Some(directory)) => Some(restore::Restorer {
            config: config.clone(),
            started,
            directory,
            held_ttl: restore.held_ttl,
            on_restored: restore.on_restored,
            takeover: None,
        }),
        _ => None,
    };
    let held_writer = options.held.take().map(|held| {
        held::HeldWriter::new(
            config.clone(),
            held.rx,
            held.lane,
            held.batching,
            held.on_batch,
            held_stop.clone(),
            options.shutdown_flush,
        )
    });
    let worker = worker::Worker::new(config, status, rx, stop.clone(), options);
    let join = std::thread::Builder::new()
        .name("db-writer".to_owned())
        .spawn(move || {
            runtime.block_on(async {
                let loader = tokio::spawn(members.run());
                let joining = tokio::spawn(joiner.run());
                let restoring = restorer.map(|r| tokio::spawn(r.run()));
                let held = held_writer.map(|w| tokio::spawn(w.run()));
                let audit = tokio::spawn(audit_writer.run());
                worker.run().await;
                if let Some(held) = held {
                    let _ = held.await;
                }
                loader.abort();
                joining.abort();
                if let Some(restoring) = restoring {
                    restoring.abort();
                }
                // Stopped with the worker, on the same deadline.
                let _ = audit.await;
            })
        })?;
    Ok((
        DbHandle {
            tx,
            lookups,
            admin,
            joins,
            audit,
        },
        DbThread {
            join,
            stop,
            held_stop,
            audit_stop,
        },
    ))
}

/// Connect once, walk one mesh's audit chain ([`chain::verify_chain`]),
/// disconnect: for `meshbroker audit verify`. Runs no migration (a
/// database without the chain columns is an error).
pub fn verify_chain_blocking(
    database_url: &str,
    mesh_id: &str,
) -> Result<chain::ChainReport, DbError> {
    let config = parse_url(database_url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, task) = worker::connect(&config).await?;
        let report = chain::verify_chain(&client, mesh_id).await;
        drop(client);
        let _ = task.await;
        report
    })
}

/// Connect once, run migrations, disconnect: for `meshbroker migrate` and
/// start-up checks. Returns how many migrations were applied.
pub fn migrate_blocking(database_url: &str) -> Result<usize, DbError> {
    let config = parse_url(database_url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (mut client, task) = worker::connect(&config).await?;
        let applied = run_migrations(&mut client).await;
        drop(client);
        let _ = task.await;
        applied
    })
}
