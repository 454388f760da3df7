//! Status-gated delivery (PROTOCOL.md §5), black box: hooks, `set_status`,
//! source rank and freshness, the TTL sweep, stashed hook signals, the
//! (pid, cwd) match across shards, the hook rate limit, transcript
//! inference, liveness, and what a member with several sessions receives.
//! Each test runs the real broker binary (2 shards) on its own fresh
//! database, with the protocol's time constants shortened through the
//! environment; nothing here asserts how fast the broker is, only what a
//! user sees.
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, query_rows, world_traversable_tempdir};
use serde_json::{json, Value};
use support::*;

// ---------------------------------------------------------------- helpers

/// Connects as `member` with a hello carrying this `pid` and `cwd` (the
/// harness's `hello` always says pid 4242 in /work/project).
fn connect_at(broker: &TestBroker, member: &Member, pid: i32, cwd: &str) -> Peer {
    let mut peer = Peer::open(broker);
    let mut hello = hello(member);
    hello["pid"] = json!(pid);
    hello["cwd"] = json!(cwd);
    let ack = peer.request(&hello);
    assert_eq!(ack["type"], "hello_ack", "hello as {}: {ack}", member.id);
    peer.presence_id = ack["presenceId"].as_str().expect("presenceId").to_owned();
    peer.member = Some(member.clone());
    peer
}

/// `POST /hook/set-status` with `body`: the status code and the JSON answer
/// (`null` when the body is not JSON).
fn hook(broker: &TestBroker, body: &Value) -> (u16, Value) {
    let reply = http(
        broker.addr(),
        "POST",
        "/hook/set-status",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    let answer = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, answer)
}

/// A hook for (pid, cwd) that must be answered 200 with `ok: true`.
fn hook_ok(broker: &TestBroker, pid: Option<i32>, cwd: &str, status: &str) -> Value {
    let mut body = json!({"cwd": cwd, "status": status});
    if let Some(pid) = pid {
        body["pid"] = json!(pid);
    }
    let (code, answer) = hook(broker, &body);
    assert_eq!(code, 200, "hook {body}: {answer}");
    assert_eq!(answer["ok"], true, "hook {body}: {answer}");
    support::settle(broker);
    answer
}

/// A hook that must find the live session `peer` (answer carries its
/// presence id).
fn hook_applied(broker: &TestBroker, pid: Option<i32>, cwd: &str, status: &str, peer: &Peer) {
    let answer = hook_ok(broker, pid, cwd, status);
    assert_eq!(
        answer,
        json!({"ok": true, "presence_id": peer.presence_id}),
        "hook {status} for ({pid:?}, {cwd}) should reach {}",
        peer.presence_id
    );
}

/// `set_status` (no reply).
fn set_status(peer: &mut Peer, status: &str) {
    peer.send_json(&json!({"type": "set_status", "status": status}));
    peer.settle();
}

fn message_id(ack: &Value) -> String {
    ack["messageId"].as_str().expect("messageId").to_owned()
}

fn ids(pushes: &[Value]) -> Vec<String> {
    pushes.iter().map(message_id).collect()
}

/// Sends one envelope per priority to `target`, in order; their message ids.
fn send_each(from: &mut Peer, target: &str, priorities: &[&str]) -> Vec<String> {
    priorities
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let tag = format!("{p}-{i}-{}", rand::random::<u16>());
            message_id(&from.send(target, p, &format!("n-{tag}"), &format!("c-{tag}"), &tag))
        })
        .collect()
}

/// One presence row as the db thread last wrote it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    status: String,
    source: String,
    disconnected: bool,
    last_ping_ms: Option<f64>,
}

fn presence_row(broker: &TestBroker, presence_id: &str) -> Option<Row> {
    let rows = query_rows(
        &broker.db,
        &format!(
            "SELECT status::text, status_source::text, disconnected_at IS NOT NULL, \
             (extract(epoch FROM last_ping_at) * 1000)::float8 \
             FROM mesh.presence WHERE id = '{presence_id}'"
        ),
    );
    rows.first().map(|r| Row {
        status: r.get(0),
        source: r.get(1),
        disconnected: r.get(2),
        last_ping_ms: r.get(3),
    })
}

/// Polls until the presence row says (status, source).
fn wait_presence(broker: &TestBroker, presence_id: &str, status: &str, source: &str) {
    let mut last = None;
    let ok = poll(WAIT, || {
        last = presence_row(broker, presence_id);
        last.as_ref()
            .is_some_and(|r| r.status == status && r.source == source)
    });
    assert!(
        ok,
        "presence {presence_id} never became ({status}, {source}); last row: {last:?}"
    );
}

/// Like [`wait_presence`], but keeps reading `peer` meanwhile so its pongs
/// go out (the inference that runs on each pong needs them); returns the
/// pushes read.
fn wait_presence_reading(
    broker: &TestBroker,
    peer: &mut Peer,
    status: &str,
    source: &str,
) -> Vec<Value> {
    let mut pushes = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let last = presence_row(broker, &peer.presence_id);
        if last
            .as_ref()
            .is_some_and(|r| r.status == status && r.source == source)
        {
            return pushes;
        }
        assert!(
            Instant::now() < deadline,
            "presence {} never became ({status}, {source}); last row: {last:?}",
            peer.presence_id
        );
        pushes.extend(peer.drain_pushes(Duration::from_millis(100)));
    }
}

/// A projects directory for `CLAUDE_PROJECTS_DIR`, removed on drop.
struct Projects {
    root: PathBuf,
}

impl Projects {
    fn new() -> Projects {
        Projects {
            root: world_traversable_tempdir("meshbroker-test-projects-"),
        }
    }

    fn path(&self) -> String {
        self.root.display().to_string()
    }

    /// `<root>/<key>/<name>`, with the directory created.
    fn file(&self, key: &str, name: &str) -> PathBuf {
        let dir = self.root.join(key);
        std::fs::create_dir_all(&dir).expect("create the project directory");
        dir.join(name)
    }
}

impl Drop for Projects {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Transcript lines as Claude Code writes them.
fn user_line(text: &str) -> String {
    json!({"type": "user", "message": {"role": "user", "content": text}}).to_string()
}

fn assistant_text(text: &str) -> String {
    json!({"type": "assistant", "message": {"role": "assistant",
        "content": [{"type": "text", "text": text}]}})
    .to_string()
}

fn assistant_tool_use(tool: &str) -> String {
    json!({"type": "assistant", "message": {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01", "name": tool, "input": {"command": "ls"}}
    ]}})
    .to_string()
}

fn tool_result_line() -> String {
    json!({"type": "user", "message": {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "ok"}
    ]}})
    .to_string()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write the transcript");
}

fn append_lines(path: &Path, lines: &[String]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open the transcript");
    for line in lines {
        writeln!(file, "{line}").expect("append to the transcript");
    }
}

// ------------------------------------------------------------------ hooks

#[test]
fn a_hook_saying_working_holds_next_and_low_and_lets_now_through() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "hook-working", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut busy = connect_at(&broker, &m[1], 5101, "/work/hook-working");

    hook_applied(&broker, Some(5101), "/work/hook-working", "working", &busy);
    wait_presence(&broker, &busy.presence_id, "working", "hook");
    broker.wait_for_log_where("hook", WAIT, |l| {
        l["presence"] == busy.presence_id.as_str() && l["status"] == "working"
    });

    let sent = send_each(&mut sender, &m[1].pubkey, &["next", "low", "now"]);
    let push = busy.recv_push(WAIT);
    assert_eq!(
        message_id(&push),
        sent[2],
        "only the now gets through: {push}"
    );
    assert_eq!(push["priority"], "now");
    busy.expect_nothing(QUIET);
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);
}

#[test]
fn a_hook_saying_idle_releases_held_envelopes_in_creation_order() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "hook-idle", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut busy = connect_at(&broker, &m[1], 5201, "/work/hook-idle");
    hook_applied(&broker, Some(5201), "/work/hook-idle", "working", &busy);

    // Priorities interleaved, direct and broadcast: the order is the
    // creation order, whatever the priority or the target form.
    let mut held = send_each(&mut sender, &m[1].pubkey, &["next", "low", "next"]);
    held.push(message_id(&sender.send("*", "low", "n-b", "c-b", "bcast")));
    held.extend(send_each(&mut sender, &m[1].pubkey, &["low", "next"]));
    broker.wait_metric("broker_queue_depth", |v| v == 6.0);
    busy.expect_nothing(QUIET);

    hook_applied(&broker, Some(5201), "/work/hook-idle", "idle", &busy);
    let mut released = Vec::new();
    while released.len() < held.len() {
        released.push(busy.recv_push(WAIT));
    }
    assert_eq!(ids(&released), held, "released in creation order");
    assert_eq!(released[3]["ciphertext"], "c-b");
    assert_eq!(released[3]["senderPubkey"], m[0].pubkey.as_str());
    busy.expect_nothing(QUIET);
    sender.expect_nothing(Duration::from_millis(5));
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
    wait_presence(&broker, &busy.presence_id, "idle", "hook");
}

#[test]
fn a_manual_dnd_survives_a_hook_saying_idle() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "dnd-hook", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut quiet = connect_at(&broker, &m[1], 5301, "/work/dnd-hook");
    set_status(&mut quiet, "dnd");
    wait_presence(&broker, &quiet.presence_id, "dnd", "manual");

    let sent = send_each(&mut sender, &m[1].pubkey, &["next", "now"]);
    assert_eq!(message_id(&quiet.recv_push(WAIT)), sent[1]);
    quiet.expect_nothing(QUIET);

    // The hook finds the session (and says so) but changes nothing.
    hook_applied(&broker, Some(5301), "/work/dnd-hook", "idle", &quiet);
    quiet.expect_nothing(QUIET);
    assert_eq!(broker.metric("broker_queue_depth"), 1.0);
    let row = presence_row(&broker, &quiet.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("dnd", "manual")
    );

    // Only the session itself leaves dnd.
    set_status(&mut quiet, "idle");
    assert_eq!(message_id(&quiet.recv_push(WAIT)), sent[0]);
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
}

#[test]
fn dnd_set_by_the_session_ignores_every_hook() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "dnd-sacred", 3);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut manual = connect_at(&broker, &m[1], 5401, "/work/dnd-manual");
    let mut hooked = connect_at(&broker, &m[2], 5402, "/work/dnd-hooked");

    set_status(&mut manual, "dnd");
    wait_presence(&broker, &manual.presence_id, "dnd", "manual");
    // A hook may put a session in dnd...
    hook_applied(&broker, Some(5402), "/work/dnd-hooked", "dnd", &hooked);
    wait_presence(&broker, &hooked.presence_id, "dnd", "hook");

    let to_manual = send_each(&mut sender, &m[1].pubkey, &["next"]);
    let to_hooked = send_each(&mut sender, &m[2].pubkey, &["low"]);
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);

    // ...but no hook takes one out of it, whatever it says.
    for status in ["idle", "working", "idle", "dnd", "idle"] {
        hook_applied(&broker, Some(5401), "/work/dnd-manual", status, &manual);
        hook_applied(&broker, Some(5402), "/work/dnd-hooked", status, &hooked);
    }
    // A cwd-only hook (no pid) is no different.
    hook_applied(&broker, None, "/work/dnd-manual", "idle", &manual);
    std::thread::sleep(QUIET);
    manual.expect_nothing(Duration::from_millis(5));
    hooked.expect_nothing(Duration::from_millis(5));
    assert_eq!(broker.metric("broker_queue_depth"), 2.0);
    let row = presence_row(&broker, &manual.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("dnd", "manual")
    );
    let row = presence_row(&broker, &hooked.presence_id).expect("presence row");
    assert_eq!(row.status, "dnd");

    // `now` still reaches a dnd session.
    let now = send_each(&mut sender, &m[1].pubkey, &["now"]);
    assert_eq!(ids(&[manual.recv_push(WAIT)]), now);

    // set_status idle is the way out, for either.
    set_status(&mut manual, "idle");
    assert_eq!(ids(&[manual.recv_push(WAIT)]), to_manual);
    set_status(&mut hooked, "idle");
    assert_eq!(ids(&[hooked.recv_push(WAIT)]), to_hooked);
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
    wait_presence(&broker, &manual.presence_id, "idle", "manual");
}

// ------------------------------------------------------- rank, freshness

#[test]
fn a_fresh_hook_outranks_the_transcript_until_its_window_passes() {
    let projects = Projects::new();
    let cwd = "/work/fresh";
    write_lines(
        &projects.file("-work-fresh", "session.jsonl"),
        &[
            user_line("hi"),
            assistant_text("All done, nothing running."),
        ],
    );
    let broker = start(&[
        ("CLAUDE_PROJECTS_DIR", &projects.path()),
        ("HOOK_FRESH_WINDOW_SECONDS", "2"),
        ("BROKER_PING_INTERVAL_MS", "200"),
    ]);
    let m = seed_mesh(&broker.db, "fresh", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut busy = connect_at(&broker, &m[1], 5501, cwd);
    // The transcript's idle is what the session starts from.
    wait_presence_reading(&broker, &mut busy, "idle", "jsonl");

    hook_applied(&broker, Some(5501), cwd, "working", &busy);
    let held = send_each(&mut sender, &m[1].pubkey, &["next"]);
    let pinged_before = presence_row(&broker, &busy.presence_id)
        .and_then(|r| r.last_ping_ms)
        .unwrap_or(0.0);
    // Well inside the 2 s window: pongs keep coming (each one a chance for
    // the transcript), and the hook's working stands.
    busy.expect_nothing(Duration::from_millis(1000));
    let row = presence_row(&broker, &busy.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("working", "hook"),
        "a transcript overrode a fresh hook"
    );
    assert!(
        row.last_ping_ms.unwrap_or(0.0) > pinged_before,
        "no pong was recorded while the hook was fresh: {row:?}"
    );

    // Once the window has passed, the next pong's inference wins.
    let push = busy.recv_push(WAIT);
    assert_eq!(ids(&[push]), held);
    wait_presence(&broker, &busy.presence_id, "idle", "jsonl");
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
}

#[test]
fn a_fresh_manual_status_also_outranks_the_transcript() {
    let projects = Projects::new();
    let cwd = "/work/fresh-manual";
    write_lines(
        &projects.file("-work-fresh-manual", "s.jsonl"),
        &[user_line("go"), assistant_tool_use("Bash")],
    );
    let broker = start(&[
        ("CLAUDE_PROJECTS_DIR", &projects.path()),
        ("HOOK_FRESH_WINDOW_SECONDS", "2"),
        ("BROKER_PING_INTERVAL_MS", "200"),
    ]);
    let m = seed_mesh(&broker.db, "fresh-manual", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut peer = connect_at(&broker, &m[1], 5551, cwd);
    // The transcript says a tool is running.
    wait_presence_reading(&broker, &mut peer, "working", "jsonl");

    // The user says idle: it stands for the window although the transcript
    // still says working on every pong.
    set_status(&mut peer, "idle");
    wait_presence_reading(&broker, &mut peer, "idle", "manual");
    let sent = send_each(&mut sender, &m[1].pubkey, &["next"]);
    assert_eq!(ids(&[peer.recv_push(WAIT)]), sent);
    peer.expect_nothing(Duration::from_millis(800));
    let row = presence_row(&broker, &peer.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("idle", "manual")
    );

    // After the window the transcript takes over again: next is held.
    wait_presence_reading(&broker, &mut peer, "working", "jsonl");
    send_each(&mut sender, &m[1].pubkey, &["next"]);
    peer.expect_nothing(QUIET);
    broker.wait_metric("broker_queue_depth", |v| v == 1.0);
}

#[test]
fn the_same_status_from_a_lower_source_keeps_a_fresh_higher_one_in_charge() {
    // No pings (default interval): only the signals below write statuses.
    let broker = start(&[("HOOK_FRESH_WINDOW_SECONDS", "1")]);
    let m = seed_mesh(&broker.db, "rank", 1);
    let mut peer = connect_at(&broker, &m[0], 5601, "/work/rank");

    hook_applied(&broker, Some(5601), "/work/rank", "working", &peer);
    wait_presence(&broker, &peer.presence_id, "working", "hook");
    // Manual agrees while the hook is fresh: the hook stays in charge.
    set_status(&mut peer, "working");
    let applied = poll(WAIT, || {
        broker
            .logs()
            .iter()
            .any(|l| l["msg"] == "ws set_status" && l["presence"] == peer.presence_id.as_str())
    });
    assert!(applied, "no ws set_status line");
    std::thread::sleep(Duration::from_millis(200));
    let row = presence_row(&broker, &peer.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("working", "hook")
    );

    // Once the hook is stale (the agreement refreshed it: wait a full
    // window after it), manual takes over.
    std::thread::sleep(Duration::from_millis(1500));
    set_status(&mut peer, "working");
    wait_presence(&broker, &peer.presence_id, "working", "manual");

    // An equal or higher source takes over at once, fresh or not.
    hook_applied(&broker, Some(5601), "/work/rank", "working", &peer);
    wait_presence(&broker, &peer.presence_id, "working", "hook");
    // A different status is always recorded, whatever its source's rank.
    set_status(&mut peer, "idle");
    wait_presence(&broker, &peer.presence_id, "idle", "manual");
}

// -------------------------------------------------------------- TTL sweep

#[test]
fn the_ttl_sweep_releases_working_sessions_and_leaves_dnd_alone() {
    let broker = start(&[
        ("STATUS_TTL_SECONDS", "1"),
        ("BROKER_SWEEP_INTERVAL_MS", "100"),
    ]);
    let m = seed_mesh(&broker.db, "ttl", 3);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut quiet = Peer::connect(&broker, &m[2]);
    set_status(&mut quiet, "dnd");
    wait_presence(&broker, &quiet.presence_id, "dnd", "manual");
    let mut busy = connect_at(&broker, &m[1], 5701, "/work/ttl");
    hook_applied(&broker, Some(5701), "/work/ttl", "working", &busy);

    let to_busy = send_each(&mut sender, &m[1].pubkey, &["next", "low"]);
    let to_quiet = send_each(&mut sender, &m[2].pubkey, &["next"]);
    broker.wait_metric("broker_queue_depth", |v| v == 3.0);
    let flipped_before = broker.metric("broker_ttl_flipped_total");

    // Stuck in working past the TTL: flipped to idle, envelopes released.
    let released = vec![busy.recv_push(WAIT), busy.recv_push(WAIT)];
    assert_eq!(ids(&released), to_busy);
    wait_presence(&broker, &busy.presence_id, "idle", "jsonl");
    broker.wait_metric("broker_ttl_flipped_total", |v| v >= flipped_before + 1.0);
    broker.wait_metric("broker_ttl_sweeps_total", |v| v >= 5.0);

    // dnd, set longer ago than the TTL, is untouched sweep after sweep.
    let sweeps = broker.metric("broker_ttl_sweeps_total");
    broker.wait_metric("broker_ttl_sweeps_total", |v| v >= sweeps + 5.0);
    quiet.expect_nothing(Duration::from_millis(5));
    busy.expect_nothing(Duration::from_millis(5));
    assert_eq!(broker.metric("broker_queue_depth"), 1.0);
    let row = presence_row(&broker, &quiet.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("dnd", "manual")
    );
    set_status(&mut quiet, "idle");
    assert_eq!(ids(&[quiet.recv_push(WAIT)]), to_quiet);
}

// ------------------------------------------------------ stashed signals

#[test]
fn a_hook_before_the_session_connects_sets_its_first_status() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "pending", 3);
    let cwd = "/work/pending";
    let mut sender = Peer::connect(&broker, &m[0]);
    // Held for the member before it has any session.
    let held = send_each(&mut sender, &m[1].pubkey, &["next"]);
    broker.wait_metric("broker_queue_depth", |v| v == 1.0);

    let answer = hook_ok(&broker, Some(5801), cwd, "working");
    assert_eq!(answer, json!({"ok": true, "pending": true}));
    let stashed = poll(WAIT, || {
        !query_rows(
            &broker.db,
            &format!(
                "SELECT 1 FROM mesh.pending_status WHERE pid = 5801 \
                 AND cwd = '{cwd}' AND status = 'working' AND status_source = 'hook'"
            ),
        )
        .is_empty()
    });
    assert!(stashed, "no mesh.pending_status row for the stashed hook");

    // Another pid in the same cwd is another session: it starts idle.
    let mut other = connect_at(&broker, &m[2], 5802, cwd);
    let to_other = send_each(&mut sender, &m[2].pubkey, &["next"]);
    assert_eq!(ids(&[other.recv_push(WAIT)]), to_other);

    // The session with that (pid, cwd) starts working: its first next
    // (held before it came) stays held, a now gets through.
    let mut busy = connect_at(&broker, &m[1], 5801, cwd);
    broker.wait_for_log_where("ws hello", WAIT, |l| {
        l["presence"] == busy.presence_id.as_str() && l["status"] == "working"
    });
    busy.expect_nothing(QUIET);
    wait_presence(&broker, &busy.presence_id, "working", "hook");
    let now = send_each(&mut sender, &m[1].pubkey, &["now"]);
    assert_eq!(ids(&[busy.recv_push(WAIT)]), now);
    let later = send_each(&mut sender, &m[1].pubkey, &["next"]);
    busy.expect_nothing(QUIET);
    assert_eq!(broker.metric("broker_queue_depth"), 2.0);

    // The stash was taken once: a hook now reaches the live session.
    hook_applied(&broker, Some(5801), cwd, "idle", &busy);
    let released = vec![busy.recv_push(WAIT), busy.recv_push(WAIT)];
    assert_eq!(ids(&released), [held, later].concat());
    other.expect_nothing(Duration::from_millis(5));
}

#[test]
fn a_stashed_hook_older_than_ten_seconds_is_ignored() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "stale", 2);
    let cwd = "/work/stale";
    let mut sender = Peer::connect(&broker, &m[0]);
    let answer = hook_ok(&broker, Some(5901), cwd, "working");
    assert_eq!(answer, json!({"ok": true, "pending": true}));

    std::thread::sleep(Duration::from_secs(11));
    let mut late = connect_at(&broker, &m[1], 5901, cwd);
    broker.wait_for_log_where("ws hello", WAIT, |l| {
        l["presence"] == late.presence_id.as_str() && l["status"] == "idle"
    });
    let sent = send_each(&mut sender, &m[1].pubkey, &["next"]);
    assert_eq!(ids(&[late.recv_push(WAIT)]), sent);
    wait_presence(&broker, &late.presence_id, "idle", "jsonl");
}

// ------------------------------------------------ (pid, cwd) across shards

#[test]
fn a_hook_goes_to_the_pid_match_else_the_newest_session_in_the_cwd_across_shards() {
    let broker = start(&[("BROKER_SHARDS", "2")]);
    let m = seed_mesh(&broker.db, "match", 3);
    let cwd = "/work/shared-cwd";
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut older = connect_at(&broker, &m[1], 6001, cwd);
    let older_shard = broker.shard_of(&older.presence_id);
    // The kernel picks the shard: reconnect until the newer session is on
    // the other one.
    let mut newer = None;
    for _ in 0..64 {
        let peer = connect_at(&broker, &m[2], 6002, cwd);
        if broker.shard_of(&peer.presence_id) != older_shard {
            newer = Some(peer);
            break;
        }
        peer.close();
    }
    let mut newer = newer.expect("a session on the other shard within 64 tries");

    // (pid, cwd) matches the older session, on its shard.
    hook_applied(&broker, Some(6001), cwd, "working", &older);
    wait_presence(&broker, &older.presence_id, "working", "hook");
    let to_older = send_each(&mut sender, &m[1].pubkey, &["next"]);
    let to_newer = send_each(&mut sender, &m[2].pubkey, &["next"]);
    assert_eq!(ids(&[newer.recv_push(WAIT)]), to_newer);
    older.expect_nothing(QUIET);

    // An unknown pid falls back to the newest live session with the cwd.
    hook_applied(&broker, Some(6999), cwd, "working", &newer);
    wait_presence(&broker, &newer.presence_id, "working", "hook");
    let held_newer = send_each(&mut sender, &m[2].pubkey, &["next"]);
    newer.expect_nothing(QUIET);
    // So does a hook without pid.
    hook_applied(&broker, None, cwd, "idle", &newer);
    assert_eq!(ids(&[newer.recv_push(WAIT)]), held_newer);
    older.expect_nothing(Duration::from_millis(5));
    let row = presence_row(&broker, &older.presence_id).expect("presence row");
    assert_eq!(
        row.status, "working",
        "the fallback touched the older session"
    );

    // And the pid match again reaches the older one.
    hook_applied(&broker, Some(6001), cwd, "idle", &older);
    assert_eq!(ids(&[older.recv_push(WAIT)]), to_older);

    // Once the newer session is gone, the cwd-only fallback finds the older.
    let newer_id = newer.presence_id.clone();
    newer.close();
    let gone = poll(WAIT, || {
        presence_row(&broker, &newer_id).is_some_and(|r| r.disconnected)
    });
    assert!(gone, "the newer session's presence did not end");
    hook_applied(&broker, None, cwd, "working", &older);
}

// ------------------------------------------------------------- rate limit

#[test]
fn hooks_over_the_rate_limit_get_429_until_the_bucket_refills() {
    // 60 a minute: a bucket of 60, refilled one token a second.
    let broker = start(&[("HOOK_RATE_LIMIT_PER_MIN", "60")]);
    let cwd = "/work/rate";
    let body = json!({"cwd": cwd, "pid": 6101, "status": "working"});
    let started = Instant::now();
    let mut allowed = 0;
    let refused = loop {
        let (code, answer) = hook(&broker, &body);
        match code {
            200 => allowed += 1,
            429 => break answer,
            other => panic!("hook answered {other}: {answer}"),
        }
        assert!(allowed <= 120, "no 429 after {allowed} hooks");
    };
    let took = started.elapsed().as_secs_f64();
    assert!(
        allowed >= 60 && f64::from(allowed) <= 60.0 + took.ceil() + 1.0,
        "{allowed} hooks allowed in {took:.2} s with a bucket of 60 at 1/s"
    );
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].is_string(), "{refused}");
    let mut refusals: u32 = 1;

    // The bucket is per (pid, cwd): other keys are unaffected.
    hook_ok(&broker, Some(6102), cwd, "working");
    hook_ok(&broker, None, cwd, "working");
    hook_ok(&broker, Some(6101), "/work/rate-other", "working");

    // Refill: polling, the next 200 comes within a couple of seconds...
    let wait_for_token = |refusals: &mut u32| -> Duration {
        let since = Instant::now();
        loop {
            let (code, answer) = hook(&broker, &body);
            match code {
                200 => return since.elapsed(),
                429 => *refusals += 1,
                other => panic!("hook answered {other}: {answer}"),
            }
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "the bucket did not refill within 5 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_token(&mut refusals);
    // ...and right after it the bucket is empty again: one token, not a
    // burst. The one after that takes about a second.
    let (code, _) = hook(&broker, &body);
    assert_eq!(code, 429, "more than one token came back at once");
    refusals += 1;
    let gap = wait_for_token(&mut refusals);
    assert!(
        gap >= Duration::from_millis(500) && gap <= Duration::from_secs(3),
        "one token a second, but the next one took {gap:?}"
    );
    broker.wait_metric("broker_hook_requests_rate_limited_total", |v| {
        v == f64::from(refusals)
    });
}

// --------------------------------------------------- transcript inference

#[test]
fn the_transcript_says_working_while_a_tool_runs_and_idle_otherwise() {
    let projects = Projects::new();
    let cwd = "/work/transcript";
    let transcript = projects.file("-work-transcript", "a1b2.jsonl");
    write_lines(
        &transcript,
        &[user_line("list files"), assistant_tool_use("Bash")],
    );
    let broker = start(&[
        ("CLAUDE_PROJECTS_DIR", &projects.path()),
        ("BROKER_PING_INTERVAL_MS", "200"),
    ]);
    let m = seed_mesh(&broker.db, "transcript", 3);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut peer = connect_at(&broker, &m[1], 6201, cwd);
    // A session without transcript, answering pings all along: idle.
    let mut plain = connect_at(&broker, &m[2], 6202, "/work/no-transcript");

    // A tool_use in the last assistant line: working, on a pong.
    assert!(wait_presence_reading(&broker, &mut peer, "working", "jsonl").is_empty());
    let held = send_each(&mut sender, &m[1].pubkey, &["next"]);
    let now = send_each(&mut sender, &m[1].pubkey, &["now"]);
    assert_eq!(ids(&[peer.recv_push(WAIT)]), now);
    peer.expect_nothing(QUIET);

    // The tool finished and the assistant answered in text: idle, which
    // releases the held next.
    append_lines(
        &transcript,
        &[tool_result_line(), assistant_text("Here they are.")],
    );
    let released = wait_presence_reading(&broker, &mut peer, "idle", "jsonl");
    let mut released = ids(&released);
    if released.is_empty() {
        released = ids(&[peer.recv_push(WAIT)]);
    }
    assert_eq!(released, held);

    // A newer transcript of the cwd is the one that counts.
    std::thread::sleep(Duration::from_millis(20));
    let newer = projects.file("-work-transcript", "c3d4.jsonl");
    write_lines(&newer, &[user_line("again"), assistant_tool_use("Read")]);
    wait_presence_reading(&broker, &mut peer, "working", "jsonl");

    // No transcript at all: idle.
    std::fs::remove_dir_all(projects.root.join("-work-transcript")).unwrap();
    wait_presence_reading(&broker, &mut peer, "idle", "jsonl");
    let sent = send_each(&mut sender, &m[1].pubkey, &["low"]);
    assert_eq!(ids(&[peer.recv_push(WAIT)]), sent);

    // The session without a transcript was never gated.
    let sent = send_each(&mut sender, &m[2].pubkey, &["next"]);
    assert_eq!(ids(&[plain.recv_push(WAIT)]), sent);
    let row = presence_row(&broker, &plain.presence_id).expect("presence row");
    assert_eq!(
        (row.status.as_str(), row.source.as_str()),
        ("idle", "jsonl")
    );
    assert!(row.last_ping_ms.is_some());
}

#[test]
fn a_windows_cwd_finds_its_transcript_under_the_dashed_key() {
    let projects = Projects::new();
    // C:\x\y → C--x-y (every `\` and `:` replaced by `-`).
    let cwd = r"C:\x\y";
    write_lines(
        &projects.file("C--x-y", "win.jsonl"),
        &[user_line("build"), assistant_tool_use("Bash")],
    );
    let broker = start(&[
        ("CLAUDE_PROJECTS_DIR", &projects.path()),
        ("BROKER_PING_INTERVAL_MS", "200"),
    ]);
    let m = seed_mesh(&broker.db, "windows", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut peer = connect_at(&broker, &m[1], 6301, cwd);
    wait_presence_reading(&broker, &mut peer, "working", "jsonl");
    send_each(&mut sender, &m[1].pubkey, &["next"]);
    peer.expect_nothing(QUIET);
    assert_eq!(broker.metric("broker_queue_depth"), 1.0);
}

/// BROKER BUG at 2c08762 (fails whenever the transcript answer is slower
/// than the first write, i.e. nearly always on an idle machine): the hello
/// asks the transcript before releasing held envelopes, but the session's
/// writer drains the member's held queue right after writing `hello_ack`
/// (`write_loop` → `member_with_held` → `drain_held_to`), while the session
/// is still `idle` by default; the `working` answer arrives afterwards and
/// only gates later envelopes. So a session whose transcript says a tool is
/// running gets its held `next` and `low` at connect.
#[test]
fn at_hello_the_transcript_is_asked_before_held_envelopes_are_released() {
    let projects = Projects::new();
    let cwd = "/work/hello-infer";
    write_lines(
        &projects.file("-work-hello-infer", "t.jsonl"),
        &[user_line("run the tests"), assistant_tool_use("Bash")],
    );
    // Default ping interval (30 s): only the hello asks the transcript.
    let broker = start(&[("CLAUDE_PROJECTS_DIR", &projects.path())]);
    let m = seed_mesh(&broker.db, "hello-infer", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let held = send_each(&mut sender, &m[1].pubkey, &["next", "now", "low"]);
    broker.wait_metric("broker_queue_depth", |v| v == 3.0);

    let mut peer = connect_at(&broker, &m[1], 6401, cwd);
    let pushes = peer.drain_pushes(QUIET);
    // The transcript was read and said working...
    wait_presence(&broker, &peer.presence_id, "working", "jsonl");
    // ...before anything held was released: only the now came.
    let got: Vec<Value> = pushes.iter().map(|p| p["priority"].clone()).collect();
    assert_eq!(
        ids(&pushes),
        [held[1].clone()],
        "a session whose transcript says working got held pushes of priorities {got:?}; \
         ws hello line: {}",
        broker.wait_for_log_where("ws hello", WAIT, |l| l["presence"]
            == peer.presence_id.as_str())
    );
    assert_eq!(broker.metric("broker_queue_depth"), 2.0);

    set_status(&mut peer, "idle");
    let released = vec![peer.recv_push(WAIT), peer.recv_push(WAIT)];
    assert_eq!(ids(&released), [held[0].clone(), held[2].clone()]);
}

// -------------------------------------------------------------- liveness

#[test]
fn a_client_that_stops_answering_pings_is_closed_and_its_presence_ended() {
    // Its presence ends after the grace (PROTOCOL.md §9): keep it short.
    let broker = start(&[
        ("BROKER_PING_INTERVAL_MS", "100"),
        ("BROKER_PING_TIMEOUT_MS", "600"),
        ("SESSION_GRACE_SECONDS", "1"),
    ]);
    let m = seed_mesh(&broker.db, "liveness", 3);
    let mut silent = Peer::connect(&broker, &m[1]);
    let alive = Peer::connect(&broker, &m[2]);

    // `alive` reads (and so answers pings) on its own thread for as long as
    // the checks below take; `silent` reads nothing until it is reaped.
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = stop.clone();
        let mut alive = alive;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                alive.expect_nothing(Duration::from_millis(100));
            }
            alive
        })
    };
    broker.wait_for_log_where("ws close", WAIT, |l| {
        l["presence"] == silent.presence_id.as_str() && l["reason"] == "timeout"
    });
    let ended = match silent.next_event(WAIT) {
        Some(Event::Json(v)) => panic!("expected the connection to end, got {v}"),
        Some(other) => other,
        None => panic!("the silent client was not closed"),
    };
    assert!(
        matches!(ended, Event::Close(_) | Event::Gone(_)),
        "{ended:?}"
    );
    let closed = poll(WAIT, || {
        presence_row(&broker, &silent.presence_id).is_some_and(|r| r.disconnected)
    });
    assert!(closed, "disconnected_at was not set for the reaped session");
    broker.wait_metric("broker_connections_closed_total{reason=\"timeout\"}", |v| {
        v >= 1.0
    });
    // Well past the timeout for the one that answers.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let mut alive = pump.join().expect("the live client saw nothing");

    // The live one stays, and its pongs were recorded.
    let row = presence_row(&broker, &alive.presence_id).expect("presence row");
    assert!(!row.disconnected, "{row:?}");
    assert!(
        !broker
            .logs()
            .iter()
            .any(|l| l["msg"] == "ws close" && l["presence"] == alive.presence_id.as_str()),
        "the live client was closed"
    );
    let mut sender = Peer::connect(&broker, &m[0]);
    let sent = send_each(&mut sender, &m[2].pubkey, &["next"]);
    assert_eq!(ids(&[alive.recv_push(WAIT)]), sent);
    // The reaped member has no session left: its envelopes are held.
    send_each(&mut sender, &m[1].pubkey, &["now"]);
    broker.wait_metric("broker_queue_depth", |v| v == 1.0);
}

// ----------------------------------------------- members, several sessions

#[test]
fn a_member_with_a_working_and_an_idle_session_gets_next_on_the_idle_one_only() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "two", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut busy = connect_at(&broker, &m[1], 6601, "/work/two-busy");
    let mut free = connect_at(&broker, &m[1], 6602, "/work/two-free");
    hook_applied(&broker, Some(6601), "/work/two-busy", "working", &busy);

    let next = send_each(&mut sender, &m[1].pubkey, &["next"]);
    assert_eq!(ids(&[free.recv_push(WAIT)]), next);
    let now = send_each(&mut sender, &m[1].pubkey, &["now"]);
    assert_eq!(ids(&[busy.recv_push(WAIT)]), now);
    assert_eq!(ids(&[free.recv_push(WAIT)]), now);
    // A broadcast from the sender gates the same way.
    let low = message_id(&sender.send("*", "low", "n", "c", "all-low"));
    assert_eq!(ids(&[free.recv_push(WAIT)]), [low]);
    busy.expect_nothing(QUIET);
    assert_eq!(broker.metric("broker_queue_depth"), 0.0);

    // Turning idle later does not bring the busy one what the other got.
    hook_applied(&broker, Some(6601), "/work/two-busy", "idle", &busy);
    std::thread::sleep(QUIET);
    busy.expect_nothing(Duration::from_millis(5));
    free.expect_nothing(Duration::from_millis(5));
}

#[test]
fn a_held_now_is_not_stuck_behind_a_held_next_for_a_working_session() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "behind", 2);
    let cwd = "/work/behind";
    let mut sender = Peer::connect(&broker, &m[0]);
    // The member is offline: next, now and low are held in that order.
    let held = send_each(&mut sender, &m[1].pubkey, &["next", "now", "low"]);
    broker.wait_metric("broker_queue_depth", |v| v == 3.0);

    // Its session comes up working: of the hooks stashed just before, the
    // newest counts.
    for status in ["idle", "working"] {
        assert_eq!(
            hook_ok(&broker, Some(6701), cwd, status),
            json!({"ok": true, "pending": true})
        );
    }
    let mut busy = connect_at(&broker, &m[1], 6701, cwd);
    assert_eq!(ids(&[busy.recv_push(WAIT)]), [held[1].clone()]);
    busy.expect_nothing(QUIET);
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);

    hook_applied(&broker, Some(6701), cwd, "idle", &busy);
    let released = vec![busy.recv_push(WAIT), busy.recv_push(WAIT)];
    assert_eq!(ids(&released), [held[0].clone(), held[2].clone()]);
    busy.expect_nothing(QUIET);
}

#[test]
fn set_status_working_takes_now_only_until_set_status_idle() {
    let broker = start(&[]);
    let m = seed_mesh(&broker.db, "manual", 2);
    let mut sender = Peer::connect(&broker, &m[0]);
    let mut peer = Peer::connect(&broker, &m[1]);
    set_status(&mut peer, "working");
    wait_presence(&broker, &peer.presence_id, "working", "manual");
    broker.wait_for_log_where("ws set_status", WAIT, |l| {
        l["presence"] == peer.presence_id.as_str() && l["status"] == "working"
    });

    let sent = send_each(&mut sender, &m[1].pubkey, &["next", "now", "low"]);
    assert_eq!(ids(&[peer.recv_push(WAIT)]), [sent[1].clone()]);
    peer.expect_nothing(QUIET);
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);

    set_status(&mut peer, "idle");
    let released = vec![peer.recv_push(WAIT), peer.recv_push(WAIT)];
    assert_eq!(ids(&released), [sent[0].clone(), sent[2].clone()]);
    wait_presence(&broker, &peer.presence_id, "idle", "manual");
    // Idle again: everything flows.
    let more = send_each(&mut sender, &m[1].pubkey, &["low"]);
    assert_eq!(ids(&[peer.recv_push(WAIT)]), more);
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
}
