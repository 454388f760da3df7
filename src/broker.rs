//! Spawns the shards and the db thread, owns shutdown.
//!
//! Start: db thread (returns at once; Postgres may come later), one
//! SO_REUSEPORT listener per shard on the one port, shard threads, then the
//! `broker listening` line. Shutdown (SIGTERM/SIGINT): every shard stops
//! accepting and closes its WebSockets with 1001; when the shard threads are
//! joined the last `BrokerContext` (and with it the last `DbHandle`) is
//! dropped, which tells the db thread to flush and exit.
use crate::cluster::bus::{self, BusSpec};
use crate::cluster::{Cluster, LOCAL};
use crate::config::Config;
use crate::context::BrokerContext;
use crate::db::held::HeldBatching;
use crate::db::{self, AuditOptions, DbOptions, DbStatus, HeldOptions, RestoreOptions};
use crate::hook::HookRateLimiter;
use crate::inbox::{self, INBOX_BATCHES};
use crate::inbox::{ShardEvent, ShardSender};
use crate::join::JoinRateLimiter;
use crate::mesh::directory::Directory;
use crate::mesh::directory::MeshEntry;
use crate::mesh::held::HeldBudget;
use crate::mesh::peers::Holder;
use crate::mesh::plan::first_shard;
use crate::metrics::Metrics;
use crate::shard::slots::ConnectionSlots;
use crate::shard::{self, ShardSpec};
use crate::status::hook_index::HookIndex;
use crate::status::transcript::TranscriptReader;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Runs the broker until SIGTERM or SIGINT; returns after a clean shutdown.
pub fn run(config: Config, database_url: String) -> anyhow::Result<()> {
    let shard_count = config.shards;
    let metrics = Metrics::new(shard_count);
    let db_status = Arc::new(DbStatus::new());
    let directory = Arc::new(Directory::new(metrics.global().queue_depth_counter()));
    // Opened by the start-up load (`db::restore`) once it knows which meshes
    // have an earlier run's envelopes.
    directory.close_gate();
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| inbox::inbox(INBOX_BATCHES))
        .unzip();
    let (held, held_rx) = db::held::lane(
        shard_count,
        Arc::new(HeldBudget::new(config.max_held_memory_bytes)),
    );
    // With NATS_URL: this node is one of several (README "Several nodes").
    let clustered = config.nats_url.is_some();
    let node_id = clustered.then(|| config.node_id.clone());
    let batch_metrics = metrics.clone();
    let held_metrics = metrics.clone();
    let drain_senders = senders.clone();
    let (db, db_thread) = db::spawn_with(
        database_url.clone(),
        db_status.clone(),
        DbOptions {
            directory: Some(directory.clone()),
            member_refresh: config.member_refresh,
            held: Some(HeldOptions {
                lane: held.clone(),
                rx: held_rx,
                batching: HeldBatching {
                    max_rows: config.held_batch_max_rows,
                    max_wait: config.held_batch_max_wait,
                    connections: config.held_writer_connections,
                },
                on_batch: Some(Box::new(move |stats| {
                    held_metrics.global().record_held_batch(stats.elapsed)
                })),
            }),
            restore: Some(RestoreOptions {
                held_ttl: config.held_ttl,
                on_restored: Box::new(move |mesh| drain_restored(&drain_senders, mesh)),
            }),
            audit: AuditOptions {
                max_rows: config.audit_batch_max_rows,
                max_wait: config.audit_batch_max_wait,
                max_buffered: config.audit_buffer_events,
                dropped: metrics.global().audit_dropped_counter(),
                on_batch: Some(Box::new(move |stats| {
                    batch_metrics.global().record_audit_batch(stats.elapsed)
                })),
            },
            node_id: node_id.clone(),
            ..DbOptions::default()
        },
    )?;
    let hooks = Arc::new(HookIndex::default());
    let (cluster, bus_thread) = match &config.nats_url {
        Some(url) => {
            let (cluster, commands) = Cluster::new(&config.node_id);
            let drain_senders = senders.clone();
            let spec = BusSpec {
                url: url.clone(),
                node_id: cluster.node_id.clone(),
                confirm_timeout: config.cluster_confirm_timeout,
                dead_after: config.node_dead_after,
                directory: directory.clone(),
                shards: senders.clone(),
                db: db::node_config(&database_url, node_id.as_deref())?,
                held_ttl: config.held_ttl,
                on_restored: Arc::new(move |mesh| drain_restored(&drain_senders, mesh)),
                hooks: hooks.clone(),
                session_grace: config.session_grace,
                send_rate: crate::mesh::bucket::SendRate::new(
                    config.send_rate_per_min,
                    config.send_burst,
                ),
            };
            (Some(cluster), Some(bus::spawn(spec, commands)?))
        }
        None => (None, None),
    };
    let listeners = bind_listeners(&config, shard_count)?;
    let port = listeners[0].local_addr()?.port();
    let transcripts = match TranscriptReader::spawn(config.claude_projects_dir.clone()) {
        Ok(reader) => Some(reader),
        Err(e) => {
            tracing::warn!(target: "broker", error = %e, "transcript reader failed to start");
            None
        }
    };
    let connections = ConnectionSlots::new(config.max_connections);
    let ctx = Arc::new(BrokerContext {
        hook_limiter: Mutex::new(HookRateLimiter::new(config.hook_rate_limit_per_min)),
        join_limiter: Mutex::new(JoinRateLimiter::new(config.join_rate_limit_per_min)),
        hooks,
        transcripts,
        config,
        metrics,
        audit: db.audit().clone(),
        db,
        held,
        db_status,
        directory,
        shards: senders.clone(),
        connections,
        started_at: Instant::now(),
        cluster,
    });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut threads = Vec::with_capacity(shard_count);
    let (panicked_tx, panicked) = crossbeam_channel::unbounded();
    for (index, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
        threads.push(shard::spawn(
            ShardSpec {
                index,
                listener,
                core,
                inbox,
            },
            ctx.clone(),
            panicked_tx.clone(),
        )?);
    }
    log_listening(&ctx, port);
    let signalled = signal_channel()?;
    let dead_shard = crossbeam_channel::select! {
        recv(signalled) -> _ => None,
        recv(panicked) -> index => index.ok(),
    };
    match dead_shard {
        None => tracing::info!(target: "broker", "shutdown signal"),
        Some(index) => {
            tracing::error!(target: "broker", shard = index, "shard panicked: stopping the broker")
        }
    }
    for sender in &senders {
        sender.request_shutdown();
    }
    for thread in threads {
        let _ = thread.join();
    }
    drop(senders);
    // The shards are gone: this is the last context, and with it the last
    // DbHandle, so the db thread flushes and ends.
    if let Ok(BrokerContext {
        transcripts: Some(reader),
        ..
    }) = Arc::try_unwrap(ctx)
    {
        reader.shutdown();
    }
    if let Some(bus) = bus_thread {
        bus.stop();
    }
    db_thread.join();
    tracing::info!(target: "broker", "shutdown complete");
    match dead_shard {
        None => Ok(()),
        Some(index) => Err(anyhow::anyhow!("shard {index} panicked")),
    }
}

/// A mesh whose earlier held envelopes are all loaded: each member with
/// something held and a live session drains on that session's shard, and
/// each session with sends to its key held meanwhile on its own shard.
fn drain_restored(shards: &[ShardSender], mesh: &Arc<MeshEntry>) {
    for member in mesh.view().members() {
        for entry in member.sessions.with_held() {
            if let Holder::Live { shard, .. } = entry.holder() {
                let drain = ShardEvent::DrainHeld(mesh.clone(), member.clone());
                let _ = shards[shard].try_send(vec![drain]);
            }
        }
        if member.held.is_empty() {
            continue;
        }
        if let Some(dest) = first_shard(member.live_shards.get() & LOCAL) {
            let drain = ShardEvent::DrainHeld(mesh.clone(), member.clone());
            // A full inbox: the member's next arrival or status change drains.
            let _ = shards[dest].try_send(vec![drain]);
        }
    }
}

/// One SO_REUSEPORT listener per shard; the kernel spreads connections over
/// them. The first binds (port 0 picks a free port), the others join it.
fn bind_listeners(config: &Config, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = SocketAddr::new(config.host, config.port);
    if config.port != 0 {
        // SO_REUSEPORT would let a second broker (same user) silently share
        // the port and split the meshes between two processes. A plain bind
        // fails with EADDRINUSE while any socket listens there.
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe
            .bind(&addr.into())
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    }
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn log_listening(ctx: &BrokerContext, port: u16) {
    let effective = ctx
        .config
        .effective()
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(target: "broker", host = %ctx.config.host, port = port, shards = ctx.config.shards,
        uring = monoio::utils::detect_uring(), config = %effective, "broker listening");
}

/// SIGTERM or SIGINT, heard on a thread of its own.
fn signal_channel() -> std::io::Result<crossbeam_channel::Receiver<()>> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(());
            }
        })?;
    Ok(rx)
}
