//! Faults, end to end with real sockets and a real Postgres: the
//! connection limit, a reconnect storm, a slow reader in a broadcast,
//! Postgres missing at start, running out of file descriptors, and a shard
//! panic with a held envelope outstanding.

mod common;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{fresh_database, http, http_on, metric, parse_metrics, poll_until, Broker};
use meshbroker::devdb::LocalPostgres;
use support::{assert_push, hello, seed_mesh, start, Peer, TestBroker, WAIT};

/// `/metrics` over an already open keep-alive connection: at a connection
/// limit a fresh one would be refused.
fn scrape_on(conn: &mut TcpStream) -> Vec<common::Sample> {
    let reply = http_on(conn, "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200, "/metrics: {}", reply.text());
    parse_metrics(&reply.text())
}

/// A keep-alive HTTP connection that has been served once.
fn served_http_conn(broker: &Broker) -> TcpStream {
    let mut conn = TcpStream::connect(broker.addr()).expect("connect");
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let reply = http_on(&mut conn, "GET", "/health/live", &[], b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    conn
}

/// What the broker did with a fresh socket that says nothing: `Ok(0)` is
/// an orderly close (EOF), `Err` a reset or the read timing out.
fn read_unsent(broker: &Broker, timeout: Duration) -> std::io::Result<usize> {
    let mut conn = TcpStream::connect(broker.addr())?;
    conn.set_read_timeout(Some(timeout))?;
    conn.read(&mut [0u8; 64])
}

fn count_logs(broker: &Broker, msg: &str) -> usize {
    broker.logs().iter().filter(|l| l["msg"] == msg).count()
}

// ------------------------------------------------------- MAX_CONNECTIONS

#[test]
fn over_max_connections_a_socket_is_closed_unread_and_counted() {
    let broker = start(&[("MAX_CONNECTIONS", "3")]);
    let members = seed_mesh(&broker.db, "maxconn", 2);
    // Three sockets hold the three slots: an HTTP keep-alive connection
    // (kept for scraping) and two sessions.
    let mut scrape = served_http_conn(&broker);
    let mut a = Peer::connect(&broker, &members[0]);
    let b = Peer::connect(&broker, &members[1]);

    // The fourth is closed at once, before anything is read from it.
    let got = read_unsent(&broker, WAIT);
    assert!(matches!(got, Ok(0)), "the 4th socket: {got:?}, want EOF");
    let rejected = |s: &[common::Sample]| {
        metric(
            s,
            "broker_connections_rejected_total",
            &[("reason", "max_connections")],
        )
    };
    assert_eq!(rejected(&scrape_on(&mut scrape)), Some(1.0));
    assert!(count_logs(&broker, "connection limit reached") >= 1);

    // The sockets already served are untouched by the refusal.
    let ack = a.send(&members[1].pubkey, "now", "n", "c", "s1");
    let mut b = b;
    assert_push(&b.recv_push(WAIT), &ack, &members[0], "now", "n", "c");

    // Closing one frees its slot: a new connection is served and says hello.
    b.close();
    let mut again = poll_until(WAIT, "a freed slot", || Peer::try_open(&broker).ok());
    assert_eq!(again.hello(&members[1])["type"], "hello_ack");
    let ack = a.send(&members[1].pubkey, "now", "n", "c2", "s2");
    assert_push(&again.recv_push(WAIT), &ack, &members[0], "now", "n", "c2");
    // The other counts are the existing reasons', untouched.
    let samples = scrape_on(&mut scrape);
    assert!(rejected(&samples).is_some_and(|n| n >= 1.0));
    for reason in ["capacity", "unauthorized"] {
        assert_eq!(
            metric(
                &samples,
                "broker_connections_rejected_total",
                &[("reason", reason)]
            ),
            Some(0.0),
            "{reason}"
        );
    }
}

// ------------------------------------------------- Postgres down at start

#[test]
fn the_broker_starts_without_postgres_and_catches_up_when_it_comes() {
    // A cluster made and stopped: its port has nothing listening, and the
    // same cluster comes back on that port later.
    let root = common::world_traversable_tempdir("meshbroker-test-late-pg-");
    let pg = LocalPostgres::start(&root.join("data"), true).expect("start a private Postgres");
    pg.create_database("late").expect("create database");
    let url = pg.url("late");
    pg.stop().expect("stop Postgres");
    assert!(!common::can_connect(&url), "Postgres still answers");

    let broker = Broker::start(&[("DATABASE_URL", &url)]);
    // Listening, alive, not ready.
    let body = broker.wait_health(503);
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["db"], "down", "{body}");
    let live = http(broker.addr(), "GET", "/health/live", &[], b"");
    assert_eq!(live.status, 200, "{}", live.text());
    broker.wait_for_log("db connect failed", WAIT);

    // A hello before the database is up cannot be checked against
    // `mesh.member`: it is answered `unavailable` and closed 1011.
    let key = support::new_key();
    let stranger = support::Member {
        mesh_id: "late-mesh".into(),
        id: "late-mesh-m0".into(),
        pubkey: support::pubkey_hex(&key),
        key,
    };
    let mut early = Peer::open(&broker);
    let answer = early.request(&hello(&stranger));
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    early.expect_close(1011);

    // Postgres arrives on the same port: migrations run, /health turns 200,
    // and the broker routes, all without a restart.
    pg.restart().expect("start Postgres");
    let body = broker.wait_health(200);
    assert_eq!(body["db"], "up", "{body}");
    // The database was empty: the broker's own tables are its migrations'.
    let applied = common::query_rows(&url, "SELECT count(*) FROM mesh.broker_schema_migrations");
    assert!(applied[0].get::<_, i64>(0) > 0, "no migration recorded");
    let members = seed_mesh(&url, "late", 2);
    let mut a = Peer::connect(&broker, &members[0]);
    let mut b = Peer::connect(&broker, &members[1]);
    let ack = a.send(&members[1].pubkey, "now", "n", "after", "s1");
    assert_push(&b.recv_push(WAIT), &ack, &members[0], "now", "n", "after");
    drop((a, b, broker));
    drop(pg);
    let _ = std::fs::remove_dir_all(&root);
}

// ------------------------------------------------ file descriptors run out

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the parenthesised command: state is the first, utime
    // and stime the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("a comm field") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// The broker's `shard::accept::QUIET`, plus a margin.
fn accept_quiet() -> Duration {
    Duration::from_millis(1200)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends a request on a fresh socket: `Some(true)` served, `Some(false)`
/// closed or reset without an answer, `None` no answer before the timeout.
fn served(broker: &Broker) -> (TcpStream, Option<bool>) {
    let mut conn = TcpStream::connect(broker.addr()).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = conn.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 512];
    let outcome = match conn.read(&mut buf) {
        Ok(n) if n > 0 => Some(buf.starts_with(b"HTTP/1.1 200")),
        Ok(_) => Some(false),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(false),
    };
    (conn, outcome)
}

#[test]
fn out_of_file_descriptors_the_broker_sheds_new_sockets_without_spinning() {
    let db = fresh_database();
    let broker = Broker::start_with_nofile(&[("DATABASE_URL", &db)], 128);
    broker.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "fds", 2);
    let pid = broker.pid();
    let mut scrape = served_http_conn(&broker);
    let baseline = open_fds(pid);

    // Fill the descriptor table with served keep-alive connections until
    // the broker refuses one.
    let mut held = Vec::new();
    let outcome = loop {
        assert!(held.len() < 200, "never refused ({baseline} fds at start)");
        match served(&broker) {
            (conn, Some(true)) => held.push(conn),
            (_, outcome) => break outcome,
        }
    };
    eprintln!(
        "{} connections served, broker fds {baseline} → {}",
        held.len(),
        open_fds(pid)
    );
    // Shed with the spare descriptor: closed at once, not left hanging in
    // the listen backlog.
    assert_eq!(outcome, Some(false), "the refused socket was left hanging");

    // At the limit, with new sockets arriving, the broker does not spin.
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let mut refused = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        let (_, outcome) = served(&broker);
        refused += usize::from(outcome != Some(true));
        std::thread::sleep(Duration::from_millis(100));
    }
    let busy = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    eprintln!("at the limit: {refused} refused, broker CPU {busy:.3} of a core");
    assert!(refused > 0, "every socket was served at the limit");
    assert!(
        busy < 0.5,
        "the broker spun at the limit: {busy:.3} of a core"
    );
    let samples = scrape_on(&mut scrape);
    let errors = metric(&samples, "broker_accept_errors_total", &[]).unwrap_or(0.0);
    assert!(errors >= 1.0, "accept errors not counted");
    // One line per episode per shard (2 shards), not one per failure.
    let failed = count_logs(&broker, "accept failed");
    assert!(
        (1..=2).contains(&failed),
        "{failed} accept failed lines for {errors} errors"
    );

    // Freeing descriptors makes the broker whole again: new sockets, hellos
    // and sends work.
    held.truncate(held.len().saturating_sub(10));
    let mut a = poll_until(WAIT, "a socket served again", || {
        Peer::try_open(&broker).ok()
    });
    assert_eq!(a.hello(&members[0])["type"], "hello_ack");
    let mut b = Peer::connect(&broker, &members[1]);
    let ack = a.send(&members[1].pubkey, "now", "n", "c", "s1");
    assert_push(&b.recv_push(WAIT), &ack, &members[0], "now", "n", "c");
    // The episode ends with a success after a quiet second.
    std::thread::sleep(accept_quiet());
    drop(served(&broker));
    drop(served(&broker));
    broker.wait_for_log("accept recovered", WAIT);
    assert!(
        broker.broker_alive(),
        "the broker exited:\n{}",
        broker.stderr_text()
    );
}

// ------------------------------------------------------------ shard panic

#[test]
fn an_envelope_held_before_a_shard_panic_is_delivered_once_after_restart() {
    let db = fresh_database();
    let mut first = Broker::start(&[
        ("DATABASE_URL", &db),
        ("BROKER_FAULT_PANIC_SESSION_ID", "boom"),
    ]);
    first.wait_for_log("db healthy", Duration::from_secs(30));
    let members = seed_mesh(&db, "crash", 2);
    let mut sender = Peer::connect(&first, &members[0]);
    // The target is offline: the ack means it is committed to Postgres.
    let ack = sender.send(&members[1].pubkey, "next", "n", "held", "h1");
    assert_ne!(ack["durable"], false, "{ack}");

    let mut bomb = Peer::open(&first);
    let mut boom = hello(&members[0]);
    boom["sessionId"] = "boom".into();
    bomb.send_json(&boom);
    let status = first
        .wait_exit(Duration::from_secs(20))
        .expect("the broker exits after a shard panic");
    assert!(!status.success(), "exit status {status:?}");
    let logs = first.logs();
    assert!(
        logs.iter().any(|l| l["msg"] == "panic"
            && l["thread"]
                .as_str()
                .is_some_and(|t| t.starts_with("shard-"))),
        "no panic line:\n{}",
        first.stderr_text()
    );
    assert!(logs
        .iter()
        .any(|l| l["msg"] == "shard panicked: stopping the broker"));
    drop((sender, bomb, first));

    // A restart on the same database delivers it to its member, once.
    let second = Broker::start(&[("DATABASE_URL", &db)]);
    second.wait_for_log("db healthy", Duration::from_secs(30));
    let mut target = Peer::connect(&second, &members[1]);
    let push = target.recv_push(WAIT);
    assert_push(&push, &ack, &members[0], "next", "n", "held");
    target.expect_nothing(Duration::from_secs(1));
    let tb = TestBroker {
        broker: second,
        db: db.clone(),
    };
    tb.wait_metric("broker_queue_depth", |v| v == 0.0);
    // Marked delivered: a later session of the member does not get it again.
    target.close();
    support::poll(WAIT, || {
        common::query_rows(
            &db,
            "SELECT 1 FROM mesh.message_queue WHERE delivered_at IS NULL",
        )
        .is_empty()
    });
    let mut later = Peer::connect(&tb, &members[1]);
    later.expect_nothing(Duration::from_secs(1));
}

// ---------------------------------------------------------------- helpers

trait Alive {
    fn broker_alive(&self) -> bool;
}

impl Alive for Broker {
    /// Still running (the pid has not exited).
    fn broker_alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}/stat", self.pid())).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .unwrap_or_default()
                .contains(") Z ")
    }
}
