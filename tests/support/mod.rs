//! Fixtures for the hello and routing tests: a broker with a known database
//! URL, seeded meshes with real ed25519 member keys, a blocking WebSocket
//! peer that speaks PROTOCOL.md §4, and small /metrics and log helpers.
//!
//! Each test file does `mod common; mod support;` and uses its own subset,
//! hence the blanket `dead_code` allowance.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use crate::common::{exec_sql, fresh_database, http, Broker};

/// Generous bound for anything the broker should do "soon".
pub const WAIT: Duration = Duration::from_secs(10);
/// For tests that send far faster than a member's default send rate
/// (PROTOCOL.md §9: 200 at once, 100 a second): no limit that they reach.
pub const UNLIMITED_SENDS: [(&str, &str); 2] = [
    ("SEND_RATE_PER_MIN", "4000000000"),
    ("SEND_BURST", "4000000000"),
];
/// How long "received nothing" is watched for.
pub const QUIET: Duration = Duration::from_millis(400);

// ----------------------------------------------------------------- broker

/// A broker plus the URL of its (fresh) database; with the tests-only
/// `MESHBROKER_TEST_NODES=N` (2 or 3), node 0 of N nodes on that database
/// and one nats-server, the others in `others` (README "Several nodes");
/// fields drop in order: node 0, the others, then their bus.
pub struct TestBroker {
    pub broker: Broker,
    pub db: String,
    pub others: Vec<Broker>,
    nats: Option<Nats>,
}

/// Where `Peer::open` spreads a multi-node test broker's sessions.
struct Spread {
    /// Node 0's pid: a later broker on a reused port is not this one.
    pid: u32,
    ports: Vec<u16>,
    next: usize,
}

static SPREAD: std::sync::Mutex<Vec<Spread>> = std::sync::Mutex::new(Vec::new());

/// The port a new session of `broker` connects to: the next node in turn
/// for a multi-node test broker, else its own.
fn spread_port(broker: &Broker) -> u16 {
    let mut spread = SPREAD.lock().unwrap();
    spread.retain(|s| s.ports[0] != broker.port() || s.pid == broker.pid());
    match spread.iter_mut().find(|s| s.ports[0] == broker.port()) {
        Some(s) => {
            let port = s.ports[s.next % s.ports.len()];
            s.next += 1;
            port
        }
        None => broker.port(),
    }
}

/// Whether `broker` is node 0 of a multi-node test broker.
fn is_spread(broker: &Broker) -> bool {
    SPREAD
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.ports[0] == broker.port() && s.pid == broker.pid())
}

/// After a hello on a multi-node test broker: time for the other nodes to
/// hear of the session.
const SPREAD_SETTLE: Duration = Duration::from_millis(100);

/// `MESHBROKER_TEST_NODES`, 1 when unset.
pub fn test_nodes() -> usize {
    std::env::var("MESHBROKER_TEST_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, 3)
}

pub fn nats_binary() -> Option<std::path::PathBuf> {
    ["/usr/bin/nats-server", "/usr/sbin/nats-server"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A nats-server on a loopback port.
pub struct Nats {
    child: std::process::Child,
    pub port: u16,
}

impl Nats {
    /// On `port`, with `config` (nats-server's configuration syntax) when
    /// not empty; `None` when nats-server exits (the port was taken).
    fn try_start_on(port: u16, config: &str) -> Option<Nats> {
        let mut command = std::process::Command::new(nats_binary().expect("nats-server"));
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if !config.is_empty() {
            let path = std::env::temp_dir().join(format!("meshbroker-nats-{port}.conf"));
            std::fs::write(&path, config).expect("write the nats-server config");
            command.arg("-c").arg(path);
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let mut nats = Nats { child, port };
        let deadline = Instant::now() + WAIT;
        loop {
            if nats.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(nats);
            }
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// On a free port (another one if that was taken meanwhile).
    pub fn start() -> Nats {
        Nats::start_with("")
    }

    /// On a free port, with `config` (e.g. `max_payload: 8192`).
    pub fn start_with(config: &str) -> Nats {
        (0..5)
            .find_map(|_| Nats::try_start_on(free_port(), config))
            .expect("nats-server on one of five free ports")
    }

    /// Again on the port it had (a restart).
    pub fn start_on(port: u16) -> Nats {
        Nats::try_start_on(port, "").expect("nats-server restarted on its port")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Node names of a multi-node test broker.
pub const NODE_NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// Starts node `i` of a cluster on `db` and `nats`, and waits for its
/// database and its bus.
pub fn start_node(db: &str, nats: &Nats, i: usize, env: &[(&str, &str)]) -> Broker {
    let url = nats.url();
    let mut all: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", db),
        ("NATS_URL", url.as_str()),
        ("NODE_ID", NODE_NAMES[i]),
        ("NODE_DEAD_AFTER_MS", "1500"),
    ];
    all.extend_from_slice(env);
    let node = Broker::start(&all);
    node.wait_for_log("db healthy", Duration::from_secs(30));
    node.wait_for_log("bus connected", WAIT);
    node
}

/// Waits until each node has heard all the others.
pub fn wait_nodes_joined(nodes: &[&Broker]) {
    for node in nodes {
        let heard = poll(WAIT, || {
            let joined = node
                .logs()
                .iter()
                .filter(|l| l["msg"] == "node joined")
                .count();
            joined >= nodes.len() - 1
        });
        assert!(
            heard,
            "a node did not hear the others: {}",
            node.stderr_text()
        );
    }
}

impl std::ops::Deref for TestBroker {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

/// Starts the broker on a fresh database with `env` on top of the harness
/// defaults (2 shards), and waits until its migrations have run.
pub fn start(env: &[(&str, &str)]) -> TestBroker {
    let db = fresh_database();
    let nodes = test_nodes();
    if nodes > 1 && nats_binary().is_some() {
        let nats = Nats::start();
        let mut all: Vec<Broker> = (0..nodes).map(|i| start_node(&db, &nats, i, env)).collect();
        wait_nodes_joined(&all.iter().collect::<Vec<_>>());
        let broker = all.remove(0);
        let mut ports = vec![broker.port()];
        ports.extend(all.iter().map(Broker::port));
        SPREAD.lock().unwrap().push(Spread {
            pid: broker.pid(),
            ports,
            next: 0,
        });
        return TestBroker {
            broker,
            db,
            others: all,
            nats: Some(nats),
        };
    }
    let mut all: Vec<(&str, &str)> = vec![("DATABASE_URL", db.as_str())];
    all.extend_from_slice(env);
    let broker = Broker::start(&all);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    TestBroker {
        broker,
        db,
        others: Vec::new(),
        nats: None,
    }
}

impl TestBroker {
    /// One node, started by the test itself.
    pub fn single(broker: Broker, db: String) -> TestBroker {
        TestBroker {
            broker,
            db,
            others: Vec::new(),
            nats: None,
        }
    }

    /// The shard a session landed on, from its `ws hello` log line.
    pub fn shard_of(&self, presence_id: &str) -> u64 {
        let line = self.wait_for_log_where("ws hello", WAIT, |v| v["presence"] == presence_id);
        match &line["shard"] {
            Value::Number(n) => n.as_u64().expect("shard is an integer"),
            Value::String(s) => s.parse().expect("shard is numeric"),
            other => panic!("no shard in ws hello line: {other}"),
        }
    }

    /// Node 0, then the other nodes of a multi-node test broker.
    pub fn nodes(&self) -> impl Iterator<Item = &Broker> {
        std::iter::once(&self.broker).chain(&self.others)
    }

    /// The whole /metrics text (node 0's).
    pub fn metrics_text(&self) -> String {
        node_metrics_text(&self.broker)
    }

    /// The value of one sample, `name` including its labels exactly as
    /// exposed (`broker_connections_rejected_total{reason="capacity"}`);
    /// 0 when the sample is absent. Summed over the nodes of a multi-node
    /// test broker, which count what they did each.
    pub fn metric(&self, name: &str) -> f64 {
        self.nodes()
            .map(|n| metric_value(&node_metrics_text(n), name).unwrap_or(0.0))
            .sum()
    }

    /// Every JSON log line so far, of every node.
    pub fn logs(&self) -> Vec<Value> {
        self.nodes().flat_map(Broker::logs).collect()
    }

    /// The first log line of any node whose `msg` is `msg` and that
    /// satisfies `pred`.
    pub fn wait_for_log_where(
        &self,
        msg: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        poll(timeout, || {
            found = self.logs().into_iter().find(|l| l["msg"] == msg && pred(l));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            let stderr: Vec<String> = self.nodes().map(Broker::stderr_text).collect();
            panic!(
                "no matching log line with msg {msg:?} within {timeout:?}; stderr:\n{}",
                stderr.join("\n----\n")
            )
        })
    }

    /// Polls /metrics until `pred` holds for the sample; returns its value.
    pub fn wait_metric(&self, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let mut last = 0.0;
        let ok = poll(WAIT, || {
            last = self.metric(name);
            pred(last)
        });
        assert!(ok, "metric {name} stayed at {last}");
        last
    }
}

fn node_metrics_text(node: &Broker) -> String {
    let reply = http(node.addr(), "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200, "/metrics: {}", reply.text());
    reply.text()
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| {
            v.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad sample value for {name}: {v:?}"))
        })
}

/// Calls `check` every 50 ms until it returns true or `timeout` passes.
pub fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------ meshes

/// A `mesh.member` row and the secret key behind its pubkey.
#[derive(Clone)]
pub struct Member {
    pub mesh_id: String,
    pub id: String,
    pub key: SigningKey,
    /// 64 lowercase hex digits.
    pub pubkey: String,
}

pub fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn pubkey_hex(key: &SigningKey) -> String {
    hex(key.verifying_key().as_bytes())
}

/// Inserts the `mesh.mesh` row for `mesh_id` (name and slug derived).
pub fn create_mesh(db: &str, mesh_id: &str) {
    exec_sql(
        db,
        &format!(
            "INSERT INTO mesh.mesh (id, name, slug, owner_user_id) \
             VALUES ('{mesh_id}', 'Mesh {mesh_id}', 'slug-{mesh_id}', 'owner-{mesh_id}')"
        ),
    );
}

/// Inserts a member of `mesh_id` with id `member_id` and `key`.
pub fn add_member_with_key(db: &str, mesh_id: &str, member_id: &str, key: SigningKey) -> Member {
    let pubkey = pubkey_hex(&key);
    exec_sql(
        db,
        &format!(
            "INSERT INTO mesh.member (id, mesh_id, peer_pubkey, display_name) \
             VALUES ('{member_id}', '{mesh_id}', '{pubkey}', 'peer {member_id}')"
        ),
    );
    Member {
        mesh_id: mesh_id.to_owned(),
        id: member_id.to_owned(),
        key,
        pubkey,
    }
}

pub fn add_member(db: &str, mesh_id: &str, member_id: &str) -> Member {
    add_member_with_key(db, mesh_id, member_id, new_key())
}

/// A mesh with `n` members (`<mesh>-m0` …) with fresh keys, in one
/// statement.
pub fn seed_mesh(db: &str, mesh_id: &str, n: usize) -> Vec<Member> {
    create_mesh(db, mesh_id);
    let members: Vec<Member> = (0..n)
        .map(|i| {
            let key = new_key();
            Member {
                mesh_id: mesh_id.to_owned(),
                id: format!("{mesh_id}-m{i}"),
                pubkey: pubkey_hex(&key),
                key,
            }
        })
        .collect();
    if !members.is_empty() {
        let values: Vec<String> = members
            .iter()
            .map(|m| {
                format!(
                    "('{}', '{}', '{}', 'peer {}')",
                    m.id, m.mesh_id, m.pubkey, m.id
                )
            })
            .collect();
        exec_sql(
            db,
            &format!(
                "INSERT INTO mesh.member (id, mesh_id, peer_pubkey, display_name) VALUES {}",
                values.join(", ")
            ),
        );
    }
    members
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `hex(ed25519(key, "meshId|memberId|pubkey|timestamp"))`.
pub fn sign_hello(
    key: &SigningKey,
    mesh_id: &str,
    member_id: &str,
    pubkey: &str,
    ts: i64,
) -> String {
    let signed = format!("{mesh_id}|{member_id}|{pubkey}|{ts}");
    hex(&key.sign(signed.as_bytes()).to_bytes())
}

/// A correctly signed hello for `member` at `ts`.
pub fn hello_at(member: &Member, ts: i64) -> Value {
    json!({
        "type": "hello",
        "meshId": member.mesh_id,
        "memberId": member.id,
        "pubkey": member.pubkey,
        "sessionId": format!("sess-{}-{}", member.id, rand::random::<u32>()),
        "pid": 4242,
        "cwd": "/work/project",
        "timestamp": ts,
        "signature": sign_hello(&member.key, &member.mesh_id, &member.id, &member.pubkey, ts),
    })
}

pub fn hello(member: &Member) -> Value {
    hello_at(member, now_ms())
}

// -------------------------------------------------------------------- peer

/// What the next read produced.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    /// A close frame, with its code when it had one.
    Close(Option<u16>),
    /// The connection ended without (more) frames.
    Gone(String),
}

/// A blocking WebSocket client. Pushes that arrive while the test waits for
/// something else (an ack, an error) are kept for `recv_push`.
pub struct Peer {
    ws: WebSocket<TcpStream>,
    pushes: VecDeque<Value>,
    pub presence_id: String,
    pub member: Option<Member>,
    /// Connected to a multi-node test broker: what changes the directory
    /// waits for the other nodes to hear of it.
    spread: bool,
}

/// Requests whose effect other nodes learn from the directory.
const DIRECTORY_CHANGES: [&str; 6] = [
    "hello",
    "session_hello",
    "set_status",
    "set_summary",
    "join_group",
    "leave_group",
];

/// After a change other nodes learn from the directory (a hook's status):
/// time for them to hear of it, on a multi-node test broker.
pub fn settle(broker: &Broker) {
    if is_spread(broker) {
        std::thread::sleep(SPREAD_SETTLE);
    }
}

impl Peer {
    /// A WebSocket connection to `/ws` that has not said hello.
    pub fn open(broker: &Broker) -> Peer {
        let stream =
            TcpStream::connect(("127.0.0.1", spread_port(broker))).expect("connect to the broker");
        Peer::over(broker, stream)
    }

    /// Completes the WebSocket handshake over an already connected stream.
    pub fn over(broker: &Broker, stream: TcpStream) -> Peer {
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client::client(broker.ws_url(), stream)
            .unwrap_or_else(|e| panic!("WebSocket handshake: {e}"));
        Peer {
            ws,
            pushes: VecDeque::new(),
            presence_id: String::new(),
            member: None,
            spread: is_spread(broker),
        }
    }

    /// A WebSocket connection to `/ws`, or why there is none (refused,
    /// closed before the handshake's answer).
    pub fn try_open(broker: &Broker) -> Result<Peer, String> {
        let stream =
            TcpStream::connect(("127.0.0.1", spread_port(broker))).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        let (ws, _) =
            tungstenite::client::client(broker.ws_url(), stream).map_err(|e| e.to_string())?;
        Ok(Peer {
            ws,
            pushes: VecDeque::new(),
            presence_id: String::new(),
            member: None,
            spread: is_spread(broker),
        })
    }

    /// Connects and says a signed hello as `member`; panics unless it is
    /// acknowledged.
    pub fn connect(broker: &Broker, member: &Member) -> Peer {
        let mut peer = Peer::open(broker);
        let ack = peer.hello(member);
        assert_eq!(ack["type"], "hello_ack", "hello as {}: {ack}", member.id);
        peer
    }

    /// Sends a correctly signed hello as `member` and returns the answer
    /// (hello_ack or error). On success the peer remembers its presence.
    pub fn hello(&mut self, member: &Member) -> Value {
        let answer = self.request(&hello(member));
        assert!(
            self.pushes.is_empty(),
            "pushes arrived before the answer to hello: {:?}",
            self.pushes
        );
        if answer["type"] == "hello_ack" {
            self.presence_id = answer["presenceId"].as_str().unwrap_or_default().into();
            self.member = Some(member.clone());
        }
        answer
    }

    /// The member this peer said hello as.
    pub fn me(&self) -> &Member {
        self.member.as_ref().expect("this peer said hello")
    }

    pub fn pubkey(&self) -> &str {
        &self.me().pubkey
    }

    pub fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned()))
            .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    /// Sends `value` and returns the next message that is not a push.
    pub fn request(&mut self, value: &Value) -> Value {
        self.send_json(value);
        let reply = self.next_reply(WAIT);
        let kind = value["type"].as_str().unwrap_or_default();
        if reply["type"] != "error" && DIRECTORY_CHANGES.contains(&kind) {
            self.settle();
        }
        reply
    }

    /// After a change other nodes learn from the directory: on a
    /// multi-node test broker they route by a session's directory part
    /// once it reached them (README "Several nodes": 20 ms plus the bus).
    pub fn settle(&self) {
        if self.spread {
            std::thread::sleep(SPREAD_SETTLE);
        }
    }

    /// Sends a `send` and returns its ack; panics on anything else.
    pub fn send(
        &mut self,
        target: &str,
        priority: &str,
        nonce: &str,
        ciphertext: &str,
        id: &str,
    ) -> Value {
        let reply = self.request(&json!({
            "type": "send",
            "targetSpec": target,
            "priority": priority,
            "nonce": nonce,
            "ciphertext": ciphertext,
            "id": id,
        }));
        assert_eq!(reply["type"], "ack", "send {id} to {target}: {reply}");
        assert_eq!(reply["id"], id, "the ack echoes the send id: {reply}");
        assert!(
            reply["messageId"].as_str().is_some_and(|m| !m.is_empty()),
            "ack without messageId: {reply}"
        );
        reply
    }

    /// Reads one event within `timeout`; `None` when nothing arrived.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.ws
                .get_mut()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.ws.read() {
                Ok(Message::Text(text)) => return Some(Event::Json(parse(text.as_bytes()))),
                Ok(Message::Binary(data)) => return Some(Event::Json(parse(&data))),
                Ok(Message::Close(frame)) => {
                    // Send the queued close reply now, completing the handshake.
                    let _ = self.ws.flush();
                    return Some(Event::Close(frame.map(|f| u16::from(f.code))));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => return Some(Event::Gone(e.to_string())),
            }
        }
    }

    /// The next JSON message that is not a push (pushes are buffered).
    pub fn next_reply(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(Event::Json(v)) if v["type"] == "push" => self.pushes.push_back(v),
                Some(Event::Json(v)) => return v,
                Some(other) => panic!("expected a reply, got {other:?}"),
                None => panic!("no reply within {timeout:?}"),
            }
        }
    }

    /// The next push (buffered ones first); panics after `timeout`.
    pub fn recv_push(&mut self, timeout: Duration) -> Value {
        if let Some(push) = self.pushes.pop_front() {
            return push;
        }
        match self.next_event(timeout) {
            Some(Event::Json(v)) if v["type"] == "push" => v,
            Some(other) => panic!("expected a push, got {other:?}"),
            None => panic!("no push within {timeout:?}"),
        }
    }

    /// Every push that arrives until nothing has for `quiet` (buffered
    /// ones first).
    pub fn drain_pushes(&mut self, quiet: Duration) -> Vec<Value> {
        let mut pushes: Vec<Value> = self.pushes.drain(..).collect();
        while let Some(event) = self.next_event(quiet) {
            match event {
                Event::Json(v) if v["type"] == "push" => pushes.push(v),
                other => panic!("expected pushes, got {other:?}"),
            }
        }
        pushes
    }

    /// Asserts that no message (push or otherwise) arrives for `quiet`.
    pub fn expect_nothing(&mut self, quiet: Duration) {
        assert!(
            self.pushes.is_empty(),
            "unexpected buffered pushes: {:?}",
            self.pushes
        );
        if let Some(event) = self.next_event(quiet) {
            panic!("expected nothing, got {event:?}");
        }
    }

    /// The next non-push message must be `error` with `code`; returns it.
    pub fn expect_error(&mut self, code: &str) -> Value {
        let reply = self.next_reply(WAIT);
        assert_eq!(reply["type"], "error", "expected error {code}: {reply}");
        assert_eq!(reply["code"], code, "expected error {code}: {reply}");
        reply
    }

    /// Reads (skipping pushes) until a close frame; asserts its code.
    pub fn expect_close(&mut self, code: u16) {
        self.expect_close_within(code, WAIT);
    }

    pub fn expect_close_within(&mut self, code: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(Event::Json(v)) if v["type"] == "push" => self.pushes.push_back(v),
                Some(Event::Json(v)) => panic!("expected close {code}, got {v}"),
                Some(Event::Close(got)) => {
                    assert_eq!(got, Some(code), "close code");
                    return;
                }
                Some(Event::Gone(e)) => panic!("expected close {code}, connection ended: {e}"),
                None => panic!("no close {code} within {timeout:?}"),
            }
        }
    }

    /// Closes normally (1000) and waits for the broker's answer.
    pub fn close(mut self) {
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.next_event(deadline.saturating_duration_since(Instant::now())) {
                Some(Event::Json(_)) => continue,
                _ => return,
            }
        }
    }

    /// Pushes read while waiting for other things, not yet taken.
    pub fn buffered_pushes(&self) -> usize {
        self.pushes.len()
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.ws.get_mut()
    }
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "broker sent non-JSON ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// Asserts the fields of a push of `ack`'s message sent by `sender`.
pub fn assert_push(
    push: &Value,
    ack: &Value,
    sender: &Member,
    priority: &str,
    nonce: &str,
    ciphertext: &str,
) {
    assert_eq!(push["type"], "push", "{push}");
    assert_eq!(
        push["messageId"], ack["messageId"],
        "push messageId is the ack's: {push}"
    );
    assert_eq!(push["meshId"], sender.mesh_id.as_str(), "{push}");
    assert_eq!(push["senderPubkey"], sender.pubkey.as_str(), "{push}");
    assert_eq!(push["priority"], priority, "{push}");
    assert_eq!(push["nonce"], nonce, "{push}");
    assert_eq!(
        push["ciphertext"], ciphertext,
        "ciphertext is byte-identical"
    );
    let created = push["createdAt"]
        .as_str()
        .unwrap_or_else(|| panic!("no createdAt: {push}"));
    assert_rfc3339(created);
}

/// Checks `s` is an RFC 3339 timestamp (date `T` time, fraction optional,
/// `Z` or a numeric offset), without a date library.
pub fn assert_rfc3339(s: &str) {
    let b = s.as_bytes();
    let digits = |from: usize, to: usize| {
        b.get(from..to)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let mut ok = digits(0, 4)
        && b.get(4) == Some(&b'-')
        && digits(5, 7)
        && b.get(7) == Some(&b'-')
        && digits(8, 10)
        && matches!(b.get(10), Some(b'T' | b't'))
        && digits(11, 13)
        && b.get(13) == Some(&b':')
        && digits(14, 16)
        && b.get(16) == Some(&b':')
        && digits(17, 19);
    let mut i = 19;
    if ok && b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        ok = i > start;
    }
    ok = ok
        && (matches!(&s[i.min(s.len())..], "Z" | "z")
            || (s.len() == i + 6
                && matches!(b[i], b'+' | b'-')
                && digits(i + 1, i + 3)
                && b[i + 3] == b':'
                && digits(i + 4, i + 6)));
    assert!(ok, "createdAt {s:?} is not RFC 3339");
}
