//! Typed configuration from the environment (PROTOCOL.md §3), validated once
//! at start-up.
//!
//! Every variable is parsed even after an earlier one failed, so an operator
//! sees every bad value in one run instead of fixing them one restart at a
//! time. An empty value counts as unset (shells and compose files often
//! export `VAR=` to mean "default").

use crate::audit::{AuditSelection, EVENT_TYPES};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

/// Smallest accepted `MAX_MESSAGE_BYTES`: a hello alone is a few hundred bytes.
pub const MIN_MESSAGE_BYTES: usize = 1024;
/// Largest accepted `MAX_MESSAGE_BYTES` (64 MiB): beyond that one message
/// could starve a shard's buffers.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Largest accepted `BROKER_SHARDS`.
pub const MAX_SHARDS: usize = 64;
/// Largest accepted `MAX_CONNECTIONS` (a descriptor each; far past any
/// `ulimit -n` a host grants).
pub const MAX_CONNECTIONS: usize = 10_000_000;
/// Largest accepted `CLIENT_ACK_MAX_LEASES`.
pub const MAX_CLIENT_ACK_LEASES: usize = 1_000_000;
/// Smallest accepted `CLIENT_ACK_MAX_LEASE_BYTES` (64 KiB): one push of a
/// default `MAX_MESSAGE_BYTES` send must fit.
pub const MIN_CLIENT_ACK_LEASE_BYTES: usize = 64 * 1024;
/// Largest accepted `CLIENT_ACK_MAX_LEASE_BYTES` (1 GiB).
pub const MAX_CLIENT_ACK_LEASE_BYTES: usize = 1024 * 1024 * 1024;
/// Largest accepted value of the `*_SECONDS` variables (10 years), so that
/// adding one to an `Instant` can never overflow.
pub const MAX_SECONDS: u64 = 10 * 365 * 24 * 60 * 60;

/// `BROKER_IO_DRIVER` (ours): which monoio driver the shards run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll (with a warning).
    Auto,
    /// epoll only (what `Auto` falls back to); tests run on both.
    Epoll,
}

impl IoDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            IoDriver::Auto => "auto",
            IoDriver::Epoll => "epoll",
        }
    }
}

/// `NODE_ENV`: the original's name, kept for existing deployments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEnv {
    Development,
    Production,
    Test,
}

impl NodeEnv {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeEnv::Development => "development",
            NodeEnv::Production => "production",
            NodeEnv::Test => "test",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// `DATABASE_URL`; `None` means "run the embedded development Postgres".
    pub database_url: Option<String>,
    pub host: IpAddr,
    /// 0 asks the kernel for an ephemeral port (the tests use it).
    pub port: u16,
    pub shards: usize,
    pub status_ttl: Duration,
    pub hook_fresh_window: Duration,
    pub held_ttl: Duration,
    pub max_connections_per_mesh: u32,
    /// `MAX_CONNECTIONS` (ours): open sockets over all shards (HTTP and
    /// WebSocket alike); a socket accepted over it is closed unread.
    pub max_connections: usize,
    pub max_message_bytes: usize,
    pub hook_rate_limit_per_min: u32,
    /// `SESSION_GRACE_SECONDS` (PROTOCOL.md §9): how long a session whose
    /// socket was lost without a close frame stays `away` and resumable;
    /// zero disables grace.
    pub session_grace: Duration,
    /// `SEND_RATE_PER_MIN` and `SEND_BURST` (§9): each member's send token
    /// bucket, refilled at this rate per minute, holding at most the burst.
    pub send_rate_per_min: u32,
    pub send_burst: u32,
    /// `CLIENT_ACK_TIMEOUT_SECONDS` (PROTOCOL.md §11): how long a push to a
    /// `client_ack` session stays leased, from its write, before it goes
    /// back to its member's held queue.
    pub client_ack_timeout: Duration,
    /// `DEDUPE_WINDOW_SECONDS` (§11): how long a send's `(sender member,
    /// client_message_id)` makes a later send with the same pair a
    /// duplicate; zero turns duplicate detection off.
    pub dedupe_window: Duration,
    /// `JOIN_RATE_LIMIT_PER_MIN` (PROTOCOL.md §12): `POST /join` requests
    /// per client address per minute (a token bucket), whatever their outcome.
    pub join_rate_limit_per_min: u32,
    pub node_env: NodeEnv,
    pub git_sha: String,
    pub claude_projects_dir: PathBuf,
    /// `NATS_URL` (ours): the bus that joins several broker nodes into one
    /// (README "Several nodes"); `None` runs one node, exactly as without it.
    pub nats_url: Option<String>,
    /// `NODE_ID` (ours): this node's name on the bus and in presence and
    /// held rows; generated per run when unset. Set it in production, so a
    /// restarted node closes and reloads what its earlier run left.
    pub node_id: String,
    /// `CLUSTER_CONFIRM_TIMEOUT_MS` (ours): how long a send waits for the
    /// nodes it was routed to to confirm it before it is held instead.
    pub cluster_confirm_timeout: Duration,
    /// `NODE_DEAD_AFTER_MS` (ours): a node silent on the bus this long is
    /// dead: its sessions leave the directory, its presence rows end and
    /// its held envelopes are taken over.
    pub node_dead_after: Duration,
    /// `MESHBROKER_DATA_DIR` (ours): where the embedded dev Postgres lives.
    pub data_dir: PathBuf,
    /// `MAX_OUTBOUND_BYTES` (ours): a connection's outbound queue bound; a
    /// peer that lets more pile up is cut off with 1013.
    pub max_outbound_bytes: usize,
    /// `CLIENT_ACK_MAX_LEASES` and `CLIENT_ACK_MAX_LEASE_BYTES` (ours): the
    /// most unacked pushes (and their bytes) one `client_ack` session may
    /// hold; a session over either is cut off like a slow reader (1013).
    pub client_ack_max_leases: usize,
    pub client_ack_max_lease_bytes: usize,
    /// `MEMBER_REFRESH_SECONDS` (ours): how often loaded meshes' members are
    /// reloaded, i.e. how long a revocation takes to close live sessions.
    pub member_refresh: Duration,
    pub io_driver: IoDriver,
    /// `MAX_HELD_PER_MEMBER` (ours): a member holding this many envelopes
    /// refuses new sends with `unavailable`, so one member that never
    /// connects cannot eat the heap.
    pub max_held_per_member: usize,
    /// `MAX_HELD_MEMORY_BYTES` (ours): bytes of held envelopes accepted but
    /// not yet committed to Postgres (it is slow or away); over it a send
    /// that must be held is refused with `unavailable`.
    pub max_held_memory_bytes: usize,
    /// `MAX_HELD_BYTES_PER_MEMBER` (ours): push-frame bytes one member may
    /// have held; over it, like over `MAX_HELD_PER_MEMBER`, a send that
    /// must be held for it is refused with `unavailable`.
    pub max_held_bytes_per_member: usize,
    /// `HELLO_TIMEOUT_SECONDS` (ours): how long a new socket has, from
    /// accept, to finish its handshake and have its hello accepted.
    pub hello_timeout: Duration,
    /// `HTTP_IDLE_TIMEOUT_SECONDS` (ours): how long a keep-alive HTTP
    /// connection may wait for its next request (head and body) to arrive.
    pub http_idle_timeout: Duration,
    /// `RATE_LIMIT_CLOSE_AFTER` (ours): a session whose sends were refused
    /// `rate_limited` this many times in a row is closed (1008).
    pub rate_limit_close_after: u32,
    /// `HELD_BATCH_MAX_ROWS`, `HELD_BATCH_MAX_WAIT_US` (ours): a durable
    /// batch closes at this many commands or once its oldest waited this long.
    pub held_batch_max_rows: usize,
    pub held_batch_max_wait: Duration,
    /// `HELD_WRITER_CONNECTIONS` (ours): connections the durable lane writes
    /// batches on at once (Postgres works on one batch per connection).
    pub held_writer_connections: usize,
    /// `AUDIT_BATCH_MAX_ROWS` and `AUDIT_BATCH_MAX_WAIT_US` (ours): an
    /// audit batch is written at this many events, or once its oldest has
    /// waited this long.
    pub audit_batch_max_rows: usize,
    pub audit_batch_max_wait: Duration,
    /// `AUDIT_BUFFER_EVENTS` (ours): audit events kept in memory while
    /// Postgres is down; over it the oldest are dropped (counted).
    pub audit_buffer_events: usize,
    /// `AUDIT_EVENTS` (ours): the event types written to `mesh.audit_log`.
    pub audit_events: AuditSelection,
    /// `BROKER_PING_INTERVAL_MS`, `BROKER_PING_TIMEOUT_MS` and
    /// `BROKER_SWEEP_INTERVAL_MS` (for tests): the protocol's 30 s ping,
    /// 75 s liveness timeout and 15 s status sweep, shortened.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub sweep_interval: Duration,
    /// `BROKER_FAULT_PANIC_SESSION_ID` (for tests): a hello with this
    /// `sessionId` panics its shard, to prove a shard panic stops the broker.
    pub fault_panic_session_id: Option<String>,
}

/// One bad variable: its name, the value as given, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    /// The value as given (passwords in URLs redacted); empty when the
    /// variable is missing.
    pub value: String,
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "missing {}: expected {}", self.var, self.expected)
        } else {
            // `{:?}` quotes the value and escapes control characters, so the
            // message stays on one line whatever was in the environment.
            write!(
                f,
                "invalid {}={:?}: expected {}",
                self.var, self.value, self.expected
            )
        }
    }
}

/// Every bad variable found; `Display` gives one line per error.
#[derive(Debug, thiserror::Error)]
#[error("{}", render_errors(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn render_errors(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collects parse results and errors in one pass over the variables.
struct Reader<F> {
    lookup: F,
    errors: Vec<ConfigError>,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    /// The variable's value, `None` when unset or empty.
    fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.is_empty())
    }

    fn fail(&mut self, var: &'static str, value: &str, expected: impl Into<String>) {
        self.errors.push(ConfigError {
            var,
            value: value.to_owned(),
            expected: expected.into(),
        });
    }

    /// An unsigned integer in `min..=max`; `default` when unset or invalid
    /// (the error is recorded, the default only keeps parsing going).
    fn int(&mut self, var: &'static str, default: u64, min: u64, max: u64) -> u64 {
        let Some(raw) = self.get(var) else {
            return default;
        };
        match raw.trim().parse::<u64>() {
            Ok(v) if (min..=max).contains(&v) => v,
            _ => {
                self.fail(var, &raw, format!("an integer from {min} to {max}"));
                default
            }
        }
    }

    /// A test knob in milliseconds, from 10 ms to an hour.
    fn millis(&mut self, var: &'static str, default: u64) -> Duration {
        Duration::from_millis(self.int(var, default, 10, 3_600_000))
    }

    fn seconds(&mut self, var: &'static str, default: u64) -> Duration {
        self.seconds_from(var, default, 1)
    }

    /// Whole seconds from `min` to [`MAX_SECONDS`].
    fn seconds_from(&mut self, var: &'static str, default: u64, min: u64) -> Duration {
        let Some(raw) = self.get(var) else {
            return Duration::from_secs(default);
        };
        match raw.trim().parse::<u64>() {
            Ok(v) if (min..=MAX_SECONDS).contains(&v) => Duration::from_secs(v),
            _ => {
                self.fail(
                    var,
                    &raw,
                    format!("a whole number of seconds from {min} to {MAX_SECONDS}"),
                );
                Duration::from_secs(default)
            }
        }
    }
}

/// A node id goes into NATS subjects: no dots, wildcards or spaces.
fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `node-` and 12 random hex digits: unique per run.
fn generated_node_id() -> String {
    let mut seed = [0u8; 6];
    let _ = getrandom::getrandom(&mut seed);
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    format!("node-{hex}")
}

fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_SHARDS)
}

impl Config {
    /// Reads the process environment. A variable that is not valid Unicode
    /// is reported as invalid rather than silently ignored.
    pub fn from_env() -> Result<Config, ConfigErrors> {
        Config::from_lookup(|name| {
            std::env::var_os(name).map(|v| match v.into_string() {
                Ok(s) => s,
                // Keep it non-empty and unparseable so it is reported.
                Err(os) => os.to_string_lossy().into_owned(),
            })
        })
    }

    /// The testable core: `lookup` plays the role of the environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let mut r = Reader {
            lookup,
            errors: Vec::new(),
        };

        let database_url = r.get("DATABASE_URL");
        if let Some(url) = &database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                r.fail(
                    "DATABASE_URL",
                    &redact_url(url),
                    "a postgres:// or postgresql:// URL",
                );
            }
        }

        let host = match r.get("BROKER_HOST") {
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(raw) => match raw.trim() {
                "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
                s => match s.parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        r.fail(
                            "BROKER_HOST",
                            &raw,
                            "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
                        );
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                    }
                },
            },
        };

        let port = r.int("BROKER_PORT", 7900, 0, u16::MAX as u64) as u16;
        let shards = r.int(
            "BROKER_SHARDS",
            default_shards() as u64,
            1,
            MAX_SHARDS as u64,
        ) as usize;
        let status_ttl = r.seconds("STATUS_TTL_SECONDS", 60);
        let hook_fresh_window = r.seconds("HOOK_FRESH_WINDOW_SECONDS", 30);
        let held_ttl = r.seconds("HELD_TTL_SECONDS", 604_800);
        let max_connections_per_mesh =
            r.int("MAX_CONNECTIONS_PER_MESH", 100, 1, u32::MAX as u64) as u32;
        let max_connections = r.int("MAX_CONNECTIONS", 50_000, 1, MAX_CONNECTIONS as u64) as usize;
        let max_message_bytes = r.int(
            "MAX_MESSAGE_BYTES",
            65_536,
            MIN_MESSAGE_BYTES as u64,
            MAX_MESSAGE_BYTES as u64,
        ) as usize;
        let hook_rate_limit_per_min =
            r.int("HOOK_RATE_LIMIT_PER_MIN", 30, 1, u32::MAX as u64) as u32;
        // 0 is allowed: it disables grace.
        let session_grace = r.seconds_from("SESSION_GRACE_SECONDS", 90, 0);
        let send_rate_per_min = r.int("SEND_RATE_PER_MIN", 6000, 1, u32::MAX as u64) as u32;
        let send_burst = r.int("SEND_BURST", 200, 1, u32::MAX as u64) as u32;
        let client_ack_timeout = r.seconds("CLIENT_ACK_TIMEOUT_SECONDS", 30);
        // 0 is allowed: no send is a duplicate of an earlier one.
        let dedupe_window = r.seconds_from("DEDUPE_WINDOW_SECONDS", 600, 0);
        let join_rate_limit_per_min =
            r.int("JOIN_RATE_LIMIT_PER_MIN", 20, 1, u32::MAX as u64) as u32;

        let node_env = match r.get("NODE_ENV") {
            None => NodeEnv::Development,
            Some(raw) => match raw.trim() {
                "development" => NodeEnv::Development,
                "production" => NodeEnv::Production,
                "test" => NodeEnv::Test,
                _ => {
                    r.fail("NODE_ENV", &raw, "one of development, production, test");
                    NodeEnv::Development
                }
            },
        };
        if node_env == NodeEnv::Production && database_url.is_none() {
            r.fail(
                "DATABASE_URL",
                "",
                "a postgres:// or postgresql:// URL (required when NODE_ENV=production)",
            );
        }

        // Not in §3's table but read by `logging::init`; checking it here
        // means a typo stops the broker instead of silently logging at info.
        if let Some(raw) = r.get("LOG_LEVEL") {
            if crate::logging::parse_level(&raw).is_none() {
                r.fail("LOG_LEVEL", &raw, "one of error, warn, info, debug, trace");
            }
        }

        let git_sha = r
            .get("GIT_SHA")
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| option_env!("MESHBROKER_BUILD_SHA").map(str::to_owned))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());

        let home = r.get("HOME");
        let claude_projects_dir = match r.get("CLAUDE_PROJECTS_DIR") {
            Some(dir) => expand_home(&dir, home.as_deref()),
            None => match &home {
                Some(h) => PathBuf::from(h).join(".claude").join("projects"),
                // No HOME (a bare service manager): relative to the cwd.
                None => PathBuf::from(".claude/projects"),
            },
        };

        let nats_url = r.get("NATS_URL").filter(|u| !u.trim().is_empty());
        if let Some(url) = &nats_url {
            if !(url.starts_with("nats://") || url.contains(':')) {
                r.fail("NATS_URL", url, "a nats://host:port URL");
            }
        }
        let node_id = match r.get("NODE_ID") {
            Some(id) if valid_node_id(&id) => id,
            Some(id) => {
                r.fail("NODE_ID", &id, "1 to 64 of A-Z a-z 0-9 _ -");
                String::new()
            }
            None => generated_node_id(),
        };
        let cluster_confirm_timeout = r.millis("CLUSTER_CONFIRM_TIMEOUT_MS", 250);
        let node_dead_after = r.millis("NODE_DEAD_AFTER_MS", 3_000);

        let data_dir = r
            .get("MESHBROKER_DATA_DIR")
            .map(|d| expand_home(&d, home.as_deref()))
            .unwrap_or_else(|| PathBuf::from(".meshbroker"));

        let max_outbound_bytes = r.int(
            "MAX_OUTBOUND_BYTES",
            4 * 1024 * 1024,
            64 * 1024,
            1024 * 1024 * 1024,
        ) as usize;
        let client_ack_max_leases = r.int(
            "CLIENT_ACK_MAX_LEASES",
            4096,
            1,
            MAX_CLIENT_ACK_LEASES as u64,
        ) as usize;
        let client_ack_max_lease_bytes = r.int(
            "CLIENT_ACK_MAX_LEASE_BYTES",
            16 * 1024 * 1024,
            MIN_CLIENT_ACK_LEASE_BYTES as u64,
            MAX_CLIENT_ACK_LEASE_BYTES as u64,
        ) as usize;
        let member_refresh = r.seconds("MEMBER_REFRESH_SECONDS", 5);
        let io_driver = match r.get("BROKER_IO_DRIVER").as_deref().map(str::trim) {
            None | Some("auto") => IoDriver::Auto,
            Some("epoll") => IoDriver::Epoll,
            Some(other) => {
                let other = other.to_owned();
                r.fail("BROKER_IO_DRIVER", &other, "auto or epoll");
                IoDriver::Auto
            }
        };

        let max_held_per_member = r.int("MAX_HELD_PER_MEMBER", 10_000, 1, 10_000_000) as usize;
        let max_held_memory_bytes = r.int(
            "MAX_HELD_MEMORY_BYTES",
            256 * 1024 * 1024,
            64 * 1024,
            64 * 1024 * 1024 * 1024,
        ) as usize;
        let max_held_bytes_per_member = r.int(
            "MAX_HELD_BYTES_PER_MEMBER",
            64 * 1024 * 1024,
            64 * 1024,
            64 * 1024 * 1024 * 1024,
        ) as usize;
        let hello_timeout = r.seconds("HELLO_TIMEOUT_SECONDS", 10);
        let http_idle_timeout = r.seconds("HTTP_IDLE_TIMEOUT_SECONDS", 30);
        let rate_limit_close_after =
            r.int("RATE_LIMIT_CLOSE_AFTER", 100, 1, u32::MAX as u64) as u32;
        let held_batch_max_rows = r.int("HELD_BATCH_MAX_ROWS", 2048, 1, 65_536) as usize;
        let held_batch_max_wait =
            Duration::from_micros(r.int("HELD_BATCH_MAX_WAIT_US", 500, 0, 1_000_000));
        let held_writer_connections = r.int("HELD_WRITER_CONNECTIONS", 1, 1, 16) as usize;
        let audit_batch_max_rows = r.int("AUDIT_BATCH_MAX_ROWS", 1024, 1, 65_536) as usize;
        let audit_batch_max_wait =
            Duration::from_micros(r.int("AUDIT_BATCH_MAX_WAIT_US", 2000, 0, 1_000_000));
        let audit_buffer_events = r.int("AUDIT_BUFFER_EVENTS", 100_000, 1, 10_000_000) as usize;
        let audit_events = match r.get("AUDIT_EVENTS") {
            None => AuditSelection::ALL,
            Some(text) => AuditSelection::parse(&text).unwrap_or_else(|| {
                let expected = format!(
                    "all, none, or a comma-separated list of: {}",
                    EVENT_TYPES.join(", ")
                );
                r.fail("AUDIT_EVENTS", &text, expected);
                AuditSelection::ALL
            }),
        };
        let ping_interval = r.millis("BROKER_PING_INTERVAL_MS", 30_000);
        let ping_timeout = r.millis("BROKER_PING_TIMEOUT_MS", 75_000);
        let sweep_interval = r.millis("BROKER_SWEEP_INTERVAL_MS", 15_000);
        let fault_panic_session_id = r.get("BROKER_FAULT_PANIC_SESSION_ID");

        if !r.errors.is_empty() {
            return Err(ConfigErrors(r.errors));
        }
        Ok(Config {
            database_url,
            host,
            port,
            shards,
            status_ttl,
            hook_fresh_window,
            held_ttl,
            max_connections_per_mesh,
            max_connections,
            max_message_bytes,
            hook_rate_limit_per_min,
            session_grace,
            send_rate_per_min,
            send_burst,
            client_ack_timeout,
            dedupe_window,
            join_rate_limit_per_min,
            node_env,
            git_sha,
            claude_projects_dir,
            nats_url,
            node_id,
            cluster_confirm_timeout,
            node_dead_after,
            data_dir,
            max_outbound_bytes,
            client_ack_max_leases,
            client_ack_max_lease_bytes,
            member_refresh,
            io_driver,
            max_held_per_member,
            max_held_memory_bytes,
            max_held_bytes_per_member,
            hello_timeout,
            http_idle_timeout,
            rate_limit_close_after,
            held_batch_max_rows,
            held_batch_max_wait,
            held_writer_connections,
            audit_batch_max_rows,
            audit_batch_max_wait,
            audit_buffer_events,
            audit_events,
            ping_interval,
            ping_timeout,
            sweep_interval,
            fault_panic_session_id,
        })
    }

    /// The effective values as (name, value) pairs for the `broker listening`
    /// log line. `DATABASE_URL` has its password replaced by `***`, and reads
    /// `embedded` when unset.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "DATABASE_URL",
                self.database_url
                    .as_deref()
                    .map(redact_url)
                    .unwrap_or_else(|| "embedded".to_owned()),
            ),
            ("BROKER_HOST", self.host.to_string()),
            ("BROKER_PORT", self.port.to_string()),
            ("BROKER_SHARDS", self.shards.to_string()),
            ("STATUS_TTL_SECONDS", self.status_ttl.as_secs().to_string()),
            (
                "HOOK_FRESH_WINDOW_SECONDS",
                self.hook_fresh_window.as_secs().to_string(),
            ),
            ("HELD_TTL_SECONDS", self.held_ttl.as_secs().to_string()),
            (
                "MAX_CONNECTIONS_PER_MESH",
                self.max_connections_per_mesh.to_string(),
            ),
            ("MAX_CONNECTIONS", self.max_connections.to_string()),
            ("MAX_MESSAGE_BYTES", self.max_message_bytes.to_string()),
            (
                "HOOK_RATE_LIMIT_PER_MIN",
                self.hook_rate_limit_per_min.to_string(),
            ),
            (
                "SESSION_GRACE_SECONDS",
                self.session_grace.as_secs().to_string(),
            ),
            ("SEND_RATE_PER_MIN", self.send_rate_per_min.to_string()),
            ("SEND_BURST", self.send_burst.to_string()),
            (
                "CLIENT_ACK_TIMEOUT_SECONDS",
                self.client_ack_timeout.as_secs().to_string(),
            ),
            (
                "DEDUPE_WINDOW_SECONDS",
                self.dedupe_window.as_secs().to_string(),
            ),
            (
                "JOIN_RATE_LIMIT_PER_MIN",
                self.join_rate_limit_per_min.to_string(),
            ),
            ("NODE_ENV", self.node_env.as_str().to_owned()),
            ("GIT_SHA", self.git_sha.clone()),
            (
                "CLAUDE_PROJECTS_DIR",
                self.claude_projects_dir.display().to_string(),
            ),
            (
                "NATS_URL",
                self.nats_url
                    .as_deref()
                    .map(redact_url)
                    .unwrap_or_else(|| "unset".to_owned()),
            ),
            ("NODE_ID", self.node_id.clone()),
            (
                "CLUSTER_CONFIRM_TIMEOUT_MS",
                self.cluster_confirm_timeout.as_millis().to_string(),
            ),
            (
                "NODE_DEAD_AFTER_MS",
                self.node_dead_after.as_millis().to_string(),
            ),
            ("MESHBROKER_DATA_DIR", self.data_dir.display().to_string()),
            ("MAX_OUTBOUND_BYTES", self.max_outbound_bytes.to_string()),
            (
                "CLIENT_ACK_MAX_LEASES",
                self.client_ack_max_leases.to_string(),
            ),
            (
                "CLIENT_ACK_MAX_LEASE_BYTES",
                self.client_ack_max_lease_bytes.to_string(),
            ),
            (
                "MEMBER_REFRESH_SECONDS",
                self.member_refresh.as_secs().to_string(),
            ),
            ("BROKER_IO_DRIVER", self.io_driver.as_str().to_owned()),
            ("MAX_HELD_PER_MEMBER", self.max_held_per_member.to_string()),
            (
                "MAX_HELD_MEMORY_BYTES",
                self.max_held_memory_bytes.to_string(),
            ),
            (
                "MAX_HELD_BYTES_PER_MEMBER",
                self.max_held_bytes_per_member.to_string(),
            ),
            (
                "HELLO_TIMEOUT_SECONDS",
                self.hello_timeout.as_secs().to_string(),
            ),
            (
                "HTTP_IDLE_TIMEOUT_SECONDS",
                self.http_idle_timeout.as_secs().to_string(),
            ),
            (
                "RATE_LIMIT_CLOSE_AFTER",
                self.rate_limit_close_after.to_string(),
            ),
            ("HELD_BATCH_MAX_ROWS", self.held_batch_max_rows.to_string()),
            (
                "HELD_BATCH_MAX_WAIT_US",
                self.held_batch_max_wait.as_micros().to_string(),
            ),
            (
                "HELD_WRITER_CONNECTIONS",
                self.held_writer_connections.to_string(),
            ),
            (
                "AUDIT_BATCH_MAX_ROWS",
                self.audit_batch_max_rows.to_string(),
            ),
            (
                "AUDIT_BATCH_MAX_WAIT_US",
                self.audit_batch_max_wait.as_micros().to_string(),
            ),
            ("AUDIT_BUFFER_EVENTS", self.audit_buffer_events.to_string()),
            ("AUDIT_EVENTS", self.audit_events.describe()),
            (
                "BROKER_PING_INTERVAL_MS",
                self.ping_interval.as_millis().to_string(),
            ),
            (
                "BROKER_PING_TIMEOUT_MS",
                self.ping_timeout.as_millis().to_string(),
            ),
            (
                "BROKER_SWEEP_INTERVAL_MS",
                self.sweep_interval.as_millis().to_string(),
            ),
        ]
    }
}

/// `~/x` → `$HOME/x` (the original documented `~/.claude/projects`, and
/// systemd units do not expand `~`).
fn expand_home(path: &str, home: Option<&str>) -> PathBuf {
    if let Some(h) = home {
        if path == "~" {
            return PathBuf::from(h);
        }
        if let Some(rest) = path.strip_prefix("~/") {
            return PathBuf::from(h).join(rest);
        }
    }
    PathBuf::from(path)
}

/// Replaces the password of a URL's userinfo (`user:secret@`) and any
/// `password=` query parameter with `***`. Anything that does not look like
/// a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let auth_end = out[auth_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| auth_start + i);
        // The last '@' of the authority ends the userinfo (a password may
        // itself contain '@' when not percent-encoded).
        if let Some(at) = out[auth_start..auth_end].rfind('@') {
            let userinfo = &out[auth_start..auth_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(auth_start + colon + 1..auth_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out = format!("{head}{query}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn errors(vars: &[(&str, &str)]) -> Vec<ConfigError> {
        match parse(vars) {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(c.database_url, None);
        assert_eq!(c.host, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(c.port, 7900);
        assert_eq!(c.shards, default_shards());
        assert!(c.shards >= 1);
        assert_eq!(c.status_ttl, Duration::from_secs(60));
        assert_eq!(c.hook_fresh_window, Duration::from_secs(30));
        assert_eq!(c.held_ttl, Duration::from_secs(604_800));
        assert_eq!(c.max_connections_per_mesh, 100);
        assert_eq!(c.max_connections, 50_000);
        assert_eq!(c.max_message_bytes, 65_536);
        assert_eq!(c.hook_rate_limit_per_min, 30);
        assert_eq!(c.session_grace, Duration::from_secs(90));
        assert_eq!(c.send_rate_per_min, 6000);
        assert_eq!(c.send_burst, 200);
        assert_eq!(c.client_ack_timeout, Duration::from_secs(30));
        assert_eq!(c.dedupe_window, Duration::from_secs(600));
        assert_eq!(c.join_rate_limit_per_min, 20);
        assert_eq!(c.client_ack_max_leases, 4096);
        assert_eq!(c.client_ack_max_lease_bytes, 16 * 1024 * 1024);
        assert_eq!(c.node_env, NodeEnv::Development);
        assert!(!c.git_sha.is_empty());
        assert_eq!(
            c.claude_projects_dir,
            PathBuf::from("/home/u/.claude/projects")
        );
        assert_eq!(c.data_dir, PathBuf::from(".meshbroker"));
        assert_eq!(c.audit_batch_max_rows, 1024);
        assert_eq!(c.audit_batch_max_wait, Duration::from_micros(2000));
        assert_eq!(c.audit_buffer_events, 100_000);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = parse(&[
            ("BROKER_PORT", ""),
            ("DATABASE_URL", ""),
            ("NODE_ENV", ""),
            ("GIT_SHA", ""),
        ])
        .unwrap();
        assert_eq!(c.port, 7900);
        assert_eq!(c.database_url, None);
        assert_eq!(c.node_env, NodeEnv::Development);
    }

    #[test]
    fn explicit_values() {
        let c = parse(&[
            ("DATABASE_URL", "postgresql://u:p@db:5432/x"),
            ("BROKER_HOST", "::1"),
            ("BROKER_PORT", "0"),
            ("BROKER_SHARDS", "3"),
            ("STATUS_TTL_SECONDS", "5"),
            ("HOOK_FRESH_WINDOW_SECONDS", "7"),
            ("HELD_TTL_SECONDS", "9"),
            ("MAX_CONNECTIONS_PER_MESH", "2"),
            ("MAX_CONNECTIONS", "3"),
            ("MAX_MESSAGE_BYTES", "1024"),
            ("HOOK_RATE_LIMIT_PER_MIN", "1"),
            ("SESSION_GRACE_SECONDS", "5"),
            ("SEND_RATE_PER_MIN", "60"),
            ("SEND_BURST", "1"),
            ("CLIENT_ACK_TIMEOUT_SECONDS", "1"),
            ("DEDUPE_WINDOW_SECONDS", "0"),
            ("JOIN_RATE_LIMIT_PER_MIN", "3"),
            ("CLIENT_ACK_MAX_LEASES", "1"),
            ("CLIENT_ACK_MAX_LEASE_BYTES", "65536"),
            ("NODE_ENV", "production"),
            ("GIT_SHA", "abc123"),
            ("CLAUDE_PROJECTS_DIR", "~/p"),
            ("HOME", "/h"),
            ("MESHBROKER_DATA_DIR", "/var/lib/mb"),
            ("LOG_LEVEL", "debug"),
            ("AUDIT_BATCH_MAX_ROWS", "10"),
            ("AUDIT_BATCH_MAX_WAIT_US", "0"),
            ("AUDIT_BUFFER_EVENTS", "50"),
        ])
        .unwrap();
        assert_eq!(
            c.database_url.as_deref(),
            Some("postgresql://u:p@db:5432/x")
        );
        assert_eq!(c.host, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 0);
        assert_eq!(c.shards, 3);
        assert_eq!(c.status_ttl, Duration::from_secs(5));
        assert_eq!(c.hook_fresh_window, Duration::from_secs(7));
        assert_eq!(c.held_ttl, Duration::from_secs(9));
        assert_eq!(c.max_connections_per_mesh, 2);
        assert_eq!(c.max_connections, 3);
        assert_eq!(c.max_message_bytes, 1024);
        assert_eq!(c.hook_rate_limit_per_min, 1);
        assert_eq!(c.session_grace, Duration::from_secs(5));
        assert_eq!(c.send_rate_per_min, 60);
        assert_eq!(c.send_burst, 1);
        assert_eq!(c.join_rate_limit_per_min, 3);
        assert_eq!(c.client_ack_timeout, Duration::from_secs(1));
        // Zero turns duplicate detection off.
        assert_eq!(c.dedupe_window, Duration::ZERO);
        assert_eq!(c.client_ack_max_leases, 1);
        assert_eq!(c.client_ack_max_lease_bytes, MIN_CLIENT_ACK_LEASE_BYTES);
        assert_eq!(c.node_env, NodeEnv::Production);
        assert_eq!(c.git_sha, "abc123");
        assert_eq!(c.claude_projects_dir, PathBuf::from("/h/p"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/mb"));
        assert_eq!(c.audit_batch_max_rows, 10);
        assert_eq!(c.audit_batch_max_wait, Duration::ZERO);
        assert_eq!(c.audit_buffer_events, 50);
        // Zero disables grace (unlike the other `*_SECONDS`).
        assert_eq!(
            parse(&[("SESSION_GRACE_SECONDS", "0")])
                .unwrap()
                .session_grace,
            Duration::ZERO
        );
        assert_eq!(
            parse(&[("BROKER_HOST", "localhost")]).unwrap().host,
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            parse(&[("MAX_MESSAGE_BYTES", "67108864")])
                .unwrap()
                .max_message_bytes,
            MAX_MESSAGE_BYTES
        );
        let most = parse(&[
            ("CLIENT_ACK_MAX_LEASES", "1000000"),
            ("CLIENT_ACK_MAX_LEASE_BYTES", "1073741824"),
            ("DEDUPE_WINDOW_SECONDS", "86400"),
        ])
        .unwrap();
        assert_eq!(most.client_ack_max_leases, MAX_CLIENT_ACK_LEASES);
        assert_eq!(most.client_ack_max_lease_bytes, MAX_CLIENT_ACK_LEASE_BYTES);
        assert_eq!(most.dedupe_window, Duration::from_secs(86_400));
    }

    #[test]
    fn each_variable_bad_in_turn() {
        let cases: &[(&str, &str, &str)] = &[
            ("DATABASE_URL", "mysql://x", "postgres://"),
            ("DATABASE_URL", "localhost:5432", "postgres://"),
            ("BROKER_HOST", "example.com", "IP address"),
            ("BROKER_PORT", "abc", "from 0 to 65535"),
            ("BROKER_PORT", "65536", "from 0 to 65535"),
            ("BROKER_PORT", "-1", "from 0 to 65535"),
            ("BROKER_SHARDS", "0", "from 1 to 64"),
            ("BROKER_SHARDS", "65", "from 1 to 64"),
            ("STATUS_TTL_SECONDS", "0", "seconds"),
            ("STATUS_TTL_SECONDS", "1.5", "seconds"),
            ("HOOK_FRESH_WINDOW_SECONDS", "x", "seconds"),
            ("HELD_TTL_SECONDS", "-5", "seconds"),
            ("HELD_TTL_SECONDS", "999999999999", "seconds"),
            ("MAX_CONNECTIONS_PER_MESH", "0", "from 1 to"),
            (
                "MAX_CONNECTIONS_PER_MESH",
                "4294967296",
                "from 1 to 4294967295",
            ),
            ("MAX_CONNECTIONS", "0", "from 1 to 10000000"),
            ("MAX_CONNECTIONS", "10000001", "from 1 to 10000000"),
            ("MAX_CONNECTIONS", "lots", "from 1 to 10000000"),
            ("MAX_MESSAGE_BYTES", "1023", "from 1024 to 67108864"),
            ("MAX_MESSAGE_BYTES", "67108865", "from 1024 to 67108864"),
            ("HOOK_RATE_LIMIT_PER_MIN", "0", "from 1 to"),
            ("SESSION_GRACE_SECONDS", "-1", "seconds from 0 to"),
            ("SESSION_GRACE_SECONDS", "1.5", "seconds from 0 to"),
            ("SESSION_GRACE_SECONDS", "999999999999", "seconds from 0 to"),
            ("SEND_RATE_PER_MIN", "0", "from 1 to 4294967295"),
            ("SEND_RATE_PER_MIN", "ten", "from 1 to 4294967295"),
            ("SEND_RATE_PER_MIN", "4294967296", "from 1 to 4294967295"),
            ("SEND_BURST", "0", "from 1 to 4294967295"),
            ("JOIN_RATE_LIMIT_PER_MIN", "0", "from 1 to 4294967295"),
            ("JOIN_RATE_LIMIT_PER_MIN", "1.5", "from 1 to 4294967295"),
            ("SEND_BURST", "-3", "from 1 to 4294967295"),
            ("CLIENT_ACK_TIMEOUT_SECONDS", "0", "seconds from 1 to"),
            ("CLIENT_ACK_TIMEOUT_SECONDS", "2.5", "seconds from 1 to"),
            ("DEDUPE_WINDOW_SECONDS", "-1", "seconds from 0 to"),
            ("DEDUPE_WINDOW_SECONDS", "10m", "seconds from 0 to"),
            ("DEDUPE_WINDOW_SECONDS", "999999999999", "seconds from 0 to"),
            ("CLIENT_ACK_MAX_LEASES", "0", "from 1 to 1000000"),
            ("CLIENT_ACK_MAX_LEASES", "1000001", "from 1 to 1000000"),
            (
                "CLIENT_ACK_MAX_LEASE_BYTES",
                "65535",
                "from 65536 to 1073741824",
            ),
            (
                "CLIENT_ACK_MAX_LEASE_BYTES",
                "1073741825",
                "from 65536 to 1073741824",
            ),
            (
                "CLIENT_ACK_MAX_LEASE_BYTES",
                "16MiB",
                "from 65536 to 1073741824",
            ),
            ("NODE_ENV", "prod", "development, production, test"),
            ("LOG_LEVEL", "verbose", "error, warn, info, debug, trace"),
            ("BROKER_IO_DRIVER", "kqueue", "auto or epoll"),
            ("AUDIT_BATCH_MAX_ROWS", "0", "from 1 to 65536"),
            ("AUDIT_BATCH_MAX_WAIT_US", "1000001", "from 0 to 1000000"),
            ("AUDIT_BUFFER_EVENTS", "0", "from 1 to 10000000"),
        ];
        for (var, value, expected) in cases {
            let errs = errors(&[(var, value)]);
            assert_eq!(errs.len(), 1, "{var}={value}: {errs:?}");
            let e = &errs[0];
            assert_eq!(e.var, *var);
            assert_eq!(e.value, *value);
            assert!(e.expected.contains(expected), "{var}: {}", e.expected);
            let line = e.to_string();
            assert!(line.starts_with(&format!("invalid {var}=\"")), "{line}");
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn display_format() {
        let e = &errors(&[("BROKER_PORT", "abc")])[0];
        assert_eq!(
            e.to_string(),
            "invalid BROKER_PORT=\"abc\": expected an integer from 0 to 65535"
        );
        // Control characters cannot break the one-line rule.
        let e = &errors(&[("BROKER_PORT", "1\n2")])[0];
        assert_eq!(
            e.to_string(),
            "invalid BROKER_PORT=\"1\\n2\": expected an integer from 0 to 65535"
        );
    }

    #[test]
    fn several_bad_at_once_are_all_reported() {
        let err = parse(&[
            ("BROKER_PORT", "abc"),
            ("BROKER_SHARDS", "0"),
            ("MAX_MESSAGE_BYTES", "1"),
            ("NODE_ENV", "staging"),
            ("DATABASE_URL", "redis://h"),
        ])
        .unwrap_err();
        let vars: Vec<&str> = err.0.iter().map(|e| e.var).collect();
        assert_eq!(
            vars,
            [
                "DATABASE_URL",
                "BROKER_PORT",
                "BROKER_SHARDS",
                "MAX_MESSAGE_BYTES",
                "NODE_ENV"
            ]
        );
        let text = err.to_string();
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.lines().all(|l| l.starts_with("invalid ")));
    }

    #[test]
    fn production_requires_database_url() {
        let errs = errors(&[("NODE_ENV", "production")]);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].var, "DATABASE_URL");
        let line = errs[0].to_string();
        assert!(line.starts_with("missing DATABASE_URL: expected"), "{line}");
        assert!(line.contains("NODE_ENV=production"), "{line}");
        // Empty counts as unset here too.
        let errs = errors(&[("NODE_ENV", "production"), ("DATABASE_URL", "")]);
        assert_eq!(errs[0].var, "DATABASE_URL");
        // With a URL it starts; test and development run embedded.
        assert!(parse(&[
            ("NODE_ENV", "production"),
            ("DATABASE_URL", "postgres://h/d")
        ])
        .is_ok());
        assert!(parse(&[("NODE_ENV", "test")])
            .unwrap()
            .database_url
            .is_none());
    }

    #[test]
    fn password_redaction() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgresql://h/db?sslmode=require&password=x&user=u"),
            "postgresql://h/db?sslmode=require&password=***&user=u"
        );
        let c = parse(&[("DATABASE_URL", "postgres://broker:hunter2@db/mesh")]).unwrap();
        let eff = c.effective();
        let db = eff.iter().find(|(k, _)| *k == "DATABASE_URL").unwrap();
        assert_eq!(db.1, "postgres://broker:***@db/mesh");
        assert!(!format!("{eff:?}").contains("hunter2"));
        // A rejected URL is redacted in the error too.
        let errs = errors(&[("DATABASE_URL", "mysql://root:hunter2@h/db")]);
        assert_eq!(errs[0].value, "mysql://root:***@h/db");
    }

    #[test]
    fn effective_lists_every_variable() {
        let c = parse(&[("BROKER_PORT", "0")]).unwrap();
        let eff = c.effective();
        let names: Vec<&str> = eff.iter().map(|(k, _)| *k).collect();
        for var in [
            "DATABASE_URL",
            "BROKER_HOST",
            "BROKER_PORT",
            "BROKER_SHARDS",
            "STATUS_TTL_SECONDS",
            "HOOK_FRESH_WINDOW_SECONDS",
            "HELD_TTL_SECONDS",
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
            "MESHBROKER_DATA_DIR",
            "NATS_URL",
            "NODE_ID",
            "CLUSTER_CONFIRM_TIMEOUT_MS",
            "NODE_DEAD_AFTER_MS",
            "AUDIT_BATCH_MAX_ROWS",
            "AUDIT_BATCH_MAX_WAIT_US",
            "AUDIT_BUFFER_EVENTS",
        ] {
            assert!(names.contains(&var), "{var} missing");
        }
        assert_eq!(eff[0], ("DATABASE_URL", "embedded".to_owned()));
        assert!(eff.contains(&("BROKER_PORT", "0".to_owned())));
        assert!(eff.contains(&("SESSION_GRACE_SECONDS", "90".to_owned())));
        assert!(eff.contains(&("MAX_CONNECTIONS", "50000".to_owned())));
        assert!(eff.contains(&("SEND_RATE_PER_MIN", "6000".to_owned())));
        assert!(eff.contains(&("SEND_BURST", "200".to_owned())));
        assert!(eff.contains(&("CLIENT_ACK_TIMEOUT_SECONDS", "30".to_owned())));
        assert!(eff.contains(&("DEDUPE_WINDOW_SECONDS", "600".to_owned())));
        assert!(eff.contains(&("JOIN_RATE_LIMIT_PER_MIN", "20".to_owned())));
        assert!(eff.contains(&("CLIENT_ACK_MAX_LEASES", "4096".to_owned())));
        assert!(eff.contains(&("CLIENT_ACK_MAX_LEASE_BYTES", "16777216".to_owned())));
        assert!(eff.contains(&("NATS_URL", "unset".to_owned())));
    }

    #[test]
    fn cluster_settings() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.nats_url, None);
        assert!(c.node_id.starts_with("node-") && valid_node_id(&c.node_id));
        assert_ne!(c.node_id, generated_node_id());
        assert_eq!(c.cluster_confirm_timeout, Duration::from_millis(250));
        assert_eq!(c.node_dead_after, Duration::from_secs(3));
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            Config::from_lookup(move |k| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        let c = env(&[("NATS_URL", "nats://127.0.0.1:4222"), ("NODE_ID", "b-2")]).unwrap();
        assert_eq!(c.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(c.node_id, "b-2");
        let e = env(&[("NODE_ID", "a.b")]).unwrap_err().to_string();
        assert!(e.contains("NODE_ID"), "{e}");
        assert!(env(&[("NATS_URL", "nonsense")]).is_err());
    }
}
