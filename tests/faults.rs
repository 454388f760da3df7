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
use support::{
    assert_push, hello, seed_mesh, start, Event, Peer, TestBroker, UNLIMITED_SENDS, WAIT,
};

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
    out_of_file_descriptors("auto");
}

/// The epoll driver accepts on readiness rather than with an io_uring op:
/// the same behaviour is asked of it.
#[test]
fn out_of_file_descriptors_on_the_epoll_driver() {
    out_of_file_descriptors("epoll");
}

fn out_of_file_descriptors(driver: &str) {
    let db = fresh_database();
    let mut broker =
        Broker::start_with_nofile(&[("DATABASE_URL", &db), ("BROKER_IO_DRIVER", driver)], 128);
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
    // A line per episode per shard (2 shards), not one per failure: an
    // episode ends only at a success a quiet second after its last
    // failure, which at the limit only descriptors freed for a moment by
    // the other shard's spare allow.
    let failed = count_logs(&broker, "accept failed");
    assert!(
        (1..=4).contains(&failed) && (failed as f64) < errors,
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
        broker.wait_exit(Duration::ZERO).is_none(),
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
    let tb = TestBroker::single(second, db.clone());
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

// ------------------------------------------------ slow reader, broadcast

/// A session with a tiny kernel receive buffer that stops reading after
/// its hello.
fn never_reading(broker: &Broker, member: &support::Member) -> Peer {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&broker.addr().into()).unwrap();
    let mut peer = Peer::over(broker, TcpStream::from(socket));
    assert_eq!(peer.hello(member)["type"], "hello_ack");
    peer
}

/// Reads pushes on its own thread until `done` was set before a read that
/// then timed out; returns their message ids in arrival order.
fn collect_pushes(
    mut peer: Peer,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut ids = Vec::new();
        loop {
            let was_done = done.load(std::sync::atomic::Ordering::SeqCst);
            match peer.next_event(Duration::from_millis(500)) {
                Some(Event::Json(v)) if v["type"] == "push" => {
                    ids.push(v["messageId"].as_str().unwrap_or_default().to_owned())
                }
                Some(other) => panic!(
                    "a healthy subscriber got {other:?} after {} pushes",
                    ids.len()
                ),
                None if was_done => return ids,
                None => {}
            }
        }
    })
}

#[test]
fn a_slow_reader_mid_broadcast_is_cut_with_1013_and_the_others_miss_nothing() {
    let mut env = UNLIMITED_SENDS.to_vec();
    // 1 MiB: 256 pushes of slack for the readers, on a box whose cores
    // the test's own threads share with the broker.
    env.push(("MAX_OUTBOUND_BYTES", "1048576"));
    let broker = start(&env);
    // Member 0 broadcasts, member 1 stops reading, the rest read.
    let members = seed_mesh(&broker.db, "bcast", 6);
    let mut sender = Peer::connect(&broker, &members[0]);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = members[2..]
        .iter()
        .map(|m| collect_pushes(Peer::connect(&broker, m), done.clone()))
        .collect();
    let mut slow = never_reading(&broker, &members[1]);

    let ct = "x".repeat(4096);
    let mut acked = Vec::new();
    let mut after_cut = None;
    for i in 0..8000 {
        let ack = sender.send("*", "now", "n", &ct, &format!("b{i}"));
        acked.push(ack["messageId"].as_str().unwrap().to_owned());
        // The cut session's close waits for it to read, so the sign of the
        // cut is its member holding what it can no longer take.
        if after_cut.is_none() && i % 32 == 0 && broker.metric("broker_queue_depth") > 0.0 {
            after_cut = Some(i + 64);
        }
        if after_cut == Some(i) {
            break;
        }
    }
    assert!(
        after_cut.is_some(),
        "the slow reader was never cut off after {} broadcasts",
        acked.len()
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);

    // Every other subscriber got every broadcast, in the sender's order,
    // none lost or duplicated.
    for (i, reader) in readers.into_iter().enumerate() {
        let ids = reader.join().expect("reader thread");
        assert_eq!(ids.len(), acked.len(), "subscriber {i}: push count");
        assert!(ids == acked, "subscriber {i}: pushes out of order");
    }

    // The stalled client, reading again, finds a prefix of the broadcasts
    // and then the close frame 1013: the broker queued it behind what the
    // kernel buffers held, and the socket stayed open for it.
    let mut got = Vec::new();
    let end = loop {
        match slow.next_event(WAIT) {
            Some(Event::Json(v)) if v["type"] == "push" => {
                got.push(v["messageId"].as_str().unwrap_or_default().to_owned())
            }
            Some(other) => break other,
            None => panic!("the slow reader's connection was left open"),
        }
    };
    assert!(
        matches!(end, Event::Close(Some(1013))),
        "after {} pushes: {end:?}",
        got.len()
    );
    assert!(got.len() < acked.len(), "it was cut, not served everything");
    assert_eq!(got[..], acked[..got.len()], "its pushes are in order");
    broker.wait_metric(
        "broker_connections_closed_total{reason=\"slow_reader\"}",
        |v| v >= 1.0,
    );
}

// --------------------------------------------------------- reconnect storm

/// What one storm client's hello got.
#[derive(Debug, Clone, PartialEq)]
enum HelloOutcome {
    Ack,
    /// `error capacity`, then the close code.
    Capacity(Option<u16>),
    Other(String),
}

/// Writes all of `bytes` on a non-blocking tokio socket.
async fn write_all(stream: &tokio::net::TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads more bytes into `buf`; false at EOF.
async fn read_more(stream: &tokio::net::TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The next server frame that is not a ping.
async fn next_frame(
    stream: &tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Result<common::ServerFrame, String> {
    loop {
        if let Some((frame, used)) = common::parse_server_frame(buf) {
            buf.drain(..used);
            if frame.opcode == 0x9 {
                continue;
            }
            return Ok(frame);
        }
        if !read_more(stream, buf).await.map_err(|e| e.to_string())? {
            return Err("EOF".into());
        }
    }
}

/// Connects, upgrades and says `hello` in one write, and reads the answer.
async fn storm_hello(
    addr: std::net::SocketAddr,
    hello: &str,
) -> (Option<tokio::net::TcpStream>, HelloOutcome) {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut bytes = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            common::WS_KEY
        )
        .into_bytes();
        bytes.extend(meshbroker::ws::encode_client_frame(
            meshbroker::ws::OpCode::Text,
            hello.as_bytes(),
            rand::random(),
            true,
        ));
        write_all(&stream, &bytes)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&stream, &mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?
            {
                return Err("EOF before the handshake answer".to_owned());
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101 ") {
            return Err(format!(
                "handshake: {:?}",
                String::from_utf8_lossy(&buf[..head_end])
            ));
        }
        buf.drain(..head_end);
        let frame = next_frame(&stream, &mut buf).await?;
        let answer: serde_json::Value = serde_json::from_slice(&frame.payload)
            .map_err(|e| format!("{e}: {:?}", frame.text()))?;
        if answer["type"] == "hello_ack" {
            return Ok((stream, HelloOutcome::Ack));
        }
        if answer["type"] == "error" && answer["code"] == "capacity" {
            // Capacity and nothing else: the next frame is the close.
            let close = next_frame(&stream, &mut buf).await?;
            if !close.is_close() {
                return Err(format!("after capacity: {close:?}"));
            }
            return Ok((stream, HelloOutcome::Capacity(close.close_code())));
        }
        Err(format!("answer: {answer}"))
    };
    match tokio::time::timeout(Duration::from_secs(45), attempt).await {
        Ok(Ok((stream, HelloOutcome::Ack))) => (Some(stream), HelloOutcome::Ack),
        Ok(Ok((_, outcome))) => (None, outcome),
        Ok(Err(e)) => (None, HelloOutcome::Other(e)),
        Err(_) => (None, HelloOutcome::Other("no answer within 45 s".into())),
    }
}

/// One round on one storm thread: every client connects at once and says
/// hello; returns the outcomes and the sockets of the admitted.
fn storm_round(
    addr: std::net::SocketAddr,
    hellos: &[String],
) -> (Vec<HelloOutcome>, Vec<TcpStream>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = hellos
            .iter()
            .map(|h| {
                let h = h.clone();
                tokio::spawn(async move { storm_hello(addr, &h).await })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(tasks.len());
        let mut streams = Vec::new();
        for task in tasks {
            let (stream, outcome) = task.await.expect("storm task");
            outcomes.push(outcome);
            streams.extend(stream);
        }
        // The sockets outlive this runtime as plain std sockets.
        let streams = streams
            .into_iter()
            .map(|s| s.into_std().expect("deregister a socket"))
            .collect();
        (outcomes, streams)
    })
}

/// The signed hellos of `members` (fresh timestamps), as JSON text, with a
/// fixed session id per member so that a reconnect resumes its session.
fn storm_hellos(members: &[support::Member]) -> Vec<String> {
    members
        .iter()
        .map(|m| {
            let mut h = hello(m);
            h["sessionId"] = format!("storm-{}", m.id).into();
            h.to_string()
        })
        .collect()
}

#[test]
fn a_reconnect_storm_of_5000_clients_is_admitted_twice_and_the_broker_stays_healthy() {
    const THREADS: usize = 4;
    const MESHES: usize = 49;
    const PER_MESH: usize = 100;
    // One more mesh 10 over its capacity (MAX_CONNECTIONS_PER_MESH 100).
    const OVER: usize = 110;
    let broker = start(&[]);
    let started = Instant::now();
    let mut members = Vec::new();
    for m in 0..MESHES {
        members.extend(seed_mesh(&broker.db, &format!("storm{m}"), PER_MESH));
    }
    let over = seed_mesh(&broker.db, "storm-over", OVER);
    members.extend(over.iter().cloned());
    let addr = broker.addr();
    let chunk = members.len().div_ceil(THREADS);
    eprintln!(
        "{} members seeded in {:?}",
        members.len(),
        started.elapsed()
    );

    let run_round = |members: &[support::Member]| {
        let t = Instant::now();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .chunks(chunk)
                .map(|part| s.spawn(move || storm_round(addr, &storm_hellos(part))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut outcomes = Vec::new();
        let mut streams = Vec::new();
        for (o, s) in results {
            outcomes.extend(o);
            streams.extend(s);
        }
        eprintln!("{} hellos answered in {:?}", outcomes.len(), t.elapsed());
        (outcomes, streams)
    };
    let active = |n: usize| broker.wait_metric("broker_connections_active", |v| v == n as f64);

    // Round 1: everyone at once. The over-full mesh admits exactly 100.
    let (first, streams) = run_round(&members);
    let regular = MESHES * PER_MESH;
    for (i, outcome) in first[..regular].iter().enumerate() {
        assert_eq!(*outcome, HelloOutcome::Ack, "client {i}");
    }
    let over_acked: Vec<bool> = first[regular..]
        .iter()
        .map(|o| match o {
            HelloOutcome::Ack => true,
            HelloOutcome::Capacity(code) => {
                assert_eq!(*code, Some(1008), "capacity closes 1008");
                false
            }
            HelloOutcome::Other(e) => panic!("over-full mesh: {e}"),
        })
        .collect();
    assert_eq!(over_acked.iter().filter(|a| **a).count(), PER_MESH);
    active(regular + PER_MESH);

    // Everyone drops at once without a close frame (a reset), and
    // reconnects at once with the same session.
    for s in &streams {
        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    }
    drop(streams);
    let (second, streams) = run_round(&members);
    for (i, outcome) in second[..regular].iter().enumerate() {
        assert_eq!(*outcome, HelloOutcome::Ack, "reconnect {i}");
    }
    // Those admitted before resume their sessions; the others still find
    // the mesh full, and get capacity and nothing else.
    for (i, (outcome, acked)) in second[regular..].iter().zip(&over_acked).enumerate() {
        let want = if *acked {
            HelloOutcome::Ack
        } else {
            HelloOutcome::Capacity(Some(1008))
        };
        assert_eq!(*outcome, want, "over-full mesh reconnect {i}");
    }
    active(regular + PER_MESH);

    // Healthy afterwards: a send routes, /health is ok, and the count goes
    // back down when the storm's sockets close.
    let probe = seed_mesh(&broker.db, "storm-probe", 2);
    let mut a = Peer::connect(&broker, &probe[0]);
    let mut b = Peer::connect(&broker, &probe[1]);
    let ack = a.send(&probe[1].pubkey, "now", "n", "after the storm", "s1");
    assert_push(
        &b.recv_push(WAIT),
        &ack,
        &probe[0],
        "now",
        "n",
        "after the storm",
    );
    assert_eq!(broker.wait_health(200)["status"], "ok");
    drop(streams);
    active(2);
    eprintln!("storm test took {:?}", started.elapsed());
}
