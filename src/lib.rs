//! meshbroker: a thread-per-core io_uring WebSocket broker for claudemesh.
//!
//! # Layout
//! - `config`   — typed configuration from the environment, validated once at start.
//! - `logging`  — one JSON object per line on stderr (`ts`, `level`, `component`, `msg`).
//! - `broker`   — spawns the shards and the db thread, owns shutdown; `BrokerContext`
//!   is what every shard shares (config, metrics, directory, db handle, inboxes).
//! - `shard`    — one pinned monoio runtime per core: listener, HTTP and WebSocket
//!   connections, its slice of the routing table, its inbox. Touches other shards
//!   only through their inboxes, Postgres only through the db handle.
//! - `mesh`     — routing without sockets: the shared membership directory, held
//!   envelopes, and the delivery rules.
//! - `protocol` — the JSON messages of PROTOCOL.md §4, parsed and serialized; no I/O.
//! - `ws`       — RFC 6455 handshake and frame codec; no I/O.
//! - `http`     — HTTP/1.1 request-head parsing and response building; no I/O.
//! - `hook`     — `/hook/set-status` body validation and the per-(pid, cwd) token bucket.
//! - `status`   — a session's status without sockets (§5): the source-ranked write rule,
//!   what a status may receive, the TTL, and transcript inference on its own thread.
//! - `metrics`  — per-shard counters and HDR histograms, merged at scrape time.
//! - `db`       — the one thread that talks to Postgres: migrations, health, member
//!   lookups, batched writes.
//! - `devdb`    — the embedded development Postgres (initdb/pg_ctl), also used by tests.
//! - `ids`      — sortable unique ids made on the shard.
pub mod broker;
pub mod config;
pub mod context;
pub mod db;
pub mod devdb;
pub mod hook;
pub mod http;
pub mod ids;
pub mod inbox;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod protocol;
pub mod shard;
pub mod status;
pub mod ws;
