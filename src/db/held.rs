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
use super::intake::{until, Intake};
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
    /// Handed over by another node (README "Several nodes"): this node
    /// holds it now, so its row is this node's (`held_by`), and should this
    /// node die it is taken over with the rest of its rows. Direct rows
    /// only: a broadcast row is the sender's node's for its other members.
    Adopt { envelope: Arc<Envelope> },
}

impl HeldCommand {
    /// Whether a hold it depends on is still uncommitted.
    fn must_wait(&self) -> bool {
        match self {
            // Only committed rows are handed over.
            HeldCommand::Hold { .. } | HeldCommand::Adopt { .. } => false,
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
    /// Sequences whose hold the server refused for its data (its mesh or
    /// sender deleted meanwhile): answered with an error, not an ack.
    refused: std::sync::Mutex<Vec<u64>>,
    any_refused: std::sync::atomic::AtomicBool,
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

    /// Whether the hold of `seq` was refused (taken off the list); one
    /// atomic load when none was.
    pub fn take_refused(&self, seq: u64) -> bool {
        if !self.any_refused.load(Ordering::Acquire) {
            return false;
        }
        let mut refused = self.refused.lock().expect("refused lock");
        let found = refused.iter().position(|&s| s == seq);
        if let Some(at) = found {
            refused.swap_remove(at);
        }
        self.any_refused
            .store(!refused.is_empty(), Ordering::Release);
        found.is_some()
    }

    /// Before the watermark passes `seq`, so its ack never goes out.
    fn refuse(&self, seq: u64) {
        self.refused.lock().expect("refused lock").push(seq);
        self.any_refused.store(true, Ordering::Release);
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

/// Batch bounds (`HELD_BATCH_MAX_ROWS`, `HELD_BATCH_MAX_WAIT_US`) and how
/// many connections write batches at once (`HELD_WRITER_CONNECTIONS`).
#[derive(Debug, Clone, Copy)]
pub struct HeldBatching {
    pub max_rows: usize,
    pub max_wait: Duration,
    pub connections: usize,
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
    config: Config,
    intake: Intake<mpsc::UnboundedReceiver<HeldBatch>>,
    lane: HeldLane,
    batching: HeldBatching,
    on_batch: Option<BatchObserver>,
    backlog: VecDeque<Item>,
    /// Marks and expiries whose holds are not committed yet.
    waiting: Vec<Item>,
    /// Per shard: the highest ack sequence received.
    received: Vec<u64>,
    /// False once a connect or a write has failed, until a connect succeeds:
    /// holds received meanwhile are resolved at once (acked not durable).
    /// A first connect still under way does not count as down.
    reachable: bool,
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
            intake: Intake::new(rx, stop, shutdown_flush),
            lane,
            batching,
            on_batch,
            backlog: VecDeque::new(),
            waiting: Vec::new(),
            received: vec![0; shards],
            reachable: true,
        }
    }

    fn closed(&self) -> bool {
        self.intake.closed()
    }

    fn expired(&self) -> bool {
        self.intake.expired()
    }

    /// Waits for batches and moves them into the backlog (see `intake`).
    async fn receive(&mut self) {
        let mut batches = Vec::with_capacity(64);
        if self.intake.receive(&mut batches, 64).await == 0 {
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
            let deadline = self.intake.deadline();
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

    /// A batch the server refused for its data even skipping rows whose
    /// mesh or sender is gone: one command at a time, so only the command
    /// at fault is given up (logged, its hold settled).
    async fn write_singly(&mut self, live: &Live, batch: Vec<Item>) -> Flow {
        let mut rest = batch.into_iter();
        while let Some(item) = rest.next() {
            let one = [&item.command];
            let write = timeout(
                WRITE_TIMEOUT,
                write_held_batch(&live.client, &live.statements, &one, Inserts::Checked),
            );
            match self.drive(write).await {
                Some(Ok(Ok(()))) => self.committed(vec![item]),
                Some(Ok(Err(e))) if !is_transient(&e, &live.client) => {
                    tracing::warn!(target: "db", error = %e, commands = 1, "held write rejected");
                    if let HeldCommand::Hold { ack, .. } = &item.command {
                        if *ack != 0 {
                            self.lane.commits[item.shard].refuse(*ack);
                        }
                    }
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

    fn has_work(&self) -> bool {
        !self.backlog.is_empty() || !self.waiting.is_empty()
    }

    /// Opens the lane's connections, all or none.
    async fn open_all(&mut self) -> Result<Vec<Live>, super::DbError> {
        let config = self.config.clone();
        let count = self.batching.connections.max(1);
        let mut conns = Vec::with_capacity(count);
        for _ in 0..count {
            match self.drive(open(&config)).await {
                Some(Ok(live)) => conns.push(live),
                Some(Err(e)) => return Err(e),
                None => return Err(super::DbError::Timeout("shutdown deadline")),
            }
        }
        Ok(conns)
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut conns: Vec<Live> = Vec::new();
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut turn = 0usize;
        loop {
            if self.expired() {
                break;
            }
            if conns.is_empty() {
                if self.closed() && !self.has_work() {
                    break;
                }
                match self.open_all().await {
                    Ok(opened) => {
                        backoff.reset();
                        self.reachable = true;
                        conns = opened;
                    }
                    Err(e) => {
                        if self.expired() {
                            break;
                        }
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
            }
            if conns.iter().any(|c| c.task.is_finished()) {
                tracing::warn!(target: "db", "held writer connection lost");
                self.down(&mut conns, &mut inflight).await;
                continue;
            }
            // One batch in flight per connection; later ones go while the
            // first commits, so Postgres works on several at once.
            while inflight.len() < conns.len() && self.has_work() {
                self.fill().await;
                let batch = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                let live = &conns[turn % conns.len()];
                turn += 1;
                inflight.push_back(InFlight::start(live, batch));
            }
            let Some(oldest) = inflight.front_mut() else {
                if self.has_work() {
                    // Only marks waiting for holds that are not here yet.
                    if self.drive(sleep(self.batching.max_wait)).await.is_none() {
                        break;
                    }
                    continue;
                }
                if self.closed() {
                    break;
                }
                let lost = futures_any_finished(&mut conns);
                tokio::select! {
                    _ = self.receive() => {}
                    _ = lost => {
                        tracing::warn!(target: "db", "held writer connection lost");
                        self.down(&mut conns, &mut inflight).await;
                    }
                }
                continue;
            };
            // Commits are taken in the order the batches went out, so each
            // shard's watermark only ever covers committed holds.
            let handle = oldest
                .handle
                .as_mut()
                .expect("a batch in flight has its task");
            let Some(joined) = self.drive(handle).await else {
                break;
            };
            let flight = inflight.pop_front().expect("front checked");
            let started = flight.started;
            let items = flight.items();
            match joined {
                Ok(Written::Committed) => {
                    if let Some(observe) = self.on_batch.as_mut() {
                        observe(BatchStats {
                            commands: items.len(),
                            elapsed: started.elapsed(),
                        });
                    }
                    self.committed(items);
                }
                Ok(Written::Rejected(error)) => {
                    tracing::warn!(target: "db", error = %error, commands = items.len(), "held write rejected");
                    match self.write_singly(&conns[0], items).await {
                        Flow::Continue => {}
                        Flow::Down => self.down(&mut conns, &mut inflight).await,
                        Flow::Stop => break,
                    }
                }
                Ok(Written::Failed(error)) => {
                    tracing::warn!(target: "db", error = %error, commands = items.len(), "held write failed");
                    inflight.push_front(InFlight::done(items));
                    self.down(&mut conns, &mut inflight).await;
                }
                Err(e) => {
                    tracing::error!(target: "db", error = %e, commands = items.len(), "held write task failed");
                    inflight.push_front(InFlight::done(items));
                    self.down(&mut conns, &mut inflight).await;
                }
            }
        }
        let lost = self.backlog.len()
            + self.waiting.len()
            + inflight.iter().map(|f| f.items.len()).sum::<usize>();
        if lost > 0 {
            tracing::warn!(target: "db", lost, "held flush abandoned");
        }
        self.resolve_unwritten();
        tracing::info!(target: "db", "held writer stopped");
    }

    /// A connection failed: every connection goes, what was in flight goes
    /// back to the front of the backlog in order (a batch that did commit
    /// meanwhile is written again, which changes nothing), and holds still
    /// waiting are answered not durable.
    async fn down(&mut self, conns: &mut Vec<Live>, inflight: &mut VecDeque<InFlight>) {
        for live in conns.drain(..) {
            live.task.abort();
        }
        let mut back = Vec::new();
        for mut flight in inflight.drain(..) {
            if let Some(handle) = flight.handle.as_mut() {
                // Its connection is gone: the write ends at once.
                let _ = handle.await;
            }
            back.extend(flight.items());
        }
        self.requeue(back);
        self.reachable = false;
        self.resolve_unwritten();
    }
}

/// Resolves when one of the connections' I/O tasks ends.
async fn futures_any_finished(conns: &mut [Live]) {
    std::future::poll_fn(|cx| {
        for live in conns.iter_mut() {
            if std::future::Future::poll(std::pin::Pin::new(&mut live.task), cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    })
    .await
}

/// What one batch's write came to.
enum Written {
    Committed,
    /// Refused for its data, even skipping rows whose mesh or sender is gone.
    Rejected(String),
    /// The connection failed or the write timed out: to be retried.
    Failed(String),
}

/// A batch being written on one connection.
struct InFlight {
    /// Shared with the write task only while it runs.
    items: Arc<Vec<Item>>,
    started: Instant,
    handle: Option<tokio::task::JoinHandle<Written>>,
}

impl InFlight {
    fn start(live: &Live, batch: Vec<Item>) -> InFlight {
        let items = Arc::new(batch);
        let job = write_batch_on(live.client.clone(), live.statements.clone(), items.clone());
        InFlight {
            items,
            started: Instant::now(),
            handle: Some(tokio::spawn(job)),
        }
    }

    /// A batch already back from its task.
    fn done(items: Vec<Item>) -> InFlight {
        InFlight {
            items: Arc::new(items),
            started: Instant::now(),
            handle: None,
        }
    }

    /// The batch back, once its task has ended (it dropped its share).
    fn items(self) -> Vec<Item> {
        Arc::try_unwrap(self.items).unwrap_or_else(|_| unreachable!("the write task has ended"))
    }
}

/// The write task: the batch in one transaction; once more skipping rows
/// whose mesh or sender is gone if the server refused it for its data.
async fn write_batch_on(
    client: Arc<tokio_postgres::Client>,
    statements: Arc<HeldStatements>,
    items: Arc<Vec<Item>>,
) -> Written {
    let commands: Vec<&HeldCommand> = items.iter().map(|i| &i.command).collect();
    let mut outcome = Inserts::Plain;
    loop {
        let write = write_held_batch(&client, &statements, &commands, outcome);
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => return Written::Committed,
            Ok(Err(e)) if is_transient(&e, &client) => return Written::Failed(e.to_string()),
            Ok(Err(e)) if outcome == Inserts::Checked => return Written::Rejected(e.to_string()),
            Ok(Err(_)) => outcome = Inserts::Checked,
            Err(_) => return Written::Failed("timed out".to_owned()),
        }
    }
}

/// Whether `batch` holds the hold `item` waits for (then it may follow in
/// the same transaction, after it).
fn holds_in(batch: &[Item], item: &Item) -> bool {
    let envelope = match &item.command {
        HeldCommand::Delivered { envelope, .. } | HeldCommand::Expired { envelope } => envelope,
        HeldCommand::Hold { .. } | HeldCommand::Adopt { .. } => return true,
    };
    let pending = envelope.holds_in_flight.load(Ordering::Acquire) as usize;
    let here = batch
        .iter()
        .filter(|i| matches!(&i.command, HeldCommand::Hold { envelope: e, .. } if Arc::ptr_eq(e, envelope)))
        .count();
    here >= pending
}

/// One of the writer's connections.
struct Live {
    client: Arc<tokio_postgres::Client>,
    task: ConnTask,
    statements: Arc<HeldStatements>,
}

async fn open(config: &Config) -> Result<Live, super::DbError> {
    let (mut client, task) = connect(config).await?;
    // The schema this lane writes may be newer than the database: the
    // migrations are idempotent and serialized, so each lane runs them.
    run_migrations(&mut client).await?;
    let statements = HeldStatements::prepare(&client).await?;
    Ok(Live {
        client: Arc::new(client),
        task,
        statements: Arc::new(statements),
    })
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

    #[test]
    fn a_refused_hold_is_reported_once_to_its_shard() {
        let commits = Commits::default();
        assert!(!commits.take_refused(7));
        commits.refuse(7);
        assert!(!commits.take_refused(6));
        assert!(commits.take_refused(7));
        assert!(!commits.take_refused(7));
    }
}
