//! The durable lane: held envelopes, their delivery marks and expiries,
//! written to `mesh.message_queue` (and `mesh.message_delivery`) in group
//! commits, on a connection of its own so nothing else queues ahead.
//!
//! - **Never drops.** The lane is bounded in bytes where envelopes enter it:
//!   a send that must be held reserves its frame in the [`HeldBudget`]
//!   (`MAX_HELD_MEMORY_BYTES`) and is refused `unavailable` over it. The
//!   writer keeps every command until it is committed (or refused by the
//!   server for its data, which no retry can fix), and releases the bytes.
//! - **Batches.** A batch closes at `HELD_BATCH_MAX_ROWS` commands or when
//!   its oldest has waited `HELD_BATCH_MAX_WAIT_US`, and is one
//!   transaction: BEGIN, one multi-row statement per kind and COMMIT,
//!   pipelined in one round trip (see `held_batch`).
//! - **Commits reach the shards** as a watermark per shard
//!   ([`Commits`]): each hold a sender's ack waits on carries the shard's
//!   sequence number; the writer publishes the highest committed one and
//!   wakes the shard, which acks everything up to it. Knowing nothing of
//!   shard internals, it needs no reply channel per envelope.
//! - **Postgres away.** Holds received while the writer has no connection,
//!   and every hold still unwritten when its connection fails, are
//!   *resolved* at once (the `resolved` watermark): their acks go out with
//!   `"durable":false`, and the rows are written on reconnect (backoff
//!   0.25 s doubling to 5 s, so within 10 s of Postgres coming back).
//! - **Marks after rows.** A delivery mark or an expiry of an envelope
//!   whose hold is not committed yet waits here until it is (see
//!   `Envelope::holds_in_flight`): a mark can come from another shard
//!   before the hold it marks.
//! - **Shutdown.** When the lane closes it flushes within the db thread's
//!   deadline; what it could not write is logged and counted as lost.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use atomic_waker::AtomicWaker;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_postgres::Config;

use super::held_batch::{write_held_batch, HeldStatements, Inserts};
use super::worker::{connect, is_transient, Backoff, ConnTask};
use super::{run_migrations, BatchObserver, BatchStats, WRITE_TIMEOUT};
use crate::mesh::directory::MemberEntry;
use crate::mesh::held::HeldBudget;
use crate::mesh::Envelope;

/// Work for the durable lane.
pub enum HeldCommand {
    /// Store `envelope` for `members`. `ack`: the shard's sequence number
    /// its sender's ack waits on (0: none, it was held after its ack).
    /// The envelope's bytes are reserved in the budget and one hold is
    /// counted in flight on it.
    Hold {
        envelope: Arc<Envelope>,
        members: Vec<Arc<MemberEntry>>,
        ack: u64,
    },
    /// A held envelope was written to a session of `member`.
    Delivered {
        envelope: Arc<Envelope>,
        member: Arc<MemberEntry>,
        at: SystemTime,
    },
    /// Dropped unpushed: past its `expires_at`.
    Expired { envelope: Arc<Envelope> },
}

impl HeldCommand {
    /// Whether a hold it depends on is still uncommitted.
    fn must_wait(&self) -> bool {
        match self {
            HeldCommand::Hold { .. } => false,
            HeldCommand::Delivered { envelope, .. } | HeldCommand::Expired { envelope } => {
                envelope.has_holds_in_flight()
            }
        }
    }
}

/// What one shard hands the lane in one go.
pub struct HeldBatch {
    pub shard: usize,
    pub commands: Vec<HeldCommand>,
}

/// One shard's view of what the writer did with its holds.
#[derive(Default)]
pub struct Commits {
    /// Highest ack sequence whose hold is committed.
    durable: AtomicU64,
    /// Highest ack sequence answered: committed, or given up on for now
    /// (Postgres away) and to be acked `durable:false`.
    resolved: AtomicU64,
    waker: AtomicWaker,
}

impl Commits {
    /// `(durable, resolved)` once `resolved` has passed `after`.
    pub fn poll_past(&self, after: u64, cx: &mut Context<'_>) -> Poll<(u64, u64)> {
        let ready = || {
            let resolved = self.resolved.load(Ordering::Acquire);
            (resolved > after).then(|| (self.durable.load(Ordering::Acquire), resolved))
        };
        if let Some(marks) = ready() {
            return Poll::Ready(marks);
        }
        self.waker.register(cx.waker());
        match ready() {
            Some(marks) => Poll::Ready(marks),
            None => Poll::Pending,
        }
    }

    fn publish(&self, durable: u64, resolved: u64) {
        self.durable.fetch_max(durable, Ordering::AcqRel);
        self.resolved
            .fetch_max(resolved.max(durable), Ordering::AcqRel);
        self.waker.wake();
    }
}

/// The shards' side of the lane.
#[derive(Clone)]
pub struct HeldLane {
    tx: mpsc::UnboundedSender<HeldBatch>,
    pub budget: Arc<HeldBudget>,
    pub commits: Arc<[Commits]>,
}

impl HeldLane {
    /// Never blocks. After the writer has stopped (shutdown) the commands
    /// are dropped with their reservations released; nothing is acked then.
    pub fn submit(&self, batch: HeldBatch) {
        if let Err(mpsc::error::SendError(batch)) = self.tx.send(batch) {
            settle(&self.budget, &batch.commands);
        }
    }
}

/// Releases what a finished (or abandoned) hold had reserved.
fn settle(budget: &HeldBudget, commands: &[HeldCommand]) {
    for command in commands {
        if let HeldCommand::Hold { envelope, .. } = command {
            budget.release(envelope.frame.len());
            envelope.hold_settled();
        }
    }
}

/// Batch bounds (`HELD_BATCH_MAX_ROWS`, `HELD_BATCH_MAX_WAIT_US`).
#[derive(Debug, Clone, Copy)]
pub struct HeldBatching {
    pub max_rows: usize,
    pub max_wait: Duration,
}

/// The lane and its writer, for `spawn_with`.
pub(crate) fn lane(
    shards: usize,
    budget: Arc<HeldBudget>,
) -> (HeldLane, mpsc::UnboundedReceiver<HeldBatch>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let commits: Arc<[Commits]> = (0..shards).map(|_| Commits::default()).collect();
    (
        HeldLane {
            tx,
            budget,
            commits,
        },
        rx,
    )
}

struct Item {
    shard: usize,
    command: HeldCommand,
    received: Instant,
}

pub(crate) struct HeldWriter {
    pub(crate) config: Config,
    pub(crate) rx: mpsc::UnboundedReceiver<HeldBatch>,
    pub(crate) lane: HeldLane,
    pub(crate) batching: HeldBatching,
    pub(crate) on_batch: Option<BatchObserver>,
    pub(crate) stop: Arc<tokio::sync::Notify>,
    pub(crate) shutdown_flush: Duration,
    backlog: VecDeque<Item>,
    /// Marks and expiries whose holds are not committed yet.
    waiting: Vec<Item>,
    /// Per shard: the highest ack sequence received.
    received: Vec<u64>,
    /// False once a connect or a write has failed, until a connect succeeds:
    /// holds received meanwhile are resolved at once (acked not durable).
    /// A first connect still under way does not count as down.
    reachable: bool,
    deadline: Option<Instant>,
}

enum Flow {
    Continue,
    Down,
    Stop,
}

impl HeldWriter {
    pub(crate) fn new(
        config: Config,
        rx: mpsc::UnboundedReceiver<HeldBatch>,
        lane: HeldLane,
        batching: HeldBatching,
        on_batch: Option<BatchObserver>,
        stop: Arc<tokio::sync::Notify>,
        shutdown_flush: Duration,
    ) -> Self {
        let shards = lane.commits.len();
        HeldWriter {
            config,
            rx,
            lane,
            batching,
            on_batch,
            stop,
            shutdown_flush,
            backlog: VecDeque::new(),
            waiting: Vec::new(),
            received: vec![0; shards],
            reachable: true,
            deadline: None,
        }
    }

    fn closed(&self) -> bool {
        self.deadline.is_some()
    }

    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Waits for batches and moves them into the backlog. On close, starts
    /// the shutdown clock; never resolves after that.
    async fn receive(&mut self) {
        if self.closed() {
            return std::future::pending().await;
        }
        let mut batches = Vec::with_capacity(64);
        let received = tokio::select! {
            n = self.rx.recv_many(&mut batches, 64) => n,
            _ = self.stop.notified() => {
                self.rx.close();
                return;
            }
        };
        if received == 0 {
            self.deadline = Some(Instant::now() + self.shutdown_flush);
            return;
        }
        let now = Instant::now();
        for batch in batches {
            for command in batch.commands {
                if let HeldCommand::Hold { ack, .. } = &command {
                    let last = &mut self.received[batch.shard];
                    *last = (*last).max(*ack);
                }
                self.backlog.push_back(Item {
                    shard: batch.shard,
                    command,
                    received: now,
                });
            }
        }
        if !self.reachable {
            self.resolve_unwritten();
        }
    }

    /// Everything received so far is answered: acks waiting on holds not
    /// yet committed go out `durable:false`.
    fn resolve_unwritten(&self) {
        for (shard, &received) in self.received.iter().enumerate() {
            self.lane.commits[shard].publish(0, received);
        }
    }

    /// Runs `fut` while still receiving. `None` when the shutdown deadline
    /// passes first.
    async fn drive<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            let deadline = self.deadline;
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                _ = until(deadline) => return None,
                _ = self.receive() => {}
            }
        }
    }

    /// Waits (receiving) until the backlog holds a full batch or its oldest
    /// command has waited `max_wait`.
    async fn fill(&mut self) {
        while !self.closed() && self.backlog.len() < self.batching.max_rows {
            let Some(oldest) = self.backlog.front() else {
                return;
            };
            let close_at = oldest.received + self.batching.max_wait;
            if Instant::now() >= close_at {
                return;
            }
            tokio::select! {
                _ = sleep_until(close_at) => return,
                _ = self.receive() => {}
            }
        }
    }

    /// The next batch: what waited for its holds and may go now first,
    /// then the oldest of the backlog.
    fn take_batch(&mut self) -> Vec<Item> {
        let mut batch = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for item in waiting {
            if item.command.must_wait() {
                self.waiting.push(item);
            } else {
                batch.push(item);
            }
        }
        while batch.len() < self.batching.max_rows {
            let Some(item) = self.backlog.pop_front() else {
                break;
            };
            if item.command.must_wait() && !holds_in(&batch, &item) {
                self.waiting.push(item);
            } else {
                batch.push(item);
            }
        }
        batch
    }

    fn committed(&mut self, batch: Vec<Item>) {
        let mut durable = vec![0u64; self.received.len()];
        let commands: Vec<HeldCommand> = batch
            .into_iter()
            .map(|item| {
                if let HeldCommand::Hold { ack, .. } = &item.command {
                    durable[item.shard] = durable[item.shard].max(*ack);
                }
                item.command
            })
            .collect();
        settle(&self.lane.budget, &commands);
        for (shard, &upto) in durable.iter().enumerate() {
            if upto != 0 {
                self.lane.commits[shard].publish(upto, upto);
            }
        }
    }

    async fn write(
        &mut self,
        client: &tokio_postgres::Client,
        statements: &HeldStatements,
    ) -> Flow {
        self.fill().await;
        let batch = self.take_batch();
        if batch.is_empty() {
            // Only marks waiting for holds that are not here yet.
            return match self.drive(sleep(self.batching.max_wait)).await {
                Some(()) => Flow::Continue,
                None => Flow::Stop,
            };
        }
        let started = Instant::now();
        let commands: Vec<&HeldCommand> = batch.iter().map(|i| &i.command).collect();
        let mut outcome = self
            .attempt(client, statements, &commands, Inserts::Plain)
            .await;
        if matches!(&outcome, Some(Ok(Err(e))) if !is_transient(e, client)) {
            // Refused for its data, most likely rows of a mesh or sender
            // deleted meanwhile: once more, skipping those.
            outcome = self
                .attempt(client, statements, &commands, Inserts::Checked)
                .await;
        }
        drop(commands);
        match outcome {
            Some(Ok(Ok(()))) => {
                if let Some(observe) = self.on_batch.as_mut() {
                    observe(BatchStats {
                        commands: batch.len(),
                        elapsed: started.elapsed(),
                    });
                }
                self.committed(batch);
                Flow::Continue
            }
            Some(Ok(Err(e))) if !is_transient(&e, client) => {
                tracing::warn!(target: "db", error = %e, commands = batch.len(), "held write rejected");
                self.write_singly(client, statements, batch).await
            }
            Some(Ok(Err(e))) => {
                tracing::warn!(target: "db", error = %e, commands = batch.len(), "held write failed");
                self.requeue(batch);
                Flow::Down
            }
            Some(Err(_)) => {
                tracing::warn!(target: "db", error = "timed out", commands = batch.len(), "held write failed");
                self.requeue(batch);
                Flow::Down
            }
            None => {
                self.requeue(batch);
                Flow::Stop
            }
        }
    }

    async fn attempt(
        &mut self,
        client: &tokio_postgres::Client,
        statements: &HeldStatements,
        commands: &[&HeldCommand],
        inserts: Inserts,
    ) -> Option<Result<Result<(), tokio_postgres::Error>, tokio::time::error::Elapsed>> {
        let write = timeout(
            WRITE_TIMEOUT,
            write_held_batch(client, statements, commands, inserts),
        );
        self.drive(write).await
    }

    /// A batch the server refused for its data: one command at a time, so
    /// only the command at fault is given up (logged, its hold settled).
    async fn write_singly(
        &mut self,
        client: &tokio_postgres::Client,
        statements: &HeldStatements,
        batch: Vec<Item>,
    ) -> Flow {
        let mut rest = batch.into_iter();
        while let Some(item) = rest.next() {
            let one = [&item.command];
            let outcome = self
                .attempt(client, statements, &one, Inserts::Checked)
                .await;
            match outcome {
                Some(Ok(Ok(()))) => self.committed(vec![item]),
                Some(Ok(Err(e))) if !is_transient(&e, client) => {
                    tracing::warn!(target: "db", error = %e, commands = 1, "held write rejected");
                    self.committed(vec![item]);
                }
                outcome => {
                    self.requeue(std::iter::once(item).chain(rest).collect());
                    return if outcome.is_none() {
                        Flow::Stop
                    } else {
                        Flow::Down
                    };
                }
            }
        }
        Flow::Continue
    }

    fn requeue(&mut self, batch: Vec<Item>) {
        for item in batch.into_iter().rev() {
            self.backlog.push_front(item);
        }
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut conn: Option<Live> = None;
        loop {
            if self.expired() {
                break;
            }
            let Some(mut live) = conn.take() else {
                if self.closed() && self.backlog.is_empty() && self.waiting.is_empty() {
                    break;
                }
                let config = self.config.clone();
                match self.drive(open(&config)).await {
                    None => break,
                    Some(Ok(opened)) => {
                        backoff.reset();
                        self.reachable = true;
                        conn = Some(opened);
                    }
                    Some(Err(e)) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(target: "db", error = %e, "held writer connect failed");
                        self.reachable = false;
                        self.resolve_unwritten();
                        if self.drive(sleep(delay)).await.is_none() {
                            break;
                        }
                    }
                }
                continue;
            };
            if live.task.is_finished() {
                tracing::warn!(target: "db", "held writer connection lost");
                self.down(live);
                continue;
            }
            if !self.backlog.is_empty() || !self.waiting.is_empty() {
                match self.write(&live.client, &live.statements).await {
                    Flow::Continue => conn = Some(live),
                    Flow::Down => self.down(live),
                    Flow::Stop => break,
                }
                continue;
            }
            if self.closed() {
                break;
            }
            tokio::select! {
                _ = self.receive() => conn = Some(live),
                _ = &mut live.task => {
                    tracing::warn!(target: "db", "held writer connection lost");
                    self.reachable = false;
                    self.resolve_unwritten();
                }
            }
        }
        let lost = self.backlog.len() + self.waiting.len();
        if lost > 0 {
            tracing::warn!(target: "db", lost, "held flush abandoned");
        }
        self.resolve_unwritten();
        tracing::info!(target: "db", "held writer stopped");
    }

    fn down(&mut self, live: Live) {
        live.task.abort();
        self.reachable = false;
        self.resolve_unwritten();
    }
}

/// Whether `batch` holds the hold `item` waits for (then it may follow in
/// the same transaction, after it).
fn holds_in(batch: &[Item], item: &Item) -> bool {
    let envelope = match &item.command {
        HeldCommand::Delivered { envelope, .. } | HeldCommand::Expired { envelope } => envelope,
        HeldCommand::Hold { .. } => return true,
    };
    let pending = envelope.holds_in_flight.load(Ordering::Acquire) as usize;
    let here = batch
        .iter()
        .filter(|i| matches!(&i.command, HeldCommand::Hold { envelope: e, .. } if Arc::ptr_eq(e, envelope)))
        .count();
    here >= pending
}

/// The writer's connection.
struct Live {
    client: tokio_postgres::Client,
    task: ConnTask,
    statements: HeldStatements,
}

async fn open(config: &Config) -> Result<Live, super::DbError> {
    let (mut client, task) = connect(config).await?;
    // The schema this lane writes may be newer than the database: the
    // migrations are idempotent and serialized, so each lane runs them.
    run_migrations(&mut client).await?;
    let statements = HeldStatements::prepare(&client).await?;
    Ok(Live {
        client,
        task,
        statements,
    })
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn the_watermark_answers_once_resolved_passes_and_says_what_is_durable() {
        let commits = Commits::default();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(commits.poll_past(0, &mut cx).is_pending());
        // Postgres away: 1..=3 answered, none durable.
        commits.publish(0, 3);
        assert_eq!(commits.poll_past(0, &mut cx), Poll::Ready((0, 3)));
        assert!(commits.poll_past(3, &mut cx).is_pending());
        // Back: 1..=5 committed; the watermarks never go back.
        commits.publish(5, 5);
        commits.publish(0, 4);
        assert_eq!(commits.poll_past(3, &mut cx), Poll::Ready((5, 5)));
    }
}
