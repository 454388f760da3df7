//! Each scenario for about a second against a test broker (the project's
//! harness: throwaway Postgres, fresh database, broker child process):
//! nothing lost, nothing duplicated, every hello admitted.
#[path = "../../tests/common/mod.rs"]
mod common;

use common::{fresh_database, Broker};
use std::process::Command;
use std::sync::Once;

/// The broker binary is not a dependency of this package's tests: build it
/// (a no-op when it is up to date).
fn ensure_broker_binary() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let mut cmd = Command::new(env!("LOADGEN_CARGO"));
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args([
                "build",
                "--quiet",
                "-p",
                "meshbroker",
                "--bin",
                "meshbroker",
            ]);
        if env!("LOADGEN_BROKER_PROFILE") == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the broker");
        assert!(status.success(), "building the broker failed");
    });
}

fn run(broker: &Broker, db: &str, scenario: &str, extra: &[&str]) -> loadgen::Report {
    let url = broker.ws_url();
    let mut argv = vec![
        "loadgen",
        scenario,
        "--url",
        &url,
        "--database-url",
        db,
        "--duration",
        "1",
        "--grace",
        "5",
        "--threads",
        "2",
        "--quiet",
    ];
    argv.extend_from_slice(extra);
    let config = loadgen::Args::parse_from_iter(argv)
        .and_then(|a| a.validate())
        .expect("valid arguments");
    let report = loadgen::run(&config).unwrap_or_else(|e| panic!("{scenario}: {e:#}"));
    eprintln!("{}", report.table());
    assert!(report.ok(), "{scenario}: {}", report.failure_summary());
    assert_eq!(report.lost, 0, "{scenario}");
    assert_eq!(report.duplicates, 0, "{scenario}");
    assert_eq!(report.broker_pid, Some(broker.pid()), "{scenario}");
    report
}

#[test]
fn every_scenario_runs_without_loss() {
    ensure_broker_binary();
    let db = fresh_database();
    // The loadgen's peers send far faster than a member's default send
    // rate (PROTOCOL.md §9): lift it, as bench/run.sh does.
    let broker = Broker::start(&[
        ("DATABASE_URL", &db),
        ("SEND_RATE_PER_MIN", "4000000000"),
        ("SEND_BURST", "4000000000"),
    ]);
    // Migrations run after the listener is up.
    broker.wait_for_log("db healthy", std::time::Duration::from_secs(30));

    let direct = run(&broker, &db, "direct", &["--peers", "8", "--payload", "64"]);
    assert!(direct.sent > 0 && direct.pushes == direct.expected_pushes);
    assert_eq!(direct.acked, direct.sent);

    // Open loop, with its schedule lag and the percentile distributions.
    let hgrm_dir = tempfile::tempdir().unwrap();
    let prefix = hgrm_dir.path().join("open");
    let open = run(
        &broker,
        &db,
        "direct",
        &[
            "--peers",
            "4",
            "--rate",
            "2000",
            "--payload",
            "100",
            "--hgrm",
            prefix.to_str().unwrap(),
        ],
    );
    assert!(open.sent >= 1000, "open loop sent {}", open.sent);
    let lag = open.schedule_lag_ms.expect("open loop reports its lag");
    assert_eq!(lag.count, open.sent);
    assert!(open.kept_schedule.is_some());
    let files = open.hgrm_files.as_ref().expect("hgrm files");
    for name in ["push", "ack", "hello", "schedule-lag"] {
        let path = hgrm_dir.path().join(format!("open-{name}.hgrm"));
        assert!(files.contains(&path), "{files:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("       Value     Percentile"), "{text}");
    }
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(direct.schedule_lag_ms.is_none() && direct.hgrm_files.is_none());

    let broadcast = run(
        &broker,
        &db,
        "broadcast",
        &["--meshes", "2", "--peers", "5", "--window", "2"],
    );
    assert_eq!(broadcast.pushes, broadcast.sent * 4);

    // A stalled reader (it never reads after its hello, and never sends)
    // is no receiver: the other three get every push.
    let stalled = run(
        &broker,
        &db,
        "broadcast",
        &[
            "--peers",
            "5",
            "--window",
            "2",
            "--count",
            "2000",
            "--stalled-readers",
            "1",
        ],
    );
    assert_eq!((stalled.stalled_readers, stalled.senders), (1, 4));
    assert_eq!(stalled.pushes, stalled.sent * 3);

    // Acknowledged delivery (PROTOCOL.md §11): every push acked, several
    // to a client_ack; nothing comes again within the broker's default
    // 30 s; every send's client_message_id is new.
    let acked = run(
        &broker,
        &db,
        "direct",
        &[
            "--peers",
            "8",
            "--payload",
            "64",
            "--client-ack",
            "--client-message-ids",
        ],
    );
    let a = acked.acks.as_ref().expect("acks block");
    assert!(acked.sent > 0 && acked.pushes == acked.expected_pushes);
    assert_eq!(a.client_acked_ids, acked.pushes, "{a:?}");
    assert!(
        a.client_acks > 0 && a.client_acks < a.client_acked_ids,
        "{a:?}"
    );
    assert_eq!(
        (a.redeliveries, a.unacked, a.duplicate_acks),
        (0, 0, 0),
        "{a:?}"
    );
    let acked = run(
        &broker,
        &db,
        "broadcast",
        &["--peers", "5", "--window", "2", "--client-ack"],
    );
    let a = acked.acks.as_ref().expect("acks block");
    assert_eq!(acked.pushes, acked.sent * 4);
    assert_eq!(a.client_acked_ids, acked.pushes, "{a:?}");

    // Held: 3 senders, 3 offline members; every 5th send to `*`.
    let held = run(
        &broker,
        &db,
        "held",
        &[
            "--peers",
            "6",
            "--senders",
            "3",
            "--broadcast-every",
            "5",
            "--window",
            "4",
        ],
    );
    let h = held.held.as_ref().expect("held block");
    assert_eq!(h.recipients, 3);
    assert!(h.owed > 0 && h.delivered == h.owed, "{h:?}");
    assert_eq!(h.held_pushes, h.held_expected);
    assert_eq!(held.acked, held.sent);

    // The peer directory and groups: every answer lists the whole mesh.
    let peers = run(
        &broker,
        &db,
        "peers",
        &[
            "--meshes",
            "2",
            "--peers",
            "20",
            "--window",
            "2",
            "--listers",
            "2",
            "--list-rate",
            "100",
            "--group-every",
            "3",
            "--group-rate",
            "100",
        ],
    );
    let p = peers.directory.as_ref().expect("directory block");
    assert!(
        p.lists_answered > 0 && p.lists_answered == p.lists_sent,
        "{p:?}"
    );
    assert_eq!(p.mean_entries, Some(20.0));
    // Members 0, 3, …, 18 of each mesh; the group sender (1) is not one.
    assert_eq!(p.group_members, 14);
    assert!(
        p.group_sent > 0 && p.group_pushes == p.group_sent * 7,
        "{p:?}"
    );

    let idle = run(&broker, &db, "idle", &["--meshes", "3", "--peers", "20"]);
    assert_eq!(idle.hellos, 60);
    assert!(idle.broker_rss_per_conn_bytes.is_some());

    let churn = run(&broker, &db, "churn", &["--meshes", "2", "--peers", "8"]);
    assert!(churn.run_hellos > 0);
    // PROTOCOL.md §9: every session with its own key, vouched for by its
    // member's; the broker admits each one.
    let sessions = run(
        &broker,
        &db,
        "churn",
        &["--meshes", "2", "--peers", "8", "--session-hello"],
    );
    assert!(sessions.run_hellos > 0);
    assert_eq!(sessions.hello_failures, 0);

    // Everything the runs created is gone again.
    let left = common::query_rows(&db, "SELECT count(*) FROM mesh.mesh WHERE id LIKE 'lg-%'");
    assert_eq!(left[0].get::<_, i64>(0), 0);
    let groups = common::query_rows(
        &db,
        "SELECT count(*) FROM mesh.member_group WHERE member_id LIKE 'lg-%'",
    );
    assert_eq!(groups[0].get::<_, i64>(0), 0);
}

/// `--ack-fraction` below 1 against a broker whose leases lapse after 1 s:
/// every push left unacked comes again, `redelivered`, same `messageId`,
/// during the drain, and is not counted as a push twice.
#[test]
fn pushes_left_unacked_come_again() {
    ensure_broker_binary();
    let db = fresh_database();
    let broker = Broker::start(&[
        ("DATABASE_URL", &db),
        ("SEND_RATE_PER_MIN", "4000000000"),
        ("SEND_BURST", "4000000000"),
        ("CLIENT_ACK_TIMEOUT_SECONDS", "1"),
    ]);
    broker.wait_for_log("db healthy", std::time::Duration::from_secs(30));
    let report = run(
        &broker,
        &db,
        "direct",
        &[
            "--peers",
            "4",
            "--payload",
            "64",
            "--rate",
            "400",
            "--client-ack",
            "--ack-fraction",
            "0.5",
        ],
    );
    let a = report.acks.as_ref().expect("acks block");
    assert_eq!(report.pushes, report.expected_pushes);
    assert!(a.unacked > 50, "{a:?}");
    assert_eq!(a.redelivered_unacked, a.unacked, "{a:?}");
    assert_eq!(
        (a.awaiting_redelivery, a.redelivered_mismatch),
        (0, 0),
        "{a:?}"
    );
    // Each push acked once: the first copy or its redelivery.
    assert_eq!(
        a.client_acked_ids,
        report.pushes + a.redelivered_after_ack,
        "{a:?}"
    );
}

/// Several `--url`s: two brokers sharing one database (a cluster), the
/// peers dealt round-robin over them, their CPU summed. Scenarios without
/// sends: a broker here delivers only to its own sessions.
#[test]
fn peers_spread_over_several_brokers() {
    ensure_broker_binary();
    let db = fresh_database();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("SEND_RATE_PER_MIN", "4000000000"),
        ("SEND_BURST", "4000000000"),
    ];
    let a = Broker::start(&env);
    let b = Broker::start(&env);
    a.wait_for_log("db healthy", std::time::Duration::from_secs(30));
    b.wait_for_log("db healthy", std::time::Duration::from_secs(30));
    let upgraded = |broker: &Broker| {
        common::metric(&broker.scrape(), "broker_connections_total", &[])
            .expect("broker_connections_total") as u64
    };
    let (url_a, url_b) = (a.ws_url(), b.ws_url());
    let spread = |scenario: &str, extra: &[&str]| {
        let mut argv = vec![
            "loadgen",
            scenario,
            "--url",
            &url_a,
            "--url",
            &url_b,
            "--database-url",
            &db,
            "--duration",
            "1",
            "--threads",
            "2",
            "--quiet",
        ];
        argv.extend_from_slice(extra);
        let config = loadgen::Args::parse_from_iter(argv)
            .and_then(|a| a.validate())
            .expect("valid arguments");
        let report = loadgen::run(&config).unwrap_or_else(|e| panic!("{scenario}: {e:#}"));
        eprintln!("{}", report.table());
        assert!(report.ok(), "{scenario}: {}", report.failure_summary());
        assert_eq!(report.urls, [url_a.clone(), url_b.clone()]);
        assert_eq!(report.broker_pids, [a.pid(), b.pid()], "{scenario}");
        assert_eq!(report.broker_pid, Some(a.pid()));
        assert!(report.broker_cpu_s.is_some(), "{scenario}");
        report
    };

    // 2 meshes × 5 peers: peers 0, 2, …, 8 of the roster on a, the others on b.
    let idle = spread("idle", &["--meshes", "2", "--peers", "5"]);
    assert_eq!(idle.hellos, 10);
    assert_eq!((upgraded(&a), upgraded(&b)), (5, 5));
    assert!(idle.broker_rss_bytes.is_some() && idle.broker_rss_per_conn_bytes.is_some());

    // Reconnecting peers keep their broker: both keep getting hellos.
    let churn = spread("churn", &["--meshes", "1", "--peers", "4"]);
    assert!(churn.run_hellos > 0);
    let (after_a, after_b) = (upgraded(&a), upgraded(&b));
    assert!(after_a > 5 && after_b > 5, "{after_a} / {after_b}");

    // Sends over two URLs of one broker (the second target's upgrade
    // request on the hot path's connections); its pid counted once.
    let argv = [
        "loadgen",
        "direct",
        "--url",
        &url_a,
        "--url",
        &url_a,
        "--database-url",
        &db,
        "--peers",
        "6",
        "--payload",
        "64",
        "--duration",
        "1",
        "--threads",
        "2",
        "--quiet",
    ];
    let config = loadgen::Args::parse_from_iter(argv)
        .and_then(|a| a.validate())
        .expect("valid arguments");
    let direct = loadgen::run(&config).expect("direct run");
    assert!(direct.ok(), "{}", direct.failure_summary());
    assert!(direct.sent > 0 && direct.pushes == direct.expected_pushes);
    assert_eq!(direct.broker_pids, [a.pid()]);
    assert_eq!(upgraded(&a), after_a + 6);
}
