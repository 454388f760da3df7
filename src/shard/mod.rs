//! One shard: a pinned thread running a monoio runtime (io_uring, or epoll
//! where io_uring cannot start) with its own SO_REUSEPORT listener. The shard
//! owns its connections and its slice of each mesh's routing table; it talks
//! to other shards only through their inboxes, in batches.
//!
//! - `conn`     — HTTP/1.1 on an accepted socket; hands upgrades to `session`.
//! - `session`  — one WebSocket peer: reader loop, writer task, hello, send.
//! - `link`     — what routing and housekeeping hold of a live session.
//! - `outbound` — a connection's bounded queue of encoded frames.
//! - `state`    — the shard's state and what it does with events, statuses,
//!   drains and sweeps.
//! - `readbuf`  — a connection's adaptively sized read buffer.
//! - `signal`   — a one-shot signal shared by one shard's tasks.
//! - `slots`    — `MAX_CONNECTIONS`: the open-socket count all shards share,
//!   and the guard each accepted socket holds.
//! - `accept`   — failed accepts: one log line per episode, the count, and
//!   the spare descriptor that sheds connections when out of descriptors.
mod accept;
mod conn;
mod crossing;
mod durable;
mod leases;
pub mod link;
pub mod outbound;
mod presence;
mod readbuf;
mod session;
mod signal;
pub(crate) mod slots;
mod state;

use crate::config::IoDriver;
use crate::context::BrokerContext;
use crate::ids::{IdGen, Rfc3339Clock};
use crate::inbox::{ShardInbox, Wakeup};
use crate::mesh::deliver::LocalRoutes;
use crate::metrics::{LocalHistograms, RejectReason};
use crate::protocol::CloseReason;
use accept::{AcceptErrors, AfterError, ACCEPT_BACKOFF};
use signal::LocalSignal;
use state::Shard;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Batches drained per inbox wakeup before yielding to sockets.
const INBOX_DRAIN: usize = 64;
/// How long connections get to finish their close handshake at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Housekeeping period: histograms, liveness, revocations.
const TICK: Duration = Duration::from_secs(1);
/// Housekeeping runs at least this often when the test knobs shorten the
/// ping interval.
const MIN_TICK: Duration = Duration::from_millis(10);
/// How long presence writes and audit events gather on the shard before
/// the db thread gets them.
const DB_FLUSH: Duration = Duration::from_millis(5);

pub struct ShardSpec {
    pub index: usize,
    pub listener: std::net::TcpListener,
    pub core: Option<core_affinity::CoreId>,
    pub inbox: ShardInbox,
}

/// Starts the shard's thread, named `shard-N` and pinned to its core. A
/// panic ends the thread; `panicked` then hears the shard's index, so the
/// broker stops instead of limping on with a dead shard.
pub fn spawn(
    spec: ShardSpec,
    ctx: Arc<BrokerContext>,
    panicked: crossbeam_channel::Sender<usize>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("shard-{}", spec.index))
        .spawn(move || {
            let _notice = PanicNotice {
                index: spec.index,
                panicked,
            };
            if let Some(core) = spec.core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(target: "shard", shard = spec.index, "pin failed");
                }
            }
            match build_runtime(spec.index, ctx.config.io_driver) {
                Ok(mut rt) => rt.block_on(run(spec, ctx)),
                Err(e) => {
                    tracing::error!(target: "shard", shard = spec.index, error = %e, "runtime failed");
                }
            }
        })
}

/// Dropped as the shard's thread ends; tells the broker if it unwinds.
struct PanicNotice {
    index: usize,
    panicked: crossbeam_channel::Sender<usize>,
}

impl Drop for PanicNotice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.panicked.send(self.index);
        }
    }
}

type ShardRuntime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// io_uring first; the epoll driver where io_uring is missing or refused
/// (old kernel, seccomp, memlock limits).
fn build_runtime(index: usize, driver: IoDriver) -> std::io::Result<ShardRuntime> {
    if driver == IoDriver::Epoll {
        tracing::info!(target: "shard", shard = index, driver = "epoll", "shard runtime");
        return epoll_runtime();
    }
    let uring = if monoio::utils::detect_uring() {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()
    } else {
        Err(std::io::Error::other("io_uring not available"))
    };
    match uring {
        Ok(rt) => {
            tracing::info!(target: "shard", shard = index, driver = "io_uring", "shard runtime");
            Ok(rt.into())
        }
        Err(e) => {
            tracing::warn!(target: "shard", shard = index, driver = "epoll", error = %e, "io_uring unavailable");
            epoll_runtime()
        }
    }
}

fn epoll_runtime() -> std::io::Result<ShardRuntime> {
    Ok(monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?
        .into())
}

async fn run(spec: ShardSpec, ctx: Arc<BrokerContext>) {
    let shards = ctx.shards.len();
    let shard = Rc::new(Shard {
        index: spec.index,
        metrics: ctx.metrics.shard(spec.index).clone(),
        histograms: RefCell::new(LocalHistograms::new()),
        ids: RefCell::new(IdGen::new(spec.index as u16)),
        clock: RefCell::new(Rfc3339Clock::default()),
        parser: RefCell::new(crate::protocol::Parser::default()),
        routes: RefCell::new(LocalRoutes::new(spec.index)),
        conns: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
        outgoing: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
        flusher: Cell::new(None),
        db_outbox: RefCell::new(Vec::new()),
        audit_outbox: RefCell::new(Vec::new()),
        db_flusher: Cell::new(None),
        durable: Default::default(),
        board: Default::default(),
        leases: Default::default(),
        shutdown: LocalSignal::default(),
        all_closed: LocalSignal::default(),
        ctx,
    });
    let listener = match monoio::net::TcpListener::from_std(spec.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(target: "shard", shard = spec.index, error = %e, "listener failed");
            return;
        }
    };
    monoio::spawn(inbox_loop(shard.clone(), spec.inbox));
    monoio::spawn(flush_loop(shard.clone()));
    monoio::spawn(db_flush_loop(shard.clone()));
    monoio::spawn(durable::ack_loop(shard.clone()));
    monoio::spawn(presence::publish_loop(shard.clone()));
    monoio::spawn(leases::lease_loop(shard.clone()));
    monoio::spawn(housekeeping(shard.clone()));
    let mut accept_errors = AcceptErrors::new(spec.index);
    let mut at_limit = false;
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    accept_errors.succeeded();
                    admit(&shard, stream, peer, &mut at_limit);
                }
                Err(e) => {
                    shard.metrics.accept_failed();
                    if accept_errors.failed(&e, listener.as_raw_fd()) == AfterError::Pause {
                        monoio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            },
            _ = shard.shutdown.wait() => break,
        }
    }
    drop(listener);
    shard.close_all();
    let _ = monoio::time::timeout(SHUTDOWN_GRACE, shard.all_closed.wait()).await;
    // The closed sessions' presence rows, audit events and what the durable
    // lane gathered go to the db thread, which the broker stops only after
    // every shard has returned.
    shard.flush_db();
    shard.flush_lane();
    shard.histograms.borrow_mut().publish(&shard.metrics);
}

/// Serves an accepted socket if a `MAX_CONNECTIONS` slot is free; else
/// closes it unread (counted; logged once per stretch at the limit).
fn admit(
    shard: &Rc<Shard>,
    stream: monoio::net::TcpStream,
    peer: std::net::SocketAddr,
    at_limit: &mut bool,
) {
    let Some(slot) = shard.ctx.connections.try_claim() else {
        shard.metrics.conn_rejected(RejectReason::MaxConnections);
        if !std::mem::replace(at_limit, true) {
            tracing::warn!(target: "shard", shard = shard.index,
                max = shard.ctx.config.max_connections, "connection limit reached");
        }
        drop(stream);
        return;
    };
    *at_limit = false;
    let shard = shard.clone();
    monoio::spawn(async move {
        // Held until the connection's task ends, however it ends.
        let _slot = slot;
        conn::serve(shard, stream, peer).await;
    });
}

async fn inbox_loop(shard: Rc<Shard>, inbox: ShardInbox) {
    let mut batches = Vec::with_capacity(INBOX_DRAIN);
    loop {
        match inbox.next_batch(&mut batches, INBOX_DRAIN).await {
            Wakeup::Shutdown => {
                shard.shutdown.fire();
                return;
            }
            Wakeup::Items => {
                for batch in batches.drain(..) {
                    for event in batch {
                        shard.process_event(event);
                    }
                }
            }
        }
        // Let the sockets written to by this batch run before the next one.
        signal::yield_now().await;
    }
}

/// Sends what this turn of the loop gathered for other shards, one batch per
/// destination. A full inbox keeps the batch here and is retried shortly.
async fn flush_loop(shard: Rc<Shard>) {
    loop {
        poll_fn(|cx| {
            if shard.outgoing.borrow().iter().any(|b| !b.is_empty()) || shard.durable.has_outbox() {
                return Poll::Ready(());
            }
            shard.flusher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        // Yield once so every task runnable in this turn adds to the batch.
        signal::yield_now().await;
        shard.flush_lane();
        let mut blocked = false;
        for (dest, sender) in shard.ctx.shards.iter().enumerate() {
            let batch = std::mem::take(&mut shard.outgoing.borrow_mut()[dest]);
            if batch.is_empty() {
                continue;
            }
            if let Err(batch) = sender.try_send(batch) {
                let mut outgoing = shard.outgoing.borrow_mut();
                let newer = std::mem::replace(&mut outgoing[dest], batch);
                outgoing[dest].extend(newer);
                blocked = true;
            }
        }
        if blocked {
            monoio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}

/// Hands the gathered presence writes and audit events to the db thread.
/// They are not on any client's path, so a few milliseconds of gathering
/// cost nothing and spare the db thread a wakeup per command.
async fn db_flush_loop(shard: Rc<Shard>) {
    loop {
        poll_fn(|cx| {
            if shard.has_db_work() {
                return Poll::Ready(());
            }
            shard.db_flusher.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        if !shard.is_shutting_down() {
            monoio::time::sleep(DB_FLUSH).await;
        }
        shard.flush_db();
    }
}

async fn housekeeping(shard: Rc<Shard>) {
    let config = &shard.ctx.config;
    let tick = TICK
        .min(config.ping_interval / 2)
        .min(config.sweep_interval)
        .max(MIN_TICK);
    let mut next_sweep = Instant::now() + config.sweep_interval;
    loop {
        monoio::time::sleep(tick).await;
        let now = Instant::now();
        shard.histograms.borrow_mut().publish(&shard.metrics);
        shard.check_liveness(now);
        // A ban's own kick may not have reached this shard yet: the close
        // says banned all the same.
        for (session, banned) in shard.routes.borrow().revoked_sessions() {
            session.close(match banned {
                true => CloseReason::Banned,
                false => CloseReason::Revoked,
            });
        }
        if now >= next_sweep {
            next_sweep = now + config.sweep_interval;
            shard.sweep_statuses(now);
            if shard.index == 0 {
                shard.sweep_expired();
                shard.ctx.hooks.sweep_pending(now);
                shard
                    .ctx
                    .hook_limiter
                    .lock()
                    .expect("hook limiter lock")
                    .gc(now);
            }
        }
    }
}
