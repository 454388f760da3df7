//! meshbroker: a thread-per-core io_uring WebSocket broker for claudemesh.
//!
//! # Layout
//! - `config`   — typed configuration from the environment, validated once at start.
//! - `logging`  — one JSON object per line on stderr (`ts`, `level`, `component`, `msg`).
//! - `broker`   — spawns the shards and the db thread, owns shutdown (a shard panic
//!   stops the broker with exit code 1).
//! - `context`  — `BrokerContext`, what every shard shares (config, metrics, directory
//!   and its lookup, db handle, inboxes, hook index, transcript reader).
//! - `cluster`  — several nodes as one over NATS (`NATS_URL`): the bus thread, what
//!   this node knows of the others, the bus messages; unused on one node.
//! - `inbox`    — `ShardEvent`, what crosses into a shard, and the channel it crosses on.
//! - `shard`    — one pinned monoio runtime per core: listener, HTTP and WebSocket
//!   connections, its slice of the routing table, its inbox. Touches other shards
//!   only through their inboxes, Postgres only through the db handle.
//! - `mesh`     — an envelope's life without sockets: the membership directory, the
//!   plan, status-gated delivery, held envelopes; every rule of PROTOCOL.md §5.
//! - `status`   — a session's status and the §5 write rule, transcript inference (on
//!   its own thread), and the hook index (live sessions by cwd, stashed signals).
//! - `protocol` — the JSON messages of PROTOCOL.md §4 and §9–§11, parsed and serialized; no I/O.
//! - `ws`       — RFC 6455 handshake and frame codec; no I/O.
//! - `http`     — HTTP/1.1 request-head parsing and response building; no I/O.
//! - `hook`     — `/hook/set-status` body validation and its per-(pid, cwd) limiter.
//! - `rate`     — token buckets per key (the hook and join limiters); no I/O.
//! - `join`     — `POST /join` (PROTOCOL.md §12) without I/O: the body, the invite's
//!   canonical bytes and signature, the contract's check order; invites for the CLI.
//! - `metrics`  — per-shard counters and HDR histograms, merged at scrape time.
//! - `audit`    — audit events (PROTOCOL.md §8 `mesh.audit_log`), built where they
//!   happen from shared handles, metadata only; written by the db thread's audit lane.
//! - `db`       — the one thread that talks to Postgres: migrations, health, member
//!   lookups, batched writes, the audit lane and its hash chain (`db::chain`,
//!   with `verify_chain`).
//! - `enroll`   — the self-hosted onboarding commands (`mesh create`, `invite`) and the
//!   owner key file.
//! - `devdb`    — the embedded development Postgres (initdb/pg_ctl), also used by tests.
//! - `ids`      — sortable unique ids made on the shard.
//! - `fuzz_api` — (feature `fuzzing`) the fuzz targets' entry points onto the parsers.
pub(crate) mod audit;
pub mod broker;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod context;
pub mod db;
pub mod devdb;
pub mod enroll;
#[cfg(feature = "fuzzing")]
pub mod fuzz_api;
pub(crate) mod hook;
pub(crate) mod http;
pub(crate) mod ids;
pub(crate) mod inbox;
pub mod join;
pub mod logging;
pub mod mesh;
pub(crate) mod metrics;
pub mod protocol;
pub(crate) mod rate;
pub mod shard;
pub mod status;
pub mod ws;
