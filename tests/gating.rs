//! Status-gated delivery (PROTOCOL.md §5) as a user sees it: hooks, manual
//! status, the TTL sweep, stashed signals, transcript inference and
//! liveness, each against the real broker (2 shards) and Postgres, with the
//! time constants shortened through the environment.
mod common;
mod support;

use std::path::Path;
use std::time::Duration;

use common::{http, query_rows};
use serde_json::{json, Value};
use support::*;

const QUIET: Duration = Duration::from_millis(400);

/// Says hello as `member` from a session with this pid and cwd.
fn connect_as(broker: &TestBroker, member: &Member, pid: i32, cwd: &str) -> Peer {
    let mut peer = Peer::open(broker);
    let mut hello = hello(member);
    hello["pid"] = pid.into();
    hello["cwd"] = cwd.into();
    let ack = peer.request(&hello);
    assert_eq!(ack["type"], "hello_ack", "{ack}");
    peer.presence_id = ack["presenceId"].as_str().unwrap().into();
    peer.member = Some(member.clone());
    peer
}

/// POST /hook/set-status; the status code and the JSON answer.
fn hook(broker: &TestBroker, body: Value) -> (u16, Value) {
    let reply = http(
        broker.addr(),
        "POST",
        "/hook/set-status",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, json)
}

fn set_status(peer: &mut Peer, status: &str) {
    peer.send_json(&json!({"type":"set_status","status":status}));
}

/// Sends `priority` envelopes to `to` and returns their message ids.
fn send_each(from: &mut Peer, to: &Member, priorities: &[&str]) -> Vec<String> {
    priorities
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ack = from.send(
                &to.pubkey,
                p,
                "n",
                &format!("ct-{p}-{i}"),
                &format!("{p}-{i}"),
            );
            ack["messageId"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn ids(pushes: &[Value]) -> Vec<String> {
    pushes
        .iter()
        .map(|p| p["messageId"].as_str().unwrap().to_owned())
        .collect()
}

/// The presence row's (status, status_source), once the db thread wrote it.
fn presence_status(broker: &TestBroker, presence_id: &str, want: (&str, &str)) {
    let found = poll(WAIT, || {
        let rows = query_rows(
            &broker.db,
            &format!(
                "SELECT status::text, status_source::text FROM mesh.presence WHERE id = '{presence_id}'"
            ),
        );
        rows.first().is_some_and(|r| {
            (r.get::<_, String>(0), r.get::<_, String>(1)) == (want.0.into(), want.1.into())
        })
    });
    assert!(found, "presence {presence_id} never became {want:?}");
}

#[test]
fn a_hook_saying_working_holds_next_and_low_until_it_says_idle() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "hook", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut busy = connect_as(&broker, &members[1], 501, "/work/hooked");
    let (status, answer) = hook(
        &broker,
        json!({"cwd":"/work/hooked","pid":501,"status":"working"}),
    );
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"ok":true,"presence_id":busy.presence_id}));
    presence_status(&broker, &busy.presence_id, ("working", "hook"));

    let sent = send_each(&mut sender, &members[1], &["next", "now", "low"]);
    assert_eq!(ids(&[busy.recv_push(WAIT)]), [sent[1].clone()]);
    busy.expect_nothing(QUIET);
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);

    let (status, _) = hook(
        &broker,
        json!({"cwd":"/work/hooked","pid":501,"status":"idle"}),
    );
    assert_eq!(status, 200);
    let released = busy.drain_pushes(QUIET);
    assert_eq!(ids(&released), [sent[0].clone(), sent[2].clone()]);
    broker.wait_metric("broker_queue_depth", |v| v == 0.0);
}

#[test]
fn set_status_working_gates_and_idle_releases() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "manual", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut busy = Peer::connect(&broker, &members[1]);
    set_status(&mut busy, "working");
    presence_status(&broker, &busy.presence_id, ("working", "manual"));
    let sent = send_each(&mut sender, &members[1], &["next", "now"]);
    assert_eq!(ids(&busy.drain_pushes(QUIET)), [sent[1].clone()]);
    set_status(&mut busy, "idle");
    assert_eq!(ids(&busy.drain_pushes(QUIET)), [sent[0].clone()]);
    assert!(broker
        .logs()
        .iter()
        .any(|l| l["msg"] == "ws set_status" && l["status"] == "working"));
}

#[test]
fn a_manual_dnd_survives_a_hook_saying_idle() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "dnd", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut quiet = connect_as(&broker, &members[1], 502, "/work/dnd");
    set_status(&mut quiet, "dnd");
    presence_status(&broker, &quiet.presence_id, ("dnd", "manual"));
    let (status, _) = hook(
        &broker,
        json!({"cwd":"/work/dnd","pid":502,"status":"idle"}),
    );
    assert_eq!(status, 200);
    let sent = send_each(&mut sender, &members[1], &["next", "now"]);
    assert_eq!(ids(&quiet.drain_pushes(QUIET)), [sent[1].clone()]);
    presence_status(&broker, &quiet.presence_id, ("dnd", "manual"));
    // Only the session itself leaves dnd.
    set_status(&mut quiet, "idle");
    assert_eq!(ids(&quiet.drain_pushes(QUIET)), [sent[0].clone()]);
}

#[test]
fn a_working_session_gets_a_held_now_that_sits_behind_a_held_next() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "behind", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    // Held while the member is offline: `next` first, then `now`.
    let sent = send_each(&mut sender, &members[1], &["next", "now"]);
    broker.wait_metric("broker_queue_depth", |v| v == 2.0);
    // A hook says working before the session connects: it starts working.
    let (_, answer) = hook(
        &broker,
        json!({"cwd":"/work/behind","pid":503,"status":"working"}),
    );
    assert_eq!(answer, json!({"ok":true,"pending":true}));
    let mut busy = connect_as(&broker, &members[1], 503, "/work/behind");
    assert_eq!(ids(&busy.drain_pushes(QUIET)), [sent[1].clone()]);
    broker.wait_metric("broker_queue_depth", |v| v == 1.0);
    presence_status(&broker, &busy.presence_id, ("working", "hook"));
}

#[test]
fn of_two_sessions_only_the_idle_one_gets_next() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "pair", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut busy = Peer::connect(&broker, &members[1]);
    let mut idle = Peer::connect(&broker, &members[1]);
    set_status(&mut busy, "working");
    presence_status(&broker, &busy.presence_id, ("working", "manual"));
    let sent = send_each(&mut sender, &members[1], &["next", "now"]);
    assert_eq!(ids(&idle.drain_pushes(QUIET)), sent);
    assert_eq!(ids(&busy.drain_pushes(QUIET)), [sent[1].clone()]);
    // Turning idle, it does not get what its sibling got.
    set_status(&mut busy, "idle");
    busy.expect_nothing(QUIET);
}

#[test]
fn a_hook_goes_to_the_pid_match_else_the_newest_session_with_the_cwd_across_shards() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "match", 3);
    // Two sessions with one cwd, on different shards.
    let first = connect_as(&broker, &members[1], 600, "/work/shared");
    let first_shard = broker.shard_of(&first.presence_id);
    let mut second = loop {
        let peer = connect_as(&broker, &members[2], 601, "/work/shared");
        if broker.shard_of(&peer.presence_id) != first_shard {
            break peer;
        }
    };
    let (_, answer) = hook(
        &broker,
        json!({"cwd":"/work/shared","pid":600,"status":"working"}),
    );
    assert_eq!(answer["presence_id"], first.presence_id.as_str());
    presence_status(&broker, &first.presence_id, ("working", "hook"));
    // An unknown pid: the newest session with that cwd.
    let (_, answer) = hook(
        &broker,
        json!({"cwd":"/work/shared","pid":9999,"status":"working"}),
    );
    assert_eq!(answer["presence_id"], second.presence_id.as_str());
    presence_status(&broker, &second.presence_id, ("working", "hook"));
    let mut sender = Peer::connect(&broker, &members[0]);
    send_each(&mut sender, &members[2], &["next"]);
    second.expect_nothing(QUIET);
    // No session with that cwd at all: stashed.
    let (_, answer) = hook(&broker, json!({"cwd":"/work/nobody","status":"idle"}));
    assert_eq!(answer, json!({"ok":true,"pending":true}));
}

#[test]
fn a_stashed_signal_older_than_10_s_is_ignored() {
    let broker = start(&[]);
    let members = seed_mesh(&broker.db, "stale", 2);
    let (_, answer) = hook(
        &broker,
        json!({"cwd":"/work/stale","pid":700,"status":"working"}),
    );
    assert_eq!(answer["pending"], true);
    std::thread::sleep(Duration::from_millis(10_500));
    let mut late = connect_as(&broker, &members[1], 700, "/work/stale");
    presence_status(&broker, &late.presence_id, ("idle", "jsonl"));
    let mut sender = Peer::connect(&broker, &members[0]);
    let sent = send_each(&mut sender, &members[1], &["next"]);
    assert_eq!(ids(&late.drain_pushes(QUIET)), sent);
}

#[test]
fn the_ttl_sweep_releases_a_stuck_working_session_and_leaves_dnd_alone() {
    let broker = start(&[
        ("STATUS_TTL_SECONDS", "1"),
        ("BROKER_SWEEP_INTERVAL_MS", "200"),
    ]);
    let members = seed_mesh(&broker.db, "ttl", 3);
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut stuck = Peer::connect(&broker, &members[1]);
    let mut quiet = Peer::connect(&broker, &members[2]);
    set_status(&mut stuck, "working");
    set_status(&mut quiet, "dnd");
    presence_status(&broker, &quiet.presence_id, ("dnd", "manual"));
    let to_stuck = send_each(&mut sender, &members[1], &["next"]);
    let _to_quiet = send_each(&mut sender, &members[2], &["low"]);
    // Within a second or so the sweep flips `working` to idle (jsonl).
    assert_eq!(ids(&[stuck.recv_push(Duration::from_secs(5))]), to_stuck);
    presence_status(&broker, &stuck.presence_id, ("idle", "jsonl"));
    quiet.expect_nothing(Duration::from_millis(1500));
    presence_status(&broker, &quiet.presence_id, ("dnd", "manual"));
    assert!(broker.metric("broker_ttl_flipped_total") >= 1.0);
    assert!(broker.metric("broker_ttl_sweeps_total") >= 1.0);
    assert_eq!(broker.metric("broker_queue_depth"), 1.0);
}

fn write_transcript(projects: &Path, key: &str, tool_use: bool) {
    let dir = projects.join(key);
    std::fs::create_dir_all(&dir).unwrap();
    let content = if tool_use {
        r#"[{"type":"text","text":"running"},{"type":"tool_use","id":"t1","name":"Bash","input":{}}]"#
    } else {
        r#"[{"type":"text","text":"done"}]"#
    };
    let lines = [
        r#"{"type":"user","message":{"role":"user","content":"go"}}"#.to_owned(),
        format!(r#"{{"type":"assistant","message":{{"role":"assistant","content":{content}}}}}"#),
    ];
    std::fs::write(dir.join("session.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn the_transcript_says_working_until_it_stops_using_tools() {
    let projects = tempfile::tempdir().unwrap();
    let projects_dir = projects.path().display().to_string();
    let broker = start(&[
        ("CLAUDE_PROJECTS_DIR", projects_dir.as_str()),
        ("BROKER_PING_INTERVAL_MS", "200"),
    ]);
    let members = seed_mesh(&broker.db, "jsonl", 2);
    // The Windows-style cwd's key: every `\` and `:` replaced by `-`.
    let cwd = r"C:\Users\me\proj";
    write_transcript(projects.path(), "C--Users-me-proj", true);
    let mut sender = Peer::connect(&broker, &members[0]);
    let sent = send_each(&mut sender, &members[1], &["next", "now"]);
    // Inference runs before the held envelopes are released: only `now`.
    let mut session = connect_as(&broker, &members[1], 800, cwd);
    assert_eq!(ids(&session.drain_pushes(QUIET)), [sent[1].clone()]);
    presence_status(&broker, &session.presence_id, ("working", "jsonl"));
    // The assistant stops calling tools: the next pong infers idle.
    write_transcript(projects.path(), "C--Users-me-proj", false);
    assert_eq!(
        ids(&[session.recv_push(Duration::from_secs(5))]),
        [sent[0].clone()]
    );
    presence_status(&broker, &session.presence_id, ("idle", "jsonl"));
}

#[test]
fn a_fresh_hook_outranks_the_transcript_until_its_window_passes() {
    let projects = tempfile::tempdir().unwrap();
    let projects_dir = projects.path().display().to_string();
    let broker = start(&[
        ("CLAUDE_PROJECTS_DIR", projects_dir.as_str()),
        ("BROKER_PING_INTERVAL_MS", "200"),
        ("HOOK_FRESH_WINDOW_SECONDS", "2"),
    ]);
    let members = seed_mesh(&broker.db, "rank", 2);
    // The transcript says idle; the hook says working.
    write_transcript(projects.path(), "-work-rank", false);
    let mut session = connect_as(&broker, &members[1], 801, "/work/rank");
    hook(
        &broker,
        json!({"cwd":"/work/rank","pid":801,"status":"working"}),
    );
    presence_status(&broker, &session.presence_id, ("working", "hook"));
    let mut sender = Peer::connect(&broker, &members[0]);
    let sent = send_each(&mut sender, &members[1], &["next"]);
    // Pongs run inference every 200 ms, but the hook is fresh for 2 s.
    session.expect_nothing(Duration::from_millis(1200));
    // Then the transcript wins: idle, and the held `next` arrives.
    assert_eq!(ids(&[session.recv_push(Duration::from_secs(5))]), sent);
    presence_status(&broker, &session.presence_id, ("idle", "jsonl"));
}

#[test]
fn hook_signals_over_the_rate_get_429_and_the_bucket_refills() {
    let broker = start(&[("HOOK_RATE_LIMIT_PER_MIN", "60")]);
    let body = json!({"cwd":"/work/rate","pid":900,"status":"idle"});
    for _ in 0..60 {
        assert_eq!(hook(&broker, body.clone()).0, 200);
    }
    assert_eq!(hook(&broker, body.clone()).0, 429);
    assert!(broker.metric("broker_hook_requests_rate_limited_total") >= 1.0);
    // One token a second comes back.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(hook(&broker, body.clone()).0, 200);
    // Another (pid, cwd) has its own bucket.
    assert_eq!(
        hook(
            &broker,
            json!({"cwd":"/work/rate","pid":901,"status":"idle"})
        )
        .0,
        200
    );
}

#[test]
fn a_client_that_stops_answering_pings_is_reaped() {
    let broker = start(&[
        ("BROKER_PING_INTERVAL_MS", "100"),
        ("BROKER_PING_TIMEOUT_MS", "600"),
    ]);
    let members = seed_mesh(&broker.db, "reap", 1);
    let mut silent = Peer::connect(&broker, &members[0]);
    // Not reading means not answering pings.
    std::thread::sleep(Duration::from_millis(1500));
    broker.wait_metric("broker_connections_closed_total{reason=\"timeout\"}", |v| {
        v >= 1.0
    });
    let presence = silent.presence_id.clone();
    let closed = poll(WAIT, || {
        query_rows(
            &broker.db,
            &format!("SELECT 1 FROM mesh.presence WHERE id = '{presence}' AND disconnected_at IS NOT NULL"),
        )
        .len()
            == 1
    });
    assert!(closed, "the reaped session's presence is ended");
    let end = silent.next_event(WAIT);
    assert!(
        matches!(end, Some(Event::Close(_) | Event::Gone(_))),
        "the socket is closed: {end:?}"
    );
}
