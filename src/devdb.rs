//! The embedded development Postgres: when `DATABASE_URL` is unset the
//! broker runs a private cluster in `MESHBROKER_DATA_DIR`, and the test
//! harness runs a throwaway one per test process.
//!
//! Everything here shells out to the server's own tools (`initdb`,
//! `pg_ctl`, `psql`) with `std::process::Command`: it runs at start-up and
//! in tests, never on a hot path. The server listens on 127.0.0.1 only,
//! with trust authentication, and without unix sockets (so a long data-dir
//! path cannot exceed the socket-path limit).
//!
//! Postgres refuses to run as root. When we are root, the data directory is
//! handed to the `postgres` OS user and every server tool runs as that user.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The database created in every cluster for the broker itself.
pub const DEFAULT_DATABASE: &str = "meshbroker";
/// The superuser name `initdb` is told to create (whatever the OS user).
const SUPERUSER: &str = "postgres";
/// Our settings live in their own file, rewritten on every start, which
/// `postgresql.conf` includes; that keeps `-o` quoting out of the picture.
const CONF_FILE: &str = "meshbroker.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'meshbroker.conf'";
const SERVER_LOG: &str = "server.log";

#[derive(Debug, thiserror::Error)]
pub enum DevDbError {
    #[error("no PostgreSQL server binaries found (looked at PG_BIN_DIR, pg_config --bindir, /usr/lib/postgresql/*/bin and PATH); install the PostgreSQL server or set PG_BIN_DIR")]
    BinariesNotFound,
    #[error("running as root but there is no `postgres` OS user to run the server as")]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        what: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{0}")]
    NotReady(String),
    #[error("{path} is not searchable by the `postgres` OS user the server runs as; choose a data directory under a world-searchable path (e.g. /tmp or /var/lib) or chmod o+x {path}")]
    NotAccessible { path: PathBuf },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevDbError {
    let what = what.into();
    move |source| DevDbError::Io { what, source }
}

/// The OS identity server tools run as (`None`: as ourselves).
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// A local Postgres cluster we started. Dropping it stops the server.
pub struct LocalPostgres {
    bin_dir: PathBuf,
    psql: PathBuf,
    data_dir: PathBuf,
    port: u16,
    fast: bool,
    run_as: Option<RunAs>,
}

impl std::fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .finish()
    }
}

impl LocalPostgres {
    /// Initialises `data_dir` (initdb: trust auth, UTF8, locale C) if it
    /// holds no cluster yet, starts the server on a free 127.0.0.1 port,
    /// waits until it accepts connections and creates database
    /// `meshbroker` if missing. `fast` turns off fsync, synchronous_commit
    /// and full_page_writes (throwaway clusters only).
    ///
    /// A server still running on `data_dir` from an earlier crashed process
    /// is stopped first; a stale `postmaster.pid` whose process is gone (or
    /// is not that server) is removed.
    pub fn start(data_dir: &Path, fast: bool) -> Result<LocalPostgres, DevDbError> {
        let bin_dir = find_bin_dir()?;
        let psql = [bin_dir.join("psql"), PathBuf::from("/usr/bin/psql")]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let run_as = run_as()?;
        let data_dir = prepare_data_dir(data_dir, run_as)?;

        let mut pg = LocalPostgres {
            bin_dir,
            psql,
            data_dir,
            port: 0,
            fast,
            run_as,
        };
        if !pg.data_dir.join("PG_VERSION").exists() {
            pg.initdb()?;
        }
        pg.ensure_include()?;
        pg.clear_leftover_server()?;

        // The port is free when we look and may be taken by the time the
        // server binds it: try a few.
        let mut last_err = None;
        for _ in 0..3 {
            pg.port = free_port()?;
            match pg.start_server() {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => {
                    // pg_ctl -w may give up while a half-started server
                    // lingers; make sure it is gone before retrying.
                    let _ = pg.stop();
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        if !pg.database_exists(DEFAULT_DATABASE)? {
            pg.create_database(DEFAULT_DATABASE)?;
        }
        tracing::info!(
            target: "devdb",
            data_dir = %pg.data_dir.display(),
            port = pg.port,
            "devdb started"
        );
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE`
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// `CREATE DATABASE`; an existing database is an error.
    pub fn create_database(&self, name: &str) -> Result<(), DevDbError> {
        let sql = format!("CREATE DATABASE {}", quote_ident(name));
        self.psql_output("postgres", &sql, &format!("create database {name}"))
            .map(drop)
    }

    /// Runs a SQL script against `database` with `ON_ERROR_STOP`: the first
    /// failing statement makes this an error carrying psql's message.
    pub fn run_sql(&self, database: &str, sql: &str) -> Result<(), DevDbError> {
        self.psql_output(database, sql, &format!("psql script on {database}"))
            .map(drop)
    }

    /// `pg_ctl stop -m fast`. Stopping a stopped server is not an error.
    pub fn stop(&self) -> Result<(), DevDbError> {
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let out = self
            .server_tool("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "30"])
            .output()
            .map_err(io_err("run pg_ctl stop"))?;
        if out.status.success() {
            return Ok(());
        }
        // It may have died between our check and pg_ctl's.
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        Err(command_error("pg_ctl stop", &out))
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&self) -> Result<(), DevDbError> {
        self.stop()?;
        self.clear_leftover_server()?;
        self.start_server()
    }

    fn server_tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        // chdir happens after the uid switch: use a directory the server
        // user can enter (its own data dir) rather than inheriting ours.
        cmd.current_dir(&self.data_dir)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null())
            // Its own process group: a terminal's Ctrl-C reaches the broker,
            // which then stops Postgres itself after flushing to it.
            .process_group(0);
        if let Some(r) = self.run_as {
            cmd.uid(r.uid).gid(r.gid);
        }
        cmd
    }

    fn initdb(&self) -> Result<(), DevDbError> {
        let mut cmd = self.server_tool("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if self.fast {
            cmd.arg("--no-sync");
        }
        let out = cmd.output().map_err(io_err("run initdb"))?;
        if !out.status.success() {
            return Err(command_error("initdb", &out));
        }
        Ok(())
    }

    /// Makes `postgresql.conf` include our settings file (once).
    fn ensure_include(&self) -> Result<(), DevDbError> {
        let conf = self.data_dir.join("postgresql.conf");
        let text =
            std::fs::read_to_string(&conf).map_err(io_err(format!("read {}", conf.display())))?;
        if text.lines().any(|l| l.trim() == INCLUDE_LINE) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(format!("open {}", conf.display())))?;
        writeln!(f, "\n# Added by meshbroker (devdb).\n{INCLUDE_LINE}")
            .map_err(io_err(format!("write {}", conf.display())))
    }

    fn write_settings(&self) -> Result<(), DevDbError> {
        let mut s = format!(
            "# Written by meshbroker on every start; edits are lost.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = ''\n\
             max_connections = 200\n",
            self.port
        );
        if self.fast {
            s.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let path = self.data_dir.join(CONF_FILE);
        std::fs::write(&path, s).map_err(io_err(format!("write {}", path.display())))?;
        if let Some(r) = self.run_as {
            chown(&path, r)?;
        }
        Ok(())
    }

    /// Deals with what a crashed earlier run may have left: a server still
    /// running on this data dir is stopped; a `postmaster.pid` naming a
    /// process that is not a server on this data dir is removed (Postgres
    /// itself would refuse to start if that pid had been reused).
    fn clear_leftover_server(&self) -> Result<(), DevDbError> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            return Ok(());
        };
        let pid: Option<i32> = text.lines().next().and_then(|l| l.trim().parse().ok());
        let ours = pid.is_some_and(|pid| server_alive_on(pid, &self.data_dir));
        if ours {
            tracing::warn!(
                target: "devdb",
                data_dir = %self.data_dir.display(),
                pid = pid.unwrap_or_default(),
                "devdb stopping leftover server"
            );
            self.stop()
        } else {
            tracing::warn!(
                target: "devdb",
                data_dir = %self.data_dir.display(),
                "devdb removing stale postmaster.pid"
            );
            std::fs::remove_file(&pid_file)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
                .map_err(io_err(format!("remove {}", pid_file.display())))
        }
    }

    fn start_server(&self) -> Result<(), DevDbError> {
        self.write_settings()?;
        let log = self.data_dir.join(SERVER_LOG);
        // With -l the server's output goes to the log file, so it does not
        // hold our pipes open and `output()` returns when pg_ctl does.
        let out = self
            .server_tool("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60"])
            .output()
            .map_err(io_err("run pg_ctl start"))?;
        if !out.status.success() {
            let mut e = command_error("pg_ctl start", &out);
            if let DevDbError::Command { stderr, .. } = &mut e {
                stderr.push_str("\nserver log (tail):\n");
                stderr.push_str(&log_tail(&log, 20));
            }
            return Err(e);
        }
        self.wait_accepting(Duration::from_secs(30))
    }

    /// pg_ctl -w already waited for "ready"; make sure a real client can
    /// get through on TCP before anyone relies on it.
    fn wait_accepting(&self, timeout: Duration) -> Result<(), DevDbError> {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            let probe = self
                .psql_command("postgres")
                .args(["-tA", "-c", "SELECT 1"])
                .stdin(Stdio::null())
                .output();
            if let Ok(out) = &probe {
                if out.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
                return Err(DevDbError::NotReady(format!(
                    "postgres on 127.0.0.1:{} did not accept connections within {:?} (tcp connect {}); server log:\n{}",
                    self.port,
                    timeout,
                    if tcp { "ok" } else { "refused" },
                    log_tail(&self.data_dir.join(SERVER_LOG), 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn database_exists(&self, name: &str) -> Result<bool, DevDbError> {
        let sql = format!(
            "SELECT 1 FROM pg_database WHERE datname = '{}'",
            name.replace('\'', "''")
        );
        let out = self
            .psql_command("postgres")
            .args(["-tA", "-c", &sql])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("run psql"))?;
        if !out.status.success() {
            return Err(command_error("psql (list databases)", &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "1")
    }

    /// A psql client for `database`. It runs as ourselves (a client needs no
    /// privileges) and ignores `~/.psqlrc` and `PG*` defaults.
    fn psql_command(&self, database: &str) -> Command {
        let mut cmd = Command::new(&self.psql);
        cmd.arg("-X")
            .arg("-q")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-d")
            .arg(self.url(database))
            .env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        cmd
    }

    /// Feeds `sql` to psql on stdin (from a thread, so a large script and a
    /// chatty server cannot deadlock on full pipes).
    fn psql_output(&self, database: &str, sql: &str, what: &str) -> Result<Output, DevDbError> {
        let mut child = self
            .psql_command(database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("run {}", self.psql.display())))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let script = sql.to_owned();
        let writer = std::thread::spawn(move || {
            // A failed write means psql exited early; its status says why.
            let _ = stdin.write_all(script.as_bytes());
        });
        let out = child.wait_with_output().map_err(io_err("wait for psql"))?;
        let _ = writer.join();
        if !out.status.success() {
            return Err(command_error(what, &out));
        }
        Ok(out)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn command_error(what: &str, out: &Output) -> DevDbError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    DevDbError::Command {
        what: what.to_owned(),
        status: out.status,
        stderr,
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Asks the kernel for a free port on 127.0.0.1.
fn free_port() -> Result<u16, DevDbError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("bind 127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(io_err("local_addr"))?.port())
}

/// Whether `pid` is a live process whose working directory is `data_dir`
/// (a postmaster runs in its data directory). Without /proc, falls back
/// to "the process exists".
fn server_alive_on(pid: i32, data_dir: &Path) -> bool {
    if pid <= 0 {
        return false;
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if Path::new("/proc/self").exists() {
        if !proc_dir.exists() {
            return false;
        }
        let cwd = std::fs::read_link(proc_dir.join("cwd"));
        let want = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_owned());
        return match cwd {
            Ok(cwd) => cwd == want,
            // Unreadable: be safe and let pg_ctl decide.
            Err(_) => true,
        };
    }
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// PG_BIN_DIR, else `pg_config --bindir`, else the highest
/// `/usr/lib/postgresql/*/bin`, else the directory of `initdb` on PATH.
fn find_bin_dir() -> Result<PathBuf, DevDbError> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(DevDbError::BinariesNotFound)
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_tools(&dir) {
                return Ok(dir);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let version = name
                    .split('.')
                    .map(|p| p.parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()?;
                let bin = e.path().join("bin");
                has_tools(&bin).then_some((version, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_tools(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(DevDbError::BinariesNotFound)
}

/// As root, the `postgres` OS user; otherwise ourselves.
fn run_as() -> Result<Option<RunAs>, DevDbError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r is the
    // thread-safe variant and fills `pwd` using `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(DevDbError::NoPostgresUser);
    }
    Ok(Some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }))
}

fn chown(path: &Path, r: RunAs) -> Result<(), DevDbError> {
    std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))
        .map_err(io_err(format!("chown {}", path.display())))
}

/// Creates the data dir if needed, makes it absolute, and (as root) gives
/// it to the server user with the 0700 mode Postgres insists on.
fn prepare_data_dir(data_dir: &Path, run_as: Option<RunAs>) -> Result<PathBuf, DevDbError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(data_dir).map_err(io_err(format!("create {}", data_dir.display())))?;
    let dir = data_dir
        .canonicalize()
        .map_err(io_err(format!("resolve {}", data_dir.display())))?;
    if let Some(r) = run_as {
        // The server user must be able to walk down to its data dir.
        for ancestor in dir.ancestors().skip(1) {
            let meta = std::fs::metadata(ancestor)
                .map_err(io_err(format!("stat {}", ancestor.display())))?;
            let searchable = meta.permissions().mode() & 0o001 != 0
                || (meta.uid() == r.uid && meta.permissions().mode() & 0o100 != 0)
                || (meta.gid() == r.gid && meta.permissions().mode() & 0o010 != 0);
            if !searchable {
                return Err(DevDbError::NotAccessible {
                    path: ancestor.to_owned(),
                });
            }
        }
        chown(&dir, r)?;
    }
    // Postgres accepts 0700 or 0750 and refuses anything wider.
    let mode = std::fs::metadata(&dir)
        .map_err(io_err(format!("stat {}", dir.display())))?
        .permissions()
        .mode();
    if mode & 0o027 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", dir.display())))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("test_1_2"), "\"test_1_2\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn dead_pid_is_not_a_server() {
        assert!(!server_alive_on(0, Path::new("/")));
        assert!(!server_alive_on(-1, Path::new("/")));
        // Our own process is alive but does not run in a data dir of ours.
        let me = std::process::id() as i32;
        let elsewhere = std::env::temp_dir().join("meshbroker-no-such-dir");
        assert!(!server_alive_on(me, &elsewhere));
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
