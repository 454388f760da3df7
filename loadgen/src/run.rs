//! One run: members, workers, phases (setup → run → drain → close),
//! progress lines, broker cost, cleanup, report.
use crate::cli::{Config, MemberSource};
use crate::db;
use crate::gate::{self, GatePlan};
use crate::held::{self, HeldPlan};
use crate::hgrm;
use crate::peers::{MeshRoles, PeersPlan};
use crate::procfs::{self, ProcSample};
use crate::report::{AckReport, GatedReport, HeldReport, PeersReport, Report};
use crate::roster::{self, Roster};
use crate::scenario::{Lifecycle, Traffic};
use crate::stats::{self, mono_ns, Delivery, Latency};
use crate::wire::{self, SendTemplate, WS_KEY};
use crate::worker::{self, Control, Hists, RunShared, Slot, Tally, Worker, WorkerShared};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `peers`: the wait between the last admitted session (and confirmed group
/// join) and the first `list_peers`. PROTOCOL.md §9 lets a `peers_list`
/// miss changes less than 100 ms old; after this every answer must list
/// every session.
const DIRECTORY_SETTLE: Duration = Duration::from_millis(250);

/// Removes the run's meshes from the database when dropped.
struct Cleanup {
    url: String,
    mesh_ids: Vec<String>,
    quiet: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Give the broker a moment to write the sessions' last rows
        // (presence close, audit) before their parents go.
        std::thread::sleep(Duration::from_millis(1500));
        if let Err(e) = db::remove(&self.url, &self.mesh_ids) {
            eprintln!("loadgen: cleanup failed: {e:#}");
        } else if !self.quiet {
            eprintln!("loadgen: removed {} mesh(es)", self.mesh_ids.len());
        }
    }
}

fn totals(shared: &[Arc<WorkerShared>]) -> Tally {
    let mut t = Tally::default();
    for s in shared {
        t.add(&s.counters.snapshot());
    }
    t
}

fn merged_hists(shared: &[Arc<WorkerShared>]) -> Hists {
    let mut h = Hists::default();
    for s in shared {
        h.add(&s.hists.lock().unwrap());
    }
    h
}

fn first_failure(shared: &[Arc<WorkerShared>]) -> Option<String> {
    shared
        .iter()
        .find_map(|s| s.failure.lock().unwrap().clone())
}

fn pubkey_bytes(hex: &str) -> [u8; 64] {
    let mut out = [b'0'; 64];
    out.copy_from_slice(&hex.as_bytes()[..64]);
    out
}

/// The brokers whose CPU and RSS the report sums: the `--broker-pid`s, or
/// the process listening on each `--url`'s port (each pid once). Empty if
/// one of those is not found: a sum over some of the brokers would pass
/// for all of them.
fn broker_pids(cfg: &Config) -> Vec<u32> {
    if !cfg.broker_pids.is_empty() {
        return cfg.broker_pids.clone();
    }
    let mut ports: Vec<u16> = Vec::with_capacity(cfg.targets.len());
    for t in &cfg.targets {
        if !ports.contains(&t.addr.port()) {
            ports.push(t.addr.port());
        }
    }
    let mut pids = Vec::with_capacity(ports.len());
    for port in ports {
        let Some(pid) = procfs::find_listener_pid(port) else {
            if cfg.progress && cfg.targets.len() > 1 {
                eprintln!(
                    "loadgen: note: no process found listening on port {port}: no broker CPU or RSS (give every broker's --broker-pid)"
                );
            }
            return Vec::new();
        };
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    pids
}

pub fn run(cfg: &Config) -> Result<Report> {
    let scenario = cfg.scenario.clone();
    let fd_limit = procfs::raise_fd_limit();
    let run_id = format!(
        "{:x}{:04x}",
        roster::now_ms() % (1 << 40),
        std::process::id() & 0xffff
    );

    let roster = match &cfg.members {
        MemberSource::Database(_) | MemberSource::Generated => {
            Roster::generate(&run_id, cfg.meshes, cfg.peers)
        }
        MemberSource::File(path) => Roster::load(path)?,
    };
    let connections = roster.connections();
    if connections as u64 + 64 > fd_limit {
        bail!(
            "{connections} connections need more file descriptors than the limit of {fd_limit} (raise ulimit -n)"
        );
    }
    if scenario.traffic().is_some() && roster.meshes.iter().any(|m| m.members.len() < 2) {
        bail!(
            "every mesh needs at least 2 members for {}",
            scenario.name()
        );
    }
    if let Some(path) = &cfg.write_members {
        roster.save(path)?;
    }
    let _cleanup = match &cfg.members {
        MemberSource::Database(url) => {
            db::create(url, &roster)?;
            cfg.cleanup.then(|| Cleanup {
                url: url.clone(),
                mesh_ids: roster.meshes.iter().map(|m| m.id.clone()).collect(),
                quiet: !cfg.progress,
            })
        }
        MemberSource::File(_) | MemberSource::Generated => None,
    };
    let roster = Arc::new(roster);

    let broker_pids = broker_pids(cfg);
    let sample = || procfs::sample_all(&broker_pids);
    let before_setup = sample();

    // Slots: one session per member; the first `senders` of each mesh
    // send. In `held` the others are offline until the drain (at least
    // one per mesh).
    let senders_per_mesh: Vec<usize> = roster
        .meshes
        .iter()
        .map(|mesh| {
            let n = mesh.members.len();
            let s = cfg.senders.unwrap_or(n);
            if cfg.held.is_some() {
                s.min(n - 1)
            } else {
                s
            }
        })
        .collect();
    let mut slots = Vec::with_capacity(connections);
    for (m, mesh) in roster.meshes.iter().enumerate() {
        let senders = senders_per_mesh[m];
        for p in 0..mesh.members.len() {
            slots.push(Slot {
                global: slots.len(),
                mesh: m as u32,
                member: p as u32,
                sender: p < senders,
                url: crate::cli::url_for_peer(slots.len(), cfg.targets.len()) as u32,
                offline: cfg.held.is_some() && p >= senders,
                stalled: p + cfg.stalled_readers >= mesh.members.len(),
            });
        }
    }
    let offline = slots.iter().filter(|s| s.offline).count();
    let online = connections - offline;
    let held_plan = cfg.held.as_ref().map(|h| {
        // PriorityArg is declared in the order of gate::PRIORITIES.
        let p = cfg.priority as usize;
        HeldPlan {
            senders: senders_per_mesh.clone(),
            direct: SendTemplate::tagged(true, p, cfg.payload),
            broadcast: SendTemplate::tagged(false, p, cfg.payload),
            broadcast_every: h.broadcast_every,
            max_held_per_peer: h.max_held_per_peer,
        }
    });
    let peers_plan = match &cfg.directory {
        None => None,
        Some(p) => {
            let meshes = roster
                .meshes
                .iter()
                .zip(&senders_per_mesh)
                .map(|(m, &s)| {
                    MeshRoles::new(
                        m.members.len(),
                        s,
                        p.group_rate > 0.0,
                        p.listers,
                        p.group_every,
                    )
                    .with_context(|| format!("mesh {}", m.id))
                })
                .collect::<Result<Vec<_>>>()?;
            let group_senders = meshes.iter().filter(|r| r.group_sender.is_some()).count();
            let listers = meshes.iter().map(|r| r.listers.len()).sum::<usize>();
            Some(PeersPlan {
                meshes,
                group_every: p.group_every,
                join_frame: wire::join_group_frame(&p.group),
                group_template: SendTemplate::to_spec(
                    &p.group_target,
                    cfg.priority.as_str(),
                    cfg.payload,
                ),
                group_rate_per_sender: p.group_rate / group_senders.max(1) as f64,
                list_rate_per_lister: p.list_rate / listers.max(1) as f64,
            })
        }
    };
    let total_senders = if scenario.traffic().is_some() {
        slots.iter().filter(|s| s.sender).count()
    } else {
        0
    };
    let source_count = cfg
        .source_addrs
        .unwrap_or_else(|| connections.div_ceil(20_000))
        .clamp(1, 254);
    let all_ipv4_loopback = cfg.targets.iter().all(|t| t.is_ipv4_loopback());
    let source_addrs: Vec<Ipv4Addr> = if all_ipv4_loopback && source_count > 1 {
        (1..=source_count as u8)
            .map(|x| Ipv4Addr::new(127, 0, 0, x))
            .collect()
    } else {
        Vec::new()
    };
    let gate_plan = cfg.gate.as_ref().map(|g| {
        GatePlan::new(
            roster
                .meshes
                .iter()
                .map(|m| {
                    let n = m.members.len();
                    let w = g.working_peers.min(n);
                    (0..n).map(|p| gate::is_working(p, n, w)).collect()
                })
                .collect(),
            g.mix,
            g.status.as_str(),
            cfg.payload,
            g.max_held_per_peer,
        )
    });
    let working_peers = gate_plan.as_ref().map_or(0, |p| {
        p.working
            .iter()
            .map(|m| m.iter().filter(|&&w| w).count())
            .sum()
    });
    if let Some(g) = &cfg.gate {
        if g.status == crate::cli::GateStatus::Working
            && cfg.duration + cfg.grace * 2 > Duration::from_secs(50)
        {
            eprintln!(
                "loadgen: note: gated sessions repeat set_status working every 10 s to stay fresh; \
                 a broker with STATUS_TTL_SECONDS below the run's length may still flip them \
                 (use --gate-status dnd for long runs)"
            );
        }
    }
    let run = Arc::new(RunShared {
        pubkeys: roster
            .meshes
            .iter()
            .map(|m| m.members.iter().map(|x| pubkey_bytes(&x.pubkey)).collect())
            .collect(),
        expected_per_send: roster
            .meshes
            .iter()
            // Stalled readers never send, and are not expected to read.
            .map(|m| {
                scenario.expected_per_send(m.members.len().saturating_sub(cfg.stalled_readers))
            })
            .collect(),
        roster: roster.clone(),
        run_id: run_id.clone(),
        targets: cfg
            .targets
            .iter()
            .map(|t| worker::Target {
                addr: t.addr,
                upgrade_request: t.upgrade_request(),
            })
            .collect(),
        expected_accept: meshbroker::ws::accept_key(WS_KEY),
        traffic: scenario.traffic(),
        lifecycle: scenario.lifecycle(),
        window: cfg.window,
        rate_per_sender: cfg.rate.map(|r| r / total_senders.max(1) as f64),
        template: scenario.traffic().map(|t| {
            let direct = t == Traffic::Direct;
            if cfg.client_message_ids {
                // Unique within the broker's dedupe window across runs too.
                let prefix = format!("lg-{run_id}-");
                SendTemplate::with_client_ids(direct, cfg.priority.as_str(), cfg.payload, &prefix)
            } else {
                SendTemplate::new(direct, cfg.priority.as_str(), cfg.payload)
            }
        }),
        source_addrs,
        mesh_offsets: roster
            .meshes
            .iter()
            .scan(0, |acc, m| {
                let at = *acc;
                *acc += m.members.len();
                Some(at)
            })
            .collect(),
        push_outstanding: (0..connections).map(|_| AtomicI64::new(0)).collect(),
        connect_concurrency: cfg.connect_concurrency,
        tick_ns: cfg.tick.as_nanos() as u64,
        held_per_peer: if gate_plan.is_some() || held_plan.is_some() {
            (0..connections).map(|_| AtomicU32::new(0)).collect()
        } else {
            Vec::new()
        },
        gate: gate_plan,
        held: held_plan,
        peers: peers_plan,
        held_full: AtomicBool::new(false),
        client_ack: cfg.client_ack,
        client_ids: cfg.client_message_ids,
        session_hello: cfg.session_hello,
    });
    let ctl = Arc::new(Control {
        phase: AtomicU8::new(worker::PHASE_SETUP),
        epoch_ns: mono_ns(),
        run_start_ns: AtomicU64::new(0),
        budget: cfg.count.map(|c| AtomicI64::new(c as i64)),
    });

    // Workers, slots dealt round-robin.
    let threads = cfg.threads.min(connections.max(1));
    let mut per_thread: Vec<Vec<Slot>> = vec![Vec::new(); threads];
    for (i, s) in slots.iter().enumerate() {
        per_thread[i % threads].push(*s);
    }
    let shared: Vec<Arc<WorkerShared>> = (0..threads).map(|_| Arc::default()).collect();
    let mut handles = Vec::new();
    let setup_start = Instant::now();
    for (t, slots) in per_thread.into_iter().enumerate() {
        let worker = Worker::new(
            run.clone(),
            ctl.clone(),
            shared[t].clone(),
            slots,
            0x9E37_79B9_7F4A_7C15u64.wrapping_mul(t as u64 + 1) ^ mono_ns(),
        )
        .context("create worker")?;
        let core = (!cfg.pin_cores.is_empty()).then(|| cfg.pin_cores[t % cfg.pin_cores.len()]);
        handles.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || {
                    if let Some(id) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id });
                    }
                    worker.run();
                })
                .context("spawn worker")?,
        );
    }
    let stop_workers = |handles: Vec<std::thread::JoinHandle<()>>| {
        ctl.phase.store(worker::PHASE_CLOSE, Relaxed);
        for h in handles {
            let _ = h.join();
        }
    };

    // Setup: every session connected and admitted (churn connects during
    // the run; held recipients for the drain).
    if scenario.lifecycle() == Lifecycle::Hold {
        let mut last_print = Instant::now();
        loop {
            let t = totals(&shared);
            if let Some(f) = first_failure(&shared) {
                stop_workers(handles);
                bail!("setup failed after {} of {online} hellos: {f}", t.ready);
            }
            if t.ready as usize >= online {
                break;
            }
            if setup_start.elapsed() > cfg.setup_timeout {
                stop_workers(handles);
                bail!("setup timed out: {} of {online} sessions admitted", t.ready);
            }
            if cfg.progress && last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!("[setup] {} / {online} sessions admitted", t.ready);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let setup_s = setup_start.elapsed().as_secs_f64();
    // Gated: every gating session's status is confirmed by its barrier's
    // ack; the settle covers the status reaching other shards' routing.
    if let Some(g) = &cfg.gate {
        std::thread::sleep(g.settle);
    }
    // Peers: every join is confirmed by its barrier's ack; the settle
    // covers the directory's allowed staleness.
    if run.peers.is_some() {
        std::thread::sleep(DIRECTORY_SETTLE);
    }
    // Let the broker settle its post-hello work before measuring.
    if scenario.measures_rss_per_connection() {
        std::thread::sleep(Duration::from_millis(500));
    }
    let at_start = sample();
    let cpu_start = procfs::self_cpu();
    let start_rel = ctl.now();
    ctl.run_start_ns.store(start_rel, Relaxed);
    let started = Instant::now();
    ctl.phase.store(worker::PHASE_RUN, Relaxed);

    // The load, with a progress line each second.
    let mut prev = Tally::default();
    let mut next_tick = started + Duration::from_secs(1);
    let mut failure = None;
    loop {
        let now = Instant::now();
        let elapsed = now - started;
        let t = totals(&shared);
        if elapsed >= cfg.duration || cfg.count.is_some_and(|c| t.sent >= c) {
            break;
        }
        if run.held_full.load(Relaxed) {
            if cfg.progress {
                eprintln!(
                    "[{:>4.1}s] {} peer has --max-held-per-peer held sends: load ends",
                    elapsed.as_secs_f64(),
                    if run.gate.is_some() {
                        "a gating"
                    } else {
                        "an offline"
                    }
                );
            }
            break;
        }
        if let Some(f) = first_failure(&shared) {
            failure = Some(f);
            break;
        }
        if now >= next_tick {
            if cfg.progress {
                let h = merged_hists(&shared);
                let gating = if run.gate.is_some() {
                    format!(" | held {} violations {}", t.held_expected, t.violations)
                } else if run.held.is_some() {
                    format!(
                        " | held {} unavailable {} durable:false {}",
                        t.held_expected, t.unavailable, t.non_durable
                    )
                } else if run.peers.is_some() {
                    format!(
                        " | lists/s {} p99 list {:.3} ms wrong counts {} | group pushes/s {} p99 {:.3} ms",
                        t.lists_answered - prev.lists_answered,
                        h.list.percentiles().p99,
                        t.list_mismatches,
                        t.group_pushes - prev.group_pushes,
                        h.group_push.percentiles().p99,
                    )
                } else {
                    String::new()
                };
                let acking = if cfg.client_ack.is_some() {
                    format!(
                        " | client acks/s {} ids/s {} redelivered {} awaiting {}",
                        t.client_acks - prev.client_acks,
                        t.client_acked - prev.client_acked,
                        t.redeliveries,
                        t.awaiting_redelivery(),
                    )
                } else {
                    String::new()
                };
                eprintln!(
                    "[{:>4.0}s] sent/s {:>9} acked/s {:>9} pushes/s {:>10} hellos/s {:>7} | p99 ack {:.3} ms push {:.3} ms | lost-so-far {}{gating}{acking}",
                    elapsed.as_secs_f64(),
                    t.sent - prev.sent,
                    t.acked - prev.acked,
                    t.pushes - prev.pushes,
                    t.hellos - prev.hellos,
                    h.ack.percentiles().p99,
                    h.push.percentiles().p99,
                    t.live_expected().saturating_sub(t.live()),
                );
            }
            prev = t;
            next_tick += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(10).min(next_tick.saturating_duration_since(now)));
    }
    let load_s = started.elapsed().as_secs_f64();
    ctl.phase.store(worker::PHASE_DRAIN, Relaxed);

    // Drain: outstanding acks and (live) pushes, within the grace period;
    // under --ack-fraction below 1 also the redeliveries of what was left
    // unacked (they come CLIENT_ACK_TIMEOUT_SECONDS after their write).
    let wait_redeliveries = cfg.client_ack.is_some_and(|p| p.fraction < 1.0);
    let drain_start = Instant::now();
    loop {
        let t = totals(&shared);
        let settled = t.acked + t.send_errors >= t.sent
            && t.live() >= t.live_expected()
            && t.lists_pending() == 0
            && (!wait_redeliveries || t.awaiting_redelivery() == 0);
        if settled || drain_start.elapsed() >= cfg.grace || failure.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Gated: the gating sessions say idle; what was held for them must
    // arrive, within another grace period.
    if cfg.gate.is_some() && failure.is_none() {
        // A publication after the drain, so the progress line is current.
        std::thread::sleep(Duration::from_millis(120));
        ctl.phase.store(worker::PHASE_RELEASE, Relaxed);
        let release_start = Instant::now();
        loop {
            let t = totals(&shared);
            if t.pushes >= t.expected || release_start.elapsed() >= cfg.grace {
                break;
            }
            if let Some(f) = first_failure(&shared) {
                failure = Some(f);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if cfg.progress {
            let t = totals(&shared);
            eprintln!(
                "[release] {} of {} held pushes after the idle flip ({:.3} s); {} gating violations",
                t.held,
                t.held_expected,
                release_start.elapsed().as_secs_f64(),
                t.violations
            );
        }
    }
    // Held: the hold phase (its broker CPU, acks/s) ends here; then the
    // offline recipients connect and drain what was held for them.
    let mut hold_end = None;
    if cfg.held.is_some() && failure.is_none() {
        std::thread::sleep(Duration::from_millis(120));
        hold_end = Some((
            (started.elapsed().as_secs_f64() - 0.12).max(load_s),
            sample(),
        ));
        failure = drain_held(cfg, &ctl, &shared, online, offline);
    }
    // Workers publish every 100 ms: wait for a fresh publication.
    std::thread::sleep(Duration::from_millis(120));
    let after = sample();
    let (active_s, at_end, at_drain_end) = match hold_end {
        Some((hold_s, at_hold)) => (hold_s, at_hold, after),
        None => (
            (started.elapsed().as_secs_f64() - 0.12).max(load_s),
            after,
            None,
        ),
    };
    let cpu_used = procfs::self_cpu().saturating_sub(cpu_start);
    stop_workers(handles);

    let t = totals(&shared);
    let hists = merged_hists(&shared);
    let mut errors = std::collections::BTreeMap::new();
    let mut close_codes = std::collections::BTreeMap::new();
    for s in &shared {
        for (k, v) in s.errors.lock().unwrap().iter() {
            *errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in s.closes.lock().unwrap().iter() {
            *close_codes.entry(*k).or_default() += v;
        }
    }
    let failure = failure.or_else(|| first_failure(&shared));
    let mut gated_drain = Latency::default();
    let gated = cfg.gate.as_ref().map(|g| {
        let records: Vec<_> = shared
            .iter()
            .flat_map(|s| std::mem::take(&mut *s.gate.lock().unwrap()))
            .collect();
        let summary = gate::verify(&records);
        gated_drain = summary.drain_per_peer.clone();
        GatedReport {
            status: g.status.as_str().into(),
            mix: g.mix.label(),
            working_peers,
            held_expected: t.held_expected,
            held_pushes: t.held,
            gating_violations: t.violations,
            held_order_violations: summary.order.sender_order,
            held_creation_order_violations: summary.order.creation_order,
            strict_order: g.strict_order,
            held_unacked: summary.order.never_acked,
            drain_s: summary.drain_ns.map(|ns| ns as f64 / 1e9),
            drain_ms: summary.drain_per_peer.percentiles(),
            held_cap_reached: run.held_full.load(Relaxed),
        }
    });
    let held = cfg.held.as_ref().map(|h| {
        let records: Vec<_> = shared
            .iter()
            .flat_map(|s| std::mem::take(&mut *s.held.lock().unwrap()))
            .collect();
        let sizes: Vec<usize> = roster.meshes.iter().map(|m| m.members.len()).collect();
        let summary = held::verify(&sizes, &records);
        let drain_s = summary.drain_ns.map(|ns| ns as f64 / 1e9);
        let drain_cpu = match (at_end, at_drain_end) {
            (Some(a), Some(b)) => Some(b.cpu.saturating_sub(a.cpu).as_secs_f64()),
            _ => None,
        };
        HeldReport {
            recipients: offline,
            broadcast_every: h.broadcast_every,
            held_expected: t.held_expected,
            held_pushes: t.held,
            non_durable_acks: t.non_durable,
            unavailable: t.unavailable,
            never_acked: t.sent.saturating_sub(t.acked + t.send_errors),
            owed: summary.check.owed,
            delivered: summary.check.delivered,
            missing: summary.check.missing,
            duplicates: summary.check.duplicates,
            unexpected: summary.check.unexpected,
            reused_ids: summary.check.reused_ids,
            drain_s,
            drain_pushes_per_s: drain_s.filter(|&d| d > 0.0).map(|d| t.held as f64 / d),
            drain_broker_cpu_us_per_push: drain_cpu
                .filter(|_| t.held > 0)
                .map(|c| c * 1e6 / t.held as f64),
            held_cap_reached: run.held_full.load(Relaxed),
        }
    });
    // Held: the id check is the delivery check; the hold phase's pushes
    // are the live copies of `*` sends.
    let live_pushes = t.live();
    let delivery = Delivery {
        expected: t.expected,
        unique: t.pushes,
        duplicates: t.duplicates,
    };
    let broker_cpu = match (at_start, at_end) {
        (Some(a), Some(b)) => Some(b.cpu.saturating_sub(a.cpu).as_secs_f64()),
        _ => None,
    };
    let per = |n: u64| broker_cpu.filter(|_| n > 0).map(|c| c * 1e6 / n as f64);
    let hold_pushes = if held.is_some() {
        live_pushes
    } else {
        t.pushes
    };
    let directory = cfg.directory.as_ref().map(|p| {
        let plan = run.peers.as_ref().expect("a peers run has its plan");
        let per_answer =
            |n: u64| (t.lists_answered > 0).then(|| n as f64 / t.lists_answered as f64);
        let broadcast_pushes = t.pushes.saturating_sub(t.group_pushes);
        PeersReport {
            listers: plan.meshes.iter().map(|r| r.listers.len()).sum(),
            list_rate: p.list_rate,
            lists_sent: t.lists_sent,
            lists_answered: t.lists_answered,
            lists_per_s: t.lists_answered as f64 / active_s,
            list_errors: t.list_errors,
            list_unanswered: t.lists_pending(),
            list_mismatches: t.list_mismatches,
            list_malformed: t.list_malformed,
            list_us: hists.list.percentiles_in(1e3),
            mean_entries: per_answer(t.list_entries),
            mean_answer_bytes: per_answer(t.list_bytes),
            broadcast_pushes,
            broadcast_pushes_per_s: broadcast_pushes as f64 / active_s,
            group: p.group.clone(),
            group_target: p.group_target.clone(),
            group_every: p.group_every,
            group_members: plan.meshes.iter().map(|r| r.group_members).sum(),
            group_rate: p.group_rate,
            group_sent: t.group_sent,
            group_sends_per_s: t.group_sent as f64 / load_s,
            group_expected: t.group_expected,
            group_pushes: t.group_pushes,
            group_pushes_per_s: t.group_pushes as f64 / active_s,
            group_push_ms: hists.group_push.percentiles(),
        }
    });
    // Paced sends: scenario-wide open loop, or the `peers` listers and
    // group senders.
    let schedule_lag = (!hists.schedule_lag.is_empty()).then(|| hists.schedule_lag.percentiles());
    let rss_per_conn = match (before_setup, at_start) {
        (Some(ProcSample { rss_bytes: a, .. }), Some(ProcSample { rss_bytes: b, .. }))
            if scenario.measures_rss_per_connection() && connections > 0 =>
        {
            Some((b as f64 - a as f64) / connections as f64)
        }
        _ => None,
    };
    let acks = (cfg.client_ack.is_some() || cfg.client_message_ids).then(|| AckReport {
        client_ack: cfg.client_ack.is_some(),
        ack_fraction: cfg.client_ack.map(|p| p.fraction),
        client_acks: t.client_acks,
        client_acked_ids: t.client_acked,
        ids_per_client_ack: (t.client_acks > 0)
            .then(|| t.client_acked as f64 / t.client_acks as f64),
        unacked: t.unacked,
        redeliveries: t.redeliveries,
        redelivered_unacked: t.redelivered_unacked,
        redelivered_after_ack: t.redelivered_after_ack,
        redelivered_unseen: t.redelivered_unseen,
        redelivered_mismatch: t.redelivered_mismatch,
        awaiting_redelivery: t.awaiting_redelivery(),
        client_message_ids: cfg.client_message_ids,
        duplicate_acks: t.duplicate_acks,
        pushes_without_client_id: t.pushes_without_client_id,
    });
    let mut report = Report {
        scenario: scenario.name().into(),
        mode: match (scenario.traffic(), cfg.rate) {
            (None, _) if cfg.session_hello => "no sends, session_hello".into(),
            (None, _) => "no sends".into(),
            (Some(_), _) if directory.is_some() && total_senders == 0 => "no broadcasts".into(),
            (Some(_), Some(r)) => format!("open loop {r}/s"),
            (Some(_), None) => format!("closed loop, window {}", cfg.window),
        },
        threads,
        meshes: roster.meshes.len(),
        peers: roster
            .meshes
            .iter()
            .map(|m| m.members.len())
            .max()
            .unwrap_or(0),
        connections,
        senders: total_senders,
        stalled_readers: cfg.stalled_readers,
        payload: cfg.payload,
        priority: match &cfg.gate {
            Some(g) => g.mix.label(),
            None => cfg.priority.as_str().into(),
        },
        window: cfg.window,
        rate: cfg.rate,
        duration_s: load_s,
        active_s,
        setup_s,
        sent: t.sent,
        acked: t.acked,
        send_errors: t.send_errors,
        pushes: t.pushes,
        expected_pushes: t.expected,
        lost: held.as_ref().map_or(delivery.lost(), |h| h.missing),
        duplicates: held.as_ref().map_or(t.duplicates, |h| h.duplicates),
        unexpected_pushes: delivery.unexpected(),
        foreign_pushes: t.foreign,
        sends_per_s: t.sent as f64 / load_s,
        acks_per_s: t.acked as f64 / active_s,
        pushes_per_s: hold_pushes as f64 / active_s,
        ack_ms: hists.ack.percentiles(),
        push_ms: hists.push.percentiles(),
        hello_ms: hists.hello.percentiles(),
        tick_us: cfg.tick.as_micros() as u64,
        schedule_lag_ms: schedule_lag,
        kept_schedule: schedule_lag.map(|lag| stats::kept_schedule(&lag, cfg.tick)),
        hellos: t.hellos,
        run_hellos: t.run_hellos,
        hellos_per_s: t.run_hellos as f64 / load_s,
        hello_failures: t.hello_failures,
        connection_failures: t.conn_failures,
        broker_closes: t.broker_closes,
        urls: cfg.urls.clone(),
        broker_pid: broker_pids.first().copied(),
        broker_pids: broker_pids.clone(),
        broker_cpu_s: broker_cpu,
        broker_cpu_pct: broker_cpu.map(|c| c * 100.0 / active_s),
        broker_cpu_us_per_push: per(hold_pushes),
        broker_cpu_us_per_send: per(t.sent),
        broker_cpu_us_per_hello: per(t.run_hellos),
        broker_rss_bytes: at_end.or(at_start).map(|s| s.rss_bytes),
        broker_rss_before_bytes: before_setup.map(|s| s.rss_bytes),
        broker_rss_per_conn_bytes: rss_per_conn,
        loadgen_cpu_s: cpu_used.as_secs_f64(),
        loadgen_cpu_pct: cpu_used.as_secs_f64() * 100.0 / active_s,
        errors,
        close_codes,
        failure,
        gated,
        held,
        directory,
        acks,
        hgrm_files: None,
    };
    // Held: `unavailable` is the broker's bound on held envelopes, counted
    // apart, not a failure.
    let refused_ok = report.held.as_ref().map_or(0, |h| h.unavailable);
    if report.failure.is_none() {
        // Peers may run without broadcasts and without group sends.
        let sends_due = report
            .directory
            .as_ref()
            .is_none_or(|p| report.senders > 0 || p.group_rate > 0.0);
        if scenario.traffic().is_some() && sends_due && report.sent == 0 {
            report.failure = Some("nothing was sent".into());
        } else if report.send_errors > refused_ok {
            report.failure = Some(format!(
                "{} sends answered with error",
                report.send_errors - refused_ok
            ));
        } else if let Some(f) = scenario.check(&report) {
            report.failure = Some(f);
        }
    }
    if let Some(prefix) = &cfg.hgrm {
        report.hgrm_files = Some(hgrm::write_all(
            prefix,
            &[
                ("push", &hists.push),
                ("ack", &hists.ack),
                ("hello", &hists.hello),
                ("group-push", &hists.group_push),
                ("list", &hists.list),
                ("gated-drain", &gated_drain),
                ("schedule-lag", &hists.schedule_lag),
            ],
        )?);
    }
    Ok(report)
}

/// `held`: the offline recipients connect; waits until every held push
/// arrived, or nothing (no push, no admitted hello) happened for `--grace`.
fn drain_held(
    cfg: &Config,
    ctl: &Control,
    shared: &[Arc<WorkerShared>],
    online: usize,
    recipients: usize,
) -> Option<String> {
    ctl.phase.store(worker::PHASE_RELEASE, Relaxed);
    let start = Instant::now();
    let mut seen = (0, 0);
    let mut moved = start;
    let mut prev_held = 0;
    let mut next_print = start + Duration::from_secs(1);
    loop {
        let t = totals(shared);
        if let Some(f) = first_failure(shared) {
            return Some(f);
        }
        if t.held >= t.held_expected {
            break;
        }
        let now = Instant::now();
        if (t.held, t.ready) != seen {
            seen = (t.held, t.ready);
            moved = now;
        } else if now - moved >= cfg.grace {
            break;
        }
        if cfg.progress && now >= next_print {
            eprintln!(
                "[drain {:>3.0}s] held pushes {} / {} ({}/s), recipients admitted {} / {recipients}",
                (now - start).as_secs_f64(),
                t.held,
                t.held_expected,
                t.held - prev_held,
                (t.ready as usize).saturating_sub(online),
            );
            prev_held = t.held;
            next_print += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if cfg.progress {
        let t = totals(shared);
        eprintln!(
            "[drain] {} of {} held pushes ({:.3} s after the recipients began to connect)",
            t.held,
            t.held_expected,
            start.elapsed().as_secs_f64()
        );
    }
    None
}
