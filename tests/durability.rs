//! Issue 8: an acked held envelope is never lost — across SIGKILL, a
//! Postgres outage and SIGTERM — and what an earlier run (or the old
//! claudemesh broker) left in `mesh.message_queue` is delivered, once.
//! Real Postgres, the broker as a child process, real WebSockets.
mod common;
mod support;

use common::{exec_sql, http, query_rows, Broker};
use meshbroker::devdb::LocalPostgres;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use support::*;

/// The broker on an existing database, once its backlog is loaded.
fn restart_on(db: &str, env: &[(&str, &str)]) -> Broker {
    let mut all: Vec<(&str, &str)> = vec![("DATABASE_URL", db)];
    all.extend_from_slice(&UNLIMITED_SENDS);
    all.extend_from_slice(env);
    let broker = Broker::start(&all);
    broker.wait_for_log("held restored", Duration::from_secs(30));
    broker
}

fn stop(mut broker: Broker) {
    broker.sigterm();
    let status = broker.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", broker.stderr_text());
}

/// `start`, for tests that send faster than a member's default rate.
fn flooding(env: &[(&str, &str)]) -> TestBroker {
    let mut all = UNLIMITED_SENDS.to_vec();
    all.extend_from_slice(env);
    start(&all)
}

/// Sends `count` envelopes round-robin to `targets` without waiting.
fn send_many(peer: &mut Peer, targets: &[Member], count: usize, tag: &str) {
    for i in 0..count {
        let to = &targets[i % targets.len()];
        peer.send_json(&json!({
            "type": "send", "targetSpec": to.pubkey, "priority": "next",
            "nonce": format!("n-{tag}-{i}"), "ciphertext": format!("c-{tag}-{i}"),
            "id": format!("{tag}-{i}"),
        }));
    }
}

/// An ack as a test sees it.
struct Acked {
    message_id: String,
    durable: bool,
}

/// Reads acks until `count` arrived, or the connection ends, or `timeout`
/// passes. Panics on an error reply: these sends are all valid.
fn read_acks(peer: &mut Peer, count: usize, timeout: Duration) -> Vec<Acked> {
    let deadline = Instant::now() + timeout;
    let mut acks = Vec::new();
    while acks.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.next_event(left) {
            Some(Event::Json(v)) if v["type"] == "ack" => acks.push(Acked {
                message_id: v["messageId"].as_str().unwrap().to_owned(),
                durable: v["durable"] != false,
            }),
            Some(Event::Json(v)) if v["type"] == "push" => {}
            Some(Event::Json(v)) => panic!("unexpected reply {v}"),
            Some(Event::Close(_)) | Some(Event::Gone(_)) | None => break,
        }
    }
    acks
}

/// Connects each member and gathers what it is pushed (message ids).
fn collect_pushes(broker: &Broker, members: &[Member]) -> HashMap<String, Vec<String>> {
    members
        .iter()
        .map(|m| {
            let mut peer = Peer::connect(broker, m);
            let ids = peer
                .drain_pushes(Duration::from_millis(1500))
                .iter()
                .map(|p| p["messageId"].as_str().unwrap().to_owned())
                .collect();
            (m.id.clone(), ids)
        })
        .collect()
}

/// Every acked id was pushed exactly once (to whoever it was for), and
/// nothing was pushed twice.
fn assert_exactly_once(acked: &[Acked], pushed: &HashMap<String, Vec<String>>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for ids in pushed.values() {
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "pushed more than once: {twice:?}");
    let missing: Vec<_> = acked
        .iter()
        .filter(|a| !seen.contains_key(a.message_id.as_str()))
        .map(|a| a.message_id.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acked envelopes never pushed, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn acked_envelopes_survive_sigkill_under_load() {
    sigkill_under_load(&[]);
}

/// With batches in flight on two connections at once, commits still reach
/// the acks in order.
#[test]
fn acked_envelopes_survive_sigkill_with_two_writer_connections() {
    sigkill_under_load(&[("HELD_WRITER_CONNECTIONS", "2")]);
}

fn sigkill_under_load(env: &[(&str, &str)]) {
    let mut broker = flooding(env);
    let db = broker.db.clone();
    let members = seed_mesh(&db, "kill", 9);
    let (senders, offline) = members.split_at(1);
    let mut sender = Peer::connect(&broker, &senders[0]);
    send_many(&mut sender, offline, 2000, "a");
    let mut acked = read_acks(&mut sender, 2000, Duration::from_secs(30));
    assert_eq!(acked.len(), 2000);
    assert!(
        acked.iter().all(|a| a.durable),
        "Postgres is up: every ack durable"
    );
    // A second wave is in flight when the broker dies.
    send_many(&mut sender, offline, 3000, "b");
    acked.extend(read_acks(&mut sender, 500, Duration::from_secs(30)));
    broker.broker.sigkill();
    broker
        .broker
        .wait_exit(Duration::from_secs(10))
        .expect("killed");
    acked.extend(read_acks(&mut sender, 3000, Duration::from_secs(2)));
    drop(sender);

    let broker = restart_on(&db, &[]);
    let pushed = collect_pushes(&broker, offline);
    assert_exactly_once(&acked, &pushed);
}

#[test]
fn a_postgres_outage_keeps_routing_and_loses_no_acked_envelope() {
    let root = common::world_traversable_tempdir("meshbroker-outage-");
    let pg = LocalPostgres::start(&root.join("data"), true).expect("start Postgres");
    pg.create_database("outage").expect("create database");
    let db = pg.url("outage");
    let broker = Broker::start(&[
        ("DATABASE_URL", &db),
        UNLIMITED_SENDS[0],
        UNLIMITED_SENDS[1],
    ]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "outage", 6);
    let (online, offline) = members.split_at(2);
    // A mesh deleted while its held envelopes wait to be written: its rows
    // can never be written, and must not hold up anyone else's.
    let doomed = seed_mesh(&db, "doomed", 2);
    let mut doomed_sender = Peer::connect(&broker, &doomed[0]);
    let mut sender = Peer::connect(&broker, &online[0]);
    let mut listener = Peer::connect(&broker, &online[1]);
    send_many(&mut sender, offline, 300, "up");
    let mut acked = read_acks(&mut sender, 300, WAIT);
    assert!(acked.iter().all(|a| a.durable));

    pg.stop().expect("stop Postgres");
    let health = |code: u16| {
        poll(Duration::from_secs(20), || {
            http(broker.addr(), "GET", "/health", &[], b"").status == code
        })
    };
    assert!(health(503), "/health stays 200 with Postgres down");
    // Liveness is not readiness: a database outage must not get the broker
    // restarted by its probes.
    let live = http(broker.addr(), "GET", "/health/live", &[], b"");
    assert_eq!(live.status, 200, "{}", live.text());
    assert_eq!(live.json()["status"], "ok");
    let port = broker.port().to_string();
    let probe = |args: &[&str]| {
        common::run_broker_args_expect_exit(
            args,
            &[("BROKER_PORT", port.as_str()), ("BROKER_HOST", "127.0.0.1")],
        )
        .0
    };
    assert!(
        probe(&["healthcheck"]).success(),
        "the liveness probe passes"
    );
    assert!(
        !probe(&["healthcheck", "--ready"]).success(),
        "the readiness probe fails while Postgres is down"
    );
    // Live routing goes on.
    let live = sender.send(&online[1].pubkey, "now", "n-live", "c-live", "live");
    assert_eq!(listener.recv_push(WAIT)["messageId"], live["messageId"]);
    // Held ones are kept in memory and said to be so.
    send_many(&mut doomed_sender, &doomed[1..], 50, "doomed");
    assert_eq!(read_acks(&mut doomed_sender, 50, WAIT).len(), 50);
    send_many(&mut sender, offline, 300, "down");
    let down = read_acks(&mut sender, 300, WAIT);
    assert_eq!(down.len(), 300);
    assert!(
        down.iter().all(|a| !a.durable),
        "acks during the outage say durable:false"
    );
    acked.extend(down);

    pg.restart().expect("restart Postgres");
    exec_sql(&db, "DELETE FROM mesh.mesh WHERE id = 'doomed'");
    assert!(health(200), "/health back to 200 without a broker restart");
    let ids: Vec<&str> = acked.iter().map(|a| a.message_id.as_str()).collect();
    let all_stored = poll(Duration::from_secs(15), || {
        query_rows(
            &db,
            &format!(
                "SELECT count(*) FROM mesh.message_queue WHERE id IN ('{}')",
                ids.join("','")
            ),
        )[0]
        .get::<_, i64>(0)
            == ids.len() as i64
    });
    assert!(
        all_stored,
        "what was held during the outage was written after it"
    );
    let pushed = collect_pushes(&broker, offline);
    assert_exactly_once(&acked, &pushed);
    // The audit trail covers the whole run, outage included, but for what
    // it counted as dropped.
    let sends = 300 + 1 + 300;
    let audited = poll(Duration::from_secs(15), || {
        let rows = query_rows(
            &db,
            "SELECT count(*) FROM mesh.audit_log WHERE event_type = 'send' AND mesh_id = 'outage'",
        )[0]
        .get::<_, i64>(0);
        let metrics = http(broker.addr(), "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&metrics.body).into_owned();
        let dropped = metric_value(&text, "broker_audit_dropped_total").unwrap_or(0.0);
        rows as f64 + dropped >= sends as f64
    });
    assert!(audited, "send rows missing from the audit trail");
    drop(broker);
    let _ = pg.stop();
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sigterm_under_load_exits_cleanly_and_keeps_what_it_acked() {
    let mut broker = flooding(&[]);
    let db = broker.db.clone();
    let members = seed_mesh(&db, "term", 8);
    let (online, offline) = members.split_at(3);
    let mut peers: Vec<Peer> = online.iter().map(|m| Peer::connect(&broker, m)).collect();
    send_many(&mut peers[0], offline, 4000, "held");
    send_many(&mut peers[1], &online[2..], 4000, "live");
    let mut acked = read_acks(&mut peers[0], 1000, WAIT);
    let asked = Instant::now();
    broker.broker.sigterm();
    acked.extend(read_acks(&mut peers[0], 4000, Duration::from_secs(12)));
    let status = broker
        .broker
        .wait_exit(Duration::from_secs(12))
        .expect("exits");
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    let open = query_rows(
        &db,
        "SELECT count(*) FROM mesh.presence WHERE disconnected_at IS NULL",
    )[0]
    .get::<_, i64>(0);
    assert_eq!(open, 0, "every presence row is closed");
    let stored: HashSet<String> = query_rows(&db, "SELECT id FROM mesh.message_queue")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|a| !stored.contains(&a.message_id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acked held envelopes not stored",
        lost.len()
    );
}

#[test]
fn expired_envelopes_are_dropped_never_pushed_and_counted() {
    let broker = flooding(&[
        ("HELD_TTL_SECONDS", "1"),
        ("BROKER_SWEEP_INTERVAL_MS", "200"),
    ]);
    let members = seed_mesh(&broker.db, "expiry", 2);
    let mut sender = Peer::connect(&broker, &members[0]);
    let ack = sender.send(&members[1].pubkey, "next", "n-exp", "c-exp", "exp");
    let id = ack["messageId"].as_str().unwrap().to_owned();
    assert_eq!(
        query_rows(
            &broker.db,
            &format!("SELECT 1 FROM mesh.message_queue WHERE id = '{id}'")
        )
        .len(),
        1
    );
    broker.wait_metric("broker_held_expired_total", |v| v >= 1.0);
    assert_eq!(broker.metric("broker_queue_depth"), 0.0);
    let gone = poll(WAIT, || {
        query_rows(
            &broker.db,
            &format!("SELECT 1 FROM mesh.message_queue WHERE id = '{id}'"),
        )
        .is_empty()
    });
    assert!(gone, "the expired row is dropped");
    let mut receiver = Peer::connect(&broker, &members[1]);
    receiver.expect_nothing(QUIET);
}

#[test]
fn rows_the_old_broker_wrote_are_delivered_under_the_same_rules() {
    let broker = flooding(&[]);
    let db = broker.db.clone();
    let members = seed_mesh(&db, "legacy", 3);
    stop(broker.broker);
    let (m0, m1) = (&members[0].id, &members[1].pubkey);
    exec_sql(
        &db,
        &format!(
            "INSERT INTO mesh.message_queue (id, mesh_id, sender_member_id, target_spec, priority, \
               nonce, ciphertext, created_at, delivered_at, expires_at) VALUES \
             ('old-direct', 'legacy', '{m0}', '{m1}', 'now', 'bm9uY2U=', 'b2xk', \
               now() - interval '2 minutes', NULL, NULL), \
             ('old-bcast', 'legacy', '{m0}', '*', 'next', 'bm9uY2U=', 'YWxs', \
               now() - interval '1 minute', NULL, now() + interval '1 day'), \
             ('old-expired', 'legacy', '{m0}', '{m1}', 'now', 'bg==', 'eA==', \
               now() - interval '2 days', NULL, now() - interval '1 day'), \
             ('old-done', 'legacy', '{m0}', '{m1}', 'now', 'bg==', 'eA==', \
               now() - interval '3 minutes', now() - interval '1 minute', NULL)"
        ),
    );
    let broker = restart_on(&db, &[]);
    let mut p1 = Peer::connect(&broker, &members[1]);
    let got: Vec<Value> = p1.drain_pushes(QUIET);
    let ids: Vec<&str> = got
        .iter()
        .map(|p| p["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["old-direct", "old-bcast"],
        "in creation order, once each"
    );
    assert_eq!(got[0]["senderPubkey"], members[0].pubkey.as_str());
    assert_eq!(got[0]["ciphertext"], "b2xk");
    assert_eq!(got[0]["priority"], "now");
    let mut p2 = Peer::connect(&broker, &members[2]);
    let got: Vec<Value> = p2.drain_pushes(QUIET);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["messageId"], "old-bcast");
    let mut p0 = Peer::connect(&broker, &members[0]);
    p0.expect_nothing(QUIET);
    let delivered = poll(WAIT, || {
        query_rows(
            &db,
            "SELECT id FROM mesh.message_queue WHERE delivered_at IS NULL ORDER BY id",
        )
        .is_empty()
    });
    assert!(delivered, "both rows marked delivered");
    assert!(
        query_rows(
            &db,
            "SELECT 1 FROM mesh.message_queue WHERE id = 'old-expired'"
        )
        .is_empty(),
        "the expired row was dropped at start"
    );
}

#[test]
fn a_broadcast_held_for_three_reaches_each_once_across_a_restart() {
    let broker = flooding(&[]);
    let db = broker.db.clone();
    let members = seed_mesh(&db, "bcast", 4);
    let mut sender = Peer::connect(&broker, &members[0]);
    let all = sender.send("*", "next", "n-all", "c-all", "all");
    let direct = sender.send(&members[1].pubkey, "low", "n-one", "c-one", "one");
    let (all_id, direct_id) = (
        all["messageId"].as_str().unwrap().to_owned(),
        direct["messageId"].as_str().unwrap().to_owned(),
    );
    let held_for = query_rows(
        &db,
        &format!(
            "SELECT member_id FROM mesh.message_delivery WHERE message_id = '{all_id}' ORDER BY 1"
        ),
    );
    assert_eq!(held_for.len(), 3, "one row per member it is held for");
    let mut p1 = Peer::connect(&broker, &members[1]);
    let got: Vec<Value> = p1.drain_pushes(QUIET);
    assert_eq!(got.len(), 2);
    let marked = poll(WAIT, || {
        query_rows(
            &db,
            &format!(
                "SELECT 1 FROM mesh.message_delivery WHERE message_id = '{all_id}' \
                 AND member_id = '{}' AND delivered_at IS NOT NULL",
                members[1].id
            ),
        )
        .len()
            == 1
            && query_rows(
                &db,
                &format!(
                    "SELECT 1 FROM mesh.message_queue WHERE id = '{direct_id}' \
                     AND delivered_at IS NOT NULL"
                ),
            )
            .len()
                == 1
    });
    assert!(marked, "deliveries are marked");
    assert_eq!(
        query_rows(
            &db,
            &format!(
                "SELECT 1 FROM mesh.message_queue WHERE id = '{all_id}' AND delivered_at IS NULL"
            )
        )
        .len(),
        1,
        "the broadcast row waits for the two others"
    );
    drop(p1);
    drop(sender);
    stop(broker.broker);

    let broker = restart_on(&db, &[]);
    let mut p1 = Peer::connect(&broker, &members[1]);
    p1.expect_nothing(QUIET);
    for member in &members[2..] {
        let mut peer = Peer::connect(&broker, member);
        let got: Vec<Value> = peer.drain_pushes(QUIET);
        assert_eq!(got.len(), 1, "{}", member.id);
        assert_eq!(got[0]["messageId"], all_id.as_str());
    }
    let done = poll(WAIT, || {
        query_rows(
            &db,
            &format!("SELECT 1 FROM mesh.message_queue WHERE id = '{all_id}' AND delivered_at IS NOT NULL"),
        )
        .len()
            == 1
    });
    assert!(done, "delivered_at: every member it was held for has it");
    let trail = query_rows(
        &db,
        "SELECT event_type, metadata::text FROM mesh.audit_log WHERE mesh_id = 'bcast'",
    );
    let held = trail
        .iter()
        .filter(|r| r.get::<_, String>(0) == "held")
        .count();
    assert_eq!(held, 4, "held for three, and the direct one");
    assert!(
        trail
            .iter()
            .all(|r| !r.get::<_, String>(1).contains("c-all")
                && !r.get::<_, String>(1).contains("n-all")),
        "no nonce or ciphertext in the audit trail"
    );
}

#[test]
fn new_sends_wait_behind_the_backlog_an_earlier_run_left() {
    let broker = flooding(&[]);
    let db = broker.db.clone();
    let members = seed_mesh(&db, "backlog", 2);
    stop(broker.broker);
    const BACKLOG: usize = 20_000;
    exec_sql(
        &db,
        &format!(
            "INSERT INTO mesh.message_queue (id, mesh_id, sender_member_id, target_spec, priority, \
               nonce, ciphertext, created_at, expires_at) \
             SELECT 'bk-' || lpad(i::text, 6, '0'), 'backlog', '{}', '{}', 'next', 'bg==', 'eA==', \
               now() - interval '1 hour' + i * interval '1 ms', now() + interval '1 day' \
             FROM generate_series(1, {BACKLOG}) AS i",
            members[0].id, members[1].pubkey
        ),
    );
    let broker = Broker::start(&[
        ("DATABASE_URL", &db),
        UNLIMITED_SENDS[0],
        UNLIMITED_SENDS[1],
    ]);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let mut sender = Peer::connect(&broker, &members[0]);
    let mut receiver = Peer::connect(&broker, &members[1]);
    let ack = sender.send(&members[1].pubkey, "now", "n-new", "c-new", "new");
    let mut ids = Vec::with_capacity(BACKLOG + 1);
    while ids.len() <= BACKLOG {
        let push = receiver.recv_push(Duration::from_secs(30));
        ids.push(push["messageId"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (1..=BACKLOG).map(|i| format!("bk-{i:06}")).collect();
    assert!(
        ids[..BACKLOG] == expected[..],
        "the backlog comes first, in order"
    );
    assert_eq!(ids[BACKLOG], ack["messageId"].as_str().unwrap());
    receiver.expect_nothing(QUIET);
}
