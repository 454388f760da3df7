//! Start-up and shutdown as an operator sees them: configuration errors,
//! `--check-config`, the database modes (external, embedded, an outage and
//! recovery), and SIGTERM/SIGINT.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::{http, run_broker_capture, run_broker_expect_exit, Broker};
use meshbroker::devdb::LocalPostgres;
use tungstenite::Message;

/// The config-error stderr lines (anything else, e.g. a JSON log line,
/// would mean the broker got further than validation).
fn lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn each_bad_variable_alone_exits_1_naming_it() {
    // (var, bad value, a fragment of what is expected)
    let cases: &[(&str, &str, &str)] = &[
        ("DATABASE_URL", "mysql://x", "postgres://"),
        ("BROKER_PORT", "abc", "integer"),
        ("BROKER_PORT", "70000", "65535"),
        ("BROKER_HOST", "not-an-ip", "IP address"),
        ("BROKER_SHARDS", "0", "from 1"),
        ("STATUS_TTL_SECONDS", "-1", "seconds"),
        ("HOOK_FRESH_WINDOW_SECONDS", "soon", "seconds"),
        ("HELD_TTL_SECONDS", "0", "seconds"),
        ("MAX_CONNECTIONS_PER_MESH", "0", "from 1"),
        ("MAX_CONNECTIONS", "0", "from 1"),
        ("MAX_MESSAGE_BYTES", "1", "from 1024"),
        ("HOOK_RATE_LIMIT_PER_MIN", "lots", "integer"),
        ("NODE_ENV", "prod", "production"),
        ("LOG_LEVEL", "verbose", "debug"),
        ("MAX_OUTBOUND_BYTES", "1", "integer"),
        ("MEMBER_REFRESH_SECONDS", "0", "seconds"),
        ("SESSION_GRACE_SECONDS", "-1", "seconds from 0"),
        ("SEND_RATE_PER_MIN", "0", "from 1"),
        ("SEND_BURST", "many", "integer"),
        ("CLIENT_ACK_TIMEOUT_SECONDS", "0", "seconds from 1"),
        ("DEDUPE_WINDOW_SECONDS", "-5", "seconds from 0"),
        ("CLIENT_ACK_MAX_LEASES", "0", "from 1"),
        ("CLIENT_ACK_MAX_LEASE_BYTES", "1024", "from 65536"),
    ];
    for (var, value, expected) in cases {
        let (status, stderr) = run_broker_expect_exit(&[(var, value)]);
        assert_eq!(status.code(), Some(1), "{var}={value}: stderr:\n{stderr}");
        let lines = lines(&stderr);
        assert_eq!(lines.len(), 1, "{var}={value}: want one line:\n{stderr}");
        let line = lines[0];
        assert!(line.contains(var), "{var}={value}: {line}");
        assert!(line.contains(value), "{var}={value}: {line}");
        assert!(
            line.contains("expected") && line.contains(expected),
            "{var}={value}: should say what is expected ({expected}): {line}"
        );
    }
}

#[test]
fn several_bad_variables_are_all_reported() {
    let bad = [
        ("BROKER_PORT", "abc"),
        ("BROKER_SHARDS", "0"),
        ("MAX_MESSAGE_BYTES", "1"),
        ("NODE_ENV", "prod"),
        ("DATABASE_URL", "mysql://x"),
        ("STATUS_TTL_SECONDS", "-1"),
    ];
    let (status, stderr) = run_broker_expect_exit(&bad);
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    let lines = lines(&stderr);
    assert_eq!(
        lines.len(),
        bad.len(),
        "one line per bad variable:\n{stderr}"
    );
    for (var, value) in bad {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(var) && l.contains(value) && l.contains("expected")),
            "{var}={value} not reported:\n{stderr}"
        );
    }
}

#[test]
fn production_without_database_url_is_refused() {
    let (status, stderr) =
        run_broker_expect_exit(&[("NODE_ENV", "production"), ("DATABASE_URL", "")]);
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    let lines = lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("DATABASE_URL"), "{stderr}");
    assert!(lines[0].contains("production"), "{stderr}");
}

#[test]
fn check_config_prints_effective_values_or_fails() {
    let (status, stdout, stderr) = run_broker_capture(
        &["--check-config"],
        &[
            ("DATABASE_URL", "postgres://broker:hunter2@127.0.0.1:1/mesh"),
            ("MAX_MESSAGE_BYTES", "2048"),
            ("HOOK_RATE_LIMIT_PER_MIN", "7"),
            ("SESSION_GRACE_SECONDS", "0"),
            ("DEDUPE_WINDOW_SECONDS", "0"),
            ("CLIENT_ACK_MAX_LEASES", "16"),
            ("GIT_SHA", "cafe123"),
        ],
    );
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "DATABASE_URL=postgres://broker:***@127.0.0.1:1/mesh",
        "BROKER_HOST=127.0.0.1",
        "BROKER_PORT=0",
        "BROKER_SHARDS=2",
        "STATUS_TTL_SECONDS=60",
        "HOOK_FRESH_WINDOW_SECONDS=30",
        "MAX_CONNECTIONS_PER_MESH=100",
        "MAX_CONNECTIONS=50000",
        "MAX_MESSAGE_BYTES=2048",
        "HOOK_RATE_LIMIT_PER_MIN=7",
        "NODE_ENV=test",
        "GIT_SHA=cafe123",
        "HELD_TTL_SECONDS=604800",
        "SESSION_GRACE_SECONDS=0",
        "SEND_RATE_PER_MIN=6000",
        "SEND_BURST=200",
        "CLIENT_ACK_TIMEOUT_SECONDS=30",
        "DEDUPE_WINDOW_SECONDS=0",
        "CLIENT_ACK_MAX_LEASES=16",
        "CLIENT_ACK_MAX_LEASE_BYTES=16777216",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line:?} missing from:\n{stdout}"
        );
    }
    assert!(stdout
        .lines()
        .any(|l| l.starts_with("CLAUDE_PROJECTS_DIR=")));
    assert!(!stdout.contains("hunter2"), "password printed:\n{stdout}");

    let (status, stdout, stderr) =
        run_broker_capture(&["--check-config"], &[("BROKER_SHARDS", "zero")]);
    assert_eq!(
        status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("BROKER_SHARDS") && stderr.contains("zero"),
        "{stderr}"
    );
}

/// Index of the first JSON log line whose msg is `msg`.
fn log_index(broker: &Broker, msg: &str) -> Option<usize> {
    broker.logs().iter().position(|l| l["msg"] == msg)
}

#[test]
fn sigterm_closes_websockets_with_1001_and_exits_0() {
    let mut broker = Broker::start(&[]);
    let mut clients: Vec<_> = (0..3)
        .map(|_| {
            let stream = std::net::TcpStream::connect(broker.addr()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let (ws, response) = tungstenite::client(broker.ws_url(), stream).expect("ws connect");
            assert_eq!(response.status(), 101);
            ws
        })
        .collect();
    // A client that never answers the close, an idle keep-alive HTTP
    // connection and one stuck halfway through a request head must not
    // keep the broker from exiting.
    let mut silent = common::RawWs::connect(broker.addr());
    let mut idle = std::net::TcpStream::connect(broker.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let reply = common::http_on(&mut idle, "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200);
    let mut partial = std::net::TcpStream::connect(broker.addr()).unwrap();
    partial
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Every connection is a live session before the signal.
    common::poll_until(Duration::from_secs(10), "4 active connections", || {
        let samples = broker.scrape();
        (common::metric(&samples, "broker_connections_active", &[]) == Some(4.0)).then_some(())
    });

    broker.sigterm();
    for (i, ws) in clients.iter_mut().enumerate() {
        let code = loop {
            match ws.read() {
                Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("client {i}: no close frame, got {e}"),
            }
        };
        assert_eq!(code, Some(1001), "client {i}");
        // Complete the handshake (tungstenite sends our close reply).
        let _ = ws.flush();
    }
    assert_eq!(silent.read_close_code(), Some(1001), "silent client");
    let status = broker
        .wait_exit(Duration::from_secs(20))
        .expect("broker exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", broker.stderr_text());
    assert!(silent.wait_eof(), "silent client not disconnected");
    let signal = log_index(&broker, "shutdown signal").expect("a shutdown signal line");
    let complete = log_index(&broker, "shutdown complete").expect("a shutdown complete line");
    assert!(signal < complete, "{}", broker.stderr_text());
}

#[test]
fn sigint_exits_0() {
    let mut broker = Broker::start(&[]);
    // The effective configuration, defaults included, is in the listening line.
    let listening = broker.wait_for_log("broker listening", Duration::from_secs(1));
    let config = listening["config"].as_str().unwrap_or_default();
    for default in [
        "STATUS_TTL_SECONDS=60",
        "HOOK_FRESH_WINDOW_SECONDS=30",
        "MAX_CONNECTIONS_PER_MESH=100",
        "MAX_MESSAGE_BYTES=65536",
        "HOOK_RATE_LIMIT_PER_MIN=30",
        "HELD_TTL_SECONDS=604800",
        "SESSION_GRACE_SECONDS=90",
        "SEND_RATE_PER_MIN=6000",
        "SEND_BURST=200",
        "CLIENT_ACK_TIMEOUT_SECONDS=30",
        "DEDUPE_WINDOW_SECONDS=600",
        "CLIENT_ACK_MAX_LEASES=4096",
        "CLIENT_ACK_MAX_LEASE_BYTES=16777216",
    ] {
        assert!(config.contains(default), "{default} not in {listening}");
    }
    broker.wait_health(200);
    broker.sigint();
    let status = broker
        .wait_exit(Duration::from_secs(15))
        .expect("broker exits after SIGINT");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", broker.stderr_text());
    assert!(log_index(&broker, "shutdown complete").is_some());
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn embedded_postgres_without_database_url() {
    let mut broker = Broker::start(&[("DATABASE_URL", "")]);
    let db_line = broker.wait_for_log("database", Duration::from_secs(5));
    assert_eq!(db_line["mode"], "embedded", "{db_line}");
    let data_dir = broker.workdir().join("data");
    let body = broker.wait_health(200);
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["db"], "up", "{body}");
    assert!(
        !processes_mentioning(&data_dir).is_empty(),
        "no postgres process for {} while the broker runs",
        data_dir.display()
    );

    broker.sigterm();
    let status = broker
        .wait_exit(Duration::from_secs(20))
        .expect("broker exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "stderr:\n{}", broker.stderr_text());
    // pg_ctl stop -w waits for the postmaster; its children go with it.
    common::poll_until(Duration::from_secs(10), "postgres to be gone", || {
        processes_mentioning(&data_dir).is_empty().then_some(())
    });
}

#[test]
fn health_follows_a_postgres_outage_without_restart() {
    let root = common::world_traversable_tempdir("meshbroker-test-outage-");
    let pg = LocalPostgres::start(&root.join("data"), true).expect("start a private Postgres");
    pg.create_database("outage").expect("create database");
    // Trust auth ignores the password; it must never reach the log.
    let url = pg.url("outage").replace("postgres@", "postgres:sekret-pw@");
    let mut broker = Broker::start(&[("DATABASE_URL", &url), ("GIT_SHA", "feedbee")]);
    let db_line = broker.wait_for_log("database", Duration::from_secs(5));
    assert_eq!(db_line["mode"], "external", "{db_line}");

    let body = broker.wait_health(200);
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["db"], "up", "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert_eq!(body["gitSha"], "feedbee", "{body}");
    assert!(body["uptime"].is_u64(), "{body}");
    let healthy = || common::metric(&broker.scrape(), "broker_db_healthy", &[]);
    assert_eq!(healthy(), Some(1.0));

    pg.stop().expect("stop Postgres");
    let body = broker.wait_health(503);
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["db"], "down", "{body}");
    assert_eq!(healthy(), Some(0.0));
    let reply = http(broker.addr(), "GET", "/health", &[], b"");
    assert_eq!(reply.header("Access-Control-Allow-Origin"), Some("*"));

    pg.restart().expect("start Postgres again");
    let body = broker.wait_health(200);
    assert_eq!(body["db"], "up", "{body}");
    assert_eq!(healthy(), Some(1.0));
    // The log tells the story: healthy, a db warning, healthy again.
    let (logs, healthy_at) =
        common::poll_until(Duration::from_secs(10), "2 db healthy lines", || {
            let logs = broker.logs();
            let healthy_at: Vec<usize> = logs
                .iter()
                .enumerate()
                .filter(|(_, l)| l["msg"] == "db healthy")
                .map(|(i, _)| i)
                .collect();
            (healthy_at.len() >= 2).then_some((logs, healthy_at))
        });
    assert!(
        logs[healthy_at[0]..]
            .iter()
            .any(|l| l["component"] == "db" && l["level"] == "warn"),
        "no db warning during the outage:\n{}",
        broker.stderr_text()
    );
    assert!(
        broker.wait_exit(Duration::ZERO).is_none(),
        "the broker exited during the outage:\n{}",
        broker.stderr_text()
    );

    broker.sigterm();
    assert_eq!(
        broker
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(
        !broker.stderr_text().contains("sekret-pw"),
        "password logged:\n{}",
        broker.stderr_text()
    );
    drop(broker);
    drop(pg);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_port_in_use_is_a_startup_error() {
    let first = Broker::start(&[]);
    let port = first.port().to_string();
    let (status, stderr) = run_broker_expect_exit(&[
        ("BROKER_PORT", &port),
        ("DATABASE_URL", &common::fresh_database()),
    ]);
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.to_ascii_lowercase().contains("in use"),
        "should say the address is in use:\n{stderr}"
    );
    // The first broker still serves.
    assert_eq!(
        http(first.addr(), "OPTIONS", "/health", &[], b"").status,
        204
    );
    drop(first);

    // A fixed, free port works (all shards share it).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let fixed = Broker::start(&[("BROKER_PORT", &port)]);
    assert_eq!(fixed.port().to_string(), port);
    assert_eq!(
        http(fixed.addr(), "OPTIONS", "/health", &[], b"").status,
        204
    );
}
