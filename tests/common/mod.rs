//! Shared integration-test harness: one throwaway Postgres per test process,
//! a fresh database per test, the broker binary as a child process whose
//! JSON log lines are collected, and small blocking HTTP/SQL clients.
//!
//! Each test file does `mod common;` and uses its own subset, hence the
//! blanket `dead_code` allowance.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use meshbroker::devdb::LocalPostgres;

/// Every configuration variable of PROTOCOL.md §3 (plus ours): cleared
/// from the broker's environment so a developer's shell cannot leak in.
const CONFIG_VARS: &[&str] = &[
    "DATABASE_URL",
    "NATS_URL",
    "NODE_ID",
    "CLUSTER_CONFIRM_TIMEOUT_MS",
    "NODE_DEAD_AFTER_MS",
    "BROKER_PORT",
    "BROKER_HOST",
    "BROKER_SHARDS",
    "STATUS_TTL_SECONDS",
    "HOOK_FRESH_WINDOW_SECONDS",
    "MAX_CONNECTIONS_PER_MESH",
    "MAX_CONNECTIONS",
    "MAX_MESSAGE_BYTES",
    "HOOK_RATE_LIMIT_PER_MIN",
    "SESSION_GRACE_SECONDS",
    "SEND_RATE_PER_MIN",
    "SEND_BURST",
    "CLIENT_ACK_TIMEOUT_SECONDS",
    "DEDUPE_WINDOW_SECONDS",
    "JOIN_RATE_LIMIT_PER_MIN",
    "CLIENT_ACK_MAX_LEASES",
    "CLIENT_ACK_MAX_LEASE_BYTES",
    "NODE_ENV",
    "GIT_SHA",
    "CLAUDE_PROJECTS_DIR",
    "HELD_TTL_SECONDS",
    "MESHBROKER_DATA_DIR",
    "LOG_LEVEL",
    "MAX_OUTBOUND_BYTES",
    "MEMBER_REFRESH_SECONDS",
    "BROKER_IO_DRIVER",
    "MAX_HELD_PER_MEMBER",
    "MAX_HELD_MEMORY_BYTES",
    "MAX_HELD_BYTES_PER_MEMBER",
    "HELLO_TIMEOUT_SECONDS",
    "HTTP_IDLE_TIMEOUT_SECONDS",
    "RATE_LIMIT_CLOSE_AFTER",
    "HELD_BATCH_MAX_ROWS",
    "HELD_BATCH_MAX_WAIT_US",
    "HELD_WRITER_CONNECTIONS",
    "AUDIT_BATCH_MAX_ROWS",
    "AUDIT_BATCH_MAX_WAIT_US",
    "AUDIT_BUFFER_EVENTS",
    "AUDIT_EVENTS",
    "BROKER_PING_INTERVAL_MS",
    "BROKER_PING_TIMEOUT_MS",
    "BROKER_SWEEP_INTERVAL_MS",
    "BROKER_FAULT_PANIC_SESSION_ID",
];

const START_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- Postgres

struct SharedPg {
    pg: LocalPostgres,
    /// The tempdir holding the cluster, removed at exit.
    root: PathBuf,
}

static PG: OnceLock<SharedPg> = OnceLock::new();

/// Statics never drop: stop the cluster when the test binary exits.
extern "C" fn stop_shared_pg() {
    if let Some(shared) = PG.get() {
        let _ = shared.pg.stop();
        let _ = std::fs::remove_dir_all(&shared.root);
    }
}

/// A directory under /tmp that the `postgres` OS user can traverse (the
/// server runs as that user when the tests run as root). Not removed on
/// drop: callers decide.
pub fn world_traversable_tempdir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create tempdir under /tmp")
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir 0755");
    dir
}

/// The one throwaway cluster of this test process (fast mode), started on
/// first use and stopped at exit.
pub fn pg() -> &'static LocalPostgres {
    &PG.get_or_init(|| {
        let root = world_traversable_tempdir("meshbroker-test-pg-");
        let pg = LocalPostgres::start(&root.join("data"), true)
            .unwrap_or_else(|e| panic!("start the test Postgres: {e}"));
        // SAFETY: registering a plain extern "C" fn with no arguments.
        unsafe {
            libc::atexit(stop_shared_pg);
        }
        SharedPg { pg, root }
    })
    .pg
}

/// Creates `test_<pid>_<n>` in the shared cluster and returns its URL.
pub fn fresh_database() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let pg = pg();
    pg.create_database(&name)
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    pg.url(&name)
}

/// Runs `sql` on a fresh current-thread runtime and returns the rows.
pub fn query_rows(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    block_on(async { connect(url).await?.query(sql, &[]).await })
        .unwrap_or_else(|e| panic!("query {sql:?} on {url}: {e}"))
}

/// Runs a batch of statements (fixtures, setup) and panics on error.
pub fn exec_sql(url: &str, sql: &str) {
    block_on(async { connect(url).await?.batch_execute(sql).await })
        .unwrap_or_else(|e| panic!("execute {sql:?} on {url}: {e}"))
}

/// Whether a connection to `url` can be made and answer `SELECT 1`.
pub fn can_connect(url: &str) -> bool {
    block_on(async { connect(url).await?.simple_query("SELECT 1").await }).is_ok()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
        .block_on(f)
}

/// Connects and drives the connection on the current runtime (the task
/// ends when the runtime is dropped).
async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

// ------------------------------------------------------------------ Broker

#[derive(Default)]
struct LogState {
    /// Every stderr line, JSON or not, in order.
    raw: Vec<String>,
    /// The lines that parsed as JSON objects.
    json: Vec<serde_json::Value>,
    eof: bool,
}

type SharedLog = Arc<(Mutex<LogState>, Condvar)>;

fn spawn_stderr_reader(stderr: impl Read + Send + 'static) -> SharedLog {
    let log: SharedLog = Arc::default();
    let sink = log.clone();
    std::thread::Builder::new()
        .name("broker-stderr".into())
        .spawn(move || {
            let reader = BufReader::new(stderr);
            for line in reader.split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                let (lock, cv) = &*sink;
                let mut st = lock.lock().unwrap();
                if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(&line) {
                    st.json.push(v);
                }
                st.raw.push(line);
                cv.notify_all();
            }
            let (lock, cv) = &*sink;
            lock.lock().unwrap().eof = true;
            cv.notify_all();
        })
        .expect("spawn stderr reader");
    log
}

/// A running broker child process.
pub struct Broker {
    child: Child,
    port: u16,
    log: SharedLog,
    /// Working directory and default `MESHBROKER_DATA_DIR` parent.
    workdir: PathBuf,
}

fn broker_command(args: &[&str], env: &[(&str, &str)], workdir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbroker"));
    cmd.args(args)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for var in CONFIG_VARS {
        cmd.env_remove(var);
    }
    let given = |k: &str| env.iter().any(|(name, _)| *name == k);
    let data_dir = workdir.join("data");
    let defaults: [(&str, String); 6] = [
        ("BROKER_PORT", "0".into()),
        ("BROKER_HOST", "127.0.0.1".into()),
        ("BROKER_SHARDS", "2".into()),
        ("NODE_ENV", "test".into()),
        // Hermetic: no developer transcripts; tests that need some set it.
        (
            "CLAUDE_PROJECTS_DIR",
            workdir.join("claude-projects").display().to_string(),
        ),
        ("MESHBROKER_DATA_DIR", data_dir.display().to_string()),
    ];
    for (k, v) in defaults {
        if !given(k) {
            cmd.env(k, v);
        }
    }
    // Only create a database when the test did not bring its own (or ask
    // for the embedded one with DATABASE_URL="").
    if !given("DATABASE_URL") {
        cmd.env("DATABASE_URL", fresh_database());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl Broker {
    /// Starts the broker with the test defaults (ephemeral port on
    /// 127.0.0.1, 2 shards, NODE_ENV=test, a fresh database) overridden by
    /// `env`, and waits for its `broker listening` line.
    pub fn start(env: &[(&str, &str)]) -> Broker {
        Broker::start_with_args(&[], env)
    }

    pub fn start_with_args(args: &[&str], env: &[(&str, &str)]) -> Broker {
        Broker::start_with(args, env, None)
    }

    /// Like [`Broker::start`], with the broker's soft `RLIMIT_NOFILE`
    /// lowered to `nofile` (set in the child between fork and exec), for
    /// file-descriptor exhaustion tests.
    pub fn start_with_nofile(env: &[(&str, &str)], nofile: u64) -> Broker {
        Broker::start_with(&[], env, Some(nofile))
    }

    fn start_with(args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Broker {
        let workdir = world_traversable_tempdir("meshbroker-test-broker-");
        let mut cmd = broker_command(args, env, &workdir);
        if let Some(soft) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: getrlimit/setrlimit are async-signal-safe, and the
            // closure touches nothing but its own stack.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn the meshbroker binary");
        let log = spawn_stderr_reader(child.stderr.take().expect("stderr is piped"));
        let mut broker = Broker {
            child,
            port: 0,
            log,
            workdir,
        };
        let line = broker
            .try_wait_for_log("broker listening", START_TIMEOUT)
            .unwrap_or_else(|| {
                let status = broker.child.try_wait().ok().flatten();
                panic!(
                    "broker did not log \"broker listening\" within {START_TIMEOUT:?} (exit status {status:?}); stderr:\n{}",
                    broker.stderr_text()
                )
            });
        broker.port = match &line["port"] {
            serde_json::Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or_else(|| panic!("no usable port in {line}"));
        broker
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT/path` (a leading `/` on `path` is optional).
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.strip_prefix('/').unwrap_or(path)
        )
    }

    /// `ws://127.0.0.1:PORT/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker's working directory (a tempdir; embedded Postgres goes in
    /// `data/` under it unless `MESHBROKER_DATA_DIR` was given).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Every JSON log line so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.log.0.lock().unwrap().json.clone()
    }

    /// Every stderr line so far, JSON or not, joined with newlines.
    pub fn stderr_text(&self) -> String {
        self.log.0.lock().unwrap().raw.join("\n")
    }

    /// The first JSON line (from the start) whose `msg` is `msg`.
    pub fn wait_for_log(&self, msg: &str, timeout: Duration) -> serde_json::Value {
        self.try_wait_for_log(msg, timeout).unwrap_or_else(|| {
            panic!(
                "no log line with msg {msg:?} within {timeout:?}; stderr:\n{}",
                self.stderr_text()
            )
        })
    }

    /// The first JSON line whose `msg` is `msg` and that satisfies `pred`.
    pub fn wait_for_log_where(
        &self,
        msg: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.find_log(msg, timeout, &pred).unwrap_or_else(|| {
            panic!(
                "no matching log line with msg {msg:?} within {timeout:?}; stderr:\n{}",
                self.stderr_text()
            )
        })
    }

    pub fn try_wait_for_log(&self, msg: &str, timeout: Duration) -> Option<serde_json::Value> {
        self.find_log(msg, timeout, &|_| true)
    }

    fn find_log(
        &self,
        msg: &str,
        timeout: Duration,
        pred: &dyn Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.log;
        let mut st = lock.lock().unwrap();
        loop {
            if let Some(v) = st.json.iter().find(|v| v["msg"] == msg && pred(v)) {
                return Some(v.clone());
            }
            let now = Instant::now();
            if st.eof || now >= deadline {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn sigint(&self) {
        self.signal(libc::SIGINT);
    }

    /// No chance to clean up: what a crash or the OOM killer does.
    pub fn sigkill(&self) {
        self.signal(libc::SIGKILL);
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: sending a signal to our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Waits up to `timeout` for the broker to exit.
    /// Waits for the process to exit, then (briefly) for the stderr reader
    /// to reach EOF, so the logs include the last lines it wrote.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_child(&mut self.child, timeout)?;
        let (lock, cv) = &*self.log;
        let state = lock.lock().unwrap();
        let _ = cv
            .wait_timeout_while(state, Duration::from_secs(5), |st| !st.eof)
            .unwrap();
        Some(status)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Let it shut down cleanly (and stop an embedded Postgres),
            // then insist.
            self.sigterm();
            if wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the broker expecting it to exit by itself (config errors):
/// returns its status and whole stderr. Panics after 20 s.
pub fn run_broker_expect_exit(env: &[(&str, &str)]) -> (ExitStatus, String) {
    run_broker_args_expect_exit(&[], env)
}

/// Like [`run_broker_expect_exit`] with CLI arguments (`--check-config`).
pub fn run_broker_args_expect_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let workdir = world_traversable_tempdir("meshbroker-test-exit-");
    // A config-error run must not need a database: default to a URL that
    // is valid in form but never used.
    let mut env: Vec<(&str, &str)> = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "DATABASE_URL") {
        env.push(("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unused"));
    }
    let mut child = broker_command(args, &env, &workdir)
        .spawn()
        .expect("spawn the meshbroker binary");
    let log = spawn_stderr_reader(child.stderr.take().expect("stderr is piped"));
    let status = wait_child(&mut child, START_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "broker did not exit within {START_TIMEOUT:?}; stderr:\n{}",
            log.0.lock().unwrap().raw.join("\n")
        )
    });
    // The reader sees EOF once the child (and anything holding its stderr)
    // is gone.
    let (lock, cv) = &*log;
    let mut st = lock.lock().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !st.eof && Instant::now() < deadline {
        st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
    }
    let stderr = st.raw.join("\n");
    drop(st);
    let _ = std::fs::remove_dir_all(&workdir);
    (status, stderr)
}

// -------------------------------------------------------------------- HTTP

#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One blocking HTTP/1.1 request. Adds `Host`, `Content-Length` (when there
/// is a body or the method is POST/PUT) and `Connection: close` unless the
/// caller gave them. Reads a Content-Length, chunked or until-EOF body.
pub fn http(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let addr = addr.to_socket_addrs().unwrap().next().expect("an address");
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();

    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("content-length")
        && !has("transfer-encoding")
        && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH"))
    {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if !has("connection") {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).expect("send request");

    read_response(&mut stream, method == "HEAD")
}

fn read_response(stream: &mut TcpStream, head_only: bool) -> HttpReply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).expect("read response head");
        assert!(
            n > 0,
            "connection closed before a full response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut rest = buf[head_end..].to_vec();
    let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
    let body = if no_body {
        Vec::new()
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("numeric Content-Length");
        while rest.len() < len {
            let n = stream.read(&mut chunk).expect("read body");
            assert!(
                n > 0,
                "connection closed after {} of {len} body bytes",
                rest.len()
            );
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        read_chunked(stream, rest)
    } else {
        read_to_eof(stream, &mut rest);
        rest
    };
    HttpReply {
        status,
        headers,
        body,
    }
}

fn read_chunked(stream: &mut TcpStream, mut buf: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut fill = |buf: &mut Vec<u8>| {
        let n = stream.read(&mut chunk).expect("read chunked body");
        assert!(n > 0, "connection closed inside a chunked body");
        buf.extend_from_slice(&chunk[..n]);
    };
    loop {
        let line_end = loop {
            if let Some(i) = find(&buf, b"\r\n") {
                break i;
            }
            fill(&mut buf);
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        buf.drain(..line_end + 2);
        if size == 0 {
            return body;
        }
        while buf.len() < size + 2 {
            fill(&mut buf);
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

fn read_to_eof(stream: &mut TcpStream, out: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            // A reset or a timeout ends the exchange; return what arrived.
            Err(_) => return,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Writes `bytes` as-is and returns everything the server sends until it
/// closes the connection (or 5 s pass without data). For malformed-request
/// tests.
pub fn raw_exchange(addr: impl ToSocketAddrs, bytes: &[u8]) -> Vec<u8> {
    raw_exchange_timeout(addr, bytes, Duration::from_secs(5))
}

pub fn raw_exchange_timeout(addr: impl ToSocketAddrs, bytes: &[u8], idle: Duration) -> Vec<u8> {
    let addr = addr.to_socket_addrs().unwrap().next().expect("an address");
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(idle)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    // The server may answer and close before reading everything we send.
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    read_to_eof(&mut stream, &mut out);
    out
}

// ------------------------------------------- Polling, raw WebSocket, metrics

/// Calls `f` every 50 ms until it returns `Some`, for up to `timeout`;
/// panics with `what` (and the last attempt's note) otherwise.
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request on an already-open connection (keep-alive tests). Sends the
/// request as given plus `Host` and `Content-Length` when missing; never adds
/// `Connection`.
pub fn http_on(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str("Host: 127.0.0.1\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("content-length") && (!body.is_empty() || method == "POST") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).expect("send request");
    read_response(stream, method == "HEAD")
}

/// Runs the binary to completion with stdout captured (`--check-config`):
/// (status, stdout, stderr). Same environment rules as
/// [`run_broker_args_expect_exit`].
pub fn run_broker_capture(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let workdir = world_traversable_tempdir("meshbroker-test-exit-");
    let mut env: Vec<(&str, &str)> = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "DATABASE_URL") {
        env.push(("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unused"));
    }
    let mut child = broker_command(args, &env, &workdir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the meshbroker binary");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_child(&mut child, START_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("meshbroker {args:?} did not exit within {START_TIMEOUT:?}")
    });
    let out = out_reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    let _ = std::fs::remove_dir_all(&workdir);
    (status, out, err)
}

/// A frame from the server (unmasked, possibly a fragment).
#[derive(Debug, Clone)]
pub struct ServerFrame {
    pub fin: bool,
    /// The raw 4-bit opcode: 0x1 text, 0x2 binary, 0x8 close, 0x9 ping, 0xA pong.
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    pub fn is_close(&self) -> bool {
        self.opcode == 0x8
    }

    /// The status code of a close frame (`None` for an empty close).
    pub fn close_code(&self) -> Option<u16> {
        (self.is_close() && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A hand-driven WebSocket client over a plain `TcpStream`, for protocol
/// violations a real client library refuses to produce.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A valid `Sec-WebSocket-Key` (the RFC 6455 example).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl RawWs {
    /// Connects to `/ws` and completes the opening handshake (asserts 101).
    pub fn connect(addr: SocketAddr) -> RawWs {
        RawWs::connect_with(addr, b"")
    }

    /// Like [`RawWs::connect`], with `early` (e.g. client frames) written in
    /// the same `write` as the handshake request, before the 101 is read.
    pub fn connect_with(addr: SocketAddr, early: &[u8]) -> RawWs {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut req = req.into_bytes();
        req.extend_from_slice(early);
        stream.write_all(&req).expect("send handshake");
        // Read byte by byte up to the blank line so no frame bytes are eaten.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).expect("read handshake response");
            assert!(
                n > 0,
                "closed during handshake: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "handshake not accepted: {head:?}"
        );
        RawWs {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write frame");
    }

    /// Writes one masked client frame (random mask).
    pub fn send_frame(&mut self, opcode: meshbroker::ws::OpCode, payload: &[u8], fin: bool) {
        let mask: [u8; 4] = rand::random();
        let frame = meshbroker::ws::encode_client_frame(opcode, payload, mask, fin);
        self.send_raw(&frame);
    }

    pub fn send_text(&mut self, text: &str) {
        self.send_frame(meshbroker::ws::OpCode::Text, text.as_bytes(), true);
    }

    /// The next whole frame, or `None` at EOF (or a reset).
    pub fn read_frame(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no frame from the broker within {IO_TIMEOUT:?}")
                }
                Err(_) => return None,
            }
        }
    }

    /// The next frame; panics at EOF.
    pub fn expect_frame(&mut self) -> ServerFrame {
        self.read_frame()
            .expect("the broker closed the connection instead of sending a frame")
    }

    /// The next text frame as JSON, skipping pings.
    pub fn read_json(&mut self) -> serde_json::Value {
        loop {
            let frame = self.expect_frame();
            match frame.opcode {
                0x9 => continue,
                0x1 => {
                    return serde_json::from_slice(&frame.payload).unwrap_or_else(|e| {
                        panic!("text frame is not JSON ({e}): {:?}", frame.text())
                    })
                }
                _ => panic!("expected a text frame, got {frame:?}"),
            }
        }
    }

    /// Reads until a close frame (skipping anything before it) and returns
    /// its code; panics if the connection ends without one.
    pub fn read_close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.expect_frame();
            if frame.is_close() {
                return frame.close_code();
            }
        }
    }

    /// True when the broker ends the TCP connection (EOF or reset) within
    /// the read timeout, after discarding any frames still in flight.
    pub fn wait_eof(&mut self) -> bool {
        loop {
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Decodes one unmasked server frame from the start of `buf`:
/// `Some((frame, bytes used))`, or `None` when more bytes are needed.
/// Panics on a masked frame (a server must not mask).
pub fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    assert!(
        buf[1] & 0x80 == 0,
        "server frame is masked: {:02x?}",
        &buf[..2]
    );
    let (len, header) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    let frame = ServerFrame {
        fin,
        opcode,
        payload: buf[header..header + len].to_vec(),
    };
    Some((frame, header + len))
}

/// One sample of a Prometheus/OpenMetrics text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses a text exposition strictly: every line is empty, a `#` comment,
/// or `name{label="value",…} value [timestamp]`. Panics naming the first
/// line that is not.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|| panic!("not a metric sample: {line:?}")))
        .collect()
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if name_end == 0 {
        return None;
    }
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=')?;
            let key = &rest[..eq];
            if key.is_empty()
                || !key
                    .chars()
                    .enumerate()
                    .all(|(i, c)| is_name_char(c, i == 0))
            {
                return None;
            }
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => value.push(chars.next()?.1),
                    c => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &rest[close + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut fields = rest.strip_prefix(' ')?.split(' ');
    let value = match fields.next()? {
        "NaN" => f64::NAN,
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The value of the sample `name` whose labels include every `(k, v)` of
/// `labels` (the first such sample).
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
}

impl Broker {
    /// GET /metrics, asserted 200, parsed.
    pub fn scrape(&self) -> Vec<Sample> {
        let reply = http(self.addr(), "GET", "/metrics", &[], b"");
        assert_eq!(reply.status, 200, "/metrics: {}", reply.text());
        parse_metrics(&reply.text())
    }

    /// Polls GET /health until it answers `status` (up to 15 s); returns the body.
    pub fn wait_health(&self, status: u16) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let reply = http(self.addr(), "GET", "/health", &[], b"");
            if reply.status == status {
                return reply.json();
            }
            assert!(
                Instant::now() < deadline,
                "/health never answered {status}; last: {} {}",
                reply.status,
                reply.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
