//! The bus thread: one tokio runtime of its own, one async-nats client.
//! Shards never wait on it: they hand it commands through a bounded queue
//! and hear back (confirms, routes and held envelopes from other nodes)
//! through their inboxes, like from any shard.
//!
//! - Interest: a mesh is followed (its `meshbroker.<mesh>.*` subscribed)
//!   while this node has sessions or held envelopes of it; NATS drops
//!   what no node follows.
//! - Directory: a node publishes its part of a mesh whole (every session,
//!   its member, live, open) when it changes, at most once per tick, and
//!   again every heartbeat; receivers replace that node's part.
//! - Sends: published once with the routing facts; a node named in `to`
//!   queues the same frame on its shards and confirms. The sender's ack
//!   waits for every confirm or the deadline; what was not confirmed is
//!   held on the sender's node (and its row written) before the ack.
//! - Held envelopes: the node that accepted a send holds it until its
//!   member is live somewhere; then it hands it to that node, which holds
//!   it in its own queue and drains it like its own.
//! - Sessions: a hello here takes over a session another node lists (it
//!   gives it up and answers with its state); peer events, group changes,
//!   admin kicks and bans, and send-rate spends go to the other nodes.
//! - Dead nodes (no heartbeat for `NODE_DEAD_AFTER_MS`, while this node's
//!   own bus connection is up): their held rows are claimed and loaded
//!   here; their sessions stay listed away (stranded) for the session
//!   grace, for a hello on any node to take over, and then their presence
//!   rows end.
use super::view::{MeshView, Nodes};
use super::wire::{self, Head, Kind, PartSession};
use super::{slot_bit, BusCommand, HookCandidate, LOCAL};
use crate::inbox::PendingAck;
use crate::inbox::{ShardEvent, ShardSender};
use crate::mesh::directory::{Directory, MemberEntry, MeshEntry};
use crate::mesh::held::Take;
use crate::mesh::peers::{self, Holder, MovedSession};
use crate::mesh::plan::{first_shard, key, shards_in, Route, Targets};
use crate::mesh::{Envelope, EnvelopeTarget};
use crate::protocol::Priority;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// How often the bus looks at deadlines, dirty meshes and the clock.
const TICK: Duration = Duration::from_millis(10);
/// A mesh with nothing of this node in it is unfollowed after this.
const UNFOLLOW_AFTER: Duration = Duration::from_secs(10);
/// Least time between two publications of this node's part of a mesh.
const PART_EVERY: Duration = Duration::from_millis(20);
/// Bus messages handled per wakeup before the confirms they owe go out.
const MESSAGES_PER_TURN: usize = 256;
/// Held envelopes handed over per drain.
const DRAIN_BATCH: usize = 256;
/// A part's chunks are never smaller than this (a server announcing a
/// tiny `max_payload` still gets whole session lines).
const PART_CHUNK_FLOOR: usize = 4096;
/// Least time between two reloads of a mesh's members for members other
/// nodes list and this one does not know.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// How long after it starts following a mesh a node has heard the other
/// nodes' parts of it: they answer its ask within a tick and their
/// `PART_EVERY`, plus the bus's latency.
const FIRST_PARTS_WAIT: Duration = Duration::from_millis(50);
/// A publish the client cannot queue within this is dropped (its confirm
/// times out and the send is held).
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(50);

const END_PRESENCES_SQL: &str = "\
UPDATE mesh.presence SET disconnected_at = now()::timestamp
WHERE node_id = $1 AND disconnected_at IS NULL AND connected_at <= $2";

/// Called with each mesh whose taken-over envelopes are loaded.
pub type OnRestored = Arc<dyn Fn(&Arc<MeshEntry>) + Send + Sync>;

pub struct BusSpec {
    pub url: String,
    pub node_id: Arc<str>,
    pub confirm_timeout: Duration,
    pub dead_after: Duration,
    pub directory: Arc<Directory>,
    pub shards: Vec<ShardSender>,
    /// The database, with this node's id set (ending and taking over dead
    /// nodes' rows).
    pub db: tokio_postgres::Config,
    pub held_ttl: Duration,
    pub on_restored: OnRestored,
    /// The live sessions by cwd, for other nodes' hooks.
    pub hooks: Arc<crate::status::hook_index::HookIndex>,
    /// `SESSION_GRACE_SECONDS`: how long a dead node's sessions stay
    /// listed away, for their clients to take them over elsewhere.
    pub session_grace: Duration,
    /// `SEND_RATE_PER_MIN` and `SEND_BURST`, for other nodes' spends.
    pub send_rate: crate::mesh::bucket::SendRate,
}

/// The running bus thread.
pub struct BusThread {
    join: std::thread::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
}

impl BusThread {
    /// After the shards are done: says goodbye on the bus and ends.
    pub fn stop(self) {
        self.stop.notify_one();
        let _ = self.join.join();
    }
}

pub fn spawn(spec: BusSpec, commands: mpsc::Receiver<BusCommand>) -> std::io::Result<BusThread> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let join = std::thread::Builder::new()
        .name("bus".into())
        .spawn(move || runtime.block_on(run(spec, commands, stopped)))?;
    Ok(BusThread { join, stop })
}

/// A mesh this node follows.
struct Followed {
    view: MeshView,
    subscription: tokio::task::JoinHandle<()>,
    idle_since: Option<Instant>,
    /// When this node's part of it was last published.
    published_at: Option<Instant>,
    /// When its members were last reloaded for another node's part.
    reloaded_at: Option<Instant>,
    /// Other nodes' parts still arriving in chunks, by slot.
    chunks: FxHashMap<u8, wire::PartChunks>,
}

/// What a confirm is awaited for.
enum Awaited {
    Ack {
        route: Arc<Route>,
        ack: PendingAck,
    },
    Handed {
        member: Arc<MemberEntry>,
        envelope: Arc<Envelope>,
    },
    /// A hook question: every node's best match, the best kept.
    HookAsk {
        reply: tokio::sync::oneshot::Sender<Option<HookCandidate>>,
        best: Option<HookCandidate>,
    },
    /// A hook for one node's session: its answer.
    HookApply(tokio::sync::oneshot::Sender<Option<Box<str>>>),
}

struct Pending {
    /// Nodes (remote bits) yet to confirm, and those that refused.
    waiting: u64,
    refused: u64,
    deadline: Instant,
    awaited: Awaited,
}

struct Bus {
    spec: BusSpec,
    client: async_nats::Client,
    nodes: Nodes,
    /// By subject token.
    followed: FxHashMap<String, Followed>,
    pending: FxHashMap<u64, Pending>,
    next_seq: u64,
    incoming: mpsc::UnboundedSender<async_nats::Message>,
    /// Meshes to follow found by this thread's own tasks (takeovers).
    own: mpsc::UnboundedSender<Arc<MeshEntry>>,
    dirty: Vec<Arc<MeshEntry>>,
    /// Members whose held envelopes wait for their rows before a handover.
    drain_later: Vec<(Arc<MeshEntry>, Arc<MemberEntry>)>,
    /// Confirms a full inbox did not take yet.
    unsent: Vec<(usize, ShardEvent)>,
    connected: bool,
    /// A beat is due at the next tick (a node joined).
    beat_now: bool,
    /// Confirms owed to each node, sent together after a turn's messages.
    owed: FxHashMap<String, Vec<u8>>,
    /// Routes and handovers of this turn by subject, with the confirms
    /// they wait for.
    outgoing: FxHashMap<String, (BytesMut, Vec<u64>)>,
    /// Events for the shards gathered this turn.
    to_shards: RefCell<Vec<Vec<ShardEvent>>>,
    /// The generation of this node's next part publication.
    next_part: std::cell::Cell<u64>,
}

async fn run(
    spec: BusSpec,
    mut commands: mpsc::Receiver<BusCommand>,
    stop: Arc<tokio::sync::Notify>,
) {
    let client = match async_nats::ConnectOptions::new()
        .name(&*spec.node_id)
        // What this node publishes is never for itself.
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50u64 << attempts.min(5)).min(1000))
        })
        .connect(spec.url.as_str())
        .await
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(target: "bus", error = %e, "NATS connect failed");
            return;
        }
    };
    let (incoming, mut messages) = mpsc::unbounded_channel();
    let (own, mut own_rx) = mpsc::unbounded_channel();
    let mut bus = Bus {
        client,
        nodes: Nodes::default(),
        followed: FxHashMap::default(),
        pending: FxHashMap::default(),
        next_seq: 1,
        incoming,
        own,
        dirty: Vec::new(),
        drain_later: Vec::new(),
        unsent: Vec::new(),
        connected: false,
        beat_now: false,
        owed: FxHashMap::default(),
        outgoing: FxHashMap::default(),
        to_shards: RefCell::new((0..spec.shards.len()).map(|_| Vec::new()).collect()),
        next_part: std::cell::Cell::new(1),
        spec,
    };
    bus.subscribe(wire::BEAT.to_owned()).await;
    bus.subscribe(wire::HOOKS.to_owned()).await;
    bus.subscribe(wire::confirm_subject(&bus.spec.node_id))
        .await;
    let beat_every = bus.spec.dead_after / 4;
    let mut next_beat = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => {
                    bus.command(command).await;
                    for _ in 0..MESSAGES_PER_TURN {
                        let Ok(command) = commands.try_recv() else { break };
                        bus.command(command).await;
                    }
                }
                None => break,
            },
            _ = stop.notified() => break,
            Some(message) = messages.recv() => {
                bus.message(message).await;
                // What else arrived meanwhile, then one confirm per node.
                for _ in 0..MESSAGES_PER_TURN {
                    let Ok(message) = messages.try_recv() else { break };
                    bus.message(message).await;
                }
            }
            Some(mesh) = own_rx.recv() => {
                bus.follow(&mesh).await;
                // Taken over: what is live elsewhere already goes there.
                let members: Vec<_> = mesh.view().members().to_vec();
                for member in members.iter().filter(|m| !m.held.is_empty()) {
                    bus.hand_over(&mesh, member).await;
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= next_beat || std::mem::take(&mut bus.beat_now) {
                    next_beat = now + beat_every;
                    bus.beat().await;
                }
                bus.tick(now).await;
            }
        }
        bus.end_turn().await;
    }
    bus.end_turn().await;
    bus.leave().await;
}

impl Bus {
    fn me(&self) -> &str {
        &self.spec.node_id
    }

    async fn subscribe(&self, subject: String) -> Option<tokio::task::JoinHandle<()>> {
        let mut subscriber = match self.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "bus", subject = %subject, error = %e, "subscribe failed");
                return None;
            }
        };
        let incoming = self.incoming.clone();
        Some(tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                if incoming.send(message).is_err() {
                    break;
                }
            }
        }))
    }

    /// Publishes unless the connection is down (then what needed a confirm
    /// times out into a hold, and parts are republished on reconnect).
    async fn publish(&self, subject: String, payload: Bytes) -> bool {
        if !self.connected {
            return false;
        }
        let publish = self.client.publish(subject, payload);
        matches!(
            tokio::time::timeout(PUBLISH_TIMEOUT, publish).await,
            Ok(Ok(()))
        )
    }

    async fn command(&mut self, command: BusCommand) {
        match command {
            BusCommand::Route { route, nodes, ack } => self.route(route, nodes, ack),
            BusCommand::MeshChanged(mesh) => self.follow(&mesh).await,
            BusCommand::Follow { mesh, reply } => {
                self.follow(&mesh).await;
                tokio::spawn(async move {
                    tokio::time::sleep(FIRST_PARTS_WAIT).await;
                    mesh.synced.store(true, Ordering::Release);
                    let _ = reply.send(());
                });
            }
            BusCommand::Drain { mesh, member } => self.hand_over(&mesh, &member).await,
            BusCommand::Hook { signal, reply } => {
                let nodes = self.nodes.all();
                let awaited = Awaited::HookAsk { reply, best: None };
                self.forward_hook(signal, None, nodes, awaited).await;
            }
            BusCommand::HookApply {
                signal,
                candidate,
                reply,
            } => {
                let nodes = self.nodes.slot_of(&candidate.node).map_or(0, slot_bit);
                let awaited = Awaited::HookApply(reply);
                let presence = Some(candidate.presence_id.into());
                self.forward_hook(signal, presence, nodes, awaited).await;
            }
            BusCommand::Stash(signal) => self.forward_stash(signal).await,
            BusCommand::Take {
                mesh,
                member,
                slot,
                presence,
                session_id,
                session_key,
                reply,
            } => {
                let ask = wire::Take {
                    from: self.me().to_owned(),
                    to: String::new(),
                    member: member.pubkey.to_string(),
                    presence: presence.into(),
                    session_id,
                    session_key,
                };
                self.take(&mesh, slot, ask, reply)
            }
            BusCommand::Group {
                mesh,
                member,
                mut change,
            } => {
                change.member = member.pubkey.to_string();
                let line = serde_json::to_vec(&change).expect("a group change serializes");
                self.queue_record(&mesh, "groups", &line, b"");
            }
            BusCommand::Admin { mesh, change } => {
                let line = serde_json::to_vec(&change).expect("an admin change serializes");
                self.queue_record(&mesh, "admin", &line, b"");
            }
            BusCommand::Spent { mesh, member } => {
                self.queue_record(&mesh, "rate", member.pubkey.as_bytes(), b"");
            }
            BusCommand::PeerEvent { mesh, about, frame } => {
                self.queue_record(&mesh, "event", about.pubkey.as_bytes(), &frame);
            }
        }
    }

    /// A record for the mesh's `kind` subject, published with the turn's
    /// batch (no confirm awaited).
    fn queue_record(&mut self, mesh: &MeshEntry, kind: &str, line: &[u8], frame: &[u8]) {
        let subject = wire::mesh_subject(&mesh.id, kind);
        let batch = self.outgoing.entry(subject).or_default();
        wire::append_record(&mut batch.0, line, frame);
    }

    /// A stashed hook signal for every other node (seq 0: no answer).
    async fn forward_stash(&mut self, signal: crate::hook::HookSignal) {
        let head = wire::HookHead {
            from: self.me().to_owned(),
            seq: 0,
            pid: signal.pid,
            cwd: signal.cwd,
            status: signal.status.as_str().to_owned(),
            apply: None,
        };
        let payload = Bytes::from(serde_json::to_vec(&head).expect("a hook head serializes"));
        self.publish(wire::HOOKS.to_owned(), payload).await;
    }

    /// A hook signal for the nodes in `nodes`: a question, or (`apply`)
    /// the signal for that presence; their confirms settle `awaited`.
    async fn forward_hook(
        &mut self,
        signal: crate::hook::HookSignal,
        apply: Option<String>,
        nodes: u64,
        awaited: Awaited,
    ) {
        let seq = self.seq();
        let head = wire::HookHead {
            from: self.me().to_owned(),
            seq,
            pid: signal.pid,
            cwd: signal.cwd,
            status: signal.status.as_str().to_owned(),
            apply,
        };
        let payload = Bytes::from(serde_json::to_vec(&head).expect("a hook head serializes"));
        let pending = Pending {
            waiting: nodes,
            refused: 0,
            deadline: Instant::now() + self.spec.confirm_timeout,
            awaited,
        };
        if nodes == 0 || !self.publish(wire::HOOKS.to_owned(), payload).await {
            return self.settle(pending);
        }
        self.pending.insert(seq, pending);
    }

    /// A hook signal from another node: a stash kept here too, a question
    /// answered with this node's best match, or the signal applied by the
    /// shard of the session it names (the answer goes back as a confirm).
    fn hook_here(&mut self, payload: &[u8]) {
        let Ok(head) = serde_json::from_slice::<wire::HookHead>(payload) else {
            return;
        };
        let Some(status) = crate::hook::Status::parse(&head.status) else {
            return;
        };
        if head.from == self.me() {
            return;
        }
        let hooks = &self.spec.hooks;
        let Some(presence) = head.apply.as_deref() else {
            if head.seq == 0 {
                hooks.stash(head.pid, &head.cwd, status, Instant::now());
                return;
            }
            let found = hooks.find(head.pid, &head.cwd);
            let confirm = match &found {
                Some((target, rank)) => wire::Confirm {
                    presence: Some(&target.presence_id),
                    rank: Some(*rank),
                    ..wire::Confirm::plain(head.seq, &self.spec.node_id, true)
                },
                None => wire::Confirm::plain(head.seq, &self.spec.node_id, false),
            };
            let owed = self.owed.entry(head.from.clone()).or_default();
            wire::confirm(owed, &confirm);
            return;
        };
        let Some(target) = hooks.by_presence(&head.cwd, presence) else {
            let owed = self.owed.entry(head.from.clone()).or_default();
            wire::confirm(
                owed,
                &wire::Confirm::plain(head.seq, &self.spec.node_id, false),
            );
            return;
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let asked = self.to_shard(
            target.shard,
            ShardEvent::HookStatus {
                conn: target.conn,
                status,
                reply,
            },
        );
        let client = self.client.clone();
        let me = self.spec.node_id.clone();
        let timeout = self.spec.confirm_timeout;
        tokio::spawn(async move {
            let presence = shard_answer(asked, answer, timeout).await;
            let mut confirm = Vec::with_capacity(64);
            let line = wire::Confirm {
                presence: presence.as_deref(),
                ..wire::Confirm::plain(head.seq, &me, presence.is_some())
            };
            wire::confirm(&mut confirm, &line);
            let publish = client.publish(wire::confirm_subject(&head.from), confirm.into());
            let _ = tokio::time::timeout(PUBLISH_TIMEOUT, publish).await;
        });
    }

    /// Asks the node in `slot` for a session a hello here takes over
    /// (request and reply: the one node named answers, or nobody in time).
    fn take(
        &self,
        mesh: &MeshEntry,
        slot: u8,
        mut ask: wire::Take,
        reply: tokio::sync::oneshot::Sender<Option<MovedSession>>,
    ) {
        let Some(node) = self.nodes.id(slot).filter(|_| self.connected) else {
            let _ = reply.send(None);
            return;
        };
        ask.to = node.to_owned();
        let payload = Bytes::from(serde_json::to_vec(&ask).expect("a take serializes"));
        let subject = wire::mesh_subject(&mesh.id, "take");
        let client = self.client.clone();
        let timeout = self.spec.confirm_timeout;
        tokio::spawn(async move {
            let answer = tokio::time::timeout(timeout, client.request(subject, payload)).await;
            let moved = match answer {
                Ok(Ok(message)) => serde_json::from_slice(&message.payload).ok().flatten(),
                _ => None,
            };
            let _ = reply.send(moved);
        });
    }

    /// Another node's hello takes over a session of this node: its shard
    /// gives it up, and what it brings goes back as the answer (`null`:
    /// not here, or ended meanwhile).
    fn give_up(&self, token: &str, message: &async_nats::Message) {
        let (Ok(take), Some(respond)) = (
            serde_json::from_slice::<wire::Take>(&message.payload),
            message.reply.clone(),
        ) else {
            return;
        };
        if take.to != self.me() {
            return;
        }
        let found = self.followed.get(token).and_then(|followed| {
            let mesh = followed.view.mesh.clone();
            let member = mesh.view().member_by_pubkey(&take.member).cloned()?;
            let entry = member.sessions.by_presence(&take.presence)?;
            let key = take.session_key.as_deref();
            entry.is(&take.session_id, key).then_some((mesh, entry))
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        let asked = found.is_some_and(|(mesh, entry)| {
            let shard = entry.holder().shard();
            self.to_shard(shard, ShardEvent::GiveUp { mesh, entry, reply })
        });
        let client = self.client.clone();
        let timeout = self.spec.confirm_timeout;
        tokio::spawn(async move {
            let moved: Option<MovedSession> = shard_answer(asked, answer, timeout).await;
            let payload = serde_json::to_vec(&moved).expect("a moved session serializes");
            let publish = client.publish(respond, payload.into());
            let _ = tokio::time::timeout(PUBLISH_TIMEOUT, publish).await;
        });
    }

    fn route(&mut self, route: Arc<Route>, nodes: u64, ack: Option<PendingAck>) {
        let seq = if ack.is_some() { self.seq() } else { 0 };
        let to: Vec<Cow<'_, str>> = self
            .nodes
            .ids_in(nodes)
            .into_iter()
            .map(Cow::Owned)
            .collect();
        let head = Head::new(&route.envelope, &route.targets, &self.spec.node_id, seq, to);
        let named = !head.to.is_empty();
        let subject = wire::mesh_subject(&route.envelope.mesh.id, "route");
        let batch = self.outgoing.entry(subject).or_default();
        wire::append(&mut batch.0, &head, &route.envelope.frame);
        drop(head);
        if seq != 0 {
            batch.1.push(seq);
        }
        let published = self.connected;
        if let Some(ack) = ack {
            let pending = Pending {
                waiting: nodes,
                refused: 0,
                deadline: Instant::now() + self.spec.confirm_timeout,
                awaited: Awaited::Ack { route, ack },
            };
            if published && named {
                self.pending.insert(seq, pending);
            } else {
                self.settle(Pending {
                    refused: nodes,
                    ..pending
                });
            }
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Starts following a mesh (subscribes, asks the others for their
    /// parts) and marks this node's part for publishing.
    async fn follow(&mut self, mesh: &Arc<MeshEntry>) {
        let token = wire::mesh_token(&mesh.id);
        // The directory evicted and reloaded the mesh since: the view of the
        // entry it dropped routes nothing any more.
        if let Some(followed) = self.followed.get_mut(&token) {
            if !Arc::ptr_eq(&followed.view.mesh, mesh) {
                followed.view.clear();
                followed.view = MeshView::new(mesh.clone());
                followed.chunks.clear();
                self.ask_parts(mesh).await;
            }
        }
        if !self.followed.contains_key(&token) {
            let Some(subscription) = self.subscribe(wire::mesh_wildcard(&mesh.id)).await else {
                mesh.changed.store(false, Ordering::Release);
                return;
            };
            self.followed.insert(
                token,
                Followed {
                    view: MeshView::new(mesh.clone()),
                    subscription,
                    idle_since: None,
                    published_at: None,
                    reloaded_at: None,
                    chunks: FxHashMap::default(),
                },
            );
            self.ask_parts(mesh).await;
        }
        self.dirty.push(mesh.clone());
    }

    /// The meshes this node follows.
    fn followed_meshes(&self) -> Vec<Arc<MeshEntry>> {
        self.followed
            .values()
            .map(|f| f.view.mesh.clone())
            .collect()
    }

    /// Asks the other nodes following `mesh` to publish their parts again.
    async fn ask_parts(&self, mesh: &MeshEntry) {
        let me = Bytes::copy_from_slice(self.me().as_bytes());
        self.publish(wire::mesh_subject(&mesh.id, "sync"), me).await;
    }

    async fn message(&mut self, message: async_nats::Message) {
        let subject = message.subject.as_str();
        if subject == wire::BEAT {
            if let Ok(node) = std::str::from_utf8(&message.payload) {
                if node != self.me() {
                    self.heard(node);
                }
            }
            return;
        }
        if subject == wire::HOOKS {
            self.hook_here(&message.payload);
            return;
        }
        if subject.starts_with("meshbroker.node.") {
            for confirm in wire::parse_confirms(&message.payload) {
                self.confirmed(&confirm);
            }
            return;
        }
        let mut parts = subject.split('.').skip(1);
        let (Some(token), Some(kind)) = (parts.next(), parts.next()) else {
            return;
        };
        let token = token.to_owned();
        match kind {
            "dir" => self.part(&token, message.payload.clone()).await,
            "sync" if message.payload != self.me().as_bytes() => {
                if let Some(followed) = self.followed.get(&token) {
                    let mesh = followed.view.mesh.clone();
                    self.dirty.push(mesh);
                }
            }
            "event" => {
                for (about, frame) in wire::lines(&message.payload) {
                    self.peer_event(&token, &about, frame);
                }
            }
            "admin" => {
                for (line, _) in wire::lines(&message.payload) {
                    if let Ok(change) = serde_json::from_slice(&line) {
                        self.admin_changed(&token, change);
                    }
                }
            }
            "rate" => {
                let Some(followed) = self.followed.get(&token) else {
                    return;
                };
                let view = followed.view.mesh.view();
                let now = Instant::now();
                for (member, _) in wire::lines(&message.payload) {
                    let member = std::str::from_utf8(&member).ok();
                    if let Some(member) = member.and_then(|k| view.member_by_pubkey(k)) {
                        member
                            .send_bucket
                            .spent_elsewhere(self.spec.send_rate, 1, now);
                    }
                }
            }
            "groups" => {
                for (line, _) in wire::lines(&message.payload) {
                    if let Ok(change) = serde_json::from_slice(&line) {
                        self.group_changed(&token, &change);
                    }
                }
            }
            "take" => self.give_up(&token, &message),
            "route" | "held" => {
                for record in wire::records(&message.payload) {
                    let Some((head, frame)) = record.as_ref().and_then(wire::decode) else {
                        tracing::warn!(target: "bus", subject = %subject, "undecodable bus record");
                        break;
                    };
                    if head.from == self.me() || !head.to.iter().any(|n| n.as_ref() == self.me()) {
                        continue;
                    }
                    let taken = self.place(&head, frame, kind == "held");
                    if head.seq != 0 {
                        let owed = self.owed.entry(head.from.to_string()).or_default();
                        let line = wire::Confirm::plain(head.seq, &self.spec.node_id, taken);
                        wire::confirm(owed, &line);
                    }
                }
            }
            _ => {}
        }
    }

    /// A node was heard; a new one gets this node's parts again.
    fn heard(&mut self, node: &str) -> Option<u8> {
        let (slot, new) = self.nodes.heard(node, Instant::now())?;
        if new {
            tracing::info!(target: "bus", node = %node, slot, "node joined");
            // So the newcomer hears of this node at once too.
            self.beat_now = true;
            let meshes = self.followed_meshes();
            self.dirty.extend(meshes);
        }
        Some(slot)
    }

    /// A chunk of another node's part of a mesh: applied once its
    /// publication's chunks are all here.
    async fn part(&mut self, token: &str, payload: Bytes) {
        let Some((head, _)) = wire::decode_part(&payload) else {
            tracing::warn!(target: "bus", "undecodable directory part");
            return;
        };
        if head.node == self.me() {
            return;
        }
        let Some(slot) = self.heard(head.node) else {
            return;
        };
        let Some(followed) = self.followed.get_mut(token) else {
            return;
        };
        let chunks = match head.chunks {
            1 => vec![payload.clone()],
            _ => match followed
                .chunks
                .entry(slot)
                .or_default()
                .add(head, payload.clone())
            {
                Some(chunks) => chunks,
                None => return,
            },
        };
        let mut sessions = Vec::new();
        for chunk in &chunks {
            match wire::decode_part(chunk) {
                Some((_, part)) => sessions.extend(part),
                None => return,
            }
        }
        let (gained, unknown) = followed.view.apply(slot, &sessions);
        let mesh = followed.view.mesh.clone();
        // A member added since this node loaded the mesh: reloaded (at most
        // once per RELOAD_EVERY, in case that node lists one just removed).
        let now = Instant::now();
        if unknown
            && followed
                .reloaded_at
                .is_none_or(|at| now >= at + RELOAD_EVERY)
        {
            followed.reloaded_at = Some(now);
            self.reload_members(mesh.clone(), None);
        }
        for member in gained {
            if !member.held.is_empty() {
                self.hand_over(&mesh, &member).await;
            }
        }
    }

    /// A peer event from another node, for this node's shards that have
    /// sessions of the mesh (each picks those that asked).
    fn peer_event(&self, token: &str, about: &[u8], frame: Bytes) {
        let Some(followed) = self.followed.get(token) else {
            return;
        };
        let mesh = &followed.view.mesh;
        let view = mesh.view();
        let Some(about) = std::str::from_utf8(about)
            .ok()
            .and_then(|k| view.member_by_pubkey(k))
        else {
            return;
        };
        for shard in shards_in(mesh.live_shards.get() & LOCAL) {
            self.to_shard(
                shard,
                ShardEvent::PeerEvent {
                    mesh: mesh.clone(),
                    about: about.clone(),
                    frame: frame.clone(),
                },
            );
        }
    }

    /// A member's group change on another node (which wrote it through):
    /// this node's copy of the member changes too, and so does this node's
    /// part (its sessions' entries list the groups).
    fn group_changed(&mut self, token: &str, change: &wire::GroupChange) {
        let Some(followed) = self.followed.get(token) else {
            return;
        };
        let mesh = followed.view.mesh.clone();
        let view = mesh.view();
        let (Some(member), Some(name)) = (
            view.member_by_pubkey(&change.member),
            crate::protocol::GroupName::parse(&change.name),
        ) else {
            return;
        };
        let changed = match change.joined {
            // Past the bound here only when the nodes raced: the node that
            // accepted it holds it, and so does Postgres.
            true => member
                .join_group(name, change.role.as_deref())
                .unwrap_or(false),
            false => member.leave_group(&name),
        };
        if changed {
            self.dirty.push(mesh.clone());
        }
    }

    /// An admin's kick or ban on another node closes the member's sessions
    /// here too (a ban revokes this node's entry first, so no hello gets
    /// in meanwhile); an unban reinstates it from Postgres.
    fn admin_changed(&self, token: &str, change: wire::AdminChange) {
        let Some(followed) = self.followed.get(token) else {
            return;
        };
        let mesh = followed.view.mesh.clone();
        if change.action == wire::AdminAction::Unban {
            return self.reload_members(mesh, Some(change.member));
        }
        let Some(member) = mesh.view().member(&change.member).cloned() else {
            return;
        };
        let banned = change.action == wire::AdminAction::Ban;
        if banned {
            member.ban();
        }
        for shard in 0..self.spec.shards.len() {
            let (mesh, member) = (mesh.clone(), member.clone());
            self.to_shard(
                shard,
                ShardEvent::Kick {
                    mesh,
                    member,
                    banned,
                },
            );
        }
    }

    /// Reloads a mesh's members from Postgres in the background (another
    /// node unbanned `reinstated`, or listed a member unknown here), then
    /// asks the other nodes for their parts again, so the members it lists
    /// are routed to.
    fn reload_members(&self, mesh: Arc<MeshEntry>, reinstated: Option<String>) {
        let db = self.spec.db.clone();
        let directory = self.spec.directory.clone();
        let client = self.client.clone();
        let me = Bytes::copy_from_slice(self.me().as_bytes());
        tokio::spawn(async move {
            let reloaded =
                crate::db::reload_members(&db, &directory, &mesh.id, reinstated.as_deref());
            if let Err(e) = reloaded.await {
                tracing::warn!(target: "bus", mesh = %mesh.id, error = %e,
                    "reloading members another node knows of failed");
                return;
            }
            let ask = client.publish(wire::mesh_subject(&mesh.id, "sync"), me);
            let _ = tokio::time::timeout(PUBLISH_TIMEOUT, ask).await;
        });
    }

    /// A route or held envelope from another node onto this node's shards.
    /// False when this node cannot place it (the sender holds it instead).
    fn place(&self, head: &Head, frame: Bytes, held: bool) -> bool {
        let Some(mesh) = self.spec.directory.get(&head.mesh) else {
            return false;
        };
        let view = mesh.view();
        let (Some(sender), Some(priority)) = (
            view.member_by_pubkey(&head.sender),
            Priority::parse(&head.priority),
        ) else {
            return false;
        };
        // A session's key names a session of this node, or nothing here
        // (ended or moved: the sender holds it for the member).
        let session = match head.kind {
            Kind::Session => match head
                .target
                .as_deref()
                .and_then(|k| mesh.session_keys.current(k))
            {
                Some(entry) => Some(entry),
                None => return false,
            },
            _ => None,
        };
        let target_member = match &session {
            Some(entry) => Some(entry.member.clone()),
            None => head
                .target
                .as_deref()
                .and_then(|k| view.member_by_pubkey(k))
                .cloned(),
        };
        let envelope = Arc::new(Envelope {
            message_id: (*head.id).into(),
            mesh: mesh.clone(),
            sender: sender.clone(),
            target: match &target_member {
                Some(member) if *member.pubkey == *head.spec => {
                    EnvelopeTarget::Member(member.clone())
                }
                _ => EnvelopeTarget::Many((*head.spec).into()),
            },
            priority,
            created_at: wire::from_millis(head.created_ms),
            expires_at: wire::from_millis(head.expires_ms),
            frame,
            nonce: head.nonce[0]..head.nonce[1],
            ciphertext: head.ciphertext[0]..head.ciphertext[1],
            sent_at: Instant::now(),
            // A handed-over envelope keeps its place before this run's.
            restored: held,
            holds_in_flight: Default::default(),
            redelivered_frame: Default::default(),
            client_message_id: head.client_message_id.as_deref().map(Into::into),
            session: session.clone(),
        });
        if envelope.is_expired(SystemTime::now()) {
            // Nobody may have it any more: taken, so nobody holds it.
            return true;
        }
        let keys = |pubkeys: &[Cow<'_, str>]| -> Vec<usize> {
            let mut keys: Vec<usize> = pubkeys
                .iter()
                .filter_map(|k| view.member_by_pubkey(k).map(key))
                .collect();
            keys.sort_unstable();
            keys
        };
        let (targets, shards) = match head.kind {
            Kind::Member => {
                let Some(member) = target_member else {
                    return false;
                };
                let local = member.shards_for(priority) & LOCAL;
                if local == 0 {
                    return false;
                }
                if held {
                    if head.redelivered {
                        member.redeliveries.add(&envelope.message_id);
                    }
                    let shard = first_shard(local).expect("non-zero");
                    member.hold(envelope.clone());
                    return self.to_shard(shard, ShardEvent::Adopted(envelope))
                        && self.to_shard(shard, ShardEvent::DrainHeld(mesh.clone(), member));
                }
                (Targets::Member(member), local)
            }
            // Its shard delivers it, or holds it for that session alone.
            Kind::Session => {
                let entry = session.expect("resolved above");
                let shard = 1 << entry.holder().shard();
                (Targets::Session(entry), shard)
            }
            Kind::AllBut => (
                Targets::AllBut {
                    held_for: keys(&head.keys),
                },
                mesh.live_shards.get() & LOCAL,
            ),
            Kind::Listed => (
                Targets::Listed {
                    members: keys(&head.keys),
                },
                mesh.live_shards.get() & LOCAL,
            ),
        };
        if shards == 0 {
            return false;
        }
        let route = Arc::new(Route {
            envelope,
            targets,
            shards,
        });
        let mut placed = true;
        for shard in shards_in(shards) {
            placed &= self.to_shard(shard, ShardEvent::Route(route.clone()));
        }
        placed
    }

    /// Queues an event for a shard; the turn's events go as one batch per
    /// shard (`end_turn`).
    fn to_shard(&self, shard: usize, event: ShardEvent) -> bool {
        let mut out = self.to_shards.borrow_mut();
        match out.get_mut(shard) {
            Some(batch) => {
                batch.push(event);
                true
            }
            None => false,
        }
    }

    /// What a turn of the loop gathered goes out: routes and handovers one
    /// message per subject, confirms one per node, events one batch per
    /// shard (a full inbox keeps its batch for the next tick).
    async fn end_turn(&mut self) {
        for (subject, (batch, seqs)) in std::mem::take(&mut self.outgoing) {
            if !self.publish(subject, batch.freeze()).await {
                for seq in seqs {
                    if let Some(pending) = self.pending.remove(&seq) {
                        self.settle(pending);
                    }
                }
            }
        }
        self.send_confirms().await;
        let batches: Vec<Vec<ShardEvent>> = self
            .to_shards
            .borrow_mut()
            .iter_mut()
            .map(std::mem::take)
            .collect();
        for (shard, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            if let Err(events) = self.spec.shards[shard].try_send(batch) {
                self.unsent.extend(events.into_iter().map(|e| (shard, e)));
            }
        }
    }

    fn confirmed(&mut self, confirm: &wire::Confirm<'_>) {
        let Some(slot) = self.nodes.slot_of(confirm.node) else {
            return;
        };
        let bit = slot_bit(slot);
        let seq = confirm.seq;
        let taken = confirm.taken;
        let Some(pending) = self.pending.get_mut(&seq) else {
            return;
        };
        match (&mut pending.awaited, taken, confirm.presence) {
            (Awaited::HookAsk { best, .. }, true, Some(presence)) => {
                let rank = confirm.rank.unwrap_or(crate::status::hook_index::HookRank {
                    pid_match: false,
                    since_ms: 0,
                });
                if best.as_ref().is_none_or(|b| rank > b.rank) {
                    *best = Some(HookCandidate {
                        node: confirm.node.into(),
                        presence_id: presence.into(),
                        rank,
                    });
                }
            }
            (Awaited::HookApply(_), true, Some(presence)) => {
                if let Some(Pending {
                    awaited: Awaited::HookApply(reply),
                    ..
                }) = self.pending.remove(&seq)
                {
                    let _ = reply.send(Some(presence.into()));
                }
                return;
            }
            _ => {}
        }
        pending.waiting &= !bit;
        if !taken {
            pending.refused |= bit;
        }
        if pending.waiting == 0 {
            let pending = self.pending.remove(&seq).expect("present");
            self.settle(pending);
        }
    }

    /// Every node named answered, or the deadline passed: those that did
    /// not take it (`refused`, and `waiting` at the deadline) are missing.
    fn settle(&mut self, pending: Pending) {
        let missing = pending.refused | pending.waiting;
        match pending.awaited {
            Awaited::Ack { route, ack } => {
                let shard = ack.shard;
                let event = ShardEvent::Confirmed {
                    route,
                    ack,
                    missing,
                };
                if let Err(events) = self.spec.shards[shard].try_send(vec![event]) {
                    self.unsent.extend(events.into_iter().map(|e| (shard, e)));
                }
            }
            Awaited::Handed { member, envelope } => {
                if missing != 0 {
                    member.held.hand_back(vec![envelope]);
                } else {
                    // The other node pushes it again, marked.
                    member.redeliveries.remove(&envelope.message_id);
                }
            }
            Awaited::HookAsk { reply, best } => {
                let _ = reply.send(best);
            }
            // Refused, or no answer by the deadline.
            Awaited::HookApply(reply) => {
                let _ = reply.send(None);
            }
        }
    }

    /// Hands what `member` holds here to a node where it is live, for the
    /// priorities no local session takes now: each envelope once, to one
    /// node, in order. Envelopes whose row is not committed yet wait (a
    /// mark on the other node must not reach Postgres before the row).
    async fn hand_over(&mut self, mesh: &Arc<MeshEntry>, member: &Arc<MemberEntry>) {
        let remote = member.live_shards.get() & !LOCAL;
        let Some(slot) = first_shard(remote).map(|b| (b - super::REMOTE_BASE) as u8) else {
            return;
        };
        let Some(node) = self.nodes.id(slot).map(str::to_owned) else {
            return;
        };
        let bit = slot_bit(slot);
        let takes = |p: Priority| {
            let mask = member.shards_for(p);
            mask & bit != 0 && mask & LOCAL == 0
        };
        let now = SystemTime::now();
        let mut expired = Vec::new();
        let mut uncommitted = false;
        let mut handed = Vec::new();
        while handed.len() < DRAIN_BATCH {
            let taken = member.held.take_next(now, &mut expired, |envelope| {
                if !takes(envelope.priority) {
                    Take::SkipPriority
                } else if envelope.has_holds_in_flight() {
                    uncommitted = true;
                    Take::Stop
                } else {
                    Take::Yes
                }
            });
            match taken {
                Some(envelope) => handed.push(envelope),
                None => break,
            }
        }
        // The shards' sweep drops and marks them.
        member.held.hand_back(expired);
        if uncommitted || handed.len() == DRAIN_BATCH {
            self.drain_later.push((mesh.clone(), member.clone()));
        }
        let subject = wire::mesh_subject(&mesh.id, "held");
        for envelope in handed {
            let seq = self.seq();
            let mut head = Head::new(
                &envelope,
                &Targets::Member(member.clone()),
                &self.spec.node_id,
                seq,
                vec![Cow::Borrowed(node.as_str())],
            );
            head.redelivered = member.redeliveries.contains(&envelope.message_id);
            let batch = self.outgoing.entry(subject.clone()).or_default();
            wire::append(&mut batch.0, &head, &envelope.frame);
            batch.1.push(seq);
            drop(head);
            let published = self.connected;
            let pending = Pending {
                waiting: bit,
                refused: 0,
                deadline: Instant::now() + self.spec.confirm_timeout,
                awaited: Awaited::Handed {
                    member: member.clone(),
                    envelope,
                },
            };
            if published {
                self.pending.insert(seq, pending);
            } else {
                self.settle(pending);
            }
        }
    }

    async fn send_confirms(&mut self) {
        for (node, lines) in std::mem::take(&mut self.owed) {
            self.publish(wire::confirm_subject(&node), lines.into())
                .await;
        }
    }

    async fn beat(&mut self) {
        self.unfollow_idle(Instant::now());
        let me = Bytes::copy_from_slice(self.me().as_bytes());
        self.publish(wire::BEAT.to_owned(), me).await;
        // Parts again: a lost publish is repaired within a beat.
        let meshes = self.followed_meshes();
        self.dirty.extend(meshes.iter().cloned());
        let now = Instant::now();
        for mesh in &meshes {
            let gone = mesh.remote.stranded.expire(now);
            if !gone.is_empty() {
                let mesh = mesh.clone();
                self.to_shard(0, ShardEvent::StrandedLeft { mesh, gone });
            }
        }
        // Held here for a member live only elsewhere (a handover refused or
        // lost, a send held while the bus was away): handed over again.
        for mesh in &meshes {
            let members: Vec<_> = mesh
                .view()
                .members()
                .iter()
                .filter(|m| !m.held.is_empty() && m.live_shards.get() & !LOCAL != 0)
                .cloned()
                .collect();
            for member in &members {
                self.hand_over(mesh, member).await;
            }
        }
    }

    async fn tick(&mut self, now: Instant) {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        if connected && !self.connected {
            // Back on the bus: nobody could be heard meanwhile.
            self.nodes.forgive(now);
            tracing::info!(target: "bus", "bus connected");
            self.connected = true;
            // Heard at once, not a beat later.
            self.beat().await;
            let meshes = self.followed_meshes();
            for mesh in &meshes {
                self.ask_parts(mesh).await;
            }
            self.dirty.extend(meshes);
        } else if !connected && self.connected {
            tracing::warn!(target: "bus", "bus disconnected");
            self.connected = false;
        }
        if self.connected {
            for (slot, node) in self.nodes.take_dead(now, self.spec.dead_after) {
                self.dead(slot, node);
            }
        }
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in late {
            let pending = self.pending.remove(&seq).expect("present");
            self.settle(pending);
        }
        for (shard, event) in std::mem::take(&mut self.unsent) {
            if let Err(events) = self.spec.shards[shard].try_send(vec![event]) {
                self.unsent.extend(events.into_iter().map(|e| (shard, e)));
            }
        }
        for (mesh, member) in std::mem::take(&mut self.drain_later) {
            self.hand_over(&mesh, &member).await;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_by_key(key);
        dirty.dedup_by_key(|m| key(m));
        for mesh in dirty {
            // A part is the whole of this node's sessions of the mesh: under
            // churn it goes at most once per PART_EVERY, the rest waits.
            let token = wire::mesh_token(&mesh.id);
            let due = self
                .followed
                .get(&token)
                .is_none_or(|f| f.published_at.is_none_or(|at| now >= at + PART_EVERY));
            if !due {
                self.dirty.push(mesh);
                continue;
            }
            if let Some(followed) = self.followed.get_mut(&token) {
                followed.published_at = Some(now);
            }
            self.publish_part(&mesh).await;
        }
    }

    /// This node's sessions of `mesh`, whole.
    async fn publish_part(&self, mesh: &Arc<MeshEntry>) {
        mesh.changed.store(false, Ordering::Release);
        let mut listed = Vec::new();
        mesh.board.for_each(|entry, state| {
            let live = matches!(state.holder, Holder::Live { .. });
            let open = live && state.status.accepts(Priority::Next);
            let mut json = Vec::with_capacity(256);
            peers::write_remote_entry(&mut json, entry, state);
            listed.push((entry.clone(), live, open, json));
        });
        let mut sessions: Vec<PartSession<'_>> = listed
            .iter()
            .map(|(entry, live, open, json)| PartSession {
                member: &entry.member.pubkey,
                live: *live,
                open: *open,
                session_key: entry.session_pubkey.as_deref(),
                presence: &entry.presence_id,
                session_hash: wire::session_hash(&entry.session_id),
                entry: json,
                stranded_ms: 0,
            })
            .collect();
        let stranded = mesh.remote.stranded.listed(Instant::now());
        sessions.extend(stranded.iter().map(|(session, left)| PartSession {
            member: &session.member.pubkey,
            live: false,
            open: false,
            session_key: session.session_key.as_deref(),
            presence: &session.presence,
            session_hash: session.session_hash,
            entry: &session.entry,
            stranded_ms: *left,
        }));
        let generation = self.part_generation();
        let chunks = wire::encode_part(self.me(), generation, &sessions, self.part_bytes());
        let subject = wire::mesh_subject(&mesh.id, "dir");
        for chunk in chunks {
            if !self.publish(subject.clone(), chunk).await {
                tracing::warn!(target: "bus", mesh = %mesh.id, "publishing this node's part failed");
                break;
            }
        }
    }

    /// A new generation for this node's next part publication.
    fn part_generation(&self) -> u64 {
        let generation = self.next_part.get();
        self.next_part.set(generation + 1);
        generation
    }

    /// Largest chunk of a part: what the server takes in one message, with
    /// room for NATS's own header.
    fn part_bytes(&self) -> usize {
        let max = self.client.server_info().max_payload;
        max.saturating_sub(1024).max(PART_CHUNK_FLOOR)
    }

    /// Meshes with no session and nothing held here for a while.
    fn unfollow_idle(&mut self, now: Instant) {
        self.followed.retain(|_, followed| {
            let mesh = &followed.view.mesh;
            let busy = mesh.local_sessions() > 0 || {
                // Away sessions are listed too; held envelopes wait here.
                let mut listed = false;
                mesh.board.for_each(|_, _| listed = true);
                listed || mesh.view().members().iter().any(|m| !m.held.is_empty())
            };
            if busy {
                followed.idle_since = None;
                return true;
            }
            let since = *followed.idle_since.get_or_insert(now);
            if now.duration_since(since) < UNFOLLOW_AFTER {
                return true;
            }
            mesh.synced.store(false, Ordering::Release);
            followed.subscription.abort();
            followed.view.clear();
            false
        });
    }

    /// A node fell silent: its sessions leave, and (in the background) its
    /// presence rows end and its held rows are claimed and loaded here.
    fn dead(&mut self, slot: u8, node: String) {
        tracing::warn!(target: "bus", node = %node, "node dead: taking over");
        let grace = self.spec.session_grace;
        let until = Instant::now() + grace;
        for followed in self.followed.values_mut() {
            followed.view.strand_node(slot, until);
            followed.chunks.remove(&slot);
        }
        let bit = slot_bit(slot);
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.waiting & bit != 0)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in gone {
            let mut pending = self.pending.remove(&seq).expect("present");
            pending.waiting &= !bit;
            pending.refused |= bit;
            if pending.waiting == 0 {
                self.settle(pending);
            } else {
                self.pending.insert(seq, pending);
            }
        }
        let db = self.spec.db.clone();
        let directory = self.spec.directory.clone();
        let held_ttl = self.spec.held_ttl;
        let on_restored = self.spec.on_restored.clone();
        let own = self.own.clone();
        // Its sessions end after their grace unless a hello took one over
        // (the row is that node's then); a restart of it under the same id
        // meanwhile opens rows this must not end.
        let died = SystemTime::now();
        let (rows_db, rows_node) = (db.clone(), node.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Err(e) = end_presences(&rows_db, &rows_node, died).await {
                tracing::warn!(target: "bus", node = %rows_node, error = %e, "ending a dead node's presences failed");
            }
        });
        tokio::spawn(async move {
            let restored: crate::db::restore::OnRestored = Box::new(move |mesh| {
                let _ = own.send(mesh.clone());
                on_restored(mesh);
            });
            crate::db::restore::take_over(db, node, directory, held_ttl, restored).await;
        });
    }

    /// At shutdown: an empty part for every followed mesh, so the others
    /// drop this node's sessions at once.
    async fn leave(&mut self) {
        let meshes = self.followed_meshes();
        for mesh in meshes {
            let generation = self.part_generation();
            for part in wire::encode_part(self.me(), generation, &[], usize::MAX) {
                self.publish(wire::mesh_subject(&mesh.id, "dir"), part)
                    .await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
    }
}

/// What a shard answered a question put to it (`asked`: the event was
/// queued), or `None` when it answered nothing in time.
async fn shard_answer<T>(
    asked: bool,
    answer: tokio::sync::oneshot::Receiver<Option<T>>,
    timeout: Duration,
) -> Option<T> {
    if !asked {
        return None;
    }
    tokio::time::timeout(timeout, answer)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
}

async fn end_presences(
    db: &tokio_postgres::Config,
    node: &str,
    died: SystemTime,
) -> Result<(), crate::db::DbError> {
    let (client, task) = crate::db::connect(db).await?;
    client.execute(END_PRESENCES_SQL, &[&node, &died]).await?;
    drop(client);
    let _ = task.await;
    Ok(())
}
