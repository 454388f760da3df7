//! meshbroker: a thread-per-core io_uring WebSocket broker for claudemesh.
//!
//! # Layout
//! - `config`    — typed configuration from the environment, validated once at start.
//! - `logging`   — one JSON object per line on stderr (`ts`, `level`, `component`, `msg`).
//! - `devdb`     — the embedded development Postgres (initdb/pg_ctl), also used by the tests.
//! - `ws`        — RFC 6455 handshake and frame codec; no I/O.
//! - `http`      — HTTP/1.1 request-head parsing and response building; no I/O.
//! - `hook`      — `/hook/set-status` body validation and the per-(pid, cwd) token bucket.
//! - `metrics`   — per-shard counters and HDR histograms, merged at scrape time.
//! - `db`        — the one thread that talks to Postgres: migrations, health, batched writes.
pub mod config;
pub mod db;
pub mod devdb;
pub mod hook;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ws;
