//! Ties a run together: the client threads, the phases they follow, the
//! CPU readings around the measured interval, and the report.
use crate::cli::Config;
use crate::client::{self, Tally};
use crate::report::Report;
use loadgen::procfs;
use loadgen::stats::Latency;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds allowed for every client to connect and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the runner looks at the clients' progress.
const TICK: Duration = Duration::from_millis(2);

/// Where the run is; only the runner moves it on, clients follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Connecting and subscribing; nobody publishes yet.
    Setup,
    /// The load: everyone publishes.
    Run,
    /// Publishing stopped; the last messages arrive.
    Drain,
    /// Measured; clients leave.
    Stop,
}

/// What the runner and all clients share.
pub(crate) struct Shared {
    phase: AtomicU8,
    /// Clients subscribed (setup done).
    pub ready: AtomicUsize,
    /// Clients that stopped publishing and got every message of the others.
    pub drained: AtomicUsize,
    /// Per client: its publishes once it has stopped, u64::MAX until then.
    final_sent: Vec<AtomicU64>,
    failure: Mutex<Option<String>>,
    /// The run's subject: unique per run, so others on the server stay apart.
    pub subject: String,
}

impl Shared {
    pub(crate) fn new(peers: usize, subject: String) -> Shared {
        Shared {
            phase: AtomicU8::new(Phase::Setup as u8),
            ready: AtomicUsize::new(0),
            drained: AtomicUsize::new(0),
            final_sent: (0..peers).map(|_| AtomicU64::new(u64::MAX)).collect(),
            failure: Mutex::new(None),
            subject,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Acquire) {
            0 => Phase::Setup,
            1 => Phase::Run,
            2 => Phase::Drain,
            _ => Phase::Stop,
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Release);
    }

    pub(crate) fn final_sent(&self, client: usize) -> Option<u64> {
        match self.final_sent[client].load(Acquire) {
            u64::MAX => None,
            n => Some(n),
        }
    }

    pub(crate) fn set_final_sent(&self, client: usize, sent: u64) {
        self.final_sent[client].store(sent, Release);
    }

    /// The first failure is the run's.
    pub(crate) fn fail(&self, why: String) {
        self.failure.lock().unwrap().get_or_insert(why);
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// Waits until `done`, a failure, or `limit`; whether `done` came.
    fn wait_for(&self, limit: Duration, done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        loop {
            if done() {
                return true;
            }
            if self.failure().is_some() || start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(TICK);
        }
    }
}

/// The run, and the latency histogram for `--hgrm`.
pub(crate) fn run(cfg: &Config) -> anyhow::Result<(Report, Latency)> {
    let subject = format!("natsref.{}.broadcast", std::process::id());
    let shared = Arc::new(Shared::new(cfg.peers, subject));
    let server_pid = cfg
        .server_pid
        .or_else(|| procfs::find_listener_pid(cfg.addr.port()));
    let mut threads = Vec::with_capacity(cfg.threads);
    for t in 0..cfg.threads {
        let clients: Vec<usize> = (t..cfg.peers).step_by(cfg.threads).collect();
        let (cfg, shared2) = (cfg.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("natsref-{t}"))
            .spawn(move || client_thread(clients, cfg, shared2));
        match spawned {
            Ok(h) => threads.push(h),
            Err(e) => {
                // The ones started would wait for the load forever.
                shared.set_phase(Phase::Stop);
                threads.into_iter().for_each(|h| drop(h.join()));
                return Err(e.into());
            }
        }
    }

    let ready = shared.wait_for(SETUP_TIMEOUT, || shared.ready.load(Acquire) == cfg.peers);
    if !ready {
        shared.fail(format!(
            "{} of {} clients subscribed in time",
            shared.ready.load(Acquire),
            cfg.peers
        ));
    }
    let server_start = server_pid.and_then(procfs::sample);
    let own_start = procfs::sample(std::process::id());
    let started = Instant::now();
    if ready {
        shared.set_phase(Phase::Run);
        shared.wait_for(cfg.duration, || false);
    }
    let load_s = started.elapsed().as_secs_f64();
    shared.set_phase(Phase::Drain);
    shared.wait_for(cfg.grace, || shared.drained.load(Acquire) == cfg.peers);
    let active_s = started.elapsed().as_secs_f64();
    let server_end = server_pid.and_then(procfs::sample);
    let own_end = procfs::sample(std::process::id());
    shared.set_phase(Phase::Stop);

    // A client waits on the server for each of its reads: one that stopped
    // answering holds its thread.
    let deadline = Instant::now() + cfg.grace;
    while !threads.iter().all(|h| h.is_finished()) {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "clients still waiting on the server {:.1} s after the run: {}",
                cfg.grace.as_secs_f64(),
                shared
                    .failure()
                    .unwrap_or_else(|| "it stopped answering".into())
            );
        }
        std::thread::sleep(TICK);
    }
    let mut hist = Latency::default();
    let mut tally = Tally::default();
    for h in threads {
        let (thread_hist, thread_tally) = h.join().expect("client threads do not panic");
        hist.add(&thread_hist);
        tally.add(&thread_tally);
    }
    let cpu = |a: Option<procfs::ProcSample>, b: Option<procfs::ProcSample>| {
        Some(b?.cpu.saturating_sub(a?.cpu).as_secs_f64())
    };
    let server_cpu = cpu(server_start, server_end);
    let own_cpu = cpu(own_start, own_end).unwrap_or(0.0);
    // Every publish is for every other client.
    let expected = tally.sent * (cfg.peers as u64 - 1);
    let per_push = |c: f64| (tally.pushes > 0).then(|| c * 1e6 / tally.pushes as f64);
    let report = Report {
        scenario: "broadcast",
        mode: "nats",
        threads: cfg.threads,
        peers: cfg.peers,
        senders: cfg.peers,
        payload: cfg.payload,
        window: cfg.window,
        duration_s: load_s,
        active_s,
        sent: tally.sent,
        acked: tally.acked,
        pushes: tally.pushes,
        expected_pushes: expected,
        lost: expected.saturating_sub(tally.pushes),
        duplicates: tally.duplicates,
        order_violations: tally.order_violations,
        unexpected_pushes: tally.unexpected,
        sends_per_s: tally.sent as f64 / load_s,
        pushes_per_s: tally.pushes as f64 / active_s,
        push_ms: hist.percentiles(),
        broker_pid: server_pid,
        broker_cpu_s: server_cpu,
        broker_cpu_pct: server_cpu.map(|c| c * 100.0 / active_s),
        broker_cpu_us_per_push: server_cpu.and_then(per_push),
        loadgen_cpu_s: own_cpu,
        loadgen_cpu_pct: own_cpu * 100.0 / active_s,
        ok: false,
        failure: shared.failure(),
    }
    .judge();
    Ok((report, hist))
}

/// One thread: a monoio runtime (io_uring, epoll where that is missing)
/// with a task per client; their latency histogram and summed counts.
fn client_thread(clients: Vec<usize>, cfg: Config, shared: Arc<Shared>) -> (Latency, Tally) {
    let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            shared.fail(format!("runtime: {e}"));
            return (Latency::default(), Tally::default());
        }
    };
    rt.block_on(async move {
        let cfg = Rc::new(cfg);
        let hist = Rc::new(RefCell::new(Latency::default()));
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|me| monoio::spawn(client::run(me, cfg.clone(), shared.clone(), hist.clone())))
            .collect();
        let mut tally = Tally::default();
        for task in tasks {
            tally.add(&task.await);
        }
        (hist.take(), tally)
    })
}
