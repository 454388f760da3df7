//! One worker thread: a mio (epoll) loop over many connections.
//!
//! Each connection goes Connecting → Upgrading → Helloing (→ Preparing) →
//! Ready (→ Closing); a `held` recipient only once the drain begins.
//! Whatever a loop iteration produces for a connection
//! (sends refilled by acks, paced sends, pongs, `gated` status changes) is
//! appended to its write buffer and written with one syscall at the end of
//! the iteration: many frames per write. Reads go into one per-thread scratch buffer; only a partial frame
//! is copied into the connection.
use crate::ack::{AckConn, AckPlan, Redelivery};
use crate::gate::{self, Acked, Arrival, GateConn, GatePlan, Verdict};
use crate::held::{HeldConn, HeldPlan, BROADCAST};
use crate::peers::{self, Fault, PeersConn, PeersPlan, Role};
use crate::roster::{self, Roster};
use crate::scenario::{Lifecycle, Traffic};
use crate::stats::{mono_ns, Latency, Pacer, ReceiverLedger};
use crate::wire::{self, Message, SendTemplate};
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PHASE_SETUP: u8 = 0;
pub const PHASE_RUN: u8 = 1;
pub const PHASE_DRAIN: u8 = 2;
/// `gated`: the gating sessions say `idle` and receive what was held;
/// `held`: the offline recipients connect and receive it.
pub const PHASE_RELEASE: u8 = 3;
pub const PHASE_CLOSE: u8 = 4;

const TIMER: Token = Token(usize::MAX);
const SCRATCH: usize = 256 * 1024;
/// How long a closing connection waits for the broker's close and EOF.
const CLOSE_WAIT_NS: u64 = 2_000_000_000;
/// Re-sign a cached hello after this long (the broker allows ±60 s).
const HELLO_MAX_AGE_MS: i64 = 30_000;
const PUBLISH_EVERY_NS: u64 = 100_000_000;
/// `gated`: repeat the gating `set_status` this often, so the manual status
/// stays fresh (PROTOCOL.md §5: a stale one yields to transcript inference
/// after HOOK_FRESH_WINDOW_SECONDS, and `working` to the TTL sweep).
const GATE_REFRESH_NS: u64 = 10_000_000_000;
/// `peers`: group sends in flight (sent, not yet acked) before the group
/// sender stops keeping its schedule (as an open-loop sender's window).
const GROUP_WINDOW: usize = 100_000;

/// Run-wide control, written by the main thread.
pub struct Control {
    pub phase: AtomicU8,
    /// CLOCK_MONOTONIC ns that timestamps are relative to.
    pub epoch_ns: u64,
    /// When the load started, relative to `epoch_ns`.
    pub run_start_ns: AtomicU64,
    /// Sends left when `--count` bounds the run.
    pub budget: Option<AtomicI64>,
}

impl Control {
    pub fn now(&self) -> u64 {
        mono_ns() - self.epoch_ns
    }
}

/// One worker's running counts; summed over workers for the report.
#[derive(Default, Clone, Copy)]
pub struct Tally {
    pub sent: u64,
    pub acked: u64,
    pub send_errors: u64,
    pub expected: u64,
    pub pushes: u64,
    pub duplicates: u64,
    pub foreign: u64,
    pub hellos: u64,
    pub run_hellos: u64,
    pub hello_failures: u64,
    pub conn_failures: u64,
    pub broker_closes: u64,
    pub ready: u64,
    /// `gated`: acked-or-pending `next`/`low` sends to gating peers (part
    /// of `expected`), those that arrived after the idle flip, and those
    /// that arrived before it (gating violations; both part of `pushes`).
    pub held_expected: u64,
    pub held: u64,
    pub violations: u64,
    /// Sends refused with `unavailable` (part of `send_errors`).
    pub unavailable: u64,
    /// Acks that said `"durable":false`.
    pub non_durable: u64,
    /// `peers`: group sends (part of `sent`), the pushes they call for
    /// (part of `expected`) and those received (part of `pushes`).
    pub group_sent: u64,
    pub group_expected: u64,
    pub group_pushes: u64,
    /// `peers`: `list_peers` sent; answered by a `peers_list` echoing its
    /// `_reqId`; answered by an `error`; answers not listing exactly the
    /// mesh's sessions; malformed answers (no or an unknown `_reqId`, not
    /// exactly one `self`, the scan and the JSON parser disagreeing); and
    /// the entries and bytes of the answers.
    pub lists_sent: u64,
    pub lists_answered: u64,
    pub list_errors: u64,
    pub list_mismatches: u64,
    pub list_malformed: u64,
    pub list_entries: u64,
    pub list_bytes: u64,
    /// `--client-ack`: `client_ack` messages written and the ids in them;
    /// first copies of pushes left unacked on purpose (`--ack-fraction`);
    /// pushes marked `redelivered` (not part of `pushes`), and of those:
    /// of a first copy left unacked, of one acked, of one never seen (that
    /// one is part of `pushes`), or with another `messageId` than the
    /// first copy of the same send (a broker fault).
    pub client_acks: u64,
    pub client_acked: u64,
    pub unacked: u64,
    pub redeliveries: u64,
    pub redelivered_unacked: u64,
    pub redelivered_after_ack: u64,
    pub redelivered_unseen: u64,
    pub redelivered_mismatch: u64,
    /// `--client-message-ids`: acks saying `"duplicate":true`, and pushes
    /// of the run's sends without a `client_message_id`.
    pub duplicate_acks: u64,
    pub pushes_without_client_id: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.send_errors += o.send_errors;
        self.expected += o.expected;
        self.pushes += o.pushes;
        self.duplicates += o.duplicates;
        self.foreign += o.foreign;
        self.hellos += o.hellos;
        self.run_hellos += o.run_hellos;
        self.hello_failures += o.hello_failures;
        self.conn_failures += o.conn_failures;
        self.broker_closes += o.broker_closes;
        self.ready += o.ready;
        self.held_expected += o.held_expected;
        self.held += o.held;
        self.violations += o.violations;
        self.unavailable += o.unavailable;
        self.non_durable += o.non_durable;
        self.group_sent += o.group_sent;
        self.group_expected += o.group_expected;
        self.group_pushes += o.group_pushes;
        self.lists_sent += o.lists_sent;
        self.lists_answered += o.lists_answered;
        self.list_errors += o.list_errors;
        self.list_mismatches += o.list_mismatches;
        self.list_malformed += o.list_malformed;
        self.list_entries += o.list_entries;
        self.list_bytes += o.list_bytes;
        self.client_acks += o.client_acks;
        self.client_acked += o.client_acked;
        self.unacked += o.unacked;
        self.redeliveries += o.redeliveries;
        self.redelivered_unacked += o.redelivered_unacked;
        self.redelivered_after_ack += o.redelivered_after_ack;
        self.redelivered_unseen += o.redelivered_unseen;
        self.redelivered_mismatch += o.redelivered_mismatch;
        self.duplicate_acks += o.duplicate_acks;
        self.pushes_without_client_id += o.pushes_without_client_id;
    }

    /// `--client-ack`: first copies left unacked that have not come again.
    pub fn awaiting_redelivery(&self) -> u64 {
        self.unacked
            .saturating_sub(self.redelivered_unacked + self.redelivered_mismatch)
    }

    /// `peers`: requests neither answered nor refused (yet).
    pub fn lists_pending(&self) -> u64 {
        self.lists_sent
            .saturating_sub(self.lists_answered + self.list_errors)
    }

    /// Pushes expected at once (not held). In `held`, `held_expected` and
    /// `held` are the pushes owed to and received by offline recipients.
    pub fn live_expected(&self) -> u64 {
        self.expected.saturating_sub(self.held_expected)
    }

    /// Pushes received at once (`now`, or to an idle session).
    pub fn live(&self) -> u64 {
        self.pushes.saturating_sub(self.held + self.violations)
    }
}

/// A worker's last published tally (every `PUBLISH_EVERY_NS`), read by the
/// main thread for progress lines and the report.
#[derive(Default)]
pub struct Counters(Mutex<Tally>);

impl Counters {
    fn publish(&self, tally: &Tally) {
        *self.0.lock().expect("counters lock") = *tally;
    }

    pub fn snapshot(&self) -> Tally {
        *self.0.lock().expect("counters lock")
    }
}

#[derive(Default, Clone)]
pub struct Hists {
    pub ack: Latency,
    /// Live pushes only (held ones are measured by the drain time); in
    /// `peers`, of broadcasts only.
    pub push: Latency,
    pub hello: Latency,
    /// `peers`: group send→push, per receiving member.
    pub group_push: Latency,
    /// `peers`: `list_peers` (intended send) → its `peers_list`.
    pub list: Latency,
    /// Open loop: how late each paced send was written (actual − due
    /// time), the proof that the schedule was kept.
    pub schedule_lag: Latency,
}

impl Hists {
    pub fn add(&mut self, o: &Hists) {
        self.ack.add(&o.ack);
        self.push.add(&o.push);
        self.hello.add(&o.hello);
        self.group_push.add(&o.group_push);
        self.list.add(&o.list);
        self.schedule_lag.add(&o.schedule_lag);
    }
    fn reset(&mut self) {
        self.ack.reset();
        self.push.reset();
        self.hello.reset();
        self.group_push.reset();
        self.list.reset();
        self.schedule_lag.reset();
    }
}

/// What a worker shares with the main thread.
#[derive(Default)]
pub struct WorkerShared {
    pub counters: Counters,
    pub hists: Mutex<Hists>,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub closes: Mutex<BTreeMap<u16, u64>>,
    pub failure: Mutex<Option<String>>,
    /// `gated`: each connection's records, by (mesh, member), when the
    /// worker ends.
    pub gate: Mutex<Vec<((u32, u32), GateConn)>>,
    /// `held`: the same.
    pub held: Mutex<Vec<((u32, u32), HeldConn)>>,
}

/// One connection's identity: which member of which mesh, whether it sends.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Index over all connections of the run.
    pub global: usize,
    pub mesh: u32,
    pub member: u32,
    pub sender: bool,
    /// Index into `RunShared::targets`: the `--url` this peer connects
    /// (and reconnects) to.
    pub url: u32,
    /// Connects only when the drain begins (`held` recipients).
    pub offline: bool,
    /// Stops reading after its hello (`--stalled-readers`).
    pub stalled: bool,
}

/// A broker a connection connects to: its address and the upgrade
/// request for its URL, built once.
pub struct Target {
    pub addr: SocketAddr,
    pub upgrade_request: Vec<u8>,
}

/// Immutable run data every worker reads.
pub struct RunShared {
    pub roster: Arc<Roster>,
    /// Per mesh, each member's pubkey as 64 ASCII hex bytes.
    pub pubkeys: Vec<Vec<[u8; 64]>>,
    pub run_id: String,
    /// One per `--url`; a connection uses `targets[slot.url]`.
    pub targets: Vec<Target>,
    pub expected_accept: String,
    pub traffic: Option<Traffic>,
    pub lifecycle: Lifecycle,
    pub expected_per_send: Vec<u64>,
    pub window: usize,
    /// Open loop: sends per second of each sender.
    pub rate_per_sender: Option<f64>,
    pub template: Option<SendTemplate>,
    pub source_addrs: Vec<Ipv4Addr>,
    /// Global slot index of member 0 of each mesh.
    pub mesh_offsets: Vec<usize>,
    /// Per sender (global slot): pushes it caused that no receiver has
    /// seen yet. The closed loop also waits on these, so a sender's window
    /// covers delivery, not only the ack (which the broker sends as soon as
    /// the pushes are queued in its outbound buffers).
    pub push_outstanding: Vec<AtomicI64>,
    pub connect_concurrency: usize,
    pub tick_ns: u64,
    /// `gated` only.
    pub gate: Option<GatePlan>,
    /// `held` only.
    pub held: Option<HeldPlan>,
    /// `peers` only.
    pub peers: Option<PeersPlan>,
    /// `gated`, `held`: held sends addressed to each gating (offline) peer
    /// (global slot).
    pub held_per_peer: Vec<AtomicU32>,
    /// A peer reached `max_held_per_peer`; the main thread ends the load.
    pub held_full: AtomicBool,
    /// `--client-ack`: sessions ask for it and ack their pushes.
    pub client_ack: Option<AckPlan>,
    /// `--client-message-ids`: `template` writes one into every send.
    pub client_ids: bool,
    /// `--session-hello`: sessions connect with `session_hello`.
    pub session_hello: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Upgrading,
    Helloing,
    /// What the scenario does before the load (`gated`: set_status;
    /// `peers`: join_group) is sent, followed by a barrier: waiting for
    /// the barrier's ack.
    Preparing,
    Ready,
    Closing,
}

struct Conn {
    slot: Slot,
    sock: Option<TcpStream>,
    state: State,
    partial: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    dirty: bool,
    inflight: usize,
    seqs: Vec<u32>,
    ledger: ReceiverLedger,
    pacer: Option<Pacer>,
    started_ns: u64,
    closing_since: u64,
    /// Churn: when to connect again (0: now).
    retry_at: u64,
    hello: Option<(i64, Vec<u8>)>,
    gate: Option<Box<GateConn>>,
    held: Option<Box<HeldConn>>,
    /// `peers`: a group sender's or lister's schedule and requests.
    peers: Option<Box<PeersConn>>,
    /// `--client-ack`: the pending `client_ack` and the pushes left unacked.
    acks: Option<Box<AckConn>>,
    /// `--client-message-ids`: this session's sends so far (the counter
    /// in each `client_message_id`).
    client_seq: u64,
    /// `--session-hello`: this slot's session key, made at its first hello
    /// and kept across reconnects (as a CLI session keeps its key).
    session_key: Option<Box<roster::SessionKey>>,
}

/// Everything of the worker but the connections (so both can be borrowed).
struct Env {
    run: Arc<RunShared>,
    ctl: Arc<Control>,
    shared: Arc<WorkerShared>,
    local: Tally,
    hists: Hists,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<u16, u64>,
    failure: Option<String>,
    dirty: Vec<usize>,
    rng: u64,
    budget_claimed: i64,
    budget_done: bool,
    phase: u8,
    now: u64,
    in_setup: usize,
    /// Pushes seen per sender since the last flush into `push_outstanding`.
    push_seen: std::collections::HashMap<usize, i64>,
}

impl Env {
    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.failure = Some(what);
        }
    }

    fn error_seen(&mut self, code: &str) {
        *self.errors.entry(code.to_string()).or_default() += 1;
    }

    #[inline]
    fn rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn take_budget(&mut self) -> bool {
        let Some(budget) = &self.ctl.budget else {
            return true;
        };
        if self.budget_claimed > 0 {
            self.budget_claimed -= 1;
            return true;
        }
        if self.budget_done {
            return false;
        }
        const CHUNK: i64 = 32;
        let before = budget.fetch_sub(CHUNK, Relaxed);
        if before <= 0 {
            self.budget_done = true;
            return false;
        }
        self.budget_claimed = before.min(CHUNK) - 1;
        true
    }

    fn mark_dirty(&mut self, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(conn.slot.global);
        }
    }

    /// Appends one send with timestamp `ts` to the connection.
    fn write_send(&mut self, conn: &mut Conn, ts: u64) {
        let run = self.run.clone();
        if let Some(plan) = &run.held {
            self.write_held_send(plan, conn, ts);
            return;
        }
        let template = run.template.as_ref().expect("traffic scenario");
        let start = conn.wbuf.len();
        let mesh = conn.slot.mesh as usize;
        let me = conn.slot.member;
        match run.traffic {
            Some(Traffic::Direct) => {
                let n = run.pubkeys[mesh].len() as u64;
                let mut target = (self.rand() % (n - 1)) as u32;
                if target >= me {
                    target += 1;
                }
                let seq_slot = &mut conn.seqs[target as usize];
                let seq = *seq_slot;
                *seq_slot += 1;
                let pubkey = &run.pubkeys[mesh][target as usize];
                if let Some(plan) = &run.gate {
                    let p = plan.mix.pick(self.rand());
                    plan.templates[p].write_tagged(&mut conn.wbuf, pubkey, target, me, seq, ts);
                    if p != gate::NOW && plan.working[mesh][target as usize] {
                        self.local.held_expected += 1;
                        let g = run.mesh_offsets[mesh] + target as usize;
                        let n = run.held_per_peer[g].fetch_add(1, Relaxed) + 1;
                        if n >= plan.max_held_per_peer {
                            run.held_full.store(true, Relaxed);
                        }
                    }
                } else {
                    template.write(&mut conn.wbuf, pubkey, me, seq, ts);
                }
            }
            _ => {
                let seq = conn.seqs[0];
                conn.seqs[0] += 1;
                template.write(&mut conn.wbuf, b"", me, seq, ts);
            }
        }
        if template.has_client_ids() && run.gate.is_none() {
            template.patch_client_id(&mut conn.wbuf[start..], conn.client_seq);
            conn.client_seq += 1;
        }
        let per = run.expected_per_send[mesh];
        self.local.expected += per;
        run.push_outstanding[conn.slot.global].fetch_add(per as i64, Relaxed);
        self.local.sent += 1;
        conn.inflight += 1;
        self.mark_dirty(conn);
    }

    /// `held`: a direct send to a random offline member, or every
    /// `--broadcast-every`-th one to `*`; one sequence per sender.
    fn write_held_send(&mut self, plan: &HeldPlan, conn: &mut Conn, ts: u64) {
        let run = self.run.clone();
        let mesh = conn.slot.mesh as usize;
        let n = run.pubkeys[mesh].len();
        let senders = plan.senders[mesh];
        let seq = conn.seqs[0];
        conn.seqs[0] += 1;
        let me = conn.slot.member;
        let offline = run.mesh_offsets[mesh] + senders..run.mesh_offsets[mesh] + n;
        let target = if plan.is_broadcast(seq as u64) {
            plan.broadcast
                .write_tagged(&mut conn.wbuf, b"", BROADCAST, me, seq, ts);
            for g in offline {
                self.count_held(plan, g);
            }
            BROADCAST
        } else {
            let target = senders + (self.rand() % (n - senders) as u64) as usize;
            let pubkey = &run.pubkeys[mesh][target];
            plan.direct
                .write_tagged(&mut conn.wbuf, pubkey, target as u32, me, seq, ts);
            self.count_held(plan, run.mesh_offsets[mesh] + target);
            target as u32
        };
        let (owed, held) = plan.owed(mesh, n, target);
        self.local.expected += owed;
        self.local.held_expected += held;
        run.push_outstanding[conn.slot.global].fetch_add((owed - held) as i64, Relaxed);
        self.local.sent += 1;
        conn.inflight += 1;
        self.mark_dirty(conn);
    }

    /// One more send held for the offline peer `g` (global slot).
    fn count_held(&self, plan: &HeldPlan, g: usize) {
        let n = self.run.held_per_peer[g].fetch_add(1, Relaxed) + 1;
        if n >= plan.max_held_per_peer {
            self.run.held_full.store(true, Relaxed);
        }
    }

    /// Closed loop: top the connection's window up.
    fn refill(&mut self, conn: &mut Conn) {
        if self.phase != PHASE_RUN || self.run.rate_per_sender.is_some() || !conn.slot.sender {
            return;
        }
        // Broadcast also waits on delivery (see `push_outstanding`); a
        // direct send's one push travels with its ack, so the ack window
        // bounds it already and waiting on it only costs batching.
        let per = self.run.expected_per_send[conn.slot.mesh as usize] as i64;
        let push_window = if self.run.traffic == Some(Traffic::Broadcast) {
            self.run.window as i64 * per
        } else {
            i64::MAX
        };
        while conn.inflight < self.run.window
            && self.run.push_outstanding[conn.slot.global].load(Relaxed) < push_window
            && self.take_budget()
        {
            let ts = self.now;
            self.write_send(conn, ts);
        }
    }

    /// Open loop: every due send that the window allows.
    fn pace(&mut self, conn: &mut Conn) -> u64 {
        let Some(mut pacer) = conn.pacer.take() else {
            return u64::MAX;
        };
        while conn.inflight < self.run.window {
            let Some(intended) = pacer.due(self.now) else {
                break;
            };
            if !self.take_budget() {
                break;
            }
            self.hists.schedule_lag.record_since(intended, self.now);
            self.write_send(conn, intended);
        }
        let next = pacer.next_due_ns;
        conn.pacer = Some(pacer);
        next
    }

    /// `peers`: every due group send or `list_peers` of the connection.
    fn pace_peers(&mut self, conn: &mut Conn) {
        let run = self.run.clone();
        let Some(plan) = &run.peers else {
            return;
        };
        let Some(p) = conn.peers.as_mut() else {
            return;
        };
        let role = p.role;
        let Some(mut pacer) = p.pacer.take() else {
            return;
        };
        loop {
            if role == Role::GroupSender && conn.inflight >= GROUP_WINDOW {
                break;
            }
            let Some(intended) = pacer.due(self.now) else {
                break;
            };
            match role {
                Role::GroupSender => {
                    self.hists.schedule_lag.record_since(intended, self.now);
                    self.write_group_send(plan, conn, intended);
                }
                Role::Lister => {
                    self.hists.schedule_lag.record_since(intended, self.now);
                    let p = conn.peers.as_mut().expect("a lister");
                    let seq = p.ledger.issue(intended);
                    conn.wbuf.extend_from_slice(&wire::list_peers_frame(seq));
                    self.local.lists_sent += 1;
                    self.mark_dirty(conn);
                }
                Role::Sender | Role::Receiver => break,
            }
        }
        conn.peers.as_mut().expect("checked above").pacer = Some(pacer);
    }

    /// `peers`: one send to the group target, timestamped `ts`.
    fn write_group_send(&mut self, plan: &PeersPlan, conn: &mut Conn, ts: u64) {
        let mesh = conn.slot.mesh as usize;
        let seq = conn.seqs[0];
        conn.seqs[0] += 1;
        plan.group_template
            .write(&mut conn.wbuf, b"", conn.slot.member, seq, ts);
        let per = plan.meshes[mesh].group_expected;
        self.local.expected += per;
        self.local.group_expected += per;
        self.local.group_sent += 1;
        self.local.sent += 1;
        self.run.push_outstanding[conn.slot.global].fetch_add(per as i64, Relaxed);
        conn.inflight += 1;
        self.mark_dirty(conn);
    }
}

pub struct Worker {
    poll: Poll,
    conns: Vec<Conn>,
    /// Local index of each global slot id this worker owns.
    index: std::collections::HashMap<usize, usize>,
    env: Env,
    scratch: Vec<u8>,
    timerfd: Option<std::os::fd::OwnedFd>,
    pending: std::collections::VecDeque<usize>,
    /// Offline slots, connected when the drain begins.
    deferred: Vec<usize>,
    senders: Vec<usize>,
    /// `peers`: the group sender and listers (paced on their own).
    paced: Vec<usize>,
}

fn timerfd_create() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    // SAFETY: a fresh fd we own.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn timerfd_arm(fd: i32, abs_mono_ns: u64) {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: (abs_mono_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (abs_mono_ns % 1_000_000_000) as libc::c_long,
        },
    };
    // SAFETY: valid fd and spec.
    unsafe { libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
}

impl Worker {
    pub fn new(
        run: Arc<RunShared>,
        ctl: Arc<Control>,
        shared: Arc<WorkerShared>,
        slots: Vec<Slot>,
        seed: u64,
    ) -> std::io::Result<Worker> {
        let poll = Poll::new()?;
        let mut index = std::collections::HashMap::new();
        let mut senders = Vec::new();
        let mut paced = Vec::new();
        let conns: Vec<Conn> = slots
            .into_iter()
            .enumerate()
            .map(|(i, slot)| {
                index.insert(slot.global, i);
                if slot.sender && run.traffic.is_some() {
                    senders.push(i);
                }
                let peers_role =
                    run.peers
                        .as_ref()
                        .and_then(|plan| match plan.role(slot.mesh, slot.member) {
                            r @ (Role::GroupSender | Role::Lister) => Some(r),
                            Role::Sender | Role::Receiver => None,
                        });
                if peers_role.is_some() {
                    paced.push(i);
                }
                let seqs = match run.traffic {
                    Some(Traffic::Direct) if run.held.is_some() => vec![0],
                    Some(Traffic::Direct) => vec![0; run.pubkeys[slot.mesh as usize].len()],
                    Some(Traffic::Broadcast) => vec![0],
                    None => Vec::new(),
                };
                Conn {
                    slot,
                    sock: None,
                    state: State::Idle,
                    partial: Vec::new(),
                    wbuf: Vec::new(),
                    wpos: 0,
                    dirty: false,
                    inflight: 0,
                    seqs,
                    ledger: ReceiverLedger::default(),
                    pacer: None,
                    started_ns: 0,
                    closing_since: 0,
                    retry_at: 0,
                    hello: None,
                    gate: run.gate.as_ref().map(|plan| {
                        let mesh = &plan.working[slot.mesh as usize];
                        Box::new(GateConn::new(mesh[slot.member as usize], mesh.len()))
                    }),
                    held: run
                        .held
                        .as_ref()
                        .map(|_| Box::new(HeldConn::new(slot.offline))),
                    peers: peers_role.map(|r| Box::new(PeersConn::new(r))),
                    acks: run.client_ack.map(|_| Box::<AckConn>::default()),
                    client_seq: 0,
                    session_key: None,
                }
            })
            .collect();
        let timerfd = if run.rate_per_sender.is_some() || run.peers.is_some() {
            let fd = timerfd_create().ok_or_else(std::io::Error::last_os_error)?;
            poll.registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), TIMER, Interest::READABLE)?;
            Some(fd)
        } else {
            None
        };
        let (deferred, pending): (Vec<usize>, Vec<usize>) =
            (0..conns.len()).partition(|&i| conns[i].slot.offline);
        Ok(Worker {
            poll,
            conns,
            index,
            env: Env {
                run,
                ctl,
                shared,
                local: Tally::default(),
                hists: Hists::default(),
                errors: BTreeMap::new(),
                closes: BTreeMap::new(),
                failure: None,
                dirty: Vec::new(),
                rng: seed | 1,
                budget_claimed: 0,
                budget_done: false,
                phase: PHASE_SETUP,
                now: 0,
                in_setup: 0,
                push_seen: std::collections::HashMap::new(),
            },
            scratch: vec![0; SCRATCH],
            timerfd,
            pending: pending.into(),
            deferred,
            senders,
            paced,
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(4096);
        let mut last_publish = 0u64;
        let mut sending_started = false;
        let mut close_started: Option<u64> = None;
        let mut last_scan = 0u64;
        let mut last_refresh = 0u64;
        let mut released = false;
        loop {
            let env = &mut self.env;
            env.phase = env.ctl.phase.load(Relaxed);
            env.now = env.ctl.now();
            if env.phase == PHASE_CLOSE && close_started.is_none() {
                close_started = Some(env.now);
                self.pending.clear();
                for i in 0..self.conns.len() {
                    self.begin_close(i);
                }
                self.flush_dirty();
            }
            if let Some(t) = close_started {
                let open = self.conns.iter().filter(|c| c.sock.is_some()).count();
                if open == 0 || self.env.now.saturating_sub(t) > CLOSE_WAIT_NS {
                    for i in 0..self.conns.len() {
                        self.drop_conn(i);
                    }
                    break;
                }
            }
            self.start_connects();
            let timeout = self.arm_timer();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.env.fail(format!("epoll: {e}"));
                    break;
                }
            }
            self.env.now = self.env.ctl.now();
            for ev in events.iter() {
                let token = ev.token();
                if token == TIMER {
                    let mut buf = [0u8; 8];
                    if let Some(fd) = &self.timerfd {
                        // SAFETY: reading 8 bytes into a local array.
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                    }
                    continue;
                }
                let Some(&i) = self.index.get(&token.0) else {
                    continue;
                };
                if ev.is_writable() || ev.is_error() {
                    self.on_writable(i);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(i);
                }
            }
            // The load starts (once) when the main thread says so.
            if self.env.phase == PHASE_RUN && !sending_started {
                sending_started = true;
                last_refresh = self.env.now;
                self.start_sending();
            }
            if self.env.run.gate.is_some() {
                let phase = self.env.phase;
                if (phase == PHASE_RUN || phase == PHASE_DRAIN)
                    && self.env.now.saturating_sub(last_refresh) > GATE_REFRESH_NS
                {
                    last_refresh = self.env.now;
                    self.gate_send(false);
                }
                if phase == PHASE_RELEASE && !released {
                    released = true;
                    self.gate_send(true);
                }
            }
            if self.env.phase == PHASE_RELEASE && !self.deferred.is_empty() {
                self.pending.extend(self.deferred.drain(..));
            }
            if self.env.phase == PHASE_RUN && self.env.run.rate_per_sender.is_some() {
                for k in 0..self.senders.len() {
                    let i = self.senders[k];
                    if self.conns[i].state == State::Ready {
                        let conn = &mut self.conns[i];
                        self.env.pace(conn);
                    }
                }
            }
            if self.env.phase == PHASE_RUN {
                for k in 0..self.paced.len() {
                    let i = self.paced[k];
                    if self.conns[i].state == State::Ready {
                        let conn = &mut self.conns[i];
                        self.env.pace_peers(conn);
                    }
                }
            }
            if !self.env.push_seen.is_empty() {
                for (g, n) in self.env.push_seen.drain() {
                    self.env.run.push_outstanding[g].fetch_sub(n, Relaxed);
                }
            }
            if self.env.phase == PHASE_RUN && self.env.run.rate_per_sender.is_none() {
                for k in 0..self.senders.len() {
                    let i = self.senders[k];
                    if self.conns[i].state == State::Ready {
                        let conn = &mut self.conns[i];
                        self.env.refill(conn);
                    }
                }
            }
            if self.env.now.saturating_sub(last_scan) > 50_000_000 {
                last_scan = self.env.now;
                self.scan_closing();
            }
            self.flush_dirty();
            if self.env.now.saturating_sub(last_publish) > PUBLISH_EVERY_NS {
                last_publish = self.env.now;
                self.publish();
            }
        }
        self.publish();
        if self.env.run.gate.is_some() {
            let records = self
                .conns
                .iter_mut()
                .filter_map(|c| Some(((c.slot.mesh, c.slot.member), *c.gate.take()?)))
                .collect();
            *self.env.shared.gate.lock().unwrap() = records;
        }
        if self.env.run.held.is_some() {
            let records = self
                .conns
                .iter_mut()
                .filter_map(|c| Some(((c.slot.mesh, c.slot.member), *c.held.take()?)))
                .collect();
            *self.env.shared.held.lock().unwrap() = records;
        }
    }

    /// `gated`: every ready gating session repeats its status (`release`
    /// false) or says `idle` (true; the release clock starts now).
    fn gate_send(&mut self, release: bool) {
        let run = self.env.run.clone();
        let Some(plan) = &run.gate else {
            return;
        };
        let frame = if release {
            &plan.idle_frame
        } else {
            &plan.gate_frame
        };
        for i in 0..self.conns.len() {
            let conn = &mut self.conns[i];
            let Some(g) = conn.gate.as_mut() else {
                continue;
            };
            if !g.working || g.released_at.is_some() || conn.state != State::Ready {
                continue;
            }
            if release {
                g.released_at = Some(self.env.now);
            }
            conn.wbuf.extend_from_slice(frame);
            self.env.mark_dirty(conn);
        }
    }

    fn publish(&mut self) {
        let env = &mut self.env;
        env.shared.counters.publish(&env.local);
        env.shared.hists.lock().unwrap().add(&env.hists);
        env.hists.reset();
        if !env.errors.is_empty() {
            let mut shared = env.shared.errors.lock().unwrap();
            for (k, v) in std::mem::take(&mut env.errors) {
                *shared.entry(k).or_default() += v;
            }
        }
        if !env.closes.is_empty() {
            let mut shared = env.shared.closes.lock().unwrap();
            for (k, v) in std::mem::take(&mut env.closes) {
                *shared.entry(k).or_default() += v;
            }
        }
        if let Some(f) = env.failure.take() {
            let mut shared = env.shared.failure.lock().unwrap();
            if shared.is_none() {
                *shared = Some(f);
            }
        }
    }

    /// Poll timeout; in open loop also arms the timerfd for the next due send.
    fn arm_timer(&mut self) -> Duration {
        let default = Duration::from_millis(10);
        let Some(fd) = &self.timerfd else {
            return default;
        };
        if self.env.phase != PHASE_RUN {
            return default;
        }
        let mut next = u64::MAX;
        if self.env.run.rate_per_sender.is_some() {
            for &i in &self.senders {
                let c = &self.conns[i];
                if c.state == State::Ready && c.inflight < self.env.run.window {
                    if let Some(p) = &c.pacer {
                        next = next.min(p.next_due_ns);
                    }
                }
            }
        }
        for &i in &self.paced {
            let c = &self.conns[i];
            if c.state == State::Ready {
                if let Some(p) = c.peers.as_ref().and_then(|p| p.pacer.as_ref()) {
                    next = next.min(p.next_due_ns);
                }
            }
        }
        if next != u64::MAX {
            let at = next.max(self.env.now + self.env.run.tick_ns);
            timerfd_arm(fd.as_raw_fd(), self.env.ctl.epoch_ns + at);
        }
        default
    }

    fn start_sending(&mut self) {
        let start = self.env.ctl.run_start_ns.load(Relaxed);
        let n = self.senders.len().max(1);
        for k in 0..self.senders.len() {
            let i = self.senders[k];
            if let Some(rate) = self.env.run.rate_per_sender {
                let offset = (self.env.rand() % 1_000_000) as f64 / 1e6;
                let _ = n;
                self.conns[i].pacer = Some(Pacer::new(rate, start, offset));
            } else if self.conns[i].state == State::Ready {
                let conn = &mut self.conns[i];
                self.env.refill(conn);
            }
        }
        let run = self.env.run.clone();
        if let Some(plan) = &run.peers {
            for k in 0..self.paced.len() {
                let i = self.paced[k];
                let offset = (self.env.rand() % 1_000_000) as f64 / 1e6;
                let p = self.conns[i].peers.as_mut().expect("paced");
                let rate = match p.role {
                    Role::GroupSender => plan.group_rate_per_sender,
                    _ => plan.list_rate_per_lister,
                };
                if rate > 0.0 {
                    p.pacer = Some(Pacer::new(rate, start, offset));
                }
            }
        }
    }

    fn start_connects(&mut self) {
        let churn = self.env.run.lifecycle == Lifecycle::Churn;
        if churn && self.env.phase != PHASE_RUN {
            return;
        }
        // Held recipients connect in the release phase.
        if self.env.phase == PHASE_DRAIN || self.env.phase >= PHASE_CLOSE {
            return;
        }
        let mut deferred = Vec::new();
        while self.env.in_setup < self.env.run.connect_concurrency {
            let Some(i) = self.pending.pop_front() else {
                break;
            };
            if self.conns[i].retry_at > self.env.now {
                deferred.push(i);
                continue;
            }
            self.connect(i);
        }
        self.pending.extend(deferred);
    }

    fn connect(&mut self, i: usize) {
        let run = self.env.run.clone();
        let conn = &mut self.conns[i];
        let target = run.targets[conn.slot.url as usize].addr;
        let result = (|| -> std::io::Result<TcpStream> {
            use socket2::{Domain, Protocol, Socket, Type};
            let domain = Domain::for_address(target);
            let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            sock.set_nonblocking(true)?;
            sock.set_nodelay(true)?;
            if conn.slot.stalled {
                // A small window fills fast: the broker's queue for this
                // session overflows after a few pushes, not megabytes.
                sock.set_recv_buffer_size(4096)?;
            }
            if run.source_addrs.len() > 1 {
                let src = run.source_addrs[conn.slot.global % run.source_addrs.len()];
                let one: libc::c_int = 1;
                // SAFETY: setsockopt with a valid int option value.
                unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
            }
            match sock.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            Ok(TcpStream::from_std(sock.into()))
        })();
        let mut stream = match result {
            Ok(s) => s,
            Err(e) => {
                self.connection_failed(i, format!("connect {target}: {e}"));
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(conn.slot.global),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.connection_failed(i, format!("register: {e}"));
            return;
        }
        conn.sock = Some(stream);
        conn.state = State::Connecting;
        conn.started_ns = self.env.now;
        if let Some(h) = conn.held.as_mut().filter(|h| h.recipient) {
            h.connect_at.get_or_insert(self.env.now);
        }
        conn.partial.clear();
        conn.wbuf.clear();
        conn.wpos = 0;
        conn.inflight = 0;
        self.env.in_setup += 1;
    }

    /// A connection that failed before or instead of its hello_ack, or was
    /// dropped unexpectedly.
    fn connection_failed(&mut self, i: usize, why: String) {
        let was = self.conns[i].state;
        self.env.local.conn_failures += 1;
        self.drop_conn(i);
        let churn = self.env.run.lifecycle == Lifecycle::Churn;
        if churn {
            // Retry a little later; a churn run reports failures, it does not stop.
            self.conns[i].retry_at = self.env.now + 10_000_000;
            if self.env.phase == PHASE_RUN {
                self.pending.push_back(i);
            }
            self.env
                .error_seen(&format!("connection: {}", short_reason(&why)));
        } else if self.env.phase < PHASE_CLOSE {
            self.env.fail(format!(
                "connection {} ({was:?}): {why}",
                self.conns[i].slot.global
            ));
        }
    }

    fn drop_conn(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if matches!(
            conn.state,
            State::Connecting | State::Upgrading | State::Helloing | State::Preparing
        ) {
            self.env.in_setup -= 1;
        }
        if conn.state == State::Ready {
            self.env.local.ready -= 1;
        }
        if let Some(mut sock) = conn.sock.take() {
            let _ = self.poll.registry().deregister(&mut sock);
        }
        conn.state = State::Idle;
        if let Some(a) = conn.acks.as_mut() {
            a.batch.clear();
        }
        conn.partial = Vec::new();
        conn.wbuf = Vec::new();
        conn.wpos = 0;
        conn.inflight = 0;
    }

    fn begin_close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.sock.is_none() || conn.state == State::Closing {
            return;
        }
        if conn.slot.stalled && conn.state == State::Ready {
            // It reads nothing, so it would never see the broker's answer.
            self.drop_conn(i);
            return;
        }
        if matches!(conn.state, State::Connecting | State::Upgrading) {
            self.drop_conn(i);
            return;
        }
        if matches!(conn.state, State::Helloing | State::Preparing) {
            self.env.in_setup -= 1;
        }
        if conn.state == State::Ready {
            self.env.local.ready -= 1;
        }
        conn.state = State::Closing;
        conn.closing_since = self.env.now;
        conn.wbuf.extend_from_slice(&wire::close_frame(1000));
        self.env.mark_dirty(conn);
    }

    /// Closing connections the broker did not finish closing in time.
    fn scan_closing(&mut self) {
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if c.state == State::Closing
                && self.env.now.saturating_sub(c.closing_since) > CLOSE_WAIT_NS
            {
                self.env.error_seen("close: no EOF from broker within 2 s");
                self.finish_closed(i);
            }
        }
    }

    /// A connection we closed is gone: churn connects it again.
    fn finish_closed(&mut self, i: usize) {
        self.drop_conn(i);
        if self.env.run.lifecycle == Lifecycle::Churn && self.env.phase == PHASE_RUN {
            self.conns[i].retry_at = 0;
            self.pending.push_back(i);
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.env.dirty);
        for &g in &dirty {
            if let Some(&i) = self.index.get(&g) {
                self.conns[i].dirty = false;
                self.flush(i);
            }
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.env.dirty.is_empty() {
            self.env.dirty = dirty;
        }
    }

    fn flush(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.state == State::Connecting {
            return;
        }
        let Some(sock) = conn.sock.as_mut() else {
            return;
        };
        while conn.wpos < conn.wbuf.len() {
            match sock.write(&conn.wbuf[conn.wpos..]) {
                Ok(0) => break,
                Ok(n) => conn.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if conn.state == State::Closing {
                        self.finish_closed(i);
                    } else {
                        self.connection_failed(i, format!("write: {e}"));
                    }
                    return;
                }
            }
        }
        conn.wbuf.clear();
        conn.wpos = 0;
        if conn.wbuf.capacity() > 1 << 20 {
            conn.wbuf.shrink_to(64 * 1024);
        }
    }

    fn on_writable(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        let Some(sock) = conn.sock.as_ref() else {
            return;
        };
        if conn.state == State::Connecting {
            match sock.take_error() {
                Ok(Some(e)) | Err(e) => {
                    self.connection_failed(i, format!("connect: {e}"));
                    return;
                }
                Ok(None) => {}
            }
            match sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) => {
                    self.connection_failed(i, format!("connect: {e}"));
                    return;
                }
            }
            conn.state = State::Upgrading;
            let target = &self.env.run.targets[conn.slot.url as usize];
            conn.wbuf.extend_from_slice(&target.upgrade_request);
        }
        self.flush(i);
    }

    /// Reads what arrived; then this read's pushes are acked in one
    /// `client_ack` (`--client-ack`).
    fn on_readable(&mut self, i: usize) {
        self.read_available(i);
        let conn = &mut self.conns[i];
        let Some(a) = conn.acks.as_mut() else {
            return;
        };
        if conn.sock.is_none() {
            a.batch.clear();
            return;
        }
        if let Some(n) = a.batch.finish(&mut conn.wbuf) {
            self.env.local.client_acks += 1;
            self.env.local.client_acked += n as u64;
            self.env.mark_dirty(conn);
        }
    }

    fn read_available(&mut self, i: usize) {
        loop {
            let conn = &mut self.conns[i];
            let Some(sock) = conn.sock.as_ref() else {
                return;
            };
            if conn_stalled(conn) {
                // Stalled after its hello_ack: what arrives stays unread.
                return;
            }
            if conn.state == State::Connecting {
                // Readable before writable: a refused connect.
                self.on_writable(i);
                if self.conns[i].state == State::Connecting {
                    return;
                }
                continue;
            }
            // SAFETY: reading into our own scratch buffer.
            let n = unsafe {
                libc::read(
                    sock.as_raw_fd(),
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => return,
                    ErrorKind::Interrupted => continue,
                    _ => {
                        self.on_eof(i, format!("read: {e}"));
                        return;
                    }
                }
            }
            if n == 0 {
                self.on_eof(i, "broker closed the connection".into());
                return;
            }
            let n = n as usize;
            self.env.now = self.env.ctl.now();
            let conn = &mut self.conns[i];
            let outcome = if conn.partial.is_empty() {
                let (consumed, outcome) = on_data(conn, &mut self.env, &self.scratch[..n]);
                if outcome == Outcome::Continue {
                    conn.partial.extend_from_slice(&self.scratch[consumed..n]);
                }
                outcome
            } else {
                let mut buf = std::mem::take(&mut conn.partial);
                buf.extend_from_slice(&self.scratch[..n]);
                let (consumed, outcome) = on_data(conn, &mut self.env, &buf);
                buf.drain(..consumed);
                conn.partial = buf;
                outcome
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::Fail(why) => {
                    self.connection_failed(i, why);
                    return;
                }
                Outcome::Closed => {
                    self.finish_closed(i);
                    return;
                }
                Outcome::Churned => {
                    // Close right away: the close frame is queued; flushed below.
                    let conn = &mut self.conns[i];
                    conn.state = State::Closing;
                    conn.closing_since = self.env.now;
                }
            }
            if n < self.scratch.len() {
                return;
            }
        }
    }

    fn on_eof(&mut self, i: usize, why: String) {
        let state = self.conns[i].state;
        if state == State::Closing || self.env.phase == PHASE_CLOSE {
            self.finish_closed(i);
            return;
        }
        self.connection_failed(i, why);
    }
}

fn conn_stalled(conn: &Conn) -> bool {
    conn.slot.stalled && conn.state == State::Ready
}

fn short_reason(why: &str) -> String {
    why.split(" (os error").next().unwrap_or(why).to_string()
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Continue,
    Fail(String),
    /// Churn: the hello succeeded and the close frame is queued.
    Churned,
    /// Our close was answered.
    Closed,
}

/// Handles received bytes: the upgrade response, then frames. Returns how
/// much was consumed (the rest is an incomplete frame).
fn on_data(conn: &mut Conn, env: &mut Env, data: &[u8]) -> (usize, Outcome) {
    let mut pos = 0;
    if conn.state == State::Upgrading {
        let Some(end) = memchr::memmem::find(data, b"\r\n\r\n") else {
            if data.len() > 16 * 1024 {
                return (0, Outcome::Fail("upgrade response too long".into()));
            }
            return (0, Outcome::Continue);
        };
        if let Err(e) = wire::check_upgrade_response(&data[..end + 4], &env.run.expected_accept) {
            return (0, Outcome::Fail(e));
        }
        pos = end + 4;
        conn.state = State::Helloing;
        let now_ms = roster::now_ms();
        let stale = conn
            .hello
            .as_ref()
            .is_none_or(|(at, _)| now_ms - at > HELLO_MAX_AGE_MS);
        if stale {
            let run = &env.run;
            let mesh = &run.roster.meshes[conn.slot.mesh as usize];
            let member = &mesh.members[conn.slot.member as usize];
            let session = format!("lg-{}-s{}", run.run_id, conn.slot.global);
            let opts = roster::HelloOptions {
                session_id: &session,
                timestamp_ms: now_ms,
                client_ack: run.client_ack.is_some(),
            };
            let frame = if run.session_hello {
                let key = conn
                    .session_key
                    .get_or_insert_with(|| Box::new(roster::SessionKey::generate()));
                roster::session_hello_frame(&mesh.id, member, key, opts)
            } else {
                roster::hello_frame(&mesh.id, member, opts)
            };
            conn.hello = Some((now_ms, frame));
        }
        let frame = &conn.hello.as_ref().unwrap().1;
        conn.wbuf.extend_from_slice(frame);
        env.mark_dirty(conn);
    }
    while pos < data.len() {
        let frame = match wire::parse_server_frame(&data[pos..]) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return (pos, Outcome::Fail(format!("bad server frame: {e}"))),
        };
        let payload = &data[pos + frame.header_len..pos + frame.total_len()];
        pos += frame.total_len();
        match frame.opcode {
            wire::OP_TEXT | wire::OP_BINARY if frame.fin => {
                if let Some(o) = on_message(conn, env, payload) {
                    return (pos, o);
                }
            }
            wire::OP_CLOSE => {
                let code = payload
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(1005);
                *env.closes.entry(code).or_default() += 1;
                if conn.state == State::Closing {
                    // The close handshake is complete: the broker should end
                    // the TCP connection now, but we need not wait for it.
                    return (pos, Outcome::Closed);
                }
                if env.phase < PHASE_CLOSE {
                    env.local.broker_closes += 1;
                    if conn.state == State::Helloing {
                        env.local.hello_failures += 1;
                    }
                    return (
                        pos,
                        Outcome::Fail(format!("broker closed the connection with {code}")),
                    );
                }
            }
            wire::OP_PING => {
                conn.wbuf
                    .extend_from_slice(&wire::client_frame(meshbroker::ws::OpCode::Pong, payload));
                env.mark_dirty(conn);
            }
            wire::OP_PONG => {}
            _ => env.error_seen("loadgen: fragmented or unknown frame"),
        }
    }
    (pos, Outcome::Continue)
}

fn on_message(conn: &mut Conn, env: &mut Env, payload: &[u8]) -> Option<Outcome> {
    let message = wire::classify(payload);
    if conn.acks.is_some() && !lease(conn, env, payload, &message) {
        // A redelivery of a push this session had: counted apart.
        return None;
    }
    match message {
        Message::Push { sender, seq, ts_ns } if env.run.gate.is_some() => {
            gated_push(conn, env, payload, sender, seq, ts_ns);
        }
        Message::Push { sender, seq, ts_ns } if env.run.held.is_some() => {
            if conn.acks.is_some() {
                // For telling redeliveries apart; the held check itself
                // goes by messageId.
                conn.ledger.record(sender, seq);
            }
            held_push(conn, env, payload, sender, ts_ns);
        }
        Message::Push { sender, seq, ts_ns } => {
            if env.run.client_ids && !wire::has_client_id(payload) {
                env.local.pushes_without_client_id += 1;
            }
            if conn.ledger.record(sender, seq) {
                env.local.pushes += 1;
                let mesh = conn.slot.mesh as usize;
                let g = env.run.mesh_offsets[mesh] + sender as usize;
                if g < env.run.push_outstanding.len() {
                    *env.push_seen.entry(g).or_default() += 1;
                }
                let group = env
                    .run
                    .peers
                    .as_ref()
                    .is_some_and(|p| p.meshes[mesh].group_sender == Some(sender));
                if group {
                    env.local.group_pushes += 1;
                    env.hists.group_push.record_since(ts_ns, env.now);
                } else {
                    env.hists.push.record_since(ts_ns, env.now);
                }
            } else {
                env.local.duplicates += 1;
            }
        }
        Message::ForeignPush
            if (env.run.gate.is_some() || env.run.peers.is_some())
                && wire::is_barrier_push(payload) => {}
        Message::ForeignPush => env.local.foreign += 1,
        Message::Ack { ts_ns } => {
            if env.run.client_ids && wire::is_duplicate_ack(payload) {
                env.local.duplicate_acks += 1;
            }
            on_ack(conn, env, ts_ns)
        }
        Message::TaggedAck {
            ts_ns, target, seq, ..
        } => {
            if let Some(h) = conn.held.as_mut() {
                if wire::is_non_durable_ack(payload) {
                    env.local.non_durable += 1;
                }
                match wire::message_id(payload) {
                    Some(id) => h.record_ack(id, target),
                    None => env.error_seen("loadgen: ack without messageId"),
                }
            }
            if let (Some(plan), Some(g)) = (&env.run.gate, conn.gate.as_mut()) {
                let mesh = conn.slot.mesh as usize;
                if plan.working[mesh].get(target as usize) == Some(&true) {
                    if let Some(list) = g.acks.get_mut(target as usize) {
                        list.push(Acked {
                            seq,
                            at_ns: env.now,
                        });
                    }
                }
            }
            on_ack(conn, env, Some(ts_ns));
        }
        Message::BarrierAck => {
            if conn.state == State::Preparing {
                env.in_setup -= 1;
                ready(conn, env);
            }
        }
        Message::HelloAck { client_ack } => {
            if conn.state == State::Helloing && env.run.client_ack.is_some() && !client_ack {
                env.local.hello_failures += 1;
                return Some(Outcome::Fail(
                    "the hello_ack did not grant client_ack (a broker without PROTOCOL.md §11?)"
                        .into(),
                ));
            }
            if conn.state == State::Helloing {
                env.local.hellos += 1;
                if env.phase == PHASE_RUN {
                    env.local.run_hellos += 1;
                }
                env.hists.hello.record_since(conn.started_ns, env.now);
                if env.run.lifecycle == Lifecycle::Churn {
                    env.in_setup -= 1;
                    conn.state = State::Closing;
                    conn.wbuf.extend_from_slice(&wire::close_frame(1000));
                    env.mark_dirty(conn);
                    return Some(Outcome::Churned);
                }
                if let Some(plan) = env.run.peers.as_ref().filter(|p| p.joins(conn.slot.member)) {
                    // Join the group, then the barrier: its ack means the
                    // broker has applied the join (a connection's messages
                    // are handled in order).
                    let mesh = conn.slot.mesh as usize;
                    let me = &env.run.pubkeys[mesh][conn.slot.member as usize];
                    conn.wbuf.extend_from_slice(&plan.join_frame);
                    conn.wbuf.extend_from_slice(&wire::barrier_frame(me));
                    conn.state = State::Preparing;
                    env.mark_dirty(conn);
                    return None;
                }
                if let (Some(plan), Some(g)) = (&env.run.gate, &conn.gate) {
                    if g.working {
                        // Set the status, then a `now` send to ourselves:
                        // the broker handles a connection's messages in
                        // order, so its ack means the status is applied.
                        let mesh = conn.slot.mesh as usize;
                        let me = &env.run.pubkeys[mesh][conn.slot.member as usize];
                        conn.wbuf.extend_from_slice(&plan.gate_frame);
                        conn.wbuf.extend_from_slice(&wire::barrier_frame(me));
                        conn.state = State::Preparing;
                        env.mark_dirty(conn);
                        return None;
                    }
                }
                env.in_setup -= 1;
                ready(conn, env);
            }
        }
        Message::Error { code, id, req_id } => {
            env.error_seen(&code);
            if conn.state == State::Helloing {
                env.local.hello_failures += 1;
                return Some(Outcome::Fail(format!("hello refused: {code}")));
            }
            if conn.state == State::Preparing {
                return Some(Outcome::Fail(format!(
                    "set_status, join_group or their barrier refused: {code}"
                )));
            }
            if let (Some(r), Some(p)) = (&req_id, conn.peers.as_mut()) {
                if p.role == Role::Lister {
                    // A list_peers refused (e.g. `unavailable`).
                    if p.ledger.answer(r.as_bytes()).is_some() {
                        env.local.list_errors += 1;
                    } else {
                        env.local.list_malformed += 1;
                        env.error_seen("loadgen: error echoing an unknown _reqId");
                    }
                    return None;
                }
            }
            if let Some(id) = id {
                env.local.send_errors += 1;
                if code == "unavailable" {
                    env.local.unavailable += 1;
                }
                conn.inflight = conn.inflight.saturating_sub(1);
                let mesh = conn.slot.mesh as usize;
                let group = env.run.peers.as_ref().and_then(|p| {
                    let roles = &p.meshes[mesh];
                    (roles.group_sender == Some(conn.slot.member)).then_some(roles.group_expected)
                });
                let (per, held) = if let Some(per) = group {
                    env.local.group_expected = env.local.group_expected.saturating_sub(per);
                    (per, 0)
                } else {
                    match (&env.run.held, wire::parse_tag(id.as_bytes())) {
                        (Some(plan), Some((_, target, _, _))) => {
                            plan.owed(mesh, env.run.pubkeys[mesh].len(), target)
                        }
                        _ => (env.run.expected_per_send[mesh], 0),
                    }
                };
                env.local.expected = env.local.expected.saturating_sub(per);
                env.local.held_expected = env.local.held_expected.saturating_sub(held);
                env.run.push_outstanding[conn.slot.global].fetch_sub((per - held) as i64, Relaxed);
                if let (Some(plan), Some((_, target, _, p))) =
                    (&env.run.gate, wire::parse_tag(id.as_bytes()))
                {
                    let mesh = conn.slot.mesh as usize;
                    if p != gate::NOW && plan.working[mesh].get(target as usize) == Some(&true) {
                        env.local.held_expected = env.local.held_expected.saturating_sub(1);
                    }
                }
                env.refill(conn);
            }
        }
        Message::PeersList => on_peers_list(conn, env, payload),
        Message::Other => {}
    }
    None
}

/// `--client-ack`: the push is acked (in this read's `client_ack`) or,
/// under `--ack-fraction`, its first copy is left unacked; a redelivery is
/// matched to its first copy. False: a redelivery of a push this session
/// had already, which is no new delivery.
fn lease(conn: &mut Conn, env: &mut Env, payload: &[u8], message: &Message) -> bool {
    let key = match *message {
        Message::Push { sender, seq, .. } => Some((sender, seq)),
        Message::ForeignPush => None,
        _ => return true,
    };
    let (Some(plan), Some(a)) = (env.run.client_ack, conn.acks.as_mut()) else {
        return true;
    };
    let Some(id) = wire::message_id(payload).filter(|id| wire::is_plain_id(id)) else {
        env.error_seen("loadgen: push without a plain messageId (not acked)");
        return true;
    };
    let redelivered = wire::is_redelivered(payload);
    let mut new = true;
    if redelivered {
        env.local.redeliveries += 1;
        new = false;
        if let Some((sender, seq)) = key {
            let seen = conn.ledger.contains(sender, seq);
            match a.redelivered(sender, seq, id, seen) {
                Redelivery::OfUnacked => env.local.redelivered_unacked += 1,
                Redelivery::AfterAck => env.local.redelivered_after_ack += 1,
                Redelivery::Unseen => env.local.redelivered_unseen += 1,
                Redelivery::IdMismatch => env.local.redelivered_mismatch += 1,
            }
            new = !seen;
        }
    }
    // Redeliveries and pushes the loadgen did not write are always acked.
    if redelivered || key.is_none() || plan.acks(id) {
        if let Some(n) = a.batch.add(id, &mut conn.wbuf) {
            env.local.client_acks += 1;
            env.local.client_acked += n as u64;
            env.mark_dirty(conn);
        }
    } else if let Some((sender, seq)) = key.filter(|&(s, q)| !conn.ledger.contains(s, q)) {
        a.leave_unacked(sender, seq, id);
        env.local.unacked += 1;
    }
    new
}

fn on_ack(conn: &mut Conn, env: &mut Env, ts_ns: Option<u64>) {
    conn.inflight = conn.inflight.saturating_sub(1);
    env.local.acked += 1;
    if let Some(ts) = ts_ns {
        env.hists.ack.record_since(ts, env.now);
    }
    env.refill(conn);
}

/// Admitted (and, for a gating session, its status confirmed).
fn ready(conn: &mut Conn, env: &mut Env) {
    conn.state = State::Ready;
    env.local.ready += 1;
    if env.phase == PHASE_RUN {
        env.refill(conn);
    }
}

/// A push in the `gated` scenario: duplicates as everywhere; then live,
/// held (after this session's idle flip) or a gating violation.
fn gated_push(conn: &mut Conn, env: &mut Env, payload: &[u8], sender: u32, seq: u32, ts_ns: u64) {
    let Some(priority) = wire::push_priority(payload) else {
        env.local.foreign += 1;
        return;
    };
    if !conn.ledger.record(sender, seq) {
        env.local.duplicates += 1;
        return;
    }
    env.local.pushes += 1;
    let g = env.run.mesh_offsets[conn.slot.mesh as usize] + sender as usize;
    if g < env.run.push_outstanding.len() {
        *env.push_seen.entry(g).or_default() += 1;
    }
    let (gating, released) = conn
        .gate
        .as_ref()
        .map_or((false, false), |c| (c.working, c.released_at.is_some()));
    match gate::judge(gating, released, priority) {
        Verdict::Live => env.hists.push.record_since(ts_ns, env.now),
        Verdict::Violation => env.local.violations += 1,
        Verdict::Held => {
            env.local.held += 1;
            let c = conn.gate.as_mut().expect("gating session");
            c.last_held_at = Some(env.now);
            c.held.push(Arrival {
                sender,
                seq,
                sent_ns: ts_ns,
            });
        }
    }
}

/// A push in the `held` scenario: its `messageId` is recorded for the
/// exactly-once check (duplicates are found there, by id). To an offline
/// recipient it is a held push; to a sender, a live copy of a `*`.
fn held_push(conn: &mut Conn, env: &mut Env, payload: &[u8], sender: u32, ts_ns: u64) {
    let Some(h) = conn.held.as_mut() else {
        return;
    };
    h.record_push(wire::message_id(payload), env.now);
    env.local.pushes += 1;
    if h.recipient {
        env.local.held += 1;
        return;
    }
    let g = env.run.mesh_offsets[conn.slot.mesh as usize] + sender as usize;
    if g < env.run.push_outstanding.len() {
        *env.push_seen.entry(g).or_default() += 1;
    }
    env.hists.push.record_since(ts_ns, env.now);
}

/// `peers`: a `peers_list` answer, matched to its request by `_reqId` and
/// checked against the mesh's session count.
fn on_peers_list(conn: &mut Conn, env: &mut Env, payload: &[u8]) {
    let run = env.run.clone();
    let (Some(plan), Some(p)) = (&run.peers, conn.peers.as_mut()) else {
        env.error_seen("loadgen: peers_list nobody asked for");
        return;
    };
    let scanned = peers::scan_peers_list(payload);
    if p.answers % peers::CROSS_CHECK_EVERY == 0 {
        let parsed = peers::parse_peers_list(payload);
        if parsed.is_none() || parsed != scanned {
            env.local.list_malformed += 1;
            env.error_seen("loadgen: peers_list scan and JSON parse disagree");
        }
    }
    p.answers += 1;
    let Some(answer) = scanned.or_else(|| peers::parse_peers_list(payload)) else {
        env.local.list_malformed += 1;
        return;
    };
    let Some(sent_ns) = answer
        .req_id
        .as_deref()
        .and_then(|r| p.ledger.answer(r.as_bytes()))
    else {
        env.local.list_malformed += 1;
        env.error_seen("loadgen: peers_list without one of our _reqIds");
        return;
    };
    env.local.lists_answered += 1;
    env.local.list_entries += answer.entries as u64;
    env.local.list_bytes += payload.len() as u64;
    env.hists.list.record_since(sent_ns, env.now);
    match peers::check_answer(&answer, plan.meshes[conn.slot.mesh as usize].size) {
        Ok(()) => {}
        Err(Fault::Count { got, want }) => {
            env.local.list_mismatches += 1;
            env.error_seen(&format!(
                "peers_list: {got} entries, the mesh has {want} sessions"
            ));
        }
        Err(Fault::SelfMarks(n)) => {
            env.local.list_malformed += 1;
            env.error_seen(&format!("peers_list: {n} entries marked self"));
        }
    }
}
