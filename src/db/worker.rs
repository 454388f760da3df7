//! The db-writer thread's loop: connect (with backoff), migrate, ping,
//! write batches, and drain on shutdown. See the `db` module doc.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::{Client, Config, NoTls};

use super::backlog::Backlog;
use super::batch::{write_batch, Statements};
use super::intake::{until, Intake};
use super::{
    run_migrations, BatchObserver, BatchStats, DbCommand, DbError, DbOptions, DbStatus,
    BACKOFF_MAX, BACKOFF_MIN, BATCH_MAX, CONNECT_TIMEOUT, PING_INTERVAL, PING_TIMEOUT,
    WRITE_TIMEOUT,
};

pub(crate) type ConnTask = JoinHandle<Result<(), tokio_postgres::Error>>;

/// Opens a connection, spawns its I/O future on the current runtime and
/// sets the session time zone. Bounded by `CONNECT_TIMEOUT`.
pub(crate) async fn connect(config: &Config) -> Result<(Client, ConnTask), DbError> {
    let open = async {
        let (client, connection) = config.connect(NoTls).await?;
        let task = tokio::spawn(connection);
        client.batch_execute("SET TimeZone = 'UTC'").await?;
        Ok::<_, DbError>((client, task))
    };
    timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| DbError::Timeout("connecting to postgres"))?
}

/// Reconnect delay: `BACKOFF_MIN` doubling to `BACKOFF_MAX`.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// A usable connection.
struct Live {
    client: Client,
    task: ConnTask,
    statements: Statements,
    next_ping: Instant,
}

/// With several nodes (`meshbroker.node_id` set on the connection), only
/// this node's rows and those of no node: other nodes' sessions are live.
const CLOSE_STALE_PRESENCE_SQL: &str = "\
UPDATE mesh.presence SET disconnected_at = now()::timestamp
WHERE disconnected_at IS NULL AND connected_at < $1
  AND (current_setting('meshbroker.node_id', true) IS NULL OR node_id IS NULL
    OR node_id = current_setting('meshbroker.node_id', true))";

/// At shutdown: the rows this run opened (connected since it started).
const CLOSE_RUN_PRESENCE_SQL: &str = "\
UPDATE mesh.presence SET disconnected_at = now()::timestamp
WHERE disconnected_at IS NULL AND connected_at >= $1
  AND node_id IS NOT DISTINCT FROM current_setting('meshbroker.node_id', true)";

/// Connect, set up the session, migrate and prepare. Returns the number
/// of migrations applied.
async fn open(config: &Config, started: SystemTime) -> Result<(Live, usize), DbError> {
    let (mut client, task) = connect(config).await?;
    let applied = run_migrations(&mut client).await?;
    // PROTOCOL.md §7: presence rows an earlier run left open (it did not
    // shut down cleanly) are closed. Rows of this run are never touched.
    client
        .execute(CLOSE_STALE_PRESENCE_SQL, &[&started])
        .await?;
    let statements = Statements::prepare(&client).await?;
    let live = Live {
        client,
        task,
        statements,
        next_ping: Instant::now() + PING_INTERVAL,
    };
    Ok((live, applied))
}

/// The receiving side: the channel, the backlog it fills, and the shutdown
/// deadline once the channel has closed.
struct Inbox {
    intake: Intake<mpsc::Receiver<DbCommand>>,
    backlog: Backlog<DbCommand>,
    buf: Vec<DbCommand>,
    status: Arc<DbStatus>,
}

impl Inbox {
    fn closed(&self) -> bool {
        self.intake.closed()
    }

    fn expired(&self) -> bool {
        self.intake.expired()
    }

    /// Waits for commands and moves them into the backlog (see `intake`).
    async fn receive(&mut self) {
        if self.intake.receive(&mut self.buf, BATCH_MAX).await == 0 {
            return;
        }
        let dropped = self.backlog.extend(self.buf.drain(..));
        self.note(dropped);
    }

    fn note(&self, dropped: usize) {
        if dropped > 0 {
            self.status.add_dropped(dropped as u64);
        }
        self.status.set_buffered(self.backlog.len());
    }

    /// Runs `fut` while still draining the channel. `None` when the
    /// shutdown deadline passes first (`fut` is then dropped).
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
    /// Lost connection, timeout, server going away: keep and retry.
    Retry(String),
    /// The server refused the data itself: retrying cannot help.
    Rejected(String),
    Deadline,
}

/// Whether a failed write may succeed on retry: anything that is not an
/// error the server raised about the statement on a live connection, or a
/// server error of a transient class (08 connection exception, 40
/// transaction rollback, 53 insufficient resources, 57 operator
/// intervention such as a shutdown, 58 system error).
pub(crate) fn is_transient(e: &tokio_postgres::Error, client: &Client) -> bool {
    if client.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => matches!(code.code().get(..2), Some("08" | "40" | "53" | "57" | "58")),
    }
}

pub(crate) struct Worker {
    config: Config,
    started: SystemTime,
    status: Arc<DbStatus>,
    inbox: Inbox,
    on_batch: Option<BatchObserver>,
}

impl Worker {
    pub(crate) fn new(
        config: Config,
        status: Arc<DbStatus>,
        rx: mpsc::Receiver<DbCommand>,
        stop: Arc<tokio::sync::Notify>,
        options: DbOptions,
    ) -> Self {
        let inbox = Inbox {
            intake: Intake::new(rx, stop, options.shutdown_flush),
            backlog: Backlog::new(options.max_buffered),
            buf: Vec::with_capacity(BATCH_MAX),
            status: status.clone(),
        };
        Self {
            config,
            started: SystemTime::now(),
            status,
            inbox,
            on_batch: options.on_batch,
        }
    }

    fn mark_down(&self, conn: &mut Option<Live>) {
        self.status.set_up(false);
        if let Some(live) = conn.take() {
            // Dropping the client ends the connection future.
            live.task.abort();
        }
    }

    /// One write attempt, timed; the observer hears about successes.
    async fn attempt(&mut self, live: &Live, cmds: &[DbCommand]) -> Attempt {
        let started = Instant::now();
        let write = timeout(
            WRITE_TIMEOUT,
            write_batch(&live.client, &live.statements, cmds),
        );
        match self.inbox.drive(write).await {
            Some(Ok(Ok(()))) => {
                let stats = BatchStats {
                    commands: cmds.len(),
                    elapsed: started.elapsed(),
                };
                if let Some(observe) = self.on_batch.as_mut() {
                    observe(stats);
                }
                Attempt::Written
            }
            Some(Ok(Err(e))) if is_transient(&e, &live.client) => Attempt::Retry(e.to_string()),
            Some(Ok(Err(e))) => Attempt::Rejected(e.to_string()),
            Some(Err(_)) => Attempt::Retry("write timed out".to_owned()),
            None => Attempt::Deadline,
        }
    }

    /// Writes a batch taken from the backlog. A batch the server rejects
    /// (bad data, not a lost connection) is retried one command at a time
    /// so a single poison command is dropped (counted, logged) instead of
    /// blocking the queue forever. Whatever is not written on a transient
    /// failure goes back to the front of the backlog.
    async fn write(&mut self, live: &Live, batch: Vec<DbCommand>) -> Flow {
        let commands = batch.len();
        let flow = match self.attempt(live, &batch).await {
            Attempt::Written => Flow::Continue,
            Attempt::Retry(error) => {
                tracing::warn!(target: "db", error = %error, commands, "db write failed");
                self.requeue(batch);
                Flow::Down
            }
            Attempt::Deadline => {
                self.requeue(batch);
                Flow::Stop
            }
            Attempt::Rejected(error) if commands == 1 => {
                tracing::warn!(target: "db", error = %error, commands, "db write rejected");
                self.status.add_dropped(1);
                Flow::Continue
            }
            Attempt::Rejected(error) => {
                tracing::warn!(target: "db", error = %error, commands, "db write rejected");
                self.write_singly(live, batch).await
            }
        };
        self.inbox.note(0);
        flow
    }

    async fn write_singly(&mut self, live: &Live, batch: Vec<DbCommand>) -> Flow {
        let mut rest = batch.into_iter();
        while let Some(cmd) = rest.next() {
            let one = std::slice::from_ref(&cmd);
            match self.attempt(live, one).await {
                Attempt::Written => {}
                Attempt::Rejected(error) => {
                    tracing::warn!(target: "db", error = %error, commands = 1, "db write rejected");
                    self.status.add_dropped(1);
                }
                Attempt::Retry(error) => {
                    tracing::warn!(target: "db", error = %error, commands = 1, "db write failed");
                    self.requeue(std::iter::once(cmd).chain(rest).collect());
                    return Flow::Down;
                }
                Attempt::Deadline => {
                    self.requeue(std::iter::once(cmd).chain(rest).collect());
                    return Flow::Stop;
                }
            }
        }
        Flow::Continue
    }

    fn requeue(&mut self, batch: Vec<DbCommand>) {
        let dropped = self.inbox.backlog.requeue_front(batch);
        self.inbox.note(dropped);
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut conn: Option<Live> = None;
        let mut attempts: u64 = 0;
        loop {
            if self.inbox.expired() {
                break;
            }
            let Some(live) = conn.as_mut() else {
                if self.inbox.closed() && self.inbox.backlog.is_empty() {
                    break;
                }
                attempts += 1;
                match self.inbox.drive(open(&self.config, self.started)).await {
                    None => break,
                    Some(Ok((live, applied))) => {
                        tracing::info!(target: "db", applied, "db migrated");
                        tracing::info!(target: "db", attempts, "db healthy");
                        self.status.set_up(true);
                        backoff.reset();
                        attempts = 0;
                        conn = Some(live);
                    }
                    Some(Err(e)) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(
                            target: "db",
                            error = %e,
                            attempts,
                            retry_in = %humantime::format_duration(delay),
                            "db connect failed"
                        );
                        if self.inbox.drive(sleep(delay)).await.is_none() {
                            break;
                        }
                    }
                }
                continue;
            };

            if !self.inbox.backlog.is_empty() {
                let batch = self.inbox.backlog.take_batch(BATCH_MAX);
                match self.write(live, batch).await {
                    Flow::Continue => {}
                    Flow::Down => self.mark_down(&mut conn),
                    Flow::Stop => break,
                }
                continue;
            }

            if self.inbox.closed() {
                break; // flushed
            }

            let next_ping = live.next_ping;
            tokio::select! {
                _ = self.inbox.receive() => {}
                ended = &mut live.task => {
                    let error = match ended {
                        Ok(Ok(())) => "connection closed".to_owned(),
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(target: "db", error = %error, "db connection lost");
                    // The task is finished: forget it rather than poll it again.
                    if let Some(live) = conn.take() {
                        drop(live.client);
                    }
                    self.status.set_up(false);
                }
                _ = sleep_until(next_ping) => {
                    let ping = timeout(PING_TIMEOUT, live.client.simple_query("SELECT 1"));
                    let error = match self.inbox.drive(ping).await {
                        Some(Ok(Ok(_))) => None,
                        Some(Ok(Err(e))) => Some(e.to_string()),
                        Some(Err(_)) => Some("ping timed out".to_owned()),
                        None => None,
                    };
                    match error {
                        None => live.next_ping = Instant::now() + PING_INTERVAL,
                        Some(error) => {
                            tracing::warn!(target: "db", error = %error, "db ping failed");
                            self.mark_down(&mut conn);
                        }
                    }
                }
            }
        }

        let lost = self.inbox.backlog.len();
        if lost > 0 {
            self.status.add_dropped(lost as u64);
            tracing::warn!(target: "db", lost, "db flush abandoned");
        }
        // PROTOCOL.md §7: every presence this run opened ends now, including
        // sessions whose peers never finished the close handshake.
        if let Some(live) = conn.as_ref() {
            let started = self.started;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&started];
            let closing = live.client.execute(CLOSE_RUN_PRESENCE_SQL, &params);
            match timeout(WRITE_TIMEOUT, closing).await {
                Ok(Ok(closed)) => tracing::info!(target: "db", closed, "presence closed"),
                Ok(Err(e)) => tracing::warn!(target: "db", error = %e, "presence close failed"),
                Err(_) => {
                    tracing::warn!(target: "db", error = "timed out", "presence close failed")
                }
            }
        }
        self.status.set_buffered(0);
        self.mark_down(&mut conn);
        tracing::info!(target: "db", "db writer stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_ceiling_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, vec![250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }
}
